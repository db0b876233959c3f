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


def _best_times(calls, rounds):
    """{name: fn} -> {name: best seconds}: one warm-up call each, then `rounds` rounds over all of them, so that
    a burst of other work on the machine spoils one round of each rather than every call of one; each call twice
    in a row (the second finds the threads awake and the caches its own, as a call among others of its kind)."""
    for fn in calls.values():
        fn()
    best = dict.fromkeys(calls, np.inf)
    for _ in range(rounds):
        for name, fn in calls.items():
            for _ in range(2):
                t0 = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t0)
    return best


def _same(x_shape, w_shape, rng):
    """Random float32 operands and the geometry of a 'same' correlation."""
    pads = tuple(((k - 1) // 2, k // 2) for k in w_shape[2:])
    return (rng.standard_normal(x_shape, dtype=np.float32), rng.standard_normal(w_shape, dtype=np.float32),
            ConvSpec(x_shape, w_shape, stride=(1, 1, 1), pads=pads, dilation=(1, 1, 1), groups=1, mode="constant"))


BLOCKS = {1: ((1, 1, 64, 64, 64), (1, 1, 7, 7, 7)), 4: ((1, 4, 48, 48, 48), (4, 4, 3, 3, 3)),
          8: ((1, 16, 48, 48, 48), (16, 16, 3, 3, 3))}   # the direct kernel's register blocks: a layer for each


def measure(quick=False, nthreads=None):
    """This machine's constants, timed with the engine's own kernels on float32 at nthreads threads (None: every
    thread volconv uses), each the best of several calls: the call overhead (a tiny call), the bandwidth (a 1x1x1
    kernel on 160^3), the direct kernel by register block (a one-channel k=7, a 4- and a 16-channel k=3 layer),
    the sparse kernel, the fused separable pass, one FFT convolution, and torch's conv3d when torch is installed
    (not with quick). Rates are of the arithmetic alone: the call and the traffic, as the cost model counts them,
    are taken off. About 0.6 s on 2 quiet cores (torch's import aside); quick: 2 rounds instead of 8, 0.2 s."""
    nthreads = _cpu.threads(nthreads)
    rng = np.random.default_rng(0)
    calls, specs, flops = {}, {}, {}

    def direct(name, x, w, spec):
        calls[name], specs[name], flops[name] = (lambda: dense.run_direct(x, w, None, spec, nthreads)), spec, \
            spec.flops()

    direct("call_overhead", *_same((1, 1, 8, 8, 8), (1, 1, 1, 1, 1), rng))
    direct("bandwidth", *_same((1, 1, 160, 160, 160), (1, 1, 1, 1, 1), rng))   # 16 MB each way: past the cache
    for block, shapes in BLOCKS.items():
        direct(f"direct_gflops_{block}", *_same(*shapes, rng))

    x, w, spec = _same((1, 1, 64, 64, 64), (1, 1, 7, 7, 7), rng)
    w[rng.random(w.shape) > 0.15] = 0   # about 50 of the 343 taps
    indices = np.argwhere(w)
    values = w[tuple(indices.T)]
    calls["sparse_gflops"] = lambda: sparse.run(x, indices, values, None, spec, nthreads)
    specs["sparse_gflops"], flops["sparse_gflops"] = spec, 2.0 * len(values) * np.prod(spec.out_shape)

    xs, _, sspec = _same((1, 1, 128, 128, 128), (1, 1, 17, 17, 17), rng)   # a Gaussian of sigma 2 voxels
    f = np.exp(-0.5 * (np.arange(17) - 8.0) ** 2 / 4).astype(np.float32)
    calls["separable_gflops"] = lambda: separable.separable_conv3d(xs, f, f, f, sspec, nthreads)
    specs["separable_gflops"], flops["separable_gflops"] = sspec, 2.0 * 3 * 17 * np.prod(sspec.out_shape)

    xf, wf, fspec = _same((1, 1, 64, 64, 64), (1, 1, 9, 9, 9), rng)
    calls["fft_scale"] = lambda: fft.fft_conv3d(xf, wf, None, fspec.pads, fspec.mode, fspec.stride,
                                                fspec.dilation, 1, nthreads)

    if not quick and _importable("torch"):
        xt, wt, tspec = _same((1, 32, 32, 32, 32), (32, 32, 3, 3, 3), rng)
        calls["torch_gflops"] = lambda: dense.run_torch(xt, wt, None, tspec, nthreads)

    seconds = _best_times(calls, 2 if quick else 8)
    found = {"call_overhead": seconds["call_overhead"]}
    found["bandwidth"] = cost.traffic(specs["bandwidth"]) / max(seconds["bandwidth"] - found["call_overhead"],
                                                                1e-9)
    measured = dataclasses.replace(calibration.DEFAULTS, **found)   # the call and the traffic as just measured

    def rate(name, fixed):
        """GFLOP/s per thread of the arithmetic: the fixed part taken off (at most 90% of the time)."""
        return flops[name] / (max(seconds[name] - fixed, 0.1 * seconds[name]) * 1e9 * nthreads)

    for name in ["sparse_gflops", "separable_gflops"] + [f"direct_gflops_{block}" for block in BLOCKS]:
        found[name] = rate(name, cost.streaming_cost(specs[name], measured))
    for block in BLOCKS:   # the weight-gradient kernel is not timed: it moves with the direct kernel
        found[f"wgrad_gflops_{block}"] = calibration.DEFAULTS.wgrad_gflops(block) * (
            found[f"direct_gflops_{block}"] / calibration.DEFAULTS.direct_gflops(block))
    found["fft_scale"] = seconds["fft_scale"] / cost.fft_cost(fspec, nthreads, calibrated=False)
    if "torch_gflops" in calls:
        flops["torch_gflops"] = tspec.flops()
        found["torch_gflops"] = rate("torch_gflops", cost.TORCH_CALL)
    return dataclasses.replace(calibration.DEFAULTS, **{k: float(v) for k, v in found.items()})


def _importable(name):
    if name in sys.modules:
        return sys.modules[name] is not None
    return importlib.util.find_spec(name) is not None
