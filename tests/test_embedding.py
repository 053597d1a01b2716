"""The embedding guide and the demos run as written.

Every ```python block of docs/embedding.md runs in a fresh namespace, with a temporary
working directory and ``P2P_HOME`` set to an empty temporary folder; a block that defines
``async def main()`` is then run with ``trio.run(main)``. The demos run as processes:
``demos/minimal_app.py`` takes a line on stdin that ``p2p log`` then shows, and passes
messages between two instances; ``demos/convergence_test_example.py`` passes.
"""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from procs import Child, wait_until

from p2p.testing import provision_homes

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "embedding.md"
DEMOS = ROOT / "demos"
FENCE = re.compile(r"^```python\n(.*?)^```\s*$", re.DOTALL | re.MULTILINE)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number of the first code line, code) of each ```python block."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in FENCE.finditer(text)]


BLOCKS = python_blocks(DOC.read_text(encoding="utf-8"))


def test_the_guide_has_examples() -> None:
    assert len(BLOCKS) >= 8
    names = "\n".join(code for _, code in BLOCKS)
    for api in (
        "open_node",
        "init_account",
        "send(",
        "edit(",
        "delete(",
        "react(",
        "mark_read(",
        "subscribe(",
        "TcpTransport",
        "provision_homes",
        "approve(",
        "wait_for_primary",
        "unlink(",
        "testing.cluster",
        "MockClock",
        "partition(",
        "settle(",
        "UnknownChat",
        "NodeError",
    ):
        assert api in names, f"no example in docs/embedding.md uses {api}"


def test_fence_parser_finds_only_python_blocks() -> None:
    text = "intro\n```python\nx = 1\n```\n\n```\nnot python\n```\n```python\ny = 2\n```\n"
    assert python_blocks(text) == [(3, "x = 1\n"), (10, "y = 2\n")]


@pytest.mark.parametrize(("line", "code"), BLOCKS, ids=[f"line{line}" for line, _ in BLOCKS])
def test_guide_example_runs(
    line: int, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("P2P_HOME", str(tmp_path / "home"))
    # padded so that tracebacks point at the line in the markdown file
    compiled = compile("\n" * (line - 1) + code, str(DOC), "exec")
    namespace: dict[str, Any] = {"__name__": f"embedding_md_line_{line}"}
    exec(compiled, namespace)
    main = namespace.get("main")
    if main is not None:
        assert inspect.iscoroutinefunction(main), "a block's main() must be async"
        trio.run(main)


# ---- demos, as processes ---------------------------------------------------------------


def logged_texts(home: Path) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-m", "p2p", "--home", str(home), "log", "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return [json.loads(line)["text"] for line in done.stdout.splitlines() if line.strip()]


class App(Child):
    """``demos/minimal_app.py`` as a process: stdin to type into, its output read on a
    thread."""

    def __init__(self, home: Path, *args: str) -> None:
        super().__init__(
            [sys.executable, str(DEMOS / "minimal_app.py"), "--home", str(home), *args],
            logs=home.parent,
            stdin=True,
        )
        ready = self.wait_output("listening on")
        self.address = ready.split("listening on ", 1)[1].split()[0]

    def wait_output(self, text: str, timeout: float = 20.0) -> str:
        """The first output line containing ``text`` (seen already or arriving)."""
        return self.wait_line(lambda line: text in line, timeout)

    def quit(self) -> int:
        """Close stdin (Ctrl-D): the app leaves its node cleanly and exits."""
        self.close_stdin()
        return self.wait(timeout=20)

    def close(self) -> None:
        """Kill the app if it still runs; close its pipes."""
        self.kill()


@pytest.fixture
def apps() -> Iterator[list[App]]:
    started: list[App] = []
    yield started
    for app in started:
        app.close()


@pytest.mark.slow
def test_minimal_app_sends_what_is_typed(tmp_path: Path, apps: list[App]) -> None:
    home = tmp_path / "home"  # does not exist yet: the app creates an account
    app = App(home, "--listen", "127.0.0.1:0")
    apps.append(app)
    assert app.address.startswith("127.0.0.1:")
    app.type("hello from stdin")
    wait_until(lambda: "hello from stdin" in logged_texts(home))
    assert app.quit() == 0
    assert logged_texts(home) == ["hello from stdin"]

    again = App(home, "--listen", "127.0.0.1:0")  # reopens the same account
    apps.append(again)
    again.wait_output("hello from stdin")  # recent history is shown at start
    assert again.quit() == 0


@pytest.mark.slow
def test_two_minimal_apps_chat_over_tcp(tmp_path: Path, apps: list[App]) -> None:
    phone_home, laptop_home = tmp_path / "phone", tmp_path / "laptop"
    provision_homes([phone_home, laptop_home])
    phone = App(phone_home, "--listen", "127.0.0.1:0")
    apps.append(phone)
    laptop = App(laptop_home, "--listen", "127.0.0.1:0", "--peer", phone.address)
    apps.append(laptop)
    phone.wait_output("connected to")
    laptop.type("from the laptop")
    phone.wait_output("from the laptop")
    phone.type("from the phone")
    laptop.wait_output("from the phone")
    assert laptop.quit() == 0
    assert phone.quit() == 0
    assert logged_texts(phone_home) == logged_texts(laptop_home)


@pytest.mark.slow
def test_convergence_test_example_passes() -> None:
    done = subprocess.run(
        [sys.executable, str(DEMOS / "convergence_test_example.py")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all convergence tests passed" in done.stdout
