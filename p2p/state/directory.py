"""The directory: which accounts and devices we know, and who reads which space.

Rules:

- Our own account's signed device list is :attr:`Directory.device_list`; other accounts
  we follow (contacts, members of our conversations) are :attr:`Directory.accounts`,
  each the newest list its account key signed. Only ``accept_device_list`` replaces a
  list (never an older version, never a forged one), and no account may claim a device
  another list holds (``authority.check_unclaimed``).
- A device is *current* while a list holds it. Only a current device's signature opens
  an envelope (:meth:`Directory.current_signing_key`); what any device ever wrote is
  checked with the key any list knows for it (:meth:`Directory.any_signing_key`).
- Every current device of our account reads every space; a current device of another
  account reads the conversations its account is a member of (:meth:`spaces_for`).
- CRDT client ids name their device (``spaces.device_prefix``):
  :meth:`Directory.client_account` says which account writes as a client, ours first.
  The table is rebuilt whenever a list changes.
- Discovery keys (LAN announcements, session hellos) derive from space keys, so only
  devices holding those keys recognise each other (:meth:`Directory.discovery_keys`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Protocol

from p2p.errors import ContactError, DeviceListError, RemovedDevice, UnknownDevice, WireError
from p2p.proto.authority import check_unclaimed
from p2p.proto.contacts import KEY_SIZE as CONTACT_KEY_SIZE
from p2p.proto.identity import DeviceKeys, DeviceList, accept_device_list
from p2p.proto.wire import unpack
from p2p.state.records import required
from p2p.state.spaces import BOOT_BITS, Spaces, device_prefix
from p2p.storage.base import Store, WriteBatch


class Follow(Protocol):
    """``DeviceState.follow``: adopt a newer signed list of an account, ours or another."""

    def __call__(
        self, data: bytes, *, trusted: bool, contact_key: bytes | None = None
    ) -> WriteBatch | None: ...


class Directory:
    """Device lists (ours and those we follow), contact keys and who reads what."""

    def __init__(self, device_id: str, device_list: DeviceList, spaces: Spaces) -> None:
        self.device_id = device_id
        self._own = device_list
        self._spaces = spaces
        self.accounts: dict[str, DeviceList] = {}
        """Other accounts we follow (contacts, members of our conversations): the newest
        signed device list of each, verified by its account key."""
        self.contact_keys: dict[str, bytes] = {}
        """The contact key of each contact (from its contact code): our devices meet
        theirs with it before any conversation is shared."""
        self.contact_anchors: dict[str, tuple[bytes, str]] = {}
        """Each contact's account key and primary device id, from its contact code: the
        key its device lists must be signed by (the first one comes at the first
        connection), the device a relay reports to us before we hold that list."""
        self._client_owners: dict[int, str] | None = None

    @property
    def device_list(self) -> DeviceList:
        """Our own account's signed device list."""
        return self._own

    @device_list.setter
    def device_list(self, device_list: DeviceList) -> None:
        self._own = device_list
        self._client_owners = None  # a device added or removed: its clients change hands

    @property
    def account_id(self) -> str:
        return self._own.account_id

    def load(self, store: Store) -> None:
        """The accounts we follow, their contact keys and the anchors their contact
        codes gave, from their records."""
        for name in store.names("peer/"):
            followed = DeviceList.decode(required(store, name))
            followed.verify(followed.account_pk)
            self.accounts[followed.account_id] = followed
        for name in store.names("peerkey/"):
            self.contact_keys[name.removeprefix("peerkey/")] = required(store, name)
        for name in store.names("peerpk/"):
            account_pk, primary = unpack(required(store, name), what="contact anchor")
            self.contact_anchors[name.removeprefix("peerpk/")] = (account_pk, primary)

    # ---- lists and keys --------------------------------------------------------------

    def list_of(self, account_id: str) -> DeviceList | None:
        """The newest device list we hold of an account (ours or one we follow)."""
        if account_id == self.account_id:
            return self._own
        return self.accounts.get(account_id)

    def account_key_of(self, account_id: str) -> bytes | None:
        """An account's public key: from its device list, or from its contact code
        before we hold a list (a contact we have not met yet)."""
        dl = self.list_of(account_id)
        if dl is not None:
            return dl.account_pk
        anchor = self.contact_anchors.get(account_id)
        return anchor[0] if anchor else None

    def current_account_of(self, device_id: str) -> DeviceList:
        """The list on which ``device_id`` is a current device (ours first);
        RemovedDevice or UnknownDevice if none."""
        removed = False
        for dl in (self._own, *self.accounts.values()):
            if device_id in dl.ids:
                return dl
            removed = removed or device_id in dl.removed_ids
        raise RemovedDevice(device_id) if removed else UnknownDevice(device_id)

    def current_signing_key(self, device_id: str) -> bytes:
        """Signing key of a current device of our account or of one we follow
        (UnknownDevice/RemovedDevice otherwise)."""
        return self.current_account_of(device_id).entry(device_id).sign_pk

    def any_signing_key(self, device_id: str) -> bytes | None:
        """Signing key of any device any account we know ever had: to check what it
        wrote (a device id is a hash of its key, so every list agrees on it)."""
        for dl in (self._own, *self.accounts.values()):
            key = dl.signing_key_of(device_id)
            if key is not None:
                return key
        return None

    def belongs(self, device_id: str, account_id: str) -> bool:
        """Whether ``account_id``'s signed list holds or held ``device_id`` (an entry's
        author is checked as this pair: another account may list the same key)."""
        dl = self.list_of(account_id)
        return dl is not None and dl.signing_key_of(device_id) is not None

    def client_account(self, client: int) -> str | None:
        """The account whose device writes as CRDT client ``client`` (None if none we
        know of)."""
        if self._client_owners is None:
            owners = {}
            # ours last: nothing another account lists can take our clients from us
            for dl in (*self.accounts.values(), self._own):
                for d in (*dl.devices, *dl.removed):
                    owners[device_prefix(d.device_id)] = dl.account_id
            self._client_owners = owners
        return self._client_owners.get(client >> BOOT_BITS)

    def ours_client(self, client: int) -> bool:
        """Whether a device of our account writes as CRDT client ``client``."""
        return self.client_account(client) == self.account_id

    def author_client(self, account_id: str) -> Callable[[int], bool]:
        """Whether a device of ``account_id`` writes as a client."""
        return lambda client: self.client_account(client) == account_id

    # ---- adopting lists --------------------------------------------------------------

    def newer_own(self, data: bytes) -> DeviceList | None:
        """Our account's list ``data`` if it is newer than ours (None: the one we hold);
        RollbackRefused for an older one, DeviceListError for a forged one. Not adopted
        yet: the caller first takes the keys it grants us."""
        try:
            offered = DeviceList.decode(data)
        except WireError as exc:
            raise DeviceListError(f"device list is malformed: {exc}") from exc
        kept = accept_device_list(self._own, offered)
        return None if kept is self._own else kept

    def follow_other(
        self, offered: DeviceList, *, trusted: bool, contact_key: bytes | None = None
    ) -> tuple[WriteBatch | None, bool]:
        """Adopt a newer list of another account (see ``DeviceState.follow``): the batch
        (None if nothing changed), and whether the list was adopted."""
        keyed = WriteBatch()
        if contact_key is not None and self.contact_keys.get(offered.account_id) != contact_key:
            self.contact_keys[offered.account_id] = contact_key
            keyed.records[f"peerkey/{offered.account_id}"] = contact_key
        known = self.accounts.get(offered.account_id)
        anchor = self.contact_anchors.get(offered.account_id)
        if known is None:
            if anchor is not None:  # the key its contact code named, whoever shows the list
                offered.verify(anchor[0])
            elif not trusted:
                raise ContactError(f"account {offered.account_id} is not one we follow")
            else:
                offered.verify(offered.account_pk)
            kept = offered
        else:
            kept = accept_device_list(known, offered)
            if kept is known:
                return keyed or None, False
        check_unclaimed(kept, [self._own, *self.accounts.values()])
        self.accounts[kept.account_id] = kept
        self._client_owners = None
        keyed.records[f"peer/{kept.account_id}"] = kept.encode()
        return keyed, True

    # ---- who reads what ----------------------------------------------------------------

    def spaces_for(self, device_id: str, device_list: DeviceList | None = None) -> list[str]:
        """Spaces a device may read: all of them for our own current devices, the
        conversations its account is a member of for another account's current device
        (judged by ``device_list`` when given: a newer list a peer just showed us)."""
        ours = device_list is None or device_list.account_id == self.account_id
        if ours and device_id in (device_list or self._own).ids:
            return sorted(self._spaces)
        theirs: DeviceList | None = None if ours else device_list
        if theirs is None:
            theirs = next((dl for dl in self.accounts.values() if device_id in dl.ids), None)
        if theirs is None or device_id not in theirs.ids:
            return []
        return sorted(s.id for s in self._spaces.values() if theirs.account_id in s.members)

    def member_devices(self, space_id: str) -> set[str]:
        """Every current device of every member account of a space (ours included)."""
        devices = set(self._own.ids)
        for account_id in self._spaces.space(space_id).members:
            dl = self.accounts.get(account_id)
            if dl is not None:
                devices |= dl.ids
        return devices

    def readers_of(self, space_id: str) -> set[str]:
        """Every current device, other than this one, that reads a space."""
        return self.member_devices(space_id) - {self.device_id}

    def followed_devices(self) -> list[str]:
        """Devices whose presence we follow on a relay: our account's other devices
        first, then those of the accounts we share conversations with."""
        ours = sorted(self._own.ids - {self.device_id})
        members = {a for s in self._spaces.values() for a in s.members} - {self.account_id}
        theirs = sorted(
            d for a in members if (dl := self.accounts.get(a)) is not None for d in dl.ids
        )
        # contacts not met yet: their primary, whose list the first meeting brings
        unmet = sorted(p for a, (_, p) in self.contact_anchors.items() if a not in self.accounts)
        return ours + theirs + unmet

    # ---- recognising each other --------------------------------------------------------

    def contact_key(self) -> bytes:
        """Our account's contact key, given away in contact codes: a contact's device
        proves with it that it holds our code (it learns nothing the code did not tell).
        Derived from the account space's first key, so every device of ours has it."""
        account = self._spaces.account
        if account is None:
            return bytes(CONTACT_KEY_SIZE)
        first = account.keys[min(account.keys)]
        return hashlib.blake2b(
            first, digest_size=CONTACT_KEY_SIZE, person=b"p2p-contact-key"
        ).digest()

    def discovery_keys(self) -> list[bytes]:
        """The discovery key of every epoch we hold, newest first: a device that missed
        a rotation still proves membership with the old one (and is then judged by the
        device list, which says whether it was removed).

        Our account's epochs come first (at most 8), then our contact key, the contact
        key of each contact, and last the newest two epochs of each conversation with an
        account that is not our contact (a group's other members: their devices meet
        ours with those). A session sends at most 64 tags: a contact that makes many
        conversations can push only the last kind out, never our account's or our
        contacts' tags (contacts meet us with their contact keys, whatever they share)."""
        account = self._spaces.account
        if account is None:  # not enrolled: nothing to prove membership with
            return [bytes(32)]
        keys = [account.keys[e] for e in sorted(account.keys, reverse=True)][:8]
        keys.append(self.contact_key())
        keys += [self.contact_keys[a] for a in sorted(self.contact_keys)]
        known = set(self.contact_keys) | {self.account_id}
        for space in sorted(self._spaces.values(), key=lambda s: s.id):
            if space.shared and not set(space.members) <= known:
                keys += [space.keys[e] for e in sorted(space.keys, reverse=True)[:2]]
        return [
            hashlib.blake2b(key, digest_size=32, person=b"p2p-discovery").digest() for key in keys
        ]


class Part:
    """A part of a device's state: it works on the spaces held and reads the directory
    (both shared by every part; the facade ``DeviceState`` owns them)."""

    def __init__(self, keys: DeviceKeys, spaces: Spaces, directory: Directory) -> None:
        self._keys = keys
        self._spaces = spaces
        self._directory = directory
