"""The JSON shapes of what the node reports: what ``p2p ... --json`` prints and the
control socket answers.

The node's API returns typed values (:mod:`p2p.runtime.views`); turning them into the
documented JSON (key names, lists for tuples, the log's attachment descriptions) happens
here, on the application's side, so the two can change separately.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from p2p.media.service import MediaService
from p2p.runtime.views import ChatSummary, Contact, DevicePresence, Logged, NodeStatus


def _lists(value: Any) -> Any:
    """Tuples as lists, all the way down (what JSON has)."""
    if isinstance(value, tuple | list):
        return [_lists(v) for v in value]
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    return value


def status_json(status: NodeStatus) -> dict[str, Any]:
    """``p2p status --json``."""
    shaped: dict[str, Any] = _lists(asdict(status))
    for peer in shaped["peers"]:
        peer["connected_for"] = round(peer["connected_for"], 3)
    return shaped


def contacts_json(contacts: list[Contact]) -> list[dict[str, Any]]:
    """``p2p contacts --json``: id, name, the contact's current devices."""
    return [_lists(asdict(c)) for c in contacts]


def chats_json(chats: list[ChatSummary]) -> list[dict[str, Any]]:
    """``p2p chats --json``: id, name, key epoch, member accounts with their names."""
    return [_lists(asdict(c)) for c in chats]


def presence_json(presence: list[DevicePresence]) -> list[dict[str, Any]]:
    return [asdict(p) for p in presence]


def log_json(media: MediaService, logged: list[Logged]) -> list[dict[str, Any]]:
    """``p2p log --json``: each message (attachments described) with its delivery state."""
    rows = media.log_json([m.message for m in logged])
    return [
        {
            **row,
            "status": m.delivery.status,
            "delivered_to": list(m.delivery.delivered_to),
            "read_by": list(m.delivery.read_by),
        }
        for m, row in zip(logged, rows, strict=True)
    ]
