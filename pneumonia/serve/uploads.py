"""What the server accepts: a size limit on every request body (before it is read to the end),
a type check by content, not by name, a few uploads decoded at once, and requests only by its
own names and from its own page.

Names (against DNS rebinding: a page of another site whose name is made to resolve to this
machine would reach the API through a visitor's browser, and read the answers): a request's
Host must be `localhost`, `127.0.0.1`, `::1`, the address the server is bound to, this
machine's host name and any IP address when bound to any other address than a loopback one
(`--host 0.0.0.0`: a rebinding attack needs a name, not an address), or a name the server was
started with (`--allowed_hosts`, `*`: any); otherwise 400. Ports are not compared: the
listening socket has already chosen the port.

Origins (against cross-site request forgery: any page a user has open may POST to this
server): a request other than GET, HEAD and OPTIONS whose Origin is not the server's own (the
Host it was reached by, at the same port) nor at a name given by `--allowed_hosts` (a proxy's
public name) is refused with 403; without an Origin, so is one a browser marks
`Sec-Fetch-Site: cross-site` or `same-site`. Clients that are not browsers (curl, scripts) send
neither and are served.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import math
import socket
import threading
from collections.abc import Collection, Iterable, Iterator
from urllib.parse import urlsplit

from fastapi import HTTPException
from starlette.datastructures import Headers

from pneumonia.data.decode import is_dicom

MAX_UPLOAD = 32 << 20  # bytes: a 16-bit DICOM chest radiograph is typically 8-20 MiB

ACCEPTED = "a JPEG, PNG or DICOM file"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
DEFAULT_PORTS = {"http": 80, "https": 443}
# In a set of Host names: any IP address is one too. A server bound beyond the loopback is
# reached by its network addresses, which its host name need not resolve to, and DNS
# rebinding needs a name: an address in the Host header is safe.
ANY_ADDRESS = "<any IP address>"


def too_large(limit: int) -> HTTPException:
    return HTTPException(413, f"upload larger than {limit // (1 << 20)} MiB: send a smaller file")


class LimitBody:
    """ASGI middleware: a body above `limit` bytes is refused with 413 as soon as it is known
    to be (from Content-Length, or while a chunked body streams in), never spooled whole."""

    def __init__(self, app, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await reply(send, 413, too_large(self.limit).detail)
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise too_large(self.limit)
            return message

        await self.app(scope, limited, send)


async def reply(send, status: int, detail: str) -> None:
    """Answer {"detail": detail} with `status` straight from an ASGI middleware."""
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def check_type(data: bytes, name: str) -> None:
    """415 unless the bytes are a JPEG, a PNG or a DICOM file (by their first bytes)."""
    if not data:
        raise HTTPException(400, "empty upload: choose a radiograph file")
    if data[:3] == b"\xff\xd8\xff" or data[:8] == b"\x89PNG\r\n\x1a\n" or is_dicom(data, name):
        return
    raise HTTPException(415, f"{name or 'the upload'} is not {ACCEPTED}")


class Slots:
    """At most `count` uploads decoded and scored at once (each may hold a decoded image as
    large as the decode budget allows); a request that finds them all busy for `wait_s`
    seconds gets 503 with Retry-After instead of queueing without bound."""

    def __init__(self, count: int, wait_s: float) -> None:
        self.count, self.wait_s = count, wait_s
        self._free = threading.BoundedSemaphore(count)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        if not self._free.acquire(timeout=self.wait_s):
            retry = max(1, math.ceil(self.wait_s))
            raise HTTPException(
                503,
                f"busy scoring other uploads: send this one again in {retry} s",
                headers={"Retry-After": str(retry)},
            )
        try:
            yield
        finally:
            self._free.release()


def host_names(bind: str, allowed: Iterable[str] = ()) -> frozenset[str] | None:
    """The Host names a server bound to `bind` answers to (the module's docstring), `allowed`
    included; None when `allowed` holds `*` (any)."""
    allowed = {_bare(name) for name in allowed if name.strip()}
    if "*" in allowed:
        return None
    names = {*LOOPBACK_NAMES, _bare(bind), *allowed}
    if not _is_loopback(bind):
        names |= _machine_names() | {ANY_ADDRESS}
    return frozenset(names)


def _bare(name: str) -> str:
    return name.strip().lower().removeprefix("[").removesuffix("]")


def _is_loopback(bind: str) -> bool:
    if _bare(bind) == "localhost":
        return True
    try:
        return ipaddress.ip_address(_bare(bind)).is_loopback
    except ValueError:
        return False


def _machine_names() -> set[str]:
    """This machine's host name and the addresses it resolves to (no reverse lookups: they
    may wait for a DNS server that does not answer)."""
    name = socket.gethostname().lower()
    try:
        found = socket.getaddrinfo(name, None)
    except OSError:
        found = []
    return {name} | {str(entry[4][0]).split("%")[0] for entry in found}


class SameOrigin:
    """ASGI middleware: 400 for a Host not in `hosts` (None: any), 403 for a request that may
    change something sent by a page of another origin than the server's own or `origins`
    (host names: a proxy's public name). See the module's docstring."""

    def __init__(self, app, hosts: Collection[str] | None, origins: Collection[str] = ()) -> None:
        self.app = app
        self.hosts = hosts
        self.origins = {_bare(name) for name in origins} - {"", "*"}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self.refusal(scope["method"], Headers(scope=scope))
        if refusal:
            return await reply(send, *refusal)
        await self.app(scope, receive, send)

    def refusal(self, method: str, headers: Headers) -> tuple[int, str] | None:
        """(status, reason) when the request must be refused, else None."""
        host = headers.get("host", "")
        name, _ = _split_host(host)
        if host and self.hosts is not None and not _known(name, self.hosts):
            allow = f", or start it with --allowed_hosts {name}" if name else ""
            return 400, (
                f"Host {host[:100]} is not a name of this server (a guard against DNS "
                f"rebinding): reach it as localhost or by its address{allow}"
            )
        if method in SAFE_METHODS:
            return None
        origin = headers.get("origin")
        if origin is None:
            site = headers.get("sec-fetch-site", "")
            if site in ("cross-site", "same-site"):
                return 403, (
                    f"cross-origin request refused (Sec-Fetch-Site: {site}): the API answers "
                    "its own page and clients that are not browsers"
                )
            return None
        return self._origin_refusal(origin, host)

    def _origin_refusal(self, origin: str, host: str) -> tuple[int, str] | None:
        name, port, scheme = _origin_parts(origin)
        if name in self.origins or (name and _same_origin(name, port, scheme, host)):
            return None
        proxy = f"; if {name} is this server behind a proxy, start it with --allowed_hosts {name}"
        return 403, (
            f"cross-origin request refused: Origin {origin[:100]} is not this server "
            f"({host or 'no Host'}){proxy if name else ''}"
        )


def _known(name: str, hosts: Collection[str]) -> bool:
    return name in hosts or (ANY_ADDRESS in hosts and _is_address(name))


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _origin_parts(origin: str) -> tuple[str, int | None, str]:
    """An Origin header's (host name, explicit port, scheme); ("", None, "") for `null` or
    anything that is not a URL."""
    try:
        parts = urlsplit(origin)
        return (parts.hostname or "", parts.port, parts.scheme)
    except ValueError:
        return "", None, ""


def _split_host(host: str) -> tuple[str, int | None]:
    """A Host header's (name, port), the port None when not given; ("", None) for one that
    is not a host name and port."""
    try:
        parts = urlsplit("//" + host)
        return (parts.hostname or "").lower(), parts.port
    except ValueError:  # a port that is not a number, an unclosed IPv6 bracket
        return "", None


def _same_origin(name: str, port: int | None, scheme: str, host: str) -> bool:
    """An Origin (name, explicit port, scheme) at the Host the request was sent to. Without a
    port in the Host (a proxy's default port), the Origin must name none either; the scheme
    is not compared (a proxy may end TLS in front of this server)."""
    host_name, host_port = _split_host(host)
    if name != host_name:
        return False
    if host_port is None:
        return port is None
    return (port or DEFAULT_PORTS.get(scheme)) == host_port
