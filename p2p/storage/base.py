"""The storage interface: what a node needs from durable state, and nothing more.

Two adapters implement it (SQLite, the default, and memory, for tests) and both pass the
same acceptance suite (``tests/test_storage.py``). The interface is synchronous on
purpose: SQLite is; the node calls it from a worker thread and batches writes itself.

What is stored:

- *records*: small named values (device keys, the signed device list, space epoch keys,
  per-sender replay windows, the local envelope counter). Keys are ``/``-separated names.
- *update logs*: per space, an append-only sequence of CRDT updates, numbered from 1,
  plus at most one snapshot that stands for every update up to a sequence number. The
  snapshot is stored as an ordered sequence of parts of at most :data:`SNAPSHOT_PART`
  bytes (one part, of any size, in a store written before parts existed), so that it
  can be read and sent one part at a time.
- *the message index*: per space, one :class:`IndexRow` per key of the chat maps
  (messages, edits, deletions, reactions), holding that key's current entry as checked
  when it arrived (signature, account). It is written in the same batch as the update
  that changed it, so a reader can show the newest messages without loading the CRDT
  (``p2p.state.device.index_view``); the CRDT stays the truth it is derived from.

A :class:`WriteBatch` is applied atomically and is durable when :meth:`Store.write`
returns: that is what lets ``Node.send`` promise an acknowledged message survives a crash.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol, TypeAlias

from p2p.errors import StoreError

SNAPSHOT_PART: Final = 256 * 1024
"""Largest part of a stored snapshot the writer makes (``p2p.runtime.writer``): what a
reader of the store holds at once when it answers a catch-up or a link from a snapshot
(``Spaces.stored_diff``), however large the chat. The same size as a link's pieces."""

INDEXED_MAPS: Final = ("m", "e", "x", "r")
"""The chat maps the index mirrors (``p2p.proto.model``): messages, edits, deletions, reactions."""


@dataclass(frozen=True, kw_only=True)
class IndexRow:
    """The current entry under one key of one chat map, as judged when it arrived.

    ``reason`` is empty for an entry that passed every check (shown), else why it is
    hidden ("bad signature", "wrong account", "malformed"). Hidden rows keep their
    signature so they can be judged again when the device list grows; shown rows do not
    need it and store ``sig=""``.
    """

    space: str
    map: str
    key: str
    id: str = ""
    kind: str = ""
    account: str = ""
    device: str = ""
    ts: str = ""
    target: str = ""
    body: str = ""
    sig: str = ""
    reason: str = ""

    def order(self) -> tuple[str, str, str]:
        """Display order of a message row: (ts, device, id), as ``Message.sort_key``."""
        return (self.ts, self.device, self.id)


IndexKey = tuple[str, str, str]
"""(space, map, key) of an :class:`IndexRow`."""


@dataclass
class WriteBatch:
    """Records to set and updates to append, applied all together or not at all."""

    records: dict[str, bytes] = field(default_factory=dict)
    """Record name -> new value (replaces any previous value)."""
    deletes: set[str] = field(default_factory=set)
    """Record names to remove."""
    appends: list[tuple[str, bytes]] = field(default_factory=list)
    """(space id, CRDT update) pairs, appended in this order."""
    index: dict[IndexKey, IndexRow | None] = field(default_factory=dict)
    """Message-index rows to set (replacing the row of the same key), None to remove."""

    def __bool__(self) -> bool:
        return bool(self.records or self.deletes or self.appends or self.index)


RecordChange: TypeAlias = Callable[[Mapping[str, bytes | None]], Mapping[str, bytes]]
"""What :meth:`Store.update_records` does to the records it read (name -> new value)."""


@dataclass(frozen=True, kw_only=True)
class SpaceLog:
    """Everything stored for one space: apply the snapshot's parts, then the updates."""

    snapshot_parts: list[bytes]
    """The parts of the snapshot, in order (empty when there is none): updates whose
    merge is the full state of every update with seq <= ``snapshot_seq``."""
    snapshot_seq: int
    """Sequence number the snapshot covers (0 when there is none)."""
    updates: list[bytes]
    """Updates after the snapshot, in append order."""
    last_seq: int
    """Sequence number of the last update appended (0 for an empty log)."""


Cursor: TypeAlias = tuple[str, str, str]
"""A message's place in display order, ``(ts, device, id)`` (:meth:`IndexRow.order`)."""


