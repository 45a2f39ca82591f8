"""What every command line shares: argparse types, so a bad count is refused the same way
everywhere, and Ctrl-C as one line and exit 130 rather than a traceback."""
from __future__ import annotations

import argparse
import os
import re
import signal
import sys


def positive_int(text: str) -> int:
    """An integer >= 1: a count of 0 or below is never meant (and would otherwise mean 'all' or 'none')."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed; must be >= 1")
    return value


def quiet_start(what: str) -> None:
    """Ctrl-C while a command imports its libraries (seconds of torch, Ray, matplotlib): one line and
    exit 130. Called first thing under `if __name__ == "__main__":`, before those imports."""
    signal.signal(signal.SIGINT, lambda *_: (print(f"{what}: interrupted while starting; nothing was written",
                                                   file=sys.stderr), os._exit(130)))


def interruptible(main, what: str, left: str) -> int:
    """main() with Ctrl-C as one line saying what was `left`, and exit 130."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return main()
    except KeyboardInterrupt:
        print(f"{what}: interrupted; {left}", file=sys.stderr)
        return 130


def leave(code: int):
    """sys.exit(code), how every command ends (under `if __name__ == "__main__":`): its work is done
    or said undone, so a Ctrl-C from here on changes nothing, and the exit code is `code`.
    CPython (3.11 here; later ones have the same code) marks a KeyboardInterrupt that ends a string
    exec() or eval() as unhandled even where a caller catches it (run_eval_code_obj), and under
    `python -m` then kills itself with SIGINT as it exits (rc -2) whatever sys.exit said: a Ctrl-C
    that lands in torch's generated code (compile guards, fx) did just that. Every string eval first
    clears the mark: an empty one does."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    exec("")  # noqa: S102 -- clears the mark (see above); nothing else runs
    sys.exit(code)


# The flags both command-line families have: the tutorial's (csnn.train: -data-dir) and the
# study's (study.*, csnn.bench: --data-dir). Shared code names them one way; `spelled` turns a
# message into the spelling of the command that prints it.
SHARED_FLAGS = ("data-dir", "download", "device", "deterministic")


def spelled(message: str, dashes: str) -> str:
    """`message` with every shared flag written with `dashes` ('-' or '--')."""
    return re.sub(r"(?<![\w-])--?(" + "|".join(SHARED_FLAGS) + r")\b", lambda m: dashes + m.group(1), message)


def worded(message: str, words: dict) -> str:
    """`message` with each of `words`' keys (TrainConfig's fields, the data's sizes, as the shared code
    names them) written as the command that prints it names them (its flags); whole words only."""
    keys = "|".join(map(re.escape, sorted(words, key=len, reverse=True)))
    return re.sub(rf"(?<![\w.-])(?:{keys})(?![\w-])", lambda m: words[m.group(0)], message)


# TrainConfig's network keys, augment and loss as flags (csnn.train's -neuron, csnn.bench's --neuron): the
# name (TrainConfig's field with - for _), its type (bool: a switch), the help. Not given: TrainConfig's
# default, the tutorial's.
NETWORK_FLAGS = (
    ("neuron", str, "if, lif or plif (default if, the tutorial's)"),
    ("tau", float, "lif's time constant, plif's initial one (> 1; default 2.0); not with neuron if"),
    ("v-threshold", float, "the spiking threshold (default 1.0)"),
    ("detach-reset", bool, "no gradient through the reset"),
    ("surrogate", str, "atan (default) or another surrogate SpikingJelly fuses (docs/search-spaces.md)"),
    ("alpha", float, "the surrogate's scale (default: its own, 2.0 for atan)"),
    ("pooling", str, "max (default) or avg"),
    ("dropout", float, "before each linear layer, one mask per image for all time steps (default 0)"),
    ("augment", str, "training images: none (default), or crop, flip, erase joined by + (e.g. crop+flip)"),
    ("loss", str, "mse (default, the tutorial's) or ce"),
)


def add_network_flags(parser: argparse.ArgumentParser, dashes: str, skip: tuple = ()) -> None:
    """NETWORK_FLAGS (but `skip`) as `dashes`-flags of a group of their own."""
    group = parser.add_argument_group("the network, augmentation and loss (TrainConfig's keys; "
                                      "docs/search-spaces.md; default: the tutorial's)")
    for name, kind, text in NETWORK_FLAGS:
        if name not in skip:
            dest = name.replace("-", "_")
            if kind is bool:
                group.add_argument(dashes + name, dest=dest, action="store_true", default=None, help=text)
            else:
                group.add_argument(dashes + name, dest=dest, type=kind, default=None, help=text)


def network_values(args: argparse.Namespace, dashes: str) -> dict:
    """The NETWORK_FLAGS given, as TrainConfig's fields. A tau for a neuron without one (IF) is refused
    rather than ignored, as a study's spec refuses it."""
    from csnn.config import NEURONS

    given = {n.replace("-", "_"): getattr(args, n.replace("-", "_"), None) for n, _, _ in NETWORK_FLAGS}
    given = {k: v for k, v in given.items() if v is not None}
    neuron = given.get("neuron", "if")
    if "tau" in given and neuron in NEURONS and not NEURONS[neuron]["tau_arg"]:
        raise ValueError(f"{dashes}tau {given['tau']}: the {neuron} neuron has no time constant and would ignore it; "
                         f"add {dashes}neuron lif or {dashes}neuron plif, or leave {dashes}tau out")
    return given


def network_words(dashes: str) -> dict:
    """TrainConfig's names of the NETWORK_FLAGS, in its errors, as `worded` turns them into the flags."""
    words = {f"TrainConfig.{n.replace('-', '_')}": dashes + n for n, _, _ in NETWORK_FLAGS}
    words.update({n.replace("-", "_"): dashes + n for n, _, _ in NETWORK_FLAGS if "-" in n})
    return words
