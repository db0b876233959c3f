"""vc.io.filter_nifti: a NIfTI file filtered into another, geometry kept, masks and normalisation, 4-D."""
import os
import warnings

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage as ndi

import volconv as vc

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "sample_volumes", "anatomical.nii.gz")


def rel_tol(ref):
    # float32 end to end: three 1-D passes of up to ~25 taps, each within a few ulps of max|x|
    return 1e-5 * np.abs(ref).max()


def test_gaussian_in_mm_matches_scipy_and_keeps_geometry(tmp_path):
    vol = vc.io.load(SAMPLE)
    out = vc.io.filter_nifti(SAMPLE, tmp_path / "s.nii.gz", lambda zooms: vc.kernels.gaussian(3.0, zooms))
    back = vc.io.load(tmp_path / "s.nii.gz")
    ref = ndi.gaussian_filter(vol.data, 3.0 / np.array(vol.zooms))
    np.testing.assert_allclose(back.data, ref, rtol=0, atol=rel_tol(ref))
    np.testing.assert_array_equal(back.affine, vol.affine)
    assert back.header["sform_code"] == vol.header["sform_code"] and back.data.dtype == np.float32
    assert isinstance(out, vc.Volume) and out.shape == vol.shape


def test_device_cpu_filters_the_slabs_as_tensors_with_the_same_result(tmp_path):
    """device='cpu': each slab a CPU tensor through volconv's torch adapter (the CUDA route's path on the CPU),
    equal to the numpy engine's result within float32 rounding; bad devices are named."""
    vol = vc.io.load(SAMPLE)
    kernel = vc.kernels.gaussian(2.0, vol.zooms)
    ref = vc.io.filter_nifti(SAMPLE, tmp_path / "a.nii", kernel, mode="nearest", max_memory="200KiB")
    got = vc.io.filter_nifti(SAMPLE, tmp_path / "b.nii", kernel, mode="nearest", max_memory="200KiB",
                             device="cpu")
    np.testing.assert_allclose(got.data, ref.data, rtol=0, atol=rel_tol(ref.data))
    for bad in ("tpu", "cuda:x", 3.5):
        with pytest.raises(ValueError, match="device must be None, 'cpu', 'cuda' or 'cuda:N'"):
            vc.io.filter_nifti(SAMPLE, tmp_path / "c.nii", kernel, device=bad)
    assert not os.path.exists(tmp_path / "c.nii")


def test_mask_normalize_outside(tmp_path):
    vol = vc.io.load(SAMPLE)
    inside = vol.data > np.percentile(vol.data, 60)
    box = vc.kernels.box(3).to_dense().astype(np.float32)
    num = ndi.correlate(vol.data * inside, box, mode="constant")
    den = ndi.correlate(inside.astype(np.float32), box, mode="constant")
    expected = {("keep", True): np.where(inside, num / np.maximum(den, 1e-30), vol.data),
                ("zero", True): np.where(inside, num / np.maximum(den, 1e-30), 0),
                ("zero", False): np.where(inside, ndi.correlate(vol.data * inside, box, mode="mirror"), 0)}
    for (outside, normalize), ref in expected.items():
        out = vc.io.filter_nifti(SAMPLE, tmp_path / f"{outside}{normalize}.nii", vc.kernels.box(3), mode="mirror",
                                 mask=inside, normalize=normalize, outside=outside)
        np.testing.assert_allclose(out.data, ref, rtol=0, atol=rel_tol(ref))


def test_normalize_without_mask_renormalises_at_the_edge(tmp_path):
    ones = nib.Nifti1Image(np.full((17, 18, 19), 5.0, np.float32), np.eye(4))
    nib.save(ones, tmp_path / "c.nii")
    out = vc.io.filter_nifti(tmp_path / "c.nii", tmp_path / "o.nii", vc.kernels.gaussian(2.0), normalize=True)
    np.testing.assert_allclose(out.data, 5.0, rtol=1e-5)   # a constant stays constant up to the edge


def test_4d_volume_by_volume_with_progress(tmp_path):
    data = np.random.default_rng(0).random((10, 11, 12, 3)).astype(np.float32)
    img = nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0]))
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, tmp_path / "f.nii.gz")
    seen = []
    out = vc.io.filter_nifti(tmp_path / "f.nii.gz", tmp_path / "g.nii.gz", lambda z: vc.kernels.gaussian(2.0, z),
                             progress=lambda done, total: seen.append((done, total)))
    assert seen == [(12, 36), (24, 36), (36, 36)] and out.shape == data.shape   # in planes, volume by volume
    for t in range(3):
        ref = ndi.gaussian_filter(data[..., t], 2.0 / np.array([2.0, 2.0, 3.0]))
        np.testing.assert_allclose(out.data[..., t], ref, rtol=0, atol=rel_tol(ref))


def test_errors_leave_nothing_behind(tmp_path):
    dst = tmp_path / "out.nii.gz"
    with pytest.raises(ValueError, match="mask has shape"):
        vc.io.filter_nifti(SAMPLE, dst, vc.kernels.box(3), mask=np.ones((3, 3, 3)))
    with pytest.raises(ValueError, match="outside"):
        vc.io.filter_nifti(SAMPLE, dst, vc.kernels.box(3), outside="drop")
    with pytest.raises(FileNotFoundError):
        vc.io.filter_nifti(tmp_path / "missing.nii", dst, vc.kernels.box(3))
    assert os.listdir(tmp_path) == []
    dst.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        vc.io.filter_nifti(SAMPLE, dst, vc.kernels.box(3))
    assert dst.read_bytes() == b"precious" and sorted(os.listdir(tmp_path)) == ["out.nii.gz"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vc.io.filter_nifti(SAMPLE, dst, vc.kernels.box(3), overwrite=True)
    assert vc.io.load(dst).shape == (33, 41, 25)
