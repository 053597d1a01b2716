"""Conversations between accounts, at the protocol level (issue 10).

Two accounts, A (phone + laptop) and B (phone + tablet), as ``DeviceState``s wired by
the sans-I/O :class:`Link` of ``test_sync_session``: contacts, grants of a conversation's
keys, sessions across accounts, authorship checks, and key rotation when a member's
device is unlinked. The node, the CLI and real processes are tested in
``test_accounts_nodes.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio
import trio.testing
from procs import run_virtual as run
from procs import wait_for
from test_sync_session import WALL, new_account, notes, view, write

from p2p import events as ev
from p2p import testing
from p2p.errors import (
    ContactError,
    DeviceListError,
    GrantFromNonMember,
    GrantRefused,
    InvalidUpdate,
    NodeError,
    NotOurAccount,
    RemovedDevice,
    UnknownDevice,
    UnknownKey,
)
from p2p.proto.contacts import ContactCode, MalformedContactCode
from p2p.proto.grants import is_grant, parse_grant
from p2p.proto.identity import DeviceKeys, DeviceList
from p2p.proto.model import Entry
from p2p.proto.wire import pack, unpack
from p2p.runtime.node import Node, open_node
from p2p.state.device import DeviceState
from p2p.testing import Cluster, provision_account
from p2p.testing.sessions import Pair
from p2p.transport.memory import MemoryNetwork


def befriend(*groups: list[DeviceState]) -> None:
    """Every account's primary adds every other's contact code to its contact book
    (the account space), and every device follows those accounts (as its node would
    once the account space reached it)."""
    for group in groups:
        primary = group[0]
        for other in groups:
            if other is not group:
                key, listed = other[0].contact_key(), other[0].device_list.encode()
                account_pk = other[0].device_list.account_pk
                space, entry = primary.contact_entry(
                    "friend", account_pk, key, other[0].device_id, WALL
                )
                primary.write_local(space, [entry])
                for state in group:  # as if they had met: the lists are known
                    state.take_contact(account_pk, key, other[0].device_id)
                    state.follow(listed, trusted=True)


def two_accounts() -> tuple[list[DeviceState], list[DeviceState]]:
    a_phone, [a_laptop] = new_account("laptop")
    b_phone, [b_tablet] = new_account("tablet")
    befriend([a_phone, a_laptop], [b_phone, b_tablet])
    return [a_phone, a_laptop], [b_phone, b_tablet]


def conversation(creator: DeviceState, *others: DeviceState) -> str:
    space_id, _ = creator.new_conversation("team", [o.account_id for o in others])
    return space_id


def test_grant_at_meeting_brings_a_conversation_and_its_history() -> None:
    [a_phone, _], [b_phone, _] = two_accounts()
    chat = conversation(a_phone, b_phone)
    write(a_phone, chat, 3, "from A")
    link = Pair(a_phone, b_phone).connect()
    link.run()
    assert len(link.b.grants_in) == 1
    assert link.b.grant_errors == []
    space = b_phone.space(chat)
    assert space.name == "team"
    assert set(space.members) == {a_phone.account_id, b_phone.account_id}
    assert [m.text for m in view(b_phone, chat)] == ["from A 0", "from A 1", "from A 2"]
    assert {m.account for m in view(b_phone, chat)} == {a_phone.account_id}
    # B writes back over the same session: A verifies B's device by B's list
    write(b_phone, chat, 1, "from B", start=10)
    update = b_phone.space(chat).replica.diff(a_phone.space(chat).replica.state_vector())
    link.b.carry_out(link.b.session.send_envelope(b_phone.seal(chat, update)))
    link.run()
    assert [m.text for m in view(a_phone, chat)][-1] == "from B 10"
    # only the conversation is shared: B never learns A's own spaces
    assert notes(a_phone) not in b_phone.spaces


def test_other_accounts_read_only_the_conversations_they_are_members_of() -> None:
    [a_phone, a_laptop], [b_phone, b_tablet] = two_accounts()
    chat = conversation(a_phone, b_phone)
    assert a_phone.spaces_for(b_tablet.device_id) == [chat]
    assert a_phone.spaces_for(a_laptop.device_id) == sorted(a_phone.spaces)
    assert a_phone.readers_of(chat) == {
        a_laptop.device_id,
        b_phone.device_id,
        b_tablet.device_id,
    }
    assert a_phone.readers_of(notes(a_phone)) == {a_laptop.device_id}


def test_stranger_account_is_refused_at_the_handshake() -> None:
    [a_phone, _], _ = two_accounts()
    c_phone, _ = DeviceState.create_account("phone")  # C has no code of A, nor A of C
    link = Pair(a_phone, c_phone)
    link.start()
    link.run()
    assert isinstance(link.a.error, NotOurAccount)
    assert link.a.authenticated == link.b.authenticated == []


def test_member_cannot_forge_a_message_as_another_member_or_device() -> None:
    [a_phone, a_laptop], [b_phone, _] = two_accounts()
    chat = conversation(a_phone, b_phone)
    Pair(a_phone, b_phone).connect().run()
    # B's phone writes entries claiming to be A (its own device, or A's laptop)
    as_a = Entry(
        id="f1",
        kind="msg",
        account=a_phone.account_id,
        device=b_phone.device_id,
        ts=b_phone.clock.now(WALL),
        body="I am A",
    ).signed(chat, b_phone.keys)
    as_laptop = Entry(
        id="f2",
        kind="msg",
        account=a_phone.account_id,
        device=a_laptop.device_id,
        ts=b_phone.clock.now(WALL),
        body="I am A's laptop",
    ).signed(chat, b_phone.keys)
    update, _ = b_phone.write_local(chat, [as_a, as_laptop])
    a_phone.ingest(b_phone.seal(chat, update))  # the envelope itself is B's, and fine
    shown, rejected = a_phone.space(chat).replica.view(a_phone.any_signing_key, a_phone.belongs)
    assert shown == []
    assert {(r.entry_id, r.reason) for r in rejected} == {
        ("f1", "wrong account"),
        ("f2", "bad signature"),
    }


def test_grant_refused_unless_signed_by_a_followed_member_device() -> None:
    [a_phone, _], [b_phone, _] = two_accounts()
    chat = conversation(a_phone, b_phone)
    grant = a_phone.grant_to(b_phone.device_id, chat)
    assert grant is not None
    assert is_grant(grant)
    # an account B does not follow
    c_phone, _ = DeviceState.create_account("phone")
    c_phone.follow(b_phone.device_list.encode(), trusted=True)
    c_chat = conversation(c_phone, b_phone)
    with pytest.raises(GrantRefused, match="do not follow"):
        b_phone.accept_grant(c_phone.grant_to(b_phone.device_id, c_chat) or b"")
    # tampered signature, or sealed to someone else
    outer = unpack(grant, what="grant")
    outer[5] = bytes(64)
    with pytest.raises(GrantRefused, match="bad signature"):
        b_phone.accept_grant(pack(outer))
    with pytest.raises(GrantRefused, match="not us"):
        a_phone.accept_grant(grant)
    assert chat not in b_phone.spaces
    assert c_chat not in b_phone.spaces
    # the genuine one
    assert b_phone.accept_grant(grant)[:2] == (chat, True)
    assert parse_grant(grant).sender == a_phone.device_id


def test_unlinked_device_of_a_member_reads_nothing_new() -> None:
    [a_phone, a_laptop], [b_phone, b_tablet] = two_accounts()
    chat = conversation(a_phone, b_phone)
    for a, b in [(a_phone, b_phone), (a_phone, b_tablet), (a_phone, a_laptop)]:
        Pair(a, b).connect().run()
    assert b_tablet.space(chat).epoch == 0
    b_phone.unlink(b_tablet.device_id)  # B's primary rotates the keys of its spaces
    assert b_phone.space(chat).epoch == 1
    # A's laptop meets B's phone: it takes B's new list and the new epoch's key
    link = Pair(a_laptop, b_phone).connect()
    link.run()
    assert a_laptop.accounts[b_phone.account_id].version == b_phone.device_list.version
    assert a_laptop.space(chat).epoch == 1
    # what A's laptop sends now is sealed with a key the tablet never had
    write(a_laptop, chat, 1, "after unlink")
    update = a_laptop.space(chat).replica.snapshot()
    with pytest.raises(UnknownKey):
        b_tablet.ingest(a_laptop.seal(chat, update))
    # and the tablet is refused by anyone who knows the new list
    refused = Pair(b_tablet, a_laptop)
    refused.start()
    refused.run()
    assert isinstance(refused.b.error, RemovedDevice)
    # A's phone, which never met B since, learns it all from its own laptop
    Pair(a_phone, a_laptop).connect().run()
    assert a_phone.space(chat).epoch == 1
    assert [m.text for m in view(a_phone, chat)] == ["after unlink 0"]
    with pytest.raises(RemovedDevice):
        a_phone.current_signing_key(b_tablet.device_id)


def test_contact_code_round_trip_and_refusals() -> None:
    [a_phone, _], _ = two_accounts()
    code = ContactCode(
        account_pk=a_phone.device_list.account_pk,
        key=a_phone.contact_key(),
        primary=a_phone.device_id,
        addresses=("127.0.0.1:4000",),
    )
    text = code.encode()
    assert text.startswith("P2PC2:")
    assert len(text) <= 114  # a version-4 QR code at level L
    assert ContactCode.decode(text.lower()) == code
    assert ContactCode.decode(text).account_id == a_phone.account_id
    typo = text[:20] + ("A" if text[20] != "A" else "B") + text[21:]
    for bad in (typo, "P2P2:" + text[6:], "hello", text[:-3], text + "A" * 600):
        with pytest.raises(MalformedContactCode):
            ContactCode.decode(bad)
    with pytest.raises(ContactError, match="own account"):
        a_phone.contact_entry("me", a_phone.device_list.account_pk, bytes(12), "x", WALL)
    with pytest.raises(ContactError, match="own account"):
        a_phone.take_contact(a_phone.device_list.account_pk, bytes(12), a_phone.device_id)


def test_a_contact_code_of_the_earlier_format_is_refused_by_name() -> None:
    """The old code held a whole signed device list (about 850 characters): refused with
    a typed error that says to ask for a new one, whatever its checksum."""
    from p2p.proto.contacts import OutdatedContactCode
    from p2p.proto.pairing import to_text

    [a_phone, _], _ = two_accounts()
    old = to_text("P2PC1:", pack([1, a_phone.device_list.encode(), bytes(32), "Ana", [], []]))
    with pytest.raises(OutdatedContactCode, match="new one"):
        ContactCode.decode(old)


def test_followed_list_must_be_signed_by_the_contacts_key() -> None:
    [a_phone, _], [_b_phone, _] = two_accounts()
    impostor, _ = DeviceState.create_account("phone")
    with pytest.raises(ContactError):
        a_phone.follow(impostor.device_list.encode(), trusted=False)
    assert impostor.account_id not in a_phone.accounts
    with pytest.raises(UnknownDevice):
        a_phone.current_signing_key(impostor.device_id)


def take_codes(*states: DeviceState) -> None:
    """Each account takes every other's contact code and nothing else: no device list
    (those come at the first connection)."""
    for state in states:
        for other in states:
            if other is not state:
                code = ContactCode.decode(
                    ContactCode(
                        account_pk=other.device_list.account_pk,
                        key=other.contact_key(),
                        primary=other.device_id,
                    ).encode()
                )
                state.take_contact(code.account_pk, code.key, code.primary)


def test_contacts_known_by_code_alone_exchange_device_lists_at_the_first_connection() -> None:
    a_phone, _ = new_account()
    b_phone, _ = new_account()
    take_codes(a_phone, b_phone)
    assert b_phone.account_id not in a_phone.accounts  # no list yet
    assert a_phone.followed_devices() == [b_phone.device_id]  # its primary, on a relay
    # added without a name: called by its id until met, then by its primary's name
    space, entry = a_phone.contact_entry(
        "", b_phone.device_list.account_pk, b_phone.contact_key(), b_phone.device_id, WALL
    )
    a_phone.write_local(space, [entry])
    assert a_phone.contact_entries()[b_phone.account_id][0] == b_phone.account_id
    # a conversation with a contact not met yet: its key is known, its devices not
    chat, _ = a_phone.new_conversation("team", [b_phone.account_id])
    write(a_phone, chat, 3, "before meeting")
    link = Pair(a_phone, b_phone).connect()
    link.run()
    assert a_phone.accounts[b_phone.account_id].encode() == b_phone.device_list.encode()
    assert b_phone.accounts[a_phone.account_id].encode() == a_phone.device_list.encode()
    assert a_phone.contact_entries()[b_phone.account_id][0] == "phone"
    assert a_phone.followed_devices() == [b_phone.device_id]  # now from its list
    assert link.b.grant_errors == []
    assert chat in b_phone.spaces
    assert [m.text for m in view(b_phone, chat)] == [f"before meeting {i}" for i in range(3)]


def forged_list(impostor: DeviceState, claimed: bytes) -> DeviceList:
    """The impostor's list made to name ``claimed`` as its account key: it is signed by
    the impostor's account key, not by that one."""
    return dataclasses.replace(impostor.device_list, account_pk=claimed)


