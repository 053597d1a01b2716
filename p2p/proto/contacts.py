"""Contact codes: what one account gives another so they can share conversations.

A contact code carries the account's signed device list (its public key, and every
device with the keys to seal a conversation key to it), its contact key (with which a
contact's devices prove, in the hello, that they hold the code), a suggested name and
where its devices can be met (relay URLs, LAN addresses). Text form: ``P2PC1:`` + base32 of
``msgpack payload || checksum``, like pairing codes (``p2p.proto.pairing``); a mistyped or
altered code fails the checksum, and a list not signed by the key it names fails its
signature.

A code is public: it proves nothing about who hands it over. Trust comes from how it
reached you (in person, as a QR code, over a channel you trust), as with any contact
card. From then on the contact's device list is followed as it changes, and only lists
signed by that same account key are accepted (``DeviceState.follow``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from p2p.errors import ContactError, DeviceListError, P2PError
from p2p.proto.identity import MAX_NAME, DeviceList
from p2p.proto.pairing import from_text, to_text
from p2p.proto.wire import pack, unpack

PREFIX: Final = "P2PC1:"
CODE_VERSION: Final = 1
MAX_CODE: Final = 96 * 1024
MAX_PLACES: Final = 8


class MalformedContactCode(ContactError):
    """Not a contact code: prefix, encoding, checksum, fields or signature are wrong."""


@dataclass(frozen=True, kw_only=True)
class ContactCode:
    device_list: bytes
    """The account's signed device list, encoded."""
    key: bytes = field(repr=False)
    """The account's contact key (``DeviceState.contact_key``): what lets a contact's
    devices meet ours before any conversation is shared."""
    name: str
    relays: tuple[str, ...] = ()
    addresses: tuple[str, ...] = ()

    @property
    def account_id(self) -> str:
        return DeviceList.decode(self.device_list).account_id

    def encode(self) -> str:
        payload = pack(
            [
                CODE_VERSION,
                self.device_list,
                self.key,
                self.name,
                list(self.relays[:MAX_PLACES]),
                list(self.addresses[:MAX_PLACES]),
            ]
        )
        return to_text(PREFIX, payload)

    @classmethod
    def decode(cls, text: str) -> ContactCode:
        """Parse and check a code; MalformedContactCode for anything else."""
        payload = from_text(PREFIX, text, MAX_CODE, MalformedContactCode, "contact code")
        try:
            value = unpack(payload, what="contact code")
            version, device_list, key, name, relays, addresses = value
        except (P2PError, ValueError, TypeError) as exc:
            raise MalformedContactCode("the contact code's fields are malformed") from exc
        ok = (
            version == CODE_VERSION
            and isinstance(device_list, bytes)
            and isinstance(key, bytes)
            and len(key) == 32
            and isinstance(name, str)
            and 0 < len(name) <= MAX_NAME
            and isinstance(relays, list)
            and isinstance(addresses, list)
            and len(relays) <= MAX_PLACES
            and len(addresses) <= MAX_PLACES
            and all(isinstance(p, str) and 0 < len(p) <= 256 for p in relays + addresses)
        )
        if not ok:
            raise MalformedContactCode("the contact code's fields are malformed")
        try:
            dl = DeviceList.decode(device_list)
            dl.verify(dl.account_pk)
        except (P2PError, DeviceListError) as exc:
            raise MalformedContactCode(f"the contact code's device list is invalid: {exc}") from exc
        return cls(
            device_list=device_list,
            key=key,
            name=name,
            relays=tuple(relays),
            addresses=tuple(addresses),
        )
