"""pytier-linkem: a small link emulator (delay, loss, burst loss, policer, rate queue, reordering).

The test kernel has no netem, so this process stands in for it. It runs in a middle namespace M
that has two veth ends and no addresses, reads every Ethernet frame arriving on one end through an
AF_PACKET socket and sends it out of the other, after applying that direction's link model.

    python -m pytier.testbed.linkem --if-a X --if-b Y --delay-ms 20 --loss 10 --rate-mbit 100
    python -m pytier.testbed.linkem --if-a X --if-b Y --delay-ms 20 --burst 0.66,12.5,100 \
        --police-mbit 30 --reorder-pct 2 --reorder-ms 10 --phase loss=10 --phase loss=0

A frame meets, in order: random loss, Gilbert-Elliott burst loss, a token-bucket policer, the
drop-tail queue in front of the rate limit, then the delay (plus the reorder delay for a share of
frames). "ab" is the direction from --if-a to --if-b. Every drop spares ARP frames, so that
neighbour discovery cannot make a lossy test flake; everything else is subject to them. On SIGTERM
or SIGINT it prints one counter line per direction and exits 0; SIGUSR1 prints them and carries on.
Each SIGUSR2 moves to the next --phase (queues and counters carry over) and says so on stderr,
since stdout carries only the counter lines that benchmarks parse.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import select
import signal
import socket
import struct
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Literal, NoReturn, TextIO

from pytier.argtypes import arg_type
from pytier.testbed.path_model import GilbertElliott, Policer, Reorderer

__all__ = [
    "OFF",
    "DirCounters",
    "DirParams",
    "LinkCounters",
    "LinkParams",
    "Phase",
    "Shaper",
    "main",
]

ETH_P_ALL = 0x0003
ETH_P_ARP = 0x0806
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_PROMISC = 1
PACKET_STATISTICS = 6
PACKET_IGNORE_OUTGOING = 23
SO_SNDBUFFORCE = 32  # not in Python's socket module
SO_RCVBUFFORCE = 33
_PACKET_MREQ = struct.Struct("iHH8s")
_TPACKET_STATS = struct.Struct("II")

DEFAULT_QUEUE_MS = 50.0  # drop-tail limit of a rate-limited direction when none is given
DEFAULT_POLICE_BUCKET_BYTES = 65536
RCVBUF_BYTES = 8 << 20  # room for bursts while the loop is busy with the other direction
FRAME_BUF = 65536  # bytes; larger than any frame an MTU-1500 veth without offloads can carry
READ_BATCH = 256  # frames read from one socket per wake-up before looking at the other
DROP = -1.0  # Shaper.admit's answer for a dropped frame

_ARP_HI, _ARP_LO = ETH_P_ARP >> 8, ETH_P_ARP & 0xFF



@dataclass(frozen=True)
class DirParams:
    """The link model of one direction."""

    delay_ms: float = 0.0
    loss_pct: float = 0.0
    rate_mbit: float | None = None
    queue_ms: float | None = None
    queue_bytes: int | None = None
    # Gilbert-Elliott burst loss, per frame, in percent (see path_model.GilbertElliott); off while
    # burst_loss_pct is 0. The good state loses nothing: loss_pct adds background loss.
    burst_enter_pct: float = 0.0
    burst_exit_pct: float = 100.0
    burst_loss_pct: float = 0.0
    police_mbit: float | None = None  # token-bucket policer; None: none
    police_bucket_bytes: int = DEFAULT_POLICE_BUCKET_BYTES
    reorder_pct: float = 0.0  # share of frames held back by reorder_ms, so later ones overtake them
    reorder_ms: float = 0.0

    def __post_init__(self) -> None:
        if not (self.delay_ms >= 0 and math.isfinite(self.delay_ms)):
            raise ValueError(f"delay {self.delay_ms} ms must be a finite number >= 0")
        if not 0 <= self.loss_pct <= 100:
            raise ValueError(f"loss {self.loss_pct} % must be within 0..100")
        if self.rate_mbit is not None and not (self.rate_mbit > 0 and math.isfinite(self.rate_mbit)):
            raise ValueError(f"rate {self.rate_mbit} Mbit/s must be a finite number > 0")
        if self.queue_ms is not None and self.queue_ms < 0:
            raise ValueError(f"queue {self.queue_ms} ms must be >= 0")
        if self.queue_bytes is not None and self.queue_bytes < 0:
            raise ValueError(f"queue {self.queue_bytes} bytes must be >= 0")
        for name, pct in (
            ("burst enter", self.burst_enter_pct),
            ("burst exit", self.burst_exit_pct),
            ("burst loss", self.burst_loss_pct),
            ("reorder share", self.reorder_pct),
        ):
            if not 0 <= pct <= 100:
                raise ValueError(f"{name} {pct} % must be within 0..100")
        if self.police_mbit is not None and not (self.police_mbit > 0 and math.isfinite(self.police_mbit)):
            raise ValueError(f"police rate {self.police_mbit} Mbit/s must be a finite number > 0")
        if self.police_bucket_bytes <= 0:
            raise ValueError(f"police bucket {self.police_bucket_bytes} bytes must be > 0")
        if not (self.reorder_ms >= 0 and math.isfinite(self.reorder_ms)):
            raise ValueError(f"reorder delay {self.reorder_ms} ms must be a finite number >= 0")
        if self.reorder_pct > 0 and self.reorder_ms == 0:
            raise ValueError(f"reordering {self.reorder_pct} % of frames needs a reorder delay > 0 ms")

    @property
    def burst(self) -> tuple[float, float, float]:
        """(enter, exit, loss) in percent."""
        return (self.burst_enter_pct, self.burst_exit_pct, self.burst_loss_pct)

    @property
    def reorder(self) -> tuple[float, float]:
        """(share in percent, delay in ms)."""
        return (self.reorder_pct, self.reorder_ms)

    def queue_limit_s(self) -> float:
        """How long a frame may wait for the rate-limited link before drop-tail refuses it."""
        if self.rate_mbit is None:
            return math.inf
        limits = []
        if self.queue_ms is not None:
            limits.append(self.queue_ms / 1000)
        if self.queue_bytes is not None:
            limits.append(self.queue_bytes * 8 / (self.rate_mbit * 1e6))
        return min(limits) if limits else DEFAULT_QUEUE_MS / 1000

    def describe(self) -> str:
        rate = "unlimited" if self.rate_mbit is None else f"{self.rate_mbit:g}Mbit"
        queue = "" if self.rate_mbit is None else f" queue={self.queue_limit_s() * 1000:g}ms"
        text = f"delay={self.delay_ms:g}ms loss={self.loss_pct:g}% rate={rate}{queue}"
        if self.burst_loss_pct > 0:
            text += (
                f" burst=enter{self.burst_enter_pct:g}%/exit{self.burst_exit_pct:g}%"
                f"/loss{self.burst_loss_pct:g}%"
            )
        if self.police_mbit is not None:
            text += f" police={self.police_mbit:g}Mbit/{self.police_bucket_bytes}B"
        if self.reorder_pct > 0:
            text += f" reorder={self.reorder_pct:g}%/{self.reorder_ms:g}ms"
        return text


OFF: Literal["off"] = "off"  # a Phase's rate or policer value that removes the base setting
_PHASE_KEYS = ("delay", "loss", "rate", "burst", "police", "reorder")


def _numbers(text: str, sep: str, count: int, what: str) -> tuple[float, ...]:
    parts = text.split(sep)
    try:
        values = tuple(float(part) for part in parts)
    except ValueError:
        values = ()
    if len(values) != count:
        raise ValueError(f"{what} {text!r} must be {count} numbers separated by {sep!r}")
    return values


def _burst(text: str, sep: str = ",") -> tuple[float, float, float]:
    enter, exit_, loss = _numbers(text, sep, 3, "burst ENTER,EXIT,LOSS")
    return (enter, exit_, loss)


def _reorder(text: str, sep: str = ",") -> tuple[float, float]:
    pct, ms = _numbers(text, sep, 2, "reorder PCT,MS")
    return (pct, ms)


def _rate_or_off(text: str) -> float | Literal["off"]:
    return OFF if text == OFF else float(text)


@dataclass(frozen=True)
class Phase:
    """Settings that replace the base ones in both directions while the phase is on; None keeps the
    base. Written on the command line as `--phase delay=20,loss=10,rate=100,burst=E/X/L,police=30,
    reorder=PCT/MS` (percent, ms, Mbit/s; `rate=off` and `police=off` remove the base limit)."""

    delay_ms: float | None = None
    loss_pct: float | None = None
    rate_mbit: float | Literal["off"] | None = None
    burst: tuple[float, float, float] | None = None  # enter, exit, loss in percent
    police_mbit: float | Literal["off"] | None = None
    reorder: tuple[float, float] | None = None  # share in percent, delay in ms

    @classmethod
    def parse(cls, spec: str) -> Phase:
        """Read a SPEC; an empty one is the base settings unchanged."""
        delay: float | None = None
        loss: float | None = None
        rate: float | Literal["off"] | None = None
        burst: tuple[float, float, float] | None = None
        police: float | Literal["off"] | None = None
        reorder: tuple[float, float] | None = None
        seen: set[str] = set()
        for item in filter(None, spec.split(",")):
            key, eq, value = item.partition("=")
            if not eq or key not in _PHASE_KEYS:
                raise ValueError(f"phase item {item!r} is not one of {'=, '.join(_PHASE_KEYS)}=")
            if key in seen:
                raise ValueError(f"phase {spec!r} sets {key} twice")
            seen.add(key)
            try:
                if key == "delay":
                    delay = float(value)
                elif key == "loss":
                    loss = float(value)
                elif key == "rate":
                    rate = _rate_or_off(value)
                elif key == "burst":
                    burst = _burst(value, "/")
                elif key == "police":
                    police = _rate_or_off(value)
                else:
                    reorder = _reorder(value, "/")
            except ValueError as exc:
                raise ValueError(f"phase item {item!r}: {exc}") from None
        return cls(delay, loss, rate, burst, police, reorder)

    def spec(self) -> str:
        """The SPEC that `parse` reads back as this phase."""
        items: list[str] = []
        if self.delay_ms is not None:
            items.append(f"delay={self.delay_ms!r}")
        if self.loss_pct is not None:
            items.append(f"loss={self.loss_pct!r}")
        if self.rate_mbit is not None:
            items.append(f"rate={self.rate_mbit if self.rate_mbit == OFF else repr(self.rate_mbit)}")
        if self.burst is not None:
            items.append("burst=" + "/".join(repr(v) for v in self.burst))
        if self.police_mbit is not None:
            items.append(f"police={self.police_mbit if self.police_mbit == OFF else repr(self.police_mbit)}")
        if self.reorder is not None:
            items.append("reorder=" + "/".join(repr(v) for v in self.reorder))
        return ",".join(items)

    def apply(self, base: DirParams) -> DirParams:
        """`base` with this phase's settings in place (validated like any DirParams)."""
        p = base
        if self.delay_ms is not None:
            p = replace(p, delay_ms=self.delay_ms)
        if self.loss_pct is not None:
            p = replace(p, loss_pct=self.loss_pct)
        if self.rate_mbit is not None:
            p = replace(p, rate_mbit=None if self.rate_mbit == OFF else self.rate_mbit)
        if self.burst is not None:
            enter, exit_, loss = self.burst
            p = replace(p, burst_enter_pct=enter, burst_exit_pct=exit_, burst_loss_pct=loss)
        if self.police_mbit is not None:
            p = replace(p, police_mbit=None if self.police_mbit == OFF else self.police_mbit)
        if self.reorder is not None:
            p = replace(p, reorder_pct=self.reorder[0], reorder_ms=self.reorder[1])
        return p


