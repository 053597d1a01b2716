"""Relay processes sharing one Redis: mail, presence and a bus between processes.

``p2p relay --redis redis://HOST:PORT/DB`` runs one process of a cluster. Any number of
them serve one relay id (devices sign that id, so a device may connect to any of them).
Everything that must hold across processes lives in Redis, under keys prefixed with
``p2p:<relay id>:`` (so several relay ids may share one Redis database):

Mail (:class:`RedisMailStore`, the same rules as the SQLite mailbox)::

    seq                  INCR counter: an item's sequence number (only grows)
    box:<recipient>      ZSET mail id -> seq
    item:<recipient>     HASH mail id -> data
    meta:<recipient>     HASH mail id -> "<sender> <created> <size>"
    exp                  ZSET <recipient><mail id> -> created (for the purge)
    q:bc q:bb            HASH recipient -> items / bytes waiting
    q:sc q:sb            HASH sender -> items / bytes held
    q:t                  HASH c / b -> items / bytes on the whole relay

Each operation is one Lua script, so a quota is checked and charged atomically however
many processes post at once: the limits hold cluster-wide. ``posted`` is sent after the
script returns; with ``appendonly yes`` and ``appendfsync always`` (docs/relay.md,
"Running a cluster") that is after the item is on disk.

Presence and processes (:class:`RedisCluster`)::

    procs                SET of process ids that joined
    alive:<proc>         a key that expires unless its process refreshes it (heartbeat)
    procdevs:<proc>      SET of devices connected to that process
    presence:<device>    HASH proc -> connections of the device there
    newest:<device>      the process holding the device's newest connection

A device is online while its ``presence`` hash has a field. The first connection
anywhere and the last one gone are published on the ``presence`` channel, which every
process follows to tell its local watchers. A process whose ``alive`` key expired (it
was killed, or lost Redis) is reaped by whichever process sweeps first: its devices go
offline, and every process closes the pipes it had with it.

The bus: each process subscribes to ``proc:<its id>``; pipe traffic between devices on
two processes (``open``, ``opened``, ``closed``, ``data``, ``credit``, ``close``) and mail
notices travel there as msgpack lists ``[kind, from proc, ...]``. Messages to one
process leave in order, batched into pipelines. Back-pressure is a credit window per
pipe: a sender holds at most :data:`WINDOW_BYTES` / :data:`WINDOW_ITEMS` unacknowledged,
and the receiving process returns credit as the device's own queue drains, so a slow
device slows its sender across processes as it does within one. Redis pub/sub does not
retry: anything that can lose a message (a gap in a pipe's sequence numbers, a lost
subscription, a Redis restart) closes the pipes it touches, and the two devices redial
and repair with state vectors, as after any dropped connection.

The client is coredis (6.x, on anyio, so native on trio); why, and what was measured:
docs/relay.md.
"""

from __future__ import annotations

import logging
import secrets
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

import coredis
import msgpack
import trio
from coredis.exceptions import RedisError
from coredis.retry import NoRetryPolicy

from p2p.errors import RelayError, StoreError
from p2p.proto.relay_protocol import MAIL_ID_BYTES, MAX_PAYLOAD, is_device_id
from p2p.relay.backend import WINDOW_BYTES, WINDOW_ITEMS, parse_redis_url
from p2p.relay.mailbox import MailQuota, StoredMail

log = logging.getLogger("p2p.relay.cluster")


def _is_cancellation(exc: BaseException | None) -> bool:
    """Whether ``exc`` is trio's cancellation, or a group of them, or caused by one."""
    seen = 0
    while exc is not None and seen < 16:  # bounded: chains may loop
        if isinstance(exc, trio.Cancelled):
            return True
        if isinstance(exc, BaseExceptionGroup):
            return all(_is_cancellation(e) for e in exc.exceptions)
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


