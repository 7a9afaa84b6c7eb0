"""`pynbd serve` over TLS, driven by every installed client that speaks it.

Certificates come from tests/tls_certs.py (the ``tls_certs`` fixture). Each test checks the bytes
that come through and, where it matters, that TLS really was used (libnbd reports it) and that the
server certificate really is verified (a client trusting another CA is refused over TCP).
"""

from __future__ import annotations

import json
import os
import ssl
import struct
from pathlib import Path

import nbd
import pytest

from tests.peers import Server, run
from tests.test_bad_input import (
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_LIST,
    OPT_SR,
    REP_ACK,
    REP_ERR_INVALID,
    RawClient,
)
from tests.tls_certs import TLSCredentials

MiB = 1024 * 1024
DISK_SIZE = 16 * MiB
OPT_INFO, OPT_STARTTLS = 6, 5
REP_ERR_TLS_REQD = 0x80000005
TRANSPORTS = ["unix", "tcp"]


@pytest.fixture
def image(workdir: Path) -> Path:
    """16 MiB: 8 MiB of random data, a 4 MiB hole, 1 MiB of data, then a hole to the end."""
    path = workdir / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(DISK_SIZE)
        f.write(os.urandom(8 * MiB))
        f.seek(12 * MiB)
        f.write(os.urandom(MiB))
    return path


def serve_tls(start_pynbd, image: Path, creds: TLSCredentials, transport: str, *extra: str) -> Server:
    return start_pynbd("--tls", "required", "--tls-creds", str(creds.dir), *extra, str(image), tcp=transport == "tcp")


def tls_uri(server: Server, cert_dir: Path, host: str = "localhost") -> str:
    if server.socket_path:
        return f"nbds+unix:///?socket={server.socket_path}&tls-certificates={cert_dir}"
    return f"nbds://{host}:{server.port}/?tls-certificates={cert_dir}"


def tls_handle(server: Server, cert_dir: Path, meta: bool = False) -> nbd.NBD:
    """A libnbd handle that insists on TLS with the certificates in ``cert_dir``."""
    handle = nbd.NBD()
    handle.set_tls(nbd.TLS_REQUIRE)
    handle.set_tls_certificates(str(cert_dir))
    if meta:
        handle.add_meta_context("base:allocation")
    if server.socket_path:
        handle.connect_unix(server.socket_path)
    else:
        handle.connect_tcp("localhost", str(server.port))
    return handle


def qemu_tls_object(cert_dir: Path) -> list[str]:
    return ["--object", f"tls-creds-x509,id=t0,dir={cert_dir},endpoint=client"]


def qemu_nbd_opts(server: Server) -> str:
    """``--image-opts`` for the export with the TLS object; qemu checks the certificate against a hostname."""
    if server.socket_path:
        where = f"server.type=unix,server.path={server.socket_path},tls-hostname=localhost"
    else:
        where = f"server.type=inet,server.host=localhost,server.port={server.port}"
    return f"driver=nbd,{where},tls-creds=t0"


def data_ranges(path: Path) -> list[tuple[int, int]]:
    """The file's data extents as (offset, length), from SEEK_DATA/SEEK_HOLE: the truth for --map."""
    ranges = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size, pos = os.fstat(fd).st_size, 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            ranges.append((start, end - start))
            pos = end
    finally:
        os.close(fd)
    return ranges