@dataclass(frozen=True)
class LinkParams:
    """Both directions' link models, and the phases that SIGUSR2 steps through (phase 0 is ab/ba).

    The queue limit and the police bucket go on the command line once for both directions, so
    `to_argv` reproduces them from `ab`.
    """

    ab: DirParams
    ba: DirParams
    phases: tuple[Phase, ...] = ()

    def __post_init__(self) -> None:
        for n in range(1, len(self.phases) + 1):
            try:
                self.phase_params(n)
            except ValueError as exc:
                raise ValueError(f"phase {n} ({self.phases[n - 1].spec()}): {exc}") from None

    def phase_params(self, n: int) -> tuple[DirParams, DirParams]:
        """The (ab, ba) settings of phase `n`: 0 for the base ones, then 1 .. len(phases)."""
        if n == 0:
            return self.ab, self.ba
        phase = self.phases[n - 1]
        return phase.apply(self.ab), phase.apply(self.ba)

    @classmethod
    def both_ways(
        cls,
        *,
        delay_ms: float = 0.0,
        loss_pct: float = 0.0,
        rate_mbit: float | None = None,
        queue_ms: float | None = None,
        queue_bytes: int | None = None,
        loss_ab: float | None = None,
        loss_ba: float | None = None,
        delay_ab: float | None = None,
        delay_ba: float | None = None,
        rate_ab: float | None = None,
        rate_ba: float | None = None,
        burst: tuple[float, float, float] | None = None,
        burst_ab: tuple[float, float, float] | None = None,
        burst_ba: tuple[float, float, float] | None = None,
        police_mbit: float | None = None,
        police_ab: float | None = None,
        police_ba: float | None = None,
        police_bucket_bytes: int = DEFAULT_POLICE_BUCKET_BYTES,
        reorder_pct: float = 0.0,
        reorder_ms: float = 0.0,
        reorder_ab: tuple[float, float] | None = None,
        reorder_ba: tuple[float, float] | None = None,
        phases: Sequence[Phase] = (),
    ) -> LinkParams:
        """Symmetric settings, with optional per-direction overrides.

        `burst` is (enter, exit, loss) in percent, `reorder_*` overrides are (share %, delay ms).
        """
        both_burst = burst if burst is not None else DirParams().burst

        def one(
            delay: float | None,
            loss: float | None,
            rate: float | None,
            burst_: tuple[float, float, float] | None,
            police: float | None,
            reorder: tuple[float, float] | None,
        ) -> DirParams:
            enter, exit_, burst_loss = both_burst if burst_ is None else burst_
            share, extra_ms = (reorder_pct, reorder_ms) if reorder is None else reorder
            return DirParams(
                delay_ms=delay_ms if delay is None else delay,
                loss_pct=loss_pct if loss is None else loss,
                rate_mbit=rate_mbit if rate is None else rate,
                queue_ms=queue_ms,
                queue_bytes=queue_bytes,
                burst_enter_pct=enter,
                burst_exit_pct=exit_,
                burst_loss_pct=burst_loss,
                police_mbit=police_mbit if police is None else police,
                police_bucket_bytes=police_bucket_bytes,
                reorder_pct=share,
                reorder_ms=extra_ms,
            )

        return cls(
            one(delay_ab, loss_ab, rate_ab, burst_ab, police_ab, reorder_ab),
            one(delay_ba, loss_ba, rate_ba, burst_ba, police_ba, reorder_ba),
            tuple(phases),
        )

    def to_argv(self) -> list[str]:
        """Command-line options for this process that reproduce these settings."""
        argv: list[str] = []
        default = DirParams()
        for tag, p in (("ab", self.ab), ("ba", self.ba)):
            argv += [f"--delay-{tag}", repr(p.delay_ms), f"--loss-{tag}", repr(p.loss_pct)]
            if p.rate_mbit is not None:
                argv += [f"--rate-{tag}", repr(p.rate_mbit)]
            if p.burst != default.burst:
                argv += [f"--burst-{tag}", ",".join(repr(v) for v in p.burst)]
            if p.police_mbit is not None:
                argv += [f"--police-{tag}", repr(p.police_mbit)]
            if p.reorder != default.reorder:
                argv += [f"--reorder-{tag}", ",".join(repr(v) for v in p.reorder)]
        if self.ab.queue_ms is not None:
            argv += ["--queue-ms", repr(self.ab.queue_ms)]
        if self.ab.queue_bytes is not None:
            argv += ["--queue-bytes", str(self.ab.queue_bytes)]
        if self.ab.police_bucket_bytes != default.police_bucket_bytes:
            argv += ["--police-bucket", str(self.ab.police_bucket_bytes)]
        for phase in self.phases:
            argv += ["--phase", phase.spec()]
        return argv

    @classmethod
    def from_argv(cls, argv: Sequence[str]) -> LinkParams:
        """The settings that the link options in `argv` (as `to_argv` writes them) stand for."""
        parser = _RaisingParser(prog="pytier-linkem", add_help=False)
        _add_link_options(parser)
        return _params_from(parser.parse_args(argv))


