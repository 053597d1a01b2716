"""The discovery interface: where might a linked device be reachable?

Adapters (static peers, mDNS, later the relay's rendezvous) run as tasks that report
:class:`Found` items into one channel; the node merges them and dials what it does not
already have a session with. Each item says where it came from, so ``p2p status`` can
show how a peer was found (iroh's discovery does the same).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import trio

Source = Literal["static", "mdns", "relay", "contact"]


@dataclass(frozen=True, kw_only=True)
class Found:
    """A candidate address for a device."""

    address: str
    """``host:port`` to dial with the TCP transport."""
    source: Source
    device: str | None = None
    """The device id, when the adapter could tell (mDNS can, static peers cannot)."""


class Discovery(Protocol):
    """Publishes this device (where that makes sense) and reports candidates."""

    async def run(
        self,
        found: trio.MemorySendChannel[Found],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Report candidates into ``found`` until cancelled; started once published."""
        ...


class StaticPeers:
    """Addresses given by hand (``--peer HOST:PORT``), for networks without multicast."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = list(addresses)

    async def run(
        self,
        found: trio.MemorySendChannel[Found],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        task_status.started()
        for address in self.addresses:
            await found.send(Found(address=address, source="static"))
        await trio.sleep_forever()
