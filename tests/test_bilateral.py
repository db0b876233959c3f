"""vc.bilateral_filter against a brute-force numpy bilateral filter (every tap's weight computed in float64 with
np.exp, the volume and guide extended by np.pad), scipy.ndimage.gaussian_filter (sigma_range = inf) and the
filter's own invariants (a constant volume, an edge kept, NaN's reach).

Tolerances: the largest difference relative to the reference's largest magnitude, 2e-5 in float32 (float32
inputs, weights summed in float32 over up to a few thousand taps) and 1e-12 in float64."""
import math

import numpy as np
import pytest
import scipy.ndimage as ndi

import volconv as vc
from volconv._validate import NUMPY_PAD_MODES
from volconv.ops import bilateral as bilateral_op

from conftest import config_rng

TOL = {np.float32: 2e-5, np.float64: 1e-12}
MODES = ("reflect", "constant", "nearest", "mirror", "wrap")


def reference(x, sigma, sigma_range, zooms=(1.0, 1.0, 1.0), guide=None, truncate=3.0, mode="reflect", cval=0.0,
              valid=None):
    """The definition, tap by tap over the box window, in float64. valid: False voxels (and, with the mask
    padded by the mode, their images beyond the edge) get weight 0."""
    x = np.asarray(x, np.float64)
    g = x if guide is None else np.asarray(guide, np.float64)
    sigma = np.broadcast_to(np.asarray(sigma, np.float64), (3,))
    r = [int(truncate * s / z + 0.5) if s > 0 else 0 for s, z in zip(sigma, zooms)]
    kw = dict(constant_values=cval) if mode == "constant" else {}
    xp, gp = (np.pad(a, [(q, q) for q in r], NUMPY_PAD_MODES[mode], **kw) for a in (x, g))
    mp = None if valid is None else np.pad(valid, [(q, q) for q in r], NUMPY_PAD_MODES[mode],
                                           **(dict(constant_values=True) if mode == "constant" else {}))
    num, den = np.zeros(x.shape), np.zeros(x.shape)
    D, H, W = x.shape
    for a in range(-r[0], r[0] + 1):
        for b in range(-r[1], r[1] + 1):
            for c in range(-r[2], r[2] + 1):
                spatial = sum((t * z / s) ** 2 for t, z, s in zip((a, b, c), zooms, sigma) if s > 0)
                sl = (slice(r[0] + a, r[0] + a + D), slice(r[1] + b, r[1] + b + H), slice(r[2] + c, r[2] + c + W))
                with np.errstate(invalid="ignore", over="ignore"):
                    k = np.exp(-0.5 * spatial - (gp[sl] - g) ** 2 / (2.0 * sigma_range ** 2))
                    if mp is not None:
                        k = np.where(mp[sl], k, 0.0)
                        num += np.where(mp[sl], k * xp[sl], 0.0)
                    else:
                        num += k * xp[sl]
                den += k
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / den


def assert_close(out, ref, dtype):
    assert out.dtype == dtype and out.shape == ref.shape
    scale = max(1.0, float(np.abs(ref[np.isfinite(ref)]).max(initial=0.0)))
    np.testing.assert_array_equal(np.isfinite(out), np.isfinite(ref))
    err = np.abs(out.astype(np.float64) - ref)[np.isfinite(ref)].max(initial=0.0) / scale
    assert err <= TOL[dtype], f"relative error {err:.3g} > {TOL[dtype]:g}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(9, 10, 37), (4, 6, 7), (12, 11, 34)])
