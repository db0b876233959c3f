"""vc.cp_conv3d / vc.tucker_conv3d: convolution with a CP or Tucker weight (vc.decompose), executed factor by
factor and never rebuilt densely: a channel projection, the spatial part (separable components or a small dense
core) and a projection into the output channels."""
import numpy as np

from .. import _cuda
from .._dispatch import Caller, check_tensors, compiling, torch_batching, wants_autograd
from .._validate import ConvSpec, conv_spec, five_d, workers as resolve_workers
from ..engine import dense
from ..engine.separable import project, separable_conv3d

# ------------------------------------------------------------------------------------- CP and Tucker weights


@torch_batching()
def cp_conv3d(input, cp, bias=None, stride=1, padding=0, dilation=1, *, padding_mode="zeros", workers=None):
    """3D convolution (torch.nn.functional.conv3d semantics) with a CP weight (vc.decompose.cp, vc.CPKernel):
    W[o, c, a, b, e] = sum_r weights[r] A[o, r] B[c, r] D[a, r] H[b, r] E[e, r], executed factor by factor and
    never rebuilt: the input channels are projected on the R components (one matrix product), each component
    is filtered by its three 1-D factors in one fused pass (the separable kernel, with the layer's stride,
    dilation and padding), and the components are combined into the output channels. A CP of a single 3-D
    kernel acts as a (1, 1, kd, kh, kw) weight. Differentiable on torch tensors; CUDA tensors run on the GPU
    (the separable pass by the CUDA plugin, the projections by cuBLAS through torch)."""
    from ..decompose import CPKernel

    if not isinstance(cp, CPKernel):
        raise TypeError(f"cp must be a vc.CPKernel (vc.decompose.cp), got {type(cp).__name__}")
    out_f, in_f, fd, fh, fw = _cp_factors(cp)
    return factored_conv3d("cp_conv3d", input, bias, stride, padding, dilation, padding_mode, workers,
                     in_f, out_f, (fd, fh, fw), None, (out_f.shape[0], in_f.shape[0]) + cp.shape[-3:])


@torch_batching()
def tucker_conv3d(input, tk, bias=None, stride=1, padding=0, dilation=1, *, padding_mode="zeros", workers=None):
    """3D convolution with a Tucker weight (vc.decompose.tucker, vc.TuckerKernel): W = core x_0 U_out x_1 U_in
    x_2 U_d x_3 U_h x_4 U_w (a mode whose factor is None is kept in the core). Executed as: the input channels
    projected on the Rin input ranks, a small dense convolution Rin -> Rout with the core (its spatial modes
    expanded by their factors: a (Rout, Rin, kd, kh, kw) kernel, never the Cout x Cin one), and the Rout
    results combined into the output channels. A Tucker of a single 3-D kernel acts as a (1, 1, ...) weight.
    CUDA tensors run on the GPU (the core by the CUDA plugin's conv3d, the projections by cuBLAS)."""
    from ..decompose import TuckerKernel

    if not isinstance(tk, TuckerKernel):
        raise TypeError(f"tk must be a vc.TuckerKernel (vc.decompose.tucker), got {type(tk).__name__}")
    factors = list(tk.factors) if len(tk.factors) == 5 else [None, None] + list(tk.factors)
    core = tk.core if tk.core.ndim == 5 else tk.core[None, None]
    for mode in (2, 3, 4):   # the spatial factors go into the core: a small (Rout, Rin, kd, kh, kw) kernel
        if factors[mode] is not None:
            core = np.moveaxis(np.tensordot(factors[mode], core, axes=(1, mode)), 0, mode)
    out_f = factors[0] if factors[0] is not None else np.eye(core.shape[0])
    in_f = factors[1] if factors[1] is not None else np.eye(core.shape[1])
    return factored_conv3d("tucker_conv3d", input, bias, stride, padding, dilation, padding_mode, workers,
                     in_f, out_f, None, core, (out_f.shape[0], in_f.shape[0]) + core.shape[2:])


def _cp_factors(cp):
    """(out (Cout, R) with the weights folded in, in (Cin, R), fd, fh, fw (R, k)) of a CP weight or kernel."""
    if cp.ndim == 5:
        a, b, d, h, e = cp.factors
    else:
        a, b, (d, h, e) = np.ones((1, cp.rank)), np.ones((1, cp.rank)), cp.factors
    return a * cp.weights, b, d.T, h.T, e.T


def factored_conv3d(op, input, bias, stride, padding, dilation, padding_mode, workers, in_f, out_f, spatial, core,
              w_shape):
    """in projection (Cin -> R), the spatial part (separable factors per component, or a dense core R -> R'),
    out projection (R' -> Cout) + bias."""
    five_d(input)
    # the torch adapter: gradients (vc.nn's layers: factors as tensors), a GPU (the CUDA plugin), tracing
    if _cuda.is_cuda(input) or wants_autograd(input, bias, in_f, out_f, core, *(spatial or ())):
        from .._torch import lowrank

        if not compiling():
            check_tensors(op, [input, bias], ["input", "bias"], cuda=True)
        spec = conv_spec(tuple(input.shape), tuple(w_shape), bias, stride, padding, dilation, 1, padding_mode)
        return lowrank.factored_conv3d(input, bias, spec, workers, in_f, out_f, spatial, core)
    caller = Caller(op, [input, bias], ["input", "bias"])
    x, b = caller.arrays
    spec = conv_spec(x.shape, w_shape, b, stride, padding, dilation, 1, padding_mode)
    x = caller.cast(x, "input")
    nthreads = resolve_workers(workers)
    if spatial is not None and in_f.shape[0] == 1 and out_f.shape[0] == 1:
        # one channel in and out (a single kernel's CP): the components are terms of one fused pass
        fd, fh, fw = spatial
        out = separable_conv3d(x, (fd * (out_f[0] * in_f[0])[:, None])[:, None], fh[:, None], fw[:, None], spec,
                               nthreads)
    else:
        z = project(x, in_f.T.astype(x.dtype))
        if spatial is not None:
            R = z.shape[1]
            sspec = ConvSpec(z.shape, (R, 1) + w_shape[2:], stride=spec.stride, pads=spec.pads,
                             dilation=spec.dilation, groups=R, mode=spec.mode)
            u = separable_conv3d(z, *spatial, sspec, nthreads)
        else:
            cspec = ConvSpec(z.shape, core.shape, stride=spec.stride, pads=spec.pads, dilation=spec.dilation,
                             groups=1, mode=spec.mode)
            u = dense.run(z, np.ascontiguousarray(core, x.dtype), None, cspec, "auto", nthreads)
        out = project(u, out_f.astype(x.dtype))
    if b is not None:
        out += caller.cast(b, "bias", same_dtype=True).reshape(1, -1, 1, 1, 1)
    return caller.result(out)
