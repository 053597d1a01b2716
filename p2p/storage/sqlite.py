"""The SQLite store: the default, durable :class:`~p2p.storage.base.Store`.

Layout (schema version :data:`SCHEMA_VERSION`, kept in ``PRAGMA user_version``)::

    records(name TEXT PRIMARY KEY, value BLOB)
    updates(space TEXT, seq INTEGER, data BLOB, PRIMARY KEY (space, seq)) WITHOUT ROWID
    snapshots(space TEXT, part INTEGER, seq INTEGER, data BLOB, PRIMARY KEY (space, part))
    entries(space, map, key, id, kind, account, device, ts, target, body, sig, reason:
            all TEXT, UNIQUE (space, map, key))          -- the message index
    entries_shown  ON entries (space, map, reason, kind, ts, device, id)
    entries_target ON entries (space, target) WHERE target != ''
    entries_hidden ON entries (space, map, key) WHERE reason != ''

``updates`` is WITHOUT ROWID so that the rows of one space sit together in primary-key
order: loading a space's tail is one range scan, with no sort and no second lookup.

``snapshots`` holds each space's snapshot as parts numbered 0..n-1, applied in that
order, whose merge is the full state of every update up to ``seq``: every part of a
space has the same ``seq``, and parts are numbered without gaps (both checked when read;
anything else is :class:`~p2p.errors.StoreCorrupt`). The node writes parts of at most
``p2p.storage.base.SNAPSHOT_PART`` bytes, so a reader holds one part at a time
(``snapshot_part``), never a whole chat's snapshot. It is a rowid table (with the
primary key as an index): its rows are large, and ``seq`` comes before ``data`` so that
reading it does not read the blob.

``entries`` is the message index (``p2p.storage.base.IndexRow``), written in the same
transaction as the update that changed it. ``entries_shown`` serves "the last N messages
before X" as one backward range scan in display order; ``entries_target`` finds the
edits, deletions and reactions of the messages on a page (partial: messages, most of
the rows, have no target); the partial index
``entries_hidden`` lists hidden entries without reading the shown ones. Schema version 1
(no index) is migrated on open: the table is created empty, and
``p2p.state.device.DeviceState.load`` fills it for every space without an ``indexed/<space>``
record. Schema versions 1 and 2 (one snapshot row per space, ``snapshots(space TEXT
PRIMARY KEY, seq, data)``) are migrated on open, in one transaction: each snapshot
becomes part 0 of its space, one large part that still loads and is sent as before,
until the next compaction writes bounded parts.

Durability: WAL journal, ``synchronous=FULL`` by default, and every ``write`` and
``compact`` is a single ``BEGIN IMMEDIATE ... COMMIT``. With FULL, SQLite syncs the WAL
before COMMIT returns, so an acknowledged write survives a crash of the process *and* of
the machine. ``synchronous="NORMAL"`` is faster and still survives a killed process, but
may lose the last commits on power loss; only use it where that is acceptable.

Bad input: the file on disk is input too. Opening refuses, with
:class:`~p2p.errors.StoreCorrupt` naming the path, a file that is not SQLite, a database
of another schema version or without our tables, and one that fails ``quick_check``.
Values read back are type-checked, a space's log must be contiguous, and its snapshot's
parts must state one seq and be numbered without a gap. No raw
``sqlite3`` exception ever leaves this module: they become :class:`~p2p.errors.StoreError`.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Final

from p2p.errors import StoreCorrupt, StoreError
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
from p2p.storage.memory import (
    INDEX_TEXT,
    check_batch,
    check_compact,
    check_name,
    check_parts,
    check_seq,
    checked_change,
    index_values,
)
from p2p.storage.transaction import write_transaction

SCHEMA_VERSION: Final = 3
"""Bump on any change to the tables below (and teach :class:`SqliteStore` to migrate)."""

_INDEX_SCHEMA: Final = (
    "CREATE TABLE entries (space TEXT NOT NULL, map TEXT NOT NULL, key TEXT NOT NULL,"
    " id TEXT NOT NULL, kind TEXT NOT NULL, account TEXT NOT NULL, device TEXT NOT NULL,"
    " ts TEXT NOT NULL, target TEXT NOT NULL, body TEXT NOT NULL, sig TEXT NOT NULL,"
    " reason TEXT NOT NULL, UNIQUE (space, map, key))",
    "CREATE INDEX entries_shown ON entries (space, map, reason, kind, ts, device, id)",
    "CREATE INDEX entries_target ON entries (space, target) WHERE target != ''",
    "CREATE INDEX entries_hidden ON entries (space, map, key) WHERE reason != ''",
)
"""Added by version 2 (see :meth:`SqliteStore._migrate`)."""
_SNAPSHOTS_SCHEMA: Final = (
    "CREATE TABLE snapshots (space TEXT NOT NULL, part INTEGER NOT NULL,"
    " seq INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY (space, part))"
)
"""Version 3: a snapshot in parts (see :meth:`SqliteStore._migrate`)."""
_COLUMNS_V1: Final = {
    "records": ["name", "value"],
    "updates": ["space", "seq", "data"],
    "snapshots": ["space", "seq", "data"],
}
_INDEX_COLUMNS: Final = ", ".join(INDEX_TEXT)
_UPSERT_INDEX: Final = (
    f"INSERT INTO entries ({_INDEX_COLUMNS}) VALUES ({', '.join('?' * len(INDEX_TEXT))})"
    " ON CONFLICT (space, map, key) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in INDEX_TEXT[3:])
)
_ONLY_TEXT: Final = {str}
_RELATED_CHUNK: Final = 500
"""Targets per ``index_related`` query (SQLite bounds the parameters of a statement)."""

_SCHEMA: Final = (
    "CREATE TABLE records (name TEXT PRIMARY KEY NOT NULL, value BLOB NOT NULL)",
    "CREATE TABLE updates (space TEXT NOT NULL, seq INTEGER NOT NULL, data BLOB NOT NULL,"
    " PRIMARY KEY (space, seq)) WITHOUT ROWID",
    _SNAPSHOTS_SCHEMA,
    *_INDEX_SCHEMA,
)
_COLUMNS_V2: Final = {**_COLUMNS_V1, "entries": list(INDEX_TEXT)}
_COLUMNS: Final = {**_COLUMNS_V2, "snapshots": ["space", "part", "seq", "data"]}
_COLUMNS_OF: Final = {1: _COLUMNS_V1, 2: _COLUMNS_V2, SCHEMA_VERSION: _COLUMNS}
"""The tables of each schema version that still opens (the older ones are migrated)."""
_SYNCHRONOUS: Final = frozenset({"OFF", "NORMAL", "FULL", "EXTRA"})
_BUSY_TIMEOUT: Final = 5.0
"""Seconds to wait for another connection's lock before giving up with StoreError."""
_CORRUPT_CODES: Final = frozenset({11, 26})  # SQLITE_CORRUPT, SQLITE_NOTADB

