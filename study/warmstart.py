"""--warm-start OTHER_STUDY_DIR: a study that starts from what earlier studies found.

The ended trials of each earlier study whose parameters lie in this space, and
that trained with this study's fixed settings (epochs, data sizes, seeds, ...),
are told to this study's Optuna sampler before its first trial (Optuna's
add_trials: the sampler learns from them, Ray runs none of them again); the
earlier study's best configuration (its Pareto set, with several objectives) is
enqueued to run first. What was told, skipped and why, and enqueued is kept in
STUDY/warm_start.yaml, which the report reads.

A sampler draws its random start-up from its seed: with the seed an earlier study drew with, the
warm-started study would ask for that study's configurations again, in the same order. Its sampler
takes the first seed after its own that no earlier study drew with (seed), and says so.
"""
from __future__ import annotations

from collections import Counter

import yaml

from csnn.config import TrainConfig
from study import results
from study.spec import StudySpec, broken, define_by_run

TOLD = ("finished", "stopped", "silent", "dead")  # trials that reported their objectives; errored/unfinished are skipped


class WarmStartError(ValueError):
    """An earlier study that cannot warm-start this one; the message names it."""


class _Given:
    """An Optuna trial for the spec's define-by-run function that answers with given values: it walks the
    space in its dependency order and records Optuna's names and distributions, or
    raises ValueError when a value is missing or outside the space."""

    def __init__(self, values: dict):
        self.values, self.params, self.distributions = values, {}, {}

    def _take(self, oname: str, dist):
        name = oname.split("[")[0]
        v = self.values.get(name)
        if results.missing(v):
            raise ValueError(f"no {name}")
        v = v.item() if hasattr(v, "item") else v  # numpy scalars from the trials table
        if isinstance(v, float) and v.is_integer() and type(dist).__name__ == "IntDistribution":
            v = int(v)  # a csv column with empty cells reads integers as floats
        try:
            inside = dist._contains(dist.to_internal_repr(v))
        except ValueError:
            inside = False
        if not inside:
            raise ValueError(f"{name} {v} is outside this space")
        self.params[oname], self.distributions[oname] = v, dist
        return v

    def suggest_categorical(self, name, choices):
        from optuna.distributions import CategoricalDistribution

        return self._take(name, CategoricalDistribution(choices))

    def suggest_int(self, name, low, high, step=1, log=False):
        from optuna.distributions import IntDistribution

        return self._take(name, IntDistribution(low, high, log=log, step=step))

    def suggest_float(self, name, low, high, step=None, log=False):
        from optuna.distributions import FloatDistribution

        return self._take(name, FloatDistribution(low, high, log=log, step=step))


def _fit(spec: StudySpec, values: dict, config: dict | None) -> tuple[_Given | None, str]:
    """(the values under Optuna's names, '') when a trial of another study can stand
    for one of this study, else (None, why not)."""
    given = _Given({**(config or {}), **values})  # a field fixed there may be searched here
    try:
        fields = define_by_run(spec)(given)
    except ValueError as e:
        return None, str(e)
    if config is not None:
        diff = TrainConfig.from_dict(config).differences(spec.config(fields))
        if diff:
            return None, ", ".join(f"{k} {a} there, {b} here" for k, (a, b) in sorted(diff.items()))
    return given, ""


def _usable(spec: StudySpec, row, metrics: list[str], data_sha: str) -> tuple[_Given | None, str]:
    """(_fit's answer) for one trial of an earlier study: (None, why) when it reported no
    objective, trained on other images than `data_sha`, or does not fit this study."""
    if row["status"] not in TOLD or any(results.missing(row.get(m)) for m in metrics):
        return None, f"{row['status']}: no objective values"
    was = row.get("data_sha")
    if data_sha and isinstance(was, str) and was and was != data_sha:
        return None, "trained on other images (data fingerprint)"
    return _fit(spec, row.to_dict(), yaml.safe_load(row["config"]))


def told_constraints(spec: StudySpec, row) -> dict:
    """An earlier trial's constraints as SilentAwareOptunaSearch tells them, every one: infeasible as there
    where a layer was silent or the network dead at its last epoch (the silent and dead columns), and
    where its last epoch breaks this study's constraints (its own may have been others)."""
    return {**{k: 1.0 if isinstance(row.get(k), str) and row[k] else 0.0 for k in ("silent", "dead")},
            **broken(spec.constraints, row)[0]}


