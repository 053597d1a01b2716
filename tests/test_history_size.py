"""Histories of any size, sans-I/O: cutting updates into bounded pieces
(``p2p.proto.ysplit``), and the sync rules that move a large catch-up as many envelopes, one
frame at a time, resumable from the receiver's state vector.

The real processes (``p2p link``/``p2p run`` past 16 MiB, SIGKILL in the middle) are in
test_history_procs.py.
"""

from __future__ import annotations

import contextlib
import random

import pycrdt
import pytest
import trio
import trio.testing
from test_sync_session import WALL, new_account, notes, view

import p2p.proto.envelope
import p2p.proto.session
from p2p import events as ev
from p2p import testing
from p2p.errors import InvalidUpdate, MalformedFrame
from p2p.proto.identity import DeviceKeys
from p2p.proto.model import MAX_UPDATE
from p2p.proto.session import SessionState
from p2p.proto.wire import MAX_FRAME
from p2p.proto.ysplit import split_update
from p2p.proto.yupdate import check_update
from p2p.runtime.node import open_node
from p2p.state.device import DeviceState
from p2p.testing.sessions import Pair
from p2p.transport.memory import Faults, MemoryNetwork

MAPS = ("m", "e", "x", "r", "k", "v", "c", "l")


def history(state: DeviceState, space: str, n: int, *, seed: int = 1, size: int = 200) -> None:
    """``n`` messages of random length (up to ``size``), 500 per CRDT transaction."""
    rng = random.Random(seed)
    for start in range(0, n, 500):
        entries = [
            state.new_entry(space, "msg", WALL + i, body=f"{i} " + "x" * rng.randint(1, size))
            for i in range(start, min(n, start + 500))
        ]
        state.write_local(space, entries)


def content(doc: pycrdt.Doc) -> dict[str, dict[str, object]]:
    return {name: dict(doc.get(name, type=pycrdt.Map).items()) for name in MAPS}


def rich_doc() -> pycrdt.Doc:
    """Two writers, overwritten keys (deletions in the delete set), a long string."""
    a, b = pycrdt.Doc(client_id=7), pycrdt.Doc(client_id=9)
    for i in range(300):
        a.get("m", type=pycrdt.Map)[f"a{i}"] = {"b": "x" * (i % 50), "n": i}
        b.get("m", type=pycrdt.Map)[f"b{i}"] = {"b": "y" * (i % 70), "n": i}
    for doc, other in ((a, b), (b, a)):
        doc.apply_update(other.get_update(doc.get_state()))
    for i in range(200):  # overwrites: each deletes the value before
        (a if i % 2 else b).get("r", type=pycrdt.Map)["marker"] = f"read {i}"
        a.apply_update(b.get_update(a.get_state()))
        b.apply_update(a.get_update(b.get_state()))
    b.get("e", type=pycrdt.Map)["long"] = "z" * 3000
    a.apply_update(b.get_update(a.get_state()))
    return a


# ---- cutting updates -------------------------------------------------------------------


def test_an_update_that_fits_is_one_piece_unchanged() -> None:
    doc = rich_doc()
    update = doc.get_update()
    assert list(split_update(update, len(update))) == [update]


@pytest.mark.parametrize("limit", [3500, 5000, 8 * 1024])
@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_pieces_are_bounded_and_make_the_same_document(limit: int, order: str) -> None:
    doc = rich_doc()
    update = doc.get_update()
    pieces = list(split_update(update, limit))
    assert len(pieces) > 1
    for piece in pieces:
        assert len(piece) <= limit
        check_update(piece, "s")  # each piece is a well-formed update of its own
    # pieces cost almost nothing more than the whole
    assert sum(map(len, pieces)) <= 1.02 * len(update) + 64 * len(pieces)
    again = pycrdt.Doc()
    for piece in pieces if order == "forward" else reversed(pieces):
        again.apply_update(piece)
    if order == "reverse":
        # out of order, yrs may leave some structs pending for good: the next state
        # vector exchange sends what is missing (as after any loss), and that levels it
        again.apply_update(doc.get_update(again.get_state()))
    assert again.get_state() == doc.get_state()
    assert content(again) == content(doc)
    # the same delete set (a diff at a state vector holds only it)
    assert again.get_update(doc.get_state()) == doc.get_update(doc.get_state())


