"""The one training loop, and its checkpoints.

Everything that trains (the tutorial's command line in csnn.cli, the Ray
trainable, the study's retrain and reproduce) calls `fit(config, data, ...)`.
`python -m csnn.train` still runs that command line: csnn/train/__main__.py.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

if sys.argv[:1] == ["-m"]:  # python -m csnn.train imports this package (torch: seconds) before its __main__
    from csnn.argtypes import quiet_start

    quiet_start("csnn.train")
import torch  # noqa: E402
import torch.nn.functional as F
from spikingjelly.activation_based import functional

from csnn import data as fmnist
from csnn import efficiency
from csnn.atomic import write_atomic
from csnn import config
from csnn.config import COMPILE_AUTO_IMAGES, TrainConfig
from csnn.data import to_input
from csnn.model import CSNN, observe_if_kernels_once, set_backend

COST_IMAGES = 128  # the first validation (else test) images, counted each epoch (~8 ms an image on 2 cores)

# TrainConfig.loss: the loss of the output firing rate fr [N, 10] (float32, in [0, 1]) against the labels y,
# as (the training step's mean, each image's for evaluate). mse is the tutorial's, written as it wrote it.
# ce is cross-entropy on CE_SCALE x the rate. On the bare rate the logits span only 0..1: even a perfect
# output (1 for the label, 0 elsewhere) gets probability e / (e + 9) = 0.23, a loss >= 1.46 whose gradient
# never fades. With 5 a perfect output reaches e^5 / (e^5 + 9) = 0.94 (loss 0.06). The scale also multiplies
# the gradient, so it is bounded by the learning rates searched with mse: measured at the tutorial's SGD
# lr 0.1 (T 4, 16 channels, 6,000 training images, 2 epochs, seed 0; val_acc on 2,000): mse 0.69, ce with
# scale 5 0.76, 10 0.66, 20 0.10 (the network fell silent).
CE_SCALE = 5.0
LOSSES = {
    "mse": (lambda fr, y: F.mse_loss(fr, F.one_hot(y, 10).float()),
            lambda fr, y: (fr - F.one_hot(y, 10).float()).square().sum(1) / 10),
    "ce": (lambda fr, y: F.cross_entropy(fr * CE_SCALE, y),
           lambda fr, y: F.cross_entropy(fr * CE_SCALE, y, reduction="none")),
}
assert tuple(LOSSES) == config.LOSSES, "csnn.config.LOSSES names these rows"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r}: no CUDA GPU is available on this machine; use -device cpu")
        if (device.index or 0) >= torch.cuda.device_count():
            raise RuntimeError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    """cfg's optimizer. On CUDA the fused one (one kernel for all parameters), which also
    lets GradScaler unscale and skip an inf step on the device: with the others its step()
    reads found_inf with .item(), a host sync per batch."""
    params = list(params)
    fused = {"fused": True} if params and all(p.is_cuda for p in params) else {}
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **fused)
        if fused and cfg.momentum:
            # Fused SGD makes its momentum buffers with empty_like in its first step and fills them in the
            # kernel, which returns early on an inf step: a skipped first step would leave them garbage (NaN
            # under -deterministic). Zeros give the same first update (momentum * 0 + g = g).
            for p in params:
                opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
        return opt
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)


WARMUP_STEPS = 3  # eager calls before capture: Triton compiles, cuDNN autotunes, the optimizer makes its state
GRAPHS_ENV = "CSNN_CUDA_GRAPHS"  # 0 (false, off, no): no CUDA graphs in this process, whatever the config says
# A replayed graph is checked once against the eager step on the same batch, per tensor:
# max |replayed - eager| <= rtol * max |eager| (the tensor's largest value) + atol, by what the tensor holds.
# Not yet measured on a GPU: each capture records the margin it saw (capture_diff in the run info).
GRAPH_TOLERANCE = {  # group: (rtol, atol)
    # Computed by the forward pass alone (BatchNorm's running statistics, the metric sums) or from it (the
    # scaler: its scale changes only on an inf gradient): the same kernels on the same inputs, deterministic
    # in cuDNN's forward algorithms too, so equal but for the odd spike that a float32 reordering flips at the
    # threshold. A replay that reads other images moves these by 1e-2 and more (its loss, its counts).
    "bn_stats": (1e-4, 1e-6), "sums": (1e-4, 1e-6), "scaler": (1e-4, 0.0),
    # Computed from the backward pass: with cudnn.benchmark cuDNN may pick weight-gradient algorithms that sum
    # with atomics, in another order at each run, and under AMP those gradients are float16, where a reordered
    # sum moves an element by a unit or a few (5e-4 to 1e-3 of it; more where a sum nearly cancels, but those
    # elements are far below the tensor's largest). 1e-2 of the largest element is ten times that; a step on
    # other images moves the moments (SGD's momentum, Adam's first moment) by 1e-1 to 1 of their largest.
    "params": (1e-2, 1e-6), "optimizer": (1e-2, 1e-6),
}


def tensor_group(name: str) -> str:
    """The GRAPH_TOLERANCE group of a graph_state name (net.*, optimizer.*, scaler.*, anything else: sums)."""
    if name.startswith("net."):
        return "bn_stats" if "running_" in name or "num_batches" in name else "params"
    return name.split(".")[0] if name.startswith(("optimizer.", "scaler.")) else "sums"


def relative_differences(replayed: dict, eager: dict) -> dict:
    """{tensor name: max |replayed - eager| / max |eager|} (0 where both are 0; the absolute difference where
    only eager is 0): the figure GRAPH_TOLERANCE bounds, and gpucheck's."""
    out = {}
    for k, b in eager.items():
        a = replayed[k]
        if not b.numel():
            out[k] = 0.0
            continue
        a, b = a.double(), b.double()
        # NaN where both are NaN (a diverged step, replayed as such) is no difference; NaN on one side is
        d = math.inf if (a.isnan() != b.isnan()).any() else (a - b).nan_to_num(0.0).abs().max().item()
        scale = b.abs().nan_to_num(0.0).max().item()
        out[k] = d / scale if scale > 0 else d
    return out


