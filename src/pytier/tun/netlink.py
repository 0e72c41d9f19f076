"""Addresses, routes, MTU and link state of one interface, set over netlink (pyroute2), undone exactly."""

from __future__ import annotations

import errno
from ipaddress import IPv4Interface, IPv4Network

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from pytier.tun.device import TunError

__all__ = ["LinkConfig", "link_kind"]

# "Already there" and "already gone" answers: the wanted state holds, so they are not errors. ENODEV
# covers a device that vanished because its TUN fd was closed first, taking its routes with it.
_ALREADY_THERE = frozenset({errno.EEXIST})
_ALREADY_GONE = frozenset({errno.ESRCH, errno.ENOENT, errno.EADDRNOTAVAIL, errno.ENODEV})
_RT_SCOPE_NOWHERE = 255  # in a delete request: a route of any scope
# Packets the kernel queues toward pytier on the TUN device (the kernel's default is 500). Every packet
# of a kernel-mode proxied connection crosses TUN twice (the NAT hairpin): 5,000 connections opened
# at once overflowed 500 (a quarter of the packets dropped, SYNs and SYN|ACKs among them, whose
# retransmissions back off to the clients' connect limit: 965-1,469 of 5,000 never connected;
# bench/scale.py). 4096 let 4,970 of 5,000 complete and none time out; 16,384 made it far worse (the
# queue's delay drove the hairpin's TCP into timeouts: 247 complete). A full queue holds at most this
# many packets of kernel memory, none of pytier's.
TX_QUEUE_LEN = 4096


def link_kind(ifname: str) -> str | None:
    """The kind of interface `ifname` is ("tun", "veth", ...; "" when the kernel names none), or None
    if there is no such interface."""
    with IPRoute() as ipr:
        links = ipr.get_links(ifname=ifname) if ipr.link_lookup(ifname=ifname) else []
        if not links:
            return None
        info = links[0].get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
        return str(kind or "")


class LinkConfig:
    """Configure one interface and remember what this object added, so that `cleanup()` removes that only.

    An address or route that already existed before we asked is not ours and is left alone.
    """

    def __init__(self, ifname: str, *, netns: str | None = None) -> None:
        self.ifname = ifname
        # flags=0: never create the namespace as a side effect (pyroute2's default is O_CREAT).
        self._ipr = IPRoute(netns=netns, flags=0) if netns is not None else IPRoute()
        found = self._ipr.link_lookup(ifname=ifname)
        if not found:
            self._ipr.close()
            raise TunError(errno.ENODEV, f"no interface named {ifname!r}")
        self.index: int = found[0]
        self._addresses: list[IPv4Interface] = []
        self._routes: list[tuple[IPv4Network, int | None]] = []

    @property
    def addresses(self) -> tuple[IPv4Interface, ...]:
        return tuple(self._addresses)

    @property
    def routes(self) -> tuple[IPv4Network, ...]:
        return tuple(net for net, _ in self._routes)

    def set_up(self, mtu: int | None = None) -> None:
        """Set the MTU (if given) and the transmit queue length, and bring the link up."""
        kwargs: dict[str, object] = {"index": self.index, "state": "up", "txqlen": TX_QUEUE_LEN}
        if mtu is not None:
            kwargs["mtu"] = mtu
        try:
            self._ipr.link("set", **kwargs)
        except NetlinkError as exc:
            raise TunError(exc.code, f"cannot set {self.ifname!r} up (mtu={mtu}): {exc}") from exc

    def add_address(self, iface: IPv4Interface) -> bool:
        """Add `iface` (address and prefix). Return False if it was already there."""
        try:
            self._ipr.addr("add", index=self.index, address=str(iface.ip), prefixlen=iface.network.prefixlen)
        except NetlinkError as exc:
            if exc.code in _ALREADY_THERE:
                return False
            raise TunError(exc.code, f"cannot add address {iface} to {self.ifname!r}: {exc}") from exc
        self._addresses.append(iface)
        return True

    def remove_address(self, iface: IPv4Interface) -> bool:
        """Remove an address this object added. Return False if it was already gone."""
        if iface in self._addresses:
            self._addresses.remove(iface)
        try:
            self._ipr.addr("del", index=self.index, address=str(iface.ip), prefixlen=iface.network.prefixlen)
        except NetlinkError as exc:
            if exc.code in _ALREADY_GONE:
                return False
            raise TunError(exc.code, f"cannot remove address {iface} from {self.ifname!r}: {exc}") from exc
        return True

    def add_route(self, net: IPv4Network, *, metric: int | None = None) -> bool:
        """Route `net` into this interface. Return False if that route already existed."""
        try:
            self._ipr.route("add", **self._route_spec(net, metric))
        except NetlinkError as exc:
            if exc.code in _ALREADY_THERE:
                return False
            raise TunError(exc.code, f"cannot add route {net} via {self.ifname!r}: {exc}") from exc
        self._routes.append((net, metric))
        return True

    def remove_route(self, net: IPv4Network, *, metric: int | None = None) -> bool:
        """Remove a route into this interface. Return False if it was already gone."""
        if (net, metric) in self._routes:
            self._routes.remove((net, metric))
        try:
            # Any scope: pyroute2 would ask for "universe" only, and miss the same route added as
            # "link" (as `ip route add NET dev DEV` does).
            self._ipr.route("del", scope=_RT_SCOPE_NOWHERE, **self._route_spec(net, metric))
        except NetlinkError as exc:
            if exc.code in _ALREADY_GONE:
                return False
            raise TunError(exc.code, f"cannot remove route {net} via {self.ifname!r}: {exc}") from exc
        return True

    def _route_spec(self, net: IPv4Network, metric: int | None) -> dict[str, object]:
        spec: dict[str, object] = {"dst": str(net), "oif": self.index}
        if metric is not None:
            spec["priority"] = metric
        return spec

    def cleanup(self) -> None:
        """Remove every route, then every address, that this object added (newest first)."""
        for net, metric in reversed(list(self._routes)):
            self.remove_route(net, metric=metric)
        for iface in reversed(list(self._addresses)):
            self.remove_address(iface)

    def close(self) -> None:
        self._ipr.close()

    def __enter__(self) -> LinkConfig:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.cleanup()
        finally:
            self.close()
