// Sparse 3-D convolution on the GPU: a weight given by its non-zero taps, at a cost that grows with the non-zeros
// (torch.conv3d semantics, zero padding, any groups, stride and dilation). See volconv_cuda.h for the interface.
//
// A tap list (built by the caller, volconv/_torch/sparse.py) is int64: ptr[lists + 1] (list i holds taps
// ptr[i] .. ptr[i + 1] - 1), then 4 values per tap; `values` holds the taps' values in the same order.
//
// Forward: a block is 32 x 4 threads over one output plane of one (n, o); each thread a strip of R outputs along
// W, 32 apart (coalesced), looping over the channel's taps staged in shared memory, CHUNK at a time (value, input
// offset, dilated offsets). A strip whose taps all read inside the input skips the bounds checks: per tap two
// broadcast shared loads, R global loads and R FMAs.
// Input gradient: at stride 1 the forward on the transposed, flipped list (the caller builds it); at other strides
// a gather per input voxel over the taps of its residue class only, a warp's lanes all of one class.
// Values gradient: blocks (a slice of output rows, an output channel) reduce KT taps at a time into partial sums
// (lanes by shuffles, warps in order), a second pass adds the slices in order: deterministic, no atomics.
#include "vc_common.cuh"

namespace {

using vc::Geom;

constexpr int TX = 32, TY = 4;   // forward and gather blocks: threads along W x rows
constexpr int CHUNK = 256;       // taps staged in shared memory at a time
constexpr int KT = 8;            // taps a values-gradient thread accumulates at once
constexpr int WARPS = 8;         // values-gradient block: 8 warps

__host__ __device__ inline long long lesser(long long a, long long b) { return a < b ? a : b; }

// Forward list taps [first, first + m) into shared memory: value, offset in the group's input from the output's
// first input voxel, and the dilated offsets along D, H, W (for the bounds checks). Every thread of the block calls
// it: the barriers protect the previous chunk and publish this one.
template <typename T>
__device__ void stage_forward(const T *values, const long long *coords, long long first, int m, const Geom &g,
                              T *tv, long long *toff, int *ta, int *tb, int *te)
{
    __syncthreads();
    for (int i = threadIdx.y * blockDim.x + threadIdx.x; i < m; i += blockDim.x * blockDim.y) {
        const long long *q = coords + 4 * (first + i);
        const long long a = q[1] * g.dd, bb = q[2] * g.dh, e = q[3] * g.dw;
        tv[i] = values[first + i];
        toff[i] = ((q[0] * g.D + a) * g.H + bb) * g.W + e;
        ta[i] = (int)a;   // (the host checks that the kernel's reach fits an int)
        tb[i] = (int)bb;
        te[i] = (int)e;
    }
    __syncthreads();
}

// Taps (o, c, a, b, e): list o, tap values (c within the group, a, b, e).
// (at most 64 registers, no spills on sm_90 in ptxas -v: 8 blocks of 128 threads, half of an SM's threads)
template <typename T, int R>
__launch_bounds__(TX * TY, 8) __global__ void sparse_forward_kernel(const T *__restrict__ x,
                                                                    const T *__restrict__ values,
                                                                    const long long *__restrict__ taps,
                                                                    const T *__restrict__ b, T *__restrict__ out,
                                                                    Geom g)
{
    VC_SHARED(T, tv, [CHUNK]);
    VC_SHARED(long long, toff, [CHUNK]);
    VC_SHARED(int, ta, [CHUNK]);
    VC_SHARED(int, tb, [CHUNK]);
    VC_SHARED(int, te, [CHUNK]);
    const long long *coords = taps + g.O + 1;
    const long long Cg = g.C / g.G, Og = g.O / g.G, DHW = g.D * g.H * g.W;
    const long long tiles_w = (g.Wo + TX * R - 1) / (TX * R);
    const long long ow0 = (blockIdx.x % tiles_w) * (TX * R) + threadIdx.x;
    const long long oh = (blockIdx.x / tiles_w) * TY + threadIdx.y;
    const long long ih0 = oh * g.sh - g.ph, iw0 = ow0 * g.sw - g.pw, step = TX * g.sw;
    int live = 0;   // the strip's outputs inside the output
    for (int r = 0; r < R; r++)
        live += oh < g.Ho && ow0 + r * TX < g.Wo;
    const bool hw_inside = live == R && ih0 >= 0 && ih0 + (g.kh - 1) * g.dh < g.H && iw0 >= 0 &&
                           iw0 + (R - 1) * step + (g.kw - 1) * g.dw < g.W;
    // grid-stride over (n, o) and output planes: the grid's y and z are capped at 65535, torch's sizes are not
    for (long long z = blockIdx.z; z < g.N * g.O; z += gridDim.z) {
        const long long n = z / g.O, o = z % g.O;
        const long long first = taps[o], count = taps[o + 1] - first;
        const bool resident = count <= CHUNK;   // (block-uniform) staged once for all the block's planes
        if (resident)
            stage_forward(values, coords, first, (int)count, g, tv, toff, ta, tb, te);
        const T *xg = x + (n * g.C + (o / Og) * Cg) * DHW;   // the group's first input channel
        const T bias = b ? b[o] : T(0);
        for (long long od = blockIdx.y; od < g.Do; od += gridDim.y) {
            const long long id0 = od * g.sd - g.pd;
            const bool inside = hw_inside && id0 >= 0 && id0 + (g.kd - 1) * g.dd < g.D;
            const long long xs = (id0 * g.H + ih0) * g.W + iw0;   // the strip's first input voxel (maybe outside)
            T acc[R];
#pragma unroll
            for (int r = 0; r < R; r++)
                acc[r] = bias;
            for (long long c0 = 0; c0 < count; c0 += CHUNK) {
                const int m = (int)lesser(CHUNK, count - c0);
                if (!resident)
                    stage_forward(values, coords, first + c0, m, g, tv, toff, ta, tb, te);
                if (inside) {
#pragma unroll 4
                    for (int t = 0; t < m; t++) {
                        const T v = tv[t];
                        const T *p = xg + (xs + toff[t]);
#pragma unroll
                        for (int r = 0; r < R; r++)
                            acc[r] += v * __ldg(p + r * step);
                    }
                } else if (live) {   // a border strip: every read checked
                    for (int t = 0; t < m; t++) {
                        const long long id = id0 + ta[t], ih = ih0 + tb[t];
                        if (id < 0 || id >= g.D || ih < 0 || ih >= g.H)
                            continue;
                        const T v = tv[t];
#pragma unroll
                        for (int r = 0; r < R; r++) {
                            const long long iw = iw0 + r * step + te[t];
                            if (r < live && iw >= 0 && iw < g.W)
                                acc[r] += v * __ldg(xg + (xs + toff[t] + r * step));
                        }
                    }
                }
            }
            T *row = out + (((n * g.O + o) * g.Do + od) * g.Ho + oh) * g.Wo + ow0;
#pragma unroll
            for (int r = 0; r < R; r++)
                if (r < live)
                    row[r * TX] = acc[r];
        }
    }
}

// Gather list taps [first, first + m): value, offset in the group's output gradient from the (Qd, Qh, Qw)
// position, and the quotients (the bounds checks). Block-wide, like stage_forward.
template <typename T>
__device__ void stage_gather(const T *values, const long long *coords, long long first, int m, const Geom &g,
                             T *tv, long long *toff, long long *tqd, long long *tqh, long long *tqw)
{
    __syncthreads();
    for (int i = threadIdx.y * blockDim.x + threadIdx.x; i < m; i += blockDim.x * blockDim.y) {
        const long long *q = coords + 4 * (first + i);
        tv[i] = values[first + i];
        toff[i] = q[0] * g.Do * g.Ho * g.Wo - (q[1] * g.Ho + q[2]) * g.Wo - q[3];
        tqd[i] = q[1];
        tqh[i] = q[2];
        tqw[i] = q[3];
    }
    __syncthreads();
}

// The input gradient at any stride: input voxel u (along an axis, u = i + pad = s * Q + rho) receives output
// Q - q through a tap at dilated offset s * q + rho, so only the taps of its residue class (rho_d, rho_h, rho_w)
// contribute. Lists: input channel c's class k = (rho_d * sh + rho_h) * sw + rho_w is list c * S + k (S = sd sh sw),
// tap values (o within the group, qd, qh, qw). A block covers 32 * sw columns: thread x takes columns
// w0 + r + sw * x for r < sw, so a warp's lanes share a class (no divergence) and read consecutive gradients.
template <typename T>
__global__ void sparse_grad_input_kernel(const T *__restrict__ grad, const T *__restrict__ values,
                                         const long long *__restrict__ taps, T *__restrict__ gx, Geom g)
{
    VC_SHARED(T, tv, [CHUNK]);
    VC_SHARED(long long, toff, [CHUNK]);
    VC_SHARED(long long, tqd, [CHUNK]);
    VC_SHARED(long long, tqh, [CHUNK]);
    VC_SHARED(long long, tqw, [CHUNK]);
    const long long S = g.sd * g.sh * g.sw, *coords = taps + g.C * S + 1;
    const long long Cg = g.C / g.G, Og = g.O / g.G, DHWo = g.Do * g.Ho * g.Wo;
    const long long span = TX * g.sw, tiles_w = (g.W + span - 1) / span;
    const long long w0 = (blockIdx.x % tiles_w) * span;
    const long long ih = (blockIdx.x / tiles_w) * TY + threadIdx.y;
    const long long Qh = (ih + g.ph) / g.sh, rho_h = (ih + g.ph) % g.sh;
    for (long long z = blockIdx.z; z < g.N * g.C; z += gridDim.z) {
        const long long n = z / g.C, c = z % g.C;
        const long long first = taps[c * S], count = taps[(c + 1) * S] - first;
        const bool resident = count <= CHUNK;
        if (resident)
            stage_gather(values, coords, first, (int)count, g, tv, toff, tqd, tqh, tqw);
        const T *gg = grad + (n * g.O + (c / Cg) * Og) * DHWo;   // the group's first output channel
        for (long long id = blockIdx.y; id < g.D; id += gridDim.y) {
            const long long Qd = (id + g.pd) / g.sd, rho_d = (id + g.pd) % g.sd;
            for (long long r = 0; r < g.sw; r++) {
                const long long iw = w0 + r + g.sw * threadIdx.x, u0 = w0 + r + g.pw;
                const long long Qw = u0 / g.sw + threadIdx.x, rho_w = u0 % g.sw;
                const bool mine = ih < g.H && iw < g.W;
                long long lo = 0, hi = 0;   // this thread's class within the channel's taps
                if (mine) {
                    const long long k = c * S + (rho_d * g.sh + rho_h) * g.sw + rho_w;
                    lo = taps[k] - first;
                    hi = taps[k + 1] - first;
                }
                const long long at = (Qd * g.Ho + Qh) * g.Wo + Qw;
                T acc = 0;
                for (long long c0 = 0; c0 < count; c0 += CHUNK) {
                    const int m = (int)lesser(CHUNK, count - c0);
                    if (!resident)
                        stage_gather(values, coords, first + c0, m, g, tv, toff, tqd, tqh, tqw);
                    const int t1 = (int)lesser(hi - c0, m);
                    for (int t = (int)(lo > c0 ? lo - c0 : 0); t < t1; t++) {
                        const long long od = Qd - tqd[t], oh = Qh - tqh[t], ow = Qw - tqw[t];
                        if (od >= 0 && od < g.Do && oh >= 0 && oh < g.Ho && ow >= 0 && ow < g.Wo)
                            acc += tv[t] * __ldg(gg + (at + toff[t]));
                    }
                }
                if (mine)
                    gx[(((n * g.C + c) * g.D + id) * g.H + ih) * g.W + iw] = acc;
            }
        }
    }
}

// Partial values gradient: block (slice, o) sums grad[n, o, od, oh, ow] * x[n, c, od sd - pd + a, ...] over the
// slice's output rows (n, od, oh) for every tap of o, KT taps at a time, into partial[slice * nnz + tap]. Lanes
// cover a row's columns (32 apart), or 32 / Wo rows at once when Wo < 32; warps take every 8th row group.
template <typename T>
__global__ void sparse_grad_values_kernel(const T *__restrict__ x, const T *__restrict__ grad,
                                          const long long *__restrict__ taps, T *__restrict__ partial, Geom g,
                                          long long nnz, long long rows_per_slice)
{
    VC_SHARED(T, warp_sums, [WARPS][KT]);
    VC_SHARED(long long, tc, [KT]);   // the group's taps: input channel offset, dilated offsets along D, H, W
    VC_SHARED(long long, ta, [KT]);
    VC_SHARED(long long, tb, [KT]);
    VC_SHARED(long long, te, [KT]);
    VC_SHARED(long long, tlo, [KT]);   // and the output columns whose input column is inside: [tlo, thi)
    VC_SHARED(long long, thi, [KT]);
    const long long *coords = taps + g.O + 1;
    const long long Cg = g.C / g.G, Og = g.O / g.G, DHW = g.D * g.H * g.W;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const long long wspan = g.Wo < 32 ? g.Wo : 32, per_warp = 32 / wspan;
    const long long sub = lane / wspan, col0 = lane % wspan;
    const long long total = g.N * g.Do * g.Ho, begin = blockIdx.x * rows_per_slice;
    const long long end = lesser(total, begin + rows_per_slice);
    // rows advance by `jump` = (jn * Do + jd) * Ho + jh: added digit by digit with carries, no division per row
    const long long jump = WARPS * per_warp, jh = jump % g.Ho, jd = (jump / g.Ho) % g.Do;
    const long long jn = jump / (g.Ho * g.Do);
    const long long row0 = begin + warp * per_warp + sub;
    for (long long o = blockIdx.y; o < g.O; o += gridDim.y) {
        const long long first = taps[o], count = taps[o + 1] - first;
        for (long long k0 = 0; k0 < count; k0 += KT) {
            const int nk = (int)lesser(KT, count - k0);
            __syncthreads();   // the previous group's sums are read
            if (threadIdx.x < nk) {
                const long long *q = coords + 4 * (first + k0 + threadIdx.x);
                const long long e = q[3] * g.dw;
                tc[threadIdx.x] = ((o / Og) * Cg + q[0]) * DHW;
                ta[threadIdx.x] = q[1] * g.dd;
                tb[threadIdx.x] = q[2] * g.dh;
                te[threadIdx.x] = e;
                // ow sw - pw + e in [0, W)  <=>  ceil((pw - e) / sw) <= ow <= (W - 1 + pw - e) / sw
                const long long lo = g.pw - e > 0 ? (g.pw - e + g.sw - 1) / g.sw : 0;
                const long long top = g.W - 1 + g.pw - e;
                tlo[threadIdx.x] = lo;
                thi[threadIdx.x] = top < 0 ? 0 : lesser(g.Wo, top / g.sw + 1);
            }
            __syncthreads();
            T acc[KT];
#pragma unroll
            for (int k = 0; k < KT; k++)
                acc[k] = 0;
            if (sub < per_warp && row0 < end) {
                long long oh = row0 % g.Ho, od = (row0 / g.Ho) % g.Do, n = row0 / (g.Ho * g.Do);
                for (long long row = row0; row < end; row += jump) {
                    long long xrow[KT];   // per tap: the input row it reads (ow sw - pw + e added per column)
                    unsigned ok = 0;
#pragma unroll
                    for (int k = 0; k < KT; k++) {
                        xrow[k] = 0;
                        if (k < nk) {
                            const long long id = od * g.sd - g.pd + ta[k], ih = oh * g.sh - g.ph + tb[k];
                            xrow[k] = tc[k] + n * g.C * DHW + (id * g.H + ih) * g.W - g.pw + te[k];
                            if (id >= 0 && id < g.D && ih >= 0 && ih < g.H)
                                ok |= 1u << k;
                        }
                    }
                    const T *grow = grad + ((n * g.O + o) * g.Do + od) * g.Ho * g.Wo + oh * g.Wo;
                    for (long long ow = col0; ow < g.Wo; ow += wspan) {
                        const T gv = __ldg(grow + ow);
#pragma unroll
                        for (int k = 0; k < KT; k++)
                            if ((ok >> k & 1) && ow >= tlo[k] && ow < thi[k])
                                acc[k] += gv * __ldg(x + (xrow[k] + ow * g.sw));
                    }
                    oh += jh;   // the next row of this thread
                    if (oh >= g.Ho) {
                        oh -= g.Ho;
                        od++;
                    }
                    od += jd;
                    if (od >= g.Do) {
                        od -= g.Do;
                        n++;
                    }
                    n += jn;
                }
            }
#pragma unroll
            for (int k = 0; k < KT; k++) {   // a fixed shuffle tree over the lanes, then the warps in order
                T v = acc[k];
                for (int d = 16; d > 0; d >>= 1)
                    v += __shfl_down_sync(0xffffffffu, v, d);
                if (lane == 0)
                    warp_sums[warp][k] = v;
            }
            __syncthreads();
            if (threadIdx.x < nk) {
                T s = 0;
                for (int w = 0; w < WARPS; w++)
                    s += warp_sums[w][threadIdx.x];
                partial[blockIdx.x * nnz + first + k0 + threadIdx.x] = s;
            }
        }
    }
}

// gv[t] = the sum of partial[s * nnz + t] over the slices s, in order.
template <typename T>
__global__ void sparse_sum_slices_kernel(const T *__restrict__ partial, T *__restrict__ gv, long long nnz,
                                         long long slices)
{
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < nnz;
         t += (long long)gridDim.x * blockDim.x) {
        T s = 0;
        for (long long i = 0; i < slices; i++)
            s += partial[i * nnz + t];
        gv[t] = s;
    }
}

