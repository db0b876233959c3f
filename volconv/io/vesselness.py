"""Vesselness of NIfTI files: `vesselness_nifti` runs vc.filters.frangi / sato / meijering on a file with its
voxel sizes (sigmas in mm) and writes the result with the source's geometry.

Whole volumes, not slabs: scikit-image's gamma=None (Frangi) and Meijering's normalisation read the whole
volume's Hessian at a scale, and the filters already work slab by slab inside (about 2.5 volumes of working
memory beyond input and output; Meijering one more), so the file is read once, filtered, and written. The memory
guard refuses a volume whose working set does not fit before anything is allocated."""
from .. import _memory
from .volume import Volume, load
from .writer import save

METHODS = ("frangi", "sato", "meijering")
WORK_VOLUMES = 6.0   # float32 copies alive at the peak: the input, the output, the filters' working set, slack


def vesselness_nifti(src, dst, method, sigmas, *, unit="mm", black_ridges=True, alpha=None, beta=0.5,
                     gamma=None, mode="reflect", cval=0.0, dtype=None, overwrite=False, workers=None,
                     return_volume=True):
    """`method` ("frangi", "sato" or "meijering") of the NIfTI file `src` into `dst` (atomically, the source's
    geometry and header kept, float32 unless `dtype`). sigmas: the scales, in mm (unit="mm", the file's voxel
    sizes apply: anisotropic voxels are handled) or voxels (unit="vox"). black_ridges, alpha (Frangi: 0.5 when
    None; Meijering: 0.25), beta, gamma, mode, cval: as vc.filters.frangi / sato / meijering. 4-D files: volume
    by volume. Returns the written Volume, or None when return_volume is False."""
    from ..ops import vesselness

    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if unit not in ("mm", "vox"):
        raise ValueError(f"unit must be 'mm' or 'vox', got {unit!r}")
    vol = load(src)
    nbytes = WORK_VOLUMES * 4 * vol.data[..., 0].size if vol.data.ndim == 4 else WORK_VOLUMES * 4 * vol.data.size
    _memory.require(int(nbytes), f"{method} of {src} (shape {vol.data.shape})")
    zooms = vol.zooms if unit == "mm" else None
    if method == "frangi":
        params = dict(alpha=0.5 if alpha is None else alpha, beta=beta, gamma=gamma)
    elif method == "meijering":
        params = dict(alpha=alpha)
    else:
        params = {}
    run = getattr(vesselness, method)
    kw = dict(zooms=zooms, black_ridges=black_ridges, mode=mode, cval=cval, workers=workers, **params)
    data = vol.data
    if data.ndim == 4:
        out = data.copy()
        for t in range(data.shape[3]):
            out[..., t] = run(data[..., t], sigmas, **kw)
    else:
        out = run(data, sigmas, **kw)
    result = Volume(out, vol.affine, vol.header)
    save(result, dst, dtype=dtype, overwrite=overwrite, workers=workers)
    return load(dst) if return_volume else None
