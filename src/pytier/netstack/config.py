"""Tunables of the user-space TCP stack, with their units.

The defaults suit the hop it serves: a local TUN link with microsecond round trips and no loss of its
own, feeding a proxy transport that may be far slower. Timers follow RFC 6298 except the minimum RTO,
which is Linux's 200 ms rather than one second, as a one-second floor would stall a loss on a
microsecond link for ages.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["NetStackConfig"]

IPV4_TCP_HEADERS = 40  # bytes of IPv4 + TCP headers without options


@dataclass(frozen=True, slots=True)
class NetStackConfig:
    mtu: int = 1500  # bytes; our MSS option is mtu - 40
    recv_buffer: int = 256 * 1024  # bytes per connection; the most we advertise
    send_buffer: int = 256 * 1024  # bytes per connection that `send` accepts before pushing back
    initial_rto: float = 1.0  # seconds (RFC 6298 2.1)
    min_rto: float = 0.2  # seconds
    max_rto: float = 60.0  # seconds
    max_retransmits: int = 12  # consecutive RTO expiries on data or FIN before giving up
    syn_retries: int = 6  # SYN retransmissions of an active open
    synack_retries: int = 5  # SYN|ACK retransmissions of a passive open
    initial_cwnd_segments: int = 10  # RFC 6928
    time_wait: float = 2.0  # seconds; short, since the link it guards is local
    fin_wait2_timeout: float = 60.0  # seconds an orphan (closed by the owner) waits for the peer's FIN
    accept_timeout: float = 10.0  # seconds a held SYN waits for `accept`/`refuse` (EasyTier's 10 s)
    max_connections: int = 4096  # live connections (TIME_WAIT entries not counted)
    max_time_wait: int = 1024  # TIME_WAIT entries kept; the oldest is dropped beyond this
    max_ooo_ranges: int = 32  # disjoint out-of-order ranges kept per connection
    sack: bool = True  # offer and accept SACK (RFC 2018)
    tail_loss_probe: bool = True  # RFC 8985 TLP
    answer_interval: float = 0.05  # seconds between ACKs that answer unacceptable segments
    ack_every: int = 8  # in-order segments received before an ACK goes out without waiting for a flush
    ttl: int = 64
    verify_checksums: bool = True

    def __post_init__(self) -> None:
        if not 68 <= self.mtu <= 65535:
            raise ValueError(f"mtu {self.mtu} is outside 68..65535")
        if self.recv_buffer < self.mss or self.send_buffer < 1:
            raise ValueError(f"buffers ({self.recv_buffer}, {self.send_buffer}) must hold a segment")
        if self.recv_buffer > (0xFFFF << 14):
            raise ValueError(f"recv_buffer {self.recv_buffer} exceeds what window scaling can advertise")
        if not 0 < self.min_rto <= self.initial_rto <= self.max_rto:
            raise ValueError("need 0 < min_rto <= initial_rto <= max_rto")
        if self.ack_every < 1 or self.max_ooo_ranges < 1:
            raise ValueError("ack_every and max_ooo_ranges must be at least 1")

    @property
    def mss(self) -> int:
        """The MSS we announce: the largest payload our side of the link carries."""
        return self.mtu - IPV4_TCP_HEADERS

    @property
    def window_shift(self) -> int:
        """The window scale we offer: the smallest that lets `recv_buffer` be advertised whole."""
        shift = 0
        while (self.recv_buffer >> shift) > 0xFFFF:
            shift += 1
        return shift
