"""PyTorch layers over volconv's kernels (torch.nn argument names and defaults; autograd on CPU)."""
from .conv import Conv3d
from .sparse import SparseConv3d

__all__ = ["Conv3d", "SparseConv3d"]