# The last seq of a space: its snapshot may cover more than its remaining updates (after
# a full compaction there are none left), so take the larger of the two. Plain ``?``
# placeholders: numbered ones with a tuple warn from Python 3.12 and fail from 3.14.
_LAST_SEQ_SQL: Final = (
    "SELECT max(coalesce((SELECT max(seq) FROM updates WHERE space = ?), 0),"
    " coalesce((SELECT max(seq) FROM snapshots WHERE space = ?), 0))"
)

# Distinct spaces of ``updates`` by skip-scan: jump from one space to the next through the
# primary key instead of reading every update (0.1 ms instead of 14 ms at 100k updates).
_SPACES_SQL: Final = (
    "WITH RECURSIVE s(space) AS ("
    " SELECT min(space) FROM updates"
    " UNION ALL"
    " SELECT (SELECT min(space) FROM updates WHERE space > s.space) FROM s"
    " WHERE s.space IS NOT NULL)"
    " SELECT space FROM s WHERE space IS NOT NULL"
    " UNION SELECT space FROM snapshots ORDER BY 1"
)


_ACCESS_CODES: Final = frozenset({3, 8, 14, 23})
"""SQLITE_PERM, SQLITE_READONLY, SQLITE_CANTOPEN, SQLITE_AUTH: the file or its folder
cannot be used by this user (SQLite's own text, "unable to open database file", does
not say what to check)."""


