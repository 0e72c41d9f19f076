"""pytier-core's settings: every flag, the TOML file, precedence, and one-line errors with status 2."""

from __future__ import annotations

import re
import subprocess
import sys
from ipaddress import IPv4Interface, IPv4Network, IPv6Network
from pathlib import Path
from typing import Any

import pytest

from pytier.config import (
    DEFAULT_RPC_PORTAL,
    Config,
    ConfigError,
    ProxyNetwork,
    TunnelUrl,
    build_parser,
    parse_config,
    version,
)

BIN = Path(sys.executable).parent
CORE = [str(BIN / "pytier-core")]
CORE_AS_MODULE = [sys.executable, "-m", "pytier.cli.core"]


def urls(*texts: str) -> list[TunnelUrl]:
    return [TunnelUrl.parse(t) for t in texts]


def nets(*texts: str) -> list[ProxyNetwork]:
    """ProxyNetworks from "CIDR" or "CIDR>MAPPED" (written without the flag's arrow, to test the parser)."""
    out = []
    for text in texts:
        real, _, mapped = text.partition(">")
        out.append(ProxyNetwork(IPv4Network(real), IPv4Network(mapped) if mapped else None))
    return out


def run_core(argv: list[str], cmd: list[str] = CORE) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*cmd, *argv], capture_output=True, text=True, timeout=30)


# ---------------------------------------------------------------------------------------------
# TunnelUrl


@pytest.mark.parametrize(
    ("text", "scheme", "host", "port", "canonical"),
    [
        ("udp://198.18.0.2:11010", "udp", "198.18.0.2", 11010, "udp://198.18.0.2:11010"),
        ("tcp://198.18.0.2", "tcp", "198.18.0.2", 11010, "tcp://198.18.0.2:11010"),
        ("UDP://198.18.0.2:1/", "udp", "198.18.0.2", 1, "udp://198.18.0.2:1"),
        ("udp://[fd00::0:2]:11011", "udp", "fd00::2", 11011, "udp://[fd00::2]:11011"),
        ("tcp://[::1]", "tcp", "::1", 11010, "tcp://[::1]:11010"),
        ("tcp://node-b.example:12000", "tcp", "node-b.example", 12000, "tcp://node-b.example:12000"),
        ("  udp://0.0.0.0:0  ", "udp", "0.0.0.0", 0, "udp://0.0.0.0:0"),
    ],
)
def test_tunnel_url_parse_and_str(text: str, scheme: str, host: str, port: int, canonical: str) -> None:
    url = TunnelUrl.parse(text)
    assert (url.scheme, url.host, url.port) == (scheme, host, port)
    assert str(url) == canonical
    assert TunnelUrl.parse(str(url)) == url


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("wg://198.18.0.2:11011", "unsupported scheme 'wg://' in 'wg://198.18.0.2:11011' "
                                  "(pytier supports udp:// and tcp://)"),
        ("ws://x", "pytier supports udp:// and tcp://"),
        ("198.18.0.2:11010", "has no scheme: write udp://198.18.0.2:11010 or tcp://198.18.0.2:11010"),
        ("udp://198.18.0.2:70000", "invalid port '70000'"),
        ("udp://198.18.0.2:x", "invalid port 'x'"),
        ("udp://:11010", "has no host"),
        ("udp://fd00::1:11010", "in brackets"),
        ("udp://[fd00::1:11010", "missing ']'"),
        ("udp://[nothex]:1", "is not an IPv6 address"),
        ("udp://198.18.0.2:11010/path", "with nothing after the port"),
        ("udp://bad_host!:1", "neither an IP address nor a host name"),
    ],
)
def test_tunnel_url_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        TunnelUrl.parse(text)


# ---------------------------------------------------------------------------------------------
# Flags


