"""The Optuna samplers a study's `search.sampler` names, made so that Ray Tune can pickle them.

Ray Tune pickles the search algorithm (and with it the sampler) into the experiment's
state when the Tuner is made and at every save, and unpickles it on --resume. Optuna
5.1.0 gave its genetic-algorithm samplers a `threading.Lock` (BaseGASampler._thread_lock,
optuna/samplers/_ga/_base.py), which no pickler takes: every nsga2 study failed at
`Tuner(...)` with "cannot pickle '_thread.lock' object" (Optuna 5.0.0 had no lock).
Each sampler here is Optuna's own, whose pickled state leaves out any lock it holds and
whose unpickled copy makes new ones: a lock guards threads of one process, so a copy in
another process (or after --resume) needs a fresh one, not the old one's state.
"""
from __future__ import annotations

import inspect
import math
import threading

import optuna

_LOCKS = (type(threading.Lock()), type(threading.RLock()))


class _Picklable:
    """Mixed in before an Optuna sampler: pickles its state without its locks."""

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_csnn_locks"] = [(k, isinstance(v, _LOCKS[1])) for k, v in state.items() if isinstance(v, _LOCKS)]
        for k, _ in state["_csnn_locks"]:
            del state[k]
        return state

    def __setstate__(self, state):
        state = dict(state)
        locks = state.pop("_csnn_locks", [])
        self.__dict__.update(state)
        for k, reentrant in locks:
            setattr(self, k, threading.RLock() if reentrant else threading.Lock())


class TPESampler(_Picklable, optuna.samplers.TPESampler):
    pass


class RandomSampler(_Picklable, optuna.samplers.RandomSampler):
    pass


class QMCSampler(_Picklable, optuna.samplers.QMCSampler):
    pass


class GPSampler(_Picklable, optuna.samplers.GPSampler):
    pass


class NSGAIISampler(_Picklable, optuna.samplers.NSGAIISampler):
    pass


SAMPLERS = {"tpe": TPESampler, "random": RandomSampler, "qmc": QMCSampler, "gp": GPSampler, "nsga2": NSGAIISampler}
# The samplers that draw their first trials at random before they learn from results: the argument
# that says how many (Optuna's default: TPE and GP 10 trials, NSGA-II a first generation of 50), and
# what the lines call them. A study of 4 trials would otherwise be random search whatever it names.
STARTUP = {"tpe": ("n_startup_trials", "trials"), "gp": ("n_startup_trials", "trials"),
           "nsga2": ("population_size", "trials a generation")}
FEW = 2  # the least start-up: NSGA-II's smallest population; TPE and GP learn from two results


def startup(name: str, num_samples: int) -> tuple[int, int] | None:
    """(the random start-up a study of `num_samples` trials gets, Optuna's default) for a sampler that
    has one, else None: a third of the trials, at least FEW, at most Optuna's default."""
    if name not in STARTUP:
        return None
    default = inspect.signature(SAMPLERS[name].__init__).parameters[STARTUP[name][0]].default
    return min(default, max(FEW, math.ceil(num_samples / 3))), default


def startup_line(name: str, num_samples: int, told: int = 0) -> str | None:
    """What the sampler draws at random in this study (study.run and --dry-run print it); `told`:
    trials a warm start tells it first, which count as results it learns from."""
    sized = startup(name, num_samples)
    if sized is None:
        return None
    n, default = sized
    how = "" if n == default else f" (Optuna's default {default}, sized to a third of the {num_samples} trials)"
    if name == "nsga2":
        if n >= num_samples:
            return (f"sampler nsga2: random search: its first generation of {n} trials is drawn at random, and the "
                    f"study has {num_samples}; give search.num_samples more than {n} for generations bred from the best")
        return (f"sampler nsga2: generations of {n} trials{how}, the first drawn at random, each later one bred from "
                "the best so far")
    left = max(0, n - told)
    if left >= num_samples:
        return (f"sampler {name}: random search: it draws its first {n} trials at random before it learns from "
                f"results, and the study has {num_samples}; give search.num_samples more than {n} for a guided search")
    first = f"the first {left} of {num_samples} trials at random{how}" if left else "no trial at random"
    return (f"sampler {name}: {first}" + (f" ({told} told by the warm start count as results)" if told else "")
            + f", then guided by the results")


def make_sampler(name: str, seed: int, num_samples: int | None = None) -> optuna.samplers.BaseSampler:
    """Optuna's sampler `name`, seeded; with `num_samples` its random start-up sized to the study (startup)."""
    import warnings

    sized = {STARTUP[name][0]: startup(name, num_samples)[0]} if num_samples and name in STARTUP else {}
    with warnings.catch_warnings():  # QMCSampler and GPSampler are "experimental" in Optuna's words
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return SAMPLERS[name](seed=seed, **sized)
