"""Peer payload ciphers (EasyTier layout and keys) and pytier's replay filter."""

import contextlib
import os

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from hypothesis import given
from hypothesis import strategies as st

from pytier.crypto import ALGORITHMS, NONCE_LEN, DecryptError, ReplayFilter, make_cipher
from pytier.wire.siphash import key_128, key_256

AEADS = ("aes-gcm", "aes-256-gcm", "chacha20")


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_round_trip(algorithm: str) -> None:
    sender = make_cipher(algorithm, "probesecret")
    receiver = make_cipher(algorithm, "probesecret")
    for plaintext in (b"", b"x", os.urandom(1400)):
        sealed = sender.seal(plaintext)
        assert len(sealed) == len(plaintext) + sender.overhead
        assert receiver.open(sealed) == plaintext
        assert receiver.open(memoryview(bytearray(sealed))) == plaintext
        assert receiver.open(sender.seal(memoryview(plaintext))) == plaintext
        assert receiver.open(sender.seal(bytearray(plaintext))) == plaintext


def test_aes_gcm_interoperates_with_the_documented_key_and_layout() -> None:
    # A payload sealed the way a real node does: ciphertext ‖ tag ‖ random nonce, empty AAD.
    key = bytes.fromhex("6f2cf30ffe1fd43ae3e77d98330c8c79")
    assert key == key_128("probesecret")
    nonce = os.urandom(12)
    foreign = AESGCM(key).encrypt(nonce, b"ping from rust", None) + nonce
    assert make_cipher("aes-gcm", "probesecret").open(foreign) == b"ping from rust"
    ours = make_cipher("aes-gcm", "probesecret").seal(b"pong")
    assert AESGCM(key).decrypt(ours[-12:], ours[:-12], None) == b"pong"


def test_256_bit_algorithms_use_key_256() -> None:
    key = bytes.fromhex("f3f040327707f4eab606a8d9ca1eb142f89ad37eab53e709a13e11f65c8b3f2d")
    assert key == key_256("probesecret")
    for name, aead in (("aes-256-gcm", AESGCM(key)), ("chacha20", ChaCha20Poly1305(key))):
        sealed = make_cipher(name, "probesecret").seal(b"data")
        assert aead.decrypt(sealed[-12:], sealed[:-12], None) == b"data"


def test_xor_is_repeating_key_without_tail() -> None:
    cipher = make_cipher("xor", "probesecret")
    key = key_128("probesecret")
    assert cipher.seal(bytes(40)) == (key * 3)[:40]
    assert cipher.open(cipher.seal(b"hello")) == b"hello"
    assert cipher.nonce_of(cipher.seal(b"hello")) == b""


@pytest.mark.parametrize("algorithm", AEADS)
def test_tamper_anywhere_fails(algorithm: str) -> None:
    cipher = make_cipher(algorithm, "s")
    sealed = cipher.seal(b"some payload")
    for index in (0, len(sealed) - 20, len(sealed) - 1):  # ciphertext, tag, nonce
        bad = bytearray(sealed)
        bad[index] ^= 1
        with pytest.raises(DecryptError):
            cipher.open(bytes(bad))


@pytest.mark.parametrize("algorithm", AEADS)
def test_truncation_fails(algorithm: str) -> None:
    cipher = make_cipher(algorithm, "s")
    sealed = cipher.seal(b"payload")
    for cut in range(1, len(sealed) + 1):
        with pytest.raises(DecryptError):
            cipher.open(sealed[:-cut])


def test_wrong_secret_fails() -> None:
    sealed = make_cipher("aes-gcm", "a").seal(b"x")
    with pytest.raises(DecryptError):
        make_cipher("aes-gcm", "b").open(sealed)


@given(st.binary(max_size=100))
def test_open_arbitrary_bytes_only_decrypt_error(data: bytes) -> None:
    cipher = make_cipher("aes-gcm", "s")
    with contextlib.suppress(DecryptError):
        cipher.open(data)


def test_nonces_are_unique_and_in_the_tail() -> None:
    cipher = make_cipher("aes-gcm", "s")
    other = make_cipher("aes-gcm", "s")
    sealed = [cipher.seal(b"x") for _ in range(2000)] + [other.seal(b"x") for _ in range(2000)]
    nonces = [cipher.nonce_of(s) for s in sealed]
    assert all(len(n) == NONCE_LEN for n in nonces)
    assert len(set(nonces)) == len(nonces)
    assert cipher.nonce_of(b"short") == b""


def test_unknown_algorithm_lists_valid_names() -> None:
    with pytest.raises(ValueError) as info:
        make_cipher("rot13", "s")
    for name in ALGORITHMS:
        assert name in str(info.value)


def test_replay_filter_rejects_repeats_per_peer() -> None:
    cipher = make_cipher("aes-gcm", "s")
    replay = ReplayFilter()
    sealed = cipher.seal(b"x")
    nonce = cipher.nonce_of(sealed)
    assert replay.check_and_add(1, nonce)
    assert not replay.check_and_add(1, nonce)
    assert replay.check_and_add(2, nonce)  # another peer keeps its own memory
    assert replay.check_and_add(1, cipher.nonce_of(cipher.seal(b"x")))
    assert replay.check_and_add(1, b"") and replay.check_and_add(1, b"")  # nothing to check


def test_replay_filter_memory_is_bounded() -> None:
    replay = ReplayFilter(capacity=8, max_peers=3)
    nonces = [i.to_bytes(12, "big") for i in range(100)]
    for nonce in nonces:
        assert replay.check_and_add(1, nonce)
        assert replay.remembered(1) <= 8
    for nonce in nonces[-4:]:  # the newest capacity/2 are always remembered
        assert not replay.check_and_add(1, nonce)
    assert replay.check_and_add(1, nonces[0])  # aged out of the window
    for peer in range(2, 10):
        replay.check_and_add(peer, b"n")
    assert len(replay) == 3
    assert replay.remembered(2) == 0  # least recently used peers are forgotten
    replay.forget(9)
    assert replay.remembered(9) == 0


def test_replay_filter_refuses_nonsense_limits() -> None:
    with pytest.raises(ValueError):
        ReplayFilter(capacity=1)
    with pytest.raises(ValueError):
        ReplayFilter(max_peers=0)
