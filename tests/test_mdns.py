"""mDNS discovery against real multicast: loopback, child processes, network namespaces.

Nothing here touches the machine's real interfaces: every instance binds to 127.0.0.1,
or runs inside network namespaces this file creates (joined by veth pairs to a bridge
that lives in its own namespace) and deletes again.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
from netns import Namespaces, make_namespaces
from zeroconf import ServiceInfo, Zeroconf

from p2p.discovery.base import Found
from p2p.discovery.mdns import MdnsDiscovery, txt_tag

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = ["127.0.0.1"]
SERVICE = "_p2p-sync._tcp.local."


def zeroconf_threads() -> set[threading.Thread]:
    """Threads that are not trio's idle worker cache nor the main thread."""
    return {
        t
        for t in threading.enumerate()
        if t is not threading.main_thread() and not t.name.startswith("Trio thread")
    }


class Observer:
    """One MdnsDiscovery and everything it reported."""

    def __init__(self, discovery: MdnsDiscovery) -> None:
        self.discovery = discovery
        self.found: list[Found] = []

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        send, receive = trio.open_memory_channel[Found](64)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._collect, receive)
            await nursery.start(self.discovery.run, send)
            task_status.started()

    async def _collect(self, receive: trio.MemoryReceiveChannel[Found]) -> None:
        async for item in receive:
            self.found.append(item)

    def devices(self) -> dict[str | None, str]:
        return {f.device: f.address for f in self.found}


async def wait_for(predicate: Callable[[], bool]) -> None:
    """Poll: the predicates read lists and captured logs that no event announces."""
    while not predicate():  # noqa: ASYNC110
        await trio.sleep(0.05)


def make(
    device: str,
    port: int,
    secret: bytes,
    linked: list[str],
    interfaces: list[str] | None,
    service_type: str = SERVICE,
) -> MdnsDiscovery:
    return MdnsDiscovery(
        port=port,
        device_id=device,
        secret=secret,
        linked=lambda: list(linked),
        interfaces=interfaces,
        service_type=service_type,
    )


# ---- the record itself (no network) ---------------------------------------------------


def test_txt_record_says_nothing_linkable() -> None:
    secret = secrets.token_bytes(32)
    first = make("device-a", 4000, secret, ["device-a"], LOOPBACK)
    second = make("device-a", 4000, secret, ["device-a"], LOOPBACK)
    assert set(first.txt()) == {"v", "n", "t"}
    assert first.txt()["v"] == "1"
    for d in (first, second):
        assert "device-a" not in d.instance_name
        assert all("device-a" not in value for value in d.txt().values())
    # A new run of the same device: new name, new nonce, new tag.
    assert first.instance_name != second.instance_name
    assert first.txt()["n"] != second.txt()["n"]
    assert first.txt()["t"] != second.txt()["t"]
    nonce = bytes.fromhex(first.txt()["n"])
    assert first.txt()["t"] == txt_tag(secret, nonce, "device-a").hex()


def test_match_accepts_linked_devices_only_and_rejects_garbage() -> None:
    secret = secrets.token_bytes(32)
    linked = ["me", "laptop", "phone"]
    me = make("me", 4000, secret, linked, LOOPBACK)
    nonce = secrets.token_bytes(16)

    def record(device: str, key: bytes = secret) -> dict[bytes, bytes | None]:
        return {b"v": b"1", b"n": nonce.hex().encode(), b"t": tag(device, key)}

    def tag(device: str, key: bytes = secret) -> bytes:
        return txt_tag(key, nonce, device).hex().encode()

    assert me.match(record("laptop")) == "laptop"
    assert me.match(record("phone")) == "phone"
    assert me.match(record("me")) is None  # ourselves
    assert me.match(record("someone-else")) is None  # not linked
    assert me.match(record("laptop", key=secrets.token_bytes(32))) is None  # stranger
    good = record("laptop")
    garbage: list[dict[bytes, bytes | None]] = [
        {},
        {**good, b"v": b"2"},
        {**good, b"v": None},
        {**good, b"n": None},
        {**good, b"n": b"zz" * 16},
        {**good, b"n": b" " * 32},
        {**good, b"t": tag("laptop")[:-2] + b"  "},
        {**good, b"n": nonce.hex().encode()[:-2]},
        {**good, b"t": tag("laptop") + b"00"},
        {**good, b"t": "é".encode() * 16},
        {**good, **{bytes([65 + i]): b"x" for i in range(8)}},  # too many keys
    ]
    for props in garbage:
        assert me.match(props) is None, props
    with pytest.raises(ValueError, match="secret"):
        make("me", 4000, b"short", linked, LOOPBACK)
    with pytest.raises(ValueError, match="port"):
        make("me", 0, secret, linked, LOOPBACK)


