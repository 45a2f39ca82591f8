"""The racer of tests/test_lifecycle.py's lock race: a real process that takes the study lock with the
project's own function at the same moment as the others, many rounds over, and says what it got."""
import os


def racer(folder: str, rounds: int, barrier, results) -> None:
    from study import lifecycle
    from study.storage import Location

    d = Location.parse(folder)
    for r in range(rounds):
        barrier.wait()  # the folder is ready (no lock, or a stale one): all take it at once
        mine = None
        try:
            mine = lifecycle.take_lock(d, f"python -m study.run racer {os.getpid()}")
            got = "held"
        except lifecycle.Locked:
            got = "refused"
        except Exception as e:  # noqa: BLE001 (a traceback is a failure the test names)
            got = f"{type(e).__name__}: {e}"
        results.put((r, os.getpid(), got))
        barrier.wait()  # every racer has tried while the holder still holds it
        if mine:
            lifecycle.release_lock(d, mine)
        barrier.wait()
