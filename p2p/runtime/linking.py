"""Linking a new device to an account: the exchange behind ``p2p link`` / ``p2p approve``.

The new device shows a pairing code (``p2p.proto.pairing``) and listens; the primary reads the
code and dials it. Then, over one connection::

    new -> primary   lcommit a hash of the new device's ephemeral key
    primary -> new   lhello  primary's signing key, ephemeral key, account key, MAC keyed
                             by the secret
    new -> primary   lauth   its signing and box keys and name, ephemeral key, signature
                             by that signing key (whose id the code names), and its
                             possession proof for the account key (its place on the list)
                     (both now show the same six-digit check code)
    new -> primary   lhave   per space, the state vector of the history it keeps   [boxed]
                             from an interrupted earlier try
    primary -> new   enroll  signed device list with the new device, space keys,    [boxed]
                             per space the bytes to send and the messages it holds
    primary -> new   piece*  each space's history past that vector, read from the   [boxed]
                             store in updates of at most 256 KiB, account space first
    primary -> new   lsent                                                          [boxed]
    new -> primary   ldone   (everything it got is durable)                         [boxed]

The MAC proves to the new device that the dialer read its code; the signature proves to
the primary that the device holds a key whose id is the one the code names (the code
carries only that id, so that it fits a terminal's QR code), and vouches for its box key
and name. The commitment comes first so that neither end can pick its key after seeing
the other's: whoever sits in the middle cannot search for keys that make the two check
codes agree (1 in 10**6 by chance).
Boxed frames use the same channel as sync sessions (``p2p.proto.box``), keyed by both
ephemeral keys *and* the secret.

History moves as a catch-up does (docs/protocol.md, "Linking"): the primary reads each
space's stored updates a page at a time, trimmed to what the new device lacks, without
loading any document; the new device applies each piece without the chat's document
when it can, and writes it, indexed, before it takes the next. Neither side holds more
than a piece of a history of any size, and a link cut midway resumes from the state
vectors the new device's store holds, with nothing sent twice.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, Protocol

import trio
from nacl.public import PrivateKey

from p2p.errors import (
    AlreadyInitialized,
    BadSignature,
    DeviceListError,
    HandshakeFailed,
    P2PError,
    TooManyDevices,
    WireError,
)
from p2p.proto.box import Box, shared_secret
from p2p.proto.identity import (
    MAX_NAME,
    DeviceEntry,
    DeviceKeys,
    DeviceList,
    possession_proof,
    short_id,
    verify,
)
from p2p.proto.model import EMPTY_STATE_VECTOR, MESSAGES, SignatureCheck
from p2p.proto.pairing import (
    MAX_TTL_S,
    CheckCodeMismatch,
    CodeAlreadyUsed,
    ExpiredCode,
    PairingCode,
    PairingError,
    UnsafeAddress,
    check_code,
)
from p2p.proto.wire import MAX_HANDSHAKE_FRAME, MAX_ID, decode_frame, encode_frame, pack, unpack
from p2p.state.device import DeviceState, EnrolledSpace, Enrollment
from p2p.state.spaces import stored_vector
from p2p.storage.base import Store, WriteBatch
from p2p.transport.base import Connection

DOMAIN_LINK: Final = b"p2p/link/v1\x00"
CHUNK: Final = 256 * 1024
STEP_TIMEOUT: Final = 60.0
"""Longest wait for any one frame."""
CONFIRM_TIMEOUT: Final = 300.0
"""Longest wait for the primary's decision: a person comparing check codes."""
MAX_HISTORY: Final = 1 << 34
MAX_VECTOR: Final = 512 * 1024
"""Largest state vector a new device may state for a space in ``lhave``."""

Progress = Callable[[int, int, int | None, int | None], None]
"""Called with (bytes done, bytes in all, messages done, messages in all) as history
moves, on both sides. On the new device, messages done counts the messages it has
indexed (across attempts: what an earlier one stored counts), an exact count, never an
estimate from bytes; bytes in all is what it stored before plus what the primary said it
would send. On the primary, a space's messages count once its last piece is sent."""


