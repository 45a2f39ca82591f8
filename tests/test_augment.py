"""TrainConfig.augment and TrainConfig.loss: checked values, real fits, seeded and resumable
augmentation that never touches the images a run is measured on."""
import copy
import hashlib
import re

import pytest
import torch
import yaml

from csnn import data as fmnist
from csnn.config import AUGMENTS, TIMING_METRICS, TrainConfig
from csnn.data import to_input
from csnn.model import CSNN
from csnn.train import CE_SCALE, evaluate, fit, load_model
from study import spec as specs

SMALL = dict(T=2, channels=4, batch_size=64, epochs=2, optimizer="adam", lr=0.01, device="cpu", train_size=640, test_size=320)
ALL = "+".join(AUGMENTS)  # crop+flip+erase


def strip_timing(history):
    return [{k: v for k, v in m.items() if k not in TIMING_METRICS} for m in history]


@pytest.mark.parametrize("field,value", [
    ("augment", "rotate"), ("augment", "flip+crop"), ("augment", "crop+crop"), ("augment", ""),
    ("augment", "none+crop"), ("augment", "crop+"), ("augment", "Crop"), ("loss", "nll"), ("loss", "MSE"),
])
def test_bad_values_are_refused_with_what_is_allowed(field, value):
    allowed = ("none, or some of crop, flip, erase joined by '+' in this order, each once" if field == "augment"
               else "mse, ce")
    with pytest.raises(ValueError, match="^" + re.escape(f"TrainConfig.{field}: {value!r} is not allowed; allowed: {allowed}")):
        TrainConfig(**{field: value})
    with pytest.raises(ValueError, match=f"TrainConfig.{field}: 3 is not allowed; must be a string"):
        TrainConfig(**{field: 3})


def test_a_study_file_names_the_key_path_of_a_bad_value():
    raw = yaml.safe_load((specs.Path(specs.__file__).parents[1] / "search_spaces" / "quick.yaml").read_text())
    spaced = copy.deepcopy(raw)
    spaced["space"]["augment"] = {"type": "categorical", "choices": ["none", "crop+flip", "rotate"]}
    with pytest.raises(specs.SpecError, match=r"^q.yaml: space.augment.choices\[2\]: 'rotate' is not allowed for augment: "
                                              r"TrainConfig.augment: 'rotate' is not allowed; allowed: none, or some of crop"):
        specs.parse(spaced, "q.yaml")
    fixed = copy.deepcopy(raw)
    fixed["train"]["loss"] = "hinge"
    with pytest.raises(specs.SpecError, match=r"^q.yaml: train.loss: 'hinge' is not allowed; allowed: mse, ce$"):
        specs.parse(fixed, "q.yaml")
    # good values pass, searched or fixed
    spaced["space"]["augment"]["choices"] = ["none", "crop", "flip", "erase", "crop+flip", ALL]
    fixed["train"]["loss"] = "ce"
    assert specs.parse(spaced, "q.yaml").space["augment"]["choices"][-1] == ALL
    assert specs.parse(fixed, "q.yaml").config({"T": 2, "channels": 8, "optimizer": "adam", "lr": 1e-3}).loss == "ce"


def test_the_defaults_are_the_tutorials():
    assert (TrainConfig().augment, TrainConfig().loss) == ("none", "mse")


@pytest.mark.parametrize("augment", [*AUGMENTS, ALL])
def test_a_real_short_fit_learns_with_each_augmentation(real_data, augment):
    cfg = TrainConfig(**{**SMALL, "epochs": 3, "val_size": 200, "train_size": 1280, "augment": augment})
    history = fit(cfg, real_data)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["test_acc"] > 0.3 and history[-1]["val_acc"] > 0.3  # 10 classes: chance is 0.1


def test_a_real_short_fit_learns_with_cross_entropy_and_reports_it(real_data, tmp_path):
    cfg = TrainConfig(**{**SMALL, "epochs": 3, "val_size": 200, "train_size": 1280, "loss": "ce"})
    history = fit(cfg, real_data, tmp_path)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["test_acc"] > 0.3
    # the reported losses are the cross-entropy (mse's are <= 0.2 per image: a firing rate is in [0, 1])
    assert history[0]["train_loss"] > 0.5 and history[-1]["test_loss"] > 0.2
    # the checkpoint carries the loss, and evaluating with it gives the reported test_loss
    net, saved = load_model(tmp_path / "checkpoint_latest.pth")
    assert saved == cfg and saved.loss == "ce"
    test_x, test_y = fmnist.split(real_data, cfg.val_size, cfg.train_size, cfg.test_size, cfg.split_seed)["test"]
    m = evaluate(net, test_x, test_y, cfg.batch_size, loss="ce")
    assert m["loss"] == pytest.approx(history[-1]["test_loss"], rel=1e-6)
    with torch.no_grad():
        fr = net(to_input(test_x))
    ce = torch.nn.functional.cross_entropy(CE_SCALE * fr, test_y).item()
    assert m["loss"] == pytest.approx(ce, rel=1e-5)
    assert evaluate(net, test_x, test_y, cfg.batch_size)["loss"] < 0.2  # mse: another number


