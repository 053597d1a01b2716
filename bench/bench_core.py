"""Engine-core benchmark: local send rate, and catch-up cost after a partition.

Run with ``make bench`` (or ``python bench/bench_core.py --messages 10000``). Every
figure is printed next to a baseline measured in the same run, as a ratio: these
machines are noisy, ratios hold where absolute times do not.

1. Sends: ``Node.send`` x N into a real SQLite store (durable before it returns), against
   the floor of the same work done by hand: one pycrdt Map set + one committed SQLite
   insert per message.
2. Receiving: the cost per message of opening, checking, applying and storing what a
   peer sends, against the floor of applying the same updates to a bare pycrdt document
   and storing each (``bench_ingest``).
3. Catch-up: two devices, A with N new messages, B with N/5, reconnect through the sans-I/O
   sessions. Bytes on the wire after the handshake against the raw pycrdt diffs
   (``get_update(state_vector)`` both ways), and round trips after the handshake.
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import string
import tempfile
import time
from pathlib import Path

import pycrdt
import trio

import p2p
from p2p.proto.identity import DeviceKeys
from p2p.proto.session import SessionState
from p2p.state.device import NOTES, DeviceState
from p2p.storage.sqlite import SqliteStore
from p2p.testing.sessions import Pair


def text(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_letters + " ", k=120))


def bench_sends(n: int, rng: random.Random) -> dict[str, float]:
    bodies = [text(rng) for _ in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "phone"
        p2p.init_account(home, "phone")

        async def run() -> float:
            async with p2p.open_node(home) as node:
                start = time.perf_counter()
                for body in bodies:
                    await node.send(body)
                return time.perf_counter() - start

        ours = trio.run(run)

        # the floor: same CRDT write and one durable SQLite commit per message
        db = sqlite3.connect(Path(tmp) / "floor.db", isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE u (seq INTEGER PRIMARY KEY, data BLOB)")
        doc: pycrdt.Doc = pycrdt.Doc()
        messages = doc.get("m", type=pycrdt.Map)
        start = time.perf_counter()
        for i, body in enumerate(bodies):
            before = doc.get_state()
            messages[str(i)] = {"b": body}
            db.execute("INSERT INTO u (data) VALUES (?)", (doc.get_update(before),))
        floor = time.perf_counter() - start
        db.close()
    print(
        f"sends       {n:>7} messages  ours {n / ours:>9,.0f} msg/s   "
        f"floor (pycrdt + sqlite, unsigned) {n / floor:>9,.0f} msg/s   "
        f"ratio {ours / floor:.2f}x time"
    )
    return {"messages": n, "ours_rate": n / ours, "floor_rate": n / floor, "ratio": ours / floor}


def pair() -> tuple[DeviceState, DeviceState]:
    phone, _ = DeviceState.create_account("phone")
    keys = DeviceKeys.generate()
    bundle, _ = phone.enroll(keys, "laptop")
    laptop, _ = DeviceState.from_enrollment(keys, "laptop", bundle)
    return phone, laptop


def write(state: DeviceState, n: int, rng: random.Random) -> None:
    chat = state.chat_by_name(NOTES).id
    for start in range(0, n, 1000):
        entries = [
            state.new_entry(chat, "msg", 1_767_225_600_000 + i, body=text(rng))
            for i in range(start, min(n, start + 1000))
        ]
        state.write_local(chat, entries)


def bench_catchup(n: int, rng: random.Random) -> dict[str, float]:
    a, b = pair()
    write(a, n, rng)
    write(b, n // 5, rng)
    chat = a.chat_by_name(NOTES).id
    raw = len(a.diff(chat, b.state_vector(chat))) + len(b.diff(chat, a.state_vector(chat)))

    link = Pair(a, b).start()
    open_at_round = None
    rounds = 0
    wire_after = 0
    start = time.perf_counter()
    while link.in_flight:
        rounds += 1
        if open_at_round is not None:
            wire_after += sum(len(data) for _, data in link.in_flight)
        link.flight()
        if open_at_round is None and all(e.session.state is SessionState.OPEN for e in link.ends):
            open_at_round = rounds
    took = time.perf_counter() - start
    assert open_at_round is not None
    level = a.space(chat).replica.count() == b.space(chat).replica.count() == n + n // 5
    assert level, "the replicas did not level: the figures below would describe a cut catch-up"
    # each "round" is one one-way hop; a round trip is two hops
    trips = (rounds - open_at_round) / 2
    print(
        f"catch-up    {n:>7} vs {n // 5:<6} wire {wire_after:>10,} B   raw diff {raw:>10,} B   "
        f"ratio {wire_after / raw:.3f}x   round trips after handshake {trips:.1f}   "
        f"level={level}   {took * 1000:.0f} ms"
    )
    return {
        "a_new": n,
        "b_new": n // 5,
        "wire_bytes": wire_after,
        "raw_diff_bytes": raw,
        "ratio": wire_after / raw,
        "round_trips": trips,
        "level": level,
        "seconds": took,
    }


def bench_ingest(n: int, rng: random.Random, *, rounds_of: int = 64) -> dict[str, float]:
    """What receiving costs per message: B opens every sealed envelope A sent (rounds of
    ``rounds_of`` messages, one writer round each, as a node's concurrent sends make
    them), applies it and writes its batch to a real SQLite store (synchronous=FULL).

    The floor, measured right after: the same plaintext updates applied to a bare pycrdt
    document and each appended with one committed insert, which any CRDT node that
    keeps its history does. CPU time of this process (the store's fsync waits are not
    CPU)."""
    a, b = pair()
    chat = a.chat_by_name(NOTES).id
    envelopes, updates = [], []
    for start in range(0, n, rounds_of):
        entries = [
            a.new_entry(chat, "msg", 1_767_225_600_000 + i, body=text(rng))
            for i in range(start, min(n, start + rounds_of))
        ]
        update, _ = a.write_local(chat, entries)
        updates.append(update)
        envelopes.append(a.seal(chat, update))
    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteStore(Path(tmp) / "b.db")
        b.space(chat).replica.load()
        cpu = time.process_time()
        for envelope in envelopes:
            store.write(b.ingest(envelope).batch)
        ours = time.process_time() - cpu
        store.close()

        db = sqlite3.connect(Path(tmp) / "floor.db", isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE u (seq INTEGER PRIMARY KEY, data BLOB)")
        doc: pycrdt.Doc = pycrdt.Doc()
        cpu = time.process_time()
        for update in updates:
            doc.apply_update(update)
            db.execute("BEGIN")
            db.execute("INSERT INTO u (data) VALUES (?)", (update,))
            db.execute("COMMIT")
        floor = time.process_time() - cpu
        db.close()
    shown = b.space(chat).replica.count()
    assert shown == n, f"B holds {shown} of {n}"
    print(
        f"ingest      {n:>7} msgs in envelopes of {rounds_of}: ours {ours / n * 1e6:6.1f} us/msg"
        f"   floor (pycrdt apply + one insert per update) {floor / n * 1e6:6.1f} us/msg"
        f"   ratio {ours / floor:.2f}x"
    )
    return {"ours_us": ours / n * 1e6, "floor_us": floor / n * 1e6, "ratio": ours / floor}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    print(f"p2p core benchmark  ({os.cpu_count()} cpus)")
    bench_sends(args.messages, rng)
    bench_ingest(args.messages, rng)
    bench_catchup(args.messages, rng)


if __name__ == "__main__":
    main()
