"""A relay cluster: real ``redis-server``, real ``python -m p2p.relay --redis`` processes.

One acceptance suite runs on two topologies: one relay process (SQLite), and three
processes of one relay id sharing one Redis, with the devices of each test spread over
the three. Whatever a device sees (presence, pipes in order with back-pressure, mail,
quotas) must be the same on both. Then the faults only a cluster has: a relay process
SIGKILLed mid-traffic (its devices fail over, acknowledged mail is delivered), Redis
lost (new logins refused with 1013, /healthz 503, and back when it returns), and Redis
restarted (AOF keeps the mail).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import procs
import pytest
import trio
from procs import echo, serving
from redis_proc import RedisProcess, free_port

from p2p.errors import MailboxFull
from p2p.proto.identity import DeviceKeys
from p2p.proto.wire import MAX_FRAME
from p2p.transport.base import Connection, ConnectionClosed
from p2p.transport.relay import RelayClient, relay_address

pytestmark = pytest.mark.slow

CLUSTER_ID = "ws://relay.cluster.test"
"""The id every process of the test cluster signs as (a name: nothing dials it)."""


class Relay(procs.Relay):
    """``p2p relay`` on loopback with a metrics listener; it comes back on its port."""

    def __init__(self, folder: Path, *args: str, port: int = 0) -> None:
        self.metrics_port = free_port()
        metrics = ("--metrics", f"127.0.0.1:{self.metrics_port}")
        super().__init__(None, *metrics, *args, port=port, start=False, logs=folder)

    def http(self, path: str) -> tuple[int, str]:
        """GET ``path`` from the process's metrics listener: (status, body)."""
        with socket.create_connection(("127.0.0.1", self.metrics_port), timeout=5) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split(b" ")[1]), body.decode()


@dataclass
class Topology:
    """Where the devices of a test connect: ``urls[i]`` for the i-th device (the same
    process for all of them, or spread over the cluster's processes)."""

    urls: list[str]
    relay_id: str | None
    relays: list[Relay]
    redis: RedisProcess | None

    def client(self, i: int, keys: DeviceKeys | None = None, **kw: Any) -> RelayClient:
        return RelayClient(
            self.urls[i % len(self.urls)],
            keys or DeviceKeys.generate(),
            relay_id=self.relay_id,
            **kw,
        )


@pytest.fixture
def start_cluster(tmp_path: Path) -> Iterator[Any]:
    """``start_cluster(n, *relay_args)``: one Redis (AOF on) and n relay processes."""
    started: list[Relay] = []
    servers: list[RedisProcess] = []

    def start(n: int, *args: str) -> Topology:
        redis = RedisProcess(tmp_path / "redis")
        servers.append(redis)
        relays = [
            Relay(tmp_path, "--redis", redis.url, "--id", CLUSTER_ID, *args).start()
            for _ in range(n)
        ]
        started.extend(relays)
        return Topology([r.url for r in relays], CLUSTER_ID, relays, redis)

    yield start
    for relay in started:
        relay.stop(signal.SIGKILL)
    for server in servers:
        server.kill()


@pytest.fixture(params=["single", "cluster"])
def topology(
    request: pytest.FixtureRequest, tmp_path: Path, start_cluster: Any
) -> Iterator[Topology]:
    args = ("--sender-count", "5", "--mailbox-count", "50")
    if request.param == "single":
        relay = Relay(tmp_path, "--data", str(tmp_path / "data"), *args).start()
        yield Topology([relay.url], None, [relay], None)
        relay.stop(signal.SIGKILL)
        return
    yield start_cluster(3, *args)


async def hold(conn: Connection) -> None:
    await trio.sleep_forever()


async def until(predicate: Any, seconds: float = 20) -> None:
    """Poll a condition that has no event to wait on (another process's state)."""
    with trio.fail_after(seconds):
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(0.05)


async def drained(pipe: Connection) -> bool:
    """Read ``pipe`` until it ends; True once it did (ConnectionClosed)."""
    try:
        while True:
            await pipe.receive()
    except ConnectionClosed:
        return True


# ---- one suite, two topologies --------------------------------------------------------


def test_presence_across_processes(topology: Topology) -> None:
    b_keys = DeviceKeys.generate()
    a = topology.client(0, watch=lambda: [b_keys.device_id])

    async def main() -> None:
        async with serving(a):
            await trio.sleep(0.3)
            assert b_keys.device_id not in a.online
            b = topology.client(1, b_keys)
            async with serving(b):
                await until(lambda: b_keys.device_id in a.online)
            await until(lambda: b_keys.device_id not in a.online)
            c = topology.client(2, b_keys)
            async with serving(c):  # online before the watch: the answer says so
                a.update_watch()
                late = topology.client(1, watch=lambda: [b_keys.device_id])
                async with serving(late):
                    await until(lambda: b_keys.device_id in late.online)

    trio.run(main)