def test_the_augmentation_is_the_seeds_and_changes_images_as_described(real_data):
    x = real_data.train_x[:256]
    names = ("crop", "flip", "erase")
    params = fmnist.augment_params(names, 256, torch.Generator().manual_seed(3))
    assert params.shape == (256, 7) and params.dtype == torch.int64
    assert torch.equal(params, fmnist.augment_params(names, 256, torch.Generator().manual_seed(3)))
    assert not torch.equal(params, fmnist.augment_params(names, 256, torch.Generator().manual_seed(4)))
    shift, flip, (top, left, h, w) = params[:, :2], params[:, 2], params[:, 3:].T
    assert shift.min() == -2 and shift.max() == 2 and set(flip.tolist()) == {0, 1}
    erased = h > 0
    assert 0.35 < erased.float().mean() < 0.65 and (h[erased].min() >= 1) and ((top + h).max() <= 28) and ((left + w).max() <= 28)
    # each transform alone, against a plain reading of what it does
    one = fmnist.augment(x[:1], torch.tensor([[1, -2]]), ("crop",))[0]  # out[i, j] = x[i + 1, j - 2], zero outside
    assert torch.equal(one[:27, 2:], x[0, 1:, :26]) and one[27].sum() == 0 and one[:, :2].sum() == 0
    assert torch.equal(fmnist.augment(x[:2], torch.tensor([[1], [0]]), ("flip",)), torch.stack([x[0].flip(1), x[1]]))
    cut = fmnist.augment(x[:1], torch.tensor([[3, 5, 4, 6]]), ("erase",))[0]
    expected = x[0].clone()
    expected[3:7, 5:11] = 0
    assert torch.equal(cut, expected)
    assert torch.equal(fmnist.augment(x[:1], torch.tensor([[3, 5, 0, 0]]), ("erase",)), x[:1])  # not erased
    assert fmnist.augment(x, params, names).dtype == torch.uint8


def test_same_seed_same_run_another_seed_another_and_the_default_unchanged(real_data):
    """study.reproduce's exactness on the CPU rests on this: a config trains to the same numbers."""
    cfg = TrainConfig(**{**SMALL, "epochs": 1, "augment": ALL, "loss": "ce"})
    first = strip_timing(fit(cfg, real_data))
    assert strip_timing(fit(cfg, real_data)) == first
    assert strip_timing(fit(TrainConfig(**{**cfg.to_dict(), "seed": 1}), real_data)) != first
    plain = strip_timing(fit(TrainConfig(**{**cfg.to_dict(), "augment": "none"}), real_data))
    assert plain != first  # the augmentation changed the training


def _image_keys(x: torch.Tensor) -> set:
    """The network's float inputs [N, 1, 28, 28] as uint8 images, each hashed."""
    u8 = (x.reshape(-1, 28 * 28) * 255).round().to(torch.uint8)
    return {hashlib.sha1(r.numpy().tobytes()).hexdigest() for r in u8}


@pytest.mark.parametrize("augment", ["none", ALL])
def test_the_augmentation_touches_training_images_only(real_data, augment):
    """Every image the network sees in evaluation (validation, test, the costs) is an untouched image of
    its split; in training, with augment, most are changed (with none, none are)."""
    cfg = TrainConfig(**{**SMALL, "epochs": 1, "val_size": 200, "augment": augment})
    seen = {True: set(), False: set()}

    def record(module, args):
        if isinstance(module, CSNN):
            seen[module.training] |= _image_keys(args[0])

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        fit(cfg, real_data)
    finally:
        handle.remove()
    splits = fmnist.split(real_data, cfg.val_size, cfg.train_size, cfg.test_size, cfg.split_seed)
    evaluated = _image_keys(to_input(torch.cat([splits["val"][0], splits["test"][0]])))
    assert seen[False] and seen[False] <= evaluated
    changed = len(seen[True] - _image_keys(to_input(splits["train"][0]))) / len(seen[True])
    assert changed > 0.8 if augment != "none" else changed == 0


