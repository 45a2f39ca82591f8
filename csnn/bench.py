"""python -m csnn.bench: our trainer against SpikingJelly's own example, side by side.

The reference is `spikingjelly.activation_based.examples.conv_fashion_mnist` as
it ships and as the tutorial runs it: its CSNN, a torchvision DataLoader with
ToTensor (on the CPU with no workers; on CUDA with `-j 4` workers and pinned
memory), its training step with the per-batch .item() calls (on CUDA under AMP,
its torch.cuda.amp path) and its float32 evaluation loop. Ours runs with AMP on
CUDA too. Both run the same network size, T, batch size, SGD (lr 0.1, momentum
0.9) and real Fashion-MNIST images, on the same device, alternately, after a
warm-up; the medians of the repetitions give the ratios, and each side says
which IF implementation it ran. Ratios are printed only after the equivalence
check: with the same weights and batch, in float32, both compute the same
firing rates (see check_equivalence).
"""
from __future__ import annotations

if __name__ == "__main__":
    from csnn.argtypes import quiet_start

    quiet_start("csnn.bench")
import argparse  # noqa: E402
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from spikingjelly.activation_based import functional

from csnn import data as fmnist
from csnn.argtypes import add_network_flags, interruptible, leave, network_values, network_words, positive_int, spelled, worded
from csnn.model import CSNN
from csnn.config import NETWORK_FIELDS, NEURONS, SPIKING_LAYERS, TUTORIAL, TrainConfig, augment_names, neuron_text
from csnn.data import to_input
from csnn.train import LOSSES, evaluate, graphs_info, make_optimizer, make_trainer, resolve_device


def reference_loaders(train, test, batch_size: int, root: Path, workers: int):
    """torchvision's FashionMNIST over the same images (written as IDX files), as the example loads it."""
    import torchvision

    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, (x, y) in (("train", train), ("t10k", test)):
        fmnist.write_idx(raw / f"{prefix}-images-idx3-ubyte", x.numpy())
        fmnist.write_idx(raw / f"{prefix}-labels-idx1-ubyte", y.numpy())
    tf = torchvision.transforms.ToTensor()
    train_set = torchvision.datasets.FashionMNIST(root=str(root), train=True, transform=tf, download=False)
    test_set = torchvision.datasets.FashionMNIST(root=str(root), train=False, transform=tf, download=False)
    # persistent workers: the example starts its workers once per 60,000-image epoch; a timed
    # pass here is a fraction of one, and starting them again for each would time the start.
    # Workers and pinned memory as the example on CUDA; on the CPU neither (no accelerator to pin for)
    loader = functools.partial(torch.utils.data.DataLoader, batch_size=batch_size, shuffle=True, num_workers=workers,
                               pin_memory=workers > 0, persistent_workers=workers > 0)
    return loader(train_set, drop_last=True), loader(test_set, drop_last=False)


def _mse(out_fr, label, label_onehot):
    return F.mse_loss(out_fr, label_onehot)


def reference_train(net, optimizer, scaler, loader, device, criterion=_mse) -> int:
    """The example's training loop, verbatim (AMP when `scaler` is enabled, as its -amp), but for its loss
    F.mse_loss(out_fr, label_onehot) called as `criterion` (for --loss ce, csnn.train's cross-entropy)."""
    net.train()
    train_loss = train_acc = train_samples = 0
    for img, label in loader:
        optimizer.zero_grad()
        img = img.to(device)
        label = label.to(device)
        label_onehot = F.one_hot(label, 10).float()
        if scaler.is_enabled():
            with torch.autocast("cuda"):
                out_fr = net(img)
                loss = criterion(out_fr, label, label_onehot)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            out_fr = net(img)
            loss = criterion(out_fr, label, label_onehot)
            loss.backward()
            optimizer.step()
        train_samples += label.numel()
        train_loss += loss.item() * label.numel()
        train_acc += (out_fr.argmax(1) == label).float().sum().item()
        functional.reset_net(net)
    return train_samples


