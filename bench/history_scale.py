"""S8, S8C and S9: large histories through real ``p2p`` processes, against y-websocket.

- **S8 join with history**: a new device gets a history of N messages. Ours: ``p2p
  link`` on a fresh home, approved by ``p2p approve --yes`` on the phone holding the
  history (real processes, real SQLite stores, loopback TCP), timed from the approval's
  start until ``p2p link`` exits. Baseline: a y-websocket server holding the same chat
  (the phone's own CRDT, exported as one update) and a fresh y-websocket client joining
  the room, timed from the client's start until it has synced. Peak memory of each side.
- **S9 memory at rest**: the phone holds 1,000,000 messages in 51 chats (one of 300,000
  plus 50 of 14,000) and runs (``p2p run``) with its laptop connected, the laptop
  holding the same history; then a little live traffic. Baseline: a y-websocket server
  holding the same 51 documents with one client connected to all 51 rooms (the client
  already holding them too).
- **Cold start at that scale**: in a fresh process, ``open_node`` on that phone, the
  newest 50 messages of a chat, then the first send into it (written without loading
  the chat), for the 300,000-message chat and for one of 14,000; against pycrdt
  applying the big chat's update alone.
- **S8C catch-up**: a laptop linked while empty, away while the phone wrote 300,000
  messages into one chat; both run until the laptop holds them all.

Histories are written straight through the store (1,000 signed messages per CRDT
transaction, as ``cold_start.py`` does), never a send per message. The laptop of S9 is
linked while empty, then gets the very same updates and index rows written into its
store: the state a finished catch-up leaves. Each chat is built in its own child
process (``python bench/history_scale.py chat ...``) so the builder's memory stays
bounded by one chat.

Memory is read from ``/proc/PID/status``: VmHWM (peak resident set; reset with
``clear_refs`` where a process's earlier life must not count) and VmRSS (now).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import history_size
from common import BENCH, ROOT, Child, body, peak_rss_mb

WALL = 1_767_225_600_000
BATCH = 1000
REACTIONS = ("+1", "heart", "laugh")
LOOPBACK = ("--listen", "127.0.0.1:0", "--no-mdns")


# ---- memory of other processes --------------------------------------------------------


def status_mb(pid: int, field: str) -> float:
    """One memory field of ``/proc/PID/status`` (VmRSS, VmHWM), MB; 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


