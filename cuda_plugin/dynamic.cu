// Dynamic (per-voxel kernel) convolution on the GPU: vc.dynamic_conv3d's forward and both gradients, zero padding,
// any stride, dilation and groups. See volconv_cuda.h for the interface.
//
// The kernel field K is seen as (N, S, T, Do, Ho, Wo) (S slices, T = kd kh kw taps, P = Do Ho Wo voxels):
// - grouped (full = 0, S = G groups, O = C): output channel c = input channel c with slice c / Cg (Cg = C / S);
// - full (full = 1, S = O C): output o sums over every input channel c with slice o C + c.
// Forward: the general kernel, a thread per output voxel looping over its channel pairs and taps (K read once,
// coalesced along W); the fused kernel (grouped layout, small kernels): a block's output tile of one plane, the
// input tile plus halo of CB channels of its group in shared memory (each input value read from global memory once
// per tile and reused by up to kh kw outputs), each thread reading its voxel's K row once for CB channels.
// Kernel-field gradient: a thread per field entry, its group's channels summed in order (no cross-block reduction).
// Input gradient: a gather, a thread per input voxel over the outputs and taps that read it, stepping through the
// taps of its residue class per axis (no div/mod per tap, no atomics): deterministic.
#include "vc_common.cuh"

namespace {

using vc::Geom;

constexpr int THREADS = 256;      // general kernels: a flat grid-stride loop
constexpr int FX = 32, FY = 8;    // fused forward: output columns x rows per block (one output plane)
constexpr long long FUSED_SHARED = 48 * 1024;

__host__ __device__ inline long long lesser(long long a, long long b) { return a < b ? a : b; }

// The channel pairs of output channel o: input channels c0 .. c0 + count - 1 with slices s0 + j * sstep.
struct Pairs {
    long long c0, count, s0, sstep;
};

__host__ __device__ inline Pairs pairs_of(long long o, const Geom &g, long long S, bool full)
{
    return full ? Pairs{0, g.C, o * g.C, 1} : Pairs{o, 1, o / (g.C / S), 0};
}

template <typename T>
__global__ void dynamic_forward_kernel(const T *__restrict__ x, const T *__restrict__ K, T *__restrict__ out, Geom g,
                                       long long S, int full)
{
    const long long P = g.Do * g.Ho * g.Wo, T_ = g.kd * g.kh * g.kw, DHW = g.D * g.H * g.W;
    const long long total = g.N * g.O * P;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long p = i % P, no = i / P, o = no % g.O, n = no / g.O;   // once per output, not per tap
        const long long ow = p % g.Wo, oh = (p / g.Wo) % g.Ho, od = p / (g.Wo * g.Ho);
        // (positions and taps in ints: a volume's extents fit one; offsets in 64 bits)
        const int id0 = (int)(od * g.sd - g.pd), ih0 = (int)(oh * g.sh - g.ph), iw0 = (int)(ow * g.sw - g.pw);
        const int kd = (int)g.kd, kh = (int)g.kh, kw = (int)g.kw, dd = (int)g.dd, dh = (int)g.dh, dw = (int)g.dw;
        const int D = (int)g.D, H = (int)g.H, W = (int)g.W;
        const Pairs q = pairs_of(o, g, S, full);
        T acc = 0;
        for (long long j = 0; j < q.count; j++) {
            const T *xc = x + (n * g.C + q.c0 + j) * DHW;
            const T *kq = K + (n * S + q.s0 + j * q.sstep) * T_ * P + p;   // this tap's field value; P per tap
            for (int a = 0, id = id0; a < kd; a++, id += dd) {
                if (id < 0 || id >= D) {
                    kq += kh * kw * P;
                    continue;
                }
                for (int b = 0, ih = ih0; b < kh; b++, ih += dh) {
                    if (ih < 0 || ih >= H) {
                        kq += kw * P;
                        continue;
                    }
                    const T *xr = xc + ((long long)id * H + ih) * W;
                    for (int e = 0, iw = iw0; e < kw; e++, iw += dw, kq += P)
                        if (iw >= 0 && iw < W)
                            acc += __ldg(kq) * __ldg(xr + iw);
                }
            }
        }
        out[i] = acc;
    }
}

