"""One Transport over two: ``relay:<device id>`` addresses go to the relay, others direct.

A node has one ``transport`` (``open_node(transport=...)``). With a relay it has two ways
to reach a peer: directly (LAN TCP, ``host:port``) and through the relay
(``relay:<device id>``). :class:`RoutedTransport` serves both and sends each dial to the
transport its address belongs to, so the node's dial loops, discovery and sessions work
unchanged whatever way a peer was found. Its ``address`` is the direct one: that is what
LAN discovery publishes; the relay address is :attr:`RelayClient.address`.
"""

from __future__ import annotations

import trio

from p2p.relay.client import RelayClient, is_relay_address
from p2p.transport.base import Connection, Handler, Transport


class RoutedTransport:
    """``direct`` for ``host:port`` addresses, ``relay`` for ``relay:<id>`` ones."""

    def __init__(self, direct: Transport, relay: RelayClient) -> None:
        self.direct = direct
        self.relay = relay

    @property
    def address(self) -> str:
        return self.direct.address

    @property
    def addresses(self) -> tuple[str, str]:
        """Every address peers can reach us at: direct, then relay."""
        return self.direct.address, self.relay.address

    async def serve(
        self, handler: Handler, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve both until cancelled; started once both are (the relay one at once,
        even while the relay is unreachable: it keeps reconnecting)."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.direct.serve, handler)
            await nursery.start(self.relay.serve, handler)
            task_status.started()

    async def dial(self, address: str) -> Connection:
        if is_relay_address(address):
            return await self.relay.dial(address)
        return await self.direct.dial(address)
