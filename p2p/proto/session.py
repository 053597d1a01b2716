"""The sync protocol between two devices, sans-I/O: frames in, frames and events out.

One :class:`Session` per connected peer. It never touches a socket, a clock or a file:
the caller feeds it received frames (:meth:`Session.receive`), local envelopes to send
(:meth:`Session.send_envelope`) and the time (:meth:`Session.tick`), and carries out what
it returns (:class:`Send` these bytes, :class:`Closed` this connection, or pass an
event up). Same pattern as h11 and iroh-gossip.

States and the rules they keep::

    HELLO   both sides send ``hello`` at once: an ephemeral X25519 key, a nonce, and
            tags over both keyed by discovery keys: the account's (one per epoch held,
            so a device that missed a key rotation still meets), then the newest two
            epochs of each conversation shared with other accounts. Nothing else: who
            we are stays hidden. On the peer's hello: check the tag (a stranger is
            refused here, having learnt nothing), derive the session keys, send
            ``ident`` boxed (device id, signed device list, lease, signature over the
            transcript).
    AUTH    on the peer's ``ident``: check its list (our account's, or one we follow:
            signed by that account's key, never older than ours), its device, its lease
            and its signature  -> OPEN; then send a ``grant`` of each conversation the
            peer reads (its keys sealed to the peer), and one ``sv`` per shared space.
    OPEN    every frame is boxed (XChaCha20-Poly1305 with the direction's session key and
            an implicit counter nonce, so a dropped, replayed or reordered frame fails).
            ``sv`` -> reply ``env`` with exactly what the peer lacks (nothing if level);
            ``env`` -> :class:`EnvelopeIn` for the caller to verify and apply;
            ``have`` -> :class:`HaveIn` (the peer holds these envelopes; ask with
            :meth:`Session.send_want` for those we lack), ``want`` -> :class:`WantIn`
            (send those envelopes, if we still hold them);
            ``list`` -> :class:`DeviceListIn` (a newer device list, gossiped);
            ``lease`` -> :class:`LeaseIn` (the primary renews a companion's lease, which
            the primary sends right after authenticating a companion);
            ``grant`` -> :class:`GrantIn` (keys of a space, see ``p2p.proto.grants``);
            ``ping`` -> ``pong``; ``bye`` -> closed;
            ``ask``/``blob``/``nohave`` -> :class:`MediaIn` (attachment chunks, p2p.media;
            the caller sends ours with :meth:`Session.send_media`, on a lower-priority lane).
    CLOSED  everything is ignored.

Gossip is plumtree-like: the author of an envelope sends it whole to every peer
(:meth:`Session.send_envelope`); a device that received it from someone else only
announces its digest (:meth:`Session.send_have`), and a peer that lacks it asks for it.
Each device thus receives each envelope about once, however dense the mesh; state
vectors still repair anything gossip missed. A ``have`` about a space the peer may not
read is ignored, as an ``sv`` is; a ``want`` for an envelope we no longer hold gets
nothing.

Any error (bad frame, bad signature, unknown device, frame in the wrong state, a
``have``/``want`` whose digests are empty or not whole) closes the session with a typed
error; the caller closes the connection. Each side sends its state
vectors once it has authenticated the peer, and answers the peer's at once: two replicas
are level one round trip after the handshake.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Final, Generic, Protocol, TypeVar, get_args

from nacl.public import PrivateKey

from p2p.errors import (
    DecryptionFailed,
    DeviceListError,
    FrameTooLarge,
    HandshakeFailed,
    NotOurAccount,
    P2PError,
    ProtocolError,
    WireError,
)
from p2p.proto.box import Box, shared_secret
from p2p.proto.envelope import MAX_PAYLOAD
from p2p.proto.identity import DeviceKeys, DeviceList, account_tag, check_lease, verify
from p2p.proto.model import EMPTY_UPDATE, covers
from p2p.proto.wire import (
    DIGEST_SIZE,
    MAX_DIGESTS,
    MAX_FRAME,
    MAX_HANDSHAKE_FRAME,
    decode_frame,
    encode_frame,
)
from p2p.proto.ysplit import split_update

DOMAIN_HANDSHAKE: Final = b"p2p/handshake/v1\x00"
HANDSHAKE_TIMEOUT: Final = 10.0
PING_INTERVAL: Final = 15.0
IDLE_TIMEOUT: Final = 45.0
MAX_TAGS: Final = 64
"""Discovery keys a hello carries tags for (and a receiver checks): our account's
epochs, then those of conversations shared with other accounts."""
PIECE: Final = MAX_PAYLOAD
"""Largest update one catch-up envelope carries; a larger diff goes as several."""
MEDIA_FRAMES: Final = frozenset({"ask", "blob", "nohave"})
"""Frames of the media transfer (p2p.media), passed up as :class:`MediaIn`."""


def digest(envelope: bytes) -> bytes:
    """The name of a sealed envelope in ``have``/``want`` frames (BLAKE2b, 16 bytes)."""
    return hashlib.blake2b(envelope, digest_size=DIGEST_SIZE, person=b"p2p-env-digest").digest()


def _split_digests(kind: str, data: bytes) -> list[bytes]:
    if not data or len(data) % DIGEST_SIZE:
        raise ProtocolError(f"{kind} frame: {len(data)} bytes are not whole digests")
    return [data[i : i + DIGEST_SIZE] for i in range(0, len(data), DIGEST_SIZE)]


class LocalDevice(Protocol):
    """What a session needs from the device it speaks for (``core.DeviceState``)."""

    keys: DeviceKeys
    device_list: DeviceList
    lease: bytes

    def discovery_keys(self) -> list[bytes]: ...

    def list_of(self, account_id: str) -> DeviceList | None: ...

    def account_key_of(self, account_id: str) -> bytes | None: ...

    def grants_for(self, device_id: str, device_list: DeviceList | None = None) -> list[bytes]: ...

    @property
    def is_primary(self) -> bool: ...

    def issue_lease(self, device_id: str, now_ms: int | None) -> bytes: ...

    def spaces_for(self, device_id: str, device_list: DeviceList | None = None) -> list[str]: ...

    def state_vector(self, space_id: str) -> bytes: ...

    def has_document(self, space_id: str) -> bool: ...

    def diff(self, space_id: str, state_vector: bytes, peer: str | None = None) -> bytes: ...

    def stored_pieces(
        self, space_id: str, state_vector: bytes, peer: str | None, start: int, limit: int
    ) -> Iterator[bytes]: ...

    def seal(self, space_id: str, payload: bytes) -> bytes: ...


# ---- outputs -----------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    """Write these bytes to the connection, as one frame."""

    data: bytes


@dataclass(frozen=True)
class Authenticated:
    """The peer proved it is ``device`` of our account; sync starts."""

    device: str


@dataclass(frozen=True)
class DeviceListIn:
    """The peer presented a device list newer than ours (verified by the account key)."""

    data: bytes


@dataclass(frozen=True)
class EnvelopeIn:
    """A sealed envelope from the peer, to open and apply (``DeviceState.ingest``)."""

    data: bytes


@dataclass(frozen=True)
class GrantIn:
    """The peer granted us a space's keys (``DeviceState.accept_grant``)."""

    data: bytes


