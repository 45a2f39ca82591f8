"""A study's YAML file -> a validated StudySpec, and the define-by-run search space it describes.

Every error names the file, the key path (space.lr.cases.adam.low) and what is allowed.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from csnn import yamlio
from csnn.config import (COST_METRICS, METRICS, NETWORK_FIELDS, NEURONS, PREDICTION_METRICS, TUTORIAL, TrainConfig,
                          check_runnable, yaml_number_hint)

TOP_KEYS = {"name": True, "objective": True, "train": False, "space": True, "search": False,
            "scheduler": False, "resources": False, "retrain": False, "render": False, "constraints": False}
SAMPLERS = ("tpe", "random", "qmc", "gp", "nsga2")
NAME_FORBIDDEN = "/\\?#%&*:;\"'<>|` "  # read otherwise by a URL, a shell or a file system
PICKS = "most_accurate, knee or index N"
SCHEDULERS = ("asha", "none")
# What a study can optimise: every reported metric but the epoch counter and the
# scheduled learning rate, which no trial controls, the test set's (see _objectives), and the
# predicted class (a label and its share: what tells a dead network, not a goal).
OBJECTIVE_METRICS = tuple(m for m in METRICS if m not in ("epoch", "lr", *PREDICTION_METRICS)
                          and not m.startswith("test_"))
DIST_TYPES = ("int", "float", "categorical")
# The tutorial's configuration, enqueued as the first trial when search.baseline is true.
BASELINE = {k: TUTORIAL[k] for k in ("T", "channels", "optimizer", "lr", "momentum")}
BASELINE.update({k: getattr(TrainConfig(), k) for k in ("augment", "loss")})  # the tutorial's: none, mse
# The tutorial's network (TrainConfig's defaults); alpha by value, atan's own 2.0, so that a searched range admits it.
BASELINE.update({k: getattr(TrainConfig(), k) for k in ("neuron", "tau", "v_threshold", "detach_reset", "surrogate",
                                                         "pooling", "dropout")}, alpha=2.0)
DEFAULTS = {
    "search": {"sampler": "tpe", "seed": 0, "num_samples": 16, "max_concurrent": 0, "baseline": False, "in_order": False},
    # silent_rate: a trial ends as silent when a spiking layer fires below it two epochs in a row, and as
    # dead when it predicts one class for every training image two epochs in a row (0: neither)
    "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 3, "silent_rate": 0.001},
    # gpus_per_trial auto: an equal share per trial that spreads the concurrent
    # trials over every GPU of the cluster, at most trials_per_gpu on one GPU
    # (Ray packs fractional requests onto as few GPUs as it can). checkpoint_every:
    # epochs between checkpoints copied to storage (also at ASHA's rungs and the end).
    "resources": {"gpus_per_trial": 0.0, "cpus_per_trial": 1.0, "trials_per_gpu": 4, "checkpoint_every": 4},
    # top_k: the best configurations retrained with every seed, the study's best then the one of highest mean
    # validation score over the seeds (1: the search's best alone, trained on train + validation)
    "retrain": {"epochs": None, "seeds": [0], "pick": "most_accurate", "top_k": 1},
    "render": {"images": 4},
}


class SpecError(ValueError):
    pass


@dataclass
class StudySpec:
    name: str
    objectives: list  # [{metric, mode}]: one, or several for a multi-objective (Pareto) study
    train: dict  # fixed TrainConfig fields
    space: dict  # field -> {type, low, high, step, log, choices} | {depends_on, cases}, optional when
    search: dict
    scheduler: dict
    resources: dict
    retrain: dict
    render: dict
    path: str = ""
    # {metric: {min, max}}: limits a trial's last report must keep, else it is infeasible (broken); {}: none
    constraints: dict = dataclasses.field(default_factory=dict)

    @property
    def max_epochs(self) -> int:
        """The most epochs a trial trains: the fixed epochs, or the largest searched (ASHA's max_t)."""
        return max(values(self, "epochs"))

    @property
    def metric(self) -> str:
        """The first objective's metric: the one ASHA and single-objective studies use."""
        return self.objectives[0]["metric"]

    @property
    def mode(self) -> str:
        return self.objectives[0]["mode"]

    @property
    def multi(self) -> bool:
        return len(self.objectives) > 1

    def to_dict(self) -> dict:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("objectives", "path", "constraints")}
        return {"name": d.pop("name"), "objective": self.objectives if self.multi else self.objectives[0],
                "constraints": dict(self.constraints), **d}

    def config(self, params: dict, **overrides) -> TrainConfig:
        """The TrainConfig of one trial: the fixed fields, the sampled ones, then overrides."""
        return TrainConfig.from_dict({**self.train, **{k: params[k] for k in self.space if k in params}, **overrides})


