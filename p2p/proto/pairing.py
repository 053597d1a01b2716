"""Pairing codes: what a new device shows so its primary can find and trust it.

A code carries the new device's id (80 bits of its signing key's hash), a one-time
secret, an expiry and where it listens, in a fixed binary layout (``encode``): short
enough that its text stays within 80 characters and its QR code within 80 columns by
22 rows of a terminal. What need not be in it comes over the link: the device's keys
and name (signed by the key whose id the code names, see ``p2p.runtime.linking``). Text form:
``P2P2:`` + base32 (uppercase, no padding: QR codes store that in their dense
alphanumeric mode) of ``payload || BLAKE2b-32 checksum``. A mistyped or altered code
fails the checksum before anything else is tried; a code of the earlier, longer format
(``P2P1:``) is refused as :class:`OutdatedCode`.

The *check code* (six digits both screens show) is derived from the link handshake's
transcript and the secret: a code swapped by an attacker (QR phishing) gives the primary
a different transcript than the device in the owner's hand, so the digits differ.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
from dataclasses import dataclass, field, replace
from typing import Final

from p2p.errors import P2PError
from p2p.proto.identity import short_id

PREFIX: Final = "P2P2:"
OLD_PREFIXES: Final = ("P2P1:",)
"""Prefixes of earlier formats: refused with a clear word (nothing of theirs is kept)."""
SECRET_SIZE: Final = 16
ID_SIZE: Final = 10
"""Bytes of a device id (``short_id``: 80 bits of BLAKE2b)."""
MAX_CODE: Final = 256
MAX_TEXT: Final = 80
"""The longest text a new code is given (one line of an 80-column terminal); addresses
beyond the first are left out rather than go past it."""
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


class OutdatedCode(MalformedCode):
    """A pairing code of an earlier format: the device must show a new one."""


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
    device_id: str
    """The new device's id: the link checks that the keys it shows hash to it."""
    secret: bytes = field(repr=False)
    expires_s: int
    """Unix time (seconds) after which the code is refused."""
    addresses: tuple[str, ...]

    @property
    def code_id(self) -> str:
        """A name for this code that does not reveal its secret (for 'used' records)."""
        return hashlib.blake2b(self.secret, digest_size=10, person=b"p2p-code-id").hexdigest()

    @classmethod
    def create(
        cls,
        *,
        sign_pk: bytes,
        addresses: list[str],
        now_s: int,
        ttl_s: int,
    ) -> PairingCode:
        """A fresh code for the device whose signing key is ``sign_pk``, naming as many
        of ``addresses`` (IP literals sharing one port) as fit in ``MAX_TEXT``."""
        code = cls(
            device_id=short_id(sign_pk),
            secret=os.urandom(SECRET_SIZE),
            expires_s=now_s + ttl_s,
            addresses=(),
        )
        return code.with_addresses(addresses, MAX_TEXT)

    def with_addresses(self, addresses: list[str], max_text: int) -> PairingCode:
        """This code naming the first of ``addresses`` and as many more as keep its
        text within ``max_text`` characters (those the layout holds: see pack_hosts)."""
        parsed = [(a, hp) for a in addresses if (hp := _host_port(a)) is not None]
        port = parsed[0][1][1] if parsed else 0
        chosen = [a for a, (_, p) in parsed if p == port][:MAX_ADDRESSES]
        while True:
            code = replace(self, addresses=tuple(chosen))
            if len(chosen) <= 1 or len(code.encode()) <= max_text:
                return code
            chosen.pop()

    def encode(self) -> str:
        """``device id (10) || secret (16) || expiry (4, seconds, big-endian) || hosts``."""
        payload = (
            device_id_bytes(self.device_id)
            + self.secret
            + self.expires_s.to_bytes(4, "big")
            + pack_hosts(self.addresses)
        )
        return to_text(PREFIX, payload)

    @classmethod
    def decode(cls, text: str) -> PairingCode:
        """Parse a code; MalformedCode for anything that is not exactly one
        (OutdatedCode for a code of an earlier format)."""
        payload = from_text(
            PREFIX, text, MAX_CODE, MalformedCode, "pairing code", OLD_PREFIXES, OutdatedCode
        )
        fixed = ID_SIZE + SECRET_SIZE + 4
        if len(payload) < fixed + 1:
            raise MalformedCode("the pairing code's fields are malformed")
        try:
            addresses = unpack_hosts(payload[fixed:])
        except ValueError as exc:
            raise MalformedCode(f"the pairing code's addresses are malformed: {exc}") from exc
        return cls(
            device_id=device_id_text(payload[:ID_SIZE]),
            secret=payload[ID_SIZE : ID_SIZE + SECRET_SIZE],
            expires_s=int.from_bytes(payload[ID_SIZE + SECRET_SIZE : fixed], "big"),
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


def device_id_bytes(device_id: str) -> bytes:
    """The 10 bytes a device id (``short_id``, 16 base32 letters) stands for."""
    return base64.b32decode(device_id.upper())


def device_id_text(raw: bytes) -> str:
    """A device id from its 10 bytes (the inverse of :func:`device_id_bytes`)."""
    return base64.b32encode(raw).decode("ascii").lower()


def _host_port(address: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int] | None:
    """(IP, port) of an ``IP:PORT`` / ``[v6]:PORT`` address; None for anything else (a
    host name, a missing port): a code holds addresses as bytes, not text."""
    host, _, port = address.rpartition(":")
    try:
        ip = ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        return None
    if not port.isdigit() or not 0 < int(port) < 65536 or ip.is_unspecified:
        return None
    return ip, int(port)


def pack_hosts(addresses: tuple[str, ...] | list[str]) -> bytes:
    """Addresses as codes hold them: one byte ``IPv4 count | IPv6 count << 4``, then
    (if any) the port all of them share (2 bytes, a listener has one), the IPv4 hosts
    (4 bytes each) and the IPv6 hosts (16 each). Addresses that are not IP literals,
    or listen on another port than the first, are left out."""
    parsed = [hp for a in addresses if (hp := _host_port(a)) is not None][:MAX_ADDRESSES]
    if not parsed:
        return b"\x00"
    port = parsed[0][1]
    v4 = [ip.packed for ip, p in parsed if p == port and ip.version == 4]
    v6 = [ip.packed for ip, p in parsed if p == port and ip.version == 6]
    return bytes([len(v4) | len(v6) << 4]) + port.to_bytes(2, "big") + b"".join(v4 + v6)


def unpack_hosts(data: bytes) -> list[str]:
    """The addresses :func:`pack_hosts` wrote, as ``HOST:PORT`` text; ValueError for
    anything else (a count that does not match the bytes, port 0, 0.0.0.0 or ::,
    trailing bytes): what decodes encodes back to the same bytes."""
    if not data:
        raise ValueError("no address count")
    n4, n6 = data[0] & 0x0F, data[0] >> 4
    if n4 + n6 == 0:
        if len(data) != 1:
            raise ValueError("bytes after an empty address list")
        return []
    if n4 + n6 > MAX_ADDRESSES or len(data) != 3 + 4 * n4 + 16 * n6:
        raise ValueError("address count and bytes differ")
    port = int.from_bytes(data[1:3], "big")
    if port == 0:
        raise ValueError("port 0")
    base = 3 + 4 * n4
    hosts: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [
        *(ipaddress.IPv4Address(data[3 + 4 * i : 7 + 4 * i]) for i in range(n4)),
        *(ipaddress.IPv6Address(data[base + 16 * i : base + 16 * i + 16]) for i in range(n6)),
    ]
    if any(ip.is_unspecified for ip in hosts):
        raise ValueError("an unspecified address (nobody can dial it)")
    return [f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}" for ip in hosts]


def to_text(prefix: str, payload: bytes) -> str:
    """A code's text form: ``prefix`` + base32 of ``payload || checksum``."""
    checksum = hashlib.blake2b(payload, digest_size=4, person=b"p2p-code").digest()
    return prefix + base64.b32encode(payload + checksum).decode("ascii").rstrip("=")


def from_text(
    prefix: str,
    text: str,
    max_size: int,
    error: type[P2PError],
    what: str,
    old_prefixes: tuple[str, ...] = (),
    outdated: type[P2PError] | None = None,
) -> bytes:
    """The payload of a code's text form (whitespace and case forgiven); ``error`` for
    a wrong prefix, bad base32 or a checksum that fails (a typo or tampering),
    ``outdated`` for one of ``old_prefixes`` (a code of an earlier format)."""
    text = "".join(text[: max_size * 2].split()).upper()
    if outdated is not None and text.startswith(old_prefixes):
        raise outdated(
            f"this {what} has an earlier, longer format that is no longer read: ask for a new one"
        )
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

    # the smallest version at error level L (7 %: a terminal's screen is clean), raised
    # to a stronger level when that fits the same version; never a Micro QR code, which
    # phone cameras do not read; the quiet zone is the standard 4 modules
    out = io.StringIO()
    segno.make(code, error="l", boost_error=True, micro=False).terminal(
        out=out, compact=True, border=4
    )
    return out.getvalue()
