"""The parts of the GPU path that a CPU can check: float32 evaluation, the scaler of a
CPU checkpoint, the recorded run, reproduce's tolerance, gpucheck's refusal and machinery, and
the CUDA graph check and fallback (through a capture function of the test's own)."""
import contextlib
import json
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
    def gpucheck(*args):
        return subprocess.run([sys.executable, "-m", "csnn.gpucheck", *args], cwd=ROOT,
                              env={**env(), "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True, timeout=120)

    p = gpucheck()
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "error: no CUDA device" in p.stderr
    p = gpucheck("--skip", "speed,concurency")  # a misspelt check would have run, and been listed as skipped
    assert p.returncode == 2 and "--skip speed,concurency: no check concurency; checks: tests, graphs," in p.stderr


def test_gpucheck_help_says_what_to_run_first_and_how_long_each_phase_takes():
    """A first GPU may be at hand for minutes only: --quick holds the checks that decide whether studies can run.
    The help and docs/gpu-and-clusters.md give the same command and minutes."""
    from csnn import gpucheck

    p = subprocess.run([sys.executable, "-m", "csnn.gpucheck", "--help"], cwd=ROOT, env=env(), capture_output=True,
                       text=True, timeout=120)
    text = " ".join(p.stdout.split())
    first = "python -m csnn.gpucheck --quick --out gpucheck-quick.json"
    assert p.returncode == 0 and f"Run first: {first} (about 3 minutes: tests, graphs, speed, study)" in text
    assert "--quick only the checks that decide whether studies can run" in text and "--rest only the other" in text
    assert "then --rest (about 2 minutes:" in text and "no option runs both (about 5 minutes)" in text
    assert set(gpucheck.QUICK) == {"tests", "graphs", "speed", "study"} and gpucheck.CHECKS[:4] == gpucheck.QUICK
    assert sum(gpucheck.MINUTES[k] for k in ("quick", "rest")) == gpucheck.MINUTES["all"] <= 5
    docs = " ".join((ROOT / "docs" / "gpu-and-clusters.md").read_text().split())
    assert first in docs and "about 3 minutes" in docs and "`--rest`" in docs and "about 5 minutes" in docs


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


def test_gpucheck_fails_its_tests_check_when_the_gpu_tests_skip(tmp_path):
    """pytest exits 0 when every test skipped (as tests/test_gpu.py does here): the check must not pass."""
    from csnn import gpucheck

    result = {"failed": []}
    gpucheck.run_check(result, "tests", gpucheck.check_tests)
    assert result["failed"] == ["tests"] and "GPU tests did not all run" in result["tests"]["error"]
    assert "skipped" in result["tests"]["error"]
    # the tests read the data named by --data-dir
    (tmp_path / "test_env.py").write_text(
        f"import os\ndef test_data():\n    assert os.environ['CSNN_DATA'] == {str(tmp_path / 'd')!r}\n")
    assert gpucheck.check_tests(tmp_path / "d", tmp_path / "test_env.py")["passed"] == 1


def test_a_hanging_gpu_test_fails_the_check_in_its_time_limit(tmp_path, monkeypatch):
    from csnn import gpucheck

    (tmp_path / "test_hang.py").write_text("import time\ndef test_hang():\n    time.sleep(600)\n")
    monkeypatch.setattr(gpucheck, "TESTS_LIMIT_S", 3)
    result = {"failed": []}
    gpucheck.run_check(result, "tests", gpucheck.check_tests, None, tmp_path / "test_hang.py")
    assert result["failed"] == ["tests"] and "TimeoutExpired" in result["tests"]["error"]
    assert result["tests"]["check_s"] < 60


def test_a_silent_trainer_fails_in_its_time_limit():
    from csnn import gpucheck

    p = gpucheck.spawn([sys.executable, "-c", "import sys, time; print('started', file=sys.stderr, flush=True); "
                        "time.sleep(600)"], env())
    try:
        with pytest.raises(TimeoutError, match="printed nothing in 1 s: started"):
            gpucheck.read_line(p, 1.0)
    finally:
        gpucheck.stop_workers([p])


def test_a_gpucheck_check_keeps_its_figures_when_it_fails_and_says_what_is_running(tmp_path):
    from csnn import gpucheck

    out = tmp_path / "gpucheck.json"
    result = {"failed": []}

    def epoch():  # what the JSON says while a check runs (and so after a kill at the time limit)
        assert json.loads(out.read_text())["running"] == "epoch"
        gpucheck.require(False, "one epoch reached test accuracy 0.5, under 0.8", {"train_img_s": 9.0, "test_acc": 0.5})

    gpucheck.run_check(result, "epoch", epoch, out=out)
    written = json.loads(out.read_text())
    assert written["failed"] == ["epoch"] and "running" not in written
    assert written["epoch"]["test_acc"] == 0.5 and "under 0.8" in written["epoch"]["error"]
    # a check that passes its asserts but leaves out one of its FIGURES fails too
    gpucheck.run_check(result, "busy", lambda: {"eager": {"busy_share": 0.4}, "graphs": {}}, out=out)
    assert result["failed"] == ["epoch", "busy"] and "busy left no graphs.busy_share" in result["busy"]["error"]
    gpucheck.run_check(result, "counts", lambda: {"cuda": {"synops_per_image": 1.0}})
    assert result["failed"] == ["epoch", "busy"] and "error" not in result["counts"]


def test_a_restored_optimizer_keeps_the_fused_step_of_this_device(tmp_path):
    """load_state_dict takes fused/foreach from the checkpoint's groups: a CPU run's checkpoint resumed on a
    GPU left the fused optimizer unfused, and GradScaler, which hands a fused step its device-side inf skip,
    then failed. The CPU's own fused SGD and scaler show the same."""
    data = fmnist.load(write_dataset(tmp_path / "data", n_train=100, n_test=20))
    cfg = TrainConfig(T=2, channels=2, batch_size=50, epochs=2, device="cpu", compile=False)
    fit(cfg, data, tmp_path / "run", stop_after=1)  # the plain SGD of a CPU run
    net = CSNN(cfg.T, cfg.channels)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, fused=True)
    scaler = torch.amp.GradScaler("cpu")
    restore_checkpoint(tmp_path / "run" / "checkpoint_latest.pth", cfg, {"net": net, "optimizer": opt},
                       torch.Generator(), torch.device("cpu"))
    assert opt.param_groups[0]["fused"] is True and opt.param_groups[0]["lr"] == pytest.approx(cfg.lr / 2)
    before = [p.detach().clone() for p in net.parameters()]
    scaler.scale(net(torch.rand(4, 1, 28, 28)).sum() + sum(p.sum() for p in net.parameters())).backward()
    scaler.step(opt)
    scaler.update()
    assert all(not torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_bench_times_a_model_that_fails_the_equivalence_check_only_when_asked():
    """A GPU check (time_anyway) keeps both the timing and the failure; the command line fails at once.
    At 4 channels a deeper layer hardly fires on the check's inputs: too silent to compare, and said so."""
    from csnn import bench

    small = dict(device="cpu", channels=4, train_images=256, eval_images=256, reps=1, compile=False)
    with pytest.raises(bench.EquivalenceError, match="too silent to compare") as failed:
        bench.run(**small)
    assert failed.value.result is None
    with pytest.raises(bench.EquivalenceError, match="too silent to compare") as failed:
        bench.run(**small, time_anyway=True)
    assert failed.value.result["ours_train_img_s"] > 0 and failed.value.result["ref_eval_img_s"] > 0
    assert not failed.value.result["equivalence"]["ok"]


# CUDA graphs that check themselves and fall back (csnn.train.cuda_graph), on the CPU: the same check and
# fallback run as on a GPU, with `capture` (the one seam) handing back these graphs instead of a CUDA one.
def faithful(fn, static):
    """A 'graph' whose replay is the step itself."""
    return lambda: fn(*static)


def replay_raises(fn, static):
    def replay():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    return replay


def replay_reads_another_batch(fn, static):
    """A replay that computes something else: the step on other images, as a graph reading a stale address would
    (training: the next images of the 96; evaluation: the batch's images in negative)."""
    first = static[0]
    return lambda: fn((first + 1) % 96 if first.dim() == 1 else 255 - first, *static[1:])


def capture_fails(fn, static):
    raise RuntimeError("CUDA error: operation not permitted when stream is capturing")


def capture_out_of_memory(fn, static):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def replay_out_of_memory(fn, static):
    """Out of memory in the check (after its eager step, which the fallback must undo before training the batch)."""
    def replay():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return replay


def small_training(graphs, capture=None, optimizer="sgd", parts=None, scaler=False):
    """A CPU make_trainer on 96 random images (6 batches: 3 warm-up, the capture, 2 more), one epoch;
    returns its state after the epoch (weights, BatchNorm statistics, optimizer state, sums) and the status.
    `parts` (a dict) receives the optimizer and the scaler (enabled with `scaler`) before training."""
    from csnn.train import graph_state, make_optimizer, make_trainer

    cfg = TrainConfig(T=2, channels=4, batch_size=16, optimizer=optimizer, lr=0.1 if optimizer == "sgd" else 1e-2,
                      device="cpu", compile=False)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (96, 28, 28), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, 10, (96,), generator=gen)
    torch.manual_seed(0)
    net = CSNN(cfg.T, cfg.channels)
    opt = make_optimizer(cfg, net.parameters())
    grad_scaler = torch.amp.GradScaler("cpu", enabled=scaler)
    if parts is not None:
        parts.update(optimizer=opt, scaler=grad_scaler)
    status = {}
    train_epoch = make_trainer(net, opt, grad_scaler, x, y, cfg.batch_size, None, graphs, None, status, capture)
    loss, correct, n = train_epoch(torch.Generator().manual_seed(0))
    assert n == 96
    state = {k: v.clone() for k, v in graph_state(net, opt, {"loss": loss, "correct": correct})().items()}
    return state, status


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_graph_that_fails_its_check_falls_back_to_the_eager_step(optimizer, capfd):
    eager, status = small_training(False, optimizer=optimizer)
    assert status == {} and len(eager) > 20  # weights, BatchNorm statistics, optimizer state, sums
    checked, status = small_training("auto", faithful, optimizer)
    assert status["used"] == {"training step": True} and "fallback" not in status
    assert status["capture_s"]["training step"] > 0
    assert status["capture_diff"] == {"training step": dict.fromkeys(["bn_stats", "optimizer", "params", "sums"], 0.0)}
    for k in eager:
        assert torch.equal(checked[k], eager[k]), k  # the check ran the batch once: eager, undone, replayed
    assert "warning" not in capfd.readouterr().err
    for capture, why in ((replay_raises, "replaying failed (RuntimeError: CUDA error: an illegal memory access"),
                         (replay_reads_another_batch, "replayed step differs from the eager one in "),
                         (capture_fails, "capturing failed (RuntimeError: CUDA error: operation not permitted")):
        state, status = small_training("auto", capture, optimizer)
        assert "used" not in status and len(status["fallback"]) == 1, status
        assert status["fallback"][0].startswith(f"training step: {why}"), status
        for k in eager:  # every batch trained once, eagerly: what the eager trainer computes, bit for bit
            assert torch.equal(state[k], eager[k]), (capture.__name__, k)
        err = capfd.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("csnn: warning: CUDA graphs off for the training step, which runs "
                                                   f"eagerly: {why}"), err
    # the other batch: the message says which tensor and by how much, relative to its largest value
    _, status = small_training("auto", replay_reads_another_batch, optimizer)
    import re

    tensor, d = re.search(r"differs from the eager one in (\S+) \(max \|difference\| (\S+) of its largest value",
                          status["fallback"][0]).groups()
    assert float(d) > 1e-2 and tensor.split(".")[0] in ("net", "optimizer", "loss_sum", "correct", "predicted"), tensor
    # capture_diff records what the check saw: far past the tolerance somewhere, order 1 in the moments or sums
    diff = status["capture_diff"]["training step"]
    assert max(diff["optimizer"], diff["sums"]) > 0.05, diff


def test_cuda_graphs_true_raises_and_out_of_memory_falls_back_under_auto(capfd):
    for capture in (replay_raises, replay_reads_another_batch, capture_fails):
        with pytest.raises(RuntimeError, match="CUDA graphs: training step: .*cuda_graphs: false or auto .*"
                                               "CSNN_CUDA_GRAPHS=0"):
            small_training(True, capture)
    for capture in (capture_out_of_memory, replay_out_of_memory):
        with pytest.raises(torch.OutOfMemoryError):
            small_training(True, capture)
    # auto: out of memory in the capture (or in its check, which needs about twice a step's memory) drops the
    # graph and trains eagerly, every batch once, recorded as a fallback
    eager, _ = small_training(False)
    for capture in (capture_out_of_memory, replay_out_of_memory):
        state, status = small_training("auto", capture)
        assert "used" not in status and len(status["fallback"]) == 1
        assert status["fallback"][0].startswith("training step: out of memory in the capture or its check") and \
            "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB" in status["fallback"][0], status
        for k in eager:
            assert torch.equal(state[k], eager[k]), (capture.__name__, k)
        assert "CUDA graphs off for the training step" in capfd.readouterr().err


def test_an_evaluation_graph_that_fails_its_check_falls_back(capfd):
    torch.manual_seed(0)
    net = CSNN(T=2, channels=8)
    x = torch.randint(0, 256, (100, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    y = torch.arange(100) % 10
    plain = evaluate(net, x, y, 16)  # 6 full batches (2 warm-up, the capture, 3 more) and a tail of 4
    graphs = {"mode": "auto", "capture": faithful}
    assert evaluate(net, x, y, 16, graphs) == plain and graphs["status"]["used"] and "fallback" not in graphs["status"]
    assert evaluate(net, x, y, 16, graphs) == plain  # a second split (or epoch) replays the same graph
    for capture, why in ((replay_raises, "replaying failed"), (replay_reads_another_batch, "replayed step differs "
                                                                "from the eager one in sums"),
                         (capture_fails, "capturing failed")):
        graphs = {"mode": "auto", "capture": capture}
        assert evaluate(net, x, y, 16, graphs) == plain
        assert graphs["status"]["fallback"][0].startswith(f"evaluation: {why}"), graphs["status"]
        assert evaluate(net, x, y, 16, graphs) == plain  # and eagerly from then on
        assert len(capfd.readouterr().err.splitlines()) == 1
    with pytest.raises(RuntimeError, match="CUDA graphs: evaluation: replaying failed"):
        evaluate(net, x, y, 16, {"mode": True, "capture": replay_raises})


def test_cuda_graphs_off_for_a_whole_study_by_the_environment_and_recorded(monkeypatch):
    from csnn.train import graphs_info, use_cuda_graphs

    cuda = torch.device("cuda")  # use_cuda_graphs only reads the device's type: this runs on the CPU
    assert use_cuda_graphs(TrainConfig(), cuda) == ("auto", "")
    assert use_cuda_graphs(TrainConfig(cuda_graphs=True), cuda) == (True, "")
    assert use_cuda_graphs(TrainConfig(cuda_graphs=False), cuda) == (False, "")
    for value in ("0", "off", "false"):
        monkeypatch.setenv("CSNN_CUDA_GRAPHS", value)
        for cfg in (TrainConfig(), TrainConfig(cuda_graphs=True)):
            assert use_cuda_graphs(cfg, cuda) == (False, f"CSNN_CUDA_GRAPHS={value} in the environment")
    assert use_cuda_graphs(TrainConfig(), torch.device("cpu")) == (False, "")  # on the CPU nothing to turn off
    monkeypatch.setenv("CSNN_CUDA_GRAPHS", "1")
    assert use_cuda_graphs(TrainConfig(), cuda) == ("auto", "")
    # what fit records in every epoch's run info
    assert graphs_info(False, {"fallback": ["CSNN_CUDA_GRAPHS=0 in the environment"]}) == {
        "cuda_graphs_used": False, "cuda_graphs_eval_used": False,
        "cuda_graphs_fallback": "CSNN_CUDA_GRAPHS=0 in the environment", "capture_diff": ""}
    both = {"training step": True, "evaluation": True}
    assert graphs_info("auto", {"used": both, "fallback": []}) == {
        "cuda_graphs_used": True, "cuda_graphs_eval_used": True, "cuda_graphs_fallback": "", "capture_diff": ""}
    assert graphs_info("auto", {"fallback": []})["cuda_graphs_used"] is False  # too few batches to capture
    eval_fell = graphs_info("auto", {"used": {"training step": True}, "fallback": ["evaluation: capturing failed (x)"]})
    assert eval_fell["cuda_graphs_used"] is True and eval_fell["cuda_graphs_eval_used"] is False
    # training and evaluation each say their own: an evaluation graph does not make the training step graphed
    only_eval = graphs_info("auto", {"used": {"evaluation": True}, "fallback": []})
    assert only_eval["cuda_graphs_used"] is False and only_eval["cuda_graphs_eval_used"] is True
    diff = {"training step": {"optimizer": 0.0008, "params": 0.0001}}
    assert json.loads(graphs_info("auto", {"used": both, "capture_diff": diff})["capture_diff"]) == diff


def test_the_profiler_observes_each_kind_of_step_once_per_process():
    from csnn import model

    seen, ran = [], []

    def observe(fn, layers):  # in place of the profiler, which needs a GPU
        seen.append(layers)
        fn()
        return {"kernels": 9, "implementations": ["spikingjelly-triton"]}

    key = ("cuda:0", "torch.float16", ("spikingjelly",) * 4, "a test")
    first = model.observe_if_kernels_once(key, lambda: ran.append(1), 4, observe)
    again = model.observe_if_kernels_once(key, lambda: ran.append(2), 4, observe)  # a later trial of this worker
    other = model.observe_if_kernels_once((*key[:2], ("cupy",) * 4, "a test"), lambda: ran.append(3), 4, observe)
    assert first == again == other == {"kernels": 9, "implementations": ["spikingjelly-triton"]}
    assert seen == [4, 4] and ran == [1, 2, 3]  # profiled twice (two kinds of step), every step run once


def test_gpucheck_lists_each_gpu_test_and_allows_only_the_cupy_skip(tmp_path):
    """CuPy is optional: its tests skip with CUPY_MISSING and the check passes; any other skip (the GPU path
    unchecked) or failure fails it. Each test is listed by name with its outcome."""
    from csnn import gpucheck

    (tmp_path / "test_some.py").write_text(
        "import pytest\n"
        "def test_runs():\n    pass\n"
        f"@pytest.mark.skipif(True, reason={gpucheck.CUPY_MISSING!r})\ndef test_needs_cupy():\n    pass\n")
    out = gpucheck.check_tests(None, tmp_path / "test_some.py")
    assert out["outcomes"] == {"test_runs": "PASSED", "test_needs_cupy": f"SKIPPED ({gpucheck.CUPY_MISSING})"}
    (tmp_path / "test_other.py").write_text(
        "import pytest\ndef test_runs():\n    pass\n"
        "@pytest.mark.skipif(True, reason='needs a CUDA GPU')\ndef test_gpu():\n    pass\n")
    result = {"failed": []}
    gpucheck.run_check(result, "tests", gpucheck.check_tests, None, tmp_path / "test_other.py")
    assert result["failed"] == ["tests"] and "test_gpu" in result["tests"]["error"]
    assert result["tests"]["outcomes"]["test_gpu"] == "SKIPPED (needs a CUDA GPU)"  # its figures kept


def test_gpucheck_records_every_warning_and_owes_no_figures_when_skipped(capfd):
    import warnings

    from csnn import gpucheck

    def noisy():
        warnings.warn("SpikingJelly's fused IF kernel did not run")
        print("csnn: warning: CUDA graphs off for the training step, which runs eagerly: x", file=sys.stderr)
        print("gpucheck: progress", file=sys.stderr)
        return {"skipped": gpucheck.CUPY_MISSING}

    result = {"failed": []}
    gpucheck.run_check(result, "cupy", noisy)  # FIGURES names float16.spikes_equal: a skip owes none
    assert result["failed"] == [] and result["cupy"]["skipped"] == gpucheck.CUPY_MISSING
    assert result["warnings"] == ["cupy: csnn: warning: CUDA graphs off for the training step, which runs eagerly: x",
                                  "cupy: UserWarning: SpikingJelly's fused IF kernel did not run"]
    assert "csnn: warning: CUDA graphs off" in capfd.readouterr().err  # still shown


def test_gpucheck_compares_graphed_and_eager_state_by_group():
    from csnn.gpucheck import max_differences

    a = {"net.conv_fc.0.weight": torch.zeros(3), "net.conv_fc.1.running_mean": torch.zeros(2),
         "optimizer.0.momentum_buffer": torch.zeros(3), "scaler.scale": torch.tensor(65536.0), "loss_sum": torch.tensor(1.0)}
    b = {**a, "net.conv_fc.0.weight": torch.tensor([0.0, -0.5, 0.25]), "loss_sum": torch.tensor(1.25)}
    assert max_differences(b, a) == {"params": 0.5, "bn_stats": 0.0, "optimizer": 0.0, "scaler": 0.0, "sums": 0.25}
    from csnn.train import group_differences

    # relative to each tensor's largest value (0 where both are 0): the figure the capture check bounds
    assert group_differences(b, a) == {"params": 0.5, "bn_stats": 0.0, "optimizer": 0.0, "scaler": 0.0, "sums": 0.25}
    assert group_differences(a, b) == {"params": 1.0, "bn_stats": 0.0, "optimizer": 0.0, "scaler": 0.0, "sums": 0.2}


def replay_with_float16_moments(parts):
    """A replay of the step whose optimizer moments come out rounded to float16's precision (11 bits; float32's
    range, as the moments are float32), as gradients that cuDNN's atomics sum in another order under AMP make
    them differ: the check must accept it."""
    def capture(fn, static):
        def replay():
            fn(*static)
            for s in parts["optimizer"].state.values():
                for k, t in s.items():
                    if torch.is_tensor(t) and t.is_floating_point() and k != "step":
                        m, e = torch.frexp(t)
                        t.copy_(torch.ldexp(torch.round(m * 2048) / 2048, e))
        return replay
    return capture


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_replay_whose_moments_differ_by_float16_rounding_is_accepted(optimizer):
    parts: dict = {}
    _, status = small_training("auto", replay_with_float16_moments(parts), optimizer, parts)
    assert status["used"] == {"training step": True} and "fallback" not in status, status
    diff = status["capture_diff"]["training step"]
    assert 0 < diff["optimizer"] <= 2 ** -11 and diff["params"] == diff["sums"] == diff["bn_stats"] == 0.0, diff


class Allocator:
    """A CPU model of what torch's caching allocator keeps about captures (c10/cuda/CUDACachingAllocator.cpp):
    each graph pool's use count, the captures under way, and the internal assert that empty_cache (which every
    torch.cuda.graph starts with) fails while one is under way."""

    def __init__(self):
        self.pools, self.underway, self.handles = {}, [], 0

    def empty_cache(self):
        if self.underway:
            raise RuntimeError("captures_underway.empty() INTERNAL ASSERT FAILED at "
                               "\"c10/cuda/CUDACachingAllocator.cpp\"")
        self.pools = {p: n for p, n in self.pools.items() if n > 0}  # released pools are freed

    def begin(self, pool):
        self.pools[pool] = self.pools.get(pool, 0) + 1
        self.underway.append(pool)

    def end(self, device, pool):
        if pool not in self.underway:
            raise RuntimeError("endAllocatePool: not currently recording to mempool_id")
        self.underway.remove(pool)

    def release(self, device, pool):
        if self.pools.get(pool, 0) <= 0:
            raise RuntimeError("uc >= 0 INTERNAL ASSERT FAILED")
        self.pools[pool] -= 1


class Graphs:
    """capture_cuda_graph's `api` over the Allocator model, capturing as torch.cuda.graph does: empty_cache, then
    begin allocating to the pool; at the end capture_end, which (fails=True) raises, as after an invalidated
    capture, before it ends the allocation (the body's own error, the real cause, as its __context__)."""

    def __init__(self, allocator, fails=False):
        self.alloc, self.fails = allocator, fails

    def CUDAGraph(self):
        alloc = self.alloc

        class Graph:
            ended, replay = False, None

            def pool(self):
                if not self.ended:
                    raise RuntimeError("Called CUDAGraph::pool() without a preceding successful capture.")
                return self.pool_id

            def __del__(self):  # CUDAGraph::reset: a graph that ended its capture releases its pool
                if self.ended:
                    alloc.release(0, self.pool_id)
        return Graph()

    def pool(self):
        self.alloc.handles += 1
        return (0, self.alloc.handles)

    def device(self):
        return 0

    def end_allocate(self, device, pool):
        self.alloc.end(device, pool)

    def release_pool(self, device, pool):
        self.alloc.release(device, pool)

    @contextlib.contextmanager
    def graph(self, g, pool):
        self.alloc.empty_cache()
        self.alloc.begin(pool)
        g.pool_id = pool
        # what the graph records: the body, which on the CPU runs as it is captured; its replay runs it again
        import sys

        frame = sys._getframe(1)
        while "fn" not in frame.f_locals:  # capture_cuda_graph's frame: fn(*static) is the body
            frame = frame.f_back
        body, static = frame.f_locals["fn"], frame.f_locals["static"]
        g.replay = lambda: body(*static)
        yield
        if self.fails:
            try:
                raise RuntimeError("CUDA error: operation not permitted when stream is capturing")  # the body's op
            except RuntimeError:
                raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
        self.alloc.end(0, pool)
        g.ended = True


def test_a_capture_that_raises_after_allocating_leaves_a_second_capture_possible(monkeypatch):
    """Through the real capture_cuda_graph, with the allocator modelled: the failed capture's pool is ended and
    released, so the next capture in the process (a later trial of a reused Ray worker) works; the reason
    recorded is the body's error first. What only a GPU shows: that torch's allocator is in this state then
    (tests/test_gpu.py test_a_failed_capture_leaves_the_process_able_to_capture)."""
    import functools

    from csnn import train

    alloc = Allocator()
    capture = functools.partial(train.capture_cuda_graph, api=Graphs(alloc, fails=True))
    _, status = small_training("auto", capture)
    assert status["fallback"] == ["training step: capturing failed (RuntimeError: CUDA error: operation not permitted "
                                  "when stream is capturing; then RuntimeError: CUDA error: operation failed due to a "
                                  "previous error during capture)"]
    assert alloc.underway == [] and alloc.pools == {(0, 1): 0}  # ended, and released: freed at the next empty_cache
    _, status = small_training("auto", functools.partial(train.capture_cuda_graph, api=Graphs(alloc)))
    assert status["used"] == {"training step": True} and "fallback" not in status, status
    assert alloc.underway == [] and alloc.pools == {(0, 2): 0}  # the graph held its pool, released as it went
    # without the cleanup (as before), the allocator stays mid-capture and the next capture fails on it
    monkeypatch.setattr(train, "_end_failed_capture", lambda *a: None)
    small_training("auto", functools.partial(train.capture_cuda_graph, api=Graphs(alloc, fails=True)))
    _, status = small_training("auto", functools.partial(train.capture_cuda_graph, api=Graphs(alloc)))
    assert "captures_underway.empty() INTERNAL ASSERT FAILED" in status["fallback"][0]
    # a cleanup that itself fails turns graphs off for the process, saying why
    monkeypatch.setattr(train, "_graphs_broken", [])
    monkeypatch.setattr(train, "_end_failed_capture", lambda *a: alloc.release(0, (9, 9)))
    with pytest.raises(RuntimeError, match="capturing failed"):
        small_training(True, functools.partial(train.capture_cuda_graph, api=Graphs(Allocator(), fails=True)))
    _, status = small_training("auto", functools.partial(train.capture_cuda_graph, api=Graphs(Allocator())))
    assert status["fallback"][0].startswith("training step: off in this process: a failed capture's memory pool "
                                            "could not be released (RuntimeError: uc >= 0 INTERNAL ASSERT FAILED)")


def test_out_of_memory_in_a_capture_frees_its_pool_and_falls_back(monkeypatch):
    import functools

    from csnn import train

    class OutOfMemory(Graphs):
        @contextlib.contextmanager
        def graph(self, g, pool):
            with super().graph(g, pool):
                yield
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    alloc = Allocator()
    _, status = small_training("auto", functools.partial(train.capture_cuda_graph, api=OutOfMemory(alloc)))
    assert status["fallback"][0].startswith("training step: out of memory in the capture or its check")
    assert alloc.underway == [] and alloc.pools == {(0, 1): 0}


def test_the_eager_retry_after_a_capture_that_failed_past_the_scalers_step_trains(capfd):
    """A capture cut short between scaler.step() and scaler.update() leaves GradScaler's record of the step: the
    eager retry of the batch was refused ("step() has already been called since the last update()")."""
    parts: dict = {}

    def fails_past_step(fn, static):
        scaler = parts["scaler"]

        def update(*a, **k):
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        scaler.update = update
        try:
            fn(*static)
        finally:
            del scaler.update

    state, status = small_training("auto", fails_past_step, parts=parts, scaler=True)
    assert status["fallback"] == ["training step: capturing failed (RuntimeError: CUDA error: operation not permitted "
                                  "when stream is capturing)"]
    assert all(t.isfinite().all() for t in state.values()) and state["correct"] > 0


def test_packages_older_than_tested_are_said_and_recorded(tmp_path, monkeypatch):
    """A GPU machine's preinstalled torch & co. (the H200 image: torch 2.11, Triton 3.6, torchvision 0.26):
    one line at a study's start and in gpucheck, recorded in environment.yaml; never a refusal."""
    from importlib.metadata import version

    from csnn import gpus
    from study import environment

    assert gpus.older_than_tested() == []  # this checkout's environment is the tested one
    assert gpus.older_line([]) is None and "older_than_tested" not in environment.collect()
    (tmp_path / "constraints.txt").write_text(f"# header\ntorch==99.1.0\ntorchvision=={version('torchvision')}\n"
                                              "triton==1.0\nnumpy==99.0\n")
    older = gpus.older_than_tested(tmp_path)
    assert older == [f"torch {version('torch')} (tested: 99.1.0)"]
    assert gpus.older_line(older).startswith(f"csnn: note: older than the versions tested (constraints.txt): torch ")
    assert gpus.older_than_tested(tmp_path / "no-checkout") == []  # an installed wheel: nothing to compare with
    assert gpus._release("2.11.0+cu130") == (2, 11, 0) < gpus._release("2.14.1")
    monkeypatch.setattr(gpus, "older_than_tested", lambda: older)
    assert environment.collect()["older_than_tested"] == older


def test_gpucheck_without_cupy_deselects_its_tests_and_shares_tritons_cache(tmp_path, monkeypatch):
    """Without CuPy the cupy backend's GPU tests (which fail there) are deselected, said in the result, and the
    rest passes; the tests it starts compile into this process's TRITON_CACHE_DIR (conftest empties HOME,
    where Triton's cache would be)."""
    from csnn import gpucheck

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in ("TRITON_CACHE_DIR", "CUBLAS_WORKSPACE_CONFIG"):  # set, then removed: monkeypatch restores both
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    gpucheck.shared_environment()
    assert gpucheck.os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "home" / ".triton" / "cache")
    (tmp_path / "test_some.py").write_text(
        "import os\nimport pytest\n"
        f"def test_runs():\n    assert os.environ['TRITON_CACHE_DIR'] == {str(tmp_path / 'home' / '.triton' / 'cache')!r}\n"
        "@pytest.mark.cupy\ndef test_needs_cupy():\n    pytest.fail('CuPy not installed')\n")
    assert gpucheck.cupy_missing()  # CI has no CuPy
    out = gpucheck.check_tests(None, tmp_path / "test_some.py")
    assert out["outcomes"] == {"test_runs": "PASSED"} and out["passed"] == 1 and out["deselected"] == 1
    assert out["cupy_tests"] == "deselected: CuPy not installed (pip install -e '.[cupy]' to run them)"


def test_the_memory_check_counts_the_trials_sharing_a_gpu_and_their_graph_pools():
    import yaml

    from study import spec as specs
    from study.plan import activation_bytes, memory_needed

    raw = yaml.safe_load((ROOT / "search_spaces" / "fmnist.yaml").read_text())
    spec = specs.parse(raw, "fmnist.yaml")  # gpus_per_trial auto, trials_per_gpu 4, cuda_graphs auto
    one = activation_bytes(max(specs.values(spec, "T")), max(specs.values(spec, "channels")),
                           max(specs.values(spec, "batch_size")))
    assert memory_needed(spec, cuda=False) == (one, "one batch's activations")
    assert memory_needed(spec, cuda=True) == (one * 4 * 2, "one batch's activations of each of the 4 trials sharing "
                                                          "a GPU and their CUDA graphs' memory pools")
    no_graphs = specs.parse({**raw, "train": {**raw["train"], "cuda_graphs": False}}, "fmnist.yaml")
    assert memory_needed(no_graphs, cuda=True)[0] == one * 4
    half = specs.parse({**raw, "resources": {**raw["resources"], "gpus_per_trial": 0.5}}, "fmnist.yaml")
    assert memory_needed(half, cuda=True)[0] == one * 2 * 2


def test_the_networks_check_runs_every_network_on_the_cpu_and_names_what_only_a_gpu_shows():
    """gpucheck's networks check (issue 34: LIF, PLIF, avg pooling and each augmentation, graphed against eager
    and fused by name) on the CPU, small: the same trainers and comparison run for every network, eager on both
    sides (equal), and the check fails naming only what a GPU must show: the graph and the fused kernels. Its
    judgment of a GPU's figures: a group past the bound, or a layer that did not run fused, fails it."""
    from csnn import gpucheck

    with pytest.raises(gpucheck.CheckFailed) as failed:
        gpucheck.check_networks(None, device="cpu", steps=1, size={"T": 2, "channels": 4})
    out = failed.value.figures
    assert set(gpucheck.NETWORKS) == {"lif", "plif", "avg", "crop", "flip", "erase"} and "not_reached" not in out
    for name in gpucheck.NETWORKS:
        assert out[name]["relative_diff"] and all(v == 0 for v in out[name]["relative_diff"].values()), out[name]
    assert sorted(out["problems"]) == sorted([f"{n}: the training step was not graphed ([])" for n in gpucheck.NETWORKS]
                                             + ["lif: kernels not observed", "plif: kernels not observed"])
    # a GPU's figures, as kernels_of records them: one layer's backward not fused, a group past the bound
    seen = {"kernels": 60, "forward": {"spikingjelly-triton": 4}, "backward": {"spikingjelly-triton": 3},
            "implementations": ["spikingjelly-reference", "spikingjelly-triton"]}
    fig = {"network": {"neuron": "plif"}, "relative_diff": {"params": 2e-5, "sums": 0.0}, "graph_used": True,
           "fallback": [], "kernels": {"train_amp": seen}}
    problems = gpucheck.network_problems("plif", fig)
    assert "params" in problems[0] and any("3 of 4 spiking layers ran a fused backward" in p for p in problems)
    assert all("spikingjelly-reference" in p for p in problems[1:]), problems  # the fallback, named in each direction
    fused = {**seen, "backward": {"spikingjelly-triton": 4}, "implementations": ["spikingjelly-triton"]}
    assert gpucheck.network_problems("plif", {**fig, "relative_diff": {"params": 0.0},
                                              "kernels": {"train_amp": fused}}) == []