def _err(where, key: str, msg: str):
    return SpecError(f"{where}: {key}: {msg}")


def _mapping(where, key, value, allowed: dict | None = None) -> dict:
    """value must be a mapping; with `allowed` ({key: required}), check its keys."""
    if not isinstance(value, dict):
        raise _err(where, key, f"must be a mapping, got {value!r}")
    if allowed is not None:
        for k in value:
            if k not in allowed:
                raise _err(where, f"{key}.{k}" if key else k, f"unknown key; allowed: {', '.join(allowed)}")
        for k, required in allowed.items():
            if required and k not in value:
                raise _err(where, f"{key}.{k}" if key else k, "missing (required)")
    return value


MAX_SAMPLES = 100_000  # trials in one study: Ray Tune keeps every one in memory and in its state file
MAX_RUNGS = 1_000  # successive halving's rungs: a reduction_factor just above 1 would make billions


def _number(where, key, value, integer=False, minimum=None, above=None, auto=False, maximum=None):
    if auto and value == "auto":
        return value
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok:
        raise _err(where, key, f"{value!r} is not allowed; must be {'an integer' if integer else 'a number'}"
                   + (" or auto" if auto else "") + yaml_number_hint(value))
    if not math.isfinite(value):
        raise _err(where, key, f"{value!r} is not allowed; must be a finite number")
    if minimum is not None and value < minimum:
        raise _err(where, key, f"{value!r} is not allowed; must be >= {minimum}")
    if above is not None and not value > above:
        raise _err(where, key, f"{value!r} is not allowed; must be > {above}")
    if maximum is not None and value > maximum:
        raise _err(where, key, f"{value!r} is not allowed; must be <= {maximum:,}")
    return value


def _check_value(where, key, train, name, value):
    """A value a parameter can take must make a valid TrainConfig."""
    try:
        TrainConfig.from_dict({**train, name: value})
    except (ValueError, TypeError) as e:
        raise _err(where, key, f"{value!r} is not allowed for {name}: {e}") from None


def _distribution(where, key, d, train, name) -> dict:
    _mapping(where, key, d)
    kind = d.get("type")
    if kind not in DIST_TYPES:
        raise _err(where, f"{key}.type", f"{kind!r} is not allowed; allowed: {', '.join(DIST_TYPES)}")
    if kind == "categorical":
        _mapping(where, key, d, {"type": True, "choices": True, "when": False})
        choices = d["choices"]
        if not isinstance(choices, list) or not choices:
            raise _err(where, f"{key}.choices", f"must be a non-empty list, got {choices!r}")
        for i, c in enumerate(choices):
            _check_value(where, f"{key}.choices[{i}]", train, name, c)
            same = [j for j, o in enumerate(choices[:i]) if o == c and type(o) is type(c)]
            if same:  # Optuna would sample it twice as often, and the report would count it apart
                raise _err(where, f"{key}.choices[{i}]", f"{c!r} is given twice (also choices[{same[0]}]); keep one")
        return {"type": kind, "choices": list(choices)}
    _mapping(where, key, d, {"type": True, "low": True, "high": True, "step": False, "log": False, "when": False})
    integer = kind == "int"
    low = _number(where, f"{key}.low", d["low"], integer)
    high = _number(where, f"{key}.high", d["high"], integer)
    if low >= high:
        raise _err(where, f"{key}.low", f"low {low} must be below high {high}")
    log = d.get("log", False)
    if not isinstance(log, bool):
        raise _err(where, f"{key}.log", f"{log!r} is not allowed; must be true or false")
    if log and low <= 0:
        raise _err(where, f"{key}.low", f"{low} is not allowed with log: true; must be > 0")
    out = {"type": kind, "low": low, "high": high, "log": log}
    if "step" in d:
        step = out["step"] = _number(where, f"{key}.step", d["step"], integer, above=0)
        if log:
            raise _err(where, f"{key}.step", "step and log: true cannot be combined (Optuna's rule); drop one")
        # Optuna would quietly lower high to the last step it reaches: say so instead.
        n = (high - low) / step
        if abs(n - round(n)) > 1e-9 * max(1.0, abs(n)):
            if n < 1:
                raise _err(where, f"{key}.step", f"{step} is larger than the range {low}..{high}; use a step that divides it")
            valid = low + math.floor(n + 1e-9) * step
            raise _err(where, f"{key}.step", f"{step} does not divide the range {low}..{high}; the nearest valid "
                       f"high is {valid if integer else round(valid, 12)} (or use a step that divides the range)")
    for bound in ("low", "high"):
        _check_value(where, f"{key}.{bound}", train, name, out[bound])
    return out


