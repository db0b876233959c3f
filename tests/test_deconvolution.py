"""vc.restoration.richardson_lucy and `volconv deconvolve` against skimage.restoration.richardson_lucy itself.

Tolerance (`tolerance` below), derived from the arithmetic. Both implementations run the same iteration in the
same float type (float32 for float32 input: scikit-image does not compute in float64 then), and differ only in
how each convolution is summed: volconv by its direct kernel or by real FFTs on its own box, scikit-image by
scipy.signal.convolve (direct or fftconvolve on a larger box). A direct sum of k taps errs by at most about
k * eps relative to sum|psf| * max|x|; an FFT of length L by about log2(L) * eps on every output (global
error). The division and the product add 2 eps. An iteration multiplies u by the correction, so relative errors
of u add up over the iterations (the correction's own error is a smoothed ratio of near-1 values): after N
iterations |volconv - skimage| <= N * 4 * (log2(L) + 2) * eps * max|skimage| for both implementations together,
with L the larger transform length or PSF side (4: two convolutions each in two implementations). The images
here have a positive background, as real microscopy has: where the blurred estimate nears 0 the ratio
image / blurred is ill-conditioned (0 / 0 + 1e-12 in an empty background is any rounding's ratio), in
scikit-image as here. The largest observed difference is 5x below the bound, most are 10-100x below.

scikit-image's richardson_lucy has no boundary mode: zeros outside the image (scipy.signal.convolve 'same') is
the only one, here as there. Where scikit-image's own arithmetic differs: it always computes in the image's float type; on float32 its
error against its own float64 result is of the same size as volconv's (test_float32_as_accurate_as_skimage).
filter_epsilon tests run in float64 where a mid-range threshold is used: a voxel whose blurred value is within
rounding of the threshold goes either way in either implementation (an O(1) difference there, by design).
"""
import math
import warnings

import nibabel as nib
import numpy as np
import pytest
import scipy.signal
from skimage.restoration import richardson_lucy as sk_richardson_lucy

import volconv as vc
from volconv import _memory
from volconv.cli import main
from volconv.engine import deconvolution as engine

from conftest import config_rng

rl = vc.restoration.richardson_lucy


def tolerance(ref, num_iter, psf_shape, shape, dtype):
    length = max(max(engine.fft_box(shape, psf_shape)), max(psf_shape))
    return num_iter * 4 * (math.log2(length) + 2) * np.finfo(dtype).eps * float(np.abs(ref).max())


def check(image, psf, num_iter, **kw):
    """volconv's result equals scikit-image's within `tolerance`; the same dtype; returns volconv's."""
    ref = sk_richardson_lucy(image, psf, num_iter=num_iter, clip=kw.get("clip", True),
                             filter_epsilon=kw.get("filter_epsilon"))
    out = rl(image, psf, num_iter, **kw)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    tol = tolerance(ref, num_iter, psf.shape, image.shape, ref.dtype)
    assert np.abs(out - ref).max() <= tol, (np.abs(out - ref).max(), tol)
    return out


def random_case(rng, shape, psf_shape, dtype):
    image = (0.2 + rng.random(shape)).astype(dtype)
    psf = rng.random(psf_shape) + 0.1
    return image, (psf / psf.sum()).astype(dtype)


def beads(shape, psf, rng, background=0.02):
    """A few bright points blurred by the PSF (scipy.signal.convolve 'same'), a background and a little noise."""
    truth = np.zeros(shape)
    for _ in range(6):
        truth[tuple(rng.integers(2, n - 2) for n in shape)] = rng.uniform(0.5, 1.0)
    blurred = scipy.signal.convolve(truth, psf, mode="same")
    return truth, blurred + background + 0.002 * rng.random(shape)


def gaussian_psf(shape, sigmas):
    grids = np.meshgrid(*[np.arange(k) - (k - 1) / 2 for k in shape], indexing="ij")
    psf = np.exp(-sum(g**2 / (2 * s**2) for g, s in zip(grids, sigmas)))
    return psf / psf.sum()


# ------------------------------------------------------------------------------------------- against skimage


PSF_SHAPES = [(1, 1, 1), (3, 3, 3), (4, 4, 4), (2, 5, 6), (5, 4, 7), (9, 9, 9), (8, 11, 6), (13, 12, 13)]


