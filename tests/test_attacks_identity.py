"""Attacks on identity, keys and membership, written as an attacker would write them.

Each test plays a modified device of another account (or of ours, about to be removed)
through the Python API: it signs what its own keys let it sign and sends it where the
protocol would carry it. The honest devices are plain ``DeviceState``s wired by the
sans-I/O ``Pair`` (p2p.testing.sessions); every test fails on the code before the defence it checks.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
import trio
from test_accounts import befriend
from test_sync_session import WALL, new_account, view

from p2p.errors import DeviceListError, GrantRefused, InvalidUpdate, P2PError
from p2p.proto.envelope import new_space_key
from p2p.proto.grants import SpaceGrant, seal_grant
from p2p.proto.identity import DOMAIN_DEVICE_LIST, DeviceEntry, DeviceKeys
from p2p.proto.model import Entry
from p2p.state.device import NOTES, DeviceState, crdt_client
from p2p.testing.sessions import Pair

# ---- claimed keys: another account lists our device's key as its own ---------------


def claim(mallory: DeviceState, victim: DeviceState) -> bytes:
    """Mallory's primary signs a newer list of her account holding the victim's device
    keys (and whatever proof the victim's own entry carries: a real one, for another
    account)."""
    own = victim.device_list.entry(victim.device_id)
    stolen = DeviceEntry(name="phone-2", role="companion", sign_pk=own.sign_pk, box_pk=own.box_pk)
    if hasattr(own, "proof"):
        stolen = replace(stolen, proof=own.proof)
    dl = mallory.device_list
    forged = replace(dl, version=dl.version + 1, devices=(*dl.devices, stolen), grants=())
    assert mallory.account_key is not None
    signature = mallory.account_key.sign(DOMAIN_DEVICE_LIST, forged._body())
    return replace(forged, signature=signature).encode()


def three_accounts() -> tuple[DeviceState, DeviceState, DeviceState, str]:
    """Alice, Bob and Mallory (one phone each), contacts of each other, in one chat
    with Alice's message in it on every phone."""
    alice, _ = new_account()
    bob, _ = new_account()
    mallory, _ = new_account()
    befriend([alice], [bob], [mallory])
    chat, _ = alice.new_conversation("team", [bob.account_id, mallory.account_id])
    entry = alice.new_entry(chat, "msg", WALL, body="alice was here")
    alice.write_local(chat, [entry])
    Pair(alice, bob).connect().run()
    Pair(alice, mallory).connect().run()
    Pair(bob, mallory).connect().run()
    for state in (alice, bob, mallory):
        assert [m.text for m in view(state, chat)] == ["alice was here"]
    return alice, bob, mallory, chat


def test_an_account_cannot_claim_our_device_and_delete_our_messages() -> None:
    alice, bob, mallory, chat = three_accounts()
    claimed = claim(mallory, alice)
    # Bob follows Mallory; her device shows him the list in a handshake
    with pytest.raises(DeviceListError):
        bob.follow(claimed, trusted=False)
    alice_client = crdt_client(alice.device_id, alice.boot)
    assert bob.client_account(alice_client) == alice.account_id
    # Mallory overwrites Alice's message key: her update deletes Alice's struct
    message = next(iter(view(mallory, chat)))
    overwrite = Entry(
        id=message.id,
        kind="msg",
        account=mallory.account_id,
        device=mallory.device_id,
        ts=mallory.clock.now(WALL + 10),
        body="gone",
    ).signed(chat, mallory.keys)
    deleting, _ = mallory.write_local(chat, [overwrite])
    with pytest.raises(InvalidUpdate):
        bob.ingest(mallory.seal(chat, deleting))
    assert [m.text for m in view(bob, chat)] == ["alice was here"]


def test_an_account_claiming_our_device_does_not_cut_our_catch_up() -> None:
    alice, bob, mallory, chat = three_accounts()
    # Alice follows Mallory (a contact): her device shows Alice the claim
    with contextlib.suppress(P2PError):
        alice.follow(claim(mallory, alice), trusted=False)
    alice_client = crdt_client(alice.device_id, alice.boot)
    assert alice.client_account(alice_client) == alice.account_id
    # what Alice writes next reaches Bob through her catch-up
    alice.write_local(chat, [alice.new_entry(chat, "msg", WALL + 20, body="still me")])
    Pair(alice, bob).connect().run()
    assert [m.text for m in view(bob, chat)] == ["alice was here", "still me"]


