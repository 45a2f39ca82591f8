"""Studies on GPUs and clusters, tested on this CPU machine: Ray's logical GPUs
(ray.init(num_gpus=N) gives each trial real GPU ids), a real S3 endpoint (moto's
server on 127.0.0.1) and a real two-node Ray cluster whose second node sees an
empty tmpfs over the storage folder (unshare --mount)."""
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
import torch

from conftest import ROOT, calibrated, env, in_process, run_study, stopped_when, study_cmd, tiny_spec, write_spec
from csnn import data as fmnist
from csnn.trainable import checkpoint_epochs, trial_device
from study import analyze, plan as plans, results, run, spec as specs
from study.storage import Location


def spans(folder: Location) -> list:
    """(start, end) of each trial's training, from Ray's own record."""
    out = []
    for _, r in results.trial_results(folder):
        df = r.metrics_dataframe
        out.append((df["timestamp"].iloc[0] - df["time_this_iter_s"].iloc[0], df["timestamp"].iloc[-1]))
    return out


def test_plan_spreads_trials_over_every_gpu():
    fmnist_spec = specs.load(ROOT / "search_spaces" / "fmnist.yaml")
    # 8 GPUs, 64 CPUs: 4 trials on each GPU (fmnist.yaml: auto, trials_per_gpu 4, 2 CPUs a trial)
    p = plans.plan(fmnist_spec, gpus=8, cpus=64, node_gpus=8)
    assert (p["gpu"], p["max_concurrent"], p["retrain_gpu"]) == (0.25, 32, 1.0)
    # fewer CPUs: fewer trials, but still spread over all 8 GPUs rather than packed on 4
    p = plans.plan(fmnist_spec, gpus=8, cpus=32, node_gpus=8)
    assert (p["gpu"], p["max_concurrent"]) == (0.5, 16) and "on 8 of 8 GPUs" in p["summary"]
    spec = specs.parse(tiny_spec("p", search={"num_samples": 8, "max_concurrent": 4},
                                 resources={"gpus_per_trial": "auto"}))
    assert plans.plan(spec, gpus=4, cpus=8, node_gpus=4)["gpu"] == 1.0  # one trial per GPU
    assert plans.plan(spec, gpus=2, cpus=8, node_gpus=2)["gpu"] == 0.5  # two per GPU
    assert plans.plan(spec, gpus=3, cpus=8, node_gpus=3)["gpu"] == 0.5  # 2+2 (one GPU idle, said so)
    assert "1 GPUs idle" in plans.plan(spec, gpus=3, cpus=8, node_gpus=3)["summary"]
    hungry = specs.parse(tiny_spec("p", resources={"cpus_per_trial": 100}))  # Ray would leave it pending for ever
    with pytest.raises(plans.PlanError, match="cpus_per_trial is 100 but no Ray node has more than 2 CPUs"):
        plans.plan(hungry, gpus=0, cpus=4, node_gpus=0, node_cpus=2)
    fixed = specs.parse(tiny_spec("p", resources={"gpus_per_trial": 2}))
    with pytest.raises(plans.PlanError, match="no Ray node has more than 1 GPUs"):
        plans.plan(fixed, gpus=4, cpus=8, node_gpus=1)


def test_gpu_study_without_gpus_is_refused_unless_allowed():
    spec = specs.load(ROOT / "search_spaces" / "fmnist.yaml")
    with pytest.raises(plans.PlanError, match="quick.yaml.*--allow-cpu"):
        plans.plan(spec, gpus=0, cpus=16, node_gpus=0)
    with pytest.warns(UserWarning, match="runs on the CPU"):
        p = plans.plan(spec, gpus=0, cpus=16, node_gpus=0, allow_cpu=True)
    assert p["gpu"] == 0 and p["max_concurrent"] == 8  # 16 CPUs, 2 a trial
    with pytest.raises(plans.PlanError, match="max_concurrent auto"):
        plans.plan(spec, gpus=0, cpus=16, node_gpus=0, allow_pending_gpus=True)
    spec.search["max_concurrent"] = 8
    p = plans.plan(spec, gpus=0, cpus=16, node_gpus=0, allow_pending_gpus=True)
    assert p["gpu"] == 1.0 and p["max_concurrent"] == 8  # the requests stay: the autoscaler adds GPU nodes