def no_progress(
    done: int, total: int, messages_done: int | None, messages_total: int | None
) -> None:
    """The default :data:`Progress`: nobody is watching."""


@dataclass(frozen=True, kw_only=True)
class Linked:
    """The result on the primary's side."""

    device: str
    name: str
    sent: int
    """History bytes sent in this attempt (less than the total when resumed)."""


def _mac(secret: bytes, *parts: bytes) -> bytes:
    return hashlib.blake2b(b"".join(parts), key=secret, digest_size=32, person=b"p2p-link").digest()


def _transcript(commitment: bytes, hello: dict[str, Any], new_eph: bytes) -> bytes:
    """What the check code and the session keys are computed over: decoded values, not
    frame bytes (a frame has many encodings, and a signature many valid values, which a
    party in the middle could otherwise try one after another). Every value here is
    fixed before the other side's key is seen."""
    return pack([commitment, hello["pk"], hello["eph"], hello["acct"], hello["mac"], new_eph])


def _auth_body(hello: bytes, auth: dict[str, Any]) -> bytes:
    """What the new device signs in ``lauth``: the primary's hello as sent, its own
    ephemeral key, box key and name (each length-prefixed by ``pack``)."""
    return hello + pack([auth["eph"], auth["bpk"], auth["name"]])


def _commitment(ephemeral: bytes) -> bytes:
    return hashlib.blake2b(ephemeral, digest_size=32, person=b"p2p-link-commit").digest()


async def _receive(
    conn: Connection, box: Box | None, who: str, patience: float = STEP_TIMEOUT
) -> dict[str, Any]:
    with trio.fail_after(patience):
        data = await conn.receive()
    frame = decode_frame(box.open(data, who=who) if box else data)
    if frame["t"] == "abort":
        raise PairingError(f"the other side stopped the link: {frame['code']}")
    return frame


def _expect(frame: dict[str, Any], kind: str) -> dict[str, Any]:
    if frame["t"] != kind:
        raise HandshakeFailed(f"expected {kind}, got {frame['t']}")
    return frame


# ---- primary ------------------------------------------------------------------------


class History(Protocol):
    """Where the primary reads the history it sends (:class:`StoredHistory`)."""

    async def plan(self, space_id: str, have: bytes) -> tuple[int, int]:
        """(bytes to send to a device holding ``have``, a state vector; messages the
        space holds). Called once per space, before :meth:`pieces`."""
        ...

    def pieces(self, space_id: str, have: bytes) -> AsyncIterator[bytes]:
        """What a device holding ``have`` lacks of the space, in updates of at most
        :data:`CHUNK` bytes, to apply in order."""
        ...


class StoredHistory:
    """:class:`History` read from a node's store, without loading any document: the
    catch-up's reader (``Spaces.stored_diff``), one stored update at a time."""

    def __init__(
        self,
        state: DeviceState,
        store: Store,
        run: Callable[..., Awaitable[Any]] | None = None,
    ) -> None:
        """``run(fn, *args)`` calls the store off the trio thread (the node's writer
        does it its way; by default a worker thread)."""
        self._state = state
        self._store = store
        self._run = run or trio.to_thread.run_sync
        self._starts: dict[str, int] = {}

    async def plan(self, space_id: str, have: bytes) -> tuple[int, int]:
        # where the device's vector leaves off: reads what it holds, in a worker thread
        start = await self._run(self._state.first_needed, space_id, have)
        self._starts[space_id] = start
        size = await self._run(self._store.space_bytes, space_id, start)
        return size, await self._run(self._store.index_count, space_id, MESSAGES)

    async def pieces(self, space_id: str, have: bytes) -> AsyncIterator[bytes]:
        start = self._starts.get(space_id, 0)
        pieces = self._state.stored_pieces(space_id, have, None, start, CHUNK)
        while (piece := await self._run(next, pieces, None)) is not None:
            yield piece


