"""Lazy-push gossip across peers, sans-I/O: events and the time in, sends and timers out.

One :class:`Gossip` per device. It never touches a socket, a clock or a task: the caller
feeds it what happened (:meth:`Gossip.handle` with an event and the current time) and
carries out what it returns (send this envelope, ``have``, ``want`` or state vector to
that peer; wake me at this deadline). Same pattern as :class:`p2p.proto.session.Session`, which
it sits above, and as iroh-gossip's ``proto/plumtree.rs``: the caller owns the clock,
and a timer is an output, never a sleep. So the whole protocol can run in a simulation
on a virtual clock (``tests/test_gossip.py``).

The rules it keeps:

- **Authored** (we sealed an envelope): send it whole to every peer that may read its
  space. Its author reaches every reader it is connected to at once, so each device
  usually receives each envelope once, however dense the mesh.
- **Accepted** (an envelope from someone else applied): tell the other readers only its
  digest (``have``), never the one it came from nor its author. ``ours_only``: only
  our own devices (an envelope other accounts would refuse: a catch-up from one of our
  devices, holding other accounts' structs).
- **Have** (a peer holds envelopes): for the digests we neither hold nor asked for,
  wait ``WANT_DELAY`` (their author is usually sending them to us already), then ask
  that peer (``want``) for those still missing, if it is still the same connection.
  If ``WANT_TIMEOUT`` later any is still missing (the peer forgot it), stop waiting for
  them and ask that peer for the whole difference instead (a state vector). A wait
  ends as soon as all it asked for arrived. At most ``WANT_TASKS`` waits at once; a
  ``have`` past that is not waited on digest by digest: that peer is asked for the
  whole difference of the space instead, once, ``WANT_TIMEOUT`` later (a burst of
  envelopes from a device two hops away would otherwise be lost until a reconnect).
- **Want** (a peer asks): send each envelope we still hold of a space it may read.
- **Duplicate** (an envelope we already hold came again): remember its digest as held,
  so a ``have`` of it is never wanted.

Memory is bounded whatever peers send: the last ``RECENT_ENVELOPES`` envelopes (at most
``RECENT_BYTES``) to answer ``want``s, the last ``KNOWN_DIGESTS`` digests held,
``WANT_TASKS`` waits (each no larger than the ``have`` frame that caused it), and one
pending repair per connected peer and space it reads.

The caller tells it which peers are connected (:class:`PeerUp`, :class:`PeerDown`), what
each may read, and whether it is one of our own devices; a :class:`PeerUp` for a device
already up with the same ``link`` only updates what it may read, with another ``link``
it is a new connection replacing the old one (waits on the old one are dropped).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Final

from p2p.proto.session import digest

RECENT_ENVELOPES: Final = 1024
RECENT_BYTES: Final = 32 * 1024 * 1024
"""Envelopes (and their total bytes) kept to answer peers' ``want``s; older ones are
forgotten, and a peer that asks too late is caught up by state vectors instead."""
KNOWN_DIGESTS: Final = 65536
"""Digests of envelopes we hold, remembered so that a ``have`` of one is not wanted."""
WANT_DELAY: Final = 0.25
"""Seconds to wait after a ``have`` before asking for the envelope: its author sends it
to every peer it is connected to, so it is usually on its way already."""
WANT_TIMEOUT: Final = 5.0
"""Seconds a ``want`` may go unanswered (the peer forgot the envelope) before we ask
that peer for the whole difference instead (a state vector)."""
WANT_TASKS: Final = 256
"""Delayed ``want``s pending at once; past that, ``have``s are ignored (state vectors
repair what is missed)."""


@dataclass(frozen=True)
class Limits:
    """The bounds and delays of one :class:`Gossip` (the module's constants by default;
    a simulation shrinks them to make forgetting happen)."""

    recent_envelopes: int = RECENT_ENVELOPES
    recent_bytes: int = RECENT_BYTES
    known_digests: int = KNOWN_DIGESTS
    want_delay: float = WANT_DELAY
    want_timeout: float = WANT_TIMEOUT
    want_tasks: int = WANT_TASKS


# ---- inputs ------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerUp:
    """A session with ``device`` is open (``link`` names the connection), or, for the
    same ``link``, what it may read changed. ``ours``: one of our account's devices."""

    device: str
    link: int
    spaces: frozenset[str]
    ours: bool


@dataclass(frozen=True)
class PeerDown:
    """The session with ``device`` ended."""

    device: str


@dataclass(frozen=True)
class Authored:
    """We sealed ``envelope`` (of ``space``): push it whole to every reader."""

    space: str
    envelope: bytes


