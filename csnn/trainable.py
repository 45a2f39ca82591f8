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

from csnn.config import TrainConfig, silent_layers, trial_fields
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


class _Silent(Exception):
    """Ends a silent trial's training loop after its last report."""


def trainable(config: dict, data: FashionMNIST, fixed: dict | None = None, checkpoint_every: int = 1,
              rungs: tuple = (), silent_rate: float = 0.0) -> None:
    """Train TrainConfig(**fixed, **config). `data` arrives through Ray's object
    store (tune.with_parameters), so no trial reads files. A restarted trial
    (FailureConfig retry, or a resumed study) continues from its last checkpoint.

    A silent network (a spiking layer whose firing rate stays below `silent_rate`,
    0: never) learns nothing: the trial ends when a layer was silent at the end of
    two epochs in a row and it has trained on SILENT_MIN_IMAGES, its last report
    saying `silent: fr_<i>`."""
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

        # the layers silent at the previous epoch: a restored trial's, from its checkpoint's epoch
        quiet = set(silent_layers(read_checkpoint(resume).get("metrics") or {}, silent_rate)) if resume else set()
        n_train = cfg.train_size or len(data.train_y) - cfg.val_size

        def report(metrics: dict) -> None:
            nonlocal quiet
            seen = (metrics["epoch"] + 1) * n_train
            silent = sorted(quiet & set(silent_layers(metrics, silent_rate))) if seen >= SILENT_MIN_IMAGES else []
            quiet = set(silent_layers(metrics, silent_rate))
            # Ray copies the checkpoint folder into the trial's storage before returning.
            saved = metrics["epoch"] + 1 in save_at
            tune.report({**metrics, **where, **({"silent": ",".join(silent)} if silent else {})},
                        checkpoint=tune.Checkpoint.from_directory(str(out)) if saved else None)
            if silent:
                raise _Silent

        try:
            fit(cfg, data, out, report, resume=resume, save_when=lambda epoch: epoch + 1 in save_at)
        except _Silent:
            pass
