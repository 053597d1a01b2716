"""``python -m p2p.relay`` (and ``p2p relay``): run a rendezvous relay until SIGINT/SIGTERM.

Once it accepts connections it prints one JSON line on stdout, flushed, so scripts and
tests can learn the port it bound::

    {"event": "listening", "address": "ws://127.0.0.1:7700", "id": "ws://127.0.0.1:7700"}

``address`` is where it listens; ``id`` is the name devices sign when they authenticate
(``--id``, by default the address), which must be the URL clients are configured with.
Exit codes as for every ``p2p`` command: 0 after a clean shutdown, 1 when the relay
cannot run (one line on stderr: address in use, unusable data folder...), 2 on a usage
error. Logs go to stderr: warnings (misbehaving clients) by default, more with ``-v``.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import fields
from functools import partial
from typing import Any

import trio

from p2p.errors import P2PError, RelayError
from p2p.relay.backend import parse_redis_url
from p2p.relay.metrics import serve_metrics
from p2p.relay.server import Limits, RelayServer, serve_relay
from p2p.transport.tcp import parse_address


def build_parser(prog: str = "p2p relay") -> argparse.ArgumentParser:
    """The relay's arguments; one ``--flag`` per :class:`Limits` field."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run a rendezvous relay: devices meet, pipe their end-to-end encrypted"
        " sessions and leave sealed mail for each other through it.",
    )
    parser.add_argument("--listen", required=True, metavar="HOST:PORT", help="port 0 picks one")
    parser.add_argument(
        "--data", metavar="DIR", help="folder for the mailbox (relay.db); default: memory only"
    )
    parser.add_argument(
        "--redis",
        metavar="URL",
        help="redis://HOST:PORT/DB: run as one process of a cluster sharing mail, presence"
        " and pipes through that Redis (docs/relay.md, 'Running a cluster')",
    )
    parser.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve /healthz and Prometheus /metrics for this process there (plain HTTP;"
        " keep it on a private address)",
    )
    parser.add_argument(
        "--id",
        metavar="URL",
        help="the relay's name in device auth: the URL clients use (default: ws://HOST:PORT)",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v info, -vv debug")
    group = parser.add_argument_group("limits")
    defaults = Limits()
    for f in fields(Limits):
        default = getattr(defaults, f.name)
        group.add_argument(
            "--" + f.name.replace("_", "-"),
            type=type(default),
            default=default,
            metavar="N" if isinstance(default, int) else "SECONDS",
            help=f"{f.metadata['help']} Default: {default:_}.",
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the relay with command-line ``argv`` (without the program name)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        host, port = parse_address(args.listen)
        metrics = parse_address(args.metrics) if args.metrics else None
        limits = Limits(**{f.name: getattr(args, f.name) for f in fields(Limits)})
        limits.check()
        if args.redis is not None:
            parse_redis_url(args.redis)
            if args.data is not None:
                raise RelayError("--data and --redis are exclusive (mail lives in one of them)")
    except P2PError as exc:
        print(f"p2p relay: {exc}", file=sys.stderr)
        return 2
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        trio.run(_run, host, port, args.data, args.id, limits, args.redis, metrics)
    except P2PError as exc:
        print(f"p2p relay: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


async def _run(
    host: str,
    port: int,
    data: str | None,
    relay_id: str | None,
    limits: Limits,
    redis: str | None = None,
    metrics: tuple[str, int] | None = None,
) -> None:
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                server: RelayServer = await nursery.start(
                    partial(
                        serve_relay,
                        host,
                        port,
                        data_dir=data,
                        relay_id=relay_id,
                        limits=limits,
                        redis_url=redis,
                    )
                )
                event: dict[str, Any] = {
                    "event": "listening",
                    "address": server.url,
                    "id": server.relay_id,
                }
                if server.cluster is not None:
                    event["process"] = server.cluster.proc_id
                if metrics is not None:
                    event["metrics"] = await nursery.start(serve_metrics, server, *metrics)
                _say(event)
                async for _ in signals:
                    break
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise _first(group) from None


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error worth reporting inside a nursery's exception group."""
    exc: BaseException
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first(exc)
        if not isinstance(exc, trio.Cancelled):
            return exc
    return group


def _say(event: dict[str, Any]) -> None:
    print(json.dumps(event), flush=True)


if __name__ == "__main__":
    sys.exit(main())
