"""volconv's operations as PyTorch custom operators (torch.library.custom_op): fake implementations give
torch.compile and torch.export their output shapes, registered autograd their backward (itself a custom op),
so a model using volconv layers compiles and exports without graph breaks.

Eager calls keep volconv's autograd Functions (nn/_functions.py); while torch.compile or torch.export traces
(`compiling()`), the functional ops route here. Both run the same numpy-level kernels; these ops run on CPU
tensors of float32 / float64. With create_graph=True (double backward) each registered backward takes its
gradients from the op written in torch operations, as the Functions do (nn/_functions.py's reference_grads).
"""
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .._validate import ConvSpec
from ..ops import dense
from ._functions import dynamic_reference, reference_conv, reference_grads, separable_reference, sparse_reference

NS = "volconv"


def threads_arg(workers):
    """`workers` as the ops' int argument (0: None, all threads): resolved inside the op, not while tracing."""
    return 0 if workers is None else int(workers)


def _threads(n):
    from .._validate import workers as resolve_workers

    return resolve_workers(None if n == 0 else n)


def compiling():
    """True while torch.compile / torch.export trace (then volconv's ops must be custom operators)."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def _ints(values):
    return tuple(int(v) for v in values)   # symbolic sizes (torch.compile's dynamic shapes) become concrete


def _spec(x_shape, w_shape, stride, pads, dilation, groups, mode, cval=0.0):
    p = _ints(pads)
    return ConvSpec(_ints(x_shape), _ints(w_shape), stride=_ints(stride), pads=(p[0:2], p[2:4], p[4:6]),
                    dilation=_ints(dilation), groups=int(groups), mode=mode, cval=float(cval))


def spec_args(spec):
    """A ConvSpec as the ops' plain arguments: stride, pads (6), dilation, groups, mode, cval."""
    return list(spec.stride), [p for lo_hi in spec.pads for p in lo_hi], list(spec.dilation), spec.groups, \
        spec.mode, float(spec.cval)


def _np(t):
    return None if t is None else t.detach().contiguous().numpy()


def _empty(like):
    return like.new_empty(0)


# ------------------------------------------------------------------------------------------------ conv3d

@torch.library.custom_op(f"{NS}::conv3d", mutates_args=())
def conv3d(x: Tensor, w: Tensor, b: Optional[Tensor], stride: List[int], pads: List[int], dilation: List[int],
           groups: int, mode: str, cval: float, algorithm: str, nthreads: int) -> Tensor:
    nthreads = _threads(nthreads)
    spec = _spec(x.shape, w.shape, stride, pads, dilation, groups, mode, cval)
    return torch.from_numpy(dense.run(_np(x), _np(w), _np(b), spec, algorithm, nthreads, allow_torch=False))


@conv3d.register_fake
def _(x, w, b, stride, pads, dilation, groups, mode, cval, algorithm, nthreads):
    return x.new_empty(_spec(x.shape, w.shape, stride, pads, dilation, groups, mode, cval).out_shape)


@torch.library.custom_op(f"{NS}::conv3d_backward", mutates_args=())
def conv3d_backward(grad: Tensor, x: Tensor, w: Tensor, stride: List[int], pads: List[int], dilation: List[int],
                    groups: int, mode: str, cval: float, need_input: bool, need_weight: bool,
                    nthreads: int) -> Tuple[Tensor, Tensor]:
    nthreads = _threads(nthreads)
    spec = _spec(x.shape, w.shape, stride, pads, dilation, groups, mode, cval)
    g = _np(grad)
    gx = torch.from_numpy(dense.backward_input(g, _np(w), spec, "auto", nthreads)) if need_input else _empty(x)
    gw = torch.from_numpy(dense.backward_weight(_np(x), g, spec, nthreads)) if need_weight else _empty(w)
    return gx, gw


@conv3d_backward.register_fake
def _(grad, x, w, stride, pads, dilation, groups, mode, cval, need_input, need_weight, nthreads):
    return x.new_empty(x.shape) if need_input else _empty(x), w.new_empty(w.shape) if need_weight else _empty(w)


