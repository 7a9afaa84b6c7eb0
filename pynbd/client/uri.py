"""NBD URIs (NetworkBlockDevice/nbd doc/uri.md): ``nbd[s][+unix]://[host[:port]]/export?query``."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit

from pynbd.protocol.constants import DEFAULT_PORT

log = logging.getLogger(__name__)

SCHEMES = {
    "nbd": ("tcp", False),
    "nbd+tcp": ("tcp", False),  # qemu's spelling
    "nbds": ("tcp", True),
    "nbd+unix": ("unix", False),
    "nbds+unix": ("unix", True),
}
KNOWN_QUERIES = {"socket", "tls-certificates", "tls-verify-peer", "tls-hostname", "tls-type", "tls-psk-file"}


class URIError(ValueError):
    pass


@dataclass(frozen=True)
class NBDURI:
    transport: str  # "tcp" or "unix"
    export: str = ""
    host: str = "localhost"
    port: int = DEFAULT_PORT
    socket_path: str | None = None
    tls: bool = False  # nbds: TLS is mandatory
    tls_certificates: str | None = None
    tls_verify_peer: bool = True
    tls_hostname: str | None = None

    def __str__(self) -> str:
        return format_uri(self)


def _bool(value: str, name: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise URIError(f"URI query {name}={value!r} is not a boolean")


def is_nbd_uri(text: str) -> bool:
    return text.split("://", 1)[0].lower() in SCHEMES and "://" in text


def parse_uri(text: str) -> NBDURI:
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        if scheme in ("nbd+vsock", "nbds+vsock"):
            raise URIError("vsock NBD URIs are not supported")
        raise URIError(f"not an NBD URI: {text!r} (expected nbd://, nbds://, nbd+unix:// or nbds+unix://)")
    transport, tls = SCHEMES[scheme]
    path = parts.path
    export = unquote(path[1:] if path.startswith("/") else path, errors="strict")
    query: dict[str, str] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key not in KNOWN_QUERIES and not key.startswith("x-"):
            log.warning("ignoring unknown NBD URI query %r", key)
        query[key] = value
    if "tls-psk-file" in query or parts.username:
        raise URIError("TLS-PSK is not supported (Python's ssl module has no PSK support before 3.13)")
    if query.get("tls-type", "x509") not in ("x509", "anon"):
        raise URIError(f"unsupported tls-type {query['tls-type']!r}")
    common = functools.partial(
        NBDURI,
        export=export,
        tls=tls,
        tls_certificates=query.get("tls-certificates") or None,
        tls_verify_peer=_bool(query["tls-verify-peer"], "tls-verify-peer") if "tls-verify-peer" in query else True,
        tls_hostname=query.get("tls-hostname") or None,
    )
    if transport == "unix":
        socket_path = query.get("socket")
        if not socket_path:
            raise URIError(f"{scheme}:// URI needs ?socket=PATH")
        if parts.netloc:
            raise URIError(f"{scheme}:// URI must not name a host")
        return common("unix", socket_path=socket_path)
    if "socket" in query:
        raise URIError(f"{scheme}:// URI cannot take ?socket= (use {scheme.split('+')[0]}+unix://)")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError as exc:
        raise URIError(f"bad port in {text!r}: {exc}") from None
    return common("tcp", host=parts.hostname or "localhost", port=port)


def format_uri(uri: NBDURI) -> str:
    """The canonical URI text (export name percent-encoded)."""
    from urllib.parse import quote, urlencode

    scheme = "nbds" if uri.tls else "nbd"
    query = {}
    if uri.transport == "unix":
        scheme += "+unix"
        query["socket"] = uri.socket_path
        authority = ""
    else:
        host = f"[{uri.host}]" if ":" in uri.host else uri.host
        authority = host if uri.port == DEFAULT_PORT else f"{host}:{uri.port}"
    if uri.tls_certificates:
        query["tls-certificates"] = uri.tls_certificates
    if not uri.tls_verify_peer:
        query["tls-verify-peer"] = "false"
    text = f"{scheme}://{authority}/{quote(uri.export, safe='')}"
    return text + ("?" + urlencode(query, safe="/") if query else "")
