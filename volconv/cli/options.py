"""The options `filter` and `batch` share: the kernel they name (`KernelChoice`, built per file from its voxel
sizes), the filtering options, the output's name, and the combinations argparse cannot check."""
import os

from .._validate import SCIPY_MODES
from ..io import NAN_RULES
from ..io.writer import NIFTI_EXTENSIONS, SAVE_DTYPES
from .common import CommandError, blame, memory_size, positive, scales_type, size_type, workers_type

DEFAULT_EXTENSION = ".nii.gz"  # added to an OUT without one, as fslmaths does (FSLOUTPUTTYPE=NIFTI_GZ)
# names of other volume formats: refused rather than extended (o.img -> o.img.nii.gz is surely not meant)
OTHER_FORMATS = (".img", ".hdr", ".gz", ".mgz", ".mgh", ".nrrd", ".nhdr", ".mnc", ".npy", ".npz")
OUTPUT_DTYPES = tuple(d.name for d in SAVE_DTYPES)   # what vc.io.save writes
# Kernel options: exactly one per filter/batch call. dest -> (flag, metavar, what it is)
KERNEL_OPTIONS = {
    "gaussian": ("--gaussian", "SIGMA", "Gaussian of standard deviation SIGMA (scipy.ndimage.gaussian_filter)"),
    "fwhm": ("--fwhm", "FWHM", "Gaussian given by its full width at half maximum (FWHM = 2.3548 sigma)"),
    "sigma_vox": ("--sigma-vox", "SIGMA", "Gaussian with SIGMA in voxels (a bare number means voxels here)"),
    "box": ("--box", "SIZE", "mean over a box of SIZE: in mm, the voxels whose centres lie within SIZE/2 of the centre "
                           "(fslmaths -kernel box: odd, centred); in voxels, round(SIZE)"),
    "ball": ("--ball", "RADIUS", "mean over the voxels within RADIUS of the centre (fslmaths -kernel sphere)"),
    "kernel": ("--kernel", "FILE", "a kernel stored as .npy or NIfTI (its values, in voxels; correlated, "
                                   "not flipped)"),
    "sigma_map": ("--sigma-map", "MAP", "spatially varying Gaussian: a NIfTI map (the volume's grid) of sigma in "
                                        "mm per voxel (vc.adaptive_filter; --truncate default 3; filter only)"),
    "bilateral": ("--bilateral", "SIGMA", "edge-preserving bilateral filter: a spatial Gaussian of SIGMA times a "
                                          "Gaussian of width --range on intensity differences (vc.bilateral_filter; "
                                          "--guide G: differences read in G instead; --truncate default 3)"),
    "frangi": ("--frangi", "SCALES", "Frangi vesselness (vc.filters.frangi, scikit-image's numbers) over the scales "
                                     "FROM:TO:COUNT (sigmas evenly spaced, e.g. 1:4:4mm) or S1,S2,... (in mm "
                                     "unless suffixed vox); see --bright-ridges (filter only)"),
    "sato": ("--sato", "SCALES", "Sato tubeness (vc.filters.sato), scales as --frangi (filter only)"),
    "meijering": ("--meijering", "SCALES", "Meijering neuriteness (vc.filters.meijering), scales as --frangi "
                                           "(filter only)"),
}
GAUSSIANS = ("gaussian", "fwhm", "sigma_vox", "sigma_map", "bilateral")
VESSELNESS = ("frangi", "sato", "meijering")