@dataclass
class DirCounters:
    """What happened to the frames of one direction."""

    received: int = 0  # frames read from the ingress socket
    passed: int = 0  # frames handed to the egress device
    lost: int = 0  # dropped by the random-loss model
    queue_dropped: int = 0  # refused by the drop-tail queue in front of the rate limit
    send_failed: int = 0  # refused by the egress device (ENOBUFS and the like)
    socket_dropped: int = 0  # dropped by the kernel before we could read them (receive buffer full)
    bytes: int = 0  # bytes of the frames passed
    max_frame: int = 0  # largest frame seen, in bytes, Ethernet header included
    burst_lost: int = 0  # dropped by the Gilbert-Elliott burst-loss model
    policed: int = 0  # dropped by the token-bucket policer
    reordered: int = 0  # held back by the reorder delay, so that later frames overtake them
    loss_runs: int = 0  # runs of consecutive frames lost to random or burst loss

    def mean_loss_run(self) -> float:
        """Mean length of a run of lost frames (0 when none was lost)."""
        return (self.lost + self.burst_lost) / self.loss_runs if self.loss_runs else 0.0

    def format(self, name: str) -> str:
        return f"linkem {name} " + " ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))


@dataclass
class LinkCounters:
    ab: DirCounters
    ba: DirCounters

    @classmethod
    def parse(cls, text: str) -> LinkCounters:
        """Read the counter lines this program prints; the last report for each direction wins."""
        found: dict[str, DirCounters] = {}
        names = {f.name for f in fields(DirCounters)}
        for line in text.splitlines():
            parts = line.split()
            if len(parts) < 2 or parts[0] != "linkem" or parts[1] not in ("a->b", "b->a"):
                continue
            values = dict(part.split("=", 1) for part in parts[2:] if "=" in part)
            found[parts[1]] = DirCounters(**{k: int(v) for k, v in values.items() if k in names})
        if set(found) != {"a->b", "b->a"}:
            raise ValueError(f"no complete link emulator counters in {text!r}")
        return cls(found["a->b"], found["b->a"])


