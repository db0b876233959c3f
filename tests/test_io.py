"""volconv.io: NIfTI load/save, header preservation, warnings, and failures that leave nothing behind.

Inputs are written byte by byte (`write_nifti`) so that each test controls exactly what is on disk: scale
factors, byte order, NIfTI-1 or -2, units, pixdim, truncation.
"""
import errno
import gzip
import io
import mmap
import os
import stat
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import volconv.io as vio
from volconv.io import NiftiError, NiftiWarning, Volume

SAMPLES = Path(__file__).resolve().parent.parent / "sample_volumes"
AFFINE = np.array([[2.0, 0.0, 0.0, -30.0],
                   [0.0, 3.0, 0.0, -40.0],
                   [0.0, 0.0, 4.0, -50.0],
                   [0.0, 0.0, 0.0, 1.0]])


def write_nifti(path, raw, affine=AFFINE, *, header_class=nib.Nifti1Header, endian="<", slope=None, inter=None,
                units=("mm", "sec"), pixdim=None, qform_code=1, sform_code=2, tr=None, truncate_by=0):
    """Write `raw` (stored as is, Fortran order) with a hand-made header; gzip when the name ends in .gz."""
    hdr = header_class(endianness=endian)
    hdr.set_data_shape(raw.shape)
    hdr.set_data_dtype(raw.dtype)
    hdr.set_qform(affine, code=qform_code)
    hdr.set_sform(affine, code=sform_code)
    hdr.set_xyzt_units(*units)
    if slope is not None:
        hdr.set_slope_inter(slope, inter)
    if pixdim is not None:
        hdr["pixdim"][1:4] = pixdim
    if tr is not None:
        hdr["pixdim"][4] = tr
    offset = 352 if header_class is nib.Nifti1Header else 544
    hdr.set_data_offset(offset)
    buf = io.BytesIO()
    hdr.write_to(buf)
    buf.write(b"\0" * (offset - buf.tell()))
    buf.write(raw.astype(raw.dtype.newbyteorder(endian)).tobytes(order="F"))
    payload = buf.getvalue()
    payload = payload[:len(payload) - truncate_by]
    if str(path).endswith(".gz"):
        payload = gzip.compress(payload)
    Path(path).write_bytes(payload)
    return path


def disk_header(path):
    """The header exactly as stored (nibabel resets scale factors in a loaded image's header)."""
    opener = gzip.open if Path(path).read_bytes()[:2] == b"\x1f\x8b" else open
    with opener(path, "rb") as f:
        sizeof_hdr = int.from_bytes(f.read(4), "little")
        f.seek(0)
        klass = nib.Nifti2Header if sizeof_hdr in (540, 0x1C020000) else nib.Nifti1Header
        return klass.from_fileobj(f)


def ramp(shape, dtype=np.float32):
    return (np.arange(np.prod(shape), dtype=np.float64).reshape(shape) * 0.25 - 3).astype(dtype)


def is_memmapped(a):
    """True when the array's memory is a mapping of a file (an np.memmap returned by astype is not)."""
    while a is not None:
        if isinstance(a, mmap.mmap):
            return True
        a = getattr(a, "base", None)
    return False


def listing(directory):
    return sorted(p.name for p in Path(directory).iterdir())


@pytest.fixture
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# --------------------------------------------------------------------------------------------------------------
# round trips and header preservation
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, header_class", [("v.nii", nib.Nifti1Header), ("v.nii.gz", nib.Nifti1Header),
                                                ("v.nii", nib.Nifti2Header), ("v.nii.gz", nib.Nifti2Header)])
def test_round_trip(tmp_path, name, header_class, no_warnings):
    data = ramp((5, 6, 7))
    src = write_nifti(tmp_path / f"src_{name}", data, header_class=header_class)
    vol = vio.load(src)
    assert isinstance(vol.header, header_class)
    np.testing.assert_array_equal(vol.data, data)
    np.testing.assert_array_equal(vol.affine, AFFINE)
    assert vol.affine.dtype == np.float64
    assert vol.zooms == (2.0, 3.0, 4.0)

    vio.save(vol, tmp_path / name)
    out = tmp_path / name
    assert (out.read_bytes()[:2] == b"\x1f\x8b") == name.endswith(".gz")
    img = nib.load(out)
    assert type(img) is (nib.Nifti2Image if header_class is nib.Nifti2Header else nib.Nifti1Image)
    back = vio.load(out)
    np.testing.assert_array_equal(back.data, data)
    np.testing.assert_array_equal(back.affine, AFFINE)
    assert listing(tmp_path) == sorted([f"src_{name}", name])


