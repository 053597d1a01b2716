"""The ``p2p`` command: a thin shell over the Node API.

Exit codes are a contract (docs/architecture.md): 0 success, 1 a failed operation with
one line on stderr (never a traceback), 2 a usage error (argparse's own).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import trio

from p2p import control
from p2p.clock import parse_ts
from p2p.errors import NodeError, P2PError
from p2p.home import default_home, init_account, open_home_store
from p2p.node import open_node


def _home(args: argparse.Namespace) -> Path:
    return Path(args.home) if args.home else default_home()


def cmd_init(args: argparse.Namespace) -> int:
    state = init_account(_home(args), args.name)
    if args.json:
        print(
            json.dumps({"device": state.device_id, "account": state.account_id, "name": state.name})
        )
    else:
        print(
            f"account {state.account_id} created; "
            f"this device ({state.name}) is its primary {state.device_id}"
        )
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    text = args.text or ""
    file = str(Path(args.file).resolve()) if args.file else None
    if not file and args.text is None:
        print("p2p: send needs a TEXT, a --file, or both", file=sys.stderr)
        return 2

    async def run() -> str:
        async with open_node(_home(args)) as node:
            if file:
                return await node.send_file(file, text, chat=args.chat)
            return await node.send(text, chat=args.chat)

    # through the running node when there is one (it owns the store and gossips at once)
    request = {"op": "send", "text": text, "chat": args.chat, "file": file}
    reply = control.request(_home(args), request)
    message_id = str(reply["id"]) if reply is not None else trio.run(run)
    if args.json:
        print(json.dumps({"id": message_id}))
    else:
        print(message_id)
    return 0


def _time_of(ts: str) -> str:
    ms, _ = parse_ts(ts)
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def cmd_log(args: argparse.Namespace) -> int:
    reply = _call(args, {"op": "log", "chat": args.chat, "mark_read": args.mark_read})
    marks = {"sent": "✓", "delivered": "✓✓", "read": "read"}
    for m in reply["messages"]:
        if args.json:
            print(json.dumps(m, ensure_ascii=False))
        else:
            flags = " (deleted)" if m["deleted"] else " (edited)" if m["edited"] else ""
            file = f" [{_file_line(m['file'])}]" if "file" in m else ""
            status = marks.get(m["status"], m["status"])
            print(f"{_time_of(m['ts'])} {m['device']}: {m['text']}{file}{flags}  [{status}]")
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


def _node_or_offline(args: argparse.Namespace, request: dict[str, Any], offline: Any) -> Any:
    """Ask the running node; without one, run ``offline(node)`` on the store."""
    reply = control.request(_home(args), request)
    if reply is not None:
        return reply

    async def run() -> Any:
        async with open_node(_home(args)) as node:
            return await offline(node)

    return trio.run(run)


def cmd_fetch(args: argparse.Namespace) -> int:
    async def offline(node: Any) -> dict[str, Any]:
        attachment = await node.fetch(args.message, chat=args.chat)
        return {"file": {**attachment.summary(), **node.media.describe(attachment)}}

    request = {"op": "fetch", "message": args.message, "chat": args.chat}
    reply = _node_or_offline(args, request, offline)
    running = control.request(_home(args), {"op": "status"}) is not None
    file = reply["file"]
    if not running and not file["fetched"]:
        print(
            json.dumps(file)
            if args.json
            else f"{file['name']}: will be fetched when the node runs (p2p run)"
        )
        return 0
    if args.no_wait or file["fetched"]:
        print(json.dumps(file) if args.json else _file_line(file))
        return 0
    return _follow(args, file)


def _follow(args: argparse.Namespace, file: dict[str, Any]) -> int:
    """Poll the running node until the file is here, with a progress bar."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    request = {"op": "describe", "message": args.message, "chat": args.chat}
    deadline = time.monotonic() + args.timeout
    with Progress(
        "{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        disable=args.json,
        transient=False,
    ) as bar:
        task = bar.add_task(file["name"], total=file["size"])
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
        print(f"p2p: {file['name']} is not complete after {args.timeout} s", file=sys.stderr)
        return 1
    return 0


