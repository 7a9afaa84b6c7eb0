"""The client's STARTTLS against nbdkit, qemu-nbd and pynbd with freshly generated certificates.

The certificates come from the session fixture ``tls_certs`` (tests/tls_certs.py): one directory
in the layout qemu, nbdkit and libnbd share, one with only the CA (what a client needs), and one
trusting another CA.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from pynbd.client import NBDConnectionError, OptionError, connect
from pynbd.client.sync import connect as sync_connect
from pynbd.protocol.constants import BASE_ALLOCATION

pytestmark = pytest.mark.timeout(120)
MiB = 1 << 20


@pytest.fixture(scope="session")
def pki(tls_certs) -> Path:
    return tls_certs.dir


@pytest.fixture(scope="session")
def client_pki(tls_certs) -> Path:
    """What a client needs: only the CA certificate."""
    return tls_certs.ca_only_dir


@pytest.fixture(scope="session")
def other_pki(tls_certs) -> Path:
    return tls_certs.other_ca_dir


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