@pytest.mark.parametrize("algorithm", ["direct", "fft", "auto"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("psf_shape", PSF_SHAPES)
def test_random_volumes_match_skimage(psf_shape, dtype, algorithm):
    rng = config_rng(1, PSF_SHAPES.index(psf_shape), np.dtype(dtype).itemsize)
    shape = tuple(int(v) for v in rng.integers(13, 19, 3))
    image, psf = random_case(rng, shape, psf_shape, dtype)
    check(image, psf, 6, clip=False, algorithm=algorithm)


@pytest.mark.parametrize("case", range(6))
def test_seeded_random_configurations(case):
    """Shapes, PSF sides (odd and even, up to the image's own size), dtype, clip and iterations drawn at random."""
    rng = config_rng(2, case)
    shape = tuple(int(v) for v in rng.integers(6, 17, 3))
    psf_shape = tuple(int(rng.integers(1, n + 1)) for n in shape)
    dtype = [np.float32, np.float64][case % 2]
    image, psf = random_case(rng, shape, psf_shape, dtype)
    image *= rng.uniform(0.5, 2.0)
    for algorithm in ("direct", "fft"):
        check(image, psf, int(rng.integers(1, 8)), clip=bool(rng.integers(2)), algorithm=algorithm)


@pytest.mark.parametrize("psf_shape", [(5, 5, 5), (6, 7, 5)])
@pytest.mark.parametrize("algorithm", ["direct", "fft"])
def test_bead_image_is_restored_as_skimage_does(psf_shape, algorithm):
    rng = config_rng(3, psf_shape[0])
    psf = gaussian_psf(psf_shape, (1.2, 1.0, 1.4))
    truth, image = beads((24, 22, 20), psf, rng)
    out = check(image.astype(np.float32), psf.astype(np.float32), 25, clip=False, algorithm=algorithm)
    peaks = tuple(np.argwhere(truth).T)
    gain = out[peaks] / image[peaks]   # deconvolution concentrates the blurred beads again
    assert gain.min() > 1.5 and gain.mean() > 2


def test_float32_as_accurate_as_skimage():
    """Against scikit-image's float64 result, volconv's float32 result errs no more than scikit-image's own
    float32 result (within a factor 4, either algorithm)."""
    rng = config_rng(4)
    image, psf = random_case(rng, (20, 18, 16), (7, 6, 5), np.float64)
    exact = sk_richardson_lucy(image, psf, num_iter=10, clip=False)
    theirs = np.abs(sk_richardson_lucy(image.astype(np.float32), psf.astype(np.float32), 10, False) - exact).max()
    for algorithm in ("direct", "fft"):
        ours = np.abs(rl(image.astype(np.float32), psf, 10, clip=False, algorithm=algorithm) - exact).max()
        assert ours <= 4 * theirs + 1e-7 * np.abs(exact).max()


@pytest.mark.parametrize("clip", [True, False])
def test_clip(clip):
    rng = config_rng(5)
    image, psf = random_case(rng, (14, 15, 16), (3, 5, 4), np.float32)
    image *= 3   # a result beyond [-1, 1]
    out = check(image, psf, 4, clip=clip)
    assert (out.max() == 1) == clip and (out.max() > 1) != clip


@pytest.mark.parametrize("filter_epsilon", [None, 0, 0.0, 1e-3, 0.45, 0.6])
@pytest.mark.parametrize("algorithm", ["direct", "fft"])
def test_filter_epsilon(filter_epsilon, algorithm):
    rng = config_rng(6)
    image, psf = random_case(rng, (15, 14, 13), (5, 3, 4), np.float64)
    image[:, :7] *= 0.1   # part of the blurred estimate falls below the larger thresholds
    out = check(image, psf, 5, clip=False, filter_epsilon=filter_epsilon, algorithm=algorithm)
    if filter_epsilon in (0.45, 0.6):
        assert (out == 0).any()


def test_filter_epsilon_in_float32():
    rng = config_rng(7)
    image, psf = random_case(rng, (15, 14, 13), (5, 3, 4), np.float32)
    check(image, psf, 5, filter_epsilon=1e-4)


def test_dtypes_as_skimage_keeps_them():
    rng = config_rng(8)
    image, psf = random_case(rng, (10, 11, 12), (3, 3, 3), np.float64)
    assert rl(image.astype(np.float16), psf, 2).dtype == np.float32
    assert rl(image.astype(np.float32), psf, 2).dtype == np.float32   # the PSF cast to the image's type
    assert rl(image, psf.astype(np.float32), 2).dtype == np.float64
    counts = (image * 100).astype(np.uint16)
    check(counts, psf, 3, clip=False)   # integers: float64, as scikit-image
    check(counts > 60, psf, 3)


def test_non_contiguous_and_fortran_inputs():
    rng = config_rng(9)
    image, psf = random_case(rng, (30, 17, 28), (6, 5, 7), np.float32)
    strided, psf_view = image[::2, :, ::-1], np.asfortranarray(psf)[:, ::-1]
    for algorithm in ("direct", "fft"):
        out = check(strided, psf_view, 4, algorithm=algorithm)
        assert np.array_equal(out, rl(np.ascontiguousarray(strided), np.ascontiguousarray(psf_view), 4,
                                      algorithm=algorithm))
        check(np.asfortranarray(image), psf, 3, algorithm=algorithm)


@pytest.mark.parametrize("psf_shape", [(3, 3), (4, 7), (11, 10)])
@pytest.mark.parametrize("algorithm", ["direct", "fft"])
def test_2d_images(psf_shape, algorithm):
    rng = config_rng(10, psf_shape[1])
    image, psf = random_case(rng, (40, 37), psf_shape, np.float64)
    check(image, psf, 8, clip=False, algorithm=algorithm)


def test_auto_chooses_by_psf_size():
    """Direct for a small PSF, FFT for a large one, on either side of the cost model's crossover; 'auto' gives
    exactly the forced algorithm's result."""
    shape = (40, 40, 40)
    assert engine.choose_algorithm(shape, (3, 3, 3), 4, 2) == "direct"
    assert engine.choose_algorithm(shape, (17, 17, 17), 4, 2) == "fft"
    assert engine.choose_algorithm((128,) * 3, (5,) * 3, 4, 2) == "direct"   # the benchmark's cases
    assert engine.choose_algorithm((128,) * 3, (11,) * 3, 4, 2) == "fft"
    assert engine.fft_box((128,) * 3, (31,) * 3) == (144,) * 3   # >= 128 + 15, a multiple of 4
    assert engine.fft_box((40, 1, 9), (9, 1, 2)) == (48, 1, 12)
    costs = [engine.iteration_costs(shape, (k, k, k), 2) for k in (3, 5, 9, 13, 17)]
    ratios = [c["direct"] / c["fft"] for c in costs]
    assert ratios == sorted(ratios)   # the direct path's share grows with the PSF
    rng = config_rng(11)
    for k, name in ((3, "direct"), (17, "fft")):
        image, psf = random_case(rng, shape, (k, k, k), np.float32)
        assert np.array_equal(rl(image, psf, 2, workers=2), rl(image, psf, 2, workers=2, algorithm=name))


def test_workers_do_not_change_the_result():
    rng = config_rng(12)
    image, psf = random_case(rng, (20, 20, 20), (7, 7, 7), np.float64)
    for algorithm in ("direct", "fft"):
        one = rl(image, psf, 3, workers=1, algorithm=algorithm)
        assert np.allclose(rl(image, psf, 3, workers=2, algorithm=algorithm), one, rtol=1e-13, atol=0)


def test_torch_tensors_in_and_out():
    torch = pytest.importorskip("torch")
    rng = config_rng(13)
    image, psf = random_case(rng, (12, 12, 12), (3, 3, 3), np.float32)
    out = rl(torch.from_numpy(image), torch.from_numpy(psf), 3)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert np.array_equal(out.numpy(), rl(image, psf, 3))


def test_input_is_not_modified():
    rng = config_rng(14)
    image, psf = random_case(rng, (12, 12, 12), (4, 4, 4), np.float32)
    before, psf_before = image.copy(), psf.copy()
    for algorithm in ("direct", "fft"):
        rl(image, psf, 3, algorithm=algorithm)
    assert np.array_equal(image, before) and np.array_equal(psf, psf_before)


# ------------------------------------------------------------------------------------------- errors


def _bad(value, where):
    a = np.full((8, 8, 8) if where == "image" else (3, 3, 3), 0.5)
    a.flat[5] = value
    return a


@pytest.mark.parametrize("args, kwargs, error, words", [
    ((np.ones((8, 8, 8)), np.ones((9, 3, 3))), {}, ValueError, ["(9, 3, 3)", "(8, 8, 8)", "larger"]),
    ((np.ones((8, 8)), np.ones((3, 9))), {}, ValueError, ["(3, 9)", "(8, 8)"]),
    ((np.ones((8, 8, 8)), np.ones((3, 3))), {}, ValueError, ["psf", "(3, 3)", "(8, 8, 8)"]),
    ((np.ones((4, 8, 8, 8)), np.ones((3, 3, 3, 3))), {}, ValueError, ["image", "4-D"]),
    ((np.ones(8), np.ones(3)), {}, ValueError, ["image", "1-D"]),
    ((np.ones((0, 8, 8)), np.ones((1, 1, 1))), {}, ValueError, ["empty"]),
    ((_bad(np.nan, "image"), np.ones((3, 3, 3))), {}, ValueError, ["image", "1 non-finite"]),
    ((_bad(np.inf, "image"), np.ones((3, 3, 3))), {}, ValueError, ["image", "non-finite"]),
    ((np.ones((8, 8, 8)), _bad(np.nan, "psf")), {}, ValueError, ["psf", "non-finite"]),
    ((np.ones((8, 8, 8), np.float32), np.full((3, 3, 3), 1e39)), {}, ValueError, ["psf", "non-finite"]),
    ((np.ones((8, 8, 8)), _bad(-0.1, "psf")), {}, ValueError, ["psf", "negative", "-0.1"]),
    ((np.ones((8, 8, 8)), np.zeros((3, 3, 3))), {}, ValueError, ["psf", "sums to 0"]),
    ((np.ones((8, 8, 8)), np.ones((3, 3, 3)), 0), {}, ValueError, ["num_iter", "0"]),
    ((np.ones((8, 8, 8)), np.ones((3, 3, 3)), 2.5), {}, ValueError, ["num_iter"]),
    ((np.ones((8, 8, 8)), np.ones((3, 3, 3))), {"clip": "yes"}, TypeError, ["clip"]),
    ((np.ones((8, 8, 8)), np.ones((3, 3, 3))), {"filter_epsilon": -1}, ValueError, ["filter_epsilon"]),
    ((np.ones((8, 8, 8)), np.ones((3, 3, 3))), {"filter_epsilon": np.nan}, ValueError, ["filter_epsilon"]),
    ((np.ones((8, 8, 8)), np.ones((3, 3, 3))), {"algorithm": "torch"}, ValueError, ["algorithm", "'torch'"]),
    ((np.ones((8, 8, 8)), np.ones((3, 3, 3))), {"workers": 0}, ValueError, ["workers"]),
    ((np.ones((8, 8, 8), np.complex64), np.ones((3, 3, 3))), {}, TypeError, ["image", "complex"]),
    ((np.ones((8, 8, 8)), np.ones((3, 3, 3), np.complex128)), {}, TypeError, ["psf", "complex"]),
    ((np.ones((8, 8, 8)), "psf.npy"), {}, TypeError, ["psf"]),
    ((None, np.ones((3, 3, 3))), {}, TypeError, ["image"]),
])
def test_errors_name_the_argument(args, kwargs, error, words):
    with pytest.raises(error) as info:
        rl(*args, **kwargs)
    for word in words:
        assert word in str(info.value), str(info.value)


@pytest.mark.parametrize("algorithm", ["direct", "fft"])
def test_memory_guard_names_the_sizes(monkeypatch, algorithm):
    monkeypatch.setattr(_memory, "CHECK_ABOVE", 0)
    monkeypatch.setattr(_memory, "available", lambda: 2**20)
    image, psf = np.ones((40, 40, 40), np.float32), np.ones((9, 9, 9), np.float32)
    with pytest.raises(MemoryError) as info:
        rl(image, psf, 2, algorithm=algorithm)
    text = str(info.value)
    for word in ("40x40x40 float32 image", "9x9x9 PSF", algorithm, "no slabs", "1 MiB"):
        assert word in text, text
    assert ("FFT box 48x48x48" in text) == (algorithm == "fft")


def test_working_bytes_cover_the_fft_buffers():
    """The guard's estimate is at least what the FFT path allocates at its peak (measured by tracemalloc)."""
    import tracemalloc

    image, psf = np.ones((30, 31, 32), np.float32), np.full((11, 11, 11), 1 / 11**3, np.float32)
    tracemalloc.start()
    tracemalloc.reset_peak()
    rl(image, psf, 2, algorithm="fft")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak <= engine.working_bytes(image.shape, psf.shape, 4, "fft", 2)


# ------------------------------------------------------------------------------------------- the command


AFFINE = np.array([[-0.2, 0.0, 0.0, 3.0], [0.0, 0.2, 0.0, -4.0], [0.0, 0.0, 0.5, -2.0], [0.0, 0.0, 0.0, 1.0]])


def write_nifti(path, data, affine=AFFINE):
    img = nib.Nifti1Image(np.asarray(data), affine)
    img.header.set_sform(affine, code=2)
    img.header.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_failure(code, err, culprit, also):
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.startswith("volconv: error:")]
    assert len(lines) == 1 and lines[0].startswith(f"volconv: error: {culprit}: "), err
    assert also in lines[0], lines[0]


@pytest.fixture
def files(tmp_path):
    rng = config_rng(20)
    psf = gaussian_psf((5, 5, 3), (1.0, 1.2, 0.8))
    _, image = beads((20, 18, 16), psf, rng)
    src = write_nifti(tmp_path / "stack.nii.gz", image.astype(np.float32))
    np.save(tmp_path / "psf.npy", psf)
    write_nifti(tmp_path / "psf.nii", psf.astype(np.float32), np.diag([0.2, 0.2, 0.5, 1.0]))
    return src, image.astype(np.float32), psf


@pytest.mark.parametrize("psf_name", ["psf.npy", "psf.nii"])
def test_command_matches_the_function_and_keeps_geometry(tmp_path, capsys, files, psf_name):
    src, image, psf = files
    out = tmp_path / "rl.nii.gz"
    code, _, err = run(capsys, "deconvolve", src, out, "--psf", tmp_path / psf_name, "--iterations", 7)
    assert code == 0, err
    assert "Richardson-Lucy, 7 iterations" in err and "5x5x3" in err
    saved = nib.load(str(out))
    assert np.allclose(saved.affine, AFFINE) and saved.header.get_sform(coded=True)[1] == 2
    assert saved.header.get_qform(coded=True)[1] == 1 and saved.get_data_dtype() == np.float32
    expected = rl(image, psf.astype(np.float32), 7)
    assert np.array_equal(np.asanyarray(saved.dataobj), expected)
    ref = sk_richardson_lucy(image, psf.astype(np.float32), 7)
    assert np.abs(np.asanyarray(saved.dataobj) - ref).max() <= tolerance(ref, 7, psf.shape, image.shape, np.float32)


def test_command_options(tmp_path, capsys, files):
    src, image, psf = files
    out = tmp_path / "rl.nii"
    code, _, err = run(capsys, "deconvolve", src, out, "--psf", tmp_path / "psf.npy", "--iterations", 4,
                       "--no-clip", "--filter-epsilon", "0.03", "--algorithm", "fft", "--workers", 1,
                       "--odt", "float64", "-q")
    assert code == 0 and err == ""
    saved = nib.load(str(out))
    assert saved.get_data_dtype() == np.float64
    expected = rl(image, psf.astype(np.float32), 4, clip=False, filter_epsilon=0.03, algorithm="fft")
    assert np.array_equal(np.asanyarray(saved.dataobj), expected.astype(np.float64))


def test_command_warns_when_clipping_unscaled_intensities(tmp_path, capsys, files):
    src, image, psf = files
    bright = write_nifti(tmp_path / "bright.nii.gz", image * 1000)
    code, _, err = run(capsys, "deconvolve", bright, tmp_path / "o", "--psf", tmp_path / "psf.npy",
                       "--iterations", 2)
    assert code == 0 and "--no-clip" in err and (tmp_path / "o.nii.gz").exists()


def test_command_warns_when_a_nifti_psf_has_other_voxel_sizes(tmp_path, capsys, files):
    src, _, psf = files
    write_nifti(tmp_path / "coarse.nii.gz", psf.astype(np.float32), np.diag([0.4, 0.4, 1.0, 1.0]))
    code, _, err = run(capsys, "deconvolve", src, tmp_path / "o.nii.gz", "--psf", tmp_path / "coarse.nii.gz",
                       "--iterations", 2)
    assert code == 0 and "voxel sizes 0.4x0.4x1 mm" in err and "0.2x0.2x0.5 mm" in err
    code, _, err = run(capsys, "deconvolve", src, tmp_path / "o.nii.gz", "--psf", tmp_path / "psf.nii",
                       "--iterations", 2, "--force")
    assert code == 0 and "warning" not in err


def test_command_force(tmp_path, capsys, files):
    src, _, _ = files
    out = tmp_path / "rl.nii.gz"
    argv = ["deconvolve", src, out, "--psf", tmp_path / "psf.npy", "--iterations", 2]
    assert run(capsys, *argv)[0] == 0
    before = out.read_bytes()
    code, _, err = run(capsys, *argv[:-1], 3)
    assert_failure(code, err, out, "--force")
    assert out.read_bytes() == before
    assert run(capsys, *argv[:-1], 3, "--force")[0] == 0
    assert out.read_bytes() != before


def test_command_errors_name_the_file(tmp_path, capsys, files):
    src, image, _ = files
    out = tmp_path / "rl.nii.gz"
    corrupt = tmp_path / "corrupt.npy"
    corrupt.write_bytes(b"\x93NUMPY garbage")
    code, _, err = run(capsys, "deconvolve", src, out, "--psf", corrupt, "--iterations", 2)
    assert_failure(code, err, corrupt, "PSF")
    bad_nii = tmp_path / "bad.nii.gz"
    bad_nii.write_bytes(b"\x1f\x8b not really gzip")
    code, _, err = run(capsys, "deconvolve", src, out, "--psf", bad_nii, "--iterations", 2)
    assert_failure(code, err, bad_nii, "")
    code, _, err = run(capsys, "deconvolve", src, out, "--psf", tmp_path / "missing.npy", "--iterations", 2)
    assert_failure(code, err, tmp_path / "missing.npy", "does not exist")
    big = tmp_path / "big.npy"
    np.save(big, np.ones((21, 3, 3)))
    code, _, err = run(capsys, "deconvolve", src, out, "--psf", big, "--iterations", 2)
    assert_failure(code, err, big, "(21, 3, 3)")
    negative = tmp_path / "negative.npy"
    np.save(negative, -np.ones((3, 3, 3)))
    code, _, err = run(capsys, "deconvolve", src, out, "--psf", negative, "--iterations", 2)
    assert_failure(code, err, negative, "negative")
    image = image.copy()
    image[3, 4, 5] = np.nan
    nan_src = write_nifti(tmp_path / "nan.nii.gz", image)
    code, _, err = run(capsys, "deconvolve", nan_src, out, "--psf", tmp_path / "psf.npy", "--iterations", 2)
    assert_failure(code, err, nan_src, "non-finite")
    not_nifti = tmp_path / "text.nii"
    not_nifti.write_text("hello")
    code, _, err = run(capsys, "deconvolve", not_nifti, out, "--psf", tmp_path / "psf.npy", "--iterations", 2)
    assert_failure(code, err, not_nifti, "")
    code, _, err = run(capsys, "deconvolve", src, src, "--psf", tmp_path / "psf.npy", "--iterations", 2, "--force")
    assert_failure(code, err, src, "same file")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["stack.nii.gz", "psf.npy", "psf.nii", "corrupt.npy", "bad.nii.gz", "big.npy", "negative.npy",
         "nan.nii.gz", "text.nii"])


