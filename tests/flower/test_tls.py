"""TLS on loopback: a SuperLink started by `Federation` accepts only clients that trust its CA."""

from __future__ import annotations

import socket
import ssl

import pytest
from cryptography import x509

from pneumonia.flower import tls
from pneumonia.flower.launch import Federation


def handshake(port: int, ca) -> None:
    context = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1"),
    ):
        pass


def test_generated_server_certificate_is_signed_by_the_ca_for_the_hosts(tmp_path):
    certs = tls.generate(tmp_path, ["127.0.0.1", "localhost"])
    ca = x509.load_pem_x509_certificate(certs.ca.read_bytes())
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert oct(certs.server_key.stat().st_mode & 0o777) == "0o600"


@pytest.fixture(scope="module")
def superlink(tmp_path_factory):
    with Federation(tmp_path_factory.mktemp("tls")) as federation:
        federation.start_superlink()
        yield federation


def test_a_client_trusting_the_ca_connects(superlink):
    handshake(superlink.port, superlink.certs.ca)


def test_a_client_with_another_ca_is_refused(superlink, tmp_path):
    other = tls.generate(tmp_path / "other", ["127.0.0.1"])
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(superlink.port, other.ca)
    node = superlink.start_supernode(
        "intruder", {"partition-id": 0}, other.ca, "--max-retries", "1", "--max-wait-time", "5"
    )
    assert node.wait(60) != 0
    assert "CERTIFICATE_VERIFY_FAILED" in (superlink.logs / "intruder.log").read_text()


def test_a_plaintext_client_is_refused(superlink):
    node = superlink.start_supernode(
        "plaintext", {"partition-id": 0}, None, "--insecure", "--max-retries", "1",
        "--max-wait-time", "5",
    )  # fmt: skip
    assert node.wait(60) != 0
    log = (superlink.logs / "plaintext.log").read_text()
    assert "Starting insecure channel" in log
    # The TLS server drops the plaintext request: reported as a reset or a disconnect.
    assert "The SuperNode could not establish a connection to the SuperLink" in log
