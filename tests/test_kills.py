"""SIGKILL study.run at a sweep of instants, then run what the folder's state advises: the study
ends with exactly num_samples trials, no trial that had finished lost, best/ complete (issue 27).

One study is killed at each instant in turn: each kill's advised command (read off the folder as
study.run reads it) runs in a new process, which is killed at the next instant; the last advised
command runs to the end in this process. Each row names the instant, the state the folder must
then read as, and the found case it guards."""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pandas as pd
import pytest

from conftest import ROOT, env, in_process, study_cmd, tiny_spec, write_spec
from study import lifecycle, run
from study.storage import Location

NUM_SAMPLES = 3


def told(d: Path) -> int:
    """How many trials Optuna has been told the end of (its own record, read without a lock)."""
    try:
        with closing(sqlite3.connect(f"file:{d / 'optuna.db'}?mode=ro", uri=True, timeout=0.1)) as c:
            return c.execute("SELECT count(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]
    except sqlite3.Error:  # not there yet, or being written
        return 0


def finished(d: Path) -> set[str]:
    """The trials whose last epoch Ray recorded (their result.json): what a kill must not lose."""
    out = set()
    for f in d.glob("ray/*/result.json"):
        lines = [json.loads(x) for x in f.read_text().splitlines() if x.strip().endswith("}")]
        if any(r.get("training_iteration", 0) >= 1 for r in lines):  # 1 epoch a trial
            out.add(lines[-1]["trial_id"])
    return out


# (instant, when to kill, what then to do to the folder, the state it must read as, what the advised
# command must say). Found cases: a kill soon after the Tuner starts left a folder refused by the same
# command, whose --resume ran one trial and said "interrupted" with exit 130; an empty tuner.pkl (a
# crash while Ray wrote it) was refused, and --resume failed with EOFError; a kill right after a
# trial ended made it errored on --resume (UpdateFinishedTrialError: its end told to Optuna twice); a
# kill as the retrain started made every --resume fail with KeyError: 'seed'; a kill in the export
# left an ended study without trials.csv, which only --retrain went on from.
INSTANTS = [
    ("Ray wrote tuner.pkl; then it is emptied", lambda d, n0: (d / "ray" / "tuner.pkl").exists(),
     lambda d: (d / "ray" / "tuner.pkl").write_bytes(b""), "unstarted",
     "tuner.pkl is empty: Ray cannot continue it); starting the study afresh"),
    # and its searcher's (a kill between the two leaves an empty search_gen_state-*.json: unstarted, which
    # tests/test_lifecycle.py reads off a folder; the sweep killed there now and then)
    ("Ray saved its first experiment state", lambda d, n0: any(d.glob("ray/experiment_state*.json")) and any(
        f.stat().st_size for f in d.glob("ray/search_gen_state*.json")), None, "interrupted", ""),
    ("a trial's end told to Optuna", lambda d, n0: told(d) > n0, None, "interrupted", ""),
    ("the export began", lambda d, n0: (d / "history.csv").exists(), None, "interrupted", ""),
    ("the retrain's Tuner started", lambda d, n0: (d / "retrain" / "tuner.pkl").exists(), None, "retrain_cut", ""),
    # as best/ is assembled (in a folder of its own, then moved into place: best/ itself appears only
    # moments before the study ends, too late to kill it reliably; seen in CI)
    ("the retrain's seed ended, best/ to assemble", lambda d, n0: seed_ended(d), None, "retrain_cut", ""),
]


def seed_ended(d: Path) -> bool:
    """Whether a retrain seed recorded its last epoch (1 epoch): the driver then assembles best/."""
    for f in d.glob("retrain/*/result.json"):
        lines = [json.loads(x) for x in f.read_text().splitlines() if x.strip().endswith("}")]
        if any(r.get("training_iteration", 0) >= 1 for r in lines):
            return True
    return False


def session(sid: int) -> list[int]:
    """The live processes of session `sid`: the killed study.run's, Ray's among them."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # a zombie holds nothing
            pids.append(int(stat.parent.name))
    return pids


# A Python with study.run's imports done (4 CPU-s, 10 s wall on the loaded machine: each killed run paid them), which
# forks each run: the child becomes a session of its own (its Ray's processes join it) and runs `python -m study.run
# ARGV` with the worker's CPU reading (as conftest.calibrated). The child's first act is setsid, said before its pid
# is, so that a kill of its session never misses; the zygote reaps it and says its exit status. Nothing in the zygote
# runs a thread that matters at the fork (torch's DataLoader forks after importing torch the same way).
ZYGOTE = """
import json, os, runpy, sys
import ray, ray.tune, optuna, torch
import csnn.trainable, study.samplers, study.stopping, study.tuning  # not study.run itself: runpy runs it fresh
from study import analyze, environment, lifecycle, plan, progress, results, spec, storage, warmstart
from study import estimate
for line in sys.stdin:
    req = json.loads(line)
    r, w = os.pipe()
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        os.setsid()
        os.write(w, b"x")
        os.close(r), os.close(w)
        fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1), os.dup2(fd, 2), os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        estimate.cpu_speeds = lambda spec: req["speeds"]
        sys.argv = ["-m", *req["argv"]]
        try:
            runpy.run_module("study.run", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:  # study.run ends so (leave)
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        except BaseException:  # as Python itself would end: its traceback, exit 1
            import traceback
            traceback.print_exc()
            code = 1
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)
    os.read(r, 1)
    os.close(r), os.close(w)
    print(pid, flush=True)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


