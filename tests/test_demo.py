"""``p2p demo`` tells the story and its checks hold."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_exits_zero_with_identical_digests() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "p2p", "demo", "--messages", "200", "--seed", "3"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "80"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = re.findall(r"│ (\w+)\s+│ (\w+)\s+│ (\d+)\s+│ (\w+)\s+│", done.stdout)
    assert [r[0] for r in rows] == ["phone", "laptop", "desktop", "tablet", "web"]
    linked = [r for r in rows if r[1] != "unlinked"]
    assert len({r[3] for r in linked}) == 1  # one history digest on every linked device
    assert {int(r[2]) for r in linked} == {20 + 200 + 10}
    assert int(rows[-1][2]) == 20 + 200  # the unlinked device saw nothing after it
    assert "✗" not in done.stdout
    # into a file, a sentence stays on one line (the reader's terminal wraps it)
    assert re.search(r"linked laptop \(\w+\) by pairing code; .* check code \d+-\d+", done.stdout)
    assert "history digest: a hash of the messages" in done.stdout
