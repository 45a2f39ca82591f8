"""study.estimate: the cost of a study before it runs, checked against real studies on tiny real data;
the progress lines study.run prints instead of Ray Tune's tables; timing.yaml and the report."""
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from conftest import ROOT, calibrated_once, in_process, study_cmd, tiny_spec, write_spec
from csnn.config import TrainConfig
from study import analyze, estimate, results
from study import spec as specs
from study.run import main as study_run

ESTIMATE = re.compile(r"^estimate: wall (\d+(?:\.\d+)?) min, (\d+(?:\.\d+)?) GPU-hours, storage (\d+(?:\.\d+)?) (MB|GB) "
                      r"on (\d+) nodes? with", re.M)
PROGRESS = re.compile(r"^\[\d+:\d\d(?:, ~\d+:\d\d left)?\] trials (\d+)/(\d+): (\d+) finished, (\d+) stopped, "
                      r"(\d+) running, (\d+) errored", re.M)
SPACES = sorted((ROOT / "search_spaces").glob("*.yaml"))
CPU_SPEEDS = estimate.cpu_speeds  # the real calibration, taken at import: conftest's _calibrate_once stands in for it


@pytest.mark.parametrize("space", SPACES, ids=[s.stem for s in SPACES])
def test_the_dry_run_prints_an_estimate_for_every_search_space(space, tmp_path, capsys, monkeypatch):
    # What the spaces' estimates are made of: one real reading of this CPU for all of them, the tiny studies'
    # (1 thread, batches of 50: the reading that conftest's calibrated_once takes for this module's other
    # tests anyway), and the networks' ratios at those sizes. Each space's own threads and batch size would
    # be a calibration and a Python start each (4 of them, and 2 sets of ratios: these 7 tests took 90 s on the
    # loaded 2-core machine, 14 s so, 2026-12-08); how well a reading prices a study is checked against real
    # studies below.
    reading, ratios = calibrated_once(specs.parse(tiny_spec("reading"))), estimate.network_ratios
    monkeypatch.setattr(estimate, "cpu_speeds", lambda spec: reading)
    monkeypatch.setattr(estimate, "network_ratios", lambda spec, threads, batch_size: ratios(spec, 1, 50))
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    p = in_process(capsys, study_run, *study_cmd(space, tmp_path, "/usr/share/datasets/fashion-mnist", "--dry-run")[3:])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    found = ESTIMATE.findall(p.stdout)
    assert len(found) == 1, p.stdout[-2000:]
    minutes, gpu_hours, size, unit, nodes = found[0]
    assert float(minutes) > 0 and float(size) > 0 and int(nodes) == 1
    assert not (tmp_path / "results").exists()  # a dry run writes nothing
    spec = specs.load(space)
    wants_gpu = spec.resources["gpus_per_trial"] == "auto" or spec.resources["gpus_per_trial"] > 0
    if wants_gpu and not torch.cuda.is_available():  # this machine: the CPUs, and it says what the study needs
        assert "0 GPUs (the study would need --allow-cpu" in p.stdout and float(gpu_hours) == 0
    if space.stem == "fmnist" and not torch.cuda.is_available():
        assert float(minutes) > 60 * 5  # 48 trials of up to 16 epochs at up to 256 channels on 2 CPU cores: hours


def test_the_gpu_model_is_the_h200_table_scaled_by_the_networks_cost():
    ref = TrainConfig(T=4, channels=128, batch_size=128)
    train, evaluation = estimate.per_image_s(ref, "gpu", None)
    assert 1 / train == pytest.approx(18331) and 1 / evaluation == pytest.approx(74390)
    # 4 trainers on one GPU: 33.5k images/s in total, a quarter each
    assert 4 / estimate.per_image_s(ref, "gpu", None, share=4)[0] == pytest.approx(18331 * 33467 / 18618)
    big = estimate.per_image_s(TrainConfig(T=8, channels=256, batch_size=128), "gpu", None)[0]
    assert big / train == pytest.approx(estimate.macs(8, 256) / estimate.macs(4, 128)) and 7 < big / train < 9
    # a small network is host-bound: no faster per batch than the reference
    assert estimate.per_image_s(TrainConfig(T=2, channels=32, batch_size=128), "gpu", None)[0] == pytest.approx(train)


