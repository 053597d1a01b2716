"""A structural check of Yjs update v1 bytes, run before pycrdt sees them.

Why: pycrdt's ``Doc.apply_update`` (yrs 0.28 underneath) trusts the counts an update
declares. It reserves memory for a declared number of clients, structs, ``Any`` values,
map entries and delete ranges *before* reading them, so 20 hostile bytes make it spend
0.5-0.9 s and 512 MB before it refuses them; nested ``Any`` values make it recurse
without a limit; and it takes string bytes as UTF-8 without checking them. Updates come from
peers, so :func:`check_update` walks the whole encoding first, in pure Python, and refuses
(:class:`~p2p.errors.InvalidUpdate`) anything that is not well-formed, that declares more
elements than there are bytes left to hold them, or that exceeds sane limits. Whatever
passes is read by yrs the way it is read here, so each of its allocations is backed by
bytes of the input.

The format (yrs ``Update::decode`` with ``DecoderV1``; lib0 ``Any``)::

    update     = structs delete_set                         (nothing may follow)
    structs    = varuint n, n * (varuint count, varuint client, varuint clock,
                                 count * struct)
    struct     = info byte: 0 = GC, 10 = Skip, each followed by a varuint length;
                 otherwise an Item: content kind = info & 0x1f; 0x80: origin id,
                 0x40: right origin id (id = varuint client, varuint clock); with
                 neither: varuint parent info (1: parent name string, 0: parent id)
                 and, if 0x20, a parent-sub key string; then the content
    delete_set = varuint n, n * (varuint client, varuint m, m * (varuint clock, len))

Refused because yrs panics on them inside its commit, leaving the document half
changed and its own full state unreadable (every later diff of it panics its receivers):
structs of length 0 (empty GC, Skip, Deleted, string or Any content), a client section
without structs, and clocks of 2**31 or more (see :data:`MAX_CLOCK`). Found by the
differential fuzzing of tests/test_yupdate_diff.py, which applies whatever this
accepts. Refused as well, though no panic was seen from them, because neither Yjs nor
yrs writes them: a client with two sections, and an origin or parent that is not an
earlier struct of the struct's own client (no struct precedes itself).

The clients an update touches (what :func:`check_update` returns) are those of its
structs, of its deleted ranges and of every id its structs refer to (origin, right
origin, parent): integrating a struct after another's item is how a map value is
replaced without deleting it, so referring to a client counts as touching it.

Refused on purpose although yrs knows them, because pycrdt never writes them and yrs
and Yjs disagree on how to read them: JSON content (kind 2: yrs reads one string more
than the declared count), Move content (kind 11), and the XmlHook (5), WeakLink (7) and
Undefined (15) type refs.

Speed: single-byte lengths are read inline; UTF-8 is checked once at the end, over all
bytes that are not binary structure, rather than string by string; and the commonest
struct (a root-map entry set to a dict of short strings) is matched whole by a compiled
regular expression. On a full-state update of 10,000 chat messages (3.5 MB) the check
costs ~40 % of what pycrdt's ``apply_update`` of it costs (~60 % without the regex);
~80-100 % when every message body is 128 bytes or longer (the regex then stands aside).
"""

from __future__ import annotations

import codecs
import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from p2p.errors import InvalidUpdate

MAX_DEPTH: Final = 64
"""Deepest nesting of ``Any`` arrays and maps."""
MAX_CLOCK: Final = 2**31 - 1
"""A client's clock plus a length stays within this. yrs clocks are u32, but yrs
compares a struct's clock with the document's state in 32-bit signed arithmetic: a
struct 2**31 or more clocks ahead of the state counts as already integrated (it is
spliced in without its predecessors), which panics at the next lookup."""
_CLOCKS: Final = MAX_CLOCK + 1
_U32: Final = 2**32
_CLIENT: Final = 2**53
"""Client ids are at most 53 bits (pycrdt refuses more, Yjs cannot represent more)."""
_U64: Final = 2**64
_I64: Final = 2**63

_GC: Final = 0
_SKIP: Final = 10
_HAS_ORIGIN: Final = 0x80
_HAS_RIGHT_ORIGIN: Final = 0x40
_HAS_PARENT_SUB: Final = 0x20

_DELETED: Final = 1
_BINARY: Final = 3
_STRING: Final = 4
_EMBED: Final = 5
_FORMAT: Final = 6
_TYPE: Final = 7
_ANY: Final = 8
_DOC: Final = 9

