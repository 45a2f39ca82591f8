"""Every sampler a search space may name, end to end on the Optuna a user gets.

Optuna 5.1.0's NSGAIISampler holds a threading.Lock, which Ray Tune could not pickle
with the experiment: every nsga2 study failed at Tuner(...). These studies run the
real thing small (two trials of one epoch, one Ray runtime for the module) and are
in the newest-versions smoke set of .ci/run (marker `smoke`)."""
import pickle

import numpy as np
import optuna
import pandas as pd
import pytest
import ray
import yaml

from conftest import run_study, stopped_when, tiny_spec, write_spec
from csnn import data as fmnist
from study import analyze, environment, results, run, spec as specs
from study.samplers import SAMPLERS, make_sampler, startup_line

TWO = [{"metric": "val_acc", "mode": "max"}, {"metric": "energy_uj", "mode": "min"}]


@pytest.mark.smoke
@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_pickles_and_keeps_working(name):
    """What Ray Tune does to the searcher: pickle it into the experiment, load it on --resume."""
    s = pickle.loads(pickle.dumps(make_sampler(name, 3)))
    assert isinstance(s, optuna.samplers.BaseSampler)
    study = optuna.create_study(sampler=s, directions=["maximize", "minimize"] if name != "gp" else ["maximize"])
    study.optimize(lambda t: (t.suggest_float("x", 0, 1), 1.0)[:len(study.directions)], n_trials=3)
    assert len(study.trials) == 3
    pickle.loads(pickle.dumps(s))  # a sampler that has sampled (its caches filled) pickles too


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


# the smoke set: one study per sampler, nsga2 (the one that broke) with two objectives
@pytest.mark.parametrize("name,objectives", [
    pytest.param(n, o, marks=[pytest.mark.smoke] if (o == 2) == (n == "nsga2") else [])
    for n in SAMPLERS for o in (1, 2)])
def test_a_two_trial_study_with_every_sampler(name, objectives, local_ray, tiny_data_dir, tmp_path):
    over = {"objective": TWO if objectives == 2 else TWO[0],
            "train": {"epochs": 1, "train_size": 200},
            # one trial at a time: Ray Tune reuses the one trial worker (reuse_actors), not two that each import
            # torch, Ray and SpikingJelly; the sampler is still pickled with the experiment, asked and told twice
            "search": {"sampler": name, "seed": 0, "num_samples": 2, "max_concurrent": 1},
            "retrain": {"seeds": []},
            "scheduler": {"type": "none", "silent_rate": 0}}  # 4 steps: often silent, and then on no front
    if objectives == 2:
        over["retrain"] = {"seeds": [], "pick": "knee"}
    spec = specs.parse(tiny_spec(f"s_{name}_{objectives}", **over), "test.yaml")
    d = tmp_path / spec.name
    assert run.run(spec, fmnist.load(tiny_data_dir), d, do_retrain=False) == 0
    s = results.load(d)
    assert len(s.trials) == 2 and set(s.trials["status"]) <= {"finished", "silent"}
    db = optuna.load_study(study_name=spec.name, storage=f"sqlite:///{d / 'optuna.db'}")
    assert [t.state.name for t in db.trials] == ["COMPLETE", "COMPLETE"] and len(db.directions) == objectives
    assert s.environment["packages"]["optuna"] == optuna.__version__
    assert analyze.main([str(d)]) == 0
    report = (d / "report" / "report.md").read_text()
    assert f"Sampler {name} (seed 0)" in report and f"optuna {optuna.__version__}" in report


