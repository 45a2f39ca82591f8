"""Early stopping that understands spiking networks and several objectives.

SilentAwareOptunaSearch: Ray's OptunaSearch, telling Optuna which trials were
silent or dead networks (csnn.trainable ends them).

FIFO, and the ASHA schedulers below: their trials go into the study folder as it is
now, after a moved or copied study's Tuner.restore (_InFolder).

MultiObjectiveASHA: asynchronous successive halving for several objectives, Ray
Tune's ASHA with Pareto fronts in place of one metric's quantile.

Ray's ASHA (and Optuna's pruners) rank trials by one metric, so on an accuracy
against energy study they stop the cheap, less accurate trials that make one end
of the front. Here, when a trial reaches a rung (grace_period x reduction_factor^k
epochs), it and every trial recorded at that rung before it are sorted by
non-dominated front, then by crowding distance within a front (NSGA-II's order);
the trial goes on if it is among the first ceil(n / reduction_factor) of those n.
As in Ray's ASHA, the first trial at a rung always goes on, a tie goes on, and a
decision is never revisited.
"""
from __future__ import annotations

import copy
import math

import numpy as np
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.schedulers.async_hyperband import _Bracket
from ray.tune.search.optuna import OptunaSearch

from csnn.config import dead_network, silent_layers
from study.results import creation_number
from study.spec import broken


def silent(result: dict, rate: float) -> str:
    """The layers silent in a trial's report: those the trainable named, else the
    fr_<i> below `rate` (0: none), e.g. 'fr_10,fr_12'; '' when every layer fires."""
    return result.get("silent") or ",".join(silent_layers(result, rate))


