"""Attachment descriptors and chunk crypto: pure functions, no I/O (docs/media.md).

A file is cut into chunks of ``chunk_size`` bytes (the last one shorter), each encrypted
with a fresh per-file key and addressed by the BLAKE2b-256 hash of its *ciphertext*. The
descriptor (name, size, mime, chunk size, key, chunk hashes) travels inside the signed
message entry, so it is covered by the author's signature and sealed with the space key
like any entry: only readers of the space can open the chunks, while any device, or the
relay's pipes, can carry and check them without being able to read them.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Final

from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)
from nacl.exceptions import CryptoError as NaclCryptoError

from p2p.errors import BadDescriptor, DecryptionFailed, FileTooLarge, WireError
from p2p.proto.wire import MEDIA_CHUNK_MAX, load_json

HASH_SIZE: Final = 32
KEY_SIZE: Final = 32
TAG_SIZE: Final = 16
CHUNK_MIN: Final = 256 * 1024
"""Chunk size for files up to ``CHUNK_MIN * MAX_CHUNKS`` (256 MiB); doubled above that.
Small enough that a chunk frame never holds the sync lane for long."""
MAX_CHUNKS: Final = 1024
"""Most chunks of one file: keeps the descriptor (32 bytes a hash) inside one entry."""
HARD_MAX_FILE: Final = MEDIA_CHUNK_MAX * MAX_CHUNKS
"""Largest file the format can describe (512 MiB); a device's own limit is lower."""
MAX_NAME: Final = 255
MAX_MIME: Final = 127
MAX_CAPTION: Final = 16 * 1024
MAX_BODY_TEXT: Final = 64 * 1024
"""Longest file entry body parsed (an entry's body is at most 64 KiB, p2p.proto.model.MAX_BODY)."""
DESCRIPTOR_DEPTH: Final = 4
"""Nesting a file entry's body may have (it has 2: the body, then the descriptor)."""
"""Longest caption of a file message, in bytes of UTF-8 (the rest of the entry body's
64 KiB is the descriptor)."""
_DOMAIN: Final = b"p2p/chunk/v1\x00"