def reset_peak(pid: int) -> None:
    """Start VmHWM over from the current RSS (so a preload's peak does not count)."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Peak:
    """Largest VmRSS and VmHWM of some processes, sampled every 50 ms in a thread
    (VmHWM alone misses nothing; VmRSS shows what is held now)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.rss = dict.fromkeys(pids, 0.0)
        self.hwm = dict.fromkeys(pids, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(0.05)

    def sample(self) -> None:
        for name, pid in self.pids.items():
            self.rss[name] = max(self.rss[name], status_mb(pid, "VmRSS"))
            self.hwm[name] = max(self.hwm[name], status_mb(pid, "VmHWM"))

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sample()
        return {k: round(max(self.rss[k], self.hwm[k]), 1) for k in self.pids}


def settle(pids: list[int], *, quiet_s: float = 3.0, timeout: float = 600) -> float:
    """Wait until the processes together use under 5 % of a CPU for ``quiet_s``;
    the seconds waited (sync done, nothing left to do)."""
    start = time.monotonic()
    last, since = sum(cpu_s(p) for p in pids), time.monotonic()
    while time.monotonic() - start < timeout:
        time.sleep(0.5)
        now = sum(cpu_s(p) for p in pids)
        if now - last > 0.05 * (time.monotonic() - since):
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
    return round(time.monotonic() - start - quiet_s, 1)


# ---- building histories (each chat in a child process) --------------------------------


def _setup_child(phone: str, chats: int) -> dict[str, Any]:
    """A new account at ``phone`` with ``chats`` chats besides notes (only our account
    in each); their ids."""
    from p2p.runtime.home import init_account, open_home_store
    from p2p.state.device import NOTES, DeviceState, claim_run

    init_account(phone, "phone")
    store = open_home_store(phone)
    try:
        state = DeviceState.load(store, claim_run(store))
        ids = []
        for i in range(chats):
            space_id, batch = state.new_conversation(f"chat {i:02d}", [])
            store.write(batch)
            ids.append(space_id)
        return {"notes": state.chat_by_name(NOTES).id, "chats": ids}
    finally:
        store.close()


def _chat_child(
    phone: str, laptop: str, space_id: str, n: int, seed: int, snap: str, held: int = -1
) -> Any:
    """Append ``n`` signed messages to one chat of ``phone`` (the same updates and index
    rows to ``laptop``'s store, when given: all of them, or the first ``held``); the
    chat's whole update to ``snap``."""
    from p2p.runtime.home import open_home_store
    from p2p.state.device import DeviceState, claim_run
    from p2p.state.spaces import vector_record
    from p2p.storage.base import WriteBatch

    rng = random.Random(seed)
    store = open_home_store(phone)
    other = open_home_store(laptop) if laptop else None
    try:
        state = DeviceState.load(store, claim_run(store))
        replica = state.space(space_id).replica
        opening = ""
        laptop_state: tuple[bytes, Any] | None = None  # its vector and heads, once it stops
        for first in range(0, n, BATCH):
            entries = [
                state.new_entry(space_id, "msg", WALL + i, body=body(rng))
                for i in range(first, min(n, first + BATCH))
            ]
            opening = opening or entries[0].id
            # what a person's chat also holds: a read marker moved on, a reaction changed
            # (each replaces the one before: a folded chat keeps those as deleted runs)
            entries += [
                state.new_entry(space_id, "read", WALL + first, body=entries[-1].ts),
                state.new_entry(
                    space_id, "react", WALL + first, target=opening, body=REACTIONS[first % 3]
                ),
            ]
            _update, batch = state.write_local(space_id, entries)
            store.write(batch)
            if other is not None and laptop_state is None:  # a companion that caught up
                other.write(WriteBatch(appends=batch.appends, index=batch.index))
                if 0 <= held <= first + BATCH:  # then away for the rest
                    laptop_state = replica.state_vector(), replica.known_heads()
        # the state vector record a node writes with every append (p2p.state.spaces)
        vector, heads = replica.state_vector(), replica.known_heads()
        for written, (at, heads_at) in (
            (store, (vector, heads)),
            (other, laptop_state or (vector, heads)),
        ):
            if written is not None:
                stamp = written.log_seqs(space_id)[1]
                written.write(WriteBatch(records=vector_record(space_id, stamp, at, heads_at)))
        snapshot = state.space(space_id).replica.snapshot()
        if snap:
            Path(snap).write_bytes(snapshot)
        return {"bytes": len(snapshot), "peak_mb": round(peak_rss_mb())}
    finally:
        store.close()
        if other is not None:
            other.close()


def _child(*args: str, timeout: float = 1800) -> Any:
    done = subprocess.run(
        [sys.executable, __file__, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"history_scale {args[0]} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def build_account(
    base: Path,
    sizes: list[int],
    *,
    laptop: bool,
    snapshots: bool = True,
    laptop_holds: int | None = None,
) -> dict[str, Any]:
    """A phone at ``base/phone`` with one chat per entry of ``sizes`` (the first is
    notes), each holding that many messages; with ``laptop``, a companion at
    ``base/laptop`` linked while empty that then holds the same history (or, with
    ``laptop_holds``, the first that many messages of each chat: away while the rest
    was written). Each chat's whole update goes to ``base/snap/N.bin`` for the
    baseline."""
    phone, lap, snap = base / "phone", base / "laptop", base / "snap"
    snap.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    made = _child("setup", str(phone), str(len(sizes) - 1))
    spaces = [made["notes"], *made["chats"]]
    if laptop:
        linked = history_size.link(ROOT, phone, lap, "laptop", 120)
        if not linked["ok"]:
            raise RuntimeError(f"linking the empty laptop failed: {linked}")
    files, total_bytes, builder_mb = [], 0, 0
    for i, (space_id, n) in enumerate(zip(spaces, sizes, strict=True)):
        path = snap / f"{i:02d}.bin" if snapshots else None
        got = _child(
            "chat",
            str(phone),
            str(lap) if laptop and laptop_holds != 0 else "",
            space_id,
            str(n),
            str(1000 + i),
            str(path or ""),
            str(-1 if laptop_holds is None else laptop_holds),
        )
        total_bytes += got["bytes"]
        builder_mb = max(builder_mb, got["peak_mb"])
        if path:
            files.append(path)
    return {
        "phone": phone,
        "laptop": lap if laptop else None,
        "spaces": spaces,
        "sizes": sizes,
        "snapshots": files,
        "crdt_bytes": total_bytes,
        "build_s": round(time.monotonic() - t0, 1),
        "builder_peak_mb": builder_mb,
        "db_mb": round(sum(f.stat().st_size for f in phone.iterdir()) / 1e6),
    }


# ---- y-websocket processes ------------------------------------------------------------


def _node(script: str, *args: str, name: str) -> Child:
    return Child(["node", str(BENCH / script), *args], name=name, cwd=BENCH)


def yws_join(snapshots: list[Path], counts: list[int], timeout: float) -> dict[str, Any]:
    """A y-websocket server holding the rooms of ``snapshots``; a fresh client joins
    them all: seconds from the client's start until it has synced, peak memory of each."""
    rooms = [f"r{i:02d}={p}" for i, p in enumerate(snapshots)]
    server = _node("yws_server.mjs", *rooms, name="yws-server")
    client: Child | None = None
    try:
        ready = server.expect("listening", timeout=timeout)
        spid = server.proc.pid
        held_mb = status_mb(spid, "VmRSS")
        reset_peak(spid)
        server_cpu = cpu_s(spid)
        start = time.monotonic()
        client = _node("yws_join.mjs", ready["url"], *(r.split("=")[0] for r in rooms), name="yj")
        peak = Peak({"server": spid, "client": client.proc.pid})
        synced = client.expect("synced", timeout=timeout)
        seconds = time.monotonic() - start
        cpu = cpu_s(spid) - server_cpu + cpu_s(client.proc.pid)
        mb = peak.stop()
        got = [synced["sizes"][f"r{i:02d}"] for i in range(len(rooms))]
        return {
            "ok": got == counts,
            "why": "" if got == counts else f"client holds {sum(got)} of {sum(counts)}",
            "seconds": round(seconds, 2),
            "cpu_s": round(cpu, 2),
            "server_load_s": ready["load_s"],
            "server_held_mb": round(held_mb, 1),
            "server_mb": mb["server"],
            "client_mb": mb["client"],
        }
    finally:
        if client is not None:
            client.stop()
        server.stop()


def yws_rest(snapshots: list[Path], counts: list[int], live: int, timeout: float) -> dict[str, Any]:
    """S9 baseline: the server holding every room, one client (holding them too)
    connected to all of them, then ``live`` new entries from the client."""
    rooms = [f"r{i:02d}={p}" for i, p in enumerate(snapshots)]
    server = _node("yws_server.mjs", *rooms, name="yws-server")
    client: Child | None = None
    try:
        ready = server.expect("listening", timeout=timeout)
        spid = server.proc.pid
        alone_mb = status_mb(spid, "VmRSS")
        reset_peak(spid)
        client = _node("yws_join.mjs", ready["url"], *rooms, name="yj")
        peak = Peak({"server": spid, "client": client.proc.pid})
        synced = client.expect("synced", timeout=timeout)
        settle([spid, client.proc.pid], timeout=timeout)
        rest = {"server": status_mb(spid, "VmRSS"), "client": status_mb(client.proc.pid, "VmRSS")}
        client.tell(f"send {live}")
        client.expect("sent", timeout=60)
        settle([spid, client.proc.pid], timeout=timeout)
        live_rss = status_mb(spid, "VmRSS")
        mb = peak.stop()
        got = [synced["sizes"][f"r{i:02d}"] for i in range(len(rooms))]
        return {
            "ok": got == counts,
            "why": "" if got == counts else f"client holds {sum(got)} of {sum(counts)}",
            "server_load_s": ready["load_s"],
            "server_alone_mb": round(alone_mb, 1),
            "server_rest_mb": round(rest["server"], 1),
            "server_live_mb": round(live_rss, 1),
            "server_peak_mb": mb["server"],
            "client_rest_mb": round(rest["client"], 1),
            "client_peak_mb": mb["client"],
        }
    finally:
        if client is not None:
            client.stop()
        server.stop()


# ---- ours -----------------------------------------------------------------------------


def ours_join(phone: Path, work: Path, timeout: float) -> dict[str, Any]:
    """S8 ours: link a new device to ``phone`` (``p2p link`` + ``p2p approve --yes``)."""
    new = work / "desktop"
    shutil.rmtree(new, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = history_size.link(ROOT, phone, new, "desktop", timeout)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # both processes, reaped
    result["cpu_s"] = round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 2)
    result["held"] = history_size.messages_in(new) if result.get("ok") else 0
    return result


def ours_rest(
    account: dict[str, Any], live: int, timeout: float, chat_names: list[str]
) -> dict[str, Any]:
    """S9 ours: ``p2p run`` on the laptop, then on the phone dialing it (both level
    already, see :func:`_level`); memory once connected and idle, then after ``live``
    sends through the phone's control socket (``p2p send``, into the chats of
    ``chat_names`` in turn)."""
    phone, laptop = account["phone"], account["laptop"]
    total = sum(account["sizes"])
    leveling = _level(phone, laptop, timeout)
    lap = history_size.Proc(ROOT, "--home", str(laptop), "run", "--json", *LOOPBACK)
    ph: history_size.Proc | None = None
    try:
        address = lap.wait_line("listening", 120)["address"]
        start = time.monotonic()
        ph = history_size.Proc(
            ROOT, "--home", str(phone), "run", "--json", *LOOPBACK, "--peer", address
        )
        peak = Peak({"phone": ph.proc.pid, "laptop": lap.proc.pid})
        ph.wait_line("peer_connected", timeout)
        connected = time.monotonic() - start
        settle([ph.proc.pid, lap.proc.pid], timeout=timeout)
        level = time.monotonic() - start
        rest = {
            "phone": status_mb(ph.proc.pid, "VmRSS"),
            "laptop": status_mb(lap.proc.pid, "VmRSS"),
        }
        level_count = history_size.messages_in(laptop)
        for i in range(live):
            history_size.p2p(
                ROOT,
                "--home",
                str(phone),
                "send",
                "--chat",
                chat_names[i % len(chat_names)],
                f"live {i}",
            )
        deadline = time.monotonic() + timeout
        while history_size.messages_in(laptop) < level_count + live and time.monotonic() < deadline:
            time.sleep(0.2)
        held = history_size.messages_in(laptop)
        settle([ph.proc.pid, lap.proc.pid], timeout=timeout)
        live_rss = status_mb(ph.proc.pid, "VmRSS")
        mb = peak.stop()
        errors = [e for e in ph.lines + lap.lines if e.get("event") == "input_rejected"]
        return {
            "ok": level_count >= total and held >= level_count + live and not errors,
            "why": "" if not errors else str(errors[-1])[:200],
            "connected_s": round(connected, 2),
            "level_idle_s": round(level, 1),
            "phone_rest_mb": round(rest["phone"], 1),
            "phone_live_mb": round(live_rss, 1),
            "phone_peak_mb": mb["phone"],
            "laptop_rest_mb": round(rest["laptop"], 1),
            "laptop_peak_mb": mb["laptop"],
            "laptop_holds": held,
            "leveling_s": leveling,
        }
    finally:
        if ph is not None:
            ph.stop()
        lap.stop()


def ours_catchup(
    base: Path, n: int, timeout: float, *, fold: bool = False, held: int = 0
) -> dict[str, Any]:
    """S8 catch-up: a laptop linked while empty was away while the phone wrote ``n``
    messages into one chat (with ``held``, after the laptop took the chat's first
    ``held`` of them; with ``fold``, then folded into a snapshot in parts); both then
    run (``p2p run``, the laptop dialing the phone): seconds from the connection until
    the laptop's index holds them all, and the peak memory of each process."""
    account = build_account(base, [held + n], laptop=True, snapshots=False, laptop_holds=held)
    phone, laptop = account["phone"], account["laptop"]
    folded = fold_largest_chat(phone) if fold else None
    with _running_pair(phone, laptop) as (ph, lap):
        peak = Peak({"phone": ph.proc.pid, "laptop": lap.proc.pid})
        lap.wait_line("peer_connected", timeout)
        start = time.monotonic()
        deadline = start + timeout
        while history_size.messages_in(laptop) < held + n and time.monotonic() < deadline:
            time.sleep(0.25)
        seconds = time.monotonic() - start
        came = history_size.messages_in(laptop) - held
        mb = peak.stop()
    return {
        "ok": came >= n,
        "why": "" if came >= n else f"{came:,} of {n:,} after {timeout:.0f} s",
        "messages": n,
        "held_before": held,
        "crdt_bytes": account["crdt_bytes"],
        "seconds": round(seconds, 2),
        "msg_per_s": round(came / seconds) if seconds else 0,
        "phone_mb": mb["phone"],
        "laptop_mb": mb["laptop"],
        "held": held + came,
        "folded": folded,
    }


@contextlib.contextmanager
def _running_pair(listener: Path, dialer: Path) -> Iterator[tuple[Any, Any]]:
    """``p2p run`` on ``listener``, then on ``dialer`` dialing it; both stopped after."""
    first = history_size.Proc(ROOT, "--home", str(listener), "run", "--json", *LOOPBACK)
    second: history_size.Proc | None = None
    try:
        address = first.wait_line("listening", 120)["address"]
        second = history_size.Proc(
            ROOT, "--home", str(dialer), "run", "--json", *LOOPBACK, "--peer", address
        )
        yield first, second
    finally:
        if second is not None:
            second.stop()
        first.stop()


def _level(phone: Path, laptop: Path, timeout: float) -> float:
    """Run both nodes until they are level and idle, then stop them: what was sent to
    one alone before (the cold-start sends, an earlier run's) is caught up here, so the
    run measured after it starts level (at rest: nothing to load). Seconds it took."""
    start = time.monotonic()
    with _running_pair(laptop, phone) as (lap, ph):
        ph.wait_line("peer_connected", timeout)
        settle([ph.proc.pid, lap.proc.pid], timeout=timeout)
    return round(time.monotonic() - start, 1)


def _cold_child(home: str, chat: str) -> dict[str, Any]:
    """In a fresh process: open the node, the newest 50 of ``chat``, then the first
    send into it; times (imports excluded) and peak memory after each step."""
    import trio

    import p2p

    p2p.open_node  # noqa: B018  # p2p imports lazily: its runtime loads here, not in "open"
    marks: dict[str, float] = {}

    async def run() -> int:
        t0 = time.perf_counter()
        async with p2p.open_node(home) as node:
            marks["open_s"] = time.perf_counter() - t0
            marks["open_mb"] = peak_rss_mb()
            t1 = time.perf_counter()
            last = node.messages(chat, last=50)
            marks["read_s"] = time.perf_counter() - t1
            marks["read_mb"] = peak_rss_mb()
            t2 = time.perf_counter()
            await node.send("after the cold start", chat=chat)
            marks["send_s"] = time.perf_counter() - t2
            marks["send_mb"] = peak_rss_mb()
            return len(last)

    marks["shown"] = trio.run(run)
    return {k: round(v, 4) if k.endswith("_s") else round(v, 1) for k, v in marks.items()}


def cold_start(phone: Path, chat: str, runs: int = 3) -> dict[str, Any]:
    """Best of ``runs`` fresh processes (by time to the first send)."""
    results = [_child("cold", str(phone), chat, timeout=900) for _ in range(runs)]
    return {"best": min(results, key=lambda r: r["send_s"]), "runs": results}


def _fold_child(home: str) -> dict[str, Any]:
    """Fold ``home``'s largest chat into a snapshot stored in parts, as the writer does
    once a loaded chat's log grows long (its own process: the chat's document is
    loaded for it, as on the phone)."""
    from p2p.proto.ysplit import split_update
    from p2p.runtime.home import open_home_store
    from p2p.state.device import DeviceState
    from p2p.storage.base import SNAPSHOT_PART

    store = open_home_store(Path(home))
    try:
        state = DeviceState.load(store)
        chats = [s for s in state.spaces.values() if s.kind == "chat"]
        big = max(chats, key=lambda s: store.log_seqs(s.id)[1])
        t0 = time.perf_counter()
        snapshot = big.replica.snapshot()
        parts = [bytes(part) for part in split_update(snapshot, SNAPSHOT_PART)]
        store.compact(big.id, parts, store.log_seqs(big.id)[1])
        return {
            "chat": big.name,
            "bytes": len(snapshot),
            "parts": len(parts),
            "seconds": round(time.perf_counter() - t0, 1),
        }
    finally:
        store.close()


def fold_largest_chat(home: Path) -> dict[str, Any]:
    """S8 ``--million``, compacted: the account as a phone in use holds it."""
    return _child("fold", str(home))  # type: ignore[no-any-return]


def main() -> None:
    what, *args = sys.argv[1:]
    if what == "setup":
        out: Any = _setup_child(args[0], int(args[1]))
    elif what == "chat":
        phone, laptop, space, n, seed, snap, held = args
        out = _chat_child(phone, laptop, space, int(n), int(seed), snap, int(held))
    elif what == "cold":
        out = _cold_child(args[0], args[1])
    elif what == "fold":
        out = _fold_child(args[0])
    else:
        raise SystemExit(f"unknown step {what!r}")
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
