"""Attachment throughput between two devices on loopback, against a plain file copy.

Both sides run as separate processes, measured side by side in the same run:

- **ours**: two ``p2p run`` processes (laptop and phone of one account, real homes,
  connected over TCP on 127.0.0.1). The laptop has sent a file (``p2p send --file``;
  encrypting it is not timed). Then the phone starts; the clock runs from its
  ``peer_connected`` event until it reports the last chunk stored (every chunk
  checked against its hash and written to SQLite), both read from its event stream.
  ``p2p open`` (decrypting it to a file) is timed on its own.
- **baseline**: one child process sends the same file over a plain TCP socket on
  loopback in 256 KiB reads; another writes it to a file and fsyncs it. The clock runs
  from the connection to the fsync.

Run: ``.venv/bin/python bench/bench_media.py [--mb 64] [--runs 3]``. It prints each
run, the medians, and ours / baseline as a ratio (higher is slower).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from procs import Node, p2p  # noqa: E402

CHUNK = 256 * 1024

RECEIVER = """
import os, socket, sys, time
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
conn, _ = listener.accept()
start = time.perf_counter()
with open(sys.argv[1], "wb") as f:
    while data := conn.recv(1 << 20):
        f.write(data)
    f.flush()
    os.fsync(f.fileno())
print(time.perf_counter() - start, flush=True)
"""

SENDER = """
import socket, sys
with socket.create_connection(("127.0.0.1", int(sys.argv[2]))) as s, open(sys.argv[1], "rb") as f:
    while data := f.read(262144):
        s.sendall(data)
"""


def baseline(path: Path, out: Path) -> float:
    """Seconds for a plain socket copy of ``path`` between two processes."""
    receiver = subprocess.Popen(
        [sys.executable, "-c", RECEIVER, str(out)], stdout=subprocess.PIPE, text=True
    )
    assert receiver.stdout is not None
    port = receiver.stdout.readline().strip()
    subprocess.run([sys.executable, "-c", SENDER, str(path), port], check=True)
    seconds = float(receiver.stdout.readline())
    receiver.wait(timeout=60)
    receiver.stdout.close()
    assert out.stat().st_size == path.stat().st_size
    return seconds


def ours(tmp: Path, path: Path) -> tuple[float, float]:
    """Seconds to fetch ``path`` between two ``p2p run`` processes, and to open it."""
    from p2p.testing import provision_homes

    phone_home, laptop_home = tmp / "phone", tmp / "laptop"
    provision_homes([phone_home, laptop_home])
    for home in (phone_home, laptop_home):
        p2p(home, "media", "--max-file", "4G", "--quota", "8G")
    message = p2p(laptop_home, "send", "--file", str(path), timeout=300).stdout.strip()
    laptop = Node(laptop_home, "--listen", "127.0.0.1:0", "--no-mdns")
    phone = Node(phone_home, "--listen", "127.0.0.1:0", "--no-mdns", "--peer", laptop.address)
    try:
        phone.wait_for("peer_connected", timeout=30)
        start = time.perf_counter()
        total = -(-path.stat().st_size // CHUNK)
        phone.wait_for("media_progress", timeout=600, done=total)
        fetched = time.perf_counter() - start
        start = time.perf_counter()
        p2p(phone_home, "open", message, "--out", str(tmp / "opened"), timeout=300)
        opened = time.perf_counter() - start
        assert (tmp / "opened").read_bytes() == path.read_bytes()
        return fetched, opened
    finally:
        phone.stop()
        laptop.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=64, help="file size in MiB")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    size = args.mb * 1024 * 1024
    rows = []
    with tempfile.TemporaryDirectory(prefix="p2p-bench-media-") as d:
        tmp = Path(d)
        path = tmp / "file.bin"
        path.write_bytes(os.urandom(size))
        for run in range(args.runs):
            base = baseline(path, tmp / f"copy-{run}")
            (tmp / f"copy-{run}").unlink()
            fetched, opened = ours(tmp / f"run-{run}", path)
            rows.append({"run": run, "baseline_s": base, "fetch_s": fetched, "open_s": opened})
            print(json.dumps(rows[-1]), flush=True)
    base = statistics.median(r["baseline_s"] for r in rows)
    fetch = statistics.median(r["fetch_s"] for r in rows)
    opened = statistics.median(r["open_s"] for r in rows)
    mib = size / 1024 / 1024
    print(f"file {mib:.0f} MiB, {args.runs} runs, medians ({socket.gethostname()}):")
    print(f"  plain socket copy : {base:7.3f} s  {mib / base:8.1f} MiB/s")
    print(f"  p2p fetch         : {fetch:7.3f} s  {mib / fetch:8.1f} MiB/s")
    print(f"  p2p open (decrypt): {opened:7.3f} s  {mib / opened:8.1f} MiB/s")
    print(f"  ratio fetch / plain copy: {fetch / base:.1f}x")


if __name__ == "__main__":
    main()
