"""Dynamic per-voxel kernels on the CUDA plugin (cuda_plugin/dynamic.cu): vc.dynamic_conv3d and
vc.nn.DynamicConv3d (with and without tile=) on CUDA tensors (on a GPU, or with VOLCONV_CUDA_EMULATOR=1 on the
plugin compiled for the CPU emulator: see the `cuda_plugin` fixture in conftest.py), forward, kernel-field gradient
and input gradient, against the unfold reference (_torch/reference.py's dynamic_reference, differentiated by torch)
and against the CPU engine.

Every test checks the plugin's own calls (cuda_plugin.calls), so a result computed by the CPU engine fails. Shapes
are small but cover the kernels' branches: the grouped layout on the fused forward (1, 2 and 4 channels per shared
tile, several output tiles per plane and planes wider than a tile, channel chunks of a group) and on the general
one (more than 4 groups, a kernel extent above 5), the full layout, strides, dilations, explicit / "same" /
"valid" padding, batches, float32 and float64, the input gradient's residue classes (stride 2 and 3 with dilation).

Tolerances (test_cuda's close): float64 within 1e-10 of the reference's scale (max(1, max |ref|)), float32 within
1e-4, gradients 10x that; the plugin sums in another order than the reference and the CPU engine, so no bitwise
comparison with them, but its own results are bit-identical across the emulator's thread and block orders."""
import pytest
import torch

import volconv as vc
from volconv._torch import cuda_dynamic
from volconv._torch.reference import dynamic_reference
from volconv._validate import conv_spec
from volconv.engine.dynamic import Layout

from conftest import config_rng
from test_cuda import close, tolerance

pytestmark = pytest.mark.cuda

FORWARD, FUSED, GRAD_INPUT, GRAD_KERNELS = ("vc_dynamic_forward", "vc_dynamic_forward_fused",
                                            "vc_dynamic_grad_input", "vc_dynamic_grad_kernels")


def operands(r, device, dtype, x_shape, kernel_size, stride, padding, dilation, groups=None, out_channels=None):
    """x and a kernel field (grouped with `groups`, else full with out_channels) as leaves, and their Layout."""
    k = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
    T = k[0] * k[1] * k[2]
    lead = (groups,) if groups else (out_channels, x_shape[1])
    spatial = _out_spatial(x_shape, k, stride, padding, dilation)
    k_shape = (x_shape[0],) + lead + (T,) + spatial
    layout = Layout(x_shape, k_shape, k, stride, padding, dilation)
    x = torch.from_numpy(r.standard_normal(x_shape)).to(device, dtype).requires_grad_()
    K = torch.from_numpy(r.standard_normal(k_shape)).to(device, dtype).requires_grad_()
    return x, K, k, layout


def _out_spatial(x_shape, k, stride, padding, dilation):
    return tuple(conv_spec(x_shape, (x_shape[1], 1) + k, None, stride, padding, dilation, x_shape[1],
                           "zeros").out_shape[2:])


def check(cuda_plugin, x, K, k, layout, stride, padding, dilation, forward_name):
    """dynamic_conv3d on the plugin against the unfold reference and the CPU engine: the output and both gradients.
    Returns (output, gradients)."""
    tol = tolerance(x.dtype)
    cuda_plugin.calls.clear()
    out = vc.dynamic_conv3d(x, K, k, stride, padding, dilation)
    g = torch.randn_like(out)
    ours = torch.autograd.grad(out, [x, K], g)
    assert cuda_plugin.names() == [forward_name, GRAD_INPUT, GRAD_KERNELS], cuda_plugin.names()
    assert {c[1] for c in cuda_plugin.calls} == {1 if x.dtype == torch.float64 else 0}
    assert out.device == x.device and out.dtype == x.dtype
    ref = dynamic_reference(x, K, layout)
    close(out, ref, tol)
    for a, c in zip(ours, torch.autograd.grad(ref, [x, K], g)):
        close(a, c, tol, 10)
    cuda_plugin.calls.clear()
    with cuda_plugin.cpu_engine(), torch.no_grad():
        cpu = vc.dynamic_conv3d(x.detach().cpu(), K.detach().cpu(), k, stride, padding, dilation)
    assert cuda_plugin.calls == []   # the CPU engine, not the plugin
    close(out.cpu(), cpu, tol)
    return out, ours