class SilentAwareOptunaSearch(OptunaSearch):
    """A trial that ended silent (a layer below `silent_rate` in its last report: the
    trainable ended it so, or it was stopped or finished so) is told to Optuna as
    infeasible: a constraint, which TPE, NSGA-II and GP rank behind every feasible
    trial, so the sampler learns the region, and a user attribute naming the layers.
    Not as failed: Optuna's samplers leave failed trials out of what they learn from.
    Its values are told too (a silent network's accuracy is chance; its near-zero
    energy would make it look good on a cost objective, were it not infeasible).
    So is a dead network (one class for every training image, csnn.trainable): the
    constraint `dead` and a user attribute saying why. And a trial whose last report
    breaks one of the spec's `constraints` (study.spec.broken): a constraint per bound,
    e.g. `energy_uj.max`, and the user attribute `constraint` naming those broken.
    Every told trial is told every constraint, 0 or less where it is met: GPSampler
    refuses a study whose trials name different constraints."""

    # The Optuna storage a restored searcher connects to: set by study.run before Tuner.restore.
    # The searcher is pickled without its storage (OptunaSearch's own state held the study's
    # absolute optuna.db path), so a study folder that was moved or copied resumes into its own
    # database, never the one at the path it started at.
    resume_url: str | None = None

    def __init__(self, *args, silent_rate: float = 0.0, in_order: int = 0, num_samples: int = 0,
                 constraints: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.silent_rate, self.constraints = silent_rate, dict(constraints or {})
        # search.in_order (with k = in_order trials at once): the n-th trial is asked for only when
        # trials 1..n-k have ended, and Optuna is told their results in trial order just then, so
        # the sampler sees the same results before each ask however the trials' timing fell.
        self.in_order, self.num_samples = in_order, num_samples
        self.asked: list[str] = []  # Ray's trial ids in the order their configurations were asked
        self.ended: dict = {}  # trial id -> (result, error) of trials ended but not yet told
        self.told = 0  # how many of `asked` Optuna was told

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_storage"] = state["_ot_study"] = None
        state["_storage_url"] = self._storage.url if self._storage is not None else state.get("_storage_url")
        state["_ot_trials"] = {k: t._trial_id for k, t in self._ot_trials.items()}  # Optuna's ids, reconnected later
        return state

    def __setstate__(self, state):
        # a study from before in_order, or before constraints
        self.__dict__.update({"in_order": 0, "asked": [], "ended": {}, "told": 0, "constraints": {}, **state})
        url = self.resume_url or state.get("_storage_url")  # a copy made while the study runs keeps its storage
        if url is not None and self._ot_study is None:
            import optuna

            self._storage = optuna.storages.RDBStorage(url)
            self._ot_study = optuna.load_study(study_name=self._study_name, storage=self._storage, sampler=self._sampler)
            self._ot_trials = {k: optuna.trial.Trial(self._ot_study, i) for k, i in self._ot_trials.items()}

    def reconcile(self) -> None:
        """On --resume, what Optuna recorded after Ray's last save of this searcher (then a kill).
        A trial told its end: Ray runs it again from its last checkpoint and tells its end again,
        which Optuna refused (UpdateFinishedTrialError), and Ray then marked the finished trial
        errored; told once is enough, and OptunaSearch ignores what comes later for a trial it counts
        as completed. A trial asked: Ray never runs it, and it would stay RUNNING in Optuna's record
        for ever; it is failed (the samplers leave failed trials out), and an enqueued configuration
        (the baseline, a warm start's best) is enqueued again, so that it still runs."""
        from optuna.trial import TrialState

        trials = self._ot_study.get_trials(deepcopy=False)
        ended = {t._trial_id for t in trials if t.state.is_finished()}
        self._completed_trials |= {k for k, t in self._ot_trials.items() if t._trial_id in ended}
        known = {t._trial_id for t in self._ot_trials.values()}
        for t in trials:
            if t.state == TrialState.RUNNING and t._trial_id not in known:
                self._storage.set_trial_user_attr(t._trial_id, "orphan", "asked before a kill, never run by Ray")
                self._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
                if "fixed_params" in t.system_attrs:
                    self._ot_study.enqueue_trial(t.system_attrs["fixed_params"], user_attrs=t.user_attrs)

    def save(self, checkpoint_path: str):  # OptunaSearch's pickles its __dict__, storage included
        import pickle

        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__getstate__(), f)

    def restore(self, checkpoint_path: str):  # Ray's restore of the searcher's last saved state
        import pickle

        with open(checkpoint_path, "rb") as f:
            self.__setstate__(pickle.load(f))
        if self.resume_url:  # a --resume (no trial of the study runs now: study.lock)
            self.reconcile()

    def suggest(self, trial_id):
        if self.in_order and trial_id not in self._ot_trials:
            if not self.tell_through(len(self.asked) - self.in_order + 1):
                return None  # Ray asks again once a trial has ended
            self.asked.append(trial_id)
        out = super().suggest(trial_id)
        if trial_id in self._ot_trials:  # Optuna numbers its trials otherwise (from 0, with warm-start and
            # orphaned trials): the Ray trial id, beside Optuna's number (optuna-dashboard), matches trials.csv
            self._ot_trials[trial_id].set_user_attr("ray_trial_id", trial_id)
        return out

    def tell_through(self, count: int) -> bool:
        """Tell Optuna the first `count` asked trials, in order; False while one has not ended."""
        while self.told < count:
            trial_id = self.asked[self.told]
            if trial_id not in self.ended:
                return False
            self.tell(trial_id, *self.ended.pop(trial_id))
            self.told += 1
        return True

    def on_trial_complete(self, trial_id, result=None, error=False):
        if not self.in_order or trial_id not in self.asked:
            return self.tell(trial_id, result, error)
        if self.asked.index(trial_id) >= self.told:
            self.ended[trial_id] = (result, error)
        if len(self.asked) >= self.num_samples:  # nothing more will be asked: tell the rest as they end
            self.tell_through(len(self.asked))

    def tell(self, trial_id, result=None, error=False):
        if trial_id not in self._ot_trials or trial_id in self._completed_trials:
            return
        ot_trial = self._ot_trials[trial_id]  # OptunaSearch's own record of its Optuna trials
        if not error:  # an errored trial is told as failed, which the samplers leave out
            why = {"silent": silent(result or {}, self.silent_rate),
                   "dead": (result or {}).get("dead") or dead_network(result or {}, self.silent_rate)}
            for key, text in why.items():
                if text:
                    ot_trial.set_user_attr(key, text)
                ot_trial.set_constraint(key, 1.0 if text else 0.0)
            values, text = broken(self.constraints, result or {})
            for key, value in values.items():
                ot_trial.set_constraint(key, value)
            if text:
                ot_trial.set_user_attr("constraint", text)
        super().on_trial_complete(trial_id, result, error)


def fronts(costs: np.ndarray) -> list[list[int]]:
    """Non-dominated sorting of rows to minimise: the indices of each front, best first."""
    n = len(costs)
    beats = [[j for j in range(n) if (costs[i] <= costs[j]).all() and (costs[i] < costs[j]).any()] for i in range(n)]
    beaten = [sum(i in beats[j] for j in range(n)) for i in range(n)]
    out, front = [], [i for i in range(n) if beaten[i] == 0]
    while front:
        out.append(front)
        nxt = []
        for i in front:
            for j in beats[i]:
                beaten[j] -= 1
                if beaten[j] == 0:
                    nxt.append(j)
        front = sorted(nxt)
    return out


