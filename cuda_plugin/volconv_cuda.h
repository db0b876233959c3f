/* volconv's CUDA plugin: a plain C interface over device pointers, loaded by volconv/_cuda.py with ctypes.
 * No torch headers: nvcc alone builds it, on a machine without a GPU too.
 *
 * Every function returns 0 or an error code (vc_cuda_error_string says what it is: a CUDA error, or a
 * geometry the kernel cannot take); `stream` is the caller's cudaStream_t (torch's current stream).
 * Every op function has one form, which volconv/_torch/cuda.py's `launch` calls:
 *   int name(int dtype, const void *input..., void *output..., const long long *params, void *stream)
 * params: host int64 values (for conv geometry, the 22 below, then whatever the op adds).
 * One file per op family (conv3d.cu, ...); what they share is in vc_common.cuh; plugin.cu holds the three below.
 * dtype: 0 float32, 1 float64. Arrays are contiguous, layout NCDHW; weights (O, C/groups, kd, kh, kw).
 * geom (int64[22]): N, C, D, H, W, O, groups, kd, kh, kw, Do, Ho, Wo, sd, sh, sw, pd, ph, pw, dd, dh, dw
 * (torch.conv3d semantics with zero padding pd/ph/pw before each axis; the caller pads for other modes). */
#ifndef VOLCONV_CUDA_H
#define VOLCONV_CUDA_H

#ifdef __cplusplus
extern "C" {
#endif

int vc_cuda_abi(void);                 /* bumped when a signature changes */
const char *vc_cuda_error_string(int code);
int vc_cuda_device_count(void);        /* 0 without a GPU or a driver */

/* out = conv3d(x, w, b); b may be NULL. */
int vc_conv3d_forward(int dtype, const void *x, const void *w, const void *b, void *out, const long long *geom,
                      void *stream);
/* gx = d loss / d x for grad = d loss / d out: each input voxel gathers the output voxels that read it. */
int vc_conv3d_grad_input(int dtype, const void *grad, const void *w, void *gx, const long long *geom,
                         void *stream);
/* gw = d loss / d w: one block per weight, a fixed-order reduction (deterministic). */
int vc_conv3d_grad_weight(int dtype, const void *x, const void *grad, void *gw, const long long *geom,
                          void *stream);

/* ---- separable (separable.cu): depthwise rank-1 components, the spatial part of CP convolutions ---- */
/* out[n, c] = z[n, c] correlated with fd[c] (x) fh[c] (x) fw[c]; fd (C, kd), fh (C, kh), fw (C, kw); geom as
 * above with O = groups = C, (kd, kh, kw) the factors' lengths; the before-pads may be negative (a crop). */
int vc_separable_forward(int dtype, const void *z, const void *fd, const void *fh, const void *fw, void *out,
                         const long long *geom, void *stream);
/* gf (C, k) = d loss / d factor of one axis: y (z filtered along the other two axes) as (N, C, P, L, M), grad as
 * (N, C, P, Lo, M), gf[c, a] = sum grad[n, c, p, o, m] y[n, c, p, o * s - pad + a * dil, m] (zero outside L).
 * params (int64[11]): N, C, P, L, M, Lo, k, s, pad, dil, chunks; partials (C, k, chunks): the workspace of the
 * fixed-order reduction (deterministic). */
int vc_separable_grad_factor(int dtype, const void *y, const void *grad, void *partials, void *gf,
                             const long long *params, void *stream);

#ifdef __cplusplus
}
#endif
#endif