def test_asha_passes_one_in_reduction_factor_trials_per_rung_only_with_many_trials():
    fmnist = specs.load(ROOT / "search_spaces" / "fmnist.yaml")  # grace 2, reduction 3, 16 epochs: rungs 2, 6
    fmnist.search["num_samples"] = 2000
    f = estimate.epoch_fractions(fmnist, 16)
    assert f[:2] == [1, 1] and f[2:6] == [pytest.approx(1 / 3, abs=0.03)] * 4 and f[6:] == [pytest.approx(1 / 9, abs=0.03)] * 10
    none = specs.parse(tiny_spec("fifo"))
    assert estimate.epoch_fractions(none, 2) == [1, 1]
    # 4 trials, rungs at 1, 2, 4 and 8 of 10 epochs: the first trial at each rung always goes on, the second
    # half the time (it passes a rung of one trial when it ties or beats it), far from 1/2, 1/4, ... a rung
    few = specs.parse(tiny_spec("few", train={"epochs": 10}, search={"num_samples": 4},
                                scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2}))
    passes = estimate.asha_passes(few)
    assert (passes[0] == 1).all() and passes[1, 1:] == pytest.approx([0.5] * 4, abs=0.05)
    assert 4 * sum(estimate.epoch_fractions(few, 10)) > 20  # asymptotic halving: 10.5 trial-epochs
    # in_order with 2 at once: the first two are never stopped, the third and fourth see only the first (second)
    few.search.update(in_order=True, max_concurrent=2)
    passes = estimate.asha_passes(few)
    assert (passes[:2] == 1).all() and passes[2:, 1:] == pytest.approx(np.full((2, 4), 0.5), abs=0.05)
    # a --resume with 2 of the 4 ended: the trials left are the stopped ones' places
    assert estimate.epoch_fractions(few, 10, 2) == pytest.approx([1] + [0.5] * 9, abs=0.05)


@pytest.mark.parametrize("objectives,in_order", [(1, 0), (1, 2), (2, 0), (2, 3)])
def test_the_simulated_rungs_decide_as_the_studys_own_schedulers(objectives, in_order):
    """asha_alive's decisions, run for run, against the schedulers study.run gives Ray Tune (Ray's ASHA
    bracket in stopping.ResumableASHA, stopping.MultiObjectiveASHA) fed the same qualities trial by
    trial (each rung keeps its own records, so the order across rungs does not matter); two objectives
    on a line, where the Pareto rank is the one quality's rank."""
    from types import SimpleNamespace

    from study.stopping import MultiObjectiveASHA, ResumableASHA

    over = {"objective": [{"metric": "val_acc", "mode": "max"}, {"metric": "energy_uj", "mode": "min"}]} \
        if objectives == 2 else {}
    spec = specs.parse(tiny_spec("sim", train={"epochs": 9}, search={"num_samples": 9, "max_concurrent": in_order or 2,
                                                                     "in_order": bool(in_order)},
                                 scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2}, **over))
    quality = np.random.default_rng(1).random((40, 9)).round(1)  # rounded: ties too
    alive = estimate.asha_alive(spec, quality)
    rungs = [1, 2, 4, 8]
    for run, q in enumerate(quality):
        if objectives == 2:
            s = MultiObjectiveASHA(["val_acc", "energy_uj"], ["max", "min"], max_t=9, grace_period=1,
                                   reduction_factor=2, in_order=in_order)
        else:
            s = ResumableASHA(time_attr="training_iteration", metric="val_acc", mode="max", max_t=9, grace_period=1,
                              reduction_factor=2, in_order=in_order)
        for i in range(9):
            trial = SimpleNamespace(trial_id=f"t{i}", experiment_tag=f"{i + 1}_x", storage=None)
            s.on_trial_add(None, trial)
            ran = 9
            for epoch in range(1, 10):
                result = {"training_iteration": epoch, "val_acc": q[i], "energy_uj": -q[i]}
                if s.on_trial_result(None, trial, result) == "STOP":
                    ran = epoch
                    break
            want = [ran > r for r in rungs]  # still training after each rung
            assert list(alive[run, i, 1:]) == want, (run, i, q, ran)


