"""This machine's cost-model constants, measured with the engine's own kernels (`volconv bench --calibrate`; stored
and read by engine/calibration.py): one representative call of each kernel, the best of several. The
weight-gradient rates, not timed, move with the direct rates of their block. The FFT model is not refitted: its
seconds are scaled by measured / predicted of one FFT convolution (the factor is the same for every plan)."""
import dataclasses
import importlib.util
import sys
import time

import numpy as np

from .. import _cpu
from .._validate import ConvSpec
from . import calibration, cost, dense, fft, separable, sparse


def _best(fn, repeats):
    """Best seconds of `repeats` calls after one warm-up call."""
    fn()
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _same(x_shape, w_shape):
    pads = tuple(((k - 1) // 2, k // 2) for k in w_shape[2:])
    return ConvSpec(x_shape, w_shape, stride=(1, 1, 1), pads=pads, dilation=(1, 1, 1), groups=1, mode="constant")


def measure(quick=False, nthreads=None):
    """This machine's constants, timed with the engine's own kernels on float32 at nthreads threads (None: every
    thread volconv uses), each the best of several calls: the call overhead (a tiny call), the bandwidth (a 1x1x1
    kernel on 160^3), the direct kernel by register block (a one-channel k=7, a 4- and a 16-channel k=3 layer),
    the sparse kernel, the fused separable pass, one FFT convolution, and torch's conv3d when torch is installed
    (not with quick). Rates are of the arithmetic alone: the call and the traffic, as the cost model counts them,
    are taken off. About 2 s on 2 quiet cores (torch's import aside); quick: fewer repeats, about 0.3 s."""
    nthreads = _cpu.threads(nthreads)
    repeats = 3 if quick else 15
    rng = np.random.default_rng(0)

    def operands(x_shape, w_shape):
        return (rng.standard_normal(x_shape, dtype=np.float32), rng.standard_normal(w_shape, dtype=np.float32),
                _same(x_shape, w_shape))

    def streaming(spec):
        return found["call_overhead"] + 4.0 * (np.prod(spec.x_shape) + np.prod(spec.out_shape)) / found["bandwidth"]

    def rate(flops, seconds, fixed):
        """GFLOP/s per thread of the arithmetic: the fixed part taken off (at most 90% of the time)."""
        return flops / (max(seconds - fixed, 0.1 * seconds) * 1e9 * nthreads)

    found = {}
    x, w, spec = operands((1, 1, 8, 8, 8), (1, 1, 1, 1, 1))
    found["call_overhead"] = _best(lambda: dense.run_direct(x, w, None, spec, nthreads), 5 * repeats)
    x, w, spec = operands((1, 1, 160, 160, 160), (1, 1, 1, 1, 1))   # 16 MB each way: past the cache
    seconds = _best(lambda: dense.run_direct(x, w, None, spec, nthreads), repeats)
    found["bandwidth"] = 4.0 * (x.size + np.prod(spec.out_shape)) / max(seconds - found["call_overhead"], 1e-9)

    for block, x_shape, w_shape in (1, (1, 1, 64, 64, 64), (1, 1, 7, 7, 7)), \
            (4, (1, 4, 48, 48, 48), (4, 4, 3, 3, 3)), (8, (1, 16, 48, 48, 48), (16, 16, 3, 3, 3)):
        x, w, spec = operands(x_shape, w_shape)
        seconds = _best(lambda: dense.run_direct(x, w, None, spec, nthreads), repeats)
        found[f"direct_gflops_{block}"] = rate(spec.flops(), seconds, streaming(spec))
        found[f"wgrad_gflops_{block}"] = calibration.DEFAULTS.wgrad_gflops(block) * (
            found[f"direct_gflops_{block}"] / calibration.DEFAULTS.direct_gflops(block))

    x, w, spec = operands((1, 1, 64, 64, 64), (1, 1, 7, 7, 7))
    w[rng.random(w.shape) > 0.15] = 0   # about 50 of the 343 taps
    indices = np.argwhere(w)
    values = w[tuple(indices.T)]
    seconds = _best(lambda: sparse.run(x, indices, values, None, spec, nthreads), repeats)
    found["sparse_gflops"] = rate(2.0 * len(values) * np.prod(spec.out_shape), seconds, streaming(spec))

    x, w, spec = operands((1, 1, 128, 128, 128), (1, 1, 17, 17, 17))   # a Gaussian of sigma 2 voxels
    f = np.exp(-0.5 * (np.arange(17) - 8.0) ** 2 / 4).astype(np.float32)
    seconds = _best(lambda: separable.separable_conv3d(x, f, f, f, spec, nthreads), repeats)
    found["separable_gflops"] = rate(2.0 * 3 * 17 * np.prod(spec.out_shape), seconds, streaming(spec))

    x, w, spec = operands((1, 1, 64, 64, 64), (1, 1, 9, 9, 9))
    seconds = _best(lambda: fft.fft_conv3d(x, w, None, spec.pads, spec.mode, spec.stride, spec.dilation, 1,
                                           nthreads), repeats)
    found["fft_scale"] = seconds / cost.fft_cost(spec, nthreads, calibrated=False)

    if not quick and _importable("torch"):
        x, w, spec = operands((1, 32, 32, 32, 32), (32, 32, 3, 3, 3))
        seconds = _best(lambda: dense.run_torch(x, w, None, spec, nthreads), repeats)
        found["torch_gflops"] = rate(spec.flops(), seconds, cost.TORCH_CALL)
    return dataclasses.replace(calibration.DEFAULTS, **{k: float(v) for k, v in found.items()})


def _importable(name):
    if name in sys.modules:
        return sys.modules[name] is not None
    return importlib.util.find_spec(name) is not None
