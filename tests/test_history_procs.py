"""Histories past any one frame, with real processes and real SQLite stores: a companion
linked (``p2p link``/``p2p approve``) to a long chat, and one away while a long chat was
written catching up (``p2p run --peer`` on 127.0.0.1), each cut by SIGKILL in the middle
and resumed; every message present, in the same order, on both sides.

Histories are built straight through the store (1,000 signed messages per CRDT
transaction, as ``bench/cold_start.py`` does), not a send per message. The runs past
16 MiB (the old limit of one update) take minutes on a small machine and are behind
``make chaos``; ``make test`` runs the same scenarios at a few MiB (several envelopes).
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from chaos import CHAOS
from procs import P2P, Node, log, wait_until
from procs import p2p as run_p2p
from test_linking import Linker

from p2p.proto.pairing import PairingCode
from p2p.runtime.home import open_home_store
from p2p.state.device import NOTES, DeviceState

pytestmark = pytest.mark.slow
long_run = pytest.mark.skipif(not CHAOS, reason="a run of minutes: make chaos (P2P_CHAOS=1)")

LOOPBACK = ("--listen", "127.0.0.1:0", "--no-mdns")
WALL = 1_767_225_600_000
BATCH = 1000
PAST_16_MIB = 50_000
"""Messages of ~350 bytes each: a chat of ~17.5 MB, past the old 16 MiB limit."""
A_FEW_MIB = 12_000


def build(home: Path, n: int, *, start: int = 0) -> int:
    """Append ``n`` signed messages to the notes chat of the (stopped) device at
    ``home``; return the size of the chat's whole state in bytes."""
    store = open_home_store(home)
    try:
        state = DeviceState.load(store)
        space = state.chat_by_name(NOTES)
        for first in range(start, start + n, BATCH):
            entries = [
                state.new_entry(
                    space.id, "msg", WALL + i, body=f"history {i:07d} " + "x" * (40 + i % 80)
                )
                for i in range(first, min(start + n, first + BATCH))
            ]
            _update, batch = state.write_local(space.id, entries)
            store.write(batch)
        return len(space.replica.snapshot())
    finally:
        store.close()


def status(home: Path) -> dict[str, Any]:
    return json.loads(run_p2p(home, "status", "--json").stdout)  # type: ignore[no-any-return]


def link(phone: Path, home: Path, name: str) -> None:
    linker = Linker(home, name)
    try:
        run_p2p(phone, "approve", linker.code, "--yes", timeout=120)
        assert linker.wait(timeout=120) == 0
    finally:
        linker.stop()


def same_history(phone: Path, laptop: Path, n: int) -> None:
    ours, theirs = log(phone), log(laptop)
    history = [m for m in ours if m["text"].startswith("history ")]
    assert len(history) == n
    assert len({m["id"] for m in theirs}) == len(theirs)
    assert theirs == ours  # every message, in the same order


def catch_up_cut_and_resumed(tmp_path: Path, n: int) -> None:
    phone_home, laptop_home = tmp_path / "phone", tmp_path / "laptop"
    run_p2p(phone_home, "init", "--name", "phone")
    link(phone_home, laptop_home, "laptop")
    size = build(phone_home, n)  # written while the laptop was away
    assert size > 3 * 1024 * 1024
    laptop = Node(laptop_home, *LOOPBACK)
    phone = Node(phone_home, *LOOPBACK, "--peer", laptop.address)
    try:
        laptop.wait_for("chat_changed", timeout=120)  # the first piece is durable
        laptop.kill()
        held = len(log(laptop_home))
        assert 0 < held < n, "the cut did not land in the middle of the catch-up"
        laptop = Node(laptop_home, *LOOPBACK, "--peer", phone.address)
        # counted from the message index: the laptop takes the pieces without loading
        # the chat's document, so its status states no entry count
        wait_until(lambda: len(log(laptop_home)) == n, timeout=600, interval=1)
        resent = status(laptop_home)["traffic"]["bytes_in"]
        # only what was missing came again (and some state vectors)
        assert resent <= 1.05 * size * (1 - held / n) + 256 * 1024, (resent, size, held)
    finally:
        laptop.stop()
        phone.stop()
    same_history(phone_home, laptop_home, n)


class PacedProxy:
    """Forwards one connection to ``target``, the dialer's bytes at ``rate`` bytes/s: a
    slow link, so that a kill lands in the middle of a transfer."""

    def __init__(self, target: str, rate: int) -> None:
        self.target, self.rate = target, rate
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        self.listener.settimeout(60)
        with self.listener, contextlib.suppress(OSError):
            client, _ = self.listener.accept()
            host, port = self.target.rsplit(":", 1)
            upstream = socket.create_connection((host, int(port)), timeout=60)
            client.settimeout(60)

            def pump(src: socket.socket, dst: socket.socket, paced: bool) -> None:
                with contextlib.suppress(OSError):
                    while data := src.recv(16384):
                        dst.sendall(data)
                        if paced:
                            time.sleep(len(data) / self.rate)
                for s in (src, dst):
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)

            back = threading.Thread(target=pump, args=(upstream, client, False), daemon=True)
            back.start()
            pump(client, upstream, True)
            back.join(timeout=60)
            client.close()
            upstream.close()


def link_cut_and_resumed(tmp_path: Path, n: int) -> None:
    phone_home, laptop_home = tmp_path / "phone", tmp_path / "laptop"
    run_p2p(phone_home, "init", "--name", "phone")
    size = build(phone_home, n)
    linker = Linker(laptop_home, "laptop")
    target = PairingCode.decode(linker.code).addresses[0]
    proxy = PacedProxy(target, rate=2 * 1024 * 1024)
    try:
        command = [*P2P, "--home", str(phone_home), "approve", linker.code, "--yes"]
        approve = subprocess.Popen(
            [*command, "--connect", proxy.address],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_until(
                lambda: any(e.get("event") == "progress" and e["done"] > 0 for e in linker.events),
                timeout=120,
                interval=0.02,
            )
        finally:
            approve.send_signal(signal.SIGKILL)  # the primary dies mid-transfer
            approve.wait(timeout=20)
        wait_until(lambda: any(e.get("event") == "failed" for e in linker.events), timeout=60)
        kept = max(e["done"] for e in linker.events if e.get("event") == "progress")
        total = max(e["total"] for e in linker.events if e.get("event") == "progress")
        assert 0 < kept < total
        assert total >= size
        run_p2p(phone_home, "approve", linker.code, "--yes", timeout=600)
        assert linker.wait(timeout=600) == 0
        progress = [e for e in linker.events if e.get("event") == "progress"]
        assert [e["done"] for e in progress if e["done"] >= kept], "did not resume"
    finally:
        linker.stop()
    same_history(phone_home, laptop_home, n)


def test_catch_up_of_a_few_mib_cut_by_sigkill_resumes(tmp_path: Path) -> None:
    catch_up_cut_and_resumed(tmp_path, A_FEW_MIB)


def test_link_to_a_few_mib_cut_by_sigkill_resumes(tmp_path: Path) -> None:
    link_cut_and_resumed(tmp_path, A_FEW_MIB)


@long_run
@pytest.mark.chaos
def test_catch_up_past_16_mib_cut_by_sigkill_resumes(tmp_path: Path) -> None:
    catch_up_cut_and_resumed(tmp_path, PAST_16_MIB)


@long_run
@pytest.mark.chaos
def test_link_past_16_mib_cut_by_sigkill_resumes(tmp_path: Path) -> None:
    link_cut_and_resumed(tmp_path, PAST_16_MIB)
