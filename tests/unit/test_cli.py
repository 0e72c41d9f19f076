"""pytier-cli's tables and usage errors, and pytier-core's run loop (exit codes, signals, log format)."""
# ruff: noqa: E501  (expected tables are written out whole, as a user sees them)

from __future__ import annotations

import asyncio
import io
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pytier.cli.client import render
from pytier.cli.core import run, setup_logging
from pytier.cli.table import render_table
from pytier.cli.views import ViewError, human_bytes, human_duration
from pytier.config import Config
from pytier.errors import UserError

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
    assert render("proxy", result, "table") == textwrap.dedent("""\
        ┌────────────────────┬───────────────────┬─────────────────────────┬───────────────┬────────────────┬─────────┬───────┬─────────┬─────────┐
        │ src                │ dst               │ start_time              │ state         │ transport_type │ rx      │ tx    │ rtt(ms) │ retrans │
        ├────────────────────┼───────────────────┼─────────────────────────┼───────────────┼────────────────┼─────────┼───────┼─────────┼─────────┤
        │ 10.126.126.7:51838 │ 10.147.223.128:22 │ 2025-02-07 10:39:08 UTC │ Connected     │ Quic           │ 1.2 MiB │ 512 B │ 21.5    │ 3       │
        ├────────────────────┼───────────────────┼─────────────────────────┼───────────────┼────────────────┼─────────┼───────┼─────────┼─────────┤
        │ 0.0.0.0:0          │ 10.147.223.1:80   │ 2025-02-07 10:41:28 UTC │ ConnectingDst │ Kcp            │ -       │ -     │ -       │ -       │
        └────────────────────┴───────────────────┴─────────────────────────┴───────────────┴────────────────┴─────────┴───────┴─────────┴─────────┘""")


def test_peer_view() -> None:
    result = [
        {"peer_id": 1234567, "ipv4": "10.144.144.2/24", "hostname": "node-b", "tunnel": "udp",
         "remote_addr": "198.18.0.2:11010", "latency_ms": 1.234, "loss_rate": 0.025, "rx_bytes": 2048,
         "tx_bytes": 3 * 1024**3, "version": "0.1.0"},
        {"peer_id": 7, "ipv4": None, "hostname": "et", "tunnel": "tcp", "remote_addr": "198.18.0.3:11010",
         "latency_ms": None, "loss_rate": None, "rx_bytes": 0, "tx_bytes": 0},
    ]
    assert render("peer", result, "table") == textwrap.dedent("""\
        ┌─────────────────┬──────────┬─────────┬────────┬──────────────────┬─────────┬──────┬─────────┬─────────┐
        │ ipv4            │ hostname │ peer_id │ tunnel │ remote_addr      │ lat(ms) │ loss │ rx      │ tx      │
        ├─────────────────┼──────────┼─────────┼────────┼──────────────────┼─────────┼──────┼─────────┼─────────┤
        │ 10.144.144.2/24 │ node-b   │ 1234567 │ udp    │ 198.18.0.2:11010 │ 1.23    │ 2.5% │ 2.0 KiB │ 3.0 GiB │
        ├─────────────────┼──────────┼─────────┼────────┼──────────────────┼─────────┼──────┼─────────┼─────────┤
        │ -               │ et       │ 7       │ tcp    │ 198.18.0.3:11010 │ -       │ -    │ 0 B     │ 0 B     │
        └─────────────────┴──────────┴─────────┴────────┴──────────────────┴─────────┴──────┴─────────┴─────────┘""")


def test_route_view() -> None:
    result = [
        {"peer_id": 11, "ipv4": "10.144.144.2/24", "hostname": "b", "next_hop_peer_id": 11,
         "next_hop_hostname": "b", "cost": 1, "proxy_cidrs": [], "features": ["kcp_input", "quic_input"]},
        {"peer_id": 12, "ipv4": "10.144.144.3/24", "hostname": "c", "next_hop_peer_id": 11,
         "next_hop_hostname": "b", "cost": 2, "proxy_cidrs": ["192.168.50.0/24", "192.168.51.0/24"],
         "features": []},
        {"peer_id": 13},
    ]
    assert render("route", result, "table") == textwrap.dedent("""\
        ┌─────────────────┬──────────┬─────────┬──────────┬──────┬─────────────────────────────────┬──────────────────────┐
        │ ipv4            │ hostname │ peer_id │ next_hop │ cost │ proxy_cidrs                     │ features             │
        ├─────────────────┼──────────┼─────────┼──────────┼──────┼─────────────────────────────────┼──────────────────────┤
        │ 10.144.144.2/24 │ b        │ 11      │ DIRECT   │ 1    │ -                               │ kcp_input,quic_input │
        ├─────────────────┼──────────┼─────────┼──────────┼──────┼─────────────────────────────────┼──────────────────────┤
        │ 10.144.144.3/24 │ c        │ 12      │ b (11)   │ 2    │ 192.168.50.0/24,192.168.51.0/24 │ -                    │
        ├─────────────────┼──────────┼─────────┼──────────┼──────┼─────────────────────────────────┼──────────────────────┤
        │ -               │ -        │ 13      │ -        │ -    │ -                               │ -                    │
        └─────────────────┴──────────┴─────────┴──────────┴──────┴─────────────────────────────────┴──────────────────────┘""")


def test_node_and_stats_views() -> None:
    node = {"hostname": "a", "peer_id": 99, "ipv4": "10.144.144.1/24", "network_name": "net",
            "instance_name": "default", "dev_name": "pytier0", "mtu": 1360,
            "listeners": ["udp://0.0.0.0:11010", "tcp://0.0.0.0:11010"], "features": ["kcp_input"],
            "version": "0.1.0", "uptime_s": 3725.4, "extra": "x\ny"}
    assert render("node", node, "table") == textwrap.dedent("""\
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
    assert render("stats", {"tx_packets": 5, "rx_packets": 7}, "table") == textwrap.dedent("""\
        ┌────────────┬───────┐
        │ counter    │ value │
        ├────────────┼───────┤
        │ rx_packets │ 7     │
        ├────────────┼───────┤
        │ tx_packets │ 5     │
        └────────────┴───────┘""")


def test_json_output_is_the_result() -> None:
    assert render("stats", {"a": 1}, "json") == '{\n  "a": 1\n}'
    assert render("peer", [], "json") == "[]"


@pytest.mark.parametrize(("command", "result"), [("peer", {"x": 1}), ("proxy", [1]), ("node", []),
                                                 ("stats", None)])
def test_malformed_results_are_refused(command: str, result: object) -> None:
    with pytest.raises(ViewError):
        render(command, result, "table")


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
    for word in ("peer", "route", "node", "proxy", "stats", "--rpc-portal", "--output"):
        assert word in result.stdout
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
