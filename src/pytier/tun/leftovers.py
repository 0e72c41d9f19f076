"""What a node changes on the host, recorded in a small state file, so that the start after a crash
(kill -9, the OOM killer) can undo what the dead process left: its TUN device (when the device
outlived it), the routes on that device, its nft tables and the sysctls it changed.

One file per instance name and network namespace, written before each change and removed on a
clean exit. A file whose process still runs means another node already has this instance name.
Nothing is undone that another live process may own: a TUN device some process holds, with its
routes and nft table, is left alone, and so is a sysctl another live node here relies on, or one
someone set to another value since. docs/limits.md describes it for users.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import subprocess
import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pytier.tun.device import TunDevice, TunError
from pytier.tun.netlink import LinkConfig, link_kind

__all__ = ["DEFAULT_STATE_DIR", "HostState", "StateError", "StateRecord", "state_path"]

log = logging.getLogger("pytier.tun")

DEFAULT_STATE_DIR = Path("/run/pytier")
NETNS_RUN_DIR = Path("/run/netns")
TUNSETPERSIST = 0x400454CB
_PROC_STAT_STARTTIME = 19  # index of field 22 (starttime) among the fields after "(comm)"


class StateError(Exception):
    """The state file cannot be used, or another live node owns it; one line for the user."""


def _netns_id(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def netns_label() -> tuple[str, str | None]:
    """(identity of our network namespace, the suffix its state files carry: None in the host's own).

    A named namespace (`ip netns add NAME`) is known by its name, so a file survives the process;
    an unnamed one by its inode."""
    dev, ino = _netns_id("/proc/self/ns/net")
    ident = f"{dev}:{ino}"
    try:
        for entry in sorted(NETNS_RUN_DIR.iterdir()):
            try:
                if _netns_id(str(entry)) == (dev, ino):
                    return ident, entry.name
            except OSError:
                continue
    except OSError:
        pass
    try:
        if _netns_id("/proc/1/ns/net") != (dev, ino):
            return ident, f"netns-{ino}"
    except OSError:  # /proc/1 hidden from us: take it that we share its namespace
        pass
    return ident, None


def state_path(state_dir: Path, instance: str) -> Path:
    _, suffix = netns_label()
    name = quote(instance, safe="")
    if suffix is not None:
        name += "@" + quote(suffix, safe="")
    return state_dir / f"{name}.json"


def process_start_time(pid: int) -> int | None:
    """When `pid` started, in clock ticks since boot: tells a process apart from a later one that
    got the same PID."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return int(text.rsplit(")", 1)[1].split()[_PROC_STAT_STARTTIME])
    except (IndexError, ValueError):
        return None


def sysctl_name(path: str) -> str:
    """net.ipv4.ip_forward for /proc/sys/net/ipv4/ip_forward; any other file by its path."""
    if not path.startswith("/proc/sys/"):
        return path
    return path.removeprefix("/proc/sys/").replace("/", ".")


@dataclass
class StateRecord:
    pid: int
    started: int | None
    instance: str
    netns: str
    tun: str | None = None
    routes: list[str] = field(default_factory=list)
    nft_tables: list[str] = field(default_factory=list)  # "FAMILY NAME", e.g. "ip pytier_pytier0"
    sysctls: dict[str, list[str]] = field(default_factory=dict)  # path -> [value before, value set]

    @classmethod
    def from_json(cls, data: Any) -> StateRecord:
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        started = data.get("started")
        return cls(
            pid=int(data["pid"]),
            started=None if started is None else int(started),
            instance=str(data.get("instance", "")),
            netns=str(data.get("netns", "")),
            tun=None if data.get("tun") is None else str(data["tun"]),
            routes=[str(r) for r in data.get("routes", [])],
            nft_tables=[str(t) for t in data.get("nft_tables", [])],
            sysctls={str(k): [str(v[0]), str(v[1])] for k, v in dict(data.get("sysctls", {})).items()},
        )

    def owner_alive(self) -> bool:
        """Whether the process that wrote this record still runs (the same process, not a PID reuse)."""
        return self.started is not None and process_start_time(self.pid) == self.started


