"""python -m study.analyze results/<name> [--top K]: a leaderboard, plots and a one-page report.

Writes results/<name>/report/: curves.png, param_<name>.png, parallel.png,
importance.png, baseline.png and report.md (the plots embedded).
"""
from __future__ import annotations

if __name__ == "__main__":
    from csnn.argtypes import quiet_start

    quiet_start("study.analyze")
import argparse  # noqa: E402
import errno  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from csnn import yamlio  # noqa: E402
from csnn.atomic import write_atomic  # noqa: E402
from csnn.config import DEAD_SHARE, TUTORIAL_ACC, TUTORIAL_TEXT  # noqa: E402
from study import estimate, lifecycle, results  # noqa: E402
from csnn.argtypes import interruptible, leave, positive_int, spelled  # noqa: E402
from study.spec import BASELINE, broken, distribution  # noqa: E402

LABELS = {"val_acc": "validation accuracy", "test_acc": "test accuracy", "train_acc": "training accuracy",
          "val_loss": "validation loss (MSE)", "test_loss": "test loss (MSE)", "train_loss": "training loss (MSE)",
          "T": "time steps T", "channels": "channels", "lr": "learning rate", "momentum": "momentum",
          "weight_decay": "weight decay", "batch_size": "batch size (images)", "epochs": "epochs"}


def label(name: str) -> str:
    return LABELS.get(name, name)


def leaderboard(study: results.Study, top: int) -> str:
    spec = study.spec
    cols = ["number", "trial_id", "status", *spec.space, study.objective_column, "test_acc", "epochs_run", "time_s"]
    t = study.ranked()[[c for c in cols if c in study.trials]].head(top)
    if t.empty:  # not pandas' "Empty DataFrame" and its columns
        return "no trial reported the objective: there is no best trial"
    if spec.constraints:  # a trial that broke one ranks by its score but is never the best: say which it broke
        r = study.ranked().head(top)
        t = t.assign(constraint=r["constraint"].where(results.said(r, "constraint"), "-") if "constraint" in r else "-")
    return t.to_string(index=False, float_format=lambda v: f"{v:.4g}")


def unreported(study: results.Study, state: str, held: str | None) -> str | None:
    """What a study folder holds, as one line, when no trial of it has reported an epoch (a study
    interrupted, or still running, before its first report, or whose trials all errored at once):
    nothing to draw or rank. None when one has."""
    if not study.history.empty:
        return None
    t, errored = study.trials, study.errored()
    holds = f"{study.path} holds {lifecycle.STATES[state]}" + (f" (being written by {held})" if held else "")
    then = "; continue it with study.run's --resume" if state == "interrupted" and not held else ""
    first = f"trial {errored.iloc[0]['trial_id']}: {errored.iloc[0]['error']}" if len(errored) else ""
    if len(t) and len(errored) == len(t):
        which = f"{len(t)} trials all" if len(t) > 1 else "one trial"
        return f"{holds} whose {which} errored before their first epoch ({first}): nothing to read{then}"
    trials = f"none of its {len(t)} trials" if len(t) else "no trial"
    return (f"{holds}, and {trials} has reported an epoch yet"
            f"{f' ({len(errored)} errored; {first})' if len(errored) else ''}: nothing to read yet{then}")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_curves(study: results.Study, top: int, out: Path) -> Path | None:
    h, metric = study.history, study.spec.metric
    if metric not in h or h.empty:
        return None
    top_ids = list(study.ranked()["trial_id"].head(top))
    status = study.trials.set_index("trial_id")["status"]
    fig, ax = plt.subplots(figsize=(8, 5))
    for tid, g in h.groupby("trial_id"):
        if tid not in top_ids:
            faint = status.get(tid) == "stopped"
            ax.plot(g["epoch"] + 1, g[metric], color="grey", alpha=0.25 if faint else 0.5, lw=1,
                    ls=":" if faint else "-", marker=".")  # a trial stopped after one epoch is a dot
    for rank, tid in enumerate(top_ids):
        g = h[h["trial_id"] == tid]
        faint = status.get(tid) == "stopped"
        ax.plot(g["epoch"] + 1, g[metric], marker="o", lw=2, alpha=0.4 if faint else 1,
                label=f"#{rank + 1} {tid}" + (" (stopped early)" if faint else ""))
    ax.set(title=f"{label(metric)} per epoch: top {len(top_ids)} trials (grey: the others, dotted: stopped early)",
           xlabel="epoch", ylabel=label(metric))
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, out / "curves.png")


def _log_scaled(p: dict) -> bool:
    dists = p["cases"].values() if "depends_on" in p else [p]
    return all(d.get("log") for d in dists)


def edge_warning(study: results.Study, name: str) -> str | None:
    """The best value at (within 5% of) the edge of its range: the range may be too narrow."""
    p, row = study.spec.space[name], study.best_row
    if row is None or results.missing(row.get(name)):
        return None
    value = row[name]
    d = distribution(p, row)
    if d["type"] == "categorical":
        numeric = all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in d["choices"])
        if numeric and len(d["choices"]) > 2 and value in (min(d["choices"]), max(d["choices"])):
            return f"{name} = {value} is the {'smallest' if value == min(d['choices']) else 'largest'} of its choices {d['choices']}"
        return None
    f = (lambda v: math.log(v)) if d["log"] else (lambda v: v)
    pos = (f(value) - f(d["low"])) / (f(d["high"]) - f(d["low"]))
    if pos <= 0.05 or pos >= 0.95:
        return f"{name} = {value:.4g} lies at the {'low' if pos <= 0.05 else 'high'} edge of [{d['low']}, {d['high']}]"
    return None


