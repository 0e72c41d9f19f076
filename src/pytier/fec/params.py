"""The shape of the protection a sender applies: k data and m parity frames a group, depth groups open."""

from __future__ import annotations

from dataclasses import dataclass

from pytier.fec.framing import MAX_GROUP_SIZE

__all__ = ["FecParams"]


@dataclass(frozen=True, slots=True)
class FecParams:
    """k data + m parity frames a group; `depth` groups filled round-robin (one interleaved block).

    A burst of up to depth * m consecutive lost frames inside a full block costs each group at
    most m frames, so it stays recoverable.
    """

    k: int
    m: int
    depth: int = 1

    def __post_init__(self) -> None:
        if not (self.k >= 1 and self.m >= 1 and self.k + self.m <= MAX_GROUP_SIZE):
            raise ValueError(f"FEC k={self.k} m={self.m} needs k, m >= 1 and k + m <= {MAX_GROUP_SIZE}")
        if not 1 <= self.depth <= 64:
            raise ValueError(f"FEC interleave depth {self.depth} must be within 1..64")

    @property
    def overhead(self) -> float:
        """Parity frames per data frame."""
        return self.m / self.k

    def __str__(self) -> str:
        return f"{self.k}+{self.m}x{self.depth}"
