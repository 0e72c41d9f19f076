"""The Prometheus text of a node's figures (read back with prometheus_client's own parser), the proxy
totals that keep its counters from going back, the /metrics HTTP server, and --metrics-listen."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pytier.config import ConfigError, parse_config
from pytier.errors import UserError
from pytier.mgmt.http import MAX_REQUEST_BYTES, MetricsHttpServer
from pytier.mgmt.metrics import Family, ProxyTotals, node_families, render
from pytier.proxy.entries import CLOSED_ROW_LINGER_S, EntryState, EntryTable, ProxyEntry, TransportType

NODE = {"peer_id": 7, "hostname": "a", "ipv4": "10.144.144.1/24", "network_name": "demo",
        "instance_name": "default", "version": "pytier-0.1.0"}
PEERS = [{"peer_id": 9, "hostname": 'b "quoted"\\x', "ipv4": "10.144.144.2/24", "tunnel": "udp",
          "remote_addr": "198.18.1.2:40000", "latency_ms": 12.5, "loss_rate": 0.25, "rx_bytes": 1000,
          "tx_bytes": 2000, "rx_packets": 10, "tx_packets": 20, "tx_errors": 0},
         {"peer_id": 11, "hostname": None, "ipv4": None, "tunnel": "tcp", "remote_addr": "198.18.1.3:11010",
          "latency_ms": None, "loss_rate": 0.0, "rx_bytes": 5, "tx_bytes": 6, "rx_packets": 1,
          "tx_packets": 1, "tx_errors": 2}]


Parsed = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Parsed:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(parsed: Parsed, metric: str, /, **labels: str) -> float:
    return parsed[(metric, frozenset(labels.items()))]


def test_peer_counters_and_every_stats_key_by_name() -> None:
    stats = {"rx_decrypt_failed": 3, "tun_dropped_no_route": 1, "a_counter_added_later": 5}
    text = render(node_families(NODE, stats, PEERS, None, ProxyTotals()))
    parsed = samples(text)
    b = {"peer_id": "9", "hostname": 'b "quoted"\\x', "ipv4": "10.144.144.2/24", "tunnel": "udp",
         "remote_addr": "198.18.1.2:40000"}
    assert value(parsed, "pytier_peer_rx_bytes_total", **b) == 1000
    assert value(parsed, "pytier_peer_tx_bytes_total", **b) == 2000
    assert value(parsed, "pytier_peer_rx_packets_total", **b) == 10
    assert value(parsed, "pytier_peer_tx_packets_total", **b) == 20
    assert value(parsed, "pytier_peer_loss_ratio", **b) == 0.25
    assert value(parsed, "pytier_peer_latency_seconds", **b) == pytest.approx(0.0125)
    c = {"peer_id": "11", "hostname": "", "ipv4": "", "tunnel": "tcp", "remote_addr": "198.18.1.3:11010"}
    assert value(parsed, "pytier_peer_tx_errors_total", **c) == 2
    # No latency measured yet: no sample, rather than a made-up 0.
    assert ("pytier_peer_latency_seconds", frozenset(c.items())) not in parsed
    assert value(parsed, "pytier_peer_tunnels") == 2
    for name, n in stats.items():
        assert value(parsed, "pytier_node_events_total", name=name) == n
    assert value(parsed, "pytier_node_info", **{k: str(v) for k, v in NODE.items()}) == 1
    # No TCP proxy on this node: no proxy families at all.
    assert not any(name.startswith("pytier_proxy") for name, _ in parsed)


def test_render_escapes_and_types() -> None:
    fam = Family("x_total", "counter", "help with \\ and\nnewline")
    fam.add(3, label='a"b\nc\\d')
    fam.add(None, label="skipped")
    fam.add(True, label="skipped too")
    gauge = Family("y", "gauge", "a float")
    gauge.add(0.5)
    text = render([fam, gauge])
    assert text.endswith("\n")
    [x, y] = list(text_string_to_metric_families(text))
    assert x.type == "counter" and x.documentation == "help with \\ and\nnewline"
    assert [(s.labels, s.value) for s in x.samples] == [({"label": 'a"b\nc\\d'}, 3)]
    assert y.type == "gauge" and y.samples[0].value == 0.5


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_proxy_counters_keep_what_closed_rows_carried() -> None:
    clock = Clock()
    table = EntryTable(clock)
    totals = ProxyTotals()
    table.on_retire = totals.retire
    retrans = {"n": 4}
    kcp = ProxyEntry("10.144.144.2:5000", "10.144.144.1:80", TransportType.Kcp, state=EntryState.Connected,
                     stats=lambda: {"retrans": retrans["n"], "rtt_ms": 3.0})
    tcp = ProxyEntry("10.144.144.2:5001", "10.144.144.1:80", TransportType.Tcp, state=EntryState.Connected)
    kcp_key, tcp_key = table.add(kcp), table.add(tcp)
    kcp.tx_bytes, kcp.rx_bytes, tcp.tx_bytes = 100, 50, 7

    def scrape() -> Parsed:
        return samples(render(node_families(NODE, {}, [], table.rows(), totals)))

    first = scrape()
    assert value(first, "pytier_proxy_connections", transport="Kcp", state="Connected") == 1
    assert value(first, "pytier_proxy_connections", transport="Tcp", state="Connected") == 1
    assert value(first, "pytier_proxy_bytes_total", transport="Kcp", direction="tx") == 100
    assert value(first, "pytier_proxy_bytes_total", transport="Kcp", direction="rx") == 50
    assert value(first, "pytier_proxy_resends_total", transport="Kcp") == 4
    assert value(first, "pytier_proxy_connections_total", transport="Quic") == 0

    kcp.tx_bytes, retrans["n"] = 300, 6
    table.close(kcp_key)
    table.close(tcp_key)
    lingering = scrape()
    assert value(lingering, "pytier_proxy_connections", transport="Kcp", state="Closed") == 1

    clock.now += CLOSED_ROW_LINGER_S + 1
    gone = scrape()
    assert table.rows() == []
    assert not any(name == "pytier_proxy_connections" for name, _ in gone)
    assert value(gone, "pytier_proxy_connections_total", transport="Kcp") == 1
    assert value(gone, "pytier_proxy_connections_total", transport="Tcp") == 1
    assert value(gone, "pytier_proxy_bytes_total", transport="Kcp", direction="tx") == 300
    assert value(gone, "pytier_proxy_bytes_total", transport="Tcp", direction="tx") == 7
    assert value(gone, "pytier_proxy_resends_total", transport="Kcp") == 6


async def _request(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    async with asyncio.timeout(10):
        reply = await reader.read()
    writer.close()
    return reply


def _status(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


def test_http_server_serves_get_metrics_only() -> None:
    calls: list[int] = []

    def render_text() -> str:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("a bug in rendering")
        return render(node_families(NODE, {"rx_replayed": 1}, PEERS, None, ProxyTotals()))

    async def main() -> list[bytes]:
        server = MetricsHttpServer(render_text, "127.0.0.1", 0)
        await server.start()
        port = server.address[1]
        try:
            return [
                await _request(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
                await _request(port, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"),  # the rendering bug: 500
                await _request(port, b"GET / HTTP/1.1\r\n\r\n"),
                await _request(port, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n"),
                await _request(port, b"hello\r\n\r\n"),
                await _request(port, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * MAX_REQUEST_BYTES + b"\r\n"),
                await _request(port, b"GET /metrics HTTP/1.1\r\n\r\n"),  # still serving after all that
            ]
        finally:
            await server.close()

    replies = asyncio.run(main())
    assert [_status(r) for r in replies] == [200, 500, 404, 405, 400, 431, 200]
    head, body = replies[0].split(b"\r\n\r\n", 1)
    assert b"Content-Type: text/plain; version=0.0.4; charset=utf-8" in head
    assert f"Content-Length: {len(body)}".encode() in head
    parsed = samples(body.decode())
    assert value(parsed, "pytier_node_events_total", name="rx_replayed") == 1


def test_http_bind_error_is_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        async def main() -> None:
            await MetricsHttpServer(lambda: "", "127.0.0.1", port).start()

        where = rf"127\.0\.0\.1:{port}"
        with pytest.raises(UserError, match=rf"^cannot serve metrics on {where}: address already in use"):
            asyncio.run(main())


@pytest.mark.parametrize(("argv", "env", "expected"), [
    ([], {}, None),
    (["--metrics-listen", "9110"], {}, ("127.0.0.1", 9110)),
    (["--metrics-listen", "0.0.0.0:9110"], {}, ("0.0.0.0", 9110)),
    (["--metrics-listen", "[::1]:9110"], {}, ("::1", 9110)),
    ([], {"PYTIER_METRICS_LISTEN": "localhost:9111"}, ("127.0.0.1", 9111)),
])
def test_metrics_listen_setting(argv: list[str], env: dict[str, str], expected: Any) -> None:
    assert parse_config(argv, env).metrics_listen == expected


def test_metrics_listen_in_a_file_and_bad_values(tmp_path: Any) -> None:
    path = tmp_path / "node.toml"
    path.write_text('metrics_listen = "127.0.0.1:9112"\n')
    assert parse_config(["-c", str(path)], {}).metrics_listen == ("127.0.0.1", 9112)
    for bad in ("host:9110", "127.0.0.1", "127.0.0.1:70000"):
        with pytest.raises(ConfigError, match="--metrics-listen"):
            parse_config(["--metrics-listen", bad], {})
