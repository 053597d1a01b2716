"""Which chunk to ask which peer for: the fetch scheduler, sans-I/O (docs/media.md).

The media service tells a :class:`Fetcher` what it wants (chunk hashes, file by file),
which peers are connected, and what came back; the fetcher answers with the requests to
send. It never touches a socket, a clock or a file, so every rule below is tested with
plain calls:

- at most ``window`` chunks are outstanding per peer (a slow peer holds few, and the
  window bounds memory: peers x window x chunk size);
- files are fetched in the order they were wanted, chunk by chunk;
- a chunk is asked of one peer at a time; a peer that answers ``nohave``, or sends bytes
  that fail the hash, is not asked for that chunk again until :meth:`Fetcher.retry_lacking`
  (the service calls it now and then: peers fetch things too);
- a peer that goes away gives its outstanding chunks back to the pool.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

WINDOW: Final = 8
"""Chunks outstanding per peer."""


@dataclass
class Fetcher:
    """The fetch plan of one device; see the module docstring."""

    window: int = WINDOW
    _wanted: dict[bytes, None] = field(default_factory=dict)
    """Hashes still missing, in the order they were wanted (a dict keeps it)."""
    _asked: dict[bytes, str] = field(default_factory=dict)
    """Hash -> the peer it is outstanding at."""
    _out: dict[str, set[bytes]] = field(default_factory=dict)
    """Peer -> hashes outstanding there (connected peers only)."""
    _lacks: dict[bytes, set[str]] = field(default_factory=dict)
    """Hash -> peers that said they lack it, or served it wrong."""

    def want(self, hashes: list[bytes]) -> None:
        """Add chunks to fetch (ones already wanted keep their place)."""
        for h in hashes:
            self._wanted.setdefault(h, None)

    def forget(self, hashes: list[bytes]) -> None:
        """Stop fetching these (the file was evicted or dropped); answers are ignored."""
        for h in hashes:
            self._wanted.pop(h, None)
            self._lacks.pop(h, None)
            peer = self._asked.pop(h, None)
            if peer is not None:
                self._out[peer].discard(h)

    @property
    def missing(self) -> int:
        return len(self._wanted)

    def is_wanted(self, h: bytes) -> bool:
        return h in self._wanted

    def peer_up(self, peer: str) -> None:
        self._out.setdefault(peer, set())

    def peer_down(self, peer: str) -> None:
        """The peer went away: what it held outstanding goes back to the pool."""
        for h in self._out.pop(peer, set()):
            self._asked.pop(h, None)

    def plan(self, eligible: Callable[[str, bytes], bool] | None = None) -> dict[str, list[bytes]]:
        """Requests to send now: peer -> hashes to ``want`` (each window filled), each
        asked only of a peer ``eligible`` for it (a member device of a chat holding it:
        other accounts' devices are not asked for chunks of chats they are not in)."""
        plan: dict[str, list[bytes]] = {}
        room = {p: self.window - len(hs) for p, hs in self._out.items() if len(hs) < self.window}
        if not room:
            return plan
        for h in self._wanted:
            if h in self._asked:
                continue
            lacking = self._lacks.get(h, set())
            candidates = [
                p
                for p in room
                if room[p] > 0 and p not in lacking and (eligible is None or eligible(p, h))
            ]
            if not candidates:
                if not any(room.values()):
                    break
                continue
            peer = max(candidates, key=lambda p: (room[p], p))  # least loaded first
            room[peer] -= 1
            self._asked[h] = peer
            self._out[peer].add(h)
            plan.setdefault(peer, []).append(h)
        return plan

    def expects(self, peer: str, h: bytes) -> bool:
        """Whether ``h`` is outstanding at ``peer`` (anything else is unasked for)."""
        return self._asked.get(h) == peer

    def received(self, peer: str, h: bytes) -> None:
        """A chunk from ``peer`` checked and stored: done with it."""
        self._settle(peer, h)
        self._wanted.pop(h, None)
        self._lacks.pop(h, None)

    def lacking(self, peer: str, h: bytes) -> None:
        """``peer`` said ``nohave``, or sent bytes that failed the hash: ask elsewhere."""
        self._settle(peer, h)
        if h in self._wanted:
            self._lacks.setdefault(h, set()).add(peer)

    def retry_lacking(self) -> None:
        """Peers may have fetched what they lacked: ask them again from now on."""
        self._lacks.clear()

    def _settle(self, peer: str, h: bytes) -> None:
        if self._asked.get(h) == peer:
            del self._asked[h]
        self._out.get(peer, set()).discard(h)