def group_differences(replayed: dict, eager: dict) -> dict:
    """{group: the largest relative difference over its tensors} (capture_diff; gpucheck's comparisons)."""
    out: dict = {}
    for k, d in relative_differences(replayed, eager).items():
        g = tensor_group(k)
        out[g] = max(out.get(g, 0.0), d)
    return out


def _graph_differs(replayed: dict, eager: dict) -> str | None:
    """Why the replayed state is not the eager one (the tensor furthest past its GRAPH_TOLERANCE), or None."""
    if replayed.keys() != eager.keys():
        return f"the replay changed other tensors ({', '.join(sorted(replayed.keys() ^ eager.keys()))})"
    for k, a in replayed.items():
        b = eager[k]
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"{k}: replayed {a.dtype} {tuple(a.shape)}, eager {b.dtype} {tuple(b.shape)}"
    worst, over = None, 1.0
    for k, d in relative_differences(replayed, eager).items():
        rtol, atol = GRAPH_TOLERANCE[tensor_group(k)]
        scale = eager[k].double().abs().nan_to_num(0.0).max().item() if eager[k].numel() else 0.0
        allowed = rtol + atol / scale if scale > 0 else atol
        if d > allowed and (worst is None or d / max(allowed, 1e-30) > over):
            worst, over = (k, d, rtol, atol), d / max(allowed, 1e-30)
    if worst is None:
        return None
    k, d, rtol, atol = worst
    return (f"replayed step differs from the eager one in {k} (max |difference| {d:.3g} of its largest value; "
            f"allowed {rtol:g} of it + {atol:g})")


class _TorchGraphs:
    """What capture_cuda_graph asks of torch: a graph, a memory pool of its own, and the two allocator calls
    that torch.cuda.use_mem_pool makes on leaving (torch/cuda/memory.py, in torch 2.11 as in 2.14;
    tests/test_dependencies.py checks them). Tests hand capture_cuda_graph another (a CPU model of the allocator)."""

    CUDAGraph = staticmethod(lambda: torch.cuda.CUDAGraph())
    pool = staticmethod(lambda: torch.cuda.graph_pool_handle())
    graph = staticmethod(lambda g, pool: torch.cuda.graph(g, pool=pool, stream=torch.cuda.current_stream(),
                                                           capture_error_mode="thread_local"))
    end_allocate = staticmethod(lambda device, pool: torch._C._cuda_endAllocateToPool(device, pool))
    release_pool = staticmethod(lambda device, pool: torch._C._cuda_releasePool(device, pool))
    device = staticmethod(lambda: torch.cuda.current_device())


# Set when a failed capture could not be cleaned up: the caching allocator may still believe a capture is under
# way, and every later capture (each begins with empty_cache) would fail on it; this process captures no more.
_graphs_broken: list[str] = []


def capture_cuda_graph(fn: Callable, static: tuple, api=_TorchGraphs) -> Callable:
    """Capture fn(*static) as a CUDA graph (recorded, not run) into a memory pool of its own; returns what
    replays it. The one function that captures: tests hand cuda_graph another, or this one with `api` a model
    of torch's allocator (the check and the fallback around it run the same on the CPU).

    A capture that raises is cleaned up here: torch's capture_end raises, after an invalidated capture, before
    it ends the allocation into the graph's pool, and the caching allocator then believes a capture is under
    way for good (every later empty_cache, and its free-and-retry on out of memory, fails an internal assert).
    So: end the allocation into the pool if it is still under way, and release the pool unless the graph,
    which releases it when dropped, ended its capture."""
    g, pool, device = api.CUDAGraph(), api.pool(), api.device()
    try:
        with api.graph(g, pool):
            fn(*static)
    except BaseException as e:
        try:
            _end_failed_capture(api, g, device, pool)
        except Exception as cleanup:  # noqa: BLE001 - say why, and capture no more in this process
            _graphs_broken.append(f"a failed capture's memory pool could not be released ("
                                  f"{type(cleanup).__name__}: {_first_line(cleanup)}) after {_reason(e)}")
        raise
    return g.replay


def _end_failed_capture(api, g, device: int, pool) -> None:
    try:
        api.end_allocate(device, pool)
    except RuntimeError:  # "not currently recording to mempool_id": capture_end ended it
        try:
            g.pool()  # raises unless the capture ended: then the graph releases the pool when it is dropped
            return
        except RuntimeError:
            pass
    api.release_pool(device, pool)


