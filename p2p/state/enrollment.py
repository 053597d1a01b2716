"""Enrollment and leases: a primary adds and removes its account's devices.

Rules:

- Only the primary (the device holding the account key) changes its account's device
  list: it adds a companion (:meth:`Companions.enroll_public`) and removes one
  (:meth:`Companions.unlink`), signing each new list with the account key.
- Linking lists a device only once it holds its history: the primary signs the list
  that adds it (:meth:`Companions.propose_enrollment`) but adopts it only when the
  device confirms (:meth:`Companions.adopt_enrollment`), so a link cut or abandoned
  leaves no device on the list. No two lists of ours share a version: the newest
  version signed, adopted or not, is kept (``account/floor``) and every later list
  skips past it.
- Every new list carries each current device's key grant: the current key of every
  space, sealed to that device's box key. Removing a device rotates the key of every
  space first, so the new keys travel only to the devices that remain, and the removed
  one opens nothing sent later.
- A companion takes from a newer list of its account only the keys of spaces it
  holds (:meth:`Companions.open_grant`), with the rotation that made each epoch.
- A companion runs on a lease from its primary, renewed at every meeting; it shows its
  latest lease to peers, and companions refuse each other's expired leases.
- A new companion gets an :class:`Enrollment`: the list, its first lease, and each
  space with its keys, and in memory (tests, ``p2p.testing``) each space's whole
  history too; it applies the account space first (its contact book says whom to
  follow), then each chat, in pieces no larger than an update a peer could send
  (:func:`enrolled_history`). A real link carries no history in the bundle: the
  primary sends it from its store and the new device writes it piece by piece
  (``DeviceState.enrolling``, ``p2p.runtime.linking``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from nacl.exceptions import CryptoError as NaclCryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox

from p2p.errors import DeviceListError, WireError
from p2p.proto import envelope
from p2p.proto.identity import (
    LEASE_MS,
    AccountKey,
    DeviceEntry,
    DeviceKeys,
    DeviceList,
    check_lease,
    issue_lease,
)
from p2p.proto.model import MAX_UPDATE
from p2p.proto.wire import pack, unpack
from p2p.proto.ysplit import split_update
from p2p.state.directory import Directory, Part
from p2p.state.index import MessageIndex
from p2p.state.spaces import Spaces
from p2p.storage.base import Store, WriteBatch


class EnrolledSpace(NamedTuple):
    """One space of an enrollment bundle."""

    id: str
    kind: str
    """``account`` or ``chat`` (checked by the receiver: the bundle comes off the wire)."""
    name: str
    epoch: int
    keys: dict[int, bytes]
    """Epoch -> key, every epoch the primary holds."""
    history: bytes
    """The space's full state, as one update."""

    def __repr__(self) -> str:  # keys and history stay out of logs and tracebacks
        return f"EnrolledSpace({self.id!r}, {self.kind!r}, {self.name!r}, epoch={self.epoch})"


SpaceRecord = tuple[str, str, str, int, dict[int, bytes], bytes]
"""An :class:`EnrolledSpace` as a plain tuple, in the same order."""


