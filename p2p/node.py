"""The embedding API: a running device, owning one trio nursery.

``async with open_node(home) as node:`` loads the device from its store, serves its
transport, dials its peers, and runs three kinds of tasks, all inside the node's nursery:

- a *writer* that group-commits write batches to the store (``send`` awaits its own
  batch: a message that ``send`` returned is durable);
- a *gossiper* that coalesces local updates per space into one sealed envelope and
  pushes it to every open session that may read the space;
- one task per connection, driving a sans-I/O :class:`~p2p.sync.Session`: it feeds the
  session frames and time, and carries out what the session returns.

Leaving the ``async with`` flushes pending writes, then cancels and joins everything.
Errors from inside surface as our own :class:`~p2p.errors.P2PError`, not as exception
groups.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Final

import pycrdt
import trio

from p2p import events as ev
from p2p.core import DeviceState, Ingested, Space, merge_batches
from p2p.discovery.base import Discovery, Found, Source, StaticPeers
from p2p.errors import (
    NodeError,
    P2PError,
    RemovedDevice,
    ReplayDetected,
    RollbackRefused,
    UnknownKey,
)
from p2p.home import open_home_store
from p2p.linking import Linked, approve_code
from p2p.media.descriptor import Attachment, file_body
from p2p.media.service import MediaService, open_blobs
from p2p.media.store import BlobStore
from p2p.model import MAX_BODY, Message
from p2p.relay.client import RelayClient, is_relay_address
from p2p.relay.routing import RoutedTransport
from p2p.storage.base import Store, WriteBatch
from p2p.storage.memory import MemoryStore
from p2p.sync import (
    Authenticated,
    Closed,
    DeviceListIn,
    EnvelopeIn,
    LeaseIn,
    LeaveRequested,
    MediaIn,
    Output,
    Send,
    Session,
    State,
)
from p2p.transport.base import Connection, ConnectionClosed, TransportError
from p2p.transport.base import Transport as TransportT

log = logging.getLogger("p2p.node")

SEND_QUEUE: Final = 1024
"""Frames queued per peer; a peer that falls this far behind is disconnected (and
caught up by state vectors when it reconnects) instead of growing our memory."""
MAX_HANDSHAKES: Final = 64
"""Connections allowed to be mid-handshake at once; more are closed on arrival."""
WRITE_QUEUE: Final = 4096
"""Batches waiting for the store before receivers are made to wait too."""
EVENT_QUEUE: Final = 1024
BACKOFF_MIN: Final = 0.2
BACKOFF_MAX: Final = 30.0
COMPACT_AFTER: Final = 5000
"""Updates appended to a space's log before it is folded into a snapshot."""
COALESCE_MAX: Final = 1_000_000
"""Largest merged update sealed as one envelope: the same envelope goes to connected
peers and, through the relay, into the mailboxes of offline ones (1 MiB each)."""
MAIL_POSTS: Final = 256
"""Mailbox posts in flight at once; past that, offline peers catch up by state vector."""


def wall_clock_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class _Ended:
    authenticated: bool
    duplicate_of: str | None


@dataclass
class _Peer:
    session: Session
    queue: trio.MemorySendChannel[bytes]
    remote: str
    since: float
    wake: trio.Event
    """Set when the pump has something to write: a sync frame, or media (p2p.media)."""


