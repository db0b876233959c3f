"""A NIfTI volume in memory (`Volume`) and reading one (`load`), with the checks every reader of a file shares.

nibabel does the format work; this module adds what a filtering tool needs around it:

- load: NIfTI-1 and NIfTI-2, plain or gzipped (recognised by content, not by file name), scl_slope/scl_inter
  applied, float32 unless another dtype is asked for, memory-mapped when nibabel can (plain file, no scaling),
  and every broken input (not NIfTI, corrupt gzip, truncated data) refused at load time with the file's name.
- the voxel sizes (`Volume.zooms`) come from the affine, as every resampling or kernel in mm must; a
  `NiftiWarning` says when pixdim disagrees with the affine or when xyzt_units name a spatial unit other than mm.
- open_header / open_source: the one way a file is opened (by `load`, the slab readers of io.planes and the
  command's `info`).
"""
import contextlib
import gzip
import os
import warnings
import zlib

import nibabel as nib
import numpy as np
from nibabel.affines import voxel_sizes
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

# pixdim and the affine's voxel sizes may differ by float32 rounding of the sform rows (about 1e-7); anything
# beyond this relative difference is a real disagreement.
ZOOM_RTOL = 1e-4

_GZIP_MAGIC = b"\x1f\x8b"
# Unit names as nibabel's Nifti1Header.get_xyzt_units spells them -> words for the warning, and the factor to mm.
_SPATIAL_UNITS = {"meter": ("meters", 1000.0), "micron": ("micrometres (microns)", 0.001)}


class NiftiError(ValueError):
    """An input file that is not a readable NIfTI volume; the message names the file and the problem."""


class NiftiWarning(UserWarning):
    """A readable NIfTI file with doubtful geometry (pixdim vs affine, spatial unit other than mm)."""


class Volume:
    """A NIfTI volume.

    Attributes
    ----------
    data : numpy.ndarray
        3-D (x, y, z) or 4-D (x, y, z, t) array; float32 from `load` unless another dtype was asked for.
    affine : numpy.ndarray
        4x4 float64 voxel -> world (mm) transform.
    header : nibabel.Nifti1Header or nibabel.Nifti2Header
        The source's header (a fresh Nifti1Header when none was given); `save` keeps its geometry and metadata.
    zooms : tuple of 3 floats
        Voxel sizes in mm, from the affine (``nibabel.affines.voxel_sizes``), not from pixdim.
    """

    def __init__(self, data, affine, header=None):
        if hasattr(data, "detach"):  # a torch tensor handed back by a filter
            data = data.detach().cpu().numpy()
        data = np.asanyarray(data)
        if data.ndim not in (3, 4):
            raise ValueError(f"Volume data must be 3-D (x, y, z) or 4-D (x, y, z, t), got shape {data.shape}")
        affine = np.array(affine, dtype=np.float64)
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
            raise ValueError(f"Volume affine must be a finite 4x4 matrix, got {affine.shape}")
        if header is None:  # geometry from the affine alone: both forms 'aligned', units mm and s
            header = nib.Nifti1Header()
            header.set_sform(affine, code="aligned")
            header.set_qform(affine, code="aligned")
            header.set_xyzt_units("mm", "sec")
        elif not isinstance(header, nib.Nifti1Header):  # Nifti2Header is a subclass
            raise TypeError(f"Volume header must be a nibabel Nifti1Header or Nifti2Header, "
                            f"got {type(header).__name__}")
        self.data = data
        self.affine = affine
        self.header = header

    @property
    def zooms(self):
        return tuple(float(z) for z in voxel_sizes(self.affine))

    @property
    def shape(self):
        return self.data.shape

    def with_data(self, data):
        """A Volume with the same affine and (a copy of the) header holding `data`, e.g. a filtered copy.

        The spatial shape must stay the same (the affine describes it); the 4th dimension may change."""
        new = Volume(data, self.affine.copy(), self.header.copy())
        if new.data.shape[:3] != self.data.shape[:3]:
            raise ValueError(f"with_data: new data has spatial shape {new.data.shape[:3]}, the volume's "
                             f"geometry is for {self.data.shape[:3]}")
        return new

    def __repr__(self):
        zooms = "x".join(f"{z:g}" for z in self.zooms)
        return f"Volume(shape={self.data.shape}, dtype={self.data.dtype}, zooms={zooms} mm)"


# --------------------------------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------------------------------

