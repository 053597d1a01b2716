"""Media attachments without a network: the format, chunk crypto, the fetch plan, the
session's media frames, file entries in the model, and the blob store on a real SQLite
file (damaged rows, foreign files, eviction, SIGKILL while writing)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import sqlite3
import sys
from pathlib import Path

import pytest
from procs import Child

from p2p.errors import (
    BadDescriptor,
    BlobCorrupt,
    ChunkTampered,
    DecryptionFailed,
    FileTooLarge,
    MalformedFrame,
    MediaError,
    StoreCorrupt,
)
from p2p.media.descriptor import (
    CHUNK_MIN,
    HARD_MAX_FILE,
    MAX_CHUNKS,
    Attachment,
    chunk_hash,
    chunk_size_for,
    file_body,
    new_key,
    open_chunk,
    parse_file_body,
    seal_chunk,
)
from p2p.media.fetch import Fetcher
from p2p.media.service import MediaPolicy
from p2p.media.store import BlobStore
from p2p.proto.model import Replica
from p2p.proto.session import MediaIn, Send
from p2p.proto.wire import MEDIA_CHUNK_MAX, MEDIA_WANT_MAX, decode_frame, encode_frame
from p2p.testing import provision_account


def make_file(data: bytes, chunk: int = CHUNK_MIN) -> tuple[Attachment, list[bytes]]:
    """Encrypt ``data`` the way a sender does; the attachment and its chunks."""
    key = new_key()
    chunks = [
        seal_chunk(key, i, len(data), data[o : o + chunk])
        for i, o in enumerate(range(0, len(data), chunk))
    ]
    a = Attachment(
        name="a.bin",
        size=len(data),
        mime="",
        chunk_size=chunk,
        key=key,
        hashes=tuple(chunk_hash(c) for c in chunks),
    )
    return a, chunks


# ---- format and crypto --------------------------------------------------------------


def test_chunk_size_keeps_the_chunk_count_bounded() -> None:
    assert chunk_size_for(0) == CHUNK_MIN
    assert chunk_size_for(CHUNK_MIN * MAX_CHUNKS) == CHUNK_MIN
    assert chunk_size_for(CHUNK_MIN * MAX_CHUNKS + 1) == 2 * CHUNK_MIN
    with pytest.raises(FileTooLarge):
        chunk_size_for(HARD_MAX_FILE + 1)
    with pytest.raises(FileTooLarge):
        chunk_size_for(10, limit=9)


def test_descriptor_round_trips_inside_a_file_body() -> None:
    a, _ = make_file(os.urandom(CHUNK_MIN * 2 + 5))
    text, back = parse_file_body(file_body("caption", a))
    assert (text, back) == ("caption", a)
    assert len(back.hashes) == 3
    assert back.id == a.id
    assert "key" not in json.dumps(a.summary())


@pytest.mark.parametrize(
    "change",
    [
        {"name": ""},
        {"name": "x" * 256},
        {"size": -1},
        {"size": True},
        {"chunk": CHUNK_MIN + 1},
        {"chunk": CHUNK_MIN // 2},
        {"key": base64.b64encode(b"short").decode()},
        {"hashes": base64.b64encode(b"\x00" * 32).decode()},  # 3 chunks need 3 hashes
        {"hashes": "not base64!"},
        {"extra": 1},
    ],
)
def test_malformed_descriptors_are_refused(change: dict[str, object]) -> None:
    a, _ = make_file(os.urandom(CHUNK_MIN * 2 + 5))
    value = {**a.to_json(), **change}
    with pytest.raises(BadDescriptor):
        Attachment.from_json(value)


@pytest.mark.parametrize("body", ["", "[]", '{"text": 1, "file": {}}', '{"text": ""}', "{"])
def test_malformed_file_bodies_are_refused(body: str) -> None:
    with pytest.raises(BadDescriptor):
        parse_file_body(body)


def test_chunks_open_only_with_their_key_index_and_size() -> None:
    data = os.urandom(1000)
    a, chunks = make_file(data)
    assert open_chunk(a.key, 0, a.size, chunks[0]) == data
    tampered = bytearray(chunks[0])
    tampered[10] ^= 1
    for key, index, size, blob in [
        (new_key(), 0, a.size, chunks[0]),
        (a.key, 1, a.size, chunks[0]),
        (a.key, 0, a.size + 1, chunks[0]),
        (a.key, 0, a.size, bytes(tampered)),
    ]:
        with pytest.raises(DecryptionFailed):
            open_chunk(key, index, size, blob)
    assert data not in chunks[0]


# ---- the fetch plan -----------------------------------------------------------------


def h(i: int) -> bytes:
    return i.to_bytes(32, "big")


def test_fetcher_fills_windows_spreads_load_and_respects_order() -> None:
    f = Fetcher(window=2)
    f.want([h(i) for i in range(5)])
    assert f.plan() == {}  # nobody to ask
    f.peer_up("a")
    f.peer_up("b")
    plan = f.plan()
    assert sorted(x for hs in plan.values() for x in hs) == [h(0), h(1), h(2), h(3)]
    assert {len(v) for v in plan.values()} == {2}
    assert f.plan() == {}  # windows full
    peer = next(p for p, hs in plan.items() if h(0) in hs)
    assert f.expects(peer, h(0))
    assert not f.expects("zz", h(0))
    f.received(peer, h(0))
    assert f.plan() == {peer: [h(4)]}
    assert f.missing == 4


def test_fetcher_asks_elsewhere_after_nohave_or_tamper_and_reclaims_on_disconnect() -> None:
    f = Fetcher(window=4)
    f.want([h(1)])
    f.peer_up("a")
    assert f.plan() == {"a": [h(1)]}
    f.lacking("a", h(1))  # nohave, or bytes that failed the hash
    assert f.plan() == {}  # "a" is not asked again...
    f.peer_up("b")
    assert f.plan() == {"b": [h(1)]}  # ..."b" is
    f.peer_down("b")
    assert f.plan() == {}
    f.retry_lacking()  # peers fetch too: ask "a" again later
    assert f.plan() == {"a": [h(1)]}
    f.forget([h(1)])
    assert f.missing == 0
    assert not f.expects("a", h(1))


# ---- policy -------------------------------------------------------------------------


def test_policy_decides_per_size_and_refuses_bad_settings() -> None:
    small, _ = make_file(os.urandom(10))
    big, _ = make_file(os.urandom(CHUNK_MIN + 1))
    assert MediaPolicy().wants(big)
    below = MediaPolicy().with_(fetch="below", below=100)
    assert below.wants(small)
    assert not below.wants(big)
    assert not MediaPolicy().with_(fetch="demand").wants(small)
    assert not MediaPolicy().with_(max_file=5).wants(small)
    assert not MediaPolicy().with_(quota=5).wants(small)
    for bad in [{"fetch": "some"}, {"quota": "-1"}, {"rate": "fast"}, {"colour": 1}]:
        with pytest.raises(MediaError):
            MediaPolicy().with_(**bad)


# ---- wire and session ---------------------------------------------------------------


def test_media_frames_are_bounded_by_the_schema() -> None:
    assert decode_frame(encode_frame("ask", h=h(1) * MEDIA_WANT_MAX))["t"] == "ask"
    with pytest.raises(MalformedFrame):
        encode_frame("ask", h=h(1) * (MEDIA_WANT_MAX + 1))
    with pytest.raises(MalformedFrame):
        encode_frame("blob", h=b"x" * 33, d=b"")
    with pytest.raises(MalformedFrame):
        encode_frame("blob", h=h(1), d=b"\x00" * (MEDIA_CHUNK_MAX + 17))


def open_pair() -> tuple[object, object]:
    from p2p.proto.session import Session
    from p2p.state.device import DeviceState

    stores = provision_account(2)
    a = Session(DeviceState.load(stores[0]), initiator=True, now=0.0)
    b = Session(DeviceState.load(stores[1]), initiator=False, now=0.0)
    queue = [(a, b, o.data) for o in a.start() if isinstance(o, Send)]
    queue += [(b, a, o.data) for o in b.start() if isinstance(o, Send)]
    for _ in range(50):  # bounded: a handshake is a handful of frames
        if not queue:
            break
        _, dst, data = queue.pop(0)
        other = a if dst is b else b
        queue += [(dst, other, o.data) for o in dst.receive(data, 0.0) if isinstance(o, Send)]
    return a, b


def test_session_carries_media_frames_boxed_and_counts_them() -> None:
    a, b = open_pair()
    out = a.send_media("blob", h=h(7), d=b"ciphertext")  # type: ignore[attr-defined]
    assert len(out) == 1
    assert isinstance(out[0], Send)
    assert b"ciphertext" not in out[0].data  # boxed like every frame after the handshake
    got = b.receive(out[0].data, 0.0)  # type: ignore[attr-defined]
    assert got == [MediaIn("blob", {"v": 1, "t": "blob", "h": h(7), "d": b"ciphertext"})]
    assert a.stats.media_bytes_out == len(out[0].data) == b.stats.media_bytes_in  # type: ignore[attr-defined]
    with pytest.raises(Exception, match="not a media frame"):
        a.send_media("env", e=b"")  # type: ignore[attr-defined]


# ---- file entries in the model ------------------------------------------------------


def test_file_entries_show_as_messages_and_bad_descriptors_are_hidden() -> None:
    from p2p.state.device import DeviceState

    state = DeviceState.load(provision_account(1)[0])
    space = state.chat_by_name("notes")
    a, _ = make_file(os.urandom(100))
    good = state.new_entry(space.id, "file", 1, body=file_body("look", a))
    bad = state.new_entry(space.id, "file", 2, body='{"text": "x", "file": {}}')
    state.write_local(space.id, [good, bad])
    replica: Replica = space.replica
    shown, rejected = replica.view(state.any_signing_key, state.belongs)
    assert [(m.text, m.attachment) for m in shown] == [("look", a)]
    assert [r.entry_id for r in rejected] == [bad.id]
    assert shown[0].to_json()["file"] == a.summary()


# ---- the blob store on a real SQLite file -------------------------------------------


def test_blob_store_keeps_checks_and_drops_damaged_chunks(tmp_path: Path) -> None:
    _, chunks = make_file(os.urandom(CHUNK_MIN + 10))
    hashes = [chunk_hash(c) for c in chunks]
    store = BlobStore(tmp_path / "media.db")
    with pytest.raises(ChunkTampered):
        store.put_chunks([(hashes[0], chunks[1])], own=False, now_ms=1)
    assert store.held(hashes) == set()
    store.put_chunks(list(zip(hashes, chunks, strict=True)), own=False, now_ms=1)
    store.put_chunks([(hashes[0], chunks[0])], own=False, now_ms=2)  # stored once
    assert store.chunk(hashes[1]) == chunks[1]
    store.close()
    # the disk damages one chunk
    with contextlib.closing(sqlite3.connect(tmp_path / "media.db")) as db, db:
        db.execute("UPDATE chunks SET data = ? WHERE hash = ?", (b"rot" + chunks[0][3:], hashes[0]))
        assert db.execute("SELECT count(*) FROM chunks").fetchone()[0] == 2
    store = BlobStore(tmp_path / "media.db")
    with pytest.raises(BlobCorrupt):
        store.chunk(hashes[0])
    assert store.chunk(hashes[0]) is None  # dropped, to be fetched again
    assert store.held(hashes) == {hashes[1]}
    assert store.corrupt == 1
    store.close()


def test_blob_store_refuses_a_foreign_file(tmp_path: Path) -> None:
    (tmp_path / "junk.db").write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(StoreCorrupt):
        BlobStore(tmp_path / "junk.db")
    with contextlib.closing(sqlite3.connect(tmp_path / "other.db")) as db, db:
        db.execute("CREATE TABLE t (x)")
    with pytest.raises(StoreCorrupt):
        BlobStore(tmp_path / "other.db")


def test_eviction_is_lru_and_never_takes_own_or_kept_chunks(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "media.db")
    data = [make_file(os.urandom(1000))[1][0] for _ in range(4)]
    store.put_chunks(
        [(chunk_hash(c), c) for c in make_file(os.urandom(1000))[1]], own=True, now_ms=0
    )
    for t, c in enumerate(data):
        store.put_chunks([(chunk_hash(c), c)], own=False, now_ms=10 + t)
    store.touch([chunk_hash(data[0])], now_ms=100)  # opened lately: evicted last
    keep = {chunk_hash(data[1])}
    gone = store.evict(2 * len(data[0]), keep)
    assert gone == [chunk_hash(data[2]), chunk_hash(data[3])]
    own_bytes, fetched = store.usage()
    assert own_bytes > 0
    assert fetched == 2 * len(data[0])
    assert store.held([chunk_hash(c) for c in data]) == {chunk_hash(data[0]), chunk_hash(data[1])}
    store.close()


WRITER = """
import os, sys
from p2p.media.descriptor import chunk_hash
from p2p.media.store import BlobStore
store = BlobStore(sys.argv[1])
print("ready", flush=True)
i = 0
while True:
    data = os.urandom(256 * 1024)
    store.put_chunks([(chunk_hash(data), data)], own=False, now_ms=i)
    i += 1
    if i == 20:
        print("written", flush=True)
