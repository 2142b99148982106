"""What `pneumonia.serve` refuses and what every answer carries: a Content-Security-Policy
with no inline script, HEAD like GET, requests by foreign names (400) or from foreign pages
(403), a decompression bomb (413, from its header), more uploads at once than it scores (503),
and an unexpected error as a one-line JSON 500 after which the server keeps serving."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import struct
import subprocess
import sys
import threading
import time
import zlib

import pytest
from conftest import write_image
from fastapi.testclient import TestClient
from starlette.datastructures import Headers

from pneumonia.inference.predictor import Predictor
from pneumonia.serve.app import create_app
from pneumonia.serve.uploads import ANY_ADDRESS, LOOPBACK_NAMES, SameOrigin, host_names

GET_ENDPOINTS = ["/", "/page.js", "/page.css", "/health", "/model", "/openapi.json", "/docs"]


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint):
    return Predictor.from_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="module")
def client(predictor):
    with TestClient(create_app(predictor, max_upload=1 << 20)) as client:
        yield client


@pytest.fixture(scope="module")
def xray(tmp_path_factory) -> bytes:
    return write_image(
        tmp_path_factory.mktemp("xray") / "x.png", 120, (40, 36), fmt="PNG"
    ).read_bytes()


def post(client, data: bytes, name: str = "x.png", **headers):
    return client.post("/predict?cam=false", files={"file": (name, data)}, headers=headers)


def one_line(response) -> str:
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail
    return detail


def test_every_answer_forbids_inline_script_and_the_page_has_none(client, xray):
    answers = [client.get(url) for url in GET_ENDPOINTS if url != "/docs"]
    answers += [client.get("/nowhere"), post(client, xray), post(client, b"not an image")]
    answers.append(post(client, b"\x89PNG\r\n\x1a\n" + bytes(2 << 20)))  # 413 from middleware
    for response in answers:
        policy = response.headers["content-security-policy"]
        assert "script-src 'self';" in policy and "unsafe-inline" not in policy
        assert "object-src 'none'" in policy and "frame-ancestors 'none'" in policy
        assert response.headers["x-content-type-options"] == "nosniff"
    page = client.get("/").text
    scripts = re.findall(r"(<script[^>]*>)(.*?)</script>", page, re.DOTALL)
    assert scripts == [('<script src="/page.js" defer>', "")]  # one, from a file, no body
    assert not re.search(r"\son\w+\s*=|\sstyle\s*=|<style", page)  # no handler, no inline style
    script = client.get("/page.js")
    assert script.headers["content-type"].startswith("text/javascript")
    markup = r"\.(inner|outer)HTML\s*=|insertAdjacentHTML|document\.write"
    assert not re.search(markup, script.text) and "createElement" in script.text
    assert client.get("/page.css").headers["content-type"].startswith("text/css")


def test_the_api_docs_run_only_their_own_inline_script(client):
    response = client.get("/docs")
    assert response.status_code == 200 and "SwaggerUIBundle" in response.text
    policy = response.headers["content-security-policy"]
    inline = re.findall(r"<script>(.*?)</script>", response.text, re.DOTALL)
    assert len(inline) == 1
    digest = base64.b64encode(hashlib.sha256(inline[0].encode()).digest()).decode()
    scripts = policy.split("script-src ")[1].split(";")[0].split()
    assert scripts == ["'self'", "https://cdn.jsdelivr.net", f"'sha256-{digest}'"]


@pytest.mark.parametrize("url", GET_ENDPOINTS)
def test_head_answers_like_get_without_a_body(client, url):
    got, head = client.get(url), client.head(url)
    assert head.status_code == got.status_code == 200
    assert head.content == b""
    assert head.headers["content-length"] == got.headers["content-length"]
    assert head.headers["content-security-policy"]
    assert client.head("/predict").status_code == 405  # POST only, as before


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({"Origin": "http://evil.example"}, "Origin http://evil.example is not this server"),
        ({"Origin": "http://testserver:8080"}, "Origin http://testserver:8080 is not this"),
        ({"Origin": "null"}, "Origin null is not this server (testserver)"),
        ({"Sec-Fetch-Site": "cross-site"}, "cross-origin request refused (Sec-Fetch-Site"),
    ],
)
def test_a_post_from_another_sites_page_is_refused(client, xray, headers, reason):
    response = post(client, xray, **headers)
    assert response.status_code == 403
    detail = one_line(response)
    assert detail.startswith("cross-origin request refused") and reason in detail
    if "evil" in reason:
        assert detail.endswith("start it with --allowed_hosts evil.example")
    # Its own page, and clients that are not browsers (no Origin), are served.
    for own in ({}, {"Origin": "http://testserver"}, {"Sec-Fetch-Site": "same-origin"}):
        assert post(client, xray, **own).status_code == 200


def test_a_proxys_public_name_is_an_origin_when_allowed(predictor, xray):
    app = create_app(predictor, origins=["xray.example.org", ""])  # `--allowed_hosts x,`
    with TestClient(app) as client:
        assert post(client, xray, Origin="https://xray.example.org").status_code == 200
        for foreign in ("https://evil.example", "null", "https://testserver.example"):
            assert post(client, xray, Origin=foreign).status_code == 403


@pytest.fixture(scope="module")
def loopback(predictor):
    """The app as `python -m pneumonia.serve` builds it, bound to 127.0.0.1."""
    with TestClient(create_app(predictor, hosts=host_names("127.0.0.1"))) as client:
        yield client


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "10.0.0.7:8000"])
def test_a_foreign_host_name_is_refused_on_a_loopback_server(loopback, xray, host):
    for response in (
        loopback.get("/model", headers={"Host": host}),
        post(loopback, xray, Host=host),
    ):
        assert response.status_code == 400
        detail = one_line(response)
        assert detail.startswith(f"Host {host} is not a name of this server")
        assert detail.endswith(f"start it with --allowed_hosts {host.split(':')[0]}")
    for own in ("localhost:8000", "127.0.0.1:8000", "[::1]:8000", "LOCALHOST"):
        assert loopback.get("/model", headers={"Host": own}).status_code == 200
        origin = f"http://{own}".lower()
        assert post(loopback, xray, Host=own, Origin=origin).status_code == 200


def test_which_host_names_a_server_answers_to(monkeypatch):
    monkeypatch.setattr("socket.gethostname", lambda: "ward-pc")
    monkeypatch.setattr("socket.getaddrinfo", lambda *a: [(2, 1, 6, "", ("10.1.2.3", 0))])
    assert host_names("127.0.0.1") == {*LOOPBACK_NAMES}
    assert host_names("::1", ["xray.example.org", ""]) == {*LOOPBACK_NAMES, "xray.example.org"}
    everywhere = {*LOOPBACK_NAMES, "ward-pc", "10.1.2.3", ANY_ADDRESS}
    assert host_names("0.0.0.0") == everywhere | {"0.0.0.0"}
    assert host_names("10.1.2.3") == everywhere
    assert host_names("0.0.0.0", ["*"]) is None


def test_a_server_bound_beyond_the_loopback_answers_any_address_but_not_a_foreign_name(
    monkeypatch,
):
    # Its host name may resolve to a loopback address only (Debian's /etc/hosts does), while
    # visitors reach it at its network address.
    monkeypatch.setattr("socket.gethostname", lambda: "ward-pc")
    monkeypatch.setattr("socket.getaddrinfo", lambda *a: [(2, 1, 6, "", ("127.0.1.1", 0))])
    guard = SameOrigin(None, host_names("0.0.0.0"))
    assert guard.refusal("GET", Headers({"host": "192.0.2.2:8000"})) is None
    assert guard.refusal("GET", Headers({"host": "[2001:db8::2]:8000"})) is None
    assert guard.refusal("GET", Headers({"host": "ward-pc:8000"})) is None
    assert guard.refusal("GET", Headers({"host": "evil.example:8000"}))[0] == 400
    loopback = SameOrigin(None, host_names("127.0.0.1"))
    assert loopback.refusal("GET", Headers({"host": "192.0.2.2:8000"}))[0] == 400


class Stalling:
    """The tiny model, but its forward pass waits for `go` (or raises `error`)."""

    def __init__(self, real: Predictor, error: Exception | None = None) -> None:
        self.real, self.error = real, error
        self.started, self.go = threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.real, name)

    def scores(self, image):
        self.started.set()
        if self.error is not None:
            raise self.error
        self.go.wait(10)
        return self.real.scores(image)


def test_an_upload_that_waits_too_long_for_its_turn_gets_503(predictor, xray):
    stalling = Stalling(predictor)
    with TestClient(create_app(stalling, slots=1, wait_s=0.3)) as client:
        first = []
        worker = threading.Thread(target=lambda: first.append(post(client, xray)))
        worker.start()
        assert stalling.started.wait(10)
        start = time.monotonic()
        busy = post(client, xray)
        waited = time.monotonic() - start
        stalling.go.set()
        worker.join(30)
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert one_line(busy) == "busy scoring other uploads: send this one again in 1 s"
        assert 0.3 <= waited < 3
        assert first[0].status_code == 200
        assert post(client, xray).status_code == 200  # the slot was given back


def test_an_unexpected_error_is_a_one_line_json_500_and_the_server_keeps_serving(predictor, xray):
    failing = Stalling(predictor, error=RuntimeError("out of cheese\nsecond line"))
    with TestClient(create_app(failing)) as client:
        response = post(client, xray)
        assert response.status_code == 500
        assert response.headers["content-security-policy"]
        assert one_line(response) == (
            "internal error (RuntimeError: out of cheese): the server logged it and keeps serving"
        )
        assert client.get("/health").status_code == 200
        failing.error = None
        failing.go.set()
        assert post(client, xray).status_code == 200


def black_png(side: int, rows: int = 1000) -> bytes:
    """An all-black grey PNG of side x side pixels (`side` a multiple of `rows`), written
    without ever holding its pixels: one deflated block of `rows` zero rows, flushed so that it
    stands alone, repeated. 30000 px: 875 KB that decode to 858 MiB."""
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate, so blocks can be repeated
    block = packer.compress(bytes((side + 1) * rows)) + packer.flush(zlib.Z_FULL_FLUSH)
    zeros = (side + 1) * side  # each row: a filter byte and its pixels
    checksum = struct.pack(">I", (zeros % 65521) << 16 | 1)  # Adler-32 of that many zeros
    stream = b"\x78\xda" + block * (side // rows) + packer.flush() + checksum

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit grey
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", stream) + chunk(b"IEND", b"")
    )


# Run in a process of its own, so its peak memory is the bomb's alone. Its address space is
# capped 2 GiB above what it holds before the upload: decoding the bomb (858 MiB of pixels,
# more on the way) fails there instead of taking the machine's memory.
BOMB = """
import json, resource, sys, time
from fastapi.testclient import TestClient
from pneumonia.inference.predictor import Predictor
from pneumonia.serve.app import create_app