async def approve(
    state: DeviceState,
    code: PairingCode,
    conn: Connection,
    *,
    confirm: Callable[[str], Awaitable[bool]],
    persist: Callable[[WriteBatch], Awaitable[None]],
    history: History,
    now_ms: int,
    progress: Progress = no_progress,
) -> Linked:
    """Primary side. ``confirm(check)`` decides (a person comparing screens, or a script);
    ``persist`` makes durable, before the device learns of it, the version of the list
    that adds it, and once the device confirms it holds its history, that list;
    ``history`` reads what the device lacks of each space."""
    commit_bytes = await _raw(conn)
    commitment = _expect(decode_frame(commit_bytes), "lcommit")["c"]
    eph = PrivateKey.generate()
    eph_pk = bytes(eph.public_key)
    account_pk = state.device_list.account_pk
    hello = encode_frame(
        "lhello",
        pk=state.keys.sign_pk,
        eph=eph_pk,
        acct=account_pk,
        mac=_mac(code.secret, code.device_id.encode(), state.keys.sign_pk, eph_pk, account_pk),
    )
    await conn.send(hello)
    auth_bytes = await _raw(conn)
    auth = _expect(decode_frame(auth_bytes), "lauth")
    if len(auth["pk"]) != 32 or len(auth["bpk"]) != 32 or not 0 < len(auth["name"]) <= MAX_NAME:
        raise PairingError("the device's keys or name are malformed")
    if short_id(auth["pk"]) != code.device_id:
        raise PairingError("the device's key is not the one its code names")
    try:
        verify(auth["pk"], DOMAIN_LINK, _auth_body(hello, auth), auth["sig"])
    except BadSignature as exc:
        raise PairingError("the device does not hold the key its code names") from exc
    if _commitment(auth["eph"]) != commitment:
        raise PairingError("the device's key does not match what it committed to")
    transcript = _transcript(commitment, decode_frame(hello), auth["eph"])
    box = Box(
        shared_secret(bytes(eph), auth["eph"]),
        hashlib.blake2b(transcript).digest(),
        initiator=True,
        extra=code.secret,
    )
    if not await confirm(check_code(transcript, code.secret)):
        await conn.send(box.seal(encode_frame("abort", code="CheckCodeMismatch")))
        raise CheckCodeMismatch("the check codes differ: nothing linked")
    have = _parse_have(_expect(await _receive(conn, box, code.device_id), "lhave")["have"])

    entry = DeviceEntry(
        name=auth["name"],
        role="companion",
        sign_pk=auth["pk"],
        box_pk=auth["bpk"],
        proof=auth["pop"],
    )
    entry.check_proof(account_pk)  # DeviceListError: the device did not consent
    base = state.device_list
    bundle, proposed, batch = state.propose_enrollment(entry, now_ms=now_ms)
    await persist(batch)
    # the account space first: the new device follows its contacts before judging chats
    spaces = sorted(bundle.enrolled, key=lambda s: s.kind != "account")
    held = {s.id: have.get(s.id, EMPTY_STATE_VECTOR) for s in spaces}
    plans = {s.id: await history.plan(s.id, held[s.id]) for s in spaces}
    keys = [
        [
            s.id,
            s.kind,
            s.name,
            s.epoch,
            [[e, k] for e, k in s.keys.items()],
            [[e, r] for e, r in bundle.rotations.get(s.id, {}).items()],
        ]
        for s in spaces
    ]
    await conn.send(
        box.seal(
            encode_frame(
                "enroll",
                list=bundle.device_list,
                keys=pack(keys),
                sizes=pack({s: [size, count] for s, (size, count) in plans.items()}),
                lease=bundle.lease,
            )
        )
    )
    total = sum(size for size, _ in plans.values())
    messages_total = sum(count for _, count in plans.values())
    messages_done = sent = 0
    progress(0, total, 0, messages_total)
    for s in spaces:
        async for piece in history.pieces(s.id, held[s.id]):
            await conn.send(box.seal(encode_frame("piece", s=s.id, d=piece)))
            sent += len(piece)
            progress(min(sent, total), total, messages_done, messages_total)
        messages_done += plans[s.id][1]
        progress(min(sent, total), total, messages_done, messages_total)
    await conn.send(box.seal(encode_frame("lsent", n=sent)))
    _expect(await _receive(conn, box, code.device_id), "ldone")
    progress(total, total, messages_total, messages_total)
    # only now, with the history on the device, is it listed: a link cut before this
    # (the device killed, the connection dropped, nobody answering) leaves no device
    await persist(state.adopt_enrollment(base, proposed, entry))
    return Linked(device=code.device_id, name=entry.name, sent=sent)


