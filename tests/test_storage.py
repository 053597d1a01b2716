"""Acceptance suite of the storage layer: every adapter must pass the same tests.

The shared tests run once per adapter through the ``store`` fixture; what only makes
sense for a file (reopening, corrupt files, a process killed mid-write) is SQLite-only.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path

import pytest

from p2p.errors import StoreCorrupt, StoreError
from p2p.storage import (
    MemoryStore,
    SpaceLog,
    SqliteStore,
    Store,
    WriteBatch,
    open_store,
)
from p2p.storage.base import IndexRow
from p2p.storage.memory import MAX_NAME
from p2p.storage.sqlite import SCHEMA_VERSION

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A fresh, empty store of each adapter; closed after the test."""
    s: Store = MemoryStore() if request.param == "memory" else SqliteStore(tmp_path / "p2p.db")
    yield s
    s.close()


def append(store: Store, space: str, *updates: bytes) -> None:
    store.write(WriteBatch(appends=[(space, u) for u in updates]))


# --- the message index --------------------------------------------------------------


def row(key: str, ts: str, *, map_name: str = "m", kind: str = "msg", target: str = "") -> IndexRow:
    return IndexRow(
        space="s",
        map=map_name,
        key=key,
        id=key,
        kind=kind,
        account="a",
        device="d",
        ts=ts,
        target=target,
    )


def test_index_rows_replace_remove_and_page(store: Store) -> None:
    rows = [row(f"id{i}", f"{1000 + i}.000000") for i in range(6)]
    store.write(WriteBatch(index={("s", "m", r.key): r for r in rows}))
    store.write(
        WriteBatch(
            index={
                ("s", "m", "id2"): None,
                ("s", "m", "id3"): replace(rows[3], reason="bad signature", sig="x"),
                ("s", "e", "ed"): row("ed", "2000.000000", map_name="e", kind="edit", target="id4"),
            }
        )
    )
    assert [r.key for r in store.index_messages("s")] == ["id0", "id1", "id4", "id5"]
    assert [r.key for r in store.index_messages("s", last=2)] == ["id4", "id5"]
    assert [r.key for r in store.index_messages("s", last=2, before=rows[4].order())] == [
        "id0",
        "id1",
    ]
    assert [r.key for r in store.index_related("s", ["id4"])] == ["ed"]
    assert store.index_related("s", ["id5"]) == []
    assert [(r.key, r.sig) for r in store.index_rejected("s")] == [("id3", "x")]
    assert store.index_messages("other") == []


def test_index_authors_gives_each_devices_newest_message(store: Store) -> None:
    rows = {
        ("s", "m", "a1"): replace(row("a1", "1000.000001"), device="da"),
        ("s", "m", "a2"): replace(row("a2", "1000.000003"), device="da"),
        ("s", "m", "b1"): replace(row("b1", "1000.000002"), device="db", reason="bad signature"),
        ("s", "e", "b2"): replace(
            row("b2", "2000.000000", map_name="e", kind="edit", target="a1"), device="db"
        ),
        ("s", "m", "junk"): IndexRow(space="s", map="m", key="junk", reason="malformed"),
        ("t", "m", "c1"): replace(row("c1", "3000.000000"), space="t", device="dc"),
    }
    store.write(WriteBatch(index=rows))
    # messages only (an edit is not one), hidden ones too, malformed ones (no device) not
    assert store.index_authors("s") == {"da": "1000.000003", "db": "1000.000002"}
    store.write(WriteBatch(index={("s", "m", "a2"): None}))
    assert store.index_authors("s") == {"da": "1000.000001", "db": "1000.000002"}
    assert store.index_authors("none") == {}


def test_log_seqs_without_reading_updates(store: Store) -> None:
    assert store.log_seqs("s") == (0, 0)
    append(store, "s", b"u1", b"u2", b"u3")
    assert store.log_seqs("s") == (0, 3)
    store.compact("s", [b"snap"], 2)
    assert store.log_seqs("s") == (2, 3)


@pytest.mark.parametrize(
    "index",
    [
        {("s", "m", "k"): IndexRow(space="s", map="m", key="other")},
        {("s", "z", "k"): None},
        {("s", "m"): None},
        {("s", "m", "k"): "not a row"},
        {("s", "m", "k"): IndexRow(space="s", map="m", key="k", body=7)},  # type: ignore[arg-type]
        {("s", "m", "k"): IndexRow(space="s", map="m", key="k", body="\udc80")},
    ],
    ids=["misfiled", "map", "short-key", "type", "field-type", "surrogate"],
)
def test_bad_index_changes_are_refused_and_apply_nothing(
    store: Store, index: dict[object, object]
) -> None:
    with pytest.raises(StoreError):
        store.write(WriteBatch(records={"r": b"v"}, index=index))  # type: ignore[arg-type]
    assert store.get("r") is None


