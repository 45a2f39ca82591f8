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

if __name__ == "__main__":
    from csnn.argtypes import quiet_start

    quiet_start("study.reproduce")
import argparse  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from csnn import data as fmnist
from csnn.config import RUN_INFO, TIMING_METRICS, TrainConfig
from csnn.train import fit, load_model, resolve_device, set_deterministic
from study import environment, lifecycle, results
from study.storage import disk_full
from csnn.argtypes import interruptible, leave, positive_int, spelled, worded

# When CUDA ran, per metric: (absolute, relative) tolerance, a difference passing
# when it is within absolute + relative * |recorded|. Accuracies move by a few
# images' worth; losses, firing rates and counts move with the spikes, relatively.
# top_class: which class a learning network predicts most often may change with the last bits of a
# step (its share, a fraction of images like an accuracy, says whether one class dominates).
CUDA_TOLERANCES = {"acc": (0.02, 0.0), "loss": (0.002, 0.10), "fr_": (0.005, 0.10), "per_image": (0.0, 0.05),
                   "energy_uj": (0.0, 0.05), "lr": (0.0, 1e-6), "top_class_share": (0.02, 0.0),
                   "top_class": (9.0, 0.0)}


def tolerance(metric: str, exact: bool) -> tuple[float, float]:
    if exact:
        return 0.0, 0.0
    return next((tol for key, tol in CUDA_TOLERANCES.items() if key in metric), (0.0, 0.05))


def exact_expected(recorded: pd.DataFrame, device: torch.device, recorded_device: str) -> bool:
    """Equal values are expected only when the recorded run and this one both ran on the CPU:
    the history's run_device says where it ran; a history from before it was recorded
    falls back on the trial's configured device."""
    ran = recorded["run_device"].dropna().astype(str) if "run_device" in recorded else pd.Series(dtype=str)
    on_cpu = bool(ran.str.startswith("cpu").all()) if len(ran) else recorded_device == "cpu"
    return device.type == "cpu" and on_cpu


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
            absolute, relative = tolerance(k, exact)
            rows.append({"epoch": m["epoch"], "metric": k, "recorded": r, "reproduced": v, "diff": diff,
                         "tolerance": f"{absolute:g} + {relative:.0%}", "ok": bool(diff <= absolute + relative * abs(r))})
    return pd.DataFrame(rows)


def retrain_run(study: results.Study, trial_id: str, seed: int) -> tuple[TrainConfig, pd.DataFrame]:
    """The TrainConfig and recorded epochs of the retrain of configuration `trial_id` with `seed`: from
    retrained/<trial_id>/ (retrain.top_k > 1), or best/ when it holds that configuration's retrain."""
    folders = [study.location / results.RETRAINED / trial_id, study.location / "best"]
    folder = next((f for f in folders if (f / "summary.yaml").is_file()
                   and str(yaml.safe_load((f / "summary.yaml").read_text())["trial_id"]) == trial_id), None)
    if folder is None:
        kept = sorted(set(study.retrained_summary["trial_id"]) if study.retrained_summary is not None else
                      {str(study.retrain_summary["trial_id"])} if study.retrain_summary else set())
        raise results.StudyError(f"{study.path}: trial {trial_id}'s configuration was not retrained; retrained: "
                                 f"{', '.join(kept) or 'none'}")
    summary = yaml.safe_load((folder / "summary.yaml").read_text())
    if not (folder / f"seed{seed}" / "config.yaml").is_file():
        raise results.StudyError(f"{folder}: no retrain with seed {seed}; seeds: {summary['seeds']}")
    cfg = TrainConfig.from_dict(yaml.safe_load((folder / f"seed{seed}" / "config.yaml").read_text()))
    table = results.read_table(folder / "metrics.csv")
    recorded = table[table["seed"] == seed].drop(columns="seed").sort_values("epoch")
    device = (summary.get("placement") or {}).get(seed, {}).get("run_device")
    return cfg, recorded.assign(run_device=device) if device else recorded


