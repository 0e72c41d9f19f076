"""pytier-cli's tables and usage errors, and pytier-core's run loop (exit codes, signals, log format)."""
# ruff: noqa: E501  (expected tables are written out whole, as a user sees them)

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pytier.cli.client import COMMANDS, LOCAL_COMMANDS, render
from pytier.cli.core import run, setup_logging
from pytier.cli.table import (
    MIN_COLUMN,
    display_width,
    fit_table,
    output_width,
    render_table,
    table_width,
    truncate,
)
from pytier.cli.views import ViewError, human_bytes, human_duration
from pytier.config import Config
from pytier.errors import UserError
from pytier.logs import FileLog

CLI = str(Path(sys.executable).parent / "pytier-cli")

# The spec's `easytier-cli proxy` example, with the padding the copy lost put back.
SPEC_PROXY_TABLE = """\
┌────────────────────┬───────────────────┬─────────────────────────┬───────────┬────────────────┐
│ src                │ dst               │ start_time              │ state     │ transport_type │
├────────────────────┼───────────────────┼─────────────────────────┼───────────┼────────────────┤
│ 10.126.126.7:51838 │ 10.147.223.128:22 │ 2025-02-07 10:39:08 UTC │ Connected │ Tcp            │
├────────────────────┼───────────────────┼─────────────────────────┼───────────┼────────────────┤
│ 0.0.0.0:0          │ 10.147.223.1:80   │ 2025-02-07 10:41:28 UTC │ Connected │ Kcp            │
├────────────────────┼───────────────────┼─────────────────────────┼───────────┼────────────────┤
│ 0.0.0.0:0          │ 10.147.223.1:80   │ 2025-02-07 10:41:18 UTC │ Connected │ Kcp            │
└────────────────────┴───────────────────┴─────────────────────────┴───────────┴────────────────┘"""


def test_render_table_matches_the_spec() -> None:
    rows = [
        ["10.126.126.7:51838", "10.147.223.128:22", "2025-02-07 10:39:08 UTC", "Connected", "Tcp"],
        ["0.0.0.0:0", "10.147.223.1:80", "2025-02-07 10:41:28 UTC", "Connected", "Kcp"],
        ["0.0.0.0:0", "10.147.223.1:80", "2025-02-07 10:41:18 UTC", "Connected", "Kcp"],
    ]
    assert render_table(["src", "dst", "start_time", "state", "transport_type"], rows) == SPEC_PROXY_TABLE


def test_render_table_without_rows_and_with_wide_characters() -> None:
    assert render_table(["a", "bb"], []) == "┌───┬────┐\n│ a │ bb │\n└───┴────┘"
    assert render_table(["host"], [["节点"], ["x"]]) == (
        "┌──────┐\n│ host │\n├──────┤\n│ 节点 │\n├──────┤\n│ x    │\n└──────┘"
    )
    with pytest.raises(ValueError, match="row has 1 cells for 2 columns"):
        render_table(["a", "b"], [["x"]])


def test_proxy_view_prints_the_spec_columns_first() -> None:
    result = [
        {"src": "10.126.126.7:51838", "dst": "10.147.223.128:22", "start_time": 1738924748, "state": "Connected",
         "transport_type": "Quic", "rx_bytes": 1258291, "tx_bytes": 512, "rtt_ms": 21.46, "retrans": 3},
        # Numbers for the enums, and no extras: still readable.
        {"src": "0.0.0.0:0", "dst": "10.147.223.1:80", "start_time": 1738924888, "state": 2, "transport_type": 1},
    ]
    assert render(("proxy",), result, "table") == textwrap.dedent("""\
        ┌────────────────────┬───────────────────┬─────────────────────────┬───────────────┬────────────────┬─────────┬───────┬─────────┬─────────┐
        │ src                │ dst               │ start_time              │ state         │ transport_type │ rx      │ tx    │ rtt(ms) │ retrans │
        ├────────────────────┼───────────────────┼─────────────────────────┼───────────────┼────────────────┼─────────┼───────┼─────────┼─────────┤
        │ 10.126.126.7:51838 │ 10.147.223.128:22 │ 2025-02-07 10:39:08 UTC │ Connected     │ Quic           │ 1.2 MiB │ 512 B │ 21.5    │ 3       │
        ├────────────────────┼───────────────────┼─────────────────────────┼───────────────┼────────────────┼─────────┼───────┼─────────┼─────────┤
        │ 0.0.0.0:0          │ 10.147.223.1:80   │ 2025-02-07 10:41:28 UTC │ ConnectingDst │ Kcp            │ -       │ -     │ -       │ -       │
        └────────────────────┴───────────────────┴─────────────────────────┴───────────────┴────────────────┴─────────┴───────┴─────────┴─────────┘""")


