"""vc.adaptive_filter on the CUDA plugin (adaptive.cu), vc.io.adaptive_filter_nifti(device=...) slab by slab and
`volconv filter --sigma-map --device cuda`: against the CPU engine (the same call on CPU arrays) and scipy (a
constant sigma map is scipy.ndimage.gaussian_filter of sigma / zooms): every mode, a cval, anisotropic zooms,
sigma 0 voxels, float32 and float64, volumes of odd sizes; the result carries no gradient, as on the CPU.

Every test checks the plugin's calls (cuda_plugin.calls), so a path through the CPU engine fails. Run on a GPU,
or on the CPU emulator with VOLCONV_CUDA_EMULATOR=1 (see conftest.py's `cuda_plugin` fixture).

Tolerances: float64 within 1e-10 of the reference's scale (max(1, max |ref|)), float32 within 1e-4 (the plugin
makes the weights by running products in the volume's dtype and sums in another order than the CPU engine)."""
import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

import volconv as vc
from volconv.cli import main
from volconv.io import filtering

from conftest import EMULATOR, config_rng
from test_cuda import close, tolerance

pytestmark = pytest.mark.cuda

ADAPTIVE = "vc_adaptive_gaussian"
MODES = ["reflect", "constant", "nearest", "mirror", "wrap"]
DTYPES = [torch.float32, torch.float64]


def case(seed, shape, largest=1.6):
    """A volume and a varying sigma map with some zeros (numpy, float64)."""
    r = config_rng(seed)
    x = r.standard_normal(shape) * 10
    sigma = r.random(shape) * largest
    sigma[r.random(shape) < 0.15] = 0.0
    return x, sigma


def nifti_pair(tmp_path, x, sigma, zooms):
    """x and sigma written as float32 NIfTI files on one grid (voxel sizes zooms, in mm): their paths."""
    paths = []
    for name, data in [("in.nii.gz", x), ("sigma.nii.gz", sigma)]:
        img = nib.Nifti1Image(data.astype(np.float32), np.diag(list(zooms) + [1.0]))
        img.header.set_xyzt_units("mm")
        nib.save(img, str(tmp_path / name))
        paths.append(str(tmp_path / name))
    return paths