def test_header_fields_preserved(tmp_path, no_warnings):
    qform = AFFINE.copy()
    sform = AFFINE.copy()
    sform[:3, 3] += [1.5, -2.0, 0.5]  # sform (MNI) differs from the scanner qform: both must survive
    src = tmp_path / "src.nii.gz"
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((4, 5, 6, 3))
    hdr.set_data_dtype(np.int16)
    hdr.set_qform(qform, code="scanner")
    hdr.set_sform(sform, code="mni")
    hdr.set_xyzt_units("mm", "msec")
    hdr["pixdim"][4] = 2500.0
    hdr.set_dim_info(freq=1, phase=0, slice=2)
    hdr["descrip"] = b"volconv test"
    img = nib.Nifti1Image(np.ones((4, 5, 6, 3), np.int16), None, header=hdr)
    img.header.set_qform(qform, code="scanner")
    img.header.set_sform(sform, code="mni")
    nib.save(img, src)

    vol = vio.load(src)
    np.testing.assert_array_equal(vol.affine, sform)
    vio.save(vol.with_data(vol.data * 2), tmp_path / "out.nii.gz")
    out = disk_header(tmp_path / "out.nii.gz")
    ref = disk_header(src)
    q, qcode = out.get_qform(coded=True)
    s, scode = out.get_sform(coded=True)
    assert (int(qcode), int(scode)) == (1, 4)
    np.testing.assert_allclose(q, ref.get_qform(), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(s, ref.get_sform())
    assert out.get_xyzt_units() == ("mm", "msec")
    assert out["pixdim"][4] == 2500.0
    assert out.get_dim_info() == (1, 0, 2)
    assert out["descrip"] == b"volconv test"
    assert out.get_data_shape() == (4, 5, 6, 3)
    assert out.get_data_dtype() == np.float32
    np.testing.assert_array_equal(vio.load(tmp_path / "out.nii.gz").data, 2)


def test_tr_kept_when_output_is_3d(tmp_path, no_warnings):
    src = write_nifti(tmp_path / "bold.nii", ramp((4, 5, 6, 3)), tr=2.0)
    vol = vio.load(src)
    vio.save(vol.with_data(vol.data.mean(axis=3)), tmp_path / "mean.nii")
    out = disk_header(tmp_path / "mean.nii")
    assert out.get_data_shape() == (4, 5, 6)
    assert out["pixdim"][4] == 2.0


def test_changed_affine_goes_into_both_forms(tmp_path, no_warnings):
    vol = vio.load(write_nifti(tmp_path / "src.nii", ramp((4, 5, 6)), qform_code=1, sform_code=3))
    vol.affine = np.diag([1.0, 1.5, 2.5, 1.0])
    vio.save(vol, tmp_path / "out.nii")
    out = disk_header(tmp_path / "out.nii")
    np.testing.assert_allclose(out.get_sform(), vol.affine)
    np.testing.assert_allclose(out.get_qform(), vol.affine, atol=1e-6)
    assert (int(out["qform_code"]), int(out["sform_code"])) == (1, 3)
    assert vio.load(tmp_path / "out.nii").zooms == (1.0, 1.5, 2.5)


def test_fresh_volume_gets_aligned_forms_and_mm(tmp_path, no_warnings):
    vol = Volume(ramp((3, 4, 5), np.float64), AFFINE)
    assert vol.zooms == (2.0, 3.0, 4.0)
    vio.save(vol, tmp_path / "new.nii.gz")
    out = disk_header(tmp_path / "new.nii.gz")
    assert (int(out["qform_code"]), int(out["sform_code"])) == (2, 2)
    assert out.get_xyzt_units() == ("mm", "sec")
    np.testing.assert_array_equal(out.get_sform(), AFFINE)
    assert out.get_data_dtype() == np.float32  # float64 data, float32 file by default


def test_4d_kept_4d(tmp_path, no_warnings):
    data = ramp((4, 5, 6, 7))
    vol = vio.load(write_nifti(tmp_path / "v.nii.gz", data, tr=1.5))
    assert vol.data.shape == (4, 5, 6, 7)
    assert vol.zooms == (2.0, 3.0, 4.0)
    vio.save(vol, tmp_path / "o.nii.gz")
    back = vio.load(tmp_path / "o.nii.gz")
    np.testing.assert_array_equal(back.data, data)
    assert back.header.get_zooms()[3] == 1.5


def test_scaled_int16(tmp_path, no_warnings):
    raw = (np.arange(4 * 5 * 6).reshape(4, 5, 6) * 97 - 11000).astype(np.int16)
    path = write_nifti(tmp_path / "scaled.nii", raw, slope=0.37, inter=-12.5)
    assert disk_header(path).get_slope_inter() == pytest.approx((0.37, -12.5))
    expected = np.float32(0.37) * raw.astype(np.float64) + -12.5
    vol = vio.load(path)
    assert vol.data.dtype == np.float32
    np.testing.assert_allclose(vol.data, expected, rtol=1e-6, atol=1e-3)
    assert not np.array_equal(vol.data, raw)  # the scale factors were applied
    vol64 = vio.load(path, dtype=np.float64)
    assert vol64.data.dtype == np.float64
    np.testing.assert_allclose(vol64.data, expected, rtol=1e-12)
    # the saved copy carries the scaled values, unscaled (slope 1, inter 0)
    vio.save(vol, tmp_path / "out.nii")
    assert disk_header(tmp_path / "out.nii").get_slope_inter() == (1.0, 0.0)
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "out.nii").dataobj.get_unscaled()), vol.data)