def _conv3d_setup(ctx, inputs, output):
    x, w, b, *ctx.args = inputs
    ctx.save_for_backward(x, w, b)
    ctx.has_bias = b is not None


def _conv3d_grad(ctx, grad):
    x, w, b = ctx.saved_tensors
    stride, pads, dilation, groups, mode, cval, _, nthreads = ctx.args
    if torch.is_grad_enabled():   # create_graph=True
        spec = _spec(x.shape, w.shape, stride, pads, dilation, groups, mode, cval)
        return reference_grads(ctx.needs_input_grad, grad, lambda x, w, b, *_: reference_conv(x, w, b, spec),
                               (x, w, b) + (None,) * 8)
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    gx, gw = conv3d_backward(grad, x, w, stride, pads, dilation, groups, mode, cval, need_x, need_w, nthreads)
    gb = grad.sum(dim=(0, 2, 3, 4)) if ctx.has_bias and need_b else None
    return (gx if need_x else None, gw if need_w else None, gb) + (None,) * 8


conv3d.register_autograd(_conv3d_grad, setup_context=_conv3d_setup)


# ------------------------------------------------------------------------------------------------ sparse

@torch.library.custom_op(f"{NS}::sparse_conv3d", mutates_args=())
def sparse_conv3d(x: Tensor, values: Tensor, b: Optional[Tensor], indices: Tensor, shape: List[int],
                  stride: List[int], pads: List[int], dilation: List[int], groups: int, mode: str,
                  nthreads: int) -> Tensor:
    nthreads = _threads(nthreads)
    from ..ops.sparse import run_sparse

    spec = _spec(x.shape, shape, stride, pads, dilation, groups, mode)
    return torch.from_numpy(run_sparse(_np(x), indices.numpy(), _np(values), _np(b), spec, nthreads))


@sparse_conv3d.register_fake
def _(x, values, b, indices, shape, stride, pads, dilation, groups, mode, nthreads):
    return x.new_empty(_spec(x.shape, shape, stride, pads, dilation, groups, mode).out_shape)


@torch.library.custom_op(f"{NS}::sparse_conv3d_backward", mutates_args=())
def sparse_conv3d_backward(grad: Tensor, x: Tensor, values: Tensor, indices: Tensor, shape: List[int],
                           stride: List[int], pads: List[int], dilation: List[int], groups: int, mode: str,
                           need_input: bool, need_values: bool, nthreads: int) -> Tuple[Tensor, Tensor]:
    nthreads = _threads(nthreads)
    from ..ops.sparse import dense_weight

    spec = _spec(x.shape, shape, stride, pads, dilation, groups, mode)
    idx = indices.numpy()
    w = dense_weight(idx, _np(values), tuple(shape))
    g = _np(grad)
    gx = torch.from_numpy(dense.backward_input(g, w, spec, "auto", nthreads)) if need_input else _empty(x)
    gv = torch.from_numpy(np.ascontiguousarray(dense.backward_weight(_np(x), g, spec, nthreads)[tuple(idx.T)])) \
        if need_values else _empty(values)
    return gx, gv


@sparse_conv3d_backward.register_fake
def _(grad, x, values, indices, shape, stride, pads, dilation, groups, mode, need_input, need_values, nthreads):
    return (x.new_empty(x.shape) if need_input else _empty(x),
            values.new_empty(values.shape) if need_values else _empty(values))


def _sparse_setup(ctx, inputs, output):
    x, values, b, indices, *ctx.args = inputs
    ctx.save_for_backward(x, values, indices, b)
    ctx.has_bias = b is not None


