"""The pynbd NBD client: an asyncio library (with a blocking facade in :mod:`pynbd.client.sync`).

import asyncio
from pynbd.client import connect

async def main():
    async with await connect("nbd://localhost/disk", meta_contexts=["base:allocation"]) as client:
        extents = await client.map_extents(["base:allocation"])
        data = await client.pread(65536, 0)

asyncio.run(main())
"""

from pynbd.client.client import Client, Extent, connect
from pynbd.client.errors import NBDConnectionError, NBDError, OptionError, ProtocolViolation
from pynbd.client.pool import ClientPool, connect_pool
from pynbd.client.uri import NBDURI, URIError, format_uri, parse_uri

__all__ = [
    "NBDURI",
    "Client",
    "ClientPool",
    "Extent",
    "NBDConnectionError",
    "NBDError",
    "OptionError",
    "ProtocolViolation",
    "URIError",
    "connect",
    "connect_pool",
    "format_uri",
    "parse_uri",
]