@dataclass(frozen=True, kw_only=True)
class Enrollment:
    """What a new device needs to join its account: list, spaces, keys, history.

    Linking (``p2p.runtime.linking``) delivers this sealed to the new device; tests and
    ``p2p.testing`` hand it over in memory.
    """

    account_pk: bytes
    device_list: bytes
    spaces: Sequence[SpaceRecord] = field(repr=False)
    """Each space as an :class:`EnrolledSpace` (a plain tuple in its order is made one)."""
    lease: bytes = b""
    """The new companion's first lease (see ``identity.issue_lease``)."""
    rotations: dict[str, dict[int, bytes]] = field(default_factory=dict, repr=False)
    """Space id -> epoch -> the encoded rotation that made it: a companion shows them in
    its grants, so that other accounts' devices take a key it forwards."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "spaces", self.enrolled)

    @property
    def enrolled(self) -> list[EnrolledSpace]:
        """:attr:`spaces`, each by name."""
        return [s if isinstance(s, EnrolledSpace) else EnrolledSpace(*s) for s in self.spaces]


class Companions(Part):
    """The primary's side of its account's devices, and a companion's lease."""

    def __init__(
        self,
        keys: DeviceKeys,
        spaces: Spaces,
        directory: Directory,
        account_key: AccountKey | None,
    ) -> None:
        super().__init__(keys, spaces, directory)
        self._account_key = account_key
        self.lease = b""
        """A companion's latest lease from its primary, shown to peers at handshakes."""
        self.list_floor = 0
        """Primary: the newest version of our list it has signed, adopted or not (a link
        in progress holds a list it has not adopted): no later list reuses a version."""

    def load(self, store: Store) -> None:
        self.lease = store.get("device/lease") or b""
        floor = store.get("account/floor")
        self.list_floor = unpack(floor, what="list floor") if floor else 0

    def issue_lease(self, device_id: str, now_ms: int | None) -> bytes:
        """Primary only: a lease for a companion, running LEASE_MS from ``now_ms``
        (None: one that does not run out, for devices provisioned in memory by tests)."""
        if self._account_key is None:
            raise DeviceListError("only the primary issues leases")
        expires = 2**62 if now_ms is None else now_ms + LEASE_MS
        return issue_lease(self._account_key, device_id, expires)

    def accept_lease(self, data: bytes, now_ms: int) -> WriteBatch:
        """Companion: keep a renewed lease from the primary (LeaseExpired if invalid)."""
        own = self._directory.device_list
        check_lease(data, own.account_pk, self._keys.device_id, now_ms)
        self.lease = data
        return WriteBatch(records={"device/lease": data})

    def enroll_public(
        self, entry: DeviceEntry, *, now_ms: int | None = None, history: bool = True
    ) -> tuple[Enrollment, WriteBatch]:
        """Primary only: add a companion, knowing only its public keys (again for a
        device already on the list: a link resumed after a drop), and build its
        enrollment bundle (``history`` False: without the histories, which a link
        sends from the store, see ``p2p.runtime.linking``)."""
        if self._account_key is None:
            raise DeviceListError("only the primary can link a device")
        directory = self._directory
        if entry.device_id not in directory.device_list.ids:
            directory.device_list = directory.device_list.with_device(
                self._account_key, entry, self._grant, version=self._next_version()
            )
        own = directory.device_list
        bundle = self._bundle(own, self.issue_lease(entry.device_id, now_ms), history)
        return bundle, WriteBatch(records={"account/list": own.encode()})

    def _bundle(self, device_list: DeviceList, lease: bytes, history: bool) -> Enrollment:
        """What a new device gets: its list and lease, every space with its keys and
        (``history``) its whole history, which loads every space's document."""
        return Enrollment(
            lease=lease,
            account_pk=device_list.account_pk,
            device_list=device_list.encode(),
            spaces=[
                EnrolledSpace(
                    s.id,
                    s.kind,
                    s.name,
                    s.epoch,
                    dict(s.keys),
                    s.replica.snapshot() if history else b"",
                )
                for s in self._spaces.values()
            ],
            rotations={s.id: dict(s.rotations) for s in self._spaces.values() if s.rotations},
        )

    def propose_enrollment(
        self, entry: DeviceEntry, *, now_ms: int | None = None
    ) -> tuple[Enrollment, DeviceList, WriteBatch]:
        """Primary, linking: the signed list that adds ``entry`` and the bundle carrying
        it, *not adopted*: the device is listed (:meth:`adopt_enrollment`) only once it
        confirms it holds its history, so a link cut or abandoned leaves no device on
        the list. The batch records the version as signed (``account/floor``): it must
        be durable before the device sees the list, so that no later list of ours
        claims the same version (two lists of one version are a fork peers refuse).
        A device already on the list (a link resumed after its list was adopted) gets
        the current list. The bundle holds no history: a link sends each space's
        history from the store (``p2p.runtime.linking``)."""
        if self._account_key is None:
            raise DeviceListError("only the primary can link a device")
        directory = self._directory
        if entry.device_id in directory.device_list.ids:
            bundle, batch = self.enroll_public(entry, now_ms=now_ms, history=False)
            return bundle, directory.device_list, batch
        version = self._next_version()
        proposed = directory.device_list.with_device(
            self._account_key, entry, self._grant, version=version
        )
        self.list_floor = version
        bundle = self._bundle(proposed, self.issue_lease(entry.device_id, now_ms), False)
        return bundle, proposed, WriteBatch(records={"account/floor": pack(version)})

    def adopt_enrollment(
        self, base: DeviceList, proposed: DeviceList, entry: DeviceEntry
    ) -> WriteBatch:
        """Primary: the new device holds its history; list it. ``proposed`` (what the
        device got) when our list is still ``base``; else our list changed meanwhile (an
        unlink, a newer list adopted) and the device is added to it anew, at a newer
        version, which reaches the device by gossip like any list."""
        if self._account_key is None:
            raise DeviceListError("only the primary can link a device")
        directory = self._directory
        if entry.device_id in directory.device_list.ids:
            return WriteBatch()
        if directory.device_list is base:
            directory.device_list = proposed
        else:
            directory.device_list = directory.device_list.with_device(
                self._account_key, entry, self._grant, version=self._next_version()
            )
        self.list_floor = max(self.list_floor, directory.device_list.version)
        return WriteBatch(records={"account/list": directory.device_list.encode()})

    def _next_version(self) -> int:
        """The version of the next list we sign: past every one we signed."""
        return max(self._directory.device_list.version, self.list_floor) + 1

    def unlink(self, device_id: str) -> WriteBatch:
        """Primary only: remove a device and rotate the key of every space it could read.

        The new keys travel only inside the new device list, sealed to each remaining
        companion; the removed device keeps what it had and can open nothing sent later.
        """
        if self._account_key is None:
            raise DeviceListError("only the primary can unlink a device")
        directory = self._directory
        directory.device_list.entry(device_id)  # UnknownDevice / RemovedDevice first
        batch = WriteBatch()
        for space in self._spaces.values():
            batch.records.update(space.rotate(self._keys))
        directory.device_list = directory.device_list.without_device(
            self._account_key, device_id, self._grant, version=self._next_version()
        )
        batch.records["account/list"] = directory.device_list.encode()
        return batch

    def _grant(self, device: DeviceEntry) -> bytes:
        """The current key of every space, sealed to ``device`` (see DeviceList.grants)."""
        keys = [
            [s.id, s.epoch, s.keys[s.epoch], s.rotations.get(s.epoch, b"")]
            for s in self._spaces.values()
        ]
        return bytes(SealedBox(PublicKey(device.box_pk)).encrypt(pack(keys)))

    def open_grant(self, device_list: DeviceList) -> WriteBatch:
        """Take the keys a newer list of our account grants us: new epochs after a
        rotation."""
        sealed = device_list.grant_for(self._keys.device_id)
        batch = WriteBatch()
        if sealed is None:
            return batch
        try:
            granted = unpack(
                SealedBox(PrivateKey(self._keys.box_secret)).decrypt(sealed), what="key grant"
            )
            items = [(str(s), int(e), bytes(k), bytes(r)) for s, e, k, r in granted]
        except (NaclCryptoError, WireError, ValueError, TypeError) as exc:
            raise DeviceListError(
                f"our key grant in device list {device_list.version} is unusable"
            ) from exc
        for space_id, epoch, key, rotation in items:
            space = self._spaces.get(space_id)
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


