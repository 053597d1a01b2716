"""Real processes on loopback: ``p2p run`` nodes find each other, sync, and refuse strangers."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
from procs import Node, closed_by_peer, log, p2p, wait_until

from p2p.testing import provision_homes

pytestmark = pytest.mark.slow


def texts(home: Path) -> list[str]:
    return [m["text"] for m in log(home)]


def test_three_nodes_with_static_peers_converge_in_the_same_order(
    tmp_path: Path, nodes: list[Node]
) -> None:
    homes = [tmp_path / n for n in ("phone", "laptop", "desktop")]
    provision_homes(homes)
    phone = Node(homes[0], "--listen", "127.0.0.1:0", "--no-mdns")
    nodes.append(phone)
    for home in homes[1:]:
        nodes.append(Node(home, "--listen", "127.0.0.1:0", "--no-mdns", "--peer", phone.address))
    for node in nodes[1:]:
        node.wait_for("peer_connected", device=phone.device)
    sent = []
    for i in range(3):
        for home in homes:
            text = f"{home.name} {i}"
            p2p(home, "send", text)
            sent.append(text)
    wait_until(lambda: all(len(log(h)) == len(sent) for h in homes), timeout=20)
    logs = [log(h) for h in homes]
    assert sorted(m["text"] for m in logs[0]) == sorted(sent)
    assert logs[0] == logs[1] == logs[2]  # same messages, same order, same fields
    for field in ("id", "chat", "ts", "device", "account", "text"):
        assert field in logs[0][0]
    listed = [json.loads(line) for line in p2p(homes[0], "devices", "--json").stdout.splitlines()]
    assert {d["name"]: d["online"] for d in listed if not d["this"]} == {
        "laptop": True,
        "desktop": True,
    }
    assert all(d["last_seen_ms"] for d in listed if not d["this"])


def test_phone_offline_companions_keep_talking(tmp_path: Path, nodes: list[Node]) -> None:
    homes = [tmp_path / n for n in ("phone", "laptop", "desktop")]
    provision_homes(homes)
    phone = Node(homes[0], "--listen", "127.0.0.1:0", "--no-mdns")
    laptop = Node(homes[1], "--listen", "127.0.0.1:0", "--no-mdns", "--peer", phone.address)
    desktop = Node(
        homes[2],
        "--listen",
        "127.0.0.1:0",
        "--no-mdns",
        "--peer",
        laptop.address,
        "--peer",
        phone.address,
    )
    nodes.extend([laptop, desktop])
    p2p(homes[0], "send", "before the phone left")
    wait_until(lambda: len(log(homes[2])) == 1)
    assert phone.stop() == 0  # SIGTERM: a clean shutdown
    for i in range(20):
        p2p(homes[1 + i % 2], "send", f"while away {i}")
    p2p(homes[0], "send", "written on the phone while offline")  # into its store directly
    wait_until(lambda: len(log(homes[1])) == 21 and len(log(homes[2])) == 21)
    phone = Node(homes[0], "--listen", phone.address, "--no-mdns")
    nodes.append(phone)
    wait_until(lambda: all(len(log(h)) == 22 for h in homes), timeout=30)
    assert log(homes[0]) == log(homes[1]) == log(homes[2])


def test_a_strangers_device_is_refused_and_learns_nothing(
    tmp_path: Path, nodes: list[Node]
) -> None:
    ours = [tmp_path / "phone", tmp_path / "laptop"]
    provision_homes(ours)
    stranger_home = tmp_path / "stranger"
    provision_homes([stranger_home])
    phone = Node(ours[0], "--listen", "127.0.0.1:0", "--no-mdns")
    nodes.append(phone)
    p2p(ours[0], "send", "secret plans")
    stranger = Node(stranger_home, "--listen", "127.0.0.1:0", "--no-mdns", "--peer", phone.address)
    nodes.append(stranger)
    refused = phone.wait_for("input_rejected")
    assert refused["error"] == "NotOurAccount"  # refused at its hello: it learns nothing
    stranger.wait_for("input_rejected")
    laptop = Node(ours[1], "--listen", "127.0.0.1:0", "--no-mdns", "--peer", phone.address)
    nodes.append(laptop)
    wait_until(lambda: texts(ours[1]) == ["secret plans"])
    assert texts(stranger_home) == []
    seen = {e["event"] for e in stranger.drain()}
    assert not seen & {"peer_connected", "device_list_changed", "chat_changed"}


def raw_connection(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=5)


def test_garbage_half_frames_and_silence_are_dropped_without_disturbing_peers(
    tmp_path: Path, nodes: list[Node]
) -> None:
    homes = [tmp_path / "phone", tmp_path / "laptop"]
    provision_homes(homes)
    phone = Node(homes[0], "--listen", "127.0.0.1:0", "--no-mdns")
    laptop = Node(homes[1], "--listen", "127.0.0.1:0", "--no-mdns", "--peer", phone.address)
    nodes.extend([phone, laptop])
    laptop.wait_for("peer_connected")

    garbage = raw_connection(phone.address)
    garbage.sendall((50).to_bytes(4, "big") + os.urandom(50))
    oversized = raw_connection(phone.address)
    oversized.sendall((2**31).to_bytes(4, "big") + b"x" * 100)
    half = raw_connection(phone.address)
    half.sendall((1000).to_bytes(4, "big") + b"y" * 10)
    silent = raw_connection(phone.address)

    assert closed_by_peer(garbage, within=5)
    assert closed_by_peer(oversized, within=5)
    p2p(homes[1], "send", "still syncing")  # the legitimate pair is undisturbed meanwhile
    wait_until(lambda: texts(homes[0]) == ["still syncing"], timeout=10)
    assert closed_by_peer(half, within=20)
    assert closed_by_peer(silent, within=20)
    for sock in (garbage, oversized, half, silent):
        sock.close()
    errors = {e["error"] for e in phone.drain() if e["event"] == "input_rejected"}
    assert {"MalformedFrame", "FrameTooLarge", "HandshakeFailed"} <= errors
    p2p(homes[0], "send", "and back")
    wait_until(lambda: texts(homes[1]) == ["still syncing", "and back"], timeout=10)


def test_one_node_per_home_and_clean_shutdown(tmp_path: Path, nodes: list[Node]) -> None:
    home = tmp_path / "phone"
    provision_homes([home])
    first = Node(home, "--listen", "127.0.0.1:0", "--no-mdns")
    second = p2p(home, "run", "--listen", "127.0.0.1:0", "--no-mdns", check=False)
    assert second.returncode == 1
    assert "already running" in second.stderr
    assert "Traceback" not in second.stderr
    status = json.loads(p2p(home, "status", "--json").stdout)
    assert status["running"] is True
    assert status["address"] == first.address
    assert (home / "control.sock").stat().st_mode & 0o077 == 0
    assert (home / "p2p.db").stat().st_mode & 0o077 == 0
    assert first.stop() == 0
    assert not (home / "control.sock").exists()
    assert json.loads(p2p(home, "status", "--json").stdout)["running"] is False


def test_nodes_find_each_other_by_mdns_on_loopback(tmp_path: Path, nodes: list[Node]) -> None:
    homes = [tmp_path / n for n in ("phone", "laptop", "desktop")]
    devices = provision_homes(homes)
    for home in homes:  # no --peer: mDNS, bound to loopback, is the only way to meet
        nodes.append(Node(home, "--listen", "127.0.0.1:0", "--mdns-interface", "127.0.0.1"))
    for node, device in zip(nodes, devices, strict=True):
        for other in devices:
            if other != device:
                node.wait_for("peer_connected", device=other, timeout=30)
    for home in homes:
        p2p(home, "send", f"hello from {home.name}")
    wait_until(lambda: all(len(log(h)) == 3 for h in homes), timeout=20)
    assert log(homes[0]) == log(homes[1]) == log(homes[2])
    status = json.loads(p2p(homes[0], "status", "--json").stdout)
    dialed = [p for p in status["peers"] if p["found_via"] != "incoming"]
    assert all(p["found_via"] == "mdns" for p in dialed)


def test_nodes_find_each_other_by_mdns_across_network_namespaces(
    tmp_path: Path, nodes: list[Node]
) -> None:
    from netns import make_namespaces

    spaces = make_namespaces(3)
    namespaces = next(spaces)
    try:
        homes = [tmp_path / n for n in ("phone", "laptop", "desktop")]
        devices = provision_homes(homes)
        for i, (home, address) in enumerate(zip(homes, namespaces.addresses, strict=True)):
            prefix = (namespaces.ip, "netns", "exec", namespaces.nodes[i])
            # the last node uses every interface, as on a real LAN: here only its veth
            mdns = [] if i == 2 else ["--mdns-interface", address]
            nodes.append(Node(home, "--listen", f"{address}:0", *mdns, prefix=prefix))
        for node, device in zip(nodes, devices, strict=True):
            for other in devices:
                if other != device:
                    node.wait_for("peer_connected", device=other, timeout=30)
        for home in homes:  # the control socket is a file: reachable from here
            p2p(home, "send", f"hello from {home.name}")
        wait_until(lambda: all(len(log(h)) == 3 for h in homes), timeout=20)
        assert log(homes[0]) == log(homes[1]) == log(homes[2])
    finally:
        while nodes:
            nodes.pop().stop()
        for _ in spaces:  # runs the generator's cleanup (namespaces deleted, checked)
            pass