def test_scaled_input_refused_as_integers(tmp_path):
    path = write_nifti(tmp_path / "scaled.nii", np.arange(60, dtype=np.int16).reshape(3, 4, 5), slope=0.5, inter=0)
    with pytest.raises(NiftiError, match=r"scaled\.nii.*not all whole.*int16"):
        vio.load(path, dtype=np.int16)
    whole = vio.load(write_nifti(tmp_path / "whole.nii", np.arange(60, dtype=np.int16).reshape(3, 4, 5),
                                 slope=2.0, inter=1.0), dtype=np.int32)
    assert whole.data.dtype == np.int32
    np.testing.assert_array_equal(whole.data, 2 * np.arange(60).reshape(3, 4, 5) + 1)


def test_bundled_big_endian_sample(no_warnings):
    path = SAMPLES / "anatomical.nii.gz"
    img = nib.load(path)
    assert img.header.endianness == ">" and img.get_data_dtype() == np.dtype(">i2")
    vol = vio.load(path)
    assert vol.data.dtype == np.dtype("float32") and vol.data.dtype.isnative
    assert vol.data.shape == (33, 41, 25)
    np.testing.assert_array_equal(vol.data, img.get_fdata())
    assert vol.zooms == (2.0, 2.0, 2.0)


def test_big_endian_round_trip(tmp_path, no_warnings):
    data = ramp((4, 5, 6))
    path = write_nifti(tmp_path / "be.nii", data, endian=">")
    vol = vio.load(path)
    assert vol.data.dtype == np.dtype("<f4") and vol.data.dtype.isnative
    np.testing.assert_array_equal(vol.data, data)
    raw = vio.load(path, dtype=None)  # the stored values as they are, memory-mapped
    assert raw.data.dtype == np.dtype(">f4") and is_memmapped(raw.data)
    np.testing.assert_array_equal(raw.data, data)
    vio.save(vol, tmp_path / "le.nii")
    assert disk_header(tmp_path / "le.nii").endianness == "<"  # written in the machine's byte order
    np.testing.assert_array_equal(vio.load(tmp_path / "le.nii").data, data)


def test_anisotropic_oblique_zooms(tmp_path, no_warnings):
    c, s = np.cos(0.3), np.sin(0.3)
    rotation = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.5, 1.25, 3.0])
    affine[:3, 3] = [10, 20, 30]
    vol = vio.load(write_nifti(tmp_path / "a.nii.gz", ramp((5, 6, 7)), affine))
    np.testing.assert_allclose(vol.zooms, (0.5, 1.25, 3.0), rtol=1e-6)
    assert len(vol.zooms) == 3 and all(type(z) is float for z in vol.zooms)


