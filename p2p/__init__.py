"""p2p: a peer-to-peer, local-first sync engine for chat.

The public surface is re-exported here (and pinned by ``tests/test_layers.py``);
everything else lives in modules an app need not import.

Errors and events are imported at once (they import nothing); the rest is loaded on
first use (PEP 562), so importing a pure module such as ``p2p.proto.wire`` does not
pull in trio, sockets or SQLite through this package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from p2p.errors import (
    AlreadyInitialized,
    AlreadyRunning,
    BadSignature,
    ChatCorrupt,
    ContactError,
    CryptoError,
    DecryptionFailed,
    DeviceListError,
    FrameTooLarge,
    GrantRefused,
    HandshakeFailed,
    InvalidUpdate,
    MalformedFrame,
    NodeError,
    NotInitialized,
    P2PError,
    ProtocolError,
    RemovedDevice,
    ReplayDetected,
    RollbackRefused,
    StoreCorrupt,
    StoreError,
    TooManyDevices,
    UnknownChat,
    UnknownDevice,
    UnknownKey,
    Unlinked,
    UnsupportedVersion,
    WireError,
)
from p2p.events import (
    ChatChanged,
    ChatKeysChanged,
    ChatSetAside,
    DeviceLinked,
    DeviceListChanged,
    EntryRejected,
    Event,
    InputRejected,
    MediaProgress,
    PeerConnected,
    PeerDisconnected,
    Typing,
)

if TYPE_CHECKING:
    from p2p.discovery.base import StaticPeers
    from p2p.proto.contacts import ContactCode, MalformedContactCode
    from p2p.proto.model import Message
    from p2p.runtime.home import default_home, init_account
    from p2p.runtime.node import Node, open_node
    from p2p.state.device import Delivery, DeviceState, Enrollment
    from p2p.transport.tcp import TcpTransport

_LAZY: dict[str, str] = {
    "ContactCode": "p2p.proto.contacts",
    "Delivery": "p2p.state.device",
    "DeviceState": "p2p.state.device",
    "Enrollment": "p2p.state.device",
    "MalformedContactCode": "p2p.proto.contacts",
    "Message": "p2p.proto.model",
    "Node": "p2p.runtime.node",
    "StaticPeers": "p2p.discovery.base",
    "TcpTransport": "p2p.transport.tcp",
    "default_home": "p2p.runtime.home",
    "init_account": "p2p.runtime.home",
    "open_node": "p2p.runtime.node",
}

__version__ = "0.1.0"

__all__ = [
    "AlreadyInitialized",
    "AlreadyRunning",
    "ChatCorrupt",
    "ChatSetAside",
    "BadSignature",
    "ChatChanged",
    "ChatKeysChanged",
    "ContactCode",
    "ContactError",
    "CryptoError",
    "DecryptionFailed",
    "Delivery",
    "DeviceLinked",
    "DeviceListChanged",
    "DeviceListError",
    "DeviceState",
    "Enrollment",
    "EntryRejected",
    "Event",
    "FrameTooLarge",
    "GrantRefused",
    "HandshakeFailed",
    "InputRejected",
    "InvalidUpdate",
    "MediaProgress",
    "MalformedContactCode",
    "MalformedFrame",
    "Message",
    "Node",
    "NodeError",
    "NotInitialized",
    "P2PError",
    "PeerConnected",
    "PeerDisconnected",
    "ProtocolError",
    "RemovedDevice",
    "ReplayDetected",
    "RollbackRefused",
    "StoreCorrupt",
    "StaticPeers",
    "StoreError",
    "TcpTransport",
    "TooManyDevices",
    "Typing",
    "UnknownChat",
    "UnknownDevice",
    "UnknownKey",
    "Unlinked",
    "UnsupportedVersion",
    "WireError",
    "__version__",
    "default_home",
    "init_account",
    "open_node",
]


def __getattr__(name: str) -> Any:
    """Load a lazily exported name from its module on first use."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'p2p' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
