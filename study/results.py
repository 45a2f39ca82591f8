"""A study's results folder: written from Ray Tune's ResultGrid, read back as pandas dataframes.

results/<name>/ (or --storage DIR or URI/<name>/)
  spec.yaml                 the resolved study
  trials.csv, .parquet      one row per trial: id, status, searched parameters,
                            last and best value of each metric, epochs run, time,
                            where it ran (node_ip, hostname, gpu_ids; run_device, cuda_graphs_used,
                            cuda_graphs_eval_used, cuda_graphs_fallback, capture_diff); why its last epoch
                            learned nothing (silent, dead) or which constraints it broke (constraint)
  history.csv               every epoch every trial reported
  best.yaml                 the best trial: id, full TrainConfig, metrics
  best/                     the best configuration retrained per seed (study.run)
  retrained/<trial_id>/     retrain.top_k > 1: each of the search's top_k configurations retrained per seed
  ray/, retrain/            Ray Tune's own experiment folders (search, retrain)
  optuna.db                 the Optuna study (a copy, when it lives on the driver's disk)
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from csnn import yamlio
from csnn.atomic import write_atomic
from csnn.config import METRICS, RUN_INFO, TIME_PARTS, dead_network, silent_layers, trial_fields
from study import storage
from study.spec import StudySpec, broken
from study.storage import Location, read_table

# silent: ended by the trainable as a silent network (a spiking layer stopped firing);
# dead: ended by it as a dead network (it fires, but predicts one class for every image)
STATUSES = ("finished", "stopped", "silent", "dead", "errored", "unfinished")



def write_table(path: Path, frame: pd.DataFrame) -> None:
    """A table, csv or parquet by the suffix, written atomically to a local path."""
    if path.suffix == ".parquet":
        write_atomic(path, lambda tmp: frame.to_parquet(tmp, index=False))
    else:
        write_atomic(path, lambda tmp: frame.to_csv(tmp, index=False))


def _best(series: pd.Series, mode: str):
    s = series.dropna()
    if s.empty:
        return math.nan
    return s.max() if mode == "max" else s.min()


def best_column(metric: str) -> str:
    """The trials table's column for a metric's best value over a trial's epochs."""
    return f"best_{metric}"


def accuracy_objective(spec: StudySpec) -> dict:
    """The first accuracy objective ({metric, mode}), else the first objective: what
    retrain.pick most_accurate ranks by and what the analysis plots against cost."""
    return next((o for o in spec.objectives if o["metric"].endswith("_acc")), spec.objectives[0])


def metric_mode(metric: str, spec: StudySpec) -> str | None:
    """Which way is better for a metric: an objective's mode, max for accuracy, min for loss."""
    for o in spec.objectives:
        if metric == o["metric"]:
            return o["mode"]
    if metric.endswith("_acc"):
        return "max"
    if metric.endswith("_loss"):
        return "min"
    return None


PLACEMENT = ("node_ip", "hostname", "gpu_ids")  # where a trial ran: Ray's node and the GPU ids it gave the trial


def creation_number(trial, fallback: int) -> int:
    """The trial's place in the order the search made the trials (1, 2, ...): the counter Ray's
    search generator puts first in its experiment_tag ('3_channels=4,lr=0.01'), which a resume
    keeps; Ray's own list of trials is reordered by a resume."""
    head = str(getattr(trial, "experiment_tag", "") or "").split("_", 1)[0]
    return int(head) if head.isdigit() else fallback


def trial_results(ray_dir: Location) -> list:
    """(trial, Result) of every trial Ray Tune recorded in its experiment folder,
    in creation order, read through Ray's own API (any storage pyarrow reads).
    A study that has not saved its state yet has none."""
    import logging

    from ray import tune

    ray_log = logging.getLogger("ray.tune.analysis.experiment_analysis")
    ray_log.addFilter(_reported)
    try:
        analysis = tune.ExperimentAnalysis(ray_dir.path, storage_filesystem=ray_dir.fs)
    except ValueError:  # no experiment_state*.json yet
        return []
    finally:
        ray_log.removeFilter(_reported)
    pairs = list(zip(analysis.trials, tune.ResultGrid(analysis)))
    return sorted(pairs, key=lambda p: creation_number(p[0], 0))  # stable: untagged trials keep Ray's order