@dataclass(frozen=True)
class HaveIn:
    """The peer holds these envelopes of ``space`` (ask for missing ones: send_want)."""

    space: str
    digests: list[bytes]


@dataclass(frozen=True)
class WantIn:
    """The peer asks for these envelopes (send the ones we hold: send_envelope)."""

    digests: list[bytes]


@dataclass(frozen=True)
class LeaseIn:
    """The primary renewed our lease; keep it (``DeviceState.accept_lease``)."""

    data: bytes


@dataclass(frozen=True)
class LeaveRequested:
    """The peer (a companion) asks to be unlinked (``p2p unlink --self``)."""

    device: str


@dataclass(frozen=True)
class TypingIn:
    """The peer's person started (``typing``) or stopped typing in a space we share
    with it: awareness, passed on to the app and never stored."""

    space: str
    typing: bool


@dataclass(frozen=True)
class MediaIn:
    """A media frame (``ask``, ``blob``, ``nohave``) for the node's media service."""

    kind: str
    fields: dict[str, Any]


@dataclass(frozen=True)
class DocumentWanted:
    """The peer lacks some of ``space``, whose document is not loaded: load it (off the
    caller's thread), then :meth:`Session.answer_state_vector` with ``state_vector``.
    A session never loads a long history itself; a level peer never needs one loaded."""

    space: str
    state_vector: bytes


