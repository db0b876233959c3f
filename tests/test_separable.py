"""The fused separable kernel (engine/separable.py, _cpu/separable.pxi): a SeparableKernel's three 1-D passes in
one pass over memory must equal the dense 3-D kernel applied depthwise by torch.conv3d (float64 reference,
tolerance of conftest.conv_tolerance for the dense kernel's terms: |passes - dense| is bounded by the same
rounding analysis, the per-output magnitude being conv(|x|, |fd| x |fh| x |fw|)).

Random configurations cover what the kernel's tiling must get right: rows narrower than a vector and not a
multiple of one, kernels longer than the P rows filtered at once, ring wrap-around, strides and dilations on
every axis, every padding mode with padding larger than the kernel, batches and channels, float32/float64,
non-contiguous inputs."""
import numpy as np
import pytest

import volconv as vc
from volconv.kernels import SeparableKernel

from conftest import check_conv3d, config_rng, valid_padding_for_mode

MODES = ["zeros", "reflect", "replicate", "circular"]


def random_case(i):
    r = config_rng(7, i)
    shape = tuple(int(v) for v in r.integers(1, 36, 3))
    ks = tuple(int(min(v, 2 * s + 1)) for v, s in zip(r.integers(1, 26, 3), shape))
    stride = tuple(int(v) for v in r.integers(1, 4, 3))
    dilation = tuple(int(v) for v in r.integers(1, 3, 3))
    mode = MODES[i % len(MODES)]
    padding = tuple(int(r.integers(0, (k - 1) * d + 3)) for k, d in zip(ks, dilation))
    return r, shape, ks, stride, dilation, mode, padding


def effective_ok(shape, ks, stride, dilation, padding, mode):
    pads = [(p, p) for p in padding]
    if not valid_padding_for_mode(mode, pads, shape):
        return False
    return all(n + 2 * p >= (k - 1) * d + 1 for n, k, d, p in zip(shape, ks, dilation, padding))