def _sparse_grad(ctx, grad):
    x, values, indices, b = ctx.saved_tensors
    shape, stride, pads, dilation, groups, mode, nthreads = ctx.args
    if torch.is_grad_enabled():   # create_graph=True
        spec = _spec(x.shape, shape, stride, pads, dilation, groups, mode)
        return reference_grads(ctx.needs_input_grad, grad,
                               lambda x, values, b, *_: sparse_reference(x, values, b, indices, shape, spec),
                               (x, values, b) + (None,) * 8)
    need_x, need_v, need_b = ctx.needs_input_grad[:3]
    gx, gv = sparse_conv3d_backward(grad, x, values, indices, shape, stride, pads, dilation, groups, mode, need_x,
                                    need_v, nthreads)
    gb = grad.sum(dim=(0, 2, 3, 4)) if ctx.has_bias and need_b else None
    return (gx if need_x else None, gv if need_v else None, gb) + (None,) * 8


sparse_conv3d.register_autograd(_sparse_grad, setup_context=_sparse_setup)


# ------------------------------------------------------------------------------------------------ separable

@torch.library.custom_op(f"{NS}::separable_conv3d", mutates_args=())
def separable_conv3d(z: Tensor, fd: Tensor, fh: Tensor, fw: Tensor, stride: List[int], pads: List[int],
                     dilation: List[int], mode: str, nthreads: int) -> Tensor:
    nthreads = _threads(nthreads)
    from ..ops.decomposed import separable_conv3d as run

    C = z.shape[1]
    spec = _spec(z.shape, (C, 1, fd.shape[1], fh.shape[1], fw.shape[1]), stride, pads, dilation, C, mode)
    return torch.from_numpy(run(_np(z), _np(fd), _np(fh), _np(fw), spec, nthreads))


@separable_conv3d.register_fake
def _(z, fd, fh, fw, stride, pads, dilation, mode, nthreads):
    C = z.shape[1]
    return z.new_empty(_spec(z.shape, (C, 1, fd.shape[1], fh.shape[1], fw.shape[1]), stride, pads, dilation, C,
                             mode).out_shape)


