"""python -m study.run SPACE.yaml: an Optuna search run by Ray Tune, then the best configuration retrained.

  YAML -> StudySpec -> Ray (local, or --address) -> Tuner(trainable, OptunaSearch, ASHA).fit()
  -> results/<name>/{spec.yaml, trials.csv, trials.parquet, history.csv, best.yaml}
  -> best/ (retrained per seed on train + validation, tested) -> best/spikes/
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import pandas as pd
import torch
import yaml

from csnn import data as fmnist
from csnn.argtypes import positive_int
from csnn.atomic import write_atomic
from csnn.config import TUTORIAL_ACC, TrainConfig
from csnn.train import fit, load_model
from study import analyze, results, spec as specs


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


def resources(spec: specs.StudySpec) -> dict:
    """Per-trial resources; without a GPU in the Ray cluster, trials run on the CPU."""
    import ray

    gpus = spec.resources["gpus_per_trial"]
    if gpus > 0 and ray.cluster_resources().get("GPU", 0) == 0:
        warnings.warn(f"resources.gpus_per_trial is {gpus} but the Ray cluster has no GPU: "
                      "every trial runs on the CPU", stacklevel=2)
        gpus = 0
    return {"cpu": spec.resources["cpus_per_trial"], "gpu": gpus}


def search(spec: specs.StudySpec, data: fmnist.FashionMNIST, study_dir: Path, resume: bool):
    """Run (or continue) the Ray Tune + Optuna search; return its ResultGrid."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    from csnn.trainable import trainable

    ray_dir = study_dir / "ray"
    trial_fn = tune.with_resources(tune.with_parameters(trainable, data=data, fixed=spec.train), resources(spec))
    if resume:
        return tune.Tuner.restore(str(ray_dir), trainable=trial_fn, resume_unfinished=True,
                                  resume_errored=False).fit()

    storage = optuna.storages.RDBStorage(f"sqlite:///{study_dir / 'optuna.db'}")
    sampler = make_sampler(spec)
    # The Optuna study is made here and OptunaSearch loads it (same storage and name):
    # so that optuna-dashboard names the objectives (not "Objective 0"), and so that
    # the baseline can be enqueued (Ray ignores points_to_evaluate with a define-by-run space).
    metrics = [o["metric"] for o in spec.objectives]
    study = optuna.create_study(storage=storage, study_name=spec.name, sampler=sampler,
                                directions=["maximize" if o["mode"] == "max" else "minimize" for o in spec.objectives])
    with warnings.catch_warnings():  # "experimental" since Optuna 3.2, and what optuna-dashboard reads
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(metrics)
    if spec.search["baseline"]:
        study.enqueue_trial(specs.baseline_params(spec))
    # Several objectives: Optuna's multi-objective search on each trial's last
    # report; Ray's own metric (progress table, ASHA when single) is the first.
    modes = [o["mode"] for o in spec.objectives]
    searcher = OptunaSearch(space=specs.define_by_run(spec), metric=metrics if spec.multi else metrics[0],
                            mode=modes if spec.multi else modes[0], sampler=sampler, study_name=spec.name,
                            storage=storage)
    epochs = spec.config({}).epochs
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=epochs,
                               grace_period=min(spec.scheduler["grace_period"], epochs),
                               reduction_factor=spec.scheduler["reduction_factor"])
                 if spec.scheduler["type"] == "asha" else FIFOScheduler())
    tuner = tune.Tuner(
        trial_fn,
        tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, search_alg=searcher, scheduler=scheduler,
                                    num_samples=spec.search["num_samples"],
                                    max_concurrent_trials=spec.search["max_concurrent"] or None),
        run_config=tune.RunConfig(
            name="ray", storage_path=str(study_dir),
            failure_config=tune.FailureConfig(max_failures=1),  # one retry from the last checkpoint
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        ),
    )
    return tuner.fit()


