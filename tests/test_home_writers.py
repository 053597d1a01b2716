"""One writer per home, and what a store damaged by two writers does at start-up.

A `p2p send` racing a node's start-up once wrote the store itself beside the starting
node: the node never saw that message (acknowledged, shown on its own device, never
sent), and two processes that read the run number before either wrote it back wrote
with the same CRDT client id, so each one's peers took the other's structs for ones
they already held. These tests pin what holds now: a node holds its home's lock from
before it reads anything, a command waits for a starting node rather than write beside
it, run numbers and counter blocks are claimed atomically in the store, and a node
whose own entries are missing from its CRDT writes them again.
"""

from __future__ import annotations

import contextlib
import itertools
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import trio

from p2p.app.control import serve_control
from p2p.errors import AlreadyRunning
from p2p.runtime.home import store_path
from p2p.runtime.node import Node, open_node
from p2p.state.device import NOTES, DeviceState, claim_run
from p2p.storage.base import WriteBatch
from p2p.storage.sqlite import SqliteStore
from p2p.testing import EPOCH_MS, provision_homes
from p2p.transport.tcp import TcpTransport

P2P = [sys.executable, "-m", "p2p"]


async def wait_for(predicate: object, timeout: float = 20.0) -> bool:  # noqa: ASYNC109
    """Poll ``predicate`` until it holds or ``timeout`` passes; whether it held."""
    assert callable(predicate)
    with trio.move_on_after(timeout):
        while not predicate():  # noqa: ASYNC110 (state in other threads and processes)
            await trio.sleep(0.05)
        return True
    return False


def texts(node: Node) -> list[str]:
    return [m.text for m in node.messages()]


async def reaches_phone(phone: Path, laptop: Path, wanted: set[str]) -> tuple[list[str], list[str]]:
    """Run both devices connected on loopback until the phone shows ``wanted`` (or 20 s
    pass); what each shows then. Neither may hide anything (a bad signature)."""
    async with open_node(phone, transport=TcpTransport("127.0.0.1:0"), receipts=False) as p:
        assert p.address is not None
        async with open_node(
            laptop, transport=TcpTransport("127.0.0.1:0"), peers=[p.address], receipts=False
        ) as lap:
            await wait_for(lambda: wanted <= set(texts(p)))
            for node in (p, lap):
                assert node.store.index_rejected(node.default_chat()) == []
            return texts(p), texts(lap)


def test_a_home_has_one_node_at_a_time(tmp_path: Path) -> None:
    """A second node on a home (a `p2p send` beside a starting `p2p run`) is refused
    before it reads anything; once the first closes, the home opens again."""
    (home,) = (tmp_path / "phone",)
    provision_homes([home])

    async def main() -> None:
        async with open_node(home, receipts=False):
            with pytest.raises(AlreadyRunning):
                async with open_node(home, receipts=False):
                    pass
        async with open_node(home, receipts=False) as again:
            await again.send("the lock went with the node")

    trio.run(main)


class GatedStore(SqliteStore):
    """A store whose first write waits until the other handle's first write comes
    too: both processes have opened (and read the store) before either writes."""

    def __init__(self, path: Path, gate: threading.Barrier) -> None:
        super().__init__(path)
        self._gate: threading.Barrier | None = gate

    def write(self, batch: WriteBatch) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            with contextlib.suppress(threading.BrokenBarrierError):
                gate.wait()
        super().write(batch)


def test_two_nodes_opened_at_once_on_one_store_never_share_a_crdt_client(
    tmp_path: Path,
) -> None:
    """Two runs that open one store at the same moment (both read it before either
    writes) each send a message after loading the chat: both messages reach the
    phone. When the run number was read at load and written back later, both runs
    wrote as one CRDT client, and the second message never left the laptop."""
    phone, laptop = tmp_path / "phone", tmp_path / "laptop"
    provision_homes([phone, laptop])
    gate = threading.Barrier(2, timeout=10)
    stores = [GatedStore(store_path(laptop), gate) for _ in range(2)]
    loaded: list[int] = []
    sent: list[str] = []

    async def one_run(store: SqliteStore, text: str, both_loaded: trio.Event) -> None:
        async with open_node(store=store, receipts=False) as node:
            await node.delivery()  # loads the chat, as a node with peers does at once
            loaded.append(1)
            if len(loaded) == 2:
                both_loaded.set()
            await both_loaded.wait()
            await node.send(text)
            sent.append(text)

    async def main() -> tuple[list[str], list[str]]:
        both_loaded = trio.Event()
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(one_run, stores[0], "first run", both_loaded)
                nursery.start_soon(one_run, stores[1], "second run", both_loaded)
        for store in stores:
            store.close()
        return await reaches_phone(phone, laptop, {"first run", "second run"})

    on_phone, on_laptop = trio.run(main)
    assert sorted(sent) == ["first run", "second run"]
    assert sorted(on_laptop) == ["first run", "second run"]
    assert sorted(on_phone) == ["first run", "second run"], "a message never left the laptop"


