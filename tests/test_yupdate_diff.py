"""Differential fuzzing of ``check_update`` against pycrdt (tests/ydiff.py).

Whatever ``check_update`` accepts must apply without a panic, in a fresh document and on
a small history, alone or after other accepted updates, and the result's full state must
apply in a fresh document. A few thousand inputs run in ``make test`` (a second or two);
``make chaos`` runs the search for P2P_YDIFF_SECONDS (default 300) and records how many
inputs it tried. Each panic the search found is a regression input in
tests/test_yupdate.py (``PANICS``), and the rule that refuses it is in p2p/proto/yupdate.py.

The same promise is the coverage-guided atheris target ``crdt_differential``
(tests/fuzz/targets.py); this module drives it from a grammar of update v1 instead.
"""

from __future__ import annotations

import os
import random
import time

import pytest
from chaos import CHAOS, CHAOS_REASON, record
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import ydiff

FAST_INPUTS = 3000
LONG_SECONDS = float(os.environ.get("P2P_YDIFF_SECONDS", "300"))


def search(rng: random.Random, *, inputs: int | None = None, seconds: float = 0.0) -> int:
    """Judge inputs until ``inputs`` were tried or ``seconds`` passed; fail on the first
    find with the bytes (hex) to reproduce it. Returns how many were tried."""
    deadline = time.monotonic() + seconds
    tried = 0
    while (inputs is not None and tried < inputs) or (
        inputs is None and time.monotonic() < deadline
    ):
        updates = [ydiff.draw(rng) for _ in range(rng.choice((1, 1, 2, 3)))]
        find = ydiff.judge(*updates)
        assert find is None, (find.stage, find.error, [u.hex() for u in updates])
        tried += 1
    return tried


def test_what_the_check_accepts_applies_without_a_panic() -> None:
    search(random.Random(1), inputs=FAST_INPUTS)


@settings(
    max_examples=200,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
@given(st.randoms(use_true_random=False), st.integers(1, 3))
def test_property_accepted_updates_apply_cleanly(rng: random.Random, n: int) -> None:
    find = ydiff.judge(*(ydiff.draw(rng) for _ in range(n)))
    assert find is None, find


def test_the_grammar_reaches_both_verdicts() -> None:
    """The search means something only if it feeds pycrdt: a good share of the inputs
    pass the check, and a good share are refused."""
    rng = random.Random(2)
    accepted = 0
    for _ in range(1000):
        try:
            ydiff.yupdate.check_update(ydiff.draw(rng), "s")
            accepted += 1
        except ydiff.InvalidUpdate:
            pass
    assert 150 < accepted < 850, accepted


@pytest.mark.chaos
@pytest.mark.skipif(not CHAOS, reason=CHAOS_REASON)
def test_what_the_check_accepts_applies_without_a_panic_long() -> None:
    seed = int(os.environ.get("P2P_YDIFF_SEED", "0")) or random.randrange(1, 2**31)
    start = time.monotonic()
    tried = search(random.Random(seed), seconds=LONG_SECONDS)
    record("ydiff", seed=seed, inputs=tried, seconds=round(time.monotonic() - start, 1))
