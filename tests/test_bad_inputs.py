"""Every bad input gets a clear error and nothing is lost (issue 11).

One table: each row is a bad input, the command it is given to, the exit code
and a fragment of the one-line message, and optionally a check that nothing was
lost. Each command's main(argv) runs in-process on small IDX files and a study
folder built by hand (no Ray), so the whole table takes seconds. A row fails if
the command raises anything (a traceback) instead of returning its exit code.
"""
from __future__ import annotations

import gzip
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import pytest
import torch
import yaml

from conftest import ROOT, tiny_spec, write_dataset
from csnn import argtypes, bench, cli, data as fmnist
from csnn.atomic import write_atomic
from csnn.config import TrainConfig, FIELD_TYPES
from csnn.train import read_checkpoint
from study import analyze, environment, reproduce, results, run, spec as specs


def load_cmd(argv) -> int:
    """results.load as a command: 0, or 2 with the StudyError (what a notebook sees)."""
    try:
        results.load(argv[0])
    except results.StudyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


COMMANDS = {"csnn.train": cli.main, "study.run": run.main, "study.reproduce": reproduce.main,
            "study.analyze": analyze.main, "csnn.bench": bench.main, "results.load": load_cmd}


@dataclass
class Ctx:
    tmp: Path
    data: Path  # 300 training and 100 test images
    ckpt: Path  # a real checkpoint of csnn.train (T 1, 2 channels, batch 16, 1 epoch on 32 images)

    def cli(self, *extra, epochs=2, data=None) -> list:
        return ["-device", "cpu", "-T", "1", "-channels", "2", "-b", "16", "-epochs", str(epochs), "-data-dir",
                str(data or self.data), "-out-dir", str(self.tmp / "logs"), *map(str, extra)]

    @property
    def run_dir(self) -> Path:
        return self.tmp / "logs" / "T1_b16_sgd_lr0.1_c2"

    def space(self, text: str | None = None, **over) -> Path:
        f = self.tmp / "space.yaml"
        if text is None:
            text = yaml.safe_dump(tiny_spec("hand", **over), sort_keys=False)
        f.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
        return f

    def dry(self, space: Path, *extra, data=None) -> list:
        return [str(space), "--storage", str(self.tmp / "results"), "--data-dir", str(data or self.data), "--dry-run", *extra]

    def study(self, ids=("00001", "00002")) -> Path:
        """A complete study folder as study.run writes it, built by hand from the results
        module's own functions: spec.yaml, trials.parquet/.csv, history.csv, best.yaml, best/."""
        raw = tiny_spec("hand")
        self.space()
        spec = specs.parse(raw, "space.yaml")
        d = self.tmp / "results" / "hand"
        (d / "best").mkdir(parents=True, exist_ok=True)
        write_atomic(d / "spec.yaml", yaml.safe_dump(spec.to_dict(), sort_keys=False))
        rows, hist = [], []
        for n, (tid, channels, lr, accs) in enumerate(zip(ids, (4, 6), (0.01, 0.005), ([0.3, 0.5], [0.2, 0.4]))):
            for e, a in enumerate(accs):
                hist.append({"trial_id": tid, "epoch": e, "lr": lr, "train_loss": 0.08, "train_acc": a, "val_loss": 0.07,
                             "val_acc": a, "test_loss": 0.07, "test_acc": a, "max_test_acc": a, "epoch_s": 1.0,
                             "train_img_s": 500.0, "energy_uj": 1.0 + n, "spikes_per_image": 100.0})
            cfg = spec.config({"channels": channels, "lr": lr})
            rows.append({"trial_id": tid, "number": n, "status": "finished", "channels": channels, "lr": lr,
                         "val_acc": accs[-1], "best_val_acc": max(accs), "test_acc": accs[-1], "best_test_acc": max(accs),
                         "energy_uj": 1.0 + n, "epochs_run": 2, "time_s": 2.0, "error": None,
                         "config": yaml.safe_dump(cfg.to_dict(), default_flow_style=True, width=10_000).strip()})
        trials, history = pd.DataFrame(rows), pd.DataFrame(hist)
        for name, frame in (("trials.parquet", trials), ("trials.csv", trials), ("history.csv", history)):
            results.write_table(d / name, frame)
        best = results.best_entry(results.best_row(trials, spec), spec)
        write_atomic(d / "best.yaml", yaml.safe_dump(best, sort_keys=False))
        summary = {"trial_id": best["trial_id"], "epochs": 1, "seeds": [0, 1], "test_acc": {0: 0.5, 1: 0.52},
                   "test_acc_mean": 0.51, "test_acc_std": 0.014, "epoch_s_mean": 1.0}
        write_atomic(d / "best" / "summary.yaml", yaml.safe_dump(summary, sort_keys=False))
        results.write_table(d / "best" / "metrics.csv", pd.DataFrame([{"seed": s, "epoch": 0, "test_acc": 0.5} for s in (0, 1)]))
        return d


@dataclass
class Row:
    id: str
    cmd: str
    setup: Callable[[Ctx], list]  # writes what the row needs, returns argv
    code: int
    fragment: str
    check: Callable[[Ctx], None] | None = None  # after the command: nothing lost
    env: dict = field(default_factory=dict)
    warns: str | None = None  # a warning the command must give


def snapshot(*paths: Path) -> dict:
    return {p: p.read_bytes() for p in paths}


def cli_existing_run(c: Ctx) -> list:
    c.run_dir.mkdir(parents=True)
    for name in ("checkpoint_latest.pth", "checkpoint_max.pth"):
        shutil.copy(c.ckpt, c.run_dir / name)
    (c.run_dir / "args.txt").write_text("the longer run's arguments\n")
    c.before = snapshot(*c.run_dir.iterdir())
    return c.cli(epochs=1)


def unchanged(c: Ctx) -> None:
    assert snapshot(*c.before) == c.before, "a file was changed"


def resume_with(make: Callable[[Path, Ctx], None], *extra) -> Callable[[Ctx], list]:
    """-resume with a bad file, into a run folder whose args.txt must survive."""
    def setup(c: Ctx) -> list:
        c.run_dir.mkdir(parents=True)
        (c.run_dir / "args.txt").write_text("the earlier run's arguments\n")
        c.before = snapshot(c.run_dir / "args.txt")
        bad = c.tmp / "bad.pth"
        make(bad, c)
        return c.cli("-resume", bad, *extra)
    return setup


def truncated(p: Path, c: Ctx) -> None:
    raw = c.ckpt.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])


def run_dir_unwritten(c: Ctx) -> None:
    unchanged(c)
    assert sorted(f.name for f in c.run_dir.iterdir()) == ["args.txt"]


def with_comparison(c: Ctx, *extra) -> list:
    d = c.study()
    out = d / "reproduce" / "00001"
    out.mkdir(parents=True)
    (out / "comparison.csv").write_text("epoch,metric,recorded,reproduced,diff,ok\n0,test_acc,0.3,0.3,0.0,True\n")
    c.before = snapshot(out / "comparison.csv")
    return [str(d), "--trial", "00001", *extra]


def finished_study(c: Ctx, *extra) -> list:
    d = c.study()
    c.before = snapshot(*(d / "best").iterdir(), d / "trials.csv")
    return [str(c.tmp / "space.yaml"), "--storage", str(c.tmp / "results"), "--data-dir", str(c.data), *extra]


