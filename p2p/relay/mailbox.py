"""The relay's store-and-forward mailbox: opaque mail for offline devices, in SQLite.

One table (schema version :data:`SCHEMA_VERSION` in ``PRAGMA user_version``, tagged with
:data:`APPLICATION_ID` so a node's ``p2p.db`` is never mistaken for it)::

    mail(seq INTEGER PRIMARY KEY AUTOINCREMENT, recipient TEXT, id BLOB, sender TEXT,
         data BLOB, created REAL, UNIQUE (recipient, id))

``seq`` only grows (AUTOINCREMENT never reuses a number), so a connection that has sent
its device everything up to ``seq`` = n finds new mail by asking for ``seq > n``.
``(recipient, id)`` is unique: a sender that retries a post after a lost answer stores the
item once.

What the relay holds is opaque: ``data`` is a sealed envelope it cannot open. It knows
who sent it (the authenticated device), to whom, when, and how big.

Bounds, all checked before a row is written: per recipient (count and bytes), per sender
(items and bytes held across all mailboxes, so one device cannot fill the disk, nor the
relay's item table, by writing to many made-up recipients), for the whole relay (items
and bytes), and per item. An empty item is refused: it would cost a row and count
against no byte quota, so bytes alone never bound what tiny items cost. Mail older than the TTL
is never delivered and is purged on open and by :meth:`Mailbox.purge`. The counters
behind the quotas live in memory, rebuilt from the table on open: the relay is the only
writer of its file.

Durability: WAL with ``synchronous=FULL``; :meth:`Mailbox.post` returns after COMMIT, so
mail the relay acknowledged (``posted``) survives the relay being killed. The file is
input, like any other: a file that is not a relay mailbox is refused with
:class:`~p2p.errors.StoreCorrupt`, and rows that fail their type checks are deleted, with a
log line, instead of being delivered.

Synchronous and thread-safe (one connection behind a lock): the server calls it through
``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final

from p2p.errors import StoreCorrupt, StoreError
from p2p.proto.relay_protocol import MAIL_ID_BYTES, MAX_PAYLOAD, is_device_id
from p2p.storage.transaction import rollback, write_transaction

log = logging.getLogger(__name__)

SCHEMA_VERSION: Final = 1
APPLICATION_ID: Final = 0x70327252  # "p2rR"
_SCHEMA: Final = (
    "CREATE TABLE mail (seq INTEGER PRIMARY KEY AUTOINCREMENT, recipient TEXT NOT NULL,"
    " id BLOB NOT NULL, sender TEXT NOT NULL, data BLOB NOT NULL, created REAL NOT NULL,"
    " UNIQUE (recipient, id))",
    "CREATE INDEX mail_box ON mail (recipient, seq)",
    "CREATE INDEX mail_sender ON mail (sender)",
    "CREATE INDEX mail_created ON mail (created)",
)
_COLUMNS: Final = ["seq", "recipient", "id", "sender", "data", "created"]
FILE_NAME: Final = "relay.db"


@dataclass(frozen=True, kw_only=True)
class MailQuota:
    """The mailbox's bounds; defaults are the relay's (see ``Limits``)."""

    max_mail: int = 1024 * 1024
    """Largest item, in bytes."""
    mailbox_count: int = 10_000
    """Items waiting for one recipient."""
    mailbox_bytes: int = 64 * 1024 * 1024
    """Bytes waiting for one recipient."""
    sender_bytes: int = 256 * 1024 * 1024
    """Bytes one sender may hold in all mailboxes together."""
    sender_count: int = 100_000
    """Items one sender may hold in all mailboxes together."""
    total_bytes: int = 4 * 1024 * 1024 * 1024
    """Bytes in the whole relay."""
    total_count: int = 4_000_000
    """Items in the whole relay."""
    ttl: float = 30 * 24 * 3600.0
    """Seconds an item is kept (and deliverable) after it was posted."""


@dataclass(frozen=True, kw_only=True)
class StoredMail:
    """One item as read back: checked, ready to deliver."""

    seq: int
    id: bytes
    sender: str
    data: bytes


class Mailbox:
    """Mail per recipient device, bounded, persistent (``path=None``: in memory only)."""

    def __init__(self, path: str | os.PathLike[str] | None, quota: MailQuota, now: float) -> None:
        self.quota = quota
        self._path = ":memory:" if path is None else os.fspath(path)
        self._lock = threading.Lock()
        self._box_count: Counter[str] = Counter()
        self._box_bytes: Counter[str] = Counter()
        self._sender_bytes: Counter[str] = Counter()
        self._sender_count: Counter[str] = Counter()
        self._total = 0
        self._items = 0
        self._conn: sqlite3.Connection | None = None
        self._conn = self._open()
        self.purge(now)
        self._recount()

    @property
    def path(self) -> str:
        return self._path

    @property
    def total_bytes(self) -> int:
        return self._total

    def count(self, recipient: str) -> int:
        """Items waiting for ``recipient``."""
        return self._box_count.get(recipient, 0)

    def __len__(self) -> int:
        return self._items

    # ---- opening --------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                self._path, timeout=5.0, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open relay mailbox {self._path}: {exc}") from exc
        try:
            conn.execute("PRAGMA trusted_schema = OFF")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            objects = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if version == 0 and objects == 0:
                conn.execute("PRAGMA journal_mode = WAL")
                with write_transaction(conn):
                    for statement in _SCHEMA:
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            else:
                self._check(conn, version)
                conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
        except sqlite3.Error as exc:
            conn.close()
            raise StoreCorrupt(f"{self._path}: not a usable relay mailbox ({exc})") from exc
        except BaseException:
            conn.close()
            raise
        return conn

    def _check(self, conn: sqlite3.Connection, version: object) -> None:
        app = conn.execute("PRAGMA application_id").fetchone()[0]
        if version != SCHEMA_VERSION or app != APPLICATION_ID:
            raise StoreCorrupt(
                f"{self._path}: not a relay mailbox of schema {SCHEMA_VERSION}"
                f" (user_version {version!r}, application_id {app!r})"
            )
        kinds = dict(conn.execute("SELECT name, type FROM sqlite_master").fetchall())
        if kinds.get("mail") != "table":
            raise StoreCorrupt(f"{self._path}: table 'mail' is missing")
        columns = [row[1] for row in conn.execute("PRAGMA table_info(mail)").fetchall()]
        if columns != _COLUMNS:
            raise StoreCorrupt(f"{self._path}: table 'mail' has columns {columns}")
        foreign = sorted(n for n, k in kinds.items() if k in ("view", "trigger"))
        if foreign:
            raise StoreCorrupt(f"{self._path}: unexpected views or triggers {foreign}")
        problems = [row[0] for row in conn.execute("PRAGMA quick_check(5)").fetchall()]
        if problems != ["ok"]:
            raise StoreCorrupt(f"{self._path}: quick_check failed: {problems}")

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        """The connection, under the lock, with sqlite3 errors mapped to StoreError."""
        with self._lock:
            if self._conn is None:
                raise StoreError("the relay mailbox is closed")
            try:
                yield self._conn
            except sqlite3.Error as exc:
                rollback(self._conn)
                raise StoreError(f"relay mailbox {self._path}: {exc}") from exc

    def _recount(self) -> None:
        """Rebuild the quota counters from the table (on open, after a purge)."""
        with self._db() as conn:
            boxes = conn.execute(
                "SELECT recipient, count(*), sum(length(data)) FROM mail GROUP BY recipient"
            ).fetchall()
            senders = conn.execute(
                "SELECT sender, count(*), sum(length(data)) FROM mail GROUP BY sender"
            ).fetchall()
        self._box_count = Counter({r: int(n) for r, n, _ in boxes})
        self._box_bytes = Counter({r: int(b or 0) for r, _, b in boxes})
        self._sender_count = Counter({s: int(n) for s, n, _ in senders})
        self._sender_bytes = Counter({s: int(b or 0) for s, _, b in senders})
        self._total = sum(self._box_bytes.values())
        self._items = sum(self._box_count.values())

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # ---- operations -----------------------------------------------------------------

    def post(self, recipient: str, sender: str, mail_id: bytes, data: bytes, now: float) -> str:
        """Store one item; returns ``"posted"`` or the error code of protocol.MAIL_ERRORS.

        A repeated (recipient, id) is ``"posted"`` again without a second copy: the
        sender may not have seen our first answer.
        """
        size = len(data)
        if size > self.quota.max_mail:
            return "too_large"
        if size == 0:
            return "empty"
        if recipient == sender:
            return "self"
        q = self.quota
        with self._db() as conn:
            if conn.execute(
                "SELECT 1 FROM mail WHERE recipient = ? AND id = ?", (recipient, mail_id)
            ).fetchone():
                return "posted"
            if (
                self._box_count[recipient] + 1 > q.mailbox_count
                or self._box_bytes[recipient] + size > q.mailbox_bytes
            ):
                return "quota"
            if (
                self._sender_count[sender] + 1 > q.sender_count
                or self._sender_bytes[sender] + size > q.sender_bytes
            ):
                return "sender_quota"
            if self._items + 1 > q.total_count or self._total + size > q.total_bytes:
                return "relay_full"
            with write_transaction(conn):
                conn.execute(
                    "INSERT INTO mail (recipient, id, sender, data, created)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (recipient, mail_id, sender, data, now),
                )
        self._box_count[recipient] += 1
        self._box_bytes[recipient] += size
        self._sender_bytes[sender] += size
        self._sender_count[sender] += 1
        self._total += size
        self._items += 1
        return "posted"

    def fetch(self, recipient: str, after: int, limit: int, now: float) -> list[StoredMail]:
        """Up to ``limit`` live items for ``recipient`` with ``seq > after``, oldest first."""
        with self._db() as conn:
            rows = conn.execute(
                "SELECT seq, id, sender, data FROM mail WHERE recipient = ? AND seq > ?"
                " AND created > ? ORDER BY seq LIMIT ?",
                (recipient, after, now - self.quota.ttl, limit),
            ).fetchall()
        good: list[StoredMail] = []
        bad: list[int] = []
        for seq, mail_id, sender, data in rows:
            if (
                type(mail_id) is bytes
                and len(mail_id) == MAIL_ID_BYTES
                and is_device_id(sender)
                and type(data) is bytes
                and len(data) <= MAX_PAYLOAD
            ):
                good.append(StoredMail(seq=seq, id=mail_id, sender=sender, data=data))
            else:
                bad.append(seq)
        if bad:
            log.warning("deleting %d malformed mail rows for %s", len(bad), recipient)
            marks = ",".join("?" * len(bad))
            self._delete(f"seq IN ({marks})", bad)
        return good

    def ack(self, recipient: str, ids: Iterable[bytes]) -> int:
        """Delete delivered items of ``recipient``; returns how many were there."""
        wanted = list(dict.fromkeys(ids))
        if not wanted:
            return 0
        marks = ",".join("?" * len(wanted))
        return self._delete(f"recipient = ? AND id IN ({marks})", [recipient, *wanted])

    def purge(self, now: float) -> int:
        """Delete items past the TTL; returns how many."""
        return self._delete("created <= ?", [now - self.quota.ttl])

    def _delete(self, where: str, args: Sequence[object]) -> int:
        with self._db() as conn, write_transaction(conn):
            gone = conn.execute(
                f"SELECT recipient, sender, length(data) FROM mail WHERE {where}", args
            ).fetchall()
            if gone:
                conn.execute(f"DELETE FROM mail WHERE {where}", args)
        for recipient, sender, size in gone:
            size = int(size or 0)
            self._box_count[recipient] -= 1
            self._box_bytes[recipient] -= size
            self._sender_bytes[sender] -= size
            self._sender_count[sender] -= 1
            self._total -= size
            self._items -= 1
        counters = (self._box_count, self._box_bytes, self._sender_bytes, self._sender_count)
        for counter in counters:
            for key in [k for k, v in counter.items() if v <= 0]:
                del counter[key]
        return len(gone)