def test_defaults() -> None:
    c = parse_config([])
    assert c == Config()
    assert c.network_name == "default" and c.network_secret == ""
    assert c.ipv4 is None
    assert [str(u) for u in c.listeners] == ["tcp://0.0.0.0:11010", "udp://0.0.0.0:11010"]
    assert c.peers == [] and c.proxy_networks == []
    assert (c.dev_name, c.mtu, c.rpc_portal) == ("pytier0", 1360, ("127.0.0.1", 15888))
    assert c.hostname  # the system's
    assert (c.instance_name, c.console_log_level, c.encryption_algorithm) == ("default", "info", "aes-gcm")
    assert not any([c.disable_encryption, c.enable_kcp_proxy, c.disable_kcp_input, c.enable_quic_proxy,
                    c.disable_quic_input, c.use_smoltcp, c.no_tun])
    assert c.peer_timeout_s == 30.0 and c.config_file is None


EVERY_FLAG: list[tuple[list[str], str, Any]] = [
    (["--network-name", "net1"], "network_name", "net1"),
    (["--network-secret", "s3cret"], "network_secret", "s3cret"),
    (["--ipv4", "10.144.144.1/24"], "ipv4", IPv4Interface("10.144.144.1/24")),
    (["-i", "10.144.144.7"], "ipv4", IPv4Interface("10.144.144.7/24")),
    (["-i", "10.144.0.9/16"], "ipv4", IPv4Interface("10.144.0.9/16")),
    (["--listeners", "udp://0.0.0.0:11011"], "listeners", urls("udp://0.0.0.0:11011")),
    (["-l", "11010"], "listeners", urls("tcp://0.0.0.0:11010", "udp://0.0.0.0:11010")),
    (["-l", "udp://198.18.0.1:1,tcp://198.18.0.1:2", "-l", "udp://[::]:3"], "listeners",
     urls("udp://198.18.0.1:1", "tcp://198.18.0.1:2", "udp://[::]:3")),
    (["-l", "udp://0.0.0.0:5", "tcp://0.0.0.0:6"], "listeners", urls("udp://0.0.0.0:5", "tcp://0.0.0.0:6")),
    (["-l", "udp://0.0.0.0:5 , udp://0.0.0.0:5"], "listeners", urls("udp://0.0.0.0:5")),
    (["--no-listener"], "listeners", []),
    (["--peers", "udp://198.18.0.2:11010"], "peers", urls("udp://198.18.0.2:11010")),
    (["-p", "tcp://198.18.0.2", "-p", "udp://198.18.0.3:1,udp://[fd00::3]:2"], "peers",
     urls("tcp://198.18.0.2:11010", "udp://198.18.0.3:1", "udp://[fd00::3]:2")),
    (["--dev-name", "et_tun-1"], "dev_name", "et_tun-1"),
    (["--dev-name", "a" * 15], "dev_name", "a" * 15),
    (["--mtu", "576"], "mtu", 576),
    (["--mtu", "9000"], "mtu", 9000),
    (["--rpc-portal", "127.0.0.1:15999"], "rpc_portal", ("127.0.0.1", 15999)),
    (["-r", "15889"], "rpc_portal", ("127.0.0.1", 15889)),
    (["-r", "0"], "rpc_portal", ("127.0.0.1", 0)),
    (["-r", "[::1]:15888"], "rpc_portal", ("::1", 15888)),
    (["-r", "localhost:15890"], "rpc_portal", ("127.0.0.1", 15890)),
    (["--metrics-listen", "127.0.0.1:9110"], "metrics_listen", ("127.0.0.1", 9110)),
    (["--rpc-portal-whitelist", "198.18.0.0/15,::1", "--rpc-portal-whitelist", "127.0.0.1"],
     "rpc_portal_whitelist",
     [IPv4Network("198.18.0.0/15"), IPv6Network("::1/128"), IPv4Network("127.0.0.1/32")]),
    (["--hostname", "node-a"], "hostname", "node-a"),
    (["--instance-name", "inst2"], "instance_name", "inst2"),
    (["-m", "inst3"], "instance_name", "inst3"),
    (["--console-log-level", "debug"], "console_log_level", "debug"),
    (["--console-log-level", "WARNING"], "console_log_level", "warn"),
    (["--console-log-level", "trace"], "console_log_level", "trace"),
    (["--file-log-level", "debug"], "file_log_level", "debug"),
    (["--file-log-level", "OFF"], "file_log_level", "off"),
    (["--file-log-dir", "/var/log/pytier"], "file_log_dir", "/var/log/pytier"),
    (["--file-log-name", "node.log"], "file_log_name", "node.log"),
    (["--file-log-size", "512K"], "file_log_size", 512 * 1024),
    (["--file-log-size", "5"], "file_log_size", 5 * 1024 * 1024),
    (["--file-log-size", "1G"], "file_log_size", 1024**3),
    (["--file-log-count", "3"], "file_log_count", 3),
    (["--encryption-algorithm", "chacha20"], "encryption_algorithm", "chacha20"),
    (["--encryption-algorithm", "aes-256-gcm"], "encryption_algorithm", "aes-256-gcm"),
    (["--encryption-algorithm", "xor"], "encryption_algorithm", "xor"),
    (["--disable-encryption"], "disable_encryption", True),
    (["-u"], "disable_encryption", True),
    (["--proxy-networks", "192.168.50.0/24"], "proxy_networks", nets("192.168.50.0/24")),
    (["-n", "192.168.50.0/24,10.1.0.0/16", "-n", "172.16.0.0/12"], "proxy_networks",
     nets("192.168.50.0/24", "10.1.0.0/16", "172.16.0.0/12")),
    (["-n", "192.168.1.0/24->10.1.0.0/24"], "proxy_networks", nets("192.168.1.0/24>10.1.0.0/24")),
    (["-n", "192.168.1.0/24 -> 10.1.0.0/24, 192.168.1.0/24", "-n", "172.16.0.0/12->10.16.0.0/12"],
     "proxy_networks", nets("192.168.1.0/24>10.1.0.0/24", "192.168.1.0/24", "172.16.0.0/12>10.16.0.0/12")),
    (["--enable-kcp-proxy"], "enable_kcp_proxy", True),
    (["--enable-kcp-proxy", "true"], "enable_kcp_proxy", True),
    (["--enable-kcp-proxy", "false"], "enable_kcp_proxy", False),
    (["--disable-kcp-input"], "disable_kcp_input", True),
    (["--enable-quic-proxy"], "enable_quic_proxy", True),
    (["--disable-quic-input"], "disable_quic_input", True),
    (["--proxy-transport", "auto"], "proxy_transport", "auto"),
    (["--proxy-transport", "KCP"], "proxy_transport", "kcp"),
    (["--proxy-transport", "quic"], "proxy_transport", "quic"),
    (["--use-smoltcp"], "use_smoltcp", True),
    (["--no-tun"], "no_tun", True),
    (["--no-tun", "false"], "no_tun", False),
    (["--disable-udp-offload"], "disable_udp_offload", True),
    (["--tun-offload", "tso"], "tun_offload", "tso"),
    (["--state-dir", "/tmp/pytier-state"], "state_dir", Path("/tmp/pytier-state")),
    (["--peer-timeout", "2.5"], "peer_timeout_s", 2.5),
    (["--latency-first"], "latency_first", True),
    (["--enable-fec-udp"], "enable_fec_udp", True),
    (["--enable-fec-kcp"], "enable_fec_kcp", True),
]


