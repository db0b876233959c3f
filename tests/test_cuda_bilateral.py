"""vc.bilateral_filter on the CUDA plugin (bilateral.cu): against the CPU engine (the same call on CPU arrays)
and test_bilateral's brute-force reference (every tap's weight in float64): every mode with a cval, anisotropic
zooms, a guide, validity masks with the edge valid or not, halos, float32 and float64, odd sizes, NaN and Inf,
windows that opt into more shared memory or read through the cache; the result carries no gradient.

Every test checks the plugin's calls (cuda_plugin.calls), so a path through the CPU engine fails. Run on a GPU,
or on the CPU emulator with VOLCONV_CUDA_EMULATOR=1 (see conftest.py's `cuda_plugin` fixture).

Tolerances (the largest difference over the reference's largest magnitude): float32 2e-5, float64 1e-12, as
test_bilateral's (the plugin sums the taps in the CPU engine's order with the same centre differences; its exp
is CUDA's, within 2 ulp, where the CPU's is a polynomial of about 1 ulp)."""
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

import volconv as vc
from volconv.cli import main
from volconv.io import filtering
from volconv.ops import bilateral as bilateral_op

from conftest import EMULATOR, config_rng
from test_bilateral import TOL, assert_close, reference
from test_cuda import close

pytestmark = pytest.mark.cuda

BILATERAL = "vc_bilateral"
MODES = ["reflect", "constant", "nearest", "mirror", "wrap"]
DTYPES = [torch.float32, torch.float64]
NUMPY = {torch.float32: np.float32, torch.float64: np.float64}


def case(seed, shape, scale=10.0):
    r = config_rng(seed)
    return r.standard_normal(shape) * scale, r


def on_plugin(cuda_plugin, device, dtype, fn, *arrays):
    """fn(*tensors) with arrays as tensors of dtype on the device, then on the CPU engine: (plugin's, CPU's) as
    numpy arrays; the plugin must have run once and nothing else."""
    ts = [None if a is None else torch.from_numpy(np.asarray(a)).to(device) for a in arrays]
    ts = [t if t is None or t.dtype == torch.bool else t.to(dtype) for t in ts]
    cuda_plugin.calls.clear()
    got = fn(*ts)
    assert cuda_plugin.calls == [(BILATERAL, 0 if dtype == torch.float32 else 1)]
    assert got.dtype == dtype and got.device == ts[0].device and not got.requires_grad
    with cuda_plugin.cpu_engine():
        cpu = fn(*[None if t is None else t.cpu() for t in ts])
    return got.cpu().numpy(), cpu.numpy()


