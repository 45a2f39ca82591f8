"""GPU-only tests: they skip here, with the reason, and `python -m csnn.gpucheck` runs them on a GPU."""
import pytest
import torch

from conftest import write_dataset
from csnn import data as fmnist
from csnn import efficiency
from csnn.model import ALPHA, CSNN, set_backend

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run python -m csnn.gpucheck on one)")


def test_amp_keeps_the_fused_kernel_and_a_float32_state():
    net = CSNN(4, 16).cuda()
    with torch.autocast("cuda", dtype=torch.float16):
        net(torch.rand(8, 1, 28, 28, device="cuda")).float().sum().backward()
    impls = net.neuron_implementations()
    assert set(impls.values()) <= {"spikingjelly-triton", "spikingjelly-cuda"}, impls
    assert all(net.conv_fc[i].v.dtype == torch.float32 for i in net.spiking_layers)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cupy_kernels_match_spikingjellys_reference_loop(dtype):
    from spikingjelly._ops.if_.reference import multi_step
    from spikingjelly.activation_based import surrogate

    from csnn.cupy_if import CupyIF

    gen = torch.Generator(device="cuda").manual_seed(1)
    x = (torch.randn(5, 3000, generator=gen, device="cuda") + 0.5).to(dtype)
    g = torch.randn(5, 3000, generator=gen, device="cuda").to(dtype)
    xr, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    sr, vr, _ = multi_step(xr, torch.zeros(3000, device="cuda"), 1.0, 0.0, surrogate.ATan(alpha=ALPHA), False)
    sr.backward(g.to(sr.dtype))
    sc, vc = CupyIF.apply(xc, ALPHA)
    sc.backward(g)
    assert sc.dtype == dtype and vc.dtype == torch.float32
    assert 0.05 < sr.float().mean() < 0.95  # both spiking and silent neurons are exercised
    assert torch.equal(sc.float(), sr.float())
    assert torch.equal(vc, vr.float())
    rtol, atol = (1e-5, 1e-6) if dtype == torch.float32 else (1e-2, 1e-3)
    torch.testing.assert_close(xc.grad.float(), xr.grad.float(), rtol=rtol, atol=atol)


def test_cupy_forward_without_autograd_is_the_same():
    from csnn import cupy_if

    x = torch.randn(4, 5000, device="cuda", generator=torch.Generator(device="cuda").manual_seed(2)) + 0.5
    spikes, h, v = cupy_if.forward(x, keep_h=False)
    assert h is None
    s2, v2 = cupy_if.CupyIF.apply(x.clone().requires_grad_(), ALPHA)
    assert torch.equal(spikes, s2.detach()) and torch.equal(v, v2)
    assert cupy_if.forward(x[:, :0].contiguous(), keep_h=False)[0].shape == (4, 0)  # no launch for no neurons


def test_cupy_backend_runs_in_the_network():
    net = CSNN(4, 8).cuda()
    set_backend(net, "cupy")
    with torch.autocast("cuda", dtype=torch.float16):
        net(torch.rand(8, 1, 28, 28, device="cuda")).float().sum().backward()
    assert set(net.neuron_implementations().values()) == {"cupy"}
    assert all(p.grad is not None and p.grad.isfinite().all() for p in net.parameters())


def test_cost_counts_do_not_depend_on_the_device():
    torch.manual_seed(0)
    net = CSNN(4, 32)
    x = torch.rand(32, 1, 28, 28)
    cpu = efficiency.count(net, x)
    cuda = efficiency.count(net.cuda(), x.cuda())
    assert cuda["macs_per_image"] == cpu["macs_per_image"]
    for k in cpu:
        assert cuda[k] == pytest.approx(cpu[k], rel=1e-3), k


def test_a_cpu_checkpoint_resumes_on_the_gpu(tmp_path):
    from csnn.config import TrainConfig
    from csnn.train import fit

    data = fmnist.load(write_dataset(tmp_path / "data", n_train=200, n_test=50))
    cfg = dict(T=2, channels=4, batch_size=50, epochs=2, amp=True)
    fit(TrainConfig(**cfg, device="cpu"), data, tmp_path / "run", stop_after=1)
    history = fit(TrainConfig(**cfg, device="cuda"), data, tmp_path / "run",
                  resume=tmp_path / "run" / "checkpoint_latest.pth")
    assert [m["epoch"] for m in history] == [1]
    assert history[0]["run_device"].startswith("cuda")


def test_evaluation_runs_in_float32_inside_an_amp_region():
    from csnn.train import evaluate

    torch.manual_seed(0)
    net = CSNN(4, 8).cuda()
    x = torch.randint(0, 256, (64, 28, 28), dtype=torch.uint8, device="cuda")
    y = torch.arange(64, device="cuda") % 10
    plain = evaluate(net, x, y, 32)
    with torch.autocast("cuda", dtype=torch.float16):
        assert evaluate(net, x, y, 32) == plain
    assert set(net.neuron_implementations().values()) <= {"spikingjelly-triton", "spikingjelly-cuda"}
