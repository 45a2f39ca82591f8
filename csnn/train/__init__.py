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
from csnn.config import COMPILE_AUTO_IMAGES, TrainConfig
from csnn.data import to_input
from csnn.model import CSNN, observe_if_kernels_once, set_backend

COST_IMAGES = 128  # the first validation (else test) images, counted each epoch (~8 ms an image on 2 cores)


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
# A replayed graph is checked once against the eager step on the same batch. Not yet measured on a GPU:
# wide enough for the last bits that cuDNN's non-deterministic backward (atomics) may change in one step,
# far too narrow for a replay that reads or writes the wrong memory. gpucheck's "graphs" check measures it.
GRAPH_RTOL, GRAPH_ATOL = 1e-4, 1e-6


def capture_cuda_graph(fn: Callable, static: tuple) -> Callable:
    """Capture fn(*static) as a CUDA graph (recorded, not run); returns what replays it.
    The one function that captures: tests hand cuda_graph another (the check and the
    fallback around it run the same on the CPU)."""
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=torch.cuda.current_stream(), capture_error_mode="thread_local"):
        fn(*static)
    return g.replay


def cuda_graph(fn: Callable, *static: torch.Tensor, warmup: int = WARMUP_STEPS, mode: bool | str = True,
               state: Callable[[], dict] | None = None, status: dict | None = None, what: str = "training step",
               capture: Callable | None = None) -> Callable:
    """`run(*inputs)`: copies `inputs` into the `static` tensors, then calls `fn(*static)`:
    eagerly (on a side stream on CUDA) for the first `warmup` calls, then captures it once
    as a CUDA graph and from then on replays it. Every call does the work exactly once.
    `fn` must keep all its state in tensors (a Python value it reads is frozen at capture).

    At capture the graph is checked: `state()` ({name: tensor}, what fn changes) is saved,
    fn runs eagerly, the saved state is copied back in place (the captured addresses stay
    valid), the graph replays the same batch, and the two results must agree (GRAPH_RTOL,
    GRAPH_ATOL). With `mode` "auto" a capture error (but out of memory) or a disagreement
    prints one warning line, appends the reason to status["fallback"], and fn runs eagerly
    from then on (the eager step's result kept); with `mode` True it raises. status["used"]:
    a checked graph replays; status["capture_s"][what]: how long capture and check took."""
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
        replay, why = on_side(lambda: _capture_checked(fn, static, state or (lambda: {}), capture or capture_cuda_graph))
        status.setdefault("capture_s", {})[what] = time.perf_counter() - t0  # capture and check (gpucheck's figure)
        if why is None:
            status["used"] = True
            return
        if mode is True:
            raise RuntimeError(f"CUDA graphs: {what}: {why}; train without CUDA graphs: -no-cuda-graphs "
                               f"(python -m csnn.train), cuda_graphs: false or auto (TrainConfig; a study's train: "
                               f"section), or {GRAPHS_ENV}=0 in the environment")
        eager = True
        status.setdefault("fallback", []).append(f"{what}: {why}")
        print(f"csnn: warning: CUDA graphs off for the {what}, which runs eagerly: {why}", file=sys.stderr, flush=True)

    return run