def plot_param(study: results.Study, name: str, out: Path) -> Path | None:
    t = study.ranked()
    key = study.objective_column
    if t.empty or name not in t:  # no trial recorded yet
        return None
    t = t[t[name].notna()]
    if t.empty:
        return None
    p = study.spec.space[name]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    categorical = p.get("type") == "categorical"
    if categorical:
        choices = p["choices"]
        x = t[name].map(lambda v: choices.index(v) if v in choices else choices.index(type(choices[0])(v)))
        x = x + np.random.default_rng(0).uniform(-0.08, 0.08, len(t))  # jitter: ties stay visible
        ax.scatter(x, t[key], alpha=0.7)
        ax.set_xticks(range(len(choices)), [str(c) for c in choices])
    else:
        groups = t.groupby(t[p["depends_on"]]) if "depends_on" in p else [(None, t)]
        for case, g in groups:
            ax.scatter(g[name], g[key], alpha=0.7, label=f"{p['depends_on']} = {case}" if case is not None else None)
        if "depends_on" in p:
            ax.legend(fontsize=8)
        if _log_scaled(p):
            ax.set_xscale("log")
    best = study.best_row  # the picked Pareto point when there are several objectives
    if best is not None and not results.missing(best.get(name)):
        i = t.index[t["trial_id"] == study.best["trial_id"]]
        bx = x.loc[i] if categorical else t.loc[i, name]
        ax.scatter(bx, t.loc[i, key], marker="*", s=250, color="red", zorder=3,
                   label="picked trial" if study.spec.multi else "best trial")
    warning = edge_warning(study, name)
    title = f"{label(study.spec.metric)} against {name}"
    ax.set(title=title + ("\n(best at the edge of the range)" if warning else ""),
           xlabel=label(name) + (" (log scale)" if not categorical and _log_scaled(p) else ""),
           ylabel=f"best {label(study.spec.metric)} of the trial")
    ax.grid(alpha=0.3)
    return _save(fig, out / f"param_{name}.png")


def plot_parallel(study: results.Study, out: Path) -> Path | None:
    """One line per trial across the searched parameters (scaled to [0, 1]), coloured by the objective."""
    t = study.ranked()
    names = list(study.spec.space)
    if len(t) < 2 or not names:
        return None
    key = study.objective_column
    cols, ticks = [], []
    for name in names:
        p = study.spec.space[name]
        v = t[name]
        if p.get("type") == "categorical":
            choices = p["choices"]
            idx = v.map(lambda c: choices.index(c) if c in choices else np.nan)
            cols.append(idx / max(len(choices) - 1, 1))
            ticks.append([str(c) for c in choices])
        else:
            vv = np.log10(v.astype(float)) if _log_scaled(p) else v.astype(float)
            lo, hi = vv.min(), vv.max()
            cols.append((vv - lo) / (hi - lo) if hi > lo else vv * 0 + 0.5)
            fmt = (lambda z: f"{10 ** z:.3g}") if _log_scaled(p) else (lambda z: f"{z:.3g}")
            ticks.append([fmt(lo), fmt(hi)] if hi > lo else [fmt(lo)])
    y = np.vstack(cols).T
    obj = t[key].to_numpy()
    norm = plt.Normalize(np.nanmin(obj), np.nanmax(obj))
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(names)), 5))
    for row, o in zip(y[::-1], obj[::-1]):  # best drawn last, on top
        ax.plot(range(len(names)), row, color=cmap(norm(o)), alpha=0.8, lw=1.5)
    for i, tk in enumerate(ticks):
        ax.axvline(i, color="black", lw=0.8)
        ax.text(i, -0.06, tk[0], ha="center", va="top", fontsize=8)
        ax.text(i, 1.06, tk[-1], ha="center", va="bottom", fontsize=8)
        if len(tk) > 2:
            for j, name in enumerate(tk[1:-1], start=1):
                ax.text(i + 0.03, j / (len(tk) - 1), name, fontsize=8, va="center")
    ax.set_xticks(range(len(names)), [label(n) for n in names])
    ax.set_yticks([])
    ax.set_ylim(-0.15, 1.15)
    ax.set_title("searched parameters of every trial (line colour: objective; axis ends: range seen)")
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=f"best {label(study.spec.metric)}")
    return _save(fig, out / "parallel.png")


