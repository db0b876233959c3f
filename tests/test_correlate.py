"""vc.correlate / vc.convolve against scipy.ndimage.correlate / convolve (run on float64 copies).

Tolerances: conftest.conv_tolerance with mag = scipy's filter of |volume| by |kernel| (cval -> |cval|): direct:
min(gamma_{n+2}, 4*sqrt(n+2)*eps) * mag per voxel, n = kernel voxels; fft / auto add the global FFT term
4*eps*log2(N)*max(mag). The reference is float64, so the comparison sees only volconv's rounding.
"""
import numpy as np
import pytest
import scipy.ndimage as ndi

from conftest import assert_within, config_rng, conv_tolerance, is_tensor, scipy_reference, to_f64

vc = pytest.importorskip("volconv")

MODES = ["reflect", "constant", "nearest", "mirror", "wrap", "grid-mirror", "grid-constant", "grid-wrap"]
FUNCS = ["correlate", "convolve"]
ALGORITHMS = ["auto", "direct", "fft"]


def check_filter(func_name, out, volume, kernel, *, mode, cval, origin, algorithm, context, compute=None):
    ref, mag = scipy_reference(func_name, volume, kernel, mode=mode, cval=cval, origin=origin)
    if compute is None:  # the float type volconv computes in: float64 stays, the rest is float32
        compute = np.float64 if str(volume.dtype).endswith("float64") else np.float32
    n_fft = int(np.prod([s + k for s, k in zip(volume.shape, kernel.shape)]))
    tol = conv_tolerance(mag, compute, int(np.prod(kernel.shape)), algorithm, n_fft)
    assert_within(out, ref, tol, context)


def _call(func_name, volume, kernel, **kw):
    before = (to_f64(volume).copy(), to_f64(kernel).copy())
    out = getattr(vc, func_name)(volume, kernel, **kw)
    assert np.array_equal(to_f64(volume), before[0]) and np.array_equal(to_f64(kernel), before[1]), \
        "an argument was modified in place"
    return out


# --------------------------------------------------------------------------------------------------------------
# every mode x odd / even / mixed kernels x origins x dtypes x algorithms
# --------------------------------------------------------------------------------------------------------------

KERNEL_CASES = [
    pytest.param((3, 3, 3), 0, id="k333-o0"),
    pytest.param((3, 3, 3), (1, -1, 0), id="k333-o(1,-1,0)"),
    pytest.param((2, 4, 2), 0, id="k242-o0"),
    pytest.param((2, 4, 2), -1, id="k242-o-1"),
    pytest.param((2, 4, 2), (0, 1, -1), id="k242-o(0,1,-1)"),
    pytest.param((1, 4, 5), (0, -2, 2), id="k145-o(0,-2,2)"),
    pytest.param((5, 6, 7), (-2, 2, 3), id="k567-o-extremes"),
]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kshape, origin", KERNEL_CASES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("func_name", FUNCS)
def test_modes_kernels_origins(func_name, mode, kshape, origin, dtype, algorithm, rng):
    volume = rng.standard_normal((9, 8, 10)).astype(dtype)
    kernel = rng.standard_normal(kshape).astype(dtype)
    cval = 1.75  # non-zero: must be used by the constant modes and ignored by every other mode
    out = _call(func_name, volume, kernel, mode=mode, cval=cval, origin=origin, algorithm=algorithm)
    assert isinstance(out, np.ndarray) and out.dtype == volume.dtype and out.shape == volume.shape
    check_filter(func_name, out, volume, kernel, mode=mode, cval=cval, origin=origin, algorithm=algorithm,
                 context=f"{func_name} mode={mode} kernel={kshape} origin={origin} {dtype} {algorithm}")


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("cval", [0.0, -3.0])
@pytest.mark.parametrize("mode", ["constant", "grid-constant"])
@pytest.mark.parametrize("func_name", FUNCS)
def test_constant_cval(func_name, mode, cval, algorithm, rng):
    volume = rng.standard_normal((7, 9, 8)) + 5.0  # far from cval, so a wrong fill value shows
    kernel = rng.standard_normal((3, 4, 5))
    out = _call(func_name, volume, kernel, mode=mode, cval=cval, algorithm=algorithm)
    check_filter(func_name, out, volume, kernel, mode=mode, cval=cval, origin=0, algorithm=algorithm,
                 context=f"{func_name} {mode} cval={cval} {algorithm}")