class KernelChoice:
    """The kernel the options ask for, built per file from its voxel sizes (a size in mm becomes voxels
    there), remembering the last one built so that the log can say what was applied."""

    def __init__(self, args):
        self.kind = next(k for k in KERNEL_OPTIONS if getattr(args, k) is not None)
        self.arg = getattr(args, self.kind)
        self.truncate = (3.0 if self.kind == "bilateral" else 4.0) if args.truncate is None else args.truncate
        self.range, self.guide = getattr(args, "range", None), getattr(args, "guide", None)
        self.fixed = None
        if self.kind == "kernel":
            self.fixed = read_kernel_file(self.arg, "kernel")
        self.zooms = self.kernel = None

    def __call__(self, zooms):
        from .. import kernels

        size = self.arg
        mm = getattr(size, "unit", None) == "mm"
        on = zooms if mm else None
        if self.kind in ("gaussian", "sigma_vox"):   # (sigma_vox: in voxels, so `on` is None)
            kernel = kernels.gaussian(size.values, on, self.truncate)
        elif self.kind == "fwhm":
            kernel = kernels.gaussian(None, on, self.truncate, fwhm=size.values)
        elif self.kind == "box":
            kernel = kernels.box(size.values, on)
        elif self.kind == "ball":
            kernel = kernels.ball(size.values, on)
        elif self.kind == "bilateral":   # vc.Bilateral's sigma is in mm: voxels times the voxel sizes
            from ..ops.bilateral import Bilateral

            sigma_mm = size.values if mm else tuple(v * z for v, z in zip(size.values, zooms))
            kernel = Bilateral(sigma_mm, self.range, guide=self.guide, truncate=self.truncate)
        else:
            kernel = self.fixed
        self.zooms, self.kernel = tuple(zooms), kernel
        return kernel

    def describe(self):
        """What was applied to the last file: sizes in voxels per axis (the effective sigma for a Gaussian)
        and the kernel's shape."""
        from ..kernels import FWHM_PER_SIGMA, SeparableKernel

        if self.kind == "bilateral":
            radii = self.kernel.radii(self.zooms)
            per_axis = ", ".join(f"{v:.4g}" for v in self.arg.voxels(self.zooms))
            guide = "" if self.guide is None else f", guide {self.guide}"
            return (f"bilateral {self.arg}: sigma {per_axis} voxels per axis, range {self.range:g}{guide}, "
                    f"truncate {self.truncate:g}, window {'x'.join(str(2 * r + 1) for r in radii)}")
        shape = "x".join(str(n) for n in self.kernel.shape)
        kind = "separable" if isinstance(self.kernel, SeparableKernel) else "dense"
        if self.kind == "kernel":
            return f"kernel from {self.arg}, shape {shape}"
        vox = self.arg.voxels(self.zooms)
        if self.kind == "fwhm":
            vox = tuple(v / FWHM_PER_SIGMA for v in vox)
        per_axis = ", ".join(f"{v:.4g}" for v in vox)
        name = {"gaussian": f"gaussian {self.arg}", "sigma_vox": f"gaussian {self.arg}",
                "fwhm": f"gaussian of FWHM {self.arg}",
                "box": f"box {self.arg}", "ball": f"ball of radius {self.arg}"}[self.kind]
        if self.kind in GAUSSIANS:
            detail = f"sigma {per_axis} voxels per axis, truncate {self.truncate:g}"
        elif self.kind == "box":
            detail = f"{per_axis} voxels per axis"
        else:
            detail = f"radius {per_axis} voxels per axis"
        return f"{name}: {detail}, kernel {shape} ({kind})"


def read_kernel_file(path, what):
    """The kernel stored in `path` (.npy or NIfTI: vc.kernels.from_file), its values read; a CommandError naming
    the file otherwise ("<what> file does not exist", "not a usable <what> file: ...")."""
    from .. import kernels

    if not os.path.exists(path):
        raise CommandError(path, f"{what} file does not exist")
    try:
        kernel = kernels.from_file(path)
        kernel.to_dense()
    except Exception as e:  # np.load and nibabel raise many types for unreadable files
        problem = blame(e, path)[1]
        raise CommandError(path, problem if path in problem else f"not a usable {what} file: {problem}") from None
    return kernel


def nifti_output(parser, out):
    """OUT as written: a name without .nii / .nii.gz gets DEFAULT_EXTENSION (as fslmaths); another format's
    extension is refused through `parser` (exit 2)."""
    if out.lower().endswith(NIFTI_EXTENSIONS):
        return out
    if out.lower().endswith(OTHER_FORMATS):
        parser.error(f"{out}: the output file name must end in .nii or .nii.gz (or have no extension: "
                     f"{DEFAULT_EXTENSION} is added)")
    return out + DEFAULT_EXTENSION


def add_output_options(group):
    """--odt and --workers, as every command that writes a volume has them."""
    group.add_argument("--odt", choices=OUTPUT_DTYPES, default="float32",
                       help="output data type (default float32; integers are rounded and clipped)")
    group.add_argument("--workers", type=workers_type, metavar="N",
                       help="threads (default: all OpenMP allows; -1 all cores, -2 all but one)")


