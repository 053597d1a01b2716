"""The ``p2p`` command as a person meets it: real processes on loopback, real homes.

What it prints for people (names, not ids; nothing a peer wrote can steer the
terminal), what it refuses, and how it ends (one line, never a traceback).
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path

import pytest
import trio
from procs import P2P, Lines, Node, p2p, wait_until
from trio_websocket import WebSocketRequest, serve_websocket

from p2p.proto.relay_protocol import encode_server
from p2p.testing import provision_homes

pytestmark = pytest.mark.slow

ESC = "\x1b"
OSC52 = f"{ESC}]52;c;ZWNobyBwd25lZA==\a"
"""Writes "echo pwned" to the clipboard of a terminal that obeys it."""
FAKE_LINE = f"{ESC}[2K\r2026-01-01 00:00:00 primary: transfer approved"


def no_control(text: str) -> bool:
    """True when ``text`` holds no character that steers a terminal (newlines between
    the lines the command itself prints are allowed)."""
    return not any((ord(c) < 32 and c != "\n") or 0x7F <= ord(c) < 0xA0 for c in text)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "phone"
    provision_homes([h])
    return h


def test_log_and_names_show_escape_sequences_escaped_and_json_exact(
    tmp_path: Path, home: Path
) -> None:
    hostile = f"hi{OSC52}{FAKE_LINE}\u202eevil"
    p2p(home, "send", hostile)
    p2p(home, "send", "two\nlines")
    out = p2p(home, "log").stdout
    assert no_control(out), repr(out)
    assert "\\x1b]52;c;ZWNobyBwd25lZA==\\x07" in out
    assert "\\u202e" in out
    # a newline a sender wrote continues the message, indented: it cannot pass for a line
    lines = out.splitlines()
    assert lines[-1] == "    lines"
    # JSON stays exact
    rows = [json.loads(line) for line in p2p(home, "log", "--json").stdout.splitlines()]
    assert [r["text"] for r in rows] == [hostile, "two\nlines"]

    # a device name is someone's words too (it travels in the signed device list)
    other = tmp_path / "other"
    named = p2p(other, "init", "--name", f"lap{OSC52}top")
    assert no_control(named.stdout)
    assert "\\x1b]52" in named.stdout
    assert no_control(p2p(other, "status").stdout)
    assert no_control(p2p(other, "devices").stdout)
    assert json.loads(p2p(other, "status", "--json").stdout)["name"] == f"lap{OSC52}top"


def _fake_relay(port_box: list[int], ready: threading.Event) -> None:
    """A websocket server that challenges, then closes with a hostile reason."""

    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        await ws.send_message(
            encode_server("challenge", nonce=b"n" * 32, relay=f"ws://127.0.0.1:{port_box[-1]}")
        )
        await ws.get_message()  # the device's signed auth
        await ws.aclose(code=4001, reason=f"no{OSC52}{FAKE_LINE}")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
            port_box.append(server.port)  # bound here, on port 0: nobody else's port
            ready.set()
            await trio.sleep(60)
            nursery.cancel_scope.cancel()

    trio.run(main)


@pytest.fixture
def hostile_relay() -> str:
    ready = threading.Event()
    port_box: list[int] = []
    thread = threading.Thread(target=_fake_relay, args=(port_box, ready), daemon=True)
    thread.start()
    assert ready.wait(10)
    return f"ws://127.0.0.1:{port_box[-1]}"


def test_run_prints_a_relays_words_escaped(home: Path, hostile_relay: str) -> None:
    node = Node(home, "--listen", "127.0.0.1:0", "--no-mdns", "--relay", hostile_relay)
    try:
        node.drain(settle=3)
    finally:
        node.stop()
    err = node.stderr()
    assert "the relay refused us" in err, err
    assert no_control(err), repr(err)


def run(home: Path, *peers: str) -> Node:
    extra = [a for p in peers for a in ("--peer", p)]
    return Node(home, "--listen", "127.0.0.1:0", "--no-mdns", *extra)


def test_people_and_devices_are_shown_by_name_with_ids_on_demand(tmp_path: Path) -> None:
    phone, laptop, bea = tmp_path / "phone", tmp_path / "laptop", tmp_path / "bea"
    phone_id, laptop_id = provision_homes([phone, laptop])
    p2p(phone, "send", "hello from the phone")
    line = p2p(phone, "log").stdout.splitlines()[-1]
    assert " phone: hello from the phone" in line
    assert phone_id not in line
    message = json.loads(p2p(phone, "log", "--json").stdout)
    assert message["device"] == phone_id  # ids stay in JSON
    assert f"{message['id']} phone ({phone_id})" in p2p(phone, "log", "--ids").stdout

    p2p(bea, "init", "--name", "bea-phone")
    code = json.loads(p2p(bea, "contact", "code", "--json").stdout)["code"]
    added = p2p(phone, "contact", "add", code, "--name", "Bea").stdout
    assert added.startswith("added contact Bea (")

    nodes = [run(phone)]
    try:
        nodes.append(run(laptop, nodes[0].address))
        nodes[0].wait_for("peer_connected", device=laptop_id)
        assert f"peer laptop ({laptop_id})" in p2p(phone, "status").stdout
        # the primary unlinks a device by its name, as --chat takes chat names
        done = p2p(phone, "unlink", "laptop")
        assert "unlinked laptop" in done.stdout
    finally:
        for n in nodes:
            n.stop()
    devices = [json.loads(line) for line in p2p(phone, "devices", "--json").stdout.splitlines()]
    assert [d["name"] for d in devices] == ["phone"]


def test_log_follow_shows_messages_edits_reactions_deletions_by_name(tmp_path: Path) -> None:
    phone, laptop = tmp_path / "phone", tmp_path / "laptop"
    provision_homes([phone, laptop])
    nodes = [run(phone)]
    closing: list[Lines] = []
    try:
        nodes.append(run(laptop, nodes[0].address))
        nodes[0].wait_for("peer_connected")
        p2p(phone, "send", "before following")
        follow = Lines(phone, "log", "--follow")
        closing.append(follow)
        follow.wait_for("phone: before following")
        p2p(laptop, "send", "hello from the laptop")
        follow.wait_for("laptop: hello from the laptop")
        message = json.loads(p2p(laptop, "log", "--json").stdout.splitlines()[-1])["id"]
        p2p(laptop, "edit", message, "hello, edited")
        follow.wait_for("laptop edited:")
        follow.wait_for("laptop: hello, edited (edited)")
        p2p(phone, "react", message, "👍")
        follow.wait_for("me reacted 👍 to 'hello, edited'")
        p2p(laptop, "delete", message)
        follow.wait_for(f"laptop deleted a message ({message})")
        code, err = follow.interrupt()
        assert code == 130
        assert "Traceback" not in err
    finally:
        for c in closing:
            c.close()
        for n in nodes:
            n.stop()
    # without a running node, following says what to do
    done = p2p(phone, "log", "--follow", check=False)
    assert done.returncode == 1
    assert "p2p run" in done.stderr


def test_small_things_a_first_user_meets(home: Path) -> None:
    assert p2p(home, "--version").stdout.startswith("p2p ")
    empty = p2p(home, "send", "", check=False)
    assert empty.returncode == 2
    assert "empty" in empty.stderr
    assert p2p(home, "send", "   ", check=False).returncode == 2
    assert p2p(home, "log").stdout == ""


def test_ctrl_c_while_link_waits_is_one_line(tmp_path: Path) -> None:
    waiting = Lines(tmp_path / "tablet", "link", "--name", "tablet", "--listen", "127.0.0.1:0")
    try:
        waiting.wait_for("waiting for the primary")
        code, err = waiting.interrupt()
    finally:
        waiting.close()
    assert code == 130
    assert err.strip() == "p2p: interrupted"


def test_a_reader_that_stops_early_ends_the_log_quietly(home: Path) -> None:
    for _ in range(8):  # far more than a pipe holds: the log is still writing
        p2p(home, "send", "ab\n" * 20_000)
    log = subprocess.Popen(
        [*P2P, "--home", str(home), "log"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert log.stdout is not None
    assert log.stderr is not None
    try:
        assert log.stdout.readline()  # as `p2p log | head -1` reads
        log.stdout.close()
        code = log.wait(timeout=30)
        err = log.stderr.read()
    finally:
        log.kill()
        log.stderr.close()
    assert code == 0
    assert err == ""


def test_errors_read_the_same_with_and_without_a_node_and_say_where_to_look(
    tmp_path: Path, home: Path
) -> None:
    p2p(home, "send", "x")
    offline = p2p(home, "log", "--chat", "note", check=False)
    node = run(home)
    try:
        online = p2p(home, "log", "--chat", "note", check=False)
    finally:
        node.stop()
    assert offline.returncode == online.returncode == 1
    assert offline.stderr == online.stderr
    assert (
        offline.stderr.strip()
        == "p2p: unknown chat note (did you mean notes? p2p chats lists them)"
    )

    # an OSError keeps its closing parenthesis; a store that cannot be opened says why
    (tmp_path / "afile").touch()
    nested = p2p(tmp_path / "afile" / "x", "init", "--name", "a", check=False)
    assert nested.returncode == 1
    assert nested.stderr.strip().endswith(f"({tmp_path / 'afile' / 'x'})")
    blocked = tmp_path / "blocked"
    blocked.mkdir(mode=0o700)
    (blocked / "p2p.db").mkdir()
    refused = p2p(blocked, "status", check=False)
    assert refused.returncode == 1
    assert "may read and write" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_json_times_are_numbers(home: Path) -> None:
    p2p(home, "send", "when?")
    row = json.loads(p2p(home, "log", "--json").stdout)
    assert isinstance(row["ts"], int)
    assert row["hlc"].startswith(f"{row['ts']}.")


def test_an_unlinked_device_knows_it_refuses_writes_and_stops_dialing(tmp_path: Path) -> None:
    phone, laptop, tablet, bea = (tmp_path / n for n in ("phone", "laptop", "tablet", "bea"))
    _, laptop_id, tablet_id = provision_homes([phone, laptop, tablet])
    (bea_id,) = provision_homes([bea])
    code_bea = json.loads(p2p(bea, "contact", "code", "--json").stdout)["code"]
    code_phone = json.loads(p2p(phone, "contact", "code", "--json").stdout)["code"]
    p2p(phone, "contact", "add", code_bea, "--name", "Bea")
    p2p(bea, "contact", "add", code_phone, "--name", "Ali")
    nodes = {phone: run(phone)}
    try:
        nodes[laptop] = run(laptop, nodes[phone].address)
        nodes[tablet] = run(tablet, nodes[phone].address)
        nodes[bea] = run(bea, nodes[phone].address)
        for device in (laptop_id, tablet_id, bea_id):
            nodes[phone].wait_for("peer_connected", device=device)

        # the laptop leaves at its own request; the phone unlinks the tablet
        p2p(laptop, "unlink", "--self")
        p2p(phone, "unlink", "desktop")  # provision_homes names it so
        for home in (laptop, tablet):
            wait_until(lambda h=home: status(h)["removed"], timeout=30)
            shown = p2p(home, "status").stdout
            assert "unlinked from the account" in shown
            refused = p2p(home, "send", "still here?", check=False)
            assert refused.returncode == 1
            assert "unlinked from account" in refused.stderr

        # they stop dialing: no new connection attempt reaches the phone
        nodes[phone].drain(settle=1)
        before = len(nodes[phone].events)
        nodes[phone].drain(settle=3)
        tries = [e for e in nodes[phone].events[before:] if e.get("remote")]
        assert tries == []

        # Bea's device stayed connected to the phone throughout: no false alarm about it
        assert not [
            e
            for e in nodes[phone].events
            if e.get("event") == "peer_disconnected" and e.get("device") == bea_id
        ]
    finally:
        for n in nodes.values():
            n.stop()


def status(home: Path) -> dict[str, object]:
    return dict(json.loads(p2p(home, "status", "--json").stdout))


def test_typing_and_presence_show_in_follow_and_are_never_stored(tmp_path: Path) -> None:
    phone, laptop = tmp_path / "phone", tmp_path / "laptop"
    provision_homes([phone, laptop])
    nodes = [run(phone)]
    closing: list[Lines] = []
    try:
        follow = Lines(phone, "log", "--follow")
        closing.append(follow)
        nodes.append(run(laptop, nodes[0].address))
        follow.wait_for("laptop is online")
        p2p(laptop, "typing")
        follow.wait_for("laptop is typing…")
        p2p(laptop, "typing", "--stop")
        follow.wait_for("laptop stopped typing")
        # a typing nobody stops ends by itself (the sender went quiet)
        p2p(laptop, "typing")
        follow.wait_for("laptop is typing…")
        count = sum("stopped typing" in line for line in follow.seen)
        follow.wait_until(
            lambda _: sum("stopped typing" in line for line in follow.seen) > count,
            "a second stop",
            timeout=20,
        )
        # `p2p run` says it too, by name
        nodes[0].wait_for("typing", typing=True)
        nodes[1].stop()
        follow.wait_for("laptop went offline")
    finally:
        for c in closing:
            c.close()
        for n in nodes:
            n.stop()
    # nothing of it is in the store
    assert "typing" not in p2p(phone, "log", "--json").stdout


def test_run_reports_an_attachment_in_tenths_not_per_chunk(tmp_path: Path) -> None:
    phone, laptop = tmp_path / "phone", tmp_path / "laptop"
    provision_homes([phone, laptop])
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(8 * 1024 * 1024))  # 32 chunks of 256 KiB
    loopback = ("--listen", "127.0.0.1:0", "--no-mdns")
    shown = Lines(phone, "run", *loopback)
    closing = [shown]
    try:
        address = shown.wait_for("listening on").rsplit(" ", 1)[-1]
        closing.append(Lines(laptop, "run", *loopback, "--peer", address))
        shown.wait_for("connected to laptop")
        p2p(laptop, "send", "--file", str(big), "the big one")
        shown.wait_for("attachment big.bin: 32/32 chunks", timeout=60)
        lines = [line for line in shown.seen if line.startswith("attachment big.bin")]
        assert 1 <= len(lines) <= 11, lines
    finally:
        for c in closing:
            c.close()


def test_another_account_and_an_unnamed_conversation_are_shown_by_contact_name(
    tmp_path: Path,
) -> None:
    ana, ben = tmp_path / "ana", tmp_path / "ben"
    provision_homes([ana])
    provision_homes([ben])
    nodes = [run(ana), run(ben)]
    try:
        code_ana = json.loads(p2p(ana, "contact", "code", "--json").stdout)["code"]
        p2p(ben, "contact", "add", code_ana, "--name", "Ana")  # Ben's node dials Ana's
        code_ben = json.loads(p2p(ben, "contact", "code", "--json").stdout)["code"]
        p2p(ana, "contact", "add", code_ben, "--name", "Ben")
        chat = p2p(ana, "chat", "new", "--with", "Ben").stdout.strip()
        assert f"{chat}  Ben  [" in p2p(ana, "chats").stdout
        # Ben's copy is called by the name Ben knows Ana by, not by his own
        wait_until(lambda: f"{chat}  Ana  [" in p2p(ben, "chats").stdout, timeout=60)
        p2p(ben, "send", "--chat", "Ana", "hi Ana")
        wait_until(lambda: " Ben: hi Ana" in p2p(ana, "log", "--chat", "Ben").stdout, timeout=60)
        rows = [
            json.loads(x) for x in p2p(ana, "log", "--chat", chat, "--json").stdout.split("\n") if x
        ]
        assert rows[-1]["account"] != json.loads(p2p(ana, "status", "--json").stdout)["account"]
    finally:
        for n in nodes:
            n.stop()
