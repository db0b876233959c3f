"""filter_nifti(device="cuda") and `volconv filter --device cuda`: each slab filtered by the CUDA plugin (a
Gaussian by its separable passes, a dense kernel by the one-channel kernel), against the same call on volconv's CPU engine (device=None) and scipy.ndimage, through the slab path (a small
max_memory), masks, normalising and every NaN rule; refusals named. On the CPU emulator the device is "cpu" (CPU
tensors count as CUDA tensors there) and the command's "cuda" is redirected to it.

Tolerances: float32 data and output, 1e-4 of the volume's scale (the plugin sums in another order than the CPU)."""
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

import volconv as vc
from volconv.cli import main
from volconv.io import filtering

from conftest import EMULATOR, config_rng

pytestmark = pytest.mark.cuda
DEPTHWISE, SEPARABLE = "vc_depthwise_forward", "vc_separable_forward"   # a dense kernel; a Gaussian's 1-D passes


def nifti(path, data, zooms=(1.0, 1.2, 0.9)):
    img = nib.Nifti1Image(data.astype(np.float32), np.diag(list(zooms) + [1.0]))
    nib.save(img, str(path))
    return str(path)


def volume(seed, shape=(18, 15, 21)):
    return (config_rng(seed).random(shape) * 100).astype(np.float32)


def close(a, b, scale=100.0):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=0, atol=1e-4 * scale)


@pytest.mark.parametrize("mode", ["reflect", "constant", "nearest", "mirror", "wrap"])
@pytest.mark.parametrize("max_memory", [None, "20KiB"])
def test_filter_nifti_on_the_plugin_matches_the_cpu_engine_and_scipy(mode, max_memory, cuda_plugin, device,
                                                                     tmp_path):
    data = volume(1)
    src = nifti(tmp_path / "in.nii.gz", data)
    kernel = vc.kernels.gaussian(1.3, truncate=2.0)
    got = vc.io.filter_nifti(src, tmp_path / "gpu.nii.gz", kernel, mode=mode, cval=3.5, max_memory=max_memory,
                             device=device)
    assert [n for n, _ in cuda_plugin.calls] and {n for n, _ in cuda_plugin.calls} == {SEPARABLE}
    with cuda_plugin.cpu_engine():
        cpu = vc.io.filter_nifti(src, tmp_path / "cpu.nii.gz", kernel, mode=mode, cval=3.5,
                                 max_memory=max_memory)
    close(got.data, cpu.data)
    close(got.data, ndimage.correlate(data.astype(np.float64), kernel.to_dense(), mode=mode, cval=3.5))
    np.testing.assert_array_equal(got.affine, cpu.affine)


@pytest.mark.parametrize("nan", ["propagate", "zero", "mask"])
def test_masks_normalising_and_nan_rules_on_the_plugin(nan, cuda_plugin, device, tmp_path):
    data = volume(2)
    data[4, 5, 6] = np.nan
    mask = np.zeros(data.shape, np.uint8)
    mask[2:15, 3:13, 1:19] = 1
    src = nifti(tmp_path / "in.nii", data)
    kernel = np.ones((3, 5, 3), np.float32) / 45   # every weight non-zero: NaN spreads the same way on a GPU
    args = dict(mask=mask, normalize=True, outside="zero", nan=nan, max_memory="24KiB")
    got = vc.io.filter_nifti(src, tmp_path / "gpu.nii", kernel, device=device, **args)
    assert {n for n, _ in cuda_plugin.calls} == {DEPTHWISE}
    with cuda_plugin.cpu_engine():
        cpu = vc.io.filter_nifti(src, tmp_path / "cpu.nii", kernel, **args)
    np.testing.assert_array_equal(np.isnan(got.data), np.isnan(cpu.data))
    close(np.nan_to_num(got.data), np.nan_to_num(cpu.data))


def test_the_command_filters_on_the_plugin(cuda_plugin, device, tmp_path, monkeypatch):
    if EMULATOR:   # the command's "cuda" is the emulated plugin's CPU tensors
        monkeypatch.setattr(filtering, "on_device", lambda block, _: torch.from_numpy(block))
    data = volume(3)
    src = nifti(tmp_path / "in.nii.gz", data)
    assert main(["filter", src, str(tmp_path / "gpu.nii.gz"), "--fwhm", "3mm", "--device", "cuda", "-q"]) == 0
    assert {n for n, _ in cuda_plugin.calls} == {SEPARABLE}
    with cuda_plugin.cpu_engine():
        assert main(["filter", src, str(tmp_path / "cpu.nii.gz"), "--fwhm", "3mm", "-q"]) == 0
    close(nib.load(str(tmp_path / "gpu.nii.gz")).get_fdata(), nib.load(str(tmp_path / "cpu.nii.gz")).get_fdata())


def test_what_cannot_run_on_the_plugin_is_refused_clearly(cuda_plugin, device, tmp_path):
    src = nifti(tmp_path / "in.nii.gz", volume(4))
    sigma = nifti(tmp_path / "sigma.nii.gz", np.ones((18, 15, 21), np.float32))
    out = tmp_path / "out.nii.gz"
    for bad in ("tpu", "cuda:x", 3.5):   # (--sigma-map with --device cuda runs: tests/test_cuda_adaptive.py)
        with pytest.raises(ValueError, match="device must be None, 'cpu', 'cuda' or 'cuda:N'"):
            vc.io.filter_nifti(src, out, np.ones((3, 3, 3)), device=bad)
        with pytest.raises(ValueError, match="device must be None, 'cpu', 'cuda' or 'cuda:N'"):
            vc.io.adaptive_filter_nifti(src, out, sigma, device=bad)
    assert not os.path.exists(out) and cuda_plugin.calls == []