@pytest.mark.parametrize(("argv", "attr", "expected"), EVERY_FLAG, ids=[" ".join(f[0]) for f in EVERY_FLAG])
def test_every_flag(argv: list[str], attr: str, expected: Any) -> None:
    config = parse_config(argv)
    assert getattr(config, attr) == expected
    # The other settings keep their defaults.
    default = Config()
    for name in vars(default):
        if name != attr:
            assert getattr(config, name) == getattr(default, name), name


def test_every_config_attribute_has_a_flag() -> None:
    covered = {attr for _, attr, _ in EVERY_FLAG} | {"config_file"}
    assert covered == set(vars(Config()))


def test_flags_combine() -> None:
    c = parse_config(["--network-name", "n", "--network-secret", "s", "-i", "10.144.144.1/24",
                      "-l", "udp://0.0.0.0:11010", "-p", "udp://198.18.0.2:11010", "--enable-kcp-proxy",
                      "--use-smoltcp", "--enable-quic-proxy", "--disable-quic-input", "--mtu", "1400"])
    assert (c.network_name, c.network_secret, str(c.ipv4)) == ("n", "s", "10.144.144.1/24")
    assert (c.enable_kcp_proxy, c.use_smoltcp, c.enable_quic_proxy, c.disable_quic_input) == (True,) * 4
    assert not c.disable_kcp_input
    assert c.mtu == 1400


