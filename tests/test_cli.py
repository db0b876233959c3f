"""The `volconv` command: main([...]) called directly, on the bundled sample and on tiny synthetic volumes.

Every failure must exit 1 with one line "volconv: error: <file>: <problem>" naming the file, and leave no
output behind; bad arguments exit 2 (argparse). Results are checked against scipy.ndimage in float64.
"""
import errno
import gzip
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage as ndi

import volconv
import volconv.io as vio
from volconv import cli
from volconv.cli import main

SAMPLE = Path(__file__).resolve().parent.parent / "sample_volumes" / "anatomical.nii.gz"  # >i2, 2 mm, LAS
ZOOMS = (1.0, 2.0, 2.5)
AFFINE = np.array([[-1.0, 0.0, 0.0, 30.0],
                   [0.0, 2.0, 0.0, -40.0],
                   [0.0, 0.0, 2.5, -20.0],
                   [0.0, 0.0, 0.0, 1.0]])
EPS32 = float(np.finfo(np.float32).eps)


def gaussian_tolerance(data, sigmas, truncate=4.0):
    """float32 filtering against the float64 reference: three 1-D passes, each output a convex combination of
    2 * radius + 1 inputs, so the rounding error is at most gamma_n * max|data| with n = the taps of the three
    passes plus one rounding per pass and the final float32 store (Higham, Thm 3.1); rounded up to whole eps."""
    n = sum(2 * int(truncate * s + 0.5) + 1 for s in sigmas) + 4
    return n * EPS32 * float(np.abs(data).max())


def write(path, data, affine=AFFINE, *, slope=None, inter=None, sform_code=2, qform_code=1):
    img = nib.Nifti1Image(np.asarray(data), affine)
    img.header.set_sform(affine, code=sform_code)
    img.header.set_qform(affine, code=qform_code)
    img.header.set_xyzt_units("mm", "sec")
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    nib.save(img, str(path))
    return path


def synthetic(tmp_path, name="vol.nii.gz", shape=(20, 16, 14), dtype=np.float32, seed=0):
    data = (np.random.default_rng(seed).random(shape) * 100).astype(dtype)
    return write(tmp_path / name, data), data.astype(np.float64)


