"""The asyncio NBD client (and its blocking facade) against real servers.

Data is checked byte for byte against what the server's backing file holds, and extents against
what libnbd's nbdinfo --map reports for the same export.
"""

from __future__ import annotations

import asyncio
import errno
import os
import time
from pathlib import Path

import pytest

from pynbd.client import NBDError, OptionError, connect, connect_pool, parse_uri
from pynbd.client.sync import connect as sync_connect
from pynbd.protocol.constants import BASE_ALLOCATION
from tests.peers import have, nbdinfo_map, run

MiB = 1 << 20
pytestmark = pytest.mark.timeout(120)


def make_sparse_image(path: Path, size: int, pieces: dict[int, bytes]) -> bytes:
    """A sparse raw file with data at the given offsets; returns its whole content."""
    content = bytearray(size)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in pieces.items():
            f.seek(offset)
            f.write(data)
            content[offset : offset + len(data)] = data
    return bytes(content)


def as_tuples(extents) -> list[tuple[int, int, int]]:
    return [(e.offset, e.length, e.flags) for e in extents]


PIECES = {0: b"\x11" * 65536, 5 * MiB + 4096: os.urandom(3 * 65536), 15 * MiB: b"\x77" * MiB}


# -- URIs -------------------------------------------------------------------------------------


def test_uri_parsing_follows_the_nbd_uri_spec():
    u = parse_uri("nbd://example.com/disk")
    assert (u.transport, u.host, u.port, u.export, u.tls) == ("tcp", "example.com", 10809, "disk", False)
    assert parse_uri("nbd://h:1234").export == ""
    assert parse_uri("nbd://h//disk").export == "/disk"
    assert parse_uri("nbd://h/a%20b").export == "a b"
    assert parse_uri("nbd://[::1]:99/x").host == "::1"
    u = parse_uri("nbds+unix:///e?socket=/tmp/s.sock&tls-certificates=/pki")
    assert (u.transport, u.socket_path, u.export) == ("unix", "/tmp/s.sock", "e")
    assert (u.tls, u.tls_certificates) == (True, "/pki")
    assert parse_uri("nbd+unix:///?socket=%00abstract").socket_path == "\0abstract"
    for bad in ("http://x/", "nbd+unix:///x", "nbd+unix://host/x?socket=/s", "nbd://h/?socket=/s"):
        with pytest.raises(ValueError):
            parse_uri(bad)
    assert str(parse_uri("nbd+unix:///a%2Fb?socket=/tmp/s")) == "nbd+unix:///a%2Fb?socket=/tmp/s"


# -- pynbd's own server -------------------------------------------------------------------------


def test_read_write_zero_trim_flush_cache_against_pynbd(start_pynbd, workdir):
    image = workdir / "disk.raw"
    content = bytearray(make_sparse_image(image, 16 * MiB, PIECES))
    server = start_pynbd(str(image))

    async def main():
        async with await connect(server.uri, meta_contexts=[BASE_ALLOCATION]) as c:
            assert c.size == 16 * MiB and c.structured and c.contexts == [BASE_ALLOCATION]
            assert await c.pread(c.size, 0) == content
            # unaligned and straddling requests, many in flight at once
            writes = [(offset, os.urandom(1000 + offset % 7)) for offset in range(3, 8 * MiB, 256 * 1024 + 13)]
            await asyncio.gather(*(c.pwrite(data, off) for off, data in writes))
            for off, data in writes:
                content[off : off + len(data)] = data
            await c.zero(200 * 1024, 6 * MiB + 5)
            content[6 * MiB + 5 : 6 * MiB + 5 + 200 * 1024] = bytes(200 * 1024)
            await c.zero(MiB, 12 * MiB, no_hole=True)
            content[12 * MiB : 13 * MiB] = bytes(MiB)
            await c.trim(MiB, 14 * MiB)  # contents unspecified afterwards: rewrite it
            await c.pwrite(b"\x42" * MiB, 14 * MiB, fua=True)
            content[14 * MiB : 15 * MiB] = b"\x42" * MiB
            await c.cache(MiB, 0)
            await c.flush()
            assert await c.pread(c.size, 0) == content

    asyncio.run(main())
    server.stop()
    assert image.read_bytes() == content


