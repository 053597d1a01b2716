"""The Yjs update validator: pycrdt's own updates always pass, hostile bytes never do.

Updates pycrdt writes come from random histories over three replicas (maps of plain
values, nested shared types, text with formats and embeds, arrays, XML, key overwrites
and deletions, syncs between replicas), as incremental, full-state, diff and merged
updates. Hostile updates are hand-encoded with the small encoder below, whose output is
first checked against pycrdt itself. The regex fast lane is checked against the plain
walk on every input: the same verdict and the same reason.
"""

from __future__ import annotations

import base64
import contextlib
import os
import random
from collections.abc import Callable
from typing import Any

import pycrdt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2p.errors import InvalidUpdate
from p2p.proto import yupdate
from p2p.proto.model import Replica
from p2p.proto.yupdate import MAX_DEPTH, check_update

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)

HOSTILE = (
    "bad7e0ffc00e18f9a576340ab3275bf33e764aeb",
    "fafdc775d8fdb9e2790b5958ee5f753f18ce146c",
    "91d0847505470b42d3893af6b684421982cd1fbb",
)


def verdict(data: bytes) -> str | None:
    """The refusal reason (None: accepted), the same with and without the fast lane."""
    fast = yupdate._refusal(data)
    plain = yupdate._refusal(data, lane=False)
    assert fast == plain, (fast, plain, data[:64].hex())
    if fast is None:
        check_update(data, "s")
    else:
        with pytest.raises(InvalidUpdate):
            check_update(data, "s")
    return fast


def passes(data: bytes) -> None:
    reason = verdict(data)
    assert reason is None, reason


def refused(data: bytes, *words: str) -> str:
    reason = verdict(data)
    assert reason is not None, f"accepted {data.hex()}"
    for word in words:
        assert word in reason, reason
    return reason


# ---- a small encoder of update v1, for the hostile cases --------------------------