def chunk_size_for(size: int, limit: int = HARD_MAX_FILE) -> int:
    """The chunk size for a file of ``size`` bytes; FileTooLarge past ``limit``."""
    if size > min(limit, HARD_MAX_FILE):
        raise FileTooLarge(size, min(limit, HARD_MAX_FILE))
    chunk = CHUNK_MIN
    while -(-size // chunk) > MAX_CHUNKS:
        chunk *= 2
    return chunk


def chunk_hash(data: bytes) -> bytes:
    """The content address of an encrypted chunk."""
    return hashlib.blake2b(data, digest_size=HASH_SIZE, person=b"p2p-chunk").digest()


def _nonce_aad(index: int, size: int) -> tuple[bytes, bytes]:
    # the key is used for one file only, and each index once: a counter nonce is safe.
    # The aad binds the chunk to its place and to the file's size (no reordering, no
    # truncation going unnoticed)
    return index.to_bytes(24, "little"), _DOMAIN + index.to_bytes(4, "big") + size.to_bytes(
        8, "big"
    )


def seal_chunk(key: bytes, index: int, size: int, plain: bytes) -> bytes:
    """Encrypt chunk ``index`` of a file of ``size`` bytes."""
    nonce, aad = _nonce_aad(index, size)
    return bytes(crypto_aead_xchacha20poly1305_ietf_encrypt(plain, aad, nonce, key))


def open_chunk(key: bytes, index: int, size: int, data: bytes) -> bytes:
    """Decrypt chunk ``index``; DecryptionFailed if it is not what the author sealed."""
    nonce, aad = _nonce_aad(index, size)
    try:
        return bytes(crypto_aead_xchacha20poly1305_ietf_decrypt(data, aad, nonce, key))
    except NaclCryptoError as exc:
        raise DecryptionFailed(f"chunk {index} does not open") from exc


def new_key() -> bytes:
    return os.urandom(KEY_SIZE)


@dataclass(frozen=True, kw_only=True)
class Attachment:
    """What a file message says about its file: enough to fetch, check and open it."""

    name: str
    size: int
    mime: str
    chunk_size: int
    key: bytes
    """The per-file key (XChaCha20-Poly1305): only readers of the space see it."""
    hashes: tuple[bytes, ...]
    """BLAKE2b-256 of each encrypted chunk, in order."""

    @property
    def id(self) -> str:
        """Stable handle of the file's content: the same bytes under the same key."""
        return hashlib.blake2b(
            b"".join(self.hashes) + self.size.to_bytes(8, "big"), digest_size=16
        ).hexdigest()

    @property
    def stored_size(self) -> int:
        """Bytes its chunks take on disk and on the wire (ciphertext)."""
        return self.size + TAG_SIZE * len(self.hashes)

    def plain_size(self, index: int) -> int:
        return min(self.chunk_size, self.size - index * self.chunk_size)

    def summary(self) -> dict[str, object]:
        """What a log shows of it: never the key, nor the hashes."""
        return {"id": self.id, "name": self.name, "size": self.size, "mime": self.mime}

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "size": self.size,
            "mime": self.mime,
            "chunk": self.chunk_size,
            "key": base64.b64encode(self.key).decode("ascii"),
            "hashes": base64.b64encode(b"".join(self.hashes)).decode("ascii"),
        }

    @classmethod
    def from_json(cls, value: object) -> Attachment:
        """Parse and check a descriptor; BadDescriptor for anything off."""
        if not isinstance(value, dict) or set(value) != {
            "name",
            "size",
            "mime",
            "chunk",
            "key",
            "hashes",
        }:
            raise BadDescriptor("a descriptor has exactly name, size, mime, chunk, key, hashes")
        name, size, mime, chunk = value["name"], value["size"], value["mime"], value["chunk"]
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME or "\x00" in name:
            raise BadDescriptor("bad file name")
        if not isinstance(mime, str) or len(mime) > MAX_MIME:
            raise BadDescriptor("bad mime type")
        if type(size) is not int or not 0 <= size <= HARD_MAX_FILE:
            raise BadDescriptor("bad file size")
        if (
            type(chunk) is not int
            or not CHUNK_MIN <= chunk <= MEDIA_CHUNK_MAX
            or chunk & (chunk - 1)
        ):
            raise BadDescriptor("bad chunk size")
        try:
            key = base64.b64decode(str(value["key"]), validate=True)
            joined = base64.b64decode(str(value["hashes"]), validate=True)
        except ValueError as exc:
            raise BadDescriptor("bad base64") from exc
        count = -(-size // chunk)
        if len(key) != KEY_SIZE or len(joined) != HASH_SIZE * count or count > MAX_CHUNKS:
            raise BadDescriptor("key or chunk hashes do not match the size")
        hashes = tuple(joined[i : i + HASH_SIZE] for i in range(0, len(joined), HASH_SIZE))
        return cls(name=name, size=size, mime=mime, chunk_size=chunk, key=key, hashes=hashes)


def file_body(text: str, attachment: Attachment) -> str:
    """The body of a ``file`` entry: the caption and the descriptor, as JSON."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_CAPTION:
        raise BadDescriptor(f"a caption is at most {MAX_CAPTION} bytes")
    return json.dumps({"text": text, "file": attachment.to_json()}, separators=(",", ":"))


@functools.lru_cache(maxsize=4096)
def parse_file_body(body: str) -> tuple[str, Attachment]:
    """Caption and descriptor of a ``file`` entry's body; BadDescriptor if malformed.

    Cached: every ``Node.messages()`` shows every file message, and a descriptor is up
    to ~45 KB of JSON (the result is immutable, so sharing it is safe)."""
    try:  # a member's bytes: nested deeply, json.loads would raise RecursionError
        value = load_json(
            body, what="file entry", max_size=MAX_BODY_TEXT, max_depth=DESCRIPTOR_DEPTH
        )
    except WireError as exc:
        raise BadDescriptor("a file entry's body is JSON") from exc
    if not isinstance(value, dict) or set(value) != {"text", "file"}:
        raise BadDescriptor("a file entry's body has exactly text and file")
    if not isinstance(value["text"], str):
        raise BadDescriptor("the caption is a string")
    return value["text"], Attachment.from_json(value["file"])
