"""docs/backup.md runs as written: its ``sh`` blocks, in order, as one bash script.

Every ``text`` block after them shows output the run must print (timings, throughput and sizes
that depend on the file system aside), so the tutorial cannot drift from what the tools do.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.peers import VENV_BIN, have

DOC = Path(__file__).resolve().parent.parent / "docs" / "backup.md"
VARIABLE = re.compile(r"ops/sec|^disk size:|fragmented|^Image end offset|^\.\.\.$")


@pytest.fixture(autouse=True)
def remove_subdirectories(workdir):
    """The workdir fixture removes files only; these tests also make directories in it."""
    yield
    for child in workdir.iterdir():
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)


def blocks(kind: str) -> list[str]:
    return re.findall(rf"^```{kind}\n(.*?)^```$", DOC.read_text(), flags=re.S | re.M)


def expected_lines() -> list[str]:
    lines = []
    for block in blocks("text"):
        for line in block.splitlines():
            line = re.sub(r", [0-9.]+ s$", "", line.rstrip())
            if line and not VARIABLE.search(line.strip()):
                lines.append(line)
    return lines


@pytest.mark.skipif(not (have("jq") and have("nbdinfo")), reason="the tutorial uses jq and nbdinfo")
def test_tutorial_runs_as_written(workdir):
    script = workdir / "tutorial.sh"
    script.write_text("set -euo pipefail\n" + "\n".join(blocks("sh")))
    log = workdir / "tutorial.log"
    env = dict(os.environ, PATH=f"{VENV_BIN}:/usr/bin:/bin:{os.environ.get('PATH', '')}")
    try:
        with open(log, "w") as out:
            result = subprocess.run(
                ["bash", str(script)], cwd=workdir, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=300
            )
    finally:
        pid_file = workdir / "backup-demo" / "daemon.pid"
        if pid_file.exists():  # the script failed before it stopped the daemon
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
    output = log.read_text()
    assert result.returncode == 0, output
    printed = [re.sub(r", [0-9.]+ s$", "", line.rstrip()) for line in output.splitlines()]
    missing = [line for line in expected_lines() if line not in printed]
    assert not missing, f"docs/backup.md shows output the tutorial did not print: {missing}\n{output}"
