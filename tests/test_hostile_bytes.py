"""Bytes from outside cost at most a small multiple of their size, wherever they arrive.

msgpack decodes one byte of a nested empty array (``0x90``) into a 56-byte Python list:
16 MiB of them took a node from 40 MiB to 1.2 GiB and blocked its loop for seconds. Each
test here sends such a "bomb" where a stranger can (the first TCP frame of a real
``p2p run``, the first frame through a relay pipe, a ``p2p link`` device waiting for its
primary, a relay before login), and checks that the receiver refuses it with a typed
error, closes the connection and keeps its peak memory (VmHWM of the real process, or
tracemalloc in this one) under ten times the bomb's size.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
from procs import Linker, Node, Relay, closed_by_peer, wait_until
from trio_websocket import ConnectionClosed as WsClosed
from trio_websocket import wrap_client_stream

from p2p.errors import BadDescriptor, FrameTooLarge, MalformedFrame, TooComplex, WireError
from p2p.media.descriptor import parse_file_body
from p2p.proto import relay_protocol as protocol
from p2p.proto import wire
from p2p.proto.identity import DeviceKeys
from p2p.proto.pairing import PairingCode
from p2p.state.device import DeviceState
from p2p.testing import provision_homes
from p2p.transport.base import Connection, ConnectionClosed, TransportError
from p2p.transport.relay import RelayClient, RelayPipe, relay_address

MiB = 1024 * 1024
BOUND = 10
"""A bomb may cost the receiver at most this many times its size."""


def bomb(size: int) -> bytes:
    """``size`` bytes of msgpack: one array of ``size - 5`` empty arrays."""
    n = size - 5
    return b"\xdd" + n.to_bytes(4, "big") + b"\x90" * n


def deep_bomb(size: int) -> bytes:
    """``size`` bytes of msgpack: single-element arrays nested as deep as they go."""
    return b"\x91" * (size - 1) + b"\x90"


def map_bomb(size: int) -> bytes:
    """``size`` bytes of msgpack: one array of ``size - 5`` empty maps (64 bytes each)."""
    n = size - 5
    return b"\xdd" + n.to_bytes(4, "big") + b"\x80" * n


def peak_growth(action: Callable[[], object]) -> int:
    """Peak bytes traced while ``action`` runs, above what was traced before it."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        action()
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


def refused(decode: Callable[[bytes], object], data: bytes) -> type[Exception]:
    try:
        decode(data)
    except WireError as exc:
        return type(exc)
    raise AssertionError("the bomb was accepted")


# ---- the decoders, in this process ----------------------------------------------------

DECODERS: dict[str, Callable[[bytes], object]] = {
    "frame": wire.decode_frame,
    "unpack": lambda b: wire.unpack(b, what="test"),
    "relay_client": protocol.decode_client,
    "relay_server": protocol.decode_server,
}


@pytest.mark.parametrize("shape", [bomb, deep_bomb, map_bomb], ids=["wide", "deep", "maps"])
@pytest.mark.parametrize("decoder", sorted(DECODERS))
def test_decoders_refuse_bombs_within_a_small_multiple_of_their_size(
    decoder: str, shape: Callable[[int], bytes]
) -> None:
    data = shape(MiB)
    decode = DECODERS[decoder]
    errors: list[type[Exception]] = []
    grown = peak_growth(lambda: errors.append(refused(decode, data)))
    assert issubclass(errors[0], MalformedFrame)
    assert grown < BOUND * len(data), f"{decoder} grew {grown} bytes for {len(data)}"


def test_the_scan_passes_what_our_formats_hold() -> None:
    """Deep enough and wide enough for every value we encode ourselves."""
    values: list[Any] = [
        None,
        [1, -20, 2**64 - 1, -(2**63), 1.5, "é" * 300, b"x" * 70000, True],
        {"a": [[1, [2, [3, [4, [5]]]]]]},
        msgpack.ExtType(3, b"abc"),
        [[b"k" * 32, 7] for _ in range(500)],
    ]
    for value in values:
        data = msgpack.packb(value, use_bin_type=True)
        assert wire.unpack(data, what="t") == msgpack.unpackb(data, strict_map_key=False)


# ---- JSON from members and from disk ---------------------------------------------------

NESTED = "[" * 30_000 + "]" * 30_000
"""60 KB of JSON, well within an entry's body, and far past json.loads' recursion limit."""


def test_a_deeply_nested_file_body_is_a_bad_descriptor() -> None:
    with pytest.raises(BadDescriptor):
        parse_file_body(NESTED)
    with pytest.raises(BadDescriptor):
        parse_file_body('{"text": "x", "file": ' + NESTED + "}")


