"""Membership: our account's device list and those of the accounts we follow, leases,
linking, unlinking and leaving.

It owns whether this device asked to leave, and the devices it last announced as on our
list. Rules it keeps:

- **A changed list of ours** (after ``unlink``, ``approve``, a companion's leave, or a
  peer's newer list) is sent as a ``list`` frame to every connected peer still on it;
  the session of every peer no longer on it is closed (the signed list first, so the
  removed device learns it from the primary's signature, then ``RemovedDevice``); if we
  are the one removed, every session is closed. The relays watch the new list, and the
  app is told (``DeviceListChanged``, then ``DeviceLinked`` per added device).
- **Another account's newer list** closes our sessions with the devices it removed and
  updates the relays' watch (``DeviceListChanged`` with ``account``).
- An older list on a ``list`` frame is ignored; a forged one closes that connection.
- Entries hidden because their device was unknown are judged again whenever a list
  gains devices.
- **Leaving** (a companion): the request is stored, then sent to the primary whenever a
  session with it is up, until the primary acts. A primary unlinks a device of ours
  that asks.
- A renewed lease from a peer is stored; a bad one closes that session.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from p2p import events as ev
from p2p.errors import NodeError, P2PError, RemovedDevice, RollbackRefused, Unlinked
from p2p.proto.identity import DeviceList
from p2p.proto.session import DeviceListIn, LeaseIn, LeaveRequested
from p2p.runtime.linking import Linked, Progress, StoredHistory, approve_code
from p2p.runtime.mail import Mail
from p2p.runtime.peers import Peer, Peers
from p2p.runtime.writer import Writer
from p2p.state.device import DeviceState
from p2p.storage.base import Store, WriteBatch

log = logging.getLogger("p2p.runtime.node")  # one logger for all of the node's lines

Lists = tuple[DeviceList, dict[str, DeviceList]]
"""Our list and those we follow, as they were at some moment (see :meth:`Membership.lists`)."""


class Membership:
    """Device lists, ours and followed; see the module docstring."""

    def __init__(
        self,
        state: DeviceState,
        store: Store,
        writer: Writer,
        peers: Peers,
        mail: Mail,
        nursery: trio.Nursery,
        *,
        emit: Callable[[ev.Event], None],
        wall_ms: Callable[[], int],
        regrant: Callable[[], None],
        met_contact: Callable[[str], None],
        leaving: bool,
    ) -> None:
        self._state = state
        self._store = store
        self._writer = writer
        self._peers = peers
        self._mail = mail
        self._nursery = nursery
        self._emit = emit
        self._wall_ms = wall_ms
        self._regrant = regrant
        """Hands every reader of each shared conversation its keys (after an unlink)."""
        self._met_contact = met_contact
        """Hands a contact's devices the keys of our conversations with it, once its
        first list is held."""
        self._leaving = leaving
        """Set once ``leave`` was asked for (kept in the store until the primary acts)."""
        self._known_devices = set(state.device_list.ids)

    @property
    def removed(self) -> bool:
        """Whether our account's signed list names this device as removed."""
        return self._state.device_id in self._state.device_list.removed_ids

    @property
    def leaving(self) -> bool:
        return self._leaving and not self.removed

    def own_device(self, device: str) -> str:
        """The id of our device ``device`` (an id, or the name of exactly one of our
        current devices): what ``p2p unlink NAME`` accepts."""
        dl = self._state.device_list
        if device in dl.ids or device in dl.removed_ids:
            return device
        named = [d.device_id for d in dl.devices if d.name == device]
        if len(named) == 1:
            return named[0]
        if named:
            raise NodeError(f"{len(named)} devices are called {device!r}: give the id")
        return device  # the device list's own error says it is not there

    # ---- from sessions -------------------------------------------------------------

    def peer_up(self, peer: Peer) -> None:
        """A session came up: if it is our primary and we asked to leave, ask again."""
        if peer.device == self._state.device_list.primary.device_id and self._leaving:
            self._peers.carry_out(peer, peer.session.send_leave())

    def on_device_list(self, peer: Peer, out: DeviceListIn) -> None:
        """A peer showed a newer device list: ours, or another account's we follow."""
        ours = self._state.device_list
        unmet = set(self._state.contact_anchors) - set(self._state.accounts)
        try:
            batch = self._state.follow(out.data, trusted=False)
        except RollbackRefused:
            return  # an older list through a slower path: ours is newer, nothing to do
        except P2PError as exc:
            self._peers.close(peer, exc)
            return
        if batch is None:
            return
        self._writer.queue(batch)
        if self._state.device_list is not ours:
            self.device_list_changed()
        else:
            self._account_list_changed(out.data)
            account = DeviceList.decode(out.data).account_id
            if account in unmet:  # the first list of a contact: its devices get our grants
                self._met_contact(account)

    def on_lease(self, peer: Peer, out: LeaseIn) -> None:
        try:
            self._writer.queue(self._state.accept_lease(out.data, self._wall_ms()))
        except P2PError as exc:
            self._peers.close(peer, exc)

    def on_leave_requested(self, peer: Peer, out: LeaveRequested) -> None:
        if self._state.is_primary and out.device in self._state.device_list.ids:
            log.info("device %s asked to be unlinked", out.device)
            self._nursery.start_soon(self.unlink, out.device)

    # ---- lists changed -------------------------------------------------------------

    def lists(self) -> Lists:
        """The lists as they are now, to :meth:`announce` what changes after."""
        return self._state.device_list, dict(self._state.accounts)

    def announce(self, before: Lists) -> None:
        """Act on whatever lists changed since ``before``."""
        own, others = before
        if self._state.device_list is not own:
            self.device_list_changed()
        for account, dl in self._state.accounts.items():
            if others.get(account) is not dl:
                self._account_list_changed(dl.encode())

    def device_list_changed(self) -> None:
        """Tell every peer about our newer list, drop removed ones, tell the app."""
        dl = self._state.device_list
        data = dl.encode()
        for device, peer in self._peers.connected().items():
            if device in dl.removed_ids:
                # the signed list first, so the removed device knows it from the primary's
                # signature (a bare refusal could come from anyone), then the refusal
                self._peers.carry_out(peer, peer.session.send_device_list(data))
                self._peers.close(peer, RemovedDevice(device))
            elif self.removed:  # we are the one removed: nobody of the account takes us
                self._peers.close(peer, Unlinked(self._state.device_id, dl.account_id))
            else:  # our devices, and other accounts' (they follow our list)
                self._peers.carry_out(peer, peer.session.send_device_list(data))
        self._mail.update_watch()
        added = tuple(sorted(dl.ids - self._known_devices))
        removed = tuple(sorted(self._known_devices - dl.ids))
        self._known_devices = set(dl.ids)
        if added:
            self._nursery.start_soon(self._recheck_hidden)
            # when this device first saw each (``p2p devices`` shows recent links)
            now = str(self._wall_ms()).encode()
            self._writer.queue(WriteBatch(records={f"linked/{d}": now for d in added}))
        log.info("device list version %d: added %s, removed %s", dl.version, added, removed)
        self._emit(
            ev.DeviceListChanged(
                version=dl.version, devices=tuple(sorted(dl.ids)), added=added, removed=removed
            )
        )
        for device in added:
            log.info("new device linked: %s (%s)", dl.entry(device).name, device)
            self._emit(ev.DeviceLinked(device=device, name=dl.entry(device).name))

    def _account_list_changed(self, data: bytes) -> None:
        """Another account's newer list: drop its removed devices, follow its new ones."""
        account = DeviceList.decode(data).account_id
        dl = self._state.accounts[account]
        for device, peer in self._peers.connected().items():
            if device in dl.removed_ids:
                self._peers.close(peer, RemovedDevice(device))
        self._mail.update_watch()
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

    async def _recheck_hidden(self) -> None:
        """After new devices joined our list or one we follow: entries hidden because
        their device was unknown may pass now (the CRDT view judges them again too)."""
        for space_id in list(self._state.spaces):
            hidden = await self._writer.run_store(self._store.index_rejected, space_id)
            batch = self._state.recheck(space_id, hidden)
            if batch:
                await self._writer.commit(batch)
                self._emit(ev.ChatChanged(chat=space_id, origin=self._state.device_id))

    # ---- the API's operations ------------------------------------------------------

    async def unlink(self, device_id: str) -> None:
        """Primary only: remove a device, rotate keys, tell the remaining devices now."""
        await self._writer.commit(self._state.unlink(self.own_device(device_id)))
        self.device_list_changed()
        self._regrant()

    async def approve(
        self,
        code: str,
        *,
        confirm: Callable[[str], Awaitable[bool]],
        connect: str | None,
        progress: Progress,
    ) -> Linked:
        """Primary only: link the device showing pairing ``code``."""

        async def read(name: str) -> bytes | None:
            return await trio.to_thread.run_sync(self._store.get, name)

        linked = await approve_code(
            self._state,
            code,
            read=read,
            write=self._writer.commit,
            # from the store, loading no document: a history of any size (linking.py)
            history=StoredHistory(self._state, self._store, self._writer.run_store),
            confirm=confirm,
            now_s=self._wall_ms() // 1000,
            connect=connect,
            progress=progress,
        )
        self.device_list_changed()
        return linked

    async def leave(self) -> None:
        """Companion: ask the primary to unlink this device, now or at the next meeting."""
        if self._state.is_primary:
            raise NodeError("the primary cannot leave its own account")
        await self._writer.commit(WriteBatch(records={"leave/requested": b"1"}))
        self._leaving = True
        primary = self._state.device_list.primary.device_id
        self._peers.tell(primary, lambda s: s.send_leave())
