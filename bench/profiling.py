"""Where the CPU goes: py-spy samples of one process, summarised in categories.

``Spy(pid)`` attaches py-spy (sampling, on-CPU samples only: threads waiting in epoll or
on a lock are left out) to a running process and stops on ``stop()``. ``categorise``
reads its collapsed stacks and gives each sample to the first category whose rule
matches a frame, reading from the innermost frame outwards: a sample inside libsodium
called from the view counts as crypto, a sample in ``base64`` called from
``identity.short_id`` counts as id lookups.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

CATEGORIES: list[tuple[str, re.Pattern[str]]] = [
    # (name, rule matched against one frame, "function (path:line)"); the first rule
    # that matches the innermost frame that any rule matches wins
    (
        "framing (msgpack, wire)",
        re.compile(
            r"msgpack/|p2p/wire\.py|p2p/transport/tcp\.py|"
            r"(^|\.)(parse|_header) \(.*p2p/envelope\.py"
        ),
    ),
    (
        "crypto (Ed25519, XChaCha20)",
        re.compile(
            r"nacl/|p2p/box\.py|p2p/envelope\.py|(^|\.)(_verify_entry|signed) \(|"
            r"(^|\.)(sign|verify) \(.*p2p/identity\.py"
        ),
    ),
    ("ids (short_id: BLAKE2b + base32)", re.compile(r"(^|\.)(short_id|device_id|account_id) \(")),
    ("update check (yupdate)", re.compile(r"p2p/yupdate\.py")),
    (
        "CRDT (pycrdt)",
        re.compile(
            r"pycrdt/|(^|\.)(apply|write|diff|snapshot|state_vector|count) \(.*p2p/model\.py"
        ),
    ),
    ("chat view (entries, sort)", re.compile(r"p2p/model\.py")),
    ("storage (SQLite)", re.compile(r"p2p/storage/|sqlite3")),
    ("network I/O (sockets)", re.compile(r"trio/_socket\.py|trio/_highlevel_socket\.py")),
    ("node logic (node, core, sync)", re.compile(r"p2p/(node|core|sync|clock)\.py")),
    ("trio scheduling", re.compile(r"trio/|outcome/")),
]
OTHER = "other (interpreter, stdlib)"

_LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")


class Spy:
    """py-spy recording one process until :meth:`stop`."""

    def __init__(self, pid: int, out: Path, *, rate: int = 200) -> None:
        exe = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy"
        self.out = out
        self.proc = subprocess.Popen(
            [
                exe,
                "record",
                "--pid",
                str(pid),
                "--format",
                "raw",
                "-r",
                str(rate),
                "-o",
                str(out),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def stacks(raw: Path) -> list[tuple[list[str], int]]:
    """(frames outermost first, samples) from py-spy's raw (collapsed) output."""
    out = []
    for line in raw.read_text().splitlines():
        m = _LINE.match(line.strip())
        if m:
            out.append((m["stack"].split(";"), int(m["count"])))
    return out


def _frame(text: str) -> str:
    return text.strip()


def category_of(frames: list[str]) -> str:
    for frame in reversed(frames):
        f = _frame(frame)
        for name, rule in CATEGORIES:
            if rule.search(f):
                return name
    return OTHER


def categorise(raw: Path) -> dict[str, float]:
    """Share of on-CPU samples per category (0..1), largest first."""
    counts: Counter[str] = Counter()
    for frames, n in stacks(raw):
        counts[category_of(frames)] += n
    total = sum(counts.values()) or 1
    return {k: v / total for k, v in counts.most_common()}


def top_functions(raw: Path, n: int = 15) -> list[tuple[str, float]]:
    """Innermost p2p frame of each sample (else the innermost frame), share of samples."""
    counts: Counter[str] = Counter()
    for frames, c in stacks(raw):
        pick = next((f for f in reversed(frames) if "/p2p/" in f), frames[-1] if frames else "?")
        counts[_short(pick)] += c
    total = sum(counts.values()) or 1
    return [(k, v / total) for k, v in counts.most_common(n)]


PATHS: list[tuple[str, list[str]]] = [
    # (name, patterns that frames on the stack must match in this order, outermost
    # first; each pattern is matched at the start of a frame, "function (path:line)")
    (
        "the benchmark's own final read (Node.messages)",
        [r"\S*run \((node_driver|cold_start)", r"Node\.messages "],
    ),
    ("receiving: Node._on_envelope (DeviceState.ingest)", [r"Node\._on_envelope "]),
    ("local write: DeviceState.new_entry (sign)", [r"Node\._write ", r"DeviceState\.new_entry "]),
    (
        "local write: DeviceState.write_local (pycrdt, one transaction per writer round)",
        [r"Writer\._flush ", r"DeviceState\.write_local "],
    ),
    ("gossip: Gossiper.run (merge, seal, send)", [r"Gossiper\.run "]),
    (
        "connection tasks: Peers._run_connection, Peers._pump_out (receiving included)",
        [r"Peers\.(_run_connection|_pump_out) "],
    ),
    ("store writes (worker threads)", [r"SqliteStore\."]),
    ("opening: DeviceState.load", [r"DeviceState\.load "]),
]


def _has(frames: list[str], patterns: list[str]) -> bool:
    i = 0
    for frame in frames:
        if re.match(patterns[i], frame.strip()):
            i += 1
            if i == len(patterns):
                return True
    return False


def by_path(raw: Path) -> dict[str, float]:
    """Share of samples under each of :data:`PATHS` (a sample can be under several)."""
    st = stacks(raw)
    total = sum(c for _, c in st) or 1
    return {name: sum(c for f, c in st if _has(f, names)) / total for name, names in PATHS}


def samples(raw: Path) -> int:
    return sum(c for _, c in stacks(raw))


def _short(frame: str) -> str:
    m = re.match(r"(?P<fn>\S+) \((?P<path>.*?):(?P<line>\d+)\)", frame.strip())
    if not m:
        return frame.strip()
    path = m["path"]
    path = "p2p/" + path.rsplit("/p2p/", 1)[1] if "/p2p/" in path else path.rsplit("/", 1)[-1]
    return f"{m['fn']} ({path})"