def test_trial_device_is_the_gpu_ray_assigned_or_the_cpu():
    # A machine with CUDA: a trial Ray gave no GPU stays on the CPU.
    assert trial_device("auto", [], cuda_available=True) == "cpu"
    assert trial_device("auto", ["3"], cuda_available=True) == "cuda:0"  # CUDA_VISIBLE_DEVICES=3
    assert trial_device("auto", [0], cuda_available=False) == "cpu"  # a logical GPU
    with pytest.raises(ValueError, match="no GPU"):
        trial_device("cuda", [], cuda_available=True)
    # NVIDIA GPUs that torch cannot see (a driver too old for torch's CUDA): never the CPU behind the GPU's back
    with pytest.raises(RuntimeError, match=r"NVIDIA GPUs \(driver 470.1\) but torch .* sees no CUDA device"):
        trial_device("auto", [0], cuda_available=False, driver="470.1")
    assert trial_device("cpu", [0], cuda_available=False, driver="470.1") == "cpu"  # asked for, so meant


def fake_nvidia_driver(folder: Path) -> Path:
    """A folder like /proc/driver/nvidia, its version file as a 570 driver writes it."""
    folder.mkdir()
    (folder / "version").write_text("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release Build  "
                                    "(dvs-builder@U16-I3-B03-4-3)  Thu Jan 16 22:35:12 UTC 2025\nGCC version:  gcc 12\n")
    return folder


def test_nvidia_driver_is_read_from_its_proc_folder(tmp_path, monkeypatch):
    from csnn.gpus import nvidia_driver, torch_cannot_see_gpus

    monkeypatch.setenv("CSNN_NVIDIA_PROC", str(tmp_path / "none"))
    assert nvidia_driver() is None and torch_cannot_see_gpus() is None  # this CPU machine: no NVIDIA GPU
    monkeypatch.setenv("CSNN_NVIDIA_PROC", str(fake_nvidia_driver(tmp_path / "nvidia")))
    assert nvidia_driver() == "570.86.15"
    line = torch_cannot_see_gpus()  # torch here sees no CUDA
    assert "driver 570.86.15" in line and "a CUDA 13.0 build" in line and "gpus_per_trial: 0" in line


def test_a_gpu_study_where_torch_cannot_see_the_nvidia_gpus_is_refused(tmp_path, tiny_data_dir, monkeypatch, capsys):
    """Logical GPUs on this CPU machine train on the CPU (test_trials_spread_over_logical_gpus); the same
    study on a machine that says it has NVIDIA GPUs (the driver's folder, faked) is refused before any trial."""
    import ray

    from study.storage import GPUError, check_nodes_see

    spec = specs.parse(tiny_spec("nocuda", resources={"gpus_per_trial": "auto", "cpus_per_trial": 0.25},
                                 search={"num_samples": 1}), "nocuda.yaml")
    monkeypatch.setenv("CSNN_NVIDIA_PROC", str(fake_nvidia_driver(tmp_path / "nvidia")))
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False)  # its processes see the fake too
    try:
        assert run.run(spec, fmnist.load(tiny_data_dir), tmp_path / "nocuda") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: the driver's machine: this machine has NVIDIA GPUs (driver 570.86.15) but torch "
                       f"{torch.__version__} (a CUDA 13.0 build) sees no CUDA device, so its trials would train on the "
                       "CPU: install a torch wheel built for the CUDA your driver supports (nvidia-smi shows it; pip "
                       "install torch --index-url https://download.pytorch.org/whl/cu12X), or set "
                       "resources.gpus_per_trial: 0 to train on the CPU"], err
        assert not (tmp_path / "nocuda" / "spec.yaml").exists() and not (tmp_path / "nocuda" / "ray").exists()
        # the driver's machine fine, the node's not: the same visit that checks the storage says which node
        monkeypatch.delenv("CSNN_NVIDIA_PROC")
        loc = Location.parse(tmp_path / "nocuda")
        with pytest.raises(GPUError, match=r"1 of 1 Ray nodes cannot train on their GPUs: [\d.]+: this machine has "
                                           r"NVIDIA GPUs \(driver 570.86.15\)"):
            check_nodes_see(loc, gpus=True)
        assert len(check_nodes_see(loc)) == 1  # a study without GPUs asks nothing of them
    finally:
        ray.shutdown()


def test_checkpoints_at_rungs_every_n_and_the_end():
    assert checkpoint_epochs(16, 4, (2, 6)) == {2, 4, 6, 8, 12, 16}
    assert checkpoint_epochs(5, 4) == {4, 5}
    spec = specs.load(ROOT / "search_spaces" / "fmnist.yaml")
    assert plans.asha_rungs(spec) == (2, 6)  # grace 2, factor 3, 16 epochs


