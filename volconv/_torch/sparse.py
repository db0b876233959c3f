"""sparse_conv3d on tensors: the volconv::sparse_conv3d operator and the front doors' entry. On the CPU engine the
forward runs the sparse kernel and the backward goes through the dense weight the values fill (gathered at the
pattern for the values); on the CUDA plugin all three run by the non-zeros (cuda_plugin/sparse.cu), on tap lists
built here from the pattern."""
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .. import _cuda
from .._validate import ConvSpec
from ..engine import dense, sparse
from . import cuda
from .common import compute_dtype, empty, numpy, operand, spec, spec_args, threads, threads_arg
from .op import Op
from .reference import reference_grads, sparse_reference, zero_padded


def _forward(x: Tensor, values: Tensor, b: Optional[Tensor], indices: Tensor, shape: List[int], stride: List[int],
             pads: List[int], dilation: List[int], groups: int, mode: str, nthreads: int) -> Tensor:
    s = spec(x.shape, shape, stride, pads, dilation, groups, mode)
    if _cuda.is_cuda(x):
        taps, order = _forward_taps(indices, s, x.device)
        return cuda.launch("sparse_conv3d", "vc_sparse_conv3d_forward", _cuda.geometry(s), s.out_shape,
                           x.contiguous(), _ordered(values, order), taps, None if b is None else b.contiguous())
    return torch.from_numpy(sparse.run(numpy(x), indices.numpy(), numpy(values), numpy(b), s, threads(nthreads)))


def _forward_fake(x, values, b, indices, shape, stride, pads, dilation, groups, mode, nthreads):
    return x.new_empty(spec(x.shape, shape, stride, pads, dilation, groups, mode).out_shape)


def _backward(grad: Tensor, x: Tensor, values: Tensor, indices: Tensor, shape: List[int], stride: List[int],
              pads: List[int], dilation: List[int], groups: int, mode: str, need_input: bool, need_values: bool,
              nthreads: int) -> Tuple[Tensor, Tensor]:
    """On the CPU engine exact, at the dense kernel's cost; on the plugin by the non-zeros."""
    s, n = spec(x.shape, shape, stride, pads, dilation, groups, mode), threads(nthreads)
    if _cuda.is_cuda(x):
        g = grad.contiguous()
        gx = _cuda_grad_input(g, values, indices, s) if need_input else empty(x)
        gv = _cuda_grad_values(x.contiguous(), g, values, indices, s) if need_values else empty(values)
        return gx, gv
    idx, g = indices.numpy(), numpy(grad)
    w = sparse.dense_weight(idx, numpy(values), tuple(shape))
    gx = torch.from_numpy(dense.backward_input(g, w, s, "auto", n)) if need_input else empty(x)
    gv = torch.from_numpy(np.ascontiguousarray(dense.backward_weight(numpy(x), g, s, n)[tuple(idx.T)])) \
        if need_values else empty(values)
    return gx, gv


def _tap_list(key, lists, columns, device):
    """The plugin's tap lists (sparse.cu): the taps ordered by key (stable), as int64 [ptr (lists + 1) | the 4
    columns of each tap] on device, and that order (None: the taps' own)."""
    order = np.argsort(key, kind="stable")
    ptr = np.searchsorted(key[order], np.arange(lists + 1))
    table = np.concatenate([ptr, np.stack(columns, axis=1)[order].reshape(-1)]).astype(np.int64)
    return _upload(table, device), None if np.array_equal(order, np.arange(key.size)) else order


def _upload(array, device):
    """An int64 array as a tensor on device: to a GPU from pinned memory, without waiting for the stream (a copy
    from pageable memory would synchronise it)."""
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))
    return t.pin_memory().to(device, non_blocking=True) if torch.device(device).type == "cuda" else t.to(device)


def _ordered(values, order):
    return values.contiguous() if order is None else values[_upload(order, values.device)]


