"""Hostile CRDT updates from a member of another account, and poisoned replicas.

A member of a conversation may write and delete only its own account's entries. In a
Yjs map, the value of a key is the item placed last among that key's items: an item
whose origin is our item is placed after it and replaces it, with no deletion in its
update at all. The attacker here is B's phone, holding a second pycrdt document that
writes as one of its own CRDT clients over a copy of the conversation; pycrdt puts the
deletion of the item it replaces in the update's delete set, which A refuses already,
so the attacker strips it (the hand-crafted part). A's laptop must refuse what is left:
an update that refers to our structs touches them.

Then the poisoned replica: an update that makes pycrdt panic half-way leaves the
document changed and unreadable. ``check_update`` refuses the updates known to do that;
should one get through, the replica is thrown away and reloaded from its history, and
the update is neither kept nor passed on.
"""

from __future__ import annotations

import base64
from dataclasses import replace
from typing import Any

import pycrdt
import pytest
import trio
from procs import run_virtual as run
from test_accounts import befriend, conversation, two_accounts
from test_sync_session import WALL, new_account, notes, view

from p2p import events as ev
from p2p import testing
from p2p.errors import InvalidUpdate, PoisonedReplica
from p2p.proto import model, yupdate
from p2p.proto.gossip import Authored
from p2p.proto.model import Entry, Replica
from p2p.state.device import NOTES, DeviceState, crdt_client
from p2p.testing.sessions import Pair


class Attacker:
    """B's phone with a raw replica of a conversation: a pycrdt document writing as a
    CRDT client of B's phone (another account's than the structs it replaces)."""

    def __init__(self, b_phone: DeviceState, chat: str, victim: DeviceState) -> None:
        self.b_phone, self.chat, self.victim = b_phone, chat, victim
        self.doc: pycrdt.Doc[Any] = pycrdt.Doc(client_id=crdt_client(b_phone.device_id, 999))
        self.doc.apply_update(b_phone.space(chat).replica.snapshot())

    def place(self, map_name: str, key: str, value: Any) -> bytes:
        """The update setting ``map_name[key]``, its delete set stripped of every client
        not B's (what pycrdt would never write), sealed by B's phone."""
        before = self.doc.get_state()
        self.doc.get(map_name, type=pycrdt.Map)[key] = value
        update = bytes(self.doc.get_update(before))
        ours = self.victim.client_account
        bare = yupdate.strip_deletions(update, lambda c: ours(c) == self.b_phone.account_id)
        return self.b_phone.seal(self.chat, bare)


def setup() -> tuple[DeviceState, DeviceState, DeviceState, str, Entry]:
    """A's phone and laptop and B's phone in one conversation; A wrote a message, which
    every device holds."""
    [a_phone, a_laptop], [b_phone, _] = two_accounts()
    chat = conversation(a_phone, b_phone)
    Pair(a_phone, b_phone).connect().run()
    Pair(a_phone, a_laptop).connect().run()
    message = a_phone.new_entry(chat, "msg", WALL, body="hello from A")
    a_phone.write_local(chat, [message])
    sync(a_phone, a_laptop, b_phone)
    return a_phone, a_laptop, b_phone, chat, message


def sync(a_phone: DeviceState, *others: DeviceState) -> None:
    for other in others:
        link = Pair(a_phone, other).connect()
        link.run()
        assert link.b.ingest_errors == []
        assert link.a.ingest_errors == []


def b_entry(b_phone: DeviceState, chat: str, entry_id: str, body: str) -> dict[str, str]:
    """A well-formed entry of B's own (it verifies: it is B's, under B's key)."""
    return (
        Entry(
            id=entry_id,
            kind="msg",
            account=b_phone.account_id,
            device=b_phone.device_id,
            ts=b_phone.clock.now(WALL),
            body=body,
        )
        .signed(chat, b_phone.keys)
        .to_value()
    )


def refused(device: DeviceState, envelope: bytes) -> None:
    with pytest.raises(InvalidUpdate, match="another account"):
        device.ingest(envelope)


