"""vc.nn.Conv3d: torch.nn.Conv3d (same arguments, defaults, parameters and state_dict) run by volconv."""
import math

import torch

from ..ops.conv import conv3d


def reset_conv_parameters(weight, bias):
    """torch.nn.Conv3d's initialisation of a (out, in/groups, kd, kh, kw) weight and its bias (or None)."""
    torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        bound = 1 / math.sqrt(weight[0].numel())
        torch.nn.init.uniform_(bias, -bound, bound)


class Conv3d(torch.nn.Conv3d):
    """torch.nn.Conv3d whose forward and backward run volconv's kernels.

    Takes torch.nn.Conv3d's arguments, plus keyword-only ``algorithm`` ("auto", "direct", "fft", "torch")
    and ``workers`` (threads; None: all OpenMP allows)."""

    def __init__(self, *args, algorithm="auto", workers=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.algorithm, self.workers = algorithm, workers

    @classmethod
    def from_conv(cls, conv, *, algorithm="auto", workers=None):
        """A volconv Conv3d with a trained torch.nn.Conv3d's configuration and (shared) parameters."""
        if not isinstance(conv, torch.nn.Conv3d):
            raise TypeError(f"conv must be a torch.nn.Conv3d, got {type(conv).__name__}")
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                  padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                  padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype,
                  algorithm=algorithm, workers=workers)
        new.weight = conv.weight
        new.bias = conv.bias
        return new

    def forward(self, input):
        return conv3d(input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups,
                      padding_mode=self.padding_mode, algorithm=self.algorithm, workers=self.workers)

    def extra_repr(self):
        s = super().extra_repr()
        if self.algorithm != "auto":
            s += f", algorithm={self.algorithm!r}"
        if self.workers is not None:
            s += f", workers={self.workers}"
        return s
