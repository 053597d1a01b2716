"""The storage interface: what a node needs from durable state, and nothing more.

Two adapters implement it (SQLite, the default, and memory, for tests) and both pass the
same acceptance suite (``tests/test_storage.py``). The interface is synchronous on
purpose: SQLite is; the node calls it from a worker thread and batches writes itself.

What is stored:

- *records*: small named values (device keys, the signed device list, space epoch keys,
  per-sender replay windows, the local envelope counter). Keys are ``/``-separated names.
- *update logs*: per space, an append-only sequence of CRDT updates, numbered from 1,
  plus at most one snapshot that stands for every update up to a sequence number.

A :class:`WriteBatch` is applied atomically and is durable when :meth:`Store.write`
returns: that is what lets ``Node.send`` promise an acknowledged message survives a crash.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class WriteBatch:
    """Records to set and updates to append, applied all together or not at all."""

    records: dict[str, bytes] = field(default_factory=dict)
    """Record name -> new value (replaces any previous value)."""
    deletes: set[str] = field(default_factory=set)
    """Record names to remove."""
    appends: list[tuple[str, bytes]] = field(default_factory=list)
    """(space id, CRDT update) pairs, appended in this order."""

    def __bool__(self) -> bool:
        return bool(self.records or self.deletes or self.appends)


@dataclass(frozen=True, kw_only=True)
class SpaceLog:
    """Everything stored for one space: load the snapshot, then apply the updates."""

    snapshot: bytes | None
    """A full-state update standing for every update with seq <= ``snapshot_seq``."""
    snapshot_seq: int
    """Sequence number the snapshot covers (0 when there is none)."""
    updates: list[bytes]
    """Updates after the snapshot, in append order."""
    last_seq: int
    """Sequence number of the last update appended (0 for an empty log)."""


class Store(Protocol):
    """Durable state of one device. Implementations: ``SqliteStore``, ``MemoryStore``."""

    def get(self, name: str) -> bytes | None:
        """The record called ``name``, or None."""
        ...

    def names(self, prefix: str) -> list[str]:
        """Names of every record starting with ``prefix``, sorted."""
        ...

    def write(self, batch: WriteBatch) -> None:
        """Apply ``batch`` atomically; durable on return."""
        ...

    def spaces(self) -> list[str]:
        """Ids of every space with a snapshot or at least one update, sorted."""
        ...

    def load_space(self, space: str) -> SpaceLog:
        """The snapshot and the tail of updates of ``space`` (empty log if unknown)."""
        ...

    def compact(self, space: str, snapshot: bytes, upto_seq: int) -> None:
        """Replace updates with seq <= ``upto_seq`` by ``snapshot``; atomic and durable.

        Updates appended after ``upto_seq`` (for example while the snapshot was being
        computed) stay in the log.
        """
        ...

    def close(self) -> None:
        """Release the file (idempotent)."""
        ...