def test_a_forged_device_list_at_the_first_connection_is_refused() -> None:
    """Someone who got A the code of B (public) and then answers as B with a list it
    signed itself: the list is checked against the key in B's code and refused."""
    a_phone, _ = new_account()
    b_phone, _ = new_account()
    impostor, _ = new_account()
    take_codes(a_phone, b_phone)
    impostor.take_contact(a_phone.device_list.account_pk, a_phone.contact_key(), a_phone.device_id)
    impostor.device_list = forged_list(impostor, b_phone.device_list.account_pk)
    assert impostor.device_list.account_id == b_phone.account_id
    link = Pair(a_phone, impostor)
    link.start()
    link.run()
    [closed] = link.a.closed
    assert isinstance(closed.error, DeviceListError)
    assert "signature" in str(closed.error)
    assert link.a.authenticated == []
    assert b_phone.account_id not in a_phone.accounts
    assert impostor.device_id not in a_phone.followed_devices()
    # followed, the forged list is refused the same way (not taken on anyone's word)
    with pytest.raises(DeviceListError):
        a_phone.follow(impostor.device_list.encode(), trusted=True)
    assert b_phone.account_id not in a_phone.accounts
    # and the real B, met afterwards, is taken
    Pair(a_phone, b_phone).connect().run()
    assert a_phone.accounts[b_phone.account_id].encode() == b_phone.device_list.encode()


