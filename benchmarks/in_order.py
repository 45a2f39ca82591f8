"""What search.in_order costs in wall time: a study's own trials (their number and training time,
from trials.csv) scheduled on its k slots twice, as Ray runs them without in_order (a trial starts
whenever a slot is free) and with it (trial n also waits until trials 1..n-k have ended), and the
ratio of the two search times printed.

  python benchmarks/in_order.py results/<name> [-k K]

It replays the recorded times in both orders, so it prices the waiting alone: with in_order,
successive halving may stop other trials than in the study recorded (that is what it changes).
"""
import argparse
import heapq
import sys
from pathlib import Path

import pandas as pd
import yaml


def makespan(times: list[float], k: int, in_order: bool) -> float:
    """When the last of `times` (in trial order) ends, on k slots."""
    ends, running = [], []  # ends[n]: when trial n ended; running: a heap of the running trials' ends
    clock = 0.0
    for n, t in enumerate(times):
        if in_order and n >= k:  # trials 0..n-k (0-based) must have ended: then a slot is free too
            clock = max(clock, max(ends[: n - k + 1]))
        while running and running[0] <= clock:
            heapq.heappop(running)
        if len(running) == k:  # all slots busy: the earliest running trial's end frees one
            clock = heapq.heappop(running)
        ends.append(clock + t)
        heapq.heappush(running, clock + t)
    return max(ends, default=0.0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("study", type=Path, help="a study folder (results/<name>) with trials.csv")
    p.add_argument("-k", type=int, default=None, help="trials at once (default: the study's max_concurrent)")
    args = p.parse_args(argv)
    trials = pd.read_csv(args.study / "trials.csv").sort_values("number")
    k = args.k or yaml.safe_load((args.study / "spec.yaml").read_text())["search"]["max_concurrent"]
    if not isinstance(k, int) or k < 1:
        sys.exit(f"{args.study}: give -k, the trials at once (spec.yaml's max_concurrent is {k!r})")
    times = trials["time_s"].fillna(0).tolist()
    free, ordered = makespan(times, k, False), makespan(times, k, True)
    print(f"{args.study}: {len(times)} trials, {k} at once; search time without in_order {free:.1f} s, "
          f"with it {ordered:.1f} s: ratio {ordered / free:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
