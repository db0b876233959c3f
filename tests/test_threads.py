"""Threads change the speed, never the result.

"direct" splits independent outputs across threads, every output's sum is done in the same order whatever the
thread count, so results must be BITWISE identical for workers=1, 2, 3, -1, None, and under threadpoolctl's
limit. "fft" (scipy.fft) parallelises over independent lines too, but we only require agreement within a few
ulps of the output's scale: 4 * eps * max|y| (much tighter than the FFT's own error bound). "auto" may pick a
different algorithm for a different thread count (its cost model depends on it), so it gets the FFT bound of
conftest.conv_tolerance.
"""
import os

import numpy as np
import pytest

from conftest import assert_within, conv_tolerance, ref_conv3d

vc = pytest.importorskip("volconv")
threadpoolctl = pytest.importorskip("threadpoolctl")

WORKERS = [1, 2, 3, -1, -2, None]

CONV_CASES = [
    pytest.param(((1, 1, 13, 11, 9), (1, 1, 3, 3, 3)), dict(padding=1), id="single-channel"),
    pytest.param(((2, 4, 10, 9, 11), (8, 2, 3, 3, 3)), dict(padding=1, groups=2, stride=2), id="groups-stride"),
    pytest.param(((1, 3, 12, 10, 9), (4, 3, 3, 2, 4)), dict(padding=(2, 1, 3), dilation=(2, 1, 2),
                                                            padding_mode="reflect"), id="reflect-dil"),
    pytest.param(((2, 2, 9, 14, 7), (3, 2, 5, 5, 5)), dict(padding="same", padding_mode="circular"),
                 id="circular-k5"),
]


def _inputs(shapes, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x_shape, w_shape = shapes
    return (rng.standard_normal(x_shape).astype(dtype), rng.standard_normal(w_shape).astype(dtype),
            rng.standard_normal(w_shape[0]).astype(dtype))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shapes, kw", CONV_CASES)
def test_conv3d_direct_bitwise_across_workers(shapes, kw, dtype):
    x, w, b = _inputs(shapes, dtype)
    base = vc.conv3d(x, w, b, **kw, algorithm="direct", workers=1)
    for workers in WORKERS[1:]:
        out = vc.conv3d(x, w, b, **kw, algorithm="direct", workers=workers)
        np.testing.assert_array_equal(out, base, err_msg=f"workers={workers}")
    with threadpoolctl.threadpool_limits(limits=1):
        out = vc.conv3d(x, w, b, **kw, algorithm="direct")
    np.testing.assert_array_equal(out, base, err_msg="threadpool_limits(1)")
    with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
        out = vc.conv3d(x, w, b, **kw, algorithm="direct", workers=None)
    np.testing.assert_array_equal(out, base, err_msg="threadpool_limits(1, openmp)")
    # and the common result is right (a bitwise-stable wrong answer is still wrong)
    ref, mag = ref_conv3d(x, w, b, **kw)
    assert_within(base, ref, conv_tolerance(mag, np.dtype(dtype), int(np.prod(w.shape[1:])), "direct"),
                  f"direct {kw}")


@pytest.mark.parametrize("algorithm", ["fft", "auto"])
@pytest.mark.parametrize("shapes, kw", CONV_CASES)
def test_conv3d_fft_auto_stable_across_workers(shapes, kw, algorithm):
    x, w, b = _inputs(shapes, np.float32, seed=1)
    base = vc.conv3d(x, w, b, **kw, algorithm=algorithm, workers=1).astype(np.float64)
    ref, mag = ref_conv3d(x, w, b, **kw)
    if algorithm == "fft":
        tol = 4 * np.finfo(np.float32).eps * np.abs(base).max()
    else:
        tol = 2 * conv_tolerance(mag, np.float32, int(np.prod(w.shape[1:])), "auto")
    outs = {wk: vc.conv3d(x, w, b, **kw, algorithm=algorithm, workers=wk) for wk in WORKERS[1:]}
    with threadpoolctl.threadpool_limits(limits=1):
        outs["threadpool_limits(1)"] = vc.conv3d(x, w, b, **kw, algorithm=algorithm)
    for key, out in outs.items():
        assert_within(out, base, np.broadcast_to(tol, base.shape), f"{algorithm} workers={key} vs workers=1")


@pytest.mark.parametrize("func_name", ["correlate", "convolve"])
@pytest.mark.parametrize("mode", ["reflect", "constant", "wrap"])
def test_filter_direct_bitwise_across_workers(func_name, mode):
    rng = np.random.default_rng(2)
    volume = rng.standard_normal((14, 13, 12)).astype(np.float32)
    kernel = rng.standard_normal((5, 4, 3)).astype(np.float32)
    f = getattr(vc, func_name)
    base = f(volume, kernel, mode=mode, cval=0.5, algorithm="direct", workers=1)
    for workers in WORKERS[1:]:
        np.testing.assert_array_equal(f(volume, kernel, mode=mode, cval=0.5, algorithm="direct", workers=workers),
                                      base, err_msg=f"workers={workers}")
    with threadpoolctl.threadpool_limits(limits=1):
        np.testing.assert_array_equal(f(volume, kernel, mode=mode, cval=0.5, algorithm="direct"), base)


def test_backward_bitwise_across_workers():
    """The training path (input and weight gradients) is deterministic too."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    x0 = torch.from_numpy(rng.standard_normal((2, 4, 9, 10, 8)).astype(np.float32))
    w0 = torch.from_numpy(rng.standard_normal((6, 2, 3, 3, 3)).astype(np.float32))
    b0 = torch.from_numpy(rng.standard_normal(6).astype(np.float32))
    grads = {}
    for workers in [1, 2, -1, None]:
        x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        out = vc.conv3d(x, w, b, stride=(1, 2, 1), padding=1, groups=2, padding_mode="replicate",
                        algorithm="direct", workers=workers)
        out.backward(torch.ones_like(out) * 0.5 + torch.arange(out.numel()).reshape(out.shape) % 7)
        grads[workers] = (out.detach(), x.grad, w.grad, b.grad)
    for workers, g in grads.items():
        for name, a, e in zip(("output", "input grad", "weight grad", "bias grad"), g, grads[1]):
            assert torch.equal(a, e), f"{name} differs between workers={workers} and workers=1"


def test_workers_negative_counts_from_cores():
    """-1 means every core, -cores means one thread; both valid on any machine."""
    x, w, b = _inputs(CONV_CASES[0].values[0], np.float64)
    cores = os.cpu_count()
    a = vc.conv3d(x, w, b, padding=1, algorithm="direct", workers=-1)
    c = vc.conv3d(x, w, b, padding=1, algorithm="direct", workers=-cores)
    np.testing.assert_array_equal(a, c)
