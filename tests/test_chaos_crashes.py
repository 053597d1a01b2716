"""T3: a ``p2p run`` node SIGKILLed at random points, over and over, while it sends.

The victim (the laptop) runs with a static peer (the phone, which keeps running and keeps
sending too, so the victim is also killed while it receives and stores). Each round
starts the victim and either kills it at a random instant of its start-up (opening the
store, loading, dialing), or waits until it listens, checks that every send acknowledged
so far is still there, hammers its control socket with sends (what ``p2p send`` does) and
kills it at a random instant. A send counts as acknowledged only if its reply came back.

At the end the victim runs once more: both devices must show the same messages in the
same order, every acknowledged send of either among them.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest
from chaos import CHAOS, CHAOS_REASON, Daemon, cli_log, control, log_ids, record, scale

from p2p.testing import provision_homes

pytestmark = pytest.mark.slow


class Sender(threading.Thread):
    """Sends through a node's control socket until it fails or is told to stop."""

    def __init__(self, home: Path, prefix: str, acked: dict[str, str], pause: float) -> None:
        super().__init__(daemon=True)
        self.home = home
        self.prefix = prefix
        self.acked = acked
        self.pause = pause
        self.halt = threading.Event()
        self.failures = 0
        self.sent = 0

    def run(self) -> None:
        k = 0
        while not self.halt.is_set():
            text = f"{self.prefix}-{k}"
            k += 1
            try:
                reply = control(self.home, {"op": "send", "text": text, "chat": None})
            except Exception:
                reply = None
            if reply is None:  # the node died (or is not up yet): indeterminate
                self.failures += 1
                if self.halt.wait(0.05):
                    return
                continue
            self.acked[str(reply["id"])] = text
            self.sent += 1
            if self.pause:
                self.halt.wait(self.pause)

    def finish(self) -> None:
        self.halt.set()
        self.join(timeout=30)
        assert not self.is_alive(), "sender stuck"


def play(tmp_path: Path, seed: int, rounds: int) -> None:
    rng = random.Random(seed)
    phone_home, victim_home = tmp_path / "phone", tmp_path / "laptop"
    provision_homes([phone_home, victim_home])
    phone = Daemon(phone_home, "--listen", "127.0.0.1:0", "--no-mdns")
    victim: Daemon | None = None
    phone_acked: dict[str, str] = {}
    victim_acked: dict[str, str] = {}
    phone_sender = Sender(phone_home, f"phone-{seed}", phone_acked, pause=0.1)
    kills = {"during start-up": 0, "while sending": 0}
    opened = 0
    open_times: list[float] = []
    checked_present = 0
    try:
        phone_sender.start()
        args = ("--listen", "127.0.0.1:0", "--no-mdns", "--peer", phone.address)
        for r in range(rounds):
            if rng.random() < 0.25:
                victim = Daemon(victim_home, *args, wait=False)
                time.sleep(rng.uniform(0.0, 0.8))
                victim.kill()
                kills["during start-up"] += 1
                continue
            started = time.monotonic()
            victim = Daemon(victim_home, *args)  # raises if the store does not open
            open_times.append(time.monotonic() - started)
            opened += 1
            ids = log_ids(victim_home)
            assert ids is not None
            missing = set(victim_acked) - set(ids)
            assert not missing, f"round {r}: {len(missing)} acknowledged sends lost"
            checked_present += len(victim_acked)
            sender = Sender(victim_home, f"victim-{seed}-{r}", victim_acked, pause=0.0)
            sender.start()
            time.sleep(rng.uniform(0.02, 1.0))
            victim.kill()
            kills["while sending"] += 1
            sender.finish()
            assert phone.alive, phone.stderr()
        phone_sender.finish()
        started = time.monotonic()
        victim = Daemon(victim_home, *args)
        opened += 1
        every = set(phone_acked) | set(victim_acked)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            a, b = log_ids(phone_home), log_ids(victim_home)
            if a is not None and a == b and every <= set(a):
                break
            time.sleep(0.2)
        reconverged_s = time.monotonic() - started
        final = [[m["id"] for m in cli_log(h)] for h in (phone_home, victim_home)]
        lost = every - set(final[0])
        record(
            "T3 crashes",
            seed=seed,
            rounds=rounds,
            kills=kills,
            store_opened=opened,
            acked_victim=len(victim_acked),
            acked_phone=len(phone_acked),
            presence_checks=checked_present,
            lost=len(lost),
            same_order=final[0] == final[1],
            max_open_s=round(max(open_times, default=0.0), 2),
            reconverged_s=round(reconverged_s, 2),
        )
        assert not lost, f"{len(lost)} acknowledged sends lost"
        assert final[0] == final[1], "the devices did not reconverge"
        assert len(victim_acked) > 0
        assert phone.alive
    finally:
        phone_sender.halt.set()
        if victim is not None:
            victim.kill()
        phone.stop()


def test_sigkill_at_random_points_fast(tmp_path: Path) -> None:
    play(tmp_path, seed=1, rounds=8)


@pytest.mark.chaos
@pytest.mark.skipif(not CHAOS, reason=CHAOS_REASON)
def test_sigkill_at_random_points_long(tmp_path: Path) -> None:
    play(tmp_path, seed=2, rounds=scale(8, 120))
