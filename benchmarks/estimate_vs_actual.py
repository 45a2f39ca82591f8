"""How good study.estimate's prediction is: run one study for real and set what it predicted at its
start (estimate.yaml) against what each phase took (timing.yaml).

  python benchmarks/estimate_vs_actual.py search_spaces/quick.yaml [--data-dir DIR] [study.run's flags...]

The study runs in a temporary folder (--keep DIR to keep it) with `python -m study.run`, so it costs
what the study costs (quick.yaml: minutes on 2 cores). Prints the per-phase table of the report and
the wall time's actual / predicted ratio; exits 1 when that ratio is outside the model's goal of
+-25 %, 2 when the study itself failed. A machine that others share while it runs moves the figure:
say so with it.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without an install too

from study import estimate  # noqa: E402
from study.spec import load  # noqa: E402
from study.storage import Location  # noqa: E402

GOAL = 0.25  # actual wall time within 25 % of the prediction


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("space", help="search-space YAML file")
    p.add_argument("--keep", default=None, metavar="DIR", help="run the study in DIR and keep it")
    args, extra = p.parse_known_args(argv)
    name = load(args.space).name
    with tempfile.TemporaryDirectory(prefix="csnn-estimate-bench-") as tmp:
        storage = Path(args.keep or tmp)
        cmd = [sys.executable, "-m", "study.run", args.space, "--storage", str(storage), *extra]
        print("$ " + " ".join(cmd), flush=True)
        t0 = time.time()
        run = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        took = time.time() - t0
        if run.returncode != 0:
            print(f"the study failed (exit {run.returncode}): no figure", file=sys.stderr)
            return 2
        folder = storage / name
        est = yaml.safe_load((folder / "estimate.yaml").read_text())
        act = yaml.safe_load((folder / "timing.yaml").read_text())
        print("\n".join(estimate.report_lines(Location.parse(str(folder)))))
    ratio = act["wall_s"] / est["wall_s"]
    load_now = os.getloadavg()[0]
    within = abs(ratio - 1) <= GOAL
    print(f"{args.space}: predicted {est['wall_s']:.1f} s, took {act['wall_s']:.1f} s (the command {took:.1f} s): "
          f"actual / predicted {ratio:.2f}, {'within' if within else 'outside'} the +-{GOAL:.0%} goal; "
          f"{os.cpu_count()} CPUs, load average {load_now:.1f} at the end; speeds from {est['speeds']}")
    return 0 if within else 1


if __name__ == "__main__":
    sys.exit(main())
