"""volconv.engine.fft.fft_conv3d against torch.nn.functional.conv3d (float64 reference).

The reference pads with np.pad (scipy.ndimage's modes: 'reflect' is np.pad 'symmetric', 'mirror' is np.pad
'reflect', 'nearest' is 'edge'), which also covers paddings larger than the axis, beyond what torch's F.pad
allows; test_reference_padding checks that np.pad really extends like scipy.ndimage does.

Tolerance (conftest.conv_tolerance, algorithm "fft"): an FFT's rounding error is global, about
eps * log2(L) * max(conv(|x|, |w|)) on every output (<= eps * log2(L) * ||w||_1 * max|x|), whatever the
output's own size; FFT_COEFF = 4 times that, plus the direct-summation bound for the bias. That is ~1e-14
relative in float64 and ~1e-5 in float32 for these shapes, while any indexing mistake (shift, flip, wrong
channel, missing padding) is off by O(max|x| * ||w||_1) and fails by orders of magnitude.
"""
import math

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F

from conftest import assert_within, config_rng, conv_tolerance, n_fft_points
from volconv.engine import fft
from volconv.engine.fft import fft_conv3d, fft_cost

MODES = ("constant", "reflect", "mirror", "nearest", "wrap")
NP_PAD = {"constant": "constant", "reflect": "symmetric", "mirror": "reflect", "nearest": "edge", "wrap": "wrap"}
TORCH_PAD = {"mirror": "reflect", "nearest": "replicate", "wrap": "circular"}


def same_pads(kernel, dilation=(1, 1, 1)):
    """torch's padding='same': the odd extra at the end."""
    return tuple((d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for k, d in zip(kernel, dilation))


def reference(x, w, b, pads, mode, stride, dilation, groups):
    """torch conv3d in float64 of the np.pad-padded input, and conv(|x|, |w|) + |b| (what rounding scales with)."""
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0)) + tuple(pads), mode=NP_PAD[mode])
    w = w.astype(np.float64)
    b = None if b is None else b.astype(np.float64)

    def conv(a, k, bias):
        bias = None if bias is None else torch.from_numpy(bias)
        return F.conv3d(torch.from_numpy(a), torch.from_numpy(k), bias, stride, 0, dilation, groups).numpy()

    return conv(xp, w, b), conv(np.abs(xp), np.abs(w), None if b is None else np.abs(b))