class Shaper:
    """The link model of one direction, sans-IO: frame size and arrival time in, delivery time out.

    A droppable frame meets random loss and burst loss (independent: the burst chain moves on every
    droppable frame, whether random loss took it or not), then the policer, then the rate limit:
    serialisation onto a link that is busy until `busy_until`, where a frame that would wait longer
    than the queue limit is dropped (drop-tail). The delivery time is that plus the delay. Apart from
    the frames held back for reordering (`held_back` says so for the frame just admitted; they all get
    the same extra delay) delivery times never decrease, so the caller can hold delayed frames in two
    FIFOs, one for each kind. A phase that shortens the delay breaks that for the frames admitted
    across the switch; in a FIFO the newer ones then wait for the older ones rather than overtake
    them. ARP frames meet only the rate limit and the delay.
    """

    __slots__ = (
        "_burst",
        "_busy_until",
        "_delay_s",
        "_losing",
        "_loss",
        "_policer",
        "_queue_s",
        "_reorderer",
        "_rng",
        "_s_per_byte",
        "counters",
        "held_back",
    )

    def __init__(self, params: DirParams, rng: random.Random) -> None:
        self._busy_until = 0.0
        self._rng = rng
        self._losing = False
        self.held_back = False
        self.counters = DirCounters()
        self.set_params(params)

    def set_params(self, params: DirParams) -> None:
        """Switch to new settings: the queue backlog and the counters carry over, the burst chain
        restarts in its good state and the policer with a full bucket."""
        self._delay_s = params.delay_ms / 1000
        self._loss = params.loss_pct / 100
        self._s_per_byte = 0.0 if params.rate_mbit is None else 8 / (params.rate_mbit * 1e6)
        self._queue_s = params.queue_limit_s()
        self._burst = (
            GilbertElliott(
                params.burst_enter_pct / 100,
                params.burst_exit_pct / 100,
                params.burst_loss_pct / 100,
                self._rng,
            )
            if params.burst_loss_pct > 0
            else None
        )
        self._policer = (
            None
            if params.police_mbit is None
            else Policer(params.police_mbit * 1e6, params.police_bucket_bytes)
        )
        self._reorderer = (
            Reorderer(params.reorder_pct / 100, params.reorder_ms / 1000, self._rng)
            if params.reorder_pct > 0
            else None
        )

    def admit(self, size: int, droppable: bool, now: float) -> float:
        """Return when a frame of `size` bytes arriving at `now` leaves the link, or DROP."""
        c = self.counters
        c.received += 1
        if size > c.max_frame:
            c.max_frame = size
        self.held_back = False
        if droppable:
            lost = self._loss > 0.0 and self._rng.random() < self._loss
            burst_lost = self._burst is not None and self._burst.drop()
            if lost or burst_lost:
                if lost:
                    c.lost += 1
                else:
                    c.burst_lost += 1
                if not self._losing:
                    self._losing = True
                    c.loss_runs += 1
                return DROP
            self._losing = False
            if self._policer is not None and not self._policer.admit(size, now):
                c.policed += 1
                return DROP
        if self._s_per_byte:
            start = self._busy_until if self._busy_until > now else now
            if droppable and start - now > self._queue_s:
                c.queue_dropped += 1
                return DROP
            self._busy_until = start + size * self._s_per_byte
            at = self._busy_until + self._delay_s
        else:
            at = now + self._delay_s
        if droppable and self._reorderer is not None:
            extra = self._reorderer.extra_delay()
            if extra:
                c.reordered += 1
                self.held_back = True
                at += extra
        return at


