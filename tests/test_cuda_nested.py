"""vc.nested_conv3d, vc.multiscale_conv3d and their layers on the CUDA plugin (a GPU, or the CPU emulator with
VOLCONV_CUDA_EMULATOR=1), against torch's chained / parallel conv3d (float64) and volconv's CPU path, forward
and gradients. Every test checks which plugin functions ran (cuda_plugin.calls): the fused depthwise kernels
(nested.cu) where they apply, the conv3d kernels for channel-mixing chains and for every backward.

Shapes are small, but the tiles are shrunk to 4 x 8 (the `small_tiles` fixture) and the chunks along D to 3
planes, so that every case spans interior and boundary tiles and several chunks (each recomputing the halo);
one case runs the default tiles.

Tolerances: float64 within 1e-10 of the reference's largest magnitude; float32 within 1e-4 per stage (sums of a
few hundred float32 products in another order than torch's); gradients 10x those."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import volconv as vc
from volconv import _cuda
from volconv._torch import cuda_nested
from volconv.engine.nested import stage_specs

import test_cuda
from conftest import config_rng

pytestmark = pytest.mark.cuda

CHAIN, BRANCHES = "vc_nested_depthwise_forward", "vc_multiscale_depthwise_forward"
CONV = {"vc_conv3d_forward", "vc_conv3d_grad_weight", "vc_conv3d_grad_input"}
ACT = {None: lambda y: y, "relu": F.relu, "gelu": F.gelu, "silu": F.silu}


def use_small_tiles(monkeypatch):
    monkeypatch.setattr(cuda_nested, "TILES", ((4, 8),) + cuda_nested.TILES)
    monkeypatch.setattr(cuda_nested, "MIN_CHUNK", 3)
    monkeypatch.setattr(cuda_nested, "MAX_RECOMPUTE", float("inf"))   # (small tiles recompute a wide halo)


@pytest.fixture
def small_tiles(monkeypatch):
    use_small_tiles(monkeypatch)


def chain_reference(x, weights, biases, activation, groups):
    y = x
    for i, (w, b) in enumerate(zip(weights, biases)):
        y = F.conv3d(y, w, b, padding="same", groups=groups)
        if i + 1 < len(weights):
            y = ACT[activation](y)
    return y


def branches_reference(x, weights, dilations, groups, combine, biases):
    ys = [F.conv3d(x, w, b, padding="same", dilation=d, groups=groups) for w, d, b in zip(weights, dilations, biases)]
    return sum(ys) if combine == "sum" else torch.cat(ys, 1)


def close(a, ref, dtype, factor=1.0):
    test_cuda.close(a, ref, test_cuda.tolerance(dtype), factor)


def leaves(r, device, dtype, shapes):
    return [None if s is None else torch.from_numpy(r.standard_normal(s)).to(device, dtype).requires_grad_()
            for s in shapes]


def check_chain(cuda_plugin, x, ws, bs, activation, groups, fused, algorithm="auto"):
    """Forward and every gradient against torch's chain and the CPU path; the plugin's calls: the fused kernel
    (or conv3d forwards, one per stage) then only conv3d kernels for the backward."""
    dtype, L = x.dtype, len(ws)
    params = [t for t in [x] + ws + bs if t is not None]
    cuda_plugin.calls.clear()
    out = vc.nested_conv3d(x, ws, bs, activation, groups, algorithm=algorithm)
    names = cuda_plugin.names()
    assert names == ([CHAIN] if fused else ["vc_conv3d_forward"] * L), names
    assert {c[1] for c in cuda_plugin.calls} == {int(dtype == torch.float64)}
    g = torch.randn_like(out)
    cuda_plugin.calls.clear()
    ours = torch.autograd.grad(out, params, g)
    assert set(cuda_plugin.names()) == CONV - ({"vc_conv3d_grad_input"}), cuda_plugin.names()
    ref = chain_reference(*(t.double() if t is not None else None for t in (x,)), [w.double() for w in ws],
                          [None if b is None else b.double() for b in bs], activation, groups)
    close(out.detach(), ref.detach(), dtype, L)
    for a, c in zip(ours, torch.autograd.grad(ref, params, g.double())):
        close(a, c, dtype, 10 * L)
    with cuda_plugin.cpu_engine():
        cpu = vc.nested_conv3d(x.detach(), [w.detach() for w in ws], [None if b is None else b.detach() for b in bs],
                               activation, groups)
    close(out.detach(), cpu, dtype, L)
    return out


def depthwise_chain(r, device, dtype, C, kernels, bias=True):
    ws = leaves(r, device, dtype, [(C, 1) + k for k in kernels])
    bs = leaves(r, device, dtype, [(C,) if bias and i != 1 else None for i in range(len(kernels))])
    return ws, bs


# ---- nested chains -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", range(8))
def test_depthwise_chains_fused_against_torch_and_the_cpu(case, small_tiles, cuda_plugin, device):
    """2 and 3 stages, odd and even kernel sizes per axis, every activation, with and without biases (the second
    stage never has one), float32 and float64, batch 2: 2 x 2 tiles (boundary ones partial) x 3 chunks."""
    r = config_rng(1601, case)
    dtype = (torch.float32, torch.float64)[case % 2]
    activation = (None, "relu", "gelu", "silu")[case // 2]
    kernels = [((5, 3, 5), (3, 3, 3)), ((3, 5, 3), (1, 3, 3), (3, 1, 2)), ((3, 3, 3), (3, 3, 3)),
               ((4, 3, 5), (3, 2, 1), (1, 1, 3))][case // 2]
    x = leaves(r, device, dtype, [(2, 3, 8, 7, 13)])[0]
    ws, bs = depthwise_chain(r, device, dtype, 3, kernels, bias=case % 3 != 0)
    check_chain(cuda_plugin, x, ws, bs, activation, 3, fused=True)


def test_channel_mixing_chains_stage_by_stage(small_tiles, cuda_plugin, device):
    """groups 1 and 2 with changing channels: each stage on the conv3d kernels, the activation by torch."""
    r = config_rng(1602)
    for groups, chans, dtype in ((1, (2, 3, 1), torch.float64), (2, (2, 4, 2, 2), torch.float32)):
        x = leaves(r, device, dtype, [(2, chans[0], 5, 6, 7)])[0]
        ks = [(3, 3, 3), (1, 3, 1), (3, 1, 3)]
        ws = leaves(r, device, dtype, [(o, i // groups) + k for i, o, k in zip(chans, chans[1:], ks)])
        bs = leaves(r, device, dtype, [(o,) if j != 1 else None for j, o in enumerate(chans[1:])])
        check_chain(cuda_plugin, x, ws, bs, "gelu", groups, fused=False)


def test_default_tiles_and_a_chain_too_large_to_fuse(cuda_plugin, device):
    """The default 16 x 32 tile over a 18 x 35 plane (2 x 2 tiles), with a halo so wide that a block's threads
    take two rounds of stage 0's strips; a 15^3 float64 chain, whose rings exceed 48
    KiB in every tile, and algorithm='stages' run stage by stage (as a float32 15^3 -> 3^3 chain would: its tile
    would recompute stage 0 2.25 times); 'composed' as one conv3d."""
    r = config_rng(1603)
    x = leaves(r, device, torch.float32, [(1, 2, 3, 18, 35)])[0]
    ws, bs = depthwise_chain(r, device, torch.float32, 2, [(3, 5, 3), (3, 3, 3)])
    assert cuda_nested.TILES[0] == (16, 32)
    check_chain(cuda_plugin, x, ws, bs, "relu", 2, fused=True)
    check_chain(cuda_plugin, x, ws, bs, "relu", 2, fused=False, algorithm="stages")
    ws, bs = depthwise_chain(r, device, torch.float32, 2, [(1, 11, 11), (1, 11, 11)])   # 26 x 11 strips: 2 rounds
    with pytest.MonkeyPatch.context() as m:
        m.setattr(cuda_nested, "MAX_RECOMPUTE", 2.5)   # (2.23: stage by stage otherwise)
        check_chain(cuda_plugin, x, ws, bs, None, 2, fused=True)
    x = leaves(r, device, torch.float64, [(1, 1, 4, 5, 6)])[0]
    ws, bs = depthwise_chain(r, device, torch.float64, 1, [(15, 15, 15), (3, 3, 3)])
    check_chain(cuda_plugin, x, ws, bs, "silu", 1, fused=False)
    for k, fused in ((13, True), (15, False)):   # float32 15^3 -> 3^3 fits 4 x 8 tiles only, recomputing 2.25x
        specs = stage_specs((1, 4, 64, 64, 64), [np.empty((4, 1, k, k, k)), np.empty((4, 1, 3, 3, 3))], 4)
        assert (cuda_nested.fused_chain_plan(torch.empty(1, 4, 64, 64, 64), specs) is not None) == fused
    with torch.no_grad():
        cuda_plugin.calls.clear()
        out = vc.nested_conv3d(x, ws, bs, None, 1, algorithm="composed")
        assert cuda_plugin.names() == ["vc_conv3d_forward"]
        w, b = vc.nested.compose([w.numpy() for w in ws], [None if b is None else b.numpy() for b in bs])
        ref = F.conv3d(x, torch.from_numpy(w), torch.from_numpy(b), padding="same")
    close(out, ref, torch.float64)


def test_gradcheck_and_bitwise_determinism(small_tiles, cuda_plugin, device, monkeypatch):
    """gradcheck in float64 of a tiny 2-stage depthwise chain (silu: smooth); float32 results and gradients
    bit-identical when run again, on the emulator in every thread and block order."""
    r = config_rng(1604)
    x = leaves(r, device, torch.float64, [(1, 1, 3, 2, 9)])[0]
    ws, bs = depthwise_chain(r, device, torch.float64, 1, [(3, 3, 3), (3, 1, 3)])
    assert torch.autograd.gradcheck(lambda x, w0, w1, b0: vc.nested_conv3d(x, [w0, w1], [b0, None], "silu", 1),
                                    (x, ws[0], ws[1], bs[0]))
    assert CHAIN in cuda_plugin.names() and set(cuda_plugin.names()) <= CONV | {CHAIN}
    params = [t.detach().float().requires_grad_() for t in (x, ws[0], ws[1], bs[0])]
    results = []
    for order in ("forward", "reverse", "random") if cuda_plugin.emulated else (None, None):
        if order:
            monkeypatch.setenv("CUDA_EMU_ORDER", order)
        out = vc.nested_conv3d(params[0], params[1:3], [params[3], None], "gelu", 1)
        results.append((out,) + torch.autograd.grad(out, params, torch.ones_like(out)))
    assert all(torch.equal(a, b) for res in results[1:] for a, b in zip(results[0], res))


def test_double_backward_through_the_chain_and_the_branches(small_tiles, cuda_plugin, device):
    """create_graph=True: the gradients by torch's differentiable references, differentiable again (gradient
    penalties), as torch's own chain and branches give them."""
    r = config_rng(1608)
    x = leaves(r, device, torch.float64, [(1, 2, 3, 4, 9)])[0]
    ws, bs = depthwise_chain(r, device, torch.float64, 2, [(3, 3, 3), (1, 3, 3)])
    for ours, ref in ((lambda x, w: vc.nested_conv3d(x, [w, ws[1]], bs, "gelu", 2),
                       lambda x, w: chain_reference(x, [w, ws[1]], bs, "gelu", 2)),
                      (lambda x, w: vc.multiscale_conv3d(x, [w, ws[1]], [1, 2], 2, "sum"),
                       lambda x, w: branches_reference(x, [w, ws[1]], [1, 2], 2, "sum", [None, None]))):
        second = []
        for f in (ours, ref):
            (gx,) = torch.autograd.grad(f(x, ws[0]).square().sum(), (x,), create_graph=True)
            second.append(torch.autograd.grad(gx.square().sum(), (ws[0],))[0])
        close(*second, torch.float64, 10)
    assert {CHAIN, BRANCHES} <= set(cuda_plugin.names())


