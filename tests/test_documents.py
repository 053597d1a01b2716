"""A chat's document is in memory only while it is in use.

A session with a level peer loads nothing (state vectors come from the store's record),
a peer that lacks something makes only that chat's document load, envelopes for an
unloaded chat wait for its load, and an idle document is dropped and loads again on the
next use. Real homes (SQLite) and real TCP on loopback; the sans-I/O rule through the
back-to-back session driver.
"""

from __future__ import annotations

import contextlib
import random
import sqlite3
import tracemalloc
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pycrdt
import pytest
import trio
from procs import Relay, tcp_node, wait_for

from p2p.errors import DocumentNeeded
from p2p.proto.clock import format_ts
from p2p.proto.identity import DeviceKeys
from p2p.proto.model import (
    DELETIONS,
    EDITS,
    INDEXED,
    LEARN_LATER,
    MESSAGES,
    REACTIONS,
    READ_MARKERS,
    RECEIPTS,
    SIDE,
    Applied,
    Entry,
    Replica,
    side_heads,
)
from p2p.proto.model import decode_state_vector as clocks
from p2p.proto.wire import pack
from p2p.proto.ysplit import split_update, trim_update
from p2p.proto.yupdate import strip_deletions
from p2p.runtime.node import Node
from p2p.state.device import NOTES, DeviceState, claim_run, merge_batches
from p2p.state.spaces import stored_vector, vector_record
from p2p.storage.base import SpaceLog, WriteBatch
from p2p.storage.memory import MemoryStore
from p2p.storage.sqlite import SqliteStore
from p2p.testing import provision_account, provision_homes
from p2p.testing.sessions import Pair

pytestmark = pytest.mark.slow


@pytest.fixture
def homes(tmp_path: Path) -> list[Path]:
    paths = [tmp_path / name for name in ("phone", "laptop")]
    provision_homes(paths)
    return paths


@asynccontextmanager
async def phone_and_laptop(homes: list[Path]) -> AsyncIterator[tuple[Node, Node]]:
    """Both nodes of ``homes`` running, the laptop dialing the phone."""
    async with tcp_node(homes[0]) as phone, tcp_node(homes[1], peers=[phone.address]) as laptop:
        yield phone, laptop


async def level_pair(homes: list[Path], messages: int) -> None:
    """The phone writes ``messages`` into its notes; both end level and close."""
    async with phone_and_laptop(homes) as (phone, laptop):
        for i in range(messages):
            await phone.send(f"m{i}")
        await wait_for(lambda: len(laptop.messages()) == messages)


@asynccontextmanager
async def level_then_reopened(homes: list[Path], messages: int) -> AsyncIterator[tuple[Node, Node]]:
    """The pair level on ``messages`` of the phone's, stopped and started again, each
    having read the other's state vectors."""
    await level_pair(homes, messages)
    async with phone_and_laptop(homes) as (phone, laptop):
        await vectors_exchanged(phone, laptop)
        yield phone, laptop


def notes_of(n: Node) -> Any:
    [chat] = [s for s in n.state.spaces.values() if s.kind == "chat"]
    return chat


async def vectors_exchanged(a: Node, b: Node) -> None:
    """Both sessions are open and have read the other's state vector of every space
    they share (each side sends them all right after authenticating)."""
    shared = len(a.state.spaces)

    def done() -> bool:
        pa, pb = a.peers.get(b.device_id), b.peers.get(a.device_id)
        return (
            pa is not None
            and pb is not None
            and pa.session.stats.sv_in >= shared
            and pb.session.stats.sv_in >= shared
        )

    await wait_for(done)


def test_a_session_with_a_level_peer_loads_no_chat(homes: list[Path]) -> None:
    """Two devices level on a chat of 60 messages restart and reconnect: neither loads
    the chat's document (every node used to load every document before its first
    session), and a message written then still arrives."""

    async def main() -> None:
        with trio.fail_after(60):
            async with level_then_reopened(homes, 60) as (phone, laptop):
                await trio.sleep(0.5)  # time for a load, had one started
                assert not notes_of(phone).replica.loaded
                assert not notes_of(laptop).replica.loaded
                await laptop.send("after")
                await wait_for(lambda: len(phone.messages()) == 61)
                assert [m.text for m in phone.messages()] == [m.text for m in laptop.messages()]

    trio.run(main)


def test_a_store_without_state_vector_records_learns_them_once(homes: list[Path]) -> None:
    """A home written before the records (or by linking) has none: the first session
    loads each document once, off the trio thread, records its vector and drops it."""

    trio.run(level_pair, homes, 20)
    for home in homes:
        with contextlib.closing(sqlite3.connect(home / "p2p.db")) as db, db:
            assert db.execute("DELETE FROM records WHERE name LIKE 'sv/%'").rowcount >= 1

    async def reconnect() -> None:
        with trio.fail_after(60):
            async with phone_and_laptop(homes) as (phone, laptop):
                await vectors_exchanged(phone, laptop)
                assert not notes_of(phone).replica.loaded
                assert not notes_of(laptop).replica.loaded
                assert notes_of(phone).replica.vector_known

    trio.run(reconnect)
    for home in homes:
        with contextlib.closing(sqlite3.connect(home / "p2p.db")) as db:
            rows = db.execute("SELECT count(*) FROM records WHERE name LIKE 'sv/%'").fetchone()
        assert rows[0] >= 2  # the account space and the notes chat


def test_a_peer_that_lacks_messages_is_answered_without_loading(homes: list[Path]) -> None:
    """The laptop missed 30 messages: the phone answers its state vector from the store,
    a stored update at a time; the laptop takes them without loading its own (new keys,
    continuing its state vector). Neither loads the chat, and both end level."""

    async def main() -> None:
        with trio.fail_after(60):
            async with phone_and_laptop(homes) as (phone, laptop):
                await phone.send("first")
                await wait_for(lambda: len(laptop.messages()) == 1)
            async with tcp_node(homes[0]) as phone:
                for i in range(30):
                    await phone.send(f"while away {i}")
            async with phone_and_laptop(homes) as (phone, laptop):
                await wait_for(lambda: len(laptop.messages()) == 31)
                assert not notes_of(phone).replica.loaded
                assert not notes_of(laptop).replica.loaded
                assert [m.id for m in laptop.messages()] == [m.id for m in phone.messages()]
                told = notes_of(laptop).replica.state_vector()
                assert told == notes_of(phone).replica.state_vector()

    trio.run(main)


def test_an_idle_chat_is_dropped_from_memory_and_loads_again_on_use(homes: list[Path]) -> None:
    """Dropping a document keeps its state vector and loses nothing: the next write
    goes on with the same CRDT client and reaches the peer."""

    async def main() -> None:
        with trio.fail_after(60):
            async with phone_and_laptop(homes) as (phone, laptop):
                for i in range(10):
                    await phone.send(f"m{i}")
                await wait_for(lambda: len(laptop.messages()) == 10)
                chat = notes_of(phone)
                vector = chat.replica.state_vector()
                assert chat.id in phone.writer.unload_idle(0.0)
                assert not chat.replica.loaded
                assert clocks(chat.replica.state_vector()) == clocks(vector)
                await phone.send("after the drop")
                await wait_for(lambda: len(laptop.messages()) == 11)
                assert [m.id for m in laptop.messages()] == [m.id for m in phone.messages()]

    trio.run(main)


def test_the_stored_state_vector_is_the_loaded_documents(homes: list[Path]) -> None:
    """What a reopened device states without loading is what its loaded document says;
    a record left behind by appends made without it is not believed."""

    async def write() -> None:
        async with tcp_node(homes[0]) as phone:
            for i in range(5):
                await phone.send(f"m{i}")

    trio.run(write)
    store = SqliteStore(homes[0] / "p2p.db")
    try:
        state = DeviceState.load(store)
        [chat] = [s for s in state.spaces.values() if s.kind == "chat"]
        told = chat.replica.state_vector()
        assert not chat.replica.loaded
        chat.replica.load()
        assert clocks(told) == clocks(chat.replica.state_vector())
        _, last = store.log_seqs(chat.id)
        record = store.get(f"sv/{chat.id}")
        assert stored_vector(record, last) == told
        assert stored_vector(record, last + 1) is None  # an append the record misses
        assert stored_vector(pack(["x", told]), last) is None
        assert stored_vector(pack([last, b"\xff"]), last) is None
    finally:
        store.close()


