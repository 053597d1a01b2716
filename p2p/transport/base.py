"""The transport interface: framed, ordered, reliable byte pipes between devices.

A transport carries whole frames (the sync protocol's unit); it knows nothing about
what is inside. Adapters: in-memory (``p2p.transport.memory``, for tests and
``p2p.testing``), LAN TCP (``tcp``) and the relay's websocket pipes (``relay``), which
``routed`` puts behind one address space. Each passes the shared suite in
``tests/test_transport.py``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from p2p.errors import P2PError
from p2p.proto.wire import MAX_FRAME


class TransportError(P2PError):
    """A connection failed or could not be made (the peer may simply be offline)."""


class ConnectionClosed(TransportError):
    """The other end closed the connection (or it broke)."""


class Connection(Protocol):
    """One framed connection to a peer."""

    @property
    def remote(self) -> str:
        """Where the peer is, for logs and status (an address, not an identity)."""
        ...

    async def send(self, frame: bytes) -> None:
        """Send one frame; blocks while the peer is slow (back-pressure)."""
        ...

    async def receive(self, limit: int = MAX_FRAME) -> bytes:
        """The next frame; ConnectionClosed when the connection is over.

        A frame larger than ``limit`` raises FrameTooLarge, where the transport can
        before reading it: a peer that has not proven anything yet is held to a small
        limit (:data:`p2p.proto.wire.MAX_HANDSHAKE_FRAME`) by the caller."""
        ...

    async def aclose(self) -> None:
        """Close (idempotent); the peer's ``receive`` raises ConnectionClosed."""
        ...


Handler = Callable[[Connection], Awaitable[None]]


class Transport(Protocol):
    """Accepts and makes connections."""

    @property
    def address(self) -> str:
        """Where peers can dial this node (valid once :meth:`serve` has started)."""
        ...

    async def serve(
        self, handler: Handler, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Accept connections until cancelled, running ``handler(conn)`` for each."""
        ...

    async def dial(self, address: str) -> Connection:
        """Connect to ``address``; TransportError if it can't be reached."""
        ...
