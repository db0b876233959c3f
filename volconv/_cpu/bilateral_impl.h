/* The exact windowed bilateral filter, one output row at a time: every tap's weight made in registers from the
 * spatial term and the guide (one exp per tap and voxel), never stored. Part of the simd_impl.h template (T, FN,
 * VEC, UVEC, VL defined there). No include guard.
 *
 * out[w] = sum_t k_t(w) x[o_t + w] / sum_t k_t(w),  k_t(w) = exp(a_t - b (g[o_t + w] - g[w])^2) (* m[o_t + w])
 * x, g, m: the padded volume, guide and 0/1 validity at the row's first output voxel; o_t: each tap's offset,
 * a_t = -|t|^2 / (2 sigma_s^2) in mm (<= 0), b = 1 / (2 sigma_r^2).
 * Summed as x[w] + sum_t k_t (x[o_t + w] - x[w]) / sum_t k_t: the rounding of the sums then scales with the
 * window's contrast, not with the intensity (a constant volume comes back exactly; CT's offset costs nothing). */

#if VC_VBYTES == 64 && defined(__AVX512F__)
#include <immintrin.h>
#endif

typedef IT FN(vc_ivec) __attribute__((vector_size(VC_VBYTES)));

/* exp(x) for x <= 0, to about an ulp (float: Cephes' expf polynomial; double: Taylor to r^12, |r| <= ln2 / 2,
 * 2e-16 relative). Below the smallest normal's exponent the result is clamped there (1e-38 / 1e-308: nothing
 * beside a centre weight of 1). NaN stays NaN (the clamp's comparison is false for it). */
static inline VEC FN(exp_neg)(VEC x)
{
    const int single = sizeof(T) == 4;
#if VC_VBYTES == 64 && defined(__AVX512F__)
    /* AVX-512: round and scale by 2^n in one instruction each (vrndscale, vscalef: underflow gives 0, NaN stays
     * NaN); max(lo, x) keeps a NaN x and lifts -Inf (a guide's Inf) to lo, as the portable code below does. */
    if (single) {
        __m512 v = _mm512_max_ps(_mm512_set1_ps(-87.0f), (__m512)x);
        __m512 nf = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.4426950408889634f)), 0);
        __m512 r = _mm512_fnmadd_ps(nf, _mm512_set1_ps(0.693359375f), v);
        r = _mm512_fnmadd_ps(nf, _mm512_set1_ps(-2.12194440e-4f), r);
        VEC rv = (VEC)r, p = (VEC){0} + (T)1.9875691500e-4;
        p = p * rv + (T)1.3981999507e-3;
        p = p * rv + (T)8.3334519073e-3;
        p = p * rv + (T)4.1665795894e-2;
        p = p * rv + (T)1.6666665459e-1;
        p = p * rv + (T)5.0000001201e-1;
        p = p * rv + (T)1;
        p = p * rv + (T)1;
        return (VEC)_mm512_scalef_ps((__m512)p, nf);
    }
#endif
    const T lo = single ? (T)-87.0 : (T)-708.0;
    FN(vc_ivec) below = x < lo;   /* all ones where below; 0 for NaN */
    x = (VEC)(((FN(vc_ivec))((VEC){0} + lo) & below) | ((FN(vc_ivec))x & ~below));
    /* n = round(x / ln2): truncation toward zero of x / ln2 - 1/2 <= -1/2 */
    FN(vc_ivec) n = __builtin_convertvector(x * (T)1.4426950408889634 - (T)0.5, FN(vc_ivec));
    VEC nf = __builtin_convertvector(n, VEC);
    /* r = x - n ln2 in two parts (ln2's high part has trailing zero bits: n * hi is exact) */
    VEC r = single ? x - nf * (T)0.693359375 + nf * (T)2.12194440e-4
                   : x - nf * (T)6.93145751953125e-1 - nf * (T)1.42860682030941723212e-6;
    VEC p;
    if (single) {
        p = (VEC){0} + (T)1.9875691500e-4;
        p = p * r + (T)1.3981999507e-3;
        p = p * r + (T)8.3334519073e-3;
        p = p * r + (T)4.1665795894e-2;
        p = p * r + (T)1.6666665459e-1;
        p = p * r + (T)5.0000001201e-1;
        p = p * r * r + r + (T)1;
    } else {
        p = (VEC){0} + (T)(1.0 / 479001600.0);   /* 1 / 12! */
        const double inv[11] = {1.0 / 39916800.0, 1.0 / 3628800.0, 1.0 / 362880.0, 1.0 / 40320.0, 1.0 / 5040.0,
                                1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0};
        for (int i = 0; i < 11; i++)
            p = p * r + (T)inv[i];
        p = p * r + (T)1;
    }
    /* 2^n: n + bias in the exponent field */
    const int mbits = single ? 23 : 52, bias = single ? 127 : 1023;
    FN(vc_ivec) e = (n + (IT)bias) << mbits;
    return p * (VEC)e;
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
            VEC k = FN(exp_neg)(at - b * d * d);                                                      \
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
            T k = FN(exp_neg)(e)[0] * (m != NULL ? m[off[t] + w] : (T)1);
            num += k * (x[off[t] + w] - x[w]);
            den += k;
        }
        out[w] = x[w] + num / den;
    }
}
