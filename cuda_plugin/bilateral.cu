// The exact windowed bilateral filter (vc.bilateral_filter) on the GPU: at every output voxel i
//   out[i] = x[i] + sum_t k_t (x[i + t] - x[i]) / sum_t k_t,  k_t = exp(a_t - b (g[i + t] - g[i])^2) (* m[i + t])
// over the box window's taps t in C order (the CPU engine's order and its centre-difference summation: the
// rounding scales with the window's contrast, not the intensity; a constant volume comes back exactly), a_t the
// spatial term (<= 0) from the caller's table, b = 1 / (2 sigma_range^2) (0: no range term). The exponent is
// clamped below at the smallest normal's (-87 / -708, as _cpu/bilateral_impl.h) so that a window far from its
// centre still averages; the clamp is a comparison, so NaN passes through it. See volconv_cuda.h.
//
// One thread per output voxel, a block a 32 x 8 tile of one output plane (grid-striding over the planes). The
// work is one exp per tap (343 to a few thousand taps per voxel), so the kernel is bound by arithmetic as long
// as each tap's operands come from shared memory: when the tile's reach, (2 rd + 1) x (8 + 2 rh) x (32 + 2 rw)
// voxels of the volume (and of the guide, and the 0/1 validity bytes, when given), fits in 96 KiB (opted into
// past 48 KiB: two blocks per SM on sm_90, one on sm_80, and still within sm_86/89's 99 KiB), the block loads
// it once (about 45 values per output at radius 6, the 1 mm brain at sigma 2 mm, against 2197 taps) and every
// tap reads shared memory, conflict-free along W. A wider reach reads xp through the read-only cache instead:
// neighbouring threads read neighbouring addresses and the window's rows stay in L1 / L2, so it is slower by
// the load latency, not by DRAM traffic. The spatial table is read through the read-only cache in both cases
// (one address per warp and tap: a broadcast). A self-guided volume (the usual case) holds one tile, not two.
#include <math.h>
#include <string.h>

#include <type_traits>

#include "vc_common.cuh"

namespace {

constexpr int TX = 32, TY = 8;                 // a block's output tile: columns (a warp) x rows
constexpr long long SMEM_DEFAULT = 48 * 1024;   // dynamic shared memory without opting in
constexpr long long SMEM_CAP = 96 * 1024;       // the most a tile opts into

struct Params {
    long long D, H, W, rd, rh, rw;   // the output's shape; the window's radii (xp's padding on each side)
    double b;                        // 1 / (2 sigma_range^2), 0 for none
};

// exp(e) with e clamped below at the smallest normal's exponent, NaN kept (a NaN guide voxel gives a NaN weight,
// as on the CPU): in float one max.NaN (sm_80+; NaN if either is), elsewhere a comparison, false for NaN
__device__ inline float exp_clamped(float e)
{
#ifdef __CUDA_ARCH__
    float c;
    asm("max.NaN.f32 %0, %1, %2;" : "=f"(c) : "f"(e), "f"(-87.0f));
    return expf(c);
#else
    return expf(e < -87.0f ? -87.0f : e);
#endif
}
__device__ inline double exp_clamped(double e) { return exp(e < -708.0 ? -708.0 : e); }

// JOINT: the guide is its own array (else the volume guides itself); MASKED: m, the 0/1 validity, multiplies
// each weight. TILED: the taps read the block's tile in shared memory, else xp, gp and mp directly.
template <typename T, bool TILED, bool JOINT, bool MASKED>
__global__ void __launch_bounds__(TX * TY) bilateral_kernel(const T *__restrict__ xp, const T *__restrict__ gp,
                                                            const unsigned char *__restrict__ mp,
                                                            const T *__restrict__ a, T *__restrict__ out,
                                                            Params p)
{
    VC_DYNAMIC_SHARED(unsigned char, smem);
    const int tid = threadIdx.y * TX + threadIdx.x;
    const long long Wp = p.W + 2 * p.rw, Hp = p.H + 2 * p.rh, plane = Hp * Wp, tiles_w = (p.W + TX - 1) / TX;
    const long long w0 = (blockIdx.x % tiles_w) * TX, h0 = (blockIdx.x / tiles_w) * TY;
    const long long w = w0 + threadIdx.x, h = h0 + threadIdx.y;
    const int nd = 2 * (int)p.rd + 1, nh = 2 * (int)p.rh + 1, nw = 2 * (int)p.rw + 1;
    const int tw = TX + 2 * (int)p.rw, th = TY + 2 * (int)p.rh, tn = nd * th * tw, rows = nd * th;
    // TILED: the tile of x, then of g (JOINT), then the validity bytes (MASKED)
    T *tx = reinterpret_cast<T *>(smem);
    T *tg = JOINT ? tx + tn : tx;
    unsigned char *tm = reinterpret_cast<unsigned char *>(tx + (JOINT ? 2 : 1) * (long long)tn);
    const long long row = TILED ? tw : Wp, step_d = TILED ? (long long)th * tw : plane;
    const T b = (T)p.b;
    const T *g_src = JOINT ? gp : xp;
    for (long long d = blockIdx.y; d < p.D; d += gridDim.y) {   // (block-uniform: every thread meets the barriers)
        if (TILED) {
            __syncthreads();   // every thread is done with the previous plane's tile
            for (int r = tid / TX; r < rows; r += TY) {   // tile row r: plane d + r / th, row h0 + r % th of xp
                const long long hh = h0 + r % th, src = (d + r / th) * plane + hh * Wp + w0;
                const bool row_in = hh < Hp;
                for (int e = threadIdx.x; e < tw; e += TX) {
                    const bool in = row_in && w0 + e < Wp;   // (past xp: never read by an output)
                    tx[r * tw + e] = in ? xp[src + e] : T(0);
                    if (JOINT)
                        tg[r * tw + e] = in ? gp[src + e] : T(0);
                    if (MASKED)
                        tm[r * tw + e] = in ? mp[src + e] : 0;
                }
            }
            __syncthreads();
        }
        if (w >= p.W || h >= p.H)
            continue;
        // the window's first tap, and its centre (offset rd, rh, rw from it)
        const long long first = TILED ? (long long)threadIdx.y * tw + threadIdx.x : d * plane + h * Wp + w;
        const long long centre = first + p.rd * step_d + p.rh * row + p.rw;
        const T *x = TILED ? tx : xp, *g = TILED ? tg : g_src;
        const unsigned char *m = TILED ? tm : mp;
        const T xc = x[centre], gc = g[centre];
        T num = 0, den = 0;
        const T *at = a;
        for (int i = 0; i < nd; i++) {
            for (int j = 0; j < nh; j++, at += nw) {
                const long long o = first + i * step_d + j * row;
                const T *xr = x + o, *gr = g + o;
#pragma unroll 4
                for (int k = 0; k < nw; k++) {
                    const T dg = gr[k] - gc;
                    T wt = exp_clamped(at[k] - b * dg * dg);
                    if (MASKED)
                        wt *= (T)m[o + k];
                    num += wt * (xr[k] - xc);
                    den += wt;
                }
            }
        }
        out[(d * p.H + h) * p.W + w] = xc + num / den;
    }
}

double as_double(long long bits)
{
    double v;
    memcpy(&v, &bits, sizeof v);
    return v;
}

}  // namespace

