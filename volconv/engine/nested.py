"""Nested chains on checked arrays: a large kernel, then smaller ones on its output ('same' zero padding at every
stage), fused in one pass or run stage by stage, and their backward recomputed slab by slab.

Algorithms:
- "fused": every stage in one pass over the planes (_cpu/nested.pxi): a stage consumes the planes of the one
  before as soon as those it needs exist, so each intermediate lives in a ring of kd planes, never as a volume,
  and nothing is computed twice;
- "stages": each stage by dense.run's best algorithm (FFT or oneDNN for compute-bound stages with many
  channels), the intermediates stored;
- "composed" (no activation only): the single equivalent kernel of `compose`. It equals the chain in the
  interior; within the later stages' reach of the border the chain pads every intermediate with zeros, so
  there the two differ. "auto" therefore chooses between "fused" and "stages" only.
Backward recomputes the intermediates slab by slab (slabs of planes along D), so training memory stays at a
slab's worth of intermediates, whatever the volume."""
import numpy as np

from .. import _cpu
from .._validate import ConvSpec
from . import cost, dense
from .layout import channel_block, check_rings, ring_bytes, threads_for_work

ACTIVATION_CODES = {None: 0, "relu": 1, "gelu": 2, "silu": 3}   # the fused kernel's activation argument
SLAB_BYTES = 64 * 2**20   # backward: recomputed intermediates per slab


