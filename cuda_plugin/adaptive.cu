// The spatially varying Gaussian (vc.adaptive_filter) on the GPU: at every voxel the volume weighted by the
// separable Gaussian of that voxel's own sigma, out[p] = sum_{a,b,e} wd_p(a) wh_p(b) ww_p(e) xp[p + (a, b, e)],
// w_p(t) = q_p^(t^2) for |t| <= the voxel's radius int(truncate * sigma_p / zoom + 0.5) (scipy's), normalised per
// axis, q_p = exp(-1 / (2 (sigma_p / zoom)^2)); sigma 0 keeps the voxel. The same sums as the CPU engine's
// (engine/dynamic.py's adaptive_gaussian), in another order. See volconv_cuda.h for the interface.
//
// One thread per output voxel. The weights are never stored: each axis's follow as running products
// (q^((t+1)^2) = q^(t^2) * q^(2t+1), two multiplies), and the taps come in mirrored pairs sharing a weight,
// so a pair costs two loads, an add and three multiplies - cheaper than loading the weight. xp is read through
// the read-only cache: the 32 threads of a warp are neighbours along W and share most of their rows.
// Only the voxel's own reach is summed (a warp waits for its widest voxel).
#include <math.h>
#include <string.h>

#include "vc_common.cuh"

namespace {

constexpr int THREADS = 256;

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

template <typename T>
__device__ Axis<T> axis_of(double sigma, double zoom, double truncate, long long reach)
{
    const double s = sigma / zoom;   // (as the CPU engine computes it, in double: the same radius)
    const double r = floor(truncate * s + 0.5);
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
    T acc = __ldg(x), cur = 1, step = aw.q;
    const T q2 = aw.q * aw.q;
    for (int e = 1; e <= aw.own; e++) {
        cur *= step;
        step *= q2;
        acc += cur * (__ldg(x - e) + __ldg(x + e));
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

template <typename T>
__global__ void __launch_bounds__(THREADS) adaptive_gaussian_kernel(const T *__restrict__ xp,
                                                                    const T *__restrict__ sigma,
                                                                    T *__restrict__ out, Params p)
{
    const long long total = p.D * p.H * p.W, Wp = p.W + 2 * p.rw, plane = (p.H + 2 * p.rh) * Wp;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long w = i % p.W, dh = i / p.W, h = dh % p.H, d = dh / p.H;   // (per voxel, not per tap)
        const double s = (double)sigma[i];
        const Axis<T> ad = axis_of<T>(s, p.zd, p.truncate, p.rd), ah = axis_of<T>(s, p.zh, p.truncate, p.rh),
                      aw = axis_of<T>(s, p.zw, p.truncate, p.rw);
        const T *c = xp + (d + p.rd) * plane + (h + p.rh) * Wp + (w + p.rw);
        T acc = plane_sum(c, Wp, ah, aw), cur = 1, step = ad.q;
        const T q2 = ad.q * ad.q;
        const T *before = c, *after = c;
        for (int a = 1; a <= ad.own; a++) {
            cur *= step;
            step *= q2;
            before -= plane;
            after += plane;
            acc += cur * (plane_sum(before, Wp, ah, aw) + plane_sum(after, Wp, ah, aw));
        }
        out[i] = acc * (ad.inv_norm * ah.inv_norm * aw.inv_norm);
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
    return vc::by_dtype(dtype, [&](auto zero) {
        using T = decltype(zero);
        VC_LAUNCH(adaptive_gaussian_kernel<T>, vc::grid_for(p.D * p.H * p.W, THREADS), THREADS, 0,
                  (cudaStream_t)stream)
        (static_cast<const T *>(xp), static_cast<const T *>(sigma), static_cast<T *>(out), p);
        return vc::status(cudaGetLastError());
    });
}
