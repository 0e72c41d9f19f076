"""User-space TCP/IP stack for `--use-smoltcp`: a sans-IO, any-IP TCP endpoint over raw IPv4 packets.

`stack.NetStack` demultiplexes packets and owns the connections; `connection.Connection` is the RFC 9293
state machine; `segment` builds outgoing packets; `assembler` and `rtt` are its two helpers.
"""

from pytier.netstack.config import NetStackConfig
from pytier.netstack.events import (
    CloseReason,
    Connected,
    ConnectionClosed,
    DataReceived,
    Endpoint,
    FourTuple,
    NetStackError,
    NetStackEvent,
    PeerFinished,
    SynReceived,
    Writable,
)
from pytier.netstack.stack import ConnectionInfo, NetStack

__all__ = [
    "CloseReason",
    "Connected",
    "ConnectionClosed",
    "ConnectionInfo",
    "DataReceived",
    "Endpoint",
    "FourTuple",
    "NetStack",
    "NetStackConfig",
    "NetStackError",
    "NetStackEvent",
    "PeerFinished",
    "SynReceived",
    "Writable",
]
