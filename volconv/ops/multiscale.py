"""Parallel multi-scale branches (PyConv / ASPP style): kernels of different sizes and dilations on the same
input, each with 'same' zero padding (torch's padding='same': (e - 1) // 2 before and e // 2 after an extent
e = d * (k - 1) + 1), their outputs summed or concatenated along the channels.

Both combinations are one convolution with the merged kernel (`merge`): every branch's kernel dilated (zeros
between its taps) and centred in the largest extent. Summed branches add into the same taps (the exact
re-parameterisation RepLKNet / UniRepLKNet use); concatenated branches stack as output channels. The merged
kernel is structurally sparse, so vc.conv3d's cost model may run it on the sparse path (the branches' taps
only, one read of each input tile) or densely; "branches" runs each branch on its own instead. CUDA tensors
with branches reading one input channel each (groups == channels): "auto" runs the plugin's fused kernel, one
read of the input for every branch (_torch/cuda_nested.py); other branches take the merged or branch path.
"""
import numpy as np

from .. import _cuda
from .._dispatch import all_finite, check_tensors, compiling, torch_batching, torch_module
from .._validate import ConvSpec, triple, workers as resolve_workers
from ..engine import cost
from ..engine.nested import same_pads
from .conv import conv3d

COMBINES = ("concat", "sum")
ALGORITHMS = ("auto", "merged", "branches")


def _extents(weights, dilations):
    return [tuple(d * (k - 1) + 1 for k, d in zip(tuple(w.shape)[2:], dil)) for w, dil in zip(weights, dilations)]


def _check(weights, dilations, combine, biases):
    """dilations as triples; refuses mismatched branches (channels, combine='sum' with different outputs)."""
    if isinstance(weights, np.ndarray) or not isinstance(weights, (list, tuple)) or not weights:
        raise TypeError("weights must be a non-empty list of 5-D kernels, one per branch")
    shapes = [tuple(w.shape) for w in weights]
    for i, shape in enumerate(shapes):
        if len(shape) != 5:
            raise ValueError(f"weights[{i}] must be 5-D (out_channels, in_channels/groups, kd, kh, kw), got shape "
                             f"{shape}")
        if shape[1] != shapes[0][1]:
            raise ValueError(f"weights[{i}] has {shape[1]} input channels per group but weights[0] has "
                             f"{shapes[0][1]}: every branch reads the same input")
    if combine not in COMBINES:
        raise ValueError(f"combine must be 'concat' or 'sum', got {combine!r}")
    if combine == "sum" and len({shape[0] for shape in shapes}) > 1:
        raise ValueError("combine='sum' needs the same number of output channels in every branch, got "
                         f"{[shape[0] for shape in shapes]}")
    if dilations is None:
        dilations = [1] * len(weights)
    if len(dilations) != len(weights):
        raise ValueError(f"dilations must hold one entry per branch ({len(weights)}), got {len(dilations)}")
    if biases is not None and len(biases) != len(weights):
        raise ValueError(f"biases must be None or hold one entry (or None) per branch ({len(weights)})")
    return [triple(d, f"dilations[{i}]", minimum=1) for i, d in enumerate(dilations)]


