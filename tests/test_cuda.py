"""The CUDA plugin: loading, build command and errors on any machine; on a GPU (tests marked `cuda`), vc.conv3d
for CUDA tensors against torch.conv3d (cuDNN) and against volconv's CPU path, forward and gradients.

Tolerances: float64 within 1e-10 of the reference's scale, float32 within 1e-4 (the GPU sums in another order
than the CPU, and cuDNN's float32 may use TF32 unless disabled: it is disabled here)."""
import os

import pytest
import torch
import torch.nn.functional as F

import volconv as vc
from volconv import _cuda, cuda

from conftest import config_rng

gpu = pytest.mark.skipif(not vc.has_cuda(), reason="needs a CUDA GPU and volconv's CUDA plugin")


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


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("case", range(16))
def test_conv3d_on_the_gpu_against_cudnn_and_the_cpu(case):
    torch.backends.cudnn.allow_tf32 = False
    r = config_rng(701, case)
    x_shape, w_shape, stride, padding, dilation, groups, mode = random_case(r)
    dtype = [torch.float64, torch.float32][case % 2]
    x = torch.from_numpy(r.standard_normal(x_shape)).to("cuda", dtype).requires_grad_()
    w = torch.from_numpy(r.standard_normal(w_shape)).to("cuda", dtype).requires_grad_()
    b = torch.from_numpy(r.standard_normal(w_shape[0])).to("cuda", dtype).requires_grad_()
    out = vc.conv3d(x, w, b, stride, padding, dilation, groups, padding_mode=mode)
    ref = torch_reference(x, w, b, stride, padding, dilation, groups, mode)
    assert out.device.type == "cuda" and out.dtype == dtype
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    scale = max(1.0, ref.abs().max().item())
    assert (out - ref).abs().max().item() <= tol * scale
    cpu = vc.conv3d(x.detach().cpu(), w.detach().cpu(), b.detach().cpu(), stride, padding, dilation, groups,
                    padding_mode=mode)
    assert (out.cpu() - cpu).abs().max().item() <= tol * scale
    g = torch.randn_like(ref)
    ours = torch.autograd.grad(out, (x, w, b), g)
    theirs = torch.autograd.grad(ref, (x, w, b), g)
    for a, c in zip(ours, theirs):
        assert (a - c).abs().max().item() <= tol * max(1.0, c.abs().max().item()) * 10


@pytest.mark.cuda
@gpu
def test_gpu_gradcheck_and_determinism():
    x = torch.randn(1, 2, 5, 6, 7, device="cuda", dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 1, 3, 2, 3, device="cuda", dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: vc.conv3d(x, w, None, (1, 2, 1), 1, (2, 1, 1), 2), (x, w))
    x32, w32 = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    grads = []
    for _ in range(2):
        out = vc.conv3d(x32, w32, None, 1, 1, 1, 2)
        grads.append(torch.autograd.grad(out, (x32, w32), torch.ones_like(out)))
    assert all(torch.equal(a, b) for a, b in zip(*grads))   # fixed-order reductions, no atomics


@pytest.mark.cuda
@gpu
def test_gpu_ops_without_a_cuda_version_say_so():
    with pytest.raises(RuntimeError, match="no CUDA version"):
        vc.correlate(torch.ones(6, 6, 6, device="cuda"), torch.ones(3, 3, 3, device="cuda"))


@pytest.mark.skipif(cuda.shutil.which("nvcc") is None, reason="needs nvcc")
def test_a_cuda_syntax_error_fails_the_build_and_leaves_nothing(tmp_path):
    (tmp_path / "bad.cu").write_text("__global__ void k() { this is not C++; }\n")
    out = tmp_path / "plugin.so"
    with pytest.raises(RuntimeError, match="nvcc failed to build volconv's CUDA plugin"):
        cuda.build(str(tmp_path), str(out))
    assert not out.exists() and not (tmp_path / "plugin.so.tmp").exists()
