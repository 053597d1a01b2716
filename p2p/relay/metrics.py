"""``/healthz`` and a Prometheus ``/metrics`` for one relay process (``--metrics HOST:PORT``).

A second listener, apart from the devices' port: operators point a load balancer's health
check and a Prometheus scraper at it, and keep it on a private address. It speaks just
enough HTTP/1.1 for both (one ``GET`` per connection, answered and closed); anything else
gets 404 or 400. A request head is bounded (8 KiB, 5 s) like any input from outside.

``/healthz``: 200 ``ok`` while the process can take logins; 503 while a cluster process
has lost Redis (a load balancer then sends devices to another process).

``/metrics`` (text exposition format 0.0.4): connections, pipes, mail items and bytes
(cluster-wide in a cluster: they are read from the store), counters of frames and bytes
relayed (Prometheus computes frames/s with ``rate()``), mail posted, delivered and acked,
and refusals by reason.
"""

from __future__ import annotations

import errno
import logging
from typing import Final

import trio

from p2p.errors import RelayError, StoreError
from p2p.relay.server import RelayServer, default_url

log = logging.getLogger("p2p.relay.metrics")

MAX_HEAD: Final = 8192
HEAD_TIMEOUT: Final = 5.0
MAX_CLIENTS: Final = 64
"""Scrapes answered at once; more are closed at once (a scraper is one client)."""


async def serve_metrics(
    server: RelayServer,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``/healthz`` and ``/metrics`` on ``host:port`` until cancelled; started with
    the ``http://`` URL it listens on. RelayError if it cannot listen."""
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        reason = "address in use" if exc.errno == errno.EADDRINUSE else str(exc)
        raise RelayError(f"cannot listen on {host}:{port} for metrics: {reason}") from exc
    bound = listeners[0].socket.getsockname()[1]
    clients = [0]

    async def handle(stream: trio.SocketStream) -> None:
        if clients[0] >= MAX_CLIENTS:
            await trio.aclose_forcefully(stream)
            return
        clients[0] += 1
        try:
            await _answer(server, stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            clients[0] -= 1
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handle, listeners)
        task_status.started(default_url(host, bound).replace("ws://", "http://", 1))


async def _answer(server: RelayServer, stream: trio.SocketStream) -> None:
    head = b""
    with trio.move_on_after(HEAD_TIMEOUT):
        while b"\r\n\r\n" not in head and len(head) < MAX_HEAD:
            chunk = await stream.receive_some(MAX_HEAD)
            if not chunk:
                break
            head += chunk
    parts = head.split(b"\r\n", 1)[0].split(b" ")
    if b"\r\n\r\n" not in head or len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        await _reply(stream, 400, b"bad request\n")
        return
    method, path = parts[0], parts[1].split(b"?", 1)[0]
    if method != b"GET":
        await _reply(stream, 405, b"GET only\n")
    elif path == b"/healthz":
        if server.cluster is not None and not server.cluster.healthy:
            await _reply(stream, 503, b"redis unavailable\n")
        else:
            await _reply(stream, 200, b"ok\n")
    elif path == b"/metrics":
        body = (await render(server)).encode()
        await _reply(stream, 200, body, "text/plain; version=0.0.4; charset=utf-8")
    else:
        await _reply(stream, 404, b"not found\n")


async def _reply(
    stream: trio.SocketStream, status: int, body: bytes, kind: str = "text/plain"
) -> None:
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
    head = (
        f"HTTP/1.1 {status} {reason.get(status, 'Service Unavailable')}\r\n"
        f"Content-Type: {kind}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    with trio.move_on_after(HEAD_TIMEOUT):
        await stream.send_all(head.encode() + body)


async def render(server: RelayServer) -> str:
    """The metrics of ``server`` in Prometheus's text format."""
    lines: list[str] = []

    def metric(name: str, kind: str, help: str, value: float, labels: str = "") -> None:
        if not any(line.startswith(f"# HELP p2p_relay_{name} ") for line in lines):
            lines.append(f"# HELP p2p_relay_{name} {help}")
            lines.append(f"# TYPE p2p_relay_{name} {kind}")
        lines.append(f"p2p_relay_{name}{labels} {value}")

    snap = server.snapshot()
    stats = server.stats
    metric("connections", "gauge", "Authenticated websockets on this process.", snap["connections"])
    metric("sockets", "gauge", "TCP connections held, from accept on.", snap["sockets"])
    metric("handshaking", "gauge", "Connections not authenticated yet.", snap["handshaking"])
    metric("devices", "gauge", "Devices connected to this process.", snap["devices_online"])
    metric("pipes", "gauge", "Pipes with an end on this process.", snap["pipes"])
    metric("remote_pipes", "gauge", "Pipes to another process.", snap["remote_pipes"])
    try:
        items, size = await server.mail.totals()
    except StoreError:
        items = size = -1
    metric("mail_items", "gauge", "Mail items held (the whole cluster's, in one).", items)
    metric("mail_bytes", "gauge", "Mail bytes held (the whole cluster's, in one).", size)
    counters = {
        "accepted": "Websockets accepted.",
        "authenticated": "Devices authenticated.",
        "kicked": "Connections closed by the relay for a reason.",
        "pipes_opened": "Pipes opened.",
        "chunks_relayed": "Pipe chunks (frames or parts of one) forwarded.",
        "bytes_relayed": "Pipe bytes forwarded.",
        "mail_posted": "Mail items accepted.",
        "mail_refused": "Mail items refused.",
        "mail_delivered": "Mail items sent to their device.",
        "mail_acked": "Mail items acknowledged and deleted.",
        "mail_purged": "Mail items expired and deleted.",
    }
    for name, help in counters.items():
        metric(f"{name}_total", "counter", help, getattr(stats, name))
    for reason, count in sorted(server.refusals.items()):
        metric("refusals_total", "counter", "Refusals by reason.", count, f'{{reason="{reason}"}}')
    if server.cluster is not None:
        healthy = 1 if server.cluster.healthy else 0
        metric("redis_up", "gauge", "Whether this process reaches Redis.", healthy)
        metric("cluster_processes", "gauge", "Live processes seen.", server.cluster.processes)
        for name, value in server.cluster.stats.items():
            metric(f"cluster_{name}_total", "counter", f"Cluster {name}.", value)
    return "\n".join(lines) + "\n"