_TYPE_XML_ELEMENT: Final = 3
_PLAIN_TYPE_REFS: Final = frozenset({0, 1, 2, 4, 6, 9})
"""Array, Map, Text, XmlFragment, XmlText, SubDoc: nothing follows the type ref."""

_EMPTY: Final = "a struct of length 0"
"""Refused whatever its kind: yrs drops an empty item it integrates, but one that
arrives again (or first in a section the document holds already) makes it unwrap a
block that is not there, and empty GC or Skip structs leave blocks whose clock range
ends before it starts (a division by zero at the next lookup, in every later diff).
Yjs never writes one; pycrdt's text edits sometimes write an empty string."""

_LANE_INFO: Final = _HAS_PARENT_SUB | _ANY
_LANE_MIN: Final = 16
"""Client sections with fewer structs do not use (nor compile) the regular expression.
Where it keeps missing structs of its shape (strings of 128 bytes or more, floats), it
is skipped for 8, 16, ... up to 1024 structs, so such updates pay little for it."""
_LANE_ENTRIES: Final = 8
"""Entries of the objects the fast lane reads whole: ``p2p.proto.model.Entry.to_value``."""
_CHUNK: Final = 1 << 16

Blanks = list[tuple[int, int]]
"""Spans of structure that may hold bytes >= 0x80 (multi-byte varints, flag bytes,
numbers, binary payloads), in increasing order. All other bytes are ASCII structure or
string bytes, and every string is bounded on both sides by one or the other, so the
strings are valid UTF-8 exactly when the gaps between these spans are."""


class _Bad(ValueError):
    """Internal: why an update is refused."""


Opened = list[tuple[str, str]]
"""(root map, key) of each struct that names its key: the first of a key's items."""


@dataclass
class Deps:
    """What an update needs of the document it is applied to, and what it brings.

    yrs integrates a struct only once the structs before it (in its client) and the
    ones it refers to (origin, right origin, parent) are there, and a deletion only once
    its structs are; until then it holds them back, and integrates them later inside
    another update's transaction. ``needs``: per client, the clock the document must
    have reached for nothing of this update to be held back. ``ends``: per client, the
    clock its structs end at (what the document reaches once they are in)."""

    needs: dict[int, int] = field(default_factory=dict)
    ends: dict[int, int] = field(default_factory=dict)
    _refs: dict[int, int] = field(default_factory=dict)
    _starts: dict[int, int] = field(default_factory=dict)

    def _resolve(self) -> None:
        """From the raw reads: what outside this update each client must already hold."""
        for client, wanted in self._refs.items():
            start = self._starts.get(client)
            if start is None:
                self.needs[client] = wanted
            elif wanted > self.ends[client]:
                self.needs[client] = max(start, wanted)
        for client, start in self._starts.items():
            self.needs[client] = max(self.needs.get(client, 0), start)

    def _want(self, client: int, clock: int) -> None:
        if clock > self._refs.get(client, 0):
            self._refs[client] = clock


def check_update(
    data: bytes, space: str, opened: Opened | None = None, deps: Deps | None = None
) -> frozenset[int]:
    """Raise InvalidUpdate unless ``data`` is a well-formed, bounded Yjs update v1;
    return the CRDT client ids it touches: writes structs for, deletes structs of, or
    refers to as an origin, right origin or parent (what the caller checks against the
    sender, see ``DeviceState.ingest``). With ``opened``, the keys of root maps that
    the update's structs name are appended to it: a struct placed after or before
    another (with an origin) takes that one's key, so these are the keys the update may
    open (which of them an account may open is ``p2p.proto.model.may_open``). With
    ``deps``, what the update needs and brings is filled in (see :class:`Deps`)."""
    clients: set[int] = set()
    reason = _refusal(bytes(data), clients=clients, opened=opened, deps=deps)
    if reason is not None:
        raise InvalidUpdate(space, reason)
    return frozenset(clients)


