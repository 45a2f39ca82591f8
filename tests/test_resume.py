"""An interrupted study, resumed, ends as the straight one would: the same trials stopped at the
same rungs (Ray saves no scheduler state; study.run records the rungs again on --resume), one trial at a
time, or two at once with search.in_order (which makes what the sampler and the rungs read independent of
timing)."""
import re
import shutil
from pathlib import Path

import optuna
import pandas as pd
import pytest

from conftest import in_process, run_study, stopped_when, tiny_spec, write_spec
from study import results
from study.storage import Location

TWO = [{"metric": "val_acc", "mode": "max"}, {"metric": "energy_uj", "mode": "min"}]


def ended(capsys, space, tmp_path, data, interrupt_at: int | None) -> pd.DataFrame:
    """The study; with `interrupt_at`, first a run stopped as Ctrl-C stops it once that trial has
    begun (the ones before it ended), then --resume: both in this process, on the module's Ray (a
    process Ctrl-C'd is tests/test_study.py's; here what matters is what the resume decides)."""
    name = space.stem
    ray_dir = tmp_path / "results" / name / "ray"
    if interrupt_at is not None:
        p = stopped_when(lambda: len(list(ray_dir.glob("*/progress.csv"))) >= interrupt_at,
                         run_study, capsys, space, tmp_path, data)
        assert p.returncode == 130 and "continue it with --resume" in p.stderr, p.stdout[-3000:] + p.stderr[-3000:]
    p = run_study(capsys, space, tmp_path, data, *(["--resume"] if interrupt_at else []))  # on the module's Ray
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return pd.read_csv(tmp_path / "results" / name / "trials.csv").sort_values("number").reset_index(drop=True)


# one objective (Ray's ASHA), one trial at a time (the default search); two objectives (Pareto-front ASHA),
# two at once in trial order (search.in_order)
@pytest.mark.parametrize("objectives,at_once", [(1, 1), (2, 2)])
def test_an_interrupted_study_stops_the_same_trials_as_the_straight_one(objectives, at_once, tmp_path, tiny_data_dir,
                                                                        local_ray, capsys):
    spec = dict(train={"epochs": 3},
                search={"num_samples": 5, "max_concurrent": at_once, "seed": 0, "in_order": at_once > 1},
                scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2, "silent_rate": 0},
                retrain={"seeds": []})
    if objectives == 2:
        spec.update(objective=TWO, retrain={"seeds": [], "pick": "knee"})
    straight = ended(capsys, write_spec(tmp_path, tiny_spec("straight", **spec)), tmp_path, tiny_data_dir, None)
    resumed = ended(capsys, write_spec(tmp_path, tiny_spec("resumed", **spec)), tmp_path, tiny_data_dir, 3)
    cols = ["number", "channels", "lr", "status", "epochs_run"]
    assert (straight["status"] == "stopped").any(), straight[cols]  # the rungs decided something
    pd.testing.assert_frame_equal(resumed[cols], straight[cols], check_exact=False, rtol=1e-9)


