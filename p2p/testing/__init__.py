"""An in-memory cluster of nodes, for convergence tests (ours and app developers').

::

    async with p2p.testing.cluster(3) as c:       # phone + 2 companions, one account
        await c.nodes[1].send("hi")
        c.partition({0}, {1, 2})                    # the phone is cut off
        await c.stop(0)                             # ... or switched off
        await c.start(0)
        c.heal()
        await c.settle()                            # every replica level, or TimeoutError
        assert c.digests() == {c.digest(0)}

Nodes are real :class:`~p2p.runtime.node.Node` objects with in-memory stores and the in-memory
transport (``p2p.transport.memory``), so faults (drop, duplicate, reorder, delay) hit
the real session code. Run under ``trio.testing.MockClock(autojump_threshold=0)`` for
virtual time: timestamps follow trio's clock (:meth:`Cluster.wall_ms`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final

import trio

from p2p.media.store import BlobStore
from p2p.proto.identity import DeviceKeys
from p2p.proto.model import Message
from p2p.runtime.home import create_store
from p2p.runtime.node import Node, open_node
from p2p.state.device import DeviceState
from p2p.storage.base import Store
from p2p.storage.memory import MemoryStore
from p2p.transport.memory import Faults, MemoryNetwork

DEVICE_NAMES: Final = ("phone", "laptop", "desktop", "tablet", "web")
EPOCH_MS: Final = 1_767_225_600_000
"""Virtual wall time at trio time 0 (2026-01-01)."""


def provision_account(n: int) -> list[MemoryStore]:
    """In-memory stores of one account with ``n`` devices: index 0 is the primary.

    Linking over the network comes with ``p2p link``; this does the same in memory.
    """
    stores = [MemoryStore() for _ in range(n)]
    _provision(stores)
    return stores


def provision_homes(homes: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Create one account across real homes (index 0 the primary); device ids by index.

    For tests that run ``p2p run`` processes before linking is used to set them up.
    """
    stores = []
    for home in homes:
        Path(home).mkdir(parents=True, exist_ok=True, mode=0o700)
        stores.append(create_store(home))
    try:
        return _provision(stores)
    finally:
        for store in stores:
            store.close()


def _provision(stores: Sequence[Store]) -> list[str]:
    if not 1 <= len(stores) <= len(DEVICE_NAMES):
        raise ValueError(f"an account has 1 to {len(DEVICE_NAMES)} devices")
    primary, batch = DeviceState.create_account(DEVICE_NAMES[0])
    stores[0].write(batch)
    ids = [primary.device_id]
    for name, store in zip(DEVICE_NAMES[1:], stores[1:], strict=False):
        keys = DeviceKeys.generate()
        bundle, primary_batch = primary.enroll(keys, name)
        stores[0].write(primary_batch)
        companion, companion_batch = DeviceState.from_enrollment(keys, name, bundle)
        store.write(companion_batch)
        ids.append(companion.device_id)
    return ids


