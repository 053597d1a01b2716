"""Helpers for the chaos and adversarial suite (issue 8): scale, figures, faulty networks.

- ``CHAOS`` is true under ``make chaos`` (``P2P_CHAOS=1``): the long runs. Without it only
  the fast slice runs, as part of ``make test``.
- :func:`record` appends one JSON line of figures per run to ``$P2P_CHAOS_REPORT`` (set
  by ``make chaos``); ``python tests/chaos.py summary FILE`` prints them as tables, the
  source of docs/reliability.md.
- :class:`FaultProxy`: a TCP proxy that injects faults into the byte stream (latency,
  jitter, lost / duplicated / reordered / corrupted chunks, resets) and can cut its
  link (a partition). It runs in the test process, on loopback or, with ``netns``, inside
  a network namespace the test made (each proxy thread enters it with ``setns``).
- :class:`Netem`: ``tc netem`` on veths, used only where the kernel has it (see
  :func:`netem_available`; the machine this suite was written on does not).

Everything here is bounded: every loop has a deadline, every thread is joined, every
socket closed.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest
from procs import P2P, Child

CHAOS = os.environ.get("P2P_CHAOS", "") == "1"
"""The long runs of ``make chaos``."""
CHAOS_REASON = "issue 8: long run, in make chaos (P2P_CHAOS=1), not make test"
REPORT_ENV = "P2P_CHAOS_REPORT"


def scale(fast: int, chaos: int) -> int:
    """How many cases (seeds, kills, inputs) to run: the fast slice or the long run."""
    return chaos if CHAOS else fast


def chaos_only() -> pytest.MarkDecorator:
    """Mark a test as part of ``make chaos`` only (``-m chaos``, skipped otherwise)."""
    return pytest.mark.skipif(not CHAOS, reason=CHAOS_REASON)


def record(target: str, **figures: Any) -> None:
    """Keep the figures of one run (a JSON line in $P2P_CHAOS_REPORT, when set)."""
    path = os.environ.get(REPORT_ENV)
    line = {"target": target, "chaos": CHAOS, "time": time.time(), **figures}
    print(f"chaos figures: {json.dumps(line)}")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")


# ---- a fault-injecting TCP proxy -----------------------------------------------------


@dataclass(frozen=True)
class Faults:
    """What a proxy does to each chunk of bytes it forwards (probabilities per chunk).

    Loss, duplication, reordering and corruption of *stream* chunks break the framing or
    the box of the session above, as a broken middlebox would: the session closes, the
    node redials and the state-vector exchange repairs the gap. Delay and jitter only
    slow the stream down.
    """

    delay: float = 0.0
    """Seconds added to every chunk."""
    jitter: float = 0.0
    """Up to this many more seconds, at random."""
    drop: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    corrupt: float = 0.0
    reset: float = 0.0
    """The connection is cut (both ways) at this chunk."""

    @property
    def active(self) -> bool:
        return any(asdict(self).values())


NO_FAULTS = Faults()


def random_faults(rng: random.Random) -> Faults:
    """A fault profile: mostly latency, sometimes a broken middlebox."""
    kind = rng.choice(["latency", "latency", "lossy", "dup", "reorder", "corrupt", "reset", "all"])
    delay = rng.choice([0.0, 0.005, 0.02, 0.05])
    jitter = rng.choice([0.0, 0.01, 0.05])
    p = rng.choice([0.005, 0.01, 0.03])
    return Faults(
        delay=delay,
        jitter=jitter,
        drop=p if kind in ("lossy", "all") else 0.0,
        duplicate=p if kind in ("dup", "all") else 0.0,
        reorder=p if kind in ("reorder", "all") else 0.0,
        corrupt=p if kind in ("corrupt", "all") else 0.0,
        reset=p / 2 if kind in ("reset", "all") else 0.0,
    )


CLONE_NEWNET = 0x40000000


def enter_netns(name: str) -> None:
    """Move the *calling thread* into network namespace ``name`` (``ip netns`` made it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


class FaultProxy:
    """Listens on ``host:port`` (0: any free port) and forwards to ``target``.

    ``set_faults`` changes what happens to chunks from now on; ``cut`` closes every
    connection and refuses new ones (accepted, then closed at once) until ``mend``.
    ``counts`` says what was injected. One thread accepts; two per connection pump.
    """

    POLL = 0.2

    def __init__(
        self,
        host: str,
        port: int = 0,
        *,
        target: tuple[str, int] | None = None,
        netns: str | None = None,
        seed: int = 0,
        name: str = "",
    ) -> None:
        self.host = host
        self.port = port
        self.target = target
        self.netns = netns
        self.name = name
        self.faults = NO_FAULTS
        self.blocked = False
        self.counts: Counter[str] = Counter()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._listener: socket.socket | None = None

    # ---- control ---------------------------------------------------------------------

    def start(self) -> FaultProxy:
        thread = threading.Thread(target=self._accept_loop, name=f"proxy-{self.name}", daemon=True)
        self._threads.append(thread)
        thread.start()
        if not self._ready.wait(10):
            raise RuntimeError(f"proxy {self.name} did not start")
        if self._error is not None:
            raise RuntimeError(f"proxy {self.name}: {self._error}") from self._error
        return self

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def set_faults(self, faults: Faults) -> None:
        self.faults = faults

    def cut(self) -> None:
        """A partition: every connection through here ends, new ones are refused."""
        self.blocked = True
        self.counts["cuts"] += 1
        self._close_all()

    def mend(self) -> None:
        self.blocked = False

    def stop(self) -> None:
        self._stop.set()
        self._threads[0].join(timeout=5)  # the acceptor: no pump starts after this
        self._close_all()
        for t in self._threads:
            t.join(timeout=5)
        alive = [t.name for t in self._threads if t.is_alive()]
        assert not alive, f"proxy threads still running: {alive}"

    def _close_all(self) -> None:
        with self._lock:
            conns = list(self._conns)
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    # ---- threads ---------------------------------------------------------------------

    def _accept_loop(self) -> None:
        try:
            if self.netns:
                enter_netns(self.netns)
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.host, self.port))
            listener.listen(64)
            listener.settimeout(self.POLL)
            self.port = listener.getsockname()[1]
            self._listener = listener
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        while not self._stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            if self.blocked or self.target is None:
                self.counts["refused"] += 1
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=2)
            except OSError:
                self.counts["upstream_failed"] += 1
                client.close()
                continue
            self.counts["connections"] += 1
            pair = (client, upstream)
            with self._lock:
                self._conns.update(pair)
            # finished pumps are dropped here; the rest are joined when the proxy stops
            self._threads = [self._threads[0]] + [t for t in self._threads[1:] if t.is_alive()]
            for src, dst in (pair, pair[::-1]):
                src.settimeout(self.POLL)
                t = threading.Thread(target=self._pump, args=(src, dst, pair), daemon=True)
                self._threads.append(t)
                t.start()
        listener.close()

    def _pump(
        self, src: socket.socket, dst: socket.socket, pair: tuple[socket.socket, socket.socket]
    ) -> None:
        held: bytes | None = None
        try:
            while not self._stop.is_set():
                try:
                    chunk = src.recv(16384)
                except TimeoutError:
                    if held is not None:  # nothing followed: let the held chunk go late
                        dst.sendall(held)
                        held = None
                    continue
                if not chunk:
                    break
                for out in self._apply(chunk):
                    if out is None:
                        raise ConnectionResetError("injected reset")
                    if out == b"":
                        continue
                    if held is None and self._hold():
                        held = out
                        continue
                    dst.sendall(out)
                    if held is not None:
                        dst.sendall(held)
                        held = None
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns.difference_update(pair)
            for s in pair:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()

    def _hold(self) -> bool:
        f = self.faults
        if f.reorder and self._rng.random() < f.reorder:
            self.counts["reordered"] += 1
            return True
        return False

    def _apply(self, chunk: bytes) -> list[bytes | None]:
        """What to send for one chunk (None: reset the connection)."""
        f = self.faults
        self.counts["chunks"] += 1
        self.counts["bytes"] += len(chunk)
        if not f.active:
            return [chunk]
        rng = self._rng
        if f.delay or f.jitter:
            time.sleep(f.delay + rng.uniform(0, f.jitter))
            self.counts["delayed"] += 1
        if f.reset and rng.random() < f.reset:
            self.counts["resets"] += 1
            return [None]
        if f.drop and rng.random() < f.drop:
            self.counts["dropped"] += 1
            return []
        if f.corrupt and rng.random() < f.corrupt:
            self.counts["corrupted"] += 1
            b = bytearray(chunk)
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            chunk = bytes(b)
        if f.duplicate and rng.random() < f.duplicate:
            self.counts["duplicated"] += 1
            return [chunk, chunk]
        return [chunk]


