"""The encrypted channel both live protocols use once their handshake is done.

After a Diffie-Hellman of ephemeral keys, each direction gets its own key and frames are
sealed with XChaCha20-Poly1305 under an *implicit* nonce: the frame's sequence number in
that direction. Nothing travels but ciphertext and tag (16 bytes of overhead), and a
frame that is lost, replayed, reordered or altered fails to open, which ends the session.
Used by the sync session (``p2p.proto.session``) and by device linking (``p2p.runtime.linking``).
"""

from __future__ import annotations

import hashlib
from typing import Final

import nacl.bindings as sodium
from nacl.exceptions import CryptoError as NaclCryptoError

from p2p.errors import DecryptionFailed, HandshakeFailed

PERSON: Final = b"p2p-session-keys"


def shared_secret(ephemeral_secret: bytes, peer_ephemeral: bytes) -> bytes:
    """X25519; HandshakeFailed for a peer key that is not a valid point."""
    if len(peer_ephemeral) != 32:
        raise HandshakeFailed("peer's ephemeral key is not 32 bytes")
    try:
        return bytes(sodium.crypto_scalarmult(ephemeral_secret, peer_ephemeral))
    except (NaclCryptoError, ValueError, TypeError) as exc:
        raise HandshakeFailed("peer's ephemeral key is invalid") from exc


class Box:
    """Sealing for one session: a key and a counter per direction."""

    def __init__(
        self, shared: bytes, transcript: bytes, *, initiator: bool, extra: bytes = b""
    ) -> None:
        okm = hashlib.blake2b(
            shared + extra, key=transcript[:64], digest_size=64, person=PERSON
        ).digest()
        i2r, r2i = okm[:32], okm[32:]
        self._tx_key, self._rx_key = (i2r, r2i) if initiator else (r2i, i2r)
        self.tx_seq = 0
        self.rx_seq = 0

    def seal(self, inner: bytes) -> bytes:
        nonce = self.tx_seq.to_bytes(24, "little")
        self.tx_seq += 1
        return bytes(
            sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(inner, None, nonce, self._tx_key)
        )

    def open(self, data: bytes, *, who: str) -> bytes:
        """The plaintext of the next frame from the peer; DecryptionFailed otherwise."""
        nonce = self.rx_seq.to_bytes(24, "little")
        try:
            inner = sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(
                data, None, nonce, self._rx_key
            )
        except (NaclCryptoError, ValueError, TypeError) as exc:
            raise DecryptionFailed(f"frame {self.rx_seq} from {who} does not decrypt") from exc
        self.rx_seq += 1
        return bytes(inner)
