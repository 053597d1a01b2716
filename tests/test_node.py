"""Node behaviours across a running cluster: unlinking live, leaving, events."""

from __future__ import annotations

import contextlib
import itertools

import pytest
import trio
import trio.testing
from procs import run_virtual as run
from procs import wait_for

import p2p
from p2p import events as ev
from p2p import testing
from p2p.proto.session import HANDSHAKE_TIMEOUT
from p2p.runtime.node import MAX_HANDSHAKES
from p2p.transport.base import Connection, ConnectionClosed, TransportError
from p2p.transport.memory import MemoryNetwork


def test_every_session_output_has_a_handler_in_the_dispatch_table() -> None:
    """A new output of the sans-I/O session that nobody registered would be dropped
    silently by the node: the table must cover the whole ``Output`` union."""

    async def scenario() -> None:
        async with testing.cluster(1) as c:
            assert c.nodes[0].peers.outputs.missing() == set()

    run(scenario)


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


# ---- lazy gossip ---------------------------------------------------------------------


def sessions_with(node: object, device: str) -> object:
    return node.peers.connected()[device].session  # type: ignore[attr-defined]


def test_in_a_full_mesh_only_the_author_sends_whole_envelopes() -> None:
    """Receivers announce (have) instead of forwarding: each device gets each envelope
    once, from its author, however many peers it has. (Without delivery receipts: each
    device would author one of its own.)"""

    async def scenario() -> None:
        async with testing.cluster(4, receipts=False) as c:
            await c.settle()
            await trio.sleep(5)  # the first state-vector exchanges are over
            author, *others = c.nodes
            start = {
                (n.device_id, p.device_id): sessions_with(n, p.device_id).stats.envelopes_in  # type: ignore[attr-defined]
                for n in others
                for p in c.nodes
                if p is not n
            }
            for i in range(20):
                await author.send(f"message {i}")
            await c.settle()
            await trio.sleep(5)  # any late want would have been answered by now
            for node in others:
                assert len(node.messages()) == 20
                from_author = sessions_with(node, author.device_id)
                before = start[(node.device_id, author.device_id)]
                assert from_author.stats.envelopes_in > before  # type: ignore[attr-defined]
                for peer in others:
                    if peer is not node:
                        lazy = sessions_with(node, peer.device_id)
                        before = start[(node.device_id, peer.device_id)]
                        assert lazy.stats.envelopes_in == before  # type: ignore[attr-defined]
                        assert lazy.stats.haves_in >= 1  # type: ignore[attr-defined]

    run(scenario)


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "forgotten"])
def test_an_envelope_travels_a_line_of_devices_by_have_and_want(
    cached: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """phone - laptop - desktop, the desktop not connected to the phone: what the phone
    writes reaches the desktop because the laptop announces it and the desktop asks.
    If the laptop no longer holds the envelope, the unanswered want falls back to a
    state vector, and the laptop sends the difference."""
    import p2p.runtime.gossiper
    from p2p.runtime.node import open_node
    from p2p.transport.memory import MemoryNetwork

    if not cached:
        monkeypatch.setattr(p2p.runtime.gossiper, "RECENT_ENVELOPES", 0)

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
                    )
                )
                for store, name in zip(stores, names, strict=True)
            ]
            phone, laptop, desktop = nodes
            await wait_for(
                lambda: laptop.connected_peers == sorted([phone.device_id, desktop.device_id])
            )
            assert phone.device_id not in desktop.connected_peers
            sent = await phone.send("over two hops")
            await wait_for(lambda: [m.id for m in desktop.messages()] == [sent])
            via = sessions_with(desktop, laptop.device_id)
            assert via.stats.haves_in >= 1  # type: ignore[attr-defined]
            assert via.stats.envelopes_in >= 1  # type: ignore[attr-defined]
            asked = sessions_with(laptop, desktop.device_id)
            assert asked.stats.wants_in >= 1  # type: ignore[attr-defined]
            repaired = asked.stats.catchup_bytes_out  # type: ignore[attr-defined]
            assert (repaired > 0) is not cached  # the answer to a state vector

    run(scenario)


# ---- connection mechanisms, in virtual time ------------------------------------------


class _Unreachable:
    """A transport whose every dial fails; it notes when each was tried."""

    def __init__(self) -> None:
        self.dials: list[float] = []

    @property
    def address(self) -> str:
        return "unreachable-self"

    async def serve(
        self, handler: object, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        await trio.sleep_forever()  # nobody ever dials in

    async def dial(self, address: str) -> Connection:
        self.dials.append(trio.current_time())
        raise TransportError(f"{address} does not answer")


def test_a_peer_that_never_answers_is_redialed_with_growing_backoff() -> None:
    transport = _Unreachable()

    async def scenario() -> None:
        [store] = testing.provision_account(1)
        async with p2p.open_node(store=store, transport=transport) as node:
            await node.connect("nowhere:1")
            await trio.sleep(300)

    run(scenario)
    gaps = [b - a for a, b in itertools.pairwise(transport.dials)]
    assert gaps[0] < 0.2 * 1.5 + 0.01  # the first retry is quick
    assert all(later >= earlier * 0.5 for earlier, later in itertools.pairwise(gaps[:6]))
    assert max(gaps) <= 30 * 1.5 + 0.01  # capped
    assert min(gaps[-3:]) >= 30 * 0.5 - 0.01  # and it stays slow
    assert 8 <= len(transport.dials) <= 40  # not 1,500 tries in 300 s


def test_handshakes_under_way_are_capped_and_the_rest_refused_at_once() -> None:
    async def closed_within(conn: Connection, seconds: float) -> bool:
        with trio.move_on_after(seconds):
            try:
                while True:
                    await conn.receive()
            except ConnectionClosed:
                return True
        return False

    async def scenario() -> None:
        network = MemoryNetwork()
        [store] = testing.provision_account(1)
        async with p2p.open_node(store=store, transport=network.transport("node")):
            stranger = network.transport("stranger")
            silent = [await stranger.dial("node") for _ in range(MAX_HANDSHAKES)]
            await trio.sleep(0.1)
            extra = await stranger.dial("node")
            assert await closed_within(extra, 1.0)  # refused: the cap is reached
            assert not await closed_within(silent[0], 1.0)  # the others wait their turn
            # each silent one is cut at the handshake timeout; then there is room again
            assert all([await closed_within(c, HANDSHAKE_TIMEOUT) for c in silent])
            late = await stranger.dial("node")
            assert not await closed_within(late, 1.0)
            await late.aclose()

    run(scenario)