def retrain(spec: specs.StudySpec, best: dict, data: fmnist.FashionMNIST, study_dir: Path) -> dict:
    """Retrain the best configuration from scratch per seed on train + validation
    (all 60k training images), test on the full test set, render the encoder.
    Written to best.partial/ and renamed to best/ when complete."""
    final = study_dir / "best"
    work = study_dir / "best.partial"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    rows = []
    for seed in spec.retrain["seeds"]:
        cfg = TrainConfig.from_dict({**best["config"], "epochs": spec.retrain["epochs"], "seed": seed,
                                     "val_size": 0, "train_size": 0, "test_size": 0})
        print(f"retraining the best configuration with seed {seed} ({cfg.epochs} epochs, "
              f"{len(data.train_y)} training images)", flush=True)
        out = work / f"seed{seed}"
        history = fit(cfg, data, out, lambda m, s=seed: print(
            f"  seed {s} epoch {m['epoch']}: test_acc {m['test_acc']:.4f} ({m['epoch_s']:.0f} s)", flush=True))
        (out / "config.yaml").write_text(cfg.to_yaml())
        rows += [{"seed": seed, **m} for m in history]
    table = pd.DataFrame(rows)
    table.to_csv(work / "metrics.csv", index=False)
    finals = table.groupby("seed")["test_acc"].last()
    summary = {
        "trial_id": best["trial_id"], "epochs": spec.retrain["epochs"], "seeds": spec.retrain["seeds"],
        "test_acc": {int(s): float(a) for s, a in finals.items()},
        "test_acc_mean": float(finals.mean()),
        "test_acc_std": float(finals.std(ddof=1)) if len(finals) > 1 else 0.0,
        "epoch_s_mean": float(table["epoch_s"].mean()),
    }
    (work / "summary.yaml").write_text(yaml.safe_dump(summary, sort_keys=False))
    if spec.render["images"] > 0:
        from csnn.spikes import render

        net, _ = load_model(work / f"seed{spec.retrain['seeds'][0]}" / "checkpoint_latest.pth")
        render(net, data.test_x[: spec.render["images"]], work / "spikes")
    shutil.rmtree(final, ignore_errors=True)
    work.rename(final)
    return summary




def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m study.run", description=__doc__.split("\n")[0])
    p.add_argument("space", help="search-space YAML file")
    p.add_argument("--resume", action="store_true", help="continue an interrupted study")
    p.add_argument("--retrain", action="store_true", help="retrain the best configuration of a finished study again")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--storage", default="results", help="folder for results: STORAGE/<name>/ (default: results)")
    p.add_argument("--num-samples", type=positive_int, default=None, help="override search.num_samples")
    p.add_argument("--no-retrain", action="store_true", help="skip retraining the best configuration")
    p.add_argument("--dry-run", action="store_true", help="validate and print the resolved study; start nothing")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: $CSNN_DATA, then Debian's)")
    p.add_argument("--download", action="store_true", help="download Fashion-MNIST with torchvision if not found")
    return p.parse_args(argv)


def values(spec: specs.StudySpec, name: str) -> list:
    """Every value a TrainConfig field can take in this study: the fixed one, or the
    searched range's bounds and choices (in every case of a conditional range)."""
    if name not in spec.space:
        return [getattr(spec.config({}), name)]
    p = spec.space[name]
    out = []
    for d in p["cases"].values() if "depends_on" in p else [p]:
        out += d["choices"] if d["type"] == "categorical" else [d["low"], d["high"]]
    return out


