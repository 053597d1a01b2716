"""Fuzz targets: every parser of bytes that come from outside, one function each.

A target takes arbitrary bytes and must either return or raise a
:class:`~p2p.errors.P2PError` (the typed refusal every parser promises). Anything else,
an other exception, a hang or a memory blow-up, is a bug. The same table serves the
coverage-guided runner (``tests/fuzz/run.py``, atheris, ``make fuzz``) and the replay of
every input that once crashed (``tests/test_fuzz_regressions.py``, in ``make test``).

``SEEDS`` gives each target a few valid inputs to start from, so the fuzzer begins
inside the format rather than at random bytes.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import pycrdt

from p2p.app import control
from p2p.errors import P2PError
from p2p.media.descriptor import Attachment, file_body, new_key, parse_file_body
from p2p.proto import envelope, wire, yupdate
from p2p.proto import relay_protocol as protocol
from p2p.proto.contacts import PREFIX as CONTACT_PREFIX
from p2p.proto.contacts import ContactCode
from p2p.proto.grants import SpaceGrant, parse_grant, seal_grant
from p2p.proto.identity import DeviceKeys, DeviceList, check_lease, issue_lease
from p2p.proto.pairing import PREFIX as PAIRING_PREFIX
from p2p.proto.pairing import MalformedCode, PairingCode, from_text, to_text
from p2p.runtime.linking import _parse_have
from p2p.state.device import DeviceState
from p2p.storage.base import WriteBatch
from p2p.storage.memory import MemoryStore

Target = Callable[[bytes], object]
TARGETS: dict[str, Target] = {}
SEEDS: dict[str, Callable[[], list[bytes]]] = {}
WALL_MS = 1_767_225_600_000


def target(name: str, seeds: Callable[[], list[bytes]]) -> Callable[[Target], Target]:
    def register(fn: Target) -> Target:
        TARGETS[name] = fn
        SEEDS[name] = seeds
        return fn

    return register


@functools.cache
def _world() -> tuple[DeviceState, WriteBatch, str]:
    """One account with a notes chat holding a message: valid inputs of every kind."""
    state, batch = DeviceState.create_account("phone")
    chat = state.chat_by_name("notes").id
    entry = state.new_entry(chat, "msg", WALL_MS, body="hello")
    _, written = state.write_local(chat, [entry])
    merged = WriteBatch(
        records={**batch.records, **written.records},
        appends=[*batch.appends, *written.appends],
        index={**batch.index, **written.index},
    )
    return state, merged, chat


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


# ---- frames and relay messages --------------------------------------------------------


def _frame_seeds() -> list[bytes]:
    return [
        wire.encode_frame("ping", n=1),
        wire.encode_frame("hello", eph=bytes(32), nonce=bytes(32), tags=bytes(64)),
        wire.encode_frame("env", e=b"x" * 100),
        wire.encode_frame("piece", s="space", d=b"data"),
        wire.encode_frame("lsent", n=4),
    ]


@target("frame", _frame_seeds)
def frame(data: bytes) -> object:
    return wire.decode_frame(data)


@target("frame_handshake", _frame_seeds)
def frame_handshake(data: bytes) -> object:
    return wire.decode_frame(data, limit=wire.MAX_HANDSHAKE_FRAME)


def _relay_seeds() -> list[bytes]:
    keys = DeviceKeys.generate()
    return [
        protocol.encode_client("auth", dev=keys.device_id, pk=keys.sign_pk, sig=bytes(64)),
        protocol.encode_client("ack", ids=[bytes(16)] * 3),
        protocol.encode_client("watch", ids=[keys.device_id]),
        protocol.encode_server("mail", id=bytes(16), **{"from": keys.device_id}, data=b"x"),
    ]


@target("relay_client", _relay_seeds)
def relay_client(data: bytes) -> object:
    return protocol.decode_client(data)


@target("relay_server", _relay_seeds)
def relay_server(data: bytes) -> object:
    return protocol.decode_server(data)


@target("unpack", lambda: [wire.pack([1, [b"x", {"a": "b"}], -5, 1.5, None])])
def unpack(data: bytes) -> object:
    return wire.unpack(data, what="fuzz")


# ---- envelopes, device lists, leases, grants --------------------------------------------


def _envelope_seeds() -> list[bytes]:
    state, _, chat = _world()
    return [state.seal(chat, b"\x00")]


@target("envelope", _envelope_seeds)
def envelope_parse(data: bytes) -> object:
    return envelope.parse(data)


@target("device_list", lambda: [_world()[0].device_list.encode()])
def device_list(data: bytes) -> object:
    parsed = DeviceList.decode(data)
    parsed.verify(parsed.account_pk)
    return parsed


def _lease_seeds() -> list[bytes]:
    state = _world()[0]
    assert state.account_key is not None
    return [issue_lease(state.account_key, "abcdefghijklmnop", WALL_MS)]


@target("lease", _lease_seeds)
def lease(data: bytes) -> object:
    state = _world()[0]
    return check_lease(data, state.device_list.account_pk, "abcdefghijklmnop", WALL_MS - 1)


def _grant_seeds() -> list[bytes]:
    state = _world()[0]
    to = DeviceKeys.generate()
    space = SpaceGrant(space="s" * 20, name="chat", epoch=1, keys={1: bytes(32)}, members=())
    return [seal_grant(state.keys, state.account_id, to.device_id, to.box_pk, space)]


@target("grant", _grant_seeds)
def grant(data: bytes) -> object:
    return parse_grant(data)


@target("replay_window", lambda: [envelope.ReplayWindow(5, 3).to_record()])
def replay_window(data: bytes) -> object:
    return envelope.ReplayWindow.from_record(data)


# ---- codes a person pastes -----------------------------------------------------------------


def _pairing_seeds() -> list[bytes]:
    keys = DeviceKeys.generate()
    code = PairingCode.create(
        sign_pk=keys.sign_pk,
        addresses=["127.0.0.1:7000"],
        ttl_s=600,
        now_s=0,
    )
    text = code.encode()
    return [text.encode(), from_text(PAIRING_PREFIX, text, 4096, MalformedCode, "code")]


@target("pairing_code", _pairing_seeds)
def pairing_code(data: bytes) -> object:
    """The text a person pastes, or (with a valid checksum around it, so the fuzzer gets
    past the checksum) a payload of its choosing."""
    text = _text(data)
    if text.startswith(PAIRING_PREFIX):
        return PairingCode.decode(text)
    return PairingCode.decode(to_text(PAIRING_PREFIX, data))


def _contact_seeds() -> list[bytes]:
    state = _world()[0]
    code = ContactCode(
        account_pk=state.device_list.account_pk,
        key=state.contact_key(),
        primary=state.device_id,
        addresses=("127.0.0.1:7000",),
    )
    text = code.encode()
    return [text.encode(), from_text(CONTACT_PREFIX, text, 10**6, MalformedCode, "code")]


@target("contact_code", _contact_seeds)
def contact_code(data: bytes) -> object:
    text = _text(data)
    if text.startswith(CONTACT_PREFIX):
        return ContactCode.decode(text)
    return ContactCode.decode(to_text(CONTACT_PREFIX, data))


# ---- linking, media, control ----------------------------------------------------------------


@target("history_parts", lambda: [wire.pack({"space": [bytes(32), 10]})])
def history_parts(data: bytes) -> object:
    return _parse_have(data)


def _descriptor_seeds() -> list[bytes]:
    attachment = Attachment(
        name="a.txt",
        size=5,
        mime="text/plain",
        chunk_size=262144,
        key=new_key(),
        hashes=(bytes(32),),
    )
    return [file_body("caption", attachment).encode()]


@target("file_descriptor", _descriptor_seeds)
def file_descriptor(data: bytes) -> object:
    parse_file_body.cache_clear()  # each input parsed afresh, not from the cache
    return parse_file_body(_text(data))


@target("control_request", lambda: [b'{"op": "send", "text": "hi", "chat": null}'])
def control_request(data: bytes) -> object:
    return control._parse(data)


# ---- stored rows ------------------------------------------------------------------------


def _store_seeds() -> list[bytes]:
    _, batch, _ = _world()
    names = sorted(batch.records)
    return [bytes([i]) + batch.records[n] for i, n in enumerate(names)] + [
        bytes([255]) + update for _, update in batch.appends
    ]


@target("stored_rows", _store_seeds)
def stored_rows(data: bytes) -> object:
    """A home whose one record (or, with a first byte of 255, one stored update) holds
    the fuzzer's bytes: loading it gives a device (the chat set aside if need be) or a
    StoreCorrupt, and loading each chat's history a typed error at worst."""
    if not data:
        return None
    _, batch, chat = _world()
    records = dict(batch.records)
    appends = list(batch.appends)
    if data[0] == 255:
        appends.append((chat, data[1:]))
    else:
        names = sorted(records)
        records[names[data[0] % len(names)]] = data[1:]
    store = MemoryStore()
    store.write(WriteBatch(records=records, appends=appends, index=dict(batch.index)))
    state = DeviceState.load(store)
    for space in list(state.spaces.values()):
        space.replica.load()
    return state


