/* The exact windowed bilateral filter, one output row at a time: every tap's weight made in registers from the
 * spatial term and the guide (one exp per tap and voxel), never stored. Part of the simd_impl.h template (T, FN,
 * VEC, UVEC, VL defined there). No include guard.
 *
 * out[w] = sum_t k_t(w) x[o_t + w] / sum_t k_t(w),  k_t(w) = 2^(a_t - b (g[o_t + w] - g[w])^2) (* m[o_t + w])
 * x, g, m: the padded volume, guide and 0/1 validity at the row's first output voxel; o_t: each tap's offset,
 * a_t = -log2(e) |t|^2 / (2 sigma_s^2) in mm (<= 0), b = log2(e) / (2 sigma_r^2): exp in base 2.
 * Summed as x[w] + sum_t k_t (x[o_t + w] - x[w]) / sum_t k_t: the rounding of the sums then scales with the
 * window's contrast, not with the intensity (a constant volume comes back exactly; CT's offset costs nothing). */

#if VC_VBYTES == 64 && defined(__AVX512F__)
#include <immintrin.h>
#endif

typedef IT FN(vc_ivec) __attribute__((vector_size(VC_VBYTES)));

/* 2^r for |r| <= 1/2 by Horner: float, a Chebyshev fit of degree 6 (2.5e-9 relative; under an ulp in float
 * arithmetic); double, Taylor's series to r^13 (4e-18). */
static inline VEC FN(exp2_fraction)(VEC r)
{
    static const double f32[] = {1.5461444551858103e-4, 1.3400428177950461e-3, 9.618056679027834e-3,
                                 5.550327226668563e-2, 2.4022650922284547e-1, 6.93147206702834e-1, 1.0};
    static const double f64[] = {1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0,
                                 1.0 / 362880.0, 1.0 / 40320.0, 1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0,
                                 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0};
    const int single = sizeof(T) == 4;
#define VC_EXP2_COEF(i) ((T)(single ? f32[i] : f64[i] * __builtin_pow(0.6931471805599453, 13 - (i))))
    VEC p = (VEC){0} + VC_EXP2_COEF(0);   /* not 0 * r + c: IEEE keeps that multiply (r may be NaN) */
    for (int i = 1; i < (single ? 7 : 14); i++)
        p = p * r + VC_EXP2_COEF(i);
#undef VC_EXP2_COEF
    return p;
}

/* 2^e for e <= 0 (the weights' exponents come in base 2: a_t and b scaled by log2 e once, by the caller), to
 * about an ulp. Below the smallest normal's exponent (-126 / -1022) e is clamped there: a weight of 1e-38 /
 * 1e-308, nothing beside a centre weight of 1. A NaN e stays NaN; -Inf (a guide's Inf) is clamped. */
static inline VEC FN(exp2_neg)(VEC e)
{
    const int single = sizeof(T) == 4;
#if VC_VBYTES == 64 && defined(__AVX512F__)
    if (single) {   /* max(lo, e) keeps a NaN e; vrndscale rounds to the nearest; vscalef multiplies by 2^n */
        __m512 v = _mm512_max_ps(_mm512_set1_ps(-126.0f), (__m512)e);
        __m512 n = _mm512_roundscale_ps(v, 0);
        return (VEC)_mm512_scalef_ps((__m512)FN(exp2_fraction)((VEC)_mm512_sub_ps(v, n)), n);
    }
#endif
    const T lo = single ? (T)-126.0 : (T)-1022.0;
    FN(vc_ivec) below = e < lo;   /* all ones where below; 0 for NaN */
    e = (VEC)(((FN(vc_ivec))((VEC){0} + lo) & below) | ((FN(vc_ivec))e & ~below));
    FN(vc_ivec) n = __builtin_convertvector(e - (T)0.5, FN(vc_ivec));   /* truncation of e - 1/2 <= -1/2: round(e) */
    VEC p = FN(exp2_fraction)(e - __builtin_convertvector(n, VEC));
    /* times 2^n: n + bias in the exponent field */
    FN(vc_ivec) scale = (n + (IT)(single ? 127 : 1023)) << (single ? 23 : 52);
    return p * (VEC)scale;
}

