"""Shared helpers for the volconv test-suite.

Reference results are always computed in float64 (torch for conv3d, scipy.ndimage for correlate/convolve), so
the only error a comparison sees is volconv's own. Tolerances are element-wise and derived from the arithmetic
(see ``conv_tolerance``); they are never fudge factors fitted to whatever the implementation happens to give.
"""
import contextlib
import ctypes
import importlib.util
import math
import os
import tempfile
import types

import numpy as np
import pytest

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - torch is a test dependency, but keep the error readable
    torch = None
    F = None


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: runs on volconv's CUDA plugin: on a CUDA GPU, or on the CPU emulator "
                                       "with VOLCONV_CUDA_EMULATOR=1 (skipped otherwise)")
    config.addinivalue_line("markers", "slow: longer-running tests (deselect with -m 'not slow')")


@pytest.fixture(scope="session", autouse=True)
def _cost_model_defaults(tmp_path_factory):
    """Every test sees the cost model's built-in constants: a calibration the developer stored (`volconv bench
    --calibrate`, in ~/.cache/volconv) would change what "auto" runs. The cache directory is an empty one of the
    session's (subprocesses inherit it); tests of the calibration point it at their own."""
    from volconv.engine import calibration

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VOLCONV_CACHE_DIR", str(tmp_path_factory.mktemp("volconv-cache")))
        patch.delenv("VOLCONV_CALIBRATION", raising=False)
        calibration.reset()
        yield
    calibration.reset()


# --------------------------------------------------------------------------------------------------------------
# generators
# --------------------------------------------------------------------------------------------------------------

SEED = 20240611


@pytest.fixture
def rng(request):
    """A numpy Generator seeded from a fixed seed and the test's own id: reproducible, independent per test."""
    digest = sum((i + 1) * ord(c) for i, c in enumerate(request.node.nodeid)) % (2**32)
    return np.random.default_rng([SEED, digest])


def config_rng(*keys):
    """Generator for a parametrized random configuration: fixed seed + the configuration's index."""
    return np.random.default_rng([SEED, *keys])


# --------------------------------------------------------------------------------------------------------------
# conversions
# --------------------------------------------------------------------------------------------------------------

def is_tensor(x):
    return torch is not None and isinstance(x, torch.Tensor)


def to_numpy(x):
    """numpy or torch (any float dtype, incl. bfloat16) -> numpy, without copying numpy input."""
    if is_tensor(x):
        x = x.detach().cpu()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def to_f64(x):
    return None if x is None else to_numpy(x).astype(np.float64)


def triple(v):
    return (int(v),) * 3 if np.isscalar(v) else tuple(int(t) for t in v)


# --------------------------------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------------------------------

TORCH_PAD_MODE = {"reflect": "reflect", "replicate": "replicate", "circular": "circular"}


