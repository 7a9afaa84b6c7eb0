"""docs/qmp.md documents every QMP command, transaction action and block driver the daemon
registers, each command with an example request, and nothing that does not exist."""

from __future__ import annotations

import re
from pathlib import Path

from pynbd.daemon import load_commands
from pynbd.daemon.blockdev import DRIVERS
from pynbd.daemon.registry import ACTIONS, COMMANDS

DOC = (Path(__file__).parent.parent / "docs" / "qmp.md").read_text()


def sections() -> dict[str, str]:
    """Command name -> its section text, from the '### `name`' headings."""
    parts = re.split(r"(?m)^### `([^`]+)`\n", DOC)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_every_command_has_a_section_with_an_example():
    load_commands()
    documented = sections()
    missing = sorted(set(COMMANDS) - set(documented))
    assert not missing, f"commands missing from docs/qmp.md: {missing}"
    for name in COMMANDS:
        assert f'-> {{"execute": "{name}"' in documented[name], f"docs/qmp.md: no example request for {name}"
        assert "\n<- {" in documented[name], f"docs/qmp.md: no example reply for {name}"


def test_no_section_for_a_command_that_does_not_exist():
    load_commands()
    stale = sorted(set(sections()) - set(COMMANDS))
    assert not stale, f"docs/qmp.md documents commands the daemon does not have: {stale}"


def test_every_transaction_action_and_driver_is_listed():
    load_commands()
    assert not [a for a in ACTIONS if f'"type": "{a}"' not in DOC], "transaction actions missing from docs/qmp.md"
    assert not [d for d in DRIVERS if f'"driver": "{d}"' not in DOC], "blockdev-add drivers missing from docs/qmp.md"