def cuda_graph(fn: Callable, *static: torch.Tensor, warmup: int = WARMUP_STEPS, mode: bool | str = True,
               state: Callable[[], dict] | None = None, status: dict | None = None, what: str = "training step",
               capture: Callable | None = None, undo: Callable[[], None] | None = None) -> Callable:
    """`run(*inputs)`: copies `inputs` into the `static` tensors, then calls `fn(*static)`:
    eagerly (on a side stream on CUDA) for the first `warmup` calls, then captures it once
    as a CUDA graph and from then on replays it. Every call does the work exactly once.
    `fn` must keep all its state in tensors (a Python value it reads is frozen at capture).

    At capture the graph is checked: `state()` ({name: tensor}, what fn changes) is saved,
    fn runs eagerly, the saved state is copied back in place (the captured addresses stay
    valid), the graph replays the same batch, and the two results must agree (GRAPH_TOLERANCE;
    the largest relative difference per group goes to status["capture_diff"][what]). With `mode`
    "auto" a capture error, out of memory in the capture or its check, or a disagreement prints
    one warning line, appends the reason to status["fallback"], and fn runs eagerly from then on
    (the eager step's result kept); with `mode` True it raises. `undo()`, after a capture that
    raised, puts back what the cut-short step left in Python objects before the batch runs eagerly.
    status["used"][what]: a checked graph replays; status["capture_s"][what]: how long capture and check took."""
    device = static[0].device
    side = torch.cuda.Stream(device) if device.type == "cuda" else None
    status = {} if status is None else status
    replay, calls, eager = None, 0, False

    def on_side(f):
        if side is None:
            return f()
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            out = f()
        torch.cuda.current_stream(device).wait_stream(side)
        return out

    def run(*inputs):
        nonlocal replay, calls, eager
        if eager:
            return fn(*inputs)
        for dst, src in zip(static, inputs):
            dst.copy_(src)
        if replay is not None:
            return replay()
        calls += 1
        if calls <= warmup:
            return on_side(lambda: fn(*static))
        t0 = time.perf_counter()
        if _graphs_broken:  # an earlier capture in this process left the allocator unusable for capture
            replay, why = None, f"off in this process: {_graphs_broken[0]}"
            on_side(lambda: fn(*static))
        else:
            replay, why = on_side(lambda: _capture_checked(fn, static, state or (lambda: {}),
                                                           capture or capture_cuda_graph, mode, status, what, undo))
        status.setdefault("capture_s", {})[what] = time.perf_counter() - t0  # capture and check (gpucheck's figure)
        if why is None:
            status.setdefault("used", {})[what] = True
            return
        if mode is True:
            raise RuntimeError(f"CUDA graphs: {what}: {why}; train without CUDA graphs: -no-cuda-graphs "
                               f"(python -m csnn.train), cuda_graphs: false or auto (TrainConfig; a study's train: "
                               f"section), or {GRAPHS_ENV}=0 in the environment")
        eager = True
        status.setdefault("fallback", []).append(f"{what}: {why}")
        print(f"csnn: warning: CUDA graphs off for the {what}, which runs eagerly: {why}", file=sys.stderr, flush=True)

    return run


def _capture_checked(fn: Callable, static: tuple, state: Callable[[], dict], capture: Callable, mode,
                     status: dict, what: str, undo: Callable[[], None] | None):
    """(replay, None) for a graph that replays what fn computes eagerly; else (None, why). Either
    way this batch's work is done once (by the replay, or by fn when the graph is not used).
    Out of memory in the capture or its check raises with `mode` True; else the graph is dropped,
    its pool freed, and the batch runs eagerly from the state it started from."""
    before, oom = None, None
    try:
        try:
            replay = capture(fn, static)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure to capture means: run eagerly
            if undo is not None:
                undo()
            fn(*static)  # capture recorded without running: this batch is still to do
            return None, f"capturing failed ({_reason(e)})"
        # state() is detached (state_dict's tensors): copy_ writes in place without autograd
        tensors = state()
        before = {k: t.clone() for k, t in tensors.items()}
        fn(*static)
        tensors = state()  # the same tensors, unless fn made new ones (a difference below)
        eager = {k: t.clone() for k, t in tensors.items()}
        for k, t in tensors.items():
            if k in before:
                t.copy_(before[k])
        try:
            replay()
            replayed = state()
            if replayed.keys() == eager.keys():
                diff = group_differences(replayed, eager)
                status.setdefault("capture_diff", {})[what] = {k: float(f"{v:.3g}") for k, v in sorted(diff.items())}
            why = _graph_differs(replayed, eager)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001
            why = f"replaying failed ({_reason(e)})"
    except torch.OutOfMemoryError as e:
        if mode is True:
            raise
        oom = _reason(e)  # (leaving this block drops the exception, whose traceback holds the graph)
    if oom is not None:
        # the graph, and with it its pool, goes with the last reference to it; empty_cache hands the pool back
        replay = eager = tensors = None
        if static[0].is_cuda:
            torch.cuda.empty_cache()
        if before is not None:  # out of memory in the check: start the batch again from where it began
            for k, t in state().items():
                if k in before:
                    t.copy_(before[k])
        before = None
        if undo is not None:
            undo()
        fn(*static)  # eager training that does not fit either raises here, as it would without graphs
        return None, f"out of memory in the capture or its check, which needs about twice a step's memory ({oom})"
    if why is not None:  # keep the eager step's result
        for k, t in state().items():
            if k in eager:
                t.copy_(eager[k])
        return None, why
    return replay, None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def _reason(e: BaseException) -> str:
    """What an exception says, and first the one it was raised while handling (__context__, as torch's
    capture_end raises after the capture's own error: that error is the cause)."""
    this = f"{type(e).__name__}: {_first_line(e)}"
    cause = e.__cause__ or e.__context__
    if cause is None or cause is e:
        return this
    return f"{type(cause).__name__}: {_first_line(cause)}; then {this}"


