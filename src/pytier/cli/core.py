"""pytier-core: read the settings, set up logging, run the node until it ends or a signal stops it
(or, with --check-config, print the settings and stop there)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from pytier.config import PROG, Config, effective_settings, load_invocation
from pytier.errors import UserError
from pytier.logs import FileLog, setup_logging

__all__ = ["main", "run", "setup_logging"]

log = logging.getLogger("pytier.core")

_SIGNALS = (signal.SIGINT, signal.SIGTERM)

NodeMain = Callable[[Config], Awaitable[int | None]]


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
    file_log = FileLog(Path(config.file_log_dir) / config.file_log_name, config.file_log_size,
                       config.file_log_count)
    try:
        setup_logging(config.console_log_level, file_log=file_log, file_level=config.file_log_level)
    except OSError as e:
        print(f"{PROG}: error: cannot open the log file {file_log.path}: {e.strerror or e}", file=sys.stderr)
        return 1
    for warning in invocation.warnings:
        log.warning("%s", warning)
    from pytier.node import run_node  # the composition root imports every layer; only the daemon needs it

    return run(config, run_node)


if __name__ == "__main__":
    sys.exit(main())
