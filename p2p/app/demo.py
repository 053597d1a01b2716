"""``p2p demo``: the multi-device story on this machine, narrated, with real parts.

Five devices of one account (phone + laptop, desktop, tablet, web), each with its own
home folder and SQLite store, talking TCP on loopback: the companions are linked by
pairing codes, the phone goes offline while the companions keep talking, the tablet
drops off too, both come back and catch up, and the web companion is unlinked and shown
unable to read what follows. Then another account (Ben, one phone, reachable only
through the relay) exchanges contact codes with the phone, and the laptop starts a chat
with him. Ends with a table per device; exit code 0 only if every check held.
"""

from __future__ import annotations

import logging
import random
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio
from rich.console import Console
from rich.table import Table

from p2p.errors import P2PError
from p2p.relay.server import serve_relay
from p2p.runtime.home import init_account
from p2p.runtime.linking import wait_for_primary
from p2p.runtime.node import Node, open_node
from p2p.testing import digest
from p2p.transport.tcp import TcpTransport

NAMES = ("phone", "laptop", "desktop", "tablet", "web")
REMOTE = ("desktop", "web")
"""Devices not on the LAN: they reach the others through the relay only."""


@dataclass
class Device:
    name: str
    home: Path
    port: int = 0
    node: Node | None = None
    scope: trio.CancelScope | None = None
    stopped: trio.Event = field(default_factory=trio.Event)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def running(self) -> Node:
        assert self.node is not None, f"{self.name} is off"
        return self.node


class _CodeCatcher:
    """The screen of a new device, for the demo: keeps the code, shows the check code."""

    def __init__(self) -> None:
        self.text = ""
        self.ready = trio.Event()

    def code(self, text: str, device: str) -> None:
        self.text = text
        self.ready.set()

    def check(self, digits: str) -> None:
        self.digits = digits

    def progress(
        self, done: int, total: int, messages_done: int | None, messages_total: int | None
    ) -> None:
        pass

    def failed(self, error: P2PError) -> None:
        pass


class Demo:
    def __init__(self, root: Path, nursery: trio.Nursery, console: Console, relay_url: str) -> None:
        self.devices = [Device(name, root / name) for name in NAMES]
        self.nursery = nursery
        self.say = console.print
        self.relay_url = relay_url

    async def start(self, index: int) -> Node:
        """Start a device: the desktop and the web companion are "elsewhere" and meet the
        others only through the relay; the rest also dial each other on the LAN."""
        device = self.devices[index]
        remote = device.name in REMOTE
        peers = (
            []
            if remote
            else [d.address for d in self.devices[:index] if d.port and d.name not in REMOTE]
        )
        await self.nursery.start(self._run, device, peers)
        return device.running()

    async def _run(
        self, device: Device, peers: list[str], *, task_status: trio.TaskStatus[None]
    ) -> None:
        device.stopped = trio.Event()
        transport = TcpTransport(device.address)
        try:
            with trio.CancelScope() as scope:
                device.scope = scope
                async with open_node(
                    device.home, transport=transport, peers=peers, relays=[self.relay_url]
                ) as node:
                    device.port = transport.port
                    device.node = node
                    task_status.started()
                    await trio.sleep_forever()
        finally:
            device.node = None
            device.stopped.set()

    async def stop(self, index: int) -> None:
        device = self.devices[index]
        if device.scope is not None:
            device.scope.cancel()
            await device.stopped.wait()

    async def link(self, index: int) -> None:
        device = self.devices[index]
        screen = _CodeCatcher()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: wait_for_primary(
                    device.home,
                    device.name,
                    listen="127.0.0.1:0",
                    ttl_s=60,
                    now_s=int(time.time()),
                    ui=screen,
                )
            )
            await screen.ready.wait()
            seen: list[str] = []

            async def confirm(digits: str) -> bool:
                seen.append(digits)
                return True

            linked = await self.devices[0].running().approve(screen.text, confirm=confirm)
        self.say(
            f"  linked [bold]{device.name}[/] ({linked.device}) by pairing code; "
            f"both screens showed check code {seen[0]}"
        )

    def online(self) -> list[Device]:
        return [d for d in self.devices if d.node is not None]

    async def level(self, devices: list[Device]) -> float:
        """Wait (at most a minute) until ``devices`` show identical histories; seconds it
        took. Polls: being level is a property of several nodes, not an event of one."""
        start = time.perf_counter()
        with trio.fail_after(60):
            while len({digest(d.running().messages()) for d in devices}) != 1:  # noqa: ASYNC110
                await trio.sleep(0.05)
        return time.perf_counter() - start


def run_demo(*, messages: int = 200, seed: int = 1) -> int:
    """Play the scenario; return the process exit code."""
    # the story is told on screen; the nodes' own warnings (the unlinked device being
    # refused, again and again, as it should be) would only drown it
    logging.getLogger("p2p").setLevel(logging.ERROR)
    return trio.run(_scenario, messages, seed)


