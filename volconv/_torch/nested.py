"""nested_conv3d on tensors: the volconv::nested_conv3d operator (forward by the chosen algorithm, nothing stored
but the input and the parameters; backward recomputing the intermediates slab by slab; on the CPU engine, or
for CUDA tensors on the plugin: cuda_nested) and the front doors' entry. Its weights and biases are lists, which
an autograd.Function cannot see into: the eager binding takes them flattened, so the one formula (_grads) is
bound here by hand rather than by op.Op."""
from typing import List, Tuple

import torch
from torch import Tensor

from .. import _cuda
from ..engine import nested
from . import cuda_nested
from .common import compiling, compute_dtype, empty, numpy, operand, threads, threads_arg
from .reference import nested_reference, reference_grads


def _specs(x, weights, groups):
    return nested.stage_specs(tuple(int(n) for n in x.shape), weights, int(groups))


def _biases(biases):
    """The operator's bias list (an empty tensor for a stage without one) as the engine's (None there)."""
    return [None if b.numel() == 0 else numpy(b) for b in biases]


def _forward(x: Tensor, weights: List[Tensor], biases: List[Tensor], activation: str, groups: int,
             algorithm: str, nthreads: int) -> Tensor:
    if _cuda.is_cuda(x):
        return cuda_nested.nested_forward(x, weights, biases, activation, _specs(x, weights, groups), algorithm)
    ws = [numpy(w) for w in weights]
    return torch.from_numpy(nested.run(numpy(x), ws, _biases(biases), activation or None, _specs(x, ws, groups),
                                       algorithm, threads(nthreads)))


def _backward(grad: Tensor, x: Tensor, weights: List[Tensor], biases: List[Tensor], activation: str, groups: int,
              need_input: bool, nthreads: int) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
    if _cuda.is_cuda(x):
        gx, gws, gbs = cuda_nested.nested_backward(x, weights, biases, activation, _specs(x, weights, groups), grad,
                                                   need_input)
        return empty(x) if gx is None else gx, gws, gbs
    ws = [numpy(w) for w in weights]
    gx, gws, gbs = nested.backward(numpy(x), ws, _biases(biases), activation or None, _specs(x, ws, groups),
                                   numpy(grad), need_input, threads(nthreads))
    return (empty(x) if gx is None else torch.from_numpy(gx), [torch.from_numpy(g) for g in gws],
            [torch.from_numpy(g) for g in gbs])


def _grads(ctx, grad, kernel, needs):
    """(input gradient, weight gradients, bias gradients) by volconv's kernels, or with create_graph=True by
    the chain in torch operations (needs: the flat needs of (x, *weights, *biases))."""
    x, *saved = ctx.saved_tensors
    weights, biases = saved[:ctx.stages], saved[ctx.stages:]
    if torch.is_grad_enabled():
        if ctx.traced:   # the operator's inputs are lists, which reference_grads cannot differentiate
            raise RuntimeError("volconv's nested_conv3d does not support double backward (create_graph=True) while "
                               "torch.compile or torch.export trace it; run the model eagerly for that")
        specs = _specs(x, weights, ctx.groups)
        L = ctx.stages
        forward = lambda x, *p: nested_reference(x, p[:L], [b if has else None for b, has in  # noqa: E731
                                                            zip(p[L:], ctx.has_bias)], ctx.activation, specs)
        gx, *rest = reference_grads(needs, grad, forward, (x, *weights, *biases))
        return gx, rest[:L], rest[L:]
    gx, gws, gbs = kernel(grad, x, list(weights), list(biases), ctx.activation, ctx.groups, needs[0], ctx.nthreads)
    gbs = [g if has else b.new_empty(0) for g, b, has in zip(gbs, biases, ctx.has_bias)]
    return gx if needs[0] else None, gws, gbs


def _setup(ctx, x, weights, biases, activation, groups, nthreads, traced):
    ctx.activation, ctx.groups, ctx.nthreads, ctx.traced = activation, groups, nthreads, traced
    ctx.stages = len(weights)
    ctx.has_bias = [b.numel() > 0 for b in biases]
    ctx.save_for_backward(x, *weights, *biases)


# ------------------------------------------------------------------------------ the operator (traced calls)

_op = torch.library.custom_op("volconv::nested_conv3d", mutates_args=())(_forward)
_op_backward = torch.library.custom_op("volconv::nested_conv3d_backward", mutates_args=())(_backward)


@_op.register_fake
def _(x, weights, biases, activation, groups, algorithm, nthreads):
    return x.new_empty(_specs(x, weights, groups)[-1].out_shape)


@_op_backward.register_fake
def _(grad, x, weights, biases, activation, groups, need_input, nthreads):
    return (x.new_empty(x.shape) if need_input else empty(x), [w.new_empty(w.shape) for w in weights],
            [w.new_empty(w.shape[0]) for w in weights])


def _traced_setup(ctx, inputs, output):
    x, weights, biases, activation, groups, _, nthreads = inputs
    _setup(ctx, x, weights, biases, activation, groups, nthreads, True)


def _traced_gradient(ctx, grad):
    needs = [ctx.needs_input_grad[0]] + [True] * (2 * ctx.stages)
    return _grads(ctx, grad, _op_backward, needs) + (None,) * 4


_op.register_autograd(_traced_gradient, setup_context=_traced_setup)


# ------------------------------------------------------------------------------ the eager binding

class _Eager(torch.autograd.Function):
    @staticmethod
    def forward(ctx, config, x, *params):
        activation, groups, algorithm, nthreads = config
        L = len(params) // 2
        weights, biases = list(params[:L]), list(params[L:])
        _setup(ctx, x, weights, biases, activation, groups, nthreads, False)
        return _forward(x, weights, biases, activation, groups, algorithm, nthreads)

    @staticmethod
    def backward(ctx, grad):
        gx, gws, gbs = _grads(ctx, grad, _backward, ctx.needs_input_grad[1:])
        return (None, gx, *gws, *gbs)


def nested_conv3d(input, weights, biases, activation, groups, algorithm, workers):
    """The chain on tensors that need gradients, are on a GPU or are traced; checked by the front door. Computed in
    float32 / float64, returned in the input's dtype."""
    dtype = compute_dtype(input)
    x = operand(input, dtype)
    ws = [operand(w, dtype).to(x.device) for w in weights]
    bs = [x.new_empty(0) if b is None else operand(b, dtype).to(x.device) for b in biases]
    nested.check_biases(biases, _specs(x, ws, groups))
    args = (activation or "", groups, algorithm, threads_arg(workers))
    out = _op(x, ws, bs, *args) if compiling() else _Eager.apply(args, x, *ws, *bs)
    return out.to(input.dtype)
