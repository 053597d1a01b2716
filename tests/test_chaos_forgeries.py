"""T5: forgeries. Every forged input is refused with a typed error and changes nothing.

One account (phone = primary, laptop, tablet) and a stranger's account. The victim is the
laptop. Forged inputs by kind:

- **tampered** envelopes: one bit flipped at every position of genuine envelopes, random
  byte mutations, and header fields re-labelled (space, epoch, sender, counter);
- **replayed** envelopes: genuine envelopes delivered again, also after the victim
  restarted from its store; and boxed session frames delivered twice;
- **re-ordered**: boxed session frames swapped in flight, envelope items permuted;
- **cross-space**: an envelope of one space re-labelled as another; an entry signed for
  one space written into another by a member (hidden from the view);
- **cross-account**: the stranger's envelopes, the same re-labelled with our space, the
  stranger's handshake, a stranger's device presenting our device list;
- **removed device**: after ``DeviceState.unlink(tablet)``, everything the tablet seals
  (old epoch keys, which receivers still hold, and fresh counters) and its handshake;
- **downgraded** versions: frames, envelopes, pairing codes, relay messages with another
  protocol version; a hello with ``v`` 0; an older device list (rollback).

"Applied" means any change to the victim's replicas, replay windows or device list (or,
for entries, a message shown). Counted per kind; the test asserts 100% refused, 0
applied, and that a genuine input of each door is still accepted (the control).
"""

from __future__ import annotations

import base64
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import msgpack
import pytest
from chaos import CHAOS, CHAOS_REASON, record, scale
from test_fuzz_inputs import mutate

from p2p.errors import P2PError, RemovedDevice, RollbackRefused
from p2p.proto import envelope
from p2p.proto.identity import DeviceKeys
from p2p.proto.pairing import OLD_PREFIXES, PREFIX, PairingCode
from p2p.proto.relay_protocol import decode_client, decode_server, encode_client, encode_server
from p2p.proto.session import (
    SessionState,
)
from p2p.proto.wire import decode_frame, encode_frame, pack
from p2p.state.device import NOTES, DeviceState
from p2p.storage.memory import MemoryStore
from p2p.testing.sessions import End, Pair

WALL = 1_700_000_000_000


@dataclass
class Kind:
    tried: int = 0
    rejected: int = 0
    applied: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    escaped: list[str] = field(default_factory=list)


class Ledger:
    def __init__(self) -> None:
        self.kinds: dict[str, Kind] = {}

    def kind(self, name: str) -> Kind:
        return self.kinds.setdefault(name, Kind())

    def attempt(self, name: str, fn: Callable[[], Any], fingerprint: Callable[[], Any]) -> None:
        """One forged input: ``fn`` must raise a P2PError and change no ``fingerprint``."""
        k = self.kind(name)
        before = fingerprint()
        k.tried += 1
        try:
            fn()
        except P2PError as exc:
            k.rejected += 1
            k.errors[type(exc).__name__] += 1
        except Exception as exc:
            k.escaped.append(f"{type(exc).__name__}: {exc}")
        if fingerprint() != before:
            k.applied += 1

    def outcome(self, name: str, *, rejected: bool, applied: bool, error: str) -> None:
        """A forged input judged by the caller (sessions: closed with ``error``)."""
        k = self.kind(name)
        k.tried += 1
        k.rejected += rejected
        k.applied += applied
        k.errors[error] += 1

    def check(self) -> None:
        record(
            "T5 forgeries",
            kinds={
                name: {
                    "tried": k.tried,
                    "rejected": k.rejected,
                    "applied": k.applied,
                    "errors": dict(k.errors.most_common()),
                }
                for name, k in sorted(self.kinds.items())
            },
            total_tried=sum(k.tried for k in self.kinds.values()),
            total_applied=sum(k.applied for k in self.kinds.values()),
        )
        for name, k in self.kinds.items():
            assert not k.escaped, f"{name}: untyped errors {k.escaped[:3]}"
            assert k.tried > 0, name
            assert k.rejected == k.tried, f"{name}: {k.tried - k.rejected} of {k.tried} accepted"
            assert k.applied == 0, f"{name}: {k.applied} applied"


# ---- the cast ------------------------------------------------------------------------


