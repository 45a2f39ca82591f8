"""What study.run prints while it runs, and the seconds each phase took (timing.yaml).

By default one line whenever a trial ends or the best trial changes, e.g.

  [0:56, ~0:56 left] trials 14/16: 6 finished, 8 stopped, 1 running, 0 errored; best val_acc 0.781 (trial 194e64a2)

the remaining time from study.estimate's model and the trials' own clocks, the best of the trials that
learn (never one silent or dead at its last report, nor one whose last report broke a constraint: with
`constraints:` the line counts those, "; 1 broke a constraint"); Ray Tune's own status tables only with --verbose.
"""
from __future__ import annotations

import contextlib
import os
import time

from ray import tune

from csnn.config import dead_network, silent_layers, trial_fields
from study.spec import broken


def clock(seconds: float) -> str:
    """m:ss, or h:mm:ss from an hour on."""
    s = int(max(0, round(seconds)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress(tune.Callback):
    """One line per change of the search: trials ended by kind out of the total, the running ones,
    the best value so far and its trial, elapsed and (from the estimate) remaining time. Ray pickles
    its callbacks with the Tuner: plain attributes only, and the clock restarts in setup() (a
    --resume)."""

    def __init__(self, spec, trial_s: float, running: int, after_s: float):
        self.spec, self.trial_s, self.running, self.after_s = spec, trial_s, max(1, running), after_s
        self.start = time.time()
        self.ended: dict = {}  # trial_id -> finished | stopped | silent | dead | errored
        self.best = None  # (value, trial_id): the best of the trials that learn, as the study's end picks it
        self.values: dict = {}  # trial_id -> (its best value so far, whether its last report learned nothing)

    def __setstate__(self, state):  # a Progress pickled before `values` was kept
        self.__dict__.update({"values": {}, **state})

    def setup(self, **info):
        self.start = time.time()

    def _epochs(self, trial) -> int:
        try:
            return self.spec.config(trial_fields(trial.config)).epochs
        except (ValueError, TypeError):
            return self.spec.max_epochs

    def _better(self, a, b) -> bool:
        return b is None or (a > b if self.spec.mode == "max" else a < b)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(self.spec.metric)
        if value is None:
            return
        # A trial silent or dead now learned nothing, whatever it reached before: never the best (the
        # study's end leaves out a trial silent or dead at its last epoch, results.best_row), until it
        # fires again.
        # Nor is one whose last report breaks a constraint (the spec's constraints, as Optuna is told).
        rate = self.spec.scheduler["silent_rate"]
        quiet = bool(result.get("silent") or result.get("dead") or silent_layers(result, rate)
                     or dead_network(result, rate) or self._broke(result))
        before = self.values.get(trial.trial_id, (None, False))[0]
        self.values[trial.trial_id] = (value if self._better(value, before) else before, quiet)
        if self._pick() != self.best:
            self.best = self._pick()
            self.say(trials)

    def _pick(self):
        """(value, trial_id) of the best trial among those whose last report learned something."""
        best = None
        for tid, (v, quiet) in self.values.items():
            if not quiet and (best is None or self._better(v, best[0])):
                best = (v, tid)
        return best

    def _broke(self, result: dict) -> str:
        """The constraints a report breaks ('' when it keeps them all, or the study has none)."""
        return broken(getattr(self.spec, "constraints", {}), result)[1]

    def _kind(self, trial) -> str:
        last = trial.last_result or {}
        for kind in ("silent", "dead"):  # ended by the silent or the dead stop (csnn.trainable)
            if last.get(kind):
                return kind
        return "finished" if last.get("training_iteration", 0) >= self._epochs(trial) else "stopped"

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.ended[trial.trial_id] = self._kind(trial)
        self.say(trials)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.ended[trial.trial_id] = "errored"
        self.values.pop(trial.trial_id, None)  # an errored trial is never the best
        self.best = self._pick()
        self.say(trials, f" (trial {trial.trial_id} errored: {_error(trial)}; {trial.error_file or 'its error.txt'})")

    def say(self, trials, extra: str = "") -> None:
        try:
            self._say(trials, extra)
        except Exception as e:  # noqa: BLE001 - a progress line must never stop the study (Ray would)
            print(f"(progress line failed: {type(e).__name__}: {e})", flush=True)

    def _say(self, trials, extra: str) -> None:
        total = self.spec.search["num_samples"]
        # Ray has not yet updated the status of the trial that just ended; those that ended before
        # a --resume are only in `trials` (this object was pickled with the Tuner at the start).
        ended = dict(self.ended)
        for t in trials:
            if t.trial_id not in ended and t.status in ("TERMINATED", "ERROR"):
                ended[t.trial_id] = "errored" if t.status == "ERROR" else self._kind(t)
        kinds = list(ended.values())
        running = sum(t.status == "RUNNING" and t.trial_id not in ended for t in trials)
        elapsed = time.time() - self.start
        remaining = f", ~{clock(self.left(trials, ended))} left" if self.trial_s else ""
        best = (f"; best {self.spec.metric} {self.best[0]:.4g} (trial {self.best[1]})" if self.best
                else "; no trial has learned yet" if self.values else "")
        broke = ""
        if getattr(self.spec, "constraints", None):  # (a spec pickled before constraints has none)
            # of the trials ended, not errored, those whose last report broke a constraint
            n = sum(bool(self._broke(t.last_result or {})) for t in trials
                    if ended.get(t.trial_id) not in (None, "errored"))
            broke = f"; {n} broke a constraint"
        print(f"[{clock(elapsed)}{remaining}] trials {len(kinds)}/{total}: "
              + ", ".join(f"{kinds.count(k)} {k}" for k in ("finished", "stopped", "silent", "dead")
                          if k in ("finished", "stopped") or k in kinds) + f", {running} running, "
              f"{kinds.count('errored')} errored{broke}{best}{extra}", flush=True)


    def left(self, trials, ended: dict) -> float:
        """Seconds left: the model's work for the trials not ended, less what the running ones have done,
        scaled by the pace of the ended trials (their own seconds, Ray's time_total_s, against the model's:
        a machine that others load runs slower than predicted). Read from the trials' own clocks, not
        this process's: a driver that was stopped a while (SIGSTOP, a laptop's sleep) while its trials
        trained neither stalls the count nor inflates the pace."""
        took = {t.trial_id: float((t.last_result or {}).get("time_total_s") or 0.0) for t in trials}
        done = [took.get(tid, 0.0) for tid in ended]
        pace = min(8.0, max(0.25, sum(done) / (len(done) * self.trial_s))) if len(done) >= 2 and sum(done) else 1.0
        per_trial = pace * self.trial_s
        # a running trial's seconds so far count against its share, never past most of it (it may run long)
        ran = sum(min(took.get(t.trial_id, 0.0), 0.9 * per_trial) for t in trials
                  if t.status == "RUNNING" and t.trial_id not in ended)
        todo = self.spec.search["num_samples"] - len(ended)
        return max(0.0, todo * per_trial - ran) / self.running + pace * self.after_s


def _error(trial) -> str:
    from study.results import error_text

    try:
        return error_text(open(trial.error_file).read()) if trial.error_file else "see its error.txt"
    except OSError:
        return "see its error.txt"


def process_start() -> float:
    """When this process started (Linux: /proc, to the second of the boot time); else now."""
    try:
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


@contextlib.contextmanager
def library_logs(log_file, verbose: bool):
    """Ray's and Optuna's own log lines (INFO and WARNING: "A new study created in RDB", "Wrote the
    latest version of all result files", snapshot warnings) go to the study's log file, not to the
    terminal, unless --verbose; errored trials still get their line from Progress."""
    import logging

    if verbose:
        yield
        return
    handler = logging.FileHandler(log_file) if log_file is not None else logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved = {}
    for name in ("ray", "optuna"):
        lg = logging.getLogger(name)
        saved[name] = (lg.handlers[:], lg.propagate)
        lg.handlers, lg.propagate = [handler], False
    try:
        yield
    finally:
        for name, (handlers, propagate) in saved.items():
            logging.getLogger(name).handlers, logging.getLogger(name).propagate = handlers, propagate
        handler.close()


@contextlib.contextmanager
def ray_output(verbose: bool):
    """Ray Tune's output engine while a study runs: without --verbose the legacy one, which prints
    nothing at RunConfig(verbose=0); Ray 2.60's new one prints its experiment table even then. Read
    by Ray at each fit, from the environment: set for the study's run alone, then put back."""
    before = os.environ.get("RAY_AIR_NEW_OUTPUT")
    if not verbose:
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = before


class Timing:
    """The study's clock: the seconds of each phase (ray start, search, export, retrain, spikes),
    the prediction made at the start, and whether Ray's own output is wanted (--verbose)."""

    def __init__(self, verbose: bool = False, estimate: dict | None = None):
        self.start = self.last = time.time()
        self.verbose, self.estimate = verbose, estimate
        # The process's own start: the imports, loading the data and the checks before run().
        self.born = min(process_start(), self.start)
        self.phases: dict = {"startup": self.start - self.born}
        self.inner = 0.0  # seconds of phase() blocks since the last lap(), which lap() leaves to them

    @contextlib.contextmanager
    def phase(self, name: str):
        """A phase nested in another (the spikes in the retrain): its seconds are its own."""
        t0 = time.time()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.time() - t0
            self.inner += time.time() - t0

    def lap(self, name: str) -> None:
        """The seconds since the last lap (or the start) are phase `name`'s."""
        now = time.time()
        self.phases[name] = self.phases.get(name, 0.0) + now - self.last - self.inner
        self.last, self.inner = now, 0.0

    def predicted(self, name: str) -> float | None:
        return (self.estimate or {}).get("phases_s", {}).get(name)

    def run_config(self, spec) -> dict:
        """RunConfig's output settings for the search: silent Ray (verbose 0: in Ray 2.60's output
        engine no status tables, no per-trial results) and our Progress callback; with --verbose
        Ray's default tables as well."""
        est = self.estimate or {}
        p = est.get("phases_s", {})
        after = sum(p.get(k, 0) for k in ("export", "retrain", "spikes"))
        trial_s, running = est.get("trial_s", 0.0), max(1, est.get("running", 1))
        cb = Progress(spec, trial_s, running, after)
        return {"callbacks": [cb], **({} if self.verbose else {"verbose": 0})}

    def quiet(self) -> dict:
        """RunConfig's output settings for the retrain: Ray's tables only with --verbose."""
        return {} if self.verbose else {"verbose": 0}

    def record(self, resumed: bool = False, interrupted: bool = False) -> dict:
        out = {"wall_s": round(time.time() - self.born, 1),
               "phases_s": {k: round(v, 1) for k, v in self.phases.items()}}
        out.update({k: True for k, on in (("resumed", resumed), ("interrupted", interrupted)) if on})
        return out

    @staticmethod
    def save(study, run: dict, fresh: bool, trials_s: dict | None = None, replace_last: bool = False) -> dict:
        """timing.yaml: every run of the study (`runs`: a first one, each interrupted one, each --resume
        and --retrain), and their sums under the names estimate.yaml predicts (wall_s, phases_s); `trials_s`:
        where the trials' own time went, summed over all runs (study.results.time_breakdown; a run that
        passes none keeps the last one). `replace_last`: `run` brings the last entry up to date (study.run
        writes its own as it starts)."""
        import yaml

        f = study / "timing.yaml"
        old = (yaml.safe_load(f.read_text()) or {}) if f.is_file() and not fresh else {}
        prior = old.get("runs") or ([old] if old else [])  # a timing.yaml of one run, before runs were kept
        runs = [*(prior[:-1] if replace_last else prior), run]
        phases = {}
        for r in runs:
            for k, v in (r.get("phases_s") or {}).items():
                phases[k] = round(phases.get(k, 0.0) + v, 1)
        out = {"wall_s": round(sum(r.get("wall_s", 0.0) for r in runs), 1), "phases_s": phases,
               **({"trials_s": trials_s or old["trials_s"]} if trials_s or old.get("trials_s") else {}), "runs": runs}
        f.write_text(yaml.safe_dump(out, sort_keys=False))
        return out
