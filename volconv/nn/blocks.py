"""Building blocks of 3D networks over volconv's convolutions: vc.nn.ChannelAttention3d (squeeze-and-excitation),
vc.nn.SpatialAttention3d and vc.nn.ChannelSpatialAttention3d (CBAM's spatial gate, and both gates in a row) and
vc.nn.Res2Block3d (a Res2Net bottleneck, its convolutions vc.nn.Conv3d)."""
import torch

from .._dispatch import torch_batching
from .._validate import positive_int, triple
from .conv import Conv3d


def _check_input(input, channels, owner):
    if input.dim() != 5 or input.shape[1] != channels:
        raise ValueError(f"{owner}: input must be 5-D (N, C, D, H, W) with C = {channels} channels, got shape "
                         f"{tuple(input.shape)}")


class ChannelAttention3d(torch.nn.Module):
    """Squeeze-and-excitation over the channels of a volume (Hu et al., 2018), in 3D.

    Each channel is scaled by sigmoid(fc2(relu(fc1(mean over D, H, W)))): fc1 is Linear(channels, hidden),
    fc2 Linear(hidden, channels), hidden = max(min_hidden, channels // reduction) (the floor keeps a few
    channels' worth of gating capacity in narrow layers)."""

    def __init__(self, channels, reduction=16, *, min_hidden=4, device=None, dtype=None):
        super().__init__()
        self.channels = positive_int(channels, "channels")
        self.reduction = positive_int(reduction, "reduction")
        self.min_hidden = positive_int(min_hidden, "min_hidden")
        self.hidden = max(self.min_hidden, self.channels // self.reduction)
        factory = {"device": device, "dtype": dtype}
        self.fc1 = torch.nn.Linear(self.channels, self.hidden, **factory)
        self.fc2 = torch.nn.Linear(self.hidden, self.channels, **factory)

    @torch_batching()
    def forward(self, input):
        _check_input(input, self.channels, type(self).__name__)
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(input.mean(dim=(2, 3, 4))))))
        return input * gate[:, :, None, None, None]

    def extra_repr(self):
        return f"{self.channels}, reduction={self.reduction}, hidden={self.hidden}"


def _odd_kernel_size(kernel_size):
    k = triple(kernel_size, "kernel_size", minimum=1)
    if any(v % 2 == 0 for v in k):
        # an even kernel has no centre: no symmetric zero padding keeps the volume's size
        raise ValueError(f"kernel_size must be a positive odd int (or 3 of them), got {kernel_size!r}")
    return k


