"""A node killed with SIGKILL mid-stream keeps every message whose ``send`` returned."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import trio
from procs import Child

import p2p

CHILD = textwrap.dedent(
    """
    import sys, trio, p2p

    async def main():
        async with p2p.open_node(sys.argv[1]) as node:
            for i in range(100_000):
                message_id = await node.send(f"message {i}")
                print(message_id, flush=True)

    trio.run(main)
    """
)


def messages_in(home: Path) -> list[p2p.Message]:
    async def read() -> list[p2p.Message]:
        async with p2p.open_node(home) as node:
            return node.messages()

    return trio.run(read)


@pytest.mark.slow
@pytest.mark.parametrize("round_", range(3))
def test_sigkill_mid_stream_loses_no_acknowledged_send(tmp_path: Path, round_: int) -> None:
    home = tmp_path / "phone"
    p2p.init_account(home, "phone")
    acknowledged: list[str] = []
    for _ in range(2):  # kill, reopen, kill again: the reopened store keeps working
        child = Child([sys.executable, "-c", CHILD, str(home)], logs=tmp_path)
        try:
            child.wait_line(lambda _, c=child: len(c.lines) >= 150 + 50 * round_, timeout=60)
        finally:
            child.kill()
        acknowledged += [line.strip() for line in child.lines]
    stored = {m.id for m in messages_in(home)}
    missing = [m for m in acknowledged if m not in stored]
    assert not missing, f"{len(missing)} acknowledged sends lost, first {missing[:3]}"


def test_long_logs_are_compacted_and_reopen_identically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past COMPACT_AFTER updates the log folds into a snapshot; reopening shows the same."""
    import p2p.runtime.writer
    from p2p.storage.sqlite import SqliteStore

    monkeypatch.setattr(p2p.runtime.writer, "COMPACT_AFTER", 50)
    monkeypatch.setattr(p2p.runtime.writer, "SNAPSHOT_PART", 2048)
    home = tmp_path / "phone"
    p2p.init_account(home, "phone")

    async def write() -> list[str]:
        async with p2p.open_node(home) as node:
            for i in range(130):
                await node.send(f"message {i}")
            return [m.id for m in node.messages()]

    before = trio.run(write)
    store = SqliteStore(home / "p2p.db")
    try:
        [chat] = store.spaces()  # only the notes chat has updates
        log = store.load_space(chat)
    finally:
        store.close()
    # stored in bounded parts: a reader of the store holds one at a time
    assert len(log.snapshot_parts) > 1
    assert all(len(part) <= 2048 for part in log.snapshot_parts)
    assert log.snapshot_seq >= 100
    assert len(log.updates) < 50
    assert [m.id for m in messages_in(home)] == before


def test_a_snapshot_larger_than_any_frame_still_opens(tmp_path: Path) -> None:
    """Compaction folds the whole chat into one snapshot: past MAX_UPDATE (1 MiB, the
    bound on what a peer may send) our own store must still open."""
    import p2p.proto.model
    from p2p.runtime.home import create_store
    from p2p.state.device import DeviceState

    home = tmp_path / "phone"
    state = p2p.init_account(home, "phone")
    chat = state.chat_by_name("notes").id
    entries = [
        state.new_entry(chat, "msg", 1_767_225_600_000 + i, body=f"{i} " + "x" * 200)
        for i in range(2000)
    ]
    update, _ = state.write_local(chat, entries)
    snapshot = state.space(chat).replica.snapshot()
    store = create_store(home)
    try:
        store.write(p2p.storage.WriteBatch(appends=[(chat, update)]))
        store.compact(chat, [snapshot], 1)  # one part, as a store of an earlier release
    finally:
        store.close()
    limit = len(snapshot) // 2  # as if the chat had outgrown the frame limit
    original = p2p.proto.model.MAX_UPDATE
    p2p.proto.model.MAX_UPDATE = limit
    try:
        store = create_store(home)
        try:
            assert [len(p) for p in store.load_space(chat).snapshot_parts] == [len(snapshot)]
            again = DeviceState.load(store)
            again.space(chat).replica.load()  # documents load on first use, from the store
        finally:
            store.close()
    finally:
        p2p.proto.model.MAX_UPDATE = original
    assert again.space(chat).replica.count() == 2000
