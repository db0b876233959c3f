"""`volconv deconvolve IN OUT --psf PSF --iterations N`: Richardson-Lucy deconvolution of one NIfTI volume (3-D,
or 4-D volume by volume) by vc.restoration.richardson_lucy, its geometry and header kept."""
import argparse
import time

import numpy as np

from .. import io
from .common import EXIT_STATUS, CommandError, Reporter, blame, check_distinct, check_output, debugging, \
    positive, unexpected
from .options import add_output_options, nifti_output, read_kernel_file


def add_parser(sub):
    """The `deconvolve` subcommand and its options."""
    s = sub.add_parser("deconvolve", help="Richardson-Lucy deconvolution of a NIfTI volume by a PSF",
                       description="Richardson-Lucy deconvolution of a NIfTI volume (3-D, or 4-D volume by "
                                   "volume) by a point-spread function, with scikit-image's results "
                                   "(skimage.restoration.richardson_lucy), keeping the volume's geometry and "
                                   "header. The volume is processed whole, in float32 (no slabs): it must fit in "
                                   "memory with its FFT buffers. Example: volconv deconvolve stack.nii.gz "
                                   "stack_rl.nii.gz --psf psf.npy --iterations 20 --no-clip",
                       epilog=EXIT_STATUS)
    s.add_argument("input", metavar="IN", help="input NIfTI file (.nii or .nii.gz)")
    s.add_argument("output", metavar="OUT", help="output NIfTI file (.nii or .nii.gz; without either, .nii.gz is "
                                                 "added); refused if it exists, unless --force, and if it is IN "
                                                 "or --psf")
    s.add_argument("--psf", required=True, metavar="PSF",
                   help="the point-spread function, .npy or NIfTI (.nii, .nii.gz): its 3-D array in voxels of IN's "
                        "grid (array axes i, j, k as IN's; a NIfTI PSF's own voxel sizes are not used), no larger "
                        "than IN, non-negative; centred on its middle voxel (an even side as "
                        "scipy.signal.convolve's 'same'); not normalised (make it sum to 1 to keep the intensity)")
    s.add_argument("--iterations", type=positive(int), required=True, metavar="N",
                   help="Richardson-Lucy iterations (scikit-image's default is 50; fewer regularise more)")
    s.add_argument("--no-clip", dest="clip", action="store_false",
                   help="keep the result's intensity scale: by default it is clipped to [-1, 1] as scikit-image "
                        "does, which suits intensities scaled into [0, 1] only")
    s.add_argument("--filter-epsilon", type=_non_negative, metavar="E", default=None,
                   help="where the blurred estimate is below E, the ratio IN / blurred is 0 (no division by tiny "
                        "values); default: no filtering")
    s.add_argument("--algorithm", choices=("auto", "direct", "fft"), default="auto",
                   help="how the convolutions run: direct (small PSFs), fft (large PSFs) or auto (the cost model "
                        "chooses; default)")
    add_output_options(s)
    s.add_argument("--force", action="store_true", help="overwrite an existing output file")
    s.add_argument("--quiet", "-q", action="store_true", help="no log lines on stderr")
    s.set_defaults(run=run, parser=s)


def _non_negative(text):
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a finite number >= 0")
    return value


def run(args):
    reporter = Reporter(args.quiet)
    src, dst, psf_path = args.input, nifti_output(args.parser, args.output), args.psf
    start = time.perf_counter()
    try:
        check_distinct([("IN", src), ("--psf", psf_path)], [("OUT", dst)])
        check_output(dst, args.force)
        psf = read_kernel_file(psf_path, "PSF").to_dense()
        vol = _load(src)
        out = _deconvolve(vol.data, psf, args, src, psf_path)
        _save(vol.with_data(out), src, dst, args)
    except CommandError as e:
        reporter.error(e)
        return 1
    mismatch = _psf_zooms_differ(psf_path, vol.zooms)
    if mismatch:
        reporter.log(f"volconv: warning: {psf_path} has voxel sizes {mismatch} mm but {src} has "
                     f"{_mm(vol.zooms)} mm: the PSF was applied in {src}'s voxels, as given")
    if args.clip and float(np.max(vol.data)) > 1:
        reporter.log(f"volconv: warning: {src} has values above 1 and the result was clipped to [-1, 1] as "
                     "scikit-image does; pass --no-clip to keep the intensity scale")
    shape = "x".join(str(n) for n in psf.shape)
    volumes = f", {vol.data.shape[3]} volumes" if vol.data.ndim == 4 else ""
    reporter.log(f"volconv: {src} -> {dst}: Richardson-Lucy, {args.iterations} iterations, PSF {psf_path} ({shape} "
                 f"voxels){', clipped to [-1, 1]' if args.clip else ''}{volumes}, "
                 f"{time.perf_counter() - start:.2f} s")
    return 0


def _mm(zooms):
    return "x".join(f"{z:g}" for z in zooms)


def _psf_zooms_differ(path, zooms):
    """A NIfTI PSF's voxel sizes (from its affine) when they differ from the volume's, else None."""
    if path.lower().endswith(".npy"):
        return None
    import nibabel
    from nibabel.affines import voxel_sizes

    try:
        own = tuple(float(z) for z in voxel_sizes(nibabel.load(path).affine))
    except Exception:   # read once already (read_kernel_file); a header that cannot tell is not worth a failure
        return None
    return None if np.allclose(own, zooms, rtol=io.ZOOM_RTOL, atol=0) else _mm(own)


def _load(src):
    try:
        return io.load(src)
    except (OSError, ValueError) as e:   # NiftiError is a ValueError
        raise CommandError(*blame(e, src)) from None


def _deconvolve(data, psf, args, src, psf_path):
    """Each 3-D volume of data deconvolved; a problem named after the file it lies in (the PSF's or IN)."""
    from .. import restoration

    volumes = [data] if data.ndim == 3 else [data[..., t] for t in range(data.shape[3])]
    out = np.empty(data.shape, np.float32)
    try:
        for t, v in enumerate(volumes):
            result = restoration.richardson_lucy(v, psf, args.iterations, args.clip, args.filter_epsilon,
                                                 workers=args.workers, algorithm=args.algorithm)
            if data.ndim == 3:
                out[...] = result
            else:
                out[..., t] = result
    except MemoryError as e:
        raise CommandError(src, f"not enough memory to deconvolve it: {e}") from None
    except ValueError as e:
        raise CommandError(psf_path if str(e).startswith("psf") else src, str(e)) from None
    except Exception as e:
        if debugging():
            raise
        raise unexpected(e, src) from e
    return out


def _save(vol, src, dst, args):
    from .filter import failure

    try:
        io.save(vol, dst, dtype=args.odt, overwrite=args.force, workers=args.workers)
    except (OSError, ValueError) as e:
        raise CommandError(*failure(e, src, dst)) from None
