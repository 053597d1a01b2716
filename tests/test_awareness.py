"""Typing and presence: ephemeral, rate-limited, carried over live sessions only."""

from __future__ import annotations

import trio
import trio.testing

from p2p import events as ev
from p2p import testing
from p2p.runtime.node import TYPING_REFRESH, TYPING_TTL


def run(fn: object) -> None:
    trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))  # type: ignore[arg-type]


def typing_events(channel: trio.MemoryReceiveChannel[ev.Event]) -> list[ev.Typing]:
    out = []
    while True:
        try:
            event = channel.receive_nowait()
        except trio.WouldBlock:
            return out
        if isinstance(event, ev.Typing):
            out.append(event)


def test_typing_on_every_keystroke_sends_little_and_expires_without_a_refresh() -> None:
    async def scenario() -> None:
        async with testing.cluster(2) as c:
            phone, laptop = c.nodes
            await c.settle()
            with trio.fail_after(30):
                while laptop.device_id not in phone.connected_peers:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            chat = laptop.default_chat()
            events = phone.subscribe()
            sent_before = laptop.traffic()["frames_out"]
            for _ in range(200):  # a fast typist, one call per keystroke
                laptop.set_typing(chat)
                await trio.sleep(0.01)
            await trio.sleep(0.5)
            frames = laptop.traffic()["frames_out"] - sent_before
            assert frames <= 2 * (1 + 2 / TYPING_REFRESH) + 2  # refreshes, plus pings
            seen = typing_events(events)
            assert seen == [ev.Typing(chat=chat, device=laptop.device_id, typing=True)]
            assert phone.typing(chat) == [laptop.device_id]
            # the typist goes quiet without saying so: the phone stops showing it
            await trio.sleep(TYPING_TTL + 1)
            assert typing_events(events) == [
                ev.Typing(chat=chat, device=laptop.device_id, typing=False)
            ]
            assert phone.typing(chat) == []
            # presence: online while the session is up, last seen after
            row = next(p for p in phone.presence() if p.device == laptop.device_id)
            assert row.online is True
            # nothing of it was stored
            assert not [n for n in phone.store.names("") if "typing" in n]

    run(scenario)
