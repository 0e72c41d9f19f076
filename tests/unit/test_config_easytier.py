"""pytier-core -c reads EasyTier 2.6's sectioned TOML as EasyTier's docs write it: every key is read or
warned about, errors name the key and its line, ${VAR} expands, several files merge, PYTIER_* variables
sit between the files and the flags, and --check-config prints the effective settings."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from pytier.cli.core import main
from pytier.config import Config, ConfigError, ProxyNetwork, TunnelUrl, parse_config, parse_invocation

CORE = str(Path(sys.executable).parent / "pytier-core")


def urls(*texts: str) -> list[TunnelUrl]:
    return [TunnelUrl.parse(t) for t in texts]


def write(tmp_path: Path, text: str, name: str = "easytier.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def warnings_of(path: Path, env: dict[str, str] | None = None) -> list[str]:
    return parse_invocation(["-c", str(path)], env or {}).warnings


# The layout of EasyTier's docs and of the file `easytier-core` prints at start: top-level keys, then the
# sections. Line numbers matter below.
FULL = """\
instance_name = "office"
hostname = "gw-office"
instance_id = "87ede5a2-9c3d-492d-9bbe-989b9d07e742"
ipv4 = "10.144.144.1/24"
dhcp = false
listeners = [
    "tcp://0.0.0.0:11010",
    "udp://0.0.0.0:11010",
    "wg://0.0.0.0:11011",
]
exit_nodes = []
rpc_portal = "127.0.0.1:15888"

[network_identity]
network_name = "office-net"
network_secret = "${OFFICE_SECRET}"

[[peer]]
uri = "tcp://198.18.0.2:11010"

[[peer]]
uri = "udp://198.18.0.3:11010"

[[peer]]
uri = "wss://198.18.0.4:11012/"

[[proxy_network]]
cidr = "192.168.50.0/24"

[[proxy_network]]
cidr = "192.168.1.0/24"
mapped_cidr = "10.1.1.0/24"

[file_logger]
level = "info"
file = "easytier"
dir = "/var/log/easytier"

[console_logger]
level = "debug"

[flags]
default_protocol = "tcp"
dev_name = "et0"
enable_encryption = true
enable_ipv6 = true
mtu = 1380
latency_first = true
enable_kcp_proxy = true
enable_quic_proxy = true
disable_quic_input = true
use_smoltcp = true
"""


def test_full_example(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    invocation = parse_invocation(["-c", str(path)], {"OFFICE_SECRET": "s3cret"})
    assert invocation.config == Config(
        network_name="office-net", network_secret="s3cret", ipv4=IPv4Interface("10.144.144.1/24"),
        listeners=urls("tcp://0.0.0.0:11010", "udp://0.0.0.0:11010"),
        peers=urls("tcp://198.18.0.2:11010", "udp://198.18.0.3:11010"),
        dev_name="et0", mtu=1380, rpc_portal=("127.0.0.1", 15888), hostname="gw-office",
        instance_name="office", console_log_level="debug",
        file_log_level="info", file_log_name="easytier", file_log_dir="/var/log/easytier",
        proxy_networks=[ProxyNetwork(IPv4Network("192.168.50.0/24")),
                        ProxyNetwork(IPv4Network("192.168.1.0/24"), IPv4Network("10.1.1.0/24"))],
        enable_kcp_proxy=True, enable_quic_proxy=True, disable_quic_input=True, use_smoltcp=True,
        latency_first=True, config_file=path,
    )
    where = f"config file {path} line"
    assert invocation.warnings == [
        f'{where} 3: pytier does not implement instance_id = "87ede5a2-9c3d-492d-9bbe-989b9d07e742"; ignored',
        f"{where} 6: pytier does not implement wg:// tunnels (it speaks udp:// and tcp://); "
        "skipping listeners 'wg://0.0.0.0:11011'",
        f"{where} 25: pytier does not implement wss:// tunnels (it speaks udp:// and tcp://); "
        "skipping [[peer]] uri 'wss://198.18.0.4:11012/'",
    ]


def test_minimal_example(tmp_path: Path) -> None:
    path = write(tmp_path, """\
[network_identity]
network_name = "net"
network_secret = "secret"

[[peer]]
uri = "udp://198.18.0.2:11010"
""")
    invocation = parse_invocation(["-c", str(path)], {})
    assert invocation.warnings == []
    assert invocation.config == Config(network_name="net", network_secret="secret",
                                       peers=urls("udp://198.18.0.2:11010"), config_file=path)


def test_inline_table_and_dotted_keys(tmp_path: Path) -> None:
    path = write(tmp_path, """\
