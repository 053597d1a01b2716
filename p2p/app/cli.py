"""The ``p2p`` command: a thin shell over the Node API.

Exit codes are a contract (docs/architecture.md): 0 success, 1 a failed operation with
one line on stderr (never a traceback), 2 a usage error (argparse's own).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import trio

from p2p import __version__
from p2p.app import control, shapes
from p2p.app.terminal import multiline, safe, say
from p2p.errors import AlreadyRunning, NodeError, P2PError
from p2p.runtime.home import LOCK_WAIT, default_home, init_account, open_home_store
from p2p.runtime.node import open_node


def _home(args: argparse.Namespace) -> Path:
    return Path(args.home) if args.home else default_home()


def cmd_init(args: argparse.Namespace) -> int:
    state = init_account(_home(args), args.name)
    if args.json:
        print(
            json.dumps({"device": state.device_id, "account": state.account_id, "name": state.name})
        )
    else:
        say(
            f"account {state.account_id} created; "
            f"this device ({state.name}) is its primary {state.device_id}"
        )
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    text = args.text or ""
    file = str(Path(args.file).resolve()) if args.file else None
    if not file and args.text is None:
        say("p2p: send needs a TEXT, a --file, or both", file=sys.stderr)
        return 2
    if not file and _text_arg(text):
        say("p2p: send needs some TEXT (an empty message is not sent)", file=sys.stderr)
        return 2

    async def offline(node: Any) -> dict[str, Any]:
        if file:
            return {"id": await node.send_file(file, text, chat=args.chat)}
        return {"id": await node.send(text, chat=args.chat)}

    # through the running node when there is one (it owns the store and gossips at once)
    request = {"op": "send", "text": text, "chat": args.chat, "file": file}
    message_id = str(_node_or_offline(args, request, offline)["id"])
    if args.json:
        print(json.dumps({"id": message_id}))
    else:
        say(message_id)
    return 0


def _time_of(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def cmd_log(args: argparse.Namespace) -> int:
    reply = _call(args, {"op": "log", "chat": args.chat, "mark_read": args.mark_read})
    names: dict[str, str] = reply.get("names", {})
    for m in reply["messages"]:
        if args.json:
            print(json.dumps(m, ensure_ascii=False))
        else:
            say(*_message_lines(m, names, ids=args.ids))
    if args.follow:
        _follow_log(args, reply["messages"], names)
    return 0


def _follow_log(
    args: argparse.Namespace, shown: list[dict[str, Any]], names: dict[str, str]
) -> None:
    """``p2p log --follow``: after the log, each change as it happens (new messages,
    edits, deletions, reactions, delivery states), by name, until Ctrl-C.

    The node says that the chat changed; what changed is the difference between two
    reads of the log, so every kind of change is caught the same way."""
    before = {m["id"]: m for m in shown}

    def reread() -> None:
        nonlocal names
        reply = _call(args, {"op": "log", "chat": args.chat, "mark_read": False})
        names = reply.get("names", {})
        arrived = False
        for m in reply["messages"]:
            old = before.get(m["id"])
            before[m["id"]] = m
            for change, line in _changes(old, m, names, ids=args.ids):
                arrived = arrived or change == "new"
                if args.json:
                    print(json.dumps({"change": change, **m}, ensure_ascii=False), flush=True)
                else:
                    say(*line)
        if arrived and args.mark_read:  # only then: a read marker is a change itself
            _call(args, {"op": "log", "chat": args.chat, "mark_read": True})

    events = control.watch(_home(args), args.chat)
    next(events)  # the node's "ok": the chat exists and we are subscribed
    reread()  # what changed between the first read and the subscription
    # who is here already (a session that came up before we subscribed has no event
    # left to see); each device is said online once until it goes offline
    online: set[str] = set()
    for row in _call(args, {"op": "presence"})["presence"]:
        if row["online"]:
            online.add(row["device"])
            _say_awareness(args, {"event": "PeerConnected", "device": row["device"]}, names)
    for event in events:
        kind = event.get("event")
        device = str(event.get("device"))
        if kind == "PeerConnected":
            if device in online:
                continue
            online.add(device)
        elif kind == "PeerDisconnected":
            online.discard(device)
        if kind in ("Typing", "PeerConnected", "PeerDisconnected"):
            _say_awareness(args, event, names)
        elif kind == "ChatChanged":
            reread()


def _say_awareness(args: argparse.Namespace, event: dict[str, Any], names: dict[str, str]) -> None:
    """Typing and presence, as ``--follow`` shows them (never stored anywhere)."""
    device = str(event.get("device"))
    if args.json:
        print(json.dumps(event, ensure_ascii=False), flush=True)
        return
    who = names.get(device) or device
    if event["event"] == "Typing":
        say(f"{who} is typing…" if event.get("typing") else f"{who} stopped typing")
    elif event["event"] == "PeerConnected":
        say(f"{who} is online")
    else:
        say(f"{who} went offline")


def _changes(
    old: dict[str, Any] | None, new: dict[str, Any], names: dict[str, str], *, ids: bool
) -> list[tuple[str, list[str]]]:
    """What ``--follow`` reports about one message: (kind, lines to show) each."""
    if old is None:
        return [("new", _message_lines(new, names, ids=ids))]
    who = names.get(new["device"]) or new["device"]
    quoted = safe(new["text"] if len(new["text"]) <= 40 else new["text"][:39] + "…")
    out: list[tuple[str, list[str]]] = []
    if new["deleted"] and not old["deleted"]:
        out.append(("deleted", [f"{who} deleted a message ({new['id']})"]))
    elif new["text"] != old["text"] or new["edited"] != old["edited"]:
        out.append(("edited", [f"{who} edited:", *_message_lines(new, names, ids=ids)]))
    for account, emoji in new["reactions"].items():
        if old["reactions"].get(account) != emoji:
            out.append(
                ("reaction", [f"{names.get(account) or account} reacted {emoji} to {quoted!r}"])
            )
    for account in old["reactions"].keys() - new["reactions"].keys():
        out.append(
            ("reaction", [f"{names.get(account) or account} withdrew a reaction to {quoted!r}"])
        )
    if new["status"] != old["status"]:
        out.append(
            ("status", [f"{_MARKS.get(new['status'], new['status'])} {new['status']}: {quoted!r}"])
        )
    return out


_MARKS = {"sent": "✓", "delivered": "✓✓", "read": "read"}


def _message_lines(m: dict[str, Any], names: dict[str, str], *, ids: bool) -> list[str]:
    """One message as ``p2p log`` shows it: its author by name (the device's own name
    for ours, the contact's name for another account's), with ids when asked."""
    flags = " (deleted)" if m["deleted"] else " (edited)" if m["edited"] else ""
    file = f" [{_file_line(m['file'])}]" if "file" in m else ""
    status = _MARKS.get(m["status"], m["status"])
    who = names.get(m["device"]) or m["device"]
    if ids:
        who = f"{m['id']} {who} ({m['device']})"
    reactions = ", ".join(
        f"{emoji} {names.get(account) or account}" for account, emoji in m["reactions"].items()
    )
    tail = f"  [{status}]" + (f"  {reactions}" if reactions else "")
    first, *more = multiline(m["text"])
    return [f"{_time_of(m['ts'])} {who}: {first}{file}{flags}{tail}", *more]


def _text_arg(text: str) -> str | None:
    """An error line when ``text`` is no message to send (empty or only blanks)."""
    return None if text.strip() else "a message needs some text"


def cmd_typing(args: argparse.Namespace) -> int:
    """Tell the chat's readers we type (what an app does on keystrokes): needs p2p run,
    since typing lives only in live sessions."""
    if control.request(_home(args), {"op": "typing", "chat": args.chat, "stop": args.stop}) is None:
        raise NodeError("typing is shown over live sessions only: start the node with p2p run")
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    if _text_arg(args.text):
        say("p2p: edit needs the new TEXT (p2p delete removes a message)", file=sys.stderr)
        return 2
    request = {"op": "edit", "message": args.message, "text": args.text, "chat": args.chat}
    return _print_id(args, _call(args, request)["id"])


def cmd_delete(args: argparse.Namespace) -> int:
    request = {"op": "delete", "message": args.message, "chat": args.chat}
    return _print_id(args, _call(args, request)["id"])


def cmd_react(args: argparse.Namespace) -> int:
    request = {"op": "react", "message": args.message, "text": args.emoji, "chat": args.chat}
    return _print_id(args, _call(args, request)["id"])


def _print_id(args: argparse.Namespace, entry: str) -> int:
    if args.json:
        print(json.dumps({"id": entry}))
    else:
        say(entry)
    return 0


# ---- attachments (p2p.media) -----------------------------------------------------------


def _size(n: int) -> str:
    """Bytes for people, in powers of 1024 like the sizes ``p2p media`` takes."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _file_line(f: dict[str, Any]) -> str:
    state = "fetched" if f["fetched"] else f"not fetched ({f['held']}/{f['chunks']} chunks)"
    return f"file {f['name']}, {_size(f['size'])}, {state}"