def graph_state(*modules_and_tensors) -> Callable[[], dict]:
    """state() for cuda_graph: every tensor a step may change, by name: the networks' parameters and
    buffers (BatchNorm statistics), each optimizer's state, a GradScaler's scale and growth tracker,
    and named tensors (the metric sums), read when called (an optimizer makes its state in its first step)."""
    def state() -> dict:
        out = {}
        for obj in modules_and_tensors:
            if isinstance(obj, torch.nn.Module):
                out.update({f"net.{k}": v for k, v in obj.state_dict().items()})
            elif isinstance(obj, torch.optim.Optimizer):
                out.update({f"optimizer.{i}.{k}": v for i, s in enumerate(obj.state.values())
                            for k, v in s.items() if torch.is_tensor(v)})
            elif isinstance(obj, torch.amp.GradScaler):
                out.update({f"scaler.{k}": getattr(obj, f"_{k}") for k in ("scale", "growth_tracker")
                            if getattr(obj, f"_{k}", None) is not None})
            else:
                out.update(obj)
        return out
    return state


@contextlib.contextmanager
def _lr_from(optimizer: torch.optim.Optimizer, lr: torch.Tensor):
    """Within, the optimizer reads its lr from the tensor `lr` (which the training loop fills with
    the scheduler's value before each epoch: a captured step replays what it read) and, while a
    graph is being captured, says it is capturable (Adam refuses capture otherwise; an eager step
    said capturable makes torch warn, and the fused kernels ignore the flag); outside, its groups
    stay as they are (floats, as in a checkpoint). Every CUDA step runs within, eager ones too: the
    fused kernels read a tensor lr in float32 and a float one in float64, and graphed and eager
    steps must compute alike."""
    saved = [{k: g[k] for k in ("lr", "capturable") if k in g} for g in optimizer.param_groups]
    capturing = lr.is_cuda and torch.cuda.is_current_stream_capturing()
    for g in optimizer.param_groups:
        g["lr"] = lr
        if "capturable" in g:
            g["capturable"] = capturing
    try:
        yield
    finally:
        for g, old in zip(optimizer.param_groups, saved):
            g.update(old)


