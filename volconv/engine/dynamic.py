"""Per-voxel kernels on checked arrays: the dynamic convolution's forward and both gradients (_cpu/dynamic.pxi),
and the spatially varying Gaussian as three fields of 1-D weights, slab by slab.

The kernels read rows of x and of the kernel field and sum their products voxel by voxel: memory is the input,
the output and the kernel field, never unfolded patches. The input gradient is a gather (each thread owns the
rows it writes: deterministic, no atomics)."""
import numpy as np

from .. import _cpu
from .._validate import NUMPY_PAD_MODES, conv_spec, five_d, triple
from .layout import direct_operands, row_layout, threads_for_work

WEIGHT_BYTES = 64 * 2**20   # adaptive_gaussian: the three fields of 1-D weights per slab


class Layout:
    """Geometry of one dynamic convolution and its channel pairs: output channel o sums over its pairs
    (input channel c, kernel slice s) of the kernel field seen as (N, S, T, Do, Ho, Wo); CSR arrays by output
    channel (forward), by slice (kernel gradient) and by input channel (input gradient)."""

    def __init__(self, x_shape, k_shape, kernel_size, stride, padding, dilation):
        five_d(x_shape)
        N, C = x_shape[:2]
        self.kernel_size = triple(kernel_size, "kernel_size", minimum=1)
        T = int(np.prod(self.kernel_size))
        if len(k_shape) == 6:
            G = k_shape[1]
            if G < 1 or C % G:
                raise ValueError(f"kernels has G={G} groups, which must divide the input's {C} channels")
            self.full, O, w_shape = False, C, (C, 1) + self.kernel_size
        elif len(k_shape) == 7:
            if k_shape[2] != C:
                raise ValueError(f"kernels (N, Cout, Cin, T, Do, Ho, Wo) has Cin={k_shape[2]} but the input has "
                                 f"{C} channels")
            self.full, O, w_shape = True, k_shape[1], (k_shape[1], C) + self.kernel_size
        else:
            raise ValueError("kernels must be (N, G, kd*kh*kw, Do, Ho, Wo) or (N, Cout, Cin, kd*kh*kw, Do, Ho, Wo), "
                             f"got shape {tuple(k_shape)}")
        self.spec = conv_spec(x_shape, w_shape, None, stride, padding, dilation, 1 if self.full else C,
                                    "zeros")
        expected = (N,) + tuple(k_shape[1:-4]) + (T,) + self.spec.out_shape[2:]
        if tuple(k_shape) != expected:
            raise ValueError(f"kernels must have shape {expected} for this input, kernel_size={self.kernel_size}, "
                             f"stride, padding and dilation (T = {T} taps, output {self.spec.out_shape[2:]}), got "
                             f"{tuple(k_shape)}")
        self.out_shape = (N, O) + self.spec.out_shape[2:]
        if self.full:
            o, c = np.divmod(np.arange(O * C), C)          # slice s = o * C + c
            self.by_out = (np.arange(O + 1) * C, c, np.arange(O * C))
            self.by_slice = (np.arange(O * C + 1), o, c)
            order = np.argsort(c, kind="stable")           # by input channel
            self.by_in = (np.arange(C + 1) * O, o[order], order)
            self.k_slices = O * C
        else:
            Cg = C // G
            c = np.arange(C)
            self.by_out = (np.arange(C + 1), c, c // Cg)
            self.by_slice = (np.arange(G + 1) * Cg, c, c)
            self.by_in = (np.arange(C + 1), c, c // Cg)
            self.k_slices = G
        self.by_out, self.by_slice, self.by_in = (tuple(np.ascontiguousarray(a, np.intp) for a in t)
                                                  for t in (self.by_out, self.by_slice, self.by_in))

    def field(self, K):
        """The kernel field as (N, S, T, Do, Ho, Wo)."""
        return K.reshape((K.shape[0], self.k_slices) + K.shape[-4:])

    def geometry(self):
        (sd, sh, _), (dd, dh, _) = self.spec.stride, self.spec.dilation
        return self.kernel_size[1], self.kernel_size[2], sd, sh, dd, dh

    def threads(self, nthreads):
        work = 2.0 * np.prod(self.spec.w_shape[1:], dtype=np.float64) * np.prod(self.out_shape, dtype=np.float64)
        return threads_for_work(work, nthreads)


def forward(x, K, layout, nthreads):
    rows, map_d, map_h, toff = direct_operands(x, layout.spec, nthreads)
    out = np.empty(layout.out_shape, x.dtype)
    _cpu.compiled.dynamic_forward(rows, np.ascontiguousarray(layout.field(K)), out, *layout.by_out, map_d, map_h,
                                toff, *layout.geometry(), layout.threads(nthreads))
    return out


def backward(x, K, grad, layout, needs, nthreads):
    """(input gradient, kernel-field gradient), each None unless needs[0] / needs[1]."""
    rows, map_d, map_h, toff = direct_operands(x, layout.spec, nthreads)
    g = np.ascontiguousarray(grad, x.dtype)
    nthreads = layout.threads(nthreads)
    gx = gK = None
    if needs[1]:
        gK = np.empty(layout.field(K).shape, x.dtype)
        _cpu.compiled.dynamic_grad_kernels(rows, g, gK, *layout.by_slice, map_d, map_h, toff, *layout.geometry(),
                                         nthreads)
        gK = gK.reshape(K.shape)
    if needs[0]:
        gxr = np.empty(rows.shape, x.dtype)
        _cpu.compiled.dynamic_grad_input(np.ascontiguousarray(layout.field(K)), g, gxr, *layout.by_in, map_d, map_h,
                                       toff, *layout.geometry(), nthreads)
        if rows is x:
            gx = gxr
        else:   # back from the row layout: column w of x sits where row_map names it
            row_map = row_layout(x.shape, layout.spec)[0]
            where = np.flatnonzero(row_map >= 0)
            gx = np.ascontiguousarray(gxr[..., where[np.argsort(row_map[where])]])
    return gx, gK


def adaptive_gaussian(x, sigma, zooms, truncate, radii, mode, cval, nthreads):
    """x (D, H, W) filtered at every voxel by the normalised Gaussian of sigma[voxel] / zooms (per axis, in
    voxels) truncated at `truncate` sigmas, radii its largest reach per axis; x extended by the scipy `mode`."""
    pad = dict(constant_values=cval) if mode == "constant" else {}
    xp = np.ascontiguousarray(np.pad(x, [(r, r) for r in radii], mode=NUMPY_PAD_MODES[mode], **pad))
    out = np.empty_like(x)
    D, H, W = x.shape
    slab = int(max(1, min(D, WEIGHT_BYTES // (sum(2 * r + 1 for r in radii) * H * W * x.dtype.itemsize))))
    for d0 in range(0, D, slab):
        d1 = min(D, d0 + slab)
        made = {}   # isotropic voxels: one field serves the three axes
        fields = [made.get((za, r)) if (za, r) in made else
                  made.setdefault((za, r), _weights(sigma[d0:d1] / za, r, truncate, x.dtype))
                  for za, r in zip(zooms, radii)]
        _cpu.compiled.adaptive_gaussian(xp, *fields, out[d0:d1], d0, nthreads)
    return out


def _weights(sigma, radius, truncate, dtype):
    """Every voxel's 1-D Gaussian over offsets -radius..radius: (2 radius + 1, *sigma.shape), zero beyond the
    voxel's own radius int(truncate * sigma + 0.5) (scipy's), normalised; sigma 0: the voxel itself.
    exp(-t^2 / (2 sigma^2)) = q^(t^2) with q = exp(-1 / (2 sigma^2)), by running products (two multiplies per
    offset instead of an exp)."""
    own = np.floor(truncate * sigma + 0.5)
    with np.errstate(divide="ignore"):
        q = np.exp(-0.5 / (sigma * sigma))   # sigma 0: q = 0, only the centre survives
    w = np.empty((2 * radius + 1,) + sigma.shape)
    w[radius] = 1.0
    cur, step, q2 = np.ones_like(q), q.copy(), q * q
    for t in range(1, radius + 1):
        cur *= step                # q^(t^2)
        step *= q2                 # q^(2t + 1)
        w[radius + t] = w[radius - t] = np.where(t <= own, cur, 0.0)
    w /= w.sum(axis=0)
    return np.ascontiguousarray(w, dtype)
