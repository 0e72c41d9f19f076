"""EasyTier's OSPF-style route sync (OspfRouteRpc.SyncRouteInfo, protocol notes §5.6) as a sans-IO core.

Every node floods RoutePeerInfos (who it is: virtual IPv4, proxied CIDRs, feature flags) and its
connection info (who it is directly connected to) to its direct neighbours, each entry with its own
version. Per neighbour we keep a session: our random session id, theirs, and which versions the
neighbour is known to have, so only newer entries travel. `RouteSync` takes decoded time and bytes,
and returns requests to send and events; `pytier.peers.route.RouteService` does the I/O.

Crash hazards in real nodes (§5.9) shape several rules here: a peer never gets its own entry back,
others' entries are relayed as the exact bytes received, version-0 entries are never sent, a conn
bitmap always has ceil(N²/8) bytes, foreign-network infos are never sent, and a response sets its
error field only for a real refusal (this core never sets it).
"""

from __future__ import annotations

import dataclasses
import random
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from ipaddress import IPv4Address, IPv4Interface, ip_network

from pytier.peers.route_table import RouteEntry, RouteTable
from pytier.wire.errors import WireError
from pytier.wire.messages import (
    PeerFeatureFlag,
    RouteConnBitmap,
    RoutePeerInfo,
    SyncRouteInfoError,
    SyncRouteInfoRequest,
    SyncRouteInfoResponse,
)

OSPF_ROUTE_SERVICE = "OspfRouteRpc"
SYNC_ROUTE_INFO = 1

try:
    _PACKAGE_VERSION = metadata.version("pytier")
except metadata.PackageNotFoundError:
    _PACKAGE_VERSION = "0"
DEFAULT_EASYTIER_VERSION = f"pytier-{_PACKAGE_VERSION}"


@dataclass(frozen=True, slots=True)
class RouteTimers:
    """Durations in seconds; the defaults are EasyTier's (§5.6, §8)."""

    tick_s: float = 1.0  # how often sessions are checked for news
    initiator_resync_s: float = 10.0  # the initiator session syncs at least this often
    rpc_timeout_s: float = 3.0
    retry_min_s: float = 0.05  # back-off after a failed sync, doubling up to retry_max_s
    retry_max_s: float = 5.0
    refresh_s: float = 3600.0  # our own entry is re-versioned at least this often
    info_ttl_s: float = 3660.0  # an entry not refreshed (by a higher version) for this long goes
    unreachable_ttl_s: float = 90.0  # an entry unreachable for this long goes
    sweep_s: float = 60.0
    known_version_ttl_s: float = 60.0  # "neighbour has version X" is forgotten when idle this long


@dataclass(frozen=True, slots=True)
class MyInfo:
    """What this node advertises about itself."""

    ipv4: IPv4Interface | None = None
    proxy_cidrs: tuple[str, ...] = ()
    hostname: str = ""
    feature_flag: PeerFeatureFlag = field(default_factory=PeerFeatureFlag)

    def normalized(self) -> MyInfo:
        """Canonical CIDR strings (ValueError on a bad one) and a private copy of the flags."""
        cidrs = tuple(str(ip_network(text, strict=False)) for text in self.proxy_cidrs)
        return MyInfo(self.ipv4, cidrs, self.hostname, dataclasses.replace(self.feature_flag))


@dataclass(frozen=True, slots=True)
class RoutesChanged:
    """A route, hop count, reachable peer or a reachable peer's info changed."""


@dataclass(frozen=True, slots=True)
class ConflictDetected:
    message: str


RouteEvent = RoutesChanged | ConflictDetected


@dataclass(frozen=True, slots=True)
class OutgoingSync:
    """A SyncRouteInfo request to call on `peer_id`; report its outcome with the same `token`."""

    peer_id: int
    token: int
    request: bytes


@dataclass(slots=True)
class _Known:
    version: int
    touched: float


class _VersionMemory:
    """Which version of each entry one neighbour is known to have."""

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        self._entries: dict[int, _Known] = {}

    def get(self, peer_id: int) -> int:
        known = self._entries.get(peer_id)
        return 0 if known is None else known.version

    def note(self, peer_id: int, version: int, now: float) -> None:
        known = self._entries.get(peer_id)
        if known is None:
            self._entries[peer_id] = _Known(version, now)
        else:
            known.version = max(known.version, version)
            known.touched = now

    def forget_idle(self, now: float, ttl: float) -> None:
        for peer_id in [p for p, k in self._entries.items() if now - k.touched >= ttl]:
            del self._entries[peer_id]

    def forget(self, peer_ids: Iterable[int]) -> None:
        for peer_id in peer_ids:
            self._entries.pop(peer_id, None)

    def clear(self) -> None:
        self._entries.clear()