def test_a_device_list_of_another_account_at_the_first_connection_is_refused() -> None:
    """A stranger holding A's contact key (the code is public) shows its own genuine
    list: not the account of any code A took, so A refuses it."""
    a_phone, _ = new_account()
    b_phone, _ = new_account()
    stranger, _ = new_account()
    take_codes(a_phone, b_phone)
    stranger.take_contact(a_phone.device_list.account_pk, a_phone.contact_key(), a_phone.device_id)
    link = Pair(stranger, a_phone)
    link.start()
    link.run()
    [closed] = link.b.closed
    assert isinstance(closed.error, NotOurAccount)
    assert stranger.account_id not in a_phone.accounts


# ---- nodes on an in-memory network --------------------------------------------------


async def wait_until_status(node: Node, chat: str, message: str, status: str) -> None:
    with trio.fail_after(120):
        while (await node.delivery(chat))[message].status != status:  # noqa: ASYNC110
            await trio.sleep(0.05)


@asynccontextmanager
async def two_account_nodes() -> AsyncIterator[tuple[list[Node], list[Node]]]:
    """A (phone, laptop) and B (phone, tablet) as running nodes on one memory network,
    every node dialing the ones started before it; the phones exchange contact codes."""
    network = MemoryNetwork(seed=1)
    names = ["a-phone", "a-laptop", "b-phone", "b-tablet"]
    stores = provision_account(2) + provision_account(2)
    async with AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(
                open_node(
                    store=store,
                    transport=network.transport(name),
                    peers=names[:i],
                    wall_ms=Cluster.wall_ms,
                )
            )
            for i, (name, store) in enumerate(zip(names, stores, strict=True))
        ]
        await nodes[0].add_contact(nodes[2].contact_code(), name="Bea")
        await nodes[2].add_contact(nodes[0].contact_code(), name="Ali")
        yield nodes[:2], nodes[2:]


