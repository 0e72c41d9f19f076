"""argparse glue shared by pytier's command lines."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def arg_type(convert: Callable[[str], T]) -> Callable[[str], T]:
    """Wrap `convert` so that argparse shows its ValueError's message rather than a bare "invalid
    value"."""

    def parse(text: str) -> T:
        try:
            return convert(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse
