"""Cutting a Yjs update v1 into bounded updates that, applied in order, make the same
document: how a history of any size crosses the wire in envelopes of at most 1 MiB.

Why here and not in pycrdt: yrs encodes "everything past a state vector" only as one
update, with no upper bound, so a catch-up after 60,000 messages was one 20 MB update
(past every frame and envelope limit). The update format (``p2p.proto.yupdate``) lists, per
client, a run of structs from a start clock, then a delete set; each struct names its
parent or its origins explicitly, so any contiguous run of one client's structs, with
its start clock, is an update of its own. A piece here is a few such runs (at most
``limit`` bytes in all); the delete set travels last, in pieces of whole client entries
(or of ranges, for a client with very many). A piece whose structs depend on structs of
a later piece (an origin of another client) waits inside yrs as pending until that
piece arrives, exactly as an update received out of order does; applied in order, the
pieces leave the receiver with the document the whole update would have made.

The input is one of our own replica's diffs or snapshots (already well-formed), so the
walk trusts it; a malformed update raises InvalidUpdate all the same (it cannot be cut).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator
from typing import Final

from p2p.errors import InvalidUpdate
from p2p.proto.yupdate import (
    _ANY,
    _CLIENT,
    _GC,
    _HAS_ORIGIN,
    _HAS_PARENT_SUB,
    _HAS_RIGHT_ORIGIN,
    _LANE_INFO,
    _SKIP,
    _U32,
    Blanks,
    _any,
    _Bad,
    _content,
    _lane,
    _string,
    _uvar,
    encode_uvar,
)


def _id(data: bytes, pos: int, blanks: Blanks) -> int:
    """Skip one struct id (client, clock); the position after it."""
    _client, pos = _uvar(data, pos, _CLIENT, blanks)
    _clock, pos = _uvar(data, pos, _U32, blanks)
    return pos


SECTION_OVERHEAD: Final = 30
"""Most bytes a run's header takes (three varuints of at most 10 bytes each)."""
EMPTY_DELETE_SET: Final = b"\x00"


def split_update(data: bytes, limit: int) -> Iterator[bytes]:
    """``data`` as updates of at most ``limit`` bytes each, to apply in this order.

    An update that fits is yielded as it is (a small catch-up costs nothing more). A
    single struct larger than ``limit`` goes alone in a piece that exceeds it: the
    caller's envelope then refuses it, as it refused the whole update before (our
    entries are bounded far below any limit used here).

    The pieces take the clients in increasing order of client id, whatever order the
    update lists them in (yrs lists the highest first). A device's runs write as
    increasing client ids (``p2p.state.spaces.crdt_client``), so an item that replaces
    one its device wrote in an earlier run comes after the item it follows: a receiver
    taking a folded snapshot's pieces without the document can then name every item's
    key as it comes (``p2p.proto.model.Replica``, "key chains")."""
    if len(data) <= limit:
        yield data
        return
    try:
        yield from _split(data, limit)
    except (_Bad, IndexError) as exc:
        raise InvalidUpdate("", f"cannot split a malformed update: {exc}") from None


def _split(data: bytes, limit: int) -> Iterator[bytes]:
    blanks: Blanks = []  # required by the readers; not needed here
    found: list[tuple[int, int, int, array[int], array[int]]] = []
    clients, pos = _uvar(data, 0, _U32, blanks)
    for _ in range(clients):  # where each struct ends, and its length, per client
        count, pos = _uvar(data, pos, _U32, blanks)
        client, pos = _uvar(data, pos, _CLIENT, blanks)
        clock, pos = _uvar(data, pos, _U32, blanks)
        ends, lengths = array("q"), array("q")
        found.append((client, clock, pos, ends, lengths))
        for _ in range(count):
            pos, length = _struct(data, pos, blanks)
            ends.append(pos)
            lengths.append(length)
    delete_set = data[pos:]
    sections: list[tuple[int, int, int, int, int]] = []  # count, client, clock, start, end
    used = 1 + len(EMPTY_DELETE_SET)
    for client, clock, pos, ends, lengths in sorted(found, key=lambda run: run[0]):
        for end, length in zip(ends, lengths, strict=True):
            size = end - pos
            last = sections[-1] if sections else None
            joins = last is not None and last[1] == client and last[4] == pos
            grow = size if joins else size + SECTION_OVERHEAD
            if sections and used + grow > limit:
                yield _encode(data, sections, EMPTY_DELETE_SET)
                sections, used = [], 1 + len(EMPTY_DELETE_SET)
                joins, grow = False, size + SECTION_OVERHEAD
            if joins:
                n, c, k, start, _ = sections[-1]
                sections[-1] = (n + 1, c, k, start, end)
            else:
                sections.append((1, client, clock, pos, end))
            used += grow
            clock += length
            pos = end
    if used - len(EMPTY_DELETE_SET) + len(delete_set) <= limit:
        yield _encode(data, sections, delete_set)
        return
    if sections:
        yield _encode(data, sections, EMPTY_DELETE_SET)
    yield from _split_delete_set(delete_set, limit)


