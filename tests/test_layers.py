"""The layering rules of docs/architecture.md, checked: imports only point down."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import p2p

FORBIDDEN = {"trio", "socket", "zeroconf", "trio_websocket", "sqlite3", "threading", "asyncio"}
ROOT = Path(p2p.__file__).parent

# Each layer (a folder of p2p/) and the layers it may import. Imports only point down:
# the pure protocol knows nothing of state, state nothing of the runtime, and no layer
# below the applications knows the applications.
MAY_IMPORT: dict[str, set[str]] = {
    "proto": {"errors", "events", "proto", "media"},
    "state": {"errors", "events", "proto", "state", "storage", "media"},
    "storage": {"errors", "storage"},
    "discovery": {"errors", "discovery"},
    "transport": {"errors", "proto", "transport", "discovery"},
    "media": {"errors", "events", "proto", "media", "storage"},
    "runtime": {"errors", "events", "proto", "state", "storage", "transport", "discovery"}
    | {"media", "runtime"},
    "relay": {"errors", "proto", "transport", "relay", "storage"},
    "app": {"errors", "events", "proto", "state", "storage", "transport", "discovery"}
    | {"media", "runtime", "relay", "app", "testing"},
    "testing": {"errors", "events", "proto", "state", "storage", "transport", "discovery"}
    | {"media", "runtime", "testing"},
}


def modules_of(layer: str) -> list[str]:
    """Every module in one layer folder, by dotted name."""
    return sorted(
        f"p2p.{layer}.{path.stem}" if path.stem != "__init__" else f"p2p.{layer}"
        for path in (ROOT / layer).glob("*.py")
    )


PURE = modules_of("proto") + modules_of("state") + ["p2p.media.descriptor", "p2p.media.fetch"]


def is_module(name: str) -> bool:
    """Whether ``p2p.<name>`` is a module or package (not a re-exported value)."""
    return (ROOT / name).is_dir() or (ROOT / f"{name}.py").exists()


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
            package = ROOT.joinpath(*node.module.split(".")[1:])
            subs = [a.name for a in node.names if (package / f"{a.name}.py").exists()]
            if node.module.startswith("p2p.") and subs:  # from p2p.app import shapes
                found |= {f"{node.module}.{name}" for name in subs}
            else:
                found.add(node.module)
            if node.module == "p2p":  # from p2p import envelope
                found |= {f"p2p.{alias.name}" for alias in node.names if is_module(alias.name)}
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
        if m.split(".")[0] in FORBIDDEN or m.startswith(("p2p.runtime", "p2p.transport"))
    )
    assert not bad, f"{module} pulls in {bad}"


def test_the_layer_check_can_fail() -> None:
    assert "trio" in closure("p2p.runtime.node")


def layer_of(module: str) -> str:
    """The layer folder of a p2p module ("errors" and "events" are layers of their own)."""
    return module.split(".")[1]


@pytest.mark.parametrize("layer", sorted(MAY_IMPORT))
def test_imports_only_point_down(layer: str) -> None:
    wrong = sorted(
        f"{module} imports {target}"
        for module in modules_of(layer)
        for target in imports_of(module)
        if target.startswith("p2p.") and layer_of(target) not in MAY_IMPORT[layer]
    )
    assert not wrong, wrong


def test_the_direction_check_can_fail() -> None:
    assert "p2p.state.device" in imports_of("p2p.runtime.node")
    assert "state" not in MAY_IMPORT["proto"]


def test_every_module_lives_in_a_layer() -> None:
    """A new module goes in the folder of its layer, not at the top of the package."""
    top = sorted(path.stem for path in ROOT.glob("*.py"))
    assert top == ["__init__", "__main__", "errors", "events"]


def test_importing_the_wire_format_loads_no_runtime() -> None:
    """A tool that only decodes frames must not pay for trio, SQLite and pycrdt."""
    probe = (
        "import sys, p2p.proto.wire; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in {'trio', 'sqlite3', 'pycrdt'}"
        " or m.startswith('p2p.')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert out.strip() == "['p2p.errors', 'p2p.events', 'p2p.proto', 'p2p.proto.wire']"


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


def import_table() -> str:
    """The "What imports what" table of docs/architecture.md, computed from the code:
    each module's top-level imports of p2p (by layer) and of other packages."""
    stdlib = set(sys.stdlib_module_names)
    rows = ["| module | imports from p2p | imports from elsewhere |", "|---|---|---|"]
    layers = [*sorted(MAY_IMPORT), "errors", "events"]
    for layer in layers:
        modules = modules_of(layer) if (ROOT / layer).is_dir() else [f"p2p.{layer}"]
        for module in modules:
            found = imports_of(module)
            if module.endswith("__main__") or not found:
                continue
            ours = sorted(m.removeprefix("p2p.") for m in found if m.startswith("p2p."))
            theirs = sorted(
                {m.split(".")[0] for m in found if not m.startswith("p2p")}
                - stdlib
                - {"__future__"}
            )
            name = module.removeprefix("p2p.")
            rows.append(f"| `{name}` | {', '.join(ours) or '-'} | {', '.join(theirs) or '-'} |")
    return "\n".join(rows) + "\n"


def test_the_import_table_in_architecture_md_is_the_code() -> None:
    """The docs say what is true now: the table is regenerated from the imports, and a
    change of imports changes it (paste the expected table from this failure)."""
    doc = (ROOT.parent / "docs" / "architecture.md").read_text()
    begin, end = "<!-- imports: begin -->\n", "<!-- imports: end -->"
    assert begin in doc
    assert end in doc
    current = doc.split(begin, 1)[1].split(end, 1)[0]
    assert current == import_table(), "\n" + import_table()
