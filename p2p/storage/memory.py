"""The in-memory store: the reference semantics of :class:`~p2p.storage.base.Store`.

Tests and the in-memory cluster use it so that a node can run without touching the disk.
It behaves exactly like :class:`~p2p.storage.sqlite.SqliteStore` (same acceptance suite,
same refusals), so a test that passes against it says something about the real thing.

This module also holds the input checks both adapters share (:func:`check_name`,
:func:`check_value`, :func:`check_batch`, :func:`check_seq`): a store refuses a bad
name or value *before* touching any state, which is what makes a refused batch apply
nothing, and sharing the checks is what keeps the two adapters refusing the same things.
"""

from __future__ import annotations

import operator
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Final

from p2p.errors import StoreError
from p2p.storage.base import (
    INDEXED_MAPS,
    Cursor,
    IndexKey,
    IndexRow,
    MessagePages,
    RecordChange,
    SpaceLog,
    WriteBatch,
)

MAX_NAME: Final = 512
"""Longest record name or space id, in characters: names are keys, not payloads."""


def check_name(name: object, what: str = "record name", *, allow_empty: bool = False) -> str:
    """Return ``name`` if it is usable as a record name or space id, else raise StoreError.

    Space ids can come from peers, so they are bounded. NUL and lone surrogates are
    refused because SQLite stores text as UTF-8 and would either choke on them or compare
    them differently from Python, and both adapters must agree on every name.
    """
    if not isinstance(name, str):
        raise StoreError(f"{what} must be str, not {type(name).__name__}")
    if not name and not allow_empty:
        raise StoreError(f"{what} must not be empty")
    if len(name) > MAX_NAME:
        raise StoreError(f"{what} of {len(name)} characters exceeds the limit of {MAX_NAME}")
    if "\x00" in name:
        raise StoreError(f"{what} {name!r} contains NUL")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as e:
        raise StoreError(f"{what} {name!r} is not valid Unicode: {e.reason}") from None
    return name


def checked_change(change: RecordChange, current: Mapping[str, bytes | None]) -> dict[str, bytes]:
    """What ``change`` makes of ``current``, checked like a batch's records (shared by
    both adapters' ``update_records``)."""
    return {check_name(n): check_value(v, f"record {n!r}") for n, v in change(current).items()}


def check_value(value: object, what: str = "value") -> bytes:
    """Return an immutable copy of ``value`` (bytes-like), else raise StoreError.

    The copy is the point: a caller that keeps a ``bytearray`` it passed in and mutates
    it later must not be able to change what the store holds.
    """
    if isinstance(value, bytes):
        return value  # immutable already: sharing it is as good as a copy
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    raise StoreError(f"{what} must be bytes, not {type(value).__name__}")


def check_parts(parts: object) -> list[bytes]:
    """The parts of a snapshot given to ``Store.compact``, each checked and copied like
    any value (:func:`check_value`), else StoreError. A bytes-like object is refused
    rather than taken for a sequence (of ints), and so is an empty sequence: it would
    replace the updates it covers by nothing."""
    if isinstance(parts, str | bytes | bytearray | memoryview) or not isinstance(parts, Sequence):
        raise StoreError(f"snapshot parts must be a sequence of bytes, not {type(parts).__name__}")
    if not parts:
        raise StoreError("a snapshot needs at least one part")
    return [check_value(part, f"snapshot part {i}") for i, part in enumerate(parts)]


def check_seq(seq: object, what: str = "sequence number") -> int:
    """Return ``seq`` if it is a plain non-negative int (bool refused), else StoreError."""
    if type(seq) is not int or seq < 0:
        raise StoreError(f"{what} must be a non-negative int, not {seq!r}")
    return seq


INDEX_TEXT: Final = tuple(f.name for f in fields(IndexRow))
"""The columns of an index row, all text, in the order SQLite stores them."""


index_values: Final = operator.attrgetter(*INDEX_TEXT)
"""An index row's columns as a tuple, in INDEX_TEXT order."""