@pytest.mark.slow
@pytest.mark.parametrize("gpus", [4, 2])
def test_trials_spread_over_logical_gpus(gpus, tmp_path, tiny_data_dir):
    """4 trials at once: on 4 GPUs one each, on 2 GPUs two each; with 4 GPUs the
    two retrain seeds also run at once on GPUs of their own, in Ray's workers."""
    import ray

    retrain = {"epochs": 1, "seeds": [0, 1]} if gpus == 4 else {"seeds": []}
    spec = specs.parse(tiny_spec("gpus", train={"epochs": 2}, search={"num_samples": 4, "max_concurrent": 4},
                                 resources={"gpus_per_trial": "auto", "cpus_per_trial": 0.25},
                                 retrain=retrain, render={"images": 1}), "gpus.yaml")
    ray.init(address="local", num_cpus=2, num_gpus=gpus, include_dashboard=False)
    try:
        assert run.run(spec, fmnist.load(tiny_data_dir), tmp_path / "gpus") == 0
    finally:
        ray.shutdown()
    study = results.load(tmp_path / "gpus")
    t = study.trials
    assert len(t) == 4 and (t["run_device"] == "cpu").all()  # logical GPUs: ids, no CUDA device
    assert sorted(t["gpu_ids"].value_counts().tolist()) == ([1, 1, 1, 1] if gpus == 4 else [2, 2])
    s = spans(Location.parse(tmp_path / "gpus") / "ray")
    assert max(a for a, _ in s) < min(b for _, b in s)  # all four overlapped
    if gpus == 4:
        placement = study.retrain_summary["placement"]
        assert len({placement[s]["gpu_ids"] for s in (0, 1)}) == 2 and all(placement[s]["gpu_ids"] for s in (0, 1))
        s = spans(Location.parse(tmp_path / "gpus") / "retrain")
        assert len(s) == 2 and max(a for a, _ in s) < min(b for _, b in s)  # the seeds ran at once
        assert (tmp_path / "gpus" / "best" / "seed1" / "checkpoint_latest.pth").is_file()
        assert (tmp_path / "gpus" / "best" / "spikes" / "0" / "input.png").is_file()