def strip_deletions(data: bytes, keep: Callable[[int], bool]) -> bytes:
    """``data`` (a checked update) with the deleted ranges of clients ``keep`` refuses
    left out of its delete set: a diff for a peer of another account carries no
    deletion it would refuse (it accepts from us only what our account's clients did)."""
    blanks: Blanks = []
    structs_end = _structs(data, blanks, True)
    n, pos = _uvar(data, structs_end, _U32, blanks)
    kept: list[bytes] = []
    for _ in range(n):
        start = pos
        client, pos = _uvar(data, pos, _CLIENT, blanks)
        ranges, pos = _uvar(data, pos, _U32, blanks)
        for _ in range(ranges):
            _clock, pos = _uvar(data, pos, _U32, blanks)
            _length, pos = _uvar(data, pos, _U32, blanks)
        if keep(client):
            kept.append(data[start:pos])
    return data[:structs_end] + encode_uvar(len(kept)) + b"".join(kept)


def encode_uvar(value: int) -> bytes:
    """lib0 varuint (LEB128)."""
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _refusal(
    data: bytes,
    lane: bool = True,
    clients: set[int] | None = None,
    opened: Opened | None = None,
    deps: Deps | None = None,
) -> str | None:
    """Why ``data`` is refused, or None. ``lane=False`` skips the regex (for tests);
    ``clients`` collects the client ids the update touches, ``opened`` the keys it
    names (see :func:`check_update`)."""
    blanks: Blanks = []
    seen = clients if clients is not None else set()
    try:
        structs_end = _structs(data, blanks, lane, seen, opened, deps)
        end = _delete_set(data, structs_end, blanks, seen, deps)
        if end > len(data):
            raise IndexError
        if end < len(data):
            raise _Bad(f"{len(data) - end} trailing bytes after the delete set")
        _check_utf8(data, blanks)
        if deps is not None:
            deps._resolve()
    except _Bad as exc:
        return str(exc)
    except IndexError:
        return "truncated update"
    return None


# ---- primitives -------------------------------------------------------------------
# Positions only move forward. A length may carry one past the end: the next read then
# raises IndexError (reported as truncation), or the final position is wrong.


def read_varint(data: bytes, pos: int, *, signed: bool = False) -> tuple[int, int]:
    """The one reader of lib0 variable-length integers: (value, next position).

    Unsigned (varuint, LEB128): 7 value bits a byte, low bits first, the high bit set
    on every byte but the last. Signed (varint): the first byte holds a sign bit
    (0x40) and 6 value bits. At most 10 bytes: ValueError past that; IndexError if
    ``data`` ends first."""
    b = data[pos]
    pos += 1
    first = 6 if signed else 7
    value = b & ((1 << first) - 1)
    negative = signed and b & 0x40
    shift = first
    while b >= 0x80:
        if shift >= first + 63:
            raise _Bad(f"{'varint' if signed else 'varuint'} longer than 10 bytes")
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
    return (-value if negative else value), pos


def _uvar(data: bytes, pos: int, limit: int, blanks: Blanks) -> tuple[int, int]:
    """A varuint below ``limit`` (:func:`read_varint`), blanked for the UTF-8 check."""
    b = data[pos]
    if b < 0x80:
        return b, pos + 1
    value, end = read_varint(data, pos)
    if value >= limit:
        raise _Bad(f"varuint {value} out of range")
    blanks.append((pos, end))
    return value, end


def _ivar(data: bytes, pos: int, blanks: Blanks) -> int:
    """Skip a signed varint of the i64 range (:func:`read_varint`)."""
    if data[pos] < 0x80:
        return pos + 1
    value, end = read_varint(data, pos, signed=True)
    if abs(value) >= _I64:
        raise _Bad("varint out of the i64 range")
    blanks.append((pos, end))
    return end


def _string(data: bytes, pos: int, blanks: Blanks) -> int:
    """Skip a length-prefixed string (its UTF-8 is checked at the end, with the rest)."""
    n = data[pos]
    if n < 0x80:
        return pos + 1 + n
    high = data[pos + 1]
    if high < 0x80:  # two bytes: up to 16 KiB
        blanks.append((pos, pos + 2))
        return pos + 2 + ((n & 0x7F) | high << 7)
    n, pos = _uvar(data, pos, _U32, blanks)
    return pos + n


def _span(data: bytes, pos: int, blanks: Blanks) -> tuple[int, int]:
    """A length-prefixed run of bytes: (start, end), checked to fit in ``data``."""
    n = data[pos]
    if n < 0x80:
        pos += 1
    else:
        n, pos = _uvar(data, pos, _U32, blanks)
    end = pos + n
    if end > len(data):
        raise _Bad(f"declares {n} bytes, {len(data) - pos} left")
    return pos, end