def bodies(state: DeviceState, chat: str) -> list[str]:
    return sorted(e.body for _, e in state.spaces[chat].replica.entries(MESSAGES) if e)


def test_a_session_asks_for_the_document_only_when_the_peer_lacks_something() -> None:
    """Sans-I/O: an unloaded replica answers a level peer with nothing and loads
    nothing; a peer behind gets ``DocumentWanted`` first, then, once the document is
    loaded, its catch-up."""
    stores = provision_account(2)
    a = DeviceState.load(stores[0])
    chat = next(s.id for s in a.spaces.values() if s.kind == "chat")

    def persist(state: DeviceState, store: MemoryStore, batch: WriteBatch) -> None:
        """As the writer does: the batch, with the state vectors it leaves."""
        vectors = WriteBatch(records=state.spaces.vector_records(batch.appends))
        store.write(merge_batches([batch, vectors, state.take_unsaved()]))
        for space_id, _ in batch.appends:
            state.spaces[space_id].appended()

    def write(state: DeviceState, store: MemoryStore, text: str, at: int) -> None:
        _, batch = state.write_local(chat, [state.new_entry(chat, "msg", at, body=text)])
        persist(state, store, batch)

    for i in range(3):
        write(a, stores[0], f"m{i}", 1000 + i)
    b = DeviceState.load(stores[1])
    first = Pair(a, b).connect()
    first.run()
    persist(b, stores[1], merge_batches([i.batch for i in first.b.ingested]))
    assert bodies(b, chat) == ["m0", "m1", "m2"]

    def reopened(store: MemoryStore) -> DeviceState:
        state = DeviceState.load(store, claim_run(store))  # as a node opens a home
        assert not state.spaces[chat].replica.loaded
        return state

    level = Pair(reopened(stores[0]), reopened(stores[1])).connect()
    level.run()
    assert level.a.documents_loaded == level.b.documents_loaded == []
    assert not level.a.state.spaces[chat].replica.loaded
    assert not level.b.state.spaces[chat].replica.loaded

    ahead = reopened(stores[0])
    write(ahead, stores[0], "later", 2000)
    behind = Pair(reopened(stores[0]), reopened(stores[1])).connect()
    behind.run()
    assert behind.a.documents_loaded == []  # a answers b's vector from its store
    assert behind.b.documents_loaded == []
    assert bodies(behind.b.state, chat) == ["later", "m0", "m1", "m2"]


def test_an_entry_written_aside_is_the_update_the_whole_document_makes() -> None:
    """A message and an edit written without the history make the structs the loaded
    document makes, under the same CRDT client, after our own earlier structs."""
    store = MemoryStore()
    state, batch = DeviceState.create_account("phone")
    store.write(batch)
    chat = next(s.id for s in state.spaces.values() if s.kind == "chat")
    for i in range(3):
        _, batch = state.write_local(chat, [state.new_entry(chat, "msg", 1000 + i, body=f"m{i}")])
        store.write(batch)
    replica = state.spaces[chat].replica
    vector = replica.state_vector()
    entries = [
        state.new_entry(chat, "msg", 2000, body="next"),
        state.new_entry(chat, "edit", 2001, body="m0!", target="x"),
    ]
    whole = replica.write(entries)
    # the same history, not loaded, same client, with its state vector known
    lazy = Replica(
        chat,
        source=lambda: store.load_space(chat).updates,
        client_id=replica.doc.client_id,
        state_vector=vector,
    )
    assert lazy.writes_aside(["msg", "edit"])
    assert not lazy.writes_aside(["msg", "read"])
    aside = lazy.write(entries)
    assert not lazy.loaded
    # the same structs (yrs encodes a dict's fields in no fixed order: compare effects)
    for update in (whole, aside):
        other = Replica(chat, client_id=1)
        for stored in store.load_space(chat).updates:
            other.apply(stored, from_store=True)
        other.apply(update)
        assert clocks(other.state_vector()) == clocks(replica.state_vector())
        assert other.entries(EDITS) == replica.entries(EDITS)
    assert clocks(lazy.state_vector()) == clocks(replica.state_vector())
    lazy.load()
    assert clocks(lazy.state_vector()) == clocks(replica.state_vector())
    assert sorted(k for k, _ in lazy.entries(MESSAGES)) == sorted(
        k for k, _ in replica.entries(MESSAGES)
    )


def shown_first(node: Node) -> str:
    return node.messages()[0].id


def test_sends_into_an_unloaded_chat_load_nothing_and_reach_the_peer(homes: list[Path]) -> None:
    """The first send after a start, and one after the chat was dropped from memory, go
    out without loading the chat; loading it later takes them in, and writes that follow
    (under the same CRDT client) reach the peer too, in the same order everywhere."""

    async def main() -> None:
        with trio.fail_after(60):
            async with level_then_reopened(homes, 30) as (phone, laptop):
                chat = notes_of(phone)
                await phone.send("cold")
                assert not chat.replica.loaded
                await wait_for(lambda: len(laptop.messages()) == 31)
                await phone.delivery()  # reads receipts: loads the chat, with "cold"
                assert chat.replica.loaded
                await phone.send("loaded")
                assert chat.id in phone.writer.unload_idle(0.0)
                await phone.send("dropped")  # aside again, after this run's own structs
                assert not chat.replica.loaded
                await phone.mark_read()  # replaces our read marker, whose item is known
                assert not chat.replica.loaded
                await phone.react(shown_first(phone), "+1")  # by key chains read from the store
                assert not chat.replica.loaded
                await phone.delivery()  # loads: takes in the reaction written aside
                assert chat.replica.loaded
                await phone.send("last")
                await wait_for(lambda: len(laptop.messages()) == 34)
                shown = [m.id for m in phone.messages()]
                assert [m.id for m in laptop.messages()] == shown
                assert chat.replica.count() == 34
            async with tcp_node(homes[0]) as phone:
                assert [m.id for m in phone.messages()] == shown
                await phone.writer.load(notes_of(phone))
                assert notes_of(phone).replica.count() == 34

    trio.run(main)


def test_a_linked_device_states_its_vectors_without_loading() -> None:
    """The history a new device gets at linking is stored with its state vectors: its
    first session loads nothing to state them."""
    stores = provision_account(2)
    a = DeviceState.load(stores[0])
    chat = next(s.id for s in a.spaces.values() if s.kind == "chat")
    _, batch = a.write_local(chat, [a.new_entry(chat, "msg", 1000, body="before the link")])
    stores[0].write(batch)
    keys = DeviceKeys.generate()
    bundle, primary_batch = a.enroll(keys, "tablet")
    stores[0].write(primary_batch)
    _, companion_batch = DeviceState.from_enrollment(keys, "tablet", bundle)
    store = MemoryStore()
    store.write(companion_batch)
    tablet = DeviceState.load(store)
    for space in tablet.spaces.values():
        assert space.replica.vector_known
        assert not space.replica.loaded
    told = tablet.spaces[chat].replica.state_vector()
    tablet.spaces[chat].replica.load()
    assert clocks(told) == clocks(tablet.spaces[chat].replica.state_vector())
    assert bodies(tablet, chat) == ["before the link"]