# --- the installed clients over TLS ---------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_nbdinfo_over_tls(start_pynbd, image, tls_certs, transport):
    server = serve_tls(start_pynbd, image, tls_certs, transport)
    uri = tls_uri(server, tls_certs.dir)
    info = json.loads(run(["nbdinfo", "--json", uri]).stdout)
    assert info["TLS"] is True and info["structured"] is True
    [export] = info["exports"]
    assert export["export-size"] == DISK_SIZE
    assert export["contexts"] == ["base:allocation"]  # meta contexts negotiated again inside TLS
    listing = json.loads(run(["nbdinfo", "--list", "--json", uri]).stdout)
    assert [e["export-name"] for e in listing["exports"]] == [""]
    extents = json.loads(run(["nbdinfo", "--map", "--json", uri]).stdout)
    mapped = [(e["offset"], e["length"]) for e in extents if e["type"] & 1 == 0]
    assert mapped == data_ranges(image)
    assert server.log() == ""  # well-behaved TLS clients leave no warnings


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_tcp_clients_verify_the_server_certificate(start_pynbd, image, tls_certs, host):
    server = serve_tls(start_pynbd, image, tls_certs, "tcp")
    assert run(["nbdinfo", "--size", tls_uri(server, tls_certs.dir, host)]).stdout.strip() == str(DISK_SIZE)
    refused = run(["nbdinfo", "--size", tls_uri(server, tls_certs.other_ca_dir, host)], check=False)
    assert refused.returncode != 0
    assert "certificate" in refused.stderr.lower()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_nbdcopy_both_ways_over_tls(start_pynbd, image, tls_certs, workdir, transport):
    server = serve_tls(start_pynbd, image, tls_certs, transport)
    uri = tls_uri(server, tls_certs.dir)
    copy = workdir / "copy.raw"
    run(["nbdcopy", uri, str(copy)])
    assert copy.read_bytes() == image.read_bytes()

    incoming = workdir / "in.raw"
    incoming.write_bytes(os.urandom(DISK_SIZE // 2) + bytes(DISK_SIZE // 2))
    run(["nbdcopy", "--flush", str(incoming), uri])
    assert image.read_bytes() == incoming.read_bytes()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_libnbd_over_tls_moves_8_mib_byte_for_byte(start_pynbd, image, tls_certs, transport):
    server = serve_tls(start_pynbd, image, tls_certs, transport)
    handle = tls_handle(server, tls_certs.dir, meta=True)
    try:
        assert handle.get_tls_negotiated()
        assert handle.get_structured_replies_negotiated()
        assert handle.can_meta_context("base:allocation")
        original = image.read_bytes()
        assert handle.pread(8 * MiB, 0) == original[: 8 * MiB]
        assert handle.pread(8 * MiB, 8 * MiB) == original[8 * MiB :]  # holes come back as zeroes

        data = os.urandom(8 * MiB)
        handle.pwrite(data, 4 * MiB)
        handle.flush()
        assert handle.pread(8 * MiB, 4 * MiB) == data
        with open(image, "rb") as f:
            f.seek(4 * MiB)
            assert f.read(8 * MiB) == data

        entries: list[int] = []
        handle.block_status(DISK_SIZE, 0, lambda ctx, offset, ext, err: entries.extend(ext) or 0)
        assert sum(entries[0::2]) == DISK_SIZE
    finally:
        handle.shutdown()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_qemu_tools_over_tls(start_pynbd, image, tls_certs, workdir, transport):
    server = serve_tls(start_pynbd, image, tls_certs, transport)
    tls_object, opts = qemu_tls_object(tls_certs.dir), qemu_nbd_opts(server)
    original = image.read_bytes()

    copy = workdir / "copy.raw"
    run(["qemu-img", "convert", *tls_object, "--image-opts", opts, "-O", "raw", str(copy)])
    assert copy.read_bytes() == original
    run(["qemu-img", "compare", *tls_object, "--image-opts", f"driver=raw,file.filename={copy}", opts])

    io = run(
        [
            "qemu-io", *tls_object,
            "-c", "write -P 0x5a 1M 3M",
            "-c", "read -P 0x5a 1M 3M",
            "-c", "write -z 9M 1M",
            "-c", "read -P 0 9M 1M",
            "-c", "flush",
            "--image-opts", opts,
        ]
    )  # fmt: skip
    assert "Pattern verification failed" not in io.stdout + io.stderr
    expected = bytearray(original)
    expected[MiB : 4 * MiB] = b"\x5a" * (3 * MiB)
    expected[9 * MiB : 10 * MiB] = bytes(MiB)
    assert image.read_bytes() == expected


# --- refusals -------------------------------------------------------------------------------------


def test_plaintext_client_fails_cleanly_and_does_not_disturb_tls_clients(start_pynbd, image, tls_certs):
    server = serve_tls(start_pynbd, image, tls_certs, "unix")
    witness = tls_handle(server, tls_certs.dir)
    pattern = os.urandom(MiB)
    witness.pwrite(pattern, 0)

    plain = nbd.NBD()
    with pytest.raises(nbd.Error) as err:
        plain.connect_uri(server.uri)
    assert "TLS" in str(err.value)
    for argv in (["nbdinfo", server.uri], ["nbdinfo", "--list", server.uri], ["nbdcopy", server.uri, "null:"]):
        assert run(argv, check=False).returncode != 0

    assert witness.pread(MiB, 0) == pattern
    witness.shutdown()
    assert server.proc.poll() is None
    assert "Traceback" not in server.log()


def test_required_mode_over_raw_sockets(start_pynbd, image, tls_certs):
    """ERR_TLS_REQD for every option until STARTTLS, then a clean upgrade and normal service."""
    server = serve_tls(start_pynbd, image, tls_certs, "unix")
    with RawClient(server) as client:
        client.start()
        for option, payload in [
            (OPT_LIST, b""),
            (OPT_SR, b""),
            (OPT_INFO, struct.pack(">IH", 0, 0)),
            (OPT_GO, struct.pack(">IH", 0, 0)),
            (0x4242, b"junk"),
        ]:
            [(reply, message)] = client.option(option, payload)
            assert reply == REP_ERR_TLS_REQD and b"TLS" in message
        assert client.option(OPT_STARTTLS, b"x")[0][0] == REP_ERR_INVALID  # STARTTLS takes no payload
        assert client.option(OPT_STARTTLS) == [(REP_ACK, b"")]

        context = ssl.create_default_context(cafile=str(tls_certs.dir / "ca-cert.pem"))
        client.sock = context.wrap_socket(client.sock, server_hostname="localhost")
        assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
        assert client.option(OPT_STARTTLS)[0][0] == REP_ERR_INVALID  # already on
        size, _ = client.go()
        assert size == DISK_SIZE
        assert client.read(0, MiB) == image.read_bytes()[:MiB]


def test_export_name_before_starttls_is_dropped(start_pynbd, image, tls_certs):
    server = serve_tls(start_pynbd, image, tls_certs, "unix")
    with RawClient(server) as client:
        client.start()
        client.send_option(OPT_EXPORT_NAME, b"")
        assert client.disconnected()


def test_broken_tls_handshake_after_starttls(start_pynbd, image, tls_certs):
    """A client that gets the STARTTLS ACK and then sends garbage is dropped; others carry on."""
    server = serve_tls(start_pynbd, image, tls_certs, "unix")
    witness = tls_handle(server, tls_certs.dir)
    with RawClient(server) as client:
        client.start()
        assert client.option(OPT_STARTTLS) == [(REP_ACK, b"")]
        client.send(b"\x16\x03\x01\x00\x05hello, not really TLS" * 4)
        assert client.disconnected()
    assert "connection error" in server.log()
    assert witness.pread(MiB, 0) == image.read_bytes()[:MiB]
    witness.shutdown()


def test_tls_on_serves_plaintext_and_tls_clients(start_pynbd, image, tls_certs):
    server = start_pynbd("--tls", "on", "--tls-creds", str(tls_certs.dir), str(image))
    secure = tls_handle(server, tls_certs.dir)
    plain = nbd.NBD()
    plain.connect_uri(server.uri)
    assert secure.get_tls_negotiated() and not plain.get_tls_negotiated()

    data = os.urandom(MiB)
    plain.pwrite(data, 2 * MiB)
    plain.flush()
    assert secure.pread(MiB, 2 * MiB) == data
    secure.pwrite(data[::-1], 5 * MiB)
    secure.flush()
    assert plain.pread(MiB, 5 * MiB) == data[::-1]
    assert run(["nbdinfo", "--size", tls_uri(server, tls_certs.dir)]).stdout.strip() == str(DISK_SIZE)
    assert run(["nbdinfo", "--size", server.uri]).stdout.strip() == str(DISK_SIZE)
    plain.shutdown()
    secure.shutdown()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_verify_peer_refuses_a_client_without_a_certificate(start_pynbd, image, tls_certs, transport):
    server = serve_tls(start_pynbd, image, tls_certs, transport, "--tls-verify-peer")
    refused = nbd.NBD()
    refused.set_tls(nbd.TLS_REQUIRE)
    refused.set_tls_certificates(str(tls_certs.ca_only_dir))
    with pytest.raises(nbd.Error):
        if server.socket_path:
            refused.connect_unix(server.socket_path)
        else:
            refused.connect_tcp("localhost", str(server.port))
    assert "certificate" in server.log().lower()

    accepted = tls_handle(server, tls_certs.dir)
    assert accepted.get_tls_negotiated()
    assert accepted.pread(MiB, 0) == image.read_bytes()[:MiB]
    accepted.shutdown()
    assert run(["nbdinfo", "--size", tls_uri(server, tls_certs.dir)]).stdout.strip() == str(DISK_SIZE)
    assert run(["nbdinfo", "--size", tls_uri(server, tls_certs.ca_only_dir)], check=False).returncode != 0
