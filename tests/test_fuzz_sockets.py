"""A short run of the socket-level fuzzer (tests/fuzzer.py; scripts/fuzz runs it for long): mutated
handshakes, requests and QMP commands against a real ``pynbd serve`` and ``pynbd daemon``. No crash,
no hang, the witness's data intact, memory bounded, and no traceback in either server's log."""

from __future__ import annotations

from tests.fuzzer import fuzz, log_tracebacks, start_pynbd_daemon, start_serve

CASES = 3000
RSS_GROWTH_LIMIT_KIB = 64 * 1024


def test_fuzzing_serve_and_daemon_finds_nothing(workdir):
    targets = [start_serve(workdir), start_pynbd_daemon(workdir)]
    try:
        report = fuzz(targets, seed=20261206, cases=CASES, seconds=600, batch=500)
    finally:
        for target in targets:
            target.stop()
    assert report.failures == [], report.summary()
    assert report.cases == CASES, report.summary()
    for name, start in report.rss_start_kib.items():
        assert report.rss_max_kib[name] - start < RSS_GROWTH_LIMIT_KIB, report.summary()
    assert log_tracebacks(workdir) == []