def same_pads(kernel_size):
    """'same' zero padding of one stage, (before, after) per axis."""
    return tuple(((k - 1) // 2, k // 2) for k in kernel_size)


def stage_specs(x_shape, weights, groups):
    """The ConvSpec of every stage (checked: channels chained, groups dividing them)."""
    specs, shape = [], tuple(x_shape)
    for i, w in enumerate(weights):
        if len(w.shape) != 5:
            raise ValueError(f"weights[{i}] must be 5-D (out_channels, in_channels/groups, kd, kh, kw), got shape "
                             f"{tuple(w.shape)}")
        try:
            spec = ConvSpec(shape, w.shape, stride=(1, 1, 1), pads=same_pads(w.shape[2:]), dilation=(1, 1, 1),
                            groups=groups, mode="constant")
        except ValueError as e:
            what = "input" if i == 0 else f"weights[{i - 1}]'s output ({shape[1]} channels)"
            raise ValueError(f"weights[{i}] does not fit {what}: {e}") from None
        specs.append(spec)
        shape = spec.out_shape
    return specs


def activate(y, act):
    """act applied to y in place (relu, gelu in erf form as torch's default, silu)."""
    if act == "relu":
        np.maximum(y, 0, out=y)
    elif act == "gelu":
        from scipy.special import erf

        y *= 0.5 * (1 + erf(y * np.sqrt(0.5)))
    elif act == "silu":
        from scipy.special import expit

        y *= expit(y)
    return y


def activation_grad(pre, act):
    """d act / d pre."""
    if act == "relu":
        return (pre > 0).astype(pre.dtype)
    if act == "gelu":
        from scipy.special import erf

        return 0.5 * (1 + erf(pre * np.sqrt(0.5))) + pre * np.exp(-0.5 * pre * pre) / np.sqrt(2 * np.pi)
    from scipy.special import expit

    sig = expit(pre)
    return sig * (1 + pre * (1 - sig))


def compose(weights, biases=None, groups=1):
    """The single kernel (and bias) of a chain without activations: (Cout, Cin/groups, sum(k) - len + 1 ...).
    Stage i+1 after stage i is the full convolution of their kernels along space and a product over the
    channels between them; a bias b_i reaches the output through the sum of the later kernels' taps.
    With 'same' padding (before: sum of the stages' (k - 1) // 2) it equals the chain away from the border."""
    ws = [np.asarray(w, dtype=np.result_type(*weights, np.float32)) for w in weights]
    if not ws:
        raise ValueError("weights must hold at least one kernel")
    stage_specs((1, ws[0].shape[1] * groups, 1, 1, 1), [w[:, :, :1, :1, :1] for w in ws], groups)  # channels
    bs = [None] * len(ws) if biases is None else list(biases)
    if len(bs) != len(ws):
        raise ValueError(f"biases must hold one entry per stage ({len(ws)}), got {len(bs)}")
    w = ws[0]
    b = None if bs[0] is None else np.asarray(bs[0], w.dtype)
    for w2, b2 in zip(ws[1:], bs[1:]):
        if b is not None:   # the bias so far, through this stage's taps
            b = _grouped_matvec(w2.sum(axis=(2, 3, 4)), b, groups)
        if b2 is not None:
            b = np.asarray(b2, w.dtype) if b is None else b + np.asarray(b2, w.dtype)
        w = _compose_two(w, w2, groups)
    return w, b


def _grouped_matvec(m, v, groups):
    """m (O, M/groups) times v (M,), block-diagonal by groups."""
    O, Mg = m.shape
    return np.einsum("gom,gm->go", m.reshape(groups, O // groups, Mg), v.reshape(groups, Mg)).ravel()


def _compose_two(w1, w2, groups):
    """Kernel of stage w2 after stage w1: W[o, c, a + b] = sum_m w2[o, m, b] w1[m, c, a] within each group."""
    M, Cg = w1.shape[:2]
    O = w2.shape[0]
    k1, k2 = w1.shape[2:], w2.shape[2:]
    out = np.zeros((groups, O // groups, Cg) + tuple(a + b - 1 for a, b in zip(k1, k2)), w1.dtype)
    g1 = w1.reshape((groups, M // groups, Cg) + k1)
    g2 = w2.reshape((groups, O // groups, M // groups) + k2)
    for b in np.ndindex(*k2):   # the later (usually smaller) kernel's taps, each shifting the first kernel
        out[(slice(None),) * 3 + tuple(slice(i, i + n) for i, n in zip(b, k1))] += \
            np.einsum("gom,gmcxyz->gocxyz", g2[(slice(None),) * 3 + b], g1)
    return out.reshape((O, Cg) + out.shape[3:])


def check_biases(bs, specs):
    for i, (b, spec) in enumerate(zip(bs, specs)):
        if b is not None and b.shape != (spec.w_shape[0],):
            raise ValueError(f"biases[{i}] must have shape ({spec.w_shape[0]},) (weights[{i}]'s output channels), "
                             f"got {b.shape}")


def run(x, ws, bs, act, specs, algorithm, nthreads):
    """The chain on checked, contiguous arrays of one float dtype."""
    if algorithm == "auto":
        algorithm = choose_algorithm(x, ws, specs, nthreads)
    if algorithm == "fused":
        return fused(x, ws, bs, act, specs, nthreads)
    if algorithm == "composed":
        w, b = compose(ws, bs, specs[0].groups)
        pads = tuple((sum(s.pads[a][0] for s in specs), sum(s.pads[a][1] for s in specs)) for a in range(3))
        spec = ConvSpec(x.shape, w.shape, stride=(1, 1, 1), pads=pads, dilation=(1, 1, 1),
                        groups=specs[0].groups, mode="constant")
        return dense.run(x, w.astype(x.dtype), None if b is None else b.astype(x.dtype), spec, "auto", nthreads)
    y = x
    for i, (w, b, spec) in enumerate(zip(ws, bs, specs)):
        y = dense.run(y, w, b, spec, "auto", nthreads)
        if i + 1 < len(ws):
            activate(y, act)
    return y


def choose_algorithm(x, ws, specs, nthreads):
    """"fused" when its one pass costs less than the stages by their best algorithms plus the intermediates'
    trips through memory (written, read back, and the fresh pages they take)."""
    if not cost.all_finite(x, *ws):
        return "fused"   # no FFT: it would spread NaN/Inf
    fused_cost = cost.streaming_cost(ConvSpec(specs[0].x_shape, (specs[-1].w_shape[0],) + specs[0].w_shape[1:],
                                               stride=(1, 1, 1), pads=specs[0].pads, dilation=(1, 1, 1),
                                               groups=specs[0].groups, mode="constant"))
    stages_cost = 0.0
    for spec in specs:
        fused_cost += cost.direct_compute_cost(spec, nthreads)
        stages_cost += min(cost.algorithm_costs(spec, nthreads, allow_torch=True).values())
    stages_cost += sum(cost.memory_cost(3 * 4.0 * np.prod(s.out_shape, dtype=np.float64)) for s in specs[:-1])
    return "fused" if fused_cost <= stages_cost else "stages"


def fused(x, ws, bs, act, specs, nthreads):
    """Every stage in one pass (see _cpu/nested.pxi): weights packed as the direct kernel's, OB output channels
    innermost; lag[s] = the planes stages 0..s look ahead, summed; reach = the planes of a stage's output the
    later stages need beyond a chunk of output planes."""
    G = specs[0].groups
    packs, meta, lag, woff, boff = [], [], 0, 0, 0
    for i, (w, spec) in enumerate(zip(ws, specs)):
        O, Cg = w.shape[:2]
        ob = channel_block(spec)
        packs.append(w.reshape((G, O // G // ob, ob) + w.shape[1:]).transpose(0, 1, 3, 4, 5, 6, 2).ravel())
        lag += w.shape[2] // 2
        reach = [sum(s.pads[0][j] for s in specs[i + 1:]) for j in (0, 1)]
        meta.append((Cg * G, O) + w.shape[2:] + (ob, woff, boff, lag, *reach))
        woff, boff = woff + w.size, boff + O
    wflat = np.concatenate(packs).astype(x.dtype, copy=False)
    bflat = np.concatenate([np.zeros(s.w_shape[0], x.dtype) if b is None else b for b, s in zip(bs, specs)])
    N, D = x.shape[0], x.shape[2]
    work = sum(s.flops() for s in specs) + 8.0 * sum(np.prod(s.out_shape, dtype=np.float64) for s in specs)
    nthreads = threads_for_work(work, nthreads)
    rings = sum(ring_bytes(s, x.dtype.itemsize) for s in specs)   # one per stage, in every thread
    check_rings(specs[-1], x.dtype.itemsize, nthreads, rings, instead="algorithm='stages'")
    # units (n, group, chunk of planes): a chunk after the first recomputes the later stages' reach, so
    # no more chunks than the threads need
    nchunk = int(min(D, max(1, -(-nthreads // (N * G)))))
    out = np.empty(specs[-1].out_shape, x.dtype)
    _cpu.compiled.nested_conv3d_direct(x, wflat, bflat, np.array(meta, np.int64), G, ACTIVATION_CODES[act], out,
                                     nchunk, nthreads)
    return out


def backward(x, ws, bs, act, specs, grad, needs_input_grad, nthreads):
    """Gradients (input, weights, biases) of the chain, slab by slab of output planes. Backward is linear in
    the output gradient, so the output gradient restricted to each slab is back-propagated on its own and the
    results summed; a slab needs the intermediates only on the planes it reaches (its slab widened by the
    later stages' reach), recomputed from the input there. Nothing volume-sized but the input gradient."""
    L, D = len(ws), x.shape[2]
    lo = [s.pads[0][0] for s in specs]
    hi = [s.pads[0][1] for s in specs]
    per_plane = sum(s.out_shape[1] for s in specs) * np.prod(x.shape[3:]) * x.shape[0] * x.dtype.itemsize * 3
    slab = int(min(D, max(1, SLAB_BYTES // max(per_plane, 1))))   # (a slab recomputes the reach around it)
    gx = np.zeros_like(x) if needs_input_grad else None
    gws = [np.zeros_like(w) for w in ws]
    gbs = [np.zeros(s.w_shape[0], x.dtype) for s in specs]
    for a in range(0, D, slab):
        # regions[s]: the planes of stage s's input this slab needs (regions[L]: the slab itself)
        regions = [None] * L + [(a, min(D, a + slab))]
        for s in range(L - 1, -1, -1):
            regions[s] = (max(0, regions[s + 1][0] - lo[s]), min(D, regions[s + 1][1] + hi[s]))
        sub = [_slab_spec(specs[s], regions[s], regions[s + 1]) for s in range(L)]
        inputs, pres = [np.ascontiguousarray(x[:, :, regions[0][0]:regions[0][1]])], []
        for s in range(L - 1):
            pres.append(dense.run(inputs[s], ws[s], bs[s], sub[s], "auto", nthreads, allow_torch=False))
            inputs.append(activate(pres[s].copy(), act))
        g = np.ascontiguousarray(grad[:, :, regions[L][0]:regions[L][1]])
        for s in range(L - 1, -1, -1):
            alg = cost.choose_algorithm(inputs[s], sub[s], nthreads, w=ws[s], allow_torch=False, backward=True)
            gws[s] += dense.backward_weight(inputs[s], g, sub[s], nthreads, "fft" if alg == "fft" else "direct")
            gbs[s] += g.sum(axis=(0, 2, 3, 4))
            if s == 0 and not needs_input_grad:
                break
            gin = dense.backward_input(g, ws[s], sub[s], alg, nthreads)
            if s > 0:
                g = gin * activation_grad(pres[s - 1], act) if act is not None else gin
            else:
                gx[:, :, regions[0][0]:regions[0][1]] += gin
    return gx, gws, gbs


def _slab_spec(spec, src, dst):
    """Stage spec on a slab: input planes src = (start, stop) of the volume, output planes dst; the D padding
    is what the slab lacks of the stage's reach (zero only at the volume's ends)."""
    (lo, hi), rest = spec.pads[0], spec.pads[1:]
    pads = ((lo - (dst[0] - src[0]), dst[1] + hi - src[1]),) + rest
    shape = spec.x_shape[:2] + (src[1] - src[0],) + spec.x_shape[3:]
    return ConvSpec(shape, spec.w_shape, stride=(1, 1, 1), pads=pads, dilation=(1, 1, 1), groups=spec.groups,
                    mode="constant")
