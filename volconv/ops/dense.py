"""Dense 3D convolution: `conv3d` (torch.nn.functional.conv3d semantics) and `correlate` / `convolve`
(scipy.ndimage semantics on one volume), with their algorithms and the backward passes.

Every path goes through `run(x, w, b, spec, algorithm, nthreads)` on checked numpy arrays. Algorithms:
  direct  volconv's Cython/OpenMP kernel (kernels.h): no padded copy of D/H, one vectorised pass per row;
  fft     real FFTs with scipy.fft (ops/fft.py): cost independent of the kernel size;
  torch   torch's own conv3d (oneDNN), when torch is installed; fastest for many-channel layers.
"auto" picks the cheapest by the cost model in `choose_algorithm`. NaN and Inf propagate as in torch with the
direct and torch algorithms (only the outputs whose window holds them); in an FFT they spread over the whole
output, and the sparse algorithm skips zero weights (torch: 0 * NaN = NaN), so "auto" picks neither when the
input or the weight is not finite (`all_finite`, the one test).
mode="constant" with a cval: every algorithm computes with zeros outside, then `add_constant_share` adds the
constant's share on the border only (never x - cval: no cancellation, and a NaN cval stays at the border).
"""
import itertools
import math
import sys

import numpy as np

from .. import _cpu, _cuda, _memory
from . import decomposed, sparse
from .._dispatch import Caller, compiling, is_tensor, torch_batching, wants_autograd
from .._dispatch import _torch as _dispatch_torch
from ..kernels import Kernel, SeparableKernel
from .._validate import (INT_MAX, ConvSpec, conv_padding, filter_origins, filter_pads, pad_array, pad_index,
                         real_number, scipy_mode, torch_padding_mode, triple, workers as resolve_workers)

# ----------------------------------------------------------------------------------------------- algorithms