WAIT_FOR_NODES = """
import sys, time, ray
ray.init(address=sys.argv[1])
deadline = time.time() + 120
while len([n for n in ray.nodes() if n["Alive"]]) < int(sys.argv[2]):
    assert time.time() < deadline, "the second node did not join"
    time.sleep(0.5)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        assert proc.poll() is None, f"the Ray head exited ({proc.returncode})"
        assert time.time() < deadline, f"the Ray head did not listen on {port}"
        time.sleep(0.2)


@pytest.mark.slow
def test_readme_cluster_recipe_from_empty_homes(tmp_path, tiny_data_dir):
    """The guide's cluster lines (docs/gpu-and-clusters.md) as written, on a head, a worker and a driver whose
    HOMEs start empty (no token from an earlier Ray): the head makes the token and
    starts with token authentication, the worker and the driver get a copy of it.
    The worker runs under `unshare --mount` with a tmpfs over one folder. A study
    on the shared folder runs its trials on both nodes (one CPU each, two at once);
    one on the hidden folder is refused, naming the node that cannot see it."""
    readme = (ROOT / "docs" / "gpu-and-clusters.md").read_text()
    for line in ("ray get-auth-token --generate", "export RAY_AUTH_MODE=token", "ray start --head --port=6379",
                 "mkdir -p ~/.ray && scp HEAD_IP:.ray/auth_token ~/.ray/auth_token",
                 "ray start --address=HEAD_IP:6379", "--address HEAD_IP:6379 --storage /shared/results"):
        assert line in readme, f"docs/gpu-and-clusters.md's cluster lines changed: {line!r}; change this test with them"
    shared, hidden = tmp_path / "shared", tmp_path / "hidden"
    homes = {k: tmp_path / "home" / k for k in ("head", "worker", "driver")}
    for d in (shared, hidden, *homes.values()):
        d.mkdir(parents=True)
    port = _free_port()
    ray_cli = str(Path(sys.executable).with_name("ray"))  # the `ray` command of this environment
    e = {k: {**env(), "HOME": str(h), "RAY_AUTH_MODE": "token"} for k, h in homes.items()}
    # on the head: ray get-auth-token --generate; export RAY_AUTH_MODE=token; ray start --head --port=6379
    subprocess.run([ray_cli, "get-auth-token", "--generate"], env=e["head"], check=True,
                   capture_output=True, timeout=60)
    token = homes["head"] / ".ray" / "auth_token"
    assert token.is_file()
    for k in ("worker", "driver"):  # "copy ~/.ray/auth_token to the other machines"
        (homes[k] / ".ray").mkdir()
        (homes[k] / ".ray" / "auth_token").write_bytes(token.read_bytes())
    block = ["--block", "--num-cpus", "1", "--num-gpus", "0"]  # --block: the node's processes end with this one
    procs = [subprocess.Popen([ray_cli, "start", "--head", f"--port={port}", "--include-dashboard=false", *block],
                              env=e["head"], start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.STDOUT)]
    try:
        _wait_for_port(port, procs[0])
        worker = " ".join([ray_cli, "start", f"--address=127.0.0.1:{port}", *block])
        procs.append(subprocess.Popen(["unshare", "--mount", "sh", "-c",
                                       f"mount -t tmpfs tmpfs {hidden} && exec {worker}"], env=e["worker"],
                                      start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        subprocess.run([sys.executable, "-c", WAIT_FOR_NODES, f"127.0.0.1:{port}", "2"], env=e["driver"],
                       check=True, capture_output=True, timeout=180)
        # two trials, one on each node at once; no spikes (nothing here reads them)
        spec = tiny_spec("two", search={"num_samples": 2, "max_concurrent": 2},
                         retrain={"epochs": 1, "seeds": [0]}, render={"images": 0})
        space = write_spec(tmp_path, spec)
        # the driver: the guide's `python -m study.run ... --address ... --storage ...`, a process of its own
        # (its HOME, its token), with this worker's reading of the CPU (conftest.calibrated)
        run_on = lambda storage: subprocess.run(calibrated(  # noqa: E731
            [sys.executable, "-m", "study.run", str(space), "--address", f"127.0.0.1:{port}", "--storage",
             str(storage), "--data-dir", str(tiny_data_dir)], spec), env=e["driver"], capture_output=True, text=True,
            timeout=300)
        p = run_on(hidden)
        assert p.returncode == 2, p.stdout[-3000:] + p.stderr[-3000:]
        assert re.search(r"--storage .*hidden/two: 1 of 2 Ray nodes cannot read.*NFS", p.stderr, re.S), p.stderr
        p = run_on(shared)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        assert "2 Ray node(s)" in p.stdout, p.stdout[-3000:]
        s = sorted(spans(Location.parse(shared / "two") / "ray"))
        assert len(s) == 2 and s[1][0] < s[0][1], s  # two at once: one on each node
        assert results.load(shared / "two").retrain_summary["seeds"] == [0]
    finally:
        for p in reversed(procs):  # ray start --block ends its node's processes (its session) with it
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=20)


@pytest.fixture
def s3(monkeypatch):
    """moto's S3 server on 127.0.0.1 and a storage URI in it."""
    from moto.server import ThreadedMotoServer

    for k, v in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                 ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(k, v)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    _, port = server.get_host_and_port()
    # allow_delayed_open: small files in one PUT (moto's multipart completion trips pyarrow)
    yield (f"s3://studies/results?endpoint_override=127.0.0.1:{port}&scheme=http"
           "&allow_bucket_creation=true&allow_delayed_open=true")
    server.stop()


def test_a_bucket_that_does_not_exist_is_refused_before_anything_runs(s3, tmp_path, tiny_data_dir, capsys,
                                                                      monkeypatch):
    missing = s3.replace("s3://studies/", "s3://no-such-bucket/").replace("&allow_bucket_creation=true", "")
    monkeypatch.chdir(tmp_path)
    p = in_process(capsys, run.main, write_spec(tmp_path, tiny_spec("nb")), "--storage", missing, "--data-dir",
                   tiny_data_dir, "--dry-run")
    assert p.returncode == 2 and "the bucket 'no-such-bucket' does not exist" in p.stderr, p.stderr[-3000:]


@pytest.mark.slow
def test_study_on_s3_end_to_end(s3, tmp_path, tiny_data_dir, local_ray, capsys, monkeypatch):
    """study.run's main in this process, on the module's Ray (local_ray, set up after s3: its workers
    inherit the credentials, as every node of a cluster needs them)."""
    import ray

    assert ray.get(ray.remote(lambda: os.environ.get("AWS_ACCESS_KEY_ID")).remote()) == "testing", \
        "the module's Ray started before the s3 fixture set the credentials: its trials could not write to S3"
    monkeypatch.chdir(tmp_path)
    p = in_process(capsys, run.main, write_spec(tmp_path, tiny_spec("s3", retrain={"epochs": 1, "seeds": [0]})),
                   "--storage", s3, "--data-dir", tiny_data_dir)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert not any(tmp_path.glob("s3:*"))  # nothing written to a local folder named after the URI
    study = Location.parse(s3) / "s3"
    s = results.load(study.shown)
    assert len(s.trials) == 3 and set(s.trials["status"]) <= {"finished", "stopped", "silent"}
    assert len(s.history) == s.trials["epochs_run"].sum() and s.best is not None
    assert s.retrain_summary["seeds"] == [0] and len(s.retrain) == 1
    for name in ("spec.yaml", "trials.csv", "history.csv", "best.yaml", "optuna.db", "best/seed0/config.yaml",
                 "best/spikes/0/input.png"):
        assert (study / name).is_file(), name
    assert analyze.main([study.shown]) == 0
    report = (study / "report" / "report.md").read_text()
    assert "## Best trial" in report and (study / "report" / "curves.png").is_file()