def training_step_as_on_the_cpu(cuda_plugin, layer, x):
    """A training step's loss and parameter gradients on the plugin, checked against the same layer's on the CPU
    engine; returns the plugin functions the forward ran."""
    cuda_plugin.calls.clear()
    loss = layer(x).square().mean()
    forward = cuda_plugin.names()
    grads = torch.autograd.grad(loss, list(layer.parameters()))
    with cuda_plugin.cpu_engine():
        cpu_loss = layer(x).square().mean()
        cpu_grads = torch.autograd.grad(cpu_loss, list(layer.parameters()))
    close(loss.detach(), cpu_loss.detach(), torch.float64)
    for a, c in zip(grads, cpu_grads):
        close(a, c, torch.float64, 10)
    return forward


def test_nested_layer_trains_on_the_plugin(small_tiles, cuda_plugin, device):
    """vc.nn.NestedConv3d, depthwise (7^3 then 3^3) and channel-mixing: a training step's loss and parameter
    gradients as the same layer's on the CPU engine; the depthwise forward by the fused kernel."""
    torch.manual_seed(3)
    for kw, fused in ((dict(channels=2, kernel_sizes=(7, 3), groups=2), True),
                      (dict(channels=(3, 2), kernel_sizes=(3, 1), groups=1), False)):
        layer = vc.nn.NestedConv3d(2, device=device, dtype=torch.float64, **kw)
        x = torch.randn(2, 2, 5, 6, 9, device=device, dtype=torch.float64)
        assert (training_step_as_on_the_cpu(cuda_plugin, layer, x)[0] == CHAIN) == fused


