"""Sparse kernels (engine/sparse.py, _cpu/sparse.pxi): vc.sparse_conv3d against torch.conv3d with the dense
weight the non-zeros make (float64 reference, conftest tolerances: the sparse sum has fewer terms than the
dense one, so the dense bound holds), over strides, dilations, paddings and padding modes, groups, dtypes,
batches, odd and even kernels and densities from 0.1% to 50%; correlate/convolve with a 3-D SparseKernel
against scipy.ndimage; the layer's gradients; bad input."""
import numpy as np
import pytest
import scipy.ndimage as ndi

import volconv as vc
from volconv import SparseKernel

from conftest import check_conv3d, config_rng, valid_padding_for_mode

torch = pytest.importorskip("torch")

MODES = ["zeros", "reflect", "replicate", "circular"]


def sparse_weight(r, shape, density, dtype):
    w = r.standard_normal(shape).astype(dtype)
    w[r.random(shape) >= density] = 0
    return w


@pytest.mark.parametrize("i", range(40))
def test_sparse_random_configs_match_torch(i):
    r = config_rng(11, i)
    G = int(r.choice([1, 2]))
    Cg, Og = int(r.integers(1, 4)), int(r.integers(1, 4))
    ks = tuple(int(v) for v in r.integers(1, 8, 3))
    stride = tuple(int(v) for v in r.integers(1, 3, 3))
    dilation = tuple(int(v) for v in r.integers(1, 3, 3))
    spatial = tuple(int((k - 1) * d + 1 + r.integers(0, 12)) for k, d in zip(ks, dilation))
    mode = MODES[i % 4]
    padding = tuple(int(r.integers(0, 3)) for _ in range(3))
    if not valid_padding_for_mode(mode, [(p, p) for p in padding], spatial):
        mode = "zeros"
    dtype = np.float64 if i % 3 == 0 else np.float32
    density = [0.001, 0.01, 0.1, 0.3, 0.5][i % 5]
    w = sparse_weight(r, (Og * G, Cg) + ks, density, dtype)
    if not w.any():   # at 0.1% of a small kernel: keep one tap so the test says something
        w.flat[int(r.integers(w.size))] = 1.5
    x = r.standard_normal((int(r.integers(1, 3)), Cg * G) + spatial).astype(dtype)
    if i % 5 == 0:
        x = np.asfortranarray(x)   # non-contiguous in C order
    b = r.standard_normal(Og * G).astype(dtype) if i % 2 else None
    out = vc.sparse_conv3d(x, SparseKernel.from_dense(w), b, stride, padding, dilation, G, padding_mode=mode)
    check_conv3d(out, x, w, b, stride=stride, padding=padding, dilation=dilation, groups=G, padding_mode=mode,
                 algorithm="direct", context=f"case {i}: k{ks} s{stride} d{dilation} p{padding} {mode} G{G}")


def test_sparse_large_kernel_low_density_and_torch_sparse_weight():
    r = np.random.default_rng(0)
    w = sparse_weight(r, (1, 1, 15, 15, 15), 0.01, np.float32)
    x = r.standard_normal((1, 1, 30, 31, 33)).astype(np.float32)
    out = vc.sparse_conv3d(x, SparseKernel.from_dense(w), padding=7)
    check_conv3d(out, x, w, padding=7, algorithm="direct")
    tw = torch.from_numpy(w).to_sparse()
    out_t = vc.conv3d(torch.from_numpy(x), tw, padding=7)   # conv3d routes a sparse weight to the sparse path
    assert isinstance(out_t, torch.Tensor) and np.array_equal(out_t.numpy(), out)


