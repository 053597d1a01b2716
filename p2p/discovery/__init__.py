"""Discovery adapters: static peers, mDNS (zeroconf), relay rendezvous (later)."""

from p2p.discovery.base import Discovery, Found, Source, StaticPeers

__all__ = ["Discovery", "Found", "Source", "StaticPeers"]
