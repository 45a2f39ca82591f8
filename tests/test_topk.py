"""retrain.top_k (issue 35): the search's best configurations retrained over seeds, the study's best chosen on
their mean validation score. ONE real tiny study serves every test here: it is SIGKILLed while its top-k
retrain runs (after one configuration x seed has ended) and finished by the advised --resume."""
import io
import json
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import calibrated_once, study_cmd, tiny_spec, write_spec
from test_kills import killed_at
from study import analyze, lifecycle, results, run, spec as specs
from study.storage import Location
from study.tuning import run_of

SEEDS = [0, 1]
TOP_K = 2


def retrain_runs(d: Path) -> dict:
    """{retrain trial folder: its result.json lines} of the retrain's Ray run."""
    return {f.parent.name: [json.loads(x) for x in f.read_text().splitlines() if x.strip().endswith("}")]
            for f in d.glob("retrain/*/result.json")}


def one_ended(d: Path, n0) -> bool:
    """A retrain run (a configuration with a seed, 1 epoch) recorded its last epoch, and not all of them have."""
    ended = [n for n, lines in retrain_runs(d).items() if any(r.get("training_iteration", 0) >= 1 for r in lines)]
    return 0 < len(ended) < TOP_K * len(SEEDS)


def in_process(main, argv) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(out):
        code = main([str(a) for a in argv])
    return code, out.getvalue()


def empty_state(d: Path) -> None:
    """A kill while Ray rewrote the retrain's experiment state: the newest one left empty."""
    sorted((d / "retrain").glob("experiment_state*.json"))[-1].write_bytes(b"")


def stale_state(d: Path, first: bytes) -> None:
    """A kill before Ray saved its record again since a run ended: its newest record is still `first`, the one
    Ray wrote as the retrain began, every run PENDING and none with a checkpoint (make test saw this once, and
    Ray's restore then trained the ended run again)."""
    assert all(json.loads(t[0])["status"] == "PENDING" for t in json.loads(first)["trial_data"]), first
    sorted((d / "retrain").glob("experiment_state*.json"))[-1].write_bytes(first)


@pytest.fixture(scope="module")
def topk(tiny_data_dir, tmp_path_factory, _module_ray):
    """The search in this process (--no-retrain), then its --retrain SIGKILLed once a configuration x seed has
    ended, then the advised --resume here, of the folder as the kill left it (Ray restores its record) and of a
    copy whose Ray record is lost (empty_state), and of one whose record is older than its runs (stale_state):
    {folder: the resume's output}, the state after the kill, the result.json of the runs ended before it, the
    killed run's output."""
    import ray

    from study import estimate

    tmp = tmp_path_factory.mktemp("topk")
    # silent_rate 0: every trial is a candidate (a tiny trial's output layer may fire below 0.001)
    spec = tiny_spec("topk", train={"epochs": 1}, search={"num_samples": 3, "max_concurrent": 2},
                     space={"lr": {"type": "float", "low": 0.02, "high": 0.05, "log": True}},
                     scheduler={"silent_rate": 0}, retrain={"epochs": 1, "seeds": SEEDS, "top_k": TOP_K},
                     render={"images": 1})
    space = write_spec(tmp, spec)
    d, lost, stale = tmp / "results" / "topk", tmp / "lost" / "topk", tmp / "stale" / "topk"
    argv = study_cmd(space, tmp, tiny_data_dir)
    with pytest.MonkeyPatch.context() as mp:  # in this process, on a local Ray
        mp.setenv("RAY_ADDRESS", "")
        mp.setattr(estimate, "cpu_speeds", calibrated_once)
        if not ray.is_initialized():
            ray.init(address="local", include_dashboard=False, log_to_driver=False)
        code, out = in_process(run.main, [*argv[3:], "--no-retrain"])
        assert code == 0, out[-3000:]
        first = []  # the retrain's first experiment state, as Ray wrote it when the retrain began

        def cue(d, n0):
            states = sorted((d / "retrain").glob("experiment_state*.json"))
            if not first and states and states[-1].stat().st_size:
                first.append(states[-1].read_bytes())
            return one_ended(d, n0)

        killed = killed_at([*argv, "--retrain"], d, cue, tmp / "killed.txt")
        before = {n: (d / "retrain" / n / "result.json").read_bytes() for n, lines in retrain_runs(d).items()
                  if any(r.get("training_iteration", 0) >= 1 for r in lines)}
        state = lifecycle.read(Location.parse(str(d)))
        shutil.copytree(d, lost)
        empty_state(lost)
        shutil.copytree(d, stale)
        stale_state(stale, first[0])
        outs = {}
        for folder in (d, lost, stale):
            code, outs[folder] = in_process(run.main, [argv[3], "--storage", folder.parent, *argv[6:], "--resume"])
            assert code == 0, killed[-3000:] + outs[folder][-3000:]
    return outs, state, before, killed