def test_bad_paging_arguments_are_refused(store: Store) -> None:
    with pytest.raises(StoreError):
        store.index_messages("s", last=-1)
    with pytest.raises(StoreError):
        store.index_messages("s", last=True)
    with pytest.raises(StoreError):
        store.index_messages("s", before=("ts", "device"))  # type: ignore[arg-type]


# --- records ------------------------------------------------------------------------


def test_records_get_put_replace_delete(store: Store) -> None:
    assert store.get("device/key") is None
    store.write(WriteBatch(records={"device/key": b"k1", "device/name": b"phone"}))
    assert store.get("device/key") == b"k1"
    store.write(WriteBatch(records={"device/key": b"k2"}))
    assert store.get("device/key") == b"k2"
    assert store.get("device/name") == b"phone"
    store.write(WriteBatch(deletes={"device/key", "never/there"}))
    assert store.get("device/key") is None
    assert store.get("device/name") == b"phone"


def test_empty_value_is_not_absent(store: Store) -> None:
    store.write(WriteBatch(records={"counter": b""}))
    assert store.get("counter") == b""


def test_names_by_prefix_sorted(store: Store) -> None:
    names = ["keys/b", "keys/a", "keys/a/2", "keysx", "kez", "list", "keys/%_", "keys/é"]
    store.write(WriteBatch(records={n: n.encode() for n in names}))
    assert store.names("keys/") == ["keys/%_", "keys/a", "keys/a/2", "keys/b", "keys/é"]
    assert store.names("keys") == ["keys/%_", "keys/a", "keys/a/2", "keys/b", "keys/é", "keysx"]
    assert store.names("") == sorted(names)
    assert store.names("nothing/") == []
    assert store.names("keys/a/2") == ["keys/a/2"]


def test_stored_bytes_are_a_copy(store: Store) -> None:
    value = bytearray(b"secret")
    update = bytearray(b"update")
    store.write(WriteBatch(records={"r": value}, appends=[("s", update)]))  # type: ignore[dict-item,list-item]
    value[:] = b"XXXXXX"
    update[:] = b"YYYYYY"
    assert store.get("r") == b"secret"
    assert store.load_space("s").updates == [b"update"]
    assert type(store.get("r")) is bytes


@pytest.mark.parametrize(
    "bad_name",
    ["", "x" * (MAX_NAME + 1), "nul\x00inside", "surrogate\udc80", 42, None, b"bytes"],
)
def test_bad_names_refused(store: Store, bad_name: object) -> None:
    with pytest.raises(StoreError):
        store.write(WriteBatch(records={bad_name: b"v"}))  # type: ignore[dict-item]
    with pytest.raises(StoreError):
        store.get(bad_name)  # type: ignore[arg-type]
    with pytest.raises(StoreError):
        store.write(WriteBatch(appends=[(bad_name, b"u")]))  # type: ignore[list-item]
    with pytest.raises(StoreError):
        store.load_space(bad_name)  # type: ignore[arg-type]
    assert store.names("") == []
    assert store.spaces() == []


def test_longest_name_accepted(store: Store) -> None:
    name = "n" * MAX_NAME
    store.write(WriteBatch(records={name: b"v"}, appends=[(name, b"u")]))
    assert store.get(name) == b"v"
    assert store.spaces() == [name]


def test_bad_values_refused(store: Store) -> None:
    with pytest.raises(StoreError):
        store.write(WriteBatch(records={"r": "text"}))  # type: ignore[dict-item]
    with pytest.raises(StoreError):
        store.write(WriteBatch(appends=[("s", None)]))  # type: ignore[list-item]
    with pytest.raises(StoreError):
        store.write("not a batch")  # type: ignore[arg-type]
    assert store.get("r") is None
    assert store.spaces() == []


# --- atomicity ------------------------------------------------------------------------


def test_batch_with_one_bad_name_applies_nothing(store: Store) -> None:
    store.write(WriteBatch(records={"keep": b"old"}))
    bad = WriteBatch(
        records={"keep": b"new", "other": b"x"},
        deletes={"gone"},
        appends=[("s", b"u1"), ("x" * (MAX_NAME + 1), b"u2")],
    )
    with pytest.raises(StoreError):
        store.write(bad)
    assert store.get("keep") == b"old"
    assert store.get("other") is None
    assert store.load_space("s") == SpaceLog(
        snapshot_parts=[], snapshot_seq=0, updates=[], last_seq=0
    )
    assert store.spaces() == []