def started_with_num_samples(c: Ctx, *extra) -> list:
    """A finished study that `--num-samples 2` started: spec.yaml stores the 2."""
    argv = finished_study(c, *extra)
    f = c.tmp / "results" / "hand" / "spec.yaml"
    f.write_text(f.read_text().replace("num_samples: 3", "num_samples: 2"))
    return argv


def other_images(c: Ctx, *extra) -> list:
    """A finished study whose epochs record another data fingerprint than c.data's."""
    argv = finished_study(c, *extra)
    h = c.tmp / "results" / "hand" / "history.csv"
    results.write_table(h, pd.read_csv(h).assign(data_sha="0123456789abcdef"))
    return argv


def all_errored(c: Ctx, *extra) -> list:
    """A finished study in which every trial errored: no best trial, no best.yaml, no best/."""
    argv = finished_study(c, *extra)
    d = c.tmp / "results" / "hand"
    for name in ("trials.parquet", "trials.csv"):
        t = pd.read_parquet(d / "trials.parquet")
        results.write_table(d / name, t.assign(status="errored", val_acc=float("nan"), best_val_acc=float("nan"),
                                               error="RuntimeError: boom"))
    (d / "best.yaml").unlink()
    shutil.rmtree(d / "best")
    c.before = snapshot(d / "trials.csv")
    return argv


def damaged(mutate: Callable[[Path], None]) -> Callable[[Ctx], list]:
    def setup(c: Ctx) -> list:
        d = c.study()
        mutate(d)
        return [str(d)]
    return setup


def data_variant(make: Callable[[Path], None]) -> Callable[[Ctx], list]:
    def setup(c: Ctx) -> list:
        folder = write_dataset(c.tmp / "d", 300, 100)
        make(folder)
        return [str(c.space()), "--storage", str(c.tmp / "results"), "--data-dir", str(folder), "--dry-run"]
    return setup


def gzip_in_place(folder: Path) -> None:
    f = folder / "train-labels-idx1-ubyte"
    f.write_bytes(gzip.compress(f.read_bytes()))


def report_has_no_placeholders(c: Ctx) -> None:
    text = (c.tmp / "results" / "hand" / "report" / "report.md").read_text()
    assert "Sampler tpe (seed 0)" in text
    assert re.search(r"\{[A-Za-z_]", text) is None, "a format placeholder was left in report.md"


def ids_stay_strings(c: Ctx) -> None:
    s = results.load(c.tmp / "results" / "hand")
    assert list(s.trials["trial_id"]) == ["00001", "00002"] and set(s.history["trial_id"]) == {"00001", "00002"}
    assert s.best["trial_id"] == "00001" and s.best_row["best_val_acc"] == 0.5


def read_csv_only(c: Ctx) -> None:
    s = results.load(c.tmp / "results" / "hand")
    assert s.complete and s.trials_file.name == "trials.csv" and list(s.trials["trial_id"]) == ["00001", "00002"]


def optuna_db_untouched(c: Ctx) -> None:
    unchanged(c)
    report = (c.tmp / "results" / "hand" / "report" / "report.md").read_text()
    assert "parameter importance not drawn" in report and "### learning curves" in report


def optuna_db(content: bytes) -> Callable[[Ctx], list]:
    def setup(c: Ctx) -> list:
        d = c.study()
        (d / "optuna.db").write_bytes(content)
        c.before = snapshot(d / "optuna.db")
        return [str(d)]
    return setup


def write(name: str, content: bytes) -> Callable[[Path], None]:
    return lambda d: (d / name).write_bytes(content)


def with_data_file(c: Ctx, **env) -> None:
    (c.tmp / "afile").write_text("not a folder")


SPEC_TOP = "name: hand\nobjective: {metric: train_loss, mode: min}\n"
SPACE = "space: {lr: {type: float, low: 0.01, high: 0.1, log: true}}\n"
NO_GPU = not torch.cuda.is_available()
# nine lists of nine aliases of the list before: 9**9 strings once written out
BOMB = "".join(f"{a}: &{a} [{', '.join([f'*{p}'] * 9) if p else ', '.join(['lol'] * 9)}]\n"
               for p, a in zip(["", *"abcdefgh"], "abcdefghi")) + "search: {seed: *i}\n"

