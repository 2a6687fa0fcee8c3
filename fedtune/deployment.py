"""What both sides of a deployment need: TLS certificates, authentication keys, child processes.

``fedtune server`` and ``fedtune client`` start Flower's executables and hand them certificates and
keys; this one module does both, so the two sides share it rather than copy it.

Certificates and keys
---------------------
``fedtune certs --out DIR`` writes a private certificate authority and a server certificate signed
by it; ``fedtune keys --out DIR --name NAME`` writes one client's authentication key pair.

* ``ca.crt``: the CA certificate. Copy it to every client machine (``--root-certificates``).
* ``ca.key``: the CA's private key. It never leaves the server machine (mode 0600).
* ``server.crt`` / ``server.key``: the SuperLink's certificate and key, valid for ``localhost``,
  ``127.0.0.1``, ``::1`` and every ``--host`` given (DNS names or IP addresses).
* ``NAME`` / ``NAME.pub``: a SuperNode's EC (P-384) key pair in OpenSSH format. The private key stays
  on the client machine; the ``.pub`` file is copied to the server, which registers it.

These are for development and small deployments. A production deployment should use certificates
from the organisation's own CA; fedtune only needs the three PEM files.

Child processes
---------------
Flower's SuperLink and SuperNode start helpers (``flower-superexec``) which start the apps
(``flwr-serverapp``, ``flwr-clientapp``), some of them in sessions of their own. Killing one process
group is therefore not enough: :func:`stop_tree` collects every descendant *before* signalling (an
orphan would be re-parented and lost), asks them to terminate, and kills what is left.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

__all__ = [
    "CertificateFiles",
    "KeyFiles",
    "create_certificates",
    "create_client_keys",
    "check_host",
    "check_name",
    "read_public_key_name",
    "DEFAULT_HOSTS",
    "console_script",
    "free_port",
    "start_process",
    "stop_tree",
    "tree",
    "wait_for_port",
    "ProcessFailed",
]

log = logging.getLogger(__name__)


# -- certificates and keys ----------------------------------------------------------------------

#: Names every server certificate is valid for (the loopback interface).
DEFAULT_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")

_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class CertificateFiles:
    """Paths written by :func:`create_certificates`."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    hosts: tuple[str, ...]


@dataclass(frozen=True)
class KeyFiles:
    """Paths written by :func:`create_client_keys`."""

    private_key: Path
    public_key: Path


def check_host(host: str) -> str:
    """Return ``host`` if it is an IP address or a DNS name, else raise a ValueError naming it."""
    text = str(host).strip()
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    labels = text.rstrip(".").split(".")
    if not text or len(text) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
        raise ValueError(
            f"--host {host!r} is neither an IP address nor a DNS name "
            "(letters, digits, '-' and '.'; no port, no scheme)"
        )
    return text.lower()


def check_name(name: str) -> str:
    """A client name usable as a file name: letters, digits, ``_ . -`` (1 to 64 characters)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"name {name!r} is not allowed: use 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return name


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` readable by the owner only (keys)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _refuse_overwrite(paths: list[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise ValueError(
            f"{existing[0]} already exists; pass --force to replace it "
            "(clients holding the old files must get the new ones)"
        )


def create_certificates(
    out: str | Path, hosts: list[str] | tuple[str, ...] = (), *, days: int = 365, force: bool = False
) -> CertificateFiles:
    """Create a development CA and a server certificate signed by it.

    Parameters
    ----------
    out : str or Path
        Folder for ``ca.crt``, ``ca.key``, ``server.crt``, ``server.key``.
    hosts : sequence of str
        Extra DNS names or IP addresses the server is reached at (the loopback names are always included).
    days : int
        Validity of both certificates.
    force : bool
        Replace existing files (otherwise existing files are an error).

    Returns
    -------
    CertificateFiles
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= 3650:
        raise ValueError(f"--days must be an integer in [1, 3650], got {days!r}")
    names = tuple(dict.fromkeys([*DEFAULT_HOSTS, *(check_host(h) for h in hosts)]))
    folder = Path(out)
    files = CertificateFiles(folder / "ca.crt", folder / "ca.key", folder / "server.crt", folder / "server.key", names)
    _refuse_overwrite([files.ca_cert, files.ca_key, files.server_cert, files.server_key], force)

    now = _dt.datetime.now(_dt.UTC) - _dt.timedelta(minutes=5)
    until = now + _dt.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedtune development"),
            x509.NameAttribute(NameOID.COMMON_NAME, "fedtune development CA"),
        ]
    )
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    alt_names: list[x509.GeneralName] = []
    for name in names:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt_names.append(x509.DNSName(name))
    common = next((n for n in names if n not in DEFAULT_HOSTS), "localhost")
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedtune development"),
                    x509.NameAttribute(NameOID.COMMON_NAME, common),
                ]
            )
        )
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    plain = serialization.NoEncryption()
    _write_private(files.ca_key, ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, plain))
    _write_public(files.ca_cert, ca_cert.public_bytes(pem))
    _write_private(files.server_key, server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, plain))
    _write_public(files.server_cert, server_cert.public_bytes(pem))
    return files