def check_index_row(key: object, row: object) -> tuple[IndexKey, IndexRow | None]:
    """Return ``(key, row)`` if they make one index change, else raise StoreError.

    ``key`` must be the row's own (space, map, key); every field is text. (Run for every
    row a node writes: the common case is checked in a few C calls.)
    """
    if not (isinstance(key, tuple) and len(key) == 3 and all(isinstance(k, str) for k in key)):
        raise StoreError(f"index key must be (space, map, key), not {key!r}")
    space, map_name, name = key
    check_name(space, "space id")
    if map_name not in INDEXED_MAPS:
        raise StoreError(f"index map must be one of {INDEXED_MAPS}, not {map_name!r}")
    if row is None:
        return (space, map_name, name), None
    if not isinstance(row, IndexRow):
        raise StoreError(f"index rows are IndexRow, not {type(row).__name__}")
    values = index_values(row)
    if values[:3] != key:
        raise StoreError(f"index row {values[:3]} filed under {key}")
    try:
        "".join(values).encode("utf-8")  # TypeError unless all are str
    except (TypeError, UnicodeEncodeError):
        for column, value in zip(INDEX_TEXT, values, strict=True):
            if not isinstance(value, str):
                raise StoreError(
                    f"index field {column} must be str, not {type(value).__name__}"
                ) from None
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise StoreError(f"index field {column} is not valid Unicode: {e.reason}") from None
        raise  # not reached: one of the columns failed above
    return (space, map_name, name), row


@dataclass(frozen=True)
class CheckedBatch:
    """A :class:`WriteBatch` after validation: names checked, values copied.

    Adapters apply this, never the caller's batch, so a caller mutating its batch from
    another thread during ``write`` cannot make the store apply half-checked input.
    """

    records: dict[str, bytes]
    deletes: list[str]
    appends: list[tuple[str, bytes]]
    index: dict[IndexKey, IndexRow | None]


def check_batch(batch: object) -> CheckedBatch:
    """Validate every name and value of ``batch`` and copy them, or raise StoreError.

    A name may be both set and deleted: adapters apply ``deletes`` after ``records``, so
    it ends up deleted. That is what ``p2p.state.device.merge_batches`` produces for "set X, then
    delete X" (and it drops X from ``deletes`` for "delete X, then set X").
    """
    if not isinstance(batch, WriteBatch):
        raise StoreError(f"write takes a WriteBatch, not {type(batch).__name__}")
    records = {
        check_name(name): check_value(value, f"value of record {name!r}")
        for name, value in list(batch.records.items())
    }
    deletes = sorted(check_name(name) for name in list(batch.deletes))
    appends = [
        (check_name(space, "space id"), check_value(update, f"update for space {space!r}"))
        for space, update in list(batch.appends)
    ]
    index = dict(check_index_row(key, row) for key, row in list(batch.index.items()))
    return CheckedBatch(records=records, deletes=deletes, appends=appends, index=index)


def shown_messages(
    rows: Sequence[IndexRow],
    last: int | None,
    before: Cursor | None,
    *,
    files_only: bool = False,
) -> list[IndexRow]:
    """Of ``rows`` (one space's, any order), what ``Store.index_messages`` returns
    (its arguments checked)."""
    picked = sorted(
        (
            r
            for r in rows
            if r.map == "m"
            and r.kind in (("file",) if files_only else ("msg", "file"))
            and not r.reason
            and (before is None or r.order() < before)
        ),
        key=IndexRow.order,
    )
    return picked if last is None else picked[max(0, len(picked) - last) :] if last else []


def check_compact(snapshot_seq: int, last_seq: int, upto_seq: int, space: str) -> None:
    """Refuse a compaction that would lose or invent history (shared by both adapters).

    ``upto_seq`` past the last update would make the snapshot claim updates that were
    never stored (and the next append would reuse their numbers); below the current
    snapshot it would replace a snapshot with an older one.
    """
    if upto_seq > last_seq:
        raise StoreError(
            f"cannot compact space {space!r} up to seq {upto_seq}: last seq is {last_seq}"
        )
    if upto_seq < 1 or upto_seq < snapshot_seq:
        raise StoreError(
            f"cannot compact space {space!r} up to seq {upto_seq}: "
            f"the current snapshot already covers seq {snapshot_seq}"
        )


@dataclass
class _Space:
    """One space's log: a snapshot (its parts) standing for seqs 1..snapshot_seq, then
    the tail."""

    parts: list[bytes] = field(default_factory=list)
    snapshot_seq: int = 0
    updates: list[bytes] = field(default_factory=list)

    @property
    def last_seq(self) -> int:
        # The tail is contiguous after the snapshot, so its length gives the last seq.
        return self.snapshot_seq + len(self.updates)