# ---- one trio run, loopback -------------------------------------------------------------


def test_three_instances_on_loopback_find_each_other() -> None:
    secret = secrets.token_bytes(32)
    ids = ["phone", "laptop", "desktop"]
    ports = {"phone": 41001, "laptop": 41002, "desktop": 41003}
    before = zeroconf_threads()
    timings: dict[str, float] = {}

    async def main() -> None:
        observers = [Observer(make(d, ports[d], secret, ids, LOOPBACK)) for d in ids]
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for observer in observers:
                nursery.start_soon(observer.run)
            with trio.fail_after(20):
                await wait_for(lambda: all(len(o.devices()) == 2 for o in observers))
            timings["discover"] = trio.current_time() - start
            nursery.cancel_scope.cancel()
            closing = trio.current_time()
        timings["close"] = trio.current_time() - closing
        for device, observer in zip(ids, observers, strict=True):
            expected = {d: f"127.0.0.1:{ports[d]}" for d in ids if d != device}
            assert observer.devices() == expected
            assert all(f.source == "mdns" for f in observer.found)
            # Reported once per service, not once per browser event.
            assert len(observer.found) == 2

    trio.run(main)
    print(f"loopback: discovered in {timings['discover']:.2f}s, closed in {timings['close']:.2f}s")
    assert timings["close"] < 5
    assert zeroconf_threads() <= before, "zeroconf threads left behind"


def test_a_late_joiner_finds_a_running_device_at_once() -> None:
    """The browser's first query asks for a multicast answer: with zeroconf's default
    (unicast answer first) the reply goes to whichever socket on port 5353 the kernel
    picks, and the joiner waits a second for the next query (~1.15 s measured).

    A service type of its own: any other browser of the type (another test run on this
    loopback) makes the phone answer, and mDNS then holds its next answer for a second."""
    secret = secrets.token_bytes(32)
    ids = ["phone", "laptop"]
    elapsed: list[float] = []
    service = f"_p2pt{secrets.token_hex(4)}._tcp.local."

    async def main() -> None:
        phone = Observer(make("phone", 41060, secret, ids, LOOPBACK, service))
        laptop = Observer(make("laptop", 41061, secret, ids, LOOPBACK, service))
        async with trio.open_nursery() as nursery:
            await nursery.start(phone.run)
            await trio.sleep(1.1)  # past mDNS's once-a-second limit per record
            start = trio.current_time()
            nursery.start_soon(laptop.run)
            with trio.fail_after(20):
                await wait_for(lambda: bool(laptop.found))
                elapsed.append(trio.current_time() - start)
                await wait_for(lambda: bool(phone.found))  # when the laptop announces
                elapsed.append(trio.current_time() - start)
            nursery.cancel_scope.cancel()
        assert laptop.devices() == {"phone": "127.0.0.1:41060"}
        assert phone.devices() == {"laptop": "127.0.0.1:41061"}

    trio.run(main)
    print(
        f"late joiner found the running device in {elapsed[0]:.2f}s, was found in {elapsed[1]:.2f}s"
    )


def test_cancelled_while_registering_leaves_no_thread() -> None:
    before = zeroconf_threads()

    async def main() -> None:
        discovery = make("phone", 41010, secrets.token_bytes(32), ["phone"], LOOPBACK)
        send, _receive = trio.open_memory_channel[Found](8)
        with trio.fail_after(10), trio.move_on_after(0.3):
            await discovery.run(send)

    trio.run(main)
    assert zeroconf_threads() <= before