def files(folder) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_copied_or_moved_interrupted_study_resumes_into_its_own_folder(tmp_path, tiny_data_dir, local_ray, capsys):
    """One study stopped as its second trial begins (its third is made after the resume, from the
    search's saved state, which holds the folder it began in). A copy resumes while the original stays:
    the original is byte for byte what it was. The original, moved (its old path gone, so that a write
    or read there fails), resumes; its retrain is stopped too, the folder moved again, and --resume
    finishes the retrain there. --optuna-storage naming another folder's database is refused, and so
    is a moved study an earlier csnn-study began (its saved Ray scheduler would write there)."""
    from study import run

    spec = tiny_spec("moves", train={"epochs": 1}, search={"num_samples": 3, "max_concurrent": 1},
                     retrain={"epochs": 3, "seeds": [0]}, render={"images": 1},
                     resources={"checkpoint_every": 1})  # a retrain checkpoint each epoch: the stop's cue
    space = write_spec(tmp_path, spec)

    def study(storage, *extra):
        return in_process(capsys, run.main, space, "--storage", storage, "--data-dir", tiny_data_dir, *extra)

    first = tmp_path / "results" / "moves"
    # as the second trial starts (one at a time: the first has ended), long before the third is made
    p = stopped_when(lambda: len(list(first.glob("ray/trainable_*"))) >= 2, study, first.parent)
    assert p.returncode == 130 and "continue it with --resume" in p.stderr, p.stdout[-3000:] + p.stderr[-3000:]
    ended = {Path(t.path).name: (Path(t.path) / "progress.csv").read_bytes()
             for t, _ in results.trial_results(Location.parse(first / "ray")) if t.status == "TERMINATED"}
    assert ended and len(list(first.glob("ray/trainable_*"))) == 2, p.stderr[-3000:]  # the third: not made yet
    # its dry run prices the trials left, and says that the interrupted search goes on (not "a new study")
    p = study(first.parent, "--resume", "--dry-run")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    # the trials that ended before the stop: the first, or also the second where its one epoch ended before
    # Ray Tune acted on the stop (a fresh clone's .ci/run once said something else here; the whole output shows)
    n = len(ended)
    assert f"(a study whose search has not ended: the interrupted search continues, {n} of 3 trials ended)" in p.stdout, \
        p.stdout
    assert "a new study" not in p.stdout and re.search(rf"^estimate: .*\(search [\d.]+ min: {3 - n} of 3 trials left, ",
                                                       p.stdout, re.M), p.stdout[-2000:]

    def complete(d, retrained=True):
        trials = pd.read_csv(d / "trials.csv")
        assert len(trials) == 3 and (trials["status"] == "finished").all(), trials
        assert len(list(d.glob("ray/*/checkpoint_*/checkpoint_latest.pth"))) == 3  # every trial's, here
        for name, progress in ended.items():  # the trial ended before the stop was not run again
            assert (d / "ray" / name / "progress.csv").read_bytes() == progress
        db = optuna.load_study(study_name="moves", storage=f"sqlite:///{d / 'optuna.db'}")
        assert [t.state.name for t in db.trials] == ["COMPLETE"] * 3
        assert (d / "best" / "summary.yaml").is_file() == retrained and not (d / "retrain.pending").exists()

    copy = shutil.copytree(tmp_path / "results", tmp_path / "copy") / "moves"
    before = files(first)
    p = study(copy.parent, "--resume", "--optuna-storage", f"sqlite:///{first / 'optuna.db'}")  # the original's
    assert p.returncode == 2 and "keeps its Optuna trials in its own optuna.db" in p.stderr, p.stderr
    p = study(copy.parent, "--resume", "--optuna-storage", f"sqlite:///{copy / 'optuna.db'}", "--no-retrain")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]  # its own database: as if left out
    complete(copy, retrained=False)
    assert files(first) == before  # nothing written into the original

    moved = shutil.move(tmp_path / "results", tmp_path / "moved") / "moves"
    recorded = (moved / "environment.yaml").read_text()  # as an earlier csnn-study wrote it: refused
    (moved / "environment.yaml").write_text("".join(line for line in recorded.splitlines(keepends=True)
                                                    if not line.startswith("optuna_storage:")))
    p = study(moved.parent, "--resume")
    assert p.returncode == 2 and f"the study began in {first} with an earlier csnn-study" in p.stderr, p.stderr
    (moved / "environment.yaml").write_text(recorded)
    p = stopped_when(lambda: bool(list(moved.glob("retrain/*/checkpoint_*"))),  # its first epoch is saved
                     study, moved.parent, "--resume")
    assert p.returncode == 130 and "the retrain was interrupted" in p.stderr, p.stdout[-3000:] + p.stderr[-3000:]
    assert not (tmp_path / "results").exists()  # nothing made again where it began
    again = shutil.move(moved.parent, tmp_path / "again") / "moves"
    p = study(again.parent, "--resume")
    assert p.returncode == 0 and "retrained best" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
    complete(again)
    assert not (tmp_path / "results").exists() and not (tmp_path / "moved").exists()


def test_resume_takes_the_optuna_storage_the_study_began_with(tmp_path):
    """environment.yaml records the Optuna storage a study began with (None: its own optuna.db,
    wherever the folder is now; a URL with its password hidden); --resume and --retrain take that one."""
    from study import spec as specs
    from study.lifecycle import UsageError
    from study.tuning import own_database, own_optuna_storage, shown_url

    spec = specs.parse(tiny_spec("own"), "own.yaml")
    d = Location.parse(tmp_path / "results" / "own")
    assert own_optuna_storage("sqlite:////elsewhere/o.db", {}, spec, d) == "sqlite:////elsewhere/o.db"  # no record
    began = {"optuna_storage": None}
    assert own_optuna_storage(None, began, spec, d) is None
    assert own_optuna_storage(f"sqlite:///{tmp_path}/results/./own/optuna.db", began, spec, d) is None
    with pytest.raises(UsageError, match="keeps its Optuna trials in its own optuna.db"):
        own_optuna_storage(f"sqlite:///{tmp_path}/optuna.db", began, spec, d)
    # a study begun with --optuna-storage naming its own folder's optuna.db records none (it moves with the folder)
    assert own_database(f"sqlite:///{tmp_path}/results/own/optuna.db", spec, d)
    assert not own_database(f"sqlite:///{tmp_path}/optuna.db", spec, d) and not own_database("postgresql://u@h/o", spec, d)
    server = "postgresql://user:secret@dbhost/optuna"
    began = {"optuna_storage": shown_url(server)}
    assert "secret" not in began["optuna_storage"]
    assert own_optuna_storage(server, began, spec, d) == server
    with pytest.raises(UsageError, match="began with --optuna-storage postgresql://user:\\*\\*\\*@dbhost/optuna; a "
                                         "study resumes with the database it started with: give that"):
        own_optuna_storage(None, began, spec, d)
    with pytest.raises(UsageError, match="began with --optuna-storage postgresql://user:\\*\\*\\*@dbhost/optuna"):
        own_optuna_storage("postgresql://user:secret@otherhost/optuna", began, spec, d)