def load(path, *, dtype=np.float32, mmap=True):
    """Read a NIfTI-1 or NIfTI-2 volume (.nii or .nii.gz) into a `Volume`.

    Parameters
    ----------
    path : str, bytes or os.PathLike
    dtype : numpy dtype or None
        Type of ``Volume.data`` (default float32; scl_slope/scl_inter are applied in it). An integer dtype is
        accepted only when every stored value is a whole number in its range (no silent rounding). None gives
        what nibabel's array proxy gives, without a copy when possible: the stored type and byte order when the
        file is unscaled (memory-mapped for a plain file), nibabel's float type when it is scaled.
    mmap : bool or {"c", "r"}
        Passed to nibabel: memory-map an uncompressed, unscaled file instead of reading it (True means
        copy-on-write, "c"). Gzipped files are always read whole.

    Raises
    ------
    FileNotFoundError
        `path` does not exist.
    NiftiError
        `path` is not a NIfTI file, its gzip stream is corrupt, its data is truncated, or its data is not a
        3-D or 4-D array of numbers.

    Warns
    -----
    NiftiWarning (a UserWarning)
        pixdim disagrees with the affine's voxel sizes, or xyzt_units give a spatial unit other than mm
        (meters, microns) or none at all.
    """
    path = os.fsdecode(path)   # str, bytes (as os.listdir(bytes) gives) or os.PathLike, as nibabel takes
    if dtype is not None:
        dtype = np.dtype(dtype)
        if dtype.kind not in "fiu":
            raise ValueError(f"load: dtype must be a real floating or integer numpy dtype, or None; got {dtype}")
    with open_source(path, mmap, real=dtype is not None) as (img, finish), reading(path):
        data = _read_data(path, img, dtype)
        finish()
    vol = Volume(data, img.affine, img.header)
    warn_geometry(path, vol.affine, vol.header)
    return vol


@contextlib.contextmanager
def open_header(path, mmap=True):
    """(image, stream): the nibabel image of a NIfTI file, its header read and its data not, the file open in
    the block; stream: the open gzip stream of a gzipped file (None otherwise). Errors as `load` documents."""
    if os.path.isdir(path):
        raise NiftiError(f"{path}: is a directory, not a NIfTI file")
    with open(path, "rb") as f:  # FileNotFoundError / PermissionError name the file themselves
        block = f.read(548)
    with contextlib.ExitStack() as stack:
        with reading(path):
            if block[:2] == _GZIP_MAGIC:
                f = stack.enter_context(gzip.open(path, "rb"))
                img_class = _nifti_class(path, f.read(548))
                f.seek(0)
                img = img_class.from_file_map({"image": nib.FileHolder(fileobj=f)}, mmap=False)
                stream = f
            else:
                img_class = _nifti_class(path, block)
                stream = None
                if path.lower().endswith((".gz", ".bz2", ".zst")):  # nibabel would decompress by the name
                    f = stack.enter_context(open(path, "rb"))
                    img = img_class.from_file_map({"image": nib.FileHolder(fileobj=f)}, mmap=False)
                else:
                    img = img_class.from_file_map({"image": nib.FileHolder(filename=path)}, mmap=mmap)
        yield img, stream


@contextlib.contextmanager
def open_source(path, mmap=True, real=True):
    """(image, finish): the nibabel image of a NIfTI file, its data not read yet, the file open in the block;
    finish() reads a gzip stream to its end, so that gzip checks its CRC and length (done on leaving the block
    at the latest: call it before committing anything made from the data). Errors as `load` documents; `real`
    refuses data that are not real numbers (RGB, complex), which every filter would misread."""
    with open_header(path, mmap) as (img, stream):
        if stream is None:
            with reading(path):
                _check_size(path, img, os.path.getsize(path))
        if real:
            _check_real(path, img.dataobj.dtype)
        finished = []

        def finish():
            if stream is not None and not finished:
                with reading(path):
                    stream.read()
                finished.append(True)

        yield img, finish
        finish()


@contextlib.contextmanager
def reading(path):
    """Errors of nibabel and gzip while reading `path` -> NiftiError naming the file and the problem."""
    try:
        yield
    except (NiftiError, PermissionError):
        raise
    except (gzip.BadGzipFile, zlib.error, EOFError) as e:
        raise NiftiError(f"{path}: corrupt or truncated gzip stream ({e})") from e
    except (OSError, ValueError, HeaderDataError, ImageFileError) as e:
        reason = " ".join(str(e).split())
        if "Expected" in reason and "bytes" in reason:  # nibabel's array_from_file: stream shorter than data
            raise NiftiError(f"{path}: truncated data: {reason}") from e
        raise NiftiError(f"{path}: unreadable NIfTI file: {reason}") from e


def _nifti_class(path, block):
    """The nibabel image class for a header's first bytes, or NiftiError saying what the file is instead."""
    if len(block) < 348:
        raise NiftiError(f"{path}: not a NIfTI file (only {len(block)} bytes, a NIfTI-1 header alone is 348)")
    sizes = {int.from_bytes(block[:4], "little"), int.from_bytes(block[:4], "big")}
    if 540 in sizes and block[4:8] == b"n+2\0":
        return nib.Nifti2Image
    if 348 in sizes and block[344:348] == b"n+1\0":
        return nib.Nifti1Image
    if 540 in sizes and block[4:8] == b"ni2\0" or 348 in sizes and block[344:348] == b"ni1\0":
        raise NiftiError(f"{path}: a NIfTI header of a .hdr/.img pair; only single-file NIfTI (.nii, .nii.gz) "
                         f"is supported")
    if 348 in sizes:
        raise NiftiError(f"{path}: not a NIfTI file (an Analyze 7.5 header without the NIfTI magic)")
    raise NiftiError(f"{path}: not a NIfTI file (no NIfTI-1 or NIfTI-2 header: sizeof_hdr is neither 348 nor "
                     f"540)")


