"""Encode/decode cost per MB of the erasure-code libraries pytier could use for packet FEC.

    .venv/bin/python bench/fec_codec.py                    # every installed candidate, full grid
    .venv/bin/python bench/fec_codec.py --sizes 1200 --k 8 --m 2,4 --seconds 0.1

Packet FEC codes k data packets of one group into m parity packets, so the cost that matters is
per group of packet-sized symbols, Python call overhead included: a library that is fast on
megabyte blocks can still be slow on 1.2 KB ones. Per cell (symbol size, k, m):

- encode: ms of CPU per MB of data packets to make the m parity packets of each group;
- decode: ms per MB of data to rebuild the min(k, m) data packets lost from each group (the
  worst case within the parity budget: every lost packet is a data packet, every parity is used);
- extra: bytes each parity packet carries beyond the symbol (pyeclib puts a fragment header there).

Candidates (each skipped with a note when not installed): zfec (Tahoe-LAFS's Reed-Solomon over
GF(2^8), k+m <= 256), pyeclib (OpenStack's binding of liberasurecode, ISA-L Vandermonde RS, which
its wheel bundles) and reed-solomon-leopard (a binding of the Rust reed-solomon-simd crate; even
symbol sizes only). Timings are process CPU time (time.process_time), best of three, so another
process on the machine costs less accuracy than with wall-clock rates; no figure here is asserted.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

Encode = Callable[[Sequence[bytes], int], list[bytes]]
# (k, m, received: index -> block, 0..k-1 data and k..k+m-1 parity) -> the k data blocks
Decode = Callable[[int, int, dict[int, bytes]], list[bytes]]


@dataclass(frozen=True)
class Candidate:
    name: str
    dist: str
    make: Callable[[], tuple[Encode, Decode, Callable[[int, int, int], int]]]


def _zfec() -> tuple[Encode, Decode, Callable[[int, int, int], int]]:
    import zfec

    encoders: dict[tuple[int, int], zfec.Encoder] = {}
    decoders: dict[tuple[int, int], zfec.Decoder] = {}

    def encode(blocks: Sequence[bytes], m: int) -> list[bytes]:
        k = len(blocks)
        enc = encoders.get((k, m))
        if enc is None:
            enc = encoders[(k, m)] = zfec.Encoder(k, k + m)
        return list(enc.encode(tuple(blocks), tuple(range(k, k + m))))

    def decode(k: int, m: int, received: dict[int, bytes]) -> list[bytes]:
        dec = decoders.get((k, m))
        if dec is None:
            dec = decoders[(k, m)] = zfec.Decoder(k, k + m)
        nums = sorted(received)[:k]
        return list(dec.decode(tuple(received[i] for i in nums), tuple(nums)))

    return encode, decode, lambda size, k, m: 0


def _pyeclib() -> tuple[Encode, Decode, Callable[[int, int, int], int]]:
    from pyeclib.ec_iface import ECDriver

    drivers: dict[tuple[int, int], ECDriver] = {}

    def driver(k: int, m: int) -> ECDriver:
        d = drivers.get((k, m))
        if d is None:
            d = drivers[(k, m)] = ECDriver(k=k, m=m, ec_type="isa_l_rs_vand")
        return d

    # pyeclib codes one buffer into k+m self-describing fragments; for packets the data
    # fragments would be sent as they are and only the parity ones are extra.
    def encode(blocks: Sequence[bytes], m: int) -> list[bytes]:
        frags: list[bytes] = driver(len(blocks), m).encode(b"".join(blocks))
        return frags

    def decode(k: int, m: int, received: dict[int, bytes]) -> list[bytes]:
        data: bytes = driver(k, m).decode([received[i] for i in sorted(received)])
        size = len(data) // k
        return [data[i * size : (i + 1) * size] for i in range(k)]

    def extra(size: int, k: int, m: int) -> int:
        frag: bytes = driver(k, m).encode(b"\0" * (size * k))[k]
        return len(frag) - size

    return encode, decode, extra


def _leopard() -> tuple[Encode, Decode, Callable[[int, int, int], int]]:
    import reed_solomon_leopard as leo

    def encode(blocks: Sequence[bytes], m: int) -> list[bytes]:
        parity: list[bytes] = leo.encode(list(blocks), m)
        return parity

    def decode(k: int, m: int, received: dict[int, bytes]) -> list[bytes]:
        original = {i: b for i, b in received.items() if i < k}
        recovery = {i - k: b for i, b in received.items() if i >= k}
        restored: dict[int, bytes] = leo.decode(k, m, original, recovery)
        return [original[i] if i in original else restored[i] for i in range(k)]

    return encode, decode, lambda size, k, m: 0


CANDIDATES = (
    Candidate("zfec", "zfec", _zfec),
    Candidate("pyeclib-isal", "pyeclib", _pyeclib),
    Candidate("rs-leopard", "reed-solomon-leopard", _leopard),
)


def _best_cpu(fn: Callable[[], None], seconds: float) -> float:
    """CPU seconds of one fn() call: best of three rounds of as many calls as fill `seconds`."""
    fn()  # the first call may build the library's tables
    start = time.process_time()
    fn()
    one = max(time.process_time() - start, 1e-6)
    calls = max(1, min(100_000, int(seconds / one)))
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        for _ in range(calls):
            fn()
        best = min(best, (time.process_time() - start) / calls)
    return best


def _cell(cand: Candidate, funcs: tuple[Encode, Decode, Callable[[int, int, int], int]],
          size: int, k: int, m: int, seconds: float) -> tuple[float, float, int]:
    encode, decode, extra = funcs
    blocks = [os.urandom(size) for _ in range(k)]
    out = encode(blocks, m)
    parity = out[k:] if cand.dist == "pyeclib" else out
    data = out[:k] if cand.dist == "pyeclib" else blocks
    lost = min(k, m)
    received = {i: data[i] for i in range(lost, k)}
    received.update({k + j: parity[j] for j in range(lost)})
    if [bytes(b) for b in decode(k, m, received)] != blocks:
        raise SystemExit(f"{cand.name} k={k} m={m} size={size}: decode returned other bytes")
    mb = size * k / 1e6
    enc_s = _best_cpu(lambda: encode(blocks, m) and None, seconds)
    dec_s = _best_cpu(lambda: decode(k, m, received) and None, seconds)
    return enc_s * 1e3 / mb, dec_s * 1e3 / mb, extra(size, k, m)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=_ints, default=[1200, 1400], help="symbol bytes (default 1200,1400)")
    ap.add_argument("--k", type=_ints, default=[4, 8, 16], help="data packets per group (default 4,8,16)")
    ap.add_argument("--m", type=_ints, default=[1, 2, 4, 8], help="parity packets a group (default 1,2,4,8)")
    ap.add_argument("--seconds", type=float, default=0.05, help="CPU seconds per timing round (default 0.05)")
    args = ap.parse_args(argv)

    print("$ " + " ".join([os.path.basename(sys.executable), *sys.argv]))
    print(f"# {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M:%S} UTC, Python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs; ms of CPU per MB of data packets, best of 3")
    loaded = []
    for cand in CANDIDATES:
        try:
            funcs = cand.make()
        except ImportError:
            print(f"# {cand.name}: not installed (pip install {cand.dist})")
            continue
        loaded.append((cand, funcs, importlib.metadata.version(cand.dist)))
    for cand, _, version in loaded:
        print(f"# {cand.name}: {cand.dist}=={version}")
    print()
    header = (f"{'library':<13} {'size':>5} {'k':>3} {'m':>3} {'enc ms/MB':>10} {'dec ms/MB':>10} "
              f"{'extra B':>8}")
    print(header)
    print("-" * len(header))
    for cand, funcs, _ in loaded:
        for size in args.sizes:
            for k in args.k:
                for m in args.m:
                    enc, dec, extra = _cell(cand, funcs, size, k, m, args.seconds)
                    print(f"{cand.name:<13} {size:>5} {k:>3} {m:>3} {enc:>10.2f} {dec:>10.2f} {extra:>8}",
                          flush=True)


if __name__ == "__main__":
    main()