def test_a_real_study_against_its_estimate_and_its_output(tiny_study):
    """The tiny e2e study (3 trials, ASHA, a 2-seed retrain and the spikes), run once for the suite."""
    d, p = tiny_study
    est = yaml.safe_load((d / "estimate.yaml").read_text())
    act = yaml.safe_load((d / "timing.yaml").read_text())
    assert set(est["phases_s"]) == set(act["phases_s"]) == {"startup", "ray_start", "search", "export", "retrain",
                                                             "spikes"}
    assert act["wall_s"] >= sum(act["phases_s"].values()) - 1
    # Predicted against actual wall time within a factor of 3, not the model's goal of 25 % (measured by
    # benchmarks/estimate_vs_actual.py): the fixed costs that dominate a study this small scale with one
    # measured Python start, whose reading on a shared 2-core machine moved 1.7x between two runs minutes
    # apart, so that a machine 2x faster or slower than the fit, or one that others load, still passes;
    # a factor of 3 still catches a model that is off by an order, or a phase counted in the wrong unit.
    # a sanity band (the +-25 % goal is benchmarks/estimate_vs_actual.py's): make test's other worker shares
    # the cores with this study (x3.0 seen with four workers), as a slower machine would
    assert 1 / 4 < act["wall_s"] / est["wall_s"] < 4, (est, act)
    assert act["phases_s"]["search"] > 0 and act["phases_s"]["retrain"] > act["phases_s"]["spikes"] > 0

    # the printed estimate is the one in estimate.yaml
    minutes = float(ESTIMATE.findall(p.stdout)[0][0])
    assert minutes == pytest.approx(est["wall_s"] / 60, abs=0.051)

    # one line per change, the last with every trial ended; none of Ray's tables, no trial's own output
    lines = PROGRESS.findall(p.stdout)
    assert lines and lines[-1][:2] == ("3", "3") and lines[-1][4] == "0", p.stdout[-3000:]
    ended = [int(a) for a, *_ in lines]
    assert ended == sorted(ended) and all(int(f) + int(s) + int(e) == int(n) for n, _, f, s, _, e in lines)
    assert "best val_acc" in p.stdout and re.search(r", ~\d+:\d\d left\] trials 3/3", p.stdout)
    assert "Trial status:" not in p.stdout and "╭" not in p.stdout and "csnn: training on" not in p.stdout
    assert re.search(r"^retraining the best configuration .*, about \d+\.\d min$", p.stdout, re.M)
    assert re.search(r"^rendering the encoder spikes of 2 test images at 2 time steps, about \d+ s$", p.stdout, re.M)

    # the checkpoint the model sizes: weights + Adam's two moments, float32 (plus the RNG states and config)
    ckpt = d / "best" / "seed0" / "checkpoint_latest.pth"
    channels = yaml.safe_load((d / "best.yaml").read_text())["config"]["channels"]
    assert 0.9 < ckpt.stat().st_size / estimate.checkpoint_bytes(channels, "adam") < 1.5

    # the report sets them side by side
    path = analyze.report(results.load(d), 3)
    text = Path(path).read_text()
    assert "## Predicted against actual time" in text
    rows = {r.split("|")[1].strip(): r for r in text.splitlines() if r.startswith("| ")}
    for phase in ("startup", "ray start", "search", "export", "retrain", "spikes", "**wall**"):
        cells = [c.strip() for c in rows[phase].split("|")[2:5]]
        assert all(re.fullmatch(r"\d+(\.\d)?", c) for c in cells[:2]), rows[phase]
    assert float(rows["**wall**"].split("|")[3]) == pytest.approx(act["wall_s"], abs=0.51)


