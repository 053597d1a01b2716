"""The device's blob store: encrypted chunks by hash, the files it knows, media settings.

One SQLite file, ``<home>/media.db``, beside the chat store (``p2p.db``) and apart from
it: chunks are large, come and go (quota, eviction), and never take part in a chat
store transaction. Tables (schema version in ``PRAGMA user_version``)::

    chunks(hash BLOB PRIMARY KEY, data BLOB, own INTEGER, used INTEGER)
    files(id TEXT PRIMARY KEY, descriptor TEXT, state TEXT, plain BLOB)
    settings(name TEXT PRIMARY KEY, value TEXT)

- A chunk is stored once, however many messages reference it (content addressing).
  ``own`` chunks (files this device sent) are never evicted; fetched ones are, least
  recently ``used`` first, when the quota is exceeded (and can be fetched again).
- Every chunk read is checked against its hash before it is served or opened: a row
  damaged on disk is deleted and reported (:class:`~p2p.errors.BlobCorrupt`), never
  passed on. Writes are one transaction each in WAL mode, so a SIGKILL leaves whole
  chunks or none: there is no torn chunk to serve. Own chunks are written with
  ``synchronous=FULL`` (they exist nowhere else); fetched ones with ``NORMAL``, which
  survives a killed process and may lose the last commits on power loss: those chunks
  are simply fetched again (measured: 1.2 ms instead of 2.9 ms per 256 KiB chunk).
- ``files.state``: ``own`` (sent from here), ``want`` (to fetch), ``done`` (fetched),
  ``idle`` (known, not wanted: fetch on demand, or evicted). ``plain`` is a keyed hash of
  an own file's plaintext, so sending the same file again reuses its chunks.

Opening refuses a file that is not ours (:class:`~p2p.errors.StoreCorrupt`); no raw
``sqlite3`` error leaves this module.
"""

from __future__ import annotations

import hmac
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final, Literal

from p2p.errors import BlobCorrupt, ChunkTampered, StoreCorrupt, StoreError
from p2p.media.descriptor import HASH_SIZE, chunk_hash
from p2p.storage.transaction import write_transaction

SCHEMA_VERSION: Final = 1
FILE_NAME: Final = "media.db"
_SCHEMA: Final = (
    "CREATE TABLE chunks (hash BLOB PRIMARY KEY NOT NULL, data BLOB NOT NULL,"
    " own INTEGER NOT NULL, used INTEGER NOT NULL)",
    "CREATE INDEX chunks_lru ON chunks (own, used)",
    "CREATE TABLE files (id TEXT PRIMARY KEY NOT NULL, descriptor TEXT NOT NULL,"
    " state TEXT NOT NULL, plain BLOB)",
    "CREATE INDEX files_plain ON files (plain)",
    "CREATE TABLE settings (name TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL)",
)
_TABLES: Final = {"chunks", "files", "settings"}
FileState = Literal["own", "want", "done", "idle"]
_STATES: Final = frozenset({"own", "want", "done", "idle"})