class Zygote:
    """study.run processes forked from one Python that imported its modules once (ZYGOTE); start() returns one
    that reads as the subprocess.Popen killed_at needs: pid (its session), poll(), wait(), returncode."""

    def __init__(self, spec: dict):
        from study import estimate, spec as specs

        self.speeds = estimate.cpu_speeds(specs.parse(spec))  # the worker's reading (conftest._calibrate_once)
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], env=env(), cwd=ROOT, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def start(self, argv: list, log: Path) -> "Zygote":
        self.proc.stdin.write(json.dumps({"argv": [str(a) for a in argv], "log": str(log), "speeds": self.speeds})
                              + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the zygote ended (exit {self.proc.wait()})"
        self.pid, self.returncode = int(line), None
        return self

    def poll(self):
        if self.returncode is None:
            try:
                os.kill(self.pid, 0)  # the zygote reaps it as it ends: then gone
                return None
            except ProcessLookupError:
                self.wait()
        return self.returncode

    def wait(self):
        if self.returncode is None:
            line = self.proc.stdout.readline()
            assert line, f"the zygote ended (exit {self.proc.wait()})"
            self.returncode = int(line)
        return self.returncode

    def close(self):
        self.proc.stdin.close()  # its loop ends
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def killed_at(argv: list, d: Path, when, log: Path, zygote: Zygote | None = None) -> str:
    """Run `argv` as its own session (with a `zygote`: study.run's arguments, run in a fork of it) and SIGKILL
    all of it (study.run, its Ray, the trials) once `when(d, trials told at the start)` holds; its output."""
    n0 = told(d)
    if zygote is not None:
        p = zygote.start(argv, log)
    else:
        with log.open("w") as out:
            p = subprocess.Popen(argv, env=env(), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    deadline = time.time() + 300
    try:
        while p.poll() is None and time.time() < deadline and not when(d, n0):
            time.sleep(0.005)
    finally:
        alive = p.poll() is None
        os.killpg(p.pid, signal.SIGKILL)  # study.run and Ray's raylet, GCS, ...
        p.wait()
        for _ in range(100):  # Ray's workers run in process groups of their own
            left = session(p.pid)
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if not left:
                break
            time.sleep(0.05)
    text = log.read_text()
    assert alive, f"it ended (exit {p.returncode}) before the instant:\n{text[-3000:]}"
    assert not session(p.pid), "processes of the killed run are left"
    return text


@pytest.mark.slow
def test_a_study_killed_at_each_instant_ends_whole_by_the_advised_command(tmp_path, tiny_data_dir, local_ray,
                                                                         capsys):
    spec = tiny_spec("k", train={"epochs": 1}, search={"num_samples": NUM_SAMPLES, "max_concurrent": 2},
                     retrain={"epochs": 1, "seeds": [0]}, render={"images": 1})
    space = write_spec(tmp_path, spec)
    d = tmp_path / "results" / "k"
    argv = study_cmd(space, tmp_path, tiny_data_dir)[3:]
    advised, says, done, ran = argv, "", set(), []
    zygote = Zygote(spec)  # each killed run a fork of it: Python's start and the imports paid once
    try:
        for i, (instant, when, then, state, then_says) in enumerate(INSTANTS):
            t0 = time.time()
            out = killed_at(advised, d, when, tmp_path / f"run{i}.txt", zygote)
            ran.append(f"{instant} ({time.time() - t0:.0f} s)")
            assert "Traceback" not in out and "error:" not in out and says in out, (ran, out[-3000:])
            if i:  # the previous run's lock, left by the kill: taken over with one line
                assert out.count("taking over the lock of a process that no longer runs") == 1, (ran, out[-3000:])
            done |= finished(d)  # the trials finished by this kill
            if then:
                then(d)
            where = Location.parse(str(d))
            # The kill lands a little after its cue: where the step is brief (the export: history.csv, then
            # trials.csv, then the retrain begins) the run may have reached the next instant, whose state then holds.
            late = INSTANTS[i + 1][3] if i + 1 < len(INSTANTS) else state
            assert lifecycle.read(where) in (state, late), (ran, lifecycle.read(where))
            # what study.run prints after an interruption; the same command, if refused, advises it too
            cmd = lifecycle.continuation(state, argv, can_retrain=True)
            same = lifecycle.decide(state, lifecycle.command(run.parse_args(argv)))
            assert cmd.verb == "start" if same.action != "refuse" else same.advice == cmd, (instant, same, cmd)
            advised, says = lifecycle.command_line(cmd, argv, where).split()[3:], then_says
    finally:
        zygote.close()
    p = in_process(capsys, run.main, *advised)  # the last advice runs to the end, here on the module's Ray
    assert p.returncode == 0 and "taking over the lock" in p.stdout, (ran, p.stdout[-3000:] + p.stderr[-3000:])
    trials = pd.read_csv(d / "trials.csv")
    assert len(trials) == NUM_SAMPLES and trials["trial_id"].is_unique, (ran, trials)
    status = dict(zip(trials["trial_id"], trials["status"]))
    assert done and all(status.get(t) == "finished" for t in done), (ran, done, status)
    assert (trials["status"] == "finished").all(), (ran, status)
    # Optuna's record too: each trial once, none left running; a trial asked just before a kill, which Ray
    # never ran, is failed and says so (SilentAwareOptunaSearch.reconcile)
    with closing(sqlite3.connect(d / "optuna.db")) as c:
        states = c.execute("SELECT state, EXISTS (SELECT 1 FROM trial_user_attributes a WHERE a.trial_id = t.trial_id"
                           " AND a.key = 'orphan') FROM trials t").fetchall()
    assert [s for s, orphan in states if not orphan] == ["COMPLETE"] * NUM_SAMPLES, (ran, states)
    assert all(s == "FAIL" for s, orphan in states if orphan), (ran, states)
    assert (d / "best" / "summary.yaml").is_file() and (d / "best" / "spikes").is_dir(), ran
    assert lifecycle.read(Location.parse(str(d))) == "ended" and not (d / lifecycle.LOCK).exists(), ran
    # timing.yaml counts every run since the start afresh, the killed ones too (each wrote its entry as it began,
    # brought up to date after each phase): the kill in the export lost none of its search (it used to lose them all)
    import yaml

    runs = yaml.safe_load((d / "timing.yaml").read_text())["runs"]
    assert [bool(r.get("running")) for r in runs] == [True] * (len(INSTANTS) - 1) + [False], (ran, runs)
    assert "search" in runs[INSTANTS.index(next(i for i in INSTANTS if i[0] == "the export began")) - 1]["phases_s"], runs


def test_a_resumed_searcher_keeps_what_optuna_recorded_after_its_last_save(tmp_path):
    """What the sweep's kill right after a trial's end hits by chance, every time: Optuna was told
    a trial's end, and asked a new trial, after Ray last saved the searcher. Restored from that
    save, the ended trial's repeated end and results change nothing (they raised
    UpdateFinishedTrialError, and Ray marked the finished trial errored); the trial Ray never ran
    is failed, its enqueued configuration enqueued again."""
    import optuna

    from study import spec as specs
    from study.stopping import SilentAwareOptunaSearch

    spec = specs.parse(tiny_spec("s"), "s.yaml")
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(storage=url, study_name="s", direction="maximize")
    searcher = SilentAwareOptunaSearch(space=specs.define_by_run(spec), metric="val_acc", mode="max",
                                       study_name="s", storage=optuna.storages.RDBStorage(url), silent_rate=0.001)
    searcher.suggest("a")
    searcher.save(str(tmp_path / "searcher.pkl"))  # Ray's last save; then, before the kill:
    study.enqueue_trial({"channels": 6, "lr": 0.01}, user_attrs={"warm_start": "x"})  # a warm start's best
    asked = searcher.suggest("b")  # the enqueued configuration, asked
    ended = {"val_acc": 0.5, "fr_12": 0.0, "training_iteration": 1}  # a silent output layer: told so too
    searcher.on_trial_result("a", ended)
    searcher.on_trial_complete("a", ended)
    SilentAwareOptunaSearch.resume_url = url
    try:
        searcher.restore(str(tmp_path / "searcher.pkl"))
    finally:
        SilentAwareOptunaSearch.resume_url = None
    searcher.on_trial_result("a", ended)  # Ray runs trial a's end again
    searcher.on_trial_complete("a", ended)
    states = [(t.state.name, t.values, t.user_attrs) for t in study.get_trials()]
    # Ray's trial id beside Optuna's number: Optuna numbers from 0 and counts the orphan, trials.csv does neither
    assert states[0] == ("COMPLETE", [0.5], {"silent": "fr_12", "ray_trial_id": "a"}), states
    assert states[1][0] == "FAIL" and "orphan" in states[1][2] and states[2][0] == "WAITING", states
    assert searcher.suggest("c") == asked and study.trials[-1].user_attrs["warm_start"] == "x"