def test_verbose_prints_rays_tables_and_asha_with_few_trials_costs_what_was_estimated(tmp_path, tiny_data_dir, capsys,
                                                                                     monkeypatch):
    """4 trials of 10 epochs with ASHA, 2 at once in order: with so few trials the first at each rung goes on,
    and the first two are never stopped, so the search trains most of its 40 trial-epochs (the asymptotic
    halving priced 10.5 of them, a quarter of the search's time). study.run's main in this process (the
    interpreter's start and imports saved), starting its own Ray as the command does, and measuring this
    CPU itself as it starts (not the worker's calibration taken earlier, under another load)."""
    monkeypatch.setattr(estimate, "cpu_speeds", CPU_SPEEDS)
    monkeypatch.setenv("RAY_ADDRESS", "")  # as env() gives a process
    space = write_spec(tmp_path, tiny_spec("loud", train={"epochs": 10},
                                           search={"num_samples": 4, "max_concurrent": 2, "in_order": True},
                                           scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2},
                                           retrain={"seeds": []}))
    p = in_process(capsys, study_run, *study_cmd(space, tmp_path, tiny_data_dir, "--verbose")[3:])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "Trial status:" in p.stdout and "╭" in p.stdout  # Ray Tune's own output engine
    assert PROGRESS.findall(p.stdout)[-1][:2] == ("4", "4")  # and ours
    assert "\nsampler tpe: the first 2 of 4 trials at random (Optuna's default 10, sized to a third of the 4 trials)" \
        in p.stdout  # after the study's first line
    d = tmp_path / "results" / "loud"
    timing = yaml.safe_load((d / "timing.yaml").read_text())
    assert "retrain" not in timing["phases_s"] and timing["phases_s"]["search"] > 0
    est = yaml.safe_load((d / "estimate.yaml").read_text())
    assert est["phases_s"]["retrain"] == 0  # no seeds: nothing predicted for it
    trials = pd.read_csv(d / "trials.csv").sort_values("number")
    assert list(trials["epochs_run"])[:2] == [10, 10]  # in_order: the first two are never stopped
    assert 1 / 2 < trials["epochs_run"].sum() / est["epochs"] < 2, (trials["epochs_run"].tolist(), est)
    # the search's seconds within a factor of 2 (the machine's load is measured at the start: see
    # test_a_real_study_against_its_estimate_and_its_output for the band of a whole study)
    assert 1 / 2 < timing["phases_s"]["search"] / est["phases_s"]["search"] < 2, (timing, est)


def test_the_fixed_costs_scale_both_ways_with_the_measured_python_start():
    """A machine that starts Python and imports torch in half the reference's time gets half the
    fixed costs (startup, Ray's start, export, spikes), one twice as slow twice them; the
    calibration's own seconds are measured, not scaled; per-image work is left to the calibration."""
    from study.plan import plan

    spec = specs.parse(tiny_spec("scaled"))
    res = plan(spec, gpus=0, cpus=2, node_gpus=0)
    cpu = {"threads": 1, "busy": 1.0, "train": [2e-6, 1e-7], "eval": [5e-7, 2e-8],
           "start_s": estimate.START_REF_S, "calibrate_s": 4.0}
    at = {k: estimate.predict(spec, res, 2, 0, 1, 600, 200, {**cpu, "start_s": estimate.START_REF_S * k})
          for k in (0.5, 1, 2)}
    for phase in ("startup", "export", "spikes"):
        assert at[0.5]["phases_s"][phase] == pytest.approx(at[1]["phases_s"][phase] / 2, abs=0.06), phase
        assert at[2]["phases_s"][phase] == pytest.approx(at[1]["phases_s"][phase] * 2, abs=0.11), phase
    ray = {k: e["phases_s"]["ray_start"] - 4.0 for k, e in at.items()}
    assert ray[0.5] == pytest.approx(ray[1] / 2, abs=0.06) and ray[2] == pytest.approx(ray[1] * 2, abs=0.11)
    assert at[0.5]["wall_s"] < at[1]["wall_s"] < at[2]["wall_s"]
    assert at[1]["phases_s"]["startup"] == pytest.approx(estimate.STARTUP_S + 800 * estimate.LOAD_S, abs=0.06)
    # no calibration (a GPU study): the reference's figures
    assert estimate.fixed_scale(None) == 1 and estimate.fixed_scale({**cpu, "start_s": 100}) == 8


