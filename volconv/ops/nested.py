"""vc.nested_conv3d: a large kernel, then smaller ones on its output, as one operation ('same' zero padding at
every stage, torch's chain of conv3d(padding=k // 2) for odd k, padding='same' for even k), checked here and run
by the engine (engine/nested.py: the algorithms "fused", "stages" and "composed") or the torch adapter (CUDA
tensors: the plugin's fused depthwise kernel, other chains stage by stage: _torch/cuda_nested.py); and
vc.nested.compose, the single kernel of a linear chain."""
import numpy as np

from .. import _cuda
from .._dispatch import Caller, check_tensors, compiling, torch_batching, wants_autograd
from .._validate import five_d, workers as resolve_workers
from ..engine import nested
from ..engine.nested import ACTIVATION_CODES, compose, stage_specs  # noqa: F401  (compose: vc.nested.compose)

ACTIVATIONS = tuple(ACTIVATION_CODES)   # None, "relu", "gelu", "silu"
ALGORITHMS = ("auto", "fused", "stages", "composed")


@torch_batching()
def nested_conv3d(input, weights, biases=None, activation=None, groups=1, *, algorithm="auto", workers=None):
    """A chain of 'same' convolutions, weights[0] first (usually the largest kernel), with `activation`
    ("relu", "gelu", "silu" or None) between stages and `groups` applying to every stage; the sequential
    torch.conv3d(padding=k // 2) chain, without any full-size intermediate ("fused"). See the module's doc."""
    if isinstance(weights, (np.ndarray,)) or not isinstance(weights, (list, tuple)) or not weights:
        raise TypeError("weights must be a non-empty list of 5-D kernels (weights[0] applied first)")
    L = len(weights)
    if biases is not None and (not isinstance(biases, (list, tuple)) or len(biases) != L):
        raise ValueError(f"biases must be None or a list with one entry (or None) per stage ({L})")
    bias_list = list(biases) if biases is not None else [None] * L
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of None, 'relu', 'gelu', 'silu', got {activation!r}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
    if algorithm == "composed" and activation is not None:
        raise ValueError("algorithm='composed' needs a linear chain (activation=None)")
    if wants_autograd(input, *weights, *bias_list) or _cuda.is_cuda(input):
        from .._torch import nested as torch_nested

        if algorithm == "composed" and wants_autograd(input, *weights, *bias_list):
            raise ValueError("algorithm='composed' is for inference (it differs from the chain near the border); "
                             "use 'auto', 'fused' or 'stages' with gradients")
        if not compiling():
            check_tensors("nested_conv3d", [input], ["input"], cuda=True)
        return torch_nested.nested_conv3d(input, list(weights), bias_list, activation, groups, algorithm, workers)
    w_names = [f"weights[{i}]" for i in range(L)]
    b_names = [f"biases[{i}]" for i in range(L)]
    caller = Caller("nested_conv3d", [input] + list(weights) + bias_list, ["input"] + w_names + b_names,
                    optional=tuple(b_names))
    arrays = caller.arrays
    five_d(arrays[0])
    x = caller.cast(arrays[0], "input")
    ws = [caller.cast(w, n, same_dtype=True) for w, n in zip(arrays[1:L + 1], w_names)]
    bs = [caller.cast(b, n, same_dtype=True) for b, n in zip(arrays[L + 1:], b_names)]
    specs = stage_specs(x.shape, ws, groups)
    nested.check_biases(bs, specs)
    return caller.result(nested.run(x, ws, bs, activation, specs, algorithm, resolve_workers(workers)))
