"""Sealed envelopes: how a CRDT update leaves a device, readable only by its space.

Layout (msgpack array)::

    [version, space, epoch, sender, counter, nonce(24), ciphertext, signature(64)]

- ``ciphertext`` = XChaCha20-Poly1305(epoch key of ``space``, nonce, payload), with the
  header ``[version, space, epoch, sender, counter]`` as associated data: a ciphertext
  cannot be moved under another header.
- ``signature`` = Ed25519 of the sending device over ``DOMAIN || header || nonce ||
  ciphertext``: members share the space key, so the signature is what says *which*
  device wrote it, whoever relayed it.
- ``counter`` grows per sending device; a receiver keeps a :class:`ReplayWindow` per
  sender and refuses a counter it has seen (or one too old to judge).

Pure functions; the caller supplies key lookups and owns the replay state.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import nacl.bindings as sodium
from nacl.exceptions import CryptoError as NaclCryptoError

from p2p.errors import (
    DecryptionFailed,
    MalformedFrame,
    P2PError,
    ReplayDetected,
    UnsupportedVersion,
)
from p2p.proto.identity import DeviceKeys, verify
from p2p.proto.wire import MAX_FRAME, MAX_ID, pack, unpack

ENVELOPE_VERSION: Final = 1
DOMAIN_ENVELOPE: Final = b"p2p/envelope/v1\x00"
NONCE_SIZE: Final = 24
KEY_SIZE: Final = 32
MAX_PAYLOAD: Final = MAX_FRAME - 4096
REPLAY_WINDOW: Final = 4096
"""Counters this far below a sender's highest are refused as too old to judge."""


@dataclass(frozen=True, kw_only=True)
class Opened:
    """An envelope whose signature and ciphertext checked out."""

    space: str
    epoch: int
    sender: str
    counter: int
    payload: bytes


def new_space_key() -> bytes:
    """A fresh random epoch key."""
    return os.urandom(KEY_SIZE)


def _header(space: str, epoch: int, sender: str, counter: int) -> bytes:
    return pack([ENVELOPE_VERSION, space, epoch, sender, counter])


