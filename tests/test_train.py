import math

import pytest
import torch
import yaml

from csnn import data as fmnist
from csnn import efficiency
from csnn.config import METRICS, RUN_INFO, TIMING_METRICS, TrainConfig
from csnn.data import to_input
from csnn.model import CSNN
from csnn.train import COST_IMAGES, evaluate, fit, load_model

SMALL = dict(T=2, channels=4, batch_size=64, epochs=2, optimizer="adam", lr=0.01, device="cpu", train_size=640, test_size=320)


def strip_timing(history):
    return [{k: v for k, v in m.items() if k not in TIMING_METRICS} for m in history]


@pytest.mark.parametrize("field,value,allowed", [
    ("T", 0, "> 0"), ("channels", -4, "> 0"), ("lr", 0.0, "> 0"), ("epochs", 0, "> 0"),
    ("batch_size", 0, "> 0"), ("optimizer", "rmsprop", "sgd, adam, adamw"), ("T", 2.5, "integer"),
    ("backend", "triton", "auto, cupy"), ("device", "tpu", "auto, cpu, cuda"),
])
def test_config_rejects_bad_values(field, value, allowed):
    with pytest.raises(ValueError, match=f"TrainConfig.{field}: .*{allowed}"):
        TrainConfig(**{field: value})


def test_config_round_trips_dict_and_yaml():
    cfg = TrainConfig(T=6, optimizer="adamw", lr=3e-3, val_size=5000)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert TrainConfig.from_yaml(cfg.to_yaml()) == cfg
    assert yaml.safe_load(cfg.to_yaml())["lr"] == 3e-3
    with pytest.raises(ValueError, match="no field 'beta'"):
        TrainConfig.from_dict({"beta": 0.1})


def test_training_lowers_the_loss_and_reports_every_metric(real_data):
    cfg = TrainConfig(**{**SMALL, "epochs": 3, "val_size": 200, "train_size": 1280})
    seen = []
    history = fit(cfg, real_data, callback=seen.append)
    assert seen == history and [m["epoch"] for m in history] == [0, 1, 2]
    assert set(history[0]) == {"epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss",
                               "test_acc", "train_img_s", "epoch_s", "setup_s", "train_s", "val_s", "test_s", "cost_s",
                               "checkpoint_s", "report_s", "elapsed_s", "fr_2", "fr_6", "fr_10", "fr_12",
                               "spikes_per_image", "synops_per_image", "macs_per_image", "acs_per_image", "energy_uj",
                               "top_class", "top_class_share", "run_device", "run_amp", "cuda_graphs_used", "cuda_graphs_fallback", "neuron_impl",
                               "deterministic", "torch_version", "spikingjelly_version", "cuda_version", "data_sha",
                               "cuda_graphs_eval_used", "capture_diff"}
    assert set(history[0]) == set(METRICS) | set(RUN_INFO)
    assert history[0]["data_sha"] == real_data.fingerprint and len(real_data.fingerprint) == 16
    assert history[0]["run_device"] == "cpu" and history[0]["run_amp"] is False and history[0]["cuda_graphs_used"] is False
    assert history[0]["cuda_graphs_fallback"] == "" == history[0]["capture_diff"]  # graphs are for CUDA: on the CPU nothing fell back
    assert history[0]["neuron_impl"] == "spikingjelly-cpu" and history[0]["torch_version"] == torch.__version__
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["test_acc"] > 0.3  # 10 classes: chance is 0.1
    assert history[0]["lr"] == 0.01 and history[1]["lr"] == pytest.approx(0.01 * (1 + math.cos(math.pi / 3)) / 2)


