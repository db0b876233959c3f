"""vc.filters.frangi / sato / meijering against skimage.filters.frangi / sato / meijering, vc.io.vesselness_nifti
and `volconv filter --frangi/--sato/--meijering`.

Tolerances, from the arithmetic:
- float64: the Hessian agrees with scikit-image's to 1e-12 of its largest component (tests/test_hessian.py);
  the measures are smooth functions of the eigenvalues except where Frangi's clip at 1e-10 or Meijering's choice
  of the largest magnitude switches, which random volumes do not straddle: 1e-9 of the output's maximum.
- float32: scikit-image computes everything in float32 (LAPACK ssyevd for the eigenvalues, float32 exps);
  volconv's Hessian is float32 and its measures float64 inside. Frangi's ratios l2 / l3 and |l1| / sqrt(l2 l3)
  amplify a float32 rounding of the Hessian where an eigenvalue is near 0, so both float32 results stray from
  the exact one (scikit-image in float64 on the same float32 data). volconv's engine accumulates each pass in
  float32 where scipy sums in float64 and rounds once per pass, so its float32 Hessian carries a few times
  scikit-image's rounding (the volume is centred on its mean first, so that the background's offset costs
  nothing): the test asks volconv's float32 result to be within 5x scikit-image's own float32 error of the
  exact one (observed: up to 4x on the tube volume, below 1x on random ones), plus 1e-5 of the maximum (the
  Hessian's float32 tolerance, 2e-6 of its largest component, times the measures' sensitivity relative to
  their peak, at most about 5 here).
- anisotropic voxels (zooms): scikit-image's filters take one sigma per scale; the reference is skimage's own
  hessian_matrix with per-axis sigmas, its components divided by zoom_i zoom_j, and skimage's formulas in
  float64 (_reference, itself checked against skimage with isotropic voxels).
"""
import itertools
import warnings

import numpy as np
import pytest
from conftest import config_rng

import volconv as vc

skimage_filters = pytest.importorskip("skimage.filters")
skimage_feature = pytest.importorskip("skimage.feature")

METHODS = ["frangi", "sato", "meijering"]
MODES = ["reflect", "constant", "nearest", "mirror", "wrap"]


def _sk(method, x, sigmas, **kw):
    return getattr(skimage_filters, method)(x, sigmas=sigmas, **kw)


def _check(method, x, sigmas, **kw):
    got = getattr(vc.filters, method)(x, sigmas, **kw)
    exact = _sk(method, x.astype(np.float64), sigmas, **kw)
    assert got.dtype == x.dtype and got.shape == x.shape
    peak = float(np.abs(exact).max())
    if x.dtype == np.float64:   # Sato's square root: sqrt(1e-16) = 1e-8 where an eigenvalue is exactly 0
        np.testing.assert_allclose(got, exact, rtol=0, atol=(1e-7 if method == "sato" else 1e-9) * peak + 1e-300)
    else:
        theirs = _sk(method, x, sigmas, **kw)
        # scikit-image keeps float32 in float32, except Sato with numpy float64 sigmas (sigma**2 * vals promotes)
        assert theirs.dtype == np.float32 or method == "sato"
        own = float(np.abs(theirs - exact).max())
        # float32 Hessians carry ~1e-7 of their peak; Frangi's ratios near a degenerate voxel amplify that up to
        # ~1e3, at whichever voxel a summation order happens to hit: 1e-4 of the peak beside 5x scikit-image's own
        assert float(np.abs(got - exact).max()) <= 5 * own + 1e-4 * peak
    return got


def tube(shape=(24, 28, 26), radius=2.5, bright=True):
    """A Gaussian-profile tube along axis 2 plus a smaller one along a diagonal, on a noisy background."""
    z, y, x = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    r2 = (z - shape[0] / 2) ** 2 + (y - shape[1] / 2) ** 2
    d2 = ((z - y) ** 2) / 2 + (x - shape[2] / 3) ** 2
    v = np.exp(-r2 / (2 * radius ** 2)) + 0.7 * np.exp(-d2 / (2 * (radius / 2) ** 2))
    v += 0.02 * config_rng(99).standard_normal(shape)
    return v if bright else 1.0 - v


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_matches_skimage(method, mode):
    rng = config_rng(METHODS.index(method), MODES.index(mode))
    shape = tuple(int(n) for n in rng.integers(9, 22, size=3))
    x = rng.standard_normal(shape)
    cval = 0.8 if mode == "constant" else 0.0
    black = bool(rng.integers(2))
    for dtype in (np.float64, np.float32):
        _check(method, x.astype(dtype), [1.0, 2.0], mode=mode, cval=cval, black_ridges=black)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("black", [True, False])
