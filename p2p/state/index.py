"""The message index: what readers see of a chat, kept beside its document.

Rules:

- The index holds one row per key of the maps ``model.INDEXED`` (messages, edits,
  deletions, reactions): the value under the key as it was judged when it arrived,
  shown (it verified) or hidden (with the reason). Readers are served from the rows,
  never from the document, which stays unloaded until something syncs or writes.
- A row is written in the same batch as the update that changed its key, so the index
  and the document never disagree on disk; a value is verified once, when its row is
  made (``model.judge``).
- Hidden rows keep the signature, so that they can be judged again when a device list
  grows (:meth:`MessageIndex.recheck`).
- A space stored before the index existed is indexed once at load; those rows wait in
  :attr:`MessageIndex.unsaved` for the node's first write.
"""

from __future__ import annotations

from p2p.errors import StoreCorrupt
from p2p.proto.identity import DeviceKeys
from p2p.proto.model import (
    DELETIONS,
    EDITS,
    INDEXED,
    MESSAGES,
    REACTIONS,
    UNREAD,
    Changes,
    Entry,
    Judged,
    Message,
    Rejected,
    fold,
    judge,
)
from p2p.state.directory import Directory, Part
from p2p.state.records import merge_batches
from p2p.state.spaces import Spaces
from p2p.storage.base import INDEXED_MAPS, IndexKey, IndexRow, WriteBatch

assert INDEXED == INDEXED_MAPS, "the index mirrors exactly the maps whose changes apply reports"

IndexRows = dict[IndexKey, IndexRow | None]
"""Index rows to write, by key; None deletes the row (the key was removed)."""


class MessageIndex(Part):
    """Makes the index rows of what changes in a space's document."""

    def __init__(self, keys: DeviceKeys, spaces: Spaces, directory: Directory) -> None:
        super().__init__(keys, spaces, directory)
        self.unsaved = WriteBatch()
        """Rows built outside an operation's own batch (the index of a space stored
        before the index existed, built at load), waiting for the node's writer."""

    def take_unsaved(self) -> WriteBatch:
        """The rows waiting for a write (see :attr:`unsaved`), handed over once."""
        batch, self.unsaved = self.unsaved, WriteBatch()
        return batch

    def rows(
        self,
        space_id: str,
        changed: Changes,
        *,
        vouched_by: str = "",
        verified: dict[bytes, bool] | None = None,
    ) -> tuple[IndexRows, list[Rejected]]:
        """Index rows for the keys an update changed, judged now (verified once, here;
        ``vouched_by``: the device that signed the envelope, see ``model.judge``;
        ``verified``: signature checks run beforehand, ``model.signature_checks``)."""
        replica = self._spaces.space(space_id).replica
        d = self._directory
        rows: IndexRows = {}
        rejected: list[Rejected] = []
        for (map_name, key), value in changed.items():
            found = replica.judge_key(
                map_name,
                key,
                d.any_signing_key,
                d.belongs,
                value,
                vouched_by=vouched_by,
                verified=verified,
            )
            if found is None:  # the key was removed
                rows[(space_id, map_name, key)] = None
                continue
            entry, judged = found
            rows[(space_id, map_name, key)] = index_row(space_id, map_name, key, entry, judged)
            if isinstance(judged, Rejected):
                rejected.append(judged)
        return rows, rejected

    def own_rows(self, space_id: str, entries: list[Entry]) -> IndexRows:
        """Index rows of our own entries just written (each now the value under its key;
        judged like any other, but its signature is ours: not verified again)."""
        replica = self._spaces.space(space_id).replica
        d = self._directory
        rows: IndexRows = {}
        for e in entries:
            name, key = e.map_name(), e.key()
            if name in INDEXED_MAPS:
                judged = replica.judge_entry(
                    key, e, d.any_signing_key, d.belongs, vouched_by=self._keys.device_id
                )
                rows[(space_id, name, key)] = index_row(space_id, name, key, e, judged)
        return rows

    def build(self, space_id: str) -> WriteBatch:
        """The whole index of a space from its CRDT (loading it), and its marker record.

        For a store written before the index existed, and for tests that compare the
        index with the CRDT view."""
        replica = self._spaces.space(space_id).replica
        d = self._directory
        index: IndexRows = {}
        for map_name in INDEXED_MAPS:
            for key, entry, judged in replica.judge_all(map_name, d.any_signing_key, d.belongs):
                index[(space_id, map_name, key)] = index_row(space_id, map_name, key, entry, judged)
        return WriteBatch(records={f"indexed/{space_id}": b""}, index=index)

    def build_later(self, space_id: str) -> None:
        """Build a space's index now and keep it for the next write (:attr:`unsaved`)."""
        self.unsaved = merge_batches([self.unsaved, self.build(space_id)])

    def recheck(self, space_id: str, hidden: list[IndexRow]) -> WriteBatch:
        """Judge hidden rows again (after the device list grew): the ones that pass now
        become shown rows. Malformed rows stay as they are. With the CRDT loaded, its
        current values are judged instead (an update may have replaced a row since it
        was read)."""
        if self._spaces.space(space_id).replica.loaded:
            index, _ = self.rows(space_id, {(row.map, row.key): UNREAD for row in hidden})
            return WriteBatch(index=index)
        d = self._directory
        index = {}
        for row in hidden:
            entry = row_entry(row)
            if entry is None:
                continue
            judged = judge(space_id, row.key, entry, d.any_signing_key, d.belongs)
            if not isinstance(judged, Rejected):
                index[(space_id, row.map, row.key)] = index_row(
                    space_id, row.map, row.key, entry, judged
                )
        return WriteBatch(index=index)


def index_row(
    space_id: str, map_name: str, key: str, entry: Entry | None, judged: Judged
) -> IndexRow:
    """The index row of one judged value: what a reader needs, or why it is hidden."""
    if entry is None:
        reason = judged.reason if isinstance(judged, Rejected) else "malformed"
        return IndexRow(space=space_id, map=map_name, key=key, reason=reason)
    hidden = isinstance(judged, Rejected)
    return IndexRow(
        space=space_id,
        map=map_name,
        key=key,
        id=entry.id,
        kind=entry.kind,
        account=entry.account,
        device=entry.device,
        ts=entry.ts,
        target=entry.target,
        body=entry.body,
        sig=entry.sig if hidden else "",  # kept to judge it again later
        reason=judged.reason if isinstance(judged, Rejected) else "",
    )


def row_entry(row: IndexRow) -> Entry | None:
    """The entry an index row stands for, checked as any stored value is
    (``Entry.from_value``); None for a malformed one."""
    return Entry.from_value(
        {
            "id": row.id,
            "k": row.kind,
            "a": row.account,
            "d": row.device,
            "ts": row.ts,
            "t": row.target,
            "b": row.body,
            "sig": row.sig,
        }
    )


def index_view(space_id: str, messages: list[IndexRow], related: list[IndexRow]) -> list[Message]:
    """Messages in display order from index rows: the same :func:`~p2p.proto.model.fold` the
    CRDT view uses, over the shown rows of a page and the rows about them."""
    by_map: dict[str, list[Entry]] = {name: [] for name in INDEXED_MAPS}
    for row in (*messages, *related):
        entry = row_entry(row)
        if entry is None or row.reason:
            raise StoreCorrupt(f"index row {row.map}/{row.key} of {space_id} is not a shown entry")
        by_map[row.map].append(entry)
    return fold(space_id, by_map[MESSAGES], by_map[EDITS], by_map[DELETIONS], by_map[REACTIONS])