def evaluate(net: CSNN, x: torch.Tensor, y: torch.Tensor, batch_size: int, graphs: dict | None = None,
             loss: str = "mse") -> dict:
    """Loss, accuracy and per-layer firing rates over a whole split (one host sync).
    Always in float32, as the tutorial measured its 0.9263, even inside an autocast
    region: AMP is for training. On CUDA a last partial batch is padded to `batch_size`
    (images weighted 0), so that no kernel is compiled again for its size (Triton's IF
    kernels take the neuron count as a constant). With `graphs` (a dict kept across
    calls, on CUDA; its "mode" and "status" as cuda_graph's) every batch replays one
    CUDA graph, checked against the eager evaluation of the first. `loss`: a LOSSES name."""
    net.eval()
    image_loss = LOSSES[loss][1]
    n, device = len(y), x.device
    if graphs is not None and "sums" in graphs:
        sums = graphs["sums"].zero_()
    else:  # loss, correct, then the firing rate of each spiking layer, summed over images
        sums = torch.zeros(2 + len(net.spiking_layers), device=device)

    def step(xb, yb, w):  # w: each image's weight, 1 (0 for padding)
        functional.reset_net(net)  # also first: a step cut short (a failed capture) leaves no potential behind
        rates: list = []
        fr = net(to_input(xb), rates)
        losses = image_loss(fr, yb)
        sums.add_(torch.cat([(losses @ w).view(1), ((fr.argmax(1) == yb).float() @ w).view(1), torch.stack(rates) @ w]))
        functional.reset_net(net)

    pad = device.type == "cuda"
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        for i in range(0, n, batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            w = torch.ones(len(yb), device=device)
            if pad and len(yb) < batch_size:
                short = batch_size - len(yb)
                xb, yb = torch.cat([xb, xb.new_zeros((short, *xb.shape[1:]))]), torch.cat([yb, yb.new_zeros(short)])
                w = torch.cat([w, w.new_zeros(short)])
            if graphs is None or len(yb) < batch_size:
                step(xb, yb, w)
                continue
            if "run" not in graphs:
                graphs.update(sums=sums, run=cuda_graph(
                    step, torch.empty_like(xb), torch.empty_like(yb), torch.empty_like(w), warmup=2,
                    mode=graphs.get("mode", True), state=graph_state({"sums": sums}, net),
                    status=graphs.setdefault("status", {}), what="evaluation", capture=graphs.get("capture")))
            graphs["run"](xb, yb, w)
    total = sums.tolist()
    out = {"loss": total[0] / max(n, 1), "acc": total[1] / max(n, 1)}
    out.update({f"fr_{i}": r / max(n, 1) for i, r in zip(net.spiking_layers, total[2:])})
    return out


def make_trainer(net: CSNN, optimizer, scaler, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                 amp_dtype=None, graphs: bool | str = False, observe: dict | None = None,
                 status: dict | None = None, capture: Callable | None = None, augment: tuple[str, ...] = (),
                 loss: str = "mse") -> Callable:
    """`train_epoch(order_gen)`: one pass over (x, y) in the order drawn from order_gen,
    dropping the last partial batch as the tutorial. Returns (loss sum, correct) as
    tensors on the device and the number of images: nothing in it waits for the GPU.
    `train_epoch.predicted` (on the device) counts the epoch's images per predicted class.
    With `graphs` (True: strict, or "auto"; CUDA), the whole step (forward, loss, scaled
    backward, optimizer step, scaler update, metric sums) is one CUDA graph after
    WARMUP_STEPS eager steps, captured and checked (cuda_graph; `status` and `capture`
    are its) in the first epoch of this trainer (so after any checkpoint was restored into it).
    `observe` (a dict, CUDA) receives observe_if_kernels of the first step (once per process
    and kind of step: model.observe_if_kernels_once).
    `augment` (config.augment_names) transforms each training batch in the step, with random integers
    drawn after the epoch's order from order_gen (data.augment_params), an input of the graph as the
    indices are; `loss` is a LOSSES name."""
    device = x.device
    loss_sum, correct = torch.zeros((), device=device), torch.zeros((), device=device)
    predicted = torch.zeros(10, device=device)  # images per predicted class (a dead network's: all in one)
    lr = torch.zeros((), device=device)  # what a CUDA optimizer step reads (_lr_from)
    lr_tensor = functools.partial(_lr_from, optimizer, lr) if device.type == "cuda" else contextlib.nullcontext

    batch_loss = LOSSES[loss][0]

    def step(idx, aug=None):
        functional.reset_net(net)  # also first: a step cut short (a failed capture) leaves no potential behind
        label = y[idx]
        xb = x[idx] if aug is None else fmnist.augment(x[idx], aug, augment)
        # cache_enabled=False: autocast's cache of float16 weights would be frozen into a graph
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None, cache_enabled=False):
            fr = net(to_input(xb))
            loss = batch_loss(fr.float(), label)
        # Captured with no .grad, backward writes fresh gradients at every replay: no zeroing between them.
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        with lr_tensor():
            scaler.step(optimizer)
        scaler.update()
        functional.reset_net(net)  # the one place membrane potentials are cleared
        loss_sum.add_(loss.detach() * len(idx))
        correct.add_((fr.argmax(1) == label).sum())
        # one_hot, not bincount: on CUDA bincount reads its maximum on the host (a sync) and cannot be captured
        predicted.add_(F.one_hot(fr.argmax(1), 10).sum(0))

    def first_observed(*batch):
        if "kernels" in observe:
            return step(*batch)
        key = (str(device), str(amp_dtype), tuple(net.conv_fc[i].kernel for i in net.spiking_layers))
        observe.update(observe_if_kernels_once(key, lambda: step(*batch), len(net.spiking_layers)))

    fn = first_observed if observe is not None else step
    if graphs:
        state = graph_state(net, optimizer, scaler, {"loss_sum": loss_sum, "correct": correct, "predicted": predicted})
        size = min(batch_size, len(y))
        static = [torch.zeros(size, dtype=torch.long, device=device)]
        if augment:
            static.append(fmnist.augment_params(augment, size, torch.Generator()).to(device))
        run = cuda_graph(fn, *static, mode=graphs, state=state, status=status, what="training step", capture=capture,
                         undo=functools.partial(_scaler_between_steps, scaler))
    else:
        run = fn

    def train_epoch(order_gen: torch.Generator):
        net.train()
        loss_sum.zero_(), correct.zero_(), predicted.zero_()
        lr.fill_(optimizer.param_groups[0]["lr"])
        order = fmnist.batch_order(len(y), batch_size, order_gen, device)
        batches = zip(order)
        if augment:  # drawn after the order, so that with augment "none" order_gen draws what it always did
            batches = zip(order, fmnist.augment_params(augment, order.numel(), order_gen, device).view(*order.shape, -1))
        for batch in batches:
            run(*batch)
        return loss_sum, correct, order.numel()

    train_epoch.predicted = predicted
    return train_epoch


def _scaler_between_steps(scaler: torch.amp.GradScaler) -> None:
    """Forget a step() whose update() never came: a capture that failed past scaler.step() leaves it recorded
    (GradScaler's per-optimizer state), and the eager step that retries the batch would be refused
    ("step() has already been called since the last update()"). update() would clear it too, but would read
    found_inf tensors that the failed capture recorded and never computed."""
    states = getattr(scaler, "_per_optimizer_states", None)  # only an enabled scaler has it
    if states is not None:
        states.clear()  # a defaultdict: the next step starts afresh, as after update()


