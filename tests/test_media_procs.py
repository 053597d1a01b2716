"""Attachments between real ``p2p run`` processes on loopback, through the CLI: a file
sent while the phone is off, a transfer cut by SIGKILL and resumed, fetch on demand."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from pathlib import Path

import pytest
from procs import Linker, Node, log, p2p

from p2p.media.fetch import WINDOW
from p2p.media.service import WRITE_BATCH
from p2p.testing import provision_homes

pytestmark = pytest.mark.slow

MiB = 1024 * 1024
LOOPBACK = ("--listen", "127.0.0.1:0", "--no-mdns")
LINK_ARGS = ("--json", "--listen", "127.0.0.1:0")


def status(home: Path) -> dict[str, object]:
    return json.loads(p2p(home, "status", "--json").stdout)  # type: ignore[no-any-return]


def test_file_sent_while_phone_is_off_arrives_and_a_cut_transfer_resumes(
    tmp_path: Path,
) -> None:
    """20 MiB from the laptop while the phone is off. The phone comes back, is killed
    (SIGKILL) half-way through the transfer, and comes back again: it asks only for
    the chunks it had not stored, and the file it opens is byte-identical."""
    phone_home, laptop_home = tmp_path / "phone", tmp_path / "laptop"
    provision_homes([phone_home, laptop_home])
    data = os.urandom(20 * MiB)
    (tmp_path / "movie.mp4").write_bytes(data)
    p2p(laptop_home, "media", "--rate", "8M")  # paced: the cut lands mid-transfer
    laptop = Node(laptop_home, *LOOPBACK)
    phone: Node | None = None
    try:
        message = p2p(
            laptop_home, "send", "--file", str(tmp_path / "movie.mp4"), "holiday"
        ).stdout.strip()
        assert "file movie.mp4, 20.0 MiB" in p2p(laptop_home, "log").stdout

        phone = Node(phone_home, *LOOPBACK, "--peer", laptop.address)
        first = phone.wait_for("media_progress", timeout=30)
        total = first["total"]
        assert total == 80  # 20 MiB in 256 KiB chunks
        for _ in range(total):  # bounded: one event per stored chunk
            if phone.wait_for("media_progress", timeout=30)["done"] >= total // 2:
                break
            phone.events.clear()
        phone.kill()
        with contextlib.closing(sqlite3.connect(phone_home / "media.db")) as db, db:
            held = db.execute("SELECT count(*) FROM chunks").fetchone()[0]
        assert total // 2 <= held < total  # a real cut: part stored, part missing
        rows = log(phone_home)  # the text came first, and says what is missing
        assert rows[0]["file"]["held"] == held
        assert not rows[0]["file"]["fetched"]

        phone = Node(phone_home, *LOOPBACK, "--peer", laptop.address)
        phone.wait_for("media_progress", timeout=60, done=total)
        media = status(phone_home)["media"]
        assert isinstance(media, dict)
        assert media["chunks_in"] == total - held  # only what was missing came again
        served = status(laptop_home)["media"]
        assert isinstance(served, dict)
        # chunks the laptop sent that the killed phone had not stored yet (in flight)
        assert total <= served["chunks_out"] <= total + WINDOW + WRITE_BATCH

        out = tmp_path / "out.mp4"
        p2p(phone_home, "open", message, "--out", str(out))
        assert out.read_bytes() == data
        [row] = log(phone_home)
        assert row["text"] == "holiday"
        assert row["file"]["fetched"]
        assert row["file"]["size"] == len(data)
    finally:
        for n in (phone, laptop):
            if n is not None:
                n.stop()


def test_fetch_on_demand_from_the_cli(tmp_path: Path) -> None:
    """With ``--fetch demand`` nothing comes by itself; ``p2p fetch`` brings it (and
    waits, with progress), then ``p2p open`` writes it; ``p2p open`` before that fails
    with a reason."""
    phone_home, laptop_home = tmp_path / "phone", tmp_path / "laptop"
    provision_homes([phone_home, laptop_home])
    data = os.urandom(MiB + 7)
    (tmp_path / "doc.pdf").write_bytes(data)
    assert (
        json.loads(p2p(phone_home, "media", "--fetch", "demand", "--json").stdout)["policy"][
            "fetch"
        ]
        == "demand"
    )
    laptop = Node(laptop_home, *LOOPBACK)
    phone = Node(phone_home, *LOOPBACK, "--peer", laptop.address)
    try:
        message = p2p(laptop_home, "send", "--file", str(tmp_path / "doc.pdf")).stdout.strip()
        phone.wait_for("chat_changed", timeout=30)
        [row] = log(phone_home)
        assert row["file"]["name"] == "doc.pdf"
        assert row["file"]["held"] == 0
        refused = p2p(phone_home, "open", message, "--out", str(tmp_path / "x"), check=False)
        assert refused.returncode == 1
        assert "has 0 of" in refused.stderr  # MediaMissing, said as without a node
        fetched = p2p(phone_home, "fetch", message, "--json", "--timeout", "60", timeout=90)
        assert json.loads(fetched.stdout.splitlines()[-1])["fetched"]
        p2p(phone_home, "open", message, "--out", str(tmp_path / "doc.out"))
        assert (tmp_path / "doc.out").read_bytes() == data
        assert "fetched" in p2p(phone_home, "log").stdout
    finally:
        phone.stop()
        laptop.stop()


def test_a_newly_linked_device_gets_attachments_after_the_history(tmp_path: Path) -> None:
    """A laptop linked with a pairing code receives the text history with the link,
    then, once it runs, fetches the phone's attachments by its own policy."""
    phone_home, laptop_home = tmp_path / "phone", tmp_path / "laptop"
    p2p(phone_home, "init", "--name", "phone")
    data = os.urandom(2 * MiB + 3)
    (tmp_path / "scan.png").write_bytes(data)
    message = p2p(phone_home, "send", "--file", str(tmp_path / "scan.png"), "the scan").stdout
    message = message.strip()
    linker = Linker(laptop_home, "laptop")
    try:
        p2p(phone_home, "approve", linker.code, "--yes", timeout=60)
        assert linker.wait(timeout=60) == 0
    finally:
        linker.kill()
    [row] = log(laptop_home)  # the history came with the link: text and descriptor
    assert row["text"] == "the scan"
    assert row["file"]["held"] == 0
    phone = Node(phone_home, *LOOPBACK)
    laptop = Node(laptop_home, *LOOPBACK, "--peer", phone.address)
    try:
        laptop.wait_for("media_progress", timeout=30, done=row["file"]["chunks"])
        p2p(laptop_home, "open", message, "--out", str(tmp_path / "scan.out"))
        assert (tmp_path / "scan.out").read_bytes() == data
    finally:
        laptop.stop()
        phone.stop()
