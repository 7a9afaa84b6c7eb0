"""The short soak (scripts/soak): 32 clients doing mixed, verified I/O against `pynbd serve` and
a `pynbd daemon` qcow2 export for a few seconds. The script itself fails on any data error, a
traceback, a peak RSS over 256 MiB, memory not given back (more than 64 MiB above the start once
the clients left), or file descriptors left open; this test runs it and reads its verdict. The
long run (256 clients, 60 s) and its figures are in docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parent.parent / "scripts" / "soak"
MiB = 1 << 20


@pytest.mark.timeout(300)
@pytest.mark.parametrize("target", ["serve", "daemon"])
def test_short_soak(target):
    result = subprocess.run(
        [sys.executable, str(SOAK), "--target", target, "--clients", "32", "--seconds", "4", "--json"],
        capture_output=True,
        text=True,
        timeout=280,
        env=dict(os.environ),
    )
    assert result.stdout.strip(), f"no result; stderr:\n{result.stderr[-3000:]}"
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["problems"] == [], report
    assert result.returncode == 0, result.stderr[-3000:]
    assert report["errors"] == 0 and report["requests"] >= 32 * 4  # every client got its requests through
    assert report["rss_peak"] < 256 * MiB
    assert report["rss_after"] <= report["rss_before"] + 64 * MiB
    assert report["fds_after"] == report["fds_before"]
