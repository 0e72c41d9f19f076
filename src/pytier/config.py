"""pytier-core's settings: command-line flags, PYTIER_* variables and TOML files, merged into one `Config`.

Flag names follow EasyTier's, so that its documentation reads true for pytier. A TOML file given
with `--config-file` carries the settings either under the long flag names (`network_name = "net"`,
`enable_kcp_proxy = true`) or in EasyTier 2.6's own sectioned layout (`[network_identity]`, `[[peer]]`,
`[flags]`, ...), so that an EasyTier node's file works unchanged. Flags override PYTIER_* variables,
which override the files, later files overriding earlier ones. Every error is one line that names the
flag, variable or key (with its line) at fault; a key pytier knows but does not implement is a warning.
"""

from __future__ import annotations

import argparse
import difflib
import ipaddress
import math
import os
import re
import socket
import sys
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from ipaddress import IPv4Interface, IPv4Network, IPv6Network
from pathlib import Path
from typing import Any, Literal, NoReturn, cast

from pytier.argtypes import arg_type

PROG = "pytier-core"
DEFAULT_TUNNEL_PORT = 11010
DEFAULT_RPC_PORTAL = ("127.0.0.1", 15888)
# EasyTier's default: only clients on this host, whatever address the portal is bound to.
DEFAULT_RPC_PORTAL_WHITELIST = (IPv4Network("127.0.0.0/8"), IPv6Network("::1/128"))
MTU_MIN = 576
MTU_MAX = 9000
DEV_NAME_MAX_LEN = 15  # Linux IFNAMSIZ (16) minus the terminating NUL
DEFAULT_STATE_DIR = Path("/run/pytier")
LOG_LEVELS = ("error", "warn", "info", "debug", "trace")
FILE_LOG_LEVELS = ("off", *LOG_LEVELS)
DEFAULT_FILE_LOG_SIZE = 100 * 1024 * 1024
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


@dataclass(frozen=True)
class ProxyNetwork:
    """A local subnet this node exports: under its own prefix, or (EasyTier's CIDR->MAPPED_CIDR) under
    `mapped`, a prefix of the same length that peers route to this node and that it translates back."""

    cidr: IPv4Network
    mapped: IPv4Network | None = None

    @property
    def exported(self) -> IPv4Network:
        """The prefix other nodes see in this node's route info and route to it."""
        return self.cidr if self.mapped is None else self.mapped

    def __str__(self) -> str:
        return str(self.cidr) if self.mapped is None else f"{self.cidr}->{self.mapped}"


def parse_proxy_network(text: str) -> list[ProxyNetwork]:
    """CIDR, or CIDR->MAPPED_CIDR with the same prefix length."""
    real, arrow, mapped = text.strip().partition("->")
    net = parse_cidr(real)
    if not arrow:
        return [ProxyNetwork(net)]
    to = parse_cidr(mapped)
    if to.prefixlen != net.prefixlen:
        raise ValueError(f"{text.strip()!r}: the mapped network {to} must have the prefix length of "
                         f"{net} (/{net.prefixlen})")
    return [ProxyNetwork(net, to)]


def parse_cidr(text: str) -> IPv4Network:
    text = text.strip()
    try:
        return IPv4Network(text)
    except ValueError:
        pass
    try:
        loose = IPv4Network(text, strict=False)
    except ValueError:
        raise ValueError(f"invalid IPv4 network {text!r} (expected e.g. 192.168.50.0/24)") from None
    raise ValueError(f"{text!r} has host bits set; did you mean {loose}?")


def parse_rpc_portal(text: str) -> tuple[str, int]:
    """HOST:PORT of the management API, or a bare PORT on 127.0.0.1."""
    return _parse_local_address(text, "127.0.0.1:15888")


def parse_whitelist_entry(text: str) -> list[IPv4Network | IPv6Network]:
    """An IPv4 or IPv6 CIDR, or a bare address (one host)."""
    text = text.strip()
    try:
        return [ipaddress.ip_network(text)]
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"invalid address or CIDR {text!r} (expected e.g. 198.18.0.0/15 or ::1)") from None
    raise ValueError(f"{text!r} has host bits set; did you mean {loose}?")


def parse_metrics_listen(text: str) -> tuple[str, int]:
    """HOST:PORT of the Prometheus endpoint, or a bare PORT on 127.0.0.1."""
    return _parse_local_address(text, "127.0.0.1:9110")


def _parse_local_address(text: str, example: str) -> tuple[str, int]:
    text = text.strip()
    if text.isdigit():
        return DEFAULT_RPC_PORTAL[0], _parse_port(text, text)
    host, port = split_host_port(text)
    if port is None:
        raise ValueError(f"{text!r} has no port (expected e.g. {example})")
    if host == "localhost":
        host = "127.0.0.1"
    if not _is_ip(host):
        raise ValueError(f"{host!r} in {text!r} is not an IP address (expected e.g. {example})")
    return ipaddress.ip_address(host).compressed, port