def test_set_and_delete_same_name_deletes(store: Store) -> None:
    """Deletes apply after records: core.merge_batches relies on it for "set, then delete"."""
    store.write(WriteBatch(records={"r": b"old", "keep": b"k"}))
    store.write(WriteBatch(records={"r": b"new", "keep": b"k2"}, deletes={"r"}))
    assert store.get("r") is None
    assert store.get("keep") == b"k2"


def test_empty_batch_is_a_no_op(store: Store) -> None:
    store.write(WriteBatch())
    assert store.names("") == []
    assert store.spaces() == []


# --- update logs ----------------------------------------------------------------------


def test_unknown_space_is_an_empty_log(store: Store) -> None:
    log = store.load_space("nobody")
    assert log == SpaceLog(snapshot_parts=[], snapshot_seq=0, updates=[], last_seq=0)
    assert store.spaces() == []


def test_appends_keep_order_and_number_from_one(store: Store) -> None:
    append(store, "a", b"a1", b"a2")
    store.write(WriteBatch(appends=[("b", b"b1"), ("a", b"a3"), ("b", b"b2")]))
    append(store, "a", b"a4")
    a = store.load_space("a")
    assert a.updates == [b"a1", b"a2", b"a3", b"a4"]
    assert (a.snapshot_parts, a.snapshot_seq, a.last_seq) == ([], 0, 4)
    b = store.load_space("b")
    assert b.updates == [b"b1", b"b2"]
    assert b.last_seq == 2


def test_spaces_sorted_and_distinct(store: Store) -> None:
    for space in ["zeta", "alpha", "mid", "alpha", "zeta"]:
        append(store, space, b"u")
    store.write(WriteBatch(records={"not/a/space": b"r"}))
    assert store.spaces() == ["alpha", "mid", "zeta"]


def test_load_space_returns_a_fresh_list(store: Store) -> None:
    append(store, "s", b"u1")
    store.load_space("s").updates.append(b"sneaky")
    assert store.load_space("s").updates == [b"u1"]


def test_compaction_keeps_later_updates(store: Store) -> None:
    append(store, "s", *[f"u{i}".encode() for i in range(1, 11)])
    store.compact("s", [b"snap@6"], 6)
    log = store.load_space("s")
    assert log.snapshot_parts == [b"snap@6"]
    assert log.snapshot_seq == 6
    assert log.updates == [b"u7", b"u8", b"u9", b"u10"]
    assert log.last_seq == 10
    # numbering continues after the snapshot and the tail
    append(store, "s", b"u11")
    assert store.load_space("s").last_seq == 11
    store.compact("s", [b"snap@9"], 9)
    log = store.load_space("s")
    assert (log.snapshot_parts, log.snapshot_seq, log.updates) == ([b"snap@9"], 9, [b"u10", b"u11"])


def test_full_compaction_keeps_space_and_numbering(store: Store) -> None:
    append(store, "s", b"u1", b"u2", b"u3")
    store.compact("s", [b"all"], 3)
    log = store.load_space("s")
    assert (log.snapshot_parts, log.snapshot_seq, log.updates, log.last_seq) == ([b"all"], 3, [], 3)
    assert store.spaces() == ["s"]
    append(store, "s", b"u4")
    log = store.load_space("s")
    assert (log.updates, log.last_seq) == ([b"u4"], 4)
    store.compact("s", [b"all again"], 3)  # same point, new bytes: allowed
    assert store.load_space("s").snapshot_parts == [b"all again"]


