"""Gossip (p2p.proto.gossip) as the node runs it: its timers on trio's clock, its sends on
real sessions (in-memory transport, virtual time)."""

from __future__ import annotations

import contextlib

import trio
import trio.testing

from p2p import testing
from p2p.runtime.node import WANT_TASKS, open_node
from p2p.transport.memory import MemoryNetwork


def run(fn: object) -> None:
    trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))  # type: ignore[arg-type]


async def wait_for(predicate: object, seconds: float) -> None:
    with trio.fail_after(seconds):
        while not predicate():  # type: ignore[operator]  # noqa: ASYNC110
            await trio.sleep(0.05)


def test_a_burst_reaches_a_device_two_hops_away_without_a_reconnect() -> None:
    """phone - laptop - desktop: the phone writes more envelopes at once than the
    desktop may wait on (WANT_TASKS); the desktop hears of each only by the laptop's
    ``have``. All of them reach it over the same connections (once, a ``have`` past
    the limit was dropped, and only a reconnect repaired it)."""
    burst = 3 * WANT_TASKS

    async def scenario() -> None:
        stores = testing.provision_account(3)
        network = MemoryNetwork()
        names = ["phone", "laptop", "desktop"]
        dials = {"phone": [], "laptop": ["phone"], "desktop": ["laptop"]}
        async with contextlib.AsyncExitStack() as stack:
            nodes = [
                await stack.enter_async_context(
                    open_node(
                        store=store,
                        transport=network.transport(name),
                        peers=dials[name],
                        wall_ms=testing.Cluster.wall_ms,
                        receipts=False,
                    )
                )
                for store, name in zip(stores, names, strict=True)
            ]
            phone, laptop, desktop = nodes
            await wait_for(
                lambda: laptop.connected_peers == sorted([phone.device_id, desktop.device_id]),
                60,
            )
            await trio.sleep(5)  # the first state-vector exchanges are over
            sessions = [id(p.session) for p in desktop.peers.connected().values()]
            for i in range(burst):  # no virtual time passes: one burst
                await phone.send(f"burst {i}")
            await wait_for(lambda: len(desktop.messages()) == burst, 60)
            assert [id(p.session) for p in desktop.peers.connected().values()] == sessions

    run(scenario)
