"""Dense convolution of checked numpy arrays: the algorithms, `run` (which picks one by the cost model), and the
backward passes (input gradient: a transposed convolution by stride phases; weight gradient: a correlation).

Algorithms:
  direct  volconv's Cython/OpenMP kernel (_cpu/direct.pxi): no padded copy of D/H, one vectorised pass per row;
  fft     real FFTs with scipy.fft (engine/fft.py): cost independent of the kernel size;
  sparse  the weight's non-zeros only (engine/sparse.py);
  torch   torch's own conv3d (oneDNN), when torch is installed; fastest for many-channel layers.
Every algorithm computes with zeros outside the volume; a constant cval's share is added after
(border.add_constant_share). NaN and Inf propagate as in torch with direct and torch; cost.choose_algorithm
keeps fft and sparse away from non-finite data."""
import itertools
import math

import numpy as np

from .. import _cpu
from .._validate import TORCH_PAD_MODES, ConvSpec, pad_array
from . import sparse
from .border import DenseTaps, add_constant_share
from .cost import choose_algorithm
from .layout import (channel_block, check_memory, check_rings, crop_negative_pads, direct_operands, fold_padding,
                     plane_chunks, row_layout, threads_for)


# The algorithms: (x, w, b, spec, nthreads) -> output, computed with zeros outside the volume.


