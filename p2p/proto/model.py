"""The chat data model on pycrdt: one :class:`Replica` per space.

Layout (chosen by measurement, see docs/architecture.md): a space document holds five
``Map``s whose values are *plain dicts* with string fields only (pycrdt turns numbers into
floats; a Map of plain dicts took inserts ~10x faster than an Array of Maps, measured):

====  =================  ==========================================================
map   key                value
====  =================  ==========================================================
m     message id         the message: author account/device, HLC ``ts``, body (kind
                         ``msg``; or ``file``: caption and attachment descriptor)
e     edit id            an edit: target message id, new body
x     target id          a deletion tombstone of the target message
r     target/account     the account's reaction to the target ("" = withdrawn)
k     device id          read marker: the newest ``ts`` that device has shown
v     device id          delivery receipt: per author device, the newest ``ts`` of its
                         entries this device holds (a prefix: CRDT updates of one
                         author apply in its clock order, which is its ``ts`` order)
c     account id         account space only: a contact (name, signed device list)
l     account id         that account left the conversation (its members rotate the key)
====  =================  ==========================================================

Every entry is immutable once written (edits and deletions are entries of their own) and
carries the author device's Ed25519 signature over its canonical bytes, bound to the
space. A reader verifies before showing; what fails is hidden and reported, whichever peer
relayed it. Display order is ``(ts, device, id)``: the same on every replica.
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import operator
import os
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import pycrdt

from p2p.errors import BadSignature, DocumentNeeded, InvalidUpdate, P2PError, PoisonedReplica
from p2p.media.descriptor import Attachment, parse_file_body
from p2p.proto.clock import is_ts
from p2p.proto.identity import DeviceKeys, verify
from p2p.proto.wire import MAX_FRAME, pack
from p2p.proto.ymap import ItemId, Struct, encode_sets, read_structs, value_at
from p2p.proto.ysplit import trim_update
from p2p.proto.yupdate import Deps, check_update, encode_uvar, read_varint, strip_deletions

DOMAIN_ENTRY: Final = b"p2p/entry/v1\x00"
MAX_BODY: Final = 64 * 1024
"""Longest message body in bytes of UTF-8."""
MAX_UPDATE: Final = MAX_FRAME
# The root maps of a space's document, one per kind of entry. Their names are one
# letter because every entry's key is stored with its map's name, in every update.
MESSAGES: Final = "m"
"""Messages (``msg`` and ``file`` entries), under their ids."""
EDITS: Final = "e"
"""Edits of messages, under their ids."""
DELETIONS: Final = "x"
"""Deletions, under the id of the message they delete."""
REACTIONS: Final = "r"
"""Reactions, under ``<message id>/<account>``."""
READ_MARKERS: Final = "k"
"""Read markers, under the device that showed the chat."""
RECEIPTS: Final = "v"
"""Delivery receipts, under the device that holds the messages."""
CONTACTS: Final = "c"
"""The contact book (the account space only), under the contact's account."""
LEAVES: Final = "l"
"""Leave entries of a conversation, under the account that left."""
MAPS: Final = (MESSAGES, EDITS, DELETIONS, REACTIONS, READ_MARKERS, RECEIPTS, CONTACTS, LEAVES)
INDEXED: Final = (MESSAGES, EDITS, DELETIONS, REACTIONS)
"""The maps whose changes :meth:`Replica.apply` reports (the message index mirrors them:
``p2p.storage.base.INDEXED_MAPS``)."""

Kind = Literal["msg", "edit", "del", "react", "read", "rcpt", "contact", "leave", "file"]
_MAP_OF_KIND: Final[dict[str, str]] = {
    "msg": MESSAGES,
    "file": MESSAGES,  # a message with an attachment (p2p.media): body = caption + descriptor
    "edit": EDITS,
    "del": DELETIONS,
    "react": REACTIONS,
    "read": READ_MARKERS,
    "rcpt": RECEIPTS,
    "contact": CONTACTS,
    "leave": LEAVES,
}
FRESH_KINDS: Final = frozenset({"msg", "file", "edit"})
"""Kinds whose entry goes under a key of its own, new by construction (its own id): one
that overwrites nothing, so it can be written without the history (``Replica.write``)."""
SIDE: Final = (READ_MARKERS, RECEIPTS, CONTACTS, LEAVES)
"""The maps outside the message index: a few keys (one per device or account), each
value replaced in place. Their current items ("side heads") are known without the
document (see :meth:`Replica.side_values`)."""
SIDE_KINDS: Final = frozenset({"read", "rcpt"})
"""Kinds of ours that replace a side value; written without the history once the side
heads are known (``Replica.write``)."""
LEARN_LATER: Final = 4 * 1024 * 1024
"""Bytes of stored updates that continue one not read yet, held while the key chains
are read from a store (``Replica.learn_chains``); past it, the chat loads instead (a
history this far out of order is the document's to order)."""
CHAINED_KINDS: Final = frozenset({"react", "del"})
"""Kinds of ours that may replace an indexed value (a reaction changed, a message
deleted again): written without the history while the key chains are followed, which
know the item holding each key's value (``Replica.write``)."""
Heads = dict[tuple[str, str], tuple[int, int, Any]]
"""(side map, key) -> (client, clock, value) of the item holding the key's value."""
HeldKeys = Callable[[list[tuple[str, str]]], dict[Any, str]]
"""Of these (indexed map, key) pairs, those the message index holds, with the account
of each (``Store.index_held``): what tells a key new without the document."""
_FIELDS: Final = ("id", "k", "a", "d", "ts", "t", "b", "sig")
_FIELD_SET: Final = frozenset(_FIELDS)
_field_values: Final = operator.itemgetter(*_FIELDS)
_ONLY_STR: Final = {str}


def new_id() -> str:
    """A random entry id (80 bits, hex)."""
    return os.urandom(10).hex()


@dataclass(frozen=True, kw_only=True)
class Entry:
    """One signed record of a space (message, edit, deletion, reaction, read marker)."""

    id: str
    kind: Kind
    account: str
    device: str
    ts: str
    target: str = ""
    """Message the entry is about (empty for a message itself)."""
    body: str = ""
    sig: str = ""
    """Base64 of the author device's signature."""

    def canonical(self, space: str) -> bytes:
        """The bytes its signature covers, bound to ``space``. Memoised on the instance
        (an entry is signed, cached and judged in one space; each needs these bytes)."""
        memo: tuple[str, bytes] | None = self.__dict__.get("_canonical")
        if memo is not None and memo[0] == space:
            return memo[1]
        data = pack(
            [space, self.kind, self.id, self.account, self.device, self.ts, self.target, self.body]
        )
        self.__dict__["_canonical"] = (space, data)  # not a field: eq and hash ignore it
        return data

    def signed(self, space: str, device: DeviceKeys) -> Entry:
        """This entry with ``device``'s signature over its canonical bytes."""
        canonical = self.canonical(space)
        signature = base64.b64encode(device.sign(DOMAIN_ENTRY, canonical)).decode("ascii")
        entry = Entry(
            id=self.id,
            kind=self.kind,
            account=self.account,
            device=self.device,
            ts=self.ts,
            target=self.target,
            body=self.body,
            sig=signature,
        )
        entry.__dict__["_canonical"] = (space, canonical)
        return entry

    def map_name(self) -> str:
        """The space map entries of its kind live in (see the module docstring)."""
        return _MAP_OF_KIND[self.kind]

    def key(self) -> str:
        """Its key in the space's map of its kind."""
        if self.kind == "del":
            return self.target
        if self.kind == "react":
            return f"{self.target}/{self.account}"
        if self.kind in ("read", "rcpt"):
            return self.device
        if self.kind == "contact":
            return self.target
        if self.kind == "leave":
            return self.account
        return self.id

    def to_value(self) -> dict[str, str]:
        return {
            "id": self.id,
            "k": self.kind,
            "a": self.account,
            "d": self.device,
            "ts": self.ts,
            "t": self.target,
            "b": self.body,
            "sig": self.sig,
        }

    @classmethod
    def from_value(cls, value: object) -> Entry | None:
        """Parse a stored value; None if it is not shaped like an entry. (Run for every
        entry that arrives and every index row read: the checks are C calls.)"""
        if type(value) is not dict or value.keys() != _FIELD_SET:
            return None
        fields = _field_values(value)
        if set(map(type, fields)) != _ONLY_STR:
            return None
        id_, kind, account, device, ts, target, body, sig = fields
        if kind not in _MAP_OF_KIND or not is_ts(ts):
            return None
        # UTF-8 takes at most 4 bytes a code point (3 for a lone surrogate)
        if len(body) > MAX_BODY // 4 and len(body.encode("utf-8", "surrogatepass")) > MAX_BODY:
            return None
        return cls(
            id=id_,
            kind=kind,
            account=account,
            device=device,
            ts=ts,
            target=target,
            body=body,
            sig=sig,
        )


