"""Contacts: the accounts we took a contact code of, kept in our account space.

Rules:

- Our contact book is the set of ``contact`` entries in our account space
  (``model.CONTACTS``), written by a device of our account: so every device of ours
  learns every contact, and follows its account (:meth:`Contacts.learn`).
- A contact entry holds what the contact code gave: the account's name for us, its
  signed device list, and its contact key (with which its devices meet ours).
- Our own account's code is never a contact.
"""

from __future__ import annotations

import base64
from typing import NamedTuple

from p2p.errors import ContactError, DeviceListError, WireError
from p2p.proto.identity import DeviceKeys, DeviceList
from p2p.proto.model import CONTACTS, Entry
from p2p.proto.wire import pack, unpack
from p2p.state.authoring import Author
from p2p.state.directory import Directory, Follow, Part
from p2p.state.records import merge_batches
from p2p.state.spaces import Spaces
from p2p.storage.base import WriteBatch


class Contact(NamedTuple):
    """One entry of our contact book."""

    name: str
    """What we call the account."""
    device_list: bytes
    """Its signed device list, as its contact code gave it (or newer)."""
    key: bytes
    """Its contact key: its devices meet ours with it."""

    def __repr__(self) -> str:  # the key stays out of logs and tracebacks
        return f"Contact({self.name!r})"


class Contacts(Part):
    """Reads and writes our contact book."""

    def __init__(
        self, keys: DeviceKeys, spaces: Spaces, directory: Directory, author: Author, follow: Follow
    ) -> None:
        super().__init__(keys, spaces, directory)
        self._author = author
        self._follow = follow

    def entries(self) -> dict[str, Contact]:
        """Our contact book, from the account space: account id -> contact."""
        account = self._spaces.account
        if account is None:
            return {}
        d = self._directory
        book: dict[str, Contact] = {}
        for e in account.replica.valid_entries(CONTACTS, d.any_signing_key, d.belongs):
            if e.kind != "contact" or e.account != d.account_id:
                continue
            try:
                name, listed, key = unpack(base64.b64decode(e.body), what="contact")
                book[e.target] = Contact(str(name), bytes(listed), bytes(key))
            except (WireError, ValueError, TypeError):
                continue
        return book

    def learn(self) -> WriteBatch:
        """Follow every account of our contact book (the account space): what another
        of our devices added, or what a newly linked device finds in its history."""
        batches = []
        for contact in self.entries().values():
            try:
                batch = self._follow(contact.device_list, trusted=True, contact_key=contact.key)
            except (DeviceListError, ContactError, WireError):
                continue  # older than what we follow already, or broken: keep ours
            if batch is not None:
                batches.append(batch)
        return merge_batches(batches)

    def entry(self, name: str, device_list: bytes, key: bytes, wall_ms: int) -> tuple[str, Entry]:
        """The account-space entry adding a contact (account id, signed entry)."""
        dl = DeviceList.decode(device_list)
        if dl.account_id == self._directory.account_id:
            raise ContactError("that is our own account's contact code")
        account = self._spaces.account
        if account is None:
            raise ContactError("this device holds no account space yet")
        body = base64.b64encode(pack([name, device_list, key])).decode("ascii")
        entry = self._author.new_entry(
            account.id, "contact", wall_ms, body=body, target=dl.account_id
        )
        return account.id, entry
