// Direct 3-D convolution on the GPU: forward, input gradient and weight gradient (torch.conv3d semantics, zero
// padding, any groups, stride and dilation). See volconv_cuda.h for the interface.
//
// Forward: a block computes a 32 x 8 tile of output columns x rows of one output plane and channel; the
// channel's weights sit in shared memory when they fit (48 KiB), every thread accumulates one voxel in a
// register, reading its inputs through the read-only cache (neighbouring threads read neighbouring columns).
// Input gradient (the caller uses it at stride > 1; at stride 1 it runs the forward with the flipped kernel): one
// thread per input voxel gathers the output voxels whose taps land on it, stepping along each axis through the
// taps of its residue class (no atomics, no division per tap).
// Weight gradient: blocks of (channel pair, tap box) x (slice of output tiles) accumulate every tap of the box
// from shared-memory tiles into partial sums, a second kernel adds the slices in a fixed order (deterministic).
#include "vc_common.cuh"

namespace {

using vc::Geom;

constexpr int TX = 32, TY = 8;               // forward tile: columns x rows
constexpr long long SHARED_WEIGHTS = 48 * 1024;

template <typename T>
__global__ void conv3d_forward_kernel(const T *__restrict__ x, const T *__restrict__ w, const T *__restrict__ b,
                                      T *__restrict__ out, Geom g, bool weights_in_shared)
{
    VC_DYNAMIC_SHARED(unsigned char, smem);
    T *ws = reinterpret_cast<T *>(smem);
    const long long Cg = g.C / g.G, taps = g.kd * g.kh * g.kw;
    const long long tiles_w = (g.Wo + TX - 1) / TX;
    const long long ow = (blockIdx.x % tiles_w) * TX + threadIdx.x;
    const long long oh = (blockIdx.x / tiles_w) * TY + threadIdx.y;
    const bool inside = ow < g.Wo && oh < g.Ho;
    // grid-stride over (n, o) and output planes: the grid's y and z are capped at 65535, torch's sizes are not
    for (long long z = blockIdx.z; z < g.N * g.O; z += gridDim.z) {
        const long long n = z / g.O, o = z % g.O;
        const T *wo = w + o * Cg * taps;
        if (weights_in_shared) {
            __syncthreads();   // every thread is done with the previous channel's weights
            for (long long i = threadIdx.y * TX + threadIdx.x; i < Cg * taps; i += TX * TY)
                ws[i] = wo[i];
            __syncthreads();
            wo = ws;
        }
        if (!inside)
            continue;   // (no return: the block's barriers above need every thread)
        const long long c0 = (o / (g.O / g.G)) * Cg;
        for (long long od = blockIdx.y; od < g.Do; od += gridDim.y) {
            T acc = b ? b[o] : T(0);
            for (long long c = 0; c < Cg; c++) {
                const T *xc = x + ((n * g.C + c0 + c) * g.D) * g.H * g.W;
                for (long long a = 0; a < g.kd; a++) {
                    const long long id = od * g.sd - g.pd + a * g.dd;
                    if (id < 0 || id >= g.D)
                        continue;
                    for (long long bb = 0; bb < g.kh; bb++) {
                        const long long ih = oh * g.sh - g.ph + bb * g.dh;
                        if (ih < 0 || ih >= g.H)
                            continue;
                        const T *row = xc + (id * g.H + ih) * g.W;
                        const T *wr = wo + ((c * g.kd + a) * g.kh + bb) * g.kw;
                        for (long long e = 0; e < g.kw; e++) {
                            const long long iw = ow * g.sw - g.pw + e * g.dw;
                            if (iw >= 0 && iw < g.W)
                                acc += __ldg(row + iw) * wr[e];
                        }
                    }
                }
            }
            out[(((n * g.O + o) * g.Do + od) * g.Ho + oh) * g.Wo + ow] = acc;
        }
    }
}

// ---- input gradient at any stride: per axis, the taps that reach an input position, without div/mod per tap ----

// Along one axis, position q receives output p through tap t when p * s - pad + t * dil == q: the taps that do
// are t0, t0 + step, ... (step = s / gcd(s, dil)) from outputs p0, p0 - dp, ... (dp = step * dil / s). Found
// once per voxel and axis: one mod, at most s residue steps, one division.
struct Reach {
    long long t0, p0;   // t0 >= k: no tap reaches q
};

__device__ inline Reach reach(long long q, long long s, long long pad, long long dil, long long k, long long step)
{
    const long long num = q + pad;
    long long res = num % s, t = 0;   // res: (num - t * dil) mod s
    const long long dm = dil % s, lim = step < k ? step : k;
    while (t < lim && res != 0) {
        res -= dm;
        res += res < 0 ? s : 0;
        t++;
    }
    if (t == lim || num < t * dil)
        return Reach{k, 0};
    return Reach{t, (num - t * dil) / s};
}

struct AxisStep {
    long long step, dp;   // tap and output steps of the taps that reach a position (see Reach)
};

inline AxisStep axis_step(long long s, long long dil)
{
    long long a = s, b = dil;
    while (b) {
        const long long r = a % b;
        a = b;
        b = r;
    }
    return AxisStep{s / a, dil / a};   // step * dil / s == dil / gcd
}

template <typename T>
__launch_bounds__(256, 3) __global__
    void conv3d_grad_input_kernel(const T *__restrict__ grad, const T *__restrict__ w, T *__restrict__ gx, Geom g,
                                  AxisStep sd, AxisStep sh, AxisStep sw)
{
    const long long total = g.N * g.C * g.D * g.H * g.W;
    const long long Cg = g.C / g.G, Og = g.O / g.G, taps = g.kd * g.kh * g.kw, plane = g.Do * g.Ho * g.Wo;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long iw = i % g.W, ih = (i / g.W) % g.H, id = (i / (g.W * g.H)) % g.D;   // per voxel
        const long long c = (i / (g.W * g.H * g.D)) % g.C, n = i / (g.W * g.H * g.D * g.C);
        const long long grp = c / Cg, cc = c % Cg;
        const Reach rd = reach(id, g.sd, g.pd, g.dd, g.kd, sd.step), rh = reach(ih, g.sh, g.ph, g.dh, g.kh, sh.step),
                    rw = reach(iw, g.sw, g.pw, g.dw, g.kw, sw.step);
        const T *go = grad + (n * g.O + grp * Og) * plane;   // output channel grp * Og of item n
        const T *wo = w + (grp * Og * Cg + cc) * taps;       // its weights for input channel c
        T acc = 0;
        for (long long a = rd.t0, od = rd.p0; a < g.kd && od >= 0; a += sd.step, od -= sd.dp) {
            if (od >= g.Do)
                continue;
            for (long long b = rh.t0, oh = rh.p0; b < g.kh && oh >= 0; b += sh.step, oh -= sh.dp) {
                if (oh >= g.Ho)
                    continue;
                const T *grow = go + (od * g.Ho + oh) * g.Wo;
                const T *wrow = wo + (a * g.kh + b) * g.kw;
                for (long long e = rw.t0, ow = rw.p0; e < g.kw && ow >= 0; e += sw.step, ow -= sw.dp) {
                    if (ow >= g.Wo)
                        continue;
                    const T *gp = grow + ow, *wp = wrow + e;
                    for (long long o = 0; o < Og; o++, gp += plane, wp += Cg * taps)
                        acc += __ldg(gp) * __ldg(wp);
                }
            }
        }
        gx[i] = acc;
    }
}