@dataclass(slots=True)
class _InFlight:
    token: int
    infos: dict[int, int]
    conns: dict[int, int]


@dataclass(slots=True)
class _Session:
    peer_id: int
    my_session_id: int
    last_activity: float
    their_session_id: int | None = None
    infos_known: _VersionMemory = field(default_factory=_VersionMemory)
    conns_known: _VersionMemory = field(default_factory=_VersionMemory)
    in_flight: _InFlight | None = None
    last_success: float | None = None
    retry_at: float = 0.0
    backoff: float = 0.0

    def learn_session_id(self, session_id: int) -> None:
        # A new id means the neighbour started over: it may have forgotten everything we sent.
        if self.their_session_id != session_id:
            if self.their_session_id is not None:
                self.infos_known.clear()
                self.conns_known.clear()
            self.their_session_id = session_id


@dataclass(slots=True)
class _StoredInfo:
    info: RoutePeerInfo
    last_seen: float


@dataclass(slots=True)
class _StoredConn:
    version: int
    peers: frozenset[int]
    last_seen: float


class RouteSync:
    """Route sync state of one node. Every method takes `now` from one monotonic clock (seconds)."""

    def __init__(
        self,
        my_peer_id: int,
        my_info: MyInfo,
        *,
        now: float,
        wall_clock: Callable[[], float] = time.time,
        timers: RouteTimers | None = None,
        rng: random.Random | None = None,
        easytier_version: str = DEFAULT_EASYTIER_VERSION,
    ) -> None:
        self.my_peer_id = my_peer_id
        self.timers = timers or RouteTimers()
        self._wall_clock = wall_clock
        self._rng = rng or random.SystemRandom()
        self._easytier_version = easytier_version
        self.peer_route_id = self._rng.getrandbits(64) or 1
        self.inst_id = uuid.UUID(int=self._rng.getrandbits(128), version=4).bytes
        self._my = my_info.normalized()
        self._my_version = 0
        self._my_versioned_at = now
        self._my_msg = RoutePeerInfo()
        self._my_conn_version = 0
        self._neighbours: set[int] = set()
        self._sessions: dict[int, _Session] = {}
        self._infos: dict[int, _StoredInfo] = {}
        self._conns: dict[int, _StoredConn] = {}
        self._unreachable_since: dict[int, float] = {}
        self._events: list[RouteEvent] = []
        self._reported_ip_conflicts: set[tuple[IPv4Address, tuple[int, ...]]] = set()
        self._reported_id_conflicts: set[int] = set()
        self._next_token = 0
        self._table = RouteTable(my_peer_id, self._my.ipv4, (), {}, {})
        self._signature = self._table.signature()
        self._bump_my_version(now)

    # ---- our own entry --------------------------------------------------------------------------

    @property
    def my_info(self) -> MyInfo:
        return self._my

    @property
    def my_version(self) -> int:
        return self._my_version

    def my_route_peer_info(self) -> RoutePeerInfo:
        """Our RoutePeerInfo as we currently advertise it."""
        return self._my_msg

    def set_my_info(self, info: MyInfo, now: float) -> None:
        """Advertise changed facts about this node (a new version only when something changed)."""
        info = info.normalized()
        if info == self._my:
            return
        self._my = info
        self._bump_my_version(now)
        self._recompute(now)

    def _bump_my_version(self, now: float) -> None:
        self._my_version += 1
        self._my_versioned_at = now
        wall = self._wall_clock()
        seconds = int(wall)
        my = self._my
        msg = RoutePeerInfo(
            peer_id=self.my_peer_id,
            inst_id=self.inst_id,
            ipv4_addr=my.ipv4.ip if my.ipv4 is not None else None,
            proxy_cidrs=list(my.proxy_cidrs),
            hostname=my.hostname or None,
            last_update=(seconds, int((wall - seconds) * 1e9)),
            version=self._my_version,
            easytier_version=self._easytier_version,
            feature_flag=dataclasses.replace(my.feature_flag),
            peer_route_id=self.peer_route_id,
            network_length=my.ipv4.network.prefixlen if my.ipv4 is not None else 0,
        )
        msg.raw = msg.encode_fields()
        self._my_msg = msg

    def _refresh_if_due(self, now: float) -> None:
        if now - self._my_versioned_at >= self.timers.refresh_s:
            self._bump_my_version(now)

    # ---- neighbours -----------------------------------------------------------------------------

    def peer_connected(self, peer_id: int, now: float) -> None:
        if peer_id in (0, self.my_peer_id) or peer_id in self._neighbours:
            return
        self._neighbours.add(peer_id)
        self._session(peer_id, now)
        self._my_conn_version += 1
        self._recompute(now)

    def peer_disconnected(self, peer_id: int, now: float) -> None:
        if peer_id not in self._neighbours:
            return
        self._neighbours.discard(peer_id)
        self._sessions.pop(peer_id, None)
        self._my_conn_version += 1
        self._recompute(now)

    def neighbours(self) -> set[int]:
        return set(self._neighbours)

    def is_initiator(self, peer_id: int) -> bool:
        """True toward exactly one neighbour: the one with the lowest peer id."""
        return bool(self._neighbours) and peer_id == min(self._neighbours)

    def _session(self, peer_id: int, now: float) -> _Session:
        session = self._sessions.get(peer_id)
        if session is None:
            session = _Session(peer_id, self._rng.getrandbits(64) or 1, now)
            self._sessions[peer_id] = session
        return session

    # ---- serving SyncRouteInfo ------------------------------------------------------------------

    def handle_sync_request(self, from_peer: int, data: bytes, now: float) -> bytes:
        """Absorb a neighbour's SyncRouteInfo request; returns the encoded response.

        Raises WireError when `data` is not a SyncRouteInfoRequest.
        """
        req = SyncRouteInfoRequest.decode(data)
        session = self._session(from_peer, now)
        session.learn_session_id(req.my_session_id)
        session.last_activity = now
        if from_peer != self.my_peer_id and self._absorb(session, req, now):
            self._recompute(now)
        # error stays unset: a present DuplicatePeerId(0) panics a real node (§5.9).
        return SyncRouteInfoResponse(
            is_initiator=self.is_initiator(from_peer), session_id=session.my_session_id
        ).encode()

    def _absorb(self, session: _Session, req: SyncRouteInfoRequest, now: float) -> bool:
        changed = False
        for info in req.peer_infos or ():
            peer_id, version = info.peer_id, info.version
            if peer_id == 0 or version == 0:
                continue
            if peer_id == self.my_peer_id:
                self._check_own_id(session.peer_id, info)
                continue
            session.infos_known.note(peer_id, version, now)
            stored = self._infos.get(peer_id)
            if stored is None or version > stored.info.version:
                if not info.raw:
                    info.raw = info.encode_fields()
                self._infos[peer_id] = _StoredInfo(info, now)
                changed = True
        for peer_id, version, peers in _conn_rows(req):
            if peer_id in (0, self.my_peer_id) or version == 0:
                continue
            session.conns_known.note(peer_id, version, now)
            stored_conn = self._conns.get(peer_id)
            if stored_conn is None or version > stored_conn.version:
                self._conns[peer_id] = _StoredConn(version, frozenset(peers - {peer_id}), now)
                changed = True
        return changed

    def _check_own_id(self, from_peer: int, info: RoutePeerInfo) -> None:
        if info.peer_route_id == self.peer_route_id or info.peer_route_id in self._reported_id_conflicts:
            return
        self._reported_id_conflicts.add(info.peer_route_id)
        self._events.append(
            ConflictDetected(
                f"peer id {self.my_peer_id} is duplicated: peer {from_peer} relayed an entry for it from "
                f"another node (hostname {info.hostname!r}, ipv4 {info.ipv4_addr}, "
                f"peer_route_id {info.peer_route_id:#x}; ours is {self.peer_route_id:#x})"
            )
        )

    # ---- sending SyncRouteInfo ------------------------------------------------------------------

    def poll(self, now: float) -> list[OutgoingSync]:
        """Requests due now: to every neighbour with news, and the initiator's periodic re-sync."""
        self._refresh_if_due(now)
        reachable = self._table.reachable_peers()
        out = []
        for peer_id in sorted(self._neighbours):
            session = self._sessions[peer_id]
            if session.in_flight is not None or now < session.retry_at:
                continue
            resync_due = self.is_initiator(peer_id) and (
                session.last_success is None or now - session.last_success >= self.timers.initiator_resync_s
            )
            request = self._build_request(session, reachable, now, force=resync_due)
            if request is not None:
                out.append(request)
        return out

    def _build_request(
        self, session: _Session, reachable: set[int], now: float, *, force: bool
    ) -> OutgoingSync | None:
        dst = session.peer_id
        me = self.my_peer_id
        infos: list[RoutePeerInfo] = []
        sent_infos: dict[int, int] = {}
        if self._my_version > session.infos_known.get(me):
            infos.append(self._my_msg)
            sent_infos[me] = self._my_version
        for peer_id in sorted(self._infos):
            info = self._infos[peer_id].info
            # Never the destination's own entry; never a dead node's (it would bounce around forever).
            if peer_id == dst or peer_id not in reachable:
                continue
            if info.version > session.infos_known.get(peer_id):
                infos.append(info)
                sent_infos[peer_id] = info.version
        rows: dict[int, tuple[int, frozenset[int]]] = {}
        if self._my_conn_version > session.conns_known.get(me):
            rows[me] = (self._my_conn_version, frozenset(self._neighbours))
        for peer_id in sorted(self._conns):
            conn = self._conns[peer_id]
            if peer_id == dst or peer_id not in reachable:
                continue
            if conn.version > session.conns_known.get(peer_id):
                rows[peer_id] = (conn.version, conn.peers)
        if not infos and not rows and not force:
            return None
        self._next_token += 1
        session.in_flight = _InFlight(
            self._next_token, sent_infos, {peer_id: version for peer_id, (version, _) in rows.items()}
        )
        session.last_activity = now
        req = SyncRouteInfoRequest(
            my_peer_id=me,
            my_session_id=session.my_session_id,
            is_initiator=self.is_initiator(dst),
            peer_infos=infos or None,
            conn_bitmap=conn_bitmap(rows) if rows else None,
        )
        return OutgoingSync(dst, self._next_token, req.encode())

    def handle_sync_response(self, peer_id: int, token: int, data: bytes, now: float) -> None:
        """The neighbour answered request `token`; `data` is its SyncRouteInfoResponse."""
        taken = self._take_in_flight(peer_id, token)
        if taken is None:
            return
        flight, session = taken
        try:
            resp = SyncRouteInfoResponse.decode(data)
        except WireError:
            self._fail(session, now)
            return
        if resp.error is not None:
            if resp.error == SyncRouteInfoError.DUPLICATE_PEER_ID:
                self._events.append(
                    ConflictDetected(
                        f"peer {peer_id} refused route sync: it says peer id {self.my_peer_id} "
                        "is used by another node too"
                    )
                )
            self._fail(session, now)
            return
        session.learn_session_id(resp.session_id)
        for entry_id, version in flight.infos.items():
            session.infos_known.note(entry_id, version, now)
        for entry_id, version in flight.conns.items():
            session.conns_known.note(entry_id, version, now)
        session.last_success = now
        session.last_activity = now
        session.backoff = 0.0
        session.retry_at = 0.0

    def handle_sync_failure(self, peer_id: int, token: int, now: float) -> None:
        """Request `token` failed (timeout, RPC error, no route): retry with back-off."""
        taken = self._take_in_flight(peer_id, token)
        if taken is not None:
            self._fail(taken[1], now)

    def _take_in_flight(self, peer_id: int, token: int) -> tuple[_InFlight, _Session] | None:
        session = self._sessions.get(peer_id)
        if session is None or session.in_flight is None or session.in_flight.token != token:
            return None
        flight = session.in_flight
        session.in_flight = None
        return flight, session

    def _fail(self, session: _Session, now: float) -> None:
        timers = self.timers
        session.backoff = min(timers.retry_max_s, max(timers.retry_min_s, session.backoff * 2))
        session.retry_at = now + session.backoff

    def next_retry(self, now: float) -> float | None:
        """The earliest future time a backed-off session may send again."""
        times = [
            s.retry_at
            for p, s in self._sessions.items()
            if p in self._neighbours and s.in_flight is None and s.retry_at > now
        ]
        return min(times, default=None)

    # ---- housekeeping ---------------------------------------------------------------------------

    def sweep(self, now: float) -> None:
        """Drop stale entries, stale version memories and idle sessions of non-neighbours."""
        timers = self.timers
        self._refresh_if_due(now)
        gone = [
            peer_id
            for peer_id, stored in self._infos.items()
            if now - stored.last_seen >= timers.info_ttl_s
            or now - self._unreachable_since.get(peer_id, now) >= timers.unreachable_ttl_s
        ]
        for peer_id in gone:
            del self._infos[peer_id]
            self._conns.pop(peer_id, None)
            self._unreachable_since.pop(peer_id, None)
        for peer_id in [
            p
            for p, c in self._conns.items()
            if p not in self._infos and now - c.last_seen >= timers.unreachable_ttl_s
        ]:
            del self._conns[peer_id]
        for peer_id, session in list(self._sessions.items()):
            if peer_id not in self._neighbours and now - session.last_activity >= timers.known_version_ttl_s:
                del self._sessions[peer_id]
                continue
            session.infos_known.forget_idle(now, timers.known_version_ttl_s)
            session.conns_known.forget_idle(now, timers.known_version_ttl_s)
        if gone:
            self._recompute(now)

    def pop_events(self) -> list[RouteEvent]:
        events, self._events = self._events, []
        return events

    # ---- the table ------------------------------------------------------------------------------

    @property
    def table(self) -> RouteTable:
        return self._table

    def next_hop(self, peer_id: int) -> int | None:
        return self._table.next_hop(peer_id)

    def peer_for_ipv4(self, addr: IPv4Address) -> int | None:
        return self._table.peer_for_ipv4(addr)

    def routes(self) -> list[RouteEntry]:
        return self._table.routes()

    def reachable_peers(self) -> set[int]:
        return self._table.reachable_peers()

    def peer_map(self) -> dict[int, frozenset[int]]:
        """Each node's direct peers as its latest conn info says (ours: our neighbours)."""
        known = {p: c.peers for p, c in self._conns.items()}
        known[self.my_peer_id] = frozenset(self._neighbours)
        return known

    def peer_info(self, peer_id: int) -> RoutePeerInfo | None:
        if peer_id == self.my_peer_id:
            return self._my_msg
        stored = self._infos.get(peer_id)
        return None if stored is None else stored.info

    def _recompute(self, now: float) -> None:
        table = RouteTable(
            self.my_peer_id,
            self._my.ipv4,
            self._neighbours,
            {p: s.info for p, s in self._infos.items()},
            {p: c.peers for p, c in self._conns.items()},
        )
        reachable = table.reachable_peers()
        returned = reachable - self._table.reachable_peers()
        self._table = table
        if returned:
            # A neighbour drops entries that were unreachable for a while without telling us; whatever
            # it was believed to hold about a peer that is back may be gone, so send it again.
            for session in self._sessions.values():
                session.infos_known.forget(returned)
                session.conns_known.forget(returned)
        for peer_id in self._infos:
            if peer_id in reachable:
                self._unreachable_since.pop(peer_id, None)
            else:
                self._unreachable_since.setdefault(peer_id, now)
        signature = table.signature()
        if signature != self._signature:
            self._signature = signature
            self._events.append(RoutesChanged())
        self._report_ip_conflicts(table)

    def _report_ip_conflicts(self, table: RouteTable) -> None:
        current = set(table.duplicate_ipv4().items())
        for addr, peers in sorted(current - self._reported_ip_conflicts):
            claimants = ", ".join(self._describe_node(p) for p in peers)
            self._events.append(
                ConflictDetected(f"virtual IPv4 {addr} is claimed by more than one node: {claimants}")
            )
        self._reported_ip_conflicts = current

    def _describe_node(self, peer_id: int) -> str:
        if peer_id == self.my_peer_id:
            return f"peer {peer_id} (this node, hostname {self._my.hostname!r})"
        info = self.peer_info(peer_id)
        hostname = info.hostname if info is not None else None
        return f"peer {peer_id} (hostname {hostname!r})"