// The fused tile's extents: input planes, rows and columns that a FY x FX output tile of one plane reads.
struct Tile {
    long long planes, rows, cols;
};

__host__ __device__ inline Tile tile_of(const Geom &g)
{
    return Tile{(g.kd - 1) * g.dd + 1, (FY - 1) * g.sh + (g.kh - 1) * g.dh + 1, (FX - 1) * g.sw + (g.kw - 1) * g.dw + 1};
}

// Grouped layout: block (tile of the output plane, od, (n, group)). Per chunk of CB channels of the group: the input
// tile (zeros outside the volume) into shared memory, then each thread's voxel: K[t] read once, used for CB channels.
template <typename T, int CB>
// (4 blocks of 256 threads per SM: at most 64 registers, no spills on sm_90; 4 x 48 KiB of shared memory fit)
__launch_bounds__(FX * FY, 4) __global__ void dynamic_fused_kernel(const T *__restrict__ x, const T *__restrict__ K,
                                                                  T *__restrict__ out, Geom g, long long S)
{
    VC_DYNAMIC_SHARED(unsigned char, smem);   // (one byte array for every T: extern shared arrays cannot differ)
    T *tile = reinterpret_cast<T *>(smem);   // CB x planes x rows x cols
    const Tile tl = tile_of(g);
    // the tile's extents and the taps in ints (the tile fits 48 KiB)
    const int planes = (int)tl.planes, rows = (int)tl.rows, cols = (int)tl.cols, chan = planes * rows * cols;
    const int D = (int)g.D, H = (int)g.H, W = (int)g.W;
    const int kd = (int)g.kd, kh = (int)g.kh, kw = (int)g.kw, dd = (int)g.dd, dh = (int)g.dh, dw = (int)g.dw;
    const long long Cg = g.C / S, P = g.Do * g.Ho * g.Wo, T_ = g.kd * g.kh * g.kw, DHW = g.D * g.H * g.W;
    const long long tiles_w = (g.Wo + FX - 1) / FX;
    const long long oh0 = (blockIdx.x / tiles_w) * FY, ow0 = (blockIdx.x % tiles_w) * FX;
    const long long oh = oh0 + threadIdx.y, ow = ow0 + threadIdx.x;
    const int ih0 = (int)(oh0 * g.sh - g.ph), iw0 = (int)(ow0 * g.sw - g.pw);
    const bool mine = oh < g.Ho && ow < g.Wo;
    const int mybase = (int)(threadIdx.y * g.sh * cols + threadIdx.x * g.sw);   // the thread's first tap in a plane
    for (long long z = blockIdx.z; z < g.N * S; z += gridDim.z) {
        const long long n = z / S, s = z % S;
        for (long long od = blockIdx.y; od < g.Do; od += gridDim.y) {
            const int id0 = (int)(od * g.sd - g.pd);
            const T *kp = K + (n * S + s) * T_ * P + (od * g.Ho + oh) * g.Wo + ow;   // the voxel's tap 0
            for (long long c0 = 0; c0 < Cg; c0 += CB) {
                const int nc = (int)lesser(CB, Cg - c0);
                const T *xc = x + (n * g.C + s * Cg + c0) * DHW;
                __syncthreads();   // the previous chunk is read
                for (int r = threadIdx.y; r < nc * planes * rows; r += FY) {   // one tile row per step
                    const int j = r / (planes * rows), id = id0 + (r / rows) % planes, ih = ih0 + r % rows;
                    const bool row_in = id >= 0 && id < D && ih >= 0 && ih < H;
                    const T *src = xc + j * DHW + ((long long)id * H + ih) * W;
                    for (int q = threadIdx.x; q < cols; q += FX) {
                        const int iw = iw0 + q;
                        tile[r * cols + q] = row_in && iw >= 0 && iw < W ? __ldg(src + iw) : T(0);
                    }
                }
                __syncthreads();
                if (!mine)
                    continue;   // (no barrier before the next chunk's first one)
                T acc[CB];
#pragma unroll
                for (int j = 0; j < CB; j++)
                    acc[j] = 0;
                const T *kq = kp;   // this tap's field value: P apart
                for (int a = 0; a < kd; a++)
                    for (int b = 0; b < kh; b++) {
                        const T *row = tile + (a * dd * rows + b * dh) * cols + mybase;
                        for (int e = 0; e < kw; e++, kq += P) {
                            const T kv = __ldg(kq);
#pragma unroll
                            for (int j = 0; j < CB; j++)
                                if (j < nc)
                                    acc[j] += kv * row[j * chan + e * dw];
                        }
                    }
                T *o = out + ((n * g.C + s * Cg + c0) * g.Do + od) * g.Ho * g.Wo + oh * g.Wo + ow;
#pragma unroll
                for (int j = 0; j < CB; j++)
                    if (j < nc)
                        o[j * P] = acc[j];
            }
        }
    }
}

