"""p2p: a peer-to-peer, local-first sync engine for chat.

The public surface is re-exported here (and pinned by ``tests/test_layers.py``);
everything else lives in modules an app need not import.
"""

from p2p.contacts import ContactCode, MalformedContactCode
from p2p.core import Delivery, DeviceState, Enrollment
from p2p.discovery.base import StaticPeers
from p2p.errors import (
    AlreadyInitialized,
    BadSignature,
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
    PoisonedReplica,
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
from p2p.home import default_home, init_account
from p2p.model import Message
from p2p.node import Node, open_node
from p2p.transport.tcp import TcpTransport

__version__ = "0.1.0"

__all__ = [
    "AlreadyInitialized",
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
    "PoisonedReplica",
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
