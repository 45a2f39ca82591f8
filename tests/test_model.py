import pytest
import torch
import torch.nn.functional as F
from spikingjelly.activation_based import functional

from csnn.config import SPIKING_LAYERS
from csnn.model import CSNN, set_backend


def test_shapes_no_nan_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    net = CSNN(T=3, channels=8)
    x = torch.rand(6, 1, 28, 28)
    rates = []
    fr = net(x, rates)
    assert fr.shape == (6, 10) and not torch.isnan(fr).any()
    assert ((fr >= 0) & (fr <= 1)).all()
    assert len(rates) == 4 and all(r.shape == (6,) and ((0 <= r) & (r <= 1)).all() for r in rates)  # per image
    # each image's rate of a layer: its spikes over T steps and all the layer's neurons
    functional.reset_net(net)
    with torch.no_grad():
        assert torch.equal(rates[3], net.conv_fc(x.unsqueeze(0).repeat(3, 1, 1, 1, 1)).mean((0, 2)))
    functional.reset_net(net)
    F.mse_loss(fr, F.one_hot(torch.arange(6) % 10, 10).float()).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert net.spiking_encoder()[2].__class__.__name__ == "IFNode"


def test_layout_counted_when_built():
    net = CSNN(T=2, channels=3)
    assert net.spiking_layers == list(SPIKING_LAYERS)
    # conv1 and conv2 at 28x28 and 14x14, fc1's C*4*4 outputs, the 10 classes
    assert net.neurons_per_image == [3 * 28 * 28, 3 * 14 * 14, 3 * 4 * 4, 10]
    # the count leaves the model as built: training mode, BatchNorm's statistics untouched
    assert net.training and net.conv_fc[1].num_batches_tracked.item() == 0
    assert (net.conv_fc[1].running_mean == 0).all()


def test_first_layer_once_equals_tutorial_formulation():
    """Computing Conv2d+BatchNorm once per image and repeating it T times is the
    tutorial's repeat-then-convolve: same outputs, same gradients, same BN stats."""
    torch.manual_seed(1)
    a = CSNN(T=4, channels=8)
    b = CSNN(T=4, channels=8)
    b.load_state_dict(a.state_dict())
    x = torch.rand(16, 1, 28, 28) * 3  # scaled so that every layer spikes
    target = F.one_hot(torch.arange(16) % 10, 10).float()
    out_a = a(x)
    out_b = b.forward_literal(x)
    torch.testing.assert_close(out_a, out_b)
    F.mse_loss(out_a, target).backward()
    F.mse_loss(out_b, target).backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(a.conv_fc[1].running_mean, b.conv_fc[1].running_mean)
    torch.testing.assert_close(a.conv_fc[1].running_var, b.conv_fc[1].running_var, rtol=1e-4, atol=1e-6)
    functional.reset_net(a); functional.reset_net(b)
    a.eval(); b.eval()
    torch.testing.assert_close(a(x), b.forward_literal(x))


def test_cupy_backend_is_refused_where_it_cannot_run():
    import importlib.util

    from csnn.config import TrainConfig, check_runnable

    with pytest.raises(ValueError, match="'cupy' runs on a CUDA GPU, and device is 'cpu'; use backend 'auto'"):
        TrainConfig(backend="cupy", device="cpu")
    TrainConfig(backend="cupy", device="cuda")  # a recorded config reads anywhere
    if importlib.util.find_spec("cupy") is None:  # CI: no CuPy
        with pytest.raises(ValueError, match=r"'cupy' needs CuPy, which is not installed: pip install -e '.\[cupy\]'"):
            check_runnable("cupy")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="backend 'cupy' cannot run here"):
            set_backend(CSNN(1, 1), "cupy")
    with pytest.raises(ValueError, match="allowed: auto, cupy"):
        set_backend(CSNN(1, 1), "triton")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_membrane_potential_stays_float32_under_autocast(dtype):
    """SpikingJelly's IFNode takes its state's dtype from the input; under AMP that
    made the state float16 and SpikingJelly fall back from its fused kernel to its
    reference loop. On the CPU that choice is visible in the same place."""
    from spikingjelly.activation_based import neuron, surrogate

    theirs = neuron.IFNode(surrogate_function=surrogate.ATan(), step_mode="m")
    theirs(torch.rand(2, 3, 4).to(dtype))
    assert theirs.v.dtype == dtype  # what our IFNode fixes
    net = CSNN(T=2, channels=4)
    with torch.autocast("cpu", dtype=dtype):
        net(torch.rand(4, 1, 28, 28)).float().sum().backward()
    assert all(net.conv_fc[i].v.dtype == torch.float32 for i in net.spiking_layers)
    # not SpikingJelly's Python reference loop: its registered kernel, with float32 state
    assert set(net.neuron_implementations().values()) == {"spikingjelly-cpu"}


