"""Addresses and the events a NetStack hands to its owner.

Every handle ends with exactly one `ConnectionClosed`, also after the owner's own `refuse`, `close` or
`abort`. Events of one handle come in stream order: data, then `PeerFinished`, then `ConnectionClosed`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from ipaddress import IPv4Address
from typing import NamedTuple

__all__ = [
    "CloseReason",
    "Connected",
    "ConnectionClosed",
    "DataReceived",
    "Endpoint",
    "FourTuple",
    "NetStackError",
    "NetStackEvent",
    "PeerFinished",
    "SynReceived",
    "Writable",
]


class NetStackError(Exception):
    """The owner asked for something the connection's state does not allow; the message names the state."""


class Endpoint(NamedTuple):
    addr: IPv4Address
    port: int

    def __str__(self) -> str:
        return f"{self.addr}:{self.port}"


class FourTuple(NamedTuple):
    """A connection's addresses as its opening SYN carried them: `src` sent the SYN, `dst` received it.

    For a passive open `src` is the remote client and `dst` the (any) address it asked for; for a
    `connect` it is the other way round.
    """

    src: Endpoint
    dst: Endpoint


class CloseReason(StrEnum):
    FINISHED = "finished"  # both FINs sent and acknowledged: every byte got through
    REFUSED = "refused"  # our SYN was answered with RST, or the owner refused the peer's SYN
    RESET = "reset"  # the peer sent an acceptable RST
    TIMEOUT = "timeout"  # retransmissions (of SYN, data or FIN) ran out, or an orphan waited too long
    ACCEPT_TIMEOUT = "accept timeout"  # the owner neither accepted nor refused a SYN in time
    ABORTED = "aborted"  # the owner aborted, or data arrived after the owner closed


@dataclass(frozen=True, slots=True)
class SynReceived:
    """A SYN arrived for a tuple the stack answers for; answer with `accept(handle)` or `refuse(handle)`."""

    handle: int
    src: Endpoint
    dst: Endpoint


@dataclass(frozen=True, slots=True)
class Connected:
    """The three-way handshake completed (passive open after `accept`, or active `connect`)."""

    handle: int


@dataclass(frozen=True, slots=True)
class DataReceived:
    handle: int
    data: bytes


@dataclass(frozen=True, slots=True)
class PeerFinished:
    """The peer's FIN arrived and every byte before it was delivered: it will send nothing more."""

    handle: int


@dataclass(frozen=True, slots=True)
class Writable:
    """Send-buffer space opened up after a `send` that could not take everything it was given."""

    handle: int


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    handle: int
    reason: CloseReason


NetStackEvent = SynReceived | Connected | DataReceived | PeerFinished | Writable | ConnectionClosed
