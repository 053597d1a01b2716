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
    new -> primary   lhave   history parts kept from an interrupted earlier try     [boxed]
    primary -> new   enroll  signed device list with the new device, space keys,    [boxed]
                             each space's history size and message count
    primary -> new   chunk*  each space's history, in 256 KiB chunks                 [boxed]
    new -> primary   ldone                                                          [boxed]

The MAC proves to the new device that the dialer read its code; the signature proves to
the primary that the device holds a key whose id is the one the code names (the code
carries only that id, so that it fits a terminal's QR code), and vouches for its box key
and name. The commitment comes first so that neither end can pick its key after seeing
the other's: whoever sits in the middle cannot search for keys that make the two check
codes agree (1 in 10**6 by chance).
Boxed frames use the same channel as sync sessions (``p2p.proto.box``), keyed by both
ephemeral keys *and* the secret.

History is a snapshot per space, computed once per code and kept by the primary until
the link completes; the new device keeps every chunk it receives on disk, so a link cut
midway resumes where it stopped, with nothing sent twice.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
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
from p2p.state.device import DeviceState, EnrolledSpace, Enrollment, merge_batches
from p2p.storage.base import Store, WriteBatch
from p2p.transport.base import Connection

DOMAIN_LINK: Final = b"p2p/link/v1\x00"
CHUNK: Final = 256 * 1024
STEP_TIMEOUT: Final = 60.0
"""Longest wait for any one frame."""
CONFIRM_TIMEOUT: Final = 300.0
"""Longest wait for the primary's decision: a person comparing check codes."""
MAX_HISTORY: Final = 1 << 34

Progress = Callable[[int, int, int | None, int | None], None]
"""Called with (bytes done, bytes in all, messages done, messages in all) as history
moves, on both sides. Messages done counts the messages of the spaces whose history is
wholly on the new device (a space's history is one snapshot, so its messages arrive
together, with its last chunk): an exact count, never an estimate from bytes. On the new
device both message counts are None when the primary did not state them (an earlier
release)."""


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


def _digest(blob: bytes) -> bytes:
    return hashlib.blake2b(blob, digest_size=32).digest()


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


async def approve(
    state: DeviceState,
    code: PairingCode,
    conn: Connection,
    *,
    confirm: Callable[[str], Awaitable[bool]],
    persist: Callable[[WriteBatch], Awaitable[None]],
    history: Callable[[str], Awaitable[tuple[bytes, int]]],
    now_ms: int,
    progress: Progress = no_progress,
) -> Linked:
    """Primary side. ``confirm(check)`` decides (a person comparing screens, or a script);
    ``persist`` makes durable, before the device learns of it, the version of the list
    that adds it, and once the device confirms it holds its history, that list;
    ``history(space)`` returns the space's history snapshot for this code and the number
    of messages it holds (shown on the new device as they arrive)."""
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
    blobs: dict[str, bytes] = {}
    counts: dict[str, int] = {}
    for s in bundle.enrolled:
        blobs[s.id], counts[s.id] = await history(s.id)
    sizes = {s: [_digest(b), len(b), counts[s]] for s, b in blobs.items()}
    keys = [
        [
            s.id,
            s.kind,
            s.name,
            s.epoch,
            [[e, k] for e, k in s.keys.items()],
            [[e, r] for e, r in bundle.rotations.get(s.id, {}).items()],
        ]
        for s in bundle.enrolled
    ]
    await conn.send(
        box.seal(
            encode_frame(
                "enroll",
                list=bundle.device_list,
                keys=pack(keys),
                sizes=pack(sizes),
                lease=bundle.lease,
            )
        )
    )
    total = sum(len(b) for b in blobs.values())
    starts = {
        s: min(have[s][1], len(b)) if s in have and have[s][0] == _digest(b) else 0
        for s, b in blobs.items()
    }
    done = sum(starts.values())
    messages_total = sum(counts.values())
    # the messages of a space count once its last byte is on the device
    messages_done = sum(counts[s] for s, b in blobs.items() if starts[s] >= len(b))
    sent = 0
    progress(done, total, messages_done, messages_total)
    for space_id, blob in blobs.items():
        for offset in range(starts[space_id], len(blob), CHUNK):
            piece = blob[offset : offset + CHUNK]
            await conn.send(box.seal(encode_frame("chunk", s=space_id, o=offset, d=piece)))
            sent += len(piece)
            if offset + len(piece) >= len(blob):
                messages_done += counts[space_id]
            progress(done + sent, total, messages_done, messages_total)
    _expect(await _receive(conn, box, code.device_id), "ldone")
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


def _parse_have(data: bytes) -> dict[str, tuple[bytes, int]]:
    value = unpack(data, what="history parts")
    if not isinstance(value, dict) or len(value) > 1024:
        raise WireError("history parts are malformed")
    out = {}
    for space_id, item in value.items():
        if not (
            isinstance(space_id, str)
            and len(space_id) <= MAX_ID
            and isinstance(item, list)
            and len(item) == 2
        ):
            raise WireError("history parts are malformed")
        digest, size = item
        if not (
            isinstance(digest, bytes)
            and len(digest) == 32
            and type(size) is int
            and 0 <= size < MAX_HISTORY
        ):
            raise WireError("history parts are malformed")
        out[space_id] = (digest, size)
    return out


# ---- new device ---------------------------------------------------------------------


class Parts:
    """History chunks a new device has received, kept in its store across attempts."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def have(self) -> dict[str, tuple[bytes, int]]:
        """For each space, the history hash and how many leading bytes are here."""
        out: dict[str, tuple[bytes, int]] = {}
        for name in self.store.names("link/part/"):
            _, _, space_id, digest_hex, offset = name.split("/")
            size = len(self.store.get(name) or b"")
            digest = bytes.fromhex(digest_hex)
            known = out.get(space_id)
            if known is None or known[0] != digest:
                out[space_id] = (digest, 0)
            if int(offset) == out[space_id][1]:
                out[space_id] = (digest, out[space_id][1] + size)
        return out

    def batch(self, space_id: str, digest: bytes, offset: int, data: bytes) -> WriteBatch:
        return WriteBatch(records={f"link/part/{space_id}/{digest.hex()}/{offset:012d}": data})

    def assemble(self, space_id: str, digest: bytes) -> bytes:
        prefix = f"link/part/{space_id}/{digest.hex()}/"
        return b"".join(self.store.get(n) or b"" for n in self.store.names(prefix))

    def clear(self) -> WriteBatch:
        return WriteBatch(deletes=set(self.store.names("link/part/")))


async def accept(
    keys: DeviceKeys,
    name: str,
    code: PairingCode,
    conn: Connection,
    parts: Parts,
    *,
    write: Callable[[WriteBatch], Awaitable[None]],
    show_check: Callable[[str], None],
    progress: Progress = no_progress,
) -> tuple[DeviceState, WriteBatch]:
    """New-device side: answer the primary, receive and keep the history, and return
    the device's state with the batch that makes it durable."""
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
    await conn.send(
        box.seal(
            encode_frame("lhave", have=pack({s: [d, n] for s, (d, n) in parts.have().items()}))
        )
    )

    # the person at the primary compares check codes before this comes
    enroll = _expect(await _receive(conn, box, "primary", CONFIRM_TIMEOUT), "enroll")
    device_list, spaces, sizes, rotations = _parse_enroll(enroll, keys, hello["pk"], hello["acct"])
    have = parts.have()
    total = sum(size for _, size, _ in sizes.values())
    received = {s: (have[s][1] if s in have and have[s][0] == sizes[s][0] else 0) for s in sizes}
    done = sum(received.values())
    counted = all(messages is not None for _, _, messages in sizes.values())
    messages_total = sum(m or 0 for _, _, m in sizes.values()) if counted else None

    def messages_done() -> int | None:
        """Messages of the spaces held whole: exact, never an estimate from bytes."""
        if not counted:
            return None
        return sum(m or 0 for s, (_, size, m) in sizes.items() if received[s] >= size)

    progress(done, total, messages_done(), messages_total)
    while any(received[s] < sizes[s][1] for s in sizes):
        chunk = _expect(await _receive(conn, box, "primary"), "chunk")
        space_id, offset, data = chunk["s"], chunk["o"], chunk["d"]
        if (
            space_id not in sizes
            or offset != received[space_id]
            or offset + len(data) > sizes[space_id][1]
        ):
            raise HandshakeFailed("history chunk out of order")
        await write(parts.batch(space_id, sizes[space_id][0], offset, data))
        received[space_id] += len(data)
        done += len(data)
        progress(done, total, messages_done(), messages_total)
    histories = {}
    for space_id, (digest, _size, _messages) in sizes.items():
        blob = parts.assemble(space_id, digest)
        if _digest(blob) != digest:
            raise HandshakeFailed(f"history of space {space_id} does not match its hash")
        histories[space_id] = blob
    bundle = Enrollment(
        lease=enroll["lease"],
        account_pk=device_list.account_pk,
        device_list=device_list.encode(),
        spaces=[s._replace(history=histories[s.id]) for s in spaces],
        rotations=rotations,
    )
    state, batch = DeviceState.from_enrollment(keys, name, bundle)
    await conn.send(box.seal(encode_frame("ldone", n=total)))
    return state, batch


def _parse_enroll(
    frame: dict[str, Any], keys: DeviceKeys, primary_pk: bytes, account_pk: bytes
) -> tuple[
    DeviceList,
    list[EnrolledSpace],
    dict[str, tuple[bytes, int, int | None]],
    dict[str, dict[int, bytes]],
]:
    """The list, spaces, history sizes (hash, bytes, messages) and rotations of an
    ``enroll`` frame, checked. Each space's history is empty here: it follows in chunks."""
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
    return device_list, spaces, sizes, rotations


def _parse_sizes(data: bytes) -> dict[str, tuple[bytes, int, int | None]]:
    """``enroll``'s sizes: for each space, its history's hash, its size in bytes and the
    number of messages it holds. A primary of an earlier release states no message
    count (``[hash, size]``): the count is then None, and the link goes on."""
    raw = unpack(data, what="sizes")
    if not isinstance(raw, dict):
        raise ValueError("sizes")
    sizes: dict[str, tuple[bytes, int, int | None]] = {}
    for s, item in raw.items():
        if not (isinstance(item, list) and len(item) in (2, 3)):
            raise ValueError("size entry")
        digest, n, *counted = item
        messages = counted[0] if counted else None
        if not (isinstance(s, str) and isinstance(digest, bytes) and len(digest) == 32):
            raise ValueError("size entry")
        if not (type(n) is int and 0 <= n < MAX_HISTORY):
            raise ValueError("size entry")
        if messages is not None and not (type(messages) is int and 0 <= messages < MAX_HISTORY):
            raise ValueError("size entry")
        sizes[s] = (digest, n, messages)
    return sizes


# ---- orchestration: what `p2p approve` and `p2p link` run ----------------------------


async def approve_code(
    state: DeviceState,
    code_text: str,
    *,
    read: Callable[[str], Awaitable[bytes | None]],
    write: Callable[[WriteBatch], Awaitable[None]],
    confirm: Callable[[str], Awaitable[bool]],
    now_s: int,
    connect: str | None = None,
    progress: Progress = no_progress,
) -> Linked:
    """Check a pairing code and link the device that shows it (primary side).

    Refuses, before dialing: a malformed, expired or used code, one that states a life
    longer than ``MAX_TTL_S``, one naming no local address (without ``connect``), a
    non-primary, and a fifth companion. ``read``/``write`` reach the primary's store;
    the history snapshot is cached there per code until the link completes, so a retry
    resumes.
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
    cached = f"link/blob/{code.code_id}/"
    counted = f"link/msgs/{code.code_id}/"

    async def history(space_id: str) -> tuple[bytes, int]:
        blob = await read(cached + space_id)
        count = await read(counted + space_id)
        if blob is None or count is None:
            # the count is taken with the snapshot, from the same replica, so it is the
            # number of messages these bytes hold, whatever arrives meanwhile
            replica = state.space(space_id).replica
            blob, messages = replica.snapshot(), replica.count()
            count = messages.to_bytes(8, "big")
            await write(WriteBatch(records={cached + space_id: blob, counted + space_id: count}))
        return blob, int.from_bytes(count, "big")

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
    await write(
        WriteBatch(
            records={f"link/used/{code.code_id}": b"1"},
            deletes={p + s for s in state.spaces for p in (cached, counted)},
        )
    )
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
        parts = Parts(store)
        transport = TcpTransport(listen)
        enrolled: list[DeviceState] = []
        attempt = trio.Lock()

        async def write(batch: WriteBatch) -> None:
            await trio.to_thread.run_sync(store.write, batch)

        async with trio.open_nursery() as nursery:

            async def handle(conn: Connection) -> None:
                async with attempt:
                    try:
                        if enrolled:
                            return
                        state, batch = await accept(
                            keys, name, code, conn, parts,
                            write=write, show_check=ui.check, progress=ui.progress,
                        )  # fmt: skip
                        await write(merge_batches([batch, parts.clear()]))
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
