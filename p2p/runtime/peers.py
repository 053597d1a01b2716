"""Connections: dialing, accepting, running a session per connection, and the table that
carries out what each session returns.

It owns the registry of authenticated sessions (one per device), the dial loops (one per
address, with where each address was found), the discovery channel, the count of
connections still in their handshake, and the traffic of sessions already closed.
Rules it keeps:

- **One connection per device pair.** When a second connection to a device
  authenticates, both ends keep the same one (:func:`p2p.proto.peering.keep_new`: a
  direct path beats a relayed one, else a redial in the same direction replaces the
  stale one, else the connection dialed by the smaller id wins). The loser is closed
  with a clean ``bye``; its dial loop waits until the winner ends before it redials.
- **Frames in order.** What a session seals is queued in the order it sealed it, before
  any other output of the same call is handled (handling one may seal more).
- **Two lanes.** A connection's pump writes queued sync frames first; only when none
  waits does it take the next piece of a large catch-up, then a media frame.
- **Bounded.** ``SEND_QUEUE`` frames per peer (a slower peer is disconnected and caught
  up by state vectors later); ``MAX_HANDSHAKES`` accepted connections mid-handshake.
- **Backoff.** A failed dial, or a session that never authenticated, doubles the wait
  before the next dial (``BACKOFF_MIN`` to ``BACKOFF_MAX``, jittered); a session that
  authenticated is redialed quickly. A removed device dials nobody.
- **No history loads for a session.** State vectors are answered from what the
  replica knows without its document; only a peer that lacks something makes the
  space's document load (:class:`~p2p.proto.session.DocumentWanted`, in a worker
  thread), and the answer goes out once it has.
- **Dispatch is a table** (:meth:`Peers.on`): session output type -> handler. The
  subsystems that act on sessions' outputs register there (the node wires them); a
  handler registered ``current_only`` only hears from the session registered for its
  device, never from a losing duplicate.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, TypeVar

import trio

from p2p import events as ev
from p2p.discovery.base import Discovery, Found, Source
from p2p.errors import NodeError, P2PError
from p2p.proto.peering import Link, keep_new
from p2p.proto.session import (
    Authenticated,
    Closed,
    DocumentWanted,
    Output,
    OutputTable,
    Send,
    Session,
    SessionState,
)
from p2p.state.device import DeviceState
from p2p.storage.base import WriteBatch
from p2p.transport.base import Connection, ConnectionClosed, TransportError
from p2p.transport.base import Transport as TransportT
from p2p.transport.relay import is_relay_address

log = logging.getLogger("p2p.runtime.node")  # one logger for all of the node's lines

SEND_QUEUE: Final = 1024
"""Frames queued per peer; a peer that falls this far behind is disconnected (and
caught up by state vectors when it reconnects) instead of growing our memory."""
MAX_HANDSHAKES: Final = 64
"""Connections allowed to be mid-handshake at once; more are closed on arrival."""
BACKOFF_MIN: Final = 0.2
BACKOFF_MAX: Final = 30.0

OutputT = TypeVar("OutputT")


@dataclass(frozen=True)
class Ended:
    """How a connection's session ended."""

    authenticated: bool
    duplicate_of: str | None


@dataclass
class Peer:
    """One connection's session, its queue of sealed frames and its pump's alarm."""

    session: Session
    queue: trio.MemorySendChannel[bytes]
    remote: str
    since: float
    wake: trio.Event
    """Set when the pump has something to write: a sync frame, or media (p2p.media)."""

    @property
    def device(self) -> str | None:
        """The peer's device, once its session authenticated."""
        return self.session.peer


@dataclass(frozen=True)
class Connected:
    """A device with an authenticated session right now."""

    device: str
    remote: str
    """The address of the connection (``relay:...`` through a relay)."""
    found_via: str
    """Where its address was found ('static', 'mdns', 'relay', 'contact'), or 'incoming'."""
    since: float
    """trio time when the session authenticated."""


