"""Records: how a device's state reaches its store, and what one run claims from it.

Rules:

- Every operation of the state returns a :class:`WriteBatch` (records, log appends,
  index rows) and never calls the store; the node writes batches, in order, and
  :func:`merge_batches` folds many into one (group commit) without changing what they do.
- A run claims its run number and a block of envelope counters from the store in one
  write transaction *before* anything is loaded (:func:`claim_run`), and later blocks
  the same way (:func:`claim_counters`): two processes opening one store never share a
  CRDT client id or a counter.
- Reading, the state only asks for named records (:func:`required` for those that must
  be there) and a space's history (:func:`stored_history`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Final

from p2p.errors import StoreCorrupt, WireError
from p2p.proto.wire import pack, unpack
from p2p.storage.base import Store, WriteBatch

COUNTER_BLOCK: Final = 1024
"""Envelope counters reserved per store write: a crash skips at most this many."""


@dataclass(frozen=True)
class Run:
    """What one run of a device writes with, handed out by the store (:func:`claim_run`)."""

    boot: int
    """The run number: the low bits of this run's CRDT client id (``crdt_client``)."""
    counter: int
    """The last envelope counter before this run's block."""
    reserved: int
    """The last envelope counter of this run's block."""


def _stored_int(value: bytes | None, name: str) -> int:
    try:
        number = unpack(value, what=name) if value else 0
    except WireError as exc:
        raise StoreCorrupt(f"record {name!r} is unreadable: {exc}") from exc
    if type(number) is not int or number < 0:
        raise StoreCorrupt(f"record {name!r} holds {number!r}, not a count")
    return number


def _claim(store: Store, amounts: dict[str, int]) -> dict[str, int]:
    """Add ``amounts`` to the counts stored under their names, in one write transaction
    of the store; the new counts."""

    def add(current: Mapping[str, bytes | None]) -> dict[str, bytes]:
        return {n: pack(_stored_int(current[n], n) + k) for n, k in amounts.items()}

    new = store.update_records(list(amounts), add)
    return {name: _stored_int(new[name], name) for name in amounts}


def claim_run(store: Store) -> Run:
    """A new run number and a fresh block of envelope counters, both taken from the
    store in one write transaction before anything is loaded.

    Reading them at load and writing them back later (as this once did) let two
    processes opening one home at once take the same run number: the same CRDT client
    id, so each wrote structs the other's peers took for ones they already held (a
    message acknowledged and never sent), and the same counters (dropped as replays).
    """
    claimed = _claim(store, {"boot": 1, "counter": COUNTER_BLOCK})
    reserved = claimed["counter"]
    return Run(boot=claimed["boot"], counter=reserved - COUNTER_BLOCK, reserved=reserved)


def claim_counters(store: Store) -> int:
    """The end of a fresh block of envelope counters, taken from the store atomically
    (run by the node's writer, off the trio thread; see ``Sealing.grant_counters``)."""
    return _claim(store, {"counter": COUNTER_BLOCK})["counter"]


def stored_history(store: Store, space_id: str) -> Iterator[bytes]:
    """A space's stored updates, the snapshot's parts first (what a lazy ``Replica``
    loads). Read in one call (the parts and the tail of one moment: a compaction cannot
    come between them); each part is let go once it is handed over, so the parts
    applied already need not stay in memory beside the document they built."""
    log = store.load_space(space_id)
    parts, updates = log.snapshot_parts[::-1], log.updates
    del log
    while parts:
        yield parts.pop()
    yield from updates


def required(store: Store, name: str) -> bytes:
    """A record that must be there (KeyError, reported as StoreCorrupt by the loader)."""
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