def reference_eval(net, loader, device) -> int:
    net.eval()
    test_loss = test_acc = test_samples = 0
    with torch.no_grad():
        for img, label in loader:
            img = img.to(device)
            label = label.to(device)
            label_onehot = F.one_hot(label, 10).float()
            out_fr = net(img)
            loss = F.mse_loss(out_fr, label_onehot)
            test_samples += label.numel()
            test_loss += loss.item() * label.numel()
            test_acc += (out_fr.argmax(1) == label).float().sum().item()
            functional.reset_net(net)
    return test_samples


def watch_reference(net) -> dict:
    """Record, per IF layer of the reference, which SpikingJelly implementation its
    forward ran: SpikingJelly's IFNode keeps its state in the input's dtype (float16
    under AMP), and its fused kernel takes only a float32 state."""
    from spikingjelly.activation_based import neuron

    from csnn.model import spikingjelly_implementation

    seen: dict = {}

    def hook(m, args, out):
        fp32_state = isinstance(m.v, torch.Tensor) and m.v.dtype == torch.float32
        seen[id(m)] = spikingjelly_implementation(args[0], m.surrogate_function) if fp32_state \
            else "spikingjelly-reference"

    for m in net.modules():
        if isinstance(m, neuron.BaseNode):
            m.register_forward_hook(hook)
    return seen


def reference_network(T: int, channels: int, **network):
    """SpikingJelly's example's CSNN as it ships, with the network keys (TrainConfig.network()) put in
    as SpikingJelly's own classes (config.NEURONS, SURROGATES, POOLINGS: its LIFNode, ParametricLIFNode,
    AvgPool2d, on its own kernels); at the tutorial's keys, the example untouched."""
    from spikingjelly.activation_based import functional as sj_functional
    from spikingjelly.activation_based import layer, neuron, surrogate
    from spikingjelly.activation_based.examples.conv_fashion_mnist import CSNN as RefCSNN

    from csnn.config import NEURONS, POOLINGS, SURROGATES, surrogate_alpha

    cfg = TrainConfig(**network)
    net = RefCSNN(T=T, channels=channels)
    if cfg.network() == TrainConfig().network():
        return net
    if cfg.dropout:  # before each linear layer, as ours (csnn.model.Linear): SpikingJelly's multi-step Dropout
        for i in (9, 11):
            net.conv_fc[i] = torch.nn.Sequential(layer.Dropout(cfg.dropout), net.conv_fc[i])
    row = NEURONS[cfg.neuron]
    for i in SPIKING_LAYERS:
        function = getattr(surrogate, SURROGATES[cfg.surrogate]["spikingjelly"])(alpha=surrogate_alpha(cfg))
        tau = {row["tau_arg"]: float(cfg.tau)} if row["tau_arg"] else {}
        net.conv_fc[i] = getattr(neuron, row["spikingjelly"])(v_threshold=float(cfg.v_threshold),
                                                               detach_reset=cfg.detach_reset,
                                                               surrogate_function=function, **tau)
    for i in (3, 7):
        net.conv_fc[i] = getattr(layer, POOLINGS[cfg.pooling]["spikingjelly"])(2, 2)
    sj_functional.set_step_mode(net, "m")
    return net


MIN_RATE = 0.001  # each spiking layer must fire at least this often on the check's inputs


