"""conv3d on CUDA tensors: which algorithm computes it (volconv's depthwise kernel, its generic direct kernel,
cuDNN through torch's conv3d, or an FFT through torch.fft), by a cost model; the depthwise kernel and the FFT on
tensors. The convolution comes here zero-padded (conv3d pads the other modes first).

The rule, for algorithm="auto": the cheapest forward by the model below among the algorithms that suit:
  - "depthwise" (cuda_plugin/depthwise.cu) for one input channel per group (depthwise, a channel multiplier, a
    one-channel volume) at stride 1, when its tile fits in shared memory;
  - "torch" (cuDNN's implicit GEMM) for channel-mixing layers, C / groups and O / groups both >= 4 (as the CPU path
    hands them to oneDNN); cuDNN has no fast 3-D depthwise path (pytorch#37406), so never for one channel per group;
  - "fft" (cuFFT) for kernels of more than 27 taps, whose cost grows with the padded volume, not the taps; never
    for a non-finite input or weight (an FFT spreads NaN / Inf over the whole output) nor while torch.compile traces;
  - "direct" (cuda_plugin/conv3d.cu's generic kernel) always.
algorithm="direct" is the generic kernel, "fft" and "torch" are those, whatever the model says ("sparse": the
plugin has no sparse kernel for a dense weight, so "auto").

The rates are UNCALIBRATED: guesses for an H200 in float32 until a GPU measures them (bench/gpu_check.py); only
their ratios matter to the choice."""
import math

import torch

from .. import _cuda
from .._validate import ConvSpec
from ..engine import dense
from . import cuda

GENERIC_GFLOPS = 1500.0      # conv3d.cu's forward: one voxel per thread, a load through L1 per tap
DEPTHWISE_GFLOPS = 12000.0   # depthwise.cu: S x S multiply-adds per 2 S values read from shared memory
CUDNN_GFLOPS = 20000.0       # cuDNN on channel-mixing layers
FFT_GFLOPS = 2000.0          # effective rate of a transform (5/2 n log2 n flops) and of the spectra's products
BANDWIDTH = 4e12             # bytes / s of device memory (the FFT's spectra are written and read)
LAUNCH = 10e-6               # seconds per kernel launch or torch op on the GPU
CUDNN_MIN_CHANNELS = 4       # C / groups and O / groups at least this: channel mixing, for cuDNN
FFT_MIN_TAPS = 28            # smaller kernels never go to the FFT

# depthwise.cu's tile (keep in step with it): TY output rows x TX * S columns, S outputs per thread, and the most
# shared memory it takes (the input tile plus halo and one kernel plane)
TY, TX, S = 16, 8, 8
MAX_SHARED = 96 * 1024


