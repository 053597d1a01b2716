"""Linking and unlinking devices, with real processes where a person would use them."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from procs import P2P, Child, Linker, Node, log, wait_until
from procs import p2p as run_p2p

import p2p
from p2p.errors import HandshakeFailed, RemovedDevice, RollbackRefused, UnknownKey
from p2p.proto.identity import DeviceKeys
from p2p.proto.pairing import PairingCode, check_code, same_check_code
from p2p.proto.ysplit import split_update
from p2p.state.device import NOTES, DeviceState
from p2p.testing.sessions import Pair

pytestmark = pytest.mark.slow


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
    """Forwards one connection to ``target``, cutting it after ``limit`` bytes downstream
    (``stall``: holding the rest back instead, the connection left open until the target
    end closes)."""

    def __init__(self, target: str, limit: int, *, stall: bool = False) -> None:
        self.target = target
        self.limit = limit
        self.stall = stall
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
                        if self.stall:
                            return  # the other direction closes both when the target ends
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
    counts = [e["messages_done"] for e in progress]  # across both attempts
    assert counts == sorted(counts)
    assert progress[-1]["messages_done"] == progress[-1]["messages_total"] == 3000
    got = log(tmp_path / "laptop")
    assert len(got) == 3000
    assert len({m["id"] for m in got}) == 3000
    assert got == log(primary)


def test_a_link_killed_midway_leaves_no_device_listed_and_a_retry_links(
    tmp_path: Path, primary: Path
) -> None:
    """The new device is SIGKILLed with half its history received: the primary's list
    does not hold it (it is listed only once it confirms the whole history), nothing
    counts against the companion limit, and the device, started again, links."""
    laptop = tmp_path / "laptop"
    linker = Linker(laptop, "laptop")
    target = PairingCode.decode(linker.code).addresses[0]
    proxy = CuttingProxy(target, limit=600_000, stall=True)  # about half, then held
    approving = Child(
        [*P2P, "--home", str(primary), "approve", linker.code, "--yes", "--connect", proxy.address],
        logs=tmp_path,
    )
    try:
        wait_until(
            lambda: any(e.get("event") == "progress" and e["done"] > 0 for e in linker.events),
            timeout=30,
        )
        linker.kill()  # SIGKILL, in the middle of the history
        assert approving.wait(timeout=90) == 1
    finally:
        approving.kill()
    assert [d["role"] for d in devices(primary)] == ["primary"]  # no phantom laptop
    retry = Linker(laptop, "laptop")  # the same device: its keys were kept
    assert retry.device == linker.device
    linked = run_p2p(primary, "approve", retry.code, "--yes", "--json")
    assert json.loads(linked.stdout.splitlines()[-1])["event"] == "linked"
    assert retry.wait() == 0
    assert retry.device in {d["id"] for d in devices(primary)}
    assert len(devices(primary)) == 2
    got = log(laptop)
    assert len(got) == 3000
    assert got == log(primary)


def test_the_new_device_counts_messages_and_bytes_as_history_arrives(tmp_path: Path) -> None:
    """``p2p link --json`` reports, beside the bytes, the messages received so far and the
    messages the history holds: exact counts, over several chats, never going back."""
    phone = tmp_path / "phone"
    run_p2p(phone, "init", "--name", "phone")
    chats: list[str] = []

    async def main() -> None:
        async with p2p.open_node(phone) as node:
            family = await node.create_chat("family")
            work = await node.create_chat("work")
            chats.extend([node.default_chat(), family, work])
            for i in range(120):
                await node.send(f"note {i}")
            for i in range(90):  # big enough that this chat's history spans chunks
                await node.send(f"family {i} " + "y" * 4000, chat=family)
            last = ""
            for i in range(60):
                last = await node.send(f"work {i}", chat=work)
            # neither an edit nor a reaction is a message
            await node.edit(last, "work, edited", chat=work)
            await node.react(last, "+1", chat=work)

    trio.run(main)
    sent = 120 + 90 + 60
    linker = Linker(tmp_path / "laptop", "laptop")
    approved = run_p2p(phone, "approve", linker.code, "--yes", "--json").stdout.splitlines()
    assert linker.wait() == 0
    sending = [e for e in map(json.loads, approved) if e.get("event") == "progress"]
    assert sending[-1]["messages_done"] == sending[-1]["messages_total"] == sent  # the primary's
    progress = [e for e in linker.events if e.get("event") == "progress"]
    last = progress[-1]
    assert last["messages_done"] == last["messages_total"] == sent
    assert last["done"] == last["total"] > 90 * 4000  # bytes stay bytes
    counts = [e["messages_done"] for e in progress]
    assert counts == sorted(counts), counts
    assert all(e["messages_total"] == sent for e in progress)
    assert len(set(counts)) >= 3, counts  # counted as each chat arrives, not once at the end
    assert [len(log(tmp_path / "laptop", c)) for c in chats] == [120, 90, 60]


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
        pair = Pair(tablet, peer).start()
        pair.run()
        assert pair.b.authenticated == []
        closed = pair.b.closed
        assert closed
        # it holds only the old epoch's key: it cannot even check our hello, says so,
        # and never learns the current list (RemovedDevice if it got that far)
        assert isinstance(closed[0].error, HandshakeFailed | RemovedDevice)
        with pytest.raises(RollbackRefused):
            peer.offer_device_list(old_list)


CHECK = re.compile(r"\b(\d{3}-\d{3})\b")


def approve_comparing(home: Path, linker: Linker, *, answer: str) -> tuple[str, str, int]:
    """``p2p approve CODE`` at its prompt, as a person would: read the digits the primary
    shows, those the new device shows (the latest attempt's), answer. Returns both and
    the exit code."""
    before = linker.count("check")
    person = Child(
        [*P2P, "--home", str(home), "approve", linker.code], logs=home.parent, stdin=True
    )
    try:
        prompt = person.wait_text(lambda text: "[y/N]" in text, timeout=60)
        warned = person.stderr()  # before the digits: who asks to join, and from where
        assert "asks to join your account" in warned, warned
        assert linker.device in warned
        found = CHECK.search(prompt)
        assert found, prompt
        linker.wait_line(lambda _: linker.count("check") > before, timeout=30)
        on_device = [e["check"] for e in linker.events if e.get("event") == "check"][-1]
        person.type(answer)
        return found.group(1), on_device, person.wait(timeout=60)
    finally:
        person.kill()


def test_both_screens_show_the_same_check_code_and_a_match_links(
    tmp_path: Path, primary: Path
) -> None:
    linker = Linker(tmp_path / "laptop", "laptop")
    on_primary, on_device, code = approve_comparing(primary, linker, answer="y")
    assert CHECK.fullmatch(on_device)
    assert on_primary == on_device
    assert code == 0
    assert linker.wait() == 0
    assert len(devices(primary)) == 2


def test_a_swapped_pairing_code_shows_different_digits_on_the_two_screens(
    tmp_path: Path, primary: Path
) -> None:
    """The attack the check code exists for: someone swaps our new laptop's code for the
    code of a device of theirs and, in turn, answers our laptop as a primary itself. Our
    primary then talks to their device and our laptop to their primary: each pair agrees,
    but the two screens in front of us differ."""
    ours = Linker(tmp_path / "laptop", "laptop")
    theirs = Linker(tmp_path / "mallory-device", "laptop")
    mallory = tmp_path / "mallory"
    run_p2p(mallory, "init", "--name", "mallory")
    mallory_sees, on_our_laptop, code = approve_comparing(mallory, ours, answer="n")
    assert (mallory_sees, code) == (on_our_laptop, 1)
    on_our_primary, on_their_device, code = approve_comparing(primary, theirs, answer="n")
    assert on_our_primary == on_their_device
    assert on_our_primary != on_our_laptop  # what we compare: different, so we say no
    assert code == 1
    assert len(devices(primary)) == 1
    ours.stop()
    theirs.stop()


def test_a_script_that_types_the_right_check_code_links(tmp_path: Path, primary: Path) -> None:
    """What ``approve --check DIGITS`` does, with the digits the new device shows as they
    appear (a script reading the other screen): ``same_check_code`` accepts them."""
    linker = Linker(tmp_path / "laptop", "laptop")
    typed: list[str] = []

    async def confirm(digits: str) -> bool:
        await trio.to_thread.run_sync(lambda: linker.wait_for("check", timeout=30))
        shown = linker.wait_for("check")["check"]
        typed.append(shown.replace("-", " "))  # people type it with a space, or none
        return same_check_code(digits, typed[-1])

    async def main() -> None:
        async with p2p.open_node(primary) as node:
            await node.approve(linker.code, confirm=confirm)

    trio.run(main)
    assert linker.wait() == 0
    assert len(typed) == 1
    assert len(devices(primary)) == 2


def test_check_codes_depend_on_the_secret_and_compare_loosely() -> None:
    transcript = b"the same transcript"
    shown = check_code(transcript, b"s" * 32)
    assert CHECK.fullmatch(shown)
    assert check_code(transcript, b"s" * 32) == shown
    assert check_code(transcript, b"t" * 32) != shown
    assert check_code(transcript + b"!", b"s" * 32) != shown
    assert same_check_code(shown, shown)
    assert same_check_code(shown, shown.replace("-", ""))
    assert same_check_code(shown, " " + shown.replace("-", " ") + " ")
    wrong = f"{(int(shown.replace('-', '')) + 1) % 1_000_000:06d}"
    assert not same_check_code(shown, wrong)
    assert not same_check_code(shown, shown[:-1])
    assert not same_check_code(shown, "")


def test_approving_through_a_running_node_asks_the_person_to_compare(tmp_path: Path) -> None:
    phone_home = tmp_path / "phone"
    run_p2p(phone_home, "init", "--name", "phone")
    phone = Node(phone_home, "--listen", "127.0.0.1:0", "--no-mdns")
    try:
        linker = Linker(tmp_path / "laptop", "laptop")

        on_primary, on_device, code = approve_comparing(phone_home, linker, answer="n")
        assert code == 1
        assert on_primary == on_device  # both screens showed the same digits
        assert len(devices(phone_home)) == 1
        on_primary, on_device, code = approve_comparing(phone_home, linker, answer="y")
        assert code == 0
        assert on_primary == on_device
        assert linker.wait() == 0
        assert len(devices(phone_home)) == 2
    finally:
        phone.stop()


def test_the_link_bar_reads_messages_then_megabytes() -> None:
    from p2p.app.cli import _link_label

    assert _link_label(3_100_000, 380_000_000, 12_345, 1_000_000) == (
        "12,345 / 1,000,000 messages · 3.1 / 380 MB"
    )
    assert _link_label(3_100_000, 38_000_000, None, None) == "3.1 / 38.0 MB"  # count unknown


# ---- history of any size: what a link holds in memory ------------------------------


class CodeScreen:
    """The new device's screen, in process: keeps the code and the progress."""

    def __init__(self) -> None:
        self.text = ""
        self.ready = trio.Event()
        self.progress_seen: list[tuple[int, int, int | None, int | None]] = []
        self.failures: list[Exception] = []

    def code(self, text: str, device: str) -> None:
        self.text = text
        self.ready.set()

    def check(self, digits: str) -> None:
        pass

    def progress(
        self, done: int, total: int, messages_done: int | None, messages_total: int | None
    ) -> None:
        self.progress_seen.append((done, total, messages_done, messages_total))

    def failed(self, error: Exception) -> None:
        self.failures.append(error)


def link_in_process(primary: Path, new: Path) -> CodeScreen:
    """``p2p link`` and ``p2p approve`` in this process, over loopback TCP: the primary
    a node opened on ``primary``, the new device ``wait_for_primary`` on ``new``."""
    from p2p.runtime.linking import wait_for_primary

    screen = CodeScreen()

    async def yes(digits: str) -> bool:
        return True

    async def main() -> None:
        with trio.fail_after(120):
            async with p2p.open_node(primary) as node, trio.open_nursery() as nursery:

                async def new_device() -> None:
                    await wait_for_primary(
                        new, "laptop", listen="127.0.0.1:0", ttl_s=100,
                        now_s=int(time.time()), ui=screen,
                    )  # fmt: skip

                nursery.start_soon(new_device)
                await screen.ready.wait()
                await node.approve(screen.text, confirm=yes)

    trio.run(main)
    return screen


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The space of every document loaded from now on, on any device of this process."""
    from p2p.proto.model import Replica

    seen: list[str] = []
    original = Replica.load

    def load(self: Replica, *args: Any, **kwargs: Any) -> None:
        if not self.loaded:
            seen.append(self.space)
        original(self, *args, **kwargs)

    monkeypatch.setattr(Replica, "load", load)
    return seen


def chats_of(home: Path) -> dict[str, str]:
    """Chat name -> id, of the device stored in ``home``."""
    from p2p.runtime.home import open_home_store

    store = open_home_store(home)
    try:
        state = DeviceState.load(store)
        return {s.name: s.id for s in state.spaces.values() if s.kind == "chat"}
    finally:
        store.close()


def test_a_link_loads_no_chat_on_either_side(tmp_path: Path, loads: list[str]) -> None:
    """The primary sends each chat from its store and the new device writes each piece
    as it comes: messages, receipts and read markers of two chats move without either
    side loading a chat's document (it loaded every one before: the primary to take a
    snapshot, the new device to build each chat whole in memory)."""
    phone, laptop = tmp_path / "phone", tmp_path / "laptop"
    run_p2p(phone, "init", "--name", "phone")

    async def write() -> None:
        async with p2p.open_node(phone) as node:
            family = await node.create_chat("family")
            for i in range(150):
                await node.send(f"note {i} " + "n" * 300)
                await node.send(f"family {i} " + "f" * 300, chat=family)
            await node.mark_read()
            await node.mark_read(chat=family)

    trio.run(write)
    chats = set(chats_of(phone).values())
    loads.clear()
    screen = link_in_process(phone, laptop)
    assert not screen.failures
    assert not chats & set(loads), "a chat's document was loaded"
    assert log(laptop) == log(phone)
    assert log(laptop, "family") == log(phone, "family")
    done, total, messages_done, messages_total = screen.progress_seen[-1]
    assert done == total > 300 * 300
    assert messages_done == messages_total == 300


def folded_family(phone: Path, part: int, messages: int = 20) -> str:
    """A primary whose chat "family" was written over three runs (three CRDT clients),
    with an edit, a deletion and a reaction replaced in each, then folded into a
    snapshot stored in parts of ``part`` bytes (as the writer folds a loaded chat).
    One part lists the clients as yrs does, the highest first (an item then comes
    before the one it follows); parts list them in increasing order."""
    from p2p.runtime.home import open_home_store

    run_p2p(phone, "init", "--name", "phone")
    ids: list[str] = []

    async def write(run: int) -> None:
        async with p2p.open_node(phone) as node:
            family = await node.create_chat("family") if run == 0 else "family"
            for i in range(messages):
                ids.append(await node.send(f"family {run}.{i}", chat=family))
            await node.edit(ids[3 + run], f"family {run}, edited", chat=family)
            await node.delete(ids[10 + run], chat=family)
            for emoji in ("+1", "heart")[: 1 + run % 2]:
                await node.react(ids[7], f"{emoji} {run}", chat=family)  # replaces the last
            for i in range(10):
                await node.send(f"note {run}.{i}")

    for run in range(3):
        trio.run(write, run)
    family = chats_of(phone)["family"]
    store = open_home_store(phone)
    try:
        replica = DeviceState.load(store).space(family).replica
        parts = [bytes(p) for p in split_update(replica.snapshot(), part)]
        assert (len(parts) > 1) == (part < 100_000)
        store.compact(family, parts, store.log_seqs(family)[1])
    finally:
        store.close()
    return family


def assert_family_linked(phone: Path, laptop: Path) -> None:
    """The new device shows the folded family chat (and the rest) as the primary does."""
    theirs = log(laptop, "family")
    assert theirs == log(phone, "family")
    by_text = {m["text"]: m for m in theirs}
    assert [by_text[f"family {run}, edited"]["edited"] for run in range(3)] == [True] * 3
    assert sum(m["deleted"] for m in theirs) == 3
    assert list(by_text["family 0.7"]["reactions"].values()) == ["+1 2"]
    assert log(laptop) == log(phone)


@pytest.mark.parametrize("part", [1 << 20, 1024], ids=["one part", "parts"])
def test_a_compacted_history_with_edits_and_deletions_links_exactly(
    tmp_path: Path, loads: list[str], part: int
) -> None:
    """A chat written over three runs of the phone and folded into a snapshot, with
    edits, deletions and a reaction replaced in each run: its replaced items are runs
    of deleted content, whose keys the new device follows through their chains (even
    where an item comes before the one it follows). No chat's document loads on
    either side, and the new device ends with the primary's messages, edits,
    deletions and reactions."""
    phone, laptop = tmp_path / "phone", tmp_path / "laptop"
    folded_family(phone, part)
    loads.clear()
    screen = link_in_process(phone, laptop)
    assert not screen.failures
    assert not set(loads) & set(chats_of(phone).values())
    assert_family_linked(phone, laptop)


def test_a_compacted_history_cut_midway_resumes_and_links_exactly(tmp_path: Path) -> None:
    """The folded chat's link is cut part-way: the new device kept what it took by the
    key chains (values indexed, side heads stated), and the next attempt, which holds
    part of the chat and so follows no chains, ends equal to the primary."""
    phone = tmp_path / "phone"
    folded_family(phone, 1024, messages=300)
    linker = Linker(tmp_path / "laptop", "laptop")
    target = PairingCode.decode(linker.code).addresses[0]
    proxy = CuttingProxy(target, limit=60_000)  # within the family chat's pieces
    cut = run_p2p(phone, "approve", linker.code, "--yes", "--connect", proxy.address, check=False)
    assert cut.returncode == 1
    wait_until(lambda: any(e.get("event") == "failed" for e in linker.events), timeout=20)
    assert max(e["done"] for e in linker.events if e.get("event") == "progress") > 0
    resumed = run_p2p(phone, "approve", linker.code, "--yes", "--json")
    assert json.loads(resumed.stdout.splitlines()[-1])["event"] == "linked"
    assert linker.wait() == 0
    assert_family_linked(phone, tmp_path / "laptop")


@pytest.mark.parametrize("threads", [1, 2])
def test_a_new_device_verifies_every_entry_its_primary_did_not_write(threads: int) -> None:
    """The link's box stands for the primary (the account key signed the list that
    names the new device), so the primary's own entries are taken on its word, as a
    session takes its sender's: every other entry's signature is checked. A tablet's
    message altered in the primary's store stays hidden on the new device, whether
    the checks run in line or beforehand on two threads (as ``p2p link`` runs them)."""
    from concurrent.futures import ThreadPoolExecutor
    from dataclasses import replace
    from functools import partial

    from p2p.proto.ysplit import split_update
    from p2p.runtime.linking import _check_on_two_threads
    from p2p.storage.memory import MemoryStore

    phone, _ = DeviceState.create_account("phone")
    tablet_keys = DeviceKeys.generate()
    bundle, _ = phone.enroll(tablet_keys, "tablet")
    tablet, _ = DeviceState.from_enrollment(tablet_keys, "tablet", bundle)
    chat = phone.chat_by_name(NOTES).id
    phone.write_local(chat, [phone.new_entry(chat, "msg", 1000, body="the phone's")])
    real = tablet.new_entry(chat, "msg", 2000, body="the tablet's")
    phone.space(chat).replica.write([replace(real, body="altered")])
    laptop_keys = DeviceKeys.generate()
    bundle, _ = phone.enroll(laptop_keys, "laptop")
    store = MemoryStore()
    laptop = DeviceState.enrolling(laptop_keys, "laptop", bundle, store)
    helper = ThreadPoolExecutor(max_workers=1)
    check_all = partial(_check_on_two_threads, helper) if threads == 2 else None
    for space in sorted(bundle.enrolled, key=lambda s: s.kind != "account"):
        for piece in split_update(space.history, 300):
            laptop.enroll_piece(space.id, piece, store, check_all)
    helper.shutdown()
    store.write(laptop.finish_enrollment(store))
    hidden = {row.key: row.reason for row in store.index_rejected(chat)}
    assert hidden == {real.id: "bad signature"}
    shown = store.index_messages(chat)
    assert [row.body for row in shown] == ["the phone's"]
