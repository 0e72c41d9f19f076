"""Forwarding into the subnets a node proxies (--proxy-networks): IPv4 forwarding on, and a
masquerade so hosts on the LAN answer the node, which hands the answers back into the virtual
network. Everything set here is undone by `close()`, and the forwarding sysctl gets its old value.
"""

from __future__ import annotations

import logging
import subprocess
from ipaddress import IPv4Network
from pathlib import Path

log = logging.getLogger("pytier.tun")

IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


class ForwardingError(OSError):
    pass


class SubnetForwarding:
    def __init__(self, table: str, virtual: IPv4Network, subnets: list[IPv4Network]) -> None:
        self.table = table
        self.virtual = virtual
        self.subnets = subnets
        self._old_forward: str | None = None
        self._table_added = False

    def open(self) -> None:
        try:
            self._old_forward = IP_FORWARD.read_text().strip()
            if self._old_forward != "1":
                IP_FORWARD.write_text("1\n")
        except OSError as exc:
            raise ForwardingError(exc.errno, f"cannot enable IPv4 forwarding: {exc.strerror}") from exc
        rules = "\n".join(
            f"    ip saddr {self.virtual} ip daddr {net} masquerade" for net in self.subnets
        )
        script = (
            f"table ip {self.table} {{\n"
            "  chain postrouting {\n"
            "    type nat hook postrouting priority srcnat; policy accept;\n"
            f"{rules}\n"
            "  }\n"
            "}\n"
        )
        self._nft(["-f", "-"], script, "add the masquerade for the proxied subnets")
        self._table_added = True
        log.info("forwarding %s -> %s with masquerade (nft table ip %s)", self.virtual,
                 ", ".join(map(str, self.subnets)), self.table)

    def close(self) -> None:
        if self._table_added:
            try:
                self._nft(["delete", "table", "ip", self.table], None, "remove the masquerade")
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
