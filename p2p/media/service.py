"""The node's media service: sending, fetching, serving and opening attachments (trio).

It sits beside the sync sessions and shares their connections (docs/media.md):

- **Out.** Each connection has a second, lower-priority lane: the node's pump writes
  every queued sync frame first and asks :meth:`MediaService.next_out` for one media
  frame only when that queue is empty, so an envelope waits behind at most one chunk.
  Requests (``ask``, ``nohave``) go before chunks; chunks to one peer are paced to
  ``rate`` bytes/s when the policy sets one (the per-peer bandwidth share).
- **In.** :meth:`frame_in` takes the peer's ``ask`` (queued to serve, bounded),
  ``nohave`` (ask someone else) and ``blob`` (checked against the hash that was asked of
  that very peer; a mismatch closes the connection with ChunkTampered and the chunk is
  asked of another peer). Good chunks are written in batches by a writer task; each one
  is durable before it counts as held, so a restart resumes with what is missing only.
- **What to fetch** follows the policy (``all``, ``below`` a size, or on ``demand``),
  decided once per file when a message carrying it is first seen, and kept in the blob
  store. The :class:`~p2p.media.fetch.Fetcher` decides which peer is asked for what.
- **Quota**: after a file completes, fetched chunks over the quota are evicted least
  recently used first (never own ones, never those of files still being fetched); an
  evicted file goes back to ``idle`` and can be fetched again on demand.
"""

from __future__ import annotations

import hashlib
import logging
import mimetypes
import os
import tempfile
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, Protocol

import trio

from p2p import events as ev
from p2p.errors import (
    BadDescriptor,
    BlobCorrupt,
    ChunkTampered,
    MalformedFrame,
    MediaError,
    MediaMissing,
    NodeError,
    P2PError,
    ProtocolError,
    StoreError,
    WireError,
)
from p2p.media.descriptor import (
    HASH_SIZE,
    MAX_BODY_TEXT,
    Attachment,
    chunk_hash,
    chunk_size_for,
    new_key,
    open_chunk,
    seal_chunk,
)
from p2p.media.fetch import WINDOW, Fetcher
from p2p.media.store import FILE_NAME, BlobStore
from p2p.proto.clock import parse_ts
from p2p.proto.model import Message
from p2p.proto.wire import MEDIA_WANT_MAX, load_json

log = logging.getLogger("p2p.media")

SERVE_MAX: Final = 2 * MEDIA_WANT_MAX
"""Chunk requests one peer may have queued with us; more closes its connection."""
UNASKED_MAX: Final = 4 * WINDOW
"""Chunks nobody asked for that one peer may send (late answers after a re-plan are
harmless; a stream of them is not): more closes its connection."""
RETRY_EVERY: Final = 5.0
"""Seconds between asking peers again for chunks they lacked (they fetch too)."""
WRITE_BATCH: Final = 32
"""Chunks written in one store transaction at most."""
FetchMode = Literal["all", "below", "demand"]
MiB: Final = 1024 * 1024
_POLICY_FIELDS: Final = ("fetch", "below", "max_file", "quota", "rate")


@dataclass
class MediaPolicy:
    """What this device fetches and keeps; stored in the blob store's settings."""

    fetch: FetchMode = "all"
    """``all`` attachments, those ``below`` a size, or only on ``demand``."""
    below: int = 16 * MiB
    """The size limit of ``fetch="below"``, in bytes."""
    max_file: int = 100 * MiB
    """Largest file this device sends or fetches by itself (bytes)."""
    quota: int = 1024 * MiB
    """Bytes of fetched (not own) chunks kept; least recently used ones go first."""
    rate: int = 0
    """Bytes per second of chunks served to each peer (0: no limit)."""

    @classmethod
    def load(cls, blobs: BlobStore) -> MediaPolicy:
        policy = cls()
        for name in _POLICY_FIELDS:
            value = blobs.setting(f"policy/{name}")
            if value is not None:
                policy = policy.with_(**{name: value})
        return policy

    def save(self, blobs: BlobStore) -> None:
        for name in _POLICY_FIELDS:
            blobs.set_setting(f"policy/{name}", str(getattr(self, name)))

    def with_(self, **changes: object) -> MediaPolicy:
        """A copy with some settings changed, checked; MediaError for a bad value."""
        values: dict[str, Any] = {n: getattr(self, n) for n in _POLICY_FIELDS}
        for name, value in changes.items():
            if name not in values:
                raise MediaError(f"no media setting {name!r}")
            if value is None:
                continue
            if name == "fetch":
                if value not in ("all", "below", "demand"):
                    raise MediaError("fetch is one of all, below, demand")
                values[name] = value
                continue
            try:
                number = int(str(value))
            except ValueError:
                raise MediaError(f"{name} must be a whole number of bytes") from None
            if number < 0:
                raise MediaError(f"{name} must not be negative")
            values[name] = number
        return MediaPolicy(**values)

    def to_json(self) -> dict[str, Any]:
        return {n: getattr(self, n) for n in _POLICY_FIELDS}

    def wants(self, attachment: Attachment) -> bool:
        """Whether a newly seen attachment is fetched without being asked."""
        if attachment.size > self.max_file or attachment.stored_size > self.quota:
            return False
        return self.fetch == "all" or (self.fetch == "below" and attachment.size <= self.below)