// ---- weight gradient: fixed tiles of the output, partial sums per tile range, then a fixed-order sum ----------

// A block (256 threads) takes one job, the box of taps [a0, a0 + na) x [b0, b0 + nb) x [e0, e0 + ne) of one
// (output channel o, input channel c) pair, and one slice of the output tiles (a tile: th rows x tw columns of
// one output plane of one item). Per tile it loads the grad tile and the input the box's taps read (na planes of
// rows x cols, zeros outside the volume) into shared memory once; each thread owns a slot of GW_TAPS taps in
// registers and a lane of the tile's outputs (so a small box still keeps every thread busy). Two ways to own:
//  - strided (any geometry): slot s the box taps s, s + S, ...; lane l the outputs l, l + L, ... of the tile
//    (neighbouring threads read neighbouring words; a shared load per tap and output);
//  - sliding (sw == dw, kw >= 3): slot s GW_TAPS neighbouring taps of one tap row, lane l segments of GW_RUN
//    neighbouring outputs of a row: the inputs they read overlap, a window of GW_RUN + GW_TAPS - 1 values serves
//    GW_RUN x GW_TAPS products (0.6 shared loads per product instead of 1.25).
// At the end the lanes are summed in order and the slice's partial sums written to partial[slice][weight];
// conv3d_grad_weight_sum_kernel adds the slices in order. No atomics: the same bits in any block or thread order.
constexpr int GW_THREADS = 256, GW_TAPS = 4, GW_RUN = 8;
constexpr long long GW_SHARED = 48 * 1024, GW_BLOCKS = 4096;   // shared bytes per block; blocks to fill a GPU

