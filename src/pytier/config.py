"""pytier-core's settings: command-line flags and a TOML file, merged into one `Config`.

Flag names follow EasyTier's, so that its documentation reads true for pytier. A TOML file given
with `--config-file` carries the same settings under the long flag names (`network_name = "net"`,
`listeners = ["udp://0.0.0.0:11010"]`, `enable_kcp_proxy = true`); flags given on the command line
override the file. Every error is one line that names the flag or key at fault.
"""

from __future__ import annotations

import argparse
import difflib
import ipaddress
import math
import re
import socket
import sys
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any, Literal, NoReturn, cast

PROG = "pytier-core"
DEFAULT_TUNNEL_PORT = 11010
DEFAULT_RPC_PORTAL = ("127.0.0.1", 15888)
MTU_MIN = 576
MTU_MAX = 9000
DEV_NAME_MAX_LEN = 15  # Linux IFNAMSIZ (16) minus the terminating NUL
LOG_LEVELS = ("error", "warn", "info", "debug", "trace")
ENCRYPTION_ALGORITHMS = ("aes-gcm", "aes-256-gcm", "chacha20", "xor")
SCHEMES = ("udp", "tcp")

Scheme = Literal["udp", "tcp"]


class ConfigError(Exception):
    """A setting is invalid; the message is one line naming the flag or file key at fault."""


def version() -> str:
    try:
        return metadata.version("pytier")
    except metadata.PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------------------------------------
# Values


