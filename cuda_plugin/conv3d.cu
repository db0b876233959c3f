// Direct 3-D convolution on the GPU: forward, input gradient and weight gradient (torch.conv3d semantics, zero
// padding, any groups, stride and dilation). See volconv_cuda.h for the interface.
//
// Forward: a block computes a 32 x 8 tile of output columns x rows of one output plane and channel; the
// channel's weights sit in shared memory when they fit (48 KiB), every thread accumulates one voxel in a
// register, reading its inputs through the read-only cache (neighbouring threads read neighbouring columns).
// Input gradient: one thread per input voxel gathers the output voxels whose taps land on it (no atomics).
// Weight gradient: one block per weight reduces over every output voxel in a fixed order (deterministic).
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

// Position q along an axis receives output position p through tap t when p * s - pad + t * dil == q.
__device__ inline bool source(long long q, long long t, long long s, long long pad, long long dil, long long n_out,
                              long long *p)
{
    const long long num = q + pad - t * dil;
    if (num < 0 || num % s)
        return false;
    *p = num / s;
    return *p < n_out;
}

template <typename T>
__global__ void conv3d_grad_input_kernel(const T *__restrict__ grad, const T *__restrict__ w, T *__restrict__ gx,
                                         Geom g)
{
    const long long total = g.N * g.C * g.D * g.H * g.W;
    const long long Cg = g.C / g.G, Og = g.O / g.G;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long iw = i % g.W, ih = (i / g.W) % g.H, id = (i / (g.W * g.H)) % g.D;
        const long long c = (i / (g.W * g.H * g.D)) % g.C, n = i / (g.W * g.H * g.D * g.C);
        const long long grp = c / Cg, cc = c % Cg;
        T acc = 0;
        for (long long a = 0; a < g.kd; a++) {
            long long od;
            if (!source(id, a, g.sd, g.pd, g.dd, g.Do, &od))
                continue;
            for (long long bb = 0; bb < g.kh; bb++) {
                long long oh;
                if (!source(ih, bb, g.sh, g.ph, g.dh, g.Ho, &oh))
                    continue;
                for (long long e = 0; e < g.kw; e++) {
                    long long ow;
                    if (!source(iw, e, g.sw, g.pw, g.dw, g.Wo, &ow))
                        continue;
                    for (long long o = grp * Og; o < (grp + 1) * Og; o++)
                        acc += grad[(((n * g.O + o) * g.Do + od) * g.Ho + oh) * g.Wo + ow] *
                               w[(((o * Cg + cc) * g.kd + a) * g.kh + bb) * g.kw + e];
                }
            }
        }
        gx[i] = acc;
    }
}

constexpr int REDUCE = 256;

template <typename T>
__global__ void conv3d_grad_weight_kernel(const T *__restrict__ x, const T *__restrict__ grad, T *__restrict__ gw,
                                          Geom g)
{
    VC_SHARED(T, part, [REDUCE]);
    const long long Cg = g.C / g.G, Og = g.O / g.G;
    const long long k = blockIdx.x;   // weight index (o, c, a, b, e)
    const long long e = k % g.kw, bb = (k / g.kw) % g.kh, a = (k / (g.kw * g.kh)) % g.kd;
    const long long cc = (k / (g.kw * g.kh * g.kd)) % Cg, o = k / (g.kw * g.kh * g.kd * Cg);
    const long long c = (o / Og) * Cg + cc;
    const long long per = g.Do * g.Ho * g.Wo, total = g.N * per;
    T acc = 0;
    for (long long i = threadIdx.x; i < total; i += REDUCE) {
        const long long ow = i % g.Wo, oh = (i / g.Wo) % g.Ho, od = (i / (g.Wo * g.Ho)) % g.Do, n = i / per;
        const long long id = od * g.sd - g.pd + a * g.dd, ih = oh * g.sh - g.ph + bb * g.dh;
        const long long iw = ow * g.sw - g.pw + e * g.dw;
        if (id < 0 || id >= g.D || ih < 0 || ih >= g.H || iw < 0 || iw >= g.W)
            continue;
        acc += grad[(n * g.O + o) * per + (od * g.Ho + oh) * g.Wo + ow] *
               x[(((n * g.C + c) * g.D + id) * g.H + ih) * g.W + iw];
    }
    part[threadIdx.x] = acc;
    __syncthreads();
    for (int s = REDUCE / 2; s > 0; s >>= 1) {   // a fixed tree: the same sum on every run
        if (threadIdx.x < s)
            part[threadIdx.x] += part[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0)
        gw[k] = part[0];
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
        static_cast<const T *>(grad), static_cast<const T *>(w), static_cast<T *>(gx), g);
    return vc::status(cudaGetLastError());
}

template <typename T>
int grad_weight(const void *x, const void *grad, void *gw, const Geom &g, cudaStream_t stream)
{
    const long long weights = g.O * (g.C / g.G) * g.kd * g.kh * g.kw;
    if (weights > 0x7fffffffLL)
        return vc::BAD_GEOMETRY;
    VC_LAUNCH(conv3d_grad_weight_kernel<T>, (unsigned)weights, REDUCE, 0, stream)(
        static_cast<const T *>(x), static_cast<const T *>(grad), static_cast<T *>(gw), g);
    return vc::status(cudaGetLastError());
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
