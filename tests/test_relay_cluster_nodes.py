"""Devices on a relay cluster, with faults: real ``p2p run`` nodes, real relay processes,
a real ``redis-server``; a Jepsen-style set check at the end.

The nodes can meet only through the cluster (no LAN, no static peers), each is given
every process's URL (``URL#id=RELAY_ID``) starting with a different one, so the devices
of one account are spread over the processes. Messages are written on every device
between the faults: a relay process SIGKILLed mid-traffic and started again, Redis
SIGKILLed (AOF on) and started again. At the end every device holds exactly the set of
messages written (lost = 0, unexpected = 0), in one identical order.

The long run (more rounds, every process killed in turn, Redis twice) is ``make chaos``.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from chaos import CHAOS, CHAOS_REASON, record
from procs import Node, log, wait_until
from test_relay_cluster import CLUSTER_ID, Topology, start_cluster

from p2p.app import control
from p2p.testing import provision_homes

pytestmark = pytest.mark.slow
__all__ = ["start_cluster"]  # the fixture, used by name


def run(home: Path, topo: Topology, first: int) -> Node:
    """A node that reaches the world only through the cluster, ``first`` process first."""
    urls = topo.urls[first:] + topo.urls[:first]
    args: list[str] = ["--listen", "127.0.0.1:0", "--no-mdns"]
    for url in urls:
        args += ["--relay", f"{url}#id={CLUSTER_ID}"]
    return Node(home, *args)


def messages(home: Path, chat: str | None = None) -> list[dict[str, Any]]:
    reply = control.request(home, {"op": "log", "chat": chat})
    return list(reply["messages"]) if reply is not None else log(home, chat)


class Writers:
    """Each device writes its own numbered messages; what was acknowledged is recorded."""

    def __init__(self, homes: list[Path], chat: str | None = None) -> None:
        self.homes = homes
        self.chat = chat
        self.written: set[str] = set()
        self.rounds = 0

    def round(self, per_device: int = 3) -> None:
        """Every device writes ``per_device`` messages, all at once (threads)."""
        self.rounds += 1
        lock = threading.Lock()

        def write(home: Path) -> None:
            for i in range(per_device):
                text = f"{home.name}-r{self.rounds}-{i}-{os.urandom(3).hex()}"
                reply = control.request(home, {"op": "send", "text": text, "chat": self.chat})
                if reply is not None and reply.get("ok"):
                    with lock:
                        self.written.add(text)

        threads = [threading.Thread(target=write, args=(h,)) for h in self.homes]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)

    def check(self, timeout: float = 90) -> None:
        """Jepsen's set check on every device, then one order everywhere."""

        def complete() -> bool:
            return all(
                {m["text"] for m in messages(h, self.chat)} >= self.written for h in self.homes
            )

        try:
            wait_until(complete, timeout=timeout, interval=0.5)
        finally:
            for home in self.homes:
                seen = {m["text"] for m in messages(home, self.chat)}
                lost, unexpected = self.written - seen, seen - self.written
                assert not lost, f"{home.name} lost {len(lost)}: {sorted(lost)[:5]}"
                assert not unexpected, f"{home.name} has unexpected {sorted(unexpected)[:5]}"
        orders = {h.name: [m["id"] for m in messages(h, self.chat)] for h in self.homes}
        assert len({tuple(o) for o in orders.values()}) == 1, "orders differ"


def connected_to_all(node: Node, devices: list[str], timeout: float = 60) -> None:
    for device in devices:
        if device != node.device:
            node.wait_for("peer_connected", device=device, timeout=timeout)


def test_a_relay_process_and_redis_die_and_no_message_is_lost(
    tmp_path: Path, start_cluster: Any
) -> None:
    topo: Topology = start_cluster(3)
    assert topo.redis is not None
    homes = [tmp_path / n for n in ("phone", "laptop", "desktop", "tablet")]
    devices = provision_homes(homes)
    nodes = [run(h, topo, i % 3) for i, h in enumerate(homes)]
    try:
        for node in nodes:
            connected_to_all(node, devices)
        writers = Writers(homes)
        writers.round()
        topo.relays[0].stop(signal.SIGKILL)  # mid-traffic: the phone's and tablet's first
        writers.round()
        topo.relays[0].start()
        writers.round()
        topo.redis.kill()
        writers.round()
        topo.redis.start()
        writers.round()
        writers.check()
    finally:
        for node in nodes:
            node.stop()