def agree(got, cpu, dtype):
    assert_close(got, cpu.astype(np.float64), NUMPY[dtype])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_mode_against_the_reference_and_the_cpu_engine(mode, dtype, cuda_plugin, device):
    x, _ = case(1801, (7, 9, 37))   # 37 columns: a warp and a few threads more along W
    kw = dict(zooms=(1.0, 1.2, 0.9), truncate=2.0, mode=mode, cval=2.5)
    got, cpu = on_plugin(cuda_plugin, device, dtype, lambda t: vc.bilateral_filter(t, (1.5, 1.0, 1.3), 7.0, **kw),
                         x.astype(NUMPY[dtype]))
    agree(got, cpu, dtype)
    assert_close(got, reference(x.astype(NUMPY[dtype]), (1.5, 1.0, 1.3), 7.0, **kw), NUMPY[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_joint_bilateral_reads_the_guide(dtype, cuda_plugin, device):
    x, r = case(1802, (6, 11, 35))
    guide = r.standard_normal(x.shape) * 3
    fn = lambda t, g: vc.bilateral_filter(t, 1.2, 0.9, (1.3, 1.0, 0.8), guide=g, mode="nearest")   # noqa: E731
    got, cpu = on_plugin(cuda_plugin, device, dtype, fn, x, guide)
    agree(got, cpu, dtype)
    assert_close(got, reference(x.astype(NUMPY[dtype]), 1.2, 0.9, (1.3, 1.0, 0.8), guide=guide.astype(NUMPY[dtype]),
                                mode="nearest"), NUMPY[dtype])
    self_guided, _ = on_plugin(cuda_plugin, device, dtype, lambda t: vc.bilateral_filter(t, 1.2, 0.9, (1.3, 1.0, 0.8),
                                                                                     mode="nearest"), x)
    assert np.abs(self_guided - got).max() > 0.05   # the guide steers the weights


@pytest.mark.parametrize("mode", ["reflect", "constant", "wrap"])
@pytest.mark.parametrize("edge_valid", [True, False])
@pytest.mark.parametrize("joint", [False, True])
def test_validity_masks_with_the_edge_valid_or_not(mode, edge_valid, joint, cuda_plugin, device):
    """filter_nifti's masks: invalid voxels (holding NaN here) weigh nothing, nor, with edge_valid False, do the
    voxels beyond the edges; with it True the mask is extended like the volume (True beyond it under constant)."""
    x, r = case(1803, (5, 9, 33))
    valid = r.random(x.shape) > 0.3
    x[~valid] = np.nan
    guide = r.standard_normal(x.shape) * 5 if joint else None
    params = vc.Bilateral((1.0, 1.4, 1.2), 4.0)
    for dtype in DTYPES:
        fn = lambda t, g, v: bilateral_op.run(params, t, g, v, (1.0, 1.1, 0.9), mode, -2.0, None,   # noqa: E731
                                              edge_valid=edge_valid)
        got, cpu = on_plugin(cuda_plugin, device, dtype, fn, x, guide, valid)
        assert np.isfinite(got).all()
        agree(got, cpu, dtype)


def test_halo_planes_are_context_on_every_axis(cuda_plugin, device):
    """A block with halo planes gives the whole volume's result on its own voxels (filter_nifti's slabs)."""
    x, _ = case(1804, (12, 13, 36))
    params = vc.Bilateral(1.0, 3.0, truncate=2.0)   # radius 2 per axis
    whole, _ = on_plugin(cuda_plugin, device, torch.float64, lambda t: vc.bilateral_filter(t, 1.0, 3.0, truncate=2.0),
                         x)
    # inside the volume a halo of the radius, at its edges none (the mode extends the block, as the whole)
    halo = ((2, 2), (0, 0), (2, 0))
    fn = lambda t: bilateral_op.run(params, t, None, None, None, "reflect", 0.0, None, halo=halo)   # noqa: E731
    got, cpu = on_plugin(cuda_plugin, device, torch.float64, fn, x[3:10, :, 5:])
    np.testing.assert_allclose(got, whole[5:8, :, 7:], rtol=0, atol=1e-12)
    agree(got, cpu, torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf_spread_as_on_the_cpu(dtype, cuda_plugin, device):
    x, r = case(1805, (9, 9, 20), scale=1.0)
    x[4, 4, 10] = np.nan
    fn = lambda t: vc.bilateral_filter(t, 1.0, 1.0, truncate=2.0)   # noqa: E731
    got, cpu = on_plugin(cuda_plugin, device, dtype, fn, x)
    reach = np.zeros(x.shape, bool)
    reach[2:7, 2:7, 8:13] = True
    np.testing.assert_array_equal(np.isnan(got), reach)
    agree(got, cpu, dtype)
    g = r.standard_normal(x.shape)
    g[1, 1, 1] = np.inf   # NaN at its own voxel (inf - inf), for its neighbours a weight clamped to ~1e-38
    fn = lambda t, g: vc.bilateral_filter(t, 1.0, 1.0, guide=g, truncate=2.0)   # noqa: E731
    got, cpu = on_plugin(cuda_plugin, device, dtype, fn, r.standard_normal(x.shape), g)
    others = np.delete(got.ravel(), np.ravel_multi_index((1, 1, 1), x.shape))
    assert np.isnan(got[1, 1, 1]) and np.isfinite(others).all()
    agree(got, cpu, dtype)
    # an invalid voxel (its guide read as 0) among voxels of guide 1e3: every weight of its window below exp's
    # range, clamped to the smallest normal's as on the CPU (the mean of its neighbours, not 0 / 0)
    far, valid = np.full(x.shape, 1e3), np.ones(x.shape, bool)
    far[4, 4, 10], valid[4, 4, 10] = 0.0, False
    fn = lambda t, v: bilateral_op.run(vc.Bilateral(1.0, 1.0), t, None, v, None, "reflect", 0.0, None)  # noqa: E731
    got, cpu = on_plugin(cuda_plugin, device, dtype, fn, far + x, valid)
    assert np.isfinite(got).all() and abs(got[4, 4, 10] - 1e3) < 1.0
    agree(got, cpu, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_infinite_range_is_scipys_gaussian_and_a_constant_comes_back(dtype, cuda_plugin, device):
    x, _ = case(1806, (6, 10, 33))
    zooms = (1.0, 2.0, 0.8)
    fn = lambda t: vc.bilateral_filter(t, 1.5, math.inf, zooms, truncate=2.0, mode="wrap")   # noqa: E731
    got, _ = on_plugin(cuda_plugin, device, dtype, fn, x)
    ref = ndimage.gaussian_filter(x.astype(NUMPY[dtype]).astype(np.float64), [1.5 / z for z in zooms], truncate=2.0,
                                  mode="wrap")
    close(torch.from_numpy(got), torch.from_numpy(ref), 2e-5 if dtype == torch.float32 else 1e-12)
    c = np.full((4, 5, 7), 4.25)
    const, _ = on_plugin(cuda_plugin, device, dtype, lambda t: vc.bilateral_filter(t, 2.0, 1.0), c)
    np.testing.assert_array_equal(const, c)
    same, _ = on_plugin(cuda_plugin, device, dtype, lambda t: vc.bilateral_filter(t, 0.0, 1.0), x)   # one tap
    np.testing.assert_array_equal(same, x.astype(NUMPY[dtype]))


@pytest.mark.parametrize("joint, masked", [(False, False), (True, False), (True, True)])
def test_wide_windows_opt_into_shared_memory_or_read_through_the_cache(joint, masked, cuda_plugin, device):
    """The kernel holds two planes of the block's reach, (8 + 2 rh) x (32 + 2 rw) voxels each: radii (0, 10, 10)
    with a guide and the validity take 50 KiB in float64 (opted in past 48 KiB), 26 KiB in float32; radii
    (0, 18, 18) 54 KiB in float32 (opted in) and 102 KiB in float64, past the 96 KiB cap (the taps read xp)."""
    x, r = case(1807, (2, 5, 34))
    guide = r.standard_normal(x.shape) * 4 if joint else None
    valid = r.random(x.shape) > 0.2 if masked else None
    for sigma in [(0.0, 10 / 3, 10 / 3), (0.0, 6.0, 6.0)]:
        params = vc.Bilateral(sigma, 5.0)
        fn = lambda t, g, v: bilateral_op.run(params, t, g, v, None, "reflect", 0.0, None)   # noqa: E731
        for dtype in DTYPES:
            got, cpu = on_plugin(cuda_plugin, device, dtype, fn, x, guide, valid)
            agree(got, cpu, dtype)


def test_half_precision_odd_sizes_strided_volumes_and_refusals(cuda_plugin, device):
    x, r = case(1808, (5, 3, 7))
    xt = torch.from_numpy(x).to(device, torch.float32).requires_grad_()
    cuda_plugin.calls.clear()
    got = vc.bilateral_filter(xt, 1.0, 5.0)
    assert not got.requires_grad and cuda_plugin.calls == [(BILATERAL, 0)]
    with cuda_plugin.cpu_engine():
        cpu = vc.bilateral_filter(xt.detach(), 1.0, 5.0)
    close(got, cpu, 2e-5)
    half = vc.bilateral_filter(xt.detach().half(), 1.0, 5.0)
    assert half.dtype == torch.float16 and cuda_plugin.calls[-1] == (BILATERAL, 0)
    close(half, cpu, 1e-2)
    # NIfTI's Fortran order: a tensor of reversed strides (the plugin pads it into a contiguous copy)
    fn = lambda t: vc.bilateral_filter(t, 1.0, 5.0, (1.0, 0.8, 1.2))   # noqa: E731
    got, cpu = on_plugin(cuda_plugin, device, torch.float64, fn, x.T)
    assert got.shape == (7, 3, 5)
    agree(got, cpu, torch.float64)
    cuda_plugin.calls.clear()
    empty = vc.bilateral_filter(xt[:0], 1.0, 5.0)
    assert empty.shape == (0, 3, 7) and cuda_plugin.calls == []
    with pytest.raises(TypeError, match="float32 or float64: cast it first"):
        vc.bilateral_filter(xt.detach().long(), 1.0, 5.0)
    with pytest.raises(ValueError, match="guide must have the volume's shape"):
        vc.bilateral_filter(xt, 1.0, 5.0, guide=xt[:, :, 1:])


def scan_files(tmp_path, seed):
    """A noisy two-tissue volume and a guide (its edge elsewhere) as float32 NIfTI files of voxel sizes
    (1, 1.5, 2) mm: their paths and the volume."""
    r = config_rng(seed)
    x = np.where(np.arange(19)[:, None, None] < 9, 100.0, 300.0) + r.normal(size=(19, 14, 12)) * 10
    paths = []
    for name, data in [("scan.nii.gz", x), ("guide.nii", x[::-1])]:
        img = nib.Nifti1Image(data.astype(np.float32), np.diag([1.0, 1.5, 2.0, 1.0]))
        img.header.set_xyzt_units("mm")
        nib.save(img, str(tmp_path / name))
        paths.append(str(tmp_path / name))
    return paths, x


@pytest.mark.parametrize("max_memory", [None, "40KiB"])
@pytest.mark.parametrize("guided, masked", [(False, False), (True, True)])
def test_filter_nifti_on_the_plugin_matches_the_cpu_engine(max_memory, guided, masked, cuda_plugin, device,
                                                           tmp_path):
    """filter_nifti(device=...) with a vc.Bilateral, slab by slab (a small max_memory) or whole: each slab on the
    plugin (Fortran-ordered blocks: filtered with the file's first axis as rows, as on the CPU), with a guide
    file, a mask, normalize (the edge as invalid) and nan="mask", against the CPU engine."""
    (src, guide), x = scan_files(tmp_path, 1810)
    params = vc.Bilateral(2.0, 40.0, guide=guide if guided else None)
    inside = np.ones(x.shape, bool)
    inside[:, :4] = False
    kw = dict(mode="reflect", max_memory=max_memory)
    if masked:
        kw.update(mask=inside, normalize=True, nan="mask", outside="zero")
    cuda_plugin.calls.clear()
    got = vc.io.filter_nifti(src, tmp_path / "gpu.nii", params, device=device, **kw)
    assert len(cuda_plugin.calls) >= (3 if max_memory else 1) and set(cuda_plugin.calls) == {(BILATERAL, 0)}
    with cuda_plugin.cpu_engine():
        cpu = vc.io.filter_nifti(src, tmp_path / "cpu.nii", params, **kw)
    assert_close(np.asarray(got.data), np.asarray(cpu.data, np.float64), np.float32)


def test_the_command_filters_bilaterally_on_the_plugin(cuda_plugin, device, tmp_path, monkeypatch):
    if EMULATOR:   # the command's "cuda" is the emulated plugin's CPU tensors
        monkeypatch.setattr(filtering, "on_device", lambda block, _: torch.from_numpy(block))
    (src, guide), _ = scan_files(tmp_path, 1811)
    args = ["--bilateral", "2mm", "--range", "40", "--guide", guide, "-q"]
    assert main(["filter", src, str(tmp_path / "gpu.nii.gz"), *args, "--device", "cuda"]) == 0
    assert {n for n, _ in cuda_plugin.calls} == {BILATERAL}
    with cuda_plugin.cpu_engine():
        assert main(["filter", src, str(tmp_path / "cpu.nii.gz"), *args]) == 0
    assert_close(nib.load(str(tmp_path / "gpu.nii.gz")).get_fdata(dtype=np.float32),
                 nib.load(str(tmp_path / "cpu.nii.gz")).get_fdata(), np.float32)


def exercise_every_kernel(cuda_plugin, device):
    """Small calls through bilateral.cu's kernel (planes streamed through shared memory self-guided, and joint
    with validity opted in past 48 KiB; the read-through-the-cache form), checked against the CPU engine: an
    AssertionError when it computes nothing or computes wrong. For checks that empty kernels one at a time
    (tests/test_cuda.py) and the TSan replay (cuda_plugin/emulator/replay.py)."""
    x, r = case(1809, (3, 5, 34))
    guide, valid = r.standard_normal(x.shape), r.random(x.shape) > 0.2
    for sigma, g, v in [((1.0, 1.0, 0.7), None, None), ((0.7, 10 / 3, 10 / 3), guide, valid),
                        ((0.0, 6.0, 6.0), guide, valid)]:
        params = vc.Bilateral(sigma, 5.0)
        fn = lambda t, g, v: bilateral_op.run(params, t, g, v, None, "nearest", 0.0, None)   # noqa: E731
        got, cpu = on_plugin(cuda_plugin, device, torch.float64, fn, x, g, v)
        close(torch.from_numpy(got), torch.from_numpy(cpu), 1e-12)


def test_every_kernel_once(cuda_plugin, device):
    exercise_every_kernel(cuda_plugin, device)
