"""RouteService: the asyncio shell that runs OSPF route sync (`RouteSync`) over `PeerRpc`.

It serves OspfRouteRpc.SyncRouteInfo, calls it on neighbours when the core has something to send
(checked every tick and whenever something changes), sweeps stale entries, and answers route
queries for the node. Callbacks: `on_change()` after the table changed, `on_conflict(message)` for
duplicate virtual IPv4 addresses or peer ids.

With `latency_first`, this node's own traffic also gets a loss-aware first hop per destination
(`first_hop`, see `pytier.peers.path_cost`), re-evaluated every tick from the measured links. What
route sync advertises and how relayed packets are forwarded stay EasyTier's: least hops.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from enum import Enum
from ipaddress import IPv4Address, IPv4Interface

from pytier.peers.path_cost import Candidate, FirstHopChooser, LinkState, Switch, candidates
from pytier.peers.peer_conn import PeerConn
from pytier.peers.route_sync import (
    DEFAULT_EASYTIER_VERSION,
    OSPF_ROUTE_SERVICE,
    SYNC_ROUTE_INFO,
    ConflictDetected,
    MyInfo,
    OutgoingSync,
    RouteSync,
    RouteTimers,
)
from pytier.peers.route_table import RouteEntry
from pytier.peers.rpc import PeerRpc, RpcCallError
from pytier.wire.messages import PeerFeatureFlag, RoutePeerInfo

__all__ = ["MyInfo", "RouteEntry", "RouteService", "RouteTimers"]

log = logging.getLogger(__name__)


class _Unset(Enum):
    UNSET = 0


UNSET = _Unset.UNSET


class RouteService:
    def __init__(
        self,
        *,
        my_peer_id: int,
        rpc: PeerRpc,
        ipv4: IPv4Interface | None = None,
        proxy_cidrs: Iterable[str] = (),
        hostname: str = "",
        feature_flag: PeerFeatureFlag | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        timers: RouteTimers | None = None,
        rng: random.Random | None = None,
        easytier_version: str = DEFAULT_EASYTIER_VERSION,
        on_change: Callable[[], None] | None = None,
        on_conflict: Callable[[str], None] | None = None,
        latency_first: bool = False,
        links: Mapping[int, Sequence[PeerConn]] | None = None,
    ) -> None:
        """`links`: the live connections per neighbour (the first one carries traffic), measured for
        `latency_first`."""
        self._rpc = rpc
        self._clock = clock
        my_info = MyInfo(ipv4, tuple(proxy_cidrs), hostname, feature_flag or PeerFeatureFlag())
        self._core = RouteSync(
            my_peer_id,
            my_info,
            now=clock(),
            wall_clock=wall_clock,
            timers=timers,
            rng=rng,
            easytier_version=easytier_version,
        )
        self.on_change = on_change
        self.on_conflict = on_conflict
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._calls: set[asyncio.Task[None]] = set()
        self._closed = False
        self._links = links if links is not None else {}
        self._chooser = FirstHopChooser() if latency_first else None
        self._first_hops: dict[int, int] = {}
        rpc.register(OSPF_ROUTE_SERVICE, SYNC_ROUTE_INFO, self._on_sync_request)

    # ---- this node --------------------------------------------------------------------------

    @property
    def core(self) -> RouteSync:
        return self._core

    @property
    def my_peer_id(self) -> int:
        return self._core.my_peer_id

    @property
    def peer_route_id(self) -> int:
        return self._core.peer_route_id

    def my_info(self) -> MyInfo:
        return self._core.my_info

    def set_my_info(
        self,
        *,
        ipv4: IPv4Interface | _Unset | None = UNSET,
        proxy_cidrs: Iterable[str] | _Unset = UNSET,
        hostname: str | _Unset = UNSET,
        feature_flag: PeerFeatureFlag | _Unset = UNSET,
    ) -> None:
        """Change what this node advertises; its version goes up only if something really changed."""
        cur = self._core.my_info
        info = MyInfo(
            cur.ipv4 if isinstance(ipv4, _Unset) else ipv4,
            cur.proxy_cidrs if isinstance(proxy_cidrs, _Unset) else tuple(proxy_cidrs),
            cur.hostname if isinstance(hostname, _Unset) else hostname,
            cur.feature_flag if isinstance(feature_flag, _Unset) else feature_flag,
        )
        self._core.set_my_info(info, self._clock())
        self._after_core()

    # ---- neighbours -------------------------------------------------------------------------

    def peer_connected(self, peer_id: int) -> None:
        self._core.peer_connected(peer_id, self._clock())
        self._after_core()

    def peer_disconnected(self, peer_id: int) -> None:
        self._core.peer_disconnected(peer_id, self._clock())
        self._after_core()

    # ---- queries ----------------------------------------------------------------------------

    def next_hop(self, peer_id: int) -> int | None:
        """The least-hop next hop, as every node computes it: relayed packets go this way."""
        return self._core.next_hop(peer_id)

    def first_hop(self, peer_id: int) -> int | None:
        """With latency_first, the loss-aware first hop for this node's own packets to `peer_id`."""
        return self._first_hops.get(peer_id)

    def peer_for_ipv4(self, addr: IPv4Address) -> int | None:
        """Exact virtual IPv4 first; outside our own subnet, the longest proxied CIDR."""
        return self._core.peer_for_ipv4(addr)

    def peer_info(self, peer_id: int) -> RoutePeerInfo | None:
        return self._core.peer_info(peer_id)

    def routes(self) -> list[RouteEntry]:
        """Reachable peers with a known RoutePeerInfo, by peer id; with latency_first, the first hop
        and hop count this node's own traffic uses."""
        entries = self._core.routes()
        chooser = self._chooser
        if chooser is None:
            return entries
        out = []
        for e in entries:
            chosen = chooser.choice(e.peer_id)
            if chosen is not None:
                e = dataclasses.replace(e, next_hop=chosen.hop, cost=chosen.hops)
            out.append(e)
        return out

    def reachable_peers(self) -> set[int]:
        return self._core.reachable_peers()

    # ---- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is None and not self._closed:
            self._task = asyncio.create_task(self._run(), name=f"route-sync-{self.my_peer_id}")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._rpc.unregister(OSPF_ROUTE_SERVICE, SYNC_ROUTE_INFO)
        tasks = [*self._calls, *([self._task] if self._task is not None else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._task = None

    # ---- internals --------------------------------------------------------------------------

    def _on_sync_request(self, from_peer: int, request: bytes) -> bytes:
        response = self._core.handle_sync_request(from_peer, request, self._clock())
        self._after_core()
        return response

    async def _run(self) -> None:
        timers = self._core.timers
        next_sweep = self._clock() + timers.sweep_s
        next_choice = self._clock()
        while True:
            self._wake.clear()
            now = self._clock()
            try:
                if now >= next_sweep:
                    self._core.sweep(now)
                    next_sweep = now + timers.sweep_s
                if self._chooser is not None and now >= next_choice:
                    self._choose_first_hops(self._chooser, now)
                    next_choice = now + timers.tick_s
                for out in self._core.poll(now):
                    task = asyncio.create_task(self._sync(out))
                    self._calls.add(task)
                    task.add_done_callback(self._calls.discard)
                self._dispatch_events()
            except Exception:
                log.exception("route sync step failed")
            delay = min(timers.tick_s, max(0.0, next_sweep - now))
            retry = self._core.next_retry(now)
            if retry is not None:
                delay = min(delay, retry - now)
            # asyncio.timeout, not wait_for: on 3.11 wait_for loses a cancel that lands while the
            # event is being set (a peer going down during shutdown), and this loop would never end.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, delay)):
                    await self._wake.wait()

    async def _sync(self, out: OutgoingSync) -> None:
        try:
            response = await self._rpc.call(
                out.peer_id,
                OSPF_ROUTE_SERVICE,
                SYNC_ROUTE_INFO,
                out.request,
                timeout_s=self._core.timers.rpc_timeout_s,
            )
        except RpcCallError as exc:
            log.debug("route sync with peer %d failed: %s", out.peer_id, exc)
            self._core.handle_sync_failure(out.peer_id, out.token, self._clock())
        except Exception:
            log.exception("route sync call to peer %d failed", out.peer_id)
            self._core.handle_sync_failure(out.peer_id, out.token, self._clock())
        else:
            self._core.handle_sync_response(out.peer_id, out.token, response, self._clock())
        self._after_core()

    def _choose_first_hops(self, chooser: FirstHopChooser, now: float) -> None:
        table = self._core.table
        neighbours = self._core.neighbours()
        links = {
            peer: LinkState(None if conns[0].rtt_s is None else conns[0].rtt_s * 1000, conns[0].smoothed_loss)
            for peer, conns in self._links.items()
            if conns and peer in neighbours
        }
        reachable = {p: c for p in table.reachable_peers() if (c := table.cost(p)) is not None}
        options = candidates(reachable, links, {p: table.hops_from(p) for p in links})
        for switch in chooser.update(now, options):
            self._log_switch(switch, links)
        self._first_hops = chooser.first_hops()

    def _log_switch(self, switch: Switch, links: Mapping[int, LinkState]) -> None:
        def via(c: Candidate) -> str:
            link = links.get(c.hop)
            measured = "" if link is None else f", link {link.loss:.0%} loss"
            if link is not None and link.latency_ms is not None:
                measured += f" {link.latency_ms:.1f} ms"
            where = "direct" if c.hop == switch.dest else f"via {self._name(c.hop)}"
            return f"{where} (cost {c.cost:.1f}{measured})"

        log.info("traffic to %s now goes %s instead of %s", self._name(switch.dest), via(switch.new),
                 via(switch.old))

    def _name(self, peer_id: int) -> str:
        info = self._core.peer_info(peer_id)
        hostname = info.hostname if info is not None else None
        return f"peer {peer_id} ({hostname})" if hostname else f"peer {peer_id}"

    def _after_core(self) -> None:
        self._dispatch_events()
        self._wake.set()

    def _dispatch_events(self) -> None:
        changed = False
        for event in self._core.pop_events():
            if not isinstance(event, ConflictDetected):
                changed = True
            elif self.on_conflict is None:
                log.warning("%s", event.message)
            else:
                self._callback(self.on_conflict, event.message)
        if changed and self.on_change is not None:
            self._callback(self.on_change)

    @staticmethod
    def _callback(fn: Callable[..., None], *args: str) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("route callback failed")
