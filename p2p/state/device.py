"""A device's state and every operation on it, without I/O: the engine's pure heart.

:class:`DeviceState` holds the keys, the signed device list, one :class:`Replica` per
space with its epoch keys, the envelope counter and the replay windows. Each operation
returns the :class:`WriteBatch` that makes it durable; the node (``p2p.runtime.node``) writes
batches to its store and talks to the network. Tests drive this class directly to check
the protocol without sockets, threads or clocks.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Final, Literal

from nacl.exceptions import CryptoError as NaclCryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox

from p2p.errors import (
    ChatCorrupt,
    ContactError,
    DeviceListError,
    GrantFromNonMember,
    GrantRefused,
    NotInitialized,
    P2PError,
    RemovedDevice,
    RollbackRefused,
    StoreCorrupt,
    UnknownChat,
    UnknownDevice,
    UnknownKey,
    WireError,
)
from p2p.proto import envelope
from p2p.proto.authority import (
    MAX_MEMBERS,
    EpochSplit,
    GrantFromStranger,
    Rotation,
    RotationRefused,
    check_key,
    check_removal,
    check_rotation,
    check_unclaimed,
    leave_rotator,
    split_healer,
)
from p2p.proto.clock import HybridClock
from p2p.proto.grants import (
    SpaceGrant,
    decode_members,
    open_grant,
    parse_grant,
    seal_grant,
    verify_grant,
)
from p2p.proto.identity import (
    LEASE_MS,
    AccountKey,
    DeviceEntry,
    DeviceKeys,
    DeviceList,
    accept_device_list,
    check_lease,
    issue_lease,
    parse_device_list,
    short_id,
)
from p2p.proto.model import (
    CONTACTS,
    DELETIONS,
    EDITS,
    INDEXED,
    LEAVES,
    MAX_BODY,
    MAX_UPDATE,
    MESSAGES,
    REACTIONS,
    READ_MARKERS,
    RECEIPTS,
    UNREAD,
    AuthorSource,
    Changes,
    Entry,
    Judged,
    Kind,
    Message,
    Rejected,
    Replica,
    UpdateSource,
    fold,
    judge,
    may_open,
    new_id,
)
from p2p.proto.wire import load_json, pack, unpack
from p2p.proto.ysplit import split_update
from p2p.state.records import COUNTER_BLOCK, required, stored_history
from p2p.state.records import Run as Run
from p2p.state.records import claim_counters as claim_counters
from p2p.state.records import claim_run as claim_run
from p2p.state.records import merge_batches as merge_batches
from p2p.storage.base import INDEXED_MAPS, IndexKey, IndexRow, Store, WriteBatch

assert INDEXED == INDEXED_MAPS, "the index mirrors exactly the maps whose changes apply reports"

NOTES: Final = "notes"
"""Name of the conversation every account starts with (a note-to-self chat)."""

SpaceKind = Literal["account", "chat"]
BOOT_BITS: Final = 17
"""Low bits of a CRDT client id: the device's run counter (``crdt_client``)."""


def device_prefix(device_id: str) -> int:
    """The high 36 bits of every CRDT client id a device writes with."""
    digest = hashlib.blake2b(device_id.encode(), digest_size=8, person=b"p2p-crdt-client")
    return int.from_bytes(digest.digest(), "big") >> 28


def crdt_client(device_id: str, boot: int) -> int:
    """The CRDT client id of one run of a device: its prefix, then the run counter.

    Bound to the device so that a receiver can tell whose structs an update holds
    (another account may only send its own); new at every run, because a run that died
    may have shown peers structs it never made durable, whose clocks must not be reused.
    Both fit the 53 bits Yjs allows."""
    return (device_prefix(device_id) << BOOT_BITS) | (boot % (1 << BOOT_BITS))


@dataclass
class Space:
    """A replicated document and the keys that open it."""

    id: str
    kind: SpaceKind
    name: str
    epoch: int
    keys: dict[int, bytes] = field(repr=False)
    replica: Replica
    log_seq: int = 0
    """Sequence number of the last update of this space in the store."""
    snapshot_seq: int = 0
    """Sequence number the store's snapshot of this space covers."""
    members: dict[str, bytes] = field(default_factory=dict)
    """Member accounts: account id -> account public key (ours always among them). Every
    current device of a member account reads and writes the space."""
    rotations: dict[int, bytes] = field(default_factory=dict, repr=False)
    """The signed ``authority.Rotation`` that made each epoch after 0 (encoded), shown
    with the key in every grant."""

    def rotate(self, signer: DeviceKeys) -> dict[str, bytes]:
        """Start the next epoch: a fresh key and the rotation ``signer`` states for it
        (with the current member set); the records that keep them."""
        self.epoch += 1
        key = self.keys[self.epoch] = envelope.new_space_key()
        rotation = Rotation.make(signer, self.id, self.epoch, key, list(self.members.values()))
        self.rotations[self.epoch] = rotation.encode()
        return {
            f"space/{self.id}": self.meta_record(),
            f"spacekey/{self.id}/{self.epoch}": key,
            f"spacerot/{self.id}/{self.epoch}": self.rotations[self.epoch],
        }

    def meta_record(self) -> bytes:
        return pack([self.kind, self.name, self.epoch, sorted(self.members.values())])

    @property
    def shared(self) -> bool:
        """Whether other accounts are members (a conversation between accounts)."""
        return len(self.members) > 1


@dataclass(frozen=True, kw_only=True)
class Delivery:
    """Where one message has got to: the devices holding it and those that showed it."""

    delivered_to: tuple[str, ...]
    """Current member devices (other than its author) whose receipt covers it."""
    waiting_for: tuple[str, ...]
    """Current member devices whose receipt does not cover it yet."""
    read_by: tuple[str, ...]
    """Devices whose read marker covers it."""
    status: str
    """``read`` (by a device of every other member account), ``delivered`` (to every
    current device of every member), or ``sent``."""


@dataclass(frozen=True, kw_only=True)
class Ingested:
    """An envelope accepted into a replica."""

    space: str
    sender: str
    counter: int
    update: bytes
    batch: WriteBatch
    rejected: list[Rejected] = field(default_factory=list)
    """Entries the update brought that readers will not see, and why."""
    relayable: bool = True
    """Whether the update touches only its sender's account's CRDT clients, so that
    devices of other accounts accept it too (our own devices take anything from us)."""