def plan(spec: StudySpec, sources: list[str], data_sha: str = "") -> list[dict]:
    """What each earlier study gives this one: {source, told: [FrozenTrial], skipped:
    {reason: count}, enqueue: [{params, origin}]}. Raises WarmStartError for a folder
    that is not an ended study, or one optimised for other objectives. Trials trained
    on other images than `data_sha` (the data's fingerprint) are skipped."""
    import optuna

    out = []
    for src in sources:
        try:
            other = results.load(src)
        except results.StudyError as e:
            raise WarmStartError(f"--warm-start {src}: {e}") from None
        if not other.complete:
            raise WarmStartError(f"--warm-start {src}: the study has not ended (no trials.csv); finish it first "
                                 f"(python -m study.run ... --resume), or leave it out")
        if other.spec.objectives != spec.objectives:
            show = lambda s: ", ".join(f"{o['mode']} {o['metric']}" for o in s.objectives)  # noqa: E731
            raise WarmStartError(f"--warm-start {src}: it optimised {show(other.spec)}, this study {show(spec)}; its "
                                 "values mean something else here (and its scheduler stopped trials by them)")
        metrics = [o["metric"] for o in spec.objectives]
        fits = {row["trial_id"]: _usable(spec, row, metrics, data_sha) for _, row in other.trials.iterrows()}
        told, skipped = [], Counter(why for given, why in fits.values() if given is None)
        for _, row in other.trials.iterrows():
            given = fits[row["trial_id"]][0]
            if given is not None:
                told.append(optuna.trial.create_trial(
                    params=given.params, distributions=given.distributions,
                    values=[float(row[m]) for m in metrics],  # each trial's last report, as OptunaSearch tells it
                    user_attrs={"warm_start": f"{other.path} trial {row['trial_id']}"},
                    constraints=told_constraints(spec, row)))
        best = (other.best or {}).get("pareto") or ([other.best] if other.best else [])
        enqueue = []
        for b in best[: max(1, spec.search["num_samples"] // 2)]:  # the search still explores
            given, why = fits[b["trial_id"]]
            if given is not None:
                enqueue.append({"params": given.params, "origin": f"{other.path} trial {b['trial_id']}"})
            else:
                skipped[f"best trial {b['trial_id']} not enqueued: {why}"] += 1
        drew = (other.warm_start or {}).get("seed", other.spec.search["seed"])  # the seed its sampler drew with
        out.append({"source": str(other.path), "told": told, "skipped": dict(skipped), "enqueue": enqueue,
                    "seed": drew, "own_seed": spec.search["seed"]})
    return out


def seed(planned: list[dict], own: int) -> int:
    """The seed of a warm-started study's sampler: its own (`own`, search.seed), or the first after it
    that no earlier study in `planned` drew with (the same seed would draw the same configurations)."""
    used = {p["seed"] for p in planned}
    while own in used:
        own += 1
    return own


def lines(planned: list[dict]) -> list[str]:
    """What the warm start does, a line per earlier study (study.run and --dry-run print them)."""
    out = []
    for p in planned:
        skipped = "; ".join(f"{n} × {why}" for why, n in p["skipped"].items())
        out.append(f"warm start from {p['source']}: {len(p['told'])} trials told to the sampler, "
                   f"{len(p['enqueue'])} best configuration(s) run first" + (f"; skipped {skipped}" if skipped else ""))
    if planned and seed(planned, planned[0]["own_seed"]) != planned[0]["own_seed"]:
        own, used = planned[0]["own_seed"], seed(planned, planned[0]["own_seed"])
        drew = ", ".join(p["source"] for p in planned if p["seed"] == own)
        out.append(f"warm start: the sampler draws with seed {used}, not search.seed {own}: {drew} drew its trials "
                   f"with seed {own}, and the same seed would ask for its configurations again")
    return out


def apply(optuna_study, planned: list[dict]) -> dict:
    """Tell and enqueue into a new Optuna study; return what warm_start.yaml records (with the seed
    its sampler draws with: seed())."""
    for p in planned:
        optuna_study.add_trials(p["told"])
        for e in p["enqueue"]:
            optuna_study.enqueue_trial(e["params"], user_attrs={"warm_start": e["origin"]})
    return {"seed": seed(planned, planned[0]["own_seed"]) if planned else None,
            "sources": [{"source": p["source"], "told": len(p["told"]), "skipped": p["skipped"],
                         "enqueued": p["enqueue"], "seed": p["seed"]} for p in planned]}
