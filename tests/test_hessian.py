"""vc.filters.hessian and hessian_eigvals against scikit-image (skimage.feature.hessian_matrix,
hessian_matrix_eigvals) and numpy.linalg.eigvalsh.

Tolerances, from the arithmetic:
- float64: scikit-image's numbers are scipy.ndimage's 1-D passes in float64; volconv runs the same passes
  (reordered by axis, which is exact for linear passes along different axes) and leaves out taps beyond 10
  sigma (< exp(-50) of the centre). Both round at each of their 12 1-D passes: 1e-12 of the largest component.
- float32: scipy computes each pass in float64 and rounds its output to float32; volconv's engine accumulates in
  float32. 12 passes, each adding a few ulps of the running magnitude: 2e-6 of the largest component (about 16
  float32 ulps; observed below 4).
- eigenvalues: volconv solves the cubic in float64 by the trigonometric method, whose weak spot (two nearly
  equal eigenvalues, acos near +-1) costs about sqrt(2^-52) = 1.5e-8 of the matrix's norm; LAPACK's eigvalsh is
  backward stable (1e-15). Tolerance 1e-7 of the norm: below a float32 ulp.
"""
import itertools
import warnings

import numpy as np
import pytest
from conftest import config_rng

import volconv as vc

skimage_feature = pytest.importorskip("skimage.feature")

MODES = ["reflect", "constant", "nearest", "mirror", "wrap"]