def uv(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(0x80 | (n & 0x7F))
        n >>= 7
    out.append(n)
    return bytes(out)


def st_(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return uv(len(raw)) + raw


def update(
    sections: list[tuple[int, int, list[bytes]]],
    deletes: list[tuple[int, list[tuple[int, int]]]] | None = None,
) -> bytes:
    out = uv(len(sections))
    for client, clock, structs in sections:
        out += uv(len(structs)) + uv(client) + uv(clock) + b"".join(structs)
    deletes = deletes or []
    out += uv(len(deletes))
    for client, ranges in deletes:
        out += uv(client) + uv(len(ranges))
        out += b"".join(uv(clock) + uv(length) for clock, length in ranges)
    return out


def entry(value: bytes, key: str | bytes = "k", count: int = 1) -> bytes:
    """An Item setting root map "m"'s ``key`` to Any values (already encoded)."""
    return b"\x28\x01" + st_("m") + st_(key) + uv(count) + value


def text_item(text: str | bytes) -> bytes:
    """An Item with String content in root text "t"."""
    return b"\x04\x01" + st_("t") + st_(text)


def any_str(value: str | bytes) -> bytes:
    return b"\x77" + st_(value)


def one(value: bytes) -> bytes:
    return update([(1, 0, [entry(value)])])


def applied(data: bytes) -> Any:
    doc: pycrdt.Doc[Any] = pycrdt.Doc()
    doc.apply_update(data)
    return doc.get("m", type=pycrdt.Map).to_py()


def test_the_test_encoder_speaks_pycrdt() -> None:
    assert applied(one(any_str("v"))) == {"k": "v"}
    nested = b"\x76\x02" + st_("a") + b"\x75\x02\x78\x7e" + st_("é") + any_str("x" * 200)
    assert applied(one(nested)) == {"k": {"a": [True, None], "é": "x" * 200}}
    doc: pycrdt.Doc[Any] = pycrdt.Doc()
    doc.apply_update(update([(7, 0, [text_item("hi "), text_item("😀")])]))
    assert str(doc.get("t", type=pycrdt.Text)) == "😀hi "  # no origins: each at the start


# ---- the three 20-byte updates pycrdt needs ~0.5-0.9 s and 512 MB to refuse ----------


@pytest.mark.parametrize("hexed", HOSTILE)
def test_hostile_tiny_updates_are_refused_by_our_checker(hexed: str) -> None:
    data = bytes.fromhex(hexed)
    assert refused(data) == yupdate._refusal(data)  # our checker's reason, not pycrdt's


@pytest.mark.parametrize("hexed", HOSTILE)
def test_replica_apply_refuses_them_before_pycrdt(hexed: str) -> None:
    replica = Replica("s")
    with pytest.raises(InvalidUpdate) as info:
        replica.apply(bytes.fromhex(hexed))
    assert info.value.space == "s"
    assert info.value.reason == yupdate._refusal(bytes.fromhex(hexed))  # not pycrdt's


# ---- pycrdt's own updates ----------------------------------------------------------

TEXT = st.text(st.characters(codec="utf-8"), max_size=12)
LONG_TEXT = st.text(st.characters(codec="utf-8"), min_size=60, max_size=200)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats()
    | TEXT
    | LONG_TEXT
    | st.binary(max_size=160)
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=10,
)
KEYS = st.sampled_from(["a", "b", "c", "ключ", "🔑", "k" * 130])
ATTRS = st.none() | st.dictionaries(st.sampled_from(["bold", "href", "x"]), VALUES, max_size=2)


def _op(doc: pycrdt.Doc[Any], data: st.DataObject) -> None:
    """One random edit. pycrdt panics on some text offsets (embeds, surrogate pairs):
    those edits are skipped, whatever they wrote still has to pass."""
    try:
        _edit(doc, data)
    except Exception:
        pass
    except BaseException as exc:  # pyo3's PanicException
        if type(exc).__name__ != "PanicException":
            raise


def _edit(doc: pycrdt.Doc[Any], data: st.DataObject) -> None:
    m = doc.get("m", type=pycrdt.Map)
    t = doc.get("t", type=pycrdt.Text)
    a = doc.get("l", type=pycrdt.Array)
    kind = data.draw(
        st.sampled_from(
            ["set"] * 4
            + ["pop", "shared", "insert", "insert", "delete", "format", "embed"]
            + ["append", "remove", "xml", "subdoc"]
        )
    )
    if kind == "set":
        m[data.draw(KEYS)] = data.draw(VALUES)
    elif kind == "pop":
        m.pop(data.draw(KEYS), None)
    elif kind == "shared":
        m[data.draw(KEYS)] = data.draw(
            st.sampled_from(
                [
                    lambda: pycrdt.Map({"x": 1.5, "y": "z"}),
                    lambda: pycrdt.Array([1, "a", [None]]),
                    lambda: pycrdt.Text("inner text"),
                ]
            )
        )()
    elif kind == "insert":
        index = data.draw(st.integers(0, len(t)))
        t.insert(index, data.draw(TEXT | LONG_TEXT), data.draw(ATTRS))
    elif kind == "delete" and len(t):
        start = data.draw(st.integers(0, len(t) - 1))
        del t[start : min(len(t), start + data.draw(st.integers(1, 5)))]
    elif kind == "format" and len(t):
        start = data.draw(st.integers(0, len(t) - 1))
        t.format(
            start, min(len(t), start + 3), data.draw(st.dictionaries(KEYS, VALUES, min_size=1))
        )
    elif kind == "embed":
        t.insert_embed(data.draw(st.integers(0, len(t))), data.draw(VALUES), data.draw(ATTRS))
    elif kind == "append":
        a.append(data.draw(VALUES))
    elif kind == "remove" and len(a):
        del a[data.draw(st.integers(0, len(a) - 1))]
    elif kind == "subdoc":
        sub: pycrdt.Doc[Any] = pycrdt.Doc(client_id=7)
        sub.get("s", type=pycrdt.Text).insert(0, data.draw(TEXT))
        m[data.draw(KEYS)] = sub
    elif kind == "xml":
        x = doc.get("x", type=pycrdt.XmlFragment)
        el = x.children.append(pycrdt.XmlElement(data.draw(st.sampled_from(["p", "ü"]))))
        el.attributes["class"] = data.draw(TEXT)
        el.children.append(data.draw(TEXT) or "t")


@SETTINGS
@given(st.data())
def test_every_update_pycrdt_writes_passes(data: st.DataObject) -> None:
    # fixed client ids: concurrent inserts order by client id, and what is drawn next
    # depends on that order (random ids made hypothesis's replays draw differently)
    docs: list[pycrdt.Doc[Any]] = [pycrdt.Doc(client_id=1 + i) for i in range(3)]
    updates: list[bytes] = []
    for _ in range(data.draw(st.integers(1, 30))):
        i = data.draw(st.integers(0, 2))
        doc = docs[i]
        before = doc.get_state()
        if data.draw(st.integers(0, 5)) == 0:  # sync from another replica
            other = docs[data.draw(st.integers(0, 2))]
            diff = other.get_update(before)
            updates.append(diff)
            doc.apply_update(diff)
        else:
            with doc.transaction():
                for _ in range(data.draw(st.integers(1, 3))):
                    _op(doc, data)
        updates.append(doc.get_update(before))
    for doc in docs:
        updates.append(doc.get_update())
        for other in docs:
            updates.append(doc.get_update(other.get_state()))
    updates.append(pycrdt.merge_updates(*updates))
    for u in updates:
        reason = verdict(u)
        # pycrdt's text edits now and then write an empty string item, which yrs cannot
        # take twice (see yupdate._EMPTY); the chat schema writes no text
        assert reason in (None, yupdate._EMPTY), reason


def test_merged_updates_with_gaps_pass() -> None:
    doc: pycrdt.Doc[Any] = pycrdt.Doc()
    m = doc.get("m", type=pycrdt.Map)
    before = doc.get_state()
    m["a"] = "1"
    first = doc.get_update(before)
    m["b"] = {"x": [1.5, None]}
    before = doc.get_state()
    m["c"] = "3"
    merged = pycrdt.merge_updates(first, doc.get_update(before))
    assert b"\x0a\x01" in merged  # a Skip over the missing struct
    passes(merged)


def test_empty_updates_pass() -> None:
    passes(b"\x00\x00")
    passes(pycrdt.Doc().get_update())


def test_chat_entries_pass_in_bulk_through_the_fast_lane() -> None:
    rnd = random.Random(7)
    doc = pycrdt.Doc()
    m = doc.get("m", type=pycrdt.Map)
    with doc.transaction():
        for i in range(300):
            m[os.urandom(10).hex()] = message(rnd, body="é😀" * i if i % 7 == 0 else None)
        m["n"] = {"nested": {"deep": [1.5, None, True]}}  # off the lane, in between
    for i in range(20):
        m[f"r{i % 5}"] = "👍" if i % 2 else ""  # overwrites: origins and a delete set
    passes(doc.get_update())


def message(rnd: random.Random, body: str | None = None) -> dict[str, str]:
    def chars(n: int) -> str:
        return "".join(rnd.choice("abcdefghijklmnopqrstuvwxyz0123456789 ") for _ in range(n))

    return {
        "id": os.urandom(10).hex(),
        "k": "msg",
        "a": chars(16),
        "d": chars(16),
        "ts": "0001767225600000.000001",
        "t": "",
        "b": chars(120) if body is None else body,
        "sig": base64.b64encode(os.urandom(64)).decode("ascii"),
    }


def test_ten_thousand_messages_pass_the_check() -> None:
    """3.5 MB of real messages pass, twice (the second time through the compiled lane)."""
    rnd = random.Random(1)
    doc = pycrdt.Doc()
    m = doc.get("m", type=pycrdt.Map)
    with doc.transaction():
        for _ in range(10_000):
            m[os.urandom(10).hex()] = message(rnd)
    data = doc.get_update()
    check_update(data, "s")  # compiles the lane
    check_update(data, "s")  # and accepts it again (its speed: bench/bench_core.py)


# ---- hand-made hostile updates -----------------------------------------------------


def test_declared_counts_must_fit_the_bytes_left() -> None:
    refused(uv(2**31) + b"\x00" * 30, "declares", "clients")
    refused(update([]).replace(b"\x00", uv(5), 1), "clients")
    refused(uv(1) + uv(2**31) + uv(1) + uv(0) + b"\x00\x00", "declares", "structs")
    refused(update([(1, 0, [entry(any_str("v"), count=100)])]), "declares", "values")
    refused(one(b"\x76" + uv(2**40) + st_("a") + b"\x7e"), "declares", "object entries")
    refused(one(b"\x75" + uv(2**40) + b"\x7e"), "declares", "array values")
    refused(one(b"\x74" + uv(2**20) + b"x"), "declares", "bytes")
    refused(update([])[:-1] + uv(2**20) + b"\x01\x01", "delete-set clients")
    refused(update([])[:-1] + b"\x01\x07" + uv(2**20) + b"\x00\x01", "deleted ranges")


def test_truncations_of_a_valid_update_are_refused() -> None:
    data = one(b"\x76\x02" + st_("a") + b"\x7b" + bytes(8) + st_("b") + any_str("é" * 70))
    passes(data)
    for end in range(len(data)):
        refused(data[:end])
    refused(data + b"\x00", "trailing")


def test_nesting_is_limited() -> None:
    deepest = b"\x75\x01" * MAX_DEPTH + b"\x7e"
    passes(one(deepest))
    value = applied(one(deepest))["k"]
    for _ in range(MAX_DEPTH):
        value = value[0]
    assert value is None
    refused(one(b"\x75\x01" + deepest), "nested")
    refused(one((b"\x76\x01" + st_("a")) * (MAX_DEPTH + 1) + b"\x7e"), "nested")
    refused(one(b"\x75\x01" * 100_000 + b"\x7e"), "nested")


@pytest.mark.parametrize(
    "make",
    [
        lambda bad: one(any_str(bad)),
        lambda bad: update([(1, 0, [entry(any_str("v"), key=bad)])]),
        lambda bad: one(any_str(b"x" * 200 + bad)),
        lambda bad: one(b"\x76\x01" + st_(bad) + b"\x78"),
        lambda bad: update([(1, 0, [text_item(b"ok " + bad)])]),
        lambda bad: update([(1, 0, [entry(any_str("v")) for _ in range(20)] + [text_item(bad)])]),
        lambda bad: update([(1, 0, [entry(any_str(bad)) for _ in range(20)])]),
    ],
)
@pytest.mark.parametrize("bad", [b"\xff", b"\xc3", b"a\xc3", b"\xed\xa0\x80", b"\xc0\x80"])
def test_strings_must_be_utf8(make: Callable[[bytes], bytes], bad: bytes) -> None:
    refused(make(bad), "UTF-8")
    passes(make("é😀".encode()))


@pytest.mark.parametrize(
    "info",
    [
        0x02,  # JSON content: yrs reads one string more than declared
        0x0B,  # Move content
        0x0C,
        0x0F,
        0x12,  # bit 0x10 set
        0x20,  # kind 0 with a flag: not a GC
        0x2A,  # kind 10 with a flag: not a Skip
    ],
)
def test_unknown_or_divergent_content_kinds_are_refused(info: int) -> None:
    item = bytes([info]) + b"\x01" + st_("m") + (st_("k") if info & 0x20 else b"")
    refused(update([(1, 0, [item + b"\x01" + st_("x") + b"\x00"])]), "content kind")


@pytest.mark.parametrize("ref", [5, 7, 8, 10, 15, 0x80])
def test_unknown_type_refs_are_refused(ref: int) -> None:
    refused(update([(1, 0, [b"\x27\x01" + st_("m") + st_("k") + bytes([ref, 0])])]), "type ref")


def test_known_type_refs_pass() -> None:
    for ref in (0, 1, 2, 4, 6, 9):
        passes(update([(1, 0, [b"\x27\x01" + st_("m") + st_("k") + bytes([ref])])]))
    passes(update([(1, 0, [b"\x27\x01" + st_("m") + st_("k") + b"\x03" + st_("p")])]))


def test_structure_errors_are_refused() -> None:
    refused(b"", "truncated")
    refused(b"\x00", "truncated")
    refused(b"\x80" * 11 + b"\x00\x00", "10 bytes")
    refused(update([(1, 0, [b"\x28\x02" + st_("m") + st_("k") + b"\x01\x7e"])]), "parent info")
    refused(update([(2**53, 0, [entry(b"\x7e")])]), "out of range")
    refused(update([(1, 2**31, [entry(b"\x7e")])]), "out of range")
    refused(one(b"\x73"), "Any tag")
    refused(one(b"\x80"), "Any tag")
    refused(one(b"\x7b\x00\x00"), "truncated")
    refused(one(b"\x7d" + b"\xff" * 10 + b"\x00"), "varint")
    refused(one(b"\x7d" + b"\xff" * 9 + b"\x02"), "i64")
    passes(one(b"\x7d" + b"\xff" * 9 + b"\x01"))
    passes(one(b"\x7d" + b"\xff" * 8 + b"\x7f"))


def test_clocks_stay_below_2_31() -> None:
    passes(update([(1, 2**31 - 6, [b"\x00\x05"])]))
    refused(update([(1, 2**31 - 6, [b"\x00\x05", b"\x0a\x01"])]), "clock")
    refused(update([(1, 2**31 - 1, [entry(b"\x7e\x7e", count=2)])]), "clock")
    refused(update([(1, 2**31, [b"\x00\x01"])]), "out of range")
    passes(update([], [(1, [(2**31 - 6, 5)])]))
    refused(update([], [(1, [(2**31 - 6, 6)])]), "deleted range")
    refused(update([], [(1, [(2**31, 1)])]), "out of range")
    origin = b"\x88" + uv(2) + uv(2**31) + b"\x01\x7e"
    refused(update([(1, 0, [origin])]), "out of range")


# ---- random and mutated bytes ------------------------------------------------------


@SETTINGS
@given(st.binary(max_size=300))
def test_random_bytes_raise_nothing_but_invalid_update(data: bytes) -> None:
    verdict(data)


def _corpus() -> list[bytes]:
    rnd = random.Random(3)
    doc = pycrdt.Doc()
    m = doc.get("m", type=pycrdt.Map)
    t = doc.get("t", type=pycrdt.Text)
    with doc.transaction():
        for i in range(24):
            m[f"k{i}"] = message(rnd, body="é" if i == 5 else None)
    out = [doc.get_update()]
    before = doc.get_state()
    t.insert(0, "hello wörld", {"bold": True})
    t.insert_embed(3, {"img": "x"})
    del t[1:4]
    m["k0"] = [1.5, b"\x00\xff", {"x": None}, 2**40]
    out += [doc.get_update(before), doc.get_update()]
    return out


CORPUS = _corpus()


@SETTINGS
@given(st.data())
def test_mutated_updates_raise_nothing_but_invalid_update(data: st.DataObject) -> None:
    blob = bytearray(data.draw(st.sampled_from(CORPUS)))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(blob) - 1))
        how = data.draw(st.sampled_from(["flip", "set", "insert", "delete", "huge"]))
        if how == "flip":
            blob[at] ^= 1 << data.draw(st.integers(0, 7))
        elif how == "set":
            blob[at] = data.draw(st.integers(0, 255))
        elif how == "insert":
            blob[at:at] = data.draw(st.binary(min_size=1, max_size=4))
        elif how == "delete":
            del blob[at : at + data.draw(st.integers(1, 8))]
        else:
            blob[at : at + 1] = b"\xff\xff\xff\xff\x0f"
    mutant = bytes(blob)
    if verdict(mutant) is None:  # what passes, pycrdt handles without drama
        with contextlib.suppress(InvalidUpdate):
            Replica("s").apply(mutant)


