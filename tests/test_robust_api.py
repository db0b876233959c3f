"""Issue 14, the API items: mm boxes and ball tolerance (5), torch's batch conventions and double backward (14),
big-endian arrays (15), errors that name the argument (16), vc.nn.convert keeping what it cannot convert (17)."""
import os
import time

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
from hypothesis import given, settings, strategies as st
from torch.autograd import gradgradcheck

import volconv as vc
from volconv._torch import conv as torch_conv

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "sample_volumes", "anatomical.nii.gz")
EPS32 = float(np.finfo(np.float32).eps)


# ------------------------------------------------------------------------------------------------- item 5


@settings(max_examples=60, deadline=None)
@given(size=st.floats(0.1, 30), zoom=st.floats(0.3, 4))
def test_box_in_mm_is_odd_and_centred(size, zoom):
    """fslmaths' rule: the voxels whose centres lie within size / 2 of the centre, 2 floor(size / zoom / 2) + 1."""
    n = vc.kernels.box(size, (zoom,) * 3).shape[0]
    assert n % 2 == 1
    assert n == 2 * int(np.floor(size / zoom / 2 * (1 + 1e-6))) + 1


def test_box_5mm_on_2mm_voxels_does_not_shift_the_image():
    k = vc.kernels.box(5, (2.0, 2.0, 2.0))
    assert k.shape == (3, 3, 3)
    delta = np.zeros((9, 9, 9), np.float32)
    delta[4, 4, 4] = 1
    out = vc.correlate(delta, k)
    centre = [float((np.arange(9) * out.sum(axis=tuple(a for a in range(3) if a != axis))).sum()) for axis in range(3)]
    np.testing.assert_allclose(centre, [4.0] * 3, atol=1e-5)


@pytest.mark.parametrize("noise", [2.0000000530, 1.9999999470])
def test_ball_ignores_float32_noise_in_zooms(noise):
    """NIfTI zooms are float32: 2.0 may come back as 2.0000000530; no axis may lose its boundary voxels."""
    want = vc.kernels.ball(4, (2.0, 2.0, 2.0)).to_dense()
    for axis in range(3):
        zooms = [2.0, 2.0, 2.0]
        zooms[axis] = noise
        np.testing.assert_array_equal(vc.kernels.ball(4, zooms).to_dense(), want)
    np.testing.assert_array_equal(vc.kernels.box(6, (noise,) * 3).to_dense(), vc.kernels.box(6, (2.0,) * 3).to_dense())


# ------------------------------------------------------------------------------------------------ item 14

def _rand(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype)


def _ops():
    """(name, f(input) -> output) for every front door, on a (N, 2, 5, 6, 5) input."""
    torch.manual_seed(0)
    w = _rand(3, 2, 3, 3, 3)
    cp = vc.decompose.cp(w.numpy(), 2)
    tk = vc.decompose.tucker(w.numpy(), (2, 2))
    sk = vc.SparseKernel.from_dense(w.numpy(), density=0.3)
    ws = [_rand(2, 2, 3, 3, 3), _rand(2, 2, 1, 1, 1)]

    def dynamic(x):
        K = torch.ones(x.shape[:1] + (1, 27) + x.shape[2:], dtype=x.dtype) if x.dim() == 5 else \
            torch.ones((1, 27) + x.shape[1:], dtype=x.dtype)
        return vc.dynamic_conv3d(x, K, 3, padding=1)
    return [
        ("conv3d", lambda x: vc.conv3d(x, w, padding=1)),
        ("conv3d-fft", lambda x: vc.conv3d(x, w, algorithm="fft", padding_mode="reflect", padding=1)),
        ("conv3d-kernel", lambda x: vc.conv3d(x, vc.kernels.gaussian(1.0), padding="same")),
        ("sparse_conv3d", lambda x: vc.sparse_conv3d(x, sk, stride=2)),
        ("cp_conv3d", lambda x: vc.cp_conv3d(x, cp, padding=1)),
        ("tucker_conv3d", lambda x: vc.tucker_conv3d(x, tk)),
        ("nested_conv3d", lambda x: vc.nested_conv3d(x, ws, activation="relu")),
        ("multiscale_conv3d", lambda x: vc.multiscale_conv3d(x, ws, dilations=[2, 1])),
        ("dynamic_conv3d", dynamic),
    ]


