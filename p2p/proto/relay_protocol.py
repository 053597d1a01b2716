"""The relay wire protocol: msgpack maps over binary websocket messages, strictly checked.

Every message is a msgpack map ``{"v": RELAY_VERSION, "t": <type>, ...fields}``. The
decoder refuses, with a :class:`~p2p.errors.WireError` subclass, anything that is not
exactly one of the message types of its direction: too large, not msgpack, trailing
bytes, unknown type, a missing or extra field, a field of the wrong type, a field out of
bounds, another version. The two directions have their own tables (``open`` means "open a
pipe to" from a client and "a pipe from" from the relay), so a relay never accepts a
message only relays may send, and the other way round. Nothing past this module sees an
unchecked value from the network.

The module is sans-I/O (no trio, no sockets): the relay server, the relay client and the
tests share it, and it is cheap to fuzz. It also holds the two pieces of logic both ends
must agree on: the auth transcript (:func:`auth_message`) and the token bucket
(:class:`TokenBucket`) the relay enforces and a well-behaved client paces itself with.

The protocol, message by message, is in docs/relay.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final, Literal

import msgpack

from p2p.errors import FrameTooLarge, MalformedFrame, UnsupportedVersion
from p2p.proto.wire import scan

RELAY_VERSION: Final = 1
MAX_MESSAGE: Final = 2 * 1024 * 1024
"""Hard ceiling on one websocket message of this protocol, either direction (2 MiB).

A relay may be configured lower (``Limits.max_message``), never higher: clients accept
messages up to this size from any relay."""
MAX_PAYLOAD: Final = MAX_MESSAGE - 1024
"""Largest opaque payload (pipe chunk, mail item) in one message: the 1 KiB left over
covers the envelope of the message, so a chunk the relay re-labels for the other end of a
pipe still fits in the receiver's limit."""
CHUNK: Final = 1024 * 1024
"""Pipe frames are cut into chunks of at most this many bytes (``data`` with ``more``)."""
DOMAIN_AUTH: Final = b"p2p/relay-auth/v1\x00"
NONCE_BYTES: Final = 32
MAIL_ID_BYTES: Final = 16
MAX_RELAY_ID: Final = 256
MAX_WATCH: Final = 64
"""Device ids one connection may watch: an account has at most five devices, and a few
more leave room for the devices of contacts; a bound keeps presence fan-out small."""
MAX_ACK: Final = 1024
MAX_PREAUTH: Final = 4 * 1024
"""Largest message a relay accepts before the device has authenticated (an ``auth`` is
about 150 bytes): a stranger cannot make the relay buffer or decode more."""
MESSAGE_ITEMS: Final = 2 * 8 + MAX_ACK + 8
"""Values one message may hold, counted before decoding: a map of up to 8 fields, one of
which may be a list of up to :data:`MAX_ACK` ids."""
MESSAGE_DEPTH: Final = 3
MAX_CODE: Final = 32
CLIENT_CID_LIMIT: Final = 2**31
"""Clients number the pipes they open below this; the relay numbers the pipes it hands a
client from here up, so both kinds share one namespace per connection without clashing."""
MAX_CID: Final = 2**32 - 1

DEVICE_ID = re.compile(r"[a-z2-7]{16}")
"""What :func:`p2p.proto.identity.short_id` produces: 80 bits as 16 lower-case base32 letters."""

Kind = Literal["bytes", "str", "int", "bool", "dev", "devs", "ids"]


@dataclass(frozen=True)
class Field:
    """One field of a message type: its kind and bounds (length, value or count)."""

    kind: Kind
    hi: int = 0
    lo: int = 0


def _b(hi: int, lo: int = 0) -> Field:
    return Field("bytes", hi, lo)


_DEV = Field("dev")
_CID = Field("int", MAX_CID)
_COUNT = Field("int", 2**62)
_MAIL_ID = _b(MAIL_ID_BYTES, MAIL_ID_BYTES)
_CODE = Field("str", MAX_CODE)