def test_bundled_anisotropic_sample():
    path = SAMPLES / "aniso_vox.nii.gz"
    if not path.exists():
        pytest.skip("sample_volumes/aniso_vox.nii.gz is not in this checkout")
    with pytest.warns(NiftiWarning, match="no spatial unit"):  # its xyzt_units are 'unknown'
        vol = vio.load(path)
    assert vol.data.shape == (58, 58, 24)
    np.testing.assert_allclose(vol.zooms, (4.0, 4.0, 5.0), rtol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# dtypes and memory mapping
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stored", [np.int16, np.uint8, np.float64, np.int32])
def test_float32_by_default(tmp_path, stored, no_warnings):
    raw = (np.arange(60).reshape(3, 4, 5) % 50).astype(stored)
    for name in ("v.nii", "v.nii.gz"):
        vol = vio.load(write_nifti(tmp_path / name, raw))
        assert vol.data.dtype == np.float32
        np.testing.assert_array_equal(vol.data, raw)
        assert vio.load(tmp_path / name, dtype=None).data.dtype == np.dtype(stored)


def test_memory_mapped_when_possible(tmp_path, no_warnings):
    data = ramp((4, 5, 6))
    plain = write_nifti(tmp_path / "p.nii", data)
    assert is_memmapped(vio.load(plain).data)  # float32 on disk: no conversion, no copy
    assert not is_memmapped(vio.load(plain, mmap=False).data)
    assert not is_memmapped(vio.load(write_nifti(tmp_path / "g.nii.gz", data)).data)
    ints = write_nifti(tmp_path / "i.nii", data.astype(np.int16))
    raw = vio.load(ints, dtype=None)
    assert raw.data.dtype == np.int16 and is_memmapped(raw.data)
    assert not is_memmapped(vio.load(ints).data)  # converted to float32: a copy
    scaled = write_nifti(tmp_path / "s.nii", data.astype(np.int16), slope=2.0, inter=0.0)
    assert not is_memmapped(vio.load(scaled, dtype=None).data)


def test_save_over_its_own_memory_mapped_source(tmp_path, no_warnings):
    path = write_nifti(tmp_path / "v.nii", ramp((4, 5, 6)))
    vol = vio.load(path)
    assert is_memmapped(vol.data)
    vio.save(vol.with_data(vol.data + 1), path)
    np.testing.assert_array_equal(vio.load(path).data, ramp((4, 5, 6)) + 1)
    np.testing.assert_array_equal(vol.data, ramp((4, 5, 6)))  # the old mapping still reads the old file
    assert listing(tmp_path) == ["v.nii"]


def test_integer_output_rounded_and_clipped(tmp_path):
    values = np.array([-1e6, -32768.4, -2.5, -0.5, 0.4, 0.5, 1.5, 2.6, 32766.6, 40000.7, np.inf, -np.inf],
                      np.float32)
    vol = Volume(np.pad(values, (0, 12))[:24].reshape(2, 3, 4), AFFINE)
    with pytest.warns(NiftiWarning, match=r"i16\.nii: saving as int16: 4 voxels outside int16's range "
                                          r"\[-32768, 32767\] clipped"):
        vio.save(vol, tmp_path / "i16.nii", dtype=np.int16)
    hdr = disk_header(tmp_path / "i16.nii")
    assert hdr.get_data_dtype() == np.int16
    assert hdr.get_slope_inter() == (1.0, 0.0)  # no new scale factor
    stored = np.asarray(nib.load(tmp_path / "i16.nii").dataobj.get_unscaled()).ravel()[:12]
    np.testing.assert_array_equal(stored, [-32768, -32768, -2, 0, 0, 0, 2, 3, 32767, 32767, 32767, -32768])

    with pytest.warns(NiftiWarning, match=r"u8\.nii\.gz: saving as uint8: 3 voxels outside .*; 1 NaN voxels written"):
        vio.save(Volume(np.array([-3.0, 254.5, 255.5, 300.0, np.nan, 7.49, 0, 0]).reshape(2, 2, 2), AFFINE),
                 tmp_path / "u8.nii.gz", dtype="uint8")
    stored = np.asarray(nib.load(tmp_path / "u8.nii.gz").dataobj.get_unscaled()).ravel(order="C")
    np.testing.assert_array_equal(stored, [0, 254, 255, 255, 0, 7, 0, 0])
    assert stored.dtype == np.uint8


def test_integer_output_from_integers(tmp_path, no_warnings):
    data = np.array([-5, 0, 100, 70000] * 6, np.int32).reshape(2, 3, 4)
    vio.save(Volume(data, AFFINE), tmp_path / "same.nii", dtype=np.int32)
    np.testing.assert_array_equal(vio.load(tmp_path / "same.nii", dtype=None).data, data)
    with pytest.warns(NiftiWarning, match="12 voxels outside uint16's range"):
        vio.save(Volume(data, AFFINE), tmp_path / "u16.nii", dtype=np.uint16)
    np.testing.assert_array_equal(vio.load(tmp_path / "u16.nii", dtype=None).data,
                                  np.clip(data, 0, 65535))


def test_float64_output_when_asked(tmp_path, no_warnings):
    data = ramp((3, 4, 5), np.float64) / 3
    vio.save(Volume(data, AFFINE), tmp_path / "d.nii", dtype=np.float64)
    back = vio.load(tmp_path / "d.nii", dtype=None)
    assert back.data.dtype == np.float64
    np.testing.assert_array_equal(back.data, data)


@pytest.mark.parametrize("dtype", [np.float16, np.complex64, bool])
def test_unsupported_output_dtype(tmp_path, dtype):
    with pytest.raises(ValueError, match="dtype must be one of"):
        vio.save(Volume(ramp((3, 4, 5)), AFFINE), tmp_path / "x.nii", dtype=dtype)
    assert listing(tmp_path) == []


def test_scale_factors_in_a_given_header_are_not_applied_twice(tmp_path, no_warnings):
    header = nib.Nifti1Header()
    header.set_slope_inter(0.37, 5.0)  # e.g. a header built by hand or taken from nib.Nifti1Header.from_fileobj
    header.set_data_dtype(np.int16)
    header.set_xyzt_units("mm", "sec")
    data = ramp((3, 4, 5))
    vio.save(Volume(data, AFFINE, header), tmp_path / "v.nii")
    assert disk_header(tmp_path / "v.nii").get_slope_inter() == (1.0, 0.0)
    np.testing.assert_array_equal(vio.load(tmp_path / "v.nii").data, data)


def test_cal_min_max_reset(tmp_path, no_warnings):
    src = tmp_path / "src.nii"
    img = nib.Nifti1Image(ramp((3, 4, 5)), AFFINE, dtype=np.float32)
    img.header["cal_min"], img.header["cal_max"] = -3, 11.75
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, src)
    assert disk_header(src)["cal_max"] == 11.75
    vol = vio.load(src)
    vio.save(vol.with_data(vol.data * 10), tmp_path / "out.nii")
    out = disk_header(tmp_path / "out.nii")
    assert (out["cal_min"], out["cal_max"]) == (0, 0)


