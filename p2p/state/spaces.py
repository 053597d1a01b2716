"""Spaces: the replicated documents a device holds, their keys, and how they load.

Rules:

- A space is a document (:class:`~p2p.proto.model.Replica`) with the keys of every epoch
  we hold and its member accounts; the account space holds our own account's book, a
  chat space a conversation. :class:`Spaces` maps space ids to them.
- A space whose stored record or history does not load is *set aside*
  (:meth:`Spaces.put_aside`): out of the map, so nothing syncs, shows or writes it, with
  its rows left on disk as they are; asking for it raises its :class:`ChatCorrupt`.
- Records load now; a space's document loads on first use, from its stored history
  (snapshot, then tail), unless it was never indexed (then the index is built from it).
  Its state vector is known without it when the ``sv/<space>`` record is current
  (:func:`stored_vector`): written with every append (:meth:`Spaces.vector_records`).
- Every replica writes as this run's CRDT client (:func:`crdt_client`): bound to the
  device, new at every run.
- ``log_seq`` and ``snapshot_seq`` follow the store's update log of a space: the
  writer says when it appended (:meth:`Space.appended`) and compacted
  (:meth:`Space.compacted`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Final, Literal

from p2p.errors import ChatCorrupt, P2PError, UnknownChat
from p2p.proto import envelope
from p2p.proto.authority import Rotation
from p2p.proto.identity import DeviceKeys, short_id
from p2p.proto.model import (
    SIDE,
    AuthorSource,
    Heads,
    Replica,
    UpdateSource,
    decode_state_vector,
)
from p2p.proto.wire import pack, unpack
from p2p.proto.ysplit import split_update, trim_update
from p2p.state.records import required
from p2p.storage.base import Store, WriteBatch

NOTES: Final = "notes"
STORED_PAGE: Final = 8
"""Stored updates read at once when a catch-up is answered from the store."""
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

    def appended(self, updates: int = 1) -> None:
        """The store's log of this space grew by ``updates`` (the writer wrote them)."""
        self.log_seq += updates

    def compaction_due(self, after: int) -> bool:
        """Whether ``after`` updates or more follow the store's snapshot."""
        return self.log_seq - self.snapshot_seq >= after

    def compacted(self, upto: int) -> None:
        """The store's snapshot now covers the log up to ``upto``."""
        self.snapshot_seq = upto