def test_requests_larger_than_max_payload_are_split(start_pynbd):
    server = start_pynbd("--memory", "64M")
    data = os.urandom(40 * MiB)

    async def main():
        async with await connect(server.uri) as c:
            assert c.max_payload <= 32 * MiB
            await c.pwrite(data, 4096)
            assert await c.pread(len(data), 4096) == data

    asyncio.run(main())


def test_extents_match_nbdinfo_against_pynbd(start_pynbd, workdir):
    image = workdir / "disk.raw"
    make_sparse_image(image, 16 * MiB, PIECES)
    server = start_pynbd(str(image))
    with sync_connect(server.uri, meta_contexts=[BASE_ALLOCATION]) as h:
        ours = as_tuples(h.map_extents()[BASE_ALLOCATION])
        one = h.block_status(h.size, 0, req_one=True)[BASE_ALLOCATION]
    assert ours == nbdinfo_map(server.uri)
    assert len(one) == 1 and one[0].offset == 0 and (one[0].length, one[0].flags) == ours[0][1:]


def test_sync_facade_and_opt_mode_listing(start_pynbd):
    server = start_pynbd("--memory", "8M", "--description", "scratch disk", export="scratch")
    with sync_connect(server.uri, opt_mode=True) as h:
        assert h.opt_list() == [("scratch", "scratch disk")]
        info = h.opt_info("scratch")
        assert (info.size, info.description) == (8 * MiB, "scratch disk")
        assert h.opt_list_meta_context("scratch") == [BASE_ALLOCATION]
        with pytest.raises(OptionError) as caught:
            h.opt_info("nosuch")
        assert caught.value.reply == 0x80000006  # ERR_UNKNOWN, and negotiation goes on
        h.opt_go("scratch", [BASE_ALLOCATION])
        assert h.size == 8 * MiB and h.description == "scratch disk"
        h.pwrite(b"abc", 0)
        assert h.pread(3, 0) == b"abc"


def test_unknown_export_is_a_clear_error(start_pynbd):
    server = start_pynbd("--memory", "1M", export="a")
    with pytest.raises(OptionError, match="ERR_UNKNOWN"):
        sync_connect(server.uri.replace("/a?", "/b?"))


def test_pool_uses_several_connections_with_multi_conn(start_pynbd):
    server = start_pynbd("--memory", "16M")
    data = os.urandom(8 * MiB)

    async def main():
        async with await connect_pool(server.uri, connections=4) as pool:
            assert len(pool.clients) == 4 and pool.can_multi_conn
            await asyncio.gather(*(pool.pwrite(data[i : i + MiB], i) for i in range(0, len(data), MiB)))
            await pool.flush()
            async with await connect(server.uri) as other:
                assert await other.pread(len(data), 0) == data

    asyncio.run(main())


# -- qemu-nbd -----------------------------------------------------------------------------------


@pytest.fixture
def qcow2_with_bitmap(workdir):
    """A qcow2 image with data before and after bitmap b0 was added (so part of it is dirty)."""
    image = workdir / "disk.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M"])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 64k", "-c", "write -P 0x22 4M 1M", str(image)])
    run(["qemu-img", "bitmap", "--add", str(image), "b0"])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x33 8M 128k", "-c", "write -z 4M 64k", str(image)])
    return image