def test_saved_file_mode_follows_umask(tmp_path, no_warnings):
    reference = tmp_path / "ref"
    reference.write_bytes(b"")  # created the usual way
    vio.save(Volume(ramp((3, 4, 5)), AFFINE), tmp_path / "v.nii")
    assert stat.S_IMODE((tmp_path / "v.nii").stat().st_mode) == stat.S_IMODE(reference.stat().st_mode)
    os.chmod(tmp_path / "v.nii", 0o640)
    vio.save(Volume(ramp((3, 4, 5)), AFFINE), tmp_path / "v.nii")  # replacing keeps the old file's mode
    assert stat.S_IMODE((tmp_path / "v.nii").stat().st_mode) == 0o640


# --------------------------------------------------------------------------------------------------------------
# Volume
# --------------------------------------------------------------------------------------------------------------

def test_volume_with_data(tmp_path, no_warnings):
    vol = vio.load(write_nifti(tmp_path / "v.nii", ramp((4, 5, 6))))
    new = vol.with_data(np.zeros((4, 5, 6), np.float64))
    assert new.data.dtype == np.float64 and not new.data.any()
    np.testing.assert_array_equal(new.affine, vol.affine)
    assert new.header is not vol.header and new.header.get_sform(coded=True)[1] == 2
    assert vol.with_data(np.zeros((4, 5, 6, 2))).data.ndim == 4
    with pytest.raises(ValueError, match=r"spatial shape \(4, 5, 5\).*\(4, 5, 6\)"):
        vol.with_data(np.zeros((4, 5, 5)))


