"""A device's state and every operation on it, without I/O: the engine's pure heart.

:class:`DeviceState` holds the keys, the signed device list, one :class:`Replica` per
space with its epoch keys, the envelope counter and the replay windows. Each operation
returns the :class:`WriteBatch` that makes it durable; the node (``p2p.node``) writes
batches to its store and talks to the network. Tests drive this class directly to check
the protocol without sockets, threads or clocks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Final, Literal

from nacl.exceptions import CryptoError as NaclCryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox

from p2p import envelope
from p2p.clock import HybridClock
from p2p.errors import (
    DeviceListError,
    NotInitialized,
    StoreCorrupt,
    UnknownChat,
    UnknownKey,
    WireError,
)
from p2p.identity import (
    LEASE_MS,
    AccountKey,
    DeviceEntry,
    DeviceKeys,
    DeviceList,
    accept_device_list,
    check_lease,
    issue_lease,
    parse_device_list,
)
from p2p.model import (
    UNREAD,
    Changes,
    Entry,
    Judged,
    Kind,
    Message,
    Rejected,
    Replica,
    fold,
    judge,
    new_id,
)
from p2p.storage.base import INDEXED_MAPS, IndexKey, IndexRow, Store, WriteBatch
from p2p.wire import pack, unpack

COUNTER_BLOCK: Final = 1024
"""Envelope counters reserved per store write: a crash skips at most this many."""
NOTES: Final = "notes"
"""Name of the conversation every account starts with (a note-to-self chat)."""

SpaceKind = Literal["account", "chat"]


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

    def meta_record(self) -> bytes:
        return pack([self.kind, self.name, self.epoch])


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
        self.counter = 0
        self.counter_reserved = 0
        self.replay: dict[str, envelope.ReplayWindow] = {}
        self.clock = HybridClock()
        self.unsaved = WriteBatch()
        self.lease = b""
        """A companion's latest lease from its primary, shown to peers at handshakes."""

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

    def current_signing_key(self, device_id: str) -> bytes:
        """Signing key of a device on the current list (UnknownDevice/RemovedDevice)."""
        return self.device_list.entry(device_id).sign_pk

    def any_signing_key(self, device_id: str) -> bytes | None:
        """Signing key of any device this account ever had: to check what it wrote."""
        return self.device_list.signing_key_of(device_id)

    def account_of(self, device_id: str) -> str | None:
        return self.account_id if self.device_list.signing_key_of(device_id) else None

    def discovery_key(self) -> bytes:
        """A secret every current device of the account can derive (from the account
        space's current key), so LAN announcements and hellos mean something only to
        them."""
        return self.discovery_keys()[0]

    def discovery_keys(self) -> list[bytes]:
        """The discovery key of every epoch we hold, newest first: a device that missed
        a rotation still proves membership with the old one (and is then judged by the
        device list, which says whether it was removed)."""
        account = next((s for s in self.spaces.values() if s.kind == "account"), None)
        if account is None:  # not enrolled: nothing to prove membership with
            return [bytes(32)]
        return [
            hashlib.blake2b(account.keys[e], digest_size=32, person=b"p2p-discovery").digest()
            for e in sorted(account.keys, reverse=True)
        ]

    def spaces_for(self, device_id: str, device_list: DeviceList | None = None) -> list[str]:
        """Spaces a device may read: all of them for our own current devices (judged by
        ``device_list`` when given: a newer list a peer just showed us)."""
        current = device_list or self.device_list
        return sorted(self.spaces) if device_id in current.ids else []

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
        for space_id, kind, space_name, epoch, space_keys, update in bundle.spaces:
            if kind not in ("account", "chat"):
                raise DeviceListError(f"enrollment names an unknown space kind {kind!r}")
            batches.append(
                state.add_space(space_id, kind, space_name, epoch=epoch, keys=space_keys)  # type: ignore[arg-type]
            )
            changed = state.spaces[space_id].replica.apply(update)
            index, _rejected = state._index(space_id, changed)
            batches.append(WriteBatch(appends=[(space_id, update)], index=index))
        return state, merge_batches(batches)

    def enroll(self, new_device: DeviceKeys, name: str) -> tuple[Enrollment, WriteBatch]:
        """Primary only: add a companion to the list and build its enrollment bundle.

        The companion's private keys never leave it in the real flow; here the caller
        passes them because tests create both ends in one process.
        """
        return self.enroll_public(
            DeviceEntry(
                name=name, role="companion", sign_pk=new_device.sign_pk, box_pk=new_device.box_pk
            )
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
        )
        return bundle, WriteBatch(records={"account/list": self.device_list.encode()})

    def _grant(self, device: DeviceEntry) -> bytes:
        """The current key of every space, sealed to ``device`` (see DeviceList.grants)."""
        keys = [[s.id, s.epoch, s.keys[s.epoch]] for s in self.spaces.values()]
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
            items = [(str(s), int(e), bytes(k)) for s, e, k in granted]
        except (NaclCryptoError, WireError, ValueError, TypeError) as exc:
            raise DeviceListError(
                f"our key grant in device list {device_list.version} is unusable"
            ) from exc
        for space_id, epoch, key in items:
            space = self.spaces.get(space_id)
            if space is None or len(key) != envelope.KEY_SIZE or not 0 <= epoch < 2**32:
                continue  # a space we do not hold yet, or junk: nothing to take
            if epoch not in space.keys:
                space.keys[epoch] = key
                batch.records[f"spacekey/{space_id}/{epoch}"] = key
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
            space.epoch += 1
            space.keys[space.epoch] = envelope.new_space_key()
            batch.records[f"space/{space.id}"] = space.meta_record()
            batch.records[f"spacekey/{space.id}/{space.epoch}"] = space.keys[space.epoch]
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
    ) -> WriteBatch:
        keys = keys if keys is not None else {epoch: envelope.new_space_key()}
        self.spaces[space_id] = Space(space_id, kind, name, epoch, dict(keys), Replica(space_id))
        records = {
            f"space/{space_id}": self.spaces[space_id].meta_record(),
            f"indexed/{space_id}": b"",  # an empty chat's index is complete
        }
        for e, k in keys.items():
            records[f"spacekey/{space_id}/{e}"] = k
        return WriteBatch(records=records)

    @classmethod
    def load(cls, store: Store) -> DeviceState:
        """Rebuild the state from a store: records now, each space's CRDT on first use.

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
            account_pk = _required(store, "account/pk")
            device_list = parse_device_list(_required(store, "account/list"), account_pk)
            seed = store.get("account/key")
            state = cls(
                keys=keys,
                name=_required(store, "device/name").decode(),
                device_list=device_list,
                account_key=AccountKey(seed) if seed else None,
            )
            for name in store.names("space/"):
                space_id = name.removeprefix("space/")
                kind, space_name, epoch = unpack(_required(store, name), what="space record")
                space_keys = {
                    int(k.rsplit("/", 1)[1]): _required(store, k)
                    for k in store.names(f"spacekey/{space_id}/")
                }
                replica = Replica(space_id, source=partial(_history, store, space_id))
                space = Space(space_id, kind, space_name, epoch, space_keys, replica)
                state.spaces[space_id] = space
                space.snapshot_seq, space.log_seq = store.log_seqs(space_id)
                if store.get(f"indexed/{space_id}") is None:
                    state.unsaved = merge_batches([state.unsaved, state.build_index(space_id)])
            for name in store.names("replay/"):
                state.replay[name.removeprefix("replay/")] = envelope.ReplayWindow.from_record(
                    _required(store, name)
                )
            reserved = store.get("counter")
            state.counter = state.counter_reserved = (
                unpack(reserved, what="counter") if reserved else 0
            )
            state.lease = store.get("device/lease") or b""
            last = store.get("clock")
            if last:
                state.clock = HybridClock(last.decode())
        except (WireError, DeviceListError, ValueError, TypeError, KeyError) as exc:
            raise StoreCorrupt(f"device records are unreadable: {exc}") from exc
        return state

    # ---- writing locally -----------------------------------------------------------

    def space(self, space_id: str) -> Space:
        try:
            return self.spaces[space_id]
        except KeyError:
            raise UnknownChat(space_id) from None

    def chat_by_name(self, name: str) -> Space:
        """A chat by id, or by its name when no id matches."""
        if name in self.spaces:
            return self.spaces[name]
        for s in self.spaces.values():
            if s.kind == "chat" and s.name == name:
                return s
        raise UnknownChat(name)

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
        """Put entries in the replica; return the update and the batch persisting it
        (with the message-index rows of what it changed)."""
        update = self.space(space_id).replica.write(entries)
        index, _ = self._index(
            space_id, {(e.map_name(), e.key()): UNREAD for e in entries if e.kind != "read"}
        )
        batch = WriteBatch(
            records={"clock": self.clock.last.encode()},
            appends=[(space_id, update)],
            index=index,
        )
        return update, batch

    # ---- the message index ---------------------------------------------------------

    def _index(
        self, space_id: str, changed: Changes
    ) -> tuple[dict[IndexKey, IndexRow | None], list[Rejected]]:
        """Index rows for the keys an update changed, judged now (verified once, here)."""
        replica = self.space(space_id).replica
        rows: dict[IndexKey, IndexRow | None] = {}
        rejected: list[Rejected] = []
        for (map_name, key), value in changed.items():
            found = replica.judge_key(map_name, key, self.any_signing_key, self.account_of, value)
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
                map_name, self.any_signing_key, self.account_of
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
            judged = judge(space_id, row.key, entry, self.any_signing_key, self.account_of)
            if not isinstance(judged, Rejected):
                index[(space_id, row.map, row.key)] = index_row(
                    space_id, row.map, row.key, entry, judged
                )
        return WriteBatch(index=index)

    # ---- sealing and opening -------------------------------------------------------

    def seal(self, space_id: str, payload: bytes) -> bytes:
        """Seal ``payload`` for a space with the next counter.

        Counters come from a reserved block (see :meth:`reserve_counters`); half-way
        through a block the next one is reserved in :attr:`unsaved`, which the node
        writes long before the first block runs out.
        """
        space = self.space(space_id)
        self.counter += 1
        if self.counter > self.counter_reserved - COUNTER_BLOCK // 2:
            self.unsaved = merge_batches([self.unsaved, self.reserve_counters()])
        return envelope.seal(
            self.keys,
            space=space_id,
            epoch=space.epoch,
            key=space.keys[space.epoch],
            counter=self.counter,
            payload=payload,
        )

    def reserve_counters(self) -> WriteBatch:
        """Reserve the next block of envelope counters; durable before any is used.

        After a crash the device resumes past everything it ever reserved, so no
        counter is used twice (peers would drop the second use as a replay).
        """
        self.counter_reserved = max(self.counter, self.counter_reserved) + COUNTER_BLOCK
        return WriteBatch(records={"counter": pack(self.counter_reserved)})

    def take_unsaved(self) -> WriteBatch:
        """Records changed outside an operation's own batch (counter reservations)."""
        batch, self.unsaved = self.unsaved, WriteBatch()
        return batch

    def state_vector(self, space_id: str) -> bytes:
        return self.space(space_id).replica.state_vector()

    def diff(self, space_id: str, state_vector: bytes) -> bytes:
        return self.space(space_id).replica.diff(state_vector)

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
        changed = self.spaces[opened.space].replica.apply(opened.payload)
        window.accept(opened.counter)
        self.replay[opened.sender] = window
        index, rejected = self._index(opened.space, changed)
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
        grants = self._open_grant(kept)
        self.device_list = kept
        for space in self.spaces.values():
            space.replica.forget_failures()
        return merge_batches([grants, WriteBatch(records={"account/list": kept.encode()})])