PEERS = [
    {"peer_id": 1234567, "ipv4": "10.144.144.2/24", "hostname": "node-b", "tunnel": "udp",
     "remote_addr": "198.18.0.2:11010", "latency_ms": 1.234, "loss_rate": 0.025, "rx_bytes": 2048,
     "tx_bytes": 3 * 1024**3, "version": "2.6.4-pytier", "cost": 1},
    {"peer_id": 7, "ipv4": None, "hostname": "et", "tunnel": "tcp", "remote_addr": "198.18.0.3:11010",
     "latency_ms": None, "loss_rate": None, "rx_bytes": 0, "tx_bytes": 0},
]


def test_peer_view_has_easytiers_columns() -> None:
    assert render(("peer",), PEERS, "table") == textwrap.dedent("""\
        ┌─────────────────┬──────────┬──────┬─────────┬──────┬─────────┬─────────┬────────┬──────────────┬─────────┬──────────────────┐
        │ ipv4            │ hostname │ cost │ lat(ms) │ loss │ rx      │ tx      │ tunnel │ version      │ peer_id │ remote_addr      │
        ├─────────────────┼──────────┼──────┼─────────┼──────┼─────────┼─────────┼────────┼──────────────┼─────────┼──────────────────┤
        │ 10.144.144.2/24 │ node-b   │ p2p  │ 1.23    │ 2.5% │ 2.0 KiB │ 3.0 GiB │ udp    │ 2.6.4-pytier │ 1234567 │ 198.18.0.2:11010 │
        ├─────────────────┼──────────┼──────┼─────────┼──────┼─────────┼─────────┼────────┼──────────────┼─────────┼──────────────────┤
        │ -               │ et       │ -    │ -       │ -    │ 0 B     │ 0 B     │ tcp    │ -            │ 7       │ 198.18.0.3:11010 │
        └─────────────────┴──────────┴──────┴─────────┴──────┴─────────┴─────────┴────────┴──────────────┴─────────┴──────────────────┘""")


def test_peer_view_narrow_drops_the_least_useful_columns() -> None:
    assert render(("peer",), PEERS, "table", width=60) == textwrap.dedent("""\
        ┌─────────────────┬──────────┬──────┬─────────┬──────┐
        │ ipv4            │ hostname │ cost │ lat(ms) │ loss │
        ├─────────────────┼──────────┼──────┼─────────┼──────┤
        │ 10.144.144.2/24 │ node-b   │ p2p  │ 1.23    │ 2.5% │
        ├─────────────────┼──────────┼──────┼─────────┼──────┤
        │ -               │ et       │ -    │ -       │ -    │
        └─────────────────┴──────────┴──────┴─────────┴──────┘""")


ROUTES = [
    {"peer_id": 11, "ipv4": "10.144.144.2/24", "hostname": "b", "next_hop_peer_id": 11,
     "next_hop_hostname": "b", "next_hop_ipv4": "10.144.144.2/24", "next_hop_latency_ms": 0.5, "cost": 1,
     "path_latency_ms": 0.5, "proxy_cidrs": [], "features": ["kcp_input", "quic_input"], "version": "2.6.4"},
    {"peer_id": 12, "ipv4": "10.144.144.3/24", "hostname": "c", "next_hop_peer_id": 11,
     "next_hop_hostname": "b", "next_hop_ipv4": "10.144.144.2/24", "next_hop_latency_ms": 0.5, "cost": 2,
     "path_latency_ms": None, "proxy_cidrs": ["192.168.50.0/24", "192.168.51.0/24"], "features": []},
    {"peer_id": 13},
]


