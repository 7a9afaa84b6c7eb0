"""scripts/stress in CI: every race-prone scenario and the SIGKILL loop, a few runs each.

The full budgets (hundreds of runs with the CPU kept busy) are in docs/reliability.md; here each
scenario runs twice (the crash loop three times: backup, mirror and commit) so that CI exercises
every scenario and the script's own bookkeeping. No timing is asserted. The checker itself is
tested first, on histories made by hand: a stress scenario that cannot see a lost write is
worth nothing."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.model import BLOCK, FIRST_WID, Model, block_data
from tests.scenarios import SCENARIOS

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "stress"
SIZE = 8 * BLOCK


def disk(model: Model, values: dict[int, int | None]) -> bytes:
    """A disk image holding write ``values[block]`` in each block (zeros where None or absent)."""
    data = bytearray(model.size)
    for block, wid in values.items():
        if wid is not None:
            data[block * BLOCK : (block + 1) * BLOCK] = block_data(wid, block)
    return bytes(data)


def test_a_lost_durable_write_is_reported_after_a_crash_and_an_unfinished_one_is_not():
    model = Model(SIZE, initial={0: 1})
    fua = model.issue(FIRST_WID, 0, 2, zero=False, fua=True)
    model.ack(fua)
    plain = model.issue(FIRST_WID + 1, 2, 1, zero=False, fua=False)
    model.ack(plain)  # acknowledged, never flushed: may be lost
    model.issue(FIRST_WID + 2, 3, 1, zero=False, fua=False)  # never acknowledged: may have landed
    assert model.check(disk(model, {0: 1, 1: FIRST_WID, 3: FIRST_WID + 2}), model.after_crash, "d") != []
    assert model.check(disk(model, {0: FIRST_WID, 1: FIRST_WID, 3: FIRST_WID + 2}), model.after_crash, "d") == []
    flush = model.issue_flush()
    model.ack(flush)  # now the plain write is durable too
    problems = model.check(disk(model, {0: FIRST_WID, 1: FIRST_WID}), model.after_crash, "d")
    assert problems[0].startswith("d: block 0x2000 holds zeros; expected write 17")
    assert "durable" in problems[0]


def test_a_flush_covers_only_writes_acknowledged_before_it_was_sent():
    model = Model(SIZE)
    write = model.issue(FIRST_WID, 0, 1, zero=False, fua=False)
    flush = model.issue_flush()
    model.ack(write)
    model.ack(flush)
    assert not model.durable(write)
    assert model.check(bytes(SIZE), model.after_crash, "d") == []


def test_a_point_in_time_copy_holds_what_was_acknowledged_before_and_nothing_issued_after():
    model = Model(SIZE)
    before = model.issue(FIRST_WID, 0, 1, zero=False, fua=False)
    model.ack(before)
    across = model.issue(FIRST_WID + 1, 1, 1, zero=False, fua=False)
    start = model.mark("job issued")
    end = model.mark("job started")
    model.ack(across)
    after = model.issue(FIRST_WID + 2, 0, 1, zero=False, fua=False)
    model.ack(after)

    def moment(block):
        return model.at_moment(block, start, end)

    assert model.check(disk(model, {0: FIRST_WID}), moment, "copy") == []
    assert model.check(disk(model, {0: FIRST_WID, 1: FIRST_WID + 1}), moment, "copy") == []  # in flight: either
    assert model.check(disk(model, {0: FIRST_WID + 2}), moment, "copy") != []  # issued after the start
    assert model.check(disk(model, {}), moment, "copy") != []  # acknowledged before the start, missing


def test_torn_and_misplaced_blocks_are_named():
    model = Model(SIZE)
    model.ack(model.issue(FIRST_WID, 0, 2, zero=False, fua=True))
    data = bytearray(disk(model, {0: FIRST_WID, 1: FIRST_WID}))
    data[BLOCK : 2 * BLOCK] = block_data(FIRST_WID, 0)  # block 0's content landed in block 1
    data[100:612] = bytes(512)  # one sector of block 0 lost
    problems = model.check(bytes(data), model.settled, "d")
    assert "garbage" in problems[0] and "misplaced" in problems[1]


def stress(*args: str) -> subprocess.CompletedProcess:
    """Run the script (failed runs' directories removed: the report carries the daemons' complaints)."""
    path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p] + [str(SCRIPT.parent.parent)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    argv = [sys.executable, str(SCRIPT), "--keep-failed", "0", *args]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=280, check=False)


def summary(out: str) -> dict[str, tuple[int, int]]:
    return {
        m[1]: (int(m[2]), int(m[3]))
        for m in re.finditer(r"^(\S+(?: \[\w+\])?): (\d+) runs, (\d+) failures$", out, re.M)
    }


@pytest.mark.parametrize("name", sorted(set(SCENARIOS) - {"crash-loop"}))
def test_scenario_passes_a_few_runs_against_pynbd(name):
    result = stress("--scenario", name, "--runs", "2", "--load", "0", "--seconds", "120")
    assert summary(result.stdout) == {name: (2, 0)}, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1] == "2 passed, 0 failed"
    assert result.returncode == 0


@pytest.mark.parametrize("kind", ["pynbd", "qsd"])
def test_crash_loop_backup_mirror_and_commit(kind):
    """Three rounds (the operation rotates with the seed) with one busy loop, which the script
    must stop again: its pid is gone afterwards."""
    result = stress("--scenario", "crash-loop", "--kind", kind, "--runs", "3", "--load", "1", "--seconds", "120")
    assert summary(result.stdout) == {"crash-loop": (3, 0)}, result.stdout + result.stderr
    assert re.search(r"backup killed \w+ 1, .*commit killed \w+ 1, .*mirror killed \w+ 1", result.stdout)
    assert result.returncode == 0
    (pids,) = re.findall(r"busy-loop pids \[([\d, ]+)\]", result.stdout)
    for pid in map(int, pids.split(",")):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_script_refuses_bad_arguments():
    result = stress("--runs", "0")
    assert result.returncode == 2 and "must be positive" in result.stderr
    result = stress("--scenario", "nope")
    assert result.returncode == 2 and "invalid choice" in result.stderr
