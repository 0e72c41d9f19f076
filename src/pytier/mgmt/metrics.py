"""A node's figures in Prometheus' text exposition format (version 0.0.4), served at /metrics and by
`pytier-cli stats prometheus`.

It reads the same data as the management API (the `node`, `peer`, `stats` and `proxy` results), so
the two never disagree. Every key of `stats` is exported under one family with a `name` label: a
counter that another part of the node starts counting shows up here without a change. See
docs/metrics.md for the families and labels.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pytier.mgmt.protocol import PROXY_TRANSPORTS

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

MetricType = Literal["counter", "gauge"]
Labels = Mapping[str, str]

_PEER_LABELS = ("peer_id", "hostname", "ipv4", "tunnel", "remote_addr")
# Proxy row fields that only grow over a connection's life, summed per transport.
_PROXY_SUMS = ("tx_bytes", "rx_bytes", "retrans")


@dataclass
class Family:
    name: str
    type: MetricType
    help: str
    samples: list[tuple[Labels, float]] = field(default_factory=list)

    def add(self, value: Any, **labels: str) -> None:
        """Add a sample; a value that is not a number (None for an unmeasured latency) is left out."""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            self.samples.append((labels, value))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def render(families: Iterable[Family]) -> str:
    lines: list[str] = []
    for fam in families:
        help_text = fam.help.replace("\\", "\\\\").replace("\n", "\\n")
        lines.append(f"# HELP {fam.name} {help_text}")
        lines.append(f"# TYPE {fam.name} {fam.type}")
        for labels, value in fam.samples:
            if labels:
                inner = ",".join(f'{k}="{_escape_label(str(v))}"' for k, v in labels.items())
                lines.append(f"{fam.name}{{{inner}}} {_number(value)}")
            else:
                lines.append(f"{fam.name} {_number(value)}")
    return "\n".join(lines) + "\n"


class ProxyTotals:
    """What the proxy rows that left the table had carried, per transport.

    Closed connections' rows go from the proxy table a few seconds after the close; without these
    sums the byte, resend and connection counters would fall back when they go, which Prometheus
    reads as a counter reset.
    """

    def __init__(self) -> None:
        self._sums: collections.Counter[tuple[str, str]] = collections.Counter()

    def retire(self, row: Mapping[str, Any]) -> None:
        transport = _transport(row)
        self._sums[(transport, "connections")] += 1
        for key in _PROXY_SUMS:
            value = row.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                self._sums[(transport, key)] += value

    def get(self, transport: str, key: str) -> int:
        return self._sums[(transport, key)]

    def transports(self) -> set[str]:
        return {t for t, _ in self._sums}


def _transport(row: Mapping[str, Any]) -> str:
    value = row.get("transport_type")
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(PROXY_TRANSPORTS):
        return PROXY_TRANSPORTS[value]
    return str(value)


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def node_families(node: Mapping[str, Any], stats: Mapping[str, int], peers: Sequence[Mapping[str, Any]],
                  proxy_rows: Sequence[Mapping[str, Any]] | None, totals: ProxyTotals) -> list[Family]:
    """The families for one scrape. `proxy_rows` is None when the node runs no TCP proxy."""
    families = [_info(node), *_peer_families(peers), _counters(stats)]
    if proxy_rows is not None:
        families += _proxy_families(proxy_rows, totals)
    return families


def _info(node: Mapping[str, Any]) -> Family:
    info = Family("pytier_node_info", "gauge", "This node: always 1, its facts in the labels.")
    info.add(1, peer_id=_text(node.get("peer_id")), hostname=_text(node.get("hostname")),
             ipv4=_text(node.get("ipv4")), network_name=_text(node.get("network_name")),
             instance_name=_text(node.get("instance_name")), version=_text(node.get("version")))
    return info


def _peer_families(peers: Sequence[Mapping[str, Any]]) -> list[Family]:
    per_link: tuple[tuple[str, str, MetricType, str], ...] = (
        ("rx_bytes", "pytier_peer_rx_bytes_total", "counter", "Bytes received on the tunnel to the peer."),
        ("tx_bytes", "pytier_peer_tx_bytes_total", "counter", "Bytes sent on the tunnel to the peer."),
        ("rx_packets", "pytier_peer_rx_packets_total", "counter",
         "Packets received on the tunnel to the peer."),
        ("tx_packets", "pytier_peer_tx_packets_total", "counter", "Packets sent on the tunnel to the peer."),
        ("tx_errors", "pytier_peer_tx_errors_total", "counter",
         "Sends to the peer that the OS refused (counted as loss)."),
        ("loss_rate", "pytier_peer_loss_ratio", "gauge", "Estimated packet loss toward the peer, 0 to 1."),
    )
    families = [Family(name, kind, help_text) for _, name, kind, help_text in per_link]
    latency = Family("pytier_peer_latency_seconds", "gauge",
                     "Smoothed round-trip time to the peer (absent until measured).")
    up = Family("pytier_peer_tunnels", "gauge",
                "Tunnels to directly connected peers (a peer may have several).")
    up.add(len(peers))
    for row in peers:
        labels = {k: _text(row.get(k)) for k in _PEER_LABELS}
        for fam, (key, *_) in zip(families, per_link, strict=True):
            fam.add(row.get(key), **labels)
        ms = row.get("latency_ms")
        if isinstance(ms, (int, float)) and not isinstance(ms, bool):
            latency.add(ms / 1000, **labels)
    return [up, *families, latency, *_fec_families(peers)]


def _fec_families(peers: Sequence[Mapping[str, Any]]) -> list[Family]:
    """FEC per peer (not per tunnel: a peer with two links has one encoder and one decoder)."""
    per_peer: tuple[tuple[str, str, MetricType, str], ...] = (
        ("fec_tx_data", "pytier_peer_fec_data_frames_total", "counter",
         "UDP and KCP packets sent to the peer as FEC data frames."),
        ("fec_tx_parity", "pytier_peer_fec_parity_frames_total", "counter",
         "FEC parity frames sent to the peer."),
        ("fec_recovered", "pytier_peer_fec_recovered_packets_total", "counter",
         "Packets from the peer rebuilt from FEC parity."),
        ("fec_unrecovered", "pytier_peer_fec_unrecovered_packets_total", "counter",
         "Packets from the peer that FEC saw missing and could not rebuild."),
    )
    families = [Family(name, kind, help_text) for _, name, kind, help_text in per_peer]
    ratio = Family("pytier_peer_fec_parity_ratio", "gauge",
                   "Parity frames per data frame of the FEC shape toward the peer (0: FEC off).")
    seen: set[str] = set()
    for row in peers:
        shape = row.get("fec")
        peer = _text(row.get("peer_id"))
        if not isinstance(shape, str) or peer in seen:
            continue
        seen.add(peer)
        labels = {"peer_id": peer, "hostname": _text(row.get("hostname"))}
        for fam, (key, *_) in zip(families, per_peer, strict=True):
            fam.add(row.get(key), **labels)
        ratio.add(_parity_ratio(shape), **labels)
    return [ratio, *families]


def _parity_ratio(shape: str) -> float:
    """m / k of a shape shown as "k+mxdepth"; 0 for "off"; the larger one of "udp S, kcp S"."""
    ratios = [0.0]
    for part in shape.split(","):
        k, _, rest = part.rpartition(" ")[2].partition("+")
        m = rest.partition("x")[0]
        if k.isdigit() and m.isdigit() and int(k):
            ratios.append(int(m) / int(k))
    return max(ratios)


def _counters(stats: Mapping[str, int]) -> Family:
    fam = Family("pytier_node_events_total", "counter",
                 "Node counters by name, as pytier-cli stats shows them: packets dropped by reason, "
                 "hostile or malformed input, send errors, and packets delivered.")
    for name, value in sorted(stats.items()):
        fam.add(value, name=str(name))
    return fam


def _proxy_families(rows: Sequence[Mapping[str, Any]], totals: ProxyTotals) -> list[Family]:
    by_state: collections.Counter[tuple[str, str]] = collections.Counter()
    live: collections.Counter[tuple[str, str]] = collections.Counter()
    for row in rows:
        transport = _transport(row)
        by_state[(transport, _text(row.get("state")))] += 1
        live[(transport, "connections")] += 1
        for key in _PROXY_SUMS:
            value = row.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                live[(transport, key)] += value
    current = Family("pytier_proxy_connections", "gauge",
                     "Proxied TCP connections in the proxy table, by transport and state "
                     "(closed ones stay listed a few seconds).")
    for (transport, state), n in sorted(by_state.items()):
        current.add(n, transport=transport, state=state)
    opened = Family("pytier_proxy_connections_total", "counter",
                    "Proxied TCP connections seen, by transport.")
    sent = Family("pytier_proxy_bytes_total", "counter",
                  "Bytes carried by proxied connections, by transport; direction tx is from the TCP "
                  "client toward its destination, rx is back.")
    resends = Family("pytier_proxy_resends_total", "counter",
                     "Segments (KCP) or packets (QUIC) the proxy transport sent again, by transport.")
    for transport in sorted({*PROXY_TRANSPORTS, *totals.transports(), *(t for t, _ in live)}):
        total = {key: live[(transport, key)] + totals.get(transport, key)
                 for key in ("connections", *_PROXY_SUMS)}
        opened.add(total["connections"], transport=transport)
        sent.add(total["tx_bytes"], transport=transport, direction="tx")
        sent.add(total["rx_bytes"], transport=transport, direction="rx")
        resends.add(total["retrans"], transport=transport)
    return [current, opened, sent, resends]