def test_a_device_key_listed_by_one_account_is_refused_on_another() -> None:
    """Even with the device's own proof for both (a modified device that consents to two
    accounts), the second list naming it is refused: one key, one account."""
    from p2p.proto.identity import possession_proof

    alice, bob, mallory, _ = three_accounts()
    own = alice.device_list.entry(alice.device_id)
    both = DeviceEntry(
        name="phone-2",
        role="companion",
        sign_pk=own.sign_pk,
        box_pk=own.box_pk,
        proof=possession_proof(alice.keys, mallory.device_list.account_pk),
    )
    assert mallory.account_key is not None
    doubled = mallory.device_list.with_device(mallory.account_key, both)
    with pytest.raises(DeviceListError, match="already"):
        bob.follow(doubled.encode(), trusted=False)
    assert bob.accounts[mallory.account_id].version == doubled.version - 1


# ---- rotation by anyone: a member device replaces the key and the member list -------


def forged_grant(
    granter: DeviceState,
    to: DeviceState,
    chat: str,
    epoch: int,
    key: bytes,
    members: list[DeviceState],
) -> bytes:
    """A grant of ``chat`` at ``epoch`` with ``key``, naming ``members``' accounts: what a
    modified granter sends (it signs with its own device key, as any grant is)."""
    space = granter.space(chat)
    grant = SpaceGrant(
        space=chat,
        name=space.name,
        epoch=epoch,
        keys={**space.keys, epoch: key},
        members=tuple(
            (
                m.device_list
                if m.account_id == granter.account_id
                else granter.accounts.get(m.account_id, m.device_list)
            ).encode()
            for m in members
        ),
    )
    box_pk = to.device_list.entry(to.device_id).box_pk
    return seal_grant(granter.keys, granter.account_id, to.device_id, box_pk, grant)


def rotate(state: DeviceState, chat: str) -> None:
    """The next epoch of ``chat``, made by ``state`` as the code under test makes one."""
    space = state.space(chat)
    if hasattr(space, "rotate"):
        space.rotate(state.keys)
    else:  # before rotations were signed statements
        space.epoch += 1
        space.keys[space.epoch] = new_space_key()


def test_a_member_device_cannot_rotate_a_conversation_and_drop_a_member() -> None:
    """Bob's tablet (not a primary) and then Bob's primary each send Alice a newer epoch
    whose member list leaves Carol out (Carol never left). Alice keeps epoch 0, its key
    and all three members."""
    alice, _ = new_account()
    bob, [bob_tablet] = new_account("tablet")
    carol, _ = new_account()
    befriend([alice], [bob, bob_tablet], [carol])
    chat, _ = alice.new_conversation("team", [bob.account_id, carol.account_id])
    for other in (bob, bob_tablet, carol):
        Pair(alice, other).connect().run()
    key0 = alice.space(chat).keys[0]
    for granter in (bob_tablet, bob):
        grant = forged_grant(granter, alice, chat, 1, new_space_key(), [alice, bob])
        with contextlib.suppress(GrantRefused):
            alice.accept_grant(grant)
        space = alice.space(chat)
        assert space.epoch == 0
        assert space.keys == {0: key0}
        assert set(space.members) == {alice.account_id, bob.account_id, carol.account_id}


def test_a_primary_cannot_drop_a_member_that_did_not_leave() -> None:
    """Bob's primary makes a well-signed rotation (as for an unlink of its own) whose
    member set leaves Carol out: refused visibly, nothing taken."""
    alice, _ = new_account()
    bob, _ = new_account()
    carol, _ = new_account()
    befriend([alice], [bob], [carol])
    chat, _ = alice.new_conversation("team", [bob.account_id, carol.account_id])
    for other in (bob, carol):
        Pair(alice, other).connect().run()
    space = bob.space(chat)
    space.members.pop(carol.account_id)
    rotate(bob, chat)
    grant = bob.grant_to(alice.device_id, chat)
    assert grant is not None
    with pytest.raises(GrantRefused, match="did not leave"):  # and it is never applied
        alice.accept_grant(grant)
    assert alice.space(chat).epoch == 0
    assert carol.account_id in alice.space(chat).members