def test_last_value_wins_for_single_flags() -> None:
    assert parse_config(["--mtu", "1000", "--mtu", "1200"]).mtu == 1200


# ---------------------------------------------------------------------------------------------
# TOML


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def test_toml_every_setting(tmp_path: Path) -> None:
    path = write(tmp_path, """
network_name = "net1"
network-secret = "s3cret"
ipv4 = "10.144.144.5"
listeners = ["udp://0.0.0.0:11011", 11012]
peers = "tcp://198.18.0.2, udp://[fd00::2]:11011"
dev_name = "pt1"
mtu = 1400
rpc_portal = "127.0.0.1:16000"
hostname = "node-a"
instance_name = "i1"
console_log_level = "debug"
encryption_algorithm = "chacha20"
disable_encryption = true
proxy_networks = ["192.168.50.0/24", "192.168.1.0/24->10.1.0.0/24"]
enable_kcp_proxy = true
disable_kcp_input = true
enable_quic_proxy = true
disable_quic_input = true
use_smoltcp = true
no_tun = true
peer_timeout = 5
""")
    c = parse_config(["--config-file", str(path)])
    assert c == Config(
        network_name="net1", network_secret="s3cret", ipv4=IPv4Interface("10.144.144.5/24"),
        listeners=urls("udp://0.0.0.0:11011", "tcp://0.0.0.0:11012", "udp://0.0.0.0:11012"),
        peers=urls("tcp://198.18.0.2:11010", "udp://[fd00::2]:11011"), dev_name="pt1", mtu=1400,
        rpc_portal=("127.0.0.1", 16000), hostname="node-a", instance_name="i1", console_log_level="debug",
        encryption_algorithm="chacha20", disable_encryption=True,
        proxy_networks=nets("192.168.50.0/24", "192.168.1.0/24>10.1.0.0/24"), enable_kcp_proxy=True,
        disable_kcp_input=True,
        enable_quic_proxy=True, disable_quic_input=True, use_smoltcp=True, no_tun=True, peer_timeout_s=5.0,
        config_file=path,
    )


def test_toml_no_listener_and_empty_list(tmp_path: Path) -> None:
    assert parse_config(["-c", str(write(tmp_path, "no_listener = true\n"))]).listeners == []
    assert parse_config(["-c", str(write(tmp_path, "listeners = []\n"))]).listeners == []
    assert parse_config(["-c", str(write(tmp_path, "no_listener = false\n"))]).listeners == Config().listeners


def test_command_line_overrides_file(tmp_path: Path) -> None:
    path = write(tmp_path, """
network_name = "from-file"
mtu = 1400
enable_kcp_proxy = true
peers = ["udp://198.18.0.2:11010"]
no_listener = true
""")
    c = parse_config(["-c", str(path), "--network-name", "from-flag", "--enable-kcp-proxy", "false",
                      "-p", "udp://198.18.0.9:11010", "-l", "12000"])
    assert c.network_name == "from-flag"
    assert c.mtu == 1400  # not given on the command line: the file's value
    assert c.enable_kcp_proxy is False
    assert c.peers == urls("udp://198.18.0.9:11010")  # a list flag replaces the file's list
    assert c.listeners == urls("tcp://0.0.0.0:12000", "udp://0.0.0.0:12000")
    assert parse_config(["-c", str(path), "--no-listener"]).listeners == []


def test_flags_may_come_before_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'network_name = "from-file"\n')
    assert parse_config(["--network-name", "flag", "-c", str(path)]).network_name == "flag"


# ---------------------------------------------------------------------------------------------
# Errors: one line on stderr, status 2