def test_a_node_drops_a_chat_by_itself_once_idle(homes: list[Path]) -> None:
    """``idle_unload``: a chat loaded for the delivery view is dropped by the node's
    own task once unused that long, and loads again for the next use."""

    async def main() -> None:
        with trio.fail_after(30):
            async with tcp_node(homes[0], idle_unload=0.4) as phone:
                await phone.send("hello")
                chat = notes_of(phone)
                await phone.delivery()  # reads receipts: loads the chat
                assert chat.replica.loaded
                await wait_for(lambda: not chat.replica.loaded)
                await phone.delivery()
                assert chat.replica.loaded
                assert [m.text for m in phone.messages()] == ["hello"]

    trio.run(main)


@pytest.mark.parametrize("seed", range(6))
def test_random_writes_drops_loads_and_restarts_keep_vectors_true(seed: int) -> None:
    """Seeded: two devices write (aside or not), drop and load their chat, restart and
    sync, in random order. At every reopening the vector a device states unloaded is its
    loaded document's, and at the end both hold the same entries."""
    rng = random.Random(seed)
    stores = provision_account(2)

    def opened(store: MemoryStore) -> DeviceState:
        return DeviceState.load(store, claim_run(store))

    states = [opened(s) for s in stores]
    chat = next(s.id for s in states[0].spaces.values() if s.kind == "chat")

    def persist(i: int, batch: WriteBatch) -> None:
        state = states[i]
        vectors = WriteBatch(records=state.spaces.vector_records(batch.appends))
        stores[i].write(merge_batches([batch, vectors, state.take_unsaved()]))
        for space_id, _ in batch.appends:
            state.spaces[space_id].appended()

    written = 0
    for step in range(60):
        i = rng.randrange(2)
        state, replica = states[i], states[i].spaces[chat].replica
        op = rng.choice(["msg", "msg", "msg", "edit", "read", "drop", "load", "reopen", "sync"])
        if op in ("msg", "edit", "read"):
            entry = state.new_entry(chat, op, 1000 + step, body=f"{op} {step}", target="t")  # type: ignore[arg-type]
            _, batch = state.write_local(chat, [entry])
            persist(i, batch)
            written += op != "read"
        elif op == "drop":
            replica.unload()
        elif op == "load":
            replica.load()
        elif op == "reopen":
            states[i] = opened(stores[i])
            fresh = states[i].spaces[chat].replica
            assert not fresh.loaded
            told = fresh.state_vector()
            fresh.load()
            assert clocks(told) == clocks(fresh.state_vector()), f"step {step}"
        else:
            pair = Pair(states[0], states[1]).connect()
            pair.run()
            for end, k in ((pair.a, 0), (pair.b, 1)):
                persist(k, merge_batches([x.batch for x in end.ingested]))
    pair = Pair(states[0], states[1]).connect()
    pair.run()
    a, b = (s.spaces[chat].replica for s in states)
    assert clocks(a.state_vector()) == clocks(b.state_vector())
    keys = [sorted(k for k, _ in r.entries(m)) for r in (a, b) for m in (MESSAGES, EDITS)]
    assert keys[0] == keys[2]
    assert keys[1] == keys[3]
    assert len(keys[0]) + len(keys[1]) == written


# ---- updates applied and written without the document -------------------------------


def _entry(kind: str, device: str, n: int, target: str = "", body: str = "") -> Entry:
    return Entry(
        id=f"{device}-{kind}-{n}",
        kind=kind,  # type: ignore[arg-type]
        account=f"acct-{device}",
        device=device,
        ts=format_ts(1000 + n, 0),
        target=target,
        body=body or f"{kind} {n}",
        sig="c2ln",
    )


class _Lazy:
    """A replica whose history stays in a list (its store) and is loaded only when
    it must be, the way the node uses one: ``ingest`` tries without the document,
    then loads and applies on DocumentNeeded."""

    def __init__(self, space: str, client: int, indexed: set[tuple[str, str]]) -> None:
        self.stored: list[bytes] = []
        self.indexed = indexed
        self.space, self.client = space, client
        self.replica = self._reopen(b"\x00", {})
        self.aside = self.loads = 0

    def _reopen(self, vector: bytes, heads: dict[Any, Any] | None) -> Replica:
        return Replica(
            self.space,
            source=lambda: list(self.stored),
            client_id=self.client,
            state_vector=vector,
            heads=heads,
        )

    def held(self, keys: list[tuple[str, str]]) -> dict[Any, str]:
        return {k: "" for k in keys if k in self.indexed}

    def ingest(self, update: bytes) -> Applied:
        if not self.replica.loaded:
            try:
                applied = self.replica.apply(update, held=self.held)
            except DocumentNeeded:
                self.loads += 1
            else:
                self.aside += 1
                self.stored.append(update)
                self.indexed.update(applied.changed)
                return applied
        applied = self.replica.apply(update)
        self.stored.append(update)
        self.indexed.update(applied.changed)
        return applied

    def write(self, entries: list[Entry]) -> bytes:
        update = self.replica.write(entries)
        self.stored.append(update)
        self.indexed.update((e.map_name(), e.key()) for e in entries if e.map_name() in INDEXED)
        return update

    def drop(self) -> None:
        """Drop the document if loaded (as the node's idle sweep does)."""
        if self.replica.loaded:
            self.replica.unload()


@pytest.mark.parametrize("seed", range(8))
def test_updates_taken_without_the_document_change_what_the_document_would(seed: int) -> None:
    """Seeded: two devices write messages, edits, reactions, deletions, receipts and
    read markers (their own, replacing their earlier ones), and a third takes their
    updates in a random order, dropping its document now and then. Whatever it takes
    without the document reports the changes the loaded document reports for the
    same update, and at the end its document, side heads and state vector are those
    of a replica that applied everything loaded."""
    rng = random.Random(seed)
    space = "s"
    writers = [Replica(space, client_id=11), Replica(space, client_id=22)]
    names = ["a", "b"]
    reference = Replica(space, client_id=99)
    taker = _Lazy(space, 33, set())
    messages: list[str] = []
    pending: list[bytes] = []
    for step in range(60):
        w = rng.randrange(2)
        writer, device = writers[w], names[w]
        roll = rng.random()
        if roll < 0.4 or not messages:
            entries = [_entry("msg", device, step)]
            messages.append(entries[0].id)
        elif roll < 0.55:
            entries = [_entry("rcpt", device, step)]
        elif roll < 0.7:
            entries = [_entry("read", device, step)]
        elif roll < 0.8:
            entries = [_entry("react", device, step, target=rng.choice(messages))]
        elif roll < 0.9:
            entries = [_entry("edit", device, step, target=rng.choice(messages))]
        else:
            entries = [_entry("del", device, step, target=rng.choice(messages))]
        update = writer.write(entries)
        for other in writers:
            if other is not writer:
                other.apply(update)
        pending.append(update)
        # the taker receives some of what is pending, in order or not
        while pending and rng.random() < 0.6:
            at = 0 if rng.random() < 0.8 else rng.randrange(len(pending))
            got = pending.pop(at)
            expected = reference.apply(got)
            before = taker.aside
            applied = taker.ingest(got)
            if taker.aside > before:  # taken without the document
                assert applied.changed == expected.changed, f"step {step}"
            if rng.random() < 0.2:
                taker.drop()
        if rng.random() < 0.15:
            # a receipt of its own, replacing its earlier one (aside when unloaded)
            own = taker.write([_entry("rcpt", "c", step)])
            reference.apply(own)
            for other in writers:
                other.apply(own)
    for got in pending:
        reference.apply(got)
        taker.ingest(got)
    assert taker.aside > 0
    assert clocks(taker.replica.state_vector()) == clocks(reference.state_vector())
    heads = taker.replica.known_heads()
    taker.replica.load()
    assert clocks(taker.replica.state_vector()) == clocks(reference.state_vector())
    for name in (*INDEXED, *SIDE):
        assert dict(taker.replica.entries(name)) == dict(reference.entries(name)), name
    whole = side_heads(reference.snapshot())
    assert {k: v[2] for k, v in whole.items()} == {
        (m, k): v
        for m in SIDE
        for k, v in reference.side_values(m).items()  # type: ignore[union-attr]
    }
    if heads is not None:
        assert heads == whole


