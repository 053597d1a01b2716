"""Helpers shared by the benchmarks: the workload, child processes, tables, the machine.

Every benchmark uses the same workload: chat messages of 120 random characters, each
sent from a replica picked at random (seeded, so every system gets the same split).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import queue
import random
import resource
import string
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
OUT = BENCH / "out"
BODY_CHARS = 120
ALPHABET = string.ascii_letters + string.digits + " "


def body(rng: random.Random) -> str:
    """One chat message: 120 random characters."""
    return "".join(rng.choices(ALPHABET, k=BODY_CHARS))


def split(n: int, replicas: int, seed: int) -> list[int]:
    """How many of ``n`` messages each replica sends, each message from a random one."""
    rng = random.Random(seed)
    counts = [0] * replicas
    for _ in range(n):
        counts[rng.randrange(replicas)] += 1
    return counts


# ---- child processes -------------------------------------------------------------------


class Child:
    """A child process that speaks JSON lines on stdout and reads commands on stdin."""

    def __init__(self, argv: Sequence[str], *, name: str, cwd: Path | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=cwd,
            bufsize=1,
        )
        self._lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._err: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                self._lines.put(json.loads(line))
            except ValueError:
                continue
        self._lines.put(None)

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._err.append(line)
            del self._err[:-40]

    def expect(self, event: str, timeout: float = 60) -> dict[str, Any]:
        """The next JSON line whose ``event`` is ``event`` (skipping others)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name}: no {event!r} within {timeout}s\n{self.stderr()}")
            try:
                item = self._lines.get(timeout=left)
            except queue.Empty:
                continue
            if item is None:
                code = self.proc.wait()
                raise RuntimeError(f"{self.name} exited ({code}) before {event!r}\n{self.stderr()}")
            if item.get("event") == event:
                return item

    def tell(self, message: dict[str, Any] | str) -> None:
        assert self.proc.stdin is not None
        text = message if isinstance(message, str) else json.dumps(message)
        try:
            self.proc.stdin.write(text + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the child has used so far, from /proc."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stderr(self) -> str:
        return "".join(self._err[-20:])

    def stop(self, timeout: float = 20) -> None:
        """Close stdin (children exit on EOF), then terminate, then kill."""
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def stop_all(children: Sequence[Child]) -> None:
    for child in children:
        if child.proc.stdin is not None:
            with contextlib.suppress(OSError):
                child.proc.stdin.close()
    for child in children:
        child.stop()


def go_all(children: Sequence[Child]) -> float:
    """Tell every child to start at once; the wall time of the start."""
    start = time.time()
    for child in children:
        child.tell("go")
    return start


# ---- memory ----------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """Peak resident memory of this process (VmHWM), MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- machine and output ----------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    node_version = "?"
    with contextlib.suppress(OSError):
        node_version = subprocess.run(
            ["node", "--version"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "ram_gb": round(mem_gb, 1),
        "python": platform.python_version(),
        "node": node_version,
        "kernel": platform.release(),
    }


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table (also valid Markdown), printed and returned."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.0f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    cells = [[cell(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += [
        "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells
    ]
    text = f"\n### {title}\n\n" + "\n".join(lines) + "\n"
    print(text, flush=True)
    return text


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
