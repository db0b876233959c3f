"""Dense 3D convolution by real FFTs (the 'fft' algorithm of volconv.conv3d).

Semantics are torch.nn.functional.conv3d's (cross-correlation, stride, dilation, groups) on numpy arrays.

How it works
------------
* Correlation is a product of spectra, X * conj(K): no kernel flip is needed, and the result is *circular*
  correlation, r[i] = sum_j x[(i + j) mod L] k[j].
* Zero padding is never materialised, and only the larger of its two sides costs transform length: the data
  sits after its lo leading zeros in a box of length L >= n + max(lo, hi); the reads of the last outputs run
  past the end of the box and wrap around into those leading zeros, which is exactly the hi trailing zeros
  they need. The textbook linear convolution needs L >= n + lo + hi (= n + k - 1 for 'same'). Other boundary
  modes are padded explicitly (one gather per axis, _validate.pad_array) and then treated like 'valid'.
* Channels: every input channel and every kernel is transformed once; a per-group contraction over input
  channels combines the spectra, so a call costs N*C + O*C/groups forward and N*O inverse transforms.
* Pruned transforms: the data fills only part of the box and the outputs only part of the result, so the
  forward transform goes axis by axis over the lines that are not all zeros (rfft along W on the d*h rows that
  exist, fft along H on the d planes that exist, then fft along D), and the inverse only over what is kept
  (ifft along D of everything, along H of the kept planes, irfft along W of the kept rows). This is where
  we beat scipy.signal.fftconvolve, which transforms the whole (larger) box both ways.
* Overlap-save blocks: for volumes much larger than the kernel the output is cut into blocks that each read
  their input plus a halo of kernel span - 1; all blocks share one box size (so one set of kernel spectra)
  and the memory stays bounded. Whole volume vs blocks, and the block size per axis, are chosen by the cost
  model below (the same model answers fft_cost); it often picks slabs (a few D planes, whole H and W), which
  the pruned transforms make cheap and which keep the working set in cache.
* Dilation places the taps on a dilated grid inside the kernel box. Stride computes every output position and
  then subsamples (only the kept planes/rows go through the last inverse stages, but the forward transforms
  and the first inverse stage do the work of stride 1): stride > 1 wastes work, by design of the FFT.

Precision: float32 stays float32 (complex64 spectra) end to end; float64 uses complex128. FFT rounding error
is global: about eps * log2(L) * sum|w| * max|x| on every output, not proportional to each output's size.
Non-finite input (NaN/Inf) spreads over the WHOLE output (every frequency sees every voxel); the caller's
'auto' picks another algorithm for such input.
"""
import functools
import itertools
import math
from typing import NamedTuple

import numpy as np
import scipy.fft as sfft

from .._validate import pad_array
from . import calibration

# Bytes of spectra a pass may hold (kernel spectra + input and output spectra of the batch chunk); larger problems
# are cut into blocks and batch chunks.
_SPECTRA_BUDGET = 512 * 2**20


class _Segment(NamedTuple):
    """One block along one axis."""

    out: slice  # output positions (after stride) the block writes
    src: slice  # input positions it reads (zero padding is not materialised)
    lead: int  # virtual zeros before src: where src sits in the transform box
    span: int  # padded-grid positions its outputs cover: step * (count - 1) + 1


class _Plan(NamedTuple):
    box: tuple  # transform lengths (D, H, W)
    segments: tuple  # per axis, list of _Segment
    batch: int  # samples per pass (memory bound)
    seconds: float  # model estimate


def fft_conv3d(x, weight, bias, pads, mode, stride, dilation, groups, nthreads):
    """torch.nn.functional.conv3d semantics (cross-correlation) on numpy arrays, via real FFTs.

    x: (N, C, D, H, W) C-contiguous float32/float64; weight: (O, C // groups, kd, kh, kw) same dtype;
    bias: None or (O,). pads: ((lo, hi),) * 3 applied before the 'valid' correlation, with boundary `mode`
    ('constant', 'reflect', 'mirror', 'nearest', 'wrap' as in scipy.ndimage; may exceed the axis length).
    stride, dilation: triples of positive ints; groups divides C and O; nthreads: scipy.fft workers.
    Returns a new C-contiguous (N, O, Do, Ho, Wo) array of x's dtype.
    """
    plan = _plan_for(x.shape, weight.shape, pads, mode, stride, dilation, groups, x.dtype)
    if mode != "constant":
        x = pad_array(x, pads, mode)
    kernel_spectra = _kernel_spectra(weight, dilation, plan.box, nthreads)
    n, o = x.shape[0], weight.shape[0]
    blocks = list(itertools.product(*plan.segments))
    if len(blocks) == 1 and plan.batch >= n and _nonempty(blocks[0]):
        out = _block(x, kernel_spectra, blocks[0], plan.box, stride, groups, nthreads)  # already a new array
    else:
        out = np.zeros((n, o) + tuple(s[-1].out.stop for s in plan.segments), x.dtype)
        for block in filter(_nonempty, blocks):  # blocks entirely in the zero padding stay 0
            for n0 in range(0, n, plan.batch):
                where = (slice(n0, n0 + plan.batch), slice(None)) + tuple(s.out for s in block)
                out[where] = _block(x[n0:n0 + plan.batch], kernel_spectra, block, plan.box, stride, groups,
                                    nthreads)
    if bias is not None:
        out += bias.reshape(1, -1, 1, 1, 1)
    return out


