"""study/lifecycle.py: a study folder's state and the one table of what each command may do there."""
import itertools
import shutil

import pytest

from study import lifecycle
from study.lifecycle import STATES, Command, decide
from study.run import parse_args
from study.storage import Location

COMMANDS = [Command(verb, warm, no_retrain) for verb, warm, no_retrain
            in itertools.product(("start", "resume", "retrain"), (False, True), (False, True))] + [lifecycle.ANALYZE]
ARGV = ["space.yaml", "--storage", "res", "--warm-start", "results/old", "--num-samples", "3"]


def typed(cmd: Command) -> list[str]:
    """The command line a user types for `cmd`."""
    argv = ["space.yaml", "--storage", "res"] + (["--warm-start", "results/old"] if cmd.warm_start else [])
    return argv + [f for f, on in (("--resume", cmd.verb == "resume"), ("--retrain", cmd.verb == "retrain"),
                                   ("--no-retrain", cmd.no_retrain)) if on]


@pytest.mark.parametrize("state,cmd,can_retrain", list(itertools.product(STATES, COMMANDS, (True, False))))
def test_every_refusal_advises_a_command_its_state_accepts(state, cmd, can_retrain):
    """No dead end: what a refusal tells the user to run is accepted in that same state, and the
    command line it prints means that command; a message that mentions --retrain is said only
    where --retrain is accepted."""
    d = decide(state, cmd, can_retrain)
    assert d.action in lifecycle.ACTIONS
    if "--retrain" in d.why and "--no-retrain" not in d.why:
        assert decide(state, Command("retrain"), can_retrain).action == "retrain", (state, cmd, d.why)
    if d.action != "refuse" or d.advice is None:
        return
    assert decide(state, d.advice, can_retrain).action != "refuse", (state, cmd, d)
    line = lifecycle.command_line(d.advice, typed(cmd), "res/x")
    if d.advice.verb == "analyze":
        assert line == "python -m study.analyze res/x"
        return
    args = parse_args(line.split()[3:])
    assert lifecycle.command(args) == d.advice, line
    assert lifecycle.refusal(d, typed(cmd), "res/x").endswith(line)


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("can_retrain", (True, False))
@pytest.mark.parametrize("argv", (ARGV, ARGV + ["--no-retrain"], ARGV + ["--resume"]))
def test_the_advice_after_an_interruption_is_accepted(state, can_retrain, argv):
    cmd = lifecycle.continuation(state, argv, can_retrain)
    if state == "foreign":  # no study.run leaves one: only another folder will do
        return
    assert decide(state, cmd, can_retrain).action != "refuse", (state, cmd)
    assert cmd.verb != "retrain" or can_retrain


def test_what_each_state_allows():
    """The table read as a user would: the one command that goes on, per state."""
    go_on = {s: [c for c in COMMANDS if decide(s, c).action not in ("refuse", "read")] for s in STATES}
    assert {c.verb for c in go_on["absent"]} == {c.verb for c in go_on["unstarted"]} == {"start"}
    assert {c.verb for c in go_on["interrupted"]} == {"resume"} and not go_on["foreign"]
    assert decide("interrupted", Command("resume", warm_start=True)).advice == Command("resume")
    assert decide("ended", Command("resume")).action == "nothing"
    assert decide("retrain_cut", Command("resume")).action == "finish_retrain"
    assert decide("retrain_cut", Command("resume", no_retrain=True)).action == "nothing"
    assert decide("ended", Command("retrain")).action == "retrain"


