"""Receipts: where each message has got to, from the receipts and read markers.

Rules:

- A device's delivery receipt in a chat states, per other author device, the newest
  ``ts`` of that device's messages it holds (:meth:`Receipts.body`); a message is
  delivered to a device when that device's receipt states its author's ``ts`` or later.
- A read marker states the newest ``ts`` a device has shown; it covers every message up
  to it.
- Only current member devices count, and their receipts and markers are verified like
  messages; a receipt body is bounded (size and nesting) before it is parsed.
- Status: ``read`` once a device of every other member account has read it,
  ``delivered`` once every current member device (other than its author) holds it,
  ``sent`` before.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from p2p.errors import WireError
from p2p.proto.model import MAX_BODY, READ_MARKERS, RECEIPTS, Message
from p2p.proto.wire import load_json
from p2p.state.directory import Part


@dataclass(frozen=True, kw_only=True)
class Delivery:
    """Where one message has got to: the devices holding it and those that showed it."""

    delivered_to: tuple[str, ...]
    """Current member devices (other than its author) whose receipt covers it."""
    waiting_for: tuple[str, ...]
    """Current member devices whose receipt does not cover it yet."""
    read_by: tuple[str, ...]
    """Devices whose read marker covers it."""
    status: str
    """``read`` (by a device of every other member account), ``delivered`` (to every
    current device of every member), or ``sent``."""


class Receipts(Part):
    """States this device's receipts and reads everyone's."""

    def body(self, space_id: str) -> str:
        """What our delivery receipt for a space states now: per other author device,
        the newest ``ts`` of its messages we hold (``""`` when there is none)."""
        newest = self._spaces.space(space_id).replica.newest_by_device()
        newest.pop(self._keys.device_id, None)
        return json.dumps(newest, sort_keys=True, separators=(",", ":")) if newest else ""

    def delivery(self, space_id: str, messages: list[Message]) -> dict[str, Delivery]:
        """Delivery state of each message, from the receipts and read markers of the
        space's current member devices (entries verified like messages)."""
        space = self._spaces.space(space_id)
        replica = space.replica
        directory = self._directory
        receipts: dict[str, dict[str, str]] = {}
        for e in replica.valid_entries(RECEIPTS, directory.any_signing_key, directory.belongs):
            try:  # a member's receipt: its nesting is bounded before parsing
                stated = (
                    load_json(e.body, what="receipt", max_size=MAX_BODY, max_depth=2)
                    if e.body
                    else {}
                )
            except WireError:
                continue
            if isinstance(stated, dict):
                receipts[e.device] = {str(k): str(v) for k, v in stated.items()}
        reads = {
            e.device: (e.account, e.body)
            for e in replica.valid_entries(
                READ_MARKERS, directory.any_signing_key, directory.belongs
            )
        }
        devices = directory.member_devices(space_id)
        out = {}
        for m in messages:
            others = sorted(devices - {m.device})
            got = tuple(d for d in others if receipts.get(d, {}).get(m.device, "") >= m.ts)
            read_by = tuple(
                sorted(d for d, (_, ts) in reads.items() if d != m.device and ts >= m.ts)
            )
            readers = {reads[d][0] for d in read_by}
            other_accounts = set(space.members) - {m.account}
            if other_accounts and other_accounts <= readers:
                status = "read"
            elif len(got) == len(others):
                status = "delivered"
            else:
                status = "sent"
            waiting = tuple(d for d in others if d not in got)
            out[m.id] = Delivery(
                delivered_to=got, waiting_for=waiting, read_by=read_by, status=status
            )
        return out