def test_qemu_nbd_contexts_holes_and_bitmaps(start_qemu_nbd, qcow2_with_bitmap, workdir):
    server = start_qemu_nbd("-r", "-f", "qcow2", "-A", "-B", "b0", "-D", "qcow2 disk", str(qcow2_with_bitmap))
    raw = workdir / "expected.raw"
    run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(qcow2_with_bitmap), str(raw)])
    bitmap, depth = "qemu:dirty-bitmap:b0", "qemu:allocation-depth"

    async def main():
        c = await connect(server.uri, opt_mode=True)
        assert sorted(await c.opt_list_meta_context()) == [BASE_ALLOCATION, depth, bitmap]
        assert await c.opt_list_meta_context(queries=["qemu:"]) == [depth, bitmap]
        assert await c.opt_list_meta_context(queries=["qemu:dirty-bitmap:"]) == [bitmap]
        await c.opt_go(meta_contexts=[BASE_ALLOCATION, bitmap, depth, "x-unknown:thing"])
        assert sorted(c.contexts) == [BASE_ALLOCATION, depth, bitmap]
        assert c.description == "qcow2 disk" and c.read_only
        data = await c.pread(c.size, 0)  # qemu answers with OFFSET_HOLE chunks for the holes
        maps = await c.map_extents()
        again = await c.map_extents()  # the qemu 6.2 block-status cache bug: second answer must agree
        with pytest.raises(NBDError) as caught:
            await c.pwrite(b"x", 0)
        assert caught.value.errno == errno.EPERM
        await c.disconnect()
        return data, maps, again

    data, maps, again = asyncio.run(main())
    assert data == raw.read_bytes()
    assert maps == again
    for context in (BASE_ALLOCATION, bitmap, depth):
        assert as_tuples(maps[context]) == nbdinfo_map(server.uri, context=context), context
    dirty = [(e.offset, e.length) for e in maps[bitmap] if e.flags & 1]
    assert dirty == [(4 * MiB, 64 * 1024), (8 * MiB, 128 * 1024)]


def test_qemu_nbd_error_chunk_carries_errno_and_message(start_qemu_nbd, workdir):
    image = workdir / "disk.raw"
    image.write_bytes(bytes(MiB))
    # blkdebug fails the writes to the image with EIO; qemu answers with an ERROR chunk and a message
    opts = (
        "driver=raw,file.driver=blkdebug,file.inject-error.0.event=write_aio,file.inject-error.0.errno=5,"
        f"file.image.driver=file,file.image.filename={image}"
    )
    server = start_qemu_nbd("--image-opts", opts)
    with sync_connect(server.uri) as h:
        with pytest.raises(NBDError) as caught:
            h.pwrite(b"x" * 4096, 0)
        assert caught.value.errno == errno.EIO
        assert caught.value.message == "writing to file failed"


# -- nbdkit -------------------------------------------------------------------------------------


def test_nbdkit_pattern_null_and_file(start_nbdkit, workdir):
    pattern = start_nbdkit("pattern", "1M")
    null = start_nbdkit("null", "1M")
    image = workdir / "f.raw"
    content = make_sparse_image(image, 4 * MiB, {MiB: b"file data" * 100})
    file_server = start_nbdkit("file", str(image))
    with sync_connect(pattern.uri) as h:
        got = h.pread(MiB, 0)
    expected = b"".join(offset.to_bytes(8, "big") for offset in range(0, MiB, 8))
    assert got == expected
    with sync_connect(null.uri) as h:
        assert h.pread(MiB, 0) == bytes(MiB)
    with sync_connect(file_server.uri, meta_contexts=[BASE_ALLOCATION]) as h:
        assert h.pread(h.size, 0) == content
        assert as_tuples(h.map_extents()[BASE_ALLOCATION]) == nbdinfo_map(file_server.uri)


def test_nbdkit_error_filter_gives_errno_and_keeps_the_connection(start_nbdkit):
    server = start_nbdkit("--filter=error", "memory", "1M", "error=ENOSPC", "error-pwrite-rate=1", "error-pread-rate=0")
    with sync_connect(server.uri) as h:
        with pytest.raises(NBDError) as caught:
            h.pwrite(b"x" * 512, 0)
        assert caught.value.errno == errno.ENOSPC
        assert h.pread(512, 0) == bytes(512)  # still connected
    server = start_nbdkit("--filter=error", "memory", "1M", "error=EIO", "error-pread-rate=1")
    with sync_connect(server.uri) as h:
        with pytest.raises(NBDError) as caught:
            h.pread(4096, 0)
        assert caught.value.errno == errno.EIO
        h.pwrite(b"y", 0)