def _check_size(path, img, file_size):
    proxy = img.dataobj
    needed = proxy.offset + int(np.prod(proxy.shape)) * proxy.dtype.itemsize
    if file_size < needed:
        raise NiftiError(f"{path}: truncated data: the header describes {proxy.shape} {proxy.dtype} voxels "
                         f"ending at byte {needed}, the file has {file_size} bytes")


def _check_real(path, stored):
    """NiftiError unless the stored voxels are real numbers: numpy would take the real part of complex data
    silently, and cannot convert RGB at all."""
    if stored.kind not in "fiub":
        what = "RGB" if stored.fields is not None else "complex" if stored.kind == "c" else str(stored)
        raise NiftiError(f"{path}: {what} voxels ({8 * stored.itemsize} bits each); "
                         f"expected real numbers (integer or float): convert them first, e.g. to a magnitude "
                         f"or luminance image (vc.io.load(path, dtype=None) reads them as stored)")


def _read_data(path, img, dtype):
    proxy = img.dataobj
    if dtype is None or dtype.kind == "f":
        data = np.asarray(proxy, dtype=dtype)
    else:
        data = _as_integers(path, np.asarray(proxy), dtype)
    if isinstance(data, np.memmap):  # astype of a memmap is an np.memmap that maps nothing: say what it is
        data = data.view(np.ndarray)
    shape = data.shape
    if data.ndim < 3:  # a single slice or line: still a volume in the affine's 3-D space
        data = data.reshape(shape + (1,) * (3 - data.ndim))
    elif data.ndim > 4:
        if any(n != 1 for n in shape[4:]):
            raise NiftiError(f"{path}: {data.ndim}-D data of shape {shape}; volconv reads 3-D and 4-D volumes")
        data = data.reshape(shape[:4])
    return data


def _as_integers(path, values, dtype):
    """Stored (scaled) values -> an integer dtype, refused unless every value is a whole number in range."""
    info = np.iinfo(dtype)
    if values.dtype.kind in "iub":
        lo, hi = (values.min(), values.max()) if values.size else (0, 0)
        exact = True
    else:
        finite = np.isfinite(values).all()
        lo, hi = (np.nanmin(values), np.nanmax(values)) if values.size and finite else (0, 0)
        exact = finite and bool(np.all(values == np.round(values)))
    if not exact or lo < info.min or hi > info.max:
        raise NiftiError(f"{path}: stored values (range {lo:g} to {hi:g}{'' if exact else ', not all whole'}) "
                         f"do not fit {dtype} exactly; load as float and convert")
    return values.astype(dtype, copy=False)


def pixdim_disagreement(affine, header):
    """pixdim's voxel sizes (as absolute values) when they disagree with the affine's beyond ZOOM_RTOL, else
    None: the one check of `load`'s warning and of the command's `info`."""
    pixdim = np.abs(np.asarray(header["pixdim"][1:4], dtype=np.float64))
    return None if np.allclose(voxel_sizes(affine), pixdim, rtol=ZOOM_RTOL, atol=0) else pixdim


def warn_geometry(path, affine, header):
    """The NiftiWarnings of a file's doubtful geometry: pixdim vs the affine, a spatial unit other than mm."""
    zooms = voxel_sizes(affine)
    pixdim = pixdim_disagreement(affine, header)
    if pixdim is not None:
        form = "sform" if header["sform_code"] > 0 else "qform"
        warnings.warn(f"{path}: voxel sizes from the affine ({form}) are {_fmt(zooms)} but pixdim says "
                      f"{_fmt(pixdim)}; volconv uses the affine's", NiftiWarning, stacklevel=3)
    unit = header.get_xyzt_units()[0]
    if unit == "mm":
        return
    if unit in _SPATIAL_UNITS:
        words, to_mm = _SPATIAL_UNITS[unit]
        warnings.warn(f"{path}: xyzt_units say the spatial unit is {words}, not mm: the voxel sizes "
                      f"{_fmt(zooms)} are in {words} ({_fmt(zooms * to_mm)} mm), but volconv reads zooms and "
                      f"the affine as mm", NiftiWarning, stacklevel=3)
    else:
        warnings.warn(f"{path}: xyzt_units give no spatial unit ({unit}); volconv assumes mm "
                      f"(voxel sizes {_fmt(zooms)})", NiftiWarning, stacklevel=3)


def _fmt(values):
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"