async def _scenario(messages: int, seed: int) -> int:
    # soft_wrap: a sentence is one line, wrapped by the terminal where it is one (rich
    # would break it at 80 columns even into a file, mid-phrase)
    console = Console(highlight=False, soft_wrap=True)
    rng = random.Random(seed)
    checks: dict[str, bool] = {}
    with tempfile.TemporaryDirectory(prefix="p2p-demo-") as tmp:
        async with trio.open_nursery() as nursery:
            relay = await nursery.start(
                partial(serve_relay, "127.0.0.1", 0, data_dir=Path(tmp) / "relay")
            )
            demo = Demo(Path(tmp), nursery, console, relay.url)
            say = demo.say
            phone_dev, laptop, desktop, tablet, web = demo.devices
            say("[bold]p2p demo[/]: one account, five devices, real stores, TCP on loopback")
            say(
                f"  a relay listens at {relay.url}; the desktop and the web companion are "
                "elsewhere and reach the others only through it"
            )
            init_account(phone_dev.home, "phone")
            phone = await demo.start(0)
            for i in range(20):
                await phone.send(f"phone: earlier message {i}")
            say("  the phone holds 20 messages; now it links its companions")
            for i in range(1, 5):
                await demo.link(i)
            for i in range(1, 5):
                await demo.start(i)
            took = await demo.level(demo.online())
            say(f"  all five devices level in {took * 1000:.0f} ms")

            say("[yellow]the phone goes offline[/] (its process stops; its store stays)")
            await demo.stop(0)
            sent = 0
            for _ in range(messages // 2):
                i = rng.randrange(1, 5)
                await demo.devices[i].running().send(f"{NAMES[i]}: note {sent}")
                sent += 1
            say(f"  companions sent {sent} messages to each other (LAN and relay), phone off")
            say("[yellow]the tablet drops off too[/]")
            await demo.stop(3)
            for _ in range(messages - messages // 2):
                i = rng.choice([1, 2, 4])
                await demo.devices[i].running().send(f"{NAMES[i]}: note {sent}")
                sent += 1
            say(f"  {sent} messages written while the phone was away")

            say("[green]the phone and the tablet come back[/]")
            before = {d.name: d.running().traffic() for d in demo.online()}
            await demo.start(0)
            await demo.start(3)
            phone = phone_dev.running()
            converge = await demo.level(demo.online())
            say(f"  every replica level {converge * 1000:.0f} ms after the phone came back")
            expected = 20 + sent
            checks["every device holds every message"] = all(
                len(d.running().messages()) == expected for d in demo.online()
            )

            say("[red]the web companion is unlinked[/] (keys rotated; it keeps its store)")
            web_before = len(web.running().messages())
            await phone.unlink(web.running().device_id)
            others = [phone_dev, laptop, desktop, tablet]
            # the laptop writes once it holds the new list (and keys): a companion that
            # has not heard of the unlink yet still seals with the old epoch's key
            version = phone.state.device_list.version
            with trio.fail_after(60):
                while any(d.running().state.device_list.version < version for d in others):  # noqa: ASYNC110
                    await trio.sleep(0.05)
            for i in range(10):
                await laptop.running().send(f"laptop: after the unlink {i}")
            await demo.level(others)
            await trio.sleep(0.5)  # give the unlinked device every chance to receive
            web_texts = [m.text for m in web.running().messages()]
            checks["the unlinked device reads nothing new"] = len(
                web_texts
            ) == web_before and not any("after the unlink" in t for t in web_texts)
            say(
                f"  web still shows {len(web_texts)} messages; "
                f"the others show {len(phone.messages())}"
            )

            say("[bold]another account[/]: Ben's phone, reachable only through the relay")
            ben = Device("ben", Path(tmp) / "ben")
            init_account(ben.home, "ben")
            await demo.nursery.start(demo._run, ben, [])
            friend = ben.running()
            await phone.add_contact(friend.contact_code(), name="Ben")
            await friend.add_contact(phone.contact_code(), name="Ana")
            say("  the phone and Ben exchanged contact codes; the laptop learns Ben from the phone")
            laptop_node = laptop.running()
            with trio.fail_after(60):
                while not laptop_node.contacts():  # noqa: ASYNC110
                    await trio.sleep(0.02)
            lunch = await laptop_node.create_chat("lunch", with_=["Ben"])
            asked = await laptop_node.send("lunch at 12:30?", chat=lunch)
            with trio.fail_after(60):
                while lunch not in friend.state.spaces or not friend.messages(lunch):  # noqa: ASYNC110
                    await trio.sleep(0.02)
                await friend.send("yes, see you there", chat=lunch)
                account_devices = [d for d in demo.devices if d is not web]
                while (  # noqa: ASYNC110
                    not all(len(d.running().messages(lunch)) == 2 for d in account_devices)
                    or (await laptop_node.delivery(lunch))[asked].status != "delivered"
                ):
                    await trio.sleep(0.05)
            say(
                "  the laptop started a chat with Ben; every device of both accounts holds "
                "it, and the laptop's message shows delivered to all of them"
            )
            theirs = {s.id for s in friend.state.spaces.values() if not s.shared}
            checks["the other account holds the conversation and nothing else"] = (
                set(friend.state.spaces) == theirs | {lunch}
                and not theirs & set(phone.state.spaces)
                and lunch not in web.running().state.spaces
            )

            table = Table(
                title="per device",
                caption=(
                    "history digest: a hash of the messages the device shows (one digest"
                    " on every linked device: identical histories); bytes moved: what it"
                    " sent and received over all its sessions"
                ),
            )
            for column in ("device", "role", "messages", "history digest", "bytes moved"):
                table.add_column(column)
            digests = set()
            for d in demo.devices:
                node = d.running()
                shown = node.messages()
                h = digest(shown)
                if d is not web:
                    digests.add(h)
                traffic = node.traffic()
                moved = traffic["bytes_out"] + traffic["bytes_in"]
                if d.name in before:
                    moved -= before[d.name]["bytes_out"] + before[d.name]["bytes_in"]
                table.add_row(
                    d.name,
                    "primary" if d is phone_dev else ("unlinked" if d is web else "companion"),
                    str(len(shown)),
                    h,
                    f"{moved:,}",
                )
            console.print(table)
            say(f"time to converge after the phone returned: {converge * 1000:.0f} ms")
            checks["linked devices hold identical histories"] = len(digests) == 1
            for name, ok in checks.items():
                say(("[green]✓[/] " if ok else "[red]✗[/] ") + name)
            nursery.cancel_scope.cancel()
    return 0 if all(checks.values()) else 1