def run(capsys, *argv):
    """main(argv) -> (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def saved(path):
    img = nib.load(str(path))
    return img, np.asanyarray(img.dataobj)


def listing(directory):
    return sorted(os.listdir(directory))


def assert_failure(code, err, culprit, *, also=None):
    """Exit 1, exactly one error line naming `culprit` (and saying `also`)."""
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.startswith("volconv: error:")]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"volconv: error: {culprit}: "), lines[0]
    if also is not None:
        assert also in lines[0], lines[0]


# ----------------------------------------------------------------------------------------------- filter


def test_gaussian_on_the_sample_matches_scipy_and_keeps_geometry(tmp_path, capsys):
    out = tmp_path / "smooth.nii.gz"
    code, stdout, err = run(capsys, "filter", SAMPLE, out, "--gaussian", "2mm")
    assert code == 0, err
    src = nib.load(str(SAMPLE))
    data = np.asarray(src.dataobj, dtype=np.float64)
    img, got = saved(out)
    sigmas = (1.0, 1.0, 1.0)  # 2 mm / 2 mm voxels
    ref = ndi.gaussian_filter(data, sigmas, mode="reflect")
    assert got.dtype == np.float32
    assert np.abs(got - ref).max() <= gaussian_tolerance(data, sigmas)
    np.testing.assert_array_equal(img.affine, src.affine)
    assert img.header.get_zooms() == src.header.get_zooms()
    assert int(img.header["sform_code"]) == int(src.header["sform_code"]) == 2
    assert int(img.header["qform_code"]) == int(src.header["qform_code"])
    assert img.header.get_xyzt_units() == src.header.get_xyzt_units()
    # the log: effective sigma in voxels per axis, kernel shape, time taken
    assert "sigma 1, 1, 1 voxels per axis" in err and "kernel 9x9x9" in err and err.rstrip().endswith(" s")
    assert stdout == ""


@pytest.mark.parametrize("option, size, sigma_mm", [
    ("--gaussian", "2mm", (2.0, 2.0, 2.0)),
    ("--gaussian", "2", (2.0, 2.0, 2.0)),          # mm by default
    ("--gaussian", "2.5mm", (2.5, 2.5, 2.5)),
    ("--gaussian", " 2.5 MM ", (2.5, 2.5, 2.5)),
    ("--gaussian", "1.5vox", tuple(1.5 * z for z in ZOOMS)),
    ("--gaussian", "2,2,3mm", (2.0, 2.0, 3.0)),
    ("--gaussian", "1,1,0.5vox", (1.0 * ZOOMS[0], 1.0 * ZOOMS[1], 0.5 * ZOOMS[2])),
    ("--gaussian", "2,2,0mm", (2.0, 2.0, 0.0)),     # no smoothing along the last axis
    ("--fwhm", "4mm", tuple(4.0 / (2 * np.sqrt(2 * np.log(2))) for _ in range(3))),
    ("--sigma-vox", "1.5", tuple(1.5 * z for z in ZOOMS)),
    ("--sigma-vox", "1,0.5,0.5vox", (1.0 * ZOOMS[0], 0.5 * ZOOMS[1], 0.5 * ZOOMS[2])),
])
def test_size_syntax(tmp_path, capsys, option, size, sigma_mm):
    src, data = synthetic(tmp_path, shape=(24, 16, 14))
    out = tmp_path / "out.nii"
    code, _, err = run(capsys, "filter", src, out, option, size)
    assert code == 0, err
    sigmas = tuple(s / z for s, z in zip(sigma_mm, ZOOMS))  # per array axis, in voxels
    ref = ndi.gaussian_filter(data, sigmas)
    _, got = saved(out)
    assert np.abs(got - ref).max() <= gaussian_tolerance(data, sigmas)
    assert "sigma " + ", ".join(f"{s:.4g}" for s in sigmas) + " voxels per axis" in err


def test_truncate_mode_cval_and_float64_output(tmp_path, capsys):
    src, data = synthetic(tmp_path, shape=(16, 12, 10))
    out = tmp_path / "out.nii.gz"
    code, _, err = run(capsys, "filter", src, out, "--sigma-vox", "1.2", "--truncate", "2.5", "--mode",
                       "constant", "--cval", "7", "--odt", "float64", "--workers", "1")
    assert code == 0, err
    ref = ndi.gaussian_filter(data, 1.2, truncate=2.5, mode="constant", cval=7.0)
    _, got = saved(out)
    assert got.dtype == np.float64
    assert np.abs(got - ref).max() <= gaussian_tolerance(data, (1.2,) * 3, truncate=2.5)
    assert "kernel 7x7x7" in err


@pytest.mark.parametrize("mode", ["nearest", "mirror", "wrap"])
def test_modes(tmp_path, capsys, mode):
    src, data = synthetic(tmp_path, shape=(12, 10, 9))
    out = tmp_path / "out.nii.gz"
    assert run(capsys, "filter", src, out, "--sigma-vox", "1", "--mode", mode)[0] == 0
    ref = ndi.gaussian_filter(data, 1.0, mode=mode)
    assert np.abs(saved(out)[1] - ref).max() <= gaussian_tolerance(data, (1.0,) * 3)


def box_reference(data, counts):
    return ndi.correlate(data, np.ones(counts) / np.prod(counts), mode="reflect")


def ball_reference(data, radius_vox):
    half = [int(np.floor(r)) for r in radius_vox]
    grids = np.meshgrid(*[np.arange(-h, h + 1) / r for h, r in zip(half, radius_vox)], indexing="ij")
    inside = (sum(g ** 2 for g in grids) <= 1.0 + 1e-12).astype(np.float64)
    return ndi.correlate(data, inside / inside.sum(), mode="reflect"), inside.shape


@pytest.mark.parametrize("option, size, reference", [
    ("--box", "3mm", lambda d: (box_reference(d, (3, 1, 1)), (3, 1, 1))),   # 2 floor(3 / (1, 2, 2.5) / 2) + 1
    ("--box", "3,3,3vox", lambda d: (box_reference(d, (3, 3, 3)), (3, 3, 3))),
    ("--ball", "4mm", lambda d: ball_reference(d, (4.0, 2.0, 1.6))),
    ("--ball", "2vox", lambda d: ball_reference(d, (2.0, 2.0, 2.0))),
])
def test_box_and_ball(tmp_path, capsys, option, size, reference):
    src, data = synthetic(tmp_path, shape=(14, 12, 10))
    out = tmp_path / "out.nii.gz"
    code, _, err = run(capsys, "filter", src, out, option, size)
    assert code == 0, err
    ref, shape = reference(data)
    # a mean of at most 125 values: the summation bound, generously
    assert np.abs(saved(out)[1] - ref).max() <= 256 * EPS32 * np.abs(data).max()
    assert f"kernel {'x'.join(map(str, shape))}" in err


@pytest.mark.parametrize("suffix", [".npy", ".nii.gz"])
def test_kernel_file_is_correlated(tmp_path, capsys, suffix):
    src, data = synthetic(tmp_path, shape=(10, 9, 8))
    kernel = np.random.default_rng(1).random((3, 2, 5))  # asymmetric: a flip or a shift would show
    path = tmp_path / f"k{suffix}"
    if suffix == ".npy":
        np.save(path, kernel)
    else:
        nib.save(nib.Nifti1Image(kernel, np.eye(4)), str(path))
    out = tmp_path / "out.nii.gz"
    code, _, err = run(capsys, "filter", src, out, "--kernel", path, "--mode", "nearest")
    assert code == 0, err
    ref = ndi.correlate(data, kernel, mode="nearest")
    tol = 32 * EPS32 * ndi.correlate(np.abs(data), np.abs(kernel), mode="nearest")
    assert np.all(np.abs(saved(out)[1] - ref) <= tol)
    assert f"kernel from {path}, shape 3x2x5" in err


@pytest.fixture
def masked(tmp_path):
    src, data = synthetic(tmp_path, shape=(12, 10, 9))
    mask = np.zeros(data.shape, np.uint8)
    mask[2:10, 1:8, 2:7] = 1
    mask[5, 4, 4] = 0  # a hole
    return src, data, write(tmp_path / "mask.nii.gz", mask), mask.astype(bool)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("outside", ["keep", "zero"])
def test_mask_normalize_outside(tmp_path, capsys, masked, normalize, outside):
    src, data, mask_path, inside = masked
    out = tmp_path / "out.nii.gz"
    argv = ["filter", src, out, "--sigma-vox", "1", "--mask", mask_path, "--outside", outside]
    code, _, err = run(capsys, *argv, *(["--normalize"] if normalize else []))
    assert code == 0, err
    weight = inside.astype(np.float64)
    if normalize:  # fslmaths -fmean: the weighted mean over the voxels inside the mask and the volume
        ref = (ndi.gaussian_filter(data * weight, 1.0, mode="constant")
               / ndi.gaussian_filter(weight, 1.0, mode="constant"))
    else:
        ref = ndi.gaussian_filter(data * weight, 1.0)
    ref[~inside] = data[~inside] if outside == "keep" else 0.0
    got = saved(out)[1]
    assert np.abs(got - ref).max() <= 4 * gaussian_tolerance(data, (1.0,) * 3)  # a quotient of two filters


def test_int16_output(tmp_path, capsys):
    out = tmp_path / "smooth_i16.nii.gz"
    code, _, err = run(capsys, "filter", SAMPLE, out, "--box", "6mm", "--odt", "int16")
    assert code == 0, err
    img, got = saved(out)
    assert img.get_data_dtype() == np.int16
    assert img.dataobj.slope == 1 and img.dataobj.inter == 0
    data = np.asarray(nib.load(str(SAMPLE)).dataobj, dtype=np.float64)
    ref = box_reference(data, (3, 3, 3))
    # rounding to the nearest integer: off by at most 1/2, plus float32 error at a .5 tie
    assert np.abs(got - ref).max() <= 0.5 + 64 * EPS32 * np.abs(data).max()


def test_4d_volume_by_volume(tmp_path, capsys):
    data = np.random.default_rng(2).random((14, 8, 7, 3)).astype(np.float32)
    src = write(tmp_path / "series.nii.gz", data)
    out = tmp_path / "out.nii.gz"
    code, _, err = run(capsys, "filter", src, out, "--gaussian", "1.5mm")
    assert code == 0, err
    img, got = saved(out)
    assert got.shape == data.shape
    sigmas = tuple(1.5 / z for z in ZOOMS)
    for t in range(3):
        ref = ndi.gaussian_filter(data[..., t].astype(np.float64), sigmas)
        assert np.abs(got[..., t] - ref).max() <= gaussian_tolerance(data, sigmas)
    assert "3 volumes" in err


def test_quiet(tmp_path, capsys):
    src, _ = synthetic(tmp_path)
    assert run(capsys, "filter", src, tmp_path / "o.nii.gz", "--gaussian", "2mm", "--quiet") == (0, "", "")


def test_progress_bar_on_a_terminal(tmp_path, capsys, monkeypatch):
    """4-D work shows a tqdm bar on a terminal (here: any duration); not when stderr is not a terminal."""
    data = np.random.default_rng(3).random((10, 6, 6, 4)).astype(np.float32)
    src = write(tmp_path / "series.nii.gz", data)

    class Terminal:
        def __init__(self):
            self.text = []

        def write(self, s):
            self.text.append(s)

        def flush(self):
            pass

        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(cli.common, "PROGRESS_DELAY_S", 0)
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["filter", str(src), str(tmp_path / "out.nii.gz"), "--gaussian", "1mm"]) == 0
    monkeypatch.undo()
    text = "".join(terminal.text)
    assert "24/24" in text and "plane" in text   # 4 volumes of 6 planes
    assert "sigma 1, 0.5, 0.4 voxels per axis" in text


def test_force(tmp_path, capsys):
    src, data = synthetic(tmp_path)
    out = tmp_path / "out.nii.gz"
    assert run(capsys, "filter", src, out, "--gaussian", "1mm")[0] == 0
    before = out.read_bytes()
    code, _, err = run(capsys, "filter", src, out, "--gaussian", "1.5mm")
    assert_failure(code, err, out, also="--force")
    assert out.read_bytes() == before
    code, _, err = run(capsys, "filter", src, out, "--gaussian", "1.5mm", "--force")
    assert code == 0, err
    sigmas = tuple(1.5 / z for z in ZOOMS)
    assert np.abs(saved(out)[1] - ndi.gaussian_filter(data, sigmas)).max() <= gaussian_tolerance(data, sigmas)
    assert listing(tmp_path) == ["out.nii.gz", "vol.nii.gz"]


def test_preview(tmp_path, capsys):
    out, png = tmp_path / "out.nii.gz", tmp_path / "preview.png"
    code, _, err = run(capsys, "filter", SAMPLE, out, "--gaussian", "2mm", "--preview", png)
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    height, width = matplotlib.image.imread(str(png)).shape[:2]
    assert width > height > 300  # 2 rows x 3 columns of slices
    assert listing(tmp_path) == ["out.nii.gz", "preview.png"]  # no temporary file left
    # an existing preview is refused like an existing NIfTI, before anything is written
    code, _, err = run(capsys, "filter", SAMPLE, tmp_path / "other.nii.gz", "--gaussian", "2mm", "--preview", png)
    assert_failure(code, err, png, also="--force")
    assert listing(tmp_path) == ["out.nii.gz", "preview.png"]


def test_preview_failure_leaves_nothing(tmp_path, capsys, monkeypatch):
    def broken(self, src, dst):
        raise cli.CommandError(self.path, "simulated failure")

    monkeypatch.setattr(cli.preview.Preview, "write", broken)
    code, _, err = run(capsys, "filter", SAMPLE, tmp_path / "out.nii.gz", "--gaussian", "2mm", "--preview",
                       tmp_path / "p.png")
    assert_failure(code, err, tmp_path / "p.png")
    assert listing(tmp_path) == []


def test_no_torch_imported(tmp_path):
    """The command stays light: neither filter nor info imports torch (a fresh interpreter: this one has it)."""
    src, _ = synthetic(tmp_path)
    root = Path(volconv.__file__).resolve().parent.parent
    script = ("import sys; from volconv.cli import main; "
              f"assert main(['filter', {str(src)!r}, {str(tmp_path / 'o.nii.gz')!r}, '--gaussian', '2mm', '-q', "
              f"'--preview', {str(tmp_path / 'p.png')!r}]) == 0; "
              f"assert main(['info', {str(src)!r}]) == 0; "
              "assert 'torch' not in sys.modules, 'torch imported'")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_cuda_device_refused_clearly(tmp_path, capsys):
    src, _ = synthetic(tmp_path)
    code, _, err = run(capsys, "filter", src, tmp_path / "o.nii.gz", "--gaussian", "2mm", "--device", "cuda")
    assert code == 1
    # this machine has no GPU: the plugin is either not built or built without a GPU to run on
    assert err.startswith("volconv: error: volconv was built without its CUDA plugin") or \
        err.startswith("volconv: error: volconv's CUDA plugin is built but no CUDA GPU is available")
    assert listing(tmp_path) == ["vol.nii.gz"]


# ----------------------------------------------------------------------------------------------- errors


def not_nifti(path):
    path.write_bytes(b"this is a text file, not a volume\n" * 20)


def corrupt_gzip(path):
    raw = bytearray(SAMPLE.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 64] = bytes(64)
    path.write_bytes(bytes(raw))


def truncated(path):
    plain = gzip.decompress(SAMPLE.read_bytes())
    path.write_bytes(plain[:len(plain) - 1000])


@pytest.mark.parametrize("name, make, problem", [
    ("missing.nii.gz", None, "No such file"),
    ("text.nii.gz", not_nifti, "not a NIfTI file"),
    ("corrupt.nii.gz", corrupt_gzip, "gzip"),
    ("truncated.nii", truncated, "truncated"),
])
def test_broken_input(tmp_path, capsys, name, make, problem):
    src = tmp_path / "in" / name
    src.parent.mkdir()
    if make is not None:
        make(src)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, _, err = run(capsys, "filter", src, out_dir / "o.nii.gz", "--gaussian", "2mm")
    assert_failure(code, err, src, also=problem)
    assert listing(out_dir) == []


def test_kernel_larger_than_the_volume(tmp_path, capsys):
    src, _ = synthetic(tmp_path, shape=(12, 10, 4))
    code, _, err = run(capsys, "filter", src, tmp_path / "o.nii.gz", "--gaussian", "3mm")  # 25x13x11 kernel
    assert code == 0, err   # filtered through the boundary mode, as scipy.ndimage and vc.correlate do
    assert listing(tmp_path) == ["o.nii.gz", "vol.nii.gz"]


def test_output_directory_missing_or_not_a_directory(tmp_path, capsys):
    src, _ = synthetic(tmp_path)
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "no" / "o.nii.gz", tmp_path / "file" / "o.nii.gz"):
        code, _, err = run(capsys, "filter", src, out, "--gaussian", "2mm")
        assert_failure(code, err, out, also="output directory")
    assert listing(tmp_path) == ["file", "vol.nii.gz"]


def test_unwritable_output_directory(tmp_path, capsys, monkeypatch):
    """The directory refuses new files (simulated: root may write anywhere): the error names the output."""
    src, _ = synthetic(tmp_path)
    out_dir = tmp_path / "locked"
    out_dir.mkdir()

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(vio.atomic.tempfile, "mkstemp", refuse)
    code, _, err = run(capsys, "filter", src, out_dir / "o.nii.gz", "--gaussian", "2mm")
    assert_failure(code, err, out_dir / "o.nii.gz", also="Permission denied")
    assert listing(out_dir) == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_output_directory_real(tmp_path, capsys):
    src, _ = synthetic(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, _, err = run(capsys, "filter", src, locked / "o.nii.gz", "--gaussian", "2mm")
        assert_failure(code, err, locked / "o.nii.gz")
        assert listing(locked) == []
    finally:
        locked.chmod(0o700)


def test_bad_mask_and_kernel_files(tmp_path, capsys):
    src, _ = synthetic(tmp_path, shape=(12, 10, 9))
    out = tmp_path / "o.nii.gz"
    cases = []
    cases.append((["--mask", tmp_path / "nomask.nii.gz"], tmp_path / "nomask.nii.gz", "No such file"))
    not_nifti(tmp_path / "text.nii")
    cases.append((["--mask", tmp_path / "text.nii"], tmp_path / "text.nii", "not a NIfTI file"))
    write(tmp_path / "small_mask.nii", np.ones((3, 3, 3), np.uint8))
    cases.append((["--mask", tmp_path / "small_mask.nii"], src, "mask has shape"))
    for argv, culprit, problem in cases:
        code, _, err = run(capsys, "filter", src, out, "--gaussian", "1mm", *argv)
        assert_failure(code, err, culprit, also=problem)
    np.save(tmp_path / "flat.npy", np.ones((3, 3)))
    for kernel, problem in (("nokernel.npy", "does not exist"), ("flat.npy", "3-D"), ("text.nii", "")):
        code, _, err = run(capsys, "filter", src, out, "--kernel", tmp_path / kernel)
        assert_failure(code, err, tmp_path / kernel, also=problem)
    assert not out.exists()


@pytest.mark.parametrize("argv", [
    [],                                                     # no kernel
    ["--gaussian", "2mm", "--box", "3mm"],                  # two kernels
    ["--gaussian", "2cm"],
    ["--gaussian", "-1mm"],
    ["--gaussian", "2,3mm"],
    ["--gaussian", "0mm"],
    ["--gaussian", "nan"],
    ["--box", "0,3,3mm"],
    ["--sigma-vox", "1.5mm"],
    ["--box", "3mm", "--truncate", "3"],
    ["--gaussian", "2mm", "--truncate", "0"],
    ["--gaussian", "2mm", "--outside", "zero"],             # --outside needs --mask
    ["--gaussian", "2mm", "--mode", "edge"],
    ["--gaussian", "2mm", "--odt", "float16"],
    ["--gaussian", "2mm", "--workers", "0"],
])
def test_bad_arguments_exit_2(tmp_path, capsys, argv):
    src, _ = synthetic(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["filter", str(src), str(tmp_path / "o.nii.gz"), *argv])
    assert info.value.code == 2
    assert "volconv filter: error:" in capsys.readouterr().err
    assert listing(tmp_path) == ["vol.nii.gz"]


def test_bad_output_name_exit_2(tmp_path, capsys):
    src, _ = synthetic(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["filter", str(src), str(tmp_path / "o.img"), "--gaussian", "2mm"])
    assert info.value.code == 2
    assert "o.img" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- batch


def test_batch(tmp_path, capsys):
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    a, data_a = synthetic(in_dir, "a.nii.gz", seed=1)
    b, data_b = synthetic(in_dir, "b.nii", shape=(18, 10, 8), seed=2)
    (in_dir / "notes.txt").write_text("not a volume")
    (in_dir / ".a.tmp.nii.gz").write_bytes(b"an interrupted temporary")
    code, _, err = run(capsys, "batch", in_dir, out_dir, "--gaussian", "2mm")
    assert code == 0, err
    assert listing(out_dir) == ["a.nii.gz", "b.nii"]
    sigmas = tuple(2 / z for z in ZOOMS)
    for name, data in (("a.nii.gz", data_a), ("b.nii", data_b)):
        img, got = saved(out_dir / name)
        assert np.abs(got - ndi.gaussian_filter(data, sigmas)).max() <= gaussian_tolerance(data, sigmas)
        np.testing.assert_array_equal(img.affine, AFFINE)
    assert "2 files filtered" in err
    # again: refused as a whole without --force (nothing rewritten), accepted with it
    before = {n: (out_dir / n).stat().st_mtime_ns for n in listing(out_dir)}
    code, _, err = run(capsys, "batch", in_dir, out_dir, "--box", "3mm")
    assert_failure(code, err, out_dir / "a.nii.gz", also="--force")
    assert {n: (out_dir / n).stat().st_mtime_ns for n in listing(out_dir)} == before
    assert run(capsys, "batch", in_dir, out_dir, "--box", "3mm", "--force", "--quiet") == (0, "", "")


def test_batch_goes_on_after_a_broken_file(tmp_path, capsys):
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    synthetic(in_dir, "good.nii.gz")
    corrupt_gzip(in_dir / "bad.nii.gz")
    code, _, err = run(capsys, "batch", in_dir, out_dir, "--gaussian", "2mm")
    assert code == 1
    assert f"volconv: error: {in_dir / 'bad.nii.gz'}: " in err and "gzip" in err
    assert "1 of 2 files failed" in err
    assert listing(out_dir) == ["good.nii.gz"]


def test_batch_directory_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(capsys, "batch", empty, tmp_path / "out", "--gaussian", "2mm")
    assert_failure(code, err, empty, also="no .nii")
    code, _, err = run(capsys, "batch", tmp_path / "none", tmp_path / "out", "--gaussian", "2mm")
    assert_failure(code, err, tmp_path / "none", also="does not exist")
    synthetic(empty)
    code, _, err = run(capsys, "batch", empty, empty, "--gaussian", "2mm", "--force")
    assert_failure(code, err, empty, also="input directory")
    assert listing(tmp_path) == ["empty"] and listing(empty) == ["vol.nii.gz"]


# ----------------------------------------------------------------------------------------------- info


def test_info_fields(tmp_path, capsys):
    scaled = write(tmp_path / "scaled.nii", np.arange(60, dtype=np.int16).reshape(3, 4, 5), slope=0.5,
                   inter=10, sform_code=4, qform_code=0)
    code, out, err = run(capsys, "info", SAMPLE, scaled)
    assert code == 0, err
    sample, other = out.split("\n\n")
    for field in (str(SAMPLE), "NIfTI-1, gzip", "shape        33 x 41 x 25", "zooms        2 x 2 x 2 mm",
                  "int16, big-endian (on disk)", "orientation  LAS", "scaling      none",
                  "sform        code 2 (aligned)", "qform        code 2 (aligned)", "units        mm, sec",
                  f"memory       {33 * 41 * 25 * 4 / 1024:.3g} KiB as float32"):
        assert field in sample, field
    for field in ("shape        3 x 4 x 5", "zooms        1 x 2 x 2.5 mm", "int16", "orientation  LAS",
                  "scaling      slope 0.5, intercept 10", "sform        code 4 (mni)",
                  "qform        code 0 (unknown)", "memory       240 bytes"):
        assert field in other, field


def test_info_without_files_prints_the_build(capsys):
    code, out, _ = run(capsys, "info")
    assert code == 0
    assert "kernels" in out and "threads" in out and "CUDA plugin" in out


def test_info_errors_name_the_file(tmp_path, capsys):
    not_nifti(tmp_path / "text.nii")
    code, out, err = run(capsys, "info", tmp_path / "missing.nii", tmp_path / "text.nii", SAMPLE)
    assert code == 1
    assert f"volconv: error: {tmp_path / 'missing.nii'}: No such file" in err
    assert f"volconv: error: {tmp_path / 'text.nii'}: not a NIfTI file" in err
    assert "33 x 41 x 25" in out  # the readable file is still described
