"""Early stopping for spiking networks and several objectives (study.stopping), on
hand-made trial results, and in real Ray Tune studies on tiny real data."""
import math
import re

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
import yaml
from ray.tune.schedulers import TrialScheduler

from conftest import run_study, tiny_spec, write_spec
from csnn import data as fmnist
from csnn.config import DEAD_SHARE, TrainConfig, dead_network
from csnn.train import fit
from csnn.trainable import SILENT_MIN_IMAGES, ended
from study import analyze, results, warmstart
from study.stopping import MultiObjectiveASHA, crowding, fronts, keeps

STOP, GO = TrialScheduler.STOP, TrialScheduler.CONTINUE


def test_fronts_sort_by_domination():
    # to minimise: (1,4) (2,2) (4,1) trade off; (3,3) is beaten by (2,2); (5,5) by all
    costs = np.array([[3, 3], [1, 4], [5, 5], [2, 2], [4, 1]], float)
    assert fronts(costs) == [[1, 3, 4], [0], [2]]
    assert fronts(np.array([[1, 1], [1, 1]], float)) == [[0, 1]]  # equal points beat neither


def test_crowding_distance_ends_infinite_middle_by_neighbours():
    d = crowding(np.array([[0, 4], [1, 2], [4, 0], [3, 1]], float))
    assert math.isinf(d[0]) and math.isinf(d[2])
    assert d[1] == pytest.approx((3 - 0) / 4 + (4 - 1) / 4) and d[3] == pytest.approx((4 - 1) / 4 + (2 - 0) / 4)


def test_keeps_the_best_fronts_and_breaks_ties_by_crowding():
    assert keeps([], [1.0, 1.0], 3)  # the first at a rung goes on
    # on the front of three, rf 3 keeps one of four: the new point must lead
    recorded = [[0.0, 4.0], [4.0, 0.0], [5.0, 5.0]]
    assert not keeps(recorded, [2.0, 2.0], 3)  # on the front, but the ends' crowding is infinite
    assert keeps(recorded[:2], [-1.0, -1.0], 3)  # beats both: alone on the first front
    assert not keeps(recorded, [6.0, 6.0], 2)  # dominated by all
    # rf 2 keeps two of four: the two front ends (infinite crowding) before the middle point
    assert keeps([[0.0, 4.0], [5.0, 5.0], [1.0, 3.5]], [4.0, 0.0], 2)
    assert not keeps([[0.0, 4.0], [4.0, 0.0], [5.0, 5.0]], [1.0, 3.5], 2)
    # the cheap end of an accuracy-energy front survives a single-metric cut
    assert keeps([[-0.9, 10.0], [-0.85, 9.0], [-0.8, 8.0]], [-0.3, 0.5], 2)


def test_keeps_an_exact_tie_and_ranks_a_missing_metric_last():
    assert keeps([[1.0, 1.0]], [1.0, 1.0], 2)  # a tie goes on, as in Ray's ASHA
    assert not keeps([[1.0, 1.0]], None, 2)  # cannot be compared: behind every complete point
    assert not keeps([[1.0, 1.0]], [math.nan, 0.0], 2)
    assert keeps([None], [9.0, 9.0], 2)  # a complete point before one that is not
    assert keeps([], None, 2)  # alone at the rung: nothing to compare with