def seal(
    device: DeviceKeys, *, space: str, epoch: int, key: bytes, counter: int, payload: bytes
) -> bytes:
    """Encrypt ``payload`` for the members of ``space`` and sign it as ``device``."""
    if len(payload) > MAX_PAYLOAD:
        raise MalformedFrame(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    header = _header(space, epoch, device.device_id, counter)
    nonce = os.urandom(NONCE_SIZE)
    ciphertext = sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(
        payload, DOMAIN_ENVELOPE + header, nonce, key
    )
    signature = device.sign(DOMAIN_ENVELOPE, header + nonce + ciphertext)
    return pack(
        [ENVELOPE_VERSION, space, epoch, device.device_id, counter, nonce, ciphertext, signature]
    )


@dataclass(frozen=True, kw_only=True)
class Parsed:
    """The fields of an envelope, well-formed but not yet verified."""

    space: str
    epoch: int
    sender: str
    counter: int
    nonce: bytes
    ciphertext: bytes
    signature: bytes


def parse(data: bytes) -> Parsed:
    """Check an envelope's shape; MalformedFrame (or UnsupportedVersion) if wrong."""
    value = unpack(data, what="envelope", max_items=9, max_depth=1)
    if not (isinstance(value, list) and len(value) == 8):
        raise MalformedFrame("envelope is not an 8-item array")
    version, space, epoch, sender, counter, nonce, ciphertext, signature = value
    if version != ENVELOPE_VERSION or type(version) is not int:
        raise UnsupportedVersion(version)
    if not (isinstance(space, str) and 0 < len(space) <= MAX_ID):
        raise MalformedFrame("envelope space is malformed")
    if not (isinstance(sender, str) and 0 < len(sender) <= MAX_ID):
        raise MalformedFrame("envelope sender is malformed")
    if not (type(epoch) is int and 0 <= epoch < 2**32):
        raise MalformedFrame("envelope epoch is malformed")
    if not (type(counter) is int and 0 < counter < 2**63):
        raise MalformedFrame("envelope counter is malformed")
    if not (isinstance(nonce, bytes) and len(nonce) == NONCE_SIZE):
        raise MalformedFrame("envelope nonce is malformed")
    if not (isinstance(ciphertext, bytes) and 16 <= len(ciphertext) <= MAX_PAYLOAD + 16):
        raise MalformedFrame("envelope ciphertext is malformed")
    if not (isinstance(signature, bytes) and len(signature) == 64):
        raise MalformedFrame("envelope signature is malformed")
    return Parsed(
        space=space,
        epoch=epoch,
        sender=sender,
        counter=counter,
        nonce=nonce,
        ciphertext=ciphertext,
        signature=signature,
    )


def envelope_space(data: bytes) -> str | None:
    """The space an envelope names (None if it is malformed: opening it says why)."""
    try:
        return parse(data).space
    except P2PError:
        return None


def open_envelope(
    data: bytes,
    *,
    signing_key_of: Callable[[str], bytes],
    space_key: Callable[[str, int], bytes],
) -> Opened:
    """Verify and decrypt an envelope.

    ``signing_key_of(sender)`` returns the sender's current signing key or raises
    UnknownDevice / RemovedDevice; ``space_key(space, epoch)`` returns the key or raises
    UnknownKey. Replay is the caller's check (see :class:`ReplayWindow`), done before the
    payload is applied and recorded with it.
    """
    return open_parsed(parse(data), signing_key_of=signing_key_of, space_key=space_key)


def open_parsed(
    env: Parsed,
    *,
    signing_key_of: Callable[[str], bytes],
    space_key: Callable[[str, int], bytes],
) -> Opened:
    """:func:`open_envelope` for an envelope already through :func:`parse`."""
    sign_pk = signing_key_of(env.sender)
    header = _header(env.space, env.epoch, env.sender, env.counter)
    verify(sign_pk, DOMAIN_ENVELOPE, header + env.nonce + env.ciphertext, env.signature)
    key = space_key(env.space, env.epoch)
    try:
        payload = sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(
            env.ciphertext, DOMAIN_ENVELOPE + header, env.nonce, key
        )
    except NaclCryptoError as exc:
        raise DecryptionFailed(f"envelope from {env.sender} does not decrypt") from exc
    return Opened(
        space=env.space, epoch=env.epoch, sender=env.sender, counter=env.counter, payload=payload
    )


class ReplayWindow:
    """Which counters of one sender were accepted: the highest, plus a bitmap below it.

    The same sliding window as IPsec and DTLS use: envelopes may arrive out of order by
    up to :data:`REPLAY_WINDOW` counters (gossip over several paths); anything older is
    refused. State is two integers, stored as a record beside the applied update.
    """

    __slots__ = ("bitmap", "high")

    def __init__(self, high: int = 0, bitmap: int = 0) -> None:
        self.high = high
        self.bitmap = bitmap  # bit i set = counter (high - i) accepted

    def check(self, sender: str, counter: int) -> None:
        """Raise ReplayDetected if ``counter`` was accepted or is too old."""
        if counter > self.high:
            return
        offset = self.high - counter
        if offset >= REPLAY_WINDOW or self.bitmap >> offset & 1:
            raise ReplayDetected(sender, counter)

    def accept(self, counter: int) -> None:
        """Record ``counter`` as accepted (after :meth:`check` passed)."""
        if counter > self.high:
            shift = min(counter - self.high, REPLAY_WINDOW)  # a long jump clears all
            self.bitmap = ((self.bitmap << shift) | 1) & ((1 << REPLAY_WINDOW) - 1)
            self.high = counter
        else:
            self.bitmap |= 1 << (self.high - counter)

    def to_record(self) -> bytes:
        return pack([self.high, self.bitmap.to_bytes(REPLAY_WINDOW // 8, "little")])

    @classmethod
    def from_record(cls, data: bytes) -> ReplayWindow:
        value = unpack(data, what="replay window", max_items=3, max_depth=1)
        if not (
            isinstance(value, list)
            and len(value) == 2
            and type(value[0]) is int
            and isinstance(value[1], bytes)
            and len(value[1]) == REPLAY_WINDOW // 8
        ):
            raise MalformedFrame("replay window record is malformed")
        return cls(value[0], int.from_bytes(value[1], "little"))
