"""The rendezvous relay: authenticated websockets, pipes, presence, and a mailbox.

Devices connect over a websocket, prove they hold their device key (challenge, signed
``auth``), and then may: watch the presence of up to 64 devices, open pipes to online
devices (the relay forwards opaque chunks; the two devices run their own end-to-end
encrypted sync session through it), and post mail for devices that are offline (kept in
SQLite, bounded, expiring). The relay never holds a key that opens anything it carries.
What it can and cannot see is in docs/relay.md.

With ``redis_url`` the process is one of a cluster serving one relay id: mail lives in
Redis (backend.MailStore), presence is cluster-wide, and a pipe whose other device is on
another process is a :class:`_RemotePipe` whose chunks cross the cluster's bus with a
credit window (cluster.py). Pipes between devices of this process stay as they are.

Structure (trio-websocket's habit): :func:`serve_relay` runs inside the caller's
nursery (``server = await nursery.start(serve_relay, host, port, ...)``) and owns a
:class:`RelayServer`, the shared state. Each websocket is one connection task with its own
nursery: a writer task drains the connection's bounded outbound queue into the socket,
the connection task reads, checks and dispatches messages, and after auth a mail pump
streams the device's mailbox. Leaving the connection's nursery (client gone, violation,
eviction, relay shutdown) unregisters it: its pipes are closed towards the other ends,
its watchers learn it went offline.

Bad input never reaches past :mod:`p2p.proto.relay_protocol` unchecked, and never ends the
relay: a client that sends something it should not is disconnected with a websocket
close code and one log line (1008 policy violation: bad auth, auth timeout, malformed or
unexpected message, rate limit, too slow; 1009 message too big; 1003 text message).

Back-pressure: forwarding a pipe chunk waits for room in the receiver's outbound queue,
so a slow receiver slows its sender (whose socket we stop reading) rather than growing
our memory. A receiver whose queue stays full for ``slow_timeout`` is disconnected, so one
stuck device cannot stall its peers forever.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import trio
from trio_websocket import ConnectionClosed as WsClosed
from trio_websocket import WebSocketConnection, WebSocketRequest, wrap_server_stream

from p2p.errors import BadSignature, FrameTooLarge, RelayError, StoreError, WireError
from p2p.proto.identity import short_id, verify
from p2p.proto.relay_protocol import (
    CLIENT_CID_LIMIT,
    CLOSE_CODES,
    DOMAIN_AUTH,
    MAX_CID,
    MAX_MESSAGE,
    MAX_PAYLOAD,
    MAX_PREAUTH,
    NONCE_BYTES,
    TokenBucket,
    auth_message,
    decode_client,
    encode_server,
    is_device_id,
)
from p2p.relay.backend import WINDOW_BYTES, WINDOW_ITEMS, MailStore, SqliteMailStore
from p2p.relay.mailbox import FILE_NAME, MailQuota
from p2p.transport.byte_queue import ByteQueue, QueueClosed

if TYPE_CHECKING:  # coredis takes a second to import: only a cluster process loads it
    from p2p.relay.cluster import RedisCluster

log = logging.getLogger("p2p.relay")

MiB: Final = 1024 * 1024
MAIL_PAGE: Final = 16
"""Mail items read from the store at a time by a connection's mail pump."""
CLOSE_TIMEOUT: Final = 2.0
"""Seconds to wait for a websocket's closing handshake before dropping the socket."""
RECEIVE_BUFFER: Final = 64 * 1024
"""Bytes read from a socket at once (trio-websocket's default, 4 KiB, halves the speed
of large frames); memory stays bounded by trio-websocket's one-message queue."""

POLICY: Final = 1008
TRY_LATER: Final = 1013
"""Close code for a login the relay cannot serve now (a cluster process without Redis)."""
TOO_BIG: Final = 1009
UNSUPPORTED: Final = 1003
NORMAL: Final = 1000
INTERNAL: Final = 1011