def test_many_requests_in_flight_overlap_latency(start_nbdkit):
    server = start_nbdkit("--filter=delay", "memory", "1M", "rdelay=1")

    async def main():
        async with await connect(server.uri, max_requests=16) as c:
            started = time.monotonic()
            results = await asyncio.gather(*(c.pread(4096, i * 4096) for i in range(8)))
            return time.monotonic() - started, results

    elapsed, results = asyncio.run(main())
    assert results == [bytes(4096)] * 8
    assert elapsed < 6, f"8 reads with 1 s latency took {elapsed:.1f} s: not in flight together"


def test_a_request_given_up_on_does_not_break_the_connection(start_nbdkit):
    server = start_nbdkit("--filter=delay", "memory", "1M", "rdelay=1")

    async def main():
        async with await connect(server.uri) as c:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(c.pread(4096, 0), 0.2)  # its reply arrives later and is dropped
            await c.pwrite(b"after", 8192)
            return await c.pread(5, 8192)

    assert asyncio.run(main()) == b"after"


@pytest.mark.parametrize(
    "args, protocol, structured",
    [
        (["-o"], "oldstyle", False),
        (["--mask-handshake=0"], "newstyle", False),
        (["--no-sr"], "newstyle-fixed", False),
        ([], "newstyle-fixed", True),
    ],
)
def test_nbdkit_fallbacks(start_nbdkit, args, protocol, structured):
    server = start_nbdkit(*args, "memory", "1M")
    with sync_connect(server.uri, meta_contexts=[BASE_ALLOCATION]) as h:
        assert (h.protocol, h.structured, h.size) == (protocol, structured, MiB)
        assert h.contexts == ([BASE_ALLOCATION] if structured else [])
        h.pwrite(b"z" * 1000, 1)
        assert h.pread(1002, 0) == b"\0" + b"z" * 1000 + b"\0"


def test_nbdkit_block_size_constraints_are_obeyed(start_nbdkit):
    server = start_nbdkit(
        "--filter=blocksize-policy",
        "memory",
        "4M",
        "blocksize-minimum=4096",
        "blocksize-preferred=65536",
        "blocksize-maximum=65536",
        "blocksize-error-policy=error",
    )
    data = os.urandom(300 * 1024 + 77)
    with sync_connect(server.uri) as h:
        assert h.block_size == (4096, 65536, 65536)
        h.pwrite(data, 1000)  # unaligned at both ends and larger than the maximum
        assert h.pread(len(data), 1000) == data
        h.zero(10000, 3)
        assert h.pread(10003, 0) == bytes(10003)


def test_nbdkit_export_list(start_nbdkit):
    server = start_nbdkit(
        "--filter=exportname", "memory", "1M", "exportname=a", "exportname=b", "exportname-list=explicit"
    )
    with sync_connect(server.uri, opt_mode=True) as h:
        assert sorted(name for name, _ in h.opt_list()) == ["a", "b"]
        h.opt_abort()


# -- nbd-server 3.24 ------------------------------------------------------------------------------


@pytest.mark.skipif(not have("nbd-server"), reason="nbd-server not installed")
def test_nbd_server_simple_replies(workdir):
    image = workdir / "disk.raw"
    content = bytearray(make_sparse_image(image, 4 * MiB, {4096: b"nbd-server" * 50}))
    conf = workdir / "nbd-server.conf"
    # port = 0 makes nbd-server 3.24 serve the connection on its stdin (inetd mode); -d keeps it in
    # the foreground. It has no socket activation, so this is the way to run it without waiting.
    conf.write_text(f"[generic]\nport = 0\n[disk]\nexportname = {image}\nflush = true\ntrim = true\n")
    with sync_connect(["nbd-server", "-d", "-C", str(conf)], command_mode="stdio", export="disk") as h:
        assert (h.protocol, h.structured, h.size) == ("newstyle-fixed", False, 4 * MiB)
        assert h.pread(h.size, 0) == content
        h.pwrite(b"Q" * 3000, 5)
        content[5:3005] = b"Q" * 3000
        h.flush()
        assert h.pread(8192, 0) == content[:8192]
    assert image.read_bytes() == content
