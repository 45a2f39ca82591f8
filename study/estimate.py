"""A study's cost before it runs: wall time, GPU-hours and storage, from a throughput model of the CSNN.

The model, in seconds:

  per image  training and evaluation seconds per image as a function of T, channels and the device:
             on a GPU the H200 figures of docs/gpucheck-h200.json (GPU_REF) scaled by the image's cost
             (T x the network's multiply-accumulates, which grow with channels squared), never below the
             host-bound step of the reference; on a CPU measured here at start (calibrate: a few training
             and evaluation batches at the CALIBRATION sizes, with the threads a trial gets), fitted as
             T x (a C + b C^2) and divided by COMPILE_SPEEDUP where the trial compiles its kernels, times
             the ratios of its neuron model, pooling and augmentation to the tutorial's (network_ratios)
  fixed      the *_S constants: seconds on the 2-core machine where starting Python and importing torch
             takes START_REF_S; scaled both ways by start_s(), that start measured here at calibration
             (a faster or an idler machine: smaller); 1 without a calibration (a study on GPUs)
  busy CPU   busy(): a short Python loop against the idle 2-core machine; it says how much CPU trials
             crowd each other (crowding)
  per epoch  training images / training speed + (validation + test images) / evaluation speed
             + the cost counting (COST_IMAGES images) + EPOCH_OVERHEAD_S (report, checkpoint)
  per trial  TRIAL_START_S + the expected epochs: with ASHA what asha_passes() simulates, one in
             reduction_factor a rung for many trials, most of them with few trials or search.in_order
  search     the trials' sum over the trials running at once (study.plan.plan), the first start of each
             Ray worker, and the mean over the search space (SAMPLES configurations drawn from its
             distributions, the tutorial's first when search.baseline)
  retrain    the seeds at once (retrain.top_k x the seeds), retrain.epochs on all training images (less the
             validation split with top_k > 1) and the whole test set, compiled on a CPU (COMPILE_S), a fresh
             Ray worker each
  storage    one checkpoint per trial and per retrain run: parameters + optimizer state, float32

Everything here is a plain function of the spec and the cluster's totals; study.run writes what
`predict` returns to estimate.yaml, and study.analyze's report sets it against timing.yaml.
"""
from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
import types

import numpy as np

from csnn.config import COMPILE_AUTO_IMAGES, TrainConfig
from study.plan import asha_rungs, plan as resource_plan

# docs/gpucheck-h200.json: one NVIDIA H200, T 4, 128 channels, batch 128, AMP; one full epoch of
# training ("epoch"), evaluation (bench "auto"), 1/2/4/8 trainers at once ("concurrency").
GPU_REF = {"T": 4, "channels": 128, "batch_size": 128, "train_img_s": 18331.0, "eval_img_s": 74390.0,
           "total_img_s": {1: 18618.0, 2: 27819.0, 4: 33467.0, 8: 33736.0}, "count_s": 0.13}