def test_a_device_with_open_pipes_goes_offline_when_it_leaves(topology: Topology) -> None:
    """Leaving with pipes open to devices on other processes: the pipes end at the
    other end, and the device is offline for its watchers (the clean-up runs whole)."""
    b_keys = DeviceKeys.generate()
    a = topology.client(0, watch=lambda: [b_keys.device_id])

    async def main() -> None:
        async with serving(a):
            b = topology.client(1, b_keys)
            async with serving(b):
                await until(lambda: b_keys.device_id in a.online)
                pipe = await b.dial(relay_address(a.device_id))
                await pipe.send(b"ping")
                assert await pipe.receive() == b"ping"
            await until(lambda: b_keys.device_id not in a.online)

    trio.run(main)


def test_pipes_keep_order_and_size_across_processes(topology: Topology) -> None:
    a, b = topology.client(0), topology.client(2)
    frames = [bytes([i % 251]) * (1 + (i * 7919) % 20_000) for i in range(300)]
    frames.insert(150, os.urandom(MAX_FRAME))  # past one relay message: sent in pieces, in order

    async def main() -> None:
        async with serving(a, b):
            pipe = await a.dial(relay_address(b.device_id))
            got: list[bytes] = []

            async def read() -> None:
                for _ in frames:
                    got.append(await pipe.receive())

            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(read)
                    for frame in frames:
                        await pipe.send(frame)
            assert got == frames
            await pipe.aclose()

    trio.run(main)


def test_a_slow_reader_slows_its_sender_across_processes(topology: Topology) -> None:
    """Back-pressure end to end: a device that does not read stops its sender (the
    relay's queues stay bounded), and every frame arrives, in order, once it reads."""
    a, b = topology.client(0), topology.client(1)
    accepted: list[Connection] = []

    async def keep(conn: Connection) -> None:
        accepted.append(conn)
        await trio.sleep_forever()

    frame = b"x" * 256 * 1024
    total = 160  # 40 MiB: far more than every queue on the way together

    async def main() -> None:
        async with serving(a), serving(b, handler=keep):
            pipe = await a.dial(relay_address(b.device_id))
            sent = 0

            async def send_all() -> None:
                nonlocal sent
                for i in range(total):
                    await pipe.send(i.to_bytes(4, "big") + frame)
                    sent += 1

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_all)
                await until(lambda: bool(accepted))
                with trio.fail_after(30):  # the reader sleeps: the sender must stall
                    while True:
                        before = sent
                        await trio.sleep(2)
                        if sent == before:
                            break
                assert sent < total
                with trio.fail_after(60):
                    for i in range(total):
                        got = await accepted[0].receive()
                        assert int.from_bytes(got[:4], "big") == i
            assert sent == total

    trio.run(main)


def test_mail_posted_on_one_process_is_delivered_on_another(topology: Topology) -> None:
    a_keys, b_keys = DeviceKeys.generate(), DeviceKeys.generate()
    items = [b"sealed %d" % i for i in range(5)]

    async def main() -> None:
        a = topology.client(0, a_keys)
        async with serving(a):
            for item in items:
                await a.post(b_keys.device_id, item)
        b = topology.client(1, b_keys)
        async with serving(b):
            inbox = b.mail()
            with trio.fail_after(10):
                got = [await inbox.receive() for _ in items]
            assert [m.data for m in got] == items
            await b.ack([m.id for m in got[:3]])
            a = topology.client(2, a_keys)
            async with serving(a):  # live: b is connected to another process
                await a.post(b_keys.device_id, b"live")
                with trio.fail_after(10):
                    assert (await inbox.receive()).data == b"live"
        b = topology.client(2, b_keys)
        async with serving(b):  # the unacked come again, the acked do not
            inbox = b.mail()
            with trio.fail_after(10):
                again = [(await inbox.receive()).data for _ in range(3)]
            assert again == [*items[3:], b"live"]

    trio.run(main)


def test_quotas_hold_across_processes(topology: Topology) -> None:
    """--sender-count 5: a sender spreading its posts over every process still gets
    five items stored, not five per process."""
    keys = DeviceKeys.generate()
    victims = [DeviceKeys.generate().device_id for _ in range(6)]

    async def main() -> None:
        for i, victim in enumerate(victims):
            a = topology.client(i, keys)
            async with serving(a):
                if i < 5:
                    await a.post(victim, b"tiny")
                else:
                    with pytest.raises(MailboxFull) as full:
                        await a.post(victim, b"tiny")
                    assert full.value.code == "sender_quota"

    trio.run(main)