def test_a_snapshot_in_parts_is_read_back_in_order_and_one_at_a_time(store: Store) -> None:
    append(store, "s", *[f"u{i}".encode() for i in range(1, 8)])
    store.compact("s", [b"p0", bytearray(b"p-1"), memoryview(b"p--2")], 5)
    log = store.load_space("s")
    assert (log.snapshot_parts, log.snapshot_seq, log.updates) == (
        [b"p0", b"p-1", b"p--2"],
        5,
        [b"u6", b"u7"],
    )
    assert all(type(part) is bytes for part in log.snapshot_parts)
    assert [store.snapshot_part("s", i) for i in range(4)] == [
        (5, b"p0"),
        (5, b"p-1"),
        (5, b"p--2"),
        None,
    ]
    assert store.log_seqs("s") == (5, 7)
    assert store.space_bytes("s", 0) == 2 + 3 + 4 + 2 * 2  # every part, then the tail
    assert store.space_bytes("s", 5) == 4
    assert store.spaces() == ["s"]
    # a new snapshot of fewer parts replaces every old part
    store.compact("s", [b"q0", b"q1"], 7)
    assert store.load_space("s").snapshot_parts == [b"q0", b"q1"]
    assert store.snapshot_part("s", 2) is None
    assert store.log_seqs("s") == (7, 7)
    assert store.space_bytes("s", 0) == 4
    append(store, "s", b"u8")
    assert store.load_space("s").last_seq == 8
    assert store.snapshot_part("nobody", 0) is None
    with pytest.raises(StoreError):
        store.snapshot_part("s", -1)


@pytest.mark.parametrize("upto", [6, 100, 0, 1, -1])
def test_compaction_refuses_bad_upto(store: Store, upto: int) -> None:
    append(store, "s", b"u1", b"u2", b"u3", b"u4", b"u5")
    store.compact("s", [b"snap@2"], 2)
    with pytest.raises(StoreError):
        store.compact("s", [b"bad"], upto)  # past the end, or older than the snapshot
    log = store.load_space("s")
    assert (log.snapshot_parts, log.snapshot_seq, log.updates) == (
        [b"snap@2"],
        2,
        [b"u3", b"u4", b"u5"],
    )


def test_compaction_of_unknown_space_refused(store: Store) -> None:
    with pytest.raises(StoreError):
        store.compact("nobody", [b"snap"], 1)
    assert store.spaces() == []


def test_compaction_refuses_bad_arguments(store: Store) -> None:
    append(store, "s", b"u1")
    with pytest.raises(StoreError):
        store.compact("s", "text", 1)  # type: ignore[arg-type]
    with pytest.raises(StoreError):
        store.compact("s", b"one part, not in a list", 1)  # type: ignore[arg-type]
    with pytest.raises(StoreError):
        store.compact("s", [], 1)  # no part: the updates would be replaced by nothing
    with pytest.raises(StoreError):
        store.compact("s", [b"part", "text"], 1)  # type: ignore[list-item]
    with pytest.raises(StoreError):
        store.compact("s", [b"snap"], True)
    with pytest.raises(StoreError):
        store.compact("s", [b"snap"], 1.0)  # type: ignore[arg-type]
    assert store.load_space("s").snapshot_parts == []
    assert store.load_space("s").updates == [b"u1"]


def test_concurrent_writers_lose_nothing(store: Store) -> None:
    """The node calls the store from several worker threads: each write must stay whole."""
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            for i in range(50):
                store.write(WriteBatch(records={f"w/{k}": b"%d" % i}, appends=[("s", b"%d" % k)]))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    log = store.load_space("s")
    assert log.last_seq == 200
    assert sorted(log.updates) == sorted([b"%d" % k for k in range(4)] * 50)
    assert store.names("w/") == ["w/0", "w/1", "w/2", "w/3"]


# --- closing ---------------------------------------------------------------------------


def test_close_is_idempotent_and_final(store: Store) -> None:
    store.close()
    store.close()
    with pytest.raises(StoreError):
        store.get("r")
    with pytest.raises(StoreError):
        store.write(WriteBatch(records={"r": b"v"}))
    with pytest.raises(StoreError):
        store.load_space("s")


def test_memory_reopen_shares_state() -> None:
    first = MemoryStore()
    append(first, "s", b"u1")
    first.close()
    second = first.reopen()
    assert second.load_space("s").updates == [b"u1"]
    with pytest.raises(StoreError):
        first.get("r")


def test_open_store_picks_the_adapter(tmp_path: Path) -> None:
    memory = open_store(None)
    assert isinstance(memory, MemoryStore)
    disk = open_store(tmp_path / "x.db")
    assert isinstance(disk, SqliteStore)
    disk.close()


# --- SQLite only ------------------------------------------------------------------------


def test_sqlite_reopen_keeps_everything(tmp_path: Path) -> None:
    path = tmp_path / "p2p.db"
    with SqliteStore(path) as s:
        s.write(WriteBatch(records={"device/key": b"k", "gone": b"x"}))
        s.write(WriteBatch(deletes={"gone"}))
        append(s, "a", b"a1", b"a2", b"a3")
        append(s, "b", b"b1")
        s.compact("a", [b"snap"], 2)
    with SqliteStore(str(path)) as s:
        assert s.names("") == ["device/key"]
        assert s.get("device/key") == b"k"
        assert s.spaces() == ["a", "b"]
        assert s.load_space("a") == SpaceLog(
            snapshot_parts=[b"snap"], snapshot_seq=2, updates=[b"a3"], last_seq=3
        )
        append(s, "a", b"a4")
        assert s.load_space("a").last_seq == 4


