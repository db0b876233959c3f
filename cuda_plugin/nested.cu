// Fused depthwise chains (vc.nested_conv3d) and multi-scale branches (vc.multiscale_conv3d) on the GPU: one read
// of the input, no full-size intermediate. See volconv_cuda.h for the interface.
//
// Both kernels stream along D. A block owns one (n, channel), a TH x TW tile of output rows x columns and a chunk
// of output planes; it keeps rings of planes in shared memory, each plane the tile widened by the halo the later
// reads need:
// - chain: a ring of the input (stage 0's kd planes) and one per intermediate (the next stage's kd planes). A
//   plane of a level is computed as soon as the level below holds the planes it reads (pulled from the top), so
//   each input plane is read from global memory once per chunk, each intermediate plane computed once per chunk,
//   and only the last stage's output is written;
// - branches: one ring of the input with the largest branch's extent; every branch's output is computed from it.
// Zero padding: input planes, rows and columns outside the volume are zeros, and so are the intermediates there
// (the chain pads every stage's input, as the sequential torch.conv3d chain does).
// Weights and biases of the block's channel sit in shared memory too (a warp reads one weight: a broadcast).
// Each thread computes strips of STRIP outputs along W from a sliding register window; a block has one thread per
// strip of its largest computed plane (64 to 256 threads: more would idle while stage 0, the costly one, runs).
#include "vc_common.cuh"

