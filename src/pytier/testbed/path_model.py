"""Per-packet models of what real lossy paths do: burst loss, a policer, reordering.

Sans-IO and clock-free: each model takes its random stream (a seeded `random.Random`) and, where
time matters, the caller's `now` in seconds, so the link emulator (pytier-linkem, real time) and
the virtual-time link model share one implementation and a run is reproducible from its seed.
"""

from __future__ import annotations

import math
import random

__all__ = ["GilbertElliott", "Policer", "Reorderer"]


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} {value} must be a probability within 0..1")


class GilbertElliott:
    """Two-state burst loss: a good state that loses `loss_good` of packets, a bad one `loss_bad`.

    Per packet the chain first moves (good->bad with probability `enter`, bad->good with `exit`),
    then the packet is lost with the new state's loss probability. Moving first means that the
    packet which enters the bad state is already lost in it, so with loss_bad=1 and loss_good=0 a
    run of losses is exactly one stay in the bad state: geometric with mean 1/exit packets. The
    stationary share of bad packets is enter/(enter+exit); the long-run loss is that share times
    loss_bad plus the rest times loss_good. The chain starts in the good state.
    """

    __slots__ = ("_bad", "_enter", "_exit", "_loss_bad", "_loss_good", "_random")

    def __init__(
        self, enter: float, exit: float, loss_bad: float, rng: random.Random, loss_good: float = 0.0
    ) -> None:
        _check_probability("enter", enter)
        _check_probability("exit", exit)
        _check_probability("loss_bad", loss_bad)
        _check_probability("loss_good", loss_good)
        self._enter = enter
        self._exit = exit
        self._loss_bad = loss_bad
        self._loss_good = loss_good
        self._random = rng.random
        self._bad = False

    @property
    def bad(self) -> bool:
        return self._bad

    def drop(self) -> bool:
        """Advance the chain by one packet; True if that packet is lost."""
        rnd = self._random
        if self._bad:
            if rnd() < self._exit:
                self._bad = False
        elif rnd() < self._enter:
            self._bad = True
        loss = self._loss_bad if self._bad else self._loss_good
        # Loss 1 or 0 needs no draw, which keeps the common loss_bad=1 case at one draw per packet.
        if loss >= 1.0:
            return True
        return loss > 0.0 and rnd() < loss


class Policer:
    """A token bucket that drops what does not fit, as an ISP's rate policer does (no queue).

    The bucket holds `bucket_bytes` of tokens, starts full and refills at `rate_bps` bits per second.
    A packet that fits takes its size in tokens; one that does not is dropped at once and costs
    nothing, so over any span T a policer passes at most rate x T / 8 + bucket bytes. A packet larger
    than the bucket never passes.
    """

    __slots__ = ("_bucket", "_bytes_per_s", "_last", "_tokens")

    def __init__(self, rate_bps: float, bucket_bytes: int) -> None:
        if not (rate_bps > 0 and math.isfinite(rate_bps)):
            raise ValueError(f"police rate {rate_bps} bit/s must be a finite number > 0")
        if bucket_bytes <= 0:
            raise ValueError(f"police bucket {bucket_bytes} bytes must be > 0")
        self._bytes_per_s = rate_bps / 8.0
        self._bucket = float(bucket_bytes)
        self._tokens = float(bucket_bytes)
        self._last: float | None = None

    def admit(self, size: int, now: float) -> bool:
        """True if a packet of `size` bytes arriving at `now` conforms (and takes its tokens)."""
        last = self._last
        if last is None:
            self._last = now
        elif now > last:  # a clock that steps back refills nothing rather than draining the bucket
            tokens = self._tokens + (now - last) * self._bytes_per_s
            self._tokens = tokens if tokens < self._bucket else self._bucket
            self._last = now
        if size <= self._tokens:
            self._tokens -= size
            return True
        return False


class Reorderer:
    """Holds back `share` of packets by `extra_delay_s`, so the packets behind them overtake them."""

    __slots__ = ("_delay", "_random", "_share")

    def __init__(self, share: float, extra_delay_s: float, rng: random.Random) -> None:
        _check_probability("reorder share", share)
        if not (extra_delay_s >= 0 and math.isfinite(extra_delay_s)):
            raise ValueError(f"reorder delay {extra_delay_s} s must be a finite number >= 0")
        self._share = share
        self._delay = extra_delay_s
        self._random = rng.random

    def extra_delay(self) -> float:
        """The extra delay of the next packet: extra_delay_s for a held-back one, else 0.0."""
        if self._share > 0.0 and self._random() < self._share:
            return self._delay
        return 0.0
