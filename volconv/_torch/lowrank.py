"""CP and Tucker convolutions on tensors: the volconv::separable_conv3d operator (depthwise rank-1 components by
the fused separable kernel, forward and backward, on the CPU engine or the CUDA plugin), the channel projections
(matrix products: cuBLAS on a GPU), and the front doors' entry."""
from typing import List, Tuple

import numpy as np
import torch
from torch import Tensor

from .. import _cuda
from .._validate import ConvSpec
from ..engine import separable
from . import conv, cuda_lowrank
from .common import compiling, compute_dtype, empty, numpy, operand, spec, spec_args, threads, threads_arg
from .op import Op
from .reference import reference_grads, separable_reference, twice_differentiable, zero_padded


def _spec(z, fd, fh, fw, stride, pads, dilation, mode):
    C = z.shape[1]
    return spec(z.shape, (C, 1, fd.shape[1], fh.shape[1], fw.shape[1]), stride, pads, dilation, C, mode)


def _forward(z: Tensor, fd: Tensor, fh: Tensor, fw: Tensor, stride: List[int], pads: List[int],
             dilation: List[int], mode: str, nthreads: int) -> Tensor:
    s = _spec(z, fd, fh, fw, stride, pads, dilation, mode)
    if _cuda.is_cuda(z):
        return cuda_lowrank.forward(z, fd, fh, fw, _zero_padding_checked(s))
    return torch.from_numpy(separable.separable_conv3d(numpy(z), numpy(fd), numpy(fh), numpy(fw), s,
                                                       threads(nthreads)))


def _zero_padding_checked(s):
    """s, which the plugin computes (zero padding): factored_conv3d pads other modes with torch first."""
    if s.mode != "constant":
        raise ValueError(f"volconv's CUDA separable pass pads with zeros; pad {s.mode!r} first")
    return s


def _forward_fake(z, fd, fh, fw, stride, pads, dilation, mode, nthreads):
    return z.new_empty(_spec(z, fd, fh, fw, stride, pads, dilation, mode).out_shape)