def test_a_send_racing_a_starting_node_goes_through_it(tmp_path: Path) -> None:
    """`p2p send` while the laptop's node holds its home but does not answer its
    control socket yet (a `p2p run` starting): the send waits and goes through the
    node, which gossips it to the phone at once. Written beside the node into the
    store, the message was acknowledged and never reached the phone while that node
    ran (its document never saw it)."""
    phone, laptop = tmp_path / "phone", tmp_path / "laptop"
    provision_homes([phone, laptop])
    stderr = tmp_path / "send.stderr"

    async def main() -> list[str]:
        async with (
            open_node(phone, transport=TcpTransport("127.0.0.1:0"), receipts=False) as p,
        ):
            assert p.address is not None
            async with (
                open_node(
                    laptop, transport=TcpTransport("127.0.0.1:0"), peers=[p.address], receipts=False
                ) as node,
                trio.open_nursery() as nursery,
            ):
                assert await wait_for(lambda: node.connected_peers != [])
                await node.send("before")
                assert await wait_for(lambda: "before" in texts(p))
                with stderr.open("w") as err:
                    send = subprocess.Popen(  # noqa: ASYNC220 (returns at once)
                        [*P2P, "--home", str(laptop), "send", "--json", "raced"],
                        stdout=subprocess.PIPE,
                        stderr=err,
                        stdin=subprocess.DEVNULL,
                    )
                    try:
                        # until it either wrote the store itself or waits for the node
                        await wait_for(
                            lambda: send.poll() is not None or b"waiting" in stderr.read_bytes(),
                            timeout=60,
                        )
                        await nursery.start(serve_control, node, laptop)
                        assert await wait_for(lambda: send.poll() is not None, timeout=60)
                    finally:
                        if send.poll() is None:
                            send.kill()
                        out, _ = send.communicate(timeout=10)
                assert send.returncode == 0, stderr.read_text()
                assert b"raced" not in out  # the id, not the text
                await wait_for(lambda: "raced" in texts(p))
                nursery.cancel_scope.cancel()
                return texts(p)

    assert trio.run(main) == ["before", "raced"], "an acknowledged send never left the laptop"


def test_entries_missing_from_the_own_crdt_are_written_again(tmp_path: Path) -> None:
    """A store damaged by two writers of older versions: two messages of the laptop's
    under one CRDT client and clock, both in its message index, one in its CRDT. The
    node notices when it loads the chat and writes its entries again, so the phone gets
    both (before, the second was shown on the laptop and nowhere else, forever)."""
    phone, laptop = tmp_path / "phone", tmp_path / "laptop"
    provision_homes([phone, laptop])
    store = SqliteStore(store_path(laptop))
    try:
        # two processes that read the store before either wrote: one run number
        runs = [DeviceState.load(store), DeviceState.load(store)]
        chat = runs[0].chat_by_name(NOTES).id
        for state in runs:
            state.space(chat).replica.load()
        for state, text in zip(runs, ("one", "two"), strict=True):
            entry = state.new_entry(chat, "msg", EPOCH_MS, body=text)
            store.write(state.write_local(chat, [entry])[1])
    finally:
        store.close()

    on_phone, on_laptop = trio.run(reaches_phone, phone, laptop, {"one", "two"})
    assert sorted(on_laptop) == ["one", "two"]
    assert sorted(on_phone) == ["one", "two"], "an entry shown on the laptop never left it"


def test_a_sound_store_is_not_written_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The check at load finds nothing to do on a store written by one node at a time:
    reopening and loading a chat appends nothing to its log."""
    (home,) = (tmp_path / "phone",)
    provision_homes([home])

    async def main() -> None:
        async with open_node(home, receipts=False) as node:
            await node.send("one")
            await node.react(await node.send("two"), "+1")
        async with open_node(home, receipts=False) as node:
            space = node.state.space(node.default_chat())
            before = space.log_seq
            await node.delivery()  # loads and checks the chat
            await node.send("three")
            assert space.log_seq == before + 1

    trio.run(main)
    assert "lacked entries" not in caplog.text


def test_run_numbers_and_counter_blocks_are_claimed_atomically(tmp_path: Path) -> None:
    """Threads claiming runs through two handles on one file never get the same run
    number or overlapping counter blocks (one write transaction each)."""
    (home,) = (tmp_path / "phone",)
    provision_homes([home])
    claimed: list[tuple[int, int, int]] = []
    lock = threading.Lock()

    def claim_many() -> None:
        store = SqliteStore(store_path(home))
        try:
            for _ in range(25):
                run = claim_run(store)
                with lock:
                    claimed.append((run.boot, run.counter, run.reserved))
        finally:
            store.close()

    threads = [threading.Thread(target=claim_many) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert len({boot for boot, _, _ in claimed}) == 50
    blocks = sorted((start, end) for _, start, end in claimed)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(blocks))
