"""Real ``p2p`` processes for tests: start, read their JSON events, stop, SIGKILL."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

P2P = [sys.executable, "-m", "p2p"]


def p2p(
    home: Path, *args: str, check: bool = True, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run one ``p2p`` command to completion."""
    done = subprocess.run(
        [*P2P, "--home", str(home), *args], capture_output=True, text=True, timeout=timeout
    )
    if check and done.returncode != 0:
        raise AssertionError(f"p2p {' '.join(args)} exited {done.returncode}: {done.stderr}")
    return done


DELIVERY_FIELDS = ("status", "delivered_to", "read_by")
"""Fields of ``p2p log --json`` that say where a message has got to: they differ from
device to device (receipts trail the messages), unlike the history itself."""


def log(home: Path, chat: str | None = None, *, delivery: bool = False) -> list[dict[str, Any]]:
    """``p2p log --json``: the history (with ``delivery``, also each message's state)."""
    args = ["log", "--json"] + (["--chat", chat] if chat else [])
    out = p2p(home, *args).stdout
    messages = [json.loads(line) for line in out.splitlines() if line.strip()]
    if not delivery:
        for m in messages:
            for name in DELIVERY_FIELDS:
                m.pop(name, None)
    return messages


class Node:
    """A ``p2p run --json`` process; its events are read on a thread into a queue."""

    def __init__(self, home: Path, *args: str, prefix: tuple[str, ...] = ()) -> None:
        """``prefix`` runs the node under another command (``ip netns exec NS``)."""
        self.home = home
        self.args = args
        self.events: list[dict[str, Any]] = []
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.proc = subprocess.Popen(
            [*prefix, *P2P, "--home", str(home), "run", "--json", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        listening = self.wait_for("listening", timeout=20)
        self.address: str = listening["address"]
        self.device: str = listening["device"]

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self._queue.put(json.loads(line))
            except ValueError:
                continue
        self._queue.put(None)

    def wait_for(self, event: str, timeout: float = 20, **fields: Any) -> dict[str, Any]:
        """The first event named ``event`` with these fields (seen before or arriving)."""
        for seen in self.events:
            if seen.get("event") == event and all(seen.get(k) == v for k, v in fields.items()):
                return seen
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                item = self._queue.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is None:
                raise AssertionError(f"node exited ({self.proc.wait()}): {self.stderr()}")
            self.events.append(item)
            if item.get("event") == event and all(item.get(k) == v for k, v in fields.items()):
                return item
        raise AssertionError(f"no {event} {fields} within {timeout}s; saw {self.events[-5:]}")

    def drain(self, settle: float = 0.5) -> list[dict[str, Any]]:
        """Every event so far, after waiting ``settle`` seconds for stragglers."""
        deadline = time.monotonic() + settle
        while True:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return self.events
            if item is None:
                return self.events
            self.events.append(item)

    def stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return self.proc.stderr.read()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        return code

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


class Lines:
    """A long-running ``p2p`` command whose stdout lines are read on a thread."""

    def __init__(self, home: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [*P2P, "--home", str(home), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, text: str, timeout: float = 20) -> str:
        """The first line (seen or coming) that contains ``text``."""
        return self.wait_until(lambda line: text in line, repr(text), timeout)

    def wait_until(self, test: Callable[[str], bool], what: str, timeout: float = 20) -> str:
        """The first line (seen or coming) that passes ``test``."""
        for line in self.seen:
            if test(line):
                return line
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                self.lines.put(None)  # ended: every later wait fails at once
                break
            self.seen.append(line)
            if test(line):
                return line
        raise AssertionError(f"no line with {what} within {timeout}s; saw {self.seen[-8:]}")

    def interrupt(self) -> tuple[int, str]:
        """Ctrl-C: the exit code and what it printed on stderr."""
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout=20)
        assert self.proc.stderr is not None
        err = self.proc.stderr.read()
        self.close()
        return code, err

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=20)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def wait_until(predicate: Any, timeout: float = 20, interval: float = 0.1) -> None:
    """Poll ``predicate`` until true; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")