"""


@pytest.mark.slow
def test_sigkill_while_writing_leaves_no_torn_chunk(tmp_path: Path) -> None:
    """A process killed mid-write: the store opens, and every chunk in it checks."""
    path = tmp_path / "media.db"
    writer = Child([sys.executable, "-c", WRITER, str(path)], logs=tmp_path)
    try:
        writer.wait_line(lambda line: line == "written", timeout=60)
        assert writer.lines[:2] == ["ready", "written"]
    finally:
        writer.kill()
    store = BlobStore(path)
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        hashes = [r[0] for r in db.execute("SELECT hash FROM chunks")]
    assert len(hashes) >= 20
    for digest in hashes:
        assert store.chunk(digest) is not None  # checked against its hash
    assert store.corrupt == 0
    store.close()


def test_a_peer_asking_for_too_much_at_once_is_refused() -> None:
    """Requests queue per peer up to SERVE_MAX, unasked chunks are dropped up to
    UNASKED_MAX; a flood past either closes its connection."""
    from p2p import events as ev
    from p2p.errors import ProtocolError
    from p2p.media.service import SERVE_MAX, UNASKED_MAX, MediaService

    class Host:
        def chats(self) -> list[object]:
            return []

        def messages(self, chat: str | None = None) -> list[object]:
            return []

        def reads(self, device: str, chat: str) -> bool:
            return True

    woken: list[str] = []
    blobs = BlobStore(None)
    media = MediaService(blobs, Host(), wall_ms=lambda: 0, emit=lambda e: None, wake=woken.append)  # type: ignore[arg-type]
    assert media.frame_in("peer", "ask", {"h": h(1)}) is None  # not a registered peer
    media.observe(ev.PeerConnected(device="peer", remote="x"))
    frame = {"h": b"".join(h(i) for i in range(MEDIA_WANT_MAX))}
    for _ in range(SERVE_MAX // MEDIA_WANT_MAX):
        assert media.frame_in("peer", "ask", frame) is None
    assert isinstance(media.frame_in("peer", "ask", {"h": h(9)}), ProtocolError)
    assert woken
    assert set(woken) == {"peer"}
    # chunks nobody asked for: dropped, up to a bound
    for i in range(UNASKED_MAX):
        assert media.frame_in("peer", "blob", {"h": h(i), "d": b"late"}) is None
    assert isinstance(media.frame_in("peer", "blob", {"h": h(0), "d": b"x"}), ProtocolError)
    # served from the store: nothing held, so the answer is nohave, in frames of 64
    kind, fields = media.next_out("peer")  # type: ignore[misc]
    assert kind == "nohave"
    assert len(fields["h"]) == 32 * MEDIA_WANT_MAX
    blobs.close()


@pytest.mark.slow
def test_a_file_reaches_every_device_through_a_lossy_network(tmp_path: Path) -> None:
    """The protocol on the in-memory network with drops, duplicates and reordering
    (each fault cuts a session, and the transfer resumes on the next one): every device
    ends with the file, byte-identical; a device switched off and on keeps its chunks."""
    import trio

    from p2p import testing

    data = os.urandom(3 * CHUNK_MIN + 77)
    (tmp_path / "f.bin").write_bytes(data)

    async def main() -> None:
        with trio.fail_after(120):
            async with testing.cluster(3, seed=3) as c:
                c.set_faults(drop=0.02, duplicate=0.02, reorder=0.02)
                sent = await c.node(1).send_file(tmp_path / "f.bin", "lossy")

                def fetched(i: int) -> bool:
                    m = [m for m in c.node(i).messages() if m.id == sent]
                    return bool(m) and c.node(i).media.describe(m[0].attachment)["fetched"]  # type: ignore[arg-type]

                while not fetched(0):  # noqa: ASYNC110  (state of a node, no event to wait on)
                    await trio.sleep(0.05)
                await c.stop(0)  # the phone goes away, and comes back with its chunks
                await c.start(0)
                assert fetched(0)
                while not fetched(2):  # noqa: ASYNC110
                    await trio.sleep(0.05)
                assert c.node(0).media.stats.chunks_in == 0  # nothing fetched twice
                c.heal()
                for i in range(3):
                    await c.node(i).open_attachment(sent, tmp_path / f"out{i}")
                    assert (tmp_path / f"out{i}").read_bytes() == data

    trio.run(main)