def _capture_checked(fn: Callable, static: tuple, state: Callable[[], dict], capture: Callable):
    """(replay, None) for a graph that replays what fn computes eagerly; else (None, why). Either
    way this batch's work is done once (by the replay, or by fn when the graph is not used)."""
    try:
        replay = capture(fn, static)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to capture means: run eagerly
        fn(*static)  # capture recorded without running: this batch is still to do
        return None, f"capturing failed ({type(e).__name__}: {_first_line(e)})"
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
        why = _graph_differs(state(), eager)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001
        why = f"replaying failed ({type(e).__name__}: {_first_line(e)})"
    if why is not None:  # keep the eager step's result
        for k, t in state().items():
            if k in eager:
                t.copy_(eager[k])
        return None, why
    return replay, None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def _graph_differs(replayed: dict, eager: dict) -> str | None:
    """Why the replayed state is not the eager one (the first tensor that differs, with its max |difference|), or None."""
    if replayed.keys() != eager.keys():
        return f"the replay changed other tensors ({', '.join(sorted(replayed.keys() ^ eager.keys()))})"
    for k, a in replayed.items():
        b = eager[k]
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"{k}: replayed {a.dtype} {tuple(a.shape)}, eager {b.dtype} {tuple(b.shape)}"
        if a.is_floating_point():
            ok = torch.allclose(a, b, rtol=GRAPH_RTOL, atol=GRAPH_ATOL, equal_nan=True)
        else:
            ok = torch.equal(a, b)
        if not ok:
            d = (a.double() - b.double()).abs().max().item()
            return (f"replayed step differs from the eager one in {k} (max |difference| {d:.3g}; "
                    f"allowed {GRAPH_ATOL:g} + {GRAPH_RTOL:g} x |value|)")
    return None


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