def may_open(map_name: str, key: str, account: str, belongs: DeviceInAccount) -> bool:
    """Whether a device of ``account`` may write the first value under ``key`` (see
    :meth:`Entry.key`): read markers and receipts under its account's devices,
    reactions and leave entries under its account. Keys known before their owner
    writes them would otherwise be squatted: the owner's write then replaces another
    account's item, which every other account refuses (``DeviceState.ingest``). Entry
    ids are random; a deletion's key is its message's id, whose author the receiver
    checks against the message it holds (``DeviceState._refused_key``)."""
    if map_name in (READ_MARKERS, RECEIPTS):
        return belongs(key, account)
    if map_name == REACTIONS:
        return key.rpartition("/")[2] == account
    if map_name == LEAVES:
        return key == account
    return True


@dataclass(frozen=True, kw_only=True)
class Message:
    """A message as shown: edits applied, deletion and reactions folded in."""

    id: str
    chat: str
    ts: str
    device: str
    account: str
    text: str
    edited: bool = False
    deleted: bool = False
    reactions: dict[str, str] = field(default_factory=dict)
    """Account id -> emoji."""
    attachment: Attachment | None = None
    """The file this message carries (p2p.media), if any."""

    def sort_key(self) -> tuple[str, str, str]:
        return (self.ts, self.device, self.id)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "chat": self.chat,
            "ts": self.ts,
            "device": self.device,
            "account": self.account,
            "text": self.text,
            "edited": self.edited,
            "deleted": self.deleted,
            "reactions": dict(self.reactions),
            **({"file": self.attachment.summary()} if self.attachment else {}),
        }


@dataclass(frozen=True, kw_only=True)
class Rejected:
    """An entry hidden from the view: why, and who it claims to be from."""

    space: str
    entry_id: str
    device: str
    reason: str


SigningKeyLookup = Callable[[str], "bytes | None"]
"""device id -> its signing key (current or removed device), None if never known."""
DeviceInAccount = Callable[[str, str], bool]
"""(device id, account id) -> whether that account's signed list holds (or held) the
device. Asked as a pair: another account may list the same public key as its own."""


Judged = Entry | Rejected
"""What a check of one stored value gives: the entry to show, or why it is hidden."""


def judge(
    space: str,
    key: str,
    entry: Entry | None,
    signing_key_of: SigningKeyLookup,
    belongs: DeviceInAccount,
    verified: dict[bytes, bool] | None = None,
    *,
    vouched_by: str = "",
) -> Judged:
    """The one check every entry passes before a reader sees it, CRDT view and index
    alike: well-formed, filed under its own key, signed by its device, and that device
    belongs to the account it names. ``verified`` caches signature checks, keyed by
    :func:`fingerprint` (the whole entry: an entry reusing another's id and signature
    with any field changed is checked afresh).

    ``vouched_by``: the device whose signature over the envelope that brought this value
    was just checked. An entry that device authored is authenticated by that signature
    already, so its own is not checked again here (an Ed25519 verification per entry
    per receiver was the largest cost of receiving); a device that gets the entry
    relayed by anyone else checks the entry's own signature. See security.md, "Entry
    signatures", for what this leaves to a dishonest author."""
    if entry is None:
        return Rejected(space=space, entry_id=key, device="?", reason="malformed")
    canonical = entry.canonical(space)
    cache_key = fingerprint(canonical, entry.sig)
    ok = None if verified is None else verified.get(cache_key)
    if ok is None:
        ok = entry.key() == key and (
            (vouched_by != "" and entry.device == vouched_by)
            or _verify_entry(canonical, entry, signing_key_of)
        )
        if verified is not None:
            verified[cache_key] = ok
    if not ok:
        return Rejected(space=space, entry_id=entry.id, device=entry.device, reason="bad signature")
    if entry.kind == "file":
        try:
            parse_file_body(entry.body)
        except P2PError as exc:
            return Rejected(space=space, entry_id=entry.id, device=entry.device, reason=str(exc))
    if not belongs(entry.device, entry.account):
        return Rejected(space=space, entry_id=entry.id, device=entry.device, reason="wrong account")
    return entry


def fingerprint(canonical: bytes, sig: str) -> bytes:
    """What a cached signature check is keyed by: a digest of the entry's canonical
    bytes and its signature (16 bytes, whatever the body's size)."""
    digest = hashlib.blake2b(canonical, digest_size=16, person=b"p2p-entry-check")
    digest.update(sig.encode("utf-8", "surrogatepass"))
    return digest.digest()


def fold(
    space: str,
    messages: list[Entry],
    edits: list[Entry],
    deletes: list[Entry],
    reactions: list[Entry],
) -> list[Message]:
    """Messages in display order from checked entries of the four chat maps.

    The one place that says what edits, deletions and reactions do. Entries about
    messages not among ``messages`` are ignored, so folding a page of messages with the
    entries about them gives exactly that page of the whole view.
    """
    by_id = {e.id: e for e in messages if e.kind in ("msg", "file")}
    files: dict[str, tuple[str, Attachment]] = {}
    for e in [e for e in by_id.values() if e.kind == "file"]:
        try:
            files[e.id] = parse_file_body(e.body)  # checked by judge: only a guard here
        except P2PError:
            del by_id[e.id]
    latest_edit: dict[str, Entry] = {}
    for e in edits:
        target = by_id.get(e.target)
        if e.kind != "edit" or target is None or target.account != e.account:
            continue  # only the author's account edits its message
        best = latest_edit.get(e.target)
        if best is None or (e.ts, e.device, e.id) > (best.ts, best.device, best.id):
            latest_edit[e.target] = e
    deleted = {
        e.target
        for e in deletes
        if e.kind == "del" and e.target in by_id and by_id[e.target].account == e.account
    }
    reacted: dict[str, dict[str, str]] = {}
    for e in reactions:
        if e.kind == "react" and e.target in by_id and e.body:
            reacted.setdefault(e.target, {})[e.account] = e.body
    shown = []
    for m in by_id.values():
        edit = latest_edit.get(m.id)
        is_deleted = m.id in deleted
        caption, attachment = files.get(m.id, (m.body, None))
        shown.append(
            Message(
                id=m.id,
                chat=space,
                ts=m.ts,
                device=m.device,
                account=m.account,
                text="" if is_deleted else (edit.body if edit else caption),
                edited=edit is not None and not is_deleted,
                deleted=is_deleted,
                reactions=reacted.get(m.id, {}),
                attachment=None if is_deleted else attachment,
            )
        )
    shown.sort(key=Message.sort_key)
    return shown


class _Unread:
    """The type of :data:`UNREAD`."""


UNREAD: Final = _Unread()
"""A changed key whose new value was not seen: read it from the document."""
Changes = dict[tuple[str, str], Any]
"""(map, key) -> the key's new value (None once removed, UNREAD if not seen)."""
_DELETED_CONTENT: Final = 1
"""The content kind of a run of deleted items (``p2p.proto.yupdate``'s numbering)."""
_EVERY: Final = ("*", "*")
"""Marks changes whose keys could not be read (see ``_KeyWatch``)."""


@dataclass(frozen=True)
class Applied:
    """What :meth:`Replica.apply` did: the keys whose value changed, with their new
    values (for the message index), and the CRDT clients the update wrote or deleted
    structs of."""

    changed: Changes
    clients: frozenset[int]
    took_held: bool = False
    """Whether structs held back from earlier updates may have come in with this one
    (see :class:`~p2p.proto.yupdate.Deps`): then not every changed value is this
    update's, and none may be taken on the word of its envelope's signer."""


UpdateSource = Callable[[], Iterable[bytes]]
"""Where a lazily loaded replica finds its history: snapshot first, then the tail."""
AuthorSource = Callable[[], dict[str, str]]
"""Per author device, the newest ``ts`` of its messages in that history."""


class _KeyWatch:
    """Where the map observers note the keys an :meth:`Replica.apply` changed.

    Apart from the replica on purpose: the document holds the observers, so an observer
    holding the replica would make a cycle through yrs, which Python's collector cannot
    see, and no replica would ever be freed."""

    __slots__ = ("changes", "side")

    def __init__(self) -> None:
        self.changes: Changes | None = None
        """Where to note changes now (None: not watching)."""
        self.side: Changes | None = None
        """Where to note changes of the side maps (see :data:`SIDE`)."""

    def observer(self, name: str) -> Callable[[Any], None]:
        side = name in SIDE

        def note(event: Any) -> None:
            # runs inside pycrdt's transaction: it must never raise (it would resurface
            # in the writer as an exception group); if reading the event fails, the
            # whole map counts as changed (slow, never wrong)
            changed = self.side if side else self.changes
            if changed is None:
                return  # our own writes, or history loading: nothing to report
            try:
                for key, change in event.keys.items():
                    removed = change.get("action") == "delete"
                    changed[(name, str(key))] = None if removed else change.get("newValue")
            except Exception:
                changed[(name, "")] = UNREAD
                changed[_EVERY] = UNREAD

        return note


