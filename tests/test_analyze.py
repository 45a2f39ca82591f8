"""study.results.load, study.analyze and study.reproduce on the tiny real study of conftest."""
import re
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from conftest import ROOT, env, in_process, run_study, tiny_spec, write_dataset, write_spec
from study import analyze, reproduce, results


@pytest.fixture
def run(capsys):
    """`python -m module *args`, in this process: its main(argv), seconds of imports saved a call."""
    mains = {"study.analyze": analyze.main, "study.reproduce": reproduce.main}
    return lambda module, *args: in_process(capsys, mains[module], *args)


def test_load_gives_dataframes(tiny_study):
    d, _ = tiny_study
    s = results.load(d)
    assert s.complete and s.spec.name == "e2e"
    assert len(s.trials) == 3 and {"trial_id", "number", "status", "channels", "lr", "best_val_acc"} <= set(s.trials)
    assert not any(c.startswith("config/") for c in s.trials.columns)
    assert len(s.history) == s.trials["epochs_run"].sum() and {"trial_id", "epoch", "val_acc"} <= set(s.history)
    assert s.best["trial_id"] in set(s.trials["trial_id"]) and s.best_row["best_val_acc"] == s.trials["best_val_acc"].max()
    assert list(s.retrain["seed"].unique()) == [0, 1] and s.retrain_summary["seeds"] == [0, 1]
    # the notebook example of the README
    top = s.ranked().head(5)
    assert len(top) == 3 and list(top[s.objective_column]) == sorted(s.trials["best_val_acc"], reverse=True)
    assert s.trials.groupby("channels")["test_acc"].mean().index.isin([4, 6]).all()


def test_load_reads_an_unfinished_study_from_ray_folders(tiny_study, tmp_path):
    d, _ = tiny_study
    partial = tmp_path / "partial"
    shutil.copytree(d, partial, ignore=shutil.ignore_patterns("trials.*", "history.csv", "best.yaml", "best"))
    s = results.load(partial)
    assert not s.complete and len(s.trials) == 3
    full = results.load(d)
    assert set(s.trials["trial_id"]) == set(full.trials["trial_id"])
    # silent only where the trainable ended the trial as silent: that holds mid-study too, and
    # such a trial names its silent layers
    assert set(s.trials["status"]) <= {"finished", "unfinished", "silent"}
    assert (s.trials.loc[s.trials["status"] == "silent", "silent"].fillna("") != "").all()
    assert s.best["trial_id"] == full.best["trial_id"] and s.retrain is None


def test_not_a_study_fails_clearly(tmp_path):
    """As commands (python -m): exit 2 and one line, no traceback."""
    def run(module, *args):
        return subprocess.run([sys.executable, "-m", module, *map(str, args)], env=env(), capture_output=True,
                              text=True, timeout=600, cwd=ROOT)

    with pytest.raises(results.StudyError, match="not a study folder \\(no spec.yaml\\)"):
        results.load(tmp_path)
    p = run("study.analyze", tmp_path)
    assert p.returncode == 2 and "not a study folder" in p.stderr and "Traceback" not in p.stderr
    p = run("study.reproduce", tmp_path)
    assert p.returncode == 2 and "not a study folder" in p.stderr