def test_the_implementation_that_ran_is_recorded():
    net = CSNN(T=2, channels=4)
    net(torch.rand(2, 1, 28, 28))
    assert set(net.neuron_implementations().values()) == {"spikingjelly-cpu"}
    functional.reset_net(net)
    net.fuse()
    net(torch.rand(2, 1, 28, 28))
    assert set(net.neuron_implementations().values()) == {"compiled-cpu"}


def test_fused_cpu_kernels_compute_spikingjellys_function():
    """The compiled IF and max-pool kernels (TrainConfig.compile) against
    SpikingJelly's own: same spikes, same gradients up to float rounding."""
    torch.manual_seed(2)
    ref = CSNN(T=3, channels=8)
    fused = CSNN(T=3, channels=8)
    fused.load_state_dict(ref.state_dict())
    fused.fuse()
    x = torch.rand(32, 1, 28, 28) * 3
    target = F.one_hot(torch.arange(32) % 10, 10).float()
    out_r, out_f = ref(x), fused(x)
    assert torch.equal(out_r, out_f)
    F.mse_loss(out_r, target).backward()
    F.mse_loss(out_f, target).backward()
    for (name, pr), pf in zip(ref.named_parameters(), fused.parameters()):
        torch.testing.assert_close(pf.grad, pr.grad, rtol=1e-5, atol=1e-8, msg=name)
    # the state SpikingJelly keeps until reset_net
    assert torch.equal(ref.conv_fc[12].v, fused.conv_fc[12].v)
    functional.reset_net(ref); functional.reset_net(fused)
    ref.eval(); fused.eval()
    with torch.no_grad():
        assert torch.equal(ref(x), fused(x))


@pytest.mark.parametrize("args", [("lif", 3.0, 0.75, True, "sigmoid", None), ("plif", 2.5, 1.0, False, "super_spike", 1.5)],
                         ids=["lif-sigmoid-detached", "plif-superspike"])
def test_compiled_kernels_of_every_neuron_compute_spikingjellys_function(args):
    """Our one compiled kernel (config.NEURONS' "cpu" charge, the surrogate's derivative from
    SpikingJelly's table, threshold, detach_reset) against SpikingJelly's own CPU path for a LIF
    and a PLIF layer: the same spikes and state, the same input gradients and, for PLIF, the same
    gradient for w (its learnable tau) up to float rounding."""
    from csnn.model import make_neuron

    torch.manual_seed(0)
    ref, ours = make_neuron(*args), make_neuron(*args)
    ours.load_state_dict(ref.state_dict())
    for m in (ref, ours):
        m.step_mode = "m"
    ours.kernel = "compiled"
    x = (torch.randn(4, 16, 40) * 1.5).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    s_ref, s_ours = ref(x), ours(x2)
    assert (ref.implementation, ours.implementation) == ("spikingjelly-cpu", "compiled-cpu")
    assert torch.equal(s_ref, s_ours) and torch.equal(ref.v, ours.v) and 0 < s_ref.mean() < 1
    g = torch.randn_like(s_ref)
    (s_ref * g).sum().backward()
    (s_ours * g).sum().backward()
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(ref.named_parameters(), ours.parameters(), strict=True):  # PLIF's w
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)
    functional.reset_net(ours)
    with torch.no_grad():  # evaluation: the forward alone
        assert torch.equal(ours(x), s_ref)


def test_fused_max_pool_sends_the_gradient_to_the_first_maximum():
    from spikingjelly.activation_based import layer
    from csnn.model import MaxPool2d

    torch.manual_seed(3)
    spikes = (torch.rand(2, 5, 4, 6, 6) > 0.5).float()  # [T, N, C, H, W]: ties everywhere
    grad = torch.randn(2, 5, 4, 3, 3)
    a = spikes.clone().requires_grad_()
    b = spikes.clone().requires_grad_()
    ref = layer.MaxPool2d(2, 2, step_mode="m")
    fused = MaxPool2d(2, 2, step_mode="m")
    fused.fused = True
    out_r, out_f = ref(a), fused(b)
    assert torch.equal(out_r, out_f)
    out_r.backward(grad)
    out_f.backward(grad)
    assert torch.equal(a.grad, b.grad)