def check_equivalence(ref_cls, cfg: TrainConfig, x: torch.Tensor, device, compiled: bool, amp: bool = False) -> dict:
    """Our model (with cfg.backend's kernels) against the reference with the same weights
    on the same batch: the spikes of every spiking layer, in training mode (batch
    statistics) and in eval mode, and the gradients of training; in float32 (no TF32),
    or with `amp` both under float16 autocast, as they are timed on CUDA. The images
    and the linear layers' weights are scaled x3 and every layer must fire (MIN_RATE) in
    both modes: a silent layer agrees with any model (a higher threshold, or a leaky neuron's tau, lifts
    the inputs so much more). On the CPU, where both sum in the same order, no spike may differ (for LIF
    and PLIF 1 in 100,000: see `cpu_spikes`) and
    gradients agree to float rounding; on CUDA, where cuDNN picks its algorithms by
    shape, rounding may flip a spike near the threshold: at most 1 in 1,000 may differ,
    gradients within 1e-4 (1e-6 was observed on an H200). Under AMP the reference keeps
    a float16 membrane potential (SpikingJelly's IFNode does) and ours a float32 one:
    1% of spikes, gradients within 10% (not yet measured on a GPU). A wrong threshold,
    reset or surrogate differs in far more."""
    from csnn.model import set_backend

    torch.manual_seed(cfg.seed)
    ref = ref_cls(T=cfg.T, channels=cfg.channels).to(device)
    # a leaky neuron needs tau times the input to fire, any neuron its threshold: the layers' inputs so lifted
    lift = cfg.v_threshold * (2 * cfg.tau if NEURONS[cfg.neuron]["decays"] else 1.0)
    pooled = 4.0 if cfg.pooling == "avg" else 1.0  # an average of 4 spikes into fc1: a quarter of a max's
    with torch.no_grad():  # fc1 and fc2 x3 too, or a fresh network's output layer hardly fires
        for m in ref.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(3 * lift * pooled)
            elif isinstance(m, torch.nn.BatchNorm2d) and lift != 1:
                m.weight.mul_(lift)
    ours = CSNN.from_config(cfg).to(device)
    ours.load_state_dict(ref.state_dict())
    set_backend(ours, cfg.backend)
    ours.fuse(compiled)
    x = x * 3
    target = F.one_hot(torch.arange(len(x), device=device) % 10, 10).float()
    seen: dict = {"ref": [], "ours": []}
    for name, net in (("ref", ref), ("ours", ours)):
        for i in SPIKING_LAYERS:
            net.conv_fc[i].register_forward_hook(lambda m, a, out, name=name: seen[name].append(out.detach()))
    spike_diff, grad_err, rates = 0.0, 0.0, [1.0] * len(SPIKING_LAYERS)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False), \
            torch.autocast(device.type, dtype=torch.float16, enabled=amp):
        for train_mode in (True, False):
            for net in (ref, ours):
                net.train(train_mode)
                net.zero_grad()
                with torch.set_grad_enabled(train_mode):
                    out = net(x)
                    if train_mode:
                        F.mse_loss(out.float(), target).backward()
                functional.reset_net(net)
            for k, (a, b) in enumerate(zip(seen["ref"], seen["ours"], strict=True)):
                spike_diff = max(spike_diff, (a != b).float().mean().item())
                rates[k] = min(rates[k], a.float().mean().item())
            seen["ref"].clear(), seen["ours"].clear()
            if train_mode:
                for (name, pa), pb in zip(ref.named_parameters(), ours.parameters()):
                    grad_err = max(grad_err, ((pa.grad - pb.grad).norm() / pa.grad.norm().clamp_min(1e-12)).item())
    # On the CPU SpikingJelly's own LIF path flips a spike that sits on the threshold now and then between
    # our network and the example's (2.5 in a million seen, with and without our compiled kernels; never for IF)
    cpu_spikes = 1e-5 if NEURONS[cfg.neuron]["decays"] else 0.0
    allowed = (cpu_spikes, 1e-3) if device.type == "cpu" else (0.01, 0.1) if amp else (1e-3, 1e-4)
    return {"amp": amp, "differing_spikes": spike_diff, "allowed_differing_spikes": allowed[0],
            "grad_rel_err": grad_err, "allowed_grad_rel_err": allowed[1],
            "lowest_firing_rates": [round(r, 4) for r in rates], "min_firing_rate": MIN_RATE,
            "ok": spike_diff <= allowed[0] and grad_err <= allowed[1] and min(rates) >= MIN_RATE}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(device: str = "cpu", T: int = TUTORIAL["T"], channels: int = 16, batch_size: int = TUTORIAL["batch_size"],
        backend: str = "auto", amp: bool = True, compile: bool = True, train_images: int = 2560,
        eval_images: int = 5120, reps: int = 5, data_dir=None, workers: int = 4, time_anyway: bool = False,
        **network) -> dict:
    """Time ours and the reference; on CUDA with AMP (`amp`) and `workers` loader
    workers for the reference, on the CPU with neither (as the tutorial and ours run
    there). `network`: TrainConfig's network keys (neuron, tau, ...), the reference then SpikingJelly's
    own classes for them (reference_network). Raises EquivalenceError when our model does not compute
    the reference's: at once, or with `time_anyway` after the timing, with its figures (a GPU check
    shows both from one run)."""
    from csnn.model import set_backend

    cfg = TrainConfig(T=T, channels=channels, batch_size=batch_size, device=device, backend=backend,
                      **{k: TUTORIAL[k] for k in ("optimizer", "lr", "momentum")}, **network)
    dev = resolve_device(cfg.device)
    cuda = dev.type == "cuda"
    amp = amp and cuda
    workers = workers if cuda else 0
    s = fmnist.split(fmnist.load(data_dir), train_size=train_images, test_size=eval_images)
    x_eq = to_input(s["test"][0][: cfg.batch_size]).to(dev)
    ref_cls = functools.partial(reference_network, **cfg.network())
    # the check compares the networks without dropout (each side would draw its own masks); both are timed with it
    plain = TrainConfig.from_dict({**cfg.to_dict(), "dropout": 0.0})
    eq_cls = functools.partial(reference_network, **plain.network())
    eq = check_equivalence(eq_cls, plain, x_eq, dev, compile and not cuda)
    eq_amp = check_equivalence(eq_cls, plain, x_eq, dev, False, amp=True) if amp else None
    if not time_anyway:
        equivalent(eq, eq_amp, None)

    torch.manual_seed(0)
    ours = CSNN.from_config(cfg).to(dev)
    set_backend(ours, cfg.backend)
    ours.fuse(compile and not cuda)
    ref = ref_cls(T=cfg.T, channels=cfg.channels).to(dev)
    # the reference's optimizer as the example makes it; ours as the trainer does (fused on CUDA)
    ours_opt = make_optimizer(cfg, ours.parameters())
    ref_opt = torch.optim.SGD(ref.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    ours_scaler, ref_scaler = (torch.amp.GradScaler("cuda", enabled=amp) for _ in range(2))
    amp_dtype = torch.float16 if amp else None
    train_x, train_y = (t.to(dev) for t in s["train"])
    test_x, test_y = (t.to(dev) for t in s["test"])
    gen = torch.Generator().manual_seed(0)
    # ours as fit runs it: on CUDA with CUDA graphs (cuda_graphs: auto: a graph that fails falls back to eager
    # steps, recorded in the result as fit records it, rather than leaving no figure)
    graphs_status: dict = {}
    # augment: ours transforms its training images, the reference (the example has no augmentation) does not
    ours_train = make_trainer(ours, ours_opt, ours_scaler, train_x, train_y, cfg.batch_size, amp_dtype,
                              graphs="auto" if cuda else False, status=graphs_status,
                              augment=augment_names(cfg.augment), loss=cfg.loss)
    criterion = _mse if cfg.loss == "mse" else lambda out_fr, label, onehot: LOSSES[cfg.loss][0](out_fr.float(), label)
    eval_graphs = {"mode": "auto", "status": graphs_status} if cuda else None
    times: dict[str, list] = {k: [] for k in ("ours_train", "ref_train", "ours_eval", "ref_eval")}
    impls, ref_seen = {}, watch_reference(ref)
    with tempfile.TemporaryDirectory() as root:
        ref_train_loader, ref_test_loader = reference_loaders(s["train"], s["test"], cfg.batch_size, Path(root), workers)

        def timed(key, fn):
            sync(dev)
            t0 = time.perf_counter()
            n = fn()
            sync(dev)
            times[key].append(n / (time.perf_counter() - t0))

        for rep in range(reps + 1):  # rep 0 is the warm-up
            timed("ours_train", lambda: ours_train(gen)[2])
            impls["ours_train"] = ",".join(sorted(set(ours.neuron_implementations().values())))
            timed("ref_train", lambda: reference_train(ref, ref_opt, ref_scaler, ref_train_loader, dev, criterion))
            impls["ref_train"] = ",".join(sorted(set(ref_seen.values())))
            timed("ours_eval", lambda: (evaluate(ours, test_x, test_y, cfg.batch_size, eval_graphs), len(test_y))[1])
            impls["ours_eval"] = ",".join(sorted(set(ours.neuron_implementations().values())))
            timed("ref_eval", lambda: reference_eval(ref, ref_test_loader, dev))
            impls["ref_eval"] = ",".join(sorted(set(ref_seen.values())))
            if rep == 0:
                for v in times.values():
                    v.clear()
    if cuda:  # which IF kernels ran, as the profiler saw them (one step of each, after the timing)
        impls = observed_implementations(ours, ref, train_x[:cfg.batch_size], amp_dtype, len(SPIKING_LAYERS))
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"device": torch.cuda.get_device_name(dev) if cuda else "cpu", "backend": cfg.backend, "amp": amp,
            **cfg.network(),
            "compile": compile and not cuda, "loader_workers": workers, "T": cfg.T, "channels": cfg.channels,
            "batch_size": cfg.batch_size, "reps": reps, "threads": torch.get_num_threads(),
            "ours_train_img_s": round(med["ours_train"], 1), "ref_train_img_s": round(med["ref_train"], 1),
            "train_ratio": round(med["ours_train"] / med["ref_train"], 3),
            "augment": cfg.augment, "loss": cfg.loss, "ours_eval_img_s": round(med["ours_eval"], 1), "ref_eval_img_s": round(med["ref_eval"], 1),
            "eval_ratio": round(med["ours_eval"] / med["ref_eval"], 3), "implementations": impls, "equivalence": eq,
            "equivalence_amp": eq_amp, **(graphs_info("auto", graphs_status) if cuda else {})}
    equivalent(eq, eq_amp, result)
    return result


