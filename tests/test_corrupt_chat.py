"""One corrupt row in a home's SQLite file sets its chat aside; the rest goes on.

A real home (two accounts that share a chat, each with its own notes chat) is written by
the CLI, one stored update of the notes chat is overwritten by hand in ``p2p.db``, and
the real CLI and ``p2p run`` are used on it: ``p2p log`` says the notes chat is set aside
(a typed error), the shared chat still reads and syncs, and the node keeps running
through a stranger's connection and its contact's, reporting the chat it set aside.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sqlite3
from pathlib import Path

import pytest
from procs import Node, p2p, wait_until

from p2p.app import control
from p2p.testing import provision_homes

pytestmark = pytest.mark.slow


def chat_ids(home: Path) -> dict[str, str]:
    lines = p2p(home, "chats", "--json").stdout.splitlines()
    return {c["name"]: c["id"] for c in map(json.loads, lines)}


def texts(home: Path, chat: str) -> list[str]:
    out = p2p(home, "log", "--json", "--chat", chat).stdout
    return [json.loads(line)["text"] for line in out.splitlines() if line.strip()]


def two_accounts(tmp_path: Path) -> tuple[Path, Path]:
    """Ali and Bea, contacts of each other, with a chat ``shared``; Ali has notes too."""
    ali, bea = tmp_path / "ali", tmp_path / "bea"
    provision_homes([ali])
    provision_homes([bea])
    code_a = json.loads(p2p(ali, "contact", "code", "--json").stdout)["code"]
    code_b = json.loads(p2p(bea, "contact", "code", "--json").stdout)["code"]
    p2p(ali, "contact", "add", code_b, "--name", "Bea")
    p2p(bea, "contact", "add", code_a, "--name", "Ali")
    p2p(ali, "chat", "new", "--with", "Bea", "--name", "shared")
    p2p(ali, "send", "--chat", "shared", "hello Bea")
    p2p(ali, "send", "--chat", "notes", "a note")
    return ali, bea


def corrupt_last_update(home: Path, space: str) -> None:
    """Overwrite the chat's newest stored update with bytes that are no update."""
    with contextlib.closing(sqlite3.connect(home / "p2p.db")) as db, db:
        (seq,) = db.execute("SELECT max(seq) FROM updates WHERE space = ?", (space,)).fetchone()
        assert seq is not None
        db.execute(
            "UPDATE updates SET data = ? WHERE space = ? AND seq = ?",
            (b"\x01\x02\x03\x04\x05", space, seq),
        )


def test_a_corrupt_row_sets_its_chat_aside_and_the_cli_goes_on(tmp_path: Path) -> None:
    ali, _ = two_accounts(tmp_path)
    ids = chat_ids(ali)
    corrupt_last_update(ali, ids["notes"])
    refused = p2p(ali, "log", "--chat", "notes", check=False)
    assert refused.returncode != 0
    assert "set aside" in refused.stderr, refused.stderr
    assert texts(ali, "shared") == ["hello Bea"]
    p2p(ali, "send", "--chat", "shared", "still writing")
    assert texts(ali, "shared") == ["hello Bea", "still writing"]


def test_a_node_with_a_corrupt_chat_keeps_serving_strangers_and_contacts(
    tmp_path: Path, nodes: list[Node]
) -> None:
    ali, bea = two_accounts(tmp_path)
    ids = chat_ids(ali)
    corrupt_last_update(ali, ids["notes"])
    ali_node = Node(ali, "--listen", "127.0.0.1:0", "--no-mdns")
    nodes.append(ali_node)
    # a stranger's connection first (it used to end the node, when every session loaded
    # all chats), then the contact's
    host, port = ali_node.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall((50).to_bytes(4, "big") + b"\x00" * 50)
        sock.settimeout(20)
        with contextlib.suppress(ConnectionResetError):  # closed with our bytes unread
            while sock.recv(65536):
                pass
    bea_node = Node(bea, "--listen", "127.0.0.1:0", "--no-mdns", "--peer", ali_node.address)
    nodes.append(bea_node)
    bea_node.wait_for("peer_connected", timeout=30)
    wait_until(lambda: "hello Bea" in texts(bea, "shared"), timeout=30)
    assert control.request(bea, {"op": "send", "text": "hi Ali", "chat": ids["shared"]})
    wait_until(lambda: "hi Ali" in texts(ali, "shared"), timeout=30)
    # the notes chat loads when it is used (Bea's sessions never need it): then it is
    # set aside, reported, and the node goes on
    refused = p2p(ali, "log", "--chat", "notes", check=False)  # delivery states load it
    assert refused.returncode != 0
    assert "set aside" in refused.stderr, refused.stderr
    aside = ali_node.wait_for("chat_set_aside", timeout=30)
    assert aside["chat"] == ids["notes"]
    assert ali_node.proc.poll() is None
    status = json.loads(p2p(ali, "status", "--json").stdout)
    assert [c["id"] for c in status["set_aside"]] == [ids["notes"]]
