"""The state file of a running node: what it records, a live owner refused, a dead owner's sysctl
put back (a file standing in for /proc/sys), a reused PID and a record from another namespace."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from pytier.tun.leftovers import (
    HostState,
    StateError,
    StateRecord,
    netns_label,
    process_start_time,
    state_path,
)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_record(path: Path, **fields: object) -> None:
    record = {"pid": _dead_pid(), "started": 1, "instance": "default", "netns": netns_label()[0], **fields}
    path.write_text(json.dumps(record))


def test_records_each_change_before_it_is_made_and_goes_on_release(tmp_path: Path) -> None:
    sysctl = tmp_path / "ip_forward"
    sysctl.write_text("0\n")
    state = HostState.claim(tmp_path / "run", "edge/1")
    path = state.path
    assert path.parent == tmp_path / "run" and path.name.startswith("edge%2F1")
    state.opening_tun("ptnosuchdev0")
    state.tun_opened("ptnosuchdev0")
    state.adding_routes([IPv4Network("198.19.1.0/24"), IPv4Network("198.19.2.0/24")])
    state.routes_removed([IPv4Network("198.19.1.0/24")])
    state.adding_nft_table("ip", "pytier_ptnosuchdev0")
    state.setting_sysctl(sysctl, "1")
    assert json.loads(path.read_text()) == {
        "pid": os.getpid(), "started": process_start_time(os.getpid()), "instance": "edge/1",
        "netns": netns_label()[0], "tun": "ptnosuchdev0", "routes": ["198.19.2.0/24"],
        "nft_tables": ["ip pytier_ptnosuchdev0"], "sysctls": {str(sysctl): ["0", "1"]},
    }
    state.release()
    assert not path.exists()


def test_a_device_that_was_already_there_is_not_recorded(tmp_path: Path) -> None:
    state = HostState.claim(tmp_path, "default")
    state.opening_tun("lo")
    state.tun_opened("lo")
    assert json.loads(state.path.read_text())["tun"] is None


def test_a_live_owner_is_refused(tmp_path: Path) -> None:
    first = HostState.claim(tmp_path, "default")
    with pytest.raises(StateError, match=rf"another pytier-core \(pid {os.getpid()}\) is running instance "):
        HostState.claim(tmp_path, "default")
    assert json.loads(first.path.read_text())["pid"] == os.getpid()
    HostState.claim(tmp_path, "other").release()  # another instance name is another file


def test_a_dead_owners_sysctl_is_put_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sysctl = tmp_path / "ip_forward"
    sysctl.write_text("1\n")
    path = state_path(tmp_path, "default")
    _write_record(path, sysctls={str(sysctl): ["0", "1"]})
    caplog.set_level("INFO", "pytier.tun")
    state = HostState.claim(tmp_path, "default")
    assert sysctl.read_text() == "0\n"
    assert f"restored {sysctl}=0 (it was left at 1)" in caplog.text
    assert json.loads(state.path.read_text())["pid"] == os.getpid()


def test_a_sysctl_changed_since_or_relied_on_by_a_live_node_is_left(tmp_path: Path) -> None:
    changed, shared = tmp_path / "changed", tmp_path / "shared"
    changed.write_text("2\n")
    shared.write_text("0\n")
    HostState.claim(tmp_path, "live").setting_sysctl(shared, "1")
    shared.write_text("1\n")
    dead = {str(changed): ["0", "1"], str(shared): ["0", "1"]}
    _write_record(state_path(tmp_path, "default"), sysctls=dead)
    HostState.claim(tmp_path, "default")
    assert (changed.read_text(), shared.read_text()) == ("2\n", "1\n")


def test_a_reused_pid_is_not_an_owner(tmp_path: Path) -> None:
    sysctl = tmp_path / "ip_forward"
    sysctl.write_text("1\n")
    started = process_start_time(os.getpid())
    assert started is not None
    _write_record(state_path(tmp_path, "default"), pid=os.getpid(), started=started - 1,
                  sysctls={str(sysctl): ["0", "1"]})
    HostState.claim(tmp_path, "default")
    assert sysctl.read_text() == "0\n"


def test_a_record_from_another_namespace_undoes_nothing(tmp_path: Path) -> None:
    sysctl = tmp_path / "ip_forward"
    sysctl.write_text("1\n")
    _write_record(state_path(tmp_path, "default"), netns="0:1", sysctls={str(sysctl): ["0", "1"]})
    HostState.claim(tmp_path, "default")
    assert sysctl.read_text() == "1\n"


def test_an_unreadable_file_is_replaced(tmp_path: Path) -> None:
    state_path(tmp_path, "default").write_text('{"pid": ')
    state = HostState.claim(tmp_path, "default")
    assert StateRecord.from_json(json.loads(state.path.read_text())).pid == os.getpid()


def test_an_unwritable_directory_is_one_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StateError, match=r"cannot create the state directory .*/file/run: .*--state-dir"):
        HostState.claim(blocker / "run", "default")
