"""A device's side of the relay: a Transport, a Discovery, and a mailbox client in one.

One :class:`RelayClient` keeps one authenticated websocket to one relay and multiplexes
everything over it:

- **Transport** (:class:`~p2p.transport.base.Transport`): peers reachable through the
  relay have addresses ``relay:<device id>``. :meth:`RelayClient.dial` opens a pipe to
  one; a pipe another device opens to us is handed to the ``serve`` handler. A pipe is a
  :class:`~p2p.transport.base.Connection` like a TCP one: the sync session runs over it
  end to end, and the relay only sees its ciphertext. Frames up to
  :data:`~p2p.proto.wire.MAX_FRAME` are cut into chunks of at most 1 MiB for the relay.
- **Discovery** (:class:`~p2p.discovery.base.Discovery`): the client watches the devices
  ``watch()`` names (the account's other devices) and :meth:`RelayClient.run` reports
  ``Found(address="relay:<id>", source="relay")`` each time one comes online.
- **Mailbox**: :meth:`RelayClient.post` leaves a sealed envelope for an offline device;
  :meth:`RelayClient.mail` yields what others left for us; :meth:`RelayClient.ack`
  deletes it on the relay once it is safely ours.

Lifetime: :meth:`RelayClient.serve` runs in the caller's nursery (the node starts it as
its transport) and keeps the websocket up until cancelled: it reconnects after a drop
with a jittered exponential backoff (0.2 s doubling to 30 s) and sends ``watch`` again.
Everything else needs ``serve`` running. When the websocket drops, every pipe ends (its
``receive`` raises ConnectionClosed once the frames already received are read), every
pending ``dial`` raises TransportError and every pending ``post`` RelayUnavailable.

Pacing: the relay disconnects a client that sends faster than its token buckets allow
(``welcome`` says how fast). This client spends the same tokens, with a margin, before
each message and waits when they run out, so honest traffic is slowed, never cut off.

Back-pressure: each pipe has a bounded inbound queue. When the application does not
read a pipe, the client stops reading the websocket, the relay's queue towards us fills,
and the relay stops reading the sender. This is head-of-line blocking across the pipes of
one websocket, accepted because a device has a handful of pipes whose sessions read
continuously; a receiver stuck for 20 s is disconnected by the relay (and reconnects).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import random
import ssl
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import trio
from trio_websocket import ConnectionClosed as WsClosed
from trio_websocket import HandshakeError, WebSocketConnection, wrap_client_stream

from p2p.discovery.base import Found
from p2p.errors import (
    FrameTooLarge,
    MailboxFull,
    MailTooLarge,
    P2PError,
    RelayAuthFailed,
    RelayError,
    RelayRefused,
    RelayUnavailable,
    WireError,
)
from p2p.proto.identity import DeviceKeys
from p2p.proto.relay_protocol import (
    CHUNK,
    CLIENT_CID_LIMIT,
    CLOSE_CODES,
    DOMAIN_AUTH,
    MAIL_ERRORS,
    MAX_ACK,
    MAX_MESSAGE,
    MAX_WATCH,
    TokenBucket,
    auth_message,
    decode_server,
    encode_client,
    is_device_id,
)
from p2p.proto.wire import MAX_FRAME
from p2p.transport.base import ConnectionClosed, Handler, TransportError
from p2p.transport.byte_queue import ByteQueue, QueueClosed

log = logging.getLogger("p2p.transport.relay")

ADDRESS_PREFIX: Final = "relay:"
CONNECT_TIMEOUT: Final = 5.0
"""Seconds for TCP, the websocket handshake, and again for the relay's auth exchange;
also how long ``dial`` and ``post`` wait for a connection that is (re)starting."""
OPEN_TIMEOUT: Final = 10.0
"""Seconds ``dial`` waits for the relay to answer an ``open``."""
POST_TIMEOUT: Final = 30.0
"""Seconds ``post`` waits for ``posted`` (the relay commits to disk before answering)."""
PING_INTERVAL: Final = 20.0
"""Seconds between our pings; keeps the relay's idle timer (120 s) from firing."""
DEAD_AFTER: Final = 3 * PING_INTERVAL
"""Seconds without any message from the relay (pings go unanswered) before we give the
connection up and reconnect. Time spent blocked on a full pipe queue does not count."""
BACKOFF_MIN: Final = 0.2
BACKOFF_MAX: Final = 30.0
STABLE_AFTER: Final = 10.0
"""A connection that lasted this long resets the backoff."""
CLOSE_TIMEOUT: Final = 2.0
PIPE_QUEUE_BYTES: Final = 4 * 1024 * 1024
"""Bytes of whole frames buffered per pipe before we stop reading the websocket."""
MAIL_QUEUE: Final = 256
"""Mail items buffered for :meth:`RelayClient.mail`; more are dropped for now and come
again on the next connection (mail stays on the relay until acked)."""
PRESENCE_QUEUE: Final = 256
RECEIVE_BUFFER: Final = 64 * 1024
"""Bytes read from the socket at once (trio-websocket's 4 KiB default halves the speed
of large frames)."""
PACE_RATE: Final = 0.8
PACE_BURST: Final = 0.5
"""Share of the relay's announced rates and bursts this client allows itself."""
QUOTA_CODES: Final = frozenset({"quota", "sender_quota", "relay_full"})


