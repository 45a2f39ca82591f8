"""The cost metrics against a hand count, and a tiny real multi-objective study."""
import numpy as np
import optuna
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from conftest import in_process, run_study, tiny_spec, write_spec
from csnn import efficiency
from csnn.model import CSNN
from study import analyze, results


def identity_bn(bn):
    bn.eval()
    bn.running_mean.zero_(); bn.running_var.fill_(1 - bn.eps)  # so that BN(x) = x exactly
    bn.weight.data.fill_(1.0); bn.bias.data.zero_()


def test_counts_match_a_hand_count():
    """1 channel, T 2; k pixels of value 1.5, each alone in its 2x2 pooling window
    and away from the border. conv1 and conv2 pass the value through (centre
    weight 1, the others 0.01: too little to fire), so each pixel spikes at every
    step in layers 2 and 6; fc1's weights (0.001) are too small for layers 10 and
    12 to fire. No weight or input is binary, so only spikes count as SynOps."""
    T, k = 2, 3
    net = CSNN(T=T, channels=1).eval()
    for conv in (net.conv_fc[0], net.conv_fc[4]):
        conv.weight.data.fill_(0.01); conv.weight.data[0, 0, 1, 1] = 1.0
    identity_bn(net.conv_fc[1]); identity_bn(net.conv_fc[5])
    net.conv_fc[9].weight.data.fill_(0.001)
    x = torch.zeros(1, 1, 28, 28)
    for r, c in ((8, 8), (12, 16), (16, 12)):  # pooled twice: (2,2), (3,4), (4,3) in the 7x7 map
        x[0, 0, r, c] = 1.5
    rates = []
    with torch.no_grad():
        net(x, rates)
    rates = [r.item() for r in rates]
    assert efficiency.spikes_per_image(net, rates) == pytest.approx(2 * k * T)  # layers 2 and 6

    got = efficiency.count(net, x)
    # SynOps: conv2 receives k spikes per step, each reaching 9 outputs x 1 channel;
    # fc1 receives k spikes per step, each reaching its 16 outputs; fc2 receives none.
    assert got["synops_per_image"] == k * T * 9 + k * T * 16
    # MACs: conv1 on the image once (28*28 outputs x 9 weights), then one per element
    # of each BatchNorm (BN1 once, BN2 at every step).
    assert got["macs_per_image"] == 28 * 28 * 9 + 28 * 28 + T * 14 * 14
    assert got["energy_uj"] == pytest.approx((4.6 * got["macs_per_image"] + 0.9 * got["acs_per_image"]) / 1e6)
    assert got["acs_per_image"] >= got["synops_per_image"]  # SynOps plus the neurons' own accumulates


def test_counting_leaves_the_model_as_it_was():
    net = CSNN(T=2, channels=4)
    net.fuse()
    net.train()
    efficiency.count(net, torch.rand(4, 1, 28, 28))
    assert net.training and all(m.fused for m in net.conv_fc if hasattr(m, "fused"))
    assert isinstance(net.conv_fc[2].v, float)  # reset