AMP_TOLERANCE_MEASURED = False  # set True once a GPU run has measured check_equivalence's AMP tolerance


def equivalent(eq: dict, eq_amp: dict | None, result: dict | None) -> None:
    """Raises EquivalenceError, saying why, unless check_equivalence passed in float32. Under AMP its
    figures are kept, marked unmeasured, and not judged: the reference keeps a float16 membrane
    potential where ours keeps float32, and how far that takes them apart (AMP_TOLERANCE) has not been
    measured on a GPU yet (python -m csnn.gpucheck records it)."""
    for e in filter(None, (eq, eq_amp)):
        if e["amp"] and not AMP_TOLERANCE_MEASURED:
            e["judged"] = "unmeasured: figures only (AMP tolerance not yet measured on a GPU)"
            continue
        if e["ok"]:
            continue
        where = " under AMP" if e["amp"] else ""
        if min(e["lowest_firing_rates"]) < e["min_firing_rate"]:
            raise EquivalenceError(f"a spiking layer fired at {min(e['lowest_firing_rates'])} on the equivalence "
                                   f"check's inputs{where}, under {e['min_firing_rate']}: too silent to compare "
                                   f"(the deeper layers fire with more time steps: -T 4 and --channels 8 or more "
                                   f"fired on the CPU, -T 2 with 64 did not): {e}", result)
        raise EquivalenceError(f"our model does not compute the reference's function{where}: {e}", result)