def importances(study: results.Study) -> tuple[dict | None, str | None]:
    """Optuna's parameter importances on the stored study; (None, reason) when it cannot."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    db = study.location / "optuna.db"
    if not db.is_file():
        return None, "no optuna.db"
    import tempfile

    try:
        with tempfile.TemporaryDirectory() as tmp:  # SQLite reads a local file: copy one behind a URI
            local = db.local or Path(tmp) / "optuna.db"
            if db.local is None:
                local.write_bytes(db.read_bytes())
            # Read-only: opening an empty or foreign file read-write would write a fresh schema into it.
            s = optuna.load_study(study_name=study.spec.name,
                                  storage=f"sqlite:///file:{local.resolve()}?mode=ro&uri=true")
            done = [t for t in s.trials if t.state == optuna.trial.TrialState.COMPLETE]
            if len(done) < 2:
                return None, f"{len(done)} completed Optuna trial(s); importances need at least 2"
            imp = optuna.importance.get_param_importances(s)
    except Exception as e:  # noqa: BLE001 - a damaged optuna.db (SQLAlchemy, sqlite3 errors): draw the rest
        return None, f"{db}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if not imp:
        return None, "no parameter was sampled in every completed trial"
    return imp, None


def plot_importance(imp: dict, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, max(4, 0.5 * len(imp) + 1.5)))
    names = list(imp)[::-1]
    ax.barh(names, [imp[n] for n in names])
    ax.set(title="parameter importance (Optuna, fANOVA)", xlabel="share of the objective's variance explained")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, out / "importance.png")


def plot_efficiency(study: results.Study, out: Path) -> Path | None:
    """Accuracy against estimated energy and against T, one dot per trial (last
    epoch); the Pareto front in red for multi-objective studies; the tutorial's
    configuration and the best trial marked."""
    acc = study.accuracy_metric  # the first accuracy objective: what selection saw
    t = study.trials
    if t.empty or not {acc, "energy_uj"} <= set(t.columns) or t[[acc, "energy_uj"]].dropna().empty:
        return None
    if "T" not in t:  # T fixed in train: the same for every trial
        t = t.assign(T=study.spec.config({}).T)
    front = results.pareto(t, study.spec) if study.spec.multi else t.iloc[0:0]
    t = t.dropna(subset=[acc, "energy_uj"])
    by_id = t.set_index("trial_id")
    marks = []
    if study.best is not None and study.best["trial_id"] in by_id.index:
        marks.append((by_id.loc[study.best["trial_id"]], dict(marker="*", s=250, color="tab:blue"),
                      "picked trial" if study.spec.multi else "best trial"))
    base = baseline_row(study)
    if base is not None and base["trial_id"] in by_id.index:
        marks.append((by_id.loc[base["trial_id"]], dict(marker="X", s=150, color="black"),
                      "tutorial config (" + ", ".join(f"{k} {v}" for k, v in BASELINE.items()) + ")"))
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, x, xlabel in ((axes[0], "energy_uj", "estimated energy per image (µJ, 45 nm: E_MAC 4.6 pJ, E_AC 0.9 pJ)"),
                          (axes[1], "T", "time steps T")):
        ax.scatter(t[x], t[acc], color="grey", alpha=0.6, label="trials")
        if len(front):
            f = front.sort_values(x)
            ax.plot(f[x], f[acc], color="red", marker="o", lw=1.5, label="Pareto front", ls="-" if x == "energy_uj" else "")
        for row, style, name in marks:
            ax.scatter([row[x]], [row[acc]], zorder=3, label=name, **style)
        ax.set(xlabel=xlabel, ylabel=label(acc))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title(f"{label(acc)} against energy per image")
    axes[1].set_title(f"{label(acc)} against time steps")
    return _save(fig, out / ("pareto.png" if study.spec.multi else "efficiency.png"))


def baseline_row(study: results.Study) -> pd.Series | None:
    """The tutorial's configuration as run in this study (the first trial when search.baseline)."""
    if not study.spec.search.get("baseline") or study.trials.empty:
        return None
    first = study.trials.sort_values("number").iloc[0]
    ok = all(results.missing(first.get(k)) or first[k] == v for k, v in BASELINE.items() if k in study.spec.space)
    return first if ok else None


def plot_baseline(study: results.Study, out: Path) -> Path | None:
    base, best = baseline_row(study), study.best_row
    if best is None:
        return None
    bars = {}
    if base is not None:
        bars["tutorial config\n(trial %s)" % base["trial_id"]] = (base.get("test_acc"), base.get("time_s") / max(base["epochs_run"], 1))
    bars[f"best trial\n({study.best['trial_id']})"] = (best.get("test_acc"), best["time_s"] / max(best["epochs_run"], 1))
    if study.retrain_summary:
        bars["best, retrained\n(mean over seeds)"] = (study.retrain_summary["test_acc_mean"], study.retrain_summary["epoch_s_mean"])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.5))
    names = list(bars)
    a1.bar(names, [bars[n][0] for n in names], color=["grey", "tab:blue", "tab:green"][-len(names):])
    a1.axhline(TUTORIAL_ACC, color="red", ls="--", label=f"tutorial's reported {TUTORIAL_ACC}")
    lo = min(v for v, _ in bars.values() if v is not None)
    a1.set_ylim(max(0, lo - 0.05), 1)
    # The last epoch's value: the best over epochs would be chosen on the test set.
    a1.set(title="test accuracy at the last epoch", ylabel="test accuracy")
    a1.legend(fontsize=8, loc="lower right")
    a2.bar(names, [bars[n][1] for n in names], color=["grey", "tab:blue", "tab:green"][-len(names):])
    a2.set(title="time per epoch", ylabel="seconds per epoch")
    for a in (a1, a2):
        a.tick_params(axis="x", labelsize=8)
        a.grid(axis="y", alpha=0.3)
    fig.suptitle("tutorial configuration, best trial and retrained best (trial runs may use a data subset)")
    return _save(fig, out / "baseline.png")


def summary(study: results.Study) -> list[str]:
    """The top of report.md, and what study.run prints when the search ends."""
    return header(study) + pareto_lines(study) + best_lines(study)


def header(study: results.Study) -> list[str]:
    """What was searched, how, and what became of the trials (errors included)."""
    spec, t = study.spec, study.trials
    wall = t["time_s"].sum() / 60 if len(t) else 0
    lines = [f"# Study `{spec.name}`", "",
             "Objective: " + ", ".join(f"{o['mode']} `{o['metric']}`" for o in spec.objectives)
             + f". Sampler {spec.search['sampler']} (seed {spec.search['seed']}), "
             f"{spec.search['num_samples']} trials planned, scheduler {spec.scheduler['type']}.", "",
             "Searched: " + "; ".join(f"`{n}` {_describe(p)}" for n, p in spec.space.items()) + ".",
             "Fixed: " + ", ".join(f"{k} {v}" for k, v in spec.train.items()) + ".", "",
             f"Trials: {len(t)} — " + ", ".join(f"{n} {ENDED.get(s, s)}" for s, n in study.status_counts().items())
             + quiet_clause(t) + f". Training time summed over trials: {wall:.1f} min."
             + ("" if study.complete else " **The study has not ended.**")]
    lines += [f"- errored trial {r['trial_id']}: {r['error']}" for _, r in study.errored().iterrows()]
    return lines + [""] + graphs_lines(study) + silent_lines(study) + constraint_lines(study) + warm_lines(study)


