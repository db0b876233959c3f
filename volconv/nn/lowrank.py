"""vc.nn.CPConv3d and vc.nn.TuckerConv3d: 3D convolution layers whose weight is held, trained and executed as
its low-rank factors (vc.cp_conv3d / vc.tucker_conv3d), never as the dense Cout x Cin x k^3 tensor."""
import math

import torch

from .. import _cuda
from .._dispatch import torch_batching, wants_autograd
from .._validate import positive_int, triple
from ..ops.lowrank import factored_conv3d


class _Factored(torch.nn.Module):
    """torch.nn.Conv3d's geometry arguments (groups=1: the factors mix all channels)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                 padding_mode, workers, factory):
        super().__init__()
        if groups != 1:
            raise ValueError(f"{type(self).__name__} mixes every channel through its factors: groups must be 1, "
                             f"got {groups}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, 1
        self.kernel_size = triple(kernel_size, "kernel_size", minimum=1)
        self.stride, self.dilation = triple(stride, "stride", minimum=1), triple(dilation, "dilation", minimum=1)
        self.padding = padding if isinstance(padding, str) else triple(padding, "padding")
        self.padding_mode, self.workers = padding_mode, workers
        self.weight_shape = (out_channels, in_channels) + self.kernel_size
        self.bias = torch.nn.Parameter(torch.zeros(out_channels, **factory)) if bias else None
        self._factory = factory

    def _factor(self, rows, cols, std):
        return torch.nn.Parameter(torch.randn(rows, cols, **self._factory) * std)

    @torch_batching()
    def _run(self, input, in_f, out_f, spatial, core):
        if not wants_autograd(input, self.bias, in_f, out_f, core, *(spatial or ())) and not _cuda.is_cuda(input):
            # inference on the CPU: the numpy path, whose fused kernels need no intermediate for autograd
            as_np = lambda t: None if t is None else t.detach().cpu().double().numpy()  # noqa: E731
            in_f, out_f, core = as_np(in_f), as_np(out_f), as_np(core)
            spatial = None if spatial is None else tuple(as_np(f) for f in spatial)
        return factored_conv3d(type(self).__name__, input, self.bias, self.stride, self.padding, self.dilation,
                               self.padding_mode, self.workers, in_f, out_f, spatial, core, self.weight_shape)

    @staticmethod
    def _conv_args(conv):
        if not isinstance(conv, torch.nn.Conv3d):
            raise TypeError(f"conv must be a torch.nn.Conv3d, got {type(conv).__name__}")
        return (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.groups, conv.bias is not None, conv.padding_mode)

    def _copy_bias(self, conv):
        if conv.bias is not None:
            self.bias = torch.nn.Parameter(conv.bias.detach().clone())

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, {self._rank_repr()}" + ("" if self.bias is not None else ", bias=False")
                + (f", padding_mode={self.padding_mode!r}" if self.padding_mode != "zeros" else ""))


class CPConv3d(_Factored):
    """W[o, c, a, b, e] = sum_r out_factor[o, r] in_factor[c, r] factor_d[a, r] factor_h[b, r] factor_w[e, r].

    torch.nn.Conv3d's arguments (groups=1) and keyword `rank`. The factors start random, scaled so that the
    weight they make has torch.nn.Conv3d's initial variance; `from_conv` starts from a trained layer's CP."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", *, rank, workers=None, device=None, dtype=None):
        factory = {"device": device, "dtype": dtype or torch.get_default_dtype()}
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, workers, factory)
        self.rank = rank = positive_int(rank, "rank")
        fan_in = in_channels * math.prod(self.kernel_size)
        std = (1.0 / (3.0 * fan_in * rank)) ** 0.1   # var(W) = rank * std^10 = torch's 1 / (3 fan_in)
        self.out_factor, self.in_factor = self._factor(out_channels, rank, std), self._factor(in_channels, rank, std)
        self.factor_d, self.factor_h, self.factor_w = (self._factor(k, rank, std) for k in self.kernel_size)

    @classmethod
    def from_conv(cls, conv, rank, *, workers=None, **decompose_options):
        """The CP layer of a trained torch.nn.Conv3d (vc.decompose.cp: rank an int or a target relative
        error). The decomposition's relative error is kept in `.relative_error`."""
        from ..decompose import cp

        cls._conv_args(conv)   # a Conv3d, checked before the decomposition's work
        return cls.from_kernel(conv, cp(conv.weight, rank, **decompose_options), workers=workers)

    @classmethod
    def from_kernel(cls, conv, k, *, workers=None):
        """The CP layer of a torch.nn.Conv3d's geometry and bias with the factors of a CPKernel k of its weight."""
        args = cls._conv_args(conv)
        new = cls(*args, rank=k.rank, workers=workers, device=conv.weight.device, dtype=conv.weight.dtype)
        a, b, d, h, e = (torch.as_tensor(f, dtype=conv.weight.dtype) for f in k.factors)
        with torch.no_grad():
            new.out_factor.copy_(a * torch.as_tensor(k.weights, dtype=a.dtype))
            for p, f in zip((new.in_factor, new.factor_d, new.factor_h, new.factor_w), (b, d, h, e)):
                p.copy_(f)
        new._copy_bias(conv)
        new.relative_error = k.relative_error
        return new

    def to_dense(self):
        """The dense weight (Cout, Cin, kd, kh, kw) the factors make (differentiable)."""
        return torch.einsum("or,cr,ar,br,er->ocabe", self.out_factor, self.in_factor, self.factor_d,
                            self.factor_h, self.factor_w)

    def forward(self, input):
        spatial = (self.factor_d.T, self.factor_h.T, self.factor_w.T)
        return self._run(input, self.in_factor, self.out_factor, spatial, None)

    def _rank_repr(self):
        return f"rank={self.rank}"


