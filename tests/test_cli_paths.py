"""The ``p2p`` command's paths that only a person at a terminal takes, through the real
CLI and real processes on loopback: conversations of three accounts over two relays,
leaving, ``unlink --self``, the media options, ``fetch --no-wait``, Ctrl-C on
``p2p run``, usage errors, the default home and the permissions of what it writes."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from procs import P2P, Node, Relay, log, p2p, wait_until

from p2p.app import control
from p2p.testing import provision_homes

pytestmark = pytest.mark.slow


def lines(done: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def chat_texts(home: Path, chat: str) -> list[str]:
    return [m["text"] for m in log(home, chat)]


def epoch(home: Path, chat: str) -> int:
    reply = control.request(home, {"op": "chats"})
    assert reply is not None, f"no node runs for {home.name}"
    return next((c["epoch"] for c in reply["chats"] if c["id"] == chat), -1)


def test_three_accounts_over_two_relays_add_and_leave_a_chat(
    tmp_path: Path, relays: Callable[..., Relay]
) -> None:
    first, second = relays(), relays()
    homes = {name: tmp_path / name for name in ("ann", "ben", "cat")}
    for name, home in homes.items():
        p2p(home, "init", "--name", name)
    both = ("--relay", first.url, "--relay", second.url)  # repeated --relay
    nodes = {
        name: Node(home, "--listen", "127.0.0.1:0", "--no-mdns", *both)
        for name, home in homes.items()
    }
    ann, ben, cat = homes["ann"], homes["ben"], homes["cat"]
    try:
        codes = {
            name: json.loads(p2p(home, "contact", "code", "--json").stdout)["code"]
            for name, home in homes.items()
        }
        p2p(ann, "contact", "add", codes["ben"], "--name", "Ben")
        p2p(ann, "contact", "add", codes["cat"], "--name", "Cat")
        p2p(ben, "contact", "add", codes["ann"], "--name", "Ann")
        p2p(cat, "contact", "add", codes["ann"], "--name", "Ann")

        chat = lines(p2p(ann, "chat", "new", "--with", "Ben", "--name", "trip", "--json"))[0]
        chat_id = chat["chat"]
        listed = lines(p2p(ann, "chats", "--json"))
        assert [c["name"] for c in listed if c["id"] == chat_id] == ["trip"]
        wait_until(lambda: epoch(ben, chat_id) == 0, timeout=60)
        assert chat_id in {c["id"] for c in lines(p2p(ben, "chats", "--json"))}

        p2p(ann, "send", "--chat", "trip", "before the relay died")  # by name
        wait_until(lambda: "before the relay died" in chat_texts(ben, chat_id), timeout=60)

        first.kill()  # every node still holds the second relay
        p2p(ann, "send", "--chat", chat_id, "through the second relay")
        wait_until(lambda: "through the second relay" in chat_texts(ben, chat_id), timeout=60)

        p2p(ann, "chat", "add", "trip", "--with", "Cat")
        wait_until(lambda: epoch(cat, chat_id) >= 0, timeout=60)
        wait_until(lambda: len(chat_texts(cat, chat_id)) == 2, timeout=60)  # the history too
        assert chat_texts(cat, chat_id) == chat_texts(ann, chat_id)

        before = epoch(ann, chat_id)
        p2p(ben, "chat", "leave", chat_id)
        wait_until(lambda: epoch(ann, chat_id) > before, timeout=60)
        wait_until(lambda: epoch(cat, chat_id) == epoch(ann, chat_id), timeout=60)
        p2p(ann, "send", "--chat", "trip", "after ben left")
        wait_until(lambda: "after ben left" in chat_texts(cat, chat_id), timeout=60)
        nodes["ben"].drain(settle=2.0)
        assert "after ben left" not in chat_texts(ben, chat_id)
    finally:
        for node in nodes.values():
            node.stop()


def test_a_companion_asks_to_be_unlinked_with_unlink_self(tmp_path: Path) -> None:
    phone, laptop = tmp_path / "phone", tmp_path / "laptop"
    _, laptop_id = provision_homes([phone, laptop])
    phone_node = Node(phone, "--listen", "127.0.0.1:0", "--no-mdns")
    laptop_node = Node(laptop, "--listen", "127.0.0.1:0", "--no-mdns", "--peer", phone_node.address)
    try:
        phone_node.wait_for("peer_connected", device=laptop_id, timeout=30)
        assert len(lines(p2p(phone, "devices", "--json"))) == 2
        p2p(laptop, "unlink", "--self")
        wait_until(lambda: len(lines(p2p(phone, "devices", "--json"))) == 1, timeout=60)
        assert laptop_id not in {d["id"] for d in lines(p2p(phone, "devices", "--json"))}
    finally:
        laptop_node.stop()
        phone_node.stop()


def test_media_options_are_kept_and_fetch_no_wait_returns_at_once(tmp_path: Path) -> None:
    phone, laptop = tmp_path / "phone", tmp_path / "laptop"
    provision_homes([phone, laptop])
    shown = json.loads(
        p2p(laptop, "media", "--fetch", "demand", "--quota", "10M", "--rate", "1M", "--json").stdout
    )
    assert shown["policy"]["fetch"] == "demand"
    again = json.loads(p2p(laptop, "media", "--json").stdout)  # kept in the home
    assert again["policy"] == shown["policy"]
    assert again["policy"]["quota"] == 10 * 1024 * 1024
    assert again["policy"]["rate"] == 1024 * 1024
    bad = p2p(laptop, "media", "--quota", "lots", check=False)
    assert bad.returncode in (1, 2)
    assert "Traceback" not in bad.stderr

    data = os.urandom(300_000)
    (tmp_path / "photo.bin").write_bytes(data)
    message = p2p(phone, "send", "--file", str(tmp_path / "photo.bin"), "a photo").stdout.strip()
    phone_node = Node(phone, "--listen", "127.0.0.1:0", "--no-mdns")
    laptop_node = Node(laptop, "--listen", "127.0.0.1:0", "--no-mdns", "--peer", phone_node.address)
    try:
        wait_until(lambda: any(m["id"] == message for m in log(laptop)), timeout=60)
        [row] = [m for m in log(laptop) if m["id"] == message]
        assert not row["file"]["fetched"]  # on demand: nothing fetched by itself
        early = json.loads(p2p(laptop, "fetch", message, "--no-wait", "--json").stdout)
        assert early["name"] == "photo.bin"
        wait_until(lambda: next(m for m in log(laptop) if m["id"] == message)["file"]["fetched"])
        p2p(laptop, "open", message, "--out", str(tmp_path / "photo.out"))
        assert (tmp_path / "photo.out").read_bytes() == data
    finally:
        laptop_node.stop()
        phone_node.stop()


def test_ctrl_c_stops_p2p_run_cleanly_and_send_then_goes_to_the_store(tmp_path: Path) -> None:
    home = tmp_path / "phone"
    p2p(home, "init", "--name", "phone")
    node = Node(home, "--listen", "127.0.0.1:0", "--no-mdns")
    assert control.request(home, {"op": "status"}) is not None
    assert node.stop(signal.SIGINT) == 0
    assert "Traceback" not in node.stderr()
    assert control.request(home, {"op": "status"}) is None  # the control socket is gone
    p2p(home, "send", "written with no node running")
    assert [m["text"] for m in log(home)] == ["written with no node running"]


@pytest.mark.parametrize(
    "args",
    [
        (),
        ("frobnicate",),
        ("send",),
        ("log", "--chat"),
        ("chat", "new"),
        ("run", "--listen"),
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, args: tuple[str, ...]) -> None:
    done = subprocess.run(
        [*P2P, "--home", str(tmp_path / "home"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert done.stderr.strip(), "a usage error says what is wrong"
    assert "Traceback" not in done.stderr


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("P2P_HOME", "XDG_DATA_HOME")}
    return {**env, "HOME": str(tmp_path / "user"), **extra}


def run_p2p(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2p", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.skipif(sys.platform != "linux", reason="the XDG layout is Linux's")
def test_the_default_home_follows_p2p_home_then_xdg_then_the_user_folder(tmp_path: Path) -> None:
    plain = clean_env(tmp_path)
    assert run_p2p(plain, "init", "--name", "a").returncode == 0
    assert (tmp_path / "user" / ".local" / "share" / "p2p" / "p2p.db").is_file()

    xdg = clean_env(tmp_path, XDG_DATA_HOME=str(tmp_path / "xdg"))
    assert run_p2p(xdg, "init", "--name", "b").returncode == 0
    assert (tmp_path / "xdg" / "p2p" / "p2p.db").is_file()

    chosen = clean_env(tmp_path, XDG_DATA_HOME=str(tmp_path / "xdg"), P2P_HOME=str(tmp_path / "e"))
    assert run_p2p(chosen, "init", "--name", "c").returncode == 0
    assert (tmp_path / "e" / "p2p.db").is_file()
    assert run_p2p(chosen, "send", "where am I").returncode == 0
    shown = run_p2p(chosen, "log", "--json")
    assert [json.loads(line)["text"] for line in shown.stdout.splitlines()] == ["where am I"]
    again = run_p2p(chosen, "init", "--name", "c")  # a second init never orphans keys
    assert again.returncode == 1


def test_the_home_and_its_stores_are_readable_by_their_owner_only(tmp_path: Path) -> None:
    home = tmp_path / "phone"
    p2p(home, "init", "--name", "phone")
    (tmp_path / "note.txt").write_bytes(b"private")
    p2p(home, "send", "--file", str(tmp_path / "note.txt"), "a file")
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    stores = [p for p in home.iterdir() if p.suffix == ".db"]
    assert {p.name for p in stores} >= {"p2p.db", "media.db"}
    for path in stores:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, (path.name, oct(path.stat().st_mode))


def test_after_an_unlink_mdns_announces_under_the_new_key_only(tmp_path: Path) -> None:
    """Discovery on mDNS (bound to loopback) re-keys when an unlink rotates the keys: a
    restarted companion finds the phone by its new announcement, and the removed
    tablet no longer recognises it (it never dials, so the phone refuses nothing)."""
    phone, laptop, tablet = (tmp_path / n for n in ("phone", "laptop", "tablet"))
    _, laptop_id, tablet_id = provision_homes([phone, laptop, tablet])
    mdns = ("--listen", "127.0.0.1:0", "--mdns-interface", "127.0.0.1")
    running = {home: Node(home, *mdns) for home in (phone, laptop, tablet)}
    try:
        running[phone].wait_for("peer_connected", device=laptop_id, timeout=60)
        running[phone].wait_for("peer_connected", device=tablet_id, timeout=60)
        p2p(phone, "unlink", tablet_id)
        running[laptop].wait_for("device_list_changed", timeout=60)
        running.pop(laptop).stop()
        running.pop(tablet).stop()
        refused_before = running[phone].count("input_rejected")
        running[laptop] = Node(laptop, *mdns)  # no --peer: only mDNS can bring them together
        running[laptop].wait_for("peer_connected", timeout=60)
        running[tablet] = Node(tablet, *mdns)
        running[tablet].drain(settle=8.0)  # mDNS answers within about a second
        assert running[tablet].count("peer_connected") == 0
        assert running[phone].count("input_rejected") == refused_before
    finally:
        for node in running.values():
            node.stop()