def test_tube_volume(method, black):
    """The synthetic vessels, both polarities, several sigma sets; the tube's axis lights up."""
    v = tube(bright=not black)
    for sigmas in ([1.5], [1, 2, 3], np.linspace(0.8, 3.2, 4)):
        for dtype in (np.float64, np.float32):
            got = _check(method, v.astype(dtype), sigmas, black_ridges=black)
    on_axis, far = got[12, 14, 5:20], got[2, 20, 5:20]
    assert on_axis.min() > 0.1 * got.max()
    if method == "frangi":   # Sato and Meijering answer the background's noise too
        assert far.max() < 0.1 * got.max()


def test_parameters():
    v = tube()
    _check("frangi", v, [1, 2], alpha=0.3, beta=0.9, gamma=0.05, black_ridges=False)
    _check("frangi", v, [2, 1], black_ridges=False)   # gamma from the first scale given, not the smallest
    _check("meijering", v, [1, 2], alpha=-0.1, black_ridges=False)
    _check("sato", v, range(1, 4), black_ridges=False)
    # no structure: the Hessian is exactly 0 here (the volume is centred before filtering), so gamma falls back
    # to 1 and Meijering's maximum is 0; scikit-image's is rounding noise (1e-16) that its gamma = max(s) / 2
    # then scales up to O(1) values, so it is not compared
    flat = np.full((8, 9, 10), 3.0)
    for method in METHODS:
        assert not getattr(vc.filters, method)(flat, [1.0], black_ridges=False).any()


def _reference(method, x, sigmas, zooms, black_ridges=True, alpha=None, beta=0.5):
    """skimage's formulas in float64 on skimage's per-axis-sigma Hessian, in derivatives per mm."""
    x = x if black_ridges else -x
    out = np.zeros(x.shape)
    gamma = None
    for s in sigmas:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            h = skimage_feature.hessian_matrix(x, tuple(s / z for z in zooms), mode="reflect",
                                               use_gaussian_derivatives=True)
        h = [c / (zooms[i] * zooms[j]) for c, (i, j) in zip(h, itertools.combinations_with_replacement(range(3), 2))]
        e = skimage_feature.hessian_matrix_eigvals(h)
        if method == "sato":
            vals = s ** 2 * np.sqrt(np.maximum(e[0], 0) * np.maximum(e[1], 0))
        elif method == "meijering":
            a = 0.25 if alpha is None else alpha
            m = np.array([[1, a, a], [a, 1, a], [a, a, 1]])
            vals = np.tensordot(m, e, 1)
            vals = np.maximum(np.take_along_axis(vals, abs(vals).argmax(0)[None], 0)[0], 0)
            vals = vals / vals.max() if vals.max() > 0 else vals
        else:
            e = np.take_along_axis(e, abs(e).argsort(0), 0)
            l2, l3 = np.maximum(e[1:], 1e-10)
            ra, rb = l2 / l3, abs(e[0]) / np.sqrt(l2 * l3)
            norm = np.sqrt((e ** 2).sum(0))
            gamma = (norm.max() / 2 or 1.0) if gamma is None else gamma
            a = 0.5 if alpha is None else alpha
            vals = (1 - np.exp(-ra ** 2 / (2 * a * a))) * np.exp(-rb ** 2 / (2 * beta * beta)) * \
                (1 - np.exp(-norm ** 2 / (2 * gamma ** 2)))
        out = np.maximum(out, vals)
    return out


@pytest.mark.parametrize("method", METHODS)
def test_zooms(method):
    """Anisotropic voxels against the per-axis reference; isotropic zooms z against skimage at sigmas / z."""
    x = tube((20, 26, 22))
    ref = _reference(method, x, [1.0, 2.0], (1.0, 1.0, 1.0), black_ridges=False)
    np.testing.assert_allclose(ref, _sk(method, x, [1.0, 2.0], black_ridges=False), atol=1e-9 * ref.max())
    zooms = (2.0, 1.0, 0.8)
    got = getattr(vc.filters, method)(x, [2.0, 3.0], zooms=zooms, black_ridges=False)
    ref = _reference(method, x, [2.0, 3.0], zooms, black_ridges=False)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-9 * ref.max())
    # isotropic zooms z: skimage at sigmas / z; the Hessian per mm is the one per voxel / z^2, which Frangi's
    # absolute clip at 1e-10 sees, so its reference filters x / z^2 (Sato's sigma^2 and Meijering's
    # normalisation absorb the factor)
    got = getattr(vc.filters, method)(x, [3.0, 6.0], zooms=(1.5, 1.5, 1.5), black_ridges=False)
    ref = _sk(method, x / 2.25 if method == "frangi" else x, [2.0, 4.0], black_ridges=False)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-9 * got.max())


