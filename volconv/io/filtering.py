"""Filtering NIfTI files into NIfTI files, slab by slab under a memory budget: `filter_nifti` (masks,
normalisation, NaN rules) and `adaptive_filter_nifti` (a Gaussian whose sigma varies voxel by voxel).

A volume whose working copies do not fit is filtered in slabs along its last spatial axis (io.slabs), each read
with the planes the kernel reaches beyond it (io.planes) and written out before the next (io.writer), so that
the result is the one of the whole volume at once.
"""
import contextlib
import errno
import os
import warnings

import numpy as np

from .._validate import filter_pads, scipy_mode, workers as resolve_workers
from . import slabs
from .parallel_gzip import in_flight
from .planes import ArrayPlanes, Planes
from .volume import NiftiError, NiftiWarning, Volume, load
from .writer import NiftiWriter

NAN_RULES = ("propagate", "zero", "mask")


def filter_nifti(src, dst, kernel, *, mode="reflect", cval=0.0, mask=None, normalize=False, outside="keep",
                 nan="propagate", dtype=None, overwrite=False, workers=None, progress=None, max_memory=None,
                 return_volume=True, device=None):
    """Filter the NIfTI file `src` into `dst`, keeping its geometry and header (written as vc.io.save does:
    atomically, gzip on several threads).

    kernel: a vc.kernels object, an array (voxels), or a callable zooms -> kernel (so that a size in mm is
    resolved against this file's voxel sizes); it may be larger than the volume (scipy.ndimage's rule, as
    vc.correlate: a single slice or a small patch is filtered through the boundary mode). Or a vc.Bilateral:
    vc.bilateral_filter with this file's voxel sizes (sigma_spatial in mm), its guide a NIfTI path or an array
    on the file's grid (the masks, nan rules, slabs and device below apply to it as to a kernel; `normalize`
    leaves the voxels beyond the volume's edge out of every window, as a mask's outside). mode/cval:
    scipy.ndimage boundary handling. mask: a NIfTI path or an array (non-zero = inside): voxels outside it do
    not contribute at all (whatever their value, NaN included). normalize: divide by the filtered mask (ones
    without a mask), which renormalises at the volume edge and at the mask border (fslmaths -fmean; the
    boundary mode then plays no part). outside: "keep" or "zero" the voxels outside the mask. 4-D volumes are
    filtered volume by volume over their three spatial axes. dtype: of the output (float32 by default).
    progress: callable(done, total) as the work advances.

    nan: what non-finite input voxels (NaN, +-Inf) do. "propagate" (default): they spread through the kernel
    as in vc.correlate and torch (a NiftiWarning says so when the output has more non-finite voxels than the
    input); "zero": they are read as 0 (fslmaths -nan); "mask": they join the outside of the mask, so they
    contribute nothing (with normalize the weights renormalise around them) and `outside` says what they
    become.

    max_memory: working memory, as bytes (int) or a size with a unit ("512MiB", "1GB", "2G"; default
    volconv.io.slabs.WORK_BYTES, 512 MiB). A volume whose float copies do not fit is filtered in slabs along its
    last spatial axis, each read with the planes the kernel reaches beyond it (from the memory map of an
    uncompressed file, or as the gzip stream goes), the mask read with it, and written out before the next:
    peak memory stays near max_memory plus one output slab whatever the volume's size, and the result is the
    one of the whole volume at once (bit for bit when the kernel runs directly, as separable and small dense
    kernels do; within FFT rounding for a large dense kernel the cost model sends to the FFT).

    device: None (default) filters on volconv's CPU engine; a torch device ("cuda", "cuda:1", a torch.device)
    filters each slab there as a tensor (the CUDA plugin's conv3d on a GPU): the slabs, masks and the
    NaN rules stay as above, each slab goes to the device and its output comes back before it is written, so
    the device needs room for about two slabs (max_memory sizes them). On a GPU a zero weight is multiplied
    like any other, as in torch.conv3d: with nan="propagate", NaN / Inf also spread through a kernel's zero
    weights there (scipy and the CPU engine skip them); nan="zero" or "mask" give the same results anywhere.

    Returns the written Volume (its data as written: in the output dtype, integers rounded and clipped), or
    None when return_volume is False. A volume filtered in slabs is returned memory-mapped from an
    uncompressed output, and read back whole from a compressed one: pass return_volume=False to keep the
    memory promise there."""
    from ..kernels import Kernel, as_kernel
    from ..ops.bilateral import Bilateral

    device = filter_device(device)
    mode = scipy_mode(mode)   # once, here: the aliases (grid-constant) must take the same paths as their names
    if outside not in ("keep", "zero"):
        raise ValueError(f"outside must be 'keep' or 'zero', got {outside!r}")
    if nan not in NAN_RULES:
        raise ValueError(f"nan must be one of {', '.join(NAN_RULES)}, got {nan!r}")
    job = _FileJob(src, dst, overwrite, max_memory)
    with Planes(job.src) as source, contextlib.ExitStack() as stack:
        if callable(kernel) and not isinstance(kernel, Kernel):
            kernel = kernel(source.zooms)
        bilateral = kernel if isinstance(kernel, Bilateral) else None
        mask_planes = None if mask is None else _grid_planes(stack, mask, "mask", source, job.src)
        guide_planes = None if bilateral is None or bilateral.guide is None else \
            _grid_planes(stack, bilateral.guide, "guide", source, job.src)
        masked = mask is not None or normalize or nan == "mask"
        if bilateral is None:
            kernel = as_kernel(kernel)
            # normalising: a weight sum this small is no voxel (a local rule: slabs and the whole volume agree)
            tiny = 1e-12 * float(np.abs(kernel.to_dense()).sum()) if normalize else None
            reach = filter_pads(kernel.shape, (0, 0, 0))[2]
            copies = slabs.copies(masked)
        else:
            radius = bilateral.radii(source.zooms)[2]
            reach = (radius, radius)
            # the block and its padded copy, the output; a guide's block and padded copy; a mask's validity
            # (bool and padded float) and the masked copies of the padded volume and guide
            copies = 4 + 2 * (guide_planes is not None) + 4 * masked
        counts = np.zeros(2, np.int64)   # non-finite voxels in the input and in the output
        planes_shape = source.shape[:2]

        def for_volume(t):
            mask_reader, guide_reader = (
                None if p is None else slabs.PlaneReader(p.reader(0), planes_shape, np.float32, keep=sum(reach))
                for p in (mask_planes, guide_planes))

            def filter_slab(block, planes, halo):
                finite = np.isfinite(block)   # one pass: counted on the output's planes, used by nan's rules
                counts[0] += _non_finite(finite[..., halo[0]:block.shape[2] - halo[1]])
                inside = None if mask_reader is None else slabs.gather(planes, mask_reader) != 0
                guide = None if guide_reader is None else slabs.gather(planes, guide_reader)
                if guide is not None and nan != "propagate":   # the guide's non-finite voxels: the volume's rule
                    guide_finite = np.isfinite(guide)
                    finite = finite & guide_finite if nan == "mask" else finite
                    guide = np.where(guide_finite, guide, np.float32(0)) if nan == "zero" else guide
                if nan == "zero":
                    block = np.where(finite, block, np.float32(0))
                elif nan == "mask":
                    inside = finite if inside is None else inside & finite
                if bilateral is None:
                    out = _filter_volume(block, kernel, mode, cval, inside, normalize, outside, workers, halo,
                                         tiny, device)
                else:
                    out = _bilateral_volume(block, bilateral, guide, source.zooms, mode, cval, inside, normalize,
                                            outside, workers, halo, device)
                counts[1] += _non_finite(np.isfinite(out))
                return out
            return filter_slab

        # the slabs' halos at the volume's ends: the boundary mode's padding, read from the volume (zeros and
        # constants are the filter's own padding; normalising pads with zeros whatever the mode)
        pad_mode = None if mode == "constant" or normalize else mode
        result = job.run(source, reach, copies, pad_mode, for_volume, dtype, workers, progress, return_volume,
                         also_read=[p for p in (mask_planes, guide_planes) if p is not None])
    if counts[1] > counts[0]:
        warnings.warn(f"{job.src}: NaN/Inf spread through the kernel: {counts[1]} non-finite output voxels from "
                      f"{counts[0]} in the input; nan='mask' leaves them out, nan='zero' reads them as 0 "
                      f"(--nan mask|zero)", NiftiWarning, stacklevel=2)
    return result