def evaluate(net: CSNN, x: torch.Tensor, y: torch.Tensor, batch_size: int, graphs: dict | None = None) -> dict:
    """Loss, accuracy and per-layer firing rates over a whole split (one host sync).
    Always in float32, as the tutorial measured its 0.9263, even inside an autocast
    region: AMP is for training. On CUDA a last partial batch is padded to `batch_size`
    (images weighted 0), so that no kernel is compiled again for its size (Triton's IF
    kernels take the neuron count as a constant). With `graphs` (a dict kept across
    calls, on CUDA; its "mode" and "status" as cuda_graph's) every batch replays one
    CUDA graph, checked against the eager evaluation of the first."""
    net.eval()
    n, device = len(y), x.device
    if graphs is not None and "sums" in graphs:
        sums = graphs["sums"].zero_()
    else:  # loss, correct, then the firing rate of each spiking layer, summed over images
        sums = torch.zeros(2 + len(net.spiking_layers), device=device)

    def step(xb, yb, w):  # w: each image's weight, 1 (0 for padding)
        functional.reset_net(net)  # also first: a step cut short (a failed capture) leaves no potential behind
        rates: list = []
        fr = net(to_input(xb), rates)
        loss = (fr - F.one_hot(yb, 10).float()).square().sum(1) / 10
        sums.add_(torch.cat([(loss @ w).view(1), ((fr.argmax(1) == yb).float() @ w).view(1), torch.stack(rates) @ w]))
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
                 status: dict | None = None, capture: Callable | None = None) -> Callable:
    """`train_epoch(order_gen)`: one pass over (x, y) in the order drawn from order_gen,
    dropping the last partial batch as the tutorial. Returns (loss sum, correct) as
    tensors on the device and the number of images: nothing in it waits for the GPU.
    `train_epoch.predicted` (on the device) counts the epoch's images per predicted class.
    With `graphs` (True: strict, or "auto"; CUDA), the whole step (forward, loss, scaled
    backward, optimizer step, scaler update, metric sums) is one CUDA graph after
    WARMUP_STEPS eager steps, captured and checked (cuda_graph; `status` and `capture`
    are its) in the first epoch of this trainer (so after any checkpoint was restored into it).
    `observe` (a dict, CUDA) receives observe_if_kernels of the first step (once per process
    and kind of step: model.observe_if_kernels_once)."""
    device = x.device
    loss_sum, correct = torch.zeros((), device=device), torch.zeros((), device=device)
    predicted = torch.zeros(10, device=device)  # images per predicted class (a dead network's: all in one)
    lr = torch.zeros((), device=device)  # what a CUDA optimizer step reads (_lr_from)
    lr_tensor = functools.partial(_lr_from, optimizer, lr) if device.type == "cuda" else contextlib.nullcontext

    def step(idx):
        functional.reset_net(net)  # also first: a step cut short (a failed capture) leaves no potential behind
        label = y[idx]
        # cache_enabled=False: autocast's cache of float16 weights would be frozen into a graph
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None, cache_enabled=False):
            fr = net(to_input(x[idx]))
            loss = F.mse_loss(fr.float(), F.one_hot(label, 10).float())
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

    def first_observed(idx):
        if "kernels" in observe:
            return step(idx)
        key = (str(device), str(amp_dtype), tuple(net.conv_fc[i].kernel for i in net.spiking_layers))
        observe.update(observe_if_kernels_once(key, lambda: step(idx), len(net.spiking_layers)))

    fn = first_observed if observe is not None else step
    if graphs:
        state = graph_state(net, optimizer, scaler, {"loss_sum": loss_sum, "correct": correct, "predicted": predicted})
        run = cuda_graph(fn, torch.zeros(min(batch_size, len(y)), dtype=torch.long, device=device), mode=graphs,
                         state=state, status=status, what="training step", capture=capture)
    else:
        run = fn

    def train_epoch(order_gen: torch.Generator):
        net.train()
        loss_sum.zero_(), correct.zero_(), predicted.zero_()
        lr.fill_(optimizer.param_groups[0]["lr"])
        order = fmnist.batch_order(len(y), batch_size, order_gen, device)
        for idx in order:
            run(idx)
        return loss_sum, correct, order.numel()

    train_epoch.predicted = predicted
    return train_epoch


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
    """config.RUN_INFO's cuda_graphs_*: whether graphs replay (one was captured and checked, and none
    fell back), and else why not (on CUDA)."""
    return {"cuda_graphs_used": bool(mode) and bool(status.get("used")) and not status.get("fallback"),
            "cuda_graphs_fallback": "; ".join(status.get("fallback", []))}


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
    Returns the metrics of the epochs run by this call."""
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
    else:  # cuDNN picks its fastest algorithms by timing them, unless runs must repeat exactly
        torch.backends.cudnn.benchmark = not torch.are_deterministic_algorithms_enabled()
    graphs, off = use_cuda_graphs(cfg, device)
    status = {"fallback": [off] if off else []}  # what cuda_graph found, shared by training and evaluation
    observed = {} if device.type == "cuda" else None  # the IF kernels of the first step, seen by the profiler
    train_epoch = make_trainer(net, optimizer, scaler, train_x, train_y, cfg.batch_size, amp_dtype, graphs, observed,
                               status)
    eval_graphs = {"mode": graphs, "status": status} if graphs else None
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)

    history = []
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
        if "val" in splits:
            v = evaluate(net, *splits["val"], cfg.batch_size, eval_graphs)
            m.update(val_loss=v["loss"], val_acc=v["acc"])
        t = evaluate(net, *splits["test"], cfg.batch_size, eval_graphs)
        m.update(test_loss=t["loss"], test_acc=t["acc"], train_img_s=n_train / train_s)
        # Firing rates and costs may be objectives: count them where selection looks,
        # the validation split, or the test set when there is none (the tutorial's command line).
        c, cost_x = (v, splits["val"][0]) if "val" in splits else (t, splits["test"][0])
        m.update({k: x for k, x in c.items() if k.startswith("fr_")})
        m["spikes_per_image"] = efficiency.spikes_per_image(net, [c[f"fr_{i}"] for i in net.spiking_layers])
        m.update(efficiency.count(net, to_input(cost_x[:COST_IMAGES])))
        m["epoch_s"] = time.perf_counter() - t0
        m.update(info, **graphs_info(graphs, status))

        if on_epoch is not None:
            on_epoch(m, lambda paths, **keys: save_checkpoint(paths, cfg, state, order_gen, device, epoch, m, **keys))
        if out_dir is not None and (save_when is None or save_when(epoch)):
            save_checkpoint([Path(out_dir) / "checkpoint_latest.pth"], cfg, state, order_gen, device, epoch, m)
        history.append(m)
        if callback is not None:
            callback(m)
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
          f"IF kernels: {', '.join(impls)}", flush=True)
    if device.type == "cuda" and any(i.endswith("reference") for i in impls):
        warnings.warn(f"SpikingJelly's fused IF kernel did not run on {name} ({', '.join(impls)}): training is slow",
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
