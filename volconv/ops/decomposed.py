"""Kernels given by factors, executed factor by factor and never rebuilt densely.

Separable kernels (a sum of rank-1 terms, `vc.kernels.SeparableKernel`: the Gaussian, the box, the LoG):
each term's three 1-D passes run fused in one pass over memory (`_cpu` separable_conv3d): input planes are
filtered along H and W into a ring of cache-sized tiles and combined along D from there, so no intermediate
volume is written. Boundary modes extend each axis on its own, so the passes are exact.
"""
import numpy as np

from .. import _cpu
from .._dispatch import Caller, torch_batching, wants_autograd
from .._validate import ConvSpec, workers as resolve_workers
from . import dense

RING_BYTES = 384 * 2**10   # per thread: the ring of filtered tiles stays in L2 (1 MiB on Zen 4, 512 KiB on older)


def separable_conv3d(x, fd, fh, fw, spec, nthreads):
    """Sums of rank-1 terms on every channel, in one fused pass: fd, fh, fw are (T, C, k) factors (term t of
    channel c: fd[t, c] x fh[t, c] x fw[t, c], the terms summed), or (C, k) for one term per channel, or (k,)
    for one term on every channel. spec: the geometry of the whole 3-D kernel (stride, dilation, pads, mode
    with cval 0)."""
    N, C = x.shape[:2]
    fd, fh, fw = (np.asarray(f, x.dtype).reshape((1,) * (3 - np.ndim(f)) + np.shape(f)) for f in (fd, fh, fw))
    T = max(fd.shape[0], fh.shape[0], fw.shape[0])
    Do, Ho, Wo = spec.out_shape[2:]
    vl = _cpu.direct.vector_bytes() // x.dtype.itemsize
    ring_rows = T * ((_cpu.direct.fir_rows_max() - 1) * spec.stride[0] + (fd.shape[2] - 1) * spec.dilation[0] + 1)
    row_bytes = -(-Wo // vl) * vl * x.dtype.itemsize
    hb = int(max(1, min(Ho, RING_BYTES // (ring_rows * row_bytes))))
    ntile, nchunk = _split(N * C, Ho, Do, hb, nthreads)
    hb = -(-Ho // ntile)
    work = (2.0 * T * sum(f.shape[2] for f in (fd, fh, fw)) + 8.0) * np.prod(spec.out_shape, dtype=np.float64)
    nthreads = int(max(1, min(nthreads, work // dense.MIN_WORK_PER_THREAD)))
    # the ring: RING_BYTES, or more for a kernel whose D extent alone does not fit in it
    dense.check_memory(spec, x.dtype.itemsize, ring_rows * hb * row_bytes * nthreads)
    fd, fh, fw = (np.ascontiguousarray(np.broadcast_to(f, (T, C, f.shape[2]))).reshape(T * C, -1)
                  for f in (fd, fh, fw))
    row_map, map_d, map_h, toff = dense._row_layout(x.shape, spec)
    out = np.empty(spec.out_shape, dtype=x.dtype)
    (sd, sh, _), (dd, dh, _) = spec.stride, spec.dilation
    _cpu.direct.separable_conv3d(x, fd, fh, fw, map_d, map_h, row_map, spec.pads[2][0], spec.stride[2] == 1,
                                 toff, spec.stride[2] == spec.dilation[2] == 1, sd, sh, dd, dh, out, hb, nchunk,
                                 nthreads)
    return out


def _split(volumes, Ho, Do, hb, nthreads):
    """Row tiles and plane chunks per volume: tiles of at most hb rows, and enough units that every thread has
    an equal share when there are few (a plane chunk re-reads the kernel's D halo, so tiles come first)."""
    ntile = -(-Ho // hb)
    while volumes * ntile < 4 * nthreads and (volumes * ntile) % nthreads and ntile < Ho:
        ntile += 1
    nchunk = 1
    while volumes * ntile * nchunk < nthreads and nchunk < Do:
        nchunk += 1
    return ntile, nchunk


def run_separable(x, kernel, spec, algorithm, nthreads):
    """A SeparableKernel (one 3-D kernel, applied to every channel of x), term by term. spec: the geometry of
    the whole 3-D kernel. "auto"/"direct" run every term in one fused pass; "fft"/"torch" run each 1-D pass
    as a depthwise convolution by that algorithm."""
    if algorithm in ("auto", "direct"):   # every term in one fused pass
        fd, fh, fw = kernel.factors
        out = separable_conv3d(x, (fd * kernel.weights[:, None])[:, None], fh[:, None], fw[:, None],
                               spec.with_cval(0.0), nthreads)
    else:
        out = None
        for weight, factors in kernel.terms():
            y = _passes(x, factors, spec.with_cval(0.0), algorithm, nthreads)
            if weight != 1:
                y *= x.dtype.type(weight)   # y is this term's own fresh array: scaled in place
            out = y if out is None else np.add(out, y, out=out)
    # computed with zeros outside; a constant cval's share is added on the border (the 3-D kernel's, as
    # scipy.ndimage.correlate with kernel.to_dense(): not a constant per 1-D pass)
    return dense.add_constant_share(out, spec, SeparableTaps(kernel, x.shape[1]))


class SeparableTaps:
    """dense.add_constant_share's view of a SeparableKernel applied to each of C channels (depthwise): the
    contractions by the factors, never the dense kernel (built only for an infinite cval's signs)."""

    def __init__(self, kernel, channels):
        self.kernel, self.channels = kernel, channels

    def dense(self):
        k = self.kernel.to_dense()
        return np.broadcast_to(k, (self.channels, 1) + k.shape)

    def contract(self, md, mh, mw):
        fd, fh, fw = (np.asarray(f, np.float64) for f in self.kernel.factors)
        v = np.einsum("t,it,jt,lt->ijl", self.kernel.weights, md @ fd.T, mh @ fh.T, mw @ fw.T)
        return np.broadcast_to(v, (self.channels,) + v.shape)


def _passes(x, factors, spec, algorithm, nthreads):
    """One rank-1 term as three depthwise 1-D convolutions, each padding only its own axis."""
    C = x.shape[1]
    y = x
    for axis, f in enumerate(factors):
        shape = [1, 1, 1]
        shape[axis] = f.size
        w = np.ascontiguousarray(np.broadcast_to(f.reshape(shape).astype(x.dtype), (C, 1) + tuple(shape)))
        one = lambda t, v: tuple(t[a] if a == axis else v for a in range(3))  # noqa: E731
        pspec = ConvSpec(y.shape, w.shape, stride=one(spec.stride, 1), pads=one(spec.pads, (0, 0)),
                         dilation=one(spec.dilation, 1), groups=C, mode=spec.mode)
        y = dense.run(y, w, None, pspec, algorithm, nthreads)
    return y


# ------------------------------------------------------------------------------------- CP and Tucker weights


@torch_batching()
def cp_conv3d(input, cp, bias=None, stride=1, padding=0, dilation=1, *, padding_mode="zeros", workers=None):
    """3D convolution (torch.nn.functional.conv3d semantics) with a CP weight (vc.decompose.cp, vc.CPKernel):
    W[o, c, a, b, e] = sum_r weights[r] A[o, r] B[c, r] D[a, r] H[b, r] E[e, r], executed factor by factor and
    never rebuilt: the input channels are projected on the R components (one matrix product), each component
    is filtered by its three 1-D factors in one fused pass (the separable kernel, with the layer's stride,
    dilation and padding), and the components are combined into the output channels. A CP of a single 3-D
    kernel acts as a (1, 1, kd, kh, kw) weight. Differentiable on torch tensors."""
    from ..decompose import CPKernel

    if not isinstance(cp, CPKernel):
        raise TypeError(f"cp must be a vc.CPKernel (vc.decompose.cp), got {type(cp).__name__}")
    out_f, in_f, fd, fh, fw = _cp_factors(cp)
    return _factored("cp_conv3d", input, bias, stride, padding, dilation, padding_mode, workers,
                     in_f, out_f, (fd, fh, fw), None, (out_f.shape[0], in_f.shape[0]) + cp.shape[-3:])


@torch_batching()
def tucker_conv3d(input, tk, bias=None, stride=1, padding=0, dilation=1, *, padding_mode="zeros", workers=None):
    """3D convolution with a Tucker weight (vc.decompose.tucker, vc.TuckerKernel): W = core x_0 U_out x_1 U_in
    x_2 U_d x_3 U_h x_4 U_w (a mode whose factor is None is kept in the core). Executed as: the input channels
    projected on the Rin input ranks, a small dense convolution Rin -> Rout with the core (its spatial modes
    expanded by their factors: a (Rout, Rin, kd, kh, kw) kernel, never the Cout x Cin one), and the Rout
    results combined into the output channels. A Tucker of a single 3-D kernel acts as a (1, 1, ...) weight."""
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
    return _factored("tucker_conv3d", input, bias, stride, padding, dilation, padding_mode, workers,
                     in_f, out_f, None, core, (out_f.shape[0], in_f.shape[0]) + core.shape[2:])


def _cp_factors(cp):
    """(out (Cout, R) with the weights folded in, in (Cin, R), fd, fh, fw (R, k)) of a CP weight or kernel."""
    if cp.ndim == 5:
        a, b, d, h, e = cp.factors
    else:
        a, b, (d, h, e) = np.ones((1, cp.rank)), np.ones((1, cp.rank)), cp.factors
    return a * cp.weights, b, d.T, h.T, e.T


def _factored(op, input, bias, stride, padding, dilation, padding_mode, workers, in_f, out_f, spatial, core,
              w_shape):
    """in projection (Cin -> R), the spatial part (separable factors per component, or a dense core R -> R'),
    out projection (R' -> Cout) + bias."""
    if getattr(input, "ndim", 0) != 5:
        raise ValueError(f"input must be 5-D (N, C, D, H, W), got shape {tuple(getattr(input, 'shape', ()))}")
    if wants_autograd(input, bias):
        from ..nn._functions import factored_autograd

        return factored_autograd(input, bias, stride, padding, dilation, padding_mode, workers, in_f, out_f,
                                 spatial, core, w_shape)
    caller = Caller(op, [input, bias], ["input", "bias"])
    x, b = caller.arrays
    spec = dense.conv_spec(x.shape, w_shape, b, stride, padding, dilation, 1, padding_mode)
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


def project(x, m):
    """Channels of x (N, C, ...) combined by m (C', C): out[n, i] = sum_c m[i, c] x[n, c] (a 1x1x1 convolution,
    as one matrix product per batch item)."""
    N, C = x.shape[:2]
    out = np.matmul(m, x.reshape(N, C, -1))
    return out.reshape((N, m.shape[0]) + x.shape[2:])


# ------------------------------------------------------------------------------ gradients of separable passes


def separable_backward_input(g, fd, fh, fw, spec, nthreads):
    """d loss / d input of separable_conv3d with one term per channel (fd, fh, fw: (C, k)) at stride 1: the
    transposed convolution is the correlation of g with the reversed factors, so it is one fused pass too.
    Zero padding: the padding's share is never computed; other modes: computed over the padded domain and
    folded back (the padding's adjoint). None at other strides (the caller falls back to the dense path)."""
    if spec.stride != (1, 1, 1):
        return None
    reach = [(k - 1) * d for k, d in zip(spec.kernel_size, spec.dilation)]
    pads = tuple((r - lo, r - hi) for r, (lo, hi) in zip(reach, spec.pads))
    zero_pad = spec.mode == "constant" and min(min(p) for p in pads) >= 0
    tspec = ConvSpec(g.shape, spec.w_shape, stride=(1, 1, 1), pads=pads if zero_pad else tuple((r, r) for r in reach),
                     dilation=spec.dilation, groups=spec.groups, mode="constant")
    gx = separable_conv3d(g, fd[:, ::-1], fh[:, ::-1], fw[:, ::-1], tspec, nthreads)
    return gx if zero_pad else dense._fold_padding(gx, spec.x_shape[2:], spec.pads, spec.mode)


def separable_backward_factors(z, g, fd, fh, fw, spec, nthreads):
    """d loss / d (fd, fh, fw), each (C, k): along each axis, the other two factors filter z (that axis padded
    but not filtered, at unit stride), and a 1-D weight gradient along the axis correlates the result with g.
    Three cheap passes instead of the k^3 weight gradient of the kernel they make."""
    C = z.shape[1]
    grads = []
    factors = (fd, fh, fw)
    for axis in range(3):
        one = lambda t, v: tuple(v if a == axis else t[a] for a in range(3))  # noqa: E731
        fs = [np.ones((C, 1)) if a == axis else f for a, f in enumerate(factors)]
        ks = one(spec.kernel_size, 1)
        pspec = ConvSpec(z.shape, (C, 1) + ks, stride=one(spec.stride, 1), pads=spec.pads,
                         dilation=one(spec.dilation, 1), groups=C, mode=spec.mode)
        y = separable_conv3d(z, *fs, pspec, nthreads)
        wk = tuple(spec.kernel_size[a] if a == axis else 1 for a in range(3))
        wspec = ConvSpec(y.shape, (C, 1) + wk, stride=tuple(spec.stride[a] if a == axis else 1 for a in range(3)),
                         pads=((0, 0),) * 3, dilation=tuple(spec.dilation[a] if a == axis else 1 for a in range(3)),
                         groups=C, mode="constant")
        grads.append(dense.backward_weight(y, g, wspec, nthreads).reshape(C, -1))
    return grads
