"""Node behaviours across a running cluster: unlinking live, leaving, events."""

from __future__ import annotations

import trio
import trio.testing

from p2p import events as ev
from p2p import testing


def run(fn: object) -> None:
    trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))  # type: ignore[arg-type]


async def wait_for(predicate: object, seconds: float = 120) -> None:
    with trio.fail_after(seconds):
        while not predicate():  # type: ignore[operator]  # noqa: ASYNC110
            await trio.sleep(0.05)


def test_a_live_unlink_reaches_every_running_device_and_locks_the_removed_one_out() -> None:
    async def scenario() -> None:
        async with testing.cluster(4) as c:
            phone, laptop, desktop, tablet = c.nodes
            await laptop.send("before")
            await c.settle()
            events = laptop.subscribe()
            await phone.unlink(tablet.device_id)
            await wait_for(lambda: tablet.device_id not in desktop.state.device_list.ids)
            changed = events.receive_nowait()
            while not isinstance(changed, ev.DeviceListChanged):
                changed = events.receive_nowait()
            assert changed.removed == (tablet.device_id,)
            chat = laptop.default_chat()
            assert laptop.state.space(chat).epoch == desktop.state.space(chat).epoch == 1
            for node in (phone, laptop, desktop):
                await node.send(f"after, from {node.state.name}")
            await wait_for(lambda: all(len(n.messages()) == 4 for n in (phone, laptop, desktop)))
            await trio.sleep(30)  # the tablet keeps redialing; give it every chance
            assert [m.text for m in tablet.messages()] == ["before"]
            assert tablet.device_id not in phone.connected_peers

    run(scenario)


def test_a_companion_can_ask_to_leave() -> None:
    async def scenario() -> None:
        async with testing.cluster(3) as c:
            phone, laptop, desktop = c.nodes
            await c.settle()
            await desktop.leave()
            await wait_for(lambda: desktop.device_id not in laptop.state.device_list.ids)
            assert desktop.device_id in phone.state.device_list.removed_ids
            await laptop.send("not for the desktop")
            await wait_for(lambda: len(phone.messages()) == 1)
            await trio.sleep(30)
            assert desktop.messages() == []

    run(scenario)


def test_a_leave_asked_while_the_primary_is_away_is_delivered_later() -> None:
    async def scenario() -> None:
        async with testing.cluster(3) as c:
            await c.settle()
            await c.stop(0)
            await c.node(2).leave()  # kept in its store
            await c.stop(2)
            await c.start(2)  # even across a restart
            await c.start(0)
            await wait_for(lambda: c.node(2).device_id not in c.node(0).state.device_list.ids)

    run(scenario)


def test_a_companion_off_during_an_unlink_catches_up_with_the_new_keys() -> None:
    """It holds only the old epoch's keys: it must still meet the others, learn the new
    list, open its grant, and read what was written after the rotation."""

    async def scenario() -> None:
        async with testing.cluster(4) as c:
            await c.settle()
            await c.stop(2)  # the desktop is off while the tablet is unlinked
            await c.node(0).unlink(c.node(3).device_id)
            await c.node(1).send("after the unlink")
            await c.start(2)
            desktop = c.node(2)
            await wait_for(lambda: [m.text for m in desktop.messages()] == ["after the unlink"])
            chat = desktop.default_chat()
            assert desktop.state.space(chat).epoch == 1
            assert c.node(3).device_id not in desktop.state.device_list.ids

    run(scenario)
