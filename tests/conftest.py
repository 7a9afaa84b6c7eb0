import os
import random
from pathlib import Path

import pytest

from tests.peers import nbdkit_server, pynbd_server, qemu_nbd_server


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A short directory path: Unix socket paths must stay under 108 bytes."""
    short = Path("/tmp") / f"pynbd-{os.getpid()}-{random.randrange(1 << 30):x}"
    short.mkdir()
    yield short
    for child in short.iterdir():
        if child.is_file() or child.is_socket():
            child.unlink()
    try:
        short.rmdir()
    except OSError:
        pass


@pytest.fixture
def _started(workdir):
    """Every server and daemon a test started, stopped after it: the daemons first.

    A daemon's nbd nodes are clients of the servers (nbdkit, qemu-nbd, pynbd serve), and a
    server told to stop while a client still has requests in flight waits for them, until its
    stop timeout runs out; so clients go before servers, whatever order the test's fixtures
    were set up in. Within each group the last started stops first (it may use an earlier one).
    Set up after ``workdir``, so the processes are gone before their directory is cleaned.
    """
    daemons: list = []
    servers: list = []
    yield daemons, servers
    for process in [*reversed(daemons), *reversed(servers)]:
        process.stop()


def _starter(workdir, group: list, launch):
    """A fixture's starter for processes of one kind; ``_started`` stops them after the test."""

    def start(*args, **kwargs):
        process = launch(workdir, *args, **kwargs)
        group.append(process)
        return process

    return start


@pytest.fixture
def start_pynbd(workdir, _started):
    return _starter(workdir, _started[1], pynbd_server)


@pytest.fixture
def start_qemu_nbd(workdir, _started):
    return _starter(workdir, _started[1], qemu_nbd_server)


@pytest.fixture
def start_nbdkit(workdir, _started):
    return _starter(workdir, _started[1], nbdkit_server)


@pytest.fixture
def start_daemon(workdir, _started):
    """Start ``pynbd daemon`` or ``qemu-storage-daemon`` (kind "pynbd" or "qsd"); stopped after the test."""
    from tests.daemons import start_daemon as start

    return _starter(workdir, _started[0], lambda tmp, kind, *options, **kwargs: start(kind, tmp, *options, **kwargs))


@pytest.fixture(scope="session")
def tls_certs(tmp_path_factory):
    """X.509 credentials in qemu's layout (tests/tls_certs.py), built once per test session (per xdist worker)."""
    from tests.tls_certs import make_credentials

    return make_credentials(tmp_path_factory.mktemp("tls"))


def _fail_skips_under_ci(report) -> None:
    """Under CI (CI=true) every tool is installed by scripts/setup: a skip there means a missing
    tool or package, which must fail the run rather than pass it quietly."""
    if os.environ.get("CI") and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI (scripts/setup should have installed what is missing): {report.longrepr}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_skips_under_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_skips_under_ci(outcome.get_result())
