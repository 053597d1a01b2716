"""A device's home folder: where its store lives, how it is created and found.

Layout: ``<home>/p2p.db`` (SQLite store: keys, device list, update logs). The home is
chosen by ``--home``, else ``$P2P_HOME``, else the platform's user data folder.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Final

from p2p.core import DeviceState
from p2p.errors import AlreadyInitialized, NotInitialized
from p2p.storage.sqlite import SqliteStore

STORE_FILE: Final = "p2p.db"


def default_home() -> Path:
    """``$P2P_HOME``, else the user data folder of this platform."""
    env = os.environ.get("P2P_HOME")
    if env:
        return Path(env)
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "p2p"
    if sys.platform == "win32":
        return Path(os.environ.get("APPDATA", Path.home())) / "p2p"
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "p2p"


def store_path(home: str | os.PathLike[str]) -> Path:
    return Path(home) / STORE_FILE


def is_initialized(home: str | os.PathLike[str]) -> bool:
    return store_path(home).exists()


def open_home_store(home: str | os.PathLike[str]) -> SqliteStore:
    """The store of an existing home; NotInitialized if there is none."""
    if not is_initialized(home):
        raise NotInitialized(f"no device in {home} (run `p2p init` or `p2p link` first)")
    return SqliteStore(store_path(home))


def create_store(home: str | os.PathLike[str]) -> SqliteStore:
    """Open (creating if needed) the store of ``home``, readable by its owner only: it
    holds the device's private keys."""
    old_umask = os.umask(0o077)
    try:
        Path(home).mkdir(parents=True, exist_ok=True, mode=0o700)
        return SqliteStore(store_path(home))
    finally:
        os.umask(old_umask)


def init_account(home: str | os.PathLike[str], name: str) -> DeviceState:
    """Create a new account in ``home`` with this device as its primary.

    Refuses (AlreadyInitialized) a home that already holds a device: a second ``init``
    would otherwise orphan the first account's keys.
    """
    path = Path(home)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = create_store(path)
    try:
        if store.get("device/keys") is not None:
            raise AlreadyInitialized(f"{path} already holds a device")
        state, batch = DeviceState.create_account(name)
        store.write(batch)
        return state
    finally:
        store.close()
