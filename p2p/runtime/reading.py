"""Reading messages from the store's index, and reporting entries readers will not see.

It owns which hidden entries this process has reported. Rules it keeps:

- **Reads come from the message index**, without loading the CRDT, so they show what is
  durable: a received message appears once its write committed.
- **Display order is the same on every replica** (``index_view``); paging (``last``,
  ``before``) costs one page, not the history.
- **Each hidden entry is reported once per process** (``EntryRejected``): when it
  arrives, and, for those stored earlier, on the first read of its chat.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from p2p import events as ev
from p2p.proto.model import Message, Rejected
from p2p.state.device import Space, index_view
from p2p.storage.base import Store

log = logging.getLogger("p2p.runtime.node")  # one logger for all of the node's lines


class Reader:
    """Messages of a chat as durable; see the module docstring."""

    def __init__(self, store: Store, *, emit: Callable[[ev.Event], None]) -> None:
        self._store = store
        self._emit = emit
        self._rejections_read: set[str] = set()
        """Spaces whose stored hidden entries were reported in this process."""
        self._reported: set[tuple[str, str]] = set()

    def messages(
        self, space: Space, *, last: int | None, before: Message | None, files_only: bool
    ) -> list[Message]:
        if space.id not in self._rejections_read:
            self._rejections_read.add(space.id)
            for row in self._store.index_rejected(space.id):
                self.report(
                    Rejected(
                        space=space.id,
                        entry_id=row.id or row.key,
                        device=row.device or "?",
                        reason=row.reason,
                    )
                )
        page = last is not None or before is not None or files_only
        rows = self._store.index_messages(
            space.id,
            last=last,
            before=before.sort_key() if before is not None else None,
            files_only=files_only,
        )
        related = self._store.index_related(space.id, [r.id for r in rows] if page else None)
        return index_view(space.id, rows, related)

    def report(self, r: Rejected) -> None:
        """Tell the app (once per process) about an entry readers will not see."""
        if (r.space, r.entry_id) in self._reported:
            return
        self._reported.add((r.space, r.entry_id))
        log.warning("hidden entry %s in %s from %s: %s", r.entry_id, r.space, r.device, r.reason)
        self._emit(
            ev.EntryRejected(chat=r.space, entry_id=r.entry_id, device=r.device, reason=r.reason)
        )
