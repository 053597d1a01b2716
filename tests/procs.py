"""The shared harness for tests that run real processes: one place for each mechanism.

- ``Child``: a process whose output lines are read on a thread into a queue; every wait
  has a deadline, and a child that exits early fails the wait with its stderr. Nothing
  here ever blocks on a pipe without a timeout.
- ``Node`` (``p2p run --json``), ``Relay`` (``p2p relay``), ``Linker`` (``p2p link``):
  the three processes the suite starts, built on ``Child``.
- ``p2p`` / ``log``: one ``p2p`` command to completion, with a timeout.
- ``wait_until`` (threads) and ``wait_for`` (trio): polling with a deadline.
- ``tcp_node``: an engine (``open_node``) in the test's own process, on TCP loopback.

Ports: a process binds port 0 and reports the port it got; a test that must restart a
process on the same address reuses the port that process reported (never one picked by
closing a probe socket).
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import trio
import trio.testing

from p2p.runtime.node import Node as Engine
from p2p.runtime.node import open_node
from p2p.transport.base import Connection, ConnectionClosed
from p2p.transport.relay import RelayClient
from p2p.transport.tcp import TcpTransport

P2P = [sys.executable, "-m", "p2p"]
_numbers = itertools.count()
_T = TypeVar("_T")


def p2p(
    home: Path, *args: str, check: bool = True, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run one ``p2p`` command to completion."""
    done = subprocess.run(
        [*P2P, "--home", str(home), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
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


def wait_until(predicate: Callable[[], object], timeout: float = 20, interval: float = 0.1) -> None:
    """Poll ``predicate`` until true; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    if predicate():
        return
    raise AssertionError(f"condition not met within {timeout}s")


async def wait_for(predicate: Callable[[], object], seconds: float = 120) -> None:
    """Poll ``predicate`` from trio until true; TooSlowError after ``seconds`` (virtual
    seconds under ``run_virtual``)."""
    with trio.fail_after(seconds):
        while not predicate():  # noqa: ASYNC110 (the predicate reads state, not an event)
            await trio.sleep(0.05)


@asynccontextmanager
async def tcp_node(home: Path, **kwargs: Any) -> AsyncIterator[Engine]:
    """``open_node(home, **kwargs)`` listening on a free loopback port."""
    async with open_node(home, transport=TcpTransport("127.0.0.1:0"), **kwargs) as node:
        yield node


def run_virtual(fn: Callable[[], Awaitable[object]]) -> None:
    """``trio.run`` on a clock that jumps ahead whenever every task sleeps: timeouts and
    backoffs of in-memory clusters take no real time."""
    trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))


def closed_by_peer(sock: socket.socket, within: float) -> bool:
    """Whether the other end closes ``sock`` within ``within`` seconds (reading and
    dropping whatever it sends meanwhile)."""
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return True


async def echo(conn: Connection) -> None:
    """A relay pipe's handler that sends back every frame until the pipe closes."""
    try:
        while True:
            await conn.send(await conn.receive())
    except ConnectionClosed:
        pass


@asynccontextmanager
async def serving(
    *clients: RelayClient,
    handler: Callable[[Connection], Awaitable[None]] = echo,
    within: float = 15,
) -> AsyncIterator[trio.Nursery]:
    """Relay clients connected to their relay (serving pipes with ``handler``) for the
    block's duration."""
    async with trio.open_nursery() as nursery:
        for client in clients:
            await nursery.start(client.serve, handler)
        with trio.fail_after(within):
            for client in clients:
                await client.wait_connected()
        yield nursery
        nursery.cancel_scope.cancel()


class Child:
    """A child process; its stdout lines are read on a thread into a queue, its stderr
    goes to a file (a full stderr pipe would block a chatty child).

    ``lines`` holds every stdout line read so far (text); ``events`` the ones that were
    JSON objects. ``wait_line`` and ``wait_for`` take a deadline and fail, with the
    child's stderr, when the child exits first."""

    def __init__(
        self,
        argv: list[str],
        *,
        logs: Path,
        stdin: bool = False,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        logs.mkdir(parents=True, exist_ok=True)
        self.stderr_path = logs / f"child-{os.getpid()}-{next(_numbers)}.stderr"
        self._stderr = self.stderr_path.open("w")
        self.lines: list[str] = []
        self.events: list[dict[str, Any]] = []
        self.partial = ""
        """Output after the last newline: a prompt, or a line the child was killed while
        writing (never counted as a line)."""
        self._pending = b""
        self._lock = threading.Lock()
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            cwd=cwd,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        """Read stdout in chunks (not lines: a prompt has no newline), split it into lines;
        what follows the last newline stays in ``partial``."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the pipe was closed under the reader by stop()
                break
            if not chunk:
                break
            with self._lock:
                self._pending += chunk
                *complete, rest = self._pending.split(b"\n")
                self._pending = rest
                self.partial = rest.decode(errors="replace")
            for raw in complete:
                self._add(raw.decode(errors="replace"))
            self._queue.put("")  # wakes waiters that look at ``partial``
        self._queue.put(None)

    def _add(self, line: str) -> None:
        event: Any = None
        if line.startswith("{"):
            try:
                event = json.loads(line)
            except ValueError:
                event = None
        with self._lock:
            self.lines.append(line)
            if isinstance(event, dict):
                self.events.append(event)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def stderr(self) -> str:
        """Everything the child wrote to stderr so far."""
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def _wait(self, found: Callable[[], _T | None], timeout: float, what: str) -> _T:
        """Wait until ``found()`` returns a value, re-asking whenever output arrives."""
        deadline = time.monotonic() + timeout
        while True:
            value = found()
            if value is not None:
                return value
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"no {what} within {timeout}s; last lines {self.lines[-5:]}; "
                    f"stderr: {self.stderr()[-4000:]}"
                )
            try:
                woken = self._queue.get(timeout=left)
            except queue.Empty:
                continue
            if woken is None:
                self._queue.put(None)  # later waits see the end too
                value = found()
                if value is not None:
                    return value
                code = self.proc.wait(timeout=10)
                raise AssertionError(
                    f"child exited ({code}) before {what}: {self.stderr()[-4000:]}"
                )

    def wait_line(self, match: Callable[[str], bool], timeout: float = 30) -> str:
        """The first complete line (seen before or arriving) for which ``match`` is true."""

        def found() -> str | None:
            with self._lock:
                lines = list(self.lines)
            return next((line for line in lines if match(line)), None)

        return self._wait(found, timeout, "matching line")

    def wait_text(self, match: Callable[[str], bool], timeout: float = 30) -> str:
        """Wait until ``match`` is true of the unfinished last line (a prompt); that line."""

        def found() -> str | None:
            with self._lock:
                partial = self.partial
            return partial if match(partial) else None

        return self._wait(found, timeout, "matching prompt")

    def wait_for(self, event: str, timeout: float = 30, **fields: Any) -> dict[str, Any]:
        """The first JSON event named ``event`` with these fields (seen before or arriving)."""
        scanned = 0

        def found() -> dict[str, Any] | None:
            nonlocal scanned
            with self._lock:
                fresh = self.events[scanned:]
            scanned += len(fresh)
            return next(
                (
                    e
                    for e in fresh
                    if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())
                ),
                None,
            )

        return self._wait(found, timeout, f"{event} {fields}")

    def count(self, event: str, **fields: Any) -> int:
        """How many JSON events named ``event`` with these fields have been read."""
        with self._lock:
            return sum(
                1
                for e in self.events
                if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())
            )

    def drain(self, settle: float = 0.5) -> list[dict[str, Any]]:
        """Every JSON event so far, after waiting ``settle`` seconds for stragglers."""
        time.sleep(settle)
        with self._lock:
            return list(self.events)

    def type(self, text: str) -> None:
        """Write one line to the child's stdin (started with ``stdin=True``)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def close_stdin(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()

    def wait(self, timeout: float = 60) -> int:
        """Wait for the child to exit by itself; its exit code."""
        code = self.proc.wait(timeout=timeout)
        self._finish()
        return code

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        """Send ``sig`` (SIGTERM: a clean shutdown); SIGKILL if it has not ended within
        ``timeout``. Its exit code."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(timeout=10)
        self._finish()
        return code

    def kill(self) -> int:
        return self.stop(signal.SIGKILL)

    def _finish(self) -> None:
        self.close_stdin()
        self._reader.join(timeout=5)
        if self.proc.stdout is not None and not self._reader.is_alive():
            self.proc.stdout.close()
        self._stderr.close()


class Node(Child):
    """A ``p2p run --json`` process, started and listening."""

    def __init__(
        self, home: Path, *args: str, prefix: tuple[str, ...] = (), timeout: float = 30
    ) -> None:
        """``prefix`` runs the node under another command (``ip netns exec NS``)."""
        self.home = home
        self.args = args
        super().__init__(
            [*prefix, *P2P, "--home", str(home), "run", "--json", *args], logs=home.parent
        )
        try:
            listening = self.wait_for("listening", timeout=timeout)
        except BaseException:
            self.kill()
            raise
        self.address: str = listening["address"]
        self.device: str = listening["device"]


class Relay:
    """``p2p relay`` on 127.0.0.1, a mailbox in ``data`` (None: the args say where, as
    ``--redis`` does); it can be stopped and started again on the address it first got
    (``start`` after ``stop``)."""

    def __init__(
        self,
        data: Path | None,
        *args: str,
        port: int = 0,
        start: bool = True,
        logs: Path | None = None,
    ) -> None:
        self.data = data
        self.args = args
        self.port = port
        self.url = ""
        self.logs = logs or (data.parent if data is not None else Path.cwd())
        self.child: Child | None = None
        self.event: dict[str, Any] = {}
        """The relay's ``listening`` line."""
        self.starts = 0
        self._children: list[Child] = []
        if start:
            self.start()

    @property
    def process(self) -> str:
        """The relay process's id within its cluster (``""`` for a single relay)."""
        return str(self.event.get("process", ""))

    def start(self, timeout: float = 30) -> Relay:
        argv = [*P2P, "relay", "--listen", f"127.0.0.1:{self.port}"]
        if self.data is not None:
            argv += ["--data", str(self.data)]
        self.starts += 1
        self.child = Child([*argv, *self.args], logs=self.logs)
        self._children.append(self.child)
        try:
            self.event = self.child.wait_for("listening", timeout=timeout)
        except BaseException:
            self.child.kill()
            raise
        self.url = self.event["address"]
        self.port = int(self.url.rsplit(":", 1)[1])
        return self

    @property
    def alive(self) -> bool:
        return self.child is not None and self.child.alive

    @property
    def proc(self) -> subprocess.Popen[str]:
        """The running process (for its pid)."""
        assert self.child is not None, "the relay was never started"
        return self.child.proc

    def log(self) -> str:
        """What every start of this relay wrote to stderr, in order."""
        return "\n".join(child.stderr() for child in self._children)

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        return self.child.stop(sig) if self.child is not None else None

    def kill(self) -> int | None:
        return self.stop(signal.SIGKILL)


class Linker(Child):
    """A ``p2p link --json`` process listening on loopback: its code, then its events."""

    def __init__(self, home: Path, name: str, *extra: str, timeout: float = 30) -> None:
        argv = [*P2P, "--home", str(home), "link", "--name", name]
        super().__init__([*argv, "--listen", "127.0.0.1:0", "--json", *extra], logs=home.parent)
        try:
            first = self.wait_line(lambda line: '"code"' in line, timeout)
        except BaseException:
            self.kill()
            raise
        shown = json.loads(first)
        with self._lock:  # the code is not an event: ``events`` are what follow it
            self.events = [e for e in self.events if "code" not in e]
        self.code: str = shown["code"]
        self.device: str = shown["device"]


class Lines(Child):
    """A long-running ``p2p`` command (``log --follow``, ``link``) read line by line;
    ``seen`` holds the lines its waits have gone through, in order."""

    def __init__(self, home: Path, *args: str) -> None:
        super().__init__([*P2P, "--home", str(home), *args], logs=home.parent)
        self._through = 0

    @property
    def seen(self) -> list[str]:
        with self._lock:
            return self.lines[: self._through]

    def wait_for(self, text: str, timeout: float = 20) -> str:  # type: ignore[override]
        """The first line (seen or coming) that contains ``text``."""
        return self.wait_until(lambda line: text in line, repr(text), timeout)

    def wait_until(self, test: Callable[[str], bool], what: str, timeout: float = 20) -> str:
        """The first line (seen or coming) that passes ``test``."""
        for line in self.seen:
            if test(line):
                return line

        def found() -> str | None:
            with self._lock:
                fresh = self.lines[self._through :]
            for line in fresh:
                self._through += 1
                if test(line):
                    return line
            return None

        try:
            return self._wait(found, timeout, f"line with {what}")
        except AssertionError:
            raise AssertionError(
                f"no line with {what} within {timeout}s; saw {self.seen[-8:]}"
            ) from None

    def interrupt(self) -> tuple[int, str]:
        """Ctrl-C: the exit code and what it printed on stderr."""
        code = self.stop(signal.SIGINT)
        return code, self.stderr()

    def close(self) -> None:
        self.kill()