class _QuietCancellation(logging.Filter):
    """coredis logs an ERROR with a traceback when a connection attempt is cancelled (a
    device that hangs up while its mail is being read cancels the read). That is the
    relay working as meant, not a fault: such records are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and _is_cancellation(record.exc_info[1]))


for _name in ("coredis", "coredis.connection", "coredis.client", "coredis.pool"):
    logging.getLogger(_name).addFilter(_QuietCancellation())

HEARTBEAT: Final = 1.0
"""Seconds between a process's refreshes of its ``alive`` key."""
ALIVE_FOR: Final = 5.0
"""Seconds an ``alive`` key lives unrefreshed: a process silent this long is reaped."""
SWEEP: Final = 2.0
"""Seconds between sweeps for dead processes."""
TIMEOUT: Final = 2.0
"""Seconds for one Redis command (connect and answer); past it, Redis counts as lost."""
OUTBOX_BYTES: Final = 8 * 1024 * 1024
"""Bytes queued towards one other process before senders wait."""
BATCH_BYTES: Final = 1024 * 1024
BATCH_ITEMS: Final = 256
"""Most bytes and messages published in one pipeline."""
PURGE_PAGE: Final = 500
POOL: Final = 32
"""Connections to Redis per process (commands wait for one past that): a login storm
must not open thousands of connections to Redis."""

_LIB: Final = """
local function num(x) if x then return tonumber(x) or 0 end return 0 end
local function decr(key, field, n)
  if redis.call('HINCRBY', key, field, -n) <= 0 then redis.call('HDEL', key, field) end
end
local function del(p, r, id)
  local meta = redis.call('HGET', p..'meta:'..r, id)
  redis.call('ZREM', p..'exp', r..id)
  if not meta then return 0 end
  local s, _, size = string.match(meta, '^(%S+) (%S+) (%d+)$')
  size = num(size)
  redis.call('HDEL', p..'meta:'..r, id)
  redis.call('HDEL', p..'item:'..r, id)
  redis.call('ZREM', p..'box:'..r, id)
  decr(p..'q:bc', r, 1)
  decr(p..'q:bb', r, size)
  if s then
    decr(p..'q:sc', s, 1)
    decr(p..'q:sb', s, size)
  end
  decr(p..'q:t', 'c', 1)
  decr(p..'q:t', 'b', size)
  return 1
end
"""

_POST: Final = """
local p, r, s, id, data, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
if redis.call('HEXISTS', p..'meta:'..r, id) == 1 then return 'posted' end
local size = string.len(data)
if num(redis.call('HGET', p..'q:bc', r)) + 1 > tonumber(ARGV[7])
  or num(redis.call('HGET', p..'q:bb', r)) + size > tonumber(ARGV[8]) then return 'quota' end
if num(redis.call('HGET', p..'q:sc', s)) + 1 > tonumber(ARGV[9])
  or num(redis.call('HGET', p..'q:sb', s)) + size > tonumber(ARGV[10]) then
  return 'sender_quota'
end
if num(redis.call('HGET', p..'q:t', 'c')) + 1 > tonumber(ARGV[11])
  or num(redis.call('HGET', p..'q:t', 'b')) + size > tonumber(ARGV[12]) then
  return 'relay_full'
end
local seq = redis.call('INCR', p..'seq')
redis.call('ZADD', p..'box:'..r, seq, id)
redis.call('HSET', p..'item:'..r, id, data)
redis.call('HSET', p..'meta:'..r, id, s..' '..now..' '..size)
redis.call('ZADD', p..'exp', now, r..id)
redis.call('HINCRBY', p..'q:bc', r, 1)
redis.call('HINCRBY', p..'q:bb', r, size)
redis.call('HINCRBY', p..'q:sc', s, 1)
redis.call('HINCRBY', p..'q:sb', s, size)
redis.call('HINCRBY', p..'q:t', 'c', 1)
redis.call('HINCRBY', p..'q:t', 'b', size)
local notice = cmsgpack.pack({'mail', '', r})
for _, proc in ipairs(redis.call('HKEYS', p..'presence:'..r)) do
  redis.call('PUBLISH', p..'proc:'..proc, notice)
end
return 'posted'
"""

_FETCH: Final = """
local p, r = ARGV[1], ARGV[2]
local ids = redis.call('ZRANGEBYSCORE', p..'box:'..r, '('..ARGV[3], '+inf', 'WITHSCORES',
  'LIMIT', 0, tonumber(ARGV[4]))
local out = {}
for i = 1, #ids, 2 do
  local id = ids[i]
  out[#out + 1] = ids[i + 1]
  out[#out + 1] = id
  out[#out + 1] = redis.call('HGET', p..'meta:'..r, id) or ''
  out[#out + 1] = redis.call('HGET', p..'item:'..r, id) or ''
end
return out
"""