def _reported(record) -> bool:
    """Drops Ray's warning that trials have no result file (FileNotFoundError): they have not reported
    an epoch yet, and frames lists them so (unfinished, 0 epochs). Its other failures (a damaged
    result.json) still reach the log."""
    lines = record.getMessage().splitlines()[1:]
    return not (lines and all("FileNotFoundError(" in line for line in lines))


def frames(ray_dir: Location, spec: StudySpec, complete: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(trials, history) of the trials Ray Tune recorded. `complete`: the study
    has ended, so a trial with fewer epochs than planned was stopped early (else
    it is 'unfinished')."""
    rows, hist = [], []
    for number, (trial, result) in enumerate(trial_results(ray_dir), 1):
        number = creation_number(trial, number)
        trial_id = trial.trial_id
        try:  # a trial killed mid-write: skip it, the others still make a study
            h = result.metrics_dataframe if result.metrics_dataframe is not None else pd.DataFrame()
            if len(h) and "epoch" not in h:
                raise ValueError("its progress has no epoch column")
            params = trial_fields(trial.config)
            cfg = spec.config(params)
        except (OSError, ValueError, TypeError) as e:  # pandas' and the config's parse errors
            warnings.warn(f"{trial.path}: trial {trial_id} skipped, its files are damaged "
                          f"({str(e).splitlines()[0] if str(e) else type(e).__name__})", stacklevel=2)
            continue
        last = h.iloc[-1] if len(h) else {}
        h = h[[c for c in (*METRICS, *RUN_INFO) if c in h.columns]]
        if len(h):
            h = h.drop_duplicates("epoch", keep="last").sort_values("epoch")  # a retried epoch counts once
        error = error_text(str(result.error)) if result.error else None
        ran = len(h)
        # status silent (dead): the trainable ended it so. The silent column: the layers silent at
        # its last epoch, for whatever reason it ended (then it is off the Pareto front); the dead
        # column, likewise: why its last epoch was a dead network's.
        quiet = _text(last.get("silent")) or ",".join(
            silent_layers(h.iloc[-1], spec.scheduler["silent_rate"]) if len(h) else [])
        dead = _text(last.get("dead")) or (dead_network(h.iloc[-1], spec.scheduler["silent_rate"]) if len(h) else "")
        status = ("errored" if error else "silent" if _text(last.get("silent")) else "dead" if _text(last.get("dead"))
                  else "finished" if ran >= cfg.epochs else "stopped" if complete else "unfinished")
        row = {"trial_id": trial_id, "number": number, "status": status}
        row.update({k: params.get(k) for k in spec.space})
        for m in (*METRICS, *RUN_INFO):
            # epoch and lr per epoch stay in history: here the searched lr is the column
            if m in h and m not in ("epoch", "lr"):
                row[m] = h[m].sum() if m in TIME_PARTS else h[m].iloc[-1]  # where the trial's time went: all its epochs
                mode = metric_mode(m, spec)
                if mode:
                    row[best_column(m)] = _best(h[m], mode)
        row["epochs_run"] = ran
        # the trial's seconds: its parts (set-up to reports), or its epochs' in a study written before they were kept
        row["time_s"] = float(h[list(TIME_PARTS)].sum().sum()) if set(TIME_PARTS) <= set(h) else \
            float(h["epoch_s"].sum()) if "epoch_s" in h else 0.0
        row.update({k: _text(last.get(k)) for k in PLACEMENT})
        row["error"] = error
        row["silent"] = quiet  # the layers that fired below scheduler.silent_rate at the last epoch, e.g. fr_12
        row["dead"] = dead  # why its last epoch was a dead network's, e.g. 'predicts class 3 for 100.0% of ...'
        # the spec's constraints its last epoch broke (the report Optuna was told), e.g. 'energy_uj 5.61 > max 5'
        row["constraint"] = broken(spec.constraints, h.iloc[-1])[1] if len(h) and not error else ""
        row["config"] = yaml.safe_dump(cfg.to_dict(), default_flow_style=True, width=10_000).strip()
        rows.append(row)
        if len(h):
            hist.append(h.assign(trial_id=trial_id))
    trials = pd.DataFrame(rows)
    history = pd.concat(hist, ignore_index=True) if hist else pd.DataFrame(columns=["trial_id", "epoch"])
    history = history[["trial_id"] + [c for c in history.columns if c != "trial_id"]]
    return trials, history


def _text(v) -> str:
    """Placement as text ('0,1' GPU ids stay text; a trial that never reported: '')."""
    return "" if missing(v) else str(v)


def error_text(text: str) -> str:
    """The last line of a traceback: the exception and its message."""
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "error")[:500]


def pareto(trials: pd.DataFrame, spec: StudySpec) -> pd.DataFrame:
    """The trials no other trial beats on every objective (last-epoch values, the
    ones Optuna records), best first on the first objective."""
    names = [o["metric"] for o in spec.objectives]
    if trials.empty or not set(names) <= set(trials.columns):
        return trials.iloc[0:0]
    # Nor a network silent or dead at its last epoch: its output no longer depends on its input,
    # and its low energy would take the cheap end of the front. Nor a trial that broke a constraint.
    ok = trials[(trials["status"] != "errored") & ~learns_nothing(trials) & ~said(trials, "constraint")]
    ok = ok.dropna(subset=names)
    costs = np.stack([ok[o["metric"]].to_numpy(float) * (1 if o["mode"] == "min" else -1) for o in spec.objectives], 1)
    dominated = [((costs <= c).all(1) & (costs < c).any(1)).any() for c in costs]
    front = ok[~np.array(dominated, dtype=bool)]
    return front.sort_values(spec.metric, ascending=spec.mode == "min")


def said(trials: pd.DataFrame, column: str) -> pd.Series:
    """Which trials have a text in `column` (silent, dead, constraint): read back from a csv, an empty one is NaN,
    and a column with none is float."""
    if column not in trials:
        return pd.Series(False, index=trials.index)
    return trials[column].map(lambda v: isinstance(v, str) and v != "").astype(bool)


def learns_nothing(trials: pd.DataFrame) -> pd.Series:
    """The trials silent or dead at their last epoch (the silent and dead columns say why)."""
    return said(trials, "silent") | said(trials, "dead")


def none_learned(trials: pd.DataFrame) -> bool:
    """Whether the study has trials that reported, and every one of them learned nothing (silent or
    dead at its last epoch): a study that ran, whose search space holds nothing that learns."""
    reported = trials[trials["status"] != "errored"] if len(trials) else trials
    return bool(len(reported)) and bool(learns_nothing(reported).all())


def nothing_to_pick(trials: pd.DataFrame) -> str:
    """What every trial that reported failed at, when none can be the best: 'learned' (all silent or
    dead at their last epoch), 'met the constraints' (every one broke a constraint, or learned nothing
    and broke none: then with several objectives no front is left); '' when a trial can be the best, or
    none reported. A study so ended has found something; study.run ends it with exit 0."""
    if none_learned(trials):
        return "learned"
    reported = trials[trials["status"] != "errored"] if len(trials) else trials
    broke = said(reported, "constraint")
    return "met the constraints" if broke.any() and (broke | learns_nothing(reported)).all() else ""


def hypervolumes(studies: list, spec: StudySpec) -> list[float]:
    """The hypervolume of each study's Pareto front, comparable across the studies:
    every objective scaled to [0, 1] between the best and the worst value on the
    studies' fronts together (their ideal and nadir points), the reference point
    1.1 on each (as Optuna's TPE takes it). A reference at the worst trial would
    make every front's hypervolume close to the whole box, and differences vanish."""
    from optuna._hypervolume import compute_hypervolume  # Optuna's own (WFG), for any number of objectives

    names, sign = [o["metric"] for o in spec.objectives], np.array([1 if o["mode"] == "min" else -1 for o in spec.objectives])
    fronts = [pareto(s.trials, spec) for s in studies]
    fronts = [f[names].to_numpy(float) * sign if len(f) else np.zeros((0, len(names))) for f in fronts]
    every = np.concatenate(fronts)
    if not len(every):
        return [0.0] * len(studies)
    lo, hi = every.min(0), every.max(0)
    span = np.where(hi > lo, hi - lo, 1.0)
    return [float(compute_hypervolume((f - lo) / span, np.full(len(names), 1.1))) if len(f) else 0.0 for f in fronts]


def pick(front: pd.DataFrame, spec: StudySpec) -> pd.Series:
    """The Pareto point to retrain: retrain.pick = most_accurate (best on the
    first accuracy objective), knee (closest to the ideal point once each
    objective is scaled to [0, 1] over the front) or index N (in front order)."""
    how = spec.retrain["pick"]
    if how == "most_accurate":
        o = accuracy_objective(spec)
        return front.sort_values(o["metric"], ascending=o["mode"] == "min").iloc[0]
    if how == "knee":
        dist = np.zeros(len(front))
        for o in spec.objectives:
            v = front[o["metric"]].to_numpy(float)
            span = v.max() - v.min()
            gap = (v.max() - v) if o["mode"] == "max" else (v - v.min())
            dist += (gap / span) ** 2 if span > 0 else 0
        return front.iloc[int(np.argmin(dist))]
    index = how if isinstance(how, int) else int(how.split()[1])
    if index >= len(front):
        warnings.warn(f"retrain.pick {how!r}: the Pareto front has {len(front)} trial(s); taking its last, "
                      f"index {len(front) - 1}", stacklevel=2)
    return front.iloc[min(index, len(front) - 1)]


def best_row(trials: pd.DataFrame, spec: StudySpec) -> pd.Series | None:
    """The best trial: by the objective's best epoch, or the picked Pareto point."""
    if spec.multi:
        front = pareto(trials, spec)
        return None if front.empty else pick(front, spec)
    ok = _candidates(trials, spec)
    if ok is None:
        return None
    key = best_column(spec.metric)
    return ok.loc[ok[key].idxmax() if spec.mode == "max" else ok[key].idxmin()]


def top_rows(trials: pd.DataFrame, spec: StudySpec, k: int) -> list[pd.Series]:
    """The `k` best trials by the search (retrain.top_k), the best first (best_row): by the objective's
    best epoch, or with several objectives from the Pareto front, the retrain.pick point first and then
    the front in its order (fewer when fewer trials qualify)."""
    first = best_row(trials, spec)
    if first is None:
        return []
    if spec.multi:
        pool = pareto(trials, spec)
    else:
        pool = _candidates(trials, spec)
        pool = pool[pool[best_column(spec.metric)].notna()].sort_values(
            best_column(spec.metric), ascending=spec.mode == "min", kind="stable")
    rest = pool[pool["trial_id"] != first["trial_id"]]
    return [first] + [r for _, r in rest.head(max(0, k - 1)).iterrows()]


def search_score(row: pd.Series, spec: StudySpec) -> float:
    """What the search ranked a trial by: its best epoch's objective, or with several objectives
    the accuracy objective at its last epoch (retrain.pick most_accurate's, what the front holds)."""
    return float(row[accuracy_objective(spec)["metric"]] if spec.multi else row[best_column(spec.metric)])


def selection_metric(spec: StudySpec) -> dict:
    """The validation metric ({metric, mode}) that chooses among the top_k retrained configurations (its mean
    over the seeds at the last retrain epoch): the accuracy objective when it is a validation one, else val_acc."""
    o = accuracy_objective(spec)
    return dict(o) if o["metric"].startswith("val_") else {"metric": "val_acc", "mode": "max"}


def _candidates(trials: pd.DataFrame, spec: StudySpec) -> pd.DataFrame | None:
    """The trials that may be the best of a single-objective study (None: no trial reported its objective)."""
    key = best_column(spec.metric)
    # A trial silent or dead at its last epoch is a candidate only when no trial learnt (its configuration
    # may, given the retrain's images and epochs); else it is never the best, as on a Pareto front (and in
    # the progress lines: study.progress). A trial whose last epoch broke a constraint never is.
    ok = trials[(trials["status"] != "errored") & ~said(trials, "constraint")] if len(trials) else trials
    learnt = ok[~learns_nothing(ok)] if len(ok) else ok
    if key in learnt and not learnt[key].dropna().empty:
        ok = learnt
    if key not in ok or ok[key].dropna().empty:
        return None
    return ok


def export(spec: StudySpec, study_dir: Location) -> tuple[pd.DataFrame, pd.DataFrame, dict | None]:
    """Write trials.csv/.parquet, history.csv and best.yaml of an ended study,
    read from Ray Tune's record in study_dir/ray; return (trials, history, best)."""
    trials, history = frames(study_dir / "ray", spec, complete=True)
    if (study_dir / "warm_start.yaml").is_file() and len(trials):
        trials["warm_start"] = warm_origins(trials, yamlio.load((study_dir / "warm_start.yaml").read_text()))
    best = best_record(trials, spec)
    # The trials tables last, trials.csv the very last: a study counts as ended only with all of
    # them (lifecycle.EXPORT), so a kill in between leaves a study that --resume exports again.
    storage.write_table(study_dir / "history.csv", history)
    if best is not None:
        (study_dir / "best.yaml").write_text(yaml.safe_dump(best, sort_keys=False))
    storage.write_table(study_dir / "trials.parquet", trials)
    storage.write_table(study_dir / "trials.csv", trials)
    return trials, history, best


def best_record(trials: pd.DataFrame, spec: StudySpec) -> dict | None:
    """best.yaml as the search's export writes it: the best trial's entry; with several objectives the
    pick and the Pareto front's entries too."""
    row = best_row(trials, spec)
    if row is None:
        return None
    best = best_entry(row, spec)
    if spec.multi:
        best["pick"] = spec.retrain["pick"]
        best["pareto"] = [best_entry(r, spec) for _, r in pareto(trials, spec).iterrows()]
    return best


def warm_origins(trials: pd.DataFrame, record: dict) -> list[str]:
    """Per trial, the earlier study's trial whose configuration was enqueued for it
    ('' for the sampler's own): the first trial with those parameters."""
    origins = [""] * len(trials)
    for e in (e for src in record["sources"] for e in src["enqueued"]):
        want = {k.split("[")[0]: v for k, v in e["params"].items()}
        for i, (_, row) in enumerate(trials.iterrows()):
            same = all(not missing(row.get(k)) and (row[k] == v or (isinstance(v, float) and math.isclose(row[k], v)))
                       for k, v in want.items())
            if same and not origins[i]:
                origins[i] = e["origin"]
                break
    return origins


def best_entry(row: pd.Series, spec: StudySpec) -> dict:
    params = {k: _plain(row[k]) for k in spec.space if not missing(row[k])}
    value = (lambda m: _plain(row[m])) if spec.multi else (lambda m: _plain(row[best_column(m)]))
    return {
        "trial_id": row["trial_id"],
        "objective": [{**o, "value": value(o["metric"])} for o in spec.objectives] if spec.multi
        else {**spec.objectives[0], "value": value(spec.metric)},
        "params": params,
        "config": spec.config(params).to_dict(),
        "metrics": {m: _plain(row[m]) for m in METRICS if m in row and m not in ("epoch", "lr") and not missing(row[m])},
    }


def missing(v) -> bool:
    """A value a trial did not report (None in YAML and parquet, NaN in csv and pandas)."""
    return v is None or (isinstance(v, float) and math.isnan(v))


def _plain(v):
    """numpy scalars -> Python numbers, so YAML stays plain."""
    return v.item() if hasattr(v, "item") else v


class StudyError(ValueError):
    pass


@dataclass
class Study:
    """A study folder as dataframes: what a notebook imports."""

    location: Location  # the study folder: local, or behind a URI (s3://...)
    spec: StudySpec
    trials: pd.DataFrame  # one row per trial
    history: pd.DataFrame  # one row per trial and epoch
    best: dict | None  # best.yaml: trial_id, objective, params, config (a TrainConfig dict), metrics
    retrain: pd.DataFrame | None  # best/metrics.csv: one row per seed and epoch
    retrain_summary: dict | None  # best/summary.yaml: test_acc per seed, mean, std, placement
    trials_file: Location | None = None  # the table trials was read from; None: from Ray's record
    warm_start: dict | None = None  # warm_start.yaml: per earlier study, trials told, skipped (why), enqueued
    environment: dict | None = None  # environment.yaml: Python, packages, git commit, CUDA, machine it started on
    # retrain.top_k > 1 (retrained/<trial_id>/): the retrained configurations, one row per configuration and
    # seed at the last retrain epoch (trial_id, search_rank, search_score, seed, val_*, test_*, chosen), and one
    # row per configuration (its mean and std over the seeds of the selection metric and of test_acc)
    retrained: pd.DataFrame | None = None
    retrained_summary: pd.DataFrame | None = None

    @property
    def path(self) -> Path | str:
        """The local folder, or the URI."""
        return self.location.local or self.location.shown

    @property
    def best_row(self) -> pd.Series | None:
        if self.best is None:
            return None
        return self.trials.set_index("trial_id").loc[self.best["trial_id"]]

    @property
    def complete(self) -> bool:
        return self.trials_file is not None

    @property
    def objective_column(self) -> str:
        """The trials' column that ranks them: the (first) objective's best epoch."""
        return best_column(self.spec.metric)

    @property
    def accuracy_metric(self) -> str:
        return accuracy_objective(self.spec)["metric"]

    def ranked(self) -> pd.DataFrame:
        """The trials that reported the objective, best first."""
        key, t = self.objective_column, self.trials
        if key not in t:
            return t.iloc[0:0]
        return t[t[key].notna()].sort_values(key, ascending=self.spec.mode == "min")

    def status_counts(self) -> dict:
        """{status: number of trials} in STATUSES order, dead and unfinished only when there are some."""
        n = self.trials["status"].value_counts() if len(self.trials) else {}
        return {s: int(n.get(s, 0)) for s in STATUSES if n.get(s, 0) or s not in ("dead", "unfinished")}

    def errored(self) -> pd.DataFrame:
        return self.trials[self.trials["status"] == "errored"] if len(self.trials) else self.trials


def _read(loc: Location, read, what: str):
    """read(loc), any failure of a damaged file (pandas, pyarrow and YAML each raise
    their own kinds) turned into one StudyError naming the file."""
    try:
        return read(loc)
    except StudyError:
        raise
    except Exception as e:  # noqa: BLE001 - see the docstring
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StudyError(f"{loc}: unreadable {what} ({detail})") from None


def _yaml(loc: Location):
    return yamlio.load(loc.read_bytes().decode("utf-8"))


def _csv(loc: Location) -> pd.DataFrame:
    # ids of digits stay strings ("00001"), and so do GPU ids ("0,1")
    frame = read_table(loc, dtype={"trial_id": str, **{k: str for k in PLACEMENT}})
    present = [k for k in PLACEMENT if k in frame]
    frame[present] = frame[present].fillna("")
    return frame


def _parquet(loc: Location) -> pd.DataFrame:
    frame = read_table(loc)
    return frame.astype({"trial_id": str}) if "trial_id" in frame else frame


def _columns(loc: Location, frame: pd.DataFrame, needed: tuple) -> pd.DataFrame:
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise StudyError(f"{loc}: not a table that study.run writes (no {', '.join(missing)} column)")
    return frame


def _mapping(loc: Location, value, keys: tuple, what: str) -> dict:
    if not isinstance(value, dict):
        raise StudyError(f"{loc}: {what} must be a mapping, got {type(value).__name__}")
    missing = [k for k in keys if k not in value]
    if missing:
        raise StudyError(f"{loc}: {what} without {', '.join(missing)}")
    return value


def load(path: str | Path | Location) -> Study:
    """Load results/<name>/ (or a URI such as s3://bucket/results/<name>). A study
    still running or interrupted (no trials table yet) is read from Ray Tune's
    record, its unfinished trials marked so. Every damaged file raises StudyError
    naming it."""
    from study.spec import parse

    loc = path if isinstance(path, Location) else Location.parse(path)
    spec_file = loc / "spec.yaml"
    if not spec_file.is_file():
        raise StudyError(f"{loc}: not a study folder (no spec.yaml); give the results/<name>/ folder "
                         "(or the --storage URI/<name>) that python -m study.run writes")
    spec = _read(spec_file, lambda f: parse(_yaml(f), str(f)), "study spec")
    # trials.parquet keeps the types; trials.csv is its copy for people. Either one
    # makes the study complete; which was read is recorded (Study.trials_file).
    tables = [f for f in (loc / "trials.parquet", loc / "trials.csv") if f.is_file()]
    trials_file = tables[0] if tables else None
    if trials_file is not None:
        trials = _columns(trials_file, _read(trials_file, _parquet if trials_file.name.endswith(".parquet") else _csv,
                                             "trials table"), ("trial_id", "status"))
        if len(tables) == 2:
            other = _read(tables[1], _csv, "trials table")
            if "trial_id" not in other or set(other["trial_id"]) != set(trials["trial_id"]):
                warnings.warn(f"{tables[1]} and {trials_file} list different trials; read {trials_file}", stacklevel=2)
        history_file = loc / "history.csv"
        if not history_file.is_file():
            raise StudyError(f"{history_file}: missing (study.run writes it with {trials_file.name})")
        history = _columns(history_file, _read(history_file, _csv, "history table"), ("trial_id", "epoch"))
    else:
        trials, history = frames(loc / "ray", spec, complete=False)
    missing = [p for p in spec.space if len(trials) and p not in trials]
    if missing:
        raise StudyError(f"{spec_file}: searches {', '.join(missing)}, which the trials in "
                         f"{trials_file or loc / 'ray'} have no column for; was spec.yaml replaced? It is written by "
                         "study.run and must stay the study's own")
    ids = set(trials["trial_id"]) if len(trials) else set()
    best_file = loc / "best.yaml"
    if best_file.is_file():
        best = _mapping(best_file, _read(best_file, _yaml, "best trial"), ("trial_id", "objective", "params", "config"),
                        "the best trial")
        best["trial_id"] = str(best["trial_id"])
        recorded = best["objective"] if isinstance(best["objective"], list) else [best["objective"]]
        if [o.get("metric") if isinstance(o, dict) else o for o in recorded] != [o["metric"] for o in spec.objectives]:
            raise StudyError(f"{spec_file}: its objectives ({', '.join(o['metric'] for o in spec.objectives)}) are "
                             f"not those {best_file} was chosen by; was spec.yaml replaced? It is written by study.run "
                             "and must stay the study's own")
        if best["trial_id"] not in ids:
            raise StudyError(f"{best_file}: trial_id {best['trial_id']!r} is not a trial of this study "
                             f"({trials_file or loc / 'ray'} lists {', '.join(sorted(ids)) or 'none'})")
    else:
        row = best_row(trials, spec) if len(trials) else None
        best = None if row is None else best_entry(row, spec)
    # summary.yaml is written last: without it best/ is not complete
    retrain, summary = None, None
    metrics_file, summary_file = loc / "best" / "metrics.csv", loc / "best" / "summary.yaml"
    if summary_file.is_file():
        summary = _mapping(summary_file, _read(summary_file, _yaml, "retrain summary"),
                           ("trial_id", "epochs", "seeds", "test_acc_mean", "test_acc_std", "epoch_s_mean"),
                           "the retrain summary")
        retrain = _columns(metrics_file, _read(metrics_file, read_table, "retrain table"), ("seed", "epoch", "test_acc"))
    warm_file = loc / "warm_start.yaml"
    warm = _read(warm_file, _yaml, "warm-start record") if warm_file.is_file() else None
    from study import environment

    per_seed, per_config = read_retrained(loc)
    return Study(loc, spec, trials, history, best, retrain, summary, trials_file, warm, environment.read(loc),
                 per_seed, per_config)


RETRAINED = "retrained"  # retrain.top_k > 1: each retrained configuration's metrics.csv, summary.yaml, seed<N>/


def read_retrained(loc: Location) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """Study.retrained and Study.retrained_summary from retrained/<trial_id>/ (summary.yaml written last:
    a configuration without it is not complete and left out); (None, None) without retrained/."""
    from pyarrow import fs as pafs

    folder = loc / RETRAINED
    if not folder.exists():
        return None, None
    seeds, configs = [], []
    for info in folder.fs.get_file_info(pafs.FileSelector(folder.path)):
        d = folder / Path(info.path).name
        if info.type != pafs.FileType.Directory or not (d / "summary.yaml").is_file():
            continue
        s = _mapping(d / "summary.yaml", _read(d / "summary.yaml", _yaml, "retrain summary"),
                     ("trial_id", "search_rank", "search_score", "seeds", "selection_metric", "chosen"),
                     "a retrained configuration's summary")
        m = s["selection_metric"]
        table = _columns(d / "metrics.csv", _read(d / "metrics.csv", read_table, "retrain table"), ("seed", "epoch"))
        last = table.sort_values("epoch").groupby("seed", as_index=False).last()
        keep = {"trial_id": str(s["trial_id"]), "search_rank": s["search_rank"], "search_score": s["search_score"]}
        seeds.append(last.assign(**keep, chosen=bool(s["chosen"])))
        configs.append({**keep, "seeds": len(s["seeds"]), "selection_metric": m,
                        **{f"{k}_{stat}": s.get(f"{k}_{stat}") for k in (m, "test_acc") for stat in ("mean", "std")},
                        "chosen": bool(s["chosen"])})
    if not configs:
        return None, None
    per_seed = pd.concat(seeds, ignore_index=True).sort_values(["search_rank", "seed"], ignore_index=True)
    first = ["trial_id", "search_rank", "search_score", "seed", "epoch"]
    per_seed = per_seed[first + [c for c in per_seed.columns if c not in first]]
    return per_seed, pd.DataFrame(configs).sort_values("search_rank", ignore_index=True)


def time_breakdown(history: pd.DataFrame | None, retrain: pd.DataFrame | None) -> dict:
    """Where the trials' time went (csnn.config.TIME_PARTS), summed over every epoch of the search's trials
    (history) and of the retrain's seeds (best/metrics.csv): {"search": {"setup_s": ..., ...}, "retrain": {...}};
    a table without those columns (written before they were kept, or none yet) is left out."""
    out = {}
    for name, table in (("search", history), ("retrain", retrain)):
        if table is not None and set(TIME_PARTS) <= set(table.columns):
            out[name] = {k: round(float(table[k].sum()), 2) for k in TIME_PARTS}
    return out


def retrain_table(loc: Location) -> pd.DataFrame | None:
    """Every retrain run's epochs: best/metrics.csv, or with retrain.top_k > 1 every retrained configuration's
    (retrained/*/metrics.csv); None when there is none."""
    from pyarrow import fs as pafs

    if (loc / RETRAINED).exists():
        files = [loc / RETRAINED / Path(i.path).name / "metrics.csv"
                 for i in loc.fs.get_file_info(pafs.FileSelector((loc / RETRAINED).path))]
        tables = [read_table(f) for f in files if f.is_file()]
        if tables:
            return pd.concat(tables, ignore_index=True)
    return read_table(loc / "best" / "metrics.csv") if (loc / "best" / "metrics.csv").is_file() else None


def read_breakdown(loc: Location) -> dict:
    """time_breakdown of the study folder's history.csv and best/metrics.csv, those it holds; {} when one
    cannot be read (timing.yaml is written at a study's very end: a damaged table must not fail it there)."""
    try:
        tables = [read_table(loc / "history.csv") if (loc / "history.csv").is_file() else None, retrain_table(loc)]
    except (OSError, ValueError) as e:  # pandas' parse errors are ValueErrors
        warnings.warn(f"{loc}: where the trials' time went is left out of timing.yaml ({e})", stacklevel=2)
        return {}
    return time_breakdown(*tables)
