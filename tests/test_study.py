"""Real Ray Tune + Optuna studies on tiny real data (600 training images, channels 4-6)."""
import json
import re
import shutil
import signal
import subprocess
import time

import numpy as np
import optuna
import pandas as pd
import pytest
import ray
import yaml
from PIL import Image

from conftest import calibrated, env, run_study, study_cmd, tiny_spec, write_spec


def test_three_trial_study_end_to_end(tiny_study, tiny_data_dir, tmp_path, capsys):
    d, p = tiny_study
    space = shutil.copy(d.parent.parent / "e2e.yaml", tmp_path)
    assert "# Study `e2e`" in p.stdout and "Trials: 3 — " in p.stdout and "retrained best: test_acc" in p.stdout
    # Ray's and Optuna's own INFO and WARNING lines are in the study's log, not on the terminal
    assert not re.search(r" (INFO|WARNING) |\[I \d{4}-|\[W \d{4}-", p.stdout + p.stderr), p.stdout + p.stderr
    assert "A new study created in RDB" in (d / "study.log").read_text()

    assert yaml.safe_load((d / "spec.yaml").read_text())["name"] == "e2e"
    trials = pd.read_csv(d / "trials.csv")
    assert len(trials) == 3 and trials["trial_id"].is_unique
    assert {"trial_id", "status", "channels", "lr", "val_acc", "best_val_acc", "test_acc", "epochs_run",
            "time_s", "error", "config"} <= set(trials.columns)
    # silent: stopped at a rung while a layer was still silent (a tiny network after one epoch)
    assert set(trials["status"]) <= {"finished", "stopped", "silent"} and (trials["status"] == "finished").any()
    assert trials["lr"].between(0.003, 0.03).all() and set(trials["channels"]) <= {4, 6}
    # the network's keys (issue 34), each with both its values among the three trials (conftest.TINY_STUDY)
    assert {"neuron", "pooling", "dropout", "augment", "loss"} <= set(trials.columns)
    assert set(trials["neuron"]) == {"if", "plif"} and set(trials["pooling"]) == {"max", "avg"}
    assert set(trials["loss"]) == {"mse", "ce"} and trials["augment"].isin(["none", "crop", "crop+flip"]).all()
    assert trials["dropout"].between(0.0, 0.3).all()
    # all empty (no error; no GPU id on the CPU): '' or None in parquet, NaN in csv
    cols = [c for c in trials.columns if c not in ("error", "gpu_ids", "silent", "dead", "constraint",
                                                  "cuda_graphs_fallback", "capture_diff")]
    parquet = pd.read_parquet(d / "trials.parquet")[cols]
    text = [c for c in cols if not pd.api.types.is_numeric_dtype(parquet[c])]  # csv reads '13.0' as 13.0
    pd.testing.assert_frame_equal(parquet.drop(columns=text), trials[cols].drop(columns=text), check_dtype=False)
    assert (parquet[text].astype(str) == trials[text].astype(str)).all().all()
    assert trials["error"].isna().all() and trials["cuda_graphs_fallback"].isna().all() and trials["capture_diff"].isna().all()
    # where each trial ran: Ray's node, no GPU id, the CPU
    assert trials["node_ip"].notna().all() and trials["hostname"].notna().all()
    assert trials["gpu_ids"].isna().all() and (trials["run_device"] == "cpu").all()

    history = pd.read_csv(d / "history.csv")
    assert len(history) == trials["epochs_run"].sum()
    assert not history.duplicated(["trial_id", "epoch"]).any()
    assert set(history["trial_id"]) == set(trials["trial_id"])

    best = yaml.safe_load((d / "best.yaml").read_text())
    row = trials.set_index("trial_id").loc[best["trial_id"]]
    assert best["objective"]["value"] == row["best_val_acc"] == trials["best_val_acc"].max()
    assert best["config"]["lr"] == pytest.approx(row["lr"]) and best["config"]["channels"] == row["channels"]
    assert best["config"]["epochs"] == 2 and best["config"]["val_size"] == 100
    assert all(best["config"][k] == pytest.approx(row[k]) if k == "dropout" else best["config"][k] == row[k]
               for k in ("neuron", "pooling", "dropout", "augment", "loss"))

    summary = yaml.safe_load((d / "best" / "summary.yaml").read_text())
    assert summary["trial_id"] == best["trial_id"] and set(summary["test_acc"]) == {0, 1}
    assert summary["test_acc_mean"] == pytest.approx(np.mean(list(summary["test_acc"].values())))
    retrained = yaml.safe_load((d / "best" / "seed1" / "config.yaml").read_text())
    assert retrained["val_size"] == 0 and retrained["seed"] == 1 and retrained["lr"] == best["config"]["lr"]
    assert len(pd.read_csv(d / "best" / "metrics.csv")) == 2
    for i in range(2):
        img = np.asarray(Image.open(d / "best" / "spikes" / str(i) / "input.png"))
        assert img.shape == (112, 112) and img.std() > 10
        for t in range(2):
            assert (d / "best" / "spikes" / str(i) / f"s_{t}.svg").is_file()
    assert set(summary["placement"]) == {0, 1} and summary["placement"][0]["node_ip"]

    study = optuna.load_study(study_name="e2e", storage=f"sqlite:///{d / 'optuna.db'}")
    assert len(study.trials) == 3 and all(t.state.name == "COMPLETE" for t in study.trials)
    assert study.metric_names == ["val_acc"]  # optuna-dashboard's label for the objective

    shutil.copytree(d, tmp_path / "results" / "e2e")  # a copy: the other tests read tiny_study as they run
    again = run_study(capsys, space, tmp_path, tiny_data_dir)  # refused before Ray would start
    assert again.returncode == 2 and "holds an ended study" in again.stderr and "study.analyze" in again.stderr