def test_the_state_of_real_folders(tiny_study, tmp_path):
    """Each state read off a folder: a real ended study, and what an interruption leaves of one."""
    ended, _ = tiny_study
    read = lambda p: lifecycle.read(Location.parse(str(p)))  # noqa: E731
    assert read(tmp_path / "none") == "absent"
    (tmp_path / "empty").mkdir()
    assert read(tmp_path / "empty") == "absent"
    assert read(ended) == "ended"
    cut = shutil.copytree(ended, tmp_path / "cut", ignore=shutil.ignore_patterns("report"))
    (cut / "retrain.pending").write_text("retrain\n")
    assert read(cut) == "retrain_cut"
    searching = shutil.copytree(ended, tmp_path / "searching", ignore=shutil.ignore_patterns("trials.*"))
    assert read(searching) == "interrupted"
    # killed between the export's files (trials.csv is its last): --resume exports again; a table
    # without Ray's state is read as it was written
    exporting = shutil.copytree(ended, tmp_path / "exporting", ignore=shutil.ignore_patterns("trials.csv"))
    assert read(exporting) == "interrupted"
    shutil.rmtree(exporting / "ray")
    assert read(exporting) == "ended"
    # killed while Ray wrote its Tuner state (0 bytes), or before its first save: nothing to continue
    first = lambda folder, names: [n for n in names if folder == str(searching) and n not in lifecycle.LEFTOVERS]  # noqa: E731
    empty = shutil.copytree(searching, tmp_path / "empty-pkl", ignore=first)
    assert read(empty) == "interrupted"
    (empty / "ray" / "tuner.pkl").write_bytes(b"")
    unsaved = shutil.copytree(searching, tmp_path / "unsaved", ignore=lambda f, names: first(f, names) + [
        n for n in names if n.startswith("experiment_state")])
    assert read(empty) == read(unsaved) == "unstarted"
    # killed just after Ray saved its experiment state, before its searcher's: Ray's restore would fail
    # (EOFError) and restart from nothing; read as never started (it was "interrupted", and --resume misbehaved)
    cut_searcher = shutil.copytree(searching, tmp_path / "cut-searcher", ignore=first)
    assert read(cut_searcher) == "interrupted"
    next((cut_searcher / "ray").glob("search_gen_state-*.json")).write_bytes(b"")
    assert read(cut_searcher) == "unstarted"
    unstarted = tmp_path / "unstarted"
    unstarted.mkdir()
    for name in ("spec.yaml", "environment.yaml", "estimate.yaml", "warm_start.yaml"):
        shutil.copy(ended / "spec.yaml", unstarted / name)
    (unstarted / "ray").mkdir()  # Ray had made its folder, but saved nothing it can restore
    assert read(unstarted) == "unstarted"
    (unstarted / "notes.txt").write_text("mine")
    assert read(unstarted) == "foreign"
    # estimate.yaml is written before spec.yaml and the first trial: a Ctrl-C then leaves a folder
    # that the same command starts afresh, not one refused with and without --resume
    first = tmp_path / "first"
    first.mkdir()
    (first / "estimate.yaml").write_text("wall_s: 1\n")
    assert read(first) == "unstarted"


def test_one_writer_per_study_folder(tiny_study, tiny_data_dir, tmp_path, capsys):
    """A second study.run on a folder another process writes is refused with who holds it;
    study.analyze reads it meanwhile; a lock whose process is gone is taken over."""
    import os
    import socket
    import subprocess

    from conftest import TINY_STUDY, in_process, study_cmd, tiny_spec, write_spec
    from study import analyze, reproduce, run

    results_dir = tmp_path / "results"
    d = shutil.copytree(tiny_study[0], results_dir / "e2e", ignore=shutil.ignore_patterns("report"))
    space = write_spec(tmp_path, tiny_spec("e2e", **TINY_STUDY))
    mine = lifecycle.take_lock(Location.parse(str(d)), "python -m study.run this test")
    assert mine == f"{socket.gethostname()} pid {os.getpid()}: python -m study.run this test"
    for flags in ([], ["--resume"], ["--retrain"]):  # in this process: refused before Ray or the data
        p = in_process(capsys, run.main, *study_cmd(space, tmp_path, tiny_data_dir, *flags)[3:])
        assert p.returncode == 2 and f"is being written by {mine}" in p.stderr, p.stderr[-2000:]
    p = in_process(capsys, reproduce.main, d, "--data-dir", tiny_data_dir)
    assert p.returncode == 2 and f"is being written by {mine}" in p.stderr and not (d / "reproduce").exists(), p.stderr
    p = in_process(capsys, analyze.main, d)
    # an ended study: its search is whole (it used to say "this is the study so far")
    assert p.returncode == 0 and f"is being written by {mine}: its search has ended" in p.stdout, p.stderr
    assert "so far" not in p.stdout
    lifecycle.release_lock(Location.parse(str(d)), mine)
    assert not (d / lifecycle.LOCK).exists()

    gone = subprocess.Popen(["true"])
    gone.wait()
    (d / lifecycle.LOCK).write_text(f"{socket.gethostname()} pid {gone.pid}: python -m study.run killed\n")
    assert lifecycle.holder(Location.parse(str(d))) is None
    again = lifecycle.take_lock(Location.parse(str(d)), "python -m study.reproduce")
    assert f"taking over the lock of a process that no longer runs ({socket.gethostname()} pid {gone.pid}" \
        in capsys.readouterr().out
    assert (d / lifecycle.LOCK).read_text().splitlines()[:2] == [again, f"folder: {d}"]