@pytest.mark.smoke
def test_an_interrupted_nsga2_study_resumes_and_says_what_changed(tmp_path, tiny_data_dir, local_ray, capsys):
    """Ctrl-C, then --resume: Ray unpickles the searcher (a fresh lock) and the study ends with every
    trial; environment.yaml, edited to say another Optuna ran it, gives one warning line. Both runs are
    study.run's main here, on the module's Ray: the first stopped as Ctrl-C stops it (conftest.stopped_when;
    Ray Tune saves the searcher into the experiment's state on disk, which the --resume reads back; a
    process Ctrl-C'd is tests/test_study.py's)."""
    spec = tiny_spec("nsga2", objective=TWO, train={"epochs": 3}, retrain={"seeds": [], "pick": "knee"},
                     search={"sampler": "nsga2", "num_samples": 3, "max_concurrent": 1})
    space = write_spec(tmp_path, spec)
    d = tmp_path / "results" / "nsga2"

    def first_trial_recorded():  # its epochs are recorded (a file Ray has only begun to write: not yet)
        try:
            return any(len(pd.read_csv(f)) >= 3 for f in d.glob("ray/*/progress.csv"))
        except (OSError, pd.errors.EmptyDataError, pd.errors.ParserError):
            return False

    p = stopped_when(first_trial_recorded, run_study, capsys, space, tmp_path, tiny_data_dir)
    assert p.returncode == 130 and "continue it with --resume" in p.stderr, p.stdout[-3000:] + p.stderr[-3000:]
    recorded = yaml.safe_load((d / "environment.yaml").read_text())
    assert recorded["packages"]["optuna"] == optuna.__version__ and recorded["cpus"] >= 1
    recorded["packages"]["optuna"] = "5.0.0"
    (d / "environment.yaml").write_text(yaml.safe_dump(recorded))
    p = run_study(capsys, space, tmp_path, tiny_data_dir, "--resume")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    warnings = [line for line in p.stderr.splitlines() if "another environment" in line]
    assert warnings == [f"warning: --resume runs on another environment than {d / 'environment.yaml'} records: "
                        f"optuna: 5.0.0 then, {optuna.__version__} now"], p.stderr[-3000:]
    assert len(pd.read_csv(d / "trials.csv")) == 3
    timing = yaml.safe_load((d / "timing.yaml").read_text())  # both runs, and their sums
    assert [r.get("interrupted", False) for r in timing["runs"]] == [True, False] and timing["runs"][1]["resumed"]
    assert timing["wall_s"] == pytest.approx(sum(r["wall_s"] for r in timing["runs"]), abs=0.2)
    db = optuna.load_study(study_name="nsga2", storage=f"sqlite:///{d / 'optuna.db'}")
    assert [t.state.name for t in db.trials] == ["COMPLETE"] * 3
    # NSGA-II's generation is kept in the Optuna storage: the resumed trials continue where the population was
    # (a population sized to the study, 2 of 3 trials: the third is the second generation, bred from the first two)
    assert [t.system_attrs.get("NSGAIISampler:generation") for t in db.trials] == [0, 0, 1]
    trials = pd.read_csv(d / "trials.csv")  # number is creation order, as Optuna numbered the trials, resume or not
    assert sorted(trials["number"]) == [1, 2, 3]
    for _, row in trials.iterrows():
        asked = db.trials[row["number"] - 1].params
        assert asked["channels"] == row["channels"] and asked["lr"] == pytest.approx(row["lr"])


def test_environment_differences_are_one_line_each():
    now = environment.collect()
    then = {**now, "packages": {**now["packages"], "ray": "2.59.0"}, "cpus": now["cpus"] + 1}
    del then["packages"]["torch"]
    assert environment.differences(then, now) == [
        f"torch: none then, {now['packages']['torch']} now", f"ray: 2.59.0 then, {now['packages']['ray']} now",
        f"cpus: {now['cpus'] + 1} then, {now['cpus']} now"]
    assert environment.differences(now, now) == []


@pytest.mark.parametrize("name,objectives", [("tpe", 1), ("gp", 1), ("tpe", 2), ("nsga2", 2)])
def test_a_small_study_is_guided_not_random_search(name, objectives):
    """4 trials: Optuna's samplers draw their first 10 (NSGA-II its first generation of 50) from the
    random sampler of the same seed, so that tpe, gp and nsga2 ran the very configurations `random`
    did. Sized to the study, the first 2 are those draws and the last 2 are the sampler's own. Real
    Optuna studies on the space's define-by-run function (the search's), a cheap objective."""
    spec = specs.parse(tiny_spec("small", objective=TWO[:objectives], search={"sampler": name, "num_samples": 4}))

    def configurations(sampler_name):
        study = optuna.create_study(sampler=make_sampler(sampler_name, 0, 4),
                                    directions=["maximize", "minimize"][:objectives])
        space = specs.define_by_run(spec)

        def objective(trial):
            fields = space(trial)
            return (-abs(np.log(fields["lr"] / 0.01)), fields["channels"])[:objectives]
        study.optimize(objective, n_trials=4)
        return [t.params for t in study.trials]

    guided, drawn = configurations(name), configurations("random")
    assert guided[:2] == drawn[:2] and all(g != d for g, d in zip(guided[2:], drawn[2:])), (guided, drawn)


def test_the_dry_run_says_what_the_sampler_draws_at_random(tiny_data_dir, tmp_path, capsys):
    space = write_spec(tmp_path, tiny_spec("tpe12", search={"sampler": "tpe", "num_samples": 12}))
    p = run_study(capsys, space, tmp_path, tiny_data_dir, "--dry-run")  # one dry run (each calibrates the CPU)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    said = [line for line in p.stdout.splitlines() if line.startswith("sampler ")]
    assert said == ["sampler tpe: the first 4 of 12 trials at random (Optuna's default 10, sized to a third of the 12 "
                    "trials), then guided by the results"]
    # the same line for other samplers and sizes (study.run prints startup_line's)
    assert startup_line("gp", 48) == "sampler gp: the first 10 of 48 trials at random, then guided by the results"
    assert startup_line("tpe", 2) == ("sampler tpe: random search: it draws its first 2 trials at random before it "
                                      "learns from results, and the study has 2; give search.num_samples more than 2 "
                                      "for a guided search")
    assert startup_line("nsga2", 48).startswith("sampler nsga2: generations of 16 trials (Optuna's default 50")
    assert startup_line("tpe", 4, told=3) == ("sampler tpe: no trial at random (3 told by the warm start count as "
                                              "results), then guided by the results")
    assert startup_line("random", 4) is None and startup_line("qmc", 4) is None
