"""Delivery receipts: this device says which messages of a chat it holds.

It owns the set of chats that received messages since its last round. Rules it keeps:

- **One receipt per burst.** After messages arrive in a chat it waits ``RECEIPT_DELAY``,
  then writes one receipt entry for each such chat (per author device, the newest
  ``ts`` it holds), and only if that differs from the receipt it last wrote there.
- **Receipts never cause receipts**: they are about messages only, and a receipt is
  written only for chats that received envelopes from others.
- Nothing is written for a chat set aside meanwhile, nor by a node closed or removed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from p2p.errors import ChatCorrupt
from p2p.proto.model import RECEIPTS, Entry
from p2p.state.device import DeviceState

RECEIPT_DELAY: Final = 1.0
"""Seconds a device waits after new messages before it writes its delivery receipt for
the chat: a burst of messages costs one receipt per device, not one per message."""


class Receipts:
    """Writes this device's delivery receipts; see the module docstring."""

    def __init__(
        self,
        state: DeviceState,
        *,
        write: Callable[[str, str], Awaitable[object]],
        may_write: Callable[[], bool],
    ) -> None:
        self._state = state
        self._write = write
        """Writes our receipt entry (space id, body), durable when it returns."""
        self._may_write = may_write
        self._due: set[str] = set()
        self._wakeup = trio.Event()

    def received(self, space_id: str) -> None:
        """Messages of others arrived in a chat: a receipt is due there."""
        self._due.add(space_id)
        self._wakeup.set()

    async def run(self) -> None:
        while True:
            await self._wakeup.wait()
            await trio.sleep(RECEIPT_DELAY)
            self._wakeup = trio.Event()
            due, self._due = self._due, set()
            for space_id in sorted(due):
                if space_id not in self._state.spaces:
                    continue  # set aside meanwhile (a corrupt chat)
                body = self._state.receipt_body(space_id)
                if body and body != self._stated(space_id) and self._may_write():
                    with contextlib.suppress(ChatCorrupt):
                        await self._write(space_id, body)

    def _stated(self, space_id: str) -> str:
        replica = self._state.space(space_id).replica
        values = replica.side_values(RECEIPTS)  # without the document when known
        if values is not None:
            ours = Entry.from_value(values.get(self._state.device_id))
            return ours.body if ours is not None else ""
        entries = replica.entries(RECEIPTS)
        return next((e.body for k, e in entries if e and k == self._state.device_id), "")