def test_nodes_of_two_accounts_share_a_conversation_with_delivery_state() -> None:
    async def scenario() -> None:
        async with two_account_nodes() as ([a_phone, a_laptop], [b_phone, b_tablet]):
            everyone = [a_phone, a_laptop, b_phone, b_tablet]
            # A's laptop learns the contact from A's account space
            await wait_for(lambda: [c.name for c in a_laptop.contacts()] == ["Bea"])
            chat = await a_laptop.create_chat("team", with_=["Bea"])
            await wait_for(lambda: all(chat in n.state.spaces for n in everyone))
            sent = await a_laptop.send("hello B", chat=chat)
            await b_tablet.send("hello A", chat=chat)
            await wait_for(lambda: all(len(n.messages(chat)) == 2 for n in everyone))
            assert len({testing.digest(n.messages(chat)) for n in everyone}) == 1
            # receipts: every device holds it -> delivered; B reads it -> read
            await wait_until_status(a_laptop, chat, sent, "delivered")
            state = (await a_laptop.delivery(chat))[sent]
            assert set(state.delivered_to) == {
                a_phone.device_id,
                b_phone.device_id,
                b_tablet.device_id,
            }
            assert state.read_by == ()
            await b_phone.mark_read(chat=chat)
            await wait_until_status(a_phone, chat, sent, "read")
            assert (await a_phone.delivery(chat))[sent].read_by == (b_phone.device_id,)
            # A's own notes stay A's: B never holds them
            assert a_phone.default_chat() not in b_phone.state.spaces

    run(scenario)