def merge(weights, dilations=None, biases=None, combine="sum", groups=1):
    """The single kernel (and bias) of the branches: (O, C/groups, E) with E the largest extent, each branch
    dilated and centred; combine="sum" adds them (exact re-parameterisation), "concat" stacks them as output
    channels (in the branches' order). Works on numpy arrays and on torch tensors (differentiably)."""
    dilations = _check(weights, dilations, combine, biases)
    extents = _extents(weights, dilations)
    E = tuple(max(e[a] for e in extents) for a in range(3))
    torch_in = not isinstance(weights[0], np.ndarray) and hasattr(weights[0], "new_zeros")
    Cg = weights[0].shape[1]
    outs = [int(w.shape[0]) for w in weights]
    O = outs[0] if combine == "sum" else sum(outs)
    new = weights[0].new_zeros if torch_in else \
        (lambda shape: np.zeros(shape, np.result_type(*weights, np.float32)))
    merged, row = new((O, Cg) + E), 0
    for w, d, e in zip(weights, dilations, extents):
        at = tuple(slice((n - 1) // 2 - (m - 1) // 2, (n - 1) // 2 - (m - 1) // 2 + m, s)
                   for n, m, s in zip(E, e, d))   # centred: both use (extent - 1) // 2 planes before
        rows = slice(0, O) if combine == "sum" else slice(row, row + w.shape[0])
        merged[(rows, slice(None)) + at] += w
        row += w.shape[0]
    bias = None
    if biases is not None and any(b is not None for b in biases):
        given = next(b for b in biases if b is not None)
        zeros = given.new_zeros if torch_in else (lambda n: np.zeros(n, given.dtype))
        parts = [zeros(outs[i]) if b is None else b for i, b in enumerate(biases)]
        bias = sum(parts) if combine == "sum" else torch_module().cat(parts) if torch_in else np.concatenate(parts)
    if combine == "concat" and groups > 1:   # a grouped convolution wants its output channels group by group
        order = _group_order(outs, groups)
        order = torch_module().as_tensor(order) if torch_in else order
        merged, bias = merged[order], None if bias is None else bias[order]
    return merged, bias


def _group_order(outs, groups):
    """Rows of the concatenated branches, reordered group by group (each branch's group g, in branch order)."""
    starts = np.cumsum([0] + outs[:-1])
    return np.concatenate([np.arange(s + g * (o // groups), s + (g + 1) * (o // groups))
                           for g in range(groups) for s, o in zip(starts, outs)])


@torch_batching()
def multiscale_conv3d(input, weights, dilations=None, groups=1, combine="concat", biases=None, *,
                      algorithm="auto", workers=None):
    """Parallel branches on one input: weights[i] (O_i, C/groups, k_i...) with dilations[i], each with 'same'
    zero padding, combined by "concat" (output channels in branch order) or "sum". algorithm: "merged" (one
    convolution with `merge`'s kernel; dense or sparse by the cost model), "branches" (one convolution per
    branch), "auto" (the cheaper by the cost model)."""
    dil = _check(weights, dilations, combine, biases)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
    outs = [int(w.shape[0]) for w in weights]
    for i, o in enumerate(outs):
        if o % groups:
            raise ValueError(f"groups={groups} must divide weights[{i}]'s {o} output channels")
    bias_list = [None] * len(weights) if biases is None else list(biases)
    if algorithm == "auto" and _cuda.is_cuda(input) and not compiling():
        out = _fused_on_cuda(input, weights, dil, groups, combine, bias_list)
        if out is not None:
            return out
    if algorithm == "auto":
        # traced by torch.compile / export: the merged kernel (the cost model reads arrays the tracer cannot).
        # Non-finite input: the branches, as torch runs them (a dilated branch never reads the voxels between its
        # taps, where the merged kernel holds zeros, and 0 * NaN = NaN)
        algorithm = "merged" if compiling() else "branches" if not all_finite(input) else \
            _choose(tuple(input.shape), weights, dil, groups, combine, resolve_workers(workers))
    if algorithm == "branches":
        return _branches(input, weights, dil, groups, combine, bias_list, workers)
    w, b = merge(weights, dil, biases, combine, groups)
    out = conv3d(input, w, b, padding="same", groups=groups, workers=workers)
    if combine == "concat" and groups > 1:   # back to branch order
        inverse = np.argsort(_group_order(outs, groups))
        out = out[:, torch_module().as_tensor(inverse) if not isinstance(out, np.ndarray) else inverse]
    return out


def _fused_on_cuda(input, weights, dil, groups, combine, biases):
    """The branches by the plugin's fused kernel (one input read for all), or None when it does not take them
    (channel mixing, too many branches, rings beyond its shared memory): the merged or branch path then."""
    from .._torch import cuda_nested
    from .._torch.common import compute_dtype, operand

    names = [f"weights[{i}]" for i in range(len(weights))] + [f"biases[{i}]" for i in range(len(biases))]
    check_tensors("multiscale_conv3d", [input, *weights, *biases], ["input"] + names, cuda=True)
    x = operand(input, compute_dtype(input))
    plan = cuda_nested.fused_branches_plan(x, weights, dil, groups)
    if plan is None:
        return None
    ws = [operand(w, x.dtype).to(x.device) for w in weights]
    bs = [None if b is None else operand(b, x.dtype).to(x.device) for b in biases]
    return cuda_nested.multiscale_conv3d(x, ws, bs, dil, groups, combine, plan).to(input.dtype)


def _branches(input, weights, dil, groups, combine, biases, workers):
    ys = [conv3d(input, w, b, padding="same", dilation=d, groups=groups, workers=workers)
          for w, d, b in zip(weights, dil, biases)]
    if combine == "sum":
        out = ys[0]
        for y in ys[1:]:
            out = out + y
        return out
    if isinstance(ys[0], np.ndarray):
        return np.concatenate(ys, axis=1)
    return torch_module().cat(ys, dim=1)


def _choose(x_shape, weights, dil, groups, combine, nthreads):
    """"merged" unless the branches, each at its best algorithm, cost less (the merged kernel's structural
    zeros cost nothing on the sparse path, so this is mostly about which kernel runs fastest)."""
    if len(x_shape) != 5:
        return "merged"   # conv3d's checks say what is wrong
    merged, _ = merge([np.ones(tuple(w.shape), np.float32) for w in weights], dil, None, combine, groups)
    spec = ConvSpec(tuple(x_shape), merged.shape, stride=(1, 1, 1), pads=same_pads(merged.shape[2:]),
                    dilation=(1, 1, 1), groups=groups, mode="constant")
    merged_cost = min(cost.algorithm_costs(spec, nthreads, allow_torch=True,
                                            nnz=np.count_nonzero(merged)).values())
    branch_cost = 0.0
    for w, d in zip(weights, dil):
        e = tuple(a * (k - 1) + 1 for k, a in zip(tuple(w.shape)[2:], d))
        bspec = ConvSpec(tuple(x_shape), tuple(w.shape), stride=(1, 1, 1), pads=same_pads(e), dilation=d,
                         groups=groups, mode="constant")
        branch_cost += min(cost.algorithm_costs(bspec, nthreads, allow_torch=True).values())
    return "merged" if merged_cost <= branch_cost else "branches"
