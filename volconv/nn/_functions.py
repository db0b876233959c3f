"""torch.autograd Functions over volconv's kernels. Forward and backward both run volconv code (ops/dense.py):
the input gradient is a transposed convolution, the weight gradient a correlation of input and output
gradient, so training uses the same kernels as inference.

Double backward (create_graph=True: gradient penalties, Hessian-vector products) needs a gradient that is itself
differentiable. volconv's backward kernels are not (they are numpy code), so with create_graph=True every
Function here takes its gradients from its op written in torch's differentiable operations instead (`reference`
below: the same numbers to rounding, at torch's speed); the ordinary backward keeps volconv's kernels."""
import functools

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from .._dispatch import Caller, compiling
from .._validate import pad_index, workers as resolve_workers
from ..ops import dense


# ------------------------------------------------------------------------------------------- double backward


def padded(x, spec):
    """x padded (negative pads: cropped) by spec.pads in spec's boundary mode, by differentiable indexing."""
    for axis, (n, (lo, hi)) in enumerate(zip(x.shape[2:], spec.pads), start=2):
        idx = torch.from_numpy(pad_index(n, lo, hi, spec.mode))
        x = x.index_select(axis, idx.clamp(min=0))
        if spec.mode == "constant":
            outside = (idx < 0).reshape([-1 if a == axis else 1 for a in range(x.dim())])
            x = x.masked_fill(outside, spec.cval)
    return x


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


def _conv_reference(ctx):
    x, w, b = ctx.saved_tensors
    return lambda x, w, b, *_: reference_conv(x, w, b, ctx.spec), (x, w, b, None, None, None)


class Conv3dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, spec, algorithm, nthreads):
        ctx.spec, ctx.algorithm, ctx.nthreads = spec, algorithm, nthreads
        ctx.has_bias = b is not None
        ctx.save_for_backward(x, w, b)
        out = dense.run(x.numpy(), w.numpy(), None if b is None else b.numpy(), spec, algorithm, nthreads,
                        allow_torch=False)
        return torch.from_numpy(out)

    @staticmethod
    @twice_differentiable(_conv_reference)
    def backward(ctx, grad):
        x, w, _ = ctx.saved_tensors
        gx, gw, gb = conv_backward(ctx, grad, x.numpy(), w.numpy(), ctx.algorithm)
        return gx, None if gw is None else torch.from_numpy(gw), gb, None, None, None


def conv_backward(ctx, grad, x, w, algorithm):
    """(input, weight, bias) gradients of a convolution by volconv's kernels, for the inputs that need one
    (ctx.needs_input_grad: input, weight, bias first). The weight gradient stays numpy (the sparse Function
    gathers its pattern from it)."""
    g = grad.contiguous().numpy()
    gx = gw = gb = None
    if ctx.needs_input_grad[0]:
        gx = torch.from_numpy(dense.backward_input(g, w, ctx.spec, algorithm, ctx.nthreads))
    if ctx.needs_input_grad[1]:
        gw = dense.backward_weight(x, g, ctx.spec, ctx.nthreads, algorithm)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        gb = grad.sum(dim=(0, 2, 3, 4))
    return gx, gw, gb


def tensor(a, like=None):
    """a as a torch tensor (numpy operands of a differentiable call join the autograd graph as constants)."""
    if isinstance(a, torch.Tensor):
        return a
    t = torch.as_tensor(a)
    return t if like is None else t.to(like.dtype)


