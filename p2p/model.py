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
====  =================  ==========================================================

Every entry is immutable once written (edits and deletions are entries of their own) and
carries the author device's Ed25519 signature over its canonical bytes, bound to the
space. A reader verifies before showing; what fails is hidden and reported, whichever peer
relayed it. Display order is ``(ts, device, id)``: the same on every replica.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import pycrdt

from p2p.clock import is_ts
from p2p.errors import BadSignature, InvalidUpdate, P2PError
from p2p.identity import DeviceKeys, verify
from p2p.media.descriptor import Attachment, parse_file_body
from p2p.wire import MAX_FRAME, pack
from p2p.yupdate import check_update

DOMAIN_ENTRY: Final = b"p2p/entry/v1\x00"
MAX_BODY: Final = 64 * 1024
"""Longest message body in bytes of UTF-8."""
MAX_UPDATE: Final = MAX_FRAME
MAPS: Final = ("m", "e", "x", "r", "k")

Kind = Literal["msg", "edit", "del", "react", "read", "file"]
_MAP_OF_KIND: Final[dict[str, str]] = {
    "msg": "m",
    "file": "m",  # a message with an attachment (p2p.media): body = caption + descriptor
    "edit": "e",
    "del": "x",
    "react": "r",
    "read": "k",
}
_FIELDS: Final = ("id", "k", "a", "d", "ts", "t", "b", "sig")


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
        return pack(
            [space, self.kind, self.id, self.account, self.device, self.ts, self.target, self.body]
        )

    def signed(self, space: str, device: DeviceKeys) -> Entry:
        signature = device.sign(DOMAIN_ENTRY, self.canonical(space))
        return _replace_sig(self, base64.b64encode(signature).decode("ascii"))

    def key(self) -> str:
        """Its key in the space's map of its kind."""
        if self.kind == "del":
            return self.target
        if self.kind == "react":
            return f"{self.target}/{self.account}"
        if self.kind == "read":
            return self.device
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
        """Parse a stored value; None if it is not shaped like an entry."""
        if not isinstance(value, dict) or set(value) != set(_FIELDS):
            return None
        if not all(isinstance(value[f], str) for f in _FIELDS):
            return None
        if value["k"] not in _MAP_OF_KIND or not is_ts(value["ts"]):
            return None
        if len(value["b"].encode("utf-8", "surrogatepass")) > MAX_BODY:
            return None
        return cls(
            id=value["id"],
            kind=value["k"],
            account=value["a"],
            device=value["d"],
            ts=value["ts"],
            target=value["t"],
            body=value["b"],
            sig=value["sig"],
        )


def _replace_sig(entry: Entry, sig: str) -> Entry:
    from dataclasses import replace

    return replace(entry, sig=sig)


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
AccountOfDevice = Callable[[str], "str | None"]


