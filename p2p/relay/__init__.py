"""The rendezvous relay (issue 5): a small server devices meet through, and its client.

- :mod:`p2p.relay.protocol`: the wire protocol (msgpack over binary websocket messages),
  sans-I/O, strictly checked.
- :mod:`p2p.relay.server`: :func:`serve_relay` and :class:`RelayServer`: authenticated
  connections, presence, pipes between devices, a bounded mailbox.
- :mod:`p2p.relay.backend`: the mail store interface and its SQLite adapter (one relay
  process, the default); :mod:`p2p.relay.cluster`: mail, presence and a bus between
  processes in Redis, for many processes serving one relay id (``--redis``);
  :mod:`p2p.relay.metrics`: ``/healthz`` and Prometheus ``/metrics``.
- :mod:`p2p.relay.client`: :class:`RelayClient`, which is at once a Transport
  (``relay:<device id>`` addresses), a Discovery (presence of watched devices) and a
  mailbox client.
- ``python -m p2p.relay``: run a relay (``p2p relay`` calls the same :func:`main`).

What the relay can and cannot see, its limits and its protocol: docs/relay.md.
"""

from p2p.relay.client import Mail, Presence, RelayClient, RelayPipe, relay_address
from p2p.relay.server import Limits, RelayServer, serve_relay

__all__ = [
    "Limits",
    "Mail",
    "Presence",
    "RelayClient",
    "RelayPipe",
    "RelayServer",
    "relay_address",
    "serve_relay",
]
