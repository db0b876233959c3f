// Depthwise separable passes on the GPU (CP components, separable kernels): every channel c of z correlated with
// the rank-1 kernel fd[c] (x) fh[c] (x) fw[c], with stride, dilation and zero padding; and the 1-D reduction that
// gives the factors' gradients. See volconv_cuda.h for the interface.
//
// Forward, fused: a block owns a 32 x TY tile of output columns x rows of one channel and walks a chunk of its
// output planes. Each input plane the chunk needs is filtered once along W (from global memory through the
// read-only cache into TY..SH rows in shared memory) and along H (each thread its own column), and the result is
// kept in a ring of the last R = (kd - 1) * dd + 1 filtered planes, one column per thread; each output plane is
// then the D pass over the ring. No intermediate volume; per output about (SH / TY) * kw + kh FMAs per filtered
// plane and kd for the D pass (kd + kh + kw for a cube at stride 1, against kd * kh * kw dense).
// Factor gradients: for one axis, y (z filtered along the other two axes) and the output gradient g are read as
// (N, C, P, L, M) and (N, C, P, Lo, M); gf[c, a] = sum g[n, c, p, o, m] * y[n, c, p, o * s - pad + a * dil, m].
// Blocks reduce fixed chunks of a channel's elements for 8 taps at once (a fixed tree in shared memory), a
// second kernel adds the chunks' partial sums in order: deterministic, no atomics.
#include "vc_common.cuh"