template <typename T>
int forward(const void *x, const void *values, const void *taps, const void *b, void *out, const Geom &g,
            cudaStream_t stream)
{
    if (g.N == 0)
        return 0;
    if ((g.kd - 1) * g.dd > 0x7fffffffLL || (g.kh - 1) * g.dh > 0x7fffffffLL || (g.kw - 1) * g.dw > 0x7fffffffLL)
        return vc::BAD_GEOMETRY;   // the staged taps' offsets are ints
    const int R = g.Wo > 2 * TX ? 4 : 1;   // strips of 4 for wide planes; narrow ones keep every thread busy
    const long long tiles = ((g.Wo + TX * R - 1) / (TX * R)) * ((g.Ho + TY - 1) / TY);
    if (tiles > 0x7fffffffLL)
        return vc::BAD_GEOMETRY;
    const dim3 block(TX, TY), grid((unsigned)tiles, (unsigned)lesser(g.Do, 65535),
                                   (unsigned)lesser(g.N * g.O, 65535));
    const T *xt = static_cast<const T *>(x), *vt = static_cast<const T *>(values), *bt = static_cast<const T *>(b);
    const long long *tt = static_cast<const long long *>(taps);
    if (R == 4)
        VC_LAUNCH((sparse_forward_kernel<T, 4>), grid, block, 0, stream)(xt, vt, tt, bt, static_cast<T *>(out), g);
    else
        VC_LAUNCH((sparse_forward_kernel<T, 1>), grid, block, 0, stream)(xt, vt, tt, bt, static_cast<T *>(out), g);
    return vc::status(cudaGetLastError());
}