def test_costs_are_counted_on_validation_images_and_no_test_selection_is_saved(real_data, tmp_path):
    """Firing rates and costs may be objectives, so they come from the validation
    split; fit keeps no best-on-test checkpoint (that is the command line's)."""
    cfg = TrainConfig(**{**SMALL, "epochs": 1, "val_size": 200})
    m = fit(cfg, real_data, tmp_path)[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_latest.pth"]
    assert "max_test_acc" not in torch.load(tmp_path / "checkpoint_latest.pth", weights_only=False)
    net, _ = load_model(tmp_path / "checkpoint_latest.pth")
    splits = fmnist.split(real_data, cfg.val_size, cfg.train_size, cfg.test_size, cfg.split_seed)
    on = {k: efficiency.count(net, to_input(splits[k][0][:COST_IMAGES])) for k in ("val", "test")}
    assert on["val"] != on["test"]  # the two splits give different counts, so this tells them apart
    assert {k: m[k] for k in on["val"]} == pytest.approx(on["val"])
    assert m["fr_2"] == pytest.approx(evaluate(net, *splits["val"], cfg.batch_size)["fr_2"])


def test_same_config_same_metrics(real_data):
    cfg = TrainConfig(**{**SMALL, "epochs": 1})
    first = strip_timing(fit(cfg, real_data))
    assert strip_timing(fit(cfg, real_data)) == first
    other = strip_timing(fit(TrainConfig(**{**SMALL, "epochs": 1, "seed": 1}), real_data))
    assert other != first


def test_resume_continues_exactly(real_data, tmp_path):
    cfg = TrainConfig(**SMALL)
    straight = fit(cfg, real_data, tmp_path / "a")
    first = fit(cfg, real_data, tmp_path / "b", stop_after=1)
    ckpt = torch.load(tmp_path / "b" / "checkpoint_latest.pth", weights_only=False)
    assert ckpt["epoch"] == 0 and ckpt["config"] == cfg.to_dict()
    assert {"net", "optimizer", "lr_scheduler", "scaler", "rng"} <= set(ckpt)
    second = fit(cfg, real_data, tmp_path / "b", resume=tmp_path / "b" / "checkpoint_latest.pth")
    assert strip_timing(first + second) == strip_timing(straight)
    net, saved = load_model(tmp_path / "b" / "checkpoint_latest.pth")
    assert saved == cfg and net.T == 2
    with pytest.raises(ValueError, match="different configuration"):
        fit(TrainConfig(**{**SMALL, "lr": 0.05}), real_data, resume=tmp_path / "b" / "checkpoint_latest.pth")


def test_diverging_loss_raises(real_data):
    cfg = TrainConfig(**{**SMALL, "epochs": 1, "lr": 1e37})  # 640 images, 10 steps: non-finite weights by then
    with pytest.raises(FloatingPointError, match="diverged.*non-finite weights"):
        fit(cfg, real_data)


def test_compiled_kernels_train_to_the_same_accuracy(real_data):
    plain = fit(TrainConfig(**{**SMALL, "epochs": 1, "compile": False}), real_data)
    compiled = fit(TrainConfig(**{**SMALL, "epochs": 1, "compile": True}), real_data)
    assert abs(plain[0]["test_acc"] - compiled[0]["test_acc"]) <= 0.01
    assert plain[0]["train_loss"] == pytest.approx(compiled[0]["train_loss"], rel=1e-3)
    with pytest.raises(ValueError, match="TrainConfig.compile: 'yes' is not allowed; allowed: true, false, auto"):
        TrainConfig(compile="yes")


def test_cuda_graphs_are_for_cuda_and_the_optimizers_fused_only_there():
    from csnn.train import _lr_from, make_optimizer, use_cuda_graphs

    cpu = torch.device("cpu")
    assert use_cuda_graphs(TrainConfig(), cpu) == (False, "") == use_cuda_graphs(TrainConfig(cuda_graphs=False), cpu)
    with pytest.raises(RuntimeError, match="cuda_graphs: true needs a CUDA device, and this run trains on cpu"):
        use_cuda_graphs(TrainConfig(cuda_graphs=True), cpu)
    with pytest.raises(ValueError, match="TrainConfig.cuda_graphs: 'on' is not allowed; allowed: true, false, auto"):
        TrainConfig(cuda_graphs="on")
    for name in ("sgd", "adam", "adamw"):  # the CPU keeps the plain (foreach) optimizers: its results stay as they were
        opt = make_optimizer(TrainConfig(optimizer=name), CSNN(2, 2).parameters())
        assert not opt.defaults.get("fused")
        # while a CUDA step runs it reads its lr from a tensor (capturable to Adam only while a graph is captured:
        # an eager step said capturable makes torch warn); after, floats again
        lr = torch.tensor(0.5)
        with _lr_from(opt, lr):
            assert all(g["lr"] is lr and not g.get("capturable") for g in opt.param_groups)
        assert opt.param_groups[0]["lr"] == TrainConfig(optimizer=name).lr and not opt.param_groups[0].get("capturable")


# Each network key of issue 34 at a value other than the tutorial's, and what it must change.
NETWORK_KEYS = [
    ({"neuron": "lif", "tau": 3.0}, lambda net: type(net.conv_fc[2]).__name__ == "LIFNode" and net.conv_fc[2].tau == 3.0),
    # PLIF's tau, a parameter (w = -ln(tau - 1), initially -ln 1.5), learned: moved by training, as the checkpoint has it
    ({"neuron": "plif", "tau": 2.5}, lambda net: all(abs(net.conv_fc[i].w.item() + math.log(1.5)) > 1e-4
                                                     for i in (2, 6, 10, 12))),
    ({"v_threshold": 0.5}, lambda net: net.conv_fc[12].v_threshold == 0.5),
    ({"detach_reset": True}, lambda net: net.conv_fc[6].detach_reset is True),
    ({"surrogate": "sigmoid"}, lambda net: type(net.conv_fc[2].surrogate_function).__name__ == "Sigmoid"
     and net.conv_fc[2].surrogate_function.alpha == 4.0),  # the surrogate's own alpha
    ({"surrogate": "erf", "alpha": 3.0}, lambda net: net.conv_fc[10].surrogate_function.alpha == 3.0),
    ({"pooling": "avg"}, lambda net: type(net.conv_fc[3]).__name__ == "AvgPool2d"),
    ({"dropout": 0.5}, lambda net: net.conv_fc[9].dropout.p == 0.5 and net.conv_fc[11].dropout.p == 0.5),
]


KEYS_SMALL = {**SMALL, "T": 4, "batch_size": 32, "train_size": 320, "test_size": 160}  # every key learns here


@pytest.fixture(scope="module")
def tutorial_history(real_data):
    return strip_timing(fit(TrainConfig(**KEYS_SMALL), real_data))


@pytest.mark.parametrize("keys,built", NETWORK_KEYS, ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items())
                         if isinstance(v, dict) else "")
