"""What pytier-cli shows for each management method: result -> table headers and cells.

The rows are those described in pytier.mgmt.protocol; a missing or null value shows as "-".
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from typing import Any

from pytier.mgmt.protocol import PROXY_STATES, PROXY_TRANSPORTS

MISSING = "-"

Table = tuple[list[str], list[list[str]]]


class ViewError(ValueError):
    """The result does not have the shape this view expects."""


def cell(value: Any) -> str:
    if value is None or value == "" or value == []:
        return MISSING
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(cell(v) for v in value)
    # A cell is one line: a stray newline would break the box.
    return " ".join(str(value).split()) or MISSING


def human_bytes(n: Any) -> str:
    if not isinstance(n, (int, float)) or isinstance(n, bool):
        return cell(n)
    if abs(n) < 1024:
        return f"{int(n)} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if abs(round(value, 1)) < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def human_duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return cell(seconds)
    total = int(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{days}d"] if days else []
    if parts or hours:
        parts.append(f"{hours}h")
    if parts or minutes:
        parts.append(f"{minutes}m")
    parts.append(f"{secs}s")
    return " ".join(parts)


def fixed(value: Any, digits: int) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.{digits}f}"
    return cell(value)


def percent(rate: Any) -> str:
    if isinstance(rate, (int, float)) and not isinstance(rate, bool):
        return f"{rate * 100:.1f}%"
    return cell(rate)


def utc_time(unix_s: Any) -> str:
    if isinstance(unix_s, (int, float)) and not isinstance(unix_s, bool):
        try:
            when = dt.datetime.fromtimestamp(unix_s, dt.UTC)
        except (OverflowError, OSError, ValueError):
            return cell(unix_s)
        return when.strftime("%Y-%m-%d %H:%M:%S UTC")
    return cell(unix_s)


def enum_name(value: Any, names: Sequence[str]) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
        return names[value]
    return cell(value)


def _rows(result: Any) -> list[dict[str, Any]]:
    if not isinstance(result, list) or not all(isinstance(r, dict) for r in result):
        raise ViewError("expected a list of rows")
    return result


def _next_hop(row: dict[str, Any]) -> str:
    hop = row.get("next_hop_peer_id")
    if hop is None:
        return MISSING
    if hop == row.get("peer_id"):
        return "DIRECT"
    name = row.get("next_hop_hostname")
    return f"{cell(name)} ({hop})" if name else cell(hop)


def peer_table(result: Any) -> Table:
    headers = ["ipv4", "hostname", "peer_id", "tunnel", "remote_addr", "lat(ms)", "loss", "rx", "tx"]
    rows = [
        [cell(r.get("ipv4")), cell(r.get("hostname")), cell(r.get("peer_id")), cell(r.get("tunnel")),
         cell(r.get("remote_addr")), fixed(r.get("latency_ms"), 2), percent(r.get("loss_rate")),
         human_bytes(r.get("rx_bytes")), human_bytes(r.get("tx_bytes"))]
        for r in _rows(result)
    ]
    return headers, rows


def route_table(result: Any) -> Table:
    headers = ["ipv4", "hostname", "peer_id", "next_hop", "cost", "proxy_cidrs", "features"]
    rows = [
        [cell(r.get("ipv4")), cell(r.get("hostname")), cell(r.get("peer_id")), _next_hop(r),
         cell(r.get("cost")), cell(r.get("proxy_cidrs")), cell(r.get("features"))]
        for r in _rows(result)
    ]
    return headers, rows


def proxy_table(result: Any) -> Table:
    headers = ["src", "dst", "start_time", "state", "transport_type", "rx", "tx", "rtt(ms)", "retrans"]
    rows = [
        [cell(r.get("src")), cell(r.get("dst")), utc_time(r.get("start_time")),
         enum_name(r.get("state"), PROXY_STATES), enum_name(r.get("transport_type"), PROXY_TRANSPORTS),
         human_bytes(r.get("rx_bytes")), human_bytes(r.get("tx_bytes")), fixed(r.get("rtt_ms"), 1),
         cell(r.get("retrans"))]
        for r in _rows(result)
    ]
    # QUIC rows carry their connection's BBR model; the columns appear only when some row has one.
    if any("bbr_state" in r for r in result):
        headers += ["bbr", "bw(Mbit/s)"]
        for row, r in zip(rows, result, strict=True):
            row += [cell(r.get("bbr_state")), fixed(r.get("bw_mbit"), 1)]
    return headers, rows


_NODE_KEYS = ("peer_id", "ipv4", "hostname", "network_name", "instance_name", "dev_name", "mtu",
              "listeners", "features", "version", "uptime_s")


def node_table(result: Any) -> Table:
    if not isinstance(result, dict):
        raise ViewError("expected an object")
    keys = [k for k in _NODE_KEYS if k in result] + sorted(k for k in result if k not in _NODE_KEYS)
    rows = [[k, human_duration(result[k]) if k == "uptime_s" else cell(result[k])] for k in keys]
    return ["key", "value"], rows


def stats_table(result: Any) -> Table:
    if not isinstance(result, dict):
        raise ViewError("expected an object of counters")
    return ["counter", "value"], [[str(k), cell(v)] for k, v in sorted(result.items())]


VIEWS: dict[str, tuple[str, Callable[[Any], Table]]] = {
    "peer": ("show the directly connected peers", peer_table),
    "route": ("show the route to every node of the network", route_table),
    "node": ("show this node", node_table),
    "proxy": ("show tcp/kcp/quic proxy connections", proxy_table),
    "stats": ("show traffic counters", stats_table),
}
