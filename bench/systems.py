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


CLUSTER_ID = "ws://relay.cluster.bench"


class _Redis:
    """A ``redis-server`` of the benchmark's own: loopback, a free port, a temp folder,
    AOF with ``appendfsync always`` (what relay.md asks of a cluster)."""

    def __init__(self, folder: Path) -> None:
        import shutil
        import socket
        import subprocess

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError("redis-server is not installed (make bench installs it)")
        self.proc = subprocess.Popen(
            [server, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(folder),
             "--save", "", "--appendonly", "yes", "--appendfsync", "always"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    break
            time.sleep(0.05)
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def cpu_seconds(self) -> float:
        return Child.cpu_seconds(self)  # type: ignore[arg-type]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)


def _stop_relays(relays: list[Child]) -> None:
    import subprocess

    for relay in relays:
        relay.proc.terminate()  # a relay ignores stdin: SIGTERM is its clean stop
    for relay in relays:
        try:
            relay.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:  # thousands of sockets to close: do not hang
            relay.proc.kill()
            relay.proc.wait()


def run_relay_pairs(
    processes: int, *, cluster: bool, pairs: int = 5, frames: int = 2000, size: int = 1024
) -> dict[str, Any]:
    """S7 cluster row: ``pairs`` senders each streaming ``frames`` frames of ``size``
    bytes to its own receiver through relay processes (``bench/relay_pairs.py``);
    ``cluster``: ``processes`` relay processes sharing one Redis, each pipe crossing
    from one process to another when there are several; else one plain relay (SQLite).
    Aggregate frames/s from go until the last frame arrived."""
    with tempfile.TemporaryDirectory(prefix="p2p-bench-cluster-") as tmp:
        redis = _Redis(Path(tmp)) if cluster else None
        relays: list[Child] = []
        sides: list[Child] = []
        try:
            for i in range(processes if cluster else 1):
                argv = [PY, "-m", "p2p.relay", "--listen", "127.0.0.1:0"]
                if redis is not None:
                    argv += ["--redis", redis.url, "--id", CLUSTER_ID]
                relays.append(Child(argv, name=f"relay-{i}", cwd=BENCH.parent))
            urls = ",".join(r.expect("listening")["address"] for r in relays)
            common = ["--pairs", str(pairs), "--frames", str(frames), "--urls", urls]
            if redis is not None:
                common += ["--id", CLUSTER_ID]
            receiver = Child([PY, str(BENCH / "relay_pairs.py"), "receive", *common], name="rx")
            sides.append(receiver)
            devices = receiver.expect("ready", timeout=120)["devices"]
            sender = Child(
                [PY, str(BENCH / "relay_pairs.py"), "send", *common, "--size", str(size),
                 "--to", ",".join(devices)],
                name="tx",
            )  # fmt: skip
            sides.append(sender)
            sender.expect("ready", timeout=120)
            cpu0 = [r.cpu_seconds() for r in relays]
            redis_cpu0 = redis.cpu_seconds() if redis is not None else 0.0
            sender.tell("go")
            go = sender.expect("sent", timeout=900)["t_go"]
            done = receiver.expect("done", timeout=900)
            seconds = done["t_last"] - go
            result = {
                "processes": len(relays),
                "cluster": cluster,
                "pairs": pairs,
                "frames": done["frames"],
                "frame_bytes": size,
                "seconds": seconds,
                "frames_per_second": done["frames"] / seconds,
                "relay_cpu_seconds": sum(
                    r.cpu_seconds() - c for r, c in zip(relays, cpu0, strict=True)
                ),
                "redis_cpu_seconds": (redis.cpu_seconds() - redis_cpu0) if redis else 0.0,
                "relay_peak_rss_mb": max(_vm_hwm(r.proc.pid) for r in relays),
            }
        finally:
            stop_all(sides)
            _stop_relays(relays)
            if redis is not None:
                redis.stop()
    return result


def run_relay_idle_per_process(idle: int, *, frames: int = 2000) -> dict[str, Any]:
    """S7 idle row: one cluster process holding ``idle`` idle devices, and one live pair
    through it (rate with and without them); its peak memory."""
    with tempfile.TemporaryDirectory(prefix="p2p-bench-idle-") as tmp:
        redis = _Redis(Path(tmp))
        relay = Child(
            [PY, "-m", "p2p.relay", "--listen", "127.0.0.1:0", "--redis", redis.url,
             "--id", CLUSTER_ID, "--max-connections", str(idle + 100)],
            name="relay",
            cwd=BENCH.parent,
        )  # fmt: skip
        extra: list[Child] = []
        try:
            url = relay.expect("listening")["address"]

            def live_pair() -> float:
                common = [
                    "--pairs",
                    "1",
                    "--frames",
                    str(frames),
                    "--urls",
                    url,
                    "--id",
                    CLUSTER_ID,
                ]
                rx = Child([PY, str(BENCH / "relay_pairs.py"), "receive", *common], name="rx")
                devices = rx.expect("ready", timeout=120)["devices"]
                tx = Child(
                    [PY, str(BENCH / "relay_pairs.py"), "send", *common, "--to", devices[0]],
                    name="tx",
                )
                try:
                    tx.expect("ready", timeout=120)
                    tx.tell("go")
                    go = tx.expect("sent", timeout=600)["t_go"]
                    done = rx.expect("done", timeout=600)
                    return float(done["frames"] / (done["t_last"] - go))
                finally:
                    stop_all([tx, rx])

            alone = live_pair()
            base_mb = _vm_hwm(relay.proc.pid)
            began = time.monotonic()
            extra.append(
                Child([PY, str(BENCH / "relay_idle.py"), url, str(idle), CLUSTER_ID], name="idle")
            )
            extra[0].expect("ready", timeout=900)
            connect_seconds = time.monotonic() - began
            loaded = live_pair()
            return {
                "idle": idle,
                "pair_alone_fps": alone,
                "pair_with_idle_fps": loaded,
                "ratio": loaded / alone,
                "relay_peak_rss_mb": _vm_hwm(relay.proc.pid),
                "relay_rss_before_idle_mb": base_mb,
                "connect_seconds": connect_seconds,
            }
        finally:
            stop_all(extra)
            _stop_relays([relay])
            redis.stop()
