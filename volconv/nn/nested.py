"""vc.nn.NestedConv3d (a chain of 'same' convolutions, large kernel first, in one fused pass) and
vc.nn.MultiScaleConv3d (parallel branches of different kernel sizes and dilations, one merged convolution)."""
import torch

from .._validate import triple
from .conv import reset_conv_parameters
from ..ops.multiscale import COMBINES, multiscale_conv3d
from ..ops.nested import ACTIVATIONS, nested_conv3d
from .._validate import positive_int


def _conv_parameters(out_channels, in_per_group, kernel_size, bias, factory):
    """A weight (and bias) initialised as torch.nn.Conv3d initialises its own."""
    w = torch.nn.Parameter(torch.empty((out_channels, in_per_group) + kernel_size, **factory))
    b = torch.nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
    reset_conv_parameters(w, b)
    return w, b


def _kernel_sizes(kernel_sizes, what):
    """One checked triple per stage / branch."""
    if isinstance(kernel_sizes, int) or not kernel_sizes:
        raise ValueError(f"kernel_sizes must be a non-empty sequence (one per {what}), got {kernel_sizes!r}")
    return [triple(k, f"kernel_sizes[{i}]", minimum=1) for i, k in enumerate(kernel_sizes)]


class NestedConv3d(torch.nn.Module):
    """Stages of 'same' convolutions (stride 1, zero padding), kernel_sizes[0] first, `activation` between
    them, `groups` on every stage; channels: the output channels of every stage (an int) or of each stage (a
    sequence). Runs vc.nested_conv3d: one pass without full-size intermediates; backward recomputes them slab by
    slab (on a GPU: the fused kernel for depthwise chains, groups == channels; others stage by stage).
    Parameters: weights[i], biases[i] (torch.nn.Conv3d's initialisation)."""

    def __init__(self, in_channels, channels, kernel_sizes=(7, 3), activation="relu", groups=1, bias=True, *,
                 algorithm="auto", workers=None, device=None, dtype=None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of None, 'relu', 'gelu', 'silu', got {activation!r}")
        sizes = _kernel_sizes(kernel_sizes, "stage")
        chans = [channels] * len(sizes) if isinstance(channels, int) else list(channels)
        if len(chans) != len(sizes):
            raise ValueError(f"channels must be an int or one per stage ({len(sizes)}), got {channels!r}")
        positive_int(in_channels, "in_channels")
        positive_int(groups, "groups")
        for i, c in enumerate([in_channels] + chans):
            positive_int(c, "in_channels" if i == 0 else f"channels[{i - 1}]")
            if c % groups:
                raise ValueError(f"groups={groups} must divide every stage's channels, got {[in_channels] + chans}")
        factory = {"device": device, "dtype": dtype or torch.get_default_dtype()}
        self.in_channels, self.channels, self.kernel_sizes = in_channels, tuple(chans), tuple(sizes)
        self.activation, self.groups, self.algorithm, self.workers = activation, groups, algorithm, workers
        self.weights, self.biases = torch.nn.ParameterList(), torch.nn.ParameterList() if bias else None
        cin = in_channels
        for c, k in zip(chans, sizes):
            w, b = _conv_parameters(c, cin // groups, k, bias, factory)
            self.weights.append(w)
            if bias:
                self.biases.append(b)
            cin = c

    @property
    def out_channels(self):
        return self.channels[-1]

    def forward(self, input):
        biases = list(self.biases) if self.biases is not None else None
        return nested_conv3d(input, list(self.weights), biases, self.activation, self.groups,
                             algorithm=self.algorithm, workers=self.workers)

    def extra_repr(self):
        s = f"{self.in_channels}, {self.channels}, kernel_sizes={self.kernel_sizes}, activation={self.activation!r}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.biases is None:
            s += ", bias=False"
        if self.algorithm != "auto":
            s += f", algorithm={self.algorithm!r}"
        return s


class MultiScaleConv3d(torch.nn.Module):
    """Parallel branches with kernel_sizes[i] and dilations[i] ('same' zero padding each) on one input, combined
    by "concat" (out_channels_per_branch x branches channels) or "sum" (out_channels_per_branch). Runs
    vc.multiscale_conv3d: one convolution with the merged kernel (dense or sparse by the cost model; on a GPU
    with groups == in_channels, one fused pass reading the input once for every branch).
    Parameters: weights[i], biases[i]."""

    def __init__(self, in_channels, out_channels_per_branch, kernel_sizes=(3, 5, 7), dilations=None,
                 combine="concat", groups=1, bias=True, *, algorithm="auto", workers=None, device=None, dtype=None):
        super().__init__()
        if combine not in COMBINES:
            raise ValueError(f"combine must be 'concat' or 'sum', got {combine!r}")
        sizes = _kernel_sizes(kernel_sizes, "branch")
        dilations = [1] * len(sizes) if dilations is None else list(dilations)
        if len(dilations) != len(sizes):
            raise ValueError(f"dilations must hold one entry per branch ({len(sizes)}), got {len(dilations)}")
        for value, name in ((in_channels, "in_channels"), (out_channels_per_branch, "out_channels_per_branch"),
                            (groups, "groups")):
            positive_int(value, name)
        if in_channels % groups or out_channels_per_branch % groups:
            raise ValueError(f"groups={groups} must divide in_channels ({in_channels}) and out_channels_per_branch "
                             f"({out_channels_per_branch})")
        factory = {"device": device, "dtype": dtype or torch.get_default_dtype()}
        self.in_channels, self.out_channels_per_branch = in_channels, out_channels_per_branch
        self.kernel_sizes = tuple(sizes)
        self.dilations = tuple(triple(d, f"dilations[{i}]", minimum=1) for i, d in enumerate(dilations))
        self.combine, self.groups, self.algorithm, self.workers = combine, groups, algorithm, workers
        self.out_channels = out_channels_per_branch * (len(sizes) if combine == "concat" else 1)
        self.weights, self.biases = torch.nn.ParameterList(), torch.nn.ParameterList() if bias else None
        for k in sizes:
            w, b = _conv_parameters(out_channels_per_branch, in_channels // groups, k, bias, factory)
            self.weights.append(w)
            if bias:
                self.biases.append(b)

    def forward(self, input):
        biases = list(self.biases) if self.biases is not None else None
        return multiscale_conv3d(input, list(self.weights), self.dilations, self.groups, self.combine, biases,
                                 algorithm=self.algorithm, workers=self.workers)

    def extra_repr(self):
        s = f"{self.in_channels}, {self.out_channels_per_branch}, kernel_sizes={self.kernel_sizes}"
        if any(d != (1, 1, 1) for d in self.dilations):
            s += f", dilations={self.dilations}"
        s += f", combine={self.combine!r}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.biases is None:
            s += ", bias=False"
        return s
