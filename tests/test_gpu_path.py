"""The parts of the GPU path that a CPU can check: float32 evaluation, the scaler of a
CPU checkpoint, the recorded run, reproduce's tolerance, and gpucheck's refusal."""
import subprocess
import sys

import pandas as pd
import pytest
import torch

from conftest import ROOT, env, write_dataset
from csnn import data as fmnist
from csnn.config import TrainConfig
from csnn.model import CSNN
from csnn.train import evaluate, fit, restore_checkpoint
from study.reproduce import compare, exact_expected


def test_evaluation_is_float32_inside_an_autocast_region():
    torch.manual_seed(0)
    net = CSNN(T=2, channels=4)
    x = torch.randint(0, 256, (40, 28, 28), dtype=torch.uint8)
    y = torch.arange(40) % 10
    plain = evaluate(net, x, y, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as a caller training with AMP would be
        assert evaluate(net, x, y, 16) == plain


def test_a_cpu_checkpoint_loads_into_an_enabled_scaler(tmp_path):
    """A CPU run saves a disabled GradScaler's empty state; a GPU run's scaler is
    enabled and refuses an empty state. An enabled CPU scaler refuses it the same way."""
    data = fmnist.load(write_dataset(tmp_path / "data", n_train=100, n_test=20))
    cfg = TrainConfig(T=2, channels=2, batch_size=50, epochs=2, device="cpu", compile=False)
    fit(cfg, data, tmp_path / "run", stop_after=1)
    ckpt = tmp_path / "run" / "checkpoint_latest.pth"
    assert torch.load(ckpt, weights_only=False)["scaler"] == {}
    enabled = torch.amp.GradScaler("cpu", enabled=True)
    with pytest.raises(RuntimeError, match="empty"):
        enabled.load_state_dict({})  # what the old restore did
    epoch = restore_checkpoint(ckpt, cfg, {"scaler": enabled}, torch.Generator(), torch.device("cpu"))
    assert epoch == 1 and enabled.get_scale() == 65536.0


def recorded_run(device: str) -> pd.DataFrame:
    return pd.DataFrame([{"epoch": 0, "test_acc": 0.80, "test_loss": 0.030, "synops_per_image": 100_000.0,
                          "fr_2": 0.10, "lr": 0.1, "run_device": device, "neuron_impl": "spikingjelly-triton"}])


def test_reproduce_chooses_its_tolerance_from_the_recorded_run():
    cuda, cpu = recorded_run("cuda:0 (NVIDIA H200)"), recorded_run("cpu")
    near = [{"epoch": 0, "test_acc": 0.81, "test_loss": 0.031, "synops_per_image": 104_000.0, "fr_2": 0.11,
             "lr": 0.1, "run_device": "cpu", "train_img_s": 5.0}]
    assert not exact_expected(cuda, torch.device("cpu"), "auto")  # recorded on CUDA: tolerances, even on the CPU
    assert exact_expected(cpu, torch.device("cpu"), "auto")
    unrecorded = cpu.drop(columns="run_device")  # an older study: the configured device decides
    assert exact_expected(unrecorded, torch.device("cpu"), "cpu") and not exact_expected(unrecorded, torch.device("cpu"), "auto")

    table = compare(cuda, near, exact=False).set_index("metric")
    assert table["ok"].all() and set(table.index) == {"test_acc", "test_loss", "synops_per_image", "fr_2", "lr"}
    assert table.loc["synops_per_image", "tolerance"] == "0 + 5%"  # 4,000 apart: a count, relative
    far = [{**near[0], "test_acc": 0.85, "synops_per_image": 120_000.0, "test_loss": 0.04, "fr_2": 0.13}]
    table = compare(cuda, far, exact=False).set_index("metric")
    assert list(table.index[~table["ok"]]) == ["test_acc", "test_loss", "synops_per_image", "fr_2"]
    exact = compare(cpu, near, exact=True).set_index("metric")
    assert list(exact.index[exact["ok"]]) == ["lr"]  # on the CPU only equal values pass


def test_gpucheck_says_there_is_no_cuda_device():
    # CUDA hidden, so that this runs the same on a GPU machine
    p = subprocess.run([sys.executable, "-m", "csnn.gpucheck"], cwd=ROOT, env={**env(), "CUDA_VISIBLE_DEVICES": ""},
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "error: no CUDA device" in p.stderr


def test_the_bench_equivalence_check_catches_a_wrong_neuron():
    """Every layer's spikes and the gradients, not just the (often silent) output."""
    from spikingjelly.activation_based import surrogate
    from spikingjelly.activation_based.examples.conv_fashion_mnist import CSNN as Ref

    from csnn.bench import check_equivalence

    cfg, cpu = TrainConfig(T=2, channels=8, device="cpu"), torch.device("cpu")
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert check_equivalence(Ref, cfg, x, cpu, compiled=True)["ok"]
    # 4 channels: the deeper layers stay silent on these inputs, where any model agrees, so it is no check
    silent = check_equivalence(Ref, TrainConfig(T=2, channels=4, device="cpu"), x, cpu, compiled=True)
    assert not silent["ok"] and silent["differing_spikes"] == 0 and min(silent["lowest_firing_rates"]) < 0.001

    class Wrong(Ref):  # the reference with another surrogate in one layer: same spikes, other gradients
        def __init__(self, T, channels):
            super().__init__(T=T, channels=channels)
            self.conv_fc[6].surrogate_function = surrogate.ATan(alpha=3.0)

    wrong = check_equivalence(Wrong, cfg, x, cpu, compiled=True)
    assert not wrong["ok"] and wrong["differing_spikes"] == 0 and wrong["grad_rel_err"] > 0.01


def test_a_cupy_study_is_refused_where_it_cannot_run(tmp_path, capsys):
    import importlib.util

    import yaml

    from study.run import main

    for name in ("quick", "fmnist"):
        space = yaml.safe_load((ROOT / "search_spaces" / f"{name}.yaml").read_text())
        space["train"]["backend"] = "cupy"
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(space))
    assert main([str(tmp_path / "quick.yaml"), "--dry-run"]) == 2  # its trials have no GPU
    assert "resources.gpus_per_trial: 0 is not allowed with backend cupy" in capsys.readouterr().err
    assert importlib.util.find_spec("cupy") is None  # CI has no CuPy: this is what it checks
    assert main([str(tmp_path / "fmnist.yaml"), "--dry-run"]) == 2
    assert "train.backend: backend 'cupy' needs CuPy, which is not installed" in capsys.readouterr().err
