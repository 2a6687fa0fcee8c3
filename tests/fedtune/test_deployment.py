"""``fedtune certs`` and ``fedtune keys``: a CA and server certificate a TLS client accepts, Flower-usable keys."""

from __future__ import annotations

import os
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from fedtune.cli import main
from fedtune.deployment import create_certificates, create_client_keys, read_public_key_name


def _handshake(files_dir: Path, ca: Path, server_name: str) -> str:
    """TLS handshake on 127.0.0.1 between a server using ``files_dir`` and a client trusting ``ca``;
    returns the peer CN."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(files_dir / "server.crt", files_dir / "server.key")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client_ctx = ssl.create_default_context(cafile=str(ca))
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            client_ctx.wrap_socket(raw, server_hostname=server_name) as tls,
        ):
            subject = dict(item[0] for item in tls.getpeercert()["subject"])
            tls.send(b"x")
            return str(subject["commonName"])
    finally:
        thread.join(timeout=5)
        listener.close()


def test_server_certificate_verifies_against_the_ca(tmp_path: Path) -> None:
    files = create_certificates(tmp_path / "certs", ["fl.example.org", "192.0.2.7"], days=30)
    cert = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names.get_values_for_type(x509.DNSName)) == {"localhost", "fl.example.org"}
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1", "192.0.2.7"}
    assert stat.S_IMODE(files.ca_key.stat().st_mode) == 0o600 and stat.S_IMODE(files.server_key.stat().st_mode) == 0o600
    assert _handshake(tmp_path / "certs", files.ca_cert, "127.0.0.1") == "fl.example.org"
    assert _handshake(tmp_path / "certs", files.ca_cert, "localhost") == "fl.example.org"


def test_another_ca_is_not_trusted(tmp_path: Path) -> None:
    create_certificates(tmp_path / "a")
    other = create_certificates(tmp_path / "b")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(tmp_path / "a", other.ca_cert, "127.0.0.1")


def test_existing_files_are_not_overwritten(tmp_path: Path) -> None:
    create_certificates(tmp_path)
    with pytest.raises(ValueError, match="already exists; pass --force"):
        create_certificates(tmp_path)
    create_certificates(tmp_path, force=True)


def test_client_keys_are_openssh_ec_keys(tmp_path: Path) -> None:
    files = create_client_keys(tmp_path, "alice")
    private = load_ssh_private_key(files.private_key.read_bytes(), None)
    public = load_ssh_public_key(files.public_key.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP384R1)
    assert (
        isinstance(public, ec.EllipticCurvePublicKey)
        and public.public_numbers() == private.public_key().public_numbers()
    )
    assert read_public_key_name(files.public_key) == "alice"
    assert stat.S_IMODE(files.private_key.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (
            ["certs", "--out", "{tmp}", "--host", "bad host"],
            "--host 'bad host' is neither an IP address nor a DNS name",
        ),
        (["certs", "--out", "{tmp}", "--host", "example.org:9092"], "no port"),
        (["certs", "--out", "{tmp}", "--days", "0"], "--days must be an integer in [1, 3650]"),
        (["keys", "--out", "{tmp}", "--name", "a/b"], "name 'a/b' is not allowed"),
    ],
)
def test_bad_input_is_one_clear_line(
    argv: list[str], fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedtune: error:") and fragment in err and "\n" not in err


def test_flower_helpers_are_found_without_the_environment_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """`/venv/bin/fedtune server` without an activated venv: Flower starts flower-superexec by name."""
    import shutil
    import sys

    from fedtune.deployment import child_env

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    env = child_env(FLWR_HOME="/tmp/x")
    here = str(Path(sys.executable).parent)
    assert env["PATH"].split(os.pathsep)[0] == here and env["FLWR_HOME"] == "/tmp/x"
    assert env["PATH"].count(here) == 1
    assert shutil.which("flower-superexec", path=env["PATH"]) == str(Path(here) / "flower-superexec")
