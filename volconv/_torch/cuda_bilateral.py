"""vc.bilateral_filter on CUDA tensors: the volume, the guide and the validity extended by the boundary mode with
torch (reference.padded), the spatial term of every tap from the CPU engine's table (engine/bilateral.window),
then cuda_plugin/bilateral.cu's kernel, its weights made tap by tap (one exp per tap and voxel, never stored).
The same definition and summation as the CPU engine. Forward only, as on the CPU: the result has no gradient."""
import math

import torch

from .. import _cuda
from ..engine.bilateral import window
from . import cuda
from .reference import padded_volume


def bilateral(volume, guide, valid, sigma, zooms, radii, sigma_range, mode, cval, halo, edge_valid):
    """volume (D, H, W) on a GPU, guide None or a tensor of its shape there, valid None or a bool tensor of its
    shape there (False: the voxel contributes nothing), all checked by the caller (ops/bilateral.run). sigma,
    zooms: per axis, in one unit; radii: the box window's, in voxels; edge_valid: whether the voxels beyond the
    edges count (True: the validity extended by the mode, True beyond the edge under "constant"); halo: per axis
    (lo, hi) planes of context that are not output. Computed in float32 (float16 / bfloat16 volumes) or float64,
    returned in the volume's dtype, shape less the halos."""
    x = volume.detach()
    if not x.is_contiguous() and x.permute(2, 1, 0).is_contiguous():
        # NIfTI data arrive in Fortran order: the kernel's rows along their first axis (as on the CPU), so that a
        # slab's few planes along the last axis are not its rows
        flip = [None if t is None else t.permute(2, 1, 0) for t in (x, guide, valid)]
        out = bilateral(*flip, sigma[::-1], zooms[::-1], radii[::-1], sigma_range, mode, cval, halo[::-1],
                        edge_valid)
        return out.permute(2, 1, 0)
    compute = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    out_shape = tuple(n - lo - hi for n, (lo, hi) in zip(x.shape, halo))
    if min(out_shape) <= 0:   # nothing to filter: an empty result, as on the CPU
        return x.new_empty(tuple(max(n, 0) for n in out_shape))
    pads = [(r - lo, r - hi) for r, (lo, hi) in zip(radii, halo)]
    xp = padded_volume(x.to(compute), pads, mode, cval)
    gp = None if guide is None else padded_volume(guide.detach().to(device=x.device, dtype=compute), pads, mode, cval)
    mp = None
    if valid is not None or not edge_valid:
        v = torch.ones(x.shape, dtype=torch.bool, device=x.device) if valid is None else valid.detach().bool()
        mp = padded_volume(v, pads, mode, True) if edge_valid else padded_volume(v, pads, "constant", False)
        xp = torch.where(mp, xp, 0)   # an invalid voxel holds 0 in both: its weight 0 times a finite value
        gp = None if gp is None else torch.where(mp, gp, 0)
        mp = mp.to(torch.uint8).contiguous()
    _, a = window(zooms, radii, sigma, torch.empty((), dtype=compute).numpy().dtype)
    a = torch.from_numpy(a).to(x.device)
    b = 0.0 if math.isinf(sigma_range) else 1.0 / (2.0 * sigma_range * sigma_range)
    params = _cuda.params(*out_shape, *radii, _cuda.float_bits(b))
    xp = xp.contiguous()
    out = cuda.launch("bilateral_filter", "vc_bilateral", params, out_shape, xp,
                      None if gp is None else gp.contiguous(), mp, a)
    return out.to(x.dtype)
