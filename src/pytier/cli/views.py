"""What pytier-cli shows for each management method: result -> table headers and cells.

The rows are those described in pytier.mgmt.protocol; a missing or null value shows as "-".
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pytier.mgmt.protocol import PROXY_STATES, PROXY_TRANSPORTS

MISSING = "-"


@dataclass(frozen=True)
class Table:
    """Headers and cells; `optional` names the columns a narrow terminal may do without, the first
    to go first."""

    headers: list[str]
    rows: list[list[str]]
    optional: tuple[str, ...] = ()


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


def _object(result: Any) -> dict[str, Any]:
    if not isinstance(result, dict):
        raise ViewError("expected an object")
    return result


def _cost(value: Any) -> str:
    """EasyTier's names for a path: p2p for a direct link, relay(N) through N-1 other nodes."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return "p2p" if value == 1 else f"relay({value})"
    return cell(value)


def _ipv4(value: Any) -> str:
    """An address without its prefix length, as EasyTier shows a node's address in tables."""
    return cell(value).split("/", 1)[0] if isinstance(value, str) else cell(value)


def peer_table(result: Any) -> Table:
    headers = ["ipv4", "hostname", "cost", "lat(ms)", "loss", "rx", "tx", "tunnel", "version", "peer_id",
               "remote_addr"]
    rows = [
        [cell(r.get("ipv4")), cell(r.get("hostname")), _cost(r.get("cost")), fixed(r.get("latency_ms"), 2),
         percent(r.get("loss_rate")), human_bytes(r.get("rx_bytes")), human_bytes(r.get("tx_bytes")),
         cell(r.get("tunnel")), cell(r.get("version")), cell(r.get("peer_id")), cell(r.get("remote_addr"))]
        for r in _rows(result)
    ]
    optional: tuple[str, ...] = ("remote_addr", "version", "peer_id", "tunnel", "tx", "rx", "loss")
    # FEC toward the peer (its shape k+m x depth, or off) and packets rebuilt from it; from nodes
    # that report FEC at all (an older node's rows have neither).
    if any("fec" in r for r in _rows(result)):
        at = headers.index("tunnel")
        headers[at:at] = ["fec", "fec_rec"]
        for row, r in zip(rows, _rows(result), strict=True):
            row[at:at] = [cell(r.get("fec")), cell(r.get("fec_recovered"))]
        optional = ("fec_rec", *optional[:4], "fec", *optional[4:])
    return Table(headers, rows, optional)


def _next_hop_ipv4(row: dict[str, Any]) -> str:
    hop = row.get("next_hop_peer_id")
    if hop is not None and hop == row.get("peer_id"):
        return "DIRECT"
    return _ipv4(row.get("next_hop_ipv4")) if row.get("next_hop_ipv4") else cell(hop)


def route_table(result: Any) -> Table:
    headers = ["ipv4", "hostname", "proxy_cidrs", "next_hop_ipv4", "next_hop_hostname", "next_hop_lat(ms)",
               "path_len", "path_lat(ms)", "version", "peer_id", "features"]
    rows = [
        [cell(r.get("ipv4")), cell(r.get("hostname")), cell(r.get("proxy_cidrs")), _next_hop_ipv4(r),
         cell(r.get("next_hop_hostname")), fixed(r.get("next_hop_latency_ms"), 2), cell(r.get("cost")),
         fixed(r.get("path_latency_ms"), 2), cell(r.get("version")), cell(r.get("peer_id")),
         cell(r.get("features"))]
        for r in _rows(result)
    ]
    return Table(headers, rows, ("features", "peer_id", "version", "next_hop_hostname", "path_lat(ms)",
                                 "next_hop_lat(ms)"))


def proxy_table(result: Any) -> Table:
    headers = ["src", "dst", "start_time", "state", "transport_type", "rx", "tx", "rtt(ms)", "retrans"]
    rows = [
        [cell(r.get("src")), cell(r.get("dst")), utc_time(r.get("start_time")),
         enum_name(r.get("state"), PROXY_STATES), enum_name(r.get("transport_type"), PROXY_TRANSPORTS),
         human_bytes(r.get("rx_bytes")), human_bytes(r.get("tx_bytes")), fixed(r.get("rtt_ms"), 1),
         cell(r.get("retrans"))]
        for r in _rows(result)
    ]
    optional: tuple[str, ...] = ("retrans", "rtt(ms)", "start_time", "tx", "rx")
    # QUIC rows carry their connection's BBR model; the columns appear only when some row has one.
    if any("bbr_state" in r for r in result):
        headers += ["bbr", "bw(Mbit/s)"]
        for row, r in zip(rows, result, strict=True):
            row += [cell(r.get("bbr_state")), fixed(r.get("bw_mbit"), 1)]
        optional = ("bbr", "bw(Mbit/s)", *optional)
    # Rows that --proxy-transport auto chose carry the reason; the column appears only then.
    if any("why" in r for r in result):
        headers.append("why")
        for row, r in zip(rows, result, strict=True):
            row.append(cell(r.get("why")))
    return Table(headers, rows, optional)


_NODE_KEYS = ("peer_id", "ipv4", "hostname", "network_name", "instance_name", "dev_name", "mtu",
              "listeners", "proxy_networks", "features", "version", "uptime_s")


def node_table(result: Any) -> Table:
    node = _object(result)
    keys = [k for k in _NODE_KEYS if k in node] + sorted(k for k in node if k not in _NODE_KEYS)
    rows = [[k, human_duration(node[k]) if k == "uptime_s" else cell(node[k])] for k in keys]
    return Table(["key", "value"], rows)


def stats_table(result: Any) -> Table:
    if not isinstance(result, dict):
        raise ViewError("expected an object of counters")
    return Table(["counter", "value"], [[str(k), cell(v)] for k, v in sorted(result.items())])


def _direct_peer(p: Any) -> str:
    if not isinstance(p, dict):
        raise ViewError("expected direct peers as objects")
    name = f"{cell(p.get('hostname'))}({cell(p.get('peer_id'))})"
    lat = p.get("latency_ms")
    return f"{name} {fixed(lat, 2)}ms" if isinstance(lat, (int, float)) else name


def peer_center_table(result: Any) -> Table:
    rows = []
    for r in _rows(result):
        direct = r.get("direct_peers") or []
        if not isinstance(direct, list):
            raise ViewError("expected direct_peers as a list")
        rows.append([cell(r.get("peer_id")), cell(r.get("hostname")), cell(r.get("ipv4")),
                     ", ".join(_direct_peer(p) for p in direct) or MISSING])
    return Table(["peer_id", "hostname", "ipv4", "direct_peers"], rows, ("ipv4",))


def connector_table(result: Any) -> Table:
    rows = [[cell(r.get("url")), cell(r.get("state")), cell(r.get("peer_id")), cell(r.get("last_error"))]
            for r in _rows(result)]
    return Table(["url", "state", "peer_id", "last_error"], rows, ("last_error", "peer_id"))


def connector_text(verb: str) -> Callable[[Any], str]:
    def text(result: Any) -> str:
        row = _object(result)
        return f"connector {cell(row.get('url'))} {verb} ({cell(row.get('state'))})"

    return text


def logger_text(result: Any) -> str:
    levels = _object(result)
    path = levels.get("file_path")
    file = f"{cell(levels.get('file'))} ({path})" if path else "off (no log file: see --file-log-level)"
    return f"console: {cell(levels.get('console'))}\nfile: {file}"