def test_two_identical_studies_at_once(tiny_data_dir, tmp_path, capsys):
    """The second of two identical commands is refused; it used to delete the first's optuna.db."""
    import subprocess
    import time

    from conftest import calibrated, env, in_process, study_cmd, tiny_spec, write_spec
    from study import run

    # the least study that runs (one trial of one epoch), on this worker's reading of the CPU (no calibration)
    spec = tiny_spec("twice", train={"epochs": 1}, search={"num_samples": 1, "max_concurrent": 1},
                     retrain={"seeds": []})
    space = write_spec(tmp_path, spec)
    first = subprocess.Popen(calibrated(study_cmd(space, tmp_path, tiny_data_dir), spec), env=env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lock = tmp_path / "results" / "twice" / lifecycle.LOCK
    deadline = time.time() + 120
    while not lock.exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    assert lock.exists(), first.communicate()[0][-2000:]
    second = in_process(capsys, run.main, *study_cmd(space, tmp_path, tiny_data_dir)[3:])
    assert second.returncode == 2 and f"pid {first.pid}: python -m study.run" in second.stderr, second.stderr
    # The first runs to its end (seconds), whole: Ctrl-C is test_interrupts' (a SIGINT here could land while
    # the first starts a Python child of Ray's, whose "Exception ignored ... KeyboardInterrupt" is not the study's).
    out = first.communicate(timeout=180)[0]
    assert first.returncode == 0 and "Traceback" not in out and "Best trial" in out, out[-3000:]
    assert not lock.exists()


def test_study_run_reads_the_folder_under_its_lock(tiny_study, tiny_data_dir, tmp_path, capsys, monkeypatch):
    """study.run takes the lock before it reads the folder's state (no other process acts between what it
    reads and what it does), but for --dry-run, which writes nothing; a refused command leaves no folder
    behind. (lifecycle.read is watched, not replaced: it reads the real folder.)"""
    from conftest import TINY_STUDY, in_process, study_cmd, tiny_spec, write_spec
    from study import run

    d = shutil.copytree(tiny_study[0], tmp_path / "results" / "e2e", ignore=shutil.ignore_patterns("report"))
    space = write_spec(tmp_path, tiny_spec("e2e", **TINY_STUDY))
    locked, real_read = [], lifecycle.read
    monkeypatch.setattr(lifecycle, "read", lambda folder: (locked.append((folder / lifecycle.LOCK).is_file()),
                                                           real_read(folder))[1])
    p = in_process(capsys, run.main, *study_cmd(space, tmp_path, tiny_data_dir, "--resume")[3:])
    assert p.returncode == 0 and "nothing to resume" in p.stdout, p.stderr
    assert locked == [True] and not (d / lifecycle.LOCK).exists()
    locked.clear()
    p = in_process(capsys, run.main, *study_cmd(space, tmp_path, tiny_data_dir, "--resume", "--dry-run")[3:])
    assert p.returncode == 0 and locked == [False], p.stderr
    locked.clear()
    fresh = tmp_path / "fresh"  # a --storage that does not exist yet: --resume there is refused
    p = in_process(capsys, run.main, space, "--storage", fresh / "results", "--data-dir", tiny_data_dir, "--resume")
    assert p.returncode == 2 and "holds no study yet; start the study" in p.stderr, p.stderr
    assert locked == [True] and not fresh.exists()


def test_the_lock_is_held_once_by_processes_racing_for_it(tmp_path):
    """Four real processes take the lock at once, many rounds over, with the project's own function: on
    a folder with no lock, and on one whose lock a killed process left; in no round do two hold it, and
    none ends in a traceback. (The lock existed empty for a moment, read as no holder; a stale lock was
    checked, then deleted: two holders in 4 of 30 tries, and FileNotFoundError.)"""
    import multiprocessing
    import socket
    import subprocess

    import lockrace

    d = tmp_path / "study"
    d.mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()
    ctx = multiprocessing.get_context("spawn")
    racers, rounds = 4, 40
    barrier, results = ctx.Barrier(racers + 1), ctx.Queue()
    procs = [ctx.Process(target=lockrace.racer, args=(str(d), rounds, barrier, results)) for _ in range(racers)]
    for p in procs:
        p.start()
    try:
        for r in range(rounds):
            if r % 2:  # a lock its process, killed, left behind
                (d / lifecycle.LOCK).write_text(f"{socket.gethostname()} pid {gone.pid}: python -m study.run killed\n")
            barrier.wait(timeout=60)
            barrier.wait(timeout=60)
            barrier.wait(timeout=60)
            assert not (d / lifecycle.LOCK).exists(), f"round {r}: the lock outlived its holder"
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    got = [results.get(timeout=10) for _ in range(racers * rounds)]
    held = {r: [pid for rr, pid, g in got if rr == r and g == "held"] for r in range(rounds)}
    odd = [(r, g) for r, _, g in got if g not in ("held", "refused")]
    assert not odd, odd[:5]
    assert all(len(h) == 1 for h in held.values()), {r: h for r, h in held.items() if len(h) != 1}


def test_a_damaged_copied_or_reused_lock(tiny_study, tiny_data_dir, tmp_path, capsys):
    """A lock that is not text, empty or a folder is one line naming it and how to remove it, in study.run,
    study.reproduce and study.analyze (it was a UnicodeDecodeError traceback, or "being written by None");
    the lock of a folder this one was copied from, and one whose pid now runs another program, are stale
    (they were refused, naming a process that writes another folder, or for ever)."""
    import socket
    import subprocess

    from conftest import TINY_STUDY, in_process, study_cmd, tiny_spec, write_spec
    from study import analyze, reproduce, run

    d = shutil.copytree(tiny_study[0], tmp_path / "results" / "e2e", ignore=shutil.ignore_patterns("report"))
    space = write_spec(tmp_path, tiny_spec("e2e", **TINY_STUDY))
    lock = d / lifecycle.LOCK
    for damage, what in ((lambda: lock.write_bytes(b"\xff\xfe\x00junk"), "not text"),
                         (lambda: lock.write_bytes(b""), "empty"), (lambda: lock.mkdir(), "a folder")):
        damage()
        line = f"{lock}: a damaged lock ({what}"
        p = in_process(capsys, run.main, *study_cmd(space, tmp_path, tiny_data_dir, "--resume")[3:])
        assert p.returncode == 2 and line in p.stderr and "rm -r" in p.stderr and "Traceback" not in p.stderr, p.stderr
        # a dry run takes no lock but says what the command would meet (it said "valid", review of issue 34)
        p = in_process(capsys, run.main, *study_cmd(space, tmp_path, tiny_data_dir, "--retrain", "--dry-run")[3:])
        assert p.returncode == 2 and line in p.stderr and "without --dry-run would be refused" in p.stderr \
            and "valid" not in p.stdout, p.stdout + p.stderr
        p = in_process(capsys, reproduce.main, d, "--data-dir", tiny_data_dir, "--epochs", "1")
        assert p.returncode == 2 and line in p.stderr and "Traceback" not in p.stderr, p.stderr
        p = in_process(capsys, analyze.main, d, "--out", tmp_path / "report")
        assert p.returncode == 0 and line in p.stderr and "being written" not in p.stdout, p.stdout + p.stderr
        shutil.rmtree(lock) if lock.is_dir() else lock.unlink()

    # copied while its study ran: the copy's lock is the original's
    where = Location.parse(str(d))
    mine = lifecycle.take_lock(where, "python -m study.run the original")
    try:
        p = in_process(capsys, run.main, *study_cmd(space, tmp_path, tiny_data_dir, "--retrain", "--dry-run")[3:])
        assert p.returncode == 2 and f"is being written by {mine}" in p.stderr, p.stdout + p.stderr  # held: refused too
        copy = shutil.copytree(d, tmp_path / "copy" / "e2e")
        assert lifecycle.holder(Location.parse(str(copy))) is None
        theirs = lifecycle.take_lock(Location.parse(str(copy)), "python -m study.run the copy")
        assert f"taking over the lock of another folder ({mine})" in capsys.readouterr().out
        lifecycle.release_lock(Location.parse(str(copy)), theirs)
        assert lifecycle.holder(where) == mine  # the original's is untouched
    finally:
        lifecycle.release_lock(where, mine)
    # a stale lock whose pid (after a reboot) is another program's now
    other = subprocess.Popen(["sleep", "30"])
    try:
        lock.write_text(f"{socket.gethostname()} pid {other.pid}: python -m study.run {space}\n")
        assert lifecycle.holder(where) is None
    finally:
        other.kill()
        other.wait()


def test_a_start_afresh_removes_only_what_a_run_wrote(tiny_data_dir, tmp_path, capsys, local_ray):
    """A kill while Optuna created optuna.db leaves SQLite's rollback journal: the folder is unstarted and
    its same command starts it afresh (it was "foreign", refused by every command). An optuna.db holding
    finished trials, or a report/ holding a person's own file, is never deleted by that start: it is
    refused with the reason (both used to be deleted, with one line saying "starting the study afresh")."""
    import subprocess
    import sys

    import optuna
    import pandas as pd

    from conftest import run_study, tiny_spec, write_spec

    space = write_spec(tmp_path, tiny_spec("j", train={"epochs": 1}, search={"num_samples": 1, "max_concurrent": 1},
                                           retrain={"seeds": []}))
    d = tmp_path / "results" / "j"
    d.mkdir(parents=True)
    shutil.copy(space, d / "spec.yaml")
    (d / "report").mkdir()
    (d / "report" / "report.md").write_text("# j\n")  # what study.analyze wrote
    kill = ("import os, signal, sqlite3, sys; c = sqlite3.connect(sys.argv[1], isolation_level=None); c.execute('BEGIN');"
            " c.execute('CREATE TABLE studies (v)'); c.execute('INSERT INTO studies VALUES (1)');"
            " os.kill(os.getpid(), signal.SIGKILL)")
    subprocess.run([sys.executable, "-c", kill, d / "optuna.db"])  # killed while it wrote the database's first table
    assert (d / "optuna.db-journal").is_file()
    assert lifecycle.read(Location.parse(str(d))) == "unstarted"
    p = run_study(capsys, space, tmp_path, tiny_data_dir, "--resume")
    assert p.returncode == 2 and "holds only what a run writes before Ray records its first trial; start the study" \
        in p.stderr, p.stderr
    p = run_study(capsys, space, tmp_path, tiny_data_dir)
    assert p.returncode == 0 and "starting the study afresh" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
    assert len(pd.read_csv(d / "trials.csv")) == 1 and not (d / "optuna.db-journal").exists()

    # the files of an ended study (its database of finished trials) where a run left only its leftovers
    k = tmp_path / "results" / "k"
    k.mkdir()
    space = write_spec(tmp_path, tiny_spec("k"))
    shutil.copy(space, k / "spec.yaml")
    shutil.copy(d / "optuna.db", k / "optuna.db")
    told = optuna.load_study(study_name="j", storage=f"sqlite:///{k / 'optuna.db'}")
    told.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=0.5))
    for flags in ([], ["--dry-run"]):
        p = run_study(capsys, space, tmp_path, tiny_data_dir, *flags)
        assert p.returncode == 2 and f"{k / 'optuna.db'} with 2 finished trials but no Ray state to resume from" in p.stderr \
            and "move it away" in p.stderr, p.stdout + p.stderr
    assert (k / "optuna.db").is_file() and (k / "spec.yaml").is_file() and "starting" not in p.stdout
    (k / "optuna.db").unlink()
    (k / "report").mkdir()
    (k / "report" / "notes.txt").write_text("mine")
    p = run_study(capsys, space, tmp_path, tiny_data_dir)
    assert p.returncode == 2 and "with files study.analyze does not write" in p.stderr and "notes.txt" in p.stderr, \
        p.stderr
    assert (k / "report" / "notes.txt").read_text() == "mine"