# Our compiled IF and pooling kernels against the plain ones, one thread on the 2-core machine at
# T 2-4, channels 8-32: training 1.9-3.2x, evaluation 2.1-2.9x (study.estimate was fitted there).
COMPILE_SPEEDUP = {"train": 2.6, "eval": 2.6}
COMPILE_S = {"warm": 6.0, "cold": 40.0}  # torch.compile per process, with and without inductor's cache
COUNT_PER_EVAL = 4.0  # the cost counting (reference formulas, float32) per image, in plain evaluations (cost_s: 2.8-5.3)
COST_IMAGES = 128  # csnn.train.COST_IMAGES: the images counted after every epoch
# The fixed costs below are seconds on the 2-core machine where starting Python and importing torch
# (start_s) takes START_REF_S; predict() scales them by start_s() / START_REF_S, measured at
# calibration, so that a faster or an idler machine gets smaller ones. Fitted on 2026-12-05 to tiny
# studies (benchmarks/estimate_vs_actual.py) on that machine, shared then (start_s 2.3-3.9 s), and to
# its earlier idle figures.
START_REF_S = 1.8
STARTUP_S = 2.4  # python -m study.run's imports, the checks
LOAD_S = 1e-5  # loading (and fingerprinting) one image of Fashion-MNIST, in the startup
RAY_START_S = 3.2  # ray.init of a local Ray on the 2-core machine, and the storage check
# The fixed costs of a trial as its time breakdown (csnn.config.TIME_PARTS) measured them in quick.yaml's
# trials on 2026-12-07, read back to the reference machine by the calibration's start_s (2.1-3.2x then):
# a worker's first set-up 3.1-8.2 s (its first forward pass imports SpikingJelly's kernels and torch's
# inductor), a later trial's 0.08-0.2 s, checkpoint and report 0.1-0.15 s an epoch.
WORKER_START_S = 5.0  # a new Ray worker: process start, imports of torch and SpikingJelly, its first forward
# The breakdown sees a trial from inside the trainable; Ray Tune's own work around it (starting and
# stopping trials on reused workers, its bookkeeping between two reports) it does not: with 0.05 for both
# a 4-trial, 10-epoch tiny study (tests/test_estimate.py) took 2.1-2.4x its estimate; with 0.3, 0.9x.
TRIAL_START_S = 0.3  # a trial on a reused worker: the data from the object store, split, network built
EPOCH_OVERHEAD_S = 0.3  # tune.report, a checkpoint where one is due, Tune's bookkeeping
TUNER_S = {"search": 2.0, "retrain": 1.5}  # a Tuner's start and end (Optuna's study, experiment state)
EXPORT_S = 0.15  # trials.csv/.parquet, history.csv, best.yaml and the summary
RENDER_S = 0.2  # one test image's encoder spikes at one time step (three formats)
# A pure-Python loop on the idle 2-core machine: how much slower it runs at calibration says how
# much of the cores others take (crowding).
BUSY_REF_S = 0.0047
SAMPLES = 300  # configurations drawn from the space for its mean cost
CALIBRATION = ((2, 8), (2, 24), (1, 64))  # (T, channels) timed on a CPU: small to larger networks, ~2 s in all
# The TrainConfig fields whose values change a trial's seconds per image on the CPU, each value priced by
# its own timing against the tutorial's network (network_ratios): the neuron model (LIF's decay; PLIF's
# sigmoid and its tau's gradient, step by step on SpikingJelly's CPU path), the pooling (ATen's avg_pool2d
# against max_pool2d, which also writes indices), the augmentation (training only). The surrogate (one
# elementwise expression in the backward pass), dropout (one multiply) and the loss (on ten outputs an image)
# are not timed: a few elementwise operations, 0.9-1.3x the tutorial's network in one timing (plain kernels,
# T 2-4, 16-24 channels, 2026-12-07), which is the spread of these timings. The ratios are the plain
# kernels'; a trial that compiles gets the same ratio (timing each network compiled would cost 6-40 s of
# compiling each). On a GPU every network is priced as the tutorial's: GPU_REF is the only GPU figure.
PRICED = ("neuron", "pooling", "augment")
RATIO_SIZE = (2, 24)  # (T, channels) of those timings: CALIBRATION's middle size
RATIO_ROUNDS = 2  # timings of each, the fastest kept (as calibrate)
RATIO_BATCH = 64  # images a batch at most in those timings: a ratio, not a speed (a study's at 64 and 128 share them)


# ------------------------------------------------------------ the network's size

def macs(T: int, channels: int) -> float:
    """Multiply-accumulates of one image's forward pass: the first conv once per image (our model
    computes it once), then per time step the second 3x3 conv at 14x14 and the two linear layers."""
    C = channels
    return 9 * C * 784 + T * (9 * C * C * 196 + C * 49 * C * 16 + C * 16 * 10)


def parameters(channels: int) -> int:
    """Parameters (and BatchNorm buffers) of the CSNN: two 3x3 convs, two BatchNorms, two linear layers."""
    C = channels
    return 9 * C + 9 * C * C + 2 * 4 * C + C * 49 * C * 16 + C * 16 * 10


def checkpoint_bytes(channels: int, optimizer: str) -> int:
    """A checkpoint's size: the float32 weights and the optimizer's state (SGD's momentum: one copy;
    Adam's two moments: two), as csnn.train saves it (README: 104 MB at 128 channels with SGD)."""
    copies = {"sgd": 2, "adam": 3, "adamw": 3}[optimizer]
    return 4 * parameters(channels) * copies


# ------------------------------------------------------------ speeds

def calibrate(threads: int, batch_size: int = 128) -> dict:
    """On this CPU, with `threads` torch threads (what Ray gives a trial: its cpus_per_trial), the
    seconds per image and time step of training and evaluation, fitted as a C + b C^2 to a few
    batches at each CALIBRATION size of the tutorial's network (plain kernels; compiled ones are
    COMPILE_SPEEDUP faster; other networks: network_ratios). Each size is timed twice after a first
    batch that allocates, and the faster kept: a moment's load from elsewhere is not the machine's
    speed (busy() measures that)."""
    # This VM's CPU runs now and then at half speed for a second or so (busy() read 1.1 or 2.0 on the
    # idle machine, a process at a time): the lower of a reading before and one after the calibration.
    load = busy()
    points = {"train": [], "eval": []}
    with _threads(threads):
        for T, C in CALIBRATION:
            train, evaluation = _time_network(TrainConfig(T=T, channels=C), batch_size)
            points["train"].append((T, C, train))
            points["eval"].append((T, C, evaluation))
    return {"threads": max(1, threads), "busy": min(load, busy()), **{k: _fit(v) for k, v in points.items()}}


