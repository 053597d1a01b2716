"""S7 load: ``COUNT`` idle devices held connected to a relay
(``python relay_idle.py URL COUNT [RELAY_ID]``).

Each is a ``RelayClient`` with its own fresh device key, authenticated to the relay and
keeping its websocket alive with the client's own pings, and nothing else. Prints
``{"event": "ready", "connected": n}`` once all are connected; exits on end of input.
"""

from __future__ import annotations

import json
import sys

import trio

from p2p.proto.identity import DeviceKeys
from p2p.transport.relay import RelayClient

WAVE = 200


async def refuse(conn: object) -> None:
    await conn.aclose()  # type: ignore[attr-defined]


async def main(url: str, count: int, relay_id: str | None = None) -> None:
    clients = [RelayClient(url, DeviceKeys.generate(), relay_id=relay_id) for _ in range(count)]
    async with trio.open_nursery() as nursery:
        with trio.fail_after(120 + count / 20):
            # in waves: thousands of handshakes at once would only meet the relay's
            # --max-handshakes and back off
            for start in range(0, count, WAVE):
                wave = clients[start : start + WAVE]
                for client in wave:
                    await nursery.start(client.serve, refuse)
                for client in wave:
                    await client.wait_connected()
        print(json.dumps({"event": "ready", "connected": count}), flush=True)
        while await trio.to_thread.run_sync(sys.stdin.readline):
            pass
        print(
            json.dumps({"event": "done", "connected": sum(c.connected for c in clients)}),
            flush=True,
        )
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main, sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
