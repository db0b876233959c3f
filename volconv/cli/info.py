"""`volconv info [IN ...]`: a header summary of NIfTI files (the data are not read); without files, the build
(SIMD kernels, threads, CUDA plugin)."""
import os
import sys

import numpy as np

from .._memory import size
from ..io.volume import open_header, pixdim_disagreement
from .common import Reporter, blame, debugging, unexpected


def add_parser(sub):
    """The `info` subcommand."""
    s = sub.add_parser("info", help="NIfTI header summary; without files, the kernels this machine runs "
                                    "(SIMD build, threads, CUDA)")
    s.add_argument("files", metavar="IN", nargs="*", help="NIfTI files to describe")
    s.set_defaults(run=run)


def _build_info():
    from .. import __version__, _cpu, has_cuda

    print(f"volconv {__version__}: {_cpu.SIMD} kernels, "
          f"OpenMP {'on' if _cpu.HAVE_OPENMP else 'off'}, {_cpu.max_threads()} threads, "
          f"CUDA plugin {'ready' if has_cuda() else 'not built'}")


def _file_info(path):
    import nibabel as nib
    from nibabel.affines import voxel_sizes

    path = os.fspath(path)
    with open_header(path, mmap=False) as (img, stream):   # the header only: the data are not read
        gzipped = stream is not None
    header, proxy = img.header, img.dataobj
    shape = tuple(int(n) for n in proxy.shape)
    zooms = voxel_sizes(img.affine)
    space, time_unit = header.get_xyzt_units()
    dtype = proxy.dtype
    order = {"<": "little-endian", ">": "big-endian"}.get(dtype.byteorder, "")
    if dtype.byteorder == "=":
        order = "little-endian" if sys.byteorder == "little" else "big-endian"
    slope, inter = getattr(proxy, "slope", 1.0), getattr(proxy, "inter", 0.0)
    scaled = (slope, inter) != (1.0, 0.0)
    codes = nib.nifti1.xform_codes.label
    voxels = int(np.prod(shape[:4] if len(shape) > 3 else shape))
    lines = [
        f"{path}",
        f"  format       {'NIfTI-2' if isinstance(img, nib.Nifti2Image) else 'NIfTI-1'}"
        f"{', gzip' if gzipped else ''}",
        f"  shape        {' x '.join(str(n) for n in shape)}",
        f"  zooms        {' x '.join(f'{z:g}' for z in zooms)} mm (from the affine)",
    ]
    pixdim = pixdim_disagreement(img.affine, header)
    if pixdim is not None:
        lines.append(f"  pixdim       {' x '.join(f'{z:g}' for z in pixdim)} (disagrees with the affine)")
    if len(shape) > 3:
        lines.append(f"  TR           {float(header['pixdim'][4]):g} {time_unit}")
    lines += [
        f"  dtype        {dtype.name}{', ' + order if dtype.itemsize > 1 and order else ''} (on disk)",
        f"  orientation  {''.join(c or '?' for c in nib.aff2axcodes(img.affine))}",
        "  scaling      " + (f"slope {slope:g}, intercept {inter:g}" if scaled else "none"),
        f"  sform        code {int(header['sform_code'])} ({codes[int(header['sform_code'])]})",
        f"  qform        code {int(header['qform_code'])} ({codes[int(header['qform_code'])]})",
        f"  units        {space}, {time_unit}",
        f"  memory       {size(voxels * 4)} as float32",
    ]
    return "\n".join(lines)


def run(args):
    if not args.files:
        _build_info()
        return 0
    reporter = Reporter(quiet=False)
    failed = 0
    for i, path in enumerate(args.files):
        try:
            text = _file_info(path)
        except (OSError, ValueError) as e:
            reporter.error("{}: {}".format(*blame(e, path)))
            failed += 1
            continue
        except Exception as e:   # a header nobody foresaw: one line, and on to the next file
            if debugging():
                raise
            reporter.error(unexpected(e, path))
            failed += 1
            continue
        print(("\n" if i else "") + text)
    return 1 if failed else 0
