"""Pairing codes: what a new device shows so its primary can find and trust it.

A code carries the new device's public keys, a one-time secret, an expiry, its name and
where it listens. Text form: ``P2P1:`` + base32 (uppercase, no padding: QR codes store
that in their dense alphanumeric mode) of ``msgpack payload || BLAKE2b-32 checksum``. A
mistyped or altered code fails the checksum before anything else is tried.

The *check code* (six digits both screens show) is derived from the link handshake's
transcript and the secret: a code swapped by an attacker (QR phishing) gives the primary
a different transcript than the device in the owner's hand, so the digits differ.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass, field
from typing import Final

from p2p.errors import P2PError
from p2p.proto.identity import MAX_NAME, short_id
from p2p.proto.wire import pack, unpack

PREFIX: Final = "P2P1:"
CODE_VERSION: Final = 1
SECRET_SIZE: Final = 16
MAX_CODE: Final = 2048
MAX_ADDRESSES: Final = 8
DEFAULT_TTL_S: Final = 600
MAX_TTL_S: Final = 600
"""The longest a primary accepts a code for, whatever expiry the code states: a code is
meant to be shown now, by a device in the owner's hand (a code that stays valid for days
is what a phishing page hands out)."""
CLOCK_SLACK_S: Final = 120
"""How far the new device's clock may run ahead of the primary's."""


class PairingError(P2PError):
    """A pairing code or link attempt that is refused."""


class MalformedCode(PairingError):
    """Not a pairing code: bad prefix, encoding, checksum or fields (typo or tampering)."""


class ExpiredCode(PairingError):
    """A pairing code past its expiry."""


class CodeAlreadyUsed(PairingError):
    """A pairing code this primary has already linked a device with."""


class CodeTooLong(PairingError):
    """A pairing code that states an expiry further ahead than a primary accepts."""


class UnsafeAddress(PairingError):
    """A pairing code naming only addresses a primary does not dial on a code's word."""


class CheckCodeMismatch(PairingError):
    """The six digits differ between the two screens: someone is in the middle."""