def use_cuda_graphs(cfg: TrainConfig, device: torch.device) -> tuple[bool | str, str]:
    """(mode, why off): mode True (strict: a graph that fails raises), "auto" (a graph that fails
    falls back to eager steps) or False; why off names what turned graphs off on CUDA (GRAPHS_ENV)."""
    if cfg.cuda_graphs is True and device.type != "cuda":
        raise RuntimeError(f"cuda_graphs: true needs a CUDA device, and this run trains on {device}; "
                           "use cuda_graphs: auto (graphs on CUDA only)")
    if device.type != "cuda" or cfg.cuda_graphs is False:
        return False, ""
    if os.environ.get(GRAPHS_ENV, "").strip().lower() in ("0", "false", "off", "no"):
        return False, f"{GRAPHS_ENV}={os.environ[GRAPHS_ENV]} in the environment"
    return cfg.cuda_graphs, ""


def graphs_info(mode: bool | str, status: dict) -> dict:
    """config.RUN_INFO's cuda_graphs_*: whether the training step (cuda_graphs_used) and the evaluation
    (cuda_graphs_eval_used) each replay a checked graph; else why not (on CUDA); the
    largest relative difference per group of tensors that each capture's check saw (capture_diff, JSON)."""
    import json

    used, fell = status.get("used", {}), status.get("fallback", [])
    replays = lambda what: bool(mode) and bool(used.get(what)) and not any(f.startswith(what) for f in fell)  # noqa: E731
    return {"cuda_graphs_used": replays("training step"), "cuda_graphs_eval_used": replays("evaluation"),
            "cuda_graphs_fallback": "; ".join(status.get("fallback", [])),
            "capture_diff": json.dumps(status["capture_diff"], sort_keys=True) if status.get("capture_diff") else ""}