def test_sqlite_uses_wal_and_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "p2p.db"
    SqliteStore(path).close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] >= 1
    finally:
        conn.close()


def test_sqlite_garbage_file_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "p2p.db"
    garbage = b"this is not a database, just some bytes\n" * 200
    path.write_bytes(garbage)
    with pytest.raises(StoreCorrupt, match=re.escape(str(path))):
        SqliteStore(path)
    assert path.read_bytes() == garbage  # opening did not touch it


def _filled_db(path: Path) -> int:
    with SqliteStore(path) as s:
        for i in range(40):
            s.write(WriteBatch(records={f"r/{i}": bytes(600)}, appends=[("s", bytes(1500))]))
    return path.stat().st_size


@pytest.mark.parametrize("keep", [50, 4096, 0.5, 0.9])
def test_sqlite_truncated_file_is_refused(tmp_path: Path, keep: float) -> None:
    path = tmp_path / "p2p.db"
    size = _filled_db(path)
    with path.open("r+b") as f:
        f.truncate(int(size * keep) if isinstance(keep, float) else keep)
    # Whatever SQLite notices first (open, quick_check or a read), it is a StoreError.
    with pytest.raises(StoreError, match=re.escape(str(path))):
        _open_and_read_all(path)


def _open_and_read_all(path: Path) -> None:
    with SqliteStore(path) as s:
        for name in s.names(""):
            s.get(name)
        for space in s.spaces():
            s.load_space(space)


def test_sqlite_overwritten_page_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "p2p.db"
    _filled_db(path)
    with path.open("r+b") as f:
        f.seek(3 * 4096)
        f.write(b"\xa5" * 4096)
    with pytest.raises(StoreCorrupt, match=re.escape(str(path))):
        SqliteStore(path)


def _edit_db(path: Path, *statements: str) -> None:
    conn = sqlite3.connect(path)
    try:
        for statement in statements:
            conn.execute(statement)
        conn.commit()
    finally:
        conn.close()


@pytest.mark.parametrize(
    "statements",
    [
        ("PRAGMA user_version = 99",),
        ("PRAGMA user_version = 0",),
        ("DROP TABLE snapshots",),
        ("CREATE TRIGGER t AFTER INSERT ON records BEGIN DELETE FROM records; END",),
    ],
    ids=["future-version", "version-zero", "missing-table", "trigger"],
)
def test_sqlite_foreign_schema_is_corrupt(tmp_path: Path, statements: tuple[str, ...]) -> None:
    path = tmp_path / "p2p.db"
    SqliteStore(path).close()
    _edit_db(path, *statements)
    with pytest.raises(StoreCorrupt, match=re.escape(str(path))):
        SqliteStore(path)


def test_sqlite_other_apps_database_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    _edit_db(path, "CREATE TABLE contacts (id INTEGER PRIMARY KEY, name TEXT)")
    with pytest.raises(StoreCorrupt, match=re.escape(str(path))):
        SqliteStore(path)


def test_sqlite_gap_in_log_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "p2p.db"
    with SqliteStore(path) as s:
        append(s, "s", b"u1", b"u2", b"u3")
    _edit_db(path, "DELETE FROM updates WHERE seq = 2")
    with SqliteStore(path) as s, pytest.raises(StoreCorrupt, match="gaps"):
        s.load_space("s")


def test_sqlite_non_blob_values_are_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "p2p.db"
    with SqliteStore(path) as s:
        s.write(WriteBatch(records={"r": b"v"}, appends=[("s", b"u1")]))
    _edit_db(path, "UPDATE records SET value = 'text'", "UPDATE updates SET data = 7")
    with SqliteStore(path) as s:
        with pytest.raises(StoreCorrupt):
            s.get("r")
        with pytest.raises(StoreCorrupt):
            s.load_space("s")


def test_sqlite_missing_directory_is_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no/such/dir"):
        SqliteStore(tmp_path / "no" / "such" / "dir" / "p2p.db")


def test_sqlite_bad_synchronous_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError):
        SqliteStore(tmp_path / "p2p.db", synchronous="SOMETIMES")
    SqliteStore(tmp_path / "p2p.db", synchronous="normal").close()