def test_route_view() -> None:
    assert render(("route",), ROUTES, "table") == textwrap.dedent("""\
        ┌─────────────────┬──────────┬─────────────────────────────────┬───────────────┬───────────────────┬──────────────────┬──────────┬──────────────┬─────────┬─────────┬──────────────────────┐
        │ ipv4            │ hostname │ proxy_cidrs                     │ next_hop_ipv4 │ next_hop_hostname │ next_hop_lat(ms) │ path_len │ path_lat(ms) │ version │ peer_id │ features             │
        ├─────────────────┼──────────┼─────────────────────────────────┼───────────────┼───────────────────┼──────────────────┼──────────┼──────────────┼─────────┼─────────┼──────────────────────┤
        │ 10.144.144.2/24 │ b        │ -                               │ DIRECT        │ b                 │ 0.50             │ 1        │ 0.50         │ 2.6.4   │ 11      │ kcp_input,quic_input │
        ├─────────────────┼──────────┼─────────────────────────────────┼───────────────┼───────────────────┼──────────────────┼──────────┼──────────────┼─────────┼─────────┼──────────────────────┤
        │ 10.144.144.3/24 │ c        │ 192.168.50.0/24,192.168.51.0/24 │ 10.144.144.2  │ b                 │ 0.50             │ 2        │ -            │ -       │ 12      │ -                    │
        ├─────────────────┼──────────┼─────────────────────────────────┼───────────────┼───────────────────┼──────────────────┼──────────┼──────────────┼─────────┼─────────┼──────────────────────┤
        │ -               │ -        │ -                               │ -             │ -                 │ -                │ -        │ -            │ -       │ 13      │ -                    │
        └─────────────────┴──────────┴─────────────────────────────────┴───────────────┴───────────────────┴──────────────────┴──────────┴──────────────┴─────────┴─────────┴──────────────────────┘""")


def test_route_view_narrow_cuts_long_cells() -> None:
    assert render(("route",), ROUTES, "table", width=80) == textwrap.dedent("""\
        ┌─────────────────┬──────────┬──────────────────────┬───────────────┬──────────┐
        │ ipv4            │ hostname │ proxy_cidrs          │ next_hop_ipv4 │ path_len │
        ├─────────────────┼──────────┼──────────────────────┼───────────────┼──────────┤
        │ 10.144.144.2/24 │ b        │ -                    │ DIRECT        │ 1        │
        ├─────────────────┼──────────┼──────────────────────┼───────────────┼──────────┤
        │ 10.144.144.3/24 │ c        │ 192.168.50.0/24,192… │ 10.144.144.2  │ 2        │
        ├─────────────────┼──────────┼──────────────────────┼───────────────┼──────────┤
        │ -               │ -        │ -                    │ -             │ -        │
        └─────────────────┴──────────┴──────────────────────┴───────────────┴──────────┘""")


