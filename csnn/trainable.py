"""The Ray Tune trainable: the one training loop, reporting every epoch, with a
checkpoint at the epochs that need one.

The only module of `csnn` that knows about Ray.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import ray
from ray import tune

from csnn.config import TrainConfig, dead_network, silent_layers, trial_fields
from csnn.data import FashionMNIST
from csnn.gpus import cuda_refusal, nvidia_driver
from csnn.train import fit, read_checkpoint


def trial_device(requested: str, gpu_ids: list, cuda_available: bool, driver: str | None = None) -> str:
    """The device a trial may use: the GPU Ray assigned it, else the CPU.

    Ray 2.60 no longer hides the GPUs from a worker that asked for none, so
    `device: auto` alone would put such a trial on cuda:0 behind Ray's back.
    `driver`: the NVIDIA driver's version if this machine has NVIDIA GPUs (csnn.gpus):
    then a GPU that torch cannot see is an error, not a reason to train on the CPU."""
    if not gpu_ids:
        if requested.startswith("cuda"):
            raise ValueError(f"TrainConfig.device is {requested!r} but Ray gave this trial no GPU; "
                             "set resources.gpus_per_trial above 0 (or auto), or device: auto")
        return "cpu"
    if requested == "cpu":
        return "cpu"
    if not cuda_available:
        if driver:
            raise RuntimeError(cuda_refusal(driver))
        # Ray's logical GPUs (ray.init(num_gpus=N) on a CPU machine) have ids but no CUDA device.
        return "cpu"
    # Ray sets CUDA_VISIBLE_DEVICES to the assigned ids, so the first is cuda:0,
    # unless told not to (then the ids are the machine's own).
    if os.environ.get("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES", "0") not in ("", "0"):
        return f"cuda:{gpu_ids[0]}"
    return "cuda:0"


def checkpoint_epochs(epochs: int, every: int, rungs=()) -> set[int]:
    """The epochs (1-based, Ray's training_iteration) after which a checkpoint is
    copied to storage: every `every` epochs, at the scheduler's rungs (where a
    trial may be stopped) and at the end."""
    return {e for e in range(1, epochs + 1) if e % every == 0 or e in rungs or e == epochs}


def placement() -> dict:
    """Where this trial runs: Ray's GPU ids (as '0,3'); Ray adds node_ip and
    hostname itself, and fit reports the device as run_device."""
    return {"gpu_ids": ",".join(str(i) for i in ray.get_gpu_ids())}


# Measured on real images: after 1,000 (two epochs of 500) an Adam trial's output layer was
# silent at both epoch ends and fired after the third (val_acc 0.65 after the fourth), as did
# SGD lr 2 and 10 after one epoch of 600; with 3,000 images an epoch, every trial silent at
# two epoch ends (6,000 images) stayed so to its sixth epoch.
SILENT_MIN_IMAGES = 5_000
# Dead networks (csnn.config.DEAD_SHARE), measured on real images (SGD momentum 0.9, T 1 or 2,
# 4 or 8 channels, lr 50 to 300): once dead they predicted one class for exactly 100% of the
# training images at every epoch (500 or 3,000 an epoch; fr_12 0.1 to 0.4: one to four output
# neurons firing at every step, whatever the image; val_acc 0.100 to the last epoch). Networks
# that fired and were learning came closest in their first epoch (Adam lr 1e-4, 3,000 images:
# 0.997 while firing, 0.559 after the second) or in the first epoch they fired after being silent
# (SGD lr 0.01 momentum 0.8, 8 channels, 6,000 images: silent, then 0.992, then 0.906; Adam lr
# 1e-4 on 500: 0.984, then 0.948); else 0.956 at most. Hence 0.999, two epochs in a row, and an
# epoch with a silent layer never counts as dead.


def ended(before: dict, now: dict, seen: int, silent_rate: float) -> dict:
    """What ends a trial at the report of epoch `now` (`before`: the epoch before it, {} for none),
    once it has trained on `seen` images: {"silent": "fr_10,fr_12"}, the layers silent at both
    epochs; else {"dead": why} (csnn.config.dead_network), a network dead at both: every layer
    fired, yet it predicted one class for at least DEAD_SHARE of the training images; else {} (it
    goes on; also before SILENT_MIN_IMAGES images, and always with silent_rate 0)."""
    if seen < SILENT_MIN_IMAGES:
        return {}
    silent = sorted(set(silent_layers(before, silent_rate)) & set(silent_layers(now, silent_rate)))
    if silent:
        return {"silent": ",".join(silent)}
    dead = dead_network(now, silent_rate) if dead_network(before, silent_rate) else ""
    return {"dead": dead} if dead else {}


class _Ended(Exception):
    """Ends a silent or dead trial's training loop after its last report."""


def trainable(config: dict, data: FashionMNIST, fixed: dict | None = None, checkpoint_every: int = 1,
              rungs: tuple = (), silent_rate: float = 0.0) -> None:
    """Train TrainConfig(**fixed, **config). `data` arrives through Ray's object
    store (tune.with_parameters), so no trial reads files. A restarted trial
    (FailureConfig retry, or a resumed study) continues from its last checkpoint.

    A silent network (a spiking layer whose firing rate stays below `silent_rate`,
    0: never) learns nothing: the trial ends when a layer was silent at the end of
    two epochs in a row and it has trained on SILENT_MIN_IMAGES, its last report
    saying `silent: fr_<i>`. So does a dead network, one that fires but predicts one class
    for at least DEAD_SHARE of the epoch's training images (its output does not depend on
    its input), its last report saying why: `dead: predicts class 3 for 100.0% of training
    images`. silent_rate 0 turns off both."""
    cfg = TrainConfig.from_dict({**(fixed or {}), **trial_fields(config)})
    import torch

    gpu_ids = ray.get_gpu_ids()
    cuda = torch.cuda.is_available()
    device = trial_device(cfg.device, gpu_ids, cuda, nvidia_driver() if gpu_ids and not cuda else None)
    if not gpu_ids:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # nothing below (torch, Triton) may open a GPU
    cfg = TrainConfig.from_dict({**cfg.to_dict(), "device": device})
    where = placement()
    save_at = checkpoint_epochs(cfg.epochs, checkpoint_every, rungs)

    resume = None
    checkpoint = tune.get_checkpoint()
    with tempfile.TemporaryDirectory(prefix="csnn-trial-") as work:
        if checkpoint is not None:
            resume = Path(checkpoint.to_directory(str(Path(work) / "restored"))) / "checkpoint_latest.pth"
        out = Path(work) / "ckpt"

        before = (read_checkpoint(resume).get("metrics") or {}) if resume else {}  # a restored trial's last epoch
        n_train = cfg.train_size or len(data.train_y) - cfg.val_size

        def report(metrics: dict) -> None:
            nonlocal before
            end = ended(before, metrics, (metrics["epoch"] + 1) * n_train, silent_rate)
            before = metrics
            # Ray copies the checkpoint folder into the trial's storage before returning.
            saved = metrics["epoch"] + 1 in save_at
            tune.report({**metrics, **where, **end},
                        checkpoint=tune.Checkpoint.from_directory(str(out)) if saved else None)
            if end:
                raise _Ended

        try:
            fit(cfg, data, out, report, resume=resume, save_when=lambda epoch: epoch + 1 in save_at)
        except _Ended:
            pass