def test_the_fast_lane_reads_entries_of_the_chat_schema() -> None:
    """The lane reads objects of exactly ``_LANE_ENTRIES`` entries: the chat schema's
    (should an entry gain a field, the lane would silently stand aside)."""
    from p2p.proto.model import Entry

    value = Entry(id="0" * 20, kind="msg", account="a", device="d", ts="1.0").to_value()
    assert len(value) == yupdate._LANE_ENTRIES
    doc = pycrdt.Doc()
    doc.get("m", type=pycrdt.Map)["k"] = value
    update = doc.get_update()
    # one client with one struct at clock 0: the struct follows those four varuints
    client = yupdate.encode_uvar(doc.client_id)
    assert update.startswith(b"\x01\x01" + client + b"\x00")
    start = 3 + len(client)
    match = yupdate._lane().match(update, start)
    assert match is not None
    assert yupdate._refusal(update) is None


# ---- updates that make yrs panic (and leave the document poisoned) ------------------

S_A = b"\x04\x01" + st_("t") + st_("a")
AAA = update([(5, 0, [S_A, S_A, S_A])])
POISON = base64.b64decode("AQkAAAEBAQEBAQEBAAAAAAEAAAABAQEBAQEBAQEBAQEBAQEBAQEBAQEAAAA=")
PANICS = {
    # name: (history, update, refusal); each panicked pycrdt before the check refused it
    "44 bytes: empty Deleted and GC structs": (b"", POISON, "length 0"),
    "an empty GC struct last": (b"", bytes.fromhex("0101020100000102010005"), "length 0"),
    "an empty GC struct": (
        b"",
        update([(5, 0, [b"\x00\x01", b"\x00\x00"])], [(5, [(0, 1)])]),
        "length 0",
    ),
    "an empty Any item again": (
        AAA,
        update([(5, 1, [b"\x48" + uv(0) + uv(0) + b"\x00"])]),
        "length 0",
    ),
    "an empty string again": (
        AAA,
        update([(5, 1, [b"\x04\x01" + st_("t") + st_("")])]),
        "length 0",
    ),
    "an empty Deleted item again": (
        AAA,
        update([(5, 1, [b"\x01\x01" + st_("t") + b"\x00"])]),
        "length 0",
    ),
    "a client without structs": (AAA, update([(5, 0, [])]), "no structs"),
    "a clock 2**31 ahead": (AAA, update([(5, 2**32 - 3, [b"\x00\x01"])]), "out of range"),
    "a clock 2**31 ahead, then a deletion": (
        b"",
        update([(5, 2**31 + 5, [b"\x03\x01" + st_("m") + st_("x")])], [(5, [(1, 5)])]),
        "out of range",
    ),
}