# ---- CRDT updates, against pycrdt ------------------------------------------------------


@functools.cache
def _crdt_history() -> bytes:
    """A small history of two clients (1 and 2): map values set, replaced and deleted,
    text inserted in the middle and deleted, an array, a nested map."""
    a: pycrdt.Doc[Any] = pycrdt.Doc(client_id=1)
    a.get("m", type=pycrdt.Map)["k"] = "one"
    a.get("t", type=pycrdt.Text).insert(0, "hello")
    b: pycrdt.Doc[Any] = pycrdt.Doc(client_id=2)
    b.apply_update(a.get_update())
    b.get("m", type=pycrdt.Map)["k"] = "two"
    b.get("t", type=pycrdt.Text).insert(2, "XY")
    del b.get("t", type=pycrdt.Text)[0:1]
    b.get("l", type=pycrdt.Array).extend([1, "a"])
    b.get("m", type=pycrdt.Map)["n"] = pycrdt.Map({"z": "w"})
    a.apply_update(b.get_update(a.get_state()))
    a.get("m", type=pycrdt.Map)["k"] = "three"
    return bytes(a.get_update())


def _crdt_seeds() -> list[bytes]:
    _, batch, _ = _world()
    doc: pycrdt.Doc[Any] = pycrdt.Doc(client_id=1)
    doc.apply_update(_crdt_history())
    before = doc.get_state()
    doc.get("m", type=pycrdt.Map)["k"] = "four"
    doc.get("t", type=pycrdt.Text).insert(1, "é")
    return [update for _, update in batch.appends] + [
        _crdt_history(),
        bytes(doc.get_update(before)),
    ]


