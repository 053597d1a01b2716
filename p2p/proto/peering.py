"""Which of two connections to one device to keep, decided the same at both ends.

Two devices may dial each other at once, or redial over a faster path, and end up with
two authenticated sessions. Both must keep the same one, without talking about it, or
each closes the one the other kept. Pure: the node passes what it knows of each
connection.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Link:
    """What the choice needs to know of one connection."""

    initiator: bool
    """We dialed it."""
    relayed: bool
    """It runs through a relay rather than directly."""


def keep_new(me: str, device: str, new: Link, existing: Link) -> bool:
    """Whether ``new`` replaces ``existing`` (both to ``device``; we are ``me``).

    A direct link beats a relayed one, at both ends. Two links dialed the same way are
    a redial: the old one is stale. Otherwise both ends keep the one dialed by the
    device with the smaller id."""
    if new.relayed != existing.relayed:
        return existing.relayed
    if new.initiator == existing.initiator:
        return True
    smaller_is_me = me < device
    return new.initiator == smaller_is_me and existing.initiator != smaller_is_me