class World:
    def __init__(self) -> None:
        self.phone_store, self.laptop_store, self.tablet_store = (MemoryStore() for _ in range(3))
        self.phone, batch = DeviceState.create_account("phone")
        self.phone_store.write(batch)
        self.laptop, self.laptop_keys = self._enroll("laptop", self.laptop_store)
        self.older_list = self.laptop.device_list.encode()  # version 2
        self.tablet, _ = self._enroll("tablet", self.tablet_store)
        self.laptop.offer_device_list(self.phone.device_list.encode())
        self.stranger, _ = DeviceState.create_account("stranger")
        self.notes = self.phone.chat_by_name(NOTES).id
        self.acct = next(s.id for s in self.phone.spaces.values() if s.kind == "account")
        self.genuine = [self.phone_envelope(i) for i in range(6)]
        self.genuine.append(self.phone_envelope(6, space=self.acct))

    def _enroll(self, name: str, store: MemoryStore) -> tuple[DeviceState, DeviceKeys]:
        keys = DeviceKeys.generate()
        bundle, primary_batch = self.phone.enroll(keys, name)
        self.phone_store.write(primary_batch)
        state, batch = DeviceState.from_enrollment(keys, name, bundle)
        store.write(batch)
        return state, keys

    def phone_envelope(
        self, i: int, space: str | None = None, author: DeviceState | None = None
    ) -> bytes:
        author = author or self.phone
        space = space or author.chat_by_name(NOTES).id
        entry = author.new_entry(space, "msg", WALL + i, body=f"genuine {i} from {author.name}")
        update, _ = author.write_local(space, [entry])
        return author.seal(space, update)

    def fingerprint(self, state: DeviceState | None = None) -> Any:
        state = state or self.laptop
        return (
            {sid: s.replica.snapshot() for sid, s in state.spaces.items()},
            {d: w.to_record() for d, w in state.replay.items()},
            state.device_list.encode(),
        )


def _relabel(data: bytes, **changes: Any) -> bytes:
    """The envelope with header fields changed (signature and ciphertext kept)."""
    version, space, epoch, sender, counter, nonce, ct, sig = msgpack.unpackb(data)
    fields = {"version": version, "space": space, "epoch": epoch, "sender": sender}
    fields |= {"counter": counter, **changes}
    return pack([fields["version"], fields["space"], fields["epoch"], fields["sender"],
                 fields["counter"], nonce, ct, sig])  # fmt: skip


# ---- sessions ---------------------------------------------------------------------------


Rewrite = Callable[[int, int, bytes], list[bytes]]
"""(destination end, index of the frame to it, bytes) -> what is delivered instead."""


def converse(a: DeviceState, b: DeviceState, rewrite: Rewrite | None = None) -> list[End]:
    pair = Pair(a, b)
    if rewrite is not None:
        pair.rewrite = lambda dst, i, data: rewrite(0 if dst is pair.a else 1, i, data)
    pair.start().run(limit=30)
    return [pair.a, pair.b]


def _closed_with(end: End) -> str:
    errors = [c.error for c in end.closed if c.error is not None]
    return type(errors[0]).__name__ if errors else ("open" if not end.closed else "bye")


# ---- the kinds -----------------------------------------------------------------------


def forge_envelopes(w: World, ledger: Ledger, rng: random.Random, mutations: int) -> None:
    fp = w.fingerprint
    laptop = w.laptop
    # tampered: every bit position (one bit each) of two envelopes, then random mutations
    for data in w.genuine[:2]:
        for pos in range(len(data)):
            b = bytearray(data)
            b[pos] ^= 1 << rng.randrange(8)
            forged = bytes(b)
            ledger.attempt("tampered", partial(laptop.ingest, forged), fp)
    for _ in range(mutations):
        forged = mutate(rng, rng.choice(w.genuine))
        if forged in w.genuine:
            continue
        ledger.attempt("tampered", partial(laptop.ingest, forged), fp)
    for data in w.genuine:
        parsed = envelope.parse(data)
        for change in (
            {"counter": parsed.counter + 1},
            {"counter": parsed.counter + 10_000},
            {"epoch": parsed.epoch + 1},
            {"sender": w.tablet.device_id},
            {"sender": w.laptop.device_id},
        ):
            ledger.attempt("tampered", partial(laptop.ingest, _relabel(data, **change)), fp)
    # cross-space: an envelope re-labelled as the other space
    for data in w.genuine:
        parsed = envelope.parse(data)
        other = w.acct if parsed.space == w.notes else w.notes
        ledger.attempt("cross-space", partial(laptop.ingest, _relabel(data, space=other)), fp)
    # cross-account: the stranger's envelopes, as they are and re-labelled as ours
    stranger = [w.phone_envelope(i, author=w.stranger) for i in range(5)]
    for data in stranger:
        ledger.attempt("cross-account", partial(laptop.ingest, data), fp)
        for space in (w.notes, w.acct):
            ledger.attempt("cross-account", partial(laptop.ingest, _relabel(data, space=space)), fp)
    # downgraded: envelopes of another version (the version is signed: re-sealed too)
    for data in w.genuine[:3]:
        for version in (0, 2, -1):
            ledger.attempt(
                "downgraded", partial(laptop.ingest, _relabel(data, version=version)), fp
            )
    # re-ordered: the items of an envelope permuted
    for data in w.genuine[:3]:
        items = msgpack.unpackb(data)
        for _ in range(6):
            perm = items[:]
            while perm == items:
                rng.shuffle(perm)
            ledger.attempt("re-ordered", partial(laptop.ingest, pack(perm)), fp)

    # the control: genuine envelopes are accepted (out of order too: that is gossip)
    for data in reversed(w.genuine):
        batch = laptop.ingest(data).batch
        w.laptop_store.write(batch)
    # replayed: every genuine envelope again, then again after a restart from the store
    for data in w.genuine:
        for _ in range(3):
            ledger.attempt("replayed", partial(laptop.ingest, data), fp)
    restarted = DeviceState.load(w.laptop_store)
    restarted.offer_device_list(w.phone.device_list.encode())
    for data in w.genuine:
        ledger.attempt(
            "replayed",
            lambda d=data: restarted.ingest(d),
            lambda: w.fingerprint(restarted),
        )