# ---- what only a cluster has -------------------------------------------------------


def test_a_killed_process_devices_fail_over_and_acknowledged_mail_is_delivered(
    start_cluster: Any,
) -> None:
    topo: Topology = start_cluster(3)
    first, second, third = topo.relays
    a_keys, b_keys = DeviceKeys.generate(), DeviceKeys.generate()
    # b prefers the first process and falls back on the others
    b = RelayClient(
        first.url, b_keys, relay_id=CLUSTER_ID, alternates=[second.url], watch=lambda: []
    )
    a = RelayClient(third.url, a_keys, relay_id=CLUSTER_ID, watch=lambda: [b_keys.device_id])

    async def main() -> None:
        async with serving(a), serving(b):
            await until(lambda: b_keys.device_id in a.online)
            pipe = await a.dial(relay_address(b_keys.device_id))
            await pipe.send(b"before")
            assert await pipe.receive() == b"before"
            posted = []
            for i in range(20):  # mail to a device that is online: kept until acked
                await a.post(b_keys.device_id, b"mail %d" % i)
                posted.append(b"mail %d" % i)
            first.stop(signal.SIGKILL)
            with trio.fail_after(20):  # the pipe ends (the process that held b is gone)
                assert await drained(pipe)
            await until(lambda: b.connected and b.url == second.url)
            await until(lambda: b_keys.device_id in a.online)
            pipe = await a.dial(relay_address(b_keys.device_id))  # rebuilt
            await pipe.send(b"after")
            assert await pipe.receive() == b"after"
            inbox = b.mail()
            seen: list[bytes] = []
            with trio.fail_after(20):
                while set(posted) - set(seen):
                    seen.append((await inbox.receive()).data)
            # in order, per connection: what the first process had sent, then all again
            tail = seen[len(seen) - len(posted) :]
            assert tail == posted
        status, body = third.http("/metrics")
        assert status == 200
        assert "p2p_relay_remote_pipes" in body

    trio.run(main)


def test_losing_redis_refuses_logins_keeps_local_pipes_and_recovers_with_the_mail(
    start_cluster: Any,
) -> None:
    topo: Topology = start_cluster(2)
    assert topo.redis is not None
    one, two = topo.relays
    a_keys, b_keys = DeviceKeys.generate(), DeviceKeys.generate()

    # two devices on the same process: their pipe does not need Redis, and lives on
    c, d = (RelayClient(one.url, DeviceKeys.generate(), relay_id=CLUSTER_ID) for _ in range(2))

    async def main() -> None:
        a = RelayClient(one.url, a_keys, relay_id=CLUSTER_ID)
        async with serving(a):
            for i in range(3):
                await a.post(b_keys.device_id, b"kept %d" % i)
        assert one.http("/healthz") == (200, "ok\n")
        assert topo.redis is not None
        async with serving(c, d):
            local = await c.dial(relay_address(d.device_id))
            topo.redis.kill()  # SIGKILL: AOF with appendfsync always has every item
            await until(lambda: one.http("/healthz")[0] == 503)
            await local.send(b"no Redis needed")
            assert await local.receive() == b"no Redis needed"
        b = RelayClient(two.url, b_keys, relay_id=CLUSTER_ID)
        async with trio.open_nursery() as nursery:
            await nursery.start(b.serve, echo)
            await until(lambda: "try again later" in b.last_error)
            assert not b.connected
            topo.redis.start()
            await until(lambda: b.connected, 40)
            inbox = b.mail()
            with trio.fail_after(15):
                got = [(await inbox.receive()).data for _ in range(3)]
            assert got == [b"kept %d" % i for i in range(3)]
            nursery.cancel_scope.cancel()
        assert one.http("/healthz") == (200, "ok\n")
        _, body = one.http("/metrics")
        assert "p2p_relay_redis_up 1" in body

    trio.run(main)