CLIENT_SCHEMA: Final[dict[str, dict[str, Field]]] = {
    # auth: answers the challenge; sig = Ed25519(device key, auth_message(nonce, relay id))
    "auth": {"dev": _DEV, "pk": _b(32, 32), "sig": _b(64, 64)},
    # watch: replaces the set of devices whose presence this connection follows
    "watch": {"ids": Field("devs", MAX_WATCH)},
    # pipes: open one to a device (cid chosen by the client, below CLIENT_CID_LIMIT)
    "open": {"to": _DEV, "cid": Field("int", CLIENT_CID_LIMIT - 1)},
    "data": {"cid": _CID, "data": _b(MAX_PAYLOAD), "more": Field("bool")},
    "close": {"cid": _CID},
    # mailbox
    "post": {"to": _DEV, "id": _MAIL_ID, "data": _b(MAX_PAYLOAD)},
    "ack": {"ids": Field("ids", MAX_ACK)},
    "ping": {"n": _COUNT},
}

SERVER_SCHEMA: Final[dict[str, dict[str, Field]]] = {
    "challenge": {"nonce": _b(NONCE_BYTES, NONCE_BYTES), "relay": Field("str", MAX_RELAY_ID, 1)},
    # welcome: auth accepted; the relay's limits, so a client can stay within them
    "welcome": {
        "msg_rate": _COUNT,
        "msg_burst": _COUNT,
        "byte_rate": _COUNT,
        "byte_burst": _COUNT,
        "max_message": Field("int", MAX_MESSAGE),
        "max_mail": Field("int", MAX_PAYLOAD),
        "max_pipes": _COUNT,
    },
    "presence": {"id": _DEV, "online": Field("bool")},
    "open": {"from": _DEV, "cid": _CID},  # a pipe from a device; cid chosen by the relay
    "opened": {"cid": _CID},  # the pipe the client asked for reached its target
    "data": {"cid": _CID, "data": _b(MAX_PAYLOAD), "more": Field("bool")},
    "closed": {"cid": _CID, "code": _CODE},  # pipe refused or ended (see CLOSE_CODES)
    "posted": {"id": _MAIL_ID},
    "error": {"id": _MAIL_ID, "code": _CODE},  # a post refused (see MAIL_ERRORS)
    "mail": {"id": _MAIL_ID, "from": _DEV, "data": _b(MAX_PAYLOAD)},
    "pong": {"n": _COUNT},
}

CLOSE_CODES: Final = {
    "closed": "the other end closed the pipe",
    "gone": "the other end's connection to the relay ended",
    "offline": "the target device is not connected to the relay",
    "self": "a device cannot open a pipe to itself",
    "too_many": "this connection has as many pipes open as the relay allows",
    "busy": "the target has as many pipes open as the relay allows",
}
MAIL_ERRORS: Final = {
    "quota": "the recipient's mailbox is full (count or bytes)",
    "sender_quota": "the sender holds as much undelivered mail on the relay as it may",
    "relay_full": "the relay's mail storage is full",
    "too_large": "the item is larger than the relay accepts",
    "empty": "a mail item holds at least one byte",
    "self": "a device cannot post to itself",
    "unavailable": "the relay could not store the item (try again later)",
}


def auth_message(nonce: bytes, relay_id: str) -> bytes:
    """What a device signs (after :data:`DOMAIN_AUTH`) to authenticate to a relay.

    The nonce is fresh per connection and the relay id names the relay, so a signature
    can neither be replayed later nor forwarded to another relay by one that is
    malicious. The nonce has a fixed length, so the concatenation is unambiguous.
    """
    return nonce + relay_id.encode("utf-8")


# ---- encoding and decoding ------------------------------------------------------------


def encode_client(kind: str, **fields: Any) -> bytes:
    """A client -> relay message, checked as the relay will check it."""
    return _encode(CLIENT_SCHEMA, kind, fields)


def encode_server(kind: str, **fields: Any) -> bytes:
    """A relay -> client message, checked as a client will check it."""
    return _encode(SERVER_SCHEMA, kind, fields)


def decode_client(data: bytes, *, limit: int = MAX_MESSAGE) -> dict[str, Any]:
    """Decode and check a message a client sent; WireError for anything else."""
    return _decode(CLIENT_SCHEMA, data, limit)


def decode_server(data: bytes, *, limit: int = MAX_MESSAGE) -> dict[str, Any]:
    """Decode and check a message the relay sent; WireError for anything else."""
    return _decode(SERVER_SCHEMA, data, limit)


def _encode(schema: dict[str, dict[str, Field]], kind: str, fields: dict[str, Any]) -> bytes:
    message = {"v": RELAY_VERSION, "t": kind, **fields}
    data: bytes = msgpack.packb(message, use_bin_type=True)
    _check(schema, message, len(data), MAX_MESSAGE)
    return data


