"""Two sans-I/O sessions wired back to back, their outputs carried out as the node does.

The one driver of in-memory sessions for tests and benchmarks (no trio, no sockets).
Each :class:`End` carries out its session's outputs through an
:class:`~p2p.proto.session.OutputTable`, the dispatch table the node's connections use
(:data:`END_OUTPUTS`, one row per output, as ``p2p.runtime.peers`` has), and does to its
``DeviceState`` what the node does with each output: follow a device list, ingest an
envelope, take a grant and ask for the space, keep a lease; and, like the node, it
closes the session when the peer sent something it refuses (a forged envelope, a bad
list or grant). It also records every output, so a test asserts on what each side saw.

A :class:`Pair` moves frames in flights (every frame in flight, both ways at once), so a
test counts round trips; it can rewrite, split, drop or duplicate frames on the way
(:attr:`Pair.rewrite`) or stop delivering to one side (:attr:`Pair.drop_to`). Every run
is bounded: a pair that never goes quiet fails the test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from p2p.errors import GrantFromNonMember, P2PError, ReplayDetected, RollbackRefused, UnknownKey
from p2p.proto.authority import EpochSplit, RotationUnproven
from p2p.proto.session import (
    Authenticated,
    Closed,
    DeviceListIn,
    DocumentWanted,
    EnvelopeIn,
    GrantIn,
    HaveIn,
    LeaseIn,
    LeaveRequested,
    MediaIn,
    Output,
    OutputTable,
    Session,
    SessionState,
    TypingIn,
    WantIn,
)
from p2p.state.device import DeviceState, Ingested

HARMLESS = (ReplayDetected, UnknownKey)
"""Refusals the node drops without closing: a duplicate over a second gossip path, an
envelope of a space it does not hold."""

GRANTS_KEPT_OPEN = (EpochSplit, RotationUnproven, GrantFromNonMember)
"""Grants the node refuses or defers without blaming the peer."""


@dataclass(eq=False)
class End:
    """One side: its state, its session, and everything its session passed up."""

    name: str
    state: DeviceState
    session: Session
    pair: Pair
    wall_ms: int = 0
    received: list[bytes] = field(default_factory=list)
    sent: list[bytes] = field(default_factory=list)
    authenticated: list[str] = field(default_factory=list)
    lists_in: list[bytes] = field(default_factory=list)
    list_errors: list[P2PError] = field(default_factory=list)
    grants_in: list[bytes] = field(default_factory=list)
    grant_errors: list[P2PError] = field(default_factory=list)
    leases_in: list[bytes] = field(default_factory=list)
    lease_errors: list[P2PError] = field(default_factory=list)
    envelopes_in: list[bytes] = field(default_factory=list)
    ingested: list[Ingested] = field(default_factory=list)
    ingest_errors: list[P2PError] = field(default_factory=list)
    haves_in: list[HaveIn] = field(default_factory=list)
    wants_in: list[WantIn] = field(default_factory=list)
    leaves: list[str] = field(default_factory=list)
    typing_in: list[TypingIn] = field(default_factory=list)
    media_in: list[MediaIn] = field(default_factory=list)
    documents_loaded: list[str] = field(default_factory=list)
    closed: list[Closed] = field(default_factory=list)

    @property
    def error(self) -> P2PError | None:
        """Why the session closed (None: a clean bye); it must have closed once."""
        assert len(self.closed) == 1, f"{self.name} closed {len(self.closed)} times"
        return self.closed[0].error

    @property
    def errors(self) -> list[P2PError]:
        """The errors the session closed with (a clean bye has none)."""
        return [c.error for c in self.closed if c.error is not None]

    def carry_out(self, outputs: list[Output]) -> None:
        END_OUTPUTS.carry_out(self, outputs)

    def refuse(self, exc: P2PError) -> None:
        """As the node does with input it refuses from a peer: close the session."""
        self.carry_out(self.session.close(exc))

    # ---- the rows of END_OUTPUTS ----------------------------------------------------

    def send(self, data: bytes) -> bool:
        self.sent.append(data)
        self.pair.post(self, data)
        return True

    def on_authenticated(self, out: Authenticated) -> None:
        self.authenticated.append(out.device)

    def on_device_list(self, out: DeviceListIn) -> None:
        self.lists_in.append(out.data)
        try:
            self.state.follow(out.data, trusted=False)
        except RollbackRefused:
            pass  # an older list through a slower path: ours is newer
        except P2PError as exc:
            self.list_errors.append(exc)
            self.refuse(exc)

    def on_envelope(self, out: EnvelopeIn) -> None:
        self.envelopes_in.append(out.data)
        try:
            self.ingested.append(self.state.ingest(out.data))
        except P2PError as exc:
            self.ingest_errors.append(exc)
            if not isinstance(exc, HARMLESS):
                self.refuse(exc)

    def on_grant(self, out: GrantIn) -> None:
        self.grants_in.append(out.data)
        try:
            space_id, news, _ = self.state.accept_grant(out.data)
        except P2PError as exc:
            self.grant_errors.append(exc)
            if not isinstance(exc, GRANTS_KEPT_OPEN):
                self.refuse(exc)
            return
        if news:  # a space we just joined: ask for its history
            self.carry_out(self.session.send_state_vector(space_id))

    def on_have(self, out: HaveIn) -> None:
        self.haves_in.append(out)

    def on_want(self, out: WantIn) -> None:
        self.wants_in.append(out)

    def on_lease(self, out: LeaseIn) -> None:
        self.leases_in.append(out.data)
        try:
            self.state.accept_lease(out.data, self.wall_ms)
        except P2PError as exc:
            self.lease_errors.append(exc)
            self.refuse(exc)

    def on_leave_requested(self, out: LeaveRequested) -> None:
        self.leaves.append(out.device)

    def on_typing(self, out: TypingIn) -> None:
        self.typing_in.append(out)

    def on_media(self, out: MediaIn) -> None:
        self.media_in.append(out)

    def on_document_wanted(self, out: DocumentWanted) -> None:
        """As the node does (there in a worker thread): answer from the store when it
        can, else load the document, then answer."""
        if self.state.answers_from_store(out.space):
            peer = self.session.peer
            start = self.state.first_needed(out.space, out.state_vector, peer)
            self.carry_out(self.session.answer_state_vector(out.space, out.state_vector, start))
            return
        self.documents_loaded.append(out.space)
        self.state.spaces.space(out.space).replica.load()
        self.carry_out(self.session.answer_state_vector(out.space, out.state_vector))

    def on_closed(self, out: Closed) -> None:
        self.closed.append(out)


END_OUTPUTS = OutputTable[End](End.send)
"""What an end does with each output of its session (the node's table: Peers.outputs)."""
END_OUTPUTS.on(Authenticated, End.on_authenticated)
END_OUTPUTS.on(DeviceListIn, End.on_device_list)
END_OUTPUTS.on(EnvelopeIn, End.on_envelope)
END_OUTPUTS.on(GrantIn, End.on_grant)
END_OUTPUTS.on(HaveIn, End.on_have)
END_OUTPUTS.on(WantIn, End.on_want)
END_OUTPUTS.on(LeaseIn, End.on_lease)
END_OUTPUTS.on(LeaveRequested, End.on_leave_requested)
END_OUTPUTS.on(TypingIn, End.on_typing)
END_OUTPUTS.on(MediaIn, End.on_media)
END_OUTPUTS.on(DocumentWanted, End.on_document_wanted)
END_OUTPUTS.on(Closed, End.on_closed)


Rewrite = Callable[[End, int, bytes], "bytes | list[bytes]"]
"""(destination, index of the frame among those it was sent, bytes) -> what is delivered
instead: other bytes, or a list of frames (none to drop it, two to duplicate it)."""


class Pair:
    """Sessions of ``a`` (the initiator) and ``b`` back to back."""

    def __init__(
        self,
        a: DeviceState,
        b: DeviceState,
        *,
        now: float = 0.0,
        wall_ms: int = 0,
        streams_catchups: bool = True,
    ) -> None:
        self.a = End("a", a, Session(local=a, initiator=True, now=now, wall_ms=wall_ms), self)
        self.b = End("b", b, Session(local=b, initiator=False, now=now, wall_ms=wall_ms), self)
        self.a.wall_ms = self.b.wall_ms = wall_ms
        self.in_flight: list[tuple[End, bytes]] = []
        self.rewrite: Rewrite | None = None
        self.drop_to: set[str] = set()
        self._offered = {"a": 0, "b": 0}
        self.streams_catchups = streams_catchups
        """Whether each flight streams every pending catch-up piece (False: the test pulls
        them one by one with ``next_catchup``, to cut a catch-up in the middle)."""

    @property
    def ends(self) -> tuple[End, End]:
        return self.a, self.b

    def other(self, end: End) -> End:
        return self.b if end is self.a else self.a

    def post(self, src: End, data: bytes) -> None:
        """A frame ``src`` sent: in flight to the other end, unless that end is cut off."""
        dst = self.other(src)
        if dst.name not in self.drop_to:
            self.in_flight.append((dst, data))

    def start(self) -> Pair:
        self.a.carry_out(self.a.session.start())
        self.b.carry_out(self.b.session.start())
        return self

    def deliver(self, dst: End, data: bytes, now: float = 0.0) -> None:
        frames: bytes | list[bytes] = data
        if self.rewrite is not None:
            frames = self.rewrite(dst, self._offered[dst.name], data)
        self._offered[dst.name] += 1
        for frame in [frames] if isinstance(frames, bytes) else frames:
            dst.received.append(frame)
            dst.carry_out(dst.session.receive(frame, now))

    def flight(self, now: float = 0.0) -> int:
        """Deliver every frame now in flight, both ways at once; return how many.

        A catch-up too large for one envelope then streams its remaining pieces, as the
        node's sync lane does while idle: they join the next flight, not one each, since
        the sender never waits for the peer between pieces."""
        batch, self.in_flight = self.in_flight, []
        for dst, data in batch:
            self.deliver(dst, data, now)
        for end in self.ends:
            while self.streams_catchups and end.session.catching_up:
                end.carry_out(end.session.next_catchup(now))
        return len(batch)

    def run(self, now: float = 0.0, limit: int = 50) -> int:
        """Flights until nothing is in flight; return how many it took."""
        flights = 0
        while self.in_flight:
            self.flight(now)
            flights += 1
            assert flights < limit, "the sessions never went quiet"
        return flights

    def tick(self, now: float) -> None:
        for end in self.ends:
            end.carry_out(end.session.tick(now))

    def connect(self) -> Pair:
        """Start, run the handshake to completion (two flights), check both are open."""
        self.start()
        assert self.flight() == 2  # hellos
        assert self.flight() == 2  # auths
        assert self.a.authenticated == [self.b.state.device_id]
        assert self.b.authenticated == [self.a.state.device_id]
        assert self.a.session.state is self.b.session.state is SessionState.OPEN
        return self
