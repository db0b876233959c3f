"""The bilateral filter on NIfTI files: vc.io.filter_nifti with a vc.Bilateral (slabs, masks, nan rules,
normalize, a guide file) and `volconv filter --bilateral 2mm --range R [--guide G]`, against vc.bilateral_filter
on the loaded volume and the brute-force reference of test_bilateral.py.

Tolerances: files against the function on the same Fortran-ordered data and slabs against the whole volume are
bit for bit (the same rows, the same tap order); against the
float64 reference, 2e-5 of the largest magnitude (test_bilateral.py's float32 bound)."""
import os
import warnings

import nibabel as nib
import numpy as np
import pytest

import volconv as vc
from volconv.cli import main
from volconv.ops import bilateral as bilateral_op

from test_bilateral import assert_close, reference

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "sample_volumes", "anatomical.nii.gz")
ZOOMS = (1.0, 1.5, 2.0)


def filtered(x, *args, **kwargs):
    """vc.bilateral_filter of x in a NIfTI volume's memory order (Fortran: the taps summed in that order)."""
    return vc.bilateral_filter(np.asfortranarray(x), *args, **kwargs)


def write(path, data, zooms=ZOOMS):
    img = nib.Nifti1Image(np.asarray(data, np.float32), np.diag(list(zooms) + [1.0]))
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))
    return str(path)


@pytest.fixture
def scan(tmp_path, rng):
    """A noisy piecewise-constant volume (two tissues and an edge) written as NIfTI, and its data (float32)."""
    x = np.where(np.arange(19)[:, None, None] < 9, 100.0, 300.0) + np.zeros((19, 14, 12))
    x = (x + rng.normal(size=x.shape) * 10).astype(np.float32)
    return write(tmp_path / "scan.nii.gz", x), x


@pytest.mark.parametrize("mode", ["reflect", "constant", "wrap"])
def test_whole_and_slabs_equal_the_function(scan, tmp_path, mode):
    path, x = scan
    params = vc.Bilateral(2.0, 40.0)
    want = filtered(x, 2.0, 40.0, ZOOMS, mode=mode, cval=50.0)
    whole = vc.io.filter_nifti(path, tmp_path / "w.nii.gz", params, mode=mode, cval=50.0)
    slabs = vc.io.filter_nifti(path, tmp_path / "s.nii", params, mode=mode, cval=50.0, max_memory="40KiB")
    np.testing.assert_array_equal(whole.data, want)
    np.testing.assert_array_equal(np.asarray(slabs.data), want)
    assert_close(want, reference(x, 2.0, 40.0, ZOOMS, mode=mode, cval=50.0), np.float32)


def test_a_4d_file_is_filtered_volume_by_volume(tmp_path, rng):
    x = (rng.normal(size=(9, 8, 7, 3)) * 5).astype(np.float32)
    path = write(tmp_path / "four.nii", x)
    out = vc.io.filter_nifti(path, tmp_path / "o.nii", vc.Bilateral(1.5, 3.0), max_memory="8KiB")
    for t in range(3):
        np.testing.assert_array_equal(np.asarray(out.data)[..., t], filtered(x[..., t], 1.5, 3.0, ZOOMS))


@pytest.mark.parametrize("outside", ["keep", "zero"])
@pytest.mark.parametrize("normalize", [False, True])
def test_mask_and_normalize(scan, tmp_path, outside, normalize):
    """Voxels outside the mask contribute nothing (NaN there included) and are kept or zeroed; normalize leaves
    the voxels beyond the edge out too."""
    path, x = scan
    inside = np.ones(x.shape, bool)
    inside[:, :4] = False
    inside[3, 7, 5] = False
    x_in = x.copy()
    x_in[~inside] = np.nan   # must not matter: outside voxels are not read
    path = write(tmp_path / "nan.nii", x_in)
    params = vc.Bilateral(2.0, 40.0)
    got = vc.io.filter_nifti(path, tmp_path / "o.nii", params, mask=inside, outside=outside, normalize=normalize,
                             max_memory="40KiB")
    # device="cpu": each slab, its mask and validity as CPU tensors (the route CUDA takes), the same numbers
    on_tensors = vc.io.filter_nifti(path, tmp_path / "t.nii", params, mask=inside, outside=outside,
                                    normalize=normalize, max_memory="40KiB", device="cpu")
    np.testing.assert_array_equal(np.asarray(on_tensors.data), np.asarray(got.data))
    want = bilateral_op.run(params, np.asfortranarray(x_in), None, inside, ZOOMS, "reflect", 0.0, None, edge_valid=not normalize)
    want[~inside] = x_in[~inside] if outside == "keep" else 0
    np.testing.assert_array_equal(np.asarray(got.data), want)
    ref = reference(np.where(inside, x, 0), 2.0, 40.0, ZOOMS, valid=inside) if not normalize else None
    if ref is not None:
        assert_close(np.where(inside, want, 0), np.where(inside, ref, 0), np.float32)