def crowding(costs: np.ndarray) -> np.ndarray:
    """NSGA-II's crowding distance of each row within one front (its ends: infinite)."""
    n, dist = len(costs), np.zeros(len(costs))
    for k in range(costs.shape[1]):
        order = np.argsort(costs[:, k], kind="stable")
        span = costs[order[-1], k] - costs[order[0], k]
        dist[order[0]] = dist[order[-1]] = math.inf
        if span > 0:
            for a in range(1, n - 1):
                dist[order[a]] += (costs[order[a + 1], k] - costs[order[a - 1], k]) / span
    return dist


def keeps(recorded: list, new, reduction_factor: float) -> bool:
    """Whether the trial whose objective vector (to minimise) is `new` goes on past a
    rung where `recorded` were recorded before it. A vector with a missing (None or
    NaN) value cannot be compared: it ranks behind every complete one."""
    points = [*recorded, new]
    complete = [i for i, p in enumerate(points) if p is not None and not np.isnan(np.asarray(p, float)).any()]
    costs = np.asarray([points[i] for i in complete], float)
    order = []  # (front, -crowding, the new trial first on a tie), as positions in `points`
    for rank, front in enumerate(fronts(costs) if complete else []):
        dist = crowding(costs[front])
        order += [(rank, -d, complete[i] != len(points) - 1, complete[i]) for i, d in zip(front, dist)]
    ranked = [i for *_, i in sorted(order)] + [i for i in range(len(points)) if i not in complete]
    return ranked.index(len(points) - 1) < math.ceil(len(points) / reduction_factor)


class _InFolder:
    """Ray Tune restores a moved or copied experiment's trials into the folder Tuner.restore reads
    (its _restore_trials re-points their StorageContext and checkpoint paths), but the trials made
    after the restore take the StorageContext saved with the trial generator (search_gen_state-*.json
    and basic-variant-state-*.json keep the Experiment as it began, the absolute folder of its
    start): their checkpoints, which the trial's worker writes itself, would land in the original (a
    copy) or make the old path again (a move). study.run sets `folder` (the study folder's filesystem
    and path, which holds ray/ and retrain/) before Tuner.restore, and every trial added is pointed
    there as Ray points the restored ones, before it starts; nothing saved is rewritten."""

    folder: tuple | None = None  # (pyarrow filesystem, path): set around a Tuner.restore(...).fit()

    def on_trial_add(self, tune_controller, trial):
        here = type(self).folder
        if here is not None and trial.storage.storage_fs_path != here[1]:
            storage = copy.copy(trial.storage)
            storage.storage_filesystem, storage.storage_fs_path = here
            trial.set_storage(storage)  # Ray's own setter: the checkpoints it tracks move with it
        super().on_trial_add(tune_controller, trial)


class FIFO(_InFolder, FIFOScheduler):
    """Ray's scheduler without early stopping, whose trials stay in the folder resumed."""


class _Trial:
    """What a rung needs of a Ray Trial: its id."""

    def __init__(self, trial_id: str):
        self.trial_id = trial_id


class _InOrderBracket(_Bracket):
    """Ray's ASHA rungs, whose cutoff reads only the trials a decision may see (search.in_order)."""

    visible: set | None = None  # set by the scheduler before each decision; None: every trial

    def cutoff(self, recorded):
        return super().cutoff({t: v for t, v in recorded.items() if self.visible is None or t in self.visible})


class _Replayed:
    """Ray Tune saves no scheduler state: a resumed study's rungs would start empty, and its
    later trials would be stopped otherwise than in the study run straight through. study.run
    sets `replay_from` (the results Ray recorded, in the order they arrived) before
    Tuner.restore unpickles the scheduler, which then records them at its rungs again."""

    replay_from: list | None = None  # [(trial_id, creation number, result)]
    pending: list | tuple = ()  # what is still to be recorded (a fresh scheduler: nothing)
    # search.in_order with k trials at once: trial n is ranked at a rung against trials 1..n-k alone,
    # which had all ended when it was asked for (SilentAwareOptunaSearch), so that no decision
    # depends on which trials happened to reach the rung first.
    in_order = 0
    numbers: dict | None = None  # trial id -> creation number

    def visible(self, trial_id: str, number: int) -> set | None:
        """The trials whose rung records a decision for trial `number` may read (None: all)."""
        if not self.in_order:
            return None
        if self.numbers is None:
            self.numbers = {}
        self.numbers[trial_id] = number
        return {t for t, m in self.numbers.items() if m <= number - self.in_order}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.pending = list(type(self).replay_from or [])
        self.catch_up()

    def catch_up(self) -> None:
        """Record the pending results, once the scheduler knows its metric."""
        if self.pending and self.ready():
            for trial_id, number, result in self.pending:
                self.replay(trial_id, number, result)
            self.pending = []


