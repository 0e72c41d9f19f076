"""TUN device and netlink configuration, in a namespace of their own: answer real pings through the fd."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest

from pytier.testbed.netns import Netns, Testbed
from pytier.testbed.ping import icmp_checksum
from pytier.tun.device import TunDevice, TunError
from pytier.tun.netlink import LinkConfig

TUN_ADDR = IPv4Interface("10.144.0.1/24")
ROUTED = IPv4Network("10.145.0.0/24")
FAR_HOST = IPv4Address("10.145.0.7")  # nobody has it: the kernel routes it into the TUN, we answer
MTU = 1400


def echo_reply(packet: bytes) -> bytes | None:
    """The echo reply a host at the request's destination would send, or None for anything else."""
    if len(packet) < 20 or packet[0] >> 4 != 4 or packet[9] != 1:
        return None
    ihl = (packet[0] & 0x0F) * 4
    if len(packet) < ihl + 8 or packet[ihl] != 8:
        return None
    ip = bytearray(packet[:ihl])
    ip[12:16], ip[16:20] = packet[16:20], packet[12:16]
    ip[8] = 64
    ip[10:12] = b"\0\0"
    ip[10:12] = icmp_checksum(ip).to_bytes(2, "big")
    icmp = bytearray(packet[ihl:])
    icmp[0] = 0
    icmp[2:4] = b"\0\0"
    icmp[2:4] = icmp_checksum(icmp).to_bytes(2, "big")
    return bytes(ip + icmp)


def routes(ns: Netns) -> list[str]:
    return [r["dst"] for r in json.loads(ns.run(["ip", "-j", "-4", "route", "show"]).stdout)]


def link_exists(ns: Netns, ifname: str) -> bool:
    return ns.run(["ip", "link", "show", "dev", ifname], check=False).returncode == 0


def start_ping(ns: Netns, count: int, interval: float) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "pytier.testbed.ping", "-c", str(count), "-i", str(interval), "-W", "2"]
    return ns.popen([*argv, str(FAR_HOST)], stdout=subprocess.PIPE, text=True)


@contextmanager
def configured_tun(testbed: Testbed) -> Iterator[tuple[Netns, TunDevice, LinkConfig]]:
    ns = testbed.netns("t")
    with ns.enter():
        tun = TunDevice.open(testbed.name("tun"))
        cfg = LinkConfig(tun.name)
    try:
        cfg.set_up(mtu=MTU)
        assert cfg.add_address(TUN_ADDR)
        assert cfg.add_route(ROUTED)
        yield ns, tun, cfg
    finally:
        cfg.cleanup()
        tun.close()
        cfg.close()


def test_open_configure_and_clean_up(testbed: Testbed) -> None:
    with configured_tun(testbed) as (ns, tun, cfg):
        assert tun.name == testbed.name("tun")
        shown = json.loads(ns.run(["ip", "-j", "addr", "show", "dev", tun.name]).stdout)[0]
        assert shown["mtu"] == MTU
        assert "UP" in shown["flags"]
        assert [(a["local"], a["prefixlen"]) for a in shown["addr_info"]] == [("10.144.0.1", 24)]
        assert str(ROUTED) in routes(ns)
        # Asking again for what is already there, or removing what is gone, is not an error.
        assert not cfg.add_route(ROUTED)
        assert not cfg.add_address(TUN_ADDR)
        assert cfg.routes == (ROUTED,)
        assert cfg.addresses == (TUN_ADDR,)
        assert tun.read() is None  # non-blocking: nothing waiting
        cfg.cleanup()
        assert cfg.routes == () and cfg.addresses == ()
        assert str(ROUTED) not in routes(ns)
        assert not cfg.remove_route(ROUTED)
        assert link_exists(ns, tun.name)
    assert not link_exists(ns, tun.name)