def observed_implementations(ours, ref, images: torch.Tensor, amp_dtype, layers: int) -> dict:
    """observe_if_kernels of a training step (forward and backward, under AMP as timed) and
    of a float32 evaluation forward, for ours and the reference."""
    from csnn.model import observe_if_kernels

    x = to_input(images)
    out = {}
    for name, net in (("ours", ours), ("ref", ref)):
        def train():
            net.train()
            with torch.autocast("cuda", dtype=amp_dtype, enabled=amp_dtype is not None):
                net(x).float().sum().backward()
            functional.reset_net(net)

        def evaluate_():
            net.eval()
            with torch.no_grad():
                net(x)
            functional.reset_net(net)

        for mode, fn in (("train", train), ("eval", evaluate_)):
            out[f"{name}_{mode}"] = ",".join(observe_if_kernels(fn, layers)["implementations"]) or "unobserved"
        net.zero_grad(set_to_none=False)
    return out


class EquivalenceError(Exception):
    """Our model computed another function than the reference's; `result` holds run()'s figures."""

    def __init__(self, message: str, result: dict):
        super().__init__(message)
        self.result = result


# the names in run()'s errors (TrainConfig's fields, the data's subsets, the backend's checks) as this
# command's flags name them
WORDS = {"TrainConfig.T": "-T", "TrainConfig.channels": "--channels", "TrainConfig.batch_size": "--batch-size",
         "TrainConfig.device": "--device", "TrainConfig.backend": "--backend", "train_size": "--train-images",
         "test_size": "--eval-images", "TrainConfig.backend: 'cupy'": "--backend cupy:",
         "backend 'cupy'": "--backend cupy", "backend 'auto'": "--backend auto", "device is": "--device is",
         **network_words("--")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m csnn.bench", description=__doc__.split("\n")[0])
    ap.add_argument("-T", type=positive_int, default=TUTORIAL["T"])
    ap.add_argument("--channels", type=positive_int, default=16)
    ap.add_argument("--batch-size", type=positive_int, default=TUTORIAL["batch_size"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="auto", help="IF kernels of ours: auto or cupy (CUDA)")
    ap.add_argument("--no-amp", action="store_true", help="on CUDA, train both sides in float32")
    ap.add_argument("-j", "--workers", type=int, default=4, help="the reference's DataLoader workers on CUDA (the tutorial's -j)")
    ap.add_argument("--reps", type=positive_int, default=5, help="timed repetitions of each, after one warm-up")
    ap.add_argument("--train-images", type=positive_int, default=2560, help="images per timed training pass")
    ap.add_argument("--eval-images", type=positive_int, default=5120, help="images per timed evaluation pass")
    ap.add_argument("--compile", choices=("on", "off"), default="on",
                    help="our compiled CPU kernels for the IF neurons and max pooling (TrainConfig.compile)")
    ap.add_argument("--data-dir", default=None)
    add_network_flags(ap, "--")
    args = ap.parse_args(argv)
    # The weights (fc1 alone is 784 C^2 floats), with their gradients and momentum, before any batch
    need, have = 3 * 4 * 794 * args.channels ** 2, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        print(f"error: --channels {args.channels}: the network's weights, gradients and momentum alone take "
              f"{need / 2**30:,.0f} GiB, more than this machine's {have / 2**30:.0f} GiB", file=sys.stderr)
        return 2
    try:
        result = run(device=args.device, T=args.T, channels=args.channels, batch_size=args.batch_size,
                     backend=args.backend, amp=not args.no_amp, compile=args.compile == "on",
                     train_images=args.train_images, eval_images=args.eval_images, reps=args.reps,
                     data_dir=args.data_dir, workers=args.workers, **network_values(args, "--"))
    except (ValueError, RuntimeError) as e:  # a bad input (TrainConfig, device, data): as the other commands
        print(f"error: {spelled(worded(str(e), WORDS), '--')}", file=sys.stderr)  # the flag to change
        return 2
    except EquivalenceError as e:
        print(f"error: {spelled(str(e), '--')}; no ratio printed", file=sys.stderr)
        return 1
    for eq in filter(None, (result["equivalence"], result["equivalence_amp"])):
        print(f"equivalence{' under AMP' if eq['amp'] else ''}: {eq['differing_spikes']:.3%} of spikes differ "
              f"(allowed {eq['allowed_differing_spikes']:.1%}), gradients within {eq['grad_rel_err']:.2g} "
              f"(allowed {eq['allowed_grad_rel_err']:g}), every layer fired (lowest rate "
              f"{min(eq['lowest_firing_rates']):.3f})")
    print(f"network: {neuron_text(TrainConfig(**{k: result[k] for k in NETWORK_FIELDS}))}, {result['pooling']} pooling, "
          f"dropout {result['dropout']}, augment {result['augment']} (ours only), loss {result['loss']}")
    print(f"{'':10}{'ours img/s':>12}{'reference':>12}{'ratio':>8}   neuron kernels (ours / reference)")
    for k in ("train", "eval"):
        print(f"{k:10}{result[f'ours_{k}_img_s']:12.1f}{result[f'ref_{k}_img_s']:12.1f}{result[f'{k}_ratio']:8.2f}"
              f"   {result['implementations'][f'ours_{k}']} / {result['implementations'][f'ref_{k}']}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    leave(interruptible(main, "csnn.bench", "no figures written"))