def test_a_deeply_nested_receipt_is_ignored() -> None:
    state, _ = DeviceState.create_account("me")
    chat = state.chat_by_name("notes").id
    receipt = state.new_entry(chat, "rcpt", 1_767_225_600_000, body=NESTED)
    state.write_local(chat, [receipt])
    assert state.delivery(chat, []) == {}  # the receipt says nothing; no RecursionError


def test_load_json_bounds_depth_and_size_before_parsing() -> None:
    assert wire.load_json(
        '{"a": [1, "[[[[", {"b": "\\\\\\"["}]}', what="t", max_size=100, max_depth=3
    )
    with pytest.raises(TooComplex):
        wire.load_json(NESTED, what="t", max_size=10**6, max_depth=8)
    with pytest.raises(FrameTooLarge):
        wire.load_json("[]" * 100, what="t", max_size=100, max_depth=8)
    with pytest.raises(MalformedFrame):
        wire.load_json(b"\xff", what="t", max_size=100, max_depth=8)
    assert wire.json_depth('"\\\\"[') == 1  # an escaped backslash escapes no quote


# ---- real processes ---------------------------------------------------------------------


def peak_rss(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def rejected(node: Node, error: str) -> bool:
    return any(
        e.get("event") == "input_rejected" and e.get("error") == error for e in node.drain(0.2)
    )


@pytest.mark.slow
def test_a_bomb_as_the_first_tcp_frame_leaves_the_node_as_it_was(
    tmp_path: Path, nodes: list[Node]
) -> None:
    homes = [tmp_path / "phone", tmp_path / "laptop"]
    provision_homes(homes)
    phone = Node(homes[0], "--listen", "127.0.0.1:0", "--no-mdns")
    nodes.append(phone)
    host, port = phone.address.rsplit(":", 1)
    before = peak_rss(phone.proc.pid)
    # a frame the transport refuses on its length, and one under the handshake limit that
    # the decoder refuses on its shape; each as the first frame of a connection
    for data, error in ((bomb(2 * MiB), "FrameTooLarge"), (bomb(60 * 1024), "TooComplex")):
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(len(data).to_bytes(4, "big") + data)
            assert closed_by_peer(sock, within=20)
        wait_until(lambda error=error: rejected(phone, error), timeout=20)  # type: ignore[misc]
    grown = peak_rss(phone.proc.pid) - before
    assert grown < BOUND * 2 * MiB, f"the node grew by {grown} bytes"
    # and it still serves: its companion meets it
    laptop = Node(homes[1], "--listen", "127.0.0.1:0", "--no-mdns", "--peer", phone.address)
    nodes.append(laptop)
    laptop.wait_for("peer_connected", device=phone.device)


async def close_code_after(url: str, message: bytes) -> int | None:
    """Send ``message`` right after the challenge; the code the relay closes with. The
    TCP stream is ours to close: trio-websocket leaves it open when the relay closes."""
    host, port = url.removeprefix("ws://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    try:
        async with trio.open_nursery() as nursery:
            ws = await wrap_client_stream(
                nursery, stream, f"{host}:{port}", "/", max_message_size=4 * MiB
            )
            try:
                with trio.fail_after(20):
                    await ws.get_message()  # the challenge
                    await ws.send_message(message)
                    while True:
                        await ws.get_message()
            except WsClosed as exc:
                return exc.reason.code if exc.reason is not None else None
            finally:
                with trio.move_on_after(2):
                    await ws.aclose()
                nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(stream)


@pytest.mark.slow
def test_a_bomb_before_login_leaves_the_relay_as_it_was(relay: Relay) -> None:
    before = peak_rss(relay.proc.pid)
    big = bomb(2 * MiB - 64)  # within the relay's message limit, far past a login's size
    assert trio.run(close_code_after, relay.url, big) == 1009  # too big, before any decoding
    small = bomb(3 * 1024)  # within the pre-login limit: refused on its shape
    assert trio.run(close_code_after, relay.url, small) == 1008
    grown = peak_rss(relay.proc.pid) - before
    assert grown < BOUND * len(big), f"the relay grew by {grown} bytes"
    # and it still lets a device log in
    client = RelayClient(relay.url, DeviceKeys.generate())

    async def logs_in() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(client.serve, _refuse)
            with trio.fail_after(10):
                await client.wait_connected()
            nursery.cancel_scope.cancel()

    trio.run(logs_in)


async def _refuse(conn: Connection) -> None:
    await conn.aclose()


async def dial(client: RelayClient, address: str) -> RelayPipe:
    """A pipe to ``address``, once its device is on the relay (bounded retries)."""
    for _ in range(100):
        try:
            return await client.dial(address)
        except TransportError:
            await trio.sleep(0.2)
    raise AssertionError(f"{address} never came online")


async def pipe_bombs(url: str, target: str, bombs: list[bytes]) -> list[bool]:
    """Open a pipe to ``target`` for each bomb, send it as the first frame; whether the
    pipe was closed by the other end."""
    client = RelayClient(url, DeviceKeys.generate())
    closed = []
    async with trio.open_nursery() as nursery:
        await nursery.start(client.serve, _refuse)
        with trio.fail_after(10):
            await client.wait_connected()
        for data in bombs:
            pipe = await dial(client, relay_address(target))
            await pipe.send(data)
            with trio.move_on_after(20):
                try:
                    while True:
                        await pipe.receive()
                except ConnectionClosed:
                    closed.append(True)
                    continue
            closed.append(False)
        nursery.cancel_scope.cancel()
    return closed


@pytest.mark.slow
def test_a_bomb_through_a_relay_pipe_leaves_the_node_as_it_was(
    tmp_path: Path, relay: Relay, nodes: list[Node]
) -> None:
    homes = [tmp_path / "phone"]
    provision_homes(homes)
    phone = Node(homes[0], "--listen", "127.0.0.1:0", "--no-mdns", "--relay", relay.url)
    nodes.append(phone)
    before = peak_rss(phone.proc.pid)
    big, small = bomb(MiB - 4096), bomb(60 * 1024)  # past a hello, within any frame
    assert trio.run(pipe_bombs, relay.url, phone.device, [big, small]) == [True, True]
    wait_until(lambda: rejected(phone, "FrameTooLarge"), timeout=20)
    wait_until(lambda: rejected(phone, "TooComplex"), timeout=20)
    grown = peak_rss(phone.proc.pid) - before
    assert grown < BOUND * len(big), f"the node grew by {grown} bytes"


@pytest.mark.slow
def test_a_bomb_at_a_device_waiting_to_be_linked_leaves_it_waiting(tmp_path: Path) -> None:
    linker = Linker(tmp_path / "new", "tablet")
    try:
        code = PairingCode.decode(linker.code)
        host, port = code.addresses[0].rsplit(":", 1)
        time.sleep(0.5)  # let it settle before the baseline
        before = peak_rss(linker.proc.pid)
        for data in (bomb(MiB + 4096), bomb(60 * 1024)):
            with socket.create_connection((host, int(port)), timeout=5) as sock:
                sock.sendall(len(data).to_bytes(4, "big") + data)
                assert closed_by_peer(sock, within=20)
        linker.wait_line(lambda _: linker.count("failed") >= 2, timeout=20)
        failures = [e for e in linker.events if e.get("event") == "failed"]
        assert [f.get("error") for f in failures] == ["FrameTooLarge", "TooComplex"]
        grown = peak_rss(linker.proc.pid) - before
        assert grown < BOUND * 2 * MiB, f"the waiting device grew by {grown} bytes"
        assert linker.alive  # still waiting for its primary
    finally:
        linker.kill()


# ---- the control socket -----------------------------------------------------------------


def control_reply(home: Path, line: bytes) -> dict[str, Any]:
    """Send one raw request line on the node's control socket; its parsed reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(20)
        sock.connect(str(home / "control.sock"))
        # a line past the limit is answered before it is all read
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(line + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    reply = json.loads(data)
    assert isinstance(reply, dict)
    return reply


@pytest.mark.slow
def test_any_control_request_gets_a_reply_and_the_node_goes_on(
    tmp_path: Path, nodes: list[Node]
) -> None:
    home = tmp_path / "phone"
    provision_homes([home])
    phone = Node(home, "--listen", "127.0.0.1:0", "--no-mdns")
    nodes.append(phone)
    hostile = {
        b"[" * 100_000 + b"]" * 100_000: "TooComplex",  # was a RecursionError: the node died
        b'{"op": "status", "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}": "TooComplex",
        b'{"op": "media", "set": {"no_such_setting": 1}}': None,  # any error, but a reply
        b"\xff\xfe not utf-8": "MalformedFrame",
        b'{"op": "send", "text": "' + b"x" * 300_000 + b'"}': None,  # past MAX_LINE
        b'{"op": 1}': "ControlError",
    }
    for line, error in hostile.items():
        reply = control_reply(home, line)
        assert reply["ok"] is False, reply
        if error is not None:
            assert reply["error"] == error, reply
        assert phone.proc.poll() is None, phone.stderr()
    status = control_reply(home, b'{"op": "status"}')
    assert status["ok"] is True
