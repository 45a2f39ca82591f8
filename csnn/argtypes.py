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
