"""RateLimitedLog with an injected clock: one line per (source, reason) per interval, counts kept."""

from __future__ import annotations

import logging

import pytest

from pytier.ratelog import RateLimitedLog

LOGGER = logging.getLogger("pytier.test_ratelog")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER.name]


def test_one_line_per_source_and_reason_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOGGER.name)
    clock = Clock()
    rl = RateLimitedLog(LOGGER, 60, clock=clock)
    for _ in range(1000):
        rl.log(logging.INFO, "198.18.1.2", "garbage", "garbage from %s", "198.18.1.2")
    rl.log(logging.INFO, "198.18.1.2", "bad length", "bad length from %s", "198.18.1.2")
    rl.log(logging.INFO, "198.18.1.3", "garbage", "garbage from %s", "198.18.1.3")
    assert lines(caplog) == ["garbage from 198.18.1.2", "bad length from 198.18.1.2",
                             "garbage from 198.18.1.3"]
    caplog.clear()
    clock.now += 59.9
    assert not rl.log(logging.INFO, "198.18.1.2", "garbage", "garbage from %s", "198.18.1.2")
    clock.now += 0.1
    assert rl.log(logging.INFO, "198.18.1.2", "garbage", "garbage from %s", "198.18.1.2")
    assert lines(caplog) == ["garbage from 198.18.1.2 (1000 more like it since the last line)"]
    caplog.clear()
    clock.now += 600
    rl.log(logging.INFO, "198.18.1.2", "garbage", "garbage from %s", "198.18.1.2")
    assert lines(caplog) == ["garbage from 198.18.1.2"]


def test_many_sources_share_a_budget_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOGGER.name)
    clock = Clock()
    rl = RateLimitedLog(LOGGER, 60, max_lines=5, clock=clock)
    for n in range(10_000):
        rl.log(logging.INFO, f"src{n}", "garbage", "garbage from %s", f"src{n}")
    assert lines(caplog) == [f"garbage from src{n}" for n in range(5)]
    caplog.clear()
    clock.now += 60
    rl.log(logging.INFO, "src0", "garbage", "garbage from %s", "src0")
    assert lines(caplog) == [
        "9995 more log lines about bad input were suppressed in the last 60 s",
        "garbage from src0",
    ]


def test_memory_is_bounded_and_the_oldest_key_goes_first(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOGGER.name)
    clock = Clock()
    rl = RateLimitedLog(LOGGER, 60, max_lines=10**9, max_keys=100, clock=clock)
    for n in range(100_000):
        rl.log(logging.INFO, f"src{n}", "garbage", "x")
    assert len(rl._entries) == 100
    caplog.clear()
    # src99999 is remembered (suppressed); src0 was forgotten, so it logs again at once.
    assert not rl.log(logging.INFO, "src99999", "garbage", "x")
    assert rl.log(logging.INFO, "src0", "garbage", "x")
