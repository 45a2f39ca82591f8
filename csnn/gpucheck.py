"""python -m csnn.gpucheck: what only a GPU can show about the GPU path, in under 5 minutes, on one GPU.

Run first, on a GPU you have for minutes only (about 3 minutes; the checks that decide whether studies can run):

    python -m csnn.gpucheck --quick --out gpucheck-quick.json

then the rest (about 2 minutes: `--rest`), or everything in one go (no option, about 5 minutes). The minutes
are planned for one H100/H200, not yet measured together (docs/gpu-and-clusters.md).

Needs neither Ray nor Optuna (the study check skips without them), nor CuPy (its parts
say "skipped: CuPy not installed", and the CuPy tests are deselected, said in the result; a
CuPy that is installed but broken fails them). Every check records its figures and judges them;
a failed check does not stop the others (the GPU tests and the trainer processes have time limits,
so a hang there fails its check); every warning printed goes into "warnings". The trainers use
cuda_graphs: auto, as studies do: a graph that falls back is recorded (and fails `graphs`), and the
other checks still measure. A line (and versions.older_than_tested) says when torch, Triton,
torchvision, SpikingJelly or CuPy is older than the versions tested (constraints.txt).

--quick (about 3 minutes), in this order:
  tests        the GPU-only tests (tests/test_gpu.py), when run from a checkout, sharing Triton's
               compiled kernels with this process (TRITON_CACHE_DIR): each by name with its outcome;
               fails when one failed or skipped (but for CuPy missing, whose tests are deselected)
  graphs       graphed against eager at the tutorial's size: 50 training steps under deterministic
               cuDNN (every group of tensors within GRAPH_STEPS_BOUND of the eager run's largest
               value), and evaluation of the same weights (accuracy equal to the image, loss within
               EVAL_LOSS_BOUND); then, as studies run (cudnn.benchmark, AMP), capture success, time and
               capture_diff (the check's margin per group) per optimizer and backend; fails when
               cuda_graphs: auto fell back anywhere
  speed        train and eval images/s at the tutorial's setting (T 4, 128 channels, batch 128, AMP),
               backend auto, against SpikingJelly's example as the tutorial runs it (python -m csnn.bench);
               fails when ours is slower or computes another function in float32 (under AMP the
               differences are figures, marked unmeasured)
  study        a two-trial Ray study on this GPU: each trial's run_device, neuron_impl,
               cuda_graphs_used (training) and cuda_graphs_eval_used, status (skipped where Ray or
               Optuna is missing)
--rest (about 2 minutes):
  kernels      the IF kernels the profiler sees in one training step (AMP) and one
               float32 evaluation forward: every layer's, forward and backward, fused
               (SpikingJelly's Triton or CUDA kernels; ours with backend cupy)
  networks     the other networks (NETWORKS: lif, plif, avg pooling, each augmentation) graphed
               against eager, 5 steps each under deterministic cuDNN, and the LIF and PLIF
               kernels the profiler sees in a training step: all fused, by name; within
               NETWORKS_LIMIT_S (never run on a GPU yet: planned, not measured)
  cupy         our CuPy kernels against SpikingJelly's reference loop, float32
               and float16, one input per step and one repeated: the same spikes,
               gradients within tolerance
  speed_cupy   speed's figures with backend cupy
  counts       cost counts of the same weights on the CPU and on CUDA
  busy         the share of each training step's wall time the GPU was busy
               (kernel time in a profile of 20 steps) and kernels per step, CUDA graphs
               off and on: fails outside (0, 1] or with fewer kernels seen graphed than eager
  epoch        fit at that setting on the real data: two epochs (epoch 0 against 1), a
               second fit in the same process, one without graphs; peak memory of each;
               test accuracy (fails under 0.80) and graphs used in training and evaluation
  concurrency  1, 4 and 8 such trainers at once on the GPU (plain processes, started
               once), and 1 and 4 of them without graphs: total images/s, to set
               trials_per_gpu from a measurement
  deterministic  one trainer with -deterministic: 30 batches trained twice from one seed
               (must be equal), then its images/s against the single trainer above

Prints one JSON object with every figure (also written to --out) and exits 1
if any check failed or a check that ran lacks a figure (FIGURES), 2 when there
is no CUDA device.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import re
import select
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

from csnn.config import AUGMENTS as AUGMENT_NAMES
from csnn.config import TUTORIAL as CONFIG

ROOT = Path(__file__).resolve().parents[1]
TUTORIAL = {**{k: v for k, v in CONFIG.items() if k != "epochs"}, "amp": True}
FUSED = ("spikingjelly-triton", "spikingjelly-cuda")


class CheckFailed(AssertionError):
    """A failed check that keeps what it measured: its figures go into the JSON beside the error."""

    def __init__(self, message: str, figures: dict):
        super().__init__(message)
        self.figures = figures


def require(ok, message: str, figures: dict) -> None:
    if not ok:
        raise CheckFailed(message, figures)


def versions() -> dict:
    """The GPU, its driver and every library version the GPU path depends on."""
    from importlib.metadata import PackageNotFoundError, version

    from csnn.gpus import nvidia_driver, older_than_tested

    def of(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    out = {"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
           "capability": ".".join(map(str, torch.cuda.get_device_capability(0))), "driver": nvidia_driver(),
           "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
           "triton": of("triton"), "spikingjelly": of("spikingjelly"), "python": sys.version.split()[0],
           "cupy": None, "nvrtc": None, "older_than_tested": older_than_tested()}
    try:
        import cupy
        from cupy_backends.cuda.libs import nvrtc

        out["cupy"] = cupy.__version__
        out["nvrtc"] = ".".join(map(str, nvrtc.getVersion()))
    except Exception as e:  # noqa: BLE001 - not installed, or installed without its NVRTC: say which
        out["cupy"] = out["cupy"] or (None if isinstance(e, ImportError) else f"broken: {e}")
        out["nvrtc"] = None if isinstance(e, ImportError) else f"not found: {type(e).__name__}: {e}"
    return out


CUPY_MISSING = "CuPy not installed"  # gpucheck's own CuPy checks skip with it; tests/test_gpu.py's are deselected


def cupy_missing() -> bool:
    import importlib.util

    return importlib.util.find_spec("cupy") is None


TESTS_LIMIT_S = 240  # the GPU tests took about a minute when planned: a hang fails the check, not the whole run


def check_tests(data_dir=None, tests: Path = ROOT / "tests" / "test_gpu.py") -> dict:
    """Each GPU test by name with its outcome. Fails when any failed, none passed, or one skipped for
    another reason than CUPY_MISSING (the GPU path was then not checked). Without CuPy the cupy backend's
    tests (marker cupy), which fail there, are deselected and the result says so."""
    if not tests.exists():
        return {"skipped": f"{tests} not found (run from a checkout)"}
    # the tests' real data: --data-dir's; Triton's kernels: this process's (shared_environment)
    env = {**os.environ, **({"CSNN_DATA": str(data_dir)} if data_dir else {})}
    deselect = ["-m", "not cupy"] if cupy_missing() else []
    with tempfile.TemporaryDirectory(prefix="gpucheck-tests-") as work:
        report = Path(work) / "junit.xml"  # each test's name, outcome and skip reason
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={report}",
                            *deselect, str(tests)], cwd=ROOT, capture_output=True, text=True, env=env,
                           timeout=TESTS_LIMIT_S)
        outcomes = test_outcomes(report.read_text()) if report.exists() else {}
    last = (p.stdout.strip().splitlines() or [""])[-1]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|deselected)", last)}
    out = {"result": last, **counts, "outcomes": outcomes}
    if deselect:
        out["cupy_tests"] = f"deselected: {CUPY_MISSING} (pip install -e '.[cupy]' to run them)"
        print(f"gpucheck: the cupy backend's GPU tests {out['cupy_tests']}", file=sys.stderr, flush=True)
    require(p.returncode == 0, f"GPU tests failed: {last}\n{p.stdout[-3000:]}{p.stderr[-2000:]}", out)
    # pytest exits 0 when every test skipped: here a skip means the GPU path was not checked, but for CuPy's
    other = {t: o for t, o in outcomes.items() if o.startswith("SKIPPED") and o != f"SKIPPED ({CUPY_MISSING})"}
    require(counts.get("passed", 0) > 0 and not other and (not counts.get("skipped") or outcomes),
            f"GPU tests did not all run: {last}; skipped: {other or 'unknown'}\n{p.stdout[-2000:]}", out)
    return out


def test_outcomes(junit_xml: str) -> dict:
    """{test name: PASSED, FAILED, ERROR or "SKIPPED (reason)"} from pytest's JUnit XML report."""
    import xml.etree.ElementTree as ET

    out = {}
    for case in ET.fromstring(junit_xml).iter("testcase"):
        kinds = {child.tag: child for child in case}
        if "skipped" in kinds:
            out[case.get("name")] = f"SKIPPED ({kinds['skipped'].get('message', '')})"
        else:
            out[case.get("name")] = "FAILED" if "failure" in kinds else "ERROR" if "error" in kinds else "PASSED"
    return out