def check_machine(spec: specs.StudySpec, data: fmnist.FashionMNIST) -> None:
    """What the file alone cannot tell: that the sizes fit the data and the devices exist here."""
    from csnn.train import resolve_device

    where = lambda k: f"{spec.path}: {'space' if k in spec.space else 'train'}.{k}"  # noqa: E731
    n_train, n_test = len(data.train_y), len(data.test_y)
    val = max(values(spec, "val_size"))
    if val >= n_train:
        raise specs.SpecError(f"{where('val_size')}: {val} must be smaller than the {n_train} training images in {data.source}")
    train = max(values(spec, "train_size"))
    if train > n_train - val:
        raise specs.SpecError(f"{where('train_size')}: {train} is more than the {n_train - val} training images "
                              f"left after val_size {val} in {data.source}")
    test = max(values(spec, "test_size"))
    if test > n_test:
        raise specs.SpecError(f"{where('test_size')}: {test} is more than the {n_test} test images in {data.source}")
    if spec.render["images"] > n_test:
        raise specs.SpecError(f"{spec.path}: render.images: {spec.render['images']} is more than the {n_test} "
                              f"test images in {data.source}")
    for device in values(spec, "device"):
        try:
            dev = resolve_device(device)
        except RuntimeError as e:
            raise specs.SpecError(f"{where('device')}: {e}") from None
        need = activation_bytes(max(values(spec, "T")), max(values(spec, "channels")), max(values(spec, "batch_size")))
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


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return _main(args)
    except (specs.SpecError, fmnist.DataError, results.StudyError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _main(args) -> int:
    spec = specs.load(args.space)
    resolved = yaml.safe_dump(spec.to_dict(), sort_keys=False)  # as written to spec.yaml, before any flag
    if args.num_samples is not None and not args.resume:
        spec.search["num_samples"] = args.num_samples
    storage = Path(args.storage)
    if storage.exists() and not storage.is_dir():
        raise UsageError(f"--storage {args.storage}: is a file; name a folder for the results")
    study_dir = (storage / spec.name).resolve()
    if study_dir.exists() and not study_dir.is_dir():
        raise UsageError(f"{study_dir}: is a file, not a study folder; remove it or choose another name or --storage")
    exists = study_dir.exists() and any(study_dir.iterdir())
    if exists and not (args.resume or args.retrain or args.dry_run):
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
    # --resume finishes only a retrain that was cut short (best/ missing).
    retrain_now = complete and (args.retrain or (not (study_dir / "best").is_dir() and can_retrain
                                                 and not args.no_retrain))
    if args.resume and complete and not retrain_now and not args.dry_run:
        print(f"study {spec.name} is complete ({study_dir}): nothing to resume. Retrain its best configuration "
              "again with --retrain; read it with python -m study.analyze")
        return 0
    if args.resume and not complete and not args.dry_run:
        from ray import tune

        if not tune.Tuner.can_restore(str(study_dir / "ray")):
            raise UsageError(f"--resume: no study to continue in {study_dir}")

    data = fmnist.load(args.data_dir, download=args.download)
    check_machine(spec, data)
    if args.dry_run:
        print(f"# {args.space}: valid; data {data.source} ({len(data.train_y)} training, {len(data.test_y)} test "
              f"images); results would go to {study_dir}\n{resolved}", end="")
        return 0
    if retrain_now:  # --retrain, or --resume of a study whose retrain did not finish
        best = results.load(study_dir).best
        if best is None:
            raise UsageError(f"{study_dir}: no trial reported the objective; nothing to retrain")
        s = retrain(spec, best, data, study_dir)
        print(f"retrained best: test_acc {s['test_acc_mean']:.4f} ± {s['test_acc_std']:.4f} over seeds "
              f"{s['seeds']} (tutorial baseline {TUTORIAL_ACC}); {study_dir / 'best'}", flush=True)
        return 0
    return run(spec, data, study_dir, resume=args.resume, address=args.address, do_retrain=not args.no_retrain)


def run(spec: specs.StudySpec, data: fmnist.FashionMNIST, study_dir: Path, resume: bool = False,
        address: str | None = None, do_retrain: bool = True) -> int:
    import ray

    start = time.time()
    study_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        write_atomic(study_dir / "spec.yaml", yaml.safe_dump(spec.to_dict(), sort_keys=False))
    if not ray.is_initialized():
        # A bare ray.init() would join any cluster a `ray start` left behind: be explicit.
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local")
    grid = search(spec, data, study_dir, resume)
    if len(grid) < spec.search["num_samples"] or grid.num_terminated + grid.num_errors < len(grid):
        # Ctrl-C: Ray saved its state and returned early. Export nothing that
        # would look like a finished study.
        print(f"study {spec.name} interrupted after {grid.num_terminated + grid.num_errors} of "
              f"{spec.search['num_samples']} trials; continue it with --resume", file=sys.stderr)
        return 130
    trials, history, best = results.export(grid, spec, study_dir)
    # The top of the report the analysis writes: the same lines, one place.
    ended = results.Study(study_dir, spec, trials, history, best, None, None, trials_file=study_dir / "trials.parquet")
    print("\n".join(analyze.summary(ended)), flush=True)
    if best and do_retrain and spec.retrain["seeds"] and spec.retrain["epochs"] > 0:
        s = retrain(spec, best, data, study_dir)
        print(f"retrained best: test_acc {s['test_acc_mean']:.4f} ± {s['test_acc_std']:.4f} over seeds "
              f"{s['seeds']} (tutorial baseline {TUTORIAL_ACC}); {study_dir / 'best'}", flush=True)
    print(f"results in {study_dir}; wall time {(time.time() - start) / 60:.1f} min")
    return 0 if best else 1


if __name__ == "__main__":
    sys.exit(main())
