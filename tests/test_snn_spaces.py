"""search_spaces/fmnist_snn.yaml and quick_snn.yaml: they load, search every key of issue 34, and ask the
same questions (quick_snn is fmnist_snn sized for a CPU). Needs both helpers' TrainConfig keys (neuron, tau,
v_threshold, surrogate, alpha, pooling, dropout; augment, loss)."""
from pathlib import Path

from csnn.config import TrainConfig, surrogate_alpha
from study import spec as specs

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("neuron", "tau", "v_threshold", "surrogate", "alpha", "pooling", "dropout", "augment", "loss")


def test_the_snn_spaces_load_and_search_every_lever():
    gpu = specs.load(ROOT / "search_spaces" / "fmnist_snn.yaml")
    cpu = specs.load(ROOT / "search_spaces" / "quick_snn.yaml")
    for s in (gpu, cpu):
        assert set(KEYS) <= set(s.space) and s.metric == "val_acc" and s.train["val_size"] > 0
        assert s.space["augment"]["choices"][0] == "none" and s.space["loss"]["choices"] == ["mse", "ce"]
        assert s.space["tau"]["when"] == {"neuron": ["lif", "plif"]}  # tau is LIF's and PLIF's
    assert list(cpu.space) == list(gpu.space)  # the same questions
    assert {k: v.get("choices") for k, v in cpu.space.items() if k not in ("T", "channels")} == \
           {k: v.get("choices") for k, v in gpu.space.items() if k not in ("T", "channels")}
    assert gpu.train["epochs"] == 16 and gpu.resources["gpus_per_trial"] == "auto" and gpu.search["baseline"]
    assert cpu.resources["gpus_per_trial"] == 0
    # the baseline trial is the tutorial's network: no augmentation, MSE (and the tutorial's knobs)
    base = specs.baseline_params(gpu)
    assert {k: base[k] for k in ("augment", "loss", "T", "channels", "optimizer")} == \
           {"augment": "none", "loss": "mse", "T": 4, "channels": 128, "optimizer": "sgd"}
    assert set(KEYS) - {"tau"} <= set(base)  # enqueued, not left to the sampler (tau: inactive for if)
    # and the tutorial's network, bit for bit (alpha named by value: atan's own 2.0)
    net = lambda c: {**c.network(), "alpha": surrogate_alpha(c)}  # noqa: E731
    assert net(gpu.config(base)) == net(TrainConfig())
    # every sampled trial is a valid TrainConfig, tau only for a leaky neuron
    import optuna

    for s in (gpu, cpu):
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), direction="maximize")
        define, seen = specs.define_by_run(s), set()
        for _ in range(30):
            trial = study.ask()
            params = define(trial)
            assert ("tau" in params) == (params["neuron"] != "if")
            cfg = s.config(params)
            seen |= {cfg.neuron, cfg.augment, cfg.loss}
            study.tell(trial, 0.5)
        assert {"if", "lif", "plif", "none", "crop+flip", "mse", "ce"} <= seen
