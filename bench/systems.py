"""Run the same gossip workload on each system; every run returns one result dict.

- ``ours``: one ``bench/node_driver.py`` process per device (a real p2p node, SQLite
  store, encrypted sessions over loopback TCP, full mesh of static peers, no mDNS).
- ``pycrdt-websocket``: a pycrdt-websocket ``WebsocketServer`` process and one pycrdt
  client process per device (``bench/pycrdt_ws.py``).
- ``y-websocket``: the ``@y/websocket-server`` server and one Node.js y-websocket client
  process per device (``bench/yws_server.mjs``, ``bench/yws_client.mjs``).

Each client process sends its share of the messages (each message one CRDT transaction
into a shared ``Map``), then waits until it holds all of them. Throughput counts from the
moment all processes are told to go until the last replica holds everything.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import BENCH, Child, go_all, say, split, stop_all
from profiling import Spy

PY = sys.executable
NODE = "node"


def _summarise(
    system: str,
    devices: int,
    total: int,
    t_go: float,
    done: list[dict[str, Any]],
    cpu: dict[str, float],
) -> dict[str, Any]:
    # ours: each node's held time plus its full read (Node.messages), timed after the
    # race, one node at a time; the baselines' clients read nothing
    t_end = max(d.get("t_shown", d["t_held"]) for d in done)
    t_held = max(d["t_held"] for d in done)
    return {
        "system": system,
        "devices": devices,
        "messages": total,
        "seconds": t_end - t_go,
        "seconds_held": t_held - t_go,
        "rate": total / (t_end - t_go),
        "rate_held": total / (t_held - t_go),
        "send_seconds": max(d["t_sent"] for d in done) - t_go,
        "cpu_seconds": cpu,
        "per_device": done,
    }


def _race(
    everyone: list[Child], clients: list[Child], timeout: float, spy: Path | None = None
) -> tuple[float, list[dict[str, Any]], dict[str, float]]:
    """Tell the clients to go; wait for each one's ``done``; CPU each process used.

    ``spy``: record py-spy samples of the first client from go to its done, there."""
    for client in clients:
        client.expect("ready")
    spying = Spy(clients[0].proc.pid, spy) if spy else None
    time.sleep(1.0 if spying else 0.3)
    cpu0 = {c.name: c.cpu_seconds() for c in everyone}
    t_go = go_all(clients)
    done = []
    for i, client in enumerate(clients):
        done.append(client.expect("done", timeout=timeout))
        if i == 0 and spying:
            spying.stop()
    cpu = {c.name: c.cpu_seconds() - cpu0[c.name] for c in everyone}
    time.sleep(0.5)  # let late frames (gossip forwarded after a device was done) land
    for client in clients:
        client.tell("stats")
    for client, d in zip(clients, done, strict=True):
        d["final_traffic"] = client.expect("stats", timeout=30)["traffic"]
    for client, d in zip(clients, done, strict=True):
        if "t_shown" not in d and client.name.startswith("ours"):  # one at a time
            client.tell("show")
            shown = client.expect("shown", timeout=120)
            d["shown"], d["t_shown"] = shown["shown"], d["t_held"] + shown["read_seconds"]
    return t_go, done, cpu


def run_ours(
    devices: int,
    total: int,
    *,
    seed: int = 1,
    concurrency: int = 64,
    senders: list[int] | None = None,
    profile: str = "",
    spy: Path | None = None,
    raw: bool = False,
    relay: str = "",
) -> dict[str, Any]:
    """``senders``: per-device message counts (default: each message from a random one)."""
    from p2p.testing import provision_homes

    counts = senders or split(total, devices, seed)
    with tempfile.TemporaryDirectory(prefix="p2p-bench-") as tmp:
        homes = [Path(tmp) / f"d{i}" for i in range(devices)]
        provision_homes(homes)
        children: list[Child] = []
        try:
            for i, home in enumerate(homes):
                argv = [
                    PY,
                    str(BENCH / "node_driver.py"),
                    "--home",
                    str(home),
                    "--count",
                    str(counts[i]),
                    "--total",
                    str(total),
                    "--expect-peers",
                    str(devices - 1),
                    "--concurrency",
                    str(concurrency),
                    "--seed",
                    str(seed * 100 + i),
                ]
                if profile and i == 0:
                    argv += ["--profile", profile]
                if raw and i == devices - 1:
                    argv += ["--raw"]
                if relay:
                    argv += ["--relay", relay]
                children.append(Child(argv, name=f"ours-{i}"))
            addresses = [c.expect("listening")["address"] for c in children]
            for i, child in enumerate(children):  # node i dials 0..i-1: a full mesh
                child.tell({"peers": addresses[:i]})
            t_go, done, cpu = _race(children, children, 600, spy)
        finally:
            stop_all(children)
    name = "ours" + (" via relay" if relay else "")
    return _summarise(name, devices, total, t_go, done, cpu)


def run_relay(devices: int, total: int, *, idle: int = 0, seed: int = 1) -> dict[str, Any]:
    """S7: ``devices`` nodes whose every connection is a pipe through one relay process
    (``python -m p2p.relay``), optionally with ``idle`` more devices holding idle
    authenticated connections to it (``bench/relay_idle.py``)."""
    relay = Child(
        [PY, "-m", "p2p.relay", "--listen", "127.0.0.1:0"], name="relay", cwd=BENCH.parent
    )
    extra: list[Child] = []
    try:
        url = relay.expect("listening")["address"]
        if idle:
            extra.append(Child([PY, str(BENCH / "relay_idle.py"), url, str(idle)], name="idle"))
            extra[0].expect("ready", timeout=300)
        cpu0 = relay.cpu_seconds()
        idle_cpu0 = extra[0].cpu_seconds() if extra else 0.0
        result = run_ours(devices, total, seed=seed, relay=url)
        result["relay_cpu_seconds"] = relay.cpu_seconds() - cpu0
        result["idle_clients_cpu_seconds"] = extra[0].cpu_seconds() - idle_cpu0 if extra else 0.0
        result["idle_connections"] = idle
        result["relay_peak_rss_mb"] = _vm_hwm(relay.proc.pid)
        if idle:
            extra[0].tell("")
            extra[0].proc.stdin.close()  # type: ignore[union-attr]
            result["idle_still_connected"] = extra[0].expect("done", timeout=60)["connected"]
    finally:
        stop_all([*extra, relay])
    return result


def _vm_hwm(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_catchup_tcp(a_new: int, b_new: int, *, seed: int = 1) -> dict[str, Any]:
    """S3 over real processes: A writes ``a_new`` messages and B ``b_new`` while apart
    (each alone, into its own store), then B dials A. Time from the dial until both
    hold and show every message; bytes and frames each way."""
    from p2p.testing import provision_homes

    with tempfile.TemporaryDirectory(prefix="p2p-bench-") as tmp:
        homes = [Path(tmp) / "a", Path(tmp) / "b"]
        provision_homes(homes)
        children: list[Child] = []
        try:
            for i, (home, count) in enumerate(zip(homes, (a_new, b_new), strict=True)):
                argv = [PY, str(BENCH / "node_driver.py"), "--home", str(home), "--offline"]
                argv += ["--count", str(count), "--total", str(a_new + b_new)]
                argv += ["--expect-peers", "1", "--seed", str(seed * 100 + i)]
                children.append(Child(argv, name=f"catchup-{'ab'[i]}"))
            addresses = [c.expect("listening", timeout=600)["address"] for c in children]
            cpu0 = {c.name: c.cpu_seconds() for c in children}
            children[0].tell({"peers": []})
            children[1].tell({"peers": addresses[:1]})
            done = [c.expect("done", timeout=600) for c in children]
            cpu = {c.name: c.cpu_seconds() - cpu0[c.name] for c in children}
        finally:
            stop_all(children)
    t0 = min(d["t_go"] for d in done)
    return {
        "a_new": a_new,
        "b_new": b_new,
        "seconds_held": max(d["t_held"] for d in done) - t0,
        "seconds": max(d["t_shown"] for d in done) - t0,
        "bytes": sum(d["traffic"]["bytes_out"] for d in done),
        "frames": sum(d["traffic"]["frames_out"] for d in done),
        "cpu_seconds": cpu,
        "per_device": done,
    }


def run_pycrdt_ws(
    devices: int, total: int, *, seed: int = 1, senders: list[int] | None = None
) -> dict[str, Any]:
    counts = senders or split(total, devices, seed)
    children: list[Child] = []
    try:
        server = Child([PY, str(BENCH / "pycrdt_ws.py"), "server"], name="pycrdt-server")
        children.append(server)
        url = server.expect("listening")["url"]
        clients = [
            Child(
                [
                    PY,
                    str(BENCH / "pycrdt_ws.py"),
                    "client",
                    "--url",
                    url,
                    "--count",
                    str(counts[i]),
                    "--total",
                    str(total),
                    "--seed",
                    str(seed * 100 + i),
                ],
                name=f"pycrdt-client-{i}",
            )
            for i in range(devices)
        ]
        children += clients
        t_go, done, cpu = _race(children, clients, 900)
    finally:
        stop_all(children)
    return _summarise("pycrdt-websocket", devices, total, t_go, done, cpu)


def run_y_websocket(
    devices: int, total: int, *, seed: int = 1, senders: list[int] | None = None
) -> dict[str, Any]:
    counts = senders or split(total, devices, seed)
    children: list[Child] = []
    try:
        server = Child([NODE, str(BENCH / "yws_server.mjs")], name="yws-server", cwd=BENCH)
        children.append(server)
        url = server.expect("listening")["url"]
        clients = [
            Child(
                [
                    NODE,
                    str(BENCH / "yws_client.mjs"),
                    url,
                    str(counts[i]),
                    str(total),
                    str(seed * 100 + i),
                ],
                name=f"yws-client-{i}",
                cwd=BENCH,
            )
            for i in range(devices)
        ]
        children += clients
        t_go, done, cpu = _race(children, clients, 600)
    finally:
        stop_all(children)
    return _summarise("y-websocket", devices, total, t_go, done, cpu)


if __name__ == "__main__":  # a quick manual run: python bench/systems.py ours 3 2000
    which, n, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    fn = {"ours": run_ours, "pycrdt": run_pycrdt_ws, "yws": run_y_websocket}[which]
    result = fn(n, total)
    for d in result.pop("per_device"):
        say(str({k: v for k, v in d.items() if k != "event"}))
    say(str(result))
