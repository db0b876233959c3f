"""torch.autograd Functions over volconv's kernels. Forward and backward both run volconv code (ops/dense.py):
the input gradient is a transposed convolution, the weight gradient a correlation of input and output
gradient, so training uses the same kernels as inference."""
import numpy as np
import torch
from torch.autograd.function import once_differentiable

from .._dispatch import Caller
from .._validate import workers as resolve_workers
from ..ops import dense

class Conv3dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, spec, algorithm, nthreads):
        ctx.spec, ctx.algorithm, ctx.nthreads = spec, algorithm, nthreads
        ctx.has_bias = b is not None
        ctx.save_for_backward(x, w)
        out = dense.run(x.numpy(), w.numpy(), None if b is None else b.numpy(), spec, algorithm, nthreads,
                        allow_torch=False)
        return torch.from_numpy(out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        g = grad.contiguous().numpy()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.from_numpy(dense.backward_input(g, w.numpy(), ctx.spec, ctx.algorithm, ctx.nthreads))
        if ctx.needs_input_grad[1]:
            gw = torch.from_numpy(dense.backward_weight(x.numpy(), g, ctx.spec, ctx.nthreads, ctx.algorithm))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad.sum(dim=(0, 2, 3, 4))
        return gx, gw, gb, None, None, None


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
    algorithm, nthreads = dense.resolve_algorithm(algorithm), resolve_workers(workers)
    torch_reachable = spec.mode in dense.TORCH_PAD_MODES and spec.cval == 0
    if algorithm == "auto":
        algorithm = dense.choose_algorithm(x.detach().numpy(), spec, nthreads, allow_torch=torch_reachable,
                                              backward=True)
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


class SparseConv3dFunction(torch.autograd.Function):
    """Forward by the sparse kernel; backward through the dense weight the values fill (volconv's transposed
    convolution for the input, its weight-gradient kernel gathered at the pattern for the values): exact, but
    its cost is the dense kernel's."""

    @staticmethod
    def forward(ctx, x, values, b, indices, shape, spec, nthreads):
        from ..ops.sparse import run_sparse

        ctx.indices, ctx.shape, ctx.spec, ctx.nthreads = indices, shape, spec, nthreads
        ctx.has_bias = b is not None
        ctx.save_for_backward(x, values)
        out = run_sparse(x.numpy(), indices, values.numpy(), None if b is None else b.numpy(), spec, nthreads)
        return torch.from_numpy(out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, values = ctx.saved_tensors
        g = grad.contiguous().numpy()
        gx = gv = gb = None
        if ctx.needs_input_grad[0]:
            w = np.zeros(ctx.shape, g.dtype)
            w[tuple(ctx.indices.T)] = values.numpy()
            gx = torch.from_numpy(dense.backward_input(g, w, ctx.spec, "auto", ctx.nthreads))
        if ctx.needs_input_grad[1]:
            gw = dense.backward_weight(x.numpy(), g, ctx.spec, ctx.nthreads)
            gv = torch.from_numpy(np.ascontiguousarray(gw[tuple(ctx.indices.T)]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad.sum(dim=(0, 2, 3, 4))
        return gx, gv, gb, None, None, None, None


def sparse_autograd(input, indices, values, shape, bias, stride, padding, dilation, groups, padding_mode,
                    workers):
    """vc.sparse_conv3d on torch tensors that need gradients (input, bias, or the values)."""
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
    out = SparseConv3dFunction.apply(x, v, b, indices, shape, spec, resolve_workers(workers))
    return out.to(input.dtype)
