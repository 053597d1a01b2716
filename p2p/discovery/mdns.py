"""mDNS discovery on the LAN (zeroconf), private to the account's own devices.

Privacy: anyone on the LAN sees every mDNS announcement, so ours carries nothing a
stranger could link to an account or a device, within a run or across runs. The instance
and host names are random per run (never the device id or the machine's hostname), and the
TXT record holds only ``v`` (format version), ``n`` (a fresh random nonce) and ``t`` =
BLAKE2b(nonce || device id, key=discovery secret, 16 bytes). The discovery secret
(:meth:`p2p.state.device.DeviceState.discovery_key`) is known only to the account's current
devices, so only they can tell which of their own devices a service is, by recomputing
``t`` for each linked device id. Everyone else sees random bytes that change every run.
A service is only a hint where to dial: the transport's handshake still authenticates.

Threading: zeroconf runs its own asyncio loop on its own thread. Opening and closing it
block, so they run in ``trio.to_thread.run_sync``. Registration (~1.6 s of probing) and
each resolve run as coroutines on zeroconf's loop, waited for in a worker thread with a
timeout; when trio cancels, that future is cancelled too, so the worker returns at once
(a node cancelled while probing does not wait for the probe to end). The
``ServiceBrowser`` handler runs on zeroconf's browser thread and only hands ``(name,
change)`` to trio with ``trio.from_thread.run_sync`` (a non-blocking ``send_nowait`` into a
bounded channel; overflow is dropped, never waited on). On cancellation the browser is
stopped and zeroconf closed (which sends goodbyes for our service) in a shielded worker
thread: no thread outlives :meth:`MdnsDiscovery.run`.

Queries ask for multicast answers (QM), not zeroconf's default unicast-response (QU)
first query: when several mDNS stacks share a host (processes on 127.0.0.1 in tests,
avahi next to us on a laptop), the kernel hands a unicast reply to port 5353 to just one
of the sockets bound there, often the responder's own, so the answer is lost and a peer
that was already running is found only by the next query, a second later (measured on
loopback: ~1.1 s with QU, ~0.15 s with QM).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import secrets
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, TypeVar

import ifaddr
import trio
from zeroconf import (
    DNSQuestionType,
    InterfaceChoice,
    ServiceBrowser,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)

from p2p.discovery.base import Found

__all__ = ["MdnsDiscovery", "txt_tag"]

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_SERVICE_TYPE = "_p2p-sync._tcp.local."
TXT_VERSION = b"1"
NONCE_BYTES = 16
TAG_BYTES = 16
REGISTER_TIMEOUT = 10.0
"""Seconds for probing and announcing (~1.6 s normally)."""
RESOLVE_TIMEOUT = 3.0
"""Seconds to wait for a service's SRV/TXT/A records."""
MAX_TXT_BYTES = 255
"""Our record is ~80 bytes; anything much larger is not ours."""
MAX_TXT_KEYS = 8
MAX_ADDRESSES = 8
"""Addresses reported per service (a stranger could announce hundreds)."""
MAX_PENDING_EVENTS = 1024
"""Browser events queued for trio; beyond this they are dropped (a flood)."""
MAX_TRACKED_SERVICES = 1024
"""Services remembered for update detection; beyond this, new ones are not tracked."""
MAX_CONCURRENT_RESOLVES = 8


def txt_tag(secret: bytes, nonce: bytes, device_id: str) -> bytes:
    """``t`` of the TXT record: BLAKE2b(nonce || device id) keyed with the secret."""
    return hashlib.blake2b(
        nonce + device_id.encode("utf-8"), key=secret, digest_size=TAG_BYTES
    ).digest()


async def _on_loop(
    zc: Zeroconf,
    coro: Coroutine[Any, Any, T],
    seconds: float,
    limiter: trio.CapacityLimiter | None = None,
) -> T:
    """Run ``coro`` on zeroconf's event loop; wait for it in a worker thread.

    On trio cancellation the worker is abandoned and the future cancelled, which cancels
    the coroutine on zeroconf's loop and wakes the worker at once: no thread lingers.
    Raises ``TimeoutError`` after ``seconds`` (the coroutine is cancelled too).
    """
    loop = zc.loop
    if loop is None or loop.is_closed():
        coro.close()
        raise RuntimeError("zeroconf is not running")
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        return await trio.to_thread.run_sync(
            future.result, seconds, abandon_on_cancel=True, limiter=limiter
        )
    finally:
        future.cancel()


async def _register(zc: Zeroconf, info: ServiceInfo) -> None:
    """Probe for the name, then announce; done once the announcements are sent."""
    broadcast = await zc.async_register_service(info)
    await broadcast