def kernels_of(backend: str, network: dict | None = None, modes=("train_amp", "eval_fp32")) -> dict:
    """observe_if_kernels of a training step under AMP and of a float32 evaluation forward (`modes`), of the
    tutorial's network or, with `network`, of another (TrainConfig's network keys: a LIF or PLIF network)."""
    from spikingjelly.activation_based import functional

    from csnn.config import NETWORK_FIELDS, TrainConfig
    from csnn.model import CSNN, observe_if_kernels, set_backend

    net = CSNN.from_config(TrainConfig(T=4, channels=128, **{k: v for k, v in (network or {}).items()
                                                             if k in NETWORK_FIELDS})).cuda()
    set_backend(net, backend)
    x = torch.rand(128, 1, 28, 28, device="cuda")

    def train():
        with torch.autocast("cuda", dtype=torch.float16):
            net(x).float().sum().backward()
        functional.reset_net(net)

    def evaluate():
        with torch.no_grad():
            net.eval()(x)
        functional.reset_net(net)

    layers = len(net.spiking_layers)
    fns = {"train_amp": train, "eval_fp32": evaluate}
    return {mode: observe_if_kernels(fns[mode], layers) for mode in modes}


def kernel_problems(label: str, modes: dict, want=FUSED) -> list[str]:
    """What is wrong with kernels_of's observations `modes`: a mode in which the profiler saw no GPU kernel,
    a direction in which fewer than the 4 spiking layers ran one of the fused kernels `want` (recognised by
    name: csnn.model.neuron_kernel), or anything else among the implementations; [] when all ran fused."""
    problems = []
    for mode, seen in modes.items():
        if not seen["kernels"]:
            problems.append(f"{label} {mode}: the profiler saw no GPU kernel at all: {seen}")
            continue
        for d in ("forward", "backward") if mode == "train_amp" else ("forward",):
            fused = sum(n for impl, n in seen[d].items() if impl in want)
            if fused != 4 or seen["implementations"] != [impl for impl in want if impl in seen[d]]:
                problems.append(f"{label} {mode}: {fused} of 4 spiking layers ran a fused {d} kernel "
                                f"({', '.join(want)}); seen: {seen['implementations']}")
    return problems


def check_kernels() -> dict:
    out = {"auto": kernels_of("auto"), "cupy": {"skipped": CUPY_MISSING} if cupy_missing() else kernels_of("cupy")}
    for backend, modes in out.items():
        if "skipped" not in modes:
            problems = kernel_problems(backend, modes, FUSED if backend == "auto" else ("cupy",))
            require(not problems, "; ".join(problems), out)
    return out


# The networks other than the tutorial's that run graphed and fused on a GPU too (issue 34): the other neuron
# models (SpikingJelly's fused LIF and PLIF kernels, PLIF's w in the graph's state), average pooling and each
# augmentation (its random integers drawn outside the graph, its transforms inside), each over the tutorial's.
NETWORKS = {"lif": {"neuron": "lif"}, "plif": {"neuron": "plif"}, "avg": {"pooling": "avg"},
            **{a: {"augment": a} for a in AUGMENT_NAMES}}
NETWORK_STEPS = 5  # graphed against eager training steps each, at the tutorial's size
NETWORKS_LIMIT_S = 60.0  # networks not started by then are listed as not reached, and the check fails


