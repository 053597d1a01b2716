"""A device's home folder: where its store lives, how it is created and found.

Layout: ``<home>/p2p.db`` (SQLite store: keys, device list, update logs),
``<home>/node.lock`` (held by the one process writing the home, see :func:`home_lock`).
The home is chosen by ``--home``, else ``$P2P_HOME``, else the platform's user data
folder.
"""

from __future__ import annotations

import fcntl
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from p2p.errors import AlreadyInitialized, AlreadyRunning, NotInitialized
from p2p.state.device import DeviceState
from p2p.storage.sqlite import SqliteStore

STORE_FILE: Final = "p2p.db"
LOCK_FILE: Final = "node.lock"
LOCK_WAIT: Final = 60.0
"""Seconds a command (or ``p2p run``) waits for a home whose lock is taken by a process
that does not answer its control socket yet: a node starting, or a command at work."""


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


@contextmanager
def home_lock(home: str | os.PathLike[str]) -> Iterator[None]:
    """The home's exclusive lock, for as long as the block runs: what every node opened
    on a home (``open_node``) takes before it reads anything; AlreadyRunning when
    another process holds it (a running or starting node, another command).

    One writer per home: two processes opening one store at once once wrote with the
    same run number, and a node never sees what another process appends to its store
    (it would compact it away). ``flock`` dies with its process, even on SIGKILL, so a
    crashed node never blocks the next start; a stopped one (SIGSTOP) keeps it.
    """
    if not is_initialized(home):
        raise NotInitialized(f"no device in {home} (run `p2p init` or `p2p link` first)")
    path = Path(home) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise AlreadyRunning(
                f"a node is already running for {home}, or another p2p command (pid {other})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


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
