"""Discovery adapters: static peers and mDNS (zeroconf); relay presence is found by
:class:`p2p.transport.relay.RelayClient`."""

from p2p.discovery.base import Discovery, Found, Source, StaticPeers

__all__ = ["Discovery", "Found", "Source", "StaticPeers"]
