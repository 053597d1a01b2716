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

from dataclasses import dataclass
from typing import Any, Final

import msgpack

from p2p.errors import FrameTooLarge, MalformedFrame, UnsupportedVersion

PROTOCOL_VERSION: Final = 1
MAX_FRAME: Final = 1024 * 1024
"""Hard limit on one encoded frame, in bytes (length prefixes above it are refused).
Every producer keeps under it: a history of any size moves as many bounded envelopes
(``p2p.ysplit``), so no peer ever needs a larger buffer and every envelope fits relay
mail."""
MAX_ID: Final = 64
"""Longest id (device, space, message) accepted in a frame."""

KiB: Final = 1024
DIGEST_SIZE: Final = 16
"""Bytes of an envelope digest in ``have``/``want`` frames (``p2p.sync.digest``)."""
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
    # device linking (p2p.linking): in the clear, then boxed
    "lcommit": {"c": Field(_B, 32)},  # hash of the new device's ephemeral key, sent first
    "lhello": {
        "pk": Field(_B, 32),  # the primary's device signing key
        "eph": Field(_B, 32),  # its ephemeral X25519 key
        "mac": Field(_B, 32),  # keyed by the code's secret: proves it read the code
    },
    "lauth": {
        "eph": Field(_B, 32),  # the new device's ephemeral X25519 key
        "sig": Field(_B, 64),  # by the key in the code, over the transcript so far
    },
    "lhave": {"have": Field(_B, 64 * KiB)},  # history parts kept from an earlier try
    "enroll": {
        "list": Field(_B, 64 * KiB),  # the signed device list that includes the new device
        "keys": Field(_B, 768 * KiB),  # every space: id, kind, name, epoch, epoch keys
        "sizes": Field(_B, 64 * KiB),  # every space: history hash and size in bytes
        "lease": Field(_B, 256),  # the new companion's first lease
    },
    "chunk": {
        "s": Field(_S, MAX_ID),
        "o": Field(_I, 2**40),
        "d": Field(_B, 512 * KiB),  # linking.CHUNK of a history snapshot
    },
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
    # lazy gossip (p2p.sync): a receiver announces what it got instead of forwarding it
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
    "grant": {"g": Field(_B, MAX_FRAME - KiB)},  # a space's keys sealed to the peer (p2p.grants)
    "leave": {"n": Field(_I, 2**31)},  # companion -> primary: unlink me (p2p unlink --self)
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


def decode_frame(data: bytes) -> dict[str, Any]:
    """Decode and validate one frame; raise a WireError for anything else."""
    if len(data) > MAX_FRAME:
        raise FrameTooLarge(len(data), MAX_FRAME)
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


def unpack(data: bytes, *, what: str, max_size: int = MAX_FRAME) -> Any:
    """Decode msgpack from outside (envelopes, device lists, records); WireError on junk."""
    if len(data) > max_size:
        raise FrameTooLarge(len(data), max_size)
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except msgpack.ExtraData as exc:
        raise MalformedFrame(f"{what}: trailing bytes") from exc
    except (ValueError, msgpack.UnpackException, TypeError, RecursionError) as exc:
        raise MalformedFrame(f"{what}: not msgpack ({type(exc).__name__})") from exc