def _parse_space(where, space, train) -> dict:
    """Parse every parameter; the result is ordered so that a parameter comes
    after those its depends_on/when name (the order they are sampled in)."""
    _mapping(where, "space", space)
    if not space:
        raise _err(where, "space", "is empty; search at least one TrainConfig field")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    out: dict = {}
    pending = dict(space)
    while pending:
        ready = [n for n, p in pending.items()
                 if all(d in out or d not in space for d in _deps(p))]
        if not ready:
            raise _err(where, f"space.{next(iter(pending))}", "depends_on/when form a cycle among "
                       + ", ".join(pending))
        for name in ready:
            p = pending.pop(name)
            key = f"space.{name}"
            if name not in fields:
                raise _err(where, key, f"TrainConfig has no field {name!r}; fields: {', '.join(sorted(fields))}")
            if name in train:
                raise _err(where, key, f"{name} is both fixed in train and searched in space; keep one")
            out[name] = _parameter(where, key, name, p, out, train)
    return out


# Fields whose values TrainConfig checks together (backend cupy runs only the tutorial's neuron).
COMBINED = ("backend", *NETWORK_FIELDS)
MAX_COMBINATIONS = 100_000


def _check_combinations(where, train, space) -> None:
    """Values each allowed alone may not run together: every combination of the searched values
    (choices, or a range's bounds) of the COMBINED fields must make a TrainConfig. One searched field
    against the fixed ones is _check_value's; this is for two or more searched."""
    names = [n for n in COMBINED if n in space]
    if len(names) < 2:
        return
    spec_values = {n: values_of(space[n]) for n in names}
    if math.prod(len(v) for v in spec_values.values()) > MAX_COMBINATIONS:
        return  # Optuna samples them; a trial that cannot run fails alone, with TrainConfig's reason
    for combo in itertools.product(*spec_values.values()):
        params = dict(zip(names, combo))
        if not all(params[k] in v for n in names for k, v in space[n].get("when", {}).items() if k in params):
            continue  # a when among them that keeps this combination from being sampled
        try:
            TrainConfig.from_dict({**train, **params})
        except (ValueError, TypeError) as e:
            shown = ", ".join(f"{n} {v!r}" for n, v in params.items())
            raise _err(where, "space", f"{shown} can be sampled together and cannot run: {e}; "
                       "remove a choice, or tie them with when") from None


def _check_tau_used(where, train, space) -> None:
    """tau (LIF's time constant, PLIF's initial one: NEURONS' tau_arg) given where no trial's neuron has one:
    fixed in train, or searched, while every neuron the study can take is IF, or searched only `when` the
    neuron is if. TrainConfig would take it and ignore it: a study that seems to vary tau and varies nothing."""
    if "tau" not in train and "tau" not in space:
        return
    neurons = values_of(space["neuron"]) if "neuron" in space else [TrainConfig.from_dict(train).neuron]
    leaky = [n for n in neurons if NEURONS[n]["tau_arg"]]
    source = "searched in space.neuron" if "neuron" in space else \
        ("fixed in train.neuron" if "neuron" in train else "the default, as train.neuron is not given")
    if not leaky:
        key = "space.tau" if "tau" in space else "train.tau"
        raise _err(where, key, f"tau is the time constant of the lif and plif neurons, and every trial's neuron is "
                   f"{' or '.join(map(str, dict.fromkeys(neurons)))} ({source}), which has none: the trials would "
                   f"ignore it; set neuron to lif or plif (train.neuron, or search it in space.neuron), or remove {key}")
    when = space.get("tau", {}).get("when", {}).get("neuron")
    if when is not None and not [n for n in when if NEURONS[n]["tau_arg"]]:
        raise _err(where, "space.tau.when.neuron", f"{when} has no neuron with a time constant: tau would be sampled "
                   f"only for trials that ignore it; give {', '.join(n for n in leaky)} (the leaky neurons of "
                   "space.neuron) instead")


