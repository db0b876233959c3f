// Depthwise and one-channel 3-D convolution with large kernels at stride 1 (RepLKNet-style), forward; the input
// gradient at stride 1 is this kernel with the flipped kernel (volconv/_torch/conv.py). See volconv_cuda.h.
//
// A block computes a TY x (TX * S) tile of one output plane of one output channel: for every input channel of
// its group (one for depthwise) and every kernel plane it loads the input plane's tile plus halo, zero-filled
// outside the volume, and that plane's kh x kw weights into shared memory; each thread then slides every kernel
// row along its strip of S outputs along W from a register window of 2 S inputs (S new inputs per S taps), so
// the inner loop is S x S multiply-adds on registers with fixed indices and one weight broadcast per tap, and
// has no bounds checks (only the final store has). Dilation keeps the register window: a block takes the outputs
// of one residue class (ow % dw, oh % dh), whose taps are neighbours in its tile (its loads are strided).
#include "vc_common.cuh"

#if defined(__CUDACC__)
#define VC_UNROLL _Pragma("unroll")
#define VC_ROLLED _Pragma("unroll 1")   // (the tile loads: unrolled they would take 30 more registers)
#else
#define VC_UNROLL _Pragma("GCC unroll 16")
#define VC_ROLLED _Pragma("GCC unroll 1")
#endif

