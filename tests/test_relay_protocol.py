"""The relay's parts without a network: wire protocol, token bucket, mailbox, queue.

Messages are built both through the encoders (what we send) and as raw msgpack (what a
hostile client or relay could send), so the decoders are checked on inputs our own
encoders never produce. The mailbox runs against a real SQLite file in ``tmp_path``.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2p.errors import (
    BadSignature,
    FrameTooLarge,
    MalformedFrame,
    StoreCorrupt,
    UnsupportedVersion,
    WireError,
)
from p2p.proto.identity import DeviceKeys, verify
from p2p.proto.relay_protocol import (
    CLIENT_SCHEMA,
    DOMAIN_AUTH,
    MAX_MESSAGE,
    MAX_WATCH,
    RELAY_VERSION,
    SERVER_SCHEMA,
    Field,
    TokenBucket,
    auth_message,
    decode_client,
    decode_server,
    encode_client,
    encode_server,
)
from p2p.relay.mailbox import Mailbox, MailQuota
from p2p.relay.server import Limits
from p2p.transport.base import TransportError
from p2p.transport.byte_queue import ByteQueue, QueueClosed
from p2p.transport.relay import (
    mail_id_for,
    parse_relay_address,
    relay_address,
)

FAST = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
DEV = DeviceKeys.generate().device_id
OTHER = DeviceKeys.generate().device_id


def raw(message: object) -> bytes:
    data: bytes = msgpack.packb(message, use_bin_type=True)
    return data


def sample(spec: Field) -> Any:
    """A small valid value for a field."""
    if spec.kind == "bytes":
        return bytes(max(spec.lo, min(spec.hi, 8)))
    if spec.kind == "str":
        return "x" * max(spec.lo, min(spec.hi, 8))
    if spec.kind == "int":
        return spec.lo + 1
    if spec.kind == "bool":
        return True
    if spec.kind == "dev":
        return DEV
    if spec.kind == "devs":
        return [DEV, OTHER]
    return [bytes(16)]


def sample_message(schema: dict[str, dict[str, Field]], kind: str) -> dict[str, Any]:
    return {name: sample(spec) for name, spec in schema[kind].items()}


SCHEMAS = [("client", CLIENT_SCHEMA), ("server", SERVER_SCHEMA)]
CASES = [(side, kind) for side, schema in SCHEMAS for kind in sorted(schema)]


def codec(side: str) -> tuple[Any, Any, dict[str, dict[str, Field]]]:
    if side == "client":
        return encode_client, decode_client, CLIENT_SCHEMA
    return encode_server, decode_server, SERVER_SCHEMA


@pytest.mark.parametrize(("side", "kind"), CASES)
def test_every_message_round_trips(side: str, kind: str) -> None:
    encode, decode, schema = codec(side)
    fields = sample_message(schema, kind)
    assert decode(encode(kind, **fields)) == {"v": RELAY_VERSION, "t": kind, **fields}


@pytest.mark.parametrize(("side", "kind"), CASES)
def test_a_missing_or_extra_field_is_refused(side: str, kind: str) -> None:
    _, decode, schema = codec(side)
    good = {"v": RELAY_VERSION, "t": kind, **sample_message(schema, kind)}
    for name in schema[kind]:
        with pytest.raises(MalformedFrame):
            decode(raw({k: v for k, v in good.items() if k != name}))
    with pytest.raises(MalformedFrame):
        decode(raw({**good, "extra": 1}))


@pytest.mark.parametrize(("side", "kind"), CASES)
def test_a_field_of_the_wrong_type_is_refused(side: str, kind: str) -> None:
    _, decode, schema = codec(side)
    good = {"v": RELAY_VERSION, "t": kind, **sample_message(schema, kind)}
    for name in schema[kind]:
        for wrong in (None, 1.5, "x" * 17, b"x" * 17, -1, [b"x"], {"a": 1}):
            if type(wrong) is type(good[name]):
                continue  # same type: may well be valid (bounds are tested apart)
            with pytest.raises(MalformedFrame):
                decode(raw({**good, name: wrong}))


def test_directions_do_not_mix() -> None:
    """A client cannot send what only a relay sends (``mail``), nor a relay ``auth``."""
    mail = raw({"v": 1, "t": "mail", "id": bytes(16), "from": DEV, "data": b""})
    with pytest.raises(MalformedFrame):
        decode_client(mail)
    auth = encode_client("auth", dev=DEV, pk=bytes(32), sig=bytes(64))
    with pytest.raises(MalformedFrame):
        decode_server(auth)
    # same name, other fields: a client's open names a target, the relay's a source
    with pytest.raises(MalformedFrame):
        decode_client(encode_server("open", **{"from": DEV, "cid": 5}))


def test_bounds_are_kept() -> None:
    ok = encode_client("watch", ids=[DeviceKeys.generate().device_id for _ in range(16)])
    assert decode_client(ok)["t"] == "watch"
    too_many = raw({"v": 1, "t": "watch", "ids": [DeviceKeys.generate().device_id] * 17})
    with pytest.raises(MalformedFrame):
        decode_client(too_many)
    twice = raw({"v": 1, "t": "watch", "ids": [DEV, DEV]})
    with pytest.raises(MalformedFrame):
        decode_client(twice)
    for bad_id in ("", "ABCDEFGHIJKLMNOP", DEV + "a", DEV[:-1] + "1", DEV[:-1] + "=", 7):
        with pytest.raises(MalformedFrame):
            decode_client(raw({"v": 1, "t": "open", "to": bad_id, "cid": 1}))
    # client cids stay below 2**31: the upper half is the relay's
    with pytest.raises(MalformedFrame):
        decode_client(raw({"v": 1, "t": "open", "to": DEV, "cid": 2**31}))
    with pytest.raises(MalformedFrame):
        decode_client(raw({"v": 1, "t": "auth", "dev": DEV, "pk": bytes(31), "sig": bytes(64)}))
    with pytest.raises(MalformedFrame):
        decode_client(raw({"v": 1, "t": "post", "to": DEV, "id": bytes(15), "data": b""}))
    with pytest.raises(MalformedFrame):  # bool is not an int and an int is not a bool
        decode_client(raw({"v": 1, "t": "close", "cid": True}))
    with pytest.raises(MalformedFrame):
        decode_client(raw({"v": 1, "t": "data", "cid": 1, "data": b"", "more": 1}))


def test_version_size_and_garbage() -> None:
    with pytest.raises(UnsupportedVersion):
        decode_client(raw({"v": 2, "t": "ping", "n": 1}))
    with pytest.raises(FrameTooLarge):
        decode_client(b"\x00" * (MAX_MESSAGE + 1))
    with pytest.raises(FrameTooLarge):
        decode_client(encode_client("ping", n=1), limit=4)
    for junk in (b"", b"\xc1", raw([1, 2]), raw({"v": 1}), encode_client("ping", n=1) + b"\x00"):
        with pytest.raises(MalformedFrame):
            decode_client(junk)
    with pytest.raises(MalformedFrame):  # the encoder checks too
        encode_client("ping", n=-1)


@FAST
@given(st.binary(max_size=512))
def test_random_bytes_only_ever_raise_wire_errors(data: bytes) -> None:
    for decode in (decode_client, decode_server):
        with contextlib.suppress(WireError):
            decode(data)


@FAST
@given(
    st.sampled_from(CASES),
    st.dictionaries(
        st.text(max_size=6),
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(-(2**63), 2**64 - 1),
            st.binary(max_size=40),
            st.text(),
        ),
    ),
)
def test_random_maps_only_ever_raise_wire_errors(
    case: tuple[str, str], extra: dict[str, Any]
) -> None:
    side, kind = case
    _, decode, schema = codec(side)
    message = {"v": 1, "t": kind, **sample_message(schema, kind), **extra}
    with contextlib.suppress(WireError):
        decode(raw(message))


def test_auth_signature_is_bound_to_nonce_and_relay() -> None:
    keys = DeviceKeys.generate()
    nonce = bytes(range(32))
    sig = keys.sign(DOMAIN_AUTH, auth_message(nonce, "ws://relay-a:7700"))
    verify(keys.sign_pk, DOMAIN_AUTH, auth_message(nonce, "ws://relay-a:7700"), sig)
    with pytest.raises(BadSignature):
        verify(keys.sign_pk, DOMAIN_AUTH, auth_message(nonce, "ws://relay-b:7700"), sig)
    with pytest.raises(BadSignature):
        verify(keys.sign_pk, DOMAIN_AUTH, auth_message(bytes(32), "ws://relay-a:7700"), sig)
    with pytest.raises(BadSignature):  # the same bytes under another domain
        verify(keys.sign_pk, b"p2p/other/v1\x00", auth_message(nonce, "ws://relay-a:7700"), sig)


def test_token_bucket() -> None:
    bucket = TokenBucket(rate=10, burst=5, now=0.0)
    assert all(bucket.take(1, 0.0) for _ in range(5))
    assert not bucket.take(1, 0.0)
    assert bucket.take(1, 0.1)  # one token back after 1/10 s
    assert not bucket.take(1, 0.1)
    assert bucket.wait(1, 0.1) == pytest.approx(0.1)
    assert bucket.wait(50, 10.0) == 0  # full again; an oversized cost waits for full only
    bucket.spend(50, 10.0)
    assert bucket.tokens < 0
    assert bucket.wait(1, 10.0) > 4


def test_relay_addresses() -> None:
    assert parse_relay_address(relay_address(DEV)) == DEV
    for bad in ("", "relay:", f"tcp:{DEV}", "relay:" + DEV.upper(), f"relay:{DEV}x", DEV):
        with pytest.raises(TransportError):
            parse_relay_address(bad)


def test_mail_ids_depend_on_recipient_and_content() -> None:
    assert mail_id_for(DEV, b"a") == mail_id_for(DEV, b"a")
    assert len({mail_id_for(DEV, b"a"), mail_id_for(OTHER, b"a"), mail_id_for(DEV, b"b")}) == 3


def test_limits_are_checked() -> None:
    Limits().check()
    from p2p.errors import RelayError

    for bad in (
        Limits(max_pipes=0),
        Limits(max_message=MAX_MESSAGE + 1),
        Limits(max_mail=MAX_MESSAGE),
        Limits(byte_burst=1000),
    ):
        with pytest.raises(RelayError):
            bad.check()


# ---- mailbox ---------------------------------------------------------------------------


def quota(**kw: Any) -> MailQuota:
    return MailQuota(**{"max_mail": 1000, "mailbox_count": 3, "mailbox_bytes": 2500, **kw})


def test_mailbox_quotas(tmp_path: Path) -> None:
    box = Mailbox(tmp_path / "relay.db", quota(sender_bytes=10_000, total_bytes=3000), now=0)
    a, b, c = (DeviceKeys.generate().device_id for _ in range(3))
    assert box.post(b, a, bytes(16), b"x" * 1001, now=1) == "too_large"
    assert box.post(a, a, bytes(16), b"x", now=1) == "self"
    assert [box.post(b, a, bytes([i]) * 16, b"x" * 800, now=1) for i in range(3)] == ["posted"] * 3
    assert box.post(b, a, bytes([9]) * 16, b"x", now=1) == "quota"  # count
    assert box.post(b, a, bytes([0]) * 16, b"x" * 800, now=1) == "posted"  # same id again: once
    assert box.count(b) == 3
    assert box.ack(b, [bytes([0]) * 16]) == 1
    assert box.post(b, a, bytes([3]) * 16, b"x" * 901, now=1) == "quota"  # bytes: 1600 + 901
    assert box.post(c, a, bytes([4]) * 16, b"x" * 900, now=1) == "posted"
    assert box.post(c, a, bytes([5]) * 16, b"x" * 900, now=1) == "relay_full"  # 3400 > 3000
    box.close()


def test_mailbox_sender_quota(tmp_path: Path) -> None:
    box = Mailbox(None, quota(sender_bytes=1500), now=0)
    a = DeviceKeys.generate().device_id
    recipients = [DeviceKeys.generate().device_id for _ in range(3)]
    assert box.post(recipients[0], a, bytes(16), b"x" * 1000, now=1) == "posted"
    assert box.post(recipients[1], a, bytes(16), b"x" * 1000, now=1) == "sender_quota"
    assert box.post(recipients[1], recipients[2], bytes(16), b"x" * 1000, now=1) == "posted"
    box.close()


def test_mailbox_counts_items_per_sender_and_in_total_and_refuses_empty_mail(
    tmp_path: Path,
) -> None:
    """Tiny items cost a row each: one fresh key must not fill many mailboxes while its
    byte quota and the relay's stay near zero (an empty item counted no bytes at all)."""
    path = tmp_path / "relay.db"
    limits = quota(mailbox_count=100, sender_count=5, total_count=8)
    box = Mailbox(path, limits, now=0)
    sender, other = DeviceKeys.generate().device_id, DeviceKeys.generate().device_id
    victims = [DeviceKeys.generate().device_id for _ in range(6)]
    assert box.post(victims[0], sender, bytes(16), b"", now=1) == "empty"
    codes = [box.post(v, sender, bytes([i]) * 16, b"x", now=1) for i, v in enumerate(victims)]
    assert codes == ["posted"] * 5 + ["sender_quota"]  # items, though only 5 bytes
    assert [box.post(victims[0], other, bytes([50 + i]) * 16, b"y", now=1) for i in range(4)] == [
        "posted",
        "posted",
        "posted",
        "relay_full",  # 8 items on the relay
    ]
    assert len(box) == 8
    box.close()
    reopened = Mailbox(path, limits, now=2)  # the counters are rebuilt from the file
    assert reopened.post(victims[5], sender, bytes([9]) * 16, b"z", now=3) == "sender_quota"
    assert reopened.ack(victims[0], [bytes(16)]) == 1
    assert reopened.post(victims[5], sender, bytes([9]) * 16, b"z", now=3) == "posted"
    reopened.close()


