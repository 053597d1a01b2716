"""DeviceState details that the protocol tests do not reach."""

from __future__ import annotations

from p2p.core import NOTES, DeviceState
from p2p.storage.memory import MemoryStore


def test_counters_are_never_reused_after_a_crash() -> None:
    """Envelopes sealed after the last durable write must not share counters with the
    envelopes a restarted device seals: peers would drop those as replays."""
    _, batch = DeviceState.create_account("phone")
    store = MemoryStore()
    store.write(batch)
    state = DeviceState.load(store)
    store.write(state.reserve_counters())  # what open_node does before sealing anything
    chat = state.chat_by_name(NOTES).id
    used = [state.seal(chat, b"\x00\x00") and state.counter for _ in range(700)]
    # crash: the half-way reservation in state.unsaved was never written
    restarted = DeviceState.load(store)
    store.write(restarted.reserve_counters())
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
    shown, _ = again.space(chat).replica.view(again.any_signing_key, again.account_of)
    assert [m.text for m in shown] == ["hello"]
