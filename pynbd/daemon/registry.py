"""The table of QMP commands and transaction actions the daemon implements.

Each command module registers its handlers here with their argument spec, so ``query-commands``,
argument checking and dispatch all read the same table.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pynbd.qmp.schema import Spec

if TYPE_CHECKING:
    from pynbd.daemon.core import Daemon
    from pynbd.graph.transaction import Transaction

Handler = Callable[["Daemon", dict], Awaitable[Any]]
# A transaction action prepares its change inside the transaction (registering undo steps);
# it may return a coroutine function to run once the whole transaction has committed.
ActionHandler = Callable[["Daemon", dict, "Transaction"], Awaitable[Any]]


@dataclass
class Command:
    name: str
    spec: Spec | None  # None: the handler checks its own arguments (flat unions)
    handler: Handler
    #: runs with the whole graph drained (pynbd.graph.io.drained): it edits the graph
    drained: bool = False


#: The commands that change the graph, besides the transaction actions' own commands. They run
#: drained: no request is in flight anywhere while they edit, and exports' new requests wait.
#: (block-export-del drains itself, after its clients are gone: they may have requests queued.
#: blockdev-add and block-export-add only give existing nodes new parents, which moves no request
#: in flight, so they do not stop the graph while they open files or connect to remote servers.)
GRAPH_COMMANDS = frozenset(
    {
        "blockdev-del",
        "blockdev-reopen",
        "transaction",
        "block-commit",
        "block-stream",
        "blockdev-mirror",
        "x-copy-on-read-release",
    }
)


@dataclass
class Action:
    name: str
    spec: Spec | None
    handler: ActionHandler


COMMANDS: dict[str, Command] = {}
ACTIONS: dict[str, Action] = {}


def command(name: str, spec: Spec | None = None):
    def register(handler: Handler) -> Handler:
        COMMANDS[name] = Command(name, spec, handler, drained=name in GRAPH_COMMANDS)
        return handler

    return register


def action(name: str, spec: Spec | None = None):
    def register(handler: ActionHandler) -> ActionHandler:
        ACTIONS[name] = Action(name, spec, handler)
        return handler

    return register


def command_from_action(name: str) -> None:
    """Register the standalone QMP command of a transaction action: a transaction of one."""
    from pynbd.graph.transaction import Transaction

    entry = ACTIONS[name]

    async def run(daemon: Daemon, args: dict) -> None:
        tran = Transaction()
        try:
            follow_up = await entry.handler(daemon, args, tran)
        except BaseException:
            tran.abort()
            raise
        tran.commit()
        if follow_up is not None:
            await follow_up()

    COMMANDS[name] = Command(name, entry.spec, run, drained=True)