def conv_autograd(x, w, b, spec, algorithm, workers):
    """Differentiable convolution of tensors by volconv's kernels (or by torch's, when "auto" hands the call
    to oneDNN). Computed in float32/float64, returned in the input's dtype."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, w = x.to(dtype).contiguous(), w.to(dtype).contiguous()
    b = None if b is None else b.to(dtype).contiguous()
    if compiling():   # traced: the custom operator (its "auto" decides inside, on the real arrays)
        from . import _library

        return _library.conv3d(x, w, b, *_library.spec_args(spec), dense.resolve_algorithm(algorithm),
                               _library.threads_arg(workers))
    algorithm, nthreads = dense.resolve_algorithm(algorithm), resolve_workers(workers)
    torch_reachable = spec.mode in dense.TORCH_PAD_MODES and spec.cval == 0
    if algorithm == "auto":
        algorithm = dense.choose_algorithm(x.detach().numpy(), spec, nthreads, w=w.detach().numpy(),
                                           allow_torch=torch_reachable, backward=True)
    if algorithm == "torch" and torch_reachable:
        out = dense.torch_conv3d_tensors(x, w, b, spec)
    else:
        out = Conv3dFunction.apply(x, w, b, spec, "auto" if algorithm == "torch" else algorithm, nthreads)
    return out


def conv3d_autograd(input, weight, bias, stride, padding, dilation, groups, padding_mode, algorithm, workers):
    """vc.conv3d on torch tensors that need gradients."""
    Caller("conv3d", [input, weight, bias], ["input", "weight", "bias"])  # devices and dtypes checked
    spec = dense.conv_spec(tuple(input.shape), tuple(weight.shape), bias, stride, padding, dilation, groups,
                           padding_mode)
    for t, name in ((weight, "weight"), (bias, "bias")):
        if t is not None and t.dtype != input.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but input has dtype {input.dtype}; they must match")
    out = conv_autograd(tensor(input), tensor(weight, like=input),
                        None if bias is None else tensor(bias, like=input), spec, algorithm, workers)
    return out.to(input.dtype)


def sparse_reference(x, values, b, indices, shape, spec):
    """vc.sparse_conv3d in torch operations (differentiable to any order): the dense weight its values fill."""
    idx = tuple(torch.as_tensor(np.asarray(indices)).T)
    return reference_conv(x, values.new_zeros(tuple(shape)).index_put(idx, values), b, spec)


def _sparse_reference(ctx):
    return (lambda x, values, b, *_: sparse_reference(x, values, b, ctx.indices, ctx.shape, ctx.spec),
            tuple(ctx.saved_tensors) + (None,) * 4)


class SparseConv3dFunction(torch.autograd.Function):
    """Forward by the sparse kernel; backward through the dense weight the values fill (volconv's transposed
    convolution for the input, its weight-gradient kernel gathered at the pattern for the values): exact, but
    its cost is the dense kernel's."""

    @staticmethod
    def forward(ctx, x, values, b, indices, shape, spec, nthreads):
        from ..ops.sparse import run_sparse

        ctx.indices, ctx.shape, ctx.spec, ctx.nthreads = indices, shape, spec, nthreads
        ctx.has_bias = b is not None
        ctx.save_for_backward(x, values, b)
        out = run_sparse(x.numpy(), indices, values.numpy(), None if b is None else b.numpy(), spec, nthreads)
        return torch.from_numpy(out)

    @staticmethod
    @twice_differentiable(_sparse_reference)
    def backward(ctx, grad):
        x, values, _ = ctx.saved_tensors
        from ..ops.sparse import dense_weight

        gx, gw, gb = conv_backward(ctx, grad, x.numpy(), dense_weight(ctx.indices, values.numpy(), ctx.shape),
                                   "auto")
        gv = None if gw is None else torch.from_numpy(np.ascontiguousarray(gw[tuple(ctx.indices.T)]))
        return gx, gv, gb, None, None, None, None


def sparse_autograd(input, indices, values, shape, bias, stride, padding, dilation, groups, padding_mode,
                    workers):
    """vc.sparse_conv3d on torch tensors that need gradients (input, bias, or the values)."""
    if not compiling():
        Caller("sparse_conv3d", [input, bias], ["input", "bias"])  # devices and dtypes checked
    spec = dense.conv_spec(tuple(input.shape), tuple(shape), bias, stride, padding, dilation, groups,
                           padding_mode)
    dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    x = tensor(input).to(dtype).contiguous()
    if isinstance(values, torch.Tensor) and values.is_sparse:   # the sparse weight itself: its coalesced values
        v = values.coalesce().values().to(dtype)
    elif isinstance(values, torch.Tensor):
        v = values.to(dtype).contiguous()
    else:
        v = torch.as_tensor(np.asarray(values), dtype=dtype)
    b = None if bias is None else tensor(bias, like=x).to(dtype).contiguous()
    if compiling():
        from . import _library

        stride_, pads, dilation_, groups_, mode, _ = _library.spec_args(spec)
        idx = indices if isinstance(indices, torch.Tensor) else torch.as_tensor(np.asarray(indices))
        out = _library.sparse_conv3d(x, v, b, idx, list(shape), stride_, pads,
                                     dilation_, groups_, mode, _library.threads_arg(workers))
    else:
        out = SparseConv3dFunction.apply(x, v, b, indices, shape, spec, resolve_workers(workers))
    return out.to(input.dtype)


