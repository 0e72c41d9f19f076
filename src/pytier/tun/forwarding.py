"""Forwarding into the subnets a node proxies (--proxy-networks): IPv4 forwarding on, and a
masquerade so hosts on the LAN answer the node, which hands the answers back into the virtual
network. A subnet exported under a mapped prefix (A->B) gets a netmap on the TUN device: packets
from the virtual network to B.x go to A.x (conntrack turns the answers' source back into B.x), and
connections the LAN opens into the virtual network leave with source B.x, the prefix peers route
back here. Everything lives in one nft table, so `close()` removes it whole; the forwarding sysctl
gets its old value.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Sequence
from ipaddress import IPv4Network
from pathlib import Path

log = logging.getLogger("pytier.tun")

IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


class ForwardingError(OSError):
    pass


class SubnetForwarding:
    def __init__(self, table: str, dev: str, virtual: IPv4Network, subnets: Sequence[IPv4Network],
                 netmaps: Sequence[tuple[IPv4Network, IPv4Network]] = ()) -> None:
        """`subnets` are the real LAN prefixes; `netmaps` the (real, mapped) pairs among them."""
        self.table = table
        self.dev = dev
        self.virtual = virtual
        self.subnets = list(subnets)
        self.netmaps = list(netmaps)
        self._old_forward: str | None = None
        self._table_added = False

    def open(self) -> None:
        try:
            self._old_forward = IP_FORWARD.read_text().strip()
            if self._old_forward != "1":
                IP_FORWARD.write_text("1\n")
        except OSError as exc:
            raise ForwardingError(exc.errno, f"cannot enable IPv4 forwarding: {exc.strerror}") from exc
        self._nft(["-f", "-"], self.script(), "add the nft rules for the proxied subnets")
        self._table_added = True
        log.info("forwarding %s -> %s with masquerade (nft table ip %s)", self.virtual,
                 ", ".join(map(str, self.subnets)), self.table)
        for real, mapped in self.netmaps:
            log.info("subnet %s reached as %s through %s", real, mapped, self.dev)

    def script(self) -> str:
        """The nft table, as `nft -f` reads it."""
        dev = _nft_string(self.dev)
        postrouting = [f"ip saddr {self.virtual} ip daddr {net} masquerade" for net in self.subnets]
        postrouting += [f"oifname {dev} ip saddr {real} snat ip prefix to {mapped}"
                        for real, mapped in self.netmaps]
        chains = [("postrouting", "postrouting priority srcnat", postrouting)]
        if self.netmaps:
            prerouting = [f"iifname {dev} ip daddr {mapped} dnat ip prefix to {real}"
                          for real, mapped in self.netmaps]
            chains.insert(0, ("prerouting", "prerouting priority dstnat", prerouting))
        lines = [f"table ip {self.table} {{"]
        for name, hook, rules in chains:
            lines += [f"  chain {name} {{", f"    type nat hook {hook}; policy accept;"]
            lines += [f"    {rule}" for rule in rules]
            lines.append("  }")
        lines.append("}")
        return "\n".join(lines) + "\n"

    def close(self) -> None:
        if self._table_added:
            try:
                self._nft(["delete", "table", "ip", self.table], None, f"remove nft table ip {self.table}")
            except ForwardingError as exc:
                log.warning("%s", exc)
            self._table_added = False
        if self._old_forward is not None and self._old_forward != "1":
            try:
                IP_FORWARD.write_text(self._old_forward + "\n")
            except OSError as exc:
                log.warning("cannot restore net.ipv4.ip_forward=%s: %s", self._old_forward, exc)
        self._old_forward = None

    @staticmethod
    def _nft(args: list[str], stdin: str | None, what: str) -> None:
        try:
            proc = subprocess.run(["nft", *args], input=stdin, capture_output=True, text=True, timeout=10)
        except FileNotFoundError as exc:
            raise ForwardingError(2, f"cannot {what}: nft not found (install the nftables package)") from exc
        if proc.returncode != 0:
            raise ForwardingError(1, f"cannot {what}: nft: {proc.stderr.strip()}")


def _nft_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