def _parse_size(text: str) -> int:
    """Bytes from ``123``, ``64K``, ``16M``, ``2G`` (powers of 1024)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B")
    factor = units.get(text[-1:], 1)
    try:
        value = int(text[:-1] if text[-1:] in units else text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    return value * factor


def _node_or_offline(
    args: argparse.Namespace,
    request: dict[str, Any],
    offline: Any,
    *,
    ask: Callable[[str], bool] | None = None,
) -> Any:
    """Ask the node running for the home; without one, run ``offline(node)`` on a node
    this process opens on the store (holding the home's lock, so none starts meanwhile).

    A home whose lock is taken while its control socket does not answer has a node
    starting (or stopping): wait for it and ask again, up to LOCK_WAIT seconds. Never
    write the store beside it: a node does not see what another process appends."""
    home = _home(args)

    async def run() -> Any:
        async with open_node(home) as node:
            return await offline(node)

    deadline = time.monotonic() + LOCK_WAIT
    waiting = False
    while True:
        reply = control.request(home, request, ask=ask)
        if reply is not None:
            return reply
        try:
            return trio.run(run)
        except AlreadyRunning as exc:
            if time.monotonic() > deadline:
                raise NodeError(f"{exc}, and it does not answer after {LOCK_WAIT:.0f} s") from None
            if not waiting:
                waiting = True
                print(f"p2p: waiting for the node of {home} to answer", file=sys.stderr, flush=True)
            time.sleep(0.05)


def cmd_fetch(args: argparse.Namespace) -> int:
    async def offline(node: Any) -> dict[str, Any]:
        attachment = await node.fetch(args.message, chat=args.chat)
        return {"file": {**attachment.summary(), **node.media.describe(attachment)}}

    request = {"op": "fetch", "message": args.message, "chat": args.chat}
    reply = _node_or_offline(args, request, offline)
    running = control.request(_home(args), {"op": "status"}) is not None
    file = reply["file"]
    if not running and not file["fetched"]:
        if args.json:
            print(json.dumps(file))
        else:
            say(f"{file['name']}: will be fetched when the node runs (p2p run)")
        return 0
    if args.no_wait or file["fetched"]:
        if args.json:
            print(json.dumps(file))
        else:
            say(_file_line(file))
        return 0
    return _follow(args, file)


def _follow(args: argparse.Namespace, file: dict[str, Any]) -> int:
    """Poll the running node until the file is here, with a progress bar."""
    from rich.progress import BarColumn, DownloadColumn, Progress, ProgressColumn, Task
    from rich.text import Text

    class Speed(ProgressColumn):
        """Bytes per second in the powers of 1024 every other size here is shown in
        (rich's own speed column counts in powers of 1000)."""

        def render(self, task: Task) -> Text:
            speed = task.finished_speed or task.speed
            return Text("?" if speed is None else f"{_size(int(speed))}/s")

    request = {"op": "describe", "message": args.message, "chat": args.chat}
    deadline = time.monotonic() + args.timeout
    with Progress(
        "{task.description}",
        BarColumn(),
        DownloadColumn(binary_units=True),
        Speed(),
        disable=args.json,
        transient=False,
    ) as bar:
        task = bar.add_task(safe(file["name"]), total=file["size"])
        while time.monotonic() < deadline:
            reply = control.request(_home(args), request)
            if reply is None:
                raise NodeError("the node stopped")
            file = reply["file"]
            bar.update(task, completed=file["size"] * file["held"] // max(file["chunks"], 1))
            if file["fetched"]:
                break
            time.sleep(0.2)
    if args.json:
        print(json.dumps(file))
    if not file["fetched"]:
        say(f"p2p: {file['name']} is not complete after {args.timeout} s", file=sys.stderr)
        return 1
    return 0


def cmd_open(args: argparse.Namespace) -> int:
    out = str(Path(args.out).resolve())

    async def offline(node: Any) -> dict[str, Any]:
        attachment = await node.open_attachment(args.message, out, chat=args.chat)
        return {"file": attachment.summary()}

    request = {"op": "open", "message": args.message, "chat": args.chat, "out": out}
    file = _node_or_offline(args, request, offline)["file"]
    if args.json:
        print(json.dumps({**file, "out": out}))
    else:
        say(f"wrote {file['name']} to {out}")
    return 0


def cmd_media(args: argparse.Namespace) -> int:
    from p2p.media.service import MediaPolicy, open_blobs

    changes = {
        "fetch": args.fetch,
        "below": args.below,
        "max_file": args.max_file,
        "quota": args.quota,
        "rate": args.rate,
    }
    reply = control.request(_home(args), {"op": "media", "set": changes})
    if reply is not None:
        status = reply["media"]
    else:
        open_home_store(_home(args)).close()  # NotInitialized for a home without a device
        blobs = open_blobs(_home(args))
        try:
            policy = MediaPolicy.load(blobs).with_(**changes)
            policy.save(blobs)
            own, fetched = blobs.usage()
        finally:
            blobs.close()
        status = {"policy": policy.to_json(), "own_bytes": own, "fetched_bytes": fetched}
    if args.json:
        print(json.dumps(status))
        return 0
    p = status["policy"]
    fetch = f"below {_size(p['below'])}" if p["fetch"] == "below" else p["fetch"]
    say(
        f"fetch {fetch}; largest file {_size(p['max_file'])}; quota {_size(p['quota'])}",
        f"serve rate per peer: {_size(p['rate']) + '/s' if p['rate'] else 'unlimited'}",
        f"held: {_size(status['own_bytes'])} own, {_size(status['fetched_bytes'])} fetched",
    )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    async def offline(node: Any) -> dict[str, Any]:
        return {"status": shapes.status_json(node.status()), "running": False}

    reply = _node_or_offline(args, {"op": "status"}, offline)
    status = {**reply["status"], "running": reply.get("running", True)}
    if args.json:
        print(json.dumps(status))
        return 0
    state = "running" if status["running"] else "not running"
    role = status["role"]
    if status.get("removed"):
        role = "unlinked from the account: reads nothing new, writes nothing"
    elif status.get("leaving"):
        role += ", asked to be unlinked (the primary acts at the next meeting)"
    say(f"device {status['device']} ({status['name']}, {role}), {state}")
    say(f"account {status['account']}, device list version {status['device_list_version']}")
    if status.get("address"):
        say(f"listening on {status['address']}")
    for p in status["peers"]:
        name = f"{p['name']} ({p['device']})" if p.get("name") else p["device"]
        say(f"  peer {name} via {p['remote']} ({p['found_via']})")
    for s in sorted(status["spaces"], key=lambda s: (s["kind"], s["name"], s["id"])):
        held = "history not loaded" if s["entries"] is None else f"{s['entries']} entries"
        say(f"  {s['kind']:<7} {s['name']:<10} {s['id']}  {held}")
    media = status.get("media")
    if media:
        say(
            f"media: {_size(media['own_bytes'])} own, {_size(media['fetched_bytes'])} fetched"
            f", {len(media['fetching'])} files fetching (fetch {media['policy']['fetch']})"
        )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from p2p.app.daemon import run_daemon

    return trio.run(
        partial(
            run_daemon,
            _home(args),
            listen=args.listen,
            peers=args.peer,
            mdns=not args.no_mdns,
            mdns_interfaces=args.mdns_interface,
            relays=args.relay,
            as_json=args.json,
        )
    )


class _LinkScreen:
    """What ``p2p link`` prints: a QR code and progress, or JSON lines."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self._shown = -1
        self._messages: int | None = -1
        self._bar: Any = None

    def _emit(self, **fields: Any) -> None:
        print(json.dumps(fields), flush=True)

    def code(self, text: str, device: str) -> None:
        if self.as_json:
            self._emit(code=text, device=device)
            return
        from p2p.proto.pairing import qr_text

        say(*qr_text(text).splitlines())
        say("pairing code (on the primary: p2p approve CODE):", text, "")
        say("waiting for the primary...")

    def check(self, digits: str) -> None:
        if self.as_json:
            self._emit(event="check", check=digits)
        else:
            say(f"check code: {digits}  (the primary must show the same)")

    def progress(
        self, done: int, total: int, messages_done: int | None, messages_total: int | None
    ) -> None:
        percent = 100 * done // total if total else 100
        if self.as_json:
            # a line per hundredth of the bytes or of the messages, and the last one
            counted = (
                None
                if messages_done is None or not messages_total
                else 100 * messages_done // messages_total
            )
            if percent != self._shown or counted != self._messages or done == total:
                self._shown = percent
                self._messages = counted
                self._emit(
                    event="progress",
                    done=done,
                    total=total,
                    messages_done=messages_done,
                    messages_total=messages_total,
                )
            return
        label = _link_label(done, total, messages_done, messages_total)
        if self._bar is None:
            from rich.progress import BarColumn, Progress, TextColumn

            self._bar = Progress(
                TextColumn("history"), BarColumn(), TextColumn("{task.description}"),
                transient=True,
            )  # fmt: skip
            self._bar.start()
            self._task = self._bar.add_task(label, total=total)
        self._bar.update(self._task, completed=done, description=label)
        if done >= total:
            self._bar.stop()
            self._bar = None

    def failed(self, error: P2PError) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if self.as_json:
            self._emit(event="failed", error=type(error).__name__, detail=str(error))
        else:
            say(f"link attempt failed: {error}; still waiting", file=sys.stderr)


def _link_label(
    done: int, total: int, messages_done: int | None, messages_total: int | None
) -> str:
    """What the link's progress bar says: "12,345 / 1,000,000 messages · 3.1 / 380 MB"
    (bytes alone when the primary states no message count)."""

    def mb(n: int) -> str:
        return f"{n / 1e6:,.1f}" if n < 100e6 else f"{n / 1e6:,.0f}"

    size = f"{mb(done)} / {mb(total)} MB"
    if messages_done is None or messages_total is None:
        return size
    return f"{messages_done:,} / {messages_total:,} messages · {size}"


def cmd_link(args: argparse.Namespace) -> int:
    from p2p.runtime.linking import wait_for_primary

    screen = _LinkScreen(args.json)
    state = trio.run(
        partial(
            wait_for_primary,
            _home(args),
            args.name,
            listen=args.listen,
            ttl_s=args.ttl,
            now_s=int(time.time()),
            ui=screen,
        )
    )
    if args.json:
        print(
            json.dumps(
                {"event": "enrolled", "device": state.device_id, "account": state.account_id}
            )
        )
    else:
        say(
            f"linked: this device ({state.name}, {state.device_id}) "
            f"joined account {state.account_id}"
        )
    return 0


def _warn_new_device(code_text: str, connect: str | None) -> None:
    """Before a person approves: who asks to join, from where, and what it will get
    (linked-device phishing hands out codes of an attacker's device)."""
    from p2p.proto.pairing import PairingCode, PairingError

    try:
        code = PairingCode.decode(code_text)
    except PairingError:
        return  # approving reports it
    where = connect or ", ".join(code.local_addresses()) or "no local address"
    say(
        f"device {code.device_id} at {where} asks to join your account.",
        "It will read every chat and send as you. Approve only a device you are holding now,",
        "that showed this code itself; if someone sent you this code, say no.",
        file=sys.stderr,
    )


def cmd_approve(args: argparse.Namespace) -> int:
    from p2p.proto.pairing import CheckCodeMismatch, same_check_code

    def ask(digits: str) -> bool:
        answer = input(f"check code {digits}: does the new device show the same? [y/N] ")
        return answer.strip().lower() in ("y", "yes")

    interactive = not (args.yes or args.check)
    if interactive:
        _warn_new_device(args.code, args.connect)
    request = {
        "op": "approve",
        "code": args.code,
        "check": args.check,
        "connect": args.connect,
        "interactive": interactive,
    }

    async def confirm(digits: str) -> bool:
        if args.yes:
            return True
        if args.check:
            if not same_check_code(digits, args.check):
                raise CheckCodeMismatch(
                    f"check code {args.check} differs from {digits}: nothing linked"
                )
            return True
        return await trio.to_thread.run_sync(ask, digits)

    screen = _LinkScreen(args.json)

    async def offline(node: Any) -> dict[str, str]:
        linked = await node.approve(
            args.code, confirm=confirm, connect=args.connect, progress=screen.progress
        )
        return {"name": linked.name, "device": linked.device}

    # a node running for this home links the device itself (it owns the store); the
    # check code still comes to this prompt
    reply = _node_or_offline(args, request, offline, ask=ask)
    name, device = reply["name"], reply["device"]
    if args.json:
        print(json.dumps({"event": "linked", "device": device, "name": name}))
    else:
        say(f"linked {name} ({device})")
    return 0


def cmd_unlink(args: argparse.Namespace) -> int:
    home = _home(args)
    if args.self:
        if args.device:
            say("p2p: give a DEVICE or --self, not both", file=sys.stderr)
            return 2

        async def leave(node: Any) -> dict[str, Any]:
            await node.leave()
            return {"offline": True}

        if _node_or_offline(args, {"op": "leave"}, leave).get("offline"):
            say("asked to be unlinked: the request goes to the primary at the next meeting")
        else:
            status = control.request(home, {"op": "status"})
            peers = {p["device"] for p in status["status"]["peers"]} if status else set()
            primary = status["status"]["primary"] if status else None
            if primary in peers:
                say("asked the primary to unlink this device")
            else:
                say("asked to be unlinked: the request goes to the primary at the next meeting")
        return 0
    if not args.device:
        say("p2p: unlink needs a DEVICE name or id (or --self on a companion)", file=sys.stderr)
        return 2

    async def offline(node: Any) -> dict[str, Any]:
        await node.unlink(args.device)
        return {"version": node.state.device_list.version}

    reply = _node_or_offline(args, {"op": "unlink", "device": args.device}, offline)
    version = int(reply["version"])
    say(f"unlinked {args.device}; keys rotated; device list version {version}")
    return 0


def cmd_relay(args: argparse.Namespace) -> int:
    from p2p.relay.__main__ import main as relay_main

    rest = list(args.relay_args)
    given = {a.split("=", 1)[0] for a in rest}
    if not given & {"--data", "--redis"}:  # a cluster process keeps its mail in Redis
        rest += ["--data", str(_home(args) / "relay")]  # the mailbox lives in the home
    return relay_main(rest)


def cmd_devices(args: argparse.Namespace) -> int:
    from p2p.state.device import DeviceState

    home = _home(args)
    store = open_home_store(home)
    try:
        state = DeviceState.load(store)
        seen = {n.removeprefix("seen/"): store.get(n) for n in store.names("seen/")}
        linked = {n.removeprefix("linked/"): store.get(n) for n in store.names("linked/")}
    finally:
        store.close()
    reply = control.request(home, {"op": "status"})  # who is connected right now
    online = {p["device"] for p in reply["status"]["peers"]} if reply is not None else set()
    dl = state.device_list
    for d in dl.devices:
        last = seen.get(d.device_id)
        linked_ms = int(linked[d.device_id] or 0) if d.device_id in linked else None
        row = {
            "id": d.device_id,
            "name": d.name,
            "role": d.role,
            "this": d.device_id == state.device_id,
            "online": d.device_id in online,
            "last_seen_ms": int(last) if last else None,
            "list_version": dl.version,
            "linked_ms": linked_ms,
        }
        if args.json:
            print(json.dumps(row))
            continue
        if row["this"]:
            where = "this device"
        elif row["online"]:
            where = "online"
        elif last:
            when = datetime.fromtimestamp(int(last) / 1000, UTC)
            where = f"last seen {when:%Y-%m-%d %H:%M}"
        else:
            where = "never seen"
        say(f"{d.device_id}  {d.role:<9}  {d.name:<12} {where}")
        if linked_ms and time.time() * 1000 - linked_ms < 7 * 24 * 3600 * 1000:
            when = datetime.fromtimestamp(linked_ms / 1000, UTC)
            say(f"  new device linked: {d.name} on {when:%Y-%m-%d %H:%M}")
    return 0


def _call(args: argparse.Namespace, payload: dict[str, Any]) -> dict[str, Any]:
    """One request, through the running node of this home, else on the store."""

    async def offline(node: Any) -> dict[str, Any]:
        return await control.handle(node, payload)

    result: dict[str, Any] = _node_or_offline(args, payload, offline)
    return result


def cmd_contact_code(args: argparse.Namespace) -> int:
    code = str(_call(args, {"op": "contact_code"})["code"])
    if args.json:
        print(json.dumps({"code": code}))
        return 0
    from segno import DataOverflowError

    from p2p.proto.pairing import qr_text

    try:
        say(*qr_text(code).splitlines())
    except DataOverflowError:  # a code too long for a QR code is still valid text
        say("(this contact code is too long for a QR code; pass the text)")
    say(code)
    return 0


def cmd_contact_add(args: argparse.Namespace) -> int:
    reply = _call(args, {"op": "contact_add", "code": args.code, "name": args.name})
    if args.json:
        print(json.dumps({"id": reply["id"], "name": reply.get("name", "")}))
    else:
        say(f"added contact {reply.get('name') or reply['id']} ({reply['id']})")
    return 0


def cmd_contacts(args: argparse.Namespace) -> int:
    reply = control.request(_home(args), {"op": "presence"})  # only a running node knows
    presence = reply["presence"] if reply is not None else []
    for c in _call(args, {"op": "contacts"})["contacts"]:
        theirs = [p for p in presence if p["account"] == c["id"]]
        online = sorted(p["device_name"] for p in theirs if p["online"])
        seen = max((p["last_seen_ms"] or 0 for p in theirs), default=0)
        if args.json:
            print(json.dumps({**c, "online": online, "last_seen_ms": seen or None}))
            continue
        if online:
            where = f"online ({', '.join(online)})"
        elif seen:
            where = f"last seen {datetime.fromtimestamp(seen / 1000, UTC):%Y-%m-%d %H:%M}"
        else:
            where = "not seen" if reply is not None else "(p2p run shows who is online)"
        say(f"{c['id']}  {c['name']}  ({len(c['devices'])} devices)  {where}")
    return 0


def cmd_chat_new(args: argparse.Namespace) -> int:
    # without a name, each account shows the conversation by the other members' names
    reply = _call(args, {"op": "chat_new", "name": args.name or "", "with": args.with_})
    if args.json:
        print(json.dumps({"chat": reply["chat"]}))
    else:
        say(reply["chat"])
    return 0


def cmd_chat_add(args: argparse.Namespace) -> int:
    _call(args, {"op": "chat_add", "chat": args.chat, "with": args.with_})
    if args.json:
        print(json.dumps({"chat": args.chat, "added": args.with_}))
    return 0


def cmd_chat_leave(args: argparse.Namespace) -> int:
    _call(args, {"op": "chat_leave", "chat": args.chat})
    if args.json:
        print(json.dumps({"left": args.chat}))
    return 0


def cmd_chats(args: argparse.Namespace) -> int:
    for c in _call(args, {"op": "chats"})["chats"]:
        if args.json:
            print(json.dumps(c, ensure_ascii=False))
        else:
            members = ", ".join(m["name"] or m["id"] for m in c["members"])
            say(f"{c['id']}  {c['name']}  [{members}]")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from p2p.app.demo import run_demo

    return run_demo(messages=args.messages, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="p2p", description="Peer-to-peer, local-first chat sync.")
    parser.add_argument("--version", action="version", version=f"p2p {__version__}")
    parser.add_argument(
        "--home", help="device data folder (default $P2P_HOME or the user data dir)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add(
        name: str, handler: Callable[[argparse.Namespace], int], help: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.set_defaults(handler=handler)
        p.add_argument("--json", action="store_true", help="print JSON (one object per line)")
        p.add_argument("--home", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        return p

    p = add("init", cmd_init, "new account; this device is its primary")
    p.add_argument("--name", required=True, help="this device's name")
    p = add("send", cmd_send, "send a message")
    p.add_argument("--chat", help="chat id or name (default: notes)")
    p.add_argument("--file", help="attach this file (the text becomes its caption)")
    p.add_argument("text", nargs="?")
    contact = sub.add_parser("contact", help="contact codes: show ours, add another account's")
    contact_sub = contact.add_subparsers(dest="contact_command", required=True)
    for name, handler, help in (
        ("code", cmd_contact_code, "print this account's contact code (QR + text)"),
        ("add", cmd_contact_add, "follow the account of a contact code"),
    ):
        p = contact_sub.add_parser(name, help=help)
        p.set_defaults(handler=handler)
        p.add_argument("--json", action="store_true", help="print JSON")
        p.add_argument("--home", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        if name == "add":
            p.add_argument("code")
            p.add_argument("--name", help="what to call the contact (default: its own name)")
    add("contacts", cmd_contacts, "the accounts this account follows")
    chat = sub.add_parser("chat", help="conversations with other accounts")
    chat_sub = chat.add_subparsers(dest="chat_command", required=True)
    p = chat_sub.add_parser("new", help="start a conversation with contacts")
    p.set_defaults(handler=cmd_chat_new)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--home", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--with", dest="with_", nargs="+", required=True, help="contact ids or names")
    p.add_argument("--name", help="the conversation's name (default: the contacts')")
    p = chat_sub.add_parser("add", help="add contacts to a conversation")
    p.set_defaults(handler=cmd_chat_add)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--home", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("chat", help="chat id or name")
    p.add_argument("--with", dest="with_", nargs="+", required=True, help="contact ids or names")
    p = chat_sub.add_parser("leave", help="leave a conversation (its key rotates without us)")
    p.set_defaults(handler=cmd_chat_leave)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--home", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("chat", help="chat id or name")
    add("chats", cmd_chats, "every chat: id, name, members")
    p = add("log", cmd_log, "messages in display order, with their delivery state")
    p.add_argument("--chat", help="chat id or name (default: notes)")
    p.add_argument(
        "--mark-read", action="store_true", help="record that this device has shown the chat"
    )
    p.add_argument("--ids", action="store_true", help="show message and device ids too")
    p.add_argument(
        "--follow", "-f", action="store_true", help="then show changes as they happen (Ctrl-C)"
    )
    p = add("typing", cmd_typing, "tell a chat's readers we are typing (through p2p run)")
    p.add_argument("--chat", help="chat id or name (default: notes)")
    p.add_argument("--stop", action="store_true", help="we stopped typing")
    for name, handler, help in (
        ("edit", cmd_edit, "replace the text of one of our messages"),
        ("delete", cmd_delete, "delete one of our messages for everyone"),
        ("react", cmd_react, "react to a message ('' withdraws our reaction)"),
    ):
        p = add(name, handler, help)
        p.add_argument("message", help="message id (p2p log --ids shows them)")
        if name == "edit":
            p.add_argument("text", help="the new text")
        if name == "react":
            p.add_argument("emoji", help="one emoji (at most 16 characters)")
        p.add_argument("--chat", help="chat id or name (default: notes)")
    add("devices", cmd_devices, "the signed device list")
    p = add("fetch", cmd_fetch, "fetch a message's attachment (progress bar)")
    p.add_argument("message", help="message id")
    p.add_argument("--chat", help="chat id or name (default: any)")
    p.add_argument("--no-wait", action="store_true", help="ask the node and return at once")
    p.add_argument("--timeout", type=float, default=3600, help="seconds to wait at most")
    p = add("open", cmd_open, "write a message's attachment, decrypted, to a file")
    p.add_argument("message", help="message id")
    p.add_argument("--out", required=True, help="where to write the file")
    p.add_argument("--chat", help="chat id or name (default: any)")
    p = add("media", cmd_media, "show or set the media policy")
    p.add_argument("--fetch", choices=["all", "below", "demand"], help="what to fetch by itself")
    p.add_argument("--below", type=_parse_size, help="size limit of --fetch below (16M)")
    p.add_argument("--max-file", type=_parse_size, help="largest file sent or fetched (100M)")
    p.add_argument("--quota", type=_parse_size, help="bytes of fetched files kept (1G)")
    p.add_argument("--rate", type=_parse_size, help="bytes/s served to each peer (0: no limit)")
    p = add("link", cmd_link, "new device: show a pairing code and wait for the primary")
    p.add_argument("--name", required=True, help="this device's name")
    p.add_argument("--listen", default="0.0.0.0:0", help="HOST:PORT the primary dials")
    p.add_argument(
        "--ttl", type=int, default=600, help="seconds the code stays valid (at most 600)"
    )
    p = add("approve", cmd_approve, "primary: link the device that shows CODE")
    p.add_argument("code")
    p.add_argument("--yes", action="store_true", help="skip comparing check codes (scripts)")
    p.add_argument("--check", help="the check code the new device shows")
    p.add_argument("--connect", help="HOST:PORT to reach the new device (overrides the code)")
    p = add("unlink", cmd_unlink, "primary: remove a device and rotate keys")
    p.add_argument("device", nargs="?", help="device name or id")
    p.add_argument("--self", action="store_true", help="companion: ask the primary to unlink us")
    add("status", cmd_status, "this device, its peers, its spaces")
    p = sub.add_parser(
        "relay",
        help="run a rendezvous relay: p2p relay --listen HOST:PORT [--data DIR | --redis URL]",
        add_help=False,
    )
    p.set_defaults(handler=cmd_relay)
    p.add_argument("relay_args", nargs=argparse.REMAINDER)
    p = add("run", cmd_run, "run the node until SIGINT/SIGTERM")
    p.add_argument("--listen", default="0.0.0.0:0", help="HOST:PORT to accept peers on")
    p.add_argument("--peer", action="append", default=[], help="HOST:PORT of a peer (repeatable)")
    p.add_argument("--no-mdns", action="store_true", help="do not use mDNS discovery")
    p.add_argument(
        "--relay",
        action="append",
        default=[],
        help="ws://HOST:PORT of a relay (repeatable); a cluster's processes as"
        " ws://HOST:PORT#id=RELAY_ID, one flag each",
    )
    p.add_argument(
        "--mdns-interface",
        action="append",
        default=[],
        help="address of an interface for mDNS (repeatable; default all)",
    )
    p = add("demo", cmd_demo, "the multi-device scenario, in one process")
    p.add_argument(
        "--messages", type=int, default=200, help="messages sent while the phone is away"
    )
    p.add_argument("--seed", type=int, default=1)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``p2p`` console script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "relay":  # everything after `relay` belongs to the relay's parser
        args.relay_args = [*extra, *args.relay_args]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.home is not None and not args.home.strip():
        say("p2p: --home is empty", file=sys.stderr)
        return 2
    try:
        code: int = args.handler(args)
    except BrokenPipeError:
        return _reader_gone()
    except BaseException as exc:  # sorted by _failure; a bug is re-raised
        code = _failure(exc)
        if code < 0:
            raise
    return code


def _failure(exc: BaseException) -> int:
    """One line on stderr and the exit code for an exception that ends a command, or -1
    for one that is a bug (its traceback is wanted). Trio wraps what ends ``trio.run``
    in exception groups: Ctrl-C while ``p2p link`` waits is one KeyboardInterrupt
    inside them, and is one line like any other Ctrl-C."""
    leaves = _leaves(exc)
    if any(isinstance(e, KeyboardInterrupt) for e in leaves):
        say("p2p: interrupted", file=sys.stderr)
        return 130
    if any(isinstance(e, BrokenPipeError) for e in leaves):
        return _reader_gone()
    known = [e for e in leaves if isinstance(e, (P2PError, OSError))]
    if not known or len(known) != len(leaves):
        return -1
    first = known[0]
    if isinstance(first, OSError) and not isinstance(first, P2PError):
        where = f" ({first.filename})" if first.filename else ""
        say(f"p2p: {first.strerror or first}{where}", file=sys.stderr)
    else:
        say(f"p2p: {first}", file=sys.stderr)
    return 1


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _reader_gone() -> int:
    """Whoever read our output stopped (``p2p log | head -1``): end quietly, with
    stdout pointed at /dev/null so the interpreter's last flush fails no more."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