ERRORS: list[tuple[list[str], str | None, str]] = [
    (["--foo"], None, "unrecognized arguments: --foo (see pytier-core --help)"),
    (["--network"], None, "unrecognized arguments: --network"),  # no abbreviations
    (["extra"], None, "unrecognized arguments: extra"),
    (["--mtu"], None, "argument --mtu: expected one argument"),
    (["--mtu", "70000"], None, "argument --mtu: MTU 70000 is out of range (576..9000)"),
    (["--mtu", "575"], None, "MTU 575 is out of range (576..9000)"),
    (["--mtu", "big"], None, "invalid MTU 'big'"),
    (["-i", "10.144.144.300/24"], None, "argument --ipv4/-i: invalid IPv4 address '10.144.144.300/24'"),
    (["-i", "10.144.144.1/33"], None, "invalid IPv4 address"),
    (["-i", "10.144.144.0/24"], None, "'10.144.144.0/24' is the network address of 10.144.144.0/24; "
                                      "pick a host address such as 10.144.144.1/24"),
    (["-i", "10.144.144.255"], None, "is the broadcast address"),
    (["-i", "127.0.0.2"], None, "127.0.0.2 cannot be a node's virtual address"),
    (["-l", "wg://0.0.0.0:11011"], None, "argument --listeners/-l: unsupported scheme 'wg://'"),
    (["-l", "udp://myhost:1"], None, "bind to an IP address"),
    (["-l", "99999"], None, "invalid port '99999'"),
    (["-l", ","], None, "expected at least one value"),
    (["-p", "198.18.0.2:11010"], None, "argument --peers/-p: '198.18.0.2:11010' has no scheme"),
    (["-p", "udp://0.0.0.0:11010"], None, "0.0.0.0 is not an address to connect to"),
    (["-p", "udp://198.18.0.2:0"], None, "needs a port other than 0"),
    (["-n", "192.168.50.1/24"], None, "'192.168.50.1/24' has host bits set; did you mean 192.168.50.0/24?"),
    (["-n", "192.168.1.0/24->10.1.0.0/16"], None,
     "argument --proxy-networks/-n: '192.168.1.0/24->10.1.0.0/16': the mapped network 10.1.0.0/16 must have "
     "the prefix length of 192.168.1.0/24 (/24)"),
    (["-n", "192.168.1.0/24->10.1.0.1/24"], None,
     "'10.1.0.1/24' has host bits set; did you mean 10.1.0.0/24?"),
    (["-n", "192.168.1.0/24->"], None, "invalid IPv4 network ''"),
    (["-n", "192.168.1.0/24->10.1.0.0/24", "-n", "192.168.2.0/24->10.1.0.0/24"], None,
     "proxy networks 192.168.1.0/24->10.1.0.0/24 and 192.168.2.0/24->10.1.0.0/24 export overlapping "
     "prefixes (10.1.0.0/24 and 10.1.0.0/24)"),
    (["-n", "192.168.1.0/24->10.1.0.0/24,10.0.0.0/8"], None, "export overlapping prefixes (10.1.0.0/24 and "
                                                            "10.0.0.0/8)"),
    (["-n", "nonsense"], None, "invalid IPv4 network 'nonsense'"),
    (["--dev-name", "a" * 16], None, "is longer than 15 characters"),
    (["--dev-name", "a/b"], None, "is not a valid network interface name"),
    (["--rpc-portal", "1.2.3.4"], None, "has no port"),
    (["--rpc-portal", "host.example:1"], None, "is not an IP address"),
    (["--console-log-level", "loud"], None,
     "invalid choice 'loud' (choose from error, warn, info, debug, trace)"),
    (["--encryption-algorithm", "rot13"], None, "invalid choice 'rot13'"),
    (["--enable-kcp-proxy", "maybe"], None, "expected true or false, got 'maybe'"),
    (["--proxy-transport", "tcp"], None, "invalid choice 'tcp' (choose from kcp, quic, auto)"),
    ([], "proxy_transport = 'fast'\n",
     "proxy_transport: invalid choice 'fast' (choose from kcp, quic, auto)"),
    (["--peer-timeout", "0"], None, "expected a number of seconds above 0"),
    (["--peer-timeout", "nan"], None, "expected a number of seconds above 0"),
    (["--network-name", ""], None, "the network name cannot be empty"),
    (["--no-listener", "-l", "11010"], None, "--no-listener conflicts with --listeners"),
    (["-c", "/nonexistent/pytier.toml"], None, "cannot read config file /nonexistent/pytier.toml: "
                                              "No such file or directory"),
    ([], "mtu = \n", "invalid TOML: "),
    ([], "mtu = 10\n", "mtu: MTU 10 is out of range (576..9000)"),
    ([], "network_nmae = 'x'\n", "unknown key 'network_nmae' (did you mean 'network_name'?)"),
    ([], "colour = 'x'\n", "unknown key 'colour' (see pytier-core --help for the settings)"),
    ([], "network_name = 'a'\n[network_identity]\nnetwork_name = 'b'\n",
     "line 3: [network_identity] network_name is set twice (also as network_name)"),
    ([], "config_file = 'x'\n", "config_file cannot be set inside a config file"),
    ([], "network_name = 'a'\nnetwork-name = 'b'\n", "network_name is set twice"),
    ([], "no_tun = 'yes'\n", "no_tun: expected true or false, got a string"),
    ([], "ipv4 = ['10.0.0.1']\n", "ipv4: expected a string or number, got an array"),
    ([], "peers = [true]\n", "peers: expected a string or number, got true"),
    ([], "peers = ['wg://x']\n", "peers: unsupported scheme 'wg://'"),
    ([], "\nproxy_networks = ['192.168.1.0/24->10.1.0.0/25']\n",
     "line 2: proxy_networks: '192.168.1.0/24->10.1.0.0/25': the mapped network 10.1.0.0/25 must have the "
     "prefix length of 192.168.1.0/24 (/24)"),
    ([], "no_listener = true\nlisteners = ['11010']\n", "no_listener conflicts with listeners"),
    ([], "\xff = 1\n", "node.toml: not UTF-8 text"),
]


