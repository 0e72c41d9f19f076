"""The management API's wire format, and the shape of what each method returns.

Newline-delimited JSON over a local TCP connection, one request per line, any number of requests
per connection:

    request:  {"method": "peer", "params": {}}
    reply:    {"ok": true, "result": ...}   or   {"ok": false, "error": "one line for the user"}

pytier-cli calls the methods in `METHODS`; the node answers them with the rows described by the
TypedDicts below (any key may be missing or None; the CLI shows "-").
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from collections.abc import Mapping
from typing import Any, TypedDict

MAX_REQUEST_BYTES = 64 * 1024
MAX_REPLY_BYTES = 64 * 1024 * 1024
DEFAULT_TIMEOUT_S = 5.0

METHODS = ("peer", "route", "node", "proxy", "stats", "peer_center", "connector_list", "connector_add",
           "connector_remove", "logger_get", "logger_set")

# Names used in ProxyRow, in EasyTier's enum order (TcpProxyEntryState, TcpProxyEntryTransportType),
# so that a row carrying the number instead of the name still prints right.
PROXY_STATES = ("Unknown", "SynReceived", "ConnectingDst", "Connected", "Closed", "ClosingSrc", "ClosingDst")
PROXY_TRANSPORTS = ("Tcp", "Kcp", "Quic")


class PeerRow(TypedDict, total=False):
    """`peer`: one per directly connected peer."""

    peer_id: int
    ipv4: str | None  # "10.144.144.2/24"
    hostname: str
    tunnel: str  # "udp" | "tcp"
    remote_addr: str  # "198.18.0.2:11010"
    latency_ms: float | None
    loss_rate: float | None  # 0..1
    rx_bytes: int
    tx_bytes: int
    version: str
    cost: int  # 1: a direct link


class RouteRow(TypedDict, total=False):
    """`route`: one per node reachable in the network."""

    peer_id: int
    ipv4: str | None
    hostname: str
    next_hop_peer_id: int | None  # equal to peer_id for a direct peer
    next_hop_hostname: str | None
    next_hop_ipv4: str | None
    next_hop_latency_ms: float | None  # our round trip to the next hop
    cost: int  # path length in hops
    path_latency_ms: float | None  # known for a direct peer only: route sync carries no latencies
    proxy_cidrs: list[str]
    features: list[str]  # e.g. ["kcp_input", "quic_input"]
    version: str


class NodeInfo(TypedDict, total=False):
    """`node`: this node."""

    peer_id: int
    ipv4: str | None
    hostname: str
    network_name: str
    instance_name: str
    dev_name: str
    mtu: int
    listeners: list[str]
    proxy_networks: list[str]  # "192.168.50.0/24", or "192.168.1.0/24->10.1.0.0/24" when mapped
    features: list[str]
    version: str
    uptime_s: float


class ProxyRow(TypedDict, total=False):
    """`proxy`: one per proxied TCP connection, on the source and on the destination node."""

    src: str  # "10.126.126.7:51838"; "0.0.0.0:0" on the destination side
    dst: str
    start_time: int  # Unix seconds
    state: str  # one of PROXY_STATES
    transport_type: str  # one of PROXY_TRANSPORTS
    rx_bytes: int
    tx_bytes: int
    rtt_ms: float | None
    retrans: int
    why: str  # --proxy-transport auto, source side: "auto: 0.0% loss, 0.6 ms: tcp (clean short path)"


# `stats`: a flat mapping of counter name -> int.
Stats = Mapping[str, int]


class DirectPeer(TypedDict, total=False):
    peer_id: int
    hostname: str | None
    latency_ms: float | None  # our round trip, on this node's own links only


class PeerCenterRow(TypedDict, total=False):
    """`peer_center`: one per reachable node (this one included), with the direct peers its latest
    route sync conn info names."""

    peer_id: int
    hostname: str | None
    ipv4: str | None
    direct_peers: list[DirectPeer]


class ConnectorRow(TypedDict, total=False):
    """`connector_list`: one per peer URL the node keeps connected. `connector_add` and
    `connector_remove` take {"url": "tcp://198.18.0.2:11010"} and return the connector's row."""

    url: str
    state: str  # "connected" | "connecting"
    peer_id: int | None
    last_error: str | None  # why the last attempt to connect failed


class LogLevels(TypedDict):
    """`logger_get`; `logger_set` takes {"level": "debug"} (off, error, warn, info, debug, trace), sets
    stderr and the log file, and returns the new levels."""

    console: str
    file: str  # "off" when there is no log file
    file_path: str | None


class MgmtError(Exception):
    """The management API could not give an answer; the message is one line for the user."""


class RemoteError(MgmtError):
    """pytier-core answered {"ok": false, "error": ...}; the message is its error text."""


class RequestError(ValueError):
    """A request line that the server cannot take."""


def to_jsonable(value: Any) -> Any:
    """Turn what a handler returns into plain JSON data.

    Handlers may return enums (by name), ip addresses and networks, dataclasses, tuples and sets;
    non-finite floats become null so that the reply stays strict JSON.
    """
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(to_jsonable(k)): to_jsonable(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable({f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    return str(value)  # ip addresses and networks, paths, and anything else with a readable str()


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def encode_request(method: str, params: Mapping[str, Any] | None = None) -> bytes:
    return _dumps({"method": method, "params": to_jsonable(dict(params or {}))})


def decode_request(line: bytes) -> tuple[str, dict[str, Any]]:
    try:
        req = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"request is not valid JSON: {e}") from None
    if not isinstance(req, dict):
        raise RequestError('request must be a JSON object like {"method": "peer", "params": {}}')
    method = req.get("method")
    if not isinstance(method, str):
        raise RequestError('request has no "method" string')
    params = req.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise RequestError('"params" must be a JSON object')
    return method, params


def encode_result(result: Any) -> bytes:
    return _dumps({"ok": True, "result": to_jsonable(result)})


def encode_error(message: str) -> bytes:
    return _dumps({"ok": False, "error": " ".join(message.split())})


def decode_reply(line: bytes) -> Any:
    """The result of a reply line; raises RemoteError for an error reply, MgmtError for garbage."""
    try:
        reply = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise MgmtError("pytier-core sent a reply that is not valid JSON") from None
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise MgmtError('pytier-core sent a reply without an "ok" field')
    if not reply["ok"]:
        raise RemoteError(str(reply.get("error") or "unspecified error"))
    return reply.get("result")


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