def split_relay_url(url: str) -> tuple[str, str]:
    """``URL[#id=RELAY_ID]`` -> (the URL to dial, the relay id it must sign in as).

    A relay cluster serves one id from many addresses; ``#id=`` names that id for an
    address that differs from it (``ws://relay-2.internal:7700#id=wss://relay.example``). The
    fragment never leaves this device. Without it the id is the URL, as for one relay.
    """
    base, _, fragment = url.partition("#")
    if not fragment:
        return url, url.rstrip("/")
    if not fragment.startswith("id=") or len(fragment) <= 3:
        raise RelayError(f"a relay URL's fragment must be #id=RELAY_ID: {url!r}")
    return base, fragment[3:]


def group_relay_urls(urls: Iterable[str]) -> list[tuple[str, list[str]]]:
    """Relay URLs grouped by relay id, in the order given: one client per relay id,
    with the id's other addresses to fail over to."""
    groups: dict[str, list[str]] = {}
    for url in urls:
        base, relay_id = split_relay_url(url)
        if base not in groups.setdefault(relay_id, []):
            groups[relay_id].append(base)
    return list(groups.items())


def relay_address(device_id: str) -> str:
    """The transport address of a device reached through the relay."""
    return f"{ADDRESS_PREFIX}{device_id}"


def parse_relay_address(address: str) -> str:
    """``relay:<device id>`` -> the device id; TransportError for anything else."""
    device = address.removeprefix(ADDRESS_PREFIX)
    if device == address or not is_device_id(device):
        raise TransportError(f"not a relay address: {address[:80]!r}")
    return device


def is_relay_address(address: str) -> bool:
    """Whether ``address`` is one this client dials (for routing between transports)."""
    return address.startswith(ADDRESS_PREFIX)


def mail_id_for(recipient: str, data: bytes) -> bytes:
    """A mail item's id: a hash of recipient and content, so a retried post is stored once."""
    digest = hashlib.blake2b(digest_size=16, person=b"p2p-relay-mail")
    digest.update(recipient.encode("ascii") + b"\x00" + data)
    return digest.digest()


@dataclass(frozen=True, kw_only=True)
class Presence:
    """A watched device came online or went offline (as the relay sees it)."""

    device: str
    online: bool


@dataclass(frozen=True, kw_only=True)
class Mail:
    """One item from our mailbox: opaque bytes another device left for us."""

    id: bytes
    """16 bytes chosen by the sender (see :func:`mail_id_for`); what :meth:`ack` names."""
    sender: str
    """The device that posted it, as authenticated by the relay (the envelope inside
    carries its own signature: check that, not this)."""
    data: bytes
    _client: RelayClient = field(repr=False, compare=False)

    async def ack(self) -> None:
        """Tell the relay to delete this item (do it once the content is durable here)."""
        await self._client.ack([self.id])


class _Waiter:
    """One answer awaited from the relay (``opened``/``closed``, ``posted``/``error``)."""

    def __init__(self) -> None:
        self._event = trio.Event()
        self.result = ""

    def set(self, result: str) -> None:
        if not self._event.is_set():
            self.result = result
            self._event.set()

    async def wait(self) -> str:
        await self._event.wait()
        return self.result


