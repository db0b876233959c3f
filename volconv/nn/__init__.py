"""PyTorch layers over volconv's kernels (torch.nn argument names and defaults; autograd on CPU)."""
from .conv import Conv3d
from .lowrank import CPConv3d, TuckerConv3d
from .sparse import SparseConv3d

__all__ = ["Conv3d", "SparseConv3d", "CPConv3d", "TuckerConv3d"]
