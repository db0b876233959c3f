"""vc.kernels: physical-unit kernels against scipy.ndimage, and kernel objects in correlate/convolve/conv3d
(separable kernels run as 1-D passes must equal the dense 3-D kernel)."""
import numpy as np
import pytest
import scipy.ndimage as ndi

import volconv as vc
from volconv import kernels as K

MODES = ["reflect", "constant", "nearest", "mirror", "wrap"]
ZOOMS = (1.0, 2.0, 0.8)   # anisotropic voxels in mm


def tol(dtype, kernel_sum_abs=1.0):
    # a few dozen terms per pass and three passes: within 64 eps of sum|k| * max|x| (max|x| <= 1 here)
    return 64 * np.finfo(dtype).eps * kernel_sum_abs


@pytest.fixture
def volume():
    return np.random.default_rng(0).random((17, 21, 19))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode", MODES)
def test_gaussian_matches_scipy_gaussian_filter(volume, mode, dtype):
    x = volume.astype(dtype)
    sigma_vox = np.array([2.0, 1.5, 2.5]) / np.array(ZOOMS)
    ref = ndi.gaussian_filter(x, sigma_vox, mode=mode, cval=0.7, truncate=3.5)
    out = vc.correlate(x, K.gaussian((2.0, 1.5, 2.5), ZOOMS, truncate=3.5), mode=mode, cval=0.7)
    assert out.dtype == dtype
    np.testing.assert_allclose(out, ref, rtol=0, atol=tol(dtype))


def test_gaussian_fwhm_voxels_and_zero_sigma(volume):
    k = K.gaussian(fwhm=4.0, zooms=(2.0, 2.0, 2.0))
    np.testing.assert_allclose(k.to_dense(), K.gaussian(2.0 / K.FWHM_PER_SIGMA).to_dense())
    flat = K.gaussian((0.0, 1.0, 1.0))   # sigma 0: no smoothing along D
    assert flat.shape[0] == 1
    np.testing.assert_allclose(vc.correlate(volume, flat), ndi.gaussian_filter(volume, (0, 1, 1)), atol=1e-13)
    assert K.gaussian(1.0).rank == 1 and abs(K.gaussian(1.0).to_dense().sum() - 1) < 1e-12


@pytest.mark.parametrize("mode", ["reflect", "nearest", "mirror", "wrap"])
def test_log_matches_scipy_gaussian_laplace(volume, mode):
    sigma_vox = 1.5 / np.array(ZOOMS)
    ref = ndi.gaussian_laplace(volume, sigma_vox, mode=mode)
    k = K.log(1.5, ZOOMS)
    assert k.rank == 3
    np.testing.assert_allclose(vc.correlate(volume, k, mode=mode), ref, rtol=0, atol=1e-12)


def test_log_constant_mode_is_the_dense_kernel(volume):
    """cval != 0: the 3-D kernel's constant extension (scipy's gaussian_laplace differs, see the docstring)."""
    k = K.log(1.0)
    ref = ndi.correlate(volume, k.to_dense(), mode="constant", cval=0.7)
    np.testing.assert_allclose(vc.correlate(volume, k, mode="constant", cval=0.7), ref, rtol=0, atol=1e-12)


def test_box_and_ball_geometry():
    b = K.box((3.0, 4.0, 2.5), ZOOMS)
    assert b.shape == (3, 3, 3) and abs(b.to_dense().sum() - 1) < 1e-12   # mm sizes: odd, centred (fslmaths)
    assert K.box(3, normalize=False).to_dense().sum() == 27
    ball = K.ball(2.0)
    assert ball.shape == (5, 5, 5)
    assert ball.to_dense().astype(bool).sum() == 33     # lattice points with |p| <= 2
    aniso = K.ball(2.0, zooms=(1.0, 1.0, 2.0)).to_dense()
    assert aniso.shape == (5, 5, 3) and aniso[2, 2, 0] > 0 and aniso[0, 2, 1] > 0 and aniso[0, 0, 1] == 0
    assert abs(aniso.sum() - 1) < 1e-12


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op", ["correlate", "convolve"])
def test_separable_rank2_equals_dense(volume, mode, op):
    rng = np.random.default_rng(1)
    k = K.SeparableKernel([rng.standard_normal((2, 3)), rng.standard_normal((2, 4)), rng.standard_normal((2, 5))],
                          weights=[1.0, -0.5])
    origin = (1, 0, -1)
    fn, ref_fn = getattr(vc, op), getattr(ndi, op)
    out = fn(volume, k, mode=mode, cval=0.3, origin=origin)
    ref = ref_fn(volume, k.to_dense(), mode=mode, cval=0.3, origin=origin)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12 * np.abs(k.to_dense()).sum())


