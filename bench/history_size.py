"""Histories of any size: link and catch-up through the ``p2p`` command, ours against a
baseline checkout of the code, side by side (issue 17's figures: messages/s, peak RSS).

Each run is real processes on 127.0.0.1 with real SQLite stores:

- **catch-up**: the phone wrote N messages while its laptop was away; both start
  (``p2p run --peer``), timed from the phone's start until the laptop's message index
  holds all N.
- **link**: a new device (``p2p link``) is approved by the phone holding N messages
  (``p2p approve --yes``), timed from the approval's start until ``p2p link`` exits.

Peak memory is each process's VmHWM (peak resident set), sampled from /proc while it
runs. Histories are built once per N and code straight through the store (1,000
signed messages per CRDT transaction, like ``cold_start.py``), with a laptop linked
while empty; each code builds its own (store formats differ between versions).

    .venv/bin/python bench/history_size.py --messages 20000 60000 \\
        --baseline /tmp/base   # a checkout of the code to compare (git archive REV p2p)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WALL = 1_767_225_600_000
BATCH = 1000
LOOPBACK = ("--listen", "127.0.0.1:0", "--no-mdns")


def build(home: Path, n: int) -> int:
    """Append ``n`` signed messages to the notes chat at ``home``; the state's bytes."""
    from p2p.runtime.home import open_home_store
    from p2p.state.device import NOTES, DeviceState

    store = open_home_store(home)
    try:
        state = DeviceState.load(store)
        space = state.chat_by_name(NOTES)
        for first in range(0, n, BATCH):
            entries = [
                state.new_entry(
                    space.id, "msg", WALL + i, body=f"history {i:07d} " + "x" * (40 + i % 80)
                )
                for i in range(first, min(n, first + BATCH))
            ]
            _update, batch = state.write_local(space.id, entries)
            store.write(batch)
        return len(space.replica.snapshot())
    finally:
        store.close()


class Proc:
    """A ``p2p`` process run from ``code`` (a directory holding the ``p2p`` package):
    its JSON lines, and its peak RSS sampled while it runs."""

    def __init__(self, code: Path, *args: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(code)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "p2p", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=tempfile.gettempdir(),  # not the repository: PYTHONPATH picks the code
        )
        self.lines: list[dict[str, Any]] = []
        self.peak_kb = 0
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._sample, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.lines.append(json.loads(line))
            except ValueError:
                continue

    def _sample(self) -> None:
        path = Path(f"/proc/{self.proc.pid}/status")
        while self.proc.poll() is None:
            try:
                for line in path.read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        self.peak_kb = max(self.peak_kb, int(line.split()[1]))
            except (OSError, ValueError):
                return
            time.sleep(0.05)

    def wait_line(self, event: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                if line.get("event") == event or (event == "code" and "code" in line):
                    return line
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"no {event}: {self.stderr()[-500:]}")

    def stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return self.proc.stderr.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    @property
    def peak_mb(self) -> float:
        return round(self.peak_kb / 1024, 1)


def messages_in(home: Path) -> int:
    """Messages in a home's index, read without disturbing the node writing it."""
    try:
        with sqlite3.connect(f"file:{home / 'p2p.db'}?mode=ro", uri=True, timeout=1) as db:
            return int(db.execute("SELECT count(*) FROM entries WHERE map = 'm'").fetchone()[0])
    except sqlite3.Error:
        return 0