def forge_entries(w: World, ledger: Ledger) -> None:
    """A member (the tablet) writes an entry the phone signed for the account space into
    the notes chat, and one of the stranger's entries: the view hides both."""
    phone_entry = w.phone.new_entry(w.acct, "msg", WALL, body="signed for the account space")
    stranger_notes = w.stranger.chat_by_name(NOTES).id
    stranger_entry = w.stranger.new_entry(stranger_notes, "msg", WALL, body="another account")
    for name, entry in (("cross-space", phone_entry), ("cross-account", stranger_entry)):
        update, _ = w.tablet.write_local(w.notes, [entry])
        w.laptop.ingest(w.tablet.seal(w.notes, update))  # a member may write: it applies
        shown, rejected = w.laptop.space(w.notes).replica.view(
            w.laptop.any_signing_key, w.laptop.belongs
        )
        visible = entry.id in {m.id for m in shown}
        ledger.outcome(
            name, rejected=entry.id in {r.entry_id for r in rejected}, applied=visible,
            error="hidden entry",
        )  # fmt: skip


def forge_sessions(w: World, ledger: Ledger, rng: random.Random) -> None:
    phone, laptop = w.phone, w.laptop

    def applied(before: Any, end: End) -> bool:
        return bool(end.ingested) or w.fingerprint() != before

    # tampered boxed frames, frames delivered twice, frames swapped. The two are level
    # first, so that the laptop receives hello, auth, lease, sv, sv and nothing a genuine
    # frame would apply: any change would come from the forgery. (Envelopes replayed
    # are the ingest-level cases above.)
    converse(phone, laptop)
    for name, make in (
        ("tampered", lambda i, d: [bytes([d[0] ^ 1]) + d[1:]]),
        ("replayed", lambda i, d: [d, d]),
    ):
        for index in range(2, 5):
            before = w.fingerprint()

            def rewrite(
                dst: int, i: int, d: bytes, index: int = index, make: Any = make
            ) -> list[bytes]:
                return make(i, d) if dst == 1 and i == index else [d]

            ends = converse(phone, laptop, rewrite)
            ledger.outcome(
                name, rejected=_closed_with(ends[1]) == "DecryptionFailed",
                applied=applied(before, ends[1]), error=_closed_with(ends[1]),
            )  # fmt: skip
    for index in range(2, 6):
        before = w.fingerprint()
        held: list[bytes] = []
        swapped: list[bool] = []

        def swap(
            dst: int,
            i: int,
            d: bytes,
            index: int = index,
            held: list[bytes] = held,
            swapped: list[bool] = swapped,
        ) -> list[bytes]:
            if dst != 1:
                return [d]
            if i == index:
                held.append(d)
                return []
            if i == index + 1:
                swapped.append(True)
                return [d, *held]
            return [d]

        ends = converse(phone, laptop, swap)
        if not swapped:  # no frame came after the held one: a loss, not a reordering
            continue
        ledger.outcome(
            "re-ordered", rejected=_closed_with(ends[1]) == "DecryptionFailed",
            applied=applied(before, ends[1]), error=_closed_with(ends[1]),
        )  # fmt: skip

    # downgraded: the phone's hello with another version (its ident travels boxed: a
    # change there is a tampered box, counted above)
    for index in (0,):
        for version in (0, 2):
            before = w.fingerprint()

            def downgrade(
                dst: int, i: int, d: bytes, index: int = index, v: int = version
            ) -> list[bytes]:
                if dst == 1 and i == index:
                    frame = msgpack.unpackb(d)
                    frame["v"] = v
                    return [msgpack.packb(frame, use_bin_type=True)]
                return [d]

            ends = converse(phone, laptop, downgrade)
            ledger.outcome(
                "downgraded", rejected=not ends[1].authenticated or bool(ends[1].closed),
                applied=applied(before, ends[1]), error=_closed_with(ends[1]),
            )  # fmt: skip
    # cross-account: the stranger dials; a stranger's device presents our list
    for dialer in (w.stranger, DeviceState(keys=DeviceKeys.generate(), name="rogue",
                                          device_list=phone.device_list)):  # fmt: skip
        before = w.fingerprint()
        ends = converse(dialer, laptop)
        ledger.outcome(
            "cross-account", rejected=not ends[1].authenticated,
            applied=applied(before, ends[1]), error=_closed_with(ends[1]),
        )  # fmt: skip