class Node:
    """A running device. Create with :func:`open_node`."""

    def __init__(
        self,
        state: DeviceState,
        store: Store,
        nursery: trio.Nursery,
        *,
        transport: TransportT | None,
        wall_ms: Callable[[], int],
        relays: Sequence[RelayClient] = (),
        blobs: BlobStore,
    ) -> None:
        self.state = state
        self.relays = list(relays)
        self._posting = 0
        self.store = store
        self.transport = transport
        self._nursery = nursery
        self._wall_ms = wall_ms
        self._peers: dict[str, _Peer] = {}
        self._peers_changed = trio.Event()
        self._writes: list[tuple[WriteBatch, trio.Event]] = []
        self._write_wakeup = trio.Event()
        self._write_room = trio.Event()
        self._outbox: dict[str, list[bytes]] = {}
        self._outbox_wakeup = trio.Event()
        self._subscribers: list[trio.MemorySendChannel[ev.Event]] = []
        self._reported: set[tuple[str, str]] = set()
        self._known_devices = set(state.device_list.ids)
        self._leaving = False
        self._handshaking = 0
        """Connections that have not finished the handshake (bounded: MAX_HANDSHAKES)."""
        """Set once ``leave`` was asked for (kept in the store until the primary acts)."""
        self._closed_stats = {"bytes_out": 0, "bytes_in": 0, "frames_out": 0, "frames_in": 0}
        """Spaces changed by peers since our clock last saw their timestamps."""
        self._closed = False
        self._found_send, self._found_receive = trio.open_memory_channel[Found](64)
        self._dialing: dict[str, str] = {}
        """Address -> where it was found ('static', 'mdns', ...), one dial loop each."""
        self.dropped_events = 0
        self.media = MediaService(
            blobs, self, wall_ms=wall_ms, emit=self._emit, wake=self._wake_peer
        )
        """Attachments (p2p.media): its ``run`` task is started by :func:`open_node`."""

    # ---- identity and reading ------------------------------------------------------

    @property
    def device_id(self) -> str:
        return self.state.device_id

    @property
    def account_id(self) -> str:
        return self.state.account_id

    @property
    def address(self) -> str | None:
        """Where peers can dial this node, when it serves a transport."""
        return self.transport.address if self.transport else None

    @property
    def connected_peers(self) -> list[str]:
        """Device ids with an authenticated session right now."""
        return sorted(self._peers)

    def chats(self) -> list[Space]:
        """Conversation spaces this device holds."""
        return [s for s in self.state.spaces.values() if s.kind == "chat"]

    def default_chat(self) -> str:
        """The chat used when none is named: the account's notes chat."""
        return self.chats()[0].id if len(self.chats()) == 1 else self.state.chat_by_name("notes").id

    def messages(self, chat: str | None = None) -> list[Message]:
        """Messages of a chat in display order (the same on every replica).

        Entries whose signature fails are left out and reported once each as
        :class:`~p2p.events.EntryRejected`.
        """
        space = self.state.chat_by_name(chat) if chat else self.state.space(self.default_chat())
        shown, rejected = space.replica.view(self.state.any_signing_key, self.state.account_of)
        for r in rejected:
            if (r.space, r.entry_id) not in self._reported:
                self._reported.add((r.space, r.entry_id))
                log.warning(
                    "hidden entry %s in %s from %s: %s", r.entry_id, r.space, r.device, r.reason
                )
                self._emit(
                    ev.EntryRejected(
                        chat=r.space, entry_id=r.entry_id, device=r.device, reason=r.reason
                    )
                )
        return shown

    def status(self) -> dict[str, Any]:
        """What ``p2p status`` shows: this device, its peers, its spaces, pending work."""
        now = trio.current_time()
        return {
            "device": self.device_id,
            "name": self.state.name,
            "account": self.account_id,
            "role": "primary" if self.state.is_primary else "companion",
            "address": self.address,
            "device_list_version": self.state.device_list.version,
            "primary": self.state.device_list.primary.device_id,
            "peers": [
                {
                    "device": d,
                    "remote": p.remote,
                    "found_via": self._dialing.get(p.remote, "incoming"),
                    "connected_for": round(now - p.since, 3),
                }
                for d, p in sorted(self._peers.items())
            ],
            "spaces": [
                {
                    "id": s.id,
                    "kind": s.kind,
                    "name": s.name,
                    "epoch": s.epoch,
                    "entries": s.replica.count(),
                }
                for s in self.state.spaces.values()
            ],
            "pending_writes": len(self._writes),
            "pending_gossip": sum(len(v) for v in self._outbox.values()),
            "traffic": self.traffic(),
            "relays": [
                {"url": r.url, "connected": r.connected, "address": r.address} for r in self.relays
            ],
            "media": self.media.status(),
        }

    def traffic(self) -> dict[str, int]:
        """Bytes and frames this node sent and received over all its sessions so far."""
        live = [p.session.stats for p in self._peers.values()]
        return {
            "bytes_out": self._closed_stats["bytes_out"] + sum(s.bytes_out for s in live),
            "bytes_in": self._closed_stats["bytes_in"] + sum(s.bytes_in for s in live),
            "frames_out": self._closed_stats["frames_out"] + sum(s.frames_out for s in live),
            "frames_in": self._closed_stats["frames_in"] + sum(s.frames_in for s in live),
        }

    def events(self) -> trio.MemoryReceiveChannel[ev.Event]:
        """Events from this call on: ``with node.events() as events: async for e in events``.

        The subscription starts when this is called, not when iteration begins, so
        nothing between the two is lost; leaving the ``with`` ends it. Same as
        :meth:`subscribe`.
        """
        return self.subscribe()

    def subscribe(self) -> trio.MemoryReceiveChannel[ev.Event]:
        """A channel of events from this instant on, until the node closes.

        A slow reader loses events (counted in ``dropped_events``) rather than making the
        node buffer without bound. Close the channel to unsubscribe.
        """
        send, receive = trio.open_memory_channel[ev.Event](EVENT_QUEUE)
        self._subscribers.append(send)
        return receive

    # ---- writing -------------------------------------------------------------------

    async def send(self, text: str, *, chat: str | None = None) -> str:
        """Send a message; returns its id once it is durable in the store."""
        if len(text.encode("utf-8", "surrogatepass")) > MAX_BODY:
            raise NodeError(f"message longer than {MAX_BODY} bytes")
        return await self._write(chat, "msg", body=text)

    async def edit(self, message_id: str, text: str, *, chat: str | None = None) -> str:
        """Replace a message's text (only its author's account can)."""
        if len(text.encode("utf-8", "surrogatepass")) > MAX_BODY:
            raise NodeError(f"message longer than {MAX_BODY} bytes")
        return await self._write(chat, "edit", body=text, target=message_id)

    async def delete(self, message_id: str, *, chat: str | None = None) -> str:
        """Delete a message for everyone (a tombstone; only its author's account can)."""
        return await self._write(chat, "del", target=message_id)

    async def react(self, message_id: str, emoji: str, *, chat: str | None = None) -> str:
        """Set this account's reaction to a message ('' withdraws it)."""
        if len(emoji) > 16:
            raise NodeError("a reaction is at most 16 characters")
        return await self._write(chat, "react", body=emoji, target=message_id)

    async def mark_read(self, *, chat: str | None = None) -> str:
        """Record that this device has shown the chat up to its newest message."""
        shown = self.messages(chat)
        return await self._write(chat, "read", body=shown[-1].ts if shown else "")

    async def _write(self, chat: str | None, kind: Any, *, body: str = "", target: str = "") -> str:
        if self._closed:
            raise NodeError("the node is closed")
        space = self.state.chat_by_name(chat) if chat else self.state.space(self.default_chat())
        if space.replica.latest_ts:  # sort after everything this chat has seen so far
            self.state.clock.observe(space.replica.latest_ts, self._wall_ms())
        entry = self.state.new_entry(space.id, kind, self._wall_ms(), body=body, target=target)
        update, batch = self.state.write_local(space.id, [entry])
        await self._commit(batch)
        self._outbox.setdefault(space.id, []).append(update)
        self._outbox_wakeup.set()
        self._emit(ev.ChatChanged(chat=space.id, origin=self.device_id))
        return entry.id

    def _queue_write(self, batch: WriteBatch) -> trio.Event:
        """Queue a batch for the writer, in order; the event fires once it is durable."""
        done = trio.Event()
        self._writes.append((batch, done))
        self._write_wakeup.set()
        return done

    async def _commit(self, batch: WriteBatch) -> None:
        """Write a batch and wait until it is durable."""
        await self._queue_write(batch).wait()

    async def _write_backpressure(self) -> None:
        """Make a receiver wait while the store is far behind (bounded memory)."""
        while len(self._writes) >= WRITE_QUEUE:
            self._write_room = trio.Event()
            await self._write_room.wait()

    async def _writer(self) -> None:
        while True:
            await self._write_wakeup.wait()
            self._write_wakeup = trio.Event()
            await self._flush_writes()

    async def _flush_writes(self) -> None:
        while self._writes or self.state.unsaved:
            taken, self._writes = self._writes, []
            self._write_room.set()
            batch = merge_batches([b for b, _ in taken] + [self.state.take_unsaved()])
            if batch:
                await self._run_store(self.store.write, batch)
                for space_id, _update in batch.appends:
                    self.state.spaces[space_id].log_seq += 1
                await self._compact(batch.appends)
            for _, done in taken:
                done.set()

    async def _compact(self, appends: list[tuple[str, bytes]]) -> None:
        """Fold a space's update log into a snapshot once its tail grows long, so that
        opening the store stays fast (one snapshot plus a short tail)."""
        for space_id in {s for s, _ in appends}:
            space = self.state.spaces[space_id]
            if space.log_seq - space.snapshot_seq < COMPACT_AFTER:
                continue
            # every update up to log_seq is in the replica, so this snapshot covers them
            snapshot, upto = space.replica.snapshot(), space.log_seq
            await self._run_store(self.store.compact, space_id, snapshot, upto)
            space.snapshot_seq = upto

    async def _run_store(self, fn: Callable[..., None], *args: Any) -> None:
        """Call the store off the trio thread when it does disk I/O."""
        if isinstance(self.store, MemoryStore):
            fn(*args)
        else:
            await trio.to_thread.run_sync(fn, *args)

    # ---- media (p2p.media; docs/media.md) -------------------------------------------

    async def send_file(
        self, path: str | os.PathLike[str], text: str = "", *, chat: str | None = None
    ) -> str:
        """Send a file (with an optional caption); returns the message id once the
        message is durable. The file is encrypted into chunks here, and peers fetch
        them on the media lane, by their own policy."""
        attachment = await self.media.prepare(path)
        return await self._write(chat, "file", body=file_body(text, attachment))

    async def fetch(self, message_id: str, *, chat: str | None = None) -> Attachment:
        """Fetch a message's attachment from whichever peers have it (progress comes
        as :class:`~p2p.events.MediaProgress` events)."""
        return await self.media.fetch(message_id, chat)

    async def open_attachment(
        self, message_id: str, out: str | os.PathLike[str], *, chat: str | None = None
    ) -> Attachment:
        """Write a message's attachment, decrypted, to ``out``; MediaMissing if it is
        not all here yet."""
        return await self.media.open(message_id, out, chat)

    # ---- gossip --------------------------------------------------------------------

    async def _gossiper(self) -> None:
        while True:
            await self._outbox_wakeup.wait()
            self._outbox_wakeup = trio.Event()
            await trio.lowlevel.checkpoint()  # let concurrent sends join this round
            outbox, self._outbox = self._outbox, {}
            for space_id, updates in outbox.items():
                readers = {
                    d
                    for d in self.state.device_list.ids - {self.device_id}
                    if space_id in self.state.spaces_for(d)
                }
                offline = sorted(readers - set(self._peers)) if self.relays else []
                if not readers & set(self._peers) and not offline:
                    continue  # nobody to tell now; state vectors catch peers up later
                for payload in _coalesce(updates):
                    envelope = self.state.seal(space_id, payload)
                    self._broadcast(space_id, envelope, exclude=())
                    for device in offline:
                        self._post_mail(device, envelope)
            if self.state.unsaved:
                self._queue_write(WriteBatch())

    def _post_mail(self, device: str, envelope: bytes) -> None:
        """Leave an envelope in an offline device's relay mailbox (in the background)."""
        if self._posting >= MAIL_POSTS:
            log.debug("mail to %s dropped: %d posts in flight", device, self._posting)
            return
        self._posting += 1

        async def post() -> None:
            try:
                for relay in self.relays:
                    try:
                        await relay.post(device, envelope)
                        return
                    except P2PError as exc:
                        log.info("relay %s refused mail to %s: %s", relay.url, device, exc)
            finally:
                self._posting -= 1

        self._nursery.start_soon(post)

    async def _drain_mail(self, relay: RelayClient) -> None:
        """Apply what offline peers left for us, acknowledging each once it is durable."""
        async for mail in relay.mail():
            try:
                ingested = self.state.ingest(mail.data)
            except (ReplayDetected, UnknownKey):
                pass  # already here by another path, or a space we do not hold
            except P2PError as exc:
                log.warning("refused mail from %s: %s", mail.sender, exc)
                self._emit(
                    ev.InputRejected(
                        remote=relay.url,
                        device=mail.sender,
                        error=type(exc).__name__,
                        detail=str(exc),
                    )
                )
            else:
                await self._accepted(ingested, mail.data, came_from=relay.url).wait()
            with contextlib.suppress(P2PError):
                await mail.ack()

    def _broadcast(self, space_id: str, envelope: bytes, *, exclude: Sequence[str]) -> None:
        for device, peer in list(self._peers.items()):
            if device in exclude or space_id not in self.state.spaces_for(device):
                continue
            self._carry_out(peer, peer.session.send_envelope(envelope))

    # ---- connections ---------------------------------------------------------------

    async def connect(self, address: str, *, source: Source = "static") -> None:
        """Keep a connection to ``address`` (dial, redial with backoff) until the node closes."""
        if self.transport is None:
            raise NodeError("this node has no transport to dial with")
        if address in self._dialing or address == self.transport.address:
            return
        self._dialing[address] = source
        self._nursery.start_soon(self._dial_loop, address)

    async def add_discovery(self, adapter: Discovery) -> None:
        """Run a discovery adapter in the node; what it finds is dialed (once started)."""
        await self._nursery.start(adapter.run, self.found_channel())

    def found_channel(self) -> trio.MemorySendChannel[Found]:
        """Where a discovery adapter run outside the node (in the caller's nursery, to
        restart it at will) reports what it finds."""
        if self.transport is None:
            raise NodeError("discovery needs a transport to dial with")
        return self._found_send.clone()

    async def _merge_found(self) -> None:
        """Dial every new address any discovery adapter reports."""
        async with self._found_receive:
            async for found in self._found_receive:
                if found.device is not None and (
                    found.device in self._peers or found.device == self.device_id
                ):
                    continue
                log.info("found %s via %s (%s)", found.address, found.source, found.device)
                await self.connect(found.address, source=found.source)

    async def _dial_loop(self, address: str) -> None:
        assert self.transport is not None
        backoff = BACKOFF_MIN
        while True:
            try:
                conn = await self.transport.dial(address)
            except TransportError as exc:
                log.debug("dial %s failed: %s", address, exc)
                await trio.sleep(backoff * random.uniform(0.5, 1.5))
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            ended = await self._run_connection(conn, initiator=True)
            if ended.duplicate_of is not None:
                # another connection to this device won; redial only once it is gone
                while ended.duplicate_of in self._peers:
                    await self._peers_changed.wait()
            # a peer that refused us (removed, stranger, garbage) is retried ever more
            # slowly; one that talked to us gets a quick redial
            backoff = BACKOFF_MIN if ended.authenticated else min(backoff * 2, BACKOFF_MAX)
            await trio.sleep(backoff * random.uniform(0.5, 1.5))

    async def _accept(self, conn: Connection) -> None:
        if self._handshaking >= MAX_HANDSHAKES:
            log.warning("refused %s: %d handshakes already under way", conn.remote, MAX_HANDSHAKES)
            await conn.aclose()
            return
        await self._run_connection(conn, initiator=False)

    async def _run_connection(self, conn: Connection, *, initiator: bool) -> _Ended:
        """Drive one session over ``conn`` until it ends; say how it went."""
        session = Session(
            self.state, initiator=initiator, now=trio.current_time(), wall_ms=self._wall_ms()
        )
        send_q, recv_q = trio.open_memory_channel[bytes](SEND_QUEUE)
        peer = _Peer(session, send_q, conn.remote, trio.current_time(), trio.Event())
        duplicate: str | None = None
        self._handshaking += 1
        handshaking = True
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump_out, conn, recv_q, nursery.cancel_scope, peer)
                if not self._carry_out(peer, session.start()):
                    return _Ended(authenticated=False, duplicate_of=None)
                while session.state is not State.CLOSED:
                    if handshaking and session.state is State.OPEN:
                        self._handshaking -= 1
                        handshaking = False
                    with trio.move_on_at(session.next_deadline()) as timer:
                        try:
                            data = await conn.receive()
                        except P2PError as exc:  # broken connection, or an oversized frame
                            self._carry_out(peer, session.close(exc))
                            break
                        self._carry_out(peer, session.receive(data, trio.current_time()))
                    if timer.cancelled_caught:
                        self._carry_out(peer, session.tick(trio.current_time()))
                    if (
                        session.state is State.OPEN
                        and self._peers.get(session.peer or "") is not peer
                    ):
                        duplicate = session.peer  # the other connection to this device won
                        self._carry_out(peer, session.close())
                    await self._write_backpressure()
                send_q.close()  # let the pump flush what is queued, then end
                peer.wake.set()
        finally:
            if handshaking:  # never reached OPEN
                self._handshaking -= 1
            for key in self._closed_stats:  # live sessions are summed in traffic()
                self._closed_stats[key] += getattr(session.stats, key)
            if session.peer is not None and self._peers.get(session.peer) is peer:
                del self._peers[session.peer]
                self._peers_changed.set()
                self._peers_changed = trio.Event()
            with trio.CancelScope(shield=True):
                await conn.aclose()
        return _Ended(authenticated=not handshaking, duplicate_of=duplicate)

    async def _pump_out(
        self,
        conn: Connection,
        frames: trio.MemoryReceiveChannel[bytes],
        scope: trio.CancelScope,
        peer: _Peer,
    ) -> None:
        """Write the session's frames; media only when no sync frame waits (two lanes)."""
        try:
            async with frames:
                while True:
                    try:
                        frame: bytes | None = frames.receive_nowait()
                    except trio.WouldBlock:
                        frame = self._media_frame(peer)
                    except trio.EndOfChannel:
                        return
                    if frame is None:
                        peer.wake = trio.Event()
                        await peer.wake.wait()
                        continue
                    await conn.send(frame)
        except TransportError:
            scope.cancel()

    def _media_frame(self, peer: _Peer) -> bytes | None:
        """The next frame of the media lane, sealed now (so that it takes the box's
        next number after every sync frame already queued)."""
        device = peer.session.peer
        if device is None or self._peers.get(device) is not peer:
            return None
        item = self.media.next_out(device)
        if item is None:
            return None
        kind, fields = item
        sent = peer.session.send_media(kind, **fields)
        return sent[0].data if sent and isinstance(sent[0], Send) else None

    def _wake_peer(self, device: str) -> None:
        peer = self._peers.get(device)
        if peer is not None:
            peer.wake.set()

    def _carry_out(self, peer: _Peer, outputs: list[Output]) -> bool:
        """Do what the session asked; False once the session is closed.

        Frames go out first, in the order the session sealed them: handling the other
        outputs may make this session seal more (a leave request, a bye), and its box
        numbers frames, so those must queue behind the ones already sealed.
        """
        alive = True
        ordered: list[Output] = [o for o in outputs if isinstance(o, Send)]
        ordered += [o for o in outputs if not isinstance(o, Send)]
        for out in ordered:
            if isinstance(out, Send):
                try:
                    peer.queue.send_nowait(out.data)
                    peer.wake.set()
                except trio.WouldBlock:
                    log.warning("peer %s is too slow; disconnecting it", peer.session.peer)
                    self._carry_out(peer, peer.session.close(NodeError("peer too slow")))
                    alive = False
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    alive = False
            elif isinstance(out, EnvelopeIn):
                self._receive_envelope(peer, out.data)
            elif isinstance(out, Authenticated):
                self._on_authenticated(peer, out.device)
            elif isinstance(out, DeviceListIn):
                self._adopt_device_list(peer, out.data)
            elif isinstance(out, LeaveRequested):
                if self.state.is_primary and out.device in self.state.device_list.ids:
                    log.info("device %s asked to be unlinked", out.device)
                    self._nursery.start_soon(self.unlink, out.device)
            elif isinstance(out, LeaseIn):
                try:
                    self._queue_write(self.state.accept_lease(out.data, self._wall_ms()))
                except P2PError as exc:
                    self._carry_out(peer, peer.session.close(exc))
            elif isinstance(out, MediaIn):
                device = peer.session.peer
                if device is not None and self._peers.get(device) is peer:
                    error = self.media.frame_in(device, out.kind, out.fields)
                    if error is not None:
                        self._carry_out(peer, peer.session.close(error))
            elif isinstance(out, Closed):
                alive = False
                self._on_closed(peer, out.error)
        return alive and peer.session.state is not State.CLOSED

    def _on_authenticated(self, peer: _Peer, device: str) -> None:
        existing = self._peers.get(device)
        if existing is not None and existing.session.state is State.OPEN:
            # one connection per device pair, the same one chosen at both ends
            if not self._keep_new(peer, existing):
                return  # the connection loop notices it is not registered and closes it
            self._carry_out(existing, existing.session.close())
        self._peers[device] = peer
        peer.since = trio.current_time()
        if device == self.state.device_list.primary.device_id and self._leaving:
            self._carry_out(peer, peer.session.send_leave())
        self._peers_changed.set()
        self._peers_changed = trio.Event()
        log.info("connected to %s via %s", device, peer.remote)
        self._queue_write(self._seen(device))
        self._emit(ev.PeerConnected(device=device, remote=peer.remote))

    def _seen(self, device: str) -> WriteBatch:
        """Remember when we last had a session with ``device`` (``p2p devices``)."""
        return WriteBatch(records={f"seen/{device}": str(self._wall_ms()).encode()})

    def _keep_new(self, new: _Peer, existing: _Peer) -> bool:
        """Deterministic choice between two connections to the same device: both ends
        keep the one dialed by the device with the smaller id."""
        assert new.session.peer is not None
        new_relayed, old_relayed = is_relay_address(new.remote), is_relay_address(existing.remote)
        if new_relayed != old_relayed:
            return old_relayed  # a direct link beats a relayed one, at both ends
        if new.session.initiator == existing.session.initiator:
            return True  # a redial: the old connection is stale
        smaller_is_me = self.device_id < new.session.peer
        # keep the connection where the smaller device is the initiator
        return (
            new.session.initiator == smaller_is_me and existing.session.initiator != smaller_is_me
        )

    def _on_closed(self, peer: _Peer, error: P2PError | None) -> None:
        device = peer.session.peer
        if error is not None and not isinstance(error, ConnectionClosed):
            log.warning("closed connection %s (%s): %s", peer.remote, device, error)
            self._emit(
                ev.InputRejected(
                    remote=peer.remote, device=device, error=type(error).__name__, detail=str(error)
                )
            )
        if device is not None and self._peers.get(device) is peer:
            self._queue_write(self._seen(device))
            self._emit(
                ev.PeerDisconnected(
                    device=device,
                    reason="" if error is None else f"{type(error).__name__}: {error}",
                )
            )

    def _receive_envelope(self, peer: _Peer, data: bytes) -> None:
        try:
            ingested = self.state.ingest(data)
        except (ReplayDetected, UnknownKey) as exc:
            # the same envelope over two gossip paths, or a space we don't hold: harmless
            log.debug("dropped envelope from %s: %s", peer.session.peer, exc)
            return
        except P2PError as exc:
            self._carry_out(peer, peer.session.close(exc))
            return
        self._accepted(ingested, data, came_from=peer.session.peer or "")

    def _accepted(self, ingested: Ingested, envelope: bytes, *, came_from: str) -> trio.Event:
        """After an envelope applied, from a session or a mailbox: persist it (in order;
        the event fires once durable), pass it on to the other peers, tell the app."""
        durable = self._queue_write(ingested.batch)
        self._broadcast(ingested.space, envelope, exclude=(came_from, ingested.sender))
        self._emit(ev.ChatChanged(chat=ingested.space, origin=ingested.sender))
        return durable

    def _adopt_device_list(self, peer: _Peer, data: bytes) -> None:
        try:
            batch = self.state.offer_device_list(data)
        except RollbackRefused:
            return  # an older list through a slower path: ours is newer, nothing to do
        except P2PError as exc:
            self._carry_out(peer, peer.session.close(exc))
            return
        if batch is not None:
            self._queue_write(batch)
            self._device_list_changed()

    def _device_list_changed(self) -> None:
        """Tell every peer about our newer list, drop removed ones, tell the app."""
        dl = self.state.device_list
        data = dl.encode()
        for device, peer in list(self._peers.items()):
            if device not in dl.ids:
                self._carry_out(peer, peer.session.close(RemovedDevice(device)))
            else:
                self._carry_out(peer, peer.session.send_device_list(data))
        for relay in self.relays:
            relay.update_watch()
        added = tuple(sorted(dl.ids - self._known_devices))
        removed = tuple(sorted(self._known_devices - dl.ids))
        self._known_devices = set(dl.ids)
        log.info("device list version %d: added %s, removed %s", dl.version, added, removed)
        self._emit(
            ev.DeviceListChanged(
                version=dl.version, devices=tuple(sorted(dl.ids)), added=added, removed=removed
            )
        )

    async def unlink(self, device_id: str) -> None:
        """Primary only: remove a device, rotate keys, tell the remaining devices now."""
        await self._commit(self.state.unlink(device_id))
        self._device_list_changed()

    async def approve(
        self,
        code: str,
        *,
        confirm: Callable[[str], Awaitable[bool]],
        connect: str | None = None,
        progress: Callable[[int, int], None] = lambda done, total: None,
    ) -> Linked:
        """Primary only: link the device showing pairing ``code`` (see ``p2p.linking``)."""

        async def read(name: str) -> bytes | None:
            return await trio.to_thread.run_sync(self.store.get, name)

        linked = await approve_code(
            self.state,
            code,
            read=read,
            write=self._commit,
            confirm=confirm,
            now_s=self._wall_ms() // 1000,
            connect=connect,
            progress=progress,
        )
        self._device_list_changed()
        return linked

    async def leave(self) -> None:
        """Companion: ask the primary to unlink this device, now if it is connected, else
        at the next meeting (the request is kept in the store until then)."""
        if self.state.is_primary:
            raise NodeError("the primary cannot leave its own account")
        await self._commit(WriteBatch(records={"leave/requested": b"1"}))
        self._leaving = True
        primary = self._peers.get(self.state.device_list.primary.device_id)
        if primary is not None:
            self._carry_out(primary, primary.session.send_leave())

    def _emit(self, event: ev.Event) -> None:
        self.media.observe(event)  # peers up and down, chats changed (p2p.media)
        for sub in list(self._subscribers):
            try:
                sub.send_nowait(event)
            except trio.WouldBlock:
                self.dropped_events += 1
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                self._subscribers.remove(sub)

    async def _close(self) -> None:
        self._closed = True
        await self._flush_writes()
        for sub in self._subscribers:
            sub.close()