@contextlib.contextmanager
def _threads(threads: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _time_network(cfg: TrainConfig, batch_size: int, rounds: int = 2, evaluation: bool = True) -> tuple[float, float]:
    """(training, evaluation) seconds per image of cfg's network (its T, channels, network keys,
    augment and loss) on the CPU, plain kernels, random images: the fastest of `rounds` timings of
    one training batch and of an evaluation of two (without `evaluation`: not timed, 0), after a first
    batch that allocates."""
    import torch

    from csnn.config import augment_names
    from csnn.model import CSNN
    from csnn.train import evaluate, make_optimizer, make_trainer

    b = max(8, min(batch_size, 128))
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2 * b, 28, 28), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, 10, (2 * b,), generator=gen)

    def fastest(fn, images: int) -> float:
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times) / images

    torch.manual_seed(0)
    net = CSNN.from_config(cfg)
    net.fuse(False)
    opt = make_optimizer(cfg, net.parameters())
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    train_epoch = make_trainer(net, opt, scaler, x[:b], y[:b], b, augment=augment_names(cfg.augment), loss=cfg.loss)
    train_epoch(gen)  # the first batch allocates: not timed
    return (fastest(lambda: train_epoch(gen), b),
            fastest(lambda: evaluate(net, x, y, b, loss=cfg.loss), len(y)) if evaluation else 0.0)


_RATIOS: dict = {}  # network_ratios' measurements in this process: (field, value, threads, batch) -> [train, eval]


def network_ratios(spec, threads: int, batch_size: int) -> dict:
    """{field: {value: [training, evaluation]}}: how many times the tutorial's network's seconds per image
    a network with that value of a PRICED field takes on this CPU, for every value of those fields the
    study can take other than the tutorial's (none for a study of the tutorial's network: nothing to
    time); an augmentation per transform (crop+flip is priced as crop's ratio times flip's), training
    only (evaluation never augments: 1). Each is timed beside the tutorial's network at RATIO_SIZE with
    at most RATIO_BATCH images a batch (_time_network, the fastest of RATIO_ROUNDS), plain kernels:
    ratios, so that a load that slows both cancels out, measured once per process (_RATIOS) as a
    study.run calibrates once."""
    from csnn.config import augment_names
    from study.spec import values

    tutorial = TrainConfig()
    wanted = []
    for f in PRICED:
        for v in dict.fromkeys(values(spec, f)):
            if v != getattr(tutorial, f):
                wanted += [(f, n) for n in augment_names(v)] if f == "augment" else [(f, v)]
    out: dict = {}
    if not wanted:
        return out
    T, C = RATIO_SIZE
    b = min(batch_size, RATIO_BATCH)
    with _threads(threads):
        base_key = ("", "", max(1, threads), b)
        if base_key not in _RATIOS:
            _RATIOS[base_key] = _time_network(TrainConfig(T=T, channels=C), b, RATIO_ROUNDS)
        base = _RATIOS[base_key]
        for f, v in dict.fromkeys(wanted):
            key = (f, v, max(1, threads), b)
            if key not in _RATIOS:
                _RATIOS[key] = _time_network(TrainConfig(T=T, channels=C, **{f: v}), b, RATIO_ROUNDS,
                                             evaluation=f != "augment")
            train, evaluation = _RATIOS[key]
            out.setdefault(f, {})[v] = [round(train / base[0], 3), round(evaluation / base[1], 3) if evaluation else 1.0]
    return out


def network_ratio(cfg: TrainConfig, cpu: dict | None) -> tuple[float, float]:
    """(training, evaluation) factor of cfg's network against the tutorial's: the product of its PRICED
    values' ratios in the calibration (cpu["network"]; an augmentation's, of its transforms); 1 for the
    tutorial's values, and on a GPU."""
    from csnn.config import augment_names

    train = evaluation = 1.0
    for f, ratios in ((cpu or {}).get("network") or {}).items():
        value = getattr(cfg, f)
        for r in (ratios.get(n) for n in (augment_names(value) if f == "augment" else [value])):
            if r:
                train, evaluation = train * r[0], evaluation * r[1]
    return train, evaluation


