"""The two Ray Tune runs of a study: the Optuna search, and the retrain of its best
configuration per seed (study.run decides which runs; these run them)."""
from __future__ import annotations

import contextlib
import hashlib
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import pandas as pd
import pyarrow.fs as pafs
import yaml

from csnn import data as fmnist
from csnn.config import METRICS, TrainConfig
from csnn.train import load_model
from study import results, spec as specs, warmstart
from study.lifecycle import RETRAIN_PENDING, UsageError, restorable
from study.plan import asha_rungs
from study.storage import Location, mount_type


def optuna_url(spec: specs.StudySpec, study: Location, given: str | None) -> tuple[str, Path | None]:
    """Optuna's storage URL and, for SQLite, its local file. SQLite's locking is
    unreliable on NFS and impossible on an object store: unless --optuna-storage
    names a database server, the file stays on the driver's local disk (in the
    study folder when that is local, else under ~/.cache/csnn-study/), and a
    copy goes to the study's storage when the search ends."""
    if given:
        return given, None
    if study.local is not None and not on_network_fs(study.local):
        db = study.local / "optuna.db"
    else:
        key = hashlib.sha1(study.shown.encode()).hexdigest()[:8]
        db = Path.home() / ".cache" / "csnn-study" / "optuna" / f"{spec.name}-{key}.db"
    return f"sqlite:///{db}", db


def on_network_fs(path: Path) -> bool:
    """Whether `path` lies on NFS, SMB or a FUSE mount."""
    return mount_type(path).startswith(("nfs", "cifs", "smb", "fuse", "ceph", "glusterfs", "lustre", "9p"))


def search(spec: specs.StudySpec, data: fmnist.FashionMNIST, study: Location, resume: bool, res: dict,
           optuna_storage: str, warm: list = (), timing=None):
    """Run (or continue) the Ray Tune + Optuna search; return its ResultGrid."""
    import optuna
    from ray import tune
    from csnn.trainable import trainable
    from study.samplers import make_sampler
    from study.stopping import FIFO, MultiObjectiveASHA, ResumableASHA, SilentAwareOptunaSearch, arrivals

    ray_dir = study / "ray"
    trial_fn = tune.with_resources(
        tune.with_parameters(trainable, data=data, fixed=spec.train,
                             checkpoint_every=spec.resources["checkpoint_every"], rungs=asha_rungs(spec),
                             silent_rate=spec.scheduler["silent_rate"]),
        {"cpu": res["cpu"], "gpu": res["gpu"]})
    if resume:
        SilentAwareOptunaSearch.resume_url = optuna_storage  # this folder's database, wherever it started
        past = results.trial_results(ray_dir)
        ResumableASHA.replay_from = MultiObjectiveASHA.replay_from = arrivals(past)  # the rungs as they were
        with trials_in(study, past), idle_workers_kept(at_once(spec, res)):  # this folder's trials, wherever it started
            try:
                return tune.Tuner.restore(ray_dir.path, trainable=trial_fn, resume_unfinished=True,
                                          resume_errored=False, storage_filesystem=ray_dir.fs).fit()
            finally:
                SilentAwareOptunaSearch.resume_url = ResumableASHA.replay_from = MultiObjectiveASHA.replay_from = None

    storage = optuna.storages.RDBStorage(optuna_storage)
    # its random start-up sized to the study; after a warm start, a seed no earlier study drew with
    sampler = make_sampler(spec.search["sampler"], warmstart.seed(warm, spec.search["seed"]) if warm
                           else spec.search["seed"], spec.search["num_samples"])
    # The Optuna study is made here and OptunaSearch loads it (same storage and name):
    # so that optuna-dashboard names the objectives (not "Objective 0"), and so that
    # the baseline can be enqueued (Ray ignores points_to_evaluate with a define-by-run space).
    metrics = [o["metric"] for o in spec.objectives]
    optuna_study = optuna.create_study(storage=storage, study_name=spec.name, sampler=sampler,
                                       directions=["maximize" if o["mode"] == "max" else "minimize"
                                                   for o in spec.objectives])
    with warnings.catch_warnings():  # "experimental" since Optuna 3.2, and what optuna-dashboard reads
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna_study.set_metric_names(metrics)
    if warm:  # told and enqueued before the first trial; the record for the report
        (study / "warm_start.yaml").write_text(yaml.safe_dump(warmstart.apply(optuna_study, warm), sort_keys=False))
    if spec.search["baseline"]:
        optuna_study.enqueue_trial(specs.baseline_params(spec))
    # Several objectives: Optuna's multi-objective search on each trial's last
    # report; Ray's own metric (progress table, ASHA when single) is the first.
    modes = [o["mode"] for o in spec.objectives]
    # search.in_order: the sampler and the rungs read results in trial order (stopping.py), k the file's
    # max_concurrent (not what this machine runs at once), so that the study depends on neither timing nor machine.
    in_order = spec.search["max_concurrent"] if spec.search["in_order"] else 0
    searcher = SilentAwareOptunaSearch(space=specs.define_by_run(spec), metric=metrics if spec.multi else metrics[0],
                                       mode=modes if spec.multi else modes[0], sampler=sampler,
                                       study_name=spec.name, storage=storage,
                                       silent_rate=spec.scheduler["silent_rate"], in_order=in_order,
                                       num_samples=spec.search["num_samples"], constraints=spec.constraints)
    epochs = spec.max_epochs
    rungs = dict(max_t=epochs, grace_period=min(spec.scheduler["grace_period"], epochs),
                 reduction_factor=spec.scheduler["reduction_factor"], in_order=in_order)
    scheduler = (FIFO() if spec.scheduler["type"] != "asha"
                 else MultiObjectiveASHA(metrics, modes, **rungs) if spec.multi
                 else ResumableASHA(time_attr="training_iteration", **rungs))
    tuner = tune.Tuner(
        trial_fn,
        tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, search_alg=searcher, scheduler=scheduler,
                                    num_samples=spec.search["num_samples"],
                                    max_concurrent_trials=in_order or res["max_concurrent"] or None,
                                    # A trial's Ray worker goes on to the next trial (Ray's default: a new
                                    # process per trial, ~4 s of start and imports, a fifth of a quick trial).
                                    reuse_actors=True),
        run_config=tune.RunConfig(
            name="ray", storage_path=study.path, storage_filesystem=study.fs,
            failure_config=tune.FailureConfig(max_failures=1),  # one retry from the last checkpoint
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            **(timing.run_config(spec) if timing else {}),  # our progress lines; Ray's tables with --verbose
        ),
    )
    with idle_workers_kept(at_once(spec, res)):
        return tuner.fit()