def depthwise_shared_bytes(kh, kw, itemsize):
    """Shared memory of a depthwise.cu block: the tile (TY + kh - 1 rows of whole strips past the kernel's reach)
    and one kernel plane (rows padded to a multiple of S)."""
    tile_w = (TX + kw // S + 1) * S
    return ((TY + kh - 1) * tile_w + kh * -(-kw // S) * S) * itemsize


def depthwise_suits(spec, itemsize):
    """Whether depthwise.cu computes this convolution: stride 1 and its tile within MAX_SHARED (it takes any
    channels per group; the model sends it one input channel per group, its input gradient the multiplier)."""
    return spec.stride == (1, 1, 1) and depthwise_shared_bytes(*spec.kernel_size[1:], itemsize) <= MAX_SHARED


def fast_length(n):
    """The least 2-3-5-7-smooth length >= n (cuFFT's fast sizes)."""
    while True:
        m = n
        for p in (2, 3, 5, 7):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def fft_lengths(spec):
    """The transforms' lengths: the padded input's, made fast (a correlation's valid part does not wrap)."""
    return tuple(fast_length(n + lo + hi) for n, (lo, hi) in zip(spec.x_shape[2:], spec.pads))


def costs(spec, itemsize, *, fft=True):
    """Predicted seconds of each algorithm that suits this forward (the model; UNCALIBRATED rates)."""
    N, C = spec.x_shape[:2]
    O, Cg = spec.w_shape[:2]
    Og = O // spec.groups
    flops = spec.flops()
    streamed = itemsize * (N * C * _volume(spec.x_shape[2:]) + N * O * _volume(spec.out_shape[2:])) / BANDWIDTH
    result = {"direct": LAUNCH + streamed + flops / (GENERIC_GFLOPS * 1e9)}
    if Cg == 1 and depthwise_suits(spec, itemsize):
        result["depthwise"] = LAUNCH + streamed + flops / (DEPTHWISE_GFLOPS * 1e9)
    if Cg >= CUDNN_MIN_CHANNELS and Og >= CUDNN_MIN_CHANNELS:
        result["torch"] = LAUNCH + streamed + flops / (CUDNN_GFLOPS * 1e9)
    if fft and _volume(spec.kernel_size) >= FFT_MIN_TAPS:
        result["fft"] = fft_cost(spec, itemsize)
    return result


def fft_cost(spec, itemsize):
    """Transforms of the N C inputs, O Cg kernels and N O outputs (5/2 n log2 n flops each), the spectra's
    products (N O Cg complex multiply-adds per frequency), every spectrum written, permuted and read, and about
    eight torch ops."""
    N, C = spec.x_shape[:2]
    O, Cg = spec.w_shape[:2]
    lengths = fft_lengths(spec)
    n = math.prod(lengths)
    freqs = n // lengths[-1] * (lengths[-1] // 2 + 1)
    transforms = N * C + O * Cg + N * O
    flops = transforms * 2.5 * n * math.log2(max(n, 2)) + 8.0 * N * O * Cg * freqs
    traffic = 2 * itemsize * freqs * 3 * transforms
    return 8 * LAUNCH + flops / (FFT_GFLOPS * 1e9) + traffic / BANDWIDTH


def choose(x, w, spec, algorithm, *, tracing=False):
    """The algorithm for a zero-padded convolution of CUDA tensors: "depthwise", "direct", "torch" or "fft"."""
    if algorithm in ("direct", "fft", "torch"):
        return algorithm
    predicted = costs(spec, x.element_size(), fft=not tracing)
    name = min(predicted, key=predicted.get)
    if name == "fft" and not all(bool(torch.isfinite(t.detach()).all()) for t in (x, w)):
        del predicted["fft"]
        name = min(predicted, key=predicted.get)
    return name


def depthwise_forward(x, w, b, spec):
    """depthwise.cu's forward of contiguous tensors (stride 1; any channels per group)."""
    return cuda.launch("conv3d", "vc_depthwise_forward", _cuda.geometry(spec), spec.out_shape, x, w, b)


def plugin_forward(algorithm):
    """The plugin's forward of the operator's algorithm ("depthwise" or "direct"): f(x, w, b, spec)."""
    return depthwise_forward if algorithm == "depthwise" else cuda.conv3d_forward


def grad_input(g, w, s, algorithm="direct"):
    """The input gradient on the plugin: at stride 1 the forward's kernel (the depthwise one when it ran the
    forward, which then sums a multiplier's channels; else the generic one) correlating g with the flipped kernel,
    input and output channels swapped within each group, padded by the kernel's reach less the forward's padding;
    the gather kernel at other strides."""
    pads = s.transposed_pads()
    if s.stride != (1, 1, 1) or min(min(p) for p in pads) < 0:
        return cuda.conv3d_grad_input(g, w, s)
    wt = dense.transposed_weight(w, s.groups).flip((2, 3, 4)).contiguous()
    t = ConvSpec(tuple(g.shape), tuple(wt.shape), stride=(1, 1, 1), pads=pads, dilation=s.dilation, groups=s.groups,
                 mode="constant")
    return plugin_forward(algorithm)(g, wt, None, t)


def fft_conv3d(x, w, b, spec):
    """The convolution by torch.fft (cuFFT on a GPU), differentiable by torch's autograd: the padded input and
    the dilated kernel transformed at fft_lengths, the input spectra times the kernels' conjugate spectra (a
    correlation) summed over each group's channels, transformed back, and the output's strided positions taken."""
    N, C = x.shape[:2]
    O, Cg = w.shape[:2]
    G = spec.groups
    pads = [p for lo_hi in reversed(spec.pads) for p in lo_hi]   # F.pad: the last axis first
    x = torch.nn.functional.pad(x, pads) if any(pads) else x
    if spec.dilation != (1, 1, 1):   # the taps spread out, zeros between them
        (dd, dh, dw), wide = spec.dilation, w.new_zeros((O, Cg) + tuple(r + 1 for r in spec.reach()))
        wide[:, :, ::dd, ::dh, ::dw] = w
        w = wide
    lengths, axes = fft_lengths(spec), (2, 3, 4)
    xs = torch.fft.rfftn(x, s=lengths, dim=axes)
    ws = torch.fft.rfftn(w, s=lengths, dim=axes).conj()
    freqs = xs.shape[2:]
    ys = torch.einsum("ngc...,goc...->ngo...", xs.reshape(N, G, Cg, *freqs), ws.reshape(G, O // G, Cg, *freqs))
    y = torch.fft.irfftn(ys.reshape(N, O, *freqs), s=lengths, dim=axes)
    y = y[tuple([Ellipsis] + [slice(0, (n - 1) * s + 1, s) for n, s in zip(spec.out_shape[2:], spec.stride)])]
    if b is not None:
        y = y + b.reshape(1, -1, 1, 1, 1)
    return y.contiguous()


# the algorithms computed by torch's own ops (autograd by torch), on tensors zero-padded by spec
TORCH_ALGORITHMS = {"torch": dense.torch_conv3d_tensors, "fft": fft_conv3d}


def _volume(shape):
    return float(math.prod(shape))
