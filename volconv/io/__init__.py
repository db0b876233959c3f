"""NIfTI volumes in and out: `load`, `save`, the `Volume` they exchange, and NIfTI files filtered into others.

nibabel does the format work; this package adds what a filtering tool needs around it:

- load (io.volume): NIfTI-1 and NIfTI-2, plain or gzipped (recognised by content, not by file name),
  scl_slope/scl_inter applied, float32 unless another dtype is asked for, memory-mapped when nibabel can (plain
  file, no scaling), and every broken input (not NIfTI, corrupt gzip, truncated data) refused at load time with
  the file's name.
- the voxel sizes (`Volume.zooms`) come from the affine, as every resampling or kernel in mm must; a
  `NiftiWarning` says when pixdim disagrees with the affine or when xyzt_units name a spatial unit other than mm.
- save (io.writer): the source header's geometry and metadata are kept (affine, qform and sform with their
  codes, xyzt units, TR, dim_info), float32 unless another dtype is asked for, never a new scale factor, and the
  file appears atomically (io.atomic): it is written to a temporary file beside the target and renamed into
  place, so a failure leaves neither a partial output nor a temporary file.
- filter_nifti, adaptive_filter_nifti (io.filtering): a file filtered into another slab by slab (io.slabs,
  io.planes) within a memory budget, gzip on several threads (io.parallel_gzip).
- vesselness_nifti (io.vesselness): Frangi / Sato / Meijering of a file, sigmas in mm.
"""
from .filtering import NAN_RULES, adaptive_filter_nifti, filter_nifti
from .vesselness import vesselness_nifti
from .volume import ZOOM_RTOL, NiftiError, NiftiWarning, Volume, load
from .writer import NiftiWriter, save

# vc.io.filter_nifti, adaptive_filter_nifti, NAN_RULES, NiftiWriter and ZOOM_RTOL are public as well, as they were
# before io became a package; __all__ (star imports) is as it was.
__all__ = ["NiftiError", "NiftiWarning", "Volume", "load", "save"]
