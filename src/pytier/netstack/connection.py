"""One TCP connection (RFC 9293): the state machine over received segment fields, sans-IO.

Sequence numbers are kept unwrapped: plain ints that keep growing past 2**32, so that every comparison
below is an ordinary `<`. A received 32-bit number is unwrapped to the value nearest a reference
(RCV.NXT for sequence numbers, SND.UNA for acknowledgements) and wrapped again with `& MASK` on output.

What is in, and where:
* handshake with MSS, window scale (RFC 7323 section 2) and SACK-permitted; timestamps are not
  offered, so after the handshake the only option either side sends is SACK;
* a passive open waits in SYN_HELD until the owner accepts or refuses (the proxy may first connect to
  the real destination); simultaneous open goes SYN_SENT -> SYN_RECEIVED;
* the acceptability test, RST and SYN checks of RFC 9293 3.10.7.4 with RFC 5961's challenge ACKs;
* send side: a byte buffer from SND.UNA on, MSS-sized segments within min(peer window, cwnd), sender
  silly-window avoidance, FIN after the last byte, RTO per RFC 6298 with Karn's rule and backoff
  (go-back-N from SND.UNA on expiry, the SACK scoreboard dropped as RFC 2018 asks), loss recovery
  entered on three duplicate ACKs or three segments' worth of SACKed bytes: with SACK every hole below
  the highest SACKed byte is resent once per episode (a simplified RFC 6675), without it NewReno
  (RFC 6582); a tail loss probe (RFC 8985 TLP, once per flight) resends the last segment after
  2 * SRTT of silence so that a lost tail shows up as a SACK hole instead of waiting for the RTO;
  persist timer with window probes (Linux style: SEG.SEQ = SND.UNA - 1, no data);
* receive side: in-order bytes wait in `rcv_buf` until the owner takes them (the window is the room
  left, with receiver silly-window avoidance), out-of-order ones in an `Assembler`; a duplicate ACK
  goes out at once for every out-of-order segment (RFC 5681 4.2), other ACKs at the next flush or after
  `ack_every` segments; ACKs carry SACK blocks for what the assembler holds;
* close: FIN_WAIT_1/2, CLOSING (simultaneous close), TIME_WAIT (short), CLOSE_WAIT, LAST_ACK.
"""

from __future__ import annotations

import struct
from enum import Enum
from typing import Protocol

from pytier.netstack.assembler import Assembler
from pytier.netstack.config import NetStackConfig
from pytier.netstack.events import (
    CloseReason,
    Connected,
    ConnectionClosed,
    DataReceived,
    Endpoint,
    NetStackError,
    NetStackEvent,
    PeerFinished,
    Writable,
)
from pytier.netstack.rtt import RttEstimator
from pytier.netstack.segment import SegmentWriter, emit_packet
from pytier.wire.tcp import TcpFlags, TcpRepr

__all__ = ["Connection", "Host", "State"]

MASK = 0xFFFFFFFF
HALF = 0x80000000
F_FIN = 0x01
F_SYN = 0x02
F_RST = 0x04
F_PSH = 0x08
F_ACK = 0x10

DEFAULT_MSS = 536  # bytes, when the SYN carries no MSS option (RFC 9293 3.7.1)
MIN_MSS = 48  # bytes; a smaller MSS would let a peer make us send tiny segments (Linux's floor)
MAX_WINDOW_SHIFT = 14  # RFC 7323 2.3
DUP_THRESH = 3  # duplicate ACKs, or segments' worth of SACKed bytes, that mean a loss (RFC 5681, 6675)
MAX_SACK_BLOCKS = 4  # what fits in 40 bytes of options without timestamps
MAX_SCOREBOARD = 64  # SACKed ranges remembered per connection
TLP_MIN = 0.01  # seconds: the shortest tail loss probe timeout
_SACK_BLOCK = struct.Struct("!II")


class State(Enum):
    SYN_HELD = "syn-held"  # SYN received, the owner has not accepted or refused yet
    SYN_SENT = "syn-sent"
    SYN_RECEIVED = "syn-received"
    ESTABLISHED = "established"
    FIN_WAIT_1 = "fin-wait-1"
    FIN_WAIT_2 = "fin-wait-2"
    CLOSE_WAIT = "close-wait"
    CLOSING = "closing"
    LAST_ACK = "last-ack"
    TIME_WAIT = "time-wait"
    CLOSED = "closed"


# Tuples, not sets: `in` tests identity first, where a set would call Enum's Python-level __hash__.
# States whose send side still has bytes (data or our FIN) to send or retransmit.
SENDING = (State.ESTABLISHED, State.CLOSE_WAIT, State.FIN_WAIT_1, State.LAST_ACK, State.CLOSING)
# States in which the peer may still send data.
RECEIVING = (State.ESTABLISHED, State.FIN_WAIT_1, State.FIN_WAIT_2)
# What the owner's shutdown_write does to a synchronized state.
_ON_SHUTDOWN = {State.ESTABLISHED: State.FIN_WAIT_1, State.CLOSE_WAIT: State.LAST_ACK}
# What the peer's FIN does.
_ON_PEER_FIN = {
    State.ESTABLISHED: State.CLOSE_WAIT,
    State.FIN_WAIT_1: State.CLOSING,
    State.FIN_WAIT_2: State.TIME_WAIT,
}
# What the ACK of our FIN does.
_ON_FIN_ACKED = {
    State.FIN_WAIT_1: State.FIN_WAIT_2,
    State.CLOSING: State.TIME_WAIT,
    State.LAST_ACK: State.CLOSED,
}