// gK[n, s, t, p] = sum over slice s's pairs (o, c) of grad[n, o, p] * x[n, c, p stride + tap t dilation - pad]
// (zero for a tap in the padding): a thread per entry, adjacent threads adjacent voxels (coalesced).
template <typename T>
__global__ void dynamic_grad_kernels_kernel(const T *__restrict__ x, const T *__restrict__ grad, T *__restrict__ gK,
                                            Geom g, long long S, int full)
{
    const long long P = g.Do * g.Ho * g.Wo, T_ = g.kd * g.kh * g.kw, DHW = g.D * g.H * g.W;
    const long long total = g.N * S * T_ * P, Cg = g.C / S;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long p = i % P, r = i / P, t = r % T_, ns = r / T_, s = ns % S, n = ns / S;   // once per entry
        const long long ow = p % g.Wo, oh = (p / g.Wo) % g.Ho, od = p / (g.Wo * g.Ho);
        const long long a = t / (g.kh * g.kw), b = (t / g.kw) % g.kh, e = t % g.kw;
        const long long id = od * g.sd - g.pd + a * g.dd, ih = oh * g.sh - g.ph + b * g.dh;
        const long long iw = ow * g.sw - g.pw + e * g.dw;
        T acc = 0;
        if (id >= 0 && id < g.D && ih >= 0 && ih < g.H && iw >= 0 && iw < g.W) {
            // grouped: the group's channels c = o; full: the one pair (o, c) = divmod(s, C)
            const long long c0 = full ? s % g.C : s * Cg, o0 = full ? s / g.C : c0, count = full ? 1 : Cg;
            const T *gq = grad + (n * g.O + o0) * P + p, *xq = x + (n * g.C + c0) * DHW + (id * g.H + ih) * g.W + iw;
            for (long long j = 0; j < count; j++, gq += P, xq += DHW)
                acc += __ldg(gq) * __ldg(xq);
        }
        gK[i] = acc;
    }
}

// Along one axis, input position i (padded: u = i + pad) is read by output q through tap a when
// q stride + a dil = u: the taps a0, a0 + astep, ... (astep = stride / gcd) with q stepping down by qstep = dil / gcd.
struct Residue {
    int a0, q0;   // first tap of u's class and its output (a0 = k: none)
};

__device__ inline Residue residue(int u, int k, int s, int dil, int astep)
{
    for (int a = 0; a < k && a < astep; a++) {   // at most `stride` tries per voxel and axis, not per tap
        const int v = u - a * dil;
        if (v < 0)
            break;
        if (v % s == 0)
            return Residue{a, v / s};
    }
    return Residue{k, 0};
}

__host__ __device__ inline long long gcd(long long a, long long b)
{
    while (b) {
        const long long t = a % b;
        a = b;
        b = t;
    }
    return a;
}

