"""Outcome constraints (the spec's `constraints:`): refused where the spec is read when they cannot be
judged, how a report meets them, and what they keep off the best and the front. The real study that
tells them to Optuna is tests/test_efficiency.py's (it shares that module's Ray)."""
import copy

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml

from conftest import TINY_STUDY, in_process, tiny_spec
from study import results, spec as specs
from study.samplers import make_sampler
from study.stopping import SilentAwareOptunaSearch

LIMITS = {"spikes_per_image": {"max": 20000}, "energy_uj": {"max": 5}}


def with_constraints(value, **train):
    raw = tiny_spec("c", train=train)
    raw["constraints"] = copy.deepcopy(value)
    return raw


@pytest.mark.parametrize("value,key,allowed", [
    ({"test_acc": {"min": 0.8}}, "constraints.test_acc", "test_acc is measured on the test set, which a study only "
     "reports: choosing by it would fit the test set; hold out a validation split (train.val_size, e.g. 5000) and use "
     "val_acc"),
    ({"max_test_acc": {"min": 0.8}}, "constraints.max_test_acc", "measured on the test set"),
    ({"test_s": {"max": 3}}, "constraints.test_s", "measured on the test set"),
    ({"joules": {"max": 1}}, "constraints.joules", "'joules' is never reported; allowed: train_loss"),
    ({"epoch": {"max": 3}}, "constraints.epoch", "'epoch' cannot be constrained; allowed: train_loss"),
    ({"top_class_share": {"max": 0.5}}, "constraints.top_class_share", "cannot be constrained"),
    ({"energy_uj": {"below": 5}}, "constraints.energy_uj.below", "unknown key; allowed: min, max"),
    ({"energy_uj": {}}, "constraints.energy_uj", "is empty; give min, max or both"),
    ({"energy_uj": 5}, "constraints.energy_uj", "must be a mapping, got 5"),
    ({"energy_uj": {"max": "5uJ"}}, "constraints.energy_uj.max", "'5uJ' is not allowed; must be a number"),
    ({"energy_uj": {"max": True}}, "constraints.energy_uj.max", "must be a number"),
    ({"energy_uj": {"max": float("nan")}}, "constraints.energy_uj.max", "must be a finite number"),
    ({"energy_uj": {"max": -1}}, "constraints.energy_uj.max", "must be >= 0"),
    ({"energy_uj": {"min": 6, "max": 5}}, "constraints.energy_uj.min", "6 is above max 5: no trial can meet both"),
    ({"val_acc": {"min": 90}}, "constraints.val_acc.min", "val_acc is a fraction, at most 1 (e.g. 0.9 for 90 %)"),
    ({"fr_12": {"min": 2}}, "constraints.fr_12.min", "fr_12 is a fraction, at most 1"),
    ([{"energy_uj": {"max": 5}}], "constraints", "must be a mapping"),
])
def test_bad_constraints_name_the_key_and_what_is_allowed(value, key, allowed):
    with pytest.raises(specs.SpecError) as e:
        specs.parse(with_constraints(value), "c.yaml")
    assert str(e.value).startswith(f"c.yaml: {key}: ") and allowed in str(e.value), str(e.value)


@pytest.mark.parametrize("metric", ["energy_uj", "fr_12", "val_loss"])
def test_a_constraint_that_would_read_the_test_set_needs_a_validation_split(metric):
    raw = with_constraints({metric: {"max": 1}}, val_size=0)
    raw["objective"] = {"metric": "train_loss", "mode": "min"}
    with pytest.raises(specs.SpecError, match=f"c.yaml: constraints.{metric}: .*set train.val_size > 0"):
        specs.parse(raw, "c.yaml")


def test_constraints_default_to_none_and_round_trip():
    assert specs.parse(tiny_spec("c")).constraints == {}
    assert specs.parse({**tiny_spec("c"), "constraints": None}).constraints == {}  # an empty `constraints:`
    s = specs.parse(with_constraints({**LIMITS, "val_acc": {"min": 0.5, "max": 1}}))
    assert s.constraints == {**LIMITS, "val_acc": {"min": 0.5, "max": 1}}
    assert list(s.to_dict())[:3] == ["name", "objective", "constraints"]  # spec.yaml and --dry-run show them
    assert specs.parse(yaml.safe_load(yaml.safe_dump(s.to_dict()))).to_dict() == s.to_dict()