def separable_reference(z, fd, fh, fw, spec):
    """The depthwise convolution with rank-1 components (fd[r], fh[r], fw[r]) in torch operations: the
    components' depthwise weight, built."""
    return reference_conv(z, torch.einsum("ra,rb,re->rabe", fd, fh, fw)[:, None], None, spec)


def _separable_reference(ctx):
    return (lambda z, fd, fh, fw, *_: separable_reference(z, fd, fh, fw, ctx.spec),
            tuple(ctx.saved_tensors) + (None, None))


class SeparableFunction(torch.autograd.Function):
    """Depthwise convolution with rank-1 kernels (component r: the outer product of fd[r], fh[r], fw[r]), by
    the fused separable kernel forward and backward: the input gradient is a separable pass with the reversed
    factors (at stride 1; the dense depthwise transposed convolution otherwise), each factor's gradient a 1-D
    weight gradient after the other two factors' passes."""

    @staticmethod
    def forward(ctx, z, fd, fh, fw, spec, nthreads):
        from ..ops.decomposed import separable_conv3d

        ctx.spec, ctx.nthreads = spec, nthreads
        ctx.save_for_backward(z, fd, fh, fw)
        return torch.from_numpy(separable_conv3d(z.numpy(), fd.numpy(), fh.numpy(), fw.numpy(), spec, nthreads))

    @staticmethod
    @twice_differentiable(_separable_reference)
    def backward(ctx, grad):
        z, *factors = ctx.saved_tensors
        need = ctx.needs_input_grad
        gz, gd, gh, gw = separable_grads(z.numpy(), grad.contiguous().numpy(), *(f.numpy() for f in factors),
                                         ctx.spec, ctx.nthreads, need[0], any(need[1:4]))
        as_t = lambda a: None if a is None else torch.from_numpy(a)  # noqa: E731
        return as_t(gz), as_t(gd), as_t(gh), as_t(gw), None, None


def separable_grads(z, g, fd, fh, fw, spec, nthreads, need_input, need_factors):
    """(input, fd, fh, fw) gradients of the separable depthwise pass, numpy (None where not needed): the input
    gradient a separable pass with the reversed factors (at stride 1; the dense depthwise weight's transposed
    convolution otherwise), each factor's a 1-D weight gradient."""
    from ..ops import decomposed

    gz = gd = gh = gw = None
    if need_input:
        gz = decomposed.separable_backward_input(g, fd, fh, fw, spec, nthreads)
        if gz is None:   # strided
            W = np.einsum("ra,rb,re->rabe", fd, fh, fw)[:, None].astype(g.dtype)
            gz = dense.backward_input(g, W, spec, "auto", nthreads)
    if need_factors:
        gd, gh, gw = (np.ascontiguousarray(t) for t in
                      decomposed.separable_backward_factors(z, g, fd, fh, fw, spec, nthreads))
    return gz, gd, gh, gw


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
    """w (O, C) applied to the channels of x (N, C, ...), into a fresh numpy-allocated tensor."""
    x = x.contiguous()
    out = torch.from_numpy(np.empty((x.shape[0], w.shape[0]) + tuple(x.shape[2:]), x.numpy().dtype))
    X, Y = x.flatten(2), out.flatten(2)
    for n in range(x.shape[0]):
        torch.mm(w, X[n], out=Y[n])
    if b is not None:
        out.add_(b.reshape((1, -1) + (1,) * (x.dim() - 2)))
    return out