struct GwPlan {
    long long na, nb, ne, ca, cb, ce;   // tap box and boxes per tap axis (ca = ceil(kd / na), ...)
    long long th, tw, gstride;          // output tile, its row stride in shared memory (sliding: >= GW_RUN)
    long long rows, cols;               // input tile of one tap plane: rows x cols
    long long tiles_h, tiles_w, tiles;  // tiles per plane along H and W; in all
    long long jobs, slices;             // blocks: jobs (o, c, box) x slices (consecutive ranges of tiles)
    bool slide;                         // the sliding ownership
};

inline long long pow2_at_least(long long v, long long cap)
{
    long long p = 1;
    while (p < v && p < cap)
        p *= 2;
    return p;
}

inline long long ceil_div(long long a, long long b) { return (a + b - 1) / b; }

__host__ __device__ inline long long lmin(long long a, long long b) { return a < b ? a : b; }

// Slots of a box: strided, ceil(taps / GW_TAPS); sliding, a slot per GW_TAPS taps of each tap row.
template <typename I>   // long long on the host, int on the device
__host__ __device__ inline I box_slots(bool slide, I na, I nb, I ne)
{
    return slide ? na * nb * ((ne + GW_TAPS - 1) / GW_TAPS) : (na * nb * ne + GW_TAPS - 1) / GW_TAPS;
}

// Tap r of slot `slot` as (ia, ib, ie) in the box; false: the slot has fewer taps.
__device__ inline bool box_tap(bool slide, int nb, int ne, int taps, int S, int slot, int r, int *ia, int *ib,
                               int *ie)
{
    const int chunks = (ne + GW_TAPS - 1) / GW_TAPS;
    const int k = slide ? slot / chunks * ne + slot % chunks * GW_TAPS + r : slot + r * S;   // box tap index
    *ia = k / (nb * ne), *ib = k / ne % nb, *ie = k % ne;
    return slide ? slot % chunks * GW_TAPS + r < ne : k < taps;
}