def p2p(code: Path, *args: str, timeout: float = 120) -> str:
    env = {**os.environ, "PYTHONPATH": str(code)}
    done = subprocess.run(
        [sys.executable, "-m", "p2p", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tempfile.gettempdir(),
        timeout=timeout,
        check=True,
    )
    return done.stdout


def link(code: Path, phone: Path, home: Path, name: str, timeout: float) -> dict[str, Any]:
    """Link a new device at ``home`` to ``phone``: seconds and peak RSS of each side."""
    linker = Proc(code, "--home", str(home), "link", "--name", name, *LOOPBACK[:2], "--json")
    approve: Proc | None = None
    try:
        code_text = linker.wait_line("code", 30)["code"]
        start = time.monotonic()
        approve = Proc(code, "--home", str(phone), "approve", code_text, "--yes")
        try:
            linker.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            failed = [e for e in linker.lines if e.get("event") == "failed"]
            why = failed[-1]["error"] if failed else "timed out"
            return {"ok": False, "why": why, "phone_mb": approve.peak_mb, "new_mb": linker.peak_mb}
        seconds = time.monotonic() - start
        approve.proc.wait(timeout=60)
        ok = linker.proc.returncode == 0
        return {
            "ok": ok,
            "why": "" if ok else linker.stderr()[-200:],
            "seconds": round(seconds, 2),
            "phone_mb": approve.peak_mb,
            "new_mb": linker.peak_mb,
        }
    finally:
        linker.stop()
        if approve is not None:
            approve.stop()


def catch_up(code: Path, phone: Path, laptop: Path, n: int, timeout: float) -> dict[str, Any]:
    """The phone and its laptop meet; seconds until the laptop holds all ``n``."""
    have = messages_in(laptop)
    lap = Proc(code, "--home", str(laptop), "run", "--json", *LOOPBACK)
    ph: Proc | None = None
    try:
        address = lap.wait_line("listening", 60)["address"]
        start = time.monotonic()
        ph = Proc(code, "--home", str(phone), "run", "--json", *LOOPBACK, "--peer", address)
        deadline = start + timeout
        got = have
        while time.monotonic() < deadline:
            got = messages_in(laptop)
            if got >= have + n:
                break
            if lap.proc.poll() is not None or ph.proc.poll() is not None:
                break
            time.sleep(0.2)
        seconds = time.monotonic() - start
        ok = got >= have + n
        errors = [e for e in lap.lines + ph.lines if e.get("event") == "input_rejected"]
        return {
            "ok": ok,
            "why": ""
            if ok
            else (errors[-1].get("detail", "")[:80] if errors else f"{got - have} of {n}"),
            "seconds": round(seconds, 2),
            "phone_mb": ph.peak_mb,
            "new_mb": lap.peak_mb,
        }
    finally:
        if ph is not None:
            ph.stop()
        lap.stop()


def prepare(code: Path, base: Path, n: int) -> int:
    """A phone with a laptop linked while empty, then ``n`` messages written, by
    ``code`` (a store's format may differ between versions); the state's bytes."""
    phone, laptop = base / "phone", base / "laptop"
    p2p(code, "--home", str(phone), "init", "--name", "phone")
    result = link(code, phone, laptop, "laptop", 120)
    if not result["ok"]:
        raise RuntimeError(f"linking the empty laptop failed: {result}")
    env = {**os.environ, "PYTHONPATH": str(code)}
    built = subprocess.run(
        [sys.executable, __file__, "--build", str(phone), str(n)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tempfile.gettempdir(),
        check=True,
    )
    return int(built.stdout.strip())


def run(ns: list[int], baseline: Path | None, timeout: float, limit: int) -> list[dict[str, Any]]:
    rows = []
    codes = [("ours", ROOT)] + ([("baseline", baseline)] if baseline else [])
    with tempfile.TemporaryDirectory(prefix="p2p-history-") as tmp:
        for n in ns:
            for name, code in codes:
                if name == "baseline" and n > limit:
                    continue
                base = Path(tmp) / f"base-{name}-{n}"
                t = time.monotonic()
                size = prepare(code, base, n)
                took = time.monotonic() - t
                print(f"# {name}: {n:,} messages, {size / 1e6:.1f} MB, built in {took:.0f} s")
                for case in ("catch-up", "link"):
                    work = Path(tmp) / f"{name}-{case}-{n}"
                    shutil.copytree(base, work)
                    if case == "catch-up":
                        r = catch_up(code, work / "phone", work / "laptop", n, timeout)
                    else:
                        r = link(code, work / "phone", work / "desktop", "desktop", timeout)
                    shutil.rmtree(work)
                    r.update(code=name, case=case, messages=n, bytes=size)
                    if r.get("ok"):
                        r["msg_per_s"] = round(n / r["seconds"])
                    rows.append(r)
                    print(json.dumps(r), flush=True)
                shutil.rmtree(base)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| case | messages | code | result | s | msg/s | phone MB | other MB | ours ÷ baseline |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    ours = {(r["case"], r["messages"]): r for r in rows if r["code"] == "ours"}
    for r in rows:
        mine = ours.get((r["case"], r["messages"]))
        ratio = ""
        if r["code"] == "baseline" and mine and mine.get("ok") and r.get("ok"):
            ratio = f"{mine['msg_per_s'] / r['msg_per_s']:.2f}x msg/s"
        result = "ok" if r.get("ok") else f"FAILED ({r.get('why', '')})"
        out.append(
            f"| {r['case']} | {r['messages']:,} | {r['code']} | {result} | "
            f"{r.get('seconds', '')} | {r.get('msg_per_s', '')} | {r['phone_mb']} | "
            f"{r['new_mb']} | {ratio} |"
        )
    return "\n".join(out)


def main() -> None:
    if sys.argv[1:2] == ["--build"]:  # in a child, with the code under test on the path
        print(build(Path(sys.argv[2]), int(sys.argv[3])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, nargs="+", default=[20_000, 60_000])
    parser.add_argument("--baseline", type=Path, help="directory holding a baseline p2p/")
    parser.add_argument(
        "--baseline-max", type=int, default=60_000, help="largest N run on the baseline"
    )
    parser.add_argument("--timeout", type=float, default=180, help="seconds per run at most")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()
    rows = run(args.messages, args.baseline, args.timeout, args.baseline_max)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