def test_two_keys_for_one_epoch_are_refused_visibly() -> None:
    """Bob's primary gives Alice and Carol different keys for epoch 1 (a split). Each
    takes its own; when Carol's grant reaches Alice, the second key is refused."""
    alice, _ = new_account()
    bob, _ = new_account()
    carol, _ = new_account()
    befriend([alice], [bob], [carol])
    chat, _ = alice.new_conversation("team", [bob.account_id, carol.account_id])
    for a, b in ((alice, bob), (alice, carol), (bob, carol)):
        Pair(a, b).connect().run()
    rotate(bob, chat)
    to_alice = bob.grant_to(alice.device_id, chat)
    bob.space(chat).keys.pop(1)
    bob.space(chat).epoch = 0
    rotate(bob, chat)
    to_carol = bob.grant_to(carol.device_id, chat)
    assert to_alice is not None
    assert to_carol is not None
    alice.accept_grant(to_alice)
    carol.accept_grant(to_carol)
    assert alice.space(chat).keys[1] != carol.space(chat).keys[1]
    gossip = carol.grant_to(alice.device_id, chat)
    assert gossip is not None
    with pytest.raises(GrantRefused, match="two different keys"):
        alice.accept_grant(gossip)


# ---- planted future keys: a device about to be removed gives a sibling the next key ---


def test_a_device_about_to_be_removed_cannot_plant_the_next_key() -> None:
    """The tablet, before it is unlinked, grants the laptop epoch 1 of the notes chat
    with a key of its own choosing. After the unlink the laptop seals with the primary's
    new key: the removed tablet cannot open it, the primary can."""
    phone, [laptop, tablet] = new_account("laptop", "tablet")
    laptop.offer_device_list(phone.device_list.encode())
    tablet.offer_device_list(phone.device_list.encode())
    chat = next(s.id for s in laptop.spaces.values() if s.name == NOTES)
    planted = new_space_key()
    grant = forged_grant(tablet, laptop, chat, 1, planted, [tablet])
    with contextlib.suppress(GrantRefused):
        laptop.accept_grant(grant)
    assert laptop.space(chat).keys.get(1) != planted
    phone.unlink(tablet.device_id)
    laptop.offer_device_list(phone.device_list.encode())
    assert laptop.space(chat).keys[1] == phone.space(chat).keys[1] != planted
    entry = laptop.new_entry(chat, "msg", WALL + 5, body="after the unlink")
    update, _ = laptop.write_local(chat, [entry])
    sealed = laptop.seal(chat, update)
    tablet.space(chat).keys[1] = planted  # all the tablet has for epoch 1
    with pytest.raises(P2PError):
        tablet.ingest(sealed)
    assert phone.ingest(sealed).space == chat


def test_a_conversation_key_from_a_non_rotating_member_is_not_taken() -> None:
    """Bob's tablet, about to be unlinked, grants Alice epoch 1 of their conversation
    first. Bob's primary then unlinks it and rotates: Alice takes the primary's key."""
    alice, _ = new_account()
    bob, [bob_tablet] = new_account("tablet")
    befriend([alice], [bob, bob_tablet])
    chat, _ = alice.new_conversation("team", [bob.account_id])
    for other in (bob, bob_tablet):
        Pair(alice, other).connect().run()
    Pair(bob, bob_tablet).connect().run()
    planted = new_space_key()
    with contextlib.suppress(GrantRefused):
        alice.accept_grant(forged_grant(bob_tablet, alice, chat, 1, planted, [alice, bob]))
    bob.unlink(bob_tablet.device_id)
    Pair(alice, bob).connect().run()
    assert alice.space(chat).epoch == 1
    assert alice.space(chat).keys[1] == bob.space(chat).keys[1] != planted