template <typename T>
GwPlan plan_grad_weight(const Geom &g)
{
    GwPlan p{};
    p.slide = g.sw == g.dw && g.kw >= 3;
    p.tw = pow2_at_least(g.Wo, 32);
    p.th = pow2_at_least(g.Ho, GW_THREADS / p.tw);
    p.na = g.kd, p.nb = g.kh, p.ne = g.kw;
    auto gstride = [&] { return p.slide && p.tw < GW_RUN ? GW_RUN : p.tw; };
    auto rows = [&] { return (p.th - 1) * g.sh + (p.nb - 1) * g.dh + 1; };
    auto cols = [&] {   // sliding: a segment's window may pass the tile's last column, it reads zeros there
        return (p.slide ? (gstride() + p.ne + GW_TAPS - 3) * g.sw + 1 : (p.tw - 1) * g.sw + (p.ne - 1) * g.dw + 1) |
               1;   // odd: the rows of the taps start in different banks
    };
    auto bytes = [&] {
        return (p.na * rows() * cols() + p.th * gstride() + GW_THREADS * GW_TAPS) * (long long)sizeof(T);
    };
    // shrink the box and the tile until the box's slots fit the threads and the tiles the shared memory
    while (box_slots(p.slide, p.na, p.nb, p.ne) > GW_THREADS || bytes() > GW_SHARED) {
        if (p.na > 1)
            p.na = (p.na + 1) / 2;
        else if (p.nb > 1)
            p.nb = (p.nb + 1) / 2;
        else if (p.th > 1)
            p.th /= 2;
        else if (p.slide)
            p.slide = false;   // a sliding window reads at least GW_RUN + ne + 1 columns
        else if (p.ne > 1)
            p.ne = (p.ne + 1) / 2;
        else
            p.tw /= 2;   // tw == 1 with a 1-tap box always fits
    }
    p.ca = ceil_div(g.kd, p.na), p.cb = ceil_div(g.kh, p.nb), p.ce = ceil_div(g.kw, p.ne);
    p.na = ceil_div(g.kd, p.ca), p.nb = ceil_div(g.kh, p.cb), p.ne = ceil_div(g.kw, p.ce);   // even boxes
    p.gstride = gstride(), p.rows = rows(), p.cols = cols();
    p.tiles_h = ceil_div(g.Ho, p.th), p.tiles_w = ceil_div(g.Wo, p.tw);
    p.tiles = g.N * g.Do * p.tiles_h * p.tiles_w;
    p.jobs = g.O * (g.C / g.G) * p.ca * p.cb * p.ce;
    p.slices = vc::min_ll(ceil_div(GW_BLOCKS, p.jobs), p.tiles > 0 ? p.tiles : 1);
    return p;
}