class BlobStore:
    """Chunks, files and settings of one device; see the module docstring.

    Two connections on a file: reads (served chunks, presence checks) run on the trio
    thread on their own connection and never wait behind a write's fsync (WAL lets them
    read the last commit); writes run in worker threads. In memory (``path=None``, for
    nodes on a MemoryStore) there is one connection and everything is inline.
    """

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = None if path is None else os.fspath(path)
        self._wlock = threading.Lock()
        self._rlock = threading.Lock() if path is not None else self._wlock
        self.corrupt = 0
        """Chunks found damaged on disk (and dropped) since opening."""
        self._w = self._connect()
        try:
            self._prepare(self._w)
            self._r = self._connect() if self.path is not None else self._w
        except BaseException:
            self._w.close()
            raise
        try:
            self._secret = self._load_secret()
        except BaseException:
            self.close()
            raise

    @property
    def in_memory(self) -> bool:
        return self.path is None

    def _connect(self) -> sqlite3.Connection:
        try:
            return sqlite3.connect(
                self.path or ":memory:",
                timeout=5.0,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open blob store {self.path}: {exc}") from exc

    def _prepare(self, conn: sqlite3.Connection) -> None:
        with self._errors("open"):
            conn.execute("PRAGMA trusted_schema = OFF")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            names = {
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            }
            others = conn.execute(
                "SELECT count(*) FROM sqlite_master WHERE type IN ('view', 'trigger')"
            ).fetchone()[0]
            if version == 0 and not names:
                # big pages: a 256 KiB chunk is 4 overflow pages, not 64 (4x faster)
                conn.execute("PRAGMA page_size = 65536")
                with write_transaction(conn):
                    for statement in _SCHEMA:
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version != SCHEMA_VERSION or names != _TABLES or others:
                raise StoreCorrupt(f"{self.path} is not a blob store of version {SCHEMA_VERSION}")
            elif conn.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise StoreCorrupt(f"{self.path} fails its integrity check")
            if self.path is not None:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = FULL")

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                raise StoreError(f"blob store {self.path} is busy ({what})") from exc
            raise StoreCorrupt(f"blob store {self.path}: {exc} ({what})") from exc
        except sqlite3.Error as exc:
            raise StoreError(f"blob store {self.path}: {exc} ({what})") from exc

    def _load_secret(self) -> bytes:
        secret = self.setting("secret")
        if secret is None or len(secret) != 64:
            secret = os.urandom(32).hex()
            self.set_setting("secret", secret)
        return bytes.fromhex(secret)

    def close(self) -> None:
        with self._wlock:
            if self._r is not self._w:
                self._r.close()
            self._w.close()

    # ---- chunks --------------------------------------------------------------------

    def put_chunks(
        self,
        chunks: list[tuple[bytes, bytes]],
        *,
        own: bool,
        now_ms: int,
        checked: bool = False,
    ) -> None:
        """Store chunks (hash, ciphertext) in one transaction; ChunkTampered for any
        whose bytes do not hash to its hash (nothing is stored then), unless the caller
        has just ``checked`` them (hashing costs ~1 ms a chunk here). A chunk already
        held is kept (and becomes ``own`` if this write is)."""
        for h, data in chunks:
            if len(h) != HASH_SIZE or not (checked or hmac.compare_digest(chunk_hash(data), h)):
                raise ChunkTampered(h.hex()[:16], "the caller")
        if not chunks:
            return
        with self._wlock, self._errors("put chunks"):
            if self.path is not None:
                self._w.execute(f"PRAGMA synchronous = {'FULL' if own else 'NORMAL'}")
            with write_transaction(self._w):
                self._w.executemany(
                    "INSERT INTO chunks (hash, data, own, used) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (hash) DO UPDATE SET own = max(own, excluded.own),"
                    " used = excluded.used",
                    [(h, data, int(own), now_ms) for h, data in chunks],
                )

    def chunk(self, h: bytes) -> bytes | None:
        """A stored chunk's ciphertext, checked against its hash; None if not held.

        A damaged chunk raises BlobCorrupt once, and is deleted (it can be fetched again).
        """
        with self._rlock, self._errors("read chunk"):
            row = self._r.execute("SELECT data FROM chunks WHERE hash = ?", (h,)).fetchone()
        if row is None:
            return None
        data = row[0]
        if not isinstance(data, bytes) or not hmac.compare_digest(chunk_hash(data), h):
            self.corrupt += 1
            with self._wlock, self._errors("drop corrupt chunk"):
                self._w.execute("DELETE FROM chunks WHERE hash = ?", (h,))
            raise BlobCorrupt(h.hex()[:16])
        return data

    def held(self, hashes: list[bytes] | tuple[bytes, ...]) -> set[bytes]:
        """Which of ``hashes`` are stored (presence only; reads check the bytes)."""
        out: set[bytes] = set()
        with self._rlock, self._errors("presence"):
            for i in range(0, len(hashes), 500):
                part = list(hashes[i : i + 500])
                marks = ",".join("?" * len(part))
                out.update(
                    r[0]
                    for r in self._r.execute(
                        f"SELECT hash FROM chunks WHERE hash IN ({marks})", part
                    )
                )
        return out

    def touch(self, hashes: list[bytes] | tuple[bytes, ...], now_ms: int) -> None:
        """Mark chunks as used now (opened or served): they are evicted last."""
        with self._wlock, self._errors("touch"):
            self._w.executemany(
                "UPDATE chunks SET used = ? WHERE hash = ?", [(now_ms, h) for h in hashes]
            )

    def usage(self) -> tuple[int, int]:
        """Bytes held: (own chunks, fetched chunks)."""
        with self._rlock, self._errors("usage"):
            rows = dict(
                self._r.execute(
                    "SELECT own, coalesce(sum(length(data)), 0) FROM chunks GROUP BY own"
                ).fetchall()
            )
        return int(rows.get(1, 0)), int(rows.get(0, 0))

    def evict(self, quota: int, keep: set[bytes]) -> list[bytes]:
        """Delete fetched (never own) chunks, least recently used first, until fetched
        chunks take at most ``quota`` bytes; ``keep`` is spared. Returns what went."""
        _, fetched = self.usage()
        gone: list[bytes] = []
        if fetched <= quota:
            return gone
        with self._wlock, self._errors("evict"):
            rows = self._w.execute(
                "SELECT hash, length(data) FROM chunks WHERE own = 0 ORDER BY used, hash"
            ).fetchall()
            for h, size in rows:
                if fetched <= quota:
                    break
                if h in keep:
                    continue
                gone.append(h)
                fetched -= size
            with write_transaction(self._w):
                self._w.executemany("DELETE FROM chunks WHERE hash = ?", [(h,) for h in gone])
        return gone

    # ---- files ---------------------------------------------------------------------

    def plain_digest(self, digest: bytes) -> bytes:
        """A keyed hash of a file's plaintext digest: the dedupe key of own files, which
        says nothing about the file to someone reading this database alone."""
        return hmac.new(self._secret, digest, "blake2b").digest()[:32]

    def own_file_by_plain(self, plain: bytes) -> str | None:
        """The descriptor (JSON) of an own file with this plaintext, if sent before."""
        with self._rlock, self._errors("own file"):
            row = self._r.execute(
                "SELECT descriptor FROM files WHERE plain = ? AND state = 'own'", (plain,)
            ).fetchone()
        return None if row is None else str(row[0])

    def set_file(
        self, file_id: str, descriptor: str, state: FileState, plain: bytes | None = None
    ) -> None:
        """Record a file and its state (``own`` is never downgraded)."""
        if state not in _STATES:
            raise StoreError(f"bad file state {state!r}")
        with self._wlock, self._errors("set file"):
            self._w.execute(
                "INSERT INTO files (id, descriptor, state, plain) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET state = CASE WHEN files.state = 'own'"
                " THEN 'own' ELSE excluded.state END,"
                " plain = coalesce(excluded.plain, files.plain)",
                (file_id, descriptor, state, plain),
            )

    def file_state(self, file_id: str) -> FileState | None:
        with self._rlock, self._errors("file state"):
            row = self._r.execute("SELECT state FROM files WHERE id = ?", (file_id,)).fetchone()
        if row is None:
            return None
        if row[0] not in _STATES:
            raise StoreCorrupt(f"blob store {self.path}: bad state for file {file_id}")
        state: FileState = row[0]
        return state

    def files(self, state: FileState) -> list[tuple[str, str]]:
        """(id, descriptor JSON) of every file in ``state``."""
        with self._rlock, self._errors("files"):
            rows = self._r.execute(
                "SELECT id, descriptor FROM files WHERE state = ? ORDER BY rowid", (state,)
            ).fetchall()
        return [(str(i), str(d)) for i, d in rows]

    # ---- settings ------------------------------------------------------------------

    def setting(self, name: str) -> str | None:
        with self._rlock, self._errors("setting"):
            row = self._r.execute("SELECT value FROM settings WHERE name = ?", (name,)).fetchone()
        return None if row is None else str(row[0])

    def set_setting(self, name: str, value: str) -> None:
        with self._wlock, self._errors("set setting"):
            self._w.execute(
                "INSERT INTO settings (name, value) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (name, value),
            )