@pytest.mark.parametrize(("argv", "toml", "message"), ERRORS, ids=[" ".join(a) or t for a, t, _ in ERRORS])
def test_errors_are_one_line_and_exit_2(
    tmp_path: Path, argv: list[str], toml: str | None, message: str
) -> None:
    if toml is not None:
        path = tmp_path / "node.toml"
        path.write_bytes(toml.encode("latin-1"))
        argv = [*argv, "--config-file", str(path)]
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(argv)
    result = run_core(argv)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pytier-core: error: ")
    assert message in lines[0]


def test_error_through_python_dash_m() -> None:
    result = run_core(["--mtu", "1"], cmd=CORE_AS_MODULE)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        "pytier-core: error: argument --mtu: MTU 1 is out of range (576..9000) (see pytier-core --help)\n"
    )


# ---------------------------------------------------------------------------------------------
# --help and --version


def test_help_lists_every_flag_on_one_line() -> None:
    result = run_core(["--help"])
    assert result.returncode == 0 and result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0] == "usage: pytier-core [options]"
    for action in build_parser()._actions:
        flags = sorted(action.option_strings, key=len)
        [line] = [ln for ln in lines if ln.startswith("  " + ", ".join(flags) + " ")]
        # The description sits on the same line, and nothing wraps onto the next one.
        assert action.help and line.rstrip().endswith(action.help), line
        assert len(line) <= 106
    for flag in ("--network-name", "--network-secret", "--ipv4", "--listeners", "--peers", "--dev-name",
                 "--mtu", "--rpc-portal", "--hostname", "--instance-name", "--console-log-level",
                 "--encryption-algorithm", "--disable-encryption", "--proxy-networks", "--enable-kcp-proxy",
                 "--disable-kcp-input", "--enable-quic-proxy", "--disable-quic-input", "--use-smoltcp",
                 "--no-tun", "--peer-timeout", "--config-file", "--no-listener", "--version"):
        assert flag in result.stdout


def test_version() -> None:
    result = run_core(["--version"])
    assert (result.returncode, result.stdout, result.stderr) == (0, f"pytier-core {version()}\n", "")
    assert version() != "unknown"


def test_default_rpc_portal_matches_easytier() -> None:
    assert DEFAULT_RPC_PORTAL == ("127.0.0.1", 15888)
