"""The CSNN of SpikingJelly's Fashion-MNIST tutorial, and its spiking encoder."""
from __future__ import annotations

import functools
import math
import os
import re

import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, layer, neuron, surrogate
from spikingjelly.activation_based.functional.neuron import _surrogate_spec

from csnn.config import BACKENDS, NEURONS, POOLINGS, SPIKING_LAYERS, SURROGATES, TrainConfig

ALPHA = SURROGATES["atan"]["alpha"]  # surrogate.ATan's default, the tutorial's
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # inputs SpikingJelly's fused IF kernels take


def _charge_if(v, x, tau, q):
    return v + x


def _charge_lif(v, x, tau, q):  # decay_input, hard reset to 0: as SpikingJelly's _ops/lif/cpu.py
    return v + (x - (v - 0.0)) / tau


def _charge_plif(v, x, tau, q):  # q = sigmoid(w) = 1 / tau: as _ops/plif/cpu.py
    return v + (x - (v - 0.0)) * q


# How each neuron model (config.NEURONS' "cpu") charges its membrane, and the share of dH that reaches the
# input (dH/dX); the rest of a leaky neuron's dH/dV flows back in time (dH/dV = 1 - dH/dX).
_CHARGE = {"if": _charge_if, "lif": _charge_lif, "plif": _charge_plif}
_INPUT_SHARE = {"if": lambda g, tau, q: g, "lif": lambda g, tau, q: g / tau, "plif": lambda g, tau, q: g * q}


@functools.cache
def _neuron_kernels(cpu: str, detach_reset: bool, surrogate_id: int):
    """The forward and backward of one neuron's multi-step dynamics (hard reset to 0), compiled: SpikingJelly's
    formulas (_ops/<model>/cpu.py) as a loop over T that the compiler fuses into one elementwise kernel each
    way, instead of SpikingJelly's loop of small ops. The model, the reset's gradient and the surrogate are
    the code; the threshold, alpha and tau come in `c` (_constants: tensors, so that a trial with another
    value runs the same compiled code; as Python numbers each value was compiled again, and past torch's
    recompile limit, 8, the uncompiled loop ran). With the tutorial's IF constants they compute exactly what
    this module's kernels computed before the other neurons."""
    from spikingjelly._ops.surrogate import _surrogate_gradient

    charge, share, leaky = _CHARGE[cpu], _INPUT_SHARE[cpu], cpu != "if"

    def forward(x_seq: torch.Tensor, q, keep_h: bool, c: torch.Tensor):
        """x_seq [T, M] -> spikes, H (when keep_h), the last V."""
        threshold, tau = c[0], c[2]
        v = torch.zeros_like(x_seq[0])
        spikes, hs = [], []
        for t in range(x_seq.shape[0]):
            h = charge(v, x_seq[t], tau, q)
            s = (h >= threshold).to(h.dtype)
            v = s * 0.0 + (1.0 - s) * h
            spikes.append(s)
            hs.append(h)
        return torch.stack(spikes), (torch.stack(hs) if keep_h else None), v

    def backward(grad_s: torch.Tensor, h: torch.Tensor, x_seq, q, c: torch.Tensor):
        """The input's gradient through T steps (the surrogate's derivative, and the reset's unless
        detached), and for PLIF sum over neurons and steps of dL/dq."""
        threshold, alpha, tau = c[0], c[1], c[2]
        grads = []
        carry = torch.zeros_like(h[0])
        gq = torch.zeros_like(h[0]) if q is not None else None
        for t in range(h.shape[0] - 1, -1, -1):
            sg = _surrogate_gradient(h[t] - threshold, alpha, surrogate_id)
            reset_grad = 1.0 - (h[t] >= threshold).to(h.dtype)
            g = grad_s[t] * sg + carry * (reset_grad if detach_reset else reset_grad + (0.0 - h[t]) * sg)
            gx = share(g, tau, q)
            grads.append(gx)
            carry = g - gx if leaky else g
            if gq is not None:  # dH_t/dq = X_t - V_{t-1}, V_{t-1} rebuilt from H_{t-1}
                if t > 0:
                    s = (h[t - 1] >= threshold).to(h.dtype)
                    previous = s * 0.0 + (1.0 - s) * h[t - 1]
                else:
                    previous = torch.zeros_like(h[0])
                gq = gq + g * (x_seq[t] - (previous - 0.0))
        return torch.stack(grads[::-1]), (gq.sum() if gq is not None else None)

    return _compiled(forward), _compiled(backward)


