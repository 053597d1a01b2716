"""One SQLite write transaction, taken the same way by every SQLite file p2p keeps.

The device store (``storage.sqlite``), the blob store (``media.store``) and the relay's
mailbox (``relay.mailbox``) open their connections with ``isolation_level=None``, so
that the sqlite3 module never opens a transaction behind their back, and say where each
write transaction begins and ends with :func:`write_transaction`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back on any exception (which goes on).

    IMMEDIATE takes the write lock up front: what is read inside cannot be changed by
    another connection before COMMIT, and a busy file fails here, before any work. A
    failed statement never leaves the transaction open on the connection (its next
    BEGIN would fail)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
        raise


def rollback(conn: sqlite3.Connection) -> None:
    """Roll back the open transaction, if there is one."""
    try:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    except sqlite3.Error:
        pass  # SQLite already rolled back (e.g. after an I/O error); nothing to undo
