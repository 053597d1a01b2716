"""The shared transport acceptance suite (tests/test_transport.py), run over the relay.

The suite's tests are imported unchanged; only ``make_pair`` is ours: two RelayClients of
a relay process that lives as long as this module. The suite dials from a transport it
never served, while a RelayClient dials through the websocket that ``serve`` keeps, so
the pair's transports are thin wrappers: ``serve`` returns once connected to the relay
(the suite dials right after), and the dialing side's ``dial`` starts its client first,
as a system task that lives until the test's ``trio.run`` ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from procs import Relay
from test_transport import (
    Pair,
    test_a_frame_near_the_limit_passes,
    test_closing_one_end_ends_the_other,
    test_dialing_nothing_is_a_transport_error,
    test_frames_arrive_whole_and_in_order_both_ways,
)

from p2p.proto.identity import DeviceKeys
from p2p.transport.base import Connection, Handler
from p2p.transport.relay import RelayClient, RelayPipe

pytestmark = pytest.mark.slow

__all__ = [  # collected here, with this module's make_pair
    "test_a_frame_near_the_limit_passes",
    "test_closing_one_end_ends_the_other",
    "test_dialing_nothing_is_a_transport_error",
    "test_frames_arrive_whole_and_in_order_both_ways",
]


class SuiteTransport:
    """A RelayClient as the suite drives a transport (see the module docstring)."""

    def __init__(self, client: RelayClient) -> None:
        self.client = client
        self._started = False

    @property
    def address(self) -> str:
        return self.client.address

    async def serve(
        self, handler: Handler, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        self._started = True
        async with trio.open_nursery() as nursery:
            await nursery.start(self.client.serve, handler)
            with trio.fail_after(10):
                await self.client.wait_connected()
            task_status.started()

    async def dial(self, address: str) -> RelayPipe:
        if not self._started:
            self._started = True
            trio.lowlevel.spawn_system_task(self.client.serve, _refuse)
            with trio.fail_after(10):
                await self.client.wait_connected()
        return await self.client.dial(address)


async def _refuse(conn: Connection) -> None:
    await conn.aclose()


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    process = Relay(Path(tmp_path_factory.mktemp("relay")) / "data")
    yield process
    assert process.alive  # nothing the suite did brought it down
    process.stop()


@pytest.fixture
def make_pair(relay: Relay) -> Pair:
    def pair() -> tuple[SuiteTransport, SuiteTransport]:
        return (
            SuiteTransport(RelayClient(relay.url, DeviceKeys.generate())),
            SuiteTransport(RelayClient(relay.url, DeviceKeys.generate())),
        )

    return pair  # type: ignore[return-value]