template <typename T>
int grad_input(const void *grad, const void *values, const void *taps, void *gx, const Geom &g,
               cudaStream_t stream)
{
    if (g.N == 0)
        return 0;
    const long long span = TX * g.sw, tiles = ((g.W + span - 1) / span) * ((g.H + TY - 1) / TY);
    if (tiles > 0x7fffffffLL)
        return vc::BAD_GEOMETRY;
    const dim3 block(TX, TY), grid((unsigned)tiles, (unsigned)lesser(g.D, 65535),
                                   (unsigned)lesser(g.N * g.C, 65535));
    VC_LAUNCH(sparse_grad_input_kernel<T>, grid, block, 0, stream)(
        static_cast<const T *>(grad), static_cast<const T *>(values), static_cast<const long long *>(taps),
        static_cast<T *>(gx), g);
    return vc::status(cudaGetLastError());
}

template <typename T>
int grad_values(const void *x, const void *grad, const void *taps, void *gv, void *partial, const Geom &g,
                long long nnz, long long slices, cudaStream_t stream)
{
    if (nnz < 0 || slices < 1 || slices > 0x7fffffffLL)
        return vc::BAD_ARGUMENT;
    if (nnz == 0)
        return 0;
    const long long rows = g.N * g.Do * g.Ho, per_slice = (rows + slices - 1) / slices;
    const dim3 grid((unsigned)slices, (unsigned)lesser(g.O, 65535));
    VC_LAUNCH(sparse_grad_values_kernel<T>, grid, WARPS * 32, 0, stream)(
        static_cast<const T *>(x), static_cast<const T *>(grad), static_cast<const long long *>(taps),
        static_cast<T *>(partial), g, nnz, per_slice);
    VC_LAUNCH(sparse_sum_slices_kernel<T>, vc::grid_for(nnz, 256), 256, 0, stream)(
        static_cast<const T *>(partial), static_cast<T *>(gv), nnz, slices);
    return vc::status(cudaGetLastError());
}

}  // namespace

extern "C" {

int vc_sparse_conv3d_forward(int dtype, const void *x, const void *values, const void *taps, const void *b,
                             void *out, const long long *geom, void *stream)
{
    return vc::checked(dtype, geom, [&](auto zero, const Geom &g) {
        return forward<decltype(zero)>(x, values, taps, b, out, g, static_cast<cudaStream_t>(stream));
    });
}

int vc_sparse_conv3d_grad_input(int dtype, const void *grad, const void *values, const void *taps, void *gx,
                                const long long *geom, void *stream)
{
    return vc::checked(dtype, geom, [&](auto zero, const Geom &g) {
        return grad_input<decltype(zero)>(grad, values, taps, gx, g, static_cast<cudaStream_t>(stream));
    });
}

int vc_sparse_conv3d_grad_values(int dtype, const void *x, const void *grad, const void *taps, void *gv,
                                 void *partial, const long long *params, void *stream)
{
    return vc::checked(dtype, params, [&](auto zero, const Geom &g) {
        return grad_values<decltype(zero)>(x, grad, taps, gv, partial, g, params[22], params[23],
                                           static_cast<cudaStream_t>(stream));
    });
}

}  // extern "C"