def _conn_rows(req: SyncRouteInfoRequest) -> Iterable[tuple[int, int, set[int]]]:
    """(peer id, conn version, directly connected peers) from either conn-info form."""
    if req.conn_bitmap is not None:
        neighbours: dict[int, set[int]] = {}
        for src, dst in req.conn_bitmap.edges():
            neighbours.setdefault(src, set()).add(dst)
        seen: set[int] = set()
        for pv in req.conn_bitmap.peer_ids:
            if pv.peer_id not in seen:
                seen.add(pv.peer_id)
                yield pv.peer_id, pv.version, neighbours.get(pv.peer_id, set())
    elif req.conn_peer_list is not None:
        for pv, connected in req.conn_peer_list.items:
            yield pv.peer_id, pv.version, set(connected)


def conn_bitmap(rows: dict[int, tuple[int, frozenset[int]]]) -> RouteConnBitmap:
    """A RouteConnBitmap carrying `rows` (peer -> (conn version, its direct peers)).

    Peers that only appear as someone's neighbour are listed with version 0 and an empty row, which
    receivers ignore; the bitmap is always ceil(N²/8) bytes.
    """
    listed = sorted(rows)
    extra = sorted({p for _, peers in rows.values() for p in peers} - rows.keys())
    ids = [(p, rows[p][0]) for p in listed] + [(p, 0) for p in extra]
    edges = [(src, dst) for src in listed for dst in rows[src][1]]
    return RouteConnBitmap.from_edges(ids, edges)