def _is_arp(frame: bytearray) -> bool:
    return frame[12] == _ARP_HI and frame[13] == _ARP_LO


def _packet_socket(ifname: str, rcvbuf: int) -> socket.socket:
    # Protocol 0 at creation: the socket hears nothing until bind() names both the device and
    # ETH_P_ALL, so no frame of the other interface can slip in before the bind.
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, rcvbuf)
        sock.bind((ifname, ETH_P_ALL))
        index = socket.if_nametoindex(ifname)
        sock.setsockopt(
            SOL_PACKET, PACKET_ADD_MEMBERSHIP, _PACKET_MREQ.pack(index, PACKET_MR_PROMISC, 0, b"")
        )
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class _Port:
    """One direction's I/O: the ingress socket, the shaper, the egress socket, and two FIFOs of
    delayed frames: `fifo` in order of admission and `held` for the frames held back to be reordered."""

    __slots__ = ("fifo", "held", "rx", "shaper", "tx")

    def __init__(self, rx: socket.socket, tx: socket.socket, shaper: Shaper) -> None:
        self.rx = rx
        self.tx = tx
        self.shaper = shaper
        self.fifo: deque[tuple[float, bytes]] = deque()
        self.held: deque[tuple[float, bytes]] = deque()

    def pump(self, buf: bytearray, view: memoryview) -> None:
        rx_into = self.rx.recv_into
        shaper = self.shaper
        admit = shaper.admit
        fifo, held = self.fifo, self.held
        now = time.monotonic()
        for _ in range(READ_BATCH):
            try:
                n = rx_into(buf)
            except BlockingIOError:
                return
            at = admit(n, not _is_arp(buf), now)
            if at == DROP:
                continue
            if shaper.held_back:
                held.append((at, bytes(view[:n])))
            elif at <= now and not fifo and not held:
                self._send(view[:n])
            else:
                fifo.append((at, bytes(view[:n])))

    def release(self, now: float) -> float:
        """Send every frame due by `now`, earliest first; return when the next one is due (inf if none)."""
        fifo, held = self.fifo, self.held
        while fifo or held:
            queue = held if held and (not fifo or held[0][0] < fifo[0][0]) else fifo
            at, frame = queue[0]
            if at > now:
                return at
            queue.popleft()
            self._send(frame)
        return math.inf

    def _send(self, frame: bytes | memoryview) -> None:
        c = self.shaper.counters
        try:
            self.tx.send(frame)
        except OSError:
            c.send_failed += 1
            return
        c.passed += 1
        c.bytes += len(frame)

    def socket_drops(self) -> int:
        # PACKET_STATISTICS resets the kernel's counters on every read, hence the sum.
        _, drops = _TPACKET_STATS.unpack(
            self.rx.getsockopt(SOL_PACKET, PACKET_STATISTICS, _TPACKET_STATS.size)
        )
        self.shaper.counters.socket_dropped += drops
        return self.shaper.counters.socket_dropped