namespace {

using vc::Geom;

constexpr int TX = 32;                          // forward tile columns (a warp along W)
constexpr long long SMEM_DEFAULT = 48 * 1024;   // dynamic shared memory without opting in
constexpr long long SMEM_CAP = 160 * 1024;      // the most the forward opts into (sm_80 allows 163 KiB)
constexpr long long MIN_BLOCKS = 2048;          // split output planes into chunks until the grid has this many

// (__launch_bounds__: at most 64 registers, so 4 blocks of 256 threads share an SM)
template <typename T>
__global__ void __launch_bounds__(256, 4) separable_forward_kernel(const T *__restrict__ x, const T *__restrict__ fd,
                                                                   const T *__restrict__ fh,
                                                                   const T *__restrict__ fw, T *__restrict__ out,
                                                                   Geom g, int R, int SH, long long dchunk)
{
    VC_DYNAMIC_SHARED(unsigned char, smem);
    const int TY = blockDim.y, nt = TX * TY, tid = threadIdx.y * TX + threadIdx.x;
    const int kd = (int)g.kd, kh = (int)g.kh, kw = (int)g.kw, dd = (int)g.dd;
    T *ring = reinterpret_cast<T *>(smem);   // R x nt: each thread's column of filtered planes (private to it)
    T *rows = ring + (long long)R * nt;      // SH x TX: the tile's input rows of one plane, filtered along W
    T *f = rows + SH * TX;                   // this channel's fd, fh, fw
    const long long tiles_w = (g.Wo + TX - 1) / TX;
    const long long ow = (blockIdx.x % tiles_w) * TX + threadIdx.x;
    const long long oh0 = (blockIdx.x / tiles_w) * TY, oh = oh0 + threadIdx.y;
    const bool inside = ow < g.Wo && oh < g.Ho;
    const long long od0 = blockIdx.y * dchunk, od1 = od0 + dchunk < g.Do ? od0 + dchunk : g.Do;
    const long long iw0 = ow * g.sw - g.pw, ih0 = oh0 * g.sh - g.ph, plane_size = g.H * g.W;
    // grid-stride over (n, c): the grid's z is capped at 65535
    for (long long nc = blockIdx.z; nc < g.N * g.C; nc += gridDim.z) {
        const long long c = nc % g.C;
        __syncthreads();   // every thread is done with the previous channel's factors
        for (int i = tid; i < kd + kh + kw; i += nt)
            f[i] = i < kd ? fd[c * kd + i] : i < kd + kh ? fh[c * kh + i - kd] : fw[c * kw + i - kd - kh];
        __syncthreads();
        const T *xc = x + nc * g.D * plane_size;
        long long next = od0 * g.sd - g.pd;   // the next input plane to filter into the ring, and its slot,
        int slot = 0;                          // which holds plane next - R: the oldest
        for (long long od = od0; od < od1; od++) {
            const long long lo = od * g.sd - g.pd, hi = lo + (kd - 1) * (long long)dd;
            if (next < lo)   // a stride beyond the reach: planes no output reads are skipped (the ring
                next = lo;   // is refilled whole, which brings `slot` back round to plane lo's)
            for (; next <= hi; next++) {   // the planes lo .. hi not yet in the ring (block-uniform loop)
                T v = 0;
                if (next >= 0 && next < g.D) {   // (block-uniform: every thread reaches the barriers inside)
                    const T *plane = xc + next * plane_size;
                    __syncthreads();   // every thread has read the previous plane's rows
                    for (int r = threadIdx.y; r < SH; r += TY) {   // W pass: row r of the tile, this column
                        const long long ih = ih0 + r;
                        T s = 0;
                        if (ih >= 0 && ih < g.H) {
                            const T *row = plane + ih * g.W;
                            long long iw = iw0;
                            for (int e = 0; e < kw; e++, iw += g.dw)
                                if (iw >= 0 && iw < g.W)
                                    s += f[kd + kh + e] * __ldg(row + iw);
                        }
                        rows[r * TX + threadIdx.x] = s;
                    }
                    __syncthreads();
                    const T *col = rows + threadIdx.y * (int)g.sh * TX + threadIdx.x;   // H pass
                    for (int b = 0; b < kh; b++)
                        v += f[kd + b] * col[b * (int)g.dh * TX];
                }
                ring[slot * nt + tid] = v;   // (outside the volume: the zero padding)
                if (++slot == R)
                    slot = 0;
            }
            if (inside) {   // D pass: plane lo sits in `slot` (the ring holds exactly lo .. hi)
                T acc = 0;
                int s = slot;
                for (int a = 0; a < kd; a++) {
                    acc += f[a] * ring[s * nt + tid];
                    s += dd;
                    if (s >= R)
                        s -= R;
                }
                out[((nc * g.Do + od) * g.Ho + oh) * g.Wo + ow] = acc;
            }
        }
    }
}

constexpr int RT = 256;   // factor gradient: threads per block at most (fewer, down to a warp, for few elements)
constexpr int KT = 8;     // taps per block (one accumulator each, in registers)

// params of vc_separable_grad_factor
struct FactorGeom {
    long long N, C, P, L, M, Lo, k, s, pad, dil, chunks;
};

template <typename T>
__global__ void __launch_bounds__(RT) separable_grad_factor_partial_kernel(const T *__restrict__ y,
                                                                           const T *__restrict__ g,
                                                                           T *__restrict__ partials, FactorGeom f)
{
    VC_SHARED(T, part, [KT][RT]);
    const int tid = threadIdx.x, nt = blockDim.x;   // nt: a power of two
    const long long a0 = blockIdx.y * (long long)KT, J = f.Lo * f.M, E = f.N * f.P * J;
    const long long per = (E + f.chunks - 1) / f.chunks, e0 = blockIdx.x * per, e1 = e0 + per < E ? e0 + per : E;
    const long long q = nt / f.M, r = nt % f.M;   // a step of nt elements in (o, m)
    for (long long c = blockIdx.z; c < f.C; c += gridDim.z) {
        T acc[KT];
        for (int t = 0; t < KT; t++)
            acc[t] = 0;
        long long e = e0 + tid;
        if (e < e1) {
            // element e of the channel: slab (n, p), then (o, m); stepped without division but at slab ends
            long long sl = e / J, j = e % J, o = j / f.M, m = j % f.M, n = sl / f.P, p = sl % f.P;
            for (; e < e1; e += nt) {
                const long long slab = (n * f.C + c) * f.P + p;
                const T gv = g[slab * J + o * f.M + m];
                const T *yc = y + slab * f.L * f.M + m;
                long long i = o * f.s - f.pad + a0 * f.dil;
#pragma unroll
                for (int t = 0; t < KT; t++, i += f.dil)
                    if (a0 + t < f.k && i >= 0 && i < f.L)
                        acc[t] += gv * yc[i * f.M];
                m += r;
                o += q;
                if (m >= f.M) {
                    m -= f.M;
                    o++;
                }
                if (o >= f.Lo) {
                    p += o / f.Lo;
                    o %= f.Lo;
                    if (p >= f.P) {
                        n += p / f.P;
                        p %= f.P;
                    }
                }
            }
        }
        __syncthreads();   // the previous channel's sums are written
        for (int t = 0; t < KT; t++)
            part[t][tid] = acc[t];
        __syncthreads();
        for (int s = nt / 2; s > 0; s >>= 1) {   // a fixed tree: the same sum on every run
            if (tid < s)
                for (int t = 0; t < KT; t++)
                    part[t][tid] += part[t][tid + s];
            __syncthreads();
        }
        if (tid < KT && a0 + tid < f.k)
            partials[(c * f.k + a0 + tid) * f.chunks + blockIdx.x] = part[tid][0];
    }
}

template <typename T>
__global__ void separable_grad_factor_sum_kernel(const T *__restrict__ partials, T *__restrict__ gf,
                                                 long long count, long long chunks)
{
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < count;
         i += (long long)gridDim.x * blockDim.x) {
        T s = 0;
        for (long long b = 0; b < chunks; b++)   // the chunks in order
            s += partials[i * chunks + b];
        gf[i] = s;
    }
}

// Dynamic shared memory of the forward for tiles of ty rows.
template <typename T>
long long forward_smem(const Geom &g, long long ty, long long *SH)
{
    *SH = (ty - 1) * g.sh + (g.kh - 1) * g.dh + 1;
    const long long R = (g.kd - 1) * g.dd + 1;
    return (R * TX * ty + *SH * TX + g.kd + g.kh + g.kw) * (long long)sizeof(T);
}