def _random_entry(rng: random.Random, device: str, step: int, messages: list[str]) -> Entry:
    """One entry of a random chat history: a message (its id joins ``messages``), a
    receipt or read marker moved on, a reaction to one of the first messages (so that
    reactions replace one another), an edit or a deletion."""
    roll = rng.random()
    if roll < 0.35 or not messages:
        entry = _entry("msg", device, step)
        messages.append(entry.id)
        return entry
    if roll < 0.55:
        return _entry("rcpt", device, step)
    if roll < 0.7:
        return _entry("read", device, step)
    if roll < 0.85:
        return _entry("react", device, step, target=rng.choice(messages[:4]))
    kind = "edit" if roll < 0.93 else "del"
    return _entry(kind, device, step, target=rng.choice(messages))


def _write_everywhere(
    writers: dict[str, Replica], device: str, entry: Entry, reference: Replica
) -> bytes:
    """``device``'s writer writes ``entry``; the update reaches the other writers and
    ``reference``. The update."""
    update = writers[device].write([entry])
    reference.apply(update)
    for other, replica in writers.items():
        if other != device:
            replica.apply(update)
    return update


@pytest.mark.parametrize("seed", range(6))
def test_a_folded_snapshot_is_taken_piece_by_piece_without_the_document(seed: int) -> None:
    """Seeded: two devices write over several runs each (a new CRDT client per run, as
    ``crdt_client`` makes them): messages, edits, deletions, reactions and receipts
    and read markers replacing their earlier ones, across runs. Their chat is folded
    into one snapshot (replaced items become runs of deleted content) and cut into
    small pieces. A replica new to the chat takes every piece without the document,
    following the key chains, and ends with what loading the snapshot gives: the same
    values, side heads and state vector."""
    rng = random.Random(seed)
    space = "s"
    runs = {"a": 0, "b": 0}
    prefix = {"a": 3, "b": 5}

    def new_run(device: str, history: bytes) -> Replica:
        runs[device] += 1
        replica = Replica(space, client_id=(prefix[device] << 17) | runs[device])
        if history:
            replica.apply(history)
        return replica

    reference = Replica(space, client_id=99)
    writers = {d: new_run(d, b"") for d in runs}
    messages: list[str] = []
    for step in range(120):
        device = rng.choice(list(runs))
        if rng.random() < 0.08:  # the device restarts: its next writes are a new client
            writers[device] = new_run(device, reference.snapshot())
        entry = _random_entry(rng, device, step, messages)
        _write_everywhere(writers, device, entry, reference)
    snapshot = reference.snapshot()
    pieces = list(split_update(snapshot, 400))
    assert len(pieces) > 10
    taker = _Lazy(space, 77, set())
    assert taker.replica.follow_chains(waits=True)
    for piece in pieces:
        taker.ingest(piece)
    assert taker.loads == 0, "every piece taken without the document"
    assert clocks(taker.replica.state_vector()) == clocks(reference.state_vector())
    heads = taker.replica.known_heads()
    assert heads == side_heads(snapshot)
    taker.replica.load()
    for name in (*INDEXED, *SIDE):
        assert dict(taker.replica.entries(name)) == dict(reference.entries(name)), name
        assert {k for m, k in taker.indexed if m == name} == (
            {k for k, _ in reference.entries(name)} if name in INDEXED else set()
        ), name


@pytest.mark.parametrize("seed", range(6))
def test_a_history_held_here_learns_its_key_chains_and_takes_the_rest_without_the_document(
    seed: int,
) -> None:
    """Seeded: two devices write messages, edits, deletions, reactions changed, and
    receipts and read markers moved on. A third held the first part of their history
    when it opened (it follows no chains: a reaction changed needs the document). It
    reads its key chains from what it holds (``learn_chains``, no document built),
    then takes the rest without the document, and ends with what a replica that
    applied everything loaded holds: values, side heads, state vector."""
    rng = random.Random(seed)
    space = "s"
    writers = {"a": Replica(space, client_id=11), "b": Replica(space, client_id=22)}
    reference = Replica(space, client_id=99)
    messages: list[str] = []
    updates: list[bytes] = []
    for step in range(120):
        device = rng.choice(list(writers))
        entry = _random_entry(rng, device, step, messages)
        updates.append(_write_everywhere(writers, device, entry, reference))
    held, rest = updates[:40], updates[40:]
    taker = _Lazy(space, 77, set())
    for update in held:
        taker.ingest(update)
    taker.replica = taker._reopen(taker.replica.state_vector(), taker.replica.known_heads())
    assert not taker.replica.follows_chains
    learnt = taker.replica.learn_chains(iter(taker.stored))
    assert learnt is not None
    assert taker.replica.use_chains(learnt)
    for update in rest:
        taker.ingest(update)
    assert taker.loads == 0, "every update taken without the document"
    assert clocks(taker.replica.state_vector()) == clocks(reference.state_vector())
    assert taker.replica.known_heads() == side_heads(reference.snapshot())
    taker.replica.load()
    for name in (*INDEXED, *SIDE):
        assert dict(taker.replica.entries(name)) == dict(reference.entries(name)), name


def test_key_chains_are_learnt_from_a_history_stored_out_of_order() -> None:
    """A device stores updates as they arrive: a live one can come (and be stored, yrs
    holding it back) before the catch-up piece it continues. Reading the chains, such
    an update waits until the one it continues is read, as yrs makes it wait; the
    chains then take a reaction changed without the document."""
    space = "s"
    writer = Replica(space, client_id=11)
    opened = writer.write([_entry("msg", "a", 1), _entry("react", "a", 2, target="a-msg-1")])
    piece = writer.write([_entry("msg", "a", 3)])
    live = writer.write([_entry("msg", "a", 4), _entry("read", "a", 4)])
    changed = writer.write([_entry("react", "a", 5, target="a-msg-1")])
    taker = _Lazy(space, 33, set())
    taker.ingest(opened)
    taker.replica.load()
    for update in (live, piece):  # stored in the order they came
        taker.ingest(update)
    assert taker.stored == [opened, live, piece]
    taker.replica = taker._reopen(taker.replica.state_vector(), side_heads(writer.snapshot()))
    learnt = taker.replica.learn_chains(iter(taker.stored))
    assert learnt is not None
    assert taker.replica.use_chains(learnt)
    applied = taker.replica.apply(changed, held=taker.held)
    assert applied.changed == {("r", "a-msg-1/acct-a"): again_value(writer)}
    assert not taker.replica.loaded


def test_reading_key_chains_holds_a_bounded_amount_of_a_history_out_of_order() -> None:
    """Updates stored before the one they continue are held while the chains are read,
    up to ``LEARN_LATER`` bytes: a history further out of order (a member's device
    can store it so) is left to the document rather than held in memory."""
    space = "s"
    writer = Replica(space, client_id=11)
    first = writer.write([_entry("msg", "a", 0)])
    gap = writer.write([_entry("msg", "a", 1)])
    rest = [  # few updates, each of five long messages
        writer.write([_entry("msg", "a", 10 * n + i, body="x" * 60_000) for i in range(5)])
        for n in range(1, 21)
    ]
    assert sum(map(len, rest)) > LEARN_LATER
    held = Replica(space, source=list, client_id=33, state_vector=b"\x00", heads={})
    assert held.learn_chains(iter([first, *rest, gap])) is None
    assert held.learn_chains(iter([first, *rest[:5], gap, *rest[5:]])) is not None