def check_networks(data_dir, device: str = "cuda", steps: int = NETWORK_STEPS, size: dict | None = None) -> dict:
    """For each of NETWORKS: `steps` training steps graphed against eager under deterministic cuDNN (every
    group within GRAPH_STEPS_BOUND of its largest value, the graph used: graphed_against_eager), and for a
    neuron model its fused kernels by name in the profiler trace of one AMP training step (kernel_problems).
    Within NETWORKS_LIMIT_S. `device` "cpu" runs the same code eagerly on both sides: what a CPU can check
    of it (tests/test_gpu_path.py, at a smaller `size`: T, channels); network_problems then names what only a
    GPU shows."""
    from csnn.train import group_differences

    out: dict = {"steps": steps, "bound": GRAPH_STEPS_BOUND, "limit_s": NETWORKS_LIMIT_S}
    t0, problems = time.perf_counter(), []
    for name, keys in NETWORKS.items():
        if time.perf_counter() - t0 > NETWORKS_LIMIT_S:
            out.setdefault("not_reached", []).append(name)
            continue
        graphed, eager, _, status = graphed_against_eager(data_dir, steps, {**keys, **(size or {})}, device)
        fig = {"network": keys, "relative_diff": group_differences(graphed, eager),
               "graph_used": bool(status.get("used", {}).get("training step")), "fallback": status.get("fallback", [])}
        if "neuron" in keys and device == "cuda":
            fig["kernels"] = kernels_of("auto", keys, ("train_amp",))
        out[name] = fig
        problems += network_problems(name, fig)
    if out.get("not_reached"):
        problems.append(f"not reached within {NETWORKS_LIMIT_S:g} s: {', '.join(out['not_reached'])}")
    out["problems"] = problems
    require(not problems, "; ".join(problems), out)
    return out


def network_problems(name: str, fig: dict) -> list[str]:
    """What is wrong with one network's figures in check_networks: a graph not used (fell back), a group of
    tensors past GRAPH_STEPS_BOUND, a neuron model's kernels not all fused or not observed."""
    problems = [] if fig["graph_used"] else [f"{name}: the training step was not graphed ({fig['fallback']})"]
    over = {k: v for k, v in fig["relative_diff"].items() if v > GRAPH_STEPS_BOUND}
    if over:
        problems.append(f"{name}: graphed steps differ from the eager ones by more than {GRAPH_STEPS_BOUND:g} of "
                        f"each tensor's largest value: {over}")
    if "neuron" in fig["network"]:
        problems += kernel_problems(name, fig["kernels"]) if "kernels" in fig else [f"{name}: kernels not observed"]
    return problems


def check_cupy() -> dict:
    from spikingjelly._ops.if_.reference import multi_step
    from spikingjelly.activation_based import surrogate

    from csnn import cupy_if
    from csnn.model import ALPHA

    if cupy_missing():
        return {"skipped": CUPY_MISSING}
    missing = cupy_if.available()
    assert missing is None, f"backend cupy cannot run: {missing}"
    out = {}
    gen = torch.Generator(device="cuda").manual_seed(0)
    for dtype, rtol, atol in ((torch.float32, 1e-5, 1e-6), (torch.float16, 1e-2, 1e-3)):
        for repeated in (False, True):  # one input per step; one input repeated (the first layer's)
            x = (torch.randn(1 if repeated else 4, 1 << 16, generator=gen, device="cuda") * 0.8 + 0.4).to(dtype)
            g = torch.randn(4, 1 << 16, generator=gen, device="cuda").to(dtype)
            xr = x.clone().requires_grad_()
            sr, _, _ = multi_step(xr.expand(4, -1), torch.zeros(x.shape[1:], device="cuda"), 1.0, 0.0,
                                  surrogate.ATan(alpha=ALPHA), False)
            sr.backward(g.to(sr.dtype))
            xc = x.clone().requires_grad_()
            sc, _ = cupy_if.CupyIF.apply(xc, 4, ALPHA)
            sc.backward(g)
            spikes_equal = torch.equal(sc.float(), sr.float())
            grad_err = (xc.grad.float() - xr.grad.float()).abs()
            bound = atol * (4 if repeated else 1) + rtol * xr.grad.float().abs()
            key = str(dtype).removeprefix("torch.") + ("_repeated" if repeated else "")
            out[key] = {"spikes_equal": spikes_equal, "spike_rate": round(sr.float().mean().item(), 4),
                        "grad_max_abs_err": grad_err.max().item(), "grad_within_tolerance": bool((grad_err <= bound).all()),
                        "rtol": rtol, "atol": atol}
            require(spikes_equal and (grad_err <= bound).all(), f"cupy {key}: {out[key]}", out)
    return out


def check_counts() -> dict:
    from csnn import data as fmnist
    from csnn import efficiency
    from csnn.model import CSNN

    torch.manual_seed(0)
    net = CSNN(4, 128)
    x = fmnist.to_input(torch.randint(0, 256, (128, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)))
    cpu = efficiency.count(net, x)
    t0 = time.perf_counter()
    cuda = efficiency.count(net.cuda(), x.cuda())
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    rel = {k: abs(cuda[k] - cpu[k]) / max(abs(cpu[k]), 1e-12) for k in cpu}
    out = {"cpu": cpu, "cuda": cuda, "relative_difference": rel, "cuda_count_s_per_epoch": round(seconds, 3)}
    require(cuda["macs_per_image"] == cpu["macs_per_image"] and max(rel.values()) <= 1e-3,
            "the CPU and CUDA counts differ", out)
    return out


