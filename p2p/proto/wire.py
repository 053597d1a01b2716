"""Frames on the wire: versioned msgpack maps, size-limited, checked against a schema.

Every frame is a msgpack map ``{"v": PROTOCOL_VERSION, "t": <type>, ...fields}``. The
decoder refuses, with a :class:`~p2p.errors.WireError` subclass, anything that is not
exactly one of the frame types below: too large, not msgpack, trailing bytes, unknown
type, missing or extra field, wrong field type, oversized field, other version. Nothing
past this module ever sees an unchecked value from a peer.

The schema is a table (type -> field -> kind and bound), in the manner of h11's state
tables: adding a frame type is adding a row.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from typing import Any, Final

import msgpack

from p2p.errors import FrameTooLarge, MalformedFrame, TooComplex, UnsupportedVersion

PROTOCOL_VERSION: Final = 1
MAX_FRAME: Final = 1024 * 1024
"""Hard limit on one encoded frame, in bytes (length prefixes above it are refused).
Every producer keeps under it: a history of any size moves as many bounded envelopes
(``p2p.proto.ysplit``), so no peer ever needs a larger buffer and every envelope fits relay
mail."""
MAX_ID: Final = 64
"""Longest id (device, space, message) accepted in a frame."""
MAX_HANDSHAKE_FRAME: Final = 80 * 1024
"""Hard limit on a frame that arrives before its sender is authenticated: a session's
``hello`` (under 2.2 KiB) and ``ident`` (a device list of at most 64 KiB and a few
fields), the clear frames of device linking, the first frame of a relay pipe. Checked
on the length before the frame is read: a stranger gets no more of our memory."""
FRAME_ITEMS: Final = 32
"""Values (keys included) one frame may hold, counted before decoding: the widest frame
type has 6 fields, 13 values. This, not the depth, is what bounds a frame's cost."""
FRAME_DEPTH: Final = 4
"""Nesting a frame may have before decoding (a frame is one map of scalars; a little
room lets the schema check say what is wrong, e.g. a newer version's frame)."""
DEFAULT_DEPTH: Final = 8
"""How deeply :func:`unpack` lets msgpack nest unless told otherwise; the deepest of our
formats (a device list, a space record, linking's space keys) nest 4 deep."""

KiB: Final = 1024
DIGEST_SIZE: Final = 16
"""Bytes of an envelope digest in ``have``/``want`` frames (``p2p.proto.session.digest``)."""
MAX_DIGESTS: Final = 256
"""Digests one ``have`` or ``want`` frame may carry."""
MEDIA_WANT_MAX: Final = 64
"""Most chunk hashes one ``want`` or ``nohave`` frame names (p2p.media)."""
MEDIA_CHUNK_MAX: Final = 512 * KiB
"""Largest plaintext chunk of an attachment; its ciphertext is 16 bytes more (a chunk
frame stays under MAX_FRAME)."""

# field kinds: (python type, max length or max value)
_B = bytes
_S = str
_I = int


@dataclass(frozen=True)
class Field:
    """One field of a frame type: its Python type and its bound (length or value)."""

    kind: type
    bound: int