def _panic_of(history: bytes, data: bytes) -> str | None:
    doc: pycrdt.Doc[Any] = pycrdt.Doc()
    if history:
        doc.apply_update(history)
    try:
        doc.apply_update(data)
        pycrdt.Doc().apply_update(doc.get_update())
    except Exception:
        return None
    except BaseException as exc:  # pyo3's PanicException
        return f"{type(exc).__name__}: {exc}"
    return None


@pytest.mark.parametrize("name", sorted(PANICS))
def test_updates_that_panic_pycrdt_are_refused(name: str) -> None:
    history, data, why = PANICS[name]
    assert _panic_of(history, data) is not None, "pycrdt takes it now: a stale case"
    refused(data, why)


def test_the_44_byte_update_poisons_a_bare_document() -> None:
    """What the check prevents: the panic leaves client 0 in the state vector, and the
    document's own full state then panics every fresh document it is applied to."""
    doc: pycrdt.Doc[Any] = pycrdt.Doc()
    with pytest.raises(BaseException, match="divide by zero"):
        doc.apply_update(POISON)
    assert doc.get_state() == b"\x01\x00\x01"
    with pytest.raises(BaseException, match="divide by zero"):
        doc.get_update()


def test_impossible_references_are_refused() -> None:
    """A struct's origin or parent must be an earlier struct of its own client (or any
    struct of another one); each client has one section."""
    any_m = entry(b"\x7e")
    refused(update([(5, 0, [b"\x88" + uv(5) + uv(0) + b"\x01\x7e"])]), "origin")
    refused(update([(5, 0, [any_m, b"\x88" + uv(5) + uv(3) + b"\x01\x7e"])]), "origin")
    passes(update([(5, 0, [any_m, b"\x88" + uv(5) + uv(0) + b"\x01\x7e"])]))
    passes(update([(5, 0, [b"\x88" + uv(6) + uv(9) + b"\x01\x7e"])]))
    refused(update([(5, 0, [b"\x08\x00" + uv(5) + uv(0) + b"\x01\x7e"])]), "parent")
    passes(update([(5, 1, [b"\x08\x00" + uv(5) + uv(0) + b"\x01\x7e"])]))
    refused(update([(5, 0, [S_A]), (5, 1, [S_A])]), "two sections")