@pytest.mark.parametrize("kernel", [K.gaussian(1.0), K.ball(1.5), K.log(1.0)], ids=["gaussian", "ball", "log"])
def test_conv3d_applies_a_kernel_object_to_every_channel(kernel):
    rng = np.random.default_rng(2)
    x = rng.random((2, 3, 12, 13, 14)).astype(np.float32)
    b = rng.random(3).astype(np.float32)
    dense = np.ascontiguousarray(np.broadcast_to(kernel.to_dense().astype(np.float32), (3, 1) + kernel.shape))
    for kw in (dict(padding="same", padding_mode="reflect"),
               dict(stride=(1, 2, 1), dilation=(2, 1, 1), padding=(8, 4, 4))):
        out = vc.conv3d(x, kernel, b, **kw)
        ref = vc.conv3d(x, dense, b, groups=3, **kw)
        np.testing.assert_allclose(out, ref, rtol=0, atol=tol(np.float32, np.abs(kernel.to_dense()).sum()))


def test_kernel_objects_with_torch_and_autograd():
    torch = pytest.importorskip("torch")
    x = torch.rand(1, 2, 9, 10, 11, dtype=torch.float64, requires_grad=True)
    k = K.gaussian(0.8)
    assert torch.autograd.gradcheck(lambda t: vc.conv3d(t, k, padding=2), (x,))
    v = torch.rand(9, 10, 11, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: vc.correlate(t, k, mode="mirror"), (v,))
    out = vc.correlate(v.detach().float(), k)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32


def test_from_file_npy_and_nifti(tmp_path):
    import nibabel as nib
    values = np.random.default_rng(3).random((3, 4, 5))
    np.save(tmp_path / "k.npy", values)
    nib.save(nib.Nifti1Image(values.astype(np.float32), np.eye(4)), tmp_path / "k.nii.gz")
    np.testing.assert_array_equal(K.from_file(tmp_path / "k.npy").to_dense(), values)
    np.testing.assert_allclose(K.from_file(str(tmp_path / "k.nii.gz")).to_dense(), values, rtol=1e-6)


def test_kernel_errors(tmp_path):
    with pytest.raises(ValueError, match="sigma and fwhm"):
        K.gaussian(1.0, fwhm=2.0)
    with pytest.raises(ValueError, match="sigma"):
        K.gaussian(-1.0)
    with pytest.raises(ValueError, match="zooms"):
        K.gaussian(1.0, zooms=(1.0, 0.0, 1.0))
    with pytest.raises(TypeError, match="radius"):
        K.ball("big")
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        K.from_file(tmp_path / "missing.npy")
    (tmp_path / "bad.nii").write_bytes(b"not a nifti at all")
    with pytest.raises(ValueError, match="bad.nii"):
        K.from_file(tmp_path / "bad.nii")
    np.save(tmp_path / "flat.npy", np.ones((3, 3)))
    with pytest.raises(ValueError, match="3-D"):
        K.from_file(tmp_path / "flat.npy")
    with pytest.raises(ValueError, match="factors"):
        K.SeparableKernel([np.ones(3), np.ones(3)])


@pytest.mark.parametrize("kernel", ["dense", "gaussian", "log"])
@pytest.mark.parametrize("op", ["correlate", "convolve"])
def test_fortran_ordered_volumes_as_nibabel_gives_them(volume, kernel, op):
    """NIfTI data come in Fortran order: filtered without a copy (the transposed problem), same numbers,
    Fortran-ordered result."""
    x = np.asfortranarray(volume)
    k = {"dense": np.random.default_rng(4).random((3, 4, 5)), "gaussian": K.gaussian((1.0, 2.0, 0.5)),
         "log": K.log(1.0)}[kernel]
    dense = k.to_dense() if isinstance(k, K.Kernel) else k
    for mode in ("reflect", "wrap", "constant"):
        out = getattr(vc, op)(x, k, mode=mode, cval=0.5, origin=(1, 0, -1))
        ref = getattr(ndi, op)(x, dense, mode=mode, cval=0.5, origin=(1, 0, -1))
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12 * np.abs(dense).sum())
        assert out.flags.f_contiguous