def test_layouts_and_types():
    x = tube((14, 15, 13))
    ref = vc.filters.frangi(x, [1, 2])
    np.testing.assert_allclose(vc.filters.frangi(np.asfortranarray(x), [1, 2]), ref, atol=1e-14)
    np.testing.assert_allclose(vc.filters.sato(x[::-1], [1, 2]), _sk("sato", x[::-1], [1, 2]),
                               atol=1e-9 * ref.max())
    torch = pytest.importorskip("torch")
    t = vc.filters.frangi(torch.from_numpy(x.astype(np.float32)), [1, 2])
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32


def test_errors():
    x = np.zeros((6, 7, 8))
    for bad in ([], [0.0], [1.0, -2.0], [np.nan]):
        with pytest.raises(ValueError, match="sigmas"):
            vc.filters.frangi(x, bad)
    with pytest.raises(TypeError, match="sigmas"):
        vc.filters.sato(x, 2.0)
    with pytest.raises(ValueError, match="alpha"):
        vc.filters.frangi(x, [1], alpha=0)
    with pytest.raises(ValueError, match="gamma"):
        vc.filters.frangi(x, [1], gamma=-1)
    with pytest.raises(ValueError, match="alpha"):
        vc.filters.meijering(x, [1], alpha=np.inf)
    bad = x.copy()
    bad[0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        vc.filters.meijering(bad, [1])
    with pytest.raises(ValueError, match="3-D"):
        vc.filters.frangi(np.zeros((4, 4)), [1])


def _nifti(tmp_path, data, zooms):
    nib = pytest.importorskip("nibabel")
    path = str(tmp_path / "in.nii.gz")
    img = nib.Nifti1Image(data.astype(np.float32), np.diag(list(zooms)[:3] + [1.0]))
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, path)
    return path


def test_vesselness_nifti(tmp_path):
    x = tube((18, 20, 16)).astype(np.float32)
    src = _nifti(tmp_path, x, (1.0, 1.5, 2.0))
    out = vc.io.vesselness_nifti(src, str(tmp_path / "f.nii.gz"), "frangi", [1.5, 3.0], black_ridges=False)
    np.testing.assert_allclose(out.data, vc.filters.frangi(x, [1.5, 3.0], zooms=(1, 1.5, 2), black_ridges=False),
                               atol=1e-7)
    np.testing.assert_allclose(out.affine, np.diag([1.0, 1.5, 2.0, 1.0]))
    out = vc.io.vesselness_nifti(src, str(tmp_path / "s.nii"), "sato", [1, 2], unit="vox", mode="constant",
                                 cval=0.5)
    np.testing.assert_allclose(out.data, vc.filters.sato(x, [1, 2], mode="constant", cval=0.5), atol=1e-7)
    four = np.stack([x, 2 * x], axis=-1)   # 4-D: volume by volume
    (tmp_path / "four").mkdir()
    src4 = _nifti(tmp_path / "four", four, (1.0, 1.0, 1.0))
    out = vc.io.vesselness_nifti(src4, str(tmp_path / "m4.nii"), "meijering", [1.5])
    for t in range(2):
        np.testing.assert_allclose(out.data[..., t], vc.filters.meijering(four[..., t], [1.5]), atol=1e-7)
    with pytest.raises(ValueError, match="method"):
        vc.io.vesselness_nifti(src, str(tmp_path / "x.nii"), "hessian", [1])
    with pytest.raises(FileExistsError):
        vc.io.vesselness_nifti(src, str(tmp_path / "s.nii"), "sato", [1])


def test_cli(tmp_path, capsys):
    from volconv.cli import main

    x = tube((16, 18, 14)).astype(np.float32)
    src = _nifti(tmp_path, x, (1.0, 1.0, 2.0))
    dst = str(tmp_path / "v.nii.gz")
    assert main(["filter", src, dst, "--frangi", "1:3:3mm", "--bright-ridges", "-q"]) == 0
    nib = pytest.importorskip("nibabel")
    got = np.asarray(nib.load(dst).dataobj)
    np.testing.assert_allclose(got, vc.filters.frangi(x, [1, 2, 3], zooms=(1, 1, 2), black_ridges=False), atol=1e-7)
    assert main(["filter", src, str(tmp_path / "m.nii.gz"), "--meijering", "1,2vox", "--alpha", "0.1", "-q"]) == 0
    got = np.asarray(nib.load(str(tmp_path / "m.nii.gz")).dataobj)
    np.testing.assert_allclose(got, vc.filters.meijering(x, [1, 2], alpha=0.1), atol=1e-7)
    assert main(["filter", src, dst, "--sato", "2mm", "-q"]) == 1   # exists: refused without --force
    for bad in (["--frangi", "4:1"], ["--frangi", "1:4:0"], ["--sato", "0mm"], ["--sato", "2", "--gamma", "1"],
                ["--gaussian", "2", "--bright-ridges"], ["--frangi", "2", "--mask", src]):
        with pytest.raises(SystemExit) as e:
            main(["filter", src, str(tmp_path / "bad.nii.gz")] + bad)
        assert e.value.code == 2
    capsys.readouterr()
