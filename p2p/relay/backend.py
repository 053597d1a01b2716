"""Where a relay keeps what outlives one connection: the interfaces, and the single process.

A relay process holds its websockets in memory (:mod:`p2p.relay.server`); the rest has
two shapes, chosen when the relay starts:

- **One process** (the embedded default, ``p2p relay`` without ``--redis``): mail in a
  SQLite file (:class:`SqliteMailStore` over :class:`~p2p.relay.mailbox.Mailbox`), and
  presence and pipes in the process itself (no :class:`Cluster` at all).
- **A cluster** (``--redis URL``): mail, presence and cross-process pipes in one Redis
  server, shared by any number of relay processes serving one relay id
  (:mod:`p2p.relay.cluster`).

Both mail stores implement :class:`MailStore` and run through one acceptance suite
(``tests/test_relay_mailstore.py``): same codes, same quotas, same order, same TTL.
Quotas are checked where the mail is, atomically, so in a cluster they hold across all
processes, not per process.

:class:`~p2p.relay.cluster.RedisCluster` is what a relay process asks of its peers: who
is online anywhere, which process holds a device's newest connection, and a message bus
between processes (pipe traffic, mail notices). The server keeps the pipes whose two
ends are both local exactly as a single relay does, and routes the others through it.
"""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Sequence
from typing import Final, Protocol

import trio

from p2p.errors import RelayError
from p2p.relay.mailbox import Mailbox, MailQuota, StoredMail

WINDOW_BYTES: Final = 4 * 1024 * 1024
WINDOW_ITEMS: Final = 64
"""A cross-process pipe's credit window, each direction: bytes and chunks in flight
(cluster.py; here so the server need not import the Redis client unless it uses it)."""


class MailStore(Protocol):
    """Mail per recipient device, bounded and expiring (see mailbox.py for the rules).

    Every method may raise :class:`~p2p.errors.StoreError` when the store cannot be
    reached; the relay answers ``unavailable`` then and the item is not acknowledged.
    """

    @property
    def where(self) -> str:
        """Where the mail lives, for logs (a path, a Redis URL)."""

    async def post(
        self, recipient: str, sender: str, mail_id: bytes, data: bytes, now: float
    ) -> str:
        """Store one item durably: ``"posted"`` or an error code of protocol.MAIL_ERRORS.
        A repeated (recipient, id) answers ``"posted"`` and stores nothing."""

    async def fetch(self, recipient: str, after: int, limit: int, now: float) -> list[StoredMail]:
        """Up to ``limit`` live items of ``recipient`` with ``seq > after``, oldest first."""

    async def ack(self, recipient: str, ids: Sequence[bytes]) -> int:
        """Delete delivered items; how many were there."""

    async def purge(self, now: float) -> int:
        """Delete expired items; how many."""

    async def totals(self) -> tuple[int, int]:
        """(items, bytes) held now, all recipients."""

    async def aclose(self) -> None:
        """Release the store (the relay is stopping)."""


class SqliteMailStore:
    """:class:`MailStore` over the SQLite :class:`Mailbox`, run on worker threads (the
    mailbox is synchronous and serialises itself behind a lock)."""

    def __init__(self, mailbox: Mailbox) -> None:
        self.mailbox = mailbox

    @classmethod
    async def open(cls, path: str | None, quota: MailQuota) -> SqliteMailStore:
        mailbox = await trio.to_thread.run_sync(Mailbox, path, quota, time.time())
        return cls(mailbox)

    @property
    def where(self) -> str:
        return self.mailbox.path

    async def post(
        self, recipient: str, sender: str, mail_id: bytes, data: bytes, now: float
    ) -> str:
        return await trio.to_thread.run_sync(
            self.mailbox.post, recipient, sender, mail_id, data, now
        )

    async def fetch(self, recipient: str, after: int, limit: int, now: float) -> list[StoredMail]:
        return await trio.to_thread.run_sync(self.mailbox.fetch, recipient, after, limit, now)

    async def ack(self, recipient: str, ids: Sequence[bytes]) -> int:
        return await trio.to_thread.run_sync(self.mailbox.ack, recipient, ids)

    async def purge(self, now: float) -> int:
        return await trio.to_thread.run_sync(self.mailbox.purge, now)

    async def totals(self) -> tuple[int, int]:
        await trio.lowlevel.checkpoint()
        return len(self.mailbox), self.mailbox.total_bytes

    async def aclose(self) -> None:
        # closed before the checkpoint: a relay stopping by cancellation calls this in
        # a cancelled ``finally``, where the checkpoint raises at once
        self.mailbox.close()
        await trio.lowlevel.checkpoint()


def parse_redis_url(url: str) -> tuple[str, int, int]:
    """``redis://HOST[:PORT][/DB]`` -> (host, port, db); RelayError for anything else
    (TLS, passwords and sockets are left to a later change: say so rather than guess)."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port or 6379
    except ValueError as exc:
        raise RelayError(f"not a Redis URL: {url!r}") from exc
    if parts.scheme != "redis" or not parts.hostname or parts.query or parts.username:
        raise RelayError(f"not a redis://HOST:PORT/DB URL: {url!r}")
    db_text = parts.path.strip("/") or "0"
    if not db_text.isdigit():
        raise RelayError(f"the Redis database must be a number: {url!r}")
    return parts.hostname, port, int(db_text)