def values_of(p: dict) -> list:
    """The choices or range bounds of one parsed parameter (every case of a conditional one)."""
    out = []
    for d in p["cases"].values() if "depends_on" in p else [p]:
        out += d["choices"] if d["type"] == "categorical" else [d["low"], d["high"]]
    return out


def _deps(p) -> list:
    if not isinstance(p, dict):
        return []
    when = p.get("when")
    return ([p["depends_on"]] if "depends_on" in p else []) + (list(when) if isinstance(when, dict) else [])


def _categorical_parent(where, key, dep, out) -> dict:
    parent = out.get(dep)
    if parent is None or parent.get("type") != "categorical":
        names = ", ".join(k for k, v in out.items() if v.get("type") == "categorical") or "none"
        raise _err(where, key, f"{dep!r} is not allowed; must name a categorical parameter of space ({names})")
    return parent


def _parameter(where, key, name, p, out, train) -> dict:
    _mapping(where, key, p)
    if "depends_on" in p:
        _mapping(where, key, p, {"depends_on": True, "cases": True, "when": False})
        dep = p["depends_on"]
        parent = _categorical_parent(where, f"{key}.depends_on", dep, out)
        cases = _mapping(where, f"{key}.cases", p["cases"])
        for value in cases:
            if value not in parent["choices"]:
                raise _err(where, f"{key}.cases.{value}", f"{dep} cannot take {value!r}; its choices: {parent['choices']}")
        missing = [c for c in parent["choices"] if c not in cases]
        if missing:
            raise _err(where, f"{key}.cases", f"no case for {dep} = {', '.join(map(str, missing))}; give one per choice")
        entry = {"depends_on": dep, "cases": {v: _distribution(where, f"{key}.cases.{v}", d, train, name)
                                              for v, d in cases.items()}}
    else:
        entry = _distribution(where, key, p, train, name)
    if "when" in p:
        when = _mapping(where, f"{key}.when", p["when"])
        if not when:
            raise _err(where, f"{key}.when", "is empty; name a parameter and its value(s)")
        for dep, values in when.items():
            parent = _categorical_parent(where, f"{key}.when.{dep}", dep, out)
            if values == []:
                raise _err(where, f"{key}.when.{dep}", f"[] can never hold: {name} would never be sampled; "
                                                      f"give one or more of {parent['choices']}")
            for v in values if isinstance(values, list) else [values]:
                if v not in parent["choices"]:
                    raise _err(where, f"{key}.when.{dep}", f"{dep} cannot take {v!r}; its choices: {parent['choices']}")
        entry["when"] = {k: v if isinstance(v, list) else [v] for k, v in when.items()}
    return entry


def _section(where, raw, name, schema: dict) -> dict:
    value = raw.get(name)
    if value is None:
        return dict(DEFAULTS[name])
    _mapping(where, name, value, {k: False for k in schema})
    return {**DEFAULTS[name], **value}