def check(rng, shape, kernel, out_channels, pads, mode="constant", stride=(1, 1, 1), dilation=(1, 1, 1),
          groups=1, bias=True, dtype=np.float64, nthreads=2):
    """Random input, weight and bias; compare fft_conv3d with the reference; return the plan it used."""
    x = rng.standard_normal(shape).astype(dtype)
    w = rng.standard_normal((out_channels, shape[1] // groups) + tuple(kernel)).astype(dtype)
    b = rng.standard_normal(out_channels).astype(dtype) if bias else None
    x_copy, w_copy = x.copy(), w.copy()
    out = fft_conv3d(x, w, b, pads, mode, stride, dilation, groups, nthreads)
    context = f"shape {shape} kernel {kernel} O {out_channels} pads {pads} {mode} stride {stride} " \
              f"dilation {dilation} groups {groups} {np.dtype(dtype)}"
    assert out.dtype == x.dtype and out.flags.c_contiguous, context
    assert np.array_equal(x, x_copy) and np.array_equal(w, w_copy), f"{context}: inputs modified"
    ref, mag = reference(x, w, b, pads, mode, stride, dilation, groups)
    tol = conv_tolerance(mag, dtype, w[0].size, "fft", n_fft_points(shape, w.shape, pads))
    assert_within(out, ref, tol, context)
    return fft._plan_for(shape, w.shape, pads, mode, stride, dilation, groups, dtype)


@pytest.fixture
def blocks(monkeypatch):
    """Force overlap-save: with a 1-byte spectra budget the planner takes the smallest blocks it knows."""
    monkeypatch.setattr(fft, "_SPECTRA_BUDGET", 1)


def blocked(plan):
    return any(len(segments) > 1 for segments in plan.segments)


# ----------------------------------------------------------------------------------------------------------------
# the reference itself
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_reference_padding(mode):
    """np.pad extends like scipy.ndimage (one-hot correlate1d reads the extension at every offset up to 9 > n)
    and, within torch's limits, like F.pad."""
    n, p = 4, 9
    x = np.arange(1.0, n + 1)
    padded = np.pad(x, p, mode=NP_PAD[mode])
    for offset in range(-p, p + 1):
        onehot = np.zeros(2 * p + 1)
        onehot[p + offset] = 1.0
        np.testing.assert_array_equal(ndi.correlate1d(x, onehot, mode=mode, cval=0.0), padded[p + offset:][:n])
    if mode in TORCH_PAD:
        v = np.arange(60.0).reshape(1, 1, 3, 4, 5)
        pads = ((2, 1), (0, 3), (4, 2))
        flat = (4, 2, 0, 3, 2, 1)
        torch_padded = F.pad(torch.from_numpy(v), flat, mode=TORCH_PAD[mode]).numpy()
        np.testing.assert_array_equal(np.pad(v, ((0, 0), (0, 0)) + pads, mode=NP_PAD[mode]), torch_padded)


# ----------------------------------------------------------------------------------------------------------------
# hand-picked grid
# ----------------------------------------------------------------------------------------------------------------

CASES = [
    # kernels 1..9, odd and even, 'same' zero padding
    *[dict(shape=(1, 2, 11, 12, 13), kernel=(k,) * 3, out_channels=3, pads=same_pads((k,) * 3)) for k in range(1, 10)],
    # anisotropic kernels, asymmetric padding, 'valid', no bias
    dict(shape=(1, 2, 9, 10, 11), kernel=(1, 4, 7), out_channels=2, pads=((0, 3), (2, 1), (4, 0))),
    dict(shape=(1, 1, 10, 10, 10), kernel=(5, 5, 5), out_channels=1, pads=((0, 0),) * 3, bias=False),
    # one large kernel, and a kernel larger than the input ('full' correlation)
    dict(shape=(1, 1, 20, 20, 20), kernel=(17,) * 3, out_channels=1, pads=same_pads((17,) * 3)),
    dict(shape=(1, 1, 6, 7, 8), kernel=(9, 9, 9), out_channels=2, pads=((8, 8),) * 3),
    # stride and dilation
    dict(shape=(1, 2, 12, 13, 14), kernel=(3, 3, 3), out_channels=2, pads=((1, 1),) * 3, stride=(2, 2, 2)),
    dict(shape=(1, 1, 11, 12, 13), kernel=(4, 3, 5), out_channels=2, pads=((1, 2), (0, 0), (3, 3)),
         stride=(1, 2, 3)),
    dict(shape=(1, 2, 12, 12, 12), kernel=(3, 3, 3), out_channels=2, pads=same_pads((3,) * 3, (2, 2, 2)),
         dilation=(2, 2, 2)),
    dict(shape=(1, 1, 13, 14, 15), kernel=(3, 2, 3), out_channels=1, pads=((2, 1), (3, 0), (0, 2)),
         stride=(2, 1, 3), dilation=(1, 2, 3)),
    # groups: 2, depthwise (groups = C) with a channel multiplier, groups = C = O
    dict(shape=(1, 4, 9, 10, 11), kernel=(3, 3, 3), out_channels=6, pads=((1, 1),) * 3, groups=2),
    dict(shape=(1, 4, 9, 10, 11), kernel=(3, 3, 3), out_channels=8, pads=((1, 1),) * 3, groups=4),
    dict(shape=(1, 3, 9, 10, 11), kernel=(2, 3, 4), out_channels=3, pads=((1, 0), (1, 1), (2, 1)), groups=3),
    # batch
    dict(shape=(2, 3, 9, 10, 11), kernel=(3, 3, 3), out_channels=2, pads=((1, 1),) * 3),
    # every boundary mode, small padding and padding larger than the axis; mirror of a length-1 axis
    *[dict(shape=(2, 2, 6, 7, 8), kernel=(3, 4, 5), out_channels=2, pads=((1, 2), (2, 1), (3, 3)), mode=m)
      for m in MODES],
    *[dict(shape=(1, 1, 3, 4, 5), kernel=(3, 3, 3), out_channels=2, pads=((5, 7), (6, 4), (9, 9)), mode=m)
      for m in MODES],
    dict(shape=(1, 1, 1, 4, 5), kernel=(3, 3, 3), out_channels=1, pads=((2, 2), (1, 1), (1, 1)), mode="mirror"),
]


def case_id(case):
    keys = ("kernel", "pads", "mode", "stride", "dilation", "groups")
    return "-".join(str(case[k]).replace(" ", "") for k in keys if k in case) + f"-N{case['shape'][0]}"


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_grid(case, dtype, rng):
    check(rng, dtype=dtype, **case)


BLOCK_CASES = [
    dict(shape=(2, 2, 20, 21, 22), kernel=(3, 3, 3), out_channels=3, pads=((1, 1),) * 3),
    dict(shape=(1, 2, 20, 22, 21), kernel=(3, 4, 2), out_channels=2, pads=((3, 0), (1, 2), (0, 1)), stride=(2, 3, 1)),
    dict(shape=(1, 1, 24, 20, 21), kernel=(3, 3, 3), out_channels=2, pads=same_pads((3,) * 3, (2, 1, 2)),
         dilation=(2, 1, 2)),
    dict(shape=(1, 4, 20, 20, 20), kernel=(3, 3, 3), out_channels=4, pads=((1, 1),) * 3, groups=4),
    # zero padding wider than a block: whole blocks read nothing but padding (their output is the bias)
    dict(shape=(1, 1, 20, 20, 20), kernel=(3, 3, 3), out_channels=2, pads=((14, 12),) * 3),
    *[dict(shape=(1, 1, 20, 21, 22), kernel=(3, 3, 3), out_channels=1, pads=((2, 3), (4, 1), (1, 1)), mode=m)
      for m in MODES[1:]],
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", BLOCK_CASES, ids=case_id)
def test_overlap_save(case, dtype, rng, blocks):
    plan = check(rng, dtype=dtype, **case)
    assert blocked(plan), "the planner did not cut this case in blocks"
    assert plan.batch == 1  # and chunked the batch


# ----------------------------------------------------------------------------------------------------------------
# random configurations
# ----------------------------------------------------------------------------------------------------------------

def random_config(i):
    rng = config_rng(7, i)
    groups = int(rng.choice([1, 1, 2, 3]))
    channels = groups * int(rng.integers(1, 3))
    out_channels = groups * int(rng.integers(1, 3))
    while True:
        shape = (int(rng.integers(1, 3)), channels) + tuple(int(v) for v in rng.integers(1, 17, 3))
        kernel = tuple(int(v) for v in rng.integers(1, 7, 3))
        dilation = tuple(int(v) for v in rng.choice([1, 1, 2, 3], 3))
        stride = tuple(int(v) for v in rng.choice([1, 1, 2, 3], 3))
        pads = tuple((int(lo), int(hi)) for lo, hi in rng.integers(0, 7, (3, 2)))
        if all(n + lo + hi >= d * (k - 1) + 1 for n, (lo, hi), k, d in zip(shape[2:], pads, kernel, dilation)):
            break
    return dict(shape=shape, kernel=kernel, out_channels=out_channels, pads=pads, mode=str(rng.choice(MODES)),
                stride=stride, dilation=dilation, groups=groups, bias=bool(rng.integers(0, 2)),
                dtype=(np.float64, np.float32)[i % 2], nthreads=int(rng.integers(1, 3)))


@pytest.mark.parametrize("i", range(40))
def test_random(i, monkeypatch):
    if i % 3 == 0:
        monkeypatch.setattr(fft, "_SPECTRA_BUDGET", 1)
    check(config_rng(8, i), **random_config(i))


# ----------------------------------------------------------------------------------------------------------------
# planning, cost model, documented behaviour
# ----------------------------------------------------------------------------------------------------------------

def test_half_padding_box():
    """'same' zero padding costs only the larger side in the transform length: 128 + max(5, 5) -> 135, where a
    linear convolution needs 128 + 10 -> 144. Explicit padding (other modes) needs the whole 138."""
    args = ((1, 1, 128, 128, 128), (1, 1, 11, 11, 11), ((5, 5),) * 3, (1, 1, 1), (1, 1, 1), 1, np.float32)
    assert fft._plan_for(args[0], args[1], args[2], "constant", *args[3:]).box == (135, 135, 135)
    assert fft._plan_for(args[0], args[1], args[2], "reflect", *args[3:]).box == (144, 144, 144)


def test_memory_budget(monkeypatch):
    """A problem whose spectra exceed the budget is cut into blocks that fit."""
    monkeypatch.setattr(fft, "_SPECTRA_BUDGET", 2 * 2**20)
    plan = fft._plan_for((1, 1, 96, 96, 96), (1, 1, 3, 3, 3), ((1, 1),) * 3, "constant", (1, 1, 1), (1, 1, 1), 1,
                         np.float32)
    assert blocked(plan)
    assert plan.box[0] * plan.box[1] * (plan.box[2] // 2 + 1) * 8 * 2 <= fft._SPECTRA_BUDGET


def test_fft_cost():
    def cost(n, k, mode="constant"):
        pads = same_pads((k,) * 3)
        return fft_cost((1, 1, n, n, n), (1, 1, k, k, k), pads, (1, 1, 1), (1, 1, 1), 1, mode=mode)

    small, large = cost(32, 5), cost(128, 5)
    assert 0 < small < large < 1.0 and math.isfinite(large)
    assert large > 20 * small  # 64x the voxels
    assert cost(128, 11, "reflect") > cost(128, 11)  # explicit padding: larger transforms
    # channels: N*C + O*C/g forward, N*O inverse transforms, plus the contraction
    one = fft_cost((1, 1, 64, 64, 64), (1, 1, 5, 5, 5), ((2, 2),) * 3, (1, 1, 1), (1, 1, 1), 1)
    eight = fft_cost((1, 8, 64, 64, 64), (8, 8, 5, 5, 5), ((2, 2),) * 3, (1, 1, 1), (1, 1, 1), 1)
    assert 8 * one < eight < 200 * one


def test_non_finite_input_spreads():
    """Documented: one NaN in the input makes the whole output NaN (every frequency sees every voxel)."""
    x = np.ones((1, 1, 8, 8, 8))
    x[0, 0, 0, 0, 0] = np.nan
    out = fft_conv3d(x, np.ones((1, 1, 3, 3, 3)), None, ((1, 1),) * 3, "constant", (1, 1, 1), (1, 1, 1), 1, 1)
    assert np.isnan(out).all()


def test_float32_spectra_stay_single():
    """float32 in -> complex64 spectra (input and kernels) -> float32 out, no float64 round trip."""
    x = np.ones((1, 1, 6, 6, 6), np.float32)
    w = np.ones((2, 1, 3, 3, 3), np.float32)
    assert fft._forward(x, (8, 8, 8), (1, 1, 1), 1).dtype == np.complex64
    assert fft._kernel_spectra(w, (1, 1, 1), (8, 8, 8), 1).dtype == np.complex64