# --- a real process killed mid-write --------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import sys
    from p2p.storage import SqliteStore, WriteBatch

    store = SqliteStore(sys.argv[1])
    for seq in range(1, 100_001):
        store.write(WriteBatch(appends=[("space", b"update-%d" % seq)]))
        # Printed only once write() returned: every seq printed is an acknowledged write.
        print(seq, flush=True)
    """
)


def _read_lines_until(
    stream: int, enough: Callable[[list[str]], bool], deadline: float
) -> tuple[list[str], bytes]:
    """Read complete lines from a pipe fd until ``enough`` or EOF, never past ``deadline``."""
    lines: list[str] = []
    buffer = b""
    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        while not enough(lines):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"child printed only {len(lines)} lines before deadline")
            if not sel.select(timeout=remaining):
                continue
            chunk = os.read(stream, 65536)
            if not chunk:
                break
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            lines.extend(line.decode() for line in complete)
    return lines, buffer


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="needs SIGKILL")
def test_sqlite_acknowledged_writes_survive_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "p2p.db"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        assert child.stdout is not None
        lines, partial = _read_lines_until(
            child.stdout.fileno(), lambda seen: len(seen) >= 200, time.monotonic() + 120
        )
        child.send_signal(signal.SIGKILL)
        # Lines the child printed after our last read were acknowledged too: collect them.
        rest, err = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)
    assert len(lines) >= 200, f"child stopped early: {err.decode()}"
    assert child.returncode == -signal.SIGKILL
    tail = (partial + rest).decode().split("\n")[:-1]  # drop a half-written last line
    acked = [int(line) for line in [*lines, *tail]]
    assert len(acked) >= 200
    assert acked == list(range(1, len(acked) + 1))

    with SqliteStore(path) as s:  # opening runs quick_check too
        log = s.load_space("space")
        assert log.last_seq >= acked[-1]
        assert log.updates[: len(acked)] == [b"update-%d" % seq for seq in acked]
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA quick_check").fetchall() == [("ok",)]
    finally:
        conn.close()


def test_sqlite_schema_1_file_is_migrated_on_open(tmp_path: Path) -> None:
    """A store from before the message index (schema 1) opens: the index table is
    added, empty, and everything else is kept."""
    path = tmp_path / "p2p.db"
    conn = sqlite3.connect(path)
    try:
        conn.execute("CREATE TABLE records (name TEXT PRIMARY KEY NOT NULL, value BLOB NOT NULL)")
        conn.execute(
            "CREATE TABLE updates (space TEXT NOT NULL, seq INTEGER NOT NULL, data BLOB NOT NULL,"
            " PRIMARY KEY (space, seq)) WITHOUT ROWID"
        )
        conn.execute(
            "CREATE TABLE snapshots (space TEXT PRIMARY KEY NOT NULL, seq INTEGER NOT NULL,"
            " data BLOB NOT NULL)"
        )
        conn.execute("INSERT INTO records VALUES ('r', x'01')")
        conn.execute("INSERT INTO updates VALUES ('s', 1, x'02')")
        conn.execute("PRAGMA user_version = 1")
        conn.commit()
    finally:
        conn.close()
    with SqliteStore(path) as s:
        assert s.get("r") == b"\x01"
        assert s.load_space("s").updates == [b"\x02"]
        assert s.index_messages("s") == []
        row = IndexRow(space="s", map="m", key="k", id="k", kind="msg", ts="1.000000")
        s.write(WriteBatch(index={("s", "m", "k"): row}))
    with SqliteStore(path) as s:
        assert s.index_messages("s") == [row]
    assert _schema_version(path) == SCHEMA_VERSION


def _schema_version(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])
    finally:
        conn.close()


def _write_v1_file(path: Path) -> None:
    """The tables of schema version 1 (before the message index and snapshot parts)."""
    _edit_db(
        path,
        "CREATE TABLE records (name TEXT PRIMARY KEY NOT NULL, value BLOB NOT NULL)",
        "CREATE TABLE updates (space TEXT NOT NULL, seq INTEGER NOT NULL, data BLOB NOT NULL,"
        " PRIMARY KEY (space, seq)) WITHOUT ROWID",
        "CREATE TABLE snapshots (space TEXT PRIMARY KEY NOT NULL, seq INTEGER NOT NULL,"
        " data BLOB NOT NULL)",
        "PRAGMA user_version = 1",
    )


def _write_v2_file(path: Path) -> None:
    """A store as schema version 2 wrote it, made by hand: one snapshot row per space."""
    _write_v1_file(path)
    _edit_db(
        path,
        "CREATE TABLE entries (space TEXT NOT NULL, map TEXT NOT NULL, key TEXT NOT NULL,"
        " id TEXT NOT NULL, kind TEXT NOT NULL, account TEXT NOT NULL, device TEXT NOT NULL,"
        " ts TEXT NOT NULL, target TEXT NOT NULL, body TEXT NOT NULL, sig TEXT NOT NULL,"
        " reason TEXT NOT NULL, UNIQUE (space, map, key))",
        "CREATE INDEX entries_shown ON entries (space, map, reason, kind, ts, device, id)",
        "CREATE INDEX entries_target ON entries (space, target) WHERE target != ''",
        "CREATE INDEX entries_hidden ON entries (space, map, key) WHERE reason != ''",
        "INSERT INTO entries VALUES ('a', 'm', 'k', 'k', 'msg', '', '', '1.000000', '', 'hi',"
        " '', '')",
        "PRAGMA user_version = 2",
    )


def _fill_old_file(path: Path) -> None:
    """A record, and two spaces: one compacted (snapshot at 2, update 3), one not."""
    _edit_db(
        path,
        "INSERT INTO records VALUES ('r', x'01')",
        "INSERT INTO snapshots VALUES ('a', 2, x'aa0102')",
        "INSERT INTO updates VALUES ('a', 3, x'a3')",
        "INSERT INTO updates VALUES ('b', 1, x'b1')",
        "INSERT INTO snapshots VALUES ('c', 4, x'cc')",  # compacted whole: no updates left
    )


@pytest.mark.parametrize("version", [1, 2])
def test_sqlite_one_row_snapshots_become_part_0_on_open(tmp_path: Path, version: int) -> None:
    """A store written before snapshots had parts (schema 1 or 2) opens: each space's
    snapshot row is its part 0 (one large part, read and sent as before), the rest is
    kept, and the next compaction writes parts."""
    path = tmp_path / "p2p.db"
    (_write_v1_file if version == 1 else _write_v2_file)(path)
    _fill_old_file(path)
    with SqliteStore(path) as s:
        assert s.get("r") == b"\x01"
        assert s.spaces() == ["a", "b", "c"]
        assert s.load_space("a") == SpaceLog(
            snapshot_parts=[b"\xaa\x01\x02"], snapshot_seq=2, updates=[b"\xa3"], last_seq=3
        )
        assert s.load_space("c") == SpaceLog(
            snapshot_parts=[b"\xcc"], snapshot_seq=4, updates=[], last_seq=4
        )
        assert s.snapshot_part("a", 0) == (2, b"\xaa\x01\x02")
        assert s.snapshot_part("a", 1) is None
        assert (s.log_seqs("a"), s.log_seqs("b"), s.log_seqs("c")) == ((2, 3), (0, 1), (4, 4))
        assert s.space_bytes("a", 0) == 4
        assert [m.body for m in s.index_messages("a")] == ([] if version == 1 else ["hi"])
        append(s, "c", b"c5")  # numbering goes on past the migrated snapshot
        s.compact("a", [b"n0", b"n1"], 3)
    assert _schema_version(path) == SCHEMA_VERSION
    with SqliteStore(path) as s:
        assert s.load_space("a") == SpaceLog(
            snapshot_parts=[b"n0", b"n1"], snapshot_seq=3, updates=[], last_seq=3
        )
        assert s.load_space("c").updates == [b"c5"]
        assert s.load_space("c").last_seq == 5


def _read_parts(store: Store, space: str) -> list[tuple[int, bytes]]:
    """Every part of a snapshot, read as ``Spaces._stored`` does: one at a time."""
    parts = []
    while (read := store.snapshot_part(space, len(parts))) is not None:
        parts.append(read)
    return parts


@pytest.mark.parametrize(
    "statements",
    [
        ("UPDATE snapshots SET data = 'text' WHERE part = 1",),
        ("UPDATE snapshots SET seq = 3 WHERE part = 1",),
        ("DELETE FROM snapshots WHERE part = 1",),
        ("DELETE FROM snapshots WHERE part = 0",),
        ("UPDATE snapshots SET part = 5 WHERE part = 2",),
        ("UPDATE snapshots SET part = 1.5 WHERE part = 1",),
        ("UPDATE snapshots SET seq = 'two'",),
    ],
    ids=["not-a-blob", "seqs-disagree", "gap", "no-part-0", "gap-at-end", "real-part", "text-seq"],
)
def test_sqlite_bad_snapshot_parts_are_corrupt(tmp_path: Path, statements: tuple[str, ...]) -> None:
    path = tmp_path / "p2p.db"
    with SqliteStore(path) as s:
        append(s, "s", b"u1", b"u2", b"u3")
        s.compact("s", [b"p0", b"p1", b"p2"], 2)
    _edit_db(path, *statements)
    with SqliteStore(path) as s:
        with pytest.raises(StoreCorrupt, match="snapshot"):
            s.load_space("s")
        with pytest.raises(StoreCorrupt, match="snapshot"):
            _read_parts(s, "s")  # one at a time, as a catch-up does: met at some part
        if "data" not in statements[0]:  # a blob's type is only seen when it is read
            with pytest.raises(StoreCorrupt, match="snapshot"):
                s.log_seqs("s")
            with pytest.raises(StoreCorrupt, match="snapshot"):
                s.compact("s", [b"new"], 3)


def test_index_by_device_gives_one_devices_rows(store: Store) -> None:
    rows = {
        ("s", "m", "a1"): replace(row("a1", "1000.000001"), device="da"),
        ("s", "e", "a2"): replace(
            row("a2", "1000.000003", map_name="e", kind="edit", target="a1"), device="da"
        ),
        ("s", "m", "a3"): replace(row("a3", "1000.000004"), device="da", reason="bad signature"),
        ("s", "m", "b1"): replace(row("b1", "1000.000002"), device="db"),
    }
    store.write(WriteBatch(index=dict(rows)))
    assert [(r.map, r.key) for r in store.index_by_device("s", "da")] == [
        ("e", "a2"),
        ("m", "a1"),
        ("m", "a3"),
    ]
    assert sorted(store.index_keys_by_device("s", "da")) == [("e", "a2"), ("m", "a1")]
    assert store.index_by_device("s", "nobody") == []
    assert store.index_keys_by_device("other", "da") == []


def test_update_records_reads_and_writes_in_one_step(store: Store) -> None:
    store.write(WriteBatch(records={"a": b"1"}))
    seen: list[dict[str, bytes | None]] = []

    def change(current: Mapping[str, bytes | None]) -> dict[str, bytes]:
        seen.append(dict(current))
        return {"a": (current["a"] or b"") + b"!", "b": b"new"}

    assert store.update_records(["a", "b"], change) == {"a": b"1!", "b": b"new"}
    assert seen == [{"a": b"1", "b": None}]
    assert (store.get("a"), store.get("b")) == (b"1!", b"new")
    with pytest.raises(StoreError):
        store.update_records(["a"], lambda current: {"a": "not bytes"})  # type: ignore[dict-item]
    assert store.get("a") == b"1!"  # a refused change writes nothing


# --- reading without the document ---------------------------------------------------


def test_index_held_names_the_keys_with_a_row_and_their_account(store: Store) -> None:
    rows = {("s", "m", f"k{i}"): row(f"k{i}", f"{i:04d}") for i in range(1200)}
    rows[("s", "x", "k1")] = row("k1", "0001", map_name="x", kind="del", target="k1")
    store.write(WriteBatch(index=rows))
    asked = [("m", f"k{i}") for i in range(0, 2400, 2)] + [("x", "k1"), ("x", "k2"), ("r", "k1")]
    held = store.index_held("s", asked)
    assert set(held) == {("s", "m", f"k{i}") for i in range(0, 1200, 2)} | {("s", "x", "k1")}
    assert set(held.values()) == {rows[("s", "m", "k0")].account}
    assert store.index_held("other", asked) == {}


def test_space_rows_pages_the_log_after_the_snapshot(store: Store) -> None:
    append(store, "s", *[bytes([i]) * 3 for i in range(1, 8)])
    assert store.snapshot_part("s", 0) is None
    assert store.space_rows("s", 0, 3) == [(1, b"\x01" * 3), (2, b"\x02" * 3), (3, b"\x03" * 3)]
    assert store.space_rows("s", 5, 10) == [(6, b"\x06" * 3), (7, b"\x07" * 3)]
    store.compact("s", [b"snap"], 4)
    assert store.snapshot_part("s", 0) == (4, b"snap")
    assert store.snapshot_part("s", 1) is None
    assert [seq for seq, _ in store.space_rows("s", 4, 10)] == [5, 6, 7]
    assert store.space_rows("s", 7, 10) == []
    assert store.space_rows("nothing", 0, 10) == []