def parse(raw: Any, where: str = "<spec>") -> StudySpec:
    _mapping(where, "", raw, TOP_KEYS)
    name = raw["name"]
    # The name is a folder, part of a SQLite URL and of Ray's trial folder names: characters
    # that a URL or a file system reads otherwise (? # %, quotes, ...) are refused, and so is a
    # name longer than a file name may be once Ray and Optuna have added to it.
    if (not isinstance(name, str) or not name or name.startswith(".") or not name.isprintable()
            or any(ch in NAME_FORBIDDEN for ch in name) or len(name.encode()) > 100):
        shown = repr(name)[:60] + ("..." if len(repr(name)) > 60 else "")
        raise _err(where, "name", f"{shown} is not allowed; must be a folder name: printable, at most 100 bytes, "
                                  f"not starting with '.', no space nor any of {' '.join(NAME_FORBIDDEN.strip())}")

    # Only an absent or empty (`train:`) section means none; [] or false is a mistake, not "no train"
    train = dict(_mapping(where, "train", {} if raw.get("train") is None else raw["train"]))
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for k in train:
        if k not in fields:
            raise _err(where, f"train.{k}", f"TrainConfig has no field {k!r}; fields: {', '.join(sorted(fields))}")
    try:
        TrainConfig.from_dict(train)
    except (ValueError, TypeError) as e:
        field, _, msg = str(e).partition(": ")
        if field.startswith("TrainConfig.") and field[12:] in train:
            raise _err(where, f"train.{field[12:]}", msg) from None
        raise _err(where, "train", str(e)) from None
    space = _parse_space(where, raw["space"], train)
    _check_combinations(where, train, space)
    _check_tau_used(where, train, space)

    objectives = _objectives(where, raw["objective"], train)

    search = _section(where, raw, "search", DEFAULTS["search"])
    if search["sampler"] not in SAMPLERS:
        raise _err(where, "search.sampler", f"{search['sampler']!r} is not allowed; allowed: {', '.join(SAMPLERS)}")
    _number(where, "search.seed", search["seed"], integer=True, minimum=0)
    if search["seed"] >= 2**32:  # Optuna's samplers seed numpy's RandomState
        raise _err(where, "search.seed", f"{search['seed']} is not allowed; must be < 2**32")
    _number(where, "search.num_samples", search["num_samples"], integer=True, minimum=1, maximum=MAX_SAMPLES)
    _number(where, "search.max_concurrent", search["max_concurrent"], integer=True, minimum=0, auto=True)
    if not isinstance(search["in_order"], bool):
        raise _err(where, "search.in_order", f"{search['in_order']!r} is not allowed; must be true or false")
    if search["in_order"] and not (isinstance(search["max_concurrent"], int) and search["max_concurrent"] > 0):
        # k, the trials at once, is part of what the trials depend on: the file's, not the machine's
        raise _err(where, "search.in_order", f"true needs search.max_concurrent as a number of trials at once "
                   f"(it is {search['max_concurrent']!r}); give it one, or set in_order: false")
    if not isinstance(search["baseline"], bool):
        raise _err(where, "search.baseline", f"{search['baseline']!r} is not allowed; must be true or false")
    if search["baseline"]:
        for k, v in BASELINE.items():
            if k in space and not _admits(space[k], v, BASELINE):
                raise _err(where, "search.baseline", f"the tutorial's {k} = {v} is outside space.{k}; widen it or set baseline: false")
        fixed = TrainConfig.from_dict(train)  # what the baseline trial would run with, where the space does not reach
        other = [f"{k} {getattr(fixed, k)} (the tutorial's {v})" for k, v in BASELINE.items()
                 if k not in space and getattr(fixed, k) != v and (k != "momentum" or fixed.optimizer == "sgd")
                 and (k != "tau" or fixed.neuron != "if") and (k != "alpha" or fixed.alpha is not None)]
        if other:
            raise _err(where, "search.baseline", "the tutorial's configuration cannot run in this study: train fixes "
                       + ", ".join(other) + "; search those, or set baseline: false")

    # With several objectives asha is successive halving on Pareto fronts (study/stopping.py).
    sched = _section(where, raw, "scheduler", DEFAULTS["scheduler"])
    if sched["type"] not in SCHEDULERS:
        raise _err(where, "scheduler.type", f"{sched['type']!r} is not allowed; allowed: {', '.join(SCHEDULERS)}")
    _number(where, "scheduler.grace_period", sched["grace_period"], integer=True, minimum=1)
    _number(where, "scheduler.reduction_factor", sched["reduction_factor"], above=1)
    _number(where, "scheduler.silent_rate", sched["silent_rate"], minimum=0)
    if sched["silent_rate"] >= 1:
        raise _err(where, "scheduler.silent_rate", f"{sched['silent_rate']!r} is not allowed; a firing rate is below "
                   "1: give a small one (e.g. 0.001), or 0 to never stop a silent trial")

    res = _section(where, raw, "resources", DEFAULTS["resources"])
    _number(where, "resources.gpus_per_trial", res["gpus_per_trial"], minimum=0, auto=True)
    g = res["gpus_per_trial"]
    if g != "auto" and g > 1 and g != int(g):  # Ray shares a GPU, but gives more than one only whole
        raise _err(where, "resources.gpus_per_trial", f"{g} is not allowed; above 1 Ray grants whole GPUs only "
                                                      f"(no node can ever hold {g}): give {int(g)} or {int(g) + 1}")
    _number(where, "resources.trials_per_gpu", res["trials_per_gpu"], integer=True, minimum=1)
    _number(where, "resources.checkpoint_every", res["checkpoint_every"], integer=True, minimum=1)
    _number(where, "resources.cpus_per_trial", res["cpus_per_trial"], above=0)
    if res["cpus_per_trial"] < 1e-4:  # Ray counts resources to 1e-4: less is 0, which it refuses at the first trial
        raise _err(where, "resources.cpus_per_trial", f"{res['cpus_per_trial']} is not allowed; must be >= 0.0001 "
                                                      "(Ray counts CPUs to 4 decimals)")
    cupy = train.get("backend") == "cupy" or "cupy" in (space.get("backend") or {}).get("choices", [])
    if cupy and res["gpus_per_trial"] == 0:  # a trial without a GPU runs on the CPU, where cupy cannot
        raise _err(where, "resources.gpus_per_trial", "0 is not allowed with backend cupy, whose kernels run on a "
                   "GPU; give each trial a GPU share (or auto), or use backend auto")
    graphs = train.get("cuda_graphs") is True or True in (space.get("cuda_graphs") or {}).get("choices", [])
    if graphs and res["gpus_per_trial"] == 0:
        raise _err(where, "resources.gpus_per_trial", "0 is not allowed with cuda_graphs: true, which needs a GPU; "
                   "give each trial a GPU share (or auto), or use cuda_graphs: auto (graphs wherever a trial has a GPU)")

    retrain = _section(where, raw, "retrain", DEFAULTS["retrain"])
    given = retrain["epochs"] is not None
    if given:
        _number(where, "retrain.epochs", retrain["epochs"], integer=True, minimum=0)
    seeds = retrain["seeds"]
    if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**63
                                              for s in seeds):
        raise _err(where, "retrain.seeds", f"{seeds!r} is not allowed; must be a list of integers >= 0 and < 2**63 "
                                           "(empty: no retrain)")
    if len(set(seeds)) < len(seeds):  # one folder per seed, and a spread over distinct runs
        raise _err(where, "retrain.seeds", f"{seeds!r} is not allowed; the seeds must differ")

    pick = retrain["pick"]
    if not (pick in ("most_accurate", "knee") or (isinstance(pick, int) and not isinstance(pick, bool) and pick >= 0)
            or (isinstance(pick, str) and pick.startswith("index ") and pick[6:].isdigit())):
        raise _err(where, "retrain.pick", f"{pick!r} is not allowed; allowed: {PICKS}")
    if pick != "most_accurate" and len(objectives) == 1:  # it would be ignored: one objective has no front
        raise _err(where, "retrain.pick", f"{pick!r} chooses a point of a Pareto front, and this study has one "
                                          "objective (its best trial is retrained); remove retrain.pick")

    _number(where, "retrain.top_k", retrain["top_k"], integer=True, minimum=1, maximum=MAX_SAMPLES)
    if retrain["top_k"] > 1 and not train.get("val_size"):  # chosen among them on the validation split, never the test set
        raise _err(where, "retrain.top_k", f"{retrain['top_k']} is not allowed without a validation split: the best of "
                   "the retrained configurations is chosen by its mean validation score over the seeds, never the "
                   "test set's; set train.val_size > 0 (e.g. 5000), or top_k: 1")

    render = _section(where, raw, "render", DEFAULTS["render"])
    _number(where, "render.images", render["images"], integer=True, minimum=0)
    constraints = _constraints(where, raw.get("constraints"), train)
    spec = StudySpec(name, objectives, train, space, search, sched, res, retrain, render, path=where,
                     constraints=constraints)
    if sched["type"] == "asha":
        epochs, rf = spec.max_epochs, sched["reduction_factor"]
        rungs = math.log(epochs / min(sched["grace_period"], epochs)) / math.log(rf) + 1
        if rungs > MAX_RUNGS:
            least = (epochs / min(sched["grace_period"], epochs)) ** (1 / (MAX_RUNGS - 1))
            raise _err(where, "scheduler.reduction_factor", f"{rf!r} makes {rungs:.3g} rungs over {epochs} epochs; at "
                       f"most {MAX_RUNGS:,} are allowed: give a reduction_factor >= {least:.6g} (e.g. 2 or 3)")
    if not given:  # the fixed epochs, or with epochs searched the largest (TrainConfig's default would be a guess)
        retrain["epochs"] = spec.max_epochs
    return spec


