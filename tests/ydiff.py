"""The differential oracle for ``p2p.proto.yupdate.check_update``, and inputs to feed it.

The promise checked: bytes that ``check_update`` accepts apply in a pycrdt document
without a panic (a fresh one, and one already holding a small history the bytes may refer
to), and the document's own full state then applies in a fresh document, again without a
panic. pycrdt's panics (pyo3's ``PanicException``) are BaseExceptions: caught here
explicitly, so a find is reported, not lost.

Inputs are drawn from a grammar of update v1 (``random_update``) that takes every field
from a small pool of values near the edges (zero lengths, clocks at and past the
history, clients of the base history, origins pointing at themselves or ahead) and from
byte-level mutations of updates pycrdt wrote (``mutated_update``). Used by
tests/test_yupdate_diff.py (briefly in ``make test``, for minutes in ``make chaos``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import pycrdt

from p2p.errors import InvalidUpdate
from p2p.proto import yupdate

BASE_CLIENTS = (1, 2)
"""The clients of :func:`base_history`."""
CLIENTS = (0, 1, 2, 3, 2**53 - 1)


def uv(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(0x80 | (n & 0x7F))
        n >>= 7
    out.append(n)
    return bytes(out)


def st_(raw: bytes) -> bytes:
    return uv(len(raw)) + raw


def base_history() -> bytes:
    """A small history of two clients: a map with an overwritten and a deleted key, a
    text with an insertion in the middle and a deletion, an array, a nested map."""
    a: pycrdt.Doc[Any] = pycrdt.Doc(client_id=1)
    m = a.get("m", type=pycrdt.Map)
    t = a.get("t", type=pycrdt.Text)
    m["k"] = "one"
    m["j"] = {"x": 1}
    t.insert(0, "hello")
    b: pycrdt.Doc[Any] = pycrdt.Doc(client_id=2)
    b.apply_update(a.get_update())
    mb = b.get("m", type=pycrdt.Map)
    tb = b.get("t", type=pycrdt.Text)
    mb["k"] = "two"
    del mb["j"]
    tb.insert(2, "XY")
    del tb[0:1]
    b.get("l", type=pycrdt.Array).extend([1, "a"])
    mb["n"] = pycrdt.Map({"z": "w"})
    a.apply_update(b.get_update(a.get_state()))
    m["k"] = "three"
    return bytes(a.get_update())


_BASE: list[bytes] = []


def base() -> bytes:
    if not _BASE:
        _BASE.append(base_history())
    return _BASE[0]


def _small(rng: random.Random) -> int:
    return rng.choice((0, 0, 1, 1, 2, 3, 5, 8, 2**31 - 2, 2**31, 2**32 - 1))


def _clock(rng: random.Random) -> int:
    return rng.choice((0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 9, 12, 2**31 - 3, 2**31 - 2, 2**31 - 1))


def _id(rng: random.Random) -> bytes:
    return uv(rng.choice(CLIENTS)) + uv(_clock(rng))


def _any(rng: random.Random, depth: int = 0) -> bytes:
    tag = rng.choice((119, 119, 125, 120, 121, 126, 127, 123, 124, 122, 116, 118, 117))
    if tag == 119:
        return b"\x77" + st_(rng.choice((b"", b"v", "é".encode(), b"x" * 130)))
    if tag == 125:
        return b"\x7d" + rng.choice((b"\x00", b"\x41", b"\xff\x7f"))
    if tag in (123, 122):
        return bytes([tag]) + rng.randbytes(8)
    if tag == 124:
        return b"\x7c" + rng.randbytes(4)
    if tag == 116:
        return b"\x74" + st_(rng.randbytes(rng.randrange(4)))
    if tag in (118, 117) and depth < 3:
        n = rng.randrange(3)
        if tag == 118:
            return (
                b"\x76" + uv(n) + b"".join(st_(b"k%d" % i) + _any(rng, depth + 1) for i in range(n))
            )
        return b"\x75" + uv(n) + b"".join(_any(rng, depth + 1) for _ in range(n))
    return bytes([rng.choice((120, 121, 126, 127))])


def _content(rng: random.Random, kind: int) -> bytes:
    if kind == 1:  # Deleted
        return uv(_small(rng))
    if kind == 3:  # Binary
        return st_(rng.randbytes(rng.randrange(3)))
    if kind == 4:  # String
        return st_(rng.choice((b"", b"a", b"ab", "😀".encode(), "é".encode(), b"xyz")))
    if kind == 5:  # Embed (JSON)
        return st_(rng.choice((b"{}", b"1", b'"s"', b"[]")))
    if kind == 6:  # Format: key, JSON value
        return st_(rng.choice((b"bold", b""))) + st_(rng.choice((b"true", b"null", b"{}")))
    if kind == 7:  # Type
        ref = rng.choice((0, 1, 2, 3, 4, 6, 9))
        return bytes([ref]) + (st_(b"p") if ref == 3 else b"")
    if kind == 8:  # Any
        n = rng.choice((0, 1, 1, 1, 2, 3))
        return uv(n) + b"".join(_any(rng) for _ in range(n))
    if kind == 9:  # Doc: guid, options
        return st_(rng.choice((b"g", b""))) + rng.choice((b"\x76\x00", b"\x7e", _any(rng)))
    return b""


def _struct(rng: random.Random) -> bytes:
    roll = rng.random()
    if roll < 0.12:
        return bytes([rng.choice((0, 10))]) + uv(_small(rng))
    kind = rng.choice((1, 3, 4, 4, 5, 6, 7, 8, 8, 8, 9))
    flags = rng.choice((0, 0, 0x80, 0x40, 0xC0, 0x20, 0xA0))
    info = flags | kind
    out = bytes([info])
    if flags & 0x80:
        out += _id(rng)
    if flags & 0x40:
        out += _id(rng)
    if not flags & 0xC0:
        if rng.random() < 0.8:
            out += b"\x01" + st_(rng.choice((b"m", b"t", b"l", b"x", b"")))
        else:
            out += b"\x00" + _id(rng)
        if flags & 0x20:
            out += st_(rng.choice((b"k", b"j", b"n", b"")))
    return out + _content(rng, kind)


def random_update(rng: random.Random) -> bytes:
    """One update from the grammar: well-formed as far as the encoding goes, its fields
    drawn near the edges (see the module docstring)."""
    sections = rng.choice((0, 1, 1, 1, 2, 3))
    clients = rng.sample(CLIENTS, sections)
    if sections >= 2 and rng.random() < 0.1:
        clients[1] = clients[0]  # the same client twice
    out = uv(sections)
    for client in clients:
        n = rng.choice((1, 1, 2, 3, 5))
        out += uv(n) + uv(client) + uv(_clock(rng)) + b"".join(_struct(rng) for _ in range(n))
    ds = rng.choice((0, 0, 1, 2))
    out += uv(ds)
    for _ in range(ds):
        ranges = rng.choice((0, 1, 1, 2))
        out += uv(rng.choice(CLIENTS)) + uv(ranges)
        out += b"".join(uv(_clock(rng)) + uv(_small(rng)) for _ in range(ranges))
    return out


def pycrdt_update(rng: random.Random) -> bytes:
    """An update pycrdt writes, on top of the base history (or not)."""
    doc: pycrdt.Doc[Any] = pycrdt.Doc(client_id=rng.choice((1, 3)))
    if rng.random() < 0.7:
        doc.apply_update(base())
    before = doc.get_state()
    for _ in range(rng.randrange(1, 4)):
        _panics(_edit, doc, rng)  # pycrdt panics on some text offsets itself
    return bytes(doc.get_update(before) if rng.random() < 0.6 else doc.get_update())


def _edit(doc: pycrdt.Doc[Any], rng: random.Random) -> None:
    m = doc.get("m", type=pycrdt.Map)
    t = doc.get("t", type=pycrdt.Text)
    for _ in range(1):
        roll = rng.random()
        if roll < 0.4:
            m[rng.choice("kjn")] = rng.choice(("v", 1, [1, 2], {"a": None}))
        elif roll < 0.6:
            t.insert(rng.randrange(len(t) + 1), rng.choice(("a", "bc", "😀")))
        elif roll < 0.75 and len(t):
            i = rng.randrange(len(t))
            del t[i : i + 1]
        elif roll < 0.85:
            m.pop(rng.choice("kjn"), None)
        else:
            doc.get("l", type=pycrdt.Array).append(rng.choice((1, "x")))


def mutated_update(rng: random.Random) -> bytes:
    """An update pycrdt wrote, with a few bytes changed, inserted or removed."""
    data = bytearray(pycrdt_update(rng))
    for _ in range(rng.randrange(1, 4)):
        roll = rng.random()
        i = rng.randrange(len(data) + 1)
        if roll < 0.5 and i < len(data):
            data[i] = rng.choice((0, 1, 2, rng.randrange(256), data[i] ^ 1))
        elif roll < 0.75:
            data[i:i] = bytes([rng.choice((0, 1, rng.randrange(256)))])
        elif i < len(data):
            del data[i]
    return bytes(data)


def draw(rng: random.Random) -> bytes:
    roll = rng.random()
    if roll < 0.6:
        return random_update(rng)
    if roll < 0.9:
        return mutated_update(rng)
    return pycrdt_update(rng)


@dataclass
class Find:
    """An input ``check_update`` accepts and pycrdt panics on: where and why."""

    data: bytes
    stage: str
    error: str


def _panics(call: Any, *args: Any) -> str | None:
    """The panic message of ``call(*args)``, None if it returned or raised an Exception
    (pycrdt refusing bytes is fine: ``Replica.apply`` maps that to InvalidUpdate)."""
    try:
        call(*args)
    except Exception:
        return None
    except BaseException as exc:
        if type(exc).__name__ != "PanicException":
            raise
        return str(exc)[:200]
    return None


def _full_state(doc: pycrdt.Doc[Any], out: list[bytes]) -> None:
    out.append(bytes(doc.get_update()))


def judge(*updates: bytes) -> Find | None:
    """Check each of ``updates`` and apply those accepted, in order, in a fresh document
    and on the base history (a later one may fill a gap an earlier one left pending);
    then apply each document's full state in a fresh one."""
    accepted = []
    for data in updates:
        try:
            yupdate.check_update(data, "s")
        except InvalidUpdate:
            continue
        accepted.append(data)
    if not accepted:
        return None
    for stage, history in (("fresh", b""), ("on base", base())):
        doc: pycrdt.Doc[Any] = pycrdt.Doc(client_id=99)
        if history:
            doc.apply_update(history)
        for i, data in enumerate(accepted):
            error = _panics(doc.apply_update, data)
            if error is not None:
                return Find(b"".join(accepted[: i + 1]), f"apply #{i} {stage}", error)
        full: list[bytes] = []
        error = _panics(_full_state, doc, full)
        if error is not None:
            return Find(accepted[-1], f"full state {stage}", error)
        error = _panics(pycrdt.Doc(client_id=98).apply_update, full[0])
        if error is not None:
            return Find(accepted[-1], f"re-apply {stage}", error)
    return None