def test_scheduler_decides_once_per_rung_in_arrival_order():
    s = MultiObjectiveASHA(["val_acc", "energy_uj"], ["max", "min"], max_t=8, grace_period=1, reduction_factor=2)
    assert sorted(s.rungs) == [1, 2, 4, 8]
    r = lambda t, acc, e: {"training_iteration": t, "val_acc": acc, "energy_uj": e}  # noqa: E731
    assert s.decide("a", r(1, 0.8, 5.0)) == GO  # first at rung 1
    assert s.decide("b", r(1, 0.7, 6.0)) == STOP  # dominated by a
    assert s.decide("c", r(1, 0.5, 1.0)) == GO  # the cheap end: a front of a and c, c's crowding infinite
    assert s.decide("a", r(1, 0.1, 99.0)) == GO  # a was decided at rung 1 already
    assert s.decide("a", r(2, 0.85, 5.0)) == GO  # first at rung 2
    assert s.decide("c", r(3, 0.55, 1.0)) == GO  # still rung 2 (3 < 4): on the front with a
    assert s.decide("c", r(3, 0.0, 9.0)) == GO  # decided at rung 2 already
    assert s.decide("d", r(2, 0.7, 7.0)) == STOP  # dominated by a and c at rung 2
    assert s.decide("e", {"training_iteration": 2, "val_acc": 0.9}) == STOP  # no energy_uj: ranked last
    assert s.decide("a", r(8, 0.9, 5.0)) == STOP  # max_t
    assert s.decide("f", {"val_acc": 0.9}) == GO  # no time attribute: nothing to decide
    assert s.num_stopped == 3  # at rungs: b, d, e


# The real studies here run one trial at a time (max_concurrent 1): Ray Tune reuses the one trial worker
# (reuse_actors) instead of starting two that each import torch, Ray and SpikingJelly (~4 CPU-s each).
SILENT = {  # measured: on these 600 images SGD lr 1000 leaves a layer of 4 channels silent from the first epoch on
    "channels": {"type": "categorical", "choices": [4]},
    "optimizer": {"type": "categorical", "choices": ["adam", "sgd"]},
    "lr": {"depends_on": "optimizer", "cases": {"adam": {"type": "categorical", "choices": [0.01]},
                                                "sgd": {"type": "categorical", "choices": [1000.0]}}},
}


# One study for both stops (each a study of its own before: a Ray Tune run and its trial worker saved, and
# 32 trial-epochs instead of 67): SGD lr 1000 leaves a layer of 4 channels silent, SGD lr 300 makes the network
# dead (test_the_dead_stop_on_real_training_ends_networks_that_fire_for_one_class), Adam lr 0.01 learns. The
# random sampler's seed 0 draws them in that order (simulated with study.spec and Optuna's sampler).
STOPS = {"channels": SILENT["channels"], "optimizer": SILENT["optimizer"],
         "lr": {"depends_on": "optimizer", "cases": {"adam": SILENT["lr"]["cases"]["adam"],
                                                    "sgd": {"type": "categorical", "choices": [1000.0, 300.0]}}}}


