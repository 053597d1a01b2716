"""Who may sign a device list, start a key epoch or change a member list: the one rule.

Everything that changes who reads or writes is decided here, and only here:

1. **Device list.** Signed by the account key; its version only grows
   (``identity.accept_device_list``). Every entry carries the device's own possession
   proof for that account key (``identity.possession_proof``), and a device key belongs
   to one account: the first we learned it from (:func:`check_unclaimed`). Only the
   primary holds the account key, so only it adds or removes devices.
2. **A new key epoch** of a space, with the member set that goes with it, is made by one
   device and stated in a :class:`Rotation` that device signs: the space, the epoch, a
   hash of its key, the member accounts from then on, and the signer's key.
   - The signer must be the **primary of a member account** of the new epoch (the
     primary: the device the account key put first on its list). For the account space
     and an account's own chats, that is the account's own primary, which rotates when
     it unlinks a device. For a conversation, it is the primary of any member account:
     one rotates when it unlinks a device of its own (the member set stays), and the
     primary of the remaining account with the smallest id (:func:`leave_rotator`)
     rotates when an account leaves.
   - A rotation may leave out only accounts that **signed a leave entry** in the space
     (the receiver checks its own replica): no member is dropped by anyone else. Our own
     primary is trusted on this (it signs our list). Until the entry is here the
     rotation waits (:class:`RotationUnproven`); it is never applied without it.
3. **A key for an epoch** after 0 is taken only with the rotation that created it: signed
   as in 2, and the key hashes to what the rotation states. A key held is never replaced;
   another key for an epoch we hold is a split, refused and reported (:class:`EpochSplit`),
   which the primary of the member account with the smallest id heals with a new epoch
   (:func:`split_healer`); a newer epoch takes a member past a split. Epoch 0's
   key comes with the space itself (the device that created it, or the grant that
   brings us a space we do not hold yet).
4. **Members added** within an epoch: by any current device of a member account (it
   holds the key and could hand it over anyway; everyone sees the new member set).
5. **A new conversation** reaches us only from our own account or a contact (an account
   whose contact code we took): an account we follow only because it shares a group
   with us cannot start conversations on our devices (``GrantFromStranger``).

A later account-key succession (recovering an account whose primary is lost) extends
rule 1 (who may sign an account's list) and with it "primary" in rules 2-3: only
:func:`is_primary_of` needs to learn it.

Pure functions and frozen values; no I/O.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Final

from p2p.errors import BadSignature, DeviceListError, GrantFromNonMember, GrantRefused, WireError
from p2p.proto.identity import DeviceKeys, DeviceList, short_id, verify
from p2p.proto.wire import MAX_ID, pack, unpack

DOMAIN_ROTATION: Final = b"p2p/rotation/v1\x00"
MAX_ROTATION: Final = 2048
MAX_MEMBERS: Final = 16
"""Accounts in one conversation."""


class RotationRefused(GrantRefused):
    """A new key epoch, member set or epoch key that its signer was not entitled to
    make, that does not match its key, or that conflicts with one we hold (a split)."""


class GrantFromStranger(GrantFromNonMember):
    """A grant of a conversation we do not hold, from an account that is not our
    contact: ignored (a group's members may grant us its keys, but only a contact may
    start a conversation with us)."""


class EpochSplit(RotationRefused):
    """Two keys for one epoch of a space (two primaries rotated at once, or one gave
    members different keys): the second is refused and reported, the session stays, and
    the primary of the member account with the smallest id starts a new epoch for
    everyone (:func:`split_healer`)."""

    def __init__(self, space: str, message: str) -> None:
        super().__init__(message)
        self.space = space


class RotationUnproven(GrantFromNonMember):
    """A rotation that drops an account whose leave entry we do not hold (yet): not
    applied. The node keeps it aside and tries it again when that chat changes (the
    leave entry may still be on its way); a rotation dropping an account that never
    left is never applied."""

    def __init__(self, space: str, message: str) -> None:
        super().__init__(message)
        self.space = space


def key_hash(key: bytes) -> bytes:
    """What a rotation states of its key (never the key itself: rotations are public)."""
    return hashlib.blake2b(key, digest_size=32, person=b"p2p-epoch-key").digest()


@dataclass(frozen=True, kw_only=True)
class Rotation:
    """A signed statement: "epoch ``epoch`` of ``space`` has the key hashing to
    ``key_hash``, and these member accounts", by the device with ``signer_pk``."""

    space: str
    epoch: int
    members: tuple[bytes, ...]
    """Account public keys, sorted."""
    key_hash: bytes
    signer_pk: bytes
    signature: bytes = b""

    @property
    def member_ids(self) -> frozenset[str]:
        return frozenset(short_id(pk) for pk in self.members)

    @property
    def signer(self) -> str:
        return short_id(self.signer_pk)

    def _body(self) -> bytes:
        return pack([self.space, self.epoch, list(self.members), self.key_hash, self.signer_pk])

    @classmethod
    def make(
        cls, signer: DeviceKeys, space: str, epoch: int, key: bytes, members: list[bytes]
    ) -> Rotation:
        unsigned = cls(
            space=space,
            epoch=epoch,
            members=tuple(sorted(members)),
            key_hash=key_hash(key),
            signer_pk=signer.sign_pk,
        )
        return replace(unsigned, signature=signer.sign(DOMAIN_ROTATION, unsigned._body()))

    def encode(self) -> bytes:
        return pack([self._body(), self.signature])

    @classmethod
    def decode(cls, data: bytes) -> Rotation:
        """Parse (not check) a rotation; RotationRefused if malformed."""
        try:
            body, signature = unpack(data, what="rotation", max_size=MAX_ROTATION)
            space, epoch, members, hashed, signer_pk = unpack(
                body, what="rotation body", max_size=MAX_ROTATION
            )
            ok = (
                isinstance(signature, bytes)
                and len(signature) == 64
                and isinstance(space, str)
                and 0 < len(space) <= MAX_ID
                and type(epoch) is int
                and 0 < epoch < 2**32
                and isinstance(members, list)
                and 0 < len(members) <= MAX_MEMBERS
                and all(isinstance(m, bytes) and len(m) == 32 for m in members)
                and members == sorted(set(members))
                and isinstance(hashed, bytes)
                and len(hashed) == 32
                and isinstance(signer_pk, bytes)
                and len(signer_pk) == 32
            )
        except (WireError, TypeError, ValueError) as exc:
            raise RotationRefused("a rotation is malformed") from exc
        if not ok:
            raise RotationRefused("a rotation is malformed")
        return cls(
            space=space,
            epoch=epoch,
            members=tuple(members),
            key_hash=hashed,
            signer_pk=signer_pk,
            signature=signature,
        )


