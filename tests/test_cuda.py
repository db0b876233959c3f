"""The CUDA plugin: loading, build command and errors on any machine; the tests marked `cuda` run vc.conv3d and
vc.nn.Conv3d on the plugin through the public API, against torch.conv3d and volconv's CPU path, forward and
gradients. They run on a GPU (device "cuda"), or with VOLCONV_CUDA_EMULATOR=1 on the plugin compiled for the CPU
emulator (device "cpu": CPU tensors stand in for device memory; see the `cuda_plugin` fixture in conftest.py).

Every cuda test checks the plugin's own calls (cuda_plugin.calls), so a test that passes through the CPU engine
by mistake fails; shapes are small but span interior and boundary tiles (the forward's 32 x 8 tiles, several
blocks of the gather and of the reductions), every padding mode, strides, dilations and groups.

Tolerances: float64 within 1e-10 of the reference's scale, float32 within 1e-4 (the plugin sums in another order
than the CPU, and cuDNN's float32 may use TF32 unless disabled: it is disabled here, and restored after)."""
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

import volconv as vc
from volconv import _cuda, cuda

from conftest import EMULATOR, config_rng, emulator_builder

FORWARD, GRAD_INPUT, GRAD_WEIGHT = "vc_conv3d_forward", "vc_conv3d_grad_input", "vc_conv3d_grad_weight"
DEPTHWISE = "vc_depthwise_forward"
FORWARDS = (FORWARD, DEPTHWISE)   # the generic kernel, or the depthwise one where the choice takes it (test_cuda_dense)


def backward_ran(names, weight=True):
    """names: a forward, the input gradient (the gather kernel, or at stride 1 a forward kernel with the
    flipped weight) and, when `weight`, the weight gradient; nothing else."""
    return len(names) == 2 + weight and names[0] in FORWARDS and names[1] in (GRAD_INPUT, *FORWARDS) and \
        (not weight or names[2] == GRAD_WEIGHT)