def test_a_forged_message_is_hidden_on_every_device_of_both_accounts() -> None:
    async def scenario() -> None:
        async with two_account_nodes() as ([a_phone, a_laptop], [b_phone, b_tablet]):
            everyone = [a_phone, a_laptop, b_phone, b_tablet]
            chat = await a_phone.create_chat("team", with_=["Bea"])
            await wait_for(lambda: all(chat in n.state.spaces for n in everyone))
            watchers = [n.subscribe() for n in everyone]
            # B's phone writes, with its own key, messages claiming to be A's phone or A
            state = b_phone.state
            forged = [
                Entry(
                    id=f"forged{i}",
                    kind="msg",
                    account=a_phone.account_id,
                    device=device,
                    ts=state.clock.now(Cluster.wall_ms()),
                    body="A says: send money",
                ).signed(chat, state.keys)
                for i, device in enumerate((a_phone.device_id, b_phone.device_id))
            ]
            update, batch = state.write_local(chat, forged)
            await b_phone.writer.commit(batch)
            b_phone.gossiper.push(chat, update)
            await b_phone.send("a genuine one", chat=chat)
            # every other device, of both accounts (the forger's own replica trusts
            # what it wrote itself: it is the one lying)
            readers = [a_phone, a_laptop, b_tablet]
            await wait_for(lambda: all(len(n.messages(chat)) == 1 for n in readers))
            await trio.sleep(5)
            for node, events in zip(readers, [watchers[0], watchers[1], watchers[3]], strict=True):
                assert [m.text for m in node.messages(chat)] == ["a genuine one"]
                hidden = []
                while True:
                    try:
                        event = events.receive_nowait()
                    except trio.WouldBlock:
                        break
                    if isinstance(event, ev.EntryRejected):
                        hidden.append((event.entry_id, event.reason))
                assert sorted(hidden) == [
                    ("forged0", "bad signature"),
                    ("forged1", "wrong account"),
                ]

    run(scenario)


