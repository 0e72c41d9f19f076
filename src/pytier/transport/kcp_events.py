"""Events a KcpEndpoint hands to its owner (one stream handle per proxied TCP connection).

Every handle ends with exactly one terminal event: `ConnectFailed` for a connect that never got
established, `ConnectionClosed` otherwise (also after the owner's own `close`, `abort` or `refuse`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class CloseReason(StrEnum):
    FINISHED = "finished"  # both sides sent FIN after all their data was acknowledged
    REFUSED = "refused"  # the acceptor answered the SYN with RST, or the owner refused it
    RESET = "reset"  # the peer sent RST
    CONNECT_TIMEOUT = "connect timeout"  # no SYN|ACK within the connect timeout
    HANDSHAKE_TIMEOUT = "handshake timeout"  # accepted, but the initiator never confirmed
    ACCEPT_TIMEOUT = "accept timeout"  # the owner neither accepted nor refused in time
    IDLE_TIMEOUT = "idle timeout"  # nothing received for the idle timeout
    DEAD_LINK = "dead link"  # data went unacknowledged through KcpConfig.dead_link retransmissions
    PEER_GONE = "peer gone"  # the owner reported the peer unreachable
    ABORTED = "aborted"  # the owner aborted, or data arrived after the owner closed
    LIMIT = "too many conversations"


@dataclass(frozen=True, slots=True)
class Connected:
    handle: int


@dataclass(frozen=True, slots=True)
class ConnectFailed:
    handle: int
    reason: CloseReason


@dataclass(frozen=True, slots=True)
class IncomingConnection:
    """A SYN arrived; answer with `accept(handle)` or `refuse(handle)`."""

    handle: int
    from_peer: int
    conn_data: bytes


@dataclass(frozen=True, slots=True)
class DataReceived:
    handle: int
    data: bytes


@dataclass(frozen=True, slots=True)
class PeerFinished:
    """The peer will send nothing more (its FIN arrived and all its data was delivered)."""

    handle: int


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    handle: int
    reason: CloseReason
    stats: dict[str, int | float | str] = field(default_factory=dict, compare=False)


KcpEvent = Connected | ConnectFailed | IncomingConnection | DataReceived | PeerFinished | ConnectionClosed