def test_a_rotation_still_spreads_through_devices_that_did_not_make_it() -> None:
    """Bob's primary unlinks his tablet and rotates; Alice never meets it. Bob's laptop
    (which took the new list) and a desktop Bob links afterwards each carry the rotation
    in their grants, and Alice takes epoch 1 from either."""
    alice, [alice_laptop] = new_account("laptop")
    bob, [bob_laptop, bob_tablet] = new_account("laptop", "tablet")
    befriend([alice, alice_laptop], [bob, bob_laptop, bob_tablet])
    chat, _ = alice.new_conversation("team", [bob.account_id])
    for a, b in ((alice, bob), (alice, bob_laptop), (alice_laptop, alice), (bob, bob_laptop)):
        Pair(a, b).connect().run()
    bob.unlink(bob_tablet.device_id)
    bob_laptop.offer_device_list(bob.device_list.encode())
    Pair(bob_laptop, alice).connect().run()
    assert alice.space(chat).epoch == 1
    assert alice.space(chat).keys[1] == bob.space(chat).keys[1]
    desktop_keys = DeviceKeys.generate()
    bundle, _ = bob.enroll(desktop_keys, "desktop")
    desktop, _ = DeviceState.from_enrollment(desktop_keys, "desktop", bundle)
    bob_laptop.offer_device_list(bob.device_list.encode())
    Pair(bob_laptop, desktop).connect().run()  # the desktop learns the chat's members
    alice_laptop.follow(bob.device_list.encode(), trusted=False)
    assert alice_laptop.space(chat).epoch == 0
    Pair(desktop, alice_laptop).connect().run()
    assert alice_laptop.space(chat).epoch == 1
    assert alice_laptop.space(chat).keys[1] == bob.space(chat).keys[1]


def test_the_next_rotation_takes_every_member_past_a_split_epoch() -> None:
    """Bob's and Carol's primaries both rotate epoch 1 (each unlinked a device): Alice
    refuses the second key visibly, and takes Carol's epoch 2 despite the split."""
    alice, _ = new_account()
    bob, _ = new_account()
    carol, _ = new_account()
    befriend([alice], [bob], [carol])
    chat, _ = alice.new_conversation("team", [bob.account_id, carol.account_id])
    for a, b in ((alice, bob), (alice, carol), (bob, carol)):
        Pair(a, b).connect().run()
    rotate(bob, chat)
    alice.accept_grant(bob.grant_to(alice.device_id, chat) or b"")
    rotate(carol, chat)  # Carol's primary rotates epoch 1 too, at the same time
    with pytest.raises(GrantRefused, match="two different keys"):
        alice.accept_grant(carol.grant_to(alice.device_id, chat) or b"")
    rotate(carol, chat)  # epoch 2, from Carol's primary
    alice.accept_grant(carol.grant_to(alice.device_id, chat) or b"")
    assert alice.space(chat).epoch == 2
    assert alice.space(chat).keys[2] == carol.space(chat).keys[2]
    # past the split, its two keys of epoch 1 are history: no refusal, no news
    assert alice.accept_grant(carol.grant_to(alice.device_id, chat) or b"")[1] is False
    # and the member that heals a split is one primary, the same for everyone
    healers = [s for s in (alice, bob, carol) if s.heals_split(chat)]
    assert [h.account_id for h in healers] == [min(alice.space(chat).members)]


# ---- linked-device phishing: codes that live for years, codes that point anywhere ----


def approve_with(code_text: str, dialed: list[list[str]], now_s: int) -> None:
    """Run the primary's ``approve_code`` with dialing replaced by a recorder (a test
    never dials anything but loopback): what would it have dialed?"""
    import trio

    from p2p.proto.pairing import PairingError
    from p2p.runtime import linking
    from p2p.storage.memory import MemoryStore

    phone, _ = new_account()

    async def fake_dial(addresses: list[str]) -> object:
        dialed.append(list(addresses))
        raise PairingError("not dialed in this test")

    async def read(name: str) -> bytes | None:
        return None

    async def write(batch: object) -> None:
        return None

    async def confirm(digits: str) -> bool:
        return True

    original = linking._dial_any
    linking._dial_any = fake_dial  # type: ignore[assignment]
    try:
        trio.run(
            partial(
                linking.approve_code,
                phone,
                code_text,
                read=read,
                write=write,
                history=linking.StoredHistory(phone, MemoryStore()),
                confirm=confirm,
                now_s=now_s,
            )
        )
    finally:
        linking._dial_any = original


def test_a_primary_refuses_a_pairing_code_that_lives_for_a_year() -> None:
    from p2p.proto.pairing import PairingCode, PairingError

    keys = DeviceKeys.generate()
    now = 1_800_000_000
    code = PairingCode.create(
        sign_pk=keys.sign_pk,
        addresses=["127.0.0.1:9"],
        now_s=now,
        ttl_s=365 * 24 * 3600,
    )
    dialed: list[list[str]] = []
    with pytest.raises(PairingError, match="at most"):
        approve_with(code.encode(), dialed, now + 3600)
    assert dialed == []