class Replica:
    """One space's pycrdt document, with the chat schema on top.

    Not thread-safe and free of I/O: the node feeds it updates and persists what it
    returns. ``apply`` is the only door for bytes from outside and maps every pycrdt
    failure to InvalidUpdate; a panic (pyo3's ``PanicException``, a BaseException)
    also throws the half-changed document away and rebuilds it (PoisonedReplica).

    With a ``source``, the document is loaded from it on first use (or by :meth:`load`):
    opening a store does not pay for a long history until sync or a write needs it,
    since readers are served by the message index (``p2p.state.device.index_view``).
    """

    def __init__(
        self,
        space: str,
        *,
        source: UpdateSource | None = None,
        authors: AuthorSource | None = None,
        client_id: int | None = None,
        reload: UpdateSource | None = None,
        state_vector: bytes | None = None,
        heads: Heads | None = None,
    ) -> None:
        """``client_id``: the CRDT client this device writes as in this run (bound to
        the device, see ``core.crdt_client``); None for a random one. ``authors``: what
        :meth:`newest_by_device` says of the history in ``source`` (the message index
        knows it), read when the history is loaded, so that neither it nor
        :attr:`latest_ts` scans the whole document on the trio thread later.
        ``reload``: the whole history as it stands when called (durable, and what is
        on its way to the store), to rebuild the document from after an update made
        pycrdt panic (see :meth:`apply`); without it, ``source``. ``state_vector``: the
        stored history's state vector, known without loading it (see
        :meth:`state_vector`); ``heads``: its side heads (see :meth:`side_values`)."""
        self.space = space
        self._source = source
        self._origin = source
        """Where the history loads from again after :meth:`unload`."""
        self._known_sv = state_vector if source is not None else None
        """The state vector of the history not loaded (None: unknown, load to learn it)."""
        self._heads: Heads | None = (
            {} if source is None else dict(heads) if heads is not None else None
        )
        """The side heads (None: unknown, learnt at the next load)."""
        self._aside_clock: int | None = None
        """Our client's next clock while we write without the history (see :meth:`write`)."""
        self._aside_updates: list[bytes] = []
        """Our own updates written without the history, for :meth:`finish_load`."""
        self._built = False
        """The history is applied (in a worker thread) and waits for :meth:`finish_load`."""
        self._reload = reload if reload is not None else source
        self._authors_source = authors
        self._client_id = client_id
        self._watch = _KeyWatch()
        self._new_doc()
        self._verified: dict[bytes, bool] = {}
        self._chains: KeyChains | None = None
        """Followed while a history is taken from empty without the document."""
        self._chains_lost = False
        self._loading = False
        self._latest_ts = ""
        self._scanned = False
        self._authors: dict[str, str] | None = None
        """Device -> newest ``ts`` of its messages here, once :meth:`newest_by_device`
        was asked (then kept up to date by ``apply`` and ``write``)."""

    def _new_doc(self) -> None:
        """An empty document with the chat maps, observed."""
        self._doc: pycrdt.Doc[Any] = pycrdt.Doc(client_id=self._client_id)
        self._sv: dict[int, int] | None = {}
        """The document's state vector as we last knew it (None: ask yrs)."""
        self._held: dict[int, int] = {}
        """Per client, the clock the document must reach before nothing is held back."""
        self._suspects: set[tuple[str, str]] = set()
        """(map, key) named by updates applied while yrs held structs back."""
        self._unsettled: dict[int, int] = {}
        """What the updates from the store need and bring, not yet compared with the
        document (loading compares once, at the end, instead of once per update)."""
        self._map_of = {name: self._doc.get(name, type=pycrdt.Map) for name in MAPS}
        # pycrdt's own ``Map.observe`` converts every event into Python objects again,
        # recursively (~8 us per changed key); the integrated map's observer hands over
        # the event as yrs made it, and we read only its ``keys``. Kept: a dropped
        # subscription stops observing.
        self._observers = [
            self._map_of[name].integrated.observe(self._watch.observer(name))
            for name in (*INDEXED, *SIDE)
        ]

    def _rebuild(self) -> None:
        """Throw the document away and apply the history again (after a panic left it
        half-changed: its state vector may already claim what the update held, and its
        own encoding may panic every document it is applied to). What was learnt from
        the old document's contents is forgotten with it, and found again on demand."""
        self._new_doc()
        self._latest_ts, self._scanned, self._authors = "", False, None
        if self._reload is not None:
            for update in self._reload():
                self.apply(update, from_store=True)
            self._settle()

    @property
    def loaded(self) -> bool:
        """Whether the document holds the stored history (always, without a source)."""
        return self._source is None

    def load(self, check: Callable[[], None] | None = None, *, finish: bool = True) -> None:
        """Apply the stored history now (idempotent); InvalidUpdate if it is refused.

        :attr:`loaded` turns true only once the whole history is in: the node loads in a
        worker thread, and a task that sees ``loaded`` goes on to use the document from
        the trio thread, which must not happen while the worker still applies. ``check``
        runs once the history is in and before :attr:`loaded` turns true, in the same
        thread (it may read the document: see ``DeviceState.load_checked``)."""
        source = self._source
        if source is not None and not self._loading and not self._built:
            self._loading = True
            try:
                for update in source():
                    self.apply(update, from_store=True)  # from_store: never calls load
                self._settle()
                if self._heads is None:
                    self._heads = side_heads(bytes(self._doc.get_update()))
                if self._authors_source is not None:
                    self._authors = dict(self._authors_source())
                    self._latest_ts = max(self._authors.values(), default="")
                    self._scanned = True
                if check is not None:
                    check()
                self._built = True
                if self._chains is not None and self._chains.waiting:
                    self._chains_lost = True  # yrs integrates them unwatched: see above
                self._chains = None  # the document knows every chain now
            finally:
                self._loading = False
        if finish:
            self.finish_load()

    def finish_load(self) -> None:
        """Take in what was written aside meanwhile, and count as loaded. In the thread
        that writes (the trio thread, after a worker built the document): writes aside
        and this never run at once, and no write goes to a document still being built."""
        if self._source is None or not self._built:
            return
        for update in self._aside_updates:  # durable or on their way: both fine
            self.apply(update, from_store=True)
        if self._aside_updates:
            self._settle()
        self._source, self._known_sv, self._built = None, None, False
        self._aside_clock, self._aside_updates = None, []

    @property
    def vector_known(self) -> bool:
        """Whether :meth:`state_vector` answers without loading the history."""
        return self._source is None or self._known_sv is not None

    def unload(self) -> bool:
        """Drop the document, keeping its state vector: the history stays in the store,
        and loads again on first use. Whether it was dropped: not while it loads, holds
        structs back (what it lacks would be forgotten), or has no store to load from.

        The caller keeps the rule that makes this safe: everything the document holds
        is durable (nothing of this space waits for the store), so loading it again
        gives the same document, and our CRDT client's clock goes on where it was."""
        self._chains, self._chains_lost = None, False  # the caller is done taking it
        if self._source is not None or self._origin is None or self._loading:
            return False
        if self._held or self._unsettled:
            return False
        self._known_sv = bytes(self._doc.get_state())
        self._source, self._built = self._origin, False
        self._new_doc()
        self._verified = {}
        self._latest_ts, self._scanned, self._authors = "", False, None
        return True

    def lacks(self, keys: Iterable[tuple[str, str]]) -> bool:
        """Whether any of these (map, key) pairs has no value here. Reads the maps' keys
        only: a value costs a conversion to Python, a key does not."""
        held: dict[str, set[str]] = {}
        for map_name, key in keys:
            if map_name not in held:
                held[map_name] = set(self._maps[map_name].keys())
            if key not in held[map_name]:
                return True
        return False

    @property
    def doc(self) -> pycrdt.Doc[Any]:
        self.load()
        return self._doc

    @property
    def _maps(self) -> dict[str, pycrdt.Map[Any]]:
        self.load()
        return self._map_of

    @property
    def latest_ts(self) -> str:
        """The greatest timestamp of any entry here (not verified: only a hint for the
        local clock, which bounds how far it follows). The first call scans the
        document once; after that :meth:`apply` watches what remote updates bring (our
        own writes carry our own clock's timestamps: nothing to learn from them)."""
        if not self._scanned:
            self._scanned = True
            stamps = (v.get("ts") for _, v in self._maps[MESSAGES].items() if isinstance(v, dict))
            self._latest_ts = max(
                [self._latest_ts, *(t for t in stamps if isinstance(t, str) and is_ts(t))]
            )
        return self._latest_ts

    def newest_by_device(self) -> dict[str, str]:
        """Per author device, the newest ``ts`` of its messages this replica holds (not
        verified: what a delivery receipt states). The first call scans the messages;
        later updates are watched."""
        self._authors_from_index()
        if self._authors is None:
            self._authors = {}
            for _, value in self._maps[MESSAGES].items():
                self._note_author(value)
        return dict(self._authors)

    def _note_author(self, value: object) -> None:
        if not isinstance(value, dict) or self._authors is None:
            return
        device, ts = value.get("d"), value.get("ts")
        if not (isinstance(device, str) and isinstance(ts, str) and is_ts(ts)):
            return
        if ts > self._authors.get(device, ""):
            self._authors[device] = ts

    # ---- bytes in and out ----------------------------------------------------------

    def apply(
        self,
        update: bytes,
        *,
        from_store: bool = False,
        allowed: Callable[[int], bool] | None = None,
        opens: Callable[[list[tuple[str, str]]], str | None] | None = None,
        held: HeldKeys | None = None,
    ) -> Applied:
        """Integrate an update (idempotent); InvalidUpdate if pycrdt refuses it.

        Returns the keys of the chat maps whose value it changed, with their new values
        (as pycrdt's change events report them), for the message index, and the CRDT
        clients it touched (wrote, deleted or referred to structs of). What a peer
        sends is bounded by MAX_UPDATE; our own store's snapshots (``from_store``) grow
        with the history, are only checked for structure, and are not watched (their
        keys are indexed already). ``allowed`` (when given) must accept every client the
        update touches: another account's device may only touch its own account's
        clients, so it can neither occupy, replace nor delete another's structs.
        ``opens`` (when given) is asked about the (map, key) pairs the update names
        and says which one its sender may not open, if any (``DeviceState.ingest``).

        Should pycrdt panic part-way all the same, the document is rebuilt from its
        history (``reload``) and PoisonedReplica raised: the update is not kept.

        With ``held`` and the history not loaded, the update is applied without it when
        it can be (see :meth:`_aside_plan`), else DocumentNeeded is raised and nothing
        changes: the caller loads the history, then applies it again.
        """
        if not from_store and len(update) > MAX_UPDATE:
            raise InvalidUpdate(self.space, f"{len(update)} bytes exceed {MAX_UPDATE}")
        opened: list[tuple[str, str]] | None = None if opens is None else []
        deps = Deps()
        clients = check_update(update, self.space, opened, deps)  # before pycrdt trusts it
        if allowed is not None and not all(allowed(c) for c in clients):
            raise InvalidUpdate(
                self.space, "the update touches CRDT clients of another account than its sender's"
            )
        if from_store and self._source is None:
            self._heads = None  # a history not followed struct by struct: learn at a load
        plan = None
        if held is not None and self._source is not None:
            self.follow_chains()  # a space empty here: a folded snapshot's pieces too
            plan = self._aside_plan(update, deps, held, others=opens is not None)
            if plan is None:
                raise DocumentNeeded(self.space)
        if plan is None and not from_store:
            self.load()  # the history first: the changes seen, and what ``opens`` reads
        if opens is not None:
            refused = opens(opened or [])
            if refused is not None:
                raise InvalidUpdate(
                    self.space, f"the update opens {refused}, which is not its sender's"
                )
        if plan is not None:
            return self._apply_aside(plan, clients)
        changed: Changes = {}
        side: Changes = {}
        self._watch.changes = None if from_store else changed
        self._watch.side = None if from_store else side
        took_held = bool(self._held or self._unsettled)
        try:
            self._doc.apply_update(update)
        except (KeyboardInterrupt, SystemExit, GeneratorExit):
            raise
        except Exception as exc:  # pycrdt could not decode it: nothing was integrated
            raise InvalidUpdate(self.space, f"{type(exc).__name__}: {str(exc)[:120]}") from None
        except BaseException as exc:  # pycrdt panics are BaseExceptions (PyO3)
            reason = f"{type(exc).__name__}: {str(exc)[:120]}"
            if from_store:  # the history itself: nothing better to rebuild from
                raise InvalidUpdate(self.space, reason) from None
            self._watch.changes = None
            self._rebuild()
            raise PoisonedReplica(self.space, reason) from None
        finally:
            self._watch.changes = self._watch.side = None
        self._track(deps, settle=not from_store)
        if side and self._heads is not None:
            self._follow_heads(update, side)
        if not from_store and (took_held or self._held) and not self._heads_agree():
            self._heads = None  # held structs came in and changed a side value: learn at load
        if not from_store and (took_held or self._held):
            # yrs's map events are not to be trusted where held structs came in (a key
            # reported with a value it does not hold, or a change not reported): the
            # keys reported, the keys of this update and of every update held back
            # since are read from the maps as they now stand
            if opened is None:  # read again, on this rare path only
                opened = []
                check_update(update, self.space, opened)
            self._suspects.update(k for k in opened if k[0] in INDEXED)
            for map_key in (*changed, *self._suspects):
                if map_key != _EVERY:
                    changed[map_key] = UNREAD
            if not self._held:
                self._suspects = set()
        if _EVERY in changed:
            names = {name for name, _ in changed if name != "*"}
            changed = {(name, key): UNREAD for name in sorted(names) for key in self._map_of[name]}
        self._note_changes(changed)
        return Applied(changed=changed, clients=clients, took_held=took_held)

    def _note_changes(self, changed: Changes) -> None:
        """Keep what was learnt of the history (its newest ``ts`` once scanned, each
        author's newest message once asked) after an update changed these keys."""
        if not (self._scanned or self._authors is not None):
            return
        for (name, key), value in changed.items():
            if value is UNREAD:
                value = self._map_of[name].get(key)
            ts = value.get("ts") if isinstance(value, dict) else None
            if self._scanned and isinstance(ts, str) and ts > self._latest_ts and is_ts(ts):
                self._latest_ts = ts
            if name == MESSAGES:
                self._note_author(value)

    def _authors_from_index(self) -> None:
        """Learn each author's newest message from the message index (``authors``)
        while the history is not loaded, if not known yet."""
        if self._authors is None and self._source is not None and self._authors_source:
            self._authors = dict(self._authors_source())

    def _track(self, deps: Deps, *, settle: bool) -> None:
        """Note what yrs may now hold back. Cheap while every update finds what it needs
        (the common case: the state vector is kept here, not asked of yrs); otherwise,
        and for what came from the store (``settle`` False: compared once, at the end of
        loading), yrs's state vector says what is still missing."""
        sv = self._sv
        if (
            settle
            and sv is not None
            and not self._held
            and not self._unsettled
            and all(sv.get(c, 0) >= clock for c, clock in deps.needs.items())
        ):
            for client, end in deps.ends.items():
                if end > sv.get(client, 0):
                    sv[client] = end
            return
        wanted = self._unsettled
        for client, clock in (*deps.needs.items(), *deps.ends.items()):
            if clock > wanted.get(client, 0):
                wanted[client] = clock
        self._sv = None
        if settle:
            self._settle()

    def _settle(self) -> None:
        """Compare what was applied with the document: what is missing is held back."""
        sv = decode_state_vector(bytes(self._doc.get_state()))
        for client, clock in self._unsettled.items():
            if clock > self._held.get(client, 0):
                self._held[client] = clock
        self._unsettled = {}
        self._held = {c: clock for c, clock in self._held.items() if sv.get(c, 0) < clock}
        self._sv = sv

    def state_vector(self) -> bytes:
        """What this replica holds, per CRDT client. While the history is not loaded
        (or loads, in a worker thread), the vector known for it is returned instead, if
        one is (with what we wrote aside): a session with a level peer then never loads
        the document."""
        if self._source is not None and self._known_sv is not None:
            return self._known_sv
        return bytes(self.doc.get_state())

    def writes_aside(self, kinds: Iterable[str]) -> bool:
        """Whether entries of these kinds would be written without loading the history
        (see :meth:`write`)."""
        if self._source is None or self._known_sv is None:
            return False
        kinds = set(kinds)
        if FRESH_KINDS.issuperset(kinds):
            return True
        if self._heads is None:
            return False
        if (FRESH_KINDS | SIDE_KINDS).issuperset(kinds):
            return True
        chains = self._chains
        return (
            chains is not None
            and not chains.waiting
            and (FRESH_KINDS | SIDE_KINDS | CHAINED_KINDS).issuperset(kinds)
        )

    def diff(self, state_vector: bytes, keep: Callable[[int], bool] | None = None) -> bytes:
        """What a replica at ``state_vector`` lacks; InvalidUpdate for a bad vector.

        With ``keep``, only what the clients it accepts wrote or deleted: the other
        clients are diffed as if the peer held all of them already."""
        if keep is not None:
            theirs = decode_state_vector(state_vector)
            ours = decode_state_vector(self.state_vector())
            for client, clock in ours.items():
                if not keep(client):
                    theirs[client] = max(clock, theirs.get(client, 0))
            state_vector = encode_state_vector(theirs)
        try:
            update = bytes(self.doc.get_update(state_vector))
        except (KeyboardInterrupt, SystemExit, GeneratorExit):
            raise
        except BaseException as exc:
            raise InvalidUpdate(self.space, f"bad state vector: {str(exc)[:120]}") from None
        return update if keep is None else strip_deletions(update, keep)

    def snapshot(self) -> bytes:
        return bytes(self.doc.get_update())

    def write(self, entries: Iterable[Entry]) -> bytes:
        """Add signed local entries in one transaction; return the update it made.

        While the history is not loaded, entries under keys new by construction
        (:data:`FRESH_KINDS`) and, once the side heads are known, our receipts and read
        markers (:data:`SIDE_KINDS`), and while the key chains are followed our
        reactions and deletions (:data:`CHAINED_KINDS`, naming the item their key's
        list ends with) are written aside: encoded by hand
        (``ymap.encode_sets``) with our client's clocks from where the known state
        vector says ours is, a new key naming no predecessor and a side value naming
        the head it replaces (and deleting it), as ``Map.set`` does in the whole
        document. So a send or a receipt in a long chat needs no load; loading takes
        these updates in. Anything else loads the history first."""
        entries = list(entries)
        if self.writes_aside(e.kind for e in entries):
            return self._write_aside(entries)
        doc = self.doc
        made: list[bytes] = []
        # the transaction's own update: its structs and only the deletions it made (a
        # diff from the state before would carry the document's whole delete set, and
        # a peer taking updates without its document would have to load it for that)
        watch = doc.observe(lambda event: made.append(bytes(event.update)))
        try:
            with doc.transaction():
                for entry in entries:
                    self._map_of[_MAP_OF_KIND[entry.kind]][entry.key()] = entry.to_value()
                    # we signed it ourselves
                    self._verified[fingerprint(entry.canonical(self.space), entry.sig)] = True
                    if entry.kind == "msg":
                        self._note_author(entry.to_value())
        finally:
            doc.unobserve(watch)
        self._sv = None  # our own client moved on: ask yrs next time
        update = made[0] if made else EMPTY_UPDATE  # no entries: no transaction event
        sides = {(e.map_name(), e.key()): e.to_value() for e in entries if e.map_name() in SIDE}
        if sides and self._heads is not None:
            self._follow_heads(update, sides)
        return update

    def _write_aside(self, entries: list[Entry]) -> bytes:
        client = self._doc.client_id
        clock = self._aside_clock
        if clock is None:  # written and dropped in this run already: go on from there
            assert self._known_sv is not None
            clock = decode_state_vector(self._known_sv).get(client, 0)
        heads = self._heads if self._heads is not None else {}
        sets = []
        for at, entry in enumerate(entries):
            name, key, value = entry.map_name(), entry.key(), entry.to_value()
            origin = None
            if name in SIDE:  # replaces the current item (none for a key new here)
                head = heads.get((name, key))
                origin = None if head is None else (head[0], head[1])
                heads[(name, key)] = (client, clock + at, value)
            elif entry.kind in CHAINED_KINDS and self._chains is not None:
                tail = self._chains.tails.get((name, key))  # its value's item, if any
                origin = None if tail is None else tail[0]
            if self._chains is not None and (name in SIDE or entry.kind in CHAINED_KINDS):
                self._chains.wrote((name, key), (client, clock + at))  # ends its list now
            sets.append((name, key, value, origin))
        update = encode_sets(client, clock, sets)
        self._aside_clock = clock + len(sets)
        self._known_sv = _advance(self._known_sv, {client: clock + len(sets)})
        self._aside_updates.append(update)
        return update

    # ---- without the document --------------------------------------------------------

    def side_values(self, map_name: str) -> dict[str, Any] | None:
        """The values of a side map (:data:`SIDE`) by key, without loading the history
        when its side heads are known (else from the document if loaded; None if
        neither)."""
        if self._heads is not None:
            return {k: v for (m, k), (_, _, v) in self._heads.items() if m == map_name}
        if self._source is None:
            return dict(self._map_of[map_name].items())
        return None

    def known_heads(self) -> Heads | None:
        """The side heads (for the store's record), None while unknown (or while an
        item taken by the key chains waits: it may yet be a side value)."""
        if self._heads is None or (self._chains is not None and self._chains.waiting):
            return None
        return dict(self._heads)

    @property
    def follows_chains(self) -> bool:
        """Whether the key chains are followed (:meth:`follow_chains`, :meth:`use_chains`)."""
        return self._chains is not None

    @property
    def chains_unresolved(self) -> bool:
        """Whether items taken by the key chains (:meth:`follow_chains`) are left
        waiting for an item that never came, or the document loaded while some
        waited: their keys' values are then known only to the document (the caller
        builds the index from it)."""
        return self._chains_lost or (self._chains is not None and bool(self._chains.waiting))

    def _aside_plan(
        self, update: bytes, deps: Deps, held: HeldKeys, *, others: bool
    ) -> _AsidePlan | None:
        """How ``update`` applies without the history, or None when it cannot:

        - past the structs we hold already (left out: ``ysplit.trim_update``; an update
          of nothing else changes nothing), it continues exactly where the known state
          vector ends, for every client (no struct held back);
        - every struct is a map set of one value: in an indexed map under a key the
          index does not hold, or in a side map, under a key new here or replacing
          the side head (its origin);
        - it deletes only the side heads it replaces;
        - from another account (``others``), it deletes no message (that check needs
          the message, see ``DeviceState``).

        Then the document would report exactly these keys changed, to these values."""
        if self._heads is None or self._known_sv is None:
            return None
        known = decode_state_vector(self._known_sv)
        if any(start < known.get(c, 0) for c, start in deps._starts.items()):
            # a catch-up racing gossip, or a mesh's second copy: what we hold is left
            # out (its deletions came with it, so an update of nothing else is a no-op)
            try:
                trimmed = trim_update(update, known)
            except InvalidUpdate:
                return None
            if trimmed is None:
                return _AsidePlan()
            update = trimmed
        try:
            structs, deleted = read_structs(update)
        except (IndexError, ValueError, UnicodeDecodeError):
            return None
        plan = _AsidePlan(update=update)
        if _struct_ends(structs, known, plan.ends) is not None:
            return None  # a gap, or a struct we hold in part
        if self._chains is not None:
            return self._chain_plan(
                plan, structs, deleted, self._chains, held, others=others, known=known
            )
        by_id = {(h[0], h[1]): k for k, h in self._heads.items()}
        for st in structs:
            if not st.single_value or st.right is not None or st.parent_id is not None:
                return None
            if st.origin is None:
                map_key = (st.name or "", st.key or "")
                if st.key is None or map_key in plan.indexed or map_key in plan.side:
                    return None
                if st.name in INDEXED:
                    if others and st.name == DELETIONS:
                        return None
                    plan.indexed[map_key] = st
                elif st.name in SIDE and map_key not in self._heads:
                    plan.side[map_key] = st
                    by_id[st.id] = map_key
                else:
                    return None
            else:
                if st.origin not in by_id:
                    return None  # replaces what only the document knows
                map_key = by_id.pop(st.origin)
                plan.side[map_key] = st
                plan.replaced.add(st.origin)
                by_id[st.id] = map_key
        if any(n != 1 or (c, clock) not in plan.replaced for c, clock, n in deleted):
            return None
        if plan.indexed and held(list(plan.indexed)):
            return None
        return plan

    def follow_chains(self, *, waits: bool = False) -> bool:
        """Start following every key's chain of items (:class:`KeyChains`), for a
        history taken from empty without the document: a link's pieces, or a catch-up
        (or the first live update) of a space empty here. Whether it started: only
        while nothing is held here (the chains must know every item); they end when
        the document loads or the replica unloads. ``waits``: an item whose origin is
        not here yet may wait for it (a link, whose caller checks at the end that none
        is left: ``DeviceState.space_taken``); else such an update needs the document."""
        if self._chains is not None:
            return True
        if self._source is None or self._built or self._heads != {}:
            return False
        if self._known_sv != EMPTY_STATE_VECTOR:
            return False
        self._chains = KeyChains(waits=waits)
        return True

    def learn_chains(self, history: Iterable[bytes]) -> LearntChains | None:
        """The key chains of a history held here, read from the store (``history``: the
        snapshot's parts, then the log) struct by struct, without building the document;
        None when they cannot be (a fork, an item following a message, an item left
        waiting: what only the document resolves). Thread-safe: it reads nothing of the
        replica but its rules, so a worker thread runs it; :meth:`use_chains` then
        starts following them, on the thread that applies.

        Why: a chat held here when the node opened follows no chains, and a reaction
        changed in it (live, or while this device was away; ours too) would load its
        whole document. Reading the history
        once costs about what a link of it costs; the chains then cost one tail per key
        ever replaced and one range per run of deleted content."""
        chains = KeyChains(waits=True)
        known: dict[int, int] = {}
        later: dict[int, list[tuple[int, bytes]]] = {}
        """Per client, updates stored before the one they continue (yrs held them
        back), with the clock of that client they wait for."""
        later_bytes = 0

        def nothing_held(keys: list[tuple[str, str]]) -> dict[Any, str]:
            return {}  # the history itself is what is held

        def take(update: bytes) -> tuple[dict[int, int], ItemId | None]:
            """Follow one stored update: (per client, the clock its structs end at;
            None), or ({}, the struct not read yet it continues). _Unlearnable when
            it cannot be followed."""
            try:
                structs, deleted = read_structs(update)
                if any(st.clock < known.get(st.client, 0) for st in structs):
                    trimmed = trim_update(update, known)  # written twice (a load's race)
                    if trimmed is None:
                        return {}, None
                    update = trimmed
                    structs, deleted = read_structs(update)
            except (IndexError, ValueError, UnicodeDecodeError, InvalidUpdate):
                raise _Unlearnable from None
            plan = _AsidePlan(update=update)
            gap = _struct_ends(structs, known, plan.ends)
            if gap is not None:
                if gap[1] < known.get(gap[0], 0):
                    raise _Unlearnable  # a struct held in part
                return {}, gap
            taken = self._chain_plan(
                plan, structs, deleted, chains, nothing_held, others=False, known=known
            )
            if taken is None or taken.chains is None:
                raise _Unlearnable
            chains.take(taken.chains)
            known.update(plan.ends)
            return plan.ends, None

        def follow(update: bytes) -> None:
            """Take ``update``, then what waited for what it brought, in turn."""
            nonlocal later_bytes
            todo = [update]
            while todo:
                update = todo.pop()
                ends, gap = take(update)
                if gap is not None:
                    later.setdefault(gap[0], []).append((gap[1], update))
                    later_bytes += len(update)
                    if later_bytes > LEARN_LATER:
                        raise _Unlearnable  # this far out of order: the document orders it
                    continue
                for client, end in ends.items():
                    waited = later.get(client)
                    if waited:
                        ready = [u for clock, u in waited if clock <= end]
                        later[client] = [(clock, u) for clock, u in waited if clock > end]
                        later_bytes -= sum(map(len, ready))
                        todo += ready

        try:
            for update in history:
                follow(update)
        except _Unlearnable:
            return None
        if later_bytes or chains.waiting:
            return None
        chains.waits = False
        return LearntChains(chains, encode_state_vector(known))

    @property
    def chains_learnable(self) -> bool:
        """Whether :meth:`learn_chains` is worth running: no chains followed yet, the
        document not loaded (nor loading), its state vector and side heads known."""
        return (
            self._chains is None
            and self._source is not None
            and not self._built
            and not self._loading
            and self._heads is not None
            and self._known_sv is not None
        )

    def use_chains(self, learnt: LearntChains) -> bool:
        """Follow the key chains :meth:`learn_chains` read, if they are still this
        replica's (its history unchanged since, the document not loaded meanwhile):
        whether it does. A reaction changed, ours or a peer's, then applies without
        the document, as for a chat taken from empty."""
        if self._chains is not None:
            return True
        if not self.chains_learnable:
            return False
        assert self._known_sv is not None
        if not _same_vector(self._known_sv, learnt.vector):
            return False
        self._chains = learnt.chains
        return True

    def _chain_plan(
        self,
        plan: _AsidePlan,
        structs: list[Struct],
        deleted: list[tuple[int, int, int]],
        chains: KeyChains,
        held: HeldKeys,
        *,
        others: bool,
        known: dict[int, int],
    ) -> _AsidePlan | None:
        """:meth:`_aside_plan` where every item here is known (:class:`KeyChains`):
        each struct is one value or a run of deleted content, and follows its key's
        tail (or opens a key that has none). An item that follows the tail lands
        rightmost in its key's list, where yrs keeps a map key's value: a live one is
        the value (replacing a live tail: a side head, or an indexed value such as a
        reaction changed, whose index row it rewrites),
        a deleted one changes nothing. An item following one not here yet waits for
        it (yrs holds it back the same way), and is placed when it comes. The delete
        set may name only runs of deleted content and the side heads replaced. So a
        folded snapshot (whose replaced items are runs of deleted content, each chain
        ending in its key's value) is taken piece by piece; anything else (a fork, a
        value deleted, an item following a message) is left to the document."""
        update = plan.update
        here = dict(known)  # what is here: held before, or met in this update so far
        tails: dict[tuple[str, str], tuple[ItemId, bool]] = {}
        keys_at: dict[ItemId, tuple[str, str] | None] = {}
        dead: DeadRuns = {}
        waiting = {origin: list(items) for origin, items in chains.waiting.items()}
        waits_at = set(chains.waits_at)
        messages: set[tuple[str, str]] = set()  # opened here: their lists are not followed
        replacing: set[tuple[str, str]] = set()

        def key_at(item: ItemId) -> tuple[str, str] | None:
            return keys_at[item] if item in keys_at else chains.keys_at.get(item)

        def place(item: Waiting, map_key: tuple[str, str]) -> bool:
            """Put ``item`` at the end of ``map_key``'s list, then what waited for it."""
            todo = [(item, map_key)]
            while todo:
                item, map_key = todo.pop()
                tail = tails.get(map_key) or chains.tails.get(map_key)
                if (item.origin is None) != (tail is None):
                    return False  # a second first item of the key: a fork
                if tail is not None and tail[0] != item.origin:
                    return False  # two items follow one: a fork
                if map_key[0] == MESSAGES and item.origin is None:
                    if map_key in messages:
                        return False  # a second first item of a message: a fork
                    messages.add(map_key)
                if tail is not None and tail[1]:  # follows a value: replaces it
                    if item.dead:
                        return False  # removes the value
                    plan.replaced.add(tail[0])
                    replacing.add(map_key)  # the index holds the value it replaces
                    _add_run(dead, tail[0][0], tail[0][1], tail[0][1] + 1)  # deleted now
                if not item.dead:
                    if map_key[0] in INDEXED:
                        if map_key in plan.values or (others and map_key[0] == DELETIONS):
                            return False
                    elif map_key[0] not in SIDE:
                        return False
                    plan.values[map_key] = (item.first, item.value)
                if item.dead or map_key[0] != MESSAGES:  # a message is never followed
                    if tail is not None:
                        keys_at[tail[0]] = None
                    tails[map_key] = (item.last, not item.dead)
                    keys_at[item.last] = map_key
                    waits_at.discard(item.last)
                    todo += [(w, map_key) for w in waiting.pop(item.last, [])]
            return True

        for st in structs:
            is_dead = st.kind == _DELETED_CONTENT
            if st.right is not None or st.parent_id is not None:
                return None
            if not is_dead and not st.single_value:
                return None
            if st.name == MESSAGES and st.origin is None and not is_dead:  # the most common
                map_key = (MESSAGES, st.key or "")
                if (
                    st.key is None
                    or map_key in messages
                    or map_key in tails
                    or map_key in chains.tails
                ):
                    return None  # a message opened twice
                messages.add(map_key)
                plan.values[map_key] = (st.id, value_at(update, st.values_at))
                here[st.client] = st.clock + st.length
                continue
            item = Waiting(
                first=st.id,
                last=(st.client, st.clock + st.length - 1),
                origin=st.origin,
                dead=is_dead,
                value=None if is_dead else value_at(update, st.values_at),
            )
            if is_dead:
                _add_run(dead, st.client, st.clock, st.clock + st.length)
            here[st.client] = st.clock + st.length
            if st.origin is None:
                if st.key is None or st.name not in MAPS:
                    return None
                if not place(item, (st.name, st.key)):
                    return None
            elif (found := key_at(st.origin)) is not None:
                if not place(item, found):
                    return None
            elif not chains.waits:
                return None  # follows an item not taken by the chains
            elif st.origin in waits_at or st.origin[1] >= here.get(st.origin[0], 0):
                waiting.setdefault(st.origin, []).append(item)  # its origin is not here yet
                waits_at.add(item.last)
            else:
                return None  # follows an item that ends no list: a fork, or a message
        for client, clock, length in deleted:  # runs of deleted content, values replaced
            reach, end = clock, clock + length
            while reach < end:
                if (client, reach) in plan.replaced:
                    reach += 1
                elif (beyond := chains.dead_reach(client, reach, dead)) is not None:
                    reach = beyond
                else:
                    return None
        indexed = list({k for k in plan.values if k[0] in INDEXED} - replacing | messages)
        if indexed and held(indexed):
            return None
        plan.chains = ChainsLearnt(tails, keys_at, dead, waiting, waits_at)
        return plan

    def _apply_aside(self, plan: _AsidePlan, clients: frozenset[int]) -> Applied:
        update = plan.update
        # known before this update's messages, which are noted below: what the index
        # holds now is all this replica holds (nothing of ours counts)
        self._authors_from_index()
        changed: Changes = {k: value_at(update, st.values_at) for k, st in plan.indexed.items()}
        heads = self._heads
        assert heads is not None
        for map_key, st in plan.side.items():
            heads[map_key] = (st.client, st.clock, value_at(update, st.values_at))
        for map_key, ((client, clock), value) in plan.values.items():  # by the key chains
            if map_key[0] in INDEXED:
                changed[map_key] = value
            else:
                heads[map_key] = (client, clock, value)
        self._known_sv = _advance(self._known_sv, plan.ends)
        if self._chains is not None and plan.chains is not None:
            self._chains.take(plan.chains)
        self._note_changes(changed)
        return Applied(changed=changed, clients=clients)

    def _heads_agree(self) -> bool:
        """Whether the side heads' values are the loaded document's side maps (small:
        a few keys each). Where yrs integrated held structs, its events are not to be
        trusted; structs held back that touched no side value (messages out of order,
        the common case) leave the heads as they were."""
        if self._heads is None:
            return False
        return all(dict(self._map_of[n].items()) == self.side_values(n) for n in SIDE)

    def _follow_heads(self, update: bytes, side: Changes) -> None:
        """Keep the side heads after the loaded document took ``update``, which changed
        the side keys ``side`` (to these values): each new value must be the value of
        exactly one struct of the update that names its key or follows its head; if
        not (a concurrent write), the heads are unknown until the next load."""
        heads = self._heads
        assert heads is not None
        try:
            structs, _ = read_structs(update)
        except (IndexError, ValueError, UnicodeDecodeError):
            self._heads = None
            return
        by_id = {(h[0], h[1]): k for k, h in heads.items()}
        candidates: dict[tuple[str, str], list[Struct]] = {}
        for st in structs:
            if st.origin is not None:
                map_key = by_id.get(st.origin)
            elif st.name in SIDE and st.key is not None:
                map_key = (st.name, st.key)
            else:
                continue
            if map_key is not None:
                by_id[st.id] = map_key
                candidates.setdefault(map_key, []).append(st)
        for map_key, value in side.items():
            if value is None:  # removed
                heads.pop(map_key, None)
                continue
            found = [
                st
                for st in candidates.get(map_key, [])
                if st.single_value and value_at(update, st.values_at) == value
            ]
            if value is UNREAD or len(found) != 1:
                self._heads = None
                return
            heads[map_key] = (found[0].client, found[0].clock, value)

    # ---- reading -------------------------------------------------------------------

    def values(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Any]:
        """The values under some (map, key) pairs of the chat maps, read in one
        transaction (pycrdt opens one per read otherwise); absent ones left out."""
        maps = self._maps
        found = {}
        with self._doc.transaction() as txn:
            raw = txn._txn  # the yrs transaction: pycrdt's Map.get opens three more
            for map_name, key in keys:
                held = maps.get(map_name)
                if held is not None and held.integrated.has(raw, key):
                    found[(map_name, key)] = held.integrated.get(raw, key)
        return found

    def entries(self, map_name: str) -> list[tuple[str, Entry | None]]:
        """(key, parsed entry or None when malformed) of one map."""
        return [(k, Entry.from_value(v)) for k, v in self._maps[map_name].items()]

    def judge_key(
        self,
        map_name: str,
        key: str,
        signing_key_of: SigningKeyLookup,
        belongs: DeviceInAccount,
        value: Any = UNREAD,
        *,
        vouched_by: str = "",
        verified: dict[bytes, bool] | None = None,
    ) -> tuple[Entry | None, Judged] | None:
        """The parsed value under ``key`` (``value`` when the caller saw it change) and
        its :func:`judge` (``vouched_by``, ``verified``: see there and
        :meth:`judge_entry`); None when no value is there."""
        if value is UNREAD:
            value = self._maps[map_name].get(key)
        if value is None:
            return None
        entry = Entry.from_value(value)
        judged = self.judge_entry(
            key, entry, signing_key_of, belongs, vouched_by=vouched_by, verified=verified
        )
        return entry, judged

    def judge_entry(
        self,
        key: str,
        entry: Entry | None,
        signing_key_of: SigningKeyLookup,
        belongs: DeviceInAccount,
        *,
        vouched_by: str = "",
        verified: dict[bytes, bool] | None = None,
    ) -> Judged:
        """:func:`judge` with this replica's cache of signature checks, kept only while
        the document is loaded: its readers judge its values again, whereas a value
        taken without the document is judged once, into the message index (a cache
        kept then would grow by an entry per message for as long as the node runs).
        ``verified``: checks run beforehand (:func:`signature_checks`), used instead."""
        if verified is None:
            verified = self._verified if self.loaded else None
        return judge(
            self.space, key, entry, signing_key_of, belongs, verified, vouched_by=vouched_by
        )

    def judge_all(
        self, map_name: str, signing_key_of: SigningKeyLookup, belongs: DeviceInAccount
    ) -> list[tuple[str, Entry | None, Judged]]:
        """Every value of one map: (key, parsed entry, its :func:`judge`)."""
        return [
            (key, entry, self.judge_entry(key, entry, signing_key_of, belongs))
            for key, entry in self.entries(map_name)
        ]

    def forget_failures(self) -> None:
        """Drop cached failed checks: after the device list grew, an entry from a device
        we did not know yet may verify now."""
        self._verified = {k: ok for k, ok in self._verified.items() if ok}

    def valid_entries(
        self,
        map_name: str,
        signing_key_of: SigningKeyLookup,
        belongs: DeviceInAccount,
        rejected: list[Rejected] | None = None,
    ) -> list[Entry]:
        """The entries of one map that are well formed, signed by their device and
        written by a device of the account they name (the rest go to ``rejected``)."""
        rejected = [] if rejected is None else rejected
        out = []
        for _key, _entry, judged in self.judge_all(map_name, signing_key_of, belongs):
            if isinstance(judged, Rejected):
                rejected.append(judged)
            else:
                out.append(judged)
        return out

    def view(
        self, signing_key_of: SigningKeyLookup, belongs: DeviceInAccount
    ) -> tuple[list[Message], list[Rejected]]:
        """Messages in display order, and the entries hidden because they failed checks.

        The reference view, derived from the whole CRDT; the node shows the same thing
        from the message index without loading the CRDT.
        """
        rejected: list[Rejected] = []
        kept = {
            name: self.valid_entries(name, signing_key_of, belongs, rejected) for name in INDEXED
        }
        return fold(
            self.space, kept[MESSAGES], kept[EDITS], kept[DELETIONS], kept[REACTIONS]
        ), rejected

    def count(self) -> int:
        return len(self._maps[MESSAGES])


