"""pytier-core's log destinations: stderr and an optional size-rotated file, one line format for both,
and levels that the management API can change while the node runs."""

from __future__ import annotations

import errno
import logging
import logging.handlers
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

TRACE = 5  # below DEBUG, as EasyTier's "trace"
OFF = logging.CRITICAL + 10
LEVELS = {"off": OFF, "error": logging.ERROR, "warn": logging.WARNING, "info": logging.INFO,
          "debug": logging.DEBUG, "trace": TRACE}
_NAMES = {number: name for name, number in LEVELS.items()}
# Libraries whose debug lines would drown ours: a destination only shows them at "trace".
CHATTY_LIBRARIES = ("asyncio", "quic", "pyroute2")
_CHATTY_PREFIXES = tuple(f"{name}." for name in CHATTY_LIBRARIES)
LINE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


def level_name(text: str) -> str:
    """The canonical name of a level given by a user ("WARNING" -> "warn"); ValueError otherwise."""
    name = text.strip().lower()
    name = "warn" if name == "warning" else name
    if name not in LEVELS:
        raise ValueError(f"invalid log level {text!r} (choose from {', '.join(LEVELS)})")
    return name


@dataclass(frozen=True)
class FileLog:
    """Where the log file goes and when it rotates: at `max_bytes`, keeping `backups` older files
    (pytier.log.1 is the newest of them)."""

    path: Path
    max_bytes: int
    backups: int


class _QuietLibraries(logging.Filter):
    def __init__(self, handler: logging.Handler) -> None:
        super().__init__()
        self._handler = handler

    def filter(self, record: logging.LogRecord) -> bool:
        if self._handler.level <= TRACE or record.levelno >= logging.INFO:
            return True
        return not (record.name in CHATTY_LIBRARIES or record.name.startswith(_CHATTY_PREFIXES))


class Logs:
    """The destinations pytier-core logs to, and their levels."""

    def __init__(self, console: logging.Handler, file: logging.Handler | None,
                 file_log: FileLog | None) -> None:
        self._console = console
        self._file = file
        self.file_log = file_log

    def levels(self) -> dict[str, str | None]:
        return {
            "console": _NAMES[self._console.level],
            "file": _NAMES[self._file.level] if self._file is not None else "off",
            "file_path": str(self.file_log.path) if self.file_log is not None else None,
        }

    def set_level(self, level: str) -> dict[str, str | None]:
        """Set stderr and, when there is one, the log file to `level` (a name of LEVELS)."""
        number = LEVELS[level_name(level)]
        for handler in self._handlers():
            handler.setLevel(number)
        self._apply()
        return self.levels()

    def _handlers(self) -> list[logging.Handler]:
        return [self._console] + ([self._file] if self._file is not None else [])

    def _apply(self) -> None:
        """Let through the root logger what the most verbose destination shows, no more: a record
        nobody shows is not even made."""
        lowest = min(h.level for h in self._handlers())
        logging.getLogger().setLevel(lowest)
        library_level = logging.NOTSET if lowest <= TRACE else max(logging.INFO, lowest)
        for name in CHATTY_LIBRARIES:
            logging.getLogger(name).setLevel(library_level)


_active: Logs | None = None


def active() -> Logs | None:
    """The destinations set up by the last setup_logging, if any."""
    return _active


def setup_logging(level: str, stream: TextIO | None = None, *, file_log: FileLog | None = None,
                  file_level: str = "off") -> Logs:
    """Log lines such as "2026-11-25 18:04:15 INFO pytier.peers: message" to `stream` (stderr) at
    `level` and above, and, when `file_log` is given and `file_level` is not "off", the same lines to
    that file. Raises OSError when the file cannot be opened."""
    global _active
    logging.addLevelName(TRACE, "TRACE")
    logging.addLevelName(logging.WARNING, "WARN")
    formatter = logging.Formatter(LINE_FORMAT, DATE_FORMAT)
    console = logging.StreamHandler(stream or sys.stderr)
    console.setLevel(LEVELS[level_name(level)])
    file: logging.Handler | None = None
    if file_log is not None and level_name(file_level) != "off":
        try:
            file_log.path.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError:  # it exists as a file: say that, not "file exists"
            parent = str(file_log.path.parent)
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), parent) from None
        file = logging.handlers.RotatingFileHandler(file_log.path, maxBytes=file_log.max_bytes,
                                                    backupCount=file_log.backups, encoding="utf-8")
        file.setLevel(LEVELS[level_name(file_level)])
    else:
        file_log = None
    handlers = [console] + ([file] if file is not None else [])
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(_QuietLibraries(handler))
    logging.getLogger().handlers[:] = handlers
    if _active is not None and _active._file is not None:
        _active._file.close()
    _active = Logs(console, file, file_log)
    _active._apply()
    return _active