class MessagePages(Protocol):
    """Paging through a space's shown messages. Adapters subclass it: the arguments are
    checked here, once for all, and each adapter supplies :meth:`_message_page`."""

    def index_messages(
        self,
        space: str,
        *,
        last: int | None = None,
        before: Cursor | None = None,
        files_only: bool = False,
    ) -> list[IndexRow]:
        """Shown message rows (map ``m``, kind ``msg`` or ``file``, no ``reason``) in display order.

        All of them, or only those ordered before ``before`` (a ``(ts, device, id)``),
        and of those the ``last`` ones; ``files_only``: messages with an attachment only.
        StoreError for arguments of the wrong shape, StoreCorrupt for a row that is not
        shaped right.
        """
        if last is not None and (type(last) is not int or last < 0):
            raise StoreError(f"last must be a non-negative int or None, not {last!r}")
        if before is not None and not (
            isinstance(before, tuple) and len(before) == 3 and all(type(b) is str for b in before)
        ):
            raise StoreError(f"before must be a (ts, device, id) tuple, not {before!r}")
        return self._message_page(space, last, before, files_only)

    def _message_page(
        self, space: str, last: int | None, before: Cursor | None, files_only: bool
    ) -> list[IndexRow]:
        """:meth:`index_messages`, its arguments checked."""
        ...


class Store(MessagePages, Protocol):
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

    def update_records(self, names: Sequence[str], change: RecordChange) -> dict[str, bytes]:
        """Read the records ``names`` (None for a missing one), write what ``change``
        makes of them, in one write transaction; return what was written.

        A read-modify-write that no other writer of the same file can come between:
        how run numbers and counter blocks are handed out, so that two processes
        opened on one store never get the same one.
        """
        ...

    def spaces(self) -> list[str]:
        """Ids of every space with a snapshot or at least one update, sorted."""
        ...

    def load_space(self, space: str) -> SpaceLog:
        """The snapshot and the tail of updates of ``space`` (empty log if unknown)."""
        ...

    def space_rows(self, space: str, after_seq: int, limit: int) -> list[tuple[int, bytes]]:
        """Up to ``limit`` updates of ``space`` after ``after_seq`` (seq, data), in seq
        order, without the snapshot: a history read a page at a time (a catch-up
        answered from the store, ``Spaces.stored_diff``)."""
        ...

    def snapshot_part(self, space: str, part: int) -> tuple[int, bytes] | None:
        """(the seq the snapshot covers, its part number ``part``) of ``space``; None
        past the last part (or without a snapshot). Parts are numbered from 0: a reader
        takes them one at a time, holding one part, not the snapshot (``Spaces._stored``).
        The seq comes with each part so that a reader sees a compaction that replaced
        the snapshot between two of its reads."""
        ...

    def log_seqs(self, space: str) -> tuple[int, int]:
        """(snapshot seq, last seq) of ``space`` without reading any update (0, 0 if
        unknown): what opening needs before it decides to load the CRDT at all."""
        ...

    def space_bytes(self, space: str, after_seq: int) -> int:
        """The bytes of ``space``'s stored updates after ``after_seq`` (0: its snapshot
        too), without reading them: what a link still has to send (``p2p link`` shows
        it as the transfer's size)."""
        ...

    def index_count(self, space: str, map_name: str) -> int:
        """How many rows of one map ``space``'s index holds, shown or hidden: the
        messages a chat holds (``m``), counted without its CRDT."""
        ...

    def index_related(self, space: str, targets: Sequence[str] | None) -> list[IndexRow]:
        """Shown edit, deletion and reaction rows about ``targets`` (None: about any)."""
        ...

    def index_rejected(self, space: str) -> list[IndexRow]:
        """Hidden rows of ``space`` (any map), in key order."""
        ...

    def index_held(self, space: str, keys: Sequence[tuple[str, str]]) -> dict[IndexKey, str]:
        """Of these (map, key) pairs, those with a row in ``space`` (shown or hidden),
        with the account its entry names: whether an update may open a key without its
        chat's document (``Replica.apply``, written aside)."""
        ...

    def index_by_device(self, space: str, device: str) -> list[IndexRow]:
        """Every index row of ``space`` (any map, shown or hidden) whose entry names
        ``device``, in (map, key) order: the entries a device writes again."""
        ...

    def index_keys_by_device(self, space: str, device: str) -> list[tuple[str, str]]:
        """(map, key) of every shown row of ``space`` whose entry names ``device``,
        without building rows: what a device checks its own CRDT against."""
        ...

    def index_authors(self, space: str) -> dict[str, str]:
        """Per device, the newest ``ts`` of its rows in the message map (``m``) of
        ``space``, shown or hidden: what a delivery receipt states, and the newest
        timestamp a chat holds, without loading its CRDT."""
        ...

    def compact(self, space: str, parts: Sequence[bytes], upto_seq: int) -> None:
        """Replace the snapshot and the updates with seq <= ``upto_seq`` by a snapshot
        made of ``parts`` (in order; at least one); atomic and durable.

        Updates appended after ``upto_seq`` (for example while the snapshot was being
        computed) stay in the log.
        """
        ...

    def close(self) -> None:
        """Release the file (idempotent)."""
        ...