class _Link:
    """One authenticated websocket and what lives on it."""

    def __init__(self, ws: WebSocketConnection, welcome: dict[str, Any]) -> None:
        now = trio.current_time()
        self.ws = ws
        self.closed = False
        self.nursery: trio.Nursery | None = None
        self.max_mail: int = welcome["max_mail"]
        self.max_pipes: int = max(1, welcome["max_pipes"])
        self.chunk = max(1024, min(CHUNK, welcome["max_message"] - 1024))
        self._messages = TokenBucket(
            max(1.0, welcome["msg_rate"] * PACE_RATE),
            max(1.0, welcome["msg_burst"] * PACE_BURST),
            now,
        )
        self._bytes = TokenBucket(
            max(1024.0, welcome["byte_rate"] * PACE_RATE),
            max(float(MAX_MESSAGE), welcome["byte_burst"] * PACE_BURST),
            now,
        )
        self._send_lock = trio.Lock()
        self.pipes: dict[int, RelayPipe] = {}
        self.opening: dict[int, tuple[RelayPipe, _Waiter]] = {}
        self.posts: dict[bytes, list[_Waiter]] = {}
        self.next_cid = 1

    async def send(self, message: bytes) -> None:
        """Send one message, paced to the relay's limits; ConnectionClosed if the
        websocket is gone."""
        if self.closed:
            raise ConnectionClosed("the relay connection is closed")
        async with self._send_lock:
            now = trio.current_time()
            delay = max(self._messages.wait(1, now), self._bytes.wait(len(message), now))
            if delay > 0:
                await trio.sleep(delay)
                now = trio.current_time()
            self._messages.spend(1, now)
            self._bytes.spend(len(message), now)
            try:
                await self.ws.send_message(message)
            except WsClosed as exc:
                self.closed = True
                raise ConnectionClosed("the relay connection closed") from exc

    def send_soon(self, message: bytes) -> None:
        """Send in the background (closing a pipe must not wait on a busy socket)."""
        if self.closed or self.nursery is None:
            return

        async def send_quietly() -> None:
            with contextlib.suppress(TransportError):
                await self.send(message)

        # RuntimeError: the link's nursery is closing, and the relay cleans up anyway
        with contextlib.suppress(RuntimeError):
            self.nursery.start_soon(send_quietly)

    def shutdown(self, why: str) -> None:
        """The websocket is gone: end every pipe and every pending request."""
        self.closed = True
        for pipe in list(self.pipes.values()):
            pipe._ended(why)
        self.pipes.clear()
        for _pipe, waiter in self.opening.values():
            waiter.set("gone")
        self.opening.clear()
        for waiters in self.posts.values():
            for waiter in waiters:
                waiter.set("gone")
        self.posts.clear()


