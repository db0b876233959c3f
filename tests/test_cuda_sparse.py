"""Sparse kernels on the CUDA plugin (cuda_plugin/sparse.cu): vc.sparse_conv3d, vc.nn.SparseConv3d and
pattern_conv3d on CUDA tensors (on a GPU, or with VOLCONV_CUDA_EMULATOR=1 on the plugin compiled for the CPU
emulator: see the `cuda_plugin` fixture in conftest.py), forward and gradients (input, values, bias), against
torch.conv3d with the dense weight the non-zeros make and against the CPU engine.

Every test checks the plugin's own calls (cuda_plugin.calls), so a result computed by the CPU engine or through a
dense weight fails. Shapes are small but cover the kernels' branches: strips of 4 outputs (planes wider than 64)
and of 1, interior and border strips, more taps per channel than one shared-memory chunk (256), the input
gradient at stride 1 (the forward on the transposed list) and at other strides (the gather, per residue class),
several slices and tap groups of the values gradient, Wo below and above a warp, every padding mode, groups,
dilation, 3-D and 5-D kernels, batches, float32 and float64, an empty pattern.

Tolerances: float64 within 1e-10 of the reference's scale (max(1, max |ref|)), float32 within 1e-4, gradients
10x that (they sum more terms); the plugin sums in another order than torch and the CPU engine, so no bitwise
comparison with them, but its own results are bit-identical from run to run."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import volconv as vc
from volconv import SparseKernel
from volconv.ops.sparse import pattern_conv3d

from conftest import config_rng
from test_cuda import close, tolerance

pytestmark = pytest.mark.cuda

FORWARD, GRAD_INPUT, GRAD_VALUES = ("vc_sparse_conv3d_forward", "vc_sparse_conv3d_grad_input",
                                    "vc_sparse_conv3d_grad_values")
MODES = ["zeros", "reflect", "replicate", "circular"]


@pytest.fixture(autouse=True)
def no_tf32(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def pattern(r, shape, density):
    """A random sparse kernel of this shape (at least one tap)."""
    w = r.standard_normal(shape)
    w[r.random(shape) >= density] = 0
    if not w.any():
        w.flat[int(r.integers(w.size))] = 1.5
    return SparseKernel.from_dense(w)


def dense(kernel, channels, like):
    """The dense weight of a kernel as torch.conv3d takes it (a 3-D one: depthwise over the channels)."""
    idx, values, shape = kernel.as_weight(channels if len(kernel.shape) == 3 else None)
    return torch.from_numpy(SparseKernel(idx, values, shape).to_dense()).to(like.device, like.dtype)


def torch_reference(x, w, b, stride, padding, dilation, groups, mode):
    if mode != "zeros":
        x = F.pad(x, [p for q in reversed(padding) for p in (q, q)], mode=mode)
        padding = 0
    return F.conv3d(x, w, b, stride, padding, dilation, groups)


def values_of(kernel, channels, like):
    """The kernel's values as a leaf tensor in the order pattern_conv3d takes them, and its indices and shape."""
    idx, values, shape = kernel.as_weight(channels if len(kernel.shape) == 3 else None)
    return idx, torch.from_numpy(values).to(like.device, like.dtype).requires_grad_(), shape


def expected_backward(names, stride):
    """The forward, then the input gradient (stride 1: the forward kernel on the transposed list; else the
    gather), then the values gradient."""
    return names == [FORWARD, FORWARD if tuple(stride) == (1, 1, 1) else GRAD_INPUT, GRAD_VALUES]


def check(cuda_plugin, x, kernel, b, stride, padding, dilation, groups, mode):
    """pattern_conv3d on the plugin against torch with the dense weight and against the CPU engine: the output and
    the gradients of input, values and bias. Returns the output."""
    C, tol = x.shape[1], tolerance(x.dtype)
    stride, padding, dilation = (v if isinstance(v, (tuple, str)) else (v,) * 3 for v in (stride, padding, dilation))
    idx, v, shape = values_of(kernel, C, x)
    if len(kernel.shape) == 3:
        groups = C
    leaves = [t for t in (x, v, b) if t is not None]
    cuda_plugin.calls.clear()
    out = pattern_conv3d(x, idx, v, shape, b, stride, padding, dilation, groups, mode)
    g = torch.randn_like(out)
    ours = torch.autograd.grad(out, leaves, g)
    assert expected_backward(cuda_plugin.names(), stride), cuda_plugin.names()
    assert {c[1] for c in cuda_plugin.calls} == {1 if x.dtype == torch.float64 else 0}
    assert out.device == x.device and out.dtype == x.dtype
    wd = torch.zeros(shape, dtype=x.dtype, device=x.device).index_put(tuple(torch.as_tensor(idx).T), v)
    ref = torch_reference(x, wd, b, stride, padding, dilation, groups, mode)
    close(out.detach(), ref.detach(), tol)
    for a, c in zip(ours, torch.autograd.grad(ref, leaves, g)):
        close(a, c, tol, 10)
    with cuda_plugin.cpu_engine():
        cpu = pattern_conv3d(*(t.detach().cpu() for t in (x,)), idx, v.detach().cpu(), shape,
                             None if b is None else b.detach().cpu(), stride, padding, dilation, groups, mode)
    assert expected_backward(cuda_plugin.names(), stride)   # the CPU engine, not the plugin
    close(out.detach().cpu(), cpu, tol)
    return out


