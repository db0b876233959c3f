"""vc.nn.VariableKernelConv3d, vc.nn.ChannelAttention3d and vc.nn.Res2Block3d against references written here
in plain torch / numpy from the modules' own parameters.

VariableKernelConv3d: its output against torch's float64 conv3d (conftest.check_conv3d, the per-element bound
of conftest.conv_tolerance: ~1e-6 of the terms' magnitude in float32, ~1e-15 in float64) with the cropped or
resampled kernel made in the test (slicing; F.interpolate), over kernel sizes, strides, dilations, groups and
non-contiguous inputs; its gradients against autograd through F.conv3d, and gradcheck. The blocks: float64
forward against a re-implementation with F.conv3d / numpy (1e-10 of the output's scale), gradcheck, errors.
gradcheck runs with torch's defaults, as in test_autograd.py (a wrong gradient fails by orders of magnitude).
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from volconv.nn import Conv3d  # noqa: E402
from volconv.nn.blocks import ChannelAttention3d, Res2Block3d  # noqa: E402
from volconv.nn.variable import VariableKernelConv3d  # noqa: E402

from conftest import check_conv3d, config_rng  # noqa: E402


@pytest.fixture(autouse=True)
def torch_one_thread():
    """gradcheck makes hundreds of calls on tiny tensors, where thread barriers cost more than the work
    (see test_autograd.py); the threaded paths are test_threads.py's job."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def strided_input(shape, dtype, generator):
    """A non-contiguous (N, C, D, H, W) view: W and D swapped, then a slice of D."""
    N, C, D, H, W = shape
    base = torch.randn(N, C, W, H, D + 2, dtype=dtype, generator=generator)
    x = base.transpose(2, 4)[:, :, 1:-1]
    assert x.shape == shape and not x.is_contiguous()
    return x