@pytest.mark.slow
def test_top_k_retrain_killed_and_resumed_runs_every_configuration_and_seed_once(topk):
    """Each configuration x seed ran to its end exactly once, whether Ray restored its record, it was lost, or it was older than the runs
    (a kill while Ray rewrote it): the runs that had ended were kept, none ran again."""
    outs, state, before, killed = topk
    assert state == "retrain_cut" and before, (state, killed[-2000:])
    for d, out in outs.items():
        ended = [run_of(lines[-1]["config"]) for lines in retrain_runs(d).values()
                 if any(r.get("training_iteration", 0) >= 1 for r in lines)]
        trials = pd.read_csv(d / "trials.csv", dtype={"trial_id": str})
        top = [r["trial_id"] for r in results.top_rows(trials, results.load(d).spec, TOP_K)]
        assert sorted(ended) == sorted((t, s) for t in top for s in SEEDS), (d, ended)  # each exactly once
        for name, lines in retrain_runs(d).items():  # one epoch each: none ran twice
            assert [r["training_iteration"] for r in lines] in ([1], []), (d, name, lines)
        for name, text in before.items():  # what had ended before the kill was kept, not run again
            assert (d / "retrain" / name / "result.json").read_bytes() == text, (d, name)
        for t in top:
            m = pd.read_csv(d / "retrained" / t / "metrics.csv")
            assert sorted(zip(m["seed"], m["epoch"])) == [(s, 0) for s in SEEDS], (d, t, m)
        assert lifecycle.read(Location.parse(str(d))) == "ended" and "chosen: trial" in out, out[-2000:]
    assert "Ray's record of the retrain is lost" in outs[list(outs)[1]], outs
    assert "Ray's record of the retrain is older than its runs" in outs[list(outs)[2]], outs


@pytest.mark.slow
def test_top_k_chooses_the_highest_mean_validation_score_and_best_yaml_says_so(topk):
    d = next(iter(topk[0]))  # the folder Ray restored
    trials = pd.read_csv(d / "trials.csv", dtype={"trial_id": str})
    # the search's top 2 by its objective, worked out here from the table
    top = list(trials.sort_values("best_val_acc", ascending=False, kind="stable")["trial_id"][:TOP_K])
    means = {t: pd.read_csv(d / "retrained" / t / "metrics.csv").groupby("seed")["val_acc"].last().mean() for t in top}
    chosen = max(top, key=lambda t: (means[t], -top.index(t)))
    best = yaml.safe_load((d / "best.yaml").read_text())
    assert best["trial_id"] == chosen and best["selection"]["chosen"] == chosen, (best, means)
    assert best["search_best"]["trial_id"] == top[0] == best["selection"]["search_best"], best
    assert best["selection"]["metric"] == "val_acc" and f"{means[chosen]:.4f}" in best["selection"]["reason"], best
    assert [c["trial_id"] for c in best["selection"]["candidates"]] == top
    assert best["config"] == yaml.safe_load(trials.set_index("trial_id").loc[chosen, "config"]), best
    summary = yaml.safe_load((d / "best" / "summary.yaml").read_text())
    assert summary["trial_id"] == chosen and summary["val_acc_mean"] == pytest.approx(means[chosen])
    assert (d / "best" / "metrics.csv").read_text() == (d / "retrained" / chosen / "metrics.csv").read_text()
    assert (d / "best" / "spikes").is_dir() and not (d / "retrained" / chosen / "spikes").exists()
    # the retrain held the validation split out (it chose on it) and trained on the rest
    cfg = yaml.safe_load((d / "best" / f"seed{SEEDS[0]}" / "config.yaml").read_text())
    assert cfg["val_size"] == 100 and cfg["train_size"] == 0 and cfg["epochs"] == 1, cfg


