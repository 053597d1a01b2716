"""An in-memory network of framed connections, with faults on demand.

For the protocol's own tests and for ``p2p.testing``: many nodes in one process, no
sockets, and a network that can cut, delay, drop, duplicate and reorder frames
(``Faults``). Time is trio's, so a ``trio.testing.MockClock`` makes delays virtual.
Loss, duplication and reordering are applied to frames of a stream, as a broken
middlebox would: the session protocol detects them (its box nonces are sequence numbers)
and closes the connection; the node reconnects and state vectors repair the gap.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Final

import trio

from p2p.errors import FrameTooLarge
from p2p.proto.wire import MAX_FRAME
from p2p.transport.base import ConnectionClosed, Handler, TransportError

QUEUE_FRAMES: Final = 256
"""Frames buffered per direction: a full queue blocks the sender (back-pressure)."""


@dataclass
class Faults:
    """What the network does to frames; all probabilities per frame."""

    drop: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    delay: float = 0.0
    """Extra latency per frame, in seconds (trio time)."""


@dataclass
class MemoryNetwork:
    """A switch joining :class:`MemoryTransport`s by name."""

    seed: int = 0
    faults: Faults = field(default_factory=Faults)
    _listeners: dict[str, Handler] = field(default_factory=dict)
    _nurseries: dict[str, trio.Nursery] = field(default_factory=dict)
    _groups: dict[str, int] | None = None
    _links: list[tuple[str, str, MemoryConnection, MemoryConnection]] = field(default_factory=list)
    frames: int = 0
    bytes: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def transport(self, name: str) -> MemoryTransport:
        return MemoryTransport(self, name)

    def partition(self, *groups: set[str] | frozenset[str] | list[str]) -> None:
        """Split the network: only nodes in the same group reach each other.

        Existing connections across groups are cut. Nodes not named form their own group.
        """
        self._groups = {name: i for i, g in enumerate(groups) for name in g}
        for a, b, ca, cb in list(self._links):
            if not self.reachable(a, b):
                ca.break_link()
                cb.break_link()

    def heal(self) -> None:
        """Everyone reaches everyone again (and faults stop)."""
        self._groups = None
        self.faults = Faults()

    def reachable(self, a: str, b: str) -> bool:
        if self._groups is None:
            return True
        return self._groups.get(a, -1 - hash(a) % 10**6) == self._groups.get(
            b, -1 - hash(b) % 10**6
        )

    async def _connect(self, source: str, target: str) -> MemoryConnection:
        handler = self._listeners.get(target)
        nursery = self._nurseries.get(target)
        if handler is None or nursery is None:
            raise TransportError(f"nothing listens at {target}")
        if not self.reachable(source, target):
            raise TransportError(f"{target} is unreachable from {source}")
        a_to_b_send, a_to_b_recv = trio.open_memory_channel[bytes](QUEUE_FRAMES)
        b_to_a_send, b_to_a_recv = trio.open_memory_channel[bytes](QUEUE_FRAMES)
        ours = MemoryConnection(self, target, a_to_b_send, b_to_a_recv)
        theirs = MemoryConnection(self, source, b_to_a_send, a_to_b_recv)
        self._links.append((source, target, ours, theirs))
        nursery.start_soon(handler, theirs)
        return ours


class MemoryConnection:
    """One end of an in-memory connection."""

    def __init__(
        self,
        network: MemoryNetwork,
        remote: str,
        outgoing: trio.MemorySendChannel[bytes],
        incoming: trio.MemoryReceiveChannel[bytes],
    ) -> None:
        self._network = network
        self._remote = remote
        self._out = outgoing
        self._in = incoming
        self._held: bytes | None = None

    @property
    def remote(self) -> str:
        return self._remote

    async def send(self, frame: bytes) -> None:
        net = self._network
        faults = net.faults
        if faults.delay:
            await trio.sleep(faults.delay)
        net.frames += 1
        net.bytes += len(frame)
        copies = [frame]
        if faults.drop and net.rng.random() < faults.drop:
            copies = []
        elif faults.duplicate and net.rng.random() < faults.duplicate:
            copies = [frame, frame]
        if faults.reorder and net.rng.random() < faults.reorder and self._held is None:
            self._held = frame
            return
        if self._held is not None:
            copies.append(self._held)
            self._held = None
        try:
            for c in copies:
                await self._out.send(c)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionClosed(f"connection to {self._remote} is closed") from exc

    async def receive(self, limit: int = MAX_FRAME) -> bytes:
        try:
            frame = await self._in.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError, trio.BrokenResourceError) as exc:
            raise ConnectionClosed(f"connection to {self._remote} is closed") from exc
        if len(frame) > limit:
            raise FrameTooLarge(len(frame), limit)
        return frame

    def break_link(self) -> None:
        self._out.close()
        self._in.close()

    async def aclose(self) -> None:
        self.break_link()


class MemoryTransport:
    """A node's port on a :class:`MemoryNetwork`; its address is its name."""

    def __init__(self, network: MemoryNetwork, name: str) -> None:
        self._network = network
        self._name = name

    @property
    def address(self) -> str:
        return self._name

    async def serve(
        self, handler: Handler, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with trio.open_nursery() as nursery:
            self._network._listeners[self._name] = handler
            self._network._nurseries[self._name] = nursery
            try:
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._network._listeners.pop(self._name, None)
                self._network._nurseries.pop(self._name, None)
                for a, b, ca, cb in self._network._links:
                    if self._name in (a, b):
                        ca.break_link()
                        cb.break_link()
                nursery.cancel_scope.cancel()

    async def dial(self, address: str) -> MemoryConnection:
        return await self._network._connect(self._name, address)