def test_a_delete_set_larger_than_a_piece_is_cut_too() -> None:
    doc = pycrdt.Doc(client_id=3)
    keys = doc.get("k", type=pycrdt.Map)
    for i in range(3000):
        keys[f"k{i}"] = i
    for i in range(0, 3000, 2):  # every other one: 1,500 separate deleted ranges
        del keys[f"k{i}"]
    update = doc.get_update()
    pieces = list(split_update(update, 600))
    delete_only = [p for p in pieces if p.startswith(b"\x00") and p != b"\x00\x00"]
    assert len(delete_only) > 1
    assert all(len(p) <= 600 for p in pieces)
    again = pycrdt.Doc()
    for piece in pieces:
        again.apply_update(piece)
    assert dict(again.get("k", type=pycrdt.Map).items()) == dict(keys.items())
    assert len(keys) == 1500
    assert again.get_update(doc.get_state()) == doc.get_update(doc.get_state())


def test_a_chat_history_cut_at_the_envelope_bound() -> None:
    phone, _ = DeviceState.create_account("phone")
    chat = notes(phone)
    history(phone, chat, 2000, size=1200)
    snapshot = phone.space(chat).replica.snapshot()
    assert len(snapshot) > MAX_UPDATE
    pieces = list(split_update(snapshot, MAX_UPDATE))
    assert len(pieces) >= 2
    assert all(len(p) <= MAX_UPDATE for p in pieces)


def test_a_malformed_update_cannot_be_cut() -> None:
    with pytest.raises(InvalidUpdate):
        list(split_update(b"\x01\x05\x07\x00" + b"\xff" * 100, 10))


# ---- large catch-ups -------------------------------------------------------------------


def drain(link: Pair, *, pieces: int | None = None) -> int:
    """Run the link as the node does: deliver what is in flight, and when a side's sync
    lane is idle, pull the next catch-up piece. Stop after ``pieces`` pulled (a cut
    connection), or when quiet. Return how many pieces were pulled."""
    pulled = 0
    for _ in range(100_000):
        link.run()
        busy = [p for p in (link.a, link.b) if p.session.catching_up]
        if not busy or (pieces is not None and pulled >= pieces):
            return pulled
        for peer in busy:
            peer.carry_out(peer.session.next_catchup(0.0))
            pulled += 1
    raise AssertionError("the catch-up never ended")


def test_a_catchup_larger_than_an_envelope_arrives_in_bounded_frames() -> None:
    phone, [laptop] = new_account("laptop")
    chat = notes(phone)
    history(phone, chat, 3500, size=1200)
    raw = sum(
        len(d)
        for sid in phone.spaces
        if (d := phone.diff(sid, laptop.state_vector(sid))) != b"\x00\x00"
    )
    assert raw > 2 * MAX_UPDATE
    link = Pair(phone, laptop, streams_catchups=False).connect()
    link.run()
    # the first piece went out in answer to the state vector; the rest wait to be pulled
    assert link.a.session.catching_up
    assert drain(link) >= 2
    assert all(len(frame) <= MAX_FRAME for frame in link.a.sent + link.b.sent)
    assert link.b.ingest_errors == []
    assert len(view(laptop, chat)) == 3500
    assert view(laptop, chat) == view(phone, chat)
    sent = link.a.session.stats.catchup_bytes_out
    assert raw < sent <= 1.05 * raw, (sent, raw)


def test_a_large_catchup_streams_and_levels_in_one_round_trip_after_the_handshake() -> None:
    """The shared driver streams the pieces as the node's idle lane does: nothing waits
    for the peer between pieces, so a large gap is still one round trip (S3 measures it
    this way; a driver that forgot the pieces reported a cut catch-up as done)."""
    phone, [laptop] = new_account("laptop")
    chat = notes(phone)
    history(phone, chat, 3500, size=1200)
    link = Pair(phone, laptop).connect()
    assert link.run() == 2  # state vectors out, the catch-up back
    assert link.b.ingest_errors == []
    assert view(laptop, chat) == view(phone, chat)
    assert len(link.b.envelopes_in) >= 3


def test_an_interrupted_catchup_resumes_where_it_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(p2p.proto.session, "PIECE", 32 * 1024)
    phone, [laptop] = new_account("laptop")
    chat = notes(phone)
    history(phone, chat, 3000)
    raw = len(phone.diff(chat, laptop.state_vector(chat)))
    first = Pair(phone, laptop, streams_catchups=False).connect()
    first.run()
    drain(first, pieces=10)  # the connection drops here
    got = len(view(laptop, chat))
    assert 0 < got < 3000
    assert first.a.session.catching_up
    second = Pair(phone, laptop, streams_catchups=False).connect()
    second.run()
    drain(second)
    assert view(laptop, chat) == view(phone, chat)
    assert len(view(laptop, chat)) == 3000
    # what arrived the first time was not sent again
    resent = second.a.session.stats.catchup_bytes_out
    assert resent < raw * (1 - 0.9 * got / 3000) + 64 * 1024, (resent, raw, got)