def _coalesce(updates: list[bytes]) -> list[bytes]:
    """Merge consecutive updates into as few payloads as fit in one envelope."""
    out: list[bytes] = []
    group: list[bytes] = []
    size = 0
    for u in updates:
        if group and size + len(u) > COALESCE_MAX:
            out.append(_merge(group))
            group, size = [], 0
        group.append(u)
        size += len(u)
    if group:
        out.append(_merge(group))
    return out


def _merge(updates: list[bytes]) -> bytes:
    return updates[0] if len(updates) == 1 else bytes(pycrdt.merge_updates(*updates))


@asynccontextmanager
async def open_node(
    home: str | os.PathLike[str] | None = None,
    *,
    store: Store | None = None,
    transport: TransportT | None = None,
    peers: Sequence[str] = (),
    discovery: Sequence[Discovery] = (),
    relays: Sequence[str] = (),
    wall_ms: Callable[[], int] = wall_clock_ms,
    blobs: BlobStore | None = None,
) -> AsyncIterator[Node]:
    """Run the device stored in ``home`` (or in ``store``) until the block exits.

    ``transport`` accepts and makes connections (none: the node works offline);
    ``peers`` are addresses to keep connected to; ``discovery`` adapters report more
    (mDNS, ...) as they find them; ``relays`` are rendezvous relay URLs (``ws://...``):
    the node meets linked devices through them and leaves mail for offline ones.
    ``wall_ms`` is the time used for
    message timestamps (tests pass a virtual clock). Attachments are kept in ``blobs``
    (the caller's, left open), else in ``<home>/media.db``, else (a node opened on a
    ``store``) in memory.
    """
    if (home is None) == (store is None):
        raise NodeError("open_node needs exactly one of home or store")
    owned = store is None
    the_store: Store = open_home_store(home) if store is None else store  # type: ignore[arg-type]
    own_blobs = blobs is None
    try:
        if blobs is None:
            blobs = open_blobs(home)
        state = await trio.to_thread.run_sync(DeviceState.load, the_store)
        # counters used from now on are reserved on disk before anything is sealed
        await trio.to_thread.run_sync(the_store.write, state.reserve_counters())
        try:
            async with trio.open_nursery() as nursery:
                clients = [
                    RelayClient(url, state.keys, watch=partial(_linked_ids, state))
                    for url in relays
                ]
                if clients:
                    transport = RoutedTransport(transport, clients)
                node = Node(
                    state,
                    the_store,
                    nursery,
                    transport=transport,
                    wall_ms=wall_ms,
                    relays=clients,
                    blobs=blobs,
                )
                node._leaving = the_store.get("leave/requested") is not None
                await nursery.start(node.media.run)
                nursery.start_soon(node._writer)
                nursery.start_soon(node._gossiper)
                if transport is not None:
                    await nursery.start(transport.serve, node._accept)
                nursery.start_soon(node._merge_found)
                for client in clients:
                    nursery.start_soon(node._drain_mail, client)
                    await node.add_discovery(client)
                for adapter in [*discovery, StaticPeers(list(peers))] if peers else discovery:
                    await node.add_discovery(adapter)
                try:
                    yield node
                finally:
                    with trio.CancelScope(shield=True):
                        await node._close()
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise _unwrap(group) from None
    finally:
        if own_blobs and blobs is not None:
            blobs.close()
        if owned:
            the_store.close()


def _linked_ids(state: DeviceState) -> list[str]:
    """The devices a relay should tell us about: our account's others."""
    return sorted(state.device_list.ids - {state.device_id})


def _unwrap(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one meaningful error inside a group from the node's nursery."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    for leaf in leaves:
        if not isinstance(leaf, trio.Cancelled):
            return leaf
    return group
