"""Conversations: chats and their names, contacts, and the grants that carry their keys.

It owns the conversations being rotated now and the grants that wait for a leave entry.
Rules it keeps:

- **Names are for display.** A chat is found by its id, its name or the name it is shown
  by; a contact by its id or its name. Names need not be unique: an ambiguous one is an
  error, and ids stay the identity everywhere else.
- **Grants out.** A reader of a conversation gets its keys as a grant over its session
  when connected, else in its relay mailbox (and from every session, right after
  ``ident``): when a chat is created, members are added, a key is rotated, a device is
  unlinked.
- **Grants in** (a session or the mailbox): a new space or epoch is stored, asked for
  (``sv``) from every connected reader, granted on to them, and reported
  (``ChatKeysChanged``). A grant whose rotation drops an account whose leave entry has
  not arrived waits (one per chat, at most ``UNPROVEN_MAX``) and is tried again when
  that chat changes. An epoch split is reported and healed by one primary's new epoch;
  a grant from a non-member is ignored; any other bad grant is reported and closes the
  session it came on.
- **Rotation.** After a member leaves, the one device the state designates starts a new
  epoch without it (one rotation per chat at a time) and grants it to every reader.
- **Contacts** live in our account space, so every device of ours learns them; the
  relays watch their devices (the primary the code names, until the first connection
  brings the list), and that first list of a contact brings its devices our grants of
  every conversation with it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Final

import trio

from p2p import events as ev
from p2p.errors import ContactError, GrantFromNonMember, P2PError, UnknownChat
from p2p.proto.authority import EpochSplit, RotationUnproven
from p2p.proto.contacts import ContactCode
from p2p.proto.session import GrantIn
from p2p.runtime.mail import Mail
from p2p.runtime.membership import Membership
from p2p.runtime.peers import Peer, Peers
from p2p.runtime.writer import Writer
from p2p.state.device import DeviceState, Space
from p2p.transport.base import TransportError

log = logging.getLogger("p2p.runtime.node")  # one logger for all of the node's lines

UNPROVEN_MAX: Final = 256
"""Chats whose newest grant may wait for a leave entry at once."""


class Conversations:
    """Chats, contacts and grants; see the module docstring."""

    def __init__(
        self,
        state: DeviceState,
        writer: Writer,
        peers: Peers,
        mail: Mail,
        membership: Membership,
        nursery: trio.Nursery,
        *,
        emit: Callable[[ev.Event], None],
        wall_ms: Callable[[], int],
        address: Callable[[], str | None],
    ) -> None:
        self._state = state
        self._writer = writer
        self._peers = peers
        self._mail = mail
        self._membership = membership
        self._nursery = nursery
        self._emit = emit
        self._wall_ms = wall_ms
        self._address = address
        self._rotating: set[str] = set()
        self._unproven: dict[str, bytes] = {}
        """Chat -> a grant whose rotation drops an account whose leave entry we lack:
        tried again when the chat changes (one per chat, the newest)."""

    # ---- chats and names -----------------------------------------------------------

    def chats(self) -> list[Space]:
        return [s for s in self._state.spaces.values() if s.kind == "chat"]

    def chat(self, chat: str | None) -> Space:
        """The space of ``chat`` (an id, its name, or the name it is shown by), or of
        the default chat."""
        if not chat:
            return self._state.space(self.default_chat())
        try:
            return self._state.chat_by_name(chat)
        except UnknownChat:
            shown = [s for s in self.chats() if not s.name and self.chat_name(s) == chat]
            if len(shown) == 1:
                return shown[0]
            raise

    def default_chat(self) -> str:
        chats = self.chats()
        return chats[0].id if len(chats) == 1 else self._state.chat_by_name("notes").id

    def chat_name(self, space: Space) -> str:
        """What a chat is called on this device: the name its creator gave it, or for a
        conversation created without one, the names we know its other members by."""
        if space.name:
            return space.name
        names = self.display_names()
        account = self._state.account_id
        others = [names.get(a) or a for a in sorted(space.members) if a != account]
        return ", ".join(sorted(others)) or space.id

    def contact_names(self) -> dict[str, str]:
        """Account id -> the name we gave it as a contact."""
        return {a: contact.name for a, contact in self._state.contact_entries().items()}

    def display_names(self) -> dict[str, str]:
        """Device and account ids -> the names people know them by (see ``Node``)."""
        names: dict[str, str] = {}
        contacts = self.contact_names()
        for account, dl in self._state.accounts.items():
            known_as = contacts.get(account) or dl.primary.name
            names[account] = known_as
            for d in (*dl.devices, *dl.removed):
                names[d.device_id] = known_as
        for account, name in contacts.items():  # contacts not met yet: no list, no devices
            names.setdefault(account, name)
        own = self._state.device_list
        for d in (*own.devices, *own.removed):
            names[d.device_id] = d.name
        names[self._state.account_id] = "me"
        return names

    def contact_id(self, contact: str) -> str:
        if contact in self._state.accounts or contact in self._state.contact_anchors:
            return contact
        matches = [a for a, n in self.contact_names().items() if n == contact]
        if len(matches) != 1:
            raise ContactError(f"no single contact is called or numbered {contact!r}")
        return matches[0]

    # ---- contacts ------------------------------------------------------------------

    def contact_code(self) -> ContactCode:
        """Our account's contact code: account key, contact key, primary, and where this
        device listens (the first connection brings the signed device list)."""
        address = self._address()
        addresses: tuple[str, ...] = ()
        if address:
            from p2p.transport.tcp import advertised_addresses

            try:  # a wildcard bind: the machine's first interface address
                addresses = tuple(advertised_addresses(address)[:1])
            except TransportError:  # not HOST:PORT (an in-memory transport): no hint
                addresses = ()
        return ContactCode(
            account_pk=self._state.device_list.account_pk,
            key=self._state.contact_key(),
            primary=self._state.device_list.primary.device_id,
            addresses=addresses,
        )

    async def add_contact(self, parsed: ContactCode, name: str | None) -> str:
        """Take the account of a contact code as a contact (in our account space); its
        account id. Its device list comes with the first connection to one of its
        devices (checked against the code's account key); a contact without ``name``
        goes by its primary device's name from then on."""
        space_id, entry = self._state.contact_entry(
            name or "", parsed.account_pk, parsed.key, parsed.primary, self._wall_ms()
        )
        batch = self._state.take_contact(parsed.account_pk, parsed.key, parsed.primary)
        await self._writer.queue_entry(space_id, entry, batch).wait()
        self._mail.update_watch()
        return entry.target

    def learn_contacts(self) -> None:
        """Take the contacts our other devices added to the contact book (a relay then
        reports their primaries, whose lists the first meeting brings)."""
        before = self._membership.lists()
        batch = self._state.learn_contacts()
        if batch:
            self._writer.queue(batch)
            self._membership.announce(before)
            self._mail.update_watch()

    # ---- conversations -------------------------------------------------------------

    async def create_chat(self, name: str, with_: Sequence[str]) -> str:
        members = [self.contact_id(c) for c in with_]
        space_id, batch = self._state.new_conversation(name, members)
        await self._writer.commit(batch)
        self.deliver_grants(space_id)
        self._mail.update_watch()
        return space_id

    async def add_to_chat(self, chat: str, with_: Sequence[str]) -> None:
        space = self.chat(chat)
        members = [self.contact_id(c) for c in with_]
        await self._writer.commit(self._state.add_members(space.id, members))
        self.deliver_grants(space.id)
        self._mail.update_watch()

    def changed(self, space_id: str) -> None:
        """Entries of others arrived in a conversation: a member may have left (then
        rotate, if it is ours to do), and a grant waiting for that may pass now."""
        departed = self._state.departed(space_id)  # usually nobody: no task
        if departed and self._state.rotates_for(space_id, departed):
            self._nursery.start_soon(self._rotate_after_leave, space_id)
        waiting = self._unproven.pop(space_id, None)
        if waiting is not None:  # the leave entry it waits for may be here now
            self.grant_in(waiting, came_from=None)

    async def _rotate_after_leave(self, space_id: str) -> None:
        departed = self._state.departed(space_id)
        if not departed or not self._state.rotates_for(space_id, departed):
            return
        await self._rotate(space_id, departed)

    async def _rotate(self, space_id: str, departed: set[str]) -> None:
        """A new epoch of a conversation without ``departed``, granted to every reader."""
        if space_id in self._rotating:
            return
        self._rotating.add(space_id)
        try:
            await self._writer.commit(self._state.rotate_without(space_id, departed))
        finally:
            self._rotating.discard(space_id)
        log.info("chat %s: key rotated without %s", space_id, sorted(departed))
        self.deliver_grants(space_id)
        space = self._state.space(space_id)
        self._emit(
            ev.ChatKeysChanged(
                chat=space_id,
                epoch=space.epoch,
                members=tuple(sorted(space.members)),
                joined=False,
            )
        )

    # ---- grants --------------------------------------------------------------------

    def deliver_grants(self, space_id: str) -> None:
        """Give a space's keys to every device that reads it: over the session when it
        is connected, else into its relay mailbox (it also gets them when we meet)."""
        for device in sorted(self._state.readers_of(space_id)):
            grant = self._state.grant_to(device, space_id)
            if grant is None:
                continue
            sent = self._peers.tell(device, lambda s: s.send_grant(grant))  # noqa: B023
            if not sent and self._mail:
                self._mail.post(device, grant)

    def met_contact(self, account: str) -> None:
        """We hold a contact's device list for the first time: its devices get the keys
        of every conversation with its account."""
        for space in list(self._state.spaces.values()):
            if account in space.members:
                self.deliver_grants(space.id)

    def regrant_all(self) -> None:
        """Give every shared conversation's keys to its readers (after an unlink)."""
        for space in self._state.spaces.values():
            if space.shared:
                self.deliver_grants(space.id)

    def on_grant(self, peer: Peer, out: GrantIn) -> None:
        self.grant_in(out.data, came_from=peer)

    def from_mail(self, data: bytes) -> trio.Event | None:
        return self.grant_in(data, came_from=None)

    def grant_in(self, data: bytes, *, came_from: Peer | None) -> trio.Event | None:
        """A grant reached us (session or mailbox): take the keys, persist them, and
        start syncing a conversation we just joined with every peer that reads it; the
        event fires once the keys are durable."""
        before = self._membership.lists()
        try:
            space_id, news, batch = self._state.accept_grant(data)
        except EpochSplit as exc:
            log.warning("refused a grant: %s", exc)
            self._refused(exc, came_from)
            # the session stays (the peer is honest as far as we can tell), and one
            # primary starts an epoch that takes everyone past the split
            if self._state.heals_split(exc.space) and exc.space not in self._rotating:
                self._nursery.start_soon(self._rotate, exc.space, set())
            return None
        except RotationUnproven as exc:
            log.info("a grant waits for a leave entry: %s", exc)
            if len(self._unproven) < UNPROVEN_MAX:
                self._unproven[exc.space] = data
            return None
        except GrantFromNonMember as exc:
            log.info("ignored a grant: %s", exc)  # we learn the members from our own
            return None
        except P2PError as exc:
            log.warning("refused a grant: %s", exc)
            self._refused(exc, came_from)
            if came_from is not None:
                self._peers.close(came_from, exc)
            return None
        durable = self._writer.queue(batch) if batch else None
        self._membership.announce(before)  # a grant carries its members' lists
        if not news:
            return durable
        space = self._state.space(space_id)
        for device, peer in self._peers.connected().items():
            if space_id in self._state.spaces_for(device):
                self._peers.carry_out(peer, peer.session.send_state_vector(space_id))
                grant = self._state.grant_to(device, space_id)
                if grant is not None and peer is not came_from:
                    self._peers.carry_out(peer, peer.session.send_grant(grant))
        self._mail.update_watch()
        self._emit(
            ev.ChatKeysChanged(
                chat=space_id,
                epoch=space.epoch,
                members=tuple(sorted(space.members)),
                joined=batch is not None and f"space/{space_id}" in batch.records,
            )
        )
        return durable

    def _refused(self, exc: P2PError, came_from: Peer | None) -> None:
        """Report a grant we refused, from a session or (``came_from`` None) a mailbox."""
        self._emit(
            ev.InputRejected(
                remote=came_from.remote if came_from else "mailbox",
                device=came_from.device if came_from else None,
                error=type(exc).__name__,
                detail=str(exc),
            )
        )