template <typename T, bool SLIDE>
__launch_bounds__(GW_THREADS, 3) __global__ void
    conv3d_grad_weight_tiles_kernel(const T *__restrict__ x, const T *__restrict__ grad, T *__restrict__ partial,
                                    Geom g, GwPlan p)
{
    VC_DYNAMIC_SHARED(unsigned char, smem);
    T *gs = reinterpret_cast<T *>(smem), *red = gs + p.th * p.gstride, *xs = red + GW_THREADS * GW_TAPS;
    const int t = threadIdx.x, gstride = (int)p.gstride, cols = (int)p.cols;
    int gshift = 0;   // gstride == 1 << gshift
    while ((1 << gshift) < gstride)
        gshift++;
    const long long Cg = g.C / g.G, Og = g.O / g.G, weights = g.O * Cg * g.kd * g.kh * g.kw;
    const int sh = (int)g.sh, sw = (int)g.sw;   // (th - 1) * sh < rows and (tw - 1) * sw < cols: both fit an int
    for (long long blk = blockIdx.x; blk < p.jobs * p.slices; blk += gridDim.x) {   // the same for every thread
        // job-major within a slice: the blocks running together read the same tiles (of several channels), so
        // each tile comes from DRAM about once and from L2 after
        const long long slice = blk / p.jobs;
        long long j = blk % p.jobs;
        const long long be = j % p.ce, bb = (j / p.ce) % p.cb, ba = (j / (p.ce * p.cb)) % p.ca;
        j /= p.ce * p.cb * p.ca;
        const long long cc = j % Cg, o = j / Cg, c = (o / Og) * Cg + cc;
        const long long a0 = ba * p.na, b0 = bb * p.nb, e0 = be * p.ne;
        const int na = (int)lmin(p.na, g.kd - a0), nb = (int)lmin(p.nb, g.kh - b0),
                  ne = (int)lmin(p.ne, g.kw - e0);
        const int taps = na * nb * ne, S = box_slots(SLIDE, na, nb, ne), L = GW_THREADS / S;
        const int slot = t % S, lane = t / S;   // a warp's slots read one g word, their x words in distinct banks
        int off[GW_TAPS];   // where this thread's taps read, relative to the output's corner in xs
        for (int r = 0; r < GW_TAPS; r++) {
            int ia, ib, ie;
            off[r] = box_tap(SLIDE, nb, ne, taps, S, slot, r, &ia, &ib, &ie)
                         ? (ia * (int)p.rows + ib * (int)g.dh) * cols + ie * (int)g.dw
                         : 0;
        }
        T acc[GW_TAPS];
        for (int r = 0; r < GW_TAPS; r++)
            acc[r] = 0;
        const long long first = slice * p.tiles / p.slices, last = (slice + 1) * p.tiles / p.slices;
        for (long long tile = first; tile < last; tile++) {
            // per tile: where it is (the only 64-bit divisions), what it reads
            const long long tw_i = tile % p.tiles_w, th_i = (tile / p.tiles_w) % p.tiles_h;
            const long long od = (tile / (p.tiles_w * p.tiles_h)) % g.Do, n = tile / (p.tiles_w * p.tiles_h * g.Do);
            const long long oh0 = th_i * p.th, ow0 = tw_i * p.tw;
            const int vth = (int)lmin(p.th, g.Ho - oh0), vtw = (int)lmin(p.tw, g.Wo - ow0);
            const int rows = (vth - 1) * sh + (nb - 1) * (int)g.dh + 1;   // what this tile reads of the box's
            const int used = (vtw - 1) * sw + (ne - 1) * (int)g.dw + 1;   // p.rows x p.cols (a partial tile less)
            __syncthreads();   // every thread is done with the previous tile
            const T *gp = grad + (((n * g.O + o) * g.Do + od) * g.Ho + oh0) * g.Wo + ow0;
            for (int e = t; e < vth * gstride; e += GW_THREADS) {
                const int i = e >> gshift, jj = e - (i << gshift);
                gs[e] = jj < vtw ? __ldg(gp + i * g.Wo + jj) : T(0);
            }
            const long long ih0 = oh0 * g.sh - g.ph + b0 * g.dh, iw0 = ow0 * g.sw - g.pw + e0 * g.dw;
            for (int rr = t / 32; rr < na * rows; rr += GW_THREADS / 32) {   // a warp per input row
                const int ia = rr / rows, r = rr - ia * rows;
                const long long id = od * g.sd - g.pd + (a0 + ia) * g.dd, ih = ih0 + r;
                T *dst = xs + (ia * (int)p.rows + r) * cols;
                const bool row_in = id >= 0 && id < g.D && ih >= 0 && ih < g.H;
                const T *src = x + (((n * g.C + c) * g.D + (row_in ? id : 0)) * g.H + (row_in ? ih : 0)) * g.W;
                for (int q = t % 32; q < cols; q += 32) {
                    const long long iw = iw0 + q;
                    dst[q] = row_in && q < used && iw >= 0 && iw < g.W ? __ldg(src + iw) : T(0);
                }
            }
            __syncthreads();
            if (SLIDE && lane < L) {   // segments of GW_RUN outputs (i, j0..), one window of inputs per segment
                const int runs = (vtw + GW_RUN - 1) / GW_RUN;
                for (int q = lane; q < vth * runs; q += L) {
                    const int i = q / runs, j0 = (q - i * runs) * GW_RUN;
                    const T *gq = gs + i * gstride + j0, *xq = xs + off[0] + i * sh * cols + j0 * sw;
                    T win[GW_RUN + GW_TAPS - 1];
#pragma unroll
                    for (int u = 0; u < GW_RUN + GW_TAPS - 1; u++)
                        win[u] = xq[u * sw];
#pragma unroll
                    for (int v = 0; v < GW_RUN; v++) {
                        const T gv = gq[v];
#pragma unroll
                        for (int r = 0; r < GW_TAPS; r++)
                            acc[r] += gv * win[v + r];
                    }
                }
            } else if (lane < L) {   // this lane's outputs (i, jj) of the vth x vtw tile, stepping by L, no division
                const int di = L / vtw, dj = L % vtw;
                for (int i = lane / vtw, jj = lane % vtw; i < vth;) {
                    const T gv = gs[i * gstride + jj];
                    const T *xp = xs + i * sh * cols + jj * sw;
#pragma unroll
                    for (int r = 0; r < GW_TAPS; r++)
                        acc[r] += gv * xp[off[r]];
                    i += di, jj += dj;
                    if (jj >= vtw)
                        jj -= vtw, i++;
                }
            }
        }
        __syncthreads();   // the previous job's sums are read
        if (lane < L)
            for (int r = 0; r < GW_TAPS; r++)
                red[(lane * S + slot) * GW_TAPS + r] = acc[r];
        __syncthreads();
        for (int k = t; k < S * GW_TAPS; k += GW_THREADS) {   // slot k / 4 tap k % 4: its lanes' sums, lane order
            int ia, ib, ie;
            if (!box_tap(SLIDE, nb, ne, taps, S, k / GW_TAPS, k % GW_TAPS, &ia, &ib, &ie))
                continue;
            T sum = 0;
            for (int l = 0; l < L; l++)
                sum += red[l * S * GW_TAPS + k];
            const long long a = a0 + ia, b = b0 + ib, e = e0 + ie;
            partial[slice * weights + (((o * Cg + cc) * g.kd + a) * g.kh + b) * g.kw + e] = sum;
        }
    }
}