def test_against_reference(shape, mode, dtype, rng):
    x = (rng.normal(size=shape) * 10).astype(dtype)
    kw = dict(zooms=(1.0, 1.2, 0.9), mode=mode, cval=3.0)
    out = vc.bilateral_filter(x, (1.5, 1.0, 2.0), 7.0, **kw)
    assert_close(out, reference(x, (1.5, 1.0, 2.0), 7.0, **kw), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_joint_bilateral_follows_the_guide(dtype, rng):
    x = rng.normal(size=(10, 12, 33)).astype(dtype)
    guide = rng.normal(size=x.shape) * 3
    out = vc.bilateral_filter(x, 1.3, 0.8, guide=guide)
    assert_close(out, reference(x, 1.3, 0.8, guide=guide), dtype)
    # the range term reads the guide, not the volume: a different guide gives a different result
    assert np.abs(out - vc.bilateral_filter(x, 1.3, 0.8)).max() > 0.05


@pytest.mark.parametrize("case", range(12))
def test_random_cases(case):
    r = config_rng(18, case)
    shape = tuple(int(n) for n in r.integers(1, 14, size=3))
    dtype = (np.float32, np.float64)[case % 2]
    sigma = tuple(float(s) for s in r.choice([0.0, 0.6, 1.0, 1.7], size=3))
    zooms = tuple(float(z) for z in r.uniform(0.7, 1.5, size=3))
    truncate = float(r.uniform(1.0, 3.0))
    mode = MODES[case % len(MODES)]
    x = (r.normal(size=shape) * r.uniform(0.1, 100)).astype(dtype)
    sr = float(r.uniform(0.2, 3.0) * x.std() + 1e-3)
    guide = r.normal(size=shape) * x.std() if case % 3 == 0 else None
    out = vc.bilateral_filter(x, sigma, sr, zooms, guide=guide, truncate=truncate, mode=mode, cval=-1.5)
    ref = reference(x, sigma, sr, zooms, guide=guide, truncate=truncate, mode=mode, cval=-1.5)
    assert_close(out, ref, dtype)


def test_infinite_range_is_the_gaussian(rng):
    """sigma_range = inf: the normalised Gaussian of scipy.ndimage.gaussian_filter (sigma in mm / zooms)."""
    x = rng.normal(size=(14, 15, 40))
    zooms = (1.0, 2.0, 0.8)
    out = vc.bilateral_filter(x, 2.0, math.inf, zooms, truncate=2.0, mode="nearest")
    ref = ndi.gaussian_filter(x, [2.0 / z for z in zooms], truncate=2.0, mode="nearest")
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12)


def test_edges_are_kept_and_flat_regions_smoothed(rng):
    """A step of height 100 with noise of 1: the bilateral filter with sigma_range 5 keeps the step (each side
    averages only itself), where a Gaussian of the same width blurs it; both reduce the noise."""
    x = np.zeros((16, 16, 32))
    x[..., 16:] = 100.0
    noisy = x + rng.normal(size=x.shape)
    out = vc.bilateral_filter(noisy, 1.5, 5.0)
    assert np.abs(out - x).max() < 3.0
    assert np.std(out - x) < 0.5 * np.std(noisy - x)
    assert np.abs(ndi.gaussian_filter(noisy, 1.5, truncate=3.0) - x).max() > 30


def test_constant_volume_and_zero_sigma(rng):
    c = np.full((5, 6, 7), 4.25, np.float32)
    np.testing.assert_array_equal(vc.bilateral_filter(c, 2.0, 1.0), c)
    x = rng.normal(size=(5, 6, 7))
    np.testing.assert_array_equal(vc.bilateral_filter(x, 0.0, 1.0), x)   # a window of one voxel
    # sigma 0 on an axis: no smoothing along it (each D plane filtered on its own)
    out = vc.bilateral_filter(x, (0.0, 1.0, 1.0), 2.0)
    planes = np.stack([vc.bilateral_filter(x[i:i + 1], (0.0, 1.0, 1.0), 2.0)[0] for i in range(5)])
    np.testing.assert_allclose(out, planes, rtol=0, atol=1e-15)


def test_layouts_and_types(rng):
    """Fortran order (NIfTI data), strided views, integers, torch tensors: the same numbers (to rounding)."""
    base = (rng.normal(size=(12, 14, 30)) * 5).astype(np.float32)
    want = vc.bilateral_filter(base, 1.2, 3.0, (1.0, 1.1, 0.9))
    # Fortran order: the transposed volume, its taps summed in another order (rounding apart, the same)
    fortran = vc.bilateral_filter(np.asfortranarray(base), 1.2, 3.0, (1.0, 1.1, 0.9))
    assert_close(fortran, reference(base, 1.2, 3.0, (1.0, 1.1, 0.9)), np.float32)
    big = np.zeros((24, 14, 60), np.float32)
    big[::2, :, ::2] = base
    strided = big[::2, :, ::2]
    assert not strided.flags.c_contiguous
    np.testing.assert_array_equal(vc.bilateral_filter(strided, 1.2, 3.0, (1.0, 1.1, 0.9)), want)
    ints = np.round(base).astype(np.int16)
    out = vc.bilateral_filter(ints, 1.2, 3.0)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, vc.bilateral_filter(ints.astype(np.float32), 1.2, 3.0), rtol=0, atol=0)
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(base.astype(np.float64)).requires_grad_()
    got = vc.bilateral_filter(t, 1.2, 3.0, (1.0, 1.1, 0.9), guide=torch.from_numpy(base))
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float64 and not got.requires_grad
    assert_close(got.numpy(), reference(base, 1.2, 3.0, (1.0, 1.1, 0.9)), np.float64)


