"""Attachments between running nodes: real TCP on loopback, a real relay process, real
homes (SQLite chat and blob stores). Tampering peers, text sync during a transfer,
policy and quota, what the relay and the wire see."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from procs import Relay, tcp_node, wait_for

from p2p import events as ev
from p2p.errors import MediaError, MediaMissing
from p2p.runtime.node import open_node
from p2p.testing import provision_homes

pytestmark = pytest.mark.slow

MiB = 1024 * 1024


@pytest.fixture
def homes(tmp_path: Path) -> list[Path]:
    paths = [tmp_path / name for name in ("phone", "laptop", "desktop")]
    provision_homes(paths)
    return paths


def random_file(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


async def until(events: trio.MemoryReceiveChannel[ev.Event], pred: Callable[[Any], bool]) -> Any:
    """The first event matching ``pred`` (the caller bounds the wait)."""
    async for event in events:
        if pred(event):
            return event
    raise AssertionError("event stream ended")


def complete(event: Any) -> bool:
    return isinstance(event, ev.MediaProgress) and event.done == event.total


def test_text_keeps_converging_while_a_large_transfer_runs(homes: list[Path]) -> None:
    """Chunks ride a lower-priority lane: messages sent both ways during a paced 20 MiB
    transfer arrive while the transfer is still running, and the file ends identical."""
    data = random_file(homes[1] / "big.bin", 20 * MiB)

    async def main() -> None:
        with trio.fail_after(120):
            async with tcp_node(homes[1]) as laptop:
                laptop.media.set_policy(rate=4 * MiB)  # >= 5 s for the file
                file_msg = await laptop.send_file(homes[1] / "big.bin", "the big one")
                async with tcp_node(homes[0], peers=[laptop.address]) as phone:
                    with phone.events() as events:
                        await until(events, lambda e: isinstance(e, ev.MediaProgress) and e.done)
                        for i in range(20):
                            await laptop.send(f"from laptop {i}")
                            await phone.send(f"from phone {i}")
                        want = {f"from {d} {i}" for d in ("laptop", "phone") for i in range(20)}
                        await wait_for(
                            lambda: (
                                want <= {m.text for m in phone.messages()}
                                and want <= {m.text for m in laptop.messages()}
                            )
                        )
                        # level on text, and the file still on its way
                        assert phone.media.status()["missing_chunks"] > 0
                        await until(events, complete)
                    out = homes[0] / "big.out"
                    await phone.open_attachment(file_msg, out)
                    assert out.read_bytes() == data
                    [row] = [r for r in phone.media.log_json(phone.messages()) if "file" in r]
                    assert row["file"]["fetched"]
                    assert row["file"]["name"] == "big.bin"
                    assert row["text"] == "the big one"

    trio.run(main)


@pytest.mark.parametrize("via", ["direct", "relay"])
def test_tampered_chunks_are_refused_and_fetched_elsewhere(
    homes: list[Path], relay: Relay, via: str
) -> None:
    """The laptop serves bytes that fail their hash (directly, or through the relay):
    the phone closes that connection, counts it, and gets every chunk from the desktop."""
    data = random_file(homes[2] / "photo.jpg", 3 * MiB)

    async def main() -> None:
        with trio.fail_after(90):
            async with tcp_node(homes[2]) as desktop:
                msg = await desktop.send_file(homes[2] / "photo.jpg")
                # through the relay, the phone meets the laptop only there (relay presence)
                relays = [relay.url] if via == "relay" else []
                async with tcp_node(homes[1], peers=[desktop.address], relays=relays) as laptop:
                    with laptop.events() as events:
                        await until(events, complete)  # the laptop holds the file too

                    real = laptop.media.blobs.chunk

                    def tampering(h: bytes) -> bytes | None:
                        chunk = real(h)
                        return None if chunk is None else bytes([chunk[0] ^ 1]) + chunk[1:]

                    laptop.media.blobs.chunk = tampering  # type: ignore[method-assign]
                    peers = [] if via == "relay" else [laptop.address]
                    async with tcp_node(homes[0], peers=peers, relays=relays) as phone:
                        with phone.events() as events:
                            rejected = await until(
                                events,
                                lambda e: (
                                    isinstance(e, ev.InputRejected) and e.error == "ChunkTampered"
                                ),
                            )
                            assert rejected.device == laptop.device_id
                            assert rejected.remote.startswith("relay:") == (via == "relay")
                            assert phone.media.status()["chunks_in"] == 0
                            await phone.connect(desktop.address)
                            await until(events, complete)
                        out = homes[0] / "photo.out"
                        await phone.open_attachment(msg, out)
                        assert out.read_bytes() == data
                        assert phone.media.stats.tampered >= 1
                        assert phone.media.status()["corrupt"] == 0

    trio.run(main)


def test_relay_storage_and_wire_never_carry_plaintext(tmp_path: Path, homes: list[Path]) -> None:
    """The phone is offline when the laptop sends: the message waits in the relay's
    mailbox, the chunks come through a relay pipe. Every byte between the nodes and the
    relay (recorded by a proxy) and every file of the relay lack the file's plaintext."""
    data = random_file(homes[1] / "secret.bin", 2 * MiB + 12345)
    recorded = bytearray()

    async def main() -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        proxy_port = listeners[0].socket.getsockname()[1]
        proxy_url = f"ws://127.0.0.1:{proxy_port}"
        relay = Relay(tmp_path / "relay-data", "--id", proxy_url)

        async def pipe(src: trio.SocketStream, dst: trio.SocketStream) -> None:
            try:
                while chunk := await src.receive_some(65536):
                    recorded.extend(chunk)
                    await dst.send_all(chunk)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                await dst.aclose()

        async def forward(client: trio.SocketStream) -> None:
            upstream = await trio.open_tcp_stream("127.0.0.1", relay.port)
            async with trio.open_nursery() as n:
                n.start_soon(pipe, client, upstream)
                n.start_soon(pipe, upstream, client)

        try:
            with trio.fail_after(90):
                async with trio.open_nursery() as nursery:
                    await nursery.start(trio.serve_listeners, forward, listeners)
                    async with open_node(homes[1], relays=[proxy_url]) as laptop:
                        await laptop.relays[0].wait_connected()
                        msg = await laptop.send_file(homes[1] / "secret.bin", "for your eyes")
                        async with open_node(homes[0], relays=[proxy_url]) as phone:
                            with phone.events() as events:
                                await until(events, complete)
                            out = homes[0] / "secret.out"
                            await phone.open_attachment(msg, out)
                            assert out.read_bytes() == data
                            assert phone.connected_peers == [laptop.device_id]
                            assert phone.status().peers[0].remote.startswith("relay:")
                    nursery.cancel_scope.cancel()
        finally:
            relay.stop()

    trio.run(main)
    assert len(recorded) > len(data)  # the file went through the proxy...
    stored = b"".join(p.read_bytes() for p in (tmp_path / "relay-data").rglob("*") if p.is_file())
    for offset in range(0, len(data) - 32, len(data) // 64):
        window = data[offset : offset + 32]
        assert window not in recorded  # ...but never in the clear
        assert window not in stored
    assert b"for your eyes" not in recorded
    assert b"secret.bin" not in recorded


def test_bytes_tampered_by_the_relay_are_refused_and_the_file_still_arrives(
    tmp_path: Path, homes: list[Path]
) -> None:
    """A relay (a proxy in front of it) flips one byte in the middle of the chunks it
    carries to the phone: the session's box refuses the frame, the connection is
    closed, and the phone fetches the chunk again through a new pipe."""
    data = random_file(homes[1] / "clip.mov", 4 * MiB)
    flipped: list[int] = []

    async def main() -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        proxy_url = f"ws://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        relay = Relay(tmp_path / "relay-data", "--id", proxy_url)

        async def pipe(src: trio.SocketStream, dst: trio.SocketStream, tamper: bool) -> None:
            seen = 0
            try:
                while chunk := await src.receive_some(65536):
                    seen += len(chunk)
                    if tamper and not flipped and seen > 2 * MiB:
                        chunk = chunk[:100] + bytes([chunk[100] ^ 0x40]) + chunk[101:]
                        flipped.append(seen)
                    await dst.send_all(chunk)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                await dst.aclose()

        async def forward(client: trio.SocketStream) -> None:
            upstream = await trio.open_tcp_stream("127.0.0.1", relay.port)
            async with trio.open_nursery() as n:
                n.start_soon(pipe, client, upstream, False)
                n.start_soon(pipe, upstream, client, True)  # relay -> device

        try:
            with trio.fail_after(90):
                async with trio.open_nursery() as nursery:
                    await nursery.start(trio.serve_listeners, forward, listeners)
                    async with open_node(homes[1], relays=[proxy_url]) as laptop:
                        await laptop.relays[0].wait_connected()
                        msg = await laptop.send_file(homes[1] / "clip.mov")
                        async with open_node(homes[0], relays=[proxy_url]) as phone:
                            refused: list[str] = []

                            def note(event: Any) -> bool:
                                if isinstance(event, ev.InputRejected):
                                    refused.append(event.error)
                                return complete(event)

                            with phone.events() as events:
                                await until(events, note)
                            assert refused == ["DecryptionFailed"]  # the pipe was cut
                            await phone.open_attachment(msg, homes[0] / "clip.out")
                            assert (homes[0] / "clip.out").read_bytes() == data
                            assert phone.media.stats.tampered == 0  # the box caught it first
                    nursery.cancel_scope.cancel()
        finally:
            relay.stop()

    trio.run(main)
    assert flipped  # the relay did tamper, and the file is intact all the same


def test_on_demand_policy_quota_and_eviction(homes: list[Path]) -> None:
    """``demand``: nothing is fetched until asked; over the quota the least recently used
    fetched file goes (never an own one), and can be fetched again."""
    random_file(homes[1] / "one.bin", MiB)
    random_file(homes[1] / "two.bin", MiB)

    async def main() -> None:
        with trio.fail_after(60):
            async with tcp_node(homes[1]) as laptop:
                one = await laptop.send_file(homes[1] / "one.bin")
                two = await laptop.send_file(homes[1] / "two.bin")
                same = await laptop.send_file(homes[1] / "one.bin", "again")
                own, _ = laptop.media.blobs.usage()
                assert own < 2 * MiB + 4096  # the same file twice is stored once
                laptop.media.set_policy(max_file=MiB - 1)
                with pytest.raises(MediaError, match="at most"):
                    await laptop.send_file(homes[1] / "one.bin")
                laptop.media.set_policy(max_file=100 * MiB)
                async with tcp_node(homes[0]) as phone:
                    phone.media.set_policy(fetch="demand", quota=MiB + 65536)
                    await phone.connect(laptop.address)
                    await wait_for(lambda: len(phone.messages()) == 3)
                    files = {m.attachment.id for m in phone.messages() if m.attachment}
                    assert len(files) == 2  # the same file twice is one file
                    # each file is decided once it is seen: on demand, left idle
                    await wait_for(
                        lambda: all(phone.media.blobs.file_state(f) is not None for f in files)
                    )
                    assert {phone.media.blobs.file_state(f) for f in files} == {"idle"}
                    assert phone.media.blobs.usage() == (0, 0)
                    with pytest.raises(MediaMissing):
                        await phone.open_attachment(one, homes[0] / "x")
                    with phone.events() as events:
                        await phone.fetch(one)
                        await until(events, complete)
                        await phone.fetch(two)
                        await until(events, lambda e: complete(e) and e.name == "two.bin")
                    rows = {r["id"]: r["file"] for r in phone.media.log_json(phone.messages())}
                    assert rows[two]["fetched"]
                    assert not rows[one]["fetched"]
                    assert not rows[same]["fetched"]  # the same file: same chunks
                    with phone.events() as events:
                        await phone.fetch(one)  # fetched again, and now two goes
                        await until(events, complete)
                    await phone.open_attachment(same, homes[0] / "one.out")
                    assert (homes[0] / "one.out").read_bytes() == (
                        homes[1] / "one.bin"
                    ).read_bytes()
                    assert laptop.media.blobs.usage()[0] == own  # own chunks stay

    trio.run(main)


def test_malformed_want_closes_the_connection_and_unasked_chunks_are_dropped(
    homes: list[Path],
) -> None:
    """A ``want`` that is not whole hashes cuts the peer off; a chunk nobody asked for is
    dropped quietly (a late answer is not an attack), and asking for chunks we lack gets
    ``nohave``."""

    async def main() -> None:
        with trio.fail_after(30):
            async with (
                tcp_node(homes[1]) as laptop,
                tcp_node(homes[0], peers=[laptop.address]) as phone,
            ):
                await wait_for(lambda: phone.device_id in laptop.connected_peers)
                peer = laptop.peers.get(phone.device_id)
                assert peer is not None
                data = b"not asked for"
                blob = peer.session.send_media("blob", h=b"\x03" * 32, d=data)
                laptop.peers.carry_out(peer, blob)
                laptop.peers.carry_out(peer, peer.session.send_media("ask", h=b"\x04" * 32))
                await wait_for(lambda: peer.session.stats.media_bytes_in > 0)  # the nohave
                assert phone.media.stats.unasked == 1
                assert laptop.device_id in phone.connected_peers
                with phone.events() as events:
                    laptop.peers.carry_out(peer, peer.session.send_media("ask", h=b"\x01" * 33))
                    rejected = await until(events, lambda e: isinstance(e, ev.InputRejected))
                    assert (rejected.error, rejected.device) == ("MalformedFrame", laptop.device_id)

    trio.run(main)
