"""sparse_conv3d on tensors: the volconv::sparse_conv3d operator (forward by the sparse kernel; backward through
the dense weight the values fill, gathered at the pattern for the values) and the front doors' entry."""
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ..engine import dense, sparse
from .common import compute_dtype, empty, numpy, operand, spec, spec_args, threads, threads_arg
from .op import Op
from .reference import reference_grads, sparse_reference


def _forward(x: Tensor, values: Tensor, b: Optional[Tensor], indices: Tensor, shape: List[int], stride: List[int],
             pads: List[int], dilation: List[int], groups: int, mode: str, nthreads: int) -> Tensor:
    s = spec(x.shape, shape, stride, pads, dilation, groups, mode)
    return torch.from_numpy(sparse.run(numpy(x), indices.numpy(), numpy(values), numpy(b), s, threads(nthreads)))


def _forward_fake(x, values, b, indices, shape, stride, pads, dilation, groups, mode, nthreads):
    return x.new_empty(spec(x.shape, shape, stride, pads, dilation, groups, mode).out_shape)


def _backward(grad: Tensor, x: Tensor, values: Tensor, indices: Tensor, shape: List[int], stride: List[int],
              pads: List[int], dilation: List[int], groups: int, mode: str, need_input: bool, need_values: bool,
              nthreads: int) -> Tuple[Tensor, Tensor]:
    """Exact, at the dense kernel's cost."""
    s, n = spec(x.shape, shape, stride, pads, dilation, groups, mode), threads(nthreads)
    idx, g = indices.numpy(), numpy(grad)
    w = sparse.dense_weight(idx, numpy(values), tuple(shape))
    gx = torch.from_numpy(dense.backward_input(g, w, s, "auto", n)) if need_input else empty(x)
    gv = torch.from_numpy(np.ascontiguousarray(dense.backward_weight(numpy(x), g, s, n)[tuple(idx.T)])) \
        if need_values else empty(values)
    return gx, gv


def _backward_fake(grad, x, values, indices, shape, stride, pads, dilation, groups, mode, need_input, need_values,
                   nthreads):
    return (x.new_empty(x.shape) if need_input else empty(x),
            values.new_empty(values.shape) if need_values else empty(values))


def _setup(ctx, inputs, output):
    x, values, b, indices, *ctx.args = inputs
    ctx.save_for_backward(x, values, indices, b)
    ctx.has_bias = b is not None


def _gradient(ctx, grad):
    x, values, indices, b = ctx.saved_tensors
    shape, stride, pads, dilation, groups, mode, nthreads = ctx.args
    if torch.is_grad_enabled():   # create_graph=True
        s = spec(x.shape, shape, stride, pads, dilation, groups, mode)
        return reference_grads(ctx.needs_input_grad, grad,
                               lambda x, values, b, *_: sparse_reference(x, values, b, indices, shape, s),
                               (x, values, b) + (None,) * 8)
    need_x, need_v, need_b = ctx.needs_input_grad[:3]
    gx, gv = ctx.kernel(grad, x, values, indices, shape, stride, pads, dilation, groups, mode, need_x, need_v,
                        nthreads)
    gb = grad.sum(dim=(0, 2, 3, 4)) if ctx.has_bias and need_b else None
    return (gx if need_x else None, gv if need_v else None, gb) + (None,) * 8


SPARSE_CONV3D = Op("sparse_conv3d", _forward, _forward_fake, _backward, _backward_fake, _setup, _gradient)


def sparse_conv3d(input, indices, values, bias, s, workers):
    """The sparse convolution of ConvSpec s on tensors that need gradients (or are traced); values: a tensor, a
    torch sparse weight (its coalesced values) or an array. Computed in float32 / float64, returned in the
    input's dtype."""
    dtype = compute_dtype(input)
    x = operand(input, dtype)
    if isinstance(values, torch.Tensor) and values.is_sparse:   # the sparse weight itself: its coalesced values
        v = values.coalesce().values().to(dtype)
    else:
        v = operand(values, dtype)
    b = None if bias is None else operand(bias, dtype)
    idx = indices if isinstance(indices, torch.Tensor) else torch.as_tensor(np.asarray(indices))
    stride, pads, dilation, groups, mode, _ = spec_args(s)
    return SPARSE_CONV3D(x, v, b, idx, list(s.w_shape), stride, pads, dilation, groups, mode,
                         threads_arg(workers)).to(input.dtype)
