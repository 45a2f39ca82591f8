"""The private APIs of our dependencies that the project calls: the one list of them, each
checked for what we rely on, so that a release that changes one fails here with a line
that names it, not somewhere inside a study. A new use of a private API goes in PRIVATE."""
import inspect
import os
from importlib.metadata import version

import numpy as np
import pytest
import torch


def _optuna_search_records():
    from ray.tune.search.optuna import OptunaSearch

    s = OptunaSearch(space=lambda t: t.suggest_float("x", 0, 1), metric="a", mode="max")
    return isinstance(s._ot_trials, dict) and isinstance(s._completed_trials, set)


def _hypervolume():
    from optuna._hypervolume import compute_hypervolume

    # the unit square's corner point against reference (2, 2): 3 of the 4 units
    return compute_hypervolume(np.array([[1.0, 1.0]]), np.array([2.0, 2.0])) == 1.0 and \
        compute_hypervolume(np.array([[0.0, 1.0], [1.0, 0.0]]), np.array([2.0, 2.0])) == 3.0


def _ray_output_switch():
    from ray.tune.experimental.output import get_air_verbosity

    before = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        return get_air_verbosity(1) is None
    finally:
        os.environ.pop("RAY_AIR_NEW_OUTPUT") if before is None else os.environ.__setitem__("RAY_AIR_NEW_OUTPUT", before)


def _surrogate_spec():
    from spikingjelly.activation_based import surrogate
    from spikingjelly.activation_based.functional.neuron import _surrogate_spec

    sid, alpha = _surrogate_spec(surrogate.ATan())
    return isinstance(sid, int) and alpha == 2.0


def _reference_if():
    from spikingjelly._ops.if_.reference import _forward_impl, multi_step

    names = list(inspect.signature(_forward_impl).parameters)
    x = torch.ones(2, 3)  # T=2: 1 then 2 reaches the threshold 1.0 at the first step
    spikes, v, _ = _forward_impl(x, torch.zeros(3), 1.0, 0.0, False, 2.0, False, 0)
    return len(names) == 8 and spikes.tolist() == [[1.0] * 3, [1.0] * 3] and callable(multi_step)


def _allocator_pool_calls():
    # torch.cuda.use_mem_pool leaves a pool with exactly these two calls (torch/cuda/memory.py; public copies of it show them from
    # torch 2.8 on, so the GPU machine's 2.11 should have them): a capture that raised is left the same way
    from torch.cuda.memory import use_mem_pool

    source = inspect.getsource(use_mem_pool)
    return callable(torch._C._cuda_endAllocateToPool) and callable(torch._C._cuda_releasePool) and \
        "_cuda_endAllocateToPool(device_index, pool.id)" in source and "_cuda_releasePool(device_index, pool.id)" in source


def _scaler_step_record():
    from collections import defaultdict

    from torch.amp import grad_scaler

    s = torch.amp.GradScaler("cpu")
    states = s._per_optimizer_states
    states[1]["stage"] = grad_scaler.OptState.STEPPED  # what step() records, and update() forgets
    return isinstance(states, defaultdict) and "step() has already been called since the last update()" in \
        inspect.getsource(torch.amp.GradScaler.step) and "self._per_optimizer_states = defaultdict(" in \
        inspect.getsource(torch.amp.GradScaler.update)


# (the private API, where we use it, what we rely on)
def _actor_cache():
    """Tune's controller makes its actor cache from the module's _ObjectCache and empties it as a run ends, and
    ours keeps two idle objects where Ray's keeps one (may_keep_one) when none is wanted, and flushes neither."""
    import inspect
    import re

    from ray.tune.execution import tune_controller

    from study.tuning import idle_workers_kept

    with idle_workers_kept(2):
        cache = tune_controller._ObjectCache(may_keep_one=True)
        kept = [cache.cache_object("1 CPU", worker) for worker in ("a", "b", "c")]
        flushed = list(cache.flush_cached_objects())
    controller = inspect.getsource(tune_controller.TuneController)
    return (re.search(r"(?<![\w.])_ObjectCache\(", inspect.getsource(tune_controller.TuneController.__init__))
            and "_cleanup_cached_actors(force_all=True)" in controller  # the kept workers stop as the run ends
            and kept == [True, True, False] and not flushed and cache.pop_cached_object("1 CPU") == "a")