def cmd_open(args: argparse.Namespace) -> int:
    out = str(Path(args.out).resolve())

    async def offline(node: Any) -> dict[str, Any]:
        attachment = await node.open_attachment(args.message, out, chat=args.chat)
        return {"file": attachment.summary()}

    request = {"op": "open", "message": args.message, "chat": args.chat, "out": out}
    file = _node_or_offline(args, request, offline)["file"]
    print(json.dumps({**file, "out": out}) if args.json else f"wrote {file['name']} to {out}")
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
    print(f"fetch {fetch}; largest file {_size(p['max_file'])}; quota {_size(p['quota'])}")
    print(f"serve rate per peer: {_size(p['rate']) + '/s' if p['rate'] else 'unlimited'}")
    print(f"held: {_size(status['own_bytes'])} own, {_size(status['fetched_bytes'])} fetched")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    reply = control.request(_home(args), {"op": "status"})
    if reply is None:

        async def offline() -> dict[str, Any]:
            async with open_node(_home(args)) as node:
                return {**node.status(), "running": False}

        status = trio.run(offline)
    else:
        status = {**reply["status"], "running": True}
    if args.json:
        print(json.dumps(status))
        return 0
    state = "running" if status["running"] else "not running"
    print(f"device {status['device']} ({status['name']}, {status['role']}), {state}")
    print(f"account {status['account']}, device list version {status['device_list_version']}")
    if status.get("address"):
        print(f"listening on {status['address']}")
    for p in status["peers"]:
        print(f"  peer {p['device']} via {p['remote']} ({p['found_via']})")
    for s in status["spaces"]:
        held = "history not loaded" if s["entries"] is None else f"{s['entries']} entries"
        print(f"  {s['kind']:<7} {s['name']:<10} {s['id']}  {held}")
    media = status.get("media")
    if media:
        print(
            f"media: {_size(media['own_bytes'])} own, {_size(media['fetched_bytes'])} fetched"
            f", {len(media['fetching'])} files fetching (fetch {media['policy']['fetch']})"
        )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from p2p.daemon import run_daemon

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
        self._bar: Any = None

    def _emit(self, **fields: Any) -> None:
        print(json.dumps(fields), flush=True)

    def code(self, text: str, device: str) -> None:
        if self.as_json:
            self._emit(code=text, device=device)
            return
        from p2p.pairing import qr_text

        print(qr_text(text))
        print(f"pairing code (on the primary: p2p approve CODE):\n{text}\n", flush=True)
        print("waiting for the primary...", flush=True)

    def check(self, digits: str) -> None:
        if self.as_json:
            self._emit(event="check", check=digits)
        else:
            print(f"check code: {digits}  (the primary must show the same)", flush=True)

    def progress(self, done: int, total: int) -> None:
        percent = 100 * done // total if total else 100
        if self.as_json:
            if percent // 10 != self._shown // 10 or done == total:
                self._shown = percent
                self._emit(event="progress", done=done, total=total)
            return
        if self._bar is None:
            from rich.progress import Progress

            self._bar = Progress(transient=True)
            self._bar.start()
            self._task = self._bar.add_task("history", total=total)
        self._bar.update(self._task, completed=done)
        if done >= total:
            self._bar.stop()

    def failed(self, error: P2PError) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if self.as_json:
            self._emit(event="failed", error=type(error).__name__, detail=str(error))
        else:
            print(f"link attempt failed: {error}; still waiting", file=sys.stderr, flush=True)


def cmd_link(args: argparse.Namespace) -> int:
    from p2p.linking import wait_for_primary

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
        print(
            f"linked: this device ({state.name}, {state.device_id}) "
            f"joined account {state.account_id}"
        )
    return 0


def cmd_approve(args: argparse.Namespace) -> int:
    from p2p.pairing import CheckCodeMismatch, same_check_code

    home = _home(args)

    def ask(digits: str) -> bool:
        answer = input(f"check code {digits}: does the new device show the same? [y/N] ")
        return answer.strip().lower() in ("y", "yes")

    interactive = not (args.yes or args.check)
    request = {
        "op": "approve",
        "code": args.code,
        "check": args.check,
        "connect": args.connect,
        "interactive": interactive,
    }
    # a node running for this home links the device itself (it owns the store); the
    # check code still comes to this prompt
    reply = control.request(home, request, ask=ask)
    if reply is not None:
        if args.json:
            print(json.dumps({"event": "linked", "device": reply["device"], "name": reply["name"]}))
        else:
            print(f"linked {reply['name']} ({reply['device']})")
        return 0

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

    async def run() -> tuple[str, str]:
        async with open_node(home) as node:
            linked = await node.approve(
                args.code, confirm=confirm, connect=args.connect, progress=screen.progress
            )
            return linked.name, linked.device

    name, device = trio.run(run)
    if args.json:
        print(json.dumps({"event": "linked", "device": device, "name": name}))
    else:
        print(f"linked {name} ({device})")
    return 0


