"""The tutorial's command line (`python -m csnn.train`): its flags, mapped onto a TrainConfig, and one run of fit."""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

import torch

from csnn import data as fmnist
from csnn.argtypes import add_network_flags, network_values, network_words, spelled, worded
from csnn.config import NETWORK_FIELDS, TUTORIAL, TrainConfig, check_runnable
from csnn.model import CSNN, set_backend
from csnn.atomic import write_atomic
from csnn.train import check_resumable, check_same_data, fit, load_model, read_checkpoint, resolve_device, set_deterministic


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m csnn.train", description="Classify Fashion-MNIST with the tutorial's CSNN")
    p.add_argument("-T", default=TUTORIAL["T"], type=int, help="simulating time-steps")
    p.add_argument("-device", default="cuda:0", help="device: cuda:N or cpu (default cuda:0, as the tutorial)")
    p.add_argument("-b", default=TUTORIAL["batch_size"], type=int, help="batch size")
    # 64 is the tutorial script's default; its reported run used TUTORIAL["epochs"]
    p.add_argument("-epochs", default=64, type=int, metavar="N", help="number of total epochs to run")
    p.add_argument("-j", default=4, type=int, metavar="N",
                   help="accepted for compatibility and ignored: data is held as tensors, no loader workers")
    p.add_argument("-data-dir", type=str, help="Fashion-MNIST folder (the four IDX files, or torchvision's root)")
    p.add_argument("-download", action="store_true", help="download Fashion-MNIST with torchvision into -data-dir if not found")
    p.add_argument("-out-dir", type=str, default="./logs", help="root dir for saving logs and checkpoint")
    p.add_argument("-resume", type=str, help="resume from the checkpoint path")
    p.add_argument("-overwrite", action="store_true", help="replace the checkpoints of an earlier run in the same folder")
    p.add_argument("-amp", action="store_true", help="automatic mixed precision training (CUDA only)")
    p.add_argument("-cupy", action="store_true", help="IF neurons on our CuPy kernels (CUDA; pip install -e '.[cupy]')")
    p.add_argument("-deterministic", action="store_true",
                   help="bit-reproducible CUDA training (cuDNN deterministic, no autotuning), at a cost in speed")
    p.add_argument("-no-cuda-graphs", action="store_true",
                   help="run each CUDA training step eagerly instead of replaying it as a CUDA graph (slower)")
    p.add_argument("-opt", type=str, default=TUTORIAL["optimizer"], help="optimizer: sgd, adam or adamw")
    p.add_argument("-momentum", default=TUTORIAL["momentum"], type=float, help="momentum for SGD")
    p.add_argument("-lr", default=TUTORIAL["lr"], type=float, help="learning rate")
    p.add_argument("-channels", default=TUTORIAL["channels"], type=int, help="channels of CSNN")
    p.add_argument("-save-es", default=None, help="dir for saving a batch of spikes encoded by the first {Conv2d-BatchNorm2d-IFNode}")
    p.add_argument("-seed", default=0, type=int, help="seed for weights and batch order")
    p.add_argument("-weight-decay", default=0.0, type=float, help="weight decay")
    p.add_argument("-val-size", default=0, type=int, help="training images held out for validation")
    p.add_argument("-train-size", default=0, type=int, help="stratified training subset (0 = all)")
    p.add_argument("-test-size", default=0, type=int, help="stratified test subset (0 = all)")
    add_network_flags(p, "-")
    return p.parse_args(argv)


