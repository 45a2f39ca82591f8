import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from csnn import data as fmnist


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    """A real IDX file of unsigned bytes: magic 0x0800+ndim, big-endian dims, data."""
    array = np.asarray(array, dtype=np.uint8)
    raw = (0x0800 + array.ndim).to_bytes(4, "big")
    raw += b"".join(int(d).to_bytes(4, "big") for d in array.shape) + array.tobytes()
    path = Path(str(path) + ".gz") if gz else Path(path)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def write_dataset(folder: Path, n_train: int = 64, n_test: int = 32, gz: bool = False, seed: int = 0) -> Path:
    """A small Fashion-MNIST-shaped folder: the four IDX files, balanced labels."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, gz)
    return folder


@pytest.fixture(scope="session")
def real_data() -> fmnist.FashionMNIST:
    """The real Fashion-MNIST (Debian's package, installed by .ci/run). Tests
    that train take small stratified subsets of it."""
    return fmnist.load(fmnist.DEBIAN_DIR)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_data_dir(real_data, tmp_path_factory) -> Path:
    """Real Fashion-MNIST images, few of them: 600 training and 200 test images
    (stratified), written as IDX files, for studies that must run in seconds."""
    folder = tmp_path_factory.mktemp("tiny-fmnist")
    s = fmnist.split(real_data, train_size=600, test_size=200, seed=0)
    for prefix, (x, y) in (("train", s["train"]), ("t10k", s["test"])):
        write_idx(folder / f"{prefix}-images-idx3-ubyte", x.numpy(), gz=True)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", y.numpy(), gz=True)
    return folder
