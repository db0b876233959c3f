"""vc.dynamic_conv3d on the CUDA plugin (cuda_plugin/dynamic.cu): forward, kernel-field gradient and input
gradient of contiguous tensors of one dtype on one device, both layouts (engine/dynamic.py's Layout).

What runs where: the grouped layout with every kernel extent <= FUSED_MAX_K, at most FUSED_MAX_GROUPS groups and an
input tile of at least one channel within 48 KiB of shared memory (as dynamic.cu sizes it): the fused forward (input
tile in shared memory, CB channels per tile); every other forward: the general kernel (a thread per output voxel).
The gradients: one kernel each (a thread per kernel-field entry; the input gradient a gather per input voxel)."""
from .. import _cuda
from . import cuda

FUSED_MAX_K, FUSED_MAX_GROUPS = 5, 4
FX, FY, SHARED_BYTES = 32, 8, 48 * 1024   # dynamic.cu's fused tile (output columns x rows) and its shared memory


def _params(layout, *extra):
    return _cuda.geometry(layout.spec, layout.k_slices, int(layout.full), *extra)


def fused_channels(layout, itemsize):
    """CB, the channels per shared tile of the fused forward (4, 2 or 1), or 0 when the fused kernel does not
    take this layout."""
    s = layout.spec
    if layout.full or layout.k_slices > FUSED_MAX_GROUPS or max(layout.kernel_size) > FUSED_MAX_K:
        return 0
    (kd, kh, kw), (_, sh, sw), (dd, dh, dw) = layout.kernel_size, s.stride, s.dilation
    per_channel = ((kd - 1) * dd + 1) * ((FY - 1) * sh + (kh - 1) * dh + 1) * ((FX - 1) * sw + (kw - 1) * dw + 1)
    Cg = s.x_shape[1] // layout.k_slices
    for cb in (4, 2, 1):
        if cb <= max(Cg, 1) and cb * per_channel * itemsize <= SHARED_BYTES:
            return cb
    return 0


def forward(x, K, layout, fused=None):
    """out = dynamic_conv3d(x, K); fused: None chooses (fused_channels), False forces the general kernel."""
    cb = fused_channels(layout, x.element_size()) if fused is not False else 0
    if cb:
        return cuda.launch("dynamic_conv3d", "vc_dynamic_forward_fused", _params(layout, cb), layout.out_shape, x, K)
    return cuda.launch("dynamic_conv3d", "vc_dynamic_forward", _params(layout), layout.out_shape, x, K)


def grad_kernels(x, grad, layout, k_shape):
    return cuda.launch("dynamic_conv3d backward (kernels)", "vc_dynamic_grad_kernels", _params(layout),
                       tuple(k_shape), x, grad)


def grad_input(K, grad, layout, x_shape):
    return cuda.launch("dynamic_conv3d backward (input)", "vc_dynamic_grad_input", _params(layout), tuple(x_shape),
                       K, grad)
