"""python -m csnn.gpucheck: what only a GPU can show about the GPU path, in minutes, on one GPU.

Needs neither Ray nor Optuna. In order, each check recording its figures or
its error (a failed check does not stop the others):

  tests        the GPU-only tests (tests/test_gpu.py), when run from a checkout
  fused_amp    under AMP every IF layer runs SpikingJelly's fused kernel
  cupy         our CuPy kernels against SpikingJelly's reference loop, float32
               and float16: the same spikes, gradients within tolerance
  counts       cost counts of the same weights on the CPU and on CUDA
  speed        train and eval images/s at the tutorial's setting (T 4, 128
               channels, batch 128, AMP): backend auto, backend cupy, and
               SpikingJelly's example as the tutorial runs it (python -m csnn.bench)
  epoch        one full epoch at that setting on the real data: images/s, test accuracy
  concurrency  1, 2, 4 and 8 such trainers at once on the GPU (plain processes):
               total images/s, to set gpus_per_trial from a measurement
  deterministic  one trainer with -deterministic, against the single trainer above;
               and 30 batches trained twice from one seed, with and without it

Prints one JSON object with every figure (also written to --out) and exits 1
if any check failed, 2 when there is no CUDA device.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from csnn.config import TUTORIAL as CONFIG

ROOT = Path(__file__).resolve().parents[1]
TUTORIAL = {**{k: v for k, v in CONFIG.items() if k != "epochs"}, "amp": True}
FUSED = ("spikingjelly-triton", "spikingjelly-cuda")


def versions() -> dict:
    import spikingjelly
    from importlib.metadata import version

    out = {"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
           "spikingjelly": version("spikingjelly"), "python": sys.version.split()[0]}
    try:
        import cupy

        out["cupy"] = cupy.__version__
    except ImportError:
        out["cupy"] = None
    del spikingjelly
    return out


def check_tests() -> dict:
    tests = ROOT / "tests" / "test_gpu.py"
    if not tests.exists():
        return {"skipped": f"{tests} not found (run from a checkout)"}
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests)],
                       cwd=ROOT, capture_output=True, text=True)
    last = (p.stdout.strip().splitlines() or [""])[-1]
    assert p.returncode == 0, f"GPU tests failed: {last}\n{p.stdout[-3000:]}{p.stderr[-2000:]}"
    return {"result": last}


def check_fused_amp() -> dict:
    from spikingjelly.activation_based import functional

    from csnn.model import CSNN

    net = CSNN(4, 128).cuda()
    x = torch.rand(128, 1, 28, 28, device="cuda")
    out = {}
    with torch.autocast("cuda", dtype=torch.float16):
        net(x).float().sum().backward()
    out["train_amp"] = net.neuron_implementations()
    functional.reset_net(net)
    with torch.no_grad():
        net.eval()(x)
    out["eval_fp32"] = net.neuron_implementations()
    functional.reset_net(net)
    for mode, impls in out.items():
        assert set(impls.values()) <= set(FUSED), f"{mode}: not every IF layer runs a fused kernel: {impls}"
    return out


def check_cupy() -> dict:
    from spikingjelly._ops.if_.reference import multi_step
    from spikingjelly.activation_based import surrogate

    from csnn import cupy_if
    from csnn.model import ALPHA

    missing = cupy_if.available()
    assert missing is None, f"backend cupy cannot run: {missing}"
    out = {}
    gen = torch.Generator(device="cuda").manual_seed(0)
    for dtype, rtol, atol in ((torch.float32, 1e-5, 1e-6), (torch.float16, 1e-2, 1e-3)):
        x = (torch.randn(4, 1 << 16, generator=gen, device="cuda") * 0.8 + 0.4).to(dtype)
        g = torch.randn(4, 1 << 16, generator=gen, device="cuda").to(dtype)
        xr = x.clone().requires_grad_()
        sr, _, _ = multi_step(xr, torch.zeros(x.shape[1:], device="cuda"), 1.0, 0.0,
                              surrogate.ATan(alpha=ALPHA), False)
        sr.backward(g.to(sr.dtype))
        xc = x.clone().requires_grad_()
        sc, _ = cupy_if.CupyIF.apply(xc, ALPHA)
        sc.backward(g)
        spikes_equal = torch.equal(sc.float(), sr.float())
        grad_err = (xc.grad.float() - xr.grad.float()).abs()
        bound = atol + rtol * xr.grad.float().abs()
        out[str(dtype).removeprefix("torch.")] = {
            "spikes_equal": spikes_equal, "spike_rate": round(sr.float().mean().item(), 4),
            "grad_max_abs_err": grad_err.max().item(), "grad_within_tolerance": bool((grad_err <= bound).all()),
            "rtol": rtol, "atol": atol}
        assert spikes_equal and (grad_err <= bound).all(), f"cupy {dtype}: {out}"
    return out


def check_counts() -> dict:
    from csnn import data as fmnist
    from csnn import efficiency
    from csnn.model import CSNN

    torch.manual_seed(0)
    net = CSNN(4, 128)
    x = fmnist.to_input(torch.randint(0, 256, (128, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)))
    cpu = efficiency.count(net, x)
    t0 = time.perf_counter()
    cuda = efficiency.count(net.cuda(), x.cuda())
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    rel = {k: abs(cuda[k] - cpu[k]) / max(abs(cpu[k]), 1e-12) for k in cpu}
    out = {"cpu": cpu, "cuda": cuda, "relative_difference": rel, "cuda_count_s_per_epoch": round(seconds, 3)}
    assert cuda["macs_per_image"] == cpu["macs_per_image"] and max(rel.values()) <= 1e-3, out
    return out


def check_speed(data_dir) -> dict:
    from csnn import bench

    out = {}
    for backend in ("auto", "cupy"):
        out[backend] = bench.run(device="cuda", T=4, channels=128, batch_size=128, backend=backend, amp=True,
                                 train_images=12800, eval_images=10000, reps=3, data_dir=data_dir, workers=4)
    return out


def check_epoch(data_dir) -> dict:
    from csnn import data as fmnist
    from csnn.config import TrainConfig
    from csnn.train import fit

    data = fmnist.load(data_dir)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # stdout is for the JSON object
        m = fit(TrainConfig(**TUTORIAL, epochs=1, device="cuda"), data)[-1]
    keys = ("train_img_s", "epoch_s", "test_acc", "train_acc", "energy_uj", "neuron_impl")
    return {**{k: m[k] for k in keys if k in m}, "wall_s": round(time.perf_counter() - t0, 1)}


def worker(seconds: float, start_at: float, data_dir, deterministic: bool) -> None:
    """One trainer at the tutorial's setting: trains until `start_at` (warm-up), then
    reports the images/s of the chunks it trained within the next `seconds`."""
    from csnn import data as fmnist
    from csnn.model import CSNN
    from csnn.config import TrainConfig
    from csnn.train import make_optimizer, set_deterministic, train_epoch

    set_deterministic(deterministic)
    cfg = TrainConfig(**TUTORIAL, device="cuda")
    s = fmnist.split(fmnist.load(data_dir), train_size=2560)["train"]
    x, y = (t.cuda() for t in s)
    torch.manual_seed(0)
    net = CSNN(cfg.T, cfg.channels).cuda()
    opt = make_optimizer(cfg, net.parameters())
    scaler = torch.amp.GradScaler("cuda")
    gen = torch.Generator().manual_seed(0)
    images, first, last = 0, None, None
    while time.time() < start_at + seconds:
        t0 = time.time()
        n = train_epoch(net, opt, scaler, x, y, cfg.batch_size, gen, torch.float16)[2]
        t1 = time.time()
        if t0 >= start_at and t1 <= start_at + seconds:
            images, first, last = images + n, first or t0, t1
    print(json.dumps({"img_s": images / (last - first) if images else 0.0, "images": images}), flush=True)


def run_workers(n: int, seconds: float, data_dir, deterministic: bool = False) -> dict:
    start_at = time.time() + 20 + 2 * n  # imports, data and warm-up of every process first
    cmd = [sys.executable, "-m", "csnn.gpucheck", "--worker", str(seconds), "--start-at", str(start_at)]
    cmd += ["--data-dir", str(data_dir)] if data_dir else []
    cmd += ["--deterministic"] if deterministic else []
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                  filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}) for _ in range(n)]
    outs = [p.communicate() for p in procs]
    failed = [err[-1500:] for p, (_, err) in zip(procs, outs) if p.returncode != 0]
    assert not failed, f"{len(failed)} of {n} trainers failed: {failed[0]}"
    rates = [json.loads(out.strip().splitlines()[-1])["img_s"] for out, _ in outs]
    assert all(r > 0 for r in rates), f"a trainer trained nothing in its {seconds} s window: {rates}"
    return {"total_img_s": round(sum(rates), 1), "per_trainer_img_s": [round(r, 1) for r in rates]}


def check_concurrency(data_dir, seconds: float) -> dict:
    out = {str(n): run_workers(n, seconds, data_dir) for n in (1, 2, 4, 8)}
    best = max(v["total_img_s"] for v in out.values())
    # the fewest trials per GPU that reach 90% of the best total: more only slow each trial down
    out["suggested_trials_per_gpu"] = min(int(n) for n, v in out.items() if v["total_img_s"] >= 0.9 * best)
    return out


def repeat(deterministic: bool, data_dir) -> None:
    """Train 30 batches twice from the same seed; print whether the weights came out equal."""
    from csnn import data as fmnist
    from csnn.model import CSNN
    from csnn.config import TrainConfig
    from csnn.train import make_optimizer, set_deterministic, train_epoch

    set_deterministic(deterministic)
    cfg = TrainConfig(**TUTORIAL, device="cuda")
    x, y = (t.cuda() for t in fmnist.split(fmnist.load(data_dir), train_size=30 * cfg.batch_size)["train"])
    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        net = CSNN(cfg.T, cfg.channels).cuda()
        opt = make_optimizer(cfg, net.parameters())
        train_epoch(net, opt, torch.amp.GradScaler("cuda"), x, y, cfg.batch_size, torch.Generator().manual_seed(0),
                    torch.float16)
        weights.append(torch.cat([p.detach().flatten() for p in net.parameters()]))
    print(json.dumps({"equal": torch.equal(*weights), "max_abs_diff": (weights[0] - weights[1]).abs().max().item()}))


def run_repeat(deterministic: bool, data_dir) -> dict:
    cmd = [sys.executable, "-m", "csnn.gpucheck", "--repeat"] + (["--deterministic"] if deterministic else [])
    cmd += ["--data-dir", str(data_dir)] if data_dir else []
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-1500:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def check_deterministic(data_dir, seconds: float, plain: float | None) -> dict:
    det = run_workers(1, seconds, data_dir, deterministic=True)["total_img_s"]
    out = {"deterministic_img_s": det, "plain_img_s": plain, "slowdown": round(plain / det, 3) if plain and det else None,
           "repeat_deterministic": run_repeat(True, data_dir), "repeat_plain": run_repeat(False, data_dir)}
    assert out["repeat_deterministic"]["equal"], f"-deterministic training did not repeat exactly: {out}"
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m csnn.gpucheck", description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (else $CSNN_DATA, Debian's package)")
    ap.add_argument("--out", default=None, help="also write the JSON object to this file (after every check)")
    ap.add_argument("--seconds", type=float, default=12.0, help="timed window of each concurrency run")
    ap.add_argument("--skip", default="", help="comma-separated checks to skip")
    ap.add_argument("--worker", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--start-at", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--deterministic", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--repeat", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: no CUDA device: python -m csnn.gpucheck needs a CUDA GPU, and torch.cuda.is_available() "
              f"is False here (torch {torch.__version__}, CUDA build {torch.version.cuda})", file=sys.stderr)
        return 2
    if args.worker is not None:
        worker(args.worker, args.start_at, args.data_dir, args.deterministic)
        return 0
    if args.repeat:
        repeat(args.deterministic, args.data_dir)
        return 0

    result: dict = {"versions": versions(), "failed": []}
    skip = set(filter(None, args.skip.split(",")))

    def check(name, fn, *a):
        if name in skip:
            return
        t0 = time.perf_counter()
        print(f"gpucheck: {name} ...", file=sys.stderr, flush=True)
        try:
            result[name] = fn(*a)
        except Exception as e:  # noqa: BLE001 - every check reports, the run goes on
            result[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2500:]}
            result["failed"].append(name)
        result[name]["check_s"] = round(time.perf_counter() - t0, 1)
        print(f"gpucheck: {name} {'FAILED' if name in result['failed'] else 'ok'} "
              f"({result[name]['check_s']} s)", file=sys.stderr, flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1, default=str))

    check("tests", check_tests)
    check("fused_amp", check_fused_amp)
    check("cupy", check_cupy)
    check("counts", check_counts)
    check("speed", check_speed, args.data_dir)
    check("epoch", check_epoch, args.data_dir)
    check("concurrency", check_concurrency, args.data_dir, args.seconds)
    plain = result.get("concurrency", {}).get("1", {}).get("total_img_s")
    check("deterministic", check_deterministic, args.data_dir, args.seconds, plain)
    print(json.dumps(result, indent=1, default=str))
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
