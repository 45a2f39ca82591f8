"""python -m study.run SPACE.yaml: an Optuna search run by Ray Tune, then the best configuration retrained.

  YAML -> StudySpec -> Ray (local, or --address) -> resources planned from the cluster's GPUs
  -> every node checked to see --storage -> Tuner(trainable, OptunaSearch, ASHA).fit()
  -> STORAGE/<name>/{spec.yaml, trials.csv, trials.parquet, history.csv, best.yaml}
  -> retrain/ (one Ray trial per seed, at once) -> best/ (metrics, checkpoints, placement) -> best/spikes/
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import os
import signal
import sys

if __name__ == "__main__":  # Ctrl-C while the imports below run (seconds): one line, not a traceback
    signal.signal(signal.SIGINT, lambda *_: (print("interrupted while starting; nothing was written",
                                                   file=sys.stderr), os._exit(130)))
import tempfile
import time
import warnings
from pathlib import Path

import pandas as pd
import pyarrow.fs as pafs
import torch
import yaml

from csnn import data as fmnist
from csnn.argtypes import positive_int
from csnn.config import METRICS, TUTORIAL_ACC, TrainConfig
from csnn.train import load_model
from study import analyze, estimate, results, spec as specs, warmstart
from study.storage import Location, StorageError, check_nodes_see, mount_type


def make_sampler(spec: specs.StudySpec):
    import optuna

    seed = spec.search["seed"]
    return {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "qmc": lambda: optuna.samplers.QMCSampler(seed=seed),
        "gp": lambda: optuna.samplers.GPSampler(seed=seed),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed),
    }[spec.search["sampler"]]()


class PlanError(ValueError):
    pass


def plan(spec: specs.StudySpec, gpus: float, cpus: float, node_gpus: float, allow_cpu: bool = False,
         allow_pending_gpus: bool = False, node_cpus: float | None = None) -> dict:
    """Per-trial resources and trials at once, from the spec and the cluster's
    totals (GPUs, CPUs, most GPUs on one node).

    gpus_per_trial auto: Ray packs fractional GPU requests onto as few GPUs as it
    can (ray-project/ray #28679), so each trial gets 1/k of a GPU with k the
    fewest trials per GPU that still fit the concurrent trials on the cluster's
    GPUs (at most trials_per_gpu). max_concurrent auto: every GPU full
    (GPUs x trials_per_gpu), a whole multiple of the GPUs, within the CPUs."""
    want, conc = spec.resources["gpus_per_trial"], spec.search["max_concurrent"]
    cpt, per_gpu_max, n = spec.resources["cpus_per_trial"], spec.resources["trials_per_gpu"], spec.search["num_samples"]
    where = spec.path or spec.name
    node_cpus = cpus if node_cpus is None else node_cpus
    if cpt > node_cpus and not allow_pending_gpus:  # Ray would keep the trials pending for ever
        raise PlanError(f"{where}: resources.cpus_per_trial is {cpt:g} but no Ray node has more than {node_cpus:g} "
                        "CPUs: no trial could start; ask for at most that")
    cpu_slots = max(1, int(cpus // cpt))
    if want == "auto" or want > 0:
        if gpus == 0 and allow_pending_gpus:
            # An autoscaler adds GPU nodes as trials ask: a whole GPU per trial spreads them.
            if conc == "auto":
                raise PlanError(f"{where}: search.max_concurrent auto needs the cluster's GPUs, and it has none yet "
                                "(--allow-pending-gpus); give search.max_concurrent a number")
            g = 1.0 if want == "auto" else want
            return {"gpu": g, "cpu": cpt, "max_concurrent": conc, "retrain_gpu": max(g, 1.0) if want == "auto" else g,
                    "summary": f"up to {conc or n} trials at once, {g:g} GPU and {cpt:g} CPUs each, "
                               "on GPUs the autoscaler has still to add"}
        if gpus == 0 and not allow_cpu:
            raise PlanError(f"{where}: resources.gpus_per_trial is {want} but the Ray cluster has no GPU. This study "
                            "is sized for GPUs and would run for days on CPUs: use search_spaces/quick.yaml (sized "
                            "for a CPU), pass --allow-cpu to run it on the CPUs anyway, or --allow-pending-gpus on "
                            "an autoscaling cluster whose GPU nodes are yet to start")
        if gpus == 0:
            warnings.warn(f"{where}: resources.gpus_per_trial is {want} but the Ray cluster has no GPU: "
                          "every trial runs on the CPU (--allow-cpu)", stacklevel=2)
    if not (want == "auto" or want > 0) or gpus == 0:
        conc = min(cpu_slots, n) if conc == "auto" else conc
        running = min(conc or n, n, cpu_slots)
        return {"gpu": 0, "cpu": cpt, "max_concurrent": conc, "retrain_gpu": 0,
                "summary": f"{running} trials at once on CPUs ({cpt:g} each), no GPU"}
    whole = max(1, int(gpus))
    if want == "auto":
        if conc == "auto":
            conc = min(whole * per_gpu_max, n, cpu_slots)
            conc = conc // whole * whole or conc  # a multiple of the GPUs: Ray's packing then fills them all
        running = min(conc or n, n, cpu_slots, whole * per_gpu_max)
        per_gpu = min(per_gpu_max, math.ceil(running / whole))
        g = math.floor(1e4 / per_gpu) / 1e4  # Ray counts GPUs to 1e-4: k shares must fit in one
        retrain_gpu = 1.0
    else:
        if want > node_gpus:
            raise PlanError(f"{where}: resources.gpus_per_trial is {want} but no Ray node has more than {node_gpus:g} "
                            "GPUs: no trial could start; use at most that, or auto")
        g = want
        if conc == "auto":
            conc = min(int(gpus // want), n, cpu_slots)
        running = min(conc or n, n, cpu_slots, int(gpus // want))
        retrain_gpu = want
    used = min(whole, math.ceil(running * g - 1e-9))
    return {"gpu": g, "cpu": cpt, "max_concurrent": conc, "retrain_gpu": retrain_gpu,
            "summary": f"{running} trials at once on {used} of {whole} GPUs ({g:g} GPU and {cpt:g} CPUs each)"
                       + ("" if used == whole or running == n else
                          f"; {whole - used} GPUs idle: Ray packs GPU shares, make max_concurrent a multiple of {whole}")}


def cluster() -> dict:
    """The totals plan() needs, from the Ray cluster this driver joined."""
    import ray

    nodes = [n for n in ray.nodes() if n["Alive"]]
    total = ray.cluster_resources()
    return {"gpus": total.get("GPU", 0), "cpus": total.get("CPU", 0),
            "node_gpus": max((n["Resources"].get("GPU", 0) for n in nodes), default=0),
            "node_cpus": max((n["Resources"].get("CPU", 0) for n in nodes), default=0)}


def asha_rungs(spec: specs.StudySpec) -> tuple:
    """The epochs where ASHA decides (Ray's _Bracket milestones, one bracket)."""
    if spec.scheduler["type"] != "asha":
        return ()
    epochs = spec.max_epochs
    g, rf = min(spec.scheduler["grace_period"], epochs), spec.scheduler["reduction_factor"]
    count = int(math.log(epochs / g) / math.log(rf) + 1)
    return tuple(sorted({math.ceil(g * rf ** k) for k in range(count)}))


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
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from csnn.trainable import trainable
    from study.stopping import MultiObjectiveASHA, SilentAwareOptunaSearch

    ray_dir = study / "ray"
    trial_fn = tune.with_resources(
        tune.with_parameters(trainable, data=data, fixed=spec.train,
                             checkpoint_every=spec.resources["checkpoint_every"], rungs=asha_rungs(spec),
                             silent_rate=spec.scheduler["silent_rate"]),
        {"cpu": res["cpu"], "gpu": res["gpu"]})
    if resume:
        return tune.Tuner.restore(ray_dir.path, trainable=trial_fn, resume_unfinished=True, resume_errored=False,
                                  storage_filesystem=ray_dir.fs).fit()

    storage = optuna.storages.RDBStorage(optuna_storage)
    sampler = make_sampler(spec)
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
    searcher = SilentAwareOptunaSearch(space=specs.define_by_run(spec), metric=metrics if spec.multi else metrics[0],
                                       mode=modes if spec.multi else modes[0], sampler=sampler,
                                       study_name=spec.name, storage=storage,
                                       silent_rate=spec.scheduler["silent_rate"])
    epochs = spec.max_epochs
    rungs = dict(max_t=epochs, grace_period=min(spec.scheduler["grace_period"], epochs),
                 reduction_factor=spec.scheduler["reduction_factor"])
    scheduler = (FIFOScheduler() if spec.scheduler["type"] != "asha"
                 else MultiObjectiveASHA(metrics, modes, **rungs) if spec.multi
                 else ASHAScheduler(time_attr="training_iteration", **rungs))
    tuner = tune.Tuner(
        trial_fn,
        tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, search_alg=searcher, scheduler=scheduler,
                                    num_samples=spec.search["num_samples"],
                                    max_concurrent_trials=res["max_concurrent"] or None,
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
    return tuner.fit()


RETRAIN_PENDING = "retrain.pending"  # in the study folder while a retrain has not ended


def retrain(spec: specs.StudySpec, best: dict, data: fmnist.FashionMNIST, study: Location, res: dict,
            resume: bool, timing=None) -> dict:
    """Retrain the best configuration from scratch per seed on train + validation
    (all 60k training images) and test on the full test set: one Ray Tune trial
    per seed, all at once, each with a trial's CPUs and a whole GPU (or the
    study's gpus_per_trial), checkpointing into study/retrain/ (retrain-next/ for a --retrain). Then best/ is
    assembled here from what they stored: metrics, checkpoints, placement, and
    the encoder spikes rendered from seed 0's checkpoint on the CPU. --resume
    continues an interrupted retrain (finished seeds are kept): RETRAIN_PENDING
    marks one from its start until best/ is complete, and an earlier best/ stays
    until then."""
    from ray import tune

    from csnn.trainable import trainable

    # A --retrain of a study that has one trains into retrain-next/: the earlier retrain/
    # and best/ stay until the new one is complete, then it takes retrain/'s place. The
    # marker's first line names the folder, for --resume.
    pending = study / RETRAIN_PENDING
    if resume and pending.is_file() and pending.read_text().split("\n")[0] in ("retrain", "retrain-next"):
        name = pending.read_text().split("\n")[0]
    else:
        name = "retrain-next" if (study / "retrain").exists() else "retrain"
    pending.write_text(f"{name}\n# a retrain into {name}/ started {time.ctime()}; best/ is replaced when it ends\n")

    fixed = {**best["config"], "epochs": spec.retrain["epochs"], "val_size": 0, "train_size": 0, "test_size": 0}
    fixed.pop("seed")
    seeds = spec.retrain["seeds"]
    fn = tune.with_resources(tune.with_parameters(trainable, data=data, fixed=fixed,
                                                  checkpoint_every=spec.resources["checkpoint_every"]),
                             {"cpu": res["cpu"], "gpu": res["retrain_gpu"]})
    where = study / name
    about = timing.predicted("retrain") if timing else None
    print(f"retraining the best configuration with seeds {seeds} at once ({fixed['epochs']} epochs, "
          f"{len(data.train_y)} training images, {res['retrain_gpu']:g} GPU each)"
          + (f", about {about / 60:.1f} min" if about else ""), flush=True)
    quiet = timing.quiet() if timing else {}
    if resume and tune.Tuner.can_restore(where.path, storage_filesystem=where.fs):
        grid = tune.Tuner.restore(where.path, trainable=fn, resume_errored=True,
                                  storage_filesystem=where.fs).fit()
    else:
        where.delete()
        grid = tune.Tuner(fn, param_space={"seed": tune.grid_search(seeds)},
                          tune_config=tune.TuneConfig(max_concurrent_trials=len(seeds)),
                          run_config=tune.RunConfig(name=name, storage_path=study.path,
                                                    storage_filesystem=study.fs,
                                                    failure_config=tune.FailureConfig(max_failures=1),
                                                    checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                                    **quiet)).fit()
    # A seed is done when it reported its last epoch: after Ctrl-C, Ray may
    # list a seed that never started as terminated, without metrics.
    failed = [f"{r.path}: {results.error_text(str(r.error))}" for r in grid if r.error]
    unfinished = [r for r in grid if not r.error and r.metrics.get("epoch", -1) + 1 < fixed["epochs"]]
    if failed or unfinished or len(grid) < len(seeds):
        raise RuntimeError("the retrain did not finish (" + ("; ".join(failed) or "interrupted")
                           + "); continue it with --resume")

    with tempfile.TemporaryDirectory(prefix="csnn-best-") as tmp:
        work = Path(tmp)
        rows, placement = [], {}
        for r in sorted(grid, key=lambda r: r.config["seed"]):
            seed = r.config["seed"]
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
        summary = {
            "trial_id": best["trial_id"], "epochs": spec.retrain["epochs"], "seeds": seeds,
            "test_acc": {int(s): float(a) for s, a in finals.items()},
            "test_acc_mean": float(finals.mean()),
            "test_acc_std": float(finals.std(ddof=1)) if len(finals) > 1 else 0.0,
            "epoch_s_mean": float(table["epoch_s"].mean()),
            "placement": placement,  # per seed: node_ip, hostname, gpu_ids, run_device
        }
        if spec.render["images"] > 0:
            from csnn.spikes import render

            net, _ = load_model(work / f"seed{seeds[0]}" / "checkpoint_latest.pth")
            about = timing.predicted("spikes") if timing else None
            print(f"rendering the encoder spikes of {spec.render['images']} test images at {net.T} time steps"
                  + (f", about {about:.0f} s" if about else ""), flush=True)
            with timing.phase("spikes") if timing else contextlib.nullcontext():
                render(net, data.test_x[: spec.render["images"]], work / "spikes")
        final = study / "best"
        final.delete()
        final.upload(work)  # summary.yaml last: best/ counts as complete only with it
        (final / "summary.yaml").write_text(yaml.safe_dump(summary, sort_keys=False))
    if name == "retrain-next":
        (study / "retrain").delete()
        where.move_to(study / "retrain")
    pending.delete()
    return summary




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


def check_machine(spec: specs.StudySpec, data: fmnist.FashionMNIST) -> None:
    """What the file alone cannot tell: that the sizes fit the data and the devices exist here."""
    from csnn.train import resolve_device

    where = lambda k: f"{spec.path}: {'space' if k in spec.space else 'train'}.{k}"  # noqa: E731
    n_train, n_test = len(data.train_y), len(data.test_y)
    val = max(specs.values(spec, "val_size"))
    if val >= n_train:
        raise specs.SpecError(f"{where('val_size')}: {val} must be smaller than the {n_train} training images in {data.source}")
    train = max(specs.values(spec, "train_size"))
    if train > n_train - val:
        raise specs.SpecError(f"{where('train_size')}: {train} is more than the {n_train - val} training images "
                              f"left after val_size {val} in {data.source}")
    test = max(specs.values(spec, "test_size"))
    if test > n_test:
        raise specs.SpecError(f"{where('test_size')}: {test} is more than the {n_test} test images in {data.source}")
    if spec.render["images"] > n_test:
        raise specs.SpecError(f"{spec.path}: render.images: {spec.render['images']} is more than the {n_test} "
                              f"test images in {data.source}")
    for device in specs.values(spec, "device"):
        try:
            dev = resolve_device(device)
        except RuntimeError as e:
            raise specs.SpecError(f"{where('device')}: {e}") from None
        need = activation_bytes(max(specs.values(spec, "T")), max(specs.values(spec, "channels")), max(specs.values(spec, "batch_size")))
        have = (torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda"
                else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        if need > have:  # a warning: the estimate is rough, and the user may know better
            print(f"warning: {spec.path}: the largest T, channels and batch_size need about {need / 2**30:.0f} GiB "
                  f"for one batch's activations, more than the {have / 2**30:.0f} GiB of {dev}; lower batch_size "
                  "or channels", file=sys.stderr)


def activation_bytes(T: int, channels: int, batch_size: int) -> int:
    """A rough size of what one training batch keeps for the backward pass: per image and
    time step, about ten float32 maps of C x 28 x 28 (convolutions, batch norms, membrane
    potentials and spikes, at full and pooled size)."""
    return batch_size * T * channels * 28 * 28 * 4 * 10


class UsageError(Exception):
    """A flag that does not fit the study folder; exit 2 with the message."""


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
    except ImportError as e:
        raise bad(f"its database driver is not installed ({e}); install it (for postgresql:// with SQLAlchemy 2.1: "
                  "pip install 'psycopg[binary]')") from None
    if u.get_backend_name() == "sqlite":
        if not u.database or u.database == ":memory:":
            raise bad("an in-memory database ends with this process; name a file")
        db = Path(u.database)
        if not db.parent.is_dir():
            raise bad(f"the folder {db.parent} does not exist")
        if db.is_dir() or (db.exists() and db.open("rb").read(16) != b"SQLite format 3\x00"):
            raise bad(f"{db} is not a SQLite database")
        if not db.exists():
            return  # a new file: nothing in it yet
    try:
        with engine.connect() as c:
            names = (c.execute(sqlalchemy.text("SELECT study_name FROM studies")).scalars().all()
                     if "studies" in sqlalchemy.inspect(c).get_table_names() else [])
    except sqlalchemy.exc.SQLAlchemyError as e:
        raise bad(f"cannot open it ({str(e).splitlines()[0]})") from None
    finally:
        engine.dispose()
    if name in names and not resume:
        raise bad(f"already holds an Optuna study named {name!r} (of another --storage?); give the study another "
                  "name, or another database")


LEFTOVERS = ("spec.yaml", "optuna.db", "ray", "estimate.yaml")  # what a run writes before Ray records its first trial


def never_started(study_dir: Location) -> bool:
    """Whether a study folder holds only what a run writes before Ray's first state
    save (spec.yaml, the Optuna database, a ray/ folder that cannot be restored, a
    storage-check marker or a half-written .tmp): a failure or Ctrl-C in that
    moment. Such a folder is started afresh rather than refused."""
    names = {Path(i.path).name for i in study_dir.fs.get_file_info(pafs.FileSelector(study_dir.path))}
    if not all(n in LEFTOVERS or n.startswith(".storage-check-") or n.endswith(".tmp") for n in names):
        return False
    if "ray" in names:
        from ray import tune

        return not tune.Tuner.can_restore((study_dir / "ray").path, storage_filesystem=study_dir.fs)
    return True


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
    # A Ray its caller started (a notebook's, the tests') is the caller's to stop: left up.
    ours = "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
    try:
        return _main(args)
    except (specs.SpecError, fmnist.DataError, results.StudyError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside Ray Tune's own handling (imports, Ray's start, loading, exporting)
        print(f"interrupted; {next_step(args)}", file=sys.stderr)
        return 130
    finally:
        if ours and "ray" in sys.modules:  # here rather than at exit, where a second Ctrl-C would be a traceback
            try:
                sys.modules["ray"].shutdown()
            except KeyboardInterrupt:
                pass


def next_step(args) -> str:
    """What to run after an interruption, from what the study folder holds."""
    d = args.study_dir
    again = "python -m study.run " + " ".join(a for a in sys.argv[1:] if a != "--resume")
    if d is None or d.is_empty_dir() or never_started(d):
        return f"the study had not started; run the same command again ({again})"
    return f"continue it with --resume ({again} --resume)"


def _main(args) -> int:
    if args.retrain and args.no_retrain:
        raise UsageError("--retrain and --no-retrain contradict each other; give one")
    if args.address is not None:
        check_address(args.address)
    elif os.environ.get("RAY_ADDRESS"):
        check_address(os.environ["RAY_ADDRESS"], "RAY_ADDRESS")
    spec = specs.load(args.space)
    resolved = yaml.safe_dump(spec.to_dict(), sort_keys=False)  # as written to spec.yaml, before any flag
    if args.num_samples is not None and not args.resume:
        spec.search["num_samples"] = args.num_samples
    try:
        storage = Location.parse(args.storage)
        if storage.is_file():
            raise UsageError(f"--storage {args.storage}: is a file; name a folder (or a URI) for the results")
        storage.check_writable()
        study_dir = storage / spec.name
        if study_dir.is_file():
            raise UsageError(f"{study_dir}: is a file, not a study folder; remove it or choose another name or --storage")
        args.study_dir = study_dir
        exists = not study_dir.is_empty_dir()
    except StorageError as e:
        raise UsageError(str(e)) from None
    except OSError as e:
        raise UsageError(f"--storage {args.storage}: cannot read it ({e})") from None
    if args.optuna_storage is not None:
        check_optuna_storage(args.optuna_storage, spec.name, args.resume or args.retrain)
    unstarted = exists and never_started(study_dir)
    flag = "--resume" if args.resume else "--retrain" if args.retrain else None
    if args.warm_start and flag:
        raise UsageError(f"--warm-start with {flag}: a study is warm-started when it begins, and this one has; "
                         "leave --warm-start out")
    if "" in args.warm_start:
        raise UsageError("--warm-start '': name the folder of an earlier study (results/<name>)")
    try:
        sources = [Location.parse(w) for w in args.warm_start]
    except StorageError as e:
        raise UsageError(f"--warm-start: {e}") from None
    for w, loc in zip(args.warm_start, sources):
        if loc.shown == study_dir.shown:
            raise UsageError(f"--warm-start {w}: that is this study's own folder; name an earlier study")
        if [x.shown for x in sources].count(loc.shown) > 1:
            raise UsageError(f"--warm-start {w}: given twice; its trials would be told twice")
    if unstarted and flag and not args.dry_run:
        raise UsageError(f"{flag}: the study in {study_dir} never started (an earlier run stopped before Ray "
                         f"recorded its first trial); run the same command without {flag} to start it")
    if exists and not unstarted and not (args.resume or args.retrain or args.dry_run):
        raise UsageError(f"{study_dir} already holds a study; pass --resume to continue it, "
                         "or choose another name or --storage")
    if (args.resume or args.retrain) and not args.dry_run:
        if not (study_dir / "spec.yaml").is_file():
            raise UsageError(f"--{'resume' if args.resume else 'retrain'}: no study in {study_dir} (no spec.yaml)")
        stored = (study_dir / "spec.yaml").read_text()
        if stored != resolved:
            raise UsageError(f"--{'resume' if args.resume else 'retrain'}: {args.space} differs from the study stored in {study_dir / 'spec.yaml'}; "
                             "resume with the same file")
        if args.num_samples is not None and args.num_samples != spec.search["num_samples"]:
            raise UsageError(f"--num-samples {args.num_samples}: a study keeps the number of trials it started with "
                             f"({spec.search['num_samples']}; Ray Tune cannot change it on --resume); leave the flag out")
    complete = (study_dir / "trials.csv").is_file() or (study_dir / "trials.parquet").is_file()
    if args.retrain and not complete and not args.dry_run:
        raise UsageError(f"--retrain: the study in {study_dir} has not ended; continue it with --resume")
    can_retrain = bool(spec.retrain["seeds"]) and spec.retrain["epochs"] > 0
    if args.retrain and not can_retrain:
        raise UsageError(f"--retrain: {args.space} sets no retrain (retrain.seeds empty or retrain.epochs 0)")
    # A finished study is left alone: its best/ is replaced only on request (--retrain);
    # --resume finishes only a retrain that was cut short (its RETRAIN_PENDING marker is
    # there), also one of --retrain; not one that never started (--no-retrain).
    cut_short = (study_dir / RETRAIN_PENDING).is_file()
    retrain_now = complete and (args.retrain or (args.resume and cut_short and can_retrain and not args.no_retrain))
    if args.resume and complete and not retrain_now and not args.dry_run:
        print(f"study {spec.name} is complete ({study_dir}): nothing to resume. Retrain its best configuration "
              "again with --retrain; read it with python -m study.analyze")
        return 0
    if args.resume and not complete and not args.dry_run:
        from ray import tune

        if not tune.Tuner.can_restore((study_dir / "ray").path, storage_filesystem=study_dir.fs):
            raise UsageError(f"--resume: no study to continue in {study_dir}")

    data = fmnist.load(args.data_dir, download=args.download)
    check_machine(spec, data)
    try:
        warm = warmstart.plan(spec, args.warm_start, data.fingerprint)
    except warmstart.WarmStartError as e:
        raise UsageError(str(e)) from None
    for line in warmstart.lines(warm):
        print(line, flush=True)
    if args.dry_run:
        print(f"# {args.space}: valid; data {data.source} ({len(data.train_y)} training, {len(data.test_y)} test "
              f"images); results would go to {study_dir}\n{resolved}", end="")
        try:
            print(estimate.line(estimate.here(spec, len(data.train_y), len(data.test_y), plan, args.allow_cpu,
                                              args.allow_pending_gpus)), flush=True)
        except PlanError as e:  # this machine could not run it (too few CPUs a trial): the file is still valid
            print(f"warning: no estimate for this machine: {e}", file=sys.stderr)
        return 0
    if retrain_now and results.load(study_dir).best is None:
        raise UsageError(f"{study_dir}: no trial reported the objective; nothing to retrain")
    if unstarted:  # what the stopped run left: the study starts afresh
        print(f"{study_dir} holds only what an earlier run wrote before its first trial was recorded; "
              "starting the study afresh", flush=True)
        for name in LEFTOVERS:
            (study_dir / name).delete()
    # --retrain, or --resume of a study whose retrain did not finish: the retrain alone
    return run(spec, data, study_dir, resume=args.resume, address=args.address, do_retrain=not args.no_retrain,
               allow_cpu=args.allow_cpu, allow_pending_gpus=args.allow_pending_gpus,
               optuna_storage=args.optuna_storage, retrain_only=retrain_now, fresh_retrain=args.retrain,
               verbose=args.verbose, warm=warm)


def run(*args, verbose: bool = False, **kwargs) -> int:
    """_run with Ray's output engine chosen for this call only (progress.ray_output: its tables with --verbose)."""
    from study.progress import ray_output

    with ray_output(verbose):
        return _run(*args, verbose=verbose, **kwargs)


def _run(spec: specs.StudySpec, data: fmnist.FashionMNIST, study: Location | str | Path, resume: bool = False,
         address: str | None = None, do_retrain: bool = True, allow_cpu: bool = False,
         allow_pending_gpus: bool = False, optuna_storage: str | None = None, retrain_only: bool = False,
         fresh_retrain: bool = False, verbose: bool = False, warm: list | None = None) -> int:
    """Search, then retrain the best configuration; with `retrain_only` (an ended study)
    only the retrain, continued (`resume`) or from scratch (`fresh_retrain`)."""
    import ray

    from study.progress import Timing

    start = time.time()
    study = study if isinstance(study, Location) else Location.parse(study)
    timing = Timing(verbose)
    fresh = not resume and not retrain_only
    # A CPU's speed is measured here, before Ray's processes start and share its cores.
    cpu_fit = estimate.cpu_speeds(spec) if fresh and estimate.may_need_cpu(spec) else None
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
        nodes = check_nodes_see(study)
    except (PlanError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"study {spec.name}: {res['summary']}; {len(nodes)} Ray node(s); results in {study}", flush=True)
    if fresh:  # the prediction, kept beside what each phase then took (timing.yaml)
        total = cluster()
        timing.estimate = estimate.predict(
            spec, res, total["cpus"], total["gpus"], len(nodes), len(data.train_y), len(data.test_y),
            cpu_fit or (estimate.cpu_speeds(spec) if res["gpu"] == 0 or res["retrain_gpu"] == 0 else None),
            do_retrain=do_retrain)
        (study / "estimate.yaml").write_text(yaml.safe_dump(timing.estimate, sort_keys=False))
        print(estimate.line(timing.estimate), flush=True)
    elif (study / "estimate.yaml").is_file():  # a --resume: the remaining time from the study's own prediction
        timing.estimate = yaml.safe_load((study / "estimate.yaml").read_text())
    timing.lap("ray_start")
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
        # Ctrl-C: Ray saved its state and returned early. Read that state: a trial
        # that was running is RUNNING there, while Ray's cleanup marks it TERMINATED
        # in the grid it returns. Export nothing that would look like a finished study.
        ended = sum(t.status in ("TERMINATED", "ERROR") for t, _ in results.trial_results(study / "ray"))
        if len(grid) < spec.search["num_samples"] or ended < len(grid):
            step = ("run the same command again: no trial was recorded" if never_started(study)
                    else "continue it with --resume")
            print(f"study {spec.name} interrupted after {ended} of {spec.search['num_samples']} trials; {step}",
                  file=sys.stderr)
            return 130
        trials, history, best = results.export(spec, study)
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
    if best and (do_retrain or retrain_only) and spec.retrain["seeds"] and spec.retrain["epochs"] > 0:
        try:
            s = retrain(spec, best, data, study, res, resume and not fresh_retrain, timing)
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"retrained best: test_acc {s['test_acc_mean']:.4f} ± {s['test_acc_std']:.4f} over seeds "
              f"{s['seeds']} (tutorial baseline {TUTORIAL_ACC}); {study / 'best'}", flush=True)
        timing.lap("retrain")
    (study / "timing.yaml").write_text(yaml.safe_dump(timing.record(resumed=not fresh), sort_keys=False))
    print(f"results in {study}; wall time {(time.time() - start) / 60:.1f} min")
    return 0 if best else 1


if __name__ == "__main__":
    sys.exit(main())