def digest(messages: list[Message]) -> str:
    """A short hash of a message list, equal on replicas showing the same history."""
    data = json.dumps([m.to_json() for m in messages], sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()[:16]


class Cluster:
    """Nodes of one account on one in-memory network; see the module docstring."""

    def __init__(
        self, nursery: trio.Nursery, stores: list[MemoryStore], seed: int, *, receipts: bool = True
    ) -> None:
        self.receipts = receipts
        self.network = MemoryNetwork(seed=seed)
        self.stores = stores
        self.names = [DEVICE_NAMES[i] for i in range(len(stores))]
        self._nursery = nursery
        self._nodes: list[Node | None] = [None] * len(stores)
        self._scopes: list[trio.CancelScope | None] = [None] * len(stores)
        self._stopped: list[trio.Event] = [trio.Event() for _ in stores]
        self.blobs = [BlobStore(None) for _ in stores]
        """Each device's attachment chunks (p2p.media), kept across stop and start."""

    @staticmethod
    def wall_ms() -> int:
        """Wall-clock milliseconds that follow trio's (possibly virtual) clock."""
        return EPOCH_MS + int(trio.current_time() * 1000)

    @property
    def nodes(self) -> list[Node]:
        """Running nodes by index (raises if one is stopped: use :meth:`node`)."""
        return [self.node(i) for i in range(len(self._nodes))]

    def node(self, index: int) -> Node:
        node = self._nodes[index]
        if node is None:
            raise RuntimeError(f"node {index} ({self.names[index]}) is stopped")
        return node

    def running(self) -> list[int]:
        return [i for i, n in enumerate(self._nodes) if n is not None]

    async def start(self, index: int) -> Node:
        """Start (or restart) node ``index`` on its store; it dials the nodes before it."""
        if self._nodes[index] is not None:
            raise RuntimeError(f"node {index} is already running")
        await self._nursery.start(self._run, index)
        return self.node(index)

    async def stop(self, index: int) -> None:
        """Switch node ``index`` off (its store stays, like a phone in a drawer)."""
        scope = self._scopes[index]
        if scope is None:
            return
        scope.cancel()
        await self._stopped[index].wait()

    async def _run(self, index: int, *, task_status: trio.TaskStatus[None]) -> None:
        self._stopped[index] = trio.Event()
        try:
            with trio.CancelScope() as scope:
                self._scopes[index] = scope
                async with open_node(
                    store=self.stores[index],
                    transport=self.network.transport(self.names[index]),
                    peers=self.names[:index],
                    wall_ms=self.wall_ms,
                    receipts=self.receipts,
                    blobs=self.blobs[index],
                ) as node:
                    self._nodes[index] = node
                    task_status.started()
                    await trio.sleep_forever()
        finally:
            self._nodes[index] = None
            self._scopes[index] = None
            self._stopped[index].set()

    # ---- network conditions --------------------------------------------------------

    def partition(self, *groups: set[int]) -> None:
        """Only nodes in the same group reach each other; connections across are cut."""
        self.network.partition(*({self.names[i] for i in g} for g in groups))

    def heal(self) -> None:
        """Remove partitions and faults."""
        self.network.heal()

    def set_faults(
        self, *, drop: float = 0.0, duplicate: float = 0.0, reorder: float = 0.0, delay: float = 0.0
    ) -> None:
        """Per-frame probabilities of loss, duplication, reordering; latency in seconds."""
        self.network.faults = Faults(drop=drop, duplicate=duplicate, reorder=reorder, delay=delay)

    # ---- convergence ---------------------------------------------------------------

    def digest(self, index: int, chat: str | None = None) -> str:
        return digest(self.node(index).messages(chat))

    def digests(self, chat: str | None = None) -> set[str]:
        """Digests of every running node: one element when they are level."""
        return {self.digest(i, chat) for i in self.running()}

    def level(self) -> bool:
        """True when every running node shows the same history in every chat."""
        chats = [c.id for c in self.node(self.running()[0]).chats()]
        return all(len(self.digests(chat)) == 1 for chat in chats)

    async def settle(self, timeout: float = 120.0, poll: float = 0.05) -> float:  # noqa: ASYNC109
        """Wait until :meth:`level`; return the time it took (TimeoutError if never).

        Polls: being level is a property of several nodes together, not an event of one.
        """
        start = trio.current_time()
        with trio.fail_after(timeout):
            while not self.level():  # noqa: ASYNC110
                await trio.sleep(poll)
        return trio.current_time() - start


@asynccontextmanager
async def cluster(n: int = 3, *, seed: int = 0, receipts: bool = True) -> AsyncIterator[Cluster]:
    """``n`` running nodes of one account (index 0 the primary) on a fresh network
    (``receipts``: whether they write delivery receipts, see ``open_node``)."""
    stores = provision_account(n)
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, stores, seed, receipts=receipts)
        for i in range(n):
            await c.start(i)
        try:
            yield c
        finally:
            for i in c.running():
                await c.stop(i)
            for blobs in c.blobs:  # ours, kept across stops: no node closes them
                blobs.close()
