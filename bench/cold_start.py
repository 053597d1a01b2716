"""S4 cold start: open a store holding a long history and read its last 50 messages.

Two layouts of the same ``n`` signed messages in a real home (SQLite):

- ``log``: ``build(home, n)`` appends them as updates of 1,000 messages each, with no
  snapshot (a history that arrived in catch-up envelopes and was never compacted);
- ``snapshot``: ``compacted_copy`` folds that log into one snapshot, as the node's
  writer does once ``COMPACT_AFTER`` updates have piled up.

Each measurement runs in a fresh child process (``python bench/cold_start.py ours
HOME`` or ``baseline FILE``), which reports the time to the last 50 messages and its
peak memory (VmHWM of the child, interpreter and imports included):

- ours: ``open_node(home)`` then ``node.messages(last=50)`` (served by the message
  index; the CRDT is not loaded), then one ``node.send``, written without loading the
  CRDT (reported separately: ``first_send_s`` and ``send_peak_mb``);
- baseline: ``pycrdt.Doc().apply_update(snapshot)`` of the same 100k messages as one
  update, then the last 50 by timestamp (every value read out, sorted).
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import body, peak_rss_mb

BATCH = 1000


def build(home: Path, n: int, *, seed: int = 4) -> dict[str, Any]:
    """A home with ``n`` signed messages in its log, 1,000 per update, no snapshot.

    Returns what was built, and the whole chat as one pycrdt update (``state_update``).
    """
    from p2p.runtime.home import init_account, open_home_store
    from p2p.state.device import NOTES, DeviceState

    rng = random.Random(seed)
    init_account(home, "phone")
    store = open_home_store(home)
    try:
        state = DeviceState.load(store)
        space = state.chat_by_name(NOTES)
        wall = 1_767_225_600_000
        for start in range(0, n, BATCH):
            entries = [
                state.new_entry(space.id, "msg", wall + i, body=body(rng))
                for i in range(start, min(n, start + BATCH))
            ]
            _update, batch = state.write_local(space.id, entries)
            # with the state vector record a node writes with every append
            batch.records.update(state.spaces.vector_records(batch.appends))
            store.write(batch)
            space.appended()
        snapshot = space.replica.snapshot()
        return {
            "messages": n,
            "space": space.id,
            "log_updates": (n + BATCH - 1) // BATCH,
            "snapshot_bytes": len(snapshot),
            "state_update": snapshot,
        }
    finally:
        store.close()


def compacted_copy(home: Path, copy: Path, space: str, snapshot: bytes) -> None:
    """``copy``: the same home after the node's compaction (one snapshot, in parts as
    the node stores it, and an empty tail)."""
    from p2p.proto.ysplit import split_update
    from p2p.runtime.home import open_home_store
    from p2p.storage.base import SNAPSHOT_PART

    shutil.copytree(home, copy)
    store = open_home_store(copy)
    try:
        last = store.log_seqs(space)[1]
        store.compact(space, [bytes(p) for p in split_update(snapshot, SNAPSHOT_PART)], last)
    finally:
        store.close()


def measure_ours(home: str) -> dict[str, Any]:
    t_start = time.perf_counter()
    import trio

    import p2p

    p2p.open_node  # noqa: B018  # p2p imports lazily: its runtime loads here, not in "open"
    t_imported = time.perf_counter()
    marks: dict[str, float] = {}

    async def run() -> list[p2p.Message]:
        async with p2p.open_node(home) as node:
            marks["opened"] = time.perf_counter()
            marks["open_peak_mb"] = peak_rss_mb()
            last = node.messages(last=50)
            marks["read"] = time.perf_counter()
            marks["read_peak_mb"] = peak_rss_mb()
            # the first write needs the CRDT: this is what loading it lazily costs
            await node.send("after the cold start")
            marks["written"] = time.perf_counter()
            return last

    last = trio.run(run)
    assert len(last) == 50
    return {
        "import_s": t_imported - t_start,
        "open_s": marks["opened"] - t_imported,
        "messages_s": marks["read"] - marks["opened"],
        "total_s": marks["read"] - t_imported,
        "open_peak_mb": marks["open_peak_mb"],
        "peak_rss_mb": marks["read_peak_mb"],
        "first_send_s": marks["written"] - marks["read"],
        "send_peak_mb": peak_rss_mb(),
    }


def measure_baseline(path: str) -> dict[str, Any]:
    t_start = time.perf_counter()
    import pycrdt

    t_imported = time.perf_counter()
    data = Path(path).read_bytes()
    doc: pycrdt.Doc[Any] = pycrdt.Doc()
    doc.apply_update(data)
    t_applied = time.perf_counter()
    open_peak_mb = peak_rss_mb()
    messages = doc.get("m", type=pycrdt.Map)
    values = [dict(v) for v in messages.values()]
    values.sort(key=lambda v: (v["ts"], v["d"], v["id"]))
    last = values[-50:]
    t_read = time.perf_counter()
    assert len(last) == 50
    return {
        "import_s": t_imported - t_start,
        "open_s": t_applied - t_imported,
        "messages_s": t_read - t_applied,
        "total_s": t_read - t_imported,
        "open_peak_mb": open_peak_mb,
        "peak_rss_mb": peak_rss_mb(),
    }


def in_child(kind: str, target: Path, *, spy: Path | None = None) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; its JSON result.

    ``spy``: run it under py-spy (whole process, imports included), samples there."""
    argv = [sys.executable, __file__, kind, str(target)]
    if spy is not None:
        exe = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy"
        argv = [exe, "record", "--format", "raw", "-r", "200", "-o", str(spy), "--", *argv]
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"cold start {kind} failed: {done.stderr[-2000:]}")
    line = [x for x in done.stdout.splitlines() if x.startswith("{")][-1]
    result: dict[str, Any] = json.loads(line)
    return result


if __name__ == "__main__":
    which, where = sys.argv[1], sys.argv[2]
    fn = measure_ours if which == "ours" else measure_baseline
    print(json.dumps(fn(where)), flush=True)