# ---- p2p run processes ------------------------------------------------------------


class Daemon(Child):
    """A ``p2p run --json`` process. Like ``procs.Node``, but it may be started without
    waiting for it to listen (a crash test starts one that may not open), and a failed
    start kills the process before raising."""

    def __init__(
        self,
        home: Path,
        *args: str,
        prefix: tuple[str, ...] = (),
        wait: bool = True,
        timeout: float = 30,
    ) -> None:
        self.home = home
        super().__init__(
            [*prefix, *P2P, "--home", str(home), "run", "--json", *args], logs=home.parent
        )
        if wait:
            try:
                self.wait_listening(timeout)
            except BaseException:
                self.kill()
                raise

    def wait_listening(self, timeout: float = 30) -> None:
        self.wait_for("listening", timeout=timeout)

    def _listening(self) -> dict[str, Any]:
        with self._lock:
            return next((e for e in self.events if e.get("event") == "listening"), {})

    @property
    def address(self) -> str:
        return str(self._listening().get("address", ""))

    @property
    def device(self) -> str:
        return str(self._listening().get("device", ""))


def control(home: Path, payload: dict[str, Any]) -> dict[str, Any] | None:
    """One request to the node running for ``home`` (what ``p2p send`` does)."""
    from p2p.app import control as ctl

    return ctl.request(home, payload)