ROWS = [
    # ---- 1-4: data loss
    Row("1 fewer -epochs into an earlier run's folder", "csnn.train", cli_existing_run, 2, "already holds a run", unchanged),
    *[Row(f"2 -resume {what}", "csnn.train", resume_with(make), 2, "is not a csnn.train checkpoint", run_dir_unwritten)
      for what, make in [
          ("missing", lambda p, c: None),
          ("empty", lambda p, c: p.write_bytes(b"")),
          ("text", lambda p, c: p.write_text("hello\n")),
          ("truncated", truncated),
          ("a bare state_dict", lambda p, c: torch.save(read_checkpoint(c.ckpt)["net"], p)),
          ("a dict without the keys", lambda p, c: torch.save({"epoch": 3}, p)),
          ("a directory", lambda p, c: p.mkdir()),
      ]],
    Row("3 reproduce --epochs -1 keeps comparison.csv", "study.reproduce", lambda c: with_comparison(c, "--epochs", "-1"),
        2, "--epochs: -1 is not allowed", unchanged),
    Row("4 --resume of a finished study", "study.run", lambda c: finished_study(c, "--resume"), 0,
        "holds an ended study: nothing to resume", unchanged),
    # ---- 5-15: silently wrong
    Row("5 -data-dir /nonexistent", "csnn.train", lambda c: c.cli(data="/nonexistent"), 2,
        "/nonexistent (-data-dir): no Fashion-MNIST"),
    Row("5 --data-dir a file", "study.run", lambda c: (with_data_file(c), [str(c.space()), "--data-dir", str(c.tmp / "afile"),
                                                                         "--dry-run"])[1], 2, "(--data-dir): is a file"),
    Row("5 CSNN_DATA a file", "study.run", lambda c: (with_data_file(c), [str(c.space()), "--dry-run"])[1], 2,
        "(CSNN_DATA): is a file", env={"CSNN_DATA": "{tmp}/afile"}),
    Row("6 train and test files swapped", "study.run",
        lambda c: c.dry(c.space(), data=write_dataset(c.tmp / "sw", 100, 300)), 2,
        "are the train-* and t10k-* files swapped"),
    Row("7 objective.metric: epoch", "study.run", lambda c: c.dry(c.space(objective={"metric": "epoch", "mode": "max"})), 2,
        "objective.metric: 'epoch' cannot be optimised"),
    Row("7 objective.metric: lr", "study.run", lambda c: c.dry(c.space(objective={"metric": "lr", "mode": "min"})), 2,
        "objective.metric: 'lr' cannot be optimised"),
    Row("8 a duplicate key", "study.run", lambda c: c.dry(c.space(SPEC_TOP + "train: {T: 4}\n" + SPACE + "train: {T: 8}\n")),
        2, "key 'train' is given twice: on line 3 and on line 5"),
    Row("9 a step larger than the range", "study.run", lambda c: c.dry(c.space(space={"momentum": {
        "type": "float", "low": 0.8, "high": 0.99, "step": 0.5}})), 2, "space.momentum.step: 0.5 is larger than the range"),
    Row("9 a step that does not divide the range", "study.run", lambda c: c.dry(c.space(space={"seed": {
        "type": "int", "low": 2, "high": 9, "step": 2}})), 2, "space.seed.step: 2 does not divide the range 2..9; the nearest valid high is 8"),
    Row("10 --dry-run: val_size >= the training set", "study.run", lambda c: c.dry(c.space(train={"val_size": 300})), 2,
        "train.val_size: 300 must be smaller than the 300 training images"),
    Row("10 --dry-run: device cuda:3 absent", "study.run", lambda c: c.dry(c.space(train={"device": "cuda:3"})), 2,
        "train.device: device 'cuda:3'"),
    Row("15 train.cuda_graphs: sometimes", "study.run", lambda c: c.dry(c.space(train={"cuda_graphs": "sometimes"})), 2,
        "train.cuda_graphs: 'sometimes' is not allowed; allowed: true, false, auto"),
    Row("15 train.cuda_graphs: true for trials without a GPU", "study.run",
        lambda c: c.dry(c.space(train={"cuda_graphs": True})), 2,
        "resources.gpus_per_trial: 0 is not allowed with cuda_graphs: true"),
    Row("15 train.cuda_graphs: true with device cpu", "study.run",
        lambda c: c.dry(c.space(train={"cuda_graphs": True, "device": "cpu"})), 2,
        "cuda_graphs: true needs a CUDA GPU, and device is 'cpu'"),
    Row("10 --dry-run: device cudaXYZ", "study.run", lambda c: c.dry(c.space(train={"device": "cudaXYZ"})), 2,
        "train.device: 'cudaXYZ' is not allowed; allowed: auto, cpu, cuda, cuda:N"),
    Row("10 --dry-run: low .nan", "study.run", lambda c: c.dry(c.space(SPEC_TOP + "space: {lr: {type: float, low: .nan, high: 0.1}}\n")),
        2, "space.lr.low: nan is not allowed; must be a finite number"),
    Row("10 --dry-run: --storage a file", "study.run", lambda c: (with_data_file(c), c.dry(c.space())[:1] + [
        "--storage", str(c.tmp / "afile"), "--data-dir", str(c.data), "--dry-run"])[1], 2, "afile: is a file"),
    Row("11 momentum 50", "study.run", lambda c: c.dry(c.space(train={"momentum": 50}, space={"lr": {"type": "float", "low": 0.01, "high": 0.1}})),
        2, "train.momentum: 50 is not allowed; must be >= 0 and < 1"),
    Row("11 render.images beyond the test set", "study.run", lambda c: c.dry(c.space(render={"images": 100000})), 2,
        "render.images: 100000 is more than the 100 test images"),
    Row("11 retrain.seeds [0, 0]", "study.run", lambda c: c.dry(c.space(retrain={"seeds": [0, 0]})), 2,
        "retrain.seeds: [0, 0] is not allowed; the seeds must differ"),
    Row("11 sizes that will not fit in memory: a warning", "study.run", lambda c: c.dry(c.space(train={"batch_size": 10**7})),
        0, "warning: ", lambda c: None),
    Row("12 reproduce --trial ''", "study.reproduce", lambda c: [str(c.study()), "--trial", ""], 2, "an empty trial id is not allowed"),
    Row("12 reproduce --epochs 0", "study.reproduce", lambda c: with_comparison(c, "--epochs", "0"), 2,
        "--epochs: 0 is not allowed; must be >= 1", unchanged),
    Row("12 analyze --top -3", "study.analyze", lambda c: [str(c.study()), "--top", "-3"], 2, "--top: -3 is not allowed"),
    Row("12 analyze --top 0", "study.analyze", lambda c: [str(c.study()), "--top", "0"], 2, "--top: 0 is not allowed"),
    Row("12 bench --train-images 0", "csnn.bench", lambda c: ["--train-images", "0"], 2, "--train-images: 0 is not allowed"),
    Row("12 bench --train-images -5", "csnn.bench", lambda c: ["--train-images", "-5"], 2, "--train-images: -5 is not allowed"),
    Row("13+14 report.md of digit ids, no placeholders", "study.analyze", lambda c: [str(c.study())], 0, "report:",
        lambda c: (report_has_no_placeholders(c), ids_stay_strings(c))),
    Row("15 only trials.csv (parquet deleted)", "results.load",
        damaged(lambda d: (d / "trials.parquet").unlink()), 0, "", read_csv_only),
    Row("15 trials.csv edited to disagree with trials.parquet", "results.load",
        damaged(lambda d: (d / "trials.csv").write_text((d / "trials.csv").read_text().rsplit("\n", 2)[0] + "\n")),
        0, "", warns="list different trials; read"),
    # ---- 16-22: tracebacks
    Row("16 train.device: 0", "study.run", lambda c: c.dry(c.space(train={"device": 0})), 2, "train.device: 0 is not allowed; must be a string"),
    Row("16 train.amp: 1", "study.run", lambda c: c.dry(c.space(train={"amp": 1})), 2, "train.amp: 1 is not allowed; must be true or false"),
    Row("17 a Latin-1 comment", "study.run", lambda c: c.dry(c.space((SPEC_TOP + "# caf\u00e9\n" + SPACE).encode("latin-1"))), 2,
        "line 3: not UTF-8 text (byte 0xe9)"),
    Row("17 a name with a NUL byte", "study.run", lambda c: c.dry(c.space('name: "a\\0b"\nobjective: {metric: train_loss, mode: min}\n' + SPACE)),
        2, "name: 'a\\x00b' is not allowed"),
    Row("18 --resume without spec.yaml", "study.run", lambda c: no_spec(c), 2, "not a study's (no spec.yaml"),
    Row("18 the study folder is a file", "study.run", lambda c: study_file(c), 2, "is a file, not a study folder"),
    *[Row(f"19 {cmd.split('.')[1]}: {what}", cmd, damaged(mutate),
          code, fragment, warns=warn)
      for cmd in ("results.load", "study.analyze")
      for what, mutate, code, fragment, warn in [
          ("best.yaml unreadable", write("best.yaml", b"trial_id: [1,\n"), 2, "best.yaml: unreadable best trial", None),
          ("best.yaml a list", write("best.yaml", b"- 1\n- 2\n"), 2, "best.yaml: the best trial must be a mapping", None),
          ("best.yaml without trial_id", write("best.yaml", b"objective: 1\nparams: {}\nconfig: {}\n"), 2, "without trial_id", None),
          ("best.yaml naming an unknown trial", lambda d: (d / "best.yaml").write_text(
              (d / "best.yaml").read_text().replace("00001", "99999", 1)), 2, "trial_id '99999' is not a trial of this study", None),
          ("trials.csv empty", lambda d: ((d / "trials.parquet").unlink(), (d / "trials.csv").write_bytes(b"")), 2,
           "trials.csv: unreadable trials table", None),
          ("trials.csv garbage", lambda d: ((d / "trials.parquet").unlink(), (d / "trials.csv").write_bytes(b"hello world\n1,2\n")),
           2, "trials.csv: not a table that study.run writes (no trial_id, status column)", None),
          ("trials.csv binary", lambda d: ((d / "trials.parquet").unlink(), (d / "trials.csv").write_bytes(b"\x00\xff\xfe\n")),
           2, "trials.csv: unreadable trials table", None),
          ("trials.parquet truncated", lambda d: (d / "trials.parquet").write_bytes((d / "trials.parquet").read_bytes()[:100]),
           2, "trials.parquet: unreadable trials table", None),
          ("history.csv missing", lambda d: (d / "history.csv").unlink(), 2, "history.csv: missing", None),
          ("best/summary.yaml unreadable", write("best/summary.yaml", b"{: ["), 2, "summary.yaml: unreadable retrain summary", None),
          ("best/metrics.csv unreadable", write("best/metrics.csv", b""), 2, "metrics.csv: unreadable retrain table", None),
          ("spec.yaml garbage", write("spec.yaml", b"name: [\n"), 2, "spec.yaml: unreadable study spec", None),
      ]],
    Row("19 analyze: optuna.db garbage", "study.analyze", optuna_db(b"not a database" * 100), 0, "report:", optuna_db_untouched),
    Row("19 analyze: optuna.db empty (not rewritten)", "study.analyze", optuna_db(b""), 0, "report:", optuna_db_untouched),
    Row("19 reproduce: best.yaml a list", "study.reproduce", lambda c: [*damaged(write("best.yaml", b"- 1\n"))(c)], 2,
        "best.yaml: the best trial must be a mapping"),
    Row("20 -save-es without -resume", "csnn.train", lambda c: c.cli("-save-es", c.tmp / "es"), 2, "-save-es needs -resume"),
    Row("20 -save-es with a missing -resume", "csnn.train", lambda c: c.cli("-save-es", c.tmp / "es", "-resume", c.tmp / "nope.pth"),
        2, "nope.pth is not a csnn.train checkpoint (no such file)"),
    Row("20 -save-es with a text -resume", "csnn.train", resume_with(lambda p, c: p.write_text("x"), "-save-es", "{tmp}/es"), 2,
        "is not a csnn.train checkpoint"),
    Row("20 -save-es pointing at a file", "csnn.train", lambda c: (with_data_file(c), c.cli("-save-es", c.tmp / "afile", "-resume", c.ckpt))[1],
        2, "afile: is a file; name a folder"),
    Row("21 bench -T 0", "csnn.bench", lambda c: ["-T", "0"], 2, "argument -T: 0 is not allowed"),
    Row("21 bench --batch-size 0", "csnn.bench", lambda c: ["--batch-size", "0"], 2, "--batch-size: 0 is not allowed"),
    Row("21 bench --reps 0", "csnn.bench", lambda c: ["--reps", "0"], 2, "--reps: 0 is not allowed"),
    Row("21 bench --device cuda:99", "csnn.bench", lambda c: ["--device", "cuda:99", "--data-dir", str(c.data)], 2, "device 'cuda:99'"),
    Row("21 bench a bad --data-dir", "csnn.bench", lambda c: ["--data-dir", str(c.tmp / "none")], 2, "(--data-dir): no Fashion-MNIST files"),
    # ---- clearer messages
    Row("msg an empty YAML file", "study.run", lambda c: c.dry(c.space("")), 2, "space.yaml: the file is empty"),
    Row("msg low: 1e-4 read as a string", "study.run", lambda c: c.dry(c.space(SPEC_TOP + "space: {lr: {type: float, low: 1e-4, high: 0.1}}\n")),
        2, "YAML reads 1e-4 as text; write a number with a dot and a signed exponent, e.g. 1.0e-04"),
    Row("27 objective energy_uj without a validation split (counted on the test set)", "study.run",
        lambda c: c.dry(c.space(SPEC_TOP.replace("train_loss", "energy_uj") + SPACE)), 2,
        "objective.metric: energy_uj is counted on the test set when there is no validation split"),
    Row("27 --warm-start D --warm-start file://D (one folder, two spellings)", "study.run",
        lambda c: c.dry(c.space(), "--warm-start", str(c.tmp / "old"), "--warm-start", f"file://{c.tmp}/old/"), 2,
        "given twice; its trials would be told twice"),
    Row("27 --retrain on other images than the study's", "study.run", lambda c: other_images(c, "--retrain"), 2,
        "the study was trained on other images (data fingerprint 0123456789abcdef; ", unchanged),
    Row("27 --storage ' results' (a leading space)", "study.run", lambda c: storage(c, f" {c.tmp}/r"), 2,
        "starts or ends with white space; write it without"),
    Row("27 --storage mock://x", "study.run", lambda c: storage(c, "mock://x"), 2,
        "mock:// is pyarrow's in-memory test filesystem"),
    Row("27 --resume of an all-errored study advises nothing that fails", "study.run",
        lambda c: all_errored(c, "--resume"), 0, "no trial reported the objective: nothing to resume or retrain; "
        "read it with python -m study.analyze", unchanged),
    Row("27 --resume --optuna-storage of another database", "study.run",
        lambda c: finished_study(c, "--retrain", "--optuna-storage", f"sqlite:///{c.tmp}/other.db"), 2,
        "a study resumes with the database it started with", unchanged),
    Row("27 --dry-run --no-retrain estimates no retrain", "study.run",
        lambda c: c.dry(c.space(), "--no-retrain", data=fmnist.DEBIAN_DIR), 0, "retrain 0.0 min"),  # 0.4 without
    Row("27 CSNN_CUDA_GRAPHS=maybe", "study.run", lambda c: c.dry(c.space()), 2,
        "CSNN_CUDA_GRAPHS=maybe in the environment is not allowed", env={"CSNN_CUDA_GRAPHS": "maybe"}),
    Row("27 CSNN_CUDA_GRAPHS=maybe (csnn.train)", "csnn.train", lambda c: c.cli(), 2,
        "CSNN_CUDA_GRAPHS=maybe in the environment is not allowed", env={"CSNN_CUDA_GRAPHS": "maybe"}),
    Row("27 --resume --dry-run of an ended study estimates nothing", "study.run",
        lambda c: finished_study(c, "--resume", "--dry-run"), 0, "estimate: none for nothing to run", unchanged),
    Row("27 --retrain --dry-run estimates no search", "study.run",
        lambda c: finished_study(c, "--retrain", "--dry-run"), 0, "estimate: none for a retrain alone", unchanged),
    Row("27 epochs: 10**20 (the estimate would build a list that long)", "study.run",
        lambda c: c.dry(c.space(train={"epochs": 10**20})), 2, "train.epochs: 100000000000000000000 is not allowed; "
        "must be <= 100,000"),
    Row("27 reduction_factor: 1.000000000001 (7e11 rungs)", "study.run",
        lambda c: c.dry(c.space(scheduler={"type": "asha", "reduction_factor": 1.000000000001})), 2,
        "scheduler.reduction_factor: 1.000000000001 makes 6.93e+11 rungs over 2 epochs; at most 1,000"),
    Row("27 num_samples: 10**6", "study.run", lambda c: c.dry(c.space(search={"num_samples": 10**6})), 2,
        "search.num_samples: 1000000 is not allowed; must be <= 100,000"),
    Row("27 --resume of a study started with --num-samples 2", "study.run",
        lambda c: started_with_num_samples(c, "--resume"), 0, "nothing to resume", unchanged),
    Row("27 --resume --num-samples 2 of a study started with it", "study.run",
        lambda c: started_with_num_samples(c, "--resume", "--num-samples", "2"), 0, "nothing to resume", unchanged),
    Row("27 --resume --num-samples 5 of a study started with 2", "study.run",
        lambda c: started_with_num_samples(c, "--resume", "--num-samples", "5"), 2,
        "--num-samples 5: a study keeps the number of trials it started with (2", unchanged),
    Row("msg --resume --num-samples 20 blames the flag", "study.run", lambda c: finished_study(c, "--resume", "--num-samples", "20"), 2,
        "--num-samples 20: a study keeps the number of trials it started with (3"),
    Row("msg zero training images", "study.run", data_variant(lambda f: write_dataset(f, 0, 100)), 2, "train-images-idx3-ubyte: holds no images"),
    Row("msg a gzipped file without .gz", "study.run", data_variant(gzip_in_place), 2, "looks gzipped"),
    Row("msg -resume with another configuration names the fields", "csnn.train",
        lambda c: c.cli("-resume", c.ckpt, "-lr", "0.05"), 2, "lr 0.1 in the checkpoint, 0.05 now"),
    Row("msg an unknown field under train:", "study.run", lambda c: c.dry(c.space(train={"epoch": 3})), 2,
        "train.epoch: TrainConfig has no field 'epoch'"),
    # issue 19, silent or misread
    Row("19 a YAML merge key (<<) is accepted; a key written beside it overrides", "study.run",
        lambda c: c.dry(c.space(SPEC_TOP + "space:\n  lr: &r {type: float, low: 0.01, high: 0.1, log: true}\n"
                                "  momentum: {<<: *r, low: 0.5, high: 0.9, log: false}\n")), 0, "valid",
        lambda c: merged_momentum(c)),
    Row("27 train_size: 6:40 (a YAML 1.1 base-60 integer)", "study.run",
        lambda c: c.dry(c.space(SPEC_TOP + SPACE + "train: {train_size: 6:40}\n")), 2,
        "6:40 is a base-60 number in YAML 1.1 (= 400); write the number itself, or quote it as text"),
    Row("27 two << keys in one mapping", "study.run",
        lambda c: c.dry(c.space(SPEC_TOP + "space:\n  lr: &r {type: float, low: 0.01, high: 0.1, log: true}\n"
                                "  momentum: {<<: *r, <<: *r, low: 0.5, high: 0.9, log: false}\n")), 2,
        "<< is given twice: on line 5 and on line 5; merge several mappings with one: <<: [*first, *second]"),
    Row("27 <<: [A, B] takes A's values where both have the key (YAML's merge rule)", "study.run",
        lambda c: c.dry(c.space(SPEC_TOP + "space:\n  lr: &b {type: float, low: 0.01, high: 0.1, log: true}\n"
                                "  momentum: {<<: [{type: float, low: 0.5, high: 0.9, log: false}, *b]}\n")), 0,
        "valid", lambda c: merged_momentum(c)),
    Row("27 duplicate choices", "study.run",
        lambda c: c.dry(c.space(space={"channels": {"type": "categorical", "choices": [4, 8, 4]}})), 2,
        "space.channels.choices[2]: 4 is given twice (also choices[0]); keep one"),
    Row("27 lr low 1e-300 (0 in float32)", "study.run",
        lambda c: c.dry(c.space(space={"lr": {"type": "float", "low": 1e-300, "high": 0.1, "log": True}})), 2,
        "float32 rounds it to 0: must be >= 1.175e-38"),
    Row("19 num_samples: 010 (YAML 1.1 octal)", "study.run",
        lambda c: c.dry(c.space(SPEC_TOP + SPACE + "search: {num_samples: 010}\n")), 2,
        "010 has a leading zero, which YAML reads as an octal number (8); write 10"),
    Row("19 train: []", "study.run", lambda c: c.dry(c.space(SPEC_TOP + SPACE + "train: []\n")), 2,
        "train: must be a mapping, got []"),
    Row("19 train: false", "study.run", lambda c: c.dry(c.space(SPEC_TOP + SPACE + "train: false\n")), 2,
        "train: must be a mapping, got False"),
    Row("19 when: {optimizer: []}", "study.run", lambda c: c.dry(c.space(SPEC_TOP + "space:\n  optimizer: {type: categorical, choices: [sgd, adam]}\n"
                                "  momentum: {type: float, low: 0.8, high: 0.99, when: {optimizer: []}}\n")), 2,
        "space.momentum.when.optimizer: [] can never hold: momentum would never be sampled"),
    Row("19 a YAML alias bomb as a value (415 bytes, 9**9 values)", "study.run", lambda c: c.dry(c.space(SPEC_TOP + SPACE + BOMB)), 2,
        "more than 100,000 values once its aliases (*name) are expanded"),
    Row("19 search.seed 2**32", "study.run", lambda c: c.dry(c.space(search={"seed": 2**32})), 2,
        "search.seed: 4294967296 is not allowed; must be < 2**32"),
    Row("19 train.seed 2**63", "study.run", lambda c: c.dry(c.space(train={"seed": 2**63})), 2,
        "train.seed: 9223372036854775808 is not allowed; must be < 2**63"),
    Row("19 train.split_seed 2**63", "study.run", lambda c: c.dry(c.space(train={"split_seed": 2**63})), 2,
        "train.split_seed: 9223372036854775808 is not allowed; must be < 2**63"),
    Row("19 retrain.seeds [2**64]", "study.run", lambda c: c.dry(c.space(retrain={"seeds": [2**64]})), 2,
        "retrain.seeds: [18446744073709551616] is not allowed; must be a list of integers >= 0 and < 2**63"),
    Row("19 -seed 2**64 names the flag, writes nothing", "csnn.train", lambda c: c.cli("-seed", 2**64), 2,
        "-seed: 18446744073709551616 is not allowed; must be < 2**63", lambda c: nothing_written(c)),
    Row("19 -lr 1e308 names the flag, writes nothing", "csnn.train", lambda c: c.cli("-lr", "1e308"), 2,
        "-lr: 1e+308 is not allowed; must be a finite number <= 3.403e+38", lambda c: nothing_written(c)),
    Row("19 --address 127.0.0.1:abc", "study.run", lambda c: c.dry(c.space(), "--address", "127.0.0.1:abc"), 2,
        "--address 127.0.0.1:abc: not a Ray address; give HOST:PORT"),
    Row("19 --address a closed port (Ray would retry for ever)", "study.run",
        lambda c: c.dry(c.space(), "--address", f"127.0.0.1:{closed_port()}"), 2, "nothing answers there"),
    Row("19 --address ray:// a closed port", "study.run",
        lambda c: c.dry(c.space(), "--address", f"ray://127.0.0.1:{closed_port()}"), 2, "nothing answers there"),
    Row("19 RAY_ADDRESS a closed port", "study.run", lambda c: c.dry(c.space()), 2,
        "RAY_ADDRESS 127.0.0.1:1: nothing answers there", env={"RAY_ADDRESS": "127.0.0.1:1"}),
    Row("19 cpus_per_trial below Ray's 0.0001", "study.run", lambda c: c.dry(c.space(resources={"cpus_per_trial": 1e-5})),
        2, "resources.cpus_per_trial: 1e-05 is not allowed; must be >= 0.0001"),
    Row("19 retrain.pick knee with one objective (was ignored)", "study.run",
        lambda c: c.dry(c.space(retrain={"pick": "knee"})), 2,
        "retrain.pick: 'knee' chooses a point of a Pareto front, and this study has one objective"),
    Row("19 --resume of a study ended with --no-retrain leaves it alone", "study.run",
        lambda c: (finished_study(c, "--resume"), no_best(c))[0], 0, "nothing to resume",
        lambda c: no_best(c, check=True)),
    Row("19 --optuna-storage foo://x", "study.run", lambda c: c.dry(c.space(), "--optuna-storage", "foo://x"), 2,
        "--optuna-storage foo://x: not a database URL Optuna can use"),
    Row("19 --optuna-storage a driver not installed", "study.run",
        lambda c: c.dry(c.space(), "--optuna-storage", "postgresql://u:p@127.0.0.1:1/db"), 2,
        "its database driver is not installed"),
    Row("19 --optuna-storage a folder that does not exist", "study.run",
        lambda c: c.dry(c.space(), "--optuna-storage", "sqlite:////nonexistent/optuna.db"), 2,
        "the folder /nonexistent does not exist"),
    Row("19 --optuna-storage a file that is not a database", "study.run",
        lambda c: (with_data_file(c), c.dry(c.space(), "--optuna-storage", f"sqlite:///{c.tmp}/afile"))[1], 2,
        "afile is not a SQLite database"),
    Row("19 --optuna-storage already holding a study of that name", "study.run",
        lambda c: (optuna_db_with(c, "hand"), c.dry(c.space(), "--optuna-storage", f"sqlite:///{c.tmp}/o.db"))[1], 2,
        "already holds an Optuna study named 'hand'"),
    Row("27 study.analyze of a folder holding only spec.yaml (a start that stopped)", "study.analyze",
        lambda c: (stuck_folder(c), [str(c.tmp / "results" / "hand")])[1], 2,
        "holds only what a run writes before Ray records its first trial: nothing to read yet",
        lambda c: not_written(c.tmp / "results" / "hand" / "report")),
    Row("19 --resume of a folder holding only spec.yaml (a start that stopped)", "study.run",
        lambda c: (stuck_folder(c), [str(c.space()), "--storage", str(c.tmp / "results"), "--data-dir", str(c.data),
                                     "--resume"])[1], 2, "holds only what a run writes before Ray records its first "
        "trial; start the study: python -m study.run "),
    Row("19 name with '?'", "study.run", lambda c: c.dry(c.space(named("a?b"))), 2, "name: 'a?b' is not allowed"),
    Row("19 name with %2F", "study.run", lambda c: c.dry(c.space(named("a%2Fb"))), 2, "name: 'a%2Fb' is not allowed"),
    Row("19 name longer than a file name may be", "study.run", lambda c: c.dry(c.space(named("n" * 300))), 2,
        "is not allowed; must be a folder name: printable, at most 100 bytes"),
    Row("19 --storage ''", "study.run", lambda c: storage(c, ""), 2, "--storage '': empty"),
    Row("19 --storage file:/x (one slash)", "study.run", lambda c: storage(c, f"file:{c.tmp}/x"), 2,
        f"a URI with one slash, which would be a local folder named 'file:'; write file:///"),
    Row("19 --storage s3:/bucket/x (one slash)", "study.run", lambda c: storage(c, "s3:/bucket/x"), 2,
        "write s3://bucket/x"),
    Row("19 --storage a local path with '?'", "study.run", lambda c: storage(c, f"{c.tmp}/r?x"), 2,
        "a local folder with '?' or '#' in its name is read otherwise in the Optuna database's URL"),
    Row("19 --storage file:// with options", "study.run", lambda c: storage(c, f"file://{c.tmp}/r?foo=1"), 2,
        "a file:// URI takes no options"),
    Row("19 --storage below a file", "study.run", lambda c: (with_data_file(c), storage(c, f"{c.tmp}/afile/sub"))[1], 2,
        "afile is a file, so no folder can be made below it"),
    Row("19 --storage under /proc", "study.run", lambda c: storage(c, "/proc/csnn-results"), 2,
        "--storage /proc/csnn-results: /proc cannot be written (proc)"),
    Row("19 -resume another folder's checkpoint into a folder holding a run", "csnn.train",
        lambda c: (cli_existing_run(c), c.cli("-resume", half_run(c), "-train-size", 32, "-test-size", 16,
                                               epochs=2))[1], 2,
        "already holds a run (checkpoint_latest.pth, checkpoint_max.pth); " , unchanged),
    Row("19 analyze: a file named report in the study", "study.analyze",
        damaged(lambda d: (d / "report").write_text("mine")), 2, "report: is a file, where the report folder goes"),
    Row("19 analyze: spec.yaml replaced by one of other objectives", "study.analyze",
        damaged(lambda d: replace_spec(d, objective={"metric": "val_loss", "mode": "min"})), 2,
        "its objectives (val_loss) are not those"),
    Row("19 analyze: spec.yaml replaced by one of other parameters", "study.analyze",
        damaged(lambda d: replace_spec(d, space={"momentum": {"type": "float", "low": 0.5, "high": 0.9}})), 2,
        "searches momentum, which the trials in"),
    Row("19 bench --train-images beyond the data names the flag", "csnn.bench",
        lambda c: ["--train-images", "999999", "--data-dir", str(c.data)], 2, "--train-images 999999 is more than"),
    Row("19 bench --channels 100000 names the flag and the memory", "csnn.bench", lambda c: ["--channels", "100000"], 2,
        "--channels 100000: the network's weights, gradients and momentum alone take 88,736 GiB"),
    Row("19 csnn.train -out-dir a file", "csnn.train",
        lambda c: (with_data_file(c), c.cli()[:-2] + ["-out-dir", str(c.tmp / "afile")])[1], 2,
        "afile: cannot make"),
    Row("19 baseline: true with Adam and T 2 fixed (ran something else as the tutorial's)", "study.run",
        lambda c: c.dry(c.space(search={"baseline": True}, space={
            "channels": {"type": "categorical", "choices": [4, 128]},
            "lr": {"type": "float", "low": 0.003, "high": 0.3, "log": True}})), 2,
        "search.baseline: the tutorial's configuration cannot run in this study: train fixes T 2 (the tutorial's 4), "
        "optimizer adam (the tutorial's sgd)"),
    Row("19 -resume on other images", "csnn.train",
        lambda c: c.cli("-resume", half_run(c, own=True), "-train-size", 32, "-test-size", 16, epochs=2,
                        data=write_dataset(c.tmp / "other", 300, 100, seed=1)), 2,
        "the run was trained on other images (data fingerprint", lambda c: nothing_new(c)),
    Row("19 gpus_per_trial 1.5 (pended for ever, also with --allow-pending-gpus)", "study.run",
        lambda c: c.dry(c.space(resources={"gpus_per_trial": 1.5}), "--allow-pending-gpus"), 2,
        "resources.gpus_per_trial: 1.5 is not allowed; above 1 Ray grants whole GPUs only"),
    Row("19 --retrain --no-retrain", "study.run", lambda c: finished_study(c, "--retrain", "--no-retrain"), 2,
        "--retrain and --no-retrain contradict each other"),
    # the shared code's words (train_size, backend 'auto', TrainConfig.device) as the command's flags
    Row("27 -train-size beyond the data after -val-size names both flags", "csnn.train",
        lambda c: c.cli("-val-size", 100, "-train-size", 250), 2,
        "error: -train-size 250 is more than the 200 training images left after -val-size 100"),
    Row("27 -cupy -device cpu speaks of -cupy", "csnn.train", lambda c: c.cli("-cupy"), 2,
        "error: -cupy: runs on a CUDA GPU, and -device is 'cpu'; leave -cupy out on the CPU"),
    Row("27 reproduce --device tpu names the flag", "study.reproduce",
        lambda c: [str(c.study()), "--device", "tpu", "--data-dir", str(c.data)], 2,
        "error: --device: 'tpu' is not allowed; allowed: auto, cpu, cuda, cuda:N"),
    Row("27 --optuna-storage mysql:// without its driver names the MySQL driver", "study.run",
        lambda c: c.dry(c.space(), "--optuna-storage", "mysql://u:p@127.0.0.1:1/db"), 2,
        "(No module named 'MySQLdb', which mysql:// loads): pip install mysqlclient; or name a pure-Python driver"),
    Row("27 bench --backend cupy on the CPU names bench's flags", "csnn.bench", lambda c: ["--backend", "cupy"], 2,
        "error: --backend cupy: runs on a CUDA GPU, and --device is 'cpu'; use --backend auto on the CPU"),
    Row("27 bench too silent to compare at -T 1 advises more time steps", "csnn.bench",
        lambda c: ["-T", "1", "--channels", "2", "--compile", "off", "--train-images", "100", "--eval-images", "50",
                   "--data-dir", str(c.data)], 1, "too silent to compare (the deeper layers fire with more time steps: -T 4"),
]


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def half_run(c: Ctx, own: bool = False) -> Path:
    """A checkpoint after epoch 1 of 2, made as csnn.train would (its config): in another
    folder, or (own) in the run's own folder."""
    from csnn import data as fmnist
    from csnn.train import fit

    cfg = TrainConfig.from_dict({**read_checkpoint(c.ckpt)["config"], "epochs": 2})
    folder = c.run_dir if own else c.tmp / "elsewhere"
    fit(cfg, fmnist.load(c.data), folder, stop_after=1)
    if own:
        c.before = snapshot(*folder.iterdir())
    return folder / "checkpoint_latest.pth"


