"""One admitted connection to a neighbour: its tunnel, ping statistics and liveness."""

from __future__ import annotations

import asyncio
import struct
import time
from collections import deque

from pytier.peers.path_cost import LossEstimate
from pytier.tunnel.base import Tunnel
from pytier.wire.peer_header import HEADER, PacketType

PING_INTERVAL_S = 1.0
PONG_TIMEOUT_S = 2.0
LOSS_WINDOW = 32
_SEQ = struct.Struct("<I")


class PeerConn:
    """Neighbour link state. Pings go out every second (no back-off): on a lossy path the steady
    stream of packets is what keeps a real EasyTier node's loss counter from closing the link."""

    def __init__(self, tunnel: Tunnel, my_peer_id: int, peer_id: int, network_name: str) -> None:
        self.tunnel = tunnel
        self.my_peer_id = my_peer_id
        self.peer_id = peer_id
        self.network_name = network_name
        now = time.monotonic()
        self.connected_at = now
        self.last_rx = now
        self._seq = 0
        self._outstanding: dict[int, float] = {}
        self._results: deque[bool] = deque(maxlen=LOSS_WINDOW)
        self._loss = LossEstimate()
        self.rtt_s: float | None = None
        self.closed = asyncio.Event()

    def make_ping(self, now: float) -> bytes:
        seq = self._seq
        self._seq = (seq + 1) & 0xFFFFFFFF
        self._outstanding[seq] = now
        for old, sent in list(self._outstanding.items()):
            if now - sent > PONG_TIMEOUT_S:
                del self._outstanding[old]
                self._results.append(False)
                self._loss.record(True)
        return HEADER.pack(self.my_peer_id, self.peer_id, PacketType.Ping, 0, 1, 0, 4) + _SEQ.pack(seq)

    def on_pong(self, payload: bytes, now: float) -> None:
        if len(payload) < 4:
            return
        sent = self._outstanding.pop(_SEQ.unpack_from(payload)[0], None)
        if sent is None:
            return
        self._results.append(True)
        self._loss.record(False)
        sample = now - sent
        self.rtt_s = sample if self.rtt_s is None else 0.8 * self.rtt_s + 0.2 * sample

    @property
    def loss_rate(self) -> float:
        if not self._results:
            return 0.0
        return self._results.count(False) / len(self._results)

    @property
    def smoothed_loss(self) -> float:
        """The loss share routing weighs (latency_first): smoother than `loss_rate`'s window."""
        return self._loss.value

    def describe(self) -> dict[str, object]:
        st = self.tunnel.stats
        return {
            "peer_id": self.peer_id,
            "tunnel": self.tunnel.info.scheme,
            "remote_addr": self.tunnel.info.remote_addr,
            "local_addr": self.tunnel.info.local_addr,
            "is_client": self.tunnel.info.is_client,
            "latency_ms": None if self.rtt_s is None else round(self.rtt_s * 1000, 2),
            "loss_rate": round(self.loss_rate, 3),
            "rx_bytes": st.rx_bytes,
            "tx_bytes": st.tx_bytes,
            "rx_packets": st.rx_packets,
            "tx_packets": st.tx_packets,
            "tx_errors": st.tx_errors,
        }
