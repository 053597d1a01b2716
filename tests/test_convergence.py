"""Replicas converge: random writes on random devices through a faulty network.

The property of the whole engine: whatever happens on the way (partitions, devices off,
frames dropped, duplicated, reordered), once the network heals every replica shows the
same messages in the same order, and none that any device sent is missing.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2p import testing


@dataclass(frozen=True)
class Step:
    op: str
    node: int = 0
    arg: int = 0
    groups: tuple[frozenset[int], ...] = ()


def steps(n: int) -> st.SearchStrategy[list[Step]]:
    node = st.integers(0, n - 1)
    write = st.builds(
        Step,
        op=st.sampled_from(["send", "send", "send", "edit", "delete", "react"]),
        node=node,
        arg=st.integers(0, 50),
    )
    partition = st.lists(node, min_size=1, max_size=n - 1, unique=True).map(
        lambda g: Step(op="partition", groups=(frozenset(g), frozenset(set(range(n)) - set(g))))
    )
    other = st.sampled_from(
        [Step(op="heal"), Step(op="faults"), Step(op="wait", arg=1), Step(op="wait", arg=40)]
    )
    power = st.builds(Step, op=st.sampled_from(["stop", "start"]), node=node)
    return st.lists(st.one_of(write, write, partition, other, power), min_size=1, max_size=40)


async def play(n: int, plan: list[Step], seed: int) -> None:
    sent: set[str] = set()
    async with testing.cluster(n, seed=seed) as c:
        for step in plan:
            running = c.running()
            if step.op in ("send", "edit", "delete", "react"):
                if step.node not in running:
                    continue
                node = c.node(step.node)
                shown = node.messages()
                if step.op == "send" or not shown:
                    sent.add(await node.send(f"{c.names[step.node]} says {len(sent)}"))
                else:
                    target = shown[step.arg % len(shown)].id
                    if step.op == "edit":
                        await node.edit(target, f"edited by {c.names[step.node]}")
                    elif step.op == "delete":
                        await node.delete(target)
                    else:
                        await node.react(target, "👍")
            elif step.op == "partition":
                c.partition(*(set(g) for g in step.groups))
            elif step.op == "heal":
                c.heal()
            elif step.op == "faults":
                c.set_faults(drop=0.05, duplicate=0.05, reorder=0.05, delay=0.01)
            elif step.op == "wait":
                await trio.sleep(step.arg / 10)
            elif step.op == "stop" and len(running) > 1:
                await c.stop(step.node)
            elif step.op == "start" and step.node not in running:
                await c.start(step.node)
        c.heal()
        for i in range(n):
            if i not in c.running():
                await c.start(i)
        await c.settle(timeout=120)
        histories = [[m.id for m in node.messages()] for node in c.nodes]
        assert all(h == histories[0] for h in histories), "replicas differ in order or content"
        assert set(histories[0]) == sent, "a sent message is missing (or one appeared from nowhere)"
        assert len(c.digests()) == 1


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_random_histories_converge(data: st.DataObject) -> None:
    n = data.draw(st.integers(2, 5), label="devices")
    plan = data.draw(steps(n), label="plan")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    trio.run(play, n, plan, seed, clock=trio.testing.MockClock(autojump_threshold=0))


def test_phone_offline_then_back() -> None:
    """The WhatsApp scenario in memory: the phone is off, companions keep talking."""

    async def scenario() -> None:
        async with testing.cluster(4) as c:
            await c.node(0).send("before")
            await c.stop(0)
            ids = {await c.node(1 + i % 3).send(f"while away {i}") for i in range(300)}
            await c.stop(3)
            ids |= {await c.node(1 + i % 2).send(f"tablet off {i}") for i in range(100)}
            await c.start(0)
            await c.start(3)
            took = await c.settle()
            assert took < 60
            for node in c.nodes:
                assert ids <= {m.id for m in node.messages()}
            assert len(c.digests()) == 1

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
