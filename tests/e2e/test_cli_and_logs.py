"""pytier-cli against real nodes A - B - C in namespaces: EasyTier's columns with real values, connectors
added and removed at run time, the log level changed at run time, and a log file that rotates."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pytier.testbed.netns import Testbed
from pytier.testbed.nodes import BIN, PytierNode, wait_for

NET = ["--network-name", "demo", "--network-secret", "s3"]
CLI = str(BIN / "pytier-cli")
LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (TRACE|DEBUG|INFO|WARN|ERROR) [\w.]+: .*")
B_URL = "udp://198.18.2.2:11010"
NOWHERE = "tcp://198.18.9.9:11010"  # no route from C: each attempt fails at once, with a warning


def cli(node: PytierNode, *argv: str, columns: int | None = None,
        check: bool = True) -> tuple[int, str, str]:
    env = ["env", "-u", "COLUMNS"] if columns is None else ["env", f"COLUMNS={columns}"]
    result = node.ns.run([*env, CLI, *argv], check=check)
    return result.returncode, result.stdout, result.stderr


def cli_json(node: PytierNode, *argv: str) -> Any:
    return json.loads(cli(node, "-o", "json", *argv)[1])


def test_columns_connectors_log_level_and_rotation(testbed: Testbed, tmp_path: Path) -> None:
    a, b, c = testbed.netns("a"), testbed.netns("b"), testbed.netns("c")
    testbed.veth(a, b, "198.18.1.1/24", "198.18.1.2/24")
    testbed.veth(b, c, "198.18.2.2/24", "198.18.2.3/24")
    na = PytierNode(testbed, a, [*NET, "-i", "10.144.144.1/24", "-l", "udp://0.0.0.0:11010", "--no-tun",
                                 "-n", "192.168.77.0/24"], name="node-a").start()
    # B drops a silent peer after 3 s: it sees C go once C really stops sending.
    nb = PytierNode(testbed, b, [*NET, "-i", "10.144.144.2/24", "-l", "udp://0.0.0.0:11010", "--no-tun",
                                 "-p", "udp://198.18.1.1:11010", "--peer-timeout", "3"],
                    name="node-b").start()
    logs = tmp_path / "logs"
    nc = PytierNode(testbed, c, [*NET, "-i", "10.144.144.3/24", "--no-listener", "--no-tun",
                                 "--file-log-level", "info", "--file-log-dir", str(logs),
                                 "--file-log-size", "1K", "--file-log-count", "2"], name="node-c").start()
    log_file = logs / "pytier.log"
    assert cli_json(nc, "connector") == [] and cli_json(nc, "peer") == []

    # A peer added at run time comes up, and C learns A through B.
    assert cli(nc, "connector", "add", B_URL)[1] == f"connector {B_URL} added (connecting)\n"
    nc.wait_route("10.144.144.1")
    wait_for(lambda: all(p["latency_ms"] for p in cli_json(nc, "peer")), 10, "C's first round trip to B")
    b_id = cli_json(nb, "node")["peer_id"]
    [conn] = cli_json(nc, "connector", "list")
    assert conn == {"url": B_URL, "state": "connected", "peer_id": b_id, "last_error": None}

    [peer] = cli_json(nc, "peer")
    assert (peer["ipv4"], peer["hostname"], peer["cost"], peer["tunnel"]) == ("10.144.144.2", "node-b", 1,
                                                                              "udp")
    assert peer["latency_ms"] > 0 and 0 <= peer["loss_rate"] <= 1
    assert peer["rx_bytes"] > 0 and peer["tx_bytes"] > 0
    assert peer["version"]
    routes = {r["hostname"]: r for r in cli_json(nc, "route")}
    to_a, to_b = routes["node-a"], routes["node-b"]
    assert (to_a["next_hop_ipv4"], to_a["next_hop_hostname"], to_a["cost"]) == ("10.144.144.2", "node-b", 2)
    assert to_a["proxy_cidrs"] == ["192.168.77.0/24"] and to_a["next_hop_latency_ms"] > 0
    assert to_a["path_latency_ms"] is None  # route sync carries no latencies
    assert to_b["cost"] == 1 and to_b["path_latency_ms"] > 0
    node_a = cli_json(na, "node")
    assert node_a["listeners"] == ["udp://0.0.0.0:11010"] and node_a["proxy_networks"] == ["192.168.77.0/24"]
    center = {r["hostname"]: {p["hostname"] for p in r["direct_peers"]} for r in cli_json(nc, "peer-center")}
    assert center == {"node-a": {"node-b"}, "node-b": {"node-a", "node-c"}, "node-c": {"node-b"}}

    # Whole tables into a pipe; narrow ones when COLUMNS says so, unless --no-trunc.
    _, table, _ = cli(nc, "route")
    assert "node-b" in table and "relay" not in table and "192.168.77.0/24" in table
    assert max(len(line) for line in table.splitlines()) > 100
    _, narrow, _ = cli(nc, "route", columns=60)
    assert max(len(line) for line in narrow.splitlines()) <= 60 and "10.144.144.1" in narrow
    _, whole, _ = cli(nc, "route", "--no-trunc", columns=60)
    assert whole.splitlines()[1] == table.splitlines()[1]  # every header, in full
    _, peers, _ = cli(nc, "peer")
    assert "p2p" in peers and "node-b" in peers

    # One-line errors.
    assert cli(nc, "connector", "add", B_URL, check=False) == (
        1, "", f"pytier-cli: error: connector {B_URL} is already present\n")
    assert cli(nc, "connector", "remove", NOWHERE, check=False) == (
        1, "", f"pytier-cli: error: connector {NOWHERE} is not present (see pytier-cli connector list)\n")
    code, _, err = cli(nc, "connector", "add", "ws://198.18.2.2:11010", check=False)
    assert code == 1 and err.count("\n") == 1
    assert err.startswith("pytier-cli: error: unsupported scheme 'ws://'")

    # The file takes what its level lets through, and follows `logger set`.
    assert cli(nc, "logger", "get")[1] == f"console: debug\nfile: info ({log_file})\n"
    assert f"connector {B_URL} added" in log_file.read_text()
    assert " DEBUG " not in log_file.read_text()
    levels = cli_json(nc, "logger", "set", "warn")
    assert levels == {"console": "warn", "file": "warn", "file_path": str(log_file)}
    cli(nc, "connector", "add", NOWHERE)
    wait_for(lambda: f"cannot connect to {NOWHERE}" in log_file.read_text(), 5, "the warning in the file")
    assert f"connector {NOWHERE} added" not in log_file.read_text() + nc.log()
    assert cli(nc, "logger", "set", "info")[1] == f"console: info\nfile: info ({log_file})\n"
    cli(nc, "connector", "remove", NOWHERE)
    assert f"connector {NOWHERE} removed" in log_file.read_text()

    # Removing the connector closes the link: C loses B, and A with it.
    assert cli(nc, "connector", "remove", B_URL)[1] == f"connector {B_URL} removed (connected)\n"
    wait_for(lambda: cli_json(nc, "peer") == [] and cli_json(nc, "route") == [], 10,
             "C to lose B and A")
    wait_for(lambda: "10.144.144.3" not in nb.route_ips(), 10, "B to drop C")
    assert cli_json(nc, "connector") == []

    # Enough lines to roll the 1 KiB file over more than twice: two older files are kept, no more.
    for _ in range(6):
        cli(nc, "connector", "add", NOWHERE)
        cli(nc, "connector", "remove", NOWHERE)
    wait_for(lambda: (logs / "pytier.log.2").exists(), 5, "the log file to rotate twice")
    files = sorted(p.name for p in logs.iterdir())
    assert files == ["pytier.log", "pytier.log.1", "pytier.log.2"]
    for path in logs.iterdir():
        text = path.read_text()
        assert 0 < len(text.encode()) <= 1024
        assert all(LINE.fullmatch(line) for line in text.splitlines()), text
    assert f"connector {NOWHERE} removed" in log_file.read_text()
    # The same lines, in the same format, went to stderr.
    last = log_file.read_text().splitlines()[-1]
    assert last in nc.log().splitlines()
