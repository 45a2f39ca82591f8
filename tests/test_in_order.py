"""search.in_order: a study's trials depend on its seed and its results alone, not on which trials
happened to end first (stopping.py: the n-th trial is asked for once trials 1..n-k have ended, and
Optuna is told their results in trial order just then)."""
import math

import optuna
import pytest

from conftest import tiny_spec
from study import spec as specs
from study.samplers import make_sampler
from study.stopping import MultiObjectiveASHA, SilentAwareOptunaSearch


def accuracy(config: dict) -> float:
    """A result that depends on the configuration alone: best near lr 0.012 with 6 channels, where the
    first trial lies (so that which trials TPE has seen differs when the first one ends last)."""
    return 0.9 - abs(math.log10(config["lr"] / 0.012)) / 10 + config["channels"] / 100


def asked(tmp_path, in_order: int, newest_first: bool, n: int = 14, k: int = 3) -> list:
    """The configurations a real searcher asks for, k trials at once, the oldest (or the newest)
    running trial ending whenever no new one may start; then every trial's state in optuna.db."""
    spec = specs.parse(tiny_spec("o"))
    url = f"sqlite:///{tmp_path}/o-{in_order}-{newest_first}.db"
    sampler = make_sampler("tpe", 0)
    optuna.create_study(storage=url, study_name="o", sampler=sampler, direction="maximize")
    searcher = SilentAwareOptunaSearch(space=specs.define_by_run(spec), metric="val_acc", mode="max",
                                       sampler=sampler, study_name="o", storage=optuna.storages.RDBStorage(url),
                                       in_order=in_order, num_samples=n)
    configs, running = [], []
    while len(configs) < n or running:
        config = searcher.suggest(f"t{len(configs)}") if len(configs) < n and len(running) < k else None
        if config is not None:
            configs.append(config)
            running.append((f"t{len(configs) - 1}", config))
            continue
        trial_id, config = running.pop(-1 if newest_first else 0)
        searcher.on_trial_complete(trial_id, {"val_acc": accuracy(config), "training_iteration": 1})
    states = [t.state.name for t in optuna.load_study(study_name="o", storage=url).trials]
    return configs, states


def test_the_same_trials_whichever_ends_first(tmp_path):
    oldest, states = asked(tmp_path, 3, newest_first=False)
    newest, _ = asked(tmp_path, 3, newest_first=True)
    assert newest == oldest
    assert states == ["COMPLETE"] * 14  # every result told in the end
    # without in_order, TPE (past its 10 random startup trials) saw other results, and asked for others
    assert asked(tmp_path, 0, newest_first=False)[0] != asked(tmp_path, 0, newest_first=True)[0]


def test_a_rung_reads_the_trials_that_ended_before_the_trial_was_asked():
    s = MultiObjectiveASHA(["val_acc"], ["max"], max_t=4, grace_period=1, reduction_factor=2, in_order=2)
    # trial 3 reaches rung 1 before trial 2 does: it is ranked against trial 1 alone (3 - 2 = 1)
    assert s.decide("a", {"training_iteration": 1, "val_acc": 0.5}, s.visible("a", 1)) == "CONTINUE"
    assert s.decide("c", {"training_iteration": 1, "val_acc": 0.6}, s.visible("c", 3)) == "CONTINUE"
    # trial 2 sees none of the others (1 - ... : trials up to number 0), so it goes on as the first at its rung
    assert s.decide("b", {"training_iteration": 1, "val_acc": 0.1}, s.visible("b", 2)) == "CONTINUE"
    # trial 4 sees trials 1 and 2 (0.5, 0.1), not 3 (0.6): 0.05 is not among the first two of three
    assert s.decide("d", {"training_iteration": 1, "val_acc": 0.05}, s.visible("d", 4)) == "STOP"
    assert s.decide("e", {"training_iteration": 1, "val_acc": 0.55}, s.visible("e", 5)) == "CONTINUE"  # 1-3: 2nd of 4