def at_once(spec: specs.StudySpec, res: dict) -> int:
    """How many trials the search runs at once, where the study says (search.in_order's k, or the plan's
    max_concurrent); else 1."""
    return (spec.search["max_concurrent"] if spec.search["in_order"] else res["max_concurrent"]) or 1


@contextlib.contextmanager
def idle_workers_kept(n: int):
    """Ray Tune keeps a trial's worker for the next trial only while a trial waits for it, and else at most
    one idle worker (its actor cache's may_keep_one). A search whose next trial must wait (search.in_order:
    for an earlier trial's end) lost its second worker whenever two trials ended before the next one could be
    asked; a new one then started (a process, its imports, its compiled kernels loaded again: ~10 s on 2
    cores), and Tune gave the trial that it started for to the first worker to come free and stopped the new
    one, so that short trials ran one at a time meanwhile. Here up to `n` idle workers are kept until the
    search ends. A 12-trial quick.yaml-like search on the loaded 2-core machine (2026-12-08): 3 workers and
    45-52 of its 2 workers' 150 seconds idle, against 2 workers and 14-15 idle."""
    from ray.tune.execution import tune_controller

    plain = tune_controller._ObjectCache

    class KeepIdle(plain):
        def cache_object(self, key, obj) -> bool:
            if self.num_cached_objects < n:
                self._cached_objects[key].append(obj)
                self._num_cached_objects += 1
                return True
            return super().cache_object(key, obj)

        def flush_cached_objects(self, force_all: bool = False):
            if not force_all and self.num_cached_objects <= n:
                return iter(())
            return super().flush_cached_objects(force_all)

    tune_controller._ObjectCache = KeepIdle
    try:
        yield
    finally:
        tune_controller._ObjectCache = plain


