"""python -m study.run SPACE.yaml: an Optuna search run by Ray Tune, then the best configuration retrained.

  YAML -> StudySpec -> Ray (local, or --address) -> resources planned from the cluster's GPUs
  -> every node checked to see --storage -> Tuner(trainable, OptunaSearch, ASHA).fit()
  -> STORAGE/<name>/{spec.yaml, trials.csv, trials.parquet, history.csv, best.yaml}
  -> retrain/ (one Ray trial per seed, at once) -> best/ (metrics, checkpoints, placement) -> best/spikes/
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys

if __name__ == "__main__":  # Ctrl-C while the imports below run (seconds): one line, not a traceback
    signal.signal(signal.SIGINT, lambda *_: (print("interrupted while starting; nothing was written",
                                                   file=sys.stderr), os._exit(130)))
import time
from pathlib import Path

import pyarrow.fs as pafs
import yaml

from csnn import data as fmnist, yamlio
from csnn.argtypes import leave, positive_int, spelled
from csnn.config import TUTORIAL_ACC
from csnn.gpus import older_line, older_than_tested
from study import analyze, environment, estimate, lifecycle, results, spec as specs, warmstart
from study.plan import PlanError, check_machine, cluster, plan
from study.lifecycle import UsageError
from study.tuning import (RetrainInterrupted, check_moved, check_optuna_storage, mark_retrain, optuna_url,
                          own_database, own_optuna_storage, retrain, search, shown_url)
from study.storage import Location, StorageError, check_nodes_see, disk_full


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m study.run", description=__doc__.split("\n")[0])
    p.add_argument("space", help="search-space YAML file")
    p.add_argument("--resume", action="store_true", help="continue an interrupted study (search or retrain)")
    p.add_argument("--retrain", action="store_true", help="retrain the best configuration of a finished study again")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--storage", default="results",
                   help="where results go, STORAGE/<name>/: a folder (on a cluster, one every node mounts: NFS) "
                        "or a URI pyarrow opens (s3://bucket/path, gs://...) (default: results)")
    p.add_argument("--optuna-storage", default=None, metavar="URL",
                   help="Optuna's database, e.g. postgresql://user:pw@host/db (default: SQLite on the driver's disk)")
    p.add_argument("--allow-cpu", action="store_true",
                   help="run a study that asks for GPUs on a cluster without any, on its CPUs")
    p.add_argument("--allow-pending-gpus", action="store_true",
                   help="keep the GPU requests on a cluster with no GPU yet (an autoscaler adds GPU nodes)")
    p.add_argument("--num-samples", type=positive_int, default=None, help="override search.num_samples")
    p.add_argument("--no-retrain", action="store_true", help="skip retraining the best configuration")
    p.add_argument("--warm-start", action="append", default=[], metavar="STUDY_DIR",
                   help="start from an earlier study (repeatable): its ended trials that fit this space and its fixed "
                        "settings are told to the sampler, its best configuration runs first")
    p.add_argument("--dry-run", action="store_true",
                   help="validate and print the resolved study and its estimated cost (estimate: ...); start nothing")
    p.add_argument("--verbose", action="store_true",
                   help="print Ray Tune's status tables too (default: one line per change of the search)")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: $CSNN_DATA, then Debian's)")
    p.add_argument("--download", action="store_true", help="download Fashion-MNIST with torchvision if not found")
    return p.parse_args(argv)


def check_address(address: str | None, source: str = "--address", timeout_s: float = 10) -> None:
    """A Ray address that can work, checked in a bounded time before anything is written:
    local, auto, HOST:PORT or ray://HOST:PORT with something listening there. Ray itself
    retries a GCS that is not there for ever (HOST:PORT) or fails after ~36 s with a traceback (ray://)."""
    import socket

    if not address or address in ("local", "auto"):
        return
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"{source} {address}: not a Ray address; give HOST:PORT (the head's, e.g. 10.0.0.1:6379), "
                         "ray://HOST:PORT (Ray Client), auto or local")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise UsageError(f"{source} {address}: nothing answers there ({e.strerror or type(e).__name__}); start the "
                         "head first (ray start --head --port=6379, see the README's cluster lines) or check the "
                         "address") from None