def log_ids(home: Path) -> list[str] | None:
    """Message ids in display order, from the running node (None if it does not answer)."""
    try:
        reply = control(home, {"op": "log", "chat": None})
    except Exception:
        return None
    if reply is None:
        return None
    return [m["id"] for m in reply["messages"]]


def cli_log(home: Path) -> list[dict[str, Any]]:
    """``p2p log --json``, as a person would run it."""
    done = subprocess.run(
        [*P2P, "--home", str(home), "log", "--json"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def cli_send(home: Path, text: str) -> str:
    """``p2p send --json TEXT`` (through the node's control socket when one runs)."""
    done = subprocess.run(
        [*P2P, "--home", str(home), "send", "--json", text],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip())
    return str(json.loads(done.stdout)["id"])


# ---- netem (only where the kernel has it) ------------------------------------------


def _tc() -> str | None:
    return shutil.which("tc")


def netem_available(ip: str, probe_ns: str) -> tuple[bool, str]:
    """Whether ``tc qdisc ... netem`` works here (tried on a dummy link in ``probe_ns``)."""
    tc = _tc()
    if tc is None:
        return False, "tc is not installed"
    run = subprocess.run
    try:
        run([ip, "-n", probe_ns, "link", "add", "nprobe0", "type", "veth", "peer", "name",
             "nprobe1"], check=True, capture_output=True, timeout=10)  # fmt: skip
        done = run(
            [tc, "-n", probe_ns, "qdisc", "add", "dev", "nprobe0", "root", "netem", "loss", "1%"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        return False, f"probe failed: {exc}"
    finally:
        run([ip, "-n", probe_ns, "link", "del", "nprobe0"], capture_output=True, timeout=10)
    if done.returncode != 0:
        return False, f"tc netem refused: {done.stderr.strip()}"
    return True, "ok"


class Netem:
    """``tc netem`` on the bridge side of each node's veth (``v<i>`` in ``ns``)."""

    def __init__(self, ns: str, count: int) -> None:
        tc = _tc()
        assert tc is not None
        self.tc = tc
        self.ns = ns
        self.count = count
        self.changes = 0

    def set(self, index: int, rng: random.Random) -> str:
        args = [
            "delay", f"{rng.choice([1, 5, 20])}ms", f"{rng.choice([1, 5])}ms",
            "loss", f"{rng.choice([0, 1, 5, 10])}%",
            "duplicate", f"{rng.choice([0, 1, 5])}%",
            "reorder", f"{rng.choice([0, 5, 25])}%", "50%",
        ]  # fmt: skip
        subprocess.run(
            [self.tc, "-n", self.ns, "qdisc", "replace", "dev", f"v{index}", "root", "netem",
             *args],
            check=True, capture_output=True, timeout=10,
        )  # fmt: skip
        self.changes += 1
        return " ".join(args)

    def clear(self) -> None:
        for i in range(self.count):
            subprocess.run(
                [self.tc, "-n", self.ns, "qdisc", "del", "dev", f"v{i}", "root"],
                capture_output=True, timeout=10,
            )  # fmt: skip


# ---- summary ----------------------------------------------------------------------


def load(path: str | Path) -> list[dict[str, Any]]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def summary(rows: Iterable[dict[str, Any]]) -> str:
    out = []
    by_target: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_target.setdefault(row["target"], []).append(row)
    for target, items in sorted(by_target.items()):
        out.append(f"## {target} ({len(items)} runs)")
        for item in items:
            shown = {k: v for k, v in item.items() if k not in ("target", "time", "chaos")}
            out.append("  " + json.dumps(shown, sort_keys=True))
    return "\n".join(out)


if __name__ == "__main__":  # pragma: no cover
    if len(sys.argv) == 3 and sys.argv[1] == "summary":
        if Path(sys.argv[2]).exists():
            print(summary(load(sys.argv[2])))
        else:
            print(f"no figures in {sys.argv[2]}")
    else:
        print("usage: python tests/chaos.py summary FILE", file=sys.stderr)
        sys.exit(2)