def mark_retrain(study: Location, resume: bool) -> str:
    """Write RETRAIN_PENDING (a retrain is due, and into which folder) and return that folder's
    name. A --retrain of a study that has one trains into retrain-next/: the earlier retrain/
    and best/ stay until the new one is complete, then it takes retrain/'s place. study.run
    marks a retrain before the search's export, so that a kill anywhere from there to best/
    being complete leaves a study whose retrain --resume finishes."""
    pending = study / RETRAIN_PENDING
    marked = pending.read_text().split("\n")[0] if resume and pending.is_file() else None
    if marked in ("retrain", "retrain-next"):
        name = marked
    else:
        name = "retrain-next" if (study / "retrain").exists() else "retrain"
    pending.write_text(f"{name}\n# a retrain into {name}/ is due since {time.ctime()}; best/ is replaced when it "
                       "ends\n")
    return name


@contextlib.contextmanager
def trials_in(study: Location, past: list):
    """Around a Tuner.restore(...).fit() of an experiment (ray/ or retrain/ of the study folder `study`;
    `past`: its trials, as results.trial_results read them): the trials made after the restore go into
    this folder too, not the one the study began in (stopping._InFolder says why), and Ray reads this
    folder's state alone.

    Ray Tune stages an experiment's state and its trials' logs on the driver, in <Ray session>/artifacts/
    <the time the experiment began>/<ray or retrain>/, copies them to the folder, and on a restore copies
    the folder's in there and reads the newest. A copy of a study has its original's start time: resumed
    in the Ray session that ran the other (a cluster's, --address), it would read the other's newer
    searcher state and append to its logs. The folder is the record: what is staged is dropped first,
    and Ray stages the folder's own again."""
    import ray

    from study.stopping import _InFolder

    for trial, _ in past[:1] if not ray.util.client.ray.is_connected() else []:  # (Ray Client: staged on the head)
        shutil.rmtree(trial.local_experiment_path, ignore_errors=True)  # the staging folder is the experiment's
    _InFolder.folder = (study.fs, study.path)
    try:
        yield
    finally:
        _InFolder.folder = None


class RetrainInterrupted(Exception):
    """Ctrl-C during the retrain: Ray Tune saved it, and --resume continues it."""


def retrain_fixed(spec: specs.StudySpec, config: dict) -> dict:
    """The fixed TrainConfig fields of a configuration's retrain (its seed comes per trial): retrain.epochs on
    all training images and the whole test set; with retrain.top_k > 1 the validation split stays held out
    (the configurations are chosen on it), else it is trained on too."""
    keep_val = spec.retrain["top_k"] > 1
    fixed = {**config, "epochs": spec.retrain["epochs"], "val_size": config["val_size"] if keep_val else 0,
             "train_size": 0, "test_size": 0}
    fixed.pop("seed")
    return fixed


def candidate_trainable(config: dict, data: fmnist.FashionMNIST, candidates: dict, checkpoint_every: int) -> None:
    """A top_k retrain's trial: config["run"] = {candidate, seed}, configuration `candidate` (a search trial's id)
    of `candidates` ({trial_id: fixed TrainConfig fields}) with that seed."""
    from csnn.trainable import trainable

    candidate, seed = run_of(config)
    trainable({"seed": seed}, data, fixed=candidates[candidate], checkpoint_every=checkpoint_every)


def run_of(config: dict) -> tuple[str | None, int]:
    """(configuration, seed) of a retrain trial's config: {"run": {candidate, seed}} with retrain.top_k > 1,
    else {"seed": N} (the configuration None: the best)."""
    run = config.get("run", config)
    return run.get("candidate"), run["seed"]


def newest_state(where: Location):
    """The newest experiment state (experiment_state-<time>.json) of the Ray run in `where`, or None."""
    names = sorted(Path(i.path).name for i in where.fs.get_file_info(pafs.FileSelector(where.path, allow_not_found=True))
                   if Path(i.path).name.startswith("experiment_state") and i.path.endswith(".json"))
    return where / names[-1] if names else None