def _skimage(x, sigma, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return skimage_feature.hessian_matrix(x, sigma, **kw)


def _close(got, ref, rtol):
    scale = max(float(np.abs(r).max()) for r in ref)
    for g, r in zip(got, ref):
        assert g.shape == r.shape
        np.testing.assert_allclose(g, r, rtol=0, atol=rtol * scale)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_every_mode_matches_skimage(mode, dtype):
    rng = config_rng(MODES.index(mode), dtype == np.float32)
    shape = tuple(int(n) for n in rng.integers(9, 24, size=3))
    x = rng.standard_normal(shape).astype(dtype)
    cval = 1.75 if mode == "constant" else 0.0
    for sigma in (1.0, 2.2, (0.8, 1.5, 3.0)):
        got = vc.filters.hessian(x, sigma, mode=mode, cval=cval)
        ref = _skimage(x, sigma, mode=mode, cval=cval, use_gaussian_derivatives=True)
        assert got[0].dtype == dtype and ref[0].dtype == dtype
        _close(got, ref, 1e-12 if dtype == np.float64 else 2e-6)


@pytest.mark.parametrize("case", range(4))
def test_random_configurations(case):
    """Seeded random shapes (odd and even, thin along an axis, smaller than the kernel), sigmas and modes."""
    rng = config_rng(100, case)
    shape = tuple(int(n) for n in rng.integers(2, 40, size=3))
    mode = MODES[int(rng.integers(len(MODES)))]
    sigma = tuple(float(s) for s in rng.uniform(0.4, 4.0, size=3))
    cval = float(rng.normal()) if mode == "constant" else 0.0
    x = rng.standard_normal(shape)
    _close(vc.filters.hessian(x, sigma, mode=mode, cval=cval),
           _skimage(x, sigma, mode=mode, cval=cval, use_gaussian_derivatives=True), 1e-12)


def test_slabs_and_large_volume():
    """A volume of several slabs (engine.slab_rows) gives the numbers of the whole."""
    x = config_rng(7).standard_normal((70, 20, 17))
    _close(vc.filters.hessian(x, 2.5), _skimage(x, 2.5, mode="reflect", use_gaussian_derivatives=True), 1e-12)


@pytest.mark.parametrize("mode", ["constant", "nearest"])
def test_finite_differences_matches_skimage_default(mode):
    """use_gaussian_derivatives=False: skimage's current default (Gaussian, then np.gradient twice)."""
    x = config_rng(3).standard_normal((15, 12, 17))
    for dtype, tol in ((np.float64, 1e-12), (np.float32, 2e-6)):
        got = vc.filters.hessian(x.astype(dtype), 1.3, mode=mode, cval=0.6, use_gaussian_derivatives=False)
        _close(got, _skimage(x.astype(dtype), 1.3, mode=mode, cval=0.6), tol)


def test_zooms_give_derivatives_per_mm():
    """sigma in mm with zooms: skimage's per-axis sigma in voxels, each component divided by zoom_i zoom_j."""
    x = config_rng(4).standard_normal((16, 19, 14))
    zooms = (2.0, 1.0, 0.5)
    got = vc.filters.hessian(x, 2.0, zooms=zooms, mode="nearest")
    ref = _skimage(x, tuple(2.0 / z for z in zooms), mode="nearest", use_gaussian_derivatives=True)
    pairs = itertools.combinations_with_replacement(range(3), 2)
    _close(got, [r / (zooms[i] * zooms[j]) for r, (i, j) in zip(ref, pairs)], 1e-12)


def test_layouts_and_types():
    """Fortran order (NIfTI), a strided view, integers and torch tensors give the same numbers."""
    x = config_rng(5).standard_normal((13, 15, 11))
    ref = vc.filters.hessian(x, 1.5)
    _close(vc.filters.hessian(np.asfortranarray(x), 1.5), ref, 1e-14)
    big = np.zeros((26, 15, 22))
    big[::2, :, ::2] = x
    _close(vc.filters.hessian(big[::2, :, ::2], 1.5), ref, 1e-14)
    ints = np.round(x * 10).astype(np.int16)
    got = vc.filters.hessian(ints, 1.5)
    assert got[0].dtype == np.float32
    _close(got, vc.filters.hessian(ints.astype(np.float64), 1.5), 2e-6)
    torch = pytest.importorskip("torch")
    t = vc.filters.hessian(torch.from_numpy(x), 1.5)
    assert isinstance(t[0], torch.Tensor) and t[0].dtype == torch.float64
    _close([a.numpy() for a in t], ref, 1e-14)
    assert vc.filters.hessian_matrix is vc.filters.hessian


def test_errors():
    x = np.zeros((5, 6, 7))
    with pytest.raises(ValueError, match="sigma"):
        vc.filters.hessian(x, 0)
    with pytest.raises(ValueError, match="sigma"):
        vc.filters.hessian(x, (1, -1, 1))
    with pytest.raises(ValueError, match="zooms"):
        vc.filters.hessian(x, 1, zooms=(1, 0, 1))
    with pytest.raises(ValueError, match="3-D"):
        vc.filters.hessian(np.zeros((5, 6)), 1)
    with pytest.raises(ValueError, match="mode"):
        vc.filters.hessian(x, 1, mode="bogus")
    bad = x.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        vc.filters.hessian(bad, 1)
    with pytest.raises(ValueError, match="kernel"):
        vc.filters.hessian(x, 1e6)


def _eig_close(h6, tol=1e-7):
    got = vc.filters.hessian_eigvals(h6)
    m = np.stack([np.stack([h6[0], h6[1], h6[2]], -1), np.stack([h6[1], h6[3], h6[4]], -1),
                  np.stack([h6[2], h6[4], h6[5]], -1)], -2).astype(np.float64)
    ref = np.moveaxis(np.linalg.eigvalsh(m)[..., ::-1], -1, 0)
    norm = np.sqrt((m ** 2).sum(axis=(-1, -2)))
    assert np.all(np.abs(got - ref) <= tol * norm + 1e-300)
    return got


def test_eigvals_random_and_skimage():
    h6 = list(config_rng(8).standard_normal((6, 9, 10, 11)) * 10.0 ** config_rng(9).uniform(-20, 20, (9, 10, 11)))
    got = _eig_close(h6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        np.testing.assert_allclose(got, skimage_feature.hessian_matrix_eigvals(h6), rtol=1e-6, atol=0)


def test_eigvals_degenerate():
    """Zeros, multiples of I (isotropic blobs), double eigenvalues in rotated frames, near-equal ones."""
    rng = config_rng(10)
    mats = [np.zeros((3, 3)), 2.5 * np.eye(3), -1e-30 * np.eye(3), np.diag([1.0, 1.0, 2.0]),
            np.diag([3.0, -1.0, -1.0]), np.diag([0.0, 0.0, 1e-3])]
    for _ in range(40):
        q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
        a, b = rng.standard_normal(2)
        eps = 10.0 ** rng.uniform(-12, -3)
        for d in ([a, a, b], [a, a + eps * abs(a), b], [a, a, a + eps], [a, a, a]):
            mats.append(q @ np.diag(d) @ q.T)
    m = np.array(mats)
    h6 = [m[:, i, j].reshape(-1, 1, 1) for i, j in itertools.combinations_with_replacement(range(3), 2)]
    got = _eig_close(h6)
    assert np.all(got[0] >= got[1]) and np.all(got[1] >= got[2])
    np.testing.assert_array_equal(got[:, :2, 0, 0], [[0, 2.5], [0, 2.5], [0, 2.5]])


def test_eigvals_float32_and_errors():
    h6 = list(config_rng(11).standard_normal((6, 4, 5, 6)).astype(np.float32))
    got = vc.filters.hessian_eigvals(h6)
    assert got.dtype == np.float32 and got.shape == (3, 4, 5, 6)
    _eig_close(h6, tol=1e-6)
    with pytest.raises(ValueError, match="6"):
        vc.filters.hessian_eigvals(h6[:3])
    with pytest.raises(ValueError, match="shape"):
        vc.filters.hessian_eigvals(h6[:5] + [np.zeros((2, 2, 2), np.float32)])