def fft_cost(x_shape, w_shape, pads, stride, dilation, groups, mode="constant", *, calibrated=True):
    """Estimated seconds for fft_conv3d with 2 threads (used by the 'auto' cost model): the model fitted below,
    times this machine's measured factor (engine/calibration.py) unless calibrated is False.

    mode (optional, default 'constant') matters: other modes pad explicitly, which makes the transforms larger."""
    seconds = _plan_for(x_shape, w_shape, pads, mode, stride, dilation, groups, np.float32).seconds
    return seconds * calibration.current().fft_scale if calibrated else seconds


def box_cost(box, transforms, products):
    """Estimated seconds (2 threads) of `transforms` whole real transforms (forward or inverse) of one box and
    `products` spectrum-by-spectrum products on it: the cost model's rates, for callers that transform a
    fixed box again and again (engine/deconvolution.py); times this machine's measured factor."""
    box = tuple(int(v) for v in box)
    spectrum = box[0] * box[1] * (box[2] // 2 + 1)
    seconds = transforms * _COST[0] * _transform_work(box, box[0], box[0] * box[1], (1, 1, 1)) + \
        products * _COST[1] * spectrum
    return seconds * calibration.current().fft_scale


# ----------------------------------------------------------------------------------------------------------------
# the computation of one block
# ----------------------------------------------------------------------------------------------------------------

def _block(x, kernel_spectra, block, box, stride, groups, nthreads):
    """Output block (N, O, counts...) of the correlation: forward, contract, inverse."""
    data = x[(slice(None), slice(None)) + tuple(s.src for s in block)]
    workers = _workers(x.shape[0] * max(x.shape[1], kernel_spectra.shape[0]), box, nthreads)
    spectra = _forward(data, box, [s.lead for s in block], workers)
    spectra = _contract(spectra, kernel_spectra, groups)
    return _inverse(spectra, box, [s.span for s in block], stride, workers)


def _forward(a, box, offsets, workers):
    """rfftn of a (..., d, h, w) placed at offsets in a zero box, pruned: each axis is transformed only on the
    lines that are not all zeros (rfft along W on the d*h rows that exist, fft along H on the d planes that
    exist, then fft along D)."""
    a = sfft.rfft(_embed(a, -1, box[2], offsets[2]), axis=-1, workers=workers)
    a = sfft.fft(_embed(a, -2, box[1], offsets[1]), axis=-2, overwrite_x=True, workers=workers)
    return sfft.fft(_embed(a, -3, box[0], offsets[0]), axis=-3, overwrite_x=True, workers=workers)


def _embed(a, axis, length, offset):
    """a zero-padded to length along axis, starting at offset (a itself when it already fills the length)."""
    if a.shape[axis] == length:
        return a
    shape = list(a.shape)
    shape[axis] = length
    out = np.zeros(shape, a.dtype)
    where = [slice(None)] * a.ndim
    where[axis] = slice(offset, offset + a.shape[axis])
    out[tuple(where)] = a
    return out


def _inverse(spectra, box, spans, stride, workers):
    """irfftn of spectra (..., D, H, W // 2 + 1) at positions range(0, span, step) per axis, pruned: ifft along D
    of everything, along H of the kept planes only, irfft along W of the kept rows only."""
    keep = [slice(0, span, step) for span, step in zip(spans, stride)]
    a = sfft.ifft(spectra, axis=-3, overwrite_x=True, workers=workers)
    a = sfft.ifft(a[..., keep[0], :, :], axis=-2, overwrite_x=True, workers=workers)  # in place on the view
    a = sfft.irfft(a[..., keep[1], :], n=box[2], axis=-1, workers=workers)
    return np.ascontiguousarray(a[..., keep[2]])


def _contract(x_spectra, kernel_spectra, groups):
    """Per group, y[n, o] = sum_c x[n, c] * k[o, c] over the spectra (kernel spectra are already conjugated)."""
    n, c = x_spectra.shape[:2]
    o, cg = kernel_spectra.shape[:2]
    if o == c and cg == 1:  # one kernel per channel (single channel, depthwise): multiply in place
        return np.multiply(x_spectra, kernel_spectra[:, 0], out=x_spectra)
    xs = x_spectra.reshape(n, groups, 1, cg, -1)
    ks = kernel_spectra.reshape(1, groups, o // groups, cg, -1)
    y = xs[:, :, :, 0] * ks[:, :, :, 0]
    for ci in range(1, cg):
        y += xs[:, :, :, ci] * ks[:, :, :, ci]
    return y.reshape((n, o) + x_spectra.shape[2:])


def _kernel_spectra(weight, dilation, box, nthreads):
    """Conjugated spectra (O, C/g, box...) of the kernels, taps placed on the dilated grid at the box origin."""
    o, cg = weight.shape[:2]
    workers = _workers(o * cg, box, nthreads)
    spans = tuple(d * (k - 1) + 1 for k, d in zip(weight.shape[2:], dilation))
    dilated = np.zeros((o, cg) + spans, weight.dtype)
    dilated[(slice(None), slice(None)) + tuple(slice(None, None, d) for d in dilation)] = weight
    spectra = _forward(dilated, box, (0, 0, 0), workers)
    return np.conjugate(spectra, out=spectra)  # conj: correlation, not convolution


def _workers(transforms, box, nthreads):
    """Threads for the transforms of one pass: starting pocketfft's threads costs ~15 us a call, more than
    splitting a small array saves (measured crossover: about 32k complex points per call)."""
    return nthreads if transforms * box[0] * box[1] * (box[2] // 2 + 1) >= 32768 else 1


def _nonempty(block):
    """Whether the block reads any input (blocks lying wholly in the zero padding output just the bias)."""
    return all(s.src.stop > s.src.start for s in block)


# ----------------------------------------------------------------------------------------------------------------
# planning: blocks, box and cost model
# ----------------------------------------------------------------------------------------------------------------

def _segments(n, pads, span, step, per_block):
    """Cut one axis of the output into blocks of per_block outputs (overlap-save)."""
    lo, hi = pads
    n_out = (n + lo + hi - span) // step + 1
    segments = []
    for j in range(0, n_out, per_block):
        count = min(per_block, n_out - j)
        first = j * step - lo  # first input position read (x coordinates; negative = in the padding)
        stop = first + step * (count - 1) + span
        start = min(max(first, 0), n)
        src = slice(start, max(min(stop, n), start))
        segments.append(_Segment(slice(j, j + count), src, start - first, step * (count - 1) + 1))
    return segments


def _box_length(segments, span):
    """Smallest fast length that holds every block without circular aliasing: its leading zeros and data
    (lead + len), the reads of its outputs minus the leading zeros they may wrap into (reach - lead), and the
    outputs themselves."""
    need = span
    for s in segments:
        if s.src.stop > s.src.start:
            need = max(need, s.src.stop - s.src.start + s.lead, s.span + span - 1 - s.lead, s.span)
    return sfft.next_fast_len(need, real=True)


def _plan_for(x_shape, w_shape, pads, mode, stride, dilation, groups, dtype):
    """The plan for these arguments (hashable copies, so that plans are cached); a non-constant mode is planned
    as 'valid' on the explicitly padded input."""
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    x_shape = tuple(int(v) for v in x_shape)
    if mode != "constant":
        x_shape = x_shape[:2] + tuple(v + lo + hi for v, (lo, hi) in zip(x_shape[2:], pads))
        pads = ((0, 0),) * 3
    return _plan(x_shape, tuple(int(v) for v in w_shape), pads, tuple(stride), tuple(dilation), int(groups),
                 np.dtype(dtype), _SPECTRA_BUDGET)


@functools.lru_cache(maxsize=256)
def _plan(x_shape, w_shape, pads, stride, dilation, groups, dtype, budget):
    """Choose whole volume or overlap-save blocks (and their size) by the cost model among the plans whose spectra
    fit in budget bytes; if none fits, the plan that needs the least memory."""
    n, c = x_shape[:2]
    o, cg = w_shape[:2]
    spans = [d * (k - 1) + 1 for k, d in zip(w_shape[2:], dilation)]
    complex_bytes = 2 * np.dtype(dtype).itemsize
    axes = list(zip(x_shape[2:], pads, spans, stride))
    best = None
    for per_block in itertools.product(*(_block_sizes(*axis) for axis in axes)):
        segments = tuple(_segments(*axis, b) for axis, b in zip(axes, per_block))
        box = tuple(_box_length(s, span) for s, span in zip(segments, spans))
        spectrum = box[0] * box[1] * (box[2] // 2 + 1) * complex_bytes
        batch = max(1, min(n, (budget // spectrum - o * cg) // (c + o)))
        memory = spectrum * (o * cg + batch * (c + o))
        seconds = float(np.dot(_COST, _cost_features(n, c, o, cg, spans, box, segments, batch)))
        key = (memory > budget, memory if memory > budget else seconds)
        if best is None or key < best[0]:
            best = (key, _Plan(box, segments, batch, seconds))
    return best[1]


def _block_sizes(size, pads, span, step):
    """Candidate outputs per block along one axis: the whole axis, and boxes of about 2, 4, 8, ... spans."""
    n_out = (size + pads[0] + pads[1] - span) // step + 1
    sizes = [n_out]
    length = sfft.next_fast_len(max(2 * span, 8), real=True)
    while True:
        per_block = (length - span) // step + 1
        if per_block * 2 > n_out:
            return sizes
        sizes.append(per_block)
        length = sfft.next_fast_len(2 * length, real=True)


# Cost model: seconds = _COST . _cost_features(...) (plans are compared by it; a calibrated machine's factor, the
# same for every plan, enters only fft_cost and box_cost), fitted (non-negative least squares on relative error) to
# min-of-repeats timings of fft_conv3d, float32, 2 threads, on this machine (AMD EPYC Zen 4, 2 cores, 32 MiB L3)
# over 133 plans: 8^3..192^3 volumes, kernels 3..31, 1..16 channels, groups, stride, dilation, forced blocks.
# Measured/predicted: within x0.77..x1.21 for 80% of them, worst x0.42 (a 32^3 volume with a 15^3 kernel).
# For scale: a 135^3 box costs 2.6e7 points*log2 per full transform, i.e. ~5.6 ms.
_COST = np.array([
    2.15e-10,  # per complex point * log2(length) of the 1D transform stages (rfft rows count half)
    1.35e-9,  # per complex multiply-add of the channel contraction
    3.8e-5,  # per pass (block x batch chunk): Python and call overheads, padding copies
    2.3e-5,  # per call: planning (cached), kernel set-up
])


def _cost_features(n, c, o, cg, spans, box, segments, batch):
    """Work of a plan, counted as the pruned transforms do it: [transform points*log2, contraction MACs, passes,
    1]. Sums over blocks factor into per-axis sums (count: non-empty blocks, data: input positions read, kept:
    output positions made)."""
    live = [[s for s in seg if s.src.stop > s.src.start] for seg in segments]
    count = [len(seg) for seg in live]
    data = [sum(s.src.stop - s.src.start for s in seg) for seg in live]
    kept = [sum(s.out.stop - s.out.start for s in seg) for seg in live]
    blocks = count[0] * count[1] * count[2]
    flops = (n * c * _transform_work(box, data[0], data[0] * data[1], count)  # forward of the input
             + o * cg * _transform_work(box, spans[0], spans[0] * spans[1], (1, 1, 1))  # of the kernels, once
             + n * o * _transform_work(box, kept[0], kept[0] * kept[1], count))  # inverse, same shape
    macs = blocks * n * o * cg * box[0] * box[1] * (box[2] // 2 + 1)
    return np.array([flops, macs, blocks * -(-n // batch), 1.0])


def _transform_work(box, planes, rows, count):
    """Points * log2(length) of the pruned transforms of all blocks: `planes` D-planes and `rows` (D, H)-rows hold
    data (forward) or are kept (inverse), summed over the blocks; the D-stage always covers the whole box."""
    ld, lh, lw = box
    fw = lw // 2 + 1
    rows_w = rows * count[2]  # real transforms along W: half a complex one each
    lines_h = planes * count[1] * count[2] * fw
    lines_d = count[0] * count[1] * count[2] * lh * fw
    return rows_w * lw * math.log2(lw) / 2 + lines_h * lh * math.log2(lh) + lines_d * ld * math.log2(ld)
