"""X.509 test credentials in the qemu/libvirt directory layout, made with ``openssl``.

The main directory holds everything both ends need (qemu's and libnbd's clients read
``client-*.pem``, servers read ``server-*.pem``, both read ``ca-cert.pem``), so one ``DIR`` serves as
``pynbd serve --tls-creds DIR``, ``tls-certificates=DIR`` and ``tls-creds-x509,dir=DIR``. The
extensions are the ones GnuTLS (libnbd, qemu) insists on: a CA that may sign, a server certificate
for ``localhost``/``127.0.0.1`` with serverAuth, a client certificate with clientAuth.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

DAYS = "3650"


@dataclass(frozen=True)
class TLSCredentials:
    dir: Path  # ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem, client-key.pem
    ca_only_dir: Path  # just ca-cert.pem: a client that has no certificate of its own
    other_ca_dir: Path  # a client trusting a different CA, which must reject our server


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=120)


def _make_ca(directory: Path, name: str) -> None:
    _openssl("genrsa", "-out", "ca-key.pem", "2048", cwd=directory)
    _openssl(
        "req", "-new", "-x509", "-key", "ca-key.pem", "-out", "ca-cert.pem", "-days", DAYS,
        "-subj", f"/O=pynbd tests/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip


def _make_leaf(directory: Path, role: str, extensions: str) -> None:
    """``role``-key.pem and ``role``-cert.pem signed by the CA in ``directory``."""
    (directory / f"{role}.ext").write_text(extensions)
    _openssl("genrsa", "-out", f"{role}-key.pem", "2048", cwd=directory)
    _openssl(
        "req", "-new", "-key", f"{role}-key.pem", "-out", f"{role}.csr", "-subj", f"/O=pynbd tests/CN={role}",
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{role}.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem", "-CAcreateserial",
        "-out", f"{role}-cert.pem", "-days", DAYS, "-sha256", "-extfile", f"{role}.ext",
        cwd=directory,
    )  # fmt: skip


def make_credentials(root: Path) -> TLSCredentials:
    """Build a CA, a server and a client certificate under ``root``, plus the two client-side variants."""
    main = root / "pki"
    main.mkdir(parents=True)
    _make_ca(main, "pynbd test CA")
    common = "basicConstraints = critical, CA:FALSE\nkeyUsage = critical, digitalSignature, keyEncipherment\n"
    _make_leaf(main, "server", common + "extendedKeyUsage = serverAuth\nsubjectAltName = DNS:localhost, IP:127.0.0.1\n")
    _make_leaf(main, "client", common + "extendedKeyUsage = clientAuth\n")
    for scratch in main.glob("*.ext"):
        scratch.unlink()
    for scratch in main.glob("*.csr"):
        scratch.unlink()

    ca_only = root / "ca-only"
    ca_only.mkdir()
    shutil.copy(main / "ca-cert.pem", ca_only / "ca-cert.pem")

    other = root / "other-ca"
    other.mkdir()
    _make_ca(other, "some other CA")
    return TLSCredentials(main, ca_only, other)