def centred_crop(w, k):
    """The centred k sub-block of w's last three axes, by slicing from both ends (not weight_for's formula)."""
    cuts = [(n - m) // 2 for n, m in zip(w.shape[2:], k)]
    return w[:, :, cuts[0]:w.shape[2] - cuts[0], cuts[1]:w.shape[3] - cuts[1], cuts[2]:w.shape[4] - cuts[2]]


def reference_weight(layer, k):
    """The weight a call with kernel size k should use, made from the stored weight in the test."""
    w = layer.weight.detach()
    k = layer.max_kernel_size if k is None else (k,) * 3 if isinstance(k, int) else tuple(k)
    if layer.resize == "crop":
        out = centred_crop(w, k)
    else:
        out = F.interpolate(w, size=k, mode="trilinear", align_corners=True)
    assert out.shape[2:] == k
    return out


def check_variable(layer, x, sizes, context):
    bias = None if layer.bias is None else layer.bias.detach()
    for k in sizes:
        with torch.no_grad():
            out = layer(x, k)
        check_conv3d(out, x, reference_weight(layer, k), bias, stride=layer.stride, padding=layer.padding,
                     dilation=layer.dilation, groups=layer.groups, algorithm=layer.algorithm,
                     context=f"{context}, kernel_size={k}")
        if layer.padding == "same":
            assert out.shape[2:] == x.shape[2:]


# ---------------------------------------------------------------------------------------- VariableKernelConv3d

VARIABLE_CASES = [
    pytest.param(dict(max_kernel_size=5, sizes=[None, 5, 3, 1, (1, 3, 5)]), id="crop-same"),
    pytest.param(dict(max_kernel_size=(4, 5, 6), sizes=[None, (2, 3, 4), (4, 1, 2)], algorithm="direct"),
                 id="crop-even-same-direct"),
    pytest.param(dict(max_kernel_size=5, resize="interpolate", sizes=[None, 5, 4, 2, 1, (2, 3, 5)]),
                 id="interpolate-same"),
    pytest.param(dict(max_kernel_size=5, stride=2, padding=1, sizes=[None, 3, 1]), id="crop-stride2-pad1"),
    pytest.param(dict(max_kernel_size=5, stride=(1, 2, 1), padding=(2, 0, 1), resize="interpolate",
                      sizes=[4, (3, 2, 5)], algorithm="fft"), id="interpolate-stride-pad-fft"),
    pytest.param(dict(max_kernel_size=3, dilation=2, sizes=[None, 1]), id="crop-dilation2-same"),
    pytest.param(dict(max_kernel_size=5, dilation=(1, 2, 1), padding="valid", resize="interpolate",
                      sizes=[None, 3, 2]), id="interpolate-dilation-valid"),
    pytest.param(dict(max_kernel_size=5, in_channels=4, out_channels=6, groups=2, sizes=[None, 3]),
                 id="crop-groups2"),
    pytest.param(dict(max_kernel_size=3, in_channels=4, out_channels=4, groups=4, bias=False,
                      resize="interpolate", sizes=[None, 2]), id="interpolate-depthwise-nobias"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", VARIABLE_CASES)
def test_variable_kernel_matches_torch_with_the_resized_kernel(case, dtype, rng):
    case = dict(case)
    sizes = case.pop("sizes")
    cin, cout = case.pop("in_channels", 3), case.pop("out_channels", 2)
    g = torch.Generator().manual_seed(int(rng.integers(2**31)))
    torch.manual_seed(int(rng.integers(2**31)))
    layer = VariableKernelConv3d(cin, cout, dtype=dtype, **case)
    if layer.bias is not None:   # a bias of the output's scale (torch's init makes it small enough to hide a slip)
        with torch.no_grad():
            layer.bias.copy_(torch.randn(cout, dtype=dtype, generator=g))
    x = strided_input((2, cin, 9, 9, 10), dtype, g)
    check_variable(layer, x, sizes, str(case))


@pytest.mark.parametrize("i", range(10))
def test_variable_kernel_random_configs(i):
    r = config_rng(41, i)
    resize = ("crop", "interpolate")[i % 2]
    dtype = (torch.float64, torch.float32)[(i // 2) % 2]
    kmax = tuple(int(v) for v in r.integers(1, 7, 3))
    if resize == "crop":
        sizes = [tuple(int(m - 2 * r.integers(0, (m + 1) // 2)) for m in kmax) for _ in range(2)]
    else:
        sizes = [tuple(int(r.integers(1, m + 1)) for m in kmax) for _ in range(2)]
    stride = tuple(int(v) for v in r.integers(1, 3, 3))
    dilation = tuple(int(v) for v in r.integers(1, 3, 3))
    padding = "same" if stride == (1, 1, 1) and i % 3 else tuple(int(v) for v in r.integers(0, 3, 3))
    groups = int(r.choice([1, 2]))
    cin, cout = groups * int(r.integers(1, 3)), groups * int(r.integers(1, 3))
    spatial = tuple(int((m - 1) * d + 1 + r.integers(0, 6)) for m, d in zip(kmax, dilation))
    torch.manual_seed(i)
    layer = VariableKernelConv3d(cin, cout, kmax, stride, padding, dilation, groups, bias=bool(i % 4),
                                 resize=resize, dtype=dtype)
    g = torch.Generator().manual_seed(i)
    x = strided_input((int(r.integers(1, 3)), cin) + spatial, dtype, g)
    check_variable(layer, x, [None] + sizes, f"case {i}: max {kmax} {resize} stride {stride} padding {padding} "
                   f"dilation {dilation} groups {groups}")


def test_interpolate_samples_the_kernel_with_aligned_corners():
    """A kernel linear in its tap coordinates resamples (trilinearly, corners on corners) to the same linear
    function at the new taps: checks mode and align_corners without calling F.interpolate."""
    layer = VariableKernelConv3d(1, 1, (5, 4, 3), resize="interpolate", dtype=torch.float64)
    coords = lambda k: torch.meshgrid(*(torch.linspace(0, 1, n, dtype=torch.float64) for n in k),  # noqa: E731
                                      indexing="ij")
    plane = lambda k: 1 + 2 * coords(k)[0] - 3 * coords(k)[1] + 5 * coords(k)[2]  # noqa: E731
    with torch.no_grad():
        layer.weight.copy_(plane((5, 4, 3)))
    for k in [(5, 4, 3), (3, 2, 2), (4, 3, 3), (2, 4, 2)]:
        assert torch.allclose(layer.weight_for(k)[0, 0], plane(k), atol=1e-12), k
    # an axis of size 1 takes the first tap (align_corners=True), as MedNeXt's UpKern does
    assert torch.allclose(layer.weight_for((1, 4, 3))[0, 0], layer.weight[0, 0, :1].detach(), atol=1e-12)


def test_crop_is_the_centred_block():
    layer = VariableKernelConv3d(1, 1, (5, 6, 3), dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.arange(90, dtype=torch.float64).reshape(1, 1, 5, 6, 3))
    w = layer.weight.detach()[0, 0]
    assert torch.equal(layer.weight_for((3, 2, 1))[0, 0], w[1:4, 2:4, 1:2])
    assert torch.equal(layer.weight_for((1, 4, 3))[0, 0], w[2:3, 1:5, :])
    assert layer.weight_for(None) is layer.weight


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")   # torch's, in the reference
@pytest.mark.parametrize("resize", ["crop", "interpolate"])
def test_variable_kernel_gradients_reach_the_stored_weight(resize):
    g = torch.Generator().manual_seed(3)
    layer = VariableKernelConv3d(4, 3, (5, 5, 3), dilation=(1, 2, 1), groups=1, resize=resize, dtype=torch.float64)
    k = (3, 1, 1) if resize == "crop" else (4, 3, 2)
    x = strided_input((2, 4, 7, 8, 6), torch.float64, g).requires_grad_()
    grad_out = torch.randn(2, 3, 7, 8, 6, dtype=torch.float64, generator=g)
    (layer(x, k) * grad_out).sum().backward()

    # reference: autograd through torch's conv3d of a kernel resized here from a copy of the stored weight
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    if resize == "crop":
        resized = centred_crop(w, k)
    else:
        resized = F.interpolate(w, size=k, mode="trilinear", align_corners=True)
    (F.conv3d(xr, resized, b, 1, "same", layer.dilation) * grad_out).sum().backward()
    for got, ref, name in ((layer.weight.grad, w.grad, "weight"), (layer.bias.grad, b.grad, "bias"),
                           (x.grad, xr.grad, "input")):
        assert torch.allclose(got, ref, rtol=0, atol=1e-10 * ref.abs().max().item()), name
    # the taps that feed the resized kernel, and only those, get a gradient: the centred block of a crop; for
    # the resampling (corners on corners) 5 -> 4 taps reads all 5, 5 -> 3 taps 0, 2, 4, and 3 -> 2 taps 0, 2
    used = torch.zeros_like(w, dtype=torch.bool)
    if resize == "crop":
        used[:, :, 1:4, 2:3, 1:2] = True
    else:
        used[:, :, :, ::2, ::2] = True
    assert torch.count_nonzero(layer.weight.grad[~used]) == 0   # exactly: nothing else was read
    assert torch.count_nonzero(layer.weight.grad[used]) == used.sum()


@pytest.mark.parametrize("resize, k", [("crop", 1), ("crop", (3, 1, 3)), ("interpolate", 2),
                                       ("interpolate", (3, 2, 1))])
def test_variable_kernel_gradcheck(resize, k):
    torch.manual_seed(5)
    layer = VariableKernelConv3d(2, 2, 3, resize=resize, workers=1, dtype=torch.float64)
    x = torch.randn(1, 2, 4, 3, 4, dtype=torch.float64, requires_grad=True)
    params = dict(layer.named_parameters())
    assert torch.autograd.gradcheck(
        lambda x, *ps: torch.func.functional_call(layer, dict(zip(params, ps)), (x, k)),
        (x,) + tuple(p.detach().requires_grad_() for p in params.values()))


def test_variable_kernel_errors_and_repr():
    layer = VariableKernelConv3d(2, 2, (5, 5, 4))
    x = torch.zeros(1, 2, 6, 6, 6)
    with pytest.raises(ValueError, match="kernel_size.*max_kernel_size"):
        layer(x, 7)
    with pytest.raises(ValueError, match="kernel_size.*max_kernel_size"):
        layer(x, (3, 3, 6))
    with pytest.raises(ValueError, match="kernel_size .*even"):
        layer(x, (3, 3, 3))   # 4 - 3 is odd: no centred crop
    with pytest.raises(ValueError, match="kernel_size .*even"):
        layer.weight_for(4)
    with pytest.raises(ValueError, match="kernel_size"):
        layer(x, 0)
    with pytest.raises(ValueError, match="kernel_size"):
        layer(x, (3, 3))
    with pytest.raises(ValueError, match="resize.*'crop', 'interpolate'"):
        VariableKernelConv3d(2, 2, 3, resize="nearest")
    with pytest.raises(ValueError, match="same.*stride"):
        VariableKernelConv3d(2, 2, 3, stride=2)
    with pytest.raises(ValueError, match="groups"):
        VariableKernelConv3d(3, 2, 3, groups=2)
    with pytest.raises(ValueError, match="padding"):
        VariableKernelConv3d(2, 2, 3, padding="full")
    # interpolate takes any size up to the maximum, of either parity
    assert VariableKernelConv3d(2, 2, (5, 5, 4), resize="interpolate")(x, (3, 2, 3)).shape == x.shape
    assert repr(layer) == "VariableKernelConv3d(2, 2, max_kernel_size=(5, 5, 4))"
    assert repr(VariableKernelConv3d(4, 2, 3, 2, 1, groups=2, bias=False, resize="interpolate", workers=1)) == \
        ("VariableKernelConv3d(4, 2, max_kernel_size=(3, 3, 3), stride=(2, 2, 2), padding=(1, 1, 1), groups=2, "
         "bias=False, resize='interpolate', workers=1)")


def test_variable_kernel_init_is_torchs():
    """Same initialisation as torch.nn.Conv3d of the largest kernel (same seed, same draws)."""
    torch.manual_seed(11)
    ref = torch.nn.Conv3d(4, 6, (5, 3, 3), groups=2)
    torch.manual_seed(11)
    layer = VariableKernelConv3d(4, 6, (5, 3, 3), groups=2)
    assert torch.equal(layer.weight, ref.weight) and torch.equal(layer.bias, ref.bias)


# ------------------------------------------------------------------------------------------ ChannelAttention3d

def attention_reference(x, fc1, fc2):
    """Squeeze-and-excitation in numpy from the Linear layers' parameters."""
    p = {name: t.detach().numpy() for name, t in (("w1", fc1.weight), ("b1", fc1.bias), ("w2", fc2.weight),
                                                  ("b2", fc2.bias))}
    v = x.detach().numpy()
    squeezed = v.reshape(v.shape[0], v.shape[1], -1).sum(axis=2) / np.prod(v.shape[2:])
    hidden = np.maximum(squeezed @ p["w1"].T + p["b1"], 0.0)
    gate = 1.0 / (1.0 + np.exp(-(hidden @ p["w2"].T + p["b2"])))
    return v * gate[:, :, None, None, None]


@pytest.mark.parametrize("channels, reduction, min_hidden, hidden", [(8, 16, 4, 4), (64, 16, 4, 4),
                                                                     (96, 8, 4, 12), (5, 2, 1, 2)])
def test_channel_attention_matches_reference(channels, reduction, min_hidden, hidden):
    torch.manual_seed(channels)
    m = ChannelAttention3d(channels, reduction, min_hidden=min_hidden).double()
    assert (m.fc1.in_features, m.fc1.out_features, m.fc2.out_features) == (channels, hidden, channels)
    x = strided_input((2, channels, 3, 4, 5), torch.float64, torch.Generator().manual_seed(1))
    ref = attention_reference(x, m.fc1, m.fc2)
    out = m(x)
    assert out.shape == x.shape
    np.testing.assert_allclose(out.detach().numpy(), ref, rtol=0, atol=1e-12 * np.abs(ref).max())


def test_channel_attention_errors():
    for kwargs, match in ((dict(channels=0), "channels"), (dict(channels=8, reduction=0), "reduction"),
                          (dict(channels=8, min_hidden=0), "min_hidden"), (dict(channels=2.5), "channels")):
        with pytest.raises(ValueError, match=match):
            ChannelAttention3d(**kwargs)
    m = ChannelAttention3d(8)
    with pytest.raises(ValueError, match="input.*8 channels.*\\(1, 4, 3, 3, 3\\)"):
        m(torch.zeros(1, 4, 3, 3, 3))
    with pytest.raises(ValueError, match="input.*5-D"):
        m(torch.zeros(3, 3, 3))   # (C, D, H, W) is taken, as torch does


# ------------------------------------------------------------------------------------------------- Res2Block3d

def res2_reference(block, x):
    """Res2Block3d in plain torch from the block's parameters (F.conv3d, explicit channel slices)."""
    p = lambda conv: (conv.weight.detach(), None if conv.bias is None else conv.bias.detach())  # noqa: E731
    with torch.no_grad():
        y = F.relu(F.conv3d(x, *p(block.conv_in)))
        width = block.channels // block.scales
        pads = tuple(k // 2 for k in block.kernel_size)
        outs = [y[:, :width]]
        for i in range(1, block.scales):
            part = y[:, i * width:(i + 1) * width]
            if i > 1:
                part = part + outs[i - 1]
            outs.append(F.relu(F.conv3d(part, *p(block.convs[i - 1]), padding=pads)))
        z = F.conv3d(torch.cat(outs, dim=1), *p(block.conv_out))
        if block.attention is not None:
            z = torch.from_numpy(attention_reference(z, block.attention.fc1, block.attention.fc2))
        return F.relu(z + x)


@pytest.mark.parametrize("channels, scales, kernel_size, attention, bias, algorithm", [
    (8, 4, 3, True, False, "auto"),
    (8, 4, 3, False, False, "direct"),
    (6, 3, (3, 1, 5), True, True, "fft"),
    (12, 2, 5, False, True, "auto"),
    (32, 4, 3, True, True, "direct"),
])
def test_res2block_matches_reference(channels, scales, kernel_size, attention, bias, algorithm):
    torch.manual_seed(channels + scales)
    block = Res2Block3d(channels, scales, kernel_size, attention=attention, bias=bias, algorithm=algorithm).double()
    convs = [block.conv_in, block.conv_out, *block.convs]
    assert len(convs) == scales + 1 and all(type(c) is Conv3d and c.algorithm == algorithm for c in convs)
    assert (block.attention is not None) == attention
    x = strided_input((2, channels, 6, 5, 7), torch.float64, torch.Generator().manual_seed(2))
    ref = res2_reference(block, x)
    out = block(x)
    assert out.shape == x.shape
    assert torch.allclose(out, ref, rtol=0, atol=1e-10 * ref.abs().max().item())
    assert (ref > 0).any() and (ref == 0).any()   # both sides of the final ReLU are exercised


def test_res2block_gradcheck():
    torch.manual_seed(7)
    block = Res2Block3d(4, 2, 3, bias=True, workers=1).double()
    x = torch.randn(1, 4, 3, 4, 3, dtype=torch.float64, requires_grad=True)
    params = dict(block.named_parameters())
    assert "attention.fc1.weight" in params
    assert torch.autograd.gradcheck(
        lambda x, *ps: torch.func.functional_call(block, dict(zip(params, ps)), (x,)),
        (x,) + tuple(p.detach().requires_grad_() for p in params.values()))


def test_res2block_errors_and_workers():
    with pytest.raises(ValueError, match=r"channels \(10\).*scales \(4\)"):
        Res2Block3d(10, 4)
    with pytest.raises(ValueError, match="odd"):
        Res2Block3d(8, 4, 4)
    with pytest.raises(ValueError, match="scales"):
        Res2Block3d(8, 1)
    with pytest.raises(ValueError, match="channels"):
        Res2Block3d(0)
    block = Res2Block3d(8, 2, workers=1)
    assert all(c.workers == 1 for c in [block.conv_in, block.conv_out, *block.convs])
    with pytest.raises(ValueError, match="input.*8 channels"):
        block(torch.zeros(1, 6, 4, 4, 4))
    with pytest.raises(ValueError, match="input.*5-D"):
        block(torch.zeros(8, 4, 4))   # (C, D, H, W) is taken, as torch does
