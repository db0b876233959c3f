"""vc.adaptive_filter on CUDA tensors: the volume extended by its boundary mode with torch (reference.padded),
then cuda_plugin/adaptive.cu's per-voxel Gaussians, their weights made in the kernel from the sigma map (no
weight field in memory). Forward only, as on the CPU: the result carries no gradient."""
import torch

from .. import _cuda
from ..kernels import gaussian_radius
from . import cuda
from .reference import padded_volume


def adaptive_filter(volume, sigma_map, zooms, truncate, mode, cval):
    """volume (D, H, W) and sigma_map (D, H, W) on one GPU, checked by the caller (shapes, zooms, truncate,
    mode); sigma_map's finiteness and sign checked here, on the device. Computed in float32 (float16 / bfloat16
    volumes) or float64 and returned in the volume's dtype."""
    x = volume.detach()
    compute = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    s = sigma_map.detach().to(compute).contiguous()
    if x.numel() == 0:   # nothing to filter: an empty result, as scipy.ndimage gives
        return x.clone()
    if not bool((torch.isfinite(s) & (s >= 0)).all()):
        raise ValueError("sigma_map must be finite and >= 0 everywhere (a sigma in mm, or voxels without zooms)")
    largest = float(sigma_map.detach().double().max())   # the CPU path's radii, from the map as given
    radii = [gaussian_radius(largest / float(z), truncate, "sigma_map's largest sigma") for z in zooms]
    xp = padded_volume(x.to(compute), [(r, r) for r in radii], mode, cval).contiguous()
    params = _cuda.params(*x.shape, *radii, *(_cuda.float_bits(z) for z in zooms), _cuda.float_bits(truncate))
    out = cuda.launch("adaptive_filter", "vc_adaptive_gaussian", params, tuple(x.shape), xp, s)
    return out.to(x.dtype)
