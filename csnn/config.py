"""TrainConfig, the names the trainer reports, and the tutorial's facts, each defined once.

Imports neither torch nor SpikingJelly, so that parsing a search space (study.spec)
and reading results stay light.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

import yaml

from csnn import yamlio

# SpikingJelly's conv_fashion_mnist run that every study is measured against:
# its configuration, and the max_test_acc it reached.
TUTORIAL = {"T": 4, "channels": 128, "batch_size": 128, "epochs": 16, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9}
TUTORIAL_ACC = 0.9263
TUTORIAL_TEXT = (f"T {TUTORIAL['T']}, {TUTORIAL['channels']} channels, {TUTORIAL['optimizer'].upper()} "
                 f"lr {TUTORIAL['lr']}, {TUTORIAL['epochs']} epochs")

OPTIMIZERS = ("sgd", "adam", "adamw")
# augment's transforms of the training images, in the order applied (csnn.data.AUGMENTS holds their code);
# a value is "none" or some of them joined by "+" in this order, e.g. "crop+flip": one categorical choice.
AUGMENTS = ("crop", "flip", "erase")
LOSSES = ("mse", "ce")  # loss of the output firing rate against the label (csnn.train.LOSSES holds their code)
BACKENDS = ("auto", "cupy")  # IF kernels: auto (SpikingJelly 2's; ours compiled on the CPU) | cupy (ours, CUDA)
# Indices in CSNN.conv_fc of the spiking (IF) layers; CSNN checks its own
# layers against this when built, so a change of architecture fails there.
SPIKING_LAYERS = (2, 6, 10, 12)
# Every metric the trainer reports each epoch. val_* only when val_size > 0; fr_<i>
# (mean firing rate of the spiking layer at conv_fc[i]) and the costs are taken on
# the validation split when there is one, else on the test set. The tutorial's
# max_test_acc is the command line's own (csnn.cli), never a study's.
COST_METRICS = ("spikes_per_image", "synops_per_image", "macs_per_image", "acs_per_image", "energy_uj")
# Where a run's time went, per epoch (csnn.train.fit), in seconds: the run's set-up (data sliced, network
# built, CUDA graphs captured; in the first epoch of each fit, else 0), the training pass (with compiling, on
# a CPU run that compiles), validation, the test evaluation, the cost counting, the checkpoint, and the
# report of the epoch before (tune.report, with the checkpoint's copy to storage: an epoch's own report
# happens after its row is sent). TIME_PARTS add up to elapsed_s, the run's seconds so far. Timings, as
# TIMING_METRICS (which they join): study.reproduce compares none of them.
TIME_PARTS = ("setup_s", "train_s", "val_s", "test_s", "cost_s", "checkpoint_s", "report_s")
TIMING_METRICS = ("train_img_s", "epoch_s", *TIME_PARTS, "elapsed_s")
# The class the network predicted most often for the epoch's training images, and its share of
# them: ~1 is a dead network that fires for one class whatever the image (csnn.trainable).
PREDICTION_METRICS = ("top_class", "top_class_share")
METRICS = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc",
           *TIMING_METRICS, *(f"fr_{i}" for i in SPIKING_LAYERS), *COST_METRICS, *PREDICTION_METRICS)
# Where and how each epoch ran, reported with the metrics (not objectives): what
# study.reproduce reads to choose its tolerance, and what a user needs to find a
# slow or different trial (neuron_impl: the IF kernels that ran in training).
# cuda_graphs_used: the training steps replayed a checked CUDA graph (cuda_graphs_eval_used: the evaluations:
# each says its own); cuda_graphs_fallback: why not, on CUDA (a capture that failed, ran out of memory or
# replayed something else, CSNN_CUDA_GRAPHS=0); capture_diff: JSON, per capture the largest relative
# difference per group of tensors between the replay and the eager step (csnn.train.GRAPH_TOLERANCE bounds it).
RUN_INFO = ("run_device", "run_amp", "cuda_graphs_used", "cuda_graphs_eval_used", "cuda_graphs_fallback", "capture_diff",
            "neuron_impl", "deterministic", "torch_version", "spikingjelly_version", "cuda_version",
            "data_sha")  # data_sha: FashionMNIST.fingerprint
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 1.1754943508222875e-38  # the smallest normal float32: below it a factor flushes toward 0
# Loops are sized by epochs (training, the estimate, the rungs): a bound keeps a typo from
# becoming an endless run or a list of 10**20 entries. 100,000 is far past any real study.
MAX_EPOCHS = 100_000


def silent_layers(metrics, below: float) -> list[str]:
    """The spiking layers (fr_<i>) of one epoch's metrics (a dict or a row) that fired below `below`."""
    return [k for k in metrics.keys() if k.startswith("fr_") and metrics[k] == metrics[k] and metrics[k] < below]  # NaN: not reported


