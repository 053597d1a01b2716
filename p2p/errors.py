"""The error tree of p2p: one root, one branch per layer, fields that say what went wrong.

Every input from outside (frames, envelopes, CRDT updates, files, pairing codes) that is
refused raises one of these, never a bare ``ValueError`` or a pycrdt panic. Callers that
embed the engine catch :class:`P2PError`; a node that receives bad input from a peer
closes that peer's connection and keeps running.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence


class P2PError(Exception):
    """Root of every error p2p raises on purpose."""


# --- wire ---------------------------------------------------------------------------


class WireError(P2PError):
    """Bytes that are not a valid frame of our protocol."""


class FrameTooLarge(WireError):
    """A frame (or a length prefix announcing one) exceeds the hard size limit."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"frame of {size} bytes exceeds the limit of {limit}")
        self.size = size
        self.limit = limit


class MalformedFrame(WireError):
    """Not decodable msgpack, or not shaped like any frame we know."""


class TooComplex(MalformedFrame):
    """Encoded data nested deeper, or holding more values, than its format ever needs.

    Checked on the encoded bytes before anything is decoded, so that a small input
    cannot cost a large multiple of its size in memory or time (nested empty arrays
    are one byte each on the wire and dozens of bytes each once decoded)."""


class UnsupportedVersion(WireError):
    """A frame of a protocol version this node does not speak (or a downgrade)."""

    def __init__(self, version: object) -> None:
        super().__init__(f"unsupported protocol version {version!r}")
        self.version = version


# --- identity and crypto ------------------------------------------------------------


class CryptoError(P2PError):
    """A signature, ciphertext or key that does not check out."""


class BadSignature(CryptoError):
    """A signature that does not verify under the key it claims."""


class DecryptionFailed(CryptoError):
    """A ciphertext that does not open under the key it names (tampered or wrong key)."""


class UnknownKey(CryptoError):
    """A space key or epoch this device does not hold."""

    def __init__(self, space: str, epoch: int) -> None:
        super().__init__(f"no key for space {space} epoch {epoch}")
        self.space = space
        self.epoch = epoch


class ReplayDetected(CryptoError):
    """An envelope whose (sender, counter) was already accepted, or is too old to judge."""

    def __init__(self, sender: str, counter: int) -> None:
        super().__init__(f"replayed envelope from {sender} counter {counter}")
        self.sender = sender
        self.counter = counter


class DeviceListError(CryptoError):
    """A device list that is invalid: bad signature, wrong account, broken rules."""


class RollbackRefused(DeviceListError):
    """A device list with a lower version than one already accepted."""

    def __init__(self, offered: int, current: int) -> None:
        super().__init__(f"device list version {offered} is older than {current}")
        self.offered = offered
        self.current = current


class TooManyDevices(DeviceListError):
    """A device list with more companions than the account allows."""


class GrantRefused(CryptoError):
    """A space grant that is malformed, not for us, badly signed, or from a device of an
    account we do not trust for that space."""


class GrantFromNonMember(GrantRefused):
    """A grant for a space we hold, from an account that is not (yet) a member of it in
    our eyes: ignored, not an attack by itself (a device linked after a conversation
    began learns its members from its own account's devices first)."""


class LeaseExpired(CryptoError):
    """A companion whose lease from the primary ran out (or that never had one)."""

    def __init__(self, device: str, reason: str) -> None:
        super().__init__(f"companion {device} is not accepted: {reason}")
        self.device = device


class UnknownDevice(CryptoError):
    """A device that is not on the account's signed device list."""

    def __init__(self, device: str) -> None:
        super().__init__(f"device {device} is not on the device list")
        self.device = device


class RemovedDevice(UnknownDevice):
    """A device that was on the device list once and has been unlinked."""

    def __init__(self, device: str) -> None:
        P2PError.__init__(self, f"device {device} has been removed from the device list")
        self.device = device


# --- sync protocol ------------------------------------------------------------------


class ProtocolError(P2PError):
    """A peer broke the sync protocol: wrong frame for the state, bad handshake."""


class HandshakeFailed(ProtocolError):
    """The mutual authentication did not complete."""


class NotOurAccount(HandshakeFailed):
    """The peer's hello does not prove membership of our account: a stranger."""


class InvalidUpdate(ProtocolError):
    """A CRDT update that pycrdt refused (or that is too large to try)."""

    def __init__(self, space: str, reason: str) -> None:
        super().__init__(f"invalid update for space {space}: {reason}")
        self.space = space
        self.reason = reason


class PoisonedReplica(InvalidUpdate):
    """An update made pycrdt panic part-way (the structural check let it through): the
    document it left half-changed was thrown away and rebuilt from its history, and the
    update was neither kept nor passed on. The peer that sent it is disconnected."""