def _hex_field(props: dict[bytes, bytes | None], key: bytes, size: int) -> bytes | None:
    value = props.get(key)
    if value is None or len(value) != 2 * size:
        return None
    try:
        raw = bytes.fromhex(value.decode("ascii"))
    except ValueError:  # UnicodeDecodeError is a ValueError
        return None
    return raw if len(raw) == size else None  # fromhex skips whitespace


def _format_address(host: str, port: int) -> str | None:
    """``host:port`` (``[host]:port`` for IPv6), or None for an unusable address."""
    scope = ""
    if "%" in host:
        host, scope = host.split("%", 1)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if ip.is_unspecified or ip.is_multicast:
        return None
    if ip.version == 6:
        return f"[{ip}{'%' + scope if scope else ''}]:{port}"
    return f"{ip}:{port}"


class MdnsDiscovery:
    """Advertise this device on the LAN and report the account's other devices found there.

    ``secret`` is :meth:`p2p.state.device.DeviceState.discovery_key`; ``linked`` returns the
    current device ids of the account (called on every match, as the list changes);
    ``interfaces`` is None for all interfaces, else a list of addresses to bind to
    (``["127.0.0.1"]`` in tests).
    """

    def __init__(
        self,
        *,
        port: int,
        device_id: str,
        secret: bytes,
        linked: Callable[[], Iterable[str]],
        interfaces: list[str] | None = None,
        service_type: str = DEFAULT_SERVICE_TYPE,
    ) -> None:
        if not 0 < port < 65536:
            raise ValueError(f"port out of range: {port}")
        if not 16 <= len(secret) <= 64:
            raise ValueError("discovery secret must be 16..64 bytes")
        if interfaces is not None and not interfaces:
            raise ValueError("interfaces must be None (all) or a non-empty list")
        self.port = port
        self.device_id = device_id
        self._secret = bytes(secret)
        self._linked = linked
        self.interfaces = list(interfaces) if interfaces is not None else None
        self.service_type = service_type
        label = secrets.token_hex(8)
        self.instance_name = f"{label}.{service_type}"
        """Random per run: says nothing about the device."""
        self._server = f"p2p-{label}.local."
        self._nonce = secrets.token_bytes(NONCE_BYTES)
        self._known: dict[str, frozenset[str]] = {}
        """Service name -> the addresses last reported for it."""
        self._limiter = trio.CapacityLimiter(MAX_CONCURRENT_RESOLVES)

    # ---- what we announce --------------------------------------------------------

    def txt(self) -> dict[str, str]:
        """The TXT record: nothing linkable across runs without the secret."""
        return {
            "v": TXT_VERSION.decode(),
            "n": self._nonce.hex(),
            "t": txt_tag(self._secret, self._nonce, self.device_id).hex(),
        }

    def _advertised_addresses(self) -> list[str]:
        if self.interfaces is not None:
            return list(self.interfaces)
        found: list[str] = []
        loopback: list[str] = []
        for adapter in ifaddr.get_adapters():
            for ip in adapter.ips:
                if not ip.is_IPv4 or not isinstance(ip.ip, str):
                    continue
                (loopback if ip.ip.startswith("127.") else found).append(ip.ip)
        # A peer on the LAN cannot dial our loopback: announce it only when alone.
        return sorted(set(found)) or sorted(set(loopback))

    def _service_info(self) -> ServiceInfo:
        return ServiceInfo(
            self.service_type,
            self.instance_name,
            port=self.port,
            properties=self.txt(),
            server=self._server,
            parsed_addresses=self._advertised_addresses(),
        )

    # ---- what we accept ----------------------------------------------------------

    def match(self, props: dict[bytes, bytes | None]) -> str | None:
        """The linked device (not us) that a TXT record names, or None."""
        if len(props) > MAX_TXT_KEYS or props.get(b"v") != TXT_VERSION:
            return None
        nonce = _hex_field(props, b"n", NONCE_BYTES)
        tag = _hex_field(props, b"t", TAG_BYTES)
        if nonce is None or tag is None:
            return None
        for device in self._linked():
            if device == self.device_id:
                continue
            if hmac.compare_digest(txt_tag(self._secret, nonce, device), tag):
                return device
        return None

    def _addresses(self, info: ServiceInfo) -> frozenset[str]:
        port = info.port
        if port is None or not 0 < port < 65536:
            return frozenset()
        out: list[str] = []
        for host in info.parsed_scoped_addresses()[:MAX_ADDRESSES]:
            formatted = _format_address(host, port)
            if formatted is not None:
                out.append(formatted)
        return frozenset(out)

    # ---- the task ----------------------------------------------------------------

    async def run(
        self,
        found: trio.MemorySendChannel[Found],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Announce, browse and report linked devices into ``found`` until cancelled."""
        token = trio.lowlevel.current_trio_token()
        events_in, events_out = trio.open_memory_channel[tuple[str, ServiceStateChange]](
            MAX_PENDING_EVENTS
        )

        def enqueue(name: str, change: ServiceStateChange) -> None:  # in trio
            try:
                events_in.send_nowait((name, change))
            except trio.WouldBlock:
                log.debug("mdns: event queue full, dropped %s for %r", change.name, name)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass

        def on_change(
            zeroconf: Zeroconf,
            service_type: str,
            name: str,
            state_change: ServiceStateChange,
        ) -> None:  # on zeroconf's browser thread
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(enqueue, name, state_change, trio_token=token)

        info = self._service_info()
        zc = await trio.to_thread.run_sync(self._open)
        browser: ServiceBrowser | None = None
        try:
            browser = await trio.to_thread.run_sync(
                lambda: ServiceBrowser(
                    zc, self.service_type, handlers=[on_change], question_type=DNSQuestionType.QM
                )
            )
            async with trio.open_nursery() as nursery:
                # Events the browser sees while we probe wait in the channel.
                nursery.start_soon(self._consume, zc, events_out, found)
                await _on_loop(zc, _register(zc, info), REGISTER_TIMEOUT)
                log.debug("mdns: registered %s on %s", info.name, info.parsed_addresses())
                task_status.started()
        finally:
            events_in.close()
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._shutdown, zc, browser)

    def _open(self) -> Zeroconf:
        interfaces = InterfaceChoice.All if self.interfaces is None else list(self.interfaces)
        return Zeroconf(interfaces=interfaces, use_asyncio=False)

    @staticmethod
    def _shutdown(zc: Zeroconf, browser: ServiceBrowser | None) -> None:  # worker thread
        try:
            if browser is not None:
                browser.cancel()
        except Exception:
            log.warning("mdns: error while stopping the browser", exc_info=True)
        finally:
            zc.close()  # sends goodbyes for our service if it got registered

    async def _consume(
        self,
        zc: Zeroconf,
        events: trio.MemoryReceiveChannel[tuple[str, ServiceStateChange]],
        found: trio.MemorySendChannel[Found],
    ) -> None:
        inflight: dict[str, bool] = {}
        """Services being resolved -> whether another event arrived meanwhile."""
        async with trio.open_nursery() as nursery:
            async for name, change in events:
                if name == self.instance_name:
                    continue
                if change is ServiceStateChange.Removed:
                    self._known.pop(name, None)
                    continue
                if name in inflight:
                    inflight[name] = True
                    continue
                inflight[name] = False
                nursery.start_soon(self._resolve_loop, zc, name, inflight, found)

    async def _resolve_loop(
        self,
        zc: Zeroconf,
        name: str,
        inflight: dict[str, bool],
        found: trio.MemorySendChannel[Found],
    ) -> None:
        try:
            while True:
                info = await self._resolve(zc, name)
                if info is not None:
                    await self._check(name, info, found)
                if not inflight.get(name):
                    return
                inflight[name] = False
        finally:
            inflight.pop(name, None)

    async def _resolve(self, zc: Zeroconf, name: str) -> ServiceInfo | None:
        info = ServiceInfo(self.service_type, name)
        request = info.async_request(zc, int(RESOLVE_TIMEOUT * 1000), DNSQuestionType.QM)
        try:
            ok = await _on_loop(zc, request, RESOLVE_TIMEOUT + 0.5, self._limiter)
        except (TimeoutError, concurrent.futures.CancelledError):
            ok = False
        except Exception:
            log.debug("mdns: resolving %r failed", name, exc_info=True)
            ok = False
        if not ok:
            log.debug("mdns: could not resolve %r", name)
            return None
        return info

    async def _check(
        self, name: str, info: ServiceInfo, found: trio.MemorySendChannel[Found]
    ) -> None:
        if len(info.text) > MAX_TXT_BYTES:
            log.debug("mdns: ignoring %r: TXT of %d bytes", name, len(info.text))
            return
        device = self.match(info.properties)
        if device is None:
            log.debug("mdns: ignoring %r: not a linked device", name)
            return
        addresses = self._addresses(info)
        if not addresses:
            log.debug("mdns: ignoring %r (%s): no usable address", name, device)
            return
        if self._known.get(name) == addresses:
            return
        if name not in self._known and len(self._known) >= MAX_TRACKED_SERVICES:
            log.debug("mdns: too many services tracked; %r reported untracked", name)
        else:
            self._known[name] = addresses
        for address in sorted(addresses, key=lambda a: (a.startswith("["), a)):
            log.debug("mdns: found %s at %s", device, address)
            await found.send(Found(address=address, source="mdns", device=device))