def test_tiny_multi_objective_study(tmp_path, tiny_data_dir, local_ray, capsys):
    spec = tiny_spec("pareto",
                     objective=[{"metric": "val_acc", "mode": "max"}, {"metric": "energy_uj", "mode": "min"}],
                     train={"epochs": 1},
                     space={"T": {"type": "int", "low": 1, "high": 3},
                            "channels": {"type": "categorical", "choices": [2, 4, 6]},
                            "lr": {"type": "float", "low": 0.003, "high": 0.03, "log": True}},
                     # one trial at a time: one trial worker for the five (Ray Tune's reuse_actors), not two
                     search={"sampler": "tpe", "num_samples": 5, "max_concurrent": 1},
                     retrain={"seeds": [0], "pick": "knee"}, render={"images": 1})
    spec["train"].pop("T")
    space = write_spec(tmp_path, spec)
    p = run_study(capsys, space, tmp_path, tiny_data_dir)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "Pareto front of max val_acc, min energy_uj" in p.stdout
    d = tmp_path / "results" / "pareto"
    trials = pd.read_csv(d / "trials.csv")
    best = yaml.safe_load((d / "best.yaml").read_text())
    front = {e["trial_id"] for e in best["pareto"]}
    assert front and best["trial_id"] in front and best["pick"] == "knee"
    # every trial on the front is beaten by no trial; every other trial is
    # a network silent or dead at its last epoch is on no front (its output does not depend on its input)
    nothing = trials["silent"].notna() | trials["dead"].notna()
    ok = trials[(trials["status"] != "errored") & ~nothing]
    assert not front & set(trials.loc[nothing, "trial_id"])
    for _, r in ok.iterrows():
        beaten = ((ok["val_acc"] >= r["val_acc"]) & (ok["energy_uj"] <= r["energy_uj"])
                  & ((ok["val_acc"] > r["val_acc"]) | (ok["energy_uj"] < r["energy_uj"]))).any()
        assert beaten == (r["trial_id"] not in front)
    for e in best["pareto"]:
        assert [o["metric"] for o in e["objective"]] == ["val_acc", "energy_uj"]
    assert (trials["energy_uj"] > 0).all() and (trials["synops_per_image"] > 0).any()  # a silent net has none
    stored = optuna.load_study(study_name="pareto", storage=f"sqlite:///{d / 'optuna.db'}")
    assert stored.metric_names == ["val_acc", "energy_uj"]  # optuna-dashboard's labels for the two objectives

    from study import analyze

    a = in_process(capsys, analyze.main, d)
    assert a.returncode == 0, a.stderr[-3000:]
    img = np.asarray(Image.open(d / "report" / "pareto.png").convert("L"))
    assert img.shape[1] >= 1000 and img.std() > 5
    report = (d / "report" / "report.md").read_text()
    assert f"## Pareto front of max val_acc, min energy_uj: {len(front)} trials" in report and "](pareto.png)" in report


def test_a_constraint_is_told_to_optuna_and_keeps_its_trials_off_the_front_and_the_pick(tmp_path, tiny_data_dir,
                                                                                         local_ray, capsys):
    """A real study whose constraint is decided by the architecture alone: MACs per image are counted
    from channels and T (16,464 at 2 channels and 32,928 at 4 with T 2: not from the weights nor the images). With
    macs_per_image an objective to minimise, every trial of 2 channels is on the unconstrained front (none
    has fewer MACs), and the constraint `min 20000` breaks exactly those: the front, the pick and Optuna's
    own feasible trials hold trials of 4 channels only. TPE's seed 0 draws 4 then 2 channels (at random: the
    start-up of a 2-trial study)."""
    from optuna.study._constrained_optimization import _get_feasible_trials  # what TPE, NSGA-II and GP read

    spec = tiny_spec("limits", objective=[{"metric": "val_acc", "mode": "max"}, {"metric": "macs_per_image", "mode": "min"}],
                     constraints={"macs_per_image": {"min": 20_000}},
                     train={"epochs": 1, "lr": 0.01}, search={"sampler": "tpe", "seed": 0, "num_samples": 2, "max_concurrent": 1},  # one worker
                     scheduler={"type": "none", "silent_rate": 0},  # no trial off the front for being silent
                     retrain={"seeds": [], "pick": "most_accurate"}, render={"images": 0})
    spec["space"] = {"channels": {"type": "categorical", "choices": [2, 4]}}
    p = run_study(capsys, write_spec(tmp_path, spec), tmp_path, tiny_data_dir)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    d = tmp_path / "results" / "limits"
    trials = pd.read_csv(d / "trials.csv", dtype={"trial_id": str})
    broke = trials["channels"] == 2
    assert broke.any() and (~broke).any(), trials[["channels", "macs_per_image"]]
    assert trials.loc[broke, "constraint"].eq("macs_per_image 16464 < min 20000").all(), trials["constraint"]
    assert trials.loc[~broke, "constraint"].isna().all() and (trials["status"] == "finished").all()

    # told: every trial every constraint, the MACs' one by how far below the bound (a share of it); values too
    stored = optuna.load_study(study_name="limits", storage=f"sqlite:///{d / 'optuna.db'}")
    by_id = trials.set_index("trial_id")
    for t in stored.trials:
        row = by_id.loc[t.user_attrs["ray_trial_id"]]
        assert t.constraints == {"silent": 0.0, "dead": 0.0,
                                 "macs_per_image.min": pytest.approx((20_000 - row["macs_per_image"]) / 20_000)}
        assert t.user_attrs.get("constraint") == (row["constraint"] if row["channels"] == 2 else None)
        assert t.state.name == "COMPLETE" and t.values == pytest.approx([row["val_acc"], row["macs_per_image"]])
    feasible = {t.user_attrs["ray_trial_id"] for t in _get_feasible_trials(stored.trials)}
    assert feasible == set(trials.loc[~broke, "trial_id"])

    # kept off the front and the pick: the front is Optuna's own (feasible) front, of 4 channels only
    best = yaml.safe_load((d / "best.yaml").read_text())
    front = {e["trial_id"] for e in best["pareto"]}
    assert front == {t.user_attrs["ray_trial_id"] for t in stored.best_trials} and front <= feasible
    assert best["trial_id"] in front and best["config"]["channels"] == 4
    assert best["metrics"]["val_acc"] == trials.loc[~broke, "val_acc"].max()
    assert f"; {int(broke.sum())} broke a constraint" in p.stdout  # study.run's progress lines count them
    lines = "\n".join(analyze.summary(results.load(d)))
    assert f"## Constraints: {int(broke.sum())} of 2 trials broke one" in lines, lines
    assert f"- `macs_per_image` min 20000: {int(broke.sum())} broke it" in lines
    for tid in trials.loc[broke, "trial_id"]:
        assert f"- trial {tid}: macs_per_image 16464 < min 20000" in lines


