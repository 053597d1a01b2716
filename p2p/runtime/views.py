"""Typed values the :class:`~p2p.runtime.node.Node` API returns for what it reports.

Each is frozen: a snapshot of the node when it was asked, never a live view. How they
are printed (``p2p status --json``, the control socket) is the application's concern:
see :mod:`p2p.app.shapes`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from p2p.proto.model import Message
from p2p.state.device import Delivery


@dataclass(frozen=True)
class PeerStatus:
    """A device with an authenticated session right now."""

    device: str
    name: str
    """What we call it (see ``Node.display_names``)."""
    remote: str
    """The connection's address (``relay:...`` through a relay)."""
    found_via: str
    """Where its address came from ('static', 'mdns', 'relay', 'contact'), or 'incoming'."""
    connected_for: float
    """Seconds since the session authenticated."""


@dataclass(frozen=True)
class SpaceStatus:
    id: str
    kind: str
    """'chat' or 'account'."""
    name: str
    epoch: int
    entries: int | None
    """Entries in its CRDT, when loaded (None: not loaded in this process yet)."""
    loaded: bool


@dataclass(frozen=True)
class SetAsideStatus:
    """A chat whose stored history did not load (kept on disk as it is)."""

    id: str
    name: str
    reason: str


@dataclass(frozen=True)
class RelayStatus:
    url: str
    connected: bool
    address: str
    """Our address through it (``relay:<our id>``)."""


@dataclass(frozen=True)
class NodeStatus:
    """This device, its peers, its spaces and pending work (``p2p status``)."""

    device: str
    name: str
    account: str
    role: str
    """'primary' or 'companion'."""
    removed: bool
    leaving: bool
    address: str | None
    device_list_version: int
    primary: str
    """Our account's primary device."""
    peers: tuple[PeerStatus, ...]
    spaces: tuple[SpaceStatus, ...]
    set_aside: tuple[SetAsideStatus, ...]
    pending_writes: int
    pending_gossip: int
    traffic: dict[str, int]
    relays: tuple[RelayStatus, ...]
    media: dict[str, Any]
    """The media service's status (policy and usage; p2p.media)."""


@dataclass(frozen=True)
class Contact:
    """An account in our contact book."""

    id: str
    name: str
    """The name we gave it."""
    devices: tuple[str, ...]
    """Its current devices (none until its device list arrived)."""
    list_version: int


@dataclass(frozen=True)
class Member:
    """An account in a conversation."""

    id: str
    name: str
    """Its contact name ('me' for our account; '' if not a contact)."""


@dataclass(frozen=True)
class ChatSummary:
    id: str
    name: str
    epoch: int
    members: tuple[Member, ...]


@dataclass(frozen=True)
class DevicePresence:
    """Whether a device of ours or of an account we follow is online, and since when not."""

    device: str
    account: str
    name: str
    """What we call it (see ``Node.display_names``)."""
    device_name: str
    """The name the device carries on its account's signed list."""
    online: bool
    """A session with it is up, or a relay says it is connected."""
    last_seen_ms: int | None
    """When our last session with it ended (wall ms; None: never met)."""


@dataclass(frozen=True)
class Logged:
    """A message with its delivery state (``Node.log``)."""

    message: Message
    delivery: Delivery

    @property
    def status(self) -> str:
        """``sent``, ``delivered`` or ``read`` (see ``Delivery.status``)."""
        return self.delivery.status