def split_host_port(text: str) -> tuple[str, int | None]:
    """Split "host", "host:port", "[v6]" or "[v6]:port"; the host comes back without brackets."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"missing ']' after the IPv6 address in {text!r}")
        host, rest = text[1:end], text[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} in brackets is not an IPv6 address") from None
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise ValueError(f"unexpected {rest!r} after ']' in {text!r}")
        return host, _parse_port(rest[1:], text)
    if text.count(":") > 1:
        raise ValueError(f"put the IPv6 address in {text!r} in brackets, e.g. [fd00::1]:11010")
    host, sep, port = text.partition(":")
    return host, _parse_port(port, text) if sep else None


def _parse_port(text: str, whole: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise ValueError(f"invalid port {text!r} in {whole!r} (expected 0..65535)")
    return int(text)


_HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_-]{1,63})*\.?$")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class TunnelUrl:
    """An underlay endpoint such as udp://198.18.0.2:11010 (a listener's bind address or a peer)."""

    scheme: Scheme
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> TunnelUrl:
        """Parse "udp://HOST[:PORT]" or "tcp://HOST[:PORT]" (port 11010 when left out).

        Raises ValueError with a message fit for the user.
        """
        text = text.strip()
        scheme, sep, rest = text.partition("://")
        if not sep:
            raise ValueError(
                f"{text!r} has no scheme: write udp://{text} or tcp://{text}"
            )
        scheme = scheme.lower()
        if scheme not in SCHEMES:
            raise ValueError(
                f"unsupported scheme {scheme + '://'!r} in {text!r} (pytier supports udp:// and tcp://)"
            )
        rest = rest.removesuffix("/")
        if any(c in rest for c in "/?#@") or any(c.isspace() for c in rest):
            raise ValueError(f"{text!r} must be {scheme}://HOST:PORT with nothing after the port")
        host, port = split_host_port(rest)
        if not host:
            raise ValueError(f"{text!r} has no host")
        if _is_ip(host):
            host = ipaddress.ip_address(host).compressed
        elif not _HOSTNAME_RE.match(host):
            raise ValueError(f"{host!r} in {text!r} is neither an IP address nor a host name")
        return cls(cast(Scheme, scheme), host, DEFAULT_TUNNEL_PORT if port is None else port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_listener(text: str) -> list[TunnelUrl]:
    """A listener URL, or EasyTier's shorthand of a bare port: tcp and udp on 0.0.0.0:PORT."""
    text = text.strip()
    if text.isdigit():
        port = _parse_port(text, text)
        return [TunnelUrl("tcp", "0.0.0.0", port), TunnelUrl("udp", "0.0.0.0", port)]
    url = TunnelUrl.parse(text)
    if not _is_ip(url.host):
        raise ValueError(f"listener {text!r}: bind to an IP address (0.0.0.0 for all), not a host name")
    return [url]


def parse_peer(text: str) -> list[TunnelUrl]:
    url = TunnelUrl.parse(text)
    if url.port == 0:
        raise ValueError(f"peer {text!r} needs a port other than 0")
    if _is_ip(url.host) and ipaddress.ip_address(url.host).is_unspecified:
        raise ValueError(f"peer {text!r}: {url.host} is not an address to connect to")
    return [url]


def parse_ipv4(text: str) -> IPv4Interface:
    """The node's virtual address: "10.144.144.1/24", or a bare address meaning /24."""
    text = text.strip()
    if "/" not in text:
        text += "/24"
    try:
        iface = IPv4Interface(text)
    except ValueError:
        raise ValueError(f"invalid IPv4 address {text!r} (expected e.g. 10.144.144.1/24)") from None
    ip, net = iface.ip, iface.network
    if net.prefixlen == 0:
        raise ValueError(f"{text!r}: prefix length must be 1..32")
    if ip.is_unspecified or ip.is_loopback or ip.is_multicast or ip.is_reserved:
        raise ValueError(f"{ip} cannot be a node's virtual address")
    if net.prefixlen <= 30 and ip in (net.network_address, net.broadcast_address):
        which = "network" if ip == net.network_address else "broadcast"
        raise ValueError(
            f"{text!r} is the {which} address of {net}; pick a host address such as "
            f"{net.network_address + 1}/{net.prefixlen}"
        )
    return iface


def parse_proxy_network(text: str) -> list[IPv4Network]:
    text = text.strip()
    if "->" in text:
        raise ValueError(f"{text!r}: mapped proxy networks (CIDR->CIDR) are not supported by pytier")
    try:
        return [IPv4Network(text)]
    except ValueError:
        pass
    try:
        loose = IPv4Network(text, strict=False)
    except ValueError:
        raise ValueError(f"invalid IPv4 network {text!r} (expected e.g. 192.168.50.0/24)") from None
    raise ValueError(f"{text!r} has host bits set; did you mean {loose}?")


def parse_rpc_portal(text: str) -> tuple[str, int]:
    """HOST:PORT of the management API, or a bare PORT on 127.0.0.1."""
    text = text.strip()
    if text.isdigit():
        return DEFAULT_RPC_PORTAL[0], _parse_port(text, text)
    host, port = split_host_port(text)
    if port is None:
        raise ValueError(f"{text!r} has no port (expected e.g. 127.0.0.1:15888)")
    if host == "localhost":
        host = "127.0.0.1"
    if not _is_ip(host):
        raise ValueError(f"{host!r} in {text!r} is not an IP address (expected e.g. 127.0.0.1:15888)")
    return ipaddress.ip_address(host).compressed, port


def parse_mtu(text: str) -> int:
    text = text.strip()
    if not text.isdigit():
        raise ValueError(f"invalid MTU {text!r}: expected a whole number of bytes")
    mtu = int(text)
    if not MTU_MIN <= mtu <= MTU_MAX:
        raise ValueError(f"MTU {mtu} is out of range ({MTU_MIN}..{MTU_MAX})")
    return mtu


def parse_dev_name(text: str) -> str:
    if not text:
        raise ValueError("the device name cannot be empty")
    if len(text) > DEV_NAME_MAX_LEN:
        raise ValueError(f"device name {text!r} is longer than {DEV_NAME_MAX_LEN} characters")
    if text in (".", "..") or any(c in "/:" or c.isspace() or not c.isprintable() for c in text):
        raise ValueError(f"{text!r} is not a valid network interface name")
    return text


def parse_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"invalid duration {text!r}: expected a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{text!r}: expected a number of seconds above 0")
    return value


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _nonempty(what: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if not text.strip():
            raise ValueError(f"the {what} cannot be empty")
        return text

    return parse


def _choice(choices: Sequence[str], aliases: dict[str, str] | None = None) -> Callable[[str], str]:
    def parse(text: str) -> str:
        lowered = text.strip().lower()
        lowered = (aliases or {}).get(lowered, lowered)
        if lowered not in choices:
            raise ValueError(f"invalid choice {text!r} (choose from {', '.join(choices)})")
        return lowered

    return parse


# ---------------------------------------------------------------------------------------------
# The settings


@dataclass
class Config:
    network_name: str = "default"
    network_secret: str = ""
    ipv4: IPv4Interface | None = None
    listeners: list[TunnelUrl] = field(
        default_factory=lambda: parse_listener(str(DEFAULT_TUNNEL_PORT))
    )
    peers: list[TunnelUrl] = field(default_factory=list)
    dev_name: str = "pytier0"
    mtu: int = 1360
    rpc_portal: tuple[str, int] = DEFAULT_RPC_PORTAL
    hostname: str = field(default_factory=socket.gethostname)
    instance_name: str = "default"
    console_log_level: str = "info"
    encryption_algorithm: str = "aes-gcm"
    disable_encryption: bool = False
    proxy_networks: list[IPv4Network] = field(default_factory=list)
    enable_kcp_proxy: bool = False
    disable_kcp_input: bool = False
    enable_quic_proxy: bool = False
    disable_quic_input: bool = False
    use_smoltcp: bool = False
    no_tun: bool = False
    peer_timeout_s: float = 30.0
    config_file: Path | None = None


Kind = Literal["value", "list", "flag"]


@dataclass(frozen=True)
class _Setting:
    attr: str  # Config attribute it sets
    flags: tuple[str, ...]  # long form first; its name is also the TOML key
    kind: Kind
    help: str
    parse: Callable[[str], Any] = parse_bool
    metavar: str | None = None

    @property
    def key(self) -> str:
        return self.flags[0].removeprefix("--").replace("-", "_")


def _ident(text: str) -> str:
    return text


# Grouped as --help shows them. `--no-listener` is the one setting that is not a Config attribute:
# it empties `listeners`.
_GROUPS: tuple[tuple[str, tuple[_Setting, ...]], ...] = (
    ("network", (
        _Setting("network_name", ("--network-name",), "value",
                 "name of the virtual network to join (default: default)", _nonempty("network name"), "NAME"),
        _Setting("network_secret", ("--network-secret",), "value",
                 "shared secret of the network; keys the encryption (default: empty)", _ident, "SECRET"),
        _Setting("ipv4", ("--ipv4", "-i"), "value",
                 "virtual IPv4 of this node, e.g. 10.144.144.1/24 (bare IP: /24)",
                 parse_ipv4, "IP[/LEN]"),
        _Setting("hostname", ("--hostname",), "value",
                 "name other nodes show for this node (default: system host name)",
                 _nonempty("host name"), "NAME"),
        _Setting("instance_name", ("--instance-name", "-m"), "value",
                 "name of this instance on the host (default: default)", _nonempty("instance name"), "NAME"),
        _Setting("proxy_networks", ("--proxy-networks", "-n"), "list",
                 "export a local subnet to the network, e.g. 192.168.50.0/24",
                 parse_proxy_network, "CIDR"),
    )),
    ("tunnels", (
        _Setting("listeners", ("--listeners", "-l"), "list",
                 "listen on udp://IP:PORT, tcp://IP:PORT, PORT = both (default: 11010)",
                 parse_listener, "URL"),
        _Setting("listeners", ("--no-listener",), "flag",
                 "do not listen at all; only connect out to --peers"),
        _Setting("peers", ("--peers", "-p"), "list",
                 "connect to the node at URL, e.g. udp://198.18.0.2:11010", parse_peer, "URL"),
        _Setting("peer_timeout_s", ("--peer-timeout",), "value",
                 "drop a peer silent for this many seconds (default: 30)",
                 parse_seconds, "SECONDS"),
        _Setting("encryption_algorithm", ("--encryption-algorithm",), "value",
                 "packet cipher: aes-gcm (default), aes-256-gcm, chacha20 or xor",
                 _choice(ENCRYPTION_ALGORITHMS), "ALG"),
        _Setting("disable_encryption", ("--disable-encryption", "-u"), "value",
                 "send packets unencrypted (all nodes of the network must agree)", parse_bool),
    )),
    ("device", (
        _Setting("dev_name", ("--dev-name",), "value",
                 "name of the TUN device (default: pytier0)", parse_dev_name, "NAME"),
        _Setting("mtu", ("--mtu",), "value",
                 f"MTU of the TUN device, {MTU_MIN}..{MTU_MAX} (default: 1360)", parse_mtu, "BYTES"),
        _Setting("no_tun", ("--no-tun",), "value",
                 "run without a TUN device", parse_bool),
    )),
    ("TCP proxy", (
        _Setting("enable_kcp_proxy", ("--enable-kcp-proxy",), "value",
                 "carry TCP over KCP to the nodes that accept it", parse_bool),
        _Setting("disable_kcp_input", ("--disable-kcp-input",), "value",
                 "refuse KCP-proxied TCP; senders fall back to plain TCP", parse_bool),
        _Setting("enable_quic_proxy", ("--enable-quic-proxy",), "value",
                 "carry TCP over QUIC to the nodes that accept it (KCP goes first)",
                 parse_bool),
        _Setting("disable_quic_input", ("--disable-quic-input",), "value",
                 "refuse QUIC-proxied TCP; senders fall back to KCP or plain TCP", parse_bool),
        _Setting("use_smoltcp", ("--use-smoltcp",), "value",
                 "user-space TCP stack for the subnet, KCP and QUIC proxies", parse_bool),
    )),
    ("management and logging", (
        _Setting("rpc_portal", ("--rpc-portal", "-r"), "value",
                 "management API for pytier-cli (default: 127.0.0.1:15888)", parse_rpc_portal, "HOST:PORT"),
        _Setting("console_log_level", ("--console-log-level",), "value",
                 "stderr log level: error, warn, info (default), debug or trace",
                 _choice(LOG_LEVELS, {"warning": "warn"}), "LEVEL"),
    )),
)

_SETTINGS: tuple[_Setting, ...] = tuple(s for _, group in _GROUPS for s in group)
_BY_KEY: dict[str, _Setting] = {s.key: s for s in _SETTINGS}
# The setting a "flag" (like --no-listener) contradicts.
_BY_ATTR_FLAG = {s.attr: s.flags[0] for s in _SETTINGS if s.kind != "flag"}
_KEY_OF_ATTR = {s.attr: s.key for s in _SETTINGS if s.kind != "flag"}

# EasyTier's own config layout; named in the error so that its users know what to change.
_EASYTIER_SECTIONS = frozenset({"network_identity", "flags", "peer", "proxy_network", "console_logger",
                                "file_logger", "instance_id", "dhcp"})


# ---------------------------------------------------------------------------------------------
# Command line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see {self.prog} --help)")


def _arg_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return convert


def _split_items(parse: Callable[[str], list[Any]]) -> Callable[[str], list[Any]]:
    """Accept "a,b c" as well as one item, as EasyTier's list flags do."""

    def parse_all(text: str) -> list[Any]:
        items = [t for t in re.split(r"[,\s]+", text) if t]
        if not items:
            raise ValueError("expected at least one value")
        return [x for t in items for x in parse(t)]

    return parse_all


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Options as "-l, --listeners URL" (short form first, value named once), like EasyTier's help."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=36, width=106)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings:
            return super()._format_action_invocation(action)
        flags = sorted(action.option_strings, key=len)
        if action.nargs == 0:
            return ", ".join(flags)
        metavar = self._format_args(action, self._get_default_metavar_for_optional(action))
        return f"{', '.join(flags)} {metavar}"

    def _format_args(self, action: argparse.Action, default_metavar: str) -> str:
        if action.nargs == "+":
            return f"{action.metavar or default_metavar}..."
        return super()._format_args(action, default_metavar)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        usage="%(prog)s [options]",
        description="Run a pytier node: join a virtual network by name and secret, carry IP packets between\n"
        "nodes over UDP or TCP tunnels, and optionally carry TCP connections over KCP or QUIC.",
        epilog="Boolean flags also take a value (--no-tun false). List flags are repeatable and take\n"
        "comma-separated values. Flags given here override the --config-file. Example:\n"
        f"  sudo {PROG} --network-name net --network-secret s -i 10.144.144.1/24 \\\n"
        "      -p udp://198.18.0.2:11010 --enable-kcp-proxy",
        formatter_class=HelpFormatter,
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {version()}",
                        help="print the version and exit")
    parser.add_argument("--config-file", "-c", dest="config_file", metavar="FILE", type=Path,
                        help="read settings from a TOML file (keys are the long flag names)")
    for title, settings in _GROUPS:
        group = parser.add_argument_group(title)
        for s in settings:
            if s.kind == "flag":
                group.add_argument(*s.flags, dest=f"flag:{s.flags[0]}", action="store_true", help=s.help)
            elif s.kind == "list":
                group.add_argument(*s.flags, dest=s.attr, action="extend", nargs="+", metavar=s.metavar,
                                   type=_arg_type(_split_items(s.parse)), help=s.help)
            elif s.parse is parse_bool:
                group.add_argument(*s.flags, dest=s.attr, nargs="?", const=True, metavar="BOOL",
                                   type=_arg_type(parse_bool), help=s.help)
            else:
                group.add_argument(*s.flags, dest=s.attr, metavar=s.metavar, type=_arg_type(s.parse),
                                   help=s.help)
    return parser


