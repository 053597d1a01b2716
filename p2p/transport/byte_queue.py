"""A FIFO of byte strings bounded by total size, for back-pressure between tasks.

trio's memory channels bound the number of items; the relay's items range from a 10-byte
control message to a 2 MiB chunk, so a count says little about memory. This queue admits
an item while the bytes queued are under ``limit`` (so one item larger than the limit
still passes when the queue is empty: a queue never deadlocks on one big item), and makes
the putter wait otherwise. Control messages that must not wait (a presence change told to
a watcher, a pipe closed by the other end) use :meth:`put_nowait`, which ignores the byte
limit but not a hard cap on the number of items: past it, the caller learns the consumer
is hopelessly slow and disconnects it.
"""

from __future__ import annotations

from collections import deque
from typing import Final

import trio

HARD_ITEMS: Final = 4096


class QueueClosed(Exception):
    """The queue was closed and everything put before is gone (internal signal)."""


class ByteQueue:
    """Bytes in, bytes out, in order; the consumer's slowness is felt by the producer."""

    def __init__(self, limit: int, *, hard_items: int = HARD_ITEMS) -> None:
        self.limit = limit
        self.hard_items = hard_items
        self._items: deque[bytes | BaseException] = deque()
        self._bytes = 0
        self._closed = False
        self._getters = trio.lowlevel.ParkingLot()
        self._putters = trio.lowlevel.ParkingLot()

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        return len(self._items)

    async def put(self, item: bytes) -> bool:
        """Queue ``item``, waiting while the queue is full; False if the queue is closed."""
        while not self._closed and self._items and self._bytes >= self.limit:
            await self._putters.park()
        if self._closed:
            await trio.lowlevel.checkpoint()
            return False
        self._append(item)
        await trio.lowlevel.cancel_shielded_checkpoint()
        return True

    def put_nowait(self, item: bytes) -> bool:
        """Queue ``item`` past the byte limit; False if closed or past the item cap."""
        if self._closed or len(self._items) >= self.hard_items:
            return False
        self._append(item)
        return True

    def _append(self, item: bytes | BaseException) -> None:
        self._items.append(item)
        if isinstance(item, bytes):
            self._bytes += len(item)
        self._getters.unpark()

    async def get(self) -> bytes:
        """The next item; raises :class:`QueueClosed` once closed and drained, or the
        error given to :meth:`close` in its place."""
        while not self._items:
            if self._closed:
                raise QueueClosed
            await self._getters.park()
        item = self._items.popleft()
        if isinstance(item, BaseException):
            self._items.appendleft(item)  # every later get raises it too
            raise item
        self._bytes -= len(item)
        self._putters.unpark_all()
        await trio.lowlevel.cancel_shielded_checkpoint()
        return item

    def close(self, error: BaseException | None = None) -> None:
        """No more puts. Items already queued can still be got; then ``error`` (if
        given) is raised by every get, else :class:`QueueClosed`."""
        if self._closed:
            return
        self._closed = True
        if error is not None:
            self._items.append(error)
        self._getters.unpark_all()
        self._putters.unpark_all()

    def abort(self) -> None:
        """Close and drop whatever is queued (the consumer is gone)."""
        self.close()
        self._items.clear()
        self._bytes = 0