def test_strangers_and_garbage_are_ignored_both_ways(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="p2p.discovery.mdns")
    ours = secrets.token_bytes(32)
    ids = ["phone", "laptop"]
    # The stranger even knows our device ids, but not our secret.
    stranger = Observer(
        make("intruder", 41020, secrets.token_bytes(32), [*ids, "intruder"], LOOPBACK)
    )
    before = zeroconf_threads()

    # Random names: another run of this file on the same loopback must not collide.
    tag = secrets.token_hex(4)
    garbage_names = [f"garbage{i}-{tag}.{SERVICE}" for i in range(4)]

    def garbage_services() -> list[ServiceInfo]:
        records: list[dict[str, str]] = [
            {"v": "1", "n": "zz" * 16, "t": "00" * 16},
            {"v": "2", "n": "00" * 16, "t": "00" * 16},
            {"device": "laptop", "v": "1"},
            {"v": "1", "n": "ab" * 16, "t": "cd" * 16, "pad": "x" * 240},
        ]
        return [
            ServiceInfo(
                SERVICE,
                garbage_names[i],
                port=41030 + i,
                properties=props,
                server=f"garbage{i}-{tag}.local.",
                parsed_addresses=LOOPBACK,
            )
            for i, props in enumerate(records)
        ]

    async def main() -> None:
        friends = [Observer(make(d, 41021 + i, ours, ids, LOOPBACK)) for i, d in enumerate(ids)]
        junk = await trio.to_thread.run_sync(lambda: Zeroconf(interfaces=LOOPBACK))
        try:
            async with trio.open_nursery() as nursery:
                for info in garbage_services():
                    nursery.start_soon(trio.to_thread.run_sync, junk.register_service, info)
                for observer in [*friends, stranger]:
                    nursery.start_soon(observer.run)

                def rejections(name: str) -> int:
                    return sum(
                        1
                        for r in caplog.records
                        if r.getMessage().startswith(f"mdns: ignoring {name!r}")
                    )

                def everyone_looked() -> bool:
                    # Each friend found the other; the stranger was examined and rejected
                    # by both friends, each friend by the stranger, and every garbage
                    # service by all three.
                    return (
                        all(len(o.devices()) == 1 for o in friends)
                        and rejections(stranger.discovery.instance_name) >= 2
                        and all(rejections(o.discovery.instance_name) >= 1 for o in friends)
                        and all(rejections(name) >= 3 for name in garbage_names)
                    )

                with trio.fail_after(20):
                    await wait_for(everyone_looked)
                await trio.sleep(0.5)
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(junk.close)
        assert friends[0].devices() == {"laptop": "127.0.0.1:41022"}
        assert friends[1].devices() == {"phone": "127.0.0.1:41021"}

    trio.run(main)
    assert stranger.found == []
    assert zeroconf_threads() <= before


def test_updated_service_is_reported_again_with_its_new_port() -> None:
    secret = secrets.token_bytes(32)
    ids = ["phone", "laptop"]
    nonce = secrets.token_bytes(16)
    # A hand-made "laptop" record, so that its port can change while it stays announced.
    props = {"v": "1", "n": nonce.hex(), "t": txt_tag(secret, nonce, "laptop").hex()}
    label = secrets.token_hex(8)

    def laptop(port: int) -> ServiceInfo:
        return ServiceInfo(
            SERVICE,
            f"{label}.{SERVICE}",
            port=port,
            properties=props,
            server=f"p2p-{label}.local.",
            parsed_addresses=LOOPBACK,
        )

    async def main() -> None:
        phone = Observer(make("phone", 41040, secret, ids, LOOPBACK))
        zc = await trio.to_thread.run_sync(lambda: Zeroconf(interfaces=LOOPBACK))
        try:
            await trio.to_thread.run_sync(zc.register_service, laptop(41041))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(phone.run)
                with trio.fail_after(20):
                    await wait_for(lambda: len(phone.found) == 1)
                    await trio.to_thread.run_sync(zc.update_service, laptop(41042))
                    await wait_for(lambda: len(phone.found) == 2)
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(zc.close)
        assert [(f.device, f.address) for f in phone.found] == [
            ("laptop", "127.0.0.1:41041"),
            ("laptop", "127.0.0.1:41042"),
        ]

    trio.run(main)


# ---- child processes --------------------------------------------------------------------

CHILD = r"""
import json, os, sys, time, trio
from p2p.discovery.mdns import MdnsDiscovery

cfg = json.loads(sys.argv[1])

def say(**fields):
    print(json.dumps(fields), flush=True)

async def main():
    start = time.monotonic()
    send, receive = trio.open_memory_channel(64)
    discovery = MdnsDiscovery(
        port=cfg["port"], device_id=cfg["device"], secret=bytes.fromhex(cfg["secret"]),
        linked=lambda: cfg["linked"], interfaces=cfg["interfaces"],
    )
    stdin = trio.lowlevel.FdStream(os.dup(0))

    async def report():
        async for found in receive:
            say(device=found.device, address=found.address, t=time.monotonic() - start)

    async def until_stdin_closes(cancel):
        while await stdin.receive_some(1024):
            pass
        cancel()

    with trio.move_on_after(cfg.get("lifetime", 40)):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(report)
            await nursery.start(discovery.run, send)
            say(ready=True, t=time.monotonic() - start)
            nursery.start_soon(until_stdin_closes, nursery.cancel_scope.cancel)
    await stdin.aclose()
    say(closed=True)

trio.run(main)
"""


