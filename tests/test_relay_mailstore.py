"""One acceptance suite for both relay mail stores: SQLite (one relay process) and Redis
(a cluster). Same codes, same quotas (items and bytes, per recipient, per sender, in
total), same order, same TTL, and what was acknowledged survives reopening.

The Redis store runs against a real ``redis-server`` on loopback (tests/redis_proc.py).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from redis_proc import RedisProcess

from p2p.proto.identity import DeviceKeys
from p2p.relay.backend import MailStore, SqliteMailStore
from p2p.relay.cluster import RedisMailStore, connect
from p2p.relay.mailbox import MailQuota

T = time.time()
"""Mail timestamps in these tests are near now: a store purges expired mail on open."""
Opener = Callable[[MailQuota], AbstractAsyncContextManager[MailStore]]


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    server = RedisProcess(tmp_path_factory.mktemp("redis"))
    yield server
    server.kill()


@pytest.fixture(params=["sqlite", "redis"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    """``async with opener(quota) as store``: the same store each time (reopened)."""
    if request.param == "sqlite":
        path = str(tmp_path / "relay.db")

        @asynccontextmanager
        async def open_sqlite(quota: MailQuota) -> AsyncIterator[MailStore]:
            store = await SqliteMailStore.open(path, quota)
            try:
                yield store
            finally:
                await store.aclose()

        return open_sqlite
    server: RedisProcess = request.getfixturevalue("redis_server")
    relay_id = f"ws://test-{tmp_path.name}"  # a key space of its own per test

    @asynccontextmanager
    async def open_redis(quota: MailQuota) -> AsyncIterator[MailStore]:
        client = connect(server.url)
        async with client:
            store = RedisMailStore(client, relay_id, quota)
            yield store
            await store.aclose()

    return open_redis


def quota(**kw: Any) -> MailQuota:
    return MailQuota(**{"max_mail": 1000, "mailbox_count": 3, "mailbox_bytes": 2500, **kw})


def devices(n: int) -> list[str]:
    return [DeviceKeys.generate().device_id for _ in range(n)]


def test_quotas_per_recipient_and_in_total(opener: Opener) -> None:
    a, b, c = devices(3)

    async def main() -> None:
        async with opener(quota(sender_bytes=10_000, total_bytes=3000)) as box:
            assert await box.post(b, a, bytes(16), b"x" * 1001, T + 1) == "too_large"
            assert await box.post(a, a, bytes(16), b"x", T + 1) == "self"
            assert await box.post(b, a, bytes(16), b"", T + 1) == "empty"
            for i in range(3):
                assert await box.post(b, a, bytes([i]) * 16, b"x" * 800, T + 1) == "posted"
            assert await box.post(b, a, bytes([9]) * 16, b"x", T + 1) == "quota"  # count
            assert await box.post(b, a, bytes([0]) * 16, b"x" * 800, T + 1) == "posted"  # once
            assert await box.totals() == (3, 2400)
            assert await box.ack(b, [bytes([0]) * 16]) == 1
            assert await box.post(b, a, bytes([3]) * 16, b"x" * 901, T + 1) == "quota"  # bytes
            assert await box.post(c, a, bytes([4]) * 16, b"x" * 900, T + 1) == "posted"
            assert await box.post(c, a, bytes([5]) * 16, b"x" * 900, T + 1) == "relay_full"

    trio.run(main)


def test_items_count_per_sender_and_in_total(opener: Opener) -> None:
    sender, other = devices(2)
    victims = devices(6)

    async def main() -> None:
        limits = quota(mailbox_count=100, sender_count=5, total_count=8, sender_bytes=1500)
        async with opener(limits) as box:
            codes = [
                await box.post(v, sender, bytes([i]) * 16, b"x", T + 1)
                for i, v in enumerate(victims)
            ]
            assert codes == ["posted"] * 5 + ["sender_quota"]
            codes = [
                await box.post(victims[0], other, bytes([50 + i]) * 16, b"y", T + 1)
                for i in range(4)
            ]
            assert codes == ["posted"] * 3 + ["relay_full"]
            assert await box.ack(victims[0], [bytes(16), bytes([50]) * 16]) == 2
            big = b"z" * 1000
            assert await box.post(victims[1], other, bytes([70]) * 16, big, T + 1) == "posted"
            assert await box.post(victims[2], other, bytes([71]) * 16, big, T + 1) == "sender_quota"
        async with opener(limits) as box:  # reopened: the counts are where they were
            assert await box.totals() == (7, 1006)
            assert await box.post(victims[5], sender, bytes([9]) * 16, b"z", T + 2) == "posted"
            assert (
                await box.post(victims[5], sender, bytes([8]) * 16, b"z", T + 2) == "sender_quota"
            )

    trio.run(main)


def test_fetch_in_order_after_a_sequence_number_ack_and_reopen(opener: Opener) -> None:
    a, b, c = devices(3)

    async def main() -> None:
        limits = quota(mailbox_count=100, mailbox_bytes=10**6)
        async with opener(limits) as box:
            for i in range(5):
                assert await box.post(b, a, bytes([i]) * 16, b"item %d" % i, T + 10) == "posted"
                assert await box.post(c, a, bytes([i]) * 16, b"for c %d" % i, T + 10) == "posted"
            first = await box.fetch(b, 0, 2, T + 11)
            assert [m.data for m in first] == [b"item 0", b"item 1"]
            assert {m.sender for m in first} == {a}
            rest = await box.fetch(b, first[-1].seq, 10, T + 11)
            assert [m.data for m in rest] == [b"item %d" % i for i in range(2, 5)]
            assert await box.ack(b, [m.id for m in first]) == 2
            assert await box.ack(b, [m.id for m in first]) == 0  # acked twice: harmless
        async with opener(limits) as box:
            again = await box.fetch(b, 0, 10, T + 12)
            assert [m.data for m in again] == [b"item %d" % i for i in range(2, 5)]
            assert [m.data for m in await box.fetch(c, 0, 10, T + 12)] == [
                b"for c %d" % i for i in range(5)
            ]
            assert await box.totals() == (8, sum(len(b"item 2") for _ in range(3)) + 5 * 7)

    trio.run(main)


def test_expired_mail_is_never_delivered_and_is_purged(opener: Opener) -> None:
    a, b = devices(2)

    async def main() -> None:
        limits = quota(ttl=10.0)
        async with opener(limits) as box:
            assert await box.post(b, a, bytes([1]) * 16, b"old", T + 100) == "posted"
            assert await box.post(b, a, bytes([2]) * 16, b"new", T + 105) == "posted"
            assert [m.data for m in await box.fetch(b, 0, 10, T + 112)] == [b"new"]
            assert await box.purge(T + 112) == 1
            assert await box.totals() == (1, 3)
            assert await box.post(b, a, bytes([1]) * 16, b"old", T + 112) == "posted"  # room again
            assert await box.purge(T + 200) == 2
            assert await box.totals() == (0, 0)
            assert await box.fetch(b, 0, 10, T + 200) == []

    trio.run(main)


def test_a_cancelled_relay_still_closes_its_sqlite_mailbox(tmp_path: Path) -> None:
    """A relay stopped by cancellation (SIGTERM, its nursery cancelled) closes its mail
    store in a ``finally`` that runs cancelled: the SQLite file is closed all the same,
    not left to the garbage collector (which checkpoints nothing and, on Python 3.13,
    warns)."""

    async def main() -> SqliteMailStore:
        store = await SqliteMailStore.open(str(tmp_path / "relay.db"), quota())
        with trio.CancelScope() as scope:
            try:
                scope.cancel()
                await trio.sleep_forever()
            finally:
                await store.aclose()
        return store

    store = trio.run(main)
    assert store.mailbox._conn is None
