"""Pictures of what the spiking encoder (the first Conv2d-BatchNorm2d-IFNode) does to an image."""
from __future__ import annotations

import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display, no LaTeX (titles use matplotlib's mathtext)
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from spikingjelly import visualizing  # noqa: E402
from spikingjelly.activation_based import functional  # noqa: E402

from csnn.data import to_input  # noqa: E402
from csnn.model import CSNN  # noqa: E402


def grid(channels: int) -> tuple[int, int]:
    """(nrows, ncols) for C feature maps: 8 columns, or when C is not a multiple
    of 8 the widest exact grid of fewer (plot_2d_feature_map needs nrows * ncols == C)."""
    ncols = max(d for d in range(1, 9) if channels % d == 0)
    return channels // ncols, ncols


def render(net: CSNN, images: torch.Tensor, out_dir: str | Path, overwrite: bool = False) -> Path:
    """For each image [28, 28] uint8: out_dir/<i>/input.png (4x bilinear) and
    s_<t>.png/.pdf/.svg (the encoder's C spike maps at step t), as the tutorial.

    An existing non-empty out_dir is refused, or with `overwrite` replaced whole,
    so no folder mixes pictures of two models.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out_dir} already exists and is not empty; choose another folder or remove it")
        shutil.rmtree(out_dir)
    device = next(net.parameters()).device
    x = to_input(images).to(device)  # [N, 1, 28, 28]
    encoder = net.spiking_encoder()
    was_training = net.training
    net.eval()
    with torch.no_grad():
        spikes = encoder(x.unsqueeze(0).repeat(net.T, 1, 1, 1, 1)).cpu()  # [T, N, C, H, W]
    functional.reset_net(encoder)
    net.train(was_training)
    big = F.interpolate(x.cpu(), scale_factor=4, mode="bilinear")  # 28x28 is too small to read
    nrows, ncols = grid(spikes.shape[2])
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for i in range(len(images)):
        d = tmp / str(i)
        d.mkdir(parents=True)
        Image.fromarray(big[i, 0].clamp(0, 1).mul(255).round().byte().numpy(), mode="L").save(d / "input.png")
        for t in range(net.T):
            fig, _ = visualizing.plot_2d_feature_map(spikes[t, i], nrows, ncols, 2, f"$S[{t}]$")
            for ext in ("png", "pdf", "svg"):
                fig.savefig(d / f"s_{t}.{ext}", pad_inches=0.02)
            plt.close(fig)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out_dir, ignore_errors=True)  # an empty folder that was there
    tmp.rename(out_dir)  # all or nothing: a half-rendered folder never has the final name
    return out_dir
