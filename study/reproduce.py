"""python -m study.reproduce results/<name> [--trial ID] [--epochs N]: retrain a recorded trial and compare.

Retrains the trial's TrainConfig (seed included) with the one training loop and
compares every epoch's metrics with the study's history. When the trial ran on
the CPU (its recorded `run_device`) and the reproduction does too, they must be
equal; when either ran on CUDA, whose kernels are not deterministic, within
CUDA_TOLERANCES (absolute for values in [0, 1], relative for counts).
`--deterministic` makes the reproduction itself deterministic on CUDA.
Writes results/<name>/reproduce/<trial>/{comparison.csv, spikes/}; exits 0 on
a match, 1 on a mismatch.
"""
from __future__ import annotations

import argparse
import sys
import tempfile

import pandas as pd
import torch
import yaml

from csnn import data as fmnist
from csnn.config import RUN_INFO, TIMING_METRICS, TrainConfig
from csnn.train import fit, load_model, resolve_device, set_deterministic
from study import results

# On CUDA, per metric: (kind, tolerance). Accuracies, losses and firing rates lie in
# [0, 1] and move by a few images' worth; counts move with the spikes, relatively.
CUDA_TOLERANCES = {"acc": ("abs", 0.02), "loss": ("abs", 0.02), "fr_": ("abs", 0.02), "per_image": ("rel", 0.05),
                   "energy_uj": ("rel", 0.05), "lr": ("rel", 1e-6)}


def tolerance(metric: str, exact: bool) -> tuple[str, float]:
    if exact:
        return "abs", 0.0
    for key, tol in CUDA_TOLERANCES.items():
        if key in metric:
            return tol
    return "abs", 0.02


def exact_expected(recorded: pd.DataFrame, device: torch.device) -> bool:
    """Equal values are expected only when the recorded run and this one both ran on the CPU.
    A history without run_device (recorded before it was) counts as possibly CUDA."""
    ran = recorded["run_device"].dropna().astype(str) if "run_device" in recorded else pd.Series(dtype=str)
    return device.type == "cpu" and len(ran) > 0 and bool(ran.str.startswith("cpu").all())


def compare(recorded: pd.DataFrame, reproduced: list[dict], exact: bool) -> pd.DataFrame:
    """One row per epoch and numeric metric: recorded, reproduced, difference, the tolerance, ok."""
    rows = []
    for m in reproduced:
        rec = recorded[recorded["epoch"] == m["epoch"]]
        for k, v in m.items():
            if k in TIMING_METRICS or k in RUN_INFO or k == "epoch" or k not in recorded:
                continue
            r = float(rec[k].iloc[0]) if len(rec) else float("nan")
            diff = abs(v - r)
            kind, tol = tolerance(k, exact)
            bound = tol * abs(r) if kind == "rel" else tol
            rows.append({"epoch": m["epoch"], "metric": k, "recorded": r, "reproduced": v, "diff": diff,
                         "tolerance": f"{tol:g}{' rel' if kind == 'rel' else ''}", "ok": bool(diff <= bound)})
    return pd.DataFrame(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m study.reproduce", description=__doc__.split("\n")[0])
    ap.add_argument("study", help="the study folder, results/<name>")
    ap.add_argument("--trial", default=None, help="trial id (default: the best trial)")
    ap.add_argument("--epochs", type=int, default=None, help="reproduce only the first N epochs")
    ap.add_argument("--device", default=None, help="override the recorded device (e.g. cpu)")
    ap.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: $CSNN_DATA, then Debian's)")
    ap.add_argument("--deterministic", action="store_true",
                    help="deterministic CUDA kernels for this reproduction (slower; see the README)")
    args = ap.parse_args(argv)
    try:
        study = results.load(args.study)
        trial_id = args.trial or (study.best or {}).get("trial_id")
        if trial_id is None:
            raise results.StudyError(f"{args.study}: the study has no best trial; pass --trial ID")
        rows = study.trials[study.trials["trial_id"].astype(str) == str(trial_id)]
        if rows.empty:
            raise results.StudyError(f"{args.study}: no trial {trial_id!r}; trials: {', '.join(study.trials['trial_id'].astype(str))}")
        cfg = TrainConfig.from_dict(yaml.safe_load(rows.iloc[0]["config"]))
        if args.device:
            cfg = TrainConfig.from_dict({**cfg.to_dict(), "device": args.device})
        recorded = study.history[study.history["trial_id"].astype(str) == str(trial_id)].sort_values("epoch")
        if recorded.empty:
            raise results.StudyError(f"{args.study}: trial {trial_id} recorded no epoch")
        epochs = min(args.epochs or len(recorded), len(recorded))
        data = fmnist.load(args.data_dir)
        device = resolve_device(cfg.device)
    except (results.StudyError, fmnist.DataError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    # Float sums depend on how work is split across threads: use the trial's count.
    torch.set_num_threads(max(1, int(study.spec.resources["cpus_per_trial"])))
    set_deterministic(args.deterministic)
    exact = exact_expected(recorded, device)
    ran_on = ", ".join(sorted(set(recorded["run_device"].dropna().astype(str)))) if "run_device" in recorded else ""
    out = study.path / "reproduce" / str(trial_id)
    print(f"reproducing trial {trial_id} (recorded on {ran_on or 'an unrecorded device'}) for {epochs} of its "
          f"{len(recorded)} recorded epochs on {device}: {'exact' if exact else 'CUDA tolerances'}", flush=True)
    with tempfile.TemporaryDirectory() as work:
        history = fit(cfg, data, work, lambda m: print(f"  epoch {m['epoch']}: test_acc {m['test_acc']:.4f}", flush=True),
                      stop_after=epochs)
        table = compare(recorded, history, exact)
        out.mkdir(parents=True, exist_ok=True)
        results.write_table(out / "comparison.csv", table)
        from csnn.spikes import render

        net, _ = load_model(f"{work}/checkpoint_latest.pth", str(device))
        render(net, data.test_x[: max(1, study.spec.render["images"])], out / "spikes", overwrite=True)
    bad = table[~table["ok"]]
    print(table.to_string(index=False, float_format=lambda v: f"{v:.6g}"))
    if len(bad):
        print(f"MISMATCH: {len(bad)} of {len(table)} values differ beyond their tolerance "
              f"({', '.join(sorted(set(bad['metric'])))}); {out / 'comparison.csv'}")
        return 1
    print(f"reproduced: all {len(table)} values match ({'exactly' if exact else 'within CUDA tolerances'}); "
          f"{out / 'comparison.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