class RelayPipe:
    """A connection to one device through the relay (a p2p Connection)."""

    def __init__(self, link: _Link, cid: int, peer: str, first_limit: int = MAX_FRAME) -> None:
        self._link = link
        self._first_limit = first_limit
        self._cid = cid
        self._peer = peer
        self._inbox = ByteQueue(PIPE_QUEUE_BYTES)
        self._partial: list[bytes] = []
        self._partial_size = 0
        self._frames_in = 0
        self._send_lock = trio.Lock()
        self._closed = False
        """Closed here: nothing more is sent or received."""
        self._ended_why = ""
        """Closed by the other end or the relay: frames already queued can be read."""

    @property
    def remote(self) -> str:
        return relay_address(self._peer)

    @property
    def peer(self) -> str:
        """The device at the other end, as the relay authenticated it."""
        return self._peer

    async def send(self, frame: bytes) -> None:
        if len(frame) > MAX_FRAME:
            raise FrameTooLarge(len(frame), MAX_FRAME)
        async with self._send_lock:  # a frame's chunks stay together
            size = self._link.chunk
            start = 0
            while True:
                if self._closed or self._ended_why:
                    raise ConnectionClosed(f"pipe to {self._peer} is closed {self._ended_why}")
                piece = frame[start : start + size]
                start += size
                more = start < len(frame)
                await self._link.send(encode_client("data", cid=self._cid, data=piece, more=more))
                if not more:
                    return

    async def receive(self, limit: int = MAX_FRAME) -> bytes:
        try:
            frame = await self._inbox.get()
        except QueueClosed:
            why = self._ended_why or "here"
            raise ConnectionClosed(f"pipe to {self._peer} closed ({why})") from None
        if len(frame) > limit:
            raise FrameTooLarge(len(frame), limit)
        return frame

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        self._inbox.abort()
        if self._link.pipes.get(self._cid) is self:
            del self._link.pipes[self._cid]
            if not self._ended_why:
                self._link.send_soon(encode_client("close", cid=self._cid))
        await trio.lowlevel.checkpoint()

    # ---- driven by the client's reader ----------------------------------------------

    async def _feed(self, chunk: bytes, more: bool) -> None:
        if self._closed or self._ended_why:
            return
        self._partial.append(chunk)
        self._partial_size += len(chunk)
        # a node's pipes open with a handshake (a hello): a stranger's first frame is
        # never held past the handshake limit (RelayClient's first_frame_limit)
        limit = MAX_FRAME if self._frames_in else self._first_limit
        if self._partial_size > limit:
            log.warning("%s sent a frame over %d bytes; closing the pipe", self._peer, limit)
            self._inbox.close(FrameTooLarge(self._partial_size, limit))
            self._ended_why = "frame too large"
            self._partial = []
            if self._link.pipes.pop(self._cid, None) is not None:
                self._link.send_soon(encode_client("close", cid=self._cid))
            return
        if more:
            return
        frame = self._partial[0] if len(self._partial) == 1 else b"".join(self._partial)
        self._partial, self._partial_size = [], 0
        self._frames_in += 1
        await self._inbox.put(frame)

    def _ended(self, why: str) -> None:
        if not self._ended_why:
            self._ended_why = why
        self._inbox.close()


