"""vc.conv3d against torch.nn.functional.conv3d / torch.nn.Conv3d (float64 reference).

Tolerances: conftest.conv_tolerance, element-wise. direct / torch: min(gamma_{n+2}, 4*sqrt(n+2)*eps) * sum|w||x|
per output (n = products summed per output). fft / auto: that plus 4*eps*log2(N)*max(sum|w||x|) (FFT errors are
global). float16/bfloat16 results get one unit of the narrow type on top (one rounding of the float32 result).
"""
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from conftest import (check_conv3d, config_rng, conv_tolerance, explicit_padding, n_fft_points,  # noqa: E402
                      ref_conv3d, to_f64, triple, valid_padding_for_mode, assert_within)

vc = pytest.importorskip("volconv")

ALGORITHMS = ["auto", "direct", "fft", "torch"]


# --------------------------------------------------------------------------------------------------------------
# building inputs in a given memory layout
# --------------------------------------------------------------------------------------------------------------

def _layout_numpy(a, layout):
    """Same logical values as `a`, in a different memory layout (a view, never contiguous unless 'contig')."""
    if layout == "contig":
        return np.ascontiguousarray(a)
    if layout == "strided":  # every other element of a bigger buffer, offset by one on H and W
        big = np.zeros(a.shape[:2] + (2 * a.shape[2], 2 * a.shape[3] + 1, 2 * a.shape[4] + 1), a.dtype)
        view = big[:, :, ::2, 1::2, 1::2]
        view[...] = a
        assert not view.flags.c_contiguous and np.array_equal(view, a)
        return view
    if layout == "transposed":  # stored as (C, N, W, H, D), seen as (N, C, D, H, W)
        base = np.ascontiguousarray(a.transpose(1, 0, 4, 3, 2))
        view = base.transpose(1, 0, 4, 3, 2)
        assert np.array_equal(view, a)
        return view
    if layout == "negative":  # negative strides (numpy only)
        base = np.ascontiguousarray(a[:, :, ::-1, :, ::-1])
        view = base[:, :, ::-1, :, ::-1]
        assert np.array_equal(view, a)
        return view
    raise ValueError(layout)


def _to_container(a, container, layout, dtype):
    """numpy float64 `a` -> numpy/torch array of `dtype` in `layout`."""
    if container == "numpy":
        return _layout_numpy(a.astype(dtype), layout)
    tdtype = getattr(torch, dtype)
    if layout == "channels_last" and a.ndim == 5:
        return torch.from_numpy(a).to(tdtype).contiguous(memory_format=torch.channels_last_3d)
    if layout == "negative":
        layout = "strided"
    src = np.ascontiguousarray(a)
    t = torch.from_numpy(src).to(tdtype)
    if layout in ("contig", "channels_last"):
        return t
    if layout == "strided":
        big = torch.zeros(a.shape[:2] + tuple(2 * s for s in a.shape[2:]), dtype=tdtype)
        view = big[:, :, ::2, ::2, ::2]
        view.copy_(t)
        assert not view.is_contiguous()
        return view
    if layout == "transposed":
        view = t.permute(1, 0, 4, 3, 2).contiguous().permute(1, 0, 4, 3, 2)
        assert not view.is_contiguous() and torch.equal(view, t)
        return view
    raise ValueError(layout)


def make_case(rng, x_shape, w_shape, *, bias=True, dtype="float32", container="numpy", layout="contig",
              w_layout=None):
    x = rng.standard_normal(x_shape)
    w = rng.standard_normal(w_shape)
    b = rng.standard_normal(w_shape[0]) if bias else None
    x = _to_container(x, container, layout, dtype)
    w = _to_container(w, container, w_layout or ("contig" if layout == "negative" else layout), dtype)
    if b is not None:
        b = _to_container(b, container, "contig", dtype)
    return x, w, b


def _snapshot(*arrays):
    return [None if a is None else to_f64(a).copy() for a in arrays]


def run_and_check(x, w, b, algorithm, context, **kw):
    before = _snapshot(x, w, b)
    out = vc.conv3d(x, w, b, **kw, algorithm=algorithm)
    for a, s in zip((x, w, b), before):
        if a is not None:
            assert np.array_equal(to_f64(a), s, equal_nan=True), f"{context}: an argument was modified in place"
    check_conv3d(out, x, w, b, algorithm=algorithm, context=context, **kw)
    return out