def test_node_and_stats_views() -> None:
    node = {"hostname": "a", "peer_id": 99, "ipv4": "10.144.144.1/24", "network_name": "net",
            "instance_name": "default", "dev_name": "pytier0", "mtu": 1360,
            "listeners": ["udp://0.0.0.0:11010", "tcp://0.0.0.0:11010"], "features": ["kcp_input"],
            "version": "0.1.0", "uptime_s": 3725.4, "extra": "x\ny"}
    assert render(("node",), node, "table") == textwrap.dedent("""\
        ┌───────────────┬─────────────────────────────────────────┐
        │ key           │ value                                   │
        ├───────────────┼─────────────────────────────────────────┤
        │ peer_id       │ 99                                      │
        ├───────────────┼─────────────────────────────────────────┤
        │ ipv4          │ 10.144.144.1/24                         │
        ├───────────────┼─────────────────────────────────────────┤
        │ hostname      │ a                                       │
        ├───────────────┼─────────────────────────────────────────┤
        │ network_name  │ net                                     │
        ├───────────────┼─────────────────────────────────────────┤
        │ instance_name │ default                                 │
        ├───────────────┼─────────────────────────────────────────┤
        │ dev_name      │ pytier0                                 │
        ├───────────────┼─────────────────────────────────────────┤
        │ mtu           │ 1360                                    │
        ├───────────────┼─────────────────────────────────────────┤
        │ listeners     │ udp://0.0.0.0:11010,tcp://0.0.0.0:11010 │
        ├───────────────┼─────────────────────────────────────────┤
        │ features      │ kcp_input                               │
        ├───────────────┼─────────────────────────────────────────┤
        │ version       │ 0.1.0                                   │
        ├───────────────┼─────────────────────────────────────────┤
        │ uptime_s      │ 1h 2m 5s                                │
        ├───────────────┼─────────────────────────────────────────┤
        │ extra         │ x y                                     │
        └───────────────┴─────────────────────────────────────────┘""")
    assert render(("stats",), {"tx_packets": 5, "rx_packets": 7}, "table") == textwrap.dedent("""\
        ┌────────────┬───────┐
        │ counter    │ value │
        ├────────────┼───────┤
        │ rx_packets │ 7     │
        ├────────────┼───────┤
        │ tx_packets │ 5     │
        └────────────┴───────┘""")


def test_json_output_is_the_result() -> None:
    assert render(("stats",), {"a": 1}, "json") == '{\n  "a": 1\n}'
    assert render(("peer",), [], "json") == "[]"
    assert render(("connector", "add"), {"url": "tcp://198.18.0.2:11010"}, "json") == (
        '{\n  "url": "tcp://198.18.0.2:11010"\n}')
    # Prometheus' format is text whatever -o says.
    assert render(("stats", "prometheus"), "pytier_up 1\n", "json") == "pytier_up 1"


@pytest.mark.parametrize(("command", "result"), [
    (("peer",), {"x": 1}), (("proxy",), [1]), (("node",), []), (("stats",), None), (("peer-center",), [{"direct_peers": 3}]),
    (("peer-center",), [{"direct_peers": [1]}]), (("connector",), {}), (("connector", "add"), []),
    (("logger", "set"), "debug"), (("stats", "prometheus"), {}),
])
def test_malformed_results_are_refused(command: tuple[str, ...], result: object) -> None:
    with pytest.raises(ViewError):
        render(command, result, "table")


def test_peer_center_connector_and_logger_views() -> None:
    center = [
        {"peer_id": 1, "hostname": "a", "ipv4": "10.144.144.1/24",
         "direct_peers": [{"peer_id": 2, "hostname": "b", "latency_ms": 0.613}]},
        {"peer_id": 2, "hostname": "b", "ipv4": "10.144.144.2/24",
         "direct_peers": [{"peer_id": 1, "hostname": "a", "latency_ms": None}, {"peer_id": 3, "hostname": "c"}]},
        {"peer_id": 3, "hostname": "c", "ipv4": None, "direct_peers": []},
    ]
    assert render(("peer-center",), center, "table") == textwrap.dedent("""\
        ┌─────────┬──────────┬─────────────────┬──────────────┐
        │ peer_id │ hostname │ ipv4            │ direct_peers │
        ├─────────┼──────────┼─────────────────┼──────────────┤
        │ 1       │ a        │ 10.144.144.1/24 │ b(2) 0.61ms  │
        ├─────────┼──────────┼─────────────────┼──────────────┤
        │ 2       │ b        │ 10.144.144.2/24 │ a(1), c(3)   │
        ├─────────┼──────────┼─────────────────┼──────────────┤
        │ 3       │ c        │ -               │ -            │
        └─────────┴──────────┴─────────────────┴──────────────┘""")
    connectors = [{"url": "tcp://198.18.0.2:11010", "state": "connected", "peer_id": 5, "last_error": None},
                  {"url": "udp://198.18.0.9:11010", "state": "connecting", "last_error": "timed out"}]
    assert render(("connector", "list"), connectors, "table") == textwrap.dedent("""\
        ┌────────────────────────┬────────────┬─────────┬────────────┐
        │ url                    │ state      │ peer_id │ last_error │
        ├────────────────────────┼────────────┼─────────┼────────────┤
        │ tcp://198.18.0.2:11010 │ connected  │ 5       │ -          │
        ├────────────────────────┼────────────┼─────────┼────────────┤
        │ udp://198.18.0.9:11010 │ connecting │ -       │ timed out  │
        └────────────────────────┴────────────┴─────────┴────────────┘""")
    assert render(("connector",), connectors, "table") == render(("connector", "list"), connectors, "table")
    assert render(("connector", "add"), connectors[1], "table") == (
        "connector udp://198.18.0.9:11010 added (connecting)")
    assert render(("connector", "remove"), connectors[0], "table") == (
        "connector tcp://198.18.0.2:11010 removed (connected)")
    levels = {"console": "debug", "file": "debug", "file_path": "/var/log/pytier/pytier.log"}
    assert render(("logger", "set"), levels, "table") == "console: debug\nfile: debug (/var/log/pytier/pytier.log)"
    assert render(("logger",), {"console": "info", "file": "off", "file_path": None}, "table") == (
        "console: info\nfile: off (no log file: see --file-log-level)")
    assert json.loads(render(("logger", "get"), levels, "json")) == levels


