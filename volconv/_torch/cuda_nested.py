"""Nested chains and multi-scale branches on the CUDA plugin (tensors on the GPU): the fused depthwise kernels of
nested.cu where they apply, every other chain stage by stage through the conv3d kernels, and the backward of
both recomputing what the forward did not store, per stage or branch on the conv3d kernels (deterministic:
fixed-order reductions, the branches' input gradients summed in branch order).

What runs where:
- a chain whose every stage is depthwise (groups == channels == output channels, at most 4 stages) whose rings
  fit 48 KiB of shared memory in a tile large enough that stage 0 recomputes at most MAX_RECOMPUTE times its
  outputs (the later stages' halo around the tile; float32: up to 13^3 -> 3^3, 7^3 -> 3^3 in 16 x 32 tiles at
  1.27; float64: 7^3 -> 3^3 in 8 x 16 tiles at 1.56): the fused kernel, one input read, no full-size
  intermediate; any other chain (channel mixing, larger kernels, algorithm="stages"): stage by stage, each on
  vc_conv3d_forward with the activation by torch in between (intermediates stored);
- branches reading one input channel each (groups == channels, at most 8 branches) that fit: the fused kernel,
  one input read for every branch; others: the caller's conv3d path (merged kernel or branch by branch)."""
import math

import numpy as np
import torch

from .. import _cuda
from .._validate import ConvSpec
from ..engine.nested import ACTIVATION_CODES, compose, same_pads
from . import cuda
from .cuda_dense import grad_input
from .reference import ACTIVATION_FUNCTIONS, reference_conv, twice_differentiable

TILES = ((16, 32), (8, 32), (8, 16), (4, 16), (4, 8))   # output rows x columns per block, largest that fits
SHARED_BYTES = 48 * 1024
TARGET_BLOCKS = 2048      # split D into chunks until the grid has about this many blocks (an H200 has 132 SMs)
MIN_CHUNK = 8             # ... but no chunk under 8 planes (each chunk recomputes the chain's halo along D)
MAX_STAGES, MAX_BRANCHES = 4, 8
MAX_RECOMPUTE = 2.0       # a fused chain's stage-0 outputs per final output, at most (a guess until timed on a GPU)
STRIP = 4                 # nested.cu's outputs per thread along W


