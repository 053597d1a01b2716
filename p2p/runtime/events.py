"""The event hub: what the node tells the application, fanned out to subscribers.

Rules it keeps:

- A subscription starts when :meth:`EventHub.subscribe` is called, not when its reader
  starts iterating, so nothing between the two is lost.
- Every subscriber gets its own bounded channel (``EVENT_QUEUE``). A slow reader loses
  events (counted in :attr:`EventHub.dropped`) instead of making the node buffer without
  bound; a closed channel is an unsubscription.
- Observers inside the node (the media service) see every event first, synchronously,
  whether or not anyone subscribed.
- :meth:`EventHub.close` ends every subscription (the node closed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import trio

from p2p import events as ev

EVENT_QUEUE: Final = 1024
"""Events queued per subscriber before that subscriber loses events."""


class EventHub:
    """Fans each event out to the node's observers and the app's subscribers."""

    def __init__(self) -> None:
        self._subscribers: list[trio.MemorySendChannel[ev.Event]] = []
        self._observers: list[Callable[[ev.Event], None]] = []
        self.dropped = 0
        """Events a slow subscriber lost (its channel was full)."""

    def observe(self, observer: Callable[[ev.Event], None]) -> None:
        """Call ``observer`` with every event, before any subscriber gets it."""
        self._observers.append(observer)

    def subscribe(self) -> trio.MemoryReceiveChannel[ev.Event]:
        """A channel of events from this instant on, until the hub closes."""
        send, receive = trio.open_memory_channel[ev.Event](EVENT_QUEUE)
        self._subscribers.append(send)
        return receive

    def emit(self, event: ev.Event) -> None:
        for observer in self._observers:
            observer(event)
        for sub in list(self._subscribers):
            try:
                sub.send_nowait(event)
            except trio.WouldBlock:
                self.dropped += 1
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                self._subscribers.remove(sub)

    def close(self) -> None:
        for sub in self._subscribers:
            sub.close()