def forge_removed(w: World, ledger: Ledger, envelopes: int) -> None:
    tablet, laptop = w.tablet, w.laptop
    batch = w.phone.unlink(tablet.device_id)
    w.phone_store.write(batch)
    laptop.offer_device_list(w.phone.device_list.encode())
    assert tablet.device_id not in laptop.device_list.ids
    fp = w.fingerprint
    for i in range(envelopes):
        space = w.notes if i % 3 else w.acct
        data = w.phone_envelope(1000 + i, space=space, author=tablet)
        ledger.attempt("removed device", partial(laptop.ingest, data), fp)
    # its handshake, as dialer and as listener
    for a, b in ((tablet, laptop), (laptop, tablet)):
        before = w.fingerprint()
        ends = converse(a, b)
        end = ends[1] if b is laptop else ends[0]
        ledger.outcome(
            "removed device", rejected=not end.authenticated,
            applied=bool(end.ingested) or w.fingerprint() != before, error=_closed_with(end),
        )  # fmt: skip
    # the removed device's envelopes handed on by the phone (same bytes, another path)
    data = w.phone_envelope(2000, author=tablet)
    with pytest.raises(RemovedDevice):
        w.phone.ingest(data)
    ledger.attempt("removed device", lambda: laptop.ingest(data), fp)


def forge_versions(w: World, ledger: Ledger) -> None:
    """Downgrades at every other door: frames, device lists, pairing codes, relay."""
    nothing = lambda: None  # noqa: E731 (pure decoders change no state)
    for kind, fields in (
        ("ping", {"n": 1}),
        ("sv", {"s": "x", "sv": b"\x00"}),
        ("bye", {"code": "bye"}),
    ):
        good = msgpack.unpackb(encode_frame(kind, **fields))
        for v in (0, 2, 255):
            data = msgpack.packb({**good, "v": v}, use_bin_type=True)
            ledger.attempt("downgraded", lambda d=data: decode_frame(d), nothing)
    # an older device list (rollback): the laptop holds version 3
    before = w.fingerprint()
    with pytest.raises(RollbackRefused):
        w.laptop.offer_device_list(w.older_list)
    ledger.outcome("downgraded", rejected=True, applied=w.fingerprint() != before,
                   error="RollbackRefused")  # fmt: skip
    # pairing codes of the earlier format (its prefix), with a valid checksum
    keys = DeviceKeys.generate()
    code = PairingCode.create(sign_pk=keys.sign_pk, addresses=[], now_s=0, ttl_s=600)
    body = code.encode()[len(PREFIX) :]
    raw = base64.b32decode(body + "=" * (-len(body) % 8))
    for prefix in OLD_PREFIXES:
        text = prefix + base64.b32encode(raw).decode().rstrip("=")
        ledger.attempt("downgraded", lambda t=text: PairingCode.decode(t), nothing)
    # relay messages of another version
    for encode, decode, kind, fields in (
        (encode_client, decode_client, "ping", {"n": 1}),
        (encode_server, decode_server, "pong", {"n": 1}),
    ):
        good = msgpack.unpackb(encode(kind, **fields))
        for v in (0, 2):
            data = msgpack.packb({**good, "v": v}, use_bin_type=True)
            ledger.attempt("downgraded", lambda d=data, dec=decode: dec(d), nothing)
    errors = ledger.kind("downgraded").errors
    assert errors["UnsupportedVersion"] > 0


def play(seed: int, mutations: int) -> None:
    rng = random.Random(seed)
    w = World()
    ledger = Ledger()
    forge_envelopes(w, ledger, rng, mutations)
    forge_entries(w, ledger)
    forge_sessions(w, ledger, rng)
    forge_versions(w, ledger)
    forge_removed(w, ledger, envelopes=scale(30, 300))
    ledger.check()
    # the control: after all that, the laptop still syncs with the phone
    ends = converse(w.phone, w.laptop)
    assert ends[1].authenticated == [w.phone.device_id]
    assert all(c.error is None for e in ends for c in e.closed)
    assert ends[1].session.state is SessionState.OPEN


def test_forgeries_are_refused_fast() -> None:
    play(seed=1, mutations=300)


@pytest.mark.chaos
@pytest.mark.skipif(not CHAOS, reason=CHAOS_REASON)
def test_forgeries_are_refused_long() -> None:
    for seed in range(2, 7):
        play(seed=seed, mutations=5000)