def test_a_member_that_leaves_reads_nothing_sent_after_the_rotation() -> None:
    async def scenario() -> None:
        async with two_account_nodes() as ([a_phone, a_laptop], [b_phone, b_tablet]):
            everyone = [a_phone, a_laptop, b_phone, b_tablet]
            await wait_for(lambda: len(a_laptop.contacts()) == 1)
            chat = await a_laptop.create_chat("team", with_=["Bea"])
            await wait_for(lambda: all(chat in n.state.spaces for n in everyone))
            await b_tablet.send("bye all", chat=chat)
            await b_tablet.leave_chat(chat)  # for all of account B
            # A's primary, the one remaining account's, rotates; A's laptop follows
            await wait_for(lambda: a_laptop.state.space(chat).epoch == 1)
            assert set(a_phone.state.space(chat).members) == {a_phone.account_id}
            assert a_phone.state.readers_of(chat) == {a_laptop.device_id}
            await a_laptop.send("after B left", chat=chat)
            await wait_for(lambda: len(a_phone.messages(chat)) == 2)
            await trio.sleep(30)
            for node in (b_phone, b_tablet):
                assert [m.text for m in node.messages(chat)] == ["bye all"]
                assert node.state.space(chat).epoch == 0
            with pytest.raises(NodeError):
                await a_phone.leave_chat(a_phone.default_chat())  # notes: nobody to leave

    run(scenario)


# ---- CRDT structs are bound to accounts -----------------------------------------------


def test_another_account_cannot_shadow_or_delete_our_structs() -> None:
    """B's phone seals, first, a copy of A's update with the body changed (A's CRDT
    client and clocks, a forged entry), then an update that overwrites A's message key
    (deleting A's struct). A's laptop refuses both: another account may only touch its
    own account's CRDT clients. A's real message, arriving afterwards, shows."""
    [a_phone, a_laptop], [b_phone, _] = two_accounts()
    chat = conversation(a_phone, b_phone)
    Pair(a_phone, b_phone).connect().run()
    Pair(a_phone, a_laptop).connect().run()
    entry = a_phone.new_entry(chat, "msg", WALL, body="the-real-message-0001")
    update, _ = a_phone.write_local(chat, [entry])
    forged = update.replace(b"the-real-message-0001", b"the-fake-message-0001")
    with pytest.raises(InvalidUpdate, match="another account"):
        a_laptop.ingest(b_phone.seal(chat, forged))
    b_phone.ingest(a_phone.seal(chat, update))  # B holds A's message, then overwrites it
    overwrite = Entry(
        id=entry.id,
        kind="msg",
        account=b_phone.account_id,
        device=b_phone.device_id,
        ts=b_phone.clock.now(WALL),
        body="gone",
    ).signed(chat, b_phone.keys)
    deleting, _ = b_phone.write_local(chat, [overwrite])
    with pytest.raises(InvalidUpdate, match="another account"):
        a_laptop.ingest(b_phone.seal(chat, deleting))
    a_laptop.ingest(a_phone.seal(chat, update))
    assert [m.text for m in view(a_laptop, chat)] == ["the-real-message-0001"]


