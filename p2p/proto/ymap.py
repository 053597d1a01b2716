"""Reading and writing root-map sets of Yjs updates without a document.

Why: a chat's document holds its whole history, and loading it costs about 2 KB of
memory a message. Most of what a running node applies and writes needs none of it: a
message is an item under a new key of a root map, and a receipt or read marker is an
item placed after the one it replaces (its *origin*) under a key whose current item is
known (see ``p2p.proto.model.Replica``, "side heads"). This module reads an update's
structs as such sets (:func:`read_structs`) and writes updates made of them
(:func:`encode_sets`), in the format of :mod:`p2p.proto.yupdate`.

Rules:

- :func:`read_structs` reads only bytes :func:`p2p.proto.yupdate.check_update` accepted
  (or our own store's, checked when written): it does not check again, but it never
  reads past the end (IndexError) and decodes ``Any`` values only when asked
  (:func:`value_at`), bounded by ``yupdate.MAX_DEPTH`` as the check was.
- :func:`encode_sets` writes what Yjs's ``Map.set`` writes: an item with our next
  clock, its origin the current item under the key (the key and parent are then left
  out: the origin names them), or none for a new key (then the root map's name and the
  key are written), one ``Any`` value; and the delete set naming each replaced item.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Final

from p2p.proto.yupdate import MAX_DEPTH, _content, _lane, _span, _text, encode_uvar, read_varint

_GC: Final = 0
_SKIP: Final = 10
_DELETED: Final = 1
_ANY: Final = 8
_HAS_ORIGIN: Final = 0x80
_HAS_RIGHT_ORIGIN: Final = 0x40
_HAS_PARENT_SUB: Final = 0x20
ItemId = tuple[int, int]
"""(client, clock) of a struct."""


@dataclass(slots=True)
class Struct:
    """One struct of an update, as much of it as the map rules need."""

    client: int
    clock: int
    length: int
    kind: int
    """Content kind (``yupdate``'s numbering); 0 for GC, 10 for Skip."""
    origin: ItemId | None = None
    right: ItemId | None = None
    name: str | None = None
    """The root type it is in, when written (no origin, parent named by a string)."""
    key: str | None = None
    """Its map key, when written (see :attr:`name`)."""
    parent_id: ItemId | None = None
    """Its parent when that is an item, not a root type (never in our schema)."""
    values_at: int = -1
    """Where its ``Any`` values start (after their count), for :func:`value_at`."""

    @property
    def single_value(self) -> bool:
        """Whether it holds exactly one ``Any`` value (a map set always does)."""
        return self.kind == _ANY and self.length == 1

    @property
    def id(self) -> ItemId:
        return (self.client, self.clock)


DeleteSet = list[tuple[int, int, int]]
"""(client, clock, length) of each deleted range."""


def read_structs(data: bytes) -> tuple[list[Struct], DeleteSet]:
    """Every struct of a checked update, and its delete set (see the module rules)."""
    out: list[Struct] = []
    lane = _lane().match
    clients, pos = read_varint(data, 0)
    for _ in range(clients):
        count, pos = read_varint(data, pos)
        client, pos = read_varint(data, pos)
        clock, pos = read_varint(data, pos)
        for _ in range(count):
            info = data[pos]
            if info == 0x28:
                match = lane(data, pos)
                if match is not None:  # no origins, a short name and key, one value
                    n = data[pos + 2]
                    k = pos + 3 + n
                    m = data[k]
                    out.append(
                        Struct(
                            client,
                            clock,
                            1,
                            _ANY,
                            name=data[pos + 3 : k].decode(),
                            key=data[k + 1 : k + 1 + m].decode(),
                            values_at=k + 2 + m,
                        )
                    )
                    pos = match.end()
                    clock += 1
                    continue
            pos += 1
            if info in (_GC, _SKIP):
                length, pos = read_varint(data, pos)
                out.append(Struct(client, clock, length, info))
                clock += length
                continue
            s = Struct(client, clock, 0, info & 0x1F)
            if info & _HAS_ORIGIN:
                oc, pos = read_varint(data, pos)
                ok, pos = read_varint(data, pos)
                s.origin = (oc, ok)
            if info & _HAS_RIGHT_ORIGIN:
                rc, pos = read_varint(data, pos)
                rk, pos = read_varint(data, pos)
                s.right = (rc, rk)
            if not info & (_HAS_ORIGIN | _HAS_RIGHT_ORIGIN):
                parent, pos = read_varint(data, pos)
                if parent == 1:
                    s.name, pos = _string(data, pos)
                else:
                    pc, pos = read_varint(data, pos)
                    pk, pos = read_varint(data, pos)
                    s.parent_id = (pc, pk)
                if info & _HAS_PARENT_SUB:
                    s.key, pos = _string(data, pos)
            if s.kind == _ANY:
                s.length, pos = read_varint(data, pos)
                s.values_at = pos
                for _ in range(s.length):
                    pos = _skip_any(data, pos)
            elif s.kind == _DELETED:
                s.length, pos = read_varint(data, pos)
            else:  # content our schema never writes: its length is of no use here
                s.length, pos = _content(data, pos, s.kind, [])
            out.append(s)
            clock += s.length
    deleted: DeleteSet = []
    n, pos = read_varint(data, pos)
    for _ in range(n):
        client, pos = read_varint(data, pos)
        ranges, pos = read_varint(data, pos)
        for _ in range(ranges):
            clock, pos = read_varint(data, pos)
            length, pos = read_varint(data, pos)
            deleted.append((client, clock, length))
    return out, deleted


def value_at(data: bytes, pos: int) -> Any:
    """The ``Any`` value at ``pos``, as pycrdt gives it (numbers as floats, bytes as
    ``bytes``, undefined and null as None)."""
    value, _ = _read_any(data, pos, 0)
    return value


def _string(data: bytes, pos: int) -> tuple[str, int]:
    return _text(data, pos, [])  # (the blanks are the check's concern, not ours)


def _skip_any(data: bytes, pos: int) -> int:
    _, pos = _read_any(data, pos, 0)
    return pos


def _read_any(data: bytes, pos: int, depth: int) -> tuple[Any, int]:
    tag = data[pos]
    pos += 1
    if tag == 119:
        return _string(data, pos)
    if tag == 118 or tag == 117:
        if depth >= MAX_DEPTH:
            raise ValueError(f"Any values nested deeper than {MAX_DEPTH}")
        n, pos = read_varint(data, pos)
        if tag == 117:
            items = []
            for _ in range(n):
                item, pos = _read_any(data, pos, depth + 1)
                items.append(item)
            return items, pos
        obj = {}
        for _ in range(n):
            key, pos = _string(data, pos)
            obj[key], pos = _read_any(data, pos, depth + 1)
        return obj, pos
    if tag in (126, 127):
        return None, pos
    if tag == 120:
        return True, pos
    if tag == 121:
        return False, pos
    if tag == 125:
        value, pos = read_varint(data, pos, signed=True)
        return float(value), pos
    if tag == 124:
        return float(struct.unpack_from(">f", data, pos)[0]), pos + 4
    if tag == 123:
        return struct.unpack_from(">d", data, pos)[0], pos + 8
    if tag == 122:
        return float(struct.unpack_from(">q", data, pos)[0]), pos + 8
    if tag == 116:
        start, end = _span(data, pos, [])
        return bytes(data[start:end]), end
    raise ValueError(f"Any tag {tag}")


Set = tuple[str, str, dict[str, str], "ItemId | None"]
"""One map set to write: (root map, key, value of string fields, the item it replaces)."""


def encode_sets(client: int, clock: int, sets: list[Set]) -> bytes:
    """A Yjs v1 update of ``sets``, written by ``client`` from ``clock`` on, one clock
    each (see the module rules); the items they replace go into its delete set."""
    out = [b"\x01", encode_uvar(len(sets)), encode_uvar(client), encode_uvar(clock)]
    replaced: dict[int, list[int]] = {}
    for name, key, value, origin in sets:
        if origin is None:
            out += [b"\x28\x01", _encode_string(name), _encode_string(key)]
        else:
            out += [b"\xa8", encode_uvar(origin[0]), encode_uvar(origin[1])]
            replaced.setdefault(origin[0], []).append(origin[1])
        out += [b"\x01\x76", encode_uvar(len(value))]
        for field, text in value.items():
            out += [_encode_string(field), b"\x77", _encode_string(text)]
    out.append(encode_uvar(len(replaced)))
    for owner, clocks in sorted(replaced.items()):
        out += [encode_uvar(owner), encode_uvar(len(clocks))]
        out += [encode_uvar(c) + b"\x01" for c in sorted(clocks)]
    return b"".join(out)


def _encode_string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return encode_uvar(len(raw)) + raw