def test_own_reactions_and_deletions_are_written_aside_while_the_key_chains_are_followed() -> None:
    """Following the key chains (read from the history held here), a replica writes its
    reaction changed, a reaction on a message it had not reacted to, and a deletion
    without its history: each names the item its key's list ends with (and deletes
    it), as ``Map.set`` would. Applied to the whole document they leave the values a
    loaded writer leaves; without the chains such a write loads the history."""
    space = "s"
    other = Replica(space, client_id=11)
    history = [
        other.write([_entry("msg", "a", 1), _entry("msg", "a", 2)]),
        other.write([_entry("react", "c", 3, target="a-msg-1")]),
    ]
    whole = Replica(space, client_id=99)
    for update in history:
        whole.apply(update)
    taker = _Lazy(space, 33, set())
    for update in history:
        taker.ingest(update)
    taker.replica = taker._reopen(taker.replica.state_vector(), taker.replica.known_heads())
    assert not taker.replica.writes_aside(["react"])
    learnt = taker.replica.learn_chains(iter(taker.stored))
    assert learnt is not None
    assert taker.replica.use_chains(learnt)
    assert taker.replica.writes_aside(["react", "del"])
    changed = taker.write([_entry("react", "c", 4, target="a-msg-1")])
    again = taker.write([_entry("react", "c", 5, target="a-msg-1")])  # follows ours
    fresh = taker.write([_entry("react", "c", 6, target="a-msg-2")])
    deleted = taker.write([_entry("del", "c", 7, target="a-msg-2")])
    assert not taker.replica.loaded
    for update in (changed, again, fresh, deleted):
        whole.apply(update)
    reactions = dict(whole.entries(REACTIONS))
    assert reactions["a-msg-1/acct-c"].body == "react 5"  # type: ignore[union-attr]
    assert reactions["a-msg-2/acct-c"].body == "react 6"  # type: ignore[union-attr]
    assert set(dict(whole.entries(DELETIONS))) == {"a-msg-2"}
    taker.replica.load()
    for name in (*INDEXED, *SIDE):
        assert dict(taker.replica.entries(name)) == dict(whole.entries(name)), name


def test_key_chains_are_not_learnt_from_a_history_with_a_fork_nor_used_once_it_moved_on() -> None:
    """A history in which two items follow one (two devices replacing the same read
    marker at once) has no chains to learn: only the document orders the fork. Chains
    read from a history that grew meanwhile (a write of ours while they were read)
    are not used: they would not know the newest items."""
    space = "s"
    base = Replica(space, client_id=1)
    first = base.write([_entry("read", "a", 1)])
    left, right = Replica(space, client_id=2), Replica(space, client_id=3)
    for r in (left, right):
        r.apply(first)
    forked = [first, left.write([_entry("read", "a", 2)]), right.write([_entry("read", "a", 3)])]
    taker = _Lazy(space, 77, set())
    for update in forked:
        taker.ingest(update)
    taker.replica = taker._reopen(taker.replica.state_vector(), taker.replica.known_heads())
    assert taker.replica.learn_chains(iter(taker.stored)) is None
    plain = _Lazy(space, 78, set())
    plain.ingest(first)
    plain.replica = plain._reopen(plain.replica.state_vector(), plain.replica.known_heads())
    learnt = plain.replica.learn_chains(iter(plain.stored))
    assert learnt is not None
    plain.write([_entry("msg", "c", 9)])  # written aside: the history moved on
    assert not plain.replica.loaded
    assert not plain.replica.use_chains(learnt)
    assert not plain.replica.follows_chains


def test_a_chain_that_forks_or_deletes_a_value_needs_the_document() -> None:
    """What the key chains cannot name goes to the document, and changes nothing
    before: an item following one that is not the tail of its key (two devices
    replacing the same receipt at once), and a delete set naming a value."""
    space = "s"
    base = Replica(space, client_id=1)
    first = base.write([_entry("read", "a", 1)])
    left, right = Replica(space, client_id=2), Replica(space, client_id=3)
    for r in (left, right):
        r.apply(first)
    fork_a = left.write([_entry("read", "a", 2)])
    fork_b = right.write([_entry("read", "a", 3)])
    taker = _Lazy(space, 77, set())
    assert taker.replica.follow_chains(waits=True)
    taker.ingest(first)
    taker.ingest(fork_a)
    vector = taker.replica.state_vector()
    with pytest.raises(DocumentNeeded):
        taker.replica.apply(fork_b, held=taker.held)
    assert taker.replica.state_vector() == vector
    message = base.write([_entry("msg", "a", 4)])
    taker.ingest(message)
    clock = clocks(base.state_vector())[1] - 1  # the message's item
    erase = bytes([0, 1, 1, 1, clock, 1])  # no structs; delete set: client 1, that clock
    with pytest.raises(DocumentNeeded):
        taker.replica.apply(erase, held=taker.held)
    assert not taker.replica.loaded


def test_a_fork_found_when_waiting_items_come_in_or_a_message_opened_twice_needs_the_document() -> (
    None
):
    """Two items waiting for the same one (two devices replaced one receipt at once,
    both seen before it): the second cannot follow the first's key, so the document
    judges. A message key opened again by a deleted item (which yrs would put last,
    hiding the message) goes to the document too."""
    space = "s"
    base = Replica(space, client_id=1)
    first = base.write([_entry("read", "a", 1)])
    forks = []
    for client, n in ((2, 2), (3, 3)):
        other = Replica(space, client_id=client)
        other.apply(first)
        forks.append(strip_deletions(other.write([_entry("read", "a", n)]), lambda _: False))
    taker = _Lazy(space, 77, set())
    assert taker.replica.follow_chains(waits=True)
    for fork in forks:
        taker.ingest(fork)
    assert taker.aside == 2
    with pytest.raises(DocumentNeeded):
        taker.replica.apply(first, held=taker.held)

    taker = _Lazy(space, 77, set())
    assert taker.replica.follow_chains(waits=True)
    message = _entry("msg", "a", 4)
    taker.ingest(Replica(space, client_id=1).write([message]))
    doc: pycrdt.Doc[Any] = pycrdt.Doc(client_id=5)
    messages = doc.get(MESSAGES, type=pycrdt.Map)
    messages[message.key()] = message.to_value()
    del messages[message.key()]
    with pytest.raises(DocumentNeeded):
        taker.replica.apply(bytes(doc.get_update()), held=taker.held)
    assert not taker.replica.loaded


def test_an_item_waits_for_the_item_it_follows_and_its_key_is_known_once_it_comes() -> None:
    """A read marker replaced in a later run (a higher client) comes first: it waits,
    unindexed and out of the side heads (which are not stated meanwhile), and takes
    its key when the item it follows arrives. Were the document to load while it
    waits, the chains say so (its key then changes unwatched: the index is rebuilt).
    Chains a catch-up begins (not a link's) let no item wait: the document judges it."""
    space = "s"
    first_run = Replica(space, client_id=1)
    second_run = Replica(space, client_id=2)
    second_run.apply(first_run.write([_entry("read", "a", 1)]))
    second_run.write([_entry("read", "a", 2)])
    folded = second_run.snapshot()  # the first marker is a run of deleted content now
    replaced = strip_deletions(trim_update(folded, {1: 1}) or b"", lambda _: False)
    opened = trim_update(folded, {2: 1}) or b""  # with the delete set
    catching_up = _Lazy(space, 77, set())  # chains begin by themselves, and never wait
    with pytest.raises(DocumentNeeded):
        catching_up.replica.apply(replaced, held=catching_up.held)
    assert catching_up.ingest(opened).changed == {}
    assert catching_up.aside == 1
    assert catching_up.ingest(replaced).changed == {}
    assert catching_up.aside == 2
    assert catching_up.replica.known_heads() == side_heads(folded)
    for load_while_waiting in (False, True):
        taker = _Lazy(space, 77, set())
        assert taker.replica.follow_chains(waits=True)
        applied = taker.ingest(replaced)
        assert applied.changed == {}
        assert taker.aside == 1
        assert taker.replica.known_heads() is None
        assert taker.replica.chains_unresolved
        if load_while_waiting:
            taker.replica.load()
            taker.ingest(opened)
            assert taker.replica.chains_unresolved  # the index must be built again
            continue
        taker.ingest(opened)
        assert taker.aside == 2
        assert not taker.replica.chains_unresolved
        heads = taker.replica.known_heads()
        assert heads is not None
        assert heads[(READ_MARKERS, "a")][2]["ts"] == format_ts(1002, 0)
        taker.replica.unload()
        assert not taker.replica.chains_unresolved