# `python -m MODULE ARGS` commands one after another in one interpreter (runpy, as python -m runs them), each with
# its own stdout and stderr (file descriptors 1 and 2: also what Ray or pyarrow write there) and exit code, as a
# shell's `cmd > NAME.out 2> NAME.err; echo $? > NAME.rc` would leave them: the imports (torch, Ray: seconds) are
# paid once, not per command. Each command's warnings are shown as in a process of its own (catch_warnings).
COMMANDS_IN_ONE = r"""
import json, os, runpy, sys, traceback, warnings
jobs, logs = json.load(open(sys.argv[1])), sys.argv[2]
own = os.dup(1), os.dup(2)
for name, module, *args in jobs:
    code = 0
    with open(f"{logs}/{name}.out", "w") as out, open(f"{logs}/{name}.err", "w") as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.argv = [module, *args]
        try:
            with warnings.catch_warnings():  # runpy's own, on a module an earlier command imported: not the command's
                warnings.filterwarnings("ignore", "'.*' found in sys.modules after import of package", RuntimeWarning)
                runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            code = 1
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(own[0], 1)
            os.dup2(own[1], 2)
    with open(f"{logs}/{name}.rc", "w") as rc:
        rc.write(f"{code}\n")
"""


def test_read_only_and_full_study_folders(tiny_study, tiny_data_dir, tmp_path):
    """Someone else's study, mounted read-only: study.analyze prints its leaderboard and says where the report
    could not be written (--out writes it elsewhere); --resume, --retrain and study.reproduce are refused in
    one line before anything starts. A full disk: one line saying so, the folder and the command that goes on.
    (Each was a traceback.) Real mounts, in a mount namespace of the test's own (unshare, as root)."""
    import json
    import shlex
    import subprocess
    import sys

    from conftest import TINY_STUDY, env, tiny_spec, write_spec

    ro = shutil.copytree(tiny_study[0], tmp_path / "ro" / "e2e", ignore=shutil.ignore_patterns("report"))
    full = tmp_path / "full"
    full.mkdir()
    space = write_spec(tmp_path, tiny_spec("e2e", **TINY_STUDY))
    logs = tmp_path / "logs"
    logs.mkdir()
    runs = {  # name: python -m MODULE ARGS (in the namespace, after the mounts)
        "analyze": ["study.analyze", ro],
        "analyze_out": ["study.analyze", ro, "--out", tmp_path / "elsewhere"],
        "resume": ["study.run", space, "--storage", ro.parent, "--data-dir", tiny_data_dir, "--resume"],
        "retrain": ["study.run", space, "--storage", ro.parent, "--data-dir", tiny_data_dir, "--retrain"],
        "reproduce": ["study.reproduce", ro, "--data-dir", tiny_data_dir, "--epochs", "1"],
        "full_retrain": ["study.run", space, "--storage", full, "--data-dir", tiny_data_dir, "--retrain"],
        "full_analyze": ["study.analyze", full / "e2e"],
    }
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps([[name, *map(str, cmd)] for name, cmd in runs.items()]))
    script = "\n".join([
        "set -e", f"mount --bind {ro} {ro}", f"mount -o remount,bind,ro {ro}",
        f"mount -t tmpfs -o size=64m tmpfs {full}", f"cp -r {ro} {full}/e2e",
        f"dd if=/dev/zero of={full}/filler bs=64k 2>/dev/null || true",
        shlex.join([sys.executable, "-c", COMMANDS_IN_ONE, str(jobs), str(logs)])])
    p = subprocess.run(["unshare", "--mount", "sh", "-c", script], env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    out = {n: ((logs / f"{n}.out").read_text(), (logs / f"{n}.err").read_text(), int((logs / f"{n}.rc").read_text()))
           for n in runs}
    for name, (stdout, stderr, rc) in out.items():
        assert "Traceback" not in stdout + stderr and len(stderr.strip().splitlines()) <= 1, (name, stdout, stderr)
    stdout, stderr, rc = out["analyze"]
    assert rc == 1 and "trials read from" in stdout and f"the report could not be written in {ro / 'report'}" in stderr \
        and "--out DIR" in stderr, (stdout, stderr)
    assert out["analyze_out"][2] == 0 and (tmp_path / "elsewhere" / "report.md").is_file(), out["analyze_out"]
    for name in ("resume", "retrain", "reproduce"):
        stdout, stderr, rc = out[name]
        assert rc == 2 and f"{ro}: a read-only file system" in stderr and "cp -r" in stderr, (name, stdout, stderr)
        assert "reproducing" not in stdout, stdout
    assert not (ro / lifecycle.LOCK).exists() and not (ro / "reproduce").exists()
    stdout, stderr, rc = out["full_retrain"]
    assert rc == 1 and "error: the disk is full" in stderr and str(full / "e2e") in stderr \
        and "study.run" in stderr and "--retrain" in stderr, (stdout, stderr)
    stdout, stderr, rc = out["full_analyze"]
    assert rc == 1 and "trials read from" in stdout and "the disk is full" in stderr, (stdout, stderr)


def test_small_refusals_say_what_is_so(tiny_study, tiny_data_dir, tmp_path, capsys):
    """A refused dry run advises the dry run (typed without --dry-run, the advice ran the whole study);
    study.reproduce of a study with no trial says so (it said "pass --trial ID", and no ID exists)."""
    from conftest import in_process, study_cmd, tiny_spec, write_spec
    from study import reproduce, run

    space = write_spec(tmp_path, tiny_spec("dry"))
    p = in_process(capsys, run.main, *study_cmd(space, tmp_path, tiny_data_dir, "--resume", "--dry-run")[3:])
    assert p.returncode == 2 and "start the study: python -m study.run" in p.stderr, p.stderr
    assert p.stderr.rstrip().endswith("--dry-run") and "--resume" not in p.stderr.split(":", 1)[1], p.stderr
    d = tmp_path / "none"
    d.mkdir()
    shutil.copy(tiny_study[0] / "spec.yaml", d / "spec.yaml")
    for name in ("trials.csv", "history.csv"):
        (d / name).write_text((tiny_study[0] / name).read_text().splitlines()[0] + "\n")
    p = in_process(capsys, reproduce.main, d, "--data-dir", tiny_data_dir)
    assert p.returncode == 2 and "has no trial yet: nothing to reproduce" in p.stderr and "--trial" not in p.stderr, \
        p.stderr
