"""What a study ran on: environment.yaml, written when a study starts and compared
with the running environment by --resume, --retrain and study.reproduce.

A difference is a warning, not a refusal: a reproduction on newer versions is still
worth having, as long as it says what it ran on. Recorded for the machine that runs
the driver (study.run, study.reproduce); trials on other nodes of a cluster record
their own torch version and device with every epoch (history.csv).
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import yaml

from study.storage import Location

FILE = "environment.yaml"
# The distributions whose versions change what a study computes or how it runs.
PACKAGES = ("csnn-study", "torch", "torchvision", "spikingjelly", "triton", "ray", "optuna", "numpy", "pandas",
            "pyarrow", "matplotlib")
ROOT = Path(__file__).resolve().parents[1]  # the project's checkout, when it is one (an editable install)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        p = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def collect() -> dict:
    """This process's environment, as environment.yaml records it."""
    import torch

    packages = {name: _version(name) for name in PACKAGES}
    # CuPy's wheels are named by CUDA version (cupy-cuda12x, cupy-cuda13x, ...): whichever is installed
    packages.update({d.metadata["Name"]: d.version for d in importlib.metadata.distributions()
                     if (d.metadata["Name"] or "").lower().startswith("cupy")})
    commit = _git("rev-parse", "HEAD") if (ROOT / ".git").exists() else None
    driver = Path("/proc/driver/nvidia/version")
    cuda = torch.cuda.is_available()
    from csnn.gpus import older_than_tested

    older = older_than_tested()
    return {
        **({"older_than_tested": older} if older else {}),  # (csnn.gpus) only when some are: nothing to compare else
        "python": platform.python_version(),
        "git_commit": commit,
        "git_dirty": None if commit is None else bool(_git("status", "--porcelain", "--untracked-files=no")),
        "packages": {k: v for k, v in packages.items() if v is not None},
        "torch_cuda": torch.version.cuda,  # the CUDA torch was built for; None: a CPU build
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "nvidia_driver": driver.read_text().splitlines()[0].strip() if driver.is_file() else None,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
    }


def write(folder: Location | Path, env: dict | None = None, name: str = FILE) -> dict:
    env = env if env is not None else collect()
    (folder / name).write_text(yaml.safe_dump(env, sort_keys=False))
    return env


# what collect() records (but the optional `folder`): a file without one of them was cut short
KEYS = ("python", "git_commit", "git_dirty", "packages", "torch_cuda", "cudnn", "nvidia_driver", "platform", "cpus",
        "gpus")


def load(folder: Location | Path) -> tuple[dict | None, str | None]:
    """(the recorded environment, None); (None, why it cannot be read) for a damaged file;
    (None, None) for a study from before it was recorded."""
    f = folder / FILE
    if not f.is_file():
        return None, None
    try:
        env = yaml.safe_load(f.read_text())
    except (yaml.YAMLError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        return None, f"not YAML ({str(e).splitlines()[0]})"
    if not isinstance(env, dict):
        return None, f"not a mapping (a {type(env).__name__})"
    lacks = [k for k in KEYS if k not in env]
    if lacks:
        return None, f"has no {', '.join(lacks)} (cut short?)"
    if not isinstance(env["packages"], dict) or not isinstance(env["gpus"], list):
        return None, "its packages are not a mapping or its gpus not a list"
    return env, None


def read(folder: Location | Path) -> dict | None:
    """The recorded environment; None for a study from before it was recorded, or a damaged file
    (which warn_differences names: what a study ran on is a record, nothing needs it to run)."""
    return load(folder)[0]


def _flat(env: dict) -> dict:
    out = {}
    for k, v in env.items():
        if isinstance(v, dict):
            out.update(_flat(v))
        else:
            out[k] = v
    return out


def differences(recorded: dict, now: dict) -> list[str]:
    """One 'name: recorded then, now now' per difference, packages by their own name."""
    a, b = _flat(recorded), _flat(now)
    for k in ("folder", "optuna_storage"):  # where a study began and its Optuna storage: not the machine's
        a.pop(k, None), b.pop(k, None)
    show = lambda v: "none" if v is None or v == [] else ", ".join(map(str, v)) if isinstance(v, list) else str(v)  # noqa: E731
    return [f"{k}: {show(a.get(k))} then, {show(b.get(k))} now" for k in dict.fromkeys([*b, *a]) if a.get(k) != b.get(k)]


def warn_differences(folder: Location | Path, what: str, now: dict | None = None) -> list[str]:
    """Print one warning line per difference between the study's environment.yaml and this one
    (one line naming the file when it is damaged), and return them."""
    import sys

    recorded, damaged = load(folder)
    if damaged:
        print(f"warning: {folder / FILE}: {damaged}; {what} goes on without comparing its environment with the "
              "study's", file=sys.stderr)
        return [f"{FILE} unreadable: {damaged}"]
    if recorded is None:
        return []
    lines = differences(recorded, now if now is not None else collect())
    for line in lines:
        print(f"warning: {what} runs on another environment than {folder / FILE} records: {line}", file=sys.stderr)
    return lines