def _forward_taps(indices, s, device):
    """The forward's lists: per output channel, (c within the group, a, b, e)."""
    o, c, a, b, e = indices.cpu().numpy().T
    return _tap_list(o, s.w_shape[0], (c, a, b, e), device)


def _cuda_grad_input(g, values, indices, s):
    """At stride 1 the forward kernel on the transposed, flipped lists (per input channel: (o within the group,
    the flipped a, b, e)), padded by the kernel's reach less the forward's padding; at other strides the gather
    kernel, per input channel and residue class (a * dd = qd * sd + rd, ...): (o within the group, qd, qh, qw)."""
    O, Cg, kd, kh, kw = s.w_shape
    G = s.groups
    Og = O // G
    o, c, a, b, e = indices.cpu().numpy().T
    channel, o_in_group = (o // Og) * Cg + c, o % Og
    if s.stride == (1, 1, 1):
        taps, order = _tap_list(channel, Cg * G, (o_in_group, kd - 1 - a, kh - 1 - b, kw - 1 - e), g.device)
        st = ConvSpec(tuple(g.shape), (Cg * G, Og, kd, kh, kw), stride=(1, 1, 1), pads=s.transposed_pads(),
                      dilation=s.dilation, groups=G, mode="constant")
        return cuda.launch("sparse_conv3d backward (input)", "vc_sparse_conv3d_forward", _cuda.geometry(st),
                           st.out_shape, g, _ordered(values, order), taps, None)
    (sd, sh, sw), (dd, dh, dw) = s.stride, s.dilation
    (qd, rd), (qh, rh), (qw, rw) = divmod(a * dd, sd), divmod(b * dh, sh), divmod(e * dw, sw)
    taps, order = _tap_list(channel * (sd * sh * sw) + (rd * sh + rh) * sw + rw, Cg * G * sd * sh * sw,
                            (o_in_group, qd, qh, qw), g.device)
    return cuda.launch("sparse_conv3d backward (input)", "vc_sparse_conv3d_grad_input", _cuda.geometry(s),
                       s.x_shape, g, _ordered(values, order), taps)


def _cuda_grad_values(x, g, values, indices, s):
    """Partial sums per slice of the output rows, then the slices summed in order: about 1024 blocks (slices x
    output channels: a GPU filled several times over), at least 16 rows a slice (the reductions amortised), scratch
    of at most 2^24 values."""
    nnz = int(indices.shape[0])
    taps, order = _forward_taps(indices, s, x.device)
    N, O, Do, Ho, _ = s.out_shape
    slices = max(1, min(-(-N * Do * Ho // 16), -(-1024 // O), (1 << 24) // max(nnz, 1)))
    gv, _ = cuda.launch("sparse_conv3d backward (values)", "vc_sparse_conv3d_grad_values",
                        _cuda.geometry(s, nnz, slices), [(nnz,), (slices, nnz)], x, g, taps)
    if order is None:
        return gv
    return torch.empty_like(gv).index_copy_(0, _upload(order, gv.device), gv)


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
    """The sparse convolution of ConvSpec s on tensors that need gradients, run on a GPU, or are traced; values: a
    tensor, a torch sparse weight (its coalesced values) or an array (moved to the input's device). Computed in
    float32 / float64, returned in the input's dtype."""
    dtype = compute_dtype(input)
    x = operand(input, dtype)
    if isinstance(values, torch.Tensor) and values.is_sparse:   # the sparse weight itself: its coalesced values
        v = values.coalesce().values().to(dtype)
    else:
        v = operand(values, dtype)
    v = v.to(x.device)
    b = None if bias is None else operand(bias, dtype)
    idx = indices if isinstance(indices, torch.Tensor) else torch.as_tensor(np.asarray(indices))
    if _cuda.is_cuda(x):
        x, s = zero_padded(x, s)
    stride, pads, dilation, groups, mode, _ = spec_args(s)
    return SPARSE_CONV3D(x, v, b, idx, list(s.w_shape), stride, pads, dilation, groups, mode,
                         threads_arg(workers)).to(input.dtype)
