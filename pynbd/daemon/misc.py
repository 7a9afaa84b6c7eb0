"""query-version, query-commands, quit and transaction."""

from __future__ import annotations

from pynbd.daemon.core import PACKAGE, VERSION, Daemon
from pynbd.daemon.registry import ACTIONS, COMMANDS, action, command
from pynbd.graph.transaction import Transaction
from pynbd.qmp.protocol import QMPError
from pynbd.qmp.schema import check


@command("query-version", {})
async def query_version(daemon: Daemon, args: dict) -> dict:
    major, minor, micro = VERSION
    return {"qemu": {"micro": micro, "minor": minor, "major": major}, "package": PACKAGE}


@command("query-commands", {})
async def query_commands(daemon: Daemon, args: dict) -> list:
    return [{"name": name} for name in sorted([*COMMANDS, "qmp_capabilities"])]


@command("quit", {})
async def quit_(daemon: Daemon, args: dict) -> None:
    daemon.quit.set()


@command(
    "transaction",
    {"actions": [{"type": "str", "*data": "any"}], "*properties": {"*completion-mode": ("individual", "grouped")}},
)
async def transaction(daemon: Daemon, args: dict) -> None:
    """Every action prepares inside one graph transaction; if any fails, all are undone, including
    the jobs the actions created (registered while preparing, started only after the commit)."""
    if args.get("properties", {}).get("completion-mode", "individual") != "individual":
        raise QMPError("Transaction property completion-mode = grouped is not supported: jobs complete individually")
    prepared = []
    for index, item in enumerate(args["actions"]):
        action = ACTIONS.get(item["type"])
        if action is None:
            raise QMPError(f"Parameter 'actions[{index}].type' does not accept value '{item['type']}'")
        data = item.get("data", {})
        if action.spec is not None:
            data = check(action.spec, data, f"actions[{index}].data")
        prepared.append((action, data))
    tran = Transaction()
    after_commit = []
    try:
        for action, data in prepared:
            follow_up = await action.handler(daemon, data, tran)
            if follow_up is not None:
                after_commit.append(follow_up)
    except BaseException:
        tran.abort()
        raise
    tran.commit()
    for follow_up in after_commit:
        await follow_up()


@action("abort", {})
async def abort_action(daemon: Daemon, data: dict, tran: Transaction) -> None:
    """qemu's test action: makes the whole transaction fail."""
    raise QMPError("Transaction aborted using Abort action")
