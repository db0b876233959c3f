"""vc.dynamic_conv3d and vc.nn.DynamicConv3d against the unfold reference written here in plain torch (the
semantics of the issue: patches unfolded with zero padding, multiplied by the per-voxel kernels, summed).

Tolerances: float64 within 1e-12 of the reference's scale (sums of at most a few hundred products);
float32 within 1e-5 of it."""
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import volconv as vc

from conftest import config_rng


def unfold3d(x, k, stride, padding, dilation):
    """(N, C, D, H, W) -> (N, C, T, Do, Ho, Wo): the patches every output voxel reads, zero padded."""
    xp = F.pad(x, (padding[2], padding[2], padding[1], padding[1], padding[0], padding[0]))
    outs = [(xp.shape[2 + i] - dilation[i] * (k[i] - 1) - 1) // stride[i] + 1 for i in range(3)]
    taps = []
    for t in itertools.product(*(range(n) for n in k)):
        sl = tuple(slice(t[i] * dilation[i], t[i] * dilation[i] + stride[i] * (outs[i] - 1) + 1, stride[i])
                   for i in range(3))
        taps.append(xp[(slice(None), slice(None)) + sl])
    return torch.stack(taps, 2)


def reference(x, K, k, stride, padding, dilation):
    U = unfold3d(x, k, stride, padding, dilation)
    if K.dim() == 6:   # (N, G, T, ...): every channel of a group uses its group's kernel
        N, G = K.shape[:2]
        C = x.shape[1]
        return (U.reshape(N, G, C // G, *U.shape[2:]) * K[:, :, None]).sum(3).reshape(N, C, *U.shape[3:])
    return (U[:, None] * K).sum((2, 3))


def out_size(n, k, s, p, d):
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def random_case(r, full):
    k = tuple(int(v) for v in r.integers(1, 8, size=3))
    stride = tuple(int(v) for v in r.integers(1, 3, size=3))
    dilation = tuple(int(v) for v in r.integers(1, 3, size=3))
    padding = tuple(int(r.integers(0, (kk * d) // 2 + 2)) for kk, d in zip(k, dilation))
    shape = tuple(int(max(kk * d, v)) for kk, d, v in zip(k, dilation, r.integers(3, 12, size=3)))
    N = int(r.integers(1, 3))
    if full:
        C, O = int(r.integers(1, 4)), int(r.integers(1, 4))
        lead = (N, O, C)
    else:
        G = int(r.integers(1, 4))
        C = G * int(r.integers(1, 3))
        lead = (N, G)
    outs = tuple(out_size(n, kk, s, p, d) for n, kk, s, p, d in zip(shape, k, stride, padding, dilation))
    x = r.standard_normal((N, C) + shape)
    K = r.standard_normal(lead + (int(np.prod(k)),) + outs)
    return x, K, k, stride, padding, dilation


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("case", range(12))
def test_random_cases_against_unfold(case, full):
    r = config_rng(601, case, full)
    x, K, k, stride, padding, dilation = random_case(r, full)
    want = reference(torch.from_numpy(x), torch.from_numpy(K), k, stride, padding, dilation).numpy()
    dtype = [np.float64, np.float32][case % 2]
    got = vc.dynamic_conv3d(x.astype(dtype), K.astype(dtype), k, stride, padding, dilation)
    assert got.dtype == dtype
    tol = 1e-12 if dtype == np.float64 else 1e-5
    assert np.abs(got - want).max() <= tol * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("case", range(6))
def test_gradients_against_autograd_through_unfold(case, full):
    r = config_rng(602, case, full)
    x, K, k, stride, padding, dilation = random_case(r, full)
    xs = [torch.tensor(x, requires_grad=True) for _ in range(2)]
    Ks = [torch.tensor(K, requires_grad=True) for _ in range(2)]
    g = torch.from_numpy(r.standard_normal(reference(xs[0], Ks[0], k, stride, padding, dilation).shape))
    vc.dynamic_conv3d(xs[0], Ks[0], k, stride, padding, dilation).backward(g)
    reference(xs[1], Ks[1], k, stride, padding, dilation).backward(g)
    for a, b in ((xs[0].grad, xs[1].grad), (Ks[0].grad, Ks[1].grad)):
        assert torch.allclose(a, b, rtol=0, atol=1e-12 * max(1.0, b.abs().max().item()))


def test_hand_picked_layouts_noncontiguous_and_gradcheck():
    torch.manual_seed(1)
    # involution: 16 channels in 4 groups, k = 5, 'same' padding, a non-contiguous input
    x = torch.randn(2, 16, 9, 23, 10).transpose(3, 4)
    K = torch.randn(2, 4, 125, 9, 10, 23)
    want = reference(x.double(), K.double(), (5, 5, 5), (1, 1, 1), (2, 2, 2), (1, 1, 1))
    got = vc.dynamic_conv3d(x, K, 5, padding="same")
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    assert torch.allclose(got.double(), want, atol=1e-5 * want.abs().max().item())
    # even kernel, stride 2, the full layout
    x = torch.randn(1, 2, 8, 9, 10, dtype=torch.float64, requires_grad=True)
    K = torch.randn(1, 3, 2, 8, 5, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, K: vc.dynamic_conv3d(x, K, 2, 2, 1), (x, K))
    x = torch.randn(1, 4, 5, 4, 6, dtype=torch.float64, requires_grad=True)
    K = torch.randn(1, 2, 27, 5, 4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, K: vc.dynamic_conv3d(x, K, 3, padding=(2, 1, 1), dilation=(2, 1, 1)),
                                    (x, K))


def test_thread_count_does_not_change_results():
    r = np.random.default_rng(4)
    x = r.standard_normal((1, 4, 10, 9, 33)).astype(np.float32)
    K = r.standard_normal((1, 2, 27, 10, 9, 33)).astype(np.float32)
    one = vc.dynamic_conv3d(x, K, 3, padding=1, workers=1)
    assert np.array_equal(one, vc.dynamic_conv3d(x, K, 3, padding=1, workers=2))
    xt, Kt = (torch.tensor(a, requires_grad=True) for a in (x, K))
    grads = []
    for workers in (1, 2):
        xt.grad = Kt.grad = None
        vc.dynamic_conv3d(xt, Kt, 3, padding=1, workers=workers).sum().backward()
        grads.append((xt.grad.clone(), Kt.grad.clone()))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("kwargs", [dict(groups=2), dict(groups=1, dilation=2), dict(groups=4, hidden=5)])
def test_layer_tiles_equal_the_whole_volume(kwargs):
    torch.manual_seed(0)
    m = vc.nn.DynamicConv3d(4, 3, dtype=torch.float64, **kwargs)
    x = torch.randn(2, 4, 11, 6, 7, dtype=torch.float64, requires_grad=True)
    field = m.kernel_fn(x).reshape(2, m.groups, 27, 11, 6, 7)
    pad = tuple(3 // 2 * d for d in m.dilation)
    want = reference(x, field, (3, 3, 3), (1, 1, 1), pad, m.dilation)
    whole = m(x)
    assert torch.allclose(whole, want, atol=1e-12)
    g = torch.randn_like(whole)
    grads = torch.autograd.grad(whole, [x] + list(m.parameters()), g)
    m.tile = 3   # tiles of 3 output planes: slabs, halos and the volume's ends all meet
    tiled = m(x)
    assert torch.allclose(tiled, whole, atol=1e-12)
    for a, b in zip(torch.autograd.grad(tiled, [x] + list(m.parameters()), g), grads):
        assert torch.allclose(a, b, atol=1e-11)
    # a first layer: the input needs no gradient, the parameters do
    frozen = x.detach()
    for a, b in zip(torch.autograd.grad(m(frozen), list(m.parameters()), g), grads[1:]):
        assert torch.allclose(a, b, atol=1e-11)


def test_full_layer_gradcheck():
    torch.manual_seed(2)
    m = vc.nn.DynamicConv3d.full(3, 2, 3, hidden=4, dtype=torch.float64)
    x = torch.randn(1, 3, 5, 4, 6, dtype=torch.float64, requires_grad=True)
    assert m(x).shape == (1, 2, 5, 4, 6)
    assert torch.autograd.gradcheck(m, (x,))


def test_errors():
    x = np.zeros((1, 4, 5, 5, 5))
    with pytest.raises(ValueError, match=r"kernels must have shape \(1, 2, 27, 5, 5, 5\)"):
        vc.dynamic_conv3d(x, np.zeros((1, 2, 27, 4, 5, 5)), 3, padding=1)
    with pytest.raises(ValueError, match=r"kernels must have shape \(1, 2, 8, 5, 5, 5\)"):
        vc.dynamic_conv3d(x, np.zeros((1, 2, 27, 5, 5, 5)), 2, padding="same")   # kernel_size mismatch
    with pytest.raises(ValueError, match="G=3 groups, which must divide the input's 4 channels"):
        vc.dynamic_conv3d(x, np.zeros((1, 3, 27, 5, 5, 5)), 3, padding=1)
    with pytest.raises(ValueError, match="has Cin=3 but the input has 4 channels"):
        vc.dynamic_conv3d(x, np.zeros((1, 2, 3, 27, 5, 5, 5)), 3, padding=1)
    with pytest.raises(ValueError, match="kernels must be"):
        vc.dynamic_conv3d(x, np.zeros((1, 27, 5, 5, 5)), 3, padding=1)
    with pytest.raises(ValueError, match="input must be 5-D"):
        vc.dynamic_conv3d(x[0, 0], np.zeros((1, 1, 27, 5, 5, 5)), 3, padding=1)
    with pytest.raises(TypeError, match="kernels has dtype float32 but input has dtype float64"):
        vc.dynamic_conv3d(x, np.zeros((1, 1, 27, 5, 5, 5), np.float32), 3, padding=1)
    with pytest.raises(ValueError, match="larger than the padded input"):
        vc.dynamic_conv3d(x, np.zeros((1, 1, 343, 1, 1, 1)), 7)
    with pytest.raises(ValueError, match="tile must be None or a positive int"):
        vc.nn.DynamicConv3d(4, 3, tile=0)
    with pytest.raises(ValueError, match="groups must be a positive int dividing in_channels"):
        vc.nn.DynamicConv3d(4, 3, groups=3)
    m = vc.nn.DynamicConv3d(4, 3, kernel_fn=torch.nn.Conv3d(4, 5, 1))
    with pytest.raises(ValueError, match=r"kernel_fn must return \(N, 27, D, H, W\)"):
        m(torch.zeros(1, 4, 5, 5, 5))


# ------------------------------------------------------------------------------------- adaptive filtering


def brute_force_adaptive(v, sigma, zooms, truncate, mode, cval=0.0):
    """Every voxel's own 3-D Gaussian (scipy's truncation and normalisation per axis), summed explicitly."""
    z = np.asarray(zooms, float)
    R = [int(truncate * sigma.max() / za + 0.5) for za in z]
    pad = {"reflect": "symmetric", "nearest": "edge", "mirror": "reflect", "wrap": "wrap", "constant": "constant"}
    vp = np.pad(v, [(r, r) for r in R], mode=pad[mode], **({"constant_values": cval} if mode == "constant" else {}))
    out = np.empty_like(v)
    for p in np.ndindex(v.shape):
        g = []
        for a in range(3):
            s = sigma[p] / z[a]
            own = int(truncate * s + 0.5)
            t = np.arange(-own, own + 1)
            w = np.exp(-0.5 * t ** 2 / s ** 2) if s > 0 else (t == 0).astype(float)
            g.append(w / w.sum())
        k = g[0][:, None, None] * g[1][None, :, None] * g[2][None, None, :]
        sl = tuple(slice(p[a] + R[a] - len(g[a]) // 2, p[a] + R[a] + len(g[a]) // 2 + 1) for a in range(3))
        out[p] = (k * vp[sl]).sum()
    return out


@pytest.mark.parametrize("mode", ["reflect", "constant", "nearest", "mirror", "wrap"])
def test_adaptive_filter_against_per_voxel_kernels(mode):
    r = np.random.default_rng(9)
    v = r.standard_normal((6, 7, 9))
    sigma = r.uniform(0, 2.0, v.shape)
    sigma[0, 0, 0] = 0.0   # the voxel itself
    zooms = (1.0, 1.5, 0.8)
    got = vc.adaptive_filter(v, sigma, zooms, truncate=2.0, mode=mode, cval=0.3)
    np.testing.assert_allclose(got, brute_force_adaptive(v, sigma, zooms, 2.0, mode, 0.3), rtol=0, atol=1e-12)


def test_adaptive_filter_with_a_constant_map_is_gaussian_filter():
    import scipy.ndimage as ndi

    r = np.random.default_rng(10)
    v = r.standard_normal((24, 19, 40)).astype(np.float32)
    for sigma, zooms in ((2.0, None), (1.5, (1.0, 2.0, 0.7))):
        got = vc.adaptive_filter(torch.from_numpy(v), np.full(v.shape, sigma, np.float32), zooms, truncate=3.0)
        assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
        want = ndi.gaussian_filter(v.astype(np.float64), sigma / np.asarray(zooms or (1, 1, 1)), truncate=3.0)
        assert np.abs(got.numpy() - want).max() <= 1e-5 * np.abs(want).max()


def test_adaptive_filter_errors():
    v = np.zeros((4, 5, 6))
    with pytest.raises(ValueError, match="sigma_map must have the volume's shape"):
        vc.adaptive_filter(v, np.zeros((4, 5, 5)))
    with pytest.raises(ValueError, match="finite and >= 0"):
        vc.adaptive_filter(v, np.full(v.shape, -1.0))
    with pytest.raises(ValueError, match="volume must be 3-D"):
        vc.adaptive_filter(v[0], np.zeros((5, 6)))
    with pytest.raises(ValueError, match="zooms must be 3 positive"):
        vc.adaptive_filter(v, np.ones(v.shape), zooms=(1, 0, 1))
    with pytest.raises(ValueError, match="mode must be one of"):
        vc.adaptive_filter(v, np.ones(v.shape), mode="circular")


def test_cli_sigma_map(tmp_path, capsys):
    import nibabel as nib
    import scipy.ndimage as ndi

    from volconv import cli

    aff = np.diag([1.0, 2.0, 1.5, 1.0])
    v = np.random.default_rng(11).standard_normal((20, 18, 16)).astype(np.float32)
    header = nib.Nifti1Header()
    header.set_xyzt_units("mm")
    nib.save(nib.Nifti1Image(v, aff, header), tmp_path / "v.nii.gz")
    nib.save(nib.Nifti1Image(np.full(v.shape, 2.0, np.float32), aff, header), tmp_path / "s.nii.gz")
    args = ["filter", str(tmp_path / "v.nii.gz"), str(tmp_path / "o.nii.gz"), "--sigma-map", str(tmp_path / "s.nii.gz")]
    assert cli.main(args) == 0
    out = nib.load(tmp_path / "o.nii.gz").get_fdata()
    want = ndi.gaussian_filter(v.astype(np.float64), 2.0 / np.array([1.0, 2.0, 1.5]), truncate=3.0)
    assert np.abs(out - want).max() <= 1e-5 * np.abs(want).max()
    assert cli.main(args) == 1 and "exists; use --force" in capsys.readouterr().err
    nib.save(nib.Nifti1Image(np.full((20, 18, 15), 2.0, np.float32), aff, header), tmp_path / "bad.nii.gz")
    assert cli.main(args[:2] + [str(tmp_path / "o2.nii.gz"), "--sigma-map", str(tmp_path / "bad.nii.gz")]) == 1
    assert "must be 3-D on the volume's grid" in capsys.readouterr().err
    assert not (tmp_path / "o2.nii.gz").exists() and sorted(p.name for p in tmp_path.iterdir()) == \
        ["bad.nii.gz", "o.nii.gz", "s.nii.gz", "v.nii.gz"]   # nothing left behind
    with pytest.raises(SystemExit):
        cli.main(args + ["--mask", str(tmp_path / "s.nii.gz")])
