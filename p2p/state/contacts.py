"""Contacts: the accounts we took a contact code of, kept in our account space.

Rules:

- Our contact book is the set of ``contact`` entries in our account space
  (``model.CONTACTS``), written by a device of our account: so every device of ours
  learns every contact and takes its code's anchors (:meth:`Contacts.learn`).
- A contact entry holds what the contact code gave: the account's name for us (empty:
  its primary device's name once its list is held, its id until then), its account key,
  its contact key (with which its devices meet ours) and its primary device's id. The
  device list is not in the code: the first connection brings it, and it is taken only
  if that account key signed it (``Directory.follow_other``).
- An entry whose account id is not its key's ``short_id`` is ignored.
- Our own account's code is never a contact.
"""

from __future__ import annotations

import base64
from typing import NamedTuple

from p2p.errors import ContactError, WireError
from p2p.proto.identity import DeviceKeys, short_id
from p2p.proto.model import CONTACTS, Entry
from p2p.proto.wire import pack, unpack
from p2p.state.authoring import Author
from p2p.state.directory import Directory, Part
from p2p.state.records import merge_batches
from p2p.state.spaces import Spaces
from p2p.storage.base import WriteBatch


class Contact(NamedTuple):
    """One entry of our contact book."""

    name: str
    """What we call the account (its primary device's name when added without one)."""
    account_pk: bytes
    """Its account key, from its contact code: its device lists must be signed by it."""
    key: bytes
    """Its contact key: its devices meet ours with it."""
    primary: str
    """Its primary device's id: a relay reports it before we hold the account's list."""

    def __repr__(self) -> str:  # the key stays out of logs and tracebacks
        return f"Contact({self.name!r})"


class Contacts(Part):
    """Reads and writes our contact book."""

    def __init__(
        self, keys: DeviceKeys, spaces: Spaces, directory: Directory, author: Author
    ) -> None:
        super().__init__(keys, spaces, directory)
        self._author = author

    def entries(self) -> dict[str, Contact]:
        """Our contact book, from the account space: account id -> contact. A contact
        added without a name is called by its primary device's name once we hold its
        list, by its id until then."""
        account = self._spaces.account
        if account is None:
            return {}
        d = self._directory
        book: dict[str, Contact] = {}
        for e in account.replica.valid_entries(CONTACTS, d.any_signing_key, d.belongs):
            if e.kind != "contact" or e.account != d.account_id:
                continue
            try:
                name, account_pk, key, primary = unpack(base64.b64decode(e.body), what="contact")
                account_pk, key = bytes(account_pk), bytes(key)
            except (WireError, ValueError, TypeError):
                continue
            if short_id(account_pk) != e.target or not isinstance(primary, str):
                continue
            if not name:
                dl = d.accounts.get(e.target)
                name = dl.primary.name if dl is not None else e.target
            book[e.target] = Contact(str(name), account_pk, key, primary)
        return book

    def take(self, account_pk: bytes, key: bytes, primary: str) -> WriteBatch:
        """Remember a contact's account key, contact key and primary (from its code): its
        devices can meet ours now, and the first that does shows the account's device
        list, which we take if that key signed it (``DeviceState.follow``)."""
        d = self._directory
        account_id = short_id(account_pk)
        if account_id == d.account_id:
            raise ContactError("that is our own account's contact code")
        known = d.accounts.get(account_id)
        if known is not None and known.account_pk != account_pk:
            raise ContactError(f"account {account_id} is followed with another key")
        batch = WriteBatch()
        if d.contact_anchors.get(account_id) != (account_pk, primary):
            d.contact_anchors[account_id] = (account_pk, primary)
            batch.records[f"peerpk/{account_id}"] = pack([account_pk, primary])
        if d.contact_keys.get(account_id) != key:
            d.contact_keys[account_id] = key
            batch.records[f"peerkey/{account_id}"] = key
        return batch

    def learn(self) -> WriteBatch:
        """Take every contact of our contact book (the account space): what another of
        our devices added, or what a newly linked device finds in its history."""
        batches = []
        for contact in self.entries().values():
            try:
                batches.append(self.take(contact.account_pk, contact.key, contact.primary))
            except ContactError:
                continue  # broken, or our own: keep what we have
        return merge_batches(batches)

    def entry(
        self, name: str, account_pk: bytes, key: bytes, primary: str, wall_ms: int
    ) -> tuple[str, Entry]:
        """The account-space entry adding a contact (account id, signed entry); ``name``
        may be empty (the contact then goes by its primary device's name)."""
        account_id = short_id(account_pk)
        if account_id == self._directory.account_id:
            raise ContactError("that is our own account's contact code")
        account = self._spaces.account
        if account is None:
            raise ContactError("this device holds no account space yet")
        body = base64.b64encode(pack([name, account_pk, key, primary])).decode("ascii")
        entry = self._author.new_entry(account.id, "contact", wall_ms, body=body, target=account_id)
        return account.id, entry