// gw[k] = the sum of partial[s][k] over the slices s: a block of 32 weights x 8 slice lanes (lane y adds slices y,
// y + 8, ... in order; then the 8 lanes in order): the same sum on every run, coalesced along the weights.
constexpr int SUM_W = 32, SUM_LANES = 8;

template <typename T>
__global__ void conv3d_grad_weight_sum_kernel(const T *__restrict__ partial, T *__restrict__ gw, long long weights,
                                              long long slices)
{
    VC_SHARED(T, lanes, [SUM_LANES][SUM_W]);
    for (long long k0 = blockIdx.x * (long long)SUM_W; k0 < weights; k0 += gridDim.x * (long long)SUM_W) {
        const long long k = k0 + threadIdx.x;
        T sum = 0;
        if (k < weights)
            for (long long s = threadIdx.y; s < slices; s += SUM_LANES)
                sum += partial[s * weights + k];
        __syncthreads();   // the previous weights' lanes are read
        lanes[threadIdx.y][threadIdx.x] = sum;
        __syncthreads();
        if (threadIdx.y == 0 && k < weights) {
            for (int l = 1; l < SUM_LANES; l++)
                sum += lanes[l][threadIdx.x];
            gw[k] = sum;
        }
    }
}

template <typename T>
int forward(const void *x, const void *w, const void *b, void *out, const Geom &g, cudaStream_t stream)
{
    const long long wbytes = (g.C / g.G) * g.kd * g.kh * g.kw * (long long)sizeof(T);
    const bool shared = wbytes <= SHARED_WEIGHTS;
    if (g.N == 0)
        return 0;   // an empty batch: nothing to compute
    const long long tiles = ((g.Wo + TX - 1) / TX) * ((g.Ho + TY - 1) / TY);
    if (tiles > 0x7fffffffLL)
        return vc::BAD_GEOMETRY;   // the grid's x
    const long long planes = g.Do < 65535 ? g.Do : 65535, items = g.N * g.O < 65535 ? g.N * g.O : 65535;
    dim3 block(TX, TY), grid((unsigned)tiles, (unsigned)planes, (unsigned)items);   // y, z: strided in the kernel
    VC_LAUNCH(conv3d_forward_kernel<T>, grid, block, shared ? wbytes : 0, stream)(
        static_cast<const T *>(x), static_cast<const T *>(w), static_cast<const T *>(b), static_cast<T *>(out), g,
        shared);
    return vc::status(cudaGetLastError());
}