def _fit(points) -> list:
    """[a, b] >= 0 with seconds per image = T (a C + b C^2), least squares in relative error over the
    measured points; with b < 0 (a loaded moment can make a larger size look cheap) a alone."""
    u = np.array([s / t for t, _, s in points])
    c = np.array([float(ch) for _, ch, _ in points])
    (a, b), *_ = np.linalg.lstsq(np.stack([c / u, c * c / u], 1), np.ones(len(u)), rcond=None)
    if b < 0 or a < 0:
        return [float(np.mean(u / c)), 0.0]
    return [float(a), float(b)]


def start_s() -> float:
    """Seconds to start a Python process that imports torch, here and now: what a Ray worker's start,
    study.run's own start and much of Ray's are made of, and the unit the fixed costs scale by. One
    process of a second or more: a moment's load or a slow clock averages out, which a short loop's
    reading (busy) does not."""
    import subprocess
    import sys

    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True, capture_output=True)
    return time.perf_counter() - t0


def busy(rounds: int = 5) -> float:
    """How much slower than on the idle 2-core machine (BUSY_REF_S) this CPU runs a short Python
    loop now, the median of a few rounds: 1 there when idle, 2 when another process takes half a core
    from each round. Within [0.5, 8]."""
    times = []
    for _ in range(rounds + 1):  # the first round wakes an idle CPU's clock: not counted
        t0 = time.perf_counter()
        sum(i * i for i in range(200_000))
        times.append(time.perf_counter() - t0)
    return min(8.0, max(0.5, float(np.median(times[1:])) / BUSY_REF_S))


def crowding(threads: float, cpus: float, f: float) -> float:
    """How much slower `threads` busy threads run than the calibration's one, on `cpus` cores that
    others keep busy: (f - 1) x cpus cores' worth of other work, f = busy() (a rough reading: near 1,
    within its noise, it adds little)."""
    other = max(0.0, (f - 1) * cpus)
    at_calibration = min(1.0, cpus / (1 + other))
    now = min(1.0, cpus / (threads + other))
    return at_calibration / now


def per_image_s(cfg: TrainConfig, device: str, cpu: dict | None, share: int = 1) -> tuple[float, float]:
    """(training, evaluation) seconds per image of one trial of cfg. On a GPU, `share` trials run on
    one GPU at once (their total throughput from GPU_REF); on a CPU, `cpu` is calibrate()'s fit."""
    if device == "gpu":
        ref = GPU_REF
        scale = macs(cfg.T, cfg.channels) / macs(ref["T"], ref["channels"])
        # The reference step is host-bound (DESIGN.md): a smaller network is no faster per batch.
        floor = ref["batch_size"] / cfg.batch_size
        slow = _interp(ref["total_img_s"], share) / ref["total_img_s"][1] / share
        return (max(scale, floor) / ref["train_img_s"] / slow, max(scale, floor) / ref["eval_img_s"] / slow)
    compiled = compiles(cfg)
    (ta, tb), (ea, eb) = cpu["train"], cpu["eval"]
    C = cfg.channels
    rt, re_ = network_ratio(cfg, cpu)
    train = rt * cfg.T * (ta * C + tb * C * C) / (COMPILE_SPEEDUP["train"] if compiled else 1)
    evaluation = re_ * cfg.T * (ea * C + eb * C * C) / (COMPILE_SPEEDUP["eval"] if compiled else 1)
    return train, evaluation


def _interp(table: dict, k: float) -> float:
    keys = sorted(table)
    if k <= keys[0]:
        return table[keys[0]]
    for lo, hi in zip(keys, keys[1:]):
        if k <= hi:
            return table[lo] + (table[hi] - table[lo]) * (k - lo) / (hi - lo)
    return table[keys[-1]]


def compiles(cfg: TrainConfig, n_train: int = 60_000) -> bool:
    """Whether a CPU run compiles its kernels (csnn.train.fit's rule for compile: auto)."""
    n = cfg.train_size or n_train - cfg.val_size
    return cfg.compile is True or (cfg.compile == "auto" and cfg.epochs * n >= COMPILE_AUTO_IMAGES)


def inductor_cache_warm() -> bool:
    """Whether torch.compile will find inductor's cache here (else the first compile takes ~40 s)."""
    import getpass

    d = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or os.path.join(tempfile.gettempdir(),
                                                                    f"torchinductor_{getpass.getuser()}")
    return os.path.isdir(d) and bool(os.listdir(d))


# ------------------------------------------------------------ one trial, the space, the study