// gx[n, c, i] = sum over the outputs o reading channel c, the taps t and voxels p with p stride + t dil - pad = i,
// of K[n, s(o, c), t, p] * grad[n, o, p]: a thread per input voxel, a fixed order (deterministic, no atomics).
template <typename T>
__global__ void dynamic_grad_input_kernel(const T *__restrict__ K, const T *__restrict__ grad, T *__restrict__ gx,
                                          Geom g, long long S, int full)
{
    const long long P = g.Do * g.Ho * g.Wo, T_ = g.kd * g.kh * g.kw, DHW = g.D * g.H * g.W, total = g.N * g.C * DHW;
    const int kd = (int)g.kd, kh = (int)g.kh, kw = (int)g.kw, Do = (int)g.Do, Ho = (int)g.Ho, Wo = (int)g.Wo;
    const int ad = (int)(g.sd / gcd(g.sd, g.dd)), ah = (int)(g.sh / gcd(g.sh, g.dh)), aw = (int)(g.sw / gcd(g.sw, g.dw));
    const int qd = (int)(g.dd * ad / g.sd), qh = (int)(g.dh * ah / g.sh), qw = (int)(g.dw * aw / g.sw);
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long v = i % DHW, nc = i / DHW, c = nc % g.C, n = nc / g.C;   // once per input voxel
        const int iw = (int)(v % g.W), ih = (int)((v / g.W) % g.H), id = (int)(v / (g.W * g.H));
        const Residue rd = residue(id + (int)g.pd, kd, (int)g.sd, (int)g.dd, ad);
        const Residue rh = residue(ih + (int)g.ph, kh, (int)g.sh, (int)g.dh, ah);
        const Residue rw = residue(iw + (int)g.pw, kw, (int)g.sw, (int)g.dw, aw);
        // grouped: the one output o = c with slice c / Cg; full: every o with slice o C + c
        const long long o0 = full ? 0 : c, count = full ? g.O : 1, s0 = full ? c : c / (g.C / S);
        const long long sstep = full ? g.C : 0, kstep = aw * P - qw;   // the next tap of the class along W
        T acc = 0;
        for (long long j = 0; j < count; j++) {
            const T *kp = K + (n * S + s0 + j * sstep) * T_ * P, *gp = grad + (n * g.O + o0 + j) * P;
            for (int a = rd.a0, od = rd.q0; a < kd && od >= 0; a += ad, od -= qd) {
                if (od >= Do)
                    continue;
                for (int b = rh.a0, oh = rh.q0; b < kh && oh >= 0; b += ah, oh -= qh) {
                    if (oh >= Ho)
                        continue;
                    const long long row = ((long long)od * Ho + oh) * Wo;
                    const T *kq = kp + ((a * kh + b) * kw + rw.a0) * P + row + rw.q0, *gq = gp + row + rw.q0;
                    for (int e = rw.a0, ow = rw.q0; e < kw && ow >= 0; e += aw, ow -= qw, kq += kstep, gq -= qw)
                        if (ow < Wo)
                            acc += __ldg(kq) * __ldg(gq);
                }
            }
        }
        gx[i] = acc;
    }
}

template <typename Kernel, typename... Args>
int flat(Kernel kernel, long long total, cudaStream_t stream, Args... args)
{
    if (total <= 0)
        return 0;
    VC_LAUNCH(kernel, vc::grid_for(total, THREADS), THREADS, 0, stream)(args...);
    return vc::status(cudaGetLastError());
}

// params: the 22 geometry values (the layout's ConvSpec: groups = C grouped, 1 full), then S, full (, CB fused).
bool dynamic_valid(const Geom &g, long long S, long long full)
{
    const long long lim = 1LL << 30;   // the kernels hold positions and taps in ints
    const long long extents[] = {g.D + g.pd, g.H + g.ph, g.W + g.pw, g.Do, g.Ho, g.Wo, g.kd * g.kh * g.kw,
                                 g.kd * g.dd, g.kh * g.dh, g.kw * g.dw, g.Do * g.sd, g.Ho * g.sh, g.Wo * g.sw};
    for (long long e : extents)
        if (e >= lim)
            return false;
    return S > 0 && (full ? S == g.O * g.C : g.O == g.C && g.C % S == 0);
}