@dataclass(frozen=True, kw_only=True)
class PairingCode:
    sign_pk: bytes
    box_pk: bytes
    secret: bytes = field(repr=False)
    expires_s: int
    """Unix time (seconds) after which the code is refused."""
    name: str
    addresses: tuple[str, ...]

    @property
    def device_id(self) -> str:
        return short_id(self.sign_pk)

    @property
    def code_id(self) -> str:
        """A name for this code that does not reveal its secret (for 'used' records)."""
        return hashlib.blake2b(self.secret, digest_size=10, person=b"p2p-code-id").hexdigest()

    @classmethod
    def create(
        cls,
        *,
        sign_pk: bytes,
        box_pk: bytes,
        name: str,
        addresses: list[str],
        now_s: int,
        ttl_s: int,
    ) -> PairingCode:
        return cls(
            sign_pk=sign_pk,
            box_pk=box_pk,
            secret=os.urandom(SECRET_SIZE),
            expires_s=now_s + ttl_s,
            name=name,
            addresses=tuple(addresses[:MAX_ADDRESSES]),
        )

    def encode(self) -> str:
        payload = pack(
            [
                CODE_VERSION,
                self.sign_pk,
                self.box_pk,
                self.secret,
                self.expires_s,
                self.name,
                list(self.addresses),
            ]
        )
        return to_text(PREFIX, payload)

    @classmethod
    def decode(cls, text: str) -> PairingCode:
        """Parse a code; MalformedCode for anything that is not exactly one."""
        payload = from_text(PREFIX, text, MAX_CODE, MalformedCode, "pairing code")
        try:
            value = unpack(payload, what="pairing code")
            version, sign_pk, box_pk, secret, expires_s, name, addresses = value
        except (P2PError, ValueError, TypeError) as exc:
            raise MalformedCode("the pairing code's fields are malformed") from exc
        ok = (
            version == CODE_VERSION
            and isinstance(sign_pk, bytes)
            and len(sign_pk) == 32
            and isinstance(box_pk, bytes)
            and len(box_pk) == 32
            and isinstance(secret, bytes)
            and len(secret) == SECRET_SIZE
            and type(expires_s) is int
            and isinstance(name, str)
            and 0 < len(name) <= MAX_NAME
            and isinstance(addresses, list)
            and len(addresses) <= MAX_ADDRESSES
            and all(isinstance(a, str) and 0 < len(a) <= 256 for a in addresses)
        )
        if not ok:
            raise MalformedCode("the pairing code's fields are malformed")
        return cls(
            sign_pk=sign_pk,
            box_pk=box_pk,
            secret=secret,
            expires_s=expires_s,
            name=name,
            addresses=tuple(addresses),
        )

    def check_fresh(self, now_s: int) -> None:
        """ExpiredCode past its expiry; CodeTooLong for an expiry further ahead than
        MAX_TTL_S (plus clock slack): the primary caps every code's life."""
        if now_s > self.expires_s:
            raise ExpiredCode(f"the pairing code expired {now_s - self.expires_s} s ago")
        if self.expires_s > now_s + MAX_TTL_S + CLOCK_SLACK_S:
            raise CodeTooLong(
                f"the pairing code says it stays valid for {self.expires_s - now_s} s; "
                f"a primary accepts at most {MAX_TTL_S} s: show a new code (p2p link)"
            )

    def local_addresses(self) -> list[str]:
        """The code's addresses a primary dials on the code's word: IP literals on
        loopback, private or link-local networks (a code is shown by a device next to
        the owner). Anything else (a public host, a name to resolve) would let whoever
        made the code point the primary at any host; ``--connect`` overrides."""
        import ipaddress

        out = []
        for address in self.addresses:
            host, _, port = address.rpartition(":")  # HOST:PORT or [v6]:PORT
            try:
                ip = ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
            except ValueError:
                continue
            if not port.isdigit():
                continue
            if ip.is_loopback or ip.is_private or ip.is_link_local:
                out.append(address)
        return out


def to_text(prefix: str, payload: bytes) -> str:
    """A code's text form: ``prefix`` + base32 of ``payload || checksum``."""
    checksum = hashlib.blake2b(payload, digest_size=4, person=b"p2p-code").digest()
    return prefix + base64.b32encode(payload + checksum).decode("ascii").rstrip("=")


def from_text(prefix: str, text: str, max_size: int, error: type[P2PError], what: str) -> bytes:
    """The payload of a code's text form (whitespace and case forgiven); ``error`` for
    a wrong prefix, bad base32 or a checksum that fails (a typo or tampering)."""
    text = "".join(text.split()).upper()
    if len(text) > max_size or not text.startswith(prefix):
        raise error(f"not a p2p {what}")
    body = text[len(prefix) :]
    try:
        raw = base64.b32decode(body + "=" * (-len(body) % 8))
    except ValueError as exc:
        raise error(f"the {what} is not valid base32") from exc
    payload, checksum = raw[:-4], raw[-4:]
    if hashlib.blake2b(payload, digest_size=4, person=b"p2p-code").digest() != checksum:
        raise error(f"the {what}'s checksum does not match (typo or tampering)")
    return payload


def check_code(transcript: bytes, secret: bytes) -> str:
    """Six digits, shown as ``123-456`` on both screens."""
    digest = hashlib.blake2b(transcript, key=secret, digest_size=8, person=b"p2p-check").digest()
    digits = f"{int.from_bytes(digest, 'big') % 1_000_000:06d}"
    return f"{digits[:3]}-{digits[3:]}"


def same_check_code(shown: str, typed: str) -> bool:
    """Whether a check code typed by a person matches (spaces and dashes ignored)."""
    digits = "".join(c for c in typed if c.isdigit())
    return digits == shown.replace("-", "")


def qr_text(code: str) -> str:
    """The code as a QR code drawn with terminal characters."""
    import io

    import segno

    out = io.StringIO()
    segno.make(code, error="m").terminal(out=out, compact=True)
    return out.getvalue()
