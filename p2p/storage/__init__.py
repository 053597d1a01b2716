"""Durable state of a device: the :class:`Store` interface and its two adapters.

Import from here, not from the submodules: callers pick an adapter with
:func:`open_store` and then only ever see the :class:`Store` protocol.
"""

from __future__ import annotations

import os

from p2p.storage.base import SpaceLog, Store, WriteBatch
from p2p.storage.memory import MemoryStore
from p2p.storage.sqlite import SqliteStore

__all__ = ["MemoryStore", "SpaceLog", "SqliteStore", "Store", "WriteBatch", "open_store"]


def open_store(path: str | os.PathLike[str] | None) -> Store:
    """Open the SQLite store at ``path``, or a fresh in-memory store when it is None.

    One entry point lets the node and the CLI take "no path" to mean "don't persist"
    (tests, demos) without knowing the adapter classes.
    """
    if path is None:
        return MemoryStore()
    return SqliteStore(path)