def _buffer(data: bytes, pos: int, blanks: Blanks) -> int:
    """Skip a length-prefixed byte string (any bytes: blanked for the UTF-8 check)."""
    start, end = _span(data, pos, blanks)
    blanks.append((start, end))
    return end


def _text(data: bytes, pos: int, blanks: Blanks) -> tuple[str, int]:
    """A length-prefixed string, decoded: (text, next position)."""
    start, end = _span(data, pos, blanks)
    try:
        return data[start:end].decode("utf-8"), end
    except UnicodeDecodeError:
        raise _Bad("a string is not valid UTF-8") from None


def _count(n: int, data: bytes, pos: int, each: int, what: str) -> None:
    """A declared number of elements, each at least ``each`` bytes, must fit what is left."""
    if n * each > len(data) - pos:
        raise _Bad(f"declares {n} {what}, only {max(0, len(data) - pos)} bytes left")


def _check_utf8(data: bytes, blanks: Blanks) -> None:
    """The bytes outside ``blanks`` (strings and ASCII structure) must be valid UTF-8."""
    prev = 0
    for start, end in blanks:  # in order, not overlapping: each byte is read once
        if start > prev:
            _check_gap(data, prev, start)
        prev = end
    if len(data) > prev:
        _check_gap(data, prev, len(data))


def _check_gap(data: bytes, start: int, end: int) -> None:
    try:
        if end - start <= _CHUNK:
            gap = data[start:end]
            if not gap.isascii():
                gap.decode("utf-8")
            return
        # a big gap: in slices small enough to stay off mmap, ASCII ones skipped
        for i in range(start, end, _CHUNK):
            if not data[i : min(i + _CHUNK, end)].isascii():
                decoder = codecs.getincrementaldecoder("utf-8")()
                for j in range(i, end, _CHUNK):
                    decoder.decode(data[j : min(j + _CHUNK, end)])
                decoder.decode(b"", True)
                return
    except UnicodeDecodeError:
        raise _Bad("a string is not valid UTF-8") from None


# ---- the update -------------------------------------------------------------------


def _structs(
    data: bytes,
    blanks: Blanks,
    lane: bool,
    seen: set[int] | None = None,
    opened: Opened | None = None,
    deps: Deps | None = None,
) -> int:
    size = len(data)
    clients, pos = _uvar(data, 0, _U32, blanks)
    _count(clients, data, pos, 3, "clients")
    sections: set[int] = set()
    refs: set[int] = set()
    for _ in range(clients):
        count, pos = _uvar(data, pos, _U32, blanks)
        client, pos = _uvar(data, pos, _CLIENT, blanks)
        if count == 0:
            raise _Bad(f"client {client} declares no structs")
        if client in sections:
            raise _Bad(f"client {client} has two sections")
        sections.add(client)
        clock, pos = _uvar(data, pos, _CLOCKS, blanks)
        if deps is not None:
            deps._starts[client] = clock
        _count(count, data, pos, 2, "structs")
        fast = _lane().match if lane and count >= _LANE_MIN else None
        misses = pause = 0  # after 4 misses in a row, structs skip the lane a while
        for _ in range(count):
            info = data[pos]
            if info == _LANE_INFO and fast is not None:
                if pause:
                    pause -= 1
                else:
                    match = fast(data, pos)
                    if match is not None:
                        if opened is not None:  # the lane's strings are short: one byte long
                            n = data[pos + 2]
                            k = pos + 3 + n
                            raw = data[pos + 3 : k], data[k + 1 : k + 1 + data[k]]
                            # (invalid UTF-8 is refused at the end, whatever is read here)
                            opened.append(
                                (
                                    raw[0].decode("utf-8", "replace"),
                                    raw[1].decode("utf-8", "replace"),
                                )
                            )
                        pos = match.end()
                        clock += 1
                        misses = 0
                        continue
                    misses += 1
                    if misses >= 4:
                        pause = 8 << min(misses - 4, 7)
            pos += 1
            if info in (_GC, _SKIP):
                length, pos = _uvar(data, pos, _U32, blanks)
                if length == 0:
                    raise _Bad(_EMPTY)
                clock += length
                continue
            if info & (_HAS_ORIGIN | _HAS_RIGHT_ORIGIN):
                blanks.append((pos - 1, pos))
                if info & _HAS_ORIGIN:
                    pos = _ref(data, pos, blanks, client, clock, refs, "origin", deps)
                if info & _HAS_RIGHT_ORIGIN:
                    # (not checked against its own clock: yrs writes a slice of an
                    # item with the whole item's right origin, which can be the slice)
                    pos = _ref(data, pos, blanks, client, _CLOCKS, refs, "right origin", deps)
                # 0x20 may be set here too (Yjs sets it), but no parent-sub follows
            else:
                parent = data[pos]
                if parent == 1 and opened is not None and info & _HAS_PARENT_SUB:
                    name, pos = _text(data, pos + 1, blanks)
                    key, pos = _text(data, pos, blanks)
                    opened.append((name, key))
                elif parent == 1:
                    n = data[pos + 1]
                    pos = pos + 2 + n if n < 0x80 else _string(data, pos + 1, blanks)
                elif parent == 0:
                    pos = _ref(data, pos + 1, blanks, client, clock, refs, "parent", deps)
                else:
                    raise _Bad(f"parent info {parent}")
                if info & _HAS_PARENT_SUB and not (parent == 1 and opened is not None):
                    n = data[pos]
                    pos = pos + 1 + n if n < 0x80 else _string(data, pos, blanks)
            kind = info & 0x1F
            if kind == _ANY:
                n = data[pos]
                if n < 0x80:
                    pos += 1
                else:
                    n, pos = _uvar(data, pos, _U32, blanks)
                if n > size - pos:
                    raise _Bad(f"declares {n} values, only {size - pos} bytes left")
                if n == 0:
                    raise _Bad(_EMPTY)
                for _ in range(n):
                    pos = _any(data, pos, 0, blanks)
                clock += n
            else:
                length, pos = _content(data, pos, kind, blanks)
                if length == 0:
                    raise _Bad(_EMPTY)
                clock += length
        if clock > MAX_CLOCK:
            raise _Bad(f"a client's structs end past clock {MAX_CLOCK}")
        if deps is not None:
            deps.ends[client] = clock
    if seen is not None:
        seen |= sections
        seen |= refs
    return pos