# ---------------------------------------------------------------------------------------------
# Narrow terminals


def test_output_width_follows_columns_then_the_terminal() -> None:
    # `watch` runs us with a pipe for stdout and its window's width in COLUMNS.
    assert output_width({"COLUMNS": "72"}, False, None) == 72
    assert output_width({"COLUMNS": "72"}, True, 200) == 72
    assert output_width({}, True, 100) == 100
    # Into a pipe or a file, nothing is cut.
    assert output_width({}, False, None) is None
    assert output_width({"COLUMNS": ""}, False, None) is None
    assert output_width({"COLUMNS": "wide"}, True, 90) == 90
    assert output_width({"COLUMNS": "0"}, False, None) is None


def test_fit_table_drops_optional_columns_in_order_then_cuts() -> None:
    headers = ["name", "note", "id", "extra"]
    rows = [["alpha", "a long remark about it", "17", "x"], ["b", "short", "3", "y"]]
    assert fit_table(headers, rows, None, ("extra", "id")) == (headers, rows)
    wide = table_width([5, 22, 2, 5])
    assert wide == 47
    assert fit_table(headers, rows, wide, ("extra", "id")) == (headers, rows)
    # One column short: the first optional column goes, and only that one.
    assert fit_table(headers, rows, wide - 1, ("extra", "id")) == (
        ["name", "note", "id"], [["alpha", "a long remark about it", "17"], ["b", "short", "3"]])
    # No optional columns left: the widest is cut, with an ellipsis, to fit exactly.
    h, r = fit_table(headers, rows, 30, ("extra", "id"))
    assert h == ["name", "note"] and r == [["alpha", "a long remark abo…"], ["b", "short"]]
    assert table_width([5, 18]) == 30 == max(display_width(line) for line in render_table(h, r).splitlines())
    # The first column names the row: the others are cut before it.
    h, r = fit_table(["address", "note"], [["10.144.144.100", "a long remark about it"]], 30)
    assert r == [["10.144.144.100", "a long r…"]]
    # Columns are cut no further than MIN_COLUMN; a table that still does not fit stays that wide.
    h, r = fit_table(["identifier", "description"], [["abcdefghij", "x" * 40]], 10)
    assert [display_width(c) for c in h] == [MIN_COLUMN, MIN_COLUMN] and r == [["abcd…", "xxxx…"]]


def test_truncate_counts_terminal_columns() -> None:
    assert truncate("abcdef", 6) == "abcdef"
    assert truncate("abcdef", 5) == "abcd…"
    assert truncate("节点节点", 5) == "节点…"
    assert display_width(truncate("节点节点", 4)) <= 4