def check_busy(data_dir, steps: int = 20) -> dict:
    """The GPU's busy share of a training step: the kernels' summed time in a profile of
    `steps` steps (after warm-up and capture), over the steps' wall time; graphs off and on.
    Fails when the share is outside (0, 1], or when the profiler sees fewer kernels in a graphed
    step than in an eager one (it would be missing kernels inside graph replays, and the share
    would read low)."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for graphs in (False, "auto"):
        status: dict = {}
        train_epoch, gen, _ = trainer(data_dir, steps * TUTORIAL["batch_size"], graphs, status=status)
        train_epoch(gen)[0].item()  # warm-up (and capture)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            train_epoch(gen)[0].item()
            wall = time.perf_counter() - t0
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy_us = sum(e.time_range.elapsed_us() for e in kernels)
        out["graphs" if graphs else "eager"] = {"busy_share": round(busy_us / 1e6 / wall, 3),
                                                "kernels_per_step": round(len(kernels) / steps, 1),
                                                "ms_per_step": round(wall * 1e3 / steps, 3),
                                                **({"cuda_graphs_fallback": status["fallback"]}
                                                   if status.get("fallback") else {})}
    for mode, r in out.items():
        require(0 < r["busy_share"] <= 1, f"{mode}: busy share {r['busy_share']} is outside (0, 1]", out)
    require(out["graphs"]["kernels_per_step"] >= out["eager"]["kernels_per_step"],
            f"the profiler saw {out['graphs']['kernels_per_step']} kernels in a graphed step, fewer than the "
            f"{out['eager']['kernels_per_step']} of an eager one: it misses kernels inside graph replays", out)
    return out


def check_speed(data_dir, backend: str) -> dict:
    """python -m csnn.bench's figures for `backend` at the tutorial's setting (speed: auto; speed_cupy: cupy)."""
    from csnn import bench

    if backend == "cupy" and cupy_missing():
        return {"skipped": CUPY_MISSING}
    out, different = {}, []
    try:
        out[backend] = bench.run(device="cuda", T=4, channels=128, batch_size=128, backend=backend, amp=True,
                                 train_images=12800, eval_images=10000, reps=2, data_dir=data_dir, workers=4,
                                 time_anyway=True)
    except bench.EquivalenceError as e:  # timed all the same: keep the figures, and fail
        out[backend], different = e.result, [f"backend {backend}: {e}"]
    r = out[backend]
    slower = {f"{backend} {k}": r[f"{k}_ratio"] for k in ("train", "eval") if r[f"{k}_ratio"] < 1}
    require(not different, "; ".join(different), out)
    require(not slower, f"ours is slower than SpikingJelly's example (ratios {slower})", out)
    return out


MIN_EPOCH_ACC = 0.80  # one epoch at the tutorial's setting reached 0.864 on an H200


def check_epoch(data_dir) -> dict:
    """Two epochs of fit at the tutorial's setting (epoch 0, with warm-up, capture and compiles, against
    epoch 1), then a second fit in the same process (graphs captured again, the profiler's first
    observation reused), then one without CUDA graphs: peak GPU memory of each."""
    from csnn.config import TrainConfig
    from csnn.train import fit

    data = load_data(data_dir)
    keys = ("train_img_s", "epoch_s", "test_acc", "train_acc", "energy_uj", "neuron_impl", "cuda_graphs_used",
            "cuda_graphs_eval_used", "cuda_graphs_fallback", "capture_diff")
    out = {}
    for name, epochs, graphs in (("first_fit", 2, "auto"), ("second_fit", 1, "auto"), ("no_graphs", 1, False)):
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # stdout is for the JSON object
            history = fit(TrainConfig(**TUTORIAL, epochs=epochs, device="cuda", cuda_graphs=graphs), data)
        out[name] = {"epochs": [{k: m[k] for k in keys if k in m} for m in history],
                     "wall_s": round(time.perf_counter() - t0, 1),
                     "peak_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)}
    first = out["first_fit"]["epochs"]
    out.update(train_img_s=first[0]["train_img_s"], test_acc=first[0]["test_acc"],
               epoch0_over_epoch1_s=round(first[0]["epoch_s"] / first[1]["epoch_s"], 3),
               cuda_graphs_used=all(e["cuda_graphs_used"] and e["cuda_graphs_eval_used"]
                                    for f in ("first_fit", "second_fit") for e in out[f]["epochs"]))
    require(first[0]["test_acc"] >= MIN_EPOCH_ACC,
            f"one epoch reached test accuracy {first[0]['test_acc']}, under {MIN_EPOCH_ACC}", out)
    require(out["cuda_graphs_used"], "fit fell back from CUDA graphs at the tutorial's setting: " + "; ".join(
        {e["cuda_graphs_fallback"] for f in ("first_fit", "second_fit") for e in out[f]["epochs"]} - {""}), out)
    return out


@functools.cache
def load_data(data_dir):
    """Fashion-MNIST, read once per process (the checks build many trainers)."""
    from csnn import data as fmnist

    return fmnist.load(data_dir)


def trainer(data_dir, images: int, graphs: bool | str = "auto", seed: int = 0, optimizer: str = "sgd",
            backend: str = "auto", status: dict | None = None, parts: dict | None = None, network: dict | None = None,
            device: str = "cuda"):
    """(train_epoch, order_gen, net) of csnn.train.make_trainer at the tutorial's setting, as fit makes it,
    with cuda_graphs: auto (a graph that fails falls back, in `status`, and the caller still measures);
    `parts` (a dict) receives the net, optimizer and scaler; `network`: TrainConfig's network keys, augment
    and loss over the tutorial's (NETWORKS); `device` "cpu" (no AMP, no graphs) runs the same code on a CPU."""
    from csnn import data as fmnist
    from csnn.config import TrainConfig, augment_names
    from csnn.model import CSNN, set_backend
    from csnn.train import make_optimizer, make_trainer

    lr = {} if optimizer == "sgd" else {"lr": 1e-3}
    cuda = device == "cuda"
    cfg = TrainConfig(**{**TUTORIAL, "optimizer": optimizer, **lr, **(network or {})}, device=device, backend=backend)
    x, y = (t.to(device) for t in fmnist.split(load_data(data_dir), train_size=images)["train"])
    torch.manual_seed(seed)
    net = CSNN.from_config(cfg).to(device)
    set_backend(net, backend)
    torch.backends.cudnn.benchmark = not torch.are_deterministic_algorithms_enabled()
    opt, scaler = make_optimizer(cfg, net.parameters()), torch.amp.GradScaler("cuda", enabled=cuda)
    if parts is not None:
        parts.update(net=net, optimizer=opt, scaler=scaler)
    train_epoch = make_trainer(net, opt, scaler, x, y, cfg.batch_size, torch.float16 if cuda else None,
                               graphs if cuda else False, status=status, augment=augment_names(cfg.augment),
                               loss=cfg.loss)
    return train_epoch, torch.Generator().manual_seed(seed), net


