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


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    import warnings

    with warnings.catch_warnings():  # QMCSampler and GPSampler are "experimental" in Optuna's words
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return SAMPLERS[name](seed=seed)
