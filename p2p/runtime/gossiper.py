"""The gossiper: our durable updates out to peers, and the lazy-push protocol's I/O.

It owns the outbox (our updates that are durable but not yet sent, per space), the
sans-I/O :class:`p2p.proto.gossip.Gossip` protocol, the links the protocol was told
about, and the one timer task that wakes the protocol. Rules it keeps:

- **Coalescing.** After the writer hands it updates, it yields once (so concurrent sends
  join the round), then merges each space's updates into as few payloads as fit in
  ``COALESCE_MAX`` and seals each payload once.
- **Who is told.** Each sealed envelope goes whole to every connected reader (the
  protocol's ``Authored``), and, with relays, into the mailbox of every reader with no
  open session. With nobody to tell, the updates are dropped from the outbox: state
  vectors catch those peers up later.
- **The protocol sees the sessions as they are.** Before each event it is told which
  sessions are open (a session that replaced another is a new link, so a wait on the
  old one dies) and, for the devices being refreshed, what each may read now.
- **Outputs become sends and one sleep.** Each output becomes a ``Session.send_*`` on
  that device's current session (none: dropped); timers become one task sleeping until
  the protocol's earliest deadline. The gossiper itself never waits on a peer.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from typing import Any, Final

import pycrdt
import trio

from p2p.proto.gossip import (
    KNOWN_DIGESTS,
    RECENT_BYTES,
    RECENT_ENVELOPES,
    WANT_DELAY,
    WANT_TASKS,
    WANT_TIMEOUT,
    Authored,
    Gossip,
    Have,
    Limits,
    PeerDown,
    PeerUp,
    SendEnvelope,
    SendHave,
    SendStateVector,
    SendWant,
    SetTimer,
    TimerFired,
    Want,
)
from p2p.proto.gossip import Event as GossipEvent
from p2p.proto.session import HaveIn, Output, Session, WantIn
from p2p.proto.ysplit import split_update
from p2p.runtime.peers import Peer, Peers
from p2p.state.device import DeviceState

COALESCE_MAX: Final = 1_000_000
"""Largest merged update sealed as one envelope: the same envelope goes to connected
peers and, through the relay, into the mailboxes of offline ones (1 MiB each)."""


_SEALS: Final[dict[type, Callable[[Session, Any], list[Output]]]] = {
    SendEnvelope: lambda s, out: s.send_envelope(out.envelope),
    SendHave: lambda s, out: s.send_have(out.space, out.digests),
    SendWant: lambda s, out: s.send_want(out.digests),
    SendStateVector: lambda s, out: s.send_state_vector(out.space),
}
"""The protocol's send outputs -> the session call that seals each."""


class Gossiper:
    """Sends our updates, and carries out the lazy-push protocol; see the module docstring."""

    def __init__(
        self,
        state: DeviceState,
        peers: Peers,
        nursery: trio.Nursery,
        *,
        mail: Callable[[str, bytes], None] | None,
        saved: Callable[[], None],
    ) -> None:
        self._state = state
        self._peers = peers
        self._nursery = nursery
        self._mail = mail
        """Posts an envelope to an offline reader's mailbox (None: no relays)."""
        self._saved = saved
        """Has the state's unsaved records written (sealing reserves counters)."""
        self._outbox: dict[str, list[bytes]] = {}
        self._wakeup = trio.Event()
        self._gossip = Gossip(
            Limits(
                RECENT_ENVELOPES, RECENT_BYTES, KNOWN_DIGESTS, WANT_DELAY, WANT_TIMEOUT, WANT_TASKS
            )
        )
        self._links: dict[str, tuple[Peer, int]] = {}
        """The sessions the protocol was told about, and the link number given to each."""
        self._link_ids = itertools.count(1)
        self._timer_set = trio.Event()
        self._sleeps_until = math.inf

    @property
    def pending(self) -> int:
        """Updates waiting to be sent."""
        return sum(len(v) for v in self._outbox.values())

    def push(self, space_id: str, update: bytes) -> None:
        """Send one of our updates (durable now) to whoever reads its space."""
        self._outbox.setdefault(space_id, []).append(update)
        self._wakeup.set()

    def on_have(self, peer: Peer, out: HaveIn) -> None:
        assert peer.device is not None
        self.handle(Have(peer.device, out.space, out.digests))

    def on_want(self, peer: Peer, out: WantIn) -> None:
        assert peer.device is not None
        self.handle(Want(peer.device, out.digests), refresh=(peer.device,))

    async def run(self) -> None:
        self._nursery.start_soon(self._timer)
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            await trio.lowlevel.checkpoint()  # let concurrent sends join this round
            outbox, self._outbox = self._outbox, {}
            for space_id, updates in outbox.items():
                readers = self._state.readers_of(space_id)
                connected = set(self._peers.devices())
                offline = sorted(readers - connected) if self._mail is not None else []
                if not readers & connected and not offline:
                    continue  # nobody to tell now; state vectors catch peers up later
                for payload in _coalesce(updates):
                    envelope = self._state.seal(space_id, payload)
                    self.handle(Authored(space_id, envelope), refresh=self._peers.devices())
                    for device in offline:
                        assert self._mail is not None
                        self._mail(device, envelope)
            self._saved()

    def handle(self, event: GossipEvent, *, refresh: Iterable[str] = ()) -> None:
        """Feed the gossip protocol one event and send what it asks for.

        The protocol first sees the sessions as they are now (a session that replaced
        another is a new link), and, for the devices in ``refresh``, what they may read
        now: access changes with grants and device lists, and it is judged when an
        envelope goes out."""
        now = trio.current_time()
        links = self._links
        connected = self._peers.connected()
        refresh = set(refresh)
        for device in [d for d in links if d not in connected]:
            del links[device]
            self._gossip.handle(PeerDown(device), now)
        for device, peer in connected.items():
            link = links.get(device)
            if link is None or link[0] is not peer:
                link = links[device] = (peer, next(self._link_ids))
            elif device not in refresh:
                continue
            spaces = frozenset(self._state.spaces_for(device))
            ours = device in self._state.device_list.ids
            self._gossip.handle(PeerUp(device, link[1], spaces, ours), now)
        for out in self._gossip.handle(event, now):
            if isinstance(out, SetTimer):
                if out.deadline < self._sleeps_until:
                    self._timer_set.set()
                continue
            seal = _SEALS[type(out)]
            self._peers.tell(out.device, lambda session: seal(session, out))  # noqa: B023

    async def _timer(self) -> None:
        """Wake the gossip protocol at its deadlines (one task for all its timers)."""
        while True:
            deadline = self._gossip.next_deadline()
            self._sleeps_until = math.inf if deadline is None else deadline
            with trio.move_on_at(self._sleeps_until):
                await self._timer_set.wait()
            self._timer_set = trio.Event()
            if deadline is not None and trio.current_time() >= deadline:
                self.handle(TimerFired())


def _coalesce(updates: list[bytes]) -> list[bytes]:
    """Merge consecutive updates into as few payloads as fit in one envelope (one
    writer round larger than that, many long messages sent at once, is cut in pieces)."""
    out: list[bytes] = []
    group: list[bytes] = []
    size = 0
    for u in (piece for update in updates for piece in split_update(update, COALESCE_MAX)):
        if group and size + len(u) > COALESCE_MAX:
            out.append(_merge(group))
            group, size = [], 0
        group.append(u)
        size += len(u)
    if group:
        out.append(_merge(group))
    return out


def _merge(updates: list[bytes]) -> bytes:
    return updates[0] if len(updates) == 1 else bytes(pycrdt.merge_updates(*updates))