def create_client_keys(out: str | Path, name: str, *, force: bool = False) -> KeyFiles:
    """Create a SuperNode authentication key pair (EC P-384, OpenSSH format).

    Parameters
    ----------
    out : str or Path
        Folder for ``NAME`` (private key, mode 0600) and ``NAME.pub`` (public key).
    name : str
        The client's name (also the key comment).
    force : bool
        Replace existing files.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    name = check_name(name)
    folder = Path(out)
    files = KeyFiles(folder / name, folder / f"{name}.pub")
    _refuse_overwrite([files.private_key, files.public_key], force)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write_private(files.private_key, private)
    _write_public(files.public_key, public + f" {name}\n".encode())
    return files


def read_public_key_name(path: str | Path) -> str:
    """The comment (client name) of an OpenSSH public key file, or its file stem."""
    parts = Path(path).read_text(encoding="utf-8").split()
    return parts[2] if len(parts) >= 3 else Path(path).stem


# -- child processes ---------------------------------------------------------------------------


class ProcessFailed(RuntimeError):
    """A child process ended (or never became ready) when it should be running."""


def console_script(name: str) -> str:
    """Path of a console script of this Python environment (next to the interpreter), else ``name``."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def child_env(**extra: str) -> dict[str, str]:
    """The environment for Flower's executables: ours, with this interpreter's folder first on PATH.

    Flower's SuperLink and SuperNode start their helpers (``flower-superexec``, ``flwr-serverapp``,
    ``flwr-clientapp``) by name; run as ``/path/to/venv/bin/fedtune`` without the virtual
    environment activated they would not be found, or the wrong installation's would be.
    """
    env = {**os.environ, **extra}
    here = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([here, *(p for p in env.get("PATH", "").split(os.pathsep) if p and p != here)])
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def start_process(
    command: Sequence[str], *, log_path: str | Path, env: Mapping[str, str] | None = None, cwd: str | Path | None = None
) -> subprocess.Popen[bytes]:
    """Start ``command`` in a new session, its output appended to ``log_path``."""
    path = Path(log_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as handle:
        handle.write(f"\n$ {' '.join(command)}\n".encode())
        handle.flush()
        return subprocess.Popen(
            list(command),
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )


def tree(pid: int) -> list[psutil.Process]:
    """``pid`` and all its descendants (empty if ``pid`` is gone)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def stop_tree(pid: int, *, timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
    """Stop ``pid`` and every descendant: ``sig`` first, SIGKILL after ``timeout`` seconds."""
    procs = tree(pid)
    for proc in procs:
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        try:
            # a child may have started more processes while the parent shut down
            procs_left = [proc, *proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for left in procs_left:
            try:
                left.kill()
            except psutil.NoSuchProcess:
                pass
    psutil.wait_procs(procs, timeout=5)
    try:  # reap our own direct child, if it is one
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def wait_for_port(
    host: str,
    port: int,
    *,
    timeout: float,
    process: subprocess.Popen[bytes] | None = None,
    what: str = "process",
    log_path: str | Path | None = None,
) -> None:
    """Wait until ``host:port`` accepts TCP connections.

    Raises
    ------
    ProcessFailed
        If ``process`` ends first or ``timeout`` seconds pass; the message names ``log_path``.
    """
    deadline = time.monotonic() + timeout
    where = f" (see {log_path})" if log_path else ""
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ProcessFailed(
                f"{what} exited with status {process.returncode} before listening on {host}:{port}{where}"
            )
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise ProcessFailed(f"{what} did not listen on {host}:{port} within {timeout:.0f} s{where}")
