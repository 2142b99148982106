"""`python -m pneumonia.serve`'s port: a default no other tool of ours listens on, the URL printed
only once the port is bound (the real one for --port 0: `test_process.serving`), a port in use
one line and exit 2, and the whole of the module's docstring in --help."""

from __future__ import annotations

import re
import socket

import pytest

from pneumonia.serve import __main__ as serve

# Flower 1.41's SuperLink (8000), its older server (8080), its other APIs (9091-9094), and
# TensorBoard (`make tensorboard`: 6006).
OURS = {8000, 8080, 9091, 9092, 9093, 9094, 6006}


def test_the_default_port_is_none_of_flowers_nor_tensorboards():
    parser = serve.build_parser()
    assert parser.get_defaults().port not in OURS
    assert f"default: {serve.DEFAULT_PORT}" in " ".join(parser.format_help().split())


def test_help_shows_the_whole_docstring_in_paragraphs():
    text = serve.build_parser().format_help()
    assert "DNS rebinding" in " ".join(text.split())
    assert "\n\nIt binds to 127.0.0.1 (this machine only)" in text


def test_a_port_in_use_is_one_line_naming_it_and_nothing_claims_to_serve(tiny_checkpoint, capfd):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as stop:
            serve.main(["--ckpt", str(tiny_checkpoint), "--port", str(port)])
    assert stop.value.code == 2
    out, err = capfd.readouterr()
    assert "serving" not in out
    assert err.splitlines() == [
        f"error: port {port} on 127.0.0.1 is in use (another server, or a `pneumonia.serve` "
        "still running): choose another with --port (e.g. --port 0: any free one) or stop it"
    ]


@pytest.mark.parametrize(
    ("host", "says"),
    [("192.0.2.1", "--host 192.0.2.1 is not an address of this machine"), ("::1", None)],
)
def test_a_bind_error_names_the_host(host, says):
    """192.0.2.1 is a documentation address, never this machine's."""
    if says is None:  # an IPv6 address binds on an IPv6 socket, as uvicorn binds it
        if not socket.has_ipv6:
            pytest.skip("no IPv6 here")
        try:
            with serve.listening(host, 0) as sock:
                assert sock.family == socket.AF_INET6
        except serve.UserError:
            pytest.skip("no IPv6 loopback here")
        return
    with pytest.raises(serve.UserError, match=re.escape(says)):
        serve.listening(host, 0)