class TuckerConv3d(_Factored):
    """W = core x_0 out_factor x_1 in_factor [x_2 factor_d x_3 factor_h x_4 factor_w].

    torch.nn.Conv3d's arguments (groups=1) and keyword `ranks`: (Rout, Rin) for Tucker-2 (the core keeps the
    kernel's spatial size) or five ranks (one per mode, spatial factors trained too)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", *, ranks, workers=None, device=None, dtype=None):
        factory = {"device": device, "dtype": dtype or torch.get_default_dtype()}
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, workers, factory)
        ranks = tuple(ranks)
        sizes = (out_channels, in_channels) + self.kernel_size
        if len(ranks) not in (2, 5) or not all(isinstance(r, int) and 1 <= r <= n for r, n in zip(ranks, sizes)):
            raise ValueError(f"ranks must be 2 (Rout, Rin) or 5 positive ints, each at most its mode's size "
                             f"{sizes[:len(ranks)]}, got {ranks!r}")
        self.ranks = ranks
        core_shape = ranks if len(ranks) == 5 else ranks + self.kernel_size
        fan_in = in_channels * math.prod(self.kernel_size)
        n_factors = len(ranks)
        # var(W) = prod(core ranks summed over) * std^(2 (n_factors + 1)) = torch's 1 / (3 fan_in)
        std = (1.0 / (3.0 * fan_in * math.prod(ranks))) ** (1.0 / (2 * (n_factors + 1)))
        self.core = torch.nn.Parameter(torch.randn(core_shape, **factory) * std)
        self.out_factor, self.in_factor = self._factor(out_channels, ranks[0], std), \
            self._factor(in_channels, ranks[1], std)
        if len(ranks) == 5:
            self.factor_d, self.factor_h, self.factor_w = (self._factor(k, r, std)
                                                           for k, r in zip(self.kernel_size, ranks[2:]))

    @classmethod
    def from_conv(cls, conv, ranks, *, workers=None, **decompose_options):
        """The Tucker layer of a trained torch.nn.Conv3d (vc.decompose.tucker with these ranks)."""
        from ..decompose import tucker

        cls._conv_args(conv)
        return cls.from_kernel(conv, tucker(conv.weight, ranks, **decompose_options), workers=workers)

    @classmethod
    def from_kernel(cls, conv, k, *, workers=None):
        """The Tucker layer of a torch.nn.Conv3d's geometry and bias with a TuckerKernel k of its weight."""
        args = cls._conv_args(conv)
        ranks = tuple(int(n) for n in k.core.shape[:2]) if all(f is None for f in k.factors[2:]) else \
            tuple(int(n) for n in k.core.shape)
        new = cls(*args, ranks=ranks, workers=workers, device=conv.weight.device, dtype=conv.weight.dtype)
        names = ("out_factor", "in_factor", "factor_d", "factor_h", "factor_w")
        with torch.no_grad():
            new.core.copy_(torch.as_tensor(k.core))
            for name, f in zip(names, k.factors):
                if f is not None:
                    getattr(new, name).copy_(torch.as_tensor(f))
        new._copy_bias(conv)
        new.relative_error = k.relative_error
        return new

    def _spatial_core(self):
        """The core with its spatial modes expanded: (Rout, Rin, kd, kh, kw)."""
        if len(self.ranks) == 2:
            return self.core
        return torch.einsum("oipqs,ap,bq,es->oiabe", self.core, self.factor_d, self.factor_h, self.factor_w)

    def to_dense(self):
        return torch.einsum("oiabe,Oo,Ci->OCabe", self._spatial_core(), self.out_factor, self.in_factor)

    def forward(self, input):
        return self._run(input, self.in_factor, self.out_factor, None, self._spatial_core())

    def _rank_repr(self):
        return f"ranks={self.ranks}"