def test_silent_and_dead_networks_stop_after_two_such_epochs_and_are_told_as_infeasible(tmp_path, tiny_data_dir,
                                                                                        local_ray, capsys):
    # 500 training images an epoch: the silent and the dead stop may act from epoch 10 (SILENT_MIN_IMAGES 5,000)
    spec = tiny_spec("stops", train={"epochs": 12, "T": 2}, space=STOPS,
                     search={"sampler": "random", "seed": 0, "num_samples": 3, "max_concurrent": 1},
                     retrain={"seeds": []})
    del spec["train"]["optimizer"]  # searched
    p = run_study(capsys, write_spec(tmp_path, spec), tmp_path, tiny_data_dir)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    d = tmp_path / "results" / "stops"
    trials = pd.read_csv(d / "trials.csv")
    assert sorted(zip(trials["optimizer"], trials["lr"])) == [("adam", 0.01), ("sgd", 300.0), ("sgd", 1000.0)], \
        trials[["optimizer", "lr", "status", "epochs_run"]]
    sgd, adam = trials[trials["lr"] == 1000.0], trials[trials["optimizer"] == "adam"]  # silent, learning
    by_lr = trials.set_index("lr")
    dead, learns = by_lr.loc[300.0], by_lr.loc[0.01]
    # the silent stop
    assert (sgd["status"] == "silent").all() and (sgd["epochs_run"] == 10).all() and (sgd["val_acc"] == 0.1).all()
    assert sgd["silent"].str.fullmatch(r"fr_\d+(,fr_\d+)*").all()  # the layers that stopped firing
    assert (adam["status"] == "finished").all() and (adam["epochs_run"] == 12).all() and adam["silent"].isna().all()
    best = yaml.safe_load((d / "best.yaml").read_text())
    assert best["params"]["optimizer"] == "adam"
    # the dead stop
    assert (dead["status"], dead["epochs_run"], dead["val_acc"]) == ("dead", 10, 0.1) and dead["fr_12"] > 0.001
    assert dead["dead"] == f"predicts class {dead['top_class']} for 100.0% of training images"
    assert pd.isna(dead["silent"]) and pd.isna(learns["dead"]) and sgd["dead"].isna().all()
    assert (learns["status"], learns["epochs_run"]) == ("finished", 12) and learns["top_class_share"] < 0.5

    # what the samplers read: a violated constraint on the silent and the dead trial only
    study = optuna.load_study(study_name="stops", storage=f"sqlite:///{d / 'optuna.db'}")
    lr = lambda t: t.params[f"lr[optimizer={t.params['optimizer']}]"]  # noqa: E731 (Optuna's name for each case)
    told = {lr(t): t for t in study.trials}
    # (every trial is told every constraint, 0 where it is met: GPSampler refuses trials that name different ones)
    assert told[1000.0].constraints == {"silent": 1.0, "dead": 0.0} and told[1000.0].user_attrs["silent"] in set(sgd["silent"])
    assert told[300.0].constraints == {"silent": 0.0, "dead": 1.0} and told[300.0].user_attrs["dead"] == dead["dead"]
    assert told[0.01].constraints == {"silent": 0.0, "dead": 0.0} and told[0.01].state.name == "COMPLETE"
    # and a study warm-started from this one tells its sampler the same
    s = results.load(d)
    warm = {lr(t): t for t in warmstart.plan(s.spec, [str(d)])[0]["told"]}
    assert warm[300.0].constraints == {"silent": 0.0, "dead": 1.0} and warm[0.01].constraints == {"silent": 0.0, "dead": 0.0}
    assert warm[1000.0].constraints == {"silent": 1.0, "dead": 0.0}

    lines = "\n".join(analyze.summary(s))
    assert "Trials: 3 — 1 finished, 0 stopped, 1 ended by the silent stop, 1 ended by the dead stop, 0 errored; " \
        "1 silent and 1 dead at their last epoch (below)" in lines, lines
    assert f"Silent networks: {len(sgd)} of 3 trials" in lines, lines
    assert f"{len(sgd)} were ended so by the silent stop (they ran {10 * len(sgd)} epochs of the {12 * len(sgd)}" in lines
    assert f"adam 0/{len(adam)} silent, sgd {len(sgd)}/2 silent" in lines, lines
    assert "Dead networks: 1 of 3 trials" in lines and "1 were ended so by the dead stop (they ran 10 epochs of the 12" \
        in lines and "- `lr`: 0.01 0/1 dead, 300 1/1 dead, 1000 0/1 dead" in lines, lines
    assert f"{len(sgd)} silent" in p.stdout  # the status counts study.run prints
    assert re.search(r"trials 3/3: 1 finished, 0 stopped, 1 silent, 1 dead, 0 running", p.stdout), p.stdout  # its line

    # silent_rate 0: the same network runs all its epochs
    off = tiny_spec("loud", train={"epochs": 3, "T": 2, "optimizer": "sgd"}, search={"num_samples": 1},
                    scheduler={"silent_rate": 0}, retrain={"seeds": []})
    off["space"] = {"channels": SILENT["channels"], "lr": SILENT["lr"]["cases"]["sgd"]}
    p = run_study(capsys, write_spec(tmp_path, off), tmp_path, tiny_data_dir)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    loud = pd.read_csv(tmp_path / "results" / "loud" / "trials.csv")
    assert loud["status"].tolist() == ["finished"] and loud["epochs_run"].tolist() == [3]
    h = pd.read_csv(tmp_path / "results" / "loud" / "history.csv")
    assert (h.filter(like="fr_").min(axis=1) == 0).all()  # silent all along, and not stopped