/* NV vectors of outputs at column w; MASKED: multiply each weight by m (its padded voxels' 0/1). The taps run in
 * one fixed order, so results do not depend on the thread count. */
#define VC_BILATERAL_BLOCK(NV, MASKED)                                                                \
static inline void FN(bilateral_block_##NV##_##MASKED)(T *out, const T *x, const T *g, const T *m,    \
                                                        const ptrdiff_t *off, const T *a, int ntaps,   \
                                                        T b, int w)                                    \
{                                                                                                     \
    VEC gc[NV], xc[NV], num[NV], den[NV];                                                             \
    _Pragma("GCC unroll 4") for (int j = 0; j < NV; j++) {                                            \
        gc[j] = *(const UVEC *)(g + w + j * VL);                                                      \
        xc[j] = *(const UVEC *)(x + w + j * VL);                                                      \
        num[j] = den[j] = (VEC){0};                                                                   \
    }                                                                                                 \
    for (int t = 0; t < ntaps; t++) {                                                                 \
        const ptrdiff_t o = off[t] + w;                                                               \
        const T at = a[t];                                                                            \
        _Pragma("GCC unroll 4") for (int j = 0; j < NV; j++) {                                        \
            VEC d = *(const UVEC *)(g + o + j * VL) - gc[j];                                          \
            VEC k = FN(exp2_neg)(at - b * d * d);                                                      \
            if (MASKED)                                                                               \
                k *= *(const UVEC *)(m + o + j * VL);                                                 \
            num[j] += k * (*(const UVEC *)(x + o + j * VL) - xc[j]);                                  \
            den[j] += k;                                                                              \
        }                                                                                             \
    }                                                                                                 \
    _Pragma("GCC unroll 4") for (int j = 0; j < NV; j++)                                              \
        *(UVEC *)(out + w + j * VL) = xc[j] + num[j] / den[j];                                        \
}

/* The whole vectors of a row of n outputs: two at a time, then one; the columns past the last whole vector as
 * one vector shifted back to end at n (it rewrites equal values). Returns the columns done (0 when n < VL). */
#define VC_BILATERAL_VECTORS(MASKED)                                                                  \
VC_BILATERAL_BLOCK(2, MASKED)                                                                         \
VC_BILATERAL_BLOCK(1, MASKED)                                                                         \
static inline int FN(bilateral_vectors_##MASKED)(T *out, const T *x, const T *g, const T *m,          \
                                                 const ptrdiff_t *off, const T *a, int ntaps, T b, int n) \
{                                                                                                     \
    int w = 0;                                                                                        \
    for (; w + 2 * VL <= n; w += 2 * VL)                                                              \
        FN(bilateral_block_2_##MASKED)(out, x, g, m, off, a, ntaps, b, w);                            \
    for (; w + VL <= n; w += VL)                                                                      \
        FN(bilateral_block_1_##MASKED)(out, x, g, m, off, a, ntaps, b, w);                            \
    if (w < n && n >= VL)                                                                             \
        FN(bilateral_block_1_##MASKED)(out, x, g, m, off, a, ntaps, b, n - VL);                       \
    return n >= VL ? n : w;                                                                           \
}

VC_BILATERAL_VECTORS(0)
VC_BILATERAL_VECTORS(1)

/* One row of n outputs (see the top of this file; m NULL: every voxel valid): whole vectors, or element by
 * element in a row shorter than a vector. */
static void FN(bilateral_row)(T *out, const T *x, const T *g, const T *m, const ptrdiff_t *off, const T *a,
                              int ntaps, T b, int n)
{
    int w = m == NULL ? FN(bilateral_vectors_0)(out, x, g, m, off, a, ntaps, b, n)
                      : FN(bilateral_vectors_1)(out, x, g, m, off, a, ntaps, b, n);
    for (; w < n; w++) {
        T num = 0, den = 0;
        for (int t = 0; t < ntaps; t++) {
            const T d = g[off[t] + w] - g[w];
            VEC e = (VEC){0} + (a[t] - b * d * d);
            T k = FN(exp2_neg)(e)[0] * (m != NULL ? m[off[t] + w] : (T)1);
            num += k * (x[off[t] + w] - x[w]);
            den += k;
        }
        out[w] = x[w] + num / den;
    }
}
