"""Retransmission timeout from round-trip samples (RFC 6298).

Karn's rule is the caller's part: it samples only segments that were never retransmitted. Backoff
doubles the timeout on each expiry and stays until a fresh sample arrives (RFC 6298 5.5, 5.7).
"""

from __future__ import annotations

__all__ = ["RttEstimator"]

ALPHA = 1 / 8
BETA = 1 / 4
K = 4
CLOCK_GRANULARITY = 0.001  # seconds


class RttEstimator:
    __slots__ = ("max_rto", "min_rto", "rto", "rttvar", "srtt")

    def __init__(self, initial_rto: float, min_rto: float, max_rto: float) -> None:
        self.min_rto = min_rto
        self.max_rto = max_rto
        self.rto = initial_rto  # seconds, backoff included
        self.srtt: float | None = None
        self.rttvar = 0.0

    def sample(self, rtt: float) -> None:
        rtt = max(rtt, 0.0)
        if self.srtt is None:
            self.srtt = rtt
            self.rttvar = rtt / 2
        else:
            self.rttvar = (1 - BETA) * self.rttvar + BETA * abs(self.srtt - rtt)
            self.srtt = (1 - ALPHA) * self.srtt + ALPHA * rtt
        rto = self.srtt + max(CLOCK_GRANULARITY, K * self.rttvar)
        self.rto = min(max(rto, self.min_rto), self.max_rto)

    def back_off(self) -> None:
        self.rto = min(self.rto * 2, self.max_rto)
