"""T6: five ``p2p run`` processes churned by SIGKILL, SIGSTOP/SIGCONT and restarts while
``p2p send`` races their start-ups; a Jepsen-style set check.

Five linked devices on loopback, each ``p2p run`` on a fixed port with static ``--peer``s
to the four others and no mDNS. For a bounded number of steps, from a seed, the nemesis
picks one of:

- start a device that is down, and often ``p2p send`` to it a random instant later
  (while its node opens the store, loads, binds its control socket);
- SIGKILL a running device;
- SIGSTOP a running device, then SIGCONT it, and sometimes SIGKILL it right after and
  start it again with a send racing that start (the sequence that once lost a message);
- ``p2p send`` to a random device, up or down (a down device's send opens the store).

Sends run in their own threads, so they overlap the starts, stops and kills. A send
counts as acknowledged only when ``p2p send`` exits 0 with an id.

Then every device runs (stopped ones continued, dead ones started) and stays connected
until they agree. The check: no acknowledged message is missing on any device (lost =
0), no device shows a text that was never sent (unexpected = 0) or a message twice, and
every device shows the same ids in the same order.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from chaos import CHAOS, CHAOS_REASON, P2P, Daemon, cli_log, log_ids, record, scale

from p2p.testing import provision_homes

pytestmark = pytest.mark.slow

N = 5
SEND_TIMEOUT = 120.0
"""Bound of one ``p2p send``: its own wait for a starting node (LOCK_WAIT) and more."""
IN_FLIGHT = 4
"""Sends running at once at most (each is a Python process: the machine has 2 cores)."""


def free_ports(n: int) -> list[int]:
    """``n`` loopback ports free right now (held together, so they differ)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


