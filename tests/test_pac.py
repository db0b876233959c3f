"""vc.nn.PacConv3d (nn/pac.py) against an unfold reference written here: the (N, C, T, Do, Ho, Wo) patches of the
zero-padded input and guide (torch's unfold along each axis), K = exp(-0.5 ||f_centre - f_tap||^2) from the
guide's patches, and einsum with W. Hand-picked and seeded random geometries (stride, dilation, even kernels,
padding, guide given or the input itself, batch > 1, non-contiguous inputs), float32 and float64; gradcheck in
float64; a constant guide against torch.nn.functional.conv3d; tile= against tile=None; unbatched input; bad
arguments.

Tolerances: float64 rtol 1e-10 / atol 1e-10 * max|ref| (both sides sum the same C * T products in different
orders); float32 rtol 1e-4, atol 1e-4 * max(1, max|ref|): the sums have at most C * T <= 3 * 125 terms of
unit-scale data (measured error ~1e-6). A constant guide against conv3d: 1e-12 in float64.
gradcheck: eps 1e-6, atol 1e-7, rtol 1e-5 (torch's defaults but atol)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import volconv as vc  # noqa: E402

from conftest import config_rng  # noqa: E402


def patches(t, ks, st, pad, dil):
    """(N, C, T, Do, Ho, Wo): every output voxel's taps of the zero-padded t, taps in W's flattened order."""
    p = torch.nn.functional.pad(t, (pad[2], pad[2], pad[1], pad[1], pad[0], pad[0]))
    for axis in range(3):   # unfold D, H, W with window (k - 1) * d + 1, then keep every d-th element
        span = (ks[axis] - 1) * dil[axis] + 1
        p = p.unfold(2 + axis, span, st[axis])[..., ::dil[axis]]
    # p: (N, C, Do, Ho, Wo, kd, kh, kw)
    n, c, do, ho, wo = p.shape[:5]
    return p.reshape(n, c, do, ho, wo, -1).permute(0, 1, 5, 2, 3, 4)


def pac_reference(x, f, W, b, stride, padding, dilation):
    ks = tuple(W.shape[2:])
    st, pad, dil = (torch.nn.modules.utils._triple(v) for v in (stride, padding, dilation))
    xp = patches(x, ks, st, pad, dil)
    fp = patches(f, ks, st, pad, dil)
    centre = ((ks[0] // 2) * ks[1] + ks[1] // 2) * ks[2] + ks[2] // 2
    K = torch.exp(-0.5 * ((fp - fp[:, :, centre:centre + 1]) ** 2).sum(1))   # (N, T, Do, Ho, Wo)
    out = torch.einsum("oct,nctdhw,ntdhw->nodhw", W.reshape(W.shape[0], W.shape[1], -1), xp, K)
    return out if b is None else out + b.reshape(1, -1, 1, 1, 1)


def make(cin, cout, ks, dtype, guide_channels=None, bias=True, **conv):
    torch.manual_seed(0)
    layer = vc.nn.PacConv3d(cin, cout, ks, bias=bias, guide_channels=guide_channels, dtype=dtype, **conv)
    if bias:
        with torch.no_grad():
            layer.bias.normal_()
    return layer


def check(out, ref, dtype):
    if dtype == torch.float64:
        tol = 1e-10 * max(1.0, float(ref.abs().max()))
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=tol)
    else:
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * max(1.0, float(ref.abs().max())))


CASES = [   # cin, cout, ks, stride, padding, dilation, spatial, batch, guide_channels (None: self-guided)
    (2, 3, 3, 1, 1, 1, (5, 6, 7), 1, None),
    (2, 3, 3, 2, 1, 1, (7, 6, 5), 2, 4),
    (1, 2, 3, 1, 2, 2, (6, 6, 6), 1, 2),
    (3, 2, 2, 1, 0, 1, (5, 4, 6), 2, None),              # even kernel
    (2, 2, (2, 3, 4), (1, 2, 1), (1, 0, 2), (2, 1, 1), (6, 7, 8), 1, 3),
    (2, 4, 5, 1, 2, 1, (6, 6, 6), 3, 1),
    (1, 1, 1, 1, 0, 1, (3, 4, 5), 2, 2),                 # 1x1x1: K = 1 everywhere
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES)
def test_matches_unfold_reference(case, dtype):
    cin, cout, ks, stride, padding, dilation, spatial, n, gc = case
    layer = make(cin, cout, ks, dtype, gc, stride=stride, padding=padding, dilation=dilation)
    g = torch.Generator().manual_seed(1)
    x = torch.randn((n, cin) + spatial, generator=g, dtype=dtype)
    f = None if gc is None else torch.randn((n, gc) + spatial, generator=g, dtype=dtype)
    out = layer(x, f)
    ref = pac_reference(x, x if f is None else f, layer.weight.detach(), layer.bias.detach(), stride, padding,
                        dilation)
    assert out.shape == ref.shape
    check(out.detach(), ref, dtype)


@pytest.mark.parametrize("i", range(12))
def test_random_geometries(i):
    r = config_rng(18, 2, i)
    ks = tuple(int(v) for v in r.integers(1, 5, 3))
    st = tuple(int(v) for v in r.integers(1, 3, 3))
    dil = tuple(int(v) for v in r.integers(1, 3, 3))
    pad = tuple(int(v) for v in r.integers(0, 3, 3))
    spatial = tuple(int((k - 1) * d + 1 + r.integers(0, 5)) for k, d in zip(ks, dil))
    cin, cout, gc, n = (int(v) for v in r.integers(1, 4, 4))
    dtype = [torch.float32, torch.float64][i % 2]
    tile = [None, 1, 2][i % 3]
    layer = make(cin, cout, ks, dtype, gc, bias=bool(i % 2), stride=st, padding=pad, dilation=dil, tile=tile)
    x = torch.from_numpy(r.standard_normal((n, cin) + spatial)).to(dtype)
    f = torch.from_numpy(0.7 * r.standard_normal((n, gc) + spatial)).to(dtype)
    if i % 4 == 0:   # non-contiguous: a transposed copy transposed back
        x = x.transpose(2, 4).contiguous().transpose(2, 4)
        f = f.transpose(3, 4).contiguous().transpose(3, 4)
        assert not x.is_contiguous() and not f.is_contiguous()
    out = layer(x, f)
    ref = pac_reference(x, f, layer.weight.detach(), None if layer.bias is None else layer.bias.detach(), st, pad,
                        dil)
    check(out.detach(), ref, dtype)


def test_constant_guide_is_torch_conv3d():
    layer = make(3, 4, 3, torch.float64, guide_channels=2, stride=2, padding=1, dilation=1)
    x = torch.randn(2, 3, 7, 8, 9, dtype=torch.float64)
    f = torch.full((2, 2, 7, 8, 9), 3.5, dtype=torch.float64)
    ref = torch.nn.functional.conv3d(x, layer.weight, layer.bias, stride=2, padding=1)
    torch.testing.assert_close(layer(x, f), ref, rtol=1e-12, atol=1e-12)


def test_guide_changes_the_result():
    """A guide with an edge damps the taps across it: not the plain convolution (a test that can fail)."""
    layer = make(1, 1, 3, torch.float64, guide_channels=1, padding=1, bias=False)
    x = torch.randn(1, 1, 6, 6, 6, dtype=torch.float64)
    f = torch.zeros(1, 1, 6, 6, 6, dtype=torch.float64)
    f[:, :, 3:] = 10.0
    out = layer(x, f)
    plain = torch.nn.functional.conv3d(x, layer.weight, padding=1)
    assert not torch.allclose(out, plain)
    torch.testing.assert_close(out[:, :, 0:2], plain[:, :, 0:2])   # planes whose window has no edge


@pytest.mark.parametrize("gc,stride,dilation,ks", [(None, 1, 1, 3), (2, 2, 1, 3), (1, 1, 2, 2)])
def test_gradcheck(gc, stride, dilation, ks):
    layer = make(1, 2, ks, torch.float64, gc, stride=stride, padding=1, dilation=dilation)
    x = torch.randn(2, 1, 3, 4, 3, dtype=torch.float64, requires_grad=True)
    f = None if gc is None else (0.5 * torch.randn(2, gc, 3, 4, 3, dtype=torch.float64)).requires_grad_()

    args = (x, layer.weight.detach().clone().requires_grad_(), layer.bias.detach().clone().requires_grad_())
    args += () if f is None else (f,)
    assert torch.autograd.gradcheck(lambda *a: _call(layer, *a), args, eps=1e-6, atol=1e-7, rtol=1e-5)


def _call(layer, x, w, b, f=None):
    """The layer's Function with explicit weight and bias tensors (gradcheck perturbs them)."""
    from volconv.nn.pac import _Pac

    geo = (layer.kernel_size, layer.stride, layer.padding, layer.dilation, layer.output_shape(x.shape[2:]),
           layer.tile)
    return _Pac.apply(geo, x, x if f is None else f, w, b)


