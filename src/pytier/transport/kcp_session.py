"""One KCP conversation: siokcp's ikcp plus pacing, bounded sends and window-update repair.

Sans-IO: bodies in (`input`), bodies out (`flush`), a millisecond clock passed by the caller. The
session knows nothing about the 14-byte proxy header or the SYN/FIN state machine (kcp_endpoint).

Pitfalls of ikcp/siokcp handled here:
* siokcp's KCPConnection is not tracked by the garbage collector, so a cycle through its output
  callback would never be freed. The callback closes over a plain list only, and `close()` clears
  it anyway.
* ikcp refuses one `send` of 128 fragments or more: writes go in chunks.
* ikcp takes RTT samples against `current`, which only `ikcp_update` sets; input sets it first.
* ikcp counts an ACK towards fast-resending an older segment only if the acknowledged segment was
  sent no earlier (by its timestamp) than that segment's last transmission. With millisecond
  timestamps, segments sent by earlier flushes of the same millisecond pass that test, so their ACKs
  fast-resend a retransmission still on its way (at 20% loss and a flush per arriving ACK, 0.15
  duplicates per new segment). ikcp's clock here runs in sixteenths of a millisecond, each flush in
  a millisecond one tick later than the one before; its interval and RTOs are scaled to match, its
  fixed limits become 16 times shorter (RTO at most 3.75 s, first window probe after 0.44 s). The
  timestamp means nothing to the receiver, which only echoes it.
* A window update (WINS) that gets lost after the receive queue was full stalls the sender until
  ikcp's first window probe (7 s on ikcp's usual millisecond clock). Received data is read before
  ACKs are flushed (so a reader that keeps up never advertises a closed window), a receiver whose
  advertised window was low keeps telling its window once per round trip after it reopens until
  new data arrives, and a sender facing a zero window probes after a few round trips.
* ikcp acknowledges each segment exactly once, and a sender fast-resends a segment whose ACK was
  lost as soon as two later ACKs arrive, though it arrived: under random loss most segments arrive
  above a hole, where una does not cover them. The ACKs of those ride again on our next packets
  (standard ACK segments, so any KCP peer takes them).
* ikcp fast-resends a segment once `fastresend` (2) later segments were acknowledged: on a path that
  reorders, every segment overtaken by more than two others is sent twice (or more: ikcp resends
  again after every two further ACKs). The session remembers the timestamp of each segment's first
  resend; an ACK that echoes an older one shows that the original arrived and the resends were
  spurious (the Eifel test), and the threshold rises above the number of later segments
  acknowledged by then. It never comes down: a path that reorders keeps doing so,
  and a real loss still ends in a timeout resend.
* ikcp resends whatever its timers or fast-resend rule pick at every flush, outside any window:
  over a policer or an outage that is a flood (in the link model, a 10 s blackout cost 148 MB
  with 0.5 MB in flight when it began). Each flush therefore runs ikcp twice, first with no
  window for new data (ACKs, probes and resends), then for new data; the resends are taken out of
  ikcp's output and sent within the pacer's budget (kcp_pacer), oldest first, the rest held for
  later flushes. ikcp counts a held copy as sent when it made it: the copy is restamped when it
  leaves (or its RTT sample would include the wait), and ikcp's next resend of it is dropped if it
  comes sooner after the copy left than the copy had waited.
* ikcp is driven by `flush` only (after input, after writes, and at `next_timer_ms`), never by
  `ikcp_update`'s own 10 ms grid, so ACKs leave as soon as the owner sends its datagrams.
"""

from __future__ import annotations

import weakref

from siokcp import KCPConnection

from pytier.transport.kcp_config import KcpConfig
from pytier.transport.kcp_pacer import FlowPacer, PathRate
from pytier.transport.kcp_segments import (
    HEADER_LEN,
    SEGMENT,
    ack_segment,
    acks,
    count_pushes,
    pushes,
    restamp,
    split_resends,
)