def _verify_entry(canonical: bytes, entry: Entry, signing_key_of: SigningKeyLookup) -> bool:
    public_key = signing_key_of(entry.device)
    if public_key is None:
        return False
    return _signature_ok(public_key, canonical, entry.sig)


def _signature_ok(public_key: bytes, canonical: bytes, sig: str) -> bool:
    try:
        signature = base64.b64decode(sig, validate=True)
        verify(public_key, DOMAIN_ENTRY, canonical, signature)
    except (BadSignature, ValueError):
        return False
    return True


@dataclass(frozen=True, slots=True)
class SignatureCheck:
    """One entry's signature check, ready to run anywhere (see :func:`signature_checks`)."""

    fingerprint: bytes
    """The key :func:`judge` caches its outcome by (:func:`fingerprint`)."""
    public_key: bytes
    canonical: bytes
    sig: str

    def passes(self) -> bool:
        """Run it: pynacl lets go of the GIL while it verifies, so several threads run
        checks at once."""
        return _signature_ok(self.public_key, self.canonical, self.sig)


def signature_checks(
    space: str, changes: Changes, signing_key_of: SigningKeyLookup, *, vouched_by: str = ""
) -> list[SignatureCheck]:
    """The signature checks judging these changes (:func:`judge`) will need: each value
    read (not :data:`UNREAD`), filed under its own key, not authored by ``vouched_by``,
    from a device with a key. Run beforehand, on several threads, their outcomes by
    fingerprint are what :func:`judge` takes as ``verified``: the judging is the same,
    only the Ed25519 work is spread (a new device verifies every entry another device
    wrote: the largest cost of a link)."""
    checks = []
    for (_, key), value in changes.items():
        entry = None if value is UNREAD else Entry.from_value(value)
        if entry is None or entry.key() != key or (vouched_by and entry.device == vouched_by):
            continue
        public_key = signing_key_of(entry.device)
        if public_key is None:
            continue
        canonical = entry.canonical(space)
        checks.append(
            SignatureCheck(fingerprint(canonical, entry.sig), public_key, canonical, entry.sig)
        )
    return checks