class DocumentNeeded(P2PError):
    """Not a fault: an update could not be applied without its chat's document (it
    replaces or deletes what only the document holds, or follows structs it lacks).
    Nothing changed; the caller loads the document and applies the update again."""

    def __init__(self, space: str) -> None:
        super().__init__(f"{space}: the update needs the chat's document")
        self.space = space


# --- storage ------------------------------------------------------------------------


class StoreError(P2PError):
    """The local store is unusable: corrupt file, wrong schema, locked by another node."""


class StoreCorrupt(StoreError):
    """The store's file exists but its content cannot be trusted."""


class ChatCorrupt(StoreCorrupt):
    """A chat whose stored history or record does not load: it is set aside (not
    synced, not shown, its rows left on disk as they are) and every other chat goes on."""

    def __init__(self, chat: str, reason: str, name: str = "") -> None:
        super().__init__(f"chat {chat} is set aside, its stored history is unreadable: {reason}")
        self.chat = chat
        self.reason = reason
        self.name = name


class AlreadyInitialized(StoreError):
    """``init`` on a home that already holds a device."""


class NotInitialized(StoreError):
    """A home without a device (run ``p2p init`` or ``p2p link`` first)."""


# --- node ---------------------------------------------------------------------------


class NodeError(P2PError):
    """The node facade was misused (closed node, unknown chat, ...)."""


class AlreadyRunning(NodeError):
    """Another process holds this home's lock: a running node (``p2p run``), or a
    command working on the store while no node runs."""


class ContactError(NodeError):
    """A contact code or contact operation that is refused (malformed or altered code,
    our own account, an account we do not know)."""


class Unlinked(NodeError):
    """This device was removed from its account (unlinked by the primary, or at its own
    request): it keeps what it had, reads nothing new, and may write nothing."""

    def __init__(self, device: str, account: str) -> None:
        super().__init__(
            f"this device ({device}) was unlinked from account {account}: it can no longer"
            " write (to use this account here again, link a new home with p2p link)"
        )
        self.device = device
        self.account = account


class UnknownChat(NodeError):
    """A chat id this device holds no space for."""

    def __init__(self, chat: str, known: Sequence[str] = ()) -> None:
        close = difflib.get_close_matches(chat, known, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        super().__init__(f"unknown chat {chat} ({hint}p2p chats lists them)")
        self.chat = chat


# --- relay --------------------------------------------------------------------------


class RelayError(P2PError):
    """The rendezvous relay refused a request, misbehaved, or could not be reached."""


class RelayUnavailable(RelayError):
    """No authenticated connection to the relay right now (it may be down or unreachable)."""


class RelayAuthFailed(RelayError):
    """The relay refused our device signature, or it is not the relay we meant to reach."""


class RelayRefused(RelayError):
    """The relay answered a request with an error code (see ``code``)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"relay refused: {code} ({detail})")
        self.code = code
        self.detail = detail


class MailboxFull(RelayRefused):
    """The recipient's mailbox (or the sender's or the relay's storage quota) is full."""

    def __init__(self, recipient: str, code: str) -> None:
        super().__init__(code, f"no room for mail to {recipient}")
        self.recipient = recipient


class MailTooLarge(RelayRefused):
    """A mail item larger than the relay accepts."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__("too_large", f"{size} bytes exceed the limit of {limit}")
        self.size = size
        self.limit = limit


# --- media (p2p.media) --------------------------------------------------------------


class MediaError(P2PError):
    """An attachment that cannot be sent, fetched, stored or opened."""


class FileTooLarge(MediaError):
    """A file over the device's maximum attachment size (or the format's hard cap)."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"file of {size} bytes exceeds the limit of {limit}")
        self.size = size
        self.limit = limit


class BadDescriptor(MediaError):
    """An attachment descriptor in a message that is not shaped as the format says."""


class ChunkTampered(MediaError):
    """A chunk whose bytes do not hash to the hash it was asked for (or was not asked)."""

    def __init__(self, chunk: str, source: str) -> None:
        super().__init__(f"chunk {chunk} from {source} does not match its hash")
        self.chunk = chunk
        self.source = source


class BlobCorrupt(MediaError):
    """A chunk in this device's blob store no longer matches its hash (disk damage)."""

    def __init__(self, chunk: str) -> None:
        super().__init__(f"stored chunk {chunk} does not match its hash; dropped")
        self.chunk = chunk


class MediaMissing(MediaError):
    """An attachment that is not (fully) on this device yet: fetch it first."""

    def __init__(self, file: str, have: int, total: int) -> None:
        super().__init__(f"attachment {file} has {have} of {total} chunks on this device")
        self.file = file
        self.have = have
        self.total = total
