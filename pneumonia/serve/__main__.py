"""`python -m pneumonia.serve --ckpt FILE`: the web page and JSON API of one trained model.

It serves `pneumonia.serve.app` on --host and --port (127.0.0.1:8765 by default: 8000 is
Flower's SuperLink, 8080 its older server, 9091-9094 its other APIs, 6006 TensorBoard) until
Ctrl-C or SIGTERM, and then exits 130 or 143, as every entry point does. It binds the port
first and only then prints the URL it serves on (the real port for --port 0); a port already in
use is a one-line error naming it (exit 2).

It binds to 127.0.0.1 (this machine only) unless --host says otherwise: the server has no
authentication, so expose it beyond the machine only behind a proxy that adds it.

It answers requests that name it (the Host header) by `localhost`, `127.0.0.1`, `::1` or the
--host address; bound to another address than a loopback one (`--host 0.0.0.0`), also by this
machine's host name and any IP address. --allowed_hosts adds names (a proxy's public name;
`*`: any name). Any other name gets 400: a guard against DNS
rebinding. A POST from a web page is answered only when the page is the server's own (the name
and port it was reached by) or served under a name --allowed_hosts lists; 403 otherwise
(`pneumonia.serve.uploads`).
"""

from __future__ import annotations

import contextlib
import errno
import socket

from jsonargparse import ArgumentParser

from pneumonia.core import interrupt
from pneumonia.core.bounds import PositiveInt
from pneumonia.core.errors import UserError, exit_on_user_error
from pneumonia.run.config import (
    add_device_option,
    add_threshold_option,
    check_device,
    parse_args,
    threshold_override,
    tool_parser,
)
from pneumonia.serve.uploads import MAX_UPLOAD, host_names

DEFAULT_PORT = 8765  # free of Flower's ports (8000, 8080, 9091-9094) and TensorBoard's (6006)
STARTUP_FAILURE = 3  # uvicorn's exit code when the app did not start


def build_parser() -> ArgumentParser:
    parser = tool_parser("python -m pneumonia.serve", __doc__)
    parser.add_argument("--ckpt", type=str, required=True, help="best.ckpt of a run")
    parser.add_argument("--host", type=str, default="127.0.0.1", help="address to bind to")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="TCP port (0: any free one, printed)"
    )
    parser.add_argument(
        "--allowed_hosts",
        type=str,
        default="",
        help="comma-separated host names the server also answers to and whose pages may "
        "POST to it (a proxy's public name; *: any Host); localhost, 127.0.0.1, ::1 and --host "
        "always are",
    )
    add_threshold_option(parser)
    parser.add_argument(
        "--max_upload_mb", type=PositiveInt, default=MAX_UPLOAD >> 20, help="upload size limit"
    )
    add_device_option(parser)
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = parse_args(build_parser(), argv)
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port} must be between 0 and 65535")
    check_device(args.device)
    threshold = threshold_override(args)
    from pneumonia.inference.predictor import Predictor  # torch: not for --help
    from pneumonia.serve.app import create_app

    predictor = Predictor.from_checkpoint(args.ckpt, threshold, args.device)
    allowed = args.allowed_hosts.split(",")
    app = create_app(predictor, args.max_upload_mb << 20, host_names(args.host, allowed), allowed)
    model = predictor.model
    with listening(args.host, args.port) as sock:
        shown = f"[{args.host}]" if ":" in args.host else args.host  # an IPv6 address
        print(
            f"serving {model.name} ({model.image_size} px, checkpoint {model.checkpoint}) on "
            f"http://{shown}:{sock.getsockname()[1]}/  (API: /docs; Ctrl-C stops)",
            flush=True,
        )
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        with contextlib.suppress(KeyboardInterrupt):  # a signal: `stopped_by_signal` says which
            server.run(sockets=[sock])
    stopped_by_signal()
    if not server.started:
        raise SystemExit(STARTUP_FAILURE)


def listening(host: str, port: int) -> socket.socket:
    """A socket listening on host:port, as uvicorn would bind it (IPv6 for an address with a
    colon, SO_REUSEADDR), so that the URL printed is one that answers; a port in use, refused
    or an address not of this machine is a UserError naming it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # uvicorn's backlog: connections wait from now until it accepts
    except OSError as err:
        sock.close()
        raise UserError(bind_error(host, port, err)) from None
    return sock


def bind_error(host: str, port: int, err: OSError) -> str:
    """One line for a failed bind: what is wrong with --host or --port, and what to do."""
    if err.errno == errno.EADDRINUSE:
        return (
            f"port {port} on {host} is in use (another server, or a `pneumonia.serve` still "
            "running): choose another with --port (e.g. --port 0: any free one) or stop it"
        )
    if err.errno == errno.EACCES:
        return f"--port {port}: not allowed for this user (below 1024?): choose one above 1023"
    if err.errno == errno.EADDRNOTAVAIL or isinstance(err, socket.gaierror):
        return f"--host {host} is not an address of this machine: e.g. 127.0.0.1 or 0.0.0.0"
    return f"cannot listen on {host}:{port}: {err.strerror or err}: check --host and --port"


def stopped_by_signal() -> None:
    """uvicorn stops on SIGINT and SIGTERM with handlers of its own, then raises the signal
    again into ours (`errors.exit_on_user_error`'s), which records it: exit with its code."""
    signum = interrupt.received()
    if signum is not None:
        raise interrupt.Interrupted(signum, "the server stopped", "it keeps no state to save")


if __name__ == "__main__":
    main()
