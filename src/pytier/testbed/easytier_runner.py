"""Runs a real EasyTier core (PyPI easytier-pyo3) as a child process for interop tests and benchmarks.

The child is started inside a namespace with ``ip netns exec``; it reads one command per line on
stdin (routes, peers, node_info, quit) and answers each with one JSON line on stdout, so a test can
ask the real node what it learned without sharing its process.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from typing import Any

# Read-only queries a test may send; the last three are there to see what the real node thought.
QUERIES = frozenset({"routes", "peers", "node_info", "dump_route", "management_events", "latest_error"})


def easytier_toml(
    *,
    network_name: str,
    network_secret: str,
    ipv4: str | None,
    listeners: list[str],
    peers: list[str],
    hostname: str,
    dev_name: str = "et0",
    flags: dict[str, Any] | None = None,
    proxy_networks: list[str] | None = None,
    rpc_port: int = 0,
) -> str:
    """The easytier-core config file (TOML) for one node."""
    lines = [
        f'instance_name = "{hostname}"',
        f'hostname = "{hostname}"',
        "dhcp = false",
        f"listeners = {json.dumps(listeners)}",
        f'rpc_portal = "127.0.0.1:{rpc_port}"',
    ]
    if ipv4 is not None:
        lines.append(f'ipv4 = "{ipv4}"')
    lines += ["", "[network_identity]", f'network_name = "{network_name}"',
              f'network_secret = "{network_secret}"']
    for uri in peers:
        lines += ["", "[[peer]]", f'uri = "{uri}"']
    for cidr in proxy_networks or []:
        lines += ["", "[[proxy_network]]", f'cidr = "{cidr}"']
    all_flags: dict[str, Any] = {"dev_name": dev_name}
    all_flags.update(flags or {})
    lines += ["", "[flags]"]
    for key, value in all_flags.items():
        lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def main() -> int:
    import easytier_pyo3  # imported here: the package is a test dependency only

    with open(sys.argv[1]) as f:
        config = f.read()
    node = easytier_pyo3.Node(config)
    node.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(json.dumps({"ready": True, "peer_id": node.peer_id(), "version": easytier_pyo3.version()}),
          flush=True)

    def serve() -> None:
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "quit":
                break
            try:
                result: Any = getattr(node, cmd)() if cmd in QUERIES else None
                reply = {"ok": True, "result": result}
            except Exception as exc:
                reply = {"ok": False, "error": str(exc)}
            print(json.dumps(reply, default=str), flush=True)
        stop.set()

    threading.Thread(target=serve, daemon=True).start()
    stop.wait()
    node.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