SCHEMA: Final[dict[str, dict[str, Field]]] = {
    # handshake, in the clear
    "hello": {
        "eph": Field(_B, 32),  # ephemeral X25519 public key for this session
        "nonce": Field(_B, 32),  # fresh random bytes, bind the transcript to this session
        "tags": Field(_B, 64 * 32),  # per discovery key we hold (our account's epochs,
        # then shared conversations'), keyed tags over eph || nonce: any one a peer can
        # check proves we share a space with it
    },
    "ident": {  # boxed: who we are, only for a peer that shares a space with us
        "dev": Field(_S, MAX_ID),  # sender's device id
        "list": Field(_B, 64 * KiB),  # sender's signed device list (identity.DeviceList)
        "lease": Field(_B, 256),  # a companion's lease from the primary (empty otherwise)
        "sig": Field(_B, 64),  # device signature over the handshake transcript
    },
    "reject": {
        "code": Field(_S, 64),  # machine-readable reason (error class name)
    },
    # device linking (p2p.runtime.linking): in the clear, then boxed
    "lcommit": {"c": Field(_B, 32)},  # hash of the new device's ephemeral key, sent first
    "lhello": {
        "pk": Field(_B, 32),  # the primary's device signing key
        "eph": Field(_B, 32),  # its ephemeral X25519 key
        "mac": Field(_B, 32),  # keyed by the code's secret: proves it read the code
        "acct": Field(_B, 32),  # the account key the new device is asked to join
    },
    "lauth": {
        "pk": Field(_B, 32),  # the new device's signing key: its id is the one in the code
        "bpk": Field(_B, 32),  # its box key (grants are sealed to it)
        "name": Field(_S, 64),  # its name (identity.MAX_NAME)
        "eph": Field(_B, 32),  # the new device's ephemeral X25519 key
        "sig": Field(_B, 64),  # by "pk", over the transcript so far, "bpk" and "name"
        "pop": Field(_B, 64),  # its consent to be listed by "acct" (identity.possession_proof)
    },
    "lhave": {"have": Field(_B, 768 * KiB)},  # per space, the vector kept from an earlier try
    "enroll": {
        "list": Field(_B, 64 * KiB),  # the signed device list that includes the new device
        "keys": Field(_B, 768 * KiB),  # every space: id, kind, name, epoch, epoch keys
        "sizes": Field(_B, 64 * KiB),  # every space: bytes to send, messages it holds
        "lease": Field(_B, 256),  # the new companion's first lease
    },
    "piece": {
        "s": Field(_S, MAX_ID),
        "d": Field(_B, 512 * KiB),  # an update of at most linking.CHUNK bytes of its history
    },
    "lsent": {"n": Field(_I, 2**40)},  # history bytes sent in this attempt
    "ldone": {"n": Field(_I, 2**40)},
    "abort": {"code": Field(_S, 64)},
    # inside the session box, after the handshake
    "sv": {
        "s": Field(_S, MAX_ID),  # space id
        "sv": Field(_B, 512 * KiB),  # pycrdt state vector of the sender's replica
    },
    "env": {
        "e": Field(_B, MAX_FRAME - KiB),  # one sealed envelope (crypto.Envelope)
    },
    # lazy gossip (p2p.proto.session): a receiver announces what it got instead of forwarding it
    "have": {
        "s": Field(_S, MAX_ID),  # space id
        "h": Field(_B, MAX_DIGESTS * DIGEST_SIZE),  # digests of envelopes the sender holds
    },
    "want": {
        "h": Field(_B, MAX_DIGESTS * DIGEST_SIZE),  # digests of envelopes asked for
    },
    "list": {
        "l": Field(_B, 64 * KiB),  # a newer signed device list, gossiped
    },
    "lease": {"l": Field(_B, 256)},  # primary -> companion: a renewed lease
    "grant": {
        "g": Field(_B, MAX_FRAME - KiB)
    },  # a space's keys sealed to the peer (p2p.proto.grants)
    "leave": {"n": Field(_I, 2**31)},  # companion -> primary: unlink me (p2p unlink --self)
    "typing": {"s": Field(_S, MAX_ID), "on": Field(_I, 255)},  # 0: stopped; never stored
    "ping": {"n": Field(_I, 2**63 - 1)},
    "pong": {"n": Field(_I, 2**63 - 1)},
    "bye": {"code": Field(_S, 64)},
    # media transfer (p2p.media), boxed in an open session, on its own low-priority lane
    "ask": {"h": Field(_B, MEDIA_WANT_MAX * 32)},  # chunk hashes asked for, 32 bytes each
    "blob": {
        "h": Field(_B, 32),  # the chunk's hash (BLAKE2b-256 of its ciphertext)
        "d": Field(_B, MEDIA_CHUNK_MAX + 16),  # the encrypted chunk
    },
    "nohave": {"h": Field(_B, MEDIA_WANT_MAX * 32)},  # asked-for hashes we cannot serve
}


def encode_frame(kind: str, **fields: Any) -> bytes:
    """Encode a frame of type ``kind``; validates it as the decoder would.

    Encoding our own frames through the same checks keeps sender and receiver honest with
    each other: a frame we can build is a frame a peer accepts.
    """
    frame = {"v": PROTOCOL_VERSION, "t": kind, **fields}
    data: bytes = msgpack.packb(frame, use_bin_type=True)
    _check(frame, len(data))
    return data