namespace {

using vc::Geom;

constexpr int S = 8;         // outputs per thread along W (the register strip)
constexpr int TX = 8;        // threads along W: TX * S = 64 output columns per tile
constexpr int TY = 16;       // threads (= output rows) along H
constexpr int TW = TX * S;
constexpr long long MAX_SHARED = 96 * 1024;   // opted into beyond 48 KiB; within every GPU from sm_80 on

// The tile's row length, whole strips of S: the last window of a thread reads up to S - 1 columns past the
// kernel's reach (their taps are skipped).
__host__ __device__ inline long long tile_w(long long kw) { return (TX + kw / S + 1) * S; }
__host__ __device__ inline long long tile_h(long long kh) { return TY + kh - 1; }
// A kernel row in shared memory: padded to a multiple of S (aligned vector loads of its last taps).
__host__ __device__ inline long long row_w(long long kw) { return (kw + S - 1) / S * S; }
// Tiles of `size` along an output axis of n outputs, per residue class of the dilation dil (the largest class).
__host__ __device__ inline long long tiles(long long n, long long dil, long long size)
{
    return ((n + dil - 1) / dil + size - 1) / size;
}
template <typename T>
long long shared_bytes(const Geom &g)
{
    return (tile_h(g.kh) * tile_w(g.kw) + g.kh * row_w(g.kw)) * (long long)sizeof(T);
}

// A tile row is strips of S values, each V vectors of E values (16 bytes: one LDS.128). Vector c of strip m is
// stored at place c ^ swizzle(m) in its strip, so that the 8 lanes of a quarter warp, reading vector c of 8
// consecutive strips, hit 8 distinct groups of banks (unswizzled: 2-way conflicts in float32, 4-way in float64).
template <typename T>
struct Strips {
    static constexpr int E = 16 / sizeof(T), V = S / E;
    struct alignas(16) Vec { T v[E]; };
    __device__ __forceinline__ static int swizzle(int m) { return (m / (8 / V)) % V; }
    // where column j of a row is stored
    __device__ __forceinline__ static int place(int j)
    {
        const int m = j / S;
        return m * S + ((j % S / E) ^ swizzle(m)) * E + j % E;
    }
    // strip m of a row into registers (dst[0 .. S) = columns m S .. m S + S - 1)
    __device__ __forceinline__ static void load(const T *row, int m, T *dst)
    {
        const Vec *p = reinterpret_cast<const Vec *>(row + m * S);
        VC_UNROLL
        for (int c = 0; c < V; c++) {
            const Vec u = p[c ^ swizzle(m)];
            VC_UNROLL
            for (int i = 0; i < E; i++)
                dst[c * E + i] = u.v[i];
        }
    }
};

// S consecutive values of shared memory, 16-byte aligned, into registers (the same address in every thread: a
// broadcast, no swizzle).
template <typename T>
__device__ __forceinline__ void load_weights(const T *p, T *dst)
{
    using Vec = typename Strips<T>::Vec;
    VC_UNROLL
    for (int c = 0; c < Strips<T>::V; c++) {
        const Vec u = reinterpret_cast<const Vec *>(p)[c];
        VC_UNROLL
        for (int i = 0; i < Strips<T>::E; i++)
            dst[c * Strips<T>::E + i] = u.v[i];
    }
}

// acc[s] += sum over the kw taps e of row[m S + s + e] * wr[e], for s < S: row is a tile row (swizzled), m the
// thread's strip, wr the kernel row (16-byte aligned, padded to a multiple of S).
template <typename T>
__device__ __forceinline__ void strip_row(const T *row, int m, const T *wr, int kw, T (&acc)[S])
{
    T win[2 * S];   // win[j] = column m S + e + j: the inputs of taps e .. e + S - 1 for the whole strip
    T wt[S];        // the weights of those taps
    Strips<T>::load(row, m, win);
    int e = 0;
    for (; e + S <= kw; e += S) {
        Strips<T>::load(row, m + e / S + 1, win + S);
        load_weights(wr + e, wt);
        VC_UNROLL
        for (int t = 0; t < S; t++)
            VC_UNROLL
            for (int s = 0; s < S; s++)
                acc[s] += win[s + t] * wt[t];
        VC_UNROLL
        for (int s = 0; s < S; s++)
            win[s] = win[S + s];
    }
    if (e < kw) {   // the last kw % S taps (skipped, not multiplied by zero: an Inf past the kernel stays out)
        Strips<T>::load(row, m + e / S + 1, win + S);
        load_weights(wr + e, wt);
        VC_UNROLL
        for (int t = 0; t < S; t++)
            if (e + t < kw)
                VC_UNROLL
                for (int s = 0; s < S; s++)
                    acc[s] += win[s + t] * wt[t];
    }
}

// (at most 80 registers in float32, 96 in float64: six / five blocks of 128 threads per SM)
template <typename T>
__launch_bounds__(TX * TY, sizeof(T) == 4 ? 6 : 5) __global__
void depthwise_forward_kernel(const T *__restrict__ x, const T *__restrict__ w, const T *__restrict__ b,
                              T *__restrict__ out, Geom g)
{
    VC_DYNAMIC_SHARED(unsigned char, smem);
    const int TWS = (int)tile_w(g.kw), THS = (int)tile_h(g.kh), KWS = (int)row_w(g.kw);
    const int kh = (int)g.kh, kw = (int)g.kw;
    T *tile = reinterpret_cast<T *>(smem);   // THS x TWS inputs of one plane
    T *ws = tile + THS * TWS;                // kh x KWS weights of one kernel plane (rows padded)
    const int tx = threadIdx.x, ty = threadIdx.y;
    // the block's residue classes (rw, rh) and tile of them: outputs (rh + mh * dh, rw + mw * dw)
    const long long tiles_w = tiles(g.Wo, g.dw, TW), tiles_h = tiles(g.Ho, g.dh, TY);
    long long k = blockIdx.x;
    const long long mw0 = (k % tiles_w) * TW, rw = (k / tiles_w) % g.dw;
    k /= tiles_w * g.dw;
    const long long mh0 = (k % tiles_h) * TY, rh = k / tiles_h;
    // tile element (i, j) is input (ih0 + i * dh, iw0 + j * dw) of the plane
    const long long iw0 = rw - g.pw + mw0 * g.dw, ih0 = rh - g.ph + mh0 * g.dh;
    const bool interior = iw0 >= 0 && iw0 + (TWS - 1) * g.dw < g.W && ih0 >= 0 && ih0 + (THS - 1) * g.dh < g.H;
    const long long ow = rw + (mw0 + tx * S) * g.dw, oh = rh + (mh0 + ty) * g.dh;   // the strip's first output
    const long long Cg = g.C / g.G, plane = g.H * g.W;
    // grid-stride over (n, o) and output planes: the grid's y and z are capped at 65535, torch's sizes are not
    for (long long z = blockIdx.z; z < g.N * g.O; z += gridDim.z) {
        const long long n = z / g.O, o = z % g.O, c0 = (o / (g.O / g.G)) * Cg;
        for (long long od = blockIdx.y; od < g.Do; od += gridDim.y) {
            T acc[S];
            VC_UNROLL
            for (int s = 0; s < S; s++)
                acc[s] = b ? b[o] : T(0);
            for (long long c = 0; c < Cg; c++) {
                for (long long a = 0; a < g.kd; a++) {
                    const long long id = od - g.pd + a * g.dd;
                    if (id < 0 || id >= g.D)
                        continue;   // the same for the whole block: no thread skips a barrier alone
                    const T *xp = x + ((n * g.C + c0 + c) * g.D + id) * plane;
                    const T *wp = w + ((o * Cg + c) * g.kd + a) * kh * kw;
                    __syncthreads();   // every thread is done with the previous plane
                    if (interior) {   // no bounds checks
                        VC_ROLLED
                        for (int i = ty; i < THS; i += TY)
                            VC_ROLLED
                            for (int j = tx; j < TWS; j += TX)
                                tile[i * TWS + Strips<T>::place(j)] = __ldg(xp + (ih0 + i * g.dh) * g.W + iw0 + j * g.dw);
                    } else {          // zero outside the volume: the padding
                        VC_ROLLED
                        for (int i = ty; i < THS; i += TY) {
                            const long long ih = ih0 + i * g.dh;
                            VC_ROLLED
                            for (int j = tx; j < TWS; j += TX) {
                                const long long iw = iw0 + j * g.dw;
                                tile[i * TWS + Strips<T>::place(j)] =
                                    ih >= 0 && ih < g.H && iw >= 0 && iw < g.W ? __ldg(xp + ih * g.W + iw) : T(0);
                            }
                        }
                    }
                    for (int i = ty; i < kh; i += TY)
                        for (int j = tx; j < kw; j += TX)
                            ws[i * KWS + j] = wp[i * kw + j];
                    __syncthreads();
                    for (int bb = 0; bb < kh; bb++)
                        strip_row(tile + (ty + bb) * TWS, tx, ws + bb * KWS, kw, acc);
                }
            }
            if (oh < g.Ho) {
                T *po = out + (((n * g.O + o) * g.Do + od) * g.Ho + oh) * g.Wo;
                VC_UNROLL
                for (int s = 0; s < S; s++)
                    if (ow + s * g.dw < g.Wo)
                        po[ow + s * g.dw] = acc[s];
            }
        }
    }
}

template <typename T>
int forward(const void *x, const void *w, const void *b, void *out, const Geom &g, cudaStream_t stream)
{
    const long long smem = shared_bytes<T>(g);
    if (g.sd != 1 || g.sh != 1 || g.sw != 1 || smem > MAX_SHARED)
        return vc::BAD_GEOMETRY;
    if (g.N == 0)
        return 0;   // an empty batch: nothing to compute
    const long long blocks = tiles(g.Wo, g.dw, TW) * g.dw * tiles(g.Ho, g.dh, TY) * g.dh;
    if (blocks > 0x7fffffffLL)
        return vc::BAD_GEOMETRY;   // the grid's x
    if (smem > 48 * 1024) {
        const cudaError_t e = cudaFuncSetAttribute(depthwise_forward_kernel<T>,
                                                   cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        if (e != cudaSuccess)
            return vc::status(e);
    }
    const dim3 block(TX, TY),
        grid((unsigned)blocks, (unsigned)vc::min_ll(g.Do, 65535), (unsigned)vc::min_ll(g.N * g.O, 65535));
    VC_LAUNCH(depthwise_forward_kernel<T>, grid, block, smem, stream)(
        static_cast<const T *>(x), static_cast<const T *>(w), static_cast<const T *>(b), static_cast<T *>(out), g);
    return vc::status(cudaGetLastError());
}

}  // namespace

extern "C" {

int vc_depthwise_forward(int dtype, const void *x, const void *w, const void *b, void *out, const long long *geom,
                         void *stream)
{
    return vc::checked(dtype, geom, [&](auto zero, const Geom &g) {
        return forward<decltype(zero)>(x, w, b, out, g, static_cast<cudaStream_t>(stream));
    });
}

}  // extern "C"