def leaf(r, shape, device, dtype):
    return torch.from_numpy(r.standard_normal(shape)).to(device, dtype).requires_grad_()


def random_case(r):
    groups = int(r.choice([1, 2]))
    C, O = groups * int(r.integers(1, 3)), groups * int(r.integers(1, 3))
    k = tuple(int(v) for v in r.integers(1, 6, size=3))
    stride = tuple(int(v) for v in r.integers(1, 3, size=3))
    dilation = tuple(int(v) for v in r.integers(1, 3, size=3))
    padding = tuple(int(v) for v in r.integers(0, 3, size=3))
    shape = tuple(int(max(kk * d + 1, v)) for kk, d, v in zip(k, dilation, r.integers(4, 11, size=3)))
    mode = str(r.choice(MODES))
    if mode != "zeros":
        padding = tuple(min(p, n - 1) for p, n in zip(padding, shape))
    return (int(r.integers(1, 3)), C) + shape, (O, C // groups) + k, stride, padding, dilation, groups, mode


def exercise_every_kernel(cuda_plugin, device):
    """One small call through each of sparse.cu's kernels (the forward, the input gradient at stride 1 and 2, the
    values gradient and its sum over slices), checked: an AssertionError when one of them computes nothing or
    computes wrong. For checks that empty kernels one at a time (as tests/test_cuda.py does for conv3d.cu)."""
    r = config_rng(808)
    x = leaf(r, (1, 2, 5, 6, 7), device, torch.float64)
    kernel = pattern(r, (2, 2, 3, 3, 3), 0.5)
    for stride in [1, 2]:
        check(cuda_plugin, x, kernel, None, stride, 1, 1, 1, "zeros")


def test_every_kernel_once(cuda_plugin, device):
    exercise_every_kernel(cuda_plugin, device)


# ---- forward and gradients against torch and the CPU engine ---------------------------------------------------

@pytest.mark.parametrize("case", range(10))
def test_random_patterns_against_torch_and_the_cpu(case, cuda_plugin, device):
    r = config_rng(801, case)
    x_shape, w_shape, stride, padding, dilation, groups, mode = random_case(r)
    dtype = [torch.float64, torch.float32][case % 2]
    if case % 3 == 2:   # a 3-D kernel: depthwise over the channels
        w_shape = w_shape[2:]
    kernel = pattern(r, w_shape, float(r.choice([0.05, 0.3, 0.7])))
    x = leaf(r, x_shape, device, dtype)
    O = x_shape[1] if len(w_shape) == 3 else w_shape[0]
    b = leaf(r, (O,), device, dtype) if case % 2 else None
    check(cuda_plugin, x, kernel, b, stride, padding, dilation, groups, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_padding_mode_and_dtype_across_strips_and_borders(mode, dtype, cuda_plugin, device):
    """Output 3 x 5 x 134: strips of 4 (a tile of 128 columns and a partial one), rows of a partial block,
    interior and border strips; groups, asymmetric padding, a bias, a batch of 2."""
    r = config_rng(802, MODES.index(mode), int(dtype == torch.float64))
    x, b = leaf(r, (2, 4, 3, 5, 136), device, dtype), leaf(r, (4,), device, dtype)
    out = check(cuda_plugin, x, pattern(r, (4, 2, 3, 3, 3), 0.4), b, 1, (1, 1, 0), 1, 2, mode)
    assert out.shape[-1] > 128


@pytest.mark.parametrize("stride", [(1, 1, 1), (2, 1, 3)])
def test_more_taps_per_channel_than_a_shared_chunk(stride, cuda_plugin, device):
    """About 600 taps per output channel and per input channel: the forward, the transposed forward and the
    gather stage their lists in chunks; the values gradient has many tap groups."""
    r = config_rng(803, stride[2])
    x = leaf(r, (1, 2, 7, 7, 9), device, torch.float32)
    check(cuda_plugin, x, pattern(r, (2, 2, 5, 5, 7), 0.85), None, stride, 2, 1, 1, "zeros")


def test_strided_gather_with_dilation_groups_and_padding(cuda_plugin, device):
    """Stride and dilation sharing factors (residue classes with no taps), groups, a 5-D kernel, float64."""
    r = config_rng(804)
    x = leaf(r, (2, 4, 9, 8, 11), device, torch.float64)
    check(cuda_plugin, x, pattern(r, (6, 2, 3, 4, 3), 0.5), leaf(r, (6,), device, torch.float64), (2, 3, 2), (1, 2, 0),
          (2, 1, 3), 2, "zeros")


def test_padding_same_and_larger_than_the_reach(cuda_plugin, device):
    """'same' padding with an even kernel; padding beyond the kernel's reach (the transposed input gradient then
    crops: negative pads)."""
    r = config_rng(805)
    x = leaf(r, (1, 3, 6, 5, 7), device, torch.float64)
    check(cuda_plugin, x, pattern(r, (3, 1, 4, 2, 3), 0.6), None, 1, "same", (1, 2, 1), 3, "zeros")
    check(cuda_plugin, x, pattern(r, (2, 3, 2, 1, 2), 0.6), None, 1, (3, 2, 4), 1, 1, "zeros")


def test_an_empty_pattern(cuda_plugin, device):
    """nnz = 0: the output is the bias, the input gradient zero, the values gradient empty."""
    x = torch.randn(2, 2, 4, 5, 6, device=device, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, device=device, dtype=torch.float64, requires_grad=True)
    v = torch.zeros(0, device=device, dtype=torch.float64, requires_grad=True)
    for stride in [1, 2]:
        cuda_plugin.calls.clear()
        out = pattern_conv3d(x, np.zeros((0, 5), np.int64), v, (3, 2, 3, 3, 3), b, stride, 1)
        gx, gv, gb = torch.autograd.grad(out, [x, v, b], torch.ones_like(out))
        assert expected_backward(cuda_plugin.names(), (stride,) * 3), cuda_plugin.names()
        assert torch.equal(out, b.detach()[:, None, None, None].expand_as(out))
        assert torch.equal(gx, torch.zeros_like(x)) and gv.shape == (0,)
        assert torch.equal(gb, torch.full_like(b, out[:, 0].numel()))


# ---- the public API and the layer ------------------------------------------------------------------------------

def test_sparse_conv3d_without_gradients_and_with_a_torch_sparse_weight(cuda_plugin, device):
    """vc.sparse_conv3d on tensors that need no gradient (the plugin's forward alone), with a 3-D SparseKernel and
    with a torch sparse COO weight whose values take a gradient."""
    r = config_rng(806)
    x = torch.from_numpy(r.standard_normal((2, 3, 6, 7, 8))).to(device, torch.float32)
    k3 = pattern(r, (3, 3, 3), 0.3)
    cuda_plugin.calls.clear()
    out = vc.sparse_conv3d(x, k3, padding=1, padding_mode="replicate")
    assert cuda_plugin.names() == [FORWARD]
    ref = torch_reference(x, dense(k3, 3, x), None, (1,) * 3, (1,) * 3, (1,) * 3, 3, "replicate")
    close(out, ref, 1e-4)
    w = torch.from_numpy(pattern(r, (2, 3, 3, 2, 3), 0.4).to_dense()).to(device, torch.float32)
    ws = w.to_sparse().requires_grad_()
    cuda_plugin.calls.clear()
    out = vc.sparse_conv3d(x, ws, stride=(1, 2, 1))
    (gw,) = torch.autograd.grad(out.sum(), [ws])
    assert cuda_plugin.names() == [FORWARD, GRAD_VALUES]
    wr = w.clone().requires_grad_()
    ref = F.conv3d(x, wr, stride=(1, 2, 1))
    close(out.detach(), ref.detach(), 1e-4)
    (gd,) = torch.autograd.grad(ref.sum(), [wr])
    close(gw.to_dense(), gd * (w != 0), 1e-4, 10)


def test_gradcheck_and_bitwise_determinism(cuda_plugin, device):
    """gradcheck in float64 through the plugin (both input-gradient kernels); float32 results and gradients
    bit-identical when run again (fixed-order reductions, no atomics), on the emulator in any thread order."""
    r = config_rng(807)
    kernel = pattern(r, (2, 2, 3, 2, 3), 0.3)
    idx, _, shape = kernel.as_weight()
    x = torch.randn(1, 2, 4, 4, 5, device=device, dtype=torch.float64, requires_grad=True)
    v = torch.from_numpy(kernel.values).to(device).requires_grad_()
    for stride in [1, (2, 1, 2)]:
        cuda_plugin.calls.clear()
        assert torch.autograd.gradcheck(lambda x, v: pattern_conv3d(x, idx, v, shape, None, stride, 1, (1, 2, 1)),
                                        (x, v), fast_mode=True)
        assert {FORWARD, GRAD_VALUES} <= set(cuda_plugin.names()) <= {FORWARD, GRAD_INPUT, GRAD_VALUES}
    x32, v32 = x.detach().float().requires_grad_(), v.detach().float().requires_grad_()
    results = []
    for _ in range(2):
        out = pattern_conv3d(x32, idx, v32, shape, None, (2, 1, 2), 1, 1)
        results.append((out.detach(),) + torch.autograd.grad(out, [x32, v32], torch.ones_like(out)))
    for a, c in zip(*results):
        assert torch.equal(a, c)


def test_the_layer_trains_on_the_plugin_as_on_the_cpu(cuda_plugin, device):
    """vc.nn.SparseConv3d on the device: two SGD steps match the same layer on the CPU engine."""
    torch.manual_seed(3)
    layer = vc.nn.SparseConv3d(4, 6, 3, stride=(1, 2, 1), padding=1, groups=2, density=0.4,
                               padding_mode="reflect", dtype=torch.float64).to(device)
    twin = vc.nn.SparseConv3d(4, 6, 3, stride=(1, 2, 1), padding=1, groups=2, density=0.4,
                              padding_mode="reflect", dtype=torch.float64)
    twin.load_state_dict({k: t.cpu() for k, t in layer.state_dict().items()})
    x = torch.randn(2, 4, 5, 6, 7, dtype=torch.float64)
    target = torch.randn(2, 6, 5, 3, 7, dtype=torch.float64)
    for model, on_plugin in [(layer, True), (twin, False)]:
        cuda_plugin.calls.clear()
        for _ in range(2):   # (SGD by hand: torch.optim imports triton, which an ASan build cannot load)
            model.zero_grad()
            if on_plugin:
                ((model(x.to(device)) - target.to(device)) ** 2).mean().backward()
            else:
                with cuda_plugin.cpu_engine():
                    ((model(x) - target) ** 2).mean().backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
        assert cuda_plugin.names() == ([FORWARD, GRAD_VALUES] * 2 if on_plugin else [])
    for name, p in layer.named_parameters():
        close(p.detach().cpu(), dict(twin.named_parameters())[name].detach(), 1e-10)


def test_conv3d_with_a_sparse_weight_runs_the_sparse_kernels(cuda_plugin, device):
    """vc.conv3d given a SparseKernel (or a torch sparse weight) on a CUDA tensor: the sparse plugin, not the dense
    kernel on the densified weight."""
    r = config_rng(809)
    x = leaf(r, (1, 2, 5, 6, 7), device, torch.float64).detach()
    kernel = pattern(r, (3, 2, 3, 3, 3), 0.3)
    ref = torch_reference(x, dense(kernel, 2, x), None, 1, (1, 1, 1), 1, 1, "zeros")
    for weight in (kernel, dense(kernel, 2, x).to_sparse()):
        cuda_plugin.calls.clear()
        close(vc.conv3d(x, weight, padding=1), ref, tolerance(torch.float64))
        assert cuda_plugin.names() == [FORWARD], cuda_plugin.names()


@pytest.mark.parametrize("mode", ["reflect", "constant", "nearest", "mirror", "wrap"])
def test_correlate_and_convolve_with_a_sparse_kernel_against_scipy(mode, cuda_plugin, device):
    """vc.correlate / vc.convolve given a 3-D SparseKernel on a CUDA tensor run the sparse kernels (cost by the
    non-zeros), with every scipy mode and a cval, against scipy.ndimage with the dense kernel."""
    from scipy import ndimage

    r = config_rng(810, ["reflect", "constant", "nearest", "mirror", "wrap"].index(mode))
    kernel = pattern(r, (4, 3, 5), 0.3)
    v = r.standard_normal((7, 9, 11))
    for op, ref in ((vc.correlate, ndimage.correlate), (vc.convolve, ndimage.convolve)):
        cuda_plugin.calls.clear()
        got = op(torch.from_numpy(v).to(device), kernel, mode=mode, cval=0.5)
        assert cuda_plugin.names() == [FORWARD], cuda_plugin.names()
        close(got, torch.from_numpy(ref(v, kernel.to_dense(), mode=mode, cval=0.5)), tolerance(torch.float64))