IKCP_ASK_SEND = 1  # probe flag: send a window probe (WASK)
IKCP_ASK_TELL = 2  # probe flag: tell the remote our window (WINS)
MASK32 = 0xFFFFFFFF
TICKS_PER_MS = 16  # ikcp's clock
WINDOW_TELL_LIMIT_MS = 3000  # keep re-telling a reopened window at most this long
# ikcp's RTO is srtt + max(interval, 4 x rttvar): barely above the RTT on a steady path, so a queue
# of a few ms (the pacer's probing makes one on purpose) fires spurious timeouts for a whole window.
# The floor keeps it at 1.5 x srtt + interval.
RTO_FLOOR_FACTOR = 1.5
PACING_BURST_MS = 2.0
# When data stops arriving, tell the window (and with it una) again this many times, the first
# ECHO_DELAY_INTERVALS intervals after the last arrival: a sender whose window is stuck on one
# segment learns from it that the segment arrived even if that one ACK was lost.
ECHO_DELAY_INTERVALS = 2
ECHOES = 2
ZERO_WINDOW_PROBE_MIN_MS = 50
ZERO_WINDOW_PROBE_MAX_MS = 2000
# ikcp acknowledges each segment once. A lost ACK of a segment that arrived out of order (una does
# not cover it) makes the sender fast-resend it as soon as two later ACKs arrive: at 20% loss each
# way, 0.3 needless resends per new segment on top of the 0.25 the loss needs. So the ACKs of
# segments above rcv_nxt ride again on the next packets we send anyway (those carry the later ACKs
# that would trigger the resend), until una covers them. Each repeat costs 24 bytes on the
# reverse path; two leave 0.8% of the ACKs lost at 20% loss.
ACK_REPEATS = 2
MAX_ACK_REPEATS_PER_FLUSH = 256  # segments, 6 KB
REORDER_EVIDENCE = 4  # a spurious resend raises the threshold if this many times as many later ACKs came
MAX_FAST_RESEND = 512  # later ACKs before a fast resend, at most (see the Eifel test above)
RESENDS_REMEMBERED = 4096  # segments whose first resend's timestamp is kept for the Eifel test


class _LogSink:
    """siokcp's log callback, which cannot be cleared later: it must not reference the session.

    One per KCPConnection, referenced by nothing else, so a weak reference to it tells whether the
    KCPConnection (which siokcp does not let us reference weakly) has been freed.
    """

    __slots__ = ("__weakref__",)

    def __call__(self, _message: str) -> None:
        return None