def _objectives(where, raw, train) -> list:
    """objective: {metric, mode} or a non-empty list of them."""
    items, multi = (raw, True) if isinstance(raw, list) else ([raw], False)
    if not items:
        raise _err(where, "objective", "is an empty list; give {metric, mode} or a list of them")
    out = []
    for i, obj in enumerate(items):
        key = f"objective[{i}]" if multi else "objective"
        _mapping(where, key, obj, {"metric": True, "mode": True})
        metric, mode = obj["metric"], obj["mode"]
        _selectable(where, f"{key}.metric", metric, train, "optimised")
        if mode not in ("max", "min"):
            raise _err(where, f"{key}.mode", f"{mode!r} is not allowed; allowed: max, min")
        if metric in [o["metric"] for o in out]:
            raise _err(where, f"{key}.metric", f"{metric} is already an objective")
        out.append({"metric": metric, "mode": mode})
    return out


def _selectable(where, key, metric, train, how: str) -> None:
    """A metric that may choose between trials (an objective, a constraint): reported in this study, and
    never the test set's, nor a cost counted on it."""
    if isinstance(metric, str) and metric.startswith(("test_", "max_test_")):  # and the tutorial's max_test_acc
        raise _err(where, key, f"{metric} is measured on the test set, which a study only reports: "
                   "choosing by it would fit the test set; hold out a validation split (train.val_size, "
                   f"e.g. 5000) and use {metric.replace('max_', '').replace('test_', 'val_')}")
    if metric not in OBJECTIVE_METRICS:
        why = f"cannot be {how}" if metric in METRICS else "is never reported"
        raise _err(where, key, f"{metric!r} {why}; allowed: {', '.join(OBJECTIVE_METRICS)}")
    if metric.startswith("val_") and not train.get("val_size"):
        raise _err(where, key, f"{metric} is reported only with a validation split; set train.val_size > 0")
    if (metric in COST_METRICS or metric.startswith("fr_")) and not train.get("val_size"):
        # counted on the validation split, or on the test set where there is none: selection must not see it
        raise _err(where, key, f"{metric} is counted on the test set when there is no validation "
                   "split, and choosing by it would read the test set; set train.val_size > 0 (e.g. 5000)")