DEAD_SHARE = 0.999  # of the training images predicted as one class; measured: see csnn.trainable


def dead_network(metrics, silent_rate: float) -> str:
    """Why one epoch's metrics (a dict or a row) are a dead network's, one that fires yet
    predicts one class for (nearly) every training image, e.g. 'predicts class 3 for 100.0%
    of training images'; '' when not, or when a layer is silent (a silent network: its own
    label), or when silent_rate is 0 (which turns off both stops and both labels)."""
    share = metrics.get("top_class_share")
    if not silent_rate or share is None or share != share or share < DEAD_SHARE or silent_layers(metrics, silent_rate):
        return ""
    return f"predicts class {int(metrics['top_class'])} for {share:.1%} of training images"


# The network's choices (issue 34), each a row read by the model, the counters, the estimate and the
# checks alike; the first row of each is the tutorial's. Plain data: this module imports no torch.
# NEURONS: SpikingJelly's class (activation_based.neuron), the regular expression that finds its fused
# kernels by name in a profiler trace (SpikingJelly's Triton kernels share one name for IF, LIF and PLIF:
# the CUDA C++ ones, and our CuPy ones, name the model), the state updates it adds per neuron and step
# over IF's (decays: the leak toward the reset, which SpikingJelly's counters count as two ACs), its
# learnable parameters per layer (PLIF's w = -ln(tau - 1)), whether our CuPy kernels run it, and its CPU
# kernel: how our compiled kernel charges the membrane (csnn.model._CHARGE); tau_arg: the class's argument
# that takes TrainConfig.tau.
NEURONS = {
    "if": {"spikingjelly": "IFNode", "kernels": r"\bif_(forward|backward)\b", "decays": 0, "params": 0,
           "cupy": True, "cpu": "if", "tau_arg": None},
    "lif": {"spikingjelly": "LIFNode", "kernels": r"\blif_(forward|backward)\b", "decays": 1, "params": 0,
            "cupy": False, "cpu": "lif", "tau_arg": "tau"},
    "plif": {"spikingjelly": "ParametricLIFNode", "kernels": r"\bplif_(forward|backward)\b", "decays": 1,
             "params": 1, "cupy": False, "cpu": "plif", "tau_arg": "init_tau"},
}
# SURROGATES: the seven that SpikingJelly 2 fuses (spikingjelly/_ops/surrogate.py _SURROGATE_IDS): its class
# (activation_based.surrogate), its id in the fused kernels (and in our compiled CPU kernel, which takes
# the derivative from _ops.surrogate._surrogate_gradient), and the class's own alpha.
SURROGATES = {
    "atan": {"spikingjelly": "ATan", "id": 1, "alpha": 2.0},
    "sigmoid": {"spikingjelly": "Sigmoid", "id": 0, "alpha": 4.0},
    "piecewise_quadratic": {"spikingjelly": "PiecewiseQuadratic", "id": 2, "alpha": 1.0},
    "piecewise_exp": {"spikingjelly": "PiecewiseExp", "id": 3, "alpha": 1.0},
    "soft_sign": {"spikingjelly": "SoftSign", "id": 4, "alpha": 2.0},
    "super_spike": {"spikingjelly": "SuperSpike", "id": 5, "alpha": 1.0},
    "erf": {"spikingjelly": "Erf", "id": 6, "alpha": 2.0},
}
# POOLINGS: SpikingJelly's class (activation_based.layer, 2x2 stride 2), the ACs SpikingJelly's counters
# count per output (an average sums its 4 inputs: 3), and the CPU kernel (max: our compiled one, which
# writes no int64 indices; avg: ATen's avg_pool2d, which writes none either).
POOLINGS = {
    "max": {"spikingjelly": "MaxPool2d", "acs_per_output": 0, "cpu": "compiled"},
    "avg": {"spikingjelly": "AvgPool2d", "acs_per_output": 3, "cpu": "aten"},
}


