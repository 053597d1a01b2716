"""T9, relay abuse: idle crowds and stalled handshakes while a real pair keeps syncing.

A real relay process holds many authenticated idle devices and raw sockets that never
finish the websocket handshake; meanwhile two linked `p2p run` nodes that can only meet
through that relay exchange messages. The pair must converge, the stalled sockets must
be cut off by the relay's handshake timeout, and the relay's memory must stay bounded.
(Oversized frames, floods, bad signatures and never-authenticating clients have their
own tests in tests/test_relay.py.)
"""

from __future__ import annotations

import socket
import sys
import textwrap
import time
from pathlib import Path

import pytest
from chaos import CHAOS, CHAOS_REASON, record
from procs import Child, Node, Relay, wait_until

from p2p.app import control
from p2p.testing import provision_homes

IDLE = textwrap.dedent(
    """
    import json, sys, trio
    from p2p.proto.identity import DeviceKeys
    from p2p.transport.relay import RelayClient

    async def refuse(conn):
        await conn.aclose()

    async def main(url, count):
        clients = [RelayClient(url, DeviceKeys.generate()) for _ in range(count)]
        async with trio.open_nursery() as nursery:
            for client in clients:
                await nursery.start(client.serve, refuse)
            with trio.fail_after(180):
                for client in clients:
                    await client.wait_connected()
            print(json.dumps({"ready": count}), flush=True)
            while await trio.to_thread.run_sync(sys.stdin.readline):
                pass
            nursery.cancel_scope.cancel()

    trio.run(main, sys.argv[1], int(sys.argv[2]))
    """
)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def count(home: Path) -> int:
    reply = control.request(home, {"op": "log", "chat": None})
    return len(reply["messages"]) if reply else -1


def abuse(tmp_path: Path, idle: int, stalled: int, messages: int) -> None:
    relay = Relay(tmp_path / "relay")
    assert relay.child is not None
    homes = [tmp_path / "phone", tmp_path / "laptop"]
    provision_homes(homes)
    nodes = [Node(h, "--listen", "127.0.0.1:0", "--no-mdns", "--relay", relay.url) for h in homes]
    crowd: Child | None = None
    sockets: list[socket.socket] = []
    try:
        nodes[0].wait_for("peer_connected", timeout=30)
        before = rss_kib(relay.child.proc.pid)
        crowd = Child([sys.executable, "-c", IDLE, relay.url, str(idle)], logs=tmp_path, stdin=True)
        crowd.wait_line(lambda line: "ready" in line, timeout=120)
        for _ in range(stalled):  # TCP connected, websocket handshake never finished
            s = socket.create_connection(("127.0.0.1", relay.port), timeout=5)
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and then nothing more
            sockets.append(s)
        started = time.monotonic()
        for i in range(messages):
            assert control.request(homes[i % 2], {"op": "send", "text": f"m{i}", "chat": None})
        wait_until(lambda: count(homes[0]) == count(homes[1]) == messages, timeout=60)
        converged = time.monotonic() - started
        cut = 0
        for s in sockets:
            s.settimeout(15)
            try:
                cut += s.recv(1024) == b""  # closed by the relay
            except ConnectionResetError:
                cut += 1
            except TimeoutError:
                pass  # still held open: counted as not cut
        grown_mib = (rss_kib(relay.child.proc.pid) - before) / 1024
        record(
            "T9 relay abuse",
            idle=idle,
            stalled=stalled,
            stalled_cut=cut,
            messages=messages,
            converged_s=round(converged, 2),
            relay_growth_mib=round(grown_mib, 1),
        )
        assert cut == stalled, f"{stalled - cut} stalled handshakes were never cut off"
        assert grown_mib < 0.15 * idle + 40, f"relay grew {grown_mib:.0f} MiB for {idle} idle"
    finally:
        for s in sockets:
            s.close()
        if crowd is not None:
            crowd.kill()
        for node in nodes:
            node.stop()
        relay.stop()


@pytest.mark.slow
def test_relay_abuse_fast(tmp_path: Path) -> None:
    abuse(tmp_path, idle=150, stalled=20, messages=40)


@pytest.mark.chaos
@pytest.mark.skipif(not CHAOS, reason=CHAOS_REASON)
def test_relay_abuse_long(tmp_path: Path) -> None:
    abuse(tmp_path, idle=1000, stalled=200, messages=400)
