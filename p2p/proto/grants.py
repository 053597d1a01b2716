"""Space grants: how a conversation's keys reach the devices of every member account.

A device list carries the account's own space keys to its own companions (see
``DeviceList.grants``), but a conversation with other accounts needs its keys on *their*
devices too, and on devices linked after the conversation began. A grant is the key of
one space, sealed to one device:

    ["grant", to, from, account, sealed, signature]

- ``sealed`` = SealedBox(recipient's X25519 key, msgpack [space id, name, epoch,
  [[epoch, key]...], [signed device list of each member account]..., [[epoch,
  rotation]...]]): only the recipient opens it; the member lists let it check every
  member's devices (and, in a group, meet members it has no contact with) without asking
  anyone; the rotations (``authority.Rotation``, signed by whoever made each epoch after
  0) let it take a key only from the act that created its epoch.
- ``signature`` = Ed25519 of the granting device over ``DOMAIN || msgpack [to, from,
  account, sealed]``: the recipient accepts a grant only from a current device of an
  account it trusts for that space (see ``DeviceState.accept_grant``).

Any member device grants to any other current member device it meets, so a key rotated
by one device spreads like gossip (the rotation it carries proves who made it); a grant
travels a session (``grant`` frame) or a relay mailbox, where it is told apart from an
envelope by its first item. Pure functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from nacl.exceptions import CryptoError as NaclCryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox

from p2p.errors import BadSignature, GrantRefused, MalformedFrame, WireError
from p2p.proto.authority import MAX_MEMBERS, MAX_ROTATION
from p2p.proto.envelope import KEY_SIZE
from p2p.proto.identity import MAX_NAME, DeviceKeys, DeviceList, verify
from p2p.proto.wire import MAX_ID, pack, unpack

DOMAIN_GRANT: Final = b"p2p/grant/v1\x00"
TAG: Final = "grant"
MAX_GRANT: Final = 1024 * 1024
MAX_EPOCHS: Final = 256


@dataclass(frozen=True, kw_only=True)
class SpaceGrant:
    """What a grant gives: a space's name, keys and member accounts."""

    space: str
    name: str
    epoch: int
    keys: dict[int, bytes]
    members: tuple[bytes, ...]
    """The signed device list of each member account (encoded)."""
    rotations: dict[int, bytes] = field(default_factory=dict)
    """The encoded ``authority.Rotation`` of each epoch after 0 that the granter holds."""


@dataclass(frozen=True, kw_only=True)
class SealedGrant:
    """A grant's outer layer, parsed but neither opened nor verified."""

    to: str
    sender: str
    account: str
    sealed: bytes
    signature: bytes

    def signed_part(self) -> bytes:
        return pack([self.to, self.sender, self.account, self.sealed])


def is_grant(data: bytes) -> bool:
    """Whether mailbox bytes are a grant (else they are an envelope)."""
    return data[:7] == pack([TAG, "", "", "", b"", b""])[:7]


def seal_grant(
    granter: DeviceKeys, account: str, to: str, box_pk: bytes, grant: SpaceGrant
) -> bytes:
    """A grant of ``grant`` for device ``to`` (whose X25519 key is ``box_pk``)."""
    inner = pack(
        [
            grant.space,
            grant.name,
            grant.epoch,
            [[e, k] for e, k in sorted(grant.keys.items())],
            list(grant.members),
            [[e, r] for e, r in sorted(grant.rotations.items())],
        ]
    )
    sealed = bytes(SealedBox(PublicKey(box_pk)).encrypt(inner))
    outer = SealedGrant(
        to=to, sender=granter.device_id, account=account, sealed=sealed, signature=b""
    )
    signature = granter.sign(DOMAIN_GRANT, outer.signed_part())
    return pack([TAG, to, granter.device_id, account, sealed, signature])


def parse_grant(data: bytes) -> SealedGrant:
    """The outer layer; MalformedFrame if it is not shaped like a grant."""
    value = unpack(data, what="grant", max_size=MAX_GRANT)
    ok = (
        isinstance(value, list)
        and len(value) == 6
        and value[0] == TAG
        and all(isinstance(v, str) and 0 < len(v) <= MAX_ID for v in value[1:4])
        and isinstance(value[4], bytes)
        and isinstance(value[5], bytes)
        and len(value[5]) == 64
    )
    if not ok:
        raise MalformedFrame("grant is malformed")
    _, to, sender, account, sealed, signature = value
    return SealedGrant(to=to, sender=sender, account=account, sealed=sealed, signature=signature)


def verify_grant(grant: SealedGrant, sender_pk: bytes) -> None:
    """Check the granting device's signature; GrantRefused if it does not verify."""
    try:
        verify(sender_pk, DOMAIN_GRANT, grant.signed_part(), grant.signature)
    except BadSignature as exc:
        raise GrantRefused(f"grant from {grant.sender} has a bad signature") from exc


def open_grant(grant: SealedGrant, recipient: DeviceKeys) -> SpaceGrant:
    """Decrypt and parse what the grant gives; GrantRefused if it is not for us or junk."""
    if grant.to != recipient.device_id:
        raise GrantRefused(f"grant is for device {grant.to}, not us")
    try:
        inner = SealedBox(PrivateKey(recipient.box_secret)).decrypt(grant.sealed)
        space, name, epoch, keys, members, rotations = unpack(
            inner, what="grant body", max_size=MAX_GRANT
        )
        ok = (
            isinstance(space, str)
            and 0 < len(space) <= MAX_ID
            and isinstance(name, str)
            and len(name) <= MAX_NAME  # "": unnamed, each reader shows the members
            and type(epoch) is int
            and 0 <= epoch < 2**32
            and isinstance(keys, list)
            and 0 < len(keys) <= MAX_EPOCHS
            and all(
                isinstance(k, list)
                and len(k) == 2
                and type(k[0]) is int
                and 0 <= k[0] < 2**32
                and isinstance(k[1], bytes)
                and len(k[1]) == KEY_SIZE
                for k in keys
            )
            and isinstance(members, list)
            and 0 < len(members) <= MAX_MEMBERS
            and all(isinstance(m, bytes) for m in members)
            and isinstance(rotations, list)
            and len(rotations) <= MAX_EPOCHS
            and all(
                isinstance(r, list)
                and len(r) == 2
                and type(r[0]) is int
                and 0 < r[0] < 2**32
                and isinstance(r[1], bytes)
                and len(r[1]) <= MAX_ROTATION
                for r in rotations
            )
        )
    except (NaclCryptoError, WireError, ValueError, TypeError) as exc:
        raise GrantRefused(f"grant from {grant.sender} does not open") from exc
    if not ok:
        raise GrantRefused(f"grant from {grant.sender} is malformed inside")
    key_map = {int(e): bytes(k) for e, k in keys}
    if epoch not in key_map:
        raise GrantRefused(f"grant from {grant.sender} lacks the key of its own epoch")
    return SpaceGrant(
        space=space,
        name=name,
        epoch=epoch,
        keys=key_map,
        members=tuple(members),
        rotations={int(e): bytes(r) for e, r in rotations},
    )


def decode_members(grant: SpaceGrant) -> list[DeviceList]:
    """The member lists, parsed (not verified: the caller checks each against the
    account key it trusts); GrantRefused if one is malformed or an account repeats."""
    try:
        lists = [DeviceList.decode(m) for m in grant.members]
    except WireError as exc:
        raise GrantRefused(f"a member list in the grant of {grant.space} is malformed") from exc
    if len({dl.account_id for dl in lists}) != len(lists):
        raise GrantRefused(f"the grant of {grant.space} names an account twice")
    return lists