def state_readable(where: Location) -> bool:
    """Whether the newest experiment state of a Ray run is whole JSON: a kill while Ray rewrote it leaves it empty,
    and a restore from it starts a run with no trials, each trial then without its config."""
    import json

    state = newest_state(where)
    try:
        return state is not None and isinstance(json.loads(state.read_text()), dict)
    except ValueError:
        return False


def record_behind(where: Location, ended: list, epochs: int) -> bool:
    """Whether Ray's newest record of a retrain misses the end of a run that its folder shows ended: Ray saves
    its record after each checkpoint and now and then, and a kill before it saved a run's last epoch left the
    run PENDING or RUNNING there, without it; a restore from it would train that run again from scratch. A run
    whose last epoch the record holds (TERMINATED, or RUNNING with its last result) is not missed. A record this
    cannot read counts as behind."""
    import json

    try:
        trials = [(json.loads(t[0]), json.loads(t[1])) for t in json.loads(newest_state(where).read_text())["trial_data"]]
        recorded = {run_of(t["config"]) for t, run in trials
                    if t["status"] == "TERMINATED" or (run.get("last_result") or {}).get("epoch", -1) + 1 >= epochs}
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return True
    return any(run_of(r.config) not in recorded for r in ended)


def ended_runs(where: Location, epochs: int) -> list:
    """The runs in a retrain's folder that had ended (their last epoch reported, a checkpoint saved), read with
    Ray's Result.from_path, one a configuration and seed: what a retrain whose Ray record is lost keeps."""
    from ray.tune import Result

    out, seen = [], set()
    for info in sorted(where.fs.get_file_info(pafs.FileSelector(where.path, allow_not_found=True)), key=lambda i: i.path):
        if info.type != pafs.FileType.Directory:
            continue
        try:
            r = Result.from_path(info.path, storage_filesystem=where.fs)
            key = run_of(r.config)
        except (RuntimeError, ValueError, KeyError, AttributeError, TypeError):  # no config, a damaged result.json
            continue
        if r.checkpoint is not None and r.metrics.get("epoch", -1) + 1 >= epochs and key not in seen:
            seen.add(key)
            out.append(r)
    return out


