"""The local control socket: how ``p2p send/log/status`` reach a running node.

A unix socket ``<home>/control.sock``, owner-only (0600, in a 0700 home). One JSON
request per connection, one JSON reply, both a single line of at most
:data:`MAX_LINE` bytes::

    {"op": "send", "text": "...", "chat": null}   -> {"ok": true, "id": "..."}
    {"op": "log", "chat": null, "mark_read": false} -> {"ok": true, "messages": [...],
                                                        "names": {id: name}}
    {"op": "status"}                                -> {"ok": true, "status": {...}}
    {"op": "contact_code"}                          -> {"ok": true, "code": "P2PC2:..."}
    {"op": "contact_add", "code": "...", "name": null} -> {"ok": true, "id": "...",
                                                           "name": "..."}
    {"op": "contacts"}                              -> {"ok": true, "contacts": [...]}
    {"op": "chat_new", "name": "...", "with": [...]} -> {"ok": true, "chat": "..."}
    {"op": "chats"}                                 -> {"ok": true, "chats": [...]}
    {"op": "chat_add", "chat": "...", "with": [...]} -> {"ok": true}
    {"op": "chat_leave", "chat": "..."}             -> {"ok": true}
    {"op": "edit", "message": "...", "text": "...", "chat": null} -> {"ok": true, "id": "..."}
    {"op": "delete", "message": "...", "chat": null} -> {"ok": true, "id": "..."}
    {"op": "react", "message": "...", "text": "👍", "chat": null} -> {"ok": true, "id": "..."}
    {"op": "typing", "chat": null, "stop": false}   -> {"ok": true}
    {"op": "presence"}                              -> {"ok": true, "presence": [...]}

``{"op": "watch", "chat": null}`` is the one request that is not answered once: the node
sends ``{"ok": true, "chat": ID}`` and then one line per event of that chat (and per
event that belongs to no chat) until the client closes the connection.

A failed request gets ``{"ok": false, "error": "<ErrorClass>", "message": "..."}``; so
does any request the node cannot read (longer than :data:`MAX_LINE`, nested deeper than
:data:`MAX_DEPTH`, not JSON) and any that meets a bug: a request never ends the node.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Final

import trio

from p2p.app import shapes
from p2p.errors import NodeError, P2PError
from p2p.media.descriptor import Attachment
from p2p.proto.pairing import CheckCodeMismatch, same_check_code
from p2p.proto.wire import load_json
from p2p.runtime.node import Node

log = logging.getLogger("p2p.app.control")

SOCKET_FILE: Final = "control.sock"
MAX_LINE: Final = 256 * 1024
MAX_DEPTH: Final = 8
"""Nesting a request may have (checked before parsing; requests nest 2 deep)."""
REQUEST_TIMEOUT: Final = 10.0
"""Longest wait for a request line (an owner's client that stalls is cut off)."""
CONFIRM_TIMEOUT: Final = 300.0
"""How long a person has to compare check codes at the ``p2p approve`` prompt."""
REPLY_TIMEOUT: Final = 600.0
"""Longest wait for a reply: a link moves a whole history before it answers."""


class ControlError(NodeError):
    """The running node refused a control request (the reason is in the message)."""

    error: str = "ControlError"
    """The class name of the error the node raised (its message is this one's)."""


def _read_reply(sock: socket.socket) -> Any:
    data = bytearray()
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
        if len(data) > 64 * MAX_LINE:
            raise ControlError("reply too long")
    try:
        return json.loads(data)
    except ValueError:
        raise ControlError("the node closed the control socket without a valid reply") from None


def socket_path(home: str | os.PathLike[str]) -> Path:
    return Path(home) / SOCKET_FILE


Ask = Callable[[str], Awaitable[bool]]


@dataclasses.dataclass(frozen=True)
class _Request:
    """One checked request: its fields, and who to ask at the prompt (``approve``)."""

    fields: dict[str, Any]
    chat: str | None
    ask: Ask

    def get(self, name: str, default: Any = None) -> Any:
        return self.fields.get(name, default)


Op = Callable[[Node, _Request], Awaitable[dict[str, Any]]]


async def _send(node: Node, r: _Request) -> dict[str, Any]:
    text, file = r.get("text"), r.get("file")
    if not isinstance(text, str) or not (file is None or isinstance(file, str)):
        raise ControlError("'text' must be a string, 'file' a path or null")
    if file is not None:
        return {"id": await node.send_file(file, text, chat=r.chat)}
    return {"id": await node.send(text, chat=r.chat)}


def _message_and_text(r: _Request) -> tuple[str, str]:
    message, text = r.get("message"), r.get("text", "")
    if not isinstance(message, str) or not isinstance(text, str):
        raise ControlError("'message' and 'text' must be strings")
    return message, text


async def _edit(node: Node, r: _Request) -> dict[str, Any]:
    message, text = _message_and_text(r)
    return {"id": await node.edit(message, text, chat=r.chat)}


async def _delete(node: Node, r: _Request) -> dict[str, Any]:
    message, _ = _message_and_text(r)
    return {"id": await node.delete(message, chat=r.chat)}


async def _react(node: Node, r: _Request) -> dict[str, Any]:
    message, text = _message_and_text(r)
    return {"id": await node.react(message, text, chat=r.chat)}


async def _no_watch(node: Node, r: _Request) -> dict[str, Any]:
    raise ControlError("watching needs a running node (p2p run)")


async def _typing(node: Node, r: _Request) -> dict[str, Any]:
    node.set_typing(r.chat, typing=not r.get("stop"))
    return {}


async def _presence(node: Node, r: _Request) -> dict[str, Any]:
    return {"presence": shapes.presence_json(node.presence())}


async def _log(node: Node, r: _Request) -> dict[str, Any]:
    if r.get("mark_read"):
        await node.mark_read(chat=r.chat)
    logged = shapes.log_json(node.media, await node.log(r.chat))
    return {"messages": logged, "names": node.display_names()}


def _message_and_out(r: _Request) -> tuple[str, str | None]:
    message, out = r.get("message"), r.get("out")
    if not isinstance(message, str) or not (out is None or isinstance(out, str)):
        raise ControlError("'message' must be a string, 'out' a path or null")
    return message, out


def _attachment_json(node: Node, attachment: Attachment) -> dict[str, Any]:
    return {"file": {**attachment.summary(), **node.media.describe(attachment)}}


async def _fetch(node: Node, r: _Request) -> dict[str, Any]:
    message, _ = _message_and_out(r)
    return _attachment_json(node, await node.fetch(message, chat=r.chat))


async def _open(node: Node, r: _Request) -> dict[str, Any]:
    message, out = _message_and_out(r)
    if out is None:
        raise ControlError("'out' is needed to open an attachment")
    return _attachment_json(node, await node.open_attachment(message, out, chat=r.chat))


async def _describe(node: Node, r: _Request) -> dict[str, Any]:
    message, _ = _message_and_out(r)
    _, attachment = node.media.find(message, r.chat)
    return _attachment_json(node, attachment)


async def _media(node: Node, r: _Request) -> dict[str, Any]:
    changes = r.get("set") or {}
    if not isinstance(changes, dict):
        raise ControlError("'set' must be an object")
    node.media.set_policy(**changes)
    return {"media": node.media.status()}


async def _status(node: Node, r: _Request) -> dict[str, Any]:
    return {"status": shapes.status_json(node.status())}


async def _approve(node: Node, r: _Request) -> dict[str, Any]:
    code, check, connect = r.get("code"), r.get("check"), r.get("connect")
    if not isinstance(code, str) or not all(
        v is None or isinstance(v, str) for v in (check, connect)
    ):
        raise ControlError("'code' must be a string, 'check' and 'connect' strings or null")

    async def confirm(digits: str) -> bool:
        if r.get("interactive"):
            return await r.ask(digits)  # the person at the `p2p approve` prompt
        return check is None or same_check_code(digits, check)

    linked = await node.approve(code, confirm=confirm, connect=connect)
    return {"device": linked.device, "name": linked.name}


async def _leave(node: Node, r: _Request) -> dict[str, Any]:
    await node.leave()
    return {}


async def _unlink(node: Node, r: _Request) -> dict[str, Any]:
    device = r.get("device")
    if not isinstance(device, str):
        raise ControlError("'device' must be a string")
    await node.unlink(device)
    return {"version": node.state.device_list.version}


async def _contact_code(node: Node, r: _Request) -> dict[str, Any]:
    return {"code": node.contact_code().encode()}


async def _contact_add(node: Node, r: _Request) -> dict[str, Any]:
    code, name = r.get("code"), r.get("name")
    if not isinstance(code, str) or not (name is None or isinstance(name, str)):
        raise ControlError("'code' must be a string, 'name' a string or null")
    account = await node.add_contact(code, name=name)
    return {"id": account, "name": node.display_names().get(account, "")}


async def _contacts(node: Node, r: _Request) -> dict[str, Any]:
    return {"contacts": shapes.contacts_json(node.contacts())}


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, str) for m in value)