@functools.cache
def _constants(threshold: float, alpha: float, tau: float) -> torch.Tensor:
    """_neuron_kernels' constants as one float64 tensor on the CPU: in an expression with a float32 tensor a
    float64 0-d tensor rounds to float32 where a Python float does, so the kernels compute what they computed
    with the numbers in their code, to the bit (tests/test_model.py)."""
    return torch.tensor([threshold, alpha, tau], dtype=torch.float64)


@functools.cache
def _compiled(fn):
    # T stays static (a loop bound); the neuron count may vary without recompiling.
    return torch.compile(fn, dynamic=False)


def _mark(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    torch._dynamo.mark_dynamic(x, dim)
    return x


class _FusedNeuron(torch.autograd.Function):
    """A neuron layer's compiled kernels; w: PLIF's parameter (q = sigmoid(w)), else None."""

    @staticmethod
    def forward(ctx, x_seq, w, kernels, c):
        q = None if w is None else w.detach().float().sigmoid()
        spikes, h, v = kernels[0](_mark(x_seq), q, True, c)
        ctx.kernels, ctx.c = kernels, c
        ctx.save_for_backward(h, x_seq if w is not None else None, q)
        ctx.mark_non_differentiable(v)
        return spikes, v

    @staticmethod
    def backward(ctx, grad_s, grad_v):
        h, x_seq, q = ctx.saved_tensors
        gx, gq = ctx.kernels[1](_mark(grad_s.contiguous()), _mark(h), None if x_seq is None else _mark(x_seq), q, ctx.c)
        return gx, (None if q is None else (gq * q * (1 - q)).reshape(())), None, None


def _pool_windows(x: torch.Tensor):
    """The four elements of each 2x2 window, in max_pool2d's scan order."""
    return x[..., 0::2, 0::2], x[..., 0::2, 1::2], x[..., 1::2, 0::2], x[..., 1::2, 1::2]


def _pool_forward(x: torch.Tensor) -> torch.Tensor:
    a, b, c, d = _pool_windows(x)
    return torch.maximum(torch.maximum(a, b), torch.maximum(c, d))


def _pool_backward(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """As max_pool2d's: the whole gradient goes to the first maximum of each window
    (spikes tie all the time, so which one matters)."""
    a, b, c, d = _pool_windows(x)
    m = torch.maximum(torch.maximum(a, b), torch.maximum(c, d))
    first_a = a == m
    first_b = (b == m) & ~first_a
    first_c = (c == m) & ~(first_a | first_b)
    first_d = ~(first_a | first_b | first_c)
    top = torch.stack([grad * first_a, grad * first_b], -1)
    bottom = torch.stack([grad * first_c, grad * first_d], -1)
    return torch.stack([top, bottom], -3).reshape(x.shape)


class _FusedPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return _compiled(_pool_forward)(_mark(x, 0))

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return _compiled(_pool_backward)(_mark(grad.contiguous(), 0), _mark(x, 0))


class MaxPool2d(layer.MaxPool2d):
    """SpikingJelly's MaxPool2d(2, 2). With `fused` set, on the CPU it runs as a
    compiled kernel with max_pool2d's exact values and gradients; the ATen
    kernel (which also writes int64 indices) was a fifth of training time."""

    fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.fused and self.step_mode == "m" and x.device.type == "cpu" and x.dtype == torch.float32
                and x.shape[-1] % 2 == 0 and x.shape[-2] % 2 == 0):
            return super().forward(x)
        flat = x.flatten(0, 1).contiguous()
        out = _FusedPool.apply(flat) if torch.is_grad_enabled() and flat.requires_grad \
            else _compiled(_pool_forward)(_mark(flat, 0))
        return out.view(*x.shape[:2], *out.shape[1:])


class SpikingNeuron:
    """What our neurons add to SpikingJelly's (IFNode, LIFNode, ParametricLIFNode: the rows of
    config.NEURONS, hard reset to 0, decay_input): the membrane potential kept in float32 whatever
    the input dtype, and a choice of kernels (`kernel`):

    - "spikingjelly": SpikingJelly's own; on CUDA its fused Triton kernel,
      which needs a float32 state: SpikingJelly would make the state float16
      under AMP and silently fall back to its Python reference loop;
    - "compiled": on the CPU, two compiled elementwise kernels (forward; surrogate
      backward, PLIF's tau included) instead of SpikingJelly's loop of small ops,
      same formulas, about 8x faster there for IF (docs/performance.md);
    - "cupy": on CUDA, our CuPy kernels (csnn.cupy_if), the tutorial's -cupy, for the
      tutorial's neuron only (TrainConfig refuses cupy with any other);
    - "reference": SpikingJelly's reference formulas as plain ATen ops on any
      device, so that the cost counters see the same operators everywhere.

    Where the chosen kernel does not apply (state carried between calls, another
    dtype or device) SpikingJelly's runs. `implementation` says what ran last.
    """

    kernel = "spikingjelly"
    implementation: str | None = None
    model = "if"  # its row of config.NEURONS

    def materialize_states(self, inputs, states, step_mode):
        v, x = states[0], inputs[0][0] if step_mode == "m" else inputs[0]
        if isinstance(v, float):
            return (torch.full_like(x, v, dtype=torch.float32), *states[1:])
        if isinstance(v, torch.Tensor) and v.shape == x.shape:  # a carried state: never through float16
            return (v.to(device=x.device, dtype=torch.float32), *states[1:])
        states = super().materialize_states(inputs, states, step_mode)
        return (states[0].float(), *states[1:])

    def _kernel_args(self):
        """(cpu, threshold, detach_reset, surrogate id, alpha, tau) for _neuron_kernels, or None where
        our kernels do not compute this layer (a surrogate SpikingJelly does not fuse, a soft reset)."""
        spec = _surrogate_spec(self.surrogate_function)
        if spec is None or self.v_reset != 0.0 or not getattr(self, "decay_input", True):
            return None
        return (NEURONS[self.model]["cpu"], float(self.v_threshold), bool(self.detach_reset), spec[0], spec[1],
                float(getattr(self, "tau", 2.0)))

    def multi_step_forward(self, x_seq: torch.Tensor, *args, **kwargs):
        fresh = isinstance(self.v, float) and self.v == 0.0 and not args and not kwargs
        device, dtype = x_seq.device.type, x_seq.dtype
        w = getattr(self, "w", None)  # PLIF's
        grad = torch.is_grad_enabled() and (x_seq.requires_grad or w is not None and w.requires_grad)
        flat = x_seq.reshape(x_seq.shape[0], -1)
        spec = self._kernel_args() if fresh else None
        if spec and self.kernel == "compiled" and device == "cpu" and dtype == torch.float32:
            flat = flat.contiguous()
            kernels, c = _neuron_kernels(spec[0], spec[2], spec[3]), _constants(spec[1], spec[4], spec[5])
            q = None if w is None else w.detach().float().sigmoid()
            spikes, v = _FusedNeuron.apply(flat, w, kernels, c) if grad else kernels[0](_mark(flat), q, False, c)[::2]
            self.implementation = "compiled-cpu"
        elif (spec and spec == ("if", 1.0, False, 1, ALPHA, spec[5]) and self.kernel == "cupy" and device == "cuda"
              and dtype in (torch.float32, torch.float16)):
            from csnn import cupy_if

            T, base = x_seq.shape[0], x_seq._base
            if (T > 1 and x_seq.stride(0) == 0 and base is not None and base.is_contiguous()
                    and base.data_ptr() == x_seq.data_ptr() and base.numel() == x_seq[0].numel()):
                # one input repeated T times (CSNN.forward's expand): the kernels read it once, and
                # the gradient goes to it directly, summed over the steps, not through T copies
                flat = base.view(1, -1)
            else:
                flat = flat.contiguous()
            spikes, v = cupy_if.CupyIF.apply(flat, T, ALPHA) if grad else cupy_if.forward(flat, T, False)[::2]
            self.implementation = "cupy"
        elif spec and self.kernel == "reference":
            spikes, v = _REFERENCE[spec[0]](self, flat, spec)
            self.implementation = "spikingjelly-reference"
        else:
            spikes = super().multi_step_forward(x_seq, *args, **kwargs)
            # what ran, read off the state it ran with: SpikingJelly falls back without a float32 state
            fp32_state = isinstance(self.v, torch.Tensor) and self.v.dtype == torch.float32
            self.implementation = spikingjelly_implementation(x_seq, self.surrogate_function) if fp32_state \
                else "spikingjelly-reference"
            return spikes
        self.v = v.view(x_seq.shape[1:])  # the state SpikingJelly would keep, until reset_net
        return spikes.view(x_seq.shape)


def _reference_if(node, flat, spec):
    from spikingjelly._ops.if_.reference import _forward_impl

    spikes, v, _ = _forward_impl(flat, torch.zeros_like(flat[0], dtype=torch.float32), spec[1], 0.0, spec[2],
                                 spec[4], False, spec[3])
    return spikes, v


def _reference_lif(node, flat, spec):
    from spikingjelly._ops.lif.reference import _forward_impl

    spikes, v, _ = _forward_impl(flat, torch.zeros_like(flat[0], dtype=torch.float32), spec[5], True, spec[1], 0.0,
                                 spec[2], spec[4], False, spec[3])
    return spikes, v


def _reference_plif(node, flat, spec):
    from spikingjelly._ops.plif.reference import _forward_impl

    spikes, v, _ = _forward_impl(flat, torch.zeros_like(flat[0], dtype=torch.float32), node.w, True, spec[1], 0.0,
                                 spec[2], spec[4], False, spec[3])
    return spikes, v


# SpikingJelly's reference formulas per neuron model (config.NEURONS' "cpu"): what the counters count.
_REFERENCE = {"if": _reference_if, "lif": _reference_lif, "plif": _reference_plif}


class IFNode(SpikingNeuron, neuron.IFNode):
    model = "if"


class LIFNode(SpikingNeuron, neuron.LIFNode):
    model = "lif"


class PLIFNode(SpikingNeuron, neuron.ParametricLIFNode):
    model = "plif"


class Linear(layer.Linear):
    """SpikingJelly's Linear after a dropout, as PLIF's network has it (TrainConfig.dropout): SpikingJelly's
    multi-step layer.Dropout, one mask per image shared by all T steps, made again after each
    functional.reset_net (each batch). The dropout holds no state_dict entry: the keys stay the Linear's."""

    def __init__(self, *args, dropout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.dropout = layer.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.dropout(x))


def spikingjelly_implementation(x_seq: torch.Tensor, surrogate_function) -> str:
    """Which of SpikingJelly 2's IF implementations its multi-step IFNode runs for
    this input, given a float32 state: the conditions of its functional.if_multi_step.
    On CUDA it is not derived but observed (observe_if_kernels): "spikingjelly" here."""
    if _surrogate_spec(surrogate_function) is None or x_seq.dtype not in FUSED_DTYPES:
        return "spikingjelly-reference"
    return "spikingjelly-cpu" if x_seq.device.type != "cuda" else "spikingjelly"


def if_kernel(name: str) -> tuple[str, str] | None:
    """(implementation, "forward" or "backward") of a GPU kernel that runs spiking neurons (any row of
    config.NEURONS: its "kernels"), from its name in a profiler trace; None for any other kernel.
    SpikingJelly's reference loop runs as plain elementwise kernels: it has none."""
    m = re.fullmatch(r"csnn_if_(forward|backward)_f(16|32)", name)  # ours (csnn.cupy_if)
    if m:
        return "cupy", m[1]
    m = re.match(r"_(forward|backward)_kernel\b", name)  # SpikingJelly's Triton kernels (_ops/<model>/triton.py)
    if m:
        return "spikingjelly-triton", m[1]
    for row in NEURONS.values():  # SpikingJelly's CUDA C++ kernels (_ops/<model>/kernels.cuh)
        m = re.search(row["kernels"], name)
        if m:
            return "spikingjelly-cuda", m[1]
    return None


neuron_kernel = if_kernel  # the name for any neuron model


_sessions = 0  # observe_if_kernels' profiler sessions in this process
_observed: dict = {}  # observe_if_kernels_once's: what each kind of step ran, in this process


def observe_if_kernels_once(key, fn, layers: int, observe=None) -> dict:
    """observe_if_kernels(fn, layers) the first time this process sees `key` (what decides which IF
    kernels run: device, AMP, each layer's kernel choice); later fn() runs unprofiled and the first
    observation is returned. A Ray worker runs many trials: one profiler session (CUPTI set up and
    torn down) per kind of step, not one per trial, while earlier trials' CUDA graphs may be alive.
    `observe`: what observes (observe_if_kernels; a test's own on the CPU)."""
    if key in _observed:
        fn()
        return dict(_observed[key])
    _observed[key] = (observe or observe_if_kernels)(fn, layers)
    return dict(_observed[key])


def observe_if_kernels(fn, layers: int) -> dict:
    """Run fn() (a forward, or a training step) under torch.profiler and count, per
    direction, the IF kernels that ran on the GPU, by implementation. `implementations`
    names them, "spikingjelly-reference" included when fewer kernels than `layers` ran in
    a direction that ran any IF work; `kernels` counts every GPU activity seen (0: the
    profiler could not see the GPU, and nothing was observed).

    CUPTI has been seen to lose the first kernel records of a profiling session, one more
    with each session in the process (pytorch/pytorch#192021): so many do-nothing kernels
    (`padding`, of which `padding_seen` reached the trace) go first, and fn's come after."""
    from torch.profiler import ProfilerActivity, profile

    global _sessions
    _sessions += 1
    # CUPTI torn down and set up again while CUDA graphs exist crashes on CUDA 12 (torch/profiler/profiler.py
    # sets this itself, but only for a profile that captures graphs): keep it up for the process
    os.environ.setdefault("TEARDOWN_CUPTI", "0")
    out: dict = {"kernels": 0, "forward": {}, "backward": {}, "padding": 16 + _sessions, "padding_seen": 0}
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(out["padding"]):
            torch.cuda._sleep(1)  # ATen's spin_kernel
        fn()
        torch.cuda.synchronize()
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if e.name.startswith("spin_kernel"):
            out["padding_seen"] += 1
            continue
        out["kernels"] += 1
        hit = if_kernel(e.name)
        if hit:
            out[hit[1]][hit[0]] = out[hit[1]].get(hit[0], 0) + 1
    impls = set(out["forward"]) | set(out["backward"])
    if sum(out["forward"].values()) < layers or out["backward"] and sum(out["backward"].values()) < layers:
        impls.add("spikingjelly-reference")
    out["implementations"] = sorted(impls) if out["kernels"] else []
    return out


NEURON_CLASSES = {cls.__bases__[1].__name__: cls for cls in (IFNode, LIFNode, PLIFNode)}  # by SpikingJelly's name
POOL_CLASSES = {"MaxPool2d": MaxPool2d, "AvgPool2d": layer.AvgPool2d}


def make_neuron(neuron: str, tau: float, v_threshold: float, detach_reset: bool, surrogate_name: str,
                alpha: float | None) -> SpikingNeuron:
    """One spiking layer from the rows of config.NEURONS and SURROGATES."""
    row, sur = NEURONS[neuron], SURROGATES[surrogate_name]
    function = getattr(surrogate, sur["spikingjelly"])(alpha=float(sur["alpha"] if alpha is None else alpha))
    kwargs = {row["tau_arg"]: float(tau)} if row["tau_arg"] else {}
    return NEURON_CLASSES[row["spikingjelly"]](v_threshold=float(v_threshold), detach_reset=detach_reset,
                                               surrogate_function=function, **kwargs)


class CSNN(nn.Module):
    """{Conv-BN-IF-MaxPool} x2 - Flatten - Linear-IF - Linear-IF, multi-step.

    The layers sit in `conv_fc` with the tutorial's indices, so checkpoints of
    the tutorial's model load into this one and vice versa. The keyword arguments
    (TrainConfig.network(), defaults the tutorial's) choose the neuron model, its
    surrogate, the pooling and a dropout before each linear layer; none moves a layer.
    """

    def __init__(self, T: int, channels: int, neuron: str = "if", tau: float = 2.0, v_threshold: float = 1.0,
                 detach_reset: bool = False, surrogate: str = "atan", alpha: float | None = None,
                 pooling: str = "max", dropout: float = 0.0):
        super().__init__()
        self.T = T
        c = channels
        spiking = functools.partial(make_neuron, neuron, tau, v_threshold, detach_reset, surrogate, alpha)
        pool = functools.partial(POOL_CLASSES[POOLINGS[pooling]["spikingjelly"]], 2, 2)
        linear = functools.partial(Linear, dropout=dropout) if dropout else layer.Linear
        self.conv_fc = nn.Sequential(
            layer.Conv2d(1, c, kernel_size=3, padding=1, bias=False),
            layer.BatchNorm2d(c),
            spiking(),
            pool(),  # 14 * 14
            layer.Conv2d(c, c, kernel_size=3, padding=1, bias=False),
            layer.BatchNorm2d(c),
            spiking(),
            pool(),  # 7 * 7
            layer.Flatten(),
            linear(c * 7 * 7, c * 4 * 4, bias=False),
            spiking(),
            linear(c * 4 * 4, 10, bias=False),
            spiking(),
        )
        functional.set_step_mode(self, step_mode="m")
        self.spiking_layers = [i for i, m in enumerate(self.conv_fc) if isinstance(m, SpikingNeuron)]
        # The metric names (fr_<i>) are written from config.SPIKING_LAYERS: keep the two in step.
        assert tuple(self.spiking_layers) == SPIKING_LAYERS, \
            f"CSNN's spiking layers are at {self.spiking_layers}; update csnn.config.SPIKING_LAYERS ({SPIKING_LAYERS})"
        self.neurons_per_image = self._count_neurons()

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "CSNN":
        return cls(cfg.T, cfg.channels, **cfg.network())

    def _count_neurons(self) -> list[int]:
        """Neurons of each spiking layer for one 28x28 image, read off the layers' outputs
        (in eval mode, so BatchNorm's running statistics stay untouched)."""
        counts = []
        with torch.no_grad():
            self.eval()
            y = torch.zeros(1, 1, 1, 28, 28)  # [T, N, C, H, W]
            for i, m in enumerate(self.conv_fc):
                y = m(y)
                if i in self.spiking_layers:
                    counts.append(y[0, 0].numel())
            functional.reset_net(self)
            self.train()
        return counts

    def fuse(self, on: bool = True) -> None:
        """Compiled CPU kernels for the spiking neurons and max pooling (see SpikingNeuron, MaxPool2d)."""
        for m in self.conv_fc:
            if isinstance(m, MaxPool2d):
                m.fused = on
            elif isinstance(m, SpikingNeuron) and m.kernel in ("spikingjelly", "compiled"):
                m.kernel = "compiled" if on else "spikingjelly"

    def neuron_implementations(self) -> dict[int, str | None]:
        """Which neuron implementation each spiking layer ran last (None: not run yet)."""
        return {i: self.conv_fc[i].implementation for i in self.spiking_layers}

    def forward(self, x: torch.Tensor, rates: list | None = None) -> torch.Tensor:
        """x [N, 1, 28, 28] -> firing rate of the output layer [N, 10].

        The input is the same image at every time step, so the first Conv2d +
        BatchNorm (no state, no spikes) is computed once per image and repeated
        T times: the same function as the tutorial's repeat-then-convolve,
        T times cheaper. When `rates` is a list, the firing rate of each spiking
        layer, per image ([N], float32, on the device: no host sync), is appended to it.
        """
        y = self.conv_fc[1](self.conv_fc[0](x.unsqueeze(0)))  # [1, N, C, H, W]
        y = y.expand(self.T, -1, -1, -1, -1)
        for i in range(2, len(self.conv_fc)):
            y = self.conv_fc[i](y)
            if rates is not None and i in self.spiking_layers:
                rates.append(y.detach().flatten(2).mean((0, 2), dtype=torch.float32))  # no float32 copy of the spikes
        return y.mean(0)

    def forward_literal(self, x: torch.Tensor) -> torch.Tensor:
        """The tutorial's forward, verbatim: repeat the image T times, run all layers."""
        return self.conv_fc(x.unsqueeze(0).repeat(self.T, 1, 1, 1, 1)).mean(0)

    def spiking_encoder(self) -> nn.Sequential:
        return self.conv_fc[0:3]


def set_backend(net: CSNN, backend: str) -> None:
    """'auto': SpikingJelly 2 picks its IF kernels (fused Triton on CUDA, our compiled
    ones on the CPU with CSNN.fuse); 'cupy': our CuPy kernels (csnn.cupy_if), CUDA only."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: {backend!r} is not allowed; allowed: {', '.join(BACKENDS)}")
    if backend == "cupy":
        from csnn import cupy_if

        missing = cupy_if.available()
        if missing:
            raise RuntimeError(f"backend 'cupy' cannot run here: {missing}; or use backend 'auto'")
    for i in net.spiking_layers:
        net.conv_fc[i].kernel = "cupy" if backend == "cupy" else "spikingjelly"