def nothing_new(c: Ctx) -> None:
    """The folder holds exactly what it held: no args.txt, no event file, the checkpoint untouched."""
    assert snapshot(*c.run_dir.iterdir()) == c.before


def replace_spec(d: Path, **over) -> None:
    (d / "spec.yaml").write_text(yaml.safe_dump(specs.parse(tiny_spec("hand", **over)).to_dict(), sort_keys=False))


def storage(c: Ctx, where: str) -> list:
    return [str(c.space()), "--storage", where, "--data-dir", str(c.data), "--dry-run"]


def named(name: str) -> str:
    return yaml.safe_dump({**tiny_spec("hand"), "name": name}, sort_keys=False)


def optuna_db_with(c: Ctx, name: str) -> None:
    import optuna

    optuna.create_study(study_name=name, storage=f"sqlite:///{c.tmp}/o.db")


def not_written(path: Path) -> None:
    assert not path.exists(), path


def stuck_folder(c: Ctx) -> None:
    (c.tmp / "results" / "hand").mkdir(parents=True)
    (c.tmp / "results" / "hand" / "spec.yaml").write_text(
        yaml.safe_dump(specs.parse(tiny_spec("hand")).to_dict(), sort_keys=False))


def no_best(c: Ctx, check: bool = False) -> None:
    """A study ended with --no-retrain: no best/ (made by c.study(), removed here)."""
    best = c.tmp / "results" / "hand" / "best"
    if check:
        assert not best.exists()
    elif best.exists():
        shutil.rmtree(best)