def _row_layout(x_shape, spec):
    """The direct kernels' row layout: each input row padded along W and split into the W stride's phases
    (row_map: source column of every position, -1 for zero), so that every tap reads a contiguous run at
    offset toff[e]; and D/H maps from padded position to plane/row (-1: zeros)."""
    (dlo, dhi), (hlo, hhi), (wlo, whi) = spec.pads
    D, H, W = x_shape[2:]
    sw, dw, kw = spec.stride[2], spec.dilation[2], spec.kernel_size[2]
    map_d = pad_index(D, dlo, dhi, spec.mode).astype(np.intp)
    map_h = pad_index(H, hlo, hhi, spec.mode).astype(np.intp)
    map_w = pad_index(W, wlo, whi, spec.mode)
    phase_len = -(-map_w.size // sw)
    # row position ph * phase_len + j holds padded column j * sw + ph (-1 past the end: never read); a stride
    # longer than the padded row has a phase per column only (the others would hold nothing)
    cols = np.arange(phase_len)[None, :] * sw + np.arange(min(sw, map_w.size))[:, None]
    row_map = np.where(cols < map_w.size, map_w[np.minimum(cols, map_w.size - 1)], -1).ravel().astype(np.intp)
    taps = np.arange(kw) * dw
    toff = ((taps % sw) * phase_len + taps // sw).astype(np.intp)
    return row_map, map_d, map_h, toff


def _direct_operands(x, spec, nthreads):
    """x's rows laid out by _row_layout in one padded copy (the weight-gradient kernel reads it whole)."""
    copy = spec.pads[2] != (0, 0) or spec.stride[2] != 1
    check_memory(spec, x.dtype.itemsize, math.prod(x.shape[:4]) * row_length(spec) * x.dtype.itemsize * copy)
    row_map, map_d, map_h, toff = _row_layout(x.shape, spec)
    if not copy:
        return x, map_d, map_h, toff
    rows = np.empty(x.shape[:4] + row_map.shape, dtype=x.dtype)
    _cpu.direct.pad_rows(x, row_map, spec.pads[2][0], spec.stride[2] == 1, rows, nthreads)
    return rows, map_d, map_h, toff


def _channel_block(spec):
    """Output channels that share each input-row load in the direct kernel (its register block)."""
    Og = spec.w_shape[0] // spec.groups
    return 8 if Og % 8 == 0 else 4 if Og % 4 == 0 else 1


# bytes per position of a padded axis while its index maps are built (pad_index, _row_layout: int64 maps and
# numpy's temporaries)
MAP_BYTES = 64


def row_length(spec):
    """Length of the direct kernels' padded input rows (_row_layout): the padded W axis in stride phases."""
    padded, sw = spec.x_shape[4] + sum(spec.pads[2]), spec.stride[2]
    return min(sw, padded) * -(-padded // sw)


def ring_bytes(spec, itemsize):
    """One thread's ring of padded planes in the direct kernels (direct, sparse, nested): every input channel
    of a group, (kd - 1) * dd + 1 planes of H rows, each row vector-aligned."""
    vl = _cpu.direct.vector_bytes() // itemsize
    planes = spec.w_shape[1] * ((spec.kernel_size[0] - 1) * spec.dilation[0] + 1)
    return (planes * spec.x_shape[3] * -(-row_length(spec) // vl) * vl + vl) * itemsize


def check_memory(spec, itemsize, work=0, hint=""):
    """Refuse, before anything is allocated, a convolution that would not fit in the memory this process can
    still allocate (_memory.require): its output, the index maps of its padded axes, and `work`, the bytes
    of the algorithm's own buffers (the direct kernels' rings, a padded copy). Every op family calls it
    first, so that absurd padding, strides or sizes fail at once, naming them."""
    padded = sum(n + lo + hi for n, (lo, hi) in zip(spec.x_shape[2:], spec.pads))
    need = math.prod(spec.out_shape) * itemsize + MAP_BYTES * padded + work
    _memory.require(need, f"a convolution of input {spec.x_shape} with padding {spec.pads}, stride {spec.stride} "
                          f"and dilation {spec.dilation} into an output of shape {spec.out_shape}", hint)


def check_rings(spec, itemsize, nthreads, rings=None, instead="algorithm='fft' or 'torch'"):
    """check_memory with the direct kernels' rings of nthreads threads (rings: one thread's, when not
    ring_bytes(spec)), which the kernels allocate inside their parallel region; instead: what else to use."""
    total = (ring_bytes(spec, itemsize) if rings is None else rings) * nthreads
    check_memory(spec, itemsize, total, f" ({_memory.size(total)} of it the rings of padded planes of {nthreads} "
                                        f"thread(s)); use {instead}, or fewer workers")


def plane_chunks(spec, nthreads):
    """Work units of the direct kernels are (n, group, run of output planes): enough runs for every thread
    (each unit pads its planes once, so no more than that)."""
    return int(min(spec.out_shape[2], max(1, -(-2 * nthreads // (spec.x_shape[0] * spec.groups)))))


def direct_conv3d(x, w, b, spec, nthreads):
    check_rings(spec, x.dtype.itemsize, nthreads)
    row_map, map_d, map_h, toff = _row_layout(x.shape, spec)
    O, G, ob = w.shape[0], spec.groups, _channel_block(spec)
    Og = O // G
    # (G, Og/ob, ob, Cg, kd, kh, kw) -> (G, Og/ob, Cg, kd, kh, kw, ob): the ob weights of a tap are adjacent.
    wpack = np.ascontiguousarray(w.reshape((G, Og // ob, ob) + w.shape[1:]).transpose(0, 1, 3, 4, 5, 6, 2))
    bias = np.zeros(O, x.dtype) if b is None else b
    out = np.empty(spec.out_shape, dtype=x.dtype)
    (sd, sh, _), (dd, dh, _) = spec.stride, spec.dilation
    nchunk = plane_chunks(spec, nthreads)
    unit_stride, unit_taps = spec.stride[2] == 1, spec.stride[2] == spec.dilation[2] == 1
    _cpu.direct.conv3d_direct(x, row_map, spec.pads[2][0], unit_stride, unit_taps, wpack, bias,
                              out, map_d, map_h, toff, sd, sh, dd, dh, nchunk, nthreads)
    return out


def fft_conv3d(x, w, b, spec, nthreads):
    from .fft import fft_conv3d as run_fft

    return run_fft(x, w, b, spec.pads, spec.mode, spec.stride, spec.dilation, spec.groups, nthreads)


def torch_padding(spec):
    """How to hand spec's padding to torch: (pad for F.pad with its mode, or None; padding for conv3d).
    Symmetric zero padding goes to conv3d itself (no padded copy); anything else is padded first."""
    if spec.mode == "constant" and all(lo == hi for lo, hi in spec.pads):
        return None, tuple(lo for lo, _ in spec.pads)
    pad = tuple(p for lo_hi in reversed(spec.pads) for p in lo_hi)  # F.pad wants the last axis first
    return (pad, TORCH_PAD_MODES[spec.mode]), 0


# torch.nn.functional.pad's names for the scipy boundary modes torch's conv3d can reach
TORCH_PAD_MODES = {"constant": "constant", "mirror": "reflect", "nearest": "replicate", "wrap": "circular"}


def torch_conv3d_tensors(x, w, b, spec):
    """torch's own conv3d on tensors (autograd by torch when they need it)."""
    torch = _import_torch("algorithm='torch'")
    pad, padding = torch_padding(spec)
    if pad is not None:
        x = torch.nn.functional.pad(x, pad[0], mode=pad[1])
    return torch.nn.functional.conv3d(x, w, b, stride=spec.stride, padding=padding, dilation=spec.dilation,
                                      groups=spec.groups)


def torch_conv3d(x, w, b, spec, nthreads):
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


def sparse_conv3d(x, w, b, spec, nthreads):
    """A dense weight by its non-zeros only (ops/sparse.py)."""
    indices = np.argwhere(w)   # C order: sorted by output channel, as the sparse kernel wants
    return sparse.run_sparse(x, indices, w[tuple(indices.T)], b, spec, nthreads)


ALGORITHMS = {"direct": direct_conv3d, "fft": fft_conv3d, "torch": torch_conv3d, "sparse": sparse_conv3d}


def _import_torch(why):
    try:
        import torch
    except ImportError:
        raise ImportError(f"{why} needs torch; install it with `pip install volconv[torch]`") from None
    return torch


# ----------------------------------------------------------------------------------------------- cost model
# Calibrated on the development machine (2 Zen 4 cores, float32, bench/bench_dense.py and a sweep
# of layer shapes): sustained rates per thread of the direct kernel by register block, of its weight-gradient
# kernel, of oneDNN for channel-mixing layers, the bandwidth the direct path streams at, a fixed cost per call.
DIRECT_GFLOPS = {1: 90.0, 4: 140.0, 8: 220.0}    # per thread, by output-channel block (1: one channel / depthwise)
WGRAD_GFLOPS = {1: 47.0, 4: 55.0, 8: 55.0}       # weight-gradient kernel (unaligned tap loads)
TORCH_GFLOPS = 130.0                              # oneDNN, when channels mix (Cg >= 4, Og >= 4)
CALL_OVERHEAD = 20e-6
BANDWIDTH = 25e9   # bytes/s the direct path streams (input and output), both cores
MIN_WORK_PER_THREAD = 4e6   # flops (about 40 us): below this a second thread costs more than it saves


def streaming_cost(spec):
    """Seconds to call a direct-style kernel and stream its input and output through memory once."""
    traffic = 4.0 * (np.prod(spec.x_shape, dtype=np.float64) + np.prod(spec.out_shape, dtype=np.float64))
    return CALL_OVERHEAD + traffic / BANDWIDTH


def direct_cost(spec, nthreads):
    return streaming_cost(spec) + spec.flops() / (DIRECT_GFLOPS[_channel_block(spec)] * 1e9 * nthreads)


def torch_cost(spec, nthreads):
    Cg, Og = spec.w_shape[1], spec.w_shape[0] // spec.groups
    if Cg < 4 or Og < 4:
        return np.inf    # oneDNN's per-channel 3D paths are far slower than the direct kernel
    return 100e-6 + spec.flops() / (TORCH_GFLOPS * 1e9 * nthreads)


def fft_cost(spec, nthreads):
    from .fft import fft_cost as estimate  # estimated at 2 threads

    seconds = estimate(spec.x_shape, spec.w_shape, spec.pads, spec.stride, spec.dilation, spec.groups,
                       mode=spec.mode)
    return seconds * 2 / min(nthreads, 2)


def wgrad_cost(spec, nthreads):
    return CALL_OVERHEAD + spec.flops() / (WGRAD_GFLOPS[_channel_block(spec)] * 1e9 * nthreads)


def algorithm_costs(spec, nthreads, *, allow_torch, nnz=None):
    """Predicted seconds of each algorithm that suits this convolution (the cost model)."""
    costs = {"direct": direct_cost(spec, nthreads)}
    if nnz is not None and nnz < 0.5 * np.prod(spec.w_shape):   # a mostly-zero weight: its non-zeros only
        costs["sparse"] = sparse.sparse_cost(spec, nnz, nthreads)
    if allow_torch and "torch" in sys.modules:
        costs["torch"] = torch_cost(spec, nthreads)
    if min(spec.kernel_size) > 3:
        costs["fft"] = fft_cost(spec, nthreads)
    return costs


def all_finite(*arrays):
    """Whether every value of these arrays or tensors (None skipped) is finite: the one test behind every
    algorithm choice that must keep NaN / Inf where torch puts them."""
    for a in arrays:
        if a is None:
            continue
        if is_tensor(a):
            if not bool(_dispatch_torch().isfinite(a.detach()).all()):
                return False
        elif not np.isfinite(a).all():
            return False
    return True


def choose_algorithm(x, spec, nthreads, *, w=None, allow_torch, backward=False, nnz=None):
    """The cheapest algorithm by the cost model. backward: the call will be differentiated, so the cost is a
    training step's (forward + input gradient, about another forward, + weight gradient: the direct kernel's,
    or for fft and torch about one more forward). Non-finite input or weight w: direct or torch only (an FFT
    spreads NaN / Inf over the whole output; the sparse path skips zero weights, where torch has 0 * NaN = NaN)."""
    costs = algorithm_costs(spec, nthreads, allow_torch=allow_torch, nnz=nnz)
    if backward:  # torch: forward + backward ~ 3 forwards; fft: its weight gradient is another FFT convolution
        costs = {name: 3 * c if name in ("torch", "fft") else 2 * c + wgrad_cost(spec, nthreads)
                 for name, c in costs.items()}
    if len(costs) > 1 and not _memory.fits(ring_bytes(spec, x.dtype.itemsize) * nthreads):
        # the direct kernels' rings of padded planes (direct, sparse) would not fit: another algorithm if any
        costs = {k: c for k, c in costs.items() if k not in ("direct", "sparse")} or costs
    name = min(costs, key=costs.get)
    if name in ("fft", "sparse") and not all_finite(x, w):
        costs = {k: c for k, c in costs.items() if k not in ("fft", "sparse")}
        name = min(costs, key=costs.get)
    return name


def resolve_algorithm(algorithm):
    if algorithm != "auto" and algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be 'auto' or one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
    return algorithm


# -------------------------------------------------------------------------------------------------- running


def crop_negative_pads(x, spec):
    """(x, spec) with negative pads applied as a crop of x (the kernels pad, they do not crop)."""
    if all(lo >= 0 and hi >= 0 for lo, hi in spec.pads):
        return x, spec
    crop = tuple(slice(max(-lo, 0), n + min(hi, 0)) for n, (lo, hi) in zip(x.shape[2:], spec.pads))
    x = np.ascontiguousarray(x[(slice(None), slice(None)) + crop])
    return x, ConvSpec(x.shape, spec.w_shape, stride=spec.stride, dilation=spec.dilation, groups=spec.groups,
                       pads=tuple((max(lo, 0), max(hi, 0)) for lo, hi in spec.pads), mode=spec.mode,
                       cval=spec.cval)


def run(x, w, b, spec, algorithm, nthreads, *, allow_torch=True):
    """Convolution of checked, contiguous arrays of one float dtype. Negative pads crop first. Every algorithm
    computes with zeros outside the volume; a constant cval's share is added after (add_constant_share)."""
    check_memory(spec, x.dtype.itemsize)
    x, spec = crop_negative_pads(x, spec)
    if algorithm == "auto":
        algorithm = choose_algorithm(x, spec, nthreads, w=w, allow_torch=allow_torch, nnz=np.count_nonzero(w))
    out = ALGORITHMS[algorithm](x, w, b, spec.with_cval(0.0), threads_for(spec, nthreads))
    return add_constant_share(out, spec, DenseTaps(w))


# --------------------------------------------------------------------------------- constant boundary (cval)
# mode="constant" with cval c: out = corr(x with zeros outside, w) + sum of c * w[t] over the taps t whose
# voxel lies outside the volume. Which taps fall outside depends, along each axis, only on the output position's
# distance to that axis' ends: a few classes per axis (the kernel's reach on each side, and the interior, where
# every tap is inside). The second term is computed per class triple, in float64, from the weights, and added
# on the border shell only: the interior gets nothing (no cancellation against a large c, no NaN or Inf from a
# non-finite c), the border gets what scipy.ndimage computes (c * w[t] per non-zero tap, so NaN / Inf as scipy
# has them). The share's weight gradient is in backward_weight.


class DenseTaps:
    """add_constant_share's view of a dense weight (O, Cg, kd, kh, kw), given or built on demand:
    contract(mD, mH, mW) -> (O, cD, cH, cW), the sum over taps of w[o, c, a, b, e] * mD[i, a] * mH[j, b] * mW[l, e]
    (input channels summed: each is padded with the constant); dense() the weights in float64, whose signs
    decide an infinite cval."""

    def __init__(self, w):
        self.w = w

    def dense(self):
        return np.asarray(self.w() if callable(self.w) else self.w, np.float64)

    def contract(self, md, mh, mw):
        return np.einsum("ocabe,ia,jb,le->oijl", self.dense(), md, mh, mw, optimize=True)


def _axis_classes(n, n_out, k, d, s, lo):
    """Along one axis: (inside (classes, k) 0/1 float64: which taps of a class land inside the volume, class of
    every output position, the slice of output positions whose taps are all inside)."""
    src = np.arange(n_out)[:, None] * s + np.arange(k)[None, :] * d - lo
    classes, index = np.unique((src >= 0) & (src < n), axis=0, return_inverse=True)
    interior = np.flatnonzero(classes[index].all(axis=1))
    inner = slice(int(interior[0]), int(interior[-1]) + 1) if interior.size else slice(0, 0)
    return classes.astype(np.float64), index.reshape(-1), inner


def constant_share(spec, taps):
    """(share (O, cD, cH, cW) in float64, class index per output position per axis, interior slice per axis):
    the constant's contribution by class triple, exactly 0 where every tap is inside."""
    axes = [_axis_classes(n, n_out, k, d, s, lo) for n, n_out, k, d, s, (lo, _) in
            zip(spec.x_shape[2:], spec.out_shape[2:], spec.kernel_size, spec.dilation, spec.stride, spec.pads)]
    (iD, _, _), (iH, _, _), (iW, _, _) = axes
    ones = [np.ones_like(m) for m in (iD, iH, iW)]

    def outside(contract):   # sum over the taps outside: outside D, or inside D and outside H, or inside both and W
        return contract(1 - iD, ones[1], ones[2]) + contract(iD, 1 - iH, ones[2]) + contract(iD, iH, 1 - iW)

    border = ~(iD.all(axis=1)[:, None, None] & iH.all(axis=1)[None, :, None] & iW.all(axis=1)[None, None, :])
    c = spec.cval
    with np.errstate(invalid="ignore", over="ignore"):
        if math.isfinite(c):
            share = c * outside(taps.contract)
        else:   # c * w[t] over the outside taps of non-zero weight (scipy's footprint: a zero weight is no tap):
            w = taps.dense()   # NaN for a NaN c or for weights of both signs, else c times their sign
            pos, neg = (outside(DenseTaps(m.astype(np.float64)).contract) for m in (w > 0, w < 0))
            share = np.where((pos > 0) & (neg > 0) | (math.isnan(c) & ((pos > 0) | (neg > 0))), np.nan,
                             np.where(pos > 0, c, np.where(neg > 0, -c, 0.0)))
    return np.where(border, share, 0.0), [a[1] for a in axes], [a[2] for a in axes]


def add_constant_share(out, spec, taps):
    """out (computed with zeros outside) += the constant cval's share, on the border shell only."""
    if spec.mode != "constant" or spec.cval == 0 or out.size == 0:
        return out
    share, index, inner = constant_share(spec, taps)
    parts = [(slice(0, s.start), slice(s.start, s.stop), slice(s.stop, n)) if s.stop > s.start else (slice(0, n),)
             for s, n in zip(inner, out.shape[2:])]
    for block in itertools.product(*parts):
        if all(b == s for b, s in zip(block, inner)) or any(b.stop <= b.start for b in block):
            continue   # the interior block (nothing to add) or an empty one
        i, j, k = (idx[b] for idx, b in zip(index, block))
        out[(slice(None), slice(None)) + block] += share[:, i[:, None, None], j[None, :, None], k[None, None, :]]
    return out


def threads_for(spec, nthreads):
    """No more threads than the work can feed: a thread that finishes its share in a few microseconds then
    waits at the barrier for a sibling the OS may have descheduled (on a busy machine, a whole time slice)."""
    work = spec.flops() + 8.0 * np.prod(spec.out_shape, dtype=np.float64)
    return int(max(1, min(nthreads, work // MIN_WORK_PER_THREAD)))


def _fold_padding(grad_padded, shape, pads, mode):
    """Adjoint of padding: each padded position's gradient goes back to the voxel it copied."""
    g = grad_padded
    for axis, (n, (lo, hi)) in enumerate(zip(shape, pads), start=2):
        idx = pad_index(n, lo, hi, mode)
        inner = np.take(g, np.arange(lo, lo + n), axis=axis)
        for p in np.flatnonzero((np.arange(idx.size) < lo) | (np.arange(idx.size) >= lo + n)):
            if idx[p] >= 0:
                sl = [slice(None)] * g.ndim
                sl[axis] = idx[p]
                inner[tuple(sl)] += np.take(g, p, axis=axis)
        g = inner
    return np.ascontiguousarray(g)


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


def backward_input(grad, w, spec, algorithm, nthreads):
    """d loss / d input: a transposed convolution. Split into the stride's phases (stride 1: one phase, the
    flipped kernel), each a stride-1 correlation of the output gradient with a sub-kernel, input and output
    channels swapped within each group: the work of the forward pass, never stride^3 times it."""
    N, O = grad.shape[:2]
    G = spec.groups
    Og, Cg = O // G, w.shape[1]
    wt = w.reshape((G, Og, Cg) + spec.kernel_size).transpose(0, 2, 1, 3, 4, 5).reshape((G * Cg, Og) +
                                                                                      spec.kernel_size)
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
    return gx if zero_pad else _fold_padding(gx, spec.x_shape[2:], spec.pads, spec.mode)


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
    rows, map_d, map_h, toff = _direct_operands(x, spec, nthreads)
    (O, Cg), G, k = spec.w_shape[:2], spec.groups, spec.kernel_size
    ob = 4 if (O // G) % 4 == 0 else 1   # output channels sharing each input-row load
    nob = O // G // ob
    # chunks of (n, od) planes, from the shape only (the same sums for any thread count): enough tasks to share
    nchunk = int(max(1, min(grad.shape[0] * grad.shape[2], 8 // (G * nob))))
    partial = np.empty((nchunk, G, nob, Cg, k[0] * k[1], ob * k[2]), x.dtype)
    (sd, sh, _), (dd, dh, _) = spec.stride, spec.dilation
    _cpu.direct.wgrad_direct(rows, np.ascontiguousarray(grad), partial, map_d, map_h, toff, k[1], sd, sh, dd, dh,
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
        lags = fft_conv3d(xt, gt, None, tspec, nthreads)  # (Cg, Og, >= kd, >= kh, >= kw): the first k lags count
        gw[g * Og:(g + 1) * Og] = lags[(slice(None), slice(None)) + tuple(slice(k) for k in spec.kernel_size)] \
            .transpose(1, 0, 2, 3, 4)
    return gw


# ---------------------------------------------------------------------------------------------- public API


@torch_batching()
def conv3d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, padding_mode="zeros",
           algorithm="auto", workers=None):
    """3D convolution with the semantics of ``torch.nn.functional.conv3d`` (cross-correlation, NCDHW).

    input: (N, C, D, H, W) numpy array or torch tensor, or unbatched (C, D, H, W) as in torch (so for every op
    and layer: _dispatch.torch_batching; an empty batch N = 0 gives an empty result); weight:
    (O, C // groups, kd, kh, kw); bias: (O,).
    padding: int, triple, "same" or "valid"; padding_mode: "zeros", "reflect", "replicate" or "circular" (as
    torch.nn.Conv3d: the input is padded in that mode, then convolved without padding).
    algorithm: "auto" (cost model), "direct", "fft", "sparse" (the weight's non-zeros only: ops/sparse.py;
    "auto" chooses it for a mostly-zero weight when it is the cheapest) or "torch" (torch's own kernel; "auto"
    may choose it for channel-mixing layers when torch is already imported). workers: threads (None: all OpenMP
    allows; -1: all cores). float32 and float64; torch float16/bfloat16 are computed in float32. Returns the
    caller's type, dtype and device; differentiable on torch tensors (backward by volconv's own kernels; with
    create_graph=True, by torch's differentiable conv3d, so gradient penalties work). NaN and Inf
    propagate as in torch (algorithm="fft" spreads them over the whole output). CUDA tensors run on the GPU by
    the CUDA plugin (volconv/_cuda.py; `algorithm` and `workers` do not apply there)."""
    if _cuda.is_cuda(input):
        return _cuda.conv3d(input, weight, bias, stride, padding, dilation, groups, padding_mode)
    if compiling() and is_tensor(input) and is_tensor(weight):
        from ..nn._library import traced_conv3d

        return traced_conv3d(input, weight, bias, stride, padding, dilation, groups, padding_mode, algorithm, workers)
    if getattr(weight, "ndim", None) == 5 and type(weight).__name__ in ("CPKernel", "TuckerKernel"):
        run_factored = decomposed.cp_conv3d if type(weight).__name__ == "CPKernel" else decomposed.tucker_conv3d
        if groups != 1:
            raise ValueError(f"a {type(weight).__name__} weight runs with groups=1, got groups={groups}")
        return run_factored(input, weight, bias, stride, padding, dilation, padding_mode=padding_mode,
                            workers=workers)
    if isinstance(weight, sparse.SparseKernel) or (is_tensor(weight) and weight.is_sparse):
        return sparse.sparse_conv3d(input, weight, bias, stride, padding, dilation, groups,
                                    padding_mode=padding_mode, workers=workers)
    if isinstance(weight, Kernel):
        return _conv3d_kernel(input, weight, bias, stride, padding, dilation, padding_mode, algorithm, workers)
    if wants_autograd(input, weight, bias):
        from ..nn._functions import conv3d_autograd

        return conv3d_autograd(input, weight, bias, stride, padding, dilation, groups, padding_mode,
                               algorithm, workers)
    caller = Caller("conv3d", [input, weight, bias], ["input", "weight", "bias"])
    x, w, b = caller.arrays
    spec = conv_spec(x.shape, w.shape, b, stride, padding, dilation, groups, padding_mode)
    x = caller.cast(x, "input")
    w = caller.cast(w, "weight", same_dtype=True)
    b = caller.cast(b, "bias", same_dtype=True)
    out = run(x, w, b, spec, resolve_algorithm(algorithm), resolve_workers(workers))
    return caller.result(out)


def _conv3d_kernel(input, kernel, bias, stride, padding, dilation, padding_mode, algorithm, workers):
    """conv3d with a kernel object (vc.kernels): the kernel applied to every channel (depthwise), separable
    kernels by 1-D passes."""
    C = input.shape[1] if getattr(input, "ndim", 0) == 5 else None
    if C is None:
        raise ValueError(f"input must be 5-D (N, C, D, H, W), got shape {tuple(getattr(input, 'shape', ()))}")
    kernel = _as_separable(kernel)
    if not isinstance(kernel, SeparableKernel) or wants_autograd(input, bias):
        dense = kernel.to_dense()
        weight = np.ascontiguousarray(np.broadcast_to(dense, (C, 1) + dense.shape))
        if is_tensor(input):
            weight = _dispatch_torch().as_tensor(weight).to(input.dtype)
        else:
            weight = weight.astype(input.dtype if input.dtype.kind == "f" else np.float64)
        return conv3d(input, weight, bias, stride, padding, dilation, C, padding_mode=padding_mode,
                      algorithm=algorithm, workers=workers)
    caller = Caller("conv3d", [input, bias], ["input", "bias"])
    x, b = caller.arrays
    spec = conv_spec(x.shape, (C, 1) + tuple(kernel.shape), b, stride, padding, dilation, C, padding_mode)
    x = caller.cast(x, "input")
    out = decomposed.run_separable(x, kernel, spec, resolve_algorithm(algorithm), resolve_workers(workers))
    if b is not None:
        out += caller.cast(b, "bias", same_dtype=True).reshape(1, -1, 1, 1, 1)
    return caller.result(out)


def _as_separable(kernel):
    """A CP decomposition of a single 3-D kernel is a sum of separable terms: run it as one."""
    return kernel.to_separable() if hasattr(kernel, "to_separable") and kernel.ndim == 3 else kernel


def conv_spec(x_shape, w_shape, b, stride, padding, dilation, groups, padding_mode):
    """Checks of conv3d's arguments -> ConvSpec."""
    stride = triple(stride, "stride", minimum=1, maximum=INT_MAX)
    dilation = triple(dilation, "dilation", minimum=1, maximum=INT_MAX)
    mode = torch_padding_mode(padding_mode)
    if len(w_shape) != 5:
        raise ValueError(f"weight must be 5-D (out_channels, in_channels/groups, kd, kh, kw), got shape "
                         f"{tuple(w_shape)}")
    pads = conv_padding(padding, w_shape[2:], dilation, stride)
    if len(x_shape) == 5 and padding_mode in ("reflect", "circular"):
        for n, (lo, hi) in zip(x_shape[2:], pads):
            limit = n - 1 if padding_mode == "reflect" else n
            if max(lo, hi) > limit:
                raise ValueError(f"padding {max(lo, hi)} is too large for padding_mode={padding_mode!r} on an "
                                 f"axis of size {n} (at most {limit}, as in torch)")
    spec = ConvSpec(x_shape, w_shape, stride=stride, pads=pads, dilation=dilation, groups=groups, mode=mode)
    if b is not None and tuple(b.shape) != (w_shape[0],):
        raise ValueError(f"bias must have shape ({w_shape[0]},) (one value per output channel), got "
                         f"{tuple(b.shape)}")
    return spec


def _filter(op, volume, kernel, mode, cval, origin, algorithm, workers, *, flip, halo=None):
    """correlate / convolve. halo: per axis, (lo, hi) planes at the volume's ends that are context, not output
    (a slab of a larger volume, io.filter_nifti): those sides are not padded and the output omits them. Each
    must be at most the kernel's reach on that side."""
    kernel = _as_separable(kernel)
    separable = kernel if isinstance(kernel, SeparableKernel) and not wants_autograd(volume) else None
    sparse_k = kernel if isinstance(kernel, sparse.SparseKernel) and not wants_autograd(volume) else None
    if isinstance(kernel, Kernel):  # factored kernels are never built: a zero-stride stand-in gives the shape
        kernel = np.broadcast_to(np.float32(0), kernel.shape) if separable is not None or sparse_k is not None \
            else kernel.to_dense()
    caller = Caller(op, [volume, kernel], ["volume", "kernel"], promote_ints=True)
    v, k = caller.arrays
    if v.ndim != 3:
        raise ValueError(f"volume must be 3-D (D, H, W), got {v.ndim}-D shape {v.shape}")
    if k.ndim != 3:
        raise ValueError(f"kernel must be 3-D (kd, kh, kw), got {k.ndim}-D shape {k.shape}")
    if min(k.shape) < 1:
        raise ValueError(f"kernel must not be empty, got shape {k.shape}")
    mode = scipy_mode(mode)
    origins = triple(origin, "origin")
    if v.size == 0:   # nothing to filter: an empty result, as scipy.ndimage gives
        return caller.result(np.empty(v.shape, caller.dtype))
    # NIfTI data arrive in Fortran order: filter the transposed volume with the transposed kernel (no copy)
    fortran = v.flags.f_contiguous and not v.flags.c_contiguous
    halo = ((0, 0),) * 3 if halo is None else tuple(tuple(h) for h in halo)
    if fortran:
        v, k, origins, halo = v.T, k.T, origins[::-1], halo[::-1]
        if separable is not None:
            separable = SeparableKernel(separable.factors[::-1], separable.weights)
        if sparse_k is not None:
            sparse_k = sparse.SparseKernel(sparse_k.indices[:, ::-1], sparse_k.values, sparse_k.shape[::-1])
    origins = filter_origins(origins, k.shape, flip=flip, given=origin)
    if flip:  # convolution = correlation with the flipped kernel
        k = k[::-1, ::-1, ::-1]
    pads = tuple((lo - hlo, hi - hhi) for (lo, hi), (hlo, hhi) in zip(filter_pads(k.shape, origins), halo))
    spec = ConvSpec((1, 1) + v.shape, (1, 1) + k.shape, stride=(1, 1, 1), pads=pads, dilation=(1, 1, 1),
                    groups=1, mode=mode, cval=real_number(cval, "cval"))
    if wants_autograd(volume, kernel):
        from ..nn._functions import conv_autograd, tensor

        w = tensor(kernel, like=volume if caller.is_tensor else None)
        w = w.flip((0, 1, 2)) if flip else w
        return conv_autograd(tensor(volume, like=w)[None, None], w[None, None], None, spec, algorithm,
                             workers)[0, 0]
    v = caller.cast(v, "volume")
    if sparse_k is not None:
        idx = np.array(sparse_k.shape) - 1 - sparse_k.indices if flip else sparse_k.indices
        order = np.lexsort(idx.T[::-1])
        idx5 = np.concatenate([np.zeros((idx.shape[0], 2), np.int64), idx[order]], axis=1)
        out = sparse.run_sparse(v[None, None], idx5, sparse_k.values[order].astype(v.dtype), None, spec,
                                resolve_workers(workers))
    elif separable is not None:
        if flip:
            separable = SeparableKernel([f[:, ::-1] for f in separable.factors], separable.weights)
        out = decomposed.run_separable(v[None, None], separable, spec, resolve_algorithm(algorithm),
                                       resolve_workers(workers))
    else:
        k = caller.cast(k, "kernel")
        if algorithm == "auto" and not np.all(k) and not all_finite(v):
            algorithm = "sparse"   # scipy's footprint: a zero weight is no tap, so NaN / Inf under it do not spread
        out = run(v[None, None], k[None, None], None, spec, resolve_algorithm(algorithm), resolve_workers(workers))
    return caller.result(out[0, 0].T if fortran else out[0, 0])


def correlate(volume, kernel, *, mode="reflect", cval=0.0, origin=0, algorithm="auto", workers=None):
    """Multidimensional correlation of one 3D volume, with the results of ``scipy.ndimage.correlate``.

    mode: "reflect" (d c b a | a b c d), "constant" (cval outside), "nearest", "mirror" (d c b | a b c d) or
    "wrap"; origin: int or per-axis triple, shifts the kernel as in scipy. Integer volumes are computed and
    returned as float (numpy's promotion with float32), not rounded back to the integer type.
    cval enters only the outputs whose window leaves the volume (any value, NaN and +-Inf included: elsewhere
    the result is as exact as with cval=0). As in scipy, a zero weight is not part of the filter: NaN / Inf in
    the volume or in cval spread only through non-zero weights (with algorithm="auto"; "direct" and "torch"
    multiply zero weights like torch.conv3d, "fft" spreads a non-finite volume over the whole output)."""
    return _filter("correlate", volume, kernel, mode, cval, origin, algorithm, workers, flip=False)


def convolve(volume, kernel, *, mode="reflect", cval=0.0, origin=0, algorithm="auto", workers=None):
    """Multidimensional convolution of one 3D volume, with the results of ``scipy.ndimage.convolve``.
    Arguments as `correlate`."""
    return _filter("convolve", volume, kernel, mode, cval, origin, algorithm, workers, flip=True)
