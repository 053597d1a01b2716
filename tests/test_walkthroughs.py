"""The walkthroughs in README.md and demos/*.md, run as written.

Each fenced block is a script: ``NAME$ COMMAND`` lines are typed in terminal NAME (its
own home folder, on loopback as the guide's "one machine" notes say), and the lines
after a command are what it must print. Ids, digits, ``<placeholders>`` and ``...`` in
the shown output stand for whatever the real run prints there; everything else must be
the same. A block with no command shows more of what the long-running commands
(``p2p run``, ``p2p link``) print. ``P2P2:...`` and ``P2PC2:...`` in a command are the
pairing code and contact code printed last. So the guides cannot drift from the command.

The codes' QR codes are checked against an 80x24 terminal here too, and read back by a
QR decoder from an image of the characters printed.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
from pathlib import Path

import pytest
import zxingcpp
from procs import P2P, Lines, Node, p2p

from p2p.proto.contacts import ContactCode
from p2p.proto.pairing import PairingCode

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
PROMPT = re.compile(r"^(\w+)\$\s+(.*)$")
TOKEN = re.compile(
    r"(\.\.\.|<[^>]+>|\[✓✓\]|P2PC?2:[A-Z2-7=]+|\b[a-z2-7]{16}\b|\b[0-9a-f]{20}\b|\d+)"
)
READING = {"log", "status", "devices", "chats", "contacts"}
"""Commands that only read: retried until they show what the guide shows (sync takes a
moment), at most :data:`PATIENCE` seconds."""
PATIENCE = 40.0
LONG_RUNNING = {"run", "link"}


def pattern(shown: str) -> re.Pattern[str]:
    """What a line the guide shows stands for."""
    out = []
    for token in TOKEN.split(shown.strip()):
        if token == "...":
            out.append(".*")
        elif token.startswith("<") and token.endswith(">"):
            out.append(r"\S+")
        elif token == "[✓✓]":
            out.append(r"\[(✓|✓✓|read)\]")
        elif token.startswith("P2P"):
            out.append(r"P2PC?2:[A-Z2-7=]+")
        elif re.fullmatch(r"[a-z2-7]{16}|[0-9a-f]{20}", token) and not token.isdigit():
            out.append(r"[0-9a-z]{16,20}")  # a device, account, chat or message id
        elif token.isdigit():
            out.append(r"\d+")
        else:
            out.append(re.escape(token))
    return re.compile("".join(out))


def shown_lines(lines: list[str]) -> list[re.Pattern[str]]:
    """The lines a step must print (QR codes, blank lines and a lone ``...`` are free)."""
    return [
        pattern(line.removesuffix(" y"))  # what the person typed at a [y/N] prompt
        for line in lines
        if line.strip() and line.strip() != "..." and not set(line) & set("█▀▄")
    ]


def blocks(path: Path, *, commands_only: bool) -> list[list[str]]:
    """The top-level plain fenced blocks of a guide."""
    found: list[list[str]] = []
    current: list[str] | None = None
    for line in path.read_text().splitlines():
        if line == "```" and current is None:
            current = []
        elif line == "```" and current is not None:
            if not commands_only or any(PROMPT.match(x) for x in current):
                found.append(current)
            current = None
        elif current is not None:
            current.append(line)
    return found


def in_order(patterns: list[re.Pattern[str]], lines: list[str]) -> bool:
    i = 0
    for line in lines:
        if i < len(patterns) and patterns[i].fullmatch(line.strip()):
            i += 1
    return i == len(patterns)


class Walk:
    """Terminals, their homes, and the long-running commands they started."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.background: list[tuple[str, Lines]] = []
        self.printed: list[tuple[str, str]] = []
        """(terminal, line) of everything printed so far (codes are taken from here)."""

    def home(self, terminal: str) -> Path:
        return self.tmp / terminal

    def argv(self, terminal: str, command: str) -> list[str]:
        args = shlex.split(command, comments=True)
        assert args[0] == "p2p", f"not a p2p command: {command}"
        args = args[1:]
        for i, arg in enumerate(args):
            if arg.startswith(("P2P2:", "P2PC2:")) and arg.endswith("..."):
                args[i] = self.code(terminal, arg.split(":")[0] + ":")
        # the guides' "one machine" notes: stay on loopback
        if args[0] in ("run", "link") and "--listen" not in args:
            args += ["--listen", "127.0.0.1:0"]
        if args[0] == "run" and "--no-mdns" not in args and "--mdns-interface" not in args:
            args += ["--mdns-interface", "127.0.0.1"]
        return args

    def code(self, terminal: str, prefix: str) -> str:
        """The last code with ``prefix`` another terminal printed (waiting a while for
        one that a long-running command is about to print)."""
        deadline = time.monotonic() + PATIENCE
        while True:
            printed = self.printed + [(t, x.strip()) for t, b in self.background for x in b.seen]
            for who, line in reversed(printed):
                if who != terminal and line.startswith(prefix):
                    return line
            assert time.monotonic() < deadline, f"no {prefix} code for {terminal}"
            for _, b in self.background:
                try:
                    b.wait_until(lambda x: x.startswith(prefix), prefix, timeout=0.2)
                except AssertionError:
                    continue

    def step(self, terminal: str, command: str, shown: list[str]) -> None:
        args = self.argv(terminal, command)
        patterns = shown_lines(shown)
        if args[0] in LONG_RUNNING or "--follow" in args:
            lines = Lines(self.home(terminal), *args)
            self.background.append((terminal, lines))
            for p in patterns:
                lines.wait_until(p.fullmatch, p.pattern, timeout=PATIENCE)
            self.printed += [(terminal, line.strip()) for line in lines.seen]
            return
        deadline = time.monotonic() + (PATIENCE if args[0] in READING else 0)
        while True:
            done = subprocess.run(
                [*P2P, "--home", str(self.home(terminal)), *args],
                capture_output=True,
                text=True,
                timeout=60,
                input="y\n",  # `p2p approve` asks whether the check codes match
                env={**os.environ, "COLUMNS": "80"},
            )
            out = done.stdout.splitlines()
            if done.returncode == 0 and in_order(patterns, out):
                break
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"{terminal}$ {command}\nexited {done.returncode}, printed:\n"
                    f"{done.stdout}{done.stderr}\nthe guide shows:\n" + "\n".join(shown)
                )
            time.sleep(0.5)
        self.printed += [(terminal, line.strip()) for line in out]

    def more_output(self, shown: list[str]) -> None:
        """A block without commands: what the long-running commands print meanwhile."""
        for p in shown_lines(shown):
            deadline = time.monotonic() + PATIENCE
            while not any(p.fullmatch(x.strip()) for _, b in self.background for x in b.seen):
                assert time.monotonic() < deadline, f"nothing printed {p.pattern!r}"
                for _, b in self.background:
                    try:
                        b.wait_until(p.fullmatch, p.pattern, timeout=0.2)
                    except AssertionError:
                        continue
            self.printed += [(t, x.strip()) for t, b in self.background for x in b.seen]

    def block(self, lines: list[str]) -> None:
        steps: list[tuple[str, str, list[str]]] = []
        for line in lines:
            prompt = PROMPT.match(line)
            if prompt:
                steps.append((prompt[1], prompt[2], []))
            elif steps:
                steps[-1][2].append(line)
        if not steps:
            self.more_output(lines)
        for terminal, command, shown in steps:
            self.step(terminal, command, shown)

    def close(self) -> None:
        for _, lines in self.background:
            lines.close()