ckpt, bomb, xray = sys.argv[1:]
client = TestClient(create_app(Predictor.from_checkpoint(ckpt)))
upload = lambda name, path: client.post("/predict", files={"file": (name, open(path, "rb"))})
assert upload("x.png", xray).status_code == 200  # the first request's allocations, done
size = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize"))
resource.setrlimit(resource.RLIMIT_AS, ((size << 10) + (2 << 30),) * 2)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.monotonic()
answer = upload("bomb.png", bomb)
seconds = time.monotonic() - start
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
after = upload("x.png", xray).status_code
print(json.dumps([answer.status_code, answer.text, seconds, grown, after]))
"""
PEAK_MIB = 100  # what the bomb may add to the server's peak resident memory


def test_a_decompression_bomb_is_refused_from_its_header_quickly_and_small(
    tiny_checkpoint, tmp_path
):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(black_png(30000))
    xray = write_image(tmp_path / "x.png", 120, (40, 36), fmt="PNG")
    run = subprocess.run(
        [sys.executable, "-c", BOMB, str(tiny_checkpoint), str(bomb), str(xray)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    status, text, seconds, grown, after = json.loads(run.stdout.splitlines()[-1])
    assert status == 413, text
    detail = json.loads(text)["detail"]
    assert detail.startswith("bomb.png: ") and "\n" not in detail
    assert seconds < 1.0 and grown < PEAK_MIB
    assert after == 200