_ACK: Final = """
local p, r, n = ARGV[1], ARGV[2], 0
for i = 3, #ARGV do n = n + del(p, r, ARGV[i]) end
return n
"""

_PURGE: Final = """
local p = ARGV[1]
local gone = redis.call('ZRANGEBYSCORE', p..'exp', '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
local n = 0
for _, m in ipairs(gone) do n = n + del(p, string.sub(m, 1, 16), string.sub(m, 17)) end
return {#gone, n}
"""

_UP: Final = """
local p, dev, proc = ARGV[1], ARGV[2], ARGV[3]
local n = redis.call('HINCRBY', p..'presence:'..dev, proc, 1)
redis.call('SADD', p..'procdevs:'..proc, dev)
redis.call('SET', p..'newest:'..dev, proc)
if n == 1 and redis.call('HLEN', p..'presence:'..dev) == 1 then
  redis.call('PUBLISH', p..'presence', cmsgpack.pack({dev, true}))
end
return n
"""

_PROCESS_GONE: Final = """
  local left = redis.call('HKEYS', key)
  if #left == 0 then
    redis.call('DEL', p..'newest:'..dev)
    redis.call('PUBLISH', p..'presence', cmsgpack.pack({dev, false}))
  elseif redis.call('GET', p..'newest:'..dev) == proc then
    redis.call('SET', p..'newest:'..dev, left[1])
  end
"""
"""Lua, with ``key`` a device's presence hash that ``proc`` just left: when no process
holds the device any more, it is offline (told on the bus); else, if ``proc`` was its
newest, another process becomes it."""

_DOWN: Final = (
    """
local p, dev, proc = ARGV[1], ARGV[2], ARGV[3]
local key = p..'presence:'..dev
if redis.call('HEXISTS', key, proc) == 0 then return 0 end
if redis.call('HINCRBY', key, proc, -1) <= 0 then
  redis.call('HDEL', key, proc)
  redis.call('SREM', p..'procdevs:'..proc, dev)
"""
    + _PROCESS_GONE
    + """end
return 1
"""
)

_RESYNC: Final = """
local p, proc = ARGV[1], ARGV[2]
redis.call('SADD', p..'procs', proc)
redis.call('SET', p..'alive:'..proc, '1', 'PX', tonumber(ARGV[3]))
local mine = {}
for i = 4, #ARGV, 2 do mine[ARGV[i]] = tonumber(ARGV[i + 1]) end
for _, dev in ipairs(redis.call('SMEMBERS', p..'procdevs:'..proc)) do
  if not mine[dev] then
    redis.call('HDEL', p..'presence:'..dev, proc)
    redis.call('SREM', p..'procdevs:'..proc, dev)
    if redis.call('HLEN', p..'presence:'..dev) == 0 then
      redis.call('DEL', p..'newest:'..dev)
      redis.call('PUBLISH', p..'presence', cmsgpack.pack({dev, false}))
    end
  end
end
for dev, n in pairs(mine) do
  local key = p..'presence:'..dev
  local was = redis.call('HLEN', key)
  redis.call('HSET', key, proc, n)
  redis.call('SADD', p..'procdevs:'..proc, dev)
  if redis.call('EXISTS', p..'newest:'..dev) == 0 then
    redis.call('SET', p..'newest:'..dev, proc)
  end
  if was == 0 then redis.call('PUBLISH', p..'presence', cmsgpack.pack({dev, true})) end
end
return 1
"""

_REAP: Final = (
    """
local p, proc = ARGV[1], ARGV[2]
if redis.call('EXISTS', p..'alive:'..proc) == 1 then return -1 end
local devs = redis.call('SMEMBERS', p..'procdevs:'..proc)
for _, dev in ipairs(devs) do
  local key = p..'presence:'..dev
  redis.call('HDEL', key, proc)
"""
    + _PROCESS_GONE
    + """end
redis.call('DEL', p..'procdevs:'..proc)
redis.call('SREM', p..'procs', proc)
return #devs
"""
)

_LOCATE: Final = """
local p, dev = ARGV[1], ARGV[2]
local newest = redis.call('GET', p..'newest:'..dev)
if newest and redis.call('HEXISTS', p..'presence:'..dev, newest) == 1 then return newest end
local any = redis.call('HKEYS', p..'presence:'..dev)
return any[1] or false
"""


