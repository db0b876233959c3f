"""The conv3d gradients of the CUDA plugin (cuda_plugin/conv3d.cu) against torch.conv3d's autograd: the weight
gradient (tiles of the output in shared memory, partial sums per slice of tiles, a fixed-order sum of the slices)
and the input gradient's gather kernel (each axis stepped through its residue class of taps), called directly on
many geometries (strides 1-3, dilations, groups, odd and even kernels, asymmetric pads, batches, outputs over
several 32 x 8 tiles with partial ones, tap boxes split along each axis, shrunken tiles), and through vc.conv3d.

Tolerances: float64 within 1e-10 of the reference's scale (its largest magnitude), float32 within 1e-4 (the
plugin sums in another order than torch). Determinism: the same bits in forward, reverse and random thread and
block order (on the emulator; on a GPU, two runs).

Which planner branch a case reaches (conv3d.cu's plan_grad_weight, 48 KiB of shared memory; in float64 the input
tile holds at most 49152 / 8 - 1024 - th * tw values, in float32 49152 / 4 - 1024 - th * tw) is stated by each case."""
import pytest
import torch
import torch.nn.functional as F

import volconv as vc
from volconv._torch import cuda as tcuda
from volconv._validate import ConvSpec

from conftest import config_rng
from test_cuda import FORWARD, GRAD_INPUT, GRAD_WEIGHT, close, tolerance

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def no_tf32(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def plugin_grads(cuda_plugin, x, w, g, stride, pads, dilation, groups):
    """(input gradient, weight gradient) from the plugin's two gradient functions, called directly."""
    spec = ConvSpec(tuple(x.shape), tuple(w.shape), stride=stride, pads=pads, dilation=dilation, groups=groups,
                    mode="constant")
    assert spec.out_shape == tuple(g.shape)
    cuda_plugin.calls.clear()
    gx, gw = tcuda.conv3d_grad_input(g, w, spec), tcuda.conv3d_grad_weight(x, g, spec)
    assert cuda_plugin.names() == [GRAD_INPUT, GRAD_WEIGHT]
    return gx, gw


def torch_grads(x, w, g, stride, pads, dilation, groups):
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    out = F.conv3d(F.pad(xr, [p for lo_hi in reversed(pads) for p in lo_hi]), wr, None, stride, 0, dilation, groups)
    return torch.autograd.grad(out, (xr, wr), g)


def output_shape(x_shape, w_shape, stride, pads, dilation):
    return (x_shape[0], w_shape[0]) + tuple((n + lo + hi - d * (k - 1) - 1) // s + 1 for n, k, s, (lo, hi), d in
                                            zip(x_shape[2:], w_shape[2:], stride, pads, dilation))


def check(cuda_plugin, r, device, dtype, x_shape, w_shape, stride=(1, 1, 1), pads=((0, 0),) * 3,
          dilation=(1, 1, 1), groups=1):
    x, w, g = (torch.from_numpy(r.standard_normal(s)).to(device, dtype)
               for s in (x_shape, w_shape, output_shape(x_shape, w_shape, stride, pads, dilation)))
    ours = plugin_grads(cuda_plugin, x, w, g, stride, pads, dilation, groups)
    for a, ref in zip(ours, torch_grads(x, w, g, stride, pads, dilation, groups)):
        assert a.dtype == dtype
        close(a, ref, tolerance(dtype))


def random_geometry(r):
    groups = int(r.choice([1, 2, 3]))
    C, O = groups * int(r.integers(1, 3)), groups * int(r.integers(1, 3))
    k = tuple(int(v) for v in r.integers(1, 6, size=3))   # odd and even
    stride = tuple(int(v) for v in r.integers(1, 4, size=3))
    dilation = tuple(int(v) for v in r.integers(1, 4, size=3))
    pads = tuple((int(lo), int(hi)) for lo, hi in r.integers(0, 3, size=(3, 2)))
    # outputs up to ~5 x 14 x 40: over two tiles along H and W, the last ones partial
    out = (int(r.integers(1, 6)), int(r.integers(1, 15)), int(r.integers(1, 41)))
    spatial = tuple(max(1, (o - 1) * s + d * (kk - 1) + 1 - lo - hi + int(r.integers(0, s)))
                    for o, s, d, kk, (lo, hi) in zip(out, stride, dilation, k, pads))
    return (int(r.integers(1, 3)), C) + spatial, (O, C // groups) + k, stride, pads, dilation, groups


@pytest.mark.parametrize("case", range(14))
def test_gradients_on_random_geometries_against_torch(case, cuda_plugin, device):
    r = config_rng(801, case)
    x_shape, w_shape, stride, pads, dilation, groups = random_geometry(r)
    check(cuda_plugin, r, device, [torch.float64, torch.float32][case % 2], x_shape, w_shape, stride, pads, dilation,
          groups)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,x_shape,w_shape,stride,pads,dilation", [
    # 11^3 = 1331 taps of one channel pair: more than a block's 256 x 4, the box split along kd
    ("taps over a block's share", (1, 2, 12, 12, 13), (3, 2, 11, 11, 11), (1, 1, 1), ((0, 0),) * 3, (1, 1, 1)),
    # 33 x 33 = 1089 taps of one tap plane: the box split along kh as well
    ("a tap plane over a block's share", (2, 1, 2, 40, 41), (1, 1, 1, 33, 33), (1, 1, 1), ((1, 0),) * 3,
     (1, 1, 1)),
    # input tile 36 x 384 (> 11232 values in float32, 4864 in float64): the output tile halved along H
    ("tile rows shrunk", (1, 1, 1, 36, 384), (1, 1, 1, 1, 30), (1, 5, 3), ((0, 0),) * 3, (1, 1, 10)),
    # columns 31 + 11300 + 1 with one tile row: the box split along kw
    ("box split along kw", (1, 1, 1, 1, 11400), (1, 1, 1, 1, 2), (1, 1, 1), ((0, 0),) * 3, (1, 1, 11300)),
    # columns 31 * 370 + 1 = 11471 with a 1-tap box: the output tile halved along W
    ("tile columns shrunk", (1, 1, 1, 1, 11471), (1, 1, 1, 1, 1), (1, 1, 370), ((0, 0),) * 3, (1, 1, 1)),
])
def test_geometries_that_split_the_tap_box_or_shrink_the_tile(name, x_shape, w_shape, stride, pads, dilation,
                                                                dtype, cuda_plugin, device):
    r = config_rng(802, sum(map(ord, name)), int(dtype == torch.float64))
    check(cuda_plugin, r, device, dtype, x_shape, w_shape, stride, pads, dilation)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,x_shape,w_shape,stride,pads,dilation,groups", [
    # sw == dw, kw >= 3: each slot 4 neighbouring taps of a row, each lane runs of 8 outputs; outputs 4 x 11 x 45
    # (the last run and tile partial), kw = 7 = 4 + 3 (a partial slot)
    ("sliding depthwise", (2, 2, 6, 13, 49), (2, 1, 3, 3, 7), (1, 1, 1), ((0, 0), (1, 0), (1, 0)), (1, 1, 1), 2),
    # sw == dw == 2, kw = 5: windows of every other column, 2 slots per tap row
    ("sliding stride 2", (1, 2, 4, 9, 60), (3, 2, 2, 3, 5), (1, 2, 2), ((1, 1), (0, 0), (2, 1)), (2, 1, 2), 1),
    # sw == dw == 1000, kw = 3: the sliding window's 11 * 1000 + 1 columns do not fit, the strided 2001 do
    ("sliding does not fit", (1, 1, 1, 2, 2001), (1, 1, 1, 2, 3), (1, 1, 1000), ((0, 0),) * 3, (1, 1, 1000), 1),
])
def test_sliding_windows_of_taps_and_outputs(name, x_shape, w_shape, stride, pads, dilation, groups, dtype,
                                             cuda_plugin, device):
    r = config_rng(807, sum(map(ord, name)), int(dtype == torch.float64))
    check(cuda_plugin, r, device, dtype, x_shape, w_shape, stride, pads, dilation, groups)


