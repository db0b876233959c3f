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
/* gx = d loss / d x for grad = d loss / d out: each input voxel gathers the output voxels that read it, stepping
 * through the taps of its residue class per axis (any stride; at stride 1 the caller may run the forward on the
 * flipped, channel-swapped weight instead). */
int vc_conv3d_grad_input(int dtype, const void *grad, const void *w, void *gx, const long long *geom,
                         void *stream);
/* gw = d loss / d w: tiles of the output in shared memory, each block the taps of one channel pair (or a box of
 * them) over a fixed slice of tiles; the slices' partial sums (a workspace from the stream's memory pool,
 * cudaMallocAsync, freed on the stream; none when one slice suffices) added in a fixed order: the same bits on every
 * run, no atomics. */
int vc_conv3d_grad_weight(int dtype, const void *x, const void *grad, void *gw, const long long *geom,
                          void *stream);

/* ---- depthwise (depthwise.cu) ---- */
/* out = conv3d(x, w, b) at stride 1 (any dilation, groups; made for C / groups == 1 and large kernels): a block
 * holds an input tile plus halo in shared memory, each thread a strip of 8 outputs along W in registers. The
 * geometry must have stride 1 and (TY + kh - 1) * tile_w(kw) + kh * kw elements within 96 KiB of shared memory
 * (depthwise.cu; volconv/_torch/cuda_dense.py mirrors it), else BAD_GEOMETRY. b may be NULL. */
int vc_depthwise_forward(int dtype, const void *x, const void *w, const void *b, void *out, const long long *geom,
                         void *stream);

/* ---- sparse (sparse.cu) ---- */
/* A weight given by its non-zero taps, cost by the non-zeros.
 * taps (int64): ptr[lists + 1], then 4 values per tap (volconv/_torch/sparse.py builds them); values: the taps'
 * values in that order. */
/* out = conv3d(x, w, b) with list o = output channel o's taps (c within the group, a, b, e); b may be NULL. */
int vc_sparse_conv3d_forward(int dtype, const void *x, const void *values, const void *taps, const void *b,
                             void *out, const long long *geom, void *stream);
/* gx = d loss / d x (any stride; geom is the forward's): list c * S + k (S = sd * sh * sw) holds input channel c's
 * taps of residue class k = (rd * sh + rh) * sw + rw, where a * dd = qd * sd + rd (so b, e), as
 * (o within the group, qd, qh, qw). At stride 1 the caller may use the forward on the transposed list instead. */
int vc_sparse_conv3d_grad_input(int dtype, const void *grad, const void *values, const void *taps, void *gx,
                                const long long *geom, void *stream);
/* gv = d loss / d values, the forward's list; params: geom, nnz, slices; partial: slices * nnz scratch values.
 * Per slice of output rows a fixed-order partial sum, then the slices in order (deterministic). */
int vc_sparse_conv3d_grad_values(int dtype, const void *x, const void *grad, const void *taps, void *gv,
                                 void *partial, const long long *params, void *stream);

/* ---- nested (nested.cu) ---- */
/* Nested chains and multi-scale branches, depthwise (groups == channels, one input channel per output
 * channel), 'same' zero padding, stride 1. params: N, C, D, H, W, count, flag, TH, TW, CD (output tile rows and
 * columns per block, output planes per block's chunk: chosen by the caller so that the rings fit 48 KiB), then
 * per stage / branch the values below. BAD_ARGUMENT when the shared memory would not fit.
 * Chain: count = L stages (<= 4), flag = activation between stages (0 none, 1 relu, 2 gelu, 3 silu); per stage
 * kd, kh, kw; w: every stage's (C, 1, k) weights one after another; b: L * C biases (zeros for none). */
int vc_nested_depthwise_forward(int dtype, const void *x, const void *w, const void *b, void *out,
                                const long long *params, void *stream);
/* Branches: count = B branches (<= 8), flag = 1 summed, 0 concatenated (branch order); per branch m (output
 * channels per input channel), kd, kh, kw, dd, dh, dw; w: every branch's (m * C, 1, k) weights one after another;
 * b: every branch's m * C biases. */
