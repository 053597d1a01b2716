"""The wire layer: every frame type round-trips; every kind of bad input has its own error.

Frames are built both through :func:`p2p.proto.wire.encode_frame` (what we send) and by packing
raw msgpack by hand (what a hostile or buggy peer could send), so the decoder is checked
on inputs our own encoder would never produce.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2p.errors import FrameTooLarge, MalformedFrame, P2PError, UnsupportedVersion, WireError
from p2p.proto import wire
from p2p.proto.wire import MAX_FRAME, PROTOCOL_VERSION, SCHEMA, decode_frame, encode_frame

FRAME_TYPES = sorted(SCHEMA)

FAST = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def raw(frame: object) -> bytes:
    """Pack anything as msgpack, bypassing the encoder's own checks."""
    data: bytes = msgpack.packb(frame, use_bin_type=True)
    return data


def sample(kind: str) -> dict[str, Any]:
    """A small valid value for every field of a frame type."""
    out: dict[str, Any] = {}
    for name, spec in SCHEMA[kind].items():
        if spec.kind is bytes:
            out[name] = bytes(range(min(spec.bound, 32)))
        elif spec.kind is str:
            out[name] = "x" * min(spec.bound, 16)
        else:
            out[name] = 7
    return out


def valid_raw(kind: str, **override: Any) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "t": kind, **sample(kind), **override}


def field_value(spec: wire.Field) -> st.SearchStrategy[Any]:
    if spec.kind is bytes:
        return st.binary(max_size=min(spec.bound, 300))
    if spec.kind is str:
        return st.text(max_size=min(spec.bound, 300)).filter(lambda s: len(s) <= spec.bound)
    return st.integers(min_value=0, max_value=spec.bound)


@st.composite
def frames(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    kind = draw(st.sampled_from(FRAME_TYPES))
    fields = {name: draw(field_value(spec)) for name, spec in SCHEMA[kind].items()}
    return kind, fields


# ---- the error tree ---------------------------------------------------------------


def test_wire_errors_are_wire_errors() -> None:
    for cls in (FrameTooLarge, MalformedFrame, UnsupportedVersion):
        assert issubclass(cls, WireError)
        assert issubclass(cls, P2PError)


# ---- round trips ------------------------------------------------------------------


@pytest.mark.parametrize("kind", FRAME_TYPES)
def test_round_trip_every_frame_type(kind: str) -> None:
    fields = sample(kind)
    data = encode_frame(kind, **fields)
    assert decode_frame(data) == {"v": PROTOCOL_VERSION, "t": kind, **fields}


@pytest.mark.parametrize("kind", FRAME_TYPES)
def test_round_trip_at_the_bounds(kind: str) -> None:
    """Every field at exactly its bound is accepted (the largest env excepted below)."""
    fields: dict[str, Any] = {}
    for name, spec in SCHEMA[kind].items():
        if spec.kind is bytes:
            fields[name] = b"\xff" * min(spec.bound, 1024 * 1024)
        elif spec.kind is str:
            fields[name] = "é" * spec.bound  # bound counts characters, not bytes
        else:
            fields[name] = spec.bound
    assert decode_frame(encode_frame(kind, **fields))["t"] == kind


@pytest.mark.parametrize("kind", FRAME_TYPES)
def test_round_trip_empty_and_zero(kind: str) -> None:
    fields = {
        name: (b"" if spec.kind is bytes else "" if spec.kind is str else 0)
        for name, spec in SCHEMA[kind].items()
    }
    assert decode_frame(encode_frame(kind, **fields)) == {
        "v": PROTOCOL_VERSION,
        "t": kind,
        **fields,
    }


def test_largest_envelope_frame_round_trips() -> None:
    bound = SCHEMA["env"]["e"].bound
    data = encode_frame("env", e=bytes(bound))
    assert len(data) <= MAX_FRAME
    assert decode_frame(data)["e"] == bytes(bound)


@FAST
@given(frames())
def test_round_trip_property(case: tuple[str, dict[str, Any]]) -> None:
    kind, fields = case
    assert decode_frame(encode_frame(kind, **fields)) == {
        "v": PROTOCOL_VERSION,
        "t": kind,
        **fields,
    }


# ---- too large --------------------------------------------------------------------


def test_oversized_data_is_frame_too_large() -> None:
    with pytest.raises(FrameTooLarge) as info:
        decode_frame(bytes(MAX_FRAME + 1))
    assert info.value.size == MAX_FRAME + 1
    assert info.value.limit == MAX_FRAME


def test_oversized_valid_msgpack_is_frame_too_large() -> None:
    data = raw(valid_raw("env", e=bytes(MAX_FRAME)))
    with pytest.raises(FrameTooLarge):
        decode_frame(data)


def test_encoder_refuses_what_the_decoder_would() -> None:
    with pytest.raises(FrameTooLarge):
        encode_frame("env", e=bytes(MAX_FRAME))
    with pytest.raises(MalformedFrame):
        encode_frame("nope")
    with pytest.raises(MalformedFrame):
        encode_frame("ping", n=-1)


# ---- malformed --------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\xc1", id="reserved-byte"),
        pytest.param(b"\x82\xa1v", id="truncated-map"),
        pytest.param(b"\xdb\xff\xff\xff\xff", id="huge-str-length"),
        pytest.param(b"\xc6\xff\xff\xff\xff", id="huge-bin-length"),
        pytest.param(b"\xdf\xff\xff\xff\xff", id="huge-map-length"),
        pytest.param(b"\x91" * 5000 + b"\xc0", id="deep-nesting"),
        pytest.param(b"\x81\x01\x02", id="int-map-key"),
        pytest.param(b"\xd7\xff" + b"\x00" * 8 + b"garbage", id="ext-then-garbage"),
    ],
)
def test_not_msgpack_is_malformed(data: bytes) -> None:
    with pytest.raises(MalformedFrame):
        decode_frame(data)