def test_a_primary_dials_only_local_addresses_a_code_names() -> None:
    from p2p.proto.pairing import PairingCode, PairingError

    keys = DeviceKeys.generate()
    now = 1_800_000_000
    # only loopback literals and names here: a test names no other address (a private
    # network's literal is dialed as loopback's is, by the same ipaddress check)
    addresses = ["attacker.example:80", "127.0.0.1:9", "[::1]:9", "localhost:9"]
    code = PairingCode.create(sign_pk=keys.sign_pk, addresses=[], now_s=now, ttl_s=600)
    # a code holds IP literals only (as bytes): names are left out when it is made
    both = replace(code, addresses=tuple(addresses))
    assert PairingCode.decode(both.encode()).addresses == ("127.0.0.1:9", "[::1]:9")
    assert both.local_addresses() == ["127.0.0.1:9", "[::1]:9"]
    dialed: list[list[str]] = []
    with pytest.raises(PairingError):
        approve_with(both.encode(), dialed, now)
    assert dialed == [["127.0.0.1:9", "[::1]:9"]]  # literals only: names are not resolved
    public = replace(code, addresses=(addresses[0], addresses[3]))
    dialed.clear()
    with pytest.raises(PairingError, match="--connect"):
        approve_with(public.encode(), dialed, now)
    assert dialed == []


def test_a_pairing_code_fits_one_line_and_an_old_one_is_refused_by_name() -> None:
    from p2p.proto.pairing import OutdatedCode, PairingCode, to_text
    from p2p.proto.wire import pack

    keys = DeviceKeys.generate()
    one = PairingCode.create(
        sign_pk=keys.sign_pk, addresses=["127.0.0.1:41000"], now_s=1_800_000_000, ttl_s=600
    )
    assert len(one.encode()) == 71
    assert PairingCode.decode(one.encode()) == one
    assert one.device_id == keys.device_id
    # a wildcard listener's many addresses: as many as keep the text on one 80-column line
    many = [f"127.0.0.{i}:41000" for i in range(1, 9)]
    cut = PairingCode.create(sign_pk=keys.sign_pk, addresses=many, now_s=0, ttl_s=600)
    assert len(cut.encode()) <= 80
    assert cut.addresses == tuple(many[:2])
    old = to_text("P2P1:", pack([1, keys.sign_pk, keys.box_pk, bytes(16), 0, "laptop", []]))
    with pytest.raises(OutdatedCode, match="new one"):
        PairingCode.decode(old)


def test_a_device_whose_key_is_not_the_one_its_code_names_is_not_linked() -> None:
    """The code names the device by its id only: a device answering with another key
    (someone who read the code, and so knows its secret) is refused before anything is
    asked or changed, even though it passes the secret's MAC."""
    from test_chaos_fuzz import pipe

    from p2p.proto.pairing import PairingCode, PairingError
    from p2p.runtime.linking import StoredHistory, accept, approve
    from p2p.storage.memory import MemoryStore

    phone, _ = DeviceState.create_account("phone")
    shown = DeviceKeys.generate()
    code = PairingCode.create(sign_pk=shown.sign_pk, addresses=[], now_s=0, ttl_s=600)
    version = phone.device_list.version
    asked: list[str] = []

    async def confirm(digits: str) -> bool:
        asked.append(digits)
        return True

    async def persist(batch: object) -> None:
        raise AssertionError("nothing is written")

    class NoHistory(StoredHistory):
        async def plan(self, space_id: str, have: bytes) -> tuple[int, int]:
            raise AssertionError("no history is sent")

    history = NoHistory(phone, MemoryStore())

    async def main() -> None:
        ours, theirs = pipe()
        errors: list[P2PError] = []

        async def impostor() -> None:
            with contextlib.suppress(P2PError, trio.EndOfChannel, trio.BrokenResourceError):
                await accept(
                    DeviceKeys.generate(), "laptop", code, theirs, MemoryStore(),
                    show_check=lambda digits: None,
                )  # fmt: skip

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(impostor)
                try:
                    await approve(
                        phone, code, ours,
                        confirm=confirm, persist=persist, history=history, now_ms=0,
                    )  # fmt: skip
                except PairingError as exc:
                    errors.append(exc)
                finally:
                    await ours.aclose()
                    await theirs.aclose()
        assert len(errors) == 1
        assert "not the one its code names" in str(errors[0])

    trio.run(main)
    assert asked == []
    assert phone.device_list.version == version


