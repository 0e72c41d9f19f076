"""`pytier-cli service install|uninstall|status`: run pytier-core under systemd, one instance per config
file, through the template unit pytier@.service (`pytier@NAME` runs `pytier-core -c /etc/pytier/NAME.toml`).

With --root DIR everything is written under DIR (an image being built, a test's scratch root) and only
`systemctl --root`, which edits files and talks to no running manager, is used there.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from pytier.config import ConfigError, parse_invocation, version

TEMPLATE = "pytier@.service"
UNIT_DIR = Path("etc/systemd/system")
CONFIG_DIR = Path("etc/pytier")
DEFAULT_NAME = "default"
MARKER = "# Written by pytier-cli service install"
SYSTEMCTL_TIMEOUT_S = 60.0
# Long enough for pytier-core to remove its TUN device, routes and nftables table after SIGTERM; a
# second SIGTERM would make it skip that, so systemd waits this long before SIGKILL.
STOP_TIMEOUT_S = 30
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ServiceError(Exception):
    """One line for the user; the command exits with status 1."""


def unit_text(core: Path) -> str:
    """The template unit; systemd puts the instance name where %i stands."""
    return f"""{MARKER} (pytier {version()}); `pytier-cli service uninstall` removes it.
[Unit]
Description=pytier mesh VPN node %i
After=network-online.target
Wants=network-online.target

[Service]
Type=exec
ExecStart={core} --config-file /{CONFIG_DIR}/%i.toml
Restart=on-failure
RestartSec=5s
# Status 2 is a setting pytier-core refused: starting again cannot help.
RestartPreventExitStatus=2
# On SIGTERM pytier-core removes its TUN device and routes, and the nftables table of its proxy
# networks (with the nft command, which mixed mode leaves running); it ends with status 0.
KillSignal=SIGTERM
KillMode=mixed
TimeoutStopSec={STOP_TIMEOUT_S}s

[Install]
WantedBy=multi-user.target
"""


def add_parser(commands: argparse._SubParsersAction[Any],
               formatter_class: type[argparse.HelpFormatter]) -> None:
    service = commands.add_parser(
        "service", help="install, remove or show the systemd unit that runs pytier-core",
        description=f"Run pytier-core under systemd: the unit {TEMPLATE} starts pytier@NAME as "
        f"pytier-core --config-file /{CONFIG_DIR}/NAME.toml.",
        allow_abbrev=False, formatter_class=formatter_class)
    actions = service.add_subparsers(title="actions", dest="action", metavar="ACTION", required=True)
    helps = {
        "install": "write the unit and enable pytier@NAME (start it with systemctl start pytier@NAME)",
        "uninstall": "disable and stop pytier@NAME; remove the unit when no other instance is enabled",
        "status": "show what is installed, and whether pytier@NAME is enabled and running",
    }
    for action, help_text in helps.items():
        description = help_text[0].upper() + help_text[1:] + "."
        sub = actions.add_parser(action, help=help_text, description=description, allow_abbrev=False,
                                 formatter_class=formatter_class)
        sub.add_argument("--name", type=_name, default=DEFAULT_NAME, metavar="NAME",
                         help=f"instance: pytier@NAME, settings in /{CONFIG_DIR}/NAME.toml "
                         f"(default: {DEFAULT_NAME})")
        sub.add_argument("--root", type=Path, metavar="DIR",
                         help="work on the system tree under DIR instead of / (no running systemd is used)")
        if action == "install":
            sub.add_argument("--config", type=Path, metavar="FILE",
                             help=f"check FILE with pytier-core's reader and copy it to "
                             f"/{CONFIG_DIR}/NAME.toml")


def _name(text: str) -> str:
    if not _NAME_RE.match(text):
        raise argparse.ArgumentTypeError(
            f"invalid name {text!r}: letters, digits, '_', '.' and '-', starting with a letter or digit")
    return text


def run(args: argparse.Namespace, prog: str) -> int:
    action = {"install": install, "uninstall": uninstall, "status": status}[args.action]
    try:
        return action(_Target(args.name, args.root), args)
    except ServiceError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1


class _Target:
    def __init__(self, name: str, root: Path | None) -> None:
        self.name = name
        self.scratch = root is not None and root.resolve() != Path("/")
        self.root = root.resolve() if root is not None else Path("/")
        self.unit_dir = self.root / UNIT_DIR
        self.unit = self.unit_dir / TEMPLATE
        self.config = self.root / CONFIG_DIR / f"{name}.toml"
        self.instance = f"pytier@{name}.service"

    def manager_running(self) -> bool:
        """A systemd manager this command should talk to: not for a scratch root, and only when systemd
        runs this host (its own test, sd_booted)."""
        return not self.scratch and Path("/run/systemd/system").is_dir()

    def systemctl(self, *argv: str) -> subprocess.CompletedProcess[str]:
        exe = shutil.which("systemctl")
        if exe is None:
            raise ServiceError(f"systemctl not found: install Debian's systemd package, or enable "
                               f"{self.instance} by hand")
        cmd = [exe, *argv] if self.manager_running() else [exe, f"--root={self.root}", *argv]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=SYSTEMCTL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise ServiceError(f"{' '.join(cmd)} did not finish within {SYSTEMCTL_TIMEOUT_S:g} s") from None
        return done

    def check(self, *argv: str) -> None:
        done = self.systemctl(*argv)
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            reason = lines[-1] if lines else f"status {done.returncode}"
            raise ServiceError(f"systemctl {' '.join(argv)} failed: {reason}")

    def enabled_instances(self) -> list[str]:
        found = {p.name for p in self.unit_dir.glob("*.wants/pytier@*.service") if p.is_symlink()}
        return sorted(found)

    def where(self, path: Path) -> str:
        return str(path) if not self.scratch else f"/{path.relative_to(self.root)} under {self.root}"


def find_core() -> Path:
    """The pytier-core of this installation (the same venv or pipx environment as this pytier-cli)."""
    beside = Path(sys.executable).parent / "pytier-core"
    if os.access(beside, os.X_OK):
        return beside.absolute()
    found = shutil.which("pytier-core")
    if found is None:
        raise ServiceError(f"cannot find pytier-core (not beside {sys.executable} nor on PATH): "
                           "install pytier with pip or pipx first")
    return Path(found).absolute()


def _write(path: Path, text: str, mode: int) -> None:
    """Whole or not at all: a half-written unit or config would be worse than none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _checked_config(source: Path, dest: Path) -> str:
    try:
        text = source.read_text()
    except OSError as e:
        raise ServiceError(f"cannot read {source}: {(e.strerror or str(e)).lower()}") from None
    try:
        # The unit starts pytier-core with systemd's environment, not this shell's: no PYTIER_* here.
        invocation = parse_invocation(["--config-file", str(source)], environ={})
    except ConfigError as e:
        raise ServiceError(f"{e} (nothing installed)") from None
    for warning in invocation.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if dest.exists() and dest.read_text() != text:
        raise ServiceError(f"{dest} exists and differs from {source}: edit or remove it first "
                           "(nothing installed)")
    return text