def adaptive_filter_nifti(src, dst, sigma_map, truncate=3.0, *, mode="reflect", cval=0.0, dtype=None,
                          overwrite=False, workers=None, progress=None, max_memory=None, return_volume=True,
                          device=None):
    """vc.adaptive_filter (a Gaussian whose sigma, in mm, varies voxel by voxel) of the NIfTI file `src` into
    `dst`, every 3-D volume of a 4-D file with the same map. sigma_map: a 3-D NIfTI file on src's grid (same
    shape and affine). Slabbed with a halo under max_memory like filter_nifti (same arguments, same return).
    device: as filter_nifti's (None: volconv's CPU engine; "cuda": each slab and its part of the map filtered
    by the CUDA plugin, then brought back to be written)."""
    from ..kernels import check_truncate, gaussian_radius
    from ..ops.dynamic import adaptive_filter

    device = filter_device(device, "adaptive_filter_nifti(device='cuda')")
    truncate, mode = check_truncate(truncate), scipy_mode(mode)   # (aliases as their names, as filter_nifti)
    job = _FileJob(src, dst, overwrite, max_memory)
    sigma_map = os.fspath(sigma_map)
    with Planes(job.src) as source, Planes(sigma_map) as sigma:
        if sigma.shape != source.shape[:3] or sigma.nt != 1:
            raise NiftiError(f"{sigma_map}: sigma map has shape {sigma.img_shape}; it must be 3-D on the volume's "
                             f"grid {source.shape[:3]}")
        if not np.allclose(sigma.affine, source.affine, atol=1e-3):
            raise NiftiError(f"{sigma_map}: sigma map is not on the grid of {job.src} (their affines differ)")
        zooms = np.array(source.zooms)
        largest = _largest(sigma, sigma_map, job.budget)
        # adaptive_filter's radii, for the whole map
        radii = [gaussian_radius(largest / z, truncate, "sigma_map's largest sigma") for z in zooms]
        reach = (radii[2], radii[2])
        # adaptive_filter's arrays, in float32s per voxel: the input, its padded copy, the output, the map
        # (float32 here, float64 there), the fields of 1-D weights (one per distinct voxel size and radius:
        # isotropic voxels share one) and the work of making the widest (float64 weights, their float32 copy and
        # six float64 per-voxel arrays); measured in tests/test_robust_nifti.py
        fields = {(z, r): 2 * r + 1 for z, r in zip(zooms, radii)}
        copies = 6 + sum(fields.values()) + 3 * max(fields.values()) + 12

        def for_volume(t):
            reader = slabs.PlaneReader(sigma.reader(0), source.shape[:2], np.float32, keep=sum(reach))

            def filter_slab(block, planes, halo):
                s = slabs.gather(planes, reader)
                # C-ordered views of the Fortran blocks: adaptive_filter's (D, H, W) with the zooms reversed
                if device is None:
                    out = adaptive_filter(block.T, s.T, zooms[::-1], truncate, mode=mode, cval=cval, workers=workers)
                else:
                    out = adaptive_filter(on_device(block.T, device), on_device(s.T, device), zooms[::-1], truncate,
                                          mode=mode, cval=cval).cpu().numpy()
                return out.T[..., halo[0]:out.shape[0] - halo[1]]
            return filter_slab

        return job.run(source, reach, copies, None if mode == "constant" else mode, for_volume, dtype,
                       workers, progress, return_volume, also_read=[sigma])


