"""``p2p run``: one device as a long-running process on a LAN.

Holds ``<home>/node.lock`` (one running node per home), serves TCP, dials static peers
and what mDNS finds, answers the control socket, prints what happens (one line per
event; JSON with ``--json``), and shuts down cleanly on SIGINT or SIGTERM.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Final

import trio

from p2p import events as ev
from p2p.control import serve_control
from p2p.discovery.base import StaticPeers
from p2p.errors import NodeError
from p2p.home import open_home_store
from p2p.node import Node, open_node
from p2p.transport.tcp import TcpTransport

LOCK_FILE: Final = "node.lock"
log = logging.getLogger("p2p.daemon")


class AlreadyRunning(NodeError):
    """Another ``p2p run`` holds this home."""


@contextmanager
def home_lock(home: Path) -> Iterator[None]:
    """Exclusive lock on the home for the life of the process (released by the OS even
    on SIGKILL, so a crashed node never blocks the next start)."""
    path = home / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise AlreadyRunning(f"a node is already running for {home} (pid {other})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def _say(as_json: bool, event: str, text: str, **fields: Any) -> None:
    if as_json:
        print(json.dumps({"event": event, **fields}), flush=True)
    else:
        print(text, flush=True)


def _describe(event: ev.Event) -> tuple[str, str]:
    if isinstance(event, ev.PeerConnected):
        return "peer_connected", f"connected to {event.device} ({event.remote})"
    if isinstance(event, ev.PeerDisconnected):
        return "peer_disconnected", f"disconnected from {event.device} {event.reason}".rstrip()
    if isinstance(event, ev.ChatChanged):
        return "chat_changed", f"chat {event.chat} changed by {event.origin}"
    if isinstance(event, ev.InputRejected):
        return "input_rejected", f"refused input from {event.remote}: {event.error}: {event.detail}"
    if isinstance(event, ev.MediaProgress):
        return "media_progress", f"attachment {event.name}: {event.done}/{event.total} chunks"
    if isinstance(event, ev.EntryRejected):
        return (
            "entry_rejected",
            f"hidden entry {event.entry_id} from {event.device}: {event.reason}",
        )
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
    for corrupt in list(node.state.set_aside.values()):  # found while opening the home
        found = ev.ChatSetAside(chat=corrupt.chat, error="ChatCorrupt", detail=corrupt.reason)
        _say(as_json, *_describe(found), **asdict(found))
    async for event in events:
        if isinstance(event, ev.ChatChanged) and event.origin == node.device_id:
            continue
        name, text = _describe(event)
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
    """Run until SIGINT/SIGTERM; the exit code."""
    open_home_store(home).close()  # NotInitialized early, with a clear message
    with home_lock(home):
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