def test_a_history_written_with_its_document_loaded_is_taken_without_it() -> None:
    """Updates a device wrote with its chat loaded (each batch: messages, its read
    marker moved on and its reaction changed) carry the document's whole delete set,
    with adjacent replaced items merged into one range. A replica new to the chat
    takes every one without the document (the replaced values are known deleted), and
    ends with the writer's values and side heads."""
    phone, _ = DeviceState.create_account("phone")
    chat = phone.chat_by_name(NOTES).id
    updates, opening = [], ""
    for batch in range(6):
        entries = [phone.new_entry(chat, "msg", 1000 + batch * 10 + i) for i in range(4)]
        opening = opening or entries[0].id
        entries += [
            phone.new_entry(chat, "read", 1000 + batch * 10, body=entries[-1].ts),
            phone.new_entry(chat, "react", 1000 + batch * 10, target=opening, body=str(batch)),
        ]
        updates.append(phone.write_local(chat, entries)[0])
    taker = _Lazy(chat, 77, set())
    for update in updates:
        taker.ingest(update)
    assert taker.loads == 0
    writer = phone.space(chat).replica
    assert taker.replica.known_heads() == side_heads(writer.snapshot())
    taker.replica.load()
    for name in (*INDEXED, *SIDE):
        assert dict(taker.replica.entries(name)) == dict(writer.entries(name)), name


def test_what_only_the_document_knows_makes_it_load_and_changes_nothing() -> None:
    """A reaction replacing another and a message under a key the index holds each
    need the document once the replica holds a history it did not follow (opened from
    its store): DocumentNeeded, and the replica states what it stated before. One
    following the key chains from empty takes the reaction changed (its index row
    rewritten). An update of structs held already changes nothing, without the
    document."""
    space = "s"
    writer = Replica(space, client_id=11)
    first = writer.write([_entry("msg", "a", 1)])
    react = writer.write([_entry("react", "a", 2, target="a-msg-1")])
    again = writer.write([_entry("react", "a", 3, target="a-msg-1")])  # replaces: origin
    following = _Lazy(space, 33, set())
    for update in (first, react):
        following.ingest(update)
    assert following.ingest(again).changed == {("r", "a-msg-1/acct-a"): again_value(writer)}
    assert following.aside == 3
    taker = _Lazy(space, 33, set())
    taker.ingest(first)
    taker.ingest(react)
    assert taker.aside == 2
    taker.replica = taker._reopen(taker.replica.state_vector(), taker.replica.known_heads())
    vector = taker.replica.state_vector()
    with pytest.raises(DocumentNeeded):
        taker.replica.apply(again, held=taker.held)
    repeated = taker.replica.apply(first, held=taker.held)  # all held: changes nothing
    assert repeated.changed == {}
    clash = Replica(space, client_id=5).write([_entry("msg", "a", 1)])  # same key, new item
    with pytest.raises(DocumentNeeded):
        taker.replica.apply(clash, held=taker.held)
    assert taker.replica.state_vector() == vector
    assert not taker.replica.loaded


def test_a_write_with_the_document_loaded_carries_only_its_own_deletions() -> None:
    """An update written with the chat's document loaded carries the deletions its
    transaction made, not the document's whole delete set: a peer holding the chat
    without its document (a history it did not follow, side heads known) then takes a
    read marker moved on and a message without loading. Carrying every earlier
    replaced marker, such an update made every such peer load the chat (the phone of
    S8C peaked at 815 MB on a laptop's receipts)."""
    space = "s"
    writer = Replica(space, client_id=11)
    assert writer.loaded
    history = [writer.write([_entry("msg", "a", 1), _entry("read", "a", 1)])]
    history += [writer.write([_entry("read", "a", n)]) for n in (2, 3)]
    taker = _Lazy(space, 33, set())
    for update in history:
        taker.ingest(update)
    taker.replica = taker._reopen(taker.replica.state_vector(), taker.replica.known_heads())
    moved_on = writer.write([_entry("msg", "a", 4), _entry("read", "a", 4)])
    assert len(strip_deletions(moved_on, lambda _: False)) < len(moved_on)  # deletes one
    applied = taker.replica.apply(moved_on, held=taker.held)
    assert not taker.replica.loaded
    assert ("m", "a-msg-4") in applied.changed
    assert taker.replica.side_values(READ_MARKERS) == writer.side_values(READ_MARKERS)


def again_value(writer: Replica) -> Any:
    """The reaction ``writer`` holds now (its map ``r``'s only value)."""
    (value,) = (v for _, v in writer.doc.get("r", type=pycrdt.Map).items())
    return value


def test_own_receipts_written_aside_replace_the_previous_one() -> None:
    """With its side heads known, a replica writes its receipt and read marker
    without its history, naming the items they replace: applied to the whole
    document they leave one value under each key, the newest."""
    space = "s"
    whole = Replica(space, client_id=44)
    whole.write([_entry("rcpt", "c", 1), _entry("read", "c", 1)])
    heads = side_heads(whole.snapshot())
    lazy = Replica(
        space,
        source=lambda: [whole.snapshot()],
        client_id=44,
        state_vector=whole.state_vector(),
        heads=heads,
    )
    assert lazy.writes_aside(["rcpt", "read"])
    updates = [lazy.write([_entry("rcpt", "c", n), _entry("read", "c", n)]) for n in (2, 3)]
    assert not lazy.loaded
    for update in updates:
        whole.apply(update)
    assert whole.side_values(RECEIPTS) == lazy.side_values(RECEIPTS)
    assert whole.side_values(RECEIPTS)["c"]["b"] == "rcpt 3"  # type: ignore[index]
    assert side_heads(whole.snapshot()) == lazy.known_heads()
    assert clocks(lazy.state_vector()) == clocks(whole.state_vector())


def reacted(node: Node, emoji: str) -> bool:
    """Whether some message of ``node``'s notes shows the reaction ``emoji``."""
    return any(emoji in m.reactions.values() for m in node.messages())


def test_a_reaction_changed_in_a_chat_held_here_is_taken_without_its_document(
    homes: list[Path],
) -> None:
    """Two devices level on a chat with a reaction restart (neither follows key chains
    then); the phone changes its reaction. The laptop reads the chat's key chains from
    its store (no document built) and takes the change without loading the chat: the
    new reaction shows. Then it changes the account's reaction itself, still without
    the chat. It loaded the whole chat for each before."""

    async def main() -> None:
        with trio.fail_after(60):
            async with phone_and_laptop(homes) as (phone, laptop):
                first = await phone.send("react to me")
                for i in range(3):
                    await phone.send(f"m{i}")
                await phone.react(first, "+1")
                await wait_for(lambda: any(m.reactions for m in laptop.messages()))
            async with phone_and_laptop(homes) as (phone, laptop):
                await vectors_exchanged(phone, laptop)
                held = notes_of(laptop).replica
                # level first: a live struct overtaking a catch-up piece loads the chat
                # (architecture.md, Known limits (b)), whatever the key chains know
                await wait_for(
                    lambda: (
                        clocks(notes_of(phone).replica.state_vector())
                        == clocks(held.state_vector())
                    )
                )
                assert not held.loaded
                assert not held.follows_chains
                await phone.react(first, "heart")
                await wait_for(lambda: reacted(laptop, "heart"))
                assert not held.loaded
                assert held.follows_chains
                await laptop.react(first, "laugh")  # the account's reaction, changed again
                await wait_for(lambda: reacted(phone, "laugh"))
                assert not held.loaded

    trio.run(main)


