"""python -m csnn.bench: our trainer against SpikingJelly's own example, side by side.

The reference is `spikingjelly.activation_based.examples.conv_fashion_mnist` as
it ships: its CSNN, a torchvision DataLoader with ToTensor (num_workers=0), its
training step with the per-batch .item() calls and its evaluation loop. Both run
the same network size, T, batch size, SGD (lr 0.1, momentum 0.9) and real
Fashion-MNIST images, on the same device, alternately, after a warm-up; the
medians of the repetitions give the ratios. Ratios are printed only after the
equivalence check: with the same weights and batch, both compute the same
firing rates.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from spikingjelly.activation_based import functional

from csnn import data as fmnist
from csnn.model import CSNN
from csnn.config import TUTORIAL, TrainConfig
from csnn.data import to_input
from csnn.train import evaluate, make_optimizer, resolve_device, train_epoch


def reference_loaders(train, test, batch_size: int, root: Path):
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
    loader = torch.utils.data.DataLoader
    return (loader(train_set, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=0, pin_memory=True),
            loader(test_set, batch_size=batch_size, shuffle=True, drop_last=False, num_workers=0, pin_memory=True))


def reference_train(net, optimizer, loader, device) -> int:
    """The example's training loop, verbatim but for AMP (off on the CPU, as ours)."""
    net.train()
    train_loss = train_acc = train_samples = 0
    for img, label in loader:
        optimizer.zero_grad()
        img = img.to(device)
        label = label.to(device)
        label_onehot = F.one_hot(label, 10).float()
        out_fr = net(img)
        loss = F.mse_loss(out_fr, label_onehot)
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


def check_equivalence(ref_cls, cfg: TrainConfig, x: torch.Tensor, device, fused: bool) -> float:
    """Max |difference| of the firing rates of the two models with the same weights
    on the same batch, in training mode (batch statistics) and in eval mode."""
    torch.manual_seed(cfg.seed)
    ref = ref_cls(T=cfg.T, channels=cfg.channels).to(device)
    ours = CSNN(cfg.T, cfg.channels).to(device)
    ours.load_state_dict(ref.state_dict())
    ours.fuse(fused)
    worst = 0.0
    for train_mode in (True, False):
        ref.train(train_mode), ours.train(train_mode)
        with torch.no_grad():
            a = ref(x)
            functional.reset_net(ref)
            b = ours(x)
            functional.reset_net(ours)
        worst = max(worst, (a - b).abs().max().item())
    return worst


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m csnn.bench", description=__doc__.split("\n")[0])
    ap.add_argument("-T", type=int, default=TUTORIAL["T"])
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=TUTORIAL["batch_size"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions of each, after one warm-up")
    ap.add_argument("--train-images", type=int, default=2560, help="images per timed training pass")
    ap.add_argument("--eval-images", type=int, default=5120, help="images per timed evaluation pass")
    ap.add_argument("--compile", choices=("on", "off"), default="on",
                    help="our compiled CPU kernels for the IF neurons and max pooling (TrainConfig.compile)")
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args(argv)

    from spikingjelly.activation_based.examples.conv_fashion_mnist import CSNN as RefCSNN

    cfg = TrainConfig(T=args.T, channels=args.channels, batch_size=args.batch_size, device=args.device,
                      **{k: TUTORIAL[k] for k in ("optimizer", "lr", "momentum")})
    device = resolve_device(cfg.device)
    s = fmnist.split(fmnist.load(args.data_dir), train_size=args.train_images, test_size=args.eval_images)
    x_eq = to_input(s["test"][0][: cfg.batch_size]).to(device)
    diff = check_equivalence(RefCSNN, cfg, x_eq, device, args.compile == "on")
    tolerance = 1e-5 if device.type == "cpu" else 1e-3
    print(f"equivalence: max |firing rate difference| = {diff:.3g} (tolerance {tolerance})")
    if not diff <= tolerance:
        print("error: our model does not compute the reference's function; no ratio printed", file=sys.stderr)
        return 1

    torch.manual_seed(0)
    ours = CSNN(cfg.T, cfg.channels).to(device)
    if device.type == "cpu":
        ours.fuse(args.compile == "on")
    ref = RefCSNN(T=cfg.T, channels=cfg.channels).to(device)
    ours_opt, ref_opt = make_optimizer(cfg, ours.parameters()), make_optimizer(cfg, ref.parameters())
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    train_x, train_y = (t.to(device) for t in s["train"])
    test_x, test_y = (t.to(device) for t in s["test"])
    gen = torch.Generator().manual_seed(0)
    times: dict[str, list] = {k: [] for k in ("ours_train", "ref_train", "ours_eval", "ref_eval")}
    with tempfile.TemporaryDirectory() as root:
        ref_train_loader, ref_test_loader = reference_loaders(s["train"], s["test"], cfg.batch_size, Path(root))

        def timed(key, fn):
            sync(device)
            t0 = time.perf_counter()
            n = fn()
            sync(device)
            times[key].append(n / (time.perf_counter() - t0))

        for rep in range(args.reps + 1):  # rep 0 is the warm-up
            timed("ours_train", lambda: train_epoch(ours, ours_opt, scaler, train_x, train_y, cfg.batch_size, gen)[2])
            timed("ref_train", lambda: reference_train(ref, ref_opt, ref_train_loader, device))
            timed("ours_eval", lambda: (evaluate(ours, test_x, test_y, cfg.batch_size), len(test_y))[1])
            timed("ref_eval", lambda: reference_eval(ref, ref_test_loader, device))
            if rep == 0:
                for v in times.values():
                    v.clear()
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"device": str(device), "compile": args.compile, "T": cfg.T, "channels": cfg.channels, "batch_size": cfg.batch_size,
              "reps": args.reps, "threads": torch.get_num_threads(),
              "ours_train_img_s": round(med["ours_train"], 1), "ref_train_img_s": round(med["ref_train"], 1),
              "train_ratio": round(med["ours_train"] / med["ref_train"], 3),
              "ours_eval_img_s": round(med["ours_eval"], 1), "ref_eval_img_s": round(med["ref_eval"], 1),
              "eval_ratio": round(med["ours_eval"] / med["ref_eval"], 3), "equivalence_max_diff": diff}
    print(f"{'':10}{'ours img/s':>12}{'reference':>12}{'ratio':>8}")
    for k in ("train", "eval"):
        print(f"{k:10}{result[f'ours_{k}_img_s']:12.1f}{result[f'ref_{k}_img_s']:12.1f}{result[f'{k}_ratio']:8.2f}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
