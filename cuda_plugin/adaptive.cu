// The spatially varying Gaussian (vc.adaptive_filter) on the GPU: at every voxel the volume weighted by the
// separable Gaussian of that voxel's own sigma, out[p] = sum_{a,b,e} wd_p(a) wh_p(b) ww_p(e) xp[p + (a, b, e)],
// w_p(t) = q_p^(t^2) for |t| <= the voxel's radius int(truncate * sigma_p / zoom + 0.5) (scipy's), normalised per
// axis, q_p = exp(-1 / (2 (sigma_p / zoom)^2)); sigma 0 keeps the voxel. The same sums as the CPU engine's
// (engine/dynamic.py's adaptive_gaussian), in another order. See volconv_cuda.h for the interface.
//
// One thread per output voxel, a block a 32 x 8 tile of one output plane (grid-striding over the planes). When
// the tile's reach, (2 rd + 1) x (8 + 2 rh) x (32 + 2 rw) values at the largest radii, fits in shared memory (up
// to 96 KiB, opted in), the block loads it once (about 15 values per output at radius 3, against 343 reads) and
// every tap reads shared memory, conflict-free along W; otherwise the taps read xp through the read-only cache.
// The weights are never stored: each axis's follow as running products (q^((t+1)^2) = q^(t^2) * q^(2t+1), two
// multiplies), and the taps come in mirrored pairs sharing a weight, so a pair costs two loads, an add and
// three multiplies - cheaper than loading the weight. Only the voxel's own reach is summed (a warp waits for
// its widest voxel).
#include <math.h>
#include <string.h>

#include "vc_common.cuh"

namespace {

constexpr int TX = 32, TY = 8;                 // a block's output tile: columns (a warp) x rows
constexpr long long SMEM_DEFAULT = 48 * 1024;   // dynamic shared memory without opting in
constexpr long long SMEM_CAP = 96 * 1024;       // the most a tile opts into (2 blocks of 256 threads per SM)

struct Params {
    long long D, H, W, rd, rh, rw;   // the output's shape; xp's padding on each side (the largest radii)
    double zd, zh, zw, truncate;      // voxel sizes (sigma's unit per voxel) and the truncation in sigmas
};

// One axis of a voxel's Gaussian: the radius, q = exp(-1 / (2 s^2)) and 1 / (the weights' sum).
template <typename T>
struct Axis {
    int own;
    T q, inv_norm;
};

// a * b rounded on its own (never fused into a following add): the radius as numpy computes it
__device__ inline double mul_rn(double a, double b)
{
#ifdef __CUDA_ARCH__
    return __dmul_rn(a, b);
#else
    return a * b;   // (the emulator's g++ -std=c++20 does not contract)
#endif
}

template <typename T>
__device__ Axis<T> axis_of(double sigma, double zoom, double truncate, long long reach)
{
    const double s = sigma / zoom;   // (as the CPU engine computes it, in double: the same radius)
    const double r = floor(mul_rn(truncate, s) + 0.5);
    Axis<T> a;
    a.own = r < (double)reach ? (int)r : (int)reach;
    a.q = s > 0 ? (T)exp(-0.5 / (s * s)) : T(0);   // sigma 0: q = 0, only the centre weighs
    T cur = 1, step = a.q, sum = 0;
    const T q2 = a.q * a.q;
    for (int t = 1; t <= a.own; t++) {   // the same products as the taps below: the weights sum to 1 exactly
        cur *= step;
        step *= q2;
        sum += cur;
    }
    a.inv_norm = T(1) / (T(1) + 2 * sum);
    return a;
}

// sum_e ww(e) x[e], |e| <= own, unnormalised (ww(0) = 1)
template <typename T>
__device__ T row_sum(const T *__restrict__ x, const Axis<T> &aw)
{
    T acc = x[0], cur = 1, step = aw.q;
    const T q2 = aw.q * aw.q;
    for (int e = 1; e <= aw.own; e++) {
        cur *= step;
        step *= q2;
        acc += cur * (x[-e] + x[e]);   // (xp through the read-only cache: const __restrict__)
    }
    return acc;
}

// sum_b wh(b) row_sum(row b), |b| <= own
template <typename T>
__device__ T plane_sum(const T *__restrict__ x, long long row, const Axis<T> &ah, const Axis<T> &aw)
{
    T acc = row_sum(x, aw), cur = 1, step = ah.q;
    const T q2 = ah.q * ah.q;
    const T *up = x, *down = x;
    for (int b = 1; b <= ah.own; b++) {
        cur *= step;
        step *= q2;
        up -= row;
        down += row;
        acc += cur * (row_sum(up, aw) + row_sum(down, aw));
    }
    return acc;
}

template <typename T, bool TILED>
__global__ void __launch_bounds__(TX * TY) adaptive_gaussian_kernel(const T *__restrict__ xp,
                                                                    const T *__restrict__ sigma,
                                                                    T *__restrict__ out, Params p)
{
    VC_DYNAMIC_SHARED(unsigned char, smem);
    T *tile = reinterpret_cast<T *>(smem);   // TILED: the block's reach of xp for one output plane
    const int tid = threadIdx.y * TX + threadIdx.x;
    const long long Wp = p.W + 2 * p.rw, plane = (p.H + 2 * p.rh) * Wp, tiles_w = (p.W + TX - 1) / TX;
    const long long w0 = (blockIdx.x % tiles_w) * TX, h0 = (blockIdx.x / tiles_w) * TY;
    const long long w = w0 + threadIdx.x, h = h0 + threadIdx.y;
    const int tw = TX + 2 * (int)p.rw, th = TY + 2 * (int)p.rh, tp = tw * th, rows = (2 * (int)p.rd + 1) * th;
    // the taps' strides: within the tile or within xp
    const long long row = TILED ? tw : Wp, step_d = TILED ? tp : plane;
    for (long long d = blockIdx.y; d < p.D; d += gridDim.y) {   // (block-uniform: every thread meets the barriers)
        if (TILED) {
            __syncthreads();   // every thread is done with the previous plane's tile
            for (int r = tid / TX; r < rows; r += TY) {   // tile row r: plane d + r / th, row h0 + r % th of xp
                const long long hh = h0 + r % th;
                const T *src = xp + (d + r / th) * plane + hh * Wp + w0;
                for (int e = threadIdx.x; e < tw; e += TX)
                    tile[r * tw + e] = hh < p.H + 2 * p.rh && w0 + e < Wp ? src[e] : T(0);   // (past xp: unread)
            }
            __syncthreads();
        }
        if (w < p.W && h < p.H) {
            const long long i = (d * p.H + h) * p.W + w;
            const double s = (double)sigma[i];
            const Axis<T> ad = axis_of<T>(s, p.zd, p.truncate, p.rd), ah = axis_of<T>(s, p.zh, p.truncate, p.rh),
                          aw = axis_of<T>(s, p.zw, p.truncate, p.rw);
            const T *c = TILED ? tile + p.rd * tp + (threadIdx.y + p.rh) * tw + threadIdx.x + p.rw
                               : xp + (d + p.rd) * plane + (h + p.rh) * Wp + (w + p.rw);
            T acc = plane_sum(c, row, ah, aw), cur = 1, step = ad.q;
            const T q2 = ad.q * ad.q;
            const T *before = c, *after = c;
            for (int a = 1; a <= ad.own; a++) {
                cur *= step;
                step *= q2;
                before -= step_d;
                after += step_d;
                acc += cur * (plane_sum(before, row, ah, aw) + plane_sum(after, row, ah, aw));
            }
            out[i] = acc * (ad.inv_norm * ah.inv_norm * aw.inv_norm);
        }
    }
}

double as_double(long long bits)
{
    double v;
    memcpy(&v, &bits, sizeof v);
    return v;
}

}  // namespace