@pytest.mark.parametrize("shape", [(4, 5), (2, 3, 4, 5, 6)])
def test_volume_rejects_other_ndims(shape):
    with pytest.raises(ValueError, match="3-D .* or 4-D"):
        Volume(np.zeros(shape), np.eye(4))


def test_volume_rejects_bad_affine_and_header():
    with pytest.raises(ValueError, match="4x4"):
        Volume(np.zeros((2, 2, 2)), np.eye(3))
    with pytest.raises(TypeError, match="MGHHeader"):
        Volume(np.zeros((2, 2, 2)), np.eye(4), nib.freesurfer.mghformat.MGHHeader())


# --------------------------------------------------------------------------------------------------------------
# warnings
# --------------------------------------------------------------------------------------------------------------

def test_warns_when_pixdim_disagrees_with_affine(tmp_path):
    path = write_nifti(tmp_path / "pix.nii", ramp((3, 4, 5)), pixdim=(1.0, 3.0, 4.0))
    with pytest.warns(NiftiWarning, match=r"pix\.nii: voxel sizes from the affine \(sform\) are \(2, 3, 4\) "
                                          r"but pixdim says \(1, 3, 4\)") as record:
        vol = vio.load(path)
    assert issubclass(record[0].category, UserWarning)
    assert vol.zooms == (2.0, 3.0, 4.0)  # the affine wins


def test_no_warning_for_float32_rounding_of_pixdim(tmp_path, no_warnings):
    vio.load(write_nifti(tmp_path / "ok.nii", ramp((3, 4, 5)), pixdim=(2.0000001, 2.9999998, 4.0)))


@pytest.mark.parametrize("unit, pattern", [
    ("meter", r"m\.nii: xyzt_units say the spatial unit is meters, not mm: the voxel sizes \(2, 3, 4\) are in "
              r"meters \(\(2000, 3000, 4000\) mm\)"),
    ("micron", r"m\.nii: xyzt_units say the spatial unit is micrometres \(microns\), not mm: .*\(0\.002, 0\.003, "
               r"0\.004\) mm"),
    ("unknown", r"m\.nii: xyzt_units give no spatial unit \(unknown\); volconv assumes mm"),
])
def test_warns_on_spatial_units(tmp_path, unit, pattern):
    path = write_nifti(tmp_path / "m.nii", ramp((3, 4, 5)), units=(unit, "sec"))
    with pytest.warns(NiftiWarning, match=pattern):
        vol = vio.load(path)
    assert vol.zooms == (2.0, 3.0, 4.0)


# --------------------------------------------------------------------------------------------------------------
# load errors
# --------------------------------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.nii.gz") as info:
        vio.load(tmp_path / "nothere.nii.gz")
    assert info.value.filename == str(tmp_path / "nothere.nii.gz")


@pytest.mark.parametrize("name, content, reason", [
    ("text.nii", b"hello, this is not an image\n" * 40, r"not a NIfTI file \(no NIfTI-1 or NIfTI-2 header"),
    ("short.nii", b"tiny", r"not a NIfTI file \(only 4 bytes"),
    ("text.nii.gz", gzip.compress(b"not an image " * 100), r"not a NIfTI file"),
])
def test_not_nifti(tmp_path, name, content, reason):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(NiftiError, match=f"{name}: {reason}"):
        vio.load(tmp_path / name)


def test_analyze_and_pair_headers_refused(tmp_path):
    hdr = nib.AnalyzeHeader()
    hdr.set_data_shape((2, 2, 2))
    (tmp_path / "analyze.nii").write_bytes(hdr.binaryblock + bytes(8 * 4))
    with pytest.raises(NiftiError, match=r"analyze\.nii: not a NIfTI file \(an Analyze 7\.5 header"):
        vio.load(tmp_path / "analyze.nii")
    pair = nib.Nifti1Pair.header_class()  # magic "ni1"
    pair.set_data_shape((2, 2, 2))
    (tmp_path / "pair.hdr").write_bytes(pair.binaryblock)
    with pytest.raises(NiftiError, match=r"pair\.hdr: a NIfTI header of a \.hdr/\.img pair"):
        vio.load(tmp_path / "pair.hdr")


