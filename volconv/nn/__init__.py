"""PyTorch layers over volconv's ops (torch.nn argument names and defaults; autograd on CPU and CUDA)."""
from .blocks import ChannelAttention3d, Res2Block3d
from .blocks import ChannelSpatialAttention3d, SpatialAttention3d
from .conv import Conv3d
from .convert import ConversionReport, convert
from .dynamic import DynamicConv3d
from .lowrank import CPConv3d, TuckerConv3d
from .nested import MultiScaleConv3d, NestedConv3d
from .pac import PacConv3d
from .sparse import SparseConv3d
from .symmetric import SymmetricConv3d
from .variable import VariableKernelConv3d

__all__ = ["Conv3d", "SparseConv3d", "CPConv3d", "TuckerConv3d", "NestedConv3d", "MultiScaleConv3d", "DynamicConv3d",
           "VariableKernelConv3d", "PacConv3d", "Res2Block3d", "ChannelAttention3d", "convert",
           "ConversionReport", "SymmetricConv3d", "SpatialAttention3d", "ChannelSpatialAttention3d"]