async def _chat_new(node: Node, r: _Request) -> dict[str, Any]:
    members, name = r.get("with"), r.get("name")
    if not _strings(members):
        raise ControlError("'with' must be a list of strings")
    if not isinstance(name, str):
        raise ControlError("'name' must be a string")
    return {"chat": await node.create_chat(name, with_=members)}


async def _chat_add(node: Node, r: _Request) -> dict[str, Any]:
    members = r.get("with")
    if r.chat is None or not _strings(members):
        raise ControlError("'chat' must be a string, 'with' a list of strings")
    await node.add_to_chat(r.chat, with_=members)
    return {}


async def _chat_leave(node: Node, r: _Request) -> dict[str, Any]:
    if r.chat is None:
        raise ControlError("'chat' must be a string")
    await node.leave_chat(r.chat)
    return {}


async def _chats(node: Node, r: _Request) -> dict[str, Any]:
    return {"chats": shapes.chats_json(node.chat_summaries())}


OPS: Final[dict[str, Op]] = {
    "send": _send,
    "edit": _edit,
    "delete": _delete,
    "react": _react,
    "watch": _no_watch,
    "typing": _typing,
    "presence": _presence,
    "log": _log,
    "fetch": _fetch,
    "open": _open,
    "describe": _describe,
    "media": _media,
    "status": _status,
    "approve": _approve,
    "leave": _leave,
    "unlink": _unlink,
    "contact_code": _contact_code,
    "contact_add": _contact_add,
    "contacts": _contacts,
    "chat_new": _chat_new,
    "chat_add": _chat_add,
    "chat_leave": _chat_leave,
    "chats": _chats,
}
"""The control socket's dispatch table: each request's ``op`` and what carries it out
(``watch`` is served by the connection loop of a running node, before this table)."""


