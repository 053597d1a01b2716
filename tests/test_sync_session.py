"""The sans-I/O sync session, tested as h2 tests its stacks: two sessions talking.

A :class:`Link` shuttles every ``Send`` of one session into the other's ``receive``, in
*flights*: all frames in flight (both directions) are delivered together, and whatever
they cause is the next flight. A round trip is two flights. ``EnvelopeIn`` goes to
``DeviceState.ingest``, ``DeviceListIn`` to ``DeviceState.follow`` and ``GrantIn`` to
``DeviceState.accept_grant``, as the node does. No sockets, no clock: ``now`` is passed in.
"""

from __future__ import annotations

import msgpack
import pytest

from p2p.errors import (
    DecryptionFailed,
    DeviceListError,
    HandshakeFailed,
    MalformedFrame,
    NotOurAccount,
    P2PError,
    ProtocolError,
    RemovedDevice,
    ReplayDetected,
    RollbackRefused,
    UnknownDevice,
)
from p2p.proto.identity import DeviceKeys
from p2p.proto.model import Message
from p2p.proto.session import (
    HANDSHAKE_TIMEOUT,
    IDLE_TIMEOUT,
    PING_INTERVAL,
    Authenticated,
    Closed,
    DeviceListIn,
    HaveIn,
    Send,
    Session,
    SessionState,
    WantIn,
    digest,
)
from p2p.proto.wire import decode_frame, encode_frame
from p2p.state.device import NOTES, DeviceState
from p2p.testing.sessions import End, Pair

WALL = 1_700_000_000_000


# ---- accounts ---------------------------------------------------------------------


def new_account(*companions: str) -> tuple[DeviceState, list[DeviceState]]:
    """A primary ("phone") and companions enrolled in order (each keeps the list it got)."""
    phone, _ = DeviceState.create_account("phone")
    states = []
    for name in companions:
        keys = DeviceKeys.generate()
        bundle, _ = phone.enroll(keys, name)
        state, _ = DeviceState.from_enrollment(keys, name, bundle)
        assert state.keys is keys
        states.append(state)
    return phone, states


def notes(state: DeviceState) -> str:
    return state.chat_by_name(NOTES).id


def account_space(state: DeviceState) -> str:
    return next(s.id for s in state.spaces.values() if s.kind == "account")


def write(state: DeviceState, space: str, n: int, prefix: str, start: int = 0) -> None:
    for i in range(start, start + n):
        entry = state.new_entry(space, "msg", WALL + i, body=f"{prefix} {i}")
        state.write_local(space, [entry])


def view(state: DeviceState, space: str) -> list[Message]:
    messages, rejected = state.space(space).replica.view(state.any_signing_key, state.belongs)
    assert rejected == []
    return messages


def snapshots(state: DeviceState) -> dict[str, bytes]:
    return {sid: s.replica.snapshot() for sid, s in state.spaces.items()}


def decode_state_vector(data: bytes) -> dict[int, int]:
    """client -> clock (pycrdt encodes the pairs in hash-map order: compare decoded)."""
    pos = 0

    def varint() -> int:
        nonlocal pos
        value = shift = 0
        while True:
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    pairs = [(varint(), varint()) for _ in range(varint())]
    assert pos == len(data)
    return dict(pairs)


def state_vectors(state: DeviceState) -> dict[str, dict[int, int]]:
    return {sid: decode_state_vector(s.replica.state_vector()) for sid, s in state.spaces.items()}


# ---- the link ---------------------------------------------------------------------


def assert_refused(
    link: Pair, unchanged: dict[str, dict[str, bytes]], *, may_authenticate: str = ""
) -> None:
    """Neither side applied anything; both closed; neither authenticated the other
    (except ``may_authenticate``: the side whose peer's auth arrived intact, before
    the peer refused it)."""
    for peer in (link.a, link.b):
        if peer.name != may_authenticate:
            assert peer.authenticated == []
        assert peer.envelopes_in == []
        assert peer.ingested == []
        assert peer.closed, f"{peer.name} did not close"
        assert peer.session.state is SessionState.CLOSED
        assert snapshots(peer.state) == unchanged[peer.name]