@dataclass(frozen=True)
class Closed:
    """The session is over; close the connection. ``error`` is None for a clean bye."""

    error: P2PError | None


Output = (
    Send
    | Authenticated
    | DeviceListIn
    | EnvelopeIn
    | GrantIn
    | HaveIn
    | WantIn
    | LeaseIn
    | LeaveRequested
    | TypingIn
    | MediaIn
    | DocumentWanted
    | Closed
)


HolderT = TypeVar("HolderT")
OutputT = TypeVar("OutputT")


class OutputTable(Generic[HolderT]):
    """What a session's holder does with each kind of output: the one dispatch table.

    The node fills one for its live connections (``p2p.runtime.peers``, the holder a
    connection), the tests' driver of back-to-back sessions one for in-memory ones
    (``p2p.testing.sessions``, the holder one end); both carry outputs out through
    :meth:`carry_out`, so both keep the same order, and :meth:`missing` says which kinds
    of output a table would drop (a new output is a new row in both, or a test fails).
    """

    def __init__(self, send: Callable[[HolderT, bytes], bool]) -> None:
        """``send``: write one frame for the holder; False when its connection is gone."""
        self._send = send
        self._rows: dict[type, tuple[Callable[[HolderT, Any], None], Callable[[HolderT], bool]]]
        self._rows = {}

    def on(
        self,
        kind: type[OutputT],
        handler: Callable[[HolderT, OutputT], None],
        *,
        when: Callable[[HolderT], bool] = lambda holder: True,
    ) -> None:
        """Carry out outputs of type ``kind`` with ``handler``, for holders ``when``
        accepts (the node: only the session registered for its device)."""
        self._rows[kind] = (handler, when)

    def missing(self) -> frozenset[type]:
        """The kinds of output this table would drop."""
        return frozenset(get_args(Output)) - {Send, *self._rows}

    def carry_out(self, holder: HolderT, outputs: list[Output]) -> bool:
        """Do what the session asked; False once it closed or its connection is gone.

        Frames go out first, in the order the session sealed them: handling the other
        outputs may make the session seal more (a grant answered with a state vector, a
        refusal with a bye), and its box numbers frames, so those must queue behind the
        ones already sealed."""
        alive = True
        for frame in outputs:
            if isinstance(frame, Send):
                alive = self._send(holder, frame.data) and alive
        for out in outputs:
            if isinstance(out, Send):
                continue
            if isinstance(out, Closed):
                alive = False
            row = self._rows.get(type(out))
            if row is not None and row[1](holder):
                row[0](holder, out)
        return alive


class SessionState(Enum):
    HELLO = "hello"
    AUTH = "auth"
    OPEN = "open"
    CLOSED = "closed"


@dataclass
class Stats:
    """Counters a test or a benchmark reads: frames and bytes each way, sync rounds."""

    frames_out: int = 0
    frames_in: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    catchup_bytes_out: int = 0
    """Bytes of envelopes sent in answer to the peer's state vectors."""
    sv_in: int = 0
    envelopes_in: int = 0
    haves_in: int = 0
    wants_in: int = 0
    media_bytes_out: int = 0
    """Bytes of media frames (chunks and requests) sent, boxed."""
    media_bytes_in: int = 0
    """Bytes of media frames received, boxed."""