class RelayClient:
    """A device's connection to one relay: Transport + Discovery + mailbox (see module).

    ``url`` is the relay's ``ws://`` or ``wss://`` URL; ``device`` signs our auth; the
    ``watch`` callable names the devices whose presence we follow (called on every
    (re)connection and after :meth:`update_watch`; at most MAX_WATCH (64) are sent). ``relay_id``
    is the name the relay must sign in as: the URL by default. ``first_frame_limit``
    bounds the first frame a pipe buffers, either way (a node passes the handshake
    limit, p2p.proto.wire.MAX_HANDSHAKE_FRAME: its sessions open with a small hello).

    ``alternates`` are more URLs of the same relay id: other processes of a relay cluster.
    When a connection fails or drops, the next URL is tried at once; the backoff starts
    once every URL failed in a row. Mail and presence are the cluster's, so a device
    that fails over finds its mail there, and its peers redial its pipes.
    """

    def __init__(
        self,
        url: str,
        device: DeviceKeys,
        *,
        watch: Callable[[], Iterable[str]] = tuple,
        relay_id: str | None = None,
        first_frame_limit: int = MAX_FRAME,
        alternates: Sequence[str] = (),
    ) -> None:
        self.urls = [url, *alternates]
        """Every address of this relay id, in the order they are tried."""
        for each in self.urls:
            _split_url(each)  # RelayError now rather than at each reconnection
        self._index = 0
        self._first_limit = first_frame_limit
        self.relay_id = relay_id if relay_id is not None else url.rstrip("/")
        self._device = device
        self._watch = watch
        self._handler: Handler | None = None
        self._nursery: trio.Nursery | None = None
        self._link: _Link | None = None
        self._connected = trio.Event()
        self._watch_changed = trio.Event()
        self._online: set[str] = set()
        self._subscribers: list[trio.MemorySendChannel[Presence]] = []
        self._mail_send, self._mail_receive = trio.open_memory_channel[Mail](MAIL_QUEUE)
        self.last_error = ""
        """Why the last connection attempt failed or ended (for status and logs)."""
        self.dropped_mail = 0

    # ---- state ----------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The URL in use now (or tried last): one of ``urls``."""
        return self.urls[self._index % len(self.urls)]

    @url.setter
    def url(self, value: str) -> None:
        """Point the client at another address for the one in use (as DNS would); the
        next reconnection goes there."""
        _split_url(value)
        self.urls[self._index % len(self.urls)] = value

    @property
    def device_id(self) -> str:
        return self._device.device_id

    @property
    def address(self) -> str:
        """``relay:<our device id>``: where peers of this relay dial us."""
        return relay_address(self._device.device_id)

    @property
    def connected(self) -> bool:
        """Whether an authenticated websocket to the relay is up right now."""
        return self._link is not None and not self._link.closed

    @property
    def online(self) -> frozenset[str]:
        """Watched devices the relay last said are online (empty while disconnected)."""
        return frozenset(self._online)

    async def wait_connected(self) -> None:
        """Return once the client is connected and authenticated (needs ``serve``)."""
        while not self.connected:
            if self._connected.is_set():  # the last link is still being torn down
                await trio.sleep(0.05)
            else:
                await self._connected.wait()

    def update_watch(self) -> None:
        """Send the relay a fresh ``watch()`` (call after the device list changed)."""
        self._watch_changed.set()

    def presence(self) -> trio.MemoryReceiveChannel[Presence]:
        """Presence changes of watched devices from now on (close it to unsubscribe).
        A reader that falls 256 events behind loses events."""
        send, receive = trio.open_memory_channel[Presence](PRESENCE_QUEUE)
        self._subscribers.append(send)
        return receive

    def mail(self) -> trio.MemoryReceiveChannel[Mail]:
        """Mail for this device, as the relay delivers it (one consumer).

        Mail waiting on the relay arrives after each (re)connection, new mail as it is
        posted. An item stays on the relay, and comes again on the next connection,
        until it is acked: ack once its content is durable here. Duplicates are possible
        and must be harmless (sealed envelopes are: the replay window drops them).
        """
        return self._mail_receive

    # ---- Transport ------------------------------------------------------------------

    async def serve(
        self, handler: Handler, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Keep connected to the relay until cancelled; run ``handler`` for each pipe
        another device opens to us. Started at once (the relay may be unreachable: we
        keep trying); see :meth:`wait_connected`."""
        if self._nursery is not None:
            raise RelayError("this relay client is already serving")
        self._handler = handler
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await self._keep_connected()
        finally:
            self._nursery = None
            self._handler = None

    async def dial(self, address: str) -> RelayPipe:
        """Open a pipe to ``relay:<device id>``: TransportError if the relay is not
        reachable, the device is offline, or the relay refuses the pipe."""
        peer = parse_relay_address(address)
        if peer == self.device_id:
            raise TransportError("a device cannot dial itself through the relay")
        link = await self._wait_link()
        if len(link.pipes) + len(link.opening) >= link.max_pipes:
            raise TransportError(f"{link.max_pipes} relay pipes are open already")
        cid = link.next_cid
        link.next_cid += 1
        if cid >= CLIENT_CID_LIMIT:
            raise TransportError("pipe numbers exhausted on this relay connection")
        pipe = RelayPipe(link, cid, peer, self._first_limit)
        waiter = _Waiter()
        link.opening[cid] = (pipe, waiter)
        try:
            await link.send(encode_client("open", to=peer, cid=cid))
            with trio.move_on_after(OPEN_TIMEOUT):
                await waiter.wait()
        finally:
            link.opening.pop(cid, None)
        result = waiter.result
        if result == "opened":
            return pipe
        if not result:  # no answer in time: if one comes later, the reader closes it
            raise TransportError(f"the relay did not answer opening a pipe to {peer}")
        if result == "gone":
            raise TransportError(f"the relay connection dropped while opening a pipe to {peer}")
        raise TransportError(f"relay: cannot reach {peer}: {CLOSE_CODES.get(result, result)}")

    # ---- Discovery ------------------------------------------------------------------

    async def run(
        self,
        found: trio.MemorySendChannel[Found],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Report each watched device the relay says is online (needs ``serve``)."""
        changes = self.presence()
        task_status.started()
        async with changes:
            for device in sorted(self._online):
                await found.send(self._found(device))
            async for change in changes:
                if change.online:
                    await found.send(self._found(change.device))

    @staticmethod
    def _found(device: str) -> Found:
        return Found(address=relay_address(device), source="relay", device=device)

    # ---- mailbox --------------------------------------------------------------------

    async def post(self, to: str, data: bytes) -> None:
        """Leave ``data`` (a sealed envelope) in ``to``'s mailbox; returns once the relay
        has it on disk. MailboxFull when a quota is reached, MailTooLarge above the
        relay's item limit, RelayUnavailable when the relay cannot be reached or the
        connection drops before it answers (posting again is safe: the same bytes to
        the same device are stored once)."""
        if not is_device_id(to):
            raise RelayError(f"not a device id: {to[:40]!r}")
        if not data:
            raise RelayError("mail holds at least one byte")
        try:
            link = await self._wait_link()
        except TransportError as exc:
            raise RelayUnavailable(str(exc)) from exc
        if len(data) > link.max_mail:
            raise MailTooLarge(len(data), link.max_mail)
        mail_id = mail_id_for(to, data)
        waiter = _Waiter()
        link.posts.setdefault(mail_id, []).append(waiter)
        try:
            await link.send(encode_client("post", to=to, id=mail_id, data=data))
            with trio.move_on_after(POST_TIMEOUT):
                await waiter.wait()
        except TransportError as exc:
            raise RelayUnavailable(f"the relay connection dropped: {exc}") from exc
        finally:
            waiters = link.posts.get(mail_id, [])
            if waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    del link.posts[mail_id]
        code = waiter.result
        if code == "posted":
            return
        if not code or code == "gone":
            raise RelayUnavailable("no answer from the relay to a post")
        if code in QUOTA_CODES:
            raise MailboxFull(to, code)
        if code == "too_large":
            raise MailTooLarge(len(data), link.max_mail)
        raise RelayRefused(code, MAIL_ERRORS.get(code, "unknown error"))

    async def ack(self, ids: Iterable[bytes]) -> None:
        """Delete these items from our mailbox on the relay. RelayUnavailable when not
        connected: safe to ignore, the items come again and acking them again works."""
        wanted = list(dict.fromkeys(ids))
        link = self._link
        if link is None or link.closed:
            raise RelayUnavailable("not connected to the relay")
        try:
            for start in range(0, len(wanted), MAX_ACK):
                await link.send(encode_client("ack", ids=wanted[start : start + MAX_ACK]))
        except TransportError as exc:
            raise RelayUnavailable(str(exc)) from exc

    # ---- the connection -------------------------------------------------------------

    async def _wait_link(self) -> _Link:
        if self._nursery is None:
            raise TransportError("the relay client is not running (serve() it first)")
        with trio.move_on_after(CONNECT_TIMEOUT):
            await self.wait_connected()
        link = self._link
        if link is None or link.closed:
            raise TransportError(f"not connected to the relay {self.url}: {self.last_error}")
        return link

    async def _keep_connected(self) -> None:
        backoff = BACKOFF_MIN
        untried = len(self.urls) - 1
        """Other URLs still to try before backing off (a failover goes at once)."""
        while True:
            began = trio.current_time()
            welcomed = await self._connect_once()
            if welcomed:
                untried = len(self.urls) - 1
                if trio.current_time() - began >= STABLE_AFTER:
                    backoff = BACKOFF_MIN
            if len(self.urls) > 1:
                self._index = (self._index + 1) % len(self.urls)
            if untried > 0:
                untried -= 1
                log.info("relay %s: trying %s", self.relay_id, self.url)
                await trio.sleep(random.uniform(0.0, BACKOFF_MIN))
                continue
            untried = len(self.urls) - 1
            await trio.sleep(backoff * random.uniform(0.5, 1.5))
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _connect_once(self) -> bool:
        """One websocket, from connect to drop; True if the relay welcomed us. Never
        raises but Cancelled: every failure is logged and ends in a reconnect."""
        welcomed = False
        host, port, resource, tls = _split_url(self.url)
        stream: trio.abc.Stream | None = None
        ws: WebSocketConnection | None = None
        try:
            async with trio.open_nursery() as nursery:  # trio-websocket's reader task
                try:
                    with trio.fail_after(CONNECT_TIMEOUT):
                        if tls:
                            stream = await trio.open_ssl_over_tcp_stream(
                                host, port, ssl_context=ssl.create_default_context()
                            )
                        else:
                            stream = await trio.open_tcp_stream(host, port)
                        header = host if port in (80, 443) else f"{host}:{port}"
                        ws = await wrap_client_stream(
                            nursery,
                            stream,
                            header,
                            resource,
                            max_message_size=MAX_MESSAGE,
                            receive_buffer_size=RECEIVE_BUFFER,
                        )
                    link = await self._authenticate(ws)
                    welcomed = True
                    await self._run_link(link)
                    self.last_error = "connection lost"
                except (OSError, HandshakeError, WsClosed, trio.TooSlowError, P2PError) as exc:
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    level = logging.WARNING if isinstance(exc, RelayAuthFailed) else logging.INFO
                    log.log(level, "relay %s: %s", self.url, self.last_error)
                except trio.BrokenResourceError as exc:
                    self.last_error = f"connection broke: {exc}"
                finally:
                    if ws is not None and trio.current_effective_deadline() != -math.inf:
                        # a polite close when we can; when cancelled, trio-websocket's
                        # reader is cancelled too and would never see the relay's answer
                        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                            await ws.aclose()
                    nursery.cancel_scope.cancel()
        except Exception:  # a bug here must not take the node down: reconnect
            self.last_error = "unexpected error"
            log.exception("relay %s: unexpected error", self.url)
        finally:
            # ours to close: trio-websocket leaves it open when the relay closes first
            if stream is not None:
                await trio.aclose_forcefully(stream)
        return welcomed

    async def _authenticate(self, ws: WebSocketConnection) -> _Link:
        with trio.fail_after(CONNECT_TIMEOUT):
            challenge = decode_server(_binary(await ws.get_message()))
            if challenge["t"] != "challenge":
                raise RelayError(f"expected a challenge from the relay, got {challenge['t']}")
            if challenge["relay"] != self.relay_id:
                raise RelayAuthFailed(
                    f"the relay at {self.url} calls itself {challenge['relay']!r}, not"
                    f" {self.relay_id!r}: refusing to sign for it (start the relay with"
                    " --id set to the URL clients use)"
                )
            signed = auth_message(challenge["nonce"], self.relay_id)
            await ws.send_message(
                encode_client(
                    "auth",
                    dev=self.device_id,
                    pk=self._device.sign_pk,
                    sig=self._device.sign(DOMAIN_AUTH, signed),
                )
            )
            try:
                welcome = decode_server(_binary(await ws.get_message()))
            except WsClosed as exc:
                reason = exc.reason.reason if exc.reason is not None else "closed"
                raise RelayAuthFailed(f"the relay refused us: {reason}") from exc
            if welcome["t"] != "welcome":
                raise RelayError(f"expected welcome from the relay, got {welcome['t']}")
        return _Link(ws, welcome)

    async def _run_link(self, link: _Link) -> None:
        self._link = link
        self._connected.set()
        log.info("connected to relay %s as %s", self.url, self.device_id)
        try:
            async with trio.open_nursery() as nursery:
                link.nursery = nursery
                nursery.start_soon(self._pinger, link)
                nursery.start_soon(self._watcher, link)
                try:
                    await self._read(link)
                except RelayError as exc:  # the relay broke the protocol: reconnect
                    self.last_error = str(exc)
                    log.warning("relay %s: %s", self.url, exc)
                nursery.cancel_scope.cancel()
        finally:
            self._link = None
            self._connected = trio.Event()
            self._online.clear()
            link.shutdown("the relay connection dropped")

    async def _pinger(self, link: _Link) -> None:
        n = 0
        try:
            while True:
                await trio.sleep(PING_INTERVAL)
                n += 1
                await link.send(encode_client("ping", n=n))
        except TransportError:
            pass

    async def _watcher(self, link: _Link) -> None:
        try:
            while True:
                self._watch_changed = trio.Event()
                await link.send(encode_client("watch", ids=self._watch_ids()))
                await self._watch_changed.wait()
        except TransportError:
            pass

    def _watch_ids(self) -> list[str]:
        ids: list[str] = []
        for device in self._watch():
            if is_device_id(device) and device != self.device_id and device not in ids:
                ids.append(device)
        if len(ids) > MAX_WATCH:
            log.warning("watching only %d of %d devices on the relay", MAX_WATCH, len(ids))
        return ids[:MAX_WATCH]

    async def _read(self, link: _Link) -> None:
        """Read and act on the relay's messages until the websocket ends or breaks the
        protocol (then we reconnect)."""
        while True:
            with trio.move_on_after(DEAD_AFTER) as timer:
                try:
                    raw = await link.ws.get_message()
                except WsClosed as exc:
                    reason = exc.reason
                    self.last_error = f"closed by the relay: {reason}"
                    log.info("relay %s closed the connection: %s", self.url, reason)
                    return
            if timer.cancelled_caught:
                raise RelayError(f"no message from the relay for {DEAD_AFTER} s")
            try:
                msg = decode_server(_binary(raw))
            except WireError as exc:
                raise RelayError(f"the relay sent a bad message: {exc}") from exc
            await self._on_message(link, msg)

    async def _on_message(self, link: _Link, msg: dict[str, Any]) -> None:
        kind = msg["t"]
        if kind == "data":
            pipe = link.pipes.get(msg["cid"])
            if pipe is not None:
                await pipe._feed(msg["data"], msg["more"])
        elif kind == "open":
            self._incoming(link, msg["from"], msg["cid"])
        elif kind == "opened":
            pending = link.opening.pop(msg["cid"], None)
            if pending is None:  # the dial gave up waiting: close what the relay opened
                link.send_soon(encode_client("close", cid=msg["cid"]))
                return
            pipe, waiter = pending
            link.pipes[msg["cid"]] = pipe
            waiter.set("opened")
        elif kind == "closed":
            pending = link.opening.pop(msg["cid"], None)
            if pending is not None:
                pending[1].set(msg["code"])
            pipe = link.pipes.pop(msg["cid"], None)
            if pipe is not None:
                pipe._ended(CLOSE_CODES.get(msg["code"], msg["code"]))
        elif kind == "presence":
            self._presence(Presence(device=msg["id"], online=msg["online"]))
        elif kind == "mail":
            self._mail(Mail(id=msg["id"], sender=msg["from"], data=msg["data"], _client=self))
        elif kind in ("posted", "error"):
            for waiter in link.posts.pop(msg["id"], []):
                waiter.set("posted" if kind == "posted" else msg["code"])
        elif kind == "pong":
            pass
        else:  # challenge or welcome again
            raise RelayError(f"unexpected {kind} from the relay")

    def _incoming(self, link: _Link, peer: str, cid: int) -> None:
        if cid < CLIENT_CID_LIMIT or cid in link.pipes:
            raise RelayError(f"the relay opened pipe {cid}, which it may not")
        pipe = RelayPipe(link, cid, peer, self._first_limit)
        link.pipes[cid] = pipe
        if self._nursery is None or self._handler is None:
            link.pipes.pop(cid)
            link.send_soon(encode_client("close", cid=cid))
            return
        self._nursery.start_soon(self._run_handler, self._handler, pipe)

    async def _run_handler(self, handler: Handler, pipe: RelayPipe) -> None:
        try:
            await handler(pipe)
        except TransportError as exc:
            log.debug("relay pipe from %s ended: %s", pipe.peer, exc)
        finally:
            with trio.CancelScope(shield=True):
                await pipe.aclose()

    def _presence(self, change: Presence) -> None:
        if change.online:
            self._online.add(change.device)
        else:
            self._online.discard(change.device)
        for sub in list(self._subscribers):
            try:
                sub.send_nowait(change)
            except trio.WouldBlock:
                log.debug("presence subscriber is behind; dropped %s", change)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                self._subscribers.remove(sub)

    def _mail(self, item: Mail) -> None:
        try:
            self._mail_send.send_nowait(item)
        except trio.WouldBlock:
            self.dropped_mail += 1  # still on the relay: it comes again next connection
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass


def _split_url(url: str) -> tuple[str, int, str, bool]:
    """``ws[s]://host[:port][/path]`` -> (host, port, resource, tls); RelayError else."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise RelayError(f"not a relay URL: {url!r}") from exc
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise RelayError(f"not a ws:// or wss:// relay URL: {url!r}")
    tls = parts.scheme == "wss"
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.hostname, port or (443 if tls else 80), resource, tls


def _binary(message: str | bytes) -> bytes:
    if isinstance(message, str):
        raise RelayError("the relay sent a text message")
    return message
