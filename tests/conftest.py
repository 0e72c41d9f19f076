"""Shared fixtures: the namespace testbed, and skipping of namespace tests when not root."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from itertools import count

import pytest

from pytier.testbed.netns import Testbed, delete_namespaces, list_namespaces, run_prefix

NEEDED_TOOLS = ("ip", "ethtool", "nft", "ss", "sysctl")


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, TUN devices, raw sockets)"
    missing = [tool for tool in NEEDED_TOOLS if shutil.which(tool) is None]
    if missing:
        return f"needs {', '.join(missing)} on PATH"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that uses the testbed as `netns`, and skip those when namespaces are unavailable."""
    reason = _netns_unavailable()
    for item in items:
        if "testbed" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.netns)
        if reason is not None and item.get_closest_marker("netns") is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def netns_prefixes() -> Iterator[Iterator[str]]:
    """Per-test prefixes under one per-run prefix; at session end, every namespace left under it goes."""
    base = run_prefix()
    yield (f"{base}{n:02x}" for n in count())
    delete_namespaces(base)


@pytest.fixture
def testbed(netns_prefixes: Iterator[str]) -> Iterator[Testbed]:
    reason = _netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    tb = Testbed(prefix=next(netns_prefixes))
    with tb:
        yield tb
    left = [name for name in list_namespaces() if name.startswith(tb.prefix)]
    assert not left, f"namespaces left behind: {left}"