def explicit_padding(padding, kernel_size, dilation):
    """torch conv3d padding -> ((lo, hi),) * 3; 'same' puts the odd extra at the end, like torch."""
    if padding == "valid":
        return ((0, 0),) * 3
    if padding == "same":
        out = []
        for k, d in zip(kernel_size, dilation):
            total = d * (k - 1)
            out.append((total // 2, total - total // 2))
        return tuple(out)
    return tuple((p, p) for p in triple(padding))


def ref_conv3d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros"):
    """torch.nn.Conv3d semantics, computed in float64.

    Returns (ref, mag): ref = the exact-ish result, mag = conv(|x_padded|, |w|) + |b|, the per-output sum of the
    magnitudes of the terms that make the result (what rounding errors scale with)."""
    xt = torch.from_numpy(to_f64(x))
    wt = torch.from_numpy(to_f64(w))
    bt = None if b is None else torch.from_numpy(to_f64(b))
    dil = triple(dilation)
    pads = explicit_padding(padding, wt.shape[2:], dil)
    flat = (pads[2][0], pads[2][1], pads[1][0], pads[1][1], pads[0][0], pads[0][1])  # F.pad order: W, H, D
    if padding_mode == "zeros":
        xp = F.pad(xt, flat, mode="constant", value=0.0)
    else:
        xp = F.pad(xt, flat, mode=TORCH_PAD_MODE[padding_mode])
    st = triple(stride)
    ref = F.conv3d(xp, wt, bt, st, 0, dil, groups)
    mag = F.conv3d(xp.abs(), wt.abs(), None if bt is None else bt.abs(), st, 0, dil, groups)
    return ref.numpy(), mag.numpy()


def scipy_reference(func_name, volume, kernel, mode="reflect", cval=0.0, origin=0):
    """scipy.ndimage.correlate / convolve computed on float64 copies (scipy would round to an integer input's
    dtype; volconv promotes to float instead). Returns (ref, mag) like ref_conv3d."""
    import scipy.ndimage as ndi

    func = getattr(ndi, func_name)
    v = to_f64(volume)
    k = to_f64(kernel)
    ref = func(v, k, mode=mode, cval=cval, origin=origin)
    mag = func(np.abs(v), np.abs(k), mode=mode, cval=abs(cval), origin=origin)
    return ref, mag


# --------------------------------------------------------------------------------------------------------------
# tolerances
# --------------------------------------------------------------------------------------------------------------

# Unit of the float type a result is COMPUTED in (half types are computed in float32, then rounded).
def _eps(dtype):
    return float(np.finfo(np.dtype(dtype)).eps)


# Unit roundoff of the float type a result is RETURNED in, for the final rounding of half types.
_HALF_UNIT = {"float16": 2.0**-11, "bfloat16": 2.0**-8}

# FFT error coefficient. A length-N FFT has a relative (L2) error of about eps * log2(N); a convolution by FFT
# goes forward twice, multiplies and goes back, so its error is a few eps * log2(N) times the largest magnitude
# the output could reach, spread evenly over the whole output (FFT errors are global, not per element).
# Calibrated on scipy.fft (pocketfft) convolutions: observed max error / (eps*log2 N*max mag) stays below ~0.3
# for float32 and float64 on the shapes used here; 4 leaves an order of magnitude of margin while a wrong result
# (shift by one voxel, wrong flip, missing channel) is off by O(max mag) and fails by ~10^5 in float32.
FFT_COEFF = 4.0


def conv_tolerance(mag, dtype, n_terms, algorithm, n_fft=None):
    """Element-wise tolerance for comparing a result against the float64 reference.

    mag      per-output sum |w|*|x| (+|b|), from ref_conv3d / scipy_reference.
    dtype    the dtype volconv computes in (float32 or float64).
    n_terms  products summed per output (kernel voxels * input channels per group).
    algorithm "direct" | "torch" | "fft" | "auto" (auto may choose either, so it gets the larger of the two).

    direct: each output is a sum of n_terms rounded products. The rigorous bound for ANY summation order is
    gamma_{n+2} * mag (Higham, Thm 3.1 / 4.3; +2 for the product and the bias). Rounding errors are independent
    in practice, so the error grows like sqrt(n) * eps * mag; 4*sqrt(n+2)*eps is ~7 standard deviations of that
    random walk. We take the smaller of the two: tight for tiny kernels, realistic for big ones.
    fft: FFT_COEFF * eps * log2(N) * max(mag), a global bound (see FFT_COEFF), plus the direct bound for the
    final additions (bias, channel sums done in the spatial domain).
    """
    eps = _eps(dtype)
    unit = eps / 2
    n = n_terms + 2
    gamma = n * unit / (1 - n * unit)
    direct = min(gamma, 4.0 * math.sqrt(n) * eps) * mag
    if algorithm in ("direct", "torch"):
        return direct
    if algorithm not in ("fft", "auto"):
        raise ValueError(algorithm)
    n_fft = max(int(n_fft or mag.size), 2)
    scale = float(np.max(mag)) if mag.size else 0.0
    return direct + FFT_COEFF * eps * math.log2(n_fft) * scale


def half_rounding(ref, out_dtype_name):
    """Extra tolerance when the result is returned in float16/bfloat16: the float32 result is rounded once to the
    narrow type (half a unit of it), and the rounding may go the other way than the reference's (so one unit)."""
    unit = _HALF_UNIT.get(out_dtype_name, 0.0)
    return 2 * unit * np.abs(ref)


def assert_within(out, ref, tol, context=""):
    """Element-wise |out - ref| <= tol. NaN in out where ref is finite FAILS (a bare `err > tol` would not)."""
    out = to_f64(out)
    assert out.shape == ref.shape, f"{context}: shape {out.shape} != reference {ref.shape}"
    err = np.abs(out - ref)
    ok = err <= tol  # False for NaN
    if not ok.all():
        bad = np.argwhere(~ok)
        i = tuple(bad[0])
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.nanmax(np.where(ok, 0, err / np.maximum(tol, 1e-300)))
        raise AssertionError(
            f"{context}: {len(bad)} of {out.size} elements outside tolerance; max err {np.nanmax(err):.3e} "
            f"(NaN: {int(np.isnan(out).sum())}); first bad at {i}: got {out[i]!r}, expected {ref[i]!r}, "
            f"tol {tol[i] if np.ndim(tol) else tol:.3e}; worst err/tol {ratio:.3g}")


def n_fft_points(x_shape, w_shape, pads):
    """Rough FFT length: padded input plus kernel extent (only enters as log2)."""
    return int(np.prod([s + lo + hi + k for s, (lo, hi), k in zip(x_shape[2:], pads, w_shape[2:])]))


def check_conv3d(out, x, w, b=None, *, stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros",
                 algorithm="auto", context=""):
    """Compare a vc.conv3d result with torch's (float64), with the tolerance of the algorithm that made it;
    also checks the container type and dtype are the caller's."""
    if is_tensor(x):
        assert is_tensor(out), f"{context}: torch in, got {type(out)} out"
        assert out.dtype == x.dtype, f"{context}: dtype {out.dtype} != input's {x.dtype}"
        assert out.device == x.device
        dt_name = str(x.dtype).replace("torch.", "")
    else:
        assert isinstance(out, np.ndarray), f"{context}: numpy in, got {type(out)} out"
        assert out.dtype == x.dtype, f"{context}: dtype {out.dtype} != input's {x.dtype}"
        dt_name = str(x.dtype)
    compute = np.float64 if dt_name == "float64" else np.float32
    ref, mag = ref_conv3d(x, w, b, stride, padding, dilation, groups, padding_mode)
    wshape = tuple(w.shape)
    pads = explicit_padding(padding, wshape[2:], triple(dilation))
    n_terms = int(np.prod(wshape[1:]))
    tol = conv_tolerance(mag, compute, n_terms, algorithm, n_fft_points(tuple(x.shape), wshape, pads))
    tol = tol + half_rounding(ref, dt_name)
    assert_within(out, ref, tol, context)
    return ref, mag


def valid_padding_for_mode(padding_mode, pads, spatial):
    """torch's own limits on F.pad: reflect needs pad < size, circular pad <= size."""
    for (lo, hi), n in zip(pads, spatial):
        if padding_mode == "reflect" and max(lo, hi) >= n:
            return False
        if padding_mode == "circular" and max(lo, hi) > n:
            return False
    return True


# --------------------------------------------------------------------------------------------------------------
# the CUDA plugin: on a GPU, or on the CPU emulator (VOLCONV_CUDA_EMULATOR=1)
# --------------------------------------------------------------------------------------------------------------
#
# A test marked `cuda` runs on volconv's CUDA plugin and takes its tensors' device from the `device` fixture:
#   - VOLCONV_CUDA_EMULATOR=1: the plugin is compiled from cuda_plugin/'s sources as they are now by g++ with the
#     emulator (cuda_plugin/emulator/build.py; cached by a hash of the sources), loaded through volconv's own loader
#     (VOLCONV_CUDA_LIBRARY), and `device` is "cpu": CPU tensors stand in for device memory. For the test's
#     duration only, the seams between volconv and a GPU answer as on a GPU: _cuda.has_cuda (and volconv.has_cuda)
#     True, _cuda.is_cuda True for every tensor (the one device test of every dispatch), and volconv/_torch/cuda.py
#     sees a torch whose torch.cuda.device is a no-op and whose current stream is null (the emulator's launches are
#     synchronous), and whose torch.empty fills with NaN (an output the kernels never write shows). The library
#     must report no emulator error (barrier divergence, launch limits) by the end of each test.
#     The emulator's own variables pass through: CUDA_EMU_ORDER=forward|reverse|random, CUDA_EMU_SEED,
#     CUDA_EMU_WORKERS; VOLCONV_CUDA_EMULATOR_SANITIZE=address|thread|undefined builds it with a sanitizer
#     (the sanitizer's runtime must then be LD_PRELOADed into python: see .ci/run);
#     VOLCONV_CUDA_EMULATOR_SOURCE=DIR tests the plugin's sources in DIR instead (e.g. a copy with a planted bug).
#   - otherwise, with a GPU and the plugin built (vc.has_cuda()): `device` is "cuda", nothing is patched.
#   - otherwise the test is skipped, and nothing is built.
# Either way the `cuda_plugin` fixture records every call into the plugin (cuda_plugin.calls: name, dtype code)
# and cuda_plugin.cpu_engine() is a context in which volconv computes CPU tensors on its CPU engine again.

EMULATOR = os.environ.get("VOLCONV_CUDA_EMULATOR", "") not in ("", "0")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def emulator_builder():
    """cuda_plugin/emulator/build.py, loaded by path (it imports nothing from volconv)."""
    spec = importlib.util.spec_from_file_location("volconv_cuda_emulator_build",
                                                  os.path.join(_ROOT, "cuda_plugin", "emulator", "build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pytest_collection_modifyitems(config, items):
    if EMULATOR or not any(item.get_closest_marker("cuda") for item in items):
        return
    import volconv as vc

    if vc.has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and volconv's CUDA plugin, or VOLCONV_CUDA_EMULATOR=1 "
                                   "(the plugin on the CPU emulator)")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def emulated_plugin_library():
    """Path of the emulated plugin built from cuda_plugin/ now (cached by the sources' hash)."""
    if not EMULATOR:
        pytest.skip("the CUDA emulator runs with VOLCONV_CUDA_EMULATOR=1")
    builder = emulator_builder()
    return builder.build(os.environ.get("VOLCONV_CUDA_EMULATOR_SOURCE") or builder.PLUGIN,
                         sanitize=os.environ.get("VOLCONV_CUDA_EMULATOR_SANITIZE") or None)


class _Through:
    """A module seen through: the attributes given here replace the module's, every other is the module's."""

    def __init__(self, real, **override):
        self._real = real
        self.__dict__.update(override)

    def __getattr__(self, name):
        return getattr(self._real, name)


class CudaPlugin:
    """What a cuda test knows of the plugin it runs on (the `cuda_plugin` fixture)."""

    def __init__(self, emulated, library=None):
        self.emulated = emulated
        self.library = library
        self.device = "cpu" if emulated else "cuda"
        self.calls = []          # (plugin function, dtype code) of every call, in order
        self._on_plugin = True   # emulated: whether a CPU tensor counts as a CUDA one

    @contextlib.contextmanager
    def cpu_engine(self):
        """volconv computes CPU tensors on its CPU engine inside (emulated; on a GPU CPU tensors always do)."""
        self._on_plugin = False
        try:
            yield
        finally:
            self._on_plugin = True

    def names(self):
        return [c[0] for c in self.calls]


def _emulator_errors(library):
    return ctypes.CDLL(library).cuda_emu_errors()


def _recording(launch, directory):
    """launch, also writing each call (its function, dtype code, inputs, output sizes and params) to a file in
    directory, in the format cuda_plugin/emulator/replay.cpp reads."""
    import struct

    def record(op, name, params, shape, *inputs):
        out = launch(op, name, params, shape, *inputs)
        outs = out if isinstance(out, tuple) else (out,)
        parts = [b"VCR1", struct.pack("<i", len(name)), name.encode(),
                 struct.pack("<ii", 0 if inputs[0].dtype.itemsize == 4 else 1, len(inputs))]
        for t in inputs:
            data = b"" if t is None else t.detach().cpu().contiguous().numpy().tobytes()
            parts += [struct.pack("<q", -1 if t is None else len(data)), data]
        parts.append(struct.pack("<i", len(outs)) + b"".join(struct.pack("<q", o.numel() * o.element_size())
                                                             for o in outs))
        values = np.ctypeslib.as_array(params).astype("<i8")
        parts.append(struct.pack("<i", values.size) + values.tobytes())
        os.makedirs(directory, exist_ok=True)
        fd, _ = tempfile.mkstemp(suffix=".vcr", prefix=name + "_", dir=directory)
        with os.fdopen(fd, "wb") as f:
            f.write(b"".join(parts))
        return out
    return record


@pytest.fixture
def cuda_plugin(request, monkeypatch):
    """The plugin for a cuda-marked test: the emulated one (seams patched for this test only) or the GPU's."""
    import torch

    import volconv
    from volconv import _cuda
    from volconv._torch import cuda as tcuda

    if EMULATOR:
        library = request.getfixturevalue("emulated_plugin_library")
        plugin = CudaPlugin(True, library)
        monkeypatch.setenv("VOLCONV_CUDA_LIBRARY", library)
        monkeypatch.setattr(_cuda, "_lib", None)
        monkeypatch.setattr(_cuda, "_load_error", None)
        assert _cuda._library() is not None, _cuda._load_error
        monkeypatch.setattr(_cuda, "has_cuda", lambda: True)
        monkeypatch.setattr(volconv, "has_cuda", _cuda.has_cuda)
        real_is_cuda = _cuda.is_cuda
        monkeypatch.setattr(_cuda, "is_cuda", lambda a: real_is_cuda(a) or (plugin._on_plugin and isinstance(
            a, torch.Tensor)))
        null_stream = types.SimpleNamespace(cuda_stream=0)

        def empty_nan(*args, **kwargs):
            return torch.empty(*args, **kwargs).fill_(float("nan"))

        monkeypatch.setattr(tcuda, "torch", _Through(torch, empty=empty_nan, cuda=_Through(
            torch.cuda, device=lambda device: contextlib.nullcontext(),
            current_stream=lambda device=None: null_stream)))
        errors_before = _emulator_errors(library)
        if os.environ.get("VOLCONV_CUDA_RECORD"):   # every launch saved for cuda_plugin/emulator/replay.py (TSan)
            monkeypatch.setattr(tcuda, "launch", _recording(tcuda.launch, os.environ["VOLCONV_CUDA_RECORD"]))
    else:
        plugin = CudaPlugin(False)
    real_call = _cuda.call

    def call(op, name, *args):
        plugin.calls.append((name, args[0]))
        return real_call(op, name, *args)

    monkeypatch.setattr(_cuda, "call", call)
    yield plugin
    if EMULATOR:
        assert _emulator_errors(library) == errors_before, "the CUDA emulator reported errors (see stderr)"


@pytest.fixture
def device(cuda_plugin):
    """Where a cuda test puts its tensors: "cuda" on a GPU, "cpu" on the emulated plugin."""
    return cuda_plugin.device


@pytest.fixture(autouse=True)
def _cuda_marked_tests_run_on_the_plugin(request):
    """Every cuda-marked test runs with the plugin set up, whether or not it asks for the fixture."""
    if request.node.get_closest_marker("cuda") is not None:
        request.getfixturevalue("cuda_plugin")