def walk(tmp: Path, guide: Path, *, commands_only: bool) -> None:
    w = Walk(tmp)
    try:
        for block in blocks(guide, commands_only=commands_only):
            w.block(block)
    finally:
        w.close()


def test_lan_two_terminals_runs_as_written(tmp_path: Path) -> None:
    walk(tmp_path, ROOT / "demos" / "lan_two_terminals.md", commands_only=False)


def test_readme_walkthroughs_run_as_written(tmp_path: Path) -> None:
    walk(tmp_path, ROOT / "README.md", commands_only=True)


# ---- the codes on an 80x24 terminal --------------------------------------------------

QR_CHARS = set("█▀▄")


def qr_rows(lines: list[str]) -> list[str]:
    """The printed QR code: the run of lines drawn with block characters."""
    rows = [line for line in lines if set(line) & QR_CHARS]
    first = lines.index(rows[0])
    assert lines[first : first + len(rows)] == rows, "the QR code is cut by other lines"
    return rows


def scan(rows: list[str]) -> str:
    """Read a QR code back from the characters a terminal shows: each character is two
    modules (top, bottom), drawn light where the glyph is (a light-on-dark terminal),
    8 pixels a module, on a dark margin; then a QR decoder reads the image (no
    inversion tried: the light quiet zone must be where the code put it)."""
    top = {" ": 0, "▀": 255, "▄": 0, "█": 255}
    bottom = {" ": 0, "▀": 0, "▄": 255, "█": 255}
    width = max(len(r) for r in rows)
    modules = []
    for row in rows:
        row = row.ljust(width)
        modules.append([top[c] for c in row])
        modules.append([bottom[c] for c in row])
    scale, margin = 8, 16
    cols = width * scale + 2 * margin
    pixels = bytearray(cols * margin)
    for line in modules:
        row_px = bytes(margin) + b"".join(bytes([v]) * scale for v in line) + bytes(margin)
        pixels += row_px * scale
    pixels += bytes(cols * margin)
    height = len(pixels) // cols
    image = memoryview(bytes(pixels)).cast("B", (height, cols))
    [found] = zxingcpp.read_barcodes(image, try_invert=False)
    return str(found.text)


def check_screen(lines: list[str], code: str) -> None:
    rows = qr_rows(lines)
    assert len(rows) <= 22, f"the QR code is {len(rows)} rows"
    assert max(len(r) for r in rows) <= 80, "the QR code is wider than 80 columns"
    assert code in lines  # the text on a line of its own
    assert scan(rows) == code


def test_the_codes_fit_an_80x24_terminal_and_scan(tmp_path: Path) -> None:
    ana, laptop = tmp_path / "ana", tmp_path / "laptop"
    p2p(ana, "init", "--name", "ana-phone")
    node = Node(ana, "--listen", "127.0.0.1:0", "--no-mdns")
    link = Lines(laptop, "link", "--name", "laptop", "--listen", "127.0.0.1:0")
    try:
        # the contact code of a running node: the account key and where it listens
        shown = p2p(ana, "contact", "code").stdout.splitlines()
        code = shown[-1]
        assert code.startswith("P2PC2:")
        assert len(code) <= 114
        assert ContactCode.decode(code).addresses == (node.address,)
        check_screen(shown, code)
        assert len(shown) <= 23
        # the pairing code: what `p2p link` shows before it waits, on one screen
        link.wait_for("waiting for the primary", timeout=30)
        screen = link.seen
        code = next(line for line in screen if line.startswith("P2P2:"))
        assert len(code) <= 80
        [address] = PairingCode.decode(code).addresses
        assert address.startswith("127.0.0.1:")
        check_screen(screen, code)
        assert len(screen) <= 24
        # and it links
        done = p2p(ana, "approve", code, "--yes")
        assert "linked laptop" in done.stdout
        link.wait_for("linked: this device", timeout=30)
    finally:
        link.close()
        node.kill()