def _backward(grad: Tensor, z: Tensor, fd: Tensor, fh: Tensor, fw: Tensor, stride: List[int], pads: List[int],
              dilation: List[int], mode: str, need_input: bool, need_factors: bool,
              nthreads: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    s = _spec(z, fd, fh, fw, stride, pads, dilation, mode)
    if _cuda.is_cuda(z):
        grads = cuda_lowrank.backward(grad.contiguous(), z, fd, fh, fw, _zero_padding_checked(s), need_input,
                                      need_factors)
        return tuple(empty(like) if a is None else a for a, like in zip(grads, (z, fd, fh, fw)))
    grads = separable.backward(numpy(z), numpy(grad), numpy(fd), numpy(fh), numpy(fw), s, threads(nthreads),
                               need_input, need_factors)
    return tuple(empty(like) if a is None else torch.from_numpy(a) for a, like in zip(grads, (z, fd, fh, fw)))


def _backward_fake(grad, z, fd, fh, fw, stride, pads, dilation, mode, need_input, need_factors, nthreads):
    return (z.new_empty(z.shape) if need_input else empty(z),) + tuple(
        f.new_empty(f.shape) if need_factors else empty(f) for f in (fd, fh, fw))


def _setup(ctx, inputs, output):
    z, fd, fh, fw, *ctx.args = inputs
    ctx.save_for_backward(z, fd, fh, fw)


def _gradient(ctx, grad):
    z, fd, fh, fw = ctx.saved_tensors
    stride, pads, dilation, mode, nthreads = ctx.args
    if torch.is_grad_enabled():   # create_graph=True
        s = _spec(z, fd, fh, fw, stride, pads, dilation, mode)
        return reference_grads(ctx.needs_input_grad, grad,
                               lambda z, fd, fh, fw, *_: separable_reference(z, fd, fh, fw, s),
                               (z, fd, fh, fw) + (None,) * 5)
    need = ctx.needs_input_grad[:4]
    grads = ctx.kernel(grad, z, fd, fh, fw, stride, pads, dilation, mode, need[0], any(need[1:]), nthreads)
    return tuple(g if n else None for g, n in zip(grads, need)) + (None,) * 5


SEPARABLE_CONV3D = Op("separable_conv3d", _forward, _forward_fake, _backward, _backward_fake, _setup, _gradient)


def _project_reference(ctx):
    def forward(x, w, b):
        out = torch.einsum("oc,nc...->no...", w, x)
        return out if b is None else out + b.reshape((1, -1) + (1,) * (x.dim() - 2))
    return forward, tuple(ctx.saved_tensors)


class ProjectFunction(torch.autograd.Function):
    """Channel projection out[n, o] = sum_c w[o, c] x[n, c] (+ b[o]): a 1x1x1 convolution as one matrix
    product per batch item, written into numpy-allocated tensors (torch's own allocations of volumes >= 32 MB
    are fresh mmaps whose page faults cost more than the product) with the bias added in place."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w, b)
        ctx.has_bias = b is not None
        return _project(w, x, b)

    @staticmethod
    @twice_differentiable(_project_reference)
    def backward(ctx, grad):
        x, w, _ = ctx.saved_tensors
        g = grad.contiguous()
        gx = _project(w.T, g) if ctx.needs_input_grad[0] else None
        gw = gb = None
        if ctx.needs_input_grad[1]:
            G, X = g.flatten(2), x.flatten(2)
            gw = sum(G[n] @ X[n].T for n in range(g.shape[0]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum(dim=(0, 2, 3, 4))
        return gx, gw, gb


def _project(w, x, b=None):
    """w (O, C) applied to the channels of x (N, C, ...), into a fresh numpy-allocated tensor (on a GPU: one
    batched matrix product by cuBLAS)."""
    x = x.contiguous()
    if _cuda.is_cuda(x):
        out = torch.matmul(w, x.flatten(2)).reshape((x.shape[0], w.shape[0]) + tuple(x.shape[2:]))
        return out if b is None else out.add_(b.reshape((1, -1) + (1,) * (x.dim() - 2)))
    out = torch.from_numpy(np.empty((x.shape[0], w.shape[0]) + tuple(x.shape[2:]), x.numpy().dtype))
    X, Y = x.flatten(2), out.flatten(2)
    for n in range(x.shape[0]):
        torch.mm(w, X[n], out=Y[n])
    if b is not None:
        out.add_(b.reshape((1, -1) + (1,) * (x.dim() - 2)))
    return out


def factored_conv3d(input, bias, s, workers, in_f, out_f, spatial, core):
    """vc.cp_conv3d / vc.tucker_conv3d of ConvSpec s (the whole weight's geometry) on tensors that need
    gradients (the input, the bias, or factors given as tensors, as vc.nn.CPConv3d and TuckerConv3d do), are on
    a GPU or are traced: projections by torch, the spatial part by volconv's operators (on the GPU, the factors
    go to the input's device)."""
    traced = compiling()
    dtype = compute_dtype(input)
    x = operand(input, dtype)

    def factor(a):
        return operand(a, dtype).to(x.device)

    z = torch.einsum("cr,ncdhw->nrdhw", factor(in_f), x) if traced else \
        ProjectFunction.apply(x, factor(in_f).T, None)
    if spatial is not None:
        fd, fh, fw = (factor(f) for f in spatial)
        R = z.shape[1]
        sspec = ConvSpec(tuple(z.shape), (R, 1) + tuple(s.w_shape[2:]), stride=s.stride, pads=s.pads,
                         dilation=s.dilation, groups=R, mode=s.mode)
        if _cuda.is_cuda(z):
            z, sspec = zero_padded(z, sspec)
        stride, pads, dilation, _, mode, _ = spec_args(sspec)
        u = SEPARABLE_CONV3D(z.contiguous(), fd, fh, fw, stride, pads, dilation, mode, threads_arg(workers))
    else:
        c = factor(core)
        cspec = ConvSpec(tuple(z.shape), tuple(c.shape), stride=s.stride, pads=s.pads, dilation=s.dilation,
                         groups=1, mode=s.mode)
        u = conv.conv3d(z, c, None, cspec, "direct", workers)   # oneDNN's 3-D backward is slower here
    b = None if bias is None else operand(bias, dtype)
    if traced:
        out = torch.einsum("or,nrdhw->nodhw", factor(out_f), u)
        return (out if b is None else out + b.reshape(1, -1, 1, 1, 1)).to(input.dtype)
    return ProjectFunction.apply(u, factor(out_f), b).to(input.dtype)


def separable_kernel_conv3d(x, kernel, spec, workers):
    """A vc.SeparableKernel applied to every channel of tensor x (depthwise; ConvSpec spec: the whole 3-D
    kernel's geometry, any mode and cval) as its terms' separable passes (volconv::separable_conv3d, on the CUDA
    plugin for a GPU tensor), summed; differentiable in x. Computed in float32 / float64, returned in x's dtype.
    For the front doors' tensor paths (vc.conv3d / vc.correlate with a SeparableKernel on a GPU)."""
    dtype = compute_dtype(x)
    z = x.to(dtype)
    z, spec = zero_padded(z, spec)   # (the op pads with zeros)
    C = z.shape[1]
    stride, pads, dilation, _, mode, _ = spec_args(spec)
    out = None
    for weight, factors in kernel.terms():
        fd, fh, fw = (torch.as_tensor(f * (weight if axis == 0 else 1), dtype=dtype, device=z.device).expand(C, -1)
                      .contiguous() for axis, f in enumerate(factors))
        y = SEPARABLE_CONV3D(z.contiguous(), fd, fh, fw, stride, pads, dilation, mode, threads_arg(workers))
        out = y if out is None else out + y
    return out.to(x.dtype)