def _layers():
    torch.manual_seed(0)
    kw = dict(dtype=torch.float64)
    return [
        ("Conv3d", vc.nn.Conv3d(2, 3, 3, padding=1, **kw)),
        ("SparseConv3d", vc.nn.SparseConv3d(2, 3, 3, density=0.4, **kw)),
        ("CPConv3d", vc.nn.CPConv3d(2, 3, 3, padding=1, rank=2, **kw)),
        ("TuckerConv3d", vc.nn.TuckerConv3d(2, 3, 3, ranks=(2, 2), **kw)),
        ("NestedConv3d", vc.nn.NestedConv3d(2, 3, [3, 1], activation="gelu", **kw)),
        ("MultiScaleConv3d", vc.nn.MultiScaleConv3d(2, 2, (3, 1), dilations=(2, 1), **kw)),
        ("DynamicConv3d", vc.nn.DynamicConv3d(2, 3, **kw)),
        ("DynamicConv3d-tiled", vc.nn.DynamicConv3d(2, 3, tile=2, **kw)),
        ("VariableKernelConv3d", vc.nn.VariableKernelConv3d(2, 3, 3, padding="same", **kw)),
        ("ChannelAttention3d", vc.nn.ChannelAttention3d(2, min_hidden=2, **kw)),
        ("Res2Block3d", vc.nn.Res2Block3d(4, scales=2, reduction=1, **kw)),
    ]


CALLS = _ops() + [(name, layer) for name, layer in _layers()]


def _input(n, name):
    return _rand(n, 4 if name == "Res2Block3d" else 2, 5, 6, 5)