def test_every_device_of_the_account_reports_a_new_device() -> None:
    """A phished code links an attacker's device: the owner's other devices say so."""
    import trio
    from procs import run_virtual as run
    from procs import wait_for

    from p2p import events as ev
    from p2p import testing

    async def scenario() -> None:
        async with testing.cluster(2) as c:
            phone, laptop = c.nodes
            await c.settle()
            seen = {node: node.subscribe() for node in (phone, laptop)}
            keys = DeviceKeys.generate()
            _, batch = phone.state.enroll(keys, "Evil laptop")
            await phone.writer.commit(batch)
            phone.membership.device_list_changed()  # as Node.approve does once a link is made
            await wait_for(lambda: keys.device_id in laptop.state.device_list.ids)
            await wait_for(lambda: laptop.store.get(f"linked/{keys.device_id}") is not None)
            for events in seen.values():
                got = []
                while True:
                    try:
                        got.append(events.receive_nowait())
                    except trio.WouldBlock:
                        break
                linked = [e for e in got if isinstance(e, ev.DeviceLinked)]
                assert linked == [ev.DeviceLinked(device=keys.device_id, name="Evil laptop")]

    run(scenario)


# ---- contacts' chats: who may start one on our devices, and the 64 hello tags --------


def test_a_group_member_that_is_not_a_contact_cannot_start_chats_with_us() -> None:
    """Bob (a contact of Alice and of Carol) makes a group of the three; Alice follows
    Carol only through it. Carol then starts a conversation with Alice alone: Alice's
    devices do not join it."""
    alice, _ = new_account()
    bob, _ = new_account()
    carol, _ = new_account()
    befriend([alice], [bob])
    befriend([bob], [carol])
    group, _ = bob.new_conversation("group", [alice.account_id, carol.account_id])
    Pair(bob, alice).connect().run()
    Pair(bob, carol).connect().run()
    assert group in alice.spaces
    assert carol.account_id in alice.accounts  # followed: her entries must verify
    carol.follow(alice.device_list.encode(), trusted=True)  # Carol has Alice's list
    spam, _ = carol.new_conversation("buy now", [alice.account_id])
    with contextlib.suppress(GrantRefused):
        alice.accept_grant(carol.grant_to(alice.device_id, spam) or b"")
    assert spam not in alice.spaces


def test_a_contact_making_many_chats_pushes_no_contact_out_of_our_hello() -> None:
    from p2p.proto.session import MAX_TAGS

    alice, _ = new_account()
    bob, _ = new_account()
    carol, _ = new_account()
    befriend([alice], [bob], [carol])
    for i in range(MAX_TAGS):
        chat, _ = bob.new_conversation(f"spam {i}", [alice.account_id])
        alice.accept_grant(bob.grant_to(alice.device_id, chat) or b"")
    sent = alice.discovery_keys()[:MAX_TAGS]
    for contact in (bob, carol):  # each contact's devices meet ours with its contact key
        tag_key = hashlib.blake2b(
            contact.contact_key(), digest_size=32, person=b"p2p-discovery"
        ).digest()
        assert tag_key in sent


# ---- attachments: chunks only for member devices of a chat that carries them ---------


def test_another_accounts_device_gets_no_chunk_of_a_chat_it_is_not_in(tmp_path: Path) -> None:
    """A's phone sends a file in A's notes. B's phone (connected: they share a chat)
    asks A's phone for its chunks by hash: it gets nohave, A's laptop gets them."""
    import trio
    from procs import run_virtual as run
    from procs import wait_for
    from test_accounts import two_account_nodes

    from p2p import events as ev

    (tmp_path / "secret.bin").write_bytes(b"private notes " * 5000)

    async def scenario() -> None:
        async with two_account_nodes() as ([a_phone, a_laptop], [b_phone, _]):
            await wait_for(lambda: len(a_phone.contacts()) == 1)
            await a_phone.create_chat("team", with_=["Bea"])
            sent = await a_phone.send_file(tmp_path / "secret.bin", chat="notes")
            [message] = [m for m in a_phone.messages("notes") if m.id == sent]
            assert message.attachment is not None
            wanted = message.attachment.hashes[0]
            await trio.sleep(5)  # (virtual time) the media service scans the new message
            media = a_phone.media
            for device in (b_phone.device_id, a_laptop.device_id):
                media.observe(ev.PeerConnected(device=device, remote="test"))
                media._lanes[device].serve.clear()
                media._lanes[device].refusals.clear()
                # no checkpoint from here to next_out: the node's own pump cannot interleave
                assert media.frame_in(device, "ask", {"h": wanted}) is None
                out = media.next_out(device)
                assert out is not None
                kind, fields = out
                expected = "nohave" if device == b_phone.device_id else "blob"
                assert (kind, fields["h"]) == (expected, wanted)

    run(scenario)