class Emulator:
    """Bridges two interfaces through one Shaper per direction, in a single epoll loop."""

    def __init__(
        self, if_a: str, if_b: str, params: LinkParams, seed: int | None = None, rcvbuf: int = RCVBUF_BYTES
    ) -> None:
        self.if_a = if_a
        self.if_b = if_b
        self.params = params
        base = random.Random(seed).getrandbits(64)
        self._sock_a = _packet_socket(if_a, rcvbuf)
        try:
            self._sock_b = _packet_socket(if_b, rcvbuf)
        except BaseException:
            self._sock_a.close()
            raise
        self.ab = _Port(self._sock_a, self._sock_b, Shaper(params.ab, random.Random(f"{base}-ab")))
        self.ba = _Port(self._sock_b, self._sock_a, Shaper(params.ba, random.Random(f"{base}-ba")))
        self._stop = False
        self._dump = False
        self._phase = 0
        self._phases_due = 0  # SIGUSR2s not yet acted on; a count, so that none is lost

    @property
    def counters(self) -> LinkCounters:
        return LinkCounters(self.ab.shaper.counters, self.ba.shaper.counters)

    def report(self, out: TextIO) -> None:
        self.ab.socket_drops()
        self.ba.socket_drops()
        out.write(self.ab.shaper.counters.format("a->b") + "\n")
        out.write(self.ba.shaper.counters.format("b->a") + "\n")
        out.flush()

    def request_stop(self) -> None:
        self._stop = True

    def request_report(self) -> None:
        self._dump = True

    def request_next_phase(self) -> None:
        self._phases_due += 1

    @property
    def phase(self) -> int:
        return self._phase

    def next_phase(self, log: TextIO) -> None:
        """Move both directions to the next phase and say so on `log`; nothing after the last one."""
        if self._phase >= len(self.params.phases):
            return
        self._phase += 1
        ab, ba = self.params.phase_params(self._phase)
        self.ab.shaper.set_params(ab)
        self.ba.shaper.set_params(ba)
        log.write(f"linkem phase {self._phase}: a->b: {ab.describe()} b->a: {ba.describe()}\n")
        log.flush()

    def run(self, wake_fd: int, out: TextIO, log: TextIO) -> None:
        """Bridge frames until request_stop(); `wake_fd` becomes readable when a signal arrives.

        Counter reports go to `out`, phase changes to `log`."""
        buf = bytearray(FRAME_BUF)
        view = memoryview(buf)
        ep = select.epoll()
        fd_a, fd_b = self._sock_a.fileno(), self._sock_b.fileno()
        ab, ba = self.ab, self.ba
        try:
            for fd in (fd_a, fd_b, wake_fd):
                ep.register(fd, select.EPOLLIN)
            poll = ep.poll
            monotonic = time.monotonic
            next_due = math.inf
            while not self._stop:
                timeout = -1.0 if next_due == math.inf else max(0.0, next_due - monotonic())
                for fd, _ in poll(timeout):
                    if fd == fd_a:
                        ab.pump(buf, view)
                    elif fd == fd_b:
                        ba.pump(buf, view)
                    else:
                        _drain(wake_fd)
                now = monotonic()
                next_due = min(ab.release(now), ba.release(now))
                if self._dump:
                    self._dump = False
                    self.report(out)
                while self._phases_due:
                    self._phases_due -= 1
                    self.next_phase(log)
        finally:
            ep.close()

    def close(self) -> None:
        self._sock_a.close()
        self._sock_b.close()


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


