"""Conversations: spaces shared with other accounts, their grants, and leaving them.

Rules (the authority over keys and member sets is ``p2p.proto.authority``):

- A conversation is a chat space whose members are accounts; every current device of a
  member account reads and writes it. We start one only with accounts we follow, at
  most ``MAX_MEMBERS``, and add only accounts we follow; members are never removed
  within an epoch.
- A device learns a conversation's keys from a *grant*: the space's current keys, name,
  member lists and rotations, sealed to it and signed by a current device of a member
  account (:meth:`Conversations.grant_to`). We hand one to every device that reads it
  when we meet it, so devices linked later and devices that missed a rotation catch up.
- A grant we take (:meth:`Conversations.accept`) is checked whole before it changes
  anything: a new conversation only from a contact; for one we hold, a key of an epoch
  we lack only with the rotation that made it, signed by someone entitled to; a newer
  epoch brings the member set its rotation states; two keys of one epoch are a split,
  healed by one primary's next epoch.
- An account leaves by signing a leave entry (``model.LEAVES``); the primary of the
  remaining account with the smallest id then rotates the key without it, so that one
  new key exists (:meth:`Conversations.rotates_for`).
"""

from __future__ import annotations

from p2p.errors import (
    ContactError,
    DeviceListError,
    GrantFromNonMember,
    GrantRefused,
    RollbackRefused,
    UnknownDevice,
)
from p2p.proto.authority import (
    MAX_MEMBERS,
    EpochSplit,
    GrantFromStranger,
    Rotation,
    RotationRefused,
    check_key,
    check_removal,
    check_rotation,
    leave_rotator,
    split_healer,
)
from p2p.proto.grants import (
    SpaceGrant,
    decode_members,
    open_grant,
    parse_grant,
    seal_grant,
    verify_grant,
)
from p2p.proto.identity import DeviceKeys, DeviceList, short_id
from p2p.proto.model import LEAVES, new_id
from p2p.state.directory import Directory, Follow, Part
from p2p.state.records import merge_batches
from p2p.state.spaces import NOTES, Spaces
from p2p.storage.base import WriteBatch


