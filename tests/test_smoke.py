import nbd

from tests.peers import run


def test_pynbd_serves_memory_disk_to_libnbd(start_pynbd):
    server = start_pynbd("--memory", "16M")
    h = nbd.NBD()
    h.connect_uri(server.uri)
    assert h.get_size() == 16 * 1024 * 1024
    h.pwrite(b"x" * 4096, 8192)
    assert h.pread(4096, 8192) == b"x" * 4096
    h.shutdown()


def test_nbdinfo_sees_socket_activated_servers(start_pynbd, start_qemu_nbd, start_nbdkit, workdir):
    image = workdir / "disk.raw"
    image.write_bytes(bytes(1 << 20))
    for server in (start_pynbd(str(image)), start_qemu_nbd("-f", "raw", str(image)), start_nbdkit("file", str(image))):
        out = run(["nbdinfo", "--size", server.uri]).stdout
        assert out.strip() == str(1 << 20)
