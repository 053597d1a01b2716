"""One acceptance suite for every transport adapter (in-memory and TCP on loopback)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import trio

from p2p.errors import FrameTooLarge
from p2p.proto.wire import MAX_FRAME
from p2p.transport.base import Connection, ConnectionClosed, Transport, TransportError
from p2p.transport.memory import MemoryNetwork
from p2p.transport.tcp import TcpTransport, parse_address

Pair = Callable[[], tuple[Transport, Transport]]


def memory_pair() -> tuple[Transport, Transport]:
    net = MemoryNetwork()
    return net.transport("a"), net.transport("b")


def tcp_pair() -> tuple[Transport, Transport]:
    return TcpTransport("127.0.0.1:0"), TcpTransport("127.0.0.1:0")


@pytest.fixture(params=[memory_pair, tcp_pair], ids=["memory", "tcp"])
def make_pair(request: pytest.FixtureRequest) -> Pair:
    return request.param  # type: ignore[no-any-return]


@asynccontextmanager
async def connected(make_pair: Pair) -> AsyncIterator[tuple[Connection, Connection]]:
    """A dialed connection and the listener's end of it."""
    server, client = make_pair()
    accepted: trio.MemorySendChannel[Connection]
    accepted, incoming = trio.open_memory_channel[Connection](1)

    async def handler(conn: Connection) -> None:
        await accepted.send(conn)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, handler)
        ours = await client.dial(server.address)
        theirs = await incoming.receive()
        try:
            yield ours, theirs
        finally:
            await ours.aclose()
            await theirs.aclose()
            nursery.cancel_scope.cancel()


def test_frames_arrive_whole_and_in_order_both_ways(make_pair: Pair) -> None:
    async def main() -> None:
        with trio.fail_after(30):
            async with connected(make_pair) as (a, b):
                frames = [bytes([i % 256]) * (i * 37 % 5000) for i in range(200)]

                async def send_all(conn: Connection) -> None:
                    for f in frames:
                        await conn.send(f)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send_all, a)
                    nursery.start_soon(send_all, b)
                    got_b = [await b.receive() for _ in frames]
                    got_a = [await a.receive() for _ in frames]
                assert got_a == frames
                assert got_b == frames

    trio.run(main)


def test_a_frame_near_the_limit_passes(make_pair: Pair) -> None:
    async def main() -> None:
        with trio.fail_after(60):
            async with connected(make_pair) as (a, b):
                big = b"z" * (MAX_FRAME - 16)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(a.send, big)
                    assert await b.receive() == big

    trio.run(main)


def test_closing_one_end_ends_the_other(make_pair: Pair) -> None:
    async def main() -> None:
        with trio.fail_after(30):
            async with connected(make_pair) as (a, b):
                await a.aclose()
                with pytest.raises(ConnectionClosed):
                    await b.receive()
                await a.aclose()  # idempotent

    trio.run(main)


async def idle(conn: Connection) -> None:
    await conn.aclose()


def test_dialing_nothing_is_a_transport_error(make_pair: Pair) -> None:
    async def main() -> None:
        with trio.fail_after(30):
            server, client = make_pair()
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve, idle)
                address = server.address
                nursery.cancel_scope.cancel()
            with pytest.raises(TransportError):
                await client.dial(address)

    trio.run(main)


def test_tcp_refuses_an_oversized_length_prefix_before_reading_it() -> None:
    async def main() -> None:
        with trio.fail_after(30):
            async with connected(tcp_pair) as (a, b):
                stream = a._stream  # type: ignore[attr-defined]
                await stream.send_all((MAX_FRAME + 1).to_bytes(4, "big"))
                with pytest.raises(FrameTooLarge):
                    await b.receive()

    trio.run(main)


@pytest.mark.parametrize("bad", ["", "host", "host:", ":80", "host:99999", "host:http"])
def test_tcp_addresses_are_checked(bad: str) -> None:
    with pytest.raises(TransportError):
        parse_address(bad)


def test_tcp_addresses_parse_v4_and_v6() -> None:
    assert parse_address("127.0.0.1:7000") == ("127.0.0.1", 7000)
    assert parse_address("[::1]:7000") == ("::1", 7000)