class SpatialAttention3d(torch.nn.Module):
    """The spatial gate of CBAM (Woo et al., 2018), in 3D.

    From the input (N, C, D, H, W), two maps over the voxels: the mean and the max over the channels. They are
    stacked as 2 channels (mean first) and convolved to 1 channel by ``conv``, a vc.nn.Conv3d(2, 1, kernel_size,
    padding=kernel_size // 2, bias=False) (zero padding: the map keeps the volume's size; volconv's kernels,
    on the CPU engine or CUDA); the input is multiplied by sigmoid of that map, the same gate in (0, 1) for
    every channel of a voxel. Any number of channels; an unbatched (C, D, H, W) input works as in torch.
    ``algorithm`` and ``workers`` go to the convolution."""

    def __init__(self, kernel_size=7, *, algorithm="auto", workers=None, device=None, dtype=None):
        super().__init__()
        self.kernel_size = _odd_kernel_size(kernel_size)
        self.conv = Conv3d(2, 1, self.kernel_size, padding=tuple(k // 2 for k in self.kernel_size), bias=False,
                           algorithm=algorithm, workers=workers, device=device, dtype=dtype)

    def gate(self, input):
        """The (N, 1, D, H, W) gate sigmoid(conv([mean_c(input), max_c(input)])) that forward multiplies on."""
        pooled = torch.cat([input.mean(dim=1, keepdim=True), input.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(pooled))

    @torch_batching()
    def forward(self, input):
        if input.shape[1] < 1:
            raise ValueError(f"{type(self).__name__}: input needs at least one channel, got shape "
                             f"{tuple(input.shape)}")
        return input * self.gate(input)

    def extra_repr(self):
        k = self.kernel_size
        return f"kernel_size={k[0] if len(set(k)) == 1 else k}"


class ChannelSpatialAttention3d(torch.nn.Module):
    """CBAM in 3D (Woo et al., 2018): the channel gate, then the spatial gate, in that order.

    ``channel`` is a ChannelAttention3d(channels, reduction, min_hidden=min_hidden): squeeze-and-excitation,
    which pools each channel by its mean only (CBAM's channel gate also max-pools into the shared MLP); its
    output goes through ``spatial``, a SpatialAttention3d(kernel_size). state_dict keys: channel.fc1.*,
    channel.fc2.*, spatial.conv.weight."""

    def __init__(self, channels, reduction=16, kernel_size=7, *, min_hidden=4, algorithm="auto", workers=None,
                 device=None, dtype=None):
        super().__init__()
        self.channel = ChannelAttention3d(channels, reduction, min_hidden=min_hidden, device=device, dtype=dtype)
        self.spatial = SpatialAttention3d(kernel_size, algorithm=algorithm, workers=workers, device=device,
                                          dtype=dtype)
        self.channels = self.channel.channels

    @torch_batching()
    def forward(self, input):
        return self.spatial(self.channel(input))


class Res2Block3d(torch.nn.Module):
    """A 3D Res2Net bottleneck (Gao et al., 2019): multi-scale features inside one residual block.

    A 1x1x1 convolution, then its channels split into ``scales`` groups of ``width = channels // scales``:
    group 0 passes through, group 1 is convolved, and each further group i is convolved after adding the
    previous group's output, y_i = relu(conv_i(x_i + y_{i-1})), so group i sees a receptive field i kernels
    wide. The groups are concatenated and mixed by a second 1x1x1 convolution, optionally reweighted by
    ChannelAttention3d, added to the block's input, and passed through a ReLU. Every convolution is a
    vc.nn.Conv3d (``bias``, ``algorithm`` and ``workers`` go to each); there is no normalisation layer."""

    def __init__(self, channels, scales=4, kernel_size=3, *, attention=True, reduction=16, bias=False,
                 algorithm="auto", workers=None, device=None, dtype=None):
        super().__init__()
        self.channels = positive_int(channels, "channels")
        self.scales = positive_int(scales, "scales")
        if self.scales < 2:
            raise ValueError(f"scales must be >= 2 (group 0 passes through, so one scale convolves nothing), "
                             f"got {scales!r}")
        if self.channels % self.scales:
            raise ValueError(f"channels ({channels}) must be divisible by scales ({scales})")
        self.kernel_size = triple(kernel_size, "kernel_size", minimum=1)
        if any(k % 2 == 0 for k in self.kernel_size):
            # an even kernel has no centre: no symmetric padding keeps the size, and the residual needs it
            raise ValueError(f"kernel_size must be odd on every axis, got {kernel_size!r}")
        self.width = self.channels // self.scales
        conv = {"bias": bias, "algorithm": algorithm, "workers": workers, "device": device, "dtype": dtype}
        self.conv_in = Conv3d(self.channels, self.channels, 1, **conv)
        self.convs = torch.nn.ModuleList(
            Conv3d(self.width, self.width, self.kernel_size, padding=tuple(k // 2 for k in self.kernel_size),
                   **conv)
            for _ in range(self.scales - 1))
        self.conv_out = Conv3d(self.channels, self.channels, 1, **conv)
        self.attention = ChannelAttention3d(self.channels, reduction, device=device, dtype=dtype) \
            if attention else None

    @torch_batching()
    def forward(self, input):
        _check_input(input, self.channels, type(self).__name__)
        groups = torch.split(torch.relu(self.conv_in(input)), self.width, dim=1)
        outs = [groups[0]]
        for x, conv in zip(groups[1:], self.convs):
            outs.append(torch.relu(conv(x if len(outs) == 1 else x + outs[-1])))
        out = self.conv_out(torch.cat(outs, dim=1))
        if self.attention is not None:
            out = self.attention(out)
        return torch.relu(out + input)

    def extra_repr(self):
        return f"{self.channels}, scales={self.scales}, kernel_size={self.kernel_size}"
