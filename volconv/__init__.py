"""volconv: fast 3D convolution for medical volumes and PyTorch 3D models.

`import volconv` needs numpy and scipy only; `volconv.nn` (PyTorch layers, needs torch) and `volconv.io` (NIfTI,
nibabel) are imported on first use."""
from . import kernels
from ._cuda import has_cuda
from .kernels import SeparableKernel
from .ops.bilateral import Bilateral, bilateral_filter
from .ops.conv import conv3d
from .ops.filtering import convolve, correlate
from .ops import multiscale, nested
from .ops.lowrank import cp_conv3d, tucker_conv3d
from .ops.dynamic import adaptive_filter, dynamic_conv3d
from .ops.multiscale import multiscale_conv3d
from .ops.nested import nested_conv3d
from .ops.sparse import SparseKernel, sparse_conv3d

__version__ = "0.1.0"
__all__ = ["conv3d", "correlate", "convolve", "has_cuda", "kernels", "SeparableKernel", "SparseKernel",
           "sparse_conv3d", "cp_conv3d", "tucker_conv3d", "nested_conv3d", "nested", "multiscale_conv3d",
           "multiscale", "dynamic_conv3d", "adaptive_filter", "bilateral_filter", "Bilateral", "decompose", "restoration", "CPKernel", "TuckerKernel", "nn", "io",
           "dask", "Volume", "filter_nifti"]


def __getattr__(name):
    """Lazy submodules: `nn` needs torch and `dask` dask (optional), `io` imports nibabel and `decompose`
    tensorly (slow to import); `restoration` on first use, like them."""
    import importlib

    if name in ("nn", "io", "dask", "decompose", "restoration"):
        return importlib.import_module(f".{name}", __name__)
    if name in ("Volume", "filter_nifti"):
        return getattr(importlib.import_module(".io", __name__), name)
    if name in ("CPKernel", "TuckerKernel"):
        return getattr(importlib.import_module(".decompose", __name__), name)
    raise AttributeError(f"module 'volconv' has no attribute {name!r}")