def fit(cfg: TrainConfig, data: fmnist.FashionMNIST, out_dir: str | Path | None = None,
        callback: Callable[[dict], None] | None = None, resume: str | Path | None = None,
        stop_after: int | None = None, on_epoch: Callable[[dict, Callable], None] | None = None,
        save_when: Callable[[int], bool] | None = None) -> list[dict]:
    """Train `cfg` on `data`; after each epoch call `on_epoch(metrics, save)` if given
    (`save(paths, **keys)` checkpoints the epoch with extra top-level keys: how the
    tutorial's command line keeps its max_test_acc and checkpoint_max.pth), save
    checkpoint_latest.pth in `out_dir`, then call `callback(metrics)`.
    Resumes from the checkpoint at `resume`.
    `stop_after` ends the run after that many epochs of this call (used to
    interrupt a run in tests and tools; the schedule still spans cfg.epochs).
    `save_when(epoch)`, if given, says after which epochs to save (a study
    copies each checkpoint to its storage: it saves only where it must).
    Returns the metrics of the epochs run by this call. Where the time went: config.TIME_PARTS."""
    started = time.perf_counter()  # the set-up's clock (setup_s) and the run's (elapsed_s)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    net = CSNN.from_config(cfg)
    set_backend(net, cfg.backend)
    net.to(device)
    optimizer = make_optimizer(cfg, net.parameters())
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.epochs)
    use_amp = cfg.amp and device.type == "cuda"
    amp_dtype = torch.float16 if use_amp else None
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    order_gen = torch.Generator().manual_seed(cfg.seed)  # batch order, saved in checkpoints
    start_epoch = 0

    # What a checkpoint saves under these keys (with the RNGs); the next piece of state goes here.
    state = {"net": net, "optimizer": optimizer, "lr_scheduler": scheduler, "scaler": scaler}
    if resume is not None:
        start_epoch = restore_checkpoint(resume, cfg, state, order_gen, device, data)

    splits = fmnist.split(data, cfg.val_size, cfg.train_size, cfg.test_size, cfg.split_seed)
    splits = {k: tuple(t.to(device) for t in v) for k, v in splits.items()}  # resident on the device
    train_x, train_y = splits["train"]
    if device.type == "cpu":  # on CUDA SpikingJelly's own kernels run
        net.fuse(cfg.compile if cfg.compile != "auto" else cfg.epochs * len(train_y) >= COMPILE_AUTO_IMAGES)
        # torch compiles in a pool of processes, one per core of the machine, each importing torch; a run given
        # fewer threads (a Ray trial: its CPUs) compiles in its own process, unless the user said otherwise
        # (TORCHINDUCTOR_COMPILE_THREADS). Cold, T 4 and T 2 on the 2-core machine: 23 CPU-seconds against 28
        # with the pool; warm: 5.6 against 6.1 (2026-12-08).
        import torch._inductor.config as inductor

        if "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ and (inductor.compile_threads or 1) > torch.get_num_threads():
            inductor.compile_threads = torch.get_num_threads()
    else:  # cuDNN picks its fastest algorithms by timing them, unless runs must repeat exactly
        torch.backends.cudnn.benchmark = not torch.are_deterministic_algorithms_enabled()
    graphs, off = use_cuda_graphs(cfg, device)
    status = {"fallback": [off] if off else []}  # what cuda_graph found, shared by training and evaluation
    observed = {} if device.type == "cuda" else None  # the IF kernels of the first step, seen by the profiler
    train_epoch = make_trainer(net, optimizer, scaler, train_x, train_y, cfg.batch_size, amp_dtype, graphs, observed,
                               status, augment=config.augment_names(cfg.augment), loss=cfg.loss)
    eval_graphs = {"mode": graphs, "status": status} if graphs else None
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)

    history = []
    clock = {"setup_s": time.perf_counter() - started, "report_s": 0.0}  # the first row's; then each epoch's
    for epoch in range(start_epoch, cfg.epochs):
        if stop_after is not None and epoch - start_epoch >= stop_after:
            break
        t0 = time.perf_counter()
        loss_sum, correct, n_train = train_epoch(order_gen)
        loss_sum, correct, *predicted = torch.cat([loss_sum.view(1), correct.view(1), train_epoch.predicted]).tolist()
        # (the epoch's one wait for the GPU)
        train_s = time.perf_counter() - t0
        if epoch == start_epoch:
            info = {**run_info(net, device, use_amp, graphs_info(graphs, status)["cuda_graphs_used"], observed), "data_sha": data.fingerprint}
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()

        m = {"epoch": epoch, "lr": lr, "train_loss": loss_sum / n_train, "train_acc": correct / n_train}
        # what the network said on the training images as it trained (never the test set's: a trial's stop may read it)
        m.update(top_class=max(range(10), key=predicted.__getitem__), top_class_share=max(predicted) / n_train)
        # Spikes are 0/1 even from NaN potentials, so divergence can hide in the weights.
        finite = torch.stack([p.isfinite().all() for p in net.parameters()]).all().item()
        if not (math.isfinite(m["train_loss"]) and finite):
            raise FloatingPointError(f"epoch {epoch}: diverged (train_loss {m['train_loss']}, "
                                     f"{'finite' if finite else 'non-finite'} weights); try an lr below {cfg.lr}")
        t1 = time.perf_counter()
        if "val" in splits:
            v = evaluate(net, *splits["val"], cfg.batch_size, eval_graphs, cfg.loss)
            m.update(val_loss=v["loss"], val_acc=v["acc"])
        t2 = time.perf_counter()
        t = evaluate(net, *splits["test"], cfg.batch_size, eval_graphs, cfg.loss)
        m.update(test_loss=t["loss"], test_acc=t["acc"], train_img_s=n_train / train_s)
        t3 = time.perf_counter()
        # Firing rates and costs may be objectives: count them where selection looks,
        # the validation split, or the test set when there is none (the tutorial's command line).
        c, cost_x = (v, splits["val"][0]) if "val" in splits else (t, splits["test"][0])
        m.update({k: x for k, x in c.items() if k.startswith("fr_")})
        m["spikes_per_image"] = efficiency.spikes_per_image(net, [c[f"fr_{i}"] for i in net.spiking_layers])
        m.update(efficiency.count(net, to_input(cost_x[:COST_IMAGES])))
        m["epoch_s"] = time.perf_counter() - t0
        m.update(info, **graphs_info(graphs, status))
        clock.update(train_s=t1 - t0, val_s=t2 - t1, test_s=t3 - t2, cost_s=m["epoch_s"] - (t3 - t0))
        if epoch == start_epoch:  # CUDA graphs captured in this first epoch: set-up, not its training or evaluation
            captured = status.get("capture_s", {})
            clock["train_s"] -= captured.get("training step", 0.0)
            clock["val_s" if "val" in splits else "test_s"] -= captured.get("evaluation", 0.0)
            clock["setup_s"] += sum(captured.values())

        t4 = time.perf_counter()
        if on_epoch is not None:
            on_epoch(m, lambda paths, **keys: save_checkpoint(paths, cfg, state, order_gen, device, epoch, m, **keys))
        if out_dir is not None and (save_when is None or save_when(epoch)):
            save_checkpoint([Path(out_dir) / "checkpoint_latest.pth"], cfg, state, order_gen, device, epoch, m)
        t5 = time.perf_counter()
        m.update(clock, checkpoint_s=t5 - t4, elapsed_s=t5 - started)
        history.append(m)
        clock = {"setup_s": 0.0}
        if callback is not None:
            callback(m)
        clock["report_s"] = time.perf_counter() - t5  # sent with the next epoch: this one's row has gone
    return history


def run_info(net: CSNN, device: torch.device, amp: bool, graphs: bool, observed: dict | None) -> dict:
    """Where and how this run trains (config.RUN_INFO), read after its first training
    epoch; says once which IF kernels ran (on CUDA the kernels the profiler saw in the
    first step, `observed`), and warns when CUDA fell back to SpikingJelly's slow reference loop."""
    from importlib.metadata import version

    if observed is None:  # the CPU: which of our code paths ran
        impls = sorted({i or "none" for i in net.neuron_implementations().values()})
    else:
        impls = observed.get("implementations") or ["unobserved"]
    name = f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)
    print(f"csnn: training on {name}, AMP {'on' if amp else 'off'}, CUDA graphs {'on' if graphs else 'off'}, "
          f"neuron kernels: {', '.join(impls)}", flush=True)
    if device.type == "cuda" and any(i.endswith("reference") for i in impls):
        warnings.warn(f"SpikingJelly's fused neuron kernel did not run on {name} ({', '.join(impls)}): training is slow",
                      stacklevel=3)
    if impls == ["unobserved"]:
        warnings.warn(f"torch.profiler saw no GPU kernel on {name} (CUPTI unavailable?): which IF kernels ran is "
                      "not known", stacklevel=3)
    return {"run_device": name, "run_amp": amp, "neuron_impl": ",".join(impls),
            "deterministic": torch.are_deterministic_algorithms_enabled(), "torch_version": torch.__version__,
            "spikingjelly_version": version("spikingjelly"), "cuda_version": torch.version.cuda or ""}