def test_cli_prints_whole_tables_into_a_pipe_and_narrow_ones_under_watch() -> None:
    from pytier.cli.client import _width

    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    probe = "import sys; from pytier.cli.client import _width; print(_width(sys.argv[1] == 'no-trunc'))"
    piped = subprocess.run([sys.executable, "-c", probe, "-"], capture_output=True, text=True, env=env, timeout=30)
    assert piped.stdout == "None\n"
    watched = subprocess.run([sys.executable, "-c", probe, "-"], capture_output=True, text=True,
                             env={**env, "COLUMNS": "64"}, timeout=30)
    assert watched.stdout == "64\n"
    no_trunc = subprocess.run([sys.executable, "-c", probe, "no-trunc"], capture_output=True, text=True,
                              env={**env, "COLUMNS": "64"}, timeout=30)
    assert no_trunc.stdout == "None\n"
    assert _width(True) is None


def test_humanising() -> None:
    assert [human_bytes(n) for n in (0, 1023, 1024, 1536, 1258291, 1024**3 - 1, 5 * 1024**4, 2**60)] == [
        "0 B", "1023 B", "1.0 KiB", "1.5 KiB", "1.2 MiB", "1.0 GiB", "5.0 TiB", "1048576.0 TiB"]
    assert human_bytes(None) == "-"
    assert [human_duration(s) for s in (0, 59.9, 61, 3600, 90061)] == ["0s", "59s", "1m 1s", "1h 0m 0s",
                                                                       "1d 1h 1m 1s"]