def test_resume_with_augmentation_continues_exactly(real_data, tmp_path):
    cfg = TrainConfig(**{**SMALL, "augment": ALL})
    straight = fit(cfg, real_data, tmp_path / "a")
    first = fit(cfg, real_data, tmp_path / "b", stop_after=1)
    second = fit(cfg, real_data, tmp_path / "b", resume=tmp_path / "b" / "checkpoint_latest.pth")
    assert strip_timing(first + second) == strip_timing(straight)
    assert load_model(tmp_path / "b" / "checkpoint_latest.pth")[1].augment == ALL
    with pytest.raises(ValueError, match="different configuration: augment 'crop\\+flip\\+erase' in the checkpoint, 'crop' now"):
        fit(TrainConfig(**{**SMALL, "augment": "crop"}), real_data, resume=tmp_path / "b" / "checkpoint_latest.pth")


def _graphed_epoch(graphs, capture=None):
    """One epoch of make_trainer with every augmentation on 96 random images (6 batches: 3 warm-up, the
    capture, 2 more) on the CPU, with `capture` as cuda_graph's seam; its state after the epoch and status."""
    from csnn.train import graph_state, make_optimizer, make_trainer

    cfg = TrainConfig(T=2, channels=4, batch_size=16, lr=0.1, device="cpu", compile=False)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (96, 28, 28), dtype=torch.uint8, generator=gen), torch.randint(0, 10, (96,), generator=gen)
    torch.manual_seed(0)
    net = CSNN(cfg.T, cfg.channels)
    opt = make_optimizer(cfg, net.parameters())
    status = {}
    train_epoch = make_trainer(net, opt, torch.amp.GradScaler("cpu", enabled=False), x, y, cfg.batch_size, None,
                               graphs, None, status, capture, augment=tuple(AUGMENTS), loss="ce")
    loss, correct, _ = train_epoch(torch.Generator().manual_seed(0))
    return {k: v.clone() for k, v in graph_state(net, opt, {"loss": loss, "correct": correct})().items()}, status


def test_the_augmenting_step_is_one_graph_whose_replays_read_each_batchs_draws():
    """The augmentation's random integers are an input of the graphed step (copied in per batch, as the
    indices are): a replay of the step as captured computes what the eager epoch does, bit for bit; a
    graph that kept the captured batch's draws (it passes the check, made on that batch) trains otherwise."""
    eager, status = _graphed_epoch(False)
    assert status == {}
    graphed, status = _graphed_epoch("auto", lambda fn, static: lambda: fn(*static))
    assert status["used"] == {"training step": True} and "fallback" not in status
    assert all(torch.equal(graphed[k], eager[k]) for k in eager)

    def frozen_draws(fn, static):
        kept = static[1].clone()
        return lambda: fn(static[0], kept)

    stale, status = _graphed_epoch("auto", frozen_draws)
    assert status["used"] == {"training step": True} and [k for k in eager if not torch.equal(stale[k], eager[k])]


def test_study_reproduce_reruns_an_augmented_cross_entropy_trial_exactly(tiny_study, tiny_data_dir, tmp_path, capsys):
    """The best trial of the shared tiny study, its record rewritten as if it had trained with every
    augmentation and ce (trials.parquet's config; history.csv from fit, as a trial computes it): study.reproduce
    reruns it to the same numbers on the CPU, and the same record without those keys' history mismatches."""
    import shutil

    import pandas as pd

    from conftest import in_process
    from study import reproduce

    d = tmp_path / "e2e"
    shutil.copytree(tiny_study[0], d)
    best = yaml.safe_load((d / "best.yaml").read_text())["trial_id"]
    t = pd.read_parquet(d / "trials.parquet")
    row = t["trial_id"].astype(str) == str(best)
    config = {**yaml.safe_load(t.loc[row, "config"].iloc[0]), "augment": ALL, "loss": "ce"}
    t.loc[row, "config"] = yaml.safe_dump(config)
    t.to_parquet(d / "trials.parquet", index=False)
    p = in_process(capsys, reproduce.main, d, "--data-dir", tiny_data_dir, "--epochs", 1)
    assert p.returncode == 1 and "MISMATCH" in p.stdout  # the history is still the plain trial's

    h = pd.read_csv(d / "history.csv")
    mine = (h["trial_id"].astype(str) == str(best))
    torch.set_num_threads(1)  # the trial's cpus_per_trial, as reproduce runs it
    history = fit(TrainConfig.from_dict(config), fmnist.load(tiny_data_dir), stop_after=int(mine.sum()))
    for m in history:
        at = mine & (h["epoch"] == m["epoch"])
        for k, v in m.items():
            if k in h and k not in TIMING_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool):
                h.loc[at, k] = v
    h.to_csv(d / "history.csv", index=False)
    p = in_process(capsys, reproduce.main, d, "--data-dir", tiny_data_dir)
    assert p.returncode == 0 and "reproduced: all" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
    table = pd.read_csv(d / "reproduce" / str(best) / "comparison.csv")
    assert (table["diff"] == 0).all() and {"val_loss", "train_loss", "test_acc"} <= set(table["metric"])