def nothing_written(c: Ctx) -> None:
    assert not (c.tmp / "logs").exists()


def merged_momentum(c: Ctx) -> None:
    m = specs.load(c.tmp / "space.yaml").space["momentum"]
    assert (m["type"], m["low"], m["high"], m["log"]) == ("float", 0.5, 0.9, False), m


def no_spec(c: Ctx) -> list:
    argv = finished_study(c, "--resume")
    (c.tmp / "results" / "hand" / "spec.yaml").unlink()
    return argv


def study_file(c: Ctx) -> list:
    (c.tmp / "results").mkdir()
    (c.tmp / "results" / "hand").write_text("a file")
    return c.dry(c.space())[:1] + ["--storage", str(c.tmp / "results"), "--data-dir", str(c.data)]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Small data and one real checkpoint, made once for the table."""
    root = tmp_path_factory.mktemp("bad-inputs")
    data = write_dataset(root / "data", 300, 100)
    logs = root / "ckpt-logs"
    assert cli.main(["-device", "cpu", "-T", "1", "-channels", "2", "-b", "16", "-epochs", "1", "-train-size", "32",
                     "-test-size", "16", "-data-dir", str(data), "-out-dir", str(logs)]) == 0
    return data, logs / "T1_b16_sgd_lr0.1_c2" / "checkpoint_latest.pth"


@pytest.fixture(scope="module")
def options() -> dict:
    """Each command's option strings, as its --help's usage lists them."""
    import contextlib
    import io

    found = {}
    for cmd, main in COMMANDS.items():
        if cmd == "results.load":
            continue
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            main(["-h"])
        usage = out.getvalue().split("\n\n")[0].replace(f"python -m {cmd}", "")
        found[cmd] = set(re.findall(r"(?<![\w-])--?[A-Za-z][\w-]*", usage)) - {"-h", "--help"}
    return found


def misspelled(cmd: str, text: str, options: dict) -> set:
    """The flags `text` (what `cmd` printed) names in the other command line's spelling: a
    tutorial-style flag (-data-dir, -epochs) in a study command's or csnn.bench's message
    (but its own -T, -j), or a study-style one (--data-dir) in csnn.train's."""
    tutorial = options["csnn.train"]
    study = set().union(*(v for k, v in options.items() if k != "csnn.train"))
    other = study - tutorial if cmd == "csnn.train" else tutorial - options.get(cmd, set())
    return set(re.findall(r"(?<![\w-])--?[A-Za-z][\w-]*", text)) & other


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row: Row, shared, options, tmp_path, monkeypatch, capsys):
    data, ckpt = shared
    ctx = Ctx(tmp_path, data, ckpt)
    monkeypatch.delenv("CSNN_DATA", raising=False)
    for k, v in row.env.items():
        monkeypatch.setenv(k, v.format(tmp=tmp_path))
    argv = [a.format(tmp=tmp_path) if isinstance(a, str) else a for a in row.setup(ctx)]
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            code = COMMANDS[row.cmd](argv)
        except SystemExit as e:  # argparse's own errors: exit 2 with a usage line
            code = e.code
    out, err = capsys.readouterr()
    assert code == row.code, f"exit {code}, expected {row.code}\nstdout: {out[-2000:]}\nstderr: {err[-2000:]}"
    text = err if row.code else out + err
    assert row.fragment in text, f"{row.fragment!r} not in:\n{text[-2000:]}"
    assert "Traceback" not in out + err
    assert not misspelled(row.cmd, out + err, options), f"{misspelled(row.cmd, out + err, options)} in:\n{err[-2000:]}"
    if row.code == 2:
        lines = [line for line in err.strip().splitlines() if line.startswith("error:") or ": error:" in line]
        assert len(lines) == 1, err  # one line that says what is wrong
    if row.warns:
        assert any(row.warns in str(w.message) for w in caught), [str(w.message) for w in caught]
    if row.check:
        row.check(ctx)


