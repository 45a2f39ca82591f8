import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from csnn import data as fmnist
from csnn.data import write_idx
from study.estimate import cpu_speeds as _measure  # the real calibration, before a test replaces it


def pytest_configure(config):
    """Every test, and every process it starts, sees an empty HOME of its own:
    nothing in the user's ~/.ray (an authentication token that a local Ray reads,
    or writes when missing), ~/.cache or ~/.config changes what a test does."""
    config.test_home = tempfile.mkdtemp(prefix="csnn-test-home-")
    os.environ["HOME"] = config.test_home
    _keep_module_order(config)


# The modules that take longest (each runs several real studies) first: `make test` gives whole modules
# to two workers (pytest -n 2 --dist loadfile) in this order, and a long module started last would
# keep one worker busy while the other has nothing left. The order is the modules' measured totals
# (make test's --durations on the 2-core machine, 2026-12-08, less what sharing studies, one trial worker
# where one will do and fewer processes saved since), longest first; the first module that needs tiny_study
# (lifecycle) comes after two that do not (resume, samplers), so that the other worker has work while
# tiny_study is made.
LONGEST_FIRST = ("test_cluster.py", "test_resume.py", "test_samplers.py", "test_lifecycle.py", "test_kills.py",
                 "test_study.py", "test_topk.py", "test_stopping.py", "test_augment.py", "test_estimate.py",
                 "test_interrupts.py", "test_analyze.py", "test_constraints.py")


def _keep_module_order(config):
    """pytest-xdist (3.6 on) sorts --dist loadfile's modules by their number of tests unless told not to
    (--no-loadscope-reorder): that put the many quick modules first and the few long ones last, where one
    worker ran a long module while the other had nothing left. Off, the controller hands the modules out in
    the order the workers collected them: LONGEST_FIRST's."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a module's own order stays


def pytest_unconfigure(config):
    shutil.rmtree(getattr(config, "test_home", ""), ignore_errors=True)


def write_dataset(folder: Path, n_train: int = 64, n_test: int = 32, gz: bool = False, seed: int = 0) -> Path:
    """A small Fashion-MNIST-shaped folder: the four IDX files, balanced labels."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, gz)
    return folder


@pytest.fixture(scope="session")
def real_data() -> fmnist.FashionMNIST:
    """The real Fashion-MNIST (Debian's package, installed by .ci/run). Tests
    that train take small stratified subsets of it."""
    return fmnist.load(fmnist.DEBIAN_DIR)


@pytest.fixture(autouse=True)
def _threads():
    # One thread a worker when make test runs two (pytest-xdist): two workers of two threads each on 2
    # cores made torch's threads wait on each other (a 3-epoch fit: 15-21 s, against 1 s on one thread).
    torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


_CPU_SPEEDS: dict = {}


@pytest.fixture(autouse=True)
def _calibrate_once(monkeypatch):
    """study.run calibrates the CPU before every fresh study (estimate.cpu_speeds: a few batches at
    each size and a Python process that imports torch, 7-18 s each on the loaded 2-core machine, 2026-12-07): the studies
    a worker runs in its own process share one real measurement per (threads, batch size), as
    estimate.cpu_speeds takes them. The studies run as processes (tiny_study, study_cmd) still measure
    their own: the estimates checked against real studies' times (tests/test_estimate.py) are theirs."""
    from study import estimate

    monkeypatch.setattr(estimate, "cpu_speeds", calibrated_once)


def calibrated_once(spec) -> dict:
    """study.estimate.cpu_speeds, measured once per (threads, batch size) in this process (_calibrate_once)."""
    from study.spec import values

    # the batch as calibrate() times it (estimate._time_network: 8 to 128 images): a spec of batch 10**7 (a row of
    # tests/test_bad_inputs.py) shares the reading at 128, as the default batch's spec does
    key = (max(1, int(spec.resources["cpus_per_trial"])), max(8, min(int(np.median(values(spec, "batch_size"))), 128)))
    if key not in _CPU_SPEEDS:
        _CPU_SPEEDS[key] = _measure(spec)
    return {k: list(v) if isinstance(v, list) else v for k, v in _CPU_SPEEDS[key].items()}


@pytest.fixture(scope="session")
def tiny_data_dir(real_data, tmp_path_factory) -> Path:
    """Real Fashion-MNIST images, few of them: 600 training and 200 test images
    (stratified), written as IDX files, for studies that must run in seconds."""
    folder = tmp_path_factory.mktemp("tiny-fmnist")
    s = fmnist.split(real_data, train_size=600, test_size=200, seed=0)
    for prefix, (x, y) in (("train", s["train"]), ("t10k", s["test"])):
        write_idx(folder / f"{prefix}-images-idx3-ubyte", x.numpy(), gz=True)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", y.numpy(), gz=True)
    return folder


ROOT = Path(__file__).resolve().parents[1]


def tiny_spec(name, **over):
    spec = {
        "name": name,
        "objective": {"metric": "val_acc", "mode": "max"},
        "train": {"epochs": 2, "batch_size": 50, "val_size": 100, "test_size": 100, "T": 2, "optimizer": "adam"},
        "space": {
            "channels": {"type": "categorical", "choices": [4, 6]},
            "lr": {"type": "float", "low": 0.003, "high": 0.03, "log": True},
        },
        "search": {"sampler": "tpe", "seed": 0, "num_samples": 3, "max_concurrent": 2},
        "scheduler": {"type": "none"},
        "resources": {"cpus_per_trial": 1},
        "retrain": {"epochs": 1, "seeds": [0, 1]},
        "render": {"images": 2},
    }
    for k, v in over.items():
        spec[k] = {**spec[k], **v} if isinstance(v, dict) and isinstance(spec.get(k), dict) else v
    return spec