async def _handle(node: Node, request: object, ask: Ask) -> dict[str, Any]:
    if not isinstance(request, dict) or not isinstance(request.get("op"), str):
        raise ControlError("a request is an object with an 'op'")
    op, chat = request["op"], request.get("chat")
    if chat is not None and not isinstance(chat, str):
        raise ControlError("'chat' must be a string")
    carry_out = OPS.get(op)
    if carry_out is None:
        raise ControlError(f"unknown op {op[:32]!r}")
    return await carry_out(node, _Request(request, chat, ask))


async def handle(node: Node, request: dict[str, Any]) -> dict[str, Any]:
    """Carry out one request on a node this process opened itself (no node was running
    for the home): the same code a running node's control socket uses."""

    async def refuse(digits: str) -> bool:
        return False

    return await _handle(node, request, refuse)


async def serve_control(
    node: Node,
    home: str | os.PathLike[str],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer control requests for ``node`` until cancelled; removes the socket after."""
    path = socket_path(home)
    path.unlink(missing_ok=True)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket file is born owner-only
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old_umask)
    sock.listen(16)
    listener = trio.SocketListener(sock)

    async def answer(stream: trio.SocketStream) -> None:
        async with stream:
            reply: dict[str, Any]
            try:
                with trio.fail_after(REQUEST_TIMEOUT):
                    line = await _read_line(stream)

                async def ask(digits: str) -> bool:
                    """Show the check code at the client and wait for the person's answer."""
                    await stream.send_all(
                        json.dumps({"event": "check", "check": digits}).encode() + b"\n"
                    )
                    with trio.fail_after(CONFIRM_TIMEOUT):
                        answer = _parse(await _read_line(stream))
                    return isinstance(answer, dict) and answer.get("confirm") is True

                request = _parse(line)
                if isinstance(request, dict) and request.get("op") == "watch":
                    await _watch(node, stream, request)
                    return
                reply = {"ok": True, **(await _handle(node, request, ask))}
            except (P2PError, ValueError, trio.TooSlowError) as exc:
                reply = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
            except Exception as exc:  # a bug met by one request must not end the node
                log.exception("bug while answering a control request")
                reply = {"ok": False, "error": "InternalError", "message": type(exc).__name__}
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(json.dumps(reply).encode() + b"\n")

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, answer, [listener])
            task_status.started()
    finally:
        path.unlink(missing_ok=True)