def test_directory_refused(tmp_path):
    with pytest.raises(NiftiError, match="is a directory"):
        vio.load(tmp_path)


def test_corrupt_gzip(tmp_path):
    good = write_nifti(tmp_path / "good.nii.gz", ramp((8, 9, 10)))
    blob = bytearray(good.read_bytes())
    (tmp_path / "garbage.nii.gz").write_bytes(b"\x1f\x8b" + bytes(range(256)) * 4)
    with pytest.raises(NiftiError, match=r"garbage\.nii\.gz: corrupt or truncated gzip stream"):
        vio.load(tmp_path / "garbage.nii.gz")
    for i in range(len(blob) // 2, len(blob) // 2 + 16):
        blob[i] ^= 0x5A
    (tmp_path / "flipped.nii.gz").write_bytes(bytes(blob))
    with pytest.raises(NiftiError, match=r"flipped\.nii\.gz: .*(gzip|truncated)"):
        vio.load(tmp_path / "flipped.nii.gz")
    crc = bytearray(good.read_bytes())
    crc[-8] ^= 0xFF  # stored CRC32: the data decompresses, only the checksum is wrong
    (tmp_path / "crc.nii.gz").write_bytes(bytes(crc))
    with pytest.raises(NiftiError, match=r"crc\.nii\.gz: corrupt or truncated gzip stream \(CRC check failed"):
        vio.load(tmp_path / "crc.nii.gz")


@pytest.mark.parametrize("name", ["cut.nii", "cut.nii.gz"])
def test_truncated_data(tmp_path, name):
    write_nifti(tmp_path / name, ramp((8, 9, 10)), truncate_by=100)  # complete gzip of an incomplete file
    with pytest.raises(NiftiError, match=rf"{name}: truncated data") as info:
        vio.load(tmp_path / name)
    if name == "cut.nii":  # checked against the file size before anything is mapped
        assert "(8, 9, 10) float32 voxels ending at byte 3232, the file has 3132 bytes" in str(info.value)


def test_truncated_gzip_stream(tmp_path):
    good = write_nifti(tmp_path / "good.nii.gz", ramp((16, 16, 16)) * 1.1)
    (tmp_path / "cut.nii.gz").write_bytes(good.read_bytes()[:-400])
    with pytest.raises(NiftiError, match=r"cut\.nii\.gz: corrupt or truncated gzip stream"):
        vio.load(tmp_path / "cut.nii.gz")


def test_gzip_recognised_by_content_not_name(tmp_path, no_warnings):
    data = ramp((3, 4, 5))
    gz_named_plain = tmp_path / "plain.nii.gz"
    write_nifti(tmp_path / "p.nii", data).rename(gz_named_plain)
    np.testing.assert_array_equal(vio.load(gz_named_plain).data, data)
    plain_named_gz = tmp_path / "gz.nii"
    write_nifti(tmp_path / "g.nii.gz", data).rename(plain_named_gz)
    np.testing.assert_array_equal(vio.load(plain_named_gz).data, data)


# --------------------------------------------------------------------------------------------------------------
# save errors: nothing partial, no temporary file
# --------------------------------------------------------------------------------------------------------------

def small_volume():
    return Volume(ramp((4, 5, 6)), AFFINE)


def test_overwrite_false(tmp_path, monkeypatch, no_warnings):
    out = tmp_path / "out.nii.gz"
    vio.save(small_volume(), out, overwrite=False)  # new file: fine
    before = out.read_bytes()
    monkeypatch.setattr(vio.writer, "_open_temp", lambda fd: pytest.fail("refused only after writing the data"))
    with pytest.raises(FileExistsError, match="out.nii.gz") as info:
        vio.save(Volume(np.zeros((4, 5, 6)), AFFINE), out, overwrite=False)
    assert info.value.filename == str(out)
    assert out.read_bytes() == before
    assert listing(tmp_path) == ["out.nii.gz"]
    monkeypatch.undo()
    vio.save(Volume(np.zeros((4, 5, 6)), AFFINE), out)  # overwrite=True (default) replaces it
    assert not vio.load(out).data.any()


def test_overwrite_false_when_the_file_appears_during_the_write(tmp_path, monkeypatch, no_warnings):
    out = tmp_path / "out.nii"
    real_open_temp = vio.writer._open_temp

    def racing(fd):
        out.write_bytes(b"someone else's file")
        return real_open_temp(fd)

    monkeypatch.setattr(vio.writer, "_open_temp", racing)
    with pytest.raises(FileExistsError, match="out.nii"):
        vio.save(small_volume(), out, overwrite=False)
    assert out.read_bytes() == b"someone else's file"
    assert listing(tmp_path) == ["out.nii"]


def test_missing_output_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="output directory does not exist") as info:
        vio.save(small_volume(), tmp_path / "no" / "out.nii")
    assert info.value.filename == str(tmp_path / "no")
    assert listing(tmp_path) == []