_SIZE_UNITS = {"": 1024**2, "B": 1, "K": 1024, "KB": 1024, "KIB": 1024, "M": 1024**2, "MB": 1024**2,
               "MIB": 1024**2, "G": 1024**3, "GB": 1024**3, "GIB": 1024**3}


def parse_size(text: str) -> int:
    """A file size such as 100M, 512K or 1G (binary units); a bare number is megabytes, as EasyTier's
    [file_logger] size_mb."""
    m = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", text)
    unit = _SIZE_UNITS.get(m.group(2).upper()) if m else None
    if m is None or unit is None:
        raise ValueError(f"invalid size {text!r} (expected e.g. 100M, 512K or 1G)")
    size = int(m.group(1)) * unit
    if size < 1024:
        raise ValueError(f"size {text!r} is below the minimum of 1K")
    return size


def format_size(size: int) -> str:
    for suffix, unit in (("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if size % unit == 0:
            return f"{size // unit}{suffix}"
    return f"{size}B"


def parse_count(text: str) -> int:
    text = text.strip()
    if not text.isdigit() or not 1 <= int(text) <= 1000:
        raise ValueError(f"invalid count {text!r}: expected a whole number 1..1000")
    return int(text)


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


def parse_state_dir(text: str) -> Path:
    if not text.strip():
        raise ValueError("the state directory cannot be empty")
    return Path(text)


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

TUN_OFFLOAD_MODES = ("coalesce", "tso", "off")
PROXY_TRANSPORTS = ("kcp", "quic", "auto")


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
    rpc_portal_whitelist: list[IPv4Network | IPv6Network] = field(
        default_factory=lambda: list(DEFAULT_RPC_PORTAL_WHITELIST)
    )
    hostname: str = field(default_factory=socket.gethostname)
    instance_name: str = "default"
    console_log_level: str = "info"
    file_log_level: str = "off"
    file_log_dir: str = "."
    file_log_name: str = "pytier.log"
    file_log_size: int = DEFAULT_FILE_LOG_SIZE
    file_log_count: int = 10
    encryption_algorithm: str = "aes-gcm"
    disable_encryption: bool = False
    proxy_networks: list[ProxyNetwork] = field(default_factory=list)
    enable_kcp_proxy: bool = False
    disable_kcp_input: bool = False
    enable_quic_proxy: bool = False
    disable_quic_input: bool = False
    proxy_transport: str | None = None  # None: --enable-kcp-proxy / --enable-quic-proxy decide
    use_smoltcp: bool = False
    no_tun: bool = False
    tun_offload: str = "coalesce"
    disable_udp_offload: bool = False
    state_dir: Path = DEFAULT_STATE_DIR
    peer_timeout_s: float = 30.0
    latency_first: bool = False
    enable_fec_udp: bool = False
    enable_fec_kcp: bool = False
    metrics_listen: tuple[str, int] | None = None  # None: no metrics endpoint
    config_file: Path | None = None  # the last --config-file, whose values win


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
                 "export subnet A, e.g. 192.168.50.0/24; A->B: export it as prefix B",
                 parse_proxy_network, "A[->B]"),
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
        _Setting("latency_first", ("--latency-first",), "value",
                 "route own traffic by link latency and loss, not hop count", parse_bool),
        _Setting("enable_fec_udp", ("--enable-fec-udp",), "value",
                 "protect UDP toward pytier peers with adaptive FEC (off on clean paths)", parse_bool),
        _Setting("enable_fec_kcp", ("--enable-fec-kcp",), "value",
                 "protect the KCP proxy toward pytier peers with FEC (off on clean paths)", parse_bool),
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
        _Setting("tun_offload", ("--tun-offload",), "value",
                 "coalesce (default): super-segments to the kernel; tso: both ways; off",
                 _choice(TUN_OFFLOAD_MODES), "MODE"),
        _Setting("disable_udp_offload", ("--disable-udp-offload",), "value",
                 "no UDP GSO/GRO batching on udp tunnels", parse_bool),
        _Setting("state_dir", ("--state-dir",), "value",
                 f"where to note host changes, undone after a crash (default: {DEFAULT_STATE_DIR})",
                 parse_state_dir, "DIR"),
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
        _Setting("proxy_transport", ("--proxy-transport",), "value",
                 "carry own TCP over kcp, quic or auto (by port, loss and RTT)",
                 _choice(PROXY_TRANSPORTS), "MODE"),
        _Setting("use_smoltcp", ("--use-smoltcp",), "value",
                 "user-space TCP stack for the subnet, KCP and QUIC proxies", parse_bool),
    )),
    ("management and logging", (
        _Setting("rpc_portal", ("--rpc-portal", "-r"), "value",
                 "management API for pytier-cli (default: 127.0.0.1:15888)", parse_rpc_portal, "HOST:PORT"),
        _Setting("rpc_portal_whitelist", ("--rpc-portal-whitelist",), "list",
                 "clients the management API answers (default: 127.0.0.0/8,::1/128)",
                 parse_whitelist_entry, "CIDR"),
        _Setting("metrics_listen", ("--metrics-listen",), "value",
                 "serve Prometheus metrics at http://HOST:PORT/metrics (default: off)",
                 parse_metrics_listen, "HOST:PORT"),
        _Setting("console_log_level", ("--console-log-level",), "value",
                 "stderr log level: error, warn, info (default), debug or trace",
                 _choice(LOG_LEVELS, {"warning": "warn"}), "LEVEL"),
        _Setting("file_log_level", ("--file-log-level",), "value",
                 "file log level: off (default), error, warn, info, debug or trace",
                 _choice(FILE_LOG_LEVELS, {"warning": "warn"}), "LEVEL"),
        _Setting("file_log_dir", ("--file-log-dir",), "value",
                 "directory of the log file, created if missing (default: .)",
                 _nonempty("log directory"), "DIR"),
        _Setting("file_log_name", ("--file-log-name",), "value",
                 "name of the log file in that directory (default: pytier.log)",
                 _nonempty("log file name"), "NAME"),
        _Setting("file_log_size", ("--file-log-size",), "value",
                 "rotate the log file at this size: 100M (default), 512K, 1G",
                 parse_size, "SIZE"),
        _Setting("file_log_count", ("--file-log-count",), "value",
                 "how many rotated log files to keep (default: 10)", parse_count, "N"),
    )),
)