# ---------------------------------------------------------------------------------------------
# pytier-cli usage errors (its talks with a node are in test_mgmt.py)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["peers"], "argument COMMAND: invalid choice: 'peers'"),
        (["-o", "yaml", "peer"], "argument -o/--output: invalid choice: 'yaml'"),
        (["peer", "-o", "xml"], "argument -o/--output: invalid choice: 'xml'"),
        (["--rpc-portal", "127.0.0.1", "peer"], "'127.0.0.1' has no port"),
        (["-p", "127.0.0.1:0", "peer"], "invalid address '127.0.0.1:0'"),
        (["--timeout", "0", "peer"], "invalid timeout '0'"),
        (["peer", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_cli_usage_errors_are_one_line_and_exit_2(argv: list[str], message: str) -> None:
    result = subprocess.run([CLI, *argv], capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stdout) == (2, "")
    [line] = result.stderr.splitlines()
    assert line.startswith("pytier-cli: error: ")
    assert message in line


def test_cli_help_and_version() -> None:
    result = subprocess.run([CLI, "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    for word in ("peer", "route", "node", "proxy", "stats", "--rpc-portal", "--output", "--no-trunc"):
        assert word in result.stdout
    # Every command and action, with its arguments and its help.
    for words, command in COMMANDS.items():
        assert f"{' '.join([*words, *(a.usage for a in command.args)])}  " in result.stdout, words
        assert command.help in result.stdout
    for local in LOCAL_COMMANDS.values():
        assert local.usage in result.stdout
    result = subprocess.run([CLI, "--version"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stdout.startswith("pytier-cli ")


# ---------------------------------------------------------------------------------------------
# pytier-core's run loop, with stand-ins for the node


def test_run_returns_the_node_exit_code() -> None:
    async def node(config: Config) -> int:
        await asyncio.sleep(0)
        return 3 if config.network_name == "n" else 4

    assert run(Config(network_name="n"), node) == 3


def test_user_error_is_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    async def node(config: Config) -> int:
        raise UserError("cannot open udp://0.0.0.0:11010: address already in use")

    assert run(Config(), node) == 1
    captured = capsys.readouterr()
    assert captured.err == "pytier-core: error: cannot open udp://0.0.0.0:11010: address already in use\n"


def test_log_format() -> None:
    stream = io.StringIO()
    try:
        setup_logging("warn", stream)
        logging.getLogger("pytier.peers").info("hidden")
        logging.getLogger("pytier.peers").warning("peer %s down", 7)
        logging.getLogger("asyncio").warning("shown too")
    finally:
        root = logging.getLogger()
        root.handlers.clear()
        root.setLevel(logging.WARNING)
        for name in ("asyncio", "quic", "pyroute2"):
            logging.getLogger(name).setLevel(logging.NOTSET)
        logging.addLevelName(logging.WARNING, "WARNING")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d WARN pytier\.peers: peer 7 down", lines[0])
    assert lines[1].endswith(" WARN asyncio: shown too")


def _reset_logging() -> None:
    root = logging.getLogger()
    for handler in root.handlers:
        handler.close()
    root.handlers.clear()
    root.setLevel(logging.WARNING)
    for name in ("asyncio", "quic", "pyroute2"):
        logging.getLogger(name).setLevel(logging.NOTSET)
    logging.addLevelName(logging.WARNING, "WARNING")


def test_log_file_has_the_stderr_format_rotates_and_changes_level(tmp_path: Path) -> None:
    stream = io.StringIO()
    path = tmp_path / "logs" / "node.log"
    log = logging.getLogger("pytier.test")
    try:
        logs = setup_logging("warn", stream, file_log=FileLog(path, 2048, 2), file_level="debug")
        assert logs.levels() == {"console": "warn", "file": "debug", "file_path": str(path)}
        log.debug("only in the file")
        log.warning("in both")
        logging.getLogger("asyncio").debug("a chatty library, shown at trace only")
        first = path.read_text().splitlines()
        assert len(first) == 2 and first[0].endswith(" DEBUG pytier.test: only in the file")
        assert stream.getvalue().splitlines() == [first[1]]
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d WARN pytier\.test: in both", first[1])
        for i in range(200):
            log.info("line %03d %s", i, "x" * 40)
        # 2 KiB a file: the current one and two older ones are kept, the oldest lines are gone.
        assert sorted(p.name for p in path.parent.iterdir()) == ["node.log", "node.log.1", "node.log.2"]
        assert all(p.stat().st_size <= 2048 for p in path.parent.iterdir())
        assert "line 199" in path.read_text() and "line 000" not in (path.parent / "node.log.2").read_text()
        assert logs.set_level("ERROR") == {"console": "error", "file": "error", "file_path": str(path)}
        log.warning("hidden now")
        assert "hidden now" not in path.read_text() + stream.getvalue()
        logs.set_level("trace")
        logging.getLogger("asyncio").debug("shown at trace")
        assert "DEBUG asyncio: shown at trace" in path.read_text() and "shown at trace" in stream.getvalue()
        with pytest.raises(ValueError, match="invalid log level 'loud'"):
            logs.set_level("loud")
    finally:
        _reset_logging()


def test_file_level_off_means_no_file(tmp_path: Path) -> None:
    try:
        logs = setup_logging("info", io.StringIO(), file_log=FileLog(tmp_path / "x.log", 4096, 1), file_level="off")
        logging.getLogger("pytier.test").warning("to stderr only")
        assert logs.levels() == {"console": "info", "file": "off", "file_path": None}
        assert list(tmp_path.iterdir()) == []
        # A later change of level opens no file either.
        logs.set_level("debug")
        assert logs.levels()["file"] == "off" and list(tmp_path.iterdir()) == []
    finally:
        _reset_logging()


def test_unwritable_log_file_is_one_error_line(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    result = subprocess.run([str(Path(sys.executable).parent / "pytier-core"), "--file-log-level", "info",
                             "--file-log-dir", str(blocker)], capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (f"pytier-core: error: cannot open the log file {blocker}/pytier.log: "
                             "Not a directory\n")


STAND_IN = """
import asyncio, sys
from pytier.cli.core import run, setup_logging
from pytier.config import Config

async def node(config):
    print("ready", flush=True)
    try:
        await asyncio.sleep(60)
    finally:
        await asyncio.sleep(0.01)  # cleanup may await
        print("cleaned up", flush=True)
    return 5

setup_logging("info")
sys.exit(run(Config(), node))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_shuts_down_cleanly(sig: signal.Signals) -> None:
    proc = subprocess.Popen([sys.executable, "-c", STAND_IN], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        os.kill(proc.pid, sig)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert out == "cleaned up\n"
    assert re.fullmatch(rf"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d INFO pytier\.core: {sig.name} received, shutting down\n",
                        err), err