def factored_autograd(input, bias, stride, padding, dilation, padding_mode, workers, in_f, out_f, spatial, core,
                      w_shape):
    """vc.cp_conv3d / vc.tucker_conv3d on tensors that need gradients (the input, the bias, or factors given
    as tensors, as vc.nn.CPConv3d and TuckerConv3d do): projections by torch, the spatial part by volconv."""
    from ..ops.decomposed import ConvSpec

    traced = compiling()
    if not traced:
        Caller("conv3d", [input, bias], ["input", "bias"])
    spec = dense.conv_spec(tuple(input.shape), tuple(w_shape), bias, stride, padding, dilation, 1, padding_mode)
    dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    x = tensor(input).to(dtype)
    as_t = lambda a: (a if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))).to(dtype)  # noqa: E731
    if traced:   # torch.compile / export: plain torch projections, the spatial part as custom operators
        from . import _library

        nthreads = _library.threads_arg(workers)
    else:
        nthreads = resolve_workers(workers)
    z = torch.einsum("cr,ncdhw->nrdhw", as_t(in_f), x) if traced else ProjectFunction.apply(x, as_t(in_f).T, None)
    if spatial is not None:
        fd, fh, fw = (as_t(f).contiguous() for f in spatial)
        R = z.shape[1]
        sspec = ConvSpec(tuple(z.shape), (R, 1) + tuple(w_shape[2:]), stride=spec.stride, pads=spec.pads,
                         dilation=spec.dilation, groups=R, mode=spec.mode)
        if traced:
            stride_, pads, dilation_, _, mode, _ = _library.spec_args(sspec)
            u = _library.separable_conv3d(z.contiguous(), fd, fh, fw, stride_, pads, dilation_, mode, nthreads)
        else:
            u = SeparableFunction.apply(z, fd, fh, fw, sspec, nthreads)
    else:
        c = as_t(core).contiguous()
        cspec = ConvSpec(tuple(z.shape), tuple(c.shape), stride=spec.stride, pads=spec.pads, dilation=spec.dilation,
                         groups=1, mode=spec.mode)
        if traced:
            u = _library.conv3d(z.contiguous(), c, None, *_library.spec_args(cspec), "direct", nthreads)
        else:
            u = conv_autograd(z, c, None, cspec, "direct", nthreads)   # oneDNN's 3-D backward is slower here
    b = None if bias is None else tensor(bias).to(dtype)
    if traced:
        out = torch.einsum("or,nrdhw->nodhw", as_t(out_f), u)
        return (out if b is None else out + b.reshape(1, -1, 1, 1, 1)).to(input.dtype)
    return ProjectFunction.apply(u, as_t(out_f), b).to(input.dtype)


TORCH_ACTIVATIONS = {"relu": torch.relu, "gelu": torch.nn.functional.gelu, "silu": torch.nn.functional.silu}


def _nested_reference(ctx):
    act, specs = ctx.config[:2]
    L = len(specs)

    def forward(_, x, *params):
        for i, (w, b, spec) in enumerate(zip(params[:L], params[L:], specs)):
            x = reference_conv(x, w, b, spec)
            if act is not None and i + 1 < L:
                x = TORCH_ACTIVATIONS[act](x)
        return x
    return forward, (None,) + tuple(ctx.saved_tensors)


class NestedFunction(torch.autograd.Function):
    """vc.nested_conv3d with autograd: forward by the chosen algorithm (nothing stored but the input and the
    parameters), backward by ops/nested.backward (the intermediates recomputed slab by slab)."""

    @staticmethod
    def forward(ctx, config, x, *params):
        from ..ops import nested

        act, specs, algorithm, nthreads = config
        L = len(specs)
        ws = [w.numpy() for w in params[:L]]
        bs = [None if b is None else b.numpy() for b in params[L:]]
        ctx.config = config
        ctx.save_for_backward(x, *params)
        return torch.from_numpy(nested.run(x.numpy(), ws, bs, act, specs, algorithm, nthreads))

    @staticmethod
    @twice_differentiable(_nested_reference)
    def backward(ctx, grad):
        from ..ops import nested

        act, specs, _, nthreads = ctx.config
        L = len(specs)
        x, *params = ctx.saved_tensors
        ws = [w.numpy() for w in params[:L]]
        bs = [None if b is None else b.numpy() for b in params[L:]]
        gx, gws, gbs = nested.backward(x.numpy(), ws, bs, act, specs, grad.contiguous().numpy(),
                                       ctx.needs_input_grad[1], nthreads)
        as_t = lambda a, needed: torch.from_numpy(a) if needed else None  # noqa: E731
        need = ctx.needs_input_grad[2:]
        return (None, None if gx is None else torch.from_numpy(gx),
                *(as_t(g, n) for g, n in zip(gws, need[:L])),
                *(as_t(g, n and b is not None) for g, b, n in zip(gbs, bs, need[L:])))