@pytest.mark.slow
def test_the_lucky_seed_section_and_dataframes(topk):
    d = next(iter(topk[0]))  # the folder Ray restored
    study = results.load(d)
    per, conf = study.retrained, study.retrained_summary
    assert len(per) == TOP_K * len(SEEDS) and len(conf) == TOP_K, (per, conf)
    assert list(conf["search_rank"]) == [1, 2] and conf["chosen"].sum() == 1
    for _, c in conf.iterrows():
        v = per[per["trial_id"] == c["trial_id"]]["val_acc"]
        assert c["val_acc_mean"] == pytest.approx(v.mean()) and c["val_acc_std"] == pytest.approx(v.std(ddof=1))
    lines = "\n".join(analyze.lucky_lines(study))
    won = conf[conf["chosen"]].iloc[0]
    assert "## Is the best a lucky seed?" in lines and f"trial {won['trial_id']}, the search's number" in lines, lines
    assert ("order held" if won["search_rank"] == 1 else "order did not hold") in lines, lines
    assert "Spearman's rank correlation" in lines and "Spread across seeds" in lines, lines
    # seed 0 is the trials' seed, and the retrain's 1 epoch on all training images the trials': a repeat of them
    assert "Seed 0 is the one the search's trials ran with: its run repeats each configuration's search trial" in lines
    assert analyze.plot_lucky(study, d).is_file()


@pytest.mark.slow
def test_a_retrain_run_of_a_configuration_reproduces(topk, tiny_data_dir):
    """study.reproduce --seed: a top-k retrain run (not the search's trial) retrained again, equal on the CPU."""
    from study import reproduce

    d = next(iter(topk[0]))  # the folder Ray restored
    other = results.load(d).retrained_summary.query("not chosen")["trial_id"].iloc[0]
    code, out = in_process(reproduce.main, [d, "--trial", other, "--seed", SEEDS[1], "--data-dir", tiny_data_dir])
    assert code == 0 and "reproduced: all" in out and "exactly" in out, out[-3000:]
    assert (d / "reproduce" / f"{other}-seed{SEEDS[1]}" / "comparison.csv").is_file()


def test_top_k_without_a_validation_split_is_refused():
    raw = tiny_spec("nv", objective={"metric": "train_acc", "mode": "max"}, retrain={"top_k": 2})
    del raw["train"]["val_size"]
    with pytest.raises(specs.SpecError, match=r"nv.yaml: retrain.top_k: 2 is not allowed without a validation "
                                              r"split.*set train.val_size > 0"):
        specs.parse(raw, "nv.yaml")
    raw["retrain"]["top_k"] = 0
    with pytest.raises(specs.SpecError, match=r"retrain.top_k: 0 is not allowed; must be >= 1"):
        specs.parse(raw, "nv.yaml")
    assert specs.parse(tiny_spec("d"), "d.yaml").retrain["top_k"] == 1  # the default: today's retrain


def test_the_estimate_prices_top_k_times_seeds():
    from study import estimate

    spec = specs.parse(tiny_spec("e", retrain={"epochs": 4, "seeds": [0, 1]}, resources={"gpus_per_trial": 1}),
                       "e.yaml")
    res = {"cpu": 1, "gpu": 1, "retrain_gpu": 1, "max_concurrent": 1}
    one = estimate.predict(spec, res, cpus=2, gpus=1)
    spec.retrain["top_k"] = 3
    three = estimate.predict(spec, res, cpus=2, gpus=1)
    fixed = estimate.TUNER_S["retrain"] + estimate.WORKER_START_S + estimate.TRIAL_START_S
    # one GPU: the runs one after another, 2 seeds against 3 configurations x 2 seeds
    assert three["phases_s"]["retrain"] - fixed == pytest.approx(3 * (one["phases_s"]["retrain"] - fixed), rel=0.05)
    assert "retrain_runs" not in one and three["retrain_runs"] == "3 configurations x 2 seeds"
    assert "for 3 configurations x 2 seeds" in estimate.line(three)