@pytest.mark.parametrize("i", range(48))
def test_separable_random_configs_match_torch(i):
    r, shape, ks, stride, dilation, mode, padding = random_case(i)
    if not effective_ok(shape, ks, stride, dilation, padding, mode):
        padding, mode = tuple((k - 1) * d for k, d in zip(ks, dilation)), "zeros"
    dtype = np.float32 if i % 3 else np.float64
    N, C = int(r.integers(1, 3)), int(r.integers(1, 4))
    rank = 1 if i % 4 else [2, 3, 5][(i // 4) % 3]   # several terms: summed in one fused pass
    kernel = SeparableKernel([r.standard_normal((rank, k)) for k in ks], weights=r.standard_normal(rank))
    x = r.standard_normal((N, C) + shape).astype(dtype)
    if i % 5 == 0:  # non-contiguous: every other W column of a wider array
        wide = r.standard_normal((N, C) + shape[:2] + (2 * shape[2],)).astype(dtype)
        x = wide[..., ::2]
    out = vc.conv3d(x, kernel, stride=stride, padding=padding, dilation=dilation, padding_mode=mode)
    w = np.ascontiguousarray(np.broadcast_to(kernel.to_dense(), (C, 1) + ks))
    check_conv3d(out, x, w, stride=stride, padding=padding, dilation=dilation, groups=C, padding_mode=mode,
                 algorithm="direct", context=f"case {i}: {shape} k{ks} s{stride} d{dilation} p{padding} {mode}")


@pytest.mark.parametrize("W", [1, 5, 15, 16, 17, 31, 33, 64, 100])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_separable_row_widths(W, dtype):
    """Rows narrower than a vector, exactly one, and a ragged tail after whole blocks."""
    rng = np.random.default_rng(W)
    x = rng.standard_normal((1, 2, 9, 11, W)).astype(dtype)
    kernel = SeparableKernel([rng.standard_normal(5), rng.standard_normal(3), rng.standard_normal(min(7, W))])
    out = vc.conv3d(x, kernel, padding="same", padding_mode="zeros")
    w = np.ascontiguousarray(np.broadcast_to(kernel.to_dense(), (2, 1) + kernel.shape))
    check_conv3d(out, x, w, padding="same", groups=2, algorithm="direct", context=f"W={W}")


def test_separable_long_kernels_and_ring_wraparound():
    """Kernels much longer than the rows filtered at once (P = 4 or 8) on every axis, on a deep volume so the
    ring of filtered tiles wraps many times. Reference: scipy's 1-D correlations in float64 (a dense 3-D
    reference would need 35 GB here); bound: gamma_n * conv(|x|, |k|) with n = the taps of the three passes."""
    import scipy.ndimage as ndi

    rng = np.random.default_rng(3)
    x = rng.standard_normal((90, 40, 37)).astype(np.float32)
    fs = [rng.standard_normal(41), rng.standard_normal(23), rng.standard_normal(35)]
    out = vc.correlate(x, SeparableKernel(fs), mode="mirror")
    ref, mag = x.astype(np.float64), np.abs(x.astype(np.float64))
    for axis, f in enumerate(fs):
        ref = ndi.correlate1d(ref, f, axis=axis, mode="mirror")
        mag = ndi.correlate1d(mag, np.abs(f), axis=axis, mode="mirror")
    n = sum(f.size for f in fs) + 3
    u = np.finfo(np.float32).eps / 2
    assert (np.abs(out - ref) <= n * u / (1 - n * u) * mag).all()


def test_separable_threads_give_identical_results():
    """Units are independent and each output is summed in a fixed order: any thread count, the same bits."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 40, 50, 45)).astype(np.float32)
    k = vc.kernels.gaussian((1.5, 2.0, 1.0))
    outs = [vc.conv3d(x, k, padding="same", padding_mode="reflect", workers=n) for n in (1, 2, 3)]
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])


def test_separable_nonfinite_input_stays_local():
    """A NaN reaches only the outputs whose window holds it (no FFT here, no spreading through padding)."""
    x = np.zeros((30, 31, 32), np.float32)
    x[15, 15, 15] = np.nan
    out = vc.correlate(x, vc.kernels.gaussian(1.0, truncate=2.0), mode="constant")
    assert np.isnan(out[13:18, 13:18, 13:18]).all()
    assert np.isfinite(out[:12]).all() and np.isfinite(out[19:]).all() and np.isfinite(out[:, :, :12]).all()


def test_separable_explicit_algorithms_agree():
    """algorithm='fft' and 'torch' still run the 1-D passes as depthwise convolutions: same numbers."""
    pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 2, 20, 21, 22))
    k = vc.kernels.gaussian(1.2)
    ref = vc.conv3d(x, k, padding="same", padding_mode="replicate", algorithm="direct")
    for algorithm in ("fft", "torch"):
        out = vc.conv3d(x, k, padding="same", padding_mode="replicate", algorithm=algorithm)
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-10)


def symmetric(rng, rank, k):
    """rank random factors of k taps with f == f[::-1] (the symmetric passes' half multiplies)."""
    f = rng.standard_normal((rank, k))
    return f + f[:, ::-1]


NUMPY_PAD = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def passes_reference(x, kernel, pad, mode):
    """float64 (result, magnitude) of a SeparableKernel as 1-D valid correlations of the padded volume, term by
    term: the magnitude bounds the rounding (gamma_n * conv(|x|, |k|), n the taps of the three passes)."""
    xp = np.pad(x.astype(np.float64), [(0, 0), (0, 0)] + [(p, p) for p in pad], mode=NUMPY_PAD[mode])
    ref = mag = 0
    for weight, factors in kernel.terms():
        y, m = xp * weight, np.abs(xp * weight)
        for axis, f in enumerate(factors, start=2):
            n = y.shape[axis] - f.size + 1
            take = lambda a, t: np.take(a, np.arange(t, t + n), axis=axis)  # noqa: E731
            y, m = sum(f[t] * take(y, t) for t in range(f.size)), sum(abs(f[t]) * take(m, t) for t in range(f.size))
        ref, mag = ref + y, mag + m
    return ref, mag


@pytest.mark.parametrize("k", [2, 3, 4, 5, 8, 9, 16, 17, 18, 33, 34, 35, 41])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_symmetric_factors_match_dense(k, dtype):
    """Symmetric factors take sym_rows (D and H) and sym_row (W): odd and even k, shorter and longer than a
    vector (the W pass shifts registers below VL taps and loads beyond), one term and several (the D pass adds
    terms), rows narrower than a vector and ragged ones, every padding mode, a non-contiguous input.
    Reference: the 1-D passes in float64; bound gamma_n * conv(|x|, |k|), n = the taps of the three passes."""
    from volconv.engine.separable import _symmetric_halves

    rng = np.random.default_rng(k)
    unit = type("S", (), {"stride": (1, 1, 1), "dilation": (1, 1, 1)})
    for W, rank, mode in [(k + 3, 1, "zeros"), (2 * k + 19, 3, "reflect"), (5, 1, "replicate"), (70, 2, "circular")]:
        ks = (k, max(2, k - 1), k)
        pad = tuple(n // 2 for n in ks)
        shape = (k + 4, k + 6, max(W, pad[2] + 1))
        kernel = SeparableKernel([symmetric(rng, rank, n) for n in ks], weights=rng.standard_normal(rank))
        x = rng.standard_normal((2, 2) + shape[:2] + (2 * shape[2],)).astype(dtype)[..., ::2]
        out = vc.conv3d(x, kernel, padding=pad, padding_mode=mode)
        ref, mag = passes_reference(x, kernel, pad, mode)
        n = sum(ks) + 3
        u = np.finfo(dtype).eps / 2
        assert out.shape == ref.shape and (np.abs(out - ref) <= n * u / (1 - n * u) * mag + 1e-300).all(), \
            f"k={ks} W={shape[2]} rank={rank} {mode}: {np.abs(out - ref).max()}"
        assert _symmetric_halves([np.asarray(f) for f in kernel.factors], unit)[0] == 7   # the symmetric passes ran


def test_symmetric_passes_only_where_exact():
    """The half-tap form only for factors equal to their reverse, at unit stride and dilation; the centre of an
    odd kernel halved (added to itself in the kernel, exactly)."""
    from volconv.engine.separable import _symmetric_halves

    spec = type("S", (), {"stride": (1, 2, 1), "dilation": (1, 1, 2)})
    g = np.array([[1.0, 4.0, 6.0, 4.0, 1.0]])
    almost = g.copy()
    almost[0, 0] = np.nextafter(1.0, 2.0)
    mask, halves = _symmetric_halves([g, g, g], spec)
    assert mask == 1 and np.array_equal(halves[0], [[1.0, 4.0, 3.0]]) and halves[1] is None
    unit = type("S", (), {"stride": (1, 1, 1), "dilation": (1, 1, 1)})
    assert _symmetric_halves([almost, g, g[:, :4]], unit)[0] == 2
