"""Keys and the signed device list: who belongs to an account, proven by its key.

Pure functions and frozen values over pynacl; no I/O. The account key (Ed25519) lives on
the primary device only and signs the device list. Each device has an Ed25519 signing key
(its identity: device id = short hash of it) and an X25519 key (to receive sealed keys).

Every signature here is over ``domain || canonical msgpack``: a domain string per use, so
a signature made for one purpose can never be replayed as another.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Final, Literal

from nacl.exceptions import BadSignatureError
from nacl.public import PrivateKey
from nacl.signing import SigningKey, VerifyKey

from p2p.errors import (
    BadSignature,
    DeviceListError,
    LeaseExpired,
    MalformedFrame,
    RemovedDevice,
    RollbackRefused,
    TooManyDevices,
    UnknownDevice,
    WireError,
)
from p2p.proto.wire import pack, unpack

DOMAIN_DEVICE_LIST: Final = b"p2p/device-list/v2\x00"
DOMAIN_POSSESSION: Final = b"p2p/device-possession/v1\x00"
"""A device's own signature over (account key, its signing key, its box key): it consents
to be listed by that account (see ``possession_proof``)."""
MAX_COMPANIONS: Final = 4
"""Companions per account by default (one primary plus four, as the product we model)."""
MAX_NAME: Final = 64

Role = Literal["primary", "companion"]
Granter = Callable[["DeviceEntry"], bytes]
"""Seals the current space keys to one companion (see ``DeviceList.grants``)."""


def short_id(public_key: bytes) -> str:
    """A short, stable, printable id for a public key (80 bits of BLAKE2b, base32)."""
    digest = hashlib.blake2b(public_key, digest_size=10, person=b"p2p-id").digest()
    return base64.b32encode(digest).decode("ascii").lower()


def verify(public_key: bytes, domain: bytes, message: bytes, signature: bytes) -> None:
    """Check an Ed25519 signature made with :meth:`DeviceKeys.sign`; BadSignature if not."""
    try:
        VerifyKey(public_key).verify(domain + message, signature)
    except (BadSignatureError, ValueError, TypeError) as exc:
        raise BadSignature(
            f"signature does not verify ({domain.rstrip(bytes(1)).decode()})"
        ) from exc


@dataclass(frozen=True)
class DeviceKeys:
    """A device's private keys. ``repr`` never shows them (keys are never logged)."""

    signing_seed: bytes = field(repr=False)
    box_secret: bytes = field(repr=False)

    @classmethod
    def generate(cls) -> DeviceKeys:
        """Fresh random keys for a new installation."""
        return cls(os.urandom(32), bytes(PrivateKey.generate()))

    # derived once: deriving an Ed25519 key pair from its seed costs ~40 us

    @cached_property
    def signing_key(self) -> SigningKey:
        return SigningKey(self.signing_seed)

    @cached_property
    def sign_pk(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    @cached_property
    def box_pk(self) -> bytes:
        return bytes(PrivateKey(self.box_secret).public_key)

    @cached_property
    def device_id(self) -> str:
        return short_id(self.sign_pk)

    def sign(self, domain: bytes, message: bytes) -> bytes:
        """Ed25519 signature over ``domain || message`` (64 bytes)."""
        return bytes(self.signing_key.sign(domain + message).signature)

    def to_record(self) -> bytes:
        return pack([self.signing_seed, self.box_secret])

    @classmethod
    def from_record(cls, data: bytes) -> DeviceKeys:
        value = unpack(data, what="device keys")
        if not (
            isinstance(value, list)
            and len(value) == 2
            and all(isinstance(v, bytes) and len(v) == 32 for v in value)
        ):
            raise MalformedFrame("device keys record is malformed")
        return cls(value[0], value[1])


@dataclass(frozen=True)
class AccountKey:
    """The account's identity key; only the primary holds it."""

    seed: bytes = field(repr=False)

    @classmethod
    def generate(cls) -> AccountKey:
        return cls(os.urandom(32))

    @cached_property
    def _signing_key(self) -> SigningKey:
        return SigningKey(self.seed)

    @cached_property
    def public_key(self) -> bytes:
        return bytes(self._signing_key.verify_key)

    @cached_property
    def account_id(self) -> str:
        return short_id(self.public_key)

    def sign(self, domain: bytes, message: bytes) -> bytes:
        return bytes(self._signing_key.sign(domain + message).signature)


def _possession_body(account_pk: bytes, sign_pk: bytes, box_pk: bytes) -> bytes:
    return pack([account_pk, sign_pk, box_pk])


def possession_proof(keys: DeviceKeys, account_pk: bytes) -> bytes:
    """This device's consent to be listed by the account ``account_pk``: without it an
    account could list another account's device key as its own and claim its writes
    (the account key signs the list; only the device can sign this)."""
    return keys.sign(DOMAIN_POSSESSION, _possession_body(account_pk, keys.sign_pk, keys.box_pk))


_PROVEN: dict[bytes, None] = {}
"""Possession proofs verified already (bounded; insertion order evicts the oldest): every
handshake and grant shows a list, and an Ed25519 check costs ~100 us."""
_PROVEN_MAX: Final = 4096


@dataclass(frozen=True, kw_only=True)
class DeviceEntry:
    """One device on the list: its public keys, its name, its role and its own proof
    that it holds the signing key and agreed to belong to this account."""

    name: str
    role: Role
    sign_pk: bytes
    box_pk: bytes
    proof: bytes = field(default=b"", repr=False)
    """``possession_proof`` by this device for the list's account key."""

    @classmethod
    def of(cls, keys: DeviceKeys, account_pk: bytes, name: str, role: Role) -> DeviceEntry:
        """The entry of a device whose keys we hold (tests, the primary itself)."""
        return cls(
            name=name,
            role=role,
            sign_pk=keys.sign_pk,
            box_pk=keys.box_pk,
            proof=possession_proof(keys, account_pk),
        )

    @cached_property  # BLAKE2b + base32: worth doing once (every check looks it up)
    def device_id(self) -> str:
        return short_id(self.sign_pk)

    def check_proof(self, account_pk: bytes) -> None:
        """DeviceListError unless this device signed its consent to ``account_pk``."""
        body = _possession_body(account_pk, self.sign_pk, self.box_pk)
        memo = hashlib.blake2b(body + self.proof, digest_size=32).digest()
        if memo in _PROVEN:
            return
        try:
            verify(self.sign_pk, DOMAIN_POSSESSION, body, self.proof)
        except BadSignature as exc:
            raise DeviceListError(
                f"device {self.device_id} did not sign its place on this account's list"
            ) from exc
        if len(_PROVEN) >= _PROVEN_MAX:
            del _PROVEN[next(iter(_PROVEN))]
        _PROVEN[memo] = None

    def to_wire(self) -> list[Any]:
        return [self.name, self.role, self.sign_pk, self.box_pk, self.proof]

    @classmethod
    def from_wire(cls, value: object) -> DeviceEntry:
        if not (isinstance(value, list) and len(value) == 5):
            raise MalformedFrame("device entry is malformed")
        name, role, sign_pk, box_pk, proof = value
        if not (isinstance(proof, bytes) and len(proof) == 64):
            raise MalformedFrame("device possession proof is malformed")
        if not (isinstance(name, str) and 0 < len(name) <= MAX_NAME):
            raise MalformedFrame("device name is malformed")
        if role not in ("primary", "companion"):
            raise MalformedFrame("device role is malformed")
        if not (isinstance(sign_pk, bytes) and len(sign_pk) == 32):
            raise MalformedFrame("device signing key is malformed")
        if not (isinstance(box_pk, bytes) and len(box_pk) == 32):
            raise MalformedFrame("device box key is malformed")
        return cls(name=name, role=role, sign_pk=sign_pk, box_pk=box_pk, proof=proof)


@dataclass(frozen=True, kw_only=True)
class DeviceList:
    """The account's signed, versioned device list.

    ``removed`` keeps the public keys of unlinked devices: peers must tell "removed" from
    "never known", and readers still verify the signatures of messages those devices wrote
    while they were linked.
    """

    account_pk: bytes
    version: int
    devices: tuple[DeviceEntry, ...]
    removed: tuple[DeviceEntry, ...] = ()
    max_companions: int = MAX_COMPANIONS
    grants: tuple[tuple[str, bytes], ...] = ()
    """(device id, sealed box) pairs: the current space keys, sealed by the primary to
    each companion's X25519 key. Every list carries them, so a device that missed a key
    rotation catches up from whichever newer list reaches it first."""
    signature: bytes = b""

    @cached_property
    def account_id(self) -> str:
        """Short id of the account key (computed once: every entry check asks for it)."""
        return short_id(self.account_pk)

    def _body(self) -> bytes:
        return pack(
            [
                self.account_pk,
                self.version,
                [d.to_wire() for d in self.devices],
                [d.to_wire() for d in self.removed],
                self.max_companions,
                [[device, sealed] for device, sealed in self.grants],
            ]
        )

    @classmethod
    def create(cls, account: AccountKey, primary: DeviceKeys, name: str) -> DeviceList:
        """Version 1: the primary alone."""
        entry = DeviceEntry.of(primary, account.public_key, name, "primary")
        return cls(account_pk=account.public_key, version=1, devices=(entry,)).signed(account)

    def signed(self, account: AccountKey) -> DeviceList:
        """This list, checked against the rules and signed by ``account``."""
        if account.public_key != self.account_pk:
            raise DeviceListError("signing key is not this list's account key")
        unsigned = replace(self, signature=b"")
        unsigned.check_rules()
        return replace(unsigned, signature=account.sign(DOMAIN_DEVICE_LIST, unsigned._body()))

    def with_device(
        self,
        account: AccountKey,
        entry: DeviceEntry,
        grant: Granter | None = None,
        *,
        version: int | None = None,
    ) -> DeviceList:
        """A new version with ``entry`` added (refused past the companion limit);
        ``version`` (default: the next) may skip versions signed and never adopted."""
        if entry.device_id in self.ids or entry.device_id in self.removed_ids:
            raise DeviceListError(f"device {entry.device_id} is already known to this account")
        grown = replace(self, version=self._next(version), devices=(*self.devices, entry))
        return grown._with_grants(grant).signed(account)

    def without_device(
        self,
        account: AccountKey,
        device_id: str,
        grant: Granter | None = None,
        *,
        version: int | None = None,
    ) -> DeviceList:
        """A new version with ``device_id`` moved to ``removed`` (no grant for it)."""
        entry = self.entry(device_id)
        if entry.role == "primary":
            raise DeviceListError("the primary cannot be removed")
        kept = tuple(d for d in self.devices if d.device_id != device_id)
        shrunk = replace(
            self, version=self._next(version), devices=kept, removed=(*self.removed, entry)
        )
        return shrunk._with_grants(grant).signed(account)

    def _next(self, version: int | None) -> int:
        if version is None:
            return self.version + 1
        if version <= self.version:
            raise DeviceListError(f"version {version} is not newer than {self.version}")
        return version

    def _with_grants(self, grant: Granter | None) -> DeviceList:
        if grant is None:
            return replace(self, grants=())
        companions = [d for d in self.devices if d.role == "companion"]
        return replace(self, grants=tuple((d.device_id, grant(d)) for d in companions))

    def check_rules(self) -> None:
        """One primary, companions within the limit, no device twice, and every device
        (removed ones too) proves it agreed to be on this account's list."""
        primaries = [d for d in self.devices if d.role == "primary"]
        if len(primaries) != 1:
            raise DeviceListError("a device list has exactly one primary")
        companions = len(self.devices) - 1
        if companions > self.max_companions:
            raise TooManyDevices(
                f"{companions} companions exceed the limit of {self.max_companions}"
            )
        ids = [d.device_id for d in (*self.devices, *self.removed)]
        if len(ids) != len(set(ids)):
            raise DeviceListError("a device appears twice on the list")
        if self.version < 1:
            raise DeviceListError("device list versions start at 1")
        for d in (*self.devices, *self.removed):
            d.check_proof(self.account_pk)

    def verify(self, account_pk: bytes) -> None:
        """Check signature, account and rules; raise a DeviceListError subclass if not."""
        if self.account_pk != account_pk:
            raise DeviceListError("device list belongs to another account")
        try:
            verify(self.account_pk, DOMAIN_DEVICE_LIST, self._body(), self.signature)
        except BadSignature as exc:
            raise DeviceListError("device list signature does not verify") from exc
        self.check_rules()

    @cached_property
    def ids(self) -> frozenset[str]:
        return frozenset(d.device_id for d in self.devices)

    @cached_property
    def removed_ids(self) -> frozenset[str]:
        return frozenset(d.device_id for d in self.removed)

    @property
    def primary(self) -> DeviceEntry:
        return next(d for d in self.devices if d.role == "primary")

    def grant_for(self, device_id: str) -> bytes | None:
        return next((sealed for d, sealed in self.grants if d == device_id), None)

    def entry(self, device_id: str) -> DeviceEntry:
        """The current entry of ``device_id``: RemovedDevice or UnknownDevice otherwise."""
        for d in self.devices:
            if d.device_id == device_id:
                return d
        if device_id in self.removed_ids:
            raise RemovedDevice(device_id)
        raise UnknownDevice(device_id)

    def signing_key_of(self, device_id: str) -> bytes | None:
        """Signing key of a current or removed device (to check what it once wrote)."""
        return self._signing_keys.get(device_id)

    @cached_property
    def _signing_keys(self) -> dict[str, bytes]:
        return {d.device_id: d.sign_pk for d in (*self.devices, *self.removed)}

    def encode(self) -> bytes:
        return pack([self._body(), self.signature])

    @classmethod
    def decode(cls, data: bytes) -> DeviceList:
        """Parse (not verify) a device list from outside; WireError if malformed."""
        outer = unpack(data, what="device list", max_size=64 * 1024)
        try:
            body_bytes, signature = outer
            body = unpack(body_bytes, what="device list body", max_size=64 * 1024)
            account_pk, version, devices, removed, max_companions, grants = body
            ok = (
                isinstance(signature, bytes)
                and len(signature) == 64
                and isinstance(account_pk, bytes)
                and len(account_pk) == 32
                and type(version) is int
                and 0 < version < 2**62
                and type(max_companions) is int
                and 0 <= max_companions <= 64
                and isinstance(devices, list)
                and isinstance(removed, list)
                and len(devices) + len(removed) <= 1024
                and isinstance(grants, list)
                and len(grants) <= 64
                and all(
                    isinstance(g, list)
                    and len(g) == 2
                    and isinstance(g[0], str)
                    and len(g[0]) <= 64
                    and isinstance(g[1], bytes)
                    and len(g[1]) <= 16 * 1024
                    for g in grants
                )
            )
        except (TypeError, ValueError) as exc:
            raise MalformedFrame("device list is malformed") from exc
        if not ok:
            raise MalformedFrame("device list is malformed")
        decoded = cls(
            account_pk=account_pk,
            version=version,
            devices=tuple(DeviceEntry.from_wire(d) for d in devices),
            removed=tuple(DeviceEntry.from_wire(d) for d in removed),
            max_companions=max_companions,
            grants=tuple((g[0], g[1]) for g in grants),
            signature=signature,
        )
        if decoded._body() != body_bytes:
            raise MalformedFrame("device list is not in canonical form")
        return decoded


def account_tag(key: bytes, message: bytes) -> bytes:
    """A tag only devices holding the account's discovery ``key`` can make or check."""
    return hashlib.blake2b(message, key=key, digest_size=32, person=b"p2p-acct-tag").digest()


DOMAIN_LEASE: Final = b"p2p/lease/v1\x00"
LEASE_MS: Final = 14 * 24 * 3600 * 1000
"""How long a companion stays accepted after its last contact with the primary."""


def issue_lease(account: AccountKey, device_id: str, expires_ms: int) -> bytes:
    """The primary's word that ``device_id`` is in good standing until ``expires_ms``."""
    body = pack([device_id, expires_ms])
    return pack([body, account.sign(DOMAIN_LEASE, body)])


def check_lease(data: bytes, account_pk: bytes, device_id: str, now_ms: int) -> int:
    """The lease's expiry, if it is the account's and still runs; LeaseExpired if not."""
    try:
        body, signature = unpack(data, what="lease", max_size=256)
        leased, expires_ms = unpack(body, what="lease body", max_size=256)
        verify(account_pk, DOMAIN_LEASE, body, signature)
    except (WireError, BadSignature, ValueError, TypeError) as exc:
        raise LeaseExpired(device_id, "no valid lease from the primary") from exc
    if leased != device_id or type(expires_ms) is not int:
        raise LeaseExpired(device_id, "the lease names another device")
    if expires_ms <= now_ms:
        raise LeaseExpired(device_id, "its lease expired: it has not met the primary in time")
    return expires_ms


def accept_device_list(current: DeviceList, offered: DeviceList) -> DeviceList:
    """The list to keep when ``offered`` arrives: the newer one, verified.

    Raises RollbackRefused for an older version, DeviceListError for a forged or broken
    one, and for the same version with other content (an account key signing two lists of
    one version is a fork we refuse to pick from).
    """
    offered.verify(current.account_pk)
    if offered.version < current.version:
        raise RollbackRefused(offered.version, current.version)
    if offered.version == current.version:
        if offered.encode() != current.encode():
            raise DeviceListError(f"two different device lists claim version {offered.version}")
        return current
    return offered


def parse_device_list(data: bytes, account_pk: bytes) -> DeviceList:
    """Decode and verify a device list for ``account_pk`` in one step."""
    try:
        dl = DeviceList.decode(data)
    except WireError as exc:
        raise DeviceListError(f"device list is malformed: {exc}") from exc
    dl.verify(account_pk)
    return dl