@dataclass(frozen=True)
class Accepted:
    """An envelope by ``author`` reached us from ``came_from`` and applied: announce it."""

    space: str
    envelope: bytes
    came_from: str
    author: str
    ours_only: bool = False


@dataclass(frozen=True)
class Have:
    """``device`` holds these envelopes of ``space``."""

    device: str
    space: str
    digests: list[bytes]


@dataclass(frozen=True)
class Want:
    """``device`` asks for these envelopes."""

    device: str
    digests: list[bytes]


@dataclass(frozen=True)
class Duplicate:
    """An envelope we already hold arrived again (from anyone)."""

    envelope: bytes


@dataclass(frozen=True)
class TimerFired:
    """A deadline from :class:`SetTimer` passed (early or repeated ones do no harm)."""


Event = PeerUp | PeerDown | Authored | Accepted | Have | Want | Duplicate | TimerFired


# ---- outputs -----------------------------------------------------------------------


@dataclass(frozen=True)
class SendEnvelope:
    device: str
    envelope: bytes


@dataclass(frozen=True)
class SendHave:
    device: str
    space: str
    digests: list[bytes]


@dataclass(frozen=True)
class SendWant:
    device: str
    digests: list[bytes]


@dataclass(frozen=True)
class SendStateVector:
    """Ask ``device`` for whatever of ``space`` we lack (the repair of a lost want)."""

    device: str
    space: str


@dataclass(frozen=True)
class SetTimer:
    """Feed :class:`TimerFired` once the time reaches ``deadline`` (also
    :meth:`Gossip.next_deadline`)."""

    deadline: float


Output = SendEnvelope | SendHave | SendWant | SendStateVector | SetTimer


@dataclass
class _Peer:
    link: int
    spaces: frozenset[str]
    ours: bool


@dataclass
class _Wait:
    """A ``have`` being waited on: first to ask (``asked`` False), then for the answer."""

    device: str
    link: int
    space: str
    digests: list[bytes]
    asked: bool = False
    done: bool = False
    """Over before its deadline (all it asked for arrived); its timer does nothing."""
    missing: set[bytes] = field(default_factory=set)
    """Once asked: the digests not received yet."""


@dataclass
class _Repair:
    """A state vector owed to ``device`` for ``space``: a ``have`` we had no room for."""

    device: str
    link: int
    space: str