def install(t: _Target, args: argparse.Namespace) -> int:
    core = find_core()
    if re.search(r"[\s\"'\\%$;]", str(core)):
        # systemd would split, unquote or expand these in ExecStart.
        raise ServiceError(f"{core}: a unit cannot run a program whose path has spaces, quotes, '\\', "
                           "'%', '$' or ';' in it; install pytier somewhere else")
    config_text = _checked_config(args.config, t.config) if args.config is not None else None
    if t.unit.exists() and not t.unit.read_text().startswith(MARKER):
        raise ServiceError(f"{t.unit} exists and was not written by pytier-cli: remove it first")
    had_unit = t.unit.exists()
    try:
        _write(t.unit, unit_text(core), 0o644)
        if config_text is not None and not t.config.exists():
            # The settings hold the network secret: readable by root only.
            _write(t.config, config_text, 0o600)
    except OSError as e:
        if not had_unit:
            t.unit.unlink(missing_ok=True)
        hint = " (run as root)" if isinstance(e, PermissionError) else ""
        reason = (e.strerror or str(e)).lower()
        raise ServiceError(f"cannot write {e.filename or t.unit}: {reason}{hint}") from None
    print(f"installed {t.where(t.unit)}: pytier@NAME runs {core} --config-file /{CONFIG_DIR}/NAME.toml")
    if shutil.which("systemctl") is None:
        print(f"systemctl not found: enable it by hand with systemctl enable {t.instance}")
    else:
        if t.manager_running():
            t.check("daemon-reload")
        t.check("enable", t.instance)
        print(f"enabled {t.instance}" + ("" if t.manager_running() else
                                         " (no running systemd was told; it starts at the next boot)"))
    if args.config is not None:
        print(f"settings: {t.where(t.config)}, from {args.config}")
    elif t.config.exists():
        print(f"settings: {t.where(t.config)}")
    else:
        print(f"settings: put them in {t.where(t.config)} (pytier-core's flags as TOML keys, or an "
              f"EasyTier config file); until then {t.instance} fails to start")
    if t.manager_running():
        print(f"start it with: systemctl start {t.instance}")
    return 0


def uninstall(t: _Target, args: argparse.Namespace) -> int:
    if not t.unit.exists():
        print(f"nothing to remove: {t.where(t.unit)} is not installed")
        return 0
    if not t.unit.read_text().startswith(MARKER):
        raise ServiceError(f"{t.unit} was not written by pytier-cli: left in place")
    if shutil.which("systemctl") is not None:
        if t.manager_running():
            t.check("disable", "--now", t.instance)
            print(f"stopped and disabled {t.instance}")
        else:
            t.check("disable", t.instance)
            print(f"disabled {t.instance}")
    others = [i for i in t.enabled_instances() if i != t.instance]
    if others:
        print(f"kept {t.where(t.unit)}: still enabled: {', '.join(others)}")
    else:
        t.unit.unlink()
        print(f"removed {t.where(t.unit)}")
        if t.manager_running():
            t.check("daemon-reload")
    if t.config.exists():
        print(f"kept {t.where(t.config)} (your settings; remove it yourself when no longer needed)")
    return 0


def _exec_start(unit: Path) -> str | None:
    for line in unit.read_text().splitlines():
        if line.startswith("ExecStart="):
            return line.removeprefix("ExecStart=")
    return None


def status(t: _Target, args: argparse.Namespace) -> int:
    if not t.unit.exists():
        print(f"unit:     not installed ({t.where(t.unit)} is missing; see pytier-cli service install)")
        return 1
    command = _exec_start(t.unit) or "?"
    exe = command.split()[0]
    print(f"unit:     {t.where(t.unit)}")
    missing = "" if os.access(exe, os.X_OK) else f"  (missing: {exe} is not executable)"
    print(f"runs:     {command.replace('%i', t.name)}{missing}")
    print(f"settings: {t.where(t.config)}" + ("" if t.config.exists() else "  (missing)"))
    print(f"enabled:  {', '.join(t.enabled_instances()) or 'none'}")
    if t.manager_running():
        active = t.systemctl("is-active", t.instance).stdout.strip() or "unknown"
        print(f"{t.instance}: {active}")
    return 0