@pytest.mark.parametrize("name, f", CALLS, ids=[c[0] for c in CALLS])
def test_unbatched_input_like_torch(name, f):
    """torch takes (C, D, H, W) for (1, C, D, H, W) and returns the result without the batch axis."""
    x = _input(1, name)
    with torch.no_grad():
        want = f(x)[0]
        got = f(x[0])
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_unbatched_numpy_and_torch_reference():
    x, w = np.random.default_rng(0).standard_normal((2, 2, 5, 6, 5)), np.ones((3, 2, 3, 3, 3))
    np.testing.assert_allclose(vc.conv3d(x[0], w, stride=2), vc.conv3d(x[:1], w, stride=2)[0], rtol=0, atol=1e-12)
    ref = torch.nn.Conv3d(2, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(vc.nn.Conv3d.from_conv(ref)(torch.from_numpy(x[0])), ref(torch.from_numpy(x[0])),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name, f", CALLS, ids=[c[0] for c in CALLS])
def test_empty_batch_gives_an_empty_result(name, f):
    """N = 0: the shape of the N = 1 result with 0 items, as torch gives; gradients flow (zero, empty)."""
    x0 = _input(0, name).requires_grad_()
    out = f(x0)
    with torch.no_grad():
        one = f(_input(1, name))
    assert out.shape == (0,) + one.shape[1:] and out.dtype == one.dtype
    if out.requires_grad:
        out.sum().backward()
        assert x0.grad.shape == x0.shape


def test_empty_batch_matches_torch_and_its_weight_gradient_is_zero():
    w = _rand(3, 2, 3, 3, 3).requires_grad_()
    x = _rand(0, 2, 5, 6, 5)
    got = vc.conv3d(x, w, stride=(1, 2, 1), padding=1)
    assert got.shape == torch.nn.functional.conv3d(x, w, stride=(1, 2, 1), padding=1).shape
    got.sum().backward()
    assert torch.count_nonzero(w.grad) == 0
    assert vc.conv3d(x.numpy(), w.detach().numpy()).shape == (0, 3, 3, 4, 3)


def test_empty_volumes():
    """scipy's filters return an empty volume for an empty one; torch's conv3d refuses an empty spatial axis."""
    for shape in [(0, 5, 5), (4, 0, 5)]:
        v = np.ones(shape, np.float32)
        assert vc.correlate(v, np.ones((3, 3, 3))).shape == ndi.correlate(v, np.ones((3, 3, 3))).shape
        assert vc.adaptive_filter(v, np.ones(shape)).shape == shape
    with pytest.raises(ValueError, match=r"input has an empty volume.*as in torch"):
        vc.conv3d(np.ones((1, 2, 0, 6, 6)), np.ones((3, 2, 1, 3, 3)), padding=1)
    with pytest.raises(ValueError, match=r"input must be 5-D \(N, C, D, H, W\) or 4-D"):
        vc.sparse_conv3d(np.ones((6, 6, 6)), vc.SparseKernel.from_dense(np.ones((3, 1, 3, 3, 3))))


def _check_twice(f, *inputs):
    """gradgradcheck (fast mode) of f in float64: the second derivatives by finite differences."""
    assert gradgradcheck(f, inputs, fast_mode=True)


@pytest.mark.parametrize("options", [
    dict(padding=1, algorithm="direct"),
    dict(padding=(1, 0, 1), stride=(2, 1, 1), dilation=(1, 2, 1), algorithm="fft"),
    dict(padding=1, padding_mode="reflect", algorithm="direct"),
    dict(padding=1, padding_mode="circular", groups=2),
])
def test_conv3d_double_backward(options):
    torch.manual_seed(1)
    x = _rand(1, 2, 4, 5, 4).requires_grad_()
    w = _rand(2, 2 // options.get("groups", 1), 3, 2, 3).requires_grad_()
    b = _rand(2).requires_grad_()
    _check_twice(lambda x, w, b: vc.conv3d(x, w, b, **options), x, w, b)


def test_gradient_penalty_matches_torch():
    torch.manual_seed(2)
    x = _rand(2, 2, 5, 6, 5).requires_grad_()
    w = _rand(3, 2, 3, 3, 3).requires_grad_()
    b = _rand(3).requires_grad_()

    def penalty(conv):
        g, = torch.autograd.grad(conv(x, w, b).square().sum(), x, create_graph=True)
        return torch.autograd.grad(g.square().sum(), (w, b))
    got = penalty(lambda x, w, b: vc.conv3d(x, w, b, padding=1))
    want = penalty(lambda x, w, b: torch.nn.functional.conv3d(x, w, b, padding=1))
    for a, r in zip(got, want):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-9)


def test_filters_and_custom_operator_double_backward():
    torch.manual_seed(3)
    v, k = _rand(4, 5, 4).requires_grad_(), _rand(3, 3, 3).requires_grad_()
    _check_twice(lambda v, k: vc.correlate(v, k, mode="constant", cval=0.5), v, k)
    _check_twice(lambda v, k: vc.convolve(v, k, mode="mirror"), v, k)
    # the custom operator torch.compile / export trace (volconv::conv3d), called directly
    x, w = _rand(1, 2, 4, 5, 4).requires_grad_(), _rand(2, 2, 3, 3, 3).requires_grad_()
    _check_twice(lambda x, w: torch_conv.CONV3D.traced(x, w, None, [1, 1, 1], [1, 1, 0, 0, 1, 1], [1, 1, 1], 1,
                                                       "nearest", 0.0, "direct", 1), x, w)


@pytest.mark.parametrize("name, layer", [c for c in _layers() if c[0] not in ("DynamicConv3d-tiled",)],
                         ids=[c[0] for c in _layers() if c[0] != "DynamicConv3d-tiled"])
def test_layers_double_backward(name, layer):
    """A gradient penalty through every layer: d/dparams of |d out / d input|^2, checked by finite differences."""
    params = {n: p.detach().requires_grad_() for n, p in layer.named_parameters()}
    x = _input(1, name)[:, :, :3, :4, :3].requires_grad_()
    _check_twice(lambda x, *ps: torch.func.functional_call(layer, dict(zip(params, ps)), (x,)), x,
                 *params.values())


def test_dynamic_double_backward_and_tiled_refusal():
    torch.manual_seed(4)
    x = _rand(1, 2, 3, 4, 3).requires_grad_()
    K = _rand(1, 1, 8, 2, 3, 2).requires_grad_()
    _check_twice(lambda x, K: vc.dynamic_conv3d(x, K, 2, stride=(1, 1, 1), padding=0), x, K)
    K = _rand(1, 3, 2, 8, 2, 4, 4).requires_grad_()
    _check_twice(lambda x, K: vc.dynamic_conv3d(x, K, 2, padding=(0, 1, 1), dilation=(1, 2, 1)), x, K)
    layer = vc.nn.DynamicConv3d(2, 3, tile=2, dtype=torch.float64)
    x = _rand(1, 2, 5, 4, 4).requires_grad_()
    with pytest.raises(RuntimeError, match="DynamicConv3d with tile= does not support double backward.*tile=None"):
        torch.autograd.grad(layer(x).sum(), x, create_graph=True)


# ------------------------------------------------------------------------------------------------ item 15


@pytest.mark.parametrize("order", [">", "<"])
def test_big_endian_arrays_are_accepted(order):
    rng = np.random.default_rng(5)
    v = rng.standard_normal((6, 7, 5))
    k = rng.standard_normal((3, 3, 3))
    for dtype in ("f4", "f8"):
        ve, ke = v.astype(order + dtype), k.astype(order + dtype)
        got = vc.correlate(ve, ke)
        assert got.dtype == np.dtype(dtype)   # native order, as computed
        np.testing.assert_allclose(got, ndi.correlate(v, k), rtol=0, atol=64 * EPS32 * np.abs(v).max())
        x, w = ve[None, None], ke[None, None]
        np.testing.assert_array_equal(vc.conv3d(x, w, padding=1), vc.conv3d(v[None, None].astype(dtype),
                                                                            k[None, None].astype(dtype), padding=1))
        assert vc.adaptive_filter(ve, np.full(v.shape, 1.0, order + dtype)).dtype == np.dtype(dtype)
        assert vc.nested_conv3d(x, [w]).dtype == np.dtype(dtype)


# ------------------------------------------------------------------------------------------------ item 16


@pytest.mark.parametrize("cval", ["abc", None, [1.0, 2.0], True])
def test_cval_errors_name_cval(cval):
    v, k = np.ones((5, 5, 5)), np.ones((3, 3, 3))
    for f in (vc.correlate, vc.convolve):
        with pytest.raises(TypeError, match=r"cval must be a real number"):
            f(v, k, mode="constant", cval=cval)
    with pytest.raises(TypeError, match=r"cval must be a real number"):
        vc.adaptive_filter(v, v, mode="constant", cval=cval)
    assert vc.correlate(v, k, mode="constant", cval=np.float32(2.0))[0, 0, 0] == pytest.approx(27 - 19 + 19 * 2.0)


@pytest.mark.parametrize("truncate", [float("nan"), float("inf"), -1, 0])
def test_truncate_errors_name_truncate(truncate):
    with pytest.raises(ValueError, match="truncate must be a finite number of sigmas > 0"):
        vc.kernels.gaussian(2.0, truncate=truncate)
    with pytest.raises(ValueError, match="truncate must be a finite number of sigmas > 0"):
        vc.kernels.log(2.0, truncate=truncate)
    with pytest.raises(ValueError, match="truncate must be a finite number of sigmas > 0"):
        vc.adaptive_filter(np.ones((5, 5, 5)), np.ones((5, 5, 5)), truncate=truncate)


@pytest.mark.parametrize("build, named", [   # sizes whose arrays numpy cannot even start to allocate on main
    (lambda: vc.kernels.gaussian(1e10), r"sigma 1e\+10 voxels .* kernel of 8e\+10 voxels"),
    (lambda: vc.kernels.gaussian(None, (1, 1, 1), fwhm=1e12), r"sigma .* kernel of .* voxels"),
    (lambda: vc.kernels.box(1e6, (1.0, 1.0, 1.0)), r"size=1000000.0 makes a kernel of \(1000001,"),
    (lambda: vc.kernels.ball(1e5), r"radius=100000.0 makes a kernel of \(200001, 200001, 200001\)"),
    (lambda: vc.adaptive_filter(np.ones((4, 4, 4)), np.full((4, 4, 4), 1e9)), r"sigma_map's largest sigma"),
])
def test_absurd_kernels_refused_at_once_naming_the_argument(build, named):
    start = time.perf_counter()
    with pytest.raises(ValueError, match=named):
        build()
    assert time.perf_counter() - start < 1.0


def test_dense_kernels_refused_by_their_taps(monkeypatch):
    monkeypatch.setattr(vc.kernels, "MAX_DENSE_TAPS", 1000)
    with pytest.raises(ValueError, match=r"radius=10 makes a kernel of \(21, 21, 21\) voxels \(at most 1000 taps\)"):
        vc.kernels.ball(10)
    assert vc.kernels.ball(4).shape == (9, 9, 9)


def test_load_takes_a_bytes_path(tmp_path):
    """As nibabel and os.listdir(bytes) give paths: os.fsdecode-able bytes, plain and gzipped."""
    vol = vc.io.load(os.fsencode(SAMPLE))
    np.testing.assert_array_equal(vol.data, vc.io.load(SAMPLE).data)
    plain = str(tmp_path / "plain.nii")
    vc.io.save(vol, plain)
    np.testing.assert_array_equal(vc.io.load(os.fsencode(plain)).data, vol.data)


# ------------------------------------------------------------------------------------------------ item 17


def _model():
    """One layer CP reaches at once (a rank-1 weight), one that no rank up to 64 can bring within 0.05 (a random
    72 x 4 x 3^3 weight: the singular values of its 72 x 108 matricization bound rank 64's error at 0.1)."""
    torch.manual_seed(6)
    easy = torch.nn.Conv3d(1, 2, 3)
    with torch.no_grad():
        easy.weight.copy_(torch.einsum("o,a,b,c->oabc", torch.rand(2) + 0.5, *(torch.rand(3) + 0.5 for _ in range(3)))
                          [:, None])
    return torch.nn.Sequential(easy, torch.nn.Conv3d(4, 72, 3))


def test_convert_keeps_a_layer_it_cannot_bring_within_tolerance():
    model = _model()
    new, report = vc.nn.convert(model, to="cp", tolerance=0.05)
    assert isinstance(new[0], vc.nn.CPConv3d)
    assert type(new[1]) is torch.nn.Conv3d and torch.equal(new[1].weight, model[1].weight)
    kept = report.layers[1]
    assert kept.representation == "kept" and "relative error 0.05" in kept.note
    assert "kept" in str(report)
    with pytest.raises(vc.decompose.ToleranceNotMet, match=r"layer '1': no CP rank up to 64"):
        vc.nn.convert(model, to="cp", tolerance=0.05, strict=True)