@dataclass
class Session:
    """One peer's protocol state; see the module docstring."""

    local: LocalDevice
    initiator: bool
    now: float
    wall_ms: int = 0
    """Wall-clock time at the handshake, to judge leases (0: leases never run out)."""
    state: SessionState = SessionState.HELLO
    peer: str | None = None
    stats: Stats = field(default_factory=Stats)
    _eph: PrivateKey = field(default_factory=PrivateKey.generate)
    _nonce: bytes = field(default_factory=lambda: os.urandom(32))
    _hello_out: bytes = b""
    _hello_in: bytes = b""
    _box: Box | None = None
    _started: float = 0.0
    _last_in: float = 0.0
    _last_out: float = 0.0
    _in_size: int = 0
    _catchup: list[tuple[str, Iterator[bytes]]] = field(default_factory=list)
    """Large catch-ups in progress: (space, the pieces not yet sent)."""

    def start(self) -> list[Output]:
        """Begin: our hello goes out at once (both sides do this)."""
        self._started = self._last_in = self._last_out = self.now
        eph = bytes(self._eph.public_key)
        # one tag per epoch we hold: a device that missed a rotation checks the old one,
        # an up-to-date one the new one (and takes old ones from lagging devices)
        keys = self.local.discovery_keys()[:MAX_TAGS]
        tags = b"".join(account_tag(key, eph + self._nonce) for key in keys)
        self._hello_out = encode_frame("hello", eph=eph, nonce=self._nonce, tags=tags)
        return [self._send_raw(self._hello_out)]

    # ---- input ---------------------------------------------------------------------

    @property
    def frame_limit(self) -> int:
        """Largest frame the next one may be: :data:`~p2p.proto.wire.MAX_HANDSHAKE_FRAME` until
        the peer is authenticated (a stranger's bytes are bounded before they are read;
        the caller passes this to ``Connection.receive``), :data:`~p2p.proto.wire.MAX_FRAME`
        after."""
        return MAX_FRAME if self.state is SessionState.OPEN else MAX_HANDSHAKE_FRAME

    def receive(self, data: bytes, now: float) -> list[Output]:
        """Handle one frame from the peer."""
        if self.state is SessionState.CLOSED:
            return []
        self.now = self._last_in = now
        self.stats.frames_in += 1
        self.stats.bytes_in += len(data)
        self._in_size = len(data)
        try:
            if len(data) > self.frame_limit:
                raise FrameTooLarge(len(data), self.frame_limit)
            if self.state is SessionState.HELLO:
                return self._on_hello(data)
            if self.state is SessionState.AUTH:
                return self._on_ident(self._unbox_or_reject(data))
            return self._on_open(self._unbox(data))
        except P2PError as exc:
            return self._fail(exc)

    def send_envelope(self, data: bytes) -> list[Output]:
        """Forward a sealed envelope (ours or gossiped) to the peer, if open."""
        if self.state is not SessionState.OPEN:
            return []
        return [self._send_boxed(encode_frame("env", e=data))]

    def send_have(self, space_id: str, digests: list[bytes]) -> list[Output]:
        """Announce envelopes of a space we hold (gossip we did not author), if open."""
        return self._send_digests("have", digests, s=space_id)

    def send_want(self, digests: list[bytes]) -> list[Output]:
        """Ask the peer for envelopes it announced, if open."""
        return self._send_digests("want", digests)

    def _send_digests(self, kind: str, digests: list[bytes], **fields: Any) -> list[Output]:
        if self.state is not SessionState.OPEN:
            return []
        return [
            self._send_boxed(encode_frame(kind, h=b"".join(digests[i : i + MAX_DIGESTS]), **fields))
            for i in range(0, len(digests), MAX_DIGESTS)
        ]

    def send_device_list(self, data: bytes) -> list[Output]:
        """Gossip a newer signed device list to the peer, if open."""
        if self.state is not SessionState.OPEN:
            return []
        return [self._send_boxed(encode_frame("list", l=data))]

    def send_grant(self, data: bytes) -> list[Output]:
        """Give the peer a space's keys (a grant sealed to it), if open."""
        if self.state is not SessionState.OPEN:
            return []
        return [self._send_boxed(encode_frame("grant", g=data))]

    def send_state_vector(self, space_id: str) -> list[Output]:
        """Ask the peer for whatever of a space we lack (it answers with an ``env``), if
        open and the peer reads the space: the repair when a ``want`` went unanswered,
        and the first sync of a space we just joined."""
        if self.state is not SessionState.OPEN or self.peer is None:
            return []
        if space_id not in self.local.spaces_for(self.peer):
            return []
        sv = self.local.state_vector(space_id)
        return [self._send_boxed(encode_frame("sv", s=space_id, sv=sv))]

    def send_leave(self) -> list[Output]:
        """Ask the peer (our primary) to unlink this device, if open."""
        if self.state is not SessionState.OPEN:
            return []
        return [self._send_boxed(encode_frame("leave", n=0))]

    def send_typing(self, space_id: str, typing: bool) -> list[Output]:
        """Tell the peer we are (or stopped) typing in a space, if open and it reads it."""
        if self.state is not SessionState.OPEN or self.peer is None:
            return []
        if space_id not in self.local.spaces_for(self.peer):
            return []
        return [self._send_boxed(encode_frame("typing", s=space_id, on=int(typing)))]

    def send_media(self, kind: str, **fields: Any) -> list[Output]:
        """Send a media frame (``ask``, ``blob``, ``nohave``) to the peer, if open."""
        if kind not in MEDIA_FRAMES:
            raise ProtocolError(f"{kind} is not a media frame")
        if self.state is not SessionState.OPEN:
            return []
        frame = self._send_boxed(encode_frame(kind, **fields))
        self.stats.media_bytes_out += len(frame.data)
        return [frame]

    def tick(self, now: float) -> list[Output]:
        """Let time pass: handshake timeout, keep-alive pings, idle timeout."""
        if self.state is SessionState.CLOSED:
            return []
        self.now = now
        if self.state is not SessionState.OPEN:
            if now >= self._started + HANDSHAKE_TIMEOUT:
                return self._fail(HandshakeFailed("handshake timed out"))
            return []
        if now >= self._last_in + IDLE_TIMEOUT:
            return self._fail(ProtocolError("peer silent past the idle timeout"))
        if now >= self._last_out + PING_INTERVAL:
            return [self._send_boxed(encode_frame("ping", n=int(now)))]
        return []

    def next_deadline(self) -> float:
        """When :meth:`tick` next has something to do."""
        if self.state is not SessionState.OPEN:
            return self._started + HANDSHAKE_TIMEOUT
        return min(self._last_out + PING_INTERVAL, self._last_in + IDLE_TIMEOUT)

    def close(self, error: P2PError | None = None) -> list[Output]:
        """End the session from our side (a bye when open, then Closed)."""
        if self.state is SessionState.CLOSED:
            return []
        out: list[Output] = []
        if self.state is SessionState.OPEN:
            code = type(error).__name__ if error else "bye"
            out.append(self._send_boxed(encode_frame("bye", code=code)))
        self.state = SessionState.CLOSED
        out.append(Closed(error))
        return out

    # ---- handshake -----------------------------------------------------------------

    def _on_hello(self, data: bytes) -> list[Output]:
        frame = decode_frame(data)
        if frame["t"] == "reject":
            raise HandshakeFailed(f"peer refused us: {frame['code']}")
        if frame["t"] != "hello":
            raise HandshakeFailed(f"expected hello, got {frame['t']}")
        # Only a device holding our account's discovery key (current or past epoch) gets
        # to see who we are: a stranger learns nothing but that we refuse it.
        proof = frame["eph"] + frame["nonce"]
        theirs = [frame["tags"][i : i + 32] for i in range(0, len(frame["tags"]), 32)]
        ours = [account_tag(key, proof) for key in self.local.discovery_keys()[:MAX_TAGS]]
        if not any(hmac.compare_digest(a, b) for a in ours for b in theirs):
            raise NotOurAccount("the peer does not belong to this account")
        self._hello_in = data
        shared = shared_secret(bytes(self._eph), frame["eph"])
        self._box = Box(shared, self._transcript(), initiator=self.initiator)
        role = b"I" if self.initiator else b"R"
        ident = encode_frame(
            "ident",
            dev=self.local.keys.device_id,
            list=self.local.device_list.encode(),
            lease=self.local.lease,
            sig=self.local.keys.sign(DOMAIN_HANDSHAKE, role + self._transcript()),
        )
        self.state = SessionState.AUTH
        return [self._send_boxed(ident)]

    def _transcript(self) -> bytes:
        first, second = (
            (self._hello_out, self._hello_in)
            if self.initiator
            else (self._hello_in, self._hello_out)
        )
        return hashlib.blake2b(
            len(first).to_bytes(4, "big") + first + second, digest_size=64
        ).digest()

    def _on_ident(self, frame: dict[str, Any]) -> list[Output]:
        if frame["t"] in ("reject", "bye"):  # hellos cross: the refusal follows ours
            raise HandshakeFailed(f"peer refused us: {frame['code']}")
        if frame["t"] != "ident":
            raise HandshakeFailed(f"expected ident, got {frame['t']}")
        out: list[Output] = []
        try:
            theirs = DeviceList.decode(frame["list"])
        except WireError as exc:
            raise DeviceListError(f"peer's device list is malformed: {exc}") from exc
        # our own account, or one we follow (a contact, a conversation's member), or a
        # contact whose code we took and whose list this first meeting brings
        ours = self.local.list_of(theirs.account_id)
        account_pk = self.local.account_key_of(theirs.account_id)
        if account_pk is None:
            raise NotOurAccount("the peer's account is neither ours nor one we follow")
        own_account = ours is self.local.device_list
        theirs.verify(account_pk)  # DeviceListError: forged, or not the code's account
        forked = (
            ours is not None
            and theirs.version == ours.version
            and theirs.signature != ours.signature
        )
        if forked:
            raise DeviceListError(f"two different device lists claim version {theirs.version}")
        newest = theirs if ours is None or theirs.version > ours.version else ours
        if newest is theirs:
            out.append(DeviceListIn(frame["list"]))
        peer = frame["dev"]
        entry = newest.entry(peer)  # UnknownDevice / RemovedDevice
        if peer == self.local.keys.device_id:
            raise HandshakeFailed("connected to ourselves")
        if entry.role == "companion" and not (self.local.is_primary and own_account):
            # companions are accepted only while their primary vouches for them; our
            # primary itself always answers ours, to renew
            check_lease(frame["lease"], account_pk, peer, self.wall_ms)
        role = b"R" if self.initiator else b"I"
        try:
            verify(entry.sign_pk, DOMAIN_HANDSHAKE, role + self._transcript(), frame["sig"])
        except P2PError as exc:
            raise HandshakeFailed(f"device {peer} failed to prove its key") from exc
        self.peer = peer
        self.state = SessionState.OPEN
        out.append(Authenticated(peer))
        if self.local.is_primary and own_account and entry.role == "companion":
            lease = self.local.issue_lease(peer, self.wall_ms or None)
            out.append(self._send_boxed(encode_frame("lease", l=lease)))
        # grants before state vectors: a space the peer learns of here is known to it
        # by the time our state vector for it arrives
        for grant in self.local.grants_for(peer, newest):
            out.append(self._send_boxed(encode_frame("grant", g=grant)))
        for space_id in self.local.spaces_for(peer, newest):
            sv = self.local.state_vector(space_id)
            out.append(self._send_boxed(encode_frame("sv", s=space_id, sv=sv)))
        return out

    # ---- open session --------------------------------------------------------------

    def _on_open(self, frame: dict[str, Any]) -> list[Output]:
        handler = _OPEN_FRAMES.get(frame["t"])
        if handler is None:
            raise ProtocolError(f"unexpected {frame['t']} frame in an open session")
        return handler(self, frame)

    # ---- frames of an open session (dispatched by _OPEN_FRAMES) ---------------------

    def _open_env(self, frame: dict[str, Any]) -> list[Output]:
        self.stats.envelopes_in += 1
        return [EnvelopeIn(frame["e"])]

    def _open_sv(self, frame: dict[str, Any]) -> list[Output]:
        self.stats.sv_in += 1
        return self._on_state_vector(frame["s"], frame["sv"])

    def _open_have(self, frame: dict[str, Any]) -> list[Output]:
        self.stats.haves_in += 1
        digests = _split_digests("have", frame["h"])
        if not self._shares(frame["s"]):
            return []  # a space we don't share with this device: say nothing
        return [HaveIn(frame["s"], digests)]

    def _open_want(self, frame: dict[str, Any]) -> list[Output]:
        self.stats.wants_in += 1
        return [WantIn(_split_digests("want", frame["h"]))]

    def _open_list(self, frame: dict[str, Any]) -> list[Output]:
        return [DeviceListIn(frame["l"])]

    def _open_lease(self, frame: dict[str, Any]) -> list[Output]:
        return [LeaseIn(frame["l"])]

    def _open_grant(self, frame: dict[str, Any]) -> list[Output]:
        return [GrantIn(frame["g"])]

    def _open_leave(self, frame: dict[str, Any]) -> list[Output]:
        assert self.peer is not None
        return [LeaveRequested(self.peer)]

    def _open_typing(self, frame: dict[str, Any]) -> list[Output]:
        if not self._shares(frame["s"]):
            return []  # a space we don't share with this device: say nothing
        return [TypingIn(frame["s"], bool(frame["on"]))]

    def _open_media(self, frame: dict[str, Any]) -> list[Output]:
        self.stats.media_bytes_in += self._in_size
        return [MediaIn(frame["t"], frame)]

    def _open_ping(self, frame: dict[str, Any]) -> list[Output]:
        return [self._send_boxed(encode_frame("pong", n=frame["n"]))]

    def _open_pong(self, frame: dict[str, Any]) -> list[Output]:
        return []

    def _open_bye(self, frame: dict[str, Any]) -> list[Output]:
        self.state = SessionState.CLOSED
        return [Closed(None)]

    def _open_reject(self, frame: dict[str, Any]) -> list[Output]:
        # we had accepted the peer's ident; it refused ours
        raise HandshakeFailed(f"peer refused us: {frame['code']}")

    def _shares(self, space_id: str) -> bool:
        """Whether the peer reads ``space_id`` (frames about other spaces get no answer)."""
        assert self.peer is not None
        return space_id in self.local.spaces_for(self.peer)

    def _on_state_vector(self, space_id: str, sv: bytes, start: int | None = None) -> list[Output]:
        if not self._shares(space_id):
            return []  # a space we don't share with this device: say nothing about it
        # a newer vector for a space being caught up supersedes the older answer
        self._catchup = [(s, p) for s, p in self._catchup if s != space_id]
        if covers(sv, self.local.state_vector(space_id)):
            return []  # the peer already holds everything we have
        if start is not None:  # from the store, from that seq on, a stored update at a time
            pieces = self.local.stored_pieces(space_id, sv, self.peer, start, PIECE)
        elif not self.local.has_document(space_id):
            return [DocumentWanted(space_id, sv)]
        else:
            missing = self.local.diff(space_id, sv, self.peer)
            if missing == EMPTY_UPDATE:
                return []
            pieces = split_update(missing, PIECE)
            del missing  # the generator holds it; nothing else should
        first = next(pieces, None)
        if first is None:
            return []
        out: list[Output] = [self._send_piece(space_id, first)]
        self._catchup.append((space_id, pieces))
        return out

    def answer_state_vector(
        self, space_id: str, sv: bytes, start: int | None = None
    ) -> list[Output]:
        """Answer a state vector put off by :class:`DocumentWanted`: once the document
        is loaded, or (``start``) from the store, from that seq on, without it (see
        ``DeviceState.first_needed``). Nothing if the session ended meanwhile."""
        if self.state is not SessionState.OPEN:
            return []
        try:
            return self._on_state_vector(space_id, sv, start)
        except P2PError as exc:
            return self._fail(exc)

    @property
    def catching_up(self) -> bool:
        """Whether pieces of a large catch-up wait for :meth:`next_catchup`."""
        return bool(self._catchup)

    def next_catchup(self, now: float) -> list[Output]:
        """The next piece of a catch-up too large for one envelope, sealed and boxed now.

        The first piece goes out in answer to the state vector (a small gap is one
        envelope, as before); the caller pulls the rest one frame at a time when its
        sync lane is idle, so a history of any size is never held as frames in memory,
        and each piece takes the box's number after every frame already queued. Each
        piece is an update of its own: the peer applies and stores them as they come,
        so a cut catch-up resumes from the peer's state vector next time."""
        if self.state is not SessionState.OPEN:
            self._catchup = []
            return []
        self.now = now
        try:
            while self._catchup:
                space_id, pieces = self._catchup[0]
                piece = next(pieces, None)
                if piece is not None:
                    return [self._send_piece(space_id, piece)]
                self._catchup.pop(0)
        except P2PError as exc:  # a piece our own envelope refuses: nothing to send it in
            self._catchup = []
            return self._fail(exc)
        return []

    def _send_piece(self, space_id: str, piece: bytes) -> Send:
        frame = self._send_boxed(encode_frame("env", e=self.local.seal(space_id, piece)))
        self.stats.catchup_bytes_out += len(frame.data)
        return frame

    # ---- framing -------------------------------------------------------------------

    def _send_raw(self, data: bytes) -> Send:
        self._last_out = self.now
        self.stats.frames_out += 1
        self.stats.bytes_out += len(data)
        return Send(data)

    def _send_boxed(self, inner: bytes) -> Send:
        assert self._box is not None
        return self._send_raw(self._box.seal(inner))

    def _unbox(self, data: bytes) -> dict[str, Any]:
        assert self._box is not None
        return decode_frame(self._box.open(data, who=str(self.peer)))

    def _unbox_or_reject(self, data: bytes) -> dict[str, Any]:
        """The peer's first boxed frame, or the clear reject of a peer that refused our
        hello before it could derive the box (hellos cross)."""
        try:
            return self._unbox(data)
        except DecryptionFailed:
            try:
                frame = decode_frame(data)
            except WireError:
                frame = {}
            if frame.get("t") == "reject":
                raise HandshakeFailed(f"peer refused us: {frame['code']}") from None
            raise

    def _fail(self, error: P2PError) -> list[Output]:
        out: list[Output] = []
        if self.state is SessionState.HELLO:
            out.append(self._send_raw(encode_frame("reject", code=type(error).__name__)))
        elif self.state is SessionState.AUTH:  # the peer has our hello: it reads boxed frames now
            out.append(self._send_boxed(encode_frame("reject", code=type(error).__name__)))
        elif self.state is SessionState.OPEN:
            out.append(self._send_boxed(encode_frame("bye", code=type(error).__name__)))
        self.state = SessionState.CLOSED
        out.append(Closed(error))
        return out


_OPEN_FRAMES: Final[dict[str, Callable[[Session, dict[str, Any]], list[Output]]]] = {
    "env": Session._open_env,
    "sv": Session._open_sv,
    "have": Session._open_have,
    "want": Session._open_want,
    "list": Session._open_list,
    "lease": Session._open_lease,
    "grant": Session._open_grant,
    "leave": Session._open_leave,
    "typing": Session._open_typing,
    "ping": Session._open_ping,
    "pong": Session._open_pong,
    "bye": Session._open_bye,
    "reject": Session._open_reject,
    **{kind: Session._open_media for kind in MEDIA_FRAMES},
}
"""What an open session does with each kind of frame (anything else is a ProtocolError)."""
