"""Whether this machine has NVIDIA GPUs that torch cannot use: the one case where a
trial that Ray gave a GPU must not quietly train on the CPU.

The pinned torch is a CUDA 13 build: with a driver too old for it, torch.cuda.is_available()
is False while nvidia-smi and Ray still see the GPUs. Ray's logical GPUs on a machine
without NVIDIA GPUs (ray.init(num_gpus=N), how GPU scheduling is tested) still mean the CPU.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

NVIDIA_PROC_ENV = "CSNN_NVIDIA_PROC"  # where the driver's /proc folder is read (a test's fake one)


def nvidia_driver() -> str | None:
    """The NVIDIA driver's version when this machine has one loaded (its /proc/driver/nvidia/version,
    else nvidia-smi), else None. With CSNN_NVIDIA_PROC set only that folder is read."""
    proc = Path(os.environ.get(NVIDIA_PROC_ENV) or "/proc/driver/nvidia")
    try:
        text = (proc / "version").read_text()
    except OSError:
        text = None
    if text is not None:  # "NVRM version: NVIDIA UNIX [Open ]Kernel Module [for x86_64]  570.86.15  Release Build ..."
        m = re.search(r"Kernel Module.*?\s(\d+\.\d+(?:\.\d+)?)\s", text)
        return m[1] if m else (text.strip().splitlines() or ["unknown version"])[0]
    if os.environ.get(NVIDIA_PROC_ENV) or shutil.which("nvidia-smi") is None:
        return None
    try:
        p = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout.split()[0] if p.returncode == 0 and p.stdout.split() else None


def cuda_refusal(driver: str) -> str:
    """The one line that refuses to train on the CPU beside NVIDIA GPUs (driver `driver`) that torch does not see."""
    import torch

    build = f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a build without CUDA"
    return (f"this machine has NVIDIA GPUs (driver {driver}) but torch {torch.__version__} ({build}) sees no CUDA "
            f"device, so its trials would train on the CPU: install a torch wheel built for the CUDA your driver "
            f"supports (nvidia-smi shows it; pip install torch --index-url https://download.pytorch.org/whl/cu12X), "
            f"or set resources.gpus_per_trial: 0 to train on the CPU")


def torch_cannot_see_gpus() -> str | None:
    """cuda_refusal's line when this machine has NVIDIA GPUs and torch sees none, else None."""
    import torch

    if torch.cuda.is_available():
        return None
    driver = nvidia_driver()
    return cuda_refusal(driver) if driver else None