# --------------------------------------------------------------------------------------------------------------
# the reference itself (a wrong reference would make every test meaningless)
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("padding", [1, (2, 0, 1), "same", "valid"])
def test_reference_matches_torch_module(padding_mode, padding):
    torch.manual_seed(0)
    m = torch.nn.Conv3d(4, 6, (4, 3, 2), padding=padding, dilation=(1, 2, 2), groups=2,
                        padding_mode=padding_mode).double()
    x = torch.randn(2, 4, 7, 8, 9, dtype=torch.float64)
    with torch.no_grad():
        expected = m(x).numpy()
    ref, mag = ref_conv3d(x, m.weight.detach(), m.bias.detach(), 1, padding, (1, 2, 2), 2, padding_mode)
    assert np.abs(ref - expected).max() < 1e-12
    assert (mag >= np.abs(ref) - 1e-12).all()


def test_tolerance_catches_one_voxel_shift():
    """Meta-test: the FFT tolerance (the loosest we use) must still reject an off-by-one result."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 2, 10, 10, 10)).astype(np.float32)
    w = rng.standard_normal((2, 2, 3, 3, 3)).astype(np.float32)
    ref, mag = ref_conv3d(x, w, padding=1)
    tol = conv_tolerance(mag, np.float32, 54, "fft", 16**3)
    shifted = np.roll(ref, 1, axis=-1)
    assert not (np.abs(shifted - ref) <= tol).all()
    perturbed = ref * (1 + 1e-4)
    assert not (np.abs(perturbed - ref) <= tol).all()


# --------------------------------------------------------------------------------------------------------------
# hand-picked grid: each case under each algorithm
# --------------------------------------------------------------------------------------------------------------

def C(name, x, w, **kw):
    return pytest.param((x, w, kw), id=name)


GRID = [
    # kernel sizes 1..9, odd and even
    C("k1", (2, 3, 6, 7, 5), (4, 3, 1, 1, 1)),
    C("k2-even", (2, 2, 7, 6, 8), (3, 2, 2, 2, 2)),
    C("k3-pad1", (2, 3, 8, 8, 8), (4, 3, 3, 3, 3), padding=1),
    C("k4-even-same", (2, 2, 9, 8, 7), (2, 2, 4, 4, 4), padding="same"),
    C("k5-pad2-f64", (2, 2, 9, 9, 9), (3, 2, 5, 5, 5), padding=2, dtype="float64"),
    C("k6-even-valid", (1, 2, 10, 9, 11), (2, 2, 6, 6, 6), padding="valid", bias=False),
    C("k7-same-f64", (1, 2, 12, 12, 12), (2, 2, 7, 7, 7), padding="same", dtype="float64"),
    C("k8-even-pad3", (1, 1, 12, 11, 13), (2, 1, 8, 8, 8), padding=3),
    C("k9-pad4", (1, 1, 14, 13, 12), (1, 1, 9, 9, 9), padding=4),
    C("k9-f64-valid", (1, 2, 12, 13, 14), (1, 2, 9, 9, 9), dtype="float64"),
    C("k-mixed-pad-triple", (2, 2, 9, 8, 10), (3, 2, 3, 1, 5), padding=(1, 0, 2)),
    C("k-anisotropic-even", (2, 3, 8, 9, 10), (2, 3, 2, 5, 4), padding=(1, 2, 0)),
    # stride
    C("stride2", (2, 2, 9, 10, 11), (3, 2, 3, 3, 3), stride=2, padding=1),
    C("stride3", (2, 2, 11, 10, 12), (2, 2, 3, 3, 3), stride=3),
    C("stride3-floor", (1, 2, 10, 10, 10), (2, 2, 3, 3, 3), stride=3, padding=0),
    C("stride-triple", (2, 2, 9, 10, 11), (2, 2, 3, 2, 3), stride=(1, 2, 3), padding=(1, 1, 0)),
    C("stride-gt-kernel", (2, 3, 9, 8, 10), (2, 3, 1, 1, 1), stride=3),
    C("stride2-even-f64", (2, 2, 9, 8, 10), (2, 2, 4, 4, 4), stride=2, padding=1, dtype="float64"),
    # dilation
    C("dil2", (2, 2, 9, 9, 9), (3, 2, 3, 3, 3), dilation=2, padding=2),
    C("dil3", (1, 2, 11, 12, 11), (2, 2, 3, 3, 3), dilation=3),
    C("dil-triple", (2, 2, 9, 10, 12), (2, 2, 3, 3, 3), dilation=(1, 2, 3), padding=(1, 0, 3)),
    C("dil2-stride2", (2, 2, 11, 11, 11), (2, 2, 3, 3, 3), dilation=2, stride=2, padding=1),
    C("dil2-even-same", (1, 2, 9, 9, 9), (2, 2, 4, 2, 4), dilation=2, padding="same"),
    C("dil-kernel-fills-padded-input", (2, 1, 5, 5, 5), (1, 1, 3, 3, 3), dilation=3, padding=1),
    C("kernel-equals-input", (2, 2, 5, 6, 7), (3, 2, 5, 6, 7)),
    # groups
    C("groups2", (2, 4, 8, 7, 9), (6, 2, 3, 3, 3), groups=2, padding=1),
    C("groups3-stride2", (2, 6, 9, 8, 9), (3, 2, 3, 3, 3), groups=3, stride=2, padding=1),
    C("depthwise", (2, 4, 8, 8, 8), (4, 1, 3, 3, 3), groups=4, padding=1),
    C("depthwise-mult2", (2, 3, 8, 9, 7), (6, 1, 3, 3, 3), groups=3, padding=(1, 1, 1)),
    C("depthwise-k5-f64", (1, 5, 9, 9, 9), (5, 1, 5, 5, 5), groups=5, padding="same", dtype="float64"),
    C("groups2-dil2-same", (2, 4, 9, 9, 10), (4, 2, 3, 3, 3), groups=2, dilation=2, padding="same"),
    # padding modes x padding kinds
    C("reflect-int", (2, 2, 7, 8, 9), (3, 2, 3, 3, 3), padding=2, padding_mode="reflect"),
    C("replicate-int", (2, 2, 7, 8, 9), (3, 2, 3, 3, 3), padding=2, padding_mode="replicate"),
    C("circular-int", (2, 2, 7, 8, 9), (3, 2, 3, 3, 3), padding=2, padding_mode="circular"),
    C("reflect-triple", (2, 2, 7, 6, 8), (2, 2, 3, 2, 3), padding=(1, 2, 0), padding_mode="reflect"),
    C("replicate-triple", (2, 2, 7, 6, 8), (2, 2, 3, 2, 3), padding=(0, 2, 3), padding_mode="replicate"),
    C("circular-triple", (2, 2, 7, 6, 8), (2, 2, 3, 2, 3), padding=(3, 0, 1), padding_mode="circular"),
    C("reflect-same-even", (2, 2, 8, 7, 9), (2, 2, 4, 3, 2), padding="same", padding_mode="reflect"),
    C("replicate-same-even", (2, 2, 8, 7, 9), (2, 2, 4, 3, 2), padding="same", padding_mode="replicate"),
    C("circular-same-even", (2, 2, 8, 7, 9), (2, 2, 4, 3, 2), padding="same", padding_mode="circular"),
    C("zeros-same-even-dil", (2, 2, 8, 7, 9), (2, 2, 4, 3, 2), padding="same", dilation=(1, 2, 3)),
    C("reflect-valid", (2, 2, 7, 8, 6), (2, 2, 3, 3, 3), padding="valid", padding_mode="reflect"),
    C("reflect-max-pad", (1, 2, 5, 6, 7), (2, 2, 3, 3, 3), padding=(4, 5, 6), padding_mode="reflect"),
    C("circular-pad-eq-size", (1, 2, 5, 6, 7), (2, 2, 3, 3, 3), padding=(5, 6, 7), padding_mode="circular"),
    C("replicate-pad-gt-size", (1, 2, 5, 5, 5), (2, 2, 3, 3, 3), padding=7, padding_mode="replicate"),
    C("zeros-pad-gt-size", (1, 2, 5, 5, 5), (2, 2, 3, 3, 3), padding=6),
    C("reflect-f64-groups-stride", (2, 4, 9, 8, 7), (4, 2, 3, 3, 3), padding=1, padding_mode="reflect",
      groups=2, stride=2, dtype="float64"),
    C("circular-dil2-f64", (2, 2, 8, 9, 10), (2, 2, 3, 3, 3), padding=2, dilation=2, padding_mode="circular",
      dtype="float64"),
    C("replicate-dil-stride", (2, 3, 9, 10, 8), (3, 3, 2, 3, 3), padding=(2, 1, 3), dilation=(2, 1, 3),
      stride=(2, 3, 1), padding_mode="replicate"),
    # memory layouts
    C("np-strided", (2, 3, 7, 8, 9), (4, 3, 3, 3, 3), padding=1, layout="strided"),
    C("np-transposed", (2, 3, 7, 8, 9), (4, 3, 3, 3, 3), padding=1, layout="transposed"),
    C("np-negative-strides", (2, 3, 7, 8, 9), (4, 3, 3, 3, 3), padding=1, layout="negative"),
    C("np-strided-f64-reflect", (2, 2, 7, 8, 9), (2, 2, 3, 3, 3), padding=1, layout="strided",
      padding_mode="reflect", dtype="float64"),
    C("np-weight-transposed", (2, 2, 7, 8, 9), (3, 2, 3, 2, 4), padding=1, w_layout="transposed"),
    C("torch-contig", (2, 3, 7, 8, 9), (4, 3, 3, 3, 3), padding=1, container="torch"),
    C("torch-strided", (2, 3, 7, 8, 9), (4, 3, 3, 3, 3), padding=1, container="torch", layout="strided"),
    C("torch-transposed", (2, 3, 7, 8, 9), (4, 3, 3, 3, 3), padding=1, container="torch", layout="transposed"),
    C("torch-channels-last", (2, 3, 7, 8, 9), (4, 3, 3, 3, 3), padding=1, container="torch",
      layout="channels_last"),
    C("torch-channels-last-groups", (2, 4, 7, 8, 9), (4, 2, 3, 3, 3), padding="same", groups=2,
      container="torch", layout="channels_last", dtype="float64"),
    C("torch-channels-last-circular", (2, 3, 7, 8, 9), (3, 3, 3, 3, 3), padding=2, padding_mode="circular",
      container="torch", layout="channels_last"),
    C("torch-f64-dil-stride", (2, 2, 9, 10, 11), (3, 2, 3, 3, 3), stride=2, dilation=2, padding=2,
      container="torch", dtype="float64"),
    C("torch-no-bias", (2, 2, 7, 8, 9), (2, 2, 3, 3, 3), padding=1, container="torch", bias=False),
    # half types (torch only): computed in float32, returned in the caller's dtype
    C("torch-float16", (2, 2, 7, 8, 9), (3, 2, 3, 3, 3), padding=1, container="torch", dtype="float16"),
    C("torch-bfloat16", (2, 2, 7, 8, 9), (3, 2, 3, 3, 3), padding=1, container="torch", dtype="bfloat16"),
    C("torch-float16-reflect", (1, 2, 7, 8, 9), (3, 2, 3, 3, 3), padding=2, padding_mode="reflect",
      container="torch", dtype="float16"),
]

_MAKE_KEYS = ("bias", "dtype", "container", "layout", "w_layout")


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("case", GRID)
def test_grid(case, algorithm, rng):
    x_shape, w_shape, kw = case
    make_kw = {k: kw[k] for k in _MAKE_KEYS if k in kw}
    conv_kw = {k: v for k, v in kw.items() if k not in _MAKE_KEYS}
    x, w, b = make_case(rng, x_shape, w_shape, **make_kw)
    run_and_check(x, w, b, algorithm, f"{x_shape} {w_shape} {kw} algorithm={algorithm}", **conv_kw)


# Larger, elongated volumes: long rows for the direct kernel's vector loops and their tails, and shapes that
# volconv's FFT planner (when these were chosen) cuts into overlap-save blocks along D, H, W or two axes at
# once, in every padding mode, with stride and dilation. They are ordinary conv3d cases for any implementation.
_MODE = {"constant": "zeros", "mirror": "reflect", "nearest": "replicate", "wrap": "circular"}
_LARGE = [  # spatial, C, O, groups, kernel, stride, dilation, scipy mode, padding; (blocked axes)
    ((14, 22, 68), 2, 4, 2, (1, 1, 1), (1, 3, 3), (2, 1, 1), "constant", (2, 2, 0)),  # D
    ((42, 10, 67), 4, 4, 2, (1, 1, 1), (1, 2, 3), (1, 2, 1), "mirror", (2, 1, 2)),  # D
    ((61, 9, 65), 4, 4, 2, (1, 1, 1), (1, 2, 1), (1, 1, 1), "nearest", (0, 1, 2)),  # D
    ((32, 70, 9), 2, 4, 2, (1, 1, 3), (3, 1, 3), (1, 1, 2), "wrap", (2, 1, 1)),  # D
    ((30, 68, 37), 4, 2, 1, (2, 1, 1), (1, 1, 1), (1, 1, 1), "constant", (2, 1, 0)),  # D, stride 1
    ((19, 12, 50), 6, 2, 1, (1, 1, 1), (3, 3, 1), (2, 2, 1), "wrap", (2, 2, 1)),  # H
    ((8, 30, 58), 6, 4, 2, (1, 1, 1), (1, 1, 3), (1, 2, 2), "nearest", (2, 1, 2)),  # H
    ((40, 14, 19), 6, 4, 2, (1, 1, 2), (2, 3, 1), (1, 2, 2), "mirror", (2, 1, 2)),  # H
    ((56, 30, 37), 2, 2, 1, (1, 1, 1), (2, 2, 1), (1, 1, 2), "constant", (1, 1, 1)),  # H
    ((62, 36, 17), 2, 4, 2, (2, 1, 1), (1, 1, 3), (2, 2, 1), "constant", (2, 2, 1)),  # W
    ((31, 63, 47), 4, 2, 2, (1, 1, 1), (1, 1, 3), (1, 1, 1), "mirror", (2, 1, 2)),  # W
    ((37, 10, 38), 6, 4, 1, (1, 2, 1), (3, 1, 2), (2, 1, 1), "wrap", (0, 1, 2)),  # W
    ((39, 26, 27), 2, 4, 1, (1, 2, 2), (1, 1, 1), (1, 2, 1), "mirror", (2, 0, 2)),  # W, stride 1
    ((57, 27, 32), 6, 4, 2, (2, 2, 1), (2, 3, 3), (1, 2, 1), "constant", (2, 2, 1)),  # H and W
    ((57, 22, 34), 4, 4, 1, (4, 2, 1), (3, 1, 3), (1, 1, 1), "wrap", (2, 2, 1)),  # D and W
]


@pytest.mark.parametrize("algorithm", ["direct", "fft"])
@pytest.mark.parametrize("case", [pytest.param(c, id=f"{'x'.join(map(str, c[0]))}-{c[7]}") for c in _LARGE])
def test_larger_volumes(case, algorithm, rng):
    spatial, c_in, c_out, groups, k, stride, dilation, mode, padding = case
    dtype = "float64" if sum(spatial) % 3 == 0 else "float32"
    x, w, b = make_case(rng, (1, c_in) + spatial, (c_out, c_in // groups) + k, dtype=dtype)
    run_and_check(x, w, b, algorithm, f"{case} {dtype} algorithm={algorithm}", stride=stride, padding=padding,
                  dilation=dilation, groups=groups, padding_mode=_MODE[mode])


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_defaults_are_torch_defaults(algorithm, rng):
    """vc.conv3d(x, w) == F.conv3d(x, w): stride 1, padding 0, dilation 1, groups 1, no bias."""
    x, w, _ = make_case(rng, (1, 2, 6, 7, 8), (3, 2, 3, 3, 3), bias=False, dtype="float64")
    out = vc.conv3d(x, w, algorithm=algorithm)
    assert out.shape == (1, 3, 4, 5, 6)
    check_conv3d(out, x, w, algorithm=algorithm, context="defaults")


@pytest.mark.parametrize("algorithm", ["auto", "direct", "fft"])
def test_positional_arguments_follow_torch_order(algorithm, rng):
    """conv3d(input, weight, bias, stride, padding, dilation, groups) positionally, as F.conv3d."""
    x, w, b = make_case(rng, (2, 4, 9, 8, 9), (4, 2, 3, 3, 3), dtype="float64")
    out = vc.conv3d(x, w, b, 2, 1, 2, 2, algorithm=algorithm)
    check_conv3d(out, x, w, b, stride=2, padding=1, dilation=2, groups=2, algorithm=algorithm, context="positional")


@pytest.mark.parametrize("padding", [(1, 1, 1), [1, 1, 1]])
def test_padding_sequence_types(padding, rng):
    x, w, b = make_case(rng, (1, 2, 6, 6, 6), (2, 2, 3, 3, 3), dtype="float64")
    out = vc.conv3d(x, w, b, padding=padding)
    check_conv3d(out, x, w, b, padding=1, context=f"padding={padding!r}")


def test_bias_changes_result(rng):
    """Guards against a bias that is silently ignored."""
    x, w, b = make_case(rng, (1, 2, 6, 6, 6), (2, 2, 3, 3, 3), dtype="float64")
    with_b = vc.conv3d(x, w, b + 10.0)
    without = vc.conv3d(x, w)
    np.testing.assert_allclose(with_b - without, np.broadcast_to((b + 10.0)[None, :, None, None, None],
                                                                 with_b.shape), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("algorithm", ["auto", "direct", "fft"])
def test_zero_input_gives_bias(algorithm):
    x = np.zeros((1, 2, 6, 7, 5), np.float32)
    w = np.ones((3, 2, 3, 3, 3), np.float32)
    b = np.array([1.5, -2.0, 0.25], np.float32)
    out = vc.conv3d(x, w, b, padding=1, algorithm=algorithm)
    expected = np.broadcast_to(b[None, :, None, None, None], out.shape)
    if algorithm == "direct":  # sums of exact zeros plus the bias: exact
        np.testing.assert_array_equal(out, expected)
    else:  # an FFT may carry the bias through the transform: FFT bound with mag = |b|
        tol = conv_tolerance(np.abs(expected).astype(np.float64), np.float32, 54, "fft", 8 * 9 * 7)
        assert_within(out, expected.astype(np.float64), tol, "zero input")


@pytest.mark.parametrize("algorithm", ["direct", "fft", "auto"])
def test_delta_kernel_is_identity(algorithm, rng):
    """A centred delta kernel with 'same' padding returns the input (catches flips and off-by-one shifts)."""
    x = rng.standard_normal((2, 2, 7, 6, 8))
    w = np.zeros((2, 2, 3, 5, 3))
    w[0, 0, 1, 2, 1] = 1.0
    w[1, 1, 1, 2, 1] = 1.0
    out = vc.conv3d(x, w, padding="same", algorithm=algorithm)
    np.testing.assert_allclose(out, x, rtol=0, atol=1e-12)
    # off-centre delta: a cross-correlation (not a convolution) shifts the output towards the delta's offset
    w2 = np.zeros((1, 1, 3, 3, 3))
    w2[0, 0, 2, 1, 1] = 1.0
    out2 = vc.conv3d(x[:, :1], w2, padding=1, algorithm=algorithm)
    np.testing.assert_allclose(out2[:, :, :-1], x[:, :1, 1:], rtol=0, atol=1e-12)
    np.testing.assert_allclose(out2[:, :, -1], 0, atol=1e-12)


def test_torch_tensor_out_is_plain_tensor_on_cpu(rng):
    x, w, b = make_case(rng, (1, 2, 6, 6, 6), (2, 2, 3, 3, 3), container="torch")
    out = vc.conv3d(x, w, b, padding=1)
    assert type(out) is torch.Tensor and out.device.type == "cpu" and out.dtype == torch.float32
    assert not out.requires_grad


# --------------------------------------------------------------------------------------------------------------
# random configurations
# --------------------------------------------------------------------------------------------------------------

N_RANDOM = 240
PADDING_MODES = ["zeros", "zeros", "reflect", "replicate", "circular"]


def random_config(idx):
    r = config_rng(7, idx)
    kind = r.choice(["g1", "g1", "g1", "g2", "g3", "dw"])
    if kind == "dw":
        groups = int(r.integers(2, 6))
        cpg = 1
    else:
        groups = {"g1": 1, "g2": 2, "g3": 3}[kind]
        cpg = int(r.integers(1, 4)) if groups == 1 else int(r.integers(1, 3))
    c_in = groups * cpg
    c_out = groups * int(r.integers(1, 3))
    big = r.random() < 0.15
    k = [int(r.integers(1, 6)) for _ in range(3)]
    if big:
        k[int(r.integers(0, 3))] = int(r.integers(6, 10))
    dil = [int(r.choice([1, 1, 1, 2, 3])) for _ in range(3)]
    stride = [int(r.choice([1, 1, 1, 2, 3])) for _ in range(3)]
    padding_mode = str(r.choice(PADDING_MODES))
    pkind = str(r.choice(["int", "triple", "same", "valid"]))
    if pkind == "same" and max(stride) > 1:
        pkind = "triple"
    size = [int(r.integers(5, 13)) for _ in range(3)]
    if pkind == "int":
        padding = int(r.integers(0, 4))
    elif pkind == "triple":
        padding = tuple(int(r.integers(0, 4)) for _ in range(3))
    else:
        padding = pkind
    # make it a valid torch configuration: the dilated kernel fits the padded input and torch's F.pad limits
    # hold; repair axis by axis (grow the volume up to 14, then shrink dilation, then the kernel)
    for _ in range(60):
        pads = explicit_padding(padding, k, dil)
        bad = [a for a in range(3)
               if dil[a] * (k[a] - 1) + 1 > size[a] + sum(pads[a])
               or not valid_padding_for_mode(padding_mode, [pads[a]], [size[a]])]
        if not bad:
            break
        for a in bad:
            if size[a] < 14:
                size[a] += 1
            elif dil[a] > 1:
                dil[a] -= 1
            else:
                k[a] -= 1
    else:  # pragma: no cover - generator bug
        raise AssertionError(f"could not make config {idx} valid")
    fmt = r.random()
    as_triple = lambda v: tuple(v) if fmt < 0.5 or len(set(v)) > 1 else v[0]  # noqa: E731
    return dict(
        x_shape=(int(r.integers(1, 3)), c_in, *size),
        w_shape=(c_out, cpg, *k),
        stride=as_triple(stride), padding=padding, dilation=as_triple(dil), groups=groups,
        padding_mode=padding_mode,
        bias=bool(r.random() < 0.5),
        dtype=str(r.choice(["float32", "float32", "float64"])),
        container=str(r.choice(["numpy", "torch"])),
        layout=str(r.choice(["contig"] * 6 + ["strided", "transposed"])),
        algorithm=ALGORITHMS[idx % 4],
        cross_check=idx % 4 == 0,
    )


@pytest.mark.parametrize("idx", range(N_RANDOM))
def test_random_config(idx):
    cfg = random_config(idx)
    rng = config_rng(8, idx)
    x, w, b = make_case(rng, cfg["x_shape"], cfg["w_shape"], bias=cfg["bias"], dtype=cfg["dtype"],
                        container=cfg["container"], layout=cfg["layout"])
    conv_kw = {k: cfg[k] for k in ("stride", "padding", "dilation", "groups", "padding_mode")}
    context = f"random config {idx}: {cfg}"
    run_and_check(x, w, b, cfg["algorithm"], context, **conv_kw)
    if cfg["cross_check"]:
        # "auto", "direct" and "fft" agree with each other (each within its own bound of the reference, so
        # within the sum of the two bounds of each other)
        outs = {a: to_f64(vc.conv3d(x, w, b, **conv_kw, algorithm=a)) for a in ("auto", "direct", "fft")}
        ref, mag = ref_conv3d(x, w, b, **{k: conv_kw[k] for k in conv_kw})
        compute = np.float64 if cfg["dtype"] == "float64" else np.float32
        n_terms = int(np.prod(cfg["w_shape"][1:]))
        pads = explicit_padding(cfg["padding"], cfg["w_shape"][2:], triple(cfg["dilation"]))
        n_fft = n_fft_points(cfg["x_shape"], cfg["w_shape"], pads)
        tol_d = conv_tolerance(mag, compute, n_terms, "direct")
        tol_f = conv_tolerance(mag, compute, n_terms, "fft", n_fft)
        assert_within(outs["fft"], outs["direct"], tol_d + tol_f, context + " fft vs direct")
        assert_within(outs["auto"], outs["direct"], tol_d + tol_f, context + " auto vs direct")


def test_random_configs_cover_the_space():
    """The random sample really exercises what it claims to (guards against a generator that degenerates)."""
    cfgs = [random_config(i) for i in range(N_RANDOM)]
    assert {c["padding_mode"] for c in cfgs} == {"zeros", "reflect", "replicate", "circular"}
    assert {c["algorithm"] for c in cfgs} == set(ALGORITHMS)
    assert any(c["groups"] > 1 and c["w_shape"][1] == 1 for c in cfgs)  # depthwise
    assert any(max(triple(c["stride"])) > 1 for c in cfgs)
    assert any(max(triple(c["dilation"])) > 1 for c in cfgs)
    assert any(c["padding"] == "same" for c in cfgs) and any(c["padding"] == "valid" for c in cfgs)
    assert any(any(k % 2 == 0 for k in c["w_shape"][2:]) for c in cfgs)
    assert any(max(c["w_shape"][2:]) >= 6 for c in cfgs)
    assert sum(c["cross_check"] for c in cfgs) >= 50


# --------------------------------------------------------------------------------------------------------------
# NaN / Inf propagate like torch
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm", ["direct", "auto"])
@pytest.mark.parametrize("size, channels, kernel, stride, padding_mode", [
    (14, 2, 3, 1, "zeros"), (14, 2, 3, 2, "zeros"), (14, 2, 5, 1, "reflect"), (14, 2, 7, 1, "circular"),
    (14, 2, 9, 1, "zeros"),
    (20, 1, 19, 1, "zeros"),  # big kernel, one channel: on a finite volume "auto" picks the FFT here
])
def test_nan_inf_propagate_like_torch(algorithm, size, channels, kernel, stride, padding_mode, rng):
    """A NaN/Inf in the input contaminates exactly the outputs whose receptive field holds it (as in torch);
    'auto' must not pick an FFT that would smear it over the whole volume. The large kernels are the ones a
    cost model sends to the FFT (19^3 on 20^3 does, for volconv's model when this was written)."""
    x = rng.standard_normal((1, channels, size, size, size)).astype(np.float32)
    x[0, 0, 3, 4, 5] = np.nan
    x[0, channels - 1, size - 4, size - 5, size - 3] = np.inf
    w = np.abs(rng.standard_normal((2, channels, kernel, kernel, kernel))).astype(np.float32) + 0.1  # no inf-inf
    w[1] *= -1
    pad = kernel // 2
    padding_kw = dict(mode="constant") if padding_mode == "zeros" else dict(mode=padding_mode)
    out = vc.conv3d(x, w, stride=stride, padding=pad, padding_mode=padding_mode, algorithm=algorithm)
    expected = F.conv3d(F.pad(torch.from_numpy(x).double(), (pad,) * 6, **padding_kw),
                        torch.from_numpy(w).double(), stride=stride).numpy()

    # the reference itself: NaN exactly on the NaN's receptive field, +-inf on the Inf's (w[0] > 0 > w[1])
    def field(mask):
        m = F.pad(torch.from_numpy(mask.astype(np.float64)), (pad,) * 6, **padding_kw)
        ones = torch.ones(1, channels, kernel, kernel, kernel, dtype=torch.float64)
        return F.conv3d(m, ones, stride=stride)[0, 0].numpy() > 0
    nan_field = field(np.isnan(x))
    inf_field = field(np.isinf(x)) & ~nan_field
    np.testing.assert_array_equal(np.isnan(expected[0]), np.stack([nan_field, nan_field]))
    np.testing.assert_array_equal(np.isposinf(expected[0, 0]), inf_field)
    np.testing.assert_array_equal(np.isneginf(expected[0, 1]), inf_field)
    assert nan_field.any() and inf_field.any() and (~nan_field & ~inf_field).any()

    np.testing.assert_array_equal(np.isnan(out), np.isnan(expected))
    np.testing.assert_array_equal(np.isposinf(out), np.isposinf(expected))
    np.testing.assert_array_equal(np.isneginf(out), np.isneginf(expected))
    finite = np.isfinite(expected)
    x_clean = np.where(np.isfinite(x), x, 0)
    _, mag = ref_conv3d(x_clean, w, None, stride, pad, 1, 1, padding_mode)
    tol = conv_tolerance(mag, np.float32, channels * kernel**3, "direct")
    assert (np.abs(out[finite] - expected[finite]) <= tol[finite]).all()


# --------------------------------------------------------------------------------------------------------------
# every SIMD build of the direct kernel
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("level", ["generic", "avx2", "avx512"])
def test_every_simd_build(level):
    """The direct kernel is compiled once per SIMD level and the CPU picks one at import, so the run above only
    tests that one. VOLCONV_SIMD forces a level (read at import, hence a subprocess): rerun the direct tests
    (forward, gradients, thread determinism, the fused separable, sparse, nested and dynamic kernels) under each level
    this CPU can execute."""
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, VOLCONV_SIMD=level)
    probe = subprocess.run([sys.executable, "-c", "import volconv._cpu as c; print(c.SIMD)"], env=env,
                           capture_output=True, text=True, timeout=120)
    if "supports only" in probe.stderr:
        pytest.skip(f"this CPU cannot run the {level} build")
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert probe.stdout.strip() == level
    default = subprocess.run([sys.executable, "-c", "import volconv._cpu as c; print(c.SIMD)"],
                             env={k: v for k, v in os.environ.items() if k != "VOLCONV_SIMD"},
                             capture_output=True, text=True, timeout=120).stdout.strip()
    if level == (os.environ.get("VOLCONV_SIMD") or default):
        pytest.skip(f"{level} is the build this run already tests")
    files = [os.path.join(tests, f) for f in ("test_conv3d.py", "test_autograd.py", "test_threads.py",
                                              "test_separable.py", "test_sparse.py", "test_nested.py",
                                              "test_dynamic.py")]
    chosen = "(direct or separable or sparse or nested or fused or unfold or adaptive) and not simd and not 20-1-19"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *files,
                          "-k", chosen], env=env, cwd=tests, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"VOLCONV_SIMD={level}:\n{run.stdout[-6000:]}\n{run.stderr[-2000:]}"
    assert " passed" in run.stdout and "no tests ran" not in run.stdout


# --------------------------------------------------------------------------------------------------------------
# The AVX-512 shift kernel (one channel per output, unit W taps, kw <= vector length): its edges
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kw", [1, 2, 7, 8, 9, 15, 16, 17])   # 8 / 16: one vector of double / float
@pytest.mark.parametrize("width", [16, 17, 33, 69])           # one vector, +1 (unaligned tail), several
def test_unit_tap_rows_of_every_width(kw, width, dtype, rng):
    """Depthwise and single-channel rows of every width around the vector length, kernel widths around it
    too, zero and non-zero padding: the aligned-load/shuffle path, its unaligned tail and its fallback."""
    x = rng.standard_normal((2, 3, 4, 5, width)).astype(dtype)
    w = rng.standard_normal((3, 1, 2, 3, kw)).astype(dtype)
    b = rng.standard_normal(3).astype(dtype)
    for padding, mode in [((0, 1, kw // 2), "zeros"), ((1, 1, kw - 1), "circular")]:
        if kw - 1 > width:
            continue
        out = vc.conv3d(x, w, b, padding=padding, groups=3, padding_mode=mode, algorithm="direct")
        check_conv3d(out, x, w, b, padding=padding, groups=3, padding_mode=mode, algorithm="direct")