def test_the_dead_stop_on_real_training_ends_networks_that_fire_for_one_class(real_data):
    """The rule csnn.trainable applies at each report, on what fit reports for a real dead network on
    the tiny study's 500 training images (SGD lr 300: from its second epoch on, one output neuron fires
    at every step, fr_12 0.1, whatever the image)."""
    s = fmnist.split(real_data, train_size=600, test_size=200, seed=0)  # tiny_data_dir's images
    data = fmnist.FashionMNIST(*s["train"], *s["test"])
    torch.set_num_threads(1)  # as a trial trains (Ray's OMP_NUM_THREADS=1); two contend on a loaded machine (x10 time)
    dead = fit(TrainConfig(T=2, channels=4, optimizer="sgd", lr=300.0, epochs=3, batch_size=50, val_size=100,
                           test_size=100, device="cpu"), data)  # a learning network: the study below
    a, b = dead[1], dead[2]
    assert a["top_class_share"] == b["top_class_share"] == 1.0 and b["fr_12"] > 0.001 and b["val_acc"] == 0.1
    # every image predicted as top_class: it was right exactly for the images of that class
    train_y = fmnist.split(data, 100, 0, 100, 0)["train"][1]
    assert b["train_acc"] == int((train_y == b["top_class"]).sum()) / len(train_y)
    assert ended(a, b, SILENT_MIN_IMAGES, 0.001) == {"dead": f"predicts class {b['top_class']} for 100.0% of training images"}
    assert ended(a, b, SILENT_MIN_IMAGES - 1, 0.001) == {}  # not before 5,000 images
    assert ended(a, b, SILENT_MIN_IMAGES, 0) == {}  # silent_rate 0 turns both stops off
    assert dead[0]["top_class_share"] < DEAD_SHARE and ended(dead[0], dead[1], SILENT_MIN_IMAGES, 0.001) == {}
    # a silent output layer predicts class 0 (every output 0) for every image too: that network is silent, not dead
    silent = {**dead[2], "fr_12": 0.0, "top_class": 0}
    assert dead_network(silent, 0.001) == "" and ended(silent, silent, SILENT_MIN_IMAGES, 0.001) == {"silent": "fr_12"}
    assert ended(dead[1], silent, SILENT_MIN_IMAGES, 0.001) == ended(silent, dead[2], SILENT_MIN_IMAGES, 0.001) == {}


def test_a_network_silent_by_its_threshold_or_tau_is_told_silent_not_dead(real_data):
    """The silent rule on real networks that no learning rate silences: a threshold no input reaches
    (v_threshold 1000) and a LIF neuron whose leak keeps it below the tutorial's threshold on the
    same images (tau 200: each step adds a 200th of its input). Each is silent in every layer, and
    the rule says so (not dead: a silent output predicts class 0 for every image); the tutorial's
    neuron on the same seed fires."""
    s = fmnist.split(real_data, train_size=600, test_size=200, seed=0)  # tiny_data_dir's images
    data = fmnist.FashionMNIST(*s["train"], *s["test"])
    torch.set_num_threads(1)
    base = dict(T=2, channels=4, optimizer="adam", lr=0.01, epochs=2, batch_size=50, val_size=100, test_size=100,
                device="cpu")
    for keys in ({"v_threshold": 1000.0}, {"neuron": "lif", "tau": 200.0}):
        a, b = fit(TrainConfig(**base, **keys), data)
        assert [b[f"fr_{i}"] for i in (2, 6, 10, 12)] == [0.0] * 4 and b["val_acc"] == 0.1, keys
        assert sorted(ended(a, b, SILENT_MIN_IMAGES, 0.001)["silent"].split(",")) == ["fr_10", "fr_12", "fr_2", "fr_6"]
        assert dead_network(b, 0.001) == ""
    firing = fit(TrainConfig(**base), data)[-1]  # its output layer may be quiet this early; its encoder is not
    assert firing["fr_2"] > 0.001 and firing["fr_6"] > 0.001


