"""How an app tests that its devices converge, with ``p2p.testing``.

Copy this into your own test suite. Each test starts real nodes of one account on an
in-memory network, under trio's MockClock: minutes of backoff and timeouts pass in
milliseconds of real time, and message timestamps follow the same virtual clock.

    python demos/convergence_test_example.py        # runs every test below
    pytest demos/convergence_test_example.py        # or let pytest find them (no plugin)
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio
import trio.testing

from p2p import testing


def run_virtual(test: Callable[[], Awaitable[None]]) -> None:
    """Run an async test on virtual time: trio jumps the clock whenever all tasks wait."""
    trio.run(test, clock=trio.testing.MockClock(autojump_threshold=0))


async def partition_then_heal() -> None:
    async with testing.cluster(3, seed=1) as c:  # phone (0), laptop (1), desktop (2)
        phone, laptop, desktop = c.nodes
        await laptop.send("before the split")
        await c.settle()  # every replica level (TimeoutError otherwise)

        c.partition({0}, {1, 2})  # the phone is cut off from its companions
        await phone.send("phone, alone")
        await desktop.send("desktop, with the laptop")
        await trio.sleep(60)  # a virtual minute passes
        assert len(c.digests()) == 2  # the two sides differ...
        assert c.digest(1) == c.digest(2)  # ...but the companions agree

        c.heal()
        await c.settle()
        assert len(c.digests()) == 1  # one history, in the same order on every device
        texts = [m.text for m in phone.messages()]
        assert sorted(texts) == ["before the split", "desktop, with the laptop", "phone, alone"]


async def phone_switched_off() -> None:
    async with testing.cluster(3, seed=2) as c:
        await c.stop(0)  # the phone is off: its store stays, like a phone in a drawer
        for i in range(50):
            await c.node(1 + i % 2).send(f"note {i}")
            await trio.sleep(30)  # the companions chat for 25 virtual minutes
        assert c.running() == [1, 2]
        await c.settle()  # level among the running nodes

        phone = await c.start(0)  # back on; node i dials nodes 0..i-1, so the phone
        took = await c.settle()  # waits for the companions' redial (backoff up to 45 s)
        assert len(phone.messages()) == 50
        assert len(c.digests()) == 1
        assert took < 60, f"catch-up took {took} virtual seconds"


async def concurrent_edits_on_a_lossy_network() -> None:
    async with testing.cluster(3, seed=3) as c:
        first = await c.node(0).send("draft")
        await c.settle()
        c.set_faults(drop=0.1, duplicate=0.1, reorder=0.1, delay=0.05)
        for i, node in enumerate(c.nodes):  # everyone edits and reacts at once
            await node.edit(first, f"edited on {c.names[i]}")
            await node.react(first, "👍👎🎉"[i])
            await node.send(f"{c.names[i]} was here")
        await trio.sleep(10)

        c.heal()  # no more faults: the next (re)connections repair what was lost
        await c.settle()
        shown = c.node(0).messages()
        assert all(n.messages() == shown for n in c.nodes)  # equal Messages, same order
        assert len(shown) == 4
        draft = next(m for m in shown if m.id == first)
        assert draft.edited
        assert draft.text.startswith("edited on ")  # one of the edits won, on every device
        assert len(draft.reactions) == 1  # one account: its last reaction counts


def test_partition_then_heal() -> None:
    run_virtual(partition_then_heal)


def test_phone_switched_off() -> None:
    run_virtual(phone_switched_off)


def test_concurrent_edits_on_a_lossy_network() -> None:
    run_virtual(concurrent_edits_on_a_lossy_network)


if __name__ == "__main__":
    # dropped or reordered frames make nodes log warnings (a broken channel, closed and
    # repaired on reconnect); they are expected here
    logging.getLogger("p2p").setLevel(logging.ERROR)
    for test in (
        test_partition_then_heal,
        test_phone_switched_off,
        test_concurrent_edits_on_a_lossy_network,
    ):
        test()
        print("passed:", test.__name__)
    print("all convergence tests passed")
