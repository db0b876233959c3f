"""Issue 14, items 1-3: constant-mode boundaries and NaN/Inf propagation on every compute path.

References are scipy.ndimage (float64 copies) for correlate/convolve and torch (float64) for the layers.
Tolerances scale with the DATA, never with cval: per voxel, conftest.conv_tolerance of
mag = scipy's filter of |volume| by |kernel| with zeros outside, plus |cval| times the |weights| whose taps
fall outside the volume (zero in the interior); the FFT's global term uses the data's magnitude only. So
an interior voxel must be as exact as with cval = 0, whatever cval is (1e8 in float32 included).
Non-finite results must sit exactly where scipy / torch put them, with the same values.
"""
import math

import numpy as np
import pytest
import scipy.ndimage as ndi
from hypothesis import given, settings, strategies as st

from conftest import FFT_COEFF, assert_within, conv_tolerance

vc = pytest.importorskip("volconv")
torch = pytest.importorskip("torch")

CVALS = [0.0, 1.0, 1e3, 1e8, math.nan, math.inf, -math.inf]


def reference(func, volume, kernel, cval, origin):
    """(scipy's result, per-voxel magnitude of the data part + |cval| * |weights| outside the volume)."""
    f = getattr(ndi, func)
    v, k = volume.astype(np.float64), np.asarray(kernel, np.float64)
    ref = f(v, k, mode="constant", cval=cval, origin=origin)
    data = f(np.abs(v), np.abs(k), mode="constant", cval=0.0, origin=origin)
    outside = f(np.zeros_like(v), np.abs(k), mode="constant", cval=1.0, origin=origin)
    with np.errstate(invalid="ignore"):
        border = np.where(outside > 0, abs(cval) * outside, 0.0) if math.isfinite(cval) else 0.0
    return ref, data, data + border


def check(out, ref, data, mag, dtype, n_taps, algorithm, context):
    out = np.asarray(out, np.float64)
    assert out.shape == ref.shape, context
    finite = np.isfinite(ref)
    # non-finite values exactly where scipy has them (NaN only near the border for a non-finite cval)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref), err_msg=f"{context}: NaN pattern")
    np.testing.assert_array_equal(out[~finite & ~np.isnan(ref)], ref[~finite & ~np.isnan(ref)],
                                  err_msg=f"{context}: Inf values")
    tol = conv_tolerance(np.where(finite, mag, 0.0), dtype, n_taps, "direct")
    if algorithm in ("fft", "auto"):   # the FFT's global rounding, of the data only (a box of 2x the volume)
        tol = tol + FFT_COEFF * np.finfo(dtype).eps * math.log2(8 * ref.size) * float(np.max(data, initial=0))
    assert_within(np.where(finite, out, 0.0), np.where(finite, ref, 0.0), tol, context)