def _command_line_values(ns: argparse.Namespace) -> dict[str, Any]:
    given = vars(ns)
    values: dict[str, Any] = {}
    for s in _SETTINGS:
        if s.kind == "flag":
            if given.get(f"flag:{s.flags[0]}"):
                if s.attr in given:
                    raise ConfigError(f"{s.flags[0]} conflicts with {_BY_ATTR_FLAG[s.attr]}")
                values[s.attr] = []
        elif s.attr in given:
            value = given[s.attr]
            values[s.attr] = _dedup(x for chunk in value for x in chunk) if s.kind == "list" else value
    return values


def _dedup(items: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(items))


# ---------------------------------------------------------------------------------------------
# TOML file


def _file_values(path: Path) -> dict[str, Any]:
    where = f"config file {path}"
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read {where}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: invalid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not UTF-8 text") from None

    values: dict[str, Any] = {}
    seen: set[str] = set()
    for raw_key, raw in data.items():
        key = raw_key.replace("-", "_")
        s = _BY_KEY.get(key)
        if s is None:
            raise ConfigError(f"{where}: {_unknown_key_message(raw_key)}")
        if key in seen:
            raise ConfigError(f"{where}: {key} is set twice (once with dashes, once with underscores)")
        seen.add(key)
        try:
            value = _toml_value(s, raw)
        except ValueError as e:
            raise ConfigError(f"{where}: {raw_key}: {e}") from None
        if s.kind == "flag":
            if value:
                if any(k.replace("-", "_") == _KEY_OF_ATTR[s.attr] for k in data):
                    raise ConfigError(f"{where}: {raw_key} conflicts with {_KEY_OF_ATTR[s.attr]}")
                values[s.attr] = []
        else:
            values[s.attr] = value
    return values