def before(link: Pair) -> dict[str, dict[str, bytes]]:
    return {"a": snapshots(link.a.state), "b": snapshots(link.b.state)}


# ---- convergence ------------------------------------------------------------------


def test_divergent_replicas_level_in_one_round_trip() -> None:
    phone, [laptop] = new_account("laptop")
    chat, acct = notes(phone), account_space(phone)
    write(phone, chat, 30, "phone")
    write(laptop, chat, 20, "laptop", start=1000)
    write(phone, acct, 5, "phone-settings")
    assert view(phone, chat) != view(laptop, chat)

    link = Pair(phone, laptop).connect()
    sync_flights = []
    while link.in_flight:
        sync_flights.append(link.flight())
    # one round trip after the handshake: a flight of state vectors (one per shared space,
    # each way, plus the phone's lease renewal for the laptop), then a flight of the
    # missing updates (phone: 2 spaces, laptop: 1), done.
    assert sync_flights == [2 + 2 + 1, 2 + 1]
    assert link.a.session.stats.sv_in == link.b.session.stats.sv_in == 2
    assert link.a.session.stats.envelopes_in == 1
    assert link.b.session.stats.envelopes_in == 2
    assert link.a.ingest_errors == link.b.ingest_errors == []

    for space in (chat, acct):
        assert view(phone, space) == view(laptop, space)
    assert len(view(phone, chat)) == 50
    assert len(view(phone, acct)) == 5
    assert state_vectors(phone) == state_vectors(laptop)
    assert {m.text for m in view(laptop, chat)} >= {"phone 0", "laptop 1019"}
    assert not link.a.closed
    assert not link.b.closed


def test_level_replicas_exchange_only_state_vectors() -> None:
    phone, [laptop] = new_account("laptop")
    link = Pair(phone, laptop).connect()
    assert link.run() == 1  # state vectors, no reply
    assert link.a.envelopes_in == link.b.envelopes_in == []
    assert link.a.session.stats.catchup_bytes_out == 0


def test_level_replicas_with_overwritten_keys_send_no_envelope() -> None:
    """Read markers are overwritten in place (map key = device), so the document has a
    delete set; a level peer still lacks nothing and should get no envelope."""
    phone, _ = new_account()
    chat = notes(phone)
    for i in range(3):
        phone.write_local(chat, [phone.new_entry(chat, "read", WALL + i)])
    keys = DeviceKeys.generate()
    bundle, _ = phone.enroll(keys, "laptop")
    laptop, _ = DeviceState.from_enrollment(keys, "laptop", bundle)
    assert state_vectors(phone) == state_vectors(laptop)

    link = Pair(phone, laptop).connect()
    link.run()
    assert (len(link.a.envelopes_in), len(link.b.envelopes_in)) == (0, 0), (
        "level replicas exchanged envelopes: every reconnection seals, sends, ingests and "
        "stores a delete-set-only update"
    )


def test_gossip_after_open() -> None:
    """A live update sent with send_envelope reaches the peer and applies."""
    phone, [laptop] = new_account("laptop")
    link = Pair(phone, laptop).connect()
    link.run()
    chat = notes(phone)
    update, _ = phone.write_local(chat, [phone.new_entry(chat, "msg", WALL, body="live")])
    link.a.carry_out(link.a.session.send_envelope(phone.seal(chat, update)))
    assert link.run() == 1
    assert [m.text for m in view(laptop, chat)] == ["live"]
    # not open: nothing to send
    idle = Session(local=phone, initiator=True, now=0.0)
    assert idle.send_envelope(phone.seal(chat, update)) == []


