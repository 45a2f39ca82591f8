import gzip

import numpy as np
import pytest
import torch

from csnn import data as fmnist
from conftest import write_dataset
from csnn.data import write_idx


@pytest.mark.parametrize("gz", [False, True])
def test_read_small_idx_files(tmp_path, gz):
    write_dataset(tmp_path, 64, 32, gz=gz)
    d = fmnist.load(tmp_path)
    assert d.train_x.shape == (64, 28, 28) and d.train_x.dtype == torch.uint8
    assert d.test_y.tolist() == [i % 10 for i in range(32)]
    raw = (gzip.decompress if gz else bytes)(
        (tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else ""))).read_bytes())
    assert d.train_x.numpy().tobytes() == raw[16:]


def test_torchvision_layout_and_env_var(tmp_path, monkeypatch):
    write_dataset(tmp_path / "root" / "FashionMNIST" / "raw")
    assert fmnist.load(tmp_path / "root").source == str(tmp_path / "root" / "FashionMNIST" / "raw")
    monkeypatch.setenv("CSNN_DATA", str(tmp_path / "root"))
    assert fmnist.find(None) == tmp_path / "root" / "FashionMNIST" / "raw"


def test_bad_magic(tmp_path):
    write_dataset(tmp_path)
    p = tmp_path / "train-labels-idx1-ubyte"
    raw = bytearray(p.read_bytes()); raw[3] = 3; p.write_bytes(bytes(raw))
    with pytest.raises(fmnist.DataError, match="train-labels-idx1-ubyte: bad magic number 0x00000803"):
        fmnist.load(tmp_path)


def test_truncated_file(tmp_path):
    write_dataset(tmp_path)
    p = tmp_path / "t10k-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(fmnist.DataError, match=r"t10k-images-idx3-ubyte: dimensions \[32, 28, 28\] need 25088 bytes"):
        fmnist.load(tmp_path)


def test_truncated_header_and_corrupt_gzip(tmp_path):
    write_dataset(tmp_path, gz=True)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(fmnist.DataError, match="train-images-idx3-ubyte.gz: cannot read"):
        fmnist.load(tmp_path)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08"))
    with pytest.raises(fmnist.DataError, match="truncated header"):
        fmnist.load(tmp_path)


def test_wrong_image_size(tmp_path):
    write_dataset(tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((64, 32, 32)))
    with pytest.raises(fmnist.DataError, match="images are 32x32, expected 28x28"):
        fmnist.load(tmp_path)


def test_label_range_and_count_mismatch(tmp_path):
    write_dataset(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.full(64, 12))
    with pytest.raises(fmnist.DataError, match="label 12 out of range, allowed 0..9"):
        fmnist.load(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(63))
    with pytest.raises(fmnist.DataError, match="63 labels for 64 images"):
        fmnist.load(tmp_path)


def test_missing_file_and_no_data(tmp_path, monkeypatch):
    write_dataset(tmp_path / "d")
    (tmp_path / "d" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(fmnist.DataError, match="t10k-labels-idx1-ubyte.*missing"):
        fmnist.load(tmp_path / "d")
    monkeypatch.delenv("CSNN_DATA", raising=False)
    monkeypatch.setattr(fmnist, "DEBIAN_DIR", tmp_path / "nowhere")
    with pytest.raises(fmnist.DataError, match="apt-get install dataset-fashion-mnist.*--download"):
        fmnist.load(tmp_path / "empty")


def test_split_disjoint_seeded_stratified(real_data):
    s = fmnist.split(real_data, val_size=1000, train_size=2000, test_size=500, seed=3)
    assert s["val"][1].bincount().tolist() == [100] * 10
    assert s["train"][1].bincount().tolist() == [200] * 10
    assert s["test"][1].bincount().tolist() == [50] * 10
    # disjoint: no training image is also a validation image (compare pixels)
    key = lambda x: {bytes(r) for r in x.reshape(len(x), -1).numpy()}
    assert not key(s["train"][0]) & key(s["val"][0])
    again = fmnist.split(real_data, val_size=1000, train_size=2000, test_size=500, seed=3)
    assert all(torch.equal(s[k][0], again[k][0]) for k in s)
    other = fmnist.split(real_data, val_size=1000, train_size=2000, test_size=500, seed=4)
    assert not torch.equal(s["val"][0], other["val"][0])
    full = fmnist.split(real_data)
    assert set(full) == {"train", "test"} and len(full["train"][1]) == 60000 and len(full["test"][1]) == 10000


def test_real_debian_data_known_figures(real_data):
    assert real_data.train_x.shape == (60000, 28, 28) and real_data.test_x.shape == (10000, 28, 28)
    x = real_data.train_x.double() / 255
    assert abs(x.mean().item() - 0.2860406) < 1e-6
    assert abs(x.std().item() - 0.3530242) < 1e-6
    assert real_data.train_y.bincount().tolist() == [6000] * 10


def test_batch_order_covers_each_image_once_and_drops_the_last_partial_batch():
    b = fmnist.batch_order(300, 128, torch.Generator().manual_seed(0))
    assert b.shape == (2, 128) and len(set(b.flatten().tolist())) == 256 and b.max() < 300
    assert not torch.equal(b.flatten(), torch.arange(256))  # shuffled
    assert torch.equal(b, fmnist.batch_order(300, 128, torch.Generator().manual_seed(0)))
    assert sorted(fmnist.batch_order(50, 128, torch.Generator()).flatten().tolist()) == list(range(50))  # the only batch


def test_the_fingerprint_is_of_the_data_not_the_files(tmp_path):
    a = fmnist.load(write_dataset(tmp_path / "a", 64, 32, gz=False))
    b = fmnist.load(write_dataset(tmp_path / "b", 64, 32, gz=True))  # the same images, gzipped
    c = fmnist.load(write_dataset(tmp_path / "c", 64, 32, seed=1))
    assert len(a.fingerprint) == 16 and a.fingerprint == b.fingerprint != c.fingerprint