template <typename T>
int grad_input(const void *grad, const void *w, void *gx, const Geom &g, cudaStream_t stream)
{
    const long long total = g.N * g.C * g.D * g.H * g.W;
    if (total == 0)
        return 0;
    VC_LAUNCH(conv3d_grad_input_kernel<T>, vc::grid_for(total, 256), 256, 0, stream)(
        static_cast<const T *>(grad), static_cast<const T *>(w), static_cast<T *>(gx), g, axis_step(g.sd, g.dd),
        axis_step(g.sh, g.dh), axis_step(g.sw, g.dw));
    return vc::status(cudaGetLastError());
}

template <typename T>
int grad_weight(const void *x, const void *grad, void *gw, const Geom &g, cudaStream_t stream)
{
    const long long weights = g.O * (g.C / g.G) * g.kd * g.kh * g.kw;
    if (weights > 0x7fffffffLL)
        return vc::BAD_GEOMETRY;
    const GwPlan p = plan_grad_weight<T>(g);
    const long long smem = (p.na * p.rows * p.cols + p.th * p.gstride + GW_THREADS * GW_TAPS) * (long long)sizeof(T);
    const unsigned blocks = vc::grid_for(p.jobs * p.slices * GW_THREADS, GW_THREADS);   // grid-strided beyond
    T *out = static_cast<T *>(gw);
    if (p.slices > 1) {   // one slice: the tiles kernel writes the gradient itself
        void *ws = nullptr;
        if (cudaError_t e = cudaMallocAsync(&ws, p.slices * weights * sizeof(T), stream))
            return vc::status(e);
        out = static_cast<T *>(ws);
    }
    const auto tiles = p.slide ? conv3d_grad_weight_tiles_kernel<T, true> : conv3d_grad_weight_tiles_kernel<T, false>;
    VC_LAUNCH(tiles, blocks, GW_THREADS, smem, stream)(static_cast<const T *>(x), static_cast<const T *>(grad), out, g,
                                                       p);
    cudaError_t e = cudaGetLastError();
    if (p.slices > 1) {
        if (e == cudaSuccess) {
            const dim3 block(SUM_W, SUM_LANES);
            VC_LAUNCH(conv3d_grad_weight_sum_kernel<T>, vc::grid_for(weights, SUM_W), block, 0, stream)(
                out, static_cast<T *>(gw), weights, p.slices);
            e = cudaGetLastError();
        }
        const cudaError_t f = cudaFreeAsync(out, stream);
        e = e ? e : f;
    }
    return vc::status(e);
}

}  // namespace

extern "C" {

int vc_conv3d_forward(int dtype, const void *x, const void *w, const void *b, void *out, const long long *geom,
                      void *stream)
{
    return vc::checked(dtype, geom, [&](auto zero, const Geom &g) {
        return forward<decltype(zero)>(x, w, b, out, g, static_cast<cudaStream_t>(stream));
    });
}

int vc_conv3d_grad_input(int dtype, const void *grad, const void *w, void *gx, const long long *geom, void *stream)
{
    return vc::checked(dtype, geom, [&](auto zero, const Geom &g) {
        return grad_input<decltype(zero)>(grad, w, gx, g, static_cast<cudaStream_t>(stream));
    });
}

int vc_conv3d_grad_weight(int dtype, const void *x, const void *grad, void *gw, const long long *geom, void *stream)
{
    return vc::checked(dtype, geom, [&](auto zero, const Geom &g) {
        return grad_weight<decltype(zero)>(x, grad, gw, g, static_cast<cudaStream_t>(stream));
    });
}

}  // extern "C"