def nested_autograd(input, weights, biases, activation, groups, algorithm, workers):
    """vc.nested_conv3d on tensors that need gradients. Computed in float32/float64, returned in the input's
    dtype."""
    from ..ops import nested

    if algorithm == "composed":
        raise ValueError("algorithm='composed' is for inference (it differs from the chain near the border); "
                         "use 'auto', 'fused' or 'stages' with gradients")
    if not compiling():
        Caller("nested_conv3d", [input], ["input"])
    dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    x = tensor(input).to(dtype).contiguous()
    ws = [tensor(w).to(dtype).contiguous() for w in weights]
    bs = [None if b is None else tensor(b).to(dtype).contiguous() for b in biases]
    specs = nested.stage_specs(tuple(x.shape), ws, groups)
    nested.check_biases(bs, specs)
    if compiling():
        from . import _library

        if algorithm == "composed":
            raise ValueError("algorithm='composed' is for inference; use 'auto', 'fused' or 'stages' when tracing")
        out = _library.nested_conv3d(x, ws, _library.nested_biases(bs, x), activation or "", groups, algorithm,
                                     _library.threads_arg(workers))
    else:
        out = NestedFunction.apply((activation, specs, algorithm, resolve_workers(workers)), x, *ws, *bs)
    return out.to(input.dtype)


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


class DynamicConv3dFunction(torch.autograd.Function):
    """vc.dynamic_conv3d with autograd: both gradients by volconv's per-voxel kernels."""

    @staticmethod
    def forward(ctx, x, K, layout, nthreads):
        from ..ops import dynamic

        ctx.layout, ctx.nthreads = layout, nthreads
        ctx.save_for_backward(x, K)
        return torch.from_numpy(dynamic.forward(x.numpy(), K.numpy(), layout, nthreads))

    @staticmethod
    @twice_differentiable(lambda ctx: (lambda x, K, *_: dynamic_reference(x, K, ctx.layout),
                                       tuple(ctx.saved_tensors) + (None, None)))
    def backward(ctx, grad):
        from ..ops import dynamic

        x, K = ctx.saved_tensors
        gx, gK = dynamic.backward(x.numpy(), K.numpy(), grad.contiguous().numpy(), ctx.layout,
                                  ctx.needs_input_grad[:2], ctx.nthreads)
        return (None if gx is None else torch.from_numpy(gx), None if gK is None else torch.from_numpy(gK), None,
                None)


def traced_dynamic(input, kernels, kernel_size, stride, padding, dilation, workers):
    """vc.dynamic_conv3d while torch.compile / export trace: the custom operator, which checks the geometry."""
    from .._validate import triple
    from . import _library

    dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    text = padding if isinstance(padding, str) else ",".join(map(str, triple(padding, "padding")))
    return _library.dynamic_conv3d(input.to(dtype), kernels.to(dtype), list(triple(kernel_size, "kernel_size")),
                                   list(triple(stride, "stride")), text, list(triple(dilation, "dilation")),
                                   _library.threads_arg(workers)).to(input.dtype)


def dynamic_autograd(input, kernels, layout, nthreads):
    """vc.dynamic_conv3d on tensors that need gradients, computed in float32/float64, returned in the input's
    dtype."""
    Caller("dynamic_conv3d", [input, kernels], ["input", "kernels"])
    dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    x = tensor(input).to(dtype).contiguous()
    K = tensor(kernels).to(dtype).contiguous()
    return DynamicConv3dFunction.apply(x, K, layout, nthreads).to(input.dtype)