def test_origins_and_parents_count_among_the_clients_touched() -> None:
    """Placing a struct after another's is how a map value is replaced: the clients an
    update refers to are among those it touches, with or without a delete set."""
    ours: pycrdt.Doc[Any] = pycrdt.Doc(client_id=1)
    ours.get("m", type=pycrdt.Map)["k"] = "ours"
    theirs: pycrdt.Doc[Any] = pycrdt.Doc(client_id=2)
    theirs.apply_update(ours.get_update())
    before = theirs.get_state()
    theirs.get("m", type=pycrdt.Map)["k"] = "theirs"
    overwrite = theirs.get_update(before)
    assert check_update(overwrite, "s") == {1, 2}  # the delete set names client 1
    bare = yupdate.strip_deletions(overwrite, lambda c: c == 2)
    assert check_update(bare, "s") == {1, 2}  # and so does the origin
    right = update([(2, 0, [b"\x48" + uv(1) + uv(0) + b"\x01\x7e"])])
    assert check_update(right, "s") == {1, 2}
    parent = update([(2, 0, [b"\x08\x00" + uv(3) + uv(0) + b"\x01\x7e"])])
    assert check_update(parent, "s") == {2, 3}


def test_the_keys_an_update_opens_are_read_alike_in_and_out_of_the_lane() -> None:
    rnd = random.Random(5)
    doc: pycrdt.Doc[Any] = pycrdt.Doc()
    m = doc.get("m", type=pycrdt.Map)
    with doc.transaction():
        for i in range(40):
            m[f"k{i}"] = message(rnd, body="é" if i == 3 else None)
        m["ключ" * 40] = {"b": "x" * 300}
        doc.get("v", type=pycrdt.Map)["device"] = "receipt"
    before = doc.get_state()
    m["k0"] = "again"  # an overwrite names no key: it takes its origin's
    for data in (doc.get_update(), doc.get_update(before)):
        fast: list[tuple[str, str]] = []
        plain: list[tuple[str, str]] = []
        assert yupdate._refusal(data, opened=fast) is None
        assert yupdate._refusal(data, lane=False, opened=plain) is None
        assert fast == plain
    opened: list[tuple[str, str]] = []
    check_update(doc.get_update(), "s", opened)
    assert sorted(opened) == sorted(
        [("m", f"k{i}") for i in range(40)] + [("m", "ключ" * 40), ("v", "device")]
    )
    opened = []
    check_update(doc.get_update(before), "s", opened)
    assert opened == []


