import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from csnn.spikes import grid

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "csnn.train", *args], cwd=cwd, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=600)


@pytest.fixture
def run_here(capsys, monkeypatch):
    """The same command line as run(), its main(argv) in this process: no interpreter start and imports a call
    (test_cli_clear_errors and test_bad_inputs run it as a process)."""
    from conftest import in_process
    from csnn import cli

    monkeypatch.delenv("CSNN_DATA", raising=False)

    def call(*args, cwd):
        monkeypatch.chdir(cwd)
        return in_process(capsys, cli.main, *args)
    return call


def test_cli_trains_one_epoch_then_renders_encoder_spikes(tmp_path, run_here):
    p = run_here("-T", "2", "-device", "cpu", "-b", "64", "-epochs", "1", "-opt", "sgd", "-lr", "0.1", "-channels",
                 "12", "-train-size", "640", "-test-size", "256", "-out-dir", str(tmp_path / "logs"), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    out = tmp_path / "logs" / "T2_b64_sgd_lr0.1_c12"
    assert "epoch = 0, train_loss =" in p.stdout and "test_acc =" in p.stdout
    assert (out / "checkpoint_latest.pth").is_file() and (out / "checkpoint_max.pth").is_file()
    ckpt = torch.load(out / "checkpoint_max.pth", weights_only=False)  # the tutorial's keys
    assert {"net", "optimizer", "lr_scheduler", "epoch"} <= set(ckpt)
    assert ckpt["max_test_acc"] == ckpt["metrics"]["test_acc"] > 0.1
    assert f"max_test_acc ={ckpt['max_test_acc']: .4f}" in p.stdout
    assert list(out.glob("events.out.tfevents.*")) and "-channels 12" in (out / "args.txt").read_text()

    p = run_here("-device", "cpu", "-b", "3", "-resume", str(out / "checkpoint_latest.pth"),
                 "-save-es", str(tmp_path / "es"), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    vis = tmp_path / "es" / "visualization"
    assert sorted(d.name for d in vis.iterdir()) == ["0", "1", "2"]
    for i in range(3):
        assert sorted(f.name for f in (vis / str(i)).iterdir()) == sorted(
            ["input.png"] + [f"s_{t}.{e}" for t in range(2) for e in ("png", "pdf", "svg")])
        img = np.asarray(Image.open(vis / str(i) / "input.png"))
        assert img.shape == (112, 112) and img.std() > 10  # a real 4x image, not blank
        spikes = np.asarray(Image.open(vis / str(i) / "s_0.png").convert("L"))
        assert spikes.shape == (1600, 2400) and len(np.unique(spikes)) > 1
        assert (vis / str(i) / "s_1.pdf").read_bytes()[:4] == b"%PDF"
        assert b"<svg" in (vis / str(i) / "s_1.svg").read_bytes()[:1000]

    p = run_here("-device", "cpu", "-b", "3", "-resume", str(out / "checkpoint_latest.pth"),
                 "-save-es", str(tmp_path / "es"), cwd=tmp_path)
    assert p.returncode == 2 and "already exists and is not empty" in p.stderr


def test_cli_trains_and_resumes_another_network_with_its_flags(tmp_path, run_here):
    """The network's keys, augment and loss as the tutorial's kind of flag (issue 34: -resume of such a
    checkpoint was refused as another configuration, the CLI having no flag to give them); a run of another
    network has a folder of its own; -tau with the IF neuron is refused, not ignored."""
    flags = ["-T", "2", "-device", "cpu", "-b", "64", "-opt", "adam", "-lr", "0.003", "-channels", "4",
             "-train-size", "256", "-test-size", "128", "-out-dir", str(tmp_path / "logs"), "-neuron", "plif",
             "-tau", "3", "-pooling", "avg", "-dropout", "0.2", "-augment", "crop+flip", "-loss", "ce",
             "-surrogate", "sigmoid", "-detach-reset"]
    p = run_here(*flags, "-epochs", "2", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    out = tmp_path / "logs" / ("T2_b64_adam_lr0.003_c4_neuron-plif_tau-3.0_detach-reset-True_surrogate-sigmoid"
                               "_pooling-avg_dropout-0.2_augment-crop+flip_loss-ce")
    ckpt = torch.load(out / "checkpoint_latest.pth", weights_only=False)
    assert {k: ckpt["config"][k] for k in ("neuron", "tau", "pooling", "dropout", "augment", "loss", "surrogate",
                                          "detach_reset")} == {"neuron": "plif", "tau": 3.0, "pooling": "avg",
                                                               "dropout": 0.2, "augment": "crop+flip", "loss": "ce",
                                                               "surrogate": "sigmoid", "detach_reset": True}
    assert any(k.endswith(".w") for k in ckpt["net"])  # PLIF's tau, a parameter
    ckpt["epoch"] = 0  # as if stopped after its first epoch
    torch.save(ckpt, out / "checkpoint_latest.pth")
    p = run_here(*flags, "-epochs", "2", "-resume", str(out / "checkpoint_latest.pth"), cwd=tmp_path)
    assert p.returncode == 0 and "epoch = 1," in p.stdout and "epoch = 0," not in p.stdout, p.stderr
    # the same checkpoint with the tutorial's network: refused, naming what differs
    tutorial = flags[:flags.index("-neuron")]
    p = run_here(*tutorial, "-epochs", "2", "-resume", str(out / "checkpoint_latest.pth"), cwd=tmp_path)
    assert p.returncode == 2 and "neuron 'plif' in the checkpoint, 'if' now" in p.stderr, p.stderr
    p = run_here(*tutorial, "-epochs", "1", "-tau", "3", cwd=tmp_path)
    assert p.returncode == 2 and "error: -tau 3.0: the if neuron has no time constant" in p.stderr, p.stderr
    p = run_here(*tutorial, "-epochs", "1", "-augment", "rotate", cwd=tmp_path)
    assert p.returncode == 2 and "error: -augment: 'rotate' is not allowed" in p.stderr, p.stderr


def test_cli_clear_errors(tmp_path):
    p = run("-device", "cuda:99", "-epochs", "1", cwd=tmp_path)  # no GPU here, or not that many
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "no CUDA GPU is available" in p.stderr or "CUDA GPU(s)" in p.stderr
    p = run("-device", "cpu", "-cupy", "-epochs", "1", cwd=tmp_path)
    assert p.returncode == 2 and "error: -cupy: runs on a CUDA GPU, and -device is 'cpu'" in p.stderr  # its flags
    p = run("-device", "cpu", "-lr", "-1", cwd=tmp_path)
    assert p.returncode == 2 and "error: -lr: -1.0 is not allowed" in p.stderr  # the flag, not the field


def test_grid_is_exact():
    assert grid(128) == (16, 8) and grid(16) == (2, 8) and grid(12) == (2, 6) and grid(5) == (1, 5)


@pytest.mark.smoke  # .ci/run's newest-versions set
def test_cli_turns_cuda_graphs_off_and_a_run_resumes_either_way(tmp_path, run_here):
    """-no-cuda-graphs is how the step runs, not what it computes: a run resumes with or without it."""
    args = ("-T", "2", "-device", "cpu", "-b", "64", "-epochs", "2", "-channels", "4", "-train-size", "320",
            "-test-size", "128", "-out-dir", str(tmp_path / "logs"))
    p = run_here(*args, "-no-cuda-graphs", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    out = tmp_path / "logs" / "T2_b64_sgd_lr0.1_c4"
    ckpt = torch.load(out / "checkpoint_latest.pth", weights_only=False)
    assert ckpt["config"]["cuda_graphs"] is False and ckpt["metrics"]["cuda_graphs_used"] is False
    ckpt["epoch"] = 0  # as if stopped after its first epoch
    torch.save(ckpt, out / "checkpoint_latest.pth")
    p = run_here(*args, "-resume", str(out / "checkpoint_latest.pth"), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "epoch = 1," in p.stdout and "epoch = 0," not in p.stdout