@dataclass
class _AsidePlan:
    """What an update applied without the document changes (see ``_aside_plan``)."""

    indexed: dict[tuple[str, str], Struct] = field(default_factory=dict)
    side: dict[tuple[str, str], Struct] = field(default_factory=dict)
    replaced: set[ItemId] = field(default_factory=set)
    ends: dict[int, int] = field(default_factory=dict)
    """Per client, the clock its structs here end at."""
    update: bytes = b""
    """The update as applied (without the structs held already)."""
    values: dict[tuple[str, str], tuple[ItemId, Any]] = field(default_factory=dict)
    """Keys given a value by the key chains, with the item holding it."""
    chains: ChainsLearnt | None = None
    """What the update teaches the key chains (see ``Replica._chain_plan``)."""


class KeyChains:
    """What a replica that took its history from empty without the document knows of
    each key's list of items: which item ends it (its *tail*), whether that one is the
    key's value, and which clock ranges hold deleted content.

    Why: a folded snapshot (``Replica.snapshot`` of a document that collects garbage)
    keeps a replaced receipt, read marker or reaction as a run of deleted content in
    its key's list, and the key's value as the last item. Only the first item of a
    list names its key; the others follow the item before them (their origin), often
    in an earlier piece. Knowing the tails, a receiver names each item's key as it
    comes and takes the snapshot a piece at a time; the memory is one tail per key
    that was ever replaced (a message is never followed, so it is not kept) and one
    range per run of deleted content."""

    __slots__ = ("_dead", "keys_at", "tails", "waiting", "waits", "waits_at")

    def __init__(self, *, waits: bool) -> None:
        self.waits = waits
        """Whether an item may wait for the one it follows (see ``Replica.follow_chains``)."""
        self.tails: dict[tuple[str, str], tuple[ItemId, bool]] = {}
        """(map, key) -> (the last id of its list's last item, whether it is the value)."""
        self.keys_at: dict[ItemId, tuple[str, str]] = {}
        """The same, from the tail's id."""
        self._dead: DeadRuns = {}
        """Per client, the clock ranges of deleted content."""
        self.waiting: dict[ItemId, list[Waiting]] = {}
        """Items whose origin is not here yet, by that origin (few: an item replacing
        one of a client listed later, such as another device's reaction)."""
        self.waits_at: set[ItemId] = set()
        """The last ids of the waiting items (an item may follow one that waits)."""

    def take(self, learnt: ChainsLearnt) -> None:
        """Learn what an update applied without the document brought."""
        self.tails.update(learnt.tails)
        for item, map_key in learnt.keys_at.items():
            if map_key is None:
                self.keys_at.pop(item, None)
            else:
                self.keys_at[item] = map_key
        for client, ranges in learnt.dead.items():
            for at in range(0, len(ranges), 2):
                _add_run(self._dead, client, ranges[at], ranges[at + 1])
        self.waiting, self.waits_at = learnt.waiting, learnt.waits_at

    def wrote(self, map_key: tuple[str, str], item: ItemId) -> None:
        """Our own write without the document gave ``map_key`` the value ``item``
        (following the key's tail): it is the tail now."""
        old = self.tails.get(map_key)
        if old is not None:
            self.keys_at.pop(old[0], None)
        self.tails[map_key] = (item, True)
        self.keys_at[item] = map_key

    def dead_reach(self, client: int, clock: int, more: DeadRuns) -> int | None:
        """Where the run of deleted content holding ``clock`` of ``client`` ends, known
        here or in ``more`` (an update's own runs); None when no run holds it."""
        for ranges in (self._dead.get(client), more.get(client)):
            if ranges is not None:
                at = bisect.bisect_right(ranges, clock) - 1
                if at >= 0 and at % 2 == 0 and ranges[at + 1] > clock:
                    return ranges[at + 1]
        return None


