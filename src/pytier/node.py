"""The composition root: builds a node's parts from a Config, runs them, and takes them down again."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from pytier import __version__, logs
from pytier.config import Config, TunnelUrl, parse_peer
from pytier.crypto import AeadCipher, make_cipher
from pytier.errors import UserError
from pytier.mgmt.http import MetricsHttpServer
from pytier.mgmt.metrics import ProxyTotals, node_families, render
from pytier.mgmt.protocol import MgmtError
from pytier.mgmt.server import MgmtServer
from pytier.peers.fec_link import MAX_PROTECTED_PACKET, FecService
from pytier.peers.handshake import Identity
from pytier.peers.manager import PeerManager
from pytier.peers.path_cost import PROBE_INTERVAL_S
from pytier.peers.peer_conn import PeerConn
from pytier.peers.route import RouteService
from pytier.peers.rpc import PeerRpc
from pytier.proxy import kcp, quic
from pytier.proxy.choice import PathMetrics, link_metrics
from pytier.proxy.service import ProxyService
from pytier.proxy.transport import Transport
from pytier.tun.device import OFFLOADS, TunDevice, offload_names
from pytier.tun.forwarding import IP_FORWARD, SubnetForwarding
from pytier.tun.leftovers import HostState, StateError
from pytier.tun.netlink import LinkConfig
from pytier.tunnel.base import Tunnel
from pytier.tunnel.tcp import TcpListener, connect_tcp
from pytier.tunnel.udp import UdpListener, connect_udp
from pytier.wire.messages import PeerFeatureFlag
from pytier.wire.peer_header import PacketType
from pytier.wire.siphash import network_secret_digest

log = logging.getLogger("pytier.node")

# --tun-offload: the read offloads asked of the kernel, or None for a device without a virtio header.
# "coalesce" asks for none: cutting the kernel's super-segments in Python costs more CPU than the
# kernel's own segmentation saves (docs/tun-offload.md), while coalescing writes saves on both nodes.
TUN_OFFLOADS: dict[str, int | None] = {"coalesce": 0, "tso": OFFLOADS, "off": None}

# Advertise no feature flags at all, as a node that predates them does: lets tests (and users
# checking a mixed network) see the version fallback of the proxies.
LEGACY_ADVERTISEMENT_ENV = "PYTIER_LEGACY_ADVERTISEMENT"
RECONNECT_MIN_S = 1.0
RECONNECT_MAX_S = 30.0


@dataclass
class Connector:
    """A peer URL the node keeps a connection to (from --peers, or added with `pytier-cli connector add`)."""

    url: TunnelUrl
    task: asyncio.Task[None] | None = None
    conn: PeerConn | None = None
    last_error: str = ""

    def describe(self) -> dict[str, Any]:
        conn = self.conn if self.conn is not None and not self.conn.closed.is_set() else None
        return {
            "url": str(self.url),
            "state": "connected" if conn is not None else "connecting",
            "peer_id": conn.peer_id if conn is not None else None,
            "last_error": self.last_error or None,
        }


class Node:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.peer_id = secrets.randbits(32) or 1
        self.started_at = time.time()
        digest = network_secret_digest(config.network_name, config.network_secret)
        cipher = None if config.disable_encryption else make_cipher(config.encryption_algorithm,
                                                                     config.network_secret)
        self.identity = Identity(self.peer_id, config.network_name, digest)
        self.peers = PeerManager(
            identity=self.identity,
            cipher=cipher,
            peer_timeout_s=config.peer_timeout_s,
            next_hop=self._next_hop,
        )
        self.rpc = PeerRpc(self.peer_id, config.network_name, self._send_rpc)
        self.route = RouteService(
            my_peer_id=self.peer_id,
            rpc=self.rpc,
            ipv4=config.ipv4,
            proxy_cidrs=[str(n.exported) for n in config.proxy_networks],
            hostname=config.hostname,
            feature_flag=self.feature_flags(),
            latency_first=config.latency_first,
            links=self.peers.conns,
        )
        if config.latency_first:
            self.peers.first_hop = self.route.first_hop
            self.peers.ping_interval_s = PROBE_INTERVAL_S
        self.route.on_change = self._on_routes_changed
        self.route.on_conflict = self._on_conflict
        self.peers.on_peer_up = self.route.peer_connected
        self.peers.on_peer_down = self.route.peer_disconnected
        self.peers.register(PacketType.RpcReq, self._on_rpc_req)
        self.peers.register(PacketType.RpcResp, self._on_rpc_resp)
        self.peers.register(PacketType.Data, self._on_data)
        # Every node takes FEC frames (and says so); --enable-fec-udp/--enable-fec-kcp make it send them.
        self.fec = FecService(enabled=config.enable_fec_udp, send=self._send_fec, deliver=self._on_data,
                              usable=self._fec_usable, enabled_kcp=config.enable_fec_kcp)
        self._fec_peers: set[int] = set()
        self.peers.register(PacketType.PytierFec, self.fec.on_packet)
        self._ip_to_peer: dict[bytes, int] = {}
        self._cidr_routes: list[tuple[int, int, int]] = []  # (network int, mask int, peer) longest first
        self._tun: TunDevice | None = None
        self._link: LinkConfig | None = None
        self._tun_routes: set[ipaddress.IPv4Network] = set()
        self._peer_host_routes: set[ipaddress.IPv4Network] = set()
        self._forwarding: SubnetForwarding | None = None
        self._host_state: HostState | None = None
        # pyroute2's IPRoute runs an event loop of its own, so it cannot be called from ours: every
        # netlink call goes through this one thread, in order.
        self._netlink = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netlink")
        self._listeners: list[UdpListener | TcpListener] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._connectors: dict[str, Connector] = {}
        self._mgmt: MgmtServer | None = None
        self._metrics_http: MetricsHttpServer | None = None
        self._proxy_totals = ProxyTotals()
        self.listener_urls: list[str] = []
        self.counters = self.peers.counters
        self.proxy: ProxyService | None = None
        self._proxy_hook: Callable[[bytes], bool] | None = None
        self._reachable: set[int] = set()

    def feature_flags(self) -> PeerFeatureFlag:
        if os.environ.get(LEGACY_ADVERTISEMENT_ENV) == "1":
            return PeerFeatureFlag()
        return PeerFeatureFlag(kcp_input=not self.config.disable_kcp_input,
                               quic_input=not self.config.disable_quic_input, pytier_fec=True)

    # ---- plumbing between the layers --------------------------------------------------------

    def _next_hop(self, peer_id: int) -> int | None:
        return self.route.next_hop(peer_id)

    def _send_rpc(self, to_peer: int, packet_type: int, payload: bytes) -> None:
        self.peers.send(to_peer, packet_type, payload)

    def _on_rpc_req(self, from_peer: int, payload: bytes) -> None:
        self.rpc.on_packet(from_peer, int(PacketType.RpcReq), payload)

    def _on_rpc_resp(self, from_peer: int, payload: bytes) -> None:
        self.rpc.on_packet(from_peer, int(PacketType.RpcResp), payload)

    def _send_fec(self, to_peer: int, payload: bytes) -> bool:
        return self.peers.send_direct_udp(to_peer, int(PacketType.PytierFec), payload)

    def _send_kcp(self, to_peer: int, packet_type: int, payload: bytes) -> bool:
        """KCP's packets: through FEC's KCP lane toward a capable direct peer, else as they are."""
        return self.fec.send_peer_packet(to_peer, packet_type, payload) or self.peers.send(
            to_peer, packet_type, payload)

    def _register_kcp(self, packet_type: PacketType, handler: Callable[[int, bytes], None]) -> None:
        """KcpSrc/KcpDst handlers take the same packets whether they came plain or through FEC."""
        self.peers.register(packet_type, handler)
        self.fec.register(packet_type, handler)

    def _fec_usable(self, peer: int) -> bool:
        """FEC frames only to a peer that advertised them, over a direct UDP link (never a relay)."""
        if peer not in self._fec_peers:
            return False
        conns = self.peers.conns.get(peer)
        return conns is not None and bool(conns) and conns[0].tunnel.info.scheme == "udp"

    def _on_data(self, from_peer: int, payload: bytes) -> None:
        tun = self._tun
        if tun is None or len(payload) < 20 or payload[0] >> 4 not in (4, 6):
            self.counters["rx_data_dropped"] += 1
            return
        tun.write_soon(payload)
        self.counters["rx_data_packets"] += 1

    def _on_tun_packets(self, packets: list[bytes]) -> None:
        send = self.peers.send
        lookup = self._ip_to_peer.get
        data = int(PacketType.Data)
        hook = self._proxy_hook
        fec = self.fec.send_udp if self.fec.enabled else None
        for pkt in packets:
            if len(pkt) < 20 or pkt[0] >> 4 != 4:
                self.counters["tun_dropped_not_ipv4"] += 1
                continue
            if hook is not None and hook(pkt):
                continue
            dst = pkt[16:20]
            peer = lookup(dst)
            if peer is None:
                peer = self._cidr_lookup(int.from_bytes(dst, "big"))
                if peer is None:
                    self.counters["tun_dropped_no_route"] += 1
                    continue
            if fec is not None and pkt[9] == 17 and fec(peer, pkt):
                continue
            if not send(peer, data, pkt):
                self.counters["tun_dropped_unreachable"] += 1

    def _cidr_lookup(self, addr: int) -> int | None:
        for net, mask, peer in self._cidr_routes:
            if addr & mask == net:
                return peer
        return None

    def _on_routes_changed(self) -> None:
        ip_map: dict[bytes, int] = {}
        cidrs: list[tuple[int, int, int, int]] = []
        hostnames: dict[int, str] = {}
        for entry in self.route.routes():
            info = entry.info
            if info.hostname:
                hostnames[entry.peer_id] = info.hostname
            if info.ipv4_addr is not None:
                ip_map[info.ipv4_addr.packed] = entry.peer_id
            for text in info.proxy_cidrs:
                try:
                    net = ipaddress.IPv4Network(text, strict=False)
                except ValueError:
                    continue
                cidrs.append((net.prefixlen, int(net.network_address), int(net.netmask), entry.peer_id))
        cidrs.sort(reverse=True)
        self._ip_to_peer = ip_map
        self._cidr_routes = [(n, m, p) for _, n, m, p in cidrs]
        self.peers.peer_hostnames = hostnames
        reachable = self.route.reachable_peers()
        self._fec_peers = {e.peer_id for e in self.route.routes() if e.info.feature_flag.pytier_fec}
        self.fec.forget(self._reachable - reachable)
        if self.proxy is not None:
            for gone in self._reachable - reachable:
                self.proxy.peer_gone(gone)
        self._reachable = reachable
        # A peer whose address lies outside our own prefix (all of them, with a /32) is reached
        # through a host route: the kernel has no connected route to it.
        own = self.config.ipv4
        self._peer_host_routes = set() if own is None else {
            net for net in (ipaddress.IPv4Network(ipaddress.IPv4Address(ip)) for ip in ip_map)
            if not net.subnet_of(own.network)}
        self._sync_tun_routes({ipaddress.IPv4Network((n, plen)) for plen, n, _, _ in cidrs}
                              | self._peer_host_routes)

    def _sync_tun_routes(self, wanted: set[ipaddress.IPv4Network]) -> None:
        link = self._link
        if link is None:
            return
        own = self.config.ipv4.network if self.config.ipv4 is not None else None
        # Our LAN stays on the LAN even when another site exports the same prefix (that is what a
        # mapped prefix is for).
        mine = {net for n in self.config.proxy_networks for net in (n.cidr, n.exported)}
        wanted = {n for n in wanted if n != own and n not in mine}
        gone, new = self._tun_routes - wanted, wanted - self._tun_routes
        self._tun_routes = wanted
        if gone or new:
            self._netlink.submit(self._apply_routes, link, gone, new)

    def _apply_routes(self, link: LinkConfig, gone: set[ipaddress.IPv4Network],
                      new: set[ipaddress.IPv4Network]) -> None:
        dev = link.ifname
        state = self._host_state
        if state is not None and new:
            state.adding_routes(new)
        for net in sorted(gone):
            try:
                link.remove_route(net)
                log.info("route %s via %s removed", net, dev)
            except OSError as exc:
                log.warning("cannot remove route %s via %s: %s", net, dev, exc)
        for net in sorted(new):
            try:
                link.add_route(net)
                why = "a peer's address" if net in self._peer_host_routes else "proxied by a peer"
                log.info("route %s via %s added (%s)", net, dev, why)
            except OSError as exc:
                log.warning("cannot add route %s via %s: %s", net, dev, exc)
        if state is not None and gone:
            state.routes_removed(gone)

    def _on_conflict(self, message: str) -> None:
        log.error("%s", message)
        self.counters["ipv4_conflicts"] += 1

    # ---- tunnels --------------------------------------------------------------------------

    def _on_incoming_tunnel(self, tunnel: Tunnel) -> None:
        remote = tunnel.info.remote_addr
        self.peers.add_tunnel(tunnel, f"from {tunnel.info.scheme}://{remote}",
                              f"from {tunnel.info.scheme}://{remote.rsplit(':', 1)[0]}")

    async def _start_listener(self, url: TunnelUrl) -> None:
        try:
            if url.scheme == "udp":
                lst: UdpListener | TcpListener = await UdpListener.start(
                    url.host, url.port, self._on_incoming_tunnel, offload=not self.config.disable_udp_offload)
            else:
                lst = await TcpListener.start(url.host, url.port, self._on_incoming_tunnel)
        except OSError as exc:
            raise UserError(f"cannot listen on {url}: {exc.strerror or exc}") from exc
        self._listeners.append(lst)
        self.listener_urls.append(f"{url.scheme}://{lst.local_addr}")
        log.info("listening on %s://%s", url.scheme, lst.local_addr)

    async def _is_own_listener(self, url: TunnelUrl) -> bool:
        """Whether `url` names one of this node's listeners (a peer list shared by all nodes)."""
        bound = [lst.local_addr.rsplit(":", 1) for lst in self._listeners
                 if isinstance(lst, UdpListener) == (url.scheme == "udp")]
        hosts = {host.strip("[]") for host, port in bound if int(port) == url.port}
        if not hosts:
            return False
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(url.host, url.port, type=socket.SOCK_DGRAM)
        except OSError:
            return False
        for family, _, _, _, sockaddr in infos:
            addr = str(sockaddr[0])
            if addr not in hosts and not hosts & {"0.0.0.0", "::"}:
                continue
            # An address we can bind to is one of ours.
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                try:
                    probe.bind((addr, 0))
                except OSError:
                    continue
            return True
        return False

    async def _keep_connected(self, connector: Connector) -> None:
        """Connect to a configured peer and reconnect, with back-off, whenever the link ends."""
        if await self._is_own_listener(connector.url):
            connector.last_error = "this is this node's own listener"
            log.warning("peer %s is this node's own listener: not connecting to it", connector.url)
            return
        url = connector.url
        delay = RECONNECT_MIN_S
        while True:
            started = time.monotonic()
            try:
                if url.scheme == "udp":
                    offload = not self.config.disable_udp_offload
                    tunnel = await connect_udp(url.host, url.port, offload=offload)
                else:
                    tunnel = await connect_tcp(url.host, url.port)
            except (OSError, TimeoutError) as exc:
                msg = str(exc) or type(exc).__name__
                if msg != connector.last_error:
                    log.warning("cannot connect to %s: %s (retrying)", url, msg)
                    connector.last_error = msg
            else:
                conn = await self.peers.add_tunnel(tunnel, f"to {url}")
                if conn is not None:
                    connector.last_error = ""
                    connector.conn = conn
                    await conn.closed.wait()
                    connector.conn = None
            if time.monotonic() - started > 60:
                delay = RECONNECT_MIN_S
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, RECONNECT_MAX_S)

    # ---- TUN --------------------------------------------------------------------------------

    async def _claim_host_state(self) -> None:
        """Undo what a crashed node of this instance left on the host, and record our own changes."""
        cfg = self.config
        try:
            self._host_state = await asyncio.get_running_loop().run_in_executor(
                self._netlink, HostState.claim, cfg.state_dir, cfg.instance_name)
        except StateError as exc:
            raise UserError(str(exc)) from exc

    async def _open_tun(self) -> None:
        cfg = self.config
        state = self._host_state
        if state is not None:
            state.opening_tun(cfg.dev_name)
        try:
            tun = TunDevice.open(cfg.dev_name, offload=TUN_OFFLOADS[cfg.tun_offload])
        except OSError as exc:
            raise UserError(str(exc)) from exc
        # Only an AEAD tag vouches that a packet is what the sending host's kernel checksummed.
        tun.trust_checksums = isinstance(self.peers.cipher, AeadCipher)
        self._tun = tun
        if state is not None:
            state.tun_opened(tun.name)
        loop = asyncio.get_running_loop()

        def configure() -> LinkConfig:
            link = LinkConfig(tun.name)
            link.set_up(cfg.mtu)
            if cfg.ipv4 is not None:
                link.add_address(cfg.ipv4)
            return link

        try:
            self._link = await loop.run_in_executor(self._netlink, configure)
        except OSError as exc:
            raise UserError(f"cannot configure TUN device {tun.name}: {exc}") from exc
        tun.attach(loop, self._on_tun_packets)
        log.info("TUN device %s up (mtu %d, %s, offload %s)", tun.name, cfg.mtu, cfg.ipv4 or "no address",
                 ",".join(self._tun_offload()) or "off")
        if cfg.proxy_networks and cfg.ipv4 is not None:
            forwarding = SubnetForwarding(
                f"pytier_{tun.name}", tun.name, cfg.ipv4.network,
                list(dict.fromkeys(n.cidr for n in cfg.proxy_networks)),
                [(n.cidr, n.mapped) for n in cfg.proxy_networks if n.mapped is not None])
            if state is not None:
                state.adding_nft_table("ip", forwarding.table)
                state.setting_sysctl(IP_FORWARD, "1")
            try:
                forwarding.open()
            except OSError as exc:
                forwarding.close()
                raise UserError(str(exc)) from exc
            self._forwarding = forwarding

    async def _close_tun(self) -> None:
        if self._forwarding is not None:
            self._forwarding.close()
            self._forwarding = None
        tun, link = self._tun, self._link
        self._tun = self._link = None
        if tun is not None:
            tun.detach()
        if link is not None:
            # Routes first, while the device still exists; then the device goes with its fd.
            await asyncio.get_running_loop().run_in_executor(self._netlink, link.cleanup)
        if tun is not None:
            tun.close()
            log.info("TUN device %s removed", tun.name)
        self._netlink.shutdown(wait=True)
        if self._host_state is not None:
            self._host_state.release()
            self._host_state = None

    # ---- management -------------------------------------------------------------------------

    def mgmt_handlers(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        return {
            "peer": lambda _p: self.describe_peers(),
            "route": lambda _p: self.describe_routes(),
            "node": lambda _p: self.describe_node(),
            "proxy": lambda _p: self.proxy.rows() if self.proxy is not None else [],
            "stats": lambda _p: self.describe_stats(),
            "peer_center": lambda _p: self.describe_peer_center(),
            "connector_list": lambda _p: [c.describe() for c in self._connectors.values()],
            "connector_add": lambda p: self.add_connector(p.get("url")),
            "connector_remove": lambda p: self.remove_connector(p.get("url")),
            "logger_get": lambda _p: self._logs().levels(),
            "logger_set": lambda p: self.set_log_level(p.get("level")),
            "metrics": lambda _p: self.metrics_text(),
        }

    def metrics_text(self) -> str:
        """Prometheus' text format of the node's figures (GET /metrics, `pytier-cli stats prometheus`)."""
        proxy_rows = self.proxy.rows() if self.proxy is not None else None
        return render(node_families(self.describe_node(), self.describe_stats(), self.describe_peers(),
                                    proxy_rows, self._proxy_totals))

    def describe_stats(self) -> dict[str, int]:
        stats = dict(self.counters)
        malformed = sum(lst.rx_malformed for lst in self._listeners)
        malformed += sum(c.tunnel.stats.rx_malformed for conns in self.peers.conns.values() for c in conns)
        if malformed:
            stats["rx_malformed_datagrams"] = malformed
        tx_errors = sum(lst.tx_errors for lst in self._listeners)
        tx_errors += sum(c.tunnel.stats.tx_errors for conns in self.peers.conns.values() for c in conns)
        if tx_errors:
            stats["tx_send_errors"] = tx_errors
        if self._tun is not None:
            for name in ("write_drops", "rx_super_segments", "rx_split_packets", "rx_offload_errors",
                         "tx_super_segments", "tx_merged_packets"):
                if value := getattr(self._tun, name):
                    stats[f"tun_{name}"] = value
        # What the listeners and the management API dropped or refused, by reason (docs/limits.md).
        for part in (*self._listeners, self._mgmt):
            for name, value in getattr(part, "counters", {}).items():
                stats[name] = stats.get(name, 0) + value
        for name, value in self._udp_socket_stats().items():
            if value:
                stats[f"udp_{name}"] = value
        stats.update(self.fec.totals())
        return stats

    def _udp_socket_stats(self) -> dict[str, int]:
        """Batching counters summed over every UDP socket: a listener's socket serves many tunnels."""
        sockets = {id(s): s for s in (lst.socket_stats for lst in self._listeners) if s is not None}
        for conns in self.peers.conns.values():
            for c in conns:
                if (s := c.tunnel.socket_stats) is not None:
                    sockets[id(s)] = s
        total: dict[str, int] = {}
        for s in sockets.values():
            for name in ("rx_syscalls", "rx_gro_batches", "tx_syscalls", "tx_gso_sends", "tx_dropped_full"):
                total[name] = total.get(name, 0) + getattr(s, name)
        return total

    def describe_peers(self) -> list[dict[str, Any]]:
        rows = self.peers.describe_conns()
        for row in rows:
            info = self.route.peer_info(int(row["peer_id"]))  # type: ignore[call-overload]
            row["ipv4"] = str(info.ipv4_addr) if info is not None and info.ipv4_addr else None
            row["version"] = info.easytier_version if info is not None else None
            row["cost"] = 1  # a direct link: EasyTier's "p2p"
            peer_id = int(row["peer_id"])  # type: ignore[call-overload]
            row.update(self.fec.describe(peer_id, peer_id in self._fec_peers))
        return rows

    # ---- run-time changes (pytier-cli connector, logger) -----------------------------------------

    def _start_connector(self, url: TunnelUrl) -> Connector:
        connector = Connector(url)
        connector.task = asyncio.ensure_future(self._keep_connected(connector))
        self._connectors[str(url)] = connector
        return connector

    @staticmethod
    def _peer_url(text: Any) -> TunnelUrl:
        if not isinstance(text, str):
            raise MgmtError('expected a peer URL in "url", e.g. tcp://198.18.0.2:11010')
        try:
            [url] = parse_peer(text)
        except ValueError as e:
            raise MgmtError(str(e)) from None
        return url

    def add_connector(self, text: Any) -> dict[str, Any]:
        url = self._peer_url(text)
        if str(url) in self._connectors:
            raise MgmtError(f"connector {url} is already present")
        connector = self._start_connector(url)
        log.info("connector %s added", url)
        return connector.describe()

    def remove_connector(self, text: Any) -> dict[str, Any]:
        url = self._peer_url(text)
        connector = self._connectors.pop(str(url), None)
        if connector is None:
            raise MgmtError(f"connector {url} is not present (see pytier-cli connector list)")
        row = connector.describe()
        if connector.task is not None:
            connector.task.cancel()
        if connector.conn is not None:
            connector.conn.tunnel.close("connector removed")
        log.info("connector %s removed", url)
        return row

    @staticmethod
    def _logs() -> logs.Logs:
        current = logs.active()
        if current is None:
            raise MgmtError("this node's logging was not set up by pytier-core")
        return current

    def set_log_level(self, level: Any) -> dict[str, str | None]:
        current = self._logs()
        try:
            name = logs.level_name(level if isinstance(level, str) else "")
        except ValueError as e:
            raise MgmtError(str(e)) from None
        where = "stderr and the log file" if current.file_log is not None else "stderr"
        # Said where the log still shows it: before a change that hides info lines, after one that shows them.
        if logs.LEVELS[name] > logging.INFO:
            log.info("log level of %s set to %s", where, name)
        levels = current.set_level(name)
        if logs.LEVELS[name] <= logging.INFO:
            log.info("log level of %s set to %s", where, name)
        return levels

    # ---- descriptions -----------------------------------------------------------------------

    def _latency_ms(self, peer_id: int | None) -> float | None:
        """Our smoothed round trip to a direct peer, over its fastest link."""
        rtts = [c.rtt_s for c in self.peers.conns.get(peer_id, []) if c.rtt_s is not None] if peer_id else []
        return round(min(rtts) * 1000, 2) if rtts else None

    def describe_peer_center(self) -> list[dict[str, Any]]:
        """Every reachable node with its direct peers, as route sync reported them; latency only for
        this node's own links (route sync carries no latency)."""
        conns = self.route.core.peer_map()
        rows = []
        for peer_id in sorted({self.peer_id, *self.route.reachable_peers()}):
            info = self.route.peer_info(peer_id)
            mine = peer_id == self.peer_id
            rows.append({
                "peer_id": peer_id,
                "hostname": self._hostname_of(peer_id),
                "ipv4": str(info.ipv4_addr) if info is not None and info.ipv4_addr else None,
                "direct_peers": [
                    {"peer_id": p, "hostname": self._hostname_of(p),
                     "latency_ms": self._latency_ms(p) if mine else None}
                    for p in sorted(conns.get(peer_id, ()))
                ],
            })
        return rows

    def _hostname_of(self, peer_id: int) -> str | None:
        if peer_id == self.peer_id:
            return self.config.hostname
        info = self.route.peer_info(peer_id)
        return info.hostname if info is not None else None

    def describe_routes(self) -> list[dict[str, Any]]:
        rows = []
        for e in self.route.routes():
            hop_info = self.route.peer_info(e.next_hop) if e.next_hop is not None else None
            rows.append({
                "peer_id": e.peer_id,
                "ipv4": str(e.info.ipv4_addr) if e.info.ipv4_addr else None,
                "hostname": e.info.hostname,
                "next_hop_peer_id": e.next_hop,
                "next_hop_hostname": hop_info.hostname if hop_info is not None else None,
                "next_hop_ipv4": str(hop_info.ipv4_addr) if hop_info and hop_info.ipv4_addr else None,
                "next_hop_latency_ms": self._latency_ms(e.next_hop),
                "cost": e.cost,
                # Route sync carries no latencies: a path's is known only when it is our own link.
                "path_latency_ms": self._latency_ms(e.peer_id) if e.cost == 1 else None,
                "proxy_cidrs": list(e.info.proxy_cidrs),
                "features": e.info.feature_flag.names(),
                "version": e.info.easytier_version,
            })
        return rows

    def _tun_offload(self) -> list[str]:
        tun = self._tun
        if tun is None or not tun.vnet_hdr:
            return []
        return ["coalesce", *offload_names(tun.offload)]

    def describe_node(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "peer_id": self.peer_id,
            "ipv4": str(cfg.ipv4) if cfg.ipv4 else None,
            "hostname": cfg.hostname,
            "network_name": cfg.network_name,
            "instance_name": cfg.instance_name,
            "dev_name": self._tun.name if self._tun is not None else None,
            "tun_offload": self._tun_offload(),
            "mtu": cfg.mtu,
            "listeners": list(self.listener_urls),
            "features": self.feature_flags().names(),
            "proxy_networks": [str(n) for n in cfg.proxy_networks],
            "version": f"pytier-{__version__}",
            "uptime_s": round(time.time() - self.started_at, 1),
        }

    # ---- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        if not cfg.no_tun:
            await self._claim_host_state()
        host, port = cfg.rpc_portal
        self._mgmt = MgmtServer(self.mgmt_handlers(), host, port, cfg.rpc_portal_whitelist)
        await self._mgmt.start()
        if cfg.metrics_listen is not None:
            self._metrics_http = MetricsHttpServer(self.metrics_text, *cfg.metrics_listen)
            await self._metrics_http.start()
        if not cfg.no_tun:
            await self._open_tun()
        for url in cfg.listeners:
            await self._start_listener(url)
        self.peers.start()
        self.fec.start()
        if cfg.enable_fec_udp and cfg.mtu > MAX_PROTECTED_PACKET:
            log.warning("--mtu %d with --enable-fec-udp: UDP packets above %d bytes go unprotected "
                        "(their FEC frames would not fit a 1500-byte underlay packet)",
                        cfg.mtu, MAX_PROTECTED_PACKET)
        await self._start_proxy()
        await self.route.start()
        for url in cfg.peers:
            self._start_connector(url)
        log.info(
            "node %d up: network %r, ipv4 %s, peers %s",
            self.peer_id, cfg.network_name, cfg.ipv4 or "none",
            ", ".join(str(u) for u in cfg.peers) or "none",
        )

    async def _start_proxy(self) -> None:
        cfg = _with_proxy_transport(self.config)
        outbound: list[Transport] = []
        inbound: list[Transport] = []
        if cfg.enable_kcp_proxy or not cfg.disable_kcp_input:
            if cfg.enable_fec_kcp:
                transport = kcp.KcpTransport(self.peer_id, self._send_kcp, fec_shape=self.fec.kcp_shape)
            else:
                transport = kcp.KcpTransport(self.peer_id, self.peers.send)
            kcp.register(transport, self._register_kcp)
            if cfg.enable_kcp_proxy:
                outbound.append(transport)
            if not cfg.disable_kcp_input:
                inbound.append(transport)
        # After KCP: the first outbound transport the destination takes wins, so KCP has precedence
        # and QUIC carries only toward nodes that disabled KCP input.
        if cfg.enable_quic_proxy or not cfg.disable_quic_input:
            quic_transport = quic.QuicTransport(self.peer_id, self.peers.send)
            quic.register(quic_transport, self.peers.register)
            if cfg.enable_quic_proxy:
                outbound.append(quic_transport)
            if not cfg.disable_quic_input:
                inbound.append(quic_transport)
        if cfg.ipv4 is None or self._tun is None:
            if outbound:
                log.warning("TCP proxy: no virtual IPv4 or no TUN device, so nothing is intercepted here")
            outbound = []
        if not outbound and not inbound:
            return
        assert cfg.ipv4 is not None or not outbound
        if outbound and not cfg.use_smoltcp and cfg.ipv4 is not None and cfg.ipv4.network.prefixlen > 30:
            raise UserError(
                f"--ipv4 {cfg.ipv4}: the TCP proxy intercepts through a NAT hairpin that needs a virtual "
                "network of at least 4 addresses (/30 or wider); widen the prefix, or add --use-smoltcp"
            )
        tun = self._tun
        self.proxy = ProxyService(
            own=cfg.ipv4 or ipaddress.IPv4Interface("0.0.0.0/32"),
            write_tun=(lambda pkt: tun.write(pkt)) if tun is not None else (lambda pkt: False),
            peer_for_ip=self._peer_for_ip,
            peer_info=self.route.peer_info,
            next_hop=self.route.next_hop,
            outbound=outbound,
            inbound=inbound,
            userspace=cfg.use_smoltcp,
            mtu=cfg.mtu,
            netmaps=[(n.cidr, n.mapped) for n in cfg.proxy_networks if n.mapped is not None],
            auto_metrics=self._path_metrics if cfg.proxy_transport == "auto" else None,
        )
        self.proxy.entries.on_retire = self._proxy_totals.retire
        await self.proxy.start()
        if outbound:
            self._proxy_hook = self.proxy.on_tun_packet

    def _path_metrics(self, peer_id: int, accepts_kcp: bool, accepts_quic: bool) -> PathMetrics:
        """Our link toward `peer_id`'s first hop, as traffic to it leaves: nothing beyond our
        neighbours is measured."""
        peers = self.peers
        hop = peers.first_hop(peer_id) if peers.first_hop is not None else None
        if hop is None:
            hop = peer_id if peers.conns.get(peer_id) else self.route.next_hop(peer_id)
        conns = peers.conns.get(hop) if hop is not None else None
        if not conns:
            return PathMetrics(0.0, None, 0, accepts_kcp, accepts_quic)
        conn = conns[0]
        return link_metrics(window_loss=conn.loss_rate, smoothed_loss=conn.smoothed_loss, rtt_s=conn.rtt_s,
                            up_s=time.monotonic() - conn.connected_at, ping_interval_s=peers.ping_interval_s,
                            accepts_kcp=accepts_kcp, accepts_quic=accepts_quic)

    def _peer_for_ip(self, addr: bytes) -> int | None:
        peer = self._ip_to_peer.get(addr)
        if peer is None:
            peer = self._cidr_lookup(int.from_bytes(addr, "big"))
        return peer

    async def stop(self) -> None:
        if self.proxy is not None:
            await self.proxy.close()
        for task in self._tasks:
            task.cancel()
        for connector in self._connectors.values():
            if connector.task is not None:
                connector.task.cancel()
        for lst in self._listeners:
            lst.close()
        with contextlib.suppress(Exception):
            await self.route.close()
        await self.peers.close()
        self.fec.close()
        self.rpc.close()
        if self._mgmt is not None:
            await self._mgmt.close()
        if self._metrics_http is not None:
            await self._metrics_http.close()
        await self._close_tun()
        log.info("node %d stopped", self.peer_id)


def _with_proxy_transport(config: Config) -> Config:
    """--proxy-transport names the outbound transports in place of --enable-kcp/quic-proxy."""
    mode = config.proxy_transport
    if mode is None:
        return config
    return replace(config, enable_kcp_proxy=mode in ("kcp", "auto"),
                   enable_quic_proxy=mode in ("quic", "auto"))


async def run_node(config: Config) -> int:
    node = Node(config)
    try:
        await node.start()
        await asyncio.Event().wait()
    finally:
        await node.stop()
    return 0
