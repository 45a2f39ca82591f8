"""What each lever buys at CPU scale: the tutorial's network, and each lever alone, 3 seeds each.

  python benchmarks/levers.py [--levers baseline,crop,ce] [--seeds 0 1 2] [--epochs 4] [--train-size 0]
                              [--val-size 5000] [--test-size 0] [--threads 1] [--data-dir DIR]

The budget (BUDGET below, stated once): T 4, 16 channels, batch 128, SGD lr 0.1 momentum 0.9 (the
tutorial's optimizer), cosine over 4 epochs, on the 55,000 training images left after a 5,000-image
validation split (split_seed 0), tested on all 10,000 test images. The flags shrink it for a quick run.
Every run is csnn.train.fit with a TrainConfig (the one training loop). The figures are the last epoch's
(no selection): val_acc, test_acc and spikes_per_image (on the validation images), mean ± the standard
deviation over the seeds (n - 1): the spread over seeds is the noise floor below which two levers are
not different. A shared machine slows the runs, not the numbers (the CPU is exact).

A lever is data: the TrainConfig fields it changes (LEVERS). Keys that this checkout's TrainConfig does
not know (another branch's, before it is merged) are skipped with a line that says so.
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without an install too

import torch  # noqa: E402

from csnn import data as fmnist  # noqa: E402
from csnn.config import TrainConfig  # noqa: E402
from csnn.train import fit  # noqa: E402

BUDGET = dict(T=4, channels=16, batch_size=128, epochs=4, optimizer="sgd", lr=0.1, momentum=0.9,
              val_size=5000, train_size=0, test_size=0, device="cpu")
# One row per lever: what it changes of the tutorial's network (every other field as BUDGET).
LEVERS = {
    "baseline": {},
    "lif": {"neuron": "lif"},
    "plif": {"neuron": "plif"},
    "lif tau 16": {"neuron": "lif", "tau": 16.0},  # PLIF's paper: LIF tau 2 vs 16 on Fashion-MNIST
    "sigmoid": {"surrogate": "sigmoid"},  # another surrogate, at its own alpha
    "atan alpha 4": {"alpha": 4.0},  # the default surrogate at twice its alpha (2)
    "avg pooling": {"pooling": "avg"},
    "dropout 0.5": {"dropout": 0.5},
    "crop": {"augment": "crop"},
    "flip": {"augment": "flip"},
    "erase": {"augment": "erase"},
    "ce": {"loss": "ce"},
}
REPORTED = ("val_acc", "test_acc", "spikes_per_image")


def mean_std(values: list, form: str = ".4f") -> str:
    if len(values) < 2:
        return f"{values[0]:{form}}"
    return f"{statistics.mean(values):{form}} ± {statistics.stdev(values):{form}}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--levers", default=",".join(LEVERS), help=f"comma-separated, of: {', '.join(LEVERS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=BUDGET["epochs"])
    p.add_argument("--train-size", type=int, default=BUDGET["train_size"], help="stratified subset; 0: all")
    p.add_argument("--val-size", type=int, default=BUDGET["val_size"])
    p.add_argument("--test-size", type=int, default=BUDGET["test_size"], help="stratified subset; 0: all")
    p.add_argument("--threads", type=int, default=1, help="torch's CPU threads (default 1)")
    p.add_argument("--data-dir", default=None)
    args = p.parse_args(argv)
    levers = [s.strip() for s in args.levers.split(",") if s.strip()]
    unknown = [name for name in levers if name not in LEVERS]
    if unknown:
        p.error(f"--levers: unknown {', '.join(unknown)}; allowed: {', '.join(LEVERS)}")
    torch.set_num_threads(args.threads)
    budget = {**BUDGET, "epochs": args.epochs, "train_size": args.train_size, "val_size": args.val_size,
              "test_size": args.test_size}
    data = fmnist.load(args.data_dir)
    print(f"budget: {', '.join(f'{k} {v}' for k, v in budget.items())}; seeds {args.seeds}; {args.threads} torch "
          f"thread(s); {os.cpu_count()} CPUs; torch {torch.__version__}", flush=True)
    print("$ python benchmarks/levers.py " + " ".join(sys.argv[1:] if argv is None else argv), flush=True)

    rows = []
    for name in levers:
        runs, took = [], []
        for seed in args.seeds:
            try:
                cfg = TrainConfig.from_dict({**budget, **LEVERS[name], "seed": seed})
            except ValueError as e:  # another branch's key, not merged into this checkout yet
                print(f"skipped lever {name!r} ({LEVERS[name]}): {e}", flush=True)
                break
            t0 = time.perf_counter()
            last = fit(cfg, data)[-1]
            took.append(time.perf_counter() - t0)
            runs.append(last)
            print(f"  {name} seed {seed}: " + ", ".join(f"{k} {last[k]:.4f}" for k in REPORTED)
                  + f" ({took[-1]:.0f} s)", flush=True)
        if runs:
            rows.append([name, ", ".join(f"{k} {v}" for k, v in LEVERS[name].items()) or "(the tutorial's)",
                         *(mean_std([r[k] for r in runs], ",.0f" if k == "spikes_per_image" else ".4f")
                           for k in REPORTED), f"{statistics.mean(took):.0f}"])

    head = ["lever", "changes", "val_acc", "test_acc", "spikes / image", "s / run"]
    print()
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print(f"\n{len(args.seeds)} seeds each; last epoch; load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