@pytest.mark.parametrize("mode", ["reflect", "constant", "nearest", "mirror", "wrap"])
@pytest.mark.parametrize("op", ["correlate", "convolve"])
def test_sparse_kernel_filters_like_scipy(mode, op):
    r = np.random.default_rng(1)
    v = r.standard_normal((14, 15, 16))
    k = SparseKernel.from_dense(r.standard_normal((5, 4, 3)) * (r.random((5, 4, 3)) < 0.3))
    for volume in (v, np.asfortranarray(v)):   # NIfTI data are Fortran-ordered
        out = getattr(vc, op)(volume, k, mode=mode, cval=0.4, origin=(1, 0, -1))
        ref = getattr(ndi, op)(volume, k.to_dense(), mode=mode, cval=0.4, origin=(1, 0, -1))
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12)


def test_sparse_3d_kernel_is_depthwise_in_conv3d():
    r = np.random.default_rng(2)
    x = r.standard_normal((2, 3, 10, 11, 12))
    k = SparseKernel.from_dense(r.standard_normal((3, 3, 3)) * (r.random((3, 3, 3)) < 0.4))
    dense = np.ascontiguousarray(np.broadcast_to(k.to_dense(), (3, 1, 3, 3, 3)))
    np.testing.assert_allclose(vc.conv3d(x, k, padding=1), vc.conv3d(x, dense, padding=1, groups=3), atol=1e-12)


def test_sparse_kernel_construction():
    k = SparseKernel([[0, 0, 1], [2, 1, 0], [0, 0, 1]], [1.0, 2.0, 3.0], (3, 2, 2))
    assert k.nnz == 2 and k.to_dense()[0, 0, 1] == 4.0   # duplicates summed, as torch's coalesce
    assert abs(k.density - 2 / 12) < 1e-15
    w = np.arange(24.0).reshape(2, 3, 4) - 12
    assert SparseKernel.from_dense(w, density=0.25).nnz == 6
    assert set(np.abs(SparseKernel.from_dense(w, density=0.25).values)) == {12.0, 11.0, 10.0, 9.0}
    assert SparseKernel.from_dense(w, threshold=10).nnz == 3
    assert np.array_equal(SparseKernel.from_dense(w).to_dense(), w)
    t = torch.sparse_coo_tensor([[0, 1], [0, 1], [1, 0]], [5.0, 6.0], (2, 2, 2), check_invariants=True)
    assert np.array_equal(SparseKernel.from_torch(t).to_dense(), t.to_dense().numpy())


@pytest.mark.parametrize("bad, match", [
    (dict(indices=[[0, 0, 3]], values=[1.0], shape=(2, 2, 2)), "out of range"),
    (dict(indices=[[0, 0, -1]], values=[1.0], shape=(2, 2, 2)), "out of range"),
    (dict(indices=[[0, 0]], values=[1.0], shape=(2, 2, 2)), r"shape \(nnz, 3\)"),
    (dict(indices=[[0, 0, 0]], values=[1.0, 2.0], shape=(2, 2, 2)), "values has 2"),
    (dict(indices=[[0, 0, 0]], values=[np.nan], shape=(2, 2, 2)), "finite"),
    (dict(indices=[[0, 0, 0, 0]], values=[1.0], shape=(2, 2, 2, 2)), "3-D .* or 5-D"),
    (dict(indices=[[0.5, 0, 0]], values=[1.0], shape=(2, 2, 2)), "integers"),
])
def test_sparse_kernel_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        SparseKernel(**bad)


def test_sparse_conv3d_errors():
    k = SparseKernel([[0, 0, 0, 0, 0]], [1.0], (2, 3, 1, 1, 1))
    x = np.zeros((1, 4, 5, 5, 5), np.float32)
    with pytest.raises(ValueError, match="channels"):
        vc.sparse_conv3d(x, k)   # 3 input channels per group, the input has 4
    with pytest.raises(TypeError, match="SparseKernel"):
        vc.sparse_conv3d(x, np.zeros((2, 4, 1, 1, 1)))
    with pytest.raises(ValueError, match="5-D"):
        vc.sparse_conv3d(x[0, 0], k)   # (C, D, H, W) is taken, as torch does
    with pytest.raises(ValueError, match="larger than the padded input|kernel"):
        vc.sparse_conv3d(x[:, :3, :2], SparseKernel([[0, 0, 2, 0, 0]], [1.0], (2, 3, 3, 1, 1)))
    for bad in (dict(density=0), dict(density=1.5), dict(threshold=-1)):
        with pytest.raises(ValueError):
            SparseKernel.from_dense(np.ones((2, 2, 2)), **bad)


