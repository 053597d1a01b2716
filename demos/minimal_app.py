"""A minimal chat app on the p2p engine: type a line to send it, see what others send.

    python demos/minimal_app.py --home /tmp/phone                  # first run: new account
    python demos/minimal_app.py --home /tmp/laptop --peer HOST:PORT

The second device must belong to the same account. Link it first:
``p2p --home /tmp/laptop link --name laptop`` shows a code, then
``p2p --home /tmp/phone approve CODE`` links it (through this app's control socket,
which lets the ``p2p`` command work on the home while the app holds it). Ctrl-D quits
cleanly. See docs/embedding.md.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import trio

import p2p
from p2p.app.control import serve_control
from p2p.transport.tcp import TcpTransport, advertised_addresses


def show_new(node: p2p.Node, seen: set[str]) -> None:
    for m in node.messages():
        if m.id not in seen:
            seen.add(m.id)
            if m.device != node.device_id:  # our own lines are on the screen already
                print(f"[{m.device}] {m.text}", flush=True)


async def show_incoming(node: p2p.Node, events: trio.MemoryReceiveChannel[p2p.Event]) -> None:
    seen = {m.id for m in node.messages()}
    with events:
        async for event in events:
            if isinstance(event, p2p.ChatChanged):
                show_new(node, seen)
            elif isinstance(event, p2p.PeerConnected):
                print(f"* connected to {event.device}", flush=True)
            elif isinstance(event, p2p.PeerDisconnected):
                print(f"* disconnected from {event.device}", flush=True)


async def main(home: Path, name: str, listen: str, peers: list[str]) -> None:
    with contextlib.suppress(p2p.AlreadyInitialized):  # only the first run creates it
        p2p.init_account(home, name)
    transport = TcpTransport(listen)
    async with p2p.open_node(home, transport=transport, peers=peers) as node:
        for m in node.messages()[-10:]:
            print(f"[{m.device}] {m.text}")
        where = " ".join(advertised_addresses(transport.address))
        print(f"{node.device_id} listening on {where} (type to send, Ctrl-D quits)", flush=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(show_incoming, node, node.subscribe())
            await nursery.start(serve_control, node, home)  # `p2p log`, `p2p send`, ...
            while line := await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True):
                if line.strip():
                    await node.send(line.rstrip("\n"))
            nursery.cancel_scope.cancel()  # end of input: stop, then close the node


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="A minimal chat app on p2p.")
    parser.add_argument("--home", type=Path, default=p2p.default_home())
    parser.add_argument("--name", default="phone", help="this device's name (new account)")
    parser.add_argument("--listen", default="0.0.0.0:0", help="HOST:PORT for peers")
    parser.add_argument("--peer", action="append", default=[], help="HOST:PORT to dial")
    args = parser.parse_args()
    try:
        trio.run(main, args.home, args.name, args.listen, args.peer)
    except KeyboardInterrupt:
        pass
    except p2p.P2PError as exc:
        sys.exit(f"minimal_app: {exc}")