network_identity = { network_name = "net", network_secret = "s" }
flags.mtu = 1400
flags.enable_encryption = false
""")
    c = parse_config(["-c", str(path)], {})
    assert (c.network_name, c.network_secret, c.mtu, c.disable_encryption) == ("net", "s", 1400, True)
    bad = write(tmp_path, 'network_identity = { network_name = "net" }\nflags.mtu = "big"\n')
    with pytest.raises(ConfigError, match=re.escape("line 2: [flags] mtu: expected a number, got a string")):
        parse_config(["-c", str(bad)], {})


@pytest.mark.parametrize(("toml", "disable_encryption"), [
    ("enable_encryption = false", True),
    ("enable_encryption = true", False),
])
def test_enable_encryption_is_the_inverse_of_disable_encryption(
    tmp_path: Path, toml: str, disable_encryption: bool
) -> None:
    path = write(tmp_path, f"[flags]\n{toml}\n")
    assert parse_config(["-c", str(path)], {}).disable_encryption is disable_encryption


# Every [flags] key of EasyTier 2.6: the ones pytier implements set a setting ...
FLAGS_READ: list[tuple[str, str, Any]] = [
    ('dev_name = "tun-et"', "dev_name", "tun-et"),
    ('dev_name = ""', "dev_name", "pytier0"),  # EasyTier's "pick a name"
    ("enable_encryption = false", "disable_encryption", True),
    ("mtu = 1400", "mtu", 1400),
    ("latency_first = true", "latency_first", True),
    ("no_tun = true", "no_tun", True),
    ("use_smoltcp = true", "use_smoltcp", True),
    ("enable_kcp_proxy = true", "enable_kcp_proxy", True),
    ("disable_kcp_input = true", "disable_kcp_input", True),
    ("enable_quic_proxy = true", "enable_quic_proxy", True),
    ("disable_quic_input = true", "disable_quic_input", True),
    ('encryption_algorithm = "chacha20"', "encryption_algorithm", "chacha20"),
    ('encryption_algorithm = ""', "encryption_algorithm", "aes-gcm"),  # EasyTier's default
]


@pytest.mark.parametrize(("toml", "attr", "expected"), FLAGS_READ, ids=[t for t, _, _ in FLAGS_READ])
def test_flags_pytier_implements(tmp_path: Path, toml: str, attr: str, expected: Any) -> None:
    path = write(tmp_path, f"[flags]\n{toml}\n")
    invocation = parse_invocation(["-c", str(path)], {})
    assert getattr(invocation.config, attr) == expected
    assert invocation.warnings == []


# ... and the others warn once, naming the key, when their value asks for what pytier does not do
# (first value), and are silent when pytier already behaves so (second value).
FLAGS_WARNED: list[tuple[str, str, str | None]] = [
    ("default_protocol", '"udp"', '"tcp"'),
    ("enable_ipv6", "false", "true"),
    ("enable_exit_node", "true", "false"),
    ("relay_network_whitelist", '"*"', '""'),
    ("disable_p2p", "false", "true"),
    ("relay_all_peer_rpc", "true", "false"),
    ("disable_udp_hole_punching", "false", "true"),
    ("multi_thread", "false", "true"),
    ("data_compress_algo", "2", "1"),
    ("bind_device", "true", "false"),
    ("disable_relay_kcp", "true", "false"),
    ("proxy_forward_by_system", "true", "false"),
    ("accept_dns", "true", "false"),
    ("private_mode", "true", "false"),
    ("foreign_relay_bps_limit", "1000000", "18446744073709551615"),
    ("multi_thread_count", "4", "2"),
    ("enable_relay_foreign_network_kcp", "true", "false"),
    ("disable_sym_hole_punching", "false", "true"),
    ("tld_dns_zone", '"corp."', '"et.net."'),
    ("p2p_only", "true", "false"),
    ("disable_tcp_hole_punching", "false", "true"),
    ("disable_relay_quic", "true", "false"),
    ("enable_relay_foreign_network_quic", "true", "false"),
    ("lazy_p2p", "true", "false"),
    ("need_p2p", "true", "false"),
    ("instance_recv_bps_limit", "1000", "0"),
    ("disable_upnp", "false", "true"),
    ("disable_relay_data", "true", "false"),
    ("enable_udp_broadcast_relay", "true", "false"),
]


@pytest.mark.parametrize(("key", "asks", "quiet"), FLAGS_WARNED, ids=[k for k, _, _ in FLAGS_WARNED])
def test_flags_pytier_does_not_implement(tmp_path: Path, key: str, asks: str, quiet: str) -> None:
    path = write(tmp_path, f'[network_identity]\nnetwork_name = "n"\n\n[flags]\n{key} = {asks}\n')
    assert warnings_of(path) == [f"config file {path} line 5: pytier does not implement [flags] {key} = "
                                 f"{asks}; pytier behaves as {key} = {quiet}"]
    assert parse_config(["-c", str(path)], {}) == Config(network_name="n", config_file=path)
    assert warnings_of(write(tmp_path, f"[flags]\n{key} = {quiet}\n")) == []


def test_quic_listen_port_is_ignored_by_easytier_too(tmp_path: Path) -> None:
    assert warnings_of(write(tmp_path, "[flags]\nquic_listen_port = 11012\n")) == []


TOP_WARNED: list[tuple[str, str]] = [
    ("netns", '"ns1"'),
    ("instance_id", '"87ede5a2-9c3d-492d-9bbe-989b9d07e742"'),
    ("ipv6", '"fd00::1/64"'),
    ("ipv6_public_addr_provider", "true"),
    ("ipv6_public_addr_auto", "true"),
    ("ipv6_public_addr_prefix", '"2001:db8::/48"'),
    ("dhcp", "true"),
    ("mapped_listeners", '["tcp://203.0.113.10:11010"]'),
    ("exit_nodes", '["10.144.144.9"]'),
    ("vpn_portal_config", '{ client_cidr = "10.14.14.0/24", wireguard_listen = "0.0.0.0:11013" }'),
    ("routes", '["10.0.0.0/8"]'),
    ("socks5_proxy", '"socks5://0.0.0.0:1080"'),
    ("port_forward", '[{ bind_addr = "0.0.0.0:80", dst_addr = "10.144.144.2:80", proto = "tcp" }]'),
    ("secure_mode", "{ enabled = true }"),
    ("acl", "{ acl_v1 = { chains = [] } }"),
    ("tcp_whitelist", '["80"]'),
    ("udp_whitelist", '["53"]'),
    ("stun_servers", '["stun.example:3478"]'),
    ("stun_servers_v6", '["stun.example:3478"]'),
    ("tcp_stun_servers", '["stun.example:3478"]'),
    ("credential_file", '"/etc/easytier/cred"'),
]


@pytest.mark.parametrize(("key", "value"), TOP_WARNED, ids=[k for k, _ in TOP_WARNED])
def test_top_level_keys_pytier_does_not_implement(tmp_path: Path, key: str, value: str) -> None:
    path = write(tmp_path, f'hostname = "h"\n{key} = {value}\n')
    [warning] = warnings_of(path)
    assert warning.startswith(f"config file {path} line 2: pytier does not implement {key}")
    assert parse_config(["-c", str(path)], {}) == Config(hostname="h", config_file=path)


def test_empty_and_default_values_ask_for_nothing(tmp_path: Path) -> None:
    path = write(tmp_path, 'dhcp = false\nexit_nodes = []\nroutes = []\nsecure_mode = { enabled = false }\n'
                           '[flags]\nlatency_first = false\nenable_ipv6 = true\n')
    assert warnings_of(path) == []


def test_proxy_network_allow_is_a_warning(tmp_path: Path) -> None:
    path = write(tmp_path, '[[proxy_network]]\ncidr = "192.168.50.0/24"\nallow = ["tcp"]\n')
    assert warnings_of(path) == [f"config file {path} line 3: pytier does not implement "
                                 "[[proxy_network]] allow; ignored"]
    assert parse_config(["-c", str(path)], {}).proxy_networks == [
        ProxyNetwork(IPv4Network("192.168.50.0/24"))]


# ---------------------------------------------------------------------------------------------
# Errors: one line naming the key and its line


ERRORS: list[tuple[str, str]] = [
    ("[flags]\nmtu = 1380\nenable_kcp_prxy = true\n",
     "line 3: unknown key [flags] 'enable_kcp_prxy' (did you mean 'enable_kcp_proxy'?)"),
    ('hostname = "h"\n\n[network_identity]\nnetwork_name = "n"\nnetwork_secert = "k"\n',
     "line 5: unknown key [network_identity] 'network_secert' (did you mean 'network_secret'?)"),
    ('[[peer]]\nuri = "udp://198.18.0.2:1"\n\n[[peer]]\nuri = "udp://198.18.0.3:1"\nurl = "x"\n',
     "line 6: unknown key [[peer]] 'url' (did you mean 'uri'?)"),
    ('ipv4 = "10.0.0.1"\ncolour = "red"\n', "line 2: unknown key 'colour'"),
    ("[console_logger]\nlevel = \"info\"\n[file_logger]\nlevel = \"info\"\nrotate = 3\n",
     "line 5: unknown key [file_logger] 'rotate'"),
    ('[flags]\nmtu = "x"\n', "line 2: [flags] mtu: expected a number, got a string"),
    ("[flags]\n\nenable_kcp_proxy = \"yes\"\n", "line 3: [flags] enable_kcp_proxy: expected true or false, "
                                                "got a string"),
    ("[flags]\nmtu = 10\n", "line 2: [flags] mtu: MTU 10 is out of range (576..9000)"),
    ('[flags]\nencryption_algorithm = "rot13"\n', "line 2: [flags] encryption_algorithm: invalid choice"),
    ('network_identity = "net"\n', "line 1: network_identity: expected a table, got a string"),
    ("[network_identity]\nnetwork_name = 5\n", "line 2: [network_identity] network_name: expected a string, "
                                               "got a number"),
    ('[network_identity]\nnetwork_name = ""\n', "line 2: [network_identity] network_name: the network name "
                                                "cannot be empty"),
    ('[[peer]]\nuri = 5\n', "line 2: [[peer]] uri: expected a string, got a number"),
    ('[[peer]]\nuri = "udp://198.18.0.2:1"\n[[peer]]\n', "line 3: [[peer]] has no uri"),
    ('[[peer]]\nuri = "gopher://198.18.0.2:1"\n', "line 2: [[peer]] uri: unsupported scheme 'gopher://'"),
    ('[[proxy_network]]\ncidr = "192.168.50.1/24"\n', "line 2: [[proxy_network]] cidr: '192.168.50.1/24' has "
                                                      "host bits set; did you mean 192.168.50.0/24?"),
    ('[[proxy_network]]\ncidr = "192.168.1.0/24"\nmapped_cidr = "10.1.0.0/16"\n',
     "line 3: [[proxy_network]] mapped_cidr 10.1.0.0/16 must have the prefix length of cidr 192.168.1.0/24 "
     "(/24)"),
    ('[[proxy_network]]\ncidr = "192.168.1.0/24"\n\nmapped_cidr = "10.1.0.1/24"\n',
     "line 4: [[proxy_network]] mapped_cidr: '10.1.0.1/24' has host bits set; did you mean 10.1.0.0/24?"),
    ('[[proxy_network]]\ncidr = "192.168.1.0/24->10.1.0.0/24"\n',
     "line 2: [[proxy_network]] cidr: '192.168.1.0/24->10.1.0.0/24': in this table the mapped prefix goes in "
     "its own key, mapped_cidr"),
    ('[[proxy_network]]\ncidr = "192.168.1.0/24"\nmapped_cidr = "10.1.0.0/24"\n\n'
     '[[proxy_network]]\ncidr = "192.168.2.0/24"\nmapped_cidr = "10.1.0.0/24"\n',
     "line 7: [[proxy_network]] mapped_cidr: proxy networks 192.168.1.0/24->10.1.0.0/24 and "
     "192.168.2.0/24->10.1.0.0/24 export overlapping prefixes (10.1.0.0/24 and 10.1.0.0/24)"),
    ('proxy_networks = ["10.1.0.0/16"]\n[[proxy_network]]\ncidr = "192.168.1.0/24"\n'
     'mapped_cidr = "10.1.7.0/24"\n',
     "line 4: [[proxy_network]] mapped_cidr: proxy networks 10.1.0.0/16 and 192.168.1.0/24->10.1.7.0/24 "
     "export overlapping prefixes (10.1.0.0/16 and 10.1.7.0/24)"),
    ("[console_logger]\nlevel = \"loud\"\n", "line 2: [console_logger] level: invalid choice 'loud'"),
    ('dhcp = "yes"\n', "line 1: dhcp: expected true or false, got a string"),
    ('exit_nodes = "10.0.0.1"\n', "line 1: exit_nodes: expected an array of strings, got a string"),
    ('mtu = 1400\n[flags]\nmtu = 1300\n', "line 3: [flags] mtu is set twice (also as mtu)"),
    ('[network_identity]\nnetwork_secret = "${NOT_SET_ANYWHERE}"\n',
     "line 2: environment variable NOT_SET_ANYWHERE is not set (write $$ for a literal $)"),
]


@pytest.mark.parametrize(("toml", "message"), ERRORS, ids=[m for _, m in ERRORS])
def test_errors_name_the_key_and_its_line(tmp_path: Path, toml: str, message: str) -> None:
    path = write(tmp_path, toml)
    with pytest.raises(ConfigError) as caught:
        parse_config(["-c", str(path)], {})
    text = str(caught.value)
    assert text.startswith(f"config file {path} line "), text
    assert message in text
    assert "\n" not in text


def test_error_through_the_console_script(tmp_path: Path) -> None:
    path = write(tmp_path, "[flags]\nmtu = 1380\nenable_kcp_prxy = true\n")
    result = subprocess.run([CORE, "-c", str(path)], capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (f"pytier-core: error: config file {path} line 3: unknown key [flags] "
                             "'enable_kcp_prxy' (did you mean 'enable_kcp_proxy'?)\n")


# ---------------------------------------------------------------------------------------------
# ${VAR}


def test_environment_references_expand_in_string_values(tmp_path: Path) -> None:
    path = write(tmp_path, """\