def test_a_member_cannot_replace_our_message() -> None:
    _, a_laptop, b_phone, chat, message = setup()
    attacker = Attacker(b_phone, chat, a_laptop)
    refused(a_laptop, attacker.place("m", message.id, b_entry(b_phone, chat, message.id, "B's")))
    shown = view(a_laptop, chat)
    assert [(m.id, m.text, m.account) for m in shown] == [
        (message.id, "hello from A", message.account)
    ]


def test_a_member_cannot_replace_our_reaction() -> None:
    a_phone, a_laptop, b_phone, chat, message = setup()
    react = a_phone.new_entry(chat, "react", WALL + 1, body="👍", target=message.id)
    a_phone.write_local(chat, [react])
    sync(a_phone, a_laptop, b_phone)
    attacker = Attacker(b_phone, chat, a_laptop)
    refused(a_laptop, attacker.place("r", react.key(), "gone"))
    assert view(a_laptop, chat)[0].reactions == {a_phone.account_id: "👍"}


@pytest.mark.parametrize("kind", ["read", "rcpt"])
def test_a_member_cannot_replace_our_read_marker_or_receipt(kind: str) -> None:
    a_phone, a_laptop, b_phone, chat, _ = setup()
    marker = a_phone.new_entry(chat, kind, WALL + 1, body="{}" if kind == "rcpt" else "x")  # type: ignore[arg-type]
    a_phone.write_local(chat, [marker])
    sync(a_phone, a_laptop, b_phone)
    attacker = Attacker(b_phone, chat, a_laptop)
    refused(a_laptop, attacker.place(marker.map_name(), marker.key(), {"not": "ours"}))
    held = dict(a_laptop.space(chat).replica.entries(marker.map_name()))
    assert held[a_phone.device_id] == marker


def test_a_member_cannot_undo_our_deletion() -> None:
    a_phone, a_laptop, b_phone, chat, message = setup()
    tombstone = a_phone.new_entry(chat, "del", WALL + 1, target=message.id)
    a_phone.write_local(chat, [tombstone])
    sync(a_phone, a_laptop, b_phone)
    assert view(a_laptop, chat)[0].deleted
    attacker = Attacker(b_phone, chat, a_laptop)
    refused(a_laptop, attacker.place("x", message.id, "resurrected"))
    assert view(a_laptop, chat)[0].deleted


@pytest.mark.parametrize("map_name", ["k", "v", "r", "l"])
def test_a_member_cannot_squat_a_key_that_is_ours_by_name(map_name: str) -> None:
    """B writes first under a key that names A's device or account (a read marker, a
    receipt, a reaction, a leave entry): refused. Had it got in, A's own later write
    would replace B's item, and every other account would refuse A's update (and A's
    every catch-up holding it) as touching B's structs."""
    a_phone, a_laptop, b_phone, chat, message = setup()
    key = {
        "k": a_phone.device_id,
        "v": a_laptop.device_id,
        "r": f"{message.id}/{a_phone.account_id}",
        "l": a_phone.account_id,
    }[map_name]
    attacker = Attacker(b_phone, chat, a_laptop)
    with pytest.raises(InvalidUpdate, match="opens"):
        a_laptop.ingest(attacker.place(map_name, key, {"squatted": "by B"}))
    assert key not in dict(a_laptop.space(chat).replica.entries(map_name))


def test_a_member_cannot_open_our_key_again_without_an_origin() -> None:
    """B writes our message's key from a document that never saw it: an item with no
    origin, referring to nothing of ours. Among items with no origin under one key, the
    one of the greater client id lands last and is the value, so for half of all pairs
    of devices this replaced our message. Refused, whatever the client ids."""
    _, a_laptop, b_phone, chat, message = setup()
    blank: pycrdt.Doc[Any] = pycrdt.Doc(client_id=crdt_client(b_phone.device_id, 2**17 - 1))
    blank.get("m", type=pycrdt.Map)[message.id] = b_entry(b_phone, chat, message.id, "B's")
    with pytest.raises(InvalidUpdate, match="opens"):
        a_laptop.ingest(b_phone.seal(chat, bytes(blank.get_update())))
    assert [m.text for m in view(a_laptop, chat)] == ["hello from A"]


