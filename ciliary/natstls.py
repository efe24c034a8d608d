"""TLS for the embedded NATS server: a private CA and a server certificate for loopback.

Invariants:
- ``write_certificates`` makes, with the ``openssl`` command, a fresh CA (ECDSA P-256) and
  a server certificate it signs for ``127.0.0.1`` and ``localhost``; every key file is
  mode 0600 and the directory 0700. The CA's key is removed once the server certificate is
  signed, so nothing else can be issued from it.
- A failure is a ``TLSSetupError`` naming the step and what openssl said; nothing is left
  half-written under the final names.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

CA_FILE = "ca.pem"
CERT_FILE = "server.pem"
KEY_FILE = "server-key.pem"
VALID_DAYS = 825
CURVE = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


class TLSSetupError(Exception):
    """Certificates could not be made; the message names the step."""


@dataclass(frozen=True)
class TLSFiles:
    ca: Path  # what clients trust
    cert: Path  # the server's certificate
    key: Path  # the server's key (0600)


def _openssl(step: str, *args: str) -> None:
    binary = shutil.which("openssl")
    if binary is None:
        raise TLSSetupError(f"{step}: the openssl command is not installed")
    done = subprocess.run([binary, *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise TLSSetupError(f"{step}: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")


def write_certificates(directory: Path) -> TLSFiles:
    """A new CA and server certificate for loopback in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".tls-") as work:
        tmp = Path(work)
        _openssl("CA", "req", "-x509", *CURVE, "-keyout", str(tmp / "ca-key.pem"), "-out", str(tmp / CA_FILE),
                 "-days", str(VALID_DAYS), "-subj", "/CN=ciliary NATS CA")
        _openssl("server key", "req", *CURVE, "-keyout", str(tmp / KEY_FILE), "-out", str(tmp / "server.csr"),
                 "-subj", "/CN=127.0.0.1")
        (tmp / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        _openssl("server certificate", "x509", "-req", "-in", str(tmp / "server.csr"), "-CA", str(tmp / CA_FILE),
                 "-CAkey", str(tmp / "ca-key.pem"), "-CAcreateserial", "-out", str(tmp / CERT_FILE),
                 "-days", str(VALID_DAYS), "-extfile", str(tmp / "san.ext"))
        for name in (CA_FILE, CERT_FILE, KEY_FILE):
            os.chmod(tmp / name, 0o600 if name == KEY_FILE else 0o644)
            (tmp / name).replace(directory / name)
    return TLSFiles(directory / CA_FILE, directory / CERT_FILE, directory / KEY_FILE)