def _access_hint(error: sqlite3.Error) -> str:
    code = getattr(error, "sqlite_errorcode", None)
    if isinstance(code, int) and (code & 0xFF) in _ACCESS_CODES:
        return " (check that it is a file this user may read and write, in a folder it may write)"
    return ""


def _is_corrupt(error: sqlite3.Error) -> bool:
    """Whether SQLite says the file's content is bad (as opposed to busy, full, I/O...)."""
    code = getattr(error, "sqlite_errorcode", None)
    return isinstance(code, int) and (code & 0xFF) in _CORRUPT_CODES


class SqliteStore(MessagePages):
    """A :class:`~p2p.storage.base.Store` in one SQLite file (plus its ``-wal``/``-shm``).

    One connection, shared by the threads the node runs its storage calls in
    (``check_same_thread=False``), serialized by a lock: SQLite connections are not safe
    to use from two threads at once, and one writer at a time is all a node needs.
    """

    def __init__(self, path: str | os.PathLike[str], *, synchronous: str = "FULL") -> None:
        self._path = os.fspath(path)
        sync = synchronous.upper() if isinstance(synchronous, str) else ""
        if sync not in _SYNCHRONOUS:
            raise StoreError(
                f"synchronous must be one of {sorted(_SYNCHRONOUS)}, not {synchronous!r}"
            )
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = self._open(sync)

    @property
    def path(self) -> str:
        """The database file this store lives in."""
        return self._path

    def __repr__(self) -> str:
        state = "closed" if self._conn is None else "open"
        return f"SqliteStore({self._path!r}, {state})"

    # --- opening ----------------------------------------------------------------------

    def _open(self, synchronous: str) -> sqlite3.Connection:
        try:
            # isolation_level=None: the sqlite3 module must not open transactions behind
            # our back; write() and compact() say BEGIN IMMEDIATE / COMMIT themselves.
            conn = sqlite3.connect(
                self._path,
                timeout=_BUSY_TIMEOUT,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as e:
            raise StoreError(f"cannot open store {self._path}: {e}{_access_hint(e)}") from e
        try:
            with self._errors("open"):
                self._prepare(conn, synchronous)
        except BaseException:
            conn.close()
            raise
        return conn

    def _prepare(self, conn: sqlite3.Connection, synchronous: str) -> None:
        """Check (or create) the schema, verify the file, then set WAL and sync level.

        Checks come before anything that writes, so that opening a file that is not ours
        never modifies it.
        """
        # A crafted file could hold views or triggers calling SQL functions; we never
        # want them to run with side effects.
        conn.execute("PRAGMA trusted_schema = OFF")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        objects = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if version == 0 and objects == 0:
            self._set_wal(conn)
            self._create(conn)
        else:
            self._check_schema(conn, version)
            self._quick_check(conn)
            self._set_wal(conn)
            if version != SCHEMA_VERSION:
                self._migrate(conn)
        conn.execute(f"PRAGMA synchronous = {synchronous}")  # one of _SYNCHRONOUS

    def _set_wal(self, conn: sqlite3.Connection) -> None:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"cannot use WAL journal mode for {self._path} (got {mode!r})")

    def _create(self, conn: sqlite3.Connection) -> None:
        with write_transaction(conn):
            # Another process may have created the schema since we looked: look again
            # now that we hold the write lock.
            if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self._check_schema(conn, conn.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Bring a version 1 or 2 store to :data:`SCHEMA_VERSION`, in one transaction.

        1 -> 2: add the (empty) message index; ``DeviceState.load`` then builds each
        space's rows from its CRDT, once. 2 -> 3: snapshots in parts; each space's one
        snapshot row becomes its part 0 (SQLite cannot change a primary key in place,
        so the table is copied; SQLite moves the blobs, Python never holds one). A
        crash before COMMIT leaves the old version, migrated again at the next open.
        """
        with write_transaction(conn):
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 1:  # not raced: another process may have migrated meanwhile
                for statement in _INDEX_SCHEMA:
                    conn.execute(statement)
            if version in (1, 2):
                conn.execute("ALTER TABLE snapshots RENAME TO snapshots_v2")
                conn.execute(_SNAPSHOTS_SCHEMA)
                conn.execute(
                    "INSERT INTO snapshots (space, part, seq, data)"
                    " SELECT space, 0, seq, data FROM snapshots_v2"
                )
                conn.execute("DROP TABLE snapshots_v2")
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self._check_schema(conn, conn.execute("PRAGMA user_version").fetchone()[0])

    def _check_schema(self, conn: sqlite3.Connection, version: object) -> None:
        if version not in _COLUMNS_OF:
            raise StoreCorrupt(
                f"{self._path}: schema version {version!r}, expected {SCHEMA_VERSION}"
                " (not a p2p store, or one written by another version of p2p)"
            )
        kinds: dict[str, str] = {
            name: kind
            for kind, name in conn.execute("SELECT type, name FROM sqlite_master").fetchall()
        }
        for table, columns in _COLUMNS_OF[version].items():
            if kinds.get(table) != "table":
                raise StoreCorrupt(f"{self._path}: table {table!r} is missing")
            found = [row[1] for row in conn.execute(f"PRAGMA table_info({table})").fetchall()]
            if found != columns:
                raise StoreCorrupt(
                    f"{self._path}: table {table!r} has columns {found}, expected {columns}"
                )
        foreign = sorted(name for name, kind in kinds.items() if kind in ("view", "trigger"))
        if foreign:
            raise StoreCorrupt(f"{self._path}: unexpected views or triggers {foreign}")

    def _quick_check(self, conn: sqlite3.Connection) -> None:
        # quick_check reads every page (O(size of the file)) but skips the costly
        # index-vs-table cross checks of integrity_check; it catches truncated and
        # overwritten pages, which is what crashes and bad disks produce.
        problems = [row[0] for row in conn.execute("PRAGMA quick_check(5)").fetchall()]
        if problems != ["ok"]:
            raise StoreCorrupt(f"{self._path}: integrity check failed: {'; '.join(problems)}")

    # --- plumbing ---------------------------------------------------------------------

    @contextmanager
    def _errors(self, operation: str) -> Iterator[None]:
        """Turn any sqlite3 error into StoreError, StoreCorrupt when the file is bad.

        "Bad" is SQLite's own verdict (SQLITE_CORRUPT, SQLITE_NOTADB): a busy lock, a full
        disk or a missing directory are problems of their own, not corruption.
        """
        try:
            yield
        except sqlite3.Error as e:
            if _is_corrupt(e):
                raise StoreCorrupt(f"{self._path}: not a usable p2p store: {e}") from e
            raise StoreError(
                f"{operation} failed on store {self._path}: {e}{_access_hint(e)}"
            ) from e

    @contextmanager
    def _session(self, operation: str) -> Iterator[sqlite3.Connection]:
        """The open connection, held under the lock, with sqlite3 errors translated."""
        with self._lock:
            if self._conn is None:
                raise StoreError(f"{operation} on closed store {self._path}")
            with self._errors(operation):
                yield self._conn

    @contextmanager
    def _transaction(self, operation: str) -> Iterator[sqlite3.Connection]:
        """The open connection in a write transaction (:func:`write_transaction`): the
        seq numbers we read inside it cannot be taken by another connection first."""
        with self._session(operation) as conn, write_transaction(conn):
            yield conn

    # --- the Store interface ------------------------------------------------------------

    def get(self, name: str) -> bytes | None:
        """The record called ``name``, or None."""
        check_name(name)
        with self._session("get") as conn:
            row = conn.execute("SELECT value FROM records WHERE name = ?", (name,)).fetchone()
        if row is None:
            return None
        return self._blob(row[0], f"record {name!r}")

    def names(self, prefix: str) -> list[str]:
        """Names of every record starting with ``prefix``, sorted.

        Scans the primary key from ``prefix`` on and stops at the first name past it, so
        the cost is the number of matches, not of records. (SQLite's BINARY collation
        orders UTF-8 bytes, which is code point order, the same as Python's.)
        """
        check_name(prefix, "prefix", allow_empty=True)
        found: list[str] = []
        with self._session("names") as conn:
            cursor = conn.execute(
                "SELECT name FROM records WHERE name >= ? ORDER BY name", (prefix,)
            )
            for (name,) in cursor:
                if not isinstance(name, str):
                    raise StoreCorrupt(f"{self._path}: record name {name!r} is not text")
                if not name.startswith(prefix):
                    break
                found.append(name)
            cursor.close()
        return found

    def write(self, batch: WriteBatch) -> None:
        """Apply ``batch`` in one transaction; durable when this returns.

        Each update gets the next seq of its space: one past the larger of the space's
        last update and its snapshot, read inside the transaction.
        """
        checked = check_batch(batch)
        with self._transaction("write") as conn:
            if checked.records:
                conn.executemany(
                    "INSERT INTO records (name, value) VALUES (?, ?)"
                    " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                    checked.records.items(),
                )
            if checked.deletes:  # after records: a name in both ends up deleted
                conn.executemany(
                    "DELETE FROM records WHERE name = ?", [(n,) for n in checked.deletes]
                )
            if checked.appends:
                last: dict[str, int] = {}
                rows: list[tuple[str, int, bytes]] = []
                for space, update in checked.appends:
                    if space not in last:
                        last[space] = self._last_seq(conn, space)
                    last[space] += 1
                    rows.append((space, last[space], update))
                conn.executemany("INSERT INTO updates (space, seq, data) VALUES (?, ?, ?)", rows)
            if checked.index:  # same transaction: the index never disagrees with the log
                gone = [key for key, row in checked.index.items() if row is None]
                conn.executemany(
                    "DELETE FROM entries WHERE space = ? AND map = ? AND key = ?", gone
                )
                conn.executemany(
                    _UPSERT_INDEX,
                    [index_values(row) for row in checked.index.values() if row is not None],
                )

    def update_records(self, names: Sequence[str], change: RecordChange) -> dict[str, bytes]:
        """Read ``names`` and write what ``change`` makes of them in one BEGIN IMMEDIATE
        transaction: the write lock is held from the read on, so another connection
        (another process on the same file) reads what this one wrote, never the same
        old values."""
        wanted = [check_name(name) for name in names]
        with self._transaction("update_records") as conn:
            current: dict[str, bytes | None] = {}
            for name in wanted:
                row = conn.execute("SELECT value FROM records WHERE name = ?", (name,)).fetchone()
                current[name] = None if row is None else self._blob(row[0], f"record {name!r}")
            new = checked_change(change, current)
            conn.executemany(
                "INSERT INTO records (name, value) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                new.items(),
            )
        return new

    def spaces(self) -> list[str]:
        """Ids of every space with a snapshot or at least one update, sorted."""
        with self._session("spaces") as conn:
            rows = conn.execute(_SPACES_SQL).fetchall()
        spaces = [row[0] for row in rows]
        for space in spaces:
            if not isinstance(space, str):
                raise StoreCorrupt(f"{self._path}: space id {space!r} is not text")
        return spaces

    def load_space(self, space: str) -> SpaceLog:
        """The snapshot and the tail of updates of ``space`` (empty log if unknown).

        One range scan of the primary key in seq order, fetching only the blobs, and
        ``fetchall``: that is about as fast as the sqlite3 module hands rows over, and
        it is what keeps opening a long history quick (see the module docstring).
        """
        check_name(space, "space id")
        with self._session("load_space") as conn:
            snapshot_seq = self._snapshot_seq(conn, space)
            parts = conn.execute(
                "SELECT data FROM snapshots WHERE space = ? ORDER BY part", (space,)
            ).fetchall()
            rows = conn.execute(
                "SELECT data FROM updates WHERE space = ? AND seq > ? ORDER BY seq",
                (space, snapshot_seq),
            ).fetchall()
            last_seq = self._last_seq(conn, space)
        snapshot_parts = [
            self._blob(data, f"part {i} of the snapshot of space {space!r}")
            for i, (data,) in enumerate(parts)
        ]
        updates = [row[0] for row in rows]
        # seqs are unique integers above snapshot_seq, so "last - snapshot == count" means
        # the tail is exactly snapshot_seq+1 .. last_seq. A gap would silently drop
        # messages: that is corruption, not something to paper over.
        if last_seq - snapshot_seq != len(updates):
            raise StoreCorrupt(
                f"{self._path}: the update log of space {space!r} has gaps"
                f" ({len(updates)} updates between seq {snapshot_seq} and {last_seq})"
            )
        if not all(type(data) is bytes for data in updates):
            raise StoreCorrupt(f"{self._path}: space {space!r} holds updates that are not blobs")
        return SpaceLog(
            snapshot_parts=snapshot_parts,
            snapshot_seq=snapshot_seq,
            updates=updates,
            last_seq=last_seq,
        )

    def log_seqs(self, space: str) -> tuple[int, int]:
        """(snapshot seq, last seq) of ``space`` from the primary keys, no blob read."""
        check_name(space, "space id")
        with self._session("log_seqs") as conn:
            return self._snapshot_seq(conn, space), self._last_seq(conn, space)

    def _message_page(
        self, space: str, last: int | None, before: Cursor | None, files_only: bool
    ) -> list[IndexRow]:
        """Shown message rows in display order (the last ``last`` before ``before``).

        One range scan of ``entries_shown``, backwards from ``before`` when ``last`` is
        given: the cost is the page, not the chat.
        """
        check_name(space, "space id")
        kinds = "('file')" if files_only else "('msg', 'file')"
        where = f"space = ? AND map = 'm' AND reason = '' AND kind IN {kinds}"
        params: list[Any] = [space]
        if before is not None:
            where += " AND (ts, device, id) < (?, ?, ?)"
            params.extend(before)
        sql = f"SELECT {_INDEX_COLUMNS} FROM entries WHERE {where}"
        if last is None:
            sql += " ORDER BY ts, device, id"
        else:
            sql += " ORDER BY ts DESC, device DESC, id DESC LIMIT ?"
            params.append(last)
        with self._session("index_messages") as conn:
            rows = conn.execute(sql, params).fetchall()
        if last is not None:
            rows.reverse()
        return [self._index_row(row) for row in rows]

    def index_related(self, space: str, targets: Sequence[str] | None) -> list[IndexRow]:
        """Shown edit, deletion and reaction rows about ``targets`` (None: about any)."""
        check_name(space, "space id")
        base = (
            f"SELECT {_INDEX_COLUMNS} FROM entries"
            " WHERE space = ? AND map != 'm' AND reason = '' AND target != ''"
        )
        with self._session("index_related") as conn:
            if targets is None:
                rows = conn.execute(base, (space,)).fetchall()
            else:
                wanted = list(targets)
                rows = []
                for at in range(0, len(wanted), _RELATED_CHUNK):
                    chunk = wanted[at : at + _RELATED_CHUNK]
                    marks = ", ".join("?" * len(chunk))
                    rows += conn.execute(
                        f"{base} AND target IN ({marks})", (space, *chunk)
                    ).fetchall()
        return [self._index_row(row) for row in rows]

    def space_rows(self, space: str, after_seq: int, limit: int) -> list[tuple[int, bytes]]:
        """Up to ``limit`` updates after ``after_seq``, in seq order."""
        check_name(space, "space id")
        with self._session("space_rows") as conn:
            rows = conn.execute(
                "SELECT seq, data FROM updates WHERE space = ? AND seq > ? ORDER BY seq LIMIT ?",
                (space, after_seq, limit),
            ).fetchall()
        return [(seq, self._blob(data, f"update of space {space!r}")) for seq, data in rows]

    def snapshot_part(self, space: str, part: int) -> tuple[int, bytes] | None:
        """(seq covered, snapshot part ``part``), or None past the last part: one row
        read by its primary key. The first part (and the end) check every part's seq
        and numbering first (:meth:`_snapshot_seq`, no blob read), so that a reader
        taking the parts in order meets a bad snapshot before it sends any of it."""
        check_name(space, "space id")
        check_seq(part, "part")
        with self._session("snapshot_part") as conn:
            row = conn.execute(
                "SELECT seq, data FROM snapshots WHERE space = ? AND part = ?", (space, part)
            ).fetchone()
            if part == 0 or row is None:
                self._snapshot_seq(conn, space)
        if row is None:
            return None
        seq, data = row
        if type(seq) is not int or seq < 1:
            raise StoreCorrupt(f"{self._path}: space {space!r} has snapshot seq {seq!r}")
        return seq, self._blob(data, f"part {part} of the snapshot of space {space!r}")

    def space_bytes(self, space: str, after_seq: int) -> int:
        """Bytes of the updates after ``after_seq`` (0: the snapshot too), summed by
        SQLite from the rows' lengths (no blob is read)."""
        check_name(space, "space id")
        with self._session("space_bytes") as conn:
            (size,) = conn.execute(
                "SELECT coalesce(sum(length(data)), 0) FROM updates WHERE space = ? AND seq > ?",
                (space, after_seq),
            ).fetchone()
            if after_seq == 0:
                (snap,) = conn.execute(
                    "SELECT coalesce(sum(length(data)), 0) FROM snapshots WHERE space = ?",
                    (space,),
                ).fetchone()
                size += snap
        return int(size)

    def index_count(self, space: str, map_name: str) -> int:
        """Rows of one map of ``space``'s index (counted on its primary key)."""
        check_name(space, "space id")
        with self._session("index_count") as conn:
            (count,) = conn.execute(
                "SELECT count(*) FROM entries WHERE space = ? AND map = ?", (space, map_name)
            ).fetchone()
        return int(count)

    def index_held(self, space: str, keys: Sequence[tuple[str, str]]) -> dict[IndexKey, str]:
        """Of these (map, key) pairs, those with a row, and its entry's account. One
        query per map and chunk, ``map = ? AND key IN (...)``: a row-value ``IN`` would
        search by space only (a scan of the whole chat's rows per query)."""
        check_name(space, "space id")
        by_map: dict[str, list[str]] = {}
        for map_name, key in keys:
            by_map.setdefault(map_name, []).append(key)
        held: dict[IndexKey, str] = {}
        with self._session("index_held") as conn:
            for map_name, wanted in by_map.items():
                for at in range(0, len(wanted), _RELATED_CHUNK):
                    chunk = wanted[at : at + _RELATED_CHUNK]
                    marks = ", ".join("?" * len(chunk))
                    for key, account in conn.execute(
                        "SELECT key, account FROM entries WHERE space = ? AND map = ?"
                        f" AND key IN ({marks})",
                        (space, map_name, *chunk),
                    ):
                        held[(space, map_name, key)] = account
        return held

    def index_rejected(self, space: str) -> list[IndexRow]:
        """Hidden rows of ``space``, in key order."""
        check_name(space, "space id")
        with self._session("index_rejected") as conn:
            rows = conn.execute(
                f"SELECT {_INDEX_COLUMNS} FROM entries WHERE space = ? AND reason != ''"
                " ORDER BY map, key",
                (space,),
            ).fetchall()
        return [self._index_row(row) for row in rows]

    def index_by_device(self, space: str, device: str) -> list[IndexRow]:
        """Rows of ``space`` naming ``device``, in (map, key) order (one pass over the
        space's rows in the primary key)."""
        check_name(space, "space id")
        with self._session("index_by_device") as conn:
            rows = conn.execute(
                f"SELECT {_INDEX_COLUMNS} FROM entries WHERE space = ? AND device = ?"
                " ORDER BY map, key",
                (space, device),
            ).fetchall()
        return [self._index_row(row) for row in rows]

    def index_keys_by_device(self, space: str, device: str) -> list[tuple[str, str]]:
        """(map, key) of the shown rows of ``space`` naming ``device`` (one pass over the
        space's rows; two columns, no row built)."""
        check_name(space, "space id")
        with self._session("index_keys_by_device") as conn:
            rows = conn.execute(
                "SELECT map, key FROM entries WHERE space = ? AND device = ? AND reason = ''",
                (space, device),
            ).fetchall()
        if any(set(map(type, row)) != _ONLY_TEXT for row in rows):
            raise StoreCorrupt(f"{self._path}: index rows of {space!r} hold non-text values")
        return [(m, k) for m, k in rows]

    def index_authors(self, space: str) -> dict[str, str]:
        """Per device, its newest ``ts`` in the message map (one pass over an index)."""
        check_name(space, "space id")
        with self._session("index_authors") as conn:
            rows = conn.execute(
                "SELECT device, max(ts) FROM entries WHERE space = ? AND map = 'm'"
                " AND device != '' GROUP BY device",
                (space,),
            ).fetchall()
        if any(set(map(type, row)) != _ONLY_TEXT for row in rows):
            raise StoreCorrupt(f"{self._path}: index rows of {space!r} hold non-text values")
        return dict(rows)

    def compact(self, space: str, parts: Sequence[bytes], upto_seq: int) -> None:
        """Replace the snapshot and updates with seq <= ``upto_seq`` by a snapshot of
        ``parts``, in one transaction.

        Deleting the updates and the old parts and writing the new ones commit together,
        so a crash leaves either the old log or the new snapshot, never a snapshot
        missing its updates or parts of two snapshots.
        """
        check_name(space, "space id")
        data = check_parts(parts)
        check_seq(upto_seq, "upto_seq")
        with self._transaction("compact") as conn:
            snapshot_seq = self._snapshot_seq(conn, space)
            check_compact(snapshot_seq, self._last_seq(conn, space), upto_seq, space)
            conn.execute("DELETE FROM updates WHERE space = ? AND seq <= ?", (space, upto_seq))
            conn.execute("DELETE FROM snapshots WHERE space = ?", (space,))
            conn.executemany(
                "INSERT INTO snapshots (space, part, seq, data) VALUES (?, ?, ?, ?)",
                [(space, i, upto_seq, part) for i, part in enumerate(data)],
            )

    def close(self) -> None:
        """Close the connection (idempotent); SQLite checkpoints the WAL into the file."""
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is None:
                return
            with self._errors("close"):
                conn.close()

    def __enter__(self) -> SqliteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- helpers ------------------------------------------------------------------------

    def _last_seq(self, conn: sqlite3.Connection, space: str) -> int:
        """Last seq of ``space`` (0 if none), read from the database, not cached.

        Reading it inside the caller's transaction keeps numbering right even if some
        other connection (a second process opened on the same file) appended meanwhile.
        """
        value = conn.execute(_LAST_SEQ_SQL, (space, space)).fetchone()[0]
        if type(value) is not int:
            raise StoreCorrupt(f"{self._path}: space {space!r} has a non-integer seq {value!r}")
        return value

    def _snapshot_seq(self, conn: sqlite3.Connection, space: str) -> int:
        """The seq ``space``'s snapshot covers (0 without one), read from the parts'
        primary keys and seqs, no blob read; StoreCorrupt unless every part states the
        same seq and they are numbered 0..n-1 without a gap (a missing part would
        silently drop messages, as a gap in the log would)."""
        count, numbered, first, last, low, high = conn.execute(
            "SELECT count(*), coalesce(sum(typeof(part) = 'integer'), 0), min(part),"
            " max(part), min(seq), max(seq) FROM snapshots WHERE space = ?",
            (space,),
        ).fetchone()
        if count == 0:
            return 0
        # integer parts are unique (the primary key): from 0 to count - 1 means all there
        if numbered != count or (first, last) != (0, count - 1):
            raise StoreCorrupt(
                f"{self._path}: the snapshot of space {space!r} has parts missing"
                f" ({count} parts numbered {first!r} to {last!r})"
            )
        if type(low) is not int or low != high or low < 1:
            raise StoreCorrupt(
                f"{self._path}: the snapshot parts of space {space!r} disagree on the seq"
                f" they cover ({low!r} to {high!r})"
            )
        return low

    def _index_row(self, row: tuple[object, ...]) -> IndexRow:
        """An index row read back; StoreCorrupt if the file was edited into nonsense."""
        if len(row) != len(INDEX_TEXT) or set(map(type, row)) != _ONLY_TEXT:
            raise StoreCorrupt(
                f"{self._path}: index row {row[:3]!r} holds values that are not text"
            )
        if row[1] not in INDEXED_MAPS:
            raise StoreCorrupt(f"{self._path}: index row {row[:3]!r} names no chat map")
        return IndexRow(**dict(zip(INDEX_TEXT, row, strict=True)))  # type: ignore[arg-type]

    def _blob(self, value: object, what: str) -> bytes:
        """``value`` if SQLite handed back bytes; text or numbers mean the file was edited."""
        if type(value) is not bytes:
            raise StoreCorrupt(f"{self._path}: {what} is {type(value).__name__}, not a blob")
        return value
