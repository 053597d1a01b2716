"""The embedding API: a running device, owning one trio nursery.

``async with open_node(home) as node:`` loads the device from its store, serves its
transport, dials its peers, and runs three kinds of tasks, all inside the node's nursery:

- a *writer* that group-commits write batches to the store (``send`` awaits its own
  batch: a message that ``send`` returned is durable);
- a *gossiper* that coalesces local updates per space into one sealed envelope and
  pushes it to every open session that may read the space;
- one task per connection, driving a sans-I/O :class:`~p2p.proto.session.Session`: it feeds the
  session frames and time, and carries out what the session returns.

Leaving the ``async with`` flushes pending writes, then cancels and joins everything.
Errors from inside surface as our own :class:`~p2p.errors.P2PError`, not as exception
groups.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, TypeVar

import pycrdt
import trio

from p2p import events as ev
from p2p.discovery.base import Discovery, Found, Source, StaticPeers
from p2p.errors import (
    ChatCorrupt,
    ContactError,
    GrantFromNonMember,
    InvalidUpdate,
    NodeError,
    P2PError,
    RemovedDevice,
    ReplayDetected,
    RollbackRefused,
    StoreCorrupt,
    UnknownChat,
    UnknownKey,
    Unlinked,
    WireError,
)
from p2p.media.descriptor import Attachment, file_body
from p2p.media.service import MediaService, open_blobs
from p2p.media.store import BlobStore
from p2p.proto.authority import EpochSplit, RotationUnproven
from p2p.proto.contacts import ContactCode
from p2p.proto.gossip import (
    KNOWN_DIGESTS,
    RECENT_BYTES,
    RECENT_ENVELOPES,
    WANT_DELAY,
    WANT_TASKS,
    WANT_TIMEOUT,
    Accepted,
    Authored,
    Duplicate,
    Gossip,
    Have,
    Limits,
    PeerDown,
    PeerUp,
    SendEnvelope,
    SendHave,
    SendStateVector,
    SendWant,
    SetTimer,
    TimerFired,
    Want,
)
from p2p.proto.gossip import Event as GossipEvent
from p2p.proto.grants import is_grant
from p2p.proto.identity import DeviceList
from p2p.proto.model import MAX_BODY, Entry, Message, Rejected
from p2p.proto.peering import Link, keep_new
from p2p.proto.session import (
    Authenticated,
    Closed,
    DeviceListIn,
    EnvelopeIn,
    GrantIn,
    HaveIn,
    LeaseIn,
    LeaveRequested,
    MediaIn,
    Output,
    Send,
    Session,
    State,
    TypingIn,
    WantIn,
)
from p2p.proto.wire import MAX_HANDSHAKE_FRAME
from p2p.proto.ysplit import split_update
from p2p.runtime.home import home_lock, open_home_store
from p2p.runtime.linking import Linked, approve_code
from p2p.state.device import (
    Delivery,
    DeviceState,
    Ingested,
    Space,
    claim_counters,
    claim_run,
    index_view,
    merge_batches,
)
from p2p.storage.base import Store, WriteBatch
from p2p.storage.memory import MemoryStore
from p2p.transport.base import Connection, ConnectionClosed, TransportError
from p2p.transport.base import Transport as TransportT
from p2p.transport.relay import RelayClient, group_relay_urls, is_relay_address
from p2p.transport.routed import RoutedTransport

log = logging.getLogger("p2p.runtime.node")
T = TypeVar("T")

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
REWRITE_CHUNK: Final = 64
"""Entries per update when the node writes its own entries again (``_write_again``):
far below what a peer accepts in one update."""
"""Updates appended to a space's log before it is folded into a snapshot."""
COALESCE_MAX: Final = 1_000_000
"""Largest merged update sealed as one envelope: the same envelope goes to connected
peers and, through the relay, into the mailboxes of offline ones (1 MiB each)."""
TYPING_TTL: Final = 6.0
"""Seconds a "typing" stays shown without a refresh (a sender refreshes every
TYPING_REFRESH while the person types), so a lost "stopped" frame costs seconds."""
TYPING_REFRESH: Final = 3.0
"""Least interval between two "typing" frames we send for one chat: ``set_typing`` may
be called on every keystroke."""
TYPING_IN_MIN: Final = 1.0
"""Least interval between two "typing" frames we act on per device and chat: a peer
that sends more is not shown more often."""
RECEIPT_DELAY: Final = 1.0
"""Seconds a device waits after new messages before it writes its delivery receipt for
the chat: a burst of messages costs one receipt per device, not one per message."""
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
        self._writes: list[tuple[WriteBatch, trio.Event, ev.Event | None]] = []
        self._inflight: list[tuple[str, bytes]] = []
        """The updates of the batch the writer is storing now (no longer in _writes)."""
        stored = state.history
        if stored is not None:
            state.history = partial(self._history_of, stored)
        self._local: dict[str, list[Entry]] = {}
        """Our own entries waiting for the writer, per space (see ``_queue_entry``)."""
        self._load_lock = trio.Lock()
        """One replica loads at a time, in a worker thread (see :meth:`_load`)."""
        self._rejections_read: set[str] = set()
        """Spaces whose stored hidden entries were reported in this process."""
        self._write_wakeup = trio.Event()
        self._write_room = trio.Event()
        self._outbox: dict[str, list[bytes]] = {}
        self._gossip = Gossip(
            Limits(
                RECENT_ENVELOPES, RECENT_BYTES, KNOWN_DIGESTS, WANT_DELAY, WANT_TIMEOUT, WANT_TASKS
            )
        )
        """The lazy-push protocol (p2p.proto.gossip); fed by :meth:`_gossip_handle`."""
        self._gossip_links: dict[str, tuple[_Peer, int]] = {}
        """The sessions the protocol was told about, and the link number given to each."""
        self._gossip_link_ids = itertools.count(1)
        self._gossip_timer_set = trio.Event()
        self._gossip_sleeps_until = math.inf
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
        self._receipts_due: set[str] = set()
        self._typing_sent: dict[str, float] = {}
        """Space -> when we last told peers we type in it (TYPING_REFRESH)."""
        self._typing_in: dict[tuple[str, str], float] = {}
        """(space, device) typing now -> when that expires (TYPING_TTL); in memory only."""
        self._typing_heard: dict[tuple[str, str], float] = {}
        """(space, device) -> when its last "typing" frame was acted on (TYPING_IN_MIN)."""
        self._rotating: set[str] = set()
        self._unproven: dict[str, bytes] = {}
        """Chat -> a grant whose rotation drops an account whose leave entry we lack:
        tried again when the chat changes (one per chat, the newest)."""
        self._receipts_wakeup = trio.Event()
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

    def discovery_key(self) -> bytes:
        """The account's current mDNS secret, for a discovery adapter the app runs. It
        changes with every key rotation (an unlink): restart the adapter when it does."""
        return self.state.discovery_key()

    @property
    def own_devices(self) -> frozenset[str]:
        """Ids of the devices on our account's current signed list (this one too)."""
        return self.state.device_list.ids

    @property
    def removed(self) -> bool:
        """Whether our account's signed list names this device as removed (unlinked by
        the primary, or at its own request): it then writes nothing and dials nobody."""
        return self.device_id in self.state.device_list.removed_ids

    @property
    def leaving(self) -> bool:
        """Whether this device asked to be unlinked and the primary has not acted yet."""
        return self._leaving and not self.removed

    @property
    def connected_peers(self) -> list[str]:
        """Device ids with an authenticated session right now."""
        return sorted(self._peers)

    def chats(self) -> list[Space]:
        """Conversation spaces this device holds."""
        return [s for s in self.state.spaces.values() if s.kind == "chat"]

    def reads(self, device: str, chat: str) -> bool:
        """Whether ``device`` is a current member device of ``chat`` (any of our own
        devices, or one of a member account): who may fetch that chat's attachments."""
        return chat in self.state.spaces_for(device)

    def _chat(self, chat: str | None) -> Space:
        """The space of ``chat`` (an id, its name, or the name it is shown by), or of
        the default chat."""
        if not chat:
            return self.state.space(self.default_chat())
        try:
            return self.state.chat_by_name(chat)
        except UnknownChat:
            shown = [s for s in self.chats() if not s.name and self.chat_name(s) == chat]
            if len(shown) == 1:
                return shown[0]
            raise

    def chat_id(self, chat: str | None = None) -> str:
        """The id of ``chat`` (an id or a name; None: the default chat); UnknownChat."""
        return self._chat(chat).id

    def chat_name(self, space: Space) -> str:
        """What a chat is called on this device: the name its creator gave it, or for a
        conversation created without one, the names we know its other members by (so
        each account sees the others' names, not its own)."""
        if space.name:
            return space.name
        names = self.display_names()
        others = [names.get(a) or a for a in sorted(space.members) if a != self.account_id]
        return ", ".join(sorted(others)) or space.id

    def default_chat(self) -> str:
        """The chat used when none is named: the account's notes chat."""
        return self.chats()[0].id if len(self.chats()) == 1 else self.state.chat_by_name("notes").id

    def messages(
        self,
        chat: str | None = None,
        *,
        last: int | None = None,
        before: Message | None = None,
        files_only: bool = False,
    ) -> list[Message]:
        """Messages of a chat in display order (the same on every replica), as durable.

        ``last=N`` gives only the newest N, and ``before=m`` only those ordered before
        message ``m``: ``messages(last=50)``, then ``messages(last=50, before=page[0])``
        pages back through history at the cost of one page. ``files_only``: only the
        messages with an attachment (what the media service scans).

        Served from the store's message index, without loading the CRDT, so it shows
        what is durable: a received message appears once its write committed (the
        :class:`~p2p.events.ChatChanged` for it comes then too). Entries that fail their
        checks are left out, and reported once each as
        :class:`~p2p.events.EntryRejected` (when they arrive, and on the first read of
        the chat by this process for those stored earlier).
        """
        space = self._chat(chat)
        if space.id not in self._rejections_read:
            self._rejections_read.add(space.id)
            for row in self.store.index_rejected(space.id):
                self._report(
                    Rejected(
                        space=space.id,
                        entry_id=row.id or row.key,
                        device=row.device or "?",
                        reason=row.reason,
                    )
                )
        page = last is not None or before is not None
        page = page or files_only
        rows = self.store.index_messages(
            space.id,
            last=last,
            before=before.sort_key() if before is not None else None,
            files_only=files_only,
        )
        related = self.store.index_related(space.id, [r.id for r in rows] if page else None)
        return index_view(space.id, rows, related)

    def _report(self, r: Rejected) -> None:
        """Tell the app (once per process) about an entry readers will not see."""
        if (r.space, r.entry_id) in self._reported:
            return
        self._reported.add((r.space, r.entry_id))
        log.warning("hidden entry %s in %s from %s: %s", r.entry_id, r.space, r.device, r.reason)
        self._emit(
            ev.EntryRejected(chat=r.space, entry_id=r.entry_id, device=r.device, reason=r.reason)
        )

    def display_names(self) -> dict[str, str]:
        """Device and account ids -> the names people know them by: our devices by the
        names on our list (removed ones too, for old messages), another account and its
        devices by the name we gave it as a contact (else the name its primary carries).

        For display only: names are not unique and anyone may choose any, so ids stay
        the identity everywhere else (``--json``, the API)."""
        names: dict[str, str] = {}
        contacts = {a: n for a, (n, *_) in self.state.contact_entries().items()}
        for account, dl in self.state.accounts.items():
            known_as = contacts.get(account) or dl.primary.name
            names[account] = known_as
            for d in (*dl.devices, *dl.removed):
                names[d.device_id] = known_as
        own = self.state.device_list
        for d in (*own.devices, *own.removed):
            names[d.device_id] = d.name
        names[self.account_id] = "me"
        return names

    def _own_device(self, device: str) -> str:
        """The id of our device ``device`` (an id, or the name of exactly one of our
        current devices): what ``p2p unlink NAME`` accepts."""
        dl = self.state.device_list
        if device in dl.ids or device in dl.removed_ids:
            return device
        named = [d.device_id for d in dl.devices if d.name == device]
        if len(named) == 1:
            return named[0]
        if named:
            raise NodeError(f"{len(named)} devices are called {device!r}: give the id")
        return device  # the device list's own error says it is not there

    def status(self) -> dict[str, Any]:
        """What ``p2p status`` shows: this device, its peers, its spaces, pending work."""
        now = trio.current_time()
        names = self.display_names()
        return {
            "device": self.device_id,
            "name": self.state.name,
            "account": self.account_id,
            "role": "primary" if self.state.is_primary else "companion",
            "removed": self.removed,
            "leaving": self.leaving,
            "address": self.address,
            "device_list_version": self.state.device_list.version,
            "primary": self.state.device_list.primary.device_id,
            "peers": [
                {
                    "device": d,
                    "name": names.get(d, ""),
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
                    "name": self.chat_name(s) if s.kind == "chat" else s.name,
                    "epoch": s.epoch,
                    "entries": s.replica.count() if s.replica.loaded else None,
                    "loaded": s.replica.loaded,
                }
                for s in self.state.spaces.values()
            ],
            "set_aside": [
                {"id": c.chat, "name": c.name, "reason": c.reason}
                for c in self.state.set_aside.values()
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

    def set_typing(self, chat: str | None = None, typing: bool = True) -> None:
        """Tell the chat's readers we are typing (or stopped): ephemeral awareness, sent
        to the connected devices that read the chat and never stored or relayed.

        Call it on every keystroke if you like: a "typing" goes out at most once per
        TYPING_REFRESH seconds per chat, and readers drop it after TYPING_TTL seconds
        without a refresh. ``typing=False`` goes out at once."""
        space = self._chat(chat)
        now = trio.current_time()
        if typing:
            if now - self._typing_sent.get(space.id, -math.inf) < TYPING_REFRESH:
                return
            self._typing_sent[space.id] = now
        elif self._typing_sent.pop(space.id, None) is None:
            return  # we never said we were typing
        for peer in list(self._peers.values()):
            self._carry_out(peer, peer.session.send_typing(space.id, typing))

    def typing(self, chat: str | None = None) -> list[str]:
        """Devices typing in a chat right now (ours and other members')."""
        space = self._chat(chat)
        return sorted(d for s, d in self._typing_in if s == space.id)

    def _on_typing(self, device: str, typing_in: TypingIn) -> None:
        key = (typing_in.space, device)
        now = trio.current_time()
        if not typing_in.typing:
            self._stop_typing(key)
            return
        if now - self._typing_heard.get(key, -math.inf) < TYPING_IN_MIN:
            return  # more often than anyone types: not shown more often
        self._typing_heard[key] = now
        started = key not in self._typing_in
        self._typing_in[key] = now + TYPING_TTL
        if started:
            self._emit(ev.Typing(chat=typing_in.space, device=device, typing=True))
            self._nursery.start_soon(self._typing_expires, key)

    def _stop_typing(self, key: tuple[str, str]) -> None:
        self._typing_heard.pop(key, None)
        if self._typing_in.pop(key, None) is not None:
            self._emit(ev.Typing(chat=key[0], device=key[1], typing=False))

    async def _typing_expires(self, key: tuple[str, str]) -> None:
        """End a "typing" that was not refreshed in time (one task per typing device)."""
        while (deadline := self._typing_in.get(key)) is not None:
            if trio.current_time() >= deadline:
                self._stop_typing(key)
                return
            await trio.sleep_until(deadline)

    def presence(self) -> list[dict[str, Any]]:
        """Online and last seen, per device of ours and of the accounts we follow:
        ``online`` when a session with it is up (or a relay says it is connected),
        ``last_seen_ms`` when our last session with it ended (None: never met)."""
        names = self.display_names()
        relayed = set().union(*(r.online for r in self.relays)) if self.relays else set()
        rows = []
        lists = [(self.account_id, self.state.device_list), *sorted(self.state.accounts.items())]
        for account, dl in lists:
            for d in dl.devices:
                if d.device_id == self.device_id:
                    continue
                seen = self.store.get(f"seen/{d.device_id}")
                rows.append(
                    {
                        "device": d.device_id,
                        "account": account,
                        "name": names.get(d.device_id, ""),
                        "device_name": d.name,
                        "online": d.device_id in self._peers or d.device_id in relayed,
                        "last_seen_ms": int(seen) if seen else None,
                    }
                )
        return rows

    async def mark_read(self, *, chat: str | None = None) -> str:
        """Record that this device has shown the chat up to its newest message."""
        shown = self.messages(chat, last=1)
        return await self._write(chat, "read", body=shown[-1].ts if shown else "")

    async def _write(self, chat: str | None, kind: Any, *, body: str = "", target: str = "") -> str:
        if self._closed:
            raise NodeError("the node is closed")
        if self.removed:  # nobody would accept it, and it would sit in the store forever
            raise Unlinked(self.device_id, self.account_id)
        space = self._chat(chat)
        await self._load(space)
        if self._closed:
            raise NodeError("the node is closed")
        if space.replica.latest_ts:  # sort after everything this chat has seen so far
            self.state.clock.observe(space.replica.latest_ts, self._wall_ms())
        entry = self.state.new_entry(space.id, kind, self._wall_ms(), body=body, target=target)
        await self._queue_entry(space.id, entry).wait()
        self._emit(ev.ChatChanged(chat=space.id, origin=self.device_id))
        return entry.id

    def _queue_entry(
        self, space_id: str, entry: Entry, batch: WriteBatch | None = None
    ) -> trio.Event:
        """Queue one of our signed entries (and a batch that must commit with it) for
        the writer; the event fires once it is durable and on its way to peers.

        The writer puts every entry queued since its last round into its space's replica
        in one CRDT transaction (``DeviceState.write_local``): concurrent sends make one
        update, one stored row and one envelope, not one each."""
        done = trio.Event()
        self._local.setdefault(space_id, []).append(entry)
        self._writes.append((batch or WriteBatch(), done, None))
        self._write_wakeup.set()
        return done

    async def _receipter(self) -> None:
        """Write this device's delivery receipt of each chat that received messages,
        at most once per RECEIPT_DELAY, and only when what it states changed (a receipt
        never causes another: receipts are about messages only)."""
        while True:
            await self._receipts_wakeup.wait()
            await trio.sleep(RECEIPT_DELAY)
            self._receipts_wakeup = trio.Event()
            due, self._receipts_due = self._receipts_due, set()
            for space_id in sorted(due):
                if space_id not in self.state.spaces:
                    continue  # set aside meanwhile (a corrupt chat)
                body = self.state.receipt_body(space_id)
                stated = self._stated_receipt(space_id)
                if body and body != stated and not self._closed and not self.removed:
                    with contextlib.suppress(ChatCorrupt):
                        await self._write(space_id, "rcpt", body=body)

    def _stated_receipt(self, space_id: str) -> str:
        entries = self.state.space(space_id).replica.entries("v")
        return next((e.body for k, e in entries if e and k == self.device_id), "")

    async def log(self, chat: str | None = None) -> list[dict[str, Any]]:
        """Messages as ``p2p log --json`` prints them: each with its delivery state
        (``status``: sent, delivered or read; ``delivered_to``; ``read_by``).

        Delivery states come from the receipts and read markers in the chat's CRDT,
        which this loads (in a worker thread) if it is not loaded yet."""
        space = self._chat(chat)
        shown = self.messages(space.id)
        states = await self.delivery(space.id, shown)
        return [
            {
                **row,
                "status": states[m.id].status,
                "delivered_to": list(states[m.id].delivered_to),
                "read_by": list(states[m.id].read_by),
            }
            for m, row in zip(shown, self.media.log_json(shown), strict=True)
        ]

    async def delivery(
        self, chat: str | None = None, messages: list[Message] | None = None
    ) -> dict[str, Delivery]:
        """Delivery state of the messages of a chat (all of them unless ``messages``
        are given; see ``core.Delivery``)."""
        space = self._chat(chat)
        await self._load(space)
        shown = self.messages(space.id) if messages is None else messages
        return self.state.delivery(space.id, shown)

    async def _load(self, space: Space) -> None:
        """Load a space's CRDT (snapshot, then tail) in a worker thread, once.

        Opening a node leaves documents unloaded (readers use the message index); every
        path that touches a replica (a write, a sync session, mail, linking) awaits this
        first, so the trio thread never waits for a long history.
        """
        if space.replica.loaded:
            return
        async with self._load_lock:
            if space.id in self.state.set_aside:
                raise self.state.set_aside[space.id]
            if not space.replica.loaded:
                try:
                    lost = await self._run_store(self.state.load_checked, space.id, self.store)
                except (StoreCorrupt, InvalidUpdate, WireError) as exc:
                    raise self._put_aside(space, exc) from exc
                if lost:
                    self._write_again(space.id, lost)

    def _put_aside(self, space: Space, error: P2PError) -> ChatCorrupt:
        """A chat whose stored history does not load is set aside and reported; the node
        and every other chat go on (its rows stay on disk as they are)."""
        corrupt = self.state.put_aside(space.id, error)
        log.error("%s", corrupt)
        self._emit(ev.ChatSetAside(chat=space.id, error=type(error).__name__, detail=str(error)))
        return corrupt

    def _write_again(self, space_id: str, entries: list[Entry]) -> None:
        """Put entries of ours that the loaded CRDT lacked back into it (see
        ``DeviceState.load_checked``), in updates small enough for any peer, and on
        their way to peers as soon as they are durable."""
        log.warning(
            "chat %s: its document lacked entries of ours that this device shows;"
            " writing its %d entries again",
            space_id,
            len(entries),
        )
        for at in range(0, len(entries), REWRITE_CHUNK):
            update, batch = self.state.write_local(space_id, entries[at : at + REWRITE_CHUNK])
            self._queue_write(batch)
            self._outbox.setdefault(space_id, []).append(update)
        self._outbox_wakeup.set()

    async def _load_all(self) -> None:
        """Load every space (a session offers them all); one that does not load is set
        aside, not a reason to refuse the peer."""
        for space in list(self.state.spaces.values()):
            with contextlib.suppress(ChatCorrupt):
                await self._load(space)

    def _queue_write(self, batch: WriteBatch, *, announce: ev.Event | None = None) -> trio.Event:
        """Queue a batch for the writer, in order; the event fires once it is durable,
        and ``announce`` is emitted then."""
        done = trio.Event()
        self._writes.append((batch, done, announce))
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
        while self._writes or self.state.unsaved or self.state.counters_wanted:
            taken, self._writes = self._writes, []
            local, self._local = self._local, {}
            self._write_room.set()
            written = [(s, *self.state.write_local(s, entries)) for s, entries in local.items()]
            batch = merge_batches(
                [b for b, _, _ in taken] + [b for _, _, b in written] + [self.state.take_unsaved()]
            )
            if batch:
                self._inflight = batch.appends
                try:
                    await self._run_store(self.store.write, batch)
                finally:
                    self._inflight = []
                for space_id, _update in batch.appends:
                    if space_id in self.state.spaces:  # not set aside meanwhile
                        self.state.spaces[space_id].log_seq += 1
                await self._compact(batch.appends)
            if self.state.counters_wanted:  # long before the current block runs out
                self.state.grant_counters(await self._run_store(claim_counters, self.store))
            for space_id, update, _ in written:
                self._outbox.setdefault(space_id, []).append(update)
                self._outbox_wakeup.set()
            for _, done, announce in taken:
                done.set()
                if announce is not None:
                    self._emit(announce)

    def _history_of(
        self, stored: Callable[[str], Iterable[bytes]], space_id: str
    ) -> Iterator[bytes]:
        """A space's whole history as its replica holds it: what the store holds, then
        what is on its way there (what a replica an update poisoned is rebuilt from;
        see ``Replica.apply``). The queue is read first: what leaves it meanwhile is in
        the store by the time the store is read (applied twice: harmless)."""
        pending = [u for s, u in self._inflight if s == space_id]
        pending += [u for b, _, _ in self._writes for s, u in b.appends if s == space_id]
        yield from stored(space_id)
        yield from pending

    async def _compact(self, appends: list[tuple[str, bytes]]) -> None:
        """Fold a space's update log into a snapshot once its tail grows long, so that
        opening the store stays fast (one snapshot plus a short tail)."""
        for space_id in {s for s, _ in appends}:
            space = self.state.spaces.get(space_id)
            if space is None or space.log_seq - space.snapshot_seq < COMPACT_AFTER:
                continue
            # every update up to log_seq is in the replica, so this snapshot covers them
            snapshot, upto = space.replica.snapshot(), space.log_seq
            await self._run_store(self.store.compact, space_id, snapshot, upto)
            space.snapshot_seq = upto

    async def _run_store(self, fn: Callable[..., T], *args: Any) -> T:
        """Call the store (or what reads it) off the trio thread when it does disk I/O."""
        if isinstance(self.store, MemoryStore):
            return fn(*args)
        return await trio.to_thread.run_sync(fn, *args)

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
        self._nursery.start_soon(self._gossip_timer)
        while True:
            await self._outbox_wakeup.wait()
            self._outbox_wakeup = trio.Event()
            await trio.lowlevel.checkpoint()  # let concurrent sends join this round
            outbox, self._outbox = self._outbox, {}
            for space_id, updates in outbox.items():
                readers = self.state.readers_of(space_id)
                offline = sorted(readers - set(self._peers)) if self.relays else []
                if not readers & set(self._peers) and not offline:
                    continue  # nobody to tell now; state vectors catch peers up later
                for payload in _coalesce(updates):
                    envelope = self.state.seal(space_id, payload)
                    self._gossip_handle(Authored(space_id, envelope), refresh=self._peers)
                    for device in offline:
                        self._post_mail(device, envelope)
            if self.state.unsaved or self.state.counters_wanted:
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
            await self._load_all()
            if is_grant(mail.data):
                durable = self._on_grant(mail.data, came_from=None)
                if durable is not None:
                    await durable.wait()
                with contextlib.suppress(P2PError):
                    await mail.ack()
                continue
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

    def _gossip_handle(self, event: GossipEvent, *, refresh: Iterable[str] = ()) -> None:
        """Feed the gossip protocol one event and send what it asks for.

        The protocol first sees the sessions as ``_peers`` holds them now (a session
        that replaced another is a new link), and, for the devices in ``refresh``, what
        they may read now: access changes with grants and device lists, and it is
        judged when an envelope goes out, as it always was."""
        now = trio.current_time()
        links = self._gossip_links
        for device in [d for d in links if d not in self._peers]:
            del links[device]
            self._gossip.handle(PeerDown(device), now)
        for device, peer in self._peers.items():
            link = links.get(device)
            if link is None or link[0] is not peer:
                link = links[device] = (peer, next(self._gossip_link_ids))
            elif device not in refresh:
                continue
            spaces = frozenset(self.state.spaces_for(device))
            ours = device in self.state.device_list.ids
            self._gossip.handle(PeerUp(device, link[1], spaces, ours), now)
        for out in self._gossip.handle(event, now):
            if isinstance(out, SetTimer):
                if out.deadline < self._gossip_sleeps_until:
                    self._gossip_timer_set.set()
                continue
            to = self._peers.get(out.device)
            if to is None:
                continue
            if isinstance(out, SendEnvelope):
                self._carry_out(to, to.session.send_envelope(out.envelope))
            elif isinstance(out, SendHave):
                self._carry_out(to, to.session.send_have(out.space, out.digests))
            elif isinstance(out, SendWant):
                self._carry_out(to, to.session.send_want(out.digests))
            elif isinstance(out, SendStateVector):
                self._carry_out(to, to.session.send_state_vector(out.space))

    async def _gossip_timer(self) -> None:
        """Wake the gossip protocol at its deadlines (one task for all its timers)."""
        while True:
            deadline = self._gossip.next_deadline()
            self._gossip_sleeps_until = math.inf if deadline is None else deadline
            with trio.move_on_at(self._gossip_sleeps_until):
                await self._gossip_timer_set.wait()
            self._gossip_timer_set = trio.Event()
            if deadline is not None and trio.current_time() >= deadline:
                self._gossip_handle(TimerFired())

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
                if self.removed:
                    continue
                if found.device is not None and (
                    found.device in self._peers or found.device == self.device_id
                ):
                    continue
                log.info("found %s via %s (%s)", found.address, found.source, found.device)
                await self.connect(found.address, source=found.source)

    async def _dial_loop(self, address: str) -> None:
        assert self.transport is not None
        backoff = BACKOFF_MIN
        while not self.removed:  # a removed device is refused everywhere: stop asking
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
        log.info("not dialing %s: this device was unlinked", address)

    async def _accept(self, conn: Connection) -> None:
        if self._handshaking >= MAX_HANDSHAKES:
            log.warning("refused %s: %d handshakes already under way", conn.remote, MAX_HANDSHAKES)
            await conn.aclose()
            return
        await self._run_connection(conn, initiator=False)

    async def _run_connection(self, conn: Connection, *, initiator: bool) -> _Ended:
        """Drive one session over ``conn`` until it ends; say how it went."""
        await self._load_all()  # a session reads state vectors and diffs
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
                            data = await conn.receive(session.frame_limit)
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
                        frame = self._catchup_frame(peer) or self._media_frame(peer)
                    except trio.EndOfChannel:
                        return
                    if frame is None:
                        peer.wake = trio.Event()
                        await peer.wake.wait()
                        continue
                    await conn.send(frame)
        except TransportError:
            scope.cancel()

    def _catchup_frame(self, peer: _Peer) -> bytes | None:
        """The next piece of a large catch-up, sealed now: pulled one at a time when no
        other sync frame waits, so a long history is never queued whole."""
        if not peer.session.catching_up:
            return None
        outputs = peer.session.next_catchup(trio.current_time())
        if len(outputs) == 1 and isinstance(outputs[0], Send):
            return outputs[0].data
        self._carry_out(peer, outputs)  # the session failed: its bye queues, it closes
        return None

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
            elif isinstance(out, HaveIn | WantIn):
                device = peer.session.peer
                if device is not None and self._peers.get(device) is peer:
                    if isinstance(out, HaveIn):
                        self._gossip_handle(Have(device, out.space, out.digests))
                    else:
                        self._gossip_handle(Want(device, out.digests), refresh=(device,))
            elif isinstance(out, Authenticated):
                self._on_authenticated(peer, out.device)
            elif isinstance(out, DeviceListIn):
                self._adopt_device_list(peer, out.data)
            elif isinstance(out, GrantIn):
                self._on_grant(out.data, came_from=peer)
            elif isinstance(out, LeaveRequested):
                if self.state.is_primary and out.device in self.state.device_list.ids:
                    log.info("device %s asked to be unlinked", out.device)
                    self._nursery.start_soon(self.unlink, out.device)
            elif isinstance(out, LeaseIn):
                try:
                    self._queue_write(self.state.accept_lease(out.data, self._wall_ms()))
                except P2PError as exc:
                    self._carry_out(peer, peer.session.close(exc))
            elif isinstance(out, TypingIn):
                device = peer.session.peer
                if device is not None and self._peers.get(device) is peer:
                    self._on_typing(device, out)
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
        """Deterministic choice between two connections to the same device (see
        :func:`p2p.proto.peering.keep_new`)."""
        assert new.session.peer is not None
        return keep_new(
            self.device_id,
            new.session.peer,
            Link(new.session.initiator, is_relay_address(new.remote)),
            Link(existing.session.initiator, is_relay_address(existing.remote)),
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
            for key in [k for k in self._typing_in if k[1] == device]:
                self._stop_typing(key)  # gone quiet: no session, no typing
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
            if isinstance(exc, ReplayDetected):
                self._gossip_handle(Duplicate(data))  # held already: never want it
            return
        except P2PError as exc:
            self._carry_out(peer, peer.session.close(exc))
            return
        self._accepted(ingested, data, came_from=peer.session.peer or "")

    def _accepted(self, ingested: Ingested, envelope: bytes, *, came_from: str) -> trio.Event:
        """After an envelope applied, from a session or a mailbox: persist it (in order;
        the event fires once durable), pass it on to the other peers, tell the app (once
        durable: readers see the message index, written with it)."""
        durable = self._queue_write(
            ingested.batch, announce=ev.ChatChanged(chat=ingested.space, origin=ingested.sender)
        )
        self._gossip_handle(
            Accepted(
                ingested.space,
                envelope,
                came_from=came_from,
                author=ingested.sender,
                ours_only=not ingested.relayable,
            ),
            refresh=self._peers,
        )
        for rejected in ingested.rejected:
            self._report(rejected)
        if self.state.spaces[ingested.space].kind == "account":
            self._learn_contacts()
        else:
            self._receipts_due.add(ingested.space)
            self._receipts_wakeup.set()
            departed = self.state.departed(ingested.space)  # usually nobody: no task
            if departed and self.state.rotates_for(ingested.space, departed):
                self._nursery.start_soon(self._rotate_after_leave, ingested.space)
            waiting = self._unproven.pop(ingested.space, None)
            if waiting is not None:  # the leave entry it waits for may be here now
                self._on_grant(waiting, came_from=None)
        return durable

    def _adopt_device_list(self, peer: _Peer, data: bytes) -> None:
        """A peer showed a newer device list: ours, or another account's we follow."""
        ours = self.state.device_list
        try:
            batch = self.state.follow(data, trusted=False)
        except RollbackRefused:
            return  # an older list through a slower path: ours is newer, nothing to do
        except P2PError as exc:
            self._carry_out(peer, peer.session.close(exc))
            return
        if batch is None:
            return
        self._queue_write(batch)
        if self.state.device_list is not ours:
            self._device_list_changed()
        else:
            self._account_list_changed(data)

    def _device_list_changed(self) -> None:
        """Tell every peer about our newer list, drop removed ones, tell the app."""
        dl = self.state.device_list
        data = dl.encode()
        for device, peer in list(self._peers.items()):
            if device in dl.removed_ids:
                # the signed list first, so the removed device knows it from the primary's
                # signature (a bare refusal could come from anyone), then the refusal
                self._carry_out(peer, peer.session.send_device_list(data))
                self._carry_out(peer, peer.session.close(RemovedDevice(device)))
            elif self.removed:  # we are the one removed: nobody of the account takes us
                self._carry_out(peer, peer.session.close(Unlinked(self.device_id, dl.account_id)))
            else:  # our devices, and other accounts' (they follow our list)
                self._carry_out(peer, peer.session.send_device_list(data))
        for relay in self.relays:
            relay.update_watch()
        added = tuple(sorted(dl.ids - self._known_devices))
        removed = tuple(sorted(self._known_devices - dl.ids))
        self._known_devices = set(dl.ids)
        if added:
            self._nursery.start_soon(self._recheck_hidden)
            # when this device first saw each (``p2p devices`` shows recent links)
            now = str(self._wall_ms()).encode()
            self._queue_write(WriteBatch(records={f"linked/{d}": now for d in added}))
        log.info("device list version %d: added %s, removed %s", dl.version, added, removed)
        self._emit(
            ev.DeviceListChanged(
                version=dl.version, devices=tuple(sorted(dl.ids)), added=added, removed=removed
            )
        )
        for device in added:
            log.info("new device linked: %s (%s)", dl.entry(device).name, device)
            self._emit(ev.DeviceLinked(device=device, name=dl.entry(device).name))

    def _announce_lists(self, own: DeviceList, others: dict[str, DeviceList]) -> None:
        """Act on whatever lists changed since ``own`` / ``others`` were ours."""
        if self.state.device_list is not own:
            self._device_list_changed()
        for account, dl in self.state.accounts.items():
            if others.get(account) is not dl:
                self._account_list_changed(dl.encode())

    def _account_list_changed(self, data: bytes) -> None:
        """Another account's newer list: drop its removed devices, follow its new ones."""
        account = DeviceList.decode(data).account_id
        dl = self.state.accounts[account]
        for device, peer in list(self._peers.items()):
            if device in dl.removed_ids:
                self._carry_out(peer, peer.session.close(RemovedDevice(device)))
        for relay in self.relays:
            relay.update_watch()
        self._nursery.start_soon(self._recheck_hidden)  # its devices' entries may pass now
        log.info("account %s: device list version %d", account, dl.version)
        self._emit(
            ev.DeviceListChanged(
                version=dl.version,
                devices=tuple(sorted(dl.ids)),
                removed=tuple(sorted(dl.removed_ids)),
                account=account,
            )
        )

    def _grant_refused(self, exc: P2PError, came_from: _Peer | None) -> None:
        """Report a grant we refused, from a session or (``came_from`` None) a mailbox."""
        self._emit(
            ev.InputRejected(
                remote=came_from.remote if came_from else "mailbox",
                device=came_from.session.peer if came_from else None,
                error=type(exc).__name__,
                detail=str(exc),
            )
        )

    def _on_grant(self, data: bytes, *, came_from: _Peer | None) -> trio.Event | None:
        """A grant reached us (session or mailbox): take the keys, persist them, and
        start syncing a conversation we just joined with every peer that reads it."""
        lists_before = (self.state.device_list, dict(self.state.accounts))
        try:
            space_id, news, batch = self.state.accept_grant(data)
        except EpochSplit as exc:
            log.warning("refused a grant: %s", exc)
            self._grant_refused(exc, came_from)
            # the session stays (the peer is honest as far as we can tell), and one
            # primary starts an epoch that takes everyone past the split
            if self.state.heals_split(exc.space) and exc.space not in self._rotating:
                self._nursery.start_soon(self._rotate, exc.space, set())
            return None
        except RotationUnproven as exc:
            log.info("a grant waits for a leave entry: %s", exc)
            if len(self._unproven) < 256:
                self._unproven[exc.space] = data
            return None
        except GrantFromNonMember as exc:
            log.info("ignored a grant: %s", exc)  # we learn the members from our own
            return None
        except P2PError as exc:
            log.warning("refused a grant: %s", exc)
            self._grant_refused(exc, came_from)
            if came_from is not None:
                self._carry_out(came_from, came_from.session.close(exc))
            return None
        durable = self._queue_write(batch) if batch else None
        self._announce_lists(*lists_before)  # a grant carries its members' lists
        if not news:
            return durable
        space = self.state.space(space_id)
        for device, peer in list(self._peers.items()):
            if space_id in self.state.spaces_for(device):
                self._carry_out(peer, peer.session.send_state_vector(space_id))
                grant = self.state.grant_to(device, space_id)
                if grant is not None and peer is not came_from:
                    self._carry_out(peer, peer.session.send_grant(grant))
        for relay in self.relays:
            relay.update_watch()
        self._emit(
            ev.ChatKeysChanged(
                chat=space_id,
                epoch=space.epoch,
                members=tuple(sorted(space.members)),
                joined=batch is not None and f"space/{space_id}" in batch.records,
            )
        )
        return durable

    def _deliver_grants(self, space_id: str) -> None:
        """Give a space's keys to every device that reads it: over the session when it
        is connected, else into its relay mailbox (it also gets them when we meet)."""
        for device in sorted(self.state.readers_of(space_id)):
            grant = self.state.grant_to(device, space_id)
            if grant is None:
                continue
            peer = self._peers.get(device)
            if peer is not None:
                self._carry_out(peer, peer.session.send_grant(grant))
            elif self.relays:
                self._post_mail(device, grant)

    async def _recheck_hidden(self) -> None:
        """After new devices joined our list or one we follow: entries hidden because
        their device was unknown may pass now (the CRDT view judges them again too)."""
        for space_id in list(self.state.spaces):
            hidden = await self._run_store(self.store.index_rejected, space_id)
            batch = self.state.recheck(space_id, hidden)
            if batch:
                await self._commit(batch)
                self._emit(ev.ChatChanged(chat=space_id, origin=self.device_id))

    async def unlink(self, device_id: str) -> None:
        """Primary only: remove a device, rotate keys, tell the remaining devices now.

        Our own devices find the new keys in the new device list; the other members of
        our conversations get them as grants (sessions, or their relay mailboxes).
        ``device_id`` may also be the name of exactly one of our devices."""
        await self._commit(self.state.unlink(self._own_device(device_id)))
        self._device_list_changed()
        for space in self.state.spaces.values():
            if space.shared:
                self._deliver_grants(space.id)

    # ---- contacts and conversations ------------------------------------------------

    def contact_code(self, *, name: str | None = None) -> ContactCode:
        """Our account's contact code: signed device list, name, where to meet us."""
        return ContactCode(
            device_list=self.state.device_list.encode(),
            key=self.state.contact_key(),
            name=name or self.state.device_list.primary.name,
            relays=tuple(r.url for r in self.relays),
            addresses=(self.address,) if self.address else (),
        )

    async def add_contact(self, code: str | ContactCode, *, name: str | None = None) -> str:
        """Follow the account of a contact code; returns its account id.

        The contact goes into our account space, so every device of ours learns it."""
        parsed = code if isinstance(code, ContactCode) else ContactCode.decode(code)
        chosen = name or parsed.name
        space_id, entry = self.state.contact_entry(
            chosen, parsed.device_list, parsed.key, self._wall_ms()
        )
        batch = self.state.follow(parsed.device_list, trusted=True, contact_key=parsed.key)
        await self._queue_entry(space_id, entry, batch).wait()
        for relay in self.relays:
            relay.update_watch()
        if self.transport is not None:
            # where the code says its devices listen: meet them now, without waiting for
            # mDNS or a relay (our devices that learn the contact later have no address)
            for address in parsed.addresses:
                await self.connect(address, source="contact")
        return entry.target

    def contacts(self) -> list[dict[str, Any]]:
        """Our contact book: id, name, and the contact's current devices."""
        out = []
        for account_id, (name, _listed, _key) in sorted(self.state.contact_entries().items()):
            dl = self.state.accounts.get(account_id)
            out.append(
                {
                    "id": account_id,
                    "name": name,
                    "devices": sorted(dl.ids) if dl is not None else [],
                    "list_version": dl.version if dl is not None else 0,
                }
            )
        return out

    def _learn_contacts(self) -> None:
        """Follow the accounts our other devices added to the contact book."""
        lists_before = (self.state.device_list, dict(self.state.accounts))
        batch = self.state.learn_contacts()
        if batch:
            self._queue_write(batch)
            self._announce_lists(*lists_before)

    async def create_chat(self, name: str, *, with_: Sequence[str] = ()) -> str:
        """A new conversation with the accounts ``with_`` (contact ids or names);
        returns its id. Every device of every member gets its key as a grant."""
        members = [self._contact_id(c) for c in with_]
        space_id, batch = self.state.new_conversation(name, members)
        await self._commit(batch)
        self._deliver_grants(space_id)
        for relay in self.relays:
            relay.update_watch()
        return space_id

    def chat_summaries(self) -> list[dict[str, Any]]:
        """Every chat: id, name, member accounts (with contact names), key epoch."""
        names = {a: n for a, (n, *_) in self.state.contact_entries().items()}
        names[self.account_id] = "me"
        return [
            {
                "id": s.id,
                "name": self.chat_name(s),
                "epoch": s.epoch,
                "members": [{"id": a, "name": names.get(a, "")} for a in sorted(s.members)],
            }
            for s in self.chats()
        ]

    async def add_to_chat(self, chat: str, *, with_: Sequence[str]) -> None:
        """Add contacts (ids or names) to a conversation with other accounts: their
        devices get its keys (and so its whole history) as grants, and every member
        device learns the new member set from them."""
        space = self._chat(chat)
        await self._commit(self.state.add_members(space.id, [self._contact_id(c) for c in with_]))
        self._deliver_grants(space.id)
        for relay in self.relays:
            relay.update_watch()

    async def leave_chat(self, chat: str) -> None:
        """Leave a conversation with other accounts: a signed leave entry tells its
        members, whose designated device rotates the key without us (``core``)."""
        space = self._chat(chat)
        if not space.shared:
            raise NodeError("only a conversation with other accounts can be left")
        await self._write(space.id, "leave")

    async def _rotate_after_leave(self, space_id: str) -> None:
        departed = self.state.departed(space_id)
        if not departed or not self.state.rotates_for(space_id, departed):
            return
        await self._rotate(space_id, departed)

    async def _rotate(self, space_id: str, departed: set[str]) -> None:
        """A new epoch of a conversation without ``departed``, granted to every reader."""
        if space_id in self._rotating:
            return
        self._rotating.add(space_id)
        try:
            await self._commit(self.state.rotate_without(space_id, departed))
        finally:
            self._rotating.discard(space_id)
        log.info("chat %s: key rotated without %s", space_id, sorted(departed))
        self._deliver_grants(space_id)
        space = self.state.space(space_id)
        self._emit(
            ev.ChatKeysChanged(
                chat=space_id,
                epoch=space.epoch,
                members=tuple(sorted(space.members)),
                joined=False,
            )
        )

    def _contact_id(self, contact: str) -> str:
        if contact in self.state.accounts:
            return contact
        matches = [a for a, (n, *_) in self.state.contact_entries().items() if n == contact]
        if len(matches) != 1:
            raise ContactError(f"no single contact is called or numbered {contact!r}")
        return matches[0]

    async def approve(
        self,
        code: str,
        *,
        confirm: Callable[[str], Awaitable[bool]],
        connect: str | None = None,
        progress: Callable[[int, int], None] = lambda done, total: None,
    ) -> Linked:
        """Primary only: link the device showing pairing ``code`` (see ``p2p.runtime.linking``)."""

        async def read(name: str) -> bytes | None:
            return await trio.to_thread.run_sync(self.store.get, name)

        await self._load_all()  # the new device gets every space's history
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
    """Merge consecutive updates into as few payloads as fit in one envelope (one
    writer round larger than that, many long messages sent at once, is cut in pieces)."""
    out: list[bytes] = []
    group: list[bytes] = []
    size = 0
    for u in (piece for update in updates for piece in split_update(update, COALESCE_MAX)):
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
    receipts: bool = True,
    blobs: BlobStore | None = None,
) -> AsyncIterator[Node]:
    """Run the device stored in ``home`` (or in ``store``) until the block exits.

    ``transport`` accepts and makes connections (none: the node works offline);
    ``peers`` are addresses to keep connected to; ``discovery`` adapters report more
    (mDNS, ...) as they find them; ``relays`` are rendezvous relay URLs (``ws://...``):
    the node meets linked devices through them and leaves mail for offline ones. URLs
    of one relay cluster name its id (``ws://HOST:PORT#id=RELAY_ID``) and make one
    client that fails over between them.
    ``wall_ms`` is the time used for message timestamps (tests pass a virtual clock).
    ``receipts=False`` keeps this device from writing delivery receipts (others then
    never see their messages delivered to it: a privacy choice, as in any messenger).
    Attachments are kept in ``blobs`` (the caller's, left open), else in
    ``<home>/media.db``, else (a node opened on a ``store``) in memory.

    A node opened on a ``home`` holds its lock (``p2p.runtime.home.home_lock``) until the block
    exits: AlreadyRunning, before anything is read, when another process or node has
    it. A node opened on a ``store`` is the caller's to keep alone on it (this run's
    CRDT client id and counters are still claimed atomically, see ``claim_run``).
    """
    if (home is None) == (store is None):
        raise NodeError("open_node needs exactly one of home or store")
    owned = store is None
    locked = ExitStack()
    if home is not None:  # before anything is read: one process writes a home
        locked.enter_context(home_lock(home))
    try:
        the_store: Store = open_home_store(home) if store is None else store  # type: ignore[arg-type]
    except BaseException:
        locked.close()
        raise
    own_blobs = blobs is None
    try:
        if blobs is None:
            blobs = open_blobs(home)
        # this run's number (in its CRDT client id) and its envelope counters are taken
        # from the store in one write transaction before anything is read, so no other
        # process opened on the same store can ever write with the same ones
        run = await trio.to_thread.run_sync(claim_run, the_store)
        state = await trio.to_thread.run_sync(DeviceState.load, the_store, run)
        opening = state.take_unsaved()  # the index of a store from before it existed
        if opening:
            await trio.to_thread.run_sync(the_store.write, opening)
        try:
            async with trio.open_nursery() as nursery:
                clients = [
                    RelayClient(
                        urls[0],
                        state.keys,
                        watch=state.followed_devices,
                        relay_id=relay_id,
                        alternates=urls[1:],
                        first_frame_limit=MAX_HANDSHAKE_FRAME,
                    )
                    for relay_id, urls in group_relay_urls(relays)
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
                if receipts:
                    nursery.start_soon(node._receipter)
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
        try:
            if own_blobs and blobs is not None:
                blobs.close()
            if owned:
                the_store.close()
        finally:
            locked.close()


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
