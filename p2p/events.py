"""What a running node tells the app: frozen, keyword-only values (``Node.events()``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class ChatChanged:
    """A chat's content changed: a local write or updates from a peer."""

    chat: str
    """The chat's space id."""
    origin: str
    """Device id that wrote the change (ours for a local write)."""


@dataclass(frozen=True, kw_only=True)
class PeerConnected:
    """A linked device completed the handshake."""

    device: str
    remote: str
    """Where the connection goes (address), for display."""


@dataclass(frozen=True, kw_only=True)
class PeerDisconnected:
    """A session with a linked device ended."""

    device: str
    reason: str
    """Empty for a clean close, else the error's class name and message."""


@dataclass(frozen=True, kw_only=True)
class InputRejected:
    """Bad input from a connection was refused (and the connection closed, where it hurts)."""

    remote: str
    device: str | None
    """The peer's device id when it had authenticated, else None."""
    error: str
    """The typed error's class name."""
    detail: str


@dataclass(frozen=True, kw_only=True)
class EntryRejected:
    """An entry in a chat failed its author's signature check and is hidden."""

    chat: str
    entry_id: str
    device: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class DeviceListChanged:
    """A newer signed device list was adopted."""

    version: int
    devices: tuple[str, ...]
    added: tuple[str, ...] = ()
    """Devices new on this list ("new device linked")."""
    removed: tuple[str, ...] = ()
    account: str = ""
    """Whose list: empty for our own account, else a contact's (or a co-member's)
    account id."""


@dataclass(frozen=True, kw_only=True)
class DeviceLinked:
    """A device joined our account's list. Every device of the account reports it, so a
    link the owner did not make (a phished pairing code) shows on the devices they hold."""

    device: str
    name: str
    """The name the new device gave itself (its own word: compare it with what you
    linked)."""


@dataclass(frozen=True, kw_only=True)
class ChatKeysChanged:
    """A grant brought a conversation we did not hold (``joined``), a new key epoch,
    or a new member set."""

    chat: str
    epoch: int
    members: tuple[str, ...]
    joined: bool


@dataclass(frozen=True, kw_only=True)
class MediaProgress:
    """Chunks of an attachment arrived and are stored (``done == total``: complete)."""

    file: str
    """The attachment's id (``Attachment.id``)."""
    chat: str
    message: str
    """A message that carries it."""
    name: str
    done: int
    """Chunks held."""
    total: int
    size: int
    """The file's size in bytes."""


@dataclass(frozen=True, kw_only=True)
class Typing:
    """Someone started typing in a chat (``typing``), or stopped: said so, went quiet
    for ``node.TYPING_TTL`` seconds, or disconnected. Awareness from live sessions,
    never stored."""

    chat: str
    device: str
    """Who types: one of our devices, or a device of a member account."""
    typing: bool


@dataclass(frozen=True, kw_only=True)
class ChatSetAside:
    """A chat's stored history failed to load (a corrupt row): the chat is set aside,
    the node and every other chat go on. Its rows stay on disk for a later repair."""

    chat: str
    error: str
    """The typed error's class name."""
    detail: str


Event = (
    ChatChanged
    | PeerConnected
    | PeerDisconnected
    | InputRejected
    | EntryRejected
    | DeviceListChanged
    | DeviceLinked
    | ChatKeysChanged
    | MediaProgress
    | Typing
    | ChatSetAside
)