def test_mailbox_fetch_ack_and_persistence(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    box = Mailbox(path, quota(mailbox_count=100, mailbox_bytes=10**6), now=0)
    a, b = DEV, OTHER
    for i in range(5):
        assert box.post(b, a, bytes([i]) * 16, bytes([i]) * 10, now=100) == "posted"
    first = box.fetch(b, 0, 2, now=100)
    assert [m.data for m in first] == [bytes([0]) * 10, bytes([1]) * 10]
    rest = box.fetch(b, first[-1].seq, 10, now=100)
    assert [m.id[0] for m in rest] == [2, 3, 4]
    assert all(m.sender == a for m in rest)
    assert box.ack(b, [m.id for m in first]) == 2
    assert box.ack(a, [m.id for m in rest]) == 0  # only the recipient's own mail
    box.close()
    again = Mailbox(path, quota(mailbox_count=100, mailbox_bytes=10**6), now=100)
    assert [m.id[0] for m in again.fetch(b, 0, 10, now=100)] == [2, 3, 4]
    assert again.count(b) == 3
    # seq only grows: mail posted after the last one fetched is found by "seq > last"
    assert again.post(b, a, bytes([7]) * 16, b"new", now=100) == "posted"
    assert [m.data for m in again.fetch(b, rest[-1].seq, 10, now=100)] == [b"new"]
    again.close()


def test_mailbox_ttl(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    box = Mailbox(path, quota(ttl=10.0), now=0)
    assert box.post(OTHER, DEV, bytes(16), b"old", now=100) == "posted"
    assert box.post(OTHER, DEV, bytes([1]) * 16, b"new", now=105) == "posted"
    assert [m.data for m in box.fetch(OTHER, 0, 10, now=111)] == [b"new"]  # expired: hidden
    assert box.purge(now=111) == 1
    assert box.count(OTHER) == 1
    box.close()
    reopened = Mailbox(path, quota(ttl=10.0), now=200)  # purged on open
    assert len(reopened) == 0
    reopened.close()


def test_mailbox_refuses_files_that_are_not_mailboxes(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(StoreCorrupt):
        Mailbox(junk, quota(), now=0)
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE records (name TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreCorrupt):
        Mailbox(other, quota(), now=0)


def test_mailbox_drops_malformed_rows(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    box = Mailbox(path, quota(), now=0)
    assert box.post(OTHER, DEV, bytes(16), b"good", now=1) == "posted"
    box.close()
    conn = sqlite3.connect(path)
    conn.execute(
        "INSERT INTO mail (recipient, id, sender, data, created) VALUES (?, ?, ?, ?, ?)",
        (OTHER, b"short", "not a device", "text, not bytes", 1),
    )
    conn.commit()
    conn.close()
    box = Mailbox(path, quota(), now=1)
    assert [m.data for m in box.fetch(OTHER, 0, 10, now=1)] == [b"good"]
    assert box.count(OTHER) == 1
    box.close()


# ---- byte queue -----------------------------------------------------------------------


def test_byte_queue_bounds_bytes_and_closes_cleanly() -> None:
    async def main() -> None:
        q = ByteQueue(10)
        assert await q.put(b"x" * 30)  # one big item passes an empty queue
        with trio.move_on_after(0.1) as timer:
            await q.put(b"y")
        assert timer.cancelled_caught  # full: the putter waits
        assert q.put_nowait(b"control")  # control messages pass
        assert await q.get() == b"x" * 30
        assert await q.get() == b"control"
        assert await q.put(b"z")
        q.close()
        assert not await q.put(b"late")
        assert await q.get() == b"z"  # what was queued is still delivered
        with pytest.raises(QueueClosed):
            await q.get()
        failed = ByteQueue(10)
        failed.close(FrameTooLarge(1, 0))
        for _ in range(2):
            with pytest.raises(FrameTooLarge):
                await failed.get()
        capped = ByteQueue(10, hard_items=2)
        assert capped.put_nowait(b"1")
        assert capped.put_nowait(b"2")
        assert not capped.put_nowait(b"3")

    trio.run(main)


def test_the_documented_watch_bound_is_the_enforced_one() -> None:
    """docs/relay.md tells operators and client authors how many ids a watch may hold;
    it said 16 while the relay took 64."""
    docs = (Path(__file__).parent.parent / "docs" / "relay.md").read_text()
    stated: set[int] = set()
    for pattern in (r"a `watch` holds at most (\d+) device ids", r"`ids`: up to (\d+) distinct"):
        stated.update(int(n) for n in re.findall(pattern, docs))
    assert stated == {MAX_WATCH}
    ids = [DeviceKeys.generate().device_id for _ in range(MAX_WATCH + 1)]
    assert decode_client(encode_client("watch", ids=ids[:MAX_WATCH]))["ids"] == ids[:MAX_WATCH]
    with pytest.raises(MalformedFrame):
        decode_client(raw({"v": 1, "t": "watch", "ids": ids}))


def test_relay_urls_of_one_cluster_group_by_relay_id() -> None:
    from p2p.errors import RelayError
    from p2p.transport.relay import group_relay_urls, split_relay_url

    assert split_relay_url("ws://a:1/") == ("ws://a:1/", "ws://a:1")
    assert split_relay_url("ws://a:1#id=wss://r.example") == ("ws://a:1", "wss://r.example")
    for bad in ("ws://a:1#r.example", "ws://a:1#id="):
        with pytest.raises(RelayError):
            split_relay_url(bad)
    groups = group_relay_urls(
        ["ws://a:1#id=wss://r", "ws://c:3", "ws://b:2#id=wss://r", "ws://a:1#id=wss://r"]
    )
    assert groups == [("wss://r", ["ws://a:1", "ws://b:2"]), ("ws://c:3", ["ws://c:3"])]