@dataclass(slots=True)
class Waiting:
    """An item whose key is not known yet (see :class:`KeyChains`)."""

    first: ItemId
    last: ItemId
    origin: ItemId | None
    dead: bool
    value: Any


@dataclass(frozen=True, slots=True)
class LearntChains:
    """The key chains of a stored history (:meth:`Replica.learn_chains`) and the state
    vector of the history they were read from."""

    chains: KeyChains
    vector: bytes


class _Unlearnable(Exception):
    """A stored history whose key chains cannot be read (``Replica.learn_chains``)."""


def _struct_ends(
    structs: list[Struct], known: dict[int, int], ends: dict[int, int]
) -> ItemId | None:
    """Fill ``ends`` (per client, the clock its structs end at) when ``structs``
    continue each client exactly where ``known`` ends; else the first struct that
    does not, as (client, clock): past the end (a gap), or before it (held in part)."""
    for st in structs:
        if st.client not in ends and st.clock != known.get(st.client, 0):
            return st.client, st.clock
        ends[st.client] = st.clock + st.length
    return None


def _same_vector(a: bytes, b: bytes) -> bool:
    """Whether two state vectors state the same clocks (their encodings may order the
    clients differently)."""
    return decode_state_vector(a) == decode_state_vector(b)


@dataclass(slots=True)
class ChainsLearnt:
    """What one update teaches :class:`KeyChains` (kept apart until it is applied)."""

    tails: dict[tuple[str, str], tuple[ItemId, bool]]
    keys_at: dict[ItemId, tuple[str, str] | None]
    dead: DeadRuns
    waiting: dict[ItemId, list[Waiting]]
    waits_at: set[ItemId]