def test_deps_say_what_an_update_needs_and_brings() -> None:
    """What yrs would hold back: structs after a gap in their client, structs placed
    next to (or deleting) structs the document lacks."""
    alice = pycrdt.Doc(client_id=1)
    bob = pycrdt.Doc(client_id=2)
    alice_map = alice.get("m", type=pycrdt.Map)
    alice_map["k"] = "first"
    first = alice.get_update()
    before = alice.get_state()
    alice_map["j"] = "second"
    second = alice.get_update(before)  # alice's clock 1 onwards: needs the first
    bob.apply_update(first)
    bob_map = bob.get("m", type=pycrdt.Map)
    bob_state = bob.get_state()
    bob_map["k"] = "bob's"  # placed after alice's item and deleting it
    overwrite = bob.get_update(bob_state)

    deps = yupdate.Deps()
    check_update(first, "s", deps=deps)
    assert (deps.needs, deps.ends) == ({1: 0}, {1: 1})
    deps = yupdate.Deps()
    check_update(second, "s", deps=deps)
    assert (deps.needs, deps.ends) == ({1: 1}, {1: 2})
    deps = yupdate.Deps()
    check_update(overwrite, "s", deps=deps)
    assert deps.ends == {2: 1}
    assert deps.needs == {1: 1, 2: 0}  # alice's item: its origin, and what it deletes