def epoch_s(cfg: TrainConfig, device: str, cpu: dict | None, n_train: int, n_test: int, share: int = 1,
            fixed: float = 1.0) -> float:
    """One epoch of cfg: training (the last partial batch dropped), validation and test evaluation,
    the cost counting, the report (`fixed`: fixed_scale())."""
    train_s, eval_s = per_image_s(cfg, device, cpu, share)
    images = cfg.train_size or n_train - cfg.val_size
    images -= images % cfg.batch_size if images >= cfg.batch_size else 0
    evaluated = cfg.val_size + (cfg.test_size or n_test)
    if device == "gpu":
        count = GPU_REF["count_s"]
    else:  # the counting runs the plain reference formulas, compiled or not
        plain = per_image_s(TrainConfig.from_dict({**cfg.to_dict(), "compile": False}), device, cpu)[1]
        count = COUNT_PER_EVAL * plain * min(COST_IMAGES, cfg.val_size or cfg.test_size or n_test)
    return images * train_s + evaluated * eval_s + count + fixed * EPOCH_OVERHEAD_S


def epoch_fractions(spec, epochs: int, first: int = 0) -> list[float]:
    """The expected share of the study's trials from the `first`-th on (0: all of them; a --resume:
    those not yet ended) that train each epoch 1..epochs: without successive halving all of them;
    with ASHA the shares asha_passes() simulates."""
    n = spec.search["num_samples"]
    rungs = [r for r in asha_rungs(spec) if r < spec.max_epochs]
    if not rungs or first >= n:
        return [1.0] * epochs
    alive = asha_passes(spec)[first:].mean(0)  # after each rung, of the trials from `first` on
    return [float(alive[sum(r < e for r in rungs)]) for e in range(1, epochs + 1)]


ASHA_RUNS = 20_000  # trials simulated in all (runs of the study x its trials): ~0.1 s