def graphed_against_eager(data_dir, steps: int, network: dict | None = None, device: str = "cuda") -> tuple:
    """`steps` training steps from one seed under deterministic cuDNN, eager and (on CUDA) as a CUDA graph
    (cuda_graphs: auto): (the graphed run's state, the eager run's, the graphed net, its status). The states:
    csnn.train.graph_state's tensors (weights, BatchNorm statistics, optimizer state, scale, sums)."""
    from csnn.train import graph_state, set_deterministic

    runs = {}
    set_deterministic(True)
    try:
        for graphs in (False, "auto"):
            parts, status = {}, {}
            train_epoch, gen, net = trainer(data_dir, steps * TUTORIAL["batch_size"], graphs, status=status,
                                            parts=parts, network=network, device=device)
            loss, correct, _ = train_epoch(gen)
            state = graph_state(net, parts["optimizer"], parts["scaler"], {"loss_sum": loss, "correct": correct})()
            runs[graphs] = ({k: v.clone() for k, v in state.items()}, net, status)
    finally:
        set_deterministic(False)
    return runs["auto"][0], runs[False][0], runs["auto"][1], runs["auto"][2]


GRAPH_STEPS = 50  # graphed against eager training, at the tutorial's size
# Under deterministic cuDNN a replay runs the same kernels on the same inputs as the eager step: the two runs
# should be equal. The bound, relative to each tensor's largest value, leaves room for float32 reordering only.
GRAPH_STEPS_BOUND = 1e-5
# The evaluation of the same weights, graphed and eager (float32, cuDNN's deterministic forward): the same
# spikes, so the accuracy equal to the image (a count), and the loss and firing rates within float32 summation.
EVAL_LOSS_BOUND = 1e-5  # relative


def max_differences(a: dict, b: dict) -> dict:
    """{group: max |a - b|} over tensors named group.* (csnn.train.tensor_group), absolute."""
    from csnn.train import tensor_group

    out: dict = {}
    for k in a:
        d = (a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0.0
        out[tensor_group(k)] = max(out.get(tensor_group(k), 0.0), d)
    return out


def check_graphs(data_dir) -> dict:
    """Graphed against eager at the tutorial's setting: GRAPH_STEPS training steps from one seed under
    deterministic cuDNN (every group within GRAPH_STEPS_BOUND of its largest value: weights, BatchNorm
    statistics, optimizer state, scale, sums), then evaluation of the same 10,000 test images (accuracy
    equal to the image, loss within EVAL_LOSS_BOUND); then, as studies run (cudnn.benchmark, AMP), for each
    optimizer and backend, whether training and evaluation captured (cuda_graphs: auto, so a capture that
    fails or replays something else falls back, and says why), how long capture and check took, and the
    check's margin per group (capture_diff, bounded by csnn.train.GRAPH_TOLERANCE).
    Fails when any fell back (the fallback must not trigger at the tutorial's setting) or a bound is passed."""
    from csnn import data as fmnist
    from csnn.train import evaluate, group_differences

    out: dict = {"steps": GRAPH_STEPS, "bounds": {"train_relative": GRAPH_STEPS_BOUND, "eval_loss_relative":
                                                  EVAL_LOSS_BOUND, "eval_acc": "equal"}}
    graphed, eager_state, net, train_status = graphed_against_eager(data_dir, GRAPH_STEPS)
    runs = {"auto": (graphed, net, train_status), False: (eager_state,)}
    out["train_relative_diff"] = group_differences(runs["auto"][0], runs[False][0])
    out["train_max_abs_diff"] = max_differences(runs["auto"][0], runs[False][0])
    out["train_status"] = runs["auto"][2]
    test_x, test_y = (t.cuda() for t in fmnist.split(load_data(data_dir))["test"])
    eval_status: dict = {}
    torch.backends.cudnn.benchmark = True  # as fit runs (not deterministic)
    graphed = evaluate(net, test_x, test_y, TUTORIAL["batch_size"], {"mode": "auto", "status": eval_status})
    eager = evaluate(net, test_x, test_y, TUTORIAL["batch_size"])
    out["eval_diff"] = {k: abs(graphed[k] - eager[k]) for k in eager}
    out["eval_images_differing"] = round(out["eval_diff"]["acc"] * len(test_y))
    out["eval_status"] = eval_status
    fell_back = [f"training: {runs['auto'][2].get('fallback')}"] \
        if not runs["auto"][2].get("used", {}).get("training step") else []
    fell_back += [f"evaluation: {eval_status.get('fallback')}"] if not eval_status.get("used", {}).get("evaluation") else []

    captures = {}
    for backend in ("auto", "cupy"):
        for optimizer in ("sgd", "adam", "adamw"):
            name = f"{optimizer}_{backend}"
            if backend == "cupy" and cupy_missing():
                captures[name] = {"skipped": CUPY_MISSING}
                continue
            status = {}
            train_epoch, gen, net = trainer(data_dir, 8 * TUTORIAL["batch_size"], "auto", optimizer=optimizer,
                                            backend=backend, status=status)
            train_epoch(gen)[0].item()
            evaluate(net, test_x[:4 * TUTORIAL["batch_size"]], test_y[:4 * TUTORIAL["batch_size"]],
                     TUTORIAL["batch_size"], {"mode": "auto", "status": status})
            used = status.get("used", {})
            captures[name] = {"used": bool(used.get("training step")) and bool(used.get("evaluation"))
                              and not status.get("fallback"), "fallback": status.get("fallback", []),
                              "capture_diff": status.get("capture_diff", {}),
                              "capture_s": {k: round(v, 3) for k, v in status.get("capture_s", {}).items()}}
            if not captures[name]["used"]:
                fell_back.append(f"{name}: {status.get('fallback')}")
    out["captures"] = captures
    require(not fell_back, "CUDA graphs fell back at the tutorial's setting: " + "; ".join(map(str, fell_back)), out)
    over = {k: v for k, v in out["train_relative_diff"].items() if v > GRAPH_STEPS_BOUND}
    require(not over, f"{GRAPH_STEPS} graphed steps under deterministic cuDNN differ from the eager ones by more "
                      f"than {GRAPH_STEPS_BOUND:g} of each tensor's largest value: {over}", out)
    require(out["eval_images_differing"] == 0, f"the graphed evaluation of the same weights classified "
                                               f"{out['eval_images_differing']} image(s) otherwise than the eager one", out)
    loss_rel = out["eval_diff"]["loss"] / max(abs(eager["loss"]), 1e-12)
    out["eval_loss_relative_diff"] = loss_rel
    require(loss_rel <= EVAL_LOSS_BOUND and all(v <= EVAL_LOSS_BOUND for k, v in out["eval_diff"].items()
                                                if k.startswith("fr_")),
            f"the graphed evaluation's loss or firing rates differ from the eager one's by more than "
            f"{EVAL_LOSS_BOUND:g} (loss: {loss_rel:.3g} relative)", out)
    return out


def check_study(data_dir) -> dict:
    """A two-trial Ray study (python -m study.run, one epoch of 5,000 images each, half a GPU a trial):
    where each trial ran, its IF kernels, whether CUDA graphs replayed, its status. Skipped where
    Ray or Optuna is not installed (gpucheck itself needs neither)."""
    import importlib.util

    import yaml

    missing = [m for m in ("ray", "optuna") if importlib.util.find_spec(m) is None]
    if missing:
        return {"skipped": f"{' and '.join(missing)} not installed"}
    with tempfile.TemporaryDirectory(prefix="gpucheck-study-") as work:
        space = Path(work) / "gpucheck.yaml"
        space.write_text(yaml.safe_dump({
            "name": "gpucheck", "objective": {"metric": "val_acc", "mode": "max"},
            "train": {"epochs": 1, "train_size": 5000, "val_size": 1000, "test_size": 1000, "T": 4, "channels": 128},
            "space": {"lr": {"type": "float", "low": 0.05, "high": 0.2, "log": True}},
            "search": {"sampler": "tpe", "seed": 0, "num_samples": 2, "max_concurrent": 2},
            "scheduler": {"type": "none"}, "resources": {"gpus_per_trial": 0.5, "cpus_per_trial": 1},
            "retrain": {"seeds": []}}, sort_keys=False))
        cmd = [sys.executable, "-m", "study.run", str(space), "--storage", str(Path(work) / "results")]
        cmd += ["--data-dir", str(data_dir)] if data_dir else []
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=STUDY_LIMIT_S,
                           env={**os.environ, "RAY_ADDRESS": ""})
        out = {"returncode": p.returncode, "stderr_tail": p.stderr[-1500:]}
        trials = Path(work) / "results" / "gpucheck" / "trials.csv"
        if trials.is_file():
            import csv

            cols = ("trial_id", "status", "run_device", "neuron_impl", "cuda_graphs_used", "cuda_graphs_eval_used",
                    "cuda_graphs_fallback", "capture_diff", "gpu_ids", "train_img_s", "val_acc")
            out["trials"] = [{k: r.get(k) for k in cols} for r in csv.DictReader(trials.open())]
    require(p.returncode == 0 and len(out.get("trials", [])) == 2, f"the study failed: {p.stderr[-800:]}", out)
    require(all(t["run_device"].startswith("cuda") and t["cuda_graphs_used"] == "True" == t["cuda_graphs_eval_used"]
                for t in out["trials"]), "a trial did not train and evaluate on the GPU with CUDA graphs", out)
    return out