def test_analyze_writes_every_plot_and_the_report(tiny_study, tmp_path, run):
    d = tmp_path / "e2e"
    shutil.copytree(tiny_study[0], d)
    p = run("study.analyze", d, "--top", 2)
    assert p.returncode == 0, p.stderr[-3000:]
    s = results.load(d)
    assert s.best["trial_id"] in p.stdout
    out = d / "report"
    expected = ["curves.png", "param_channels.png", "param_lr.png", "parallel.png", "importance.png", "baseline.png",
                "efficiency.png", *(f"param_{k}.png" for k in ("neuron", "loss", "pooling", "augment", "dropout"))]
    for name in expected:
        img = np.asarray(Image.open(out / name).convert("L"))
        assert img.shape[0] >= 400 and img.shape[1] >= 600, name
        assert img.std() > 5 and (img < 128).mean() > 0.002, f"{name} looks blank"
    report = (out / "report.md").read_text()
    assert f"## Best trial: {s.best['trial_id']}" in report
    top = "\n".join(analyze.summary(s))  # one summary: study.run printed it, the report starts with it
    assert report.startswith(top) and top in tiny_study[1].stdout and "Trials: 3 — " in top
    assert "0.9263" in report and "mean ± std over seeds" in report
    for name in expected:
        assert f"]({name})" in report
    # where the trials' time went: one row per part, the search's and the retrain's seconds, and the share of
    # the study's time (timing.yaml's phases on their trial slots) that trained images
    table = report.split("## Where the trials' time went")[1].split("\n\n")[1].splitlines()
    assert table[0] == "| part | search s | retrain s | share |" and len(table) == 2 + 7 + 1
    parts = results.time_breakdown(s.history, s.retrain)
    assert f"| training images | {parts['search']['train_s']:.1f} | {parts['retrain']['train_s']:.1f} |" in table[3]
    assert re.search(r"Training images took \d+% of the trials' time, and \d+% of the study's time \(\d+ s of wall time, "
                     r"2 trials at once in the search, 2 seeds in the retrain\)", report)


def test_analyze_with_one_finished_and_errored_trials(tiny_study, tmp_path, run):
    d = tmp_path / "e2e"
    shutil.copytree(tiny_study[0], d)
    t = pd.read_csv(d / "trials.csv")
    t["error"] = t["error"].astype(object)
    t.loc[1:, "status"] = "errored"
    t.loc[1:, "error"] = "RuntimeError: boom"
    for c in [c for c in t.columns if c.startswith("best_")]:
        t.loc[1:, c] = np.nan
    t.to_csv(d / "trials.csv", index=False)
    (d / "trials.parquet").unlink()
    (d / "optuna.db").unlink()
    p = run("study.analyze", d)
    assert p.returncode == 0, p.stderr[-3000:]
    report = (d / "report" / "report.md").read_text()
    assert "2 errored" in report and "RuntimeError: boom" in report
    assert "parameter importance not drawn: no optuna.db" in report
    assert (d / "report" / "curves.png").is_file()


def test_analyze_of_a_study_in_which_no_trial_reported_an_epoch_says_so_in_one_line(tiny_study, tmp_path, run):
    """Interrupted before its first trial reported, or ended with every trial errored at once: one
    line of what the folder holds (lifecycle's words), exit 2, no report (was: Ray's FileNotFoundError
    warnings, pandas' "Empty DataFrame" and a report of nothing)."""
    import logging

    early = tmp_path / "early"  # as a kill leaves it before any trial reported: Ray's state, no result files
    shutil.copytree(tiny_study[0], early, ignore=shutil.ignore_patterns(
        "trials.*", "history.csv", "best.yaml", "best", "report", "result.json", "progress.csv"))
    errored = tmp_path / "errored"  # ended, every trial errored at its start
    shutil.copytree(tiny_study[0], errored, ignore=shutil.ignore_patterns("best.yaml", "best", "report"))
    t = pd.read_parquet(errored / "trials.parquet")
    for name in ("trials.parquet", "trials.csv"):
        results.write_table(errored / name, t.assign(status="errored", epochs_run=0, error="RuntimeError: boom",
                                                     **{c: np.nan for c in t if c.startswith("best_")}))
    results.write_table(errored / "history.csv", pd.DataFrame(columns=["trial_id", "epoch"]))
    ray_said = []
    catch = logging.Handler()
    catch.emit = ray_said.append
    logging.getLogger("ray").addHandler(catch)
    try:
        for d, line in ((early, f"{early} holds a study whose search has not ended, and none of its 3 trials has "
                                "reported an epoch yet: nothing to read yet; continue it with study.run's --resume"),
                        (errored, f"{errored} holds an ended study whose 3 trials all errored before their first "
                                  f"epoch (trial {t['trial_id'].iloc[0]}: RuntimeError: boom): nothing to read")):
            p = run("study.analyze", d)
            assert (p.returncode, p.stderr.strip(), p.stdout) == (2, f"error: {line}", ""), p.stderr
            assert not (d / "report").exists()
    finally:
        logging.getLogger("ray").removeHandler(catch)
    assert not [r.getMessage() for r in ray_said if r.levelno >= logging.WARNING]


