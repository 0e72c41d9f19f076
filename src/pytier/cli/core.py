"""pytier-core: read the settings, set up logging, run the node until it ends or a signal stops it
(or, with --check-config, print the settings and stop there)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TextIO

from pytier.config import PROG, Config, effective_settings, load_invocation
from pytier.errors import UserError

log = logging.getLogger("pytier.core")

TRACE = 5  # below DEBUG, as EasyTier's "trace"
_LEVELS = {"error": logging.ERROR, "warn": logging.WARNING, "info": logging.INFO, "debug": logging.DEBUG,
           "trace": TRACE}
# Libraries whose debug lines would drown ours: they only show them at "trace".
_CHATTY_LIBRARIES = ("asyncio", "quic", "pyroute2")
_SIGNALS = (signal.SIGINT, signal.SIGTERM)

NodeMain = Callable[[Config], Awaitable[int | None]]


def setup_logging(level: str, stream: TextIO | None = None) -> None:
    """Log lines such as "2026-11-25 18:04:15 INFO pytier.peers: message" at `level` and above."""
    logging.addLevelName(TRACE, "TRACE")
    logging.addLevelName(logging.WARNING, "WARN")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS[level])
    library_level = logging.NOTSET if level == "trace" else max(logging.INFO, root.level)
    for name in _CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(library_level)
    # pyroute2 sets levels on its own child loggers, so the levels above are not enough.
    prefixes = tuple(f"{name}." for name in _CHATTY_LIBRARIES)

    def quiet_libraries(record: logging.LogRecord) -> bool:
        return record.levelno >= library_level or not record.name.startswith(prefixes)

    handler.addFilter(quiet_libraries)


def _new_runner() -> asyncio.Runner:
    try:
        import uvloop
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


async def _supervise(config: Config, node_main: NodeMain) -> int:
    """Run the node; the first SIGINT/SIGTERM cancels it (its finally blocks clean up), a second one
    ends the process at once, for a cleanup that hangs."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(node_main(config))
    stopping: list[str] = []

    def on_signal(sig: signal.Signals) -> None:
        if stopping:
            log.warning("%s again: exiting without finishing the cleanup", sig.name)
            logging.shutdown()
            os._exit(128 + sig)
        stopping.append(sig.name)
        log.info("%s received, shutting down", sig.name)
        task.cancel()

    for sig in _SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        code = await task
    except asyncio.CancelledError:
        if not stopping:
            raise
        code = 0
    finally:
        for sig in _SIGNALS:
            loop.remove_signal_handler(sig)
    return 0 if code is None else int(code)


def run(config: Config, node_main: NodeMain) -> int:
    """Run `node_main(config)` on a fresh event loop (uvloop when installed) and return the exit status.

    A UserError becomes one line on stderr and status 1.
    """
    try:
        with _new_runner() as runner:
            return runner.run(_supervise(config, node_main))
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before the signal handlers were in place
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    try:
        invocation = load_invocation(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:  # errors (already printed), --help, --version
        return e.code if isinstance(e.code, int) else 0
    if invocation.check_only:
        for warning in invocation.warnings:
            print(f"{PROG}: warning: {warning}", file=sys.stderr)
        print("\n".join(effective_settings(invocation)))
        return 0
    config = invocation.config
    setup_logging(config.console_log_level)
    for warning in invocation.warnings:
        log.warning("%s", warning)
    from pytier.node import run_node  # the composition root imports every layer; only the daemon needs it

    return run(config, run_node)


if __name__ == "__main__":
    sys.exit(main())