# (x shape, groups or None, out_channels (full), kernel_size, stride, padding, dilation, forward kernel)
CASES = [
    ((2, 4, 3, 10, 37), 1, None, 3, 1, 1, 1, FUSED),                   # CB 4, two tiles along W, batch 2
    ((1, 6, 4, 9, 8), 2, None, (3, 2, 5), 1, "same", (1, 1, 2), FUSED),   # Cg 3: CB 2 + 1; "same", uneven in H
    ((1, 2, 5, 17, 6), 2, None, 2, 2, (1, 0, 1), (2, 1, 1), FUSED),    # Cg 1, two tiles along H, stride 2
    ((1, 2, 6, 7, 7), 2, None, 3, (3, 3, 1), "valid", 2, FUSED),       # stride 3 with dilation 2 ("valid")
    ((1, 5, 3, 4, 9), 5, None, 3, 1, 1, 1, FORWARD),                   # 5 groups: the general kernel
    ((1, 2, 3, 4, 12), 1, None, (1, 1, 7), (1, 1, 2), (0, 0, 3), 1, FORWARD),   # kw 7: general
    ((2, 3, 4, 5, 6), None, 2, 3, 1, 1, 1, FORWARD),                   # full layout
    ((1, 2, 6, 7, 8), None, 3, (2, 3, 1), (2, 3, 1), (1, 2, 0), (2, 1, 1), FORWARD),   # full, strides, dilation
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[7][11:]}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_against_unfold_and_the_cpu(case, dtype, cuda_plugin, device):
    x_shape, groups, outs, k, stride, padding, dilation, name = case
    r = config_rng(1701, CASES.index(case), int(dtype == torch.float64))
    x, K, k, layout = operands(r, device, dtype, x_shape, k, stride, padding, dilation, groups, outs)
    check(cuda_plugin, x, K, k, layout, stride, padding, dilation, name)


def test_fused_and_general_forward_agree(cuda_plugin, device):
    """The grouped layout on both forward kernels: the same values (the fused one on every tile of a plane with
    rows and columns left over)."""
    r = config_rng(1702)
    x, K, k, layout = operands(r, device, torch.float64, (1, 8, 3, 11, 40), 3, 1, 1, 1, groups=2)
    cuda_plugin.calls.clear()
    fused = cuda_dynamic.forward(x.detach(), K.detach(), layout)
    general = cuda_dynamic.forward(x.detach(), K.detach(), layout, fused=False)
    assert cuda_plugin.names() == [FUSED, FORWARD]
    close(fused, general, 1e-12)
    close(fused, dynamic_reference(x.detach(), K.detach(), layout), 1e-10)


def test_fused_channels_choice():
    """What the fused forward takes: grouped, k <= 5, G <= 4, a tile of one channel within 48 KiB."""
    def cb(x_shape, lead, k, dtype_size=4, stride=1, dilation=1):
        T = k[0] * k[1] * k[2]
        spatial = _out_spatial(x_shape, k, stride, 0, dilation)
        layout = Layout(x_shape, (x_shape[0],) + lead + (T,) + spatial, k, stride, 0, dilation)
        return cuda_dynamic.fused_channels(layout, dtype_size)

    assert cb((1, 16, 9, 9, 40), (4,), (5, 5, 5)) == 4
    assert cb((1, 16, 9, 9, 40), (4,), (5, 5, 5), 8) == 2        # float64: 2 channels' tiles in 48 KiB
    assert cb((1, 2, 9, 9, 40), (2,), (3, 3, 3)) == 1            # one channel per group
    assert cb((1, 10, 9, 9, 40), (5,), (3, 3, 3)) == 0           # more than 4 groups
    assert cb((1, 4, 9, 9, 40), (1,), (3, 3, 7)) == 0            # a kernel extent above 5
    assert cb((1, 2, 9, 9, 40), (2, 2), (3, 3, 3)) == 0          # the full layout
    assert cb((1, 2, 20, 99, 199), (2,), (5, 5, 5), 8, 3, 3) == 0   # the tile does not fit