def _limit(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Every bound the relay keeps, with its default. ``p2p relay`` has a flag for each
    (``--max-message`` ...), and ``help`` in each field's metadata is that flag's help."""

    max_message: int = _limit(
        MAX_MESSAGE, "Largest websocket message accepted, in bytes (bigger: closed with 1009)."
    )
    max_mail: int = _limit(MiB, "Largest mail item, in bytes.")
    mailbox_count: int = _limit(10_000, "Items waiting for one device.")
    mailbox_bytes: int = _limit(64 * MiB, "Bytes waiting for one device.")
    sender_bytes: int = _limit(
        256 * MiB, "Bytes of undelivered mail one device may have on the relay, all recipients."
    )
    sender_count: int = _limit(
        100_000, "Items of undelivered mail one device may have on the relay, all recipients."
    )
    total_bytes: int = _limit(4096 * MiB, "Bytes of mail on the whole relay.")
    total_count: int = _limit(4_000_000, "Items of mail on the whole relay.")
    mail_ttl: float = _limit(30 * 24 * 3600.0, "Seconds mail is kept for delivery (30 days).")
    purge_interval: float = _limit(
        3600.0, "Seconds between purges of expired mail (at most a quarter of the TTL)."
    )
    auth_timeout: float = _limit(
        5.0, "Seconds a new connection has to complete the websocket handshake and ``auth``."
    )
    idle_timeout: float = _limit(
        120.0, "Seconds without a message before a connection is closed (clients ping)."
    )
    connections_per_device: int = _limit(
        4, "Connections one device may hold; a newer one evicts the oldest."
    )
    max_connections: int = _limit(
        10_000, "TCP connections open at once, from accept on (handshaking, authenticated)."
    )
    max_handshakes: int = _limit(
        1_000, "TCP connections at once that have not authenticated yet (a share of the above)."
    )
    max_pipes: int = _limit(32, "Pipes open at once on one connection (both directions together).")
    msg_rate: int = _limit(
        2000, "Messages per second a connection may send, sustained (token bucket)."
    )
    msg_burst: int = _limit(10_000, "Messages a connection may send at once (bucket size).")
    byte_rate: int = _limit(8 * MiB, "Bytes per second a connection may send, sustained.")
    byte_burst: int = _limit(
        40 * MiB, "Bytes a connection may send at once: two 16 MiB sync frames and change."
    )
    queue_bytes: int = _limit(
        4 * MiB, "Bytes queued towards one connection before senders to it must wait."
    )
    slow_timeout: float = _limit(
        20.0, "Seconds a connection's outbound queue may stay full before it is disconnected."
    )

    def check(self) -> None:
        """Refuse settings the relay cannot keep (RelayError naming the setting)."""
        for f in fields(self):
            if getattr(self, f.name) <= 0:
                raise RelayError(f"relay limit {f.name} must be positive")
        if self.max_message > MAX_MESSAGE:
            raise RelayError(f"max_message cannot exceed the protocol's {MAX_MESSAGE}")
        if self.max_mail > min(MAX_PAYLOAD, self.max_message - 1024):
            raise RelayError("max_mail must leave 1 KiB of a message for its envelope")
        if self.byte_burst < self.max_message:
            raise RelayError("byte_burst must be at least max_message")

    def quota(self) -> MailQuota:
        return MailQuota(
            max_mail=self.max_mail,
            mailbox_count=self.mailbox_count,
            mailbox_bytes=self.mailbox_bytes,
            sender_bytes=self.sender_bytes,
            sender_count=self.sender_count,
            total_bytes=self.total_bytes,
            total_count=self.total_count,
            ttl=self.mail_ttl,
        )


class _Violation(Exception):
    """A client broke the rules: close its websocket with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class _Conn:
    """One websocket, before and after auth."""

    def __init__(self, ws: WebSocketConnection, remote: str, limits: Limits) -> None:
        now = trio.current_time()
        self.ws = ws
        self.remote = remote
        self.device: str | None = None
        self.out = ByteQueue(limits.queue_bytes)
        self.pipes: dict[int, tuple[_Conn, int] | _RemotePipe] = {}
        """Our cid -> the other end: (its connection, its cid) on this process, or a
        :class:`_RemotePipe` when it is on another process of the cluster."""
        self.owing: set[_RemotePipe] = set()
        """Remote pipes whose credit waits for this connection's queue to drain."""
        self.full_since: float | None = None
        """When forwarded chunks from other processes found our queue full (slowness)."""
        self.in_cluster = False
        """Counted in the cluster's presence (to be taken out when it ends)."""
        self.next_cid = CLIENT_CID_LIMIT
        self.watching: tuple[str, ...] = ()
        self.mail_event = trio.Event()
        self.scope = trio.CancelScope()
        self.close_code = NORMAL
        self.close_reason = ""
        self.pending = [True]
        """Shared with :meth:`RelayServer.accept`: True until the device authenticated."""
        self.messages = TokenBucket(limits.msg_rate, limits.msg_burst, now)
        self.bytes = TokenBucket(limits.byte_rate, limits.byte_burst, now)

    def __str__(self) -> str:
        return f"{self.remote} ({self.device or 'unauthenticated'})"

    def kick(self, code: int, reason: str) -> None:
        """End this connection from another task, with a close code and a reason."""
        if not self.close_reason:
            self.close_code, self.close_reason = code, reason
        self.scope.cancel()

    def tell(self, message: bytes) -> None:
        """Queue a small control message without waiting; a connection that has let
        thousands of them pile up is not reading and is disconnected."""
        if not self.out.put_nowait(message) and not self.out.closed:
            self.kick(POLICY, "too slow: control messages piled up unread")


class _RemotePipe:
    """This process's end of a pipe whose other device is on another relay process.

    Chunks travel the cluster bus in order, numbered; a gap closes the pipe. Each
    direction has a credit window (cluster.WINDOW_BYTES, WINDOW_ITEMS): the sender spends
    credit per chunk and waits when it runs out; the receiving process returns it once
    the chunks are queued towards a device whose queue is not full. So a slow device
    slows its sender on another process just as it would on this one.
    """

    def __init__(self, conn: _Conn, cid: int, proc: str, key: str, *, opened: bool) -> None:
        self.conn = conn
        self.cid = cid
        self.proc = proc
        self.key = key
        self.opened = opened
        self.closed = False
        self.send_seq = 0
        self.recv_seq = 0
        self.credit_bytes = WINDOW_BYTES
        self.credit_items = WINDOW_ITEMS
        self.credit_changed = trio.Event()
        self.owed_bytes = 0
        self.owed_items = 0

    def can_send(self, size: int) -> bool:
        """Credit for one chunk of ``size`` (one larger than the window passes when
        nothing is in flight, so it never deadlocks)."""
        return self.credit_items > 0 and (
            self.credit_bytes >= size or self.credit_bytes == WINDOW_BYTES
        )

    def end(self) -> None:
        self.closed = True
        self.credit_changed.set()
        self.conn.owing.discard(self)


@dataclass
class RelayStats:
    """Counters for operators and tests."""

    accepted: int = 0
    refused: int = 0
    authenticated: int = 0
    kicked: int = 0
    """Connections closed by the relay for a reason (violation, eviction, slowness)."""
    pipes_opened: int = 0
    chunks_relayed: int = 0
    bytes_relayed: int = 0
    mail_posted: int = 0
    mail_refused: int = 0
    mail_delivered: int = 0
    mail_acked: int = 0
    mail_purged: int = 0
    remote_pipes_opened: int = 0
    """Pipes between this process and another of the cluster."""


class RelayServer:
    """The relay's state: who is connected, who watches whom, the pipes, the mailbox."""

    def __init__(
        self,
        mail: MailStore,
        limits: Limits,
        relay_id: str,
        url: str,
        cluster: RedisCluster | None = None,
    ) -> None:
        self.mail = mail
        """Where mail waits: SQLite for one process, Redis for a cluster."""
        self.cluster = cluster
        """The other processes of this relay id (None: a single relay process)."""
        self.limits = limits
        self.relay_id = relay_id
        """The name devices sign in ``auth`` (clients check it is the relay they dialed)."""
        self.url = url
        """Where this relay listens, as a ``ws://`` URL."""
        self.port = 0
        self.conns: set[_Conn] = set()
        self.devices: dict[str, list[_Conn]] = {}
        """Device id -> its authenticated connections, oldest first."""
        self.watchers: dict[str, set[_Conn]] = {}
        self.stats = RelayStats()
        self.sockets = 0
        """TCP connections held now, counted from accept: a socket that never finishes its
        websocket handshake holds a descriptor as surely as an authenticated one."""
        self.handshaking = 0
        """Of those, the ones not authenticated yet."""
        self._refusal_logged = -math.inf
        self.refusals: Counter[str] = Counter()
        """Refused logins, connections, pipes and mail, by reason (for /metrics)."""
        self.remote_pipes: dict[str, _RemotePipe] = {}
        """Pipes with an end on another process, by their cluster-wide key."""
        self._next_key = 0
        self.nursery: trio.Nursery | None = None
        """For work that outlives a connection (telling the cluster it ended)."""

    def snapshot(self) -> dict[str, Any]:
        """What is happening now, as plain values (for logs, status and tests)."""
        return {
            **asdict(self.stats),
            "connections": len(self.conns),
            "sockets": self.sockets,
            "handshaking": self.handshaking,
            "devices_online": len(self.devices),
            "pipes": self.pipe_count(),
            "remote_pipes": len(self.remote_pipes),
            "refusals": dict(self.refusals),
            "cluster": self.cluster is not None,
            "redis_healthy": self.cluster.healthy if self.cluster is not None else None,
        }

    def pipe_count(self) -> int:
        """Pipes open now with at least one end here (a local pipe counts once)."""
        local = sum(1 for c in self.conns for e in c.pipes.values() if isinstance(e, tuple))
        return local // 2 + len(self.remote_pipes)

    # ---- one connection -------------------------------------------------------------

    async def accept(self, stream: trio.SocketStream) -> None:
        """Serve one TCP connection: the websocket handshake, then :meth:`handle`.

        We own the stream (``wrap_server_stream`` rather than ``serve_websocket``) so that
        it is closed however the websocket ends: trio-websocket 0.12 leaves the socket
        open when the peer drops the TCP connection without a closing handshake. Never
        raises (but Cancelled): a bug or a bad client must not take the listener down.
        """
        lim = self.limits
        if self.sockets >= lim.max_connections or self.handshaking >= lim.max_handshakes:
            # refused before reading a byte: a flood of slow handshakes must not hold
            # descriptors past the bounds (nor spend a websocket handshake on each)
            self.stats.refused += 1
            full = self.sockets >= lim.max_connections
            self.refusals["max_connections" if full else "max_handshakes"] += 1
            now = trio.current_time()
            if now - self._refusal_logged >= 1.0:  # one line a second, not one per socket
                self._refusal_logged = now
                log.warning(
                    "refusing connections: %d open, %d not authenticated",
                    self.sockets,
                    self.handshaking,
                )
            await trio.aclose_forcefully(stream)
            return
        self.sockets += 1
        self.handshaking += 1
        pending = [True]  # cleared by _register once the device authenticated
        try:
            remote = _format_remote(stream)
            deadline = trio.current_time() + self.limits.auth_timeout
            async with trio.open_nursery() as nursery:  # trio-websocket's reader task
                request = None
                with trio.move_on_at(deadline):
                    request = await wrap_server_stream(
                        nursery,
                        stream,
                        max_message_size=self.limits.max_message,
                        receive_buffer_size=RECEIVE_BUFFER,
                    )
                if request is not None:
                    await self.handle(request, remote, deadline, pending)
                nursery.cancel_scope.cancel()
        except Exception:
            log.exception("bug while serving a connection")
        finally:
            self.sockets -= 1
            if pending[0]:
                self.handshaking -= 1
            await trio.aclose_forcefully(stream)

    async def handle(
        self, request: WebSocketRequest, remote: str, auth_deadline: float, pending: list[bool]
    ) -> None:
        """Serve one websocket until it ends (called by :meth:`accept`); ``auth`` must
        arrive by ``auth_deadline`` (trio time). ``pending[0]`` is cleared on auth (the
        connection stops counting against ``max_handshakes``)."""
        ws = await request.accept()
        conn = _Conn(ws, remote, self.limits)
        conn.pending = pending
        self.conns.add(conn)
        self.stats.accepted += 1
        try:
            with conn.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer, conn)
                    try:
                        await self._session(conn, nursery, auth_deadline)
                    except _Violation as v:
                        conn.kick(v.code, v.reason)
                    nursery.cancel_scope.cancel()
        except Exception:
            log.exception("bug while serving %s", conn)
            conn.close_code, conn.close_reason = INTERNAL, "internal error"
        finally:
            self.conns.discard(conn)
            self._unregister(conn)
            if conn.close_code != NORMAL:
                self.stats.kicked += 1
                log.warning("closed %s: %d %s", conn, conn.close_code, conn.close_reason)
            elif conn.close_reason:
                log.info("closed %s: %s", conn, conn.close_reason)
            if trio.current_effective_deadline() != -math.inf:  # not shutting down
                with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                    await ws.aclose(conn.close_code, conn.close_reason[:120] or None)

    async def _writer(self, conn: _Conn) -> None:
        try:
            while True:
                message = await conn.out.get()
                if conn.owing and conn.out.queued_bytes <= self.limits.queue_bytes:
                    for pipe in list(conn.owing):
                        self._settle(pipe)
                if conn.out.queued_bytes <= self.limits.queue_bytes:
                    conn.full_since = None
                await conn.ws.send_message(message)
        except QueueClosed:
            pass
        except WsClosed:
            conn.scope.cancel()

    async def _receive(self, conn: _Conn) -> bytes | None:
        """The next message, rate-checked; None once the client has gone."""
        try:
            raw = await conn.ws.get_message()
        except WsClosed as exc:
            if exc.reason is not None and exc.reason.code == TOO_BIG:
                # trio-websocket has already closed it with 1009; say so in our log
                conn.close_code, conn.close_reason = TOO_BIG, "message too big"
            return None
        if isinstance(raw, str):
            raise _Violation(UNSUPPORTED, "text messages are not part of the protocol")
        now = trio.current_time()
        if not (conn.messages.take(1, now) and conn.bytes.take(len(raw), now)):
            raise _Violation(POLICY, "rate limit exceeded")
        return raw

    def _decode(self, raw: bytes) -> dict[str, Any]:
        try:
            return decode_client(raw, limit=self.limits.max_message)
        except FrameTooLarge as exc:
            raise _Violation(TOO_BIG, str(exc)) from exc
        except WireError as exc:
            raise _Violation(POLICY, f"malformed message: {exc}") from exc

    async def _session(self, conn: _Conn, nursery: trio.Nursery, auth_deadline: float) -> None:
        nonce = os.urandom(NONCE_BYTES)
        # Until the device has authenticated, trio-websocket refuses (1009) any message
        # past MAX_PREAUTH as it arrives: a stranger cannot make us buffer, let alone
        # decode, a full-size message. The private attribute is the one the library's
        # own reader checks (pinned trio-websocket; tests/test_hostile_bytes.py holds it to it).
        conn.ws._max_message_size = min(MAX_PREAUTH, self.limits.max_message)
        conn.tell(encode_server("challenge", nonce=nonce, relay=self.relay_id))
        with trio.move_on_at(auth_deadline) as timer:
            raw = await self._receive(conn)
        if timer.cancelled_caught:
            raise _Violation(POLICY, "authentication timeout")
        if raw is None:
            return
        if len(raw) > MAX_PREAUTH:
            raise _Violation(TOO_BIG, f"{len(raw)} bytes before authentication")
        msg = self._decode(raw)
        if msg["t"] != "auth":
            raise _Violation(POLICY, f"expected auth, got {msg['t']}")
        if short_id(msg["pk"]) != msg["dev"]:
            raise _Violation(POLICY, "auth failed: device id does not match its key")
        try:
            verify(msg["pk"], DOMAIN_AUTH, auth_message(nonce, self.relay_id), msg["sig"])
        except BadSignature as exc:
            raise _Violation(POLICY, "auth failed: bad signature") from exc
        conn.ws._max_message_size = self.limits.max_message
        if self.cluster is not None and not self.cluster.healthy:
            self.refusals["redis_unavailable"] += 1
            raise _Violation(TRY_LATER, "relay storage unavailable: try again later")
        self._register(conn, msg["dev"])
        if self.cluster is not None:
            try:
                await self.cluster.device_up(msg["dev"])
            except StoreError as exc:
                self.refusals["redis_unavailable"] += 1
                raise _Violation(TRY_LATER, "relay storage unavailable: try again later") from exc
            conn.in_cluster = True
        lim = self.limits
        conn.tell(
            encode_server(
                "welcome",
                msg_rate=lim.msg_rate,
                msg_burst=lim.msg_burst,
                byte_rate=lim.byte_rate,
                byte_burst=lim.byte_burst,
                max_message=lim.max_message,
                max_mail=lim.max_mail,
                max_pipes=lim.max_pipes,
            )
        )
        nursery.start_soon(self._mail_pump, conn)
        while True:
            with trio.move_on_after(lim.idle_timeout) as timer:
                raw = await self._receive(conn)
            if timer.cancelled_caught:
                conn.kick(NORMAL, "idle timeout")
                return
            if raw is None:
                return
            await self._dispatch(conn, self._decode(raw))

    async def _dispatch(self, conn: _Conn, msg: dict[str, Any]) -> None:
        kind = msg["t"]
        if kind == "data":
            await self._data(conn, msg["cid"], msg["data"], msg["more"])
        elif kind == "ping":
            conn.tell(encode_server("pong", n=msg["n"]))
        elif kind == "open":
            await self._open(conn, msg["to"], msg["cid"])
        elif kind == "close":
            self._close_pipe(conn, msg["cid"], "closed")
        elif kind == "watch":
            await self._watch(conn, msg["ids"])
        elif kind == "post":
            await self._post(conn, msg["to"], msg["id"], msg["data"])
        elif kind == "ack":
            assert conn.device is not None
            try:
                acked = await self.mail.ack(conn.device, msg["ids"])
            except StoreError as exc:  # the mail stays, and is delivered again: harmless
                log.error("deleting acked mail of %s failed: %s", conn.device, exc)
                return
            self.stats.mail_acked += acked
        else:  # "auth" again
            raise _Violation(POLICY, f"unexpected {kind} after auth")

    # ---- presence -------------------------------------------------------------------

    def _register(self, conn: _Conn, device: str) -> None:
        conn.device = device
        if conn.pending[0]:
            conn.pending[0] = False
            self.handshaking -= 1
        self.stats.authenticated += 1
        conns = self.devices.setdefault(device, [])
        conns.append(conn)
        log.debug("authenticated %s", conn)
        if len(conns) == 1 and self.cluster is None:  # a cluster announces through Redis
            self._announce(device, online=True)
        while len(conns) > self.limits.connections_per_device:
            oldest = conns.pop(0)
            oldest.kick(POLICY, "replaced by a newer connection of the same device")

    def _unregister(self, conn: _Conn) -> None:
        """Forget a connection that ended (idempotent)."""
        conn.out.abort()
        self._unwatch(conn)
        for end in list(conn.pipes.values()):  # (dropping a remote end edits the dict)
            if isinstance(end, _RemotePipe):
                self._drop_remote(end, tell_other="gone")
                continue
            other, other_cid = end
            if other.pipes.pop(other_cid, None) is not None:
                other.tell(encode_server("closed", cid=other_cid, code="gone"))
        conn.pipes.clear()
        device = conn.device
        if device is not None and conn in self.devices.get(device, ()):
            self.devices[device].remove(conn)
            if not self.devices[device]:
                del self.devices[device]
                if self.cluster is None:
                    self._announce(device, online=False)
        if conn.in_cluster and device is not None and self.cluster is not None:
            conn.in_cluster = False
            cluster = self.cluster

            async def down() -> None:
                # lost with Redis: the resync after it returns counts from what is here
                with contextlib.suppress(StoreError):
                    await cluster.device_down(device)

            if self.nursery is not None:
                self.nursery.start_soon(down)

    def _announce(self, device: str, *, online: bool) -> None:
        message = encode_server("presence", id=device, online=online)
        for watcher in list(self.watchers.get(device, ())):
            watcher.tell(message)

    def _unwatch(self, conn: _Conn) -> None:
        for device in conn.watching:
            watchers = self.watchers.get(device)
            if watchers is not None:
                watchers.discard(conn)
                if not watchers:
                    del self.watchers[device]
        conn.watching = ()

    async def _watch(self, conn: _Conn, ids: list[str]) -> None:
        """Replace what ``conn`` watches, and tell it the presence of each now (in a
        cluster: online on any process)."""
        self._unwatch(conn)
        conn.watching = tuple(ids)
        for device in ids:
            self.watchers.setdefault(device, set()).add(conn)
        online = {device: device in self.devices for device in ids}
        if self.cluster is not None and ids:
            with contextlib.suppress(StoreError):  # without Redis: what this process knows
                online = await self.cluster.online(ids)
        for device in ids:
            conn.tell(encode_server("presence", id=device, online=online[device]))

    # ---- pipes ----------------------------------------------------------------------

    async def _open(self, conn: _Conn, to: str, cid: int) -> None:
        if cid in conn.pipes:
            raise _Violation(POLICY, f"pipe {cid} is already open")
        refusal = None
        targets = self.devices.get(to)
        if (
            not targets
            and self.cluster is not None
            and to != conn.device
            and len(conn.pipes) < self.limits.max_pipes
        ):
            await self._open_remote(conn, to, cid)
            return
        if to == conn.device:
            refusal = "self"
        elif len(conn.pipes) >= self.limits.max_pipes:
            refusal = "too_many"
        elif not targets:
            refusal = "offline"
        elif len(targets[-1].pipes) >= self.limits.max_pipes or targets[-1].next_cid > MAX_CID:
            refusal = "busy"
        if refusal is not None or not targets:
            self.refusals[f"pipe_{refusal or 'offline'}"] += 1
            conn.tell(encode_server("closed", cid=cid, code=refusal or "offline"))
            return
        target = targets[-1]  # the newest connection of that device
        their_cid = target.next_cid
        target.next_cid += 1
        conn.pipes[cid] = (target, their_cid)
        target.pipes[their_cid] = (conn, cid)
        assert conn.device is not None
        self.stats.pipes_opened += 1
        target.tell(encode_server("open", **{"from": conn.device, "cid": their_cid}))
        conn.tell(encode_server("opened", cid=cid))

    def _close_pipe(self, conn: _Conn, cid: int, code: str) -> None:
        end = conn.pipes.pop(cid, None)
        if end is None:
            return  # already closed by the other end: the messages crossed
        if isinstance(end, _RemotePipe):
            self._drop_remote(end, tell_other=code)
            return
        other, other_cid = end
        if other.pipes.pop(other_cid, None) is not None:
            other.tell(encode_server("closed", cid=other_cid, code=code))

    async def _data(self, conn: _Conn, cid: int, data: bytes, more: bool) -> None:
        end = conn.pipes.get(cid)
        if end is None:
            return  # the pipe closed while this chunk was on its way: drop it
        if isinstance(end, _RemotePipe):
            await self._data_remote(conn, end, data, more)
            return
        other, other_cid = end
        message = encode_server("data", cid=other_cid, data=data, more=more)
        with trio.move_on_after(self.limits.slow_timeout) as timer:
            await other.out.put(message)
        if timer.cancelled_caught:
            other.kick(POLICY, f"too slow: its queue stayed full for {self.limits.slow_timeout}s")
            return
        self.stats.chunks_relayed += 1
        self.stats.bytes_relayed += len(data)

    # ---- pipes across processes ----------------------------------------------------

    async def _open_remote(self, conn: _Conn, to: str, cid: int) -> None:
        """Open a pipe to a device on another process: ask that process (it answers
        ``opened``, or ``close`` with the code of a refusal)."""
        assert self.cluster is not None
        assert conn.device is not None
        try:
            proc = await self.cluster.locate(to)
        except StoreError:
            proc = None
        if proc is None or proc == self.cluster.proc_id:  # (ours: it just left)
            self.refusals["pipe_offline"] += 1
            conn.tell(encode_server("closed", cid=cid, code="offline"))
            return
        self._next_key += 1
        key = f"{self.cluster.proc_id}:{self._next_key}"
        pipe = _RemotePipe(conn, cid, proc, key, opened=False)
        conn.pipes[cid] = pipe
        self.remote_pipes[key] = pipe
        self.cluster.send_nowait(proc, ["open", key, conn.device, to])

    def _drop_remote(self, pipe: _RemotePipe, *, tell_other: str | None) -> None:
        """Forget a remote pipe here; tell its other process (``tell_other``: the code
        its device gets) unless that process is the one that ended it."""
        pipe.end()
        self.remote_pipes.pop(pipe.key, None)
        if pipe.conn.pipes.get(pipe.cid) is pipe:
            del pipe.conn.pipes[pipe.cid]
        if tell_other is not None and self.cluster is not None:
            self.cluster.send_nowait(pipe.proc, ["close", pipe.key, tell_other])

    def _end_remote(self, pipe: _RemotePipe, code: str) -> None:
        """The other process ended (or refused) a pipe: tell our device."""
        if pipe.conn.pipes.get(pipe.cid) is pipe:
            pipe.conn.tell(encode_server("closed", cid=pipe.cid, code=code))
        self._drop_remote(pipe, tell_other=None)

    async def _data_remote(self, conn: _Conn, pipe: _RemotePipe, data: bytes, more: bool) -> None:
        assert self.cluster is not None
        if not pipe.opened:
            return  # not answered yet: a client sends only after `opened`
        with trio.move_on_after(self.limits.slow_timeout) as timer:
            while not pipe.closed and not pipe.can_send(len(data)):
                pipe.credit_changed = trio.Event()
                await pipe.credit_changed.wait()
        if timer.cancelled_caught:  # the far device stopped reading: its relay kicks it
            self._close_pipe(conn, pipe.cid, "gone")
            conn.tell(encode_server("closed", cid=pipe.cid, code="gone"))
            return
        if pipe.closed:
            return
        pipe.credit_bytes -= len(data)
        pipe.credit_items -= 1
        seq = pipe.send_seq
        pipe.send_seq += 1
        await self.cluster.send(pipe.proc, ["data", pipe.key, seq, data, more])
        self.stats.chunks_relayed += 1
        self.stats.bytes_relayed += len(data)

    def _settle(self, pipe: _RemotePipe) -> None:
        """Return credit to the sending process once enough was queued towards a device
        that keeps up (half a window at a time: one bus message per many chunks)."""
        if pipe.closed or self.cluster is None:
            pipe.conn.owing.discard(pipe)
            return
        if pipe.conn.out.queued_bytes > self.limits.queue_bytes:
            pipe.conn.owing.add(pipe)
            return
        if pipe.owed_bytes * 2 >= WINDOW_BYTES or pipe.owed_items * 2 >= WINDOW_ITEMS:
            self.cluster.send_nowait(
                pipe.proc, ["credit", pipe.key, pipe.owed_bytes, pipe.owed_items]
            )
            pipe.owed_bytes = pipe.owed_items = 0
            pipe.conn.owing.discard(pipe)
        else:
            pipe.conn.owing.add(pipe)

    # ---- the cluster's callbacks ------------------------------------------------------

    def on_cluster_message(self, proc: str, message: list[Any]) -> None:
        """A message from another process of the cluster (see cluster.py); malformed
        ones are dropped with a log line."""
        try:
            self._on_cluster_message(proc, message)
        except (ValueError, TypeError, IndexError, WireError) as exc:
            log.warning("relay cluster: dropped a bad %r from %s: %s", message[0], proc, exc)

    def _on_cluster_message(self, proc: str, message: list[Any]) -> None:
        kind = message[0]
        if kind == "mail":
            for conn in self.devices.get(str(message[2]), ()):
                conn.mail_event.set()
            return
        key = message[2]
        if not isinstance(key, str):
            raise ValueError("pipe key is not a string")
        if kind == "open":
            self._remote_open(proc, key, message[3], message[4])
            return
        pipe = self.remote_pipes.get(key)
        if pipe is None or pipe.proc != proc:
            return  # it ended here meanwhile: the messages crossed
        if kind == "data":
            seq, data, more = message[3], message[4], message[5]
            if type(data) is not bytes or type(more) is not bool or len(data) > MAX_PAYLOAD:
                raise ValueError("bad data chunk")
            if seq != pipe.recv_seq:  # a message was lost on the way: end the pipe
                log.info(
                    "relay cluster: pipe %s lost chunks (got %r, wanted %d)",
                    key,
                    seq,
                    pipe.recv_seq,
                )
                self._end_remote(pipe, "gone")
                self.cluster_send(proc, ["close", key, "gone"])
                return
            pipe.recv_seq += 1
            conn = pipe.conn
            if not conn.out.put_nowait(encode_server("data", cid=pipe.cid, data=data, more=more)):
                conn.kick(POLICY, "too slow: forwarded chunks piled up unread")
                return
            self.stats.chunks_relayed += 1
            self.stats.bytes_relayed += len(data)
            pipe.owed_bytes += len(data)
            pipe.owed_items += 1
            if conn.out.queued_bytes > self.limits.queue_bytes:
                now = trio.current_time()
                if conn.full_since is None:
                    conn.full_since = now
                elif now - conn.full_since > self.limits.slow_timeout:
                    conn.kick(
                        POLICY, f"too slow: its queue stayed full for {self.limits.slow_timeout}s"
                    )
            self._settle(pipe)
        elif kind == "credit":
            nbytes, nitems = int(message[3]), int(message[4])
            pipe.credit_bytes = min(WINDOW_BYTES, pipe.credit_bytes + nbytes)
            pipe.credit_items = min(WINDOW_ITEMS, pipe.credit_items + nitems)
            pipe.credit_changed.set()
        elif kind == "opened":
            if not pipe.opened:
                pipe.opened = True
                self.stats.pipes_opened += 1
                self.stats.remote_pipes_opened += 1
                pipe.conn.tell(encode_server("opened", cid=pipe.cid))
        elif kind == "close":
            code = str(message[3])
            self._end_remote(pipe, code if code in CLOSE_CODES else "gone")
        else:
            raise ValueError(f"unknown kind {kind!r}")

    def cluster_send(self, proc: str, message: list[Any]) -> None:
        if self.cluster is not None:
            self.cluster.send_nowait(proc, message)

    def _remote_open(self, proc: str, key: str, sender: object, to: object) -> None:
        """A device on ``proc`` opens a pipe to a device of ours."""
        if not (is_device_id(sender) and is_device_id(to)):
            raise ValueError("bad device id")
        assert isinstance(sender, str)
        assert isinstance(to, str)
        targets = self.devices.get(to)
        refusal = None
        if not targets:
            refusal = "offline"
        elif len(targets[-1].pipes) >= self.limits.max_pipes or targets[-1].next_cid > MAX_CID:
            refusal = "busy"
        if refusal is not None or not targets:
            self.refusals[f"pipe_{refusal}"] += 1
            self.cluster_send(proc, ["close", key, refusal or "offline"])
            return
        target = targets[-1]
        their_cid = target.next_cid
        target.next_cid += 1
        pipe = _RemotePipe(target, their_cid, proc, key, opened=True)
        target.pipes[their_cid] = pipe
        self.remote_pipes[key] = pipe
        self.stats.pipes_opened += 1
        self.stats.remote_pipes_opened += 1
        target.tell(encode_server("open", **{"from": sender, "cid": their_cid}))
        self.cluster_send(proc, ["opened", key])

    def on_cluster_presence(self, device: str, online: bool) -> None:
        self._announce(device, online=online)

    def local_devices(self) -> dict[str, int]:
        return {
            device: sum(1 for c in conns if c.in_cluster)
            for device, conns in self.devices.items()
            if any(c.in_cluster for c in conns)
        }

    def on_cluster_lost(self, procs: set[str] | None) -> None:
        """Messages to or from ``procs`` (None: any process) may have been lost, or
        those processes are gone: end the pipes through them."""
        for pipe in list(self.remote_pipes.values()):
            if procs is None or pipe.proc in procs:
                self._end_remote(pipe, "gone" if pipe.opened else "offline")

    def on_cluster_recovered(self) -> None:
        """Redis is back: mail notices and presence changes may have been missed; every
        mail pump looks again, and every watcher is told the presence of its devices."""
        for conn in self.conns:
            conn.mail_event.set()
        if self.nursery is not None:
            self.nursery.start_soon(self._retell_presence)

    async def _retell_presence(self) -> None:
        for conn in list(self.conns):
            if conn.watching and self.cluster is not None:
                try:
                    online = await self.cluster.online(conn.watching)
                except StoreError:
                    return  # lost again: the next recovery tells them
                for device, up in online.items():
                    conn.tell(encode_server("presence", id=device, online=up))

    # ---- mailbox --------------------------------------------------------------------

    async def _post(self, conn: _Conn, to: str, mail_id: bytes, data: bytes) -> None:
        assert conn.device is not None
        try:
            code = await self.mail.post(to, conn.device, mail_id, data, time.time())
        except StoreError as exc:
            log.error("storing mail from %s failed: %s", conn.device, exc)
            code = "unavailable"
        if code == "posted":
            self.stats.mail_posted += 1
            conn.tell(encode_server("posted", id=mail_id))
            for recipient in self.devices.get(to, ()):
                recipient.mail_event.set()
        else:
            self.stats.mail_refused += 1
            self.refusals[f"mail_{code}"] += 1
            log.info("refused mail from %s to %s: %s", conn.device, to, code)
            conn.tell(encode_server("error", id=mail_id, code=code))

    async def _mail_pump(self, conn: _Conn) -> None:
        """Send the device its mail: what waits now, then what arrives while connected."""
        device = conn.device
        assert device is not None
        last = 0
        retry = 1.0
        while True:
            event = conn.mail_event = trio.Event()
            try:
                items = await self.mail.fetch(device, last, MAIL_PAGE, time.time())
            except StoreError as exc:  # Redis lost, say: the mail stays where it is
                if retry == 1.0:  # one line per outage and device, not one a second
                    log.warning("reading mail for %s failed: %s", device, exc)
                # again later, or at once when the store is back (on_cluster_recovered)
                with trio.move_on_after(retry):
                    await event.wait()
                retry = min(retry * 2, 30.0)
                continue
            retry = 1.0
            for item in items:
                message = encode_server("mail", id=item.id, data=item.data, **{"from": item.sender})
                if not await conn.out.put(message):
                    return
                last = item.seq
                self.stats.mail_delivered += 1
            if len(items) < MAIL_PAGE:
                await event.wait()

    async def purge_loop(self) -> None:
        """Delete expired mail now and then (also done once when the relay starts)."""
        interval = min(self.limits.purge_interval, self.limits.mail_ttl / 4)
        first = self.cluster is not None  # SQLite purges on open; Redis has no open
        while True:
            if not first:
                await trio.sleep(interval)
            first = False
            try:
                purged = await self.mail.purge(time.time())
            except StoreError as exc:
                log.error("purging expired mail failed: %s", exc)
                continue
            self.stats.mail_purged += purged
            if purged:
                log.info("purged %d expired mail items", purged)


