"""The Ray Tune trainable: the one training loop, reporting every epoch with a checkpoint.

The only module of `csnn` that knows about Ray.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from ray import tune

from csnn.data import FashionMNIST
from csnn.config import TrainConfig, trial_fields
from csnn.train import fit


def trainable(config: dict, data: FashionMNIST, fixed: dict | None = None) -> None:
    """Train TrainConfig(**fixed, **config). `data` arrives through Ray's object
    store (tune.with_parameters), so no trial reads files. A restarted trial
    (FailureConfig retry, or a resumed study) continues from its last checkpoint."""
    cfg = TrainConfig.from_dict({**(fixed or {}), **trial_fields(config)})
    resume = None
    checkpoint = tune.get_checkpoint()
    with tempfile.TemporaryDirectory(prefix="csnn-trial-") as work:
        if checkpoint is not None:
            resume = Path(checkpoint.to_directory(str(Path(work) / "restored"))) / "checkpoint_latest.pth"
        out = Path(work) / "ckpt"

        def report(metrics: dict) -> None:
            # Ray copies the folder into the trial's storage before returning.
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(out)))

        fit(cfg, data, out, report, resume=resume)