def test_depthwise_and_grouped_with_many_tiles(cuda_plugin, device):
    """Depthwise 4 channels, even kernel, stride 2 along W: outputs of 5 x 19 x 38, three tiles along H (8 + 8 + 3)
    and two along W (32 + 6), two items; then a grouped one with batch 3 and every stride 3."""
    r = config_rng(803)
    check(cuda_plugin, r, device, torch.float64, (2, 4, 5, 19, 76), (4, 1, 3, 4, 3), (1, 1, 2),
          ((1, 1), (1, 2), (0, 1)), (1, 1, 1), 4)
    check(cuda_plugin, r, device, torch.float32, (3, 6, 9, 28, 100), (4, 3, 2, 3, 3), (3, 3, 3),
          ((1, 0), (0, 2), (2, 2)), (2, 1, 2), 2)


def test_batch_times_channels_beyond_the_grid_limits(cuda_plugin, device):
    """N * O = 70 000 > 65535 (the forward's grid z): the gradients' grids are 1-D; 1000 channel pairs, 70 tiles."""
    check(cuda_plugin, config_rng(804), device, torch.float64, (70, 1, 1, 1, 2), (1000, 1, 1, 1, 1))


def test_an_empty_batch_gives_zero_gradients(cuda_plugin, device):
    x, w = torch.zeros(0, 2, 3, 4, 5, device=device), torch.ones(3, 2, 2, 2, 2, device=device)
    g = torch.zeros(0, 3, 2, 3, 4, device=device)
    gx, gw = plugin_grads(cuda_plugin, x, w, g, (1, 1, 1), ((0, 0),) * 3, (1, 1, 1), 1)
    assert gx.shape == x.shape and torch.equal(gw, torch.zeros_like(w))   # written, not left uninitialised