def on_plugin(cuda_plugin, device, x, sigma, dtype, **kw):
    """adaptive_filter of x and sigma as tensors on the device: (the plugin's result, the CPU engine's)."""
    xt, st = (torch.from_numpy(a).to(device, dtype) for a in (x, sigma))
    cuda_plugin.calls.clear()
    got = vc.adaptive_filter(xt, st, **kw)
    assert cuda_plugin.calls == [(ADAPTIVE, 0 if dtype == torch.float32 else 1)]
    assert got.dtype == dtype and got.device == xt.device and got.shape == xt.shape
    with cuda_plugin.cpu_engine():
        cpu = vc.adaptive_filter(xt.cpu(), st.cpu(), **kw)
    return got, cpu


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_mode_against_the_cpu_engine(mode, dtype, cuda_plugin, device):
    x, sigma = case(1701, (7, 9, 37))   # 37 columns: a warp and a few threads more along W
    got, cpu = on_plugin(cuda_plugin, device, x, sigma, dtype, zooms=(1.0, 0.8, 1.3), truncate=2.5, mode=mode,
                         cval=2.5)
    close(got, cpu, tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_constant_map_is_scipys_gaussian_filter(dtype, cuda_plugin, device):
    x, _ = case(1702, (6, 11, 8))
    zooms = (1.5, 1.0, 0.7)
    for mode in MODES:
        got, _ = on_plugin(cuda_plugin, device, x, np.full(x.shape, 1.2), dtype, zooms=zooms, truncate=3.0,
                           mode=mode, cval=-1.0)
        ref = ndimage.gaussian_filter(x, [1.2 / z for z in zooms], truncate=3.0, mode=mode, cval=-1.0)
        close(got, torch.from_numpy(ref), tolerance(dtype))


def test_sigma_zero_keeps_the_voxel_and_a_radius_wider_than_the_volume(cuda_plugin, device):
    x, sigma = case(1703, (3, 4, 5), largest=3.0)   # reaches beyond the volume: the extension repeats
    sigma[0] = 0.0
    got, cpu = on_plugin(cuda_plugin, device, x, sigma, torch.float64, mode="mirror")
    close(got, cpu, 1e-10)
    np.testing.assert_allclose(got[0].cpu().numpy(), x[0], rtol=0, atol=1e-12)
    got, _ = on_plugin(cuda_plugin, device, x, np.zeros(x.shape), torch.float64)   # every voxel itself
    np.testing.assert_array_equal(got.cpu().numpy(), x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_wide_reaches_opt_into_shared_memory_or_read_through_the_cache(dtype, cuda_plugin, device):
    # radius 7: a 15 x 22 x 46 tile, 60 KiB in float32 (opted in), 121 KiB in float64 (past the cap: no tile)
    x, sigma = case(1708, (4, 10, 35), largest=2.4)
    sigma[0, 0, 0] = 2.4
    got, cpu = on_plugin(cuda_plugin, device, x, sigma, dtype, truncate=3.0, mode="wrap")
    close(got, cpu, tolerance(dtype))


def test_radii_on_their_rounding_boundaries_are_the_cpu_engines(cuda_plugin, device):
    # truncate * sigma / zoom + 0.5 an integer or within rounding of one: the radius must round as numpy's
    x, _ = case(1709, (5, 6, 33))
    sigma = (np.arange(x.size) % 13 / 6.0).reshape(x.shape)
    for zooms in [(1.0, 1.0, 1.0), (0.9, 1.1, 0.3)]:
        got, cpu = on_plugin(cuda_plugin, device, x, sigma * zooms[0], torch.float64, zooms=zooms, truncate=3.0)
        close(got, cpu, 1e-10)


def test_no_gradient_half_precision_and_refusals(cuda_plugin, device):
    x, sigma = case(1704, (4, 5, 6))
    xt = torch.from_numpy(x).to(device, torch.float32).requires_grad_()
    st = torch.from_numpy(sigma).to(device, torch.float64)   # the map in another dtype: read as the volume's
    got = vc.adaptive_filter(xt, st, zooms=(1, 1, 2))
    assert not got.requires_grad and cuda_plugin.calls == [(ADAPTIVE, 0)]
    with cuda_plugin.cpu_engine():
        cpu = vc.adaptive_filter(xt, st, zooms=(1, 1, 2))
    assert not cpu.requires_grad   # the CPU path does the same
    close(got, cpu, 1e-4)
    half = vc.adaptive_filter(xt.detach().half(), st, zooms=(1, 1, 2))
    assert half.dtype == torch.float16
    close(half, cpu, 1e-2)
    bad = st.clone()
    bad[1, 2, 3] = -1
    with pytest.raises(ValueError, match="sigma_map must be finite and >= 0"):
        vc.adaptive_filter(xt, bad)
    bad[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="sigma_map must be finite and >= 0"):
        vc.adaptive_filter(xt, bad)
    with pytest.raises(ValueError, match="sigma_map must have the volume's shape"):
        vc.adaptive_filter(xt, st[:, :, 1:])
    with pytest.raises(TypeError, match="float32 or float64: cast it first"):
        vc.adaptive_filter(xt.detach().long(), st)
    empty = vc.adaptive_filter(xt[:0], st[:0])
    assert empty.shape == (0, 5, 6)


@pytest.mark.parametrize("max_memory", [None, "12KiB"])
def test_adaptive_filter_nifti_on_the_plugin_matches_the_cpu_engine(max_memory, cuda_plugin, device, tmp_path):
    x, sigma = case(1705, (10, 9, 13), largest=2.0)
    src, smap = nifti_pair(tmp_path, x, sigma, (1.0, 1.2, 0.9))
    for mode in ["reflect", "constant"]:
        cuda_plugin.calls.clear()
        got = vc.io.adaptive_filter_nifti(src, tmp_path / f"gpu-{mode}.nii", smap, 2.0, mode=mode, cval=1.5,
                                          max_memory=max_memory, device=device)
        calls = len(cuda_plugin.calls)
        assert calls >= (3 if max_memory else 1) and set(cuda_plugin.calls) == {(ADAPTIVE, 0)}
        with cuda_plugin.cpu_engine():
            cpu = vc.io.adaptive_filter_nifti(src, tmp_path / f"cpu-{mode}.nii", smap, 2.0, mode=mode, cval=1.5,
                                              max_memory=max_memory)
        close(torch.from_numpy(np.array(got.data)), torch.from_numpy(np.array(cpu.data)), 1e-4)


def test_the_command_filters_with_a_sigma_map_on_the_plugin(cuda_plugin, device, tmp_path, monkeypatch):
    if EMULATOR:   # the command's "cuda" is the emulated plugin's CPU tensors
        monkeypatch.setattr(filtering, "on_device", lambda block, _: torch.from_numpy(block))
    x, sigma = case(1706, (8, 7, 9))
    src, smap = nifti_pair(tmp_path, x, sigma, (0.9, 1.0, 1.1))
    assert main(["filter", src, str(tmp_path / "gpu.nii.gz"), "--sigma-map", smap, "--device", "cuda", "-q"]) == 0
    assert {n for n, _ in cuda_plugin.calls} == {ADAPTIVE}
    with cuda_plugin.cpu_engine():
        assert main(["filter", src, str(tmp_path / "cpu.nii.gz"), "--sigma-map", smap, "-q"]) == 0
    close(torch.from_numpy(nib.load(str(tmp_path / "gpu.nii.gz")).get_fdata()),
          torch.from_numpy(nib.load(str(tmp_path / "cpu.nii.gz")).get_fdata()), 1e-4)


def exercise_every_kernel(cuda_plugin, device):
    """One small call through adaptive.cu's kernel, checked against the CPU engine: an AssertionError when it
    computes nothing or computes wrong. For checks that empty kernels one at a time (tests/test_cuda.py)."""
    x, sigma = case(1707, (3, 5, 34))
    got, cpu = on_plugin(cuda_plugin, device, x, sigma, torch.float64, zooms=(1.0, 1.0, 0.9), mode="nearest")
    close(got, cpu, 1e-10)


def test_every_kernel_once(cuda_plugin, device):
    exercise_every_kernel(cuda_plugin, device)