BOUNDS = ("min", "max")


def _constraints(where, raw, train) -> dict:
    """constraints: {metric: {min: x, max: y}} (either or both): limits on what a trial reports, {} when absent."""
    if raw is None:  # absent, or an empty `constraints:`
        return {}
    _mapping(where, "constraints", raw)
    out = {}
    for metric, bounds in raw.items():
        key = f"constraints.{metric}"
        _selectable(where, key, metric, train, "constrained")
        _mapping(where, key, bounds, dict.fromkeys(BOUNDS, False))
        if not bounds:
            raise _err(where, key, "is empty; give min, max or both (e.g. {max: 20000})")
        for b, v in bounds.items():
            _number(where, f"{key}.{b}", v, minimum=0)  # every reported metric is >= 0
            if (metric.endswith("_acc") or metric.startswith("fr_")) and v > 1:
                raise _err(where, f"{key}.{b}", f"{v!r} is not allowed; {metric} is a fraction, at most 1 "
                           f"(e.g. {v / 100:g} for {v:g} %)")
        if "min" in bounds and "max" in bounds and bounds["min"] > bounds["max"]:
            raise _err(where, f"{key}.min", f"{bounds['min']!r} is above max {bounds['max']!r}: no trial can meet both")
        out[metric] = {b: bounds[b] for b in BOUNDS if b in bounds}
    return out