def cmd_unlink(args: argparse.Namespace) -> int:
    home = _home(args)
    if args.self:
        if args.device:
            print("p2p: give a DEVICE or --self, not both", file=sys.stderr)
            return 2
        if control.request(home, {"op": "leave"}) is None:

            async def leave() -> None:
                async with open_node(home) as node:
                    await node.leave()

            trio.run(leave)
            print("asked to be unlinked: the request goes to the primary at the next meeting")
        else:
            status = control.request(home, {"op": "status"})
            peers = {p["device"] for p in status["status"]["peers"]} if status else set()
            primary = status["status"]["primary"] if status else None
            if primary in peers:
                print("asked the primary to unlink this device")
            else:
                print("asked to be unlinked: the request goes to the primary at the next meeting")
        return 0
    if not args.device:
        print("p2p: unlink needs a DEVICE id (or --self on a companion)", file=sys.stderr)
        return 2
    reply = control.request(home, {"op": "unlink", "device": args.device})
    if reply is None:

        async def run() -> int:
            async with open_node(home) as node:
                await node.unlink(args.device)
                return node.state.device_list.version

        version = trio.run(run)
    else:
        version = int(reply["version"])
    print(f"unlinked {args.device}; keys rotated; device list version {version}")
    return 0


def cmd_relay(args: argparse.Namespace) -> int:
    from p2p.relay.__main__ import main as relay_main

    rest = list(args.relay_args)
    given = {a.split("=", 1)[0] for a in rest}
    if not given & {"--data", "--redis"}:  # a cluster process keeps its mail in Redis
        rest += ["--data", str(_home(args) / "relay")]  # the mailbox lives in the home
    return relay_main(rest)


def cmd_devices(args: argparse.Namespace) -> int:
    from p2p.core import DeviceState

    home = _home(args)
    store = open_home_store(home)
    try:
        state = DeviceState.load(store)
        seen = {n.removeprefix("seen/"): store.get(n) for n in store.names("seen/")}
    finally:
        store.close()
    reply = control.request(home, {"op": "status"})  # who is connected right now
    online = {p["device"] for p in reply["status"]["peers"]} if reply is not None else set()
    dl = state.device_list
    for d in dl.devices:
        last = seen.get(d.device_id)
        row = {
            "id": d.device_id,
            "name": d.name,
            "role": d.role,
            "this": d.device_id == state.device_id,
            "online": d.device_id in online,
            "last_seen_ms": int(last) if last else None,
            "list_version": dl.version,
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
        print(f"{d.device_id}  {d.role:<9}  {d.name:<12} {where}")
    return 0


def _call(args: argparse.Namespace, payload: dict[str, Any]) -> dict[str, Any]:
    """One request, through the running node of this home, else on the store."""
    reply = control.request(_home(args), payload)
    if reply is not None:
        return reply

    async def offline() -> dict[str, Any]:
        async with open_node(_home(args)) as node:
            return await control.handle(node, payload)

    return trio.run(offline)


def cmd_contact_code(args: argparse.Namespace) -> int:
    code = str(_call(args, {"op": "contact_code"})["code"])
    if args.json:
        print(json.dumps({"code": code}))
        return 0
    from segno import DataOverflowError

    from p2p.pairing import qr_text

    try:
        print(qr_text(code))
    except DataOverflowError:  # a code too long for a QR code is still valid text
        print("(this contact code is too long for a QR code; pass the text)")
    print(code)
    return 0


def cmd_contact_add(args: argparse.Namespace) -> int:
    reply = _call(args, {"op": "contact_add", "code": args.code, "name": args.name})
    if args.json:
        print(json.dumps({"id": reply["id"]}))
    else:
        print(f"contact {reply['id']} added")
    return 0


def cmd_contacts(args: argparse.Namespace) -> int:
    for c in _call(args, {"op": "contacts"})["contacts"]:
        if args.json:
            print(json.dumps(c, ensure_ascii=False))
        else:
            print(f"{c['id']}  {c['name']}  ({len(c['devices'])} devices)")
    return 0


def cmd_chat_new(args: argparse.Namespace) -> int:
    name = args.name or ", ".join(args.with_)
    reply = _call(args, {"op": "chat_new", "name": name, "with": args.with_})
    print(json.dumps({"chat": reply["chat"]}) if args.json else reply["chat"])
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
            print(f"{c['id']}  {c['name']}  [{members}]")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from p2p.demo import run_demo

    return run_demo(messages=args.messages, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="p2p", description="Peer-to-peer, local-first chat sync.")
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
    p.add_argument("--ttl", type=int, default=600, help="seconds the code stays valid")
    p = add("approve", cmd_approve, "primary: link the device that shows CODE")
    p.add_argument("code")
    p.add_argument("--yes", action="store_true", help="skip comparing check codes (scripts)")
    p.add_argument("--check", help="the check code the new device shows")
    p.add_argument("--connect", help="HOST:PORT to reach the new device (overrides the code)")
    p = add("unlink", cmd_unlink, "primary: remove a device and rotate keys")
    p.add_argument("device", nargs="?", help="device id")
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
        print("p2p: --home is empty", file=sys.stderr)
        return 2
    try:
        code: int = args.handler(args)
    except P2PError as exc:
        print(f"p2p: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        print(f"p2p: {exc.strerror or exc} ({exc.filename or ''})".rstrip(" ()"), file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
