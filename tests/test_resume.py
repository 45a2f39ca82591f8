"""An interrupted study, resumed, ends as the straight one would: the same trials stopped at the
same rungs (Ray saves no scheduler state; study.run records the rungs again on --resume), with two trials
at once: search.in_order makes what the sampler and the rungs read independent of timing."""
import signal
import subprocess
import time

import pandas as pd
import pytest

from conftest import env, run_study, study_cmd, tiny_spec, write_spec

TWO = [{"metric": "val_acc", "mode": "max"}, {"metric": "energy_uj", "mode": "min"}]


def ended(capsys, space, tmp_path, data, interrupt_at: int | None) -> pd.DataFrame:
    """The study, two trials at once in trial order (search.in_order); with `interrupt_at`, first a process Ctrl-C'd once that
    trial has begun (the ones before it ended), then --resume."""
    name = space.stem
    ray_dir = tmp_path / "results" / name / "ray"
    if interrupt_at is not None:
        p = subprocess.Popen(study_cmd(space, tmp_path, data), env=env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 300
        while time.time() < deadline and p.poll() is None:
            if len(list(ray_dir.glob("*/progress.csv"))) >= interrupt_at:
                break
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        out = p.communicate(timeout=180)[0]
        assert p.returncode == 130 and "continue it with --resume" in out, out[-3000:]
    p = run_study(capsys, space, tmp_path, data, *(["--resume"] if interrupt_at else []))  # on the module's Ray
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return pd.read_csv(tmp_path / "results" / name / "trials.csv").sort_values("number").reset_index(drop=True)


@pytest.mark.parametrize("objectives", [1, 2])
def test_an_interrupted_study_stops_the_same_trials_as_the_straight_one(objectives, tmp_path, tiny_data_dir,
                                                                        local_ray, capsys):
    spec = dict(train={"epochs": 3}, search={"num_samples": 5, "max_concurrent": 2, "seed": 0, "in_order": True},
                scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2, "silent_rate": 0},
                retrain={"seeds": []})
    if objectives == 2:
        spec.update(objective=TWO, retrain={"seeds": [], "pick": "knee"})
    straight = ended(capsys, write_spec(tmp_path, tiny_spec("straight", **spec)), tmp_path, tiny_data_dir, None)
    resumed = ended(capsys, write_spec(tmp_path, tiny_spec("resumed", **spec)), tmp_path, tiny_data_dir, 3)
    cols = ["number", "channels", "lr", "status", "epochs_run"]
    assert (straight["status"] == "stopped").any(), straight[cols]  # the rungs decided something
    pd.testing.assert_frame_equal(resumed[cols], straight[cols], check_exact=False, rtol=1e-9)