# The TrainConfig fields that shape the network (csnn.model.CSNN's keyword arguments).
NETWORK_FIELDS = ("neuron", "tau", "v_threshold", "detach_reset", "surrogate", "alpha", "pooling", "dropout")


def neuron_text(cfg) -> str:
    """The neuron settings of a config in a few words, e.g. 'lif tau 2.0, threshold 1.0, atan alpha 2.0'."""
    tau = f" tau {cfg.tau}" if NEURONS[cfg.neuron]["decays"] else ""
    return (f"{cfg.neuron}{tau}, threshold {cfg.v_threshold}{', detach_reset' if cfg.detach_reset else ''}, "
            f"{cfg.surrogate} alpha {surrogate_alpha(cfg)}")


def surrogate_alpha(cfg) -> float:
    """The surrogate's alpha: the config's, or the surrogate's own (SURROGATES) when it gives none."""
    return float(SURROGATES[cfg.surrogate]["alpha"] if cfg.alpha is None else cfg.alpha)


COMPILE_AUTO_IMAGES = 50_000  # measured break-even on 2 CPU cores: ~13k images warm, ~80k cold


@dataclass
class TrainConfig:
    """One training run. Defaults are the tutorial's (TUTORIAL)."""

    T: int = TUTORIAL["T"]
    channels: int = TUTORIAL["channels"]
    batch_size: int = TUTORIAL["batch_size"]
    epochs: int = TUTORIAL["epochs"]
    optimizer: str = TUTORIAL["optimizer"]
    lr: float = TUTORIAL["lr"]
    momentum: float = TUTORIAL["momentum"]  # SGD only
    weight_decay: float = 0.0
    amp: bool = True  # float16 autocast + GradScaler on CUDA; ignored on the CPU
    seed: int = 0  # weights and batch order
    split_seed: int = 0  # validation split and subsets, fixed across seeds so trials compare on one split
    device: str = "auto"  # auto: cuda if available, else cpu
    val_size: int = 0  # images held out of the 60k training set for model selection
    train_size: int = 0  # stratified training subset, 0 = all
    test_size: int = 0  # stratified test subset, 0 = all
    backend: str = "auto"  # one of BACKENDS
    # Compiled CPU kernels for the IF neurons and max pooling: true, false, or auto
    # (on when the run trains >= COMPILE_AUTO_IMAGES images; compiling costs
    # about 6 s per process with a warm inductor cache, 40 s cold).
    compile: bool | str = "auto"
    # The whole training step (and evaluation) as CUDA graphs, replayed per batch: true,
    # false, or auto (on whenever the run trains on CUDA). Ignored on the CPU under auto.
    cuda_graphs: bool | str = "auto"
    # The network (issue 34): each a row of NEURONS, SURROGATES, POOLINGS; the defaults are the tutorial's.
    neuron: str = "if"  # if | lif | plif (learnable tau, Fang et al. 2021)
    tau: float = 2.0  # LIF's tau, PLIF's initial tau (> 1; SpikingJelly's default); if ignores it
    v_threshold: float = 1.0
    detach_reset: bool = False  # no gradient through the reset (SpikingJelly's detach_reset)
    surrogate: str = "atan"  # one of SURROGATES: the spike's gradient in training
    alpha: float | None = None  # the surrogate's scale; None: the surrogate's own (2.0 for atan)
    pooling: str = "max"  # max | avg
    dropout: float = 0.0  # before each linear layer, one mask per image for all T steps (PLIF: 0.5)
    # -- training-image augmentation and the loss (issue 34); defaults: the tutorial's --
    augment: str = "none"  # "none" or AUGMENTS joined by "+" (crop: shifts <= 2 px, flip: horizontal, erase: random erasing)
    loss: str = "mse"  # one of LOSSES: mse (the tutorial's) | ce (cross-entropy on the scaled rate: csnn.train.CE_SCALE)

    def __post_init__(self):
        # Types first, for every field, so that a wrong type (device: 0) is named
        # here rather than failing as an AttributeError in a value check below.
        for f in dataclasses.fields(self):
            value, allowed = getattr(self, f.name), FIELD_TYPES.get(f.name)
            if allowed is not None and (isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed)):
                raise ValueError(f"TrainConfig.{f.name}: {value!r} is not allowed; must be {TYPE_WORDS[allowed]}"
                                 + yaml_number_hint(value) + (yaml_bool_hint(f.name, value) if allowed == (str,) else ""))
        for name in ("T", "channels", "batch_size", "epochs", "lr"):
            value = getattr(self, name)
            if not value > 0:  # also false for NaN
                raise ValueError(f"TrainConfig.{name}: {value!r} is not allowed; must be a number > 0")
        if self.epochs > MAX_EPOCHS:
            raise ValueError(f"TrainConfig.epochs: {self.epochs!r} is not allowed; must be <= {MAX_EPOCHS:,}")
        for name in ("seed", "split_seed", "val_size", "train_size", "test_size", "weight_decay"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"TrainConfig.{name}: {value!r} is not allowed; must be {TYPE_WORDS[FIELD_TYPES[name]]} >= 0")
        for name in ("seed", "split_seed"):  # stored as int64 (trials.parquet, pandas), taken by torch's generators
            if getattr(self, name) >= 2**63:
                raise ValueError(f"TrainConfig.{name}: {getattr(self, name)!r} is not allowed; must be < 2**63")
        if not 0 <= self.momentum < 1:  # momentum >= 1 makes SGD's step grow without bound
            raise ValueError(f"TrainConfig.momentum: {self.momentum!r} is not allowed; must be >= 0 and < 1")
        for name in ("lr", "weight_decay"):  # the optimizers step float32 weights: the factor must be a float32
            if not math.isfinite(getattr(self, name)) or abs(getattr(self, name)) > FLOAT32_MAX:
                raise ValueError(f"TrainConfig.{name}: {getattr(self, name)!r} is not allowed; must be a finite number "
                                 f"<= {FLOAT32_MAX:.4g} (the largest float32)")
            if 0 < abs(getattr(self, name)) < FLOAT32_TINY:  # 1e-300 is 0 in float32: it would train nothing
                raise ValueError(f"TrainConfig.{name}: {getattr(self, name)!r} is not allowed; float32 rounds it to 0: "
                                 f"must be {'0 or ' if name == 'weight_decay' else ''}>= {FLOAT32_TINY:.4g} (the smallest normal float32)")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"TrainConfig.optimizer: {self.optimizer!r} is not allowed; allowed: {', '.join(OPTIMIZERS)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"TrainConfig.backend: {self.backend!r} is not allowed; allowed: {', '.join(BACKENDS)}")
        if self.backend == "cupy" and self.device == "cpu":
            raise ValueError("TrainConfig.backend: 'cupy' runs on a CUDA GPU, and device is 'cpu'; "
                             "use backend 'auto' on the CPU (our compiled CPU kernels)")
        for name in ("compile", "cuda_graphs"):
            if getattr(self, name) not in (True, False, "auto"):
                raise ValueError(f"TrainConfig.{name}: {getattr(self, name)!r} is not allowed; allowed: true, false, auto")
        if self.cuda_graphs is True and self.device == "cpu":
            raise ValueError("TrainConfig.cuda_graphs: true needs a CUDA GPU, and device is 'cpu'; use auto or false")
        self._check_network()
        # The device is checked as a name here; whether it exists is train.resolve_device's (torch's) job.
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"TrainConfig.device: {self.device!r} is not allowed; allowed: auto, cpu, cuda, cuda:N")
        augment_names(self.augment)
        if self.loss not in LOSSES:
            raise ValueError(f"TrainConfig.loss: {self.loss!r} is not allowed; allowed: {', '.join(LOSSES)}")

    def _check_network(self) -> None:
        """The network's keys (NEURONS, SURROGATES, POOLINGS), and what cannot run together."""
        for name, table in (("neuron", NEURONS), ("surrogate", SURROGATES), ("pooling", POOLINGS)):
            if getattr(self, name) not in table:
                raise ValueError(f"TrainConfig.{name}: {getattr(self, name)!r} is not allowed; allowed: {', '.join(table)}")
        for name, low, strict in (("tau", 1, True), ("v_threshold", 0, True), ("alpha", 0, True), ("dropout", 0, False)):
            value = getattr(self, name)
            if value is None and name == "alpha":
                continue
            if not math.isfinite(value) or not (value > low if strict else value >= low) or abs(value) > FLOAT32_MAX:
                raise ValueError(f"TrainConfig.{name}: {value!r} is not allowed; must be a finite number "
                                 f"{'>' if strict else '>='} {low}" + (" (tau <= 1 makes the leak overshoot)" if name == "tau" else ""))
        if not self.dropout < 1:
            raise ValueError(f"TrainConfig.dropout: {self.dropout!r} is not allowed; must be >= 0 and < 1")
        if self.backend == "cupy":  # our CuPy kernels compute the tutorial's neuron only
            tutorial = TrainConfig.__dataclass_fields__
            other = [f"{k} {getattr(self, k)!r}" for k in ("neuron", "v_threshold", "detach_reset", "surrogate")
                     if getattr(self, k) != tutorial[k].default and not (k == "neuron" and NEURONS[self.neuron]["cupy"])]
            if surrogate_alpha(self) != SURROGATES["atan"]["alpha"]:
                other.append(f"alpha {surrogate_alpha(self)!r}")
            if other:
                raise ValueError(f"TrainConfig.backend: 'cupy' runs only the tutorial's neuron (if, v_threshold 1.0, "
                                 f"atan alpha 2.0, no detach_reset), and this config has {', '.join(other)}; "
                                 "use backend 'auto' (SpikingJelly's fused kernels)")

    def network(self) -> dict:
        """The fields that shape the network, as csnn.model.CSNN's keyword arguments."""
        return {k: getattr(self, k) for k in NETWORK_FIELDS}

    def differences(self, other: "TrainConfig", ignore=("device", "cuda_graphs")) -> dict:
        """{field: (self's value, other's value)} for the fields that differ, but for where and how the
        same computation runs (a GPU graph replays exactly the eager step: tests/test_gpu.py)."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if k not in ignore and a[k] != b[k]}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        if not isinstance(d, dict):
            raise ValueError(f"a TrainConfig must be a mapping of its fields, got {d!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"TrainConfig has no field {', '.join(map(repr, unknown))}; fields: {', '.join(sorted(known))}")
        return cls(**d)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> "TrainConfig":
        return cls.from_dict(yamlio.load(text) or {})

def augment_names(augment: str) -> tuple[str, ...]:
    """The transforms of an augment value, in AUGMENTS' order: () for "none"; else ValueError naming the key."""
    if augment == "none":
        return ()
    names = augment.split("+")
    if not names or any(n not in AUGMENTS for n in names) or names != sorted(set(names), key=AUGMENTS.index):
        raise ValueError(f"TrainConfig.augment: {augment!r} is not allowed; allowed: none, or some of "
                         f"{', '.join(AUGMENTS)} joined by '+' in this order, each once (e.g. crop+flip)")
    return tuple(names)