@dataclass
class Ledger:
    """Every send attempted, by its unique text: its id when acknowledged."""

    acked: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    attempted: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Churn:
    def __init__(self, tmp_path: Path, seed: int) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.homes = [tmp_path / f"d{i}" for i in range(N)]
        provision_homes(self.homes)
        self.ports = free_ports(N)
        self.procs: list[Daemon | None] = [None] * N
        self.stopped = [False] * N
        self.ledger = Ledger()
        self.senders: list[threading.Thread] = []
        self.in_flight = threading.BoundedSemaphore(IN_FLIGHT)
        self.sent = 0
        self.actions: Counter[str] = Counter()
        self.log: list[str] = []
        self.t0 = time.monotonic()

    def note(self, what: str) -> None:
        self.log.append(f"{time.monotonic() - self.t0:8.3f} {what}")

    def args(self, i: int) -> list[str]:
        others = [p for j, p in enumerate(self.ports) if j != i]
        peers = [a for p in others for a in ("--peer", f"127.0.0.1:{p}")]
        return ["--listen", f"127.0.0.1:{self.ports[i]}", "--no-mdns", *peers]

    def up(self, i: int) -> bool:
        proc = self.procs[i]
        return proc is not None and proc.alive

    # ---- the nemesis -----------------------------------------------------------------

    def start(self, i: int, *, race: bool) -> None:
        self.reap(i)
        self.procs[i] = Daemon(self.homes[i], *self.args(i), wait=False)
        self.stopped[i] = False
        self.note(f"start d{i}")
        if race:
            self.send(i, delay=self.rng.uniform(0.0, 1.2))

    def kill(self, i: int) -> None:
        proc = self.procs[i]
        if proc is not None:
            proc.kill()
            self.note(f"SIGKILL d{i}")
        self.procs[i] = None
        self.stopped[i] = False

    def reap(self, i: int) -> None:
        proc = self.procs[i]
        if proc is not None and not proc.alive:
            proc.kill()  # collects it and closes its files
            self.procs[i] = None

    def signal(self, i: int, sig: signal.Signals) -> None:
        proc = self.procs[i]
        if proc is not None and proc.alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.proc.pid, sig)
            self.note(f"{sig.name} d{i}")

    def stop_and_go(self, i: int) -> None:
        """SIGSTOP, a pause, SIGCONT; sometimes SIGKILL at once and a start raced by a
        send (what lost a message before)."""
        self.signal(i, signal.SIGSTOP)
        self.stopped[i] = True
        time.sleep(self.rng.uniform(0.05, 0.8))
        self.signal(i, signal.SIGCONT)
        self.stopped[i] = False
        if self.rng.random() < 0.5:
            time.sleep(self.rng.uniform(0.0, 0.05))
            self.kill(i)
            self.start(i, race=True)
            self.actions["stop-cont-kill-start"] += 1

    def send(self, i: int, *, delay: float = 0.0) -> None:
        if not self.in_flight.acquire(timeout=SEND_TIMEOUT + 30):
            raise AssertionError(f"{IN_FLIGHT} sends stuck")
        text = f"s{self.seed}-m{self.sent}"
        self.sent += 1
        with self.ledger.lock:
            self.ledger.attempted.add(text)

        def run() -> None:
            try:
                if delay:
                    time.sleep(delay)
                self.run_send(i, text)
            finally:
                self.in_flight.release()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.senders.append(thread)

    def run_send(self, i: int, text: str) -> None:
        """One ``p2p send`` to device ``i``, into the ledger."""
        started = time.monotonic() - self.t0
        try:
            done = subprocess.run(
                [*P2P, "--home", str(self.homes[i]), "send", "--json", text],
                capture_output=True,
                text=True,
                timeout=SEND_TIMEOUT,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            with self.ledger.lock:
                self.ledger.failed[text] = "timeout"
            return
        with self.ledger.lock:
            if done.returncode == 0:
                self.ledger.acked[text] = str(json.loads(done.stdout)["id"])
            else:
                self.ledger.failed[text] = done.stderr.strip()[-200:]
        self.note(f"send {text} to d{i} at {started:.3f}: exit {done.returncode}")

    def step(self) -> None:
        i = self.rng.randrange(N)
        self.reap(i)
        roll = self.rng.random()
        if not self.up(i) and roll < 0.5:
            self.start(i, race=self.rng.random() < 0.6)
            self.actions["start"] += 1
        elif self.up(i) and roll < 0.2:
            self.kill(i)
            self.actions["SIGKILL"] += 1
        elif self.up(i) and roll < 0.4:
            self.stop_and_go(i)
            self.actions["SIGSTOP/SIGCONT"] += 1
        else:
            self.send(i)
            self.actions["send"] += 1
        time.sleep(self.rng.uniform(0.02, 0.4))

    # ---- the end -----------------------------------------------------------------------

    def all_up(self) -> None:
        """Continue and start every device, waiting out ``p2p send``s that hold a home."""
        for i in range(N):
            self.signal(i, signal.SIGCONT)
            self.stopped[i] = False
        for i in range(N):
            for _attempt in range(5):
                self.reap(i)
                if self.procs[i] is None:
                    self.start(i, race=False)
                proc = self.procs[i]
                assert proc is not None
                try:
                    proc.wait_listening(timeout=90)
                    break
                except AssertionError:
                    self.kill(i)
            else:
                raise AssertionError(f"d{i} does not start: {self.procs[i]}")

    def finish_sends(self) -> None:
        deadline = time.monotonic() + SEND_TIMEOUT + 30
        for thread in self.senders:
            thread.join(timeout=max(0.1, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self.senders), "a p2p send never returned"

    def converge(self, timeout: float) -> float:
        """Seconds until every device shows the same ids, all acknowledged ones among them."""
        started = time.monotonic()
        acked = set(self.ledger.acked.values())
        while time.monotonic() - started < timeout:
            logs = [log_ids(h) for h in self.homes]
            if all(ids is not None and ids == logs[0] for ids in logs) and acked <= set(
                logs[0] or []
            ):
                break
            time.sleep(0.25)
        return time.monotonic() - started

    def stop_all(self) -> None:
        for i in range(N):
            self.signal(i, signal.SIGCONT)
            proc = self.procs[i]
            if proc is not None:
                proc.stop()
            self.procs[i] = None


def play(tmp_path: Path, seed: int, steps: int) -> None:
    churn = Churn(tmp_path, seed)
    try:
        for _ in range(steps):
            churn.step()
        churn.all_up()
        churn.finish_sends()
        converged_s = churn.converge(timeout=120)
        final = [cli_log(h) for h in churn.homes]
        ids = [[m["id"] for m in log] for log in final]
        texts = [[m["text"] for m in log] for log in final]
        ledger = churn.ledger
        lost = {t for t in ledger.acked if any(t not in shown for shown in texts)}
        unexpected = {t for shown in texts for t in shown if t not in ledger.attempted}
        doubled = {t for shown in texts for t, k in Counter(shown).items() if k > 1}
        wrong_ids = {t for t, i in ledger.acked.items() if i not in ids[0]}
        same_order = all(x == ids[0] for x in ids)
        record(
            "T6 churn",
            seed=seed,
            steps=steps,
            actions=dict(churn.actions),
            sends=churn.sent,
            acked=len(ledger.acked),
            failed=len(ledger.failed),
            failures=dict(Counter(reason.split(":")[0][:60] for reason in ledger.failed.values())),
            lost=len(lost),
            unexpected=len(unexpected),
            doubled=len(doubled),
            same_order=same_order,
            converged_s=round(converged_s, 2),
        )
        detail = "\n".join(churn.log[-60:])
        assert not lost, f"{len(lost)} acknowledged sends lost: {sorted(lost)[:5]}\n{detail}"
        assert not wrong_ids, f"acknowledged ids missing: {sorted(wrong_ids)[:5]}"
        assert not unexpected, f"unexpected messages: {sorted(unexpected)[:5]}"
        assert not doubled, f"messages shown twice: {sorted(doubled)[:5]}"
        assert same_order, "the devices show different orders"
        assert ledger.acked, "no send was acknowledged"
    finally:
        churn.stop_all()


def test_churn_with_sends_racing_start_ups_fast(tmp_path: Path) -> None:
    play(tmp_path, seed=1, steps=20)


@pytest.mark.chaos
@pytest.mark.skipif(not CHAOS, reason=CHAOS_REASON)
@pytest.mark.parametrize("seed", [11, 12, 13])
def test_churn_with_sends_racing_start_ups_long(tmp_path: Path, seed: int) -> None:
    play(tmp_path, seed=seed, steps=scale(30, 300))