def connect(url: str) -> coredis.Redis[bytes]:
    """A coredis client for ``url`` with short timeouts and no retries: a relay that
    loses Redis must learn it at once (and refuse logins), not hang in a retry loop."""
    host, port, db = parse_redis_url(url)
    return coredis.Redis(
        host=host,
        port=port,
        db=db,
        stream_timeout=TIMEOUT,
        connect_timeout=TIMEOUT,
        retry_policy=NoRetryPolicy(),
        decode_responses=False,
        verify_version=False,
        max_connections=POOL,
        pool_timeout=TIMEOUT,
    )


_REDIS_FAILURES: Final = (RedisError, OSError, trio.TooSlowError, ExceptionGroup)
"""What a Redis call may raise when Redis is gone or slow (coredis runs some of its work
in nurseries of its own, so a lost connection can come as an exception group)."""


def key_prefix(relay_id: str) -> str:
    return f"p2p:{relay_id}:"


class _Scripts:
    """The Lua scripts, registered once per client (coredis loads them on first use)."""

    def __init__(self, client: coredis.Redis[bytes]) -> None:
        def script(body: str) -> Any:
            return client.register_script(_LIB + body)

        self.post = script(_POST)
        self.fetch = script(_FETCH)
        self.ack = script(_ACK)
        self.purge = script(_PURGE)
        self.up = script(_UP)
        self.down = script(_DOWN)
        self.resync = script(_RESYNC)
        self.reap = script(_REAP)
        self.locate = script(_LOCATE)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisMailStore:
    """:class:`~p2p.relay.backend.MailStore` in Redis (see the module for the keys)."""

    def __init__(self, client: coredis.Redis[bytes], relay_id: str, quota: MailQuota) -> None:
        self.client = client
        self.prefix = key_prefix(relay_id)
        self.quota = quota
        self._scripts = _Scripts(client)
        self._where = "redis"

    @property
    def where(self) -> str:
        return self._where

    async def _run(self, script: Any, args: Sequence[object]) -> Any:
        try:
            with trio.fail_after(TIMEOUT * 2):
                return await script(args=[self.prefix, *args])
        except _REDIS_FAILURES as exc:
            raise StoreError(f"relay mail in Redis: {type(exc).__name__}: {exc}") from exc

    async def post(
        self, recipient: str, sender: str, mail_id: bytes, data: bytes, now: float
    ) -> str:
        q = self.quota
        if len(data) > q.max_mail:
            return "too_large"
        if not data:
            return "empty"
        if recipient == sender:
            return "self"
        code = await self._run(
            self._scripts.post,
            [
                recipient,
                sender,
                mail_id,
                data,
                repr(float(now)),
                q.mailbox_count,
                q.mailbox_bytes,
                q.sender_count,
                q.sender_bytes,
                q.total_count,
                q.total_bytes,
            ],
        )
        return _text(code)

    async def fetch(self, recipient: str, after: int, limit: int, now: float) -> list[StoredMail]:
        flat = await self._run(self._scripts.fetch, [recipient, after, limit])
        good: list[StoredMail] = []
        bad: list[bytes] = []
        cutoff = now - self.quota.ttl
        for i in range(0, len(flat) - 3, 4):
            seq, mail_id, meta, data = flat[i : i + 4]
            sender, created = _parse_meta(meta)
            if (
                type(mail_id) is bytes
                and len(mail_id) == MAIL_ID_BYTES
                and is_device_id(sender)
                and created is not None
                and type(data) is bytes
                and 0 < len(data) <= MAX_PAYLOAD
            ):
                if created > cutoff:
                    good.append(StoredMail(seq=int(seq), id=mail_id, sender=sender, data=data))
            elif isinstance(mail_id, bytes):
                bad.append(mail_id)
        if bad:
            log.warning("deleting %d malformed mail items for %s", len(bad), recipient)
            await self.ack(recipient, bad)
        return good

    async def ack(self, recipient: str, ids: Sequence[bytes]) -> int:
        wanted = list(dict.fromkeys(ids))
        if not wanted:
            await trio.lowlevel.checkpoint()
            return 0
        return int(await self._run(self._scripts.ack, [recipient, *wanted]))

    async def purge(self, now: float) -> int:
        purged = 0
        while True:
            seen, gone = await self._run(
                self._scripts.purge, [repr(float(now - self.quota.ttl)), PURGE_PAGE]
            )
            purged += int(gone)
            if int(seen) < PURGE_PAGE:
                return purged

    async def totals(self) -> tuple[int, int]:
        try:
            with trio.fail_after(TIMEOUT * 2):
                values = await self.client.hmget(self.prefix + "q:t", ["c", "b"])
        except _REDIS_FAILURES as exc:
            raise StoreError(f"relay mail in Redis: {exc}") from exc
        return tuple(int(v or 0) for v in values)  # type: ignore[return-value]

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