def _decode(schema: dict[str, dict[str, Field]], data: bytes, limit: int) -> dict[str, Any]:
    if len(data) > limit:
        raise FrameTooLarge(len(data), limit)
    # bound what decoding can cost before decoding: unchecked msgpack turns each byte of
    # nested empty arrays into a 56-byte list
    scan(data, what="relay message", max_depth=MESSAGE_DEPTH, max_items=MESSAGE_ITEMS)
    try:
        message = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True)
    except msgpack.ExtraData as exc:
        raise MalformedFrame("trailing bytes after the relay message") from exc
    except (ValueError, msgpack.UnpackException, TypeError, RecursionError) as exc:
        raise MalformedFrame(f"relay message is not msgpack: {type(exc).__name__}") from exc
    _check(schema, message, len(data), limit)
    return message  # type: ignore[no-any-return]


def _check(schema: dict[str, dict[str, Field]], message: object, size: int, limit: int) -> None:
    if size > limit:
        raise FrameTooLarge(size, limit)
    if not isinstance(message, dict):
        raise MalformedFrame("a relay message is a map")
    version = message.get("v")
    if type(version) is not int:
        raise MalformedFrame("relay message without a version")
    if version != RELAY_VERSION:
        raise UnsupportedVersion(version)
    kind = message.get("t")
    if not isinstance(kind, str) or kind not in schema:
        raise MalformedFrame(f"unknown relay message type {str(kind)[:32]!r}")
    fields = schema[kind]
    if len(message) != len(fields) + 2 or not all(name in message for name in fields):
        extra = sorted(str(k) for k in set(message) - set(fields) - {"v", "t"})
        missing = sorted(set(fields) - set(message))
        raise MalformedFrame(f"{kind}: missing {missing!r}, unexpected {extra!r}")
    for name, spec in fields.items():
        if not _fits(spec, message[name]):
            raise MalformedFrame(f"{kind}.{name}: not a valid {spec.kind}")


def _fits(spec: Field, value: object) -> bool:
    kind = spec.kind
    if kind == "bytes":
        return type(value) is bytes and spec.lo <= len(value) <= spec.hi
    if kind == "str":
        return type(value) is str and spec.lo <= len(value) <= spec.hi
    if kind == "int":
        return type(value) is int and spec.lo <= value <= spec.hi
    if kind == "bool":
        return type(value) is bool
    if kind == "dev":
        return is_device_id(value)
    if kind == "devs":
        return (
            type(value) is list
            and len(value) <= spec.hi
            and all(is_device_id(v) for v in value)
            and len(set(value)) == len(value)
        )
    if kind == "ids":
        return (
            type(value) is list
            and len(value) <= spec.hi
            and all(type(v) is bytes and len(v) == MAIL_ID_BYTES for v in value)
        )
    raise AssertionError(kind)  # pragma: no cover


def is_device_id(value: object) -> bool:
    """True for a syntactically valid device id (not a claim that the device exists)."""
    return type(value) is str and DEVICE_ID.fullmatch(value) is not None


# ---- rate limiting ------------------------------------------------------------------


class TokenBucket:
    """A token bucket: ``burst`` tokens at most, refilled at ``rate`` per second.

    The relay takes one token per message (and one per byte in a second bucket) and
    disconnects a client whose bucket runs dry. A client runs the same arithmetic with
    a margin (:meth:`wait`) to pace itself, so honest traffic is slowed, never cut off.
    Time comes from the caller (sans-I/O).
    """

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("a token bucket needs a positive rate and burst")
        self.rate = float(rate)
        self.burst = float(burst)
        self.tokens = float(burst)
        self._last = now

    def _refill(self, now: float) -> None:
        if now > self._last:
            self.tokens = min(self.burst, self.tokens + (now - self._last) * self.rate)
            self._last = now

    def take(self, cost: float, now: float) -> bool:
        """Spend ``cost`` tokens; False (and nothing spent) if there are not enough."""
        self._refill(now)
        if cost > self.tokens:
            return False
        self.tokens -= cost
        return True

    def wait(self, cost: float, now: float) -> float:
        """Seconds until ``cost`` tokens are there (0 if now). A cost above ``burst``
        waits for a full bucket, then overdraws it: one oversized item is let through."""
        self._refill(now)
        needed = min(cost, self.burst) - self.tokens
        return max(0.0, needed / self.rate)

    def spend(self, cost: float, now: float) -> None:
        """Spend ``cost`` tokens unconditionally (after :meth:`wait`); may go negative."""
        self._refill(now)
        self.tokens -= cost