def retrain(spec: specs.StudySpec, best: dict, data: fmnist.FashionMNIST, study: Location, res: dict,
            resume: bool, timing=None, candidates: list | None = None) -> dict:
    """Retrain the best configuration from scratch per seed on train + validation
    (all 60k training images) and test on the full test set: one Ray Tune trial
    per seed, all at once, each with a trial's CPUs and a whole GPU (or the
    study's gpus_per_trial), checkpointing into study/retrain/ (retrain-next/ for a --retrain). Then best/ is
    assembled here from what they stored: metrics, checkpoints, placement, and
    the encoder spikes rendered from seed 0's checkpoint on the CPU. --resume
    continues an interrupted retrain (finished seeds are kept): RETRAIN_PENDING
    marks one from its start until best/ is complete, and an earlier best/ stays
    until then.

    retrain.top_k > 1: `candidates` (the search's top_k, results.top_rows, the best first) are retrained
    alike, every one with every seed, in one Ray Tune run, on the training images less the validation
    split; the one of highest mean validation score (results.selection_metric) becomes the study's best:
    retrained/<trial_id>/ holds each one's retrain, best/ the chosen one's, and best.yaml is rewritten to
    name it, with the search's own best and the reason."""
    from ray import tune

    from csnn.trainable import trainable
    from study.stopping import FIFO

    name = mark_retrain(study, resume)
    seeds = spec.retrain["seeds"]
    topk = spec.retrain["top_k"] > 1
    rows = candidates if topk else None
    entries = [results.best_entry(r, spec) for r in rows] if topk else [best]
    fixed = {e["trial_id"]: retrain_fixed(spec, e["config"]) for e in entries}
    every = spec.resources["checkpoint_every"]
    fn = tune.with_resources(tune.with_parameters(candidate_trainable, data=data, candidates=fixed,
                                                  checkpoint_every=every) if topk
                             else tune.with_parameters(trainable, data=data, fixed=fixed[best["trial_id"]],
                                                       checkpoint_every=every),
                             {"cpu": res["cpu"], "gpu": res["retrain_gpu"]})
    where = study / name
    about = timing.predicted("retrain") if timing else None
    epochs, n_train = spec.retrain["epochs"], len(data.train_y) - (entries[0]["config"]["val_size"] if topk else 0)
    what = (f"the search's {len(entries)} best configurations ({', '.join(fixed)}), each with seeds {seeds}, "
            f"{len(entries) * len(seeds)} runs" if topk else f"the best configuration with seeds {seeds} at once")
    print(f"retraining {what} ({epochs} epochs, {n_train} training images, {res['retrain_gpu']:g} GPU each)"
          + (f", about {about / 60:.1f} min" if about else ""), flush=True)
    quiet = timing.quiet() if timing else {}
    # Ray's own can_restore asks only for tuner.pkl: killed before Ray saved the seeds' state,
    # its restore ran trials without their seed (KeyError: 'seed'). Then the retrain starts again,
    # keeping the runs that had ended (a kill while Ray rewrote its state leaves it empty: the same; so does one
    # before Ray saved a run's end, which its restore would train again).
    readable = resume and restorable(where) and state_readable(where)
    ended_before = ended_runs(where, epochs) if resume else []
    behind = readable and record_behind(where, ended_before, epochs)
    if readable and not behind:
        with trials_in(study, results.trial_results(where)):
            grid = list(tune.Tuner.restore(where.path, trainable=fn, resume_errored=True,
                                           storage_filesystem=where.fs).fit())
    else:
        grid = list(ended_before)
        ended = {run_of(r.config) for r in grid}
        todo = [{"candidate": c, "seed": s} for c in fixed for s in seeds if (c if topk else None, s) not in ended]
        if not grid:
            where.delete()
        elif todo:
            why = "is older than its runs (killed before Ray saved it)" if behind else "is lost (killed as Ray wrote it)"
            print(f"{where}: Ray's record of the retrain {why}; the {len(grid)} runs that had "
                  f"ended are kept, the other {len(todo)} run again", flush=True)
        space = {"run": tune.grid_search(todo)} if topk else {"seed": tune.grid_search([t["seed"] for t in todo])}
        if todo:
            grid += list(tune.Tuner(fn, param_space=space,
                                    # top_k: top_k x seeds runs, more than run at once: each worker goes on to
                                    # the next run (Ray's default, a new process per run, ~5 s each; the search's)
                                    tune_config=tune.TuneConfig(max_concurrent_trials=len(todo), scheduler=FIFO(),
                                                                **({"reuse_actors": True} if topk else {})),
                                    run_config=tune.RunConfig(name=name, storage_path=study.path,
                                                              storage_filesystem=study.fs,
                                                              failure_config=tune.FailureConfig(max_failures=1),
                                                              checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                                              **quiet)).fit())
    # A seed is done when it reported its last epoch: after Ctrl-C, Ray may
    # list a seed that never started as terminated, without metrics.
    failed = [f"{r.path}: {results.error_text(str(r.error))}" for r in grid if r.error]
    unfinished = [r for r in grid if not r.error and r.metrics.get("epoch", -1) + 1 < epochs]
    if failed:
        raise RuntimeError("the retrain did not finish (" + "; ".join(failed) + "); continue it with --resume")
    if unfinished or len(grid) < len(seeds) * len(fixed):  # Ctrl-C: Ray saved the seeds' state and returned early
        raise RetrainInterrupted

    with tempfile.TemporaryDirectory(prefix="csnn-best-") as tmp:
        work = Path(tmp)
        runs = {}
        for r in grid:
            runs.setdefault(run_of(r.config)[0] or best["trial_id"], []).append(r)
        chosen, selection = (select(spec, entries, rows, runs, work) if topk else (entries[0]["trial_id"], None))
        summary = assemble(spec, runs[chosen], fixed[chosen], chosen, work / "best")
        if selection:
            summary = {**summary, **selection["chosen_scores"], "chosen_by": selection["reason"]}
        if spec.render["images"] > 0:
            from csnn.spikes import render

            net, _ = load_model(work / "best" / f"seed{seeds[0]}" / "checkpoint_latest.pth")
            about = timing.predicted("spikes") if timing else None
            print(f"rendering the encoder spikes of {spec.render['images']} test images at {net.T} time steps"
                  + (f", about {about:.0f} s" if about else ""), flush=True)
            with timing.phase("spikes") if timing else contextlib.nullcontext():
                render(net, data.test_x[: spec.render["images"]], work / "best" / "spikes")
        if topk:  # every configuration's retrain, each with its summary.yaml last: read_retrained counts a configuration
            # with one as whole (pyarrow's copy_files writes a folder's files in no set order, threads at once)
            summaries = {f.parent.name: f.read_text() for f in (work / results.RETRAINED).glob("*/summary.yaml")}
            for t in summaries:
                (work / results.RETRAINED / t / "summary.yaml").unlink()
            (study / results.RETRAINED).delete()
            (study / results.RETRAINED).upload(work / results.RETRAINED)
            for t, text in summaries.items():
                (study / results.RETRAINED / t / "summary.yaml").write_text(text)
        final = study / "best"
        final.delete()
        final.upload(work / "best")  # summary.yaml last: best/ counts as complete only with it
        (final / "summary.yaml").write_text(yaml.safe_dump(summary, sort_keys=False))
        if topk:  # the study's best is now the chosen configuration; the search's own stays beside it
            trials = results.load(study).trials
            search_best = results.best_record(trials, spec)
            chosen_row = trials.set_index("trial_id", drop=False).loc[chosen]
            record = {**results.best_entry(chosen_row, spec),
                      **{k: search_best[k] for k in ("pick", "pareto") if k in search_best},
                      "selection": selection["record"],
                      "search_best": {k: v for k, v in search_best.items() if k not in ("pick", "pareto")}}
            (study / "best.yaml").write_text(yaml.safe_dump(record, sort_keys=False))
    if name == "retrain-next":
        (study / "retrain").delete()
        where.move_to(study / "retrain")
    (study / RETRAIN_PENDING).delete()
    return summary