def _panic(call: Callable[..., object], *args: object) -> str | None:
    try:
        call(*args)
    except Exception:
        return None  # pycrdt refused it: Replica.apply maps that to InvalidUpdate
    except BaseException as exc:  # pyo3's PanicException
        if type(exc).__name__ != "PanicException":
            raise
        return str(exc)[:200]
    return None


def _full_state(doc: pycrdt.Doc[Any], out: list[bytes]) -> None:
    out.append(bytes(doc.get_update()))


def _panic_on(history: bytes, data: bytes) -> str | None:
    """The panic applying ``data`` after ``history`` causes, then applying the result's
    full state in a fresh document; None if neither panics."""
    doc: pycrdt.Doc[Any] = pycrdt.Doc(client_id=99)
    if history:
        doc.apply_update(history)
    full: list[bytes] = []
    return (
        _panic(doc.apply_update, data)
        or _panic(_full_state, doc, full)
        or _panic(pycrdt.Doc().apply_update, full[0] if full else b"\x00\x00")
    )


@target("crdt_differential", _crdt_seeds)
def crdt_differential(data: bytes) -> object:
    """Bytes ``yupdate.check_update`` accepts (else its InvalidUpdate) must apply without
    a pycrdt panic, in a fresh document and on a small history, and the document's full
    state must apply in a fresh one (tests/test_yupdate_diff.py runs the same promise on
    a grammar of updates)."""
    yupdate.check_update(data, "s")
    for history in (b"", _crdt_history()):
        error = _panic_on(history, data)
        if error is not None:
            raise AssertionError(f"pycrdt panicked on an update check_update accepted: {error}")
    return None


def replay(name: str, data: bytes) -> None:
    """Run one input through a target: a typed refusal is fine, anything else raises."""
    with contextlib.suppress(P2PError):
        TARGETS[name](data)
