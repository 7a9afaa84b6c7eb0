"""Bad QMP input and misbehaving QMP clients: each gets an error reply or loses only its own
connection, while other QMP clients and the NBD clients of the daemon carry on.

The same byte streams go to qemu-storage-daemon, which must agree on which inputs are errors.
"""

from __future__ import annotations

import json
import os
import socket

import nbd
import pytest

from tests.daemons import KINDS, RawQMP

MiB = 1 << 20
pytestmark = pytest.mark.timeout(120)


def raw_client(daemon) -> RawQMP:
    if daemon.kind == "qsd":  # qemu's socket chardev serves one client at a time
        daemon.qmp.close()
    return RawQMP(daemon.qmp_path)


RETURN, ERROR, NOT_FOUND = "return", "GenericError", "CommandNotFound"
SCRIPT = [
    (b'{"execute": "query-version"}', NOT_FOUND),  # before capabilities negotiation
    (b'{"execute": "qmp_capabilities"}', RETURN),
    (b'{"execute": "qmp_capabilities"}', NOT_FOUND),  # twice
    (b"{garbage}", ERROR),
    (b"[1, 2]", ERROR),
    (b'"text"', ERROR),
    (b"42", ERROR),
    (b"null", ERROR),
    (b'{"arguments": {}}', ERROR),  # no execute
    (b'{"execute": 42}', ERROR),
    (b'{"execute": "query-version", "arguments": []}', ERROR),
    (b'{"execute": "query-version", "bogus": 1}', ERROR),
    (b'{"execute": "no-such-command"}', NOT_FOUND),
    (b'{"execute": "blockdev-del", "arguments": {"node-name": 42}}', ERROR),  # wrong type
    (b'{"execute": "blockdev-del", "arguments": {}}', ERROR),  # missing argument
    (b'{"execute": "blockdev-del", "arguments": {"node-name": "x", "extra": 1}}', ERROR),  # unexpected
    (b'{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "n", "size": "big"}}', ERROR),
    (b'{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "n", "size": -1}}', ERROR),
    (b'{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e", "node-name": 5}}', ERROR),
    (b'{"execute": "nbd-server-start", "arguments": {"addr": {"type": "carrier-pigeon"}}}', ERROR),
    (b'{"execute": "transaction", "arguments": {"actions": "all of them"}}', ERROR),
    (b'{"execute": "query-version", "id": {"any": ["json", 1]}}', RETURN),
    (b'{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "n", "size": 1048576}}', RETURN),
    (b'{"execute": "query-block-exports"}', RETURN),
]


@pytest.mark.parametrize("kind", KINDS)
def test_bad_input_is_answered_as_qemu_answers_it(kind, start_daemon):
    daemon = start_daemon(kind, nbd=False)
    client = raw_client(daemon)
    assert client.greeting["QMP"]["version"]["qemu"]["major"] == 7
    for data, expected in SCRIPT:
        if kind == "qsd" and b'"size": -1' in data:
            continue  # qemu-storage-daemon 7.2 aborts on this one (parse_option_size), pynbd refuses it
        reply = client.ask(data)
        outcome = RETURN if "return" in reply else reply["error"]["class"]
        assert outcome == expected, f"{kind}: {data!r} -> {reply}"
        if b'"id": {"any"' in data:
            assert reply["id"] == {"any": ["json", 1]}
    # a message split across writes, and two messages in one write
    client.send(b'{"execute": "query-')
    client.send(b'version", "id": 1}{"execute": "query-version", "id": 2}\n')
    assert [client.recv()["id"], client.recv()["id"]] == [1, 2]
    client.close()