def assemble(spec: specs.StudySpec, runs: list, fixed: dict, trial_id: str, work: Path) -> dict:
    """One configuration's retrain, from its Ray results (one a seed), into `work`: metrics.csv (every seed's
    epochs), seed<N>/ (its checkpoint and config.yaml); returns its summary (not yet written)."""
    rows, placement = [], {}
    for r in sorted(runs, key=lambda r: run_of(r.config)[1]):
        seed = run_of(r.config)[1]
        h = r.metrics_dataframe.drop_duplicates("epoch", keep="last").sort_values("epoch")
        rows.append(h[[c for c in METRICS if c in h]].assign(seed=seed))
        placement[seed] = {k: str(r.metrics.get(k, "")) for k in (*results.PLACEMENT, "run_device")}
        r.checkpoint.to_directory(str(work / f"seed{seed}"))
        cfg = TrainConfig.from_dict({**fixed, "seed": seed})
        (work / f"seed{seed}" / "config.yaml").write_text(cfg.to_yaml())
    table = pd.concat(rows, ignore_index=True)
    table = table[["seed"] + [c for c in table.columns if c != "seed"]]
    table.to_csv(work / "metrics.csv", index=False)
    finals = table.groupby("seed")["test_acc"].last()
    return {
        "trial_id": trial_id, "epochs": spec.retrain["epochs"], "seeds": spec.retrain["seeds"],
        "test_acc": {int(s): float(a) for s, a in finals.items()},
        "test_acc_mean": float(finals.mean()),
        "test_acc_std": float(finals.std(ddof=1)) if len(finals) > 1 else 0.0,
        "epoch_s_mean": float(table["epoch_s"].mean()),
        "placement": placement,  # per seed: node_ip, hostname, gpu_ids, run_device
    }