# how a trial ended (its status), as the header counts it: the silent and dead stops, not the trials silent
# or dead at their last epoch, which quiet_clause counts
ENDED = {"silent": "ended by the silent stop", "dead": "ended by the dead stop"}


def quiet_clause(t: pd.DataFrame) -> str:
    """'; 4 silent at their last epoch (below)': the trials that learned nothing, however they ended."""
    counts = [(int(results.said(t, k).sum()), k) for k in ("silent", "dead")] if len(t) else []
    said = [f"{n} {k}" for n, k in counts if n]
    return f"; {' and '.join(said)} at their last epoch (below)" if said else ""


def graphs_lines(study: results.Study) -> list[str]:
    """The trials whose CUDA graphs were turned off or fell back to eager steps (cuda_graphs_fallback), by reason."""
    t = study.trials
    # (read from trials.csv an all-empty column is float NaN, which pandas will not fill with text)
    why = t["cuda_graphs_fallback"].map(lambda v: "" if results.missing(v) else str(v)) if "cuda_graphs_fallback" in t \
        else pd.Series(dtype=str)
    why = why[why != ""]
    if why.empty:
        return []
    return [f"CUDA graphs off in {len(why)} of {len(t)} trials (they trained with eager steps): "
            + "; ".join(f"{n} × {reason}" for reason, n in why.value_counts().items()) + ".", ""]


def warm_lines(study: results.Study) -> list[str]:
    """Which trials came from where: told to the sampler, and run first, per earlier study."""
    if not study.warm_start:
        return []
    t = study.trials
    lines = ["## Warm start", ""]
    drew, own = study.warm_start.get("seed"), study.spec.search["seed"]
    if drew is not None and drew != own:  # warmstart.seed: an earlier study drew with search.seed
        lines.append(f"- the sampler drew with seed {drew}, not search.seed {own}: an earlier study drew its trials "
                     f"with seed {own}, and the same seed would have asked for its configurations again")
    for src in study.warm_start["sources"]:
        skipped = "; ".join(f"{n} × {why}" for why, n in src["skipped"].items())
        lines.append(f"- from `{src['source']}`: {src['told']} trials told to the sampler before the first trial"
                     + (f" (skipped: {skipped})" if skipped else ""))
        for e in src["enqueued"]:
            ran = t[t["warm_start"] == e["origin"]] if "warm_start" in t else t.iloc[0:0]
            lines.append(f"  - the configuration of {e['origin']} ran first here as "
                         + (f"trial {ran['trial_id'].iloc[0]}" if len(ran) else "a trial not found in this study"))
    return lines + [""]


def silent_lines(study: results.Study) -> list[str]:
    """Where in the space the silent networks were, then the dead ones (each its own section)."""
    rate = study.spec.scheduler["silent_rate"]
    return (learnt_nothing_lines(study, "silent", f"A spiking layer fired below {rate:g} at the trial's last epoch",
                                 "Layers")
            + learnt_nothing_lines(study, "dead", f"The network fired, but predicted one class for at least "
                                   f"{DEAD_SHARE:.1%} of its training images at the trial's last epoch", "Why"))


def constraint_lines(study: results.Study) -> list[str]:
    """The spec's constraints, how many trials broke each at their last epoch, and which trials (the
    trials table's constraint column says how)."""
    c, t = study.spec.constraints, study.trials
    if not c:
        return []
    reported = t[t["status"] != "errored"] if len(t) else t
    hit = results.said(reported, "constraint")
    shown = ", ".join(f"{m} {b} {v:g}" for m, bounds in c.items() for b, v in bounds.items())
    lines = [f"## Constraints: {int(hit.sum())} of {len(reported)} trials broke one", "",
             f"{shown}, at each trial's last epoch (what the sampler is told): a trial that breaks one is told to "
             "the sampler as infeasible, and is never the best trial nor on a Pareto front.", ""]
    values = [broken(c, r)[0] for _, r in reported.iterrows()]
    for m, bounds in c.items():
        for b, v in bounds.items():
            lines.append(f"- `{m}` {b} {v:g}: {sum(x[f'{m}.{b}'] > 0 for x in values)} broke it")
    lines += [f"- trial {r['trial_id']}: {r['constraint']}" for _, r in reported[hit].iterrows()]
    return lines + [""]


def learnt_nothing_lines(study: results.Study, kind: str, what: str, why: str) -> list[str]:
    """Where in the space the trials of `kind` (silent or dead: the trials table's column of that
    name says why) were: per searched parameter, their share at each choice, or the range of
    their values against the others."""
    t = study.trials
    hit = results.said(t, kind)
    those, ended = t[hit], t[t["status"] == kind] if len(t) else t
    if those.empty:
        return []
    planned = sum(study.spec.config({k: r[k] for k in study.spec.space if not results.missing(r[k])}).epochs
                  for _, r in ended.iterrows())
    lines = [f"## {kind.capitalize()} networks: {len(those)} of {len(t)} trials", "",
             f"{what}: {len(ended)} were ended so by the {kind} stop (they ran {int(ended['epochs_run'].sum())} "
             f"epochs of the {planned} planned), the others stopped or finished so. {why}: "
             + ", ".join(f"{n} × {k}" for k, n in those[kind].value_counts().items()) + ".", ""]
    for name in study.spec.space:
        col, others = those[name].dropna(), t.loc[~hit, name].dropna()
        if col.empty:
            continue
        if pd.api.types.is_numeric_dtype(t[name]) and t[name].nunique() > 6:
            lines.append(f"- `{name}`: {kind} at {col.min():.4g} to {col.max():.4g} (median {col.median():.4g}); "
                         + (f"the others {others.min():.4g} to {others.max():.4g}" if len(others) else "no other trial"))
        else:
            counts = t[name].value_counts(dropna=True)
            lines.append(f"- `{name}`: " + ", ".join(f"{_fmt(v)} {int((col == v).sum())}/{n} {kind}"
                                                     for v, n in counts.sort_index().items()))
    return lines + [""]