def main(argv=None) -> int:
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on Ctrl-C is a KeyboardInterrupt
    args = parse_args(argv)
    args.study_dir = None  # set by _main once known: what a Ctrl-C message advises depends on it
    args.can_retrain = True
    args.lock = None  # the study folder's lock, once taken
    args.made = []  # the folders taking it made
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as typed: what the advice repeats
    # A Ray its caller started (a notebook's, the tests') is the caller's to stop: left up.
    ours = "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
    try:
        return _main(args)
    except (specs.SpecError, fmnist.DataError, results.StudyError, UsageError) as e:
        print(f"error: {spelled(str(e), '--')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside Ray Tune's own handling (imports, Ray's start, loading, exporting)
        print(f"interrupted; {next_step(args)}", file=sys.stderr)
        return 130
    except OSError as e:  # a full disk, wherever it struck (a table, a checkpoint, the retrain's upload)
        if not disk_full(e):
            raise
        where, d = e.filename or args.study_dir or args.storage, args.study_dir
        then = "run the same command again" if d is None else lifecycle.command_line(
            lifecycle.continuation(lifecycle.read(d), args.argv, args.can_retrain), args.argv, d)
        print(f"error: the disk is full: {where} could not be written ({e.strerror or e}); free space there, "
              f"then: {then}", file=sys.stderr)
        return 1
    finally:
        if ours and "ray" in sys.modules:  # here rather than at exit, where a second Ctrl-C would be a traceback
            try:
                sys.modules["ray"].shutdown()
            except KeyboardInterrupt:
                pass
        if args.lock:
            lifecycle.release_lock(args.study_dir, args.lock)
            for folder in args.made:  # a refused command leaves no empty folder behind (deepest first)
                with contextlib.suppress(OSError):  # not empty (written meanwhile): kept
                    folder.rmdir()
        if __name__ == "__main__":  # done: a Ctrl-C while the interpreter exits changes nothing
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def next_step(args) -> str:
    """What to run after an interruption, from what the study folder holds (lifecycle's table)."""
    return lifecycle.next_step(args.study_dir, args.argv, args.can_retrain)


def _main(args) -> int:
    if args.address is not None:
        check_address(args.address)
    elif os.environ.get("RAY_ADDRESS"):
        check_address(os.environ["RAY_ADDRESS"], "RAY_ADDRESS")
    spec = specs.load(args.space)
    if args.num_samples is not None:  # stored in spec.yaml with the study: --resume and --retrain read it there
        spec.search["num_samples"] = args.num_samples
    try:
        storage = Location.parse(args.storage)
        if storage.local is not None and storage.is_file():
            raise UsageError(f"--storage {args.storage}: is a file; name a folder (or a URI) for the results")
        storage.check_writable()  # before any other question to a remote storage: this one has a time limit
        if storage.is_file():
            raise UsageError(f"--storage {args.storage}: is a file; name a folder (or a URI) for the results")
        study_dir = storage / spec.name
        if study_dir.is_file():
            raise UsageError(f"{study_dir}: is a file, not a study folder; remove it or choose another name or --storage")
        args.study_dir = study_dir
    except StorageError as e:
        raise UsageError(str(e)) from None
    except OSError as e:
        raise UsageError(f"--storage {args.storage}: cannot read it ({e})") from None
    if args.optuna_storage is not None:
        check_optuna_storage(args.optuna_storage, spec.name, args.resume or args.retrain)
    if "" in args.warm_start:
        raise UsageError("--warm-start '': name the folder of an earlier study (results/<name>)")
    try:
        sources = [Location.parse(w) for w in args.warm_start]
    except StorageError as e:
        raise UsageError(f"--warm-start: {e}") from None
    same = lambda loc: str(loc.local.resolve()) if loc.local is not None else loc.shown  # noqa: E731 (file:// = a path)
    for w, loc in zip(args.warm_start, sources):
        if same(loc) == same(study_dir):
            raise UsageError(f"--warm-start {w}: that is this study's own folder; name an earlier study")
        if [same(x) for x in sources].count(same(loc)) > 1:
            raise UsageError(f"--warm-start {w}: given twice; its trials would be told twice")
    if not args.dry_run and (why := lifecycle.unwritable(study_dir)):  # someone else's study, say: refused whole
        raise UsageError(f"{study_dir}: {why}; study.run writes the study folder (its lock, then the trials). To "
                         f"go on with a copy: cp -r {study_dir} DEST/ and give --storage DEST; to read it: "
                         f"python -m study.analyze {study_dir} --out DIR")
    if not args.dry_run:  # one writer per folder, from before its state is read to the end (main releases it):
        # no other process acts between what this one reads and what it does. Said before what the folder holds.
        args.made = [p for p in (study_dir.local, *study_dir.local.parents) if not p.exists()] \
            if study_dir.local is not None else []  # folders the lock makes: removed again if left empty
        try:
            args.lock = lifecycle.take_lock(study_dir, "python -m study.run " + " ".join(args.argv))
        except lifecycle.Locked as e:
            raise UsageError(str(e)) from None
    else:  # a dry run takes no lock, but is refused where the command would be: a damaged lock, or another's
        try:
            lifecycle.check_lock(study_dir)
        except lifecycle.Locked as e:
            raise UsageError(f"{e} (the command without --dry-run would be refused so)") from None
    # What the folder holds, and what this command may do there: lifecycle's table.
    state = lifecycle.read(study_dir)
    args.can_retrain = bool(spec.retrain["seeds"]) and spec.retrain["epochs"] > 0
    decision = lifecycle.decide(state, lifecycle.command(args), args.can_retrain)
    if decision.action == "refuse":  # --dry-run too: it says what the command would do
        raise UsageError(lifecycle.refusal(decision, args.argv, study_dir))
    if decision.action == "restart" and (why := lifecycle.kept(study_dir)):  # nothing deleted that no run wrote
        raise UsageError(f"{study_dir} {why}")
    if decision.action in ("search", "retrain", "finish_retrain", "nothing") and state != "absent":
        stored = (study_dir / "spec.yaml").read_text()
        started_with = ((yamlio.load(stored) or {}).get("search") or {}).get("num_samples")
        if args.num_samples is not None and args.num_samples != started_with:
            raise UsageError(f"--num-samples {args.num_samples}: a study keeps the number of trials it started with "
                             f"({started_with}; Ray Tune cannot change it on --resume); leave the flag out")
        if isinstance(started_with, int):  # with or without the --num-samples it started with
            spec.search["num_samples"] = started_with
        try:  # as parsed: a key added since the study began takes its default (stopping.py keeps its old meaning)
            same_spec = specs.parse(yamlio.load(stored), str(study_dir / "spec.yaml")).to_dict() == spec.to_dict()
        except specs.SpecError:
            same_spec = False
        if not same_spec:
            raise UsageError(f"--{'resume' if args.resume else 'retrain'}: {args.space} differs from the study stored in {study_dir / 'spec.yaml'}; "
                             "resume with the same file")
        began = environment.read(study_dir) or {}
        args.optuna_storage = own_optuna_storage(args.optuna_storage, began, spec, study_dir)
        if decision.action == "search":
            check_moved(began, spec, study_dir)
    if decision.action == "nothing" and not args.dry_run:
        ended = results.load(study_dir)
        if ended.best is None:  # then --retrain, which the line advises, has nothing to train
            none = results.nothing_to_pick(ended.trials) or "reported the objective"
            print(f"study {spec.name}: {study_dir} holds {lifecycle.STATES[state]} in which no trial {none}: "
                  f"nothing to resume or retrain; read it with python -m study.analyze {study_dir}")
        else:
            print(f"study {spec.name}: {study_dir} {decision.why}")
        return 0

    data = fmnist.load(args.data_dir, download=args.download)
    check_machine(spec, data)
    try:
        warm = warmstart.plan(spec, args.warm_start, data.fingerprint)
    except warmstart.WarmStartError as e:
        raise UsageError(str(e)) from None
    for line in warmstart.lines(warm):
        print(line, flush=True)
    if args.dry_run and decision.action in ("search", "restart") and state != "interrupted":
        sampler_line(spec, warm)  # what a new study's sampler does (a run says it after its first line)
    if state != "absent" and decision.action != "restart":  # a study goes on only on the images it began on
        history = results.load(study_dir).history
        was = sorted(set(history["data_sha"].dropna().astype(str)) - {""}) if "data_sha" in history else []
        if was and data.fingerprint and data.fingerprint not in was:
            raise UsageError(f"{study_dir}: the study was trained on other images (data fingerprint {', '.join(was)}; "
                             f"{data.source} has {data.fingerprint}); give --data-dir the data it began on")
    if args.dry_run:
        ended = 0  # --resume of an interrupted search: priced for the trials left
        if state == "interrupted" and decision.action == "search":
            ended = sum(t.status in ("TERMINATED", "ERROR") for t, _ in results.trial_results(study_dir / "ray"))
        what = (f"the interrupted search continues, {ended} of {spec.search['num_samples']} trials ended"
                if state == "interrupted" and decision.action == "search" else lifecycle.ACTIONS[decision.action])
        print(f"# {args.space}: valid; data {data.source} ({len(data.train_y)} training, {len(data.test_y)} test "
              f"images); results would go to {study_dir} ({lifecycle.STATES[state]}: "
              f"{what})\n{yaml.safe_dump(spec.to_dict(), sort_keys=False)}", end="")
        if decision.action not in ("search", "restart"):  # the estimate is of a whole study, as it begins
            prior = study_dir / "estimate.yaml"
            print("estimate: none for " + ("nothing to run" if decision.action == "nothing" else "a retrain alone")
                  + (f"; the study's own, made when it began: {prior}" if prior.is_file() else ""), flush=True)
            return 0
        try:
            print(estimate.line(estimate.here(spec, len(data.train_y), len(data.test_y), plan, args.allow_cpu,
                                              args.allow_pending_gpus, do_retrain=not args.no_retrain,
                                              ended=ended)), flush=True)
        except PlanError as e:  # this machine could not run it (too few CPUs a trial): the file is still valid
            print(f"warning: no estimate for this machine: {e}", file=sys.stderr)
        return 0
    retrain_only = decision.action in ("retrain", "finish_retrain")
    if retrain_only and results.load(study_dir).best is None:
        none = results.nothing_to_pick(results.load(study_dir).trials) or "reported the objective"
        raise UsageError(f"{study_dir}: no trial {none}; nothing to retrain (read it: "
                         f"{lifecycle.command_line(lifecycle.ANALYZE, args.argv, study_dir)})")
    if decision.action == "restart":  # what the stopped run left: the study starts afresh
        tuner = study_dir / "ray" / "tuner.pkl"  # Ray's own state: empty when a run was cut while Ray wrote it
        why = f" ({tuner} is empty: Ray cannot continue it)" if tuner.is_file() and not tuner.read_bytes() else ""
        ray_files = {Path(i.path).name: i for i in study_dir.fs.get_file_info(
            pafs.FileSelector((study_dir / "ray").path, allow_not_found=True))}
        if not why and (empty := lifecycle.empty_searcher_state(ray_files)):
            why = f" ({study_dir / 'ray' / empty[0]} is empty: Ray cannot continue it)"
        print(f"{study_dir} holds only what an earlier run wrote before its first trial was recorded{why}; "
              "starting the study afresh", flush=True)
        for name in lifecycle.LEFTOVERS:
            (study_dir / name).delete()
    # --retrain, or --resume of a study whose retrain did not finish: the retrain alone
    return run(spec, data, study_dir, resume=args.resume, address=args.address, do_retrain=not args.no_retrain,
               allow_cpu=args.allow_cpu, allow_pending_gpus=args.allow_pending_gpus,
               optuna_storage=args.optuna_storage, retrain_only=retrain_only,
               fresh_retrain=decision.action == "retrain", verbose=args.verbose, warm=warm, argv=args.argv)


def sampler_line(spec: specs.StudySpec, warm: list) -> None:
    """The line saying what the study's sampler draws at random (samplers.startup_line), if it says any."""
    from study.samplers import startup_line

    said = startup_line(spec.search["sampler"], spec.search["num_samples"], sum(len(p["told"]) for p in warm))
    if said:
        print(said, flush=True)


def run(*args, verbose: bool = False, **kwargs) -> int:
    """_run with Ray's output engine chosen for this call only (progress.ray_output: its tables with
    --verbose) and Ray's and Optuna's own log lines in the study's study.log (on the terminal with --verbose)."""
    from study.progress import library_logs, ray_output

    study = args[2] if isinstance(args[2], Location) else Location.parse(args[2])
    if study.local is not None:
        study.local.mkdir(parents=True, exist_ok=True)
    with ray_output(verbose), library_logs(study.local / lifecycle.LOG if study.local else None, verbose):
        return _run(*args, verbose=verbose, **kwargs)


def _run(spec: specs.StudySpec, data: fmnist.FashionMNIST, study: Location | str | Path, resume: bool = False,
         address: str | None = None, do_retrain: bool = True, allow_cpu: bool = False,
         allow_pending_gpus: bool = False, optuna_storage: str | None = None, retrain_only: bool = False,
         fresh_retrain: bool = False, verbose: bool = False, warm: list | None = None,
         argv: list | None = None) -> int:
    """Search, then retrain the best configuration; with `retrain_only` (an ended study)
    only the retrain, continued (`resume`) or from scratch (`fresh_retrain`). `argv`: the
    command line, which the advice after a Ctrl-C repeats."""
    import ray

    from study.progress import Timing

    start = time.time()
    study = study if isinstance(study, Location) else Location.parse(study)
    timing = Timing(verbose)
    fresh = not resume and not retrain_only
    # A CPU's speed is measured here, before Ray's processes start and share its cores.
    cpu_fit = estimate.cpu_calibration(spec) if fresh and estimate.may_need_cpu(spec) else None
    if not ray.is_initialized():
        # A bare ray.init() would join any cluster a `ray start` left behind: be explicit.
        target = address or os.environ.get("RAY_ADDRESS") or "local"
        try:
            ray.init(address=target, log_to_driver=verbose)  # the trials' own output only with --verbose
        except (ConnectionError, RuntimeError) as e:  # something answers there, but not a Ray head
            print(f"error: --address {target}: Ray could not connect ({str(e).splitlines()[0]}); is it the "
                  "head's GCS port (ray start --head --port=...)?", file=sys.stderr)
            return 2
    try:
        res = plan(spec, **cluster(), allow_cpu=allow_cpu, allow_pending_gpus=allow_pending_gpus)
        study.fs.create_dir(study.path, recursive=True)
        nodes = check_nodes_see(study, gpus=res["gpu"] > 0 or res["retrain_gpu"] > 0)  # GPUs torch sees
    except (PlanError, StorageError) as e:
        print(f"error: {spelled(str(e), '--')}", file=sys.stderr)
        return 2
    print(f"study {spec.name}: {res['summary']}; {len(nodes)} Ray node(s); results in {study}", flush=True)
    if fresh:
        sampler_line(spec, warm or [])
    older = older_line(older_than_tested())  # torch & co. older than tested: said, recorded in environment.yaml
    if older:
        print(older, file=sys.stderr, flush=True)
    begun = []

    def keep(running: bool = True, interrupted: bool = False, trials_s: dict | None = None) -> None:
        """This run's entry in timing.yaml: written as it starts, brought up to date after each phase, so
        that a run that crashed (a full disk, a kill) is still counted, marked running: true."""
        rec = {**timing.record(resumed=not fresh, interrupted=interrupted), **({"running": True} if running else {})}
        timing.save(study, rec, fresh and not begun, trials_s, replace_last=bool(begun))
        begun.append(True)

    keep()
    if fresh:  # what it runs on, beside spec.yaml; a later run on other versions says so
        # where it began (a record: moved or copied, it resumes where it is) and with which Optuna storage
        # (a URL naming the folder's own optuna.db is recorded as none: it moves with the folder)
        environment.write(study, {**environment.collect(), "folder": study.shown, "optuna_storage": None
                                  if optuna_storage is None or own_database(optuna_storage, spec, study)
                                  else shown_url(optuna_storage)})
    else:
        environment.warn_differences(study, "--retrain" if fresh_retrain else "--resume")
    if fresh:  # the prediction, kept beside what each phase then took (timing.yaml)
        total = cluster()
        timing.estimate = estimate.predict(
            spec, res, total["cpus"], total["gpus"], len(nodes), len(data.train_y), len(data.test_y),
            cpu_fit or (estimate.cpu_calibration(spec) if res["gpu"] == 0 or res["retrain_gpu"] == 0 else None),
            do_retrain=do_retrain)
        (study / "estimate.yaml").write_text(yaml.safe_dump(timing.estimate, sort_keys=False))
        print(estimate.line(timing.estimate), flush=True)
    elif (study / "estimate.yaml").is_file():  # a --resume: the remaining time from the study's own prediction
        timing.estimate = yaml.safe_load((study / "estimate.yaml").read_text())
    timing.lap("ray_start")
    keep()
    if retrain_only:
        best = results.load(study).best
    else:
        if not resume:
            (study / "spec.yaml").write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
        url, db = optuna_url(spec, study, optuna_storage)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
            if not resume and db.exists():  # a new study: this file (ours) is what a stopped start left
                db.unlink()
            if resume and not db.exists() and (study / "optuna.db").is_file():
                db.write_bytes((study / "optuna.db").read_bytes())  # resumed from another driver machine
        try:
            grid = search(spec, data, study, resume, res, url, warm or [], timing)
        finally:
            if db is not None and db.exists() and db != (study.local or Path()) / "optuna.db":
                (study / "optuna.db").write_bytes(db.read_bytes())
        timing.lap("search")
        keep()
        # Ctrl-C: Ray saved its state and returned early. Read that state: a trial
        # that was running is RUNNING there, while Ray's cleanup marks it TERMINATED
        # in the grid it returns. Export nothing that would look like a finished study.
        ended = sum(t.status in ("TERMINATED", "ERROR") for t, _ in results.trial_results(study / "ray"))
        if len(grid) < spec.search["num_samples"] or ended < len(grid):
            step = lifecycle.next_step(study, argv, bool(spec.retrain["seeds"]) and spec.retrain["epochs"] > 0)
            print(f"study {spec.name} interrupted after {ended} of {spec.search['num_samples']} trials; {step}",
                  file=sys.stderr)
            keep(running=False, interrupted=True)
            return 130
        will_retrain = do_retrain and spec.retrain["seeds"] and spec.retrain["epochs"] > 0
        if will_retrain:  # before the export: from here a kill leaves a retrain that --resume finishes
            mark_retrain(study, resume=True)
        trials, history, best = results.export(spec, study)
        if will_retrain and not best:  # nothing to retrain after all
            (study / lifecycle.RETRAIN_PENDING).delete()
        # The top of the report the analysis writes: the same lines, one place.
        warm_file = study / "warm_start.yaml"
        print("\n".join(analyze.summary(results.Study(
            study, spec, trials, history, best, None, None, trials_file=study / "trials.parquet",
            warm_start=yaml.safe_load(warm_file.read_text()) if warm_file.is_file() else None))), flush=True)
        if len(trials) and "gpu_ids" in trials:  # where the trials ran
            where = trials["node_ip"] + " GPU " + trials["gpu_ids"].replace("", "-")
            print("trials per node and GPU: " + ", ".join(f"{w}: {n}" for w, n in where.value_counts().sort_index().items()),
                  flush=True)
        timing.lap("export")
        keep()
    if best and (do_retrain or retrain_only) and spec.retrain["seeds"] and spec.retrain["epochs"] > 0:
        # top_k: the search's best configurations, from the trials table (best.yaml names the chosen one once
        # a top_k retrain has ended: a --retrain chooses among the same configurations again)
        top = results.top_rows(results.load(study).trials, spec, spec.retrain["top_k"]) \
            if spec.retrain["top_k"] > 1 else None
        try:
            s = retrain(spec, best, data, study, res, resume and not fresh_retrain, timing, candidates=top)
        except RetrainInterrupted:
            step = lifecycle.next_step(study, argv, True)
            print(f"study {spec.name}: the retrain was interrupted; {step}", file=sys.stderr)
            keep(running=False, interrupted=True)
            return 130
        except RuntimeError as e:
            keep(running=False)
            print(f"error: {spelled(str(e), '--')}", file=sys.stderr)
            return 1
        if "chosen_by" in s:
            print(f"chosen: trial {s['trial_id']}, {s['chosen_by']}", flush=True)
        print(f"retrained best: test_acc {s['test_acc_mean']:.4f} ± {s['test_acc_std']:.4f} over seeds "
              f"{s['seeds']} (tutorial baseline {TUTORIAL_ACC}); {study / 'best'}", flush=True)
        timing.lap("retrain")
    keep(running=False, trials_s=results.read_breakdown(study))
    print(f"results in {study}; wall time {(time.time() - start) / 60:.1f} min")
    if best or retrain_only or results.nothing_to_pick(trials):  # none learned or kept the constraints: a finding
        return 0
    print(f"error: no trial of study {spec.name} reported {spec.metric}, so there is no best trial; the errored "
          f"trials' lines above say why (python -m study.analyze {study} lists them)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    leave(main())