def test_a_replica_knows_when_yrs_may_hold_structs_back() -> None:
    source = pycrdt.Doc(client_id=1)
    source_map = source.get("m", type=pycrdt.Map)
    updates = []
    for n in range(3):
        before = source.get_state()
        source_map[f"k{n}"] = {"n": str(n)}
        updates.append(source.get_update(before))
    replica = Replica("s")
    assert not replica.apply(updates[0]).took_held
    assert not replica.apply(updates[2]).took_held  # held back: the second is missing
    assert replica.apply(updates[1]).took_held  # brings the second, and the third with it
    assert not replica.apply(updates[1]).took_held  # nothing held any more


@given(st.integers(min_value=0, max_value=2**64 - 1), st.binary(max_size=4))
def test_read_varint_reads_what_encode_uvar_writes(value: int, tail: bytes) -> None:
    data = b"\x07" + yupdate.encode_uvar(value) + tail
    assert yupdate.read_varint(data, 1) == (value, len(data) - len(tail))


def test_read_varint_bounds_its_length_and_signs() -> None:
    assert yupdate.read_varint(b"\x41", 0, signed=True) == (-1, 1)
    assert yupdate.read_varint(b"\x81\x01", 0, signed=True) == (65, 2)
    assert yupdate.read_varint(b"\xff" * 9 + b"\x01", 0) == (2**64 - 1, 10)
    with pytest.raises(ValueError, match="longer than 10 bytes"):
        yupdate.read_varint(b"\x80" * 10 + b"\x00", 0)
    with pytest.raises(IndexError):
        yupdate.read_varint(b"\x80\x80", 0)
