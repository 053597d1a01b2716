"""The relay end to end: a real ``python -m p2p.relay`` process, real websockets, loopback.

- misbehaving clients (bad auth, replayed auth, silence, oversized messages, floods, junk)
  are each cut off with the right websocket close code, and logged, while a legitimate
  pair of devices keeps talking through the same relay;
- mail survives the relay being SIGKILLed, is delivered when its device connects, and
  is gone once acked; quotas are refused to the sender; expired mail is purged;
- presence: watching a device reports it coming online and going offline;
- pipes end when a device's relay connection ends.

The transport acceptance suite runs against the relay in ``test_relay_transport.py``.
"""

from __future__ import annotations

import itertools
import random
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from procs import echo, serving
from trio_websocket import ConnectionClosed as WsClosed
from trio_websocket import WebSocketConnection, wrap_client_stream

from p2p.discovery.base import Found
from p2p.errors import MailboxFull, MailTooLarge
from p2p.proto.identity import DeviceKeys
from p2p.proto.relay_protocol import DOMAIN_AUTH, auth_message, decode_server, encode_client
from p2p.runtime.node import open_node
from p2p.testing import provision_account
from p2p.transport.base import Connection, ConnectionClosed, TransportError
from p2p.transport.relay import Presence, RelayClient, relay_address
from p2p.transport.routed import RoutedTransport
from p2p.transport.tcp import TcpTransport

pytestmark = pytest.mark.slow

_numbers = itertools.count()


async def until(predicate: Callable[[], bool]) -> None:
    """Poll a condition that has no event to wait on (a file another process writes,
    the state of several nodes together)."""
    while not predicate():  # noqa: ASYNC110
        await trio.sleep(0.05)


def mail_rows(data: Path) -> int:
    conn = sqlite3.connect(data / "relay.db")
    try:
        count: int = conn.execute("SELECT count(*) FROM mail").fetchone()[0]
        return count
    finally:
        conn.close()


# ---- misbehaving clients ----------------------------------------------------------


