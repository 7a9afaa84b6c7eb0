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


def _servers(workdir, launch):
    """A fixture body: a starter for servers of one kind, every one stopped after the test."""
    servers = []

    def start(*args, **kwargs):
        server = launch(workdir, *args, **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def start_pynbd(workdir):
    yield from _servers(workdir, pynbd_server)


@pytest.fixture
def start_qemu_nbd(workdir):
    yield from _servers(workdir, qemu_nbd_server)


@pytest.fixture
def start_nbdkit(workdir):
    yield from _servers(workdir, nbdkit_server)


@pytest.fixture
def start_daemon(workdir):
    """Start ``pynbd daemon`` or ``qemu-storage-daemon`` (kind "pynbd" or "qsd"); stopped after the test."""
    from tests.daemons import start_daemon as start

    yield from _servers(workdir, lambda tmp, kind, *options, **kwargs: start(kind, tmp, *options, **kwargs))


@pytest.fixture(scope="session")
def tls_certs(tmp_path_factory):
    """X.509 credentials in qemu's layout (tests/tls_certs.py), built once per test session (per xdist worker)."""
    from tests.tls_certs import make_credentials

    return make_credentials(tmp_path_factory.mktemp("tls"))