hostname = "${HOST_PREFIX}-$HOST_NUMBER"

[network_identity]
network_name = "${NET_NAME:-fallback-net}"
network_secret = "pa$$word-${SECRET}"

[[peer]]
uri = "udp://${PEER_HOST}:11010"
""")
    env = {"HOST_PREFIX": "gw", "HOST_NUMBER": "7", "SECRET": "xyz", "PEER_HOST": "198.18.0.9"}
    c = parse_config(["-c", str(path)], env)
    assert (c.hostname, c.network_name, c.network_secret) == ("gw-7", "fallback-net", "pa$word-xyz")
    assert c.peers == urls("udp://198.18.0.9:11010")
    assert parse_config(["-c", str(path)], {**env, "NET_NAME": "given"}).network_name == "given"


def test_an_unset_variable_names_itself_and_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[network_identity]\nnetwork_name = "n"\n\n[[peer]]\nuri = "udp://$PEER:1"\n')
    with pytest.raises(ConfigError, match=re.escape(
            f"config file {path} line 5: environment variable PEER is not set (write $$ for a literal $)")):
        parse_config(["-c", str(path)], {})


# ---------------------------------------------------------------------------------------------
# Several files; PYTIER_* variables


def test_several_files_merge_in_order(tmp_path: Path) -> None:
    base = write(tmp_path, """\