def check_runnable(backend: str) -> None:
    """What a config needs of this machine, checked before data loads or Ray starts (a
    recorded config stays readable anywhere: TrainConfig itself checks only its values).
    backend cupy needs a CuPy that compiles our kernels (csnn.cupy_if.compile_error, no GPU
    needed); whether a CUDA GPU exists is train.resolve_device's check."""
    import importlib.util
    import os

    graphs = os.environ.get("CSNN_CUDA_GRAPHS", "").strip().lower()
    if graphs not in ("", "0", "false", "off", "no", "1", "true", "on", "yes"):  # train.GRAPHS_ENV
        raise ValueError(f"CSNN_CUDA_GRAPHS={os.environ['CSNN_CUDA_GRAPHS']} in the environment is not allowed; "
                         "0 (false, off, no) turns CUDA graphs off; leave it unset (or 1) to follow cuda_graphs")
    if backend != "cupy":
        return
    if importlib.util.find_spec("cupy") is None:
        raise ValueError("backend 'cupy' needs CuPy, which is not installed: "
                         "pip install -e '.[cupy]' (cupy-cuda13x, for torch's CUDA 13), or use backend 'auto'")
    from csnn.cupy_if import compile_error  # imports torch: only for a cupy config

    error = compile_error()
    if error:
        raise ValueError(f"backend 'cupy' cannot run here: {error}; or use backend 'auto'")


