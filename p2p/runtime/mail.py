"""Relay mail: what we leave for offline devices and what they left for us.

It owns the node's relay clients (one per relay id) and the count of posts in flight.
Rules it keeps:

- **Posting never blocks the node.** Each post runs in the background and tries each
  relay in turn until one takes it. At most ``MAIL_POSTS`` run at once; past that, and
  when every relay refuses, the mail is dropped with a log line (state vectors catch the
  reader up at the next session).
- **Acknowledged once durable.** Mail from a relay is acknowledged (so deleted there)
  only after what it carried is in our store; a duplicate, or an envelope under a key we
  lack, is acknowledged quietly; anything else is refused (``InputRejected``, with the
  relay URL as ``remote``) and acknowledged too.
- **One watch list.** :meth:`Mail.update_watch` tells every relay to watch the devices
  we now follow (the clients read the list from the state); every change of device
  lists, contacts or members calls it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import trio

from p2p import events as ev
from p2p.errors import P2PError, ReplayDetected, UnknownKey
from p2p.proto.envelope import envelope_space
from p2p.proto.grants import is_grant
from p2p.state.device import DeviceState, Ingested
from p2p.transport.relay import RelayClient

log = logging.getLogger("p2p.runtime.node")  # one logger for all of the node's lines

MAIL_POSTS: Final = 256
"""Mailbox posts in flight at once; past that, offline peers catch up by state vector."""


class Mail:
    """The node's relays, as mailboxes; see the module docstring."""

    def __init__(
        self,
        state: DeviceState,
        relays: Sequence[RelayClient],
        nursery: trio.Nursery,
        *,
        emit: Callable[[ev.Event], None],
        loaded: Callable[[str], Awaitable[bool]],
        learnt: Callable[[str], Awaitable[bool]],
        aside: Callable[[str, bytes], Ingested | None],
        grant_in: Callable[[bytes], trio.Event | None],
        accepted: Callable[[Ingested, bytes, str], trio.Event],
    ) -> None:
        self._state = state
        self.relays = list(relays)
        self._nursery = nursery
        self._emit = emit
        self._loaded = loaded
        """Loads a space's document by id (``Writer.load_by_id``)."""
        self._learnt = learnt
        """Reads a space's key chains from its history, if it can (``Writer.learn_chains``)."""
        self._aside = aside
        """Applies an envelope without its space's document if it can (``Writer.ingest_aside``)."""
        self._grant_in = grant_in
        self._accepted = accepted
        self._posting = 0

    def __bool__(self) -> bool:
        """Whether the node has any relay (else nothing can be posted)."""
        return bool(self.relays)

    def urls(self) -> tuple[str, ...]:
        return tuple(r.url for r in self.relays)

    def online(self) -> set[str]:
        """Devices some relay says are connected to it now."""
        return set().union(*(r.online for r in self.relays))

    def update_watch(self) -> None:
        """Have every relay watch the devices we follow now."""
        for relay in self.relays:
            relay.update_watch()

    def post(self, device: str, data: bytes) -> None:
        """Leave an envelope or a grant in an offline device's relay mailbox (in the
        background)."""
        if self._posting >= MAIL_POSTS:
            log.debug("mail to %s dropped: %d posts in flight", device, self._posting)
            return
        self._posting += 1

        async def post() -> None:
            try:
                for relay in self.relays:
                    try:
                        await relay.post(device, data)
                        return
                    except P2PError as exc:
                        log.info("relay %s refused mail to %s: %s", relay.url, device, exc)
            finally:
                self._posting -= 1

        self._nursery.start_soon(post)

    async def drain(self, relay: RelayClient) -> None:
        """Apply what offline peers left for us, acknowledging each once it is durable."""
        async for mail in relay.mail():
            if is_grant(mail.data):
                durable = self._grant_in(mail.data)
                if durable is not None:
                    await durable.wait()
                with contextlib.suppress(P2PError):
                    await mail.ack()
                continue
            space_id = envelope_space(mail.data)
            try:
                ingested = self._aside(space_id, mail.data) if space_id is not None else None
                if ingested is None and space_id is not None and await self._learnt(space_id):
                    ingested = self._aside(space_id, mail.data)  # by the key chains
                if ingested is None:
                    if space_id is not None:
                        await self._loaded(space_id)  # applying needs the document
                    ingested = self._state.ingest(mail.data)
            except (ReplayDetected, UnknownKey):
                pass  # already here by another path, or a space we do not hold
            except P2PError as exc:
                log.warning("refused mail from %s: %s", mail.sender, exc)
                self._emit(
                    ev.InputRejected(
                        remote=relay.url,
                        device=mail.sender,
                        error=type(exc).__name__,
                        detail=str(exc),
                    )
                )
            else:
                await self._accepted(ingested, mail.data, relay.url).wait()
            with contextlib.suppress(P2PError):
                await mail.ack()
