"""Attacks on identity, keys and membership, written as an attacker would write them.

Each test plays a modified device of another account (or of ours, about to be removed)
through the Python API: it signs what its own keys let it sign and sends it where the
protocol would carry it. The honest devices are plain ``DeviceState``s wired by the
sans-I/O ``Link``; every test fails on the code before the defence it checks.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import pytest

from p2p.core import DeviceState, crdt_client
from p2p.errors import DeviceListError, InvalidUpdate, P2PError
from p2p.identity import DOMAIN_DEVICE_LIST, DeviceEntry
from p2p.model import Entry
from tests.test_accounts import befriend
from tests.test_sync_session import WALL, Link, new_account, view

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
    Link(alice, bob).connect().run()
    Link(alice, mallory).connect().run()
    Link(bob, mallory).connect().run()
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
    Link(alice, bob).connect().run()
    assert [m.text for m in view(bob, chat)] == ["alice was here", "still me"]


def test_a_device_key_listed_by_one_account_is_refused_on_another() -> None:
    """Even with the device's own proof for both (a modified device that consents to two
    accounts), the second list naming it is refused: one key, one account."""
    from p2p.identity import possession_proof

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