def decode_frame(data: bytes, *, limit: int = MAX_FRAME) -> dict[str, Any]:
    """Decode and validate one frame; raise a WireError for anything else.

    ``limit`` is lower than :data:`MAX_FRAME` for frames from a peer that has not proven
    anything yet (:data:`MAX_HANDSHAKE_FRAME`). The shape is checked on the encoded bytes
    first (:func:`scan`): a frame holds at most :data:`FRAME_ITEMS` values, so
    decoding one costs about its own size whatever a peer puts in it."""
    if len(data) > limit:
        raise FrameTooLarge(len(data), limit)
    scan(data, what="frame", max_depth=FRAME_DEPTH, max_items=FRAME_ITEMS)
    try:
        frame = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
        )
    except msgpack.ExtraData as exc:
        raise MalformedFrame("trailing bytes after the frame") from exc
    except (ValueError, msgpack.UnpackException, TypeError, RecursionError) as exc:
        raise MalformedFrame(f"not msgpack: {type(exc).__name__}") from exc
    _check(frame, len(data))
    return frame  # type: ignore[no-any-return]


def _check(frame: object, size: int) -> None:
    if size > MAX_FRAME:
        raise FrameTooLarge(size, MAX_FRAME)
    if not isinstance(frame, dict):
        raise MalformedFrame("a frame is a map")
    version = frame.get("v")
    if type(version) is not int:
        raise MalformedFrame("missing protocol version")
    if version != PROTOCOL_VERSION:
        raise UnsupportedVersion(version)
    kind = frame.get("t")
    if not isinstance(kind, str) or kind not in SCHEMA:
        raise MalformedFrame(f"unknown frame type {str(kind)[:32]!r}")
    fields = SCHEMA[kind]
    if len(frame) != len(fields) + 2:
        extra = set(frame) - set(fields) - {"v", "t"}
        missing = set(fields) - set(frame)
        raise MalformedFrame(
            f"{kind} frame: missing {sorted(missing)!r}, unexpected {sorted(map(str, extra))!r}"
        )
    for name, spec in fields.items():
        if name not in frame:
            raise MalformedFrame(f"{kind} frame: missing field {name!r}")
        value = frame[name]
        if type(value) is not spec.kind:
            raise MalformedFrame(f"{kind}.{name}: expected {spec.kind.__name__}")
        if isinstance(value, int):
            if not 0 <= value <= spec.bound:
                raise MalformedFrame(f"{kind}.{name}: out of range")
        elif isinstance(value, str | bytes) and len(value) > spec.bound:
            raise MalformedFrame(f"{kind}.{name}: longer than {spec.bound}")


def pack(value: Any) -> bytes:
    """Canonical msgpack bytes of a plain value (what signatures are computed over)."""
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


def unpack(
    data: bytes,
    *,
    what: str,
    max_size: int = MAX_FRAME,
    max_items: int | None = None,
    max_depth: int = DEFAULT_DEPTH,
) -> Any:
    """Decode msgpack from outside (envelopes, device lists, records); WireError on junk.

    Before decoding, :func:`scan` bounds the nesting (``max_depth``) and the number of
    values (``max_items``; by default one per 8 bytes of input, plus 64): decoded Python
    objects then cost at most a small multiple of the input's size, where unchecked
    msgpack lets each input byte become a 56-byte empty list."""
    if len(data) > max_size:
        raise FrameTooLarge(len(data), max_size)
    if max_items is None:
        max_items = 64 + len(data) // 8
    scan(data, what=what, max_depth=max_depth, max_items=max_items)
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except msgpack.ExtraData as exc:
        raise MalformedFrame(f"{what}: trailing bytes") from exc
    except (ValueError, msgpack.UnpackException, TypeError, RecursionError) as exc:
        raise MalformedFrame(f"{what}: not msgpack ({type(exc).__name__})") from exc


# ---- bounding msgpack before decoding it -----------------------------------------------

# Bytes each msgpack type byte is followed by before its value's payload (for types whose
# payload length is fixed or given by that header): (header bytes, fixed payload bytes).
_FIXED: Final[dict[int, int]] = {
    0xC0: 0, 0xC2: 0, 0xC3: 0,  # nil, false, true
    0xCA: 4, 0xCB: 8,  # float 32 / 64
    0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8,  # uint 8..64
    0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8,  # int 8..64
    0xD4: 2, 0xD5: 3, 0xD6: 5, 0xD7: 9, 0xD8: 17,  # fixext 1..16 (with the type byte)
}  # fmt: skip
_SIZED: Final[dict[int, tuple[int, int]]] = {
    0xC4: (1, 0), 0xC5: (2, 0), 0xC6: (4, 0),  # bin 8/16/32
    0xC7: (1, 1), 0xC8: (2, 1), 0xC9: (4, 1),  # ext 8/16/32 (+ type byte)
    0xD9: (1, 0), 0xDA: (2, 0), 0xDB: (4, 0),  # str 8/16/32
}  # fmt: skip
_CONTAINERS: Final[dict[int, tuple[int, int]]] = {
    0xDC: (2, 1), 0xDD: (4, 1),  # array 16/32: (length bytes, values per entry)
    0xDE: (2, 2), 0xDF: (4, 2),  # map 16/32
}  # fmt: skip


