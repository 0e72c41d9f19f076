"""SipHash-1-3 (Rust DefaultHasher), the digest and keys EasyTier derives from it, and SeaHash."""

import itertools

from hypothesis import given
from hypothesis import strategies as st

from pytier.wire.seahash import quic_tag, seahash
from pytier.wire.siphash import SipHasher13, key_128, key_256, network_secret_digest


def test_empty_siphash13_matches_rust_default_hasher() -> None:
    assert SipHasher13().finish() == 0xD1FBA762150C532C


def test_finish_does_not_consume_state() -> None:
    h = SipHasher13()
    h.write(b"probe")
    first = h.finish()
    assert h.finish() == first
    h.write(b"secret")
    one_shot = SipHasher13()
    one_shot.write(b"probesecret")
    assert h.finish() == one_shot.finish()


@given(st.binary(max_size=80), st.lists(st.integers(0, 80), max_size=6))
def test_streaming_split_does_not_change_hash(data: bytes, cuts: list[int]) -> None:
    whole = SipHasher13()
    whole.write(data)
    parts = SipHasher13()
    bounds = sorted({0, len(data), *(min(c, len(data)) for c in cuts)})
    for lo, hi in itertools.pairwise(bounds):
        parts.write(data[lo:hi])
    assert parts.finish() == whole.finish()


def test_network_secret_digest_vectors() -> None:
    assert network_secret_digest("probe", "probesecret") == bytes.fromhex(
        "d40683eeef154145fd6232df64399e4004d880208e5ac7ddf6f3f172cdb2907f"
    )
    assert network_secret_digest("default", "") == bytes.fromhex(
        "02e2bcd8739ae03985d61303fbec09210289c243231b1dcaa5bbb1f191f9b993"
    )
    assert network_secret_digest("n", "s") == bytes.fromhex(
        "76f050bd65425e13c55aeaa9aaa4141259f5538e3739d51b80e22e1afad9e815"
    )


def test_key_vectors() -> None:
    assert key_128("probesecret") == bytes.fromhex("6f2cf30ffe1fd43ae3e77d98330c8c79")
    assert key_128("") == bytes.fromhex("d1fba762150c532c4cf426633e76377d")
    assert key_256("probesecret") == bytes.fromhex(
        "f3f040327707f4eab606a8d9ca1eb142f89ad37eab53e709a13e11f65c8b3f2d"
    )


def test_seahash_reference_value() -> None:
    # The value the seahash crate documents for this input.
    assert seahash(b"to be or not to be") == 1988685042348123509


def test_quic_tag_vector() -> None:
    tag = quic_tag(bytes.fromhex("004df3d2e2e41195d305"), bytes.fromhex("0204020002"))
    assert tag == bytes.fromhex("eea2e40f8c6e61f5")


@given(st.binary(max_size=200), st.binary(max_size=200))
def test_quic_tag_is_seahash_of_length_prefixed_parts(header: bytes, payload: bytes) -> None:
    data = len(header).to_bytes(8, "little") + header + len(payload).to_bytes(8, "little") + payload
    assert quic_tag(header, payload) == seahash(data).to_bytes(8, "big")
    assert quic_tag(memoryview(header), bytearray(payload)) == quic_tag(header, payload)


@given(st.binary(max_size=100))
def test_seahash_length_is_mixed_in(data: bytes) -> None:
    # Zero padding of the last word must not make inputs of different lengths collide.
    assert seahash(data) != seahash(data + b"\x00")
