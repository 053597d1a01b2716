"""DeviceState details that the protocol tests do not reach."""

from __future__ import annotations

from p2p.state.device import NOTES, DeviceState, claim_run
from p2p.storage.memory import MemoryStore


def test_counters_are_never_reused_after_a_crash() -> None:
    """Envelopes sealed after the last durable write must not share counters with the
    envelopes a restarted device seals: peers would drop those as replays."""
    _, batch = DeviceState.create_account("phone")
    store = MemoryStore()
    store.write(batch)
    state = DeviceState.load(store, claim_run(store))  # what open_node does
    chat = state.chat_by_name(NOTES).id
    used = [state.seal(chat, b"\x00\x00") and state.counter for _ in range(700)]
    assert state.counters_wanted  # crash: the writer never claimed the next block
    restarted = DeviceState.load(store, claim_run(store))
    restarted.seal(chat, b"\x00\x00")
    assert restarted.counter > max(used)


def test_a_reload_restores_spaces_keys_and_history() -> None:
    created, batch = DeviceState.create_account("phone")
    store = MemoryStore()
    store.write(batch)
    chat = created.chat_by_name(NOTES).id
    entry = created.new_entry(chat, "msg", 1_767_225_600_000, body="hello")
    store.write(created.write_local(chat, [entry])[1])
    again = DeviceState.load(store)
    assert again.device_id == created.device_id
    assert again.is_primary
    assert again.space(chat).keys == created.space(chat).keys
    shown, _ = again.space(chat).replica.view(again.any_signing_key, again.belongs)
    assert [m.text for m in shown] == ["hello"]


def test_a_companion_out_of_touch_with_the_primary_is_refused_until_renewed() -> None:
    from p2p.errors import LeaseExpired
    from p2p.proto.identity import LEASE_MS, DeviceEntry, DeviceKeys
    from p2p.proto.session import LeaseIn
    from p2p.testing.sessions import Pair

    day = 24 * 3600 * 1000
    phone, _ = DeviceState.create_account("phone")
    companions = []
    for name in ("laptop", "tablet"):
        keys = DeviceKeys.generate()
        entry = DeviceEntry.of(keys, phone.device_list.account_pk, name, "companion")
        bundle, _ = phone.enroll_public(entry, now_ms=0)
        companions.append(DeviceState.from_enrollment(keys, name, bundle)[0])
    laptop, tablet = companions
    laptop.offer_device_list(phone.device_list.encode())

    def meet(a: DeviceState, b: DeviceState, wall_ms: int) -> list[object]:
        """Run a handshake; return what each side ended with (errors and leases)."""
        pair = Pair(a, b, wall_ms=wall_ms).start()
        pair.run()
        return [LeaseIn(d) for end in pair.ends for d in end.leases_in] + [
            e for end in pair.ends for e in end.errors
        ]

    assert meet(laptop, tablet, 13 * day) == []  # both leases still run
    late = LEASE_MS + day
    refused = meet(laptop, tablet, late)
    assert any(isinstance(e, LeaseExpired) for e in refused)
    renewed = meet(laptop, phone, late)  # the primary always answers, and renews
    assert any(isinstance(e, LeaseIn) for e in renewed)
    still = meet(tablet, laptop, late)  # the laptop is fine now, the tablet is not
    assert LeaseExpired in {type(e) for e in still}  # the laptop refuses the tablet
    meet(tablet, phone, late)
    assert meet(laptop, tablet, late) == []


def test_a_device_linked_while_running_writes_as_our_account_at_once() -> None:
    """A primary takes a companion it has just linked as a writer of its account: what
    the companion writes is relayable to other accounts' devices (and goes into their
    catch-ups). The table of whose CRDT clients are whose was built once and kept the
    new companion unknown until another device list arrived."""
    from p2p.proto.identity import DeviceKeys
    from p2p.state.device import crdt_client

    phone, _ = DeviceState.create_account("phone")
    chat = phone.chat_by_name(NOTES).id
    assert phone.client_account(crdt_client(phone.device_id, 1)) == phone.account_id
    keys = DeviceKeys.generate()
    bundle, _ = phone.enroll(keys, "laptop")
    laptop, _ = DeviceState.from_enrollment(keys, "laptop", bundle)
    entry = laptop.new_entry(chat, "msg", 1_767_225_600_000, body="from the laptop")
    update, _ = laptop.write_local(chat, [entry])
    assert phone.client_account(crdt_client(keys.device_id, 1)) == phone.account_id
    assert phone.ingest(laptop.seal(chat, update)).relayable


def test_enrollment_spaces_keep_their_keys_out_of_reprs() -> None:
    from p2p.proto.identity import DeviceKeys

    phone, _ = DeviceState.create_account("phone")
    bundle, _ = phone.enroll(DeviceKeys.generate(), "laptop")
    for space in bundle.enrolled:
        assert space.name in repr(space)
        for key in space.keys.values():
            assert repr(key) not in repr(space)
            assert repr(key) not in repr(bundle)