class MediaHost(Protocol):
    """What the service needs from its node (``p2p.runtime.node.Node`` fits)."""

    def chats(self) -> Any: ...

    def messages(self, chat: str | None = None, *, files_only: bool = False) -> list[Message]: ...

    def reads(self, device: str, chat: str) -> bool:
        """Whether ``device`` (a peer) is a current member device of ``chat``."""
        ...


@dataclass
class _Progress:
    chat: str
    message: str
    attachment: Attachment
    held: int = 0


@dataclass
class _PeerLane:
    """What one peer is owed on the media lane."""

    requests: deque[bytes] = field(default_factory=deque)
    """``ask`` frames (joined hashes) to send."""
    refusals: list[bytes] = field(default_factory=list)
    """Hashes to answer ``nohave``."""
    serve: deque[bytes] = field(default_factory=deque)
    """Hashes the peer asked us for, to send as ``blob``."""
    unasked: int = 0
    """Chunks this peer sent that we had not asked it for (bounded: UNASKED_MAX)."""
    tokens: float = 0.0
    refilled: float = 0.0
    pacing: bool = False


@dataclass
class MediaStats:
    chunks_in: int = 0
    bytes_in: int = 0
    chunks_out: int = 0
    bytes_out: int = 0
    tampered: int = 0
    """Chunks from peers that failed their hash (each closed that connection)."""
    unasked: int = 0
    """Chunks that arrived without being asked for (late, after a re-plan): dropped."""