extern "C" int vc_adaptive_gaussian(int dtype, const void *xp, const void *sigma, void *out,
                                    const long long *params, void *stream)
{
    const Params p{params[0], params[1], params[2], params[3], params[4], params[5],
                   as_double(params[6]), as_double(params[7]), as_double(params[8]), as_double(params[9])};
    if (p.D <= 0 || p.H <= 0 || p.W <= 0 || p.rd < 0 || p.rh < 0 || p.rw < 0 || !(p.zd > 0) || !(p.zh > 0) ||
        !(p.zw > 0) || !(p.truncate >= 0))
        return vc::BAD_ARGUMENT;
    const long long tiles = ((p.W + TX - 1) / TX) * ((p.H + TY - 1) / TY);
    if (tiles > 0x7fffffffLL || TX + 2 * p.rw > 0x7fffffffLL / (TY + 2 * p.rh) / (2 * p.rd + 1))
        return vc::BAD_ARGUMENT;
    const dim3 grid((unsigned)tiles, (unsigned)vc::min_ll(p.D, 65535)), block(TX, TY);
    return vc::by_dtype(dtype, [&](auto zero) {
        using T = decltype(zero);
        const long long bytes = (2 * p.rd + 1) * (TY + 2 * p.rh) * (TX + 2 * p.rw) * (long long)sizeof(T);
        const auto run = [&](auto kernel, long long smem) {
            VC_LAUNCH(kernel, grid, block, smem, (cudaStream_t)stream)
            (static_cast<const T *>(xp), static_cast<const T *>(sigma), static_cast<T *>(out), p);
            return vc::status(cudaGetLastError());
        };
        if (bytes > SMEM_CAP)   // a reach too wide for a tile: the taps read xp through the cache
            return run(adaptive_gaussian_kernel<T, false>, 0);
        if (bytes > SMEM_DEFAULT) {   // (always the cap: one setting serves every later tile size)
            const cudaError_t e = cudaFuncSetAttribute(adaptive_gaussian_kernel<T, true>,
                                                       cudaFuncAttributeMaxDynamicSharedMemorySize, (int)SMEM_CAP);
            if (e != cudaSuccess)
                return vc::status(e);
        }
        return run(adaptive_gaussian_kernel<T, true>, bytes);
    });
}