async def _raw(conn: Connection) -> bytes:
    """A clear frame, from a side that has proven nothing yet: held to the handshake
    limit before it is read."""
    with trio.fail_after(STEP_TIMEOUT):
        data = await conn.receive(MAX_HANDSHAKE_FRAME)
    frame = decode_frame(data, limit=MAX_HANDSHAKE_FRAME)
    if frame["t"] == "abort":
        raise PairingError(f"the other side stopped the link: {frame['code']}")
    return data


def _parse_have(data: bytes) -> dict[str, bytes]:
    """``lhave``: per space, the state vector of the history the device keeps (checked
    as a vector where it is used: ``first_needed`` refuses a malformed one)."""
    value = unpack(data, what="history parts")
    if not isinstance(value, dict) or len(value) > 1024:
        raise WireError("history parts are malformed")
    for space_id, vector in value.items():
        if not (
            isinstance(space_id, str)
            and len(space_id) <= MAX_ID
            and isinstance(vector, bytes)
            and len(vector) <= MAX_VECTOR
        ):
            raise WireError("history parts are malformed")
    return value


# ---- new device ---------------------------------------------------------------------


def _check_on_two_threads(
    helper: ThreadPoolExecutor, checks: list[SignatureCheck]
) -> dict[bytes, bool]:
    """Run a piece's signature checks, half on the calling (worker) thread and half on
    ``helper``'s: the new device's largest cost when the history is other devices'
    entries, and pynacl lets go of the GIL while it verifies."""
    half = len(checks) // 2
    theirs = helper.submit(_check_each, checks[half:]) if checks[half:] else None
    outcomes = _check_each(checks[:half])
    if theirs is not None:
        outcomes.update(theirs.result())
    return outcomes


def _check_each(checks: list[SignatureCheck]) -> dict[bytes, bool]:
    return {check.fingerprint: check.passes() for check in checks}


def kept_history(store: Store, account_pk: bytes) -> dict[str, bytes]:
    """Per space, the state vector of what an earlier, interrupted link to this account
    left in ``store`` (``lhave``): each piece was written with its space's vector, so
    the vector is exactly what is stored. Nothing when the earlier link was to another
    account (its spaces are dropped once this one completes)."""
    if store.get("link/account") != account_pk:
        return {}
    kept = {}
    for name in store.names("space/"):
        space_id = name.removeprefix("space/")
        vector = stored_vector(store.get(f"sv/{space_id}"), store.log_seqs(space_id)[1])
        if vector is not None:
            kept[space_id] = vector
    return kept


def _stored_of(store: Store, space_ids: set[str]) -> tuple[int, int]:
    """The history bytes and messages ``store`` holds of these spaces."""
    size = sum(store.space_bytes(space_id, 0) for space_id in space_ids)
    return size, sum(store.index_count(space_id, MESSAGES) for space_id in space_ids)


