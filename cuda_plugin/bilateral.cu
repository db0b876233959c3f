// The exact windowed bilateral filter (vc.bilateral_filter) on the GPU: at every output voxel i
//   out[i] = x[i] + sum_t k_t (x[i + t] - x[i]) / sum_t k_t,  k_t = exp(a_t - b (g[i + t] - g[i])^2) (* m[i + t])
// over the box window's taps t in C order (the CPU engine's order and its centre-difference summation: the
// rounding scales with the window's contrast, not the intensity; a constant volume comes back exactly), a_t the
// spatial term (<= 0) from the caller's table, b = 1 / (2 sigma_range^2) (0: no range term). The exponent is
// clamped below at the smallest normal's (-87 / -708, as _cpu/bilateral_impl.h) so that a window far from its
// centre still averages; the clamp keeps NaN (a NaN guide voxel: a NaN weight, as on the CPU). See volconv_cuda.h.
//
// One thread per output voxel, a block a 32 x 8 tile of one output plane (grid-striding over the planes). The
// work is one exp per tap (343 to a few thousand taps per voxel), so the kernel is bound by arithmetic (about 16
// instructions a tap, the accurate expf's 8 among them) as long as each tap's operands come from shared memory.
// The window's planes stream through two buffers, each one plane of the block's reach, (8 + 2 rh) x (32 + 2 rw)
// voxels of the volume (and of the guide, and the 0/1 validity bytes, when given): the next plane loads while
// this one is summed, one barrier per plane (13 x 13 taps of work between barriers at radius 6). Two planes, not
// the whole (2 rd + 1)-plane reach, so that any radius fits (7 KiB self-guided float32 at radius 6, the 1 mm
// brain at sigma 2 mm; 16 KiB with a guide and validity) and blocks per SM are set by registers (32 a thread
// self-guided: a full SM), not by shared memory; the planes are reloaded for each output plane (about 45 values
// per output at radius 6 against 2197 taps), which L2 serves. Past 48 KiB (float64 with a guide and validity
// from radius 10 along H and W) the kernel opts in, to 96 KiB (within sm_86/89's 99 KiB); past that the taps
// read xp through the read-only cache (neighbouring threads, neighbouring addresses: slower by the load latency,
// not by DRAM traffic). The spatial table is read through the read-only cache (one address per warp and tap: a
// broadcast). A self-guided volume (the usual case) holds one array, not two.
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

// exp(e) with e clamped below at the smallest normal's exponent, NaN kept: in float one max.NaN (sm_80+: NaN if
// either operand is), elsewhere a comparison (false for NaN)
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

// One plane of the block's reach into shared memory: rows h0 .. h0 + th - 1, columns w0 .. w0 + tw - 1 of plane
// `src_plane` of xp (and gp, mp); past xp's edge 0 (never read by an output).
template <typename T, bool JOINT, bool MASKED>
__device__ inline void load_plane(T *tx, T *tg, unsigned char *tm, const T *__restrict__ xp,
                                  const T *__restrict__ gp, const unsigned char *__restrict__ mp,
                                  long long src_plane, long long h0, long long w0, int th, int tw, long long Hp,
                                  long long Wp, int tid)
{
    for (int r = tid / TX; r < th; r += TY) {
        const long long hh = h0 + r, src = src_plane + hh * Wp + w0;
        const bool row_in = hh < Hp;
        for (int e = threadIdx.x; e < tw; e += TX) {
            const bool in = row_in && w0 + e < Wp;
            tx[r * tw + e] = in ? xp[src + e] : T(0);
            if (JOINT)
                tg[r * tw + e] = in ? gp[src + e] : T(0);
            if (MASKED)
                tm[r * tw + e] = in ? mp[src + e] : 0;
        }
    }
}

// JOINT: the guide is its own array (else the volume guides itself); MASKED: m, the 0/1 validity, multiplies
// each weight. TILED: the window's planes stream through two shared-memory buffers, one plane of the block's
// reach each (the next loaded while this one is summed: one barrier per plane); else the taps read xp, gp and
// mp directly.
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
    const bool active = w < p.W && h < p.H;
    const int nd = 2 * (int)p.rd + 1, nh = 2 * (int)p.rh + 1, nw = 2 * (int)p.rw + 1;
    const int tw = TX + 2 * (int)p.rw, th = TY + 2 * (int)p.rh, tp = th * tw;
    // TILED: buffer k (0, 1) holds a plane of x at tx + k * tp, of g at tg + k * tp (JOINT), the validity bytes
    // at tm + k * tp (MASKED)
    T *tx = reinterpret_cast<T *>(smem);
    T *tg = JOINT ? tx + 2 * tp : tx;
    unsigned char *tm = MASKED ? reinterpret_cast<unsigned char *>(tx + (JOINT ? 4 : 2) * (long long)tp) : nullptr;
    const long long row = TILED ? tw : Wp;
    const T b = (T)p.b;
    const T *g_src = JOINT ? gp : xp;
    for (long long d = blockIdx.y; d < p.D; d += gridDim.y) {   // (block-uniform: every thread meets the barriers)
        // the window's first tap in a plane (of the tile, or of xp), and the centre's values from xp
        const long long first = TILED ? (long long)threadIdx.y * tw + threadIdx.x : d * plane + h * Wp + w;
        const long long centre = ((d + p.rd) * Hp + h + p.rh) * Wp + w + p.rw;
        const T xc = active ? xp[centre] : T(0), gc = active ? g_src[centre] : T(0);
        if (TILED) {
            load_plane<T, JOINT, MASKED>(tx, tg, tm, xp, gp, mp, d * plane, h0, w0, th, tw, Hp, Wp, tid);
            __syncthreads();
        }
        T num = 0, den = 0;
        const T *at = a;
        for (int i = 0; i < nd; i++) {
            const int buf = i & 1;
            if (TILED && i + 1 < nd)   // the next plane into the other buffer (its last readers passed a barrier)
                load_plane<T, JOINT, MASKED>(tx + (1 - buf) * tp, tg + (1 - buf) * tp,
                                             MASKED ? tm + (1 - buf) * tp : nullptr, xp, gp, mp,
                                             (d + i + 1) * plane, h0, w0, th, tw, Hp, Wp, tid);
            const T *x = TILED ? tx + buf * tp : xp + i * plane, *g = TILED ? tg + buf * tp : g_src + i * plane;
            const unsigned char *m = !MASKED ? nullptr : TILED ? tm + buf * tp : mp + i * plane;
            if (active) {
                for (int j = 0; j < nh; j++, at += nw) {
                    const long long o = first + j * row;
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
            if (TILED)
                __syncthreads();   // this plane summed, the next one loaded
        }
        if (active)
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
        const long long voxels = 2 * (TY + 2 * p.rh) * (TX + 2 * p.rw);   // two planes of the block's reach
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
        if (bytes > SMEM_CAP)   // rows too wide for two planes of tile: the taps read xp through the cache
            return pick(std::false_type{}, 0);
        return pick(std::true_type{}, bytes);
    });
}
