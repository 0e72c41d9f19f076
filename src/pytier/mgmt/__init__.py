"""The local management API that pytier-cli talks to (newline-delimited JSON over TCP)."""

from pytier.mgmt.client import call
from pytier.mgmt.protocol import METHODS, MgmtError, RemoteError
from pytier.mgmt.server import Handler, MgmtServer

__all__ = ["METHODS", "Handler", "MgmtError", "MgmtServer", "RemoteError", "call"]
