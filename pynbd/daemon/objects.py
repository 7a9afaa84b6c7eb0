"""QOM objects the daemon understands: ``tls-creds-x509`` (object-add / object-del / --object)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from pynbd.daemon.core import Daemon
from pynbd.daemon.registry import command
from pynbd.qmp.protocol import QMPError
from pynbd.qmp.schema import check
from pynbd.tls import TLSConfigError, client_context, server_context

#: Why iothread options and objects are refused rather than accepted and ignored: every request
#: runs in the daemon's one event loop (no multiqueue yet), so there is nothing to put an export in.
NO_IOTHREADS = "pynbd has no iothreads, every export and node runs in the daemon's main loop"

TLS_X509_SPEC = {
    "qom-type": "str",
    "id": "str",
    "*dir": "str",
    "*endpoint": ("server", "client"),
    "*verify-peer": "bool",
    "*priority": "str",
    "*sanity-check": "bool",
    "*passwordid": "str",
    "*loaded": "bool",
}


@dataclass
class TLSCredsX509:
    id: str
    dir: str
    endpoint: str
    verify_peer: bool
    users: int = 0

    def context(self) -> ssl.SSLContext:
        try:
            if self.endpoint == "server":
                return server_context(self.dir, verify_peer=self.verify_peer)
            return client_context(self.dir, verify_server=self.verify_peer)
        except (TLSConfigError, ssl.SSLError, OSError) as exc:
            raise QMPError(f"TLS credentials '{self.id}': {exc}") from None


@command("object-add")
async def object_add(daemon: Daemon, args: dict, keyval: bool = False) -> None:
    kind = args.get("qom-type")
    if kind == "iothread":
        raise QMPError(f"Object type 'iothread' is not supported: {NO_IOTHREADS}")
    if kind != "tls-creds-x509":
        raise QMPError("Invalid parameter 'qom-type'" if kind is None else f"Object type '{kind}' is not supported")
    options = check(TLS_X509_SPEC, args, keyval=keyval)
    object_id = options["id"]
    if object_id in daemon.objects:
        raise QMPError(f"attempt to add duplicate property '{object_id}' to object (type 'container')")
    creds = TLSCredsX509(
        object_id,
        options.get("dir", "/etc/pki/qemu"),
        options.get("endpoint", "client"),
        options.get("verify-peer", True),
    )
    creds.context()  # fail now, not when a client connects
    daemon.objects[object_id] = creds


@command("object-del", {"id": "str"})
async def object_del(daemon: Daemon, args: dict) -> None:
    obj = daemon.objects.get(args["id"])
    if obj is None:
        raise QMPError(f"object '{args['id']}' not found")
    if obj.users:
        raise QMPError(f"object '{args['id']}' is in use, can not be deleted")
    del daemon.objects[args["id"]]


def tls_creds(daemon: Daemon, object_id: str, endpoint: str) -> TLSCredsX509:
    creds = daemon.objects.get(object_id)
    if not isinstance(creds, TLSCredsX509):
        raise QMPError(f"No TLS credentials with id '{object_id}'")
    if creds.endpoint != endpoint:
        raise QMPError(f"Expecting TLS credentials with a {endpoint} endpoint")
    return creds


def tls_server_context(daemon: Daemon, object_id: str) -> ssl.SSLContext:
    return tls_creds(daemon, object_id, "server").context()