def pareto_lines(study: results.Study) -> list[str]:
    spec = study.spec
    front = results.pareto(study.trials, spec) if spec.multi else study.trials.iloc[0:0]
    if front.empty:
        return []
    cols = dict.fromkeys(["trial_id", *spec.space, *(o["metric"] for o in spec.objectives), "spikes_per_image",
                          "synops_per_image"])  # once each, also when a cost is an objective
    return [f"## Pareto front of {', '.join(o['mode'] + ' ' + o['metric'] for o in spec.objectives)}: "
            f"{len(front)} trials (objectives at each trial's last epoch)", "",
            "```\n" + front[[c for c in cols if c in front]].to_string(index=False, float_format=lambda v: f"{v:.4g}")
            + "\n```", ""]


def best_lines(study: results.Study) -> list[str]:
    spec, b = study.spec, study.best
    head = [no_learner_line(study), ""] if results.none_learned(study.trials) else []
    if not b and not head and results.nothing_to_pick(study.trials):
        head = [f"**No trial met the constraints**: every trial that reported broke one at its last epoch"
                + (", or learned nothing" if spec.multi else "") + " (the constraints section above says which); "
                "there is no best trial and nothing is retrained. Loosen a constraint, or search where it holds.", ""]
    if not b:
        return head or ["No trial reported the objective: there is no best trial.", ""]
    objs = b["objective"] if spec.multi else [b["objective"]]
    sel = b.get("selection")  # retrain.top_k: chosen among the search's best by the retrain over seeds
    chosen = ([f"Chosen by the retrain over seeds: the {sel['reason']} (the section \"Is the best a lucky seed?\" "
               "below).", ""] if sel else [])
    return head + [f"## Picked trial ({spec.retrain['pick']}): {b['trial_id']}" if spec.multi else f"## Best trial: {b['trial_id']}",
            "", ", ".join(f"{o['metric']} = {o['value']:.4g}" for o in objs) + " with "
            + ", ".join(f"{k} = {_fmt(v)}" for k, v in b["params"].items()) + ".", "", *chosen]


def no_learner_line(study: results.Study) -> str:
    """The line of a study in which no trial learned (results.none_learned): how many were silent and
    dead, why that is, what becomes of the best, and what to change. study.run ends with it (exit 0)."""
    spec, t = study.spec, study.trials
    reported = t[t["status"] != "errored"]
    kinds = [f"{int(results.said(reported, k).sum())} {k}" for k in ("silent", "dead") if results.said(reported, k).any()]
    rate = spec.scheduler["silent_rate"]
    then = ("none is on a Pareto front, so no trial is picked and nothing is retrained" if spec.multi else
            "the best value's trial, which fired no better, is still the best: with all the training images and "
            "the retrain's epochs it may learn")
    return (f"**No trial learned**: all {len(reported)} trials that reported were silent or dead networks at their "
            f"last epoch ({', '.join(kinds)}: a spiking layer fired below scheduler.silent_rate {rate:g}, or the "
            f"network predicted one class for {DEAD_SHARE:.1%} of its training images); their {spec.metric} is "
            f"chance. {then[0].upper() + then[1:]}. Narrow the space toward what learns (a smaller lr first; the "
            "sections above say where they were), train longer, or lower scheduler.silent_rate.")


def retrain_lines(study: results.Study) -> list[str]:
    """The best trial's full TrainConfig and how it did retrained (the report's, not study.run's)."""
    s, b = study.retrain_summary, study.best
    if not b:
        return []
    lines = ["```yaml\n" + "\n".join(f"{k}: {v}" for k, v in b["config"].items()) + "\n```", ""]
    if not s:
        return lines + ["The best configuration has not been retrained (best/ is missing).", ""]
    diff = s["test_acc_mean"] - TUTORIAL_ACC
    images = "the training images less the validation split" if "chosen_by" in s else "all training images"
    return lines + [f"Retrained from scratch on {images} for {s['epochs']} epochs with seeds {s['seeds']}: "
            f"**test accuracy {s['test_acc_mean']:.4f} ± {s['test_acc_std']:.4f}** (mean ± std over seeds, "
            f"last epoch), {'+' if diff >= 0 else ''}{diff:.4f} against the tutorial's {TUTORIAL_ACC} "
            f"({TUTORIAL_TEXT}).", ""]


