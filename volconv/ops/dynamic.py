"""vc.dynamic_conv3d and vc.adaptive_filter: a different kernel at every output voxel, e.g. produced by a small
network from the input (involution, pixel-adaptive convolution, dynamic filters), in 3D, without unfolding.

vc.dynamic_conv3d(input, kernels, kernel_size, stride, padding, dilation): with T = kd*kh*kw taps,
- kernels (N, G, T, Do, Ho, Wo): the C input channels form G groups; every channel of group g uses
  kernels[n, g, :, p] at output voxel p; the output has C channels (involution);
- kernels (N, Cout, Cin, T, Do, Ho, Wo): a full per-voxel Cout x Cin kernel,
  out[n, o, p] = sum over c, t of kernels[n, o, c, t, p] * x[n, c, p*stride + t*dilation - padding].
Zero padding, torch's padding argument (int, triple, "same", "valid"). Checked here, run by engine/dynamic.py
(memory: the input, the output and the kernel field; no unfolded patches) or the torch adapter (tensors that need
gradients, and CUDA tensors: the plugin's kernels, cuda_plugin/dynamic.cu)."""
import numpy as np

from .. import _cuda
from .._dispatch import Caller, check_devices, check_tensors, compiling, is_tensor, torch_batching, wants_autograd
from .._validate import real_number, scipy_mode, workers as resolve_workers
from ..engine import dynamic
from ..kernels import check_truncate, gaussian_radius


@torch_batching("kernels")
def dynamic_conv3d(input, kernels, kernel_size, stride=1, padding=0, dilation=1, *, workers=None):
    """Per-voxel kernels (see the module's doc): kernels (N, G, T, Do, Ho, Wo) (channel groups, involution
    style) or (N, Cout, Cin, T, Do, Ho, Wo) (a full kernel per voxel); numpy or torch, float32/float64,
    differentiable in input and kernels."""
    traced = compiling() and is_tensor(input)   # the custom operator checks the geometry
    if not traced:
        layout = dynamic.Layout(tuple(np.shape(input)), tuple(np.shape(kernels)), kernel_size, stride, padding,
                                dilation)
    if traced or _cuda.is_cuda(input) or wants_autograd(input, kernels):
        from .._torch import dynamic as torch_dynamic

        if not traced:
            check_tensors("dynamic_conv3d", [input, kernels], ["input", "kernels"], cuda=True)
        return torch_dynamic.dynamic_conv3d(input, kernels, kernel_size, stride, padding, dilation, workers)
    caller = Caller("dynamic_conv3d", [input, kernels], ["input", "kernels"])
    x = caller.cast(caller.arrays[0], "input")
    K = caller.cast(caller.arrays[1], "kernels", same_dtype=True)
    return caller.result(dynamic.forward(x, K, layout, resolve_workers(workers)))


def adaptive_filter(volume, sigma_map, zooms=None, truncate=3.0, *, mode="reflect", cval=0.0, workers=None):
    """Spatially varying Gaussian smoothing: the output at each voxel is the volume filtered by the Gaussian
    whose sigma is sigma_map there (in mm when `zooms`, the voxel sizes, are given; in voxels otherwise),
    truncated at `truncate` sigmas per axis and normalised, as scipy.ndimage.gaussian_filter does; so a
    constant map gives gaussian_filter(volume, sigma / zooms, truncate=truncate, mode=mode). Sigma 0 keeps the
    voxel. `mode` / `cval`: the volume's extension beyond its edges, scipy.ndimage's names. Runs the per-voxel
    kernel as three 1-D weight fields (no k^3 field), slab by slab of planes. CUDA tensors (volume and map on
    one GPU): cuda_plugin/adaptive.cu, each voxel's weights made in the kernel. Never differentiable: a result
    without gradient whatever the inputs (tensors needing one included)."""
    on_gpu = _cuda.is_cuda(volume) or _cuda.is_cuda(sigma_map)
    if on_gpu:   # checked where they are (the map's values on the device, _torch/cuda_adaptive.py)
        check_tensors("adaptive_filter", [volume], ["volume"], cuda=True)
        check_devices("adaptive_filter", [volume, sigma_map], ["volume", "sigma_map"], cuda=True)
        v, s = volume, sigma_map
    else:
        caller = Caller("adaptive_filter", [volume, sigma_map], ["volume", "sigma_map"])
        v, s = caller.arrays
    if np.ndim(v) != 3:
        raise ValueError(f"volume must be 3-D (D, H, W), got shape {tuple(np.shape(v))}")
    if tuple(np.shape(s)) != tuple(np.shape(v)):
        raise ValueError(f"sigma_map must have the volume's shape {tuple(np.shape(v))}, got {tuple(np.shape(s))}")
    z = np.ones(3) if zooms is None else np.asarray(zooms, np.float64).ravel()
    if z.shape != (3,) or not (z > 0).all():
        raise ValueError(f"zooms must be 3 positive voxel sizes (mm), got {zooms!r}")
    truncate = check_truncate(truncate)
    mode, cval = scipy_mode(mode), real_number(cval, "cval")
    if on_gpu:
        from .._torch import cuda_adaptive

        return cuda_adaptive.adaptive_filter(volume, sigma_map, tuple(z), truncate, mode, cval)
    x = caller.cast(v, "volume")
    sig = np.asarray(s, np.float64)
    if not np.isfinite(sig).all() or (sig < 0).any():
        raise ValueError("sigma_map must be finite and >= 0 everywhere (a sigma in mm, or voxels without zooms)")
    if x.size == 0:   # nothing to filter: an empty result, as scipy.ndimage gives
        return caller.result(x.copy())
    radii = [gaussian_radius(sig.max() / za, truncate, "sigma_map's largest sigma") for za in z]
    out = dynamic.adaptive_gaussian(x, sig, z, truncate, radii, mode, cval, resolve_workers(workers))
    return caller.result(out)
