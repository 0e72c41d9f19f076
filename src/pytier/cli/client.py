"""pytier-cli: ask a running pytier-core for its peers, routes, node facts, proxy entries and counters,
and change its connectors and log level while it runs."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from pytier.cli import service
from pytier.cli.table import fit_table, output_width, render_table
from pytier.cli.views import (
    Table,
    ViewError,
    connector_table,
    connector_text,
    logger_text,
    node_table,
    peer_center_table,
    peer_table,
    proxy_table,
    route_table,
    stats_table,
)
from pytier.config import DEFAULT_RPC_PORTAL, HelpFormatter, split_host_port, version
from pytier.logs import LEVELS, level_name
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


def _prometheus_text(result: Any) -> str:
    if not isinstance(result, str):
        raise ViewError("expected Prometheus text")
    return result.rstrip("\n")


def _level(text: str) -> str:
    try:
        return level_name(text)
    except ValueError:
        return text  # argparse's choices check names the choices


@dataclass(frozen=True)
class Arg:
    """A positional argument of a command."""

    name: str
    help: str
    choices: tuple[str, ...] | None = None
    type: Callable[[str], str] = str

    @property
    def usage(self) -> str:
        return self.name.upper()


@dataclass(frozen=True)
class Command:
    """A command that asks pytier-core one management method and prints the answer."""

    help: str
    method: str
    view: Callable[[Any], Table] | None = None  # the answer as a table
    text: Callable[[Any], str] | None = None  # or as lines of text (-o json prints the answer instead)
    raw: bool = False  # print `text` even with -o json
    args: tuple[Arg, ...] = ()

    def params(self, ns: argparse.Namespace) -> dict[str, Any]:
        return {a.name: getattr(ns, a.name) for a in self.args}


_URL = Arg("url", "peer URL, e.g. tcp://198.18.0.2:11010 or udp://198.18.0.2:11010")
_CONNECTORS = Command("show the peer URLs this node keeps connected, and their state", "connector_list",
                      connector_table)
_LOG_LEVELS = Command("show the log levels of stderr and of the log file", "logger_get", text=logger_text)

# Every command, by its words. A command whose words begin longer ones ("connector" and "connector add")
# is what runs when no further word is given. Another command is one more entry here.
COMMANDS: dict[tuple[str, ...], Command] = {
    ("peer",): Command("show the directly connected peers", "peer", peer_table),
    ("route",): Command("show the route to every node of the network", "route", route_table),
    ("node",): Command("show this node", "node", node_table),
    ("peer-center",): Command("show every node's direct peers, as route sync reports them", "peer_center",
                              peer_center_table),
    ("connector",): Command("list, add or remove the peers this node connects to (alone: list)",
                            "connector_list", connector_table),
    ("connector", "list"): _CONNECTORS,
    ("connector", "add"): Command("connect to a peer, and reconnect whenever the link ends", "connector_add",
                                  text=connector_text("added"), args=(_URL,)),
    ("connector", "remove"): Command("stop connecting to a peer and close the link to it", "connector_remove",
                                     text=connector_text("removed"), args=(_URL,)),
    ("proxy",): Command("show tcp/kcp/quic proxy connections", "proxy", proxy_table),
    ("stats",): Command("show traffic counters", "stats", stats_table),
    ("stats", "prometheus"): Command("the node's metrics in Prometheus' text format (as --metrics-listen)",
                                     "metrics", text=_prometheus_text, raw=True),
    ("logger",): Command("show or set the log levels (alone: get)", "logger_get", text=logger_text),
    ("logger", "get"): _LOG_LEVELS,
    ("logger", "set"): Command("set the level of stderr and the log file (until a restart)", "logger_set",
                               text=logger_text,
                               args=(Arg("level", ", ".join(LEVELS), tuple(LEVELS), _level),)),
}


@dataclass(frozen=True)
class LocalCommand:
    """A command that works on this host instead of asking pytier-core."""

    usage: str
    help: str
    add_parser: Callable[[Any, type[argparse.HelpFormatter]], None]
    run: Callable[[argparse.Namespace, str], int]


LOCAL_COMMANDS: dict[str, LocalCommand] = {
    "service": LocalCommand("service install|uninstall|status",
                            "install, remove or show the systemd unit that runs pytier-core",
                            service.add_parser, service.run),
}


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
    parser.add_argument("--no-trunc", action="store_true", default=d(False),
                        help="print whole tables even when they are wider than the terminal")
    parser.add_argument("--timeout", type=_timeout, default=d(DEFAULT_TIMEOUT_S), metavar="SECONDS",
                        help=f"give up after this many seconds (default: {DEFAULT_TIMEOUT_S:g})")


def _usage(words: tuple[str, ...], command: Command) -> str:
    return " ".join([*words, *(a.usage for a in command.args)])


def _epilog() -> str:
    lines = [(_usage(words, c), c.help) for words, c in COMMANDS.items() if len(words) > 1 or c.args]
    lines += [(c.usage, c.help) for c in LOCAL_COMMANDS.values()]
    width = max(len(u) for u, _ in lines)
    return "actions:\n" + "\n".join(f"  {u:<{width}}  {h}" for u, h in lines) + (
        "\n\nTables narrower than the terminal (or than COLUMNS, as `watch` sets it) drop their least "
        "useful\ncolumns and cut long cells with …; --no-trunc prints them whole.")


def _sub(commands: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    description = help_text[0].upper() + help_text[1:] + "."
    sub: argparse.ArgumentParser = commands.add_parser(name, help=help_text, description=description,
                                                       allow_abbrev=False, formatter_class=HelpFormatter)
    _add_common(sub, with_defaults=False)
    return sub


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Show and change the state of a running pytier-core.",
                     epilog=_epilog(), allow_abbrev=False, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"{PROG} {version()}",
                        help="print the version and exit")
    _add_common(parser, with_defaults=True)
    commands = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND", required=True)
    groups: dict[str, Any] = {}
    for words, command in COMMANDS.items():
        if len(words) == 1:
            sub = _sub(commands, words[0], command.help)
            sub.set_defaults(words=words)
        else:
            group = groups.get(words[0])
            if group is None:
                group = groups[words[0]] = commands.choices[words[0]].add_subparsers(
                    title="actions", dest="action", metavar="ACTION")
            sub = _sub(group, words[1], command.help)
            sub.set_defaults(words=words)
        for arg in command.args:
            sub.add_argument(arg.name, metavar=arg.usage, choices=arg.choices, help=arg.help, type=arg.type)
    for local in LOCAL_COMMANDS.values():
        local.add_parser(commands, HelpFormatter)
    return parser


def render(words: tuple[str, ...], result: Any, output: str, width: int | None = None) -> str:
    """The text pytier-cli prints for `result` of the command `words`, its tables narrowed to `width`
    terminal columns (None: whole). Raises ViewError for a malformed result."""
    command = COMMANDS[words]
    if command.text is not None and (command.raw or output != "json"):
        return command.text(result)
    if output == "json" or command.view is None:
        return json.dumps(result, indent=2, ensure_ascii=False)
    table = command.view(result)
    return render_table(*fit_table(table.headers, table.rows, width, table.optional))


def _width(no_trunc: bool) -> int | None:
    if no_trunc:
        return None
    terminal = sys.stdout.isatty()
    return output_width(os.environ, terminal, shutil.get_terminal_size().columns if terminal else None)


def _run(args: argparse.Namespace) -> int:
    local = LOCAL_COMMANDS.get(args.command)
    if local is not None:
        return local.run(args, PROG)
    words: tuple[str, ...] = args.words
    command = COMMANDS[words]
    host, port = args.rpc_portal
    try:
        result = asyncio.run(call(host, port, command.method, command.params(args), timeout=args.timeout))
    except MgmtError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    try:
        text = render(words, result, args.output, _width(args.no_trunc))
    except ViewError as e:
        what = " ".join(words)
        print(f"{PROG}: error: unexpected reply from pytier-core to {what!r}: {e}", file=sys.stderr)
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