class MediaService:
    """One device's attachments; see the module docstring. Created by ``open_node``."""

    def __init__(
        self,
        blobs: BlobStore,
        host: MediaHost,
        *,
        wall_ms: Callable[[], int],
        emit: Callable[[ev.Event], None],
        wake: Callable[[str], None],
    ) -> None:
        self.blobs = blobs
        self.policy = MediaPolicy.load(blobs)
        self.stats = MediaStats()
        self.fetcher = Fetcher()
        self._host = host
        self._wall_ms = wall_ms
        self._emit = emit
        self._wake = wake
        self._lanes: dict[str, _PeerLane] = {}
        self._progress: dict[str, _Progress] = {}
        """File id -> progress, for files being fetched."""
        self._file_of: dict[bytes, set[str]] = {}
        """Chunk hash -> files being fetched that hold it."""
        self._known: dict[str, tuple[str, str]] = {}
        """File id -> (chat, message) of the first message seen carrying it."""
        self._file_chats: dict[str, set[str]] = {}
        """File id -> every chat a message carrying it was seen in."""
        self._chunk_files: dict[bytes, set[str]] = {}
        """Chunk hash -> files (seen in messages) that hold it: a chunk is served to, and
        asked of, only member devices of a chat carrying one of them."""
        self._received: list[tuple[bytes, bytes]] = []
        self._kick = trio.Event()
        self._write_wakeup = trio.Event()
        self._dirty = True

    # ---- the node's hooks ----------------------------------------------------------

    def observe(self, event: ev.Event) -> None:
        """Every event the node emits: peers come and go, chats change."""
        if isinstance(event, ev.PeerConnected):
            self._lanes[event.device] = _PeerLane()
            self.fetcher.peer_up(event.device)
            self._kick.set()
        elif isinstance(event, ev.PeerDisconnected):
            self._lanes.pop(event.device, None)
            self.fetcher.peer_down(event.device)
            self._kick.set()
        elif isinstance(event, ev.ChatChanged):
            self._dirty = True
            self._kick.set()

    def frame_in(self, device: str, kind: str, fields: dict[str, Any]) -> P2PError | None:
        """A media frame from an authenticated peer; an error closes its connection."""
        lane = self._lanes.get(device)
        if lane is None:
            return None  # not (or no longer) a registered peer
        try:
            if kind == "ask":
                hashes = _split(fields["h"])
                if len(lane.serve) + len(lane.refusals) + len(hashes) > SERVE_MAX:
                    return ProtocolError(f"more than {SERVE_MAX} chunk requests queued")
                reads = self._reader(device)
                for h in hashes:
                    # a hash is no secret among a chat's members only: anyone else gets
                    # nohave, as for a chunk we lack
                    (lane.serve if self._allowed(reads, h) else lane.refusals).append(h)
                self._wake(device)
            elif kind == "nohave":
                for h in _split(fields["h"]):
                    self.fetcher.lacking(device, h)
                self._kick.set()
            elif kind == "blob":
                return self._blob_in(device, lane, fields["h"], fields["d"])
        except MalformedFrame as exc:
            return exc
        return None

    def _reader(self, device: str) -> Callable[[str], bool]:
        """Whether ``device`` reads a chat (asked once per chat per call site)."""
        memo: dict[str, bool] = {}

        def reads(chat: str) -> bool:
            if chat not in memo:
                memo[chat] = self._host.reads(device, chat)
            return memo[chat]

        return reads

    def _allowed(self, reads: Callable[[str], bool], h: bytes) -> bool:
        """Whether a chunk belongs to a file of a chat the peer reads."""
        files = self._chunk_files.get(h, ())
        return any(reads(chat) for f in files for chat in self._file_chats.get(f, ()))

    def _blob_in(self, device: str, lane: _PeerLane, h: bytes, data: bytes) -> P2PError | None:
        if not self.fetcher.expects(device, h):
            self.stats.unasked += 1  # a request we dropped meanwhile (evicted, re-planned)
            lane.unasked += 1
            if lane.unasked > UNASKED_MAX:
                return ProtocolError(f"more than {UNASKED_MAX} chunks nobody asked for")
            return None
        if chunk_hash(data) != h:
            self.stats.tampered += 1
            self.fetcher.lacking(device, h)
            self._kick.set()
            log.warning("chunk %s from %s fails its hash", h.hex()[:16], device)
            return ChunkTampered(h.hex()[:16], device)
        self.fetcher.received(device, h)
        self.stats.chunks_in += 1
        self.stats.bytes_in += len(data)
        self._received.append((h, data))
        self._write_wakeup.set()
        self._kick.set()  # the window has room again
        return None

    def next_out(self, device: str) -> tuple[str, dict[str, bytes]] | None:
        """The next media frame for ``device``'s lane, or None (nothing, or paced)."""
        lane = self._lanes.get(device)
        if lane is None:
            return None
        if lane.requests:
            return "ask", {"h": lane.requests.popleft()}
        if lane.refusals:
            hashes, lane.refusals = lane.refusals[:MEDIA_WANT_MAX], lane.refusals[MEDIA_WANT_MAX:]
            return "nohave", {"h": b"".join(hashes)}
        while lane.serve:
            h = lane.serve[0]
            try:
                data = self.blobs.chunk(h)
            except BlobCorrupt as exc:
                log.warning("%s", exc)
                data = None
            if data is None:
                lane.serve.popleft()
                lane.refusals.append(h)
                continue
            if not self._paced(device, lane, len(data)):
                return None
            lane.serve.popleft()
            self.stats.chunks_out += 1
            self.stats.bytes_out += len(data)
            return "blob", {"h": h, "d": data}
        if lane.refusals:
            return self.next_out(device)
        return None

    def _paced(self, device: str, lane: _PeerLane, size: int) -> bool:
        """Token bucket of ``rate`` bytes/s (one second of burst) per peer."""
        rate = self.policy.rate
        if not rate:
            return True
        now = trio.current_time()
        lane.tokens = min(float(max(rate, size)), lane.tokens + (now - lane.refilled) * rate)
        lane.refilled = now
        if lane.tokens >= size:
            lane.tokens -= size
            return True
        if not lane.pacing:
            lane.pacing = True
            self._nursery.start_soon(self._resume, device, lane, (size - lane.tokens) / rate)
        return False

    async def _resume(self, device: str, lane: _PeerLane, delay: float) -> None:
        await trio.sleep(delay)
        lane.pacing = False
        self._wake(device)

    # ---- tasks ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Plan requests and write received chunks until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._writer)
            task_status.started()
            while True:
                with trio.move_on_after(RETRY_EVERY) as timer:
                    await self._kick.wait()
                self._kick = trio.Event()
                if timer.cancelled_caught:
                    self.fetcher.retry_lacking()
                if self._dirty:
                    self._dirty = False
                    await self._scan()
                self._plan()
                await trio.lowlevel.checkpoint()  # let a burst of chunks in before re-planning

    def _plan(self) -> None:
        if len(self._received) >= 2 * WRITE_BATCH:
            return  # the disk is behind: ask for more once the writer catches up
        readers = {device: self._reader(device) for device in self._lanes}

        def eligible(device: str, h: bytes) -> bool:
            reads = readers.get(device)
            return reads is not None and self._allowed(reads, h)

        for device, hashes in self.fetcher.plan(eligible).items():
            lane = self._lanes.get(device)
            if lane is None:
                self.fetcher.peer_down(device)
                continue
            for i in range(0, len(hashes), MEDIA_WANT_MAX):
                lane.requests.append(b"".join(hashes[i : i + MEDIA_WANT_MAX]))
            self._wake(device)

    async def _scan(self) -> None:
        """Find attachments in messages not seen yet, and decide about each once."""
        for chat in self._host.chats():
            for message in self._host.messages(chat.id, files_only=True):
                a = message.attachment
                if a is None:
                    continue
                chats = self._file_chats.setdefault(a.id, set())
                if not chats:
                    for h in a.hashes:
                        self._chunk_files.setdefault(h, set()).add(a.id)
                chats.add(message.chat)
                if a.id in self._known:
                    continue
                self._known[a.id] = (message.chat, message.id)
                state = self.blobs.file_state(a.id)
                if state is None:
                    state = "want" if self.policy.wants(a) else "idle"
                    await self._blob_io(self.blobs.set_file, a.id, _json(a), state)
                if state == "want":
                    await self._start(message.chat, message.id, a)

    async def _start(self, chat: str, message: str, a: Attachment) -> None:
        """Fetch what is missing of a file (resuming from what the store holds)."""
        if a.id in self._progress:
            return
        held = self.blobs.held(a.hashes)
        progress = _Progress(chat, message, a, held=sum(1 for h in a.hashes if h in held))
        missing = [h for h in dict.fromkeys(a.hashes) if h not in held]
        if not missing:
            await self._finish(progress)
            return
        self._progress[a.id] = progress
        for h in missing:
            self._file_of.setdefault(h, set()).add(a.id)
        self.fetcher.want(missing)
        self._report(progress)
        self._kick.set()

    async def _writer(self) -> None:
        while True:
            await self._write_wakeup.wait()
            self._write_wakeup = trio.Event()
            while self._received:
                batch, self._received = self._received[:WRITE_BATCH], self._received[WRITE_BATCH:]
                await self._blob_io(
                    self.blobs.put_chunks,
                    batch,
                    own=False,
                    now_ms=self._wall_ms(),
                    checked=True,  # by _blob_in, against the hash that was asked for
                )
                self._kick.set()  # room to ask for more (see _plan)
                for h, _ in batch:
                    for file_id in sorted(self._file_of.pop(h, set())):
                        progress = self._progress.get(file_id)
                        if progress is None:
                            continue
                        progress.held += sum(1 for x in progress.attachment.hashes if x == h)
                        if progress.held >= len(progress.attachment.hashes):
                            await self._finish(progress)  # reports completion
                        else:
                            self._report(progress)

    async def _finish(self, progress: _Progress) -> None:
        a = progress.attachment
        self._progress.pop(a.id, None)
        await self._blob_io(self.blobs.set_file, a.id, _json(a), "done")
        await self._evict()  # before "complete" goes out: the app sees the store settled
        progress.held = len(a.hashes)
        self._report(progress)

    async def _evict(self) -> None:
        keep = {h for p in self._progress.values() for h in p.attachment.hashes}
        gone = set(await self._blob_io(self.blobs.evict, self.policy.quota, keep))
        if not gone:
            return
        for file_id, descriptor in self.blobs.files("done"):
            a = Attachment.from_json(_loads(descriptor))
            if gone.intersection(a.hashes):
                log.info("evicted attachment %s (%s) over the quota", a.name, file_id)
                await self._blob_io(self.blobs.set_file, file_id, descriptor, "idle")

    def _report(self, progress: _Progress) -> None:
        a = progress.attachment
        self._emit(
            ev.MediaProgress(
                file=a.id,
                chat=progress.chat,
                message=progress.message,
                name=a.name,
                done=progress.held,
                total=len(a.hashes),
                size=a.size,
            )
        )

    async def _blob_io(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Blob store writes: in a worker thread on disk, inline in memory."""
        if self.blobs.in_memory:
            return fn(*args, **kwargs)
        return await trio.to_thread.run_sync(lambda: fn(*args, **kwargs))

    # ---- the API -------------------------------------------------------------------

    async def prepare(self, path: str | os.PathLike[str]) -> Attachment:
        """Encrypt a file into own chunks (once: the same file again reuses them)."""
        return await trio.to_thread.run_sync(self._prepare, Path(path), self._wall_ms())

    def _prepare(self, path: Path, now_ms: int) -> Attachment:
        try:
            size = path.stat().st_size
            if not path.is_file():
                raise MediaError(f"{path} is not a file")
            if size > self.policy.max_file:
                raise MediaError(
                    f"{path.name} is {size} bytes; this device sends at most "
                    f"{self.policy.max_file} (p2p media --max-file)"
                )
            chunk = chunk_size_for(size)
            digest = hashlib.blake2b(digest_size=32)
            with path.open("rb") as f:
                while piece := f.read(MiB):
                    digest.update(piece)
            plain = self.blobs.plain_digest(digest.digest() + size.to_bytes(8, "big"))
            name = path.name[:255] or "file"
            mime = (mimetypes.guess_type(path.name)[0] or "")[:127]
            known = self.blobs.own_file_by_plain(plain)
            if known is not None:
                old = Attachment.from_json(_loads(known))
                if self.blobs.held(old.hashes) == set(old.hashes):
                    return Attachment(
                        name=name,
                        size=old.size,
                        mime=mime,
                        chunk_size=old.chunk_size,
                        key=old.key,
                        hashes=old.hashes,
                    )
            key = new_key()
            hashes: list[bytes] = []
            pending: list[tuple[bytes, bytes]] = []
            with path.open("rb") as f:
                for index in range(-(-size // chunk)):
                    data = seal_chunk(key, index, size, f.read(chunk))
                    hashes.append(chunk_hash(data))
                    pending.append((hashes[-1], data))
                    if len(pending) * chunk >= 4 * MiB:  # one transaction per 4 MiB
                        self.blobs.put_chunks(pending, own=True, now_ms=now_ms, checked=True)
                        pending = []
                self.blobs.put_chunks(pending, own=True, now_ms=now_ms, checked=True)
                if f.read(1):
                    raise MediaError(f"{path} grew while it was being read")
        except OSError as exc:
            raise MediaError(f"cannot read {path}: {exc.strerror or exc}") from exc
        a = Attachment(
            name=name, size=size, mime=mime, chunk_size=chunk, key=key, hashes=tuple(hashes)
        )
        self.blobs.set_file(a.id, _json(a), "own", plain)
        return a

    def find(self, message_id: str, chat: str | None = None) -> tuple[Message, Attachment]:
        """The message ``message_id`` (in ``chat``, or any chat) and its attachment;
        NodeError if there is no such message, MediaError if it carries no file."""
        chats = [chat] if chat else [c.id for c in self._host.chats()]
        for c in chats:
            for m in self._host.messages(c, files_only=True):
                if m.id == message_id and m.attachment is not None:
                    return m, m.attachment
        for c in chats:  # the slow path, only to say why
            if any(m.id == message_id for m in self._host.messages(c)):
                raise MediaError(f"message {message_id} has no attachment")
        raise NodeError(f"no message {message_id}")

    async def fetch(self, message_id: str, chat: str | None = None) -> Attachment:
        """Fetch a message's attachment now (whatever the policy said)."""
        m, a = self.find(message_id, chat)
        self._known.setdefault(a.id, (m.chat, m.id))
        if self.blobs.file_state(a.id) not in ("own", "want"):
            await self._blob_io(self.blobs.set_file, a.id, _json(a), "want")
        await self._start(m.chat, m.id, a)
        return a

    def describe(self, a: Attachment) -> dict[str, Any]:
        """What ``p2p log`` shows of an attachment here: held chunks, fetched or not."""
        held = len(self.blobs.held(a.hashes))
        unique = len(set(a.hashes))
        return {
            "state": self.blobs.file_state(a.id) or "idle",
            "chunks": unique,
            "held": held,
            "fetched": held == unique,
        }

    def log_json(self, messages: list[Message]) -> list[dict[str, Any]]:
        """Messages as ``p2p log --json`` prints them, attachments described."""
        out = []
        for m in messages:
            row = m.to_json()
            # a number for programs (ms since the epoch); the exact hybrid timestamp,
            # which orders messages written in the same millisecond, beside it
            row["ts"], row["hlc"] = parse_ts(m.ts)[0], m.ts
            if m.attachment is not None:
                row["file"].update(self.describe(m.attachment))
            out.append(row)
        return out

    async def open(
        self, message_id: str, out: str | os.PathLike[str], chat: str | None = None
    ) -> Attachment:
        """Write a message's attachment, decrypted, to ``out`` (atomically)."""
        _, a = self.find(message_id, chat)
        await trio.to_thread.run_sync(self._open, a, Path(out), self._wall_ms())
        return a

    def _open(self, a: Attachment, out: Path, now_ms: int) -> None:
        held = self.blobs.held(a.hashes)
        if held != set(a.hashes):
            raise MediaMissing(a.id, len(held), len(set(a.hashes)))
        fd, tmp = tempfile.mkstemp(prefix=".p2p-open-", dir=out.parent or ".")
        try:
            with os.fdopen(fd, "wb") as f:
                for index, h in enumerate(a.hashes):
                    data = self.blobs.chunk(h)
                    if data is None:
                        raise MediaMissing(a.id, index, len(a.hashes))
                    plain = open_chunk(a.key, index, a.size, data)
                    if len(plain) != a.plain_size(index):
                        raise BadDescriptor(f"chunk {index} of {a.name} has the wrong size")
                    f.write(plain)
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.blobs.touch(a.hashes, now_ms)

    def status(self) -> dict[str, Any]:
        """The media part of ``p2p status``."""
        own, fetched = self.blobs.usage()
        return {
            "policy": self.policy.to_json(),
            "own_bytes": own,
            "fetched_bytes": fetched,
            "fetching": [
                {"file": p.attachment.id, "name": p.attachment.name, "held": p.held,
                 "chunks": len(p.attachment.hashes)}
                for p in self._progress.values()
            ],
            "missing_chunks": self.fetcher.missing,
            "chunks_in": self.stats.chunks_in,
            "bytes_in": self.stats.bytes_in,
            "chunks_out": self.stats.chunks_out,
            "bytes_out": self.stats.bytes_out,
            "tampered": self.stats.tampered,
            "corrupt": self.blobs.corrupt,
        }  # fmt: skip

    def set_policy(self, **changes: object) -> MediaPolicy:
        """Change settings (checked), keep them, and act on them from now on."""
        self.policy = self.policy.with_(**changes)
        self.policy.save(self.blobs)
        self._known.clear()  # files left idle may be wanted under the new policy...
        self._dirty = True  # ...but a decision already stored stands (see _scan)
        self._kick.set()
        return self.policy


def _split(joined: bytes) -> list[bytes]:
    if not joined or len(joined) % HASH_SIZE:
        raise MalformedFrame("chunk hashes are 32 bytes each")
    return [joined[i : i + HASH_SIZE] for i in range(0, len(joined), HASH_SIZE)]


def _json(a: Attachment) -> str:
    import json

    return json.dumps(a.to_json(), separators=(",", ":"))


def _loads(descriptor: str) -> object:
    try:  # a stored row: bounded like any bytes from outside
        return load_json(descriptor, what="stored descriptor", max_size=MAX_BODY_TEXT, max_depth=4)
    except WireError as exc:
        raise StoreError("a stored descriptor is not JSON") from exc


def open_blobs(home: str | os.PathLike[str] | None) -> BlobStore:
    """The blob store of a home (created owner-only, like the chat store), or one in
    memory without a home."""
    if home is None:
        return BlobStore(None)
    old = os.umask(0o077)
    try:
        return BlobStore(Path(home) / FILE_NAME)
    finally:
        os.umask(old)
