"""The writer: the one path from the node to its store, and loading replicas from it.

It owns the write queue (batches and our own signed entries waiting for the store), the
batch being stored now, and the lock that loads one replica at a time. Rules it keeps:

- **Group commit.** One task (:meth:`Writer.run`) takes every queued batch and entry at
  once, with the state's unsaved records (counter reservations), puts each space's queued
  entries into its replica in one CRDT transaction (``DeviceState.write_local``: one
  update, one log row, one envelope for all the sends of a round) and writes everything
  in one store transaction. Only then does it fire the waiters' events, emit what was
  to be announced, and hand our new updates on (``outbox``): nothing goes to a peer
  before it is durable.
- **Order.** Batches are written in the order they were queued.
- **Bounded memory.** A receiver waits (:meth:`Writer.backpressure`) while
  ``WRITE_QUEUE`` batches wait for the store.
- **Compaction.** A space with ``COMPACT_AFTER`` updates past its snapshot is folded
  into a new snapshot after the write that got it there, if its document is loaded
  (else after a later write that finds it loaded: folding needs the document).
- **Off the trio thread.** SQLite calls run in a worker thread (:meth:`Writer.run_store`);
  a ``MemoryStore`` is called inline.
- **Without the document.** An envelope for a space whose document is not loaded is
  applied without it when it can be (:meth:`Writer.ingest_aside`: messages, receipts,
  read markers); never while the document loads or envelopes wait for it.
- **Loading.** A space's CRDT loads in a worker thread, one at a time, when something
  needs it (:meth:`Writer.load`); what arrives for it meanwhile waits, in order
  (:meth:`Writer.after_load`). A chat whose stored history does not load is set aside
  and reported; entries of ours its document lacks are written again
  (``REWRITE_CHUNK`` per update) and sent on like new writes.
- **State vectors without documents.** Every batch that appends to a space also writes
  its state vector (``sv/<space>``, stamped with the seq its log reaches), so a reopened
  node states what it holds without loading anything (:meth:`Writer.learn_vectors`
  fills in what a store lacks, once).
- **Unloading.** A document unused for ``IDLE_UNLOAD`` seconds is dropped
  (:meth:`Writer.unload_when_idle`), never one with anything on its way to the store.
- After :meth:`Writer.close` nothing more is accepted, and what was queued is flushed.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final, TypeVar

import trio

from p2p import events as ev
from p2p.errors import (
    ChatCorrupt,
    DocumentNeeded,
    InvalidUpdate,
    P2PError,
    StoreCorrupt,
    WireError,
)
from p2p.proto.model import Entry
from p2p.proto.ysplit import split_update
from p2p.state.device import DeviceState, Ingested, Space, claim_counters, merge_batches
from p2p.storage.base import SNAPSHOT_PART, Store, WriteBatch
from p2p.storage.memory import MemoryStore

log = logging.getLogger("p2p.runtime.node")  # one logger for all of the node's lines
T = TypeVar("T")
Aside = Callable[[], bool]
"""Applies something waiting for a space's document without it: whether it could."""

WRITE_QUEUE: Final = 4096
"""Batches waiting for the store before receivers are made to wait too."""
COMPACT_AFTER: Final = 5000
"""Updates appended to a space's log before it is folded into a snapshot."""
WAITING_MAX: Final = 16 * 1024 * 1024
"""Bytes of envelopes waiting for documents to load before receivers are made to wait."""
IDLE_UNLOAD: Final = 120.0
"""Seconds a space's document stays loaded after its last load or write."""
REWRITE_CHUNK: Final = 64
"""Entries per update when the node writes its own entries again (``_write_again``):
far below what a peer accepts in one update."""


