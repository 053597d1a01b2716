"""One Transport over two: ``relay:<device id>`` addresses go to the relay, others direct.

A node has one ``transport`` (``open_node(transport=...)``). With a relay it has two ways
to reach a peer: directly (LAN TCP, ``host:port``) and through the relay
(``relay:<device id>``). :class:`RoutedTransport` serves both and sends each dial to the
transport its address belongs to, so the node's dial loops, discovery and sessions work
unchanged whatever way a peer was found. Its ``address`` is the direct one: that is what
LAN discovery publishes; the relay address is :attr:`RelayClient.address`.
"""

from __future__ import annotations

from collections.abc import Sequence

import trio

from p2p.transport.base import Connection, Handler, Transport, TransportError
from p2p.transport.relay import RelayClient, is_relay_address


class RoutedTransport:
    """``direct`` for ``host:port`` addresses, the relays for ``relay:<id>`` ones.

    With several relays, a dial tries each connected one in turn (the peer may be
    connected to any of them).
    """

    def __init__(self, direct: Transport | None, relays: Sequence[RelayClient]) -> None:
        if not relays:
            raise ValueError("a routed transport needs at least one relay")
        self.direct = direct
        self.relays = list(relays)

    @property
    def address(self) -> str:
        return self.direct.address if self.direct is not None else self.relays[0].address

    @property
    def addresses(self) -> tuple[str, ...]:
        """Every address peers can reach us at: direct, then relay."""
        direct = (self.direct.address,) if self.direct is not None else ()
        return (*direct, self.relays[0].address)

    async def serve(
        self, handler: Handler, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve all until cancelled; started once all are (a relay at once, even while
        it is unreachable: it keeps reconnecting)."""
        async with trio.open_nursery() as nursery:
            if self.direct is not None:
                await nursery.start(self.direct.serve, handler)
            for relay in self.relays:
                await nursery.start(relay.serve, handler)
            task_status.started()

    async def dial(self, address: str) -> Connection:
        if not is_relay_address(address):
            if self.direct is None:
                raise TransportError(f"no direct transport to dial {address}")
            return await self.direct.dial(address)
        errors = []
        for relay in sorted(self.relays, key=lambda r: not r.connected):
            try:
                return await relay.dial(address)
            except TransportError as exc:
                errors.append(str(exc))
        raise TransportError("; ".join(errors))
