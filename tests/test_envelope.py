"""Sealed envelopes: round trip, tamper-evidence at every bit, keys, senders, replay."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from p2p.errors import (
    BadSignature,
    DecryptionFailed,
    MalformedFrame,
    P2PError,
    RemovedDevice,
    ReplayDetected,
    UnknownDevice,
    UnknownKey,
    UnsupportedVersion,
    WireError,
)
from p2p.proto import envelope
from p2p.proto.envelope import (
    ENVELOPE_VERSION,
    REPLAY_WINDOW,
    Opened,
    ReplayWindow,
    new_space_key,
    open_envelope,
    parse,
    seal,
)
from p2p.proto.identity import AccountKey, DeviceEntry, DeviceKeys, DeviceList
from p2p.proto.wire import pack, unpack

SPACE = "space-1"


class Fixture:
    """An account with a primary and a companion, one space with two epoch keys."""

    def __init__(self) -> None:
        self.account = AccountKey.generate()
        self.phone = DeviceKeys.generate()
        self.laptop = DeviceKeys.generate()
        dl = DeviceList.create(self.account, self.phone, "phone")
        self.device_list = dl.with_device(
            self.account,
            DeviceEntry.of(self.laptop, self.account.public_key, "laptop", "companion"),
        )
        self.keys = {0: new_space_key(), 1: new_space_key()}

    def signing_key_of(self, device_id: str) -> bytes:
        return self.device_list.entry(device_id).sign_pk

    def space_key(self, space: str, epoch: int) -> bytes:
        if space != SPACE or epoch not in self.keys:
            raise UnknownKey(space, epoch)
        return self.keys[epoch]

    def seal(
        self,
        payload: bytes = b"hello",
        *,
        counter: int = 1,
        epoch: int = 0,
        key: bytes | None = None,
    ) -> bytes:
        return seal(
            self.phone,
            space=SPACE,
            epoch=epoch,
            key=self.keys[epoch] if key is None else key,
            counter=counter,
            payload=payload,
        )

    def open(self, data: bytes) -> Opened:
        return open_envelope(data, signing_key_of=self.signing_key_of, space_key=self.space_key)


@pytest.fixture
def fx() -> Fixture:
    return Fixture()


# ---- round trip -------------------------------------------------------------------


@pytest.mark.parametrize("payload", [b"", b"x", bytes(range(256)) * 40])
def test_seal_open_round_trip(fx: Fixture, payload: bytes) -> None:
    data = fx.seal(payload, counter=42, epoch=1)
    opened = fx.open(data)
    assert opened == Opened(
        space=SPACE, epoch=1, sender=fx.phone.device_id, counter=42, payload=payload
    )
    assert payload not in data or len(payload) < 2  # the payload travels encrypted


def test_parse_fields(fx: Fixture) -> None:
    data = fx.seal(b"abc", counter=7)
    p = parse(data)
    assert (p.space, p.epoch, p.sender, p.counter) == (SPACE, 0, fx.phone.device_id, 7)
    assert len(p.nonce) == envelope.NONCE_SIZE
    assert len(p.signature) == 64
    assert len(p.ciphertext) == 3 + 16


def test_two_seals_of_one_payload_differ(fx: Fixture) -> None:
    assert fx.seal(b"same") != fx.seal(b"same")


def test_payload_too_large_refused(fx: Fixture) -> None:
    with pytest.raises(MalformedFrame):
        fx.seal(bytes(envelope.MAX_PAYLOAD + 1))


# ---- tampering --------------------------------------------------------------------


def test_every_bit_flip_is_refused(fx: Fixture) -> None:
    """Flip each bit of a small envelope: every result is refused with a P2PError, and
    none opens to anything but the original."""
    original = fx.seal(b"pay", counter=5)
    expected = fx.open(original)
    seen: dict[str, int] = {}
    for pos in range(len(original)):
        for bit in range(8):
            b = bytearray(original)
            b[pos] ^= 1 << bit
            try:
                opened = fx.open(bytes(b))
            except P2PError as exc:
                seen[type(exc).__name__] = seen.get(type(exc).__name__, 0) + 1
                continue
            assert opened == expected, f"bit {bit} of byte {pos} opened to {opened}"
    assert sum(seen.values()) == 8 * len(original)
    assert {"BadSignature", "MalformedFrame"} <= set(seen)


def test_every_truncation_and_extension_is_refused(fx: Fixture) -> None:
    original = fx.seal(b"pay")
    for cut in range(len(original)):
        with pytest.raises(WireError):
            fx.open(original[:cut])
    with pytest.raises(MalformedFrame):
        fx.open(original + b"\x00")


def _resealed(fx: Fixture, data: bytes, edit: Callable[[list[object]], None]) -> bytes:
    fields = unpack(data, what="test")
    edit(fields)
    return pack(fields)


def test_header_cannot_be_moved(fx: Fixture) -> None:
    """Editing any header field (keeping the shape valid) breaks the signature."""
    data = fx.seal(b"pay", counter=5)
    edits: list[Callable[[list[object]], None]] = [
        lambda f: f.__setitem__(1, "space-2"),
        lambda f: f.__setitem__(2, 1),
        lambda f: f.__setitem__(4, 6),
        lambda f: f.__setitem__(5, bytes(24)),
    ]
    for edit in edits:
        with pytest.raises(BadSignature):
            fx.open(_resealed(fx, data, edit))


def test_sender_swapped_to_other_member(fx: Fixture) -> None:
    """Claiming another (real) member wrote it: its key does not verify the signature."""
    data = fx.seal(b"pay")
    with pytest.raises(BadSignature):
        fx.open(_resealed(fx, data, lambda f: f.__setitem__(3, fx.laptop.device_id)))


@pytest.mark.parametrize("version", [0, 2, True, "1", None])
def test_other_envelope_version(fx: Fixture, version: object) -> None:
    data = _resealed(fx, fx.seal(), lambda f: f.__setitem__(0, version))
    with pytest.raises(UnsupportedVersion):
        parse(data)
    assert ENVELOPE_VERSION == 1


@pytest.mark.parametrize(
    ("index", "value"),
    [
        (1, ""),
        (1, "s" * 65),
        (1, b"space"),
        (2, -1),
        (2, 2**32),
        (2, "0"),
        (3, ""),
        (3, 7),
        (4, 0),
        (4, -1),
        (4, 2**63),
        (4, True),
        (5, bytes(23)),
        (5, "n" * 24),
        (6, bytes(15)),
        (7, bytes(63)),
        (7, None),
    ],
)
def test_malformed_fields(fx: Fixture, index: int, value: object) -> None:
    data = _resealed(fx, fx.seal(), lambda f: f.__setitem__(index, value))
    with pytest.raises(MalformedFrame):
        parse(data)


@pytest.mark.parametrize("value", [[], [1] * 7, [1] * 9, {"a": 1}, 1, b"x"])
def test_not_an_envelope(value: object) -> None:
    with pytest.raises(MalformedFrame):
        parse(pack(value))


# ---- keys and senders -------------------------------------------------------------


def test_valid_signature_wrong_key_is_decryption_failed(fx: Fixture) -> None:
    """Sealed under key A, opened with key B: the signature is fine, the box is not."""
    data = fx.seal(b"secret", key=new_space_key())
    parse(data)
    with pytest.raises(DecryptionFailed):
        fx.open(data)


def test_unknown_epoch_is_unknown_key(fx: Fixture) -> None:
    data = seal(fx.phone, space=SPACE, epoch=9, key=new_space_key(), counter=1, payload=b"x")
    with pytest.raises(UnknownKey) as info:
        fx.open(data)
    assert (info.value.space, info.value.epoch) == (SPACE, 9)


def test_unknown_sender(fx: Fixture) -> None:
    stranger = DeviceKeys.generate()
    data = seal(stranger, space=SPACE, epoch=0, key=fx.keys[0], counter=1, payload=b"x")
    with pytest.raises(UnknownDevice) as info:
        fx.open(data)
    assert info.value.device == stranger.device_id
    assert not isinstance(info.value, RemovedDevice)


def test_removed_sender(fx: Fixture) -> None:
    data = seal(fx.laptop, space=SPACE, epoch=0, key=fx.keys[0], counter=1, payload=b"x")
    assert fx.open(data).payload == b"x"
    fx.device_list = fx.device_list.without_device(fx.account, fx.laptop.device_id)
    with pytest.raises(RemovedDevice):
        fx.open(data)


# ---- replay window ----------------------------------------------------------------


def test_duplicate_is_replay() -> None:
    w = ReplayWindow()
    w.check("d", 1)
    w.accept(1)
    with pytest.raises(ReplayDetected) as info:
        w.check("d", 1)
    assert (info.value.sender, info.value.counter) == ("d", 1)


def test_out_of_order_within_window_accepted() -> None:
    w = ReplayWindow()
    for c in (10, 3, 7, 1, 9, 2):
        w.check("d", c)
        w.accept(c)
    for c in (10, 3, 7, 1, 9, 2):
        with pytest.raises(ReplayDetected):
            w.check("d", c)
    for c in (4, 5, 6, 8, 11):
        w.check("d", c)


def test_oldest_in_window_and_too_old() -> None:
    w = ReplayWindow()
    high = REPLAY_WINDOW + 100
    w.accept(high)
    w.check("d", high - REPLAY_WINDOW + 1)  # the oldest counter still judged
    w.accept(high - REPLAY_WINDOW + 1)
    with pytest.raises(ReplayDetected):
        w.check("d", high - REPLAY_WINDOW)  # too old to judge: refused
    with pytest.raises(ReplayDetected):
        w.check("d", 1)


def test_window_slides() -> None:
    w = ReplayWindow()
    for c in range(1, 3 * REPLAY_WINDOW, 7):
        w.check("d", c)
        w.accept(c)
    assert w.bitmap < 1 << REPLAY_WINDOW
    with pytest.raises(ReplayDetected):
        w.check("d", w.high)
    w.check("d", w.high - 1)


def test_large_counter_jump_is_cheap() -> None:
    """A sender whose counter leaps ahead (a skipped reservation block, a buggy or
    hostile member: parse admits any counter below 2**63) must not make the window
    allocate a bitmap as wide as the jump."""
    for jump in (2**33, 2**62):
        w = ReplayWindow()
        w.accept(1)
        w.accept(jump)
        assert w.high == jump
        assert w.bitmap == 1
        with pytest.raises(ReplayDetected):
            w.check("d", 1)
        w.check("d", jump - 1)


def test_record_round_trip() -> None:
    w = ReplayWindow()
    for c in (5, 1, 4000, 4001, 100):
        w.accept(c)
    again = ReplayWindow.from_record(w.to_record())
    assert (again.high, again.bitmap) == (w.high, w.bitmap)
    for c in (5, 4000, 4001, 100):
        with pytest.raises(ReplayDetected):
            again.check("d", c)
    again.check("d", 4002)
    again.check("d", 99)
    empty = ReplayWindow.from_record(ReplayWindow().to_record())
    assert (empty.high, empty.bitmap) == (0, 0)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        pack([1]),
        pack([1, bytes(REPLAY_WINDOW // 8 - 1)]),
        pack(["1", bytes(REPLAY_WINDOW // 8)]),
        pack([True, bytes(REPLAY_WINDOW // 8)]),
        pack({"h": 1}),
    ],
)
def test_record_refuses_junk(data: bytes) -> None:
    with pytest.raises(WireError):
        ReplayWindow.from_record(data)