class Writer:
    """Group-commits batches and entries to the store; loads replicas from it."""

    def __init__(
        self,
        state: DeviceState,
        store: Store,
        *,
        emit: Callable[[ev.Event], None],
        outbox: Callable[[str, bytes], None],
    ) -> None:
        self._state = state
        self._store = store
        self._emit = emit
        self._outbox = outbox
        """Where our durable updates go to be sent (the gossiper)."""
        self._writes: list[tuple[WriteBatch, trio.Event, ev.Event | None]] = []
        self._inflight: list[tuple[str, bytes]] = []
        """The updates of the batch the writer is storing now (no longer in _writes)."""
        self._local: dict[str, list[Entry]] = {}
        """Our own entries waiting for the writer, per space (see ``queue_entry``)."""
        self._wakeup = trio.Event()
        self._room = trio.Event()
        self._load_lock = trio.Lock()
        """One replica loads at a time, in a worker thread (see :meth:`load`)."""
        self._loading: set[str] = set()
        """Spaces whose document a task is loading (or waits to load)."""
        self._closed = False
        self._waiting: dict[str, list[tuple[Callable[[], object], Aside | None]]] = {}
        """Per space whose document loads: what waits for it, in arrival order (and
        how to try it without the document, once the key chains are read)."""
        self._unlearnt: set[str] = set()
        """Spaces whose key chains could not be read from their history (a fork, an
        item following a message): they load, and are not read again this run."""
        self._waiting_size: dict[str, int] = {}
        self._waiting_bytes = 0
        self._unblocked = trio.Event()
        self._used: dict[str, float] = {}
        """When each loaded space was last loaded or written (see :meth:`unload_idle`)."""
        stored = state.history
        if stored is not None:
            state.history = functools.partial(self._history_of, stored)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pending(self) -> int:
        """Batches waiting for the store."""
        return len(self._writes)

    # ---- queueing ------------------------------------------------------------------

    def queue_entry(
        self, space_id: str, entry: Entry, batch: WriteBatch | None = None
    ) -> trio.Event:
        """Queue one of our signed entries (and a batch that must commit with it); the
        event fires once it is durable and on its way to peers.

        Every entry queued since the last round goes into its space's replica in one CRDT
        transaction (``DeviceState.write_local``): concurrent sends make one update, one
        stored row and one envelope, not one each."""
        done = trio.Event()
        self._local.setdefault(space_id, []).append(entry)
        self._writes.append((batch or WriteBatch(), done, None))
        self._wakeup.set()
        return done

    def queue(self, batch: WriteBatch, *, announce: ev.Event | None = None) -> trio.Event:
        """Queue a batch, in order; the event fires once it is durable, and ``announce``
        is emitted then."""
        done = trio.Event()
        self._writes.append((batch, done, announce))
        self._wakeup.set()
        return done

    async def commit(self, batch: WriteBatch) -> None:
        """Write a batch and wait until it is durable."""
        await self.queue(batch).wait()

    def save_unsaved(self) -> None:
        """Have the state's unsaved records (counter reservations) written soon."""
        if self._state.unsaved or self._state.counters_wanted:
            self.queue(WriteBatch())

    async def backpressure(self) -> None:
        """Make a receiver wait while the store is far behind, or while envelopes wait
        for documents to load (bounded memory)."""
        while len(self._writes) >= WRITE_QUEUE:
            self._room = trio.Event()
            await self._room.wait()
        while self._waiting_bytes > WAITING_MAX:
            self._unblocked = trio.Event()
            await self._unblocked.wait()

    # ---- the writer task -----------------------------------------------------------

    async def run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            await self._flush()

    async def close(self) -> None:
        """Refuse new entries (see :attr:`closed`), then write everything queued."""
        self._closed = True
        await self._flush()

    async def _flush(self) -> None:
        state = self._state
        while self._writes or state.unsaved or state.counters_wanted:
            taken, self._writes = self._writes, []
            local, self._local = self._local, {}
            self._room.set()
            written = [(s, *state.write_local(s, entries)) for s, entries in local.items()]
            batch = merge_batches(
                [b for b, _, _ in taken] + [b for _, _, b in written] + [state.take_unsaved()]
            )
            if batch.appends:
                batch.records.update(state.spaces.vector_records(batch.appends))
                now = trio.current_time()
                for space_id, _update in batch.appends:
                    self._used[space_id] = now
            if batch:
                self._inflight = batch.appends
                try:
                    await self.run_store(self._store.write, batch)
                finally:
                    self._inflight = []
                for space_id, _update in batch.appends:
                    if space_id in state.spaces:  # not set aside meanwhile
                        state.spaces[space_id].appended()
                await self._compact(batch.appends)
            if state.counters_wanted:  # long before the current block runs out
                state.grant_counters(await self.run_store(claim_counters, self._store))
            for space_id, update, _ in written:
                self._outbox(space_id, update)
            for _, done, announce in taken:
                done.set()
                if announce is not None:
                    self._emit(announce)

    def _history_of(
        self, stored: Callable[[str], Iterable[bytes]], space_id: str
    ) -> Iterator[bytes]:
        """A space's whole history as its replica holds it: what the store holds, then
        what is on its way there (what a replica an update poisoned is rebuilt from;
        see ``Replica.apply``). The queue is read first: what leaves it meanwhile is in
        the store by the time the store is read (applied twice: harmless)."""
        pending = self._on_the_way(space_id)
        yield from stored(space_id)
        yield from pending

    def _on_the_way(self, space_id: str) -> list[bytes]:
        """A space's updates queued for the store or being written, in order."""
        pending = [u for s, u in self._inflight if s == space_id]
        pending += [u for b, _, _ in self._writes for s, u in b.appends if s == space_id]
        return pending

    async def _compact(self, appends: list[tuple[str, bytes]]) -> None:
        """Fold a space's update log into a snapshot once its tail grows long, so that
        opening the store stays fast (one snapshot plus a short tail)."""
        for space_id in {s for s, _ in appends}:
            space = self._state.spaces.get(space_id)
            if space is None or not space.compaction_due(COMPACT_AFTER):
                continue
            if not space.replica.loaded:
                continue  # the snapshot needs the document: folded at a later write, loaded
            # every update up to log_seq is in the replica, so this snapshot covers them
            snapshot, upto = space.replica.snapshot(), space.log_seq
            await self.run_store(self._store_snapshot, space_id, snapshot, upto)
            space.compacted(upto)

    def _store_snapshot(self, space_id: str, snapshot: bytes, upto: int) -> None:
        """Store ``snapshot`` in parts of at most :data:`SNAPSHOT_PART` bytes (a reader
        then holds one part at a time, not the chat), cut here, in the worker thread
        ``run_store`` calls it in: cutting a large chat's snapshot takes a while."""
        parts = [bytes(part) for part in split_update(snapshot, SNAPSHOT_PART)]
        self._store.compact(space_id, parts, upto)

    async def run_store(self, fn: Callable[..., T], *args: Any) -> T:
        """Call the store (or what reads it) off the trio thread when it does disk I/O."""
        if isinstance(self._store, MemoryStore):
            return fn(*args)
        return await trio.to_thread.run_sync(fn, *args)

    # ---- loading -------------------------------------------------------------------

    async def load(self, space: Space) -> None:
        """Load a space's CRDT (snapshot, then tail) in a worker thread, once.

        Opening a node leaves documents unloaded (readers use the message index); every
        path that touches a replica (a write, a sync session, mail, linking) awaits this
        first, so the trio thread never waits for a long history.
        """
        self._used[space.id] = trio.current_time()
        if space.replica.loaded:
            return
        self._loading.add(space.id)
        try:
            await self._load(space)
        finally:
            self._loading.discard(space.id)

    async def _load(self, space: Space) -> None:
        async with self._load_lock:
            if space.id in self._state.set_aside:
                raise self._state.set_aside[space.id]
            if not space.replica.loaded:
                build = functools.partial(self._state.load_checked, finish=False)
                try:
                    lost = await self.run_store(build, space.id, self._store)
                except (StoreCorrupt, InvalidUpdate, WireError) as exc:
                    raise self._put_aside(space, exc) from exc
                space.replica.finish_load()  # here: what was written aside goes in
                if lost and self._state.lacks_own(space.id, self._store):
                    self._write_again(space.id, lost)

    def ingest_aside(self, space_id: str, data: bytes, *, in_turn: bool = False) -> Ingested | None:
        """Apply an envelope to a space whose document is not loaded, without loading
        it (``Replica.apply`` says when that can be: messages, and receipts and read
        markers replacing values whose items are known): None when it cannot, and
        nothing changed. Not while the document loads or envelopes wait for it: the
        load reads what the store and this queue hold when it starts, and order is
        kept (``in_turn``: this envelope is the first of those waiting, taken in its
        turn). The message index is read here, on the trio thread, as readers do."""
        space = self._state.spaces.get(space_id)
        if space is None or space.replica.loaded:
            return None
        if not in_turn and (space_id in self._waiting or space_id in self._loading):
            return None
        try:
            return self._state.ingest(data, held=self._store.index_held)
        except DocumentNeeded:
            return None

    def after_load(
        self,
        space_id: str,
        act: Callable[[], object],
        size: int,
        nursery: trio.Nursery,
        aside: Aside | None = None,
    ) -> bool:
        """Have ``act`` (applying something of ``size`` bytes to the space) wait until the
        space's document is loaded, behind whatever already waits for it: whether it
        waits (False: the document is loaded and nothing waits, act now). A load takes
        seconds for a long history; the receiver's loop goes on meanwhile, and
        :meth:`backpressure` bounds what waits.

        First the space's key chains are read from its history, when they can be
        (:meth:`learn_chains`): what waits is then tried in turn without the document
        (``aside``: whether it was taken so), and the document loads only for the
        first that still needs it, the rest behind it."""
        waiting = self._waiting.get(space_id)
        if waiting is None:
            if self._state.has_document(space_id):
                return False
            waiting = self._waiting[space_id] = []
            nursery.start_soon(self._load_then_act, space_id)
        waiting.append((act, aside))
        self._waiting_size[space_id] = self._waiting_size.get(space_id, 0) + size
        self._waiting_bytes += size
        return True

    async def _load_then_act(self, space_id: str) -> None:
        loaded = False
        try:
            if await self.learn_chains(space_id):
                waiting = self._waiting[space_id]
                while waiting and (aside := waiting[0][1]) is not None and aside():
                    waiting.pop(0)  # taken without the document, in its turn
                loaded = not waiting  # nothing left to load for
            if not loaded:
                loaded = await self.load_by_id(space_id)
        finally:
            acts = self._waiting.pop(space_id)
            self._waiting_bytes -= self._waiting_size.pop(space_id)
            self._unblocked.set()
        # not loaded: set aside (what waited is refused with it), or the node closes
        # (state vectors bring it again next time); acting would load on this thread
        for act, _ in acts if loaded else ():
            act()

    async def learn_chains(self, space_id: str) -> bool:
        """Read the key chains of a space held here from its stored history, in a
        worker thread, and follow them (``Replica.learn_chains``): whether its replica
        follows key chains now. Once per space and run when they cannot be read. A
        chat held when the node opened then takes a reaction changed (a peer's, or
        ours) without loading its document."""
        space = self._state.spaces.get(space_id)
        if space is None or space_id in self._unlearnt:
            return False
        replica = space.replica
        if replica.follows_chains:
            return True
        if not replica.chains_learnable:
            return False
        # the queue first: what leaves it meanwhile is read twice (the reader skips
        # what it holds); the store a part or a page at a time, never whole
        pending = self._on_the_way(space_id)
        history = itertools.chain(self._state.spaces.stored_updates(space_id), pending)
        try:
            learnt = await self.run_store(replica.learn_chains, history)
        except (StoreCorrupt, WireError):
            learnt = None  # the load that follows sets it aside
        if learnt is None:
            self._unlearnt.add(space_id)
            return False
        return replica.use_chains(learnt)  # not if the history moved on meanwhile

    async def learn_vectors(self) -> None:
        """Make every space's state vector known without its document: one without a
        current ``sv/`` record (a store written before them, or by linking) is loaded,
        one at a time in a worker thread, its vector recorded, and dropped again. Sessions
        wait for this once, so none of them loads a document on the trio thread; later
        ones find nothing to do."""
        for space in list(self._state.spaces.values()):
            if space.replica.vector_known:
                continue
            with contextlib.suppress(ChatCorrupt):
                await self.load(space)
                self.queue(WriteBatch(records=self._state.spaces.vector_record(space.id)))
                self._drop(space, self._pending())

    def _pending(self) -> set[str]:
        """Spaces with updates on their way to the store."""
        pending = {s for s, _ in self._inflight}
        pending |= {s for b, _, _ in self._writes for s, _ in b.appends}
        return pending | set(self._local)

    async def load_by_id(self, space_id: str) -> bool:
        """Load a space's document by id: whether it is loaded now (False for a space
        not held, or set aside)."""
        space = self._state.spaces.get(space_id)
        if space is None:
            return False
        try:
            await self.load(space)
        except ChatCorrupt:
            return False
        return True

    async def unload_when_idle(self, idle: float = IDLE_UNLOAD) -> None:
        """Forever: drop documents idle for ``idle`` seconds (see :meth:`unload_idle`)."""
        while True:
            await trio.sleep(idle / 4)
            if self.unload_idle(idle):
                release_freed_memory()

    def unload_idle(self, idle: float) -> list[str]:
        """Drop the documents of spaces neither loaded nor written for ``idle`` seconds
        (their history stays in the store, their state vector in memory): a node's
        memory follows the chats in use, not the whole history. Never one with anything
        on its way to the store (it would load again without it), nor one something
        waits to load (:meth:`after_load`). The spaces dropped."""
        pending = self._pending()
        now = trio.current_time()
        dropped = []
        for space in list(self._state.spaces.values()):
            if not space.replica.loaded:
                continue
            if now - self._used.setdefault(space.id, now) < idle:
                continue  # (a space loaded by a reader is first seen here: in use now)
            if self._drop(space, pending):
                dropped.append(space.id)
        return dropped

    def _drop(self, space: Space, pending: set[str]) -> bool:
        """Unload a space's document unless something of it is on its way to the store
        (``pending``) or waits for it; whether it was dropped."""
        if space.id in pending or space.id in self._waiting or not space.replica.unload():
            return False
        self._used.pop(space.id, None)
        return True

    async def load_all(self) -> None:
        """Load every space (linking sends a new device every space's history); one that
        does not load is set aside, not a reason to fail."""
        for space in list(self._state.spaces.values()):
            with contextlib.suppress(ChatCorrupt):
                await self.load(space)

    def _put_aside(self, space: Space, error: P2PError) -> ChatCorrupt:
        """A chat whose stored history does not load is set aside and reported; the node
        and every other chat go on (its rows stay on disk as they are)."""
        corrupt = self._state.put_aside(space.id, error)
        log.error("%s", corrupt)
        self._emit(ev.ChatSetAside(chat=space.id, error=type(error).__name__, detail=str(error)))
        return corrupt

    def _write_again(self, space_id: str, entries: list[Entry]) -> None:
        """Put entries of ours that the loaded CRDT lacked back into it (see
        ``DeviceState.load_checked``), in updates small enough for any peer, and on
        their way to peers."""
        log.warning(
            "chat %s: its document lacked entries of ours that this device shows;"
            " writing its %d entries again",
            space_id,
            len(entries),
        )
        for at in range(0, len(entries), REWRITE_CHUNK):
            update, batch = self._state.write_local(space_id, entries[at : at + REWRITE_CHUNK])
            self.queue(batch)
            self._outbox(space_id, update)


def release_freed_memory() -> None:
    """Hand memory freed by dropped documents back to the system where the C library
    can (glibc keeps freed heap otherwise, and the process would not shrink)."""
    libc = _libc()
    if libc is not None:
        with contextlib.suppress(AttributeError):  # not glibc
            libc.malloc_trim(0)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
