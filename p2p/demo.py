"""``p2p demo``: the multi-device story, in one process, narrated.

Five devices of one account (phone + four companions) on an in-memory network: the
phone goes offline, companions keep talking, one of them drops too, the phone comes back
and catches up. Ends with a table per device and exits 0 only if every replica holds the
same history.
"""

from __future__ import annotations

import random
import time

import trio
from rich.console import Console
from rich.table import Table

from p2p import testing


def run_demo(*, messages: int = 200, seed: int = 1) -> int:
    """Play the scenario; return the process exit code."""
    return trio.run(_scenario, messages, seed)


async def _scenario(messages: int, seed: int) -> int:
    console = Console(highlight=False)
    rng = random.Random(seed)
    say = console.print
    async with testing.cluster(5, seed=seed) as c:
        names = c.names
        say(f"[bold]p2p demo[/]: one account, {len(names)} devices: {', '.join(names)}")
        await c.settle(timeout=30)
        await c.node(0).send("phone: good morning, everyone")
        await c.settle(timeout=30)
        say("  every device holds the first message")

        say("[yellow]the phone goes offline[/]")
        await c.stop(0)
        sent = 0
        for _ in range(messages // 2):
            i = rng.randrange(1, 5)
            await c.node(i).send(f"{names[i]}: note {sent}")
            sent += 1
        say(f"  companions sent {sent} messages to each other")

        say("[yellow]the tablet drops off too[/]")
        await c.stop(3)
        for _ in range(messages - messages // 2):
            i = rng.choice([1, 2, 4])
            await c.node(i).send(f"{names[i]}: note {sent}")
            sent += 1
        say(f"  {sent} messages sent while the phone was away")

        say("[green]the phone and the tablet come back[/]")
        bytes_before = c.network.bytes
        started = time.perf_counter()
        await c.start(0)
        await c.start(3)
        await c.settle(timeout=60)
        took = time.perf_counter() - started
        moved = c.network.bytes - bytes_before

        table = Table(title="per device")
        for column in (
            "device",
            "role",
            "messages",
            "history digest",
            "converged in",
            "bytes moved",
        ):
            table.add_column(column)
        digests = set()
        for i, node in enumerate(c.nodes):
            shown = node.messages()
            d = testing.digest(shown)
            digests.add(d)
            table.add_row(
                names[i],
                "primary" if i == 0 else "companion",
                str(len(shown)),
                d,
                f"{took * 1000:.0f} ms",
                f"{moved:,}" if i == 0 else "",
            )
        console.print(table)
        expected = sent + 1
        ok = len(digests) == 1 and all(len(n.messages()) == expected for n in c.nodes)
        say("[bold green]all replicas identical[/]" if ok else "[bold red]replicas differ[/]")
        return 0 if ok else 1