def _ref(
    data: bytes,
    pos: int,
    blanks: Blanks,
    client: int,
    clock: int,
    refs: set[int],
    what: str,
    deps: Deps | None = None,
) -> int:
    """An id a struct refers to (origin, right origin, parent): its client counts among
    those the update touches (placing a struct next to another's is how a map value is
    replaced). A struct can only refer to an earlier struct of its own client."""
    ref_client, pos = _uvar(data, pos, _CLIENT, blanks)
    ref_clock, pos = _uvar(data, pos, _CLOCKS, blanks)
    if ref_client == client and ref_clock >= clock:
        raise _Bad(f"a struct's {what} is its own clock or a later one of its client")
    refs.add(ref_client)
    if deps is not None:
        deps._want(ref_client, ref_clock + 1)
    return pos


def _content(data: bytes, pos: int, kind: int, blanks: Blanks) -> tuple[int, int]:
    """Item content other than Any: (its length in clock units, next position)."""
    if kind == _STRING:  # length in UTF-16 code units, as yrs and Yjs count it
        text, pos = _text(data, pos, blanks)
        if text.isascii():
            return len(text), pos
        return len(text.encode("utf-16-le")) // 2, pos
    if kind == _DELETED:
        return _uvar(data, pos, _U32, blanks)
    if kind == _TYPE:
        ref = data[pos]
        pos += 1
        if ref == _TYPE_XML_ELEMENT:
            pos = _string(data, pos, blanks)  # the element's tag name
        elif ref not in _PLAIN_TYPE_REFS:
            raise _Bad(f"type ref {ref}")
        return 1, pos
    if kind == _BINARY:
        return 1, _buffer(data, pos, blanks)
    if kind == _EMBED:
        return 1, _json(data, pos, blanks)
    if kind == _FORMAT:  # key string, then a JSON value as a string
        return 1, _json(data, _string(data, pos, blanks), blanks)
    if kind == _DOC:  # guid string, then the options as an Any
        return 1, _any(data, _string(data, pos, blanks), 0, blanks)
    raise _Bad(f"content kind {kind}")


def _json(data: bytes, pos: int, blanks: Blanks) -> int:
    text, pos = _text(data, pos, blanks)
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        raise _Bad("embedded JSON does not parse") from None
    return pos