def test_gradcheck_both_layouts(cuda_plugin, device):
    """torch.autograd.gradcheck in float64 on tiny fields, stride 2 and dilation (the gather's classes)."""
    r = config_rng(1703)
    for groups, outs, name in ((2, None, FUSED), (None, 2, FORWARD)):
        x, K, k, layout = operands(r, device, torch.float64, (1, 2, 4, 4, 5), 2, (2, 1, 2), 1, (1, 2, 1), groups,
                                   outs)
        cuda_plugin.calls.clear()
        assert torch.autograd.gradcheck(lambda a, b: vc.dynamic_conv3d(a, b, k, (2, 1, 2), 1, (1, 2, 1)), (x, K))
        assert set(cuda_plugin.names()) == {name, GRAD_INPUT, GRAD_KERNELS}


@pytest.mark.parametrize("order", ["reverse", "random"])
def test_bitwise_determinism_across_thread_orders(order, cuda_plugin, device, monkeypatch):
    """The forward (both kernels) and both gradients: the same bits whatever order the emulator runs the threads
    and blocks in (the emulator reads CUDA_EMU_ORDER at each launch; on a GPU: run to run)."""
    r = config_rng(1704)
    x, K, k, layout = operands(r, device, torch.float32, (1, 6, 4, 6, 9), 3, (1, 2, 1), 1, (2, 1, 1), groups=2)
    xf, Kf, kf, lf = operands(r, device, torch.float32, (1, 2, 4, 6, 9), 3, 2, 1, 1, out_channels=2)

    def run():
        out = vc.dynamic_conv3d(x, K, k, (1, 2, 1), 1, (2, 1, 1))
        full = vc.dynamic_conv3d(xf, Kf, kf, 2, 1, 1)
        return [out, full, *torch.autograd.grad((out.sin().sum() + full.cos().sum()), [x, K, xf, Kf])]

    cuda_plugin.calls.clear()
    first = run()
    assert {FUSED, FORWARD, GRAD_INPUT, GRAD_KERNELS} <= set(cuda_plugin.names())
    monkeypatch.setenv("CUDA_EMU_ORDER", order)
    for a, b in zip(first, run()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("tile", [None, 2], ids=["whole", "tiled"])
def test_the_layer_trains_on_the_plugin(tile, cuda_plugin, device):
    """vc.nn.DynamicConv3d, grouped (default kernel network, dilation 2) and full: a training step (loss,
    parameter and input gradients, an SGD step by hand) as the same layer's on the CPU engine; tile=2 runs the
    tiled Function, whose backward recomputes each tile's field and calls the plugin's gradients."""
    torch.manual_seed(7)
    for layer, x_shape in ((vc.nn.DynamicConv3d(4, 3, groups=2, tile=tile, dilation=(2, 1, 1), device=device,
                                                dtype=torch.float64), (2, 4, 5, 6, 7)),
                           (vc.nn.DynamicConv3d.full(2, 3, 3, tile=tile, device=device, dtype=torch.float64),
                            (1, 2, 5, 4, 6))):
        x = torch.randn(*x_shape, device=device, dtype=torch.float64, requires_grad=True)
        cuda_plugin.calls.clear()
        loss = layer(x).square().mean()
        grads = torch.autograd.grad(loss, [x] + list(layer.parameters()))
        names = cuda_plugin.names()
        assert (FUSED in names or FORWARD in names) and GRAD_INPUT in names and GRAD_KERNELS in names, names
        with cuda_plugin.cpu_engine():
            cpu_loss = layer(x).square().mean()
            cpu_grads = torch.autograd.grad(cpu_loss, [x] + list(layer.parameters()))
        close(loss, cpu_loss, 1e-10)
        for a, c in zip(grads, cpu_grads):
            close(a, c, 1e-10, 10)
        with torch.no_grad():   # the SGD step, by hand (torch.optim crashes under ASan)
            for p, gp in zip(layer.parameters(), grads[1:]):
                p -= 0.1 * gp
        assert torch.isfinite(layer(x).detach()).all()


def test_half_inputs_without_gradients_and_an_empty_batch(cuda_plugin, device):
    """float16 computes in float32 on the plugin (no gradient wanted: the front door still takes the plugin's path)
    and comes back in float16; an empty batch gives an empty result and launches nothing that fails."""
    r = config_rng(1706)
    x, K, k, layout = operands(r, device, torch.float32, (1, 4, 3, 5, 6), 3, 1, 1, 1, groups=2)
    cuda_plugin.calls.clear()
    out = vc.dynamic_conv3d(x.detach().half(), K.detach().half(), k, 1, 1, 1)
    assert out.dtype == torch.float16 and cuda_plugin.calls == [(FUSED, 0)]
    close(out.float(), dynamic_reference(x.detach().half().float(), K.detach().half().float(), layout), 1e-2)
    e = vc.dynamic_conv3d(x[:0], K[:0], k, 1, 1, 1)
    assert e.shape == (0, 4, 3, 5, 6)
    gx, gK = torch.autograd.grad(e.sum(), [x, K])
    assert not gx.any() and not gK.any()


def test_the_kernels_refuse_what_they_cannot_take(cuda_plugin, device):
    """A field whose slices do not match the channels, and a fused tile beyond 48 KiB: errors, not wrong values."""
    from volconv import _cuda
    from volconv._torch import cuda

    x, K = torch.zeros(1, 3, 2, 2, 2, device=device), torch.zeros(1, 2, 1, 2, 2, 2, device=device)
    geometry = (1, 3, 2, 2, 2, 3, 3, 1, 1, 1, 2, 2, 2, 1, 1, 1, 0, 0, 0, 1, 1, 1)
    for name, extra in ((FORWARD, (2, 0)), (GRAD_INPUT, (2, 0)), (FUSED, (3, 0, 8)), (FUSED, (3, 1, 1))):
        with pytest.raises(RuntimeError):
            cuda.launch("dynamic_conv3d", name, _cuda.params(*geometry, *extra), (1, 3, 2, 2, 2), x, K)
    big = (1, 1, 2, 2, 2, 1, 1, 5, 5, 5, 2, 2, 2, 1, 1, 1, 0, 0, 0, 9, 9, 9)   # dilation 9: a 37 x 95 x 68 tile
    with pytest.raises(RuntimeError):
        cuda.launch("dynamic_conv3d", FUSED, _cuda.params(*big, 1, 0, 1), (1, 1, 2, 2, 2), x[:, :1], K)


def exercise_every_kernel(cuda_plugin, device):
    """Every kernel of dynamic.cu (both forwards, both gradients) on small float64 operands against the unfold
    reference: an AssertionError when any computes nothing (test_cuda.py's emptied-kernel test, EXERCISES)."""
    r = config_rng(1705)
    x, K, k, layout = operands(r, device, torch.float64, (1, 2, 3, 4, 5), 3, (1, 2, 1), 1, 1, groups=1)
    check(cuda_plugin, x, K, k, layout, (1, 2, 1), 1, 1, FUSED)
    x, K, k, layout = operands(r, device, torch.float64, (1, 2, 3, 4, 5), 3, 1, 1, 1, out_channels=2)
    check(cuda_plugin, x, K, k, layout, 1, 1, 1, FORWARD)


def test_every_kernel_once(cuda_plugin, device):
    exercise_every_kernel(cuda_plugin, device)
