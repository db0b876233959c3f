"""conv3d on tensors: the volconv::conv3d operator (CPU engine or CUDA plugin, chosen below autograd) and the
entry the front doors call for tensors that need gradients, run on a GPU, or are traced. On a GPU the algorithm
is chosen by cuda_dense.choose: the plugin's depthwise or generic kernel (in the operator), cuDNN or an FFT
(torch's own ops and autograd)."""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import _cuda
from .._validate import TORCH_PAD_MODES, workers as resolve_workers
from ..engine import cost, dense
from . import cuda, cuda_dense
from .common import compiling, compute_dtype, empty, numpy, spec, spec_args, threads, threads_arg
from .op import Op
from .reference import reference_conv, reference_grads, zero_padded


def _forward(x: Tensor, w: Tensor, b: Optional[Tensor], stride: List[int], pads: List[int], dilation: List[int],
             groups: int, mode: str, cval: float, algorithm: str, nthreads: int) -> Tensor:
    s = spec(x.shape, w.shape, stride, pads, dilation, groups, mode, cval)
    if _cuda.is_cuda(x):   # algorithm: "depthwise" or "direct" (cuda_dense.choose)
        forward = cuda_dense.plugin_forward(algorithm)
        return forward(x.contiguous(), w.contiguous(), None if b is None else b.contiguous(), s)
    return torch.from_numpy(dense.run(numpy(x), numpy(w), numpy(b), s, algorithm, threads(nthreads),
                                      allow_torch=False))


def _forward_fake(x, w, b, stride, pads, dilation, groups, mode, cval, algorithm, nthreads):
    return x.new_empty(spec(x.shape, w.shape, stride, pads, dilation, groups, mode, cval).out_shape)


def _backward(grad: Tensor, x: Tensor, w: Tensor, stride: List[int], pads: List[int], dilation: List[int],
              groups: int, mode: str, cval: float, algorithm: str, need_input: bool, need_weight: bool,
              nthreads: int) -> Tuple[Tensor, Tensor]:
    s = spec(x.shape, w.shape, stride, pads, dilation, groups, mode, cval)
    if _cuda.is_cuda(x):
        g = grad.contiguous()
        gx = cuda_dense.grad_input(g, w.contiguous(), s, algorithm) if need_input else empty(x)
        gw = cuda.conv3d_grad_weight(x.contiguous(), g, s) if need_weight else empty(w)
        return gx, gw
    g, n = numpy(grad), threads(nthreads)
    gx = torch.from_numpy(dense.backward_input(g, numpy(w), s, algorithm, n)) if need_input else empty(x)
    gw = torch.from_numpy(dense.backward_weight(numpy(x), g, s, n, algorithm)) if need_weight else empty(w)
    return gx, gw


def _backward_fake(grad, x, w, stride, pads, dilation, groups, mode, cval, algorithm, need_input, need_weight,
                   nthreads):
    return x.new_empty(x.shape) if need_input else empty(x), w.new_empty(w.shape) if need_weight else empty(w)


def _setup(ctx, inputs, output):
    x, w, b, *ctx.args = inputs
    ctx.save_for_backward(x, w, b)
    ctx.has_bias = b is not None


def _gradient(ctx, grad):
    x, w, b = ctx.saved_tensors
    stride, pads, dilation, groups, mode, cval, algorithm, nthreads = ctx.args
    if torch.is_grad_enabled():   # create_graph=True: torch's differentiable conv3d
        s = spec(x.shape, w.shape, stride, pads, dilation, groups, mode, cval)
        return reference_grads(ctx.needs_input_grad, grad, lambda x, w, b, *_: reference_conv(x, w, b, s),
                               (x, w, b) + (None,) * 8)
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    gx, gw = ctx.kernel(grad, x, w, stride, pads, dilation, groups, mode, cval, algorithm, need_x, need_w, nthreads)
    gb = grad.sum(dim=(0, 2, 3, 4)) if ctx.has_bias and need_b else None
    return (gx if need_x else None, gw if need_w else None, gb) + (None,) * 8


CONV3D = Op("conv3d", _forward, _forward_fake, _backward, _backward_fake, _setup, _gradient)


def conv3d(x, w, b, s, algorithm, workers):
    """The convolution of ConvSpec s on tensors (checked by the front door): differentiable, on the CPU or a GPU,
    eager or traced. Computed in float32 / float64, returned in x's dtype. Eager CPU calls with "auto" choose
    the algorithm for a training step here (oneDNN's own autograd when torch's conv3d is the cheapest); on a GPU
    cuda_dense.choose does (cuDNN's and the FFT's autograd by torch, the plugin's kernels in the operator)."""
    dtype = compute_dtype(x)
    out_dtype, x, w = x.dtype, x.to(dtype), w.to(dtype)
    b = None if b is None else b.to(dtype)
    on_gpu = _cuda.is_cuda(x)
    if on_gpu:
        x, s = zero_padded(x, s)
        algorithm = cuda_dense.choose(x, w, s, algorithm, tracing=compiling())
        if algorithm in cuda_dense.TORCH_ALGORITHMS:
            return cuda_dense.TORCH_ALGORITHMS[algorithm](x, w, b, s).to(out_dtype)
    elif not compiling():
        torch_reachable = s.mode in TORCH_PAD_MODES and s.cval == 0
        if algorithm == "auto":
            algorithm = cost.choose_algorithm(numpy(x), s, resolve_workers(workers), w=numpy(w),
                                              allow_torch=torch_reachable, backward=True)
        if algorithm == "torch" and torch_reachable:
            return dense.torch_conv3d_tensors(x, w, b, s).to(out_dtype)
        algorithm = "auto" if algorithm == "torch" else algorithm
    out = CONV3D(x.contiguous(), w.contiguous(), None if b is None else b.contiguous(), *spec_args(s), algorithm,
                 threads_arg(workers))
    return out.to(out_dtype)
