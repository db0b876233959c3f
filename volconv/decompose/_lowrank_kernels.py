"""CPKernel and TuckerKernel: a kernel held as its CP or Tucker factors (see vc.decompose for the conventions)."""
import numpy as np

from ..kernels import Kernel, SeparableKernel
from ._arguments import check_finite, error_value, factor_matrix, float_array, mode_list


class CPKernel(Kernel):
    """A CP (PARAFAC) kernel: sum over r of weights[r] * outer(factors[0][:, r], ..., factors[-1][:, r]).

    weights: (rank,); factors: one (mode_size, rank) matrix per mode, 5 for a conv weight (Cout, Cin, kd, kh, kw)
    or 3 for a 3-D kernel (kd, kh, kw). relative_error: how far the decomposition is from the weight it was
    computed from (None when built directly from factors). weights=None means all ones."""

    def __init__(self, weights, factors, relative_error=None):
        factors = [factor_matrix(f, f"factors[{m}]") for m, f in enumerate(mode_list(factors))]
        rank = factors[0].shape[1]
        if weights is None:
            weights = np.ones(rank)
        weights = np.array(float_array(weights, "weights"))
        if weights.ndim != 1 or weights.size < 1:
            raise ValueError(f"weights must be a 1-D array of length rank >= 1, got shape {weights.shape}")
        check_finite(weights, "weights")
        if any(f.shape[1] != weights.size for f in factors):
            raise ValueError(f"every factor must have len(weights) = {weights.size} columns (the rank), got "
                             f"factor shapes {[f.shape for f in factors]}")
        self.weights = weights
        self.factors = factors
        self.relative_error = error_value(relative_error)

    @property
    def rank(self):
        return self.weights.size

    @property
    def shape(self):
        """The full kernel's shape (without rebuilding it)."""
        return tuple(f.shape[0] for f in self.factors)

    @property
    def ndim(self):
        return len(self.factors)

    @property
    def spatial(self):
        """The (kd, rank), (kh, rank), (kw, rank) factors."""
        return self.factors[-3:]

    @property
    def channel(self):
        """(out factor (Cout, rank), in factor (Cin, rank)) of a conv weight."""
        if self.ndim != 5:
            raise AttributeError("a 3-D CPKernel has no channel factors (only a conv weight's CPKernel has them)")
        return self.factors[0], self.factors[1]

    @property
    def macs_per_voxel(self):
        """rank * (Cout + Cin + kd + kh + kw) for a conv weight, rank * (kd + kh + kw) for a 3-D kernel: each
        rank-1 term is a 1x1x1 projection Cin -> 1, three 1-D passes and a 1x1x1 expansion 1 -> Cout."""
        return self.rank * sum(self.shape)

    def to_dense(self):
        modes = "abcde"[:self.ndim]
        return np.einsum(f"z,{','.join(m + 'z' for m in modes)}->{modes}", self.weights, *self.factors,
                         optimize=True)

    def to_separable(self):
        """The 3-D kernel as a SeparableKernel (rank 1-D passes; its factors are (rank, k_axis))."""
        if self.ndim != 3:
            raise ValueError("to_separable() needs a 3-D CPKernel (kd, kh, kw); a conv weight's CPKernel has "
                             ".spatial and .channel factors instead")
        return SeparableKernel(factors=[f.T for f in self.factors], weights=self.weights)

    def __repr__(self):
        return f"CPKernel(shape={self.shape}, rank={self.rank}, relative_error={_repr_error(self.relative_error)})"


class TuckerKernel(Kernel):
    """A Tucker kernel: core x_0 factors[0] x_1 ... x_n factors[n] (mode-m products).

    core: the core tensor (one axis per mode); factors: one entry per mode, 5 for a conv weight or 3 for a 3-D
    kernel, each a (mode_size, core.shape[m]) matrix or None to keep that mode (the core has its full size).
    Tucker-2 of a conv weight: factors (U_out, U_in, None, None, None)."""

    def __init__(self, core, factors, relative_error=None):
        factors = mode_list(factors)
        core = np.array(float_array(core, "core"))
        if core.ndim != len(factors) or core.size == 0:
            raise ValueError(f"core must be non-empty with one axis per factor ({len(factors)}), got shape "
                             f"{core.shape}")
        check_finite(core, "core")
        factors = [None if f is None else factor_matrix(f, f"factors[{m}]") for m, f in enumerate(factors)]
        for m, f in enumerate(factors):
            if f is not None and f.shape[1] != core.shape[m]:
                raise ValueError(f"factors[{m}] must have core.shape[{m}] = {core.shape[m]} columns, got shape "
                                 f"{f.shape}")
        self.core = core
        self.factors = factors
        self.relative_error = error_value(relative_error)

    @property
    def ranks(self):
        return self.core.shape

    @property
    def shape(self):
        """The full kernel's shape (without rebuilding it)."""
        return tuple(n if f is None else f.shape[0] for n, f in zip(self.core.shape, self.factors))

    @property
    def ndim(self):
        return self.core.ndim

    @property
    def macs_per_voxel(self):
        """Multiply-adds per output voxel run factor by factor: the input-channel factor (Cin x Ri, 1x1x1), 1-D
        passes along W, H, D with the spatial factors present (each multiplies the channels by its rank), the
        core as a dense conv over the kept spatial modes into Ro channels, the output-channel factor (Ro x Cout).
        Tucker-2: Cin*Ri + Ro*Ri*kd*kh*kw + Cout*Ro; a 3-D kernel with ranks r: r*kw + r^2*kh + r^3*kd + r^3."""
        macs, r_out, channels = 0, 1, 1
        if self.ndim == 5:
            macs += sum(f.size for f in self.factors[:2] if f is not None)   # Cout*Ro + Cin*Ri
            r_out, channels = self.ranks[:2]
        kept = 1
        for f, n in zip(self.factors[:-4:-1], self.shape[:-4:-1]):   # W, H, D
            if f is None:
                kept *= n
            else:
                macs += channels * f.size   # channels x (k x r)
                channels *= f.shape[1]
        return macs + r_out * channels * kept

    def to_dense(self):
        out = self.core
        for m, f in enumerate(self.factors):
            if f is not None:
                out = np.moveaxis(np.tensordot(f, out, axes=(1, m)), 0, m)
        return out

    def __repr__(self):
        return (f"TuckerKernel(shape={self.shape}, ranks={self.ranks}, "
                f"relative_error={_repr_error(self.relative_error)})")


def _repr_error(error):
    return "None" if error is None else f"{error:.3g}"