async def accept(
    keys: DeviceKeys,
    name: str,
    code: PairingCode,
    conn: Connection,
    store: Store,
    *,
    show_check: Callable[[str], None],
    progress: Progress = no_progress,
) -> DeviceState:
    """New-device side: answer the primary, receive the history into ``store`` piece by
    piece, and write the device's records last (``DeviceState.enrolling``); the
    device's state. Everything is durable before ``ldone`` tells the primary to list
    the device."""
    # commit to our ephemeral key before seeing the dialer's: nobody in the middle can
    # then search for keys that make both screens show the same six digits
    eph = PrivateKey.generate()
    eph_pk = bytes(eph.public_key)
    commit = encode_frame("lcommit", c=_commitment(eph_pk))
    await conn.send(commit)
    hello_bytes = await _raw(conn)
    hello = _expect(decode_frame(hello_bytes), "lhello")
    if not hmac.compare_digest(
        hello["mac"],
        _mac(code.secret, code.device_id.encode(), hello["pk"], hello["eph"], hello["acct"]),
    ):
        await conn.send(encode_frame("abort", code="WrongSecret"))
        raise PairingError("the dialer did not read our pairing code")
    signed = {"eph": eph_pk, "bpk": keys.box_pk, "name": name}
    auth = encode_frame(
        "lauth",
        pk=keys.sign_pk,
        bpk=keys.box_pk,
        name=name,
        eph=eph_pk,
        sig=keys.sign(DOMAIN_LINK, _auth_body(hello_bytes, signed)),
        pop=possession_proof(keys, hello["acct"]),
    )
    await conn.send(auth)
    transcript = _transcript(_commitment(eph_pk), hello, eph_pk)
    show_check(check_code(transcript, code.secret))
    box = Box(
        shared_secret(bytes(eph), hello["eph"]),
        hashlib.blake2b(transcript).digest(),
        initiator=False,
        extra=code.secret,
    )
    kept = await trio.to_thread.run_sync(kept_history, store, hello["acct"])
    await conn.send(box.seal(encode_frame("lhave", have=pack(kept))))

    # the person at the primary compares check codes before this comes
    enroll = _expect(await _receive(conn, box, "primary", CONFIRM_TIMEOUT), "enroll")
    device_list, spaces, sizes, rotations = _parse_enroll(enroll, keys, hello["pk"], hello["acct"])
    bundle = Enrollment(
        lease=enroll["lease"],
        account_pk=device_list.account_pk,
        device_list=device_list.encode(),
        spaces=spaces,
        rotations=rotations,
    )
    state = await trio.to_thread.run_sync(DeviceState.enrolling, keys, name, bundle, store)
    # what an earlier attempt stored counts as done, in bytes and in messages
    done, messages_done = await trio.to_thread.run_sync(_stored_of, store, kept.keys() & sizes)
    total = done + sum(size for size, _ in sizes.values())
    messages_total = sum(count for _, count in sizes.values())
    progress(done, total, messages_done, messages_total)
    kinds = {s.id: s.kind for s in spaces}
    current = ""
    helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="p2p-link-checks")
    check_all = partial(_check_on_two_threads, helper)
    try:
        while (frame := await _receive(conn, box, "primary"))["t"] != "lsent":
            piece = _expect(frame, "piece")
            space_id, data = piece["s"], piece["d"]
            if space_id not in sizes or not isinstance(data, bytes):
                raise HandshakeFailed("a history piece for no space of the enrollment")
            if space_id != current:
                if current:  # one document at most stays loaded: the space in progress
                    await trio.to_thread.run_sync(state.space_taken, current, store)
                if kinds[space_id] != "account" and (not current or kinds[current] == "account"):
                    # the account space is in: follow our contacts before judging chats
                    await trio.to_thread.run_sync(store.write, state.learn_contacts())
                current = space_id
            messages_done += await trio.to_thread.run_sync(
                state.enroll_piece, space_id, data, store, check_all
            )
            done += len(data)
            progress(min(done, total), total, messages_done, messages_total)
    finally:
        helper.shutdown(wait=False, cancel_futures=True)
    if current:
        await trio.to_thread.run_sync(state.space_taken, current, store)
    await trio.to_thread.run_sync(store.write, state.finish_enrollment(store))
    progress(total, total, messages_done, messages_total)
    await conn.send(box.seal(encode_frame("ldone", n=done)))
    return state