def add_filter_options(p, preview):
    k = p.add_argument_group("kernel (exactly one; sizes in mm unless suffixed vox: 2mm, 2, 1.5vox, 2,2,3mm "
                             "for array axes i,j,k)")
    group = k.add_mutually_exclusive_group(required=True)
    for dest, (flag, metavar, help_text) in KERNEL_OPTIONS.items():
        if dest in ("kernel", "sigma_map"):
            kind = str
        elif dest in VESSELNESS:
            kind = scales_type
        elif dest == "sigma_vox":
            kind = size_type(default_unit="vox", units=("vox",))
        else:
            kind = size_type(positive=dest in ("box", "ball"))
        group.add_argument(flag, dest=dest, metavar=metavar, type=kind, help=help_text)
    k.add_argument("--truncate", type=positive(float), metavar="T",
                   help="Gaussian radius in sigmas, as scipy.ndimage (default 4; 3 for --sigma-map and --bilateral)")
    k.add_argument("--range", type=positive(float), metavar="R",
                   help="--bilateral: the range Gaussian's sigma, in the volume's (or --guide's) intensity units; "
                        "required with it")
    k.add_argument("--guide", metavar="G",
                   help="--bilateral: a NIfTI volume on the same grid whose intensities steer the smoothing (joint "
                        "bilateral: a T1 guiding a noisy PET or DWI volume; filter only)")
    r = k.add_mutually_exclusive_group()
    r.add_argument("--bright-ridges", dest="black_ridges", action="store_false", default=None,
                   help="--frangi/--sato/--meijering: enhance bright vessels on a dark background (contrast-"
                        "enhanced CT or MR angiography, TOF MRA)")
    r.add_argument("--black-ridges", dest="black_ridges", action="store_true",
                   help="... dark vessels on a bright background: the default, as in scikit-image (whose "
                        "black_ridges=True this keeps, so that the command and vc.filters agree)")
    k.add_argument("--alpha", type=float, metavar="A",
                   help="--frangi: plate sensitivity (default 0.5); --meijering: the eigenvalue mix (default 0.25)")
    k.add_argument("--beta", type=positive(float), metavar="B", help="--frangi: blob sensitivity (default 0.5)")
    k.add_argument("--gamma", type=positive(float), metavar="G",
                   help="--frangi: structure sensitivity (default: half the largest Hessian norm at the first "
                        "scale, scikit-image's rule)")
    o = p.add_argument_group("filtering")
    o.add_argument("--mode", choices=SCIPY_MODES, default="reflect",
                   help="how the volume extends beyond its edges, as scipy.ndimage (default reflect)")
    o.add_argument("--cval", type=float, default=0.0, help="value outside the volume for --mode constant")
    o.add_argument("--mask", metavar="MASK",
                   help="NIfTI mask of the same grid (non-zero = inside): voxels outside do not contribute")
    o.add_argument("--normalize", action="store_true",
                   help="divide by the filtered mask, renormalising at the volume edge and the mask border "
                        "(fslmaths -fmean; --mode then plays no part)")
    o.add_argument("--outside", choices=("keep", "zero"), default=None,
                   help="voxels outside --mask: keep their input value (default) or set them to 0")
    o.add_argument("--nan", choices=NAN_RULES, default=None,
                   help="non-finite input voxels (NaN, Inf): spread through the kernel (propagate, default; a "
                        "warning says when they did), read as 0 (zero, as fslmaths -nan), or left out as if "
                        "outside the mask (mask; --outside then says what they become)")
    o.add_argument("--max-memory", type=memory_size, metavar="SIZE", default=None,
                   help="working memory per file (512MiB, 1GB, 2G; default 512MiB): larger volumes are "
                        "filtered in slabs")
    add_output_options(o)
    o.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where to filter: cpu (default) or cuda (the CUDA plugin on a GPU, slab by slab)")
    o.add_argument("--force", action="store_true", help="overwrite existing output files")
    if preview:
        o.add_argument("--preview", metavar="PNG",
                       help="also write orthogonal mid-slices of the input and the output as a PNG")
    o.add_argument("--quiet", "-q", action="store_true", help="no log lines or progress bar on stderr")


def check_filter_args(sub, args):
    """Combinations argparse cannot express (exit 2 like its own errors); `sub` is the subcommand's parser."""
    if args.truncate is not None and not any(getattr(args, k) is not None for k in GAUSSIANS):
        sub.error("--truncate applies to a Gaussian (--gaussian, --fwhm, --sigma-vox, --sigma-map, --bilateral)")
    if args.bilateral is not None and args.range is None:
        sub.error("--bilateral needs --range R (the range Gaussian's sigma, in intensity units)")
    if args.bilateral is None and (args.range is not None or args.guide is not None):
        sub.error(f"{'--range' if args.range is not None else '--guide'} applies to --bilateral")
    if args.guide is not None and args.command != "filter":
        sub.error("--guide applies to `volconv filter` (one guide for one volume's grid)")
    if getattr(args, "skip_existing", False) and args.force:
        sub.error("--skip-existing keeps existing outputs, --force replaces them: give one")
    if args.outside is not None and args.mask is None and args.nan != "mask":
        sub.error("--outside needs --mask (or --nan mask)")
    if getattr(args, "sigma_map", None) is not None:
        if args.command != "filter":
            sub.error("--sigma-map applies to `volconv filter` (one map for one volume's grid)")
        if args.mask is not None or args.normalize or args.nan is not None:
            sub.error("--sigma-map does not combine with --mask, --normalize or --nan")
    vessel = next((v for v in VESSELNESS if getattr(args, v, None) is not None), None)
    if vessel is None and (args.black_ridges is not None or args.alpha is not None or args.beta is not None
                           or args.gamma is not None):
        sub.error("--bright-ridges, --black-ridges, --alpha, --beta and --gamma apply to --frangi, --sato or "
                  "--meijering")
    if vessel is not None:
        if args.command != "filter":
            sub.error(f"--{vessel} applies to `volconv filter`")
        if args.mask is not None or args.normalize or args.nan is not None or args.device != "cpu":
            sub.error(f"--{vessel} does not combine with --mask, --normalize, --nan or --device cuda")
        if (args.beta is not None or args.gamma is not None) and vessel != "frangi" or \
                args.alpha is not None and vessel == "sato":
            sub.error(f"--{vessel} takes none of {'--alpha, ' if vessel == 'sato' else ''}--beta, --gamma")
    args.outside = args.outside or "keep"
    args.nan = args.nan or "propagate"
    if getattr(args, "output", None) is not None:
        args.output = nifti_output(sub, args.output)