def test_top_k_takes_the_best_by_the_objective_or_the_picked_point_first_then_the_front():
    """results.top_rows on trials tables as export writes them: a silent trial is never among the top while
    others learned; with several objectives the retrain.pick point comes first, then the rest of the front."""
    trials = pd.DataFrame({"trial_id": list("abcde"), "status": ["finished"] * 4 + ["errored"],
                           "channels": [4, 6, 4, 6, 4], "lr": [0.01] * 5,
                           "val_acc": [0.5, 0.7, 0.9, 0.6, 0.99], "best_val_acc": [0.8, 0.7, 0.9, 0.75, 0.99],
                           "energy_uj": [0.3, 0.5, 3.0, 2.0, 0.1], "silent": ["", "", "fr_12", "", ""], "dead": [""] * 5})
    one = specs.parse(tiny_spec("one", retrain={"top_k": 3}), "one.yaml")
    assert [r["trial_id"] for r in results.top_rows(trials, one, 3)] == ["a", "d", "b"]  # c silent, e errored
    assert [r["trial_id"] for r in results.top_rows(trials, one, 9)] == ["a", "d", "b"]  # fewer qualify
    two = specs.parse(tiny_spec("two", objective=[{"metric": "val_acc", "mode": "max"},
                                                  {"metric": "energy_uj", "mode": "min"}],
                                retrain={"top_k": 2, "pick": "knee"}), "two.yaml")
    front = list(results.pareto(trials, two)["trial_id"])  # by val_acc: d is dominated by b
    assert front == ["b", "a"] and results.pick(results.pareto(trials, two), two)["trial_id"] == "b"
    two.retrain["pick"] = 1  # index 1 of the front: a first, then the front's others
    assert [r["trial_id"] for r in results.top_rows(trials, two, 2)] == ["a", "b"]
    assert results.search_score(results.top_rows(trials, two, 2)[0], two) == 0.5  # the last epoch's val_acc
    assert results.selection_metric(two) == {"metric": "val_acc", "mode": "max"}


def test_the_search_order_reads_each_side_better_first():
    """Spearman's rho of the lucky-seed section is 1 when the search's order held, whatever each side's mode: with
    a loss objective the lowest search score and the lowest mean validation loss are both the best."""
    loss = specs.parse(tiny_spec("l", objective={"metric": "val_loss", "mode": "min"}, retrain={"top_k": 3}), "l.yaml")
    conf = pd.DataFrame({"trial_id": list("abc"), "search_rank": [1, 2, 3], "search_score": [0.02, 0.03, 0.05],
                         "selection_metric": "val_loss", "val_loss_mean": [0.021, 0.032, 0.04]})
    assert results.selection_metric(loss) == {"metric": "val_loss", "mode": "min"}
    assert analyze.search_order_rho(conf, loss) == pytest.approx(1.0)
    assert analyze.search_order_rho(conf.assign(val_loss_mean=[0.04, 0.032, 0.021]), loss) == pytest.approx(-1.0)
    acc = specs.parse(tiny_spec("a", retrain={"top_k": 3}), "a.yaml")  # val_acc, max
    conf = conf.assign(search_score=[0.9, 0.8, 0.7], selection_metric="val_acc", val_acc_mean=[0.85, 0.86, 0.7])
    assert analyze.search_order_rho(conf, acc) == pytest.approx(0.5)
    assert np.isnan(analyze.search_order_rho(conf.assign(val_acc_mean=0.1), acc))  # tied: no order


def lucky_study(seeds: list) -> results.Study:
    """A Study with the retrained tables as results.read_retrained makes them: configurations a and b, `seeds` each."""
    from study.storage import Location

    spec = specs.parse(tiny_spec("s", retrain={"top_k": 2, "seeds": seeds}), "s.yaml")
    per = pd.DataFrame([{"trial_id": t, "search_rank": r, "search_score": sc, "seed": s, "epoch": 0,
                         "val_acc": v + 0.01 * s, "test_acc": v, "chosen": t == "b"}
                        for t, r, sc, v in (("a", 1, 0.8, 0.70), ("b", 2, 0.79, 0.72)) for s in seeds])
    g = per.groupby("trial_id", sort=False)
    conf = pd.DataFrame({"trial_id": ["a", "b"], "search_rank": [1, 2], "search_score": [0.8, 0.79], "seeds": len(seeds),
                         "selection_metric": "val_acc", "val_acc_mean": g["val_acc"].mean().values,
                         "val_acc_std": g["val_acc"].std(ddof=1).fillna(0.0).values,
                         "test_acc_mean": g["test_acc"].mean().values,
                         "test_acc_std": g["test_acc"].std(ddof=1).fillna(0.0).values, "chosen": [False, True]})
    return results.Study(Location.parse("/tmp/lucky"), spec, pd.DataFrame(), pd.DataFrame(), None, None, None,
                         retrained=per, retrained_summary=conf)


def test_the_lucky_seed_section_with_one_seed_claims_no_spread():
    """One seed has no spread (its std is written 0): the section must not say every gap is larger than it."""
    one = "\n".join(analyze.lucky_lines(lucky_study([3])))
    assert "order did not hold: trial b, the search's number 2, won" in one, one
    assert "not measured, one seed (3)" in one and "every gap is larger" not in one, one
    two = "\n".join(analyze.lucky_lines(lucky_study([3, 4])))
    assert "the std of val_acc over the seeds is 0.0071 to 0.0071" in two and "not measured" not in two, two