def test_other_networks_are_priced_by_their_own_timing_against_the_tutorials():
    """The calibration times each neuron model, pooling and augmentation a study can take other than the
    tutorial's (network_ratios: real networks on this CPU) and nothing for the tutorial's network; a
    trial's seconds per image are the tutorial's fit times its values' ratios, on every device alike
    priced where it was measured (a GPU: the tutorial's figures)."""
    spec = specs.parse(tiny_spec("networks", train={"epochs": 2, "batch_size": 50, "val_size": 100, "test_size": 100,
                                                    "T": 2, "optimizer": "adam", "pooling": "avg"},
                                 space={"neuron": {"type": "categorical", "choices": ["if", "plif"]},
                                        "augment": {"type": "categorical", "choices": ["none", "crop+flip"]},
                                        "surrogate": {"type": "categorical", "choices": ["atan", "sigmoid"]}}))
    fit = estimate.cpu_calibration(spec)
    ratios = fit["network"]
    assert {f: sorted(v) for f, v in ratios.items()} == {"neuron": ["plif"], "pooling": ["avg"], "augment": ["crop", "flip"]}
    for r in (ratios["neuron"]["plif"], ratios["pooling"]["avg"], ratios["augment"]["crop"], ratios["augment"]["flip"]):
        assert all(0.1 < x < 20 for x in r), ratios  # measured seconds against seconds, both real
    assert ratios["augment"]["crop"][1] == ratios["augment"]["flip"][1] == 1.0  # evaluation never augments
    tutorial = TrainConfig(T=2, channels=8, batch_size=50)
    plif = TrainConfig(T=2, channels=8, batch_size=50, neuron="plif", pooling="avg", augment="crop+flip")
    base, other = estimate.per_image_s(tutorial, "cpu", fit), estimate.per_image_s(plif, "cpu", fit)
    for i in range(2):
        want = ratios["neuron"]["plif"][i] * ratios["pooling"]["avg"][i] * ratios["augment"]["crop"][i] \
            * ratios["augment"]["flip"][i]  # crop+flip: its transforms' ratios
        assert other[i] == pytest.approx(base[i] * want)
    assert estimate.per_image_s(plif, "gpu", fit) == estimate.per_image_s(tutorial, "gpu", fit)
    # a study of the tutorial's network times none
    assert estimate.cpu_calibration(specs.parse(tiny_spec("plain")))["network"] == {}


def test_cpu_trials_crowd_each_other_and_a_busy_machine():
    assert estimate.crowding(2, 2, 1.0) == 1 and estimate.crowding(4, 2, 1.0) == 2  # idle: threads over cores
    # another process's core on a 2-core machine (busy 1.5): one trial has a core, two share what is left
    assert estimate.crowding(1, 2, 1.5) == pytest.approx(1) and estimate.crowding(2, 2, 1.5) == pytest.approx(1.5)
    assert 0.5 <= estimate.busy() <= 8
    assert 0.05 < estimate.start_s() < 60  # a real Python process that imports torch


def test_a_study_this_machine_cannot_run_is_still_valid_without_an_estimate(tmp_path, tiny_data_dir, capsys):
    """--dry-run validates the file (for a cluster, maybe): a trial wanting more CPUs than this
    machine has is no error, only no estimate."""
    space = write_spec(tmp_path, tiny_spec("fat", resources={"cpus_per_trial": (os.cpu_count() or 1) + 1}))
    p = in_process(capsys, study_run, *study_cmd(space, tmp_path, tiny_data_dir, "--dry-run")[3:])
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "warning: no estimate for this machine" in p.stderr and "cpus_per_trial" in p.stderr
    assert not ESTIMATE.findall(p.stdout)


def test_the_time_left_follows_the_trials_own_clocks_not_a_stopped_driver(capsys):
    """study.run stopped for ten minutes (SIGSTOP) while its trials trained on: the time left reads their
    own seconds (Ray's time_total_s) against the estimate's 10 s a trial, 2 at once, and goes down as the
    running ones go on; the driver's clock, ten minutes on, made it a pace 5x the estimate's, the same
    '~0:25 left' at every line until a trial ended."""
    import time
    from types import SimpleNamespace

    from study.progress import Progress

    p = Progress(specs.parse(tiny_spec("left", search={"num_samples": 4})), 10.0, 2, 0.0)
    p.start = time.time() - 600

    def left(running_s):
        trials = [SimpleNamespace(trial_id=t, status=status, last_result={"time_total_s": s, "training_iteration": 2},
                                  config={"channels": 4, "lr": 0.01}, error_file=None)
                  for t, status, s in (("a", "TERMINATED", 12), ("b", "TERMINATED", 8),
                                       ("c", "RUNNING", running_s), ("d", "RUNNING", running_s))]
        capsys.readouterr()
        p.say(trials)
        return re.search(r", ~(\d+:\d\d) left\]", capsys.readouterr().out).group(1)

    assert left(2) == "0:08"  # (2 trials x 10 s - 4 s run) / 2 at once: the ended ones took what was estimated
    assert left(6) == "0:04"
    assert left(30) == "0:01"  # running long: never less than a tenth of its share left