def broken(constraints: dict, metrics) -> tuple[dict, str]:
    """How a report (a dict, or a trial's row: its last epoch's metrics) meets `constraints`: (Optuna's
    value of each, {'energy_uj.max': v}: <= 0 met, else how far the metric lies past its bound as a share
    of the bound (of 1 for a bound 0), so that limits on metrics of other scales weigh alike where a
    sampler sums them; a text naming those broken, e.g. 'energy_uj 5.61 > max 5', '' when all are met).
    A metric the report lacks counts as broken: it cannot show that it keeps the limit."""
    values, texts = {}, []
    for metric, bounds in constraints.items():
        v = metrics.get(metric) if hasattr(metrics, "get") else None
        for b, limit in bounds.items():
            if v is None or not math.isfinite(float(v)):
                values[f"{metric}.{b}"] = 1.0
                texts.append(f"{metric} not reported")
                continue
            past = (float(v) - limit) if b == "max" else (limit - float(v))
            values[f"{metric}.{b}"] = past / (abs(limit) or 1.0)
            if past > 0:
                texts.append(f"{metric} {float(v):.6g} {'>' if b == 'max' else '<'} {b} {limit:g}")
    return values, "; ".join(dict.fromkeys(texts))


def _admits(p: dict, value, context: dict) -> bool:
    if "depends_on" in p and p["depends_on"] not in context:
        return True  # the baseline does not fix that parameter: any case may hold
    d = distribution(p, context)
    if d["type"] == "categorical":
        return value in d["choices"]
    return d["low"] <= value <= d["high"]


def load(path: str | Path) -> StudySpec:
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
        raw = yamlio.load(text)
    except OSError as e:
        raise SpecError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise SpecError(f"{path}: line {line}: not UTF-8 text (byte 0x{e.object[e.start]:02x}); "
                        "save the file as UTF-8") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {yamlio.one_line(e)}") from None
    if raw is None:
        raise SpecError(f"{path}: the file is empty; a study needs name, objective and space")
    spec = parse(raw, str(path))
    # What this machine must have to run it (a stored spec.yaml stays readable without it).
    backends = {"train.backend": spec.train.get("backend")}
    backends.update({f"space.backend.choices[{i}]": b
                     for i, b in enumerate(spec.space.get("backend", {}).get("choices", []))})
    for key, backend in backends.items():
        try:
            check_runnable(backend)
        except ValueError as e:
            raise _err(str(path), key, str(e)) from None
    return spec


# ------------------------------------------------------------ the search space

def distribution(p: dict, params) -> dict:
    """The distribution that applies to parameter p given its parent's value in
    params (a dict, or a trial's row): a depends_on range has one per case."""
    return p["cases"][params[p["depends_on"]]] if "depends_on" in p else p


def optuna_name(name: str, p: dict, params: dict) -> str:
    """Optuna's name for a parameter: a conditional range is a parameter of its
    own per case (lr[optimizer=sgd]), so the sampler never mixes the cases;
    csnn.config.trial_fields drops these names from a trial's config."""
    return f"{name}[{p['depends_on']}={params[p['depends_on']]}]" if "depends_on" in p else name


def active(p: dict, params: dict) -> bool:
    return all(params.get(k) in v for k, v in p.get("when", {}).items())


def define_by_run(spec: StudySpec):
    """The define-by-run function for OptunaSearch. A partial of a module-level
    function, because Ray saves the searcher with plain pickle."""
    return functools.partial(_define, spec)


def _define(spec: StudySpec, trial) -> dict:
    """Sample the space in dependency order; return the TrainConfig fields ({'lr': ...})
    beside the values Ray already records under Optuna's names."""
    params: dict = {}
    for name, p in spec.space.items():
        if not active(p, params):
            continue
        d = distribution(p, params)
        oname = optuna_name(name, p, params)
        if d["type"] == "categorical":
            params[name] = trial.suggest_categorical(oname, d["choices"])
        elif d["type"] == "int":
            params[name] = trial.suggest_int(oname, d["low"], d["high"], step=d.get("step", 1), log=d["log"])
        else:
            params[name] = trial.suggest_float(oname, d["low"], d["high"], step=d.get("step"), log=d["log"])
    return params


def baseline_params(spec: StudySpec) -> dict:
    """The tutorial's configuration under Optuna's names, for study.enqueue_trial."""
    out: dict = {}
    for name, p in spec.space.items():
        if name in BASELINE and active(p, BASELINE) and p.get("depends_on", name) in BASELINE:
            out[optuna_name(name, p, BASELINE)] = BASELINE[name]
    return out


def values(spec: StudySpec, name: str) -> list:
    """Every value a TrainConfig field can take in this study: the fixed one, or the
    searched range's bounds and choices (in every case of a conditional range)."""
    if name not in spec.space:
        return [getattr(spec.config({}), name)]
    return values_of(spec.space[name])