DeadRuns = dict[int, "array[int]"]
"""Per client, clock ranges as [start, end, ...] in increasing order, adjacent ones merged."""


def _add_run(runs: DeadRuns, client: int, start: int, end: int) -> None:
    """Add clocks ``start``..``end`` of ``client`` (not held yet) to ``runs``: at the end
    (a struct just read), or in place (a value replaced, older than what was read)."""
    ranges = runs.setdefault(client, array("q"))
    if not ranges or start >= ranges[-1]:
        if ranges and ranges[-1] == start:
            ranges[-1] = end
        else:
            ranges.extend((start, end))
        return
    at = bisect.bisect_right(ranges, start)  # even: between two runs
    if at % 2:
        return  # inside a run already
    joins_left = at > 0 and ranges[at - 1] == start
    joins_right = at < len(ranges) and ranges[at] == end
    if joins_left and joins_right:
        del ranges[at - 1 : at + 1]
    elif joins_left:
        ranges[at - 1] = end
    elif joins_right:
        ranges[at] = start
    else:
        ranges[at:at] = array("q", (start, end))


def _advance(vector: bytes | None, ends: dict[int, int]) -> bytes:
    clocks = decode_state_vector(vector or EMPTY_STATE_VECTOR)
    for client, end in ends.items():
        if end > clocks.get(client, 0):
            clocks[client] = end
    return encode_state_vector(clocks)