def test_a_hand_made_front_its_table_and_an_index_beyond_it():
    """spikes_per_image as an objective appears once in the Pareto table; retrain.pick
    index 99 on a one-trial front takes that trial and says so."""
    from study import analyze, results, spec as specs
    from study.storage import Location

    spec = specs.parse(tiny_spec("f", objective=[{"metric": "val_acc", "mode": "max"},
                                                 {"metric": "spikes_per_image", "mode": "min"}],
                                 retrain={"seeds": [0], "pick": "index 99"}))
    trials = pd.DataFrame([
        {"trial_id": "a", "status": "finished", "channels": 4, "lr": 0.01, "val_acc": 0.8, "spikes_per_image": 10.0,
         "synops_per_image": 5.0},
        {"trial_id": "b", "status": "finished", "channels": 6, "lr": 0.02, "val_acc": 0.7, "spikes_per_image": 20.0,
         "synops_per_image": 6.0}])
    front = results.pareto(trials, spec)
    assert front["trial_id"].tolist() == ["a"]
    with pytest.warns(UserWarning, match=r"the Pareto front has 1 trial\(s\); taking its last, index 0"):
        assert results.pick(front, spec)["trial_id"] == "a"
    lines = analyze.pareto_lines(results.Study(Location.parse("."), spec, trials, pd.DataFrame(), None, None, None))
    header = lines[2].splitlines()[1].split()
    assert header == ["trial_id", "channels", "lr", "val_acc", "spikes_per_image", "synops_per_image"]


def test_a_leaky_neuron_costs_its_decays_and_nothing_else():
    """SpikingJelly's counters on our LIF and PLIF networks against IF with the same weights: the
    accumulates beside the synaptic ones (ACs - SynOps: the neurons' own updates, BatchNorm, the
    readout) grow by the decays of config.NEURONS, each two ACs (v - v_reset and x - that; the
    division by tau is neither a MAC nor an AC to them), per neuron and step. Every layer fires
    here (weights x4): a layer silent at a step would hand the next all-zero inputs, which the
    counters count as binary."""
    from csnn.config import NEURONS
    from csnn.efficiency import ACS_PER_DECAY

    torch.manual_seed(0)
    x = torch.rand(8, 1, 28, 28) * 3
    base = CSNN(T=4, channels=8)
    with torch.no_grad():
        for m in base.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                m.weight.mul_(4)
    own = {}
    for neuron in NEURONS:
        net = CSNN(T=4, channels=8, neuron=neuron)
        net.load_state_dict(base.state_dict(), strict=False)  # PLIF's own w: its initial tau 2, LIF's tau
        c = efficiency.count(net, x)
        own[neuron] = c["acs_per_image"] - c["synops_per_image"]
    steps = 4 * sum(base.neurons_per_image)
    assert own["lif"] - own["if"] == NEURONS["lif"]["decays"] * ACS_PER_DECAY * steps == 2 * steps
    assert own["plif"] == own["lif"]  # the same dynamics, tau a parameter (its sigmoid once per call, not counted)