class Replica:
    """One space's pycrdt document, with the chat schema on top.

    Not thread-safe and free of I/O: the node feeds it updates and persists what it
    returns. ``apply`` is the only door for bytes from outside and maps every pycrdt
    failure (including its ``PanicException``, a BaseException) to InvalidUpdate.
    """

    def __init__(self, space: str) -> None:
        self.space = space
        self.doc: pycrdt.Doc[Any] = pycrdt.Doc()
        self._maps = {name: self.doc.get(name, type=pycrdt.Map) for name in MAPS}
        self._verified: dict[tuple[str, str], bool] = {}
        self._latest_ts = ""
        self._scanned = False

    @property
    def latest_ts(self) -> str:
        """The greatest timestamp of any entry here (not verified: only a hint for the
        local clock, which bounds how far it follows). The first call scans the
        document once; after that :meth:`apply` watches what remote updates bring (our
        own writes carry our own clock's timestamps: nothing to learn from them)."""
        if not self._scanned:
            self._scanned = True
            stamps = (v.get("ts") for _, v in self._maps["m"].items() if isinstance(v, dict))
            self._latest_ts = max(
                [self._latest_ts, *(t for t in stamps if isinstance(t, str) and is_ts(t))]
            )
        return self._latest_ts

    def _timestamped(self) -> list[pycrdt.Map[Any]]:
        return [self._maps[name] for name in ("m", "e", "x", "r")]

    def _note_timestamps(self, event: Any) -> None:
        # runs inside pycrdt's transaction: it must never raise (it would resurface
        # in the writer as an exception group)
        try:
            for change in event.keys.values():
                value = change.get("newValue")
                ts = value.get("ts") if isinstance(value, dict) else None
                if isinstance(ts, str) and ts > self._latest_ts and is_ts(ts):
                    self._latest_ts = ts
        except Exception:
            pass

    # ---- bytes in and out ----------------------------------------------------------

    def apply(self, update: bytes, *, from_store: bool = False) -> None:
        """Integrate an update (idempotent); InvalidUpdate if pycrdt refuses it.

        What a peer sends is bounded by MAX_UPDATE; our own store's snapshots
        (``from_store``) grow with the history and are only checked for structure.
        """
        if not from_store and len(update) > MAX_UPDATE:
            raise InvalidUpdate(self.space, f"{len(update)} bytes exceed {MAX_UPDATE}")
        check_update(update, self.space)  # before pycrdt trusts its declared counts
        watching = (
            [(m, m.observe(self._note_timestamps)) for m in self._timestamped()]
            if self._scanned
            else []
        )
        try:
            self.doc.apply_update(update)
        except (KeyboardInterrupt, SystemExit, GeneratorExit):
            raise
        except BaseException as exc:  # pycrdt panics are BaseExceptions (PyO3)
            raise InvalidUpdate(self.space, f"{type(exc).__name__}: {str(exc)[:120]}") from None
        finally:
            for m, subscription in watching:
                m.unobserve(subscription)

    def state_vector(self) -> bytes:
        return bytes(self.doc.get_state())

    def diff(self, state_vector: bytes) -> bytes:
        """What a replica at ``state_vector`` lacks; InvalidUpdate for a bad vector."""
        try:
            return bytes(self.doc.get_update(state_vector))
        except (KeyboardInterrupt, SystemExit, GeneratorExit):
            raise
        except BaseException as exc:
            raise InvalidUpdate(self.space, f"bad state vector: {str(exc)[:120]}") from None

    def snapshot(self) -> bytes:
        return bytes(self.doc.get_update())

    def write(self, entries: Iterable[Entry]) -> bytes:
        """Add signed local entries in one transaction; return the update it made."""
        before = self.doc.get_state()
        with self.doc.transaction():
            for entry in entries:
                self._maps[_MAP_OF_KIND[entry.kind]][entry.key()] = entry.to_value()
                self._verified[(entry.id, entry.sig)] = True  # we signed it ourselves
        return bytes(self.doc.get_update(before))

    # ---- reading -------------------------------------------------------------------

    def entries(self, map_name: str) -> list[tuple[str, Entry | None]]:
        """(key, parsed entry or None when malformed) of one map."""
        return [(k, Entry.from_value(v)) for k, v in self._maps[map_name].items()]

    def _valid(
        self,
        key: str,
        entry: Entry | None,
        signing_key_of: SigningKeyLookup,
        rejected: list[Rejected],
    ) -> Entry | None:
        if entry is None:
            rejected.append(
                Rejected(space=self.space, entry_id=key, device="?", reason="malformed")
            )
            return None
        cache_key = (entry.id, entry.sig)
        ok = self._verified.get(cache_key)
        if ok is None:
            ok = entry.key() == key and _verify_entry(self.space, entry, signing_key_of)
            self._verified[cache_key] = ok
        if not ok:
            rejected.append(
                Rejected(
                    space=self.space, entry_id=entry.id, device=entry.device, reason="bad signature"
                )
            )
            return None
        return entry

    def view(
        self, signing_key_of: SigningKeyLookup, account_of: AccountOfDevice
    ) -> tuple[list[Message], list[Rejected]]:
        """Messages in display order, and the entries hidden because they failed checks."""
        rejected: list[Rejected] = []

        def valid(map_name: str) -> list[Entry]:
            out = []
            for key, entry in self.entries(map_name):
                good = self._valid(key, entry, signing_key_of, rejected)
                if good is not None and account_of(good.device) == good.account:
                    out.append(good)
                elif good is not None:
                    rejected.append(
                        Rejected(
                            space=self.space,
                            entry_id=good.id,
                            device=good.device,
                            reason="wrong account",
                        )
                    )
            return out

        messages = {e.id: e for e in valid("m") if e.kind in ("msg", "file")}
        files: dict[str, tuple[str, Attachment]] = {}
        for e in [e for e in messages.values() if e.kind == "file"]:
            try:
                files[e.id] = parse_file_body(e.body)
            except P2PError as exc:
                del messages[e.id]
                rejected.append(
                    Rejected(space=self.space, entry_id=e.id, device=e.device, reason=str(exc))
                )
        latest_edit: dict[str, Entry] = {}
        for e in valid("e"):
            target = messages.get(e.target)
            if e.kind != "edit" or target is None or target.account != e.account:
                continue  # only the author's account edits its message
            best = latest_edit.get(e.target)
            if best is None or (e.ts, e.device, e.id) > (best.ts, best.device, best.id):
                latest_edit[e.target] = e
        deleted = {
            e.target
            for e in valid("x")
            if e.kind == "del" and e.target in messages and messages[e.target].account == e.account
        }
        reactions: dict[str, dict[str, str]] = {}
        for e in valid("r"):
            if e.kind == "react" and e.target in messages and e.body:
                reactions.setdefault(e.target, {})[e.account] = e.body
        shown = []
        for m in messages.values():
            edit = latest_edit.get(m.id)
            is_deleted = m.id in deleted
            caption, attachment = files.get(m.id, (m.body, None))
            shown.append(
                Message(
                    id=m.id,
                    chat=self.space,
                    ts=m.ts,
                    device=m.device,
                    account=m.account,
                    text="" if is_deleted else (edit.body if edit else caption),
                    edited=edit is not None and not is_deleted,
                    deleted=is_deleted,
                    reactions=reactions.get(m.id, {}),
                    attachment=None if is_deleted else attachment,
                )
            )
        shown.sort(key=Message.sort_key)
        return shown, rejected

    def count(self) -> int:
        return len(self._maps["m"])


