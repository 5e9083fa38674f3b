"""What the gateway's connections share: one read buffer for all of them, and the shape of a
request's handler (the function that answers it) and of its body (the pieces it was read into).

The client side (:mod:`~pipeline.gateway.client`) and the upstream side
(:mod:`~pipeline.gateway.upstream`) both read through :class:`Reader`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from pipeline.gateway.wire import ModelScanner, RequestHead

if TYPE_CHECKING:
    from pipeline.gateway.client import ClientConn

# Bodies are kept in a few large pieces (wire.BodyCollector), and forwarded as such.
Body = list[bytes] | None
Handler = Callable[["ClientConn", RequestHead, Body, ModelScanner | None], None]


# One read buffer for every connection of the process. With a plain Protocol, asyncio's recv
# allocates a fresh 256 KiB bytes per read (mmap, mremap, munmap: three syscalls for each
# streamed chunk); a BufferedProtocol reads into memory it is given. Sharing one buffer is
# safe because the event loop calls get_buffer() and buffer_updated() back to back for one
# read, on one thread, and buffer_updated() copies the bytes out before returning.
_READ_SIZE = 256 * 1024
_READ_VIEW = memoryview(bytearray(_READ_SIZE))


class Reader(asyncio.BufferedProtocol):
    """Reads through the shared buffer and hands each read to :meth:`data_received`."""

    __slots__ = ()
    # Each connection class (upstream, client) defines how it consumes what was read.
    data_received: Callable[[bytes], None]

    def get_buffer(self, sizehint: int) -> memoryview:
        return _READ_VIEW

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(_READ_VIEW[:nbytes].tobytes())
