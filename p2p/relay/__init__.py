"""The rendezvous relay server: a small server devices meet through.

- :mod:`p2p.proto.relay_protocol`: the wire protocol (msgpack over binary websocket messages),
  sans-I/O, strictly checked.
- :mod:`p2p.relay.server`: :func:`serve_relay` and :class:`RelayServer`: authenticated
  connections, presence, pipes between devices, a bounded mailbox.
- :mod:`p2p.relay.backend`: the mail store interface and its SQLite adapter (one relay
  process, the default); :mod:`p2p.relay.cluster`: mail, presence and a bus between
  processes in Redis, for many processes serving one relay id (``--redis``);
  :mod:`p2p.relay.metrics`: ``/healthz`` and Prometheus ``/metrics``.

The device side (:class:`~p2p.transport.relay.RelayClient`, at once a Transport, a
Discovery and a mailbox client) lives in :mod:`p2p.transport.relay`.
- ``python -m p2p.relay``: run a relay (``p2p relay`` calls the same :func:`main`).

What the relay can and cannot see, its limits and its protocol: docs/relay.md.
"""

from p2p.relay.server import Limits, RelayServer, serve_relay

__all__ = [
    "Limits",
    "RelayServer",
    "serve_relay",
]