def _parse(line: bytes) -> object:
    """One request line: bounded in size and nesting before ``json.loads`` sees it."""
    return load_json(line, what="control request", max_size=MAX_LINE, max_depth=MAX_DEPTH)


async def _watch(node: Node, stream: trio.SocketStream, request: dict[str, Any]) -> None:
    """Stream the node's events to a ``p2p log --follow``, one JSON line each, until
    the client goes away: ``{"ok": true}`` first, then ``{"event": "<class>", ...}``.

    A chat's events say *that* it changed; the client reads the log again to see what
    (a slow client loses events, as any subscriber does, never the node's memory)."""
    chat = request.get("chat")
    if chat is not None and not isinstance(chat, str):
        raise ControlError("'chat' must be a string")
    # UnknownChat before anything is streamed
    watched = node.chat_id(chat)
    events = node.subscribe()

    async def until_closed(scope: trio.CancelScope) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while await stream.receive_some(1024):
                pass
        scope.cancel()

    with events, contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(until_closed, nursery.cancel_scope)
            await stream.send_all(json.dumps({"ok": True, "chat": watched}).encode() + b"\n")
            async for event in events:
                fields = dataclasses.asdict(event)
                if fields.get("chat", watched) != watched:
                    continue
                line = {"event": type(event).__name__, **fields}
                await stream.send_all(json.dumps(line, default=list).encode() + b"\n")


def watch(home: str | os.PathLike[str], chat: str | None) -> Iterator[dict[str, Any]]:
    """The running node's events for ``chat``, as they happen (blocking; for the CLI).

    The first item is the node's ``{"ok": true, "chat": ID}``; NodeError when no node
    runs for ``home``."""
    path = socket_path(home)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            raise NodeError("following needs a running node: start it with p2p run") from None
        sock.sendall(json.dumps({"op": "watch", "chat": chat}).encode() + b"\n")
        with sock.makefile("rb") as lines:
            for raw in lines:
                if len(raw) > MAX_LINE:
                    raise ControlError("event line too long")
                item = _parse(raw)
                if isinstance(item, dict) and item.get("ok") is False:
                    raise ControlError(str(item.get("message")))
                if isinstance(item, dict):
                    yield item


async def _read_line(stream: trio.abc.ReceiveStream) -> bytes:
    data = bytearray()
    while b"\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_LINE:
            raise ControlError(f"request longer than {MAX_LINE} bytes")
    return bytes(data.split(b"\n", 1)[0])


def request(
    home: str | os.PathLike[str],
    payload: dict[str, Any],
    *,
    ask: Callable[[str], bool] | None = None,
) -> dict[str, Any] | None:
    """Ask the node running for ``home``; None if no node is running there.

    Blocking on purpose: the CLI calls it before (or instead of) starting trio.
    """
    path = socket_path(home)
    if not path.exists():
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(REPLY_TIMEOUT)
        try:
            sock.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return None  # a stale socket from a node that died
        sock.sendall(json.dumps(payload).encode() + b"\n")
        reply = _read_reply(sock)
        while isinstance(reply, dict) and reply.get("event") == "check":
            # the node asks the person to compare check codes (p2p approve, interactive)
            confirmed = ask is not None and ask(str(reply.get("check")))
            sock.sendall(json.dumps({"confirm": confirmed}).encode() + b"\n")
            reply = _read_reply(sock)
    if not isinstance(reply, dict):
        raise ControlError("malformed reply from the node")
    if not reply.get("ok") and reply.get("error") in ("CheckCodeMismatch",):
        raise CheckCodeMismatch(str(reply.get("message")))
    if not reply.get("ok"):
        # the node's words, as the same command says them without a running node
        error = ControlError(str(reply.get("message")))
        error.error = str(reply.get("error"))
        raise error
    return reply
