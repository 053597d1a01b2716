"""Linking and unlinking devices, with real processes where a person would use them."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from procs import P2P, Node, log, wait_until
from procs import p2p as run_p2p

import p2p
from p2p.core import NOTES, DeviceState
from p2p.errors import HandshakeFailed, RemovedDevice, RollbackRefused, UnknownKey
from p2p.identity import DeviceKeys
from p2p.pairing import PairingCode
from p2p.sync import Authenticated, Closed, Send, Session

pytestmark = pytest.mark.slow


class Linker:
    """A ``p2p link --json`` process: its code, then its events."""

    def __init__(self, home: Path, name: str, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [
                *P2P,
                "--home",
                str(home),
                "link",
                "--name",
                name,
                "--listen",
                "127.0.0.1:0",
                "--json",
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        first = json.loads(self.proc.stdout.readline())
        self.code: str = first["code"]
        self.device: str = first["device"]
        self.events: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.append(json.loads(line))

    def wait(self, timeout: float = 60) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        self.close()
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=10)
        self.close()

    def close(self) -> None:
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def fill(home: Path, n: int) -> None:
    async def main() -> None:
        async with p2p.open_node(home) as node:
            for i in range(n):
                await node.send(f"history {i:05d} " + "x" * 80)

    trio.run(main)


def devices(home: Path) -> list[dict[str, Any]]:
    out = run_p2p(home, "devices", "--json").stdout
    return [json.loads(line) for line in out.splitlines()]


@pytest.fixture
def primary(tmp_path: Path) -> Path:
    home = tmp_path / "phone"
    run_p2p(home, "init", "--name", "phone")
    fill(home, 3000)
    return home


def test_four_companions_link_with_full_history_and_a_fifth_is_refused(
    tmp_path: Path, primary: Path
) -> None:
    homes = []
    for name in ("laptop", "desktop", "tablet", "web"):
        home = tmp_path / name
        linker = Linker(home, name)
        approved = run_p2p(primary, "approve", linker.code, "--yes", "--json")
        assert json.loads(approved.stdout.splitlines()[-1])["device"] == linker.device
        assert linker.wait() == 0
        assert linker.events[-1]["event"] == "enrolled"
        assert any(e.get("event") == "check" for e in linker.events)
        homes.append(home)
    want = log(primary)
    assert len(want) == 3000
    for home in homes:
        assert log(home) == want
    # companions linked early learn of the later ones by gossip once they run
    phone = Node(primary, "--listen", "127.0.0.1:0", "--no-mdns")
    running = [
        Node(h, "--listen", "127.0.0.1:0", "--no-mdns", "--peer", phone.address) for h in homes
    ]
    try:

        def listed(home: Path) -> list[tuple[str, str]]:
            return sorted((d["id"], d["role"]) for d in devices(home))

        wait_until(lambda: all(listed(h) == listed(primary) for h in homes), timeout=30)
        assert len(listed(primary)) == 5
        # every device reports the devices linked after it ("new device linked")
        assert all(d["linked_ms"] for d in devices(primary) if d["role"] == "companion")
        wait_until(
            lambda: all(
                d["linked_ms"]
                for d in devices(homes[0])
                if d["role"] == "companion" and not d["this"]
            ),
            timeout=30,
        )
    finally:
        for node in [*running, phone]:
            node.stop()

    fifth = Linker(tmp_path / "tv", "tv")  # the primary plus four companions is the limit
    refused = run_p2p(primary, "approve", fifth.code, "--yes", check=False)
    assert refused.returncode == 1
    assert "4 companions" in refused.stderr
    fifth.stop()
    assert len(devices(primary)) == 5


def tampered(code: str) -> str:
    i = len(code) // 2
    return code[:i] + ("A" if code[i] != "A" else "B") + code[i + 1 :]


def test_bad_codes_are_refused_and_nothing_is_linked(tmp_path: Path, primary: Path) -> None:
    before = devices(primary)
    linker = Linker(tmp_path / "laptop", "laptop")
    cases = {
        "tampered": (tampered(linker.code), "checksum"),
        "wrong check code": (linker.code, "differs"),
    }
    for _, (code, reason) in cases.items():
        extra = ["--check", "000-000"] if code == linker.code else ["--yes"]
        refused = run_p2p(primary, "approve", code, *extra, check=False)
        assert refused.returncode == 1, refused.stdout
        assert reason in refused.stderr
        assert "Traceback" not in refused.stderr
    assert devices(primary) == before
    assert run_p2p(primary, "approve", linker.code, "--yes").returncode == 0  # still usable
    assert linker.wait() == 0
    reused = run_p2p(primary, "approve", linker.code, "--yes", check=False)
    assert reused.returncode == 1
    assert "used already" in reused.stderr

    short_lived = Linker(tmp_path / "tablet", "tablet", "--ttl", "1")
    time.sleep(2.5)  # whole seconds: past the expiry however the clock ticks
    expired = run_p2p(primary, "approve", short_lived.code, "--yes", check=False)
    assert expired.returncode == 1
    assert "expired" in expired.stderr
    short_lived.stop()
    assert len(devices(primary)) == 2


class CuttingProxy:
    """Forwards one connection to ``target``, cutting it after ``limit`` bytes downstream."""

    def __init__(self, target: str, limit: int) -> None:
        self.target = target
        self.limit = limit
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.forwarded = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.listener.settimeout(30)
        client, _ = self.listener.accept()
        host, port = self.target.rsplit(":", 1)
        upstream = socket.create_connection((host, int(port)), timeout=30)

        def pump(src: socket.socket, dst: socket.socket, counted: bool) -> None:
            try:
                while data := src.recv(65536):
                    if counted:
                        allowed = self.limit - self.forwarded
                        data = data[: max(0, allowed)]
                        self.forwarded += len(data)
                    if data:
                        dst.sendall(data)
                    if counted and self.forwarded >= self.limit:
                        break
            except OSError:
                pass
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

        up = threading.Thread(target=pump, args=(client, upstream, True))
        up.start()
        pump(upstream, client, False)
        up.join(timeout=30)
        client.close()
        upstream.close()
        self.listener.close()


def test_history_transfer_cut_at_half_resumes_without_resending(
    tmp_path: Path, primary: Path
) -> None:
    linker = Linker(tmp_path / "laptop", "laptop")
    target = PairingCode.decode(linker.code).addresses[0]
    proxy = CuttingProxy(target, limit=600_000)  # about half of the history
    cut = run_p2p(primary, "approve", linker.code, "--yes", "--connect", proxy.address, check=False)
    assert cut.returncode == 1
    wait_until(lambda: any(e.get("event") == "failed" for e in linker.events), timeout=20)
    kept = max(e["done"] for e in linker.events if e.get("event") == "progress")
    total = linker.events[0]["total"] if linker.events[0].get("event") == "progress" else None
    assert kept > 0
    resumed = run_p2p(primary, "approve", linker.code, "--yes", "--json")
    assert json.loads(resumed.stdout.splitlines()[-1])["event"] == "linked"
    assert linker.wait() == 0
    progress = [e for e in linker.events if e.get("event") == "progress"]
    second_start = [e["done"] for e in progress if e["done"] >= kept]
    assert second_start, "the second attempt did not start where the first stopped"
    assert total is None or progress[-1]["total"] == total
    got = log(tmp_path / "laptop")
    assert len(got) == 3000
    assert len({m["id"] for m in got}) == 3000
    assert got == log(primary)


def test_a_new_device_is_announced_to_running_companions(tmp_path: Path) -> None:
    phone_home, laptop_home = tmp_path / "phone", tmp_path / "laptop"
    run_p2p(phone_home, "init", "--name", "phone")
    phone = Node(phone_home, "--listen", "127.0.0.1:0", "--no-mdns")
    try:
        linker = Linker(laptop_home, "laptop")
        run_p2p(phone_home, "approve", linker.code, "--yes")  # through the running node
        assert linker.wait() == 0
        laptop = Node(laptop_home, "--listen", "127.0.0.1:0", "--no-mdns", "--peer", phone.address)
        try:
            laptop.wait_for("peer_connected", device=phone.device)
            tablet = Linker(tmp_path / "tablet", "tablet")
            run_p2p(phone_home, "approve", tablet.code, "--yes")
            assert tablet.wait() == 0
            announced = laptop.wait_for("device_list_changed")
            assert announced["added"] == [tablet.device]
        finally:
            laptop.stop()
    finally:
        phone.stop()


# ---- revocation, at the protocol level where every byte can be watched -------------


def linked_trio() -> tuple[DeviceState, DeviceState, DeviceState]:
    phone, _ = DeviceState.create_account("phone")
    companions = []
    for name in ("laptop", "tablet"):
        keys = DeviceKeys.generate()
        bundle, _ = phone.enroll(keys, name)
        companions.append(DeviceState.from_enrollment(keys, name, bundle)[0])
    laptop, tablet = companions
    for c in companions:
        c.offer_device_list(phone.device_list.encode())
    return phone, laptop, tablet


def test_an_unlinked_device_reads_nothing_new_and_is_refused_everywhere() -> None:
    phone, laptop, tablet = linked_trio()
    chat = phone.chat_by_name(NOTES).id
    old_list = phone.device_list.encode()
    phone.unlink(tablet.device_id)
    assert laptop.offer_device_list(phone.device_list.encode()) is not None  # gossip
    assert laptop.space(chat).epoch == phone.space(chat).epoch == 1

    # everything sent after the unlink, as a recording of all traffic would hold it
    traffic = []
    for author in (phone, laptop):
        entry = author.new_entry(chat, "msg", 1_767_225_600_000, body=f"after from {author.name}")
        update, _ = author.write_local(chat, [entry])
        traffic.append(author.seal(chat, update))
    for env in traffic:
        for reader in (phone, laptop):
            if reader is not (phone if env is traffic[0] else laptop):
                reader.ingest(env)
        with pytest.raises(UnknownKey):
            tablet.ingest(env)  # keeps its keys and store: still cannot open it
    shown, _ = tablet.space(chat).replica.view(tablet.any_signing_key, tablet.belongs)
    assert not any(m.text.startswith("after") for m in shown)

    # what the removed device sends is refused by every remaining device
    entry = tablet.new_entry(chat, "msg", 1_767_225_600_001, body="from the removed tablet")
    update, _ = tablet.write_local(chat, [entry])
    forged = tablet.seal(chat, update)
    for reader in (phone, laptop):
        with pytest.raises(RemovedDevice):
            reader.ingest(forged)

    # its handshake is refused, and so is the old list it still holds
    for peer in (phone, laptop):
        a = Session(local=tablet, initiator=True, now=0.0)
        b = Session(local=peer, initiator=False, now=0.0)
        # (session that produced it, output)
        flights = [(a, o) for o in a.start()] + [(b, o) for o in b.start()]
        closed = []
        while flights:
            producer, out = flights.pop(0)
            if isinstance(out, Send):
                receiver = b if producer is a else a
                flights += [(receiver, o) for o in receiver.receive(out.data, 0.0)]
            elif isinstance(out, Closed) and producer is b:
                closed.append(out)
            assert not (isinstance(out, Authenticated) and producer is b)
        assert closed
        # it holds only the old epoch's key: it cannot even check our hello, says so,
        # and never learns the current list (RemovedDevice if it got that far)
        assert isinstance(closed[0].error, HandshakeFailed | RemovedDevice)
        with pytest.raises(RollbackRefused):
            peer.offer_device_list(old_list)


def test_approving_through_a_running_node_asks_the_person_to_compare(tmp_path: Path) -> None:
    phone_home = tmp_path / "phone"
    run_p2p(phone_home, "init", "--name", "phone")
    phone = Node(phone_home, "--listen", "127.0.0.1:0", "--no-mdns")
    try:
        linker = Linker(tmp_path / "laptop", "laptop")

        def approve(answer: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [*P2P, "--home", str(phone_home), "approve", linker.code],
                input=answer,
                capture_output=True,
                text=True,
                timeout=60,
            )

        refused = approve("n\n")
        assert refused.returncode == 1
        assert "check code" in refused.stdout  # the prompt showed the digits
        assert len(devices(phone_home)) == 1
        shown = [e["check"] for e in linker.events if e.get("event") == "check"]
        assert shown, "the new device showed no check code"
        accepted = approve("y\n")
        assert accepted.returncode == 0, accepted.stderr
        assert linker.wait() == 0
        assert len(devices(phone_home)) == 2
    finally:
        phone.stop()
