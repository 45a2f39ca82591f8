"""The one training loop, and its checkpoints.

Everything that trains (the tutorial's command line in csnn.cli, the Ray
trainable, the study's retrain and reproduce) calls `fit(config, data, ...)`.
`python -m csnn.train` still runs the command line.
"""
from __future__ import annotations

import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from spikingjelly.activation_based import functional

from csnn import data as fmnist
from csnn import efficiency
from csnn.atomic import write_atomic
from csnn.config import COMPILE_AUTO_IMAGES, TrainConfig
from csnn.data import to_input
from csnn.model import CSNN, set_backend

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
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def evaluate(net: CSNN, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> dict:
    """Loss, accuracy and per-layer firing rates over a whole split (one host sync).
    Always in float32, as the tutorial measured its 0.9263, even inside an autocast
    region: AMP is for training."""
    net.eval()
    loss = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device)
    rates = torch.zeros(len(net.spiking_layers), device=x.device)
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        for idx in fmnist.batches(len(y), batch_size, device=x.device):
            label = y[idx]
            batch_rates: list = []
            fr = net(to_input(x[idx]), batch_rates)
            loss += F.mse_loss(fr, F.one_hot(label, 10).float(), reduction="sum") / 10
            correct += (fr.argmax(1) == label).sum()
            rates += torch.stack(batch_rates) * len(idx)
            functional.reset_net(net)
    n = max(len(y), 1)
    out = {"loss": loss.item() / n, "acc": correct.item() / n}
    out.update({f"fr_{i}": r / n for i, r in zip(net.spiking_layers, rates.tolist())})
    return out


def train_epoch(net: CSNN, optimizer, scaler, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                order_gen: torch.Generator, amp_dtype=None) -> tuple[float, float, int]:
    """One pass over (x, y) in the order drawn from order_gen, dropping the last
    partial batch as the tutorial. Returns (loss sum, correct, images); the
    only host syncs are at the end (and on CUDA)."""
    net.train()
    device = x.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    idxs = fmnist.batches(len(y), batch_size, order_gen, drop_last=True, device=device)
    for idx in idxs:
        label = y[idx]
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            fr = net(to_input(x[idx]))
            loss = F.mse_loss(fr.float(), F.one_hot(label, 10).float())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        functional.reset_net(net)  # the one place membrane potentials are cleared
        loss_sum += loss.detach() * len(idx)
        correct += (fr.argmax(1) == label).sum()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return loss_sum.item(), correct.item(), sum(len(i) for i in idxs)


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
    net = CSNN(cfg.T, cfg.channels)
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
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)

    history = []
    for epoch in range(start_epoch, cfg.epochs):
        if stop_after is not None and epoch - start_epoch >= stop_after:
            break
        t0 = time.perf_counter()
        loss_sum, correct, n_train = train_epoch(net, optimizer, scaler, train_x, train_y, cfg.batch_size,
                                                 order_gen, amp_dtype)
        train_s = time.perf_counter() - t0
        if epoch == start_epoch:
            info = {**run_info(net, device, use_amp), "data_sha": data.fingerprint}
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()

        m = {"epoch": epoch, "lr": lr, "train_loss": loss_sum / n_train, "train_acc": correct / n_train}
        # Spikes are 0/1 even from NaN potentials, so divergence can hide in the weights.
        finite = torch.stack([p.isfinite().all() for p in net.parameters()]).all().item()
        if not (math.isfinite(m["train_loss"]) and finite):
            raise FloatingPointError(f"epoch {epoch}: diverged (train_loss {m['train_loss']}, "
                                     f"{'finite' if finite else 'non-finite'} weights); try an lr below {cfg.lr}")
        if "val" in splits:
            v = evaluate(net, *splits["val"], cfg.batch_size)
            m.update(val_loss=v["loss"], val_acc=v["acc"])
        t = evaluate(net, *splits["test"], cfg.batch_size)
        m.update(test_loss=t["loss"], test_acc=t["acc"], train_img_s=n_train / train_s)
        # Firing rates and costs may be objectives: count them where selection looks,
        # the validation split, or the test set when there is none (the tutorial's command line).
        c, cost_x = (v, splits["val"][0]) if "val" in splits else (t, splits["test"][0])
        m.update({k: x for k, x in c.items() if k.startswith("fr_")})
        m["spikes_per_image"] = efficiency.spikes_per_image(net, [c[f"fr_{i}"] for i in net.spiking_layers])
        m.update(efficiency.count(net, to_input(cost_x[:COST_IMAGES])))
        m["epoch_s"] = time.perf_counter() - t0
        m.update(info)

        if on_epoch is not None:
            on_epoch(m, lambda paths, **keys: save_checkpoint(paths, cfg, state, order_gen, device, epoch, m, **keys))
        if out_dir is not None and (save_when is None or save_when(epoch)):
            save_checkpoint([Path(out_dir) / "checkpoint_latest.pth"], cfg, state, order_gen, device, epoch, m)
        history.append(m)
        if callback is not None:
            callback(m)
    return history


def run_info(net: CSNN, device: torch.device, amp: bool) -> dict:
    """Where and how this run trains (config.RUN_INFO), read after its first training
    epoch; says once which IF kernels ran, and warns when CUDA fell back to
    SpikingJelly's slow reference loop."""
    from importlib.metadata import version

    impls = sorted({i or "none" for i in net.neuron_implementations().values()})
    name = f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)
    print(f"csnn: training on {name}, AMP {'on' if amp else 'off'}, IF kernels: {', '.join(impls)}", flush=True)
    if device.type == "cuda" and any(i.endswith("reference") for i in impls):
        warnings.warn(f"SpikingJelly's fused IF kernel did not run on {name} ({', '.join(impls)}): training is slow",
                      stacklevel=3)
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
    order_gen.set_state(ckpt["rng"]["order"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
    return ckpt["epoch"] + 1


def load_model(checkpoint: str | Path, device: str = "cpu") -> tuple[CSNN, TrainConfig]:
    """The network (in eval mode) and the TrainConfig of a checkpoint written by fit."""
    ckpt = read_checkpoint(checkpoint)
    cfg = TrainConfig.from_dict(ckpt["config"])
    net = CSNN(cfg.T, cfg.channels)
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
    """A run continues only with the configuration it was started with (the device may change)."""
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


if __name__ == "__main__":  # the tutorial's command line, kept at its old name
    from csnn.cli import main

    sys.exit(main())
