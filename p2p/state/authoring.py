"""Authoring: the entries this device writes, stamped by its clock.

Rules:

- Every entry we author is signed by this device and stamped by one hybrid logical
  clock (:attr:`Author.clock`), which never goes back: it is persisted (``clock``) with
  every local write, and it observes what a chat has seen before we write to it, so
  our entry sorts after everything we were shown.
- Our entries of a round go into their replica in one CRDT transaction, with their
  index rows, in one batch (:meth:`Author.write_local`).
- An own entry the index shows but the loaded document lacks was lost as a duplicate
  (two writers under one CRDT client id, in stores of older versions): loading a
  document checks for it, and every own entry of that space is written again
  (:meth:`Author.load_checked`).
"""

from __future__ import annotations

from p2p.proto.clock import HybridClock
from p2p.proto.identity import DeviceKeys
from p2p.proto.model import Entry, Kind, new_id
from p2p.state.directory import Directory, Part
from p2p.state.index import MessageIndex, row_entry
from p2p.state.spaces import Spaces
from p2p.storage.base import Store, WriteBatch


class Author(Part):
    """Signs, stamps and writes this device's own entries."""

    def __init__(
        self, keys: DeviceKeys, spaces: Spaces, directory: Directory, index: MessageIndex
    ) -> None:
        super().__init__(keys, spaces, directory)
        self._index = index
        self.clock = HybridClock()

    def load(self, store: Store) -> None:
        """The clock where the last run left it."""
        last = store.get("clock")
        if last:
            self.clock = HybridClock(last.decode())

    def observe(self, ts: str, wall_ms: int) -> None:
        """Move the clock past ``ts`` (the newest stamp of a chat we are writing to)."""
        self.clock.observe(ts, wall_ms)

    def new_entry(
        self, space_id: str, kind: Kind, wall_ms: int, *, body: str = "", target: str = ""
    ) -> Entry:
        """A signed entry authored by this device, timestamped now."""
        entry = Entry(
            id=new_id(),
            kind=kind,
            account=self._directory.account_id,
            device=self._keys.device_id,
            ts=self.clock.now(wall_ms),
            target=target,
            body=body,
        )
        return entry.signed(space_id, self._keys)

    def write_local(self, space_id: str, entries: list[Entry]) -> tuple[bytes, WriteBatch]:
        """Put our own signed entries in the replica, in one CRDT transaction; return the
        update and the batch persisting it, with the message-index rows of the entries."""
        update = self._spaces.space(space_id).replica.write(entries)
        batch = WriteBatch(
            records={"clock": self.clock.last.encode()},
            appends=[(space_id, update)],
            index=self._index.own_rows(space_id, entries),
        )
        return update, batch

    def load_checked(self, space_id: str, store: Store, *, finish: bool = True) -> list[Entry]:
        """Load a space's CRDT from ``store`` and check that it holds every entry of
        ours that the message index shows; [] when it does, else every entry of ours
        in the space, to be written again (run in a worker thread: the check reads the
        document before anyone else may use it).

        Our index rows commit with the update that holds them, so a row whose key the
        loaded CRDT lacks means an update of ours was dropped as a duplicate: older
        versions let two processes write one home with one CRDT client id, and the
        second struct under a client and clock was taken for the first one, here and
        at every peer. The peers then hold the other struct of each such pair, which
        we cannot tell from ours; so every entry of ours is written again, under this
        run's client id: the same values under the same keys (signed again: a shown
        row keeps no signature, and ours are deterministic), so no view changes, and
        every replica ends up holding all of them.

        With ``finish`` False (in a worker thread), the document waits for
        ``Replica.finish_load`` in the writing thread; entries of ours written aside
        meanwhile are not in it yet, so a loss found then is confirmed there
        (:meth:`lacks_own`) before anything is written again.
        """
        replica = self._spaces.space(space_id).replica
        account_id = self._directory.account_id
        lost: list[Entry] = []

        def check() -> None:
            if not self.lacks_own(space_id, store):
                return
            for row in store.index_by_device(space_id, self._keys.device_id):
                if row.reason:
                    continue
                entry = row_entry(row)
                if entry is not None and entry.account == account_id:
                    lost.append(entry.signed(space_id, self._keys))

        replica.load(check, finish=finish)
        return lost

    def lacks_own(self, space_id: str, store: Store) -> bool:
        """Whether the document lacks a key of an entry of ours the index shows."""
        keys = store.index_keys_by_device(space_id, self._keys.device_id)
        return self._spaces.space(space_id).replica.lacks(keys)