def sparse_kernel(rng, shape):
    k = np.zeros(shape)
    idx = rng.choice(k.size, max(1, k.size // 5), replace=False)
    k.flat[idx] = rng.standard_normal(idx.size)
    return k


# ------------------------------------------------------------------------------------------------- item 1


def test_sparse_auto_applies_cval_once():
    """The issue's case: a mostly-zero kernel goes to the sparse path under "auto"; cval counted once."""
    k = np.zeros((3, 3, 3))
    k[0, 0, 0] = 1
    out = vc.correlate(np.zeros((8, 8, 8)), k, mode="constant", cval=1.0)
    np.testing.assert_array_equal(out, ndi.correlate(np.zeros((8, 8, 8)), k, mode="constant", cval=1.0))


@pytest.mark.parametrize("func", ["correlate", "convolve"])
def test_ball_kernel_constant_cval(func, rng):
    """Every ball kernel (zeros in its corners) with a non-zero cval, by every algorithm."""
    ball = np.asarray(vc.kernels.ball(3).to_dense(), np.float64)
    x = rng.standard_normal((12, 11, 10))
    ref, data, mag = reference(func, x, ball, 2.5, 0)
    for algorithm in ("auto", "direct", "sparse", "fft"):
        out = getattr(vc, func)(x, ball, mode="constant", cval=2.5, algorithm=algorithm)
        check(out, ref, data, mag, np.float64, ball.size, algorithm, f"{func} ball {algorithm}")


def test_ball_constant_cval_through_filter_nifti(tmp_path, rng):
    nib = pytest.importorskip("nibabel")
    x = rng.standard_normal((10, 9, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(x, np.eye(4)), tmp_path / "in.nii")
    kernel = vc.kernels.ball(2)
    vc.filter_nifti(tmp_path / "in.nii", tmp_path / "out.nii", kernel, mode="constant", cval=3.0)
    out = np.asarray(nib.load(tmp_path / "out.nii").dataobj)
    dense = np.asarray(kernel.to_dense(), np.float64)
    ref, data, mag = reference("correlate", x, dense, 3.0, 0)
    check(out, ref, data, mag, np.float32, dense.size, "auto", "filter_nifti ball cval=3")


# ------------------------------------------------------------------------------------------------- item 2


@pytest.mark.parametrize("cval", CVALS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("algorithm", ["auto", "direct", "sparse", "fft", "torch"])
def test_constant_cval_matches_scipy(cval, dtype, algorithm, rng):
    """Odd, even and mixed kernels, origins, correlate and convolve: the constant enters only where the window
    leaves the volume (float32 with cval=1e8 keeps the data's precision inside; NaN/Inf only near the border)."""
    if algorithm == "fft" and not math.isfinite(cval):
        pytest.skip("fft spreads non-finite values by design; covered by test_fft_nonfinite_cval_border_only")
    for func, shape, origin in [("correlate", (3, 3, 3), 0), ("convolve", (4, 2, 5), (1, 0, -2)),
                                ("correlate", (5, 4, 3), (-2, 1, 0)), ("convolve", (7, 7, 7), 0)]:
        x = (rng.standard_normal((13, 12, 11)) + 0.5).astype(dtype)
        k = rng.standard_normal(shape)
        if algorithm == "sparse":
            k[rng.random(shape) < 0.6] = 0
        out = getattr(vc, func)(x, k.astype(dtype), mode="constant", cval=cval, origin=origin, algorithm=algorithm)
        assert out.dtype == dtype
        ref, data, mag = reference(func, x, k.astype(dtype), cval, origin)
        check(out, ref, data, mag, dtype, k.size, algorithm, f"{func} {shape} origin={origin} cval={cval} "
                                                             f"{np.dtype(dtype).name} {algorithm}")


def test_fft_nonfinite_cval_border_only(rng):
    """Even the FFT path keeps a NaN cval at the border: the constant is not part of the transforms."""
    x = rng.standard_normal((12, 12, 12))
    k = rng.random((5, 5, 5)) + 0.1   # positive weights: inf * w is inf for scipy as well
    for cval in (math.nan, math.inf, -math.inf):
        out = vc.correlate(x, k, mode="constant", cval=cval, algorithm="fft")
        ref, data, mag = reference("correlate", x, k, cval, 0)
        check(out, ref, data, mag, np.float64, k.size, "fft", f"fft cval={cval}")


@pytest.mark.parametrize("cval", CVALS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_separable_constant_cval(cval, dtype, rng):
    """Gaussian and box kernels (separable passes) equal scipy.ndimage.correlate with their dense kernel."""
    x = (rng.standard_normal((14, 13, 12)) + 0.5).astype(dtype)
    for kernel in (vc.kernels.gaussian(1.2), vc.kernels.box((3, 4, 5))):
        dense = np.asarray(kernel.to_dense(), np.float64)
        ref, data, mag = reference("correlate", x, dense, cval, 0)
        for algorithm in ("auto", "fft", "torch"):
            out = vc.correlate(x, kernel, mode="constant", cval=cval, algorithm=algorithm)
            check(out, ref, data, mag, dtype, dense.size, algorithm if algorithm != "torch" else "direct",
                  f"{type(kernel).__name__} {dense.shape} cval={cval} {np.dtype(dtype).name} {algorithm}")


def test_issue_examples_float32():
    """cval=1e3: interior error was ~3e-4; cval=1e8: -14.98 instead of ~0.5; cval=NaN: every voxel NaN."""
    rng = np.random.default_rng(0)
    x = rng.random((16, 16, 16)).astype(np.float32)
    k = np.full((3, 3, 3), 1 / 27, np.float32)
    inner = (slice(1, -1),) * 3
    for cval in (1e3, 1e8):
        out = vc.correlate(x, k, mode="constant", cval=cval)
        ref = ndi.correlate(x.astype(np.float64), k.astype(np.float64), mode="constant", cval=cval)
        np.testing.assert_allclose(out[inner], ref[inner], rtol=0, atol=1e-6)
    out = vc.correlate(x, k, mode="constant", cval=math.nan)
    assert np.isfinite(out[inner]).all() and np.isnan(out[0]).all()


@settings(max_examples=25, deadline=None)
@given(shape=st.tuples(*[st.integers(1, 6)] * 3), vshape=st.tuples(*[st.integers(1, 9)] * 3),
       cval=st.sampled_from(CVALS), flip=st.booleans(), seed=st.integers(0, 2**16),
       algorithm=st.sampled_from(["auto", "direct", "sparse"]))
def test_constant_cval_random(shape, vshape, cval, flip, seed, algorithm):
    """Random shapes, including volumes thinner than the kernel (every voxel on the border)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(vshape)
    k = rng.standard_normal(shape) * (rng.random(shape) < 0.7)
    func = "convolve" if flip else "correlate"
    out = getattr(vc, func)(x, k, mode="constant", cval=cval, algorithm=algorithm)
    ref, data, mag = reference(func, x, k, cval, 0)
    check(out, ref, data, mag, np.float64, k.size, algorithm, f"{func} {shape} on {vshape} cval={cval}")


def test_constant_cval_tensor_path():
    """Tensors that need gradients take the autograd path: float32 with cval=1e8 keeps the data's precision
    inside (it computed x - cval before)."""
    rng = np.random.default_rng(7)
    x = rng.random((10, 9, 8)).astype(np.float32)
    k = rng.random((3, 3, 3)).astype(np.float32)
    kt = torch.tensor(k, requires_grad=True)
    out = vc.correlate(torch.tensor(x), kt, mode="constant", cval=1e8)
    ref, data, mag = reference("correlate", x, k, 1e8, 0)
    check(out.detach().numpy(), ref, data, mag, np.float32, k.size, "auto", "autograd correlate cval=1e8")
    out.sum().backward()
    assert kt.grad is not None and torch.isfinite(kt.grad).all()


def test_constant_cval_weight_gradient():
    """Autograd through correlate with a constant cval: the weight gradient sees cval outside (float64 torch
    reference of the padded correlation)."""
    rng = np.random.default_rng(1)
    x = torch.tensor(rng.standard_normal((9, 8, 7)))
    k = torch.tensor(rng.standard_normal((3, 4, 3)), requires_grad=True)
    cval = 1e3
    out = vc.correlate(x, k, mode="constant", cval=cval)
    k2 = k.detach().clone().requires_grad_(True)
    pad = torch.nn.functional.pad(x, (1, 1, 2, 1, 1, 1), value=cval)   # W, H, D: scipy's k // 2 before
    ref = torch.nn.functional.conv3d(pad[None, None], k2[None, None])[0, 0]
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-9)
    g = torch.tensor(rng.standard_normal(tuple(out.shape)))
    (out * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(k.grad, k2.grad, rtol=1e-10, atol=1e-8)


# ------------------------------------------------------------------------------------------------- item 3


ACTS = [None, "relu", "gelu", "silu"]


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("algorithm", ["auto", "fused", "stages"])
def test_nested_nonfinite_propagates_as_torch(activation, algorithm):
    """relu(NaN) is NaN in torch: the fused chain must not turn it into 0 (nor gelu/silu of +-Inf differ)."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 2, 10, 9, 8))
    x[0, 0, 5, 4, 4] = np.nan
    x[0, 1, 2, 2, 2] = np.inf
    x[0, 1, 7, 6, 3] = -np.inf
    ws = [rng.standard_normal((3, 2, 3, 3, 3)), rng.standard_normal((2, 3, 1, 1, 1))]
    out = vc.nested_conv3d(x, ws, activation=activation, algorithm=algorithm)
    act = {None: lambda t: t, "relu": torch.relu, "gelu": torch.nn.functional.gelu,
           "silu": torch.nn.functional.silu}[activation]
    t = torch.tensor(x)
    y = act(torch.nn.functional.conv3d(t, torch.tensor(ws[0]), padding=1))
    ref = torch.nn.functional.conv3d(y, torch.tensor(ws[1])).numpy()
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref), err_msg="NaN pattern")
    np.testing.assert_array_equal(np.isinf(out), np.isinf(ref), err_msg="Inf pattern")
    fin = np.isfinite(ref)
    np.testing.assert_allclose(out[fin], ref[fin], rtol=1e-10, atol=1e-10)


def test_fused_activations_match_torch_on_nonfinite_values():
    """Every activation of the fused kernel agrees with the python side ("stages") and with torch in float64
    at NaN, +-Inf, 0, +-x. (torch's float32 gelu gives NaN at +Inf, an artefact of its vectorised erf;
    volconv gives gelu(+Inf) = +Inf in both precisions, as torch does in float64.)"""
    vals = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1.5, -1.5, 30.0, -30.0])
    for dtype in (np.float32, np.float64):
        x = np.zeros((1, 1, 1, 1, vals.size), dtype)
        x[0, 0, 0, 0] = vals
        w1 = np.ones((1, 1, 1, 1, 1), dtype)
        for activation in ("relu", "gelu", "silu"):
            out = vc.nested_conv3d(x, [w1, w1], activation=activation, algorithm="fused")
            stages = vc.nested_conv3d(x, [w1, w1], activation=activation, algorithm="stages")
            act = {"relu": torch.relu, "gelu": torch.nn.functional.gelu,
                   "silu": torch.nn.functional.silu}[activation]
            ref = act(torch.tensor(x, dtype=torch.float64)).numpy()
            for got, name in ((out, "fused"), (stages, "stages")):
                np.testing.assert_allclose(got, ref, rtol=2e-6, atol=0, equal_nan=True,
                                           err_msg=f"{name} {activation} {np.dtype(dtype).name}")


def test_auto_zero_taps_of_nonfinite_input_as_torch_and_scipy():
    """vc.conv3d follows torch: 0 * NaN = NaN, so a mostly-zero weight must not go to the sparse path when the
    input is not finite. vc.correlate follows scipy.ndimage, whose footprint holds the non-zero weights only:
    a NaN under a zero weight does not spread there."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 1, 10, 10, 10))
    x[0, 0, 5, 5, 5] = np.nan
    w = np.zeros((1, 1, 5, 5, 5))
    w[0, 0, 2, 2, 2] = 1.0
    ref = torch.nn.functional.conv3d(torch.tensor(x), torch.tensor(w), padding=2).numpy()
    out = vc.conv3d(x, w, padding=2)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
    out = vc.correlate(x[0, 0], w[0, 0], mode="constant")
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ndi.correlate(x[0, 0], w[0, 0], mode="constant")))


def test_auto_checks_nonfinite_weights_before_fft():
    """A large kernel with one infinite weight: torch has +-Inf by the sign of the voxel under it; "auto" must
    not run the FFT (NaN everywhere)."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 1, 40, 40, 40))   # large enough that the cost model prefers the FFT
    w = rng.standard_normal((1, 1, 13, 13, 13))
    w[0, 0, 0, 0, 0] = np.inf
    ref = torch.nn.functional.conv3d(torch.tensor(x), torch.tensor(w)).numpy()
    assert np.isinf(ref).all()
    np.testing.assert_array_equal(vc.conv3d(x, w), ref)


def test_autograd_auto_checks_nonfinite_weights():
    """The differentiable path makes the same choice (one place decides finiteness)."""
    rng = np.random.default_rng(5)
    x = torch.tensor(rng.standard_normal((1, 1, 40, 40, 40)), requires_grad=True)
    w = torch.tensor(rng.standard_normal((1, 1, 13, 13, 13)))
    w[0, 0, 0, 0, 0] = math.inf
    w.requires_grad_(True)
    out = vc.conv3d(x, w)
    ref = torch.nn.functional.conv3d(x.detach(), w.detach())
    np.testing.assert_array_equal(out.detach().numpy(), ref.numpy())


def test_multiscale_nonfinite_input_as_branches():
    """Dilated branches skip the voxels between their taps; the merged kernel's structural zeros must not
    multiply a NaN there ("auto" runs the branches for non-finite input)."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((1, 2, 12, 12, 12))
    x[0, 0, 6, 6, 7] = np.nan
    ws = [rng.standard_normal((2, 2, 5, 5, 5)), rng.standard_normal((2, 2, 3, 3, 3))]
    out = vc.multiscale_conv3d(x, ws, dilations=[1, 2], combine="concat")   # merged: mostly non-zero, dense
    t = torch.tensor(x)
    ref = torch.cat([torch.nn.functional.conv3d(t, torch.tensor(w), padding="same", dilation=d)
                     for w, d in zip(ws, (1, 2))], dim=1).numpy()
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
    fin = np.isfinite(ref)
    np.testing.assert_allclose(out[fin], ref[fin], rtol=1e-10, atol=1e-10)
