"""Typing and presence: ephemeral awareness, sent to connected readers, never stored.

It owns when we last said we type in each chat, who types now (with when that
expires), and when each device's last "typing" frame was acted on. Rules it keeps:

- **Sending.** A "typing" goes out at most once per ``TYPING_REFRESH`` per chat (the app
  may call on every keystroke); a "stopped" goes out at once, and only after a
  "typing". Each goes to every connected device; its session sends it only to those
  that read the chat.
- **Receiving.** A "typing" is shown for ``TYPING_TTL`` without a refresh, so a lost
  "stopped" costs seconds; frames from one device and chat are acted on at most once per
  ``TYPING_IN_MIN``. A device whose session ends stops typing.
- **Events.** ``Typing`` is emitted when a device starts and when it stops (a "stopped"
  frame, an expiry or its session ending), never on a refresh.
- **Presence** (:meth:`Awareness.presence`) is read, not kept: online when a session is
  up or a relay says so, last seen from the ``seen/<device>`` records.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Final

import trio

from p2p import events as ev
from p2p.proto.session import TypingIn
from p2p.runtime.peers import Peer, Peers
from p2p.runtime.views import DevicePresence
from p2p.state.device import DeviceState
from p2p.storage.base import Store

TYPING_TTL: Final = 6.0
"""Seconds a "typing" stays shown without a refresh (a sender refreshes every
TYPING_REFRESH while the person types), so a lost "stopped" frame costs seconds."""
TYPING_REFRESH: Final = 3.0
"""Least interval between two "typing" frames we send for one chat: ``set_typing`` may
be called on every keystroke."""
TYPING_IN_MIN: Final = 1.0
"""Least interval between two "typing" frames we act on per device and chat: a peer
that sends more is not shown more often."""


class Awareness:
    """Typing in and out, and presence; see the module docstring."""

    def __init__(
        self,
        state: DeviceState,
        store: Store,
        peers: Peers,
        nursery: trio.Nursery,
        *,
        emit: Callable[[ev.Event], None],
        relayed: Callable[[], set[str]],
        names: Callable[[], dict[str, str]],
    ) -> None:
        self._state = state
        self._store = store
        self._peers = peers
        self._nursery = nursery
        self._emit = emit
        self._relayed = relayed
        self._names = names
        self._sent: dict[str, float] = {}
        """Space -> when we last told peers we type in it (TYPING_REFRESH)."""
        self._typing: dict[tuple[str, str], float] = {}
        """(space, device) typing now -> when that expires (TYPING_TTL)."""
        self._heard: dict[tuple[str, str], float] = {}
        """(space, device) -> when its last "typing" frame was acted on (TYPING_IN_MIN)."""

    def set_typing(self, space_id: str, typing: bool) -> None:
        """Tell the chat's readers we type (or stopped), rate-limited (see above)."""
        now = trio.current_time()
        if typing:
            if now - self._sent.get(space_id, -math.inf) < TYPING_REFRESH:
                return
            self._sent[space_id] = now
        elif self._sent.pop(space_id, None) is None:
            return  # we never said we were typing
        for device in self._peers.devices():
            self._peers.tell(device, lambda s: s.send_typing(space_id, typing))

    def typing(self, space_id: str) -> list[str]:
        """Devices typing in a chat right now."""
        return sorted(d for s, d in self._typing if s == space_id)

    def on_typing(self, peer: Peer, typing_in: TypingIn) -> None:
        assert peer.device is not None
        key = (typing_in.space, peer.device)
        now = trio.current_time()
        if not typing_in.typing:
            self._stop(key)
            return
        if now - self._heard.get(key, -math.inf) < TYPING_IN_MIN:
            return  # more often than anyone types: not shown more often
        self._heard[key] = now
        started = key not in self._typing
        self._typing[key] = now + TYPING_TTL
        if started:
            self._emit(ev.Typing(chat=typing_in.space, device=peer.device, typing=True))
            self._nursery.start_soon(self._expires, key)

    def peer_gone(self, device: str) -> None:
        """A device's session ended: it types no more."""
        for key in [k for k in self._typing if k[1] == device]:
            self._stop(key)

    def _stop(self, key: tuple[str, str]) -> None:
        self._heard.pop(key, None)
        if self._typing.pop(key, None) is not None:
            self._emit(ev.Typing(chat=key[0], device=key[1], typing=False))

    async def _expires(self, key: tuple[str, str]) -> None:
        """End a "typing" that was not refreshed in time (one task per typing device)."""
        while (deadline := self._typing.get(key)) is not None:
            if trio.current_time() >= deadline:
                self._stop(key)
                return
            await trio.sleep_until(deadline)

    def presence(self) -> list[DevicePresence]:
        """Online and last seen, per device of ours and of the accounts we follow."""
        relayed = self._relayed()
        names = self._names()
        rows = []
        state = self._state
        lists = [(state.account_id, state.device_list), *sorted(state.accounts.items())]
        for account, dl in lists:
            for d in dl.devices:
                if d.device_id == state.device_id:
                    continue
                seen = self._store.get(f"seen/{d.device_id}")
                rows.append(
                    DevicePresence(
                        device=d.device_id,
                        account=account,
                        name=names.get(d.device_id, ""),
                        device_name=d.name,
                        online=d.device_id in self._peers or d.device_id in relayed,
                        last_seen_ms=int(seen) if seen else None,
                    )
                )
        return rows