@pytest.mark.slow
def test_interrupted_study_resumes_to_exactly_num_samples(tmp_path, tiny_data_dir, local_ray, capsys):
    # 4 epochs a trial (about 2 s with Ray's worker reused): Ctrl-C lands while the second trial runs
    spec = tiny_spec("resume", train={"epochs": 4}, search={"num_samples": 3, "max_concurrent": 1},
                     retrain={"seeds": []})
    space = write_spec(tmp_path, spec)
    ray_dir = tmp_path / "results" / "resume" / "ray"
    proc = subprocess.Popen(calibrated(study_cmd(space, tmp_path, tiny_data_dir), spec), env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    finished = []
    while time.time() < deadline and not finished:  # wait for a trial to finish its epochs
        finished = [f for f in ray_dir.glob("*/progress.csv") if len(pd.read_csv(f)) >= 4] if ray_dir.exists() else []
        time.sleep(0.1)
    assert finished, "no trial finished in time"
    before = {f.parent.name: pd.read_csv(f) for f in finished}
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    out = ""
    for line in proc.stdout:  # its last line; then ray.shutdown() runs, and a second Ctrl-C lands there
        out += line
        if "interrupted after" in line:
            proc.send_signal(signal.SIGINT)
            break
    out += proc.communicate(timeout=120)[0]
    assert proc.returncode == 130 and "Traceback" not in out, out[-3000:]
    assert "continue it with --resume" in out
    assert not (tmp_path / "results" / "resume" / "trials.csv").exists()  # nothing that looks finished

    p = run_study(capsys, space, tmp_path, tiny_data_dir, "--resume")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    d = tmp_path / "results" / "resume"
    trials = pd.read_csv(d / "trials.csv")
    assert len(trials) == 3 and trials["trial_id"].is_unique and (trials["status"] == "finished").all()
    history = pd.read_csv(d / "history.csv")
    assert not history.duplicated(["trial_id", "epoch"]).any() and len(history) == 12
    for name, frame in before.items():  # the trial finished before Ctrl-C was not run again
        after = pd.read_csv(ray_dir / name / "progress.csv")
        assert len(after) == 4 and after["epoch_s"].tolist() == frame["epoch_s"].tolist()
    study = optuna.load_study(study_name="resume", storage=f"sqlite:///{d / 'optuna.db'}")
    assert len([t for t in study.trials if t.state.name == "COMPLETE"]) == 3


def test_a_start_that_stopped_is_started_afresh_and_an_errored_trial_is_recorded(tmp_path, tiny_data_dir, local_ray,
                                                                              capsys):
    """One study for two checks (each had a study of its own: 10-40 s of make test).
    A start that stopped before the first trial: a bad --optuna-storage used to fail after spec.yaml was
    written, and a Ctrl-C in that moment left spec.yaml and optuna.db: the folder was then refused both
    without --resume and with it. Now the URL is checked first, and such a folder starts afresh.
    An errored trial: lr 1e38 overflows Adam's step, a real exception inside the trial; it is recorded
    as errored, and the other trial finishes and is the best."""
    import optuna

    # the random sampler's first two draws (seed 0): lr 0.01, then 1e38; both at once
    spec = tiny_spec("stuck", space={"lr": {"type": "categorical", "choices": [0.01, 1e38]}},
                     search={"sampler": "random", "seed": 0, "num_samples": 2, "max_concurrent": 2},
                     retrain={"seeds": []})
    space = write_spec(tmp_path, spec)
    p = run_study(capsys, space, tmp_path, tiny_data_dir, "--optuna-storage", "sqlite:////nonexistent/o.db")
    assert p.returncode == 2 and "the folder /nonexistent does not exist" in p.stderr, p.stderr[-3000:]
    d = tmp_path / "results" / "stuck"
    assert not d.exists()  # checked before anything was written
    d.mkdir(parents=True)  # what a Ctrl-C right after the Optuna study was made left
    (d / "spec.yaml").write_text("name: stuck\n")
    optuna.create_study(study_name="stuck", storage=f"sqlite:///{d / 'optuna.db'}")
    p = run_study(capsys, space, tmp_path, tiny_data_dir)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "starting the study afresh" in p.stdout
    assert ray.is_initialized()  # study.run's main left up the Ray that its caller (local_ray) started
    trials = pd.read_csv(d / "trials.csv")
    assert len(trials) == 2
    bad = trials[trials["lr"] > 1]
    good = trials[trials["lr"] < 1]
    assert len(bad) and len(good), trials[["lr", "status"]]
    assert (bad["status"] == "errored").all() and bad["error"].str.contains("overflow").all()
    assert (good["status"] == "finished").all()
    assert "errored" in p.stdout
    best = yaml.safe_load((d / "best.yaml").read_text())
    assert best["config"]["lr"] == 0.01


def test_ctrl_c_early_prints_one_line_and_its_advice_works(tmp_path, tiny_data_dir, local_ray, capsys):
    """Ctrl-C while study.run imports, then, in the command it advises, right after its first line (Ray
    started, the search about to begin): exit 130, one line and no traceback, each time; the command the
    second advises then runs the study to its end. (One study for both moments: each advice is the next
    command run, as a user would.)"""
    spec = tiny_spec("early", search={"num_samples": 2}, retrain={"seeds": []})
    space = write_spec(tmp_path, spec)
    resume = []
    for phase in ("imports", "first line"):
        # python -m study.run: its own handling of a Ctrl-C in imports
        cmd = study_cmd(space, tmp_path, tiny_data_dir, *resume)
        proc = subprocess.Popen(cmd if phase == "imports" else calibrated(cmd, spec), env=env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if phase == "imports":
            time.sleep(0.3)  # python is importing torch, pandas, ...: seconds on this machine
        else:
            assert proc.stdout.readline().startswith("study early:")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 130 and "Traceback" not in err, (phase, err[-3000:])
        advice = [line for line in err.splitlines() if "interrupted" in line]
        assert len(advice) == 1, (phase, err[-3000:])
        resume = ["--resume"] if "--resume" in advice[0] else []
    p = run_study(capsys, space, tmp_path, tiny_data_dir, *resume)
    assert p.returncode == 0, advice[0] + "\n" + p.stdout[-3000:] + p.stderr[-3000:]
    assert len(pd.read_csv(tmp_path / "results" / "early" / "trials.csv")) == 2


def test_time_breakdown_adds_up_to_each_trials_time(tiny_study):
    """Where a trial's time went (csnn.config.TIME_PARTS, per epoch in history.csv and best/metrics.csv, per
    trial in the trials table, summed in timing.yaml and the report): the parts add up to the trial's time."""
    from csnn.config import TIME_PARTS
    from study import results
    from study.storage import Location

    d, _ = tiny_study
    history, trials = pd.read_csv(d / "history.csv"), pd.read_csv(d / "trials.csv").set_index("trial_id")
    ray_s = {t.trial_id: r.metrics["time_total_s"] for t, r in results.trial_results(Location.parse(str(d / "ray")))}
    for trial_id, h in history.groupby("trial_id"):
        h = h.sort_values("epoch")
        assert (h[list(TIME_PARTS)] >= 0).all().all() and (h["train_s"] > 0).all() and h["setup_s"].iloc[0] > 0
        assert (h["setup_s"].iloc[1:] == 0).all() and h["report_s"].iloc[0] == 0  # set-up once; a report after its row
        parts = h[list(TIME_PARTS)].sum().sum()
        # fit's own clock, from its start to the last epoch's checkpoint (its report comes after the row)
        assert parts == pytest.approx(h["elapsed_s"].iloc[-1], rel=0.03)
        # Ray's clock, from the trainable's start to its last report: that report, the data from the object store
        # and the trainable's own start are outside fit's parts
        assert parts == pytest.approx(ray_s[trial_id], rel=0.1, abs=0.5)
        assert trials.loc[trial_id, "time_s"] == pytest.approx(parts, rel=1e-6)
        assert trials.loc[trial_id, "train_s"] == pytest.approx(h["train_s"].sum(), rel=1e-6)
    retrain = pd.read_csv(d / "best" / "metrics.csv")
    for _, h in retrain.groupby("seed"):
        assert h[list(TIME_PARTS)].sum().sum() == pytest.approx(h["elapsed_s"].iloc[-1], rel=0.03)
    timing = yaml.safe_load((d / "timing.yaml").read_text())
    for phase, table in (("search", history), ("retrain", retrain)):
        assert timing["trials_s"][phase] == {k: pytest.approx(table[k].sum(), abs=0.01) for k in TIME_PARTS}
    # the search's trials ran within its phase, two at once
    assert sum(timing["trials_s"]["search"].values()) < 2 * timing["phases_s"]["search"]