def trial_fields(config: dict) -> dict:
    """A trial's config (from Ray and Optuna) as TrainConfig fields: without the
    searcher's own names for the cases of a conditional range (lr[optimizer=sgd],
    study.spec.optuna_name), whose value also comes under the field's name (lr)."""
    return {k: v for k, v in config.items() if "[" not in k}


# The types each TrainConfig field accepts (an int is a float, as in YAML's 1 for 1.0).
FIELD_TYPES = {f: (int,) for f in ("T", "channels", "batch_size", "epochs", "seed", "split_seed",
                                   "val_size", "train_size", "test_size")}
FIELD_TYPES.update({f: (int, float) for f in ("lr", "momentum", "weight_decay")})
FIELD_TYPES.update({f: (str,) for f in ("optimizer", "device", "backend")})
FIELD_TYPES.update(amp=(bool,), compile=(bool, str), cuda_graphs=(bool, str))
FIELD_TYPES.update({f: (int, float) for f in ("tau", "v_threshold", "dropout")})
FIELD_TYPES.update({f: (str,) for f in ("neuron", "surrogate", "pooling")})
FIELD_TYPES.update(detach_reset=(bool,), alpha=(int, float, type(None)))
FIELD_TYPES.update(augment=(str,), loss=(str,))
TYPE_WORDS = {(int,): "an integer", (int, float): "a number", (str,): "a string", (bool,): "true or false",
              (bool, str): "true, false or auto", (int, float, type(None)): "a number, or null (the surrogate's own)"}


def yaml_number_hint(value) -> str:
    """A string where a number belongs: YAML 1.1 (PyYAML) reads 1e-4 as a string, so say how to write it
    as a number; a string YAML would read as a number was quoted by its writer, so say to drop the quotes."""
    if isinstance(value, str):
        try:
            x = float(value)
        except ValueError:
            return ""
        try:
            as_written = yamlio.load(value)
        except yaml.YAMLError:
            as_written = value
        if isinstance(as_written, (int, float)) and not isinstance(as_written, bool):
            return f" (quoted, {value!r} is text: write it without quotes, {value})"
        return f" (YAML reads {value} as text; write a number with a dot and a signed exponent, e.g. {x:.1e})"
    return ""


def yaml_bool_hint(name: str, value) -> str:
    """true or false where a name belongs: YAML 1.1 reads off, no, false (on, yes, true) as a boolean."""
    if not isinstance(value, bool):
        return ""
    words = "off, no and false" if value is False else "on, yes and true"
    instead = {"augment": "none for no augmentation"}.get(name, "one of the names")
    return f" (YAML reads {words} as {str(value).lower()}: write {instead})"
