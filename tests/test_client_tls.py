"""The client's STARTTLS against nbdkit, qemu-nbd and pynbd with freshly generated certificates.

The certificates are made here with openssl in the layout qemu, nbdkit and libnbd share
(ca-cert.pem, server-cert.pem, server-key.pem). tests/tls_certs.py (another change in flight)
is meant to provide a shared session fixture for this; until it exists, this file carries its
own small generator.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest

from pynbd.client import NBDConnectionError, OptionError, connect
from pynbd.client.sync import connect as sync_connect
from pynbd.protocol.constants import BASE_ALLOCATION

pytestmark = pytest.mark.timeout(120)
MiB = 1 << 20


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(directory: Path, common_name: str = "pynbd test CA") -> Path:
    """A CA and a server certificate for localhost / 127.0.0.1, signed by it."""
    directory.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={common_name}",
        "-keyout", "ca-key.pem", "-out", "ca-cert.pem", cwd=directory,
    )  # fmt: skip
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
        "-keyout", "server-key.pem", "-out", "server.csr", cwd=directory,
    )  # fmt: skip
    (directory / "server.ext").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
    )
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem", "-CAcreateserial",
        "-days", "2", "-extfile", "server.ext", "-out", "server-cert.pem", cwd=directory,
    )  # fmt: skip
    os.chmod(directory / "server-key.pem", 0o600)
    return directory


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def client_pki(pki, tmp_path_factory) -> Path:
    """What a client needs: only the CA certificate."""
    directory = tmp_path_factory.mktemp("client-pki")
    (directory / "ca-cert.pem").write_bytes((pki / "ca-cert.pem").read_bytes())
    return directory


@pytest.fixture(scope="session")
def other_pki(tmp_path_factory) -> Path:
    return make_pki(tmp_path_factory.mktemp("other-pki"), "some other CA")


def tls_uri(server, certificates: Path) -> str:
    if server.socket_path:
        return f"nbds+unix:///{server.export}?socket={server.socket_path}&tls-certificates={certificates}"
    return f"nbds://127.0.0.1:{server.port}/{server.export}?tls-certificates={certificates}"


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_tls_with_nbdkit(start_nbdkit, pki, client_pki, tcp):
    server = start_nbdkit("--tls=require", f"--tls-certificates={pki}", "memory", "4M", tcp=tcp)
    with sync_connect(tls_uri(server, client_pki), meta_contexts=[BASE_ALLOCATION]) as h:
        assert h.tls and h.structured and h.contexts == [BASE_ALLOCATION]
        data = os.urandom(MiB)
        h.pwrite(data, 12345)
        assert h.pread(MiB, 12345) == data
    with pytest.raises(OptionError, match="requires TLS"):
        sync_connect(server.uri)


def test_tls_with_qemu_nbd(start_qemu_nbd, pki, client_pki, workdir):
    image = workdir / "disk.raw"
    content = os.urandom(MiB) + bytes(MiB)
    image.write_bytes(content)
    server = start_qemu_nbd(
        "--object",
        f"tls-creds-x509,id=t0,dir={pki},endpoint=server,verify-peer=off",
        "--tls-creds",
        "t0",
        "-f",
        "raw",
        str(image),
        tcp=True,
    )

    async def main():
        async with await connect(tls_uri(server, client_pki), meta_contexts=[BASE_ALLOCATION]) as c:
            assert c.tls
            return await c.pread(c.size, 0), await c.map_extents()

    data, extents = asyncio.run(main())
    assert data == content
    assert sum(e.length for e in extents[BASE_ALLOCATION]) == len(content)


def test_tls_with_pynbd_server(start_pynbd, pki, client_pki):
    server = start_pynbd("--memory", "2M", "--tls", "required", "--tls-creds", str(pki))
    with sync_connect(tls_uri(server, client_pki)) as h:
        assert h.tls
        h.pwrite(b"secret", 0)
        assert h.pread(6, 0) == b"secret"


def test_tls_rejects_a_server_certificate_from_another_ca(start_nbdkit, pki, other_pki):
    server = start_nbdkit("--tls=require", f"--tls-certificates={pki}", "memory", "1M", tcp=True)
    with pytest.raises(NBDConnectionError, match="TLS handshake failed"):
        sync_connect(tls_uri(server, other_pki))
    # the same check can be switched off, as the URI spec's tls-verify-peer allows
    with sync_connect(tls_uri(server, other_pki) + "&tls-verify-peer=false") as h:
        assert h.tls and h.size == MiB


def test_opportunistic_tls_falls_back_to_plain(start_nbdkit, client_pki):
    server = start_nbdkit("memory", "1M")
    with sync_connect(server.uri, tls="on", tls_certificates=str(client_pki)) as h:
        assert not h.tls and h.size == MiB
    with pytest.raises(NBDConnectionError, match="refused STARTTLS"):
        sync_connect(server.uri, tls="require", tls_certificates=str(client_pki))
