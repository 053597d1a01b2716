"""One p2p device as a benchmark process: a real node over loopback TCP, encrypted.

Started by ``bench/run.py`` (never by hand, though it can be). It speaks JSON lines:

1. opens ``p2p.open_node(home, transport=TcpTransport("127.0.0.1:0"))`` and prints
   ``{"event": "listening", "address", "device"}``;
2. reads ``{"peers": [address, ...]}`` on stdin, dials them (static peers, no mDNS), and
   prints ``{"event": "ready"}`` once it holds ``--expect-peers`` sessions;
3. on the line ``go`` it sends its ``--count`` messages through ``Node.send`` with
   ``--concurrency`` tasks (each send awaits its own durable commit; the node's group
   commit and gossip coalescing do the batching), then polls the chat until it holds
   ``--total`` messages and prints ``{"event": "done", ...}`` with wall-clock
   timestamps, traffic and CPU time (with ``--offline``, S3, it first reads them all
   with ``Node.messages()``);
4. answers ``stats`` (its traffic) and ``show`` (reads every message with
   ``Node.messages()``, timed: ``{"event": "shown", "read_seconds"}``), which the
   orchestrator sends once every node is done, one node at a time;
5. exits on end of input (the orchestrator keeps every node up until all are done:
   nodes forward each other's gossip).

``--profile FILE`` runs cProfile from ``go`` to ``done`` and dumps the stats there.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any

import pycrdt
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import body, peak_rss_mb

import p2p
from p2p.transport.tcp import TcpTransport


def say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def readline() -> str:
    return await trio.to_thread.run_sync(sys.stdin.readline)


def raw_sizes(node: p2p.Node, sample: int) -> dict[str, float]:
    """Raw pycrdt sizes of the messages this node holds, for S2.

    ``msg_update``: mean size of one message's own pycrdt update (one map set, one
    transaction, appended to a document that already holds the earlier ones), the unit
    y-websocket and pycrdt-websocket put on the wire. ``state_per_msg``: the whole
    document's update divided by the message count (the floor for a batched transfer).
    """
    space = node.state.space(node.default_chat())
    doc = space.replica.doc
    items = list(doc.get("m", type=pycrdt.Map).items())
    fresh: pycrdt.Doc[Any] = pycrdt.Doc()
    m = fresh.get("m", type=pycrdt.Map)
    sizes = []
    for key, value in items[:sample]:
        before = fresh.get_state()
        m[key] = dict(value)
        sizes.append(len(fresh.get_update(before)))
    return {
        "msg_update": sum(sizes) / max(1, len(sizes)),
        "state_per_msg": len(doc.get_update()) / max(1, len(items)),
    }


async def run(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    bodies = [body(rng) for _ in range(args.count)]
    transport: Any = TcpTransport("127.0.0.1:0")
    if args.relay:  # S7: every connection goes through the relay (pipes over a websocket)
        from p2p.runtime.home import open_home_store
        from p2p.state.device import DeviceState
        from p2p.transport.relay import RelayClient

        store = open_home_store(args.home)
        try:
            keys = DeviceState.load(store).keys
        finally:
            store.close()
        transport = RelayClient(args.relay, keys)
    async with p2p.open_node(args.home, transport=transport) as node:
        if args.relay:
            with trio.fail_after(30):
                await transport.wait_connected()
        space = node.state.space(node.default_chat())

        async def send_all() -> None:
            todo = iter(bodies)

            async def sender() -> None:
                for text in todo:
                    await node.send(text)

            async with trio.open_nursery() as nursery:
                for _ in range(max(1, min(args.concurrency, args.count))):
                    nursery.start_soon(sender)

        if args.offline:  # S3: write the history alone, then meet the peers
            await send_all()
        say(event="listening", address=node.address, device=node.device_id)
        peers = json.loads(await readline())["peers"]
        t_connect = time.time()
        traffic0 = node.traffic()
        for address in peers:
            await node.connect(address)
        with trio.fail_after(60):
            while len(node.connected_peers) < args.expect_peers:  # noqa: ASYNC110
                await trio.sleep(0.01)
        start_count = 0 if args.offline else space.replica.count()
        profiler = cProfile.Profile() if args.profile else None
        if args.offline:
            t_go = t_sent = t_connect
            cpu0 = cpu_seconds()
        else:
            say(event="ready", held=start_count, traffic=node.traffic())
            if (await readline()).strip() != "go":
                return
            traffic0 = node.traffic()
            cpu0 = cpu_seconds()
            t_go = time.time()
            if profiler:
                profiler.enable()
            await send_all()
            t_sent = time.time()
        cpu_sent = cpu_seconds()
        while space.replica.count() < args.total + start_count:  # noqa: ASYNC110
            await trio.sleep(0.002)
        t_held = time.time()
        # in a race, the full read waits for "show" (after every node holds all): a node
        # that finished early must not take CPU from those still receiving, which the
        # baselines' clients (they read nothing) do not either
        read: dict[str, Any] = {}
        if args.offline:
            read["shown"] = len(node.messages())
            read["t_shown"] = time.time()
        if profiler:
            profiler.disable()
            profiler.dump_stats(args.profile)
        cpu_done = cpu_seconds()
        traffic = node.traffic()
        say(
            event="done",
            device=node.device_id,
            sent=args.count,
            t_go=t_go,
            t_sent=t_sent,
            t_held=t_held,
            **read,
            cpu_send=cpu_sent - cpu0,
            cpu_total=cpu_done - cpu0,
            traffic={k: traffic[k] - traffic0[k] for k in traffic},
            peak_rss_mb=peak_rss_mb(),
            raw=raw_sizes(node, 500) if args.raw else None,
        )
        while line := await readline():  # until the orchestrator closes our stdin
            if line.strip() == "stats":  # asked once every node is done
                traffic = node.traffic()
                say(event="stats", traffic={k: traffic[k] - traffic0[k] for k in traffic})
            elif line.strip() == "show":  # then, one node at a time: the full read
                t_read = time.perf_counter()
                shown = len(node.messages())
                say(event="shown", shown=shown, read_seconds=time.perf_counter() - t_read)


def main() -> None:
    parser = argparse.ArgumentParser(description="one p2p node for the benchmarks")
    parser.add_argument("--home", required=True)
    parser.add_argument("--count", type=int, required=True, help="messages this node sends")
    parser.add_argument("--total", type=int, required=True, help="messages all nodes send")
    parser.add_argument("--expect-peers", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", default="")
    parser.add_argument("--raw", action="store_true", help="report raw pycrdt sizes (S2)")
    parser.add_argument("--relay", default="", help="connect through this relay URL (S7)")
    parser.add_argument(
        "--offline", action="store_true", help="send before meeting the peers (S3 catch-up)"
    )
    trio.run(run, parser.parse_args())


if __name__ == "__main__":
    main()