STUDY_LIMIT_S = 240


def worker(data_dir) -> None:
    """One trainer at the tutorial's setting, warm, graphed (cuda_graphs: auto) and eager, waiting on stdin:
    each line `go SECONDS [eager]` trains epochs of 2,560 images for that long and prints its images/s.
    Its first line: `ready` and, as JSON, what its graphs did (a fallback is recorded, not fatal)."""
    status: dict = {}
    trainers = {"graphs": trainer(data_dir, 2560, "auto", status=status), "eager": trainer(data_dir, 2560, False)}
    for train_epoch, gen, _ in trainers.values():
        train_epoch(gen)[0].item()
    print("ready " + json.dumps({"cuda_graphs_fallback": status.get("fallback", [])}), flush=True)
    for line in sys.stdin:
        _, seconds, *mode = line.split()
        train_epoch, gen, _ = trainers["eager" if mode == ["eager"] else "graphs"]
        images, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < float(seconds):
            loss, _, n = train_epoch(gen)
            loss.item()  # an epoch's one sync
            images += n
        print(json.dumps({"img_s": images / (time.perf_counter() - t0), "images": images}), flush=True)


WORKER_LIMIT_S = 150  # for a trainer to start (imports, data, Triton, capture) or to answer: a hang fails the check


def start_workers(n: int, data_dir) -> tuple[list, list]:
    """n warm workers, and the graph fallbacks they reported (none, normally)."""
    cmd = [sys.executable, "-m", "csnn.gpucheck", "--worker"]
    cmd += ["--data-dir", str(data_dir)] if data_dir else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    procs, fallbacks = [], []
    try:
        for _ in range(n):
            procs.append(spawn(cmd, env))
        for p in procs:
            line = read_line(p, WORKER_LIMIT_S).strip()
            if not line.startswith("ready"):
                raise AssertionError(f"a trainer did not start: {stderr_of(p)}")
            fallbacks += json.loads(line.removeprefix("ready").strip() or "{}").get("cuda_graphs_fallback", [])
    except BaseException:
        stop_workers(procs)
        raise
    return procs, fallbacks


def spawn(cmd: list, env: dict) -> subprocess.Popen:
    """A worker with pipes for its stdin and stdout; its stderr goes to a file (a pipe nobody reads
    can fill and stop it), kept as p.stderr for stderr_of."""
    err = tempfile.TemporaryFile("w+")
    p = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    p.stderr = err
    return p


def read_line(p: subprocess.Popen, limit: float) -> str:
    """The next line a worker prints, waiting at most `limit` seconds (one line per request: none is buffered)."""
    if not select.select([p.stdout], [], [], limit)[0]:
        raise TimeoutError(f"a trainer printed nothing in {limit:.0f} s: {stderr_of(p)}")
    return p.stdout.readline()


def stderr_of(p: subprocess.Popen) -> str:
    p.stderr.seek(0)
    return p.stderr.read()[-1500:]


def stop_workers(procs) -> None:
    for p in procs:
        p.kill()
        p.wait()
        for f in (p.stdin, p.stdout, p.stderr):
            f.close()


