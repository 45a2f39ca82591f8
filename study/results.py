"""A study's results folder: written from Ray Tune's ResultGrid, read back as pandas dataframes.

results/<name>/
  spec.yaml                 the resolved study
  trials.csv, .parquet      one row per trial: id, status, searched parameters,
                            last and best value of each metric, epochs run, time
  history.csv               every epoch every trial reported
  best.yaml                 the best trial: id, full TrainConfig, metrics
  best/                     the best configuration retrained per seed (study.run)
  optuna.db, ray/           the Optuna study and Ray Tune's own experiment folder
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd
import yaml

from csnn.train import METRICS
from study.spec import StudySpec

STATUSES = ("finished", "stopped", "errored")


def write_atomic(path: Path, text: str | None = None, frame: pd.DataFrame | None = None) -> None:
    """Write a file under a temporary name, then rename: never half a file under the real name."""
    tmp = path.with_name(path.name + ".tmp")
    if frame is not None:
        frame.to_parquet(tmp, index=False) if path.suffix == ".parquet" else frame.to_csv(tmp, index=False)
    else:
        tmp.write_text(text)
    os.replace(tmp, path)


def _best(series: pd.Series, mode: str):
    s = series.dropna()
    if s.empty:
        return math.nan
    return s.max() if mode == "max" else s.min()


def metric_mode(metric: str, spec: StudySpec) -> str | None:
    """Which way is better for a metric: the objective's mode, max for accuracy, min for loss."""
    if metric == spec.metric:
        return spec.mode
    if metric.endswith("_acc") and metric != "max_test_acc":
        return "max"
    if metric.endswith("_loss"):
        return "min"
    return None


def frames(result_grid, spec: StudySpec) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(trials, history) dataframes from a Ray Tune ResultGrid."""
    rows, hist = [], []
    for result in result_grid:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        h = result.metrics_dataframe
        h = h[[c for c in h.columns if c in METRICS]].copy() if h is not None and len(h) else pd.DataFrame()
        if len(h):
            h = h.drop_duplicates("epoch", keep="last").sort_values("epoch")  # a retried epoch counts once
        params = {k: v for k, v in (result.config or {}).items() if "[" not in k}
        cfg = spec.config(params)
        ran = len(h)
        status = "errored" if result.error else ("finished" if ran >= cfg.epochs else "stopped")
        row = {"trial_id": trial_id, "status": status}
        row.update({k: params.get(k) for k in spec.space})
        for m in METRICS:
            # epoch and lr per epoch stay in history: here the searched lr is the column
            if m in h and m not in ("epoch", "lr"):
                row[m] = h[m].iloc[-1]
                mode = metric_mode(m, spec)
                if mode:
                    row[f"best_{m}"] = _best(h[m], mode)
        row["epochs_run"] = ran
        row["time_s"] = float(h["epoch_s"].sum()) if "epoch_s" in h else 0.0
        row["error"] = _error_text(result.error)
        row["config"] = yaml.safe_dump(cfg.to_dict(), default_flow_style=True, width=10_000).strip()
        rows.append(row)
        if len(h):
            hist.append(h.assign(trial_id=trial_id))
    trials = pd.DataFrame(rows)
    if len(trials):
        trials = trials.sort_values("trial_id", ignore_index=True)
    history = pd.concat(hist, ignore_index=True) if hist else pd.DataFrame(columns=["trial_id", "epoch"])
    history = history[["trial_id"] + [c for c in history.columns if c != "trial_id"]]
    return trials, history


def _error_text(error) -> str | None:
    if error is None:
        return None
    cause = getattr(error, "cause", None) or error  # Ray wraps the trial's own exception
    lines = [line for line in str(cause).strip().splitlines() if line.strip()]
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}"[:500]


def best_row(trials: pd.DataFrame, spec: StudySpec) -> pd.Series | None:
    key = f"best_{spec.metric}"
    ok = trials[trials["status"] != "errored"] if len(trials) else trials
    if key not in ok or ok[key].dropna().empty:
        return None
    return ok.loc[ok[key].idxmax() if spec.mode == "max" else ok[key].idxmin()]


def export(result_grid, spec: StudySpec, study_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict | None]:
    """Write trials.csv/.parquet, history.csv and best.yaml; return (trials, history, best)."""
    trials, history = frames(result_grid, spec)
    write_atomic(study_dir / "history.csv", frame=history)
    write_atomic(study_dir / "trials.parquet", frame=trials)
    write_atomic(study_dir / "trials.csv", frame=trials)
    row = best_row(trials, spec)
    best = None
    if row is not None:
        params = {k: _plain(row[k]) for k in spec.space if not _missing(row[k])}
        best = {
            "trial_id": row["trial_id"],
            "objective": {"metric": spec.metric, "mode": spec.mode, "value": _plain(row[f"best_{spec.metric}"])},
            "params": params,
            "config": spec.config(params).to_dict(),
            "metrics": {m: _plain(row[m]) for m in METRICS if m in row and m not in ("epoch", "lr")
                        and not _missing(row[m])},
        }
        write_atomic(study_dir / "best.yaml", yaml.safe_dump(best, sort_keys=False))
    return trials, history, best


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _plain(v):
    """numpy scalars -> Python numbers, so YAML stays plain."""
    return v.item() if hasattr(v, "item") else v