def write_spec(tmp_path, spec) -> Path:
    f = tmp_path / f"{spec['name']}.yaml"
    f.write_text(yaml.safe_dump(spec, sort_keys=False))
    return f


def study_cmd(space, tmp_path, data_dir, *extra):
    return [sys.executable, "-m", "study.run", str(space), "--storage", str(tmp_path / "results"),
            "--data-dir", str(data_dir), *extra]


# `python -m study.run ...` as a process of its own (its signals, its exit, its Ray), but with estimate.cpu_speeds
# answered by the reading given in argv[1]: see calibrated().
CALIBRATED_RUN = """
import json, runpy, sys
from study import estimate
speeds = json.loads(sys.argv.pop(1))
estimate.cpu_speeds = lambda spec: speeds
runpy.run_module("study.run", run_name="__main__", alter_sys=True)
"""


def calibrated(cmd: list, spec: dict) -> list:
    """study_cmd's `python -m study.run ...` for a process whose estimate no test reads: it takes this worker's
    reading of the CPU (_calibrate_once's, for `spec`) instead of measuring the CPU itself before a fresh start
    (a few batches and a Python that imports torch: 4 s on the idle 2-core machine, 15 on a loaded one)."""
    import json

    from study import estimate, spec as specs

    assert cmd[1:3] == ["-m", "study.run"], cmd
    return [cmd[0], "-c", CALIBRATED_RUN, json.dumps(estimate.cpu_speeds(specs.parse(spec))), *cmd[3:]]


def env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def _module_ray():
    """Ends, with its module, the Ray that local_ray started: a test elsewhere may start its own."""
    yield
    import ray

    ray.shutdown()


@pytest.fixture
def local_ray(_module_ray, monkeypatch):
    """A local Ray in this process, started once for a module's in-process studies (main() of
    study.run leaves up a Ray that its caller started): not ~5 s of Ray's start and stop a study."""
    import ray

    monkeypatch.setenv("RAY_ADDRESS", "")  # as env() gives a subprocess
    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False, log_to_driver=False)


def in_process(capsys, main, *argv) -> subprocess.CompletedProcess:
    """A command's main(argv) in this process (no interpreter start, no imports: seconds a
    call), returned as subprocess.run would; its exit code, its stdout and stderr."""
    argv = [str(a) for a in argv]
    capsys.readouterr()
    saved, sys.argv = sys.argv, [sys.modules[main.__module__].__file__, *argv]  # as python -m sets it
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    finally:
        sys.argv = saved
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out, err)


def run_study(capsys, space, tmp_path, data_dir, *extra) -> subprocess.CompletedProcess:
    """study_cmd's command in this process: on the Ray of local_ray where the study starts one."""
    from study import run

    return in_process(capsys, run.main, *study_cmd(space, tmp_path, data_dir, *extra)[3:])


# tiny_study's spec: tiny_spec("e2e", **TINY_STUDY). ASHA, and the network's own keys searched (issue 34: a study
# over neuron, pooling, dropout, augment and loss runs end to end; trials.csv, best/ and the report have them).
# Their order and choices are such that the sampler's first two draws (seed 0, at random) differ in neuron,
# pooling and loss: trial 1 if, avg, mse, trial 2 plif, max, ce, both crop (simulated with study.spec and
# Optuna's sampler; the third is TPE's).
TINY_STUDY = {"scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
              "space": {"neuron": {"type": "categorical", "choices": ["if", "plif"]},
                        "loss": {"type": "categorical", "choices": ["mse", "ce"]},
                        "pooling": {"type": "categorical", "choices": ["max", "avg"]},
                        "augment": {"type": "categorical", "choices": ["none", "crop", "crop+flip"]},
                        "dropout": {"type": "float", "low": 0.0, "high": 0.3}}}


@pytest.fixture(scope="session")
def tiny_study(tiny_data_dir, tmp_path_factory):
    """A real 3-trial study (Ray Tune, Optuna, ASHA, retrain with 2 seeds, spikes)
    run once through the command line: (study folder, CompletedProcess). Once for the whole run:
    make test's two workers (pytest-xdist) share it, the first to need it runs it while the other
    waits (it trains two trials at once: the waiting worker's core is not idle), and the tests only
    read it (each that runs a command on it takes a copy)."""
    import fcntl
    import json

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    tmp_path = root / "tiny-study"
    done = root / "tiny-study.json"
    with open(root / "tiny-study.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released as the file closes (or the process ends)
        if not done.is_file():
            shutil.rmtree(tmp_path, ignore_errors=True)  # another worker's attempt that failed
            tmp_path.mkdir()
            space = write_spec(tmp_path, tiny_spec("e2e", **TINY_STUDY))
            p = subprocess.run(study_cmd(space, tmp_path, tiny_data_dir), env=env(), capture_output=True, text=True,
                               timeout=600)
            assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
            done.write_text(json.dumps({"args": p.args, "stdout": p.stdout, "stderr": p.stderr}))
    ran = json.loads(done.read_text())
    return tmp_path / "results" / "e2e", subprocess.CompletedProcess(ran["args"], 0, ran["stdout"], ran["stderr"])


def stopped_when(cue, run, *argv):
    """run(*argv) (a study.run in this process), stopped as Ctrl-C stops it once cue() holds: Ray Tune
    ends its run on SIGUSR1 as on SIGINT, saving its state (the handler it sets while a run goes on;
    a cue that holds only while trials run is sent to it, never to pytest)."""
    done = threading.Event()

    def watch():
        while not done.is_set():
            if cue():
                os.kill(os.getpid(), signal.SIGUSR1)
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        return run(*argv)
    finally:
        done.set()
        watcher.join()
