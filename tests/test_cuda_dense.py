"""Dense conv3d on CUDA tensors: the plugin's depthwise kernel (cuda_plugin/depthwise.cu) against torch.conv3d, and
the algorithm's choice (volconv/_torch/cuda_dense.py): the depthwise kernel, the generic one, cuDNN (torch's conv3d)
or an FFT (torch.fft), and algorithm= overriding it. Through the public API (vc.conv3d, vc.nn.Conv3d), on a GPU or
the CPU emulator (see tests/test_cuda.py and the fixtures in conftest.py); cuda_plugin.calls says which kernels ran.

Shapes span the depthwise tile (16 rows x 64 columns, strips of 8): one and two tiles along H and W with partial
ones, interior tiles (no bounds checks) and boundary ones (zero-filled halo), dilation (a block per residue class).

Tolerances (test_cuda's `close`): of the reference's scale, float64 1e-10, float32 1e-4; gradients 10x that (sums
in another order than torch's)."""
import pytest
import torch

import volconv as vc
from volconv._torch import cuda_dense
from volconv._validate import ConvSpec

from conftest import config_rng
from test_cuda import FORWARD, GRAD_INPUT, GRAD_WEIGHT, close, tensors, tolerance, torch_reference

pytestmark = pytest.mark.cuda
DEPTHWISE = "vc_depthwise_forward"


def spec(x_shape, w_shape, stride=(1, 1, 1), groups=1):
    """The ConvSpec of a convolution without padding."""
    return ConvSpec(tuple(x_shape), tuple(w_shape), stride=stride, pads=((0, 0),) * 3, dilation=(1, 1, 1),
                    groups=groups, mode="constant")


@pytest.fixture(autouse=True)
def no_tf32(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def run_and_compare(cuda_plugin, x, w, b, padding, dilation, groups, mode="zeros", stride=1, algorithm="auto",
                    factor=1.0):
    """vc.conv3d against torch: the output and the gradients of x, w and b (those that require them); returns the
    plugin functions that ran."""
    tol = tolerance(x.dtype) * factor
    leaves = [t for t in (x, w, b) if t is not None and t.requires_grad]
    cuda_plugin.calls.clear()
    out = vc.conv3d(x, w, b, stride, padding, dilation, groups, padding_mode=mode, algorithm=algorithm)
    ref = torch_reference(x, w, b, stride, padding, dilation, groups, mode)
    close(out.detach(), ref.detach(), tol)
    assert out.dtype == x.dtype and out.device == x.device
    if leaves:
        g = torch.randn_like(out)
        for a, c in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(ref, leaves, g)):
            close(a, c, tol, 10)
    assert {c[1] for c in cuda_plugin.calls} <= {1 if x.dtype == torch.float64 else 0}
    return cuda_plugin.names()


# k, x shape, groups, O, padding, dilation, mode: one channel (groups 1), depthwise, multipliers; W > 64 and
# H > 16 for several tiles with a partial one, W and H below the tile for a lone boundary tile
KERNEL_CASES = [
    (1, (2, 3, 3, 18, 70), 3, 3, 0, 1, "zeros"),
    (2, (1, 1, 4, 17, 66), 1, 1, "same", 1, "zeros"),
    (3, (2, 2, 4, 20, 70), 2, 4, 2, (1, 2, 3), "zeros"),
    (4, (1, 2, 6, 9, 11), 2, 2, (2, 1, 3), 1, "reflect"),
    (7, (1, 1, 8, 19, 21), 1, 2, (3, 3, 3), (1, 1, 2), "circular"),
    (8, (2, 2, 9, 12, 13), 2, 2, (3, 4, 4), 1, "replicate"),
    (13, (1, 1, 13, 18, 20), 1, 1, 6, 1, "zeros"),
]