def test_trailing_bytes_are_malformed() -> None:
    data = encode_frame("ping", n=1)
    with pytest.raises(MalformedFrame, match="trailing"):
        decode_frame(data + b"\x00")
    with pytest.raises(MalformedFrame, match="trailing"):
        decode_frame(data + data)


@pytest.mark.parametrize(
    "value",
    [[1, "ping", 3], "ping", 1, None, b"\x01", 1.5, True],
    ids=["array", "str", "int", "nil", "bin", "float", "bool"],
)
def test_not_a_map_is_malformed(value: object) -> None:
    with pytest.raises(MalformedFrame, match="map"):
        decode_frame(raw(value))


@pytest.mark.parametrize("kind", ["nope", "", "HELLO", "hello ", "x" * 1000])
def test_unknown_type_is_malformed(kind: str) -> None:
    with pytest.raises(MalformedFrame, match="unknown frame type"):
        decode_frame(raw({"v": PROTOCOL_VERSION, "t": kind}))


@pytest.mark.parametrize("kind", [None, 1, b"ping", ["ping"]], ids=["nil", "int", "bin", "list"])
def test_type_of_wrong_kind_is_malformed(kind: object) -> None:
    with pytest.raises(MalformedFrame):
        decode_frame(raw({"v": PROTOCOL_VERSION, "t": kind, "n": 1}))


def test_missing_type_is_malformed() -> None:
    with pytest.raises(MalformedFrame):
        decode_frame(raw({"v": PROTOCOL_VERSION, "n": 1}))


@pytest.mark.parametrize(
    ("kind", "name"), [(k, n) for k in FRAME_TYPES for n in SCHEMA[k]], ids=str
)
def test_missing_field_is_malformed(kind: str, name: str) -> None:
    frame = valid_raw(kind)
    del frame[name]
    with pytest.raises(MalformedFrame, match="missing"):
        decode_frame(raw(frame))


@pytest.mark.parametrize(
    ("kind", "name"), [(k, n) for k in FRAME_TYPES for n in SCHEMA[k]], ids=str
)
def test_missing_field_replaced_by_extra_field_is_malformed(kind: str, name: str) -> None:
    """Same number of keys as a valid frame, but one of them is not in the schema."""
    frame = valid_raw(kind)
    frame["zz"] = frame.pop(name)
    with pytest.raises(MalformedFrame, match="missing"):
        decode_frame(raw(frame))


@pytest.mark.parametrize("kind", FRAME_TYPES)
def test_extra_field_is_malformed(kind: str) -> None:
    with pytest.raises(MalformedFrame, match="unexpected"):
        decode_frame(raw(valid_raw(kind, extra=1)))


def test_bytes_keys_are_not_field_names() -> None:
    with pytest.raises(MalformedFrame):
        decode_frame(raw({b"v": PROTOCOL_VERSION, b"t": "ping", b"n": 1}))
    with pytest.raises(MalformedFrame):
        decode_frame(raw({"v": PROTOCOL_VERSION, "t": "ping", b"n": 1}))


