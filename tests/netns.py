"""Network namespaces a test creates for itself: N hosts joined by veth to a bridge.

Only for tests, and only inside namespaces they make: the machine's own interfaces are
never touched. Needs root (CI runs as root); elsewhere the tests skip, saying why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

NS_REASON = "issue 3: needs root for network namespaces"


class Namespaces:
    """A bridge in its own namespace and N node namespaces joined to it by veth pairs.

    Every link is created inside the namespaces (the veth's peer is born in the node's
    namespace), so the host's namespace and its interfaces are never touched. Deleting
    the namespaces removes every link.
    """

    def __init__(self, ip: str, count: int) -> None:
        self.ip = ip
        pid = os.getpid()
        self.bridge = f"p2pt{pid}br"
        self.nodes = [f"p2pt{pid}n{i}" for i in range(count)]
        self.addresses = [f"169.254.77.{i + 1}" for i in range(count)]
        self.created: list[str] = []

    def run(self, *args: str) -> None:
        done = subprocess.run(
            [self.ip, *args], capture_output=True, text=True, timeout=10, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")

    def create(self) -> None:
        for ns in [self.bridge, *self.nodes]:
            self.run("netns", "add", ns)
            self.created.append(ns)
        br = self.bridge
        self.run("-n", br, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        self.run("-n", br, "link", "set", "br0", "up")
        for i, (ns, address) in enumerate(zip(self.nodes, self.addresses, strict=True)):
            self.run(
                "-n",
                br,
                "link",
                "add",
                f"v{i}",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns,
            )
            self.run("-n", br, "link", "set", f"v{i}", "master", "br0")
            self.run("-n", br, "link", "set", f"v{i}", "up")
            self.run("-n", ns, "link", "set", "lo", "up")
            self.run("-n", ns, "addr", "add", f"{address}/16", "dev", "eth0")
            self.run("-n", ns, "link", "set", "eth0", "up")
            self.run("-n", ns, "route", "add", "224.0.0.0/4", "dev", "eth0")

    def delete(self) -> list[str]:
        errors = []
        for ns in reversed(self.created):
            try:
                self.run("netns", "del", ns)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                errors.append(str(e))
        self.created.clear()
        return errors


def make_namespaces(count: int) -> Iterator[Namespaces]:
    ip = shutil.which("ip")
    if os.geteuid() != 0 or ip is None:
        pytest.skip(f"{NS_REASON} (root: {os.geteuid() == 0}, ip: {ip})")
    spaces = Namespaces(ip, count)
    try:
        try:
            spaces.create()
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            pytest.skip(f"{NS_REASON}: {e}")
        yield spaces
    finally:
        errors = spaces.delete()
        assert not errors, errors
        listed = subprocess.run([ip, "netns", "list"], capture_output=True, text=True, check=True)
        assert not any(name in listed.stdout for name in [spaces.bridge, *spaces.nodes])