class Peers:
    """Every connection of the node; see the module docstring."""

    def __init__(
        self,
        state: DeviceState,
        nursery: trio.Nursery,
        *,
        transport: TransportT | None,
        wall_ms: Callable[[], int],
        removed: Callable[[], bool],
        load: Callable[[str], Awaitable[bool]],
        learn_vectors: Callable[[], Awaitable[None]],
        backpressure: Callable[[], Awaitable[None]],
        queue_write: Callable[[WriteBatch], object],
        emit: Callable[[ev.Event], None],
        media_out: Callable[[str], tuple[str, dict[str, bytes]] | None],
    ) -> None:
        self._state = state
        self._nursery = nursery
        self._transport = transport
        self._wall_ms = wall_ms
        self._removed = removed
        self._load = load
        """Loads a space's document by id, off the trio thread (``Writer.load_by_id``)."""
        self._learn_vectors = learn_vectors
        """Makes every state vector known without documents (``Writer.learn_vectors``)."""
        self._backpressure = backpressure
        self._queue_write = queue_write
        self._emit = emit
        self._media_out = media_out
        self._peers: dict[str, Peer] = {}
        self._changed = trio.Event()
        self._handshaking = 0
        """Connections that have not finished the handshake (bounded: MAX_HANDSHAKES)."""
        self._closed_stats = {"bytes_out": 0, "bytes_in": 0, "frames_out": 0, "frames_in": 0}
        self._found_send, self._found_receive = trio.open_memory_channel[Found](64)
        self._dialing: dict[str, str] = {}
        """Address -> where it was found ('static', 'mdns', ...), one dial loop each."""
        self.outputs = OutputTable[Peer](self._queue_frame)
        """The dispatch table of session outputs (``p2p.proto.session.OutputTable``)."""
        self.outputs.on(Authenticated, self._on_authenticated)
        self.outputs.on(Closed, self._on_closed)
        self.outputs.on(DocumentWanted, self._on_document_wanted)
        self._up: list[Callable[[Peer], None]] = []
        self._down: list[Callable[[str], None]] = []

    # ---- wiring --------------------------------------------------------------------

    def on(
        self,
        output: type[OutputT],
        handler: Callable[[Peer, OutputT], None],
        *,
        current_only: bool = False,
    ) -> None:
        """Carry out session outputs of type ``output`` with ``handler``; with
        ``current_only``, only those of the session registered for its device."""
        if current_only:
            self.outputs.on(output, handler, when=self.is_current)
        else:
            self.outputs.on(output, handler)

    def on_up(self, hook: Callable[[Peer], None]) -> None:
        """Call ``hook`` when a session is registered for its device."""
        self._up.append(hook)

    def on_down(self, hook: Callable[[str], None]) -> None:
        """Call ``hook`` with the device when its registered session ends."""
        self._down.append(hook)

    # ---- who is connected ----------------------------------------------------------

    def get(self, device: str) -> Peer | None:
        return self._peers.get(device)

    def __contains__(self, device: object) -> bool:
        return device in self._peers

    def devices(self) -> list[str]:
        """Devices with an authenticated session right now, sorted."""
        return sorted(self._peers)

    def connected(self) -> dict[str, Peer]:
        """Device -> its registered session, a copy (safe to iterate while acting)."""
        return dict(self._peers)

    def is_current(self, peer: Peer) -> bool:
        """Whether ``peer`` is the session registered for its device."""
        return peer.device is not None and self._peers.get(peer.device) is peer

    def describe(self) -> list[Connected]:
        return [
            Connected(d, p.remote, self._dialing.get(p.remote, "incoming"), p.since)
            for d, p in sorted(self._peers.items())
        ]

    def traffic(self) -> dict[str, int]:
        """Bytes and frames sent and received over all sessions so far."""
        live = [p.session.stats for p in self._peers.values()]
        closed = self._closed_stats
        return {key: total + sum(getattr(s, key) for s in live) for key, total in closed.items()}

    # ---- acting on sessions --------------------------------------------------------

    def carry_out(self, peer: Peer, outputs: list[Output]) -> bool:
        """Do what the session asked (through :attr:`outputs`); False once it closed."""
        alive = self.outputs.carry_out(peer, outputs)
        return alive and peer.session.state is not SessionState.CLOSED

    def _queue_frame(self, peer: Peer, data: bytes) -> bool:
        try:
            peer.queue.send_nowait(data)
            peer.wake.set()
        except trio.WouldBlock:
            log.warning("peer %s is too slow; disconnecting it", peer.device)
            self.close(peer, NodeError("peer too slow"))
            return False
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        return True

    def _on_document_wanted(self, peer: Peer, out: DocumentWanted) -> None:
        """The peer lacks some of a space whose document is not loaded: load it in a
        worker thread, then answer (the session goes on meanwhile)."""

        async def load_then_answer() -> None:
            if self._state.answers_from_store(out.space):
                try:  # past what the peer holds, in a worker: then stream from the store
                    start = await trio.to_thread.run_sync(
                        self._state.first_needed, out.space, out.state_vector, peer.device
                    )
                except P2PError:
                    start = None  # (a malformed vector: the session refuses it below)
                if start is not None:
                    answer = peer.session.answer_state_vector(out.space, out.state_vector, start)
                    self.carry_out(peer, answer)
                    return
            if await self._load(out.space):
                self.carry_out(peer, peer.session.answer_state_vector(out.space, out.state_vector))

        self._nursery.start_soon(load_then_answer)

    def close(self, peer: Peer, error: P2PError | None = None) -> None:
        """End a session (a ``bye``, with ``error`` when it misbehaved)."""
        self.carry_out(peer, peer.session.close(error))

    def tell(self, device: str, make: Callable[[Session], list[Output]]) -> bool:
        """Have ``device``'s session seal something (``make``) and send it; False when
        no session with it is up."""
        peer = self._peers.get(device)
        if peer is None:
            return False
        self.carry_out(peer, make(peer.session))
        return True

    def wake(self, device: str) -> None:
        """The media lane has something for ``device``: wake its pump."""
        peer = self._peers.get(device)
        if peer is not None:
            peer.wake.set()

    # ---- dialing and discovery -----------------------------------------------------

    async def connect(self, address: str, *, source: Source = "static") -> None:
        """Keep a connection to ``address`` (dial, redial with backoff) until the node closes."""
        if self._transport is None:
            raise NodeError("this node has no transport to dial with")
        if address in self._dialing or address == self._transport.address:
            return
        self._dialing[address] = source
        self._nursery.start_soon(self._dial_loop, address)

    async def add_discovery(self, adapter: Discovery) -> None:
        await self._nursery.start(adapter.run, self.found_channel())

    def found_channel(self) -> trio.MemorySendChannel[Found]:
        if self._transport is None:
            raise NodeError("discovery needs a transport to dial with")
        return self._found_send.clone()

    async def merge_found(self) -> None:
        """Dial every new address any discovery adapter reports."""
        async with self._found_receive:
            async for found in self._found_receive:
                if self._removed():
                    continue
                if found.device is not None and (
                    found.device in self._peers or found.device == self._state.device_id
                ):
                    continue
                log.info("found %s via %s (%s)", found.address, found.source, found.device)
                await self.connect(found.address, source=found.source)

    async def _dial_loop(self, address: str) -> None:
        assert self._transport is not None
        backoff = BACKOFF_MIN
        while not self._removed():  # a removed device is refused everywhere: stop asking
            try:
                conn = await self._transport.dial(address)
            except TransportError as exc:
                log.debug("dial %s failed: %s", address, exc)
                await trio.sleep(backoff * random.uniform(0.5, 1.5))
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            ended = await self._run_connection(conn, initiator=True)
            if ended.duplicate_of is not None:
                # another connection to this device won; redial only once it is gone
                while ended.duplicate_of in self._peers:
                    await self._changed.wait()
            # a peer that refused us (removed, stranger, garbage) is retried ever more
            # slowly; one that talked to us gets a quick redial
            backoff = BACKOFF_MIN if ended.authenticated else min(backoff * 2, BACKOFF_MAX)
            await trio.sleep(backoff * random.uniform(0.5, 1.5))
        log.info("not dialing %s: this device was unlinked", address)

    async def accept(self, conn: Connection) -> None:
        """Run an accepted connection (the transport's handler)."""
        if self._handshaking >= MAX_HANDSHAKES:
            log.warning("refused %s: %d handshakes already under way", conn.remote, MAX_HANDSHAKES)
            await conn.aclose()
            return
        await self._run_connection(conn, initiator=False)

    # ---- one connection ------------------------------------------------------------

    async def _run_connection(self, conn: Connection, *, initiator: bool) -> Ended:
        """Drive one session over ``conn`` until it ends; say how it went."""
        await self._learn_vectors()  # a session states them all: never a load for that
        session = Session(
            self._state, initiator=initiator, now=trio.current_time(), wall_ms=self._wall_ms()
        )
        send_q, recv_q = trio.open_memory_channel[bytes](SEND_QUEUE)
        peer = Peer(session, send_q, conn.remote, trio.current_time(), trio.Event())
        duplicate: str | None = None
        self._handshaking += 1
        handshaking = True
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump_out, conn, recv_q, nursery.cancel_scope, peer)
                if not self.carry_out(peer, session.start()):
                    return Ended(authenticated=False, duplicate_of=None)
                while session.state is not SessionState.CLOSED:
                    if handshaking and session.state is SessionState.OPEN:
                        self._handshaking -= 1
                        handshaking = False
                    with trio.move_on_at(session.next_deadline()) as timer:
                        try:
                            data = await conn.receive(session.frame_limit)
                        except P2PError as exc:  # broken connection, or an oversized frame
                            self.close(peer, exc)
                            break
                        self.carry_out(peer, session.receive(data, trio.current_time()))
                    if timer.cancelled_caught:
                        self.carry_out(peer, session.tick(trio.current_time()))
                    if session.state is SessionState.OPEN and not self.is_current(peer):
                        duplicate = session.peer  # the other connection to this device won
                        self.close(peer)
                    await self._backpressure()
                send_q.close()  # let the pump flush what is queued, then end
                peer.wake.set()
        finally:
            if handshaking:  # never reached OPEN
                self._handshaking -= 1
            for key in self._closed_stats:  # live sessions are summed in traffic()
                self._closed_stats[key] += getattr(session.stats, key)
            if session.peer is not None and self._peers.get(session.peer) is peer:
                del self._peers[session.peer]
                self._changed.set()
                self._changed = trio.Event()
            with trio.CancelScope(shield=True):
                await conn.aclose()
        return Ended(authenticated=not handshaking, duplicate_of=duplicate)

    async def _pump_out(
        self,
        conn: Connection,
        frames: trio.MemoryReceiveChannel[bytes],
        scope: trio.CancelScope,
        peer: Peer,
    ) -> None:
        """Write the session's frames; media only when no sync frame waits (two lanes)."""
        try:
            async with frames:
                while True:
                    try:
                        frame: bytes | None = frames.receive_nowait()
                    except trio.WouldBlock:
                        frame = self._catchup_frame(peer) or self._media_frame(peer)
                    except trio.EndOfChannel:
                        return
                    if frame is None:
                        peer.wake = trio.Event()
                        await peer.wake.wait()
                        continue
                    await conn.send(frame)
        except TransportError:
            scope.cancel()

    def _catchup_frame(self, peer: Peer) -> bytes | None:
        """The next piece of a large catch-up, sealed now: pulled one at a time when no
        other sync frame waits, so a long history is never queued whole."""
        if not peer.session.catching_up:
            return None
        outputs = peer.session.next_catchup(trio.current_time())
        if len(outputs) == 1 and isinstance(outputs[0], Send):
            return outputs[0].data
        self.carry_out(peer, outputs)  # the session failed: its bye queues, it closes
        return None

    def _media_frame(self, peer: Peer) -> bytes | None:
        """The next frame of the media lane, sealed now (so that it takes the box's
        next number after every sync frame already queued)."""
        if not self.is_current(peer):
            return None
        assert peer.device is not None
        item = self._media_out(peer.device)
        if item is None:
            return None
        kind, fields = item
        sent = peer.session.send_media(kind, **fields)
        return sent[0].data if sent and isinstance(sent[0], Send) else None

    # ---- sessions starting and ending ----------------------------------------------

    def _on_authenticated(self, peer: Peer, out: Authenticated) -> None:
        device = out.device
        existing = self._peers.get(device)
        if existing is not None and existing.session.state is SessionState.OPEN:
            # one connection per device pair, the same one chosen at both ends
            if not self._keep_new(peer, existing):
                return  # the connection loop notices it is not registered and closes it
            self.close(existing)
        self._peers[device] = peer
        peer.since = trio.current_time()
        for hook in self._up:
            hook(peer)
        self._changed.set()
        self._changed = trio.Event()
        log.info("connected to %s via %s", device, peer.remote)
        self._queue_write(self._seen(device))
        self._emit(ev.PeerConnected(device=device, remote=peer.remote))

    def _seen(self, device: str) -> WriteBatch:
        """Remember when we last had a session with ``device`` (``p2p devices``)."""
        return WriteBatch(records={f"seen/{device}": str(self._wall_ms()).encode()})

    def _keep_new(self, new: Peer, existing: Peer) -> bool:
        """Deterministic choice between two connections to the same device (see
        :func:`p2p.proto.peering.keep_new`)."""
        assert new.device is not None
        return keep_new(
            self._state.device_id,
            new.device,
            Link(new.session.initiator, is_relay_address(new.remote)),
            Link(existing.session.initiator, is_relay_address(existing.remote)),
        )

    def _on_closed(self, peer: Peer, out: Closed) -> None:
        device, error = peer.device, out.error
        if error is not None and not isinstance(error, ConnectionClosed):
            log.warning("closed connection %s (%s): %s", peer.remote, device, error)
            self._emit(
                ev.InputRejected(
                    remote=peer.remote, device=device, error=type(error).__name__, detail=str(error)
                )
            )
        if device is not None and self._peers.get(device) is peer:
            for hook in self._down:
                hook(device)
            self._queue_write(self._seen(device))
            self._emit(
                ev.PeerDisconnected(
                    device=device,
                    reason="" if error is None else f"{type(error).__name__}: {error}",
                )
            )