class Gossip:
    """The lazy-push protocol of one device (see the module's docstring)."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self._peers: dict[str, _Peer] = {}
        self._recent: OrderedDict[bytes, tuple[str, bytes]] = OrderedDict()
        """Digest -> (space, envelope) of recent envelopes, to answer ``want``s."""
        self._recent_bytes = 0
        self._known: OrderedDict[bytes, None] = OrderedDict()
        """Digests of envelopes we hold (bounded): those are never wanted."""
        self._wanted: set[bytes] = set()
        """Digests of envelopes asked for and not yet received."""
        self._timers: list[tuple[float, int, _Wait | _Repair]] = []
        """A heap of (deadline, sequence, what is due)."""
        self._waiting = 0
        """Waits not over (at most ``want_tasks``)."""
        self._asked: dict[bytes, _Wait] = {}
        """Digest asked for -> its wait (a digest is asked for once at a time)."""
        self._repairs: set[tuple[str, str]] = set()
        """(device, space) of the pending repairs."""
        self._seq = 0

    # ---- queries -------------------------------------------------------------------

    @property
    def peers(self) -> list[str]:
        return list(self._peers)

    @property
    def pending_waits(self) -> int:
        return self._waiting

    @property
    def pending_repairs(self) -> int:
        return len(self._repairs)

    def next_deadline(self) -> float | None:
        """When :class:`TimerFired` is next due, or None when nothing waits."""
        return self._timers[0][0] if self._timers else None

    def holds(self, name: bytes) -> bool:
        """Whether we still know we hold the envelope with digest ``name``."""
        return name in self._known

    # ---- events --------------------------------------------------------------------

    def handle(self, event: Event, now: float) -> list[Output]:
        """Take one event at time ``now``; returns what to send and when to wake."""
        if isinstance(event, Authored):
            return self._on_authored(event)
        if isinstance(event, Accepted):
            return self._on_accepted(event)
        if isinstance(event, Have):
            return self._on_have(event, now)
        if isinstance(event, Want):
            return self._on_want(event)
        if isinstance(event, Duplicate):
            self._know(digest(event.envelope))
            return []
        if isinstance(event, TimerFired):
            return self._on_timer(now)
        if isinstance(event, PeerUp):
            self._peers[event.device] = _Peer(event.link, event.spaces, event.ours)
            return []
        self._peers.pop(event.device, None)
        return []

    def _on_authored(self, event: Authored) -> list[Output]:
        self._remember(event.space, event.envelope)
        return [
            SendEnvelope(device, event.envelope)
            for device, peer in self._peers.items()
            if event.space in peer.spaces
        ]

    def _on_accepted(self, event: Accepted) -> list[Output]:
        name = self._remember(event.space, event.envelope)
        return [
            SendHave(device, event.space, [name])
            for device, peer in self._peers.items()
            if device not in (event.came_from, event.author)
            and event.space in peer.spaces
            and (peer.ours or not event.ours_only)
        ]

    def _on_have(self, event: Have, now: float) -> list[Output]:
        missing = [d for d in event.digests if d not in self._known and d not in self._wanted]
        peer = self._peers.get(event.device)
        if not missing or peer is None:
            return []
        if self._waiting < self.limits.want_tasks:
            self._waiting += 1
            wait = _Wait(event.device, peer.link, event.space, missing)
            return [self._schedule(wait, now + self.limits.want_delay)]
        key = (event.device, event.space)
        if key in self._repairs or event.space not in peer.spaces:
            return []
        self._repairs.add(key)
        repair = _Repair(event.device, peer.link, event.space)
        return [self._schedule(repair, now + self.limits.want_timeout)]

    def _on_want(self, event: Want) -> list[Output]:
        peer = self._peers.get(event.device)
        readable = peer.spaces if peer is not None else frozenset()
        out: list[Output] = []
        for name in event.digests:
            held = self._recent.get(name)
            if held is not None and held[0] in readable:
                out.append(SendEnvelope(event.device, held[1]))
        return out

    def _on_timer(self, now: float) -> list[Output]:
        out: list[Output] = []
        while self._timers and self._timers[0][0] <= now:
            _, _, due = heapq.heappop(self._timers)
            peer = self._peers.get(due.device)
            same = peer is not None and peer.link == due.link
            if isinstance(due, _Repair):
                self._repairs.discard((due.device, due.space))
                if same:
                    out.append(SendStateVector(due.device, due.space))
                continue
            if due.done:
                continue
            if not due.asked:
                still = [d for d in due.digests if d not in self._known and d not in self._wanted]
                if not still or not same:
                    self._end(due)
                    continue
                self._wanted.update(still)
                out.append(SendWant(due.device, still))
                due.digests, due.asked, due.missing = still, True, set(still)
                self._asked.update(dict.fromkeys(still, due))
                out.append(self._schedule(due, now + self.limits.want_timeout))
                continue
            self._end(due)
            if any(d not in self._known for d in due.digests):
                self._wanted.difference_update(due.digests)
                if same:
                    out.append(SendStateVector(due.device, due.space))
        return out

    def _schedule(self, due: _Wait | _Repair, deadline: float) -> SetTimer:
        self._seq += 1
        heapq.heappush(self._timers, (deadline, self._seq, due))
        return SetTimer(deadline)

    def _end(self, wait: _Wait) -> None:
        """A wait is over: free its place (its timer, if still set, does nothing)."""
        wait.done = True
        self._waiting -= 1
        for name in wait.missing:
            if self._asked.get(name) is wait:
                del self._asked[name]
        wait.missing = set()
        timers = self._timers
        while timers and isinstance(timers[0][2], _Wait) and timers[0][2].done:
            heapq.heappop(timers)
        if len(timers) > 2 * (self._waiting + len(self._repairs)) + 16:
            # timers of waits over early: drop them, so the heap stays as bounded as
            # the waits themselves
            self._timers = [t for t in timers if not (isinstance(t[2], _Wait) and t[2].done)]
            heapq.heapify(self._timers)

    # ---- bounded memory ------------------------------------------------------------

    def _remember(self, space: str, envelope: bytes) -> bytes:
        """Keep an envelope we hold for ``want``s (bounded), and its digest as known;
        returns the digest."""
        name = digest(envelope)
        self._know(name)
        if name in self._recent or len(envelope) > self.limits.recent_bytes:
            return name
        self._recent[name] = (space, envelope)
        self._recent_bytes += len(envelope)
        while (
            len(self._recent) > self.limits.recent_envelopes
            or self._recent_bytes > self.limits.recent_bytes
        ):
            _, (_, old) = self._recent.popitem(last=False)
            self._recent_bytes -= len(old)
        return name

    def _know(self, name: bytes) -> None:
        """Remember (bounded) that we hold the envelope called ``name``."""
        self._wanted.discard(name)
        wait = self._asked.pop(name, None)
        if wait is not None:
            wait.missing.discard(name)
            if not wait.missing:
                self._end(wait)
        self._known[name] = None
        self._known.move_to_end(name)
        while len(self._known) > self.limits.known_digests:
            self._known.popitem(last=False)