def asha_passes(spec, seed: int = 0) -> np.ndarray:
    """asha_alive's share over many runs of the study: [n trials, 1 + rungs]."""
    n = spec.search["num_samples"]
    return asha_alive(spec, np.random.default_rng(seed).random((max(20, ASHA_RUNS // max(1, n)), n))).mean(0)


def asha_alive(spec, quality: np.ndarray) -> np.ndarray:
    """For each run of the study (a row of `quality`) and each trial (in creation order) whether it
    still trains after each rung where ASHA decides: [runs, n trials, 1 + rungs], column 0 all True.
    Each trial has one quality (higher is better) that ranks it the same at each rung, decided as
    study.stopping decides, in creation order (each rung's records kept apart, as Ray's _Bracket
    keeps them): one objective, Ray's cutoff (the (1 - 1/rf) quantile of the trials recorded at the rung,
    linear, a tie goes on); several, MultiObjectiveASHA's rank (among the first ceil(m / rf) of the m
    recorded with it). With few trials that is far from one in rf a rung: the first trial at a rung
    always goes on, the second half the time; with search.in_order (k at once) trial n sees only
    trials 1..n-k, so the first k are never stopped."""
    n = spec.search["num_samples"]
    rungs = [r for r in asha_rungs(spec) if r < spec.max_epochs]
    rf, k = spec.scheduler["reduction_factor"], spec.search["max_concurrent"] if spec.search["in_order"] else 0
    runs = len(quality)
    alive = np.ones((runs, n), bool)
    out = [alive.copy()]
    for _ in rungs:
        recorded = np.full((runs, n), np.inf)  # the quality each trial had when it reached this rung (inf: did not)
        for i in range(n):
            seen = recorded[:, : max(0, i - k + 1) if k else i]  # in_order: trials 1..n-k alone
            q, here = quality[:, i], alive[:, i].copy()
            if seen.shape[1]:
                m = np.sum(seen < np.inf, 1)  # how many were recorded
                if spec.multi:
                    go = np.sum((seen > q[:, None]) & (seen < np.inf), 1) < np.ceil((m + 1) / rf)
                else:  # numpy's linear percentile over the m recorded (sorted first; inf last)
                    ordered = np.sort(seen, 1)
                    at = (1 - 1 / rf) * np.maximum(m - 1, 0)
                    lo = np.floor(at).astype(int)
                    hi = np.minimum(lo + 1, np.maximum(m - 1, 0))
                    a, b = np.take_along_axis(ordered, lo[:, None], 1)[:, 0], np.take_along_axis(ordered, hi[:, None], 1)[:, 0]
                    with np.errstate(invalid="ignore"):
                        cutoff = np.where(hi > lo, a + (b - a) * (at - lo), a)
                    go = (m == 0) | (q >= cutoff)
                alive[:, i] = here & go
            recorded[here, i] = q[here]
        out.append(alive.copy())
    return np.stack(out, 2)


def sample(spec, n: int = SAMPLES, seed: int = 0) -> list[TrainConfig]:
    """n configurations drawn from the space's distributions (uniform, log-uniform where log: true),
    through the define-by-run function the search itself samples with; the tutorial's first with
    search.baseline (as the study enqueues it)."""
    from study.spec import BASELINE, _define

    rng = np.random.default_rng(seed)

    def number(low, high, step=None, log=False, integer=False):
        if log:
            v = math.exp(rng.uniform(math.log(low), math.log(high)))
        else:
            v = rng.uniform(low, high)
        if step:
            v = low + round((v - low) / step) * step
        return int(round(v)) if integer else float(v)

    trial = types.SimpleNamespace(
        suggest_categorical=lambda name, choices: choices[rng.integers(len(choices))],
        suggest_int=lambda name, low, high, step=1, log=False: number(low, high, step, log, True),
        suggest_float=lambda name, low, high, step=None, log=False: number(low, high, step, log))
    out = [spec.config(_define(spec, trial)) for _ in range(n)]
    if spec.search.get("baseline"):
        out[0] = spec.config({k: v for k, v in BASELINE.items() if k in spec.space})
    return out


def predict(spec, res: dict, cpus: float, gpus: float, nodes: int = 1, n_train: int = 60_000,
            n_test: int = 10_000, cpu: dict | None = None, note: str = "", do_retrain: bool = True,
            ended: int = 0) -> dict:
    """The study's predicted seconds per phase, GPU-hours and storage, on a cluster of `cpus` CPUs and
    `gpus` GPUs with study.plan.plan's resources `res`; `cpu`: calibrate()'s fit (needed when trials or
    the retrain run on CPUs). `ended`: trials of an interrupted study that have ended (--resume
    --dry-run): the search is priced for the trials left, the later ones in its order."""
    total = spec.search["num_samples"]
    n = max(0, total - ended)  # the trials still to run
    on_gpu = res["gpu"] > 0
    device = "gpu" if on_gpu else "cpu"
    running = max(1, min(res["max_concurrent"] or 1, n or 1, int(cpus // res["cpu"]) or 1,
                         int(gpus // res["gpu"]) if on_gpu else n))
    share = max(1, math.ceil(running * res["gpu"] / max(gpus, 1) - 1e-9)) if on_gpu else 1
    # CPU trials slow each other once their threads (and others' work) outnumber the cores.
    f = cpu["busy"] if cpu else 1.0
    fixed = fixed_scale(cpu)
    crowd = 1.0 if on_gpu else crowding(running * max(1, int(res["cpu"])), max(cpus, 1), f)
    configs = sample(spec)
    warm = inductor_cache_warm()
    fractions = epoch_fractions(spec, spec.max_epochs, ended)
    trial_s, storage = [], []
    compiling = []
    for cfg in configs:
        e = epoch_s(cfg, device, cpu, n_train, n_test, share, fixed) * crowd
        compiling.append(device == "cpu" and compiles(cfg, n_train))
        trial_s.append(fixed * TRIAL_START_S + e * sum(fractions[: cfg.epochs]))
        storage.append(checkpoint_bytes(cfg.channels, cfg.optimizer))
    mean_trial = float(np.mean(trial_s))
    epochs = n * float(np.mean([sum(fractions[: cfg.epochs]) for cfg in configs]))  # trial-epochs the search trains
    # Workers start `running` at once and share the cores while they import; a worker that compiles
    # does so in its first trial (Ray reuses it for the next ones: reuse_actors), all at once.
    search_s = fixed * (TUNER_S["search"] + WORKER_START_S * (1 if on_gpu else max(1.0, running / max(cpus, 1)))
                        + (COMPILE_S["warm" if warm else "cold"] * crowd if any(compiling) else 0)) \
        + n * mean_trial / running

    seeds = spec.retrain["seeds"] if spec.retrain["epochs"] and do_retrain else []
    # retrain.top_k: that many configurations (at most the study's trials), each with every seed, in one Ray run
    runs = len(seeds) * min(spec.retrain["top_k"], total)
    retrain_s = render_s = 0.0
    retrain_bytes = 0.0
    if seeds:
        rgpu = res["retrain_gpu"]
        slots = int(gpus // rgpu) if rgpu > 0 else int(cpus // res["cpu"]) or 1
        waves = math.ceil(runs / max(1, slots))
        at_once = min(runs, max(1, slots))
        r_crowd = 1.0 if rgpu > 0 else crowding(at_once * max(1, int(res["cpu"])), max(cpus, 1), f)
        r_share = max(1, math.ceil(at_once * rgpu / max(gpus, 1) - 1e-9)) if rgpu > 0 else 1
        r_device = "gpu" if rgpu > 0 else "cpu"
        per_config, sizes = [], []
        for cfg in configs:
            r = TrainConfig.from_dict({**cfg.to_dict(), "epochs": spec.retrain["epochs"], "train_size": 0,
                                       "test_size": 0, "val_size": cfg.val_size if spec.retrain["top_k"] > 1 else 0})
            # (after a search that compiled, inductor's cache holds the kernels)
            compile_s = COMPILE_S["warm" if warm or any(compiling) else "cold"] if r_device == "cpu" and compiles(r, n_train) else 0
            per_config.append(fixed * compile_s
                              + r.epochs * epoch_s(r, r_device, cpu, n_train, n_test, r_share, fixed) * r_crowd)
            sizes.append(checkpoint_bytes(cfg.channels, cfg.optimizer))
        retrain_s = fixed * (TUNER_S["retrain"] + WORKER_START_S + TRIAL_START_S) + waves * float(np.mean(per_config))
        retrain_bytes = runs * float(np.mean(sizes))
        T = float(np.mean([c.T for c in configs]))
        render_s = fixed * spec.render["images"] * T * RENDER_S
    phases = {"startup": fixed * (STARTUP_S + LOAD_S * (n_train + n_test)),
              "ray_start": fixed * RAY_START_S + (cpu.get("calibrate_s", 0) if cpu else 0),
              "search": search_s, "export": fixed * EXPORT_S, "retrain": retrain_s, "spikes": render_s}
    wall = sum(phases.values())
    gpu_s = (share_gpus(running, res["gpu"], gpus) * search_s
             + (min(runs, int(gpus // res["retrain_gpu"]) or 1) * res["retrain_gpu"] * retrain_s
                if seeds and res["retrain_gpu"] > 0 else 0))
    return {
        "wall_s": round(wall, 1),
        "phases_s": {k: round(v, 1) for k, v in phases.items()},
        "gpu_hours": round(gpu_s / 3600, 3),
        "storage_bytes": int(total * float(np.mean(storage)) + retrain_bytes),
        "trials": total, **({"trials_left": n} if ended else {}),
        **({"retrain_runs": f"{runs // len(seeds)} configurations x {len(seeds)} seeds"}
           if seeds and spec.retrain["top_k"] > 1 else {}), "running": running, "trial_s": round(mean_trial, 1),
        "epochs": round(epochs, 1),
        "nodes": nodes, "cpus": cpus, "gpus": gpus, "device": device,
        "speeds": "H200 figures (docs/gpucheck-h200.json) scaled by MACs" if on_gpu
                  else f"this CPU, calibrated with {cpu['threads'] if cpu else '?'} thread(s) a trial, "
                       f"{f:.1f}x as busy as the idle 2-core machine; fixed costs {fixed:.2f}x the reference's "
                       f"(python and torch start in {cpu['start_s'] if cpu else START_REF_S:.1f} s)",
        "cpu_fit": cpu,
        "note": note,
    }


def share_gpus(running: int, gpu: float, gpus: float) -> float:
    """GPUs the search holds while it runs: the shares of the trials at once, at most the cluster's."""
    return min(gpus, math.ceil(running * gpu - 1e-9)) if gpu > 0 else 0.0


def cpu_speeds(spec) -> dict:
    """calibrate() with the threads and batch size a trial of this study gets, start_s() for the
    fixed costs, and the seconds all that took (part of the study's ray_start phase)."""
    from study.spec import values

    t0 = time.perf_counter()
    batch = int(np.median(values(spec, "batch_size")))
    fit = calibrate(max(1, int(spec.resources["cpus_per_trial"])), batch)
    fit["start_s"] = round(start_s(), 3)
    fit["calibrate_s"] = round(time.perf_counter() - t0, 2)
    return fit


def cpu_calibration(spec) -> dict:
    """cpu_speeds() for the tutorial's network, with network_ratios() for the study's other networks
    ("network"), and the seconds both took (calibrate_s)."""
    from study.spec import values

    fit = cpu_speeds(spec)
    t0 = time.perf_counter()
    fit["network"] = network_ratios(spec, max(1, int(spec.resources["cpus_per_trial"])),
                                    int(np.median(values(spec, "batch_size"))))
    fit["calibrate_s"] = round(fit.get("calibrate_s", 0) + time.perf_counter() - t0, 2)
    return fit


def fixed_scale(cpu: dict | None) -> float:
    """How much longer the fixed costs take here than on the reference machine: start_s() against
    START_REF_S, within [0.25, 8]; 1 without a calibration (trials and retrain on GPUs)."""
    if not cpu or not cpu.get("start_s"):
        return 1.0
    return min(8.0, max(0.25, cpu["start_s"] / START_REF_S))


def may_need_cpu(spec) -> bool:
    """Whether trials may run on CPUs: none asks for a GPU, or this machine has none."""
    import torch

    return spec.resources["gpus_per_trial"] == 0 or not torch.cuda.is_available()


def here(spec, n_train: int, n_test: int, plan=resource_plan, allow_cpu: bool = False,
         allow_pending_gpus: bool = False, do_retrain: bool = True, ended: int = 0) -> dict:
    """predict() for this machine as a one-node cluster (--dry-run starts no Ray): its CPUs
    (os.cpu_count) and CUDA GPUs, with study.plan.plan's resources (`plan`, which study.run still
    passes; its PlanError when this machine could not run a trial). A study that asks for GPUs on a
    machine without any is estimated on its CPUs, saying that it would need --allow-cpu."""
    import warnings

    import torch

    cpus, gpus = float(os.cpu_count() or 1), float(torch.cuda.device_count())
    note = ""
    wants_gpu = spec.resources["gpus_per_trial"] == "auto" or spec.resources["gpus_per_trial"] > 0
    if wants_gpu and gpus == 0 and not allow_cpu:
        note, allow_cpu = "(the study would need --allow-cpu: no GPU here)", True
    with warnings.catch_warnings():  # plan's warning that the trials run on CPUs: the note says it
        warnings.simplefilter("ignore")
        res = plan(spec, gpus, cpus, gpus, allow_cpu=allow_cpu, allow_pending_gpus=allow_pending_gpus,
                   node_cpus=cpus)
    cpu = cpu_calibration(spec) if res["gpu"] == 0 or res["retrain_gpu"] == 0 else None
    return predict(spec, res, cpus, gpus, 1, n_train, n_test, cpu, note, do_retrain=do_retrain, ended=ended)


# ------------------------------------------------------------ words

def line(est: dict) -> str:
    """The one line scripts read: `estimate: wall <minutes> min, ...`."""
    gb = est["storage_bytes"] / 1e9
    storage = f"{gb:.1f} GB" if gb >= 1 else f"{est['storage_bytes'] / 1e6:.0f} MB"
    p = est["phases_s"]
    where = (f"on {est['nodes']} node{'s' if est['nodes'] != 1 else ''} with {est['cpus']:g} CPUs and "
             f"{est['gpus']:g} GPU{'s' if est['gpus'] != 1 else ''}")
    return (f"estimate: wall {est['wall_s'] / 60:.1f} min, {est['gpu_hours']:.2f} GPU-hours, storage {storage} "
            f"{where}{' ' + est['note'] if est['note'] else ''} (search {p['search'] / 60:.1f} min: "
            f"{trials_left(est)}, {est['running']} at once, {est['trial_s']:.0f} s each; retrain "
            f"{p['retrain'] / 60:.1f} min{' for ' + est['retrain_runs'] if 'retrain_runs' in est else ''}; "
            f"speeds from {est['speeds']})")


def trials_left(est: dict) -> str:
    """'4 trials', or on a --resume '3 of 4 trials left'."""
    return f"{est['trials_left']} of {est['trials']} trials left" if "trials_left" in est else f"{est['trials']} trials"


def report_lines(location) -> list[str]:
    """study.analyze's report: the prediction made at the study's start (estimate.yaml) against the
    seconds each phase took (timing.yaml), when the study folder holds them."""
    import yaml

    files = {k: location / f"{k}.yaml" for k in ("estimate", "timing")}
    if not all(f.is_file() for f in files.values()):
        return []
    try:
        est, act = (yaml.safe_load(f.read_bytes().decode()) or {} for f in files.values())
        predicted, actual = est["phases_s"], act["phases_s"]
    except (KeyError, TypeError, yaml.YAMLError) as e:
        return [f"Predicted against actual time: {files['estimate']} or {files['timing']} unreadable "
                f"({type(e).__name__}: {e}).", ""]
    rows = ["| phase | predicted s | actual s | actual / predicted |", "|---|---|---|---|"]
    for k in dict.fromkeys([*predicted, *actual]):
        p, a = predicted.get(k), actual.get(k)
        ratio = f"{a / p:.2f}" if p and a is not None else ""
        rows.append(f"| {k.replace('_', ' ')} | {_s(p)} | {_s(a)} | {ratio} |")
    p, a = est.get("wall_s"), act.get("wall_s")
    rows.append(f"| **wall** | {_s(p)} | {_s(a)} | {a / p:.2f} |" if p and a else f"| **wall** | {_s(p)} | {_s(a)} | |")
    head = ("## Predicted against actual time", "",
            f"Predicted at the start ({est.get('speeds', '')}), {est.get('running', '?')} trials at once"
            + (f"; actual: the sum of its {len(act['runs'])} runs (interrupted, resumed or retrained again)"
               if len(act.get("runs") or []) > 1 else "") + ":", "")
    return [*head, *rows, ""]


def _s(v) -> str:
    return "" if v is None else f"{v:.1f}" if v < 10 else f"{v:.0f}"