@pytest.mark.smoke  # .ci/run's newest-versions set
def test_multi_objective_asha_in_a_real_study_stops_what_the_fronts_say(tmp_path, tiny_data_dir, local_ray, capsys):
    """One trial at a time, so trials reach each rung in their order: replaying the
    rung decisions from history.csv with keeps() gives exactly the trials Ray stopped."""
    spec = tiny_spec("moasha", objective=[{"metric": "val_acc", "mode": "max"},
                                          {"metric": "spikes_per_image", "mode": "min"}],
                     train={"epochs": 4}, search={"sampler": "random", "num_samples": 6, "max_concurrent": 1},
                     scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2}, retrain={"seeds": []})
    p = run_study(capsys, write_spec(tmp_path, spec), tmp_path, tiny_data_dir)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    d = tmp_path / "results" / "moasha"
    trials = pd.read_csv(d / "trials.csv").sort_values("number")
    history = pd.read_csv(d / "history.csv")
    recorded = {1: [], 2: []}
    expected_stop = {}
    for tid in trials["trial_id"]:
        h = history[history["trial_id"] == tid].set_index("epoch")
        for rung in (1, 2):
            if rung - 1 not in h.index:
                break
            costs = [-h.loc[rung - 1, "val_acc"], h.loc[rung - 1, "spikes_per_image"]]
            go = keeps(recorded[rung], costs, 2)
            recorded[rung].append(costs)
            if not go:
                expected_stop[tid] = rung
                break
    ran = dict(zip(trials["trial_id"], trials["epochs_run"]))
    assert {t: ran[t] for t in expected_stop} == expected_stop  # stopped right at the rung that said so
    assert all(ran[t] == 4 for t in ran if t not in expected_stop)
    assert expected_stop and len(expected_stop) < len(ran), ran  # something was stopped, not everything
    assert set(trials.loc[trials["trial_id"].isin(expected_stop), "status"]) == {"stopped"}
    quiet = trials["silent"].notna()  # the layers silent at the last epoch: off the front
    assert (quiet == (trials.filter(regex=r"^fr_").min(axis=1) < 0.001)).all()
    front = results.pareto(trials, results.load(d).spec)
    assert len(front) and not front["silent"].notna().any()


def test_hypervolume_scales_to_the_fronts_and_leaves_silent_trials_out():
    from study.spec import parse

    spec = parse(tiny_spec("hv", objective=[{"metric": "val_acc", "mode": "max"}, {"metric": "energy_uj", "mode": "min"}]))
    rows = lambda *r: pd.DataFrame(r, columns=["trial_id", "status", "val_acc", "energy_uj", "epochs_run",  # noqa: E731
                                               "silent"])
    a = rows(("a1", "finished", 0.9, 10.0, 4, None), ("a2", "stopped", 0.5, 1.0, 1, None),
             ("a3", "finished", 0.4, 5.0, 4, None),
             ("a4", "stopped", 0.1, 0.0, 2, "fr_12"))  # silent at its last epoch: cheapest of all, on no front
    b = rows(("b1", "finished", 0.9, 10.0, 4, None))
    study = lambda t: results.Study(None, spec, t, pd.DataFrame(), None, None, None, trials_file="t")  # noqa: E731
    # scaled: a1 (0, 1), a2 (1, 0); reference (1.1, 1.1): two 1.1 x 0.1 strips overlapping by 0.1 x 0.1
    assert results.hypervolumes([study(a), study(b)], spec) == pytest.approx([0.21, 0.11])
    lines = analyze.compare(study(a), study(b))
    assert lines[0] == "trial-epochs: hv 11, hv 4 (ratio 2.750)"
    assert lines[1].startswith("hypervolume of the Pareto front: hv 0.2100, hv 0.1100 (ratio 1.9091;")
    none = rows(("n1", "errored", None, None, 1, None))
    assert results.hypervolumes([study(none), study(none)], spec) == [0.0, 0.0]  # no front at all
    assert analyze.compare(study(none), study(b.iloc[0:0]))[0] == "trial-epochs: hv 1, hv 0"


