"""Forward error correction between pytier nodes, sans-IO (see docs/fec.md).

The peer layer wraps payloads: `FecEncoder.push` turns a packet into frames to send (data at once,
parity when a block closes), `FecDecoder.receive` turns frames back into packets, exactly once
each, and `FecController.update` picks the shape (or none) from the measured loss. Frames travel
only between pytier nodes that advertised FEC, inside pytier's own peer packet type.
"""

from pytier.fec.controller import ControllerConfig, FecController, LossSample, choose, residual_loss
from pytier.fec.counters import DecoderCounters, EncoderCounters
from pytier.fec.decoder import FecDecoder
from pytier.fec.encoder import FecEncoder
from pytier.fec.framing import HEADER_LEN, FecFrameError, FecHeader, FrameKind, parse_frame
from pytier.fec.params import FecParams

__all__ = [
    "HEADER_LEN",
    "ControllerConfig",
    "DecoderCounters",
    "EncoderCounters",
    "FecController",
    "FecDecoder",
    "FecEncoder",
    "FecFrameError",
    "FecHeader",
    "FecParams",
    "FrameKind",
    "LossSample",
    "choose",
    "parse_frame",
    "residual_loss",
]
