"""`pytier-cli service`: the unit it installs into a scratch root passes `systemd-analyze verify`, is
enabled and removed with systemctl's own --root handling, and the command it runs stops cleanly on the
unit's KillSignal within its TimeoutStopSec."""

from __future__ import annotations

import re
import shlex
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from pytier.testbed.netns import Testbed
from pytier.testbed.nodes import BIN, wait_for

CLI = str(BIN / "pytier-cli")
CONFIG = """\
network_name = "demo"
network_secret = "s3"
ipv4 = "10.144.144.1/24"
listeners = ["udp://0.0.0.0:11010"]
dev_name = "pts0"
"""


def service(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, "service", *argv], capture_output=True, text=True, timeout=60)


def needs(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"needs {tool} (Debian package systemd; scripts/setup.sh installs it)")


def unit_settings(unit: Path) -> dict[str, str]:
    lines = unit.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if re.match(r"^[A-Za-z]+=", line))


def test_install_verify_status_uninstall(tmp_path: Path) -> None:
    needs("systemd-analyze")
    needs("systemctl")
    root = tmp_path / "root"
    config = tmp_path / "demo.toml"
    config.write_text(CONFIG)
    done = service("install", "--root", str(root), "--name", "demo", "--config", str(config))
    assert done.returncode == 0, done.stderr
    unit = root / "etc/systemd/system/pytier@.service"
    installed_config = root / "etc/pytier/demo.toml"
    wants = root / "etc/systemd/system/multi-user.target.wants"
    assert installed_config.read_text() == CONFIG and installed_config.stat().st_mode & 0o777 == 0o600
    assert (wants / "pytier@demo.service").is_symlink()

    settings = unit_settings(unit)
    core = BIN / "pytier-core"
    assert settings["ExecStart"] == f"{core} --config-file /etc/pytier/%i.toml"
    assert settings["Restart"] == "on-failure"
    assert (settings["KillSignal"], settings["KillMode"]) == ("SIGTERM", "mixed")
    assert settings["RestartPreventExitStatus"] == "2"

    # systemd's own check, of an instance of the template as systemd would load it: no complaint at all.
    instance = tmp_path / "pytier@demo.service"
    shutil.copy(unit, instance)
    verify = subprocess.run(["systemd-analyze", "verify", str(instance)], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert verify.returncode == 0 and verify.stderr == "", verify.stderr

    status = service("status", "--root", str(root), "--name", "demo")
    assert status.returncode == 0
    assert f"runs:     {core} --config-file /etc/pytier/demo.toml\n" in status.stdout
    assert "enabled:  pytier@demo.service" in status.stdout

    # A second instance keeps the template when the first goes.
    assert service("install", "--root", str(root), "--name", "second").returncode == 0
    gone = service("uninstall", "--root", str(root), "--name", "demo")
    assert gone.returncode == 0 and "still enabled: pytier@second.service" in gone.stdout
    assert unit.exists() and not (wants / "pytier@demo.service").exists()
    gone = service("uninstall", "--root", str(root), "--name", "second")
    assert gone.returncode == 0 and not unit.exists()
    assert installed_config.read_text() == CONFIG  # the user's settings stay
    status = service("status", "--root", str(root), "--name", "demo")
    assert status.returncode == 1 and "not installed" in status.stdout


def test_a_bad_config_installs_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    config = tmp_path / "bad.toml"
    config.write_text('network_nam = "demo"\n')
    done = service("install", "--root", str(root), "--config", str(config))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"pytier-cli: error: config file {config} line 1: unknown key 'network_nam' "
        "(did you mean 'network_name'?) (nothing installed)"]
    assert not root.exists()
    done = service("install", "--root", str(root), "--name", "a/b")
    assert done.returncode == 2 and "invalid name 'a/b'" in done.stderr


def test_the_units_command_stops_cleanly_on_its_kill_signal(testbed: Testbed, tmp_path: Path) -> None:
    root = tmp_path / "root"
    config = tmp_path / "demo.toml"
    config.write_text(CONFIG)
    assert service("install", "--root", str(root), "--name", "demo", "--config", str(config)).returncode == 0
    settings = unit_settings(root / "etc/systemd/system/pytier@.service")
    # ExecStart as systemd runs it for pytier@demo, the settings read from the scratch root.
    argv = [arg.replace("/etc/pytier/%i.toml", str(root / "etc/pytier/demo.toml"))
            for arg in shlex.split(settings["ExecStart"])]
    ns = testbed.netns("svc")
    proc = testbed.popen(ns, argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    def tun_up() -> bool:
        return proc.poll() is not None or ns.run(["ip", "link", "show", "pts0"], check=False).returncode == 0

    wait_for(tun_up, 15, "the node's TUN device")
    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    proc.send_signal(getattr(signal, settings["KillSignal"]))
    timeout = float(settings["TimeoutStopSec"].removesuffix("s"))
    assert proc.wait(timeout) == 0
    assert proc.stderr is not None and re.search(r"INFO pytier\.node: node \d+ stopped", proc.stderr.read())
    assert ns.run(["ip", "link", "show", "pts0"], check=False).returncode != 0  # the TUN device went with it
