"""TrainConfig and the one training loop; `python -m csnn.train` is the tutorial's command line.

Everything that trains (this CLI, the Ray trainable, the study's retrain and
reproduce) calls `fit(config, data, ...)`.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import yaml
from spikingjelly.activation_based import functional

from csnn import data as fmnist
from csnn import efficiency
from csnn.model import BACKENDS, CSNN, set_backend

OPTIMIZERS = ("sgd", "adam", "adamw")
# Every metric the trainer reports each epoch (fr_<i>: mean firing rate of the
# spiking layer at conv_fc[i], on the test set). val_* only when val_size > 0.
METRICS = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc",
           "max_test_acc", "train_img_s", "epoch_s", "fr_2", "fr_6", "fr_10", "fr_12",
           "spikes_per_image", "synops_per_image", "macs_per_image", "acs_per_image", "energy_uj")
COST_IMAGES = 128  # the first test images, counted each epoch (counting costs ~8 ms an image on 2 cores)
TIMING_METRICS = ("train_img_s", "epoch_s")
COMPILE_AUTO_IMAGES = 50_000  # measured break-even on 2 CPU cores: ~13k images warm, ~80k cold


@dataclass
class TrainConfig:
    """One training run. Defaults are the tutorial's (T 4, 128 channels, SGD lr 0.1, 16 epochs)."""

    T: int = 4
    channels: int = 128
    batch_size: int = 128
    epochs: int = 16
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9  # SGD only
    weight_decay: float = 0.0
    amp: bool = True  # float16 autocast + GradScaler on CUDA; ignored on the CPU
    seed: int = 0  # weights and batch order
    split_seed: int = 0  # validation split and subsets, fixed across seeds so trials compare on one split
    device: str = "auto"  # auto: cuda if available, else cpu
    val_size: int = 0  # images held out of the 60k training set for model selection
    train_size: int = 0  # stratified training subset, 0 = all
    test_size: int = 0  # stratified test subset, 0 = all
    backend: str = "auto"  # neuron kernels: auto (SpikingJelly 2) | cupy (SpikingJelly < 2)
    # Compiled CPU kernels for the IF neurons and max pooling: true, false, or auto
    # (on when the run trains >= COMPILE_AUTO_IMAGES images; compiling costs
    # about 6 s per process with a warm inductor cache, 40 s cold).
    compile: bool | str = "auto"

    def __post_init__(self):
        positive = ("T", "channels", "batch_size", "epochs", "lr")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"TrainConfig.{name}: {value!r} is not allowed; must be a number > 0")
        for name in ("T", "channels", "batch_size", "epochs", "seed", "split_seed", "val_size", "train_size", "test_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"TrainConfig.{name}: {value!r} is not allowed; must be an integer >= 0")
        for name in ("momentum", "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"TrainConfig.{name}: {value!r} is not allowed; must be a number >= 0")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"TrainConfig.optimizer: {self.optimizer!r} is not allowed; allowed: {', '.join(OPTIMIZERS)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"TrainConfig.backend: {self.backend!r} is not allowed; allowed: {', '.join(BACKENDS)}")
        if self.compile not in (True, False, "auto"):
            raise ValueError(f"TrainConfig.compile: {self.compile!r} is not allowed; allowed: true, false, auto")
        if not isinstance(self.amp, bool):
            raise ValueError(f"TrainConfig.amp: {self.amp!r} is not allowed; must be true or false")
        if not (self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"TrainConfig.device: {self.device!r} is not allowed; allowed: auto, cpu, cuda, cuda:N")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"TrainConfig has no field {', '.join(unknown)}; fields: {', '.join(sorted(known))}")
        return cls(**d)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> "TrainConfig":
        return cls.from_dict(yaml.safe_load(text) or {})


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


def to_input(x: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float [N, 1, 28, 28] in [0, 1], as torchvision's ToTensor."""
    return x.unsqueeze(1).float().div_(255)


def evaluate(net: CSNN, x: torch.Tensor, y: torch.Tensor, batch_size: int, amp_dtype=None) -> dict:
    """Loss, accuracy and per-layer firing rates over a whole split (one host sync)."""
    net.eval()
    loss = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device)
    rates = torch.zeros(len(net.spiking_layers), device=x.device)
    with torch.no_grad(), torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        for idx in fmnist.batches(len(y), batch_size, device=x.device):
            label = y[idx]
            batch_rates: list = []
            fr = net(to_input(x[idx]), batch_rates).float()
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
        save_max: bool = True, stop_after: int | None = None) -> list[dict]:
    """Train `cfg` on `data`; after each epoch save checkpoint_latest.pth (and
    checkpoint_max.pth when test accuracy improves and `save_max`) in `out_dir`,
    then call `callback(metrics)`. Resumes from the checkpoint at `resume`.
    `stop_after` ends the run after that many epochs of this call (used to
    interrupt a run in tests and tools; the schedule still spans cfg.epochs).
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
    start_epoch, max_test_acc = 0, -1.0

    if resume is not None:
        ckpt = torch.load(resume, map_location="cpu", weights_only=False)
        saved = TrainConfig.from_dict(ckpt["config"])
        if {**saved.to_dict(), "device": ""} != {**cfg.to_dict(), "device": ""}:
            raise ValueError(f"{resume}: checkpoint was written for a different configuration: {saved}")
        net.load_state_dict(ckpt["net"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["lr_scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        order_gen.set_state(ckpt["rng"]["order"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
        start_epoch, max_test_acc = ckpt["epoch"] + 1, ckpt["max_test_acc"]

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
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()

        m = {"epoch": epoch, "lr": lr, "train_loss": loss_sum / n_train, "train_acc": correct / n_train}
        # Spikes are 0/1 even from NaN potentials, so divergence can hide in the weights.
        finite = torch.stack([p.isfinite().all() for p in net.parameters()]).all().item()
        if not (math.isfinite(m["train_loss"]) and finite):
            raise FloatingPointError(f"epoch {epoch}: diverged (train_loss {m['train_loss']}, "
                                     f"{'finite' if finite else 'non-finite'} weights); try an lr below {cfg.lr}")
        if "val" in splits:
            v = evaluate(net, *splits["val"], cfg.batch_size, amp_dtype)
            m.update(val_loss=v["loss"], val_acc=v["acc"])
        t = evaluate(net, *splits["test"], cfg.batch_size, amp_dtype)
        improved = t["acc"] > max_test_acc
        max_test_acc = max(max_test_acc, t["acc"])
        m.update(test_loss=t["loss"], test_acc=t["acc"], max_test_acc=max_test_acc,
                 train_img_s=n_train / train_s)
        m.update({k: v for k, v in t.items() if k.startswith("fr_")})
        m["spikes_per_image"] = efficiency.spikes_per_image(net, [t[f"fr_{i}"] for i in net.spiking_layers])
        m.update(efficiency.count(net, to_input(splits["test"][0][:COST_IMAGES])))
        m["epoch_s"] = time.perf_counter() - t0

        if out_dir is not None:
            ckpt = {
                "net": net.state_dict(), "optimizer": optimizer.state_dict(),
                "lr_scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "epoch": epoch, "max_test_acc": max_test_acc, "config": cfg.to_dict(), "metrics": m,
                "rng": {"order": order_gen.get_state(), "torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
            }
            save_atomic(ckpt, Path(out_dir) / "checkpoint_latest.pth")
            if save_max and improved:
                save_atomic(ckpt, Path(out_dir) / "checkpoint_max.pth")
        history.append(m)
        if callback is not None:
            callback(m)
    return history


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """write(tmp) under a temporary name, then rename: a killed run never leaves
    half a file (checkpoint, table, report) under the real name."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_atomic(obj, path: Path) -> None:
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def load_model(checkpoint: str | Path, device: str = "cpu") -> tuple[CSNN, TrainConfig]:
    """The network (in eval mode) and the TrainConfig of a checkpoint written by fit."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    cfg = TrainConfig.from_dict(ckpt["config"])
    net = CSNN(cfg.T, cfg.channels)
    net.load_state_dict(ckpt["net"])
    return net.to(resolve_device(device)).eval(), cfg


# ---------------------------------------------------------------- command line

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m csnn.train", description="Classify Fashion-MNIST with the tutorial's CSNN")
    p.add_argument("-T", default=4, type=int, help="simulating time-steps")
    p.add_argument("-device", default="cuda:0", help="device: cuda:N or cpu (default cuda:0, as the tutorial)")
    p.add_argument("-b", default=128, type=int, help="batch size")
    p.add_argument("-epochs", default=64, type=int, metavar="N", help="number of total epochs to run")
    p.add_argument("-j", default=4, type=int, metavar="N",
                   help="accepted for compatibility and ignored: data is held as tensors, no loader workers")
    p.add_argument("-data-dir", type=str, help="Fashion-MNIST folder (the four IDX files, or torchvision's root)")
    p.add_argument("-download", action="store_true", help="download Fashion-MNIST with torchvision into -data-dir if not found")
    p.add_argument("-out-dir", type=str, default="./logs", help="root dir for saving logs and checkpoint")
    p.add_argument("-resume", type=str, help="resume from the checkpoint path")
    p.add_argument("-amp", action="store_true", help="automatic mixed precision training (CUDA only)")
    p.add_argument("-cupy", action="store_true", help="use the CuPy neuron backend (SpikingJelly < 2 only)")
    p.add_argument("-opt", type=str, default="sgd", help="optimizer: sgd, adam or adamw")
    p.add_argument("-momentum", default=0.9, type=float, help="momentum for SGD")
    p.add_argument("-lr", default=0.1, type=float, help="learning rate")
    p.add_argument("-channels", default=128, type=int, help="channels of CSNN")
    p.add_argument("-save-es", default=None, help="dir for saving a batch of spikes encoded by the first {Conv2d-BatchNorm2d-IFNode}")
    p.add_argument("-seed", default=0, type=int, help="seed for weights and batch order")
    p.add_argument("-weight-decay", default=0.0, type=float, help="weight decay")
    p.add_argument("-val-size", default=0, type=int, help="training images held out for validation")
    p.add_argument("-train-size", default=0, type=int, help="stratified training subset (0 = all)")
    p.add_argument("-test-size", default=0, type=int, help="stratified test subset (0 = all)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    print(args)
    try:
        cfg = TrainConfig(T=args.T, channels=args.channels, batch_size=args.b, epochs=args.epochs,
                          optimizer=args.opt, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                          amp=args.amp, seed=args.seed, device=args.device, val_size=args.val_size,
                          train_size=args.train_size, test_size=args.test_size,
                          backend="cupy" if args.cupy else "auto")
        resolve_device(cfg.device)
        set_backend(CSNN(1, 1), cfg.backend)  # fail before loading anything
        data = fmnist.load(args.data_dir, download=args.download)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if args.resume and args.save_es:
        from csnn.spikes import render

        net, saved = load_model(args.resume, cfg.device)
        images = fmnist.split(data, test_size=0)["test"][0][: args.b]
        try:
            written = render(net, images, Path(args.save_es) / "visualization")
        except FileExistsError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"saved the encoder spikes of {len(images)} test images (T={saved.T}) to {written}")
        return 0

    name = f"T{cfg.T}_b{cfg.batch_size}_{cfg.optimizer}_lr{cfg.lr}_c{cfg.channels}"
    name += "_amp" if cfg.amp else ""
    name += "_cupy" if cfg.backend == "cupy" else ""
    out_dir = Path(args.out_dir) / name
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "args.txt").write_text(f"{args}\n{' '.join(sys.argv)}\n{cfg.to_yaml()}")

    from torch.utils.tensorboard import SummaryWriter

    start = torch.load(args.resume, map_location="cpu", weights_only=False)["epoch"] + 1 if args.resume else 0
    writer = SummaryWriter(str(out_dir), purge_step=start)

    def report(m: dict) -> None:
        for k in ("train_loss", "train_acc", "test_loss", "test_acc"):
            writer.add_scalar(k, m[k], m["epoch"])
        writer.flush()
        print(f"epoch = {m['epoch']}, train_loss ={m['train_loss']: .4f}, train_acc ={m['train_acc']: .4f}, "
              f"test_loss ={m['test_loss']: .4f}, test_acc ={m['test_acc']: .4f}, max_test_acc ={m['max_test_acc']: .4f}, "
              f"train speed ={m['train_img_s']: .1f} images/s, epoch time ={m['epoch_s']: .1f} s", flush=True)

    print(out_dir)
    try:
        fit(cfg, data, out_dir, report, resume=args.resume)
    except (ValueError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        writer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