@pytest.mark.parametrize("argv", [["--iterations", "0"], ["--iterations", "x"], [], ["--filter-epsilon", "-1"],
                                  ["--algorithm", "torch"]])
def test_command_bad_arguments_exit_2(tmp_path, capsys, files, argv):
    src, _, _ = files
    full = ["deconvolve", str(src), str(tmp_path / "o.nii.gz"), "--psf", str(tmp_path / "psf.npy")] + argv
    if "--iterations" not in argv:
        full += ["--iterations", "2"] if argv else []
    with pytest.raises(SystemExit) as info:
        main(full)
    assert info.value.code == 2


def test_command_4d_volume_by_volume(tmp_path, capsys, files):
    src, image, psf = files
    stack = write_nifti(tmp_path / "series.nii.gz", np.stack([image, 0.5 * image], axis=-1))
    out = tmp_path / "series_rl.nii.gz"
    code, _, err = run(capsys, "deconvolve", stack, out, "--psf", tmp_path / "psf.npy", "--iterations", 3)
    assert code == 0, err
    data = np.asanyarray(nib.load(str(out)).dataobj)
    assert data.shape == image.shape + (2,)
    for t, scale in enumerate((1.0, 0.5)):
        assert np.array_equal(data[..., t], rl(np.float32(scale) * image, psf.astype(np.float32), 3))


def test_import_is_lazy_and_namespaced():
    import volconv.restoration

    assert volconv.restoration.richardson_lucy is rl
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "restoration" in vc.__all__