def _verify_entry(space: str, entry: Entry, signing_key_of: SigningKeyLookup) -> bool:
    public_key = signing_key_of(entry.device)
    if public_key is None:
        return False
    try:
        signature = base64.b64decode(entry.sig, validate=True)
        verify(public_key, DOMAIN_ENTRY, entry.canonical(space), signature)
    except (BadSignature, ValueError):
        return False
    return True


def decode_state_vector(sv: bytes) -> dict[int, int]:
    """client id -> clock of a Yjs v1 state vector; InvalidUpdate if malformed."""
    out: dict[int, int] = {}
    pos = 0

    def varuint() -> int:
        nonlocal pos
        value = shift = 0
        while True:
            if pos >= len(sv) or shift > 63:
                raise InvalidUpdate("?", "malformed state vector")
            byte = sv[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    count = varuint()
    if count > len(sv):
        raise InvalidUpdate("?", "malformed state vector")
    for _ in range(count):
        client = varuint()
        out[client] = varuint()
    if pos != len(sv):
        raise InvalidUpdate("?", "trailing bytes after the state vector")
    return out


def covers(theirs: bytes, ours: bytes) -> bool:
    """Whether a replica at ``theirs`` holds every struct of one at ``ours``.

    Our schema only ever *sets* map keys (an overwrite deletes the old value in the same
    transaction that adds the new struct), so a replica holding all our structs also holds
    every deletion we know of: there is nothing to send it.
    """
    have = decode_state_vector(theirs)
    return all(have.get(client, 0) >= clock for client, clock in decode_state_vector(ours).items())