def side_heads(full: bytes) -> Heads:
    """The side heads of a whole document's encoding (``Doc.get_update()``): per key
    of a side map, its live item. An item names its key, or follows (origin) one that
    does: the chain is resolved through the items of every map, deleted ones included
    (yrs keeps a replaced item's origin; it may merge a run of them into one struct)."""
    structs, deleted = read_structs(full)
    dead: dict[int, list[tuple[int, int]]] = {}
    for client, clock, length in deleted:
        dead.setdefault(client, []).append((clock, clock + length))
    for ranges in dead.values():
        ranges.sort()
    spans: dict[int, list[Struct]] = {}
    for st in structs:
        if st.origin is not None or st.name in SIDE:
            spans.setdefault(st.client, []).append(st)
    for lst in spans.values():
        lst.sort(key=lambda st: st.clock)
    starts = {c: [st.clock for st in lst] for c, lst in spans.items()}

    def holder(item: ItemId) -> Struct | None:
        lst = spans.get(item[0])
        if not lst:
            return None
        at = bisect.bisect_right(starts[item[0]], item[1]) - 1
        if at < 0 or not lst[at].clock <= item[1] < lst[at].clock + lst[at].length:
            return None
        return lst[at]

    def key_of(st: Struct) -> tuple[str, str] | None:
        for _ in range(len(structs) + 1):
            if st.origin is None:
                return (st.name, st.key) if st.name in SIDE and st.key is not None else None
            found = holder(st.origin)
            if found is None:
                return None
            st = found
        return None

    def alive(st: Struct) -> bool:
        ranges = dead.get(st.client, [])
        at = bisect.bisect_right(ranges, (st.clock, 1 << 62)) - 1
        return st.single_value and not (at >= 0 and ranges[at][0] <= st.clock < ranges[at][1])

    heads: Heads = {}
    for lst in spans.values():
        for st in lst:
            if alive(st):
                map_key = key_of(st)
                if map_key is not None:
                    heads[map_key] = (st.client, st.clock, value_at(full, st.values_at))
    return heads


def decode_state_vector(sv: bytes) -> dict[int, int]:
    """client id -> clock of a Yjs v1 state vector; InvalidUpdate if malformed."""
    out: dict[int, int] = {}
    try:
        count, pos = read_varint(sv, 0)
        if count > len(sv):
            raise ValueError("more clients than bytes")
        for _ in range(count):
            client, pos = read_varint(sv, pos)
            out[client], pos = read_varint(sv, pos)
    except (IndexError, ValueError):
        raise InvalidUpdate("?", "malformed state vector") from None
    if pos != len(sv):
        raise InvalidUpdate("?", "trailing bytes after the state vector")
    return out


EMPTY_STATE_VECTOR: Final = b"\x00"
"""The state vector of a replica holding nothing (no clients)."""
EMPTY_UPDATE: Final = b"\x00\x00"
"""An update of nothing: no structs, no deletions."""


def encode_state_vector(clocks: dict[int, int]) -> bytes:
    """A Yjs v1 state vector (the inverse of :func:`decode_state_vector`)."""
    out = [encode_uvar(len(clocks))]
    for client, clock in sorted(clocks.items()):
        out += [encode_uvar(client), encode_uvar(clock)]
    return b"".join(out)


def covers(theirs: bytes, ours: bytes) -> bool:
    """Whether a replica at ``theirs`` holds every struct of one at ``ours``.

    Our schema only ever *sets* map keys (an overwrite deletes the old value in the same
    transaction that adds the new struct), so a replica holding all our structs also holds
    every deletion we know of: there is nothing to send it.
    """
    have = decode_state_vector(theirs)
    return all(have.get(client, 0) >= clock for client, clock in decode_state_vector(ours).items())
