"""What a spiking network costs per image: spikes, synaptic operations, estimated energy.

The counts come from SpikingJelly 2's own counters
(`spikingjelly.activation_based.op_counter.SimpleEnergyProfiler`), which
intercept every operator of a forward pass and count from the actual spikes:

- synaptic operations (SynOps): accumulates driven by a spike, per layer that
  receives spikes (conv2, fc1, fc2): a spike reaching a 3x3 conv with C output
  channels costs 9 C accumulates (fewer at the border), one reaching a linear
  layer costs its fan-out;
- MACs: the multiply-accumulates of the layers that see real values (the first
  Conv2d, computed once per image by our model, and the BatchNorms);
- ACs: SynOps plus the accumulates of the neurons' own updates (a leaky neuron, LIF or PLIF,
  adds its decay: ACS_PER_DECAY per neuron and step) and of average pooling (3 per output:
  its sums; the input it hands on is no longer binary, so the next layer's work counts as MACs);
- energy: E_MAC * MACs + E_AC * ACs with SpikingJelly's 45 nm figures
  (Horowitz, ISSCC 2014): E_MAC 4.6 pJ, E_AC 0.9 pJ (32-bit float). Memory
  traffic, which SpikingJelly's estimate also prices, is left out: it depends
  on the hardware far more than on the network.
"""
from __future__ import annotations

import torch
from spikingjelly.activation_based import functional
from spikingjelly.activation_based.op_counter import SimpleEnergyProfiler

from csnn.model import CSNN, MaxPool2d, SpikingNeuron

E_MAC_PJ, E_AC_PJ = 4.6, 0.9  # SimpleEnergyCostConfig's defaults, which count() uses
# A leaky neuron's decay per step (config.NEURONS' "decays") as the counters see SpikingJelly's reference
# formula v + (x - (v - v_reset)) / tau: two subtractions, two ACs; the division is neither a MAC nor an AC.
ACS_PER_DECAY = 2


def spikes_per_image(net: CSNN, rates: list[float]) -> float:
    """Spikes of all spiking layers over the T steps, from their mean firing rates."""
    return sum(r * net.T * n for r, n in zip(rates, net.neurons_per_image))


def count(net: CSNN, x: torch.Tensor) -> dict:
    """SynOps, MACs, ACs and energy per image of one forward pass over x [N, 1, 28, 28],
    in eval mode and float32. The counters match ATen operators, so the pass runs the
    same operators on every device: SpikingJelly's reference IF formulas (not a fused
    kernel, which the counters see as one opaque op) and, on CUDA, BatchNorm and
    convolution without cuDNN (whose cudnn_batch_norm they do not count). The figures
    then depend only on the network, its weights and the images."""
    pools = [m for m in net.conv_fc if isinstance(m, MaxPool2d)]
    neurons = [m for m in net.conv_fc if isinstance(m, SpikingNeuron)]
    saved = [m.fused for m in pools], [m.kernel for m in neurons], net.training
    for m in pools:
        m.fused = False
    for m in neurons:
        m.kernel = "reference"
    net.eval()
    profiler = SimpleEnergyProfiler()
    profiler.bind_model(net)
    try:
        with torch.no_grad(), torch.backends.cudnn.flags(enabled=False), profiler:
            net(x.float())
    finally:
        functional.reset_net(net)
        for m, fused in zip(pools, saved[0]):
            m.fused = fused
        for m, kernel in zip(neurons, saved[1]):
            m.kernel = kernel
        net.train(saved[2])
    report = profiler.get_report()
    n = len(x)
    return {
        "synops_per_image": report.counts["synop"] / n,
        "macs_per_image": report.counts["mac"] / n,
        "acs_per_image": report.counts["ac"] / n,
        "energy_uj": report.energy_compute_pj / n / 1e6,  # E_MAC * MACs + E_AC * ACs
    }