def _format_remote(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "?"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def default_url(host: str, port: int) -> str:
    """``ws://host:port`` (brackets around an IPv6 host)."""
    return f"ws://[{host}]:{port}" if ":" in host else f"ws://{host}:{port}"


async def serve_relay(
    host: str,
    port: int,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    relay_id: str | None = None,
    limits: Limits = Limits(),  # frozen: one shared default is safe
    redis_url: str | None = None,
    task_status: trio.TaskStatus[RelayServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a relay on ``host:port`` (port 0 picks one) until cancelled.

    Start it with ``server = await nursery.start(serve_relay, ...)``: once it accepts
    connections, ``server.port`` and ``server.url`` say where. Mail lives in
    ``data_dir/relay.db`` (created, mode 0700); without ``data_dir`` it is kept in memory
    only and lost when the relay stops. ``relay_id`` is the name devices sign when they
    authenticate and must be the URL clients use to reach the relay; by default it is
    ``ws://host:port`` as bound, which is right unless the relay listens on a wildcard
    address or sits behind a proxy.

    With ``redis_url`` (``redis://HOST:PORT/DB``) this process joins the cluster of
    processes serving ``relay_id`` through that Redis: mail, presence and pipes between
    processes live there (cluster.py), and ``data_dir`` must not be given.

    Raises RelayError if it cannot listen, a limit is invalid or Redis does not answer,
    StoreError if the mailbox file is unusable.
    """
    limits.check()
    if redis_url is not None and data_dir is not None:
        raise RelayError(
            "a relay keeps its mail in SQLite (--data) or in Redis (--redis), not both"
        )
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        reason = "address in use" if exc.errno == errno.EADDRINUSE else str(exc)
        raise RelayError(f"cannot listen on {host}:{port}: {reason}") from exc
    bound = listeners[0].socket.getsockname()[1]
    url = default_url(host, bound)
    if relay_id is None and host in ("0.0.0.0", "::", ""):
        log.warning(
            "listening on a wildcard address: clients will refuse relay id %s;"
            " pass the URL clients use as the relay id (--id)",
            url,
        )
    relay_id = relay_id or url
    try:
        if redis_url is None:
            path: Path | None = None
            if data_dir is not None:
                path = Path(data_dir)
                path.mkdir(mode=0o700, parents=True, exist_ok=True)
                path = path / FILE_NAME
            store = await SqliteMailStore.open(None if path is None else str(path), limits.quota())
            try:
                server = RelayServer(store, limits, relay_id, url)
                await _serve(server, listeners, bound, task_status)
            finally:
                await store.aclose()
            return
        from p2p.relay.cluster import RedisCluster, RedisMailStore, connect

        client, subscriber = connect(redis_url), connect(redis_url)
        async with client, subscriber:
            redis_store = RedisMailStore(client, relay_id, limits.quota())
            server = RelayServer(redis_store, limits, relay_id, url)
            server.cluster = RedisCluster(
                client,
                relay_id,
                subscriber=subscriber,
                on_message=server.on_cluster_message,
                on_presence=server.on_cluster_presence,
                local_devices=server.local_devices,
                on_lost=server.on_cluster_lost,
                on_recovered=server.on_cluster_recovered,
            )
            try:
                await _serve(server, listeners, bound, task_status)
            finally:
                await server.cluster.leave()
    finally:
        for listener in listeners:
            await trio.aclose_forcefully(listener)


async def _serve(
    server: RelayServer,
    listeners: list[trio.SocketListener],
    port: int,
    task_status: trio.TaskStatus[RelayServer],
) -> None:
    server.port = port
    async with trio.open_nursery() as nursery:
        server.nursery = nursery
        if server.cluster is not None:
            await nursery.start(server.cluster.run)
        await nursery.start(trio.serve_listeners, server.accept, listeners)
        nursery.start_soon(server.purge_loop)
        log.info(
            "relay %s listening on %s, mail in %s%s",
            server.relay_id,
            server.url,
            server.mail.where,
            f" (cluster process {server.cluster.proc_id})" if server.cluster else "",
        )
        task_status.started(server)