class ResumableASHA(_Replayed, _InFolder, ASHAScheduler):
    """Ray's ASHA (one bracket, as study.run makes it), whose rungs survive a resume."""

    def __init__(self, *args, in_order: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.in_order = in_order
        for bracket in self._brackets:
            bracket.__class__ = _InOrderBracket

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        self._brackets[0].visible = self.visible(trial.trial_id, creation_number(trial, 0))
        return super().on_trial_result(tune_controller, trial, result)

    def ready(self) -> bool:  # Tune tells it the metric after unpickling it
        return bool(self._metric)

    def set_search_properties(self, metric, mode, **spec) -> bool:
        ok = super().set_search_properties(metric, mode, **spec)
        self.catch_up()
        return ok

    def replay(self, trial_id: str, number: int, result: dict) -> None:
        self._brackets[0].visible = self.visible(trial_id, number)
        if self._time_attr in result and self._metric in result:
            self._brackets[0].on_result(_Trial(trial_id), result[self._time_attr], self._metric_op * result[self._metric])


class MultiObjectiveASHA(_Replayed, _InFolder, FIFOScheduler):
    """Ray Tune TrialScheduler: one ASHA bracket whose rungs rank by Pareto front."""

    def __init__(self, metrics: list[str], modes: list[str], max_t: int, grace_period: int = 1,
                 reduction_factor: float = 3, time_attr: str = "training_iteration", in_order: int = 0):
        super().__init__()
        self.in_order = in_order
        self.metrics, self.signs = metrics, [1.0 if m == "min" else -1.0 for m in modes]
        self.max_t, self.rf, self.time_attr = max_t, reduction_factor, time_attr
        count = int(math.log(max_t / grace_period) / math.log(reduction_factor) + 1)
        self.rungs = {grace_period * reduction_factor ** k: {} for k in range(count)}  # milestone -> {trial: costs}
        self.num_stopped = 0

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True  # the objectives are its own; Tune's single metric/mode are for its tables

    def costs(self, result: dict):
        """The objectives to minimise (None when one is missing). A network silent at a rung
        is ranked by its values like any other: measured, ranking it last cut the front's
        cheap end (a T 2, 4-channel SGD trial silent after its first epoch reached 0.752
        at 0.20 uJ by its sixth; without it the front's hypervolume fell 2.7 %)."""
        values = [result.get(m) for m in self.metrics]
        if any(v is None for v in values):
            return None
        return [s * float(v) for s, v in zip(self.signs, values)]

    def decide(self, trial_id: str, result: dict, visible: set | None = None) -> str:
        t = result.get(self.time_attr)
        if t is None:
            return TrialScheduler.CONTINUE
        action = TrialScheduler.STOP if t >= self.max_t else TrialScheduler.CONTINUE
        reached = [m for m in self.rungs if m <= t]
        recorded = self.rungs[max(reached)] if reached and action == TrialScheduler.CONTINUE else None
        if recorded is not None and trial_id not in recorded:  # the highest rung reached, decided once
            new = self.costs(result)
            if not keeps([v for t, v in recorded.items() if visible is None or t in visible], new, self.rf):
                action = TrialScheduler.STOP
                self.num_stopped += 1
            recorded[trial_id] = new
        return action

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        return self.decide(trial.trial_id, result, self.visible(trial.trial_id, creation_number(trial, 0)))

    def ready(self) -> bool:  # its objectives are its own
        return True

    def replay(self, trial_id: str, number: int, result: dict) -> None:
        self.decide(trial_id, result, self.visible(trial_id, number))

    def debug_string(self) -> str:
        return f"MultiObjectiveASHA on {', '.join(self.metrics)}: {self.num_stopped} stopped, rungs " + ", ".join(
            f"{m:g}: {len(r)}" for m, r in sorted(self.rungs.items()))


def arrivals(trials: list) -> list:
    """Every result Ray recorded for the study's trials (results.trial_results), as (trial_id, creation
    number, result) in the order they arrived: by their timestamp (whole seconds), then the order the
    search made them."""
    events = []
    for n, (trial, result) in enumerate(trials):
        h = result.metrics_dataframe
        if h is None or not len(h):
            continue
        for row in h.to_dict("records"):
            events.append((row.get("timestamp", 0), creation_number(trial, n), row.get("training_iteration", 0),
                           trial.trial_id, row))
    return [(trial_id, number, row) for _, number, _, trial_id, row in sorted(events, key=lambda e: e[:3])]