def lucky_lines(study: results.Study) -> list[str]:
    """retrain.top_k: "Is the best a lucky seed?": per retrained configuration its search score, its validation and
    test scores per seed with mean ± std, whether the search's order held (Spearman's rank correlation of the
    search's scores with the mean validation scores, and which won), and the seeds' spread beside the gaps."""
    per, conf = study.retrained, study.retrained_summary
    if conf is None or per is None:
        return []
    m = conf["selection_metric"].iloc[0]
    searched = results.accuracy_objective(study.spec)["metric"]

    def points(trial, metric):
        return ", ".join(f"{v:.4f}" for v in per[per["trial_id"] == trial].sort_values("seed")[metric])

    rows = [f"| search rank | trial | search {searched} | {m} per seed | {m} mean ± std | test_acc per seed | "
            "test_acc mean ± std | |", "|---|---|---|---|---|---|---|---|"]
    for _, c in conf.iterrows():
        rows.append(f"| {c['search_rank']} | {c['trial_id']} | {c['search_score']:.4f} | {points(c['trial_id'], m)} | "
                    f"{c[f'{m}_mean']:.4f} ± {c[f'{m}_std']:.4f} | {points(c['trial_id'], 'test_acc')} | "
                    f"{c['test_acc_mean']:.4f} ± {c['test_acc_std']:.4f} | {'**chosen**' if c['chosen'] else ''} |")
    won = conf[conf["chosen"]].iloc[0]
    seeds, epochs = study.spec.retrain["seeds"], study.spec.retrain["epochs"]
    out = ["## Is the best a lucky seed?", "",
           f"The search's {len(conf)} best configurations (one seed each in the search) retrained from scratch with "
           f"seeds {seeds} for {epochs} epochs on the training images less the validation split; the study's best is "
           f"the one of highest mean {m} over the seeds at the last epoch (never the test set's).", "", *rows, ""]
    if len(conf) > 1:
        rho = search_order_rho(conf, study.spec)
        held = "held" if won["search_rank"] == 1 else "did not hold"
        means = np.sort(conf[f"{m}_mean"].to_numpy(float))
        gaps, spread = np.diff(means), conf[f"{m}_std"].to_numpy(float)
        out += [f"- The search's order {held}: trial {won['trial_id']}, the search's number {won['search_rank']}, won "
                f"(the search's best, trial {conf['trial_id'].iloc[0]}: {conf[f'{m}_mean'].iloc[0]:.4f}); Spearman's "
                f"rank correlation of the search's {searched} with the mean {m}: "
                + (f"{rho:.2f}" if np.isfinite(rho) else "none (tied scores: no order to compare)")
                + f" over {len(conf)} configurations (1: the same order, -1: the reverse).",
                (f"- Spread across seeds: the std of {m} over the seeds is {spread.min():.4f} to {spread.max():.4f}; the "
                 f"gaps between neighbouring configurations' means are {gaps.min():.4f} to {gaps.max():.4f}"
                 + (": a gap smaller than the spread does not tell those configurations apart with these seeds."
                    if gaps.min() < spread.max() else ": every gap is larger than the spread across seeds.")
                 if len(seeds) > 1 else  # one seed has no spread (its std is written 0): nothing to set the gaps against
                 f"- Spread across seeds: not measured, one seed ({seeds[0]}); the gaps between neighbouring "
                 f"configurations' {m} are {gaps.min():.4f} to {gaps.max():.4f}, and whether they exceed what another seed "
                 "would give is not known: give retrain.seeds two or more (e.g. [0, 1, 2])."), ""]
    cfg = (study.best or {}).get("config", {})
    if cfg.get("seed") in seeds:  # that seed's score is one the search chose on: the winner's curse
        # its run repeats the search trial when it trains on the same images for as many epochs (retrain_fixed)
        repeats = cfg.get("epochs") == epochs and not cfg.get("train_size")
        how = ("repeats each configuration's search trial (the same images, epochs and seed), whose score the "
               "search chose it on: high by selection" if repeats else
               f"starts from the same weights as each configuration's search trial, but is not a repeat of it ("
               f"{epochs} retrain epochs against the trials' {cfg.get('epochs')}"
               + (f", all training images against their {cfg['train_size']}" if cfg.get("train_size") else "")
               + "): it may share some of the luck the search chose on")
        out.insert(len(out) - 1, f"- Seed {cfg['seed']} is the one the search's trials ran with: its run {how}; the "
                   "other seeds' are fresh draws.")
    return out


def search_order_rho(conf: pd.DataFrame, spec) -> float:
    """Spearman's rank correlation (Pearson's of the ranks, ties averaged) of the search's scores with the
    retrain's mean selection metric over the seeds (study.retrained_summary), each ranked better-first by its
    own mode (a loss: lower is better), so that 1 says the search's order held; NaN where either side is tied."""
    m = conf["selection_metric"].iloc[0]
    searched = 1 if results.accuracy_objective(spec)["mode"] != "min" else -1
    chosen = 1 if results.metric_mode(m, spec) != "min" else -1
    a, b = (searched * conf["search_score"]).rank(), (chosen * conf[f"{m}_mean"]).rank()
    return float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")


def plot_lucky(study: results.Study, out: Path) -> Path | None:
    """retrain.top_k: each retrained configuration's validation and test scores, one point a seed, with the
    mean ± std, in the search's order."""
    per, conf = study.retrained, study.retrained_summary
    if conf is None or per is None:
        return None
    m = conf["selection_metric"].iloc[0]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, metric in zip(axes, (m, "test_acc")):
        for x, (_, c) in enumerate(conf.iterrows()):
            v = per[per["trial_id"] == c["trial_id"]][metric].to_numpy(float)
            ax.scatter(np.full(len(v), x), v, color="tab:green" if c["chosen"] else "tab:blue", alpha=0.7)
            ax.errorbar(x + 0.12, v.mean(), yerr=v.std(ddof=1) if len(v) > 1 else 0, fmt="_", color="black",
                        capsize=4)
        ax.set_xticks(range(len(conf)), [f"#{r}\n{t}" for r, t in zip(conf["search_rank"], conf["trial_id"])],
                      fontsize=8)
        ax.set(title=f"{label(metric)} per seed (mean ± std)", xlabel="search rank, trial", ylabel=label(metric))
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("the search's best configurations retrained over seeds (green: chosen by mean validation score)")
    return _save(fig, out / "lucky_seed.png")


