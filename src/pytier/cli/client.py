"""pytier-cli: ask a running pytier-core for its peers, routes, node facts, proxy entries, counters."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from pytier.cli import service
from pytier.cli.table import render_table
from pytier.cli.views import VIEWS, ViewError
from pytier.config import DEFAULT_RPC_PORTAL, HelpFormatter, split_host_port, version
from pytier.mgmt.client import call
from pytier.mgmt.protocol import DEFAULT_TIMEOUT_S, MgmtError, format_address

PROG = "pytier-cli"


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def parse_portal(text: str) -> tuple[str, int]:
    """HOST:PORT, [IPv6]:PORT, or a bare PORT on 127.0.0.1."""
    text = text.strip()
    try:
        if text.isdigit():
            host, port = DEFAULT_RPC_PORTAL[0], int(text)
        else:
            host, maybe_port = split_host_port(text)
            if maybe_port is None:
                raise ValueError(f"{text!r} has no port (expected e.g. 127.0.0.1:15888)")
            port = maybe_port
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not host or not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"invalid address {text!r} (expected e.g. 127.0.0.1:15888)")
    return host, port


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"invalid timeout {text!r}: expected seconds above 0")
    return value


def _add_common(parser: argparse.ArgumentParser, *, with_defaults: bool) -> None:
    # Subcommands repeat these with SUPPRESS so that "pytier-cli peer -o json" works as well as
    # "pytier-cli -o json peer" without the subcommand's default clobbering the main one's value.
    def d(value: Any) -> Any:
        return value if with_defaults else argparse.SUPPRESS

    parser.add_argument("-p", "--rpc-portal", type=parse_portal, default=d(DEFAULT_RPC_PORTAL),
                        metavar="HOST:PORT",
                        help=f"where pytier-core's management API listens (default: "
                        f"{format_address(*DEFAULT_RPC_PORTAL)})")
    parser.add_argument("-o", "--output", choices=("table", "json"), default=d("table"), metavar="FORMAT",
                        help="table or json (default: table)")
    parser.add_argument("--timeout", type=_timeout, default=d(DEFAULT_TIMEOUT_S), metavar="SECONDS",
                        help=f"give up after this many seconds (default: {DEFAULT_TIMEOUT_S:g})")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Show the state of a running pytier-core.", allow_abbrev=False,
                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"{PROG} {version()}",
                        help="print the version and exit")
    _add_common(parser, with_defaults=True)
    commands = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND", required=True)
    for name, (help_text, _) in VIEWS.items():
        description = help_text[0].upper() + help_text[1:] + "."
        sub = commands.add_parser(name, help=help_text, description=description, allow_abbrev=False,
                                  formatter_class=HelpFormatter)
        _add_common(sub, with_defaults=False)
        if name == "stats":
            sub.add_argument("format", nargs="?", choices=("prometheus",), metavar="prometheus",
                             help="print the node's metrics in Prometheus' text format, as --metrics-listen "
                             "serves them")
    service.add_parser(commands, HelpFormatter)
    return parser


def render(command: str, result: Any, output: str) -> str:
    """The text pytier-cli prints for `result` of `command`. Raises ViewError for a malformed result."""
    if output == "json":
        return json.dumps(result, indent=2, ensure_ascii=False)
    headers, rows = VIEWS[command][1](result)
    return render_table(headers, rows)


def _prometheus_text(result: Any) -> str:
    if not isinstance(result, str):
        raise ViewError("expected Prometheus text")
    return result.rstrip("\n")


def _run(args: argparse.Namespace) -> int:
    if args.command == "service":
        return service.run(args, PROG)
    prometheus = getattr(args, "format", None) == "prometheus"
    host, port = args.rpc_portal
    try:
        method = "metrics" if prometheus else args.command
        result = asyncio.run(call(host, port, method, timeout=args.timeout))
    except MgmtError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    try:
        text = _prometheus_text(result) if prometheus else render(args.command, result, args.output)
    except ViewError as e:
        print(f"{PROG}: error: unexpected reply from pytier-core to {args.command!r}: {e}", file=sys.stderr)
        return 1
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # The reader (say, `head`) went away: silence the interpreter's own flush at exit too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else 0
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())
