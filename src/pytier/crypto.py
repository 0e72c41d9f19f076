"""Peer payload encryption as EasyTier's classic mode does it, plus pytier's replay rejection.

Every node that knows the network secret derives the same key (no per-peer keying). AEAD
payloads are laid out `ciphertext ‖ tag(16) ‖ nonce(12)` with empty AAD; the peer header is not
authenticated, so forwarders may rewrite to_peer_id and forward_counter.
"""

from __future__ import annotations

import itertools
import os
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from pytier.wire.siphash import key_128, key_256

ALGORITHMS = ("aes-gcm", "aes-256-gcm", "chacha20", "xor")

TAG_LEN = 16
NONCE_LEN = 12
_MASK64 = 0xFFFFFFFFFFFFFFFF

BytesLike = bytes | bytearray | memoryview


class DecryptError(Exception):
    """A sealed payload failed authentication or was too short to hold its tail."""


class Cipher(Protocol):
    overhead: int

    def seal(self, plaintext: BytesLike) -> bytes: ...

    def open(self, sealed: BytesLike) -> bytes: ...

    def nonce_of(self, sealed: BytesLike) -> bytes: ...

    def open_at(self, packet: bytes, offset: int) -> tuple[bytes, bytes]: ...


class _Aead(Protocol):
    def encrypt(self, nonce: bytes, data: BytesLike, associated_data: bytes | None) -> bytes: ...

    def decrypt(self, nonce: bytes, data: BytesLike, associated_data: bytes | None) -> bytes: ...


class AeadCipher:
    """AES-GCM or ChaCha20-Poly1305 with EasyTier's tail layout.

    Nonces are a random 4-byte prefix and a 64-bit counter that starts at a random value. The
    counter keeps one cipher's nonces unique without a syscall per packet; the random start matters
    because every node of the network shares the key, so two nodes (or two ciphers in one process)
    that happened to draw the same prefix must not also walk the same counter range.
    """

    __slots__ = ("_aead", "_counter", "_prefix", "overhead")

    def __init__(self, aead: _Aead) -> None:
        self._aead = aead
        self._prefix = os.urandom(4)
        self._counter = itertools.count(int.from_bytes(os.urandom(8), "big"))
        self.overhead = TAG_LEN + NONCE_LEN

    def seal(self, plaintext: BytesLike) -> bytes:
        nonce = self._prefix + (next(self._counter) & _MASK64).to_bytes(8, "big")
        return self._aead.encrypt(nonce, plaintext, None) + nonce

    def open(self, sealed: BytesLike) -> bytes:
        if len(sealed) < TAG_LEN + NONCE_LEN:
            raise DecryptError(f"sealed payload of {len(sealed)} bytes is shorter than its tail")
        view = memoryview(sealed)
        try:
            return self._aead.decrypt(bytes(view[-NONCE_LEN:]), view[:-NONCE_LEN], None)
        except InvalidTag:
            raise DecryptError("authentication failed") from None

    def nonce_of(self, sealed: BytesLike) -> bytes:
        """The nonce in the tail, or b"" if the payload is too short to have one."""
        if len(sealed) < TAG_LEN + NONCE_LEN:
            return b""
        return bytes(sealed[-NONCE_LEN:])

    def open_at(self, packet: bytes, offset: int) -> tuple[bytes, bytes]:
        """(plaintext, nonce) of the sealed payload that starts at `offset` of `packet`: the receive
        path's one call per packet, without copying the payload out first."""
        if len(packet) - offset < TAG_LEN + NONCE_LEN:
            raise DecryptError(f"sealed payload of {len(packet) - offset} bytes is shorter than its tail")
        nonce = packet[-NONCE_LEN:]
        try:
            return self._aead.decrypt(nonce, memoryview(packet)[offset:-NONCE_LEN], None), nonce
        except InvalidTag:
            raise DecryptError("authentication failed") from None


