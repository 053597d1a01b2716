"""The embedding API: a running device, owning one trio nursery.

``async with open_node(home) as node:`` loads the device from its store, serves its
transport, dials its peers, and runs its tasks inside the node's nursery.

:class:`Node` is a facade. It holds no behaviour of its own beyond checking arguments:
it composes the subsystems below, each in its own module with its rules stated at its
top, and wires them to each other (the way automerge-repo's ``Repo`` composes a
synchronizer, storage and network subsystems). None reads another's attributes; each
is handed the few methods of the others it calls.

- :mod:`p2p.runtime.events` — the event hub (what the app is told);
- :mod:`p2p.runtime.writer` — the write queue, group commit, compaction, loading
  replicas; ``send`` awaits its own batch, so a message ``send`` returned is durable;
- :mod:`p2p.runtime.peers` — dialing, accepting, one sans-I/O
  :class:`~p2p.proto.session.Session` per connection, the choice between two
  connections to one device, and the table that dispatches sessions' outputs;
- :mod:`p2p.runtime.gossiper` — our durable updates out, and the lazy-push protocol
  (:mod:`p2p.proto.gossip`) turned into sends and one sleep;
- :mod:`p2p.runtime.mail` — the relays as mailboxes;
- :mod:`p2p.runtime.membership` — device lists, leases, link, unlink, leave;
- :mod:`p2p.runtime.conversations` — chats and names, contacts, grants, rotation;
- :mod:`p2p.runtime.presence` — typing and presence;
- :mod:`p2p.runtime.receipts` — delivery receipts;
- :mod:`p2p.runtime.reading` — messages from the index, hidden entries reported once;
- :mod:`p2p.media.service` — attachments.

What the node itself wires is the path of a received envelope (:meth:`Node._accepted`:
store it, gossip it on, report what it hid, then the subsystems it concerns) and of our
own writes (:meth:`Node._write`).

Leaving the ``async with`` flushes pending writes, then cancels and joins everything.
Errors from inside surface as our own :class:`~p2p.errors.P2PError`, not as exception
groups.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import ExitStack, asynccontextmanager
from functools import partial
from typing import Any

import trio

from p2p import events as ev
from p2p.discovery.base import Discovery, Found, Source, StaticPeers
from p2p.errors import NodeError, P2PError, ReplayDetected, UnknownKey, Unlinked
from p2p.media.descriptor import Attachment, file_body
from p2p.media.service import MediaService, open_blobs
from p2p.media.store import BlobStore
from p2p.proto.contacts import ContactCode
from p2p.proto.envelope import envelope_space
from p2p.proto.gossip import RECENT_ENVELOPES, WANT_TASKS, Accepted, Duplicate
from p2p.proto.model import CHAINED_KINDS, MAX_BODY, Message
from p2p.proto.session import (
    DeviceListIn,
    EnvelopeIn,
    GrantIn,
    HaveIn,
    LeaseIn,
    LeaveRequested,
    MediaIn,
    TypingIn,
    WantIn,
)
from p2p.proto.wire import MAX_HANDSHAKE_FRAME
from p2p.runtime.conversations import Conversations
from p2p.runtime.events import EVENT_QUEUE, EventHub
from p2p.runtime.gossiper import COALESCE_MAX, Gossiper
from p2p.runtime.home import home_lock, open_home_store
from p2p.runtime.linking import Linked, Progress, no_progress
from p2p.runtime.mail import MAIL_POSTS, Mail
from p2p.runtime.membership import Membership
from p2p.runtime.peers import MAX_HANDSHAKES, SEND_QUEUE, Peer, Peers
from p2p.runtime.presence import TYPING_REFRESH, TYPING_TTL, Awareness
from p2p.runtime.reading import Reader
from p2p.runtime.receipts import RECEIPT_DELAY, Receipts
from p2p.runtime.views import (
    ChatSummary,
    Contact,
    DevicePresence,
    Logged,
    Member,
    NodeStatus,
    PeerStatus,
    RelayStatus,
    SetAsideStatus,
    SpaceStatus,
)
from p2p.runtime.writer import COMPACT_AFTER, IDLE_UNLOAD, Writer
from p2p.state.device import Delivery, DeviceState, Ingested, Space, claim_run
from p2p.storage.base import Store
from p2p.transport.base import Transport as TransportT
from p2p.transport.relay import RelayClient, group_relay_urls
from p2p.transport.routed import RoutedTransport

log = logging.getLogger("p2p.runtime.node")

__all__ = [
    "COALESCE_MAX",
    "COMPACT_AFTER",
    "EVENT_QUEUE",
    "IDLE_UNLOAD",
    "MAIL_POSTS",
    "MAX_HANDSHAKES",
    "RECEIPT_DELAY",
    "RECENT_ENVELOPES",
    "SEND_QUEUE",
    "TYPING_REFRESH",
    "TYPING_TTL",
    "WANT_TASKS",
    "Node",
    "open_node",
    "wall_clock_ms",
]


def wall_clock_ms() -> int:
    return int(time.time() * 1000)


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
        leaving: bool = False,
    ) -> None:
        self.state = state
        self.store = store
        self._nursery = nursery
        self.transport = transport
        self._wall_ms = wall_ms
        self.hub = EventHub()
        emit = self.hub.emit
        self.writer = Writer(state, store, emit=emit, outbox=lambda s, u: self.gossiper.push(s, u))
        self.media = MediaService(
            blobs, self, wall_ms=wall_ms, emit=emit, wake=lambda d: self.peers.wake(d)
        )
        """Attachments (p2p.media): its ``run`` task is started by :func:`open_node`."""
        self.hub.observe(self.media.observe)  # peers up and down, chats changed
        self.peers = Peers(
            state,
            nursery,
            transport=transport,
            wall_ms=wall_ms,
            removed=lambda: self.removed,
            load=self.writer.load_by_id,
            learn_vectors=self.writer.learn_vectors,
            backpressure=self.writer.backpressure,
            queue_write=self.writer.queue,
            emit=emit,
            media_out=self.media.next_out,
        )
        self.mail = Mail(
            state,
            relays,
            nursery,
            emit=emit,
            loaded=self.writer.load_by_id,
            learnt=self.writer.learn_chains,
            aside=self.writer.ingest_aside,
            grant_in=lambda data: self.conversations.from_mail(data),
            accepted=lambda i, data, came_from: self._accepted(i, data, came_from=came_from),
        )
        self.gossiper = Gossiper(
            state,
            self.peers,
            nursery,
            mail=self.mail.post if self.mail else None,
            saved=self.writer.save_unsaved,
        )
        self.membership = Membership(
            state,
            store,
            self.writer,
            self.peers,
            self.mail,
            nursery,
            emit=emit,
            wall_ms=wall_ms,
            regrant=lambda: self.conversations.regrant_all(),
            met_contact=lambda account: self.conversations.met_contact(account),
            leaving=leaving,
        )
        self.conversations = Conversations(
            state,
            self.writer,
            self.peers,
            self.mail,
            self.membership,
            nursery,
            emit=emit,
            wall_ms=wall_ms,
            address=lambda: self.address,
        )
        self.awareness = Awareness(
            state,
            store,
            self.peers,
            nursery,
            emit=emit,
            relayed=self.mail.online,
            names=self.conversations.display_names,
        )
        self.receipts = Receipts(
            state,
            write=lambda space_id, body: self._write(space_id, "rcpt", body=body),
            may_write=lambda: not self.writer.closed and not self.removed,
        )
        self.reader = Reader(store, emit=emit)
        self._wire()

    def _wire(self) -> None:
        """The dispatch table: what each output of a session is carried out by."""
        peers = self.peers
        peers.on(EnvelopeIn, self._on_envelope)
        peers.on(HaveIn, self.gossiper.on_have, current_only=True)
        peers.on(WantIn, self.gossiper.on_want, current_only=True)
        peers.on(DeviceListIn, self.membership.on_device_list)
        peers.on(GrantIn, self.conversations.on_grant)
        peers.on(LeaveRequested, self.membership.on_leave_requested)
        peers.on(LeaseIn, self.membership.on_lease)
        peers.on(TypingIn, self.awareness.on_typing, current_only=True)
        peers.on(MediaIn, self._on_media, current_only=True)
        peers.on_up(self.membership.peer_up)
        peers.on_down(self.awareness.peer_gone)

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
    def relays(self) -> list[RelayClient]:
        """The node's relay clients, one per relay id (``relays=`` of :func:`open_node`)."""
        return self.mail.relays

    @property
    def dropped_events(self) -> int:
        """Events a slow subscriber lost (its channel was full)."""
        return self.hub.dropped

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
        return self.membership.removed

    @property
    def leaving(self) -> bool:
        """Whether this device asked to be unlinked and the primary has not acted yet."""
        return self.membership.leaving

    @property
    def connected_peers(self) -> list[str]:
        """Device ids with an authenticated session right now."""
        return self.peers.devices()

    def chats(self) -> list[Space]:
        """Conversation spaces this device holds."""
        return self.conversations.chats()

    def reads(self, device: str, chat: str) -> bool:
        """Whether ``device`` is a current member device of ``chat`` (any of our own
        devices, or one of a member account): who may fetch that chat's attachments."""
        return chat in self.state.spaces_for(device)

    def _chat(self, chat: str | None) -> Space:
        return self.conversations.chat(chat)

    def chat_id(self, chat: str | None = None) -> str:
        """The id of ``chat`` (an id or a name; None: the default chat); UnknownChat."""
        return self._chat(chat).id

    def chat_name(self, space: Space) -> str:
        """What a chat is called on this device: the name its creator gave it, or for a
        conversation created without one, the names we know its other members by (so
        each account sees the others' names, not its own)."""
        return self.conversations.chat_name(space)

    def default_chat(self) -> str:
        """The chat used when none is named: the account's notes chat."""
        return self.conversations.default_chat()

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
        return self.reader.messages(
            self._chat(chat), last=last, before=before, files_only=files_only
        )

    def display_names(self) -> dict[str, str]:
        """Device and account ids -> the names people know them by: our devices by the
        names on our list (removed ones too, for old messages), another account and its
        devices by the name we gave it as a contact (else the name its primary carries).

        For display only: names are not unique and anyone may choose any, so ids stay
        the identity everywhere else (``--json``, the API)."""
        return self.conversations.display_names()

    def status(self) -> NodeStatus:
        """This device, its peers, its spaces, pending work (what ``p2p status`` shows)."""
        now = trio.current_time()
        names = self.display_names()
        return NodeStatus(
            device=self.device_id,
            name=self.state.name,
            account=self.account_id,
            role="primary" if self.state.is_primary else "companion",
            removed=self.removed,
            leaving=self.leaving,
            address=self.address,
            device_list_version=self.state.device_list.version,
            primary=self.state.device_list.primary.device_id,
            peers=tuple(
                PeerStatus(p.device, names.get(p.device, ""), p.remote, p.found_via, now - p.since)
                for p in self.peers.describe()
            ),
            spaces=tuple(
                SpaceStatus(
                    id=s.id,
                    kind=s.kind,
                    name=self.chat_name(s) if s.kind == "chat" else s.name,
                    epoch=s.epoch,
                    entries=s.replica.count() if s.replica.loaded else None,
                    loaded=s.replica.loaded,
                )
                for s in self.state.spaces.values()
            ),
            set_aside=tuple(
                SetAsideStatus(c.chat, c.name, c.reason) for c in self.state.set_aside.values()
            ),
            pending_writes=self.writer.pending,
            pending_gossip=self.gossiper.pending,
            traffic=self.traffic(),
            relays=tuple(RelayStatus(r.url, r.connected, r.address) for r in self.relays),
            media=self.media.status(),
        )

    def traffic(self) -> dict[str, int]:
        """Bytes and frames this node sent and received over all its sessions so far."""
        return self.peers.traffic()

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
        return self.hub.subscribe()

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
        self.awareness.set_typing(self._chat(chat).id, typing)

    def typing(self, chat: str | None = None) -> list[str]:
        """Devices typing in a chat right now (ours and other members')."""
        return self.awareness.typing(self._chat(chat).id)

    def presence(self) -> list[DevicePresence]:
        """Online and last seen, per device of ours and of the accounts we follow:
        ``online`` when a session with it is up (or a relay says it is connected),
        ``last_seen_ms`` when our last session with it ended (None: never met)."""
        return self.awareness.presence()

    async def mark_read(self, *, chat: str | None = None) -> str:
        """Record that this device has shown the chat up to its newest message."""
        shown = self.messages(chat, last=1)
        return await self._write(chat, "read", body=shown[-1].ts if shown else "")

    async def _write(self, chat: str | None, kind: Any, *, body: str = "", target: str = "") -> str:
        """Sign one entry of ours into ``chat``; its id once it is durable."""
        if self.writer.closed:
            raise NodeError("the node is closed")
        if self.removed:  # nobody would accept it, and it would sit in the store forever
            raise Unlinked(self.device_id, self.account_id)
        space = self._chat(chat)
        if kind in CHAINED_KINDS and not space.replica.writes_aside([kind]):
            await self.writer.learn_chains(space.id)  # then a reaction needs no history
        if space.replica.writes_aside([kind]):  # a new key: no need for the history
            newest = self.messages(space.id, last=1)
            seen = newest[-1].ts if newest else ""
        else:
            await self.writer.load(space)
            if self.writer.closed:
                raise NodeError("the node is closed")
            seen = space.replica.latest_ts
        if seen:  # sort after everything this chat has seen so far
            self.state.observe(seen, self._wall_ms())
        entry = self.state.new_entry(space.id, kind, self._wall_ms(), body=body, target=target)
        await self.writer.queue_entry(space.id, entry).wait()
        self.hub.emit(ev.ChatChanged(chat=space.id, origin=self.device_id))
        return entry.id

    async def log(self, chat: str | None = None) -> list[Logged]:
        """Messages of a chat, each with its delivery state (``status``: sent,
        delivered or read; ``delivered_to``; ``read_by``): what ``p2p log`` shows.

        Delivery states come from the receipts and read markers in the chat's CRDT,
        which this loads (in a worker thread) if it is not loaded yet."""
        space = self._chat(chat)
        shown = self.messages(space.id)
        states = await self.delivery(space.id, shown)
        return [Logged(m, states[m.id]) for m in shown]

    async def delivery(
        self, chat: str | None = None, messages: list[Message] | None = None
    ) -> dict[str, Delivery]:
        """Delivery state of the messages of a chat (all of them unless ``messages``
        are given; see ``core.Delivery``)."""
        space = self._chat(chat)
        await self.writer.load(space)
        shown = self.messages(space.id) if messages is None else messages
        return self.state.delivery(space.id, shown)

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

    def _on_media(self, peer: Peer, out: MediaIn) -> None:
        assert peer.device is not None
        error = self.media.frame_in(peer.device, out.kind, out.fields)
        if error is not None:
            self.peers.close(peer, error)

    # ---- connections ---------------------------------------------------------------

    async def connect(self, address: str, *, source: Source = "static") -> None:
        """Keep a connection to ``address`` (dial, redial with backoff) until the node closes."""
        await self.peers.connect(address, source=source)

    async def add_discovery(self, adapter: Discovery) -> None:
        """Run a discovery adapter in the node; what it finds is dialed (once started)."""
        await self.peers.add_discovery(adapter)

    def found_channel(self) -> trio.MemorySendChannel[Found]:
        """Where a discovery adapter run outside the node (in the caller's nursery, to
        restart it at will) reports what it finds."""
        return self.peers.found_channel()

    # ---- what arrives --------------------------------------------------------------

    def _on_envelope(self, peer: Peer, out: EnvelopeIn) -> None:
        """An envelope from a session: apply it without its space's document if it can
        be, else once the document is loaded; or drop it quietly if already here."""
        space_id = envelope_space(out.data)
        if space_id is not None and self._ingest(peer, out, aside=space_id):
            return
        act = partial(self._ingest, peer, out)
        in_turn = partial(self._ingest, peer, out, aside=space_id or "", in_turn=True)
        if space_id is None or not self.writer.after_load(
            space_id, act, len(out.data), self._nursery, in_turn
        ):
            act()

    def _ingest(
        self, peer: Peer, out: EnvelopeIn, aside: str = "", *, in_turn: bool = False
    ) -> bool:
        """Apply an envelope (``aside``: its space's id, to apply it without the
        document; see ``Writer.ingest_aside``, and ``in_turn`` there). Whether it was
        dealt with: False only when it waits for the document."""
        try:
            if aside:
                ingested = self.writer.ingest_aside(aside, out.data, in_turn=in_turn)
                if ingested is None:
                    return False
            else:
                ingested = self.state.ingest(out.data)
        except (ReplayDetected, UnknownKey) as exc:
            # the same envelope over two gossip paths, or a space we don't hold: harmless
            log.debug("dropped envelope from %s: %s", peer.device, exc)
            if isinstance(exc, ReplayDetected):
                self.gossiper.handle(Duplicate(out.data))  # held already: never want it
            return True
        except P2PError as exc:
            self.peers.close(peer, exc)
            return True
        self._accepted(ingested, out.data, came_from=peer.device or "")
        return True

    def _accepted(self, ingested: Ingested, envelope: bytes, *, came_from: str) -> trio.Event:
        """After an envelope applied, from a session or a mailbox: persist it (in order;
        the event fires once durable), pass it on to the other peers, tell the app (once
        durable: readers see the message index, written with it)."""
        durable = self.writer.queue(
            ingested.batch, announce=ev.ChatChanged(chat=ingested.space, origin=ingested.sender)
        )
        self.gossiper.handle(
            Accepted(
                ingested.space,
                envelope,
                came_from=came_from,
                author=ingested.sender,
                ours_only=not ingested.relayable,
            ),
            refresh=self.peers.devices(),
        )
        for rejected in ingested.rejected:
            self.reader.report(rejected)
        if self.state.spaces[ingested.space].kind == "account":
            self.conversations.learn_contacts()
        else:
            self.receipts.received(ingested.space)
            self.conversations.changed(ingested.space)
        return durable

    # ---- membership ----------------------------------------------------------------

    async def unlink(self, device_id: str) -> None:
        """Primary only: remove a device, rotate keys, tell the remaining devices now.

        Our own devices find the new keys in the new device list; the other members of
        our conversations get them as grants (sessions, or their relay mailboxes).
        ``device_id`` may also be the name of exactly one of our devices."""
        await self.membership.unlink(device_id)

    async def approve(
        self,
        code: str,
        *,
        confirm: Callable[[str], Awaitable[bool]],
        connect: str | None = None,
        progress: Progress = no_progress,
    ) -> Linked:
        """Primary only: link the device showing pairing ``code`` (see ``p2p.runtime.linking``).
        ``progress(bytes done, bytes in all, messages done, messages in all)`` follows
        the history as it goes."""
        return await self.membership.approve(
            code, confirm=confirm, connect=connect, progress=progress
        )

    async def leave(self) -> None:
        """Companion: ask the primary to unlink this device, now if it is connected, else
        at the next meeting (the request is kept in the store until then)."""
        await self.membership.leave()

    # ---- contacts and conversations ------------------------------------------------

    def contact_code(self) -> ContactCode:
        """Our account's contact code: account key, contact key, primary, and where this
        device listens (the first connection brings the signed device list)."""
        return self.conversations.contact_code()

    async def add_contact(self, code: str | ContactCode, *, name: str | None = None) -> str:
        """Take the account of a contact code as a contact; returns its account id.

        The contact goes into our account space, so every device of ours learns it. Its
        device list comes with the first connection to one of its devices (checked
        against the code's account key); a contact without ``name`` goes by its primary
        device's name from then on."""
        parsed = code if isinstance(code, ContactCode) else ContactCode.decode(code)
        account = await self.conversations.add_contact(parsed, name)
        if self.transport is not None:
            # where the code says its devices listen: meet them now, without waiting for
            # mDNS or a relay (our devices that learn the contact later have no address)
            for address in parsed.addresses:
                await self.connect(address, source="contact")
        return account

    def contacts(self) -> list[Contact]:
        """Our contact book: id, name, and the contact's current devices."""
        out = []
        for account_id, name in sorted(self.conversations.contact_names().items()):
            dl = self.state.accounts.get(account_id)
            devices = tuple(sorted(dl.ids)) if dl is not None else ()
            out.append(Contact(account_id, name, devices, dl.version if dl is not None else 0))
        return out

    async def create_chat(self, name: str, *, with_: Sequence[str] = ()) -> str:
        """A new conversation with the accounts ``with_`` (contact ids or names);
        returns its id. Every device of every member gets its key as a grant."""
        return await self.conversations.create_chat(name, with_)

    def chat_summaries(self) -> list[ChatSummary]:
        """Every chat: id, name, member accounts (with contact names), key epoch."""
        names = self.conversations.contact_names()
        names[self.account_id] = "me"
        return [
            ChatSummary(
                id=s.id,
                name=self.chat_name(s),
                epoch=s.epoch,
                members=tuple(Member(a, names.get(a, "")) for a in sorted(s.members)),
            )
            for s in self.chats()
        ]

    async def add_to_chat(self, chat: str, *, with_: Sequence[str]) -> None:
        """Add contacts (ids or names) to a conversation with other accounts: their
        devices get its keys (and so its whole history) as grants, and every member
        device learns the new member set from them."""
        await self.conversations.add_to_chat(chat, with_)

    async def leave_chat(self, chat: str) -> None:
        """Leave a conversation with other accounts: a signed leave entry tells its
        members, whose designated device rotates the key without us (``core``)."""
        space = self._chat(chat)
        if not space.shared:
            raise NodeError("only a conversation with other accounts can be left")
        await self._write(space.id, "leave")

    async def _close(self) -> None:
        await self.writer.close()
        self.hub.close()


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
    idle_unload: float = IDLE_UNLOAD,
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
    A chat's history is held in memory only while it is in use: ``idle_unload`` is how
    many seconds after its last use it is dropped (it loads again when needed).

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
                    leaving=the_store.get("leave/requested") is not None,
                )
                await nursery.start(node.media.run)
                nursery.start_soon(node.writer.run)
                nursery.start_soon(node.writer.unload_when_idle, idle_unload)
                nursery.start_soon(node.gossiper.run)
                if receipts:
                    nursery.start_soon(node.receipts.run)
                if transport is not None:
                    await nursery.start(transport.serve, node.peers.accept)
                nursery.start_soon(node.peers.merge_found)
                for client in clients:
                    nursery.start_soon(node.mail.drain, client)
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