def baseline_lines(study: results.Study) -> list[str]:
    base = baseline_row(study)
    if base is None:
        return []
    return [f"The tutorial's configuration ran as trial {base['trial_id']}: best {study.spec.metric} "
            f"{base.get(study.objective_column, float('nan')):.4f}, test accuracy at its last epoch "
            f"{base.get('test_acc', float('nan')):.4f} ({base['status']}).", ""]


def edge_lines(study: results.Study) -> list[str]:
    warnings = [w for w in (edge_warning(study, n) for n in study.spec.space) if w]
    if not warnings:
        return []
    return ["**Warning — the best value lies at the edge of its range; widen the range:**",
            *(f"- {w}" for w in warnings), ""]


def top_lines(study: results.Study, top: int) -> list[str]:
    return [f"## Top {min(top, len(study.ranked()))} trials", "", "```\n" + leaderboard(study, top) + "\n```", ""]


def draw(study: results.Study, top: int, out: Path) -> tuple[dict, list[str]]:
    """Every plot ({title: path, or None when not drawn}) and why some were not drawn."""
    plots = {"learning curves": plot_curves(study, top, out)}
    for name in study.spec.space:
        plots[name] = plot_param(study, name, out)
    plots["parallel coordinates"] = plot_parallel(study, out)
    imp, why = importances(study)
    plots["parameter importance"] = plot_importance(imp, out) if imp else None
    notes = [f"parameter importance not drawn: {why}"] if why else []
    plots["baseline against best"] = plot_baseline(study, out)
    if study.retrained_summary is not None:
        plots["is the best a lucky seed?"] = plot_lucky(study, out)
    plots["Pareto front" if study.spec.multi else "accuracy against energy"] = plot_efficiency(study, out)
    notes += [f"{k}: not drawn (no finished trial reported what it needs)"
              for k, v in plots.items() if v is None and k != "parameter importance"]
    return plots, notes


def plot_lines(plots: dict, notes: list[str]) -> list[str]:
    lines = [f"### {k}\n\n![{k}]({v.name})\n" for k, v in plots.items() if v is not None]
    return lines + (["## Not drawn", *(f"- {n}" for n in notes)] if notes else [])


def report(study: results.Study, top: int, out: Path | None = None) -> Path | str:
    """report/report.md (or `out`/report.md), the study on one page, and its plots; a study behind a
    URI gets them drawn locally, then copied there."""
    if out is not None or study.location.local is not None:
        out = out or study.location.local / "report"
        out.mkdir(parents=True, exist_ok=True)
        return _report(study, top, out)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="csnn-report-") as tmp:
        _report(study, top, Path(tmp))
        (study.location / "report").upload(Path(tmp))
    return str(study.location / "report" / "report.md")


def _report(study: results.Study, top: int, out: Path) -> Path:
    plots, notes = draw(study, top, out)
    lines = (summary(study) + retrain_lines(study) + lucky_lines(study) + baseline_lines(study) + edge_lines(study)
             + estimate.report_lines(study.location) + time_lines(study) + top_lines(study, top) + plot_lines(plots, notes)
             + environment_lines(study))
    path = out / "report.md"
    write_atomic(path, "\n".join(lines) + "\n")
    return path


# csnn.config.TIME_PARTS in words, in their order
TIME_WORDS = {"setup_s": "set-up (data sliced, network built, CUDA graphs captured)", "train_s": "training images",
              "val_s": "validation", "test_s": "test evaluation", "cost_s": "cost counting (spikes, SynOps, energy)",
              "checkpoint_s": "checkpoints", "report_s": "reports (tune.report, checkpoint copied to storage)"}


def time_lines(study: results.Study) -> list[str]:
    """Where the trials' time went (results.time_breakdown), and the share of the study's time, on its
    trial slots, that trained images."""
    parts = results.time_breakdown(study.history, study.retrain if study.retrained_summary is None
                                   else results.retrain_table(study.location))
    if not parts:
        return []
    phases = list(parts)
    total = {k: sum(parts[p][k] for p in phases) for k in TIME_WORDS}
    whole = sum(total.values()) or 1.0
    rows = [f"| part | {' | '.join(f'{p} s' for p in phases)} | share |", "|---" * (len(phases) + 2) + "|"]
    rows += [f"| {w} | {' | '.join(f'{parts[p][k]:.1f}' for p in phases)} | {total[k] / whole:.0%} |"
             for k, w in TIME_WORDS.items()]
    rows.append(f"| **trials' time** | {' | '.join(f'{sum(parts[p].values()):.1f}' for p in phases)} | |")
    line = f"Training images took {total['train_s'] / whole:.0%} of the trials' time"
    try:
        timing = yamlio.load((study.location / "timing.yaml").read_text())
        est = yamlio.load((study.location / "estimate.yaml").read_text())
        slots = {"search": est["running"], "retrain": len(study.spec.retrain["seeds"]) * (
            len(study.retrained_summary) if study.retrained_summary is not None else 1)}
        # the study's time as trial slots: the search's wall time x its trials at once, the retrain's x its seeds,
        # the other phases (start, export, spikes) once
        held = sum(s * slots.get(p, 1) for p, s in timing["phases_s"].items())
        line += (f", and {total['train_s'] / held:.0%} of the study's time ({timing['wall_s']:.0f} s of wall time, "
                 f"{slots['search']} trials at once in the search, {slots['retrain']} "
                 f"{'runs' if study.retrained_summary is not None else 'seeds'} in the retrain)")
    except (OSError, KeyError, TypeError, AttributeError, ValueError):  # no timing.yaml or estimate.yaml: the trials' share alone
        pass
    return ["## Where the trials' time went", "", *rows, "", line + ".", ""]