def _rings_fit(extents, reads, itemsize, TH, TW, weights):
    """Shared memory of a block (as nested.cu sizes it): `weights` values, then one ring per level (reads[l]
    planes of the tile widened by the extents of the levels above, extents[l] = (kh, kw) of what reads it; the
    levels computed in strips, all but the input, as wide as a multiple of the strip)."""
    total, rh, rw = weights, TH, TW
    for level, ((kh, kw), planes) in reversed(list(enumerate(zip(extents, reads)))):
        rh, rw = rh + kh - 1, rw + kw - 1
        rw = -(-rw // STRIP) * STRIP if level > 0 else rw
        total += planes * rh * rw
    return total * itemsize <= SHARED_BYTES


def _plan(x_shape, extents, reads, itemsize, weights):
    """(TH, TW, CD) for a fused launch, or None when no tile fits."""
    N, C, D, H, W = x_shape
    for TH, TW in TILES:
        if _rings_fit(extents, reads, itemsize, TH, TW, weights):
            blocks = max(1, N * C * math.ceil(H / TH) * math.ceil(W / TW))
            chunks = max(1, min(math.ceil(D / MIN_CHUNK), math.ceil(TARGET_BLOCKS / blocks)))
            return TH, TW, math.ceil(D / chunks)
    return None


# ------------------------------------------------------------------------------ nested chains

def depthwise_chain(specs):
    return len(specs) <= MAX_STAGES and all(s.groups == s.x_shape[1] == s.w_shape[0] for s in specs)


def fused_chain_plan(x, specs):
    """(TH, TW, CD) when the fused chain kernel takes this chain on x, else None."""
    if not depthwise_chain(specs):
        return None
    ks = [s.w_shape[2:] for s in specs]
    plan = _plan(tuple(x.shape), [k[1:] for k in ks], [k[0] for k in ks], x.element_size(),
                 sum(int(np.prod(k)) for k in ks) + len(ks))
    if plan is None or len(ks) == 1:
        return plan
    TH, TW = plan[:2]   # stage 0 computes its output on the tile widened by the later stages' halo (strips of W)
    rows, cols = TH, TW
    for k in reversed(ks[1:]):
        rows, cols = rows + k[1] - 1, -(-(cols + k[2] - 1) // STRIP) * STRIP
    return plan if rows * cols <= MAX_RECOMPUTE * TH * TW else None


def _flat_biases(biases, specs, like):
    return torch.cat([like.new_zeros(s.w_shape[0]) if b is None or b.numel() == 0 else b.reshape(-1)
                      for b, s in zip(biases, specs)]).contiguous()


def nested_forward(x, weights, biases, activation, specs, algorithm):
    """The chain on the plugin (x, weights, biases: contiguous tensors of one dtype on one device; a bias None or
    empty for none); see the module's doc for which kernels run."""
    if algorithm == "composed":   # the single equivalent kernel (a linear chain; differs near the border)
        w, b = compose([w.detach().cpu().numpy() for w in weights],
                       [None if b is None or b.numel() == 0 else b.detach().cpu().numpy() for b in biases],
                       specs[0].groups)
        pads = tuple((sum(s.pads[a][0] for s in specs), sum(s.pads[a][1] for s in specs)) for a in range(3))
        spec = ConvSpec(tuple(x.shape), w.shape, stride=(1, 1, 1), pads=pads, dilation=(1, 1, 1),
                        groups=specs[0].groups, mode="constant")
        return cuda.conv3d_forward(x, torch.from_numpy(w).to(x), None if b is None else torch.from_numpy(b).to(x),
                                   spec)
    plan = fused_chain_plan(x, specs) if algorithm != "stages" else None
    if plan is None:
        y = x
        for i, (w, b, spec) in enumerate(zip(weights, biases, specs)):
            y = cuda.conv3d_forward(y, w, None if b is None or b.numel() == 0 else b, spec)
            if activation and i + 1 < len(specs):
                y = ACTIVATION_FUNCTIONS[activation](y)
        return y
    params = _cuda.params(*x.shape, len(specs), ACTIVATION_CODES[activation or None], *plan,
                          *(k for s in specs for k in s.w_shape[2:]))
    w = torch.cat([w.reshape(-1) for w in weights]).contiguous()
    return cuda.launch("nested_conv3d", "vc_nested_depthwise_forward", params, tuple(x.shape), x, w,
                       _flat_biases(biases, specs, x))


def _activation_vjp(pre, activation, g):
    """g times d act / d pre (torch's own derivative of the activation)."""
    with torch.enable_grad():
        p = pre.detach().requires_grad_()
        return torch.autograd.grad(ACTIVATION_FUNCTIONS[activation](p), p, g)[0]


def nested_backward(x, weights, biases, activation, specs, grad, need_input):
    """(input gradient or None, weight gradients, bias gradients): the intermediates recomputed stage by stage
    (no activation stored by the forward), then every stage backward on the conv3d kernels."""
    L = len(specs)
    inputs, pres = [x], []
    for s in range(L - 1):
        pres.append(cuda.conv3d_forward(inputs[s], weights[s], None if biases[s].numel() == 0 else biases[s],
                                        specs[s]))
        inputs.append(ACTIVATION_FUNCTIONS[activation](pres[s]).contiguous() if activation else pres[s])
    gws, gbs, g, gx = [None] * L, [None] * L, grad.contiguous(), None
    for s in range(L - 1, -1, -1):
        gws[s] = cuda.conv3d_grad_weight(inputs[s], g, specs[s])
        gbs[s] = g.sum(dim=(0, 2, 3, 4))
        if s == 0 and not need_input:
            break
        gin = grad_input(g, weights[s], specs[s])
        if s == 0:
            gx = gin
        else:
            g = (_activation_vjp(pres[s - 1], activation, gin) if activation else gin).contiguous()
    return gx, gws, gbs


# ------------------------------------------------------------------------------ multi-scale branches

def _branch_specs(x_shape, weights, dilations, groups):
    return [ConvSpec(tuple(x_shape), tuple(w.shape), stride=(1, 1, 1),
                     pads=same_pads(tuple(d * (k - 1) + 1 for k, d in zip(w.shape[2:], dil))), dilation=dil,
                     groups=groups, mode="constant") for w, dil in zip(weights, dilations)]


def fused_branches_plan(x, weights, dilations, groups):
    """(TH, TW, CD) when the fused multi-scale kernel takes these branches on x, else None."""
    C = x.shape[1]
    if x.dim() != 5 or groups != C or len(weights) > MAX_BRANCHES or any(w.shape[1] != 1 for w in weights):
        return None
    E = [max(d[a] * (w.shape[2 + a] - 1) + 1 for w, d in zip(weights, dilations)) for a in range(3)]
    values = sum((int(np.prod(w.shape[2:])) + 1) * (w.shape[0] // C) for w in weights)   # taps and biases
    return _plan(tuple(x.shape), [E[1:]], [E[0]], x.element_size(), values)


def _branches_forward(x, weights, biases, dilations, combine, plan):
    C = x.shape[1]
    outs = [w.shape[0] for w in weights]
    params = _cuda.params(*x.shape, len(weights), int(combine == "sum"), *plan,
                          *(v for w, d in zip(weights, dilations) for v in (w.shape[0] // C, *w.shape[2:], *d)))
    w = torch.cat([w.reshape(-1) for w in weights]).contiguous()
    b = torch.cat([x.new_zeros(o) if b is None else b.reshape(-1) for o, b in zip(outs, biases)]).contiguous()
    O = outs[0] if combine == "sum" else sum(outs)
    return cuda.launch("multiscale_conv3d", "vc_multiscale_depthwise_forward", params,
                       (x.shape[0], O) + tuple(x.shape[2:]), x, w, b)


def _branches_reference(ctx):
    """The branches in torch operations (double backward)."""
    specs, B = ctx.specs, len(ctx.specs)

    def forward(config, x, *p):
        ys = [reference_conv(x, w, b if has else None, s)
              for w, b, has, s in zip(p[:B], p[B:], ctx.has_bias, specs)]
        return sum(ys) if ctx.combine == "sum" else torch.cat(ys, 1)
    return forward, (None,) + ctx.saved_tensors


class _Branches(torch.autograd.Function):
    @staticmethod
    def forward(ctx, config, x, *params):
        dilations, groups, combine, plan = config
        B = len(params) // 2
        weights, biases = params[:B], params[B:]
        ctx.specs = _branch_specs(x.shape, weights, dilations, groups)
        ctx.combine, ctx.has_bias = combine, [b.numel() > 0 for b in biases]
        ctx.save_for_backward(x, *weights, *biases)
        return _branches_forward(x, weights, [b if b.numel() else None for b in biases], dilations, combine, plan)

    @staticmethod
    @twice_differentiable(_branches_reference)
    def backward(ctx, grad):
        x, *params = ctx.saved_tensors
        B, grad = len(ctx.specs), grad.contiguous()
        gx, gws, gbs, row = None, [], [], 0
        for w, s, has in zip(params[:B], ctx.specs, ctx.has_bias):   # branch order: a fixed-order sum
            g = grad if ctx.combine == "sum" else grad[:, row:row + w.shape[0]].contiguous()
            row += w.shape[0]
            gws.append(cuda.conv3d_grad_weight(x, g, s))
            gbs.append(g.sum(dim=(0, 2, 3, 4)) if has else None)
            if ctx.needs_input_grad[1]:
                gi = grad_input(g, w, s)
                gx = gi if gx is None else gx + gi
        return (None, gx, *gws, *gbs)


def multiscale_conv3d(x, weights, biases, dilations, groups, combine, plan):
    """The branches by the fused kernel (plan from fused_branches_plan), differentiable: x, weights, biases
    tensors of x's compute dtype on its device (a bias None for none)."""
    bs = [x.new_empty(0) if b is None else b for b in biases]
    return _Branches.apply((dilations, groups, combine, plan), x, *weights, *bs)
