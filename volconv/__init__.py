"""volconv: fast 3D convolution for medical volumes and PyTorch 3D models.

`import volconv` needs numpy and scipy only; `volconv.nn` (PyTorch layers) is imported on first use and needs
torch."""
from . import kernels
from ._cuda import has_cuda
from .kernels import SeparableKernel
from .ops.dense import conv3d, convolve, correlate

__version__ = "0.1.0"
__all__ = ["conv3d", "correlate", "convolve", "has_cuda", "kernels", "SeparableKernel", "nn"]


def __getattr__(name):
    if name == "nn":  # lazy: torch is optional
        import importlib

        return importlib.import_module(".nn", __name__)
    raise AttributeError(f"module 'volconv' has no attribute {name!r}")