@pytest.fixture(autouse=True)
def no_tf32(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def test_plugin_state_is_reported_clearly():
    built = os.path.exists(_cuda.LIBRARY)
    with pytest.raises(RuntimeError) as e:
        _cuda.require("conv3d")
    message = str(e.value)
    if not built:
        assert message.startswith("volconv was built without its CUDA plugin") and "volconv.cuda build" in message
    elif not torch.cuda.is_available():
        assert "no CUDA GPU is available" in message
        assert _cuda._library().vc_cuda_device_count() == 0
    else:
        assert "no CUDA version" in message


def test_build_command_targets_and_errors(tmp_path):
    cmd = cuda.nvcc_command(["a.cu"], "out.so", "nvcc")
    assert "-gencode=arch=compute_80,code=sm_80" in cmd and "-gencode=arch=compute_90,code=sm_90" in cmd
    assert "-gencode=arch=compute_90,code=compute_90" in cmd   # PTX for newer GPUs
    assert cuda.main(["build", "--source", str(tmp_path)]) == 1   # no .cu files there
    with pytest.raises(RuntimeError, match="no CUDA sources"):
        cuda.build(str(tmp_path))
    (tmp_path / "k.cu").write_text("")
    with pytest.MonkeyPatch.context() as m:
        m.setenv("PATH", "")   # no nvcc to be found
        with pytest.raises(RuntimeError, match="nvcc not found"):
            cuda.build(str(tmp_path))


@pytest.mark.skipif(cuda.shutil.which("nvcc") is None, reason="needs nvcc")
def test_a_cuda_syntax_error_fails_the_build_and_leaves_nothing(tmp_path):
    (tmp_path / "bad.cu").write_text("__global__ void k() { this is not C++; }\n")
    out = tmp_path / "plugin.so"
    with pytest.raises(RuntimeError, match="nvcc failed to build volconv's CUDA plugin"):
        cuda.build(str(tmp_path), str(out))
    assert not out.exists() and not (tmp_path / "plugin.so.tmp").exists()


def test_the_plugin_uses_no_cuda_syntax_the_emulator_cannot_compile():
    """Launches and shared memory go through vc_launch.cuh's macros (nvcc and the emulator expand them)."""
    for name in os.listdir(emulator_builder().PLUGIN):
        if name.endswith((".cu", ".cuh")) and name != "vc_launch.cuh":
            text = open(os.path.join(emulator_builder().PLUGIN, name)).read()
            code = re.sub(r"//[^\n]*|/\*.*?\*/", "", text, flags=re.S)
            assert "<<<" not in code and "__shared__" not in code, name


# ---- helpers ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["reflect", "mirror", "nearest", "wrap", "constant"])
def test_the_gpu_padding_has_a_fixed_order_backward_equal_to_index_selects(mode):
    """_torch.reference._Gather (the GPU's padding: its backward adds the pads' planes in turn instead of
    index_select's atomics) against index_select, values and gradients, pads wider than the axis and crops, and
    twice differentiable."""
    from volconv._torch.reference import _Gather
    from volconv._validate import pad_index

    r = config_rng(706, ["reflect", "mirror", "nearest", "wrap", "constant"].index(mode))
    for lo, hi in [(3, 2), (0, 4), (-1, 2), (5, 0), (-2, -1), (7, 9)]:
        x = torch.from_numpy(r.standard_normal((2, 3, 6))).requires_grad_()
        idx = pad_index(6, lo, hi, mode)
        ours, ref = _Gather.apply(x, 2, idx, lo), x.index_select(2, torch.from_numpy(np.maximum(idx, 0)))
        g = torch.from_numpy(r.standard_normal(ref.shape)) * torch.from_numpy(idx >= 0)   # (constants: masked)
        assert torch.equal(ours, ref)
        assert torch.allclose(torch.autograd.grad(ours, x, g)[0], torch.autograd.grad(ref, x, g)[0], atol=1e-12)
        assert torch.autograd.gradgradcheck(lambda x: _Gather.apply(x, 2, idx, lo), (x,))


def random_case(r):
    groups = int(r.choice([1, 2, 4]))
    C, O = groups * int(r.integers(1, 3)), groups * int(r.integers(1, 3))
    k = tuple(int(v) for v in r.integers(1, 6, size=3))
    stride = tuple(int(v) for v in r.integers(1, 3, size=3))
    dilation = tuple(int(v) for v in r.integers(1, 3, size=3))
    padding = tuple(int(v) for v in r.integers(0, 3, size=3))
    shape = tuple(int(max(kk * d + 1, v)) for kk, d, v in zip(k, dilation, r.integers(4, 14, size=3)))
    mode = str(r.choice(["zeros", "zeros", "reflect", "replicate", "circular"]))
    if mode != "zeros":
        padding = tuple(min(p, n - 1) for p, n in zip(padding, shape))
    return (int(r.integers(1, 3)), C) + shape, (O, C // groups) + k, stride, padding, dilation, groups, mode


def torch_reference(x, w, b, stride, padding, dilation, groups, mode):
    if mode != "zeros":
        x = F.pad(x, [p for q in reversed(padding) for p in (q, q)], mode=mode)
        padding = 0
    return F.conv3d(x, w, b, stride, padding, dilation, groups)


def tolerance(dtype):
    return 1e-10 if dtype == torch.float64 else 1e-4


def close(a, ref, tol, factor=1.0):
    """|a - ref| within tol of ref's scale; NaN (an output no kernel wrote) fails."""
    a, ref = a.detach().cpu().double(), ref.detach().cpu().double()
    assert a.shape == ref.shape, (a.shape, ref.shape)
    assert not a.isnan().any(), "NaN in the plugin's result"
    err = (a - ref).abs().max().item() if a.numel() else 0.0
    assert err <= tol * factor * max(1.0, ref.abs().max().item() if ref.numel() else 0.0), err


def tensors(r, device, dtype, *shapes):
    return [torch.from_numpy(r.standard_normal(s)).to(device, dtype).requires_grad_() for s in shapes]


def check_on_plugin(cuda_plugin, x, w, b, stride, padding, dilation, groups, mode):
    """vc.conv3d on the plugin against torch and the CPU path: forward and the gradients of (x, w, b); returns the
    output. The plugin must have computed all three (one call each)."""
    tol = tolerance(x.dtype)
    leaves = [t for t in (x, w, b) if t is not None]
    cuda_plugin.calls.clear()
    out = vc.conv3d(x, w, b, stride, padding, dilation, groups, padding_mode=mode)
    g = torch.randn_like(out)
    ours = torch.autograd.grad(out, leaves, g)
    assert backward_ran(cuda_plugin.names()), cuda_plugin.names()
    assert {c[1] for c in cuda_plugin.calls} == {1 if x.dtype == torch.float64 else 0}   # the dtype code
    assert out.device == x.device and out.dtype == x.dtype
    ref = torch_reference(x, w, b, stride, padding, dilation, groups, mode)
    close(out.detach(), ref.detach(), tol)
    for a, c in zip(ours, torch.autograd.grad(ref, leaves, g)):
        close(a, c, tol, 10)
    with cuda_plugin.cpu_engine():
        cpu = vc.conv3d(*(None if t is None else t.detach().cpu() for t in (x, w, b)), stride, padding, dilation,
                        groups, padding_mode=mode)
    assert backward_ran(cuda_plugin.names())   # the CPU engine, not the plugin
    close(out.detach().cpu(), cpu, tol)
    return out


# ---- on the plugin (GPU or emulator) ------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("case", range(16))
def test_conv3d_on_the_plugin_against_torch_and_the_cpu(case, cuda_plugin, device):
    r = config_rng(701, case)
    x_shape, w_shape, stride, padding, dilation, groups, mode = random_case(r)
    dtype = [torch.float64, torch.float32][case % 2]
    x, w, b = tensors(r, device, dtype, x_shape, w_shape, w_shape[:1])
    check_on_plugin(cuda_plugin, x, w, b, stride, padding, dilation, groups, mode)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_padding_mode_and_dtype_across_interior_and_boundary_tiles(mode, dtype, cuda_plugin, device):
    """Output 5 x 10 x 36 per channel: two forward tiles along W (32 + a partial one) and two along H (8 + 2),
    asymmetric padding per axis, stride, dilation, groups and a bias."""
    r = config_rng(702, ["zeros", "reflect", "replicate", "circular"].index(mode), int(dtype == torch.float64))
    x, w, b = tensors(r, device, dtype, (2, 4, 5, 20, 38), (4, 2, 3, 2, 3), (4,))
    check_on_plugin(cuda_plugin, x, w, b, (1, 2, 1), (1, 1, 0), (1, 1, 2), 2, mode)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weights_too_large_for_shared_memory(dtype, cuda_plugin, device):
    """(C / groups) * taps * sizeof(T) > 48 KiB: the forward reads its weights from global memory."""
    C = 13000 // 27 + 1 if dtype == torch.float32 else 6500 // 27 + 1
    r = config_rng(703, int(dtype == torch.float64))
    x, w = tensors(r, device, dtype, (1, C, 3, 3, 4), (1, C, 3, 3, 3))
    assert C * 27 * x.element_size() > 48 * 1024
    check_on_plugin(cuda_plugin, x, w, None, 1, 1, 1, 1, "zeros")


@pytest.mark.cuda
def test_padding_same_even_kernel_and_depthwise(cuda_plugin, device):
    r = config_rng(704)
    x, w = tensors(r, device, torch.float64, (2, 3, 7, 6, 5), (3, 1, 4, 2, 3))
    check_on_plugin(cuda_plugin, x, w, None, 1, "same", (1, 2, 1), 3, "zeros")


@pytest.mark.cuda
def test_gradcheck_and_bitwise_determinism(cuda_plugin, device, monkeypatch):
    """gradcheck in float64 through the plugin; float32 results and gradients bit-identical when run again (fixed
    order reductions, no atomics), on the emulator also in every thread and block order."""
    x = torch.randn(1, 2, 5, 6, 7, device=device, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 1, 3, 2, 3, device=device, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: vc.conv3d(x, w, None, (1, 2, 1), 1, (2, 1, 1), 2), (x, w))
    assert {FORWARD, GRAD_WEIGHT} <= set(cuda_plugin.names()) <= {FORWARD, GRAD_INPUT, GRAD_WEIGHT}
    x32, w32 = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    results = []
    for order in ("forward", "reverse", "random") if cuda_plugin.emulated else (None, None):
        if order:
            monkeypatch.setenv("CUDA_EMU_ORDER", order)
        out = vc.conv3d(x32, w32, None, 1, 1, 1, 2)
        results.append((out,) + torch.autograd.grad(out, (x32, w32), torch.ones_like(out)))
    assert all(torch.equal(a, b) for r in results[1:] for a, b in zip(results[0], r))


@pytest.mark.cuda
def test_gradcheck_through_the_padding_modes(cuda_plugin, device):
    x = torch.randn(1, 2, 4, 5, 4, device=device, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 2, 2, 3, 2, device=device, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, device=device, dtype=torch.float64, requires_grad=True)
    for mode in ("reflect", "replicate", "circular"):
        assert torch.autograd.gradcheck(lambda x, w, b: vc.conv3d(x, w, b, 1, (1, 2, 1), padding_mode=mode),
                                        (x, w, b))
    assert {FORWARD, GRAD_WEIGHT} <= set(cuda_plugin.names()) <= {FORWARD, GRAD_INPUT, GRAD_WEIGHT}


@pytest.mark.cuda
def test_double_backward_unbatched_partial_gradients_and_a_numpy_weight(cuda_plugin, device):
    x = torch.randn(1, 2, 5, 5, 5, device=device, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 2, 3, 3, 3, device=device, dtype=torch.float64, requires_grad=True)
    out = vc.conv3d(x, w, None, 1, 1, padding_mode="reflect")
    (gx,) = torch.autograd.grad(out.square().sum(), (x,), create_graph=True)
    (gw2,) = torch.autograd.grad(gx.square().sum(), (w,))
    ref = torch_reference(x, w, None, 1, (1, 1, 1), 1, 1, "reflect")
    (rgx,) = torch.autograd.grad(ref.square().sum(), (x,), create_graph=True)
    close(gx.detach(), rgx.detach(), 1e-10)
    close(gw2, torch.autograd.grad(rgx.square().sum(), (w,))[0], 1e-9)
    assert backward_ran(cuda_plugin.names()[:2], weight=False)
    # a 4-D input, only the weight needs a gradient: no input-gradient launch
    x4 = torch.randn(3, 6, 5, 7, device=device, dtype=torch.float64)
    cuda_plugin.calls.clear()
    w3 = torch.randn(2, 3, 3, 3, 3, device=device, dtype=torch.float64, requires_grad=True)
    out = vc.conv3d(x4, w3, None, 1, 1)
    (gw,) = torch.autograd.grad(out.sum(), (w3,))
    assert cuda_plugin.names() == [FORWARD, GRAD_WEIGHT]
    ref = F.conv3d(x4[None], w3, None, 1, 1)[0]
    close(out.detach(), ref.detach(), 1e-10)
    close(gw, torch.autograd.grad(ref.sum(), (w3,))[0], 1e-10)
    if device == "cpu":   # a numpy weight with a tensor input (on a GPU the weight would have to move first)
        close(vc.conv3d(x4, w3.detach().numpy(), None, 1, 1), ref.detach(), 1e-10)


@pytest.mark.cuda
def test_half_types_and_non_contiguous_inputs(cuda_plugin, device):
    x = torch.randn(1, 4, 6, 5, 7, device=device, dtype=torch.float64)
    w = torch.randn(2, 4, 3, 3, 3, device=device, dtype=torch.float64)
    ref = F.conv3d(x, w, None, 1, 1)
    for xi in (x.to(memory_format=torch.channels_last_3d), x.transpose(2, 4).contiguous().transpose(2, 4)):
        assert not xi.is_contiguous()
        cuda_plugin.calls.clear()
        close(vc.conv3d(xi, w, None, 1, 1, 1, 1), ref, 1e-12)
        assert cuda_plugin.names() == [FORWARD]
    for dt in (torch.float16, torch.bfloat16):
        cuda_plugin.calls.clear()
        out = vc.conv3d(x.to(dt), w.to(dt), None, 1, 1, 1, 1)
        assert cuda_plugin.calls == [(FORWARD, 0)]   # computed in float32
        assert out.dtype == dt
        expect = F.conv3d(x.to(dt).double(), w.to(dt).double(), None, 1, 1)
        assert torch.allclose(out.double(), expect, rtol=2e-2, atol=5e-2)


@pytest.mark.cuda
def test_the_layer_trains_like_torch_conv3d(cuda_plugin, device):
    """vc.nn.Conv3d (and from_conv) on the plugin: forward and the parameters' gradients as torch.nn.Conv3d's."""
    torch.manual_seed(7)
    ref = torch.nn.Conv3d(4, 6, (3, 2, 3), stride=(1, 2, 1), padding=(1, 1, 2), groups=2, padding_mode="replicate",
                          device=device, dtype=torch.float64)
    x = torch.randn(2, 4, 6, 9, 34, device=device, dtype=torch.float64)
    for layer in (vc.nn.Conv3d.from_conv(ref), vc.nn.Conv3d(4, 6, (3, 2, 3), stride=(1, 2, 1), padding=(1, 1, 2),
                                                              groups=2, padding_mode="replicate", device=device,
                                                              dtype=torch.float64)):
        layer.load_state_dict(ref.state_dict())
        cuda_plugin.calls.clear()
        out = layer(x)
        grads = torch.autograd.grad(out.square().sum(), (layer.weight, layer.bias))
        assert cuda_plugin.names() == [FORWARD, GRAD_WEIGHT]
        r = ref(x)
        close(out.detach(), r.detach(), 1e-10)
        for a, c in zip(grads, torch.autograd.grad(r.square().sum(), (ref.weight, ref.bias))):
            close(a, c, 1e-10, 10)


@pytest.mark.cuda
def test_geometries_beyond_the_grid_limits_and_an_empty_batch(cuda_plugin, device):
    """N * O > 65535 and Do > 65535 are legal in torch, and the forward strides over the grid's capped y and z;
    the backward kernels have no such limits. N == 0: the front door runs one item of zeros, the plugin is called
    and the result is empty; the plugin itself takes N == 0 too (nothing to compute)."""
    for x_shape, w_shape in [((257, 1, 1, 1, 1), (256, 1, 1, 1, 1)), ((1, 1, 65537, 1, 1), (1, 1, 2, 1, 1))]:
        x = torch.randn(x_shape, device=device, requires_grad=True)
        w = torch.randn(w_shape, device=device, requires_grad=True)
        cuda_plugin.calls.clear()
        out = vc.conv3d(x, w)
        out.backward(torch.ones_like(out))
        assert backward_ran(cuda_plugin.names()), cuda_plugin.names()
        xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        ref = F.conv3d(xr, wr)   # torch's own
        ref.backward(torch.ones_like(ref))
        assert torch.allclose(out.detach(), ref, atol=1e-5) and torch.allclose(x.grad, xr.grad, atol=1e-5)
        assert torch.allclose(w.grad, wr.grad, rtol=1e-4, atol=1e-3)
    x, w = torch.randn(0, 1, 3, 3, 3, device=device), torch.randn(1, 1, 1, 1, 1, device=device)
    cuda_plugin.calls.clear()
    out = vc.conv3d(x, w)
    assert out.shape == F.conv3d(x, w).shape == (0, 1, 3, 3, 3)
    assert len(cuda_plugin.names()) == 1 and cuda_plugin.names()[0] in FORWARDS


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["reflect", "constant", "nearest", "mirror", "wrap", "grid-wrap"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_correlate_and_convolve_on_the_plugin_against_scipy(mode, dtype, cuda_plugin, device):
    """scipy.ndimage's filters of a CUDA volume: the plugin's conv3d, the volume padded (every mode, the cval,
    the origin's shift) by torch; against scipy.ndimage on the CPU, and gradients against volconv's CPU path."""
    r = np.random.default_rng(7)
    v = r.standard_normal((7, 9, 10))
    k = r.standard_normal((4, 3, 5))   # even and odd sizes
    for fn, ref_fn, origin, cval in ((vc.correlate, ndimage.correlate, (1, 0, -1), 1.5),
                                     (vc.convolve, ndimage.convolve, 0, -2.0)):
        vt = torch.tensor(v, dtype=dtype, device=device, requires_grad=True)
        kt = torch.tensor(k, dtype=dtype, device=device, requires_grad=True)
        cuda_plugin.calls.clear()
        out = fn(vt, kt, mode=mode, cval=cval, origin=origin)
        g = torch.randn_like(out)
        gv, gk = torch.autograd.grad(out, (vt, kt), g)
        assert backward_ran(cuda_plugin.names()), cuda_plugin.names()
        assert out.dtype == dtype and out.device == vt.device
        close(out.detach().cpu(), torch.from_numpy(ref_fn(v, k, mode=mode, cval=cval, origin=origin)).to(dtype),
              tolerance(dtype))
        with cuda_plugin.cpu_engine():
            vc_, kc = (torch.tensor(a, dtype=dtype, requires_grad=True) for a in (v, k))
            cv, ck = torch.autograd.grad(fn(vc_, kc, mode=mode, cval=cval, origin=origin), (vc_, kc), g.cpu())
        close(gv.cpu(), cv, tolerance(dtype), 10)
        close(gk.cpu(), ck, tolerance(dtype), 10)
    # a kernel object (separable on the CPU) is built densely for the plugin
    vt = torch.tensor(v, dtype=dtype, device=device)
    gauss = vc.kernels.gaussian(1.0)
    close(vc.correlate(vt, gauss, mode=mode).cpu(),
          torch.from_numpy(ndimage.correlate(v, gauss.to_dense(), mode=mode)).to(dtype), tolerance(dtype))


# ---- the emulator's own checks ----------------------------------------------------------------------------------

emulator_only = pytest.mark.skipif(not EMULATOR, reason="checks of the CPU emulator (VOLCONV_CUDA_EMULATOR=1)")


KERNEL = r"__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?"   # a kernel's name follows


def _kernel_names(source):
    return re.findall(KERNEL + r"(\w+)\s*\(", source)


def _empty_kernel(source, name):
    """source with the body of __global__ kernel `name` emptied."""
    start = source.index("{", re.search(KERNEL + name + r"\s*\(", source).end())
    depth = 0
    for i in range(start, len(source)):
        depth += {"{": 1, "}": -1}.get(source[i], 0)
        if depth == 0:
            return source[:start] + "{}" + source[i + 1:]
    raise ValueError(name)


def exercise_conv3d(cuda_plugin, device):
    """The conv3d kernels' check: stride 2, so the input gradient runs its gather kernel."""
    r = config_rng(705)
    x, w, b = tensors(r, device, torch.float64, (1, 2, 4, 9, 35), (2, 2, 3, 3, 3), (2,))
    check_on_plugin(cuda_plugin, x, w, b, 2, 1, 1, 1, "zeros")


@pytest.mark.cuda
def test_every_kernel_once(cuda_plugin, device):
    exercise_conv3d(cuda_plugin, device)


# Every plugin source and its family's check, (test module, function of the cuda_plugin and device fixtures): it
# raises AssertionError when any kernel of that source computes nothing.
EXERCISES = {"conv3d.cu": ("test_cuda", "exercise_conv3d"), "depthwise.cu": ("test_cuda_dense", "exercise_depthwise"),
             "sparse.cu": ("test_cuda_sparse", "exercise_every_kernel"),
             "nested.cu": ("test_cuda_nested", "exercise_every_kernel"),
             "separable.cu": ("test_cuda_lowrank", "exercise_every_kernel"),
             "dynamic.cu": ("test_cuda_dynamic", "exercise_every_kernel"),
             "adaptive.cu": ("test_cuda_adaptive", "exercise_every_kernel"),
             "bilateral.cu": ("test_cuda_bilateral", "exercise_every_kernel")}


@pytest.mark.cuda
@emulator_only
def test_every_kernel_is_exercised_emptying_one_fails_the_checks(cuda_plugin, tmp_path, monkeypatch):
    """Each __global__ kernel of cuda_plugin/ emptied in turn: its family's check fails (the output stays NaN or
    wrong), so a kernel that computes nothing cannot pass the suite. The emulator recompiles only the changed
    source."""
    import importlib

    plugin_dir = emulator_builder().PLUGIN
    sources = {n: open(os.path.join(plugin_dir, n)).read() for n in os.listdir(plugin_dir)
               if n.endswith((".cu", ".cuh", ".h"))}
    kernels = [(n, k) for n, s in sorted(sources.items()) if n.endswith(".cu") for k in _kernel_names(s)]
    assert len(kernels) >= 3, kernels
    unchecked = sorted({n for n, _ in kernels} - set(EXERCISES))
    assert not unchecked, f"kernels in {unchecked} have no check in EXERCISES"
    for n, kernel in kernels:
        module, name = EXERCISES[n]
        exercise = getattr(importlib.import_module(module), name)
        d = tmp_path / kernel
        d.mkdir()
        for m, s in sources.items():
            (d / m).write_text(_empty_kernel(s, kernel) if m == n else s)
        monkeypatch.setenv("VOLCONV_CUDA_LIBRARY", emulator_builder().build(str(d)))
        monkeypatch.setattr(_cuda, "_lib", None)
        monkeypatch.setattr(_cuda, "_load_error", None)
        cuda_plugin.calls.clear()
        with pytest.raises(AssertionError):
            exercise(cuda_plugin, "cpu")


@pytest.mark.cuda
@emulator_only
def test_the_emulated_plugin_is_built_from_the_sources_as_they_are_now(cuda_plugin, tmp_path):
    """The library the suite loads is the build of cuda_plugin/ now; a changed source builds a new one."""
    builder = emulator_builder()
    assert cuda_plugin.library == builder.build(os.environ.get("VOLCONV_CUDA_EMULATOR_SOURCE") or builder.PLUGIN,
                                                sanitize=os.environ.get("VOLCONV_CUDA_EMULATOR_SANITIZE") or None)
    assert os.path.samefile(_cuda._lib._name, cuda_plugin.library)   # loaded by volconv's own loader
    for n in os.listdir(builder.PLUGIN):
        if n.endswith((".cu", ".cuh", ".h")):
            text = open(os.path.join(builder.PLUGIN, n)).read()
            (tmp_path / n).write_text(text + "// changed\n" if n.endswith(".cu") else text)
    assert builder.build(str(tmp_path)) != builder.build()
