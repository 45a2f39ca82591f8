"""--warm-start: a real tiny study, then studies that start from it."""
import optuna
import pandas as pd
import pytest
import yaml

from conftest import TINY_STUDY, run_study, tiny_spec, write_dataset, write_spec

# the network keys tiny_study searches: a study warm-started from it searches them too, or its trials would
# not fit (a fixed neuron if here, plif there)
NETWORK = TINY_STUDY["space"]
from study import analyze, results


def test_a_warm_started_study_runs_the_earlier_best_first_and_its_sampler_saw_the_earlier_trials(
        tiny_study, tiny_data_dir, tmp_path, local_ray, capsys):
    e2e, _ = tiny_study
    first = pd.read_csv(e2e / "trials.csv")
    best = yaml.safe_load((e2e / "best.yaml").read_text())
    # two at once (item 10: the enqueued best ran second in one of two runs): it is trial 1 whatever the timing
    space = write_spec(tmp_path, tiny_spec("warm", search={"num_samples": 2, "max_concurrent": 2, "in_order": True}, retrain={"seeds": []},
                                             space=NETWORK))
    p = run_study(capsys, space, tmp_path, tiny_data_dir, "--warm-start", e2e)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert f"warm start from {e2e}: 3 trials told to the sampler, 1 best configuration(s) run first" in p.stdout
    # e2e drew with seed 0 too: the same seed would ask for its configurations again (its trials 1, 2 after the best)
    assert (f"warm start: the sampler draws with seed 1, not search.seed 0: {e2e} drew its trials with seed 0, and "
            "the same seed would ask for its configurations again") in p.stdout

    d = tmp_path / "results" / "warm"
    study = optuna.load_study(study_name="warm", storage=f"sqlite:///{d / 'optuna.db'}")
    told = [t for t in study.trials if "e2e" in t.user_attrs.get("warm_start", "") and t.number < 3]
    assert len(told) == 3 and all(t.state.name == "COMPLETE" for t in told)
    by_id = first.set_index("trial_id")
    for t in told:  # each earlier trial's last value, as OptunaSearch told it there
        tid = t.user_attrs["warm_start"].rsplit(" ", 1)[1]
        assert t.value == pytest.approx(by_id.loc[tid, "val_acc"]) and t.params["lr"] == pytest.approx(by_id.loc[tid, "lr"])
    ran = [t for t in study.trials if t.number >= 3]
    assert len(ran) == 2 and ran[0].params == {k: best["params"][k] for k in ran[0].params} and len(ran[0].params) == 7
    earlier = [{k: r[k] for k in ran[1].params} for _, r in first.iterrows()]
    assert ran[1].params not in earlier, (ran[1].params, earlier)  # only the enqueued best runs again
    assert yaml.safe_load((d / "warm_start.yaml").read_text())["seed"] == 1

    trials = pd.read_csv(d / "trials.csv").sort_values("number")
    assert trials["warm_start"].iloc[0] == f"{e2e} trial {best['trial_id']}"
    assert trials["lr"].iloc[0] == best["params"]["lr"] and trials["warm_start"].iloc[1:].isna().all()
    lines = "\n".join(analyze.summary(results.load(d)))
    assert "## Warm start" in lines and f"from `{e2e}`: 3 trials told" in lines
    assert "- the sampler drew with seed 1, not search.seed 0: an earlier study drew its trials with seed 0" in lines
    assert f"ran first here as trial {trials['trial_id'].iloc[0]}" in lines


def test_warm_start_skips_other_settings_and_refuses_what_cannot_work(tiny_study, tiny_data_dir, tmp_path, capsys):
    e2e, _ = tiny_study

    def dry(spec, *extra):  # study.run's main in this process: --dry-run starts no Ray
        return run_study(capsys, write_spec(tmp_path, spec), tmp_path, tiny_data_dir, "--dry-run", "--warm-start", e2e,
                         *extra)

    p = dry(tiny_spec("longer", train={"epochs": 3}, space=NETWORK))  # trained for 2 epochs there
    assert p.returncode == 0, p.stderr[-3000:]
    assert "0 trials told to the sampler, 0 best configuration(s) run first; skipped 3 × epochs 2 there, 3 here" in p.stdout
    assert "best trial" in p.stdout and "not enqueued: epochs 2 there, 3 here" in p.stdout
    p = dry(tiny_spec("narrow", space={"lr": {"type": "float", "low": 0.001, "high": 0.002}, **NETWORK}))
    assert p.returncode == 0 and "outside this space" in p.stdout, p.stdout + p.stderr
    p = dry(tiny_spec("energy", objective=[{"metric": "val_acc", "mode": "max"},
                                           {"metric": "energy_uj", "mode": "min"}]))
    assert p.returncode == 2 and "it optimised max val_acc, this study max val_acc, min energy_uj" in p.stderr
    p = run_study(capsys, write_spec(tmp_path, tiny_spec("nowhere")), tmp_path, tiny_data_dir, "--dry-run",
                  "--warm-start", tmp_path / "missing")
    assert p.returncode == 2 and "--warm-start" in p.stderr and "not a study folder" in p.stderr
    searched = tiny_spec("searched_T", space={"T": {"type": "int", "low": 1, "high": 4}, **NETWORK})
    del searched["train"]["T"]
    p = dry(searched)
    assert p.returncode == 0 and "3 trials told" in p.stdout, p.stdout + p.stderr  # T fixed at 2 there: inside
    p = dry(tiny_spec("twice"), "--warm-start", str(e2e) + "/")
    assert p.returncode == 2 and "given twice" in p.stderr
    p = dry(tiny_spec("empty"), "--warm-start", "")
    assert p.returncode == 2 and "--warm-start '': name the folder of an earlier study" in p.stderr
    other = write_dataset(tmp_path / "other-data", n_train=700, n_test=200)
    p = run_study(capsys, write_spec(tmp_path, tiny_spec("otherdata", space=NETWORK)), tmp_path, other, "--dry-run", "--warm-start", e2e)
    assert p.returncode == 0 and "skipped 3 × trained on other images (data fingerprint)" in p.stdout, p.stdout
    for dry_run in (["--dry-run"], []):  # refused alike, also where --resume alone would say "nothing to resume"
        p = run_study(capsys, write_spec(tmp_path, tiny_spec("e2e", **TINY_STUDY)), e2e.parent.parent, tiny_data_dir,
                      "--resume", "--warm-start", tmp_path, *dry_run)
        assert p.returncode == 2 and "a study is warm-started when it begins" in p.stderr, p.stdout + p.stderr
