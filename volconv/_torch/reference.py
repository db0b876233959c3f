"""Every op written in torch's differentiable operations, for double backward (create_graph=True: gradient
penalties, Hessian-vector products). volconv's backward kernels are numpy code, differentiable once; with
create_graph=True each op takes its gradients from its reference here instead (the same numbers to rounding, at
torch's speed), and the ordinary backward keeps volconv's kernels."""
import functools
import types

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from .._validate import pad_index

ACTIVATION_FUNCTIONS = {"relu": torch.relu, "gelu": torch.nn.functional.gelu, "silu": torch.nn.functional.silu}


def padded_volume(t, pads, mode, cval):
    """A (D, H, W) tensor padded (negative pads: cropped) per axis by pads in the scipy `mode`, as `padded`."""
    return padded(t[None, None], types.SimpleNamespace(pads=pads, mode=mode, cval=cval))[0, 0]


def padded(x, spec):
    """x padded (negative pads: cropped) by spec.pads in spec's boundary mode, by differentiable indexing (on a
    GPU with a deterministic backward: _Gather)."""
    from .. import _cuda

    for axis, (n, (lo, hi)) in enumerate(zip(x.shape[2:], spec.pads), start=2):
        index = pad_index(n, lo, hi, spec.mode)
        idx = torch.from_numpy(index).to(x.device)
        x = _Gather.apply(x, axis, index, lo) if _cuda.is_cuda(x) else x.index_select(axis, idx.clamp(min=0))
        if spec.mode == "constant":
            outside = (idx < 0).reshape([-1 if a == axis else 1 for a in range(x.dim())])
            x = x.masked_fill(outside, spec.cval)
    return x


def zero_padded(x, spec):
    """(x, spec) as the CUDA plugin's kernels take them, zero padding only: another mode, a cval or a crop is
    applied here by torch (padded), and spec becomes the padded input's; a zero-padded spec comes back as is."""
    if spec.mode == "constant" and spec.cval == 0 and min(min(p) for p in spec.pads) >= 0:
        return x, spec
    return padded(x, spec), spec.padded()


class _Gather(torch.autograd.Function):
    """x.index_select(axis, index) for pad_index's map of an axis padded by lo before (-1 read as 0), whose
    backward adds in a fixed order: torch's index_select backward on a GPU adds the padding's repeated sources
    with atomics, so the gradient's last bits would change from run to run. Here the volume's own run is one
    copy, then each pad position's plane is added in turn (a pad's width of small adds)."""

    @staticmethod
    def forward(ctx, x, axis, index, lo):
        ctx.axis, ctx.index, ctx.lo, ctx.n = axis, index, lo, x.shape[axis]
        return x.index_select(axis, torch.from_numpy(np.maximum(index, 0)).to(x.device))

    @staticmethod
    def backward(ctx, g):
        axis, index, lo, n = ctx.axis, ctx.index, ctx.lo, ctx.n
        gx = g.new_zeros(g.shape[:axis] + (n,) + g.shape[axis + 1:])
        first, last = max(lo, 0), min(lo + n, index.size)   # positions of the volume itself: index q - lo
        if last > first:
            gx.narrow(axis, first - lo, last - first).copy_(g.narrow(axis, first, last - first))
        for q in [q for q in range(index.size) if index[q] >= 0 and not first <= q < last]:   # pads, in order
            gx.select(axis, int(index[q])).add_(g.select(axis, q))
        return gx, None, None, None


def reference_conv(x, w, b, spec):
    """The convolution of a ConvSpec by torch's conv3d (differentiable to any order)."""
    return torch.nn.functional.conv3d(padded(x, spec), w, b, stride=spec.stride, dilation=spec.dilation,
                                      groups=spec.groups)


def reference_grads(needs, grad, forward, args):
    """The gradients (None where not needed) of forward(*args) against grad, as differentiable tensors."""
    wanted = [i for i, (a, need) in enumerate(zip(args, needs)) if need and a is not None]
    with torch.enable_grad():
        out = forward(*args)
    grads = torch.autograd.grad(out, [args[i] for i in wanted], grad, create_graph=True, allow_unused=True)
    result = [None] * len(needs)
    for i, g in zip(wanted, grads):
        result[i] = torch.zeros_like(args[i]) if g is None else g
    return tuple(result)


def twice_differentiable(reference):
    """Decorator of an autograd Function's backward (volconv's kernels, differentiable once): with
    create_graph=True the gradients of `reference(ctx)` = (forward in torch operations, its arguments as the
    Function's forward took them, None for non-tensors) instead, which can be differentiated again."""
    def decorate(backward):
        once = once_differentiable(backward)

        @functools.wraps(backward)
        def run(ctx, grad):
            if not torch.is_grad_enabled():   # the ordinary backward (create_graph=False)
                return once(ctx, grad)
            forward, args = reference(ctx)
            return reference_grads(ctx.needs_input_grad, grad, forward, args)
        return run
    return decorate


def no_double_backward(op, instead):
    """A reference for an op that cannot give a differentiable gradient: refuses create_graph=True clearly."""
    def reference(ctx):
        raise RuntimeError(f"volconv's {op} does not support double backward (create_graph=True); {instead}")
    return reference


def sparse_reference(x, values, b, indices, shape, spec):
    """vc.sparse_conv3d in torch operations (differentiable to any order): the dense weight its values fill."""
    idx = tuple(torch.as_tensor(np.asarray(indices)).T)
    return reference_conv(x, values.new_zeros(tuple(shape)).index_put(idx, values), b, spec)


def separable_reference(z, fd, fh, fw, spec):
    """The depthwise convolution with rank-1 components (fd[r], fh[r], fw[r]) in torch operations: the
    components' depthwise weight, built."""
    return reference_conv(z, torch.einsum("ra,rb,re->rabe", fd, fh, fw)[:, None], None, spec)


def dynamic_reference(x, K, layout):
    """vc.dynamic_conv3d in torch operations: the patches of every tap (N, C, T, Do, Ho, Wo), weighted by the
    kernel field and summed (memory: T inputs; for double backward only)."""
    spec = layout.spec
    xp = padded(x, spec)
    Do, Ho, Wo = layout.out_shape[2:]
    (sd, sh, sw), (dd, dh, dw) = spec.stride, spec.dilation
    patches = torch.stack([xp[:, :, a * dd:a * dd + (Do - 1) * sd + 1:sd, b * dh:b * dh + (Ho - 1) * sh + 1:sh,
                              e * dw:e * dw + (Wo - 1) * sw + 1:sw]
                           for a in range(layout.kernel_size[0]) for b in range(layout.kernel_size[1])
                           for e in range(layout.kernel_size[2])], dim=2)
    if layout.full:   # K (N, O, C, T, ...)
        return torch.einsum("noct...,nct...->no...", K, patches)
    groups = K.shape[1]   # K (N, G, T, ...): channel c uses its group's kernel
    return (K.repeat_interleave(x.shape[1] // groups, dim=1) * patches).sum(dim=2)


def nested_reference(x, weights, biases, activation, specs):
    """vc.nested_conv3d in torch operations: the chain of reference convolutions."""
    for i, (w, b, spec) in enumerate(zip(weights, biases, specs)):
        x = reference_conv(x, w, b, spec)
        if activation and i + 1 < len(specs):
            x = ACTIVATION_FUNCTIONS[activation](x)
    return x
