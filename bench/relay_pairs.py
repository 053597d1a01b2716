"""S7 cluster load: pairs of devices streaming frames to each other through relay processes.

Two roles, each one process holding one side of every pair (so the relay processes, not
one client process, are what is measured):

    python relay_pairs.py receive --pairs P --frames N --urls U1,U2,... [--id ID]
    python relay_pairs.py send --pairs P --frames N --size S --urls ... --to D1,D2,... [--id ID]

Pair i's receiver connects to ``urls[(i + 1) % k]`` and its sender to ``urls[i % k]``,
so with k > 1 processes every pipe crosses from one process to another (through Redis).
The receiver prints ``{"event": "ready", "devices": [...]}`` once connected, then
``{"event": "done", "t_last": ..., "frames": ...}`` once every pipe delivered N frames.
The sender prints ``ready`` once its pipes are open, waits for a line on stdin (go),
streams, and prints ``{"event": "sent", "t_go": ...}``. Wall-clock times (one machine).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import trio

from p2p.proto.identity import DeviceKeys
from p2p.transport.base import Connection, ConnectionClosed
from p2p.transport.relay import RelayClient, relay_address


def say(event: dict[str, object]) -> None:
    print(json.dumps(event), flush=True)


async def receive(args: argparse.Namespace) -> None:
    urls = args.urls.split(",")
    clients = [
        RelayClient(urls[(i + 1) % len(urls)], DeviceKeys.generate(), relay_id=args.id)
        for i in range(args.pairs)
    ]
    done = trio.Event()
    counts = [0] * args.pairs
    last = [0.0]

    def handler_for(i: int) -> object:
        async def handler(conn: Connection) -> None:
            try:
                while counts[i] < args.frames:
                    await conn.receive()
                    counts[i] += 1
                last[0] = time.time()
                if all(c >= args.frames for c in counts):
                    done.set()
                await trio.sleep_forever()
            except ConnectionClosed:
                pass

        return handler

    async with trio.open_nursery() as nursery:
        for i, client in enumerate(clients):
            await nursery.start(client.serve, handler_for(i))
        with trio.fail_after(60):
            for client in clients:
                await client.wait_connected()
        say({"event": "ready", "devices": [c.device_id for c in clients]})
        with trio.fail_after(args.timeout):
            await done.wait()
        say({"event": "done", "t_last": last[0], "frames": sum(counts)})
        nursery.cancel_scope.cancel()


async def send(args: argparse.Namespace) -> None:
    urls = args.urls.split(",")
    targets = args.to.split(",")
    clients = [
        RelayClient(urls[i % len(urls)], DeviceKeys.generate(), relay_id=args.id)
        for i in range(args.pairs)
    ]

    async def refuse(conn: Connection) -> None:
        await conn.aclose()

    frame = b"x" * args.size
    async with trio.open_nursery() as nursery:
        for client in clients:
            await nursery.start(client.serve, refuse)
        with trio.fail_after(60):
            for client in clients:
                await client.wait_connected()
            pipes = [await c.dial(relay_address(t)) for c, t in zip(clients, targets, strict=True)]
        say({"event": "ready"})
        await trio.to_thread.run_sync(sys.stdin.readline)
        t_go = time.time()

        async def stream(pipe: Connection) -> None:
            for _ in range(args.frames):
                await pipe.send(frame)

        async with trio.open_nursery() as senders:
            for pipe in pipes:
                senders.start_soon(stream, pipe)
        say({"event": "sent", "t_go": t_go, "t_sent": time.time()})
        await trio.to_thread.run_sync(sys.stdin.readline)
        nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["send", "receive"])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--urls", required=True)
    parser.add_argument("--to", default="")
    parser.add_argument("--id", default=None)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    trio.run(receive if args.role == "receive" else send, args)


if __name__ == "__main__":
    main()