def test_catchup_bytes_close_to_raw_diff() -> None:
    phone, [laptop] = new_account("laptop")
    chat = notes(phone)
    write(phone, chat, 2000, "a message of a typical length, neither short nor long")
    raw = sum(
        len(d)
        for sid in phone.spaces
        if (d := phone.diff(sid, laptop.state_vector(sid))) != b"\x00\x00"
    )
    link = Pair(phone, laptop).connect()
    link.run()
    sent = link.a.session.stats.catchup_bytes_out
    assert raw > 100_000
    assert raw < sent <= 1.05 * raw, (sent, raw)
    assert link.b.session.stats.catchup_bytes_out == 0
    assert view(phone, chat) == view(laptop, chat)
    assert len(view(laptop, chat)) == 2000


def test_three_devices_converge_through_the_phone() -> None:
    phone, [laptop, tablet] = new_account("laptop", "tablet")
    chat = notes(phone)
    write(laptop, chat, 7, "laptop")
    write(tablet, chat, 9, "tablet", start=100)
    Pair(phone, laptop).connect().run()
    Pair(phone, tablet).connect().run()
    Pair(phone, laptop).connect().run()
    assert view(phone, chat) == view(laptop, chat) == view(tablet, chat)
    assert len(view(laptop, chat)) == 16


# ---- handshake refusals -----------------------------------------------------------


def test_device_of_another_account_refused() -> None:
    phone, [laptop] = new_account("laptop")
    other_phone, _ = new_account()
    write(other_phone, notes(other_phone), 3, "intruder")
    for ours in (phone, laptop):
        link = Pair(other_phone, ours)
        unchanged = before(link)
        link.start()
        link.run()
        assert_refused(link, unchanged)
        # neither learns who the other is: each refuses the other's hello
        assert isinstance(link.b.error, NotOurAccount)
        assert isinstance(link.a.error, NotOurAccount)
        assert link.a.lists_in == link.b.lists_in == []


def test_never_enrolled_device_presenting_our_list_refused() -> None:
    phone, _ = new_account()
    write(phone, notes(phone), 3, "phone")
    rogue = DeviceState(keys=DeviceKeys.generate(), name="rogue", device_list=phone.device_list)
    rogue.spaces.update(phone.spaces)  # as if the account's keys had leaked to it
    link = Pair(rogue, phone)
    unchanged = before(link)
    link.start()
    link.run()
    assert_refused(link, unchanged, may_authenticate="a")
    assert type(link.b.error) is UnknownDevice
    assert link.b.error.device == rogue.device_id
    assert isinstance(link.a.error, HandshakeFailed)  # the phone's reject reached it


def test_device_claiming_a_members_id_without_its_key_refused() -> None:
    phone, [laptop] = new_account("laptop")
    keys = DeviceKeys.generate()
    object.__setattr__(keys, "device_id", laptop.device_id)  # claims the laptop's id
    rogue = DeviceState(keys=keys, name="rogue", device_list=phone.device_list)
    rogue.spaces.update(phone.spaces)  # even with the account's keys
    link = Pair(rogue, phone)
    unchanged = before(link)
    link.start()
    link.run()
    assert_refused(link, unchanged, may_authenticate="a")
    assert isinstance(link.b.error, HandshakeFailed)


def test_removed_device_refused() -> None:
    phone, [laptop] = new_account("laptop")
    write(laptop, notes(laptop), 4, "after removal")
    assert phone.account_key is not None
    phone.device_list = phone.device_list.without_device(phone.account_key, laptop.device_id)
    old_version = laptop.device_list.version
    link = Pair(laptop, phone)
    unchanged = before(link)
    link.start()
    link.run()
    assert type(link.b.error) is RemovedDevice
    assert link.b.error.device == laptop.device_id
    # the removed device learned the new list from the phone's ident, and was refused
    assert link.a.lists_in == [phone.device_list.encode()]
    assert laptop.device_list.version == old_version + 1
    unchanged["a"] = snapshots(laptop)
    assert_refused(link, unchanged, may_authenticate="a")