def _parse_enroll(
    frame: dict[str, Any], keys: DeviceKeys, primary_pk: bytes, account_pk: bytes
) -> tuple[
    DeviceList,
    list[EnrolledSpace],
    dict[str, tuple[int, int]],
    dict[str, dict[int, bytes]],
]:
    """The list, spaces, history sizes (bytes to come, messages held) and rotations of
    an ``enroll`` frame, checked. Each space's history is empty here: it follows in
    pieces."""
    try:
        device_list = DeviceList.decode(frame["list"])
    except WireError as exc:
        raise DeviceListError(f"the enrollment's device list is malformed: {exc}") from exc
    device_list.verify(account_pk)  # the account we consented to, nobody else's
    if keys.device_id not in device_list.ids:
        raise DeviceListError("the enrollment's device list does not hold this device")
    if device_list.primary.sign_pk != primary_pk:
        raise DeviceListError("the device that dialed us is not the account's primary")
    try:
        spaces: list[EnrolledSpace] = []
        rotations: dict[str, dict[int, bytes]] = {}
        for s, kind, sname, epoch, space_keys, rots in unpack(frame["keys"], what="space keys"):
            key_map: dict[int, bytes] = {}
            for e, k in space_keys:
                if not (
                    type(e) is int and 0 <= e < 2**32 and isinstance(k, bytes) and len(k) == 32
                ):
                    raise ValueError("space key")
                key_map[e] = k
            for e, r in rots:
                if not (type(e) is int and e in key_map and isinstance(r, bytes) and len(r) < 4096):
                    raise ValueError("rotation")
                rotations.setdefault(s, {})[e] = r  # checked by whoever we show it to
            if not (
                isinstance(s, str)
                and 0 < len(s) <= MAX_ID
                and kind in ("account", "chat")
                and isinstance(sname, str)
                and epoch in key_map
            ):
                raise ValueError("space entry")
            spaces.append(EnrolledSpace(s, str(kind), sname, int(epoch), key_map, b""))
        sizes = _parse_sizes(frame["sizes"])
    except (P2PError, ValueError, TypeError) as exc:
        raise WireError(f"the enrollment is malformed: {exc}") from exc
    if set(sizes) != {s.id for s in spaces}:
        raise WireError("the enrollment's history sizes do not match its spaces")
    if sum(1 for s in spaces if s.kind == "account") != 1:
        raise WireError("the enrollment holds no account space, or more than one")
    return device_list, spaces, sizes, rotations


def _parse_sizes(data: bytes) -> dict[str, tuple[int, int]]:
    """``enroll``'s sizes: for each space, the bytes the primary will send and the
    messages the space holds."""
    raw = unpack(data, what="sizes")
    if not isinstance(raw, dict):
        raise ValueError("sizes")
    sizes: dict[str, tuple[int, int]] = {}
    for s, item in raw.items():
        if not (isinstance(s, str) and isinstance(item, list) and len(item) == 2):
            raise ValueError("size entry")
        n, messages = item
        if not (type(n) is int and 0 <= n < MAX_HISTORY):
            raise ValueError("size entry")
        if not (type(messages) is int and 0 <= messages < MAX_HISTORY):
            raise ValueError("size entry")
        sizes[s] = (n, messages)
    return sizes


# ---- orchestration: what `p2p approve` and `p2p link` run ----------------------------


