"""QMP input and output limits (docs/qmp.md, "The protocol"): numbers JSON or 64 bits cannot
carry, over-long messages, a monitor that never reads its events or its replies. Each gets a
clear error reply or its documented bound, the misbehaving monitor's connection stays usable,
and other monitors and the NBD clients carry on. The same inputs go to qemu-storage-daemon 7.2
where it answers them with valid JSON.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import threading

import nbd
import pytest

from tests.daemons import KINDS, RawQMP
from tests.peers import PYNBD, process_memory
from tests.test_qmp_bad_input import raw_client

MiB = 1 << 20
pytestmark = pytest.mark.timeout(180)

HUGE = "9" * 5000  # past Python's 4300-digit int() limit: used to kill the connection
ADDR = '{"type": "unix", "data": {"path": "{path}"}}'


def start(max_connections: str) -> str:
    arguments = '{"addr": ' + ADDR + ', "max-connections": ' + max_connections + "}"
    return '{"execute": "nbd-server-start", "arguments": ' + arguments + "}"


def version_with_id(number: str) -> str:
    return '{"execute": "query-version", "id": ' + number + "}"


# (input, what pynbd answers, what qemu-storage-daemon 7.2 answers; None: not asked, its answer is not JSON)
NUMBERS = [
    (version_with_id("NaN"), "JSON parse error", "JSON parse error"),
    (version_with_id("Infinity"), "JSON parse error", "JSON parse error"),
    (version_with_id("-Infinity"), "JSON parse error", "JSON parse error"),
    (version_with_id("1e400"), "JSON parse error, number 1e400 is out of range", None),  # qsd: "id": inf
    (version_with_id(HUGE), "is out of range", None),  # qsd: "id": inf
    (version_with_id("18446744073709551616"), 1.8446744073709552e19, 1.8446744073709552e19),
    (version_with_id("-9223372036854775809"), -9.223372036854776e18, -9.223372036854776e18),
    (version_with_id("18446744073709551615"), 18446744073709551615, 18446744073709551615),
    (start("18446744073709551616"), "Parameter 'max-connections' expects uint64", "same"),
    (start("4294967296"), "Parameter 'max-connections' expects uint32_t", "same"),
    (start("-1"), "Parameter 'max-connections' expects uint32_t", "same"),
    (start("1.5"), "Parameter 'max-connections' expects uint64", "same"),
    (start(HUGE), "is out of range", None),  # qsd: inf, then "expects uint64"
]


def replies_until_sync(client: RawQMP, data: bytes) -> list[dict]:
    """Send ``data`` and then a marker command; return the replies that came before the marker's."""
    client.send(data + b'\n{"execute": "query-version", "id": "sync"}\n')
    replies = []
    while True:
        reply = client.recv()
        if reply.get("id") == "sync":
            assert "return" in reply  # the connection is still usable
            return replies
        replies.append(reply)


@pytest.mark.parametrize("kind", KINDS)
def test_numbers_json_or_64_bits_cannot_carry_get_clear_errors(kind, start_daemon, workdir):
    daemon = start_daemon(kind, nbd=False)
    client = raw_client(daemon)
    assert "return" in client.ask(b'{"execute": "qmp_capabilities"}')
    for text, pynbd_answer, qsd_answer in NUMBERS:
        expected = pynbd_answer if kind == "pynbd" else (pynbd_answer if qsd_answer == "same" else qsd_answer)
        if expected is None:
            continue
        data = text.replace("{path}", str(workdir / "n.sock")).encode()
        replies = replies_until_sync(client, data)
        if isinstance(expected, str):
            assert replies and all("error" in reply for reply in replies), (text[:80], replies)
            assert expected in replies[0]["error"]["desc"], (text[:80], replies)
            if kind == "pynbd":
                assert len(replies) == 1  # one message, one error
        else:  # an id it keeps: echoed back, as the number qemu's parser made of it
            assert [reply["id"] for reply in replies] == [expected], replies
            assert type(replies[0]["id"]) is type(expected)
    client.close()
    if kind == "pynbd":
        assert "Traceback" not in daemon.log()