@dataclass(frozen=True, kw_only=True)
class Enrollment:
    """What a new device needs to join its account: list, spaces, keys, history.

    Issue-4 linking delivers this sealed to the new device; tests and ``p2p.testing``
    hand it over in memory.
    """

    account_pk: bytes
    device_list: bytes
    spaces: list[tuple[str, str, str, int, dict[int, bytes], bytes]] = field(repr=False)
    """(space id, kind, name, epoch, epoch -> key, full-state update)."""
    lease: bytes = b""
    """The new companion's first lease (see ``identity.issue_lease``)."""
    rotations: dict[str, dict[int, bytes]] = field(default_factory=dict, repr=False)
    """Space id -> epoch -> the encoded rotation that made it: a companion shows them in
    its grants, so that other accounts' devices take a key it forwards."""


class DeviceState:
    """Everything one device knows; see the module docstring."""

    def __init__(
        self,
        *,
        keys: DeviceKeys,
        name: str,
        device_list: DeviceList,
        account_key: AccountKey | None = None,
    ) -> None:
        self.keys = keys
        self.name = name
        self.device_list = device_list
        self.account_key = account_key
        self.spaces: dict[str, Space] = {}
        self.set_aside: dict[str, ChatCorrupt] = {}
        """Spaces whose stored history or record did not load, by id: out of
        :attr:`spaces` (nothing syncs, shows or writes them), their rows left on disk."""
        self.counter = 0
        self.counter_reserved = 0
        self.replay: dict[str, envelope.ReplayWindow] = {}
        self.clock = HybridClock()
        self.unsaved = WriteBatch()
        self.lease = b""
        """A companion's latest lease from its primary, shown to peers at handshakes."""
        self.accounts: dict[str, DeviceList] = {}
        """Other accounts we follow (contacts, members of our conversations): the newest
        signed device list of each, verified by its account key."""
        self.boot = 0
        """This run's number (persisted as ``boot``; part of our CRDT client id)."""
        self.counters_wanted = False
        """Half of the counter block is used: the node's writer claims the next one."""
        self._client_owners: dict[int, str] | None = None
        self.contact_keys: dict[str, bytes] = {}
        """The contact key of each contact (from its contact code): our devices meet
        theirs with it before any conversation is shared."""
        self.history: Callable[[str], Iterable[bytes]] | None = None
        """A space's whole history as it stands: durable, then on its way to the store
        (set by :meth:`load` to the store's; the node adds its write queue). A replica
        that an update made pycrdt panic is rebuilt from it."""

    # ---- identity ------------------------------------------------------------------

    @property
    def device_id(self) -> str:
        return self.keys.device_id

    @property
    def account_id(self) -> str:
        return self.device_list.account_id

    @property
    def is_primary(self) -> bool:
        return self.account_key is not None

    def contact_key(self) -> bytes:
        """Our account's contact key, given away in contact codes: a contact's device
        proves with it that it holds our code (it learns nothing the code did not tell).
        Derived from the account space's first key, so every device of ours has it."""
        account = next((s for s in self.spaces.values() if s.kind == "account"), None)
        if account is None:
            return bytes(32)
        first = account.keys[min(account.keys)]
        return hashlib.blake2b(first, digest_size=32, person=b"p2p-contact-key").digest()

    def list_of(self, account_id: str) -> DeviceList | None:
        """The newest device list we hold of an account (ours or one we follow)."""
        if account_id == self.account_id:
            return self.device_list
        return self.accounts.get(account_id)

    def current_account_of(self, device_id: str) -> DeviceList:
        """The list on which ``device_id`` is a current device (ours first);
        RemovedDevice or UnknownDevice if none."""
        removed = False
        for dl in (self.device_list, *self.accounts.values()):
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
        for dl in (self.device_list, *self.accounts.values()):
            key = dl.signing_key_of(device_id)
            if key is not None:
                return key
        return None

    def belongs(self, device_id: str, account_id: str) -> bool:
        """Whether ``account_id``'s signed list holds or held ``device_id`` (an entry's
        author is checked as this pair: another account may list the same key)."""
        dl = self.list_of(account_id)
        return dl is not None and dl.signing_key_of(device_id) is not None

    def discovery_key(self) -> bytes:
        """A secret every current device of the account can derive (from the account
        space's current key), so LAN announcements and hellos mean something only to
        them."""
        return self.discovery_keys()[0]

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
        account = next((s for s in self.spaces.values() if s.kind == "account"), None)
        if account is None:  # not enrolled: nothing to prove membership with
            return [bytes(32)]
        keys = [account.keys[e] for e in sorted(account.keys, reverse=True)][:8]
        keys.append(self.contact_key())
        keys += [self.contact_keys[a] for a in sorted(self.contact_keys)]
        known = set(self.contact_keys) | {self.account_id}
        for space in sorted(self.spaces.values(), key=lambda s: s.id):
            if space.shared and not set(space.members) <= known:
                keys += [space.keys[e] for e in sorted(space.keys, reverse=True)[:2]]
        return [
            hashlib.blake2b(key, digest_size=32, person=b"p2p-discovery").digest() for key in keys
        ]

    def spaces_for(self, device_id: str, device_list: DeviceList | None = None) -> list[str]:
        """Spaces a device may read: all of them for our own current devices, the
        conversations its account is a member of for another account's current device
        (judged by ``device_list`` when given: a newer list a peer just showed us)."""
        ours = device_list is None or device_list.account_id == self.account_id
        if ours and device_id in (device_list or self.device_list).ids:
            return sorted(self.spaces)
        theirs: DeviceList | None = None if ours else device_list
        if theirs is None:
            theirs = next((dl for dl in self.accounts.values() if device_id in dl.ids), None)
        if theirs is None or device_id not in theirs.ids:
            return []
        return sorted(s.id for s in self.spaces.values() if theirs.account_id in s.members)

    def member_devices(self, space_id: str) -> set[str]:
        """Every current device of every member account of a space (ours included)."""
        devices = set(self.device_list.ids)
        for account_id in self.space(space_id).members:
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
        ours = sorted(self.device_list.ids - {self.device_id})
        members = {a for s in self.spaces.values() for a in s.members} - {self.account_id}
        theirs = sorted(
            d for a in members if (dl := self.accounts.get(a)) is not None for d in dl.ids
        )
        return ours + theirs

    # ---- creation and loading ------------------------------------------------------

    @classmethod
    def create_account(cls, name: str) -> tuple[DeviceState, WriteBatch]:
        """A new account whose primary is this device, with its account and notes spaces."""
        keys, account = DeviceKeys.generate(), AccountKey.generate()
        state = cls(
            keys=keys,
            name=name,
            device_list=DeviceList.create(account, keys, name),
            account_key=account,
        )
        batches = [state._identity_batch()]
        batches.append(state.add_space(new_id(), "account", "account"))
        batches.append(state.add_space(new_id(), "chat", NOTES))
        return state, merge_batches(batches)

    @classmethod
    def from_enrollment(
        cls, keys: DeviceKeys, name: str, bundle: Enrollment
    ) -> tuple[DeviceState, WriteBatch]:
        """A companion's state from the bundle its primary sent."""
        device_list = parse_device_list(bundle.device_list, bundle.account_pk)
        if keys.device_id not in device_list.ids:
            raise DeviceListError("the enrollment's device list does not hold this device")
        state = cls(keys=keys, name=name, device_list=device_list)
        state.lease = bundle.lease
        batches = [state._identity_batch(), WriteBatch(records={"device/lease": bundle.lease})]
        for space_id, kind, space_name, epoch, space_keys, _update in bundle.spaces:
            if kind not in ("account", "chat"):
                raise DeviceListError(f"enrollment names an unknown space kind {kind!r}")
            batches.append(
                state.add_space(
                    space_id,
                    kind,  # type: ignore[arg-type]
                    space_name,
                    epoch=epoch,
                    keys=space_keys,
                    rotations=bundle.rotations.get(space_id),
                )
            )
        # A history of any size, as bounded pieces: each is an update a peer could have
        # sent (within MAX_UPDATE), applied, indexed and stored as one. The account
        # space goes first: our contacts came with it, and we follow them before judging
        # entries, so that theirs in our conversations verify. A conversation's pieces
        # are indexed as they are applied, so that what each changed is not all held.
        histories = sorted(bundle.spaces, key=lambda s: s[1] != "account")
        applied = []
        for space_id, kind, *_, update in histories:
            if kind == "account":
                replica = state.spaces[space_id].replica
                applied += [
                    (space_id, p, replica.apply(p)) for p in split_update(update, MAX_UPDATE)
                ]
        batches.append(state.learn_contacts())
        for space_id, piece, result in applied:
            index, _rejected = state._index(space_id, result.changed)
            batches.append(WriteBatch(appends=[(space_id, piece)], index=index))
        del applied
        for space_id, kind, *_, update in histories:
            if kind != "account":
                replica = state.spaces[space_id].replica
                for piece in split_update(update, MAX_UPDATE):
                    index, _rejected = state._index(space_id, replica.apply(piece).changed)
                    batches.append(WriteBatch(appends=[(space_id, piece)], index=index))
        return state, merge_batches(batches)

    def enroll(self, new_device: DeviceKeys, name: str) -> tuple[Enrollment, WriteBatch]:
        """Primary only: add a companion to the list and build its enrollment bundle.

        The companion's private keys never leave it in the real flow; here the caller
        passes them because tests create both ends in one process.
        """
        return self.enroll_public(
            DeviceEntry.of(new_device, self.device_list.account_pk, name, "companion")
        )

    def issue_lease(self, device_id: str, now_ms: int | None) -> bytes:
        """Primary only: a lease for a companion, running LEASE_MS from ``now_ms``
        (None: one that does not run out, for devices provisioned in memory by tests)."""
        if self.account_key is None:
            raise DeviceListError("only the primary issues leases")
        expires = 2**62 if now_ms is None else now_ms + LEASE_MS
        return issue_lease(self.account_key, device_id, expires)

    def accept_lease(self, data: bytes, now_ms: int) -> WriteBatch:
        """Companion: keep a renewed lease from the primary (LeaseExpired if invalid)."""
        check_lease(data, self.device_list.account_pk, self.device_id, now_ms)
        self.lease = data
        return WriteBatch(records={"device/lease": data})

    def enroll_public(
        self, entry: DeviceEntry, *, now_ms: int | None = None
    ) -> tuple[Enrollment, WriteBatch]:
        """Primary only: :meth:`enroll` knowing only the new device's public keys (again
        for a device already on the list: a link resumed after a drop)."""
        if self.account_key is None:
            raise DeviceListError("only the primary can link a device")
        if entry.device_id not in self.device_list.ids:
            self.device_list = self.device_list.with_device(self.account_key, entry, self._grant)
        bundle = Enrollment(
            lease=self.issue_lease(entry.device_id, now_ms),
            account_pk=self.device_list.account_pk,
            device_list=self.device_list.encode(),
            spaces=[
                (s.id, s.kind, s.name, s.epoch, dict(s.keys), s.replica.snapshot())
                for s in self.spaces.values()
            ],
            rotations={s.id: dict(s.rotations) for s in self.spaces.values() if s.rotations},
        )
        return bundle, WriteBatch(records={"account/list": self.device_list.encode()})

    def _grant(self, device: DeviceEntry) -> bytes:
        """The current key of every space, sealed to ``device`` (see DeviceList.grants)."""
        keys = [
            [s.id, s.epoch, s.keys[s.epoch], s.rotations.get(s.epoch, b"")]
            for s in self.spaces.values()
        ]
        return bytes(SealedBox(PublicKey(device.box_pk)).encrypt(pack(keys)))

    def _open_grant(self, device_list: DeviceList) -> WriteBatch:
        """Take the keys a newer list grants us: new epochs after a rotation."""
        sealed = device_list.grant_for(self.device_id)
        batch = WriteBatch()
        if sealed is None:
            return batch
        try:
            granted = unpack(
                SealedBox(PrivateKey(self.keys.box_secret)).decrypt(sealed), what="key grant"
            )
            items = [(str(s), int(e), bytes(k), bytes(r)) for s, e, k, r in granted]
        except (NaclCryptoError, WireError, ValueError, TypeError) as exc:
            raise DeviceListError(
                f"our key grant in device list {device_list.version} is unusable"
            ) from exc
        for space_id, epoch, key, rotation in items:
            space = self.spaces.get(space_id)
            if space is None or len(key) != envelope.KEY_SIZE or not 0 <= epoch < 2**32:
                continue  # a space we do not hold yet, or junk: nothing to take
            # the account key signed this: our primary's word for its epochs (authority
            # rule 2); the rotation is kept to show with grants to other accounts
            if epoch not in space.keys:
                space.keys[epoch] = key
                batch.records[f"spacekey/{space_id}/{epoch}"] = key
            if rotation and epoch not in space.rotations and space.keys[epoch] == key:
                space.rotations[epoch] = rotation
                batch.records[f"spacerot/{space_id}/{epoch}"] = rotation
            if epoch > space.epoch:
                space.epoch = epoch
                batch.records[f"space/{space_id}"] = space.meta_record()
        return batch

    def unlink(self, device_id: str) -> WriteBatch:
        """Primary only: remove a device and rotate the key of every space it could read.

        The new keys travel only inside the new device list, sealed to each remaining
        companion; the removed device keeps what it had and can open nothing sent later.
        """
        if self.account_key is None:
            raise DeviceListError("only the primary can unlink a device")
        self.device_list.entry(device_id)  # UnknownDevice / RemovedDevice first
        batch = WriteBatch()
        for space in self.spaces.values():
            batch.records.update(space.rotate(self.keys))
        self.device_list = self.device_list.without_device(self.account_key, device_id, self._grant)
        batch.records["account/list"] = self.device_list.encode()
        return batch

    def _identity_batch(self) -> WriteBatch:
        records = {
            "device/keys": self.keys.to_record(),
            "device/name": self.name.encode(),
            "account/pk": self.device_list.account_pk,
            "account/list": self.device_list.encode(),
        }
        if self.account_key is not None:
            records["account/key"] = self.account_key.seed
        return WriteBatch(records=records)

    def add_space(
        self,
        space_id: str,
        kind: SpaceKind,
        name: str,
        *,
        epoch: int = 0,
        keys: dict[int, bytes] | None = None,
        members: dict[str, bytes] | None = None,
        rotations: dict[int, bytes] | None = None,
    ) -> WriteBatch:
        keys = keys if keys is not None else {epoch: envelope.new_space_key()}
        owners = {self.account_id: self.device_list.account_pk, **(members or {})}
        self.spaces[space_id] = Space(
            space_id,
            kind,
            name,
            epoch,
            dict(keys),
            self._replica(space_id),
            members=owners,
            rotations=dict(rotations or {}),
        )
        records = {
            f"space/{space_id}": self.spaces[space_id].meta_record(),
            f"indexed/{space_id}": b"",  # an empty chat's index is complete
        }
        for e, k in keys.items():
            records[f"spacekey/{space_id}/{e}"] = k
        for e, r in (rotations or {}).items():
            records[f"spacerot/{space_id}/{e}"] = r
        return WriteBatch(records=records)

    @classmethod
    def load(cls, store: Store, run: Run | None = None) -> DeviceState:
        """Rebuild the state from a store: records now, each space's CRDT on first use.

        ``run``: what this run writes with (:func:`claim_run`, taken from the store
        before loading); without one the state is for reading (its run number is the
        stored one plus one, which another process may use too: never write with it).

        A space's document (snapshot, then tail) is loaded from ``store`` only when
        something needs it (sync, a write; see ``Replica.load``): readers are served by
        the message index. A space without an ``indexed/<space>`` record (a store written
        before the index existed) is loaded now and its index built, once: the rows wait
        in :attr:`unsaved` for the node's first write.
        """
        raw_keys = store.get("device/keys")
        if raw_keys is None:
            raise NotInitialized("this home holds no device")
        if store.get("account/list") is None:
            raise NotInitialized("this device is not linked to an account yet (p2p link)")
        try:
            keys = DeviceKeys.from_record(raw_keys)
            account_pk = required(store, "account/pk")
            device_list = parse_device_list(required(store, "account/list"), account_pk)
            seed = store.get("account/key")
            state = cls(
                keys=keys,
                name=required(store, "device/name").decode(),
                device_list=device_list,
                account_key=AccountKey(seed) if seed else None,
            )
            state.history = partial(stored_history, store)
            # accounts we follow first: indexing a chat checks entries by their lists
            for name in store.names("peer/"):
                followed = DeviceList.decode(required(store, name))
                followed.verify(followed.account_pk)
                state.accounts[followed.account_id] = followed
            for name in store.names("peerkey/"):
                state.contact_keys[name.removeprefix("peerkey/")] = required(store, name)
            if run is None:
                boot = store.get("boot")
                state.boot = unpack(boot, what="boot") + 1 if boot else 1
            else:
                state.boot = run.boot
            for name in store.names("space/"):
                space_id = name.removeprefix("space/")
                try:
                    state._load_space(store, space_id, required(store, name))
                except (P2PError, ValueError, TypeError, KeyError) as exc:
                    # one unreadable chat must not take the others, or the node, down
                    state.put_aside(space_id, exc if isinstance(exc, P2PError) else ValueError(exc))
            for name in store.names("replay/"):
                state.replay[name.removeprefix("replay/")] = envelope.ReplayWindow.from_record(
                    required(store, name)
                )
            if run is None:
                reserved = store.get("counter")
                state.counter = state.counter_reserved = (
                    unpack(reserved, what="counter") if reserved else 0
                )
            else:
                state.counter, state.counter_reserved = run.counter, run.reserved
            state.lease = store.get("device/lease") or b""
            last = store.get("clock")
            if last:
                state.clock = HybridClock(last.decode())
        except (WireError, DeviceListError, ValueError, TypeError, KeyError) as exc:
            raise StoreCorrupt(f"device records are unreadable: {exc}") from exc
        return state

    # ---- writing locally -----------------------------------------------------------

    def _load_space(self, store: Store, space_id: str, record: bytes) -> None:
        """One space from its records (its document stays lazy unless never indexed)."""
        kind, space_name, epoch, member_pks = unpack(record, what="space record")
        space_keys = {
            int(k.rsplit("/", 1)[1]): required(store, k)
            for k in store.names(f"spacekey/{space_id}/")
        }
        indexed = store.get(f"indexed/{space_id}") is not None
        replica = self._replica(
            space_id,
            source=partial(stored_history, store, space_id),
            authors=partial(store.index_authors, space_id) if indexed else None,
        )
        space = Space(
            space_id,
            kind,
            space_name,
            epoch,
            space_keys,
            replica,
            members={short_id(pk): pk for pk in member_pks},
            rotations={
                int(k.rsplit("/", 1)[1]): required(store, k)
                for k in store.names(f"spacerot/{space_id}/")
            },
        )
        self.spaces[space_id] = space
        space.snapshot_seq, space.log_seq = store.log_seqs(space_id)
        if not indexed:
            self.unsaved = merge_batches([self.unsaved, self.build_index(space_id)])

    def space(self, space_id: str) -> Space:
        try:
            return self.spaces[space_id]
        except KeyError:
            if space_id in self.set_aside:
                raise self.set_aside[space_id] from None
            raise UnknownChat(space_id) from None

    def chat_by_name(self, name: str) -> Space:
        """A chat by id, or by its name when no id matches."""
        if name in self.spaces:
            return self.spaces[name]
        for s in self.spaces.values():
            if s.kind == "chat" and s.name == name:
                return s
        for corrupt in self.set_aside.values():
            if name in (corrupt.chat, corrupt.name):
                raise corrupt
        raise UnknownChat(name, [s.name for s in self.spaces.values() if s.kind == "chat"])

    def put_aside(self, space_id: str, error: P2PError | ValueError) -> ChatCorrupt:
        """Set a space aside whose stored history or record does not load: the node and
        every other space go on without it; its rows stay on disk as they are."""
        space = self.spaces.pop(space_id, None)
        corrupt = ChatCorrupt(
            space_id, f"{type(error).__name__}: {error}", space.name if space else ""
        )
        self.set_aside[space_id] = corrupt
        return corrupt

    def new_entry(
        self, space_id: str, kind: Kind, wall_ms: int, *, body: str = "", target: str = ""
    ) -> Entry:
        """A signed entry authored by this device, timestamped now."""
        entry = Entry(
            id=new_id(),
            kind=kind,
            account=self.account_id,
            device=self.device_id,
            ts=self.clock.now(wall_ms),
            target=target,
            body=body,
        )
        return entry.signed(space_id, self.keys)

    def write_local(self, space_id: str, entries: list[Entry]) -> tuple[bytes, WriteBatch]:
        """Put our own signed entries in the replica, in one CRDT transaction; return the
        update and the batch persisting it, with the message-index rows of the entries
        (each is now the value under its key; judged like any other, but its signature
        is ours: the replica trusts it without verifying)."""
        replica = self.space(space_id).replica
        update = replica.write(entries)
        index: dict[IndexKey, IndexRow | None] = {}
        for e in entries:
            name, key = e.map_name(), e.key()
            if name in INDEXED_MAPS:
                judged = replica.judge_entry(key, e, self.any_signing_key, self.belongs)
                index[(space_id, name, key)] = index_row(space_id, name, key, e, judged)
        batch = WriteBatch(
            records={"clock": self.clock.last.encode()},
            appends=[(space_id, update)],
            index=index,
        )
        return update, batch

    def load_checked(self, space_id: str, store: Store) -> list[Entry]:
        """Load a space's CRDT from ``store`` and check that it holds every entry of
        ours that the message index shows; [] when it does, else every entry of ours
        in the space, to be written again (run in a worker thread: the check reads the
        document before anyone else may use it).

        Our index rows commit with the update that holds them, so a row whose key the
        loaded CRDT lacks means an update of ours was dropped as a duplicate: older
        versions let two processes write one home with one CRDT client id, and the
        second struct under a client and clock was taken for the first one, here and
        at every peer. The peers then hold the other struct of each such pair, which
        we cannot tell from ours; so every entry of ours is written again, under this
        run's client id: the same values under the same keys (signed again: a shown
        row keeps no signature, and ours are deterministic), so no view changes, and
        every replica ends up holding all of them.
        """
        replica = self.space(space_id).replica
        lost: list[Entry] = []

        def check() -> None:
            if not replica.lacks(store.index_keys_by_device(space_id, self.device_id)):
                return
            for row in store.index_by_device(space_id, self.device_id):
                if row.reason:
                    continue
                entry = row_entry(row)
                if entry is not None and entry.account == self.account_id:
                    lost.append(entry.signed(space_id, self.keys))

        replica.load(check)
        return lost

    # ---- the message index ---------------------------------------------------------

    def _index(
        self, space_id: str, changed: Changes, *, vouched_by: str = ""
    ) -> tuple[dict[IndexKey, IndexRow | None], list[Rejected]]:
        """Index rows for the keys an update changed, judged now (verified once, here;
        ``vouched_by``: the device that signed the envelope, see ``model.judge``)."""
        replica = self.space(space_id).replica
        rows: dict[IndexKey, IndexRow | None] = {}
        rejected: list[Rejected] = []
        for (map_name, key), value in changed.items():
            found = replica.judge_key(
                map_name, key, self.any_signing_key, self.belongs, value, vouched_by=vouched_by
            )
            if found is None:  # the key was removed
                rows[(space_id, map_name, key)] = None
                continue
            entry, judged = found
            rows[(space_id, map_name, key)] = index_row(space_id, map_name, key, entry, judged)
            if isinstance(judged, Rejected):
                rejected.append(judged)
        return rows, rejected

    def build_index(self, space_id: str) -> WriteBatch:
        """The whole index of a space from its CRDT (loading it), and its marker record.

        For a store written before the index existed, and for tests that compare the
        index with the CRDT view."""
        replica = self.space(space_id).replica
        index: dict[IndexKey, IndexRow | None] = {}
        for map_name in INDEXED_MAPS:
            for key, entry, judged in replica.judge_all(
                map_name, self.any_signing_key, self.belongs
            ):
                index[(space_id, map_name, key)] = index_row(space_id, map_name, key, entry, judged)
        return WriteBatch(records={f"indexed/{space_id}": b""}, index=index)

    def recheck(self, space_id: str, hidden: list[IndexRow]) -> WriteBatch:
        """Judge hidden rows again (after the device list grew): the ones that pass now
        become shown rows. Malformed rows stay as they are. With the CRDT loaded, its
        current values are judged instead (an update may have replaced a row since it
        was read)."""
        if self.space(space_id).replica.loaded:
            index, _ = self._index(space_id, {(row.map, row.key): UNREAD for row in hidden})
            return WriteBatch(index=index)
        index = {}
        for row in hidden:
            entry = row_entry(row)
            if entry is None:
                continue
            judged = judge(space_id, row.key, entry, self.any_signing_key, self.belongs)
            if not isinstance(judged, Rejected):
                index[(space_id, row.map, row.key)] = index_row(
                    space_id, row.map, row.key, entry, judged
                )
        return WriteBatch(index=index)

    # ---- sealing and opening -------------------------------------------------------

    def seal(self, space_id: str, payload: bytes) -> bytes:
        """Seal ``payload`` for a space with the next counter.

        Counters come from a block claimed in the store (``claim_run``); half-way
        through a block :attr:`counters_wanted` asks the node's writer to claim the
        next one (``claim_counters``), long before this one runs out.
        """
        space = self.space(space_id)
        self.counter += 1
        if self.counter > self.counter_reserved - COUNTER_BLOCK // 2:
            self.counters_wanted = True
        return envelope.seal(
            self.keys,
            space=space_id,
            epoch=space.epoch,
            key=space.keys[space.epoch],
            counter=self.counter,
            payload=payload,
        )

    def grant_counters(self, reserved: int) -> None:
        """Take the block of envelope counters ending at ``reserved`` (from
        :func:`claim_counters`). The block follows ours unless another writer took the
        ones between (never while the home lock is held): then those are skipped."""
        start = reserved - COUNTER_BLOCK
        if start > self.counter_reserved:
            self.counter = max(self.counter, start)
        self.counter_reserved = max(self.counter_reserved, reserved)
        self.counters_wanted = self.counter > self.counter_reserved - COUNTER_BLOCK // 2

    def take_unsaved(self) -> WriteBatch:
        """Writes made outside an operation's own batch (the index of a store from before it
        existed, built by :meth:`load`)."""
        batch, self.unsaved = self.unsaved, WriteBatch()
        return batch

    def state_vector(self, space_id: str) -> bytes:
        return self.space(space_id).replica.state_vector()

    def diff(self, space_id: str, state_vector: bytes, peer: str | None = None) -> bytes:
        """What a replica at ``state_vector`` lacks. For a device of another account,
        only what our own account's devices wrote: that device accepts nothing else
        from us, and gets the rest from its authors."""
        replica = self.space(space_id).replica
        if peer is None or self.device_list.signing_key_of(peer) is not None:
            return replica.diff(state_vector)
        return replica.diff(state_vector, keep=self._ours_client)

    def _replica(
        self,
        space_id: str,
        source: UpdateSource | None = None,
        authors: AuthorSource | None = None,
    ) -> Replica:
        return Replica(
            space_id,
            source=source,
            authors=authors,
            client_id=crdt_client(self.device_id, self.boot),
            reload=partial(self._history_of, space_id),
        )

    def _history_of(self, space_id: str) -> Iterable[bytes]:
        """A space's whole history as it stands (see :attr:`history`); none without a
        store (a state held in memory only: its replica then starts over empty)."""
        return () if self.history is None else self.history(space_id)

    def client_account(self, client: int) -> str | None:
        """The account whose device writes as CRDT client ``client`` (None if none we
        know of)."""
        if self._client_owners is None:
            owners = {}
            # ours last: nothing another account lists can take our clients from us
            for dl in (*self.accounts.values(), self.device_list):
                for d in (*dl.devices, *dl.removed):
                    owners[device_prefix(d.device_id)] = dl.account_id
            self._client_owners = owners
        return self._client_owners.get(client >> BOOT_BITS)

    def _refused_key(
        self, account_id: str, space_id: str, opened: list[tuple[str, str]]
    ) -> str | None:
        """The first key of ``opened`` a device of another account may not open in a
        space (None: all are fine). Not a key that holds a value of another account
        already: an item opening a key again, with no origin, lands after the items
        there when its client id is greater, and replaces the value without referring
        to it. Not a key that is another's by its name (``model.may_open``). And a
        deletion only of a message of its own account, held or written with it."""
        replica = self.spaces[space_id].replica
        messages = {key for name, key in opened if name == MESSAGES}
        held = replica.values([*opened, *((MESSAGES, k) for n, k in opened if n == DELETIONS)])
        for name, key in opened:
            value = held.get((name, key))
            if value is not None and not (isinstance(value, dict) and value.get("a") == account_id):
                return f"{name}/{key}"
            if not may_open(name, key, account_id, self.belongs):
                return f"{name}/{key}"
            if name == DELETIONS and key not in messages:
                message = held.get((MESSAGES, key))
                if not (isinstance(message, dict) and message.get("a") == account_id):
                    return f"{name}/{key}"
        return None

    def _ours_client(self, client: int) -> bool:
        return self.client_account(client) == self.account_id

    def _author_client(self, account_id: str) -> Callable[[int], bool]:
        return lambda client: self.client_account(client) == account_id

    def space_key(self, space_id: str, epoch: int) -> bytes:
        space = self.spaces.get(space_id)
        if space is None or epoch not in space.keys:
            raise UnknownKey(space_id, epoch)
        return space.keys[epoch]

    def ingest(self, data: bytes) -> Ingested:
        """Verify, decrypt, replay-check and apply one envelope.

        Raises a typed error and changes nothing when any check fails (the replay window
        moves only after the update applied).
        """
        parsed = envelope.parse(data)
        window = self.replay.get(parsed.sender) or envelope.ReplayWindow()
        window.check(parsed.sender, parsed.counter)  # cheap, before any signature check
        opened = envelope.open_parsed(
            parsed, signing_key_of=self.current_signing_key, space_key=self.space_key
        )
        author = self.current_account_of(opened.sender).account_id
        if author not in self.spaces[opened.space].members:
            raise UnknownDevice(f"{opened.sender} (its account is not a member of the space)")
        # another account's device may only write and delete its own account's structs
        # (so it can neither occupy nor delete ours); our own devices relay anyone's
        allowed = None if author == self.account_id else self._author_client(author)
        # nor open a key that is ours (by its name, or by the value it holds)
        opens = None if allowed is None else partial(self._refused_key, author, opened.space)
        applied = self.spaces[opened.space].replica.apply(
            opened.payload, allowed=allowed, opens=opens
        )
        changed = applied.changed
        relayable = allowed is not None or all(
            self.client_account(c) == author for c in applied.clients
        )
        window.accept(opened.counter)
        self.replay[opened.sender] = window
        index, rejected = self._index(opened.space, changed, vouched_by=opened.sender)
        batch = WriteBatch(
            records={f"replay/{opened.sender}": window.to_record()},
            appends=[(opened.space, opened.payload)],
            index=index,
        )
        return Ingested(
            space=opened.space,
            sender=opened.sender,
            counter=opened.counter,
            update=opened.payload,
            batch=batch,
            relayable=relayable,
            rejected=rejected,
        )

    def offer_device_list(self, data: bytes) -> WriteBatch | None:
        """Adopt a newer signed device list; None if it is the one we hold.

        RollbackRefused for an older one, DeviceListError for a forged one.
        """
        try:
            offered = DeviceList.decode(data)
        except WireError as exc:
            raise DeviceListError(f"device list is malformed: {exc}") from exc
        kept = accept_device_list(self.device_list, offered)
        if kept is self.device_list:
            return None
        self._client_owners = None
        grants = self._open_grant(kept)
        self.device_list = kept
        for space in self.spaces.values():
            space.replica.forget_failures()
        return merge_batches([grants, WriteBatch(records={"account/list": kept.encode()})])

    # ---- other accounts: contacts, conversations, grants --------------------------

    def follow(
        self, data: bytes, *, trusted: bool, contact_key: bytes | None = None
    ) -> WriteBatch | None:
        """Adopt a newer signed device list of another account (ours: see
        :meth:`offer_device_list`); None if we hold it already.

        An account we do not follow yet is taken only when ``trusted`` (its list came
        from a contact code the owner gave us, from our own account's contact book or
        inside a grant from a device we trust); otherwise ContactError. RollbackRefused
        for an older version, DeviceListError for a forged one.
        """
        try:
            offered = DeviceList.decode(data)
        except WireError as exc:
            raise DeviceListError(f"device list is malformed: {exc}") from exc
        if offered.account_id == self.account_id:
            return self.offer_device_list(data)
        keyed = WriteBatch()
        if contact_key is not None and self.contact_keys.get(offered.account_id) != contact_key:
            self.contact_keys[offered.account_id] = contact_key
            keyed.records[f"peerkey/{offered.account_id}"] = contact_key
        known = self.accounts.get(offered.account_id)
        if known is None:
            if not trusted:
                raise ContactError(f"account {offered.account_id} is not one we follow")
            offered.verify(offered.account_pk)
            kept = offered
        else:
            kept = accept_device_list(known, offered)
            if kept is known:
                return keyed or None
        check_unclaimed(kept, [self.device_list, *self.accounts.values()])
        self.accounts[kept.account_id] = kept
        self._client_owners = None
        for space in self.spaces.values():  # its new devices' entries may verify now
            space.replica.forget_failures()
        keyed.records[f"peer/{kept.account_id}"] = kept.encode()
        return keyed

    def new_conversation(self, name: str, members: list[str]) -> tuple[str, WriteBatch]:
        """A new conversation space with the accounts ``members`` (all followed)."""
        others: dict[str, bytes] = {}
        for account_id in members:
            dl = self.accounts.get(account_id)
            if dl is None:
                raise ContactError(f"account {account_id} is not a contact")
            others[account_id] = dl.account_pk
        if len(others) + 1 > MAX_MEMBERS:
            raise ContactError(f"a conversation holds at most {MAX_MEMBERS} accounts")
        space_id = new_id()
        return space_id, self.add_space(space_id, "chat", name, members=others)

    def space_grant(self, space_id: str) -> SpaceGrant:
        """What we grant of a space: its current keys, name and member lists."""
        space = self.space(space_id)
        lists = [self.list_of(a) for a in sorted(space.members)]
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
            entry = (dl or self.current_account_of(device_id)).entry(device_id)
        except UnknownDevice:
            return None
        grant = self.space_grant(space_id)
        return seal_grant(self.keys, self.account_id, device_id, entry.box_pk, grant)

    def grants_for(self, device_id: str, device_list: DeviceList | None = None) -> list[bytes]:
        """A grant of every chat space ``device_id`` reads, sealed to it: sent when we
        meet it, so devices linked later and devices that missed a rotation catch up.
        (Not the notes chat of our account alone: every enrollment carries that one.)"""
        grants = (
            self.grant_to(device_id, s, device_list)
            for s in self.spaces_for(device_id, device_list)
            if self.spaces[s].kind == "chat"
            and (self.spaces[s].shared or self.spaces[s].name != NOTES)
        )
        return [g for g in grants if g is not None]

    def accept_grant(self, data: bytes) -> tuple[str, bool, WriteBatch]:
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
        granted = open_grant(sealed, self.keys)
        lists = {dl.account_id: dl for dl in decode_members(granted)}
        if self.account_id not in lists or sealed.account not in lists:
            raise GrantRefused(f"grant of {granted.space}: we or the granter are not members")
        if self.list_of(sealed.account) is None:
            raise GrantRefused(f"grant from account {sealed.account}, which we do not follow")
        if (
            granted.space not in self.spaces
            and sealed.account != self.account_id
            and sealed.account not in self.contact_keys
        ):
            # a group's other members are followed so that their entries verify, but
            # only a contact (whose code we took) may bring us into a new conversation
            raise GrantFromStranger(
                f"grant of a new chat from account {sealed.account}, which is not a contact"
            )
        batches: list[WriteBatch] = []
        for account_id, dl in sorted(lists.items(), key=lambda kv: kv[0] != sealed.account):
            try:  # the granter's own list first: it may be what makes the granter current
                batch = self.follow(dl.encode(), trusted=account_id != sealed.account)
            except RollbackRefused:
                continue  # we hold a newer one
            except (DeviceListError, ContactError) as exc:
                raise GrantRefused(f"grant of {granted.space}: {exc}") from exc
            if batch is not None:
                batches.append(batch)
        try:
            granter = self.current_account_of(sealed.sender)
        except UnknownDevice as exc:
            raise GrantRefused(f"grant from {sealed.sender}: {exc}") from exc
        if granter.account_id != sealed.account:
            raise GrantRefused(f"grant from {sealed.sender} names another account")
        verify_grant(sealed, granter.entry(sealed.sender).sign_pk)
        members = {a: dl.account_pk for a, dl in lists.items()}
        known = {self.account_id: self.device_list, **self.accounts}
        rotations: dict[int, Rotation] = {}

        def verified(epoch: int) -> None:
            # checked only where it decides something: a key we do not hold yet
            rotation = Rotation.decode(granted.rotations[epoch])
            if rotation.epoch != epoch or epoch not in granted.keys:
                raise RotationRefused(f"grant of {granted.space} misfiles a rotation")
            check_rotation(rotation, space=granted.space, key=granted.keys[epoch], list_of=known)
            rotations[epoch] = rotation

        space = self.spaces.get(granted.space)
        if space is None:
            for epoch in granted.rotations:
                verified(epoch)
            batches.append(
                self.add_space(
                    granted.space,
                    "chat",
                    granted.name,
                    epoch=granted.epoch,
                    keys=granted.keys,
                    members=members,
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
                trusted_signer=rotation.signer_pk == self.device_list.primary.sign_pk,
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

    def add_members(self, space_id: str, accounts: list[str]) -> WriteBatch:
        """Add accounts we follow to a conversation (its key stays: they read it all,
        as a device linked later does); every member device learns it from grants."""
        space = self.space(space_id)
        if space.kind != "chat" or not space.shared:
            raise ContactError("members are added to a conversation with other accounts")
        for account_id in accounts:
            dl = self.accounts.get(account_id)
            if dl is None:
                raise ContactError(f"account {account_id} is not a contact")
            space.members[account_id] = dl.account_pk
        if len(space.members) > MAX_MEMBERS:
            raise ContactError(f"a conversation holds at most {MAX_MEMBERS} accounts")
        return WriteBatch(records={f"space/{space.id}": space.meta_record()})

    def contact_entries(self) -> dict[str, tuple[str, bytes, bytes]]:
        """Our contact book, from the account space: account id -> (name, list, key)."""
        account = next((s for s in self.spaces.values() if s.kind == "account"), None)
        if account is None:
            return {}
        book: dict[str, tuple[str, bytes, bytes]] = {}
        for e in account.replica.valid_entries(CONTACTS, self.any_signing_key, self.belongs):
            if e.kind != "contact" or e.account != self.account_id:
                continue
            try:
                name, listed, key = unpack(base64.b64decode(e.body), what="contact")
                book[e.target] = (str(name), bytes(listed), bytes(key))
            except (WireError, ValueError, TypeError):
                continue
        return book

    def learn_contacts(self) -> WriteBatch:
        """Follow every account of our contact book (the account space): what another
        of our devices added, or what a newly linked device finds in its history."""
        batches = []
        for _account_id, (_name, listed, key) in self.contact_entries().items():
            try:
                batch = self.follow(listed, trusted=True, contact_key=key)
            except (DeviceListError, ContactError, WireError):
                continue  # older than what we follow already, or broken: keep ours
            if batch is not None:
                batches.append(batch)
        return merge_batches(batches)

    def contact_entry(
        self, name: str, device_list: bytes, key: bytes, wall_ms: int
    ) -> tuple[str, Entry]:
        """The account-space entry adding a contact (account id, signed entry)."""
        dl = DeviceList.decode(device_list)
        if dl.account_id == self.account_id:
            raise ContactError("that is our own account's contact code")
        account = next(s for s in self.spaces.values() if s.kind == "account")
        body = base64.b64encode(pack([name, device_list, key])).decode("ascii")
        entry = self.new_entry(account.id, "contact", wall_ms, body=body, target=dl.account_id)
        return account.id, entry

    # ---- leaving a conversation ------------------------------------------------------

    def departed(self, space_id: str) -> set[str]:
        """Member accounts that signed a leave entry in the space and are still on its
        member set (the key has not been rotated without them yet)."""
        space = self.space(space_id)
        left = {
            e.account
            for e in space.replica.valid_entries(LEAVES, self.any_signing_key, self.belongs)
            if e.kind == "leave"
        }
        return left & set(space.members) - {self.account_id} if space.shared else set()

    def rotates_for(self, space_id: str, departed: set[str]) -> bool:
        """Whether this device rotates the key after ``departed`` left: the primary of
        the remaining member account with the smallest id, so that one new key exists
        (the others wait for its grant; until then the old key stays in use)."""
        remaining = set(self.space(space_id).members) - departed
        return self.is_primary and leave_rotator(remaining) == self.account_id

    def heals_split(self, space_id: str) -> bool:
        """Whether this device starts a new epoch after a split of ``space_id``: the
        primary of the member account ``authority.split_healer`` names."""
        return self.is_primary and split_healer(set(self.space(space_id).members)) == (
            self.account_id
        )

    def rotate_without(self, space_id: str, departed: set[str]) -> WriteBatch:
        """A new epoch key for a conversation, its member set without ``departed``."""
        space = self.space(space_id)
        space.members = {a: pk for a, pk in space.members.items() if a not in departed}
        return WriteBatch(records=space.rotate(self.keys))

    # ---- delivery state ------------------------------------------------------------

    def receipt_body(self, space_id: str) -> str:
        """What our delivery receipt for a space states now: per other author device,
        the newest ``ts`` of its messages we hold (``""`` when there is none)."""
        newest = self.space(space_id).replica.newest_by_device()
        newest.pop(self.device_id, None)
        return json.dumps(newest, sort_keys=True, separators=(",", ":")) if newest else ""

    def delivery(self, space_id: str, messages: list[Message]) -> dict[str, Delivery]:
        """Delivery state of each message, from the receipts and read markers of the
        space's current member devices (entries verified like messages)."""
        space = self.space(space_id)
        replica = space.replica
        receipts: dict[str, dict[str, str]] = {}
        for e in replica.valid_entries(RECEIPTS, self.any_signing_key, self.belongs):
            try:  # a member's receipt: its nesting is bounded before parsing
                stated = (
                    load_json(e.body, what="receipt", max_size=MAX_BODY, max_depth=2)
                    if e.body
                    else {}
                )
            except WireError:
                continue
            if isinstance(stated, dict):
                receipts[e.device] = {str(k): str(v) for k, v in stated.items()}
        reads = {
            e.device: (e.account, e.body)
            for e in replica.valid_entries(READ_MARKERS, self.any_signing_key, self.belongs)
        }
        devices = self.member_devices(space_id)
        out = {}
        for m in messages:
            others = sorted(devices - {m.device})
            got = tuple(d for d in others if receipts.get(d, {}).get(m.device, "") >= m.ts)
            read_by = tuple(
                sorted(d for d, (_, ts) in reads.items() if d != m.device and ts >= m.ts)
            )
            readers = {reads[d][0] for d in read_by}
            other_accounts = set(space.members) - {m.account}
            if other_accounts and other_accounts <= readers:
                status = "read"
            elif len(got) == len(others):
                status = "delivered"
            else:
                status = "sent"
            waiting = tuple(d for d in others if d not in got)
            out[m.id] = Delivery(
                delivered_to=got, waiting_for=waiting, read_by=read_by, status=status
            )
        return out


def index_row(
    space_id: str, map_name: str, key: str, entry: Entry | None, judged: Judged
) -> IndexRow:
    """The index row of one judged value: what a reader needs, or why it is hidden."""
    if entry is None:
        reason = judged.reason if isinstance(judged, Rejected) else "malformed"
        return IndexRow(space=space_id, map=map_name, key=key, reason=reason)
    hidden = isinstance(judged, Rejected)
    return IndexRow(
        space=space_id,
        map=map_name,
        key=key,
        id=entry.id,
        kind=entry.kind,
        account=entry.account,
        device=entry.device,
        ts=entry.ts,
        target=entry.target,
        body=entry.body,
        sig=entry.sig if hidden else "",  # kept to judge it again later
        reason=judged.reason if isinstance(judged, Rejected) else "",
    )


def row_entry(row: IndexRow) -> Entry | None:
    """The entry an index row stands for, checked as any stored value is
    (``Entry.from_value``); None for a malformed one."""
    return Entry.from_value(
        {
            "id": row.id,
            "k": row.kind,
            "a": row.account,
            "d": row.device,
            "ts": row.ts,
            "t": row.target,
            "b": row.body,
            "sig": row.sig,
        }
    )


def index_view(space_id: str, messages: list[IndexRow], related: list[IndexRow]) -> list[Message]:
    """Messages in display order from index rows: the same :func:`~p2p.proto.model.fold` the
    CRDT view uses, over the shown rows of a page and the rows about them."""
    by_map: dict[str, list[Entry]] = {name: [] for name in INDEXED_MAPS}
    for row in (*messages, *related):
        entry = row_entry(row)
        if entry is None or row.reason:
            raise StoreCorrupt(f"index row {row.map}/{row.key} of {space_id} is not a shown entry")
        by_map[row.map].append(entry)
    return fold(space_id, by_map[MESSAGES], by_map[EDITS], by_map[DELETIONS], by_map[REACTIONS])