@dataclass
class _State:
    """What a MemoryStore holds; shared by every handle :meth:`MemoryStore.reopen` makes."""

    records: dict[str, bytes] = field(default_factory=dict)
    spaces: dict[str, _Space] = field(default_factory=dict)
    index: dict[str, dict[IndexKey, IndexRow]] = field(default_factory=dict)
    """space -> its index rows by key."""
    lock: threading.Lock = field(default_factory=threading.Lock)


class MemoryStore(MessagePages):
    """A :class:`~p2p.storage.base.Store` held in memory; lost when the process exits.

    Thread-safe (one lock, like SqliteStore) because the node calls its store from trio
    worker threads. ``close`` makes this handle unusable, as with a file; the state lives
    on so that :meth:`reopen` can simulate a node restarting on the same data.
    """

    def __init__(self) -> None:
        self._state = _State()
        self._closed = False

    def reopen(self) -> MemoryStore:
        """A new open handle on the same state, as if the node reopened its file."""
        other = MemoryStore()
        other._state = self._state
        return other

    def _open_state(self) -> _State:
        if self._closed:
            raise StoreError("the store is closed")
        return self._state

    def get(self, name: str) -> bytes | None:
        """The record called ``name``, or None."""
        check_name(name)
        state = self._open_state()
        with state.lock:
            return state.records.get(name)

    def names(self, prefix: str) -> list[str]:
        """Names of every record starting with ``prefix``, sorted."""
        check_name(prefix, "prefix", allow_empty=True)
        state = self._open_state()
        with state.lock:
            return sorted(name for name in state.records if name.startswith(prefix))

    def write(self, batch: WriteBatch) -> None:
        """Apply ``batch`` atomically: everything is checked first, then nothing can fail."""
        checked = check_batch(batch)
        state = self._open_state()
        with state.lock:
            state.records.update(checked.records)
            for name in checked.deletes:  # after records: a name in both ends up deleted
                state.records.pop(name, None)
            for space, update in checked.appends:
                state.spaces.setdefault(space, _Space()).updates.append(update)
            for key, row in checked.index.items():
                rows = state.index.setdefault(key[0], {})
                if row is None:
                    rows.pop(key, None)
                else:
                    rows[key] = row

    def update_records(self, names: Sequence[str], change: RecordChange) -> dict[str, bytes]:
        """Read ``names``, write what ``change`` makes of them, under the lock (atomic)."""
        wanted = [check_name(name) for name in names]
        state = self._open_state()
        with state.lock:
            new = checked_change(change, {name: state.records.get(name) for name in wanted})
            state.records.update(new)
        return new

    def spaces(self) -> list[str]:
        """Ids of every space with a snapshot or at least one update, sorted."""
        state = self._open_state()
        with state.lock:
            return sorted(sid for sid, sp in state.spaces.items() if sp.last_seq > 0)

    def load_space(self, space: str) -> SpaceLog:
        """The snapshot and the tail of updates of ``space`` (empty log if unknown)."""
        check_name(space, "space id")
        state = self._open_state()
        with state.lock:
            sp = state.spaces.get(space) or _Space()
            return SpaceLog(
                snapshot_parts=list(sp.parts),
                snapshot_seq=sp.snapshot_seq,
                updates=list(sp.updates),  # a copy: the caller may consume or extend it
                last_seq=sp.last_seq,
            )

    def log_seqs(self, space: str) -> tuple[int, int]:
        """(snapshot seq, last seq) of ``space``, (0, 0) if unknown."""
        check_name(space, "space id")
        state = self._open_state()
        with state.lock:
            sp = state.spaces.get(space) or _Space()
            return sp.snapshot_seq, sp.last_seq

    def _index_rows(self, space: str) -> list[IndexRow]:
        check_name(space, "space id")
        state = self._open_state()
        with state.lock:
            return list(state.index.get(space, {}).values())

    def _message_page(
        self, space: str, last: int | None, before: Cursor | None, files_only: bool
    ) -> list[IndexRow]:
        """Shown message rows in display order (the last ``last`` before ``before``)."""
        return shown_messages(self._index_rows(space), last, before, files_only=files_only)

    def space_rows(self, space: str, after_seq: int, limit: int) -> list[tuple[int, bytes]]:
        """Up to ``limit`` updates after ``after_seq``, in seq order."""
        check_name(space, "space id")
        state = self._open_state()
        with state.lock:
            sp = state.spaces.get(space) or _Space()
            at = max(after_seq - sp.snapshot_seq, 0)  # the tail holds seqs snapshot_seq + 1 ...
            rows = sp.updates[at : at + limit]
        return [(sp.snapshot_seq + at + 1 + i, u) for i, u in enumerate(rows)]

    def snapshot_part(self, space: str, part: int) -> tuple[int, bytes] | None:
        """(seq covered, snapshot part ``part``), or None past the last part."""
        check_name(space, "space id")
        check_seq(part, "part")
        state = self._open_state()
        with state.lock:
            sp = state.spaces.get(space) or _Space()
            return (sp.snapshot_seq, sp.parts[part]) if part < len(sp.parts) else None

    def space_bytes(self, space: str, after_seq: int) -> int:
        """Bytes of the updates after ``after_seq`` (0: the snapshot too)."""
        check_name(space, "space id")
        state = self._open_state()
        with state.lock:
            sp = state.spaces.get(space) or _Space()
            at = max(after_seq - sp.snapshot_seq, 0)
            size = sum(map(len, sp.updates[at:]))
            if after_seq == 0:
                size += sum(map(len, sp.parts))
        return size

    def index_count(self, space: str, map_name: str) -> int:
        """Rows of one map of ``space``'s index."""
        check_name(space, "space id")
        state = self._open_state()
        with state.lock:
            return sum(1 for _, m, _ in state.index.get(space, {}) if m == map_name)

    def index_held(self, space: str, keys: Sequence[tuple[str, str]]) -> dict[IndexKey, str]:
        """Of these (map, key) pairs, those with a row, and its entry's account."""
        check_name(space, "space id")
        state = self._open_state()
        with state.lock:
            rows = state.index.get(space, {})
            return {
                (space, m, k): rows[(space, m, k)].account for m, k in keys if (space, m, k) in rows
            }

    def index_related(self, space: str, targets: Sequence[str] | None) -> list[IndexRow]:
        """Shown edit, deletion and reaction rows about ``targets`` (None: about any)."""
        wanted = None if targets is None else set(targets)
        return [
            r
            for r in self._index_rows(space)
            if r.map != "m" and not r.reason and (wanted is None or r.target in wanted)
        ]

    def index_rejected(self, space: str) -> list[IndexRow]:
        """Hidden rows of ``space``, in key order."""
        return sorted(
            (r for r in self._index_rows(space) if r.reason), key=lambda r: (r.map, r.key)
        )

    def index_by_device(self, space: str, device: str) -> list[IndexRow]:
        """Rows of ``space`` naming ``device``, in (map, key) order."""
        rows = [row for row in self._index_rows(space) if row.device == device]
        return sorted(rows, key=lambda row: (row.map, row.key))

    def index_keys_by_device(self, space: str, device: str) -> list[tuple[str, str]]:
        """(map, key) of the shown rows of ``space`` naming ``device``."""
        rows = self.index_by_device(space, device)
        return [(row.map, row.key) for row in rows if not row.reason]

    def index_authors(self, space: str) -> dict[str, str]:
        """Per device, its newest ``ts`` in the message map."""
        newest: dict[str, str] = {}
        for row in self._index_rows(space):
            if row.map == "m" and row.device and row.ts > newest.get(row.device, ""):
                newest[row.device] = row.ts
        return newest

    def compact(self, space: str, parts: Sequence[bytes], upto_seq: int) -> None:
        """Replace the snapshot and updates with seq <= ``upto_seq`` by ``parts``; later
        updates stay."""
        check_name(space, "space id")
        data = check_parts(parts)
        check_seq(upto_seq, "upto_seq")
        state = self._open_state()
        with state.lock:
            sp = state.spaces.get(space) or _Space()
            check_compact(sp.snapshot_seq, sp.last_seq, upto_seq, space)
            del sp.updates[: upto_seq - sp.snapshot_seq]
            sp.parts = data
            sp.snapshot_seq = upto_seq
            state.spaces[space] = sp

    def close(self) -> None:
        """Make this handle unusable (idempotent); the state survives for :meth:`reopen`."""
        self._closed = True

    def __enter__(self) -> MemoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
