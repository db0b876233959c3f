"""The cost model: predicted seconds of each algorithm for one convolution, and the choice of the cheapest.

Its machine constants (sustained rates per thread of the direct kernel by register block, of its weight-gradient
kernel, of the sparse kernel, of the fused separable pass, of oneDNN for channel-mixing layers, the bandwidth the
direct path streams at, a fixed cost per call, a factor on the FFT model) come from engine/calibration.py: this
machine's, stored by `volconv bench --calibrate`, or the defaults measured on the development machine."""
import sys

import numpy as np

from .. import _memory
from . import calibration, layout
from .layout import channel_block

TORCH_CALL = 100e-6   # seconds torch's conv3d spends before it computes (dispatch, oneDNN's primitive cache)


def memory_cost(nbytes):
    """Seconds to stream nbytes through memory at the direct path's rate."""
    return nbytes / calibration.current().bandwidth


def traffic(spec):
    """Bytes a direct-style kernel streams: its float32 input and output, once each."""
    return 4.0 * (np.prod(spec.x_shape, dtype=np.float64) + np.prod(spec.out_shape, dtype=np.float64))


def streaming_cost(spec, constants=None):
    """Seconds to call a direct-style kernel and stream its input and output through memory once (constants:
    calibration.Constants, this machine's by default)."""
    c = constants or calibration.current()
    return c.call_overhead + traffic(spec) / c.bandwidth


def direct_compute_cost(spec, nthreads):
    """Seconds of the direct kernel's arithmetic alone (the fused nested pass sums its stages')."""
    return spec.flops() / (calibration.current().direct_gflops(channel_block(spec)) * 1e9 * nthreads)


def direct_cost(spec, nthreads):
    return streaming_cost(spec) + direct_compute_cost(spec, nthreads)


def torch_cost(spec, nthreads):
    Cg, Og = spec.w_shape[1], spec.w_shape[0] // spec.groups
    if Cg < 4 or Og < 4:
        return np.inf    # oneDNN's per-channel 3D paths are far slower than the direct kernel
    return TORCH_CALL + spec.flops() / (calibration.current().torch_gflops * 1e9 * nthreads)


def fft_cost(spec, nthreads, *, calibrated=True):
    """engine/fft.py's model, fitted at 2 threads (calibrated: times this machine's measured factor)."""
    from . import fft   # scipy.fft takes 0.3 s to import: not at `import volconv`

    seconds = fft.fft_cost(spec.x_shape, spec.w_shape, spec.pads, spec.stride, spec.dilation, spec.groups,
                           mode=spec.mode, calibrated=calibrated)
    return seconds * 2 / min(nthreads, 2)


def wgrad_cost(spec, nthreads):
    return calibration.current().call_overhead + \
        spec.flops() / (calibration.current().wgrad_gflops(channel_block(spec)) * 1e9 * nthreads)


def sparse_cost(spec, nnz, nthreads):
    """Seconds the sparse kernel should take: nnz taps at every output voxel of their channel."""
    flops = 2.0 * nnz * spec.x_shape[0] * np.prod(spec.out_shape[2:], dtype=np.float64)
    return streaming_cost(spec) + flops / (calibration.current().sparse_gflops * 1e9 * nthreads)


def separable_cost(spec, taps, nthreads):
    """Seconds the fused separable pass should take: taps 1-D taps (summed over the terms and the three axes) at
    every output voxel."""
    flops = 2.0 * taps * np.prod(spec.out_shape, dtype=np.float64)
    return streaming_cost(spec) + flops / (calibration.current().separable_gflops * 1e9 * nthreads)


def algorithm_costs(spec, nthreads, *, allow_torch, nnz=None):
    """Predicted seconds of each algorithm that suits this convolution (the cost model)."""
    costs = {"direct": direct_cost(spec, nthreads)}
    if nnz is not None and nnz < 0.5 * np.prod(spec.w_shape):   # a mostly-zero weight: its non-zeros only
        costs["sparse"] = sparse_cost(spec, nnz, nthreads)
    if allow_torch and "torch" in sys.modules:
        costs["torch"] = torch_cost(spec, nthreads)
    if min(spec.kernel_size) > 3:
        costs["fft"] = fft_cost(spec, nthreads)
    return costs


def all_finite(*arrays):
    """Whether every value of these arrays (None skipped) is finite: the one test behind every algorithm choice
    that must keep NaN / Inf where torch puts them (tensors: volconv._dispatch.all_finite)."""
    return all(a is None or np.isfinite(a).all() for a in arrays)


def choose_algorithm(x, spec, nthreads, *, w=None, allow_torch, backward=False, nnz=None):
    """The cheapest algorithm by the cost model. backward: the call will be differentiated, so the cost is a
    training step's (forward + input gradient, about another forward, + weight gradient: the direct kernel's,
    or for fft and torch about one more forward). Non-finite input or weight w: direct or torch only (an FFT
    spreads NaN / Inf over the whole output; the sparse path skips zero weights, where torch has 0 * NaN = NaN)."""
    costs = algorithm_costs(spec, nthreads, allow_torch=allow_torch, nnz=nnz)
    if backward:  # torch: forward + backward ~ 3 forwards; fft: its weight gradient is another FFT convolution
        costs = {name: 3 * c if name in ("torch", "fft") else 2 * c + wgrad_cost(spec, nthreads)
                 for name, c in costs.items()}
    if len(costs) > 1 and not _memory.fits(layout.ring_bytes(spec, x.dtype.itemsize) * nthreads):
        # the direct kernels' rings of padded planes (direct, sparse) would not fit: another algorithm if any
        costs = {k: c for k, c in costs.items() if k not in ("direct", "sparse")} or costs
    name = min(costs, key=costs.get)
    if name in ("fft", "sparse") and not all_finite(x, w):
        costs = {k: c for k, c in costs.items() if k not in ("fft", "sparse")}
        name = min(costs, key=costs.get)
    return name