def trim_update(data: bytes, past: dict[int, int]) -> bytes | None:
    """``data`` without the structs a replica at state ``past`` (client -> clock) holds
    whole; None when none is left. A struct it holds in part stays whole (yrs skips the
    part it holds; our entries are one clock long, so this is rare: a merged run of
    deleted items, a GC range). The delete set stays whole: a replica that lacks a
    struct of an update lacks that update's deletions too.

    How a catch-up is answered from the store, a stored update at a time, without the
    space's document (``Spaces.stored_diff``)."""
    try:
        return _trim(data, past)
    except (_Bad, IndexError) as exc:
        raise InvalidUpdate("", f"cannot trim a malformed update: {exc}") from None


def _trim(data: bytes, past: dict[int, int]) -> bytes | None:
    blanks: Blanks = []
    sections: list[tuple[int, int, int, int, int]] = []  # count, client, clock, start, end
    dropped = False
    clients, pos = _uvar(data, 0, _U32, blanks)
    for _ in range(clients):
        count, pos = _uvar(data, pos, _U32, blanks)
        client, pos = _uvar(data, pos, _CLIENT, blanks)
        clock, pos = _uvar(data, pos, _U32, blanks)
        held = past.get(client, 0)
        for _ in range(count):
            end, length = _struct(data, pos, blanks)
            if clock + length > held:
                last = sections[-1] if sections else None
                if last is not None and last[1] == client and last[4] == pos:
                    sections[-1] = (last[0] + 1, client, last[2], last[3], end)
                else:
                    sections.append((1, client, clock, pos, end))
            else:
                dropped = True
            clock += length
            pos = end
    if not sections:
        return None
    if not dropped:  # the very bytes: a snapshot of 100 MB is not copied to send it
        return data
    view = memoryview(data)
    return _encode(view, sections, view[pos:])


def _encode(
    data: bytes | memoryview,
    sections: list[tuple[int, int, int, int, int]],
    delete_set: bytes | memoryview,
) -> bytes:
    out: list[bytes | memoryview] = [encode_uvar(len(sections))]
    for count, client, clock, start, end in sections:
        out += (encode_uvar(count), encode_uvar(client), encode_uvar(clock), data[start:end])
    out.append(delete_set)
    return b"".join(out)


def _struct(data: bytes, pos: int, blanks: Blanks) -> tuple[int, int]:
    """One struct at ``pos``: (where it ends, its length in clock units)."""
    info = data[pos]
    if info == _LANE_INFO:
        match = _lane().match(data, pos)
        if match is not None:
            return match.end(), 1
    pos += 1
    if info in (_GC, _SKIP):
        length, pos = _uvar(data, pos, _U32, blanks)
        return pos, length
    if info & (_HAS_ORIGIN | _HAS_RIGHT_ORIGIN):
        if info & _HAS_ORIGIN:
            pos = _id(data, pos, blanks)
        if info & _HAS_RIGHT_ORIGIN:
            pos = _id(data, pos, blanks)
    else:
        parent = data[pos]
        if parent == 1:
            pos = _string(data, pos + 1, blanks)
        elif parent == 0:
            pos = _id(data, pos + 1, blanks)
        else:
            raise _Bad(f"parent info {parent}")
        if info & _HAS_PARENT_SUB:
            pos = _string(data, pos, blanks)
    kind = info & 0x1F
    if kind == _ANY:
        n, pos = _uvar(data, pos, _U32, blanks)
        for _ in range(n):
            pos = _any(data, pos, 0, blanks)
        return pos, n
    length, pos = _content(data, pos, kind, blanks)
    return pos, length


def _split_delete_set(data: bytes, limit: int) -> Iterator[bytes]:
    """A delete set as delete-only updates (no structs) of at most ``limit`` bytes."""
    blanks: Blanks = []
    entries: list[bytes] = []  # encoded (client, ranges) entries of the current piece
    used = 2 + 10  # no structs, and the entry count
    clients, pos = _uvar(data, 0, _U32, blanks)
    for _ in range(clients):
        client, pos = _uvar(data, pos, _CLIENT, blanks)
        ranges, pos = _uvar(data, pos, _U32, blanks)
        held: list[bytes] = []
        held_size = 20  # the entry's client and range count
        for _ in range(ranges):
            start = pos
            _clock, pos = _uvar(data, pos, _U32, blanks)
            _length, pos = _uvar(data, pos, _U32, blanks)
            item = data[start:pos]
            if used + held_size + len(item) > limit and (entries or held):
                if held:
                    entries.append(_ds_entry(client, held))
                    held, held_size = [], 20
                yield _delete_only(entries)
                entries, used = [], 2 + 10
            held.append(item)
            held_size += len(item)
        if held:
            entry = _ds_entry(client, held)
            entries.append(entry)
            used += len(entry)
    if entries:
        yield _delete_only(entries)


def _ds_entry(client: int, ranges: list[bytes]) -> bytes:
    return encode_uvar(client) + encode_uvar(len(ranges)) + b"".join(ranges)


def _delete_only(entries: list[bytes]) -> bytes:
    return b"\x00" + encode_uvar(len(entries)) + b"".join(entries)
