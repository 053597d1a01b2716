"""Sealing and opening: envelope counters, replay windows, and what a peer may change.

Rules:

- Every envelope we seal carries the next counter of this device; counters are never
  reused, even across crashes and processes: they come in blocks claimed from the store
  (``records.claim_run``, ``records.claim_counters``), and half-way through a block
  :attr:`Sealing.counters_wanted` asks the node's writer for the next one.
- An envelope is opened only with the signing key of a current device whose account is
  a member of the space, under a key of an epoch we hold; a counter its sender's replay
  window has seen is refused before any signature is checked. Any refusal raises a
  typed error and changes nothing; the window moves only after the update applied.
- Another account's device may write, delete and open keys only for its own account
  (its CRDT clients, ``model.may_open``); our own devices relay anyone's structs.
- What we send to another account's device holds only what our account wrote
  (:meth:`Sealing.diff`): it accepts nothing else from us.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial

from p2p.errors import UnknownDevice, UnknownKey
from p2p.proto import envelope
from p2p.proto.identity import DeviceKeys
from p2p.proto.model import DELETIONS, MESSAGES, Rejected, decode_state_vector, may_open
from p2p.proto.wire import unpack
from p2p.proto.yupdate import strip_deletions
from p2p.state.directory import Directory, Part
from p2p.state.index import MessageIndex
from p2p.state.records import COUNTER_BLOCK, Run, required
from p2p.state.spaces import Spaces
from p2p.storage.base import IndexKey, Store, WriteBatch

HeldIndex = Callable[[str, Sequence[tuple[str, str]]], dict[IndexKey, str]]
"""``Store.index_held``: which (map, key) pairs of a space the message index holds."""


@dataclass(frozen=True, kw_only=True)
class Ingested:
    """An envelope accepted into a replica."""

    space: str
    sender: str
    counter: int
    update: bytes
    batch: WriteBatch
    rejected: list[Rejected] = field(default_factory=list)
    """Entries the update brought that readers will not see, and why."""
    relayable: bool = True
    """Whether the update touches only its sender's account's CRDT clients, so that
    devices of other accounts accept it too (our own devices take anything from us)."""


class Sealing(Part):
    """Our envelope counter and every sender's replay window; seals, opens, diffs."""

    def __init__(
        self, keys: DeviceKeys, spaces: Spaces, directory: Directory, index: MessageIndex
    ) -> None:
        super().__init__(keys, spaces, directory)
        self._index = index
        self.counter = 0
        """The last counter we sealed with."""
        self.counter_reserved = 0
        """The last counter of the block claimed from the store."""
        self.counters_wanted = False
        """Half of the counter block is used: the node's writer claims the next one."""
        self.replay: dict[str, envelope.ReplayWindow] = {}
        """Each sender's replay window, by device id."""

    def load(self, store: Store, run: Run | None) -> None:
        """Replay windows from their records; counters from ``run`` (None: the stored
        counter, for a state that only reads)."""
        for name in store.names("replay/"):
            self.replay[name.removeprefix("replay/")] = envelope.ReplayWindow.from_record(
                required(store, name)
            )
        if run is None:
            reserved = store.get("counter")
            self.counter = self.counter_reserved = (
                unpack(reserved, what="counter") if reserved else 0
            )
        else:
            self.counter, self.counter_reserved = run.counter, run.reserved

    # ---- sealing ---------------------------------------------------------------------

    def seal(self, space_id: str, payload: bytes) -> bytes:
        """Seal ``payload`` for a space with the next counter."""
        space = self._spaces.space(space_id)
        self.counter += 1
        if self.counter > self.counter_reserved - COUNTER_BLOCK // 2:
            self.counters_wanted = True
        return envelope.seal(
            self._keys,
            space=space_id,
            epoch=space.epoch,
            key=space.keys[space.epoch],
            counter=self.counter,
            payload=payload,
        )

    def grant_counters(self, reserved: int) -> None:
        """Take the block of envelope counters ending at ``reserved`` (from
        ``claim_counters``). The block follows ours unless another writer took the
        ones between (never while the home lock is held): then those are skipped."""
        start = reserved - COUNTER_BLOCK
        if start > self.counter_reserved:
            self.counter = max(self.counter, start)
        self.counter_reserved = max(self.counter_reserved, reserved)
        self.counters_wanted = self.counter > self.counter_reserved - COUNTER_BLOCK // 2

    def diff(self, space_id: str, state_vector: bytes, peer: str | None = None) -> bytes:
        """What a replica at ``state_vector`` lacks. For a device of another account,
        only what our own account's devices wrote: that device accepts nothing else
        from us, and gets the rest from its authors."""
        replica = self._spaces.space(space_id).replica
        if peer is None or self._directory.device_list.signing_key_of(peer) is not None:
            return replica.diff(state_vector)
        return replica.diff(state_vector, keep=self._directory.ours_client)

    def _past(
        self, space_id: str, state_vector: bytes, peer: str | None
    ) -> tuple[dict[int, int], Callable[[int], bool] | None]:
        """What a peer at ``state_vector`` counts as holding, and which clients' deletions
        it takes (None: all): as :meth:`diff` decides, for a diff read from the store."""
        past = decode_state_vector(state_vector)
        if peer is None or self._directory.device_list.signing_key_of(peer) is not None:
            return past, None
        keep = self._directory.ours_client
        ours = decode_state_vector(self._spaces.space(space_id).replica.state_vector())
        for client, clock in ours.items():
            if not keep(client):
                past[client] = max(clock, past.get(client, 0))
        return past, keep

    def first_needed(self, space_id: str, state_vector: bytes, peer: str | None = None) -> int:
        """Where in the store a catch-up of ``state_vector`` starts (``Spaces.first_needed``;
        for a worker thread). InvalidUpdate for a malformed vector."""
        past, _ = self._past(space_id, state_vector, peer)
        return self._spaces.first_needed(space_id, past)

    def stored_pieces(
        self, space_id: str, state_vector: bytes, peer: str | None, start: int, limit: int
    ) -> Iterator[bytes]:
        """What a peer at ``state_vector`` lacks, from the store (``Spaces.stored_diff``),
        in pieces of at most ``limit`` bytes: a catch-up without the document."""
        past, keep = self._past(space_id, state_vector, peer)
        for piece in self._spaces.stored_diff(space_id, past, start, limit):
            yield piece if keep is None else strip_deletions(piece, keep)

    # ---- opening ---------------------------------------------------------------------

    def space_key(self, space_id: str, epoch: int) -> bytes:
        """The key of one epoch of a space; UnknownKey if we do not hold it."""
        space = self._spaces.get(space_id)
        if space is None or epoch not in space.keys:
            raise UnknownKey(space_id, epoch)
        return space.keys[epoch]

    def ingest(self, data: bytes, held: HeldIndex | None = None) -> Ingested:
        """Verify, decrypt, replay-check and apply one envelope.

        Raises a typed error and changes nothing when any check fails (the replay window
        moves only after the update applied). With ``held`` (the message index's
        ``Store.index_held``), a space whose document is not loaded takes the update
        without it if it can; DocumentNeeded if not (load, then ingest again).
        """
        d = self._directory
        parsed = envelope.parse(data)
        window = self.replay.get(parsed.sender) or envelope.ReplayWindow()
        window.check(parsed.sender, parsed.counter)  # cheap, before any signature check
        opened = envelope.open_parsed(
            parsed, signing_key_of=d.current_signing_key, space_key=self.space_key
        )
        author = d.current_account_of(opened.sender).account_id
        space = self._spaces[opened.space]
        if author not in space.members:
            raise UnknownDevice(f"{opened.sender} (its account is not a member of the space)")
        # another account's device may only write and delete its own account's structs
        # (so it can neither occupy nor delete ours); our own devices relay anyone's
        allowed = None if author == d.account_id else d.author_client(author)
        # nor open a key that is ours (by its name, or by the value it holds)
        opens = None if allowed is None else partial(self._refused_key, author, opened.space)
        applied = space.replica.apply(
            opened.payload,
            allowed=allowed,
            opens=opens,
            held=None if held is None else partial(held, opened.space),
        )
        relayable = allowed is not None or all(
            d.client_account(c) == author for c in applied.clients
        )
        window.accept(opened.counter)
        self.replay[opened.sender] = window
        # an entry its author's envelope brought is authenticated by that envelope; but
        # structs yrs held back from other envelopes may have come in with this one
        vouched_by = "" if applied.took_held else opened.sender
        index, rejected = self._index.rows(opened.space, applied.changed, vouched_by=vouched_by)
        batch = WriteBatch(
            records={f"replay/{opened.sender}": window.to_record()},
            appends=[(opened.space, opened.payload)],
            index=index,
        )
        return Ingested(
            space=opened.space,
            sender=opened.sender,
            counter=opened.counter,
            update=opened.payload,
            batch=batch,
            relayable=relayable,
            rejected=rejected,
        )

    def _refused_key(
        self, account_id: str, space_id: str, opened: list[tuple[str, str]]
    ) -> str | None:
        """The first key of ``opened`` a device of another account may not open in a
        space (None: all are fine). Not a key that holds a value of another account
        already: an item opening a key again, with no origin, lands after the items
        there when its client id is greater, and replaces the value without referring
        to it. Not a key that is another's by its name (``model.may_open``). And a
        deletion only of a message of its own account, held or written with it."""
        replica = self._spaces[space_id].replica
        messages = {key for name, key in opened if name == MESSAGES}
        # not loaded: applied without the document, which takes only keys the index
        # does not hold, and no deletion from another account (Replica._aside_plan)
        held = (
            replica.values([*opened, *((MESSAGES, k) for n, k in opened if n == DELETIONS)])
            if replica.loaded
            else {}
        )
        for name, key in opened:
            value = held.get((name, key))
            if value is not None and not (isinstance(value, dict) and value.get("a") == account_id):
                return f"{name}/{key}"
            if not may_open(name, key, account_id, self._directory.belongs):
                return f"{name}/{key}"
            if name == DELETIONS and key not in messages:
                message = held.get((MESSAGES, key))
                if not (isinstance(message, dict) and message.get("a") == account_id):
                    return f"{name}/{key}"
        return None
