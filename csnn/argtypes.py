"""argparse types shared by every command line, so a bad count is refused the same way everywhere."""
from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An integer >= 1: a count of 0 or below is never meant (and would otherwise mean 'all' or 'none')."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed; must be >= 1")
    return value