def _read(path: Path) -> StateRecord | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"cannot read the state file {path}: {exc.strerror or exc}") from exc
    try:
        return StateRecord.from_json(json.loads(text))
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        log.warning("ignoring the unreadable state file %s (%s)", path, exc)
        return None


class HostState:
    """The state file of this running node. Every change is recorded before it is made; the
    methods may be called from any thread."""

    def __init__(self, path: Path, record: StateRecord) -> None:
        self.path = path
        self.record = record
        self._lock = threading.Lock()
        self._tun_existed = False
        self._update_failed = False

    @classmethod
    def claim(cls, state_dir: Path, instance: str) -> HostState:
        """Take the state file of `instance` here: undo what a dead owner left, refuse a live one.

        Uses netlink (pyroute2), so it runs on the node's netlink thread."""
        try:
            state_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(
                f"cannot create the state directory {state_dir}: {exc.strerror or exc} (pytier records "
                "there what it changes on the host; choose a writable one with --state-dir)"
            ) from exc
        path = state_path(state_dir, instance)
        ident, _ = netns_label()
        # Serialises two nodes starting at once with the same instance name.
        lock_fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            old = _read(path)
            if old is not None:
                if old.owner_alive():
                    raise StateError(
                        f"another pytier-core (pid {old.pid}) is running instance {instance!r} here "
                        f"(state file {path}); stop it first, or give this node its own --instance-name"
                    )
                _undo(old, ident, state_dir, path)
            state = cls(path, StateRecord(pid=os.getpid(), started=process_start_time(os.getpid()),
                                          instance=instance, netns=ident))
            state._write()
        finally:
            os.close(lock_fd)
        return state

    def opening_tun(self, name: str) -> None:
        """Call right before the TUN device is opened: a device that was already there (a
        persistent one someone made) is not ours to remove after a crash."""
        try:
            socket.if_nametoindex(name)
            self._tun_existed = True
        except OSError:
            self._tun_existed = False

    def tun_opened(self, name: str) -> None:
        if self._tun_existed:
            return
        with self._lock:
            self.record.tun = name
            self._update()

    def adding_routes(self, nets: Iterable[IPv4Network]) -> None:
        with self._lock:
            self.record.routes += [str(n) for n in nets if str(n) not in self.record.routes]
            self._update()

    def routes_removed(self, nets: Iterable[IPv4Network]) -> None:
        gone = {str(n) for n in nets}
        with self._lock:
            self.record.routes = [r for r in self.record.routes if r not in gone]
            self._update()

    def adding_nft_table(self, family: str, name: str) -> None:
        with self._lock:
            entry = f"{family} {name}"
            if entry not in self.record.nft_tables:
                self.record.nft_tables.append(entry)
            self._update()

    def setting_sysctl(self, path: Path, value: str) -> None:
        """Record the value `path` has now, before it is set to `value` (nothing, if it has that)."""
        try:
            before = path.read_text().strip()
        except OSError:
            return  # the setter reports it
        if before == value:
            return
        with self._lock:
            self.record.sysctls.setdefault(str(path), [before, value])
            self._update()

    def release(self) -> None:
        """The node undid everything it changed: forget it."""
        with self._lock:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("cannot remove the state file %s: %s", self.path, exc.strerror or exc)

    def _update(self) -> None:
        # A running node does not stop over its safety net: it says so once and carries on.
        try:
            self._write()
        except StateError as exc:
            if not self._update_failed:
                log.warning("%s; a crash now would leave changes the next start cannot undo", exc)
            self._update_failed = True

    def _write(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(asdict(self.record), indent=1) + "\n")
            os.replace(tmp, self.path)
        except OSError as exc:
            raise StateError(f"cannot write the state file {self.path}: {exc.strerror or exc}") from exc


# ---- undoing a dead node's changes ---------------------------------------------------------------


def _undo(old: StateRecord, ident: str, state_dir: Path, path: Path) -> None:
    log.info("pytier-core pid %d (instance %r) ended without cleaning up (state file %s); removing "
             "what it left", old.pid, old.instance, path)
    if old.netns != ident:
        # The name now belongs to a new namespace: the old one went, and its devices, routes, nft
        # tables and sysctls with it.
        log.info("its network namespace is gone, and everything it changed with it")
        return
    if old.tun is not None and _remove_tun(old.tun, old.routes):
        # Then its routes and nft table may well be that process's too: touch nothing, keep the record.
        raise StateError(
            f"the TUN device {old.tun} that pytier-core pid {old.pid} (instance {old.instance!r}) left "
            f"behind is now held by another process; stop that process so this start can clean up, "
            f"or give this node its own --instance-name"
        )
    for entry in old.nft_tables:
        family, _, table = entry.partition(" ")
        _remove_nft_table(family, table)
    relied_on = _sysctls_of_live_nodes(state_dir, ident, path)
    for sysctl, (before, value) in old.sysctls.items():
        _restore_sysctl(Path(sysctl), before, value, relied_on)


def _remove_tun(name: str, routes: list[str]) -> bool:
    """Remove the TUN device `name` and the recorded routes on it; return True, leaving them, if a
    live process holds the device (the kernel then refuses to attach us to it)."""
    kind = link_kind(name)
    if kind is None:
        return False  # the kernel removed it, with its routes, when the process's descriptor closed
    if kind != "tun":
        log.warning("%s is now a %s device, not the TUN device pytier left: leaving it", name,
                    kind or "non-TUN")
        return False
    try:
        tun = TunDevice.open(name)
    except TunError as exc:
        if exc.errno == errno.EBUSY:
            return True
        log.warning("cannot remove the TUN device %s left behind: %s", name, exc)
        return False
    try:
        with LinkConfig(name) as link:
            for text in routes:
                if link.remove_route(IPv4Network(text)):
                    log.info("removed route %s via %s", text, name)
        # A persistent device outlives its last descriptor; without the flag it goes with ours.
        fcntl.ioctl(tun.fd, TUNSETPERSIST, 0)
    except OSError as exc:
        log.warning("cannot remove the TUN device %s left behind: %s", name, exc)
        return False
    finally:
        tun.close()
    log.info("removed TUN device %s", name)
    return False


def _remove_nft_table(family: str, table: str) -> None:
    try:
        proc = subprocess.run(["nft", "delete", "table", family, table], capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("cannot remove nft table %s %s left behind: %s", family, table, exc)
        return
    if proc.returncode == 0:
        log.info("removed nft table %s %s", family, table)
    elif "No such file or directory" not in proc.stderr:
        log.warning("cannot remove nft table %s %s left behind: nft: %s", family, table, proc.stderr.strip())


def _sysctls_of_live_nodes(state_dir: Path, ident: str, ours: Path) -> set[str]:
    """The sysctls other nodes running in this namespace changed, and so rely on."""
    relied: set[str] = set()
    for other in state_dir.glob("*.json"):
        if other == ours:
            continue
        try:
            rec = StateRecord.from_json(json.loads(other.read_text()))
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            continue
        if rec.netns == ident and rec.owner_alive():
            relied.update(rec.sysctls)
    return relied


def _restore_sysctl(path: Path, before: str, value: str, relied_on: set[str]) -> None:
    name = sysctl_name(str(path))
    if str(path) in relied_on:
        log.info("leaving %s=%s: another node running here relies on it", name, value)
        return
    try:
        now = path.read_text().strip()
        if now != value:
            return  # someone set it since; theirs now
        path.write_text(before + "\n")
    except OSError as exc:
        log.warning("cannot restore %s=%s: %s", name, before, exc.strerror or exc)
        return
    log.info("restored %s=%s (it was left at %s)", name, before, value)