@asynccontextmanager
async def raw_ws(url: str) -> AsyncIterator[WebSocketConnection]:
    """A bare websocket to the relay, speaking the protocol by hand. We close the TCP
    stream ourselves: trio-websocket leaves it open when the relay closes first."""
    host, port = url.removeprefix("ws://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    try:
        async with trio.open_nursery() as nursery:
            ws = await wrap_client_stream(nursery, stream, f"{host}:{port}", "/")
            try:
                yield ws
            finally:
                with trio.move_on_after(2):
                    await ws.aclose()
                nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(stream)


def code_of(exc: WsClosed) -> int:
    return -1 if exc.reason is None else exc.reason.code


async def close_code(ws: WebSocketConnection) -> int:
    """Read until the relay closes the websocket; its close code."""
    with trio.fail_after(10):
        while True:
            try:
                await ws.get_message()
            except WsClosed as exc:
                return code_of(exc)


async def send(ws: WebSocketConnection, message: bytes | str) -> int | None:
    """Send; the close code if the relay closed the websocket meanwhile."""
    try:
        await ws.send_message(message)
    except WsClosed as exc:
        return code_of(exc)
    return None


async def challenge(ws: WebSocketConnection) -> tuple[bytes, str]:
    message = await ws.get_message()
    assert isinstance(message, bytes)
    decoded = decode_server(message)
    assert decoded["t"] == "challenge"
    return decoded["nonce"], decoded["relay"]


def auth(keys: DeviceKeys, nonce: bytes, relay: str, *, dev: str | None = None) -> bytes:
    signature = keys.sign(DOMAIN_AUTH, auth_message(nonce, relay))
    return encode_client("auth", dev=dev or keys.device_id, pk=keys.sign_pk, sig=signature)


async def authenticated(ws: WebSocketConnection) -> None:
    nonce, relay = await challenge(ws)
    await ws.send_message(auth(DeviceKeys.generate(), nonce, relay))
    welcome = await ws.get_message()
    assert isinstance(welcome, bytes)
    assert decode_server(welcome)["t"] == "welcome"


async def wrong_signature(url: str) -> int:
    async with raw_ws(url) as ws:
        _nonce, _ = await challenge(ws)
        keys = DeviceKeys.generate()
        await ws.send_message(
            encode_client("auth", dev=keys.device_id, pk=keys.sign_pk, sig=bytes(64))
        )
        return await close_code(ws)


async def signed_for_another_relay(url: str) -> int:
    async with raw_ws(url) as ws:
        nonce, _ = await challenge(ws)
        await ws.send_message(auth(DeviceKeys.generate(), nonce, "ws://another-relay.test:7700"))
        return await close_code(ws)


async def signed_for_another_nonce(url: str) -> int:
    keys = DeviceKeys.generate()
    async with raw_ws(url) as first, raw_ws(url) as second:
        nonce, relay = await challenge(first)
        await challenge(second)
        await second.send_message(auth(keys, nonce, relay))  # replayed on another connection
        return await close_code(second)


async def someone_elses_id(url: str) -> int:
    async with raw_ws(url) as ws:
        nonce, relay = await challenge(ws)
        other = DeviceKeys.generate().device_id
        await ws.send_message(auth(DeviceKeys.generate(), nonce, relay, dev=other))
        return await close_code(ws)


async def never_authenticating(url: str) -> int:
    async with raw_ws(url) as ws:
        began = trio.current_time()
        await challenge(ws)
        code = await close_code(ws)
        assert 0.8 <= trio.current_time() - began <= 5  # --auth-timeout 1
        return code


async def oversized(url: str) -> int:
    async with raw_ws(url) as ws:
        await authenticated(ws)
        return await send(ws, bytes(3 * 1024 * 1024)) or await close_code(ws)


async def flood(url: str) -> int:
    async with raw_ws(url) as ws:
        await authenticated(ws)
        for n in range(1000):  # --msg-burst 200: far past it, with no pacing
            code = await send(ws, encode_client("ping", n=n))
            if code is not None:
                return code
        return await close_code(ws)


async def text_message(url: str) -> int:
    async with raw_ws(url) as ws:
        await authenticated(ws)
        await ws.send_message("hello")
        return await close_code(ws)


async def junk(url: str) -> int:
    async with raw_ws(url) as ws:
        await authenticated(ws)
        await ws.send_message(b"\xc1 not msgpack")
        return await close_code(ws)


async def auth_twice(url: str) -> int:
    async with raw_ws(url) as ws:
        await authenticated(ws)
        await ws.send_message(auth(DeviceKeys.generate(), bytes(32), "x"))
        return await close_code(ws)


ATTACKS = {
    wrong_signature: 1008,
    signed_for_another_relay: 1008,
    signed_for_another_nonce: 1008,
    someone_elses_id: 1008,
    never_authenticating: 1008,
    oversized: 1009,
    flood: 1008,
    text_message: 1003,
    junk: 1008,
    auth_twice: 1008,
}


def test_misbehaving_clients_are_cut_off_while_a_legit_pair_keeps_talking(relays: Any) -> None:
    relay = relays("--auth-timeout", "1", "--msg-rate", "100", "--msg-burst", "200")
    a_keys, b_keys = DeviceKeys.generate(), DeviceKeys.generate()
    a, b = RelayClient(relay.url, a_keys), RelayClient(relay.url, b_keys)
    codes: dict[str, int] = {}
    rounds = 0

    async def attack(fn: Callable[[str], Awaitable[int]]) -> None:
        codes[fn.__name__] = await fn(relay.url)

    async def talk(pipe: Connection) -> None:
        nonlocal rounds
        while True:
            frame = b"%d" % rounds
            await pipe.send(frame)
            assert await pipe.receive() == frame
            rounds += 1

    async def main() -> None:
        with trio.fail_after(30):
            async with serving(a, b) as nursery:
                pipe = await a.dial(b.address)
                nursery.start_soon(talk, pipe)
                await trio.sleep(0.3)
                before = rounds
                async with trio.open_nursery() as attacks:
                    for fn in ATTACKS:
                        attacks.start_soon(attack, fn)
                during = rounds - before
                await trio.sleep(0.3)
                assert rounds > before + during  # still talking after the attacks
                assert during > 20, during  # and talking all through them
                assert a.connected
                assert b.connected

    trio.run(main)
    assert codes == {fn.__name__: code for fn, code in ATTACKS.items()}
    assert relay.alive
    assert relay.stop() == 0
    log = relay.log()
    for reason in (
        "bad signature",
        "device id does not match",
        "authentication timeout",
        "1009 message too big",
        "rate limit exceeded",
        "text messages",
        "malformed message",
        "unexpected auth",
    ):
        assert reason in log, reason
    assert "Traceback" not in log


def test_random_well_formed_traffic_never_hurts_the_relay(relays: Any) -> None:
    """Valid messages in senseless order (data on pipes never opened, closes of nothing,
    acks of unknown mail, opens to strangers, to ourselves, twice): the relay answers or
    ignores each, or closes that one connection; it never fails, and others are served."""
    relay = relays()
    keys = [DeviceKeys.generate() for _ in range(3)]
    ids = [k.device_id for k in keys]
    unscathed = 0

    def message(rng: random.Random) -> bytes:
        cid = rng.choice([0, 1, 2, 2**31, 2**31 + 1, 2**32 - 1])
        kind = rng.choice(["open", "data", "close", "watch", "post", "ack", "ping"])
        if kind == "open":
            return encode_client("open", to=rng.choice(ids), cid=cid % 2**31)
        if kind == "data":
            return encode_client("data", cid=cid, data=rng.randbytes(20), more=rng.random() < 0.5)
        if kind == "close":
            return encode_client("close", cid=cid)
        if kind == "watch":
            return encode_client("watch", ids=rng.sample(ids, rng.randint(0, 3)))
        if kind == "post":
            return encode_client("post", to=rng.choice(ids), id=rng.randbytes(16), data=b"x")
        if kind == "ack":
            return encode_client("ack", ids=[rng.randbytes(16)])
        return encode_client("ping", n=rng.randint(0, 2**62))

    async def chatter(k: DeviceKeys, seed: int) -> None:
        nonlocal unscathed
        rng = random.Random(seed)  # one per session: its messages do not depend on timing
        async with raw_ws(relay.url) as ws:
            nonce, relay_id = await challenge(ws)
            await ws.send_message(auth(k, nonce, relay_id))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(close_code, ws)  # keep reading what the relay says
                for _ in range(300):
                    if await send(ws, message(rng)) is not None:
                        break
                else:
                    unscathed += 1
                nursery.cancel_scope.cancel()

    async def main() -> None:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for seed, k in enumerate(keys, start=5):
                    nursery.start_soon(chatter, k, seed)
            a, b = (RelayClient(relay.url, DeviceKeys.generate()) for _ in range(2))
            async with serving(a, b):  # and it still serves everyone else
                pipe = await a.dial(b.address)
                await pipe.send(b"fine")
                assert await pipe.receive() == b"fine"

    trio.run(main)
    assert relay.alive
    relay.stop()
    assert "Traceback" not in relay.log()
    assert unscathed >= 1  # some sessions ran all their messages without a violation


def test_a_device_holds_a_bounded_number_of_connections(relays: Any) -> None:
    relay = relays("--connections-per-device", "2")
    keys = DeviceKeys.generate()

    async def main() -> None:
        with trio.fail_after(20):
            sockets = []
            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    ws = await nursery.start(_hold, relay.url, keys)
                    sockets.append(ws)
                assert await close_code(sockets[0]) == 1008  # the oldest is evicted
                assert sockets[1].closed is None
                assert sockets[2].closed is None
                nursery.cancel_scope.cancel()

    trio.run(main)
    assert "replaced by a newer connection" in (relay.stop(), relay.log())[1]


async def _hold(
    url: str,
    keys: DeviceKeys,
    *,
    task_status: trio.TaskStatus[WebSocketConnection] = trio.TASK_STATUS_IGNORED,
) -> None:
    async with raw_ws(url) as ws:
        nonce, relay = await challenge(ws)
        await ws.send_message(auth(keys, nonce, relay))
        await ws.get_message()  # welcome
        task_status.started(ws)
        await trio.sleep_forever()


def test_the_client_will_not_sign_for_another_relay(relays: Any) -> None:
    """A relay that names itself differently from the URL we dialed (a malicious relay
    forwarding another relay's challenge, or a misconfigured one) gets no signature."""
    relay = relays("--id", "ws://the-real-relay.test:7700")
    client = RelayClient(relay.url, DeviceKeys.generate())

    async def main() -> None:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                await nursery.start(client.serve, echo)
                await until(lambda: "RelayAuthFailed" in client.last_error)
                assert "the-real-relay.test" in client.last_error
                assert not client.connected
                nursery.cancel_scope.cancel()

    trio.run(main)
    assert "auth" not in relay.log()  # it never saw an auth message to refuse


# ---- pipes and presence ------------------------------------------------------------


def test_presence_reports_online_and_offline(relays: Any) -> None:
    relay = relays()
    a_keys, b_keys, c_keys = (DeviceKeys.generate() for _ in range(3))
    watched = [b_keys.device_id]
    a = RelayClient(relay.url, a_keys, watch=lambda: watched)
    b = RelayClient(relay.url, b_keys)
    c = RelayClient(relay.url, c_keys)

    async def main() -> None:
        with trio.fail_after(20):
            changes = a.presence()
            found_send, found = trio.open_memory_channel[Found](10)
            async with serving(a) as nursery:
                await nursery.start(a.run, found_send)
                assert await changes.receive() == Presence(device=b.device_id, online=False)
                async with serving(b):
                    assert await changes.receive() == Presence(device=b.device_id, online=True)
                    assert await found.receive() == Found(
                        address=relay_address(b.device_id), source="relay", device=b.device_id
                    )
                    assert a.online == {b.device_id}
                assert await changes.receive() == Presence(device=b.device_id, online=False)
                assert a.online == frozenset()
                async with serving(c):
                    watched.append(c.device_id)
                    a.update_watch()
                    seen = {await changes.receive(), await changes.receive()}
                    assert Presence(device=c.device_id, online=True) in seen

    trio.run(main)


def test_dialing_an_offline_device_and_losing_the_peer(relays: Any) -> None:
    relay = relays()
    a, b = (RelayClient(relay.url, DeviceKeys.generate()) for _ in range(2))

    async def main() -> None:
        with trio.fail_after(20):
            async with serving(a):
                with pytest.raises(TransportError, match="not connected"):
                    await a.dial(b.address)
                with pytest.raises(TransportError):
                    await a.dial(relay_address(a.device_id))  # ourselves
                async with serving(b) as b_nursery:
                    pipe = await a.dial(b.address)
                    await pipe.send(b"ping")
                    assert await pipe.receive() == b"ping"
                    assert pipe.remote == b.address
                    b_nursery.cancel_scope.cancel()  # b's relay connection ends
                with pytest.raises(ConnectionClosed):
                    await pipe.receive()
                with pytest.raises(ConnectionClosed):
                    await pipe.send(b"more")

    trio.run(main)


def test_the_client_reconnects_after_the_relay_restarts(relays: Any) -> None:
    first = relays("--id", "ws://relay.test")
    a, b = (
        RelayClient(first.url, DeviceKeys.generate(), relay_id="ws://relay.test") for _ in range(2)
    )

    async def main() -> None:
        with trio.fail_after(30):
            async with serving(a, b):
                pipe = await a.dial(b.address)
                first.kill()
                with pytest.raises(ConnectionClosed):
                    await pipe.receive()
                # the new relay gets another port: point the clients at it, as DNS would
                second = relays("--id", "ws://relay.test")
                a.url = b.url = second.url
                with trio.fail_after(15):
                    await a.wait_connected()
                    await b.wait_connected()
                pipe = await a.dial(b.address)
                await pipe.send(b"again")
                assert await pipe.receive() == b"again"

    trio.run(main)


def test_two_nodes_sync_through_the_relay(relays: Any) -> None:
    """The relay client is the node's transport and discovery: the devices find each
    other by presence, run their end-to-end sync session over a pipe, and converge."""
    relay = relays()
    stores = provision_account(2)
    keys = [DeviceKeys.from_record(store.get("device/keys") or b"") for store in stores]
    ids = [k.device_id for k in keys]
    clients = [
        RelayClient(relay.url, k, watch=lambda me=me: [i for i in ids if i != me])
        for k, me in zip(keys, ids, strict=True)
    ]

    async def main() -> None:
        with trio.fail_after(30):
            async with (
                open_node(store=stores[0], transport=clients[0], discovery=[clients[0]]) as phone,
                open_node(store=stores[1], transport=clients[1], discovery=[clients[1]]) as laptop,
            ):
                await phone.send("through the relay")
                await laptop.send("and back")
                await until(lambda: len(phone.messages()) == len(laptop.messages()) == 2)
                assert [m.text for m in phone.messages()] == [m.text for m in laptop.messages()]
                assert phone.connected_peers == [laptop.device_id]
                assert phone.status().peers[0].remote == relay_address(laptop.device_id)

    trio.run(main)


def test_routed_transport_dials_tcp_and_relay_addresses(relays: Any) -> None:
    relay = relays()
    a = RoutedTransport(
        TcpTransport("127.0.0.1:0"), [RelayClient(relay.url, DeviceKeys.generate())]
    )
    b = RoutedTransport(
        TcpTransport("127.0.0.1:0"), [RelayClient(relay.url, DeviceKeys.generate())]
    )

    async def main() -> None:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                await nursery.start(a.serve, echo)
                await nursery.start(b.serve, echo)
                await b.relays[0].wait_connected()
                for address in b.addresses:
                    conn = await a.dial(address)
                    await conn.send(address.encode())
                    assert await conn.receive() == address.encode()
                    await conn.aclose()
                assert b.address == b.addresses[0] != b.relays[0].address
                nursery.cancel_scope.cancel()

    trio.run(main)


# ---- mailbox ---------------------------------------------------------------------


def test_mail_survives_a_killed_relay_and_is_deleted_once_acked(
    relays: Any, tmp_path: Path
) -> None:
    data = tmp_path / "relay-data"
    first = relays(data=data)
    a_keys, b_keys = DeviceKeys.generate(), DeviceKeys.generate()
    items = [b"sealed envelope %d" % i for i in range(3)]

    async def post_all() -> None:
        a = RelayClient(first.url, a_keys)
        with trio.fail_after(20):
            async with serving(a):
                for item in items:
                    await a.post(b_keys.device_id, item)
                await a.post(b_keys.device_id, items[0])  # a retry: stored once

    trio.run(post_all)
    first.kill()  # SIGKILL: no chance to flush anything it had not already committed
    second = relays(data=data)
    assert mail_rows(data) == 3

    async def receive_all() -> None:
        b = RelayClient(second.url, b_keys)
        with trio.fail_after(20):
            async with serving(b):
                inbox = b.mail()
                got = [await inbox.receive() for _ in items]
                assert [m.data for m in got] == items
                assert {m.sender for m in got} == {a_keys.device_id}
                await got[0].ack()
                await b.ack([m.id for m in got[1:]])
                await until(lambda: mail_rows(data) == 0)

    trio.run(receive_all)

    async def nothing_left() -> None:
        b = RelayClient(second.url, b_keys)
        async with serving(b):
            with trio.move_on_after(0.5) as timer:
                await b.mail().receive()
            assert timer.cancelled_caught

    trio.run(nothing_left)


def test_mail_arrives_while_connected(relays: Any) -> None:
    relay = relays()
    a, b = (RelayClient(relay.url, DeviceKeys.generate()) for _ in range(2))

    async def main() -> None:
        with trio.fail_after(20):
            async with serving(a, b):
                await a.post(b.device_id, b"live")
                mail = await b.mail().receive()
                assert (mail.sender, mail.data) == (a.device_id, b"live")

    trio.run(main)


def test_a_full_mailbox_is_refused_to_the_sender(relays: Any) -> None:
    relay = relays("--mailbox-count", "3", "--mailbox-bytes", "10000", "--max-mail", "6000")
    a, b = (RelayClient(relay.url, DeviceKeys.generate()) for _ in range(2))

    async def main() -> None:
        with trio.fail_after(20):
            async with serving(a):
                for i in range(3):
                    await a.post(b.device_id, b"%d" % i)
                with pytest.raises(MailboxFull) as full:
                    await a.post(b.device_id, b"one too many")
                assert (full.value.code, full.value.recipient) == ("quota", b.device_id)
                with pytest.raises(MailTooLarge):
                    await a.post(b.device_id, bytes(6001))
                async with serving(b):  # b takes its mail: room again
                    inbox = b.mail()
                    await b.ack([(await inbox.receive()).id for _ in range(3)])
                    with trio.fail_after(5):
                        while True:
                            try:
                                await a.post(b.device_id, bytes(5000))
                                break
                            except MailboxFull:  # the ack may still be on its way
                                await trio.sleep(0.05)
                with pytest.raises(MailboxFull):  # bytes: 5000 + 5001 > 10000
                    await a.post(b.device_id, bytes(5001))

    trio.run(main)


def test_expired_mail_is_purged_periodically_and_on_start(relays: Any, tmp_path: Path) -> None:
    data = tmp_path / "relay-data"
    relay = relays("--mail-ttl", "2", data=data)
    a_keys, b_keys = DeviceKeys.generate(), DeviceKeys.generate()

    async def post(url: str, item: bytes) -> None:
        a = RelayClient(url, a_keys)
        with trio.fail_after(20):
            async with serving(a):
                await a.post(b_keys.device_id, item)

    trio.run(post, relay.url, b"soon gone")
    assert mail_rows(data) == 1
    deadline = time.monotonic() + 5
    while mail_rows(data) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert mail_rows(data) == 0  # purged by the running relay (every ttl/4)

    trio.run(post, relay.url, b"gone on restart")
    relay.kill()
    assert mail_rows(data) == 1
    time.sleep(2.1)
    restarted = relays("--mail-ttl", "2", data=data)
    assert mail_rows(data) == 0  # purged before it listened

    async def nothing() -> None:
        b = RelayClient(restarted.url, b_keys)
        async with serving(b):
            with trio.move_on_after(0.3) as timer:
                await b.mail().receive()
            assert timer.cancelled_caught

    trio.run(nothing)


def test_connections_are_counted_and_bounded_from_tcp_accept(relays: Any) -> None:
    """Sockets that never finish the websocket handshake hold descriptors: past the
    bounds they are closed at once, not after the auth timeout, and the relay serves
    devices again once they are gone."""
    relay = relays("--max-connections", "6", "--max-handshakes", "4", "--auth-timeout", "6")
    host, port = relay.url.removeprefix("ws://").rsplit(":", 1)

    async def closed_soon(stream: trio.SocketStream) -> bool:
        with trio.move_on_after(3):
            try:
                return await stream.receive_some(1) == b""
            except trio.BrokenResourceError:
                return True
        return False

    async def main() -> None:
        began = trio.current_time()
        silent = [await trio.open_tcp_stream(host, int(port)) for _ in range(10)]
        try:
            verdicts: list[bool] = [False] * len(silent)

            async def check(i: int) -> None:
                verdicts[i] = await closed_soon(silent[i])

            async with trio.open_nursery() as nursery:
                for i in range(len(silent)):
                    nursery.start_soon(check, i)
            assert verdicts.count(True) == 6  # 4 still held, waiting for their handshake
        finally:
            for stream in silent:
                await trio.aclose_forcefully(stream)
        # the held ones end at the auth timeout (trio-websocket does not notice a client
        # that hangs up before its handshake)
        await trio.sleep_until(began + 6.5)
        a, b = (
            RelayClient(relay.url, DeviceKeys.generate()),
            RelayClient(relay.url, DeviceKeys.generate()),
        )
        with trio.fail_after(20):
            async with serving(a, b):
                pipe = await a.dial(relay_address(b.device_id))
                await pipe.send(b"still served")
                assert await pipe.receive() == b"still served"

    trio.run(main)
    assert "refusing connections" in relay.log()


def test_empty_mail_is_refused_and_tiny_mail_counts_per_sender(relays: Any) -> None:
    """Empty items cost a row and no bytes: refused. One fresh key filling many victims'
    mailboxes with 1-byte items is stopped by its item quota."""
    relay = relays("--sender-count", "5")
    victims = [DeviceKeys.generate().device_id for _ in range(6)]

    async def main() -> None:
        with trio.fail_after(20):
            async with raw_ws(relay.url) as ws:
                await authenticated(ws)
                answers = []
                for i, victim in enumerate([victims[0], *victims]):
                    data = b"" if i == 0 else b"x"
                    await ws.send_message(
                        encode_client("post", to=victim, id=bytes([i]) * 16, data=data)
                    )
                    raw = await ws.get_message()
                    assert isinstance(raw, bytes)
                    answer = decode_server(raw)
                    answers.append(answer.get("code", answer["t"]))
                assert answers == ["empty"] + ["posted"] * 5 + ["sender_quota"]

    trio.run(main)