def test_sparse_layer_gradients_and_conversion():
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(4, 6, 3, padding=1, groups=2, padding_mode="reflect").double()
    layer = vc.nn.SparseConv3d.from_conv(conv, density=0.3)
    x = torch.randn(2, 4, 6, 7, 8, dtype=torch.float64, requires_grad=True)
    ref = torch.nn.functional.conv3d(torch.nn.functional.pad(x, (1,) * 6, mode="reflect"), layer.to_dense(),
                                     layer.bias, groups=2)
    assert torch.allclose(layer(x), ref, atol=1e-12)
    assert torch.autograd.gradcheck(layer, (x,))
    loss = layer(x).square().sum()
    loss.backward()
    ref_loss = torch.nn.functional.conv3d(torch.nn.functional.pad(x, (1,) * 6, mode="reflect"),
                                          layer.to_dense(), layer.bias, groups=2).square().sum()
    gv, gb = torch.autograd.grad(ref_loss, (layer.values, layer.bias))
    assert torch.allclose(layer.values.grad, gv, atol=1e-9) and torch.allclose(layer.bias.grad, gb, atol=1e-9)
    state = layer.state_dict()
    again = vc.nn.SparseConv3d(4, 6, 3, padding=1, groups=2, padding_mode="reflect", density=0.3).double()
    again.load_state_dict(state)
    assert torch.equal(again(x), layer(x))


def test_sparse_torch_weight_values_get_gradients():
    w = torch.sparse_coo_tensor(torch.tensor([[0, 1], [0, 0], [1, 0], [1, 1], [0, 2]]), torch.tensor([0.5, -1.0]),
                                (2, 1, 2, 2, 3), dtype=torch.float64, requires_grad=True,
                                check_invariants=True)
    x = torch.randn(1, 1, 5, 6, 7, dtype=torch.float64, requires_grad=True)
    out = vc.sparse_conv3d(x, w, padding=1)
    ref = torch.nn.functional.conv3d(x, w.to_dense(), padding=1)
    assert torch.allclose(out, ref, atol=1e-12)
    out.sum().backward()
    assert x.grad is not None and w.grad is not None
    xr = x.detach().clone().requires_grad_()
    wr = w.detach().to_dense().requires_grad_()
    torch.nn.functional.conv3d(xr, wr, padding=1).sum().backward()
    assert torch.allclose(x.grad, xr.grad, atol=1e-12)
    assert torch.allclose(w.grad.to_dense(), wr.grad * (w.detach().to_dense() != 0), atol=1e-12)


def test_auto_routes_a_mostly_zero_dense_weight_to_the_sparse_path():
    from volconv._validate import conv_spec
    from volconv.engine import cost

    r = np.random.default_rng(3)
    w = sparse_weight(r, (1, 1, 15, 15, 15), 0.01, np.float32)
    x = r.standard_normal((1, 1, 40, 41, 42)).astype(np.float32)
    spec = conv_spec(x.shape, w.shape, None, 1, 7, 1, 1, "zeros")
    assert cost.choose_algorithm(x, spec, 2, allow_torch=False, nnz=np.count_nonzero(w)) == "sparse"
    full = r.standard_normal((1, 1, 3, 3, 3)).astype(np.float32)   # a dense weight never is
    spec3 = conv_spec(x.shape, full.shape, None, 1, 1, 1, 1, "zeros")
    assert cost.choose_algorithm(x, spec3, 2, allow_torch=False, nnz=full.size) != "sparse"
    for algorithm in ("auto", "sparse"):
        check_conv3d(vc.conv3d(x, w, padding=7, algorithm=algorithm), x, w, padding=7, algorithm="direct")
