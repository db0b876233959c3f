// What every kernel file of the plugin shares: the error codes, the conv geometry (volconv_cuda.h's 22 values),
// the status of a launch, the dtype dispatch of an entry point, and grid sizes within sm_90's limits.
#pragma once
#include <cuda_runtime.h>

#include "vc_launch.cuh"
#include "volconv_cuda.h"

namespace vc {

enum { BAD_GEOMETRY = 10000, BAD_DTYPE = 10001, BAD_ARGUMENT = 10002 };

struct Geom {
    long long N, C, D, H, W, O, G, kd, kh, kw, Do, Ho, Wo, sd, sh, sw, pd, ph, pw, dd, dh, dw;
};

inline Geom read_geom(const long long *g)
{
    return Geom{g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8], g[9], g[10], g[11], g[12], g[13], g[14],
                g[15], g[16], g[17], g[18], g[19], g[20], g[21]};
}

inline bool valid(const Geom &g)
{
    return g.N >= 0 && g.C > 0 && g.O > 0 && g.G > 0 && g.C % g.G == 0 && g.O % g.G == 0 && g.Do > 0 && g.Ho > 0 &&
           g.Wo > 0 && g.sd > 0 && g.sh > 0 && g.sw > 0 && g.dd > 0 && g.dh > 0 && g.dw > 0;
}

inline int status(cudaError_t e) { return e == cudaSuccess ? 0 : static_cast<int>(e); }

// `run` with a value of the element type (0.0f or 0.0) for dtype code 0 / 1, else BAD_DTYPE.
template <typename Run>
int by_dtype(int dtype, Run run)
{
    if (dtype == 0)
        return run(0.0f);
    if (dtype == 1)
        return run(0.0);
    return BAD_DTYPE;
}

// The conv entry points' checks: the geometry valid, then `run(zero, g)` by dtype.
template <typename Run>
int checked(int dtype, const long long *geom, Run run)
{
    const Geom g = read_geom(geom);
    if (!valid(g))
        return BAD_GEOMETRY;
    return by_dtype(dtype, [&](auto zero) { return run(zero, g); });
}

// Blocks of `threads` for a grid-stride loop over `total` items: enough to fill an H200 many times over, never
// beyond the grid's x limit.
inline unsigned grid_for(long long total, int threads)
{
    const long long blocks = (total + threads - 1) / threads, cap = 65535LL * 16;
    return (unsigned)(blocks < cap ? (blocks > 0 ? blocks : 1) : cap);
}

inline long long min_ll(long long a, long long b) { return a < b ? a : b; }

}  // namespace vc