class _RaisingParser(argparse.ArgumentParser):
    """A parser for use as a library: bad options raise ValueError instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise ValueError(message)


def _add_link_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay, both directions")
    p.add_argument("--loss", type=float, default=0.0, help="random loss in percent, both directions")
    p.add_argument("--rate-mbit", type=float, default=None, help="rate limit in Mbit/s, both directions")
    p.add_argument(
        "--queue-ms",
        type=float,
        default=None,
        help=f"drop-tail queue limit in ms of serialisation (default {DEFAULT_QUEUE_MS:g})",
    )
    p.add_argument("--queue-bytes", type=int, default=None, help="drop-tail queue limit in bytes")
    p.add_argument(
        "--burst",
        type=arg_type(_burst),
        default=None,
        metavar="ENTER,EXIT,LOSS",
        help="Gilbert-Elliott burst loss, both directions: percent per frame to enter and to leave "
        "the bad state, and the loss in it (mean burst = 100/EXIT frames when LOSS is 100)",
    )
    p.add_argument("--police-mbit", type=float, default=None, help="token-bucket policer, both directions")
    p.add_argument(
        "--police-bucket",
        type=int,
        default=DEFAULT_POLICE_BUCKET_BYTES,
        help=f"policer bucket in bytes (default {DEFAULT_POLICE_BUCKET_BYTES})",
    )
    p.add_argument("--reorder-pct", type=float, default=0.0, help="share of frames held back, both ways")
    p.add_argument("--reorder-ms", type=float, default=0.0, help="how long held-back frames are held, ms")
    for tag, desc in (("ab", "a to b"), ("ba", "b to a")):
        p.add_argument(f"--delay-{tag}", type=float, default=None, help=f"one-way delay {desc}, ms")
        p.add_argument(f"--loss-{tag}", type=float, default=None, help=f"loss {desc}, percent")
        p.add_argument(f"--rate-{tag}", type=float, default=None, help=f"rate {desc}, Mbit/s")
        p.add_argument(
            f"--burst-{tag}",
            type=arg_type(_burst),
            default=None,
            metavar="ENTER,EXIT,LOSS",
            help=f"burst loss {desc}",
        )
        p.add_argument(f"--police-{tag}", type=float, default=None, help=f"policer {desc}, Mbit/s")
        p.add_argument(
            f"--reorder-{tag}",
            type=arg_type(_reorder),
            default=None,
            metavar="PCT,MS",
            help=f"reordering {desc}",
        )
    p.add_argument(
        "--phase",
        type=arg_type(Phase.parse),
        action="append",
        default=[],
        metavar="SPEC",
        help="settings that each SIGUSR2 switches to in turn, both directions, on top of the others: "
        "comma-separated delay=MS, loss=PCT, rate=MBIT|off, burst=ENTER/EXIT/LOSS, police=MBIT|off, "
        "reorder=PCT/MS (repeatable)",
    )


def _params_from(args: argparse.Namespace) -> LinkParams:
    return LinkParams.both_ways(
        delay_ms=args.delay_ms,
        loss_pct=args.loss,
        rate_mbit=args.rate_mbit,
        queue_ms=args.queue_ms,
        queue_bytes=args.queue_bytes,
        loss_ab=args.loss_ab,
        loss_ba=args.loss_ba,
        delay_ab=args.delay_ab,
        delay_ba=args.delay_ba,
        rate_ab=args.rate_ab,
        rate_ba=args.rate_ba,
        burst=args.burst,
        burst_ab=args.burst_ab,
        burst_ba=args.burst_ba,
        police_mbit=args.police_mbit,
        police_ab=args.police_ab,
        police_ba=args.police_ba,
        police_bucket_bytes=args.police_bucket,
        reorder_pct=args.reorder_pct,
        reorder_ms=args.reorder_ms,
        reorder_ab=args.reorder_ab,
        reorder_ba=args.reorder_ba,
        phases=args.phase,
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pytier-linkem", description=__doc__.splitlines()[0] if __doc__ else None
    )
    p.add_argument("--if-a", required=True, help="first interface (frames from it go out of --if-b)")
    p.add_argument("--if-b", required=True, help="second interface")
    _add_link_options(p)
    p.add_argument("--seed", type=int, default=None, help="seed for the loss draws (default: random)")
    p.add_argument("--rcvbuf", type=int, default=RCVBUF_BYTES, help="socket buffer size in bytes")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        params = _params_from(args)
        emu = Emulator(args.if_a, args.if_b, params, seed=args.seed, rcvbuf=args.rcvbuf)
    except (ValueError, OSError) as exc:
        print(f"pytier-linkem: {exc}", file=sys.stderr)
        return 2
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    signal.signal(signal.SIGTERM, lambda *_: emu.request_stop())
    signal.signal(signal.SIGINT, lambda *_: emu.request_stop())
    signal.signal(signal.SIGUSR1, lambda *_: emu.request_report())
    signal.signal(signal.SIGUSR2, lambda *_: emu.request_next_phase())
    out = sys.stdout
    out.write(
        f"linkem ready if_a={args.if_a} if_b={args.if_b} "
        f"a->b: {params.ab.describe()} b->a: {params.ba.describe()}\n"
    )
    out.flush()
    try:
        emu.run(wake_r.fileno(), out, sys.stderr)
    finally:
        emu.report(out)
        emu.close()
        signal.set_wakeup_fd(-1)
        wake_r.close()
        wake_w.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
