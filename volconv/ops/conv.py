"""vc.conv3d: 3D convolution with torch.nn.functional.conv3d's semantics, for every kind of weight (dense, sparse,
CP / Tucker, a kernel object applied to every channel): checked here, then run by the engine (numpy arrays and
tensors that need nothing else) or by the torch adapter (gradients, a GPU, tracing)."""
import numpy as np

from .. import _cuda
from .._dispatch import Caller, check_tensors, compiling, is_tensor, torch_batching, wants_autograd
from .._validate import conv_spec, five_d, workers as resolve_workers
from ..engine import dense, separable
from ..kernels import Kernel, SeparableKernel
from . import lowrank, sparse


@torch_batching()
def conv3d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, padding_mode="zeros",
           algorithm="auto", workers=None):
    """3D convolution with the semantics of ``torch.nn.functional.conv3d`` (cross-correlation, NCDHW).

    input: (N, C, D, H, W) numpy array or torch tensor, or unbatched (C, D, H, W) as in torch (so for every op
    and layer: _dispatch.torch_batching; an empty batch N = 0 gives an empty result); weight:
    (O, C // groups, kd, kh, kw); bias: (O,).
    padding: int, triple, "same" or "valid"; padding_mode: "zeros", "reflect", "replicate" or "circular" (as
    torch.nn.Conv3d: the input is padded in that mode, then convolved without padding).
    algorithm: "auto" (cost model), "direct", "fft", "sparse" (the weight's non-zeros only: engine/sparse.py;
    "auto" chooses it for a mostly-zero weight when it is the cheapest) or "torch" (torch's own kernel; "auto"
    may choose it for channel-mixing layers when torch is already imported). workers: threads (None: all OpenMP
    allows; -1: all cores). float32 and float64; torch float16/bfloat16 are computed in float32. Returns the
    caller's type, dtype and device; differentiable on torch tensors (backward by volconv's own kernels; with
    create_graph=True, by torch's differentiable conv3d, so gradient penalties work). NaN and Inf
    propagate as in torch (algorithm="fft" spreads them over the whole output). CUDA tensors run on the GPU by
    the CUDA plugin (`workers` does not apply there; `algorithm` chooses among the plugin's kernels, cuDNN
    ("torch") and torch.fft ("fft"): volconv/_torch/cuda_dense.py)."""
    if getattr(weight, "ndim", None) == 5 and type(weight).__name__ in ("CPKernel", "TuckerKernel"):
        run_factored = lowrank.cp_conv3d if type(weight).__name__ == "CPKernel" else lowrank.tucker_conv3d
        if groups != 1:
            raise ValueError(f"a {type(weight).__name__} weight runs with groups=1, got groups={groups}")
        return run_factored(input, weight, bias, stride, padding, dilation, padding_mode=padding_mode,
                            workers=workers)
    if isinstance(weight, sparse.SparseKernel) or (is_tensor(weight) and weight.is_sparse):
        return sparse.sparse_conv3d(input, weight, bias, stride, padding, dilation, groups,
                                    padding_mode=padding_mode, workers=workers)
    if isinstance(weight, Kernel):
        return _kernel_conv3d(input, weight, bias, stride, padding, dilation, padding_mode, algorithm, workers)
    if _cuda.is_cuda(input) or wants_autograd(input, weight, bias):
        return _tensor_conv3d(input, weight, bias, stride, padding, dilation, groups, padding_mode, algorithm,
                              workers)
    caller = Caller("conv3d", [input, weight, bias], ["input", "weight", "bias"])
    x, w, b = caller.arrays
    spec = conv_spec(x.shape, w.shape, b, stride, padding, dilation, groups, padding_mode)
    x = caller.cast(x, "input")
    w = caller.cast(w, "weight", same_dtype=True)
    b = caller.cast(b, "bias", same_dtype=True)
    out = dense.run(x, w, b, spec, dense.resolve_algorithm(algorithm), resolve_workers(workers))
    return caller.result(out)


def _tensor_conv3d(input, weight, bias, stride, padding, dilation, groups, padding_mode, algorithm, workers):
    """conv3d by the torch adapter (tensors that need gradients, are on a GPU or are traced)."""
    from .._torch import conv
    from .._torch.common import tensor

    if not compiling():
        check_tensors("conv3d", [input, weight, bias], ["input", "weight", "bias"], cuda=True)
    spec = conv_spec(tuple(input.shape), tuple(weight.shape), bias, stride, padding, dilation, groups, padding_mode)
    x = tensor(input)
    return conv.conv3d(x, tensor(weight, like=x), None if bias is None else tensor(bias, like=x), spec,
                       dense.resolve_algorithm(algorithm), workers)


def _kernel_conv3d(input, kernel, bias, stride, padding, dilation, padding_mode, algorithm, workers):
    """conv3d with a kernel object (vc.kernels): the kernel applied to every channel (depthwise), separable
    kernels by 1-D passes."""
    C = five_d(input)[1]
    kernel = as_separable(kernel)
    if isinstance(kernel, SeparableKernel) and _cuda.is_cuda(input):   # the plugin's separable passes
        from .._torch.lowrank import separable_kernel_conv3d

        check_tensors("conv3d", [input, bias], ["input", "bias"], cuda=True)
        spec = conv_spec(tuple(input.shape), (C, 1) + tuple(kernel.shape), bias, stride, padding, dilation, C,
                         padding_mode)
        out = separable_kernel_conv3d(input, kernel, spec, workers)
        return out if bias is None else out + bias.to(out.dtype).reshape(1, -1, 1, 1, 1)
    if not isinstance(kernel, SeparableKernel) or _cuda.is_cuda(input) or wants_autograd(input, bias):
        dense_k = kernel.to_dense()
        weight = np.ascontiguousarray(np.broadcast_to(dense_k, (C, 1) + dense_k.shape))
        if is_tensor(input):
            from .._torch.common import tensor

            weight = tensor(weight, like=input)
        else:
            weight = weight.astype(input.dtype if input.dtype.kind == "f" else np.float64)
        return conv3d(input, weight, bias, stride, padding, dilation, C, padding_mode=padding_mode,
                      algorithm=algorithm, workers=workers)
    caller = Caller("conv3d", [input, bias], ["input", "bias"])
    x, b = caller.arrays
    spec = conv_spec(x.shape, (C, 1) + tuple(kernel.shape), b, stride, padding, dilation, C, padding_mode)
    x = caller.cast(x, "input")
    out = separable.run_separable(x, kernel, spec, dense.resolve_algorithm(algorithm), resolve_workers(workers))
    if b is not None:
        out += caller.cast(b, "bias", same_dtype=True).reshape(1, -1, 1, 1, 1)
    return caller.result(out)


def as_separable(kernel):
    """A CP decomposition of a single 3-D kernel is a sum of separable terms: run it as one."""
    return kernel.to_separable() if hasattr(kernel, "to_separable") and kernel.ndim == 3 else kernel