def test_our_fetcher_asks_only_member_devices_of_the_chat() -> None:
    from p2p.media.fetch import Fetcher

    fetcher = Fetcher()
    for peer in ("ours", "theirs"):
        fetcher.peer_up(peer)
    chunks = [bytes([i]) * 32 for i in range(4)]
    fetcher.want(chunks)
    plan = fetcher.plan(lambda peer, h: peer == "ours")
    assert set(plan) == {"ours"}
    assert sorted(plan["ours"]) == sorted(chunks)


def test_a_leave_rotation_waits_for_the_leave_entry_then_applies() -> None:
    """Carol leaves; the rotating primary's grant reaches the other member before
    Carol's leave entry does: it waits (RotationUnproven), and applies once it has it."""
    from p2p.proto.authority import RotationUnproven

    alice, _ = new_account()
    bob, _ = new_account()
    carol, _ = new_account()
    befriend([alice], [bob], [carol])
    chat, _ = alice.new_conversation("team", [bob.account_id, carol.account_id])
    for a, b in ((alice, bob), (alice, carol), (bob, carol)):
        Pair(a, b).connect().run()
    leave = carol.new_entry(chat, "leave", WALL + 1)
    update, _ = carol.write_local(chat, [leave])
    envelope = carol.seal(chat, update)
    rotator, other = sorted((alice, bob), key=lambda s: s.account_id)
    rotator.ingest(envelope)
    departed = rotator.departed(chat)
    assert departed == {carol.account_id}
    assert rotator.rotates_for(chat, departed)
    rotator.rotate_without(chat, departed)
    grant = rotator.grant_to(other.device_id, chat)
    assert grant is not None
    with pytest.raises(RotationUnproven):
        other.accept_grant(grant)
    assert other.space(chat).epoch == 0
    other.ingest(envelope)
    assert other.accept_grant(grant)[:2] == (chat, True)
    assert other.space(chat).epoch == 1
    assert set(other.space(chat).members) == {alice.account_id, bob.account_id}


def test_running_nodes_heal_an_epoch_split() -> None:
    """A's and B's primaries each unlink a companion while cut off from each other: two
    keys for epoch 1 of their conversation. When they meet, the split is reported and
    one primary's new epoch joins them again."""
    from contextlib import AsyncExitStack

    from procs import run_virtual as run
    from procs import wait_for

    from p2p import events as ev
    from p2p.runtime.node import open_node
    from p2p.testing import Cluster, provision_account
    from p2p.transport.memory import MemoryNetwork

    async def scenario() -> None:
        network = MemoryNetwork(seed=4)
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
            a_phone, a_laptop, b_phone, b_tablet = nodes
            await a_phone.add_contact(b_phone.contact_code(), name="Bea")
            await b_phone.add_contact(a_phone.contact_code(), name="Ali")
            chat = await a_phone.create_chat("team", with_=["Bea"])
            await wait_for(lambda: chat in b_phone.state.spaces)
            reports = a_phone.subscribe(), b_phone.subscribe()
            network.partition({"a-phone", "a-laptop"}, {"b-phone", "b-tablet"})
            await a_phone.unlink(a_laptop.device_id)
            await b_phone.unlink(b_tablet.device_id)
            keys = a_phone.state.space(chat).keys, b_phone.state.space(chat).keys
            assert keys[0][1] != keys[1][1]
            network.heal()

            def joined() -> bool:
                a, b = a_phone.state.space(chat), b_phone.state.space(chat)
                return a.epoch == b.epoch == 2 and a.keys[2] == b.keys[2]

            await wait_for(joined)
            splits = []
            for events in reports:
                while True:
                    try:
                        event = events.receive_nowait()
                    except trio.WouldBlock:
                        break
                    if isinstance(event, ev.InputRejected) and event.error == "EpochSplit":
                        splits.append(event)
            assert splits
            await a_phone.send("after the split", chat=chat)
            await wait_for(lambda: len(b_phone.messages(chat)) == 1)

    run(scenario)