def _any(data: bytes, pos: int, depth: int, blanks: Blanks) -> int:
    """Skip one lib0 Any value."""
    tag = data[pos]
    pos += 1
    if tag == 119:  # string
        n = data[pos]
        return pos + 1 + n if n < 0x80 else _string(data, pos, blanks)
    if tag == 118:  # object: count, then (key string, value) pairs
        if depth >= MAX_DEPTH:
            raise _Bad(f"Any values nested deeper than {MAX_DEPTH}")
        n = data[pos]
        if n < 0x80:
            pos += 1
        else:
            n, pos = _uvar(data, pos, _U64, blanks)
        _count(n, data, pos, 2, "object entries")
        depth += 1
        for _ in range(n):
            k = data[pos]
            pos = pos + 1 + k if k < 0x80 else _string(data, pos, blanks)
            if data[pos] == 119:
                k = data[pos + 1]
                pos = pos + 2 + k if k < 0x80 else _string(data, pos + 1, blanks)
            else:
                pos = _any(data, pos, depth, blanks)
        return pos
    if tag == 117:  # array
        if depth >= MAX_DEPTH:
            raise _Bad(f"Any values nested deeper than {MAX_DEPTH}")
        n, pos = _uvar(data, pos, _U64, blanks)
        _count(n, data, pos, 1, "array values")
        for _ in range(n):
            pos = _any(data, pos, depth + 1, blanks)
        return pos
    if 120 <= tag <= 127:
        if tag <= 121 or tag >= 126:  # true, false, null, undefined
            return pos
        if tag == 125:  # integer
            return _ivar(data, pos, blanks)
        end = pos + (4 if tag == 124 else 8)  # float32; float64 (123), bigint (122)
    elif tag == 116:  # Uint8Array
        return _buffer(data, pos, blanks)
    else:
        raise _Bad(f"Any tag {tag}")
    if end > len(data):
        raise _Bad("truncated number")
    blanks.append((pos, end))
    return end


def _delete_set(
    data: bytes, pos: int, blanks: Blanks, seen: set[int] | None = None, deps: Deps | None = None
) -> int:
    clients, pos = _uvar(data, pos, _U32, blanks)
    _count(clients, data, pos, 2, "delete-set clients")
    for _ in range(clients):
        client, pos = _uvar(data, pos, _CLIENT, blanks)
        if seen is not None:
            seen.add(client)
        ranges, pos = _uvar(data, pos, _U32, blanks)
        _count(ranges, data, pos, 2, "deleted ranges")
        for _ in range(ranges):
            clock, pos = _uvar(data, pos, _CLOCKS, blanks)
            length, pos = _uvar(data, pos, _U32, blanks)
            if clock + length > MAX_CLOCK:
                raise _Bad(f"a deleted range ends past clock {MAX_CLOCK}")
            if deps is not None:
                deps._want(client, clock + length)
    return pos


# ---- the fast lane ----------------------------------------------------------------


@functools.cache
def _lane() -> re.Pattern[bytes]:
    """One whole struct of the commonest shape, read exactly as :func:`_structs` reads it.

    An Item with no origins (info 0x28), parent named by a string, a parent-sub key, and
    one Any value: a short string or scalar, or an object of exactly
    :data:`_LANE_ENTRIES` entries with such values (the chat schema's entries). Strings
    have single-byte lengths, so every byte of structure is ASCII and nothing needs
    blanking; the Any count is 1, so the struct advances the clock by 1. Objects of
    other sizes take the general path. Compiled on first use (~15 ms; with every object
    size from 0 to 15, as it once was, the pattern's text held 16 copies of an entry
    and compiling it cost 0.15-0.3 s, once per process: 9 % of a node's CPU in a
    10,000-message benchmark).
    """

    def byte(n: int) -> bytes:
        return re.escape(bytes([n]))

    # Atomic groups: the alternatives of each choice start with different bytes, so at
    # most one can match; not backtracking into them makes a miss ~3x cheaper.
    string = b"(?>" + b"|".join(byte(n) + b".{%d}" % n for n in range(0x80)) + b")"
    value = rb"(?>\x77" + string + rb"|[\x78\x79\x7e\x7f]|\x7d[\x00-\x7f])"
    entry = string + value
    dict_ = rb"\x76" + byte(_LANE_ENTRIES) + b"(?:%s){%d}" % (entry, _LANE_ENTRIES)
    item = rb"\x28\x01" + string + string + rb"\x01(?>" + dict_ + b"|" + value + b")"
    return re.compile(item, re.DOTALL)