def test_the_dry_run_refuses_a_constraint_on_the_test_set(tmp_path, tiny_data_dir, capsys):
    from study import run

    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(with_constraints({"test_loss": {"max": 0.1}})))
    p = in_process(capsys, run.main, f, "--storage", tmp_path / "results", "--data-dir", tiny_data_dir, "--dry-run")
    assert p.returncode == 2 and f"{f}: constraints.test_loss: test_loss is measured on the test set" in p.stderr
    assert not (tmp_path / "results").exists()


def test_how_a_report_meets_the_constraints():
    """Optuna's value per bound: <= 0 met, else how far past the bound as a share of it; the text names
    those broken; a metric the report lacks counts as broken."""
    values, text = specs.broken(LIMITS, {"spikes_per_image": 25000.0, "energy_uj": 4.0})
    assert values == {"spikes_per_image.max": 0.25, "energy_uj.max": pytest.approx(-0.2)}
    assert text == "spikes_per_image 25000 > max 20000"
    values, text = specs.broken({"val_acc": {"min": 0.5, "max": 0.9}}, pd.Series({"val_acc": 0.25}))
    assert values == {"val_acc.min": 0.5, "val_acc.max": pytest.approx(-0.65 / 0.9)} and text == "val_acc 0.25 < min 0.5"
    assert specs.broken({"energy_uj": {"max": 0}}, {"energy_uj": 0.5}) == ({"energy_uj.max": 0.5}, "energy_uj 0.5 > max 0")
    values, text = specs.broken(LIMITS, {"spikes_per_image": float("nan")})
    assert values == {"spikes_per_image.max": 1.0, "energy_uj.max": 1.0}
    assert text == "spikes_per_image not reported; energy_uj not reported"
    assert specs.broken({}, {"energy_uj": 9.0}) == ({}, "")


def trials_frame(**constraint) -> pd.DataFrame:
    rows = [{"trial_id": t, "status": "finished", "channels": 4, "lr": lr, "val_acc": acc, "best_val_acc": acc,
             "energy_uj": e, "time_s": 1.0, "silent": "", "dead": "", "constraint": constraint.get(t, "")}
            for t, lr, acc, e in (("a", 0.01, 0.9, 9.0), ("b", 0.02, 0.8, 3.0), ("c", 0.03, 0.7, 2.0))]
    return pd.DataFrame(rows)


def test_a_trial_that_broke_a_constraint_is_never_the_best_nor_on_the_front():
    one = specs.parse(tiny_spec("one"))
    two = specs.parse(tiny_spec("two", objective=[{"metric": "val_acc", "mode": "max"},
                                                  {"metric": "energy_uj", "mode": "min"}],
                                retrain={"seeds": [0], "pick": "most_accurate"}))
    assert results.best_row(trials_frame(), one)["trial_id"] == "a"  # the control
    assert set(results.pareto(trials_frame(), two)["trial_id"]) == {"a", "b", "c"}
    hit = trials_frame(a="energy_uj 9 > max 5")
    assert results.best_row(hit, one)["trial_id"] == "b"
    assert set(results.pareto(hit, two)["trial_id"]) == {"b", "c"} and results.best_row(hit, two)["trial_id"] == "b"
    assert results.nothing_to_pick(hit) == ""
    # every trial broke one: no best, and that is a finding (study.run ends with 0 and says so)
    every = trials_frame(a="x", b="y", c="z")
    assert results.best_row(every, one) is None and results.best_row(every, two) is None
    assert results.nothing_to_pick(every) == "met the constraints"
    # read back from a csv, the feasible trials' empty texts are NaN: still feasible
    assert results.best_row(hit.replace("", np.nan), one)["trial_id"] == "b"


def test_a_study_in_which_every_trial_broke_a_constraint_says_so():
    """No best and nothing retrained, a finding: the summary's line and its constraints section."""
    from study import analyze
    from study.storage import Location

    spec = specs.parse(with_constraints({"energy_uj": {"max": 1}}))
    trials = trials_frame(a="energy_uj 9 > max 1", b="energy_uj 3 > max 1", c="energy_uj 2 > max 1")
    study = results.Study(Location.parse("/tmp/limits"), spec, trials, pd.DataFrame(), None, None, None)
    lines = analyze.summary(study)
    assert lines[lines.index("## Constraints: 3 of 3 trials broke one") + 4] == "- `energy_uj` max 1: 3 broke it", lines
    assert "- trial b: energy_uj 3 > max 1" in lines
    assert analyze.best_lines(study)[0].startswith("**No trial met the constraints**: every trial that reported broke "
                                                    "one at its last epoch (the constraints section above says which)")
    trials.loc[1, "constraint"] = ""  # b kept it: it is the best, and nothing is said
    study.best = results.best_entry(results.best_row(trials, spec), spec)
    assert study.best["trial_id"] == "b" and analyze.best_lines(study)[0] == "## Best trial: b"


