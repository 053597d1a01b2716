"""A real ``redis-server`` for tests: loopback only, a port and a folder of its own.

No fake or in-memory Redis stands in for it: the relay cluster's tests run against the
server operators run (Debian's redis-server 7; ``make test`` installs it where missing).
AOF with ``appendfsync always`` is on by default, as docs/relay.md asks of a cluster, so
a restart keeps every acknowledged item.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

REDIS_SERVER = shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisProcess:
    """``redis-server`` on 127.0.0.1:<port>, data in ``folder``; start, stop, kill."""

    def __init__(self, folder: Path, port: int | None = None, *, aof: bool = True) -> None:
        if REDIS_SERVER is None:
            pytest.fail("redis-server is not installed (make test installs it)")
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.aof = aof
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        assert REDIS_SERVER is not None
        args = [
            REDIS_SERVER,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.folder),
            "--save", "",
            "--appendonly", "yes" if self.aof else "no",
            "--appendfsync", "always",
            "--protected-mode", "yes",
            "--daemonize", "no",
        ]  # fmt: skip
        with (self.folder / "redis.log").open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(
            f"redis-server did not start: {(self.folder / 'redis.log').read_text()}"
        )

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(timeout=20)
        self.proc = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)