def test_each_network_key_trains_checkpoints_and_resumes_exactly(keys, built, real_data, tutorial_history, tmp_path):
    """A real short fit with the key, on real images: it learns, it changes the run (against the
    tutorial's network on the same seed), its checkpoint builds the same network, and a resumed
    run is the straight one to the last bit (what study.reproduce asks of a CPU run)."""
    import shutil

    cfg = TrainConfig(**KEYS_SMALL, **keys)
    after_first = tmp_path / "epoch0.pth"  # the checkpoint of the first epoch, kept as the run goes on
    straight = fit(cfg, real_data, tmp_path / "a", callback=lambda m: m["epoch"] or shutil.copy(
        tmp_path / "a" / "checkpoint_latest.pth", after_first))
    assert straight[-1]["train_loss"] < straight[0]["train_loss"]
    assert strip_timing(straight) != tutorial_history
    second = fit(cfg, real_data, tmp_path / "b", resume=after_first)
    assert strip_timing(second) == strip_timing(straight[1:])
    net, saved = load_model(tmp_path / "a" / "checkpoint_latest.pth")
    assert saved == cfg and built(net)
    ckpt = torch.load(tmp_path / "a" / "checkpoint_latest.pth", weights_only=False)
    assert set(ckpt["net"]) == set(CSNN.from_config(cfg).state_dict())  # PLIF's w included
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in ckpt["net"].items())
    with pytest.raises(ValueError, match=f"different configuration: {next(iter(keys))} "):
        fit(TrainConfig(**KEYS_SMALL), real_data, resume=after_first)


def test_the_tutorial_network_keeps_the_tutorials_state_dict():
    """With every network key at its default, the network is SpikingJelly's example's: the same keys
    (the example loads our checkpoints), and PLIF adds only its w per spiking layer."""
    from spikingjelly.activation_based.examples.conv_fashion_mnist import CSNN as RefCSNN

    assert set(CSNN(T=2, channels=4).state_dict()) == set(RefCSNN(T=2, channels=4).state_dict())
    RefCSNN(T=2, channels=4).load_state_dict(CSNN(T=2, channels=4, pooling="avg", dropout=0.3).state_dict())
    extra = set(CSNN(T=2, channels=4, neuron="plif").state_dict()) - set(CSNN(T=2, channels=4).state_dict())
    assert extra == {"conv_fc.2.w", "conv_fc.6.w", "conv_fc.10.w", "conv_fc.12.w"}
