"""What a study needs from the machines: trials at once and each trial's CPUs and GPUs (plan, from
the cluster's totals), the epochs where ASHA decides (asha_rungs), and the checks of the data and
the devices that the search-space file alone cannot tell (check_machine).

study.run plans its Ray trials with it; study.estimate prices the same plan before anything runs.
It imports nothing of study/ but the spec, and nothing heavy (torch only inside check_machine).
"""
from __future__ import annotations

import math
import os
import sys
import warnings
from typing import TYPE_CHECKING

from study import spec as specs

if TYPE_CHECKING:
    from csnn import data as fmnist


class PlanError(ValueError):
    pass


def plan(spec: specs.StudySpec, gpus: float, cpus: float, node_gpus: float, allow_cpu: bool = False,
         allow_pending_gpus: bool = False, node_cpus: float | None = None) -> dict:
    """Per-trial resources and trials at once, from the spec and the cluster's
    totals (GPUs, CPUs, most GPUs on one node).

    gpus_per_trial auto: Ray packs fractional GPU requests onto as few GPUs as it
    can (ray-project/ray #28679), so each trial gets 1/k of a GPU with k the
    fewest trials per GPU that still fit the concurrent trials on the cluster's
    GPUs (at most trials_per_gpu). max_concurrent auto: every GPU full
    (GPUs x trials_per_gpu), a whole multiple of the GPUs, within the CPUs."""
    want, conc = spec.resources["gpus_per_trial"], spec.search["max_concurrent"]
    cpt, per_gpu_max, n = spec.resources["cpus_per_trial"], spec.resources["trials_per_gpu"], spec.search["num_samples"]
    where = spec.path or spec.name
    node_cpus = cpus if node_cpus is None else node_cpus
    if cpt > node_cpus and not allow_pending_gpus:  # Ray would keep the trials pending for ever
        raise PlanError(f"{where}: resources.cpus_per_trial is {cpt:g} but no Ray node has more than {node_cpus:g} "
                        "CPUs: no trial could start; ask for at most that")
    cpu_slots = max(1, int(cpus // cpt))
    if want == "auto" or want > 0:
        if gpus == 0 and allow_pending_gpus:
            # An autoscaler adds GPU nodes as trials ask: a whole GPU per trial spreads them.
            if conc == "auto":
                raise PlanError(f"{where}: search.max_concurrent auto needs the cluster's GPUs, and it has none yet "
                                "(--allow-pending-gpus); give search.max_concurrent a number")
            g = 1.0 if want == "auto" else want
            return {"gpu": g, "cpu": cpt, "max_concurrent": conc, "retrain_gpu": max(g, 1.0) if want == "auto" else g,
                    "summary": f"up to {conc or n} trials at once, {g:g} GPU and {cpt:g} CPUs each, "
                               "on GPUs the autoscaler has still to add"}
        if gpus == 0 and not allow_cpu:
            raise PlanError(f"{where}: resources.gpus_per_trial is {want} but the Ray cluster has no GPU. This study "
                            "is sized for GPUs and would run for days on CPUs: use search_spaces/quick.yaml (sized "
                            "for a CPU), pass --allow-cpu to run it on the CPUs anyway, or --allow-pending-gpus on "
                            "an autoscaling cluster whose GPU nodes are yet to start")
        if gpus == 0:
            warnings.warn(f"{where}: resources.gpus_per_trial is {want} but the Ray cluster has no GPU: "
                          "every trial runs on the CPU (--allow-cpu)", stacklevel=2)
    if not (want == "auto" or want > 0) or gpus == 0:
        conc = min(cpu_slots, n) if conc == "auto" else conc
        running = min(conc or n, n, cpu_slots)
        return {"gpu": 0, "cpu": cpt, "max_concurrent": conc, "retrain_gpu": 0,
                "summary": f"{running} trials at once on CPUs ({cpt:g} each), no GPU"}
    whole = max(1, int(gpus))
    if want == "auto":
        if conc == "auto":
            conc = min(whole * per_gpu_max, n, cpu_slots)
            conc = conc // whole * whole or conc  # a multiple of the GPUs: Ray's packing then fills them all
        running = min(conc or n, n, cpu_slots, whole * per_gpu_max)
        per_gpu = min(per_gpu_max, math.ceil(running / whole))
        g = math.floor(1e4 / per_gpu) / 1e4  # Ray counts GPUs to 1e-4: k shares must fit in one
        retrain_gpu = 1.0
    else:
        if want > node_gpus:
            raise PlanError(f"{where}: resources.gpus_per_trial is {want} but no Ray node has more than {node_gpus:g} "
                            "GPUs: no trial could start; use at most that, or auto")
        g = want
        if conc == "auto":
            conc = min(int(gpus // want), n, cpu_slots)
        running = min(conc or n, n, cpu_slots, int(gpus // want))
        retrain_gpu = want
    used = min(whole, math.ceil(running * g - 1e-9))
    return {"gpu": g, "cpu": cpt, "max_concurrent": conc, "retrain_gpu": retrain_gpu,
            "summary": f"{running} trials at once on {used} of {whole} GPUs ({g:g} GPU and {cpt:g} CPUs each)"
                       + ("" if used == whole or running == n else
                          f"; {whole - used} GPUs idle: Ray packs GPU shares, make max_concurrent a multiple of {whole}")}


def cluster() -> dict:
    """The totals plan() needs, from the Ray cluster this driver joined."""
    import ray

    nodes = [n for n in ray.nodes() if n["Alive"]]
    total = ray.cluster_resources()
    return {"gpus": total.get("GPU", 0), "cpus": total.get("CPU", 0),
            "node_gpus": max((n["Resources"].get("GPU", 0) for n in nodes), default=0),
            "node_cpus": max((n["Resources"].get("CPU", 0) for n in nodes), default=0)}


def asha_rungs(spec: specs.StudySpec) -> tuple:
    """The epochs where ASHA decides (Ray's _Bracket milestones, one bracket)."""
    if spec.scheduler["type"] != "asha":
        return ()
    epochs = spec.max_epochs
    g, rf = min(spec.scheduler["grace_period"], epochs), spec.scheduler["reduction_factor"]
    count = int(math.log(epochs / g) / math.log(rf) + 1)
    return tuple(sorted({math.ceil(g * rf ** k) for k in range(count)}))


def check_machine(spec: specs.StudySpec, data: fmnist.FashionMNIST) -> None:
    """What the file alone cannot tell: that the sizes fit the data and the devices exist here."""
    import torch

    from csnn.train import resolve_device

    where = lambda k: f"{spec.path}: {'space' if k in spec.space else 'train'}.{k}"  # noqa: E731
    n_train, n_test = len(data.train_y), len(data.test_y)
    val = max(specs.values(spec, "val_size"))
    if val >= n_train:
        raise specs.SpecError(f"{where('val_size')}: {val} must be smaller than the {n_train} training images in {data.source}")
    train = max(specs.values(spec, "train_size"))
    if train > n_train - val:
        raise specs.SpecError(f"{where('train_size')}: {train} is more than the {n_train - val} training images "
                              f"left after val_size {val} in {data.source}")
    test = max(specs.values(spec, "test_size"))
    if test > n_test:
        raise specs.SpecError(f"{where('test_size')}: {test} is more than the {n_test} test images in {data.source}")
    if spec.render["images"] > n_test:
        raise specs.SpecError(f"{spec.path}: render.images: {spec.render['images']} is more than the {n_test} "
                              f"test images in {data.source}")
    for device in specs.values(spec, "device"):
        try:
            dev = resolve_device(device)
        except RuntimeError as e:
            raise specs.SpecError(f"{where('device')}: {e}") from None
        need, what = memory_needed(spec, dev.type == "cuda")
        have = (torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda"
                else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        if need > have:  # a warning: the estimate is rough, and the user may know better
            print(f"warning: {spec.path}: the largest T, channels and batch_size need about {need / 2**30:.0f} GiB "
                  f"for {what}, more than the {have / 2**30:.0f} GiB of {dev}; lower batch_size or channels"
                  + (" or resources.trials_per_gpu" if "sharing" in what else ""), file=sys.stderr)


def trials_sharing_a_gpu(spec: specs.StudySpec) -> int:
    """At most how many trials share one GPU: trials_per_gpu with gpus_per_trial auto, else 1 / gpus_per_trial."""
    want = spec.resources["gpus_per_trial"]
    if want == "auto":
        return spec.resources["trials_per_gpu"]
    return max(1, math.floor(1 / want + 1e-9)) if 0 < want < 1 else 1


def memory_needed(spec: specs.StudySpec, cuda: bool) -> tuple[int, str]:
    """(bytes, what they are for) that the largest configuration's training needs on one device: one batch's
    activations per trial; on CUDA for every trial that shares a GPU, each twice where CUDA graphs may be on
    (the graph's own memory pool holds a step's memory beside the eager allocator's, and the capture's check
    runs an eager step while the pool holds one)."""
    one = activation_bytes(max(specs.values(spec, "T")), max(specs.values(spec, "channels")),
                           max(specs.values(spec, "batch_size")))
    if not cuda:
        return one, "one batch's activations"
    trials = trials_sharing_a_gpu(spec)
    graphs = any(v is not False for v in specs.values(spec, "cuda_graphs"))
    need = one * trials * (2 if graphs else 1)
    return need, (f"one batch's activations of each of the {trials} trials sharing a GPU"
                  + (" and their CUDA graphs' memory pools" if graphs else ""))


def activation_bytes(T: int, channels: int, batch_size: int) -> int:
    """A rough size of what one training batch keeps for the backward pass: per image and
    time step, about ten float32 maps of C x 28 x 28 (convolutions, batch norms, membrane
    potentials and spikes, at full and pooled size)."""
    return batch_size * T * channels * 28 * 28 * 4 * 10