def test_gradients_match_reference_autograd():
    """Gradients to x, f, W and b against torch's autograd through the unfold reference, tiled and not."""
    for tile in (None, 1, 3):
        layer = make(2, 3, 3, torch.float64, 2, stride=(1, 2, 1), padding=1, dilation=(2, 1, 1), tile=tile)
        x = torch.randn(2, 2, 7, 6, 5, dtype=torch.float64, requires_grad=True)
        f = torch.randn(2, 2, 7, 6, 5, dtype=torch.float64, requires_grad=True)
        out = layer(x, f)
        gout = torch.randn_like(out)
        got = torch.autograd.grad(out, (x, f, layer.weight, layer.bias), gout)
        ref = pac_reference(x, f, layer.weight, layer.bias, (1, 2, 1), 1, (2, 1, 1))
        want = torch.autograd.grad(ref, (x, f, layer.weight, layer.bias), gout)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_self_guided_gradient_flows_both_ways():
    layer = make(2, 2, 3, torch.float64, padding=1)
    x = torch.randn(1, 2, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    gx, = torch.autograd.grad(layer(x).sum(), x)
    xr = x.detach().clone().requires_grad_()
    want, = torch.autograd.grad(pac_reference(xr, xr, layer.weight.detach(), layer.bias.detach(), 1, 1, 1).sum(), xr)
    torch.testing.assert_close(gx, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("tile", [1, 2, 5, 100])
def test_tile_same_result_and_gradients(tile):
    kw = dict(stride=(2, 1, 1), padding=2, dilation=(1, 2, 1))
    a = make(2, 3, 3, torch.float32, 1, **kw)
    b = make(2, 3, 3, torch.float32, 1, tile=tile, **kw)
    x = torch.randn(2, 2, 9, 6, 7, requires_grad=True)
    f = torch.randn(2, 1, 9, 6, 7, requires_grad=True)
    oa, ob = a(x, f), b(x, f)
    torch.testing.assert_close(ob, oa, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(oa)
    ga = torch.autograd.grad(oa, (x, f, a.weight, a.bias), g)
    gb = torch.autograd.grad(ob, (x, f, b.weight, b.bias), g)
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)


def test_unbatched_input_and_guide():
    layer = make(2, 2, 3, torch.float64, 1, padding=1)
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    f = torch.randn(1, 4, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(layer(x, f), layer(x[None], f[None])[0])


def test_module_basics():
    layer = vc.nn.PacConv3d(3, 5, (1, 3, 3), padding=(0, 1, 1), guide_channels=2, bias=False)
    assert layer.weight.shape == (5, 3, 1, 3, 3) and layer.bias is None
    assert "guide_channels=2" in repr(layer) and "bias=False" in repr(layer)
    assert set(layer.state_dict()) == {"weight"}
    assert vc.nn.PacConv3d(1, 1, 3, dtype=torch.float64).weight.dtype == torch.float64


@pytest.mark.parametrize("kwargs,match", [
    (dict(kernel_size=0), "kernel_size"), (dict(kernel_size=(3, 3)), "kernel_size"),
    (dict(stride=0), "stride"), (dict(padding=-1), "padding"), (dict(dilation=0), "dilation"),
    (dict(guide_channels=0), "guide_channels"), (dict(kernel_type="laplace"), "kernel_type"),
    (dict(tile=0), "tile"), (dict(tile=1.5), "tile"), (dict(in_channels=0), "in_channels"),
    (dict(out_channels=-2), "out_channels"),
])
def test_bad_constructor_arguments(kwargs, match):
    args = dict(in_channels=2, out_channels=2, kernel_size=3) | kwargs
    with pytest.raises(ValueError, match=match):
        vc.nn.PacConv3d(**args)


def test_bad_forward_arguments():
    layer = vc.nn.PacConv3d(2, 2, 3, guide_channels=3)
    x = torch.randn(1, 2, 5, 5, 5)
    with pytest.raises(ValueError, match="guide is required"):
        layer(x)
    with pytest.raises(ValueError, match="guide must be"):
        layer(x, torch.randn(1, 2, 5, 5, 5))            # wrong channels
    with pytest.raises(ValueError, match="guide must be"):
        layer(x, torch.randn(1, 3, 5, 5, 4))            # wrong grid
    with pytest.raises(ValueError, match="guide must be"):
        layer(torch.randn(2, 2, 5, 5, 5), torch.randn(1, 3, 5, 5, 5))   # wrong batch
    with pytest.raises(ValueError, match="input must be"):
        layer(torch.randn(1, 3, 5, 5, 5), torch.randn(1, 3, 5, 5, 5))   # wrong input channels
    with pytest.raises(TypeError, match="guide must have"):
        layer(x, torch.randn(1, 3, 5, 5, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match="float32 or float64"):
        layer(x.to(torch.int64), torch.randn(1, 3, 5, 5, 5))
    with pytest.raises(ValueError, match="larger than the padded input"):
        layer(torch.randn(1, 2, 2, 5, 5), torch.randn(1, 3, 2, 5, 5))