def test_a_reaction_changed_that_comes_by_mail_is_taken_without_the_chat(
    homes: list[Path], relay: Relay
) -> None:
    """The laptop is off while the phone changes its reaction: the envelope waits in
    the laptop's relay mailbox. The laptop starts alone, drains it, reads the chat's key
    chains from its store and takes the reaction without loading the chat."""
    relays = [relay.url]

    def mails() -> int:
        with contextlib.closing(sqlite3.connect(relay.data / "relay.db")) as conn:
            count: int = conn.execute("SELECT count(*) FROM mail").fetchone()[0]
            return count

    async def main() -> None:
        with trio.fail_after(60):
            async with (
                tcp_node(homes[0], relays=relays) as phone,
                tcp_node(homes[1], peers=[phone.address], relays=relays) as laptop,
            ):
                first = await phone.send("react to me")
                await phone.react(first, "+1")
                await wait_for(lambda: any(m.reactions for m in laptop.messages()))
            async with tcp_node(homes[0], relays=relays) as phone:
                await phone.relays[0].wait_connected()
                before = mails()
                await phone.react(first, "heart")
                await wait_for(lambda: mails() > before)
            async with tcp_node(homes[1], relays=relays) as laptop:
                held = notes_of(laptop).replica
                await wait_for(lambda: reacted(laptop, "heart"))
                assert not held.loaded
                assert held.follows_chains

    trio.run(main)


def test_live_messages_and_receipts_load_no_chat(homes: list[Path]) -> None:
    """Two devices level on a chat restart; messages go back and forth, each one's
    delivery receipt comes back, and each marks the chat read: neither loads the
    chat's document (a receipt replaced the previous one only in the document
    before), and every receipt and marker shows where it should."""

    async def main() -> None:
        with trio.fail_after(60):
            async with level_then_reopened(homes, 40) as (phone, laptop):
                for i in range(3):
                    await phone.send(f"live {i}")
                    await laptop.send(f"reply {i}")
                await wait_for(lambda: len(phone.messages()) == len(laptop.messages()) == 46)
                await laptop.mark_read()
                await phone.mark_read()
                last = phone.messages()[-1]

                def marked(node: Node, device: str) -> bool:
                    markers = notes_of(node).replica.side_values(READ_MARKERS) or {}
                    return markers.get(device, {}).get("b") == last.ts

                await wait_for(lambda: marked(phone, laptop.device_id))
                await wait_for(lambda: marked(laptop, phone.device_id))
                receipts = notes_of(phone).replica.side_values
                await wait_for(lambda: laptop.device_id in (receipts(RECEIPTS) or {}))
                assert not notes_of(phone).replica.loaded
                assert not notes_of(laptop).replica.loaded
                logged = await phone.log()  # the delivery view reads the document
                assert logged[-1].message.text == "reply 2"
                mine = [m for m in logged if m.message.text == "live 2"]
                assert mine[0].status == "delivered"  # one account: "read" needs another
                assert mine[0].delivery.read_by == (laptop.device_id,)

    trio.run(main)


@pytest.mark.parametrize("part", [1 << 20, 256], ids=["one-part", "parts"])
def test_a_catch_up_from_the_store_brings_what_the_document_diff_brings(part: int) -> None:
    """Answered from the store (snapshot, then a page of stored updates at a time,
    each trimmed to what the peer lacks), a catch-up leaves the peer with the document
    the whole diff leaves it with, in about as many bytes, starting past every stored
    update the peer holds whole."""
    store = MemoryStore()
    state, batch = DeviceState.create_account("phone")
    store.write(batch)
    chat = next(s.id for s in state.spaces.values() if s.kind == "chat")
    written = []
    for i in range(40):
        entry = state.new_entry(chat, "msg", 1000 + i, body=f"m{i}")
        update, batch = state.write_local(chat, [entry])
        written.append(update)
        store.write(batch)
        if i == 19:  # the first half folded into a snapshot
            space = state.spaces[chat]
            parts = [bytes(p) for p in split_update(space.replica.snapshot(), part)]
            assert (len(parts) > 1) == (part == 256)
            store.compact(chat, parts, store.log_seqs(chat)[1])
    whole = state.spaces[chat].replica
    last = store.log_seqs(chat)[1]
    store.write(WriteBatch(records=vector_record(chat, last, whole.state_vector())))
    for held in (0, 10, 20, 30, 40):
        peer = Replica(chat, client_id=7)
        for update in written[:held]:
            peer.apply(update)
        vector = peer.state_vector()
        reopened = DeviceState.load(store)
        assert reopened.answers_from_store(chat)
        start = reopened.first_needed(chat, vector)
        pieces = list(reopened.stored_pieces(chat, vector, None, start, 1024))
        assert not reopened.spaces[chat].replica.loaded
        for piece in pieces:
            assert len(piece) <= 1024
            peer.apply(piece)
        assert clocks(peer.state_vector()) == clocks(whole.state_vector())
        assert sorted(peer.entries(MESSAGES)) == sorted(whole.entries(MESSAGES))
        raw = len(whole.diff(vector)) if held < 40 else 0
        assert sum(map(len, pieces)) <= 1.05 * raw + 16 * len(pieces), held
        assert (held >= 20) == (start > 0), held  # past the snapshot once held whole


class _PartReader(MemoryStore):
    """A store that records the snapshot parts read and can compact the chat again
    right after part 1 is read (as the writer may, in another worker thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.parts_read: list[int] = []
        self.after_part_1: Callable[[], None] | None = None

    def snapshot_part(self, space: str, part: int) -> tuple[int, bytes] | None:
        read = super().snapshot_part(space, part)
        self.parts_read.append(part)
        if part == 1 and self.after_part_1 is not None:
            then, self.after_part_1 = self.after_part_1, None
            then()
        return read

    def load_space(self, space: str) -> SpaceLog:
        raise AssertionError("a catch-up from the store read the whole snapshot")


@pytest.mark.parametrize("new_part", [128, 1 << 20], ids=["more-parts", "one-part"])
def test_a_catch_up_from_the_store_reads_one_part_at_a_time_and_survives_a_compaction(
    new_part: int,
) -> None:
    """A catch-up answered from the store takes the snapshot a part at a time, never
    the whole of it. When the chat is compacted again between two parts (into more
    parts, or fewer), what the peer gets is still the whole chat: the parts are read
    again from the new snapshot's first, not mixed with the old one's."""
    store = _PartReader()
    state, batch = DeviceState.create_account("phone")
    store.write(batch)
    chat = next(s.id for s in state.spaces.values() if s.kind == "chat")
    for i in range(40):
        entry = state.new_entry(chat, "msg", 1000 + i, body=f"m{i} " + "x" * 40)
        store.write(state.write_local(chat, [entry])[1])
        if i == 19:
            parts = [bytes(p) for p in split_update(state.spaces[chat].replica.snapshot(), 256)]
            store.compact(chat, parts, store.log_seqs(chat)[1])
    whole = state.spaces[chat].replica
    last = store.log_seqs(chat)[1]
    store.write(WriteBatch(records=vector_record(chat, last, whole.state_vector())))
    assert len(MemoryStore.load_space(store, chat).snapshot_parts) > 2

    def compact_again() -> None:
        snapshot = whole.snapshot()
        store.compact(chat, [bytes(p) for p in split_update(snapshot, new_part)], last)

    store.after_part_1 = compact_again
    reopened = DeviceState.load(store)
    peer = Replica(chat, client_id=7)
    vector = peer.state_vector()
    for piece in reopened.stored_pieces(chat, vector, None, 0, 1024):
        peer.apply(piece)
    assert store.after_part_1 is None  # the compaction came between two parts
    # part 2 is the new snapshot's (another seq) or none (fewer parts): from 0 again
    assert store.parts_read[:4] == [0, 1, 2, 0]
    assert clocks(peer.state_vector()) == clocks(whole.state_vector())
    assert sorted(peer.entries(MESSAGES)) == sorted(whole.entries(MESSAGES))


def _chat_with_log(store: MemoryStore, count: int) -> tuple[DeviceState, str]:
    """A phone's state whose chat holds ``count`` stored updates (no snapshot) and a
    current ``sv/`` record, so that a reopened state answers a catch-up from the store."""
    state, batch = DeviceState.create_account("phone")
    store.write(batch)
    chat = next(s.id for s in state.spaces.values() if s.kind == "chat")
    for i in range(count):
        entry = state.new_entry(chat, "msg", 1000 + i, body=f"m{i}")
        store.write(state.write_local(chat, [entry])[1])
    replica = state.spaces[chat].replica
    last = store.log_seqs(chat)[1]
    store.write(WriteBatch(records=vector_record(chat, last, replica.state_vector())))
    return state, chat


def test_a_catch_up_from_the_store_ends_where_the_log_ended_when_it_began() -> None:
    """Updates stored while a catch-up from the store is being sent are not part of
    it: they reach the peer as gossip. Read to the log's moving end, two devices each
    catching the other up sent each other back, without end, every update each stored
    of the other's catch-up (a random convergence history livelocked on it)."""
    store = MemoryStore()
    state, chat = _chat_with_log(store, 20)
    before = clocks(state.spaces[chat].replica.state_vector())
    reopened = DeviceState.load(store)
    peer = Replica(chat, client_id=7)
    pieces = reopened.stored_pieces(chat, peer.state_vector(), None, 0, 1 << 20)
    peer.apply(next(pieces))
    for i in range(12):  # stored meanwhile, more than a page of them
        entry = state.new_entry(chat, "msg", 2000 + i, body=f"later {i}")
        store.write(state.write_local(chat, [entry])[1])
    rest = list(pieces)
    for piece in rest:
        peer.apply(piece)
    assert len(rest) == 19
    assert clocks(peer.state_vector()) == before