def is_primary_of(device_list: DeviceList, signer_pk: bytes) -> bool:
    """Rule 2: whether ``signer_pk`` is the primary of this (verified) list's account."""
    return device_list.primary.sign_pk == signer_pk


def check_rotation(
    rotation: Rotation,
    *,
    space: str,
    key: bytes,
    list_of: dict[str, DeviceList],
) -> None:
    """Rules 2 and 3 without the member-removal part (see :func:`check_removal`):
    RotationRefused unless ``rotation`` is for ``space``, states ``key``, and its signer is
    the primary of one of its member accounts (``list_of``: the lists we hold)."""
    if rotation.space != space:
        raise RotationRefused(f"a rotation of {rotation.space} is shown for {space}")
    if key_hash(key) != rotation.key_hash:
        raise RotationRefused(f"the key of {space} epoch {rotation.epoch} is not the one rotated")
    signer_account = next(
        (
            a
            for a in sorted(rotation.member_ids)
            if (dl := list_of.get(a)) is not None and is_primary_of(dl, rotation.signer_pk)
        ),
        None,
    )
    if signer_account is None:
        raise RotationRefused(
            f"epoch {rotation.epoch} of {space} was made by {rotation.signer}, "
            "which is not the primary of a member account"
        )
    try:
        verify(rotation.signer_pk, DOMAIN_ROTATION, rotation._body(), rotation.signature)
    except BadSignature as exc:
        raise RotationRefused(f"the rotation of {space} epoch {rotation.epoch} is forged") from exc


def check_removal(
    rotation: Rotation, *, members: set[str], departed: set[str], trusted_signer: bool
) -> None:
    """Rule 2's last part: a rotation leaves out only accounts that left (``departed``:
    their leave entries in our replica), unless its signer is our own primary."""
    dropped = members - rotation.member_ids
    if dropped - departed and not trusted_signer:
        raise RotationUnproven(
            rotation.space,
            f"epoch {rotation.epoch} of {rotation.space} drops "
            f"{', '.join(sorted(dropped - departed))}, which did not leave",
        )


def check_unclaimed(offered: DeviceList, known: list[DeviceList]) -> None:
    """Rule 1's last part: DeviceListError if ``offered`` names a device key (current or
    removed) that another account's list in ``known`` names: a key belongs to one
    account, the first we learned it from (so the CRDT-client table and every author
    check stay unambiguous)."""
    for dl in known:
        if dl.account_id == offered.account_id:
            continue
        clash = (offered.ids | offered.removed_ids) & (dl.ids | dl.removed_ids)
        if clash:
            raise DeviceListError(
                f"account {offered.account_id} lists device {min(clash)}, "
                f"which account {dl.account_id} lists already"
            )


def leave_rotator(remaining: set[str]) -> str | None:
    """Rule 2 after a leave: the account whose primary rotates (the remaining member
    account with the smallest id), so that one new key exists; None if nobody is left."""
    return min(remaining) if remaining else None


def check_key(space: str, epoch: int, held: bytes | None, offered: bytes) -> bool:
    """Rule 3's last part: whether ``offered`` is news for ``epoch`` (False: we hold the
    same key); EpochSplit for another key of an epoch we hold."""
    if held is None:
        return True
    if held != offered:
        raise EpochSplit(space, f"two different keys claim epoch {epoch} of {space}")
    return False


def split_healer(members: set[str]) -> str:
    """Rule 2 after a split: the account whose primary starts a new epoch for everyone
    (the member account with the smallest id), so that one new key exists."""
    return min(members)