def _unknown_key_message(raw_key: str) -> str:
    key = raw_key.replace("-", "_")
    if key in _EASYTIER_SECTIONS:
        return (f"unknown key {raw_key!r}: pytier config files use flat keys named after the long flags "
                f"(network_name = \"...\", peers = [\"udp://...\"], enable_kcp_proxy = true), "
                "not EasyTier's layout")
    if key == "config_file":
        return f"{raw_key} cannot be set inside a config file"
    close = difflib.get_close_matches(key, list(_BY_KEY), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else f" (see {PROG} --help for the settings)"
    return f"unknown key {raw_key!r}{hint}"


def _toml_scalar(raw: Any) -> str:
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        raise ValueError(f"expected a string or number, got {_toml_type(raw)}")
    return str(raw)


def _toml_type(raw: Any) -> str:
    if isinstance(raw, bool):
        return "true" if raw else "false"
    names = {str: "a string", int: "a number", float: "a number", list: "an array", dict: "a table"}
    return names.get(type(raw), type(raw).__name__)


def _toml_value(s: _Setting, raw: Any) -> Any:
    if s.parse is parse_bool or s.kind == "flag":
        if not isinstance(raw, bool):
            raise ValueError(f"expected true or false, got {_toml_type(raw)}")
        return raw
    if s.kind == "list":
        items = raw if isinstance(raw, list) else [raw]
        return _dedup(x for item in items for x in _split_items(s.parse)(_toml_scalar(item)))
    return s.parse(_toml_scalar(raw))


# ---------------------------------------------------------------------------------------------
# Entry points


def parse_config(argv: Sequence[str]) -> Config:
    """Build a Config from command-line arguments (and the TOML file they name). Raises ConfigError.

    --help and --version print and raise SystemExit(0), as argparse does.
    """
    ns = build_parser().parse_args(list(argv))
    values: dict[str, Any] = {}
    config_file: Path | None = getattr(ns, "config_file", None)
    if config_file is not None:
        values.update(_file_values(config_file))
    values.update(_command_line_values(ns))
    return Config(**values, config_file=config_file)


def load_config(argv: Sequence[str]) -> Config:
    """parse_config for the command line: on error print one line to stderr and exit with status 2."""
    try:
        return parse_config(argv)
    except ConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


__all__ = [
    "DEFAULT_RPC_PORTAL",
    "DEFAULT_TUNNEL_PORT",
    "Config",
    "ConfigError",
    "HelpFormatter",
    "TunnelUrl",
    "build_parser",
    "load_config",
    "parse_config",
    "version",
]