def test_pynbd_survives_hostile_input_while_others_are_served(start_daemon, workdir):
    image = workdir / "disk.raw"
    image.write_bytes(b"\x17" * MiB)
    daemon = start_daemon("pynbd")
    daemon.ok("blockdev-add", driver="raw", **{"node-name": "r0"}, file={"driver": "file", "filename": str(image)})
    daemon.ok("block-export-add", type="nbd", id="e0", **{"node-name": "r0"}, writable=True)
    h = nbd.NBD()
    h.connect_uri(daemon.uri("r0"))
    hostile = raw_client(daemon)
    hostile.ask(b'{"execute": "qmp_capabilities"}')
    deep_arguments = b'{"execute": "query-version", "arguments": {"a": ' + b"[1, " * 10_000 + b"1" + b"]" * 10_000
    for junk in (
        b"\xff\xfe\x00garbage",  # not even UTF-8
        b"[" * 100_000 + b"]" * 100_000,  # nesting deeper than any parser's recursion
        b"x" * (2 * MiB),  # one long line of nothing
        deep_arguments + b"}}",
        b"}]",
    ):
        hostile.send(junk + b'\n{"execute": "query-version", "id": "sync"}\n')
        replies = []
        while not replies or replies[-1].get("id") != "sync":
            replies.append(hostile.recv())
        assert len(replies) >= 2 and all("error" in reply for reply in replies[:-1]), replies
        assert daemon.ok("query-version")["package"].startswith("pynbd")  # the other QMP client
        assert h.pread(4096, 0) == b"\x17" * 4096  # and the NBD client
    # a huge string trickling in: the daemon keeps serving between the pieces
    hostile.send(b'{"execute": "query-version", "arguments": {"a": "')
    for _ in range(64):
        hostile.send(b"s" * 65536)
        assert h.pread(4096, 0) == b"\x17" * 4096
    assert "error" in hostile.ask(b'"}}')  # the string ends; query-version takes no "a"
    hostile.send(b'{"execute": "blockdev-del", "argum')  # and then it vanishes mid-message
    hostile.close()
    h.pwrite(b"\x18" * 4096, 0)
    assert daemon.ok("query-block-exports")[0]["id"] == "e0"
    h.shutdown()
    assert image.read_bytes()[:4096] == b"\x18" * 4096


def test_client_disconnecting_mid_command_does_not_disturb_the_daemon(start_nbdkit, start_daemon, workdir):
    """blockdev-add of an nbd node whose server accepts but does not answer stays in progress;
    its client leaves; NBD clients are served meanwhile, and another monitor's command waits for it
    (commands run one at a time across monitors, as in qemu-storage-daemon, which waits the same
    way); when the command fails, only its reply is lost."""
    remote = start_nbdkit("memory", str(MiB))
    daemon = start_daemon("pynbd")
    daemon.ok("blockdev-add", driver="null-co", **{"node-name": "n0"}, size=MiB, **{"read-zeroes": True})
    daemon.ok("block-export-add", type="nbd", id="e0", **{"node-name": "n0"})
    h = nbd.NBD()
    h.connect_uri(daemon.uri("n0"))
    silent_path = str(workdir / "silent.sock")
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(silent_path)
    silent.listen(1)
    silent.settimeout(30)
    leaving = raw_client(daemon)
    leaving.ask(b'{"execute": "qmp_capabilities"}')
    add = {"driver": "nbd", "node-name": "x", "server": {"type": "unix", "path": silent_path}}
    leaving.send(json.dumps({"execute": "blockdev-add", "arguments": add}).encode())
    conn, _ = silent.accept()  # the daemon is now inside blockdev-add, waiting for a greeting
    leaving.close()
    assert h.pread(4096, 0) == bytes(4096)  # the data path is not held up by the pending command
    conn.settimeout(30)
    conn.sendall(b"this is not an NBD greeting....")  # negotiation fails: the command ends in an error
    assert conn.recv(1) == b""  # the daemon gave up on the connection
    assert daemon.ok("query-version")  # and the monitors go on
    conn.close()
    silent.close()
    assert [n["node-name"] for n in daemon.ok("query-named-block-nodes")] == ["n0"]
    daemon.ok("blockdev-add", driver="nbd", **{"node-name": "x"}, server={"type": "unix", "path": remote.socket_path})
    assert sorted(n["node-name"] for n in daemon.ok("query-named-block-nodes")) == ["n0", "x"]
    assert h.pread(4096, 0) == bytes(4096)
    h.shutdown()
    assert daemon.proc.poll() is None
    os.unlink(silent_path)