class _FoldingReader(MemoryStore):
    """A store whose chat is folded into a snapshot right after the first page of its
    updates is read (as the writer may, in another worker thread)."""

    fold: Callable[[], None] | None = None

    def space_rows(self, space: str, after_seq: int, limit: int) -> list[tuple[int, bytes]]:
        rows = super().space_rows(space, after_seq, limit)
        if self.fold is not None:
            then, self.fold = self.fold, None
            then()
        return rows


@pytest.mark.parametrize("reads", [1, 9], ids=["after-a-page", "after-two-pages"])
def test_a_catch_up_from_the_store_survives_a_fold_of_updates_it_has_not_read(
    reads: int,
) -> None:
    """A compaction that folds updates the catch-up has not read yet into the snapshot
    sends the reader back to that snapshot: the peer still gets the whole chat (the
    rows after the reader's seq were gone, and the peer silently lacked them)."""
    store = _FoldingReader()
    state, chat = _chat_with_log(store, 30)
    whole = state.spaces[chat].replica
    last = store.log_seqs(chat)[1]

    def fold() -> None:
        store.compact(chat, [bytes(p) for p in split_update(whole.snapshot(), 256)], last)

    reopened = DeviceState.load(store)
    peer = Replica(chat, client_id=7)
    pieces = reopened.stored_pieces(chat, peer.state_vector(), None, 0, 1 << 20)
    for _ in range(reads):
        peer.apply(next(pieces))  # the first page is read
    store.fold = fold
    for piece in pieces:
        peer.apply(piece)
    assert store.fold is None
    assert store.log_seqs(chat)[0] == last
    assert clocks(peer.state_vector()) == clocks(whole.state_vector())
    assert sorted(peer.entries(MESSAGES)) == sorted(whole.entries(MESSAGES))


def test_a_catch_up_from_a_snapshot_in_parts_holds_one_part_at_a_time(tmp_path: Path) -> None:
    """What a catch-up from the store allocates is about one part, not the snapshot:
    a chat folded into parts of 16 KiB is answered holding well under a tenth of it
    (a snapshot read whole would be read once by SQLite and once into Python)."""
    store = SqliteStore(tmp_path / "p2p.db", synchronous="OFF")
    state, batch = DeviceState.create_account("phone")
    store.write(batch)
    chat = next(s.id for s in state.spaces.values() if s.kind == "chat")
    for b in range(4):
        entries = [
            state.new_entry(chat, "msg", 1000 + 300 * b + i, body=f"{i} " + "x" * 300)
            for i in range(300)
        ]
        store.write(state.write_local(chat, entries)[1])
    whole = state.spaces[chat].replica
    snapshot = whole.snapshot()
    last = store.log_seqs(chat)[1]
    store.compact(chat, [bytes(p) for p in split_update(snapshot, 16 * 1024)], last)
    store.write(WriteBatch(records=vector_record(chat, last, whole.state_vector())))
    store.close()
    store = SqliteStore(tmp_path / "p2p.db")
    try:
        reopened = DeviceState.load(store)
        peer = Replica(chat, client_id=7)
        vector = peer.state_vector()
        pieces = reopened.stored_pieces(chat, vector, None, 0, 64 * 1024)
        tracemalloc.start()
        try:
            sent = 0
            for piece in pieces:
                sent += len(piece)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    finally:
        store.close()
    assert len(snapshot) > 300_000
    assert sent >= len(snapshot)
    assert peak < len(snapshot) / 10, (peak, len(snapshot))


def test_an_unloaded_chat_is_not_folded_into_a_snapshot(
    homes: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Folding a log into a snapshot needs the document: a chat taking updates without
    it is folded later, when loaded, not loaded for it on the node's thread."""
    monkeypatch.setattr("p2p.runtime.writer.COMPACT_AFTER", 3)

    async def main() -> None:
        with trio.fail_after(60):
            async with level_then_reopened(homes, 4) as (phone, laptop):
                for i in range(6):
                    await phone.send(f"past the fold {i}")
                await wait_for(lambda: len(laptop.messages()) == 10)
                assert not notes_of(laptop).replica.loaded
                assert not notes_of(phone).replica.loaded

    trio.run(main)


def test_an_update_partly_held_is_taken_for_what_it_adds() -> None:
    """A catch-up racing gossip brings structs held already along with new ones: the
    held ones are left out (yrs would skip them too) and the rest is taken without the
    document, reporting only the new keys."""
    space = "s"
    writer = Replica(space, client_id=11)
    first = writer.write([_entry("msg", "a", 1), _entry("rcpt", "a", 1)])
    writer.write([_entry("msg", "a", 2)])
    writer.write([_entry("rcpt", "a", 3)])  # replaces the first receipt
    taker = _Lazy(space, 33, set())
    taker.ingest(first)
    everything = writer.diff(b"\x00")  # from clock 0: the first update again, and more
    applied = taker.ingest(everything)
    assert taker.aside == 2
    assert not taker.replica.loaded
    assert set(applied.changed) == {(MESSAGES, "a-msg-2")}
    assert clocks(taker.replica.state_vector()) == clocks(writer.state_vector())
    assert (taker.replica.side_values(RECEIPTS) or {})["a"]["b"] == "rcpt 3"


def test_judging_what_an_unloaded_chat_takes_keeps_nothing_per_message() -> None:
    """A message taken without the document is judged once, into the message index:
    the replica keeps no cache of that signature check. It kept one per message, for
    as long as the node ran (a linked chat of 300,000 held ~30 MB of them). With the
    document loaded, whose readers judge its values again, checks are cached."""
    space = "s"
    writer = Replica(space, client_id=11)
    taker = _Lazy(space, 33, set())
    updates = [writer.write([_entry("msg", "a", i)]) for i in range(50)]

    def judged(replica: Replica, applied: Applied) -> list[str]:
        return [
            type(replica.judge_key(m, k, lambda device: None, lambda d, a: True, v)[1]).__name__
            for (m, k), v in applied.changed.items()
        ]

    verdicts = []
    for update in updates:
        verdicts += judged(taker.replica, taker.ingest(update))
    assert taker.aside == 50
    assert verdicts == ["Rejected"] * 50  # no key for device "a": the same verdict either way
    assert len(taker.replica._verified) == 0
    loaded = Replica(space, client_id=44)
    for update in updates:
        assert judged(loaded, loaded.apply(update)) == ["Rejected"]
    assert len(loaded._verified) == 50