def _parse_meta(meta: object) -> tuple[str, float | None]:
    if type(meta) is not bytes:
        return "", None
    parts = meta.split(b" ")
    if len(parts) != 3:
        return "", None
    try:
        return parts[0].decode("ascii"), float(parts[1])
    except (UnicodeDecodeError, ValueError):
        return "", None


class _Outbox:
    """Messages queued for one other process, in order, bounded by bytes."""

    def __init__(self) -> None:
        self.items: deque[bytes] = deque()
        self.bytes = 0
        self.has_items = trio.lowlevel.ParkingLot()
        self.has_room = trio.lowlevel.ParkingLot()
        self.closed = False

    def append(self, item: bytes) -> None:
        if self.closed:
            return
        self.items.append(item)
        self.bytes += len(item)
        self.has_items.unpark()

    async def put(self, item: bytes) -> None:
        while self.bytes >= OUTBOX_BYTES and not self.closed:
            await self.has_room.park()
        if not self.closed:
            self.append(item)
        await trio.lowlevel.checkpoint()

    def close(self) -> None:
        """The process it went to is gone: drop what waits, end the sender."""
        self.closed = True
        self.items.clear()
        self.bytes = 0
        self.has_items.unpark_all()
        self.has_room.unpark_all()

    async def batch(self) -> list[bytes]:
        """The next messages to publish, at most a batch; [] once closed."""
        while not self.items and not self.closed:
            await self.has_items.park()
        if self.closed:
            return []
        out: list[bytes] = []
        size = 0
        while self.items and len(out) < BATCH_ITEMS and size < BATCH_BYTES:
            item = self.items.popleft()
            size += len(item)
            out.append(item)
        self.bytes -= size
        self.has_room.unpark_all()
        return out


