"""What an FEC encoder and decoder did, for the management API and logs (totals since start)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DecoderCounters", "EncoderCounters"]


@dataclass(slots=True)
class EncoderCounters:
    data_frames: int = 0
    parity_frames: int = 0
    data_bytes: int = 0
    parity_bytes: int = 0
    groups: int = 0
    # groups closed by the flush deadline before they held k packets
    short_groups: int = 0


@dataclass(slots=True)
class DecoderCounters:
    data_frames: int = 0
    parity_frames: int = 0
    # frames whose index this decoder already had (the packet, if data, went out once already)
    duplicates: int = 0
    # packets rebuilt from parity and delivered
    recovered: int = 0
    # groups that ended (expired or evicted) with data packets still missing, and those packets
    unrecoverable_groups: int = 0
    unrecovered_packets: int = 0
    # frames that contradict their group's shape (k, m or symbol size) as its first parity set it
    inconsistent: int = 0