def test_junk_on_the_cluster_bus_is_dropped(start_cluster: Any) -> None:
    """Redis is the operator's, but what arrives through it is input all the same:
    junk on a process's bus channel and on the presence channel is dropped with a log
    line, and the process goes on serving."""
    topo: Topology = start_cluster(2)
    assert topo.redis is not None
    one, two = topo.relays
    prefix = f"p2p:{CLUSTER_ID}:"
    junk = [
        b"\xc1",
        b"\x91\xa4open",  # ["open"]: too short
        b"\x95\xa4data\xa0\xa1k\x00\x00",  # data with a bad chunk
        b"\x94\xa5close\xa1x\xa1k\x01",
        b"\xdd\xff\xff\xff\xff",  # an array that claims 4 billion items
    ]
    with socket.create_connection(("127.0.0.1", topo.redis.port), timeout=5) as s:
        for channel in (prefix + "proc:" + one.process, prefix + "presence"):
            for item in junk:
                parts = [b"PUBLISH", channel.encode(), item]
                s.sendall(b"*3\r\n" + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts))
                assert s.recv(64).startswith(b":")
    a, b = (
        RelayClient(one.url, DeviceKeys.generate(), relay_id=CLUSTER_ID),
        RelayClient(two.url, DeviceKeys.generate(), relay_id=CLUSTER_ID),
    )

    async def main() -> None:
        async with serving(a, b):
            pipe = await a.dial(relay_address(b.device_id))
            await pipe.send(b"still here")
            assert await pipe.receive() == b"still here"

    trio.run(main)
    assert one.proc is not None
    assert one.proc.poll() is None


def test_abuse_is_refused_by_a_cluster_process_as_by_a_single_relay(start_cluster: Any) -> None:
    """The single relay's misbehaving clients (bad auth, silence, oversized messages,
    floods, text, junk, auth twice) get the same close codes from a cluster process,
    while a pair of devices on two processes keeps talking through it all."""
    from test_relay import ATTACKS

    topo: Topology = start_cluster(
        2, "--auth-timeout", "1", "--msg-rate", "100", "--msg-burst", "200"
    )
    one, two = topo.relays
    a = RelayClient(one.url, DeviceKeys.generate(), relay_id=CLUSTER_ID)
    b = RelayClient(two.url, DeviceKeys.generate(), relay_id=CLUSTER_ID)
    codes: dict[str, int] = {}
    rounds = 0

    async def talk(pipe: Connection) -> None:
        nonlocal rounds
        while True:
            frame = b"%d" % rounds
            await pipe.send(frame)
            assert await pipe.receive() == frame
            rounds += 1

    async def attack(fn: Any) -> None:
        codes[fn.__name__] = await fn(one.url)

    async def main() -> None:
        with trio.fail_after(60):
            async with serving(a, b) as nursery:
                pipe = await a.dial(relay_address(b.device_id))
                nursery.start_soon(talk, pipe)
                async with trio.open_nursery() as attacks:
                    for fn in ATTACKS:
                        attacks.start_soon(attack, fn)
                before = rounds
                await until(lambda: rounds > before + 5)
                assert a.connected
                assert b.connected

    trio.run(main)
    assert codes == {fn.__name__: code for fn, code in ATTACKS.items()}
    assert one.proc is not None
    assert one.proc.poll() is None
    assert "Traceback" not in one.log()


def test_health_and_metrics_answer_and_bad_requests_are_refused(topology: Topology) -> None:
    relay = topology.relays[0]
    assert relay.http("/healthz") == (200, "ok\n")
    status, body = relay.http("/metrics")
    assert status == 200
    for name in ("connections", "pipes", "mail_items", "mail_bytes", "chunks_relayed_total"):
        assert f"\np2p_relay_{name} " in "\n" + body, name
    assert relay.http("/nope")[0] == 404

    def raw(data: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", relay.metrics_port), timeout=10) as s:
            s.sendall(data)
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
            return answer

    assert raw(b"POST /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405")
    assert raw(b"garbage\r\n\r\n").startswith(b"HTTP/1.1 400")
    # a head past 8 KiB: 400, or a reset when the unread rest is thrown away
    with contextlib.suppress(ConnectionResetError):
        assert raw(b"GET /" + b"x" * 20_000 + b" HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert relay.http("/healthz") == (200, "ok\n")


def test_a_cancelled_redis_connection_attempt_logs_no_traceback() -> None:
    """coredis logs a cancelled connection attempt (a device hanging up while its mail is
    read) as an ERROR with a traceback; the relay drops those records, and only those."""
    import logging

    import trio

    from p2p.relay import cluster

    quiet = cluster._QuietCancellation()

    def record(exc: BaseException) -> logging.LogRecord:
        try:
            raise exc
        except BaseException:
            import sys

            return logging.LogRecord("coredis", logging.ERROR, __file__, 1, "x", (), sys.exc_info())

    cancelled = trio.Cancelled._create()
    chained = RuntimeError("wrapped")
    chained.__context__ = cancelled
    assert not quiet.filter(record(cancelled))
    assert not quiet.filter(record(chained))
    assert not quiet.filter(record(BaseExceptionGroup("g", [trio.Cancelled._create()])))
    assert quiet.filter(record(ConnectionError("refused")))
    assert quiet.filter(record(BaseExceptionGroup("g", [trio.Cancelled._create(), OSError()])))