int vc_multiscale_depthwise_forward(int dtype, const void *x, const void *w, const void *b, void *out,
                                    const long long *params, void *stream);

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

/* ---- dynamic (dynamic.cu): per-voxel kernels, vc.dynamic_conv3d ---- */
/* params (int64[24], fused 25): the geometry of the layout's ConvSpec (grouped: O = groups = C, weight (C, 1, k);
 * full: O output channels, groups 1), then S (kernel slices: G grouped, O * C full), full (0 / 1), and for the
 * fused forward CB (1, 2 or 4 channels per shared tile). K: (N, S, kd*kh*kw, Do, Ho, Wo); grouped: channel c
 * uses slice c / (C / S); full: output o, input c use slice o * C + c. BAD_GEOMETRY when S / O do not match. */
/* out = the dynamic convolution, a thread per output voxel. */
int vc_dynamic_forward(int dtype, const void *x, const void *K, void *out, const long long *params, void *stream);
/* The same, grouped layout only: a block's 8 x 32 output tile of one plane reads the input tile plus halo of CB
 * channels from shared memory, (kd-1)*dd+1 planes x (7 sh + (kh-1) dh + 1) x (31 sw + (kw-1) dw + 1) values per
 * channel, CB of them within 48 KiB (else BAD_ARGUMENT). */
int vc_dynamic_forward_fused(int dtype, const void *x, const void *K, void *out, const long long *params,
                             void *stream);
/* gK = d loss / d K, a thread per entry (its group's channels summed in order). */
int vc_dynamic_grad_kernels(int dtype, const void *x, const void *grad, void *gK, const long long *params,
                            void *stream);
/* gx = d loss / d x, a gather per input voxel over the taps of its residue class (deterministic). */
int vc_dynamic_grad_input(int dtype, const void *K, const void *grad, void *gx, const long long *params,
                          void *stream);

/* ---- adaptive (adaptive.cu): the spatially varying Gaussian of vc.adaptive_filter ---- */
/* out (D, H, W) = xp filtered at every voxel p by the normalised separable Gaussian of sigma[p] / zoom per axis,
 * truncated at the voxel's own radius int(truncate * sigma[p] / zoom + 0.5) (no more than r on that axis), sigma 0:
 * the voxel itself. xp: the volume padded by (rd, rh, rw) on both sides of each axis (the boundary mode's
 * extension, done by the caller); sigma (D, H, W) in the volume's dtype. params (int64[10]): D, H, W, rd, rh, rw,
 * then zd, zh, zw, truncate as the bit patterns of IEEE-754 doubles. */
int vc_adaptive_gaussian(int dtype, const void *xp, const void *sigma, void *out, const long long *params,
                         void *stream);

/* ---- bilateral (bilateral.cu): the exact windowed bilateral filter of vc.bilateral_filter ---- */
/* out (D, H, W)[i] = x[i] + sum_t k_t (x[i + t] - x[i]) / sum_t k_t over the box window's taps t in C order,
 * k_t = exp(max(a_t - b (g[i + t] - g[i])^2, smallest normal's exponent)) (* m[i + t]). xp, gp: the volume and
 * the guide padded by (rd, rh, rw) on both sides of each axis (the boundary mode's extension, done by the caller;
 * invalid voxels holding 0), gp NULL: the volume guides itself; mp: NULL, or the padded 0/1 validity as bytes;
 * a: the (2rd+1)(2rh+1)(2rw+1) taps' spatial terms (<= 0) in the volume's dtype. params (int64[7]): D, H, W, rd,
 * rh, rw, then b = 1 / (2 sigma_range^2) (0: no range term) as the bit pattern of an IEEE-754 double. */
int vc_bilateral(int dtype, const void *xp, const void *gp, const void *mp, const void *a, void *out,
                 const long long *params, void *stream);

#ifdef __cplusplus
}
#endif
#endif
