"""Nodes that can only meet through a relay: a real relay process, real node processes."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from procs import Node, Relay, log, p2p, wait_until

from p2p.app import control
from p2p.testing import provision_homes

pytestmark = pytest.mark.slow


def relayed(home: Path, relay: Relay) -> Node:
    """A node with no LAN discovery and no static peers: the relay is its only way out."""
    return Node(home, "--listen", "127.0.0.1:0", "--no-mdns", "--relay", relay.url)


def send(home: Path, text: str) -> None:
    """Send through the running node's control socket, without starting a process."""
    assert control.request(home, {"op": "send", "text": text, "chat": None}) is not None


def count(home: Path) -> int:
    reply = control.request(home, {"op": "log", "chat": None})
    return len(reply["messages"]) if reply is not None else len(log(home))


def ids(home: Path) -> list[str]:
    return [m["id"] for m in log(home)]


def test_three_nodes_converge_through_the_relay_alone(
    tmp_path: Path, relay: Relay, nodes: list[Node]
) -> None:
    homes = [tmp_path / n for n in ("phone", "laptop", "desktop")]
    devices = provision_homes(homes)
    nodes.extend(relayed(h, relay) for h in homes)
    for node, device in zip(nodes, devices, strict=True):
        for other in devices:
            if other != device:
                node.wait_for("peer_connected", device=other, timeout=30)
    for i in range(5):
        for home in homes:
            send(home, f"{home.name} {i}")
    wait_until(lambda: all(count(h) == 15 for h in homes), timeout=30)
    assert log(homes[0]) == log(homes[1]) == log(homes[2])
    status = json.loads(p2p(homes[0], "status", "--json").stdout)
    assert {p["remote"] for p in status["peers"]} == {f"relay:{d}" for d in devices[1:]}


def test_the_phone_catches_up_through_the_relay_and_the_relay_sees_no_plaintext(
    tmp_path: Path, relay: Relay, nodes: list[Node]
) -> None:
    homes = [tmp_path / n for n in ("phone", "laptop", "tablet")]
    provision_homes(homes)
    phone, laptop, tablet = homes
    # the phone is off from the start; the two companions talk through the relay
    laptop_node, tablet_node = relayed(laptop, relay), relayed(tablet, relay)
    nodes.extend([laptop_node, tablet_node])
    texts = []
    for i in range(150):
        text = f"secret-{i:04d}-{os.urandom(4).hex()}"
        texts.append(text)
        send(laptop if i % 2 or i > 100 else tablet, text)
        if i == 100:  # the tablet goes offline for a while, and comes back
            tablet_node.stop()
            nodes.remove(tablet_node)
    for i in range(150, 200):
        text = f"secret-{i:04d}-{os.urandom(4).hex()}"
        texts.append(text)
        send(laptop, text)
    tablet_node = relayed(tablet, relay)
    nodes.append(tablet_node)
    wait_until(lambda: count(tablet) == 200, timeout=60)
    phone_node = relayed(phone, relay)  # hours later, in spirit
    nodes.append(phone_node)
    wait_until(lambda: count(phone) == 200, timeout=60)
    assert ids(phone) == ids(laptop) == ids(tablet)
    assert sorted(m["text"] for m in log(phone)) == sorted(texts)
    stored = b"".join(p.read_bytes() for p in relay.data.rglob("*") if p.is_file())
    assert stored, "the relay kept nothing at all: the test would prove nothing"
    leaked = [t for t in texts if t.encode() in stored]
    assert not leaked, f"plaintext in the relay's files: {leaked[:3]}"


def test_mail_survives_a_relay_killed_with_sigkill(
    tmp_path: Path, relay: Relay, nodes: list[Node]
) -> None:
    homes = [tmp_path / n for n in ("phone", "laptop")]
    provision_homes(homes)
    phone, laptop = homes
    laptop_node = relayed(laptop, relay)
    nodes.append(laptop_node)
    wait_until(lambda: json.loads(p2p(laptop, "status", "--json").stdout)["relays"][0]["connected"])
    for i in range(20):
        send(laptop, f"for the phone {i}")
    laptop_node.stop()  # the laptop is gone too: only the relay's mailbox holds the news
    nodes.remove(laptop_node)
    relay.stop(signal.SIGKILL)
    relay.start()
    phone_node = relayed(phone, relay)
    nodes.append(phone_node)
    wait_until(lambda: count(phone) == 20, timeout=30)
    assert sorted(m["text"] for m in log(phone)) == sorted(f"for the phone {i}" for i in range(20))
