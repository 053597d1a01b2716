"""Conversations between accounts with real processes and a real relay (issue 10).

Account A (phone + laptop) and account B (phone + tablet) run as four ``p2p run``
processes that can only meet through one ``p2p relay`` process. They exchange contact
codes with the CLI, A's phone starts a conversation, and then:

- A's laptop sends while A's phone (and B's phone) are off: B's tablet gets it at once,
  B's phone when it comes on, A's phone when it comes back; all four logs are identical;
- B unlinks its tablet: A's devices take the new key epoch with nobody at A touching
  anything, and the tablet reads nothing sent afterwards.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from procs import Node, Relay, p2p, wait_until

from p2p.app import control
from p2p.proto.contacts import ContactCode
from p2p.testing import provision_homes

pytestmark = pytest.mark.slow


def run(home: Path, relay: Relay) -> Node:
    return Node(home, "--listen", "127.0.0.1:0", "--no-mdns", "--relay", relay.url)


def ask(home: Path, op: str, **fields: Any) -> dict[str, Any]:
    reply = control.request(home, {"op": op, **fields})
    assert reply is not None, f"no node running for {home.name}"
    return reply


def texts(home: Path, chat: str) -> list[str]:
    return [m["text"] for m in ask(home, "log", chat=chat)["messages"]]


def chat_epoch(home: Path, chat: str) -> int:
    return next((c["epoch"] for c in ask(home, "chats")["chats"] if c["id"] == chat), -1)


def test_two_accounts_converge_through_the_relay_and_an_unlink_rotates_the_key(
    tmp_path: Path, relay: Relay
) -> None:
    a_phone, a_laptop, b_phone, b_tablet = (tmp_path / n for n in ("ap", "al", "bp", "bt"))
    provision_homes([a_phone, a_laptop])
    _, tablet_id = provision_homes([b_phone, b_tablet])
    nodes = {h: run(h, relay) for h in (a_phone, a_laptop, b_phone, b_tablet)}
    try:
        # contact codes, exchanged with the CLI (through the running nodes), without the
        # address they name: the accounts first meet through the relay, which reports
        # the primary each code names; that meeting brings each account's device list
        def code_of(home: Path) -> str:
            code = json.loads(p2p(home, "contact", "code", "--json").stdout)["code"]
            return replace(ContactCode.decode(code), addresses=()).encode()

        code_a, code_b = code_of(a_phone), code_of(b_phone)
        p2p(a_phone, "contact", "add", code_b, "--name", "Bea")
        p2p(b_phone, "contact", "add", code_a, "--name", "Ali")

        def contacts_of(home: Path) -> list[dict[str, Any]]:
            out = p2p(home, "contacts", "--json").stdout
            return [json.loads(line) for line in out.splitlines()]

        wait_until(
            lambda: [(c["name"], len(c["devices"])) for c in contacts_of(a_phone)] == [("Bea", 2)],
            timeout=60,
        )
        contacts = contacts_of(a_phone)
        # wrong codes are refused with a one-line reason and change nothing
        bad = p2p(a_phone, "contact", "add", code_b[:-4] + "AAAA", check=False)
        assert bad.returncode == 1
        assert "checksum" in bad.stderr

        chat = json.loads(p2p(a_phone, "chat", "new", "--with", "Bea", "--json").stdout)["chat"]
        # every device of both accounts joins: A's laptop and B's devices by grants
        wait_until(lambda: all(chat_epoch(h, chat) == 0 for h in nodes), timeout=60)
        ask(a_phone, "send", text="hello from A's phone", chat=chat)
        ask(b_tablet, "send", text="hello from B's tablet", chat=chat)
        wait_until(lambda: all(len(texts(h, chat)) == 2 for h in nodes), timeout=60)

        # A's phone and B's phone are off; A's laptop sends; B's tablet gets it at once
        nodes.pop(a_phone).stop()
        nodes.pop(b_phone).stop()
        ask(a_laptop, "send", text="laptop, phone off", chat=chat)
        wait_until(lambda: "laptop, phone off" in texts(b_tablet, chat), timeout=60)
        # B's phone when it comes on, A's phone when it comes back
        nodes[b_phone] = run(b_phone, relay)
        wait_until(lambda: "laptop, phone off" in texts(b_phone, chat), timeout=60)
        nodes[a_phone] = run(a_phone, relay)
        wait_until(lambda: "laptop, phone off" in texts(a_phone, chat), timeout=60)
        # identical histories (delivery states differ by device: receipts trail)
        fields = ("id", "ts", "device", "account", "text", "edited", "deleted")
        logs = [
            [{k: m[k] for k in fields} for m in ask(h, "log", chat=chat)["messages"]] for h in nodes
        ]
        assert all(log == logs[0] for log in logs)
        assert sorted(m["text"] for m in logs[0]) == [
            "hello from A's phone",
            "hello from B's tablet",
            "laptop, phone off",
        ]
        authors = {m["text"]: m["account"] for m in logs[0]}
        assert authors["hello from B's tablet"] == contacts[0]["id"]
        assert authors["laptop, phone off"] == ask(a_phone, "status")["status"]["account"]

        # delivery state, as `p2p log` shows it: delivered to all four, then read by B
        def state_of(home: Path, text: str) -> dict[str, Any]:
            return next(m for m in ask(home, "log", chat=chat)["messages"] if m["text"] == text)

        wait_until(
            lambda: state_of(a_laptop, "laptop, phone off")["status"] == "delivered", timeout=60
        )
        assert len(state_of(a_laptop, "laptop, phone off")["delivered_to"]) == 3
        p2p(b_phone, "log", "--chat", chat, "--mark-read")
        wait_until(lambda: state_of(a_laptop, "laptop, phone off")["status"] == "read", timeout=60)
        shown = p2p(a_laptop, "log", "--chat", chat).stdout
        assert "laptop, phone off  [read]" in shown

        # B unlinks its tablet: A's devices take the new epoch on their own
        p2p(b_phone, "unlink", tablet_id)
        for home in (a_phone, a_laptop, b_phone):
            wait_until(lambda home=home: chat_epoch(home, chat) == 1, timeout=60)
        ask(a_laptop, "send", text="after the unlink", chat=chat)
        for home in (a_phone, b_phone):
            wait_until(lambda home=home: "after the unlink" in texts(home, chat), timeout=60)
        nodes[b_tablet].drain(settle=2.0)
        assert "after the unlink" not in texts(b_tablet, chat)
        assert chat_epoch(b_tablet, chat) == 0
    finally:
        for node in nodes.values():
            node.stop()
