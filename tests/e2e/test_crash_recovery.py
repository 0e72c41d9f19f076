"""kill -9 of a real pytier-core with a TUN device, a proxied subnet (nft table and forwarding sysctl)
and a peer; the next start with the same settings removes what it left and comes up cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from pytier.testbed.netns import Netns, Testbed
from pytier.testbed.nodes import BIN, PytierNode, wait_for
from pytier.testbed.ping import ping

NET = ["--network-name", "crash", "--network-secret", "s3"]
LAN_B = "198.19.78.0/24"  # behind B: B's nft masquerade and forwarding sysctl
LAN_A = "198.19.79.0/24"  # exported by A: a route via B's TUN device
DEV = "ptcrash0"
TABLE = f"pytier_{DEV}"


def _sysctl(ns: Netns) -> str:
    return str(ns.run(["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip())


def _state_files(state_dir: Path) -> list[Path]:
    return sorted(state_dir.glob("*.json"))


def test_kill_9_then_restart_removes_the_leftovers(testbed: Testbed, tmp_path: Path) -> None:
    a, b, h = testbed.netns("a"), testbed.netns("b"), testbed.netns("h")
    testbed.veth(a, b, "198.18.2.1/24", "198.18.2.2/24")
    testbed.veth(b, h, "198.19.78.1/24", "198.19.78.2/24")
    h.run(["ip", "route", "add", "default", "via", "198.19.78.1"])
    state_dir = tmp_path / "state"
    forward_before = _sysctl(b)
    assert forward_before == "0"
    # A short peer timeout: A drops the killed node (it never said goodbye) soon after.
    na = PytierNode(testbed, a, [*NET, "-i", "10.144.146.1/24", "-l", "udp://0.0.0.0:11010",
                                 "--peer-timeout", "3", "--proxy-networks", LAN_A,
                                 "--state-dir", str(state_dir / "a")],
                    name="node-a").start()
    args_b = [*NET, "-i", "10.144.146.2/24", "--no-listener", "-p", "udp://198.18.2.1:11010",
              "--proxy-networks", LAN_B, "--dev-name", DEV, "--state-dir", str(state_dir / "b")]
    nb = PytierNode(testbed, b, args_b, name="node-b").start()
    na.wait_route("10.144.146.2")
    wait_for(lambda: LAN_A in b.run(["ip", "route", "show", "dev", DEV]).stdout, 10, "B's route to A's LAN")

    [state_file] = _state_files(state_dir / "b")
    record = json.loads(state_file.read_text())
    assert nb.proc is not None and record["pid"] == nb.proc.pid
    assert (record["tun"], record["routes"], record["nft_tables"]) == (DEV, [LAN_A], [f"ip {TABLE}"])
    assert record["sysctls"] == {"/proc/sys/net/ipv4/ip_forward": ["0", "1"]}

    os.kill(nb.proc.pid, signal.SIGKILL)
    nb.proc.wait(10)
    # What a killed node really leaves: the state file, its nft table and the sysctl. Its TUN device
    # went with the process's last descriptor (and the device's routes with it).
    assert state_file.exists()
    assert TABLE in b.run(["nft", "list", "tables"]).stdout
    assert _sysctl(b) == "1"
    assert b.run(["ip", "link", "show", DEV], check=False).returncode != 0
    # A device that outlives the process (persistent, as a TUN some tool made so) with the route on it.
    b.run(["ip", "tuntap", "add", "mode", "tun", "name", DEV])
    b.run(["ip", "link", "set", DEV, "up"])
    b.run(["ip", "route", "add", LAN_A, "dev", DEV])

    nb2 = PytierNode(testbed, b, args_b, name="node-b2").start()
    log = nb2.log()
    assert f"pytier-core pid {record['pid']} (instance 'default') ended without cleaning up" in log
    for line in (f"removed route {LAN_A} via {DEV}", f"removed TUN device {DEV}",
                 f"removed nft table ip {TABLE}", "restored net.ipv4.ip_forward=0 (it was left at 1)"):
        assert line in log
    na.wait_route("10.144.146.2")
    wait_for(lambda: ping("10.144.146.2", count=1, timeout=1, netns=a).received == 1, 15,
             "a ping from A to B through the tunnel")
    assert ping("198.19.78.2", count=3, interval=0.2, timeout=2, netns=a).received >= 2  # B's LAN
    wait_for(lambda: LAN_A in b.run(["ip", "route", "show", "dev", DEV]).stdout, 10, "B's route to A's LAN")
    # Nothing twice: one masquerade rule, one route, one address, one state file (the new node's).
    assert b.run(["nft", "list", "table", "ip", TABLE]).stdout.count("masquerade") == 1
    assert b.run(["ip", "route", "show", "dev", DEV]).stdout.count(LAN_A) == 1
    assert b.run(["ip", "-4", "addr", "show", "dev", DEV]).stdout.count("inet ") == 1
    [state_file2] = _state_files(state_dir / "b")
    assert nb2.proc is not None and json.loads(state_file2.read_text())["pid"] == nb2.proc.pid

    assert nb2.stop() == 0
    assert b.run(["ip", "link", "show", DEV], check=False).returncode != 0
    assert TABLE not in b.run(["nft", "list", "tables"]).stdout
    assert _sysctl(b) == forward_before
    assert _state_files(state_dir / "b") == []
    for node in (nb, nb2, na):
        assert "Traceback" not in node.log()


_HOLD_TUN = """
import sys
from pytier.tun.device import TunDevice
tun = TunDevice.open(sys.argv[1]); print("held", flush=True); sys.stdin.read()
"""


def _core(ns: Netns, args: list[str]) -> subprocess.CompletedProcess[str]:
    return ns.run([str(BIN / "pytier-core"), *args], check=False, timeout=20)


def test_a_live_owner_is_refused_and_a_held_device_is_left_alone(testbed: Testbed, tmp_path: Path) -> None:
    c = testbed.netns("c")
    args = [*NET, "-i", "10.144.147.1/24", "--no-listener", "--dev-name", "ptheld0",
            "--state-dir", str(tmp_path)]
    n1 = PytierNode(testbed, c, args, name="node-c").start()
    assert n1.proc is not None

    second = _core(c, [*args, "--rpc-portal", "127.0.0.1:15999"])
    assert second.returncode == 1
    assert "Traceback" not in second.stderr
    assert second.stderr.splitlines()[-1] == (
        f"pytier-core: error: another pytier-core (pid {n1.proc.pid}) is running instance 'default' here "
        f"(state file {_state_files(tmp_path)[0]}); stop it first, or give this node its own --instance-name"
    )
    assert json.loads(_state_files(tmp_path)[0].read_text())["pid"] == n1.proc.pid

    os.kill(n1.proc.pid, signal.SIGKILL)
    n1.proc.wait(10)
    holder = testbed.popen(c, [sys.executable, "-c", _HOLD_TUN, "ptheld0"], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    third = _core(c, args)
    assert third.returncode == 1
    assert "Traceback" not in third.stderr
    assert third.stderr.splitlines()[-1] == (
        f"pytier-core: error: the TUN device ptheld0 that pytier-core pid {n1.proc.pid} (instance 'default') "
        "left behind is now held by another process; stop that process so this start can clean up, or give "
        "this node its own --instance-name"
    )
    assert c.run(["ip", "link", "show", "ptheld0"], check=False).returncode == 0
    assert len(_state_files(tmp_path)) == 1  # kept, for the start after the holder is gone
    assert holder.stdin is not None
    holder.stdin.close()
    holder.wait(10)
    PytierNode(testbed, c, args, name="node-c2").start().stop()
    assert _state_files(tmp_path) == []
