"""Where a study's time goes: the phases (timing.yaml), then the trials' own time split into its parts
(set-up, training, validation, test, cost counting, checkpoints, reports: csnn.config.TIME_PARTS), per
epoch and per trial, set against what study.estimate predicted for them.

  python benchmarks/breakdown.py results/quick            # a finished study folder
  python benchmarks/breakdown.py search_spaces/quick.yaml [--keep DIR] [study.run's flags...]

With a YAML file the study runs first in a temporary folder (--keep DIR to keep it) with
`python -m study.run`: it costs what the study costs (quick.yaml: minutes on 2 cores). A machine that
others share while it runs inflates every figure: read the shares, and the estimate's calibration
(printed: how busy the machine was, and its start-up speed), with them.
"""
import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without an install too

from csnn.config import TIME_PARTS  # noqa: E402
from study import results  # noqa: E402
from study.spec import load  # noqa: E402


def show(folder: Path) -> None:
    study = results.load(folder)
    timing = yaml.safe_load((folder / "timing.yaml").read_text()) if (folder / "timing.yaml").is_file() else {}
    est = yaml.safe_load((folder / "estimate.yaml").read_text()) if (folder / "estimate.yaml").is_file() else {}
    if est:
        print(f"estimate's calibration: {est.get('speeds', '')}")
        print(f"predicted wall {est['wall_s']:.0f} s, actual {timing.get('wall_s', float('nan')):.0f} s")
    if timing:
        print("phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timing["phases_s"].items())
              + f"; wall {timing['wall_s']:.1f}")
    parts = results.time_breakdown(study.history, study.retrain)
    if not parts:
        print(f"{folder}: its tables have no time breakdown (written before csnn.config.TIME_PARTS were kept)")
        return
    for phase, table in (("search", study.history), ("retrain", study.retrain)):
        if phase not in parts:
            continue
        total = sum(parts[phase].values()) or 1.0
        runs = table.groupby("trial_id" if phase == "search" else "seed")
        epochs = len(table)
        print(f"\n{phase}: {runs.ngroups} trials, {epochs} epochs, {total:.1f} s of trials' time "
              f"({total / runs.ngroups:.1f} s a trial)")
        print(f"  {'part':<14}{'s':>8}{'share':>8}{'s/epoch':>10}")
        for k in TIME_PARTS:
            per = parts[phase][k] / (runs.ngroups if k == "setup_s" else epochs)
            print(f"  {k:<14}{parts[phase][k]:>8.1f}{parts[phase][k] / total:>8.0%}{per:>10.2f}"
                  + ("  (a trial)" if k == "setup_s" else ""))
        fixed = sum(parts[phase][k] for k in ("cost_s", "checkpoint_s", "report_s")) / epochs
        print(f"  fixed per epoch (cost counting, checkpoint, report): {fixed:.2f} s; training images "
              f"{table['train_img_s'].median():.0f} images/s (median epoch)")
    if est:  # the estimate's own per-epoch fixed costs, for comparison
        from study import estimate

        f = estimate.fixed_scale(est.get("cpu_fit"))
        print(f"\nthe estimate's per-epoch fixed costs here: {estimate.EPOCH_OVERHEAD_S * f:.2f} s report and "
              f"checkpoint, {estimate.TRIAL_START_S * f:.2f} s a trial's set-up (x{f:.2f}, the calibration's start)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", help="a finished study folder, or a search-space YAML file to run first")
    p.add_argument("--keep", default=None, metavar="DIR", help="run the study in DIR and keep it")
    args, extra = p.parse_known_args(argv)
    if Path(args.what).is_dir():
        show(Path(args.what))
        return 0
    name = load(args.what).name
    with tempfile.TemporaryDirectory(prefix="csnn-breakdown-") as tmp:
        storage = Path(args.keep or tmp)
        cmd = [sys.executable, "-m", "study.run", args.what, "--storage", str(storage), *extra]
        if subprocess.run(cmd, cwd=ROOT).returncode != 0:
            return 2
        show(storage / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
