"""A device's state and every operation on it, without I/O: the engine's pure heart.

:class:`DeviceState` is a facade over the parts that own the state, each in its module
with its rules at the top:

- :mod:`~p2p.state.spaces`: the spaces held (documents, keys, members), set-aside ones;
- :mod:`~p2p.state.directory`: device lists, signing keys, discovery keys, who reads what;
- :mod:`~p2p.state.sealing`: envelope counters, replay windows, ingest and diffs;
- :mod:`~p2p.state.index`: the message index rows;
- :mod:`~p2p.state.authoring`: the clock and our own entries;
- :mod:`~p2p.state.enrollment`: enrollment, unlinking and leases;
- :mod:`~p2p.state.conversations`: conversations between accounts, grants, leaving;
- :mod:`~p2p.state.contacts`: the contact book;
- :mod:`~p2p.state.receipts`: delivery state;
- :mod:`~p2p.state.records`: batches, and what a run claims from the store.

Each operation returns the :class:`WriteBatch` that makes it durable; the node
(``p2p.runtime.node``) writes batches to its store and talks to the network. Tests drive
this class directly to check the protocol without sockets, threads or clocks. Here live
only what spans parts: creating and loading a state, and adopting device lists.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from functools import partial

from p2p.errors import (
    ChatCorrupt,
    DeviceListError,
    DocumentNeeded,
    NotInitialized,
    P2PError,
    StoreCorrupt,
    WireError,
)
from p2p.proto import envelope
from p2p.proto.clock import HybridClock
from p2p.proto.grants import SpaceGrant
from p2p.proto.identity import (
    AccountKey,
    DeviceEntry,
    DeviceKeys,
    DeviceList,
    parse_device_list,
)
from p2p.proto.model import (
    EMPTY_STATE_VECTOR,
    MESSAGES,
    Entry,
    Kind,
    Message,
    SignatureCheck,
    new_id,
    signature_checks,
)
from p2p.proto.wire import unpack
from p2p.state.authoring import Author
from p2p.state.contacts import Contact, Contacts
from p2p.state.conversations import Conversations
from p2p.state.directory import Directory
from p2p.state.enrollment import Companions, EnrolledSpace, Enrollment, enrolled_history
from p2p.state.index import MessageIndex, index_row, index_view, row_entry
from p2p.state.receipts import Delivery, Receipts
from p2p.state.records import (
    COUNTER_BLOCK,
    Run,
    claim_counters,
    claim_run,
    merge_batches,
    required,
    stored_history,
)
from p2p.state.sealing import HeldIndex, Ingested, Sealing
from p2p.state.spaces import (
    NOTES,
    Space,
    SpaceKind,
    Spaces,
    crdt_client,
    device_prefix,
    vector_record,
)
from p2p.storage.base import IndexRow, Store, WriteBatch

__all__ = [
    "COUNTER_BLOCK",
    "NOTES",
    "Contact",
    "Delivery",
    "DeviceState",
    "EnrolledSpace",
    "Enrollment",
    "Ingested",
    "Run",
    "Space",
    "SpaceKind",
    "claim_counters",
    "claim_run",
    "crdt_client",
    "device_prefix",
    "index_row",
    "index_view",
    "merge_batches",
    "row_entry",
]


class DeviceState:
    """Everything one device knows; see the module docstring."""

    def __init__(
        self,
        *,
        keys: DeviceKeys,
        name: str,
        device_list: DeviceList,
        account_key: AccountKey | None = None,
    ) -> None:
        self.keys = keys
        self.name = name
        self.account_key = account_key
        self._spaces = Spaces(keys.device_id)
        self.directory = Directory(keys.device_id, device_list, self._spaces)
        parts = (keys, self._spaces, self.directory)
        self.index = MessageIndex(*parts)
        self.author = Author(*parts, self.index)
        self.sealing = Sealing(*parts, self.index)
        self.companions = Companions(*parts, account_key)
        self.conversations = Conversations(
            *parts, primary=account_key is not None, follow=self.follow
        )
        self.contacts = Contacts(*parts, self.author)
        self.receipts = Receipts(*parts)

    # ---- identity ------------------------------------------------------------------

    @property
    def device_id(self) -> str:
        return self.keys.device_id

    @property
    def account_id(self) -> str:
        return self.directory.account_id

    @property
    def is_primary(self) -> bool:
        return self.account_key is not None

    # ---- creation and loading ------------------------------------------------------

    @classmethod
    def create_account(cls, name: str) -> tuple[DeviceState, WriteBatch]:
        """A new account whose primary is this device, with its account and notes spaces."""
        keys, account = DeviceKeys.generate(), AccountKey.generate()
        state = cls(
            keys=keys,
            name=name,
            device_list=DeviceList.create(account, keys, name),
            account_key=account,
        )
        batches = [state._identity_batch()]
        batches.append(state.add_space(new_id(), "account", "account"))
        batches.append(state.add_space(new_id(), "chat", NOTES))
        return state, merge_batches(batches)

    @classmethod
    def from_enrollment(
        cls, keys: DeviceKeys, name: str, bundle: Enrollment
    ) -> tuple[DeviceState, WriteBatch]:
        """A companion's state from the bundle its primary sent."""
        state, added = cls._from_bundle(keys, name, bundle)
        batches = [
            state._identity_batch(),
            WriteBatch(records={"device/lease": bundle.lease}),
            *added.values(),
        ]
        batches += enrolled_history(bundle, state.spaces, state.index, state.learn_contacts)
        batch = merge_batches(batches)
        batch.records.update(state.spaces.vector_records(batch.appends))  # see Spaces
        return state, batch

    # ---- a new device's history as it arrives (linking) -----------------------------

    @classmethod
    def enrolling(
        cls, keys: DeviceKeys, name: str, bundle: Enrollment, store: Store
    ) -> DeviceState:
        """A new companion's state while its history arrives (``p2p link``), kept in
        ``store`` as it comes, so that a history of any size is held one piece at a
        time, and a link cut midway resumes from what is stored:

        - each space's records are written now (again when a link resumes: its keys
          may have moved on), with the state vector of what the store holds of it;
        - its history follows piece by piece (:meth:`enroll_piece`);
        - the device's own records come last (:meth:`finish_enrollment`): until then
          the home holds no linked device. ``bundle``'s histories are not read.

        Does I/O (a worker thread's job), unlike the rest of this class."""
        state, added = cls._from_bundle(keys, name, bundle)
        state.history = partial(stored_history, store)
        state.spaces.store = store
        for space_id, batch in added.items():
            if store.log_seqs(space_id)[1] == 0:  # none of it here yet: an empty history
                batch.records.update(vector_record(space_id, 0, EMPTY_STATE_VECTOR, {}))
        link = WriteBatch(records={"link/account": bundle.account_pk})
        store.write(merge_batches([link, *added.values()]))
        for space in bundle.enrolled:  # each over the store now, its document unloaded
            state.spaces.load_space(store, space.id, required(store, f"space/{space.id}"))
        return state

    def enroll_piece(
        self,
        space_id: str,
        piece: bytes,
        store: Store,
        check_all: Callable[[list[SignatureCheck]], dict[bytes, bool]] | None = None,
    ) -> int:
        """Apply one piece of a space's history (see :meth:`enrolling`), index it and
        write it, with the space's state vector, in one batch; the messages it
        brought. Without the chat's document when the piece allows it
        (``Replica.apply``: messages under new keys, receipts and read markers after
        their heads); else the document is loaded from what is stored and stays
        loaded until the caller unloads it. A worker thread's job: it writes.

        The pieces come from our primary, over the link's box, whose far end holds the
        account key (it signed the list that names this device): as in a session, an
        entry its sender authored (the primary's own) is authenticated by the channel,
        and every other entry's signature is verified (security.md, "Entry
        signatures"). ``check_all`` runs those checks (on several threads, say) before
        the entries are judged."""
        space = self.spaces.space(space_id)
        replica = space.replica
        try:
            held = None
            if not replica.loaded:
                held = partial(store.index_held, space_id)
                replica.follow_chains(waits=True)  # items may wait: see space_taken
            applied = replica.apply(piece, held=held)
        except DocumentNeeded:
            applied = replica.apply(piece)
        primary = self.device_list.primary.device_id
        vouched_by = "" if applied.took_held else primary
        verified = None
        if check_all is not None:
            checks = signature_checks(
                space_id, applied.changed, self.directory.any_signing_key, vouched_by=vouched_by
            )
            verified = check_all(checks)
        rows, _rejected = self.index.rows(
            space_id, applied.changed, vouched_by=vouched_by, verified=verified
        )
        batch = WriteBatch(appends=[(space_id, piece)], index=rows)
        batch.records.update(self.spaces.vector_records(batch.appends))
        store.write(batch)
        space.appended()
        return sum(1 for (_, m, _), row in rows.items() if m == MESSAGES and row is not None)

    def space_taken(self, space_id: str, store: Store) -> None:
        """A space's pieces are all in (see :meth:`enroll_piece`): drop its document.
        Should items taken without it have waited for one that never came (or the
        document loaded while some waited), the keys they hold are not indexed: the
        space's index is marked incomplete, and built from the document when the
        node opens (``DeviceState.load``). A worker thread's job: it writes."""
        replica = self.spaces.space(space_id).replica
        if replica.chains_unresolved:
            store.write(WriteBatch(deletes={f"indexed/{space_id}"}))
        replica.unload()

    def finish_enrollment(self, store: Store) -> WriteBatch:
        """The last batch of a link (see :meth:`enrolling`): the device's own records
        and the contacts its account space names; and, gone, the records of spaces an
        earlier, abandoned link left here that this enrollment does not hold (their
        updates and index rows stay on disk, read by nothing)."""
        gone: set[str] = {"link/account"}
        for name in store.names("space/"):
            space_id = name.removeprefix("space/")
            if space_id not in self.spaces:
                gone |= {name, f"sv/{space_id}", f"indexed/{space_id}"}
                gone.update(store.names(f"spacekey/{space_id}/"))
                gone.update(store.names(f"spacerot/{space_id}/"))
        return merge_batches(
            [
                self.learn_contacts(),
                self._identity_batch(),
                WriteBatch(records={"device/lease": self.lease}, deletes=gone),
            ]
        )

    @classmethod
    def _from_bundle(
        cls, keys: DeviceKeys, name: str, bundle: Enrollment
    ) -> tuple[DeviceState, dict[str, WriteBatch]]:
        """A companion's state from an enrollment bundle: its list (which must hold this
        device) and lease, and each space added empty, with the batch keeping it (its
        history is the caller's: in memory, or piece by piece)."""
        device_list = parse_device_list(bundle.device_list, bundle.account_pk)
        if keys.device_id not in device_list.ids:
            raise DeviceListError("the enrollment's device list does not hold this device")
        state = cls(keys=keys, name=name, device_list=device_list)
        state.lease = bundle.lease
        added = {}
        for space in bundle.enrolled:
            if space.kind not in ("account", "chat"):
                raise DeviceListError(f"enrollment names an unknown space kind {space.kind!r}")
            added[space.id] = state.add_space(
                space.id,
                space.kind,  # type: ignore[arg-type]
                space.name,
                epoch=space.epoch,
                keys=space.keys,
                rotations=bundle.rotations.get(space.id),
            )
        return state, added

    def _identity_batch(self) -> WriteBatch:
        records = {
            "device/keys": self.keys.to_record(),
            "device/name": self.name.encode(),
            "account/pk": self.device_list.account_pk,
            "account/list": self.device_list.encode(),
        }
        if self.account_key is not None:
            records["account/key"] = self.account_key.seed
        return WriteBatch(records=records)

    def add_space(
        self,
        space_id: str,
        kind: SpaceKind,
        name: str,
        *,
        epoch: int = 0,
        keys: dict[int, bytes] | None = None,
        members: dict[str, bytes] | None = None,
        rotations: dict[int, bytes] | None = None,
    ) -> WriteBatch:
        """A new space with ``members`` and our own account; the records keeping it."""
        owners = {self.account_id: self.device_list.account_pk, **(members or {})}
        return self.spaces.add(
            space_id, kind, name, members=owners, epoch=epoch, keys=keys, rotations=rotations
        )

    @classmethod
    def load(cls, store: Store, run: Run | None = None) -> DeviceState:
        """Rebuild the state from a store: records now, each space's CRDT on first use.

        ``run``: what this run writes with (:func:`claim_run`, taken from the store
        before loading); without one the state is for reading (its run number is the
        stored one plus one, which another process may use too: never write with it).

        A space's document (snapshot, then tail) is loaded from ``store`` only when
        something needs it (sync, a write; see ``Replica.load``): readers are served by
        the message index. A space without an ``indexed/<space>`` record (a store written
        before the index existed) is loaded now and its index built, once: the rows wait
        in :attr:`unsaved` for the node's first write.
        """
        raw_keys = store.get("device/keys")
        if raw_keys is None:
            raise NotInitialized("this home holds no device")
        if store.get("account/list") is None:
            raise NotInitialized("this device is not linked to an account yet (p2p link)")
        try:
            keys = DeviceKeys.from_record(raw_keys)
            account_pk = required(store, "account/pk")
            device_list = parse_device_list(required(store, "account/list"), account_pk)
            seed = store.get("account/key")
            state = cls(
                keys=keys,
                name=required(store, "device/name").decode(),
                device_list=device_list,
                account_key=AccountKey(seed) if seed else None,
            )
            state.history = partial(stored_history, store)
            state.spaces.store = store
            # accounts we follow first: indexing a chat checks entries by their lists
            state.directory.load(store)
            if run is None:
                boot = store.get("boot")
                state.spaces.boot = unpack(boot, what="boot") + 1 if boot else 1
            else:
                state.spaces.boot = run.boot
            for name in store.names("space/"):
                space_id = name.removeprefix("space/")
                try:
                    if not state.spaces.load_space(store, space_id, required(store, name)):
                        state.index.build_later(space_id)
                except (P2PError, ValueError, TypeError, KeyError) as exc:
                    # one unreadable chat must not take the others, or the node, down
                    state.put_aside(space_id, exc if isinstance(exc, P2PError) else ValueError(exc))
            state.sealing.load(store, run)
            state.companions.load(store)
            state.author.load(store)
        except (WireError, DeviceListError, ValueError, TypeError, KeyError) as exc:
            raise StoreCorrupt(f"device records are unreadable: {exc}") from exc
        return state

    # ---- adopting device lists (spans the directory, the spaces and their keys) -----

    def offer_device_list(self, data: bytes) -> WriteBatch | None:
        """Adopt a newer signed device list of our account; None if it is the one we
        hold. RollbackRefused for an older one, DeviceListError for a forged one."""
        kept = self.directory.newer_own(data)
        if kept is None:
            return None
        grants = self.companions.open_grant(kept)
        self.directory.device_list = kept
        self.spaces.forget_failures()
        return merge_batches([grants, WriteBatch(records={"account/list": kept.encode()})])

    def follow(
        self, data: bytes, *, trusted: bool, contact_key: bytes | None = None
    ) -> WriteBatch | None:
        """Adopt a newer signed device list of another account (ours: see
        :meth:`offer_device_list`); None if we hold it already.

        An account we do not follow yet is taken when ``trusted`` (its list came inside
        a grant from a device we trust), or when we took its contact code and the list is
        signed by the account key the code named (the first connection brings it);
        otherwise ContactError. RollbackRefused for an older version, DeviceListError for
        a forged one or one not signed by the code's key.
        """
        try:
            offered = DeviceList.decode(data)
        except WireError as exc:
            raise DeviceListError(f"device list is malformed: {exc}") from exc
        if offered.account_id == self.account_id:
            return self.offer_device_list(data)
        batch, adopted = self.directory.follow_other(
            offered, trusted=trusted, contact_key=contact_key
        )
        if adopted:
            self.spaces.forget_failures()  # its new devices' entries may verify now
        return batch

    # ---- what the parts hold, under the names the runtime and tests use ------------

    @property
    def spaces(self) -> Spaces:
        """Every space held, by id (one map, shared by all the parts)."""
        return self._spaces

    @property
    def device_list(self) -> DeviceList:
        return self.directory.device_list

    @device_list.setter
    def device_list(self, device_list: DeviceList) -> None:
        self.directory.device_list = device_list

    @property
    def accounts(self) -> dict[str, DeviceList]:
        return self.directory.accounts

    @property
    def contact_anchors(self) -> dict[str, tuple[bytes, str]]:
        return self.directory.contact_anchors

    @property
    def set_aside(self) -> dict[str, ChatCorrupt]:
        return self.spaces.set_aside

    @property
    def boot(self) -> int:
        return self.spaces.boot

    @property
    def history(self) -> Callable[[str], Iterable[bytes]] | None:
        return self.spaces.history

    @history.setter
    def history(self, history: Callable[[str], Iterable[bytes]] | None) -> None:
        self.spaces.history = history

    @property
    def lease(self) -> bytes:
        return self.companions.lease

    @lease.setter
    def lease(self, lease: bytes) -> None:
        self.companions.lease = lease

    @property
    def list_floor(self) -> int:
        return self.companions.list_floor

    @property
    def counter(self) -> int:
        return self.sealing.counter

    @property
    def counters_wanted(self) -> bool:
        return self.sealing.counters_wanted

    @property
    def replay(self) -> dict[str, envelope.ReplayWindow]:
        return self.sealing.replay

    @property
    def clock(self) -> HybridClock:
        return self.author.clock

    @property
    def unsaved(self) -> WriteBatch:
        return self.index.unsaved

    # ---- the parts' operations, under the names the runtime and tests use ----------

    def space(self, space_id: str) -> Space:
        return self.spaces.space(space_id)

    def chat_by_name(self, name: str) -> Space:
        return self.spaces.chat_by_name(name)

    def put_aside(self, space_id: str, error: P2PError | ValueError) -> ChatCorrupt:
        return self.spaces.put_aside(space_id, error)

    def contact_key(self) -> bytes:
        return self.directory.contact_key()

    def list_of(self, account_id: str) -> DeviceList | None:
        return self.directory.list_of(account_id)

    def account_key_of(self, account_id: str) -> bytes | None:
        return self.directory.account_key_of(account_id)

    def current_signing_key(self, device_id: str) -> bytes:
        return self.directory.current_signing_key(device_id)

    def any_signing_key(self, device_id: str) -> bytes | None:
        return self.directory.any_signing_key(device_id)

    def belongs(self, device_id: str, account_id: str) -> bool:
        return self.directory.belongs(device_id, account_id)

    def client_account(self, client: int) -> str | None:
        return self.directory.client_account(client)

    def discovery_key(self) -> bytes:
        """The newest discovery key (see :meth:`Directory.discovery_keys`)."""
        return self.directory.discovery_keys()[0]

    def discovery_keys(self) -> list[bytes]:
        return self.directory.discovery_keys()

    def spaces_for(self, device_id: str, device_list: DeviceList | None = None) -> list[str]:
        return self.directory.spaces_for(device_id, device_list)

    def readers_of(self, space_id: str) -> set[str]:
        return self.directory.readers_of(space_id)

    def followed_devices(self) -> list[str]:
        return self.directory.followed_devices()

    def enroll(self, new_device: DeviceKeys, name: str) -> tuple[Enrollment, WriteBatch]:
        """Primary only: :meth:`enroll_public` for a device made in this process (tests;
        in the real flow a companion's private keys never leave it)."""
        entry = DeviceEntry.of(new_device, self.device_list.account_pk, name, "companion")
        return self.companions.enroll_public(entry)

    def enroll_public(
        self, entry: DeviceEntry, *, now_ms: int | None = None
    ) -> tuple[Enrollment, WriteBatch]:
        return self.companions.enroll_public(entry, now_ms=now_ms)

    def propose_enrollment(
        self, entry: DeviceEntry, *, now_ms: int | None = None
    ) -> tuple[Enrollment, DeviceList, WriteBatch]:
        return self.companions.propose_enrollment(entry, now_ms=now_ms)

    def adopt_enrollment(
        self, base: DeviceList, proposed: DeviceList, entry: DeviceEntry
    ) -> WriteBatch:
        return self.companions.adopt_enrollment(base, proposed, entry)

    def issue_lease(self, device_id: str, now_ms: int | None) -> bytes:
        return self.companions.issue_lease(device_id, now_ms)

    def accept_lease(self, data: bytes, now_ms: int) -> WriteBatch:
        return self.companions.accept_lease(data, now_ms)

    def unlink(self, device_id: str) -> WriteBatch:
        return self.companions.unlink(device_id)

    def observe(self, ts: str, wall_ms: int) -> None:
        self.author.observe(ts, wall_ms)

    def new_entry(
        self, space_id: str, kind: Kind, wall_ms: int, *, body: str = "", target: str = ""
    ) -> Entry:
        return self.author.new_entry(space_id, kind, wall_ms, body=body, target=target)

    def write_local(self, space_id: str, entries: list[Entry]) -> tuple[bytes, WriteBatch]:
        return self.author.write_local(space_id, entries)

    def load_checked(self, space_id: str, store: Store, *, finish: bool = True) -> list[Entry]:
        return self.author.load_checked(space_id, store, finish=finish)

    def lacks_own(self, space_id: str, store: Store) -> bool:
        return self.author.lacks_own(space_id, store)

    def recheck(self, space_id: str, hidden: list[IndexRow]) -> WriteBatch:
        return self.index.recheck(space_id, hidden)

    def take_unsaved(self) -> WriteBatch:
        return self.index.take_unsaved()

    def seal(self, space_id: str, payload: bytes) -> bytes:
        return self.sealing.seal(space_id, payload)

    def grant_counters(self, reserved: int) -> None:
        self.sealing.grant_counters(reserved)

    def state_vector(self, space_id: str) -> bytes:
        return self.spaces.space(space_id).replica.state_vector()

    def first_needed(self, space_id: str, state_vector: bytes, peer: str | None = None) -> int:
        return self.sealing.first_needed(space_id, state_vector, peer)

    def stored_pieces(
        self, space_id: str, state_vector: bytes, peer: str | None, start: int, limit: int
    ) -> Iterator[bytes]:
        return self.sealing.stored_pieces(space_id, state_vector, peer, start, limit)

    def answers_from_store(self, space_id: str) -> bool:
        """Whether a peer's catch-up in this space can be answered from the store
        without loading the document (see ``Spaces.stored_diff``)."""
        space = self.spaces.get(space_id)
        return (
            space is not None
            and self.spaces.store is not None
            and not space.replica.loaded
            and space.replica.vector_known
        )

    def has_document(self, space_id: str) -> bool:
        """Whether a space's document is loaded (one we do not hold: nothing to load)."""
        space = self.spaces.get(space_id)
        return space is None or space.replica.loaded

    def diff(self, space_id: str, state_vector: bytes, peer: str | None = None) -> bytes:
        return self.sealing.diff(space_id, state_vector, peer)

    def space_key(self, space_id: str, epoch: int) -> bytes:
        return self.sealing.space_key(space_id, epoch)

    def ingest(self, data: bytes, held: HeldIndex | None = None) -> Ingested:
        return self.sealing.ingest(data, held)

    def new_conversation(self, name: str, members: list[str]) -> tuple[str, WriteBatch]:
        return self.conversations.new_conversation(name, members)

    def add_members(self, space_id: str, accounts: list[str]) -> WriteBatch:
        return self.conversations.add_members(space_id, accounts)

    def space_grant(self, space_id: str, shown: DeviceList | None = None) -> SpaceGrant:
        return self.conversations.space_grant(space_id, shown)

    def grant_to(
        self, device_id: str, space_id: str, device_list: DeviceList | None = None
    ) -> bytes | None:
        return self.conversations.grant_to(device_id, space_id, device_list)

    def grants_for(self, device_id: str, device_list: DeviceList | None = None) -> list[bytes]:
        return self.conversations.grants_for(device_id, device_list)

    def accept_grant(self, data: bytes) -> tuple[str, bool, WriteBatch]:
        return self.conversations.accept(data)

    def departed(self, space_id: str) -> set[str]:
        return self.conversations.departed(space_id)

    def rotates_for(self, space_id: str, departed: set[str]) -> bool:
        return self.conversations.rotates_for(space_id, departed)

    def heals_split(self, space_id: str) -> bool:
        return self.conversations.heals_split(space_id)

    def rotate_without(self, space_id: str, departed: set[str]) -> WriteBatch:
        return self.conversations.rotate_without(space_id, departed)

    def contact_entries(self) -> dict[str, Contact]:
        return self.contacts.entries()

    def learn_contacts(self) -> WriteBatch:
        return self.contacts.learn()

    def take_contact(self, account_pk: bytes, key: bytes, primary: str) -> WriteBatch:
        return self.contacts.take(account_pk, key, primary)

    def contact_entry(
        self, name: str, account_pk: bytes, key: bytes, primary: str, wall_ms: int
    ) -> tuple[str, Entry]:
        return self.contacts.entry(name, account_pk, key, primary, wall_ms)

    def receipt_body(self, space_id: str) -> str:
        return self.receipts.body(space_id)

    def delivery(self, space_id: str, messages: list[Message]) -> dict[str, Delivery]:
        return self.receipts.delivery(space_id, messages)
