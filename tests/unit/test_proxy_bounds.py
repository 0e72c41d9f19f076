"""Bounds of the proxy's own state: rows of closed connections go even when nobody lists them."""

from __future__ import annotations

from pytier.proxy.entries import CLOSED_ROW_LINGER_S, PURGE_MIN, EntryTable, ProxyEntry, TransportType


def test_closed_rows_go_without_anyone_listing_them() -> None:
    now = [0.0]
    table = EntryTable(clock=lambda: now[0])
    retired: list[dict[str, object]] = []
    table.on_retire = retired.append
    for i in range(20 * PURGE_MIN):
        key = table.add(ProxyEntry(f"10.0.0.2:{i}", "10.0.0.1:80", TransportType.Kcp))
        table.close(key)
        now[0] += CLOSED_ROW_LINGER_S / 100
    # Only rows closed within the linger (plus at most one purge interval's worth) are still held.
    assert len(table) <= 2 * max(PURGE_MIN, 100)
    assert len(retired) + len(table) == 20 * PURGE_MIN


def test_open_rows_are_never_purged() -> None:
    now = [0.0]
    table = EntryTable(clock=lambda: now[0])
    keys = [table.add(ProxyEntry(f"10.0.0.2:{i}", "10.0.0.1:80", TransportType.Quic))
            for i in range(3 * PURGE_MIN)]
    now[0] += 10 * CLOSED_ROW_LINGER_S
    table.add(ProxyEntry("10.0.0.2:1", "10.0.0.1:80", TransportType.Quic))
    assert table.live() == len(keys) + 1
    assert len(table.rows()) == len(keys) + 1