def select(spec: specs.StudySpec, entries: list, rows: list, runs: dict, work: Path) -> tuple[str, dict]:
    """retrain.top_k: each configuration's retrain assembled into work/retrained/<trial_id>/ (its summary.yaml
    with its search rank and score, its validation scores per seed, mean and std), and the chosen one: the
    highest mean of the selection metric over the seeds at the last epoch (the lowest for a loss), a tie
    to the better search rank. Returns (its trial_id, {record: best.yaml's selection, reason, chosen_scores})."""
    sel = results.selection_metric(spec)
    m, sign = sel["metric"], 1 if sel["mode"] == "max" else -1
    found = []
    for rank, (e, row) in enumerate(zip(entries, rows), 1):
        folder = work / results.RETRAINED / e["trial_id"]
        summary = assemble(spec, runs[e["trial_id"]], retrain_fixed(spec, e["config"]), e["trial_id"], folder)
        vals = pd.read_csv(folder / "metrics.csv").sort_values("epoch").groupby("seed")[m].last()
        scores = {m: {int(s): float(v) for s, v in vals.items()}, f"{m}_mean": float(vals.mean()),
                  f"{m}_std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0}
        found.append({"trial_id": e["trial_id"], "search_rank": rank, "search_score": results.search_score(row, spec),
                      **scores, "summary": summary})
    best = max(found, key=lambda f: (sign * f[f"{m}_mean"], -f["search_rank"]))
    for f in found:
        out = {**f["summary"], "search_rank": f["search_rank"], "search_score": f["search_score"],
               "selection_metric": m, **{k: f[k] for k in (m, f"{m}_mean", f"{m}_std")}, "chosen": f is best}
        (work / results.RETRAINED / f["trial_id"] / "summary.yaml").write_text(yaml.safe_dump(out, sort_keys=False))
    top = found[0]
    reason = (f"highest mean {m} over seeds {spec.retrain['seeds']} at the last of {spec.retrain['epochs']} retrain "
              f"epochs among the search's {len(found)} best configurations: {best[f'{m}_mean']:.4f} (trial "
              + (f"{best['trial_id']}, the search's best too: its order held at the top)" if best is top else
                 f"{best['trial_id']}, the search's number {best['search_rank']}; the search's best {top['trial_id']}: "
                 f"{top[f'{m}_mean']:.4f}: its order did not hold at the top)"))
    record = {"metric": m, "mode": sel["mode"], "seeds": spec.retrain["seeds"], "epochs": spec.retrain["epochs"],
              "chosen": best["trial_id"], "search_best": found[0]["trial_id"], "reason": reason,
              "candidates": [{k: f[k] for k in ("trial_id", "search_rank", "search_score", f"{m}_mean", f"{m}_std")}
                             | {k: f["summary"][k] for k in ("test_acc_mean", "test_acc_std")} for f in found]}
    return best["trial_id"], {"record": record, "reason": reason,
                              "chosen_scores": {k: best[k] for k in (m, f"{m}_mean", f"{m}_std")}}


# The pip package of each database driver module SQLAlchemy loads for a URL's dialect+driver
DRIVERS = {"MySQLdb": "mysqlclient", "pymysql": "pymysql", "mysql": "mysql-connector-python", "mariadb": "mariadb",
           "psycopg": "'psycopg[binary]'", "psycopg2": "psycopg2-binary", "pg8000": "pg8000", "oracledb": "oracledb",
           "pyodbc": "pyodbc", "pymssql": "pymssql"}


def shown_url(url: str | None) -> str | None:
    """An Optuna storage URL as environment.yaml records it: its password hidden."""
    import sqlalchemy

    return None if url is None else sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)


def own_database(url: str, spec: specs.StudySpec, study: Location) -> bool:
    """Whether an --optuna-storage URL names the study folder's own optuna.db (where optuna_url puts it)."""
    import sqlalchemy

    u, (_, db) = sqlalchemy.engine.make_url(url), optuna_url(spec, study, None)
    return u.get_backend_name() == "sqlite" and db is not None and Path(u.database or "").resolve() == db.resolve()


def own_optuna_storage(given: str | None, began: dict, spec: specs.StudySpec, study: Location) -> str | None:
    """The --optuna-storage that --resume or --retrain of the study in `study` uses: its own database.
    `began`: its environment.yaml, whose optuna_storage is what the study started with (None: its own
    optuna.db, which optuna_url finds in the folder as it is now, moved or copied); a study from before
    that record keeps check_optuna_storage's test alone. Another database is refused: a copy given the
    original's optuna.db would write its trials there."""
    if "optuna_storage" not in began:
        return given
    started = began["optuna_storage"]
    if started is None:
        if given is None or own_database(given, spec, study):
            return None  # the flag named the study's own file: the same as leaving it out
        raise UsageError(f"--optuna-storage {given}: the study in {study} keeps its Optuna trials in its own "
                         "optuna.db (it began without --optuna-storage); a study resumes with the database it "
                         "started with: leave the flag out")
    if given is None:
        raise UsageError(f"{study}: the study began with --optuna-storage {started}; a study resumes with the "
                         "database it started with: give that --optuna-storage again")
    if shown_url(given) != started:
        raise UsageError(f"--optuna-storage {given}: the study in {study} began with --optuna-storage {started}; "
                         "a study resumes with the database it started with: give that one")
    return given