def set_deterministic(on: bool) -> None:
    """Bit-reproducible CUDA runs, at a cost in speed (README): cuDNN's deterministic
    algorithms without autotuning, and PyTorch's deterministic kernels where they
    exist (a warning where none does). cuBLAS reads its workspace setting when it
    starts, so call this before any CUDA work. No effect on CPU results, which are
    reproducible anyway."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(on, warn_only=True)


def save_checkpoint(paths: list[Path], cfg: TrainConfig, state: dict, order_gen: torch.Generator,
                    device: torch.device, epoch: int, metrics: dict, **keys) -> None:
    """The checkpoint layout: the tutorial's keys (net, optimizer, lr_scheduler, epoch;
    its max_test_acc among `keys`, from the command line) plus every object of `state`,
    the RNGs, the config and the epoch's metrics. restore_checkpoint reads back exactly this."""
    ckpt = {k: obj.state_dict() for k, obj in state.items()}
    ckpt.update(keys, epoch=epoch, config=cfg.to_dict(), metrics=metrics,
                rng={"order": order_gen.get_state(), "torch": torch.get_rng_state(),
                     "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None})
    for path in paths:
        write_atomic(path, lambda tmp: torch.save(ckpt, tmp))


def restore_checkpoint(path: str | Path, cfg: TrainConfig, state: dict, order_gen: torch.Generator,
                       device: torch.device, data: fmnist.FashionMNIST | None = None) -> int:
    """Load a checkpoint written by save_checkpoint into `state` and the RNGs, so that
    the run continues as if never stopped; returns the next epoch."""
    ckpt = read_checkpoint(path)
    check_resumable(path, ckpt, cfg)
    if data is not None:
        check_same_data(path, ckpt, data)
    for k, obj in state.items():
        # A CPU run saves an empty GradScaler state, which an enabled (CUDA) scaler refuses.
        if k != "scaler" or ckpt[k]:
            obj.load_state_dict(ckpt[k])
    opt = state.get("optimizer")
    if opt is not None:
        # load_state_dict takes fused/foreach from the saved groups and leaves Adam's step where it was saved:
        # a CPU checkpoint would put a CUDA run on the unfused step, which GradScaler then hands its device-side
        # skip and fails. Both as make_optimizer chose for this device.
        for g in opt.param_groups:
            g.update({k: opt.defaults[k] for k in ("fused", "foreach") if k in opt.defaults})
        for p, s in opt.state.items():
            if torch.is_tensor(s.get("step")):
                s["step"] = s["step"].to(p.device, torch.float32)
    order_gen.set_state(ckpt["rng"]["order"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
    return ckpt["epoch"] + 1


def load_model(checkpoint: str | Path, device: str = "cpu") -> tuple[CSNN, TrainConfig]:
    """The network (in eval mode) and the TrainConfig of a checkpoint written by fit."""
    ckpt = read_checkpoint(checkpoint)
    cfg = TrainConfig.from_dict(ckpt["config"])
    net = CSNN.from_config(cfg)
    net.load_state_dict(ckpt["net"])
    return net.to(resolve_device(device)).eval(), cfg


class CheckpointError(ValueError):
    """A file that is not a checkpoint written by fit; the message names it and why."""


CHECKPOINT_KEYS = ("net", "optimizer", "lr_scheduler", "epoch", "config", "rng")  # max_test_acc: the CLI's only


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by fit, read and checked before anything is done with it."""
    path = Path(path)
    def bad(why):
        return CheckpointError(f"{path} is not a csnn.train checkpoint ({why})")
    if not path.exists():
        raise bad("no such file")
    if path.is_dir():
        raise bad("a directory; give its checkpoint_latest.pth")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch.load fails in many ways on a damaged file: each means the same here
        raise bad(f"torch.load cannot read it: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'empty'}") from None
    if not isinstance(ckpt, dict):
        raise bad(f"holds a {type(ckpt).__name__}, not a dict")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise bad(f"no {', '.join(missing)}" + ("; a bare state_dict?" if "net" in missing else ""))
    try:
        TrainConfig.from_dict(ckpt["config"])
    except ValueError as e:
        raise bad(f"its config: {e}") from None
    return ckpt


def check_resumable(path, ckpt: dict, cfg: TrainConfig) -> None:
    """A run continues only with the configuration it was started with (the device, and whether
    CUDA graphs replay the step, may change)."""
    diff = TrainConfig.from_dict(ckpt["config"]).differences(cfg)
    if diff:
        raise CheckpointError(f"{path}: checkpoint was written for a different configuration: "
                              + ", ".join(f"{k} {a!r} in the checkpoint, {b!r} now" for k, (a, b) in diff.items()))


def check_same_data(path, ckpt: dict, data: fmnist.FashionMNIST) -> None:
    """A run continues only on the images it started on (their fingerprint, when both know it)."""
    was = (ckpt.get("metrics") or {}).get("data_sha") or ""
    if was and data.fingerprint and was != data.fingerprint:
        raise CheckpointError(f"{path}: the run was trained on other images (data fingerprint {was}; "
                              f"{data.source} has {data.fingerprint}); resume it with the data it started on "
                              "(-data-dir), or start a new run")