class Host(Protocol):
    """What a connection needs from the stack that owns it."""

    out: list[bytes]

    def event(self, event: NetStackEvent) -> None: ...

    def queue_delivery(self, conn: Connection) -> None:
        """Put a marker in the event queue that becomes a DataReceived when the owner reaches it."""

    def wake(self, conn: Connection) -> None:
        """Have `transmit` called at the next flush."""

    def schedule(self, conn: Connection, when: float) -> None:
        """Have `on_timer` called no later than `when`."""

    def retire(self, conn: Connection) -> None:
        """The connection no longer answers for its four-tuple."""

    def time_wait(self, conn: Connection) -> None:
        """The connection entered TIME_WAIT."""


def unwrap(raw: int, ref: int) -> int:
    """The unwrapped sequence number nearest `ref` whose low 32 bits are `raw`."""
    return ref + ((raw - ref + HALF) & MASK) - HALF


class Connection:
    __slots__ = (
        "ack_now",
        "ack_pending",
        "answered_at",
        "bytes_received",
        "bytes_sent",
        "closed_reported",
        "config",
        "cwnd",
        "deadline",
        "delivery_queued",
        "dirty",
        "dupacks",
        "fin_at",
        "fin_queued",
        "fin_reported",
        "finished",
        "handle",
        "host",
        "in_recovery",
        "irs",
        "iss",
        "key",
        "local",
        "max_snd_wnd",
        "ooo",
        "ooo_latest",
        "passive",
        "paused",
        "peer_fin",
        "persist",
        "persist_backoff",
        "rcv_adv",
        "rcv_buf",
        "rcv_cap",
        "rcv_nxt",
        "rcv_shift",
        "read_closed",
        "recover",
        "remote",
        "retransmits",
        "retries",
        "rexmit_hi",
        "rexmit_mark",
        "rto_at",
        "rtt",
        "rtt_sent",
        "rtt_seq",
        "sack_ok",
        "sacked",
        "sacked_bytes",
        "scheduled",
        "snd_base",
        "snd_buf",
        "snd_max",
        "snd_mss",
        "snd_nxt",
        "snd_shift",
        "snd_una",
        "snd_wl1",
        "snd_wl2",
        "snd_wnd",
        "ssthresh",
        "state",
        "tlp_armed",
        "tlp_done",
        "wants_shift",
        "write_blocked",
        "writer",
    )

    def __init__(
        self,
        host: Host,
        config: NetStackConfig,
        handle: int,
        key: bytes,
        local: Endpoint,
        remote: Endpoint,
        iss: int,
    ) -> None:
        self.host = host
        self.config = config
        self.handle = handle
        self.key = key
        self.local = local
        self.remote = remote
        self.writer = SegmentWriter(
            local.addr.packed, local.port, remote.addr.packed, remote.port, config.ttl
        )
        self.state = State.CLOSED
        self.passive = True
        self.dirty = False
        self.scheduled: float | None = None
        # send side
        self.iss = iss
        self.snd_una = iss
        self.snd_nxt = iss
        self.snd_max = iss  # highest sequence number sent plus one (SND.NXT before a go-back-N)
        self.snd_wnd = 0
        self.max_snd_wnd = 0
        self.snd_wl1 = 0
        self.snd_wl2 = 0
        self.snd_shift = 0
        self.snd_mss = DEFAULT_MSS
        self.snd_buf = bytearray()  # bytes from snd_base on: unacknowledged, then unsent
        self.snd_base = iss + 1
        self.fin_queued = False
        self.write_blocked = False
        self.cwnd = config.initial_cwnd_segments * DEFAULT_MSS
        self.ssthresh = 1 << 62
        self.dupacks = 0
        self.in_recovery = False
        self.recover = iss
        self.sack_ok = False  # both sides offered SACK
        self.sacked: list[list[int]] = []  # the scoreboard: [start, end) ranges the peer SACKed, sorted
        self.sacked_bytes = 0
        self.rexmit_hi = iss  # in SACK recovery, holes below this were already resent
        self.rexmit_mark = iss  # SND.MAX when they were: a SACK beyond it means those copies were lost
        # receive side
        self.irs = 0
        self.rcv_nxt = 0
        self.rcv_buf = bytearray()  # in order, not yet handed to the owner
        self.rcv_cap = config.recv_buffer
        self.rcv_shift = 0
        self.wants_shift: int | None = config.window_shift  # the scale we offer; None once refused
        self.rcv_adv = 0  # right edge of the window last advertised
        self.ooo = Assembler(config.max_ooo_ranges)
        self.ooo_latest = 0  # where the latest out-of-order segment began: its SACK block goes first
        self.fin_at: int | None = None  # where the peer's FIN sits, when it came ahead of a hole
        self.peer_fin = False
        self.paused = False
        self.read_closed = False
        self.ack_pending = 0  # in-order segments received since our last ACK
        self.ack_now = False
        self.answered_at = float("-inf")  # when we last answered an unacceptable segment
        # delivery to the owner
        self.delivery_queued = False
        self.fin_reported = False
        self.finished = False  # closed in order: ConnectionClosed follows the data and PeerFinished
        self.closed_reported = False
        # timers
        self.rtt = RttEstimator(config.initial_rto, config.min_rto, config.max_rto)
        self.rto_at: float | None = None  # retransmission, or window probe when `persist`
        self.persist = False
        self.persist_backoff = 0
        self.tlp_armed = False  # rto_at is a tail loss probe timeout
        self.tlp_done = False  # a probe went out since SND.UNA last moved
        self.retries = 0
        self.rtt_seq: int | None = None  # the timed segment is acknowledged when SND.UNA reaches this
        self.rtt_sent = 0.0
        self.deadline: float | None = None  # accept (SYN_HELD), FIN_WAIT_2 of an orphan, TIME_WAIT
        # statistics
        self.bytes_sent = 0  # acknowledged by the peer
        self.bytes_received = 0
        self.retransmits = 0

    # ------------------------------------------------------------------------------------------
    # opening

    def open_passive(self, syn: TcpRepr, now: float) -> None:
        """A SYN arrived; hold it for the owner."""
        self.state = State.SYN_HELD
        self._take_syn(syn)
        self._set_deadline(now + self.config.accept_timeout)

    def open_active(self) -> None:
        self.state = State.SYN_SENT
        self.passive = False
        self.host.wake(self)

    def accept(self) -> None:
        if self.state is not State.SYN_HELD:
            raise NetStackError(f"accept: connection {self.handle} is {self.state.value}, not held")
        self.state = State.SYN_RECEIVED
        self.deadline = None
        self.host.wake(self)

    def refuse(self) -> None:
        if self.state is not State.SYN_HELD:
            raise NetStackError(f"refuse: connection {self.handle} is {self.state.value}, not held")
        self._reset_unsynchronized()
        self._terminate(CloseReason.REFUSED)

    def _take_syn(self, syn: TcpRepr) -> None:
        self.irs = syn.seq
        self.rcv_nxt = syn.seq + 1
        self.snd_wl1 = syn.seq
        self.snd_wnd = syn.window  # never scaled in a SYN
        self.max_snd_wnd = syn.window
        mss = syn.mss if syn.mss is not None else DEFAULT_MSS
        self.snd_mss = max(MIN_MSS, min(mss, self.config.mss))
        self.cwnd = self.config.initial_cwnd_segments * self.snd_mss
        self.sack_ok = self.config.sack and syn.sack_permitted
        if syn.window_scale is not None and self.wants_shift is not None:
            self.snd_shift = min(syn.window_scale, MAX_WINDOW_SHIFT)
            self.rcv_shift = self.wants_shift
        else:
            self.snd_shift = 0
            self.rcv_shift = 0
            self.wants_shift = None

    def _establish(self) -> None:
        self.state = _ON_SHUTDOWN[State.ESTABLISHED] if self.fin_queued else State.ESTABLISHED
        self.retries = 0
        self.host.event(Connected(self.handle))

    def _emit_syn(self, now: float, *, retransmit: bool) -> None:
        ack = self.state is State.SYN_RECEIVED
        window = min(self.rcv_cap, 0xFFFF)
        segment = TcpRepr(
            src_port=self.local.port,
            dst_port=self.remote.port,
            seq=self.iss & MASK,
            ack=self.rcv_nxt & MASK if ack else 0,
            flags=TcpFlags.SYN | TcpFlags.ACK if ack else TcpFlags.SYN,
            window=window,
            mss=self.config.mss,
            window_scale=self.wants_shift,
            sack_permitted=self.sack_ok if ack else self.config.sack,
        )
        self.host.out.append(emit_packet(self.local.addr, self.remote.addr, segment, self.config.ttl))
        if ack:
            self.rcv_adv = self.rcv_nxt + window
        self.snd_nxt = self.snd_max = self.iss + 1
        if retransmit:
            self.retransmits += 1
            self.rtt_seq = None  # Karn: an answer could be to either copy
        else:
            self.rtt_seq = self.iss + 1
            self.rtt_sent = now
        self._arm_rto(now + self.rtt.rto)

    def _on_syn_sent(self, seq_raw: int, ack_raw: int, flags: int, syn: TcpRepr | None, now: float) -> bool:
        """RFC 9293 3.10.7.3. `syn` is the parsed segment (a SYN always has one). Return True when
        the segment's text and FIN remain to be processed."""
        if flags & F_ACK:
            ack = unwrap(ack_raw, self.snd_una)
            if ack != self.iss + 1:
                if not flags & F_RST:
                    self._emit_bare(ack_raw, 0, F_RST)
                return False
            if flags & F_RST:
                self._terminate(CloseReason.REFUSED)
                return False
        elif flags & F_RST:
            return False
        if not flags & F_SYN or syn is None:
            return False
        self._take_syn(syn)
        if not flags & F_ACK:
            # simultaneous open: answer their SYN with ours again, now with an ACK
            self.state = State.SYN_RECEIVED
            self._emit_syn(now, retransmit=True)
            return False
        self.snd_una = self.iss + 1
        self.snd_wl2 = self.snd_una
        if self.rtt_seq is not None:
            self.rtt.sample(now - self.rtt_sent)
            self.rtt_seq = None
        self.rto_at = None
        self._establish()
        self.rcv_adv = self.rcv_nxt
        self.ack_now = True
        self.host.wake(self)
        return True

    # ------------------------------------------------------------------------------------------
    # receiving

    def on_segment(
        self,
        seq_raw: int,
        ack_raw: int,
        flags: int,
        window: int,
        payload: bytes | memoryview,
        opts: TcpRepr | None,
        now: float,
    ) -> None:
        """One segment for this connection; `opts` is the whole segment parsed, when it has options."""
        state = self.state
        if state is State.SYN_SENT:
            if not self._on_syn_sent(seq_raw, ack_raw, flags, opts, now):
                return
            seq = self.irs + 1
            flags &= ~(F_SYN | F_ACK)
        elif state is State.SYN_HELD or state is State.CLOSED:
            return  # the owner has not answered; the peer's retransmitted SYN waits with it
        else:
            seq = unwrap(seq_raw, self.rcv_nxt)
            if flags & F_SYN and seq == self.irs and state is State.SYN_RECEIVED:
                if not flags & F_ACK:
                    self._emit_syn(now, retransmit=True)  # our SYN|ACK was lost
                    return
                # The peer's SYN|ACK of a simultaneous open: its ACK counts, its SYN we have.
                seq += 1
                flags &= ~F_SYN
            if not self._acceptable(seq, len(payload) + (flags & F_SYN) // F_SYN + (flags & F_FIN)):
                if not flags & F_RST:
                    self._answer(now)
                return
            if flags & F_RST:
                if seq == self.rcv_nxt and state is State.TIME_WAIT:
                    # Both streams are complete: the RST only frees the tuple early (as Linux does);
                    # the owner still gets FINISHED after whatever it has not read yet.
                    self.state = State.CLOSED
                    self.deadline = None
                    self.host.retire(self)
                elif seq == self.rcv_nxt:
                    refused = state is State.SYN_RECEIVED and not self.passive
                    self._terminate(CloseReason.REFUSED if refused else CloseReason.RESET)
                else:
                    self._answer(now)  # RFC 5961 3.2 challenge ACK
                return
            if flags & F_SYN:
                self._answer(now)  # RFC 5961 4.2 challenge ACK
                return
            if not flags & F_ACK:
                return
            sack = opts.sack_ranges if opts is not None and self.sack_ok else ()
            if not self._on_ack(seq, ack_raw, window, not payload and not flags & F_FIN, sack, now):
                return
        if payload:
            if self.state in RECEIVING:
                self._on_data(seq, payload, now)
            else:
                self.ack_now = True
                self.host.wake(self)
        if flags & F_FIN:
            self._on_fin(seq + len(payload), now, acked=bool(payload))

    def _acceptable(self, seq: int, seg_len: int) -> bool:
        """RFC 9293 3.10.7.4 first check; a zero window still takes a segment at RCV.NXT (trimmed)."""
        nxt = self.rcv_nxt
        wnd = self.rcv_cap - len(self.rcv_buf)
        if seg_len == 0 or wnd <= 0:
            return seq == nxt if wnd <= 0 else nxt <= seq < nxt + wnd
        return nxt <= seq < nxt + wnd or nxt <= seq + seg_len - 1 < nxt + wnd or seq < nxt < seq + seg_len

    def _on_ack(
        self,
        seq: int,
        ack_raw: int,
        window: int,
        maybe_dup: bool,
        sack: tuple[tuple[int, int], ...],
        now: float,
    ) -> bool:
        """The ACK field and the window of an acceptable segment. False: stop processing it."""
        ack = unwrap(ack_raw, self.snd_una)
        if self.state is State.SYN_RECEIVED:
            if not self.snd_una < ack <= self.snd_max:
                self._emit_bare(ack_raw, 0, F_RST)
                return False
            self.snd_una = ack
            self.snd_wl1 = seq
            self.snd_wl2 = ack
            self.snd_wnd = window << self.snd_shift
            self.max_snd_wnd = max(self.max_snd_wnd, self.snd_wnd)
            if self.rtt_seq is not None:
                self.rtt.sample(now - self.rtt_sent)
                self.rtt_seq = None
            self.rto_at = None
            self._establish()
            self.host.wake(self)
            return True
        if ack > self.snd_max:
            self._answer(now)  # acknowledges something not yet sent
            return False
        snd_una = self.snd_una
        wnd = window << self.snd_shift
        if sack:
            self._update_scoreboard(sack)
        if ack > snd_una:
            self._ack_advance(ack, now)
        elif maybe_dup and ack == snd_una and self.snd_max > snd_una and wnd == self.snd_wnd:
            self._dup_ack()
        if self.sacked:
            if self.in_recovery:
                if self.sacked[-1][1] > self.rexmit_mark and self.rexmit_hi > self.snd_una:
                    # Data sent after our retransmissions arrived and they did not: on a link that
                    # keeps order (a TUN hop does), they were lost too. Resend the holes again.
                    self.rexmit_hi = self.snd_una
                self._retransmit_holes()
            elif self.snd_una >= self.recover and (
                self.sacked_bytes >= DUP_THRESH * self.snd_mss or self.tlp_done
            ):
                # After a tail probe, a SACK of it is enough: sent last, it got through while what
                # lies below it did not.
                self._enter_recovery()
        if self.tlp_done and ack > snd_una and not self.in_recovery:
            self.tlp_done = False  # the probe's news is in: the next flight may be probed again
        if self.snd_wl1 < seq or (self.snd_wl1 == seq and self.snd_wl2 <= ack):
            if wnd != self.snd_wnd:
                if wnd > self.snd_wnd:
                    self.persist_backoff = 0
                    self.host.wake(self)
                self.snd_wnd = wnd
                if wnd > self.max_snd_wnd:
                    self.max_snd_wnd = wnd
            self.snd_wl1 = seq
            self.snd_wl2 = ack
        if self.fin_queued and self.snd_una > self.snd_base + len(self.snd_buf):
            nxt = _ON_FIN_ACKED.get(self.state)
            if nxt is not None:
                return self._our_fin_acked(nxt, now)
        return True

    def _ack_advance(self, ack: int, now: float) -> None:
        acked = ack - self.snd_una
        self.snd_una = ack
        base = self.snd_base
        upto = min(ack, base + len(self.snd_buf))
        if upto > base:
            del self.snd_buf[: upto - base]
            self.snd_base = upto
            self.bytes_sent += upto - base
            if self.write_blocked and len(self.snd_buf) <= self.config.send_buffer * 3 // 4:
                self.write_blocked = False
                self.host.event(Writable(self.handle))
        if self.snd_nxt < ack:
            self.snd_nxt = ack
        if self.rtt_seq is not None and ack >= self.rtt_seq:
            self.rtt.sample(now - self.rtt_sent)
            self.rtt_seq = None
        self.retries = 0
        mss = self.snd_mss
        board = self.sacked
        if board:
            while board and board[0][1] <= ack:
                self.sacked_bytes -= board[0][1] - board[0][0]
                del board[0]
            if board and board[0][0] < ack:
                self.sacked_bytes -= ack - board[0][0]
                board[0][0] = ack
        if self.in_recovery:
            if ack >= self.recover:
                self.in_recovery = False
                self.tlp_done = False
                self.cwnd = self.ssthresh
                self.dupacks = 0
            elif not board and ack >= self.rexmit_hi:
                # NewReno partial ACK: the next hole is lost too (SACK recovery resends its holes
                # as the scoreboard shows them, in _on_ack)
                self._retransmit_first()
                self.cwnd = max(self.cwnd - acked + mss, mss)
        else:
            self.dupacks = 0
            if self.cwnd < self.ssthresh:
                self.cwnd += acked
            else:
                self.cwnd += max(1, mss * acked // self.cwnd)
        if self.snd_nxt > ack:
            self._arm_loss_timer(now)
        else:
            # Nothing in flight (everything acknowledged, or a rewind after an RTO): the flush sends
            # more and arms whichever timer then applies.
            self.rto_at = None
            self.persist = False
        self.host.wake(self)

    def _dup_ack(self) -> None:
        self.dupacks += 1
        if self.dupacks == DUP_THRESH and not self.in_recovery and self.snd_una >= self.recover:
            self._enter_recovery()
        elif self.in_recovery and not self.sacked:
            self.cwnd += self.snd_mss  # NewReno: each duplicate is a segment that left the network
            self.host.wake(self)

    def _enter_recovery(self) -> None:
        mss = self.snd_mss
        self.ssthresh = max((self.snd_max - self.snd_una) // 2, 2 * mss)
        self.recover = self.snd_max
        self.in_recovery = True
        self.rexmit_hi = self.snd_una
        if self.sacked:
            self.cwnd = self.ssthresh
            self._retransmit_holes()
        else:
            self._retransmit_first()
            self.cwnd = self.ssthresh + DUP_THRESH * mss

    def _update_scoreboard(self, blocks: tuple[tuple[int, int], ...]) -> None:
        una, top = self.snd_una, self.snd_max
        board = self.sacked
        for left_raw, right_raw in blocks:
            left = unwrap(left_raw, una)
            right = unwrap(right_raw, una)
            if not una < left < right <= top:
                continue  # a D-SACK below SND.UNA, or nonsense
            i = 0
            while i < len(board) and board[i][1] < left:
                i += 1
            j = i
            while j < len(board) and board[j][0] <= right:
                left = min(left, board[j][0])
                right = max(right, board[j][1])
                j += 1
            board[i:j] = [[left, right]]
        if len(board) > MAX_SCOREBOARD:
            del board[MAX_SCOREBOARD:]
        self.sacked_bytes = sum(end - start for start, end in board)

    def _retransmit_holes(self) -> None:
        """Resend, once per recovery, each hole below the highest SACKed byte that counts as lost."""
        una = self.snd_una
        pos = max(self.rexmit_hi, una)
        mss = self.snd_mss
        room = self._payload_room()
        above = self.sacked_bytes
        base = self.snd_base
        for start, end in self.sacked:
            if pos < start:
                # RFC 6675 IsLost: DupThresh segments' worth SACKed above it (or the duplicate ACKs
                # already said the first one is gone)
                lost = (
                    above >= DUP_THRESH * mss or self.tlp_done or (pos == una and self.dupacks >= DUP_THRESH)
                )
                if not lost:
                    break
                while pos < start:
                    n = min(room, start - pos)
                    self._emit(pos, F_ACK, self.snd_buf[pos - base : pos - base + n])
                    self.retransmits += 1
                    pos += n
                self.rtt_seq = None  # Karn
                self.rexmit_mark = self.snd_max
            above -= end - start
            pos = max(pos, end)
        self.rexmit_hi = pos

    def _our_fin_acked(self, nxt: State, now: float) -> bool:
        if nxt is State.CLOSED:
            self._finish()
            return False
        if nxt is State.TIME_WAIT:
            self._enter_time_wait(now)
            return False
        self.state = nxt
        if self.read_closed:
            self._set_deadline(now + self.config.fin_wait2_timeout)
        return True

    def _on_data(self, seq: int, payload: bytes | memoryview, now: float) -> None:
        nxt = self.rcv_nxt
        n = len(payload)
        if seq < nxt:
            payload = payload[nxt - seq :]
            n = len(payload)
            seq = nxt
        room = self.rcv_cap - len(self.rcv_buf) - (seq - nxt)
        if n > room:
            payload = payload[: max(room, 0)]
            n = len(payload)
        if n <= 0:
            self.ack_now = True  # a duplicate, or a window probe: tell the peer where we are
            self.host.wake(self)
            return
        if self.read_closed:
            self.abort(CloseReason.ABORTED)  # the owner will read no more: RST, as Linux does
            return
        if seq != nxt:
            if self.ooo.insert(seq, payload):
                self.ooo_latest = seq
            if self.sack_ok:
                # The SACK blocks of one ACK per flush tell the peer all it needs.
                self.ack_now = True
                self.host.wake(self)
            else:
                self._emit_ack()  # a duplicate ACK for each, to count for the peer's fast retransmit
            return
        self.rcv_buf += payload
        nxt += n
        if self.ooo:
            more = self.ooo.pop_from(nxt)
            if more:
                self.rcv_buf += more
                n += len(more)
                nxt += len(more)
                self.ack_now = True  # a hole filled: ACK at once (RFC 5681 4.2)
        self.rcv_nxt = nxt
        self.bytes_received += n
        self.ack_pending += 1
        if self.ack_pending >= self.config.ack_every:
            self._emit_ack()
        else:
            self.host.wake(self)
        if self.fin_at == nxt:
            self._consume_fin(now)
        self._deliver()

    def _on_fin(self, fin_seq: int, now: float, *, acked: bool) -> None:
        """The peer's FIN at `fin_seq`; `acked`: the segment's data already drew an ACK if one was due."""
        if self.peer_fin:
            if fin_seq + 1 == self.rcv_nxt:
                self._emit_ack()  # a retransmitted FIN: our ACK was lost
                if self.state is State.TIME_WAIT:
                    self._set_deadline(now + self.config.time_wait)
            return
        if fin_seq != self.rcv_nxt:
            if fin_seq > self.rcv_nxt and self.state in RECEIVING:
                self.fin_at = fin_seq  # ahead of a hole: consumed when the hole fills
            if not acked:
                self._emit_ack()
            return
        self._consume_fin(now)
        self._deliver()

    def _consume_fin(self, now: float) -> None:
        self.rcv_nxt += 1
        self.peer_fin = True
        self.fin_at = None
        self.ooo.clear()
        self.ack_now = True
        self.host.wake(self)
        nxt = _ON_PEER_FIN.get(self.state)
        if nxt is State.TIME_WAIT:
            self._enter_time_wait(now)
        elif nxt is not None:
            self.state = nxt

    # ------------------------------------------------------------------------------------------
    # delivering to the owner

    def _deliver(self) -> None:
        """Queue what the owner may now learn, in stream order."""
        if self.closed_reported:
            return
        if not self.read_closed and not self.paused:
            if self.rcv_buf and not self.delivery_queued:
                self.delivery_queued = True
                self.host.queue_delivery(self)
            if self.peer_fin and not self.fin_reported and not self.rcv_buf:
                self.fin_reported = True
                self.host.event(PeerFinished(self.handle))
        if self.finished and (self.fin_reported or self.read_closed):
            self.closed_reported = True
            self.host.event(ConnectionClosed(self.handle, CloseReason.FINISHED))

    def take_data(self) -> DataReceived | None:
        """The owner reached this connection's delivery marker: hand over what is buffered."""
        self.delivery_queued = False
        if not self.rcv_buf or self.closed_reported:
            return None
        data = bytes(self.rcv_buf)
        self.rcv_buf.clear()
        if self.state is not State.CLOSED and self._window_would_open():
            self.ack_now = True
            self.host.wake(self)
        event = DataReceived(self.handle, data)
        if self.peer_fin and not self.fin_reported:
            self._deliver()
        return event

    def _window_would_open(self) -> bool:
        """True when the room now free is worth a window update (receiver SWS avoidance)."""
        free = self.rcv_cap - len(self.rcv_buf)
        edge = self.rcv_nxt + min(free, 0xFFFF << self.rcv_shift)
        return edge - self.rcv_adv >= min(self.rcv_cap // 2, self.config.mss) and (
            self.rcv_adv - self.rcv_nxt < self.rcv_cap // 2
        )

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        """Deliver again; the window reopens (with an update if worth one) as the owner takes the data."""
        if self.paused:
            self.paused = False
            self._deliver()

    # ------------------------------------------------------------------------------------------
    # sending

    def send(self, data: bytes | bytearray | memoryview) -> int:
        if self.state is State.CLOSED or self.closed_reported:
            return 0  # the owner hears why from the ConnectionClosed already queued
        if self.fin_queued:
            raise NetStackError(f"send: connection {self.handle} was shut for writing ({self.state.value})")
        room = self.config.send_buffer - len(self.snd_buf)
        n = min(room, len(data))
        if n < len(data):
            self.write_blocked = True
        if n > 0:
            self.snd_buf += memoryview(data)[:n]
            self.host.wake(self)
        return max(n, 0)

    def send_capacity(self) -> int:
        if self.fin_queued or self.state is State.CLOSED:
            return 0
        return max(self.config.send_buffer - len(self.snd_buf), 0)

    def shutdown_write(self) -> None:
        if self.fin_queued or self.state is State.CLOSED:
            return
        self.fin_queued = True
        nxt = _ON_SHUTDOWN.get(self.state)
        if nxt is not None:
            self.state = nxt
        self.host.wake(self)

    def close(self, now: float) -> None:
        """Shut both ways: FIN after the data; bytes that arrive from now on reset the connection."""
        state = self.state
        if state is State.CLOSED or self.closed_reported:
            return
        if state is State.SYN_HELD:
            self.refuse()
            return
        if state is State.SYN_SENT:
            self._terminate(CloseReason.ABORTED)
            return
        if self.rcv_buf:
            self.abort(CloseReason.ABORTED)  # unread data would be lost silently otherwise
            return
        self.read_closed = True
        self.shutdown_write()
        if self.state is State.FIN_WAIT_2:
            self._set_deadline(now + self.config.fin_wait2_timeout)
        if self.finished:
            self._deliver()

    def abort(self, reason: CloseReason = CloseReason.ABORTED) -> None:
        state = self.state
        if state is State.CLOSED or self.closed_reported:
            return
        if state is State.SYN_HELD:
            self._reset_unsynchronized()
        elif state is not State.SYN_SENT and state is not State.TIME_WAIT:
            self._emit_bare(self.snd_max & MASK, self.rcv_nxt & MASK, F_RST | F_ACK)
        self._terminate(reason)

    def transmit(self, now: float) -> None:
        """Send what the windows allow, and the ACK owed if nothing carried it."""
        state = self.state
        if state is State.SYN_SENT or state is State.SYN_RECEIVED:
            if self.snd_max == self.iss:
                self._emit_syn(now, retransmit=False)
            return
        if state in SENDING:
            self._send_data(now)
        if self.ack_now or self.ack_pending:
            self._emit_ack()

    def _send_data(self, now: float) -> None:
        base = self.snd_base
        buf = self.snd_buf
        data_end = base + len(buf)
        nxt = self.snd_nxt
        # SACKed bytes have left the network: they do not count against the congestion window.
        edge = self.snd_una + min(self.snd_wnd, self.cwnd + self.sacked_bytes)
        sent = False
        if nxt < data_end:
            window = self._window_field()
            ack = self.rcv_nxt & MASK
            options = self._sack_option() if self.ooo and self.sack_ok else b""
            mss = self.snd_mss - len(options)  # = _payload_room()
            writer = self.writer
            out = self.host.out
            fin = self.fin_queued
            while nxt < data_end:
                left = data_end - nxt
                n = min(mss, left, edge - nxt)
                if n <= 0 or (n < mss and n < left and n < self.max_snd_wnd // 2 and nxt >= self.snd_max):
                    break  # sender silly-window avoidance (for new data): wait for a useful window
                off = nxt - base
                end = nxt + n
                flags = F_ACK
                if end == data_end:
                    flags |= F_PSH | F_FIN if fin else F_PSH
                out.append(writer.segment(nxt & MASK, ack, flags, window, buf[off : off + n], options))
                if flags & F_FIN:
                    end += 1
                if end <= self.snd_max:
                    self.retransmits += 1
                elif self.rtt_seq is None and nxt >= self.snd_max:
                    self.rtt_seq = end
                    self.rtt_sent = now
                if end > self.snd_max:
                    self.snd_max = end
                nxt = end
                sent = True
            self.snd_nxt = nxt
        if self.fin_queued and nxt == data_end:
            self._emit(data_end, F_FIN | F_ACK, b"")
            if data_end + 1 <= self.snd_max:
                self.retransmits += 1
            self.snd_nxt = self.snd_max = data_end + 1
            sent = True
        if sent:
            self.ack_pending = 0
            self.ack_now = False
            if self.persist:
                self.persist = False
                self.rto_at = None
            if self.rto_at is None:
                self._arm_loss_timer(now)
        elif nxt < data_end and self.snd_nxt <= self.snd_una and self.rto_at is None:
            # Data waits for a window and nothing in flight will bring an ACK: probe (RFC 9293 3.8.6.1).
            self.persist = True
            self._arm_rto(now + min(self.rtt.rto * (1 << self.persist_backoff), self.config.max_rto))

    def _retransmit_first(self) -> None:
        """Send again the first unacknowledged segment (fast retransmit, NewReno partial ACK)."""
        una = self.snd_una
        data_end = self.snd_base + len(self.snd_buf)
        # Never past SND.MAX: bytes beyond it were never sent, and counting them as sent is the
        # transmit path's business.
        n = min(self._payload_room(), data_end - una, self.snd_max - una)
        flags = F_ACK
        if self.fin_queued and una + n == data_end and self.snd_max > data_end:
            flags |= F_FIN
        if n <= 0 and not flags & F_FIN:
            return
        off = una - self.snd_base
        self._emit(una, flags | F_PSH if n else flags, self.snd_buf[off : off + max(n, 0)])
        self.retransmits += 1
        self.rtt_seq = None  # Karn
        self.rexmit_hi = una + max(n, 0)
        self.rexmit_mark = self.snd_max

    def _emit(self, seq: int, flags: int, payload: bytes | bytearray) -> None:
        window = self._window_field()
        options = self._sack_option() if self.ooo and self.sack_ok else b""
        self.host.out.append(
            self.writer.segment(seq & MASK, self.rcv_nxt & MASK, flags, window, payload, options)
        )
        self.ack_pending = 0
        self.ack_now = False

    def _answer(self, now: float) -> None:
        """ACK a segment we will not take (unacceptable, a challenge): at most one per interval, as
        RFC 5961 section 7 advises, so that two confused ends cannot keep answering each other."""
        if now - self.answered_at >= self.config.answer_interval:
            self.answered_at = now
            self._emit_ack()

    def _emit_ack(self) -> None:
        # SND.MAX, not SND.NXT: after a go-back-N rewind an ACK from SND.NXT would carry a sequence
        # number the peer has already passed, and it would drop the ACK as unacceptable.
        self._emit(self.snd_max, F_ACK, b"")

    def _emit_bare(self, seq_raw: int, ack_raw: int, flags: int) -> None:
        """A segment that is not part of our stream (RST answers); window 0."""
        self.host.out.append(self.writer.segment(seq_raw, ack_raw, flags, 0))

    def _payload_room(self) -> int:
        """Payload bytes per segment now: the MSS less the SACK option our segments carry, if any."""
        if self.ooo and self.sack_ok:
            return self.snd_mss - 4 - 8 * min(len(self.ooo), MAX_SACK_BLOCKS)
        return self.snd_mss

    def _sack_option(self) -> bytes:
        """SACK blocks for what the assembler holds, the one with the latest arrival first (RFC 2018)."""
        ranges = self.ooo.ranges()
        latest = next((r for r in ranges if r[0] <= self.ooo_latest < r[1]), None)
        blocks = [latest] if latest is not None else []
        blocks += [r for r in reversed(ranges) if r is not latest][: MAX_SACK_BLOCKS - len(blocks)]
        return (
            b"\x01\x01\x05"
            + bytes((2 + 8 * len(blocks),))
            + b"".join(_SACK_BLOCK.pack(left & MASK, right & MASK) for left, right in blocks)
        )

    def _window_field(self) -> int:
        """The window to advertise now, raw; moves the advertised right edge only by useful amounts."""
        shift = self.rcv_shift
        free = self.rcv_cap - len(self.rcv_buf)
        edge = self.rcv_nxt + min((free >> shift) << shift, 0xFFFF << shift)
        if edge - self.rcv_adv >= min(self.rcv_cap // 2, self.config.mss):
            self.rcv_adv = edge
        wnd = self.rcv_adv - self.rcv_nxt
        return wnd >> shift if wnd > 0 else 0

    def _reset_unsynchronized(self) -> None:
        """RST|ACK for a SYN we will not take: <SEQ=0><ACK=SEG.SEQ+1> (RFC 9293 3.10.7.1)."""
        self._emit_bare(0, self.rcv_nxt & MASK, F_RST | F_ACK)

    # ------------------------------------------------------------------------------------------
    # timers

    def next_deadline(self) -> float | None:
        rto, deadline = self.rto_at, self.deadline
        if rto is None:
            return deadline
        if deadline is None:
            return rto
        return min(rto, deadline)

    def _arm_loss_timer(self, now: float) -> None:
        """Arm the tail loss probe if it applies (RFC 8985 7.2), the retransmission timeout otherwise."""
        rto = self.rtt.rto
        srtt = self.rtt.srtt
        if (
            self.config.tail_loss_probe
            and srtt is not None
            and not self.tlp_done
            and not self.in_recovery
            and self.retries == 0
            and self.snd_max - self.snd_una > self.snd_mss  # one segment may wait for a delayed ACK
        ):
            pto = max(2 * srtt, TLP_MIN)
            if pto < rto:
                self.tlp_armed = True
                self._arm_rto(now + pto)
                return
        self.tlp_armed = False
        self._arm_rto(now + rto)

    def _arm_rto(self, when: float) -> None:
        self.rto_at = when
        self.host.schedule(self, when)

    def _set_deadline(self, when: float) -> None:
        self.deadline = when
        self.host.schedule(self, when)

    def on_timer(self, now: float) -> None:
        if self.deadline is not None and now >= self.deadline:
            self.deadline = None
            self._deadline_expired()
        if self.state is State.CLOSED:
            return
        if self.rto_at is not None and now >= self.rto_at:
            self.rto_at = None
            if self.persist:
                self._probe(now)
            elif self.tlp_armed:
                self._tail_loss_probe(now)
            else:
                self._retransmit_timeout(now)

    def _deadline_expired(self) -> None:
        state = self.state
        if state is State.SYN_HELD:
            self._reset_unsynchronized()
            self._terminate(CloseReason.ACCEPT_TIMEOUT)
        elif state is State.TIME_WAIT:
            self.state = State.CLOSED
            self.host.retire(self)
        elif state is not State.CLOSED:
            self._terminate(CloseReason.TIMEOUT)  # an orphan whose peer never finished

    def _retransmit_timeout(self, now: float) -> None:
        state = self.state
        if state is State.SYN_SENT or state is State.SYN_RECEIVED:
            limit = self.config.synack_retries if self.passive else self.config.syn_retries
            if self.retries >= limit:
                self._terminate(CloseReason.TIMEOUT)
                return
            self.retries += 1
            self.rtt.back_off()
            self._emit_syn(now, retransmit=True)
            return
        if self.snd_nxt <= self.snd_una or state not in SENDING:
            return  # nothing in flight: a stale expiry
        if self.retries >= self.config.max_retransmits:
            self.abort(CloseReason.TIMEOUT)
            return
        self.retries += 1
        self.rtt.back_off()
        mss = self.snd_mss
        self.ssthresh = max((self.snd_max - self.snd_una) // 2, 2 * mss)
        self.cwnd = mss
        self.in_recovery = False
        self.dupacks = 0
        self.recover = self.snd_max
        self.tlp_armed = False
        self.sacked.clear()  # RFC 2018: the receiver may have dropped what it SACKed
        self.sacked_bytes = 0
        self.rtt_seq = None  # Karn
        self.snd_nxt = self.snd_una  # go back N: everything after SND.UNA may be lost
        self._send_data(now)

    def _tail_loss_probe(self, now: float) -> None:
        """Resend the last segment sent, so that its ACK (with SACK) tells what is missing below it."""
        self.tlp_armed = False
        if self.snd_nxt <= self.snd_una or self.state not in SENDING:
            return
        self.tlp_done = True
        data_end = self.snd_base + len(self.snd_buf)
        fin = self.fin_queued and self.snd_max > data_end
        end = min(self.snd_max, data_end)
        n = min(self._payload_room(), end - self.snd_una)
        start = end - n
        off = start - self.snd_base
        self._emit(start, F_ACK | F_FIN if fin else F_ACK, self.snd_buf[off : off + n])
        self.retransmits += 1
        self.rtt_seq = None  # Karn
        self._arm_rto(now + self.rtt.rto)

    def _probe(self, now: float) -> None:
        self.persist = False
        data_end = self.snd_base + len(self.snd_buf)
        if self.snd_nxt >= data_end or self.snd_nxt > self.snd_una or self.state not in SENDING:
            return
        usable = self.snd_una + min(self.snd_wnd, self.cwnd) - self.snd_nxt
        if usable > 0:
            # A window too small for the silly-window rule: send what fits rather than wait forever.
            n = min(usable, self._payload_room(), data_end - self.snd_nxt)
            off = self.snd_nxt - self.snd_base
            self._emit(self.snd_nxt, F_ACK | F_PSH, self.snd_buf[off : off + n])
            self.snd_nxt += n
            self.snd_max = max(self.snd_max, self.snd_nxt)
            self._arm_rto(now + self.rtt.rto)
            return
        self._emit(self.snd_una - 1, F_ACK, b"")
        self.persist_backoff = min(self.persist_backoff + 1, 16)
        self.persist = True
        self._arm_rto(now + min(self.rtt.rto * (1 << self.persist_backoff), self.config.max_rto))

    # ------------------------------------------------------------------------------------------
    # ending

    def _enter_time_wait(self, now: float) -> None:
        self.state = State.TIME_WAIT
        self._release_buffers()
        self.rto_at = None
        self.persist = False
        self.finished = True
        self._set_deadline(now + self.config.time_wait)
        self.host.time_wait(self)
        self._deliver()

    def _finish(self) -> None:
        self.state = State.CLOSED
        self._release_buffers()
        self.rto_at = self.deadline = None
        self.finished = True
        self.host.retire(self)
        self._deliver()

    def _terminate(self, reason: CloseReason) -> None:
        """Close without the orderly exchange; the owner hears at once, buffered data is dropped."""
        self.state = State.CLOSED
        self._release_buffers()
        self.rcv_buf = bytearray()
        self.rto_at = self.deadline = None
        self.host.retire(self)
        if not self.closed_reported:
            self.closed_reported = True
            self.host.event(ConnectionClosed(self.handle, reason))

    def _release_buffers(self) -> None:
        self.snd_base += len(self.snd_buf)
        self.snd_buf = bytearray()
        self.ooo.clear()

    # ------------------------------------------------------------------------------------------

    @property
    def src(self) -> Endpoint:
        """Who sent the opening SYN."""
        return self.remote if self.passive else self.local

    @property
    def dst(self) -> Endpoint:
        return self.local if self.passive else self.remote
