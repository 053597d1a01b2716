"""Fixtures every test module shares, and how hypothesis runs.

Hypothesis: the default profile (``ci``) draws fresh random examples on every run within
each property's fixed example budget, keeps failing examples in ``.hypothesis/`` (they
are replayed first next time) and prints how to reproduce a failure (the seed and a
blob). The ``replay`` profile (``pytest --hypothesis-profile=replay``) draws the same
derandomized examples every run: ``make test`` runs the property modules once more
under it (``-m property``), so what passed yesterday is checked again today.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase
from procs import Node, Relay

_ROOT = Path(__file__).resolve().parent.parent

settings.register_profile(
    "ci",
    derandomize=False,
    database=DirectoryBasedExampleDatabase(str(_ROOT / ".hypothesis" / "examples")),
    print_blob=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "replay",
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("ci")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every hypothesis property ``property``: the replay pass selects them."""
    for item in items:
        if getattr(getattr(item, "obj", None), "is_hypothesis_test", False):
            item.add_marker(pytest.mark.property)


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Relay]:
    """A ``p2p relay`` process on loopback, stopped after the test."""
    started = Relay(tmp_path / "relay-data")
    yield started
    started.stop()


@pytest.fixture
def relays(tmp_path: Path) -> Iterator[Callable[..., Relay]]:
    """Start relays with ``relays(*args)``; every one is killed after the test."""
    started: list[Relay] = []

    def start(*args: str, data: Path | None = None) -> Relay:
        relay = Relay(data or tmp_path / f"relay-data-{len(started)}", *args)
        started.append(relay)
        return relay

    yield start
    for relay in started:
        relay.kill()


@pytest.fixture
def nodes() -> Iterator[list[Node]]:
    """``p2p run`` processes a test started; each is stopped after it."""
    started: list[Node] = []
    yield started
    for node in started:
        node.stop()