class KcpSession:
    __slots__ = (
        "_ack_fresh",
        "_ack_repeats",
        "_base_minrto",
        "_chunk",
        "_clock_ms",
        "_clock_seq",
        "_config",
        "_echo_at_ms",
        "_echoes_left",
        "_held",
        "_interval_ms",
        "_kcp",
        "_last_flush_ms",
        "_late",
        "_mss",
        "_out",
        "_pacer",
        "_probe_at_ms",
        "_probe_backoff_ms",
        "_resent",
        "_tell_deadline_ms",
        "_tell_next_ms",
        "_tell_rcv_nxt",
        "_window_was_low",
        "bytes_in",
        "bytes_out",
        "bytes_received",
        "bytes_sent",
        "conv",
        "duplicates_in",
        "kcp_alive",
        "packets_in",
        "packets_out",
        "resends_unsent",
        "retransmits",
        "segments_in",
        "segments_sent",
        "spurious_resends",
    )

    def __init__(
        self, conv: int, config: KcpConfig, now_ms: int, *, path: PathRate | None = None, flow_id: int = 0
    ) -> None:
        """`path` is the pacing state shared with the other conversations to the same peer (a
        private one when None); `flow_id` names this conversation in it."""
        self.conv = conv
        self._config = config
        out: list[bytes] = []
        self._out = out

        def emit(body: bytes) -> int:
            out.append(body)
            return 0

        sink = _LogSink()
        self.kcp_alive = weakref.ref(sink)
        kcp = KCPConnection(conv, emit, sink)
        kcp.nodelay(config.nodelay, config.interval_ms, config.fast_resend, 0 if config.pacing else 1)
        # ikcp_nodelay floors the interval at 10 ms; the field itself takes any value.
        kcp.interval = config.interval_ms * TICKS_PER_MS
        kcp.rx_minrto *= TICKS_PER_MS
        kcp.rx_rto *= TICKS_PER_MS
        kcp.wndsize(config.snd_wnd, config.rcv_wnd)
        kcp.setmtu(config.mtu)
        kcp.stream = 1
        kcp.fastlimit = config.fast_limit
        kcp.dead_link = config.dead_link
        self._clock_ms = now_ms
        self._clock_seq = 0
        kcp.update((now_ms * TICKS_PER_MS) & MASK32)  # ikcp flushes nothing before its first update
        self._kcp: KCPConnection | None = kcp
        self._interval_ms = config.interval_ms
        self._base_minrto = int(kcp.rx_minrto)
        self._mss = kcp.mss
        self._chunk = config.max_send_chunk_segments * self._mss
        self._pacer: FlowPacer | None = None
        if config.pacing:
            self._pacer = FlowPacer(
                path or PathRate(now_ms),
                flow_id,
                now_ms,
                burst_ms=PACING_BURST_MS,
                max_gap_ms=config.interval_ms,
            )
        self._last_flush_ms = now_ms
        self._window_was_low = False
        self._echo_at_ms = -1
        self._echoes_left = 0
        self._tell_rcv_nxt = 0
        self._tell_next_ms = -1
        self._tell_deadline_ms = -1
        self._probe_at_ms = -1
        self._probe_backoff_ms = ZERO_WINDOW_PROBE_MIN_MS
        self.bytes_sent = 0  # accepted from the application
        self.bytes_received = 0  # handed to the application
        self.bytes_out = 0  # KCP bytes emitted, headers and retransmissions included
        self.bytes_in = 0
        self.packets_out = 0
        self.packets_in = 0
        self.retransmits = 0  # data segments sent again, fast and timeout resends alike
        self.segments_sent = 0  # new data segments sent
        self.segments_in = 0  # data segments received, duplicates included
        self.duplicates_in = 0  # of which ikcp already had (or could not take)
        self._ack_fresh: list[tuple[int, int]] = []  # (sn, ts) acknowledged by the next flush
        self._ack_repeats: list[tuple[int, int, int]] = []  # (sn, ts, repeats left)
        self._resent: dict[int, int] = {}  # sn -> ikcp timestamp of its first resend
        self.spurious_resends = 0  # resends of segments an earlier copy of which arrived
        # Resends ikcp made beyond the pacer's budget, sent at later flushes: sn -> (segment, when
        # ikcp made it). ikcp counts them as sent already, and a later resend of the same segment
        # replaces the copy.
        self._held: dict[int, tuple[bytes, int]] = {}
        # sn -> (when its last copy left, how long it had waited). ikcp started its timers, and
        # dates the segment for its fast-resend test, when it made the copy: a resend of it that
        # comes within that wait (and an RTO) of the copy leaving is early, and is dropped (at
        # 200 ms RTT after start-up's overshoot, 1,000 duplicates otherwise).
        self._late: dict[int, tuple[int, int]] = {}
        self.resends_unsent = 0  # resends ikcp made that never left: acknowledged, replaced or early

    # --- data in ------------------------------------------------------------------------------

    def input(self, body: bytes | memoryview, now_ms: int) -> bool:
        """Feed the segments of one packet body; False when ikcp rejected them."""
        kcp = self._kcp
        if kcp is None:
            return False
        kcp.current = self._clock(now_ms, False)
        srtt = kcp.rx_srtt
        if srtt > 0:
            kcp.rx_minrto = max(
                self._base_minrto, int(srtt * RTO_FLOOR_FACTOR) + self._interval_ms * TICKS_PER_MS
            )
        self.packets_in += 1
        self.bytes_in += len(body)
        rcv_nxt, nrcv_buf = kcp.rcv_nxt, kcp.nrcv_buf
        resent, held = self._resent, self._held
        found = acks(body, self.conv) if resent or held else []
        if resent and found:
            self._eifel(kcp, found)
        for sn, _ in found if held or self._late else ():
            if held.pop(sn, None) is not None:
                self.resends_unsent += 1
            self._late.pop(sn, None)
        data = pushes(body, self.conv)
        ok = kcp.receive_data(body) >= 0
        # Resends whose own ACK was lost but that una now covers: nothing more can show them spurious,
        # and while any is remembered every ACK packet is read for the Eifel test.
        una = kcp.snd_una
        if resent:
            while resent and (next(iter(resent)) - una) & MASK32 >= 0x80000000:
                del resent[next(iter(resent))]
            if not resent:
                self._resent = {}  # a dict keeps its table when emptied; an idle connection need not
        if held or self._late:
            self._drop_held_below(una)
        if kcp.rcv_nxt != rcv_nxt or kcp.nrcv_buf != nrcv_buf:
            self._echo_at_ms = now_ms + ECHO_DELAY_INTERVALS * self._interval_ms
            self._echoes_left = ECHOES
        if data:
            accepted = (kcp.rcv_nxt + kcp.nrcv_buf - rcv_nxt - nrcv_buf) & MASK32
            self.segments_in += len(data)
            self.duplicates_in += len(data) - accepted
            if kcp.nrcv_buf:
                # What ikcp acknowledged and holds beyond rcv_nxt: at least rcv_nxt (now) and below
                # the window's end before this input.
                low = kcp.rcv_nxt
                span = (rcv_nxt + kcp.rcv_wnd - low) & MASK32
                self._ack_fresh.extend((sn, ts) for sn, ts in data if (sn - low) & MASK32 < span)
        return bool(ok)

    def _drop_held_below(self, una: int) -> None:
        held = self._held
        for sn in [sn for sn in held if (sn - una) & MASK32 >= 0x80000000]:
            del held[sn]
            self.resends_unsent += 1
        if not held:
            self._held = {}
        late = self._late
        for sn in [sn for sn in late if (sn - una) & MASK32 >= 0x80000000]:
            del late[sn]
        if not late:
            self._late = {}

    def _eifel(self, kcp: KCPConnection, found: list[tuple[int, int]]) -> None:
        resent = self._resent
        highest = kcp.snd_una
        for sn, _ in found:
            if (sn - highest) & MASK32 < 0x80000000:
                highest = sn
        for sn, ts in found:
            resent_ts = resent.pop(sn, None)
            if resent_ts is None or (ts - resent_ts) & MASK32 < 0x80000000:
                continue
            self.spurious_resends += 1
            # A lost ACK whose repeat came late looks the same, but only a few later segments were
            # acknowledged by then; only reordering far beyond the threshold moves it.
            later = (highest - sn) & MASK32
            if later > REORDER_EVIDENCE * kcp.fastresend:
                kcp.fastresend = min(later + later // 4 + 1, MAX_FAST_RESEND)

    def read(self) -> bytes:
        """Everything ikcp has in order, b'' when nothing."""
        kcp = self._kcp
        if kcp is None:
            return b""
        parts: list[bytes] = []
        while True:
            data = kcp.next_event()
            if data is None:
                break
            parts.append(data)
        if not parts:
            return b""
        if self._window_was_low and kcp.rcv_wnd - kcp.nrcv_que >= kcp.rcv_wnd // 2:
            self._window_was_low = False
            self._tell_rcv_nxt = kcp.rcv_nxt
            self._tell_next_ms = self._last_flush_ms
            self._tell_deadline_ms = self._last_flush_ms + WINDOW_TELL_LIMIT_MS
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        self.bytes_received += len(data)
        return data

    @property
    def has_unread(self) -> bool:
        kcp = self._kcp
        return kcp is not None and (kcp.nrcv_que > 0)

    # --- data out -----------------------------------------------------------------------------

    def writable(self) -> int:
        kcp = self._kcp
        if kcp is None:
            return 0
        room = self._config.send_buffer_segments - kcp.nsnd_que
        return max(0, room) * self._mss

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Queue as much of `data` as `writable()` allows; returns the number of bytes taken."""
        kcp = self._kcp
        if kcp is None:
            return 0
        n = min(len(data), self.writable())
        if n <= 0:
            return 0
        view = memoryview(data)[:n]
        chunk = self._chunk
        for start in range(0, n, chunk):
            kcp.send(view[start : start + chunk])
        self.bytes_sent += n
        return n

    @property
    def dead(self) -> bool:
        """ikcp gave up: a segment reached `dead_link` transmissions (since the last `clear_dead`)."""
        kcp = self._kcp
        return kcp is not None and kcp.state != 0

    def clear_dead(self) -> None:
        """ikcp's flag is sticky but changes nothing in ikcp; cleared, it is raised again by the next
        transmission of a segment at or above `dead_link`."""
        kcp = self._kcp
        if kcp is not None:
            kcp.state = 0

    @property
    def snd_una(self) -> int:
        """The oldest sequence number not yet acknowledged."""
        kcp = self._kcp
        return 0 if kcp is None else int(kcp.snd_una)

    @property
    def unacked(self) -> int:
        """Segments queued or in flight; 0 once the peer acknowledged everything."""
        kcp = self._kcp
        return 0 if kcp is None else int(kcp.waitsnd())

    # --- timing -------------------------------------------------------------------------------

    def next_timer_ms(self) -> int | None:
        """When `flush` must run next without new input or writes; None when nothing is pending."""
        kcp = self._kcp
        if kcp is None:
            return None
        due: int | None = None
        if kcp.nsnd_buf > 0 or (kcp.nsnd_que > 0 and kcp.rmt_wnd > 0):
            due = self._last_flush_ms + self._interval_ms
        if self._probe_at_ms >= 0 and (due is None or self._probe_at_ms < due):
            due = self._probe_at_ms
        if self._tell_next_ms >= 0 and (due is None or self._tell_next_ms < due):
            due = self._tell_next_ms
        if self._echo_at_ms >= 0 and (due is None or self._echo_at_ms < due):
            due = self._echo_at_ms
        return due

    def flush(self, now_ms: int) -> list[bytes]:
        """Run ikcp's flush (ACKs, window probes, new data and retransmissions within pacing)."""
        kcp = self._kcp
        if kcp is None:
            return []
        self._last_flush_ms = now_ms
        kcp.current = self._clock(now_ms, True)
        self._repair_windows(kcp, now_ms)
        pacer = self._pacer
        snd_nxt = kcp.snd_nxt
        out = self._out
        conv = self.conv
        if pacer is None:
            kcp.flush()
            if out and sum(count_pushes(body, conv) for body in out) > (kcp.snd_nxt - snd_nxt) & MASK32:
                self._hold_resends(out, snd_nxt, now_ms)
            self._send_held(out, None, now_ms)
        else:
            nsnd_buf = kcp.nsnd_buf
            span = (snd_nxt - kcp.snd_una) & MASK32
            eligible = kcp.nsnd_que > 0 and span < min(kcp.snd_wnd, kcp.rmt_wnd)
            budget = pacer.allowance(
                now_ms, (snd_nxt - nsnd_buf) & MASK32, nsnd_buf, self._srtt_ms(kcp), eligible
            )
            # Two flushes: the first one ACKs, probes and resends (no window for new data), the
            # second one new data with what the resends left of the budget. Resends go first:
            # they hold back una, and with it the window; and ikcp dates a resend from the flush
            # that made it, so new data sent before it would have its ACKs fast-resend it again.
            kcp.cwnd = span
            kcp.flush()
            if out:
                self._hold_resends(out, snd_nxt, now_ms)
            resent = len(self._send_held(out, budget + pacer.overdraft(now_ms), now_ms))
            allowed = budget - resent
            room = pacer.room(now_ms)
            if room is not None:
                allowed = min(allowed, room)
            if allowed > 0 and not self._held and kcp.nsnd_que > 0:
                kcp.cwnd = span + allowed
                kcp.flush()
            pacer.on_flushed(resent + ((kcp.snd_nxt - snd_nxt) & MASK32), resent)
        self.segments_sent += (kcp.snd_nxt - snd_nxt) & MASK32
        if kcp.rcv_wnd - kcp.nrcv_que < kcp.rcv_wnd // 4:
            self._window_was_low = True
        if not out:
            return []
        self._repeat_acks(kcp, out)
        bodies = out[:]
        out.clear()
        self.packets_out += len(bodies)
        self.bytes_out += sum(map(len, bodies))
        return bodies

    def _hold_resends(self, out: list[bytes], snd_nxt: int, now_ms: int) -> None:
        """Take the resends out of ikcp's output into `_held`."""
        held, late = self._held, self._late
        conv = self.conv
        kept: list[bytes] = []
        rto_ms = self._rto_ms()
        for body in out:
            rest, resends = split_resends(body, conv, snd_nxt)
            for sn, segment in resends:
                waiting = held.get(sn)
                if waiting is not None:
                    self.resends_unsent += 1
                    held[sn] = (segment, waiting[1])
                    continue
                previous = late.pop(sn, None)
                if previous is not None and now_ms - previous[0] < min(previous[1], rto_ms):
                    self.resends_unsent += 1
                    late[sn] = previous
                    continue
                held[sn] = (segment, now_ms)
            if rest:
                kept.append(rest)
        out[:] = kept

    def _send_held(self, out: list[bytes], budget: int | None, now_ms: int) -> list[tuple[int, bytes]]:
        """Add up to `budget` (all when None) of the held resends, oldest first, to the output."""
        held = self._held
        if not held or (budget is not None and budget <= 0):
            return []
        due = list(held) if budget is None or budget >= len(held) else list(held)[:budget]
        late = self._late
        sent: list[tuple[int, bytes]] = []
        mtu = self._config.mtu
        kcp = self._kcp
        assert kcp is not None
        # A copy that waited says when it really left, or its ACK would give an RTT sample that
        # includes the wait (seconds after an outage).
        ts = kcp.current
        una = kcp.rcv_nxt
        wnd = kcp.rcv_wnd - kcp.nrcv_que if kcp.nrcv_que < kcp.rcv_wnd else 0
        for sn in due:
            segment, made_ms = held.pop(sn)
            if made_ms < now_ms:
                late[sn] = (now_ms, now_ms - made_ms)
                segment = restamp(segment, wnd, ts, una)
            else:
                late.pop(sn, None)
            sent.append((sn, segment))
            if out and len(out[-1]) + len(segment) <= mtu:
                out[-1] += segment
            else:
                out.append(segment)
        if not held:
            self._held = {}
        while len(late) > RESENDS_REMEMBERED:
            del late[next(iter(late))]
        self.retransmits += len(sent)
        self._note_resends(sent)
        return sent

    def _note_resends(self, sent: list[tuple[int, bytes]]) -> None:
        resent = self._resent
        for sn, segment in sent:
            if sn not in resent:
                resent[sn] = SEGMENT.unpack_from(segment)[4]
        while len(resent) > RESENDS_REMEMBERED:
            del resent[next(iter(resent))]

    def _clock(self, now_ms: int, next_flush: bool) -> int:
        """ikcp's time for `now_ms`: a flush gets a later tick than the flushes before it in the
        same millisecond (until the millisecond's ticks run out)."""
        if now_ms != self._clock_ms:
            self._clock_ms = now_ms
            self._clock_seq = 0
        elif next_flush and self._clock_seq < TICKS_PER_MS - 1:
            self._clock_seq += 1
        return (now_ms * TICKS_PER_MS + self._clock_seq) & MASK32

    def _rto_ms(self) -> int:
        kcp = self._kcp
        return 0 if kcp is None else int(kcp.rx_rto) // TICKS_PER_MS

    @staticmethod
    def _srtt_ms(kcp: KCPConnection) -> int:
        """ikcp's smoothed RTT in whole milliseconds, 0 before the first sample (and at least 1 after)."""
        srtt = int(kcp.rx_srtt)
        return 0 if srtt <= 0 else max(1, srtt // TICKS_PER_MS)

    def _repeat_acks(self, kcp: KCPConnection, out: list[bytes]) -> None:
        """Append the ACKs still owed a repeat to this flush's packets; the ACKs ikcp just sent
        become owed."""
        pending = self._ack_repeats
        if pending:
            una = kcp.rcv_nxt
            wnd = kcp.rcv_wnd - kcp.nrcv_que if kcp.nrcv_que < kcp.rcv_wnd else 0
            conv = self.conv
            if len(pending) > MAX_ACK_REPEATS_PER_FLUSH:
                del pending[: len(pending) - MAX_ACK_REPEATS_PER_FLUSH]
            acks: list[bytes] = []
            kept: list[tuple[int, int, int]] = []
            for sn, ts, left in pending:
                if (sn - una) & MASK32 >= 0x80000000:
                    continue  # una covers it now
                # The timestamp is echoed as it came: it is the sender's clock, in the sender's unit.
                acks.append(ack_segment(conv, wnd, ts, sn, una))
                if left > 1:
                    kept.append((sn, ts, left - 1))
            self._ack_repeats = kept
            if acks:
                self._pack(out, acks)
        fresh = self._ack_fresh
        if fresh:
            self._ack_repeats.extend((sn, ts, ACK_REPEATS) for sn, ts in fresh)
            self._ack_fresh = []

    def _pack(self, out: list[bytes], acks: list[bytes]) -> None:
        """Add whole ACK segments to the last packet while it stays within the MTU, then to new ones."""
        per_packet = self._config.mtu // HEADER_LEN
        room = (self._config.mtu - len(out[-1])) // HEADER_LEN
        if room > 0:
            out[-1] = out[-1] + b"".join(acks[:room])
            acks = acks[room:]
        for start in range(0, len(acks), per_packet):
            out.append(b"".join(acks[start : start + per_packet]))

    def _repair_windows(self, kcp: KCPConnection, now_ms: int) -> None:
        if 0 <= self._echo_at_ms <= now_ms:
            kcp.probe |= IKCP_ASK_TELL
            self._echoes_left -= 1
            if self._echoes_left > 0:
                self._echo_at_ms = now_ms + max(self._interval_ms, self._srtt_ms(kcp) // 2)
            else:
                self._echo_at_ms = -1
        if self._tell_next_ms >= 0:
            if kcp.rcv_nxt != self._tell_rcv_nxt or kcp.nrcv_buf > 0 or now_ms >= self._tell_deadline_ms:
                self._tell_next_ms = -1
            elif now_ms >= self._tell_next_ms:
                kcp.probe |= IKCP_ASK_TELL
                self._tell_next_ms = now_ms + max(self._interval_ms, self._srtt_ms(kcp) or 100)
        if kcp.rmt_wnd == 0 and kcp.nsnd_que > 0:
            if self._probe_at_ms < 0:
                self._probe_backoff_ms = max(ZERO_WINDOW_PROBE_MIN_MS, 2 * self._srtt_ms(kcp))
                self._probe_at_ms = now_ms + self._probe_backoff_ms
            elif now_ms >= self._probe_at_ms:
                kcp.probe |= IKCP_ASK_SEND
                self._probe_backoff_ms = min(2 * self._probe_backoff_ms, ZERO_WINDOW_PROBE_MAX_MS)
                self._probe_at_ms = now_ms + self._probe_backoff_ms
        else:
            self._probe_at_ms = -1

    # --- teardown and figures -----------------------------------------------------------------

    def close(self) -> None:
        """Release ikcp's buffers now and break the callback reference."""
        kcp = self._kcp
        if kcp is not None:
            kcp.send_cb = None
            self._kcp = None
            if self._pacer is not None:
                self._pacer.close()
        self._out.clear()

    def stats(self) -> dict[str, int | float | str]:
        kcp = self._kcp
        figures: dict[str, int | float | str] = {
            "conv": self.conv,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "bytes_out": self.bytes_out,
            "bytes_in": self.bytes_in,
            "packets_out": self.packets_out,
            "packets_in": self.packets_in,
            "retransmits": self.retransmits,
            "segments_sent": self.segments_sent,
            "segments_in": self.segments_in,
            "duplicates_in": self.duplicates_in,
            "spurious_resends": self.spurious_resends,
            "resends_unsent": self.resends_unsent,
            "resends_waiting": len(self._held),
        }
        if kcp is not None:
            figures.update(
                srtt_ms=round(kcp.rx_srtt / TICKS_PER_MS, 1),
                rttvar_ms=round(kcp.rx_rttval / TICKS_PER_MS, 1),
                rto_ms=round(kcp.rx_rto / TICKS_PER_MS, 1),
                timeout_retransmits=int(kcp.xmit),
                fast_resend_threshold=int(kcp.fastresend),
                in_flight=int(kcp.nsnd_buf),
                queued=int(kcp.nsnd_que),
                remote_window=int(kcp.rmt_wnd),
            )
        if self._pacer is not None:
            path = self._pacer.path
            figures.update(
                pacer_mode=path.mode.value,
                path_base_loss=round(path.base_loss, 4),
                path_delivery_rate_bps=round(path.btlbw * 1000 * self._mss * 8),
                min_rtt_ms=path.min_rtt_ms,
            )
        return figures