def test_nan_rules(scan, tmp_path):
    path, x = scan
    x = x.copy()
    x[9, 7, 6] = np.nan
    path = write(tmp_path / "nan.nii", x)
    params = vc.Bilateral(1.5, 40.0)
    with pytest.warns(vc.io.NiftiWarning, match="NaN/Inf spread through the kernel"):
        spread = vc.io.filter_nifti(path, tmp_path / "p.nii", params)
    assert np.isnan(spread.data).sum() > 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        masked = vc.io.filter_nifti(path, tmp_path / "m.nii", params, nan="mask")
        zero = vc.io.filter_nifti(path, tmp_path / "z.nii", params, nan="zero")
    finite = np.isfinite(x)
    np.testing.assert_array_equal(masked.data, np.where(finite, bilateral_op.run(
        params, np.asfortranarray(x), None, finite, ZOOMS, "reflect", 0.0, None), x))
    np.testing.assert_array_equal(zero.data, filtered(np.nan_to_num(x, nan=0.0), 1.5, 40.0, ZOOMS))


def test_guide_file_and_array(scan, tmp_path, rng):
    path, x = scan
    guide = (x + rng.normal(size=x.shape) * 30).astype(np.float32)
    gpath = write(tmp_path / "guide.nii.gz", guide)
    want = filtered(x, 2.0, 40.0, ZOOMS, guide=guide)
    from_file = vc.io.filter_nifti(path, tmp_path / "a.nii", vc.Bilateral(2.0, 40.0, guide=gpath), max_memory="40KiB")
    from_array = vc.io.filter_nifti(path, tmp_path / "b.nii", vc.Bilateral(2.0, 40.0, guide=guide))
    np.testing.assert_array_equal(np.asarray(from_file.data), want)
    np.testing.assert_array_equal(from_array.data, want)
    assert np.abs(want - vc.bilateral_filter(x, 2.0, 40.0, ZOOMS)).max() > 1.0   # the guide mattered
    # a guide's non-finite voxels follow nan=: left out with "mask"
    guide[4, 4, 4] = np.nan
    gnan = write(tmp_path / "gnan.nii", guide)
    out = vc.io.filter_nifti(path, tmp_path / "c.nii", vc.Bilateral(2.0, 40.0, guide=gnan), nan="mask")
    assert np.isfinite(out.data).all() and out.data[4, 4, 4] == x[4, 4, 4]


def test_guide_errors_name_the_file(scan, tmp_path):
    path, x = scan
    small = write(tmp_path / "small.nii", np.zeros((5, 5, 5)))
    with pytest.raises(ValueError, match="small.nii: guide has shape"):
        vc.io.filter_nifti(path, tmp_path / "o.nii", vc.Bilateral(2.0, 40.0, guide=small))
    shifted = write(tmp_path / "shifted.nii", x, zooms=(1.0, 1.0, 1.0))
    with pytest.raises(vc.io.NiftiError, match="shifted.nii: guide is not on the grid"):
        vc.io.filter_nifti(path, tmp_path / "o.nii", vc.Bilateral(2.0, 40.0, guide=shifted))
    assert not os.path.exists(tmp_path / "o.nii")


def test_command(scan, tmp_path, capsys):
    path, x = scan
    guide = write(tmp_path / "g.nii", x[::-1].copy())
    out = str(tmp_path / "out.nii.gz")
    assert main(["filter", path, out, "--bilateral", "2mm", "--range", "40"]) == 0
    np.testing.assert_array_equal(nib.load(out).get_fdata(dtype=np.float32), filtered(x, 2.0, 40.0, ZOOMS))
    assert "bilateral 2 mm" in capsys.readouterr().err
    assert main(["filter", path, out, "--bilateral", "1vox", "--range", "40", "--guide", guide, "--truncate", "2",
                 "--force", "-q"]) == 0
    want = filtered(x, 1.0, 40.0, guide=x[::-1], truncate=2.0)   # 1 voxel: sigma in voxels
    np.testing.assert_array_equal(nib.load(out).get_fdata(dtype=np.float32), want)


@pytest.mark.parametrize("argv, message", [
    (["--bilateral", "2mm"], "--bilateral needs --range"),
    (["--gaussian", "2mm", "--range", "3"], "--range applies to --bilateral"),
    (["--gaussian", "2mm", "--guide", "g.nii"], "--guide applies to --bilateral"),
    (["--bilateral", "2mm", "--range", "0"], "range"),
])
def test_command_refuses_bad_combinations(scan, tmp_path, capsys, argv, message):
    path, _ = scan
    with pytest.raises(SystemExit) as e:
        main(["filter", path, str(tmp_path / "o.nii")] + argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["batch", str(tmp_path), str(tmp_path / "out"), "--bilateral", "2mm", "--range", "3", "--guide", path])
    assert "--guide applies to `volconv filter`" in capsys.readouterr().err
