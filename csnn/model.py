"""The CSNN of SpikingJelly's Fashion-MNIST tutorial, and its spiking encoder."""
from __future__ import annotations

import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, layer, neuron, surrogate

BACKENDS = ("auto", "cupy")


class CSNN(nn.Module):
    """{Conv-BN-IF-MaxPool} x2 - Flatten - Linear-IF - Linear-IF, multi-step.

    The layers sit in `conv_fc` with the tutorial's indices, so checkpoints of
    the tutorial's model load into this one and vice versa.
    """

    def __init__(self, T: int, channels: int):
        super().__init__()
        self.T = T
        c = channels
        self.conv_fc = nn.Sequential(
            layer.Conv2d(1, c, kernel_size=3, padding=1, bias=False),
            layer.BatchNorm2d(c),
            neuron.IFNode(surrogate_function=surrogate.ATan()),
            layer.MaxPool2d(2, 2),  # 14 * 14
            layer.Conv2d(c, c, kernel_size=3, padding=1, bias=False),
            layer.BatchNorm2d(c),
            neuron.IFNode(surrogate_function=surrogate.ATan()),
            layer.MaxPool2d(2, 2),  # 7 * 7
            layer.Flatten(),
            layer.Linear(c * 7 * 7, c * 4 * 4, bias=False),
            neuron.IFNode(surrogate_function=surrogate.ATan()),
            layer.Linear(c * 4 * 4, 10, bias=False),
            neuron.IFNode(surrogate_function=surrogate.ATan()),
        )
        functional.set_step_mode(self, step_mode="m")
        self.spiking_layers = [i for i, m in enumerate(self.conv_fc) if isinstance(m, neuron.IFNode)]

    def forward(self, x: torch.Tensor, rates: list | None = None) -> torch.Tensor:
        """x [N, 1, 28, 28] -> firing rate of the output layer [N, 10].

        The input is the same image at every time step, so the first Conv2d +
        BatchNorm (no state, no spikes) is computed once per image and repeated
        T times: the same function as the tutorial's repeat-then-convolve,
        T times cheaper. When `rates` is a list, the mean firing rate of each
        spiking layer is appended to it (as 0-dim tensors: no host sync).
        """
        y = self.conv_fc[1](self.conv_fc[0](x.unsqueeze(0)))  # [1, N, C, H, W]
        y = y.expand(self.T, -1, -1, -1, -1)
        for i in range(2, len(self.conv_fc)):
            y = self.conv_fc[i](y)
            if rates is not None and i in self.spiking_layers:
                rates.append(y.detach().float().mean())
        return y.mean(0)

    def forward_literal(self, x: torch.Tensor) -> torch.Tensor:
        """The tutorial's forward, verbatim: repeat the image T times, run all layers."""
        return self.conv_fc(x.unsqueeze(0).repeat(self.T, 1, 1, 1, 1)).mean(0)

    def spiking_encoder(self) -> nn.Sequential:
        return self.conv_fc[0:3]


def set_backend(net: nn.Module, backend: str) -> None:
    """'auto': SpikingJelly 2.x picks its kernels (Torch on CPU, CUDA/Triton on GPU).
    'cupy': the legacy CuPy kernels of SpikingJelly < 2, which must be installed."""
    if backend == "auto":
        return
    if backend != "cupy":
        raise ValueError(f"backend: {backend!r} is not allowed; allowed: {', '.join(BACKENDS)}")
    if not hasattr(functional, "set_backend"):
        import spikingjelly

        raise RuntimeError(
            f"backend 'cupy' needs SpikingJelly < 2 with CuPy (pip install 'spikingjelly<2' cupy-cuda12x); "
            f"the installed SpikingJelly {getattr(spikingjelly, '__version__', '2.x')} has no CuPy backend "
            "and picks its own CUDA kernels: use backend 'auto'"
        )
    try:
        import cupy  # noqa: F401
    except ImportError as e:
        raise RuntimeError("backend 'cupy' needs CuPy: pip install -e '.[cupy]' (cupy-cuda12x)") from e
    functional.set_backend(net, "cupy")