async def approve_code(
    state: DeviceState,
    code_text: str,
    *,
    read: Callable[[str], Awaitable[bytes | None]],
    write: Callable[[WriteBatch], Awaitable[None]],
    history: History,
    confirm: Callable[[str], Awaitable[bool]],
    now_s: int,
    connect: str | None = None,
    progress: Progress = no_progress,
) -> Linked:
    """Check a pairing code and link the device that shows it (primary side).

    Refuses, before dialing: a malformed, expired or used code, one that states a life
    longer than ``MAX_TTL_S``, one naming no local address (without ``connect``), a
    non-primary, and a fifth companion. ``read``/``write`` reach the primary's store;
    ``history`` reads the histories from it (:class:`StoredHistory`). A retry resumes
    from what the new device stored: it says so in ``lhave``.
    """
    code = PairingCode.decode(code_text)
    code.check_fresh(now_s)
    if not state.is_primary:
        raise PairingError("only the account's primary device can approve a link")
    if await read(f"link/used/{code.code_id}") is not None:
        raise CodeAlreadyUsed("this pairing code was used already; show a new one with p2p link")
    dl = state.device_list
    if code.device_id not in dl.ids and len(dl.devices) - 1 >= dl.max_companions:
        raise TooManyDevices(
            f"the account already has {dl.max_companions} companions; unlink one first"
        )
    addresses = [connect] if connect else code.local_addresses()
    if not addresses:
        raise UnsafeAddress(
            "the pairing code names no local network address; "
            "give the new device's address with --connect HOST:PORT"
        )
    conn = await _dial_any(addresses)
    try:
        linked = await approve(
            state,
            code,
            conn,
            confirm=confirm,
            persist=write,
            history=history,
            now_ms=now_s * 1000,
            progress=progress,
        )
    finally:
        await conn.aclose()
    await write(WriteBatch(records={f"link/used/{code.code_id}": b"1"}))
    return linked


async def _dial_any(addresses: list[str]) -> Connection:
    from p2p.transport.tcp import TcpTransport

    errors = []
    for address in addresses:
        try:
            return await TcpTransport().dial(address)
        except P2PError as exc:
            errors.append(str(exc))
    raise PairingError("cannot reach the new device: " + ("; ".join(errors) or "no address"))


class LinkUI(Protocol):
    """What ``p2p link`` shows while it waits (terminal or JSON lines)."""

    def code(self, text: str, device: str) -> None: ...

    def check(self, digits: str) -> None: ...

    def progress(
        self, done: int, total: int, messages_done: int | None, messages_total: int | None
    ) -> None: ...

    def failed(self, error: P2PError) -> None: ...


async def wait_for_primary(
    home: str | os.PathLike[str],
    name: str,
    *,
    listen: str,
    ttl_s: int,
    now_s: int,
    ui: LinkUI,
) -> DeviceState:
    """New-device side of ``p2p link``: create keys, show a code, serve until enrolled.

    Failed attempts (wrong secret, dropped connection, refused check code) are reported
    and the device keeps waiting with the same code until it expires, so an interrupted
    history transfer resumes when the primary tries again.
    """
    from p2p.runtime.home import create_store
    from p2p.transport.tcp import TcpTransport, advertised_addresses

    ttl_s = min(ttl_s, MAX_TTL_S)  # primaries refuse a code that says it lives longer
    store = create_store(home)
    try:
        if store.get("account/list") is not None:
            raise AlreadyInitialized(f"{home} already holds a linked device")
        raw = store.get("device/keys")
        keys = DeviceKeys.from_record(raw) if raw else DeviceKeys.generate()
        await trio.to_thread.run_sync(
            store.write,
            WriteBatch(records={"device/keys": keys.to_record(), "device/name": name.encode()}),
        )
        transport = TcpTransport(listen)
        enrolled: list[DeviceState] = []
        attempt = trio.Lock()

        async with trio.open_nursery() as nursery:

            async def handle(conn: Connection) -> None:
                async with attempt:
                    try:
                        if enrolled:
                            return
                        state = await accept(
                            keys, name, code, conn, store,
                            show_check=ui.check, progress=ui.progress,
                        )  # fmt: skip
                        enrolled.append(state)
                        nursery.cancel_scope.cancel()
                    except (P2PError, trio.TooSlowError) as exc:
                        ui.failed(exc if isinstance(exc, P2PError) else PairingError("timed out"))
                    finally:
                        await conn.aclose()

            await nursery.start(transport.serve, handle)
            code = PairingCode.create(
                sign_pk=keys.sign_pk,
                addresses=advertised_addresses(transport.address),
                now_s=now_s,
                ttl_s=ttl_s,
            )
            ui.code(code.encode(), keys.device_id)
            await trio.sleep(ttl_s)
            nursery.cancel_scope.cancel()
        if not enrolled:
            raise ExpiredCode("the pairing code expired before a primary approved it")
        return enrolled[0]
    finally:
        store.close()
