"""CP / Tucker convolutions and the separable pass on the CUDA plugin (separable.cu), through the public API
(vc.cp_conv3d, vc.tucker_conv3d, vc.nn.CPConv3d / TuckerConv3d) and volconv::separable_conv3d itself, against
torch.conv3d with the dense weight rebuilt from the factors and against volconv's CPU path: forward, the input
and factor gradients, every padding mode, strides, dilations, odd and even factor lengths, batches, float32 and
float64, tiles inside the output and at its borders, output planes split into chunks or not, the ring of
filtered planes at every size (a 32 x 8 tile, fewer rows, opted-in shared memory, the dense fallback beyond it).

Every test checks the plugin's calls (cuda_plugin.calls), so a path through the CPU engine fails. Run on a GPU,
or on the CPU emulator with VOLCONV_CUDA_EMULATOR=1 (see conftest.py's `cuda_plugin` fixture).

Tolerances: float64 within 1e-10 of the reference's scale (max(1, max |ref|)), float32 within 1e-4; gradients
10x that (longer sums: whole volumes). The plugin sums in another order than torch and the CPU engine; cuDNN's
TF32 is disabled for the references."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import volconv as vc
from volconv._torch.lowrank import SEPARABLE_CONV3D
from volconv.decompose import CPKernel, TuckerKernel

from conftest import config_rng
from test_cuda import close, tolerance

pytestmark = pytest.mark.cuda

FORWARD, FACTOR = "vc_separable_forward", "vc_separable_grad_factor"
MODES = ["zeros", "reflect", "replicate", "circular"]


@pytest.fixture(autouse=True)
def no_tf32(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


def leaves(r, device, dtype, *shapes):
    return [torch.from_numpy(r.standard_normal(s)).to(device, dtype).requires_grad_() for s in shapes]


def torch_conv(x, w, b, stride, padding, dilation, groups, mode):
    if mode != "zeros":
        x = F.pad(x, [p for q in reversed(padding) for p in (q, q)], mode=mode)
        padding = 0
    return F.conv3d(x, w, b, stride, padding, dilation, groups)


def separable(z, fd, fh, fw, stride, pads, dilation):
    """volconv::separable_conv3d with zero padding (pads: (lo, hi) per axis), as factored_conv3d calls it."""
    return SEPARABLE_CONV3D(z, fd, fh, fw, list(stride), [p for lh in pads for p in lh], list(dilation),
                            "constant", 0)


def separable_reference(z, fd, fh, fw, stride, pads, dilation):
    w = torch.einsum("ca,cb,ce->cabe", fd, fh, fw)[:, None]
    zp = F.pad(z, [p for lh in reversed(pads) for p in lh])
    return F.conv3d(zp, w, None, stride, 0, dilation, z.shape[1])


def check_separable(cuda_plugin, z, fd, fh, fw, stride, pads, dilation, expect=(FORWARD, FACTOR)):
    """The pass on the plugin against torch and the CPU engine, forward and the four gradients; the plugin's
    functions `expect` must have run, and nothing else."""
    tol = tolerance(z.dtype)
    ins = (z, fd, fh, fw)
    cuda_plugin.calls.clear()
    out = separable(z, fd, fh, fw, stride, pads, dilation)
    g = torch.randn_like(out)
    ours = torch.autograd.grad(out, ins, g)
    assert set(cuda_plugin.names()) == set(expect), cuda_plugin.names()
    assert {c[1] for c in cuda_plugin.calls} == {int(z.dtype == torch.float64)}
    ref = separable_reference(z, fd, fh, fw, stride, pads, dilation)
    close(out, ref, tol)
    for name, a, c in zip(("z", "fd", "fh", "fw"), ours, torch.autograd.grad(ref, ins, g)):
        assert a.shape == c.shape, name
        close(a, c, tol, 10)
    cuda_plugin.calls.clear()
    with cuda_plugin.cpu_engine():
        cpu = [t.detach().cpu().requires_grad_() for t in ins]
        out_cpu = separable(*cpu, stride, pads, dilation)
        grads_cpu = torch.autograd.grad(out_cpu, cpu, g.cpu())
    assert not cuda_plugin.calls
    close(out, out_cpu, tol)
    for a, c in zip(ours, grads_cpu):
        close(a, c, tol, 10)
    return out, ours


# ---- the separable pass ---------------------------------------------------------------------------------------

def random_pass(r):
    k = tuple(int(v) for v in r.integers(1, 6, size=3))
    stride = tuple(int(v) for v in r.integers(1, 4, size=3))
    dilation = tuple(int(v) for v in r.integers(1, 3, size=3))
    pads = tuple((int(a), int(b)) for a, b in r.integers(0, 3, size=(3, 2)))
    shape = tuple(int(max((kk - 1) * d + 1, v)) for kk, d, v in zip(k, dilation, r.integers(3, 12, size=3)))
    return (int(r.integers(1, 3)), int(r.integers(1, 4))) + shape, k, stride, pads, dilation


@pytest.mark.parametrize("case", range(10))
def test_separable_pass_random_geometries(case, cuda_plugin, device):
    """Odd and even factor lengths 1 to 5, strides 1 to 3 (beyond the D reach: the ring restarts), dilations,
    asymmetric zero padding, batches, float32 / float64."""
    r = config_rng(1601, case)
    shape, k, stride, pads, dilation = random_pass(r)
    dtype = [torch.float64, torch.float32][case % 2]
    z, fd, fh, fw = leaves(r, device, dtype, shape, (shape[1], k[0]), (shape[1], k[1]), (shape[1], k[2]))
    check_separable(cuda_plugin, z, fd, fh, fw, stride, pads, dilation)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_separable_pass_interior_and_boundary_tiles(dtype, cuda_plugin, device):
    """Output 12 x 10 x 37: two 32-column tiles along W and two 8-row tiles along H (a full one inside, partial
    ones at the border), a crop on one side (negative transposed padding in the input gradient), even and odd
    lengths, several chunks of output planes along D."""
    r = config_rng(1602, int(dtype == torch.float64))
    z, fd, fh, fw = leaves(r, device, dtype, (2, 2, 13, 11, 38), (2, 2), (2, 3), (2, 4))
    out, _ = check_separable(cuda_plugin, z, fd, fh, fw, (1, 1, 1), ((0, 0), (1, 0), (2, 0)), (1, 1, 1))
    assert out.shape == (2, 2, 12, 10, 37)


@pytest.mark.parametrize("shape, k, stride, pads, dilation", [
    ((1, 2, 10, 9, 11), (2, 3, 1), (3, 2, 3), ((2, 0), (1, 1), (0, 2)), (3, 2, 1)),
    ((2, 1, 7, 5, 2), (3, 1, 2), (2, 3, 3), ((0, 1), (0, 0), (1, 0)), (2, 1, 1))])
def test_separable_pass_strided_input_gradient_phases(shape, k, stride, pads, dilation, cuda_plugin, device):
    """The input gradient's phases: a stride sharing a factor with the dilation (phases no tap reaches: zero),
    a stride beyond the factor's length, an axis shorter than its stride."""
    r = config_rng(1610, shape[0])
    z, fd, fh, fw = leaves(r, device, torch.float64, shape, *((shape[1], n) for n in k))
    check_separable(cuda_plugin, z, fd, fh, fw, stride, pads, dilation)