extern "C" int vc_bilateral(int dtype, const void *xp, const void *gp, const void *mp, const void *a, void *out,
                            const long long *params, void *stream)
{
    const Params p{params[0], params[1], params[2], params[3], params[4], params[5], as_double(params[6])};
    if (p.D <= 0 || p.H <= 0 || p.W <= 0 || p.rd < 0 || p.rh < 0 || p.rw < 0 || !(p.b >= 0) || xp == nullptr ||
        a == nullptr || out == nullptr)
        return vc::BAD_ARGUMENT;
    const long long tiles = ((p.W + TX - 1) / TX) * ((p.H + TY - 1) / TY);
    if (tiles > 0x7fffffffLL || p.rd > 0x3fffffff || p.rh > 0x3fffffff || p.rw > 0x3fffffff ||
        TX + 2 * p.rw > 0x7fffffffLL / (TY + 2 * p.rh) / (2 * p.rd + 1) ||
        (2 * p.rw + 1) > 0x7fffffffLL / (2 * p.rh + 1) / (2 * p.rd + 1))
        return vc::BAD_ARGUMENT;
    const dim3 grid((unsigned)tiles, (unsigned)vc::min_ll(p.D, 65535)), block(TX, TY);
    const bool joint = gp != nullptr, masked = mp != nullptr;
    return vc::by_dtype(dtype, [&](auto zero) {
        using T = decltype(zero);
        const long long voxels = (2 * p.rd + 1) * (TY + 2 * p.rh) * (TX + 2 * p.rw);
        const long long bytes = voxels * ((joint ? 2 : 1) * (long long)sizeof(T) + (masked ? 1 : 0));
        const auto run = [&](auto kernel, long long smem) {
            if (smem > SMEM_DEFAULT) {   // (always the cap: one setting serves every later tile size)
                const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                           (int)SMEM_CAP);
                if (e != cudaSuccess)
                    return vc::status(e);
            }
            VC_LAUNCH(kernel, grid, block, smem, (cudaStream_t)stream)
            (static_cast<const T *>(xp), static_cast<const T *>(gp), static_cast<const unsigned char *>(mp),
             static_cast<const T *>(a), static_cast<T *>(out), p);
            return vc::status(cudaGetLastError());
        };
        const auto pick = [&](auto tiled, long long smem) {
            constexpr bool TILED = decltype(tiled)::value;
            if (joint)
                return masked ? run(bilateral_kernel<T, TILED, true, true>, smem)
                              : run(bilateral_kernel<T, TILED, true, false>, smem);
            return masked ? run(bilateral_kernel<T, TILED, false, true>, smem)
                          : run(bilateral_kernel<T, TILED, false, false>, smem);
        };
        if (bytes > SMEM_CAP)   // a reach too wide for a tile: the taps read xp through the cache
            return pick(std::false_type{}, 0);
        return pick(std::true_type{}, bytes);
    });
}
