"""LAN transport: TCP with a 4-byte big-endian length prefix per frame.

A length prefix above :data:`~p2p.proto.wire.MAX_FRAME` (or the smaller limit the caller
passes to ``receive``, e.g. during a handshake) is refused before any buffer is
allocated (FrameTooLarge), so a peer cannot make us hold more than one frame. Writes go
straight to the socket (``send_all``): a slow reader makes the sender wait, and the
node's bounded per-peer queue turns a peer that stays slow into a closed connection.
"""

from __future__ import annotations

import errno
from typing import Final

import trio

from p2p.errors import FrameTooLarge
from p2p.proto.wire import MAX_FRAME
from p2p.transport.base import ConnectionClosed, Handler, TransportError

PREFIX: Final = 4
CONNECT_TIMEOUT: Final = 5.0
RECEIVE_CHUNK: Final = 64 * 1024


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); TransportError if malformed."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise TransportError(f"not a HOST:PORT address: {address!r}")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise TransportError(f"port out of range in {address!r}")
    return host.removeprefix("[").removesuffix("]"), port


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def advertised_addresses(bound: str) -> list[str]:
    """Addresses a peer can dial to reach a listener bound at ``bound``.

    A wildcard bind (0.0.0.0 or ::) is reachable on every interface: list the IPv4
    addresses of the machine's interfaces, loopback last.
    """
    host, port = parse_address(bound)
    if host not in ("0.0.0.0", "::"):
        return [bound]
    import ifaddr

    found = [
        ip.ip for adapter in ifaddr.get_adapters() for ip in adapter.ips if isinstance(ip.ip, str)
    ]
    found.sort(key=lambda a: a.startswith("127."))
    return [format_address(a, port) for a in found] or [format_address("127.0.0.1", port)]


class TcpConnection:
    """One framed TCP connection."""

    def __init__(self, stream: trio.SocketStream, remote: str) -> None:
        self._stream = stream
        self._remote = remote
        self._buffer = bytearray()
        self._send_lock = trio.StrictFIFOLock()

    @property
    def remote(self) -> str:
        return self._remote

    async def send(self, frame: bytes) -> None:
        if len(frame) > MAX_FRAME:
            raise FrameTooLarge(len(frame), MAX_FRAME)
        async with self._send_lock:
            try:
                await self._stream.send_all(len(frame).to_bytes(PREFIX, "big") + frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise ConnectionClosed(f"connection to {self._remote} broke: {exc}") from exc

    async def _fill(self, size: int) -> None:
        while len(self._buffer) < size:
            try:
                chunk = await self._stream.receive_some(RECEIVE_CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise ConnectionClosed(f"connection to {self._remote} broke: {exc}") from exc
            if not chunk:
                raise ConnectionClosed(f"{self._remote} closed the connection")
            self._buffer += chunk

    async def receive(self, limit: int = MAX_FRAME) -> bytes:
        await self._fill(PREFIX)
        size = int.from_bytes(self._buffer[:PREFIX], "big")
        limit = min(limit, MAX_FRAME)
        if size > limit:  # refused on its prefix: nothing of it is read
            raise FrameTooLarge(size, limit)
        await self._fill(PREFIX + size)
        frame = bytes(self._buffer[PREFIX : PREFIX + size])
        del self._buffer[: PREFIX + size]
        return frame

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self._stream)


class TcpTransport:
    """Listens on ``listen`` (``HOST:PORT``; port 0 picks a free one) and dials peers."""

    def __init__(self, listen: str = "127.0.0.1:0") -> None:
        self._host, self._port = parse_address(listen)
        self._bound: str | None = None

    @property
    def address(self) -> str:
        if self._bound is None:
            raise TransportError("the TCP transport is not serving yet")
        return self._bound

    @property
    def port(self) -> int:
        return parse_address(self.address)[1]

    async def serve(
        self, handler: Handler, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            listeners = await trio.open_tcp_listeners(self._port, host=self._host)
        except OSError as exc:
            reason = "address in use" if exc.errno == errno.EADDRINUSE else str(exc)
            raise TransportError(f"cannot listen on {self._host}:{self._port}: {reason}") from exc
        host, port = listeners[0].socket.getsockname()[:2]
        self._bound = format_address(host, port)

        async def accept(stream: trio.SocketStream) -> None:
            peer = stream.socket.getpeername()
            await handler(TcpConnection(stream, format_address(peer[0], peer[1])))

        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, accept, listeners)
            task_status.started()

    async def dial(self, address: str) -> TcpConnection:
        host, port = parse_address(address)
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                stream = await trio.open_tcp_stream(host, port)
        except (OSError, trio.TooSlowError) as exc:
            raise TransportError(f"cannot reach {address}: {exc or 'timed out'}") from exc
        return TcpConnection(stream, address)