def test_device_vanishes_with_its_fd_and_late_cleanup_is_quiet(testbed: Testbed) -> None:
    ns = testbed.netns("t")
    with ns.enter():
        tun = TunDevice.open("pt%d")
    cfg = LinkConfig(tun.name, netns=ns.name)  # the netlink socket can also be made from outside
    with cfg:
        assert tun.name.startswith("pt") and tun.name != "pt%d"
        cfg.set_up()
        cfg.add_address(TUN_ADDR)
        cfg.add_route(ROUTED)
        tun.close()
        tun.close()
        assert tun.closed
        assert not link_exists(ns, tun.name)
        assert str(ROUTED) not in routes(ns)
        cfg.cleanup()  # the kernel already took the routes with the device: nothing raises


def test_synchronous_read_and_write_answer_ping(testbed: Testbed) -> None:
    with configured_tun(testbed) as (ns, tun, _):
        pinger = start_ping(ns, count=3, interval=0.2)
        answered = 0
        deadline = time.monotonic() + 10
        while pinger.poll() is None and time.monotonic() < deadline:
            ready, _, _ = select.select([tun.fd], [], [], 0.1)
            if not ready:
                continue
            buf = bytearray(65535)
            n = tun.read_into(buf)
            reply = echo_reply(bytes(buf[:n])) if n else None
            if reply is not None:
                request_src, request_dst = buf[12:16], buf[16:20]
                assert IPv4Address(bytes(request_src)) == TUN_ADDR.ip
                assert IPv4Address(bytes(request_dst)) == FAR_HOST
                assert tun.write(reply)
                answered += 1
        out, _ = pinger.communicate(timeout=10)
        assert pinger.returncode == 0, out
        assert "3 packets transmitted, 3 received" in out
        assert answered == 3


def test_attach_drains_batches_and_answers_ping(testbed: Testbed) -> None:
    with configured_tun(testbed) as (ns, tun, _):
        batches: list[int] = []
        requests: list[bytes] = []

        def on_packets(packets: list[bytes]) -> None:
            batches.append(len(packets))
            for packet in packets:
                reply = echo_reply(packet)
                if reply is not None:
                    requests.append(packet)
                    tun.write(reply)

        async def serve() -> int:
            tun.attach(asyncio.get_running_loop(), on_packets)
            try:
                pinger = start_ping(ns, count=20, interval=0.01)
                deadline = time.monotonic() + 15
                while pinger.poll() is None and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                out, _ = pinger.communicate(timeout=10)
                assert "20 packets transmitted, 20 received" in out, out
                return pinger.returncode
            finally:
                tun.detach()

        assert asyncio.run(serve()) == 0
        assert len(requests) == 20
        assert all(1 <= size <= 64 for size in batches)
        assert all(len(p) == 20 + 8 + 56 for p in requests)
        assert tun.write_drops == 0


def test_write_of_garbage_is_counted_not_raised(testbed: Testbed) -> None:
    with configured_tun(testbed) as (_, tun, _):
        assert tun.write(b"\x00" * 20) is False
        assert tun.write_drops == 1


def test_unprivileged_open_says_why() -> None:
    if os.geteuid() != 0:
        with pytest.raises(TunError) as info:
            TunDevice.open("ptnoperm")
        assert "permission denied" in str(info.value)
        return
    # As root, drop to nobody in a forked child, which reports the message through a pipe.
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                TunDevice.open("ptnoperm")
                message = "opened"
            except TunError as exc:
                message = f"{exc.errno} {exc}"
            os.write(write_end, message.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        message = reader.read().decode()
    os.waitpid(pid, 0)
    code, _, text = message.partition(" ")
    assert int(code) in (errno.EACCES, errno.EPERM), message
    assert text == (
        "cannot create TUN device 'ptnoperm': permission denied (run as root or with CAP_NET_ADMIN)"
    )


def test_bad_name_is_refused() -> None:
    with pytest.raises(TunError, match="invalid interface name"):
        TunDevice.open("x" * 16)