def scan(data: bytes, *, what: str, max_depth: int, max_items: int) -> None:
    """Walk the headers of one msgpack value without building it; TooComplex if it nests
    deeper than ``max_depth`` containers or holds more than ``max_items`` values (keys
    count), MalformedFrame if it is cut short or names a length past its end.

    Runs in time proportional to the values it meets, never past ``max_items`` of them,
    so refusing a hostile input costs little, and what passes decodes into at most
    ``max_items`` objects. msgpack itself has no depth or count limit (only a length per
    container), hence this walk before every decode of outside bytes.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedFrame(f"{what}: not bytes but {type(data).__name__}")
    end = len(data)
    pos = 0
    items = 0
    left = 1  # values still to read at the current level
    stack: list[int] = []
    while True:
        if not left:
            if not stack:
                break
            left = stack.pop()
            continue
        left -= 1
        items += 1
        if items > max_items:
            raise TooComplex(f"{what}: more than {max_items} values")
        if pos >= end:
            raise MalformedFrame(f"{what}: not msgpack (cut short)")
        b = data[pos]
        pos += 1
        if b <= 0x7F or b >= 0xE0:  # positive / negative fixint
            continue
        if b <= 0x8F:  # fixmap
            count = 2 * (b & 0x0F)
        elif b <= 0x9F:  # fixarray
            count = b & 0x0F
        elif b <= 0xBF:  # fixstr
            pos += b & 0x1F
            continue
        elif b in _FIXED:
            pos += _FIXED[b]
            continue
        elif b in _SIZED:
            width, extra = _SIZED[b]
            pos += width + extra + int.from_bytes(data[pos : pos + width], "big")
            continue
        elif b in _CONTAINERS:
            width, per = _CONTAINERS[b]
            count = per * int.from_bytes(data[pos : pos + width], "big")
            pos += width
        else:  # 0xC1: never used
            raise MalformedFrame(f"{what}: not msgpack (byte 0x{b:02x})")
        if count:
            if count > end - pos:  # every value takes at least one byte
                raise MalformedFrame(f"{what}: not msgpack (a container past the end)")
            stack.append(left)
            if len(stack) > max_depth:
                raise TooComplex(f"{what}: nested deeper than {max_depth}")
            left = count
    if pos > end:
        raise MalformedFrame(f"{what}: not msgpack (cut short)")
    if pos < end:
        raise MalformedFrame(f"{what}: trailing bytes")


# ---- bounding JSON before parsing it -----------------------------------------------------

_NOT_BRACKET: Final = re.compile(r"[^\[\]{}]+")
_DEPTH_STEP: Final = {"[": 1, "{": 1, "]": -1, "}": -1}


def json_depth(text: str) -> int:
    """How deeply ``text`` nests arrays and objects, brackets inside strings left out.

    Linear and in C for the most part: escapes are dropped (``\\\\`` first, then
    ``\\"``), so every quote left delimits a string and the pieces between every other
    quote are outside strings. Meant for text about to go to ``json.loads``; on text
    that is not JSON the figure is only an estimate, and ``json.loads`` refuses it.
    """
    cleaned = text.replace("\\\\", "").replace('\\"', "")
    outside = "".join(cleaned.split('"')[0::2])
    brackets = _NOT_BRACKET.sub("", outside)
    return max(itertools.accumulate(map(_DEPTH_STEP.__getitem__, brackets)), default=0)


def load_json(data: str | bytes, *, what: str, max_size: int, max_depth: int) -> Any:
    """``json.loads`` for text from outside (a control request, a descriptor, an entry's
    body): its size and nesting are bounded before parsing, so deeply nested input is
    a TooComplex, never a RecursionError escaping the caller, and anything not JSON is
    a MalformedFrame."""
    if len(data) > max_size:
        raise FrameTooLarge(len(data), max_size)
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as exc:
        raise MalformedFrame(f"{what}: not UTF-8") from exc
    if json_depth(text) > max_depth:
        raise TooComplex(f"{what}: nested deeper than {max_depth}")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise MalformedFrame(f"{what}: not JSON ({type(exc).__name__})") from exc