class XorCipher:
    """EasyTier's `xor`: repeating-key XOR, same length, no tail and no integrity.

    `open` never fails, and there is no nonce, so replay filtering cannot apply.
    """

    __slots__ = ("_key", "overhead")

    def __init__(self, key: bytes) -> None:
        self._key = key
        self.overhead = 0

    def _apply(self, data: BytesLike) -> bytes:
        n = len(data)
        if not n:
            return b""
        reps = -(-n // len(self._key))
        stream = int.from_bytes((self._key * reps)[:n], "little")
        return (int.from_bytes(data, "little") ^ stream).to_bytes(n, "little")

    def seal(self, plaintext: BytesLike) -> bytes:
        return self._apply(plaintext)

    def open(self, sealed: BytesLike) -> bytes:
        return self._apply(sealed)

    def nonce_of(self, sealed: BytesLike) -> bytes:
        return b""

    def open_at(self, packet: bytes, offset: int) -> tuple[bytes, bytes]:
        return self._apply(memoryview(packet)[offset:]), b""


_FACTORIES: dict[str, Callable[[str], Cipher]] = {
    "aes-gcm": lambda secret: AeadCipher(AESGCM(key_128(secret))),
    "aes-256-gcm": lambda secret: AeadCipher(AESGCM(key_256(secret))),
    "chacha20": lambda secret: AeadCipher(ChaCha20Poly1305(key_256(secret))),
    "xor": lambda secret: XorCipher(key_128(secret)),
}


def make_cipher(algorithm: str, secret: str) -> Cipher:
    """The cipher EasyTier's `encryption_algorithm` names, keyed from the network secret."""
    try:
        factory = _FACTORIES[algorithm]
    except KeyError:
        raise ValueError(
            f"unknown encryption algorithm {algorithm!r}; valid: {', '.join(ALGORITHMS)}"
        ) from None
    return factory(secret)


class ReplayFilter:
    """Rejects AEAD payloads whose nonce was seen recently from the same peer (pytier's addition).

    Per peer, nonces live in two generations of at most capacity/2 each: when the current one is
    full it becomes the previous one and the old previous one is dropped. So the newest
    capacity/2 nonces are always remembered and at most `capacity` are held. The number of peers
    tracked is bounded too (least recently used peers are forgotten), because from_peer ids come
    off the wire. A replay older than the window is not detected.

    An empty nonce (XOR, or a payload too short to carry one) cannot be checked and passes.
    """

    __slots__ = ("_generation", "_last", "_max_peers", "_peers")

    def __init__(self, capacity: int = 65536, max_peers: int = 1024) -> None:
        if capacity < 2 or max_peers < 1:
            raise ValueError("capacity must be >= 2 and max_peers >= 1")
        self._generation = capacity // 2
        self._max_peers = max_peers
        self._peers: OrderedDict[int, tuple[set[bytes], set[bytes]]] = OrderedDict()
        # The peer of the previous call, which is the most recently used already: a run of packets
        # from one peer skips the LRU bookkeeping.
        self._last: int | None = None

    def check_and_add(self, peer_id: int, nonce: bytes) -> bool:
        """True if `nonce` is new for this peer (and now remembered), False for a replay."""
        if not nonce:
            return True
        peers = self._peers
        if peer_id == self._last:
            entry = peers[peer_id]
        else:
            got = peers.get(peer_id)
            if got is None:
                entry = (set(), set())
                peers[peer_id] = entry
                if len(peers) > self._max_peers:
                    peers.popitem(last=False)
            else:
                entry = got
                peers.move_to_end(peer_id)
            self._last = peer_id
        current, previous = entry
        if nonce in current or nonce in previous:
            return False
        if len(current) >= self._generation:
            previous = current
            current = set()
            peers[peer_id] = (current, previous)
        current.add(nonce)
        return True

    def forget(self, peer_id: int) -> None:
        self._peers.pop(peer_id, None)
        if peer_id == self._last:
            self._last = None

    def remembered(self, peer_id: int) -> int:
        """How many nonces are held for this peer."""
        entry = self._peers.get(peer_id)
        return len(entry[0]) + len(entry[1]) if entry else 0

    def __len__(self) -> int:
        """Number of peers tracked."""
        return len(self._peers)