def test_the_top_trials_table_labels_a_trial_that_broke_a_constraint():
    """The report's leaderboard ranks by the objective, so a trial that broke a constraint may top it while another is
    the best: its row says which it broke (read back from a csv too, where a kept one is NaN)."""
    from study import analyze
    from study.storage import Location

    spec = specs.parse(with_constraints({"energy_uj": {"max": 5}}))
    for trials in (trials_frame(a="energy_uj 9 > max 5"), trials_frame(a="energy_uj 9 > max 5").replace("", np.nan)):
        study = results.Study(Location.parse("/tmp/limits"), spec, trials, pd.DataFrame(), None, None, None)
        rows = analyze.leaderboard(study, 3).splitlines()
        assert rows[0].split()[-1] == "constraint" and rows[1].split()[0] == "a", rows
        assert rows[1].endswith("energy_uj 9 > max 5") and rows[2].endswith(" -") and rows[3].endswith(" -"), rows
    plain = specs.parse(tiny_spec("c"))  # no constraints: no column
    study = results.Study(Location.parse("/tmp/limits"), plain, trials_frame(), pd.DataFrame(), None, None, None)
    assert "constraint" not in analyze.leaderboard(study, 3)


@pytest.mark.filterwarnings("ignore:Define-by-run function passed")  # Ray's: GP's fit counts as the space's time
def test_gp_learns_from_constraints_when_some_trials_are_silent():
    """Every told trial is told every constraint: Optuna's GPSampler refuses ('The constraint names must
    be the same for all trials') a study where a silent trial names one that the others do not."""
    spec = specs.parse(with_constraints({"energy_uj": {"max": 5}}))
    searcher = SilentAwareOptunaSearch(space=specs.define_by_run(spec), metric="val_acc", mode="max",
                                       sampler=make_sampler("gp", 0, 3), study_name="gp",
                                       storage=optuna.storages.InMemoryStorage(), silent_rate=0.001,
                                       constraints=spec.constraints)
    fires = {f"fr_{i}": 0.1 for i in (2, 6, 10, 12)}
    reports = [{**fires, "fr_12": 0.0}, {**fires, "energy_uj": 9.0}, fires]  # silent, broken, neither
    for i, report in enumerate(reports):
        assert searcher.suggest(str(i)) is not None  # the third: GP's own, after its start-up of 2
        searcher.on_trial_complete(str(i), {"val_acc": 0.1 * (i + 1), "energy_uj": 1.0, **report})
    told = searcher._ot_study.trials
    assert [t.state.name for t in told] == ["COMPLETE"] * 3
    assert [t.constraints["silent"] for t in told] == [1.0, 0.0, 0.0]
    assert [t.constraints["energy_uj.max"] for t in told] == [-0.8, 0.8, -0.8]
    assert told[1].user_attrs["constraint"] == "energy_uj 9 > max 5" and "constraint" not in told[2].user_attrs


def test_a_warm_start_tells_the_earlier_trials_this_studys_constraints(tiny_study):
    """The earlier study had no constraints: its trials are told those of this one, judged on their last epoch."""
    from study import warmstart

    e2e, _ = tiny_study
    first = pd.read_csv(e2e / "trials.csv", dtype={"trial_id": str}).set_index("trial_id")
    bound = float(first["spikes_per_image"].median())  # the middle trial keeps it (equal), the one above breaks it
    raw = tiny_spec("c", **TINY_STUDY)  # tiny_study's space: a warm start reads only trials of the same space
    raw["constraints"] = {"spikes_per_image": {"max": bound}}
    spec = specs.parse(raw)
    told = warmstart.plan(spec, [str(e2e)])[0]["told"]
    assert len(told) == len(first) == 3
    for t in told:
        row = first.loc[t.user_attrs["warm_start"].rsplit(" ", 1)[1]]
        assert t.constraints == {**{k: float(isinstance(row[k], str)) for k in ("silent", "dead")},  # as there
                                 "spikes_per_image.max": pytest.approx((row["spikes_per_image"] - bound) / bound)}
    assert sorted(t.constraints["spikes_per_image.max"] > 0 for t in told) == [False, False, True]