def test_a_study_in_which_no_trial_learned_ends_saying_so(tmp_path, tiny_data_dir, local_ray, capsys):
    """Every trial silent (SGD lr 1000 on 4 channels: silent from the first epoch on; two epochs of 500
    images, too few for the silent stop, so the trials finish): exit 0 and one line saying that no trial
    learned and why, a header whose counts agree with the silent section, nothing picked or retrained
    (two objectives: a silent network is on no Pareto front), and no progress line naming a best."""
    spec = tiny_spec("nolearner", objective=[{"metric": "val_acc", "mode": "max"},
                                             {"metric": "energy_uj", "mode": "min"}],
                     train={"epochs": 2, "T": 2, "optimizer": "sgd"},
                     space={"channels": SILENT["channels"], "lr": SILENT["lr"]["cases"]["sgd"]},
                     search={"sampler": "random", "num_samples": 2, "max_concurrent": 1},
                     retrain={"seeds": [0], "epochs": 1, "pick": "knee"})
    p = run_study(capsys, write_spec(tmp_path, spec), tmp_path, tiny_data_dir)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "error" not in p.stderr and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert ("**No trial learned**: all 2 trials that reported were silent or dead networks at their last epoch "
            "(2 silent: a spiking layer fired below scheduler.silent_rate 0.001") in p.stdout, p.stdout[-3000:]
    assert "None is on a Pareto front, so no trial is picked and nothing is retrained" in p.stdout
    assert "Trials: 2 — 2 finished, 0 stopped, 0 ended by the silent stop, 0 errored; 2 silent at their last epoch" \
        in p.stdout and "## Silent networks: 2 of 2 trials" in p.stdout, p.stdout[-3000:]
    progress = [line for line in p.stdout.splitlines() if re.match(r"^\[\d+:\d\d", line)]
    assert progress and not any("best val_acc" in line for line in progress), progress
    assert progress[-1].endswith("no trial has learned yet"), progress
    d = tmp_path / "results" / "nolearner"
    assert not (d / "best.yaml").exists() and not (d / "best").exists() and (d / "trials.csv").is_file()
    space = tmp_path / "nolearner.yaml"  # and what --resume and --retrain then say
    p = run_study(capsys, space, tmp_path, tiny_data_dir, "--resume")
    assert p.returncode == 0 and "in which no trial learned: nothing to resume or retrain" in p.stdout, p.stdout
    p = run_study(capsys, space, tmp_path, tiny_data_dir, "--retrain")
    assert p.returncode == 2 and "no trial learned; nothing to retrain" in p.stderr, p.stderr


def test_the_progress_line_never_names_a_trial_that_learned_nothing_as_best(capsys):
    """Progress, fed as Ray Tune feeds its callbacks: a silent report (a layer below silent_rate, or the
    trainable's own word) takes its trial out of the best until it fires again; an errored trial too."""
    from types import SimpleNamespace

    from study import spec as specs
    from study.progress import Progress

    p = Progress(specs.parse(tiny_spec("best", search={"num_samples": 3})), 0.0, 1, 0.0)
    trials = [SimpleNamespace(trial_id=t, status="RUNNING", last_result={}, config={"channels": 4, "lr": 0.01},
                              error_file=None)
              for t in "abc"]

    def report(trial, val_acc, fr_12, **more):
        capsys.readouterr()
        p.on_trial_result(0, trials, trials["abc".index(trial)], {"val_acc": val_acc, "fr_12": fr_12, **more})
        return capsys.readouterr().out

    assert "best val_acc 0.3 (trial a)" in report("a", 0.3, 0.05)
    assert report("b", 0.5, 0.0) == ""  # silent: not the best, and nothing changed
    assert report("c", 0.6, 0.05, silent="fr_12") == ""  # the trainable's silent stop
    assert "no trial has learned yet" in report("a", 0.1, 0.0)  # a went silent: its 0.3 no longer counts
    assert "best val_acc 0.5 (trial b)" in report("b", 0.2, 0.04)  # b fires again: its best value counts
    p.on_trial_error(0, trials, trials[1])
    assert p.best is None