@pytest.mark.parametrize("reach, dtype", [(25, torch.float64), (201, torch.float64), (701, torch.float64)])
def test_separable_pass_every_ring_size(reach, dtype, cuda_plugin, device):
    """A D reach (kd - 1) * dd + 1 whose ring of filtered planes needs fewer tile rows (25 planes: 4 rows in
    48 KiB), opted-in shared memory (201: one row, > 48 KiB), or does not fit at all (701: the dense kernels of
    the conv3d family, the factors' gradients contracted from the dense weight's)."""
    r = config_rng(1603, reach)
    dd = (reach - 1) // 2 if reach < 700 else reach - 1
    kd = 3 if reach < 700 else 2
    z, fd, fh, fw = leaves(r, device, dtype, (1, 2, reach + 2, 3, 4), (2, kd), (2, 2), (2, 3))
    expect = (FORWARD, FACTOR) if reach < 700 else ("vc_conv3d_forward", "vc_conv3d_grad_input",
                                                    "vc_conv3d_grad_weight")
    check_separable(cuda_plugin, z, fd, fh, fw, (1, 1, 1), ((0, 0), (1, 1), (1, 1)), (dd, 1, 1), expect)


def test_separable_pass_gradcheck_and_bitwise_determinism(cuda_plugin, device):
    """gradcheck in float64 through the plugin (strided, dilated, padded); float32 results and gradients
    bit-identical when run again (fixed-order reductions, no atomics)."""
    r = config_rng(1604)
    z, fd, fh, fw = leaves(r, device, torch.float64, (1, 2, 5, 6, 7), (2, 2), (2, 3), (2, 2))
    geometry = ((1, 2, 1), ((1, 0), (1, 1), (0, 2)), (2, 1, 1))
    assert torch.autograd.gradcheck(lambda *t: separable(*t, *geometry), (z, fd, fh, fw))
    assert set(cuda_plugin.names()) == {FORWARD, FACTOR}
    ins = [t.detach().float().requires_grad_() for t in (z, fd, fh, fw)]
    runs = []
    for _ in range(2):
        out = separable(*ins, *geometry)
        runs.append([out] + list(torch.autograd.grad(out, ins, torch.ones_like(out))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ---- the public API and the layers --------------------------------------------------------------------------

def random_cp(r, Cout, Cin, ks, R):
    return CPKernel(r.standard_normal(R), [r.standard_normal((n, R)) for n in (Cout, Cin) + ks])


def dense_weight(kernel, like):
    return torch.from_numpy(np.ascontiguousarray(kernel.to_dense())).to(like.device, like.dtype)


def check_factored_op(cuda_plugin, op, x, kernel, b, stride, padding, dilation, mode, expect):
    """op (vc.cp_conv3d / vc.tucker_conv3d) on the plugin: forward and the gradients of x and b against torch
    with the dense weight and against the CPU path; the plugin functions `expect` ran, and only on this dtype."""
    tol = tolerance(x.dtype)
    cuda_plugin.calls.clear()
    out = op(x, kernel, b, stride, padding, dilation, padding_mode=mode)
    g = torch.randn_like(out)
    ours = torch.autograd.grad(out, (x, b), g)
    assert set(expect) <= set(cuda_plugin.names()), cuda_plugin.names()
    assert {c[1] for c in cuda_plugin.calls} == {int(x.dtype == torch.float64)}
    assert out.device == x.device and out.dtype == x.dtype
    ref = torch_conv(x, dense_weight(kernel, x), b, stride, padding, dilation, 1, mode)
    close(out, ref, tol)
    for a, c in zip(ours, torch.autograd.grad(ref, (x, b), g)):
        close(a, c, tol, 10)
    with cuda_plugin.cpu_engine():
        cpu = op(x.detach().cpu(), kernel, b.detach().cpu(), stride, padding, dilation, padding_mode=mode)
    close(out, cpu, tol)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cp_conv3d_every_padding_mode_and_dtype(mode, dtype, cuda_plugin, device):
    """Output 4 x 9 x 34: two tiles along W and H; stride and dilation; the components' pass padded by torch
    first in the modes other than zeros."""
    r = config_rng(1605, MODES.index(mode), int(dtype == torch.float64))
    cp = random_cp(r, 3, 2, (3, 2, 3), 3)
    x, b = leaves(r, device, dtype, (2, 2, 6, 18, 36), (3,))
    check_factored_op(cuda_plugin, vc.cp_conv3d, x, cp, b, (1, 2, 1), (1, 1, 0), (1, 1, 1), mode, (FORWARD,))


@pytest.mark.parametrize("mode", ["zeros", "reflect"])
def test_tucker_conv3d_core_on_the_plugin(mode, cuda_plugin, device):
    """The Tucker core by the plugin's conv3d between the two projections (cuBLAS through torch)."""
    r = config_rng(1606, MODES.index(mode))
    sizes, ranks = (3, 4, 3, 2, 3), (2, 3, 2, 2, 3)
    tk = TuckerKernel(r.standard_normal(ranks), [r.standard_normal((n, k)) for n, k in zip(sizes, ranks)])
    x, b = leaves(r, device, torch.float64, (2, 4, 5, 6, 7), (3,))
    check_factored_op(cuda_plugin, vc.tucker_conv3d, x, tk, b, (2, 1, 1), (1, 1, 1), (1, 2, 1), mode,
                      ("vc_conv3d_forward",))


def test_cp_conv3d_on_the_gpu_without_gradients(cuda_plugin, device):
    """A CUDA tensor that needs no gradient takes the plugin too (not the numpy path)."""
    r = config_rng(1607)
    cp = random_cp(r, 2, 3, (2, 3, 3), 4)
    x = torch.from_numpy(r.standard_normal((1, 3, 5, 6, 7))).to(device, torch.float32)
    cuda_plugin.calls.clear()
    with torch.no_grad():
        out = vc.cp_conv3d(x, cp, None, 1, (0, 1, 1))
    assert cuda_plugin.names() == [FORWARD]
    close(out, torch_conv(x, dense_weight(cp, x), None, 1, (0, 1, 1), 1, 1, "zeros"), 1e-4)


@pytest.mark.parametrize("layer", ["cp", "tucker"])
def test_layers_training_step(layer, cuda_plugin, device):
    """vc.nn.CPConv3d / TuckerConv3d (five ranks: spatial factors trained too) on the device: a training step's
    gradients of every parameter against the same layer on the CPU path and torch with to_dense(); inference
    under no_grad on the device."""
    torch.manual_seed(16)
    args = dict(kernel_size=(3, 2, 3), stride=(1, 2, 1), padding=1, dilation=(2, 1, 1), padding_mode="replicate",
                dtype=torch.float64)
    net = vc.nn.CPConv3d(3, 4, rank=3, **args) if layer == "cp" else \
        vc.nn.TuckerConv3d(3, 4, ranks=(2, 3, 2, 2, 3), **args)
    net = net.to(device)
    x = torch.randn(2, 3, 7, 8, 9, dtype=torch.float64, device=device)
    cuda_plugin.calls.clear()
    out = net(x)
    out.square().mean().backward()
    expect = {FORWARD, FACTOR} if layer == "cp" else {"vc_conv3d_forward", "vc_conv3d_grad_weight"}
    assert expect <= set(cuda_plugin.names()), cuda_plugin.names()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    ref = torch_conv(x, net.to_dense(), net.bias, net.stride, (1, 1, 1), net.dilation, 1, "replicate")
    close(out, ref, 1e-10)
    ref.square().mean().backward()
    for n, p in net.named_parameters():
        close(grads[n], p.grad, 1e-10, 10)
    net.zero_grad()
    with cuda_plugin.cpu_engine():
        net.cpu()(x.cpu()).square().mean().backward()
    for n, p in net.named_parameters():
        close(grads[n], p.grad, 1e-10, 10)
    net.to(device)
    with torch.no_grad():   # the step (by hand: torch.optim's first step imports triton, which ASan builds abort)
        for n, p in net.named_parameters():
            p -= 0.1 * grads[n]
    cuda_plugin.calls.clear()
    with torch.no_grad():
        after = net(x)
    assert (FORWARD if layer == "cp" else "vc_conv3d_forward") in cuda_plugin.names()
    close(after, torch_conv(x, net.to_dense(), net.bias, net.stride, (1, 1, 1), net.dilation, 1, "replicate"),
          1e-10)


def test_separable_pass_beyond_the_grid(cuda_plugin, device):
    """65537 channels: more (n, c) items than the grid's z (65535) in the forward and in the factor gradients'
    reduction, which then stride over them."""
    r = config_rng(1608)
    z, fd, fh, fw = leaves(r, device, torch.float32, (1, 65537, 2, 1, 2), (65537, 2), (65537, 1), (65537, 1))
    check_separable(cuda_plugin, z, fd, fh, fw, (1, 1, 1), ((0, 0), (0, 0), (0, 0)), (1, 1, 1))


@pytest.mark.parametrize("mode, cval", [("constant", 0.0), ("constant", 1.5), ("mirror", 0.0)])
def test_separable_kernel_on_the_plugin(mode, cval, cuda_plugin, device):
    """A vc.SeparableKernel of two terms on every channel (_torch.lowrank.separable_kernel_conv3d, the fused pass
    per term) against torch with its dense kernel: float32, the input's gradient, a cval and scipy's mirror mode
    (torch's reflect) padded by torch."""
    from volconv._torch.lowrank import separable_kernel_conv3d
    from volconv._validate import ConvSpec

    r = config_rng(1609, ["constant", "mirror"].index(mode), int(cval))
    kernel = vc.SeparableKernel([r.standard_normal((2, k)) for k in (3, 4, 2)], r.standard_normal(2))
    x, = leaves(r, device, torch.float32, (2, 2, 6, 7, 9))
    pads = ((1, 1), (2, 1), (0, 1))
    spec = ConvSpec(tuple(x.shape), (2, 1, 3, 4, 2), stride=(1, 2, 1), pads=pads, dilation=(1, 1, 2), groups=2,
                    mode=mode, cval=cval)
    cuda_plugin.calls.clear()
    out = separable_kernel_conv3d(x, kernel, spec, None)
    g = torch.randn_like(out)
    ours, = torch.autograd.grad(out, x, g)
    # two terms: a forward pass each, and the input gradient's two phases of the H stride each
    assert cuda_plugin.names() == [FORWARD] * 6
    w = torch.from_numpy(kernel.to_dense()).float().expand(2, 1, -1, -1, -1)
    flat = [p for lh in reversed(pads) for p in lh]
    xp = F.pad(x, flat, mode="constant", value=cval) if mode == "constant" else F.pad(x, flat, mode="reflect")
    ref = F.conv3d(xp, w.to(device), None, (1, 2, 1), 0, (1, 1, 2), 2)
    close(out, ref, 1e-4)
    close(ours, torch.autograd.grad(ref, x, g)[0], 1e-4, 10)


def exercise_every_kernel(cuda_plugin, device):
    """separable.cu's check for test_cuda.py's emptied-kernel test (EXERCISES): the fused pass, its input
    gradient and the factor gradients (the partial sums over several chunks and their sum)."""
    r = config_rng(1610)
    z, fd, fh, fw = leaves(r, device, torch.float64, (1, 2, 6, 7, 40), (2, 3), (2, 2), (2, 3))
    check_separable(cuda_plugin, z, fd, fh, fw, (1, 1, 1), ((1, 1), (0, 1), (1, 1)), (1, 1, 1))


def test_every_kernel_once(cuda_plugin, device):
    exercise_every_kernel(cuda_plugin, device)


@pytest.mark.parametrize("mode", ["reflect", "constant", "wrap"])
def test_separable_kernels_through_the_public_api(mode, cuda_plugin, device):
    """vc.correlate / vc.convolve and vc.conv3d given a SeparableKernel on a CUDA tensor run the separable passes
    (never the dense kernel), against scipy.ndimage and torch with the dense kernel."""
    from scipy import ndimage

    r = config_rng(1611, ["reflect", "constant", "wrap"].index(mode))
    kernel = vc.SeparableKernel([r.standard_normal((2, k)) for k in (3, 4, 5)], r.standard_normal(2))
    v = r.standard_normal((7, 9, 11))
    for op, ref in ((vc.correlate, ndimage.correlate), (vc.convolve, ndimage.convolve)):
        cuda_plugin.calls.clear()
        got = op(torch.from_numpy(v).to(device), kernel, mode=mode, cval=0.5)
        assert set(cuda_plugin.names()) == {FORWARD}, cuda_plugin.names()
        close(got, torch.from_numpy(ref(v, kernel.to_dense(), mode=mode, cval=0.5)), 1e-10)
    x, b = torch.from_numpy(r.standard_normal((2, 3, 6, 7, 8))).to(device), torch.ones(3, dtype=torch.float64)
    cuda_plugin.calls.clear()
    got = vc.conv3d(x, kernel, b.to(device), padding=(1, 2, 2), stride=(1, 2, 1))
    assert set(cuda_plugin.names()) == {FORWARD}, cuda_plugin.names()
    w = torch.from_numpy(kernel.to_dense()).expand(3, 1, -1, -1, -1).to(device)
    close(got, F.conv3d(x, w, b.to(device), (1, 2, 1), (1, 2, 2), 1, 3), 1e-10)