listeners = ["udp://0.0.0.0:11010"]

[network_identity]
network_name = "net"
network_secret = "base-secret"

[[peer]]
uri = "udp://198.18.0.2:11010"

[[proxy_network]]
cidr = "192.168.50.0/24"

[flags]
mtu = 1300
enable_kcp_proxy = true
""", "base.toml")
    site = write(tmp_path, """\
listeners = ["tcp://0.0.0.0:11011"]

[network_identity]
network_secret = "site-secret"

[[peer]]
uri = "udp://198.18.0.3:11010"

[[peer]]
uri = "udp://198.18.0.2:11010"

[flags]
mtu = 1400
""", "site.toml")
    expected = Config(
        network_name="net", network_secret="site-secret", listeners=urls("tcp://0.0.0.0:11011"),
        peers=urls("udp://198.18.0.2:11010", "udp://198.18.0.3:11010"),
        proxy_networks=[ProxyNetwork(IPv4Network("192.168.50.0/24"))], mtu=1400, enable_kcp_proxy=True,
        config_file=site,
    )
    assert parse_config(["-c", str(base), str(site)], {}) == expected
    assert parse_config(["-c", str(base), "-c", str(site)], {}) == expected
    assert parse_config(["-c", str(site), str(base)], {}).mtu == 1300


def test_a_flat_file_and_an_easytier_file_combine(tmp_path: Path) -> None:
    flat = write(tmp_path, 'network_name = "net"\npeers = ["udp://198.18.0.2:11010"]\n', "flat.toml")
    et = write(tmp_path, '[[peer]]\nuri = "tcp://198.18.0.3:11010"\n[flags]\nenable_quic_proxy = true\n')
    c = parse_config(["-c", str(flat), str(et)], {})
    assert c.network_name == "net" and c.enable_quic_proxy
    assert c.peers == urls("udp://198.18.0.2:11010", "tcp://198.18.0.3:11010")


def test_precedence_command_line_over_environment_over_files(tmp_path: Path) -> None:
    path = write(tmp_path, """\