def enrolled_history(
    bundle: Enrollment,
    spaces: Spaces,
    index: MessageIndex,
    learn_contacts: Callable[[], WriteBatch],
) -> list[WriteBatch]:
    """Apply the histories of an enrollment to the (empty) spaces made from it, as
    bounded pieces: each is an update a peer could have sent (within MAX_UPDATE),
    applied, indexed and stored as one.

    The account space goes first: our contacts came with it, and we follow them
    (``learn_contacts``) before judging entries, so that theirs in our conversations
    verify. A conversation's pieces are indexed as they are applied, so that what each
    changed is not all held."""
    histories = sorted(bundle.enrolled, key=lambda s: s.kind != "account")
    batches = []
    applied = []
    for s in histories:
        if s.kind == "account":
            replica = spaces[s.id].replica
            applied += [(s.id, p, replica.apply(p)) for p in split_update(s.history, MAX_UPDATE)]
    batches.append(learn_contacts())
    for space_id, piece, result in applied:
        rows, _rejected = index.rows(space_id, result.changed)
        batches.append(WriteBatch(appends=[(space_id, piece)], index=rows))
    del applied
    for s in histories:
        if s.kind != "account":
            replica = spaces[s.id].replica
            for piece in split_update(s.history, MAX_UPDATE):
                rows, _rejected = index.rows(s.id, replica.apply(piece).changed)
                batches.append(WriteBatch(appends=[(s.id, piece)], index=rows))
    return batches