def test_removed_device_refused_by_another_companion() -> None:
    phone, [laptop, tablet] = new_account("laptop", "tablet")
    assert phone.account_key is not None
    phone.device_list = phone.device_list.without_device(phone.account_key, laptop.device_id)
    assert tablet.offer_device_list(phone.device_list.encode()) is not None
    link = Pair(laptop, tablet)
    unchanged = before(link)
    link.start()
    link.run()
    assert type(link.b.error) is RemovedDevice
    unchanged["a"] = snapshots(laptop)
    assert_refused(link, unchanged, may_authenticate="a")
    # and what it seals afterwards is refused by everyone
    sealed = laptop.seal(
        notes(laptop),
        laptop.write_local(
            notes(laptop), [laptop.new_entry(notes(laptop), "msg", WALL, body="late")]
        )[0],
    )
    for state in (phone, tablet):
        snap = snapshots(state)
        with pytest.raises(RemovedDevice):
            state.ingest(sealed)
        assert snapshots(state) == snap


def _flip(data: bytes, pos: int) -> bytes:
    b = bytearray(data)
    b[pos] ^= 1 << (pos % 8)
    return bytes(b)


@pytest.mark.parametrize("index", [0, 1], ids=["hello", "auth"])
@pytest.mark.parametrize("to", ["a", "b"])
def test_tampered_handshake_frame_refused(index: int, to: str) -> None:
    """Flip one bit at every position of a hello or an auth frame: the handshake fails
    with a typed error, nobody authenticates, nothing is applied."""
    phone, [laptop] = new_account("laptop")
    write(phone, notes(phone), 2, "phone")
    write(laptop, notes(laptop), 2, "laptop", start=10)
    probe = Pair(phone, laptop).connect()
    length = len(getattr(probe, to).received[index])
    errors: set[str] = set()
    for pos in range(length):
        link = Pair(phone, laptop)
        target = getattr(link, to)

        def tamper(dst: End, i: int, data: bytes, pos: int = pos, target: End = target) -> bytes:
            return _flip(data, pos) if dst is target and i == index else data

        link.rewrite = tamper
        unchanged = before(link)
        link.start()
        link.run()
        other = link.other(target).name
        assert_refused(link, unchanged, may_authenticate=other if index == 1 else "")
        assert target.authenticated == []
        error = target.error
        assert isinstance(error, P2PError), f"byte {pos}: {error!r}"
        errors.add(type(error).__name__)
    assert errors  # e.g. MalformedFrame, DeviceListError, UnknownDevice, HandshakeFailed


def test_short_ephemeral_key_refused() -> None:
    """The schema bounds ``eph`` at 32 bytes but does not require 32; a shorter key must
    be refused before it reaches X25519 (pynacl's crypto_scalarmult does not check the
    length, so libsodium would read past the end of the buffer)."""
    phone, [laptop] = new_account("laptop")
    link = Pair(laptop, phone)

    def shorten(dst: End, index: int, data: bytes) -> bytes:
        if dst is link.b and index == 0:
            frame = decode_frame(data)
            del frame["v"], frame["t"]
            frame["eph"] = frame["eph"][:31]
            return encode_frame("hello", **frame)
        return data

    link.rewrite = shorten
    link.start()
    link.flight()
    assert link.b.session.state is SessionState.CLOSED, "a 31-byte ephemeral key was used"
    assert isinstance(link.b.error, HandshakeFailed | ProtocolError | DeviceListError)


