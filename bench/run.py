"""``make bench``: p2p against its peers, side by side, with plots.

    python bench/run.py [--quick] [--only S1,S4] [--publish]

Every benchmark prints a table, writes a PNG into ``bench/out/`` and gives ratios to
baselines measured in the same run (these machines are shared and noisy: ratios hold
where absolute figures do not). ``bench/out/results.json`` holds every figure and
``bench/out/report.md`` the tables. ``--publish`` copies the plots to ``docs/img/``.

Workload everywhere: chat messages of 120 random characters, each from a random replica.

- S1 gossip throughput, 3 and 5 devices: ours (real ``p2p`` nodes: SQLite, encrypted
  sessions over loopback TCP, full mesh), pycrdt-websocket, y-websocket.
- S2 wire bytes per message per receiving device, against the raw pycrdt update.
- S3 partition catch-up (A 10,000 new, B 2,000): round trips, bytes against the raw
  pycrdt diff, time (sans-I/O sessions, and two real nodes over TCP).
- S4 cold start with 100,000 messages: time to the last 50 and peak memory, against
  loading the same messages as one pycrdt update.
- S5 where the CPU of one S1 node goes (py-spy), in categories.
- S6 fan-out: what one sender pays with 2 and with 5 devices.
- S7 relay: 5 devices through one ``python -m p2p.relay``, and with 1,000 idle devices;
  then a relay cluster (``--redis``): 5 pairs through 1, 2 and 3 processes against the
  single relay, and 10,000 idle devices on one process with a live pair through it.
- S8 join with history: a new device gets 100,000 messages (``p2p link``) against a
  y-websocket client joining a room holding the same chat; with ``--million``, ours
  alone linking an account of 1,000,000 messages (51 chats; minutes). Then (S8C, also
  alone with ``--only S8C``) a companion away while 300,000 messages were written to one
  chat comes level: messages per second, peak memory of both devices.
- S9 a node holding 1,000,000 messages in 51 chats with its laptop connected, against
  a y-websocket server holding the same documents; and cold start at that scale (the
  newest 50 messages of a chat, the first send into it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import matplotlib

matplotlib.use("Agg")
import cold_start
import history_scale
import matplotlib.pyplot as plt
import profiling
import systems
from common import OUT, ROOT, machine, say, table

TARGETS = {
    "s1_vs_y_websocket": 1.0,
    "s2_ratio": 1.3,
    "s3_round_trips": 1,
    "s3_ratio": 1.05,
    "s4_seconds": 0.25,
    "s4_mb": 200,
    "history_s": 0.1,  # S9 cold start: first send, newest 50 of a chat
    "history_mb": 150,  # S8 link and S9 at rest, peak per process
    "link_million_s": 120,
    "catchup_msg_s": 10_000,  # S8 catch-up of 300,000 messages
}
COLORS = {
    "ours": "#1f77b4",
    "y-websocket": "#ff7f0e",
    "pycrdt-websocket": "#2ca02c",
    "raw": "#7f7f7f",
}


class Report:
    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.results: dict[str, Any] = {"machine": machine(), "quick": quick}
        self.results["machine"]["loadavg_start"] = os.getloadavg()
        self.text: list[str] = []

    def table(self, title: str, header: list[str], rows: list[list[Any]]) -> None:
        self.text.append(table(title, header, rows))

    def note(self, text: str) -> None:
        print(text, flush=True)
        self.text.append(text + "\n")

    def plot(self, fig: Any, name: str) -> None:
        path = OUT / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        self.text.append(f"![{name}]({name})\n")
        say(f"wrote {path}")

    def save(self) -> None:
        self.results["machine"]["loadavg_end"] = os.getloadavg()
        m = self.results["machine"]
        head = (
            f"# p2p benchmarks{' (quick)' if self.quick else ''}\n\n"
            f"{m['date']}; {m['nproc']} CPUs ({m['cpu']}), {m['ram_gb']} GB RAM; "
            f"Python {m['python']}, Node.js {m['node']}, Linux {m['kernel']}; "
            f"load average at start {m['loadavg_start'][0]:.1f}, "
            f"at end {m['loadavg_end'][0]:.1f}\n"
        )
        (OUT / "report.md").write_text(head + "\n".join(self.text))
        (OUT / "results.json").write_text(json.dumps(self.results, indent=1, default=str))


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


# ---- S1 + S5 --------------------------------------------------------------------------


def s1(r: Report, n: int) -> None:
    say(f"S1 gossip throughput: {n} messages, 3 and 5 devices")
    runs: dict[tuple[str, int], dict[str, Any]] = {}
    spy = OUT / "s5_node0.pyspy.txt"
    spy.unlink(missing_ok=True)
    for devices in (3, 5):
        for label, fn in (
            ("y-websocket", lambda d: systems.run_y_websocket(d, n)),
            ("pycrdt-websocket", lambda d: systems.run_pycrdt_ws(d, n)),
            ("ours", lambda d: systems.run_ours(d, n, spy=spy if d == 5 else None)),
        ):
            say(f"  {label}, {devices} devices")
            runs[(label, devices)] = fn(devices)
    r.results["s1"] = {f"{k[0]}/{k[1]}": v for k, v in runs.items()}
    rows = []
    for devices in (3, 5):
        yws = runs[("y-websocket", devices)]["rate_held"]
        for label in ("ours", "y-websocket", "pycrdt-websocket"):
            run = runs[(label, devices)]
            shown = run["rate"] if label == "ours" else None
            cpu = sum(run["cpu_seconds"].values())
            rows.append(
                [
                    devices,
                    run["system"],
                    run["seconds_held"],
                    round(run["rate_held"]),
                    round(shown) if shown else "-",
                    round(cpu, 1),
                    round(cpu / n * 1e6),
                    f"{ratio(run['rate_held'], yws):.2f}x",
                ]
            )
    r.table(
        f"S1 gossip throughput: {n:,} messages from random replicas",
        [
            "devices",
            "system",
            "s until all hold all",
            "msg/s (held)",
            "msg/s (shown)",
            "CPU s, all processes",
            "CPU us/msg",
            "vs y-websocket",
        ],
        rows,
    )
    for devices in (3, 5):
        ours = runs[("ours", devices)]["rate_held"]
        yws = runs[("y-websocket", devices)]["rate_held"]
        pyc = runs[("pycrdt-websocket", devices)]["rate_held"]
        r.note(
            f"S1 {devices} devices: ours / y-websocket = {ratio(ours, yws):.2f}x, "
            f"ours / pycrdt-websocket = {ratio(ours, pyc):.2f}x "
            f"(target >= 1x y-websocket: {verdict(ours >= yws)})"
        )
    fig, ax = plt.subplots(figsize=(8, 4.2))
    labels = ["ours", "y-websocket", "pycrdt-websocket"]
    width = 0.25
    for j, label in enumerate(labels):
        xs = [i + (j - 1) * width for i in range(2)]
        ys = [runs[(label, d)]["rate_held"] for d in (3, 5)]
        bars = ax.bar(xs, ys, width, label=label, color=COLORS[label])
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks([0, 1], ["3 devices", "5 devices"])
    ax.set_ylabel("messages/s until every replica holds all")
    ax.set_title(f"S1 gossip throughput ({n:,} messages, loopback, {os.cpu_count()} cores)")
    ax.legend(fontsize=8)
    r.plot(fig, "s1_gossip.png")
    s5(r, spy)


def s5(r: Report, spy: Path) -> None:
    if not spy.exists():
        r.note("S5: no py-spy samples (py-spy could not attach)")
        return
    cats = profiling.categorise(spy)
    paths = profiling.by_path(spy)
    tops = profiling.top_functions(spy, 15)
    r.results["s5"] = {
        "samples": profiling.samples(spy),
        "categories": cats,
        "paths": paths,
        "top": tops,
    }
    r.table(
        "S5 where the CPU goes: node 0 of the 5-device S1 runs (py-spy, on-CPU samples)",
        ["category", "ours"],
        [[k, f"{v:.1%}"] for k, v in cats.items()],
    )
    r.table(
        "S5 by call path (a sample can be under several)",
        ["path", "ours"],
        [[k, f"{v:.1%}"] for k, v in paths.items() if v],
    )
    r.table(
        "S5 innermost p2p function of each sample, ours (top 15)",
        ["function", "share"],
        [[k, f"{v:.1%}"] for k, v in tops],
    )
    import bench_core

    ingest = bench_core.bench_ingest(10_000, random.Random(7))
    r.results["s5"]["ingest"] = ingest
    r.table(
        "S5 receiving, sans-I/O: open, check, apply and store 10,000 messages (envelopes of 64)",
        ["ours CPU us/msg", "floor: pycrdt apply + one insert per update", "ours / floor"],
        [[f"{ingest['ours_us']:.1f}", f"{ingest['floor_us']:.1f}", f"{ingest['ratio']:.2f}x"]],
    )
    fig, ax = plt.subplots(figsize=(8, 4.2))
    names = list(cats)[::-1]
    ys = range(len(names))
    ax.barh(list(ys), [cats[k] * 100 for k in names], 0.6, color=COLORS["ours"], label="ours")
    ax.set_yticks(list(ys), names, fontsize=8)
    ax.set_xlabel("% of on-CPU samples of node 0")
    ax.set_title("S5 where one node's CPU goes during S1 (5 devices)")
    ax.legend(fontsize=8)
    r.plot(fig, "s5_profile.png")


# ---- S6 + S2 --------------------------------------------------------------------------


def s6_s2(r: Report, n: int) -> None:
    say(f"S6 fan-out: one sender, {n} messages, 2 and 5 devices")
    (OUT / "s6_sender.pyspy.txt").unlink(missing_ok=True)
    runs: dict[tuple[str, int], dict[str, Any]] = {}
    for devices in (2, 5):
        senders = [n] + [0] * (devices - 1)
        spy = OUT / "s6_sender.pyspy.txt" if devices == 5 else None
        runs[("ours", devices)] = systems.run_ours(devices, n, senders=senders, raw=True, spy=spy)
        runs[("y-websocket", devices)] = systems.run_y_websocket(devices, n, senders=senders)
        runs[("pycrdt-websocket", devices)] = systems.run_pycrdt_ws(devices, n, senders=senders)
    r.results["s6"] = {f"{k[0]}/{k[1]}": v for k, v in runs.items()}
    rows = []
    cost: dict[tuple[str, int], float] = {}
    for label in ("ours", "y-websocket", "pycrdt-websocket"):
        for devices in (2, 5):
            run = runs[(label, devices)]
            cpu = run["cpu_seconds"]
            sender = next(v for k, v in cpu.items() if k.endswith("-0"))
            server = sum(v for k, v in cpu.items() if "server" in k)
            out = run["per_device"][0]["final_traffic"]["bytes_out"]
            cost[(label, devices)] = sender / n * 1e6
            rows.append(
                [
                    label,
                    devices,
                    round(sender / n * 1e6),
                    round(server / n * 1e6) if server else "-",
                    round(out / n),
                    run["seconds_held"],
                    round(run["rate_held"]),
                ]
            )
    r.table(
        f"S6 fan-out: one device sends {n:,} messages",
        [
            "system",
            "devices",
            "sender CPU us/msg",
            "server CPU us/msg",
            "sender bytes out/msg",
            "s until all hold all",
            "msg/s",
        ],
        rows,
    )
    for label in ("ours", "y-websocket", "pycrdt-websocket"):
        r.note(
            f"S6 {label}: sender cost 5 devices / 2 devices = "
            f"{ratio(cost[(label, 5)], cost[(label, 2)]):.2f}x"
        )
    spy_file = OUT / "s6_sender.pyspy.txt"
    if spy_file.exists():
        cats = profiling.categorise(spy_file)
        paths = profiling.by_path(spy_file)
        r.results["s6"]["sender_profile"] = {"categories": cats, "paths": paths}
        r.table(
            "S6 where the sender's CPU goes (ours, 5 devices, py-spy)",
            ["category or path", "share"],
            [[k, f"{v:.1%}"] for k, v in cats.items()]
            + [[k, f"{v:.1%}"] for k, v in paths.items() if v],
        )
    fig, ax = plt.subplots(figsize=(7, 4))
    for j, label in enumerate(("ours", "y-websocket", "pycrdt-websocket")):
        xs = [i + (j - 1) * 0.25 for i in range(2)]
        bars = ax.bar(
            xs, [cost[(label, d)] for d in (2, 5)], 0.25, label=label, color=COLORS[label]
        )
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks([0, 1], ["2 devices", "5 devices"])
    ax.set_ylabel("sender CPU per message (us)")
    ax.set_title(f"S6 fan-out: what one sender pays ({n:,} messages)")
    ax.legend(fontsize=8)
    r.plot(fig, "s6_fanout.png")

    # S2 from the same runs: bytes each receiving device took in per message
    raw = next(d["raw"] for d in runs[("ours", 5)]["per_device"] if d.get("raw"))
    r.results["s2"] = {"raw": raw}
    rows = []
    bars: list[tuple[str, float, str]] = [("raw pycrdt update", raw["msg_update"], "raw")]
    for label in ("ours", "y-websocket", "pycrdt-websocket"):
        for devices in (2, 5):
            receivers = runs[(label, devices)]["per_device"][1:]
            per = sum(d["final_traffic"]["bytes_in"] for d in receivers) / len(receivers) / n
            r.results["s2"][f"{label}/{devices}"] = per
            rows.append(
                [
                    label,
                    devices,
                    round(per),
                    round(raw["msg_update"]),
                    f"{per / raw['msg_update']:.2f}x",
                    f"{per / raw['state_per_msg']:.2f}x",
                ]
            )
            bars.append((f"{label}\n{devices} dev", per, label))
    r.table(
        "S2 wire bytes per message per receiving device (one sender, as S6)",
        ["system", "devices", "bytes in/msg", "raw update/msg", "vs raw update", "vs raw state"],
        rows,
    )
    ours2 = r.results["s2"]["ours/2"] / raw["msg_update"]
    ours5 = r.results["s2"]["ours/5"] / raw["msg_update"]
    r.note(
        f"S2 raw pycrdt: one message's own update {raw['msg_update']:.0f} B, whole-document "
        f"update {raw['state_per_msg']:.0f} B per message. Ours / raw update: "
        f"{ours2:.2f}x with 2 devices, {ours5:.2f}x with 5 "
        f"(target <= {TARGETS['s2_ratio']}x: {verdict(ours2 <= 1.3)} / {verdict(ours5 <= 1.3)})"
    )
    fig, ax = plt.subplots(figsize=(8, 4))
    drawn = ax.bar([b[0] for b in bars], [b[1] for b in bars], color=[COLORS[b[2]] for b in bars])
    ax.bar_label(drawn, fmt="%.0f", fontsize=8)
    ax.axhline(raw["msg_update"] * 1.3, color="red", ls="--", lw=1, label="target 1.3x raw")
    ax.set_ylabel("bytes received per message, per device")
    ax.set_title("S2 wire bytes per message per receiving device")
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=8)
    r.plot(fig, "s2_bytes.png")


# ---- S3 -------------------------------------------------------------------------------


def s3(r: Report, a_new: int) -> None:
    import bench_core

    say(f"S3 catch-up: A {a_new} new, B {a_new // 5} new")
    core = bench_core.bench_catchup(a_new, random.Random(7))
    tcp = systems.run_catchup_tcp(a_new, a_new // 5)
    r.results["s3"] = {"sans_io": core, "tcp": tcp}
    r.table(
        f"S3 partition catch-up: A wrote {a_new:,}, B {a_new // 5:,} while apart",
        ["measure", "value", "target"],
        [
            [
                "round trips after the handshake",
                core["round_trips"],
                f"{TARGETS['s3_round_trips']} ({verdict(core['round_trips'] <= 1)})",
            ],
            ["catch-up bytes on the wire (both ways)", core["wire_bytes"], ""],
            ["raw pycrdt diffs (both ways)", core["raw_diff_bytes"], ""],
            [
                "wire / raw",
                f"{core['ratio']:.3f}x",
                f"<= {TARGETS['s3_ratio']}x ({verdict(core['ratio'] <= 1.05)})",
            ],
            ["sans-I/O sessions: CPU time to level", f"{core['seconds'] * 1000:.0f} ms", ""],
            ["two nodes over TCP: dial to both holding all", f"{tcp['seconds_held']:.2f} s", ""],
            ["two nodes over TCP: dial to both showing all", f"{tcp['seconds']:.2f} s", ""],
            ["two nodes over TCP: all bytes, handshake included", tcp["bytes"], ""],
            ["two nodes over TCP: frames", tcp["frames"], ""],
        ],
    )
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3.6))
    bars = ax1.bar(
        ["raw pycrdt diff", "ours (sans-I/O)", "ours (TCP, all)"],
        [core["raw_diff_bytes"] / 1e6, core["wire_bytes"] / 1e6, tcp["bytes"] / 1e6],
        color=[COLORS["raw"], COLORS["ours"], COLORS["ours"]],
    )
    ax1.bar_label(bars, fmt="%.2f", fontsize=8)
    ax1.set_ylabel("MB")
    ax1.set_title("bytes")
    ax1.tick_params(axis="x", labelsize=7)
    bars = ax2.bar(
        ["held (CRDT)", "shown (messages())"],
        [tcp["seconds_held"], tcp["seconds"]],
        color=COLORS["ours"],
    )
    ax2.bar_label(bars, fmt="%.2f", fontsize=8)
    ax2.set_ylabel("seconds from dial")
    ax2.set_title("time over TCP")
    fig.suptitle(f"S3 catch-up: {a_new:,} vs {a_new // 5:,} new messages")
    r.plot(fig, "s3_catchup.png")


# ---- S4 -------------------------------------------------------------------------------


def s4(r: Report, n: int) -> None:
    say(f"S4 cold start: {n} messages")
    with tempfile.TemporaryDirectory(prefix="p2p-cold-") as tmp:
        home, snap_home, state = Path(tmp) / "log", Path(tmp) / "snap", Path(tmp) / "state.bin"
        built = cold_start.build(home, n)
        snapshot = built.pop("state_update")
        state.write_bytes(snapshot)
        cold_start.compacted_copy(home, snap_home, built["space"], snapshot)
        runs = {
            "baseline": [cold_start.in_child("baseline", state) for _ in range(3)],
            "log": [cold_start.in_child("ours", home) for _ in range(3)],
        }
        try:
            runs["snapshot"] = [cold_start.in_child("ours", snap_home) for _ in range(3)]
            snap_error = ""
        except RuntimeError as exc:
            snap_error = str(exc).strip().splitlines()[-1]
        spy = OUT / "s4_open.pyspy.txt"
        spy.unlink(missing_ok=True)
        try:
            cold_start.in_child("ours", home, spy=spy)
        except (RuntimeError, OSError) as exc:  # py-spy may be refused ptrace
            say(f"S4 profile skipped: {str(exc).strip()[-200:]}")
    best = {k: min(v, key=lambda x: x["total_s"]) for k, v in runs.items()}
    r.results["s4"] = {"built": built, "runs": runs, "snapshot_error": snap_error}
    rows = []
    for key, name in (
        (
            "log",
            f"ours: open_node + messages(last=50), {built['log_updates']} updates in the log",
        ),
        ("snapshot", "ours: same, after compaction into one snapshot"),
        ("baseline", "pycrdt: apply one update + last 50 by ts"),
    ):
        if key not in best:
            rows.append([name, "fails to open", "-", "-", "-", "-", "-", "-", "-"])
            continue
        b = best[key]
        rows.append(
            [
                name,
                f"{b['total_s'] * 1000:,.0f}",
                f"{b['open_s'] * 1000:,.0f}",
                f"{b['messages_s'] * 1000:,.0f}",
                f"{b['open_peak_mb']:.0f}",
                f"{b['peak_rss_mb']:.0f}",
                f"{ratio(b['total_s'], best['baseline']['total_s']):.2f}x time",
                f"{b['first_send_s'] * 1000:,.0f}" if "first_send_s" in b else "-",
                f"{b['send_peak_mb']:.0f}" if "send_peak_mb" in b else "-",
            ]
        )
    r.table(
        f"S4 cold start: {n:,} messages (best of 3, fresh process each; imports excluded)",
        [
            "case",
            "ms to last 50",
            "ms open",
            "ms read",
            "MB after open",
            "peak MB to last 50",
            "vs pycrdt",
            "ms first send",
            "peak MB after it",
        ],
        rows,
    )
    ok_t = best["log"]["total_s"] < TARGETS["s4_seconds"]
    ok_m = best["log"]["peak_rss_mb"] < TARGETS["s4_mb"]
    r.note(
        f"S4 targets: < 250 ms ({verdict(ok_t)}), < 200 MB ({verdict(ok_m)}). Snapshot of "
        f"{n:,} messages: {built['snapshot_bytes']:,} B."
        + (f" Compacted store: {snap_error}" if snap_error else "")
    )
    cats = profiling.categorise(spy) if spy.exists() else {}
    paths = profiling.by_path(spy) if spy.exists() else {}
    r.results["s4"]["profile"] = {"categories": cats, "paths": paths}
    if cats:
        r.table(
            "S4 where the cold start's CPU goes (py-spy, log layout, whole child process)",
            ["category", "share"],
            [[k, f"{v:.1%}"] for k, v in cats.items()],
        )
        r.table(
            "S4 by call path",
            ["path", "share"],
            [[k, f"{v:.1%}"] for k, v in paths.items() if v],
        )
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3.6))
    names = [k for k in ("log", "snapshot", "baseline") if k in best]
    label = {"log": "ours (log)", "snapshot": "ours (snapshot)", "baseline": "pycrdt doc"}
    color = {"log": COLORS["ours"], "snapshot": COLORS["ours"], "baseline": COLORS["raw"]}
    opened = [best[k]["open_s"] for k in names]
    read = [best[k]["messages_s"] for k in names]
    ax1.bar([label[k] for k in names], opened, color=[color[k] for k in names], label="open")
    ax1.bar([label[k] for k in names], read, bottom=opened, color="#c6dbef", label="read last 50")
    ax1.axhline(TARGETS["s4_seconds"], color="red", ls="--", lw=1, label="target 0.25 s")
    ax1.set_ylabel("seconds")
    ax1.legend(fontsize=7)
    bars = ax2.bar(
        [label[k] for k in names],
        [best[k]["peak_rss_mb"] for k in names],
        color=[color[k] for k in names],
    )
    ax2.bar_label(bars, fmt="%.0f", fontsize=8)
    ax2.axhline(TARGETS["s4_mb"], color="red", ls="--", lw=1)
    ax2.set_ylabel("peak MB")
    fig.suptitle(
        f"S4 cold start, {n:,} messages" + ("; compacted store fails" if snap_error else "")
    )
    r.plot(fig, "s4_cold_start.png")


# ---- S7 -------------------------------------------------------------------------------


def s7(r: Report, n: int) -> None:
    if not (ROOT / "p2p" / "relay" / "__main__.py").exists():
        r.note("S7 skipped: no p2p/relay/ with `python -m p2p.relay`")
        return
    say(f"S7 relay: 5 devices, {n} messages")
    runs = {
        "direct TCP": systems.run_ours(5, n),
        "one relay": systems.run_relay(5, n),
        "one relay + 1,000 idle devices": systems.run_relay(5, n, idle=1000),
    }
    r.results["s7"] = runs
    direct = runs["direct TCP"]["rate_held"]
    rows = [
        [
            k,
            v["seconds_held"],
            round(v["rate_held"]),
            f"{ratio(v['rate_held'], direct):.2f}x",
            round(v.get("relay_cpu_seconds", 0), 2) if "relay_cpu_seconds" in v else "-",
            f"{v['relay_peak_rss_mb']:.0f}" if "relay_peak_rss_mb" in v else "-",
            round(v["idle_clients_cpu_seconds"], 2) if v.get("idle_connections") else "-",
        ]
        for k, v in runs.items()
    ]
    r.table(
        f"S7 relay: 5 devices, {n:,} messages",
        [
            "path",
            "s until all hold all",
            "msg/s",
            "vs direct TCP",
            "relay CPU s",
            "relay peak MB",
            "idle clients' CPU s",
        ],
        rows,
    )
    fig, ax = plt.subplots(figsize=(8, 3.8))
    bars = ax.bar(
        [k.replace(" + ", "\n+ ") for k in runs],
        [v["rate_held"] for v in runs.values()],
        color=COLORS["ours"],
    )
    ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_ylabel("messages/s until every replica holds all")
    ax.set_title(f"S7 relay: 5 devices, {n:,} messages")
    ax.tick_params(axis="x", labelsize=8)
    r.plot(fig, "s7_relay.png")
    s7_cluster(r, 400 if r.quick else 2000)


def s7_cluster(r: Report, frames: int) -> None:
    """Relay processes sharing one Redis against the single relay: 5 pairs of devices
    streaming 1 KiB frames (every pipe crossing processes when there are several), and
    one process holding 10,000 idle devices with a live pair through it."""
    if shutil.which("redis-server") is None:
        r.note("S7 cluster skipped: redis-server is not installed (make bench installs it)")
        return
    say(f"S7 cluster: 5 pairs x {frames} frames through 1, 2, 3 relay processes")
    runs = {
        "single relay (SQLite)": systems.run_relay_pairs(1, cluster=False, frames=frames),
        "cluster, 1 process": systems.run_relay_pairs(1, cluster=True, frames=frames),
        "cluster, 2 processes": systems.run_relay_pairs(2, cluster=True, frames=frames),
        "cluster, 3 processes": systems.run_relay_pairs(3, cluster=True, frames=frames),
    }
    r.results["s7_cluster"] = runs
    single = runs["single relay (SQLite)"]["frames_per_second"]
    r.table(
        f"S7 cluster: 5 pairs, {frames:,} frames of 1 KiB each",
        ["relay", "frames/s", "vs single", "relay CPU s", "Redis CPU s", "peak MB per process"],
        [
            [
                k,
                round(v["frames_per_second"]),
                f"{ratio(v['frames_per_second'], single):.2f}x",
                round(v["relay_cpu_seconds"], 2),
                round(v["redis_cpu_seconds"], 2),
                f"{v['relay_peak_rss_mb']:.0f}",
            ]
            for k, v in runs.items()
        ],
    )
    idle = 1000 if r.quick else 10_000
    say(f"S7 cluster: {idle:,} idle devices on one process, a live pair through it")
    held = systems.run_relay_idle_per_process(idle, frames=frames)
    r.results["s7_cluster_idle"] = held
    r.table(
        f"S7 cluster: {idle:,} idle devices on one relay process",
        ["idle", "pair alone f/s", "pair with idle f/s", "ratio", "process peak MB"],
        [
            [
                f"{idle:,}",
                round(held["pair_alone_fps"]),
                round(held["pair_with_idle_fps"]),
                f"{held['ratio']:.2f}x",
                f"{held['relay_peak_rss_mb']:.0f}",
            ]
        ],
    )


# ---- S8 + S9 --------------------------------------------------------------------------


class Scale:
    """The account of S9 (and of S8 ``--million``), built once per run: one chat of
    300,000 messages plus 50 chats of 14,000, and a laptop holding the same (1,000,000
    in all; a hundredth with ``--quick``)."""

    def __init__(self, quick: bool, keep: Path | None) -> None:
        self.sizes = [3_000] + [140] * 50 if quick else [300_000] + [14_000] * 50
        self.keep = keep
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._account: dict[str, Any] | None = None

    def account(self) -> dict[str, Any]:
        """Built on first use; with ``--keep-history DIR``, kept there and used again by
        later runs (building 1,000,000 messages takes ~5 minutes on 2 busy cores)."""
        if self._account is not None:
            return self._account
        saved = self.keep / f"account-{sum(self.sizes)}.json" if self.keep else None
        if saved is not None and saved.exists():
            account = json.loads(saved.read_text())
            for k in ("phone", "laptop"):
                account[k] = Path(account[k])
            account["snapshots"] = [Path(p) for p in account["snapshots"]]
            say(f"using the {sum(self.sizes):,} messages kept in {saved.parent}")
        else:
            if saved is not None:
                where = saved.with_suffix("")
                shutil.rmtree(where, ignore_errors=True)
            else:
                self._tmp = tempfile.TemporaryDirectory(prefix="p2p-scale-")
                where = Path(self._tmp.name)
            say(f"building {sum(self.sizes):,} messages in {len(self.sizes)} chats")
            account = history_scale.build_account(where, self.sizes, laptop=True)
            say(f"  built in {account['build_s']} s")
            if saved is not None:
                saved.write_text(json.dumps(account, default=str))
        self._account = account
        return account

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def s8(r: Report, n: int) -> None:
    """A new device joins a history of ``n`` messages: ours links, y-websocket syncs."""
    say(f"S8 join with history: {n:,} messages")
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "y-websocket": []}
    with tempfile.TemporaryDirectory(prefix="p2p-join-") as tmp:
        account = history_scale.build_account(Path(tmp), [n], laptop=False)
        for i in range(2):  # interleaved, the best of each: the machine is shared
            runs["y-websocket"].append(
                history_scale.yws_join(account["snapshots"], [n], timeout=900)
            )
            phone = Path(tmp) / f"phone-{i}"  # each link from the same state
            shutil.copytree(account["phone"], phone)
            runs["ours"].append(history_scale.ours_join(phone, Path(tmp), timeout=900))
            shutil.rmtree(phone)
    best = {k: min(v, key=lambda x: x.get("seconds") or 1e9) for k, v in runs.items()}
    ours, yws = best["ours"], best["y-websocket"]
    r.results["s8"] = {"messages": n, "built": _built(account), "runs": runs}
    cap = TARGETS["history_mb"]
    r.table(
        f"S8 join with history: a new device gets {n:,} messages, best of 2 "
        f"({account['crdt_bytes'] / 1e6:.1f} MB of CRDT)",
        ["system", "result", "s", "msg/s", "CPU s", "holder peak MB", "new device peak MB"],
        [
            [
                "ours: p2p approve -> p2p link (SQLite both sides)",
                "ok" if ours.get("ok") else f"FAILED {ours.get('why', '')[:60]}",
                ours.get("seconds", "-"),
                round(n / ours["seconds"]) if ours.get("ok") else "-",
                ours["cpu_s"],
                ours["phone_mb"],
                ours["new_mb"],
            ],
            [
                "y-websocket: server holding the room -> new client",
                "ok" if yws["ok"] else f"FAILED {yws['why']}",
                yws["seconds"],
                round(n / yws["seconds"]) if yws["ok"] else "-",
                yws["cpu_s"],
                f"{yws['server_mb']} (holding it: {yws['server_held_mb']})",
                yws["client_mb"],
            ],
        ],
    )
    if ours.get("ok") and yws["ok"]:
        worst = max(ours["phone_mb"], ours["new_mb"])
        r.note(
            f"S8 ours / y-websocket (best of 2 each): "
            f"{ratio(ours['seconds'], yws['seconds']):.1f}x the time, "
            f"{ratio(ours['cpu_s'], yws['cpu_s']):.1f}x the CPU, "
            f"{ratio(ours['phone_mb'], yws['server_mb']):.1f}x holder memory, "
            f"{ratio(ours['new_mb'], yws['client_mb']):.1f}x new-device memory "
            f"(target <= {cap} MB per process: {verdict(worst <= cap)}, {worst:.0f} MB)"
        )


def s8_million(r: Report, scale: Scale) -> None:
    """Ours alone: link a new device to the account of S9, as built (every chat a log
    of updates), then with its largest chat folded into a snapshot (as a phone in use
    holds it: a loaded chat folds once its log grows long)."""
    account = scale.account()
    n = sum(account["sizes"])
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="p2p-million-") as tmp:
        for shape in ("logs", "folded"):
            phone = Path(tmp) / "phone"  # a copy: the kept account gets no third device
            shutil.rmtree(phone, ignore_errors=True)
            shutil.copytree(account["phone"], phone)
            folded = history_scale.fold_largest_chat(phone) if shape == "folded" else None
            say(
                f"S8 --million ({shape}): linking a new device to {n:,} messages"
                f" in {len(account['sizes'])} chats"
                + (f"; {folded['chat']} folded into {folded['bytes']:,} B" if folded else "")
            )
            runs[shape] = history_scale.ours_join(phone, Path(tmp), timeout=3600)
            runs[shape]["folded"] = folded
    r.results["s8_million"] = {"messages": n, "runs": runs}
    r.table(
        f"S8 join with history, ours alone: {n:,} messages in {len(account['sizes'])} chats",
        [
            "chats stored as",
            "result",
            "s",
            "msg/s",
            "CPU s",
            "phone peak MB",
            "new device peak MB",
            "new device holds",
        ],
        [
            [
                "update logs"
                if ours["folded"] is None
                else f"largest folded: {ours['folded']['parts']} parts,"
                f" {ours['folded']['bytes'] / 1e6:.0f} MB",
                "ok" if ours.get("ok") else f"FAILED {ours.get('why', '')[:60]}",
                ours.get("seconds", "-"),
                round(n / ours["seconds"]) if ours.get("ok") else "-",
                ours["cpu_s"],
                ours["phone_mb"],
                ours["new_mb"],
                ours["held"],
            ]
            for ours in runs.values()
        ],
    )
    t, cap = TARGETS["link_million_s"], TARGETS["history_mb"]
    for shape, ours in runs.items():
        if ours.get("ok"):
            worst = max(ours["phone_mb"], ours["new_mb"])
            r.note(
                f"S8 {n:,} ({shape}) targets: <= {t} s ({verdict(ours['seconds'] <= t)}, "
                f"{ours['seconds']:.0f} s), <= {cap} MB per process "
                f"({verdict(worst <= cap)}, {worst:.0f} MB)"
            )


def _catchup_shape(shape: str, run: dict[str, Any]) -> str:
    if run["folded"] is not None:
        return f"folded: {run['folded']['parts']} parts"
    if run["held_before"]:
        return f"logs, laptop held {run['held_before']:,} before"
    return shape


def s8_catchup(r: Report, n: int) -> None:
    """Ours alone: a companion away while ``n`` messages were written comes level, from
    the phone's chat as update logs and folded into a snapshot (as a phone in use folds
    a loaded chat), and from logs into a laptop that held the chat's first messages
    before it went away (the reaction it saw then changes while it is away)."""
    say(f"S8 catch-up: a companion away while {n:,} messages were written to one chat")
    runs: dict[str, dict[str, Any]] = {}
    # the "held" shape: the laptop took the chat's first 20,000 (of 300,000) first
    held = max(1, n // 15 // history_scale.BATCH) * history_scale.BATCH
    for shape in ("logs", "folded", "held"):
        with tempfile.TemporaryDirectory(prefix="p2p-catchup-") as tmp:
            runs[shape] = history_scale.ours_catchup(
                Path(tmp),
                n,
                timeout=1800,
                fold=shape == "folded",
                held=held if shape == "held" else 0,
            )
    r.results["s8_catchup"] = runs
    ours = runs["logs"]
    r.table(
        f"S8 catch-up, ours alone: {n:,} messages in one chat "
        f"({ours['crdt_bytes'] / 1e6:.1f} MB of CRDT), p2p run on both devices",
        [
            "phone's chat stored as",
            "result",
            "s",
            "msg/s",
            "phone peak MB",
            "laptop peak MB",
            "laptop holds",
        ],
        [
            [
                _catchup_shape(shape, run),
                "ok" if run["ok"] else f"FAILED {run['why'][:60]}",
                run["seconds"],
                run["msg_per_s"],
                run["phone_mb"],
                run["laptop_mb"],
                run["held"],
            ]
            for shape, run in runs.items()
        ],
    )
    rate, cap = TARGETS["catchup_msg_s"], TARGETS["history_mb"]
    for shape, run in runs.items():
        if run["ok"]:
            worst = max(run["phone_mb"], run["laptop_mb"])
            r.note(
                f"S8 catch-up ({shape}) targets: >= {rate:,} msg/s "
                f"({verdict(run['msg_per_s'] >= rate)}, {run['msg_per_s']:,}), "
                f"<= {cap} MB per process ({verdict(worst <= cap)}, {worst:.0f} MB)"
            )


def _built(account: dict[str, Any]) -> dict[str, Any]:
    keep = ("sizes", "crdt_bytes", "build_s", "builder_peak_mb", "db_mb")
    return {k: account[k] for k in keep}


def _yws_rest(snapshots: list[Path], sizes: list[int], live: int) -> dict[str, Any]:
    try:
        return history_scale.yws_rest(snapshots, sizes, live, 1800)
    except (RuntimeError, TimeoutError) as exc:  # the baseline may not hold it all
        text = str(exc).strip()
        why = text.splitlines()[0][:120]
        if "heap out of memory" in text:
            why += ": JavaScript heap out of memory"
        return {"ok": False, "why": why}


def _rest_rows(ours: dict[str, Any], yws: dict[str, Any], n: int) -> list[list[Any]]:
    return [
        [
            f"{n:,}",
            "ours: p2p run, laptop connected and level",
            "ok" if ours.get("ok") else f"FAILED {ours.get('why', '')[:60]}",
            ours.get("phone_rest_mb", "-"),
            ours.get("phone_live_mb", "-"),
            ours.get("phone_peak_mb", "-"),
            f"{ours.get('laptop_rest_mb', '-')} (peak {ours.get('laptop_peak_mb', '-')})",
        ],
        [
            f"{n:,}",
            "y-websocket server, one client in every room",
            "ok" if yws.get("ok") else f"FAILED {yws.get('why', '')[:80]}",
            yws.get("server_rest_mb", "-"),
            yws.get("server_live_mb", "-"),
            yws.get("server_peak_mb", "-"),
            f"{yws.get('client_rest_mb', '-')} (peak {yws.get('client_peak_mb', '-')})",
        ],
    ]


def s9(r: Report, scale: Scale) -> None:
    """Memory at rest with one peer, against y-websocket; cold start at that scale."""
    account = scale.account()
    sizes = account["sizes"]
    n = sum(sizes)
    say(f"S9 cold start: {n:,} messages, {len(sizes)} chats")
    big = history_scale.cold_start(account["phone"], account["spaces"][0])
    small = history_scale.cold_start(account["phone"], account["spaces"][1])
    base = [cold_start.in_child("baseline", account["snapshots"][0]) for _ in range(3)]
    pycrdt = min(base, key=lambda x: x["total_s"])
    say(f"S9 memory at rest: {n:,} messages, ours and y-websocket")
    live = 10
    ours = history_scale.ours_rest(account, live, 1800, ["notes", "chat 00", "chat 01"])
    yws = _yws_rest(account["snapshots"], sizes, live)
    r.results["s9"] = {
        "built": _built(account),
        "cold_big": big,
        "cold_small": small,
        "pycrdt_big": pycrdt,
        "ours": ours,
        "y-websocket": yws,
    }
    tenth: dict[str, Any] = {}
    if not yws["ok"] and not r.quick:  # the baseline cannot hold it: both at a tenth
        tenth["sizes"] = [k // 10 for k in sizes]
        say(f"S9 again at {sum(tenth['sizes']):,} messages (y-websocket: {yws['why']})")
        with tempfile.TemporaryDirectory(prefix="p2p-scale-") as tmp:
            small_account = history_scale.build_account(Path(tmp), tenth["sizes"], laptop=True)
            tenth["ours"] = history_scale.ours_rest(
                small_account, live, 900, ["notes", "chat 00", "chat 01"]
            )
            tenth["y-websocket"] = _yws_rest(small_account["snapshots"], tenth["sizes"], live)
        r.results["s9"]["tenth"] = tenth
    cap, t = TARGETS["history_mb"], TARGETS["history_s"]
    rows = []
    for label, c in (
        (f"chat of {sizes[0]:,}", big["best"]),
        (f"chat of {sizes[1]:,}", small["best"]),
    ):
        rows.append(
            [
                label,
                f"{c['open_s'] * 1000:,.0f}",
                f"{c['read_s'] * 1000:,.1f}",
                f"{c['read_mb']:.0f}",
                f"{c['send_s'] * 1000:,.0f}",
                f"{c['send_mb']:.0f}",
                f"{verdict(c['read_s'] <= t)} / {verdict(c['send_s'] <= t)} / "
                f"{verdict(c['send_mb'] <= cap)}",
            ]
        )
    rows.append(
        [
            f"pycrdt alone: apply the chat of {sizes[0]:,}, last 50",
            f"{pycrdt['open_s'] * 1000:,.0f}",
            f"{pycrdt['messages_s'] * 1000:,.0f}",
            f"{pycrdt['peak_rss_mb']:.0f}",
            "-",
            "-",
            "",
        ]
    )
    r.table(
        f"S9 cold start with {n:,} messages in {len(sizes)} chats (best of 3 fresh processes)",
        [
            "chat",
            "ms open_node",
            "ms newest 50",
            "peak MB after",
            "ms first send",
            "peak MB after",
            f"<= {t * 1000:.0f} ms read / send, <= {cap} MB",
        ],
        rows,
    )
    ok = ours.get("ok") and yws.get("ok")
    rows = _rest_rows(ours, yws, n)
    if tenth:
        rows += _rest_rows(tenth["ours"], tenth["y-websocket"], sum(tenth["sizes"]))
    r.table(
        f"S9 memory of a node holding {n:,} messages in {len(sizes)} chats, one peer connected",
        [
            "messages",
            "system",
            "result",
            "at rest MB",
            f"after {live} live msgs MB",
            "peak MB",
            "peer MB",
        ],
        rows,
    )
    if tenth and tenth["ours"].get("ok") and tenth["y-websocket"].get("ok"):
        r.note(
            f"S9 at {sum(tenth['sizes']):,}: ours / y-websocket server at rest: "
            f"{ratio(tenth['ours']['phone_rest_mb'], tenth['y-websocket']['server_rest_mb']):.2f}x"
        )
    if ours.get("ok"):
        r.note(
            f"S9 ours: connected and idle {ours['level_idle_s']} s after the phone's start"
            f" (leveled first in {ours['leveling_s']} s); target <= {cap} MB at rest: "
            f"{verdict(ours['phone_rest_mb'] <= cap)} ({ours['phone_rest_mb']:.0f} MB), "
            f"with live traffic: {verdict(ours['phone_peak_mb'] <= cap)} "
            f"(peak {ours['phone_peak_mb']:.0f} MB)"
            + (
                f"; ours / y-websocket server at rest: "
                f"{ratio(ours['phone_rest_mb'], yws['server_rest_mb']):.2f}x"
                if ok
                else ""
            )
        )


def main() -> None:
    parser = argparse.ArgumentParser(description="p2p benchmarks against its peers")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2,000 messages")
    parser.add_argument("--only", default="", help="e.g. S1,S4 (S5 comes with S1, S2 with S6)")
    parser.add_argument("--publish", action="store_true", help="copy the plots to docs/img/")
    parser.add_argument(
        "--million", action="store_true", help="S8 also links 1,000,000 messages (minutes)"
    )
    parser.add_argument(
        "--keep-history",
        type=Path,
        help="keep the 1,000,000-message account of S9 here and use it again next time",
    )
    args = parser.parse_args()
    only = {s.strip().upper() for s in args.only.split(",") if s.strip()}

    def want(name: str) -> bool:
        # S8M: asked for by --million; S8C (the catch-up) comes with S8, or alone
        return not only or name in only or name == "S8M" or (name == "S8C" and "S8" in only)

    OUT.mkdir(exist_ok=True)
    n = 2_000 if args.quick else 10_000
    r = Report(args.quick)
    m = r.results["machine"]
    say(f"p2p benchmarks: {m['nproc']} CPUs ({m['cpu']}), load average {m['loadavg_start']}")
    started = time.monotonic()
    steps = [
        ("S1", lambda: s1(r, n)),
        ("S6", lambda: s6_s2(r, n)),
        ("S3", lambda: s3(r, n)),
        ("S4", lambda: s4(r, 10_000 if args.quick else 100_000)),
        ("S7", lambda: s7(r, n // 2 if not args.quick else n)),
        ("S8", lambda: s8(r, 10_000 if args.quick else 100_000)),
        ("S8C", lambda: s8_catchup(r, 3_000 if args.quick else 300_000)),
        ("S9", lambda: s9(r, scale)),
    ]
    if args.million:  # after S9, on the account it built
        steps.append(("S8M", lambda: s8_million(r, scale)))
    scale = Scale(args.quick, args.keep_history)
    try:
        for name, step in steps:
            if want(name):
                t0 = time.monotonic()
                step()
                durations = r.results.setdefault("durations", {})
                durations[name] = durations.get(name, 0) + time.monotonic() - t0
                r.save()
    finally:
        scale.close()
    r.note(f"\nTotal {time.monotonic() - started:.0f} s.")
    r.save()
    if args.publish:
        img = ROOT / "docs" / "img"
        img.mkdir(parents=True, exist_ok=True)
        for png in OUT.glob("*.png"):
            shutil.copy(png, img / png.name)
        say(f"copied plots to {img}")


if __name__ == "__main__":
    main()