class Spaces(dict[str, Space]):
    """Every space this device holds, by id, and those set aside; makes their replicas."""

    def __init__(self, device_id: str) -> None:
        super().__init__()
        self.device_id = device_id
        self.set_aside: dict[str, ChatCorrupt] = {}
        """Spaces whose stored history or record did not load, by id: out of the map
        (nothing syncs, shows or writes them), their rows left on disk."""
        self.boot = 0
        """This run's number (persisted as ``boot``; part of our CRDT client id)."""
        self.store: Store | None = None
        """The store the spaces were read from (None for a state held in memory only):
        what :meth:`stored_diff` reads, a page at a time."""
        self.history: Callable[[str], Iterable[bytes]] | None = None
        """A space's whole history as it stands: durable, then on its way to the store
        (set by :meth:`load_space`'s loader to the store's; the node adds its write
        queue). A replica that an update made pycrdt panic is rebuilt from it."""

    def space(self, space_id: str) -> Space:
        """A space by id: its ChatCorrupt if set aside, else UnknownChat if not held."""
        try:
            return self[space_id]
        except KeyError:
            if space_id in self.set_aside:
                raise self.set_aside[space_id] from None
            raise UnknownChat(space_id) from None

    @property
    def account(self) -> Space | None:
        """Our account's own space (None before enrollment)."""
        return next((s for s in self.values() if s.kind == "account"), None)

    def chat_by_name(self, name: str) -> Space:
        """A chat by id, or by its name when no id matches."""
        if name in self:
            return self[name]
        for s in self.values():
            if s.kind == "chat" and s.name == name:
                return s
        for corrupt in self.set_aside.values():
            if name in (corrupt.chat, corrupt.name):
                raise corrupt
        raise UnknownChat(name, [s.name for s in self.values() if s.kind == "chat"])

    def put_aside(self, space_id: str, error: P2PError | ValueError) -> ChatCorrupt:
        """Set a space aside whose stored history or record does not load: the node and
        every other space go on without it; its rows stay on disk as they are."""
        space = self.pop(space_id, None)
        corrupt = ChatCorrupt(
            space_id, f"{type(error).__name__}: {error}", space.name if space else ""
        )
        self.set_aside[space_id] = corrupt
        return corrupt

    def forget_failures(self) -> None:
        """Let every replica judge again what failed to verify (a device list grew)."""
        for space in self.values():
            space.replica.forget_failures()

    def add(
        self,
        space_id: str,
        kind: SpaceKind,
        name: str,
        *,
        members: dict[str, bytes],
        epoch: int = 0,
        keys: dict[int, bytes] | None = None,
        rotations: dict[int, bytes] | None = None,
    ) -> WriteBatch:
        """A new space (``members``: ours included), empty; the records that keep it."""
        keys = keys if keys is not None else {epoch: envelope.new_space_key()}
        self[space_id] = Space(
            space_id,
            kind,
            name,
            epoch,
            dict(keys),
            self.replica(space_id),
            members=members,
            rotations=dict(rotations or {}),
        )
        records = {
            f"space/{space_id}": self[space_id].meta_record(),
            f"indexed/{space_id}": b"",  # an empty chat's index is complete
        }
        for e, k in keys.items():
            records[f"spacekey/{space_id}/{e}"] = k
        for e, r in (rotations or {}).items():
            records[f"spacerot/{space_id}/{e}"] = r
        return WriteBatch(records=records)

    def load_space(self, store: Store, space_id: str, record: bytes) -> bool:
        """One space from its records (its document stays lazy); whether it is indexed
        (if not, the caller builds its index, which loads the document)."""
        kind, space_name, epoch, member_pks = unpack(record, what="space record")
        space_keys = {
            int(k.rsplit("/", 1)[1]): required(store, k)
            for k in store.names(f"spacekey/{space_id}/")
        }
        indexed = store.get(f"indexed/{space_id}") is not None
        snapshot_seq, log_seq = store.log_seqs(space_id)
        replica = self.replica(
            space_id,
            # the store, then what is on its way there: an update applied without the
            # document may still be queued when a load starts (``Replica.apply``)
            source=partial(self.history_of, space_id),
            authors=partial(store.index_authors, space_id) if indexed else None,
            state_vector=stored_vector(vectors := store.get(f"sv/{space_id}"), log_seq),
            heads=stored_heads(vectors, log_seq),
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
        self[space_id] = space
        space.snapshot_seq, space.log_seq = snapshot_seq, log_seq
        return indexed

    def vector_records(self, appends: list[tuple[str, bytes]]) -> dict[str, bytes]:
        """The ``sv/<space>`` records to write with ``appends``: the state vector of each
        space whose vector is known, stamped with the seq its log reaches with them (see
        :func:`stored_vector`).

        Called as the batch is made, before anything else can reach the replica: what
        the document holds then is what the store holds once the batch is written."""
        counts: dict[str, int] = {}
        for space_id, _ in appends:
            counts[space_id] = counts.get(space_id, 0) + 1
        records: dict[str, bytes] = {}
        for space_id, count in counts.items():
            records.update(self.vector_record(space_id, count))
        return records

    def vector_record(self, space_id: str, appending: int = 0) -> dict[str, bytes]:
        """The ``sv/<space>`` record of a space whose log reaches its current seq plus
        ``appending`` (none for a space not held, or whose vector is not known)."""
        space = self.get(space_id)
        if space is None or not space.replica.vector_known:
            return {}
        replica = space.replica
        return vector_record(
            space_id, space.log_seq + appending, replica.state_vector(), replica.known_heads()
        )

    def replica(
        self,
        space_id: str,
        source: UpdateSource | None = None,
        authors: AuthorSource | None = None,
        state_vector: bytes | None = None,
        heads: Heads | None = None,
    ) -> Replica:
        """An empty (or, with ``source``, lazily loaded) replica writing as this run."""
        return Replica(
            space_id,
            source=source,
            authors=authors,
            state_vector=state_vector,
            heads=heads,
            client_id=crdt_client(self.device_id, self.boot),
            reload=partial(self.history_of, space_id),
        )

    def stored_diff(
        self, space_id: str, past: dict[int, int], start: int, limit: int
    ) -> Iterator[bytes]:
        """What a replica at ``past`` lacks of a space, read from the store (from seq
        ``start`` on; 0 includes the snapshot), one stored update at a time, trimmed to
        what it lacks (``ysplit.trim_update``) and cut to ``limit`` bytes: a catch-up
        answered without loading the document, holding one stored update at a time.

        Only what is durable: an update still on its way to the store reaches the peer
        as gossip once it is, or at the next exchange of state vectors."""
        for _, _, data in self._stored(space_id, start):
            trimmed = trim_update(data, past)
            if trimmed is not None:
                yield from split_update(trimmed, limit)

    def stored_updates(self, space_id: str) -> Iterator[bytes]:
        """A space's stored history as the store holds it when first read from (the
        snapshot's parts, then the log), one part or page at a time: what
        ``Replica.learn_chains`` reads, in a worker thread."""
        for _, _, data in self._stored(space_id, 0):
            yield data

    def first_needed(self, space_id: str, past: dict[int, int]) -> int:
        """The seq to answer ``past`` from (see :meth:`stored_diff`): past every stored
        update it holds whole, read in order from the start (0: the snapshot is
        needed). Run in a worker thread: it reads the whole history when the peer
        lacks only its end."""
        end = 0
        for before, after, data in self._stored(space_id, 0):
            if trim_update(data, past) is not None:
                return before
            end = after
        return end

    def _stored(self, space_id: str, start: int) -> Iterator[tuple[int, int, bytes]]:
        """A space's stored updates from seq ``start`` on (0: the snapshot's parts
        first, each its own update), read a part or a page at a time: (the seq to start
        from to read it again, the seq it brings the reader to, the update). A snapshot
        part is read again from 0, and brings the reader to the seq the whole snapshot
        covers: one part alone does not stand for any seq.

        The log as it stands when the first item is asked for: an update stored later
        (one a peer is sending us meanwhile, say) is not read. It reaches a peer as
        gossip; read here, two devices catching each other up would send each other,
        without end, what each stored of the other's catch-up.

        One part is held at a time, never the whole snapshot. A compaction that
        replaces the snapshot between two parts shows as a part stating another seq:
        the parts are then read again from the first (what was yielded already is
        harmless to apply twice), so that the parts yielded are one snapshot's. One
        that folds updates not read yet into the snapshot (it then covers a seq past
        the reader's) sends the reader back to the snapshot too."""
        store = self.store
        if store is None:
            return
        end = store.log_seqs(space_id)[1]
        after = start
        while True:
            if after == 0:
                after = yield from self._stored_snapshot(store, space_id)
            while after < end:
                rows = store.space_rows(space_id, after, STORED_PAGE)
                skips = not rows or rows[0][0] != after + 1  # a log's seqs run on by one
                if skips and store.log_seqs(space_id)[0] > after:  # folded: rows missed
                    break
                if not rows:
                    return
                for seq, data in rows:
                    if seq > end:
                        return
                    yield after, seq, data
                    after = seq
            else:
                return
            after = 0

    @staticmethod
    def _stored_snapshot(
        store: Store, space_id: str
    ) -> Generator[tuple[int, int, bytes], None, int]:
        """The snapshot's parts, one at a time, as :meth:`_stored` yields them; returns
        the seq the snapshot covers (0: there is none)."""
        covered, part = 0, 0
        while True:
            read = store.snapshot_part(space_id, part)
            if read is None:
                if part == 0 or store.log_seqs(space_id)[0] == covered:
                    return covered
                part = 0  # compacted meanwhile into fewer parts: the new snapshot
                continue
            seq, data = read
            del read
            if part > 0 and seq != covered:
                part = 0  # compacted meanwhile: the new snapshot, from its first part
                continue
            covered = seq
            yield 0, covered, data
            del data  # hold one part at a time
            part += 1

    def history_of(self, space_id: str) -> Iterable[bytes]:
        """A space's whole history as it stands (see :attr:`history`); none without a
        store (a state held in memory only: its replica then starts over empty)."""
        return () if self.history is None else self.history(space_id)


def vector_record(
    space_id: str, stamp: int, vector: bytes, heads: Heads | None = None
) -> dict[str, bytes]:
    """The ``sv/<space>`` record stating ``vector`` (and, when known, the side heads:
    see ``Replica.side_values``) for a log that reaches seq ``stamp`` (read back by
    :func:`stored_vector` and :func:`stored_heads`)."""
    if heads is None:
        return {f"sv/{space_id}": pack([stamp, vector])}
    rows = [[m, k, client, clock, value] for (m, k), (client, clock, value) in heads.items()]
    return {f"sv/{space_id}": pack([stamp, vector, rows])}


def stored_heads(record: bytes | None, log_seq: int) -> Heads | None:
    """The side heads an ``sv/`` record states, if it is current (as for
    :func:`stored_vector`) and states them; None otherwise (learnt at the next load)."""
    if stored_vector(record, log_seq) is None:
        return None
    assert record is not None
    fields = unpack(record, what="state vector record")
    if len(fields) != 3 or not isinstance(fields[2], list):
        return None
    heads: Heads = {}
    for row in fields[2]:
        if not (isinstance(row, list) and len(row) == 5):
            return None
        m, k, client, clock, value = row
        if not (isinstance(m, str) and m in SIDE and isinstance(k, str)):
            return None
        if not (type(client) is int and type(clock) is int and client >= 0 and clock >= 0):
            return None
        heads[(m, k)] = (client, clock, value)
    return heads


def stored_vector(record: bytes | None, log_seq: int) -> bytes | None:
    """The state vector a space's ``sv/`` record states for its stored history, if the
    record is current: stamped with the seq of the last update it covers, which must be
    the store's last. Anything else (no record, an older one, a malformed one) is None,
    and the document is loaded to learn it. A vector claiming less than the store holds
    would be as wrong as one claiming more: a peer that holds what we claim would be
    told it lacks nothing."""
    if record is None:
        return None
    try:
        stamp, vector, *_heads = unpack(record, what="state vector record")
    except (P2PError, ValueError, TypeError):
        return None
    if type(stamp) is not int or stamp != log_seq or not isinstance(vector, bytes):
        return None
    try:
        decode_state_vector(vector)
    except P2PError:
        return None
    return vector
