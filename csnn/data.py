"""Fashion-MNIST as uint8 tensors: find the IDX files, read and validate them,
split off a seeded validation set, take seeded stratified subsets, batch by index.

No DataLoader: the whole set is 55 MB as uint8, so it lives on the training
device and batches are index_select's of a seeded permutation.
"""
from __future__ import annotations

import gzip
import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from csnn import config

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
HOW_TO_GET = (
    "install Debian's package (apt-get install dataset-fashion-mnist, files in "
    f"{DEBIAN_DIR}), point CSNN_DATA or --data-dir at a folder holding the four "
    "*-idx?-ubyte[.gz] files, or pass --download to fetch them with torchvision"
)


class DataError(ValueError):
    """Missing or malformed data; the message names the file and the problem."""


@dataclass
class FashionMNIST:
    """Images [N, 28, 28] uint8 and labels [N] int64, as read from the IDX files."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    source: str = ""
    # sha256 of the images and labels (not of the files: gzipped or not, the same data), first
    # 16 hex digits; recorded with every epoch (run info data_sha) so that a resume or a
    # reproduction on other images is noticed. "" for data made in memory.
    fingerprint: str = ""


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """Read one IDX file of unsigned bytes (gzipped or not), checking its header."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    if path.suffix != ".gz" and raw[:2] == b"\x1f\x8b":
        raise DataError(f"{path}: looks gzipped (starts with the gzip magic bytes 1f 8b) but has no .gz suffix; "
                        f"rename it to {path.name}.gz or decompress it")
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated header ({len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    if magic != 0x0800 + ndim:
        raise DataError(
            f"{path}: bad magic number 0x{magic:08x}, expected 0x{0x0800 + ndim:08x} "
            f"(unsigned bytes, {ndim} dimension{'s' if ndim > 1 else ''})"
        )
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = raw[4 + 4 * ndim:]
    if len(body) != int(np.prod(dims)):
        raise DataError(f"{path}: dimensions {dims} need {int(np.prod(dims))} bytes of data, file has {len(body)}")
    if ndim == 3 and dims[1:] != [28, 28]:
        raise DataError(f"{path}: images are {dims[1]}x{dims[2]}, expected 28x28")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def write_idx(path: str | Path, array, gz: bool = False) -> Path:
    """Write an IDX file of unsigned bytes (magic 0x0800 + ndim, big-endian dims, data)."""
    array = np.asarray(array, dtype=np.uint8)
    raw = (0x0800 + array.ndim).to_bytes(4, "big")
    raw += b"".join(int(d).to_bytes(4, "big") for d in array.shape) + array.tobytes()
    path = Path(str(path) + ".gz") if gz else Path(path)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def _find_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / (name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _candidates(data_dir) -> list[Path]:
    """Where to look: a named location only (--data-dir, else $CSNN_DATA), else Debian's
    package. A location the user named is never silently replaced by another."""
    named = data_dir if data_dir is not None else os.environ.get("CSNN_DATA") or None
    d = Path(named).expanduser() if named is not None else DEBIAN_DIR
    return [d, d / "FashionMNIST" / "raw"]  # a plain folder or torchvision's layout


def _named_source(data_dir) -> str | None:
    if data_dir is not None:
        return "--data-dir"
    return "CSNN_DATA" if os.environ.get("CSNN_DATA") else None


def find(data_dir=None) -> Path | None:
    """The first folder that holds any of the four files, in the documented order."""
    for folder in _candidates(data_dir):
        if any(_find_file(folder, n) for n in FILES.values()):
            return folder
    return None


def load(data_dir=None, download: bool = False) -> FashionMNIST:
    """Load Fashion-MNIST from data_dir, $CSNN_DATA, Debian's package, or a download."""
    folder = find(data_dir)
    if folder is None and download:
        import torchvision  # only needed for the download

        root = Path(data_dir or ".").expanduser()
        torchvision.datasets.FashionMNIST(root=str(root), train=True, download=True)
        torchvision.datasets.FashionMNIST(root=str(root), train=False, download=True)
        folder = root / "FashionMNIST" / "raw"
    if folder is None:
        where, named = _candidates(data_dir)[0], _named_source(data_dir)
        if named and where.exists() and not where.is_dir():
            raise DataError(f"{where} ({named}): is a file, not a folder; name the folder that holds the four "
                            "*-idx?-ubyte[.gz] files")
        if named:
            raise DataError(f"{where} ({named}): no Fashion-MNIST files there "
                            f"({'the folder does not exist' if not where.exists() else 'nor in FashionMNIST/raw'}); "
                            f"{HOW_TO_GET}")
        searched = ", ".join(str(p) for p in _candidates(data_dir))
        raise DataError(f"Fashion-MNIST not found (looked in {searched}); {HOW_TO_GET}")
    arrays = {}
    for key, name in FILES.items():
        path = _find_file(folder, name)
        if path is None:
            raise DataError(f"{folder / name}[.gz]: missing (the folder has other Fashion-MNIST files); {HOW_TO_GET}")
        arrays[key] = (read_idx(path, 3 if key.endswith("x") else 1), path)
    for split in ("train", "test"):
        (x, xpath), (y, ypath) = arrays[split + "_x"], arrays[split + "_y"]
        if len(x) != len(y):
            raise DataError(f"{ypath}: {len(y)} labels for {len(x)} images in {xpath}")
        if len(y) and y.max() > 9:
            raise DataError(f"{ypath}: label {int(y.max())} out of range, allowed 0..9")
        if len(x) == 0:
            raise DataError(f"{xpath}: holds no images")
    n_train, n_test = len(arrays["train_y"][0]), len(arrays["test_y"][0])
    if n_train <= n_test:  # Fashion-MNIST has 60000 training and 10000 test images
        raise DataError(f"{arrays['train_x'][1]}: {n_train} training images but {n_test} test images in "
                        f"{arrays['test_x'][1]}: the training split must be the larger (Fashion-MNIST: 60000 "
                        "and 10000); are the train-* and t10k-* files swapped?")
    t = {k: torch.from_numpy(a.copy()) for k, (a, _) in arrays.items()}
    digest = hashlib.sha256()
    for k in ("train_x", "train_y", "test_x", "test_y"):
        digest.update(arrays[k][0].tobytes())
    return FashionMNIST(t["train_x"], t["train_y"].long(), t["test_x"], t["test_y"].long(), str(folder),
                        digest.hexdigest()[:16])


def stratified_subset(y: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of a seeded subset of `size` items with the classes in proportion."""
    if size <= 0 or size >= len(y):
        return torch.randperm(len(y), generator=generator)
    # Sort a random permutation by class, then take every k-th item: each class
    # gets its share of the subset (within one item), in random order.
    perm = torch.randperm(len(y), generator=generator)
    by_class = perm[torch.argsort(y[perm], stable=True)]
    picks = torch.floor(torch.arange(size, dtype=torch.float64) * len(y) / size).long()
    chosen = by_class[picks]
    return chosen[torch.randperm(size, generator=generator)]


def split(data: FashionMNIST, val_size: int = 0, train_size: int = 0, test_size: int = 0,
          seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{'train', 'val' (when val_size > 0), 'test'}: (images, labels), seeded and stratified.

    The validation set is held out of the 60k training images first; train_size
    and test_size (0 = all) then take stratified subsets for quick runs.
    """
    g = torch.Generator().manual_seed(seed)
    if val_size >= len(data.train_y):
        raise ValueError(f"val_size {val_size} must be smaller than the {len(data.train_y)} training images")
    val_idx = stratified_subset(data.train_y, val_size, g) if val_size > 0 else torch.zeros(0, dtype=torch.long)
    rest = torch.ones(len(data.train_y), dtype=torch.bool)
    rest[val_idx] = False
    rest_idx = torch.nonzero(rest).squeeze(1)
    if train_size > len(rest_idx):
        raise ValueError(f"train_size {train_size} is more than the {len(rest_idx)} training images"
                         + (f" left after val_size {val_size}" if val_size else ""))
    if test_size > len(data.test_y):
        raise ValueError(f"test_size {test_size} is more than the {len(data.test_y)} test images")
    train_idx = rest_idx[stratified_subset(data.train_y[rest_idx], train_size, g)]
    test_idx = torch.sort(stratified_subset(data.test_y, test_size, g)).values
    out = {"train": (data.train_x[train_idx], data.train_y[train_idx])}
    if val_size > 0:
        out["val"] = (data.train_x[val_idx], data.train_y[val_idx])
    out["test"] = (data.test_x[test_idx], data.test_y[test_idx])
    return out


def batch_order(n: int, batch_size: int, generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
    """The indices of one training epoch as [batches, batch_size], on `device`, shuffled by the CPU
    `generator` (kept in checkpoints); the last partial batch is dropped as the tutorial's DataLoader
    does, unless it is the only one. Copied to a GPU without a host sync (pinned, non-blocking)."""
    size = min(batch_size, n) or 1
    order = torch.randperm(n, generator=generator)[: n - n % size]
    return _to_device(order, device).view(-1, size)


def _to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A CPU tensor on `device`, copied to a GPU without a host sync (pinned, non-blocking)."""
    return t.pin_memory().to(device, non_blocking=True) if torch.device(device).type == "cuda" else t


def to_input(x: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float [N, 1, 28, 28] in [0, 1], as torchvision's ToTensor."""
    return x.unsqueeze(1).float().div_(255)


# --- Augmentation of the training images (TrainConfig.augment) ---------------------------------------
# Each transform is a row: how many random integers it takes per image, how they are drawn, and how they
# are applied. draw(n, generator) runs on the CPU, from the run's batch-order generator after each epoch's
# order (so a seed gives the same images on any device, and a resumed run, which restores that generator
# from its checkpoint, draws what the straight run drew). apply(x, p) takes uint8 images [N, 28, 28] and
# p int64 [N, columns] on the training device and is plain tensor ops with shapes fixed by N alone: no
# host sync, nothing data-dependent in a shape, so a CUDA graph captures it with the training step.
@dataclass(frozen=True)
class Transform:
    columns: int
    draw: Callable[[int, torch.Generator], torch.Tensor]
    apply: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


SHIFT = 2  # crop: torchvision's RandomCrop(28, padding=2), a shift of -2..2 pixels each way, zero padded
ERASE = {"p": 0.5, "scale": (0.02, 0.33), "ratio": (0.3, 3.3)}  # torchvision's RandomErasing defaults, value 0


def _crop(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:  # p: (dy, dx) in -SHIFT..SHIFT
    n, h, w = x.shape
    padded = torch.nn.functional.pad(x, (SHIFT,) * 4)
    rows = torch.arange(h, device=x.device) + SHIFT + p[:, :1]  # [N, 28]: padded row read by each output row
    cols = torch.arange(w, device=x.device) + SHIFT + p[:, 1:]
    return padded[torch.arange(n, device=x.device)[:, None, None], rows[:, :, None], cols[:, None, :]]


def _flip(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:  # p: 1 to mirror left-right
    return torch.where(p.view(-1, 1, 1).bool(), x.flip(2), x)


def _draw_erase(n: int, g: torch.Generator) -> torch.Tensor:
    """(top, left, height, width) of a zeroed rectangle per image, 0 x 0 for the images not erased.
    As torchvision's RandomErasing, but a rectangle too tall or wide is clipped to 27 pixels
    rather than drawn again (a retry loop has no fixed number of draws)."""
    u = torch.rand(n, 5, generator=g, dtype=torch.float64)
    (s0, s1), (r0, r1) = ERASE["scale"], ERASE["ratio"]
    area = 28 * 28 * (s0 + (s1 - s0) * u[:, 1])
    ratio = torch.exp(math.log(r0) + (math.log(r1) - math.log(r0)) * u[:, 2])
    on = u[:, 0] < ERASE["p"]
    h = (area * ratio).sqrt().round().clamp(1, 27) * on
    w = (area / ratio).sqrt().round().clamp(1, 27) * on
    top, left = (u[:, 3] * (29 - h)).floor(), (u[:, 4] * (29 - w)).floor()
    return torch.stack([top, left, h, w], 1).long()


def _erase(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    i = torch.arange(x.shape[1], device=x.device)
    rows = (i >= p[:, :1]) & (i < p[:, :1] + p[:, 2:3])  # [N, 28]
    cols = (i >= p[:, 1:2]) & (i < p[:, 1:2] + p[:, 3:4])
    return x.masked_fill(rows[:, :, None] & cols[:, None, :], 0)


AUGMENTS = {
    "crop": Transform(2, lambda n, g: torch.randint(-SHIFT, SHIFT + 1, (n, 2), generator=g), _crop),
    "flip": Transform(1, lambda n, g: torch.randint(0, 2, (n, 1), generator=g), _flip),
    "erase": Transform(4, _draw_erase, _erase),
}
assert tuple(AUGMENTS) == config.AUGMENTS, "csnn.config.AUGMENTS names these rows, in the order applied"


def augment_params(names: tuple[str, ...], n: int, generator: torch.Generator, device="cpu") -> torch.Tensor:
    """The random integers of the transforms `names` (config.augment_names) for n images: int64 [n, columns]."""
    return _to_device(torch.cat([AUGMENTS[k].draw(n, generator) for k in names], 1), device)


def augment(x: torch.Tensor, params: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
    """uint8 images [N, 28, 28] transformed by `names` with their augment_params rows (on x's device)."""
    c = 0
    for k in names:
        t = AUGMENTS[k]
        x, c = t.apply(x, params[:, c:c + t.columns]), c + t.columns
    return x
