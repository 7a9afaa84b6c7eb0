"""TLS contexts from credential directories in the qemu/libvirt layout.

A server directory holds ``ca-cert.pem``, ``server-cert.pem`` and ``server-key.pem``; a client
directory ``ca-cert.pem`` and optionally ``client-cert.pem`` and ``client-key.pem``.
"""

from __future__ import annotations

import os
import ssl


class TLSConfigError(Exception):
    pass


def _need(directory: str, name: str) -> str:
    path = os.path.join(directory, name)
    if not os.path.exists(path):
        raise TLSConfigError(f"TLS credentials: {path} is missing")
    return path


def server_context(directory: str, verify_peer: bool = False) -> ssl.SSLContext:
    """Context for the server end; ``verify_peer`` demands a client certificate signed by the CA."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(_need(directory, "server-cert.pem"), _need(directory, "server-key.pem"))
    except ssl.SSLError as exc:
        raise TLSConfigError(f"TLS credentials in {directory}: {exc}") from exc
    ca = os.path.join(directory, "ca-cert.pem")
    if verify_peer:
        context.load_verify_locations(_need(directory, "ca-cert.pem"))
        context.verify_mode = ssl.CERT_REQUIRED
    elif os.path.exists(ca):
        context.load_verify_locations(ca)
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def client_context(directory: str | None, verify_server: bool = True) -> ssl.SSLContext:
    """Context for the client end; the server certificate is checked against ``ca-cert.pem``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if directory:
        ca = os.path.join(directory, "ca-cert.pem")
        if os.path.exists(ca):
            context.load_verify_locations(ca)
        cert, key = os.path.join(directory, "client-cert.pem"), os.path.join(directory, "client-key.pem")
        if os.path.exists(cert) and os.path.exists(key):
            context.load_cert_chain(cert, key)
    else:
        context.load_default_certs()
    if not verify_server:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