def timed_together(procs, seconds: float, eager: bool = False) -> dict:
    """The trainers `procs`, warm, train for `seconds` at the same time (graphed, or `eager`)."""
    for p in procs:
        p.stdin.write(f"go {seconds}{' eager' if eager else ''}\n")
        p.stdin.flush()
    lines = [read_line(p, seconds + WORKER_LIMIT_S) for p in procs]
    dead = [stderr_of(p) for p, line in zip(procs, lines) if not line]
    assert not dead, f"a trainer ended: {dead[0]}"
    rates = [json.loads(line)["img_s"] for line in lines]
    assert all(r > 0 for r in rates), f"a trainer trained nothing in its {seconds} s window: {rates}"
    return {"total_img_s": round(sum(rates), 1), "per_trainer_img_s": [round(r, 1) for r in rates]}


CONCURRENCY = (1, 4, 8)  # trainers at once: enough to see where the total stops growing


def check_concurrency(data_dir, seconds: float) -> dict:
    """Total images/s of 1, 4 and 8 trainers at once, graphed, and of 1 and 4 eager (the same processes,
    started and captured once; the idle ones wait on stdin). Fails when a total is not positive or 8 trainers
    together do less than one alone (the GPU shared so badly that trials_per_gpu > 1 would only lose)."""
    procs, fallbacks = start_workers(max(CONCURRENCY), data_dir)
    try:
        out = {str(n): timed_together(procs[:n], seconds) for n in CONCURRENCY}
        out["eager"] = {str(n): timed_together(procs[:n], seconds, eager=True) for n in (1, 4)}
    finally:
        stop_workers(procs)
    if fallbacks:
        out["cuda_graphs_fallback"] = sorted(set(fallbacks))
    best = max(out[str(n)]["total_img_s"] for n in CONCURRENCY)
    # the fewest trials per GPU that reach 90% of the best total: more only slow each trial down
    out["suggested_trials_per_gpu"] = min(n for n in CONCURRENCY if out[str(n)]["total_img_s"] >= 0.9 * best)
    require(out[str(max(CONCURRENCY))]["total_img_s"] >= out["1"]["total_img_s"],
            f"{max(CONCURRENCY)} trainers at once did {out[str(max(CONCURRENCY))]['total_img_s']} images/s in "
            f"total, less than one alone ({out['1']['total_img_s']})", out)
    return out


def repeat(data_dir, seconds: float) -> None:
    """Deterministic: train 30 batches twice from the same seed, then time the trainer for `seconds`; print
    whether the weights came out equal, and its images/s (one process: cuBLAS reads its setting at start)."""
    from csnn.train import set_deterministic

    set_deterministic(True)
    weights = []
    for _ in range(2):
        train_epoch, gen, net = trainer(data_dir, 30 * TUTORIAL["batch_size"])
        train_epoch(gen)[0].item()
        weights.append(torch.cat([p.detach().flatten() for p in net.parameters()]))
    images, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        loss, _, n = train_epoch(gen)
        loss.item()
        images += n
    print(json.dumps({"equal": torch.equal(*weights), "max_abs_diff": (weights[0] - weights[1]).abs().max().item(),
                      "img_s": images / (time.perf_counter() - t0)}))


def check_deterministic(data_dir, seconds: float, plain: float | None) -> dict:
    cmd = [sys.executable, "-m", "csnn.gpucheck", "--repeat", "--seconds", str(seconds)]
    cmd += ["--data-dir", str(data_dir)] if data_dir else []
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=WORKER_LIMIT_S + seconds)
    assert p.returncode == 0, p.stderr[-1500:]
    rep = json.loads(p.stdout.strip().splitlines()[-1])
    det = round(rep.pop("img_s"), 1)
    out = {"deterministic_img_s": det, "plain_img_s": plain, "slowdown": round(plain / det, 3) if plain and det else None,
           "repeat_deterministic": rep}
    require(out["repeat_deterministic"]["equal"], "-deterministic training did not repeat exactly", out)
    return out


QUICK = ("tests", "graphs", "speed", "study")  # whether studies can run on this GPU: first, about 3 minutes
REST = ("kernels", "networks", "cupy", "speed_cupy", "counts", "busy", "epoch", "concurrency",
        "deterministic")  # about 2
CHECKS = QUICK + REST  # main's order
MINUTES = {"quick": 3, "rest": 2, "all": 5}  # planned on one H100/H200 (not yet measured together)
# The figures each check must leave (dotted paths into its result); a check that ran without
# one fails, so that a JSON never looks complete when it is not.
FIGURES = {"kernels": ["auto.train_amp.implementations"], "cupy": ["float16.spikes_equal"],
           "networks": [f"{n}.relative_diff" for n in NETWORKS],
           "counts": ["cuda.synops_per_image"], "busy": ["eager.busy_share", "graphs.busy_share"],
           "speed": ["auto.ours_train_img_s", "auto.train_ratio", "auto.ours_eval_img_s", "auto.eval_ratio"],
           "speed_cupy": ["cupy.ours_train_img_s", "cupy.train_ratio"],
           "graphs": ["train_relative_diff.params", "train_relative_diff.sums", "eval_diff.acc",
                      "captures.sgd_auto.used", "captures.sgd_auto.capture_diff"],
           "epoch": ["train_img_s", "test_acc", "epoch0_over_epoch1_s", "second_fit.peak_memory_mib",
                     "no_graphs.peak_memory_mib"],
           "study": ["trials"],
           "concurrency": [f"{n}.total_img_s" for n in CONCURRENCY] + ["suggested_trials_per_gpu",
                                                                      "eager.1.total_img_s", "eager.4.total_img_s"],
           "deterministic": ["deterministic_img_s", "repeat_deterministic.equal"]}


def missing_figures(name: str, result: dict) -> list[str]:
    if "skipped" in result:  # what it needs is not installed (CUPY_MISSING; Ray): said so, no figures owed
        return []
    missing = []
    for path in FIGURES.get(name, []):
        node = result
        for key in path.split("."):
            node = node.get(key) if isinstance(node, dict) else None
        if node is None:
            missing.append(path)
    return missing