def test_defaults_are_scipy_defaults(rng):
    """mode='reflect', cval=0, origin=0 by default, as in scipy.ndimage."""
    volume = rng.standard_normal((6, 7, 8))
    kernel = rng.standard_normal((3, 2, 3))
    for func_name in FUNCS:
        out = getattr(vc, func_name)(volume, kernel)
        expected = getattr(ndi, func_name)(volume, kernel)
        np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("func_name", FUNCS)
def test_kernel_larger_than_volume(func_name, mode, algorithm, rng):
    """scipy extends the volume as far as the kernel needs, in every mode (several periods of reflect/wrap)."""
    volume = rng.standard_normal((4, 5, 3))
    kernel = rng.standard_normal((7, 6, 9))
    out = _call(func_name, volume, kernel, mode=mode, cval=0.5, origin=(1, -2, 3), algorithm=algorithm)
    check_filter(func_name, out, volume, kernel, mode=mode, cval=0.5, origin=(1, -2, 3), algorithm=algorithm,
                 context=f"{func_name} {mode} large kernel {algorithm}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("func_name", FUNCS)
def test_singleton_axes(func_name, mode, rng):
    """Axes of length 1 and 2 (mirror's period 2n-2 degenerates at n=1)."""
    volume = rng.standard_normal((1, 2, 6))
    kernel = rng.standard_normal((3, 3, 2))
    out = _call(func_name, volume, kernel, mode=mode, cval=-1.0, algorithm="direct")
    check_filter(func_name, out, volume, kernel, mode=mode, cval=-1.0, origin=0, algorithm="direct",
                 context=f"{func_name} {mode} singleton axes")


def test_convolve_flips_kernel(rng):
    """convolve == correlate with the flipped kernel (odd kernel: no centre shift); guards a missing flip."""
    volume = rng.standard_normal((6, 7, 8))
    kernel = rng.standard_normal((3, 3, 3))
    a = vc.convolve(volume, kernel, mode="wrap")
    b = vc.correlate(volume, kernel[::-1, ::-1, ::-1].copy(), mode="wrap")
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    assert not np.allclose(a, vc.correlate(volume, kernel, mode="wrap"))


# --------------------------------------------------------------------------------------------------------------
# integer promotion and containers
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("int_dtype, float_dtype", [("uint8", "float32"), ("int16", "float32"),
                                                     ("int32", "float64"), ("int64", "float64")])
@pytest.mark.parametrize("func_name", FUNCS)
def test_integer_volumes_are_promoted(func_name, int_dtype, float_dtype, algorithm, rng):
    info = np.iinfo(int_dtype)
    lo, hi = max(info.min, -1000), min(info.max, 1000)
    volume = rng.integers(lo, hi, size=(7, 8, 6), endpoint=True).astype(int_dtype)
    kernel = (rng.random((3, 2, 3)) / 3).astype(float_dtype)  # fractional weights: scipy would round these
    out = _call(func_name, volume, kernel, mode="nearest", algorithm=algorithm)
    assert out.dtype == np.dtype(float_dtype), f"{int_dtype} volume -> {out.dtype}, expected {float_dtype}"
    assert out.dtype == np.promote_types(int_dtype, np.float32)
    check_filter(func_name, out, volume, kernel, mode="nearest", cval=0.0, origin=0, algorithm=algorithm,
                 compute=np.dtype(float_dtype).type, context=f"{func_name} {int_dtype} {algorithm}")
    # not rounded to integers like scipy would
    assert not np.allclose(out, np.round(out))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("mode", ["reflect", "constant", "wrap"])
@pytest.mark.parametrize("func_name", FUNCS)
def test_torch_in_torch_out(func_name, mode, dtype, algorithm, rng):
    torch = pytest.importorskip("torch")
    v = rng.standard_normal((8, 7, 9))
    k = rng.standard_normal((3, 4, 3))
    volume = torch.from_numpy(v).to(getattr(torch, dtype))
    kernel = torch.from_numpy(k).to(getattr(torch, dtype))
    out = _call(func_name, volume, kernel, mode=mode, cval=0.5, origin=(0, 1, -1), algorithm=algorithm)
    assert is_tensor(out) and out.dtype == volume.dtype and out.device == volume.device
    assert tuple(out.shape) == tuple(volume.shape)
    check_filter(func_name, out, volume, kernel, mode=mode, cval=0.5, origin=(0, 1, -1), algorithm=algorithm,
                 compute=np.dtype(dtype).type, context=f"torch {func_name} {mode} {dtype} {algorithm}")


@pytest.mark.parametrize("int_dtype, float_dtype", [("uint8", "float32"), ("int16", "float32"),
                                                     ("int32", "float64")])
def test_torch_integer_volume_promoted(int_dtype, float_dtype, rng):
    torch = pytest.importorskip("torch")
    v = rng.integers(0, 200, size=(6, 7, 5)).astype(int_dtype)
    k = (rng.random((3, 3, 3)) / 4).astype(float_dtype)
    out = vc.correlate(torch.from_numpy(v), torch.from_numpy(k), mode="mirror")
    assert is_tensor(out) and out.dtype == getattr(torch, float_dtype)
    check_filter("correlate", out, v, k, mode="mirror", cval=0.0, origin=0, algorithm="auto",
                 compute=np.dtype(float_dtype).type, context=f"torch {int_dtype}")


@pytest.mark.parametrize("layout", ["strided", "transposed", "negative"])
def test_non_contiguous_numpy(layout, rng):
    base = rng.standard_normal((14, 16, 18))
    volume = {"strided": base[::2, 1::2, ::3],
              "transposed": base[:7, :8, :6].T,
              "negative": base[::-2, :, ::-3]}[layout]
    assert not volume.flags.c_contiguous
    kernel = rng.standard_normal((3, 2, 4))[:, ::-1, :]
    for func_name in FUNCS:
        out = _call(func_name, volume, kernel, mode="mirror")
        check_filter(func_name, out, volume, kernel, mode="mirror", cval=0.0, origin=0, algorithm="auto",
                     compute=np.float64, context=f"{func_name} {layout}")


# --------------------------------------------------------------------------------------------------------------
# random configurations
# --------------------------------------------------------------------------------------------------------------

N_RANDOM = 64


def random_filter_config(idx):
    r = config_rng(11, idx)
    shape = tuple(int(r.integers(3, 13)) for _ in range(3))
    kshape = tuple(int(r.integers(1, 8)) for _ in range(3))  # sometimes larger than the volume
    if r.random() < 0.5:
        origin = tuple(int(r.integers(-(k // 2), (k - 1) // 2 + 1)) for k in kshape)
    else:
        lo = max(-(k // 2) for k in kshape)
        hi = min((k - 1) // 2 for k in kshape)
        origin = int(r.integers(lo, hi + 1))
    return dict(func_name=FUNCS[idx % 2], shape=shape, kshape=kshape, origin=origin,
                mode=MODES[int(r.integers(0, len(MODES)))],
                cval=float(np.round(r.normal() * 3, 2)),
                dtype=str(r.choice(["float32", "float64"])),
                container=str(r.choice(["numpy", "numpy", "torch"])),
                algorithm=ALGORITHMS[(idx // 2) % 3])


@pytest.mark.parametrize("idx", range(N_RANDOM))
def test_random_filter(idx):
    cfg = random_filter_config(idx)
    r = config_rng(12, idx)
    v = r.standard_normal(cfg["shape"]).astype(cfg["dtype"])
    k = r.standard_normal(cfg["kshape"]).astype(cfg["dtype"])
    if cfg["container"] == "torch":
        torch = pytest.importorskip("torch")
        volume, kernel = torch.from_numpy(v), torch.from_numpy(k)
    else:
        volume, kernel = v, k
    out = _call(cfg["func_name"], volume, kernel, mode=cfg["mode"], cval=cfg["cval"], origin=cfg["origin"],
                algorithm=cfg["algorithm"])
    assert type(out) is type(volume) and out.dtype == volume.dtype
    check_filter(cfg["func_name"], out, v, k, mode=cfg["mode"], cval=cfg["cval"], origin=cfg["origin"],
                 algorithm=cfg["algorithm"], compute=np.dtype(cfg["dtype"]).type, context=f"config {idx}: {cfg}")


def test_random_filter_configs_cover_the_space():
    cfgs = [random_filter_config(i) for i in range(N_RANDOM)]
    assert {c["mode"] for c in cfgs} == set(MODES)
    assert {c["algorithm"] for c in cfgs} == set(ALGORITHMS)
    assert any(any(k > s for k, s in zip(c["kshape"], c["shape"])) for c in cfgs)
    assert any(isinstance(c["origin"], tuple) and any(c["origin"]) for c in cfgs)
    assert any(isinstance(c["origin"], int) and c["origin"] != 0 for c in cfgs)


# --------------------------------------------------------------------------------------------------------------
# NaN / Inf: as scipy (direct), only the voxels whose window holds them
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm", ["direct", "auto"])
@pytest.mark.parametrize("shape, ksize", [((14, 13, 12), 3), ((14, 13, 12), 9),
                                          ((20, 20, 20), 19)])  # the last: "auto" picks the FFT when finite
@pytest.mark.parametrize("mode", ["reflect", "constant", "wrap"])
def test_nan_propagates_like_scipy(mode, shape, ksize, algorithm, rng):
    volume = rng.standard_normal(shape)
    volume[5, 6, 7] = np.nan
    volume[1, 2, 3] = np.inf
    kernel = np.abs(rng.standard_normal((ksize,) * 3)) + 0.1  # positive: inf stays +inf
    out = vc.correlate(volume, kernel, mode=mode, algorithm=algorithm)
    expected = ndi.correlate(volume, kernel, mode=mode)
    assert np.isnan(expected).any() and np.isfinite(expected).any()
    np.testing.assert_array_equal(np.isnan(out), np.isnan(expected))
    np.testing.assert_array_equal(np.isposinf(out), np.isposinf(expected))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(out[finite], expected[finite], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("func_name", FUNCS)
@pytest.mark.parametrize("kind", ["gaussian", "dense", "sparse"])
def test_output_array(func_name, kind, rng):
    """output= as scipy.ndimage's: the result written into the given array, which is returned; the same values as
    without it. The Gaussian (separable) writes there itself when the array is contiguous in the volume's order
    and of its dtype (C or Fortran order); other arrays (another dtype, a strided view) get a copy."""
    func = getattr(vc, func_name)
    volume = rng.standard_normal((17, 20, 23)).astype(np.float32)
    kernel = {"gaussian": vc.kernels.gaussian((1.0, 1.5, 0.8)), "dense": rng.standard_normal((3, 4, 5)),
              "sparse": np.where(rng.random((5, 5, 5)) < 0.1, 1.0, 0.0)}[kind]
    want = func(volume, kernel, mode="nearest")
    for v, out in [(volume, np.full(volume.shape, np.nan, np.float32)),
                   (np.asfortranarray(volume), np.full(volume.shape, np.nan, np.float32, order="F")),
                   (volume, np.full(volume.shape, np.nan)),
                   (volume, np.full((17, 20, 46), np.nan, np.float32)[:, :, ::2])]:
        got = func(v, kernel, mode="nearest", output=out)
        assert got is out
        np.testing.assert_allclose(out, want, rtol=1e-6, atol=2e-5)   # Fortran order: the transposed sums


def test_output_may_be_the_volume(rng):
    """output=volume (in place, as scipy allows): the result of the volume as it was, not of half-written planes."""
    volume = rng.standard_normal((20, 24, 40)).astype(np.float32)
    want = vc.correlate(volume, vc.kernels.gaussian(2.0))
    assert vc.correlate(volume, vc.kernels.gaussian(2.0), output=volume) is volume
    np.testing.assert_array_equal(volume, want)


def test_output_array_refused(rng):
    """A wrong output names the argument and what was expected."""
    volume = rng.standard_normal((8, 9, 10)).astype(np.float32)
    k = vc.kernels.gaussian(1.0)
    with pytest.raises(ValueError, match="output must have the result's shape"):
        vc.correlate(volume, k, output=np.empty((8, 9, 11), np.float32))
    with pytest.raises(ValueError, match="output must be a writeable float32 or float64"):
        vc.correlate(volume, k, output=np.empty((8, 9, 10), np.int32))
    ro = np.empty((8, 9, 10), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        vc.correlate(volume, k, output=ro)
    with pytest.raises(TypeError, match="output must be a numpy array"):
        vc.correlate(volume, k, output=[[[0.0]]])


def test_output_written_in_place_by_the_separable_kernel(rng, monkeypatch):
    """The Gaussian into a C-contiguous float32 output: the fused kernel writes there, nothing is copied."""
    import volconv.ops.filtering as filtering

    volume = rng.standard_normal((12, 13, 40)).astype(np.float32)
    out = np.empty_like(volume)
    monkeypatch.setattr(filtering.np, "copyto", lambda *a, **k: pytest.fail("output was copied into"))
    vc.correlate(volume, vc.kernels.gaussian(1.2), output=out)
    np.testing.assert_allclose(out, ndi.gaussian_filter(volume.astype(np.float64), 1.2), atol=1e-5)