def test_a_newer_state_vector_replaces_a_catchup_under_way(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(p2p.proto.session, "PIECE", 32 * 1024)
    phone, [laptop] = new_account("laptop")
    chat = notes(phone)
    history(phone, chat, 2000)
    link = Pair(phone, laptop, streams_catchups=False).connect()
    link.run()
    drain(link, pieces=3)
    # the laptop asks again (a repair): the answer starts from what it holds now
    link.b.carry_out(link.b.session.send_state_vector(chat))
    link.run()
    assert len([s for s, _ in link.a.session._catchup if s == chat]) == 1
    drain(link)
    assert view(laptop, chat) == view(phone, chat)


def test_a_closed_session_sends_no_more_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(p2p.proto.session, "PIECE", 32 * 1024)
    phone, [laptop] = new_account("laptop")
    history(phone, notes(phone), 1000)
    link = Pair(phone, laptop, streams_catchups=False).connect()
    link.run()
    assert link.a.session.catching_up
    link.a.carry_out(link.a.session.close())
    assert link.a.session.next_catchup(0.0) == []
    assert not link.a.session.catching_up


def test_a_companion_enrolls_with_a_history_past_the_update_bound() -> None:
    """The history a new device gets at linking is applied (and stored) in bounded
    pieces: a history larger than MAX_UPDATE was refused whole."""
    phone, _ = DeviceState.create_account("phone")
    chat = notes(phone)
    history(phone, chat, 2000, size=1200)
    assert len(phone.space(chat).replica.snapshot()) > MAX_UPDATE
    keys = DeviceKeys.generate()
    bundle, _ = phone.enroll(keys, "laptop")
    laptop, batch = DeviceState.from_enrollment(keys, "laptop", bundle)
    assert view(laptop, chat) == view(phone, chat)
    stored = [update for space, update in batch.appends if space == chat]
    assert len(stored) >= 2
    assert all(len(u) <= MAX_UPDATE for u in stored)


def test_a_piece_our_envelope_refuses_closes_the_session(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(p2p.proto.session, "PIECE", 32 * 1024)
    phone, [laptop] = new_account("laptop")
    history(phone, notes(phone), 1000)
    link = Pair(phone, laptop, streams_catchups=False).connect()
    link.run()
    assert link.a.session.catching_up
    monkeypatch.setattr(p2p.proto.envelope, "MAX_PAYLOAD", 1024)
    link.a.carry_out(link.a.session.next_catchup(0.0))
    assert isinstance(link.a.error, MalformedFrame)
    assert link.a.session.state is SessionState.CLOSED
    assert not link.a.session.catching_up


# ---- a catch-up longer than the idle timeout, between nodes ------------------------------


def test_a_catchup_longer_than_the_idle_timeout_keeps_its_session(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every frame takes 2 s (virtual) to cross, so pieces reach the laptop back to back
    for longer than IDLE_TIMEOUT while it has nothing to say. It must still send its
    keep-alive pings (its wait for the next frame never times out), or the phone, hearing
    nothing for 45 s, drops it and the catch-up starts over on every reconnect."""
    monkeypatch.setattr(p2p.proto.session, "PIECE", 8 * 1024)

    async def scenario() -> None:
        stores = testing.provision_account(2)
        phone_state = DeviceState.load(stores[0])
        chat = notes(phone_state)
        entries = [
            phone_state.new_entry(chat, "msg", WALL + i, body=f"{i} " + "x" * 200)
            for i in range(1000)
        ]
        stores[0].write(phone_state.write_local(chat, entries)[1])
        network = MemoryNetwork(faults=Faults(delay=2.0))
        async with contextlib.AsyncExitStack() as stack:
            phone, laptop = [
                await stack.enter_async_context(
                    open_node(
                        store=store,
                        transport=network.transport(name),
                        peers=dials,
                        wall_ms=testing.Cluster.wall_ms,
                        receipts=False,
                    )
                )
                for store, name, dials in zip(
                    stores, ["phone", "laptop"], [[], ["phone"]], strict=True
                )
            ]
            with phone.events() as events:
                with trio.fail_after(3600):
                    while len(laptop.messages()) < 1000:  # noqa: ASYNC110
                        await trio.sleep(1)
                assert trio.current_time() > 2 * p2p.proto.session.IDLE_TIMEOUT  # it took that long
                seen = []
                while True:
                    try:
                        seen.append(events.receive_nowait())
                    except trio.WouldBlock:
                        break
            assert not [e for e in seen if isinstance(e, ev.PeerDisconnected)], seen
            assert len(network._links) == 1  # one connection all along

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