def test_unwritable_directory_simulated(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(vio.atomic.tempfile, "mkstemp", refuse)
    with pytest.raises(PermissionError, match="cannot create a file in the output directory") as info:
        vio.save(small_volume(), tmp_path / "out.nii.gz")
    assert info.value.filename == str(tmp_path)
    assert listing(tmp_path) == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_directory_real(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(PermissionError) as info:
            vio.save(small_volume(), locked / "out.nii.gz")
        assert info.value.filename == str(locked)
        assert listing(locked) == []
    finally:
        locked.chmod(0o700)


class FullDisk(io.RawIOBase):
    """A file that accepts `room` bytes, then fails like a full disk."""

    def __init__(self, fd, room):
        self.file = os.fdopen(fd, "wb")
        self.room = room

    def writable(self):
        return True

    def write(self, b):
        b = bytes(b)
        if len(b) > self.room:
            self.file.write(b[:self.room])
            self.file.flush()
            self.room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(b)
        return self.file.write(b)

    def seek(self, *args):
        return self.file.seek(*args)

    def tell(self):
        return self.file.tell()

    def fileno(self):
        return self.file.fileno()

    def flush(self):
        if not self.file.closed:
            self.file.flush()

    def close(self):
        super().close()
        self.file.close()


@pytest.mark.parametrize("name", ["out.nii", "out.nii.gz"])
def test_disk_full(tmp_path, monkeypatch, name):
    out = tmp_path / name
    vio.save(small_volume(), out)
    before = out.read_bytes()
    partial = []

    def full_disk(fd):
        partial.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else None)
        return FullDisk(fd, room=100)

    monkeypatch.setattr(vio.writer, "_open_temp", full_disk)
    big = Volume(np.random.default_rng(0).random((20, 20, 20)), AFFINE)
    with pytest.raises(OSError, match=rf"No space left on device: could not write .*{name}") as info:
        vio.save(big, out)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(out)
    assert out.read_bytes() == before  # the old file is untouched
    assert listing(tmp_path) == [name]  # and the partial temporary file is gone
    if partial[0]:
        assert Path(partial[0]).parent == tmp_path and partial[0].endswith(".tmp" + name[3:])


@pytest.mark.parametrize("name", ["out.nii", "out.nii.gz"])
def test_exception_midway_leaves_nothing(tmp_path, monkeypatch, name):
    """An interrupt after the header and part of the data: no output, no temporary file."""
    real_cast, calls = vio.writer._cast, []

    def interrupted(data, dtype):
        calls.append(1)
        if len(calls) == 3:   # the third plane
            raise KeyboardInterrupt
        return real_cast(data, dtype)

    monkeypatch.setattr(vio.writer, "_cast", interrupted)
    with pytest.raises(KeyboardInterrupt):
        vio.save(small_volume(), tmp_path / name)
    assert len(calls) == 3 and listing(tmp_path) == []


def test_bad_output_extension(tmp_path):
    with pytest.raises(ValueError, match=r"out\.img: output file name must end in \.nii or \.nii\.gz"):
        vio.save(small_volume(), tmp_path / "out.img")
    assert listing(tmp_path) == []


def test_successful_save_leaves_no_temporary_file(tmp_path, no_warnings):
    for name in ("a.nii", "b.nii.gz"):
        vio.save(small_volume(), tmp_path / name)
        vio.save(small_volume(), tmp_path / name)
    assert listing(tmp_path) == ["a.nii", "b.nii.gz"]
    with gzip.open(tmp_path / "b.nii.gz") as f:
        assert len(f.read()) == 352 + 4 * 5 * 6 * 4
