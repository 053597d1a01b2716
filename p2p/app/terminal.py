"""What the ``p2p`` command prints for people: text from others, made harmless.

Message text, device and contact names, captions, file names and error details can
come from other accounts, from removed devices or from a relay that has not even
authenticated. Printed raw, their control characters drive the terminal: an escape
sequence can move the cursor and overwrite lines, fake a line from someone else, change
the window title or write the clipboard (OSC 52), and a newline or a right-to-left
override can make one message look like two or read backwards.

Every human-readable line the CLI and ``p2p run`` print goes through :func:`say`
(or :func:`safe` where a library prints for us, as rich's progress bar does), so the
rule lives here once. JSON output is never passed through it: it stays exact, and JSON
escapes control characters itself.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Final, TextIO

_UNSAFE: Final = re.compile(
    "["
    "\x00-\x1f\x7f-\x9f"  # C0 (newline, tab and ESC among them), DEL, C1 (CSI, OSC)
    "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"  # bidirectional marks and overrides
    "\u2028\u2029"  # line and paragraph separators
    "\ud800-\udfff"  # lone surrogates (text decoded with surrogatepass): unprintable
    "]"
)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe(text: object) -> str:
    """``text`` as one printable line: every character that could steer a terminal,
    break the line or reorder it is shown as a visible escape (ESC as ``\\x1b``)."""
    return _UNSAFE.sub(_escape, str(text))


def say(*lines: object, file: TextIO | None = None) -> None:
    """Print each of ``lines`` as one safe line (to stdout unless ``file``).

    A caller that means several lines passes several values: a newline inside one value
    is shown escaped, never obeyed, so no value can start a line of its own.
    """
    out = sys.stdout if file is None else file
    for line in lines:
        print(safe(line), file=out, flush=True)


def multiline(text: str, indent: str = "    ") -> list[str]:
    """A message's text as lines to :func:`say`: the first as is, each later line
    indented, so a line a sender wrote can never pass for a line of the log."""
    first, *rest = text.split("\n")
    return [first, *(indent + line for line in rest)]


class SafeFormatter(logging.Formatter):
    """Log records for a terminal: details from peers and relays escaped like
    :func:`safe` (a traceback keeps its own line breaks, each line escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        return "\n".join(safe(line) for line in super().format(record).split("\n"))


def log_to_stderr(level: int = logging.WARNING) -> None:
    """Send the package's warnings to stderr through :class:`SafeFormatter` (what
    ``p2p run`` does instead of Python's raw last-resort handler)."""
    logger = logging.getLogger("p2p")
    if any(isinstance(h.formatter, SafeFormatter) for h in logger.handlers):
        return  # once per process, however many nodes it runs
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(SafeFormatter("%(message)s"))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(level)