@pytest.mark.smoke  # .ci/run's newest-versions set
def test_reproduce_matches_exactly_on_the_cpu_and_catches_a_doctored_record(tiny_study, tiny_data_dir, tmp_path, run):
    d = tmp_path / "e2e"
    shutil.copytree(tiny_study[0], d)
    p = run("study.reproduce", d, "--data-dir", tiny_data_dir)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "reproduced: all" in p.stdout
    best = yaml.safe_load((d / "best.yaml").read_text())["trial_id"]
    table = pd.read_csv(d / "reproduce" / best / "comparison.csv")
    assert table["ok"].all() and (table["diff"] == 0).all() and set(table["metric"]) >= {"val_acc", "test_acc", "train_loss"}
    assert (d / "reproduce" / best / "spikes" / "0" / "s_0.png").is_file()

    h = pd.read_csv(d / "history.csv")
    h.loc[(h["trial_id"] == best) & (h["epoch"] == 0), "val_acc"] += 0.01
    h.to_csv(d / "history.csv", index=False)
    p = run("study.reproduce", d, "--data-dir", tiny_data_dir, "--epochs", 1)
    assert p.returncode == 1 and "MISMATCH" in p.stdout and "val_acc" in p.stdout
    # a mismatch goes beside the matching reproduction, never over it
    again = pd.read_csv(d / "reproduce" / best / "comparison.csv")
    assert again.equals(table)
    beside = list((d / "reproduce" / best).glob("comparison-*.csv"))
    assert len(beside) == 1 and not pd.read_csv(beside[0])["ok"].all()

    other = write_dataset(tmp_path / "other", 600, 200, seed=1)  # other images, the same sizes
    p = run("study.reproduce", d, "--data-dir", other, "--epochs", 1)
    assert p.returncode == 1 and "the trial was trained on other images (data fingerprint" in p.stderr, p.stderr[-2000:]
    assert "(on other images than the trial's)" in p.stdout
    assert pd.read_csv(d / "reproduce" / best / "comparison.csv").equals(table)

    # a trial recorded with cuda_graphs: true reproduces with --device cpu (the graphs replay the eager step)
    shutil.copytree(tiny_study[0], d := tmp_path / "graphed")
    t = pd.read_parquet(d / "trials.parquet")
    row = t["trial_id"].astype(str) == str(best)
    t.loc[row, "config"] = yaml.safe_dump({**yaml.safe_load(t.loc[row, "config"].iloc[0]), "cuda_graphs": True})
    t.to_parquet(d / "trials.parquet", index=False)
    p = run("study.reproduce", d, "--data-dir", tiny_data_dir, "--epochs", 1, "--device", "cpu")
    assert p.returncode == 0 and "reproduced: all" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]


def test_the_report_says_which_trials_fell_back_from_cuda_graphs(tiny_study):
    s = results.load(tiny_study[0])
    assert {"cuda_graphs_used", "cuda_graphs_fallback"} <= set(s.trials) and not s.trials["cuda_graphs_used"].any()
    assert analyze.graphs_lines(s) == []  # CPU trials: graphs never planned, nothing fell back
    s.trials.loc[s.trials.index[:2], "cuda_graphs_fallback"] = "training step: replaying failed (RuntimeError: x)"
    lines = analyze.graphs_lines(s)
    assert lines[0] == ("CUDA graphs off in 2 of 3 trials (they trained with eager steps): 2 × training step: "
                        "replaying failed (RuntimeError: x).")
    assert lines[0] in analyze.header(s)


