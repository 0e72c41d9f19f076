"""Tunables of the KCP proxy transport: ikcp parameters, pacing and the session timers."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KcpConfig:
    # ikcp parameters. EasyTier's "turbo" preset is nodelay 1, interval 10 ms, fast resend 2, no
    # congestion window, windows 1024/1024, mtu 1200, stream mode; everything here stays within the
    # standard segment format, so any of these values interoperates with it.
    mtu: int = 1200
    snd_wnd: int = 4096  # segments
    rcv_wnd: int = 4096  # segments
    interval_ms: int = 10
    nodelay: int = 2
    fast_resend: int = 2
    fast_limit: int = 5
    # A segment sent this many times without an acknowledgement ends the conversation (ikcp's
    # dead_link; its default of 20 is reached at heavy loss). It catches a peer that answers pings
    # but does not process data, which the idle timeout cannot.
    dead_link: int = 40
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
    max_conversations: int = 4096

    @property
    def mss(self) -> int:
        return self.mtu - 24