@pytest.mark.parametrize("case", range(len(KERNEL_CASES)), ids=[f"k{c[0]}" for c in KERNEL_CASES])
def test_depthwise_kernel_against_torch(case, cuda_plugin, device):
    """Forward, input gradient (the depthwise kernel with the flipped kernel, summing a multiplier's channels)
    and weight gradient (the generic plugin kernel) of odd and even cubic kernels, batches, every mode."""
    k, x_shape, groups, O, padding, dilation, mode = KERNEL_CASES[case]
    dtype = [torch.float64, torch.float32][case % 2]
    r = config_rng(901, case)
    x, w, b = tensors(r, device, dtype, x_shape, (O, x_shape[1] // groups, k, k, k), (O,))
    names = run_and_compare(cuda_plugin, x, w, b, padding, dilation, groups, mode)
    assert names[0] == DEPTHWISE and names[1:] in ([DEPTHWISE, GRAD_WEIGHT], [GRAD_INPUT, GRAD_WEIGHT]), names
    if padding != "same":   # the input gradient at stride 1: the depthwise kernel (crops take the gather)
        assert names[1] == DEPTHWISE


def test_interior_tiles_with_dilation_and_anisotropic_kernels(cuda_plugin, device):
    """Output tiles whose input tile plus halo lies inside the volume (the loads without bounds checks), per
    residue class of a dilation along H and W, next to boundary tiles; a kernel (3, 5, 2)."""
    r = config_rng(902)
    for dtype, dilation, k in ((torch.float32, (1, 2, 2), (3, 3, 3)), (torch.float64, 1, (3, 5, 2))):
        x, w = tensors(r, device, dtype, (1, 2, 3, 36, 200), (2, 1) + k)
        names = run_and_compare(cuda_plugin, x, w, None, 0, dilation, 2)
        assert names == [DEPTHWISE, DEPTHWISE, GRAD_WEIGHT], names


def test_the_tile_beyond_48k_of_shared_memory_and_a_one_channel_multiplier(cuda_plugin, device):
    """A (1, 35, 35) float64 kernel: the block's shared memory (tile plus one kernel plane) is 54 KiB, beyond
    the default 48 KiB (the launch opts in); one input channel to three outputs (groups 1)."""
    r = config_rng(903)
    x, w = tensors(r, device, torch.float64, (1, 1, 2, 37, 40), (3, 1, 1, 35, 35))
    assert 48 * 1024 < cuda_dense.depthwise_shared_bytes(35, 35, 8) <= cuda_dense.MAX_SHARED
    names = run_and_compare(cuda_plugin, x, w, None, (0, 1, 0), 1, 1)
    assert names == [DEPTHWISE, DEPTHWISE, GRAD_WEIGHT], names


def test_gradcheck_and_determinism_of_the_depthwise_path(cuda_plugin, device, monkeypatch):
    x = torch.randn(1, 2, 3, 3, 4, device=device, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 1, 2, 2, 3, device=device, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, device=device, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: vc.conv3d(x, w, b, 1, 1, (1, 1, 2), 2), (x, w, b))
    assert set(cuda_plugin.names()) == {DEPTHWISE, GRAD_WEIGHT}
    x32 = torch.randn(2, 2, 5, 17, 66, device=device)
    w32 = torch.randn(2, 1, 3, 3, 3, device=device)
    results = [vc.conv3d(x32, w32, None, 1, 1, 1, 2) for order in ("forward", "reverse", "random")
               if not monkeypatch.setenv("CUDA_EMU_ORDER", order)]
    assert all(torch.equal(results[0], o) for o in results[1:])


def test_the_choice_of_each_case(cuda_plugin, device):
    """Which path runs: the depthwise kernel for one channel per group at stride 1; the generic kernel at other
    strides and for a little channel mixing; cuDNN (no plugin call) for channel mixing."""
    r = config_rng(904)
    cases = [   # x shape, w shape, groups, stride, what ran (forward, input gradient, weight gradient)
        ((1, 2, 6, 7, 9), (2, 1, 3, 3, 3), 2, (1, 2, 1), [FORWARD, GRAD_INPUT, GRAD_WEIGHT]),
        ((1, 2, 5, 6, 7), (3, 2, 3, 3, 3), 1, 1, [FORWARD, FORWARD, GRAD_WEIGHT]),
        ((2, 8, 5, 6, 7), (8, 4, 3, 3, 3), 2, 1, []),   # C / groups and O / groups 4: cuDNN
        ((1, 1, 5, 6, 7), (2, 1, 3, 2, 3), 1, 1, [DEPTHWISE, DEPTHWISE, GRAD_WEIGHT]),
        ((1, 1, 5, 6, 7), (2, 1, 1, 1, 1), 1, 1, [DEPTHWISE, GRAD_INPUT, GRAD_WEIGHT]),   # its gradient: a crop
    ]
    for x_shape, w_shape, groups, stride, expected in cases:
        x, w = tensors(r, device, torch.float64, x_shape, w_shape)
        assert run_and_compare(cuda_plugin, x, w, None, 1, 1, groups, stride=stride) == expected
    # algorithm= overrides the model: "direct" is the generic kernel, "torch" cuDNN, for any layer
    x, w = tensors(r, device, torch.float32, (1, 2, 5, 6, 7), (2, 1, 3, 3, 3))
    assert run_and_compare(cuda_plugin, x, w, None, 1, 1, 2, algorithm="direct") == [FORWARD, FORWARD, GRAD_WEIGHT]
    assert run_and_compare(cuda_plugin, x, w, None, 1, 1, 2, algorithm="torch") == []
    x, w = tensors(r, device, torch.float32, (2, 8, 5, 6, 7), (8, 4, 3, 3, 3))
    assert run_and_compare(cuda_plugin, x, w, None, 1, 1, 2, algorithm="direct") == [FORWARD, FORWARD, GRAD_WEIGHT]


def test_the_cost_model_on_layer_shapes(cuda_plugin):
    """The model's choices on the issue's benchmark shapes (no tensors): depthwise for moderate kernels, the FFT
    for the largest, cuDNN for channel mixing, the generic kernel when the depthwise tile does not fit."""
    def choice(x_shape, w_shape, groups=1, itemsize=4, stride=1):
        spec = ConvSpec(x_shape, w_shape, stride=(stride,) * 3, pads=tuple((k // 2, k // 2) for k in w_shape[2:]),
                        dilation=(1, 1, 1), groups=groups, mode="constant")
        costs = cuda_dense.costs(spec, itemsize)
        return min(costs, key=costs.get)

    assert choice((1, 1, 256, 256, 256), (1, 1, 7, 7, 7)) == "depthwise"
    assert choice((1, 64, 64, 64, 64), (64, 1, 7, 7, 7), 64) == "depthwise"
    assert choice((1, 1, 256, 256, 256), (1, 1, 31, 31, 31)) == "fft"
    assert choice((1, 1, 256, 256, 256), (1, 1, 7, 7, 7), stride=2) == "direct"
    assert choice((2, 64, 32, 32, 32), (64, 64, 3, 3, 3)) == "torch"
    assert choice((1, 4, 32, 32, 32), (4, 2, 3, 3, 3), 2) == "direct"   # 2 channels per group: the generic kernel
    assert choice((1, 1, 64, 64, 64), (1, 1, 3, 61, 61), itemsize=8) == "fft"   # no depthwise tile fits
    assert not cuda_dense.depthwise_suits(spec((1, 1, 64, 64, 64), (1, 1, 3, 61, 61)), 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fft_against_torch(dtype, cuda_plugin, device):
    """algorithm="fft": groups, a multiplier, stride, dilation, asymmetric padding and the padding modes, forward
    and gradients by torch's autograd through torch.fft; no plugin call."""
    r = config_rng(905, int(dtype == torch.float64))
    for x_shape, w_shape, groups, stride, padding, dilation, mode in [
            ((2, 4, 7, 8, 9), (6, 2, 3, 4, 5), 2, (1, 2, 1), (1, 2, 0), (2, 1, 1), "zeros"),
            ((1, 2, 6, 7, 8), (4, 1, 4, 3, 2), 2, 1, "same", 1, "zeros"),
            ((1, 1, 6, 7, 8), (1, 1, 3, 3, 3), 1, (2, 1, 3), (2, 2, 2), (1, 2, 1), "reflect"),
            ((1, 3, 6, 7, 8), (2, 3, 3, 3, 3), 1, 1, (1, 2, 1), 1, "circular")]:
        x, w, b = tensors(r, device, dtype, x_shape, w_shape, w_shape[:1])
        assert run_and_compare(cuda_plugin, x, w, b, padding, dilation, groups, mode, stride, "fft", 10) == []


def test_auto_takes_the_fft_when_the_model_says_so_but_not_for_nan(cuda_plugin, device, monkeypatch):
    """With the model's FFT cost made nil, "auto" takes it; a NaN in the input keeps it off (an FFT would spread
    the NaN over the whole output): the depthwise kernel, NaN where torch has it."""
    monkeypatch.setattr(cuda_dense, "fft_cost", lambda spec, itemsize: 0.0)
    r = config_rng(906)
    x, w = tensors(r, device, torch.float64, (1, 2, 8, 9, 10), (2, 1, 5, 5, 5))
    assert run_and_compare(cuda_plugin, x, w, None, 2, 1, 2) == []
    xn = x.detach().clone()
    xn[0, 1, 4, 4, 4] = float("nan")
    cuda_plugin.calls.clear()
    out = vc.conv3d(xn, w.detach(), None, 1, 2, 1, 2)
    assert cuda_plugin.names() == [DEPTHWISE]
    ref = torch_reference(xn, w.detach(), None, 1, 2, 1, 2, "zeros")
    assert torch.equal(out.isnan(), ref.isnan()) and not out[:, 0].isnan().any()
    close(out.nan_to_num(), ref.nan_to_num(), 1e-10)


def test_the_layer_with_depthwise_groups(cuda_plugin, device):
    """vc.nn.Conv3d(8, 16, 7, groups=8) (a multiplier of 2) with reflect padding: forward, the input's and the
    parameters' gradients as torch.nn.Conv3d's."""
    torch.manual_seed(3)
    ref = torch.nn.Conv3d(8, 16, 7, padding=3, groups=8, padding_mode="reflect", device=device, dtype=torch.float64)
    layer = vc.nn.Conv3d.from_conv(ref)
    x = torch.randn(2, 8, 7, 9, 10, device=device, dtype=torch.float64, requires_grad=True)
    cuda_plugin.calls.clear()
    out = layer(x)
    grads = torch.autograd.grad(out.square().sum(), (x, layer.weight, layer.bias))
    assert cuda_plugin.names() == [DEPTHWISE, DEPTHWISE, GRAD_WEIGHT]
    r = ref(x)
    close(out.detach(), r.detach(), 1e-10)
    for a, c in zip(grads, torch.autograd.grad(r.square().sum(), (x, ref.weight, ref.bias))):
        close(a, c, 1e-10, 10)


def test_the_plugin_refuses_what_the_depthwise_kernel_cannot_take(cuda_plugin, device):
    x, w = torch.zeros(1, 1, 6, 6, 6, device=device), torch.zeros(1, 1, 3, 3, 3, device=device)
    with pytest.raises(RuntimeError, match="a geometry this kernel cannot take"):
        cuda_dense.depthwise_forward(x, w, None, spec(x.shape, w.shape, stride=(1, 2, 1)))
    x, w = torch.zeros(1, 1, 1, 64, 64, device=device), torch.zeros(1, 1, 1, 61, 61, device=device)
    with pytest.raises(RuntimeError, match="a geometry this kernel cannot take"):
        cuda_dense.depthwise_forward(x.double(), w.double(), None, spec(x.shape, w.shape))


def exercise_depthwise(cuda_plugin, device):
    """depthwise.cu's check for test_cuda.py's emptied-kernel test (EXERCISES)."""
    x, w = tensors(config_rng(907), device, torch.float64, (1, 2, 4, 9, 35), (2, 1, 3, 3, 3))
    run_and_compare(cuda_plugin, x, w, None, 1, 1, 2)


def test_every_kernel_once(cuda_plugin, device):
    exercise_depthwise(cuda_plugin, device)