def run_direct(x, w, b, spec, nthreads):
    check_rings(spec, x.dtype.itemsize, nthreads)
    row_map, map_d, map_h, toff = row_layout(x.shape, spec)
    O, G, ob = w.shape[0], spec.groups, channel_block(spec)
    Og = O // G
    # (G, Og/ob, ob, Cg, kd, kh, kw) -> (G, Og/ob, Cg, kd, kh, kw, ob): the ob weights of a tap are adjacent.
    wpack = np.ascontiguousarray(w.reshape((G, Og // ob, ob) + w.shape[1:]).transpose(0, 1, 3, 4, 5, 6, 2))
    bias = np.zeros(O, x.dtype) if b is None else b
    out = np.empty(spec.out_shape, dtype=x.dtype)
    (sd, sh, _), (dd, dh, _) = spec.stride, spec.dilation
    nchunk = plane_chunks(spec, nthreads)
    unit_stride, unit_taps = spec.stride[2] == 1, spec.stride[2] == spec.dilation[2] == 1
    _cpu.compiled.conv3d_direct(x, row_map, spec.pads[2][0], unit_stride, unit_taps, wpack, bias,
                              out, map_d, map_h, toff, sd, sh, dd, dh, nchunk, nthreads)
    return out


def run_fft(x, w, b, spec, nthreads):
    from . import fft   # scipy.fft takes 0.3 s to import: not at `import volconv`

    return fft.fft_conv3d(x, w, b, spec.pads, spec.mode, spec.stride, spec.dilation, spec.groups, nthreads)


def torch_padding(spec):
    """How to hand spec's padding to torch: (pad for F.pad with its mode, or None; padding for conv3d).
    Symmetric zero padding goes to conv3d itself (no padded copy); anything else is padded first."""
    if spec.mode == "constant" and all(lo == hi for lo, hi in spec.pads):
        return None, tuple(lo for lo, _ in spec.pads)
    pad = tuple(p for lo_hi in reversed(spec.pads) for p in lo_hi)  # F.pad wants the last axis first
    return (pad, TORCH_PAD_MODES[spec.mode]), 0


def torch_conv3d_tensors(x, w, b, spec):
    """torch's own conv3d on tensors (autograd by torch when they need it)."""
    torch = _import_torch("algorithm='torch'")
    pad, padding = torch_padding(spec)
    if pad is not None:
        x = torch.nn.functional.pad(x, pad[0], mode=pad[1])
    return torch.nn.functional.conv3d(x, w, b, stride=spec.stride, padding=padding, dilation=spec.dilation,
                                      groups=spec.groups)


def run_torch(x, w, b, spec, nthreads):
    torch = _import_torch("algorithm='torch'")
    if spec.mode == "reflect":  # scipy's 'reflect' (symmetric) has no torch name: pad here
        x, spec = pad_array(x, spec.pads, spec.mode), spec.padded()
    previous = torch.get_num_threads()
    if previous != nthreads:
        torch.set_num_threads(nthreads)
    try:
        with torch.no_grad():
            out = torch_conv3d_tensors(torch.from_numpy(x), torch.from_numpy(w),
                                       None if b is None else torch.from_numpy(b), spec)
    finally:
        if previous != nthreads:
            torch.set_num_threads(previous)
    return out.numpy()


def run_sparse(x, w, b, spec, nthreads):
    """A dense weight by its non-zeros only (engine/sparse.py)."""
    indices = np.argwhere(w)   # C order: sorted by output channel, as the sparse kernel wants
    return sparse.run(x, indices, w[tuple(indices.T)], b, spec, nthreads)


ALGORITHMS = {"direct": run_direct, "fft": run_fft, "torch": run_torch, "sparse": run_sparse}


def _import_torch(why):
    try:
        import torch
    except ImportError:
        raise ImportError(f"{why} needs torch; install it with `pip install volconv[torch]`") from None
    return torch


def resolve_algorithm(algorithm):
    if algorithm != "auto" and algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be 'auto' or one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
    return algorithm


def run(x, w, b, spec, algorithm, nthreads, *, allow_torch=True):
    """Convolution of checked, contiguous arrays of one float dtype. Negative pads crop first. Every algorithm
    computes with zeros outside the volume; a constant cval's share is added after (add_constant_share)."""
    check_memory(spec, x.dtype.itemsize)
    x, spec = crop_negative_pads(x, spec)
    if algorithm == "auto":
        algorithm = choose_algorithm(x, spec, nthreads, w=w, allow_torch=allow_torch, nnz=np.count_nonzero(w))
    out = ALGORITHMS[algorithm](x, w, b, spec.with_cval(0.0), threads_for(spec, nthreads))
    return add_constant_share(out, spec, DenseTaps(w))


def _stride_phase(n_grad, start, stop, k, d, s, rho):
    """One stride phase of a transposed convolution along one axis: the input positions i = q*s + rho in
    [start, stop) receive grad[q - m_t] * w[t] from exactly the taps t with t*d = rho (mod s), m_t = (t*d - rho)/s.
    That is a stride-1 correlation of grad with those taps reversed (dilation d / gcd(d, s)).
    Returns (taps, (lo, hi) padding of grad, dilation, destination slice) or None when nothing lands."""
    taps = [t for t in range(k) if (t * d - rho) % s == 0]
    q0, q1 = -(-(start - rho) // s), -(-(stop - rho) // s)
    if not taps or q1 <= q0:
        return None
    dilation = d // math.gcd(d, s)
    lo = (taps[-1] * d - rho) // s - q0
    hi = (q1 - q0) - n_grad - lo + dilation * (len(taps) - 1)
    first = q0 * s + rho - start
    return taps[::-1], (lo, hi), dilation, slice(first, first + (q1 - q0 - 1) * s + 1, s)


def transposed_weight(w, groups):
    """The weight (O, Cg, kd, kh, kw) of the transposed convolution, input and output channels swapped within
    each group: (groups * Cg, O / groups, kd, kh, kw), not flipped (numpy arrays and torch tensors alike)."""
    O, Cg, k = w.shape[0], w.shape[1], tuple(w.shape[2:])
    return w.reshape((groups, O // groups, Cg) + k).swapaxes(1, 2).reshape((groups * Cg, O // groups) + k)


def backward_input(grad, w, spec, algorithm, nthreads):
    """d loss / d input: a transposed convolution. Split into the stride's phases (stride 1: one phase, the
    flipped kernel), each a stride-1 correlation of the output gradient with a sub-kernel, input and output
    channels swapped within each group: the work of the forward pass, never stride^3 times it."""
    N = grad.shape[0]
    G, Cg = spec.groups, w.shape[1]
    wt = transposed_weight(w, G)
    zero_pad = spec.mode == "constant"   # then only the unpadded positions are computed
    spans = [(lo, lo + n) if zero_pad else (0, n + lo + hi) for n, (lo, hi) in zip(spec.x_shape[2:], spec.pads)]
    gx = np.zeros((N, G * Cg) + tuple(b - a for a, b in spans), grad.dtype)
    grad = np.ascontiguousarray(grad)
    for rho in itertools.product(*(range(s) for s in spec.stride)):
        phases = [_stride_phase(n, a, b, k, d, s, r) for n, (a, b), k, d, s, r in
                  zip(grad.shape[2:], spans, spec.kernel_size, spec.dilation, spec.stride, rho)]
        if None in phases:
            continue
        taps, pads, dilation, dst = zip(*phases)
        sub = np.ascontiguousarray(wt[:, :, list(taps[0])][:, :, :, list(taps[1])][..., list(taps[2])])
        pspec = ConvSpec(grad.shape, sub.shape, stride=(1, 1, 1), pads=pads, dilation=dilation, groups=G,
                         mode="constant")
        gx[(slice(None), slice(None)) + dst] = run(grad, sub, None, pspec, algorithm, nthreads, allow_torch=False)
    return gx if zero_pad else fold_padding(gx, spec.x_shape[2:], spec.pads, spec.mode)


def backward_weight(x, grad, spec, nthreads, algorithm="direct"):
    """d loss / d weight: correlation of the (padded) input with the output gradient; by the FFT for the
    layers whose forward runs it (large kernels), else by the weight-gradient kernel. A constant cval outside
    is input the weights see: the input is padded with it (a copy, in this rare case) and correlated as given."""
    nthreads = threads_for(spec, nthreads)
    if spec.mode == "constant" and spec.cval != 0:
        return backward_weight(pad_array(x, spec.pads, spec.mode, spec.cval), grad, spec.padded(), nthreads,
                               algorithm)
    if algorithm == "fft":
        return _backward_weight_fft(x, grad, spec, nthreads)
    rows, map_d, map_h, toff = direct_operands(x, spec, nthreads)
    (O, Cg), G, k = spec.w_shape[:2], spec.groups, spec.kernel_size
    ob = 4 if (O // G) % 4 == 0 else 1   # output channels sharing each input-row load
    nob = O // G // ob
    # chunks of (n, od) planes, from the shape only (the same sums for any thread count): enough tasks to share
    nchunk = int(max(1, min(grad.shape[0] * grad.shape[2], 8 // (G * nob))))
    partial = np.empty((nchunk, G, nob, Cg, k[0] * k[1], ob * k[2]), x.dtype)
    (sd, sh, _), (dd, dh, _) = spec.stride, spec.dilation
    _cpu.compiled.wgrad_direct(rows, np.ascontiguousarray(grad), partial, map_d, map_h, toff, k[1], sd, sh, dd, dh,
                             nthreads)
    # (G, nob, Cg, kd, kh, ob, kw) -> (G, nob, ob, Cg, kd, kh, kw) = (O, Cg, kd, kh, kw)
    summed = partial.sum(axis=0).reshape((G, nob, Cg) + k[:2] + (ob, k[2]))
    return np.ascontiguousarray(summed.transpose(0, 1, 5, 2, 3, 4, 6)).reshape(spec.w_shape)


def _backward_weight_fft(x, grad, spec, nthreads):
    """The weight gradient as a convolution: per group, batch and channels swap places, the output gradient
    is the kernel; the layer's dilation becomes the stride and its stride the dilation. The FFT does it at a
    forward pass's cost, whatever the kernel size."""
    G, (O, Cg) = spec.groups, spec.w_shape[:2]
    Og = O // G
    gw = np.empty(spec.w_shape, x.dtype)
    for g in range(G):
        xt = np.ascontiguousarray(x[:, g * Cg:(g + 1) * Cg].transpose(1, 0, 2, 3, 4))       # (Cg, N, ...)
        gt = np.ascontiguousarray(grad[:, g * Og:(g + 1) * Og].transpose(1, 0, 2, 3, 4))    # (Og, N, ...)
        tspec = ConvSpec(xt.shape, gt.shape, stride=spec.dilation, pads=spec.pads, dilation=spec.stride, groups=1,
                         mode=spec.mode)
        lags = run_fft(xt, gt, None, tspec, nthreads)  # (Cg, Og, >= kd, >= kh, >= kw): the first k lags count
        gw[g * Og:(g + 1) * Og] = lags[(slice(None), slice(None)) + tuple(slice(k) for k in spec.kernel_size)] \
            .transpose(1, 0, 2, 3, 4)
    return gw