def test_a_member_deletes_only_its_own_messages() -> None:
    """A deletion is filed under its message's id: B may open that key only for a
    message of its own account (held already, or written in the same update)."""
    _, a_laptop, b_phone, chat, message = setup()
    attacker = Attacker(b_phone, chat, a_laptop)
    with pytest.raises(InvalidUpdate, match="opens"):
        a_laptop.ingest(attacker.place("x", message.id, {"squatted": "by B"}))
    a_laptop.ingest(attacker.place("m", "b1", b_entry(b_phone, chat, "b1", "B's own")))
    a_laptop.ingest(attacker.place("x", "b1", {"a": b_phone.account_id}))
    before = attacker.doc.get_state()
    with attacker.doc.transaction():
        attacker.doc.get("m", type=pycrdt.Map)["b2"] = b_entry(b_phone, chat, "b2", "gone")
        attacker.doc.get("x", type=pycrdt.Map)["b2"] = {"a": b_phone.account_id}
    a_laptop.ingest(b_phone.seal(chat, bytes(attacker.doc.get_update(before))))


def test_a_squat_would_block_our_catch_up_to_a_third_account() -> None:
    """Why squatting matters: with three accounts, B's squat of A's read-marker key,
    taken by A's phone and by C, makes C refuse A's marker, and A's catch-up with it."""
    a_phone, a_laptop, b_phone, _, _ = setup()
    c_phone, _ = new_account()
    befriend([a_phone, a_laptop], [b_phone], [c_phone])
    trio_chat = conversation(a_phone, b_phone, c_phone)
    Pair(a_phone, b_phone).connect().run()
    Pair(a_phone, c_phone).connect().run()
    squat = Attacker(b_phone, trio_chat, a_phone).place("k", a_phone.device_id, "squat")
    for device in (a_phone, c_phone):
        with pytest.raises(InvalidUpdate, match="opens"):
            device.ingest(squat)
    marker = a_phone.new_entry(trio_chat, "read", WALL + 1, body="x")
    update, _ = a_phone.write_local(trio_chat, [marker])
    c_phone.ingest(a_phone.seal(trio_chat, update))
    link = Pair(a_phone, c_phone).connect()
    link.run()
    assert link.b.ingest_errors == []
    assert dict(c_phone.space(trio_chat).replica.entries("k"))[a_phone.device_id] == marker


def test_a_member_still_replaces_its_own_values() -> None:
    """B placing its own value after its own item (editing its receipt, say) is fine:
    only references to other accounts' structs count against it."""
    _, a_laptop, b_phone, chat, _ = setup()
    attacker = Attacker(b_phone, chat, a_laptop)
    a_laptop.ingest(attacker.place("m", "b1", b_entry(b_phone, chat, "b1", "first")))
    a_laptop.ingest(attacker.place("m", "b1", b_entry(b_phone, chat, "b1", "second")))
    assert [m.text for m in view(a_laptop, chat)][-1] == "second"


# ---- the poisoned replica ---------------------------------------------------------

POISON = base64.b64decode("AQkAAAEBAQEBAQEBAAAAAAEAAAABAQEBAQEBAQEBAQEBAQEBAQEBAQEAAAA=")
"""44 bytes that make pycrdt panic in its commit, keeping part of them (tests/test_yupdate
checks that ``check_update`` refuses them; here the check is switched off, as if the
next update of the kind got through)."""


def lenient(data: bytes, space: str, opened: object = None, deps: object = None) -> frozenset[int]:
    """``check_update`` with the new refusals missing: what a gap in it would let by."""
    return frozenset({0})


def clean(full_state: bytes) -> bool:
    """Whether a document's full state applies in a fresh document without a panic."""
    try:
        pycrdt.Doc().apply_update(full_state)
    except BaseException:
        return False
    return True