class RedisCluster:
    """One process's membership of a relay cluster (see the module for the design).

    ``on_message(proc, message)`` gets each bus message from another process, and
    ``on_presence(device, online)`` each cluster-wide presence change; both are called on
    the subscriber task and must not block. ``local_devices()`` says how many
    connections each device has on this process (used to rebuild this process's share
    of presence after Redis was lost). ``on_lost(procs)`` is called when messages to or
    from those processes may have been lost (None: all of them): close their pipes.
    ``on_recovered()`` after a resync with a Redis that was lost (wake the mail pumps).
    ``subscriber`` is a second client for the subscription (see :func:`connect`).
    """

    def __init__(
        self,
        client: coredis.Redis[bytes],
        relay_id: str,
        *,
        subscriber: coredis.Redis[bytes] | None = None,
        on_message: Callable[[str, list[Any]], None],
        on_presence: Callable[[str, bool], None],
        local_devices: Callable[[], dict[str, int]],
        on_lost: Callable[[set[str] | None], None],
        on_recovered: Callable[[], None],
    ) -> None:
        self.client = client
        self.subscriber = subscriber or client
        """The client whose connection follows the bus: a client of its own (sharing
        one with commands made each publish wait ~8 ms on this machine)."""
        self.prefix = key_prefix(relay_id)
        self.proc_id = secrets.token_hex(6)
        self._scripts = _Scripts(client)
        self._on_message = on_message
        self._on_presence = on_presence
        self._local_devices = local_devices
        self._on_lost = on_lost
        self._on_recovered = on_recovered
        self._healthy = False
        self._alive: set[str] = set()
        self._outboxes: dict[str, _Outbox] = {}
        self._nursery: trio.Nursery | None = None
        self._run_id = b""
        self._need_resync = True
        self.stats = {"redis_failures": 0, "resyncs": 0, "bus_sent": 0, "bus_received": 0}

    # ---- state --------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return self._healthy

    @property
    def processes(self) -> int:
        """Live processes at the last sweep, this one included."""
        return len(self._alive | {self.proc_id})

    def _channel(self, proc: str) -> str:
        return f"{self.prefix}proc:{proc}"

    async def _call(self, script: Any, *args: object) -> Any:
        """Run a script; StoreError if Redis does not answer. Whether Redis is lost is
        for the heartbeat to say (a slow answer under load is not a lost Redis)."""
        try:
            with trio.fail_after(TIMEOUT * 2):
                return await script(args=[self.prefix, *args])
        except _REDIS_FAILURES as exc:
            raise StoreError(f"relay cluster: Redis unavailable: {exc}") from exc

    def _lost(self, why: str) -> None:
        if self._healthy:
            self.stats["redis_failures"] += 1
            log.warning("relay cluster: lost Redis (%s); refusing logins until it is back", why)
            self._healthy = False
            self._on_lost(None)
        self._need_resync = True

    # ---- running --------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Join the cluster and keep this process's part of it until cancelled. Started
        once Redis answered (RelayError if it does not within a few seconds)."""
        deadline = trio.current_time() + 10 * TIMEOUT
        while not await self._heartbeat():
            if trio.current_time() > deadline:
                raise RelayError("cannot reach Redis: the relay cluster cannot start")
            await trio.sleep(0.2)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._subscriber)
            nursery.start_soon(self._heartbeats)
            nursery.start_soon(self._sweeper)
            task_status.started()
        # (the nursery only ends by cancellation)

    async def leave(self) -> None:
        """Leave the cluster cleanly (on shutdown): our devices go offline at once
        rather than when our ``alive`` key expires."""
        with trio.move_on_after(TIMEOUT), trio.CancelScope(shield=True):
            try:
                await self.client.delete([self.prefix + "alive:" + self.proc_id])
                await self._scripts.reap(args=[self.prefix, self.proc_id])
            except _REDIS_FAILURES:
                pass

    async def _heartbeat(self) -> bool:
        """Refresh our ``alive`` key (after a loss: rebuild our presence first)."""
        try:
            with trio.fail_after(TIMEOUT * 2):
                info = await self.client.info("server")
                run_id = str(info.get("run_id", "")).encode()
                if run_id != self._run_id:
                    if self._run_id:
                        log.warning("relay cluster: Redis restarted; rebuilding presence")
                        self._on_lost(None)
                    self._run_id = run_id
                    self._need_resync = True
                if self._need_resync:
                    args: list[object] = [self.prefix, self.proc_id, int(ALIVE_FOR * 1000)]
                    for device, count in self._local_devices().items():
                        args += [device, count]
                    await self._scripts.resync(args=args)
                    self.stats["resyncs"] += 1
                else:
                    await self.client.set(
                        self.prefix + "alive:" + self.proc_id, b"1", px=int(ALIVE_FOR * 1000)
                    )
        except _REDIS_FAILURES as exc:
            self._lost(f"{type(exc).__name__}: {exc}")
            return False
        if not self._healthy:
            recovered = self._need_resync and self.stats["resyncs"] > 1
            self._healthy = True
            if recovered:
                log.warning("relay cluster: Redis is back; accepting logins again")
                self._on_recovered()
        self._need_resync = False
        return True

    async def _heartbeats(self) -> None:
        while True:
            await trio.sleep(HEARTBEAT)
            await self._heartbeat()

    async def _sweeper(self) -> None:
        while True:
            await trio.sleep(SWEEP)
            if not self._healthy:
                continue
            try:
                with trio.fail_after(TIMEOUT * 2):
                    procs = [_text(p) for p in await self.client.smembers(self.prefix + "procs")]
                    alive = set()
                    for proc in procs:
                        if proc == self.proc_id:
                            continue
                        if await self.client.exists([self.prefix + "alive:" + proc]):
                            alive.add(proc)
                        else:
                            reaped = await self._scripts.reap(args=[self.prefix, proc])
                            if int(reaped) >= 0:
                                log.warning(
                                    "relay cluster: process %s is gone (%d devices offline)",
                                    proc,
                                    int(reaped),
                                )
            except _REDIS_FAILURES as exc:
                self._lost(f"{type(exc).__name__}: {exc}")
                continue
            dead = (self._alive | set(self._outboxes)) - alive
            self._alive = alive
            if dead:
                for proc in dead:
                    box = self._outboxes.pop(proc, None)
                    if box is not None:
                        box.close()
                self._on_lost(dead)

    async def _subscriber(self) -> None:
        """Follow our bus channel and the presence channel; after any loss of the
        subscription, everything that may have been missed is treated as lost."""
        while True:
            try:
                async with self.subscriber.pubsub(
                    channels=[self._channel(self.proc_id), self.prefix + "presence"],
                    retry_policy=NoRetryPolicy(),
                    ignore_subscribe_messages=True,
                ) as pubsub:
                    self._need_resync = True  # presence may have moved while unsubscribed
                    async for message in pubsub:
                        if message["type"] == "message":
                            self._dispatch(message["channel"], message["data"])
            except Exception as exc:  # coredis wraps some failures in exception groups
                self._lost(f"subscription ended: {type(exc).__name__}")
            await trio.sleep(0.5)

    def _dispatch(self, channel: object, data: object) -> None:
        if type(data) is not bytes or len(data) > 2 * MAX_PAYLOAD:
            return
        try:
            message = msgpack.unpackb(data, raw=False, max_bin_len=MAX_PAYLOAD, max_str_len=512)
        except Exception:  # Redis is ours, but what it holds is input all the same
            log.warning("relay cluster: dropped an undecodable bus message")
            return
        if channel == (self.prefix + "presence").encode():
            if (
                isinstance(message, list)
                and len(message) == 2
                and is_device_id(message[0])
                and type(message[1]) is bool
            ):
                self._on_presence(message[0], message[1])
            return
        if not (isinstance(message, list) and len(message) >= 2 and isinstance(message[1], str)):
            log.warning("relay cluster: dropped a malformed bus message")
            return
        self.stats["bus_received"] += 1
        self._on_message(message[1], message)

    # ---- presence ---------------------------------------------------------------------

    async def device_up(self, device: str) -> None:
        await self._call(self._scripts.up, device, self.proc_id)

    async def device_down(self, device: str) -> None:
        await self._call(self._scripts.down, device, self.proc_id)

    async def online(self, devices: Iterable[str]) -> dict[str, bool]:
        wanted = list(devices)
        try:
            with trio.fail_after(TIMEOUT * 2):
                async with self.client.pipeline(transaction=False) as pipe:
                    results = [pipe.hlen(self.prefix + "presence:" + d) for d in wanted]
                counts = [await r for r in results]
        except _REDIS_FAILURES as exc:
            raise StoreError(f"relay cluster: Redis unavailable: {exc}") from exc
        return {d: int(n) > 0 for d, n in zip(wanted, counts, strict=True)}

    async def locate(self, device: str) -> str | None:
        proc = await self._call(self._scripts.locate, device)
        return None if proc is None or proc is False else _text(proc)

    # ---- the bus ----------------------------------------------------------------------

    def _outbox(self, proc: str) -> _Outbox:
        box = self._outboxes.get(proc)
        if box is None:
            box = self._outboxes[proc] = _Outbox()
            assert self._nursery is not None
            self._nursery.start_soon(self._sender, proc, box)
        return box

    async def send(self, proc: str, message: list[Any]) -> None:
        """Queue ``[kind, ...]`` for ``proc`` (our id is put second); in order per
        destination; waits while the queue towards it is full."""
        await self._outbox(proc).put(self._pack(message))

    def send_nowait(self, proc: str, message: list[Any]) -> None:
        self._outbox(proc).append(self._pack(message))

    def _pack(self, message: list[Any]) -> bytes:
        data: bytes = msgpack.packb([message[0], self.proc_id, *message[1:]], use_bin_type=True)
        return data

    async def _sender(self, proc: str, box: _Outbox) -> None:
        channel = self._channel(proc)
        while not box.closed:
            batch = await box.batch()
            if not batch:
                return
            try:
                with trio.fail_after(TIMEOUT * 2):
                    async with self.client.pipeline(transaction=False) as pipe:
                        for item in batch:
                            pipe.publish(channel, item)
                self.stats["bus_sent"] += len(batch)
            except _REDIS_FAILURES as exc:
                log.info("relay cluster: messages to %s lost: %s", proc, exc)
                box.items.clear()
                box.bytes = 0
                self._on_lost({proc})


__all__ = [
    "WINDOW_BYTES",
    "WINDOW_ITEMS",
    "RedisCluster",
    "RedisMailStore",
    "connect",
    "key_prefix",
    "parse_redis_url",
]
