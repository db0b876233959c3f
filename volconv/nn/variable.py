"""vc.nn.VariableKernelConv3d: a 3D convolution layer that stores one kernel of the largest size and convolves
at any smaller size chosen per call, from a centred crop or a trilinear resampling of that kernel (kernel-size
search, or MedNeXt's UpKern, which resamples small trained kernels to larger ones)."""

import torch

from .._validate import triple
from ..ops.conv import conv3d
from .conv import reset_conv_parameters
from .._validate import positive_int

RESIZE_MODES = ("crop", "interpolate")


class VariableKernelConv3d(torch.nn.Module):
    """A convolution whose kernel size is chosen at each call, up to ``max_kernel_size``.

    One weight parameter of shape (out_channels, in_channels // groups, *max_kernel_size) is stored and trained;
    a call with ``kernel_size=k`` convolves with the weight ``weight_for(k)`` makes from it:

    resize="crop"         the centred k sub-block (max_kernel_size - k must be even on every axis);
    resize="interpolate"  ``F.interpolate(weight, size=k, mode="trilinear", align_corners=True)``, as MedNeXt's
                          UpKern resamples kernels (the corner taps map onto the corner taps, so an axis of
                          size 1 takes the first tap, not the centre).

    Both are torch ops, so the gradient reaches the stored weight (for a crop, only its centred block).
    ``padding="same"`` (the default) is torch's 'same' for the kernel size of each call, so the output keeps
    the input's size whatever the kernel; an int or triple is used as given, "valid" means none. Other
    arguments are torch.nn.Conv3d's (zero padding only), plus keyword-only ``algorithm`` and ``workers`` for
    vc.conv3d."""

    def __init__(self, in_channels, out_channels, max_kernel_size, stride=1, padding="same", dilation=1, groups=1,
                 bias=True, resize="crop", *, algorithm="auto", workers=None, device=None, dtype=None):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
            positive_int(value, name)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels ({in_channels}) and out_channels "
                             f"({out_channels})")
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {', '.join(map(repr, RESIZE_MODES))}, got {resize!r}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.max_kernel_size = triple(max_kernel_size, "max_kernel_size", minimum=1)
        self.stride = triple(stride, "stride", minimum=1)
        self.dilation = triple(dilation, "dilation", minimum=1)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding must be 'same', 'valid', an int or a triple, got {padding!r}")
            if padding == "same" and self.stride != (1, 1, 1):
                # as torch.nn.Conv3d: the output of a strided 'same' convolution has no single right size
                raise ValueError(f"padding='same' is not supported with stride > 1 (as in torch), got stride "
                                 f"{self.stride}")
            self.padding = padding
        else:
            self.padding = triple(padding, "padding", minimum=0)
        self.resize, self.algorithm, self.workers = resize, algorithm, workers
        factory = {"device": device, "dtype": dtype}
        self.weight = torch.nn.Parameter(torch.empty((out_channels, in_channels // groups) + self.max_kernel_size,
                                                     **factory))
        self.bias = torch.nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        """torch.nn.Conv3d's initialisation, for the largest kernel (the fan-in of the stored weight)."""
        reset_conv_parameters(self.weight, self.bias)

    def _kernel_size(self, kernel_size):
        """kernel_size (None: the largest) -> a checked triple."""
        if kernel_size is None:
            return self.max_kernel_size
        k = triple(kernel_size, "kernel_size", minimum=1)
        if any(a > b for a, b in zip(k, self.max_kernel_size)):
            raise ValueError(f"kernel_size {kernel_size!r} exceeds max_kernel_size {self.max_kernel_size} on some "
                             "axis")
        if self.resize == "crop" and any((b - a) % 2 for a, b in zip(k, self.max_kernel_size)):
            raise ValueError(f"kernel_size {kernel_size!r} has no centred crop of max_kernel_size "
                             f"{self.max_kernel_size}: with resize='crop' the difference must be even on every "
                             "axis (odd sizes from an odd maximum, even from an even one)")
        return k

    def weight_for(self, kernel_size=None):
        """The weight a call with this kernel size convolves with, (out_channels, in_channels // groups, *k):
        differentiable with respect to the stored weight."""
        k = self._kernel_size(kernel_size)
        if k == self.max_kernel_size:
            return self.weight
        if self.resize == "crop":
            (d0, h0, w0) = ((m - n) // 2 for m, n in zip(self.max_kernel_size, k))
            return self.weight[:, :, d0:d0 + k[0], h0:h0 + k[1], w0:w0 + k[2]]
        return torch.nn.functional.interpolate(self.weight, size=k, mode="trilinear", align_corners=True)

    def forward(self, input, kernel_size=None):
        return conv3d(input, self.weight_for(kernel_size), self.bias, self.stride, self.padding, self.dilation,
                      self.groups, algorithm=self.algorithm, workers=self.workers)

    def extra_repr(self):
        s = f"{self.in_channels}, {self.out_channels}, max_kernel_size={self.max_kernel_size}"
        if self.stride != (1, 1, 1):
            s += f", stride={self.stride}"
        if self.padding != "same":
            s += f", padding={self.padding!r}"
        if self.dilation != (1, 1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.resize != "crop":
            s += f", resize={self.resize!r}"
        if self.algorithm != "auto":
            s += f", algorithm={self.algorithm!r}"
        if self.workers is not None:
            s += f", workers={self.workers}"
        return s
