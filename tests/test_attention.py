"""vc.nn.SpatialAttention3d and vc.nn.ChannelSpatialAttention3d against a plain-torch CBAM written here from the
layers' own parameters.

The reference: the channel mean and the channel max (torch.mean / Tensor.max over dim 1), stacked mean first,
torch.nn.functional.conv3d with the layer's weight and zero padding k // 2, sigmoid, times the input; the channel
half is squeeze-and-excitation from the Linear layers' parameters. Tolerances: float64 1e-12 and float32 1e-5 of
the output's largest magnitude (the only difference is the convolution's summation order: volconv's kernel
against torch's; 2 * 7^3 terms of magnitude ~1 are far inside both). gradcheck with torch's defaults in float64
on tiny volumes, over the input and the convolution's weight (a wrong gradient fails by orders of magnitude).
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import volconv as vc  # noqa: E402
from volconv.nn.blocks import ChannelAttention3d, ChannelSpatialAttention3d, SpatialAttention3d  # noqa: E402

from conftest import config_rng  # noqa: E402
from test_nn_blocks import strided_input, torch_one_thread  # noqa: E402,F401  (an autouse fixture)

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def spatial_reference(x, weight):
    """CBAM's spatial gate in plain torch: (mean_c, max_c) -> conv3d 'same' zero padding -> sigmoid -> x * gate."""
    with torch.no_grad():
        pooled = torch.cat([torch.mean(x, dim=1, keepdim=True), x.max(dim=1, keepdim=True).values], dim=1)
        pads = tuple(k // 2 for k in weight.shape[2:])
        gate = torch.sigmoid(F.conv3d(pooled, weight, padding=pads))
        return x * gate, gate


def channel_reference(x, m):
    """Squeeze-and-excitation from ChannelAttention3d's Linear parameters, in plain torch."""
    with torch.no_grad():
        squeezed = x.sum(dim=(2, 3, 4)) / x[0, 0].numel()
        hidden = torch.clamp(squeezed @ m.fc1.weight.T + m.fc1.bias, min=0)
        gate = torch.sigmoid(hidden @ m.fc2.weight.T + m.fc2.bias)
        return x * gate[:, :, None, None, None]


def scale_weight(layer, generator, scale=1.0):
    """A conv weight whose gate's logits are of order scale * 2 on unit inputs (torch's init, uniform within
    1/sqrt(fan_in), gives a flatter gate; much larger would saturate the sigmoid to exactly 0 or 1)."""
    w = layer.conv.weight
    with torch.no_grad():
        w.copy_(scale * 2 / w[0].numel() ** 0.5 * torch.randn(w.shape, dtype=w.dtype, generator=generator))


def assert_close(out, ref, dtype, context=""):
    assert out.shape == ref.shape, context
    tol = TOL[dtype] * ref.abs().max().item()
    err = (out - ref).abs().max().item()
    assert err <= tol, f"{context}: max error {err:.3g} > {tol:.3g}"


# ------------------------------------------------------------------------------------------ SpatialAttention3d

SHAPES = [((2, 3, 6, 7, 8), 7), ((3, 1, 5, 5, 5), 3), ((2, 16, 9, 4, 6), 5), ((1, 4, 3, 3, 3), 7),
          ((2, 5, 8, 6, 7), (3, 5, 1)), ((4, 2, 1, 9, 5), 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape, k", SHAPES)
def test_spatial_attention_matches_reference(shape, k, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    layer = SpatialAttention3d(k, dtype=dtype)
    scale_weight(layer, g)
    x = strided_input(shape, dtype, g)
    with torch.no_grad():
        out = layer(x)
    ref, gate = spatial_reference(x, layer.conv.weight.detach())
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out, ref, dtype, f"{shape} k={k}")
    assert_close(layer.gate(x).detach(), gate, dtype, "gate")
    # the gate is strictly inside (0, 1), one value per voxel shared by the channels
    assert gate.shape == (shape[0], 1) + shape[2:]
    assert (gate > 0).all() and (gate < 1).all()
    # the gate is not flat: a weight with the wrong padding or a swapped mean/max would show
    assert gate.std() > 1e-3


@pytest.mark.parametrize("i", range(8))
def test_spatial_attention_random_configs(i):
    r = config_rng(1804, i)
    dtype = (torch.float64, torch.float32)[i % 2]
    k = tuple(int(2 * v + 1) for v in r.integers(0, 4, 3)) if i % 3 else int(2 * r.integers(0, 4) + 1)
    shape = (int(r.integers(1, 4)), int(r.integers(1, 6))) + tuple(int(v) for v in r.integers(1, 9, 3))
    g = torch.Generator().manual_seed(i)
    layer = SpatialAttention3d(k, dtype=dtype)
    scale_weight(layer, g, float(r.uniform(0.2, 3)))
    x = strided_input(shape, dtype, g) * float(r.uniform(0.1, 10))
    with torch.no_grad():
        out = layer(x)
    assert_close(out, spatial_reference(x, layer.conv.weight.detach())[0], dtype, f"case {i}: {shape} k={k}")


def test_mean_is_the_first_channel_and_max_the_second():
    """A weight that reads only one of the two pooled maps, on an input whose mean and max differ in sign."""
    x = torch.zeros(1, 3, 3, 3, 3, dtype=torch.float64)
    x[0, 0], x[0, 1], x[0, 2] = 2.0, -4.0, -4.0      # mean -2, max 2
    layer = SpatialAttention3d(1, dtype=torch.float64)
    with torch.no_grad():
        layer.conv.weight.copy_(torch.tensor([1.0, 0.0], dtype=torch.float64).reshape(1, 2, 1, 1, 1))
        assert torch.allclose(layer.gate(x), torch.sigmoid(torch.tensor(-2.0, dtype=torch.float64)))
        layer.conv.weight.copy_(torch.tensor([0.0, 1.0], dtype=torch.float64).reshape(1, 2, 1, 1, 1))
        assert torch.allclose(layer.gate(x), torch.sigmoid(torch.tensor(2.0, dtype=torch.float64)))


def test_padding_is_zeros_and_keeps_the_size():
    """One voxel lit in a corner: with zero padding the gate's pre-activation is a pure copy of the kernel."""
    k = 5
    layer = SpatialAttention3d(k, dtype=torch.float64)
    w = torch.arange(2 * k ** 3, dtype=torch.float64).reshape(1, 2, k, k, k) / 100
    with torch.no_grad():
        layer.conv.weight.copy_(w)
    x = torch.zeros(1, 1, 4, 4, 4, dtype=torch.float64)
    x[0, 0, 0, 0, 0] = 1.0                          # mean = max = the input itself
    logit = torch.logit(layer.gate(x).detach())[0, 0]
    assert logit.shape == (4, 4, 4)
    # output voxel (a, b, c) reads input voxel (0, 0, 0) through tap (2 - a, 2 - b, 2 - c)
    expected = torch.flip((w[0, 0] + w[0, 1])[:3, :3, :3], dims=(0, 1, 2))
    expected = F.pad(expected, (0, 1, 0, 1, 0, 1))   # taps out of the kernel: nothing
    assert torch.allclose(logit, expected, atol=1e-10)


def test_unbatched_input_and_empty_batch():
    g = torch.Generator().manual_seed(7)
    layer = SpatialAttention3d(3, dtype=torch.float64)
    scale_weight(layer, g)
    x = torch.randn(4, 5, 6, 7, dtype=torch.float64, generator=g)
    out = layer(x)
    assert out.shape == x.shape
    assert torch.allclose(out, layer(x[None])[0], rtol=0, atol=1e-14)
    assert layer(torch.zeros(0, 4, 5, 6, 7, dtype=torch.float64)).shape == (0, 4, 5, 6, 7)


def test_spatial_attention_gradcheck():
    """Over the input and the convolution's weight, through the layer (torch.func.functional_call)."""
    g = torch.Generator().manual_seed(11)
    layer = SpatialAttention3d(3, workers=1, dtype=torch.float64)
    x = torch.randn(2, 3, 4, 3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(1, 2, 3, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    run = lambda x, w: torch.func.functional_call(layer, {"conv.weight": w}, (x,))  # noqa: E731
    assert torch.autograd.gradcheck(run, (x, w))
    # unbatched, and through the layer's own parameter
    scale_weight(layer, g)
    assert torch.autograd.gradcheck(layer, (x[0].detach().requires_grad_(),))


def test_spatial_attention_gradients_match_torch():
    """Gradients to the input and the weight against autograd through the plain-torch reference."""
    g = torch.Generator().manual_seed(12)
    layer = SpatialAttention3d(5, dtype=torch.float64)
    scale_weight(layer, g, 0.5)
    x = strided_input((2, 4, 6, 5, 7), torch.float64, g).requires_grad_()
    grad_out = torch.randn(2, 4, 6, 5, 7, dtype=torch.float64, generator=g)
    (layer(x) * grad_out).sum().backward()
    xr = x.detach().clone().requires_grad_()
    wr = layer.conv.weight.detach().clone().requires_grad_()
    pooled = torch.cat([xr.mean(1, keepdim=True), xr.max(1, keepdim=True).values], 1)
    (xr * torch.sigmoid(F.conv3d(pooled, wr, padding=2)) * grad_out).sum().backward()
    for got, ref, name in ((x.grad, xr.grad, "input"), (layer.conv.weight.grad, wr.grad, "weight")):
        assert torch.allclose(got, ref, rtol=0, atol=1e-11 * ref.abs().max().item()), name


# ----------------------------------------------------------------------------------- ChannelSpatialAttention3d

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("channels, reduction, kernel_size, min_hidden", [(8, 16, 7, 4), (32, 4, 3, 4),
                                                                          (5, 2, 5, 1)])
def test_channel_spatial_attention_is_channel_then_spatial(channels, reduction, kernel_size, min_hidden, dtype):
    torch.manual_seed(channels)
    g = torch.Generator().manual_seed(channels)
    m = ChannelSpatialAttention3d(channels, reduction, kernel_size, min_hidden=min_hidden, dtype=dtype)
    scale_weight(m.spatial, g)
    assert isinstance(m.channel, ChannelAttention3d) and isinstance(m.spatial, SpatialAttention3d)
    assert m.channel.hidden == max(min_hidden, channels // reduction)
    assert m.spatial.kernel_size == (kernel_size,) * 3
    x = strided_input((2, channels, 5, 6, 7), dtype, g)
    with torch.no_grad():
        out = m(x)
        # the two modules in a row, with the same parameters (a state_dict copy into fresh ones)
        ca = ChannelAttention3d(channels, reduction, min_hidden=min_hidden, dtype=dtype)
        sa = SpatialAttention3d(kernel_size, dtype=dtype)
        ca.load_state_dict(m.channel.state_dict())
        sa.load_state_dict(m.spatial.state_dict())
        assert torch.equal(out, sa(ca(x)))
        # and the plain-torch reference, in that order (the other order differs)
        ref = spatial_reference(channel_reference(x, m.channel), m.spatial.conv.weight)[0]
        assert_close(out, ref, dtype)
        other = channel_reference(spatial_reference(x, m.spatial.conv.weight)[0], m.channel)
        assert (other - ref).abs().max() > 100 * TOL[dtype] * ref.abs().max()


def test_channel_spatial_attention_gradcheck_and_unbatched():
    torch.manual_seed(3)
    m = ChannelSpatialAttention3d(4, 2, 3, min_hidden=2, workers=1, dtype=torch.float64)
    scale_weight(m.spatial, torch.Generator().manual_seed(3))
    x = torch.randn(2, 4, 3, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,))
    with torch.no_grad():
        assert torch.allclose(m(x[1]), m(x)[1], rtol=0, atol=1e-14)


def test_state_dict_round_trip():
    torch.manual_seed(4)
    m = ChannelSpatialAttention3d(8, 4, 5)
    sd = m.state_dict()
    assert set(sd) == {"channel.fc1.weight", "channel.fc1.bias", "channel.fc2.weight", "channel.fc2.bias",
                       "spatial.conv.weight"}
    assert sd["spatial.conv.weight"].shape == (1, 2, 5, 5, 5)
    fresh = ChannelSpatialAttention3d(8, 4, 5)
    fresh.load_state_dict(sd)
    x = torch.randn(1, 8, 6, 6, 6)
    with torch.no_grad():
        assert torch.equal(fresh(x), m(x))
    s = SpatialAttention3d(3)
    assert set(s.state_dict()) == {"conv.weight"}
    with pytest.raises(RuntimeError, match="size mismatch"):
        s.load_state_dict(SpatialAttention3d(5).state_dict())


def test_it_trains():
    """A few SGD steps towards 0.2 * x (both gates can learn the scaling) reduce the loss, and the spatial
    convolution's weight gets a gradient."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(ChannelSpatialAttention3d(4, 2, 3, min_hidden=2))
    x = torch.rand(2, 4, 8, 8, 8, generator=g) + 0.5
    target = x * 0.2
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = F.mse_loss(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert model[0].spatial.conv.weight.grad.abs().sum() > 0


def test_inside_sequential_with_conv3d():
    torch.manual_seed(5)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.ReLU(),
                              ChannelSpatialAttention3d(8, 4), vc.nn.Conv3d(8, 2, 3, padding=1),
                              SpatialAttention3d(3))
    x = torch.randn(2, 1, 6, 7, 5)
    out = net(x)
    assert out.shape == (2, 2, 6, 7, 5)
    out.square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("kwargs, match", [
    (dict(kernel_size=4), "kernel_size must be a positive odd"),
    (dict(kernel_size=0), "kernel_size must be >= 1"),
    (dict(kernel_size=-3), "kernel_size must be >= 1"),
    (dict(kernel_size=(3, 2, 3)), "kernel_size must be a positive odd"),
    (dict(kernel_size=(3, 3)), "kernel_size must be an int or a sequence of 3"),
    (dict(kernel_size=2.5), "kernel_size"),
])
def test_spatial_attention_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SpatialAttention3d(**kwargs)


def test_channel_spatial_attention_errors():
    for kwargs, match in ((dict(channels=0), "channels must be a positive int"),
                          (dict(channels=2.5), "channels must be a positive int"),
                          (dict(channels=8, reduction=0), "reduction"),
                          (dict(channels=8, min_hidden=0), "min_hidden"),
                          (dict(channels=8, kernel_size=6), "kernel_size must be a positive odd")):
        with pytest.raises(ValueError, match=match):
            ChannelSpatialAttention3d(**kwargs)
    m = ChannelSpatialAttention3d(8)
    with pytest.raises(ValueError, match="input.*8 channels.*\\(1, 4, 3, 3, 3\\)"):
        m(torch.zeros(1, 4, 3, 3, 3))
    for layer in (m, SpatialAttention3d()):
        with pytest.raises(ValueError, match="input must be 5-D"):
            layer(torch.zeros(3, 3, 3))
    with pytest.raises(ValueError, match="at least one channel"):
        SpatialAttention3d(3)(torch.zeros(1, 0, 3, 3, 3))


def test_repr_and_exports():
    assert vc.nn.SpatialAttention3d is SpatialAttention3d
    assert vc.nn.ChannelSpatialAttention3d is ChannelSpatialAttention3d
    assert "kernel_size=7" in repr(SpatialAttention3d())
    assert "kernel_size=(3, 5, 1)" in repr(SpatialAttention3d((3, 5, 1)))
    assert SpatialAttention3d(3, dtype=torch.float64).conv.weight.dtype == torch.float64
    assert np.isclose(float(SpatialAttention3d(3).conv.weight.detach().abs().max()), 1 / np.sqrt(54), atol=0.05)


@pytest.mark.cuda
def test_spatial_attention_runs_on_the_cuda_plugin(device, cuda_plugin):
    g = torch.Generator().manual_seed(9)
    layer = SpatialAttention3d(5, dtype=torch.float64)
    scale_weight(layer, g)
    x = torch.randn(2, 3, 6, 5, 7, dtype=torch.float64, generator=g)
    ref = spatial_reference(x, layer.conv.weight.detach())[0]
    layer = layer.to(device)
    xd = x.to(device).requires_grad_()
    out = layer(xd)
    assert cuda_plugin.calls, "the convolution did not run on the plugin"
    assert_close(out.detach().cpu(), ref, torch.float64)
    out.sum().backward()
    assert xd.grad is not None and layer.conv.weight.grad is not None