def main(argv=None) -> int:
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on Ctrl-C is a KeyboardInterrupt
    args = parse_args(argv)
    print(args)
    progress: dict = {}  # the last epoch finished and where its checkpoint is, for the Ctrl-C message
    try:
        return run(args, progress)
    except (ValueError, RuntimeError, OSError) as e:  # DataError, CheckpointError: ValueErrors; FileExistsError: OSError
        print(f"error: {spelled(worded(str(e), WORDS), '-')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if "epoch" in progress:
            print(f"interrupted after epoch {progress['epoch']}; resume with -resume {progress['checkpoint']}",
                  file=sys.stderr)
        else:
            print("interrupted before the first epoch ended; no checkpoint written", file=sys.stderr)
        return 130


# TrainConfig's fields as the tutorial's flags name them, for errors that say which flag to change
FLAGS = {"T": "-T", "channels": "-channels", "batch_size": "-b", "epochs": "-epochs", "optimizer": "-opt",
         "lr": "-lr", "momentum": "-momentum", "weight_decay": "-weight-decay", "seed": "-seed", "device": "-device",
         "val_size": "-val-size", "train_size": "-train-size", "test_size": "-test-size", "backend": "-cupy"}
# ... and the shared code's words for them (TrainConfig's, the data split's, the backend's checks)
WORDS = {**{f"TrainConfig.{k}": v for k, v in FLAGS.items()}, **{k: v for k, v in FLAGS.items() if "_" in k},
         "TrainConfig.backend: 'cupy'": "-cupy:", "backend 'cupy'": "-cupy", "use backend 'auto'": "leave -cupy out",
         "device is": "-device is", **network_words("-")}


def run(args: argparse.Namespace, progress: dict) -> int:
    """Check every input, then train; nothing is written before all the checks pass."""
    cfg = TrainConfig(T=args.T, channels=args.channels, batch_size=args.b, epochs=args.epochs,
                      optimizer=args.opt, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                      amp=args.amp, seed=args.seed, device=args.device, val_size=args.val_size,
                      train_size=args.train_size, test_size=args.test_size,  # main() names the flags (WORDS)
                      backend="cupy" if args.cupy else "auto", cuda_graphs=False if args.no_cuda_graphs else "auto",
                      **network_values(args, "-"))
    resolve_device(cfg.device)
    check_runnable(cfg.backend)
    set_backend(CSNN(1, 1), cfg.backend)  # fail before loading anything
    set_deterministic(args.deterministic)
    if args.save_es is not None:
        if not args.resume:
            raise ValueError("-save-es needs -resume CHECKPOINT: the network whose encoder is drawn")
        if Path(args.save_es).exists() and not Path(args.save_es).is_dir():
            raise ValueError(f"-save-es {args.save_es}: is a file; name a folder")
    ckpt = read_checkpoint(args.resume) if args.resume else None  # before anything is written

    if args.save_es is not None:
        from csnn.spikes import render

        data = fmnist.load(args.data_dir, download=args.download)
        net, saved = load_model(args.resume, cfg.device)
        images = fmnist.split(data, test_size=0)["test"][0][: args.b]
        written = render(net, images, Path(args.save_es) / "visualization")  # FileExistsError is an OSError
        print(f"saved the encoder spikes of {len(images)} test images (T={saved.T}) to {written}")
        return 0

    name = f"T{cfg.T}_b{cfg.batch_size}_{cfg.optimizer}_lr{cfg.lr}_c{cfg.channels}"
    name += "_amp" if cfg.amp else ""
    name += "_cupy" if cfg.backend == "cupy" else ""
    # the network's keys that are not the tutorial's (-neuron lif -tau 3: _neuron-lif_tau-3.0): another network's
    # run gets a folder of its own
    tutorial = TrainConfig()
    name += "".join(f"_{k.replace('_', '-')}-{getattr(cfg, k)}" for k in (*NETWORK_FIELDS, "augment", "loss")
                    if getattr(cfg, k) != getattr(tutorial, k))
    out_dir = Path(args.out_dir) / name
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir}: is a file; -out-dir must name a folder")
    if ckpt is not None:
        check_resumable(args.resume, ckpt, cfg)
        if ckpt["epoch"] + 1 >= cfg.epochs:
            print(f"{args.resume}: the run is already complete ({cfg.epochs} epochs); nothing to resume")
            return 0
    # The folder name does not hold every setting (epochs, seed, ...): never replace another run's checkpoints.
    # -resume continues the folder's own run only: a checkpoint of another folder (another seed, say)
    # resumed here would replace this folder's checkpoints.
    existing = [f.name for f in (out_dir / "checkpoint_latest.pth", out_dir / "checkpoint_max.pth") if f.exists()]
    own = ckpt is not None and Path(args.resume).resolve().parent == out_dir.resolve()
    if existing and not own and not args.overwrite:
        hint = (f"{args.resume} is another folder's checkpoint; " if ckpt is not None else
                f"continue it with -resume {out_dir / 'checkpoint_latest.pth'}, ")
        raise ValueError(f"{out_dir}: already holds a run ({', '.join(existing)}); {hint}replace it with -overwrite, "
                         "or choose another -out-dir")
    data = fmnist.load(args.data_dir, download=args.download)
    fmnist.split(data, cfg.val_size, cfg.train_size, cfg.test_size, cfg.split_seed)  # sizes that fit the data
    if ckpt is not None:
        check_same_data(args.resume, ckpt, data)  # before anything is written

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # below a file, /proc, no permission: the flag to change
        raise ValueError(f"-out-dir {args.out_dir}: cannot make {out_dir} there ({e.strerror or e})") from None
    write_atomic(out_dir / "args.txt", f"{args}\n{' '.join(sys.argv)}\n{cfg.to_yaml()}")

    from torch.utils.tensorboard import SummaryWriter

    start = ckpt["epoch"] + 1 if ckpt is not None else 0
    writer = SummaryWriter(str(out_dir), purge_step=start)
    # The tutorial's bookkeeping, which selects on the test set and so stays out of fit
    # (studies select on validation): the best test accuracy so far, saved in every
    # checkpoint as max_test_acc, and the epoch that reached it as checkpoint_max.pth.
    max_test_acc = ckpt.get("max_test_acc", -1.0) if ckpt is not None else -1.0

    def on_epoch(m: dict, save) -> None:
        nonlocal max_test_acc
        improved = m["test_acc"] > max_test_acc
        max_test_acc = m["max_test_acc"] = max(max_test_acc, m["test_acc"])
        save([out_dir / "checkpoint_latest.pth"] + ([out_dir / "checkpoint_max.pth"] if improved else []),
             max_test_acc=max_test_acc)

    def report(m: dict) -> None:
        progress.update(epoch=m["epoch"], checkpoint=out_dir / "checkpoint_latest.pth")
        for k in ("train_loss", "train_acc", "test_loss", "test_acc"):
            writer.add_scalar(k, m[k], m["epoch"])
        writer.flush()
        print(f"epoch = {m['epoch']}, train_loss ={m['train_loss']: .4f}, train_acc ={m['train_acc']: .4f}, "
              f"test_loss ={m['test_loss']: .4f}, test_acc ={m['test_acc']: .4f}, max_test_acc ={m['max_test_acc']: .4f}, "
              f"train speed ={m['train_img_s']: .1f} images/s, epoch time ={m['epoch_s']: .1f} s", flush=True)

    print(out_dir)
    try:
        fit(cfg, data, None, report, resume=args.resume, on_epoch=on_epoch)  # on_epoch writes the checkpoints
    except FloatingPointError as e:
        print(f"error: {spelled(worded(str(e), WORDS), '-')}", file=sys.stderr)
        return 1
    finally:
        writer.close()
    return 0