ipv4 = "10.144.144.1/24"

[network_identity]
network_name = "file-net"
network_secret = "file-secret"

[[peer]]
uri = "udp://198.18.0.2:11010"

[flags]
mtu = 1300
""")
    env = {"PYTIER_NETWORK_NAME": "env-net", "PYTIER_IPV4": "10.144.144.2", "PYTIER_MTU": "1350",
           "PYTIER_PEERS": "udp://198.18.0.5:11010,tcp://198.18.0.6:11010", "PYTIER_ENABLE_KCP_PROXY": "true",
           "PYTIER_NETWORK_SECRET": ""}  # empty: unset
    c = parse_config(["-c", str(path)], env)
    assert (c.network_name, c.network_secret, str(c.ipv4), c.mtu) == ("env-net", "file-secret",
                                                                      "10.144.144.2/24", 1350)
    assert c.peers == urls("udp://198.18.0.5:11010", "tcp://198.18.0.6:11010")
    assert c.enable_kcp_proxy
    c = parse_config(["-c", str(path), "--network-name", "cli-net", "--mtu", "1400",
                      "--enable-kcp-proxy", "false"], env)
    assert (c.network_name, c.mtu, c.enable_kcp_proxy, str(c.ipv4)) == ("cli-net", 1400, False,
                                                                         "10.144.144.2/24")
    assert parse_config([], {"PYTIER_NO_LISTENER": "1"}).listeners == []
    assert parse_config(["-l", "12000"], {"PYTIER_NO_LISTENER": "yes"}).listeners == urls(
        "tcp://0.0.0.0:12000", "udp://0.0.0.0:12000")


@pytest.mark.parametrize(("env", "message"), [
    ({"PYTIER_MTU": "10"}, "environment variable PYTIER_MTU: MTU 10 is out of range (576..9000)"),
    ({"PYTIER_ENABLE_KCP_PROXY": "maybe"}, "environment variable PYTIER_ENABLE_KCP_PROXY: expected true or "
                                           "false, got 'maybe'"),
    ({"PYTIER_PEERS": "198.18.0.2:1"}, "environment variable PYTIER_PEERS: '198.18.0.2:1' has no scheme"),
    ({"PYTIER_LISTENERS": "11010", "PYTIER_NO_LISTENER": "true"},
     "environment variable PYTIER_NO_LISTENER conflicts with PYTIER_LISTENERS"),
])
def test_environment_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config([], env)


# ---------------------------------------------------------------------------------------------
# --check-config


def test_check_config_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, FULL)
    monkeypatch.setenv("OFFICE_SECRET", "s3cret")
    monkeypatch.setenv("PYTIER_MTU", "1400")
    assert main(["--check-config", "-c", str(path), "--peer-timeout", "5"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0] == (f"# pytier-core settings; sources, strongest first: command line (1 settings), "
                        f"environment (1 settings), config file {path}, defaults")
    assert lines[1:] == [
        'network_name = "office-net"',
        'network_secret = "***"',
        'ipv4 = "10.144.144.1/24"',
        'hostname = "gw-office"',
        'instance_name = "office"',
        'proxy_networks = ["192.168.50.0/24", "192.168.1.0/24->10.1.1.0/24"]',
        'listeners = ["tcp://0.0.0.0:11010", "udp://0.0.0.0:11010"]',
        'peers = ["tcp://198.18.0.2:11010", "udp://198.18.0.3:11010"]',
        "peer_timeout = 5.0",
        "latency_first = true",
        "enable_fec_udp = false",
        "enable_fec_kcp = false",
        'encryption_algorithm = "aes-gcm"',
        "disable_encryption = false",
        'dev_name = "et0"',
        "mtu = 1400",
        "no_tun = false",
        'tun_offload = "coalesce"',
        "disable_udp_offload = false",
        'state_dir = "/run/pytier"',
        "enable_kcp_proxy = true",
        "disable_kcp_input = false",
        "enable_quic_proxy = true",
        "disable_quic_input = true",
        "# proxy_transport is not set",
        "use_smoltcp = true",
        'rpc_portal = "127.0.0.1:15888"',
        'rpc_portal_whitelist = ["127.0.0.0/8", "::1/128"]',
        "# metrics_listen is not set",
        'console_log_level = "debug"',
        'file_log_level = "info"',
        'file_log_dir = "/var/log/easytier"',
        'file_log_name = "easytier"',
        'file_log_size = "100M"',
        "file_log_count = 10",
    ]
    assert "s3cret" not in out + err
    warnings = err.splitlines()
    assert len(warnings) == 3
    assert all(w.startswith(f"pytier-core: warning: config file {path} line ") for w in warnings)
    assert "wss://" in warnings[-1]

    monkeypatch.delenv("OFFICE_SECRET")
    assert main(["--check-config", "-c", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (f"pytier-core: error: config file {path} line 16: environment variable OFFICE_SECRET "
                   "is not set (write $$ for a literal $)\n")


def test_check_config_without_a_file_prints_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--check-config", "--network-secret", "x"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert 'network_secret = "***"' in out.splitlines()
    assert "# ipv4 is not set" in out.splitlines()


def test_check_config_through_the_console_script(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTIER_")}
    ok = subprocess.run([CORE, "--check-config", "-c", str(path)], capture_output=True, text=True,
                        timeout=30, env={**env, "OFFICE_SECRET": "s3cret", "PYTIER_NETWORK_NAME": "env-net"})
    assert ok.returncode == 0, ok.stderr
    assert 'network_name = "env-net"' in ok.stdout.splitlines()
    assert 'network_secret = "***"' in ok.stdout.splitlines()
    assert "s3cret" not in ok.stdout + ok.stderr
    assert len(ok.stderr.splitlines()) == 3

    broken = write(tmp_path, FULL.replace("mtu = 1380", 'mtu = "1380"'), "broken.toml")
    bad = subprocess.run([CORE, "--check-config", "-c", str(broken)], capture_output=True, text=True,
                         timeout=30, env={**env, "OFFICE_SECRET": "s3cret"})
    assert (bad.returncode, bad.stdout) == (2, "")
    assert bad.stderr == (f"pytier-core: error: config file {broken} line 47: [flags] mtu: "
                          "expected a number, got a string\n")


def test_file_logger_section_sets_the_log_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[file_logger]\nlevel = "WARNING"\nfile = "node.log"\ndir = "/var/log/et"\n'
                           "size_mb = 5\ncount = 2\n")
    invocation = parse_invocation(["-c", str(path)], {})
    c = invocation.config
    assert (c.file_log_level, c.file_log_name, c.file_log_dir, c.file_log_size, c.file_log_count) == (
        "warn", "node.log", "/var/log/et", 5 * 1024 * 1024, 2)
    assert invocation.warnings == []
    # PYTIER_* over the file, flags over both.
    c = parse_invocation(["-c", str(path), "--file-log-level", "off"],
                         {"PYTIER_FILE_LOG_DIR": "/srv/log"}).config
    assert (c.file_log_level, c.file_log_dir) == ("off", "/srv/log")
    # EasyTier's empty "use the default" values.
    empty = write(tmp_path, '[file_logger]\nlevel = ""\nfile = ""\ndir = ""\n', "empty.toml")
    c = parse_invocation(["-c", str(empty)], {}).config
    assert (c.file_log_level, c.file_log_name, c.file_log_dir) == ("off", "pytier.log", ".")


@pytest.mark.parametrize(("text", "message"), [
    ('[file_logger]\nlevel = "loud"\n',
     "line 2: [file_logger] level: invalid choice 'loud' (choose from off, error, warn, info, debug, trace)"),
    ("[file_logger]\ncount = 0\n",
     "line 2: [file_logger] count: invalid count '0': expected a whole number 1..1000"),
    ('[file_logger]\nsize_mb = "5"\n', "line 2: [file_logger] size_mb: expected a number, got a string"),
])
def test_file_logger_errors(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        parse_invocation(["-c", str(path)], {})
    assert str(e.value) == f"config file {path} {message}"


def test_file_log_settings_without_a_level_are_a_warning(tmp_path: Path) -> None:
    path = write(tmp_path, '[file_logger]\ndir = "/var/log/et"\n')
    assert warnings_of(path) == ["--file-log-dir given but --file-log-level is off: no log file is written"]
