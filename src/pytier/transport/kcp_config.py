"""Tunables of the KCP proxy transport: ikcp parameters, pacing and the session timers."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KcpConfig:
    # ikcp parameters. EasyTier's "turbo" preset is nodelay 1, interval 10 ms, fast resend 2, no
    # congestion window, windows 1024/1024, mtu 1200, stream mode. None of these is visible on the
    # wire except through the segments' behaviour, so pytier tunes them (measured in the link model,
    # tests/unit/test_kcp_link_model.py):
    # * windows 16384: a lost segment holds back ikcp's window for about two round trips while it is
    #   repaired (three when the resend is lost too), so the window must hold several
    #   bandwidth-delay products: 1024 segments stalled a 20 ms path at 10% loss, 4096 a 200 ms one
    #   at 5% (it stayed window-limited in start-up, ~45 instead of ~85 Mbit/s in the link model).
    #   Pacing and the in-flight cap (kcp_pacer), not the window, keep the bottleneck queue short,
    #   and ikcp allocates segments only as they are used. A peer that advertises less (EasyTier:
    #   1024) still limits what we send.
    # * nodelay 2: the same 30 ms RTO floor as 1, but each timeout adds half the current RTO instead
    #   of half the segment's own, so a segment lost several times backs off linearly.
    # * fast_limit 5 (ikcp's default): the up to four extra fast retransmissions per loss cost
    #   bandwidth but fill holes before the window stalls; 1 to 3 measured lower at 10-20% loss.
    mtu: int = 1200
    snd_wnd: int = 16384  # segments
    rcv_wnd: int = 16384  # segments
    interval_ms: int = 10  # 5 measured the same in the model; flushes follow ACKs anyway
    nodelay: int = 2
    fast_resend: int = 2
    fast_limit: int = 5
    # A segment sent this many times without an acknowledgement ends the conversation (ikcp's
    # dead_link; its default of 20 is reached at heavy loss). It catches a peer that answers pings
    # but does not process data, which the idle timeout cannot.
    dead_link: int = 40
    # ... once the peer, heard from again since, has acknowledged nothing more for this long.
    dead_link_grace_s: float = 15.0
    # Pace new segments at an estimate of the delivery rate (see kcp_pacer) instead of bursting a whole
    # window; False behaves like EasyTier (no congestion window at all).
    pacing: bool = True
    # What `writable()` lets wait in KCP's send queue (not yet in flight), in segments.
    send_buffer_segments: int = 256
    # Largest chunk handed to one ikcp_send: ikcp refuses 128 fragments or more.
    max_send_chunk_segments: int = 64

    # Session layer (seconds).
    keepalive_s: float = 10.0
    idle_timeout_s: float = 60.0
    connect_timeout_s: float = 10.0
    hedge_interval_s: float = 0.2
    hedge_attempts: int = 5
    syn_retransmit_s: float = 1.0  # first SYN retransmission of one attempt; doubles after
    synack_retransmit_s: float = 0.25  # first SYN|ACK retransmission while waiting; doubles after
    handshake_timeout_s: float = 10.0  # accepted, but no ACK|DATA for this long
    accept_timeout_s: float = 30.0  # IncomingConnection neither accepted nor refused
    fin_retransmit_s: float = 0.5  # first FIN retransmission while the peer's FIN is missing
    time_wait_s: float = 10.0  # how long a finished conversation still answers a late FIN
    # Conversations at once (each bounded by the windows above); as many as the kernel-mode hairpin
    # holds (nat_hairpin.DEFAULT_MAX_ENTRIES), so KCP is not what refuses the 5,000th connection.
    max_conversations: int = 8192

    @property
    def mss(self) -> int:
        return self.mtu - 24  # ikcp's segment header