def test_keyval_options_are_range_checked_too(workdir):
    result = subprocess.run(
        [PYNBD, "daemon", "--nbd-server", f"addr.type=unix,addr.path={workdir}/n.sock,max-connections=4294967296"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "Parameter 'max-connections' expects uint32_t" in result.stderr


def test_an_over_long_message_is_refused_and_the_connection_stays_usable(start_daemon):
    daemon = start_daemon("pynbd", "--qmp-max-message", "64K", nbd=False)
    client = raw_client(daemon)
    client.ask(b'{"execute": "qmp_capabilities"}')
    under = b'{"execute": "query-version", "arguments": {"a": "' + b"x" * 60_000 + b'"}}'
    [reply] = replies_until_sync(client, under)
    assert reply["error"]["desc"] == "Parameter 'a' is unexpected"  # parsed: under the limit
    over = b'{"execute": "query-version", "arguments": {"a": "' + b"x" * 200_000 + b'"}}'
    [reply] = replies_until_sync(client, over)
    assert reply["error"]["desc"] == "JSON message too large"  # and the rest of that line was skipped
    # a long line in pieces, and other commands on the same connection afterwards
    for _ in range(8):
        client.send(b"y" * 65536)
    [reply] = replies_until_sync(client, b"")
    assert reply["error"]["desc"] == "JSON message too large"
    assert client.ask(b'{"execute": "query-version", "id": 7}')["id"] == 7
    client.close()
    assert "Traceback" not in daemon.log()


def test_events_for_a_monitor_that_never_reads_are_bounded(start_daemon):
    """A monitor that stops reading gets at most --qmp-event-buffer bytes of output queued; the
    events that come meanwhile are dropped, the oldest stay, in order. When it reads again it
    gets what was queued and then the new events; other monitors got everything."""
    daemon = start_daemon("pynbd", "--qmp-event-buffer", "4K", monitors=2)
    sleeper = daemon.monitor(1)  # negotiated, then it reads nothing
    daemon.ok("blockdev-add", driver="null-co", **{"node-name": "n0"}, size=MiB)
    count = 1500
    for i in range(count):
        daemon.ok("block-export-add", type="nbd", id=f"e{i}", **{"node-name": "n0"})
        daemon.ok("block-export-del", id=f"e{i}")
    assert daemon.log().count("does not read its output") == 1
    seen = [daemon.wait_event("BLOCK_EXPORT_DELETED")["data"]["id"] for _ in range(count)]
    assert seen == [f"e{i}" for i in range(count)]  # the monitor that reads missed nothing
    assert "return" in sleeper.cmd("query-version")  # the sleeper wakes: queued output, then the reply
    kept = [event["data"]["id"] for event in sleeper.events]
    assert 0 < len(kept) < count
    assert kept == [f"e{i}" for i in range(len(kept))]  # the oldest, in order, with nothing in between
    daemon.ok("block-export-add", type="nbd", id="after", **{"node-name": "n0"})
    daemon.ok("block-export-del", id="after")
    assert "return" in sleeper.cmd("query-version")
    assert [event["data"]["id"] for event in sleeper.events][len(kept) :] == ["after"]  # events flow again
    sleeper.close()


def test_a_monitor_that_does_not_read_its_replies_stalls_only_itself(start_daemon, workdir):
    image = workdir / "disk.raw"
    image.write_bytes(b"\x21" * MiB)
    daemon = start_daemon("pynbd", monitors=2)
    daemon.ok("blockdev-add", driver="raw", **{"node-name": "r0"}, file={"driver": "file", "filename": str(image)})
    daemon.ok("block-export-add", type="nbd", id="e0", **{"node-name": "r0"}, writable=True)
    handle = nbd.NBD()
    handle.connect_uri(daemon.uri("r0"))
    rss_before, _ = process_memory(daemon.proc.pid)
    greedy = daemon.monitor(1)
    commands = 50_000
    stream = b'{"execute": "query-version"}\n' * commands
    greedy.sock.setblocking(False)
    sent = 0
    while sent < len(stream):  # push until the daemon stops taking more (it waits for us to read)
        try:
            sent += greedy.sock.send(stream[sent:])
        except BlockingIOError:
            if not select.select([], [greedy.sock], [], 1.0)[1]:
                break
    greedy.sock.setblocking(True)
    assert sent < len(stream), "the daemon took every command although no reply was read"
    for _ in range(20):  # meanwhile the other monitor and the NBD client are served
        assert daemon.ok("query-version")["package"].startswith("pynbd")
        handle.pwrite(os.urandom(4096), 0)
    _, peak = process_memory(daemon.proc.pid)
    assert peak - rss_before < 32 * MiB
    rest = threading.Thread(target=greedy.sock.sendall, args=(stream[sent:],))
    rest.start()
    replies = sum(1 for _ in range(commands) if "return" in greedy.recv())
    rest.join()
    assert replies == commands
    greedy.close()
    handle.shutdown()


def test_a_monitor_that_vanishes_with_replies_pending_costs_nothing_else(start_daemon):
    daemon = start_daemon("pynbd", monitors=2)
    leaving = daemon.monitor(1)
    leaving.send(b'{"execute": "query-version"}\n' * 10_000)
    leaving.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    leaving.close()
    assert daemon.ok("query-version")
    assert json.dumps(daemon.ok("query-block-exports")) == "[]"
    assert "Traceback" not in daemon.log()