template <typename T>
int fused(const void *x, const void *K, void *out, const Geom &g, long long S, long long cb, cudaStream_t stream)
{
    const Tile tl = tile_of(g);
    const long long bytes = cb * tl.planes * tl.rows * tl.cols * (long long)sizeof(T);
    const long long tiles = ((g.Ho + FY - 1) / FY) * ((g.Wo + FX - 1) / FX);
    if (bytes > FUSED_SHARED || tiles > 0x7fffffffLL)
        return vc::BAD_ARGUMENT;
    if (g.N == 0)
        return 0;
    const dim3 grid((unsigned)tiles, (unsigned)vc::min_ll(g.Do, 65535), (unsigned)vc::min_ll(g.N * S, 65535));
    const dim3 block(FX, FY);
    const T *xt = static_cast<const T *>(x), *kt = static_cast<const T *>(K);
    T *ot = static_cast<T *>(out);
    if (cb == 4)
        VC_LAUNCH((dynamic_fused_kernel<T, 4>), grid, block, (size_t)bytes, stream)(xt, kt, ot, g, S);
    else if (cb == 2)
        VC_LAUNCH((dynamic_fused_kernel<T, 2>), grid, block, (size_t)bytes, stream)(xt, kt, ot, g, S);
    else if (cb == 1)
        VC_LAUNCH((dynamic_fused_kernel<T, 1>), grid, block, (size_t)bytes, stream)(xt, kt, ot, g, S);
    else
        return vc::BAD_ARGUMENT;
    return vc::status(cudaGetLastError());
}

template <typename Run>
int dynamic_checked(int dtype, const long long *params, Run run)
{
    return vc::checked(dtype, params, [&](auto zero, const Geom &g) {
        if (!dynamic_valid(g, params[22], params[23]))
            return (int)vc::BAD_GEOMETRY;
        return run(zero, g, params[22], (int)params[23]);
    });
}

}  // namespace

extern "C" {

int vc_dynamic_forward(int dtype, const void *x, const void *K, void *out, const long long *params, void *stream)
{
    return dynamic_checked(dtype, params, [&](auto zero, const Geom &g, long long S, int full) {
        using T = decltype(zero);
        return flat(dynamic_forward_kernel<T>, g.N * g.O * g.Do * g.Ho * g.Wo, static_cast<cudaStream_t>(stream),
                    static_cast<const T *>(x), static_cast<const T *>(K), static_cast<T *>(out), g, S, full);
    });
}

int vc_dynamic_forward_fused(int dtype, const void *x, const void *K, void *out, const long long *params,
                             void *stream)
{
    return dynamic_checked(dtype, params, [&](auto zero, const Geom &g, long long S, int full) {
        if (full)
            return (int)vc::BAD_ARGUMENT;
        return fused<decltype(zero)>(x, K, out, g, S, params[24], static_cast<cudaStream_t>(stream));
    });
}

int vc_dynamic_grad_kernels(int dtype, const void *x, const void *grad, void *gK, const long long *params,
                            void *stream)
{
    return dynamic_checked(dtype, params, [&](auto zero, const Geom &g, long long S, int full) {
        using T = decltype(zero);
        return flat(dynamic_grad_kernels_kernel<T>, g.N * S * g.kd * g.kh * g.kw * g.Do * g.Ho * g.Wo,
                    static_cast<cudaStream_t>(stream), static_cast<const T *>(x), static_cast<const T *>(grad),
                    static_cast<T *>(gK), g, S, full);
    });
}

int vc_dynamic_grad_input(int dtype, const void *K, const void *grad, void *gx, const long long *params, void *stream)
{
    return dynamic_checked(dtype, params, [&](auto zero, const Geom &g, long long S, int full) {
        using T = decltype(zero);
        return flat(dynamic_grad_input_kernel<T>, g.N * g.C * g.D * g.H * g.W, static_cast<cudaStream_t>(stream),
                    static_cast<const T *>(K), static_cast<const T *>(grad), static_cast<T *>(gx), g, S, full);
    });
}

}  // extern "C"
