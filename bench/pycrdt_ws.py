"""Baseline: pycrdt-websocket. ``server`` runs a ``WebsocketServer`` (one room), ``client``
is one device: a pycrdt ``Doc`` synced by ``pycrdt.Provider`` through the room.

Both speak JSON lines like ``node_driver.py``: the server prints ``listening`` with its
URL; a client prints ``ready`` once synced, sends its ``--count`` messages on ``go``
(each one map set, one transaction, one websocket message through the provider), waits
until its map holds ``--total`` entries and prints ``done`` with wall-clock timestamps
and the websocket bytes it sent and received. Both exit on end of input.

The websocket library is ``websockets`` (asyncio); the two small adapters below give
its connections the ``Channel`` interface pycrdt and pycrdt-websocket expect.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import pycrdt
from pycrdt.websocket import WebsocketServer
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import body, peak_rss_mb

ROOM = "chat"


def say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def message_value(rng: random.Random, device: str, i: int) -> tuple[str, dict[str, str]]:
    """A chat entry shaped like ours (same fields and sizes, signature bytes random)."""
    mid = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz234567", k=16))
    sig = "".join(
        rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/", k=86)
    )
    value = {
        "id": mid,
        "k": "msg",
        "a": "accountaccountac",
        "d": device,
        "ts": f"{1_767_225_600_000 + i:013d}.{i % 1_000_000:06d}",
        "t": "",
        "b": body(rng),
        "sig": sig + "==",
    }
    return mid, value


class Channel:
    """A ``websockets`` connection as a pycrdt ``Channel``, counting bytes."""

    def __init__(self, ws: Any, path: str) -> None:
        self._ws = ws
        self._path = path
        self.bytes_in = 0
        self.bytes_out = 0
        self.frames_in = 0
        self.frames_out = 0

    @property
    def path(self) -> str:
        return self._path

    def __aiter__(self) -> Channel:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self.recv()
        except ConnectionClosed:
            raise StopAsyncIteration from None

    async def send(self, message: bytes) -> None:
        self.bytes_out += len(message)
        self.frames_out += 1
        await self._ws.send(message)

    async def recv(self) -> bytes:
        data = await self._ws.recv()
        message = data if isinstance(data, bytes) else data.encode()
        self.bytes_in += len(message)
        self.frames_in += 1
        return message


async def stdin_lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def run_server() -> None:
    async with WebsocketServer(auto_clean_rooms=False) as room_server:

        async def handler(ws: ServerConnection) -> None:
            assert ws.request is not None
            await room_server.serve(Channel(ws, ws.request.path))

        async with serve(handler, "127.0.0.1", 0, max_size=None, compression=None) as server:
            port = next(iter(server.sockets)).getsockname()[1]
            say(event="listening", url=f"ws://127.0.0.1:{port}")
            reader = await stdin_lines()
            while await reader.readline():
                pass


async def run_client(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    device = f"device{args.seed:010d}"[-16:]
    values = [message_value(rng, device, i) for i in range(args.count)]
    reader = await stdin_lines()
    doc: pycrdt.Doc[Any] = pycrdt.Doc()
    messages = doc.get("m", type=pycrdt.Map)
    async with connect(f"{args.url}/{ROOM}", max_size=None, compression=None) as ws:
        channel = Channel(ws, ROOM)
        async with pycrdt.Provider(doc, channel) as provider:
            await provider.synced.wait()
            start = len(messages)
            say(event="ready", held=start)
            if (await reader.readline()).strip() != b"go":
                return
            in0, out0 = channel.bytes_in, channel.bytes_out
            t_go = time.time()
            cpu0 = time.process_time()
            for i, (key, value) in enumerate(values):
                messages[key] = value  # one transaction, one update on the wire
                if i % 50 == 49:
                    await asyncio.sleep(0)  # let the provider send
            t_sent = time.time()
            while len(messages) < args.total + start:  # noqa: ASYNC110
                await asyncio.sleep(0.002)
            t_held = time.time()
            say(
                event="done",
                sent=args.count,
                t_go=t_go,
                t_sent=t_sent,
                t_held=t_held,
                cpu_total=time.process_time() - cpu0,
                traffic={
                    "bytes_in": channel.bytes_in - in0,
                    "bytes_out": channel.bytes_out - out0,
                },
                peak_rss_mb=peak_rss_mb(),
            )
            while line := await reader.readline():
                if line.strip() == b"stats":  # asked once every client is done
                    say(
                        event="stats",
                        traffic={
                            "bytes_in": channel.bytes_in - in0,
                            "bytes_out": channel.bytes_out - out0,
                        },
                    )


def main() -> None:
    parser = argparse.ArgumentParser(description="pycrdt-websocket baseline")
    parser.add_argument("role", choices=["server", "client"])
    parser.add_argument("--url", default="")
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--total", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(run_server() if args.role == "server" else run_client(args))


if __name__ == "__main__":
    main()