def test_a_panic_rebuilds_the_replica_from_its_history(monkeypatch: pytest.MonkeyPatch) -> None:
    writer: pycrdt.Doc[Any] = pycrdt.Doc(client_id=7)
    writer.get("m", type=pycrdt.Map)["k"] = "kept"
    history = [bytes(writer.get_update())]
    replica = Replica("s", source=lambda: list(history))
    replica.load()
    before = replica.state_vector()
    monkeypatch.setattr(model, "check_update", lenient)
    with pytest.raises(PoisonedReplica) as info:
        replica.apply(POISON)
    assert isinstance(info.value, InvalidUpdate)  # a peer sending it is disconnected
    assert "divide by zero" in info.value.reason
    assert replica.state_vector() == before  # client 0 is not there
    assert clean(replica.snapshot())
    assert replica.doc.get("m", type=pycrdt.Map).to_py() == {"k": "kept"}
    writer.get("m", type=pycrdt.Map)["j"] = "later"
    replica.apply(bytes(writer.get_update(before)))  # and it goes on
    assert replica.doc.get("m", type=pycrdt.Map).to_py() == {"k": "kept", "j": "later"}


def test_a_panic_from_a_peer_closes_its_connection_and_keeps_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The laptop gets the poison from the phone's session: a typed error, the session
    closed, nothing stored, the replica as it was; and sync goes on."""

    async def scenario() -> None:
        async with testing.cluster(2, receipts=False) as c:
            phone, laptop = c.nodes
            await phone.send("before")
            await c.settle()
            chat = laptop.state.chat_by_name(NOTES).id
            replica = laptop.state.space(chat).replica
            before = replica.state_vector()
            monkeypatch.setattr(model, "check_update", lenient)
            with laptop.events() as events:
                phone.gossiper.handle(
                    Authored(chat, phone.state.seal(chat, POISON)), refresh=phone.peers.devices()
                )
                with trio.fail_after(60):
                    async for event in events:
                        if isinstance(event, ev.InputRejected):
                            break
            monkeypatch.undo()
            assert event.error == "PoisonedReplica"
            assert event.device == phone.device_id
            assert replica.state_vector() == before
            assert clean(replica.snapshot())
            assert POISON not in laptop.store.load_space(chat).updates
            await phone.send("after")
            await c.settle()
            assert [m.text for m in laptop.messages(chat)] == ["before", "after"]

    run(scenario)


def test_a_device_cannot_pass_off_a_forged_edit_as_another_devices_by_sending_it_first() -> None:
    """An entry is taken without checking its own signature when the envelope that
    brought it was signed by its author ("vouched"). A device of our account that saw a
    laptop's message overwrites it with a forged copy (the laptop's id and signature,
    its own text) and gets that to the phone before the laptop's message: the phone
    holds the overwrite until the message arrives, and yrs integrates both in the
    laptop's transaction. The forged copy must not be vouched for by the laptop's
    envelope: it is refused (hidden), never shown as the laptop's."""
    phone, [laptop, tablet] = new_account("laptop", "tablet")
    for state in (phone, laptop, tablet):
        state.offer_device_list(phone.device_list.encode())
    chat = notes(phone)
    genuine = laptop.new_entry(chat, "msg", WALL, body="meet at noon")
    update, _ = laptop.write_local(chat, [genuine])
    from_laptop = laptop.seal(chat, update)
    tablet.ingest(from_laptop)
    forged = replace(genuine, body="meet at midnight")  # the laptop's id and signature
    update, _ = tablet.write_local(chat, [forged])  # placed after the laptop's item
    from_tablet = tablet.seal(chat, update)

    phone.ingest(from_tablet)  # waits in yrs for the laptop's item it replaces
    ingested = phone.ingest(from_laptop)
    shown, rejected = phone.space(chat).replica.view(phone.any_signing_key, phone.belongs)
    assert "meet at midnight" not in [m.text for m in shown]
    assert [r.reason for r in rejected] == ["bad signature"]
    rows = [row for row in ingested.batch.index.values() if row is not None]
    assert all(row.body != "meet at midnight" or row.reason for row in rows), rows