class _Tee(io.TextIOBase):
    """stderr, passed through, its lines that say "warning" (csnn's own, CUDA graph fallbacks) kept."""

    def __init__(self, stream, keep):
        self.stream, self.keep = stream, keep

    def write(self, text):
        self.keep += [line for line in text.splitlines() if "warning" in line.lower()]
        return self.stream.write(text)

    def flush(self):
        self.stream.flush()


@contextlib.contextmanager
def recorded_warnings(into: list, check: str):
    """Python warnings and stderr warning lines of a check, as "check: text" in `into` (and still shown)."""
    lines: list = []
    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(_Tee(sys.stderr, lines)):
            warnings.simplefilter("default")  # each once per place, as Python shows them
            yield
    finally:
        for w in caught:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
            lines.append(f"{w.category.__name__}: {w.message}")
        into.extend(f"{check}: {line}" for line in dict.fromkeys(lines))


def run_check(result: dict, name: str, fn, *a, out=None) -> None:
    """result[name] = fn(*a), or its error (and name in result["failed"]); a result that lacks one of
    its FIGURES fails too. --out is written before (naming the running check: a run killed at its
    time limit says where it was) and after."""
    def write():
        if out:
            Path(out).write_text(json.dumps(result, indent=1, default=str))

    t0 = time.perf_counter()
    print(f"gpucheck: {name} ...", file=sys.stderr, flush=True)
    result["running"] = name
    write()
    try:
        with recorded_warnings(result.setdefault("warnings", []), name):
            result[name] = fn(*a)
        missing = missing_figures(name, result[name])
        assert not missing, f"{name} left no {', '.join(missing)}"
    except Exception as e:  # noqa: BLE001 - every check reports, the run goes on
        result[name] = {**getattr(e, "figures", {}), "error": f"{type(e).__name__}: {e}",
                        "traceback": traceback.format_exc()[-2500:]}
        result["failed"].append(name)
    del result["running"]
    result[name]["check_s"] = round(time.perf_counter() - t0, 1)
    print(f"gpucheck: {name} {'FAILED' if name in result['failed'] else 'ok'} "
          f"({result[name]['check_s']} s)", file=sys.stderr, flush=True)
    write()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m csnn.gpucheck", description=__doc__.split("\n")[0],
        epilog=f"Run first: python -m csnn.gpucheck --quick --out gpucheck-quick.json (about {MINUTES['quick']} "
               f"minutes: {', '.join(QUICK)}); then --rest (about {MINUTES['rest']} minutes: {', '.join(REST)}); "
               f"no option runs both (about {MINUTES['all']} minutes). Minutes planned for one H100/H200.")
    phase = ap.add_mutually_exclusive_group()
    phase.add_argument("--quick", action="store_true",
                       help=f"only the checks that decide whether studies can run ({', '.join(QUICK)}): about "
                            f"{MINUTES['quick']} minutes; run this first")
    phase.add_argument("--rest", action="store_true",
                       help=f"only the other checks ({', '.join(REST)}): about {MINUTES['rest']} minutes")
    ap.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (else $CSNN_DATA, Debian's package)")
    ap.add_argument("--out", default=None, help="also write the JSON object to this file (after every check)")
    ap.add_argument("--seconds", type=float, default=5.0, help="timed window of each concurrency run")
    ap.add_argument("--skip", default="", help="comma-separated checks to skip (listed as skipped in the JSON)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--deterministic", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--repeat", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    if skip - set(CHECKS):
        ap.error(f"--skip {args.skip}: no check {', '.join(sorted(skip - set(CHECKS)))}; checks: {', '.join(CHECKS)}")
    # one absolute path: the GPU tests and the trainer processes run in the checkout
    args.data_dir = Path(args.data_dir).resolve() if args.data_dir else None
    if not torch.cuda.is_available():
        print("error: no CUDA device: python -m csnn.gpucheck needs a CUDA GPU, and torch.cuda.is_available() "
              f"is False here (torch {torch.__version__}, CUDA build {torch.version.cuda})", file=sys.stderr)
        return 2
    shared_environment()
    if args.worker:
        worker(args.data_dir)
        return 0
    if args.repeat:
        repeat(args.data_dir, args.seconds)
        return 0

    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    run = QUICK if args.quick else REST if args.rest else CHECKS
    result: dict = {"versions": versions(), "phase": "quick" if args.quick else "rest" if args.rest else "all",
                    "failed": [], "skipped": sorted(skip | (set(CHECKS) - set(run)))}
    from csnn.gpus import older_line

    if older_line(result["versions"]["older_than_tested"]):
        print(older_line(result["versions"]["older_than_tested"]), file=sys.stderr, flush=True)

    def check(name, fn, *a):
        if name in run and name not in skip:
            run_check(result, name, fn, *a, out=args.out)

    t0 = time.perf_counter()
    check("tests", check_tests, args.data_dir)
    check("graphs", check_graphs, args.data_dir)
    check("speed", check_speed, args.data_dir, "auto")
    check("study", check_study, args.data_dir)
    check("kernels", check_kernels)
    check("networks", check_networks, args.data_dir)
    check("cupy", check_cupy)
    check("speed_cupy", check_speed, args.data_dir, "cupy")
    check("counts", check_counts)
    check("busy", check_busy, args.data_dir)
    check("epoch", check_epoch, args.data_dir)
    check("concurrency", check_concurrency, args.data_dir, args.seconds)
    plain = result.get("concurrency", {}).get("1", {}).get("total_img_s")
    check("deterministic", check_deterministic, args.data_dir, args.seconds, plain)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=1, default=str))
    return 1 if result["failed"] else 0


def shared_environment() -> None:
    """What this process and every process it starts (the GPU tests, the trainers) share: Triton's compiled
    kernels in one folder (tests/conftest.py gives each test an empty HOME, where Triton's cache would otherwise
    be: every kernel compiled again), and cuBLAS's workspace setting, read once at its start, that deterministic
    runs need (the graphs check's 50 steps run deterministic in this process)."""
    os.environ.setdefault("TRITON_CACHE_DIR", str(Path.home() / ".triton" / "cache"))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


if __name__ == "__main__":
    from csnn.argtypes import interruptible, leave

    leave(interruptible(main, "csnn.gpucheck", "the checks that ended are in --out's file, if given"))
