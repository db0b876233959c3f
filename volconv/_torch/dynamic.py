"""dynamic_conv3d on tensors: the volconv::dynamic_conv3d operator (forward, kernel-field gradient and input
gradient by volconv's per-voxel kernels: the CPU engine, or the CUDA plugin's for tensors on a GPU, see
cuda_dynamic.py) and the front doors' entry."""
from typing import List, Tuple

import torch
from torch import Tensor

from .. import _cuda
from .._validate import triple
from ..engine import dynamic
from . import cuda_dynamic
from .common import compute_dtype, empty, ints, numpy, operand, threads, threads_arg
from .op import Op
from .reference import dynamic_reference, reference_grads


def _layout(x_shape, k_shape, kernel_size, stride, padding, dilation):
    """padding: "same", "valid" or "a,b,c" (an operator takes no union of str and ints)."""
    pad = padding if padding in ("same", "valid") else tuple(int(p) for p in padding.split(","))
    return dynamic.Layout(ints(x_shape), ints(k_shape), ints(kernel_size), ints(stride), pad, ints(dilation))


def _forward(x: Tensor, kernels: Tensor, kernel_size: List[int], stride: List[int], padding: str,
             dilation: List[int], nthreads: int) -> Tensor:
    layout = _layout(x.shape, kernels.shape, kernel_size, stride, padding, dilation)
    if _cuda.is_cuda(x):
        return cuda_dynamic.forward(x.contiguous(), kernels.contiguous(), layout)
    return torch.from_numpy(dynamic.forward(numpy(x), numpy(kernels), layout, threads(nthreads)))


def _forward_fake(x, kernels, kernel_size, stride, padding, dilation, nthreads):
    return x.new_empty(_layout(x.shape, kernels.shape, kernel_size, stride, padding, dilation).out_shape)


def _backward(grad: Tensor, x: Tensor, kernels: Tensor, kernel_size: List[int], stride: List[int], padding: str,
              dilation: List[int], need_input: bool, need_kernels: bool, nthreads: int) -> Tuple[Tensor, Tensor]:
    layout = _layout(x.shape, kernels.shape, kernel_size, stride, padding, dilation)
    gx, gK = backward(x, kernels, grad, layout, (need_input, need_kernels), threads(nthreads))
    return empty(x) if gx is None else gx, empty(kernels) if gK is None else gK


def backward(x, kernels, grad, layout, needs, nthreads):
    """(input gradient, kernel-field gradient) as tensors, each None unless needs[0] / needs[1]: the plugin's
    kernels for tensors on a GPU, else the CPU engine's (DynamicConv3d's tiles call this too)."""
    if _cuda.is_cuda(x):
        g, x, kernels = grad.contiguous(), x.contiguous(), kernels.contiguous()
        return (cuda_dynamic.grad_input(kernels, g, layout, x.shape) if needs[0] else None,
                cuda_dynamic.grad_kernels(x, g, layout, kernels.shape) if needs[1] else None)
    gx, gK = dynamic.backward(numpy(x), numpy(kernels), numpy(grad), layout, tuple(needs), nthreads)
    return None if gx is None else torch.from_numpy(gx), None if gK is None else torch.from_numpy(gK)


def _backward_fake(grad, x, kernels, kernel_size, stride, padding, dilation, need_input, need_kernels, nthreads):
    return (x.new_empty(x.shape) if need_input else empty(x),
            kernels.new_empty(kernels.shape) if need_kernels else empty(kernels))


def _setup(ctx, inputs, output):
    x, kernels, *ctx.args = inputs
    ctx.save_for_backward(x, kernels)


def _gradient(ctx, grad):
    x, kernels = ctx.saved_tensors
    kernel_size, stride, padding, dilation, nthreads = ctx.args
    if torch.is_grad_enabled():   # create_graph=True
        layout = _layout(x.shape, kernels.shape, kernel_size, stride, padding, dilation)
        return reference_grads(ctx.needs_input_grad, grad, lambda x, K, *_: dynamic_reference(x, K, layout),
                               (x, kernels) + (None,) * 5)
    need = ctx.needs_input_grad[:2]
    gx, gK = ctx.kernel(grad, x, kernels, kernel_size, stride, padding, dilation, need[0], need[1], nthreads)
    return (gx if need[0] else None, gK if need[1] else None) + (None,) * 5


DYNAMIC_CONV3D = Op("dynamic_conv3d", _forward, _forward_fake, _backward, _backward_fake, _setup, _gradient)


def dynamic_conv3d(input, kernels, kernel_size, stride, padding, dilation, workers):
    """The per-voxel convolution on tensors that need gradients (or are traced; the operator checks the
    geometry). Computed in float32 / float64, returned in the input's dtype."""
    dtype = compute_dtype(input)
    text = padding if isinstance(padding, str) else ",".join(map(str, triple(padding, "padding")))
    out = DYNAMIC_CONV3D(operand(input, dtype), operand(kernels, dtype),
                         list(triple(kernel_size, "kernel_size")), list(triple(stride, "stride")), text,
                         list(triple(dilation, "dilation")), threads_arg(workers))
    return out.to(input.dtype)
