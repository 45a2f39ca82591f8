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


# What the GPU path was tested with: constraints.txt's pins (CuPy, optional, is not pinned there: the floor of
# pyproject.toml's cupy extra). A GPU machine's preinstalled torch is often older (the H200 image: torch 2.11,
# Triton 3.6, torchvision 0.26): said once at a study's start and by gpucheck, recorded, never refused (the code
# calls no torch API newer than 2.11: tests/test_dependencies.py lists the private ones).
TESTED_PACKAGES = ("torch", "triton", "torchvision", "spikingjelly")
CUPY_TESTED = "14"  # pyproject.toml: cupy = ["cupy-cuda13x>=14,<15"]


def _release(v: str) -> tuple:
    """'2.11.0+cu130' -> (2, 11, 0): the numbers of a release, enough to order these packages' versions."""
    m = re.match(r"\d+(?:\.\d+)*", v or "")
    return tuple(int(x) for x in m[0].split(".")) if m else ()


def older_than_tested(root: Path = Path(__file__).resolve().parents[1]) -> list[str]:
    """'torch 2.11.0 (tested: 2.14.1)' for each package of the GPU path installed older than the version tested
    (constraints.txt in the checkout `root`; none without one, as in an installed wheel)."""
    import importlib.metadata as md

    try:
        pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (root / "constraints.txt").read_text(), re.M))
    except OSError:
        return []
    tested = {name: pins[name] for name in TESTED_PACKAGES if name in pins}
    tested.update({d.metadata["Name"]: CUPY_TESTED for d in md.distributions()
                   if (d.metadata["Name"] or "").lower().startswith("cupy-")})
    out = []
    for name, want in tested.items():
        try:
            have = md.version(name)
        except md.PackageNotFoundError:
            continue
        if _release(have) < _release(want):
            out.append(f"{name} {have} (tested: {want})")
    return out


def older_line(older: list[str]) -> str | None:
    """The one line that says so, or None."""
    if not older:
        return None
    return (f"csnn: note: older than the versions tested (constraints.txt): {', '.join(older)}; the GPU path "
            "relies on no API newer than torch 2.11, but these versions were not tested together")