class Child:
    """A child process running MdnsDiscovery; its JSON lines are read on a thread."""

    def __init__(self, argv_prefix: list[str], cfg: dict[str, object]) -> None:
        self.cfg = cfg
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [*argv_prefix, sys.executable, "-c", CHILD, json.dumps(cfg)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=ROOT,
        )
        self.lines: queue.Queue[dict[str, object]] = queue.Queue()
        self.seen: list[dict[str, object]] = []
        self.other: list[str] = []
        """Lines that are not JSON: tracebacks and warnings."""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.lines.put(json.loads(line))
            except ValueError:
                self.other.append(line)

    def drain(self) -> list[dict[str, object]]:
        while True:
            try:
                self.seen.append(self.lines.get_nowait())
            except queue.Empty:
                return self.seen

    def devices(self) -> dict[object, object]:
        return {m["device"]: m["address"] for m in self.drain() if "device" in m}

    def close(self) -> int | None:
        """Ask it to stop (stdin EOF); kill it if it has not within 5 s. Returns the exit
        code, None when it had to be killed."""
        code: int | None
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
            code = None
        self._reader.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return code

    def output(self) -> str:
        return "".join(self.other)


def wait_until(predicate: Callable[[], bool], timeout: float, children: list[Child]) -> float:
    start = time.monotonic()
    while not predicate():
        for child in children:
            if child.proc.poll() is not None:
                raise AssertionError(f"child exited {child.proc.returncode}: {child.output()}")
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out; saw {[c.drain() for c in children]}")
        time.sleep(0.05)
    return time.monotonic() - start


def run_children(
    prefixes: list[list[str]],
    addresses: list[str],
    timeout: float,
    all_interfaces: frozenset[int] = frozenset(),
) -> tuple[float, float]:
    """Start one child per prefix/address, check they all find each other. Returns, in
    seconds since each child's discovery started (the slowest child): until it was
    registered, and until it had found every other child. Children whose index is in
    ``all_interfaces`` bind to every interface (``interfaces=None``) and must announce
    their address anyway."""
    secret = secrets.token_bytes(32).hex()
    ids = [f"device-{i}" for i in range(len(prefixes))]
    children: list[Child] = []
    try:
        for i, (prefix, address) in enumerate(zip(prefixes, addresses, strict=True)):
            cfg = {
                "port": 42000 + i,
                "device": ids[i],
                "secret": secret,
                "linked": ids,
                "interfaces": None if i in all_interfaces else [address],
            }
            children.append(Child(prefix, cfg))
        wait_until(
            lambda: all(any("ready" in m for m in c.drain()) for c in children), timeout, children
        )
        wait_until(
            lambda: all(len(c.devices()) == len(ids) - 1 for c in children), timeout, children
        )
        ready = max(float(str(m["t"])) for c in children for m in c.drain() if "ready" in m)
        found = max(float(str(m["t"])) for c in children for m in c.drain() if "device" in m)
        for i, child in enumerate(children):
            expected = {ids[j]: f"{addresses[j]}:{42000 + j}" for j in range(len(ids)) if j != i}
            assert child.devices() == expected
            # One report per device: nothing else (no 127.x from the all-interfaces one).
            assert len([m for m in child.drain() if "device" in m]) == len(expected)
        codes = [child.close() for child in children]
        assert codes == [0] * len(children), [c.output() for c in children]
        assert all(any("closed" in m for m in c.drain()) for c in children)
        assert not any(c.output() for c in children), [c.output() for c in children]
        return ready, found
    finally:
        for child in children:
            child.close()


@pytest.mark.slow
def test_two_processes_on_loopback_find_each_other() -> None:
    ready, found = run_children([[], []], ["127.0.0.1", "127.0.0.1"], timeout=15)
    print(f"processes on loopback: all found {found:.2f}s after starting (registered {ready:.2f}s)")


# ---- network namespaces ---------------------------------------------------------------


@pytest.fixture
def namespaces() -> Iterator[Namespaces]:
    yield from make_namespaces(3)


@pytest.mark.slow
def test_three_network_namespaces_find_each_other(namespaces: Namespaces) -> None:
    prefixes = [[namespaces.ip, "netns", "exec", ns] for ns in namespaces.nodes]
    # The last one uses every interface, as `p2p run` does on a real LAN: safe here, its
    # namespace has only lo and its veth. It must announce the veth's address, not 127.x.
    ready, found = run_children(
        prefixes, namespaces.addresses, timeout=15, all_interfaces=frozenset({2})
    )
    print(f"namespaces: all found {found:.2f}s after starting (registered {ready:.2f}s)")