def test_catch_up_for_another_account_carries_only_our_accounts_structs() -> None:
    """A's laptop holds B's messages too; its catch-up diff for B's tablet leaves them
    (and their deletions) out, and B's tablet accepts it whole."""
    [a_phone, a_laptop], [b_phone, b_tablet] = two_accounts()
    chat = conversation(a_phone, b_phone)
    Pair(a_phone, a_laptop).connect().run()
    Pair(a_phone, b_phone).connect().run()
    write(b_phone, chat, 2, "from B")
    b_phone.write_local(chat, [b_phone.new_entry(chat, "read", WALL, body="x")])
    b_phone.write_local(chat, [b_phone.new_entry(chat, "read", WALL + 1, body="y")])
    write(a_laptop, chat, 2, "from A")
    Pair(b_phone, a_laptop).connect().run()  # the laptop now holds B's structs
    link = Pair(a_laptop, b_tablet).connect()
    link.run()
    assert link.b.ingest_errors == []
    assert link.a.closed == []
    assert link.b.closed == []
    # the tablet got A's messages from A's laptop, and B's from nobody yet
    assert [m.text for m in view(b_tablet, chat)] == ["from A 0", "from A 1"]
    Pair(b_phone, b_tablet).connect().run()
    assert len(view(b_tablet, chat)) == 4


def test_a_device_linked_later_by_a_member_joins_its_conversations() -> None:
    """B links a desktop after the conversation began: A follows B's newer list when it
    meets B's phone. The desktop's enrollment holds the conversation as B's alone, so a
    grant from A is ignored (not an error) until B's phone tells it the members; from
    then on A's devices grant and sync it like any member device."""
    [a_phone, _], [b_phone, _] = two_accounts()
    chat = conversation(a_phone, b_phone)
    write(a_phone, chat, 2, "from A")
    Pair(a_phone, b_phone).connect().run()
    keys = DeviceKeys.generate()
    bundle, _ = b_phone.enroll(keys, "desktop")
    b_desktop, _ = DeviceState.from_enrollment(keys, "desktop", bundle)
    assert not b_desktop.space(chat).shared  # the enrollment knows nothing of A
    Pair(a_phone, b_phone).connect().run()  # A follows B's list with the desktop on it
    assert b_desktop.device_id in a_phone.accounts[b_phone.account_id].ids
    early = Pair(a_phone, b_desktop).connect()
    early.run()
    assert [type(e) for e in early.b.grant_errors] == [GrantFromNonMember]
    assert not b_desktop.space(chat).shared
    Pair(b_phone, b_desktop).connect().run()
    link = Pair(a_phone, b_desktop).connect()
    link.run()
    assert link.b.grant_errors == []
    assert set(b_desktop.space(chat).members) == {a_phone.account_id, b_phone.account_id}
    assert [m.text for m in view(b_desktop, chat)] == ["from A 0", "from A 1"]
    assert a_phone.readers_of(chat) >= {b_desktop.device_id}


def test_a_member_added_later_reads_the_history_and_everyone_learns_it() -> None:
    """A and B talk; A adds C (A's contact, not B's). C gets the keys and the history
    from A; B learns the new member set (and C's devices) from A's grant, and then meets
    C's device directly: each account's messages reach the others."""
    [a_phone, _], [b_phone, _] = two_accounts()
    c_phone, _ = DeviceState.create_account("phone")
    befriend([a_phone], [c_phone])
    chat = conversation(a_phone, b_phone)
    write(a_phone, chat, 1, "from A")
    Pair(a_phone, b_phone).connect().run()
    a_phone.add_members(chat, [c_phone.account_id])
    Pair(a_phone, c_phone).connect().run()
    assert set(c_phone.space(chat).members) == {
        a_phone.account_id,
        b_phone.account_id,
        c_phone.account_id,
    }
    assert [m.text for m in view(c_phone, chat)] == ["from A 0"]
    Pair(a_phone, b_phone).connect().run()  # the grant tells B the members, C's list too
    assert c_phone.account_id in b_phone.space(chat).members
    assert b_phone.space(chat).epoch == a_phone.space(chat).epoch == 0
    write(c_phone, chat, 1, "from C", start=5)
    write(b_phone, chat, 1, "from B", start=7)
    Pair(b_phone, c_phone).connect().run()
    assert [m.text for m in view(b_phone, chat)] == ["from A 0", "from C 5", "from B 7"]
    assert [m.text for m in view(c_phone, chat)] == ["from A 0", "from C 5", "from B 7"]
    with pytest.raises(ContactError):
        a_phone.add_members(notes(a_phone), [c_phone.account_id])