@pytest.mark.slow
def test_interrupted_retrain_resumes_keeping_finished_seeds(tmp_path, tiny_data_dir, local_ray, capsys):
    """Ctrl-C after the first retrain seed finished (the seeds take all the CPUs,
    so they run one after the other here): --resume keeps that seed and trains
    only the other, then assembles best/. The first interrupted run is a process (a real
    Ctrl-C); the second is stopped as Ctrl-C stops it in this process (Ray Tune's handler, see
    conftest.stopped_when), and the --resume runs are study.run's main here, on this
    process's Ray."""
    cpus = os.cpu_count()
    spec = tiny_spec("reretrain", train={"epochs": 1}, search={"num_samples": 1, "max_concurrent": 1},
                     resources={"cpus_per_trial": cpus}, retrain={"epochs": 3, "seeds": [0, 1]},
                     render={"images": 0})  # no spikes: nothing here reads them
    space = write_spec(tmp_path, spec)
    retrain_dir = tmp_path / "results" / "reretrain" / "retrain"
    proc = subprocess.Popen(study_cmd(space, tmp_path, tiny_data_dir), env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline, done = time.time() + 300, []
    while time.time() < deadline and not done:
        done = [f for f in retrain_dir.glob("*/result.json") if len(f.read_text().splitlines()) >= 3]
        time.sleep(0.1)
    assert done, "no retrain seed finished in time"
    before = done[0].read_text()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "the retrain was interrupted; continue it with --resume (python -m study.run" \
        in out, out[-3000:]
    assert not (tmp_path / "results" / "reretrain" / "best" / "summary.yaml").exists()

    p = run_study(capsys, space, tmp_path, tiny_data_dir, "--resume")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert done[0].read_text() == before  # the finished seed was not trained again
    summary = results.load(tmp_path / "results" / "reretrain").retrain_summary
    assert set(summary["test_acc"]) == {0, 1}
    runs = yaml.safe_load((tmp_path / "results" / "reretrain" / "timing.yaml").read_text())["runs"]
    assert [r.get("interrupted", False) for r in runs] == [True, False]  # the interrupted run's time is kept

    # Ctrl-C during --retrain: the earlier retrain/ and best/ survive, --resume finishes the new one
    d = tmp_path / "results" / "reretrain"
    old = {p.relative_to(d): p.read_bytes() for p in [*d.glob("retrain/*/result.json"), d / "best" / "summary.yaml"]}
    p = stopped_when(lambda: any(f.read_text().strip() for f in d.glob("retrain-next/*/result.json")),
                     run_study, capsys, space, tmp_path, tiny_data_dir, "--retrain")
    assert p.returncode == 130 and "the retrain was interrupted; continue it with --resume" in p.stderr, \
        p.stdout[-3000:] + p.stderr[-3000:]
    assert {p: (d / p).read_bytes() for p in old} == old  # nothing of the earlier retrain lost
    p = run_study(capsys, space, tmp_path, tiny_data_dir, "--resume")
    assert p.returncode == 0 and "retrained best" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
    assert not (d / "retrain-next").exists() and not (d / "retrain.pending").exists()
    assert (d / "best" / "summary.yaml").read_bytes() != old[Path("best/summary.yaml")]
    assert len(list(d.glob("retrain/*/result.json"))) == 2 and not any(
        (d / p).exists() and (d / p).read_bytes() == b for p, b in old.items() if p.parts[0] == "retrain")


def test_refused_on_a_real_gpu_less_ray(tmp_path, tiny_data_dir, local_ray, capsys):
    spec = tiny_spec("cpuonly", resources={"gpus_per_trial": "auto"})
    p = run_study(capsys, write_spec(tmp_path, spec), tmp_path, tiny_data_dir)
    assert p.returncode == 2 and "has no GPU" in p.stderr and "--allow-cpu" in p.stderr
    assert not (tmp_path / "results" / "cpuonly" / "spec.yaml").exists()