# ---- multi-scale branches ------------------------------------------------------------------------------------

@pytest.mark.parametrize("combine", ["concat", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_depthwise_branches_fused_against_torch_and_the_cpu(combine, dtype, small_tiles, cuda_plugin, device,
                                                            monkeypatch):
    """Three branches (3^3, 5 x 3 x 1 dilated (1, 2, 3), 1^3) on one input read, groups == channels, 2 output
    channels per input channel (1 for the concatenated middle branch), a bias missing: forward by the fused
    kernel, gradients on the conv3d kernels, against torch's parallel conv3d and the CPU path. Two chunks of 6
    planes: longer than the ring (5 planes), so the smaller branch's window wraps around it."""
    monkeypatch.setattr(cuda_nested, "MIN_CHUNK", 6)
    r = config_rng(1605, int(combine == "sum"), int(dtype == torch.float64))
    C = 3
    x = leaves(r, device, dtype, [(2, C, 11, 6, 11)])[0]
    mult = (2, 2, 2) if combine == "sum" else (2, 1, 2)
    ws = leaves(r, device, dtype, [(m * C, 1) + k for m, k in zip(mult, ((3, 3, 3), (5, 3, 1), (1, 1, 1)))])
    bs = leaves(r, device, dtype, [(m * C,) if i != 1 else None for i, m in enumerate(mult)])
    dil = [1, (1, 2, 3), 2]
    cuda_plugin.calls.clear()
    out = vc.multiscale_conv3d(x, ws, dil, C, combine, bs)
    assert cuda_plugin.names() == [BRANCHES]
    g = torch.randn_like(out)
    params = [x] + ws + [b for b in bs if b is not None]
    ours = torch.autograd.grad(out, params, g)
    assert set(cuda_plugin.names()[1:]) == CONV - {"vc_conv3d_grad_input"}
    dils = [(1, 1, 1), (1, 2, 3), (2, 2, 2)]
    ref = branches_reference(x.double(), [w.double() for w in ws], dils, C, combine,
                             [None if b is None else b.double() for b in bs])
    close(out.detach(), ref.detach(), dtype)
    for a, c in zip(ours, torch.autograd.grad(ref, params, g.double())):
        close(a, c, dtype, 10)
    with cuda_plugin.cpu_engine():
        cpu = vc.multiscale_conv3d(x.detach(), [w.detach() for w in ws], dil, C, combine,
                                   [None if b is None else b.detach() for b in bs])
    close(out.detach(), cpu, dtype)


def test_branches_gradcheck_and_the_other_paths(small_tiles, cuda_plugin, device):
    """gradcheck (float64) through the fused branches; channel-mixing branches and algorithm='merged' take the
    conv3d kernels."""
    r = config_rng(1606)
    x = leaves(r, device, torch.float64, [(1, 1, 3, 2, 9)])[0]
    ws = leaves(r, device, torch.float64, [(1, 1, 3, 1, 3), (2, 1, 1, 3, 3)])
    b = leaves(r, device, torch.float64, [(2,)])[0]
    assert torch.autograd.gradcheck(lambda x, w0, w1, b: vc.multiscale_conv3d(x, [w0, w1], [1, 2], 1, "concat",
                                                                                [None, b]), (x, *ws, b))
    assert BRANCHES in cuda_plugin.names()
    x = leaves(r, device, torch.float64, [(1, 2, 3, 5, 9)])[0]
    ws = leaves(r, device, torch.float64, [(2, 1, 3, 1, 3), (4, 1, 1, 3, 3)])
    for weights, groups, algorithm in (([ws[0].reshape(1, 2, 3, 1, 3)], 1, "auto"), (ws, 2, "merged")):
        cuda_plugin.calls.clear()
        with torch.no_grad():
            out = vc.multiscale_conv3d(x, weights, None, groups, "concat", algorithm=algorithm)
        names = cuda_plugin.names()   # the merged kernel through vc.conv3d: the generic or the depthwise kernel
        assert BRANCHES not in names and {"vc_conv3d_forward", "vc_depthwise_forward"} & set(names), names
        close(out, branches_reference(x, weights, [1] * len(weights), groups, "concat", [None] * len(weights)),
              torch.float64)


def test_multiscale_layer_trains_on_the_plugin(small_tiles, cuda_plugin, device):
    torch.manual_seed(5)
    layer = vc.nn.MultiScaleConv3d(2, 4, kernel_sizes=(1, 3, 5), dilations=(1, 2, 1), combine="sum", groups=2,
                                   device=device, dtype=torch.float64)
    x = torch.randn(2, 2, 5, 6, 9, device=device, dtype=torch.float64)
    assert training_step_as_on_the_cpu(cuda_plugin, layer, x)[0] == BRANCHES


def test_the_kernels_refuse_what_they_cannot_take(cuda_plugin, device):
    x = torch.zeros(1, 1, 2, 2, 2, device=device)
    w, b = torch.zeros(27, device=device), torch.zeros(5, device=device)
    from volconv._torch import cuda

    for name, params in ((CHAIN, (1, 1, 2, 2, 2, 5, 0, 4, 8, 2) + (3,) * 15),       # 5 stages
                         (CHAIN, (1, 1, 2, 2, 2, 1, 0, 64, 64, 2, 3, 3, 3)),        # rings beyond 48 KiB
                         (BRANCHES, (1, 1, 2, 2, 2, 2, 1, 4, 8, 2, 1, 3, 3, 3, 1, 1, 1, 2, 1, 1, 1, 1, 1, 1))):
        with pytest.raises(RuntimeError, match="out of the range"):
            cuda.launch("nested", name, _cuda.params(*params), (1, 1, 2, 2, 2), x, w, b)


# ---- every kernel of nested.cu is exercised -----------------------------------------------------------------

def exercise_every_kernel(cuda_plugin, device):
    """Both kernels of nested.cu, checked on small tiles (so the fused paths run): an AssertionError when either
    computes nothing (test_cuda.py's emptied-kernel test, EXERCISES)."""
    r = config_rng(1607)
    x = torch.from_numpy(r.standard_normal((1, 2, 4, 5, 9))).to(device)
    ws = [torch.from_numpy(r.standard_normal(s)).to(device) for s in ((2, 1, 3, 3, 3), (2, 1, 3, 1, 3))]
    with pytest.MonkeyPatch.context() as m:
        use_small_tiles(m)
        cuda_plugin.calls.clear()
        close(vc.nested_conv3d(x, ws, None, "relu", 2), chain_reference(x, ws, [None, None], "relu", 2),
              torch.float64)
        close(vc.multiscale_conv3d(x, ws, None, 2, "sum"), branches_reference(x, ws, [1, 1], 2, "sum", [None, None]),
              torch.float64)
        assert cuda_plugin.names() == [CHAIN, BRANCHES], cuda_plugin.names()


def test_every_kernel_once(cuda_plugin, device):
    exercise_every_kernel(cuda_plugin, device)