# ---------------------------------------------------------------- beyond the table

DAMAGES = {
    "nothing": lambda d: None,
    **{f"{name} {how}": (lambda name, content: lambda d: (d / name).write_bytes(content))(name, content)
       for name in ("spec.yaml", "best.yaml", "trials.csv", "trials.parquet", "history.csv", "best/summary.yaml",
                    "best/metrics.csv")  # optuna.db: rows of the table
       for how, content in (("empty", b""), ("garbage", b"\x00\xff{[: \n,,\n"), ("a list", b"- 1\n- [2]\n"),
                            ("a number", b"3\n"))},
    **{f"{name} missing": (lambda name: lambda d: (d / name).unlink())(name)
       for name in ("trials.csv", "trials.parquet", "history.csv", "best.yaml", "best/summary.yaml", "best/metrics.csv")},
    "trials.* both missing": lambda d: ((d / "trials.csv").unlink(), (d / "trials.parquet").unlink()),
    "best.yaml names no trial": lambda d: (d / "best.yaml").write_text("trial_id: null\nobjective: 1\nparams: {}\nconfig: {}\n"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_study_raises_only_study_error(damage, shared, tmp_path, capsys):
    """results.load raises StudyError or nothing; analyze and reproduce exit 0 or 2, never a traceback."""
    ctx = Ctx(tmp_path, *shared)
    d = ctx.study()
    DAMAGES[damage](d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            results.load(d)
        except results.StudyError as e:
            assert str(e).startswith(str(d)), e  # names the file
        assert analyze.main([str(d)]) in (0, 2)
        # no data there: reproduce stops at the data at the latest, before training
        assert reproduce.main([str(d), "--data-dir", str(tmp_path / "none")]) == 2
    assert "Traceback" not in "".join(capsys.readouterr())


# environment.yaml damaged as a copy or an editor may leave it; a study's record, which nothing needs to run
ENV_DAMAGES = {"not UTF-8": b"\x00\xff{[: \n", "not YAML": b"python: [3.11,\n", "a list": b"- 1\n",
               "cut short": b"python: 3.11.2\ngit_commit: null\ngit_dirty: null\npackages:\n  torch: 2.9.0\ntorch_cu"}


def test_a_damaged_environment_yaml_is_one_warning_and_the_command_goes_on(shared, tmp_path, capsys):
    """study.reproduce and study.run --resume/--retrain compare it (warn_differences): one line naming
    the file, then on (was: silent, a line per key of a cut file, or a UnicodeDecodeError traceback)."""
    c = Ctx(tmp_path, *shared)
    argv = finished_study(c, "--resume")
    d = c.tmp / "results" / "hand"
    f = d / "environment.yaml"
    for damage, content in ENV_DAMAGES.items():
        f.write_bytes(content)
        capsys.readouterr()
        changed = environment.warn_differences(d, "--resume")  # as study.run --resume and --retrain call it
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"warning: {f}: ") and "goes on" in err, (damage, err)
        assert changed == [f"environment.yaml unreadable: {err.split(': ', 2)[2].split('; --resume')[0]}"], changed
        assert results.load(d).environment is None
    f.write_bytes(ENV_DAMAGES["not UTF-8"])
    assert run.main(argv) == 0 and "nothing to resume" in capsys.readouterr().out
    assert reproduce.main([str(d), "--epochs", "1", "--data-dir", str(c.data)]) in (0, 1)  # (a hand-made record)
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "environment" in line] == [
        f"warning: {f}: not YAML ('utf-8' codec can't decode byte 0xff in position 1: invalid start byte); this "
        "reproduction goes on without comparing its environment with the study's"], err
    table = pd.read_csv(next((d / "reproduce").glob("*/comparison.csv")))
    assert table["environment_differs"].str.startswith("environment.yaml unreadable: not YAML").all()


def wrong_value(types: tuple):
    return 0 if str in types else "x"


@pytest.mark.parametrize("name", [f.name for f in __import__("dataclasses").fields(TrainConfig)])
def test_every_train_config_field_checks_its_type(name):
    assert name in FIELD_TYPES, f"TrainConfig.{name} has no entry in config.FIELD_TYPES"
    with pytest.raises(ValueError, match=f"^TrainConfig.{name}: .* is not allowed; must be "):
        TrainConfig(**{name: wrong_value(FIELD_TYPES[name])})
    if bool not in FIELD_TYPES[name]:
        with pytest.raises(ValueError, match=f"^TrainConfig.{name}: True is not allowed"):
            TrainConfig(**{name: True})


def test_ctrl_c_during_training_prints_one_line_and_exits_130(shared, tmp_path):
    data, _ = shared
    cmd = [sys.executable, "-m", "csnn.train", "-device", "cpu", "-T", "1", "-channels", "2", "-b", "16", "-epochs", "500",
           "-train-size", "32", "-test-size", "16", "-data-dir", str(data), "-out-dir", str(tmp_path / "logs")]
    p = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    for line in p.stdout:  # wait for the first epoch to end
        if line.startswith("epoch = 0,"):
            break
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    line = err.strip().splitlines()[-1]  # (torch may log a warning line of its own before)
    m = re.fullmatch(r"interrupted after epoch (\d+); resume with -resume (\S+checkpoint_latest\.pth)", line)
    assert m, line
    assert read_checkpoint(m.group(2))["epoch"] == int(m.group(1))  # what it names is there to resume from


SAVE_FOREVER = """
import sys, torch
from pathlib import Path
from csnn.config import TrainConfig
from csnn.model import CSNN
from csnn.train import make_optimizer, save_checkpoint
cfg = TrainConfig(T=1, channels=64, device="cpu", epochs=100_000)
net = CSNN(cfg.T, cfg.channels)
opt = make_optimizer(cfg, net.parameters())
state = {"net": net, "optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs),
         "scaler": torch.amp.GradScaler("cuda", enabled=False)}
for epoch in range(cfg.epochs):
    save_checkpoint([Path(sys.argv[1]) / "checkpoint_latest.pth"], cfg, state, torch.Generator(), torch.device("cpu"),
                    epoch, {"epoch": epoch})
    print(epoch, flush=True)
"""


def test_sigkill_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    """A 13 MB checkpoint saved in a loop, killed at two moments: each time the file
    under the real name is a whole checkpoint (the save goes through a temporary name)."""
    for delay in (0.0, 0.017):
        p = subprocess.Popen([sys.executable, "-c", SAVE_FOREVER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                             env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
        first = int(p.stdout.readline())
        int(p.stdout.readline())  # a second save has begun or ended: kill somewhere inside the next ones
        time.sleep(delay)
        p.kill()
        p.wait(timeout=30)
        ckpt = read_checkpoint(tmp_path / "checkpoint_latest.pth")
        assert ckpt["epoch"] >= first + 1 and ckpt["config"]["channels"] == 64


# Every message that names a flag spells it as the command that prints it: the tutorial's
# command line (csnn.train) with one dash, the study's commands and csnn.bench with two.
SPELLINGS = [
    ("csnn.train", lambda c: c.cli(data=str(c.tmp / "none")), "-"),
    ("csnn.train", lambda c: c.cli("-device", "cuda:99"), "-"),
    ("study.run", lambda c: [str(c.space()), "--data-dir", str(c.tmp / "none"), "--dry-run"], "--"),
    ("study.reproduce", lambda c: [str(c.study()), "--device", "cuda:99", "--data-dir", str(c.data)], "--"),
    ("csnn.bench", lambda c: ["--device", "cuda:99", "--data-dir", str(c.data)], "--"),
    ("csnn.bench", lambda c: ["--data-dir", str(c.tmp / "none")], "--"),
]


@pytest.mark.parametrize("cmd,setup,dashes", SPELLINGS, ids=[f"{s[0]}-{i}" for i, s in enumerate(SPELLINGS)])
def test_messages_spell_flags_as_their_command_does(cmd, setup, dashes, shared, options, tmp_path, capsys):
    data, ckpt = shared
    c = Ctx(tmp_path, data, ckpt)
    argv = setup(c)
    capsys.readouterr()
    try:
        code = COMMANDS[cmd](argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    names = "|".join(argtypes.SHARED_FLAGS)
    flags = re.findall(rf"(?<![\w-])(--?)(?:{names})\b", err)
    assert code == 2 and flags and set(flags) == {dashes}, err  # named, and only in this command's spelling
    assert not misspelled(cmd, err, options), err