_SETTINGS: tuple[_Setting, ...] = tuple(s for _, group in _GROUPS for s in group)
_BY_KEY: dict[str, _Setting] = {s.key: s for s in _SETTINGS}
# The setting a "flag" (like --no-listener) contradicts.
_BY_ATTR_FLAG = {s.attr: s.flags[0] for s in _SETTINGS if s.kind != "flag"}
_KEY_OF_ATTR = {s.attr: s.key for s in _SETTINGS if s.kind != "flag"}


# ---------------------------------------------------------------------------------------------
# Command line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see {self.prog} --help)")


def _split_items(parse: Callable[[str], list[Any]]) -> Callable[[str], list[Any]]:
    """Accept "a,b c" as well as one item, as EasyTier's list flags do."""

    def parse_all(text: str) -> list[Any]:
        # "A -> B" is one item (a mapped proxy network), not three.
        items = [t for t in re.split(r"[,\s]+", re.sub(r"\s*->\s*", "->", text)) if t]
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
        "comma-separated values. Flags given here override PYTIER_<FLAG> variables (PYTIER_NETWORK_NAME),\n"
        "which override the --config-file(s). Example:\n"
        f"  sudo {PROG} --network-name net --network-secret s -i 10.144.144.1/24 \\\n"
        "      -p udp://198.18.0.2:11010 --enable-kcp-proxy",
        formatter_class=HelpFormatter,
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {version()}",
                        help="print the version and exit")
    parser.add_argument("--config-file", "-c", dest="config_file", metavar="FILE", type=Path,
                        action="extend", nargs="+",
                        help="read settings from TOML files (flat or EasyTier's layout), in order")
    parser.add_argument("--check-config", dest="check_config", action="store_true",
                        help="print the effective settings and exit (status 2 on an error)")
    for title, settings in _GROUPS:
        group = parser.add_argument_group(title)
        for s in settings:
            if s.kind == "flag":
                group.add_argument(*s.flags, dest=f"flag:{s.flags[0]}", action="store_true", help=s.help)
            elif s.kind == "list":
                group.add_argument(*s.flags, dest=s.attr, action="extend", nargs="+", metavar=s.metavar,
                                   type=arg_type(_split_items(s.parse)), help=s.help)
            elif s.parse is parse_bool:
                group.add_argument(*s.flags, dest=s.attr, nargs="?", const=True, metavar="BOOL",
                                   type=arg_type(parse_bool), help=s.help)
            else:
                group.add_argument(*s.flags, dest=s.attr, metavar=s.metavar, type=arg_type(s.parse),
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
# TOML files: pytier's flat keys and EasyTier's sectioned layout, read by one reader


class _UnsetVariable(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


# EasyTier expands shell-style references in its config files: ${NAME}, ${NAME:-default}, $NAME, and
# $$ for a literal $. pytier reads the same files, so it expands the same forms.
_VAR_RE = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def _expand(text: str, environ: Mapping[str, str]) -> str:
    def substitute(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(3)
        value = environ.get(name)
        if m.group(2) is not None and not value:  # as in the shell, ":-" also replaces an empty value
            return m.group(2)
        if value is None:
            raise _UnsetVariable(name)
        return value

    return _VAR_RE.sub(substitute, text)


def _expand_all(raw: Any, environ: Mapping[str, str]) -> Any:
    if isinstance(raw, str):
        return _expand(raw, environ)
    if isinstance(raw, list):
        return [_expand_all(x, environ) for x in raw]
    if isinstance(raw, dict):
        return {k: _expand_all(v, environ) for k, v in raw.items()}
    return raw


_HEADER_RE = re.compile(r"""^\s*\[{1,2}\s*["']?([^\[\]"']+?)["']?\s*\]{1,2}""")


class _Source:
    """One config file's lines, to name the line of a key in messages (tomllib gives no positions)."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()

    def where(self, line: int | None) -> str:
        return f"config file {self.path}" + (f" line {line}" if line else "")

    def line_of(self, key: str | None, table: str | None = None, nth: int = 0) -> int | None:
        """The line of `key` in the `nth` [table] or [[table]] (top level: table None), or of that
        table's header when `key` is None or not found there."""
        key_re = re.compile(rf"""^\s*["']?{re.escape(key)}["']?\s*=""") if key else None
        current: str | None = None
        seen = -1
        header: int | None = None
        for number, line in enumerate(self.lines, 1):
            m = _HEADER_RE.match(line)
            if m:
                current = m.group(1).strip()
                if current == table:
                    seen += 1
                    if seen == nth:
                        header = number
            elif (key_re is not None and current == table and (table is None or seen == nth)
                  and key_re.match(line)):
                return number
        if key_re is not None and header is None:
            # Inline tables and dotted keys (flags.mtu = 1400): the first line that names the key.
            loose = re.compile(rf"""(^|[\s{{,.])["']?{re.escape(key or '')}["']?\s*=""")
            for number, line in enumerate(self.lines, 1):
                if loose.search(line):
                    return number
        return header

    def line_with(self, snippet: str) -> int | None:
        return next((n for n, line in enumerate(self.lines, 1) if snippet in line), None)


_Type = Literal["str", "bool", "int", "strs", "table", "tables"]
_TYPE_NAMES = {"str": "a string", "bool": "true or false", "int": "a number", "strs": "an array of strings",
               "table": "a table", "tables": "an array of tables"}


def _check_type(kind: _Type, raw: Any) -> None:
    ok = {
        "str": isinstance(raw, str),
        "bool": isinstance(raw, bool),
        "int": isinstance(raw, int) and not isinstance(raw, bool),
        "strs": isinstance(raw, list) and all(isinstance(x, str) for x in raw),
        "table": isinstance(raw, dict),
        "tables": isinstance(raw, list) and all(isinstance(x, dict) for x in raw),
    }[kind]
    if not ok:
        raise ValueError(f"expected {_TYPE_NAMES[kind]}, got {_toml_type(raw)}")


def _same(raw: Any) -> Any:
    return raw


@dataclass(frozen=True)
class _Known:
    """A key of EasyTier's layout: what pytier does with it."""

    type: _Type
    attr: str | None = None  # the Config attribute it sets; None: pytier does not implement it
    convert: Callable[[Any], Any] = _same
    # Values under which pytier already does what the key asks (the first one is what pytier does), so
    # that no warning is due.
    quiet: tuple[Any, ...] = ()
    absent: tuple[Any, ...] = ()  # EasyTier's "use the default" values: as if the key were not there
    unused_by_easytier: bool = False  # EasyTier 2.6 reads and ignores it too


def _text(parse: Callable[[str], Any]) -> Callable[[Any], Any]:
    return lambda raw: parse(str(raw))


_FLAGS: dict[str, _Known] = {
    "default_protocol": _Known("str", quiet=("tcp",)),
    "dev_name": _Known("str", "dev_name", parse_dev_name, absent=("",)),
    "enable_encryption": _Known("bool", "disable_encryption", lambda on: not on),
    "enable_ipv6": _Known("bool", quiet=(True,)),
    "mtu": _Known("int", "mtu", _text(parse_mtu)),
    "latency_first": _Known("bool", "latency_first"),
    "enable_exit_node": _Known("bool", quiet=(False,)),
    "no_tun": _Known("bool", "no_tun"),
    "use_smoltcp": _Known("bool", "use_smoltcp"),
    "relay_network_whitelist": _Known("str", quiet=("",)),
    "disable_p2p": _Known("bool", quiet=(True,)),
    "relay_all_peer_rpc": _Known("bool", quiet=(False,)),
    "disable_udp_hole_punching": _Known("bool", quiet=(True,)),
    "multi_thread": _Known("bool", quiet=(True,)),
    "data_compress_algo": _Known("int", quiet=(1, 0)),  # CompressionAlgoPb: 1 None (0 unset), 2 Zstd
    "bind_device": _Known("bool", quiet=(False,)),
    "enable_kcp_proxy": _Known("bool", "enable_kcp_proxy"),
    "disable_kcp_input": _Known("bool", "disable_kcp_input"),
    "disable_relay_kcp": _Known("bool", quiet=(False,)),
    "proxy_forward_by_system": _Known("bool", quiet=(False,)),
    "accept_dns": _Known("bool", quiet=(False,)),
    "private_mode": _Known("bool", quiet=(False,)),
    "enable_quic_proxy": _Known("bool", "enable_quic_proxy"),
    "disable_quic_input": _Known("bool", "disable_quic_input"),
    "foreign_relay_bps_limit": _Known("int", quiet=(2**64 - 1,)),
    "multi_thread_count": _Known("int", quiet=(2,)),
    "enable_relay_foreign_network_kcp": _Known("bool", quiet=(False,)),
    "encryption_algorithm": _Known("str", "encryption_algorithm", _choice(ENCRYPTION_ALGORITHMS),
                                   absent=("",)),
    "disable_sym_hole_punching": _Known("bool", quiet=(True,)),
    "tld_dns_zone": _Known("str", quiet=("et.net.", "")),
    "p2p_only": _Known("bool", quiet=(False,)),
    "quic_listen_port": _Known("int", unused_by_easytier=True),
    "disable_tcp_hole_punching": _Known("bool", quiet=(True,)),
    "disable_relay_quic": _Known("bool", quiet=(False,)),
    "enable_relay_foreign_network_quic": _Known("bool", quiet=(False,)),
    "lazy_p2p": _Known("bool", quiet=(False,)),
    "need_p2p": _Known("bool", quiet=(False,)),
    "instance_recv_bps_limit": _Known("int", quiet=(0, 2**64 - 1)),
    "disable_upnp": _Known("bool", quiet=(True,)),
    "disable_relay_data": _Known("bool", quiet=(False,)),
    "enable_udp_broadcast_relay": _Known("bool", quiet=(False,)),
}

# Top-level keys of EasyTier's layout that are not also pytier flags (hostname, instance_name, ipv4,
# listeners, rpc_portal and rpc_portal_whitelist are both, and mean the same in either layout).
_TOP: dict[str, _Known] = {
    "netns": _Known("str"),
    "instance_id": _Known("str"),
    "ipv6": _Known("str"),
    "ipv6_public_addr_provider": _Known("bool", quiet=(False,)),
    "ipv6_public_addr_auto": _Known("bool", quiet=(False,)),
    "ipv6_public_addr_prefix": _Known("str"),
    "dhcp": _Known("bool", quiet=(False,)),
    "mapped_listeners": _Known("strs"),
    "exit_nodes": _Known("strs"),
    "vpn_portal_config": _Known("table"),
    "routes": _Known("strs"),
    "socks5_proxy": _Known("str"),
    "port_forward": _Known("tables"),
    "secure_mode": _Known("table", quiet=({"enabled": False},)),
    "acl": _Known("table"),
    "tcp_whitelist": _Known("strs"),
    "udp_whitelist": _Known("strs"),
    "stun_servers": _Known("strs"),
    "stun_servers_v6": _Known("strs"),
    "tcp_stun_servers": _Known("strs"),
    "credential_file": _Known("str"),
}

_NETWORK_IDENTITY: dict[str, _Known] = {
    "network_name": _Known("str", "network_name", _nonempty("network name")),
    "network_secret": _Known("str", "network_secret"),
}
_CONSOLE_LOGGER: dict[str, _Known] = {
    "level": _Known("str", "console_log_level", _choice(LOG_LEVELS, {"warning": "warn"})),
}
_FILE_LOGGER: dict[str, _Known] = {
    "level": _Known("str", "file_log_level", _choice(FILE_LOG_LEVELS, {"warning": "warn"}), absent=("",)),
    "file": _Known("str", "file_log_name", _nonempty("log file name"), absent=("",)),
    "dir": _Known("str", "file_log_dir", _nonempty("log directory"), absent=("",)),
    # Newer EasyTier versions' rotation keys.
    "size_mb": _Known("int", "file_log_size", _text(parse_size)),
    "count": _Known("int", "file_log_count", _text(parse_count)),
}
_TABLES: dict[str, dict[str, _Known]] = {
    "network_identity": _NETWORK_IDENTITY, "flags": _FLAGS, "console_logger": _CONSOLE_LOGGER,
    "file_logger": _FILE_LOGGER,
}
_PEER_KEYS = ("uri",)
_PROXY_NETWORK_KEYS = ("cidr", "mapped_cidr", "allow")
# EasyTier tunnel schemes pytier does not speak: a listener or [[peer]] with one is skipped with a warning,
# so that EasyTier's usual listener lists (tcp, udp, wg, ws, wss, quic on neighbouring ports) still load.
_EASYTIER_SCHEMES = ("wg", "ws", "wss", "quic", "faketcp", "txt", "srv", "http", "https", "ring", "unix")
# Settings that several files, and both layouts within a file, add to instead of replacing.
_ACCUMULATE = frozenset({"peers", "proxy_networks"})


def _toml_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_literal(x) for x in value) + "]"
    return _toml_literal(str(value))


@dataclass
class _FileSettings:
    source: _Source
    values: dict[str, Any] = field(default_factory=dict)  # Config attribute -> value
    names: dict[str, str] = field(default_factory=dict)  # Config attribute -> the key that set it
    warnings: list[str] = field(default_factory=list)

    def put(self, attr: str, value: Any, name: str, line: int | None) -> None:
        if attr in self.values:
            if attr not in _ACCUMULATE:
                raise ConfigError(f"{self.source.where(line)}: {name} is set twice "
                                  f"(also as {self.names[attr]})")
            value = _dedup([*self.values[attr], *value])
        if attr == "proxy_networks" and (overlap := _mapped_overlap(value)) is not None:
            raise ConfigError(f"{self.source.where(line)}: {name}: {overlap}")
        self.values[attr] = value
        self.names[attr] = name

    def not_implemented(self, name: str, line: int | None, detail: str) -> None:
        self.warnings.append(f"{self.source.where(line)}: pytier does not implement {name}{detail}")


def _unknown_key(src: _Source, line: int | None, label: str, key: str, known: Iterable[str]) -> ConfigError:
    close = difflib.get_close_matches(key.replace("-", "_"), list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else f" (see {PROG} --help for the settings)"
    return ConfigError(f"{src.where(line)}: unknown key {label}{key!r}{hint}")


def _known_value(out: _FileSettings, name: str, spec: _Known, raw: Any, line: int | None) -> None:
    where = out.source.where(line)
    try:
        _check_type(spec.type, raw)
    except ValueError as e:
        raise ConfigError(f"{where}: {name}: {e}") from None
    if raw in spec.absent or spec.unused_by_easytier:
        return
    if spec.attr is None:
        if raw in spec.quiet or raw in ("", [], {}):  # an empty value asks for nothing
            return
        key = name.rsplit(" ", 1)[-1]
        shown = f" = {_toml_literal(raw)}" if spec.type in ("str", "bool", "int") else ""
        behaves = f"; pytier behaves as {key} = {_toml_literal(spec.quiet[0])}" if spec.quiet else "; ignored"
        out.not_implemented(name, line, shown + behaves)
        return
    try:
        value = spec.convert(raw)
    except ValueError as e:
        raise ConfigError(f"{where}: {name}: {e}") from None
    out.put(spec.attr, value, name, line)


def _read_table(out: _FileSettings, section: str, raw: Any, keys: dict[str, _Known]) -> None:
    src = out.source
    try:
        _check_type("table", raw)
    except ValueError as e:
        raise ConfigError(f"{src.where(src.line_of(section))}: {section}: {e}") from None
    for key, value in raw.items():
        line = src.line_of(key, section)
        spec = keys.get(key)
        if spec is None:
            raise _unknown_key(src, line, f"[{section}] ", key, keys)
        _known_value(out, f"[{section}] {key}", spec, value, line)


def _tables(out: _FileSettings, section: str, raw: Any,
            keys: Sequence[str]) -> Iterator[tuple[dict[str, Any], int | None]]:
    """Each [[section]] table with its header line, after checking that it holds only `keys`."""
    src = out.source
    try:
        _check_type("tables", raw)
    except ValueError as e:
        raise ConfigError(f"{src.where(src.line_of(section))}: {section}: {e}") from None
    for nth, table in enumerate(raw):
        for key in table:
            if key not in keys:
                raise _unknown_key(src, src.line_of(key, section, nth), f"[[{section}]] ", key, keys)
        yield table, src.line_of(None, section, nth)


def _table_string(out: _FileSettings, section: str, table: dict[str, Any], key: str, header: int | None,
                  nth: int) -> str:
    line = out.source.line_of(key, section, nth) or header
    if key not in table:
        raise ConfigError(f"{out.source.where(header)}: [[{section}]] has no {key}")
    try:
        _check_type("str", table[key])
    except ValueError as e:
        raise ConfigError(f"{out.source.where(line)}: [[{section}]] {key}: {e}") from None
    return cast(str, table[key])


def _foreign_scheme(text: str) -> bool:
    return text.strip().partition("://")[0].lower() in _EASYTIER_SCHEMES and "://" in text


def _skip_foreign(out: _FileSettings, name: str, url: str, line: int | None) -> None:
    scheme = url.strip().partition("://")[0].lower()
    out.not_implemented(f"{scheme}:// tunnels", line,
                        f" (it speaks udp:// and tcp://); skipping {name} {url.strip()!r}")


def _read_peers(out: _FileSettings, raw: Any) -> None:
    for nth, (table, header) in enumerate(_tables(out, "peer", raw, _PEER_KEYS)):
        uri = _table_string(out, "peer", table, "uri", header, nth)
        line = out.source.line_of("uri", "peer", nth) or header
        if _foreign_scheme(uri):
            _skip_foreign(out, "[[peer]] uri", uri, line)
            continue
        try:
            peers = parse_peer(uri)
        except ValueError as e:
            raise ConfigError(f"{out.source.where(line)}: [[peer]] uri: {e}") from None
        out.put("peers", peers, "[[peer]] uri", line)


def _mapped_overlap(nets: Sequence[ProxyNetwork]) -> str | None:
    """Why `nets` are ambiguous, if they are: an address of a mapped prefix stands for one real address."""
    for i, a in enumerate(nets):
        for b in nets[i + 1:]:
            if (a.mapped is not None or b.mapped is not None) and a.exported.overlaps(b.exported):
                return (f"proxy networks {a} and {b} export overlapping prefixes "
                        f"({a.exported} and {b.exported})")
    return None


def _proxy_network_cidr(out: _FileSettings, table: dict[str, Any], key: str, header: int | None,
                        nth: int) -> tuple[IPv4Network, int | None]:
    """A CIDR of the nth [[proxy_network]] table, and its line."""
    text = _table_string(out, "proxy_network", table, key, header, nth)
    line = out.source.line_of(key, "proxy_network", nth) or header
    if "->" in text:
        raise ConfigError(f"{out.source.where(line)}: [[proxy_network]] {key}: {text!r}: in this table the "
                          "mapped prefix goes in its own key, mapped_cidr")
    try:
        net = parse_cidr(text)
    except ValueError as e:
        raise ConfigError(f"{out.source.where(line)}: [[proxy_network]] {key}: {e}") from None
    return net, line


def _read_proxy_networks(out: _FileSettings, raw: Any) -> None:
    src = out.source
    for nth, (table, header) in enumerate(_tables(out, "proxy_network", raw, _PROXY_NETWORK_KEYS)):
        net, line = _proxy_network_cidr(out, table, "cidr", header, nth)
        if "allow" in table:
            allow_line = src.line_of("allow", "proxy_network", nth) or header
            _known_value(out, "[[proxy_network]] allow", _Known("strs"), table["allow"], allow_line)
        if "mapped_cidr" not in table:
            out.put("proxy_networks", [ProxyNetwork(net)], "[[proxy_network]] cidr", line)
            continue
        mapped, mapped_line = _proxy_network_cidr(out, table, "mapped_cidr", header, nth)
        if mapped.prefixlen != net.prefixlen:
            raise ConfigError(f"{src.where(mapped_line)}: [[proxy_network]] mapped_cidr {mapped} must have "
                              f"the prefix length of cidr {net} (/{net.prefixlen})")
        out.put("proxy_networks", [ProxyNetwork(net, mapped)], "[[proxy_network]] mapped_cidr", mapped_line)


def _flat_listeners(out: _FileSettings, raw: Any, raw_key: str, line: int | None) -> Any:
    if not isinstance(raw, list):
        return raw
    kept = []
    for item in raw:
        if isinstance(item, str) and _foreign_scheme(item):
            _skip_foreign(out, raw_key, item, line)
        else:
            kept.append(item)
    return kept


def _read_file(path: Path, environ: Mapping[str, str]) -> _FileSettings:
    where = f"config file {path}"
    try:
        text = path.read_bytes().decode()
        data = tomllib.loads(text)
    except OSError as e:
        raise ConfigError(f"cannot read {where}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: invalid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not UTF-8 text") from None
    src = _Source(path, text)
    try:
        data = _expand_all(data, environ)
    except _UnsetVariable as e:
        line = src.line_with("${" + e.name) or src.line_with("$" + e.name)
        raise ConfigError(f"{src.where(line)}: environment variable {e.name} is not set "
                          "(write $$ for a literal $)") from None

    out = _FileSettings(src)
    seen: set[str] = set()
    for raw_key, raw in data.items():
        key = raw_key.replace("-", "_")
        line = src.line_of(raw_key)
        if key in _TABLES:
            _read_table(out, key, raw, _TABLES[key])
        elif key == "peer":
            _read_peers(out, raw)
        elif key == "proxy_network":
            _read_proxy_networks(out, raw)
        elif key in _TOP:
            _known_value(out, key, _TOP[key], raw, line)
        elif key in _BY_KEY:
            if key in seen:
                raise ConfigError(f"{src.where(line)}: {key} is set twice "
                                  "(once with dashes, once with underscores)")
            seen.add(key)
            _read_flat(out, raw_key, raw, line, data)
        elif key == "config_file":
            raise ConfigError(f"{src.where(line)}: {raw_key} cannot be set inside a config file")
        else:
            raise _unknown_key(src, line, "", raw_key, [*_BY_KEY, *_TABLES, "peer", "proxy_network", *_TOP])
    return out


def _read_flat(out: _FileSettings, raw_key: str, raw: Any, line: int | None, data: dict[str, Any]) -> None:
    """A key named after a long flag (pytier's own layout)."""
    s = _BY_KEY[raw_key.replace("-", "_")]
    where = out.source.where(line)
    if s.key == "listeners":
        raw = _flat_listeners(out, raw, raw_key, line)
    try:
        value = _toml_value(s, raw)
    except ValueError as e:
        raise ConfigError(f"{where}: {raw_key}: {e}") from None
    if s.kind != "flag":
        out.put(s.attr, value, raw_key, line)
    elif value:
        if any(k.replace("-", "_") == _KEY_OF_ATTR[s.attr] for k in data):
            raise ConfigError(f"{where}: {raw_key} conflicts with {_KEY_OF_ATTR[s.attr]}")
        out.put(s.attr, [], raw_key, line)


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
# Environment


ENV_PREFIX = "PYTIER_"


def _env_values(environ: Mapping[str, str]) -> dict[str, Any]:
    """PYTIER_<KEY> for every setting (PYTIER_NETWORK_NAME, PYTIER_PEERS="udp://a,udp://b"). An empty
    variable counts as unset, as a unit file's `Environment=PYTIER_IPV4=` leaves it."""
    values: dict[str, Any] = {}
    names: dict[str, str] = {}
    for s in _SETTINGS:
        name = ENV_PREFIX + s.key.upper()
        text = environ.get(name, "")
        if not text:
            continue
        try:
            if s.kind == "flag":
                if not parse_bool(text):
                    continue
                if s.attr in values:
                    raise ConfigError(f"environment variable {name} conflicts with {names[s.attr]}")
                value: Any = []
            elif s.kind == "list":
                value = _dedup(_split_items(s.parse)(text))
            else:
                value = s.parse(text)
        except ValueError as e:
            raise ConfigError(f"environment variable {name}: {e}") from None
        values[s.attr] = value
        names[s.attr] = name
    return values


# ---------------------------------------------------------------------------------------------
# Entry points


@dataclass
class Invocation:
    """What a pytier-core command line asks for: the settings, and whether only to check them."""

    config: Config
    check_only: bool = False
    warnings: list[str] = field(default_factory=list)  # known keys pytier does not implement, one line each
    sources: list[str] = field(default_factory=list)  # where the settings came from, in precedence order


def parse_invocation(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Invocation:
    """Settings from the command line, over PYTIER_* variables of `environ` (default: os.environ), over
    the TOML files named with -c in order, over the defaults. Raises ConfigError.

    --help and --version print and raise SystemExit(0), as argparse does.
    """
    env = os.environ if environ is None else environ
    ns = build_parser().parse_args(list(argv))
    config_files: list[Path] = getattr(ns, "config_file", [])
    values: dict[str, Any] = {}
    warnings: list[str] = []
    for path in config_files:
        settings = _read_file(path, env)
        warnings += settings.warnings
        for attr, value in settings.values.items():
            if attr in _ACCUMULATE and attr in values:
                value = _dedup([*values[attr], *value])
            values[attr] = value
    from_env = _env_values(env)
    from_cli = _command_line_values(ns)
    values.update(from_env)
    values.update(from_cli)
    sources = [f"command line ({len(from_cli)} settings)", f"environment ({len(from_env)} settings)",
               *(f"config file {p}" for p in reversed(config_files)), "defaults"]
    config = Config(**values, config_file=config_files[-1] if config_files else None)
    if config.file_log_level == "off":
        unused = [_BY_ATTR_FLAG[a] for a in values
                  if a in ("file_log_dir", "file_log_name", "file_log_size", "file_log_count")]
        if unused:
            warnings.append(f"{', '.join(unused)} given but --file-log-level is off: no log file is written")
    overlap = _mapped_overlap(config.proxy_networks)
    if overlap is not None:
        raise ConfigError(overlap)
    return Invocation(config, getattr(ns, "check_config", False), warnings, sources)


def parse_config(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Config:
    """parse_invocation's settings alone."""
    return parse_invocation(argv, environ).config


def load_invocation(argv: Sequence[str]) -> Invocation:
    """parse_invocation for the command line: on error print one line to stderr and exit with status 2."""
    try:
        return parse_invocation(argv)
    except ConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def effective_settings(invocation: Invocation) -> list[str]:
    """The settings as `key = value` lines in pytier's flat file layout, the secret masked."""
    c = invocation.config
    lines = [f"# {PROG} settings; sources, strongest first: {', '.join(invocation.sources)}"]
    for s in _SETTINGS:
        if s.kind == "flag":
            continue
        value = getattr(c, s.attr)
        if value is None:
            lines.append(f"# {s.key} is not set")
            continue
        if s.attr == "network_secret" and value:
            value = "***"
        elif s.attr == "file_log_size":
            value = format_size(value)
        elif s.attr in ("rpc_portal", "metrics_listen"):
            host, port = value
            value = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        elif isinstance(value, list):
            value = [str(x) for x in value]
        elif not isinstance(value, (bool, int, float, str)):
            value = str(value)
        lines.append(f"{s.key} = {_toml_literal(value)}")
    return lines


__all__ = [
    "DEFAULT_RPC_PORTAL",
    "DEFAULT_TUNNEL_PORT",
    "ENV_PREFIX",
    "Config",
    "ConfigError",
    "HelpFormatter",
    "Invocation",
    "ProxyNetwork",
    "TunnelUrl",
    "build_parser",
    "effective_settings",
    "load_invocation",
    "parse_config",
    "parse_invocation",
    "version",
]