def _compile_threads():
    """With compile_threads 1 inductor compiles in this process: it starts no pool of processes (which
    use_process_pool would start, recording its first job in _ready_future)."""
    import torch._inductor.config as inductor
    from torch._inductor.async_compile import AsyncCompile

    saved = inductor.compile_threads, AsyncCompile._ready_future
    try:
        inductor.compile_threads, AsyncCompile._ready_future = 1, None
        return AsyncCompile.use_process_pool() is False and AsyncCompile._ready_future is None
    finally:
        inductor.compile_threads, AsyncCompile._ready_future = saved


PRIVATE = [
    ("ray.tune.search.optuna.OptunaSearch._ot_trials, ._completed_trials", "study/stopping.py (silent trials told "
     "to Optuna as infeasible: Ray's searcher has no hook for constraints)", _optuna_search_records),
    ("optuna._hypervolume.compute_hypervolume", "study/results.py hypervolumes (study.analyze --against)",
     _hypervolume),
    ("RAY_AIR_NEW_OUTPUT=0 (Ray's legacy output engine)", "study/progress.py ray_output (our progress lines)",
     _ray_output_switch),
    ("spikingjelly.activation_based.functional.neuron._surrogate_spec", "csnn/model.py (which surrogate "
     "SpikingJelly's fused kernels take)", _surrogate_spec),
    ("spikingjelly._ops.if_.reference._forward_impl, multi_step", "csnn/model.py kernel 'reference', "
     "csnn/gpucheck.py, tests/test_gpu.py (SpikingJelly's own loop as the reference)", _reference_if),
    ("torch._dynamo.mark_dynamic", "csnn/model.py (one compiled graph for every batch size)",
     lambda: callable(torch._dynamo.mark_dynamic)),
    ("torch.cuda._sleep", "csnn/model.py observe_if_kernels (profiler padding)", lambda: callable(torch.cuda._sleep)),
    ("torch._C._cuda_endAllocateToPool, _cuda_releasePool", "csnn/train capture_cuda_graph (a failed capture's "
     "pool ended and released, as torch.cuda.use_mem_pool does)", _allocator_pool_calls),
    ("ray.tune.execution.tune_controller._ObjectCache", "study/tuning.py idle_workers_kept (a search keeps "
     "its idle trial workers, not one)", _actor_cache),
    ("torch._inductor.config.compile_threads", "csnn/train fit (a Ray trial compiles in its own process, not a "
     "pool of one process per core)", _compile_threads),
    ("torch.amp.GradScaler._per_optimizer_states", "csnn/train _scaler_between_steps (a step() whose update() "
     "never came, in a failed capture, forgotten)", _scaler_step_record),
]


@pytest.mark.smoke
@pytest.mark.parametrize("name,where,check", PRIVATE, ids=[p[0].split()[0] for p in PRIVATE])
def test_the_private_apis_we_call_still_do_what_we_rely_on(name, where, check):
    owner = name.split(".")[0].split("=")[0]
    pkg = {"RAY_AIR_NEW_OUTPUT": "ray"}.get(owner, owner)
    try:
        ok = check()
    except (ImportError, AttributeError, TypeError, ValueError) as e:
        pytest.fail(f"{name}, used by {where}, is gone or changed in {pkg} {version(pkg)}: {e!r}")
    assert ok, f"{name}, used by {where}, no longer does what we rely on in {pkg} {version(pkg)}"


def test_the_list_names_every_private_import_in_the_code():
    """A private module path (`from x._y import`, `x._y.z(`) of a dependency in csnn/ or study/ that PRIVATE
    does not name fails (private attributes of an object, like OptunaSearch's, are listed by hand)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    listed = " ".join(p[0] for p in PRIVATE)
    found = set()
    for f in [*root.glob("csnn/**/*.py"), *root.glob("study/*.py")]:
        for m in re.finditer(r"\b((?:torch|ray|optuna|spikingjelly)(?:\.\w+)*\._(?!_)\w+)", f.read_text()):
            found.add((m.group(1), f.name))
    missing = sorted({(n, f) for n, f in found if not any(part in listed for part in [n, n.rsplit(".", 1)[-1]])})
    assert not missing, f"private APIs used but not in tests/test_dependencies.py PRIVATE: {missing}"