def environment_lines(study: results.Study) -> list[str]:
    """What the study ran on (environment.yaml), on one line per part."""
    env = study.environment
    if not env:
        return []
    commit = env.get("git_commit")
    gpus = env.get("gpus") or []
    return ["## Environment", "",
            f"- Python {env.get('python')}; " + ", ".join(f"{k} {v}" for k, v in (env.get("packages") or {}).items()),
            f"- torch's CUDA build {env.get('torch_cuda') or 'none (CPU)'}, cuDNN {env.get('cudnn') or '-'}, "
            f"NVIDIA driver {env.get('nvidia_driver') or '-'}",
            f"- {env.get('cpus')} CPUs, GPUs: {', '.join(gpus) if gpus else 'none'}; {env.get('platform')}",
            f"- code: git {commit[:12]}{' with uncommitted changes' if env.get('git_dirty') else ''}" if commit
            else "- code: not a git checkout", ""]


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _describe(p: dict) -> str:
    if "depends_on" in p:
        return "by " + p["depends_on"] + ": " + ", ".join(f"{c}: {_describe(d)}" for c, d in p["cases"].items())
    if p["type"] == "categorical":
        return "in " + str(p["choices"])
    return f"{p['type']} [{p['low']}, {p['high']}]" + (" log" if p.get("log") else "")


def compare(a: results.Study, b: results.Study) -> list[str]:
    """Two studies of the same objectives: what their fronts cover and what they cost."""
    show = lambda s: ", ".join(f"{o['mode']} {o['metric']}" for o in s.spec.objectives)  # noqa: E731
    if a.spec.objectives != b.spec.objectives:
        raise results.StudyError(f"{b.path}: optimises {show(b)}, {a.path} {show(a)}: not comparable")
    epochs = [int(s.trials["epochs_run"].sum()) if len(s.trials) else 0 for s in (a, b)]
    out = [f"note: {s.path} has not ended: its figures are of the trials so far" for s in (a, b) if not s.complete]
    out.append(f"trial-epochs: {a.spec.name} {epochs[0]}, {b.spec.name} {epochs[1]}"
               + (f" (ratio {epochs[0] / epochs[1]:.3f})" if epochs[1] else ""))
    if a.spec.multi:
        hv = results.hypervolumes([a, b], a.spec)
        out.append(f"hypervolume of the Pareto front: {a.spec.name} {hv[0]:.4f}, {b.spec.name} {hv[1]:.4f} "
                   f"(ratio {hv[0] / hv[1] if hv[1] else float('nan'):.4f}; each objective scaled to [0, 1] between the "
                   "best and worst values on the two fronts, reference point 1.1)")
    else:
        vals = [s.best["objective"]["value"] if s.best else float("nan") for s in (a, b)]
        out.append(f"best {a.spec.metric}: {a.spec.name} {vals[0]:.4f}, {b.spec.name} {vals[1]:.4f}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m study.analyze", description=__doc__.split("\n")[0])
    ap.add_argument("study", help="the study folder, results/<name>")
    ap.add_argument("--top", type=positive_int, default=5, help="trials in the leaderboard and the learning curves")
    ap.add_argument("--out", metavar="DIR", default=None,
                    help="write the report there (default: the study's report/; e.g. for a study you may only read)")
    ap.add_argument("--against", metavar="STUDY_DIR", default=None,
                    help="compare with another study of the same objectives (e.g. the same space without early "
                         "stopping): hypervolume of the fronts and trial-epochs each used; writes no report")
    args = ap.parse_args(argv)
    try:
        study = results.load(args.study)
        state = lifecycle.read(study.location)
        if lifecycle.decide(state, lifecycle.ANALYZE).action == "refuse":  # writing report/ there would make it foreign
            raise results.StudyError(f"{study.path} holds {lifecycle.STATES[state]}: nothing to read yet")
        try:
            held = lifecycle.holder(study.location)
        except lifecycle.Locked as e:  # a damaged lock: reading needs none; say how to remove it
            print(f"warning: {e}", file=sys.stderr)
            held = None
        nothing = unreported(study, state, held)
        if nothing:
            raise results.StudyError(nothing)
        if args.against:
            print("\n".join(compare(study, results.load(args.against))))
            return 0
    except results.StudyError as e:
        print(f"error: {spelled(str(e), '--')}", file=sys.stderr)
        return 2
    if held is not None:  # an ended study's search is whole: what runs there is a --retrain or a reproduction
        print(f"note: {study.path} is being written by {held}: "
              + ("this is the study so far" if state == "interrupted" else
                 "its search has ended; what that process writes (a retrain, a reproduction) is not all here yet"))
    print(f"trials read from {study.trials_file or study.path / 'ray'}")
    print(leaderboard(study, args.top))
    out = Path(args.out).expanduser() if args.out else None
    where = out if out is not None else study.location / "report"
    if (out is not None and out.is_file()) or (out is None and where.is_file()):
        print(f"error: {where}: is a file, where the report folder goes; move it away", file=sys.stderr)
        return 2
    try:
        path = report(study, args.top, out)
    except OSError as e:  # a study one may only read (someone else's), or a full disk: the leaderboard is above
        if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT):
            raise
        why = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "it cannot be written here"
        print(f"error: the report could not be written in {where} ({why}: {e.strerror}); the leaderboard is above; "
              f"write the report elsewhere: python -m study.analyze {study.path} --out DIR", file=sys.stderr)
        return 1
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    leave(interruptible(main, "study.analyze", "the report in report/ may be incomplete; run it again"))
