"""T2: sync always terminates, and fast: random histories on two to five replicas.

Replicas are ``DeviceState``s of one account (companions enrolled one after another, so
they start with device lists of different versions). A history interleaves writes of
every entry kind, on random devices and spaces, with syncs of random pairs. A sync is two
sans-I/O ``Session``s wired back to back and run in *flights* (every frame in flight is
delivered, both ways at once; a round trip is two flights) until nothing is in flight.

For every sync: the handshake takes exactly one round trip; after it, the pair is level
within at most two round trips and then goes quiet (no frame keeps causing frames: the
flights are bounded, so a loop fails the test); no envelope is refused; nobody closes.
After a last pass over every pair, every replica shows the same history.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest
from chaos import CHAOS, CHAOS_REASON, record
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2p.proto.identity import DeviceKeys
from p2p.proto.model import Kind
from p2p.proto.session import (
    SessionState,
)
from p2p.state.device import NOTES, DeviceState
from p2p.testing.sessions import Pair

WALL = 1_700_000_000_000
MAX_FLIGHTS = 20
"""Far above what a sync needs (2 + 2): reaching it means the sessions loop."""

FIGURES: Counter[str] = Counter()


def account(n: int) -> list[DeviceState]:
    phone, _ = DeviceState.create_account("phone")
    states = [phone]
    for i in range(1, n):
        keys = DeviceKeys.generate()
        bundle, _ = phone.enroll(keys, f"device{i}")
        state, _ = DeviceState.from_enrollment(keys, f"device{i}", bundle)
        states.append(state)
    return states


def sync(a: DeviceState, b: DeviceState) -> tuple[int, int]:
    """Run a session between ``a`` and ``b`` until quiet; (handshake flights, flights after)."""
    pair = Pair(a, b).start()
    flights = handshake = 0
    while pair.in_flight:
        pair.flight()
        flights += 1
        if not handshake and all(end.session.state is SessionState.OPEN for end in pair.ends):
            handshake = flights
        assert flights < MAX_FLIGHTS, "the sessions never went quiet"
    for end in pair.ends:
        assert end.closed == [], end.closed
        assert end.ingest_errors == end.list_errors == end.lease_errors == []
        assert end.session.state is SessionState.OPEN
    assert pair.a.authenticated == [b.device_id]
    assert pair.b.authenticated == [a.device_id]
    return handshake, flights - handshake


def views(state: DeviceState) -> dict[str, list[tuple[str, str, bool, str]]]:
    out = {}
    for sid, space in state.spaces.items():
        shown, rejected = space.replica.view(state.any_signing_key, state.belongs)
        assert rejected == []
        out[sid] = [(m.id, m.text, m.deleted, str(sorted(m.reactions.items()))) for m in shown]
    return out


def level(a: DeviceState, b: DeviceState) -> bool:
    return views(a) == views(b)


@dataclass(frozen=True)
class Op:
    kind: str
    i: int
    j: int = 0
    arg: int = 0


def ops(n: int) -> st.SearchStrategy[list[Op]]:
    dev = st.integers(0, n - 1)
    write = st.builds(
        Op,
        kind=st.sampled_from(["msg", "msg", "msg", "edit", "del", "react", "read", "acct"]),
        i=dev,
        arg=st.integers(0, 1000),
    )
    burst = st.builds(Op, kind=st.just("burst"), i=dev, arg=st.integers(1, 60))
    pair = st.builds(Op, kind=st.just("sync"), i=dev, j=dev).filter(lambda o: o.i != o.j)
    return st.lists(st.one_of(write, write, burst, pair), max_size=40)


@st.composite
def histories(draw: st.DrawFn) -> tuple[int, list[Op], list[tuple[int, int]]]:
    n = draw(st.integers(2, 5))
    plan = draw(ops(n))
    final = draw(st.permutations([(i, j) for i in range(n) for j in range(i + 1, n)]))
    swapped = [(j, i) if draw(st.booleans()) else (i, j) for i, j in final]
    return n, plan, swapped


def apply_write(states: list[DeviceState], op: Op, clock: list[int]) -> None:
    state = states[op.i]
    notes = state.chat_by_name(NOTES).id
    clock[0] += 1 + op.arg % 7
    wall = WALL + clock[0]
    if op.kind == "acct":
        space = next(s.id for s in state.spaces.values() if s.kind == "account")
        state.write_local(space, [state.new_entry(space, "msg", wall, body=f"setting {op.arg}")])
        return
    if op.kind == "burst":
        for k in range(op.arg):
            entry = state.new_entry(notes, "msg", wall + k, body=f"burst {op.i} {k}")
            state.write_local(notes, [entry])
        return
    shown, _ = state.space(notes).replica.view(state.any_signing_key, state.belongs)
    kind: Kind = op.kind  # type: ignore[assignment]
    if kind == "msg" or not shown:
        entry = state.new_entry(notes, "msg", wall, body=f"message {op.arg} from {op.i}")
    else:
        target = shown[op.arg % len(shown)].id
        body = {"edit": f"edited {op.arg}", "react": "👍", "read": shown[-1].ts, "del": ""}[kind]
        entry = state.new_entry(notes, kind, wall, body=body, target=target)
    state.write_local(notes, [entry])


def play(n: int, plan: list[Op], final: list[tuple[int, int]]) -> None:
    states = account(n)
    clock = [0]
    syncs = 0
    for op in plan:
        if op.kind == "sync":
            handshake, after = sync(states[op.i], states[op.j])
            assert handshake == 2, f"handshake took {handshake} flights"
            assert after <= 4, f"{after} flights after the handshake"
            assert level(states[op.i], states[op.j])
            FIGURES[f"flights_after_handshake={after}"] += 1
            syncs += 1
        else:
            apply_write(states, op, clock)
    for i, j in final:  # one pass over every pair: each has met every writer since
        handshake, after = sync(states[i], states[j])
        assert handshake == 2
        assert after <= 4, f"{after} flights after the handshake"
        FIGURES[f"flights_after_handshake={after}"] += 1
        syncs += 1
    first = views(states[0])
    for other in states[1:]:
        assert views(other) == first
    FIGURES["histories"] += 1
    FIGURES[f"replicas={n}"] += 1
    FIGURES["syncs"] += syncs
    FIGURES["writes"] += sum(1 for op in plan if op.kind != "sync")


def run(examples: int) -> None:
    FIGURES.clear()

    @settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(histories())
    def check(history: tuple[int, list[Op], list[tuple[int, int]]]) -> None:
        play(*history)

    check()
    worst = max(int(k.split("=")[1]) for k in FIGURES if k.startswith("flights_after_handshake="))
    record(
        "T2 sync terminates",
        examples=examples,
        worst_flights_after_handshake=worst,
        worst_round_trips_after_handshake=(worst + 1) // 2,
        **dict(sorted(FIGURES.items())),
    )


def test_sync_terminates_within_two_round_trips_fast() -> None:
    run(40)


@pytest.mark.chaos
@pytest.mark.skipif(not CHAOS, reason=CHAOS_REASON)
def test_sync_terminates_within_two_round_trips_long() -> None:
    run(1500)