@pytest.mark.parametrize("which", ["sv", "env"])
def test_tampered_boxed_frame_is_decryption_failed(which: str) -> None:
    def accounts() -> tuple[DeviceState, DeviceState]:
        phone, [laptop] = new_account("laptop")
        write(phone, notes(phone), 5, "phone")
        return phone, laptop

    # frames the laptop receives: hello, auth, lease, sv (account), sv (notes), env (notes)
    index = 3 if which == "sv" else 5
    probe = Pair(*accounts()).connect()
    probe.run()
    assert len(probe.b.received) == 6
    assert len(probe.b.envelopes_in) == 1
    length = len(probe.b.received[index])
    for pos in range(0, length, max(1, length // 40)):
        phone, laptop = accounts()
        link = Pair(phone, laptop)

        def tamper(dst: End, i: int, data: bytes, pos: int = pos, to: End = link.b) -> bytes:
            # frame sizes vary a little with the (random) space ids: wrap around
            return _flip(data, pos % len(data)) if dst is to and i == index else data

        link.rewrite = tamper
        unchanged = snapshots(laptop)
        link.connect()
        link.run()
        assert type(link.b.error) is DecryptionFailed, pos
        assert link.b.envelopes_in == []
        assert snapshots(laptop) == unchanged


def test_replayed_boxed_frame_is_decryption_failed() -> None:
    phone, [laptop] = new_account("laptop")
    write(phone, notes(phone), 5, "phone")
    link = Pair(phone, laptop).connect()
    link.run()
    assert len(link.b.envelopes_in) == 1
    env_frame = link.b.received[-1]
    synced = snapshots(laptop)
    link.deliver(link.b, env_frame)
    assert type(link.b.error) is DecryptionFailed
    assert len(link.b.envelopes_in) == 1
    assert snapshots(laptop) == synced


def test_reordered_boxed_frames_are_decryption_failed() -> None:
    phone, [laptop] = new_account("laptop")
    link = Pair(phone, laptop).connect()
    # swap two boxed frames in flight to the laptop (the lease and the first state vector)
    to_b = [(d, x) for d, x in link.in_flight if d is link.b]
    assert len(to_b) == 3
    link.in_flight = [to_b[1], to_b[0], to_b[2]]
    link.flight()
    assert type(link.b.error) is DecryptionFailed


def test_replayed_envelope_is_refused_and_applies_nothing() -> None:
    phone, [laptop] = new_account("laptop")
    write(phone, notes(phone), 5, "phone")
    link = Pair(phone, laptop).connect()
    link.run()
    [envelope_data] = link.b.envelopes_in
    [ingested] = link.b.ingested
    snap, window = snapshots(laptop), laptop.replay[phone.device_id].to_record()
    with pytest.raises(ReplayDetected) as info:
        laptop.ingest(envelope_data)
    assert info.value.sender == phone.device_id
    assert info.value.counter == ingested.counter
    assert snapshots(laptop) == snap
    assert laptop.replay[phone.device_id].to_record() == window


def test_lower_device_list_version_refused() -> None:
    phone, [laptop, tablet] = new_account("laptop", "tablet")
    v2 = laptop.device_list.encode()
    assert phone.device_list.version == 3
    with pytest.raises(RollbackRefused) as info:
        phone.offer_device_list(v2)
    assert (info.value.offered, info.value.current) == (2, 3)
    assert phone.device_list.version == 3
    assert tablet.offer_device_list(phone.device_list.encode()) is None  # the same list
    batch = laptop.offer_device_list(phone.device_list.encode())
    assert batch is not None
    assert laptop.device_list.version == 3
    with pytest.raises(DeviceListError):
        laptop.offer_device_list(b"\x93garbage")


# ---- time -------------------------------------------------------------------------


def test_handshake_timeout() -> None:
    phone, [_laptop] = new_account("laptop")
    session = Session(local=phone, initiator=True, now=0.0)
    session.start()
    assert session.tick(HANDSHAKE_TIMEOUT / 2) == []
    assert session.next_deadline() == HANDSHAKE_TIMEOUT
    out = session.tick(HANDSHAKE_TIMEOUT + 0.5)
    assert isinstance(out[-1], Closed)
    assert isinstance(out[-1].error, HandshakeFailed)
    assert decode_frame(out[0].data)["t"] == "reject"  # type: ignore[union-attr]
    assert session.tick(100.0) == []
    assert session.receive(b"anything", 101.0) == []


def test_handshake_timeout_while_waiting_for_auth() -> None:
    phone, [laptop] = new_account("laptop")
    link = Pair(phone, laptop)
    link.drop_to = {"a"}  # the phone never hears back
    link.start()
    link.run()
    assert link.b.session.state is SessionState.AUTH
    link.tick(HANDSHAKE_TIMEOUT + 1)
    assert isinstance(link.b.error, HandshakeFailed)
    assert isinstance(link.a.error, HandshakeFailed)


def test_idle_timeout() -> None:
    phone, [laptop] = new_account("laptop")
    link = Pair(phone, laptop).connect()
    link.run()
    link.drop_to = {"a"}  # the laptop's pongs and pings are lost
    for t in range(5, 200, 5):
        link.tick(float(t))
        link.run(now=float(t))
        if link.a.closed:
            break
    assert isinstance(link.a.error, ProtocolError)
    assert t == IDLE_TIMEOUT  # the first tick that reaches the timeout
    assert link.b.closed == [Closed(None)]  # the phone's bye reached the laptop


def test_ping_pong_keeps_the_session_alive() -> None:
    phone, [laptop] = new_account("laptop")
    link = Pair(phone, laptop).connect()
    link.run()
    frames_before = link.a.session.stats.frames_in
    for t in range(1, 400):
        link.tick(float(t))
        link.run(now=float(t))
    assert not link.a.closed
    assert not link.b.closed
    assert link.a.session.state is link.b.session.state is SessionState.OPEN
    # a ping from each side every PING_INTERVAL, each answered with a pong
    assert link.a.session.stats.frames_in - frames_before >= 2 * (400 // PING_INTERVAL - 1)
    deadline = link.a.session.next_deadline()
    assert 399 < deadline <= 399 + PING_INTERVAL


# ---- device lists -----------------------------------------------------------------


def test_newer_device_list_from_peer_is_device_list_in() -> None:
    _phone, [laptop, tablet] = new_account("laptop", "tablet")
    assert laptop.device_list.version == 2
    assert tablet.device_list.version == 3
    write(tablet, notes(tablet), 3, "tablet")
    link = Pair(laptop, tablet).connect()
    link.run()
    assert link.a.lists_in == [tablet.device_list.encode()]
    assert link.b.lists_in == []
    assert laptop.device_list.version == 3
    assert view(laptop, notes(laptop)) == view(tablet, notes(tablet))
    assert len(view(laptop, notes(laptop))) == 3


def test_device_list_in_is_emitted_even_if_the_caller_ignores_it() -> None:
    _, [laptop, tablet] = new_account("laptop", "tablet")
    a = Session(local=laptop, initiator=True, now=0.0)
    b = Session(local=tablet, initiator=False, now=0.0)
    [hello_a] = a.start()
    [hello_b] = b.start()
    assert isinstance(hello_a, Send)
    assert isinstance(hello_b, Send)
    [ident_a] = a.receive(hello_b.data, 0.0)
    [ident_b] = b.receive(hello_a.data, 0.0)
    assert isinstance(ident_a, Send)
    assert isinstance(ident_b, Send)
    out = a.receive(ident_b.data, 0.0)
    assert out[0] == DeviceListIn(tablet.device_list.encode())
    assert Authenticated(tablet.device_id) in out


def test_tick_at_the_deadline_always_makes_progress() -> None:
    """A driver sleeping until next_deadline() and calling tick() never spins in place,
    even when the clock lands exactly on the deadline (float sums included)."""
    phone, _ = DeviceState.create_account("phone")
    for start in (0.0, 0.1, 0.3, 1e6 + 0.7):
        session = Session(local=phone, initiator=True, now=start)
        session.start()
        deadline = session.next_deadline()
        session.tick(deadline)
        assert session.state is SessionState.CLOSED


# ---- lazy gossip: have / want -------------------------------------------------------


def test_have_and_want_carry_digests_and_the_envelope_follows() -> None:
    """The sans-I/O half of lazy gossip: a have names envelopes, a want asks for them,
    and the envelope sent in answer applies as any other."""
    phone, (laptop,) = new_account("laptop")
    link = Pair(phone, laptop).connect()
    link.run()
    chat = notes(phone)
    entry = phone.new_entry(chat, "msg", WALL, body="lazily gossiped")
    update, _ = phone.write_local(chat, [entry])
    envelope = phone.seal(chat, update)
    names = [digest(envelope), digest(b"another")]
    link.a.carry_out(link.a.session.send_have(chat, names))
    link.run()
    assert link.b.haves_in == [HaveIn(chat, names)]
    link.b.carry_out(link.b.session.send_want(names[:1]))
    link.run()
    assert link.a.wants_in == [WantIn(names[:1])]
    link.a.carry_out(link.a.session.send_envelope(envelope))
    link.run()
    assert [m.text for m in view(laptop, chat)] == ["lazily gossiped"]
    assert link.a.session.state is link.b.session.state is SessionState.OPEN


def test_many_digests_travel_in_several_frames() -> None:
    phone, (laptop,) = new_account("laptop")
    link = Pair(phone, laptop).connect()
    link.run()
    names = [digest(i.to_bytes(4, "big")) for i in range(600)]
    link.a.carry_out(link.a.session.send_want(names))
    link.run()
    assert [len(w.digests) for w in link.b.wants_in] == [256, 256, 88]
    assert [d for w in link.b.wants_in for d in w.digests] == names


def test_have_about_a_space_the_peer_may_not_read_is_ignored() -> None:
    phone, (laptop,) = new_account("laptop")
    link = Pair(phone, laptop).connect()
    link.run()
    link.a.carry_out(link.a.session.send_have("nosuchspace", [digest(b"x")]))
    link.run()
    assert link.b.haves_in == []
    assert link.b.session.state is SessionState.OPEN


def _inject(link: Pair, frame: dict[str, object]) -> None:
    """Send a boxed frame from a to b that our own encoder would refuse to build."""
    link.a.carry_out([link.a.session._send_boxed(msgpack.packb(frame, use_bin_type=True))])
    link.run()


@pytest.mark.parametrize(
    "frame",
    [
        {"t": "have", "s": "space", "h": b""},
        {"t": "have", "s": "space", "h": b"x" * 15},
        {"t": "want", "h": b"x" * 17},
        {"t": "want", "h": b"x" * (16 * 257)},
        {"t": "want", "h": "not bytes"},
        {"t": "have", "h": b"x" * 16},
        {"t": "want", "h": b"x" * 16, "s": "extra"},
    ],
    ids=["empty", "partial", "ragged", "too-many", "type", "missing", "extra"],
)
def test_malformed_have_or_want_closes_the_session(frame: dict[str, object]) -> None:
    phone, (laptop,) = new_account("laptop")
    link = Pair(phone, laptop).connect()
    link.run()
    _inject(link, {"v": 1, **frame})
    assert isinstance(link.b.error, ProtocolError | MalformedFrame)
    assert link.b.haves_in == link.b.wants_in == []
    assert link.b.session.state is SessionState.CLOSED


def test_have_or_want_before_authentication_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer whose first boxed frame is a want instead of its ident: refused."""
    import p2p.proto.session

    phone, (laptop,) = new_account("laptop")
    link = Pair(phone, laptop)
    link.start()
    hellos, link.in_flight = link.in_flight, []
    to_a = next(data for dst, data in hellos if dst is link.a)
    to_b = next(data for dst, data in hellos if dst is link.b)
    real = p2p.proto.session.encode_frame

    def want_instead_of_ident(kind: str, **fields: object) -> bytes:
        return real("want", h=b"x" * 16) if kind == "ident" else real(kind, **fields)

    monkeypatch.setattr(p2p.proto.session, "encode_frame", want_instead_of_ident)
    link.deliver(link.a, to_a)  # a keys its box and sends a want where its ident goes
    monkeypatch.setattr(p2p.proto.session, "encode_frame", real)
    link.deliver(link.b, to_b)
    link.run()
    assert isinstance(link.b.error, HandshakeFailed)
    assert link.b.wants_in == []
    assert link.b.authenticated == []


def test_the_drivers_dispatch_table_covers_every_session_output() -> None:
    """The driver carries outputs out as the node does, through the same kind of table;
    a new kind of output the driver ignored would make tests pass that the node fails."""
    from p2p.testing.sessions import END_OUTPUTS

    assert END_OUTPUTS.missing() == set()