def _history(store: Store, space_id: str) -> Iterator[bytes]:
    """A space's stored updates, snapshot first (what a lazy ``Replica`` loads)."""
    log = store.load_space(space_id)
    if log.snapshot is not None:
        yield log.snapshot  # as large as the chat
    yield from log.updates


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
    """Messages in display order from index rows: the same :func:`~p2p.model.fold` the
    CRDT view uses, over the shown rows of a page and the rows about them."""
    by_map: dict[str, list[Entry]] = {name: [] for name in INDEXED_MAPS}
    for row in (*messages, *related):
        entry = row_entry(row)
        if entry is None or row.reason:
            raise StoreCorrupt(f"index row {row.map}/{row.key} of {space_id} is not a shown entry")
        by_map[row.map].append(entry)
    return fold(space_id, by_map["m"], by_map["e"], by_map["x"], by_map["r"])


def _required(store: Store, name: str) -> bytes:
    value = store.get(name)
    if value is None:
        raise KeyError(f"record {name} is missing")
    return value


def merge_batches(batches: list[WriteBatch]) -> WriteBatch:
    """One batch doing what all of ``batches`` do, in order (for group commit)."""
    out = WriteBatch()
    for b in batches:
        out.records.update(b.records)
        out.deletes -= set(b.records)
        out.deletes |= b.deletes
        out.appends.extend(b.appends)
        out.index.update(b.index)  # a later change of the same key wins
    return out