def _grid_planes(stack, given, name, source, src):
    """A mask's or a guide's planes (a NIfTI path, opened in `stack`, or an array), checked to be one 3-D volume
    on the grid of `source` (the file src): its shape, and a file's affine."""
    planes = stack.enter_context(Planes(os.fspath(given)) if isinstance(given, (str, os.PathLike))
                                 else ArrayPlanes(given))
    if planes.shape[:3] != source.shape[:3] or planes.nt != 1:
        path = f"{os.fspath(given)}: " if name == "guide" and hasattr(planes, "affine") else ""
        raise ValueError(f"{path}{name} has shape {planes.img_shape} but {src} has spatial shape {source.shape[:3]}")
    if name == "guide" and hasattr(planes, "affine") and not np.allclose(planes.affine, source.affine, atol=1e-3):
        raise NiftiError(f"{os.fspath(given)}: guide is not on the grid of {src} (their affines differ)")
    return planes


def _non_finite(finite):
    """How many voxels np.isfinite's answer `finite` says are not."""
    return finite.size - np.count_nonzero(finite)


def _largest(planes, path, budget):
    """The largest value of a sigma map read slab by slab within `budget` bytes (it sets the halo), refusing
    negative or non-finite values with the file's name."""
    largest = 0.0
    step = max(1, budget // 2 // max(1, planes.shape[0] * planes.shape[1] * 4))
    read = planes.reader(0)
    for a in range(0, planes.shape[2], step):
        block = np.empty(planes.shape[:2] + (min(step, planes.shape[2] - a),), np.float32, order="F")
        read(block, a)
        if not np.isfinite(block).all() or (block < 0).any():
            raise NiftiError(f"{path}: the sigma map must be finite and >= 0 everywhere (sigma in mm)")
        largest = max(largest, float(block.max(initial=0.0)))
    return largest


class _FileJob:
    """A file filtered into another slab by slab (filter_nifti, adaptive_filter_nifti): the output checks, the
    memory budget, and the run."""

    def __init__(self, src, dst, overwrite, max_memory):
        self.src, self.dst, self.overwrite = os.fspath(src), os.fspath(dst), overwrite
        if not overwrite and os.path.exists(self.dst):
            raise FileExistsError(errno.EEXIST, "output file exists (overwrite=False)", self.dst)
        self.budget = slabs.WORK_BYTES if max_memory is None else slabs.memory_bytes(max_memory, "max_memory")

    def run(self, source, reach, copies, pad_mode, for_volume, dtype, workers, progress, return_volume,
            also_read=()):
        """Every volume t of `source` through for_volume(t) -> filter_slab(block, planes, halo) (see
        slabs.filter_volume), written to dst; the Volume filter_nifti returns. also_read: the other files
        the slabs read (a mask, a sigma map), checked to their end before the output is committed."""
        shape, nt = source.shape, source.nt
        compressed = self.dst.lower().endswith(".gz")
        # the gzip writer's blocks in flight come out of the budget (at most an eighth of it)
        gzip_bytes = min(self.budget // 8, in_flight(resolve_workers(workers))) if compressed else 0
        budget = self.budget - gzip_bytes
        in_memory = np.prod(shape[:3], dtype=np.int64) * 4 * copies <= budget
        slab = shape[2] if in_memory else slabs.thickness(shape, reach, 4, budget, copies)
        kept = []   # in memory, the volumes as written are also the returned Volume's data
        keep = in_memory and return_volume

        def advance(k1, t):   # planes done, over all volumes
            if progress is not None:
                progress(t * shape[2] + k1, nt * shape[2])

        def write(block):
            written = out.write(block, keep=keep)
            if keep:
                kept.append(written)

        out_shape = source.img_shape
        with NiftiWriter(self.dst, source, out_shape, dtype=dtype, overwrite=self.overwrite, workers=workers,
                         gzip_bytes=gzip_bytes or None) as out:
            for t in range(nt):
                slabs.filter_volume(source.reader(t), shape[:2], np.float32, shape[2], reach, slab, pad_mode,
                                     for_volume(t), write, lambda k1, t=t: advance(k1, t))
            for planes in [source, *also_read]:
                planes.finish()   # a corrupt gzip stream fails here, before the output is committed
        if not return_volume:
            return None
        if in_memory:
            data = kept[0].reshape(out_shape, order="F") if len(kept) == 1 else np.stack(kept, axis=3)
            return Volume(data, source.affine, source.header.copy())
        with warnings.catch_warnings():   # the source's warnings were given already
            warnings.simplefilter("ignore", NiftiWarning)
            # as written: the output's own dtype, memory-mapped when it can be
            return load(self.dst, dtype=None, mmap="r" if not compressed else False)


def filter_device(device, op="filter_nifti(device='cuda')"):
    """filter_nifti's device: None (the CPU engine, on numpy arrays) or a torch.device of type cpu or cuda (each
    slab filtered there as a tensor; cuda needs the CUDA plugin and a GPU; `op` names the call in the error)."""
    if device is None:
        return None
    try:
        import torch
    except ImportError:
        raise ValueError(f"device={device!r} filters slabs as torch tensors, and torch is not installed; leave "
                         "device=None to filter on volconv's CPU engine") from None
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be None, 'cpu', 'cuda' or 'cuda:N', got {device!r}") from e
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be None, 'cpu', 'cuda' or 'cuda:N', got {str(device)!r}")
    if device.type == "cuda":
        from .. import _cuda

        _cuda.require(op, has_cuda_version=True)
    return device


def on_device(block, device):
    """A slab's float32 block as a tensor on device (its memory order kept: the filter copies on the device)."""
    import torch

    return torch.from_numpy(block).to(device)


def _filter_volume(x, kernel, mode, cval, inside, normalize, outside, workers, halo, tiny, device=None):
    """One slab of a volume (`halo` planes of context at the ends of its last axis, not output): masked
    (outside voxels contribute nothing) and/or normalised filtering (weight sums up to `tiny` are no voxel);
    each correlation on `device` when given (filter_device)."""
    from ..ops.filtering import filter_volume

    halo3 = ((0, 0), (0, 0), tuple(halo))

    def correlate(v, m, c):
        if device is None:
            return filter_volume("correlate", v, kernel, m, c, 0, "auto", workers, flip=False, halo=halo3)
        out = filter_volume("correlate", on_device(v, device), kernel, m, c, 0, "auto", workers, flip=False,
                            halo=halo3)
        return out.cpu().numpy()

    if inside is None and not normalize:
        return correlate(x, mode, cval)
    weighted = x
    if inside is not None:   # outside voxels are set to 0, not multiplied by 0: NaN * 0 would still be NaN
        weighted = x.copy(order="F")
        weighted[~inside] = 0
    if normalize:  # sum(k * w * x) / sum(k * w) over the voxels that exist and are inside
        num = correlate(weighted, "constant", 0.0)
        del weighted
        weight = np.ones(x.shape, x.dtype, order="F") if inside is None else inside.astype(x.dtype, order="F")
        den = correlate(weight, "constant", 0.0)
        del weight
        filtered = np.divide(num, den, out=np.zeros_like(num), where=np.abs(den) > tiny)
    else:
        filtered = correlate(weighted, mode, cval)
    return _outside(filtered, x, inside, outside, halo)


def _bilateral_volume(x, params, guide, zooms, mode, cval, inside, normalize, outside, workers, halo, device=None):
    """One slab through vc.bilateral_filter (ops.bilateral.run): voxels outside `inside` (a mask, nan="mask")
    contribute nothing, nor, with normalize, those beyond the volume's edge; on `device` when given."""
    from ..ops.bilateral import run

    halo3 = ((0, 0), (0, 0), tuple(halo))
    args = (x, guide, inside)
    if device is not None:
        args = [None if a is None else on_device(a, device) for a in args]
    out = run(params, *args, zooms, mode, cval, workers, halo=halo3, edge_valid=not normalize)
    return _outside(out if device is None else out.cpu().numpy(), x, inside, outside, halo)


def _outside(filtered, x, inside, outside, halo):
    """filtered with the voxels outside `inside` (None: none) kept from x or zeroed, as `outside` says; x has
    `halo` planes of context at the ends of its last axis, filtered does not."""
    if inside is not None:
        lo, hi = halo
        core = (Ellipsis, slice(lo, x.shape[2] - hi))
        keep = ~inside[core]
        filtered[keep] = x[core][keep] if outside == "keep" else 0
    return filtered