@pytest.mark.parametrize("stride", [1, 2])
def test_through_vc_conv3d(stride, cuda_plugin, device):
    """The public API's backward runs the weight-gradient function (and at stride 2 the gather kernel)."""
    r = config_rng(805, stride)
    x, w = (torch.from_numpy(r.standard_normal(s)).to(device).requires_grad_() for s in
            ((2, 2, 4, 10, 35), (3, 2, 3, 2, 3)))
    cuda_plugin.calls.clear()
    out = vc.conv3d(x, w, None, stride, 1, (1, 2, 1))
    g = torch.randn_like(out)
    ours = torch.autograd.grad(out, (x, w), g)
    assert cuda_plugin.names() == [FORWARD, GRAD_INPUT if stride > 1 else FORWARD, GRAD_WEIGHT]
    for a, ref in zip(ours, torch_grads(x, w, g, (stride,) * 3, ((1, 1),) * 3, (1, 2, 1), 1)):
        close(a, ref, 1e-4)


@pytest.mark.parametrize("stride", [(1, 2, 2), (1, 1, 1)], ids=["strided", "sliding"])
def test_the_same_bits_in_any_thread_and_block_order(stride, cuda_plugin, device, monkeypatch):
    """float32, 16 slices of tiles (the second kernel adds them) and 27 taps: 7 strided slots (or 9 sliding ones)
    x lanes of outputs."""
    r = config_rng(806)
    x, w = (torch.from_numpy(r.standard_normal(s)).to(device, torch.float32) for s in ((2, 2, 6, 20, 40),
                                                                                      (2, 1, 3, 3, 3)))
    g = torch.from_numpy(r.standard_normal(output_shape(x.shape, w.shape, stride, ((0, 0),) * 3, (1, 1, 1))))
    g = g.to(device, torch.float32)
    runs = []
    for order in ("forward", "reverse", "random", "random") if cuda_plugin.emulated else (None, None):
        if order:
            monkeypatch.setenv("CUDA_EMU_ORDER", order)
            monkeypatch.setenv("CUDA_EMU_SEED", str(len(runs)))
        runs.append(plugin_grads(cuda_plugin, x, w, g, stride, ((0, 0),) * 3, (1, 1, 1), 2))
    assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(runs[0], run))
    for a, ref in zip(runs[0], torch_grads(x, w, g, stride, ((0, 0),) * 3, (1, 1, 1), 2)):
        close(a, ref, 1e-4)