class Conversations(Part):
    """Starts conversations, grants them, takes grants, and rotates after a leave."""

    def __init__(
        self,
        keys: DeviceKeys,
        spaces: Spaces,
        directory: Directory,
        *,
        primary: bool,
        follow: Follow,
    ) -> None:
        super().__init__(keys, spaces, directory)
        self._primary = primary
        self._follow = follow

    def _with_ours(self, members: dict[str, bytes]) -> dict[str, bytes]:
        """``members`` with our own account first (every space we hold has it)."""
        own = self._directory.device_list
        return {own.account_id: own.account_pk, **members}

    def new_conversation(self, name: str, members: list[str]) -> tuple[str, WriteBatch]:
        """A new conversation space with the accounts ``members`` (each followed, or a
        contact whose code we took and have not met yet)."""
        others: dict[str, bytes] = {}
        for account_id in members:
            account_pk = self._directory.account_key_of(account_id)
            if account_pk is None or account_id == self._directory.account_id:
                raise ContactError(f"account {account_id} is not a contact")
            others[account_id] = account_pk
        if len(others) + 1 > MAX_MEMBERS:
            raise ContactError(f"a conversation holds at most {MAX_MEMBERS} accounts")
        space_id = new_id()
        return space_id, self._spaces.add(space_id, "chat", name, members=self._with_ours(others))

    def add_members(self, space_id: str, accounts: list[str]) -> WriteBatch:
        """Add accounts we follow to a conversation (its key stays: they read it all,
        as a device linked later does); every member device learns it from grants."""
        space = self._spaces.space(space_id)
        if space.kind != "chat" or not space.shared:
            raise ContactError("members are added to a conversation with other accounts")
        for account_id in accounts:
            account_pk = self._directory.account_key_of(account_id)
            if account_pk is None or account_id == self._directory.account_id:
                raise ContactError(f"account {account_id} is not a contact")
            space.members[account_id] = account_pk
        if len(space.members) > MAX_MEMBERS:
            raise ContactError(f"a conversation holds at most {MAX_MEMBERS} accounts")
        return WriteBatch(records={f"space/{space.id}": space.meta_record()})

    # ---- grants ----------------------------------------------------------------------

    def space_grant(self, space_id: str, shown: DeviceList | None = None) -> SpaceGrant:
        """What we grant of a space: its current keys, name and member lists (``shown``:
        a list a peer just showed us, newer than ours or the first of a contact)."""
        space = self._spaces.space(space_id)
        lists = [
            shown if shown is not None and shown.account_id == a else self._directory.list_of(a)
            for a in sorted(space.members)
        ]
        return SpaceGrant(
            space=space.id,
            name=space.name,
            epoch=space.epoch,
            keys=dict(space.keys),
            members=tuple(dl.encode() for dl in lists if dl is not None),
            rotations=dict(space.rotations),
        )

    def grant_to(
        self, device_id: str, space_id: str, device_list: DeviceList | None = None
    ) -> bytes | None:
        """A grant of a space sealed to a current device (None for one we don't know)."""
        try:
            dl = device_list if device_list and device_id in device_list.ids else None
            entry = (dl or self._directory.current_account_of(device_id)).entry(device_id)
        except UnknownDevice:
            return None
        grant = self.space_grant(space_id, dl)
        return seal_grant(self._keys, self._directory.account_id, device_id, entry.box_pk, grant)

    def grants_for(self, device_id: str, device_list: DeviceList | None = None) -> list[bytes]:
        """A grant of every chat space ``device_id`` reads, sealed to it: sent when we
        meet it, so devices linked later and devices that missed a rotation catch up.
        (Not the notes chat of our account alone: every enrollment carries that one.)"""
        spaces = self._spaces
        grants = (
            self.grant_to(device_id, s, device_list)
            for s in self._directory.spaces_for(device_id, device_list)
            if spaces[s].kind == "chat" and (spaces[s].shared or spaces[s].name != NOTES)
        )
        return [g for g in grants if g is not None]

    def accept(self, data: bytes) -> tuple[str, bool, WriteBatch]:
        """Take a grant sealed to us: (space id, whether it is news, batch).

        Refused (GrantRefused) unless a current device of our account or of an account
        we follow signed it, both accounts are among its members and, for a space we
        hold, the granter's account is a member already. Member lists we do not hold yet
        are taken on the granter's word (it vouches for the group it shares with us).
        What a grant may change follows ``authority``: a space we do not hold comes
        whole; for one we hold, a key of an epoch we lack comes only with the rotation
        that made it (without one, it is left for a device that has it), a newer epoch
        brings the member set its rotation states, and within an epoch members are only
        added. RotationRefused (a GrantRefused) for a rotation its signer was not
        entitled to make; EpochSplit for another key of our current epoch (unless a newer
        epoch comes with it); RotationUnproven for one that drops an account whose leave
        entry we lack; GrantFromStranger for a new chat from an account that is not a
        contact. A refused grant changes no key, epoch or member set (member lists it
        carried may have been followed: they verify on their own).
        """
        sealed = parse_grant(data)
        granted = open_grant(sealed, self._keys)
        lists = {dl.account_id: dl for dl in decode_members(granted)}
        if self._directory.account_id not in lists or sealed.account not in lists:
            raise GrantRefused(f"grant of {granted.space}: we or the granter are not members")
        if (
            self._directory.list_of(sealed.account) is None
            and sealed.account not in self._directory.contact_anchors
        ):
            raise GrantRefused(f"grant from account {sealed.account}, which we do not follow")
        if (
            granted.space not in self._spaces
            and sealed.account != self._directory.account_id
            and sealed.account not in self._directory.contact_keys
        ):
            # a group's other members are followed so that their entries verify, but
            # only a contact (whose code we took) may bring us into a new conversation
            raise GrantFromStranger(
                f"grant of a new chat from account {sealed.account}, which is not a contact"
            )
        batches: list[WriteBatch] = []
        for account_id, dl in sorted(lists.items(), key=lambda kv: kv[0] != sealed.account):
            try:  # the granter's own list first: it may be what makes the granter current
                batch = self._follow(dl.encode(), trusted=account_id != sealed.account)
            except RollbackRefused:
                continue  # we hold a newer one
            except (DeviceListError, ContactError) as exc:
                raise GrantRefused(f"grant of {granted.space}: {exc}") from exc
            if batch is not None:
                batches.append(batch)
        try:
            granter = self._directory.current_account_of(sealed.sender)
        except UnknownDevice as exc:
            raise GrantRefused(f"grant from {sealed.sender}: {exc}") from exc
        if granter.account_id != sealed.account:
            raise GrantRefused(f"grant from {sealed.sender} names another account")
        verify_grant(sealed, granter.entry(sealed.sender).sign_pk)
        members = {a: dl.account_pk for a, dl in lists.items()}
        known = {
            self._directory.account_id: self._directory.device_list,
            **self._directory.accounts,
        }
        rotations: dict[int, Rotation] = {}

        def verified(epoch: int) -> None:
            # checked only where it decides something: a key we do not hold yet
            rotation = Rotation.decode(granted.rotations[epoch])
            if rotation.epoch != epoch or epoch not in granted.keys:
                raise RotationRefused(f"grant of {granted.space} misfiles a rotation")
            check_rotation(rotation, space=granted.space, key=granted.keys[epoch], list_of=known)
            rotations[epoch] = rotation

        space = self._spaces.get(granted.space)
        if space is None:
            for epoch in granted.rotations:
                verified(epoch)
            batches.append(
                self._spaces.add(
                    granted.space,
                    "chat",
                    granted.name,
                    epoch=granted.epoch,
                    keys=granted.keys,
                    members=self._with_ours(members),
                    rotations={e: granted.rotations[e] for e in rotations},
                )
            )
            return granted.space, True, merge_batches(batches)
        if space.kind != "chat" or sealed.account not in space.members:
            raise GrantFromNonMember(f"grant of {space.id} from a non-member account")
        # every check before any change: a refused grant changes nothing
        taken: dict[int, bytes] = {}
        split: EpochSplit | None = None
        for epoch, key in sorted(granted.keys.items()):
            try:
                if not check_key(space.id, epoch, space.keys.get(epoch), key):
                    continue  # the key we hold
            except EpochSplit as exc:
                if epoch >= space.epoch:  # one we are past (a healed split) is history
                    split = exc
                continue
            if epoch in granted.rotations:
                verified(epoch)
                taken[epoch] = key
        newest = max((e for e in taken if e > space.epoch), default=None)
        if split is not None and newest is None:
            raise split  # a newer rotation would take everyone past the split epoch
        if newest is not None:
            rotation = rotations[newest]
            check_removal(
                rotation,
                members=set(space.members),
                departed=self.departed(space.id),
                trusted_signer=rotation.signer_pk == self._directory.device_list.primary.sign_pk,
            )
        news = False
        for epoch, key in taken.items():
            space.keys[epoch] = key
            space.rotations[epoch] = granted.rotations[epoch]
            batches.append(
                WriteBatch(
                    records={
                        f"spacekey/{space.id}/{epoch}": key,
                        f"spacerot/{space.id}/{epoch}": granted.rotations[epoch],
                    }
                )
            )
            news = True
        # a newer epoch brings the member set its rotation states; within an epoch the
        # set only grows (members added, concurrently too: the union of what every
        # grant says), which also teaches a newly linked device the members its
        # enrollment left out
        if newest is not None:
            stated = {short_id(pk): pk for pk in rotations[newest].members}
            if granted.epoch == newest:  # and those added since, by anyone (rule 4)
                stated.update(members)
            space.epoch, space.members = newest, stated
            batches.append(WriteBatch(records={f"space/{space.id}": space.meta_record()}))
        elif granted.epoch == space.epoch and not set(members) <= set(space.members):
            news = True
            space.members = {**space.members, **members}
            batches.append(WriteBatch(records={f"space/{space.id}": space.meta_record()}))
        return space.id, news, merge_batches(batches)

    # ---- leaving -----------------------------------------------------------------------

    def departed(self, space_id: str) -> set[str]:
        """Member accounts that signed a leave entry in the space and are still on its
        member set (the key has not been rotated without them yet)."""
        space = self._spaces.space(space_id)
        if not space.shared or space.replica.side_values(LEAVES) == {}:
            return set()  # nobody ever left: nothing to judge (nor to load)
        d = self._directory
        left = {
            e.account
            for e in space.replica.valid_entries(LEAVES, d.any_signing_key, d.belongs)
            if e.kind == "leave"
        }
        return left & set(space.members) - {d.account_id} if space.shared else set()

    def rotates_for(self, space_id: str, departed: set[str]) -> bool:
        """Whether this device rotates the key after ``departed`` left: the primary of
        the remaining member account with the smallest id, so that one new key exists
        (the others wait for its grant; until then the old key stays in use)."""
        remaining = set(self._spaces.space(space_id).members) - departed
        return self._primary and leave_rotator(remaining) == self._directory.account_id

    def heals_split(self, space_id: str) -> bool:
        """Whether this device starts a new epoch after a split of ``space_id``: the
        primary of the member account ``authority.split_healer`` names."""
        members = set(self._spaces.space(space_id).members)
        return self._primary and split_healer(members) == self._directory.account_id

    def rotate_without(self, space_id: str, departed: set[str]) -> WriteBatch:
        """A new epoch key for a conversation, its member set without ``departed``."""
        space = self._spaces.space(space_id)
        space.members = {a: pk for a, pk in space.members.items() if a not in departed}
        return WriteBatch(records=space.rotate(self._keys))