@pytest.mark.chaos
@pytest.mark.skipif(not CHAOS, reason=CHAOS_REASON)
def test_every_process_and_redis_die_in_turn_long(tmp_path: Path, start_cluster: Any) -> None:
    """Five devices over three processes; each process SIGKILLed in turn mid-traffic and
    restarted, Redis SIGKILLed twice; twelve rounds of writes in all."""
    topo: Topology = start_cluster(3)
    assert topo.redis is not None
    homes = [tmp_path / n for n in ("phone", "laptop", "desktop", "tablet", "web")]
    devices = provision_homes(homes)
    nodes = [run(h, topo, i % 3) for i, h in enumerate(homes)]
    began = time.monotonic()
    try:
        for node in nodes:
            connected_to_all(node, devices)
        writers = Writers(homes)
        for relay in topo.relays:
            writers.round(5)
            relay.stop(signal.SIGKILL)
            writers.round(5)
            relay.start()
        for _ in range(2):
            writers.round(5)
            topo.redis.kill()
            writers.round(5)
            topo.redis.start()
        writers.round(5)
        writers.check(timeout=180)
        record(
            "relay_cluster_set_check",
            devices=len(homes),
            written=len(writers.written),
            lost=0,
            unexpected=0,
            process_kills=len(topo.relays),
            redis_kills=2,
            seconds=round(time.monotonic() - began, 1),
        )
    finally:
        for node in nodes:
            node.stop()


def ask(home: Path, op: str, **fields: Any) -> dict[str, Any]:
    reply = control.request(home, {"op": op, **fields})
    assert reply is not None, f"no node running for {home.name}"
    assert reply.get("ok"), reply
    return reply


@pytest.mark.chaos
@pytest.mark.skipif(not CHAOS, reason=CHAOS_REASON)
def test_twelve_devices_of_three_accounts_over_three_processes_long(
    tmp_path: Path, start_cluster: Any
) -> None:
    """Three accounts of four devices each, in one conversation, spread over three
    relay processes; each process SIGKILLed in turn and Redis twice while all twelve
    write; Jepsen's set check on the conversation on every device."""
    topo: Topology = start_cluster(3)
    assert topo.redis is not None
    accounts = [[tmp_path / f"{a}{d}" for d in range(4)] for a in "abc"]
    for homes in accounts:
        provision_homes(homes)
    homes = [h for account in accounts for h in account]
    nodes = [run(h, topo, i % 3) for i, h in enumerate(homes)]
    began = time.monotonic()
    try:
        primaries = [account[0] for account in accounts]
        codes = [ask(p, "contact_code")["code"] for p in primaries]
        for i, primary in enumerate(primaries):
            for j, code in enumerate(codes):
                if i != j:
                    ask(primary, "contact_add", code=code, name=f"acct{j}")
        members = [c["id"] for c in ask(primaries[0], "contacts")["contacts"]]
        assert len(members) == 2
        chat = ask(primaries[0], "chat_new", name="all", **{"with": members})["chat"]

        def joined(home: Path) -> bool:
            reply = control.request(home, {"op": "chats"})
            return reply is not None and any(c["id"] == chat for c in reply.get("chats", []))

        wait_until(lambda: all(joined(h) for h in homes), timeout=180, interval=0.5)
        writers = Writers(homes, chat)
        for relay in topo.relays:
            writers.round(2)
            relay.stop(signal.SIGKILL)
            writers.round(2)
            relay.start()
        for _ in range(2):
            writers.round(2)
            topo.redis.kill()
            writers.round(2)
            topo.redis.start()
        writers.round(2)
        written_at = time.monotonic()
        writers.check(timeout=900)  # twelve nodes on two shared cores: catch-up is slow
        record(
            "relay_cluster_set_check_accounts",
            converged_after_last_write=round(time.monotonic() - written_at, 1),
            accounts=3,
            devices=len(homes),
            written=len(writers.written),
            lost=0,
            unexpected=0,
            process_kills=len(topo.relays),
            redis_kills=2,
            seconds=round(time.monotonic() - began, 1),
        )
    finally:
        for node in nodes:
            node.stop()