def trial_id_arg(text: str) -> str:
    """argparse type: a non-empty trial id (an empty one would silently mean the best trial)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty trial id is not allowed; leave --trial out for the best trial")
    return text.strip()


def main(argv=None) -> int:
    held = []  # the study folder's lock, once taken: released however it ends
    try:
        return _main(argv, held)
    except OSError as e:  # a full disk, as the reproduction writes its checkpoints or reproduce/<trial>/
        if not disk_full(e):
            raise
        again = " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else [str(a) for a in argv]))
        print(f"error: the disk is full: {e.filename or 'the reproduction'} could not be written ({e.strerror or e}); "
              f"free space there, then run it again: python -m study.reproduce {again}", file=sys.stderr)
        return 1
    finally:
        for location, lock in held:
            lifecycle.release_lock(location, lock)


def _main(argv, held: list) -> int:
    ap = argparse.ArgumentParser(prog="python -m study.reproduce", description=__doc__.split("\n")[0])
    ap.add_argument("study", help="the study folder, results/<name>")
    ap.add_argument("--trial", type=trial_id_arg, default=None, help="trial id (default: the best trial)")
    ap.add_argument("--seed", type=int, default=None,
                    help="reproduce the retrain of the configuration (--trial, default the best) with this seed of "
                         "retrain.seeds, from best/ or retrained/<trial>/, instead of its search trial")
    ap.add_argument("--epochs", type=positive_int, default=None, help="reproduce only the first N epochs")
    ap.add_argument("--device", default=None, help="override the recorded device (e.g. cpu)")
    ap.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: $CSNN_DATA, then Debian's)")
    ap.add_argument("--deterministic", action="store_true",
                    help="deterministic CUDA kernels for this reproduction (slower; see the README)")
    args = ap.parse_args(argv)
    try:
        study = results.load(args.study)
        trial_id = args.trial if args.trial is not None else (study.best or {}).get("trial_id")
        if trial_id is None and study.trials.empty:
            raise results.StudyError(f"{args.study}: the study has no trial yet: nothing to reproduce")
        if trial_id is None:
            raise results.StudyError(f"{args.study}: no trial reported the objective, so there is no best trial; "
                                     f"pass --trial ID (trials: {', '.join(study.trials['trial_id'].astype(str))})")
        if why := lifecycle.unwritable(study.location):  # before the data and the training: refused whole
            raise results.StudyError(f"{study.path}: {why}; study.reproduce writes reproduce/<trial>/ and its lock "
                                     f"there: copy the folder (cp -r {study.path} DEST/) and reproduce the copy")
        rows = study.trials[study.trials["trial_id"].astype(str) == str(trial_id)]
        if rows.empty:
            raise results.StudyError(f"{args.study}: no trial {trial_id!r}; trials: {', '.join(study.trials['trial_id'].astype(str))}")
        if args.seed is not None:
            cfg, recorded = retrain_run(study, str(trial_id), args.seed)
        else:
            try:
                cfg = TrainConfig.from_dict(yaml.safe_load(str(rows.iloc[0]["config"])))
            except (yaml.YAMLError, ValueError) as e:
                raise results.StudyError(f"{study.trials_file}: trial {trial_id}: unreadable config ({e})") from None
        recorded_device = cfg.device
        if args.device:
            # our CuPy kernels and the CPU's compute the same formulas, and CUDA graphs replay the eager
            # step: a cupy or graphed trial reproduces on the CPU
            cpu = {"backend": "auto", "cuda_graphs": "auto"} if args.device == "cpu" else {}
            try:
                cfg = TrainConfig.from_dict({**cfg.to_dict(), "device": args.device, **cpu})
            except ValueError as e:  # the flag's value: the flag, not the field it fills
                raise ValueError(worded(str(e), {"TrainConfig.device": "--device"})) from None
        if args.seed is None:
            recorded = study.history[study.history["trial_id"].astype(str) == str(trial_id)].sort_values("epoch")
        if recorded.empty:
            raise results.StudyError(f"{args.study}: trial {trial_id} recorded no epoch")
        epochs = min(args.epochs or len(recorded), len(recorded))
        data = fmnist.load(args.data_dir)
        fmnist.split(data, cfg.val_size, cfg.train_size, cfg.test_size, cfg.split_seed)  # the trial's sizes fit this data
        device = resolve_device(cfg.device)
    except (results.StudyError, fmnist.DataError, ValueError, RuntimeError) as e:
        print(f"error: {spelled(str(e), '--')}", file=sys.stderr)
        return 2

    # Float sums depend on how work is split across threads: use the trial's count.
    torch.set_num_threads(max(1, int(study.spec.resources["cpus_per_trial"])))
    set_deterministic(args.deterministic)
    exact = exact_expected(recorded, device, recorded_device)
    ran_on = ", ".join(sorted(set(recorded["run_device"].dropna().astype(str)))) if "run_device" in recorded else ""
    # A study behind a URI (s3://...) gets its reproduction in ./reproduce/<trial>/ here.
    run = str(trial_id) if args.seed is None else f"{trial_id}-seed{args.seed}"
    out = (study.location.local or Path.cwd()) / "reproduce" / run
    print(f"reproducing {'trial ' + str(trial_id) if args.seed is None else f'the retrain of {trial_id} with seed {args.seed}'} (recorded on {ran_on or 'an unrecorded device'}) for {epochs} of its "
          f"{len(recorded)} recorded epochs on {device}: {'exact' if exact else 'CUDA tolerances'}", flush=True)
    was = sorted(set(recorded["data_sha"].dropna().astype(str)) - {""}) if "data_sha" in recorded else []
    other_data = bool(was and data.fingerprint and data.fingerprint not in was)
    if other_data:
        print(f"warning: the trial was trained on other images (data fingerprint {', '.join(was)}; {data.source} "
              f"has {data.fingerprint}): expect a mismatch; --data-dir names the study's data", file=sys.stderr)
    if study.location.local is not None:  # it writes into the study folder (reproduce/<trial>/): not while study.run does
        try:
            held.append((study.location, lifecycle.take_lock(study.location, "python -m study.reproduce "
                                                             + " ".join(sys.argv[1:] if argv is None else argv))))
        except lifecycle.Locked as e:
            print(f"error: {spelled(str(e), '--')}", file=sys.stderr)
            return 2
    env = environment.collect()
    changed = environment.warn_differences(study.location, "this reproduction", env)
    with tempfile.TemporaryDirectory() as work:
        history = fit(cfg, data, work, lambda m: print(f"  epoch {m['epoch']}: test_acc {m['test_acc']:.4f}", flush=True),
                      stop_after=epochs)
        table = compare(recorded, history, exact)
        bad = table[~table["ok"]]
        # A mismatch never replaces an earlier reproduction: it goes beside it, stamped.
        tag = time.strftime("-%Y%m%d-%H%M%S") if len(bad) and (out / "comparison.csv").exists() else ""
        out.mkdir(parents=True, exist_ok=True)
        from csnn.spikes import render

        net, _ = load_model(f"{work}/checkpoint_latest.pth", str(device))
        render(net, data.test_x[: max(1, study.spec.render["images"])], out / f"spikes{tag}", overwrite=True)
        table_file = out / f"comparison{tag}.csv"
        environment.write(out, env, f"environment{tag}.yaml")
        table["environment_differs"] = "; ".join(changed)  # what this reproduction ran on, against the study
        results.write_table(table_file, table)  # last, and whole: it marks a finished reproduction
    print(table.to_string(index=False, float_format=lambda v: f"{v:.6g}"))
    if len(bad):
        print(f"MISMATCH: {len(bad)} of {len(table)} values differ beyond their tolerance "
              f"({', '.join(sorted(set(bad['metric'])))}); {table_file}"
              + (" (on other images than the trial's)" if other_data else ""))
        return 1
    print(f"reproduced: all {len(table)} values match ({'exactly' if exact else 'within CUDA tolerances'}); "
          f"{table_file}")
    return 0


if __name__ == "__main__":
    leave(interruptible(main, "study.reproduce", "the reproduction did not finish (it writes comparison.csv last); "
                        "run it again"))