def _wrong_values(spec: wire.Field) -> list[object]:
    common: list[object] = [None, 1.0, [1], {"a": 1}]
    if spec.kind is bytes:
        return [*common, "text", 1, True]
    if spec.kind is str:
        return [*common, b"bytes", 1, True]
    return [*common, "1", b"\x01", True, False]


@pytest.mark.parametrize(
    ("kind", "name", "value"),
    [(k, n, v) for k in FRAME_TYPES for n, spec in SCHEMA[k].items() for v in _wrong_values(spec)],
    ids=str,
)
def test_wrong_field_type_is_malformed(kind: str, name: str, value: object) -> None:
    with pytest.raises(MalformedFrame, match="expected"):
        decode_frame(raw(valid_raw(kind, **{name: value})))


@pytest.mark.parametrize(
    ("kind", "name"),
    [
        (k, n)
        for k in FRAME_TYPES
        for n, spec in SCHEMA[k].items()
        if spec.kind is not int and spec.bound < 2 * 1024 * 1024
    ],
    ids=str,
)
def test_over_long_field_is_malformed(kind: str, name: str) -> None:
    spec = SCHEMA[kind][name]
    value: object = b"\x00" * (spec.bound + 1) if spec.kind is bytes else "a" * (spec.bound + 1)
    with pytest.raises(MalformedFrame, match="longer than"):
        decode_frame(raw(valid_raw(kind, **{name: value})))


def test_over_long_envelope_is_malformed() -> None:
    bound = SCHEMA["env"]["e"].bound
    data = raw(valid_raw("env", e=bytes(bound + 1)))
    assert len(data) <= MAX_FRAME  # so it is the field bound, not the frame size, refusing
    with pytest.raises(MalformedFrame, match="longer than"):
        decode_frame(data)


@pytest.mark.parametrize("kind", ["ping", "pong"])
@pytest.mark.parametrize("n", [-1, -(2**63), 2**63, 2**64 - 1])
def test_int_out_of_range_is_malformed(kind: str, n: int) -> None:
    with pytest.raises(MalformedFrame, match="out of range"):
        decode_frame(raw(valid_raw(kind, n=n)))


# ---- versions ---------------------------------------------------------------------


@pytest.mark.parametrize("version", [2, 0, 3, 255, 2**32])
def test_other_version_is_unsupported(version: int) -> None:
    with pytest.raises(UnsupportedVersion) as info:
        decode_frame(raw(valid_raw("ping", v=version)))
    assert info.value.version == version


def test_downgrade_to_version_zero_is_unsupported() -> None:
    for kind in FRAME_TYPES:
        with pytest.raises(UnsupportedVersion):
            decode_frame(raw(valid_raw(kind, v=0)))


def test_version_is_checked_before_type() -> None:
    """A future version may have frame types we do not know: say "version", not "type"."""
    with pytest.raises(UnsupportedVersion):
        decode_frame(raw({"v": 2, "t": "frame-of-the-future", "x": 1}))


@pytest.mark.parametrize(
    "version",
    [None, "1", b"\x01", 1.0, True, [1]],
    ids=["nil", "str", "bin", "float", "bool", "list"],
)
def test_version_of_wrong_type_is_malformed(version: object) -> None:
    with pytest.raises(MalformedFrame, match="version"):
        decode_frame(raw(valid_raw("ping", v=version)))


def test_missing_version_is_malformed() -> None:
    frame = valid_raw("ping")
    del frame["v"]
    with pytest.raises(MalformedFrame, match="version"):
        decode_frame(raw(frame))


# ---- pack / unpack helpers --------------------------------------------------------


def test_unpack_refuses_junk_with_wire_errors() -> None:
    assert wire.unpack(wire.pack([1, b"x", "y"]), what="t") == [1, b"x", "y"]
    with pytest.raises(FrameTooLarge):
        wire.unpack(b"\x00" * 11, what="t", max_size=10)
    with pytest.raises(MalformedFrame, match="trailing"):
        wire.unpack(b"\x01\x02", what="t")
    with pytest.raises(MalformedFrame, match="not msgpack"):
        wire.unpack(b"\xc1", what="t")
    with pytest.raises(MalformedFrame, match="not msgpack"):
        wire.unpack(b"", what="t")