def check_moved(began: dict, spec: specs.StudySpec, study: Location) -> None:
    """--resume of a search moved or copied from where it began: refused for a study an earlier
    csnn-study began (its environment.yaml has no optuna_storage) without successive halving. Its saved
    Tuner holds Ray's own FIFOScheduler, not stopping.FIFO, so the trials made after the restore would
    be written into the folder it began in; its ASHA schedulers unpickle as today's classes, which
    point them here."""
    folder = began.get("folder")
    if spec.scheduler["type"] != "asha" and "optuna_storage" not in began and folder not in (None, study.shown):
        raise UsageError(f"{study}: the study began in {folder} with an earlier csnn-study, whose saved search "
                         f"would write its new trials there; resume it in {folder} (move it back), or start it "
                         f"afresh under another name; its ended trials stay readable: python -m study.analyze {study}")


def check_optuna_storage(url: str, name: str, resume: bool) -> None:
    """--optuna-storage checked before anything is written (and by --dry-run): a URL
    SQLAlchemy opens with an installed driver; for SQLite, an existing folder and a
    file that is a database; and for a new study, no Optuna study of its name there
    yet (one of another --storage, which OptunaSearch would silently continue)."""
    import sqlalchemy

    def bad(why):
        return UsageError(f"--optuna-storage {url}: {why}")
    try:
        u = sqlalchemy.engine.make_url(url)
        engine = sqlalchemy.create_engine(u)  # loads the dialect and its driver; connects to nothing
    except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError) as e:
        raise bad(f"not a database URL Optuna can use ({str(e).splitlines()[0]}); e.g. "
                  "postgresql://user:password@host/db, mysql+pymysql://..., sqlite:////abs/path/optuna.db") from None
    except ImportError as e:  # the module the URL's dialect+driver loads (mysql:// MySQLdb, postgresql:// psycopg)
        module = (e.name or "").split(".")[0]
        other = (f"; or name a pure-Python driver in the URL: {u.get_backend_name()}+pymysql://... with pip install "
                 "pymysql") if u.drivername in ("mysql", "mariadb") else ""
        raise bad(f"its database driver is not installed (No module named {module!r}, which {u.drivername}:// "
                  f"loads): pip install {DRIVERS.get(module, module)}{other}") from None
    if u.get_backend_name() == "sqlite":
        if not u.database or u.database == ":memory:":
            raise bad("an in-memory database ends with this process; name a file")
        db = Path(u.database)
        if not db.parent.is_dir():
            raise bad(f"the folder {db.parent} does not exist")
        if db.is_dir() or (db.exists() and db.open("rb").read(16) != b"SQLite format 3\x00"):
            raise bad(f"{db} is not a SQLite database")
        if not db.exists() and not resume:
            return  # a new file: nothing in it yet
        if not db.exists():
            raise bad(f"{db} does not exist; a study resumes with the database it started with (leave the flag out "
                      "when that was its own optuna.db)")
    try:
        with engine.connect() as c:
            names = (c.execute(sqlalchemy.text("SELECT study_name FROM studies")).scalars().all()
                     if "studies" in sqlalchemy.inspect(c).get_table_names() else [])
    except sqlalchemy.exc.SQLAlchemyError as e:
        raise bad(f"cannot open it ({str(e).splitlines()[0]})") from None
    finally:
        engine.dispose()
    if name not in names and resume:
        raise bad(f"holds no Optuna study named {name!r}; a study resumes with the database it started with (leave "
                  "the flag out when that was its own optuna.db)")
    if name in names and not resume:
        raise bad(f"already holds an Optuna study named {name!r} (of another --storage?); give the study another "
                  "name, or another database")