def test_the_kernels_of_every_neuron_model_are_known_by_their_names():
    """neuron_impl on CUDA is read off the profiler's kernel names, from config.NEURONS' "kernels":
    SpikingJelly's CUDA C++ kernels name their model (_ops/<model>/kernels.cuh), its Triton ones do
    not (all are _forward_kernel / _backward_kernel), ours are the CuPy IF's. (No GPU here: the names
    as the sources write them.)"""
    from csnn.model import if_kernel

    assert if_kernel("void if_forward<float>(float const*, float const*, float*)") == ("spikingjelly-cuda", "forward")
    assert if_kernel("void lif_forward<c10::Half>(c10::Half const*, float const*)") == ("spikingjelly-cuda", "forward")
    assert if_kernel("void plif_backward<float>(float const*, float const*)") == ("spikingjelly-cuda", "backward")
    assert if_kernel("_backward_kernel") == ("spikingjelly-triton", "backward")
    assert if_kernel("csnn_if_forward_f16") == ("cupy", "forward")
    assert if_kernel("void at::native::vectorized_elementwise_kernel<4, lif_like_functor>") is None
    assert if_kernel("void elif_forward_helper()") is None


def test_the_bench_equivalence_check_covers_the_network_keys():
    """csnn.bench's check with a LIF network, another surrogate and average pooling: ours (compiled)
    against SpikingJelly's own LIFNode, Sigmoid and AvgPool2d in the example's network agree in every
    layer's spikes and the gradients; a reference with another tau does not."""
    import functools

    from csnn.bench import check_equivalence, reference_network
    from csnn.config import TrainConfig

    cfg = TrainConfig(T=4, channels=8, device="cpu", neuron="lif", tau=3.0, surrogate="sigmoid", pooling="avg")
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    ref = functools.partial(reference_network, **cfg.network())
    assert type(ref(T=4, channels=8).conv_fc[6]).__module__.startswith("spikingjelly.")  # SpikingJelly's, not ours
    same = check_equivalence(ref, cfg, x, torch.device("cpu"), compiled=True)
    assert same["ok"], same
    other = functools.partial(reference_network, **{**cfg.network(), "tau": 2.5})
    assert not check_equivalence(other, cfg, x, torch.device("cpu"), compiled=True)["ok"]


def test_the_bench_times_dropout_augmentation_and_the_loss_on_both_sides():
    """csnn.bench --dropout/--augment/--loss: the reference gets SpikingJelly's multi-step Dropout before each
    linear layer and the loss (ours augments, the example has no augmentation); the equivalence check runs
    without dropout (each side would draw its own masks) and passes; the result says what was timed."""
    from spikingjelly.activation_based import layer

    from csnn import bench

    ref = bench.reference_network(T=4, channels=8, dropout=0.5)
    assert [type(ref.conv_fc[i][0]) for i in (9, 11)] == [layer.Dropout] * 2 and ref.conv_fc[9][0].step_mode == "m"
    result = bench.run(device="cpu", channels=8, train_images=256, eval_images=256, reps=1, compile=False,
                       dropout=0.5, augment="crop+flip", loss="ce")
    assert result["equivalence"]["ok"] and (result["dropout"], result["augment"], result["loss"]) == (0.5, "crop+flip", "ce")
    assert result["ours_train_img_s"] > 0 and result["ref_train_img_s"] > 0


def test_another_tau_threshold_or_alpha_runs_the_same_compiled_kernels():
    """The compiled CPU kernels take tau, the threshold and alpha as tensors: a trial with other values
    compiles nothing new (as numbers in the kernels' code each value compiled again: 3 graphs more a
    LIF network, and past torch's recompile limit, 8 a function, a Ray worker ran the uncompiled loop)."""
    from torch._dynamo.utils import counters

    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 3

    def train_and_evaluate(**network):
        torch.manual_seed(0)
        net = CSNN(2, 4, neuron="lif", **network)
        net.fuse(True)
        with torch.no_grad():
            for m in net.modules():  # so that the deeper layers fire too
                if isinstance(m, torch.nn.Linear):
                    m.weight.mul_(20)
        net.train()
        with torch.autocast("cpu", enabled=False, cache_enabled=False):  # as the training step
            net(x).sum().backward()
        functional.reset_net(net)
        net.eval()
        with torch.no_grad(), torch.autocast("cpu", enabled=False):  # as evaluate
            out = net(x)
        functional.reset_net(net)
        assert set(net.neuron_implementations().values()) == {"compiled-cpu"}
        return out, net.conv_fc[0].weight.grad

    first = train_and_evaluate(tau=2.0, v_threshold=1.0, alpha=2.0)
    graphs = counters["stats"]["unique_graphs"]
    second = train_and_evaluate(tau=3.0, v_threshold=0.5, alpha=3.0)
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled for the new values
    assert not torch.equal(first[1], second[1])  # and they took effect (the first layer's gradient)