@torch.library.custom_op(f"{NS}::separable_conv3d_backward", mutates_args=())
def separable_conv3d_backward(grad: Tensor, z: Tensor, fd: Tensor, fh: Tensor, fw: Tensor, stride: List[int],
                              pads: List[int], dilation: List[int], mode: str, need_input: bool, need_factors: bool,
                              nthreads: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    nthreads = _threads(nthreads)
    from ._functions import separable_grads

    C = z.shape[1]
    spec = _spec(z.shape, (C, 1, fd.shape[1], fh.shape[1], fw.shape[1]), stride, pads, dilation, C, mode)
    grads = separable_grads(_np(z), _np(grad), _np(fd), _np(fh), _np(fw), spec, nthreads, need_input, need_factors)
    return tuple(_empty(like) if a is None else torch.from_numpy(a) for a, like in zip(grads, (z, fd, fh, fw)))


@separable_conv3d_backward.register_fake
def _(grad, z, fd, fh, fw, stride, pads, dilation, mode, need_input, need_factors, nthreads):
    return (z.new_empty(z.shape) if need_input else _empty(z),) + tuple(
        f.new_empty(f.shape) if need_factors else _empty(f) for f in (fd, fh, fw))


def _separable_setup(ctx, inputs, output):
    z, fd, fh, fw, *ctx.args = inputs
    ctx.save_for_backward(z, fd, fh, fw)


def _separable_grad(ctx, grad):
    z, fd, fh, fw = ctx.saved_tensors
    stride, pads, dilation, mode, nthreads = ctx.args
    if torch.is_grad_enabled():   # create_graph=True
        C = z.shape[1]
        spec = _spec(z.shape, (C, 1, fd.shape[1], fh.shape[1], fw.shape[1]), stride, pads, dilation, C, mode)
        return reference_grads(ctx.needs_input_grad, grad,
                               lambda z, fd, fh, fw, *_: separable_reference(z, fd, fh, fw, spec),
                               (z, fd, fh, fw) + (None,) * 5)
    need = ctx.needs_input_grad[:4]
    grads = separable_conv3d_backward(grad, z, fd, fh, fw, stride, pads, dilation, mode, need[0], any(need[1:]),
                                      nthreads)
    return tuple(g if n else None for g, n in zip(grads, need)) + (None,) * 5


separable_conv3d.register_autograd(_separable_grad, setup_context=_separable_setup)


# ------------------------------------------------------------------------------------------------ nested

def _nested_specs(x_shape, weights, groups):
    from ..ops.nested import stage_specs

    return stage_specs(_ints(x_shape), weights, int(groups))


@torch.library.custom_op(f"{NS}::nested_conv3d", mutates_args=())
def nested_conv3d(x: Tensor, weights: List[Tensor], biases: List[Tensor], activation: str, groups: int,
                  algorithm: str, nthreads: int) -> Tensor:
    """biases: one per stage, an empty tensor for a stage without one (an operator takes no list of Nones)."""
    nthreads = _threads(nthreads)
    from ..ops import nested

    ws = [_np(w) for w in weights]
    specs = _nested_specs(x.shape, ws, groups)
    return torch.from_numpy(nested.run(_np(x), ws, _biases(biases), activation or None, specs, algorithm,
                                       nthreads))


def _biases(biases):
    return [None if b.numel() == 0 else _np(b) for b in biases]


def nested_biases(biases, like):
    """The nested operator's bias list: empty tensors where a stage has none."""
    return [like.new_empty(0) if b is None else b for b in biases]


@nested_conv3d.register_fake
def _(x, weights, biases, activation, groups, algorithm, nthreads):
    return x.new_empty(_nested_specs(x.shape, weights, groups)[-1].out_shape)


@torch.library.custom_op(f"{NS}::nested_conv3d_backward", mutates_args=())
def nested_conv3d_backward(grad: Tensor, x: Tensor, weights: List[Tensor], biases: List[Tensor],
                           activation: str, groups: int, need_input: bool,
                           nthreads: int) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
    nthreads = _threads(nthreads)
    from ..ops import nested

    ws = [_np(w) for w in weights]
    specs = _nested_specs(x.shape, ws, groups)
    gx, gws, gbs = nested.backward(_np(x), ws, _biases(biases), activation or None, specs, _np(grad), need_input,
                                   nthreads)
    return (_empty(x) if gx is None else torch.from_numpy(gx), [torch.from_numpy(g) for g in gws],
            [torch.from_numpy(g) for g in gbs])


@nested_conv3d_backward.register_fake
def _(grad, x, weights, biases, activation, groups, need_input, nthreads):
    return (x.new_empty(x.shape) if need_input else _empty(x), [w.new_empty(w.shape) for w in weights],
            [w.new_empty(w.shape[0]) for w in weights])


def _nested_setup(ctx, inputs, output):
    x, weights, biases, ctx.activation, ctx.groups, _, ctx.nthreads = inputs
    ctx.stages = len(weights)
    ctx.has_bias = [b.numel() > 0 for b in biases]
    ctx.save_for_backward(x, *weights, *biases)


def _nested_grad(ctx, grad):
    x, *saved = ctx.saved_tensors
    weights, biases = list(saved[:ctx.stages]), list(saved[ctx.stages:])
    if torch.is_grad_enabled():   # create_graph=True: nested_reference takes the weights and biases as lists
        raise RuntimeError("volconv's nested_conv3d does not support double backward (create_graph=True) while "
                           "torch.compile or torch.export trace it; run the model eagerly for that")
    gx, gws, gbs = nested_conv3d_backward(grad, x, weights, biases, ctx.activation, ctx.groups,
                                          ctx.needs_input_grad[0], ctx.nthreads)
    gbs = [g if has else b.new_empty(0) for g, b, has in zip(gbs, biases, ctx.has_bias)]
    return gx if ctx.needs_input_grad[0] else None, gws, gbs, None, None, None, None


nested_conv3d.register_autograd(_nested_grad, setup_context=_nested_setup)


# ------------------------------------------------------------------------------------------------ dynamic

def _layout(x_shape, k_shape, kernel_size, stride, padding, dilation):
    """padding: the Layout's padding_text ("same", "valid" or "a,b,c")."""
    from ..ops.dynamic import Layout

    pad = padding if padding in ("same", "valid") else tuple(int(p) for p in padding.split(","))
    return Layout(_ints(x_shape), _ints(k_shape), _ints(kernel_size), _ints(stride), pad, _ints(dilation))


@torch.library.custom_op(f"{NS}::dynamic_conv3d", mutates_args=())
def dynamic_conv3d(x: Tensor, kernels: Tensor, kernel_size: List[int], stride: List[int], padding: str,
                   dilation: List[int], nthreads: int) -> Tensor:
    nthreads = _threads(nthreads)
    from ..ops import dynamic

    layout = _layout(x.shape, kernels.shape, kernel_size, stride, padding, dilation)
    return torch.from_numpy(dynamic.forward(_np(x), _np(kernels), layout, nthreads))


@dynamic_conv3d.register_fake
def _(x, kernels, kernel_size, stride, padding, dilation, nthreads):
    return x.new_empty(_layout(x.shape, kernels.shape, kernel_size, stride, padding, dilation).out_shape)


@torch.library.custom_op(f"{NS}::dynamic_conv3d_backward", mutates_args=())
def dynamic_conv3d_backward(grad: Tensor, x: Tensor, kernels: Tensor, kernel_size: List[int], stride: List[int],
                            padding: str, dilation: List[int], need_input: bool, need_kernels: bool,
                            nthreads: int) -> Tuple[Tensor, Tensor]:
    nthreads = _threads(nthreads)
    from ..ops import dynamic

    layout = _layout(x.shape, kernels.shape, kernel_size, stride, padding, dilation)
    gx, gK = dynamic.backward(_np(x), _np(kernels), _np(grad), layout, (need_input, need_kernels), nthreads)
    return (_empty(x) if gx is None else torch.from_numpy(gx), _empty(kernels) if gK is None else torch.from_numpy(gK))


@dynamic_conv3d_backward.register_fake
def _(grad, x, kernels, kernel_size, stride, padding, dilation, need_input, need_kernels, nthreads):
    return (x.new_empty(x.shape) if need_input else _empty(x),
            kernels.new_empty(kernels.shape) if need_kernels else _empty(kernels))


def _dynamic_setup(ctx, inputs, output):
    x, kernels, *ctx.args = inputs
    ctx.save_for_backward(x, kernels)


def _dynamic_grad(ctx, grad):
    x, kernels = ctx.saved_tensors
    kernel_size, stride, padding, dilation, nthreads = ctx.args
    if torch.is_grad_enabled():   # create_graph=True
        layout = _layout(x.shape, kernels.shape, kernel_size, stride, padding, dilation)
        return reference_grads(ctx.needs_input_grad, grad, lambda x, K, *_: dynamic_reference(x, K, layout),
                               (x, kernels) + (None,) * 5)
    need = ctx.needs_input_grad[:2]
    gx, gK = dynamic_conv3d_backward(grad, x, kernels, kernel_size, stride, padding, dilation, need[0], need[1],
                                     nthreads)
    return (gx if need[0] else None, gK if need[1] else None) + (None,) * 5


dynamic_conv3d.register_autograd(_dynamic_grad, setup_context=_dynamic_setup)


# ------------------------------------------------------------------------------------- entry points while tracing

def _float(t):
    return t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)


def traced_conv3d(input, weight, bias, stride, padding, dilation, groups, padding_mode, algorithm, workers):
    """vc.conv3d while tracing: the checked geometry, then the custom operator."""
    spec = dense.conv_spec(tuple(input.shape), tuple(weight.shape), bias, stride, padding, dilation, groups,
                           padding_mode)
    x = _float(input)
    out = conv3d(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), *spec_args(spec),
                 dense.resolve_algorithm(algorithm), threads_arg(workers))
    return out.to(input.dtype)