def test_a_study_of_silent_networks_says_so_not_that_nothing_was_reported():
    """Two objectives, every trial silent at its last epoch: each reported both objectives, but
    none is on a Pareto front (a silent network's cost would look best)."""
    import pandas as pd

    from conftest import tiny_spec
    from study import analyze, results, spec as specs
    from study.storage import Location

    spec = specs.parse(tiny_spec("quiet", objective=[{"metric": "val_acc", "mode": "max"},
                                                     {"metric": "energy_uj", "mode": "min"}],
                                 retrain={"pick": "knee"}), "quiet.yaml")
    trials = pd.DataFrame({"trial_id": ["a", "b"], "status": ["silent", "finished"], "val_acc": [0.1, 0.1],
                           "energy_uj": [0.0, 0.01], "silent": ["fr_12", "fr_10,fr_12"]})
    study = results.Study(Location.parse("/tmp/quiet"), spec, trials, pd.DataFrame(), None, None, None)
    line = analyze.best_lines(study)[0]
    assert line.startswith("**No trial learned**: all 2 trials that reported were silent or dead networks at their "
                           "last epoch (2 silent: ") and "None is on a Pareto front" in line, line
    trials.loc[1, "silent"] = ""
    assert analyze.best_lines(study)[0].startswith("No trial reported the objective")


def test_a_study_over_the_network_keys_runs_is_plotted_and_reproduces_exactly(tmp_path, tiny_data_dir, local_ray,
                                                                             capsys, run):
    """A real study that searches the neuron model, its surrogate, pooling and dropout (issue 34):
    trials.csv has the keys, best/ is retrained and rendered whatever neuron won, the report plots
    each key, and study.reproduce rebuilds the best trial's network from its config, exactly."""
    space = {"neuron": {"type": "categorical", "choices": ["if", "lif", "plif"]},
             "surrogate": {"type": "categorical", "choices": ["atan", "sigmoid"]},
             "pooling": {"type": "categorical", "choices": ["max", "avg"]},
             "dropout": {"type": "categorical", "choices": [0.0, 0.5]}}
    spec = tiny_spec("keys", train={"epochs": 1, "T": 4, "channels": 4, "lr": 0.01}, space=space,
                     # one trial at a time: one trial worker for the four (Ray Tune's reuse_actors), not two
                     search={"sampler": "random", "num_samples": 4, "max_concurrent": 1},
                     retrain={"epochs": 1, "seeds": [0]}, render={"images": 1})
    spec["space"] = space  # these keys alone
    p = run_study(capsys, write_spec(tmp_path, spec), tmp_path, tiny_data_dir)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    d = tmp_path / "results" / "keys"
    trials = pd.read_csv(d / "trials.csv")
    assert {"neuron", "surrogate", "pooling", "dropout"} <= set(trials.columns) and len(trials) == 4
    assert trials["neuron"].isin(["if", "lif", "plif"]).all() and trials["pooling"].isin(["max", "avg"]).all()
    best = yaml.safe_load((d / "best.yaml").read_text())
    assert (d / "best" / "spikes" / "0" / "s_3.png").is_file()  # T 4: the encoder's spikes at t = 0..3
    p = run("study.analyze", d)
    assert p.returncode == 0, p.stderr[-3000:]
    for name in ("neuron", "surrogate", "pooling", "dropout"):
        assert (d / "report" / f"param_{name}.png").is_file(), name
    p = run("study.reproduce", d, "--data-dir", tiny_data_dir)
    assert p.returncode == 0 and "reproduced: all" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
    table = pd.read_csv(d / "reproduce" / best["trial_id"] / "comparison.csv")
    assert table["ok"].all() and (table["diff"] == 0).all()