namespace {

constexpr int MAX_THREADS = 256;
constexpr int MAX_STAGES = 4, MAX_BRANCHES = 8;
constexpr int STRIP = 4;   // outputs per thread along W (tile widths and computed ring widths are multiples)
constexpr long long SHARED_BYTES = 48 * 1024;   // no opt-in: several blocks per SM

struct Chain {
    int N, C, D, H, W, L, act, TH, TW, CD;
    int k[MAX_STAGES][3], p[MAX_STAGES][3];   // stage kernel sizes, 'same' pads before ((k - 1) / 2)
    int rh[MAX_STAGES + 1], rw[MAX_STAGES + 1];  // level l's region: rows, columns (computed levels: STRIP's multiple)
    int oh[MAX_STAGES + 1], ow[MAX_STAGES + 1];  // ... starting this far before the tile's first row, column
    int ring[MAX_STAGES];                        // level l's ring in shared memory (elements), l < L
    int wsh[MAX_STAGES];                         // stage s's taps in shared memory
    long long wg[MAX_STAGES];                    // stage s's weights in the flat global array
    int taps;                                    // taps of every stage (then L biases)
    int threads;                                 // the block: one thread per strip of level 1 (stage 0's work)
};

struct Branches {
    int N, C, D, H, W, B, sum, TH, TW, CD, E[3], P[3], rh, rw, ring, threads;
    int m[MAX_BRANCHES], k[MAX_BRANCHES][3], dil[MAX_BRANCHES][3];
    int off[MAX_BRANCHES][3];   // a branch's first tap in the ring's region (its centre aligned with the largest)
    int wsh[MAX_BRANCHES], bsh[MAX_BRANCHES], ooff[MAX_BRANCHES];   // taps, biases in shared memory; output channel
    long long wg[MAX_BRANCHES], bg[MAX_BRANCHES];                     // weights, biases in the flat global arrays
};

template <typename T>
__device__ inline T activate(T v, int act)
{
    if (act == 1)
        return v > T(0) ? v : T(0);
    if (act == 2)
        return T(0.5) * v * (T(1) + erf(v * T(0.70710678118654752440)));   // gelu, erf form (torch's default)
    if (act == 3)
        return v / (T(1) + exp(-v));   // silu
    return v;
}

// Plane d of x's channel (xc) on the region of rh x rw from (h0, w0) into dst; zeros outside the volume.
template <typename T>
__device__ void load_plane(T *dst, const T *__restrict__ xc, int d, int D, int H, int W, int h0, int w0, int rh,
                           int rw)
{
    const bool plane_in = d >= 0 && d < D;
    for (int i = threadIdx.x; i < rh * rw; i += blockDim.x) {
        const int y = i / rw, h = h0 + y, w = w0 + i - y * rw;
        dst[i] = plane_in && h >= 0 && h < H && w >= 0 && w < W ? __ldg(xc + ((long long)d * H + h) * W + w) : T(0);
    }
}

// S outputs along a row (a thread's strip) += the taps w (kd x kh x kw, dilation dil) on a ring of R planes of
// `plane` elements, rows of rw: the first output's window has its first plane in `slot`, its corner at (y, x).
// Undilated rows slide a register window: kw + S - 1 shared loads and kw weight loads for S * kw products (one
// output per thread would load 2 * kw). Ring slots advance with a compare, not a modulo.
template <typename T>
__device__ inline void window(T (&acc)[STRIP], const T *ring, int R, int plane, int slot, int rw, int y, int x,
                              const T *w, const int *k, const int *dil)
{
    for (int a = 0; a < k[0]; a++) {
        const T *rows = ring + slot * plane + y * rw + x;
        for (int b = 0; b < k[1]; b++, w += k[2]) {
            const T *row = rows + b * dil[1] * rw;
            if (dil[2] == 1) {
                T win[STRIP];
#pragma unroll
                for (int j = 0; j < STRIP; j++)
                    win[j] = row[j];
                for (int e = 0;; e++) {
                    const T wv = w[e];
#pragma unroll
                    for (int j = 0; j < STRIP; j++)
                        acc[j] += wv * win[j];
                    if (e + 1 == k[2])
                        break;   // (no read past the strip's last tap)
#pragma unroll
                    for (int j = 0; j + 1 < STRIP; j++)
                        win[j] = win[j + 1];
                    win[STRIP - 1] = row[e + STRIP];
                }
            } else {
                for (int e = 0; e < k[2]; e++) {
                    const T wv = w[e];
#pragma unroll
                    for (int j = 0; j < STRIP; j++)
                        acc[j] += wv * row[j + e * dil[2]];
                }
            }
        }
        slot += dil[0];
        slot -= slot >= R ? R : 0;   // dil[0] < R whenever a second plane is read
    }
}

// Level l's plane d of the chain (l = 0: the input; l = L: the output, written to global memory). lo: the first
// plane of each level this chunk holds (ring slots count from it).
template <typename T>
__device__ void chain_plane(const Chain &g, T *sh, const T *__restrict__ xc, T *__restrict__ oc, int l, int d,
                            const int *lo, int h0, int w0)
{
    if (l == 0) {
        load_plane(sh + g.ring[0] + ((d - lo[0]) % g.k[0][0]) * g.rh[0] * g.rw[0], xc, d, g.D, g.H, g.W,
                   h0 - g.oh[0], w0 - g.ow[0], g.rh[0], g.rw[0]);
        return;
    }
    const int s = l - 1, R = g.k[s][0], plane = g.rh[s] * g.rw[s];
    const int slot = (d - g.p[s][0] - lo[s]) % R;   // the first plane stage s reads
    const int one[3] = {1, 1, 1};
    const T *w = sh + g.wsh[s], bias = sh[g.taps + s];
    const int rh = g.rh[l], rw = g.rw[l], hs = h0 - g.oh[l], ws = w0 - g.ow[l], strips = rw / STRIP;
    const bool plane_in = d >= 0 && d < g.D;
    T *dst = l < g.L ? sh + g.ring[l] + ((d - lo[l]) % g.k[l][0]) * rh * rw : nullptr;
    for (int i = threadIdx.x; i < rh * strips; i += blockDim.x) {
        const int y = i / strips, x = (i - y * strips) * STRIP, h = hs + y;
        T acc[STRIP];
#pragma unroll
        for (int j = 0; j < STRIP; j++)
            acc[j] = bias;
        window(acc, sh + g.ring[s], R, plane, slot, g.rw[s], y, x, w, g.k[s], one);
#pragma unroll
        for (int j = 0; j < STRIP; j++) {
            const int w_ = ws + x + j;
            const bool in = plane_in && h >= 0 && h < g.H && w_ >= 0 && w_ < g.W;
            if (l == g.L) {
                if (in)
                    oc[((long long)d * g.H + h) * g.W + w_] = acc[j];
            } else {   // an intermediate: zero outside the volume (the next stage's padding)
                dst[y * rw + x + j] = in ? activate(acc[j], g.act) : T(0);
            }
        }
    }
}

template <typename T>
__global__ void nested_depthwise_kernel(const T *__restrict__ x, const T *__restrict__ wg, const T *__restrict__ bg,
                                        T *__restrict__ out, Chain g)
{
    VC_DYNAMIC_SHARED(unsigned char, smem);
    T *sh = reinterpret_cast<T *>(smem);
    const int tiles_w = (g.W + g.TW - 1) / g.TW;
    const int h0 = (int)(blockIdx.x / tiles_w) * g.TH, w0 = (int)(blockIdx.x % tiles_w) * g.TW;
    const long long volume = (long long)g.D * g.H * g.W;
    // grid-stride over (n, c) and chunks: the grid's y and z are capped at 65535
    for (long long z = blockIdx.z; z < (long long)g.N * g.C; z += gridDim.z) {
        const int c = (int)(z % g.C);
        __syncthreads();   // every thread is done with the previous channel's weights
        for (int s = 0; s < g.L; s++) {
            const int taps = g.k[s][0] * g.k[s][1] * g.k[s][2];
            for (int i = threadIdx.x; i < taps; i += blockDim.x)
                sh[g.wsh[s] + i] = wg[g.wg[s] + (long long)c * taps + i];
            if (threadIdx.x == 0)
                sh[g.taps + s] = bg[(long long)s * g.C + c];
        }
        __syncthreads();   // (a chunk's first step loads an input plane and syncs, but no stage should rely on it)
        for (int d0 = blockIdx.y * g.CD; d0 < g.D; d0 += gridDim.y * g.CD) {
            const int d1 = min(g.D, d0 + g.CD);
            int lo[MAX_STAGES + 1], next[MAX_STAGES + 1];
            lo[g.L] = next[g.L] = d0;
            for (int l = g.L - 1; l >= 0; l--)
                lo[l] = next[l] = lo[l + 1] - g.p[l][0];
            while (next[g.L] < d1) {   // the same steps in every thread: the barrier is reached by all
                int l = g.L;           // pull: the highest level whose next plane can be computed now
                while (l > 0 && next[l - 1] <= next[l] - g.p[l - 1][0] + g.k[l - 1][0] - 1)
                    l--;
                chain_plane(g, sh, x + z * volume, out + z * volume, l, next[l], lo, h0, w0);
                next[l]++;
                __syncthreads();
            }
        }
    }
}

template <typename T>
__global__ void multiscale_depthwise_kernel(const T *__restrict__ x, const T *__restrict__ wg,
                                            const T *__restrict__ bg, T *__restrict__ out, Branches g)
{
    VC_DYNAMIC_SHARED(unsigned char, smem);
    T *sh = reinterpret_cast<T *>(smem);
    T *ring = sh + g.ring;
    const int tiles_w = (g.W + g.TW - 1) / g.TW;
    const int h0 = (int)(blockIdx.x / tiles_w) * g.TH, w0 = (int)(blockIdx.x % tiles_w) * g.TW;
    const int R = g.E[0], plane = g.rh * g.rw, O = g.sum ? g.m[0] * g.C : g.ooff[g.B - 1] + g.m[g.B - 1] * g.C;
    const long long volume = (long long)g.D * g.H * g.W;
    for (long long z = blockIdx.z; z < (long long)g.N * g.C; z += gridDim.z) {
        const long long n = z / g.C;
        const int c = (int)(z % g.C);
        __syncthreads();
        for (int i = 0; i < g.B; i++) {   // branch i's output channels c * m .. c * m + m - 1 read channel c
            const int taps = g.k[i][0] * g.k[i][1] * g.k[i][2];
            for (int j = threadIdx.x; j < g.m[i] * taps; j += blockDim.x)
                sh[g.wsh[i] + j] = wg[g.wg[i] + (long long)c * g.m[i] * taps + j];
            for (int j = threadIdx.x; j < g.m[i]; j += blockDim.x)
                sh[g.bsh[i] + j] = bg[g.bg[i] + (long long)c * g.m[i] + j];
        }
        __syncthreads();
        const T *xc = x + z * volume;
        for (int d0 = blockIdx.y * g.CD; d0 < g.D; d0 += gridDim.y * g.CD) {
            const int d1 = min(g.D, d0 + g.CD), lo = d0 - g.P[0];
            int next = lo;
            for (int od = d0; od < d1; od++) {
                for (; next <= od - g.P[0] + R - 1; next++)   // the input planes output plane od reads
                    load_plane(ring + ((next - lo) % R) * plane, xc, next, g.D, g.H, g.W, h0 - g.P[1], w0 - g.P[2],
                               g.rh, g.rw);
                __syncthreads();
                const int first = (od - g.P[0] - lo) % R, strips = g.TW / STRIP;
                for (int i = threadIdx.x; i < g.TH * strips; i += blockDim.x) {
                    const int y = i / strips, xx = (i - y * strips) * STRIP, h = h0 + y, w = w0 + xx;
                    if (h >= g.H || w >= g.W)
                        continue;   // (no barrier in this loop)
                    const long long at = ((long long)od * g.H + h) * g.W + w;
                    const int last = min(STRIP, g.W - w);   // outputs of the strip inside the volume
                    T acc[STRIP];
                    // summed: one pass of every branch per output channel; concatenated: each branch its channels
                    for (int o = 0; o < (g.sum ? g.m[0] : g.B); o++) {
                        for (int q = 0; q < (g.sum ? g.B : g.m[o]); q++) {
                            const int b = g.sum ? q : o, j = g.sum ? o : q;
                            if (!g.sum || q == 0) {
#pragma unroll
                                for (int t = 0; t < STRIP; t++)
                                    acc[t] = 0;
                            }
                            const int taps = g.k[b][0] * g.k[b][1] * g.k[b][2], s = first + g.off[b][0];
#pragma unroll
                            for (int t = 0; t < STRIP; t++)
                                acc[t] += sh[g.bsh[b] + j];
                            window(acc, ring, R, plane, s - (s >= R ? R : 0), g.rw, y + g.off[b][1],
                                   xx + g.off[b][2], sh + g.wsh[b] + j * taps, g.k[b], g.dil[b]);
                            if (g.sum && q + 1 < g.B)
                                continue;   // more branches to add
                            T *dst = out + (n * O + (g.sum ? 0 : g.ooff[b]) + (long long)c * g.m[b] + j) * volume + at;
                            for (int t = 0; t < last; t++)
                                dst[t] = acc[t];
                        }
                    }
                }
                __syncthreads();   // every thread is done with the ring's oldest plane
            }
        }
    }
}

// The launch both share: tiles of the output plane on x, chunks of planes on y, (n, c) on z (the last two capped
// and strided in the kernels).
inline bool grid_of(int N, int C, int D, int H, int W, int TH, int TW, int CD, dim3 *grid)
{
    const long long tiles = (long long)((H + TH - 1) / TH) * ((W + TW - 1) / TW);
    if (tiles > 0x7fffffffLL)
        return false;
    const long long chunks = (D + CD - 1) / CD, items = (long long)N * C;
    *grid = dim3((unsigned)tiles, (unsigned)vc::min_ll(chunks, 65535), (unsigned)vc::min_ll(items, 65535));
    return true;
}

// Warps enough for one strip per thread of the largest computed plane (more would idle), at most MAX_THREADS.
inline int threads_for(long long strips)
{
    const long long warps = (strips + 31) / 32 * 32;
    return (int)(warps < 64 ? 64 : warps > MAX_THREADS ? MAX_THREADS : warps);
}

inline bool sizes_ok(const long long *q)
{
    for (int i = 0; i < 10; i++)   // N, C, D, H, W, count, flag, TH, TW, CD
        if (q[i] < 0 || q[i] > 0x7fffffffLL)
            return false;
    return q[1] > 0 && q[2] > 0 && q[3] > 0 && q[4] > 0 && q[7] > 0 && q[8] > 0 && q[8] % STRIP == 0 && q[9] > 0 &&
           q[7] * q[8] <= 1 << 20;
}

// params: N, C, D, H, W, L, activation (0 none, 1 relu, 2 gelu, 3 silu), TH, TW, CD, then kd, kh, kw per stage.
bool read_chain(const long long *q, Chain *g, long long *smem_elems)
{
    if (!sizes_ok(q) || q[5] < 1 || q[5] > MAX_STAGES || q[6] < 0 || q[6] > 3)
        return false;
    *g = Chain{};
    g->N = (int)q[0], g->C = (int)q[1], g->D = (int)q[2], g->H = (int)q[3], g->W = (int)q[4], g->L = (int)q[5];
    g->act = (int)q[6], g->TH = (int)q[7], g->TW = (int)q[8], g->CD = (int)q[9];
    long long taps = 0, wg = 0;
    for (int s = 0; s < g->L; s++) {
        for (int a = 0; a < 3; a++) {
            if (q[10 + 3 * s + a] < 1 || q[10 + 3 * s + a] > 1024)
                return false;
            g->k[s][a] = (int)q[10 + 3 * s + a];
            g->p[s][a] = (g->k[s][a] - 1) / 2;
        }
        g->wsh[s] = (int)taps, g->wg[s] = wg;
        const long long t = (long long)g->k[s][0] * g->k[s][1] * g->k[s][2];
        taps += t, wg += t * g->C;
    }
    g->taps = (int)taps;
    g->rh[g->L] = g->TH, g->rw[g->L] = g->TW;   // level L: the output tile
    for (int l = g->L - 1; l >= 0; l--) {       // level l: what stage l reads for level l + 1's strips
        g->rh[l] = g->rh[l + 1] + g->k[l][1] - 1, g->rw[l] = g->rw[l + 1] + g->k[l][2] - 1;
        if (l > 0)   // computed in strips (level 0, the input, is loaded)
            g->rw[l] = (g->rw[l] + STRIP - 1) / STRIP * STRIP;
        g->oh[l] = g->oh[l + 1] + g->p[l][1], g->ow[l] = g->ow[l + 1] + g->p[l][2];
    }
    long long at = taps + g->L;
    for (int l = 0; l < g->L; l++) {
        g->ring[l] = (int)vc::min_ll(at, 0x7fffffffLL);
        at += (long long)g->k[l][0] * g->rh[l] * g->rw[l];
    }
    *smem_elems = at;
    g->threads = threads_for((long long)g->rh[1] * (g->rw[1] / STRIP));
    return true;
}

// params: N, C, D, H, W, B, sum (0 concat, 1 sum), TH, TW, CD, then per branch m, kd, kh, kw, dd, dh, dw.
bool read_branches(const long long *q, Branches *g, long long *smem_elems)
{
    if (!sizes_ok(q) || q[5] < 1 || q[5] > MAX_BRANCHES || q[6] < 0 || q[6] > 1)
        return false;
    *g = Branches{};
    g->N = (int)q[0], g->C = (int)q[1], g->D = (int)q[2], g->H = (int)q[3], g->W = (int)q[4], g->B = (int)q[5];
    g->sum = (int)q[6], g->TH = (int)q[7], g->TW = (int)q[8], g->CD = (int)q[9];
    long long ext[MAX_BRANCHES][3], wsh = 0, bsh = 0, wg = 0, bg = 0, ooff = 0;
    for (int i = 0; i < g->B; i++) {
        const long long *b = q + 10 + 7 * i;
        for (int j = 0; j < 7; j++)
            if (b[j] < 1 || b[j] > 1024)
                return false;
        if (g->sum && b[0] != q[10])
            return false;   // summed branches have the same outputs
        g->m[i] = (int)b[0];
        for (int a = 0; a < 3; a++) {
            g->k[i][a] = (int)b[1 + a], g->dil[i][a] = (int)b[4 + a];
            ext[i][a] = (long long)g->dil[i][a] * (g->k[i][a] - 1) + 1;
            g->E[a] = (int)vc::min_ll((g->E[a] > ext[i][a] ? (long long)g->E[a] : ext[i][a]), 0x7fffffff);
        }
        const long long taps = (long long)g->k[i][0] * g->k[i][1] * g->k[i][2];
        g->wsh[i] = (int)wsh, g->bsh[i] = (int)bsh, g->wg[i] = wg, g->bg[i] = bg, g->ooff[i] = (int)ooff;
        wsh += g->m[i] * taps, bsh += g->m[i], wg += g->m[i] * taps * g->C, bg += (long long)g->m[i] * g->C;
        ooff += (long long)g->m[i] * g->C;
    }
    if (ooff > 0x7fffffffLL)
        return false;
    for (int a = 0; a < 3; a++) {
        g->P[a] = (g->E[a] - 1) / 2;
        for (int i = 0; i < g->B; i++)
            g->off[i][a] = g->P[a] - (int)((ext[i][a] - 1) / 2);
    }
    for (int i = 0; i < g->B; i++)
        g->bsh[i] += (int)wsh;
    g->rh = g->TH + g->E[1] - 1, g->rw = g->TW + g->E[2] - 1;
    g->ring = (int)(wsh + bsh);
    g->threads = threads_for((long long)g->TH * (g->TW / STRIP));
    *smem_elems = wsh + bsh + (long long)g->E[0] * g->rh * g->rw;
    return true;
}

template <typename T, typename Geometry>
int launch(void (*kernel)(const T *, const T *, const T *, T *, Geometry), const Geometry &g, long long smem_elems,
           const void *x, const void *w, const void *b, void *out, cudaStream_t stream)
{
    const long long bytes = smem_elems * (long long)sizeof(T);
    dim3 grid;
    if (bytes > SHARED_BYTES || !grid_of(g.N, g.C, g.D, g.H, g.W, g.TH, g.TW, g.CD, &grid))
        return vc::BAD_ARGUMENT;
    if (g.N == 0)
        return 0;
    VC_LAUNCH(kernel, grid, g.threads, (size_t)bytes, stream)(static_cast<const T *>(x), static_cast<const T *>(w),
                                                            static_cast<const T *>(b), static_cast<T *>(out), g);
    return vc::status(cudaGetLastError());
}

}  // namespace

extern "C" {

int vc_nested_depthwise_forward(int dtype, const void *x, const void *w, const void *b, void *out,
                                const long long *params, void *stream)
{
    Chain g;
    long long smem = 0;
    if (!read_chain(params, &g, &smem))
        return vc::BAD_ARGUMENT;
    return vc::by_dtype(dtype, [&](auto zero) {
        using T = decltype(zero);
        return launch<T, Chain>(nested_depthwise_kernel<T>, g, smem, x, w, b, out, static_cast<cudaStream_t>(stream));
    });
}

int vc_multiscale_depthwise_forward(int dtype, const void *x, const void *w, const void *b, void *out,
                                    const long long *params, void *stream)
{
    Branches g;
    long long smem = 0;
    if (!read_branches(params, &g, &smem))
        return vc::BAD_ARGUMENT;
    return vc::by_dtype(dtype, [&](auto zero) {
        using T = decltype(zero);
        return launch<T, Branches>(multiscale_depthwise_kernel<T>, g, smem, x, w, b, out,
                                   static_cast<cudaStream_t>(stream));
    });
}

}  // extern "C"
