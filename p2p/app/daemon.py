"""``p2p run``: one device as a long-running process on a LAN.

Holds ``<home>/node.lock`` (one process writes a home: ``p2p.runtime.home.home_lock``), serves
TCP, dials static peers and what mDNS finds, answers the control socket, prints what
happens (one line per event; JSON with ``--json``), and shuts down cleanly on SIGINT or
SIGTERM.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import trio

from p2p import events as ev
from p2p.app import control
from p2p.app.control import serve_control
from p2p.app.terminal import log_to_stderr, say
from p2p.discovery.base import StaticPeers
from p2p.errors import AlreadyRunning, P2PError
from p2p.runtime.home import LOCK_WAIT, home_lock
from p2p.runtime.node import Node, open_node
from p2p.transport.tcp import TcpTransport

log = logging.getLogger("p2p.app.daemon")
__all__ = ["AlreadyRunning", "home_lock", "run_daemon"]


def _say(as_json: bool, event: str, text: str, **fields: Any) -> None:
    if as_json:
        print(json.dumps({"event": event, **fields}), flush=True)
    else:
        say(text)


def _describe(event: ev.Event, names: dict[str, str] | None = None) -> tuple[str, str]:
    """The event's name in ``--json`` and its line for people (devices by name, with
    the id, when ``names`` knows them)."""
    known = names or {}

    def who(device: str) -> str:
        return f"{known[device]} ({device})" if known.get(device) else device

    if isinstance(event, ev.PeerConnected):
        return "peer_connected", f"connected to {who(event.device)} via {event.remote}"
    if isinstance(event, ev.PeerDisconnected):
        return (
            "peer_disconnected",
            f"disconnected from {who(event.device)} {event.reason}".rstrip(),
        )
    if isinstance(event, ev.ChatChanged):
        return "chat_changed", f"chat {event.chat} changed by {who(event.origin)}"
    if isinstance(event, ev.Typing):
        doing = "is typing" if event.typing else "stopped typing"
        return "typing", f"{who(event.device)} {doing} in chat {event.chat}"
    if isinstance(event, ev.InputRejected):
        return "input_rejected", f"refused input from {event.remote}: {event.error}: {event.detail}"
    if isinstance(event, ev.MediaProgress):
        return "media_progress", f"attachment {event.name}: {event.done}/{event.total} chunks"
    if isinstance(event, ev.EntryRejected):
        return (
            "entry_rejected",
            f"hidden entry {event.entry_id} from {event.device}: {event.reason}",
        )
    if isinstance(event, ev.DeviceLinked):
        return "device_linked", f"new device linked: {event.name} ({event.device})"
    if isinstance(event, ev.ChatSetAside):
        return "chat_set_aside", f"chat {event.chat} set aside: {event.error}: {event.detail}"
    if isinstance(event, ev.ChatKeysChanged):
        what = "joined" if event.joined else "keys changed in"
        return "chat_keys_changed", f"{what} chat {event.chat} (epoch {event.epoch})"
    whose = f"account {event.account}'s" if event.account else "our"
    return "device_list_changed", f"{whose} device list is now version {event.version}"


async def _report(
    node: Node, as_json: bool, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    events = node.subscribe()
    task_status.started()
    shown: dict[str, int] = {}
    """Attachment -> tenths of it last reported (people get at most 11 lines a file)."""
    for corrupt in list(node.state.set_aside.values()):  # found while opening the home
        found = ev.ChatSetAside(chat=corrupt.chat, error="ChatCorrupt", detail=corrupt.reason)
        _say(as_json, *_describe(found), **asdict(found))
    async for event in events:
        if isinstance(event, ev.ChatChanged) and event.origin == node.device_id:
            continue
        if isinstance(event, ev.MediaProgress) and not as_json:
            tenth = 10 * event.done // max(event.total, 1)
            if event.done < event.total and shown.get(event.file, -1) >= tenth:
                continue
            shown[event.file] = tenth
            if event.done >= event.total:
                shown.pop(event.file, None)
        name, text = _describe(event, None if as_json else node.display_names())
        _say(as_json, name, text, **asdict(event))


async def _mdns(
    node: Node,
    port: int,
    interfaces: Sequence[str],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Announce and browse on mDNS; start over with a new secret whenever a key
    rotation (an unlink) changes the account's discovery key, so the removed device
    stops recognising our announcements and the others keep recognising them."""
    from p2p.discovery.mdns import MdnsDiscovery

    events = node.subscribe()
    while True:
        secret = node.state.discovery_key()
        async with trio.open_nursery() as nursery:
            adapter = MdnsDiscovery(
                port=port,
                device_id=node.device_id,
                secret=secret,
                linked=lambda: node.state.device_list.ids,
                interfaces=list(interfaces) or None,
            )
            await nursery.start(adapter.run, node.found_channel())
            task_status.started()
            task_status = trio.TASK_STATUS_IGNORED
            async for event in events:
                if isinstance(event, ev.DeviceListChanged) and node.state.discovery_key() != secret:
                    log.info("discovery key rotated: announcing afresh")
                    nursery.cancel_scope.cancel()
                    break


async def run_daemon(
    home: Path,
    *,
    listen: str,
    peers: list[str],
    mdns: bool,
    mdns_interfaces: list[str],
    as_json: bool,
    relays: Sequence[str] = (),
) -> int:
    """Run until SIGINT/SIGTERM; the exit code.

    ``open_node`` holds the home's lock (``p2p.runtime.home.home_lock``) from before it reads
    the store until the node is closed; until the control socket answers, a ``p2p
    send`` waits for this node rather than write the store beside it. A home locked by
    a node that answers is refused at once (AlreadyRunning); one locked by a process
    that does not (a ``p2p`` command working on the store, a node starting) is waited
    for, up to LOCK_WAIT seconds."""
    log_to_stderr()  # peers' and relays' words in warnings reach the terminal escaped
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            return await _run(
                home,
                listen=listen,
                peers=peers,
                mdns=mdns,
                mdns_interfaces=mdns_interfaces,
                as_json=as_json,
                relays=relays,
            )
        except AlreadyRunning:
            answered = await trio.to_thread.run_sync(_answers, home, abandon_on_cancel=True)
            if answered or time.monotonic() > deadline:
                raise
            await trio.sleep(0.1)


def _answers(home: Path) -> bool:
    """Whether a node answers the control socket of ``home``."""
    try:
        return control.request(home, {"op": "status"}) is not None
    except (P2PError, OSError):
        return False


async def _run(
    home: Path,
    *,
    listen: str,
    peers: list[str],
    mdns: bool,
    mdns_interfaces: list[str],
    as_json: bool,
    relays: Sequence[str],
) -> int:
    transport = TcpTransport(listen)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with (
            open_node(home, transport=transport, relays=relays) as node,
            trio.open_nursery() as nursery,
        ):
            await nursery.start(serve_control, node, home)
            await nursery.start(_report, node, as_json)
            if peers:  # dialed once the report listens, so no connection goes unsaid
                await node.add_discovery(StaticPeers(peers))
            if mdns:
                await nursery.start(_mdns, node, transport.port, mdns_interfaces)
            _say(
                as_json,
                "listening",
                f"device {node.device_id} ({node.state.name}) listening on {transport.address}",
                device=node.device_id,
                address=transport.address,
                pid=os.getpid(),
            )
            async for signum in signals:
                _say(as_json, "stopping", f"stopping on {signal.Signals(signum).name}")
                nursery.cancel_scope.cancel()
                break
    return 0
