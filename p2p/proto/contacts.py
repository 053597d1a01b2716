"""Contact codes: what one account gives another so they can share conversations.

A contact code carries the account's public key (the trust anchor: every device list
of the account must be signed by it), its contact key (with which a contact's devices
prove, in the hello, that they hold the code), the id of its primary device (so that a
relay can say when it is online) and, when it is small, where that device listens (one
IP literal). Its device list is not in it: the first connection brings it
(``p2p.proto.session``: the peer's ``ident`` carries it), and it is taken only if that key signed
it (``DeviceState.follow``); a forged list or one of another account is refused
(DeviceListError / NotOurAccount). That keeps the code short: its text is about 110
characters, its QR code 41 by 41 modules (21 rows of a terminal).

Layout (``encode``): ``account key (32) || contact key (12) || primary id (10) ||
hosts`` (``p2p.proto.pairing.pack_hosts``). Text form: ``P2PC2:`` + base32 of ``payload ||
checksum``, like pairing codes; a mistyped or altered code fails the checksum, and a
code of the earlier format (``P2PC1:``, a whole signed device list inside) is refused
as :class:`OutdatedContactCode`.

A code is public: it proves nothing about who hands it over. Trust comes from how it
reached you (in person, as a QR code, over a channel you trust), as with any contact
card. From then on the contact's device list is followed as it changes, and only lists
signed by that same account key are accepted (``DeviceState.follow``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from p2p.errors import ContactError
from p2p.proto.identity import short_id
from p2p.proto.pairing import (
    ID_SIZE,
    device_id_bytes,
    device_id_text,
    from_text,
    pack_hosts,
    to_text,
    unpack_hosts,
)

PREFIX: Final = "P2PC2:"
OLD_PREFIXES: Final = ("P2PC1:",)
KEY_SIZE: Final = 12
"""Bytes of a contact key: 96 bits, which no one guesses online (each guess is a
connection) nor offline from a captured hello (its tags are keyed over fresh nonces)."""
MAX_CODE: Final = 512
MAX_TEXT: Final = 114
"""The longest text a new code is given: what a version-4 QR code (33 modules, 41 with
its quiet zone: 21 terminal rows) holds at error level L. An address that would take
it past this is left out (the relay and mDNS still find the devices)."""
_FIXED: Final = 32 + KEY_SIZE + ID_SIZE


class MalformedContactCode(ContactError):
    """Not a contact code: prefix, encoding, checksum or fields are wrong."""


class OutdatedContactCode(MalformedContactCode):
    """A contact code of an earlier format: ask the contact for a new one."""


@dataclass(frozen=True, kw_only=True)
class ContactCode:
    account_pk: bytes
    """The account's public key: the device lists its devices show must be signed by it."""
    key: bytes = field(repr=False)
    """The account's contact key (``DeviceState.contact_key``): what lets a contact's
    devices meet ours before any conversation is shared."""
    primary: str
    """The id of the account's primary device: a relay reports when it is online."""
    addresses: tuple[str, ...] = ()

    @property
    def account_id(self) -> str:
        return short_id(self.account_pk)

    def encode(self) -> str:
        payload = (
            self.account_pk + self.key + device_id_bytes(self.primary) + pack_hosts(self.addresses)
        )
        text = to_text(PREFIX, payload)
        if len(text) > MAX_TEXT and self.addresses:  # the address is only a hint
            text = to_text(PREFIX, payload[:_FIXED] + pack_hosts(()))
        return text

    @classmethod
    def decode(cls, text: str) -> ContactCode:
        """Parse a code; MalformedContactCode for anything else (OutdatedContactCode
        for one of the earlier format)."""
        payload = from_text(
            PREFIX,
            text,
            MAX_CODE,
            MalformedContactCode,
            "contact code",
            OLD_PREFIXES,
            OutdatedContactCode,
        )
        if len(payload) < _FIXED + 1:
            raise MalformedContactCode("the contact code's fields are malformed")
        try:
            addresses = unpack_hosts(payload[_FIXED:])
        except ValueError as exc:
            raise MalformedContactCode(
                f"the contact code's addresses are malformed: {exc}"
            ) from exc
        return cls(
            account_pk=payload[:32],
            key=payload[32 : 32 + KEY_SIZE],
            primary=device_id_text(payload[32 + KEY_SIZE : _FIXED]),
            addresses=tuple(addresses),
        )
