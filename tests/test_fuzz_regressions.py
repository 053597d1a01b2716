"""Replay what the coverage-guided fuzzer (tests/fuzz/) found, and run it under make chaos.

Every file under ``tests/fuzz/crashes/TARGET/`` is an input that once made a parser of
outside bytes raise something other than a typed P2PError (or blow up); each is replayed
through its target here, in every ``make test``, and must now be refused (or accepted)
cleanly. Each target's seeds (valid inputs) are replayed too, so a target that breaks
is noticed before the next fuzzing run.

``make chaos`` (and ``make fuzz``) run every target with atheris for ``$FUZZ_SECONDS``
each (``tests/fuzz/run.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from chaos import CHAOS, CHAOS_REASON
from fuzz.targets import SEEDS, TARGETS, replay

FUZZ = Path(__file__).parent / "fuzz"
CRASHES = FUZZ / "crashes"


def _found() -> list[tuple[str, Path]]:
    if not CRASHES.is_dir():
        return []
    return [
        (folder.name, path)
        for folder in sorted(CRASHES.iterdir())
        if folder.is_dir()
        for path in sorted(folder.iterdir())
        if path.is_file()
    ]


def test_every_crash_input_names_a_target() -> None:
    assert {name for name, _ in _found()} <= set(TARGETS)


@pytest.mark.parametrize(("name", "path"), _found(), ids=lambda v: getattr(v, "name", v))
def test_inputs_the_fuzzer_found_are_handled(name: str, path: Path) -> None:
    replay(name, path.read_bytes())


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_seeds_pass_through_their_target(name: str) -> None:
    for seed in SEEDS[name]():
        replay(name, seed)


@pytest.mark.chaos
@pytest.mark.skipif(not CHAOS, reason=CHAOS_REASON)
def test_fuzz_every_target() -> None:
    """atheris on every target for $FUZZ_SECONDS each (60 by default); no crash."""
    seconds = int(os.environ.get("FUZZ_SECONDS", "60"))
    done = subprocess.run(
        [sys.executable, str(FUZZ / "run.py"), "--seconds", str(seconds)],
        capture_output=True,
        text=True,
        timeout=len(TARGETS) * (seconds + 600),
    )
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr[-5000:]
