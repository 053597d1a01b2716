"""The layering rules of docs/architecture.md, checked: imports only point down."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import p2p

PURE = [
    "p2p.sync",
    "p2p.core",
    "p2p.model",
    "p2p.envelope",
    "p2p.identity",
    "p2p.wire",
    "p2p.clock",
    "p2p.box",
    "p2p.pairing",
    "p2p.contacts",
    "p2p.grants",
    "p2p.authority",
    "p2p.yupdate",
    "p2p.ysplit",
    "p2p.relay.protocol",
    "p2p.media.descriptor",
    "p2p.media.fetch",
    "p2p.gossip",
    "p2p.peering",
]
FORBIDDEN = {"trio", "socket", "zeroconf", "trio_websocket", "sqlite3", "threading", "asyncio"}
ROOT = Path(p2p.__file__).parent


def imports_of(module: str) -> set[str]:
    """Modules a p2p module imports at its top level, read from its source."""
    path = ROOT.joinpath(*module.split(".")[1:]).with_suffix(".py")
    if not path.exists():
        path = path.with_suffix("") / "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            if node.module == "p2p":  # from p2p import envelope
                found |= {f"p2p.{alias.name}" for alias in node.names}
    return found


def closure(module: str) -> set[str]:
    """Everything ``module`` pulls in, following p2p's own modules (not packages' inits)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo.extend(m for m in imports_of(current) if m.startswith("p2p.") and m not in seen)
        seen |= {m for m in imports_of(current) if not m.startswith("p2p")}
    return seen


@pytest.mark.parametrize("module", PURE)
def test_sans_io_layers_import_no_trio_and_no_sockets(module: str) -> None:
    reached = closure(module)
    bad = sorted(
        m
        for m in reached
        if m.split(".")[0] in FORBIDDEN or m.startswith(("p2p.node", "p2p.transport"))
    )
    assert not bad, f"{module} pulls in {bad}"


def test_the_layer_check_can_fail() -> None:
    assert "trio" in closure("p2p.node")


def test_public_surface_is_pinned() -> None:
    """Adding to the API is a decision: this list changes with it, on purpose."""
    assert sorted(p2p.__all__) == sorted(
        [
            "AlreadyInitialized", "AlreadyRunning", "BadSignature", "ChatCorrupt", "ChatSetAside",
            "ChatChanged", "ChatKeysChanged", "ContactCode",
            "ContactError", "CryptoError", "DecryptionFailed", "Delivery", "GrantRefused",
            "MalformedContactCode", "DeviceListChanged", "DeviceListError", "DeviceState",
            "DeviceLinked", "Enrollment", "EntryRejected",
            "Event", "FrameTooLarge", "HandshakeFailed", "InputRejected", "InvalidUpdate",
            "MalformedFrame", "Message", "Node", "NodeError", "NotInitialized", "P2PError",
            "PeerConnected", "PeerDisconnected", "ProtocolError", "RemovedDevice", "ReplayDetected",
            "RollbackRefused", "StoreCorrupt", "StoreError", "TooManyDevices", "UnknownChat",
            "UnknownDevice", "UnknownKey", "UnsupportedVersion", "WireError", "__version__",
            "default_home", "init_account", "open_node",
            # what the embedding guide uses without reaching into submodules
            "MediaProgress", "StaticPeers", "TcpTransport", "Typing", "Unlinked",
        ]
    )  # fmt: skip
    for name in p2p.__all__:
        assert hasattr(p2p, name), name


def test_every_error_is_a_p2p_error() -> None:
    import p2p.errors as errors

    classes = [v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, Exception)]
    assert len(classes) > 15
    assert all(issubclass(c, p2p.P2PError) for c in classes)