def test_threads_do_not_change_the_result(rng):
    x = rng.normal(size=(9, 40, 45)).astype(np.float32)
    one = vc.bilateral_filter(x, 1.5, 1.0, workers=1)
    np.testing.assert_array_equal(vc.bilateral_filter(x, 1.5, 1.0, workers=2), one)


def test_non_finite_voxels_spread_through_their_window(rng):
    x = rng.normal(size=(9, 9, 20))
    x[4, 4, 10] = np.nan
    out = vc.bilateral_filter(x, 1.0, 1.0, truncate=2.0)   # radius 2
    reach = np.zeros(x.shape, bool)
    reach[2:7, 2:7, 8:13] = True
    np.testing.assert_array_equal(np.isnan(out), reach)
    assert_close(out, reference(x, 1.0, 1.0, truncate=2.0), np.float64)
    g = rng.normal(size=x.shape)
    g[1, 1, 1] = np.inf   # the guide's Inf: NaN at its own voxel (inf - inf), weight 0 for its neighbours
    out = vc.bilateral_filter(rng.normal(size=x.shape), 1.0, 1.0, guide=g, truncate=2.0)
    assert np.isnan(out[1, 1, 1]) and np.isfinite(np.delete(out.ravel(), np.ravel_multi_index((1, 1, 1), x.shape))).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("edge_valid", [True, False])
def test_masked_voxels_contribute_nothing(dtype, edge_valid, rng):
    """The engine's validity (filter_nifti's masks and nan='mask'): invalid voxels, whatever they hold, have
    weight 0; with edge_valid False the voxels beyond the edge too."""
    x = rng.normal(size=(8, 9, 35)).astype(dtype)
    valid = rng.random(x.shape) > 0.3
    x[~valid] = np.nan
    params = vc.Bilateral(1.2, 1.5)
    out = bilateral_op.run(params, x, None, valid, None, "reflect", 0.0, None, edge_valid=edge_valid)
    if edge_valid:
        ref = reference(x, 1.2, 1.5, valid=valid)
    else:   # the edge as invalid: pad with invalid voxels, filter, crop
        r = 4
        xp = np.pad(np.where(valid, x, 0), r)
        ref = reference(xp, 1.2, 1.5, valid=np.pad(valid, r))[r:-r, r:-r, r:-r]
    ref[~valid] = np.nan   # an invalid centre: its own range term reads 0; not compared
    out = np.where(valid, out, np.nan)
    assert_close(out, ref, dtype)


def test_halo_planes_are_context(rng):
    """A slab with halo planes gives the whole volume's result on its own planes (filter_nifti's slabs)."""
    x = rng.normal(size=(20, 10, 17))
    params = vc.Bilateral(1.0, 2.0)
    whole = vc.bilateral_filter(x, 1.0, 2.0)
    part = bilateral_op.run(params, x[5:15], None, None, None, "reflect", 0.0, None, halo=((3, 3), (0, 0), (0, 0)))
    np.testing.assert_array_equal(part, whole[8:12])


@pytest.mark.parametrize("kwargs, match", [
    (dict(volume=np.zeros((4, 4))), "volume must be 3-D"),
    (dict(guide=np.zeros((4, 4, 5))), "guide must have the volume's shape"),
    (dict(sigma_range=0.0), "sigma_range must be > 0"),
    (dict(sigma_range=float("nan")), "sigma_range must be > 0"),
    (dict(sigma_spatial=-1.0), "sigma_spatial must be a non-negative number"),
    (dict(sigma_spatial=(1.0, 2.0)), "sigma_spatial must be a non-negative number or 3"),
    (dict(zooms=(1.0, 0.0, 1.0)), "zooms must be 3 positive voxel sizes"),
    (dict(truncate=0), "truncate must be a finite number"),
    (dict(mode="edge"), "mode"),
    (dict(volume=np.zeros((4, 4, 4), complex)), "complex|dtype"),
    (dict(sigma_spatial=1e6), "sigma_spatial .* makes a kernel"),
])
def test_errors_name_the_argument(kwargs, match):
    args = dict(volume=np.zeros((4, 4, 4)), sigma_spatial=1.0, sigma_range=1.0)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        vc.bilateral_filter(**args)