template <typename T>
int forward(const void *x, const void *fd, const void *fh, const void *fw, void *out, const Geom &g,
            cudaStream_t stream)
{
    if (g.O != g.C || g.G != g.C)
        return vc::BAD_GEOMETRY;   // depthwise only
    if (g.N == 0)
        return 0;
    long long ty = 8;
    while (ty > 1 && ty / 2 >= g.Ho)   // no more rows than the output has
        ty /= 2;
    long long SH = 0, bytes = forward_smem<T>(g, ty, &SH);
    while (ty > 1 && bytes > SMEM_DEFAULT)   // fewer rows per tile until the ring fits
        bytes = forward_smem<T>(g, ty /= 2, &SH);
    if (bytes > SMEM_CAP)
        return vc::BAD_ARGUMENT;   // a reach too long for the ring (the caller checks first: _torch/cuda_lowrank)
    if (bytes > SMEM_DEFAULT) {
        const cudaError_t e = cudaFuncSetAttribute(separable_forward_kernel<T>,
                                                   cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
        if (e != cudaSuccess)
            return vc::status(e);
    }
    const long long tiles = ((g.Wo + TX - 1) / TX) * ((g.Ho + ty - 1) / ty);
    if (tiles > 0x7fffffffLL)
        return vc::BAD_GEOMETRY;
    const long long items = vc::min_ll(g.N * g.C, 65535);
    // chunks of output planes, while the grid is small: each at least 2 R / sd planes (the ring's refill costs
    // R - sd planes a chunk)
    const long long R = (g.kd - 1) * g.dd + 1, min_chunk = vc::min_ll(g.Do, 2 * ((R + g.sd - 1) / g.sd) + 2);
    long long chunks = (MIN_BLOCKS + tiles * items - 1) / (tiles * items);
    chunks = vc::min_ll(vc::min_ll(chunks, g.Do / min_chunk), 65535);
    chunks = chunks < 1 ? 1 : chunks;
    const long long dchunk = (g.Do + chunks - 1) / chunks;
    chunks = (g.Do + dchunk - 1) / dchunk;
    dim3 block(TX, (unsigned)ty), grid((unsigned)tiles, (unsigned)chunks, (unsigned)items);
    VC_LAUNCH(separable_forward_kernel<T>, grid, block, bytes, stream)(
        static_cast<const T *>(x), static_cast<const T *>(fd), static_cast<const T *>(fh),
        static_cast<const T *>(fw), static_cast<T *>(out), g, (int)R, (int)SH, dchunk);
    return vc::status(cudaGetLastError());
}

template <typename T>
int grad_factor(const void *y, const void *grad, void *partials, void *gf, const FactorGeom &f, cudaStream_t stream)
{
    if (f.N < 0 || f.C < 1 || f.P < 1 || f.L < 1 || f.M < 1 || f.Lo < 1 || f.k < 1 || f.s < 1 || f.dil < 1 ||
        f.chunks < 1 || f.chunks > 0x7fffffffLL)
        return vc::BAD_GEOMETRY;
    const long long taps = (f.k + KT - 1) / KT, count = f.C * f.k;
    if (taps > 65535)
        return vc::BAD_GEOMETRY;
    const long long per = (f.N * f.P * f.Lo * f.M + f.chunks - 1) / f.chunks;   // elements a block reduces
    int threads = RT;
    while (threads > 32 && threads / 2 >= per)
        threads /= 2;
    dim3 grid((unsigned)f.chunks, (unsigned)taps, (unsigned)vc::min_ll(f.C, 65535));
    VC_LAUNCH(separable_grad_factor_partial_kernel<T>, grid, threads, 0, stream)(
        static_cast<const T *>(y), static_cast<const T *>(grad), static_cast<T *>(partials), f);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess)
        return vc::status(e);
    VC_LAUNCH(separable_grad_factor_sum_kernel<T>, vc::grid_for(count, 128), 128, 0, stream)(
        static_cast<const T *>(partials), static_cast<T *>(gf), count, f.chunks);
    return vc::status(cudaGetLastError());
}

}  // namespace

extern "C" {

int vc_separable_forward(int dtype, const void *z, const void *fd, const void *fh, const void *fw, void *out,
                         const long long *geom, void *stream)
{
    return vc::checked(dtype, geom, [&](auto zero, const Geom &g) {
        return forward<decltype(zero)>(z, fd, fh, fw, out, g, static_cast<cudaStream_t>(stream));
    });
}

int vc_separable_grad_factor(int dtype, const void *y, const void *grad, void *partials, void *gf,
                             const long long *params, void *stream)
{
    const long long *p = params;
    const FactorGeom f{p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9], p[10]};
    return vc::by_dtype(dtype, [&](auto zero) {
        return grad_factor<decltype(zero)>(y, grad, partials, gf, f, static_cast<cudaStream_t>(stream));
    });
}

}  // extern "C"
