/* Per-voxel products summed, the one primitive of the dynamic (per-voxel kernel) convolution: its forward,
 * its input gradient and its kernel-field gradient each sum products of two rows, element by element. Rows are
 * offsets from two base pointers: the callers build an offset list once and reuse it for many bases.
 * Part of the simd_impl.h template (T, FN, VEC, UVEC, VL defined there). No include guard. */

/* NV vectors at column w, rows split into two alternating sets: 2 * NV independent FMA chains in registers
 * (enough to cover the FMA latency even for NV = 1). */
#define VC_DOT_BLOCK(NV)                                                                              \
static inline void FN(dot_block_##NV)(T *out, const T *a, const ptrdiff_t *ao, const T *b,          \
                                        const ptrdiff_t *bo, int nrows, int w, int accumulate)        \
{                                                                                                     \
    VEC acc[2][NV];                                                                                   \
    _Pragma("GCC unroll 4") for (int j = 0; j < NV; j++) {                                            \
        acc[0][j] = accumulate ? (VEC)(*(const UVEC *)(out + w + j * VL)) : (VEC){0};                 \
        acc[1][j] = (VEC){0};                                                                         \
    }                                                                                                 \
    int r = 0;                                                                                        \
    for (; r + 2 <= nrows; r += 2)                                                                    \
        _Pragma("GCC unroll 2") for (int s = 0; s < 2; s++) {                                         \
            const T *pa = a + ao[r + s] + w, *pb = b + bo[r + s] + w;                                 \
            _Pragma("GCC unroll 4") for (int j = 0; j < NV; j++)                                      \
                acc[s][j] += *(const UVEC *)(pa + j * VL) * *(const UVEC *)(pb + j * VL);             \
        }                                                                                             \
    if (r < nrows)                                                                                    \
        _Pragma("GCC unroll 4") for (int j = 0; j < NV; j++)                                          \
            acc[0][j] += *(const UVEC *)(a + ao[r] + w + j * VL) * *(const UVEC *)(b + bo[r] + w + j * VL); \
    _Pragma("GCC unroll 4") for (int j = 0; j < NV; j++)                                              \
        *(UVEC *)(out + w + j * VL) = acc[0][j] + acc[1][j];                                          \
}

VC_DOT_BLOCK(4)
VC_DOT_BLOCK(3)
VC_DOT_BLOCK(2)
VC_DOT_BLOCK(1)

/* out[w] (+)= sum_r a[ao[r] + w] * b[bo[r] + w], w < n (accumulate: add to out, else overwrite). Four vectors at a
 * time, then the 1-3 left in one block; the columns past the last whole vector: one vector shifted back to end
 * at n when overwriting (it rewrites equal values), element by element when accumulating. The sum over r
 * runs in a fixed order, so results do not depend on the thread count. */
static void FN(dot_rows)(T *out, const T *a, const ptrdiff_t *ao, const T *b, const ptrdiff_t *bo, int nrows,
                         int n, int accumulate)
{
    int w = 0;
    for (; w + 4 * VL <= n; w += 4 * VL)
        FN(dot_block_4)(out, a, ao, b, bo, nrows, w, accumulate);
    switch ((n - w) / VL) {
    case 3: FN(dot_block_3)(out, a, ao, b, bo, nrows, w, accumulate); w += 3 * VL; break;
    case 2: FN(dot_block_2)(out, a, ao, b, bo, nrows, w, accumulate); w += 2 * VL; break;
    case 1: FN(dot_block_1)(out, a, ao, b, bo, nrows, w, accumulate); w += VL; break;
    }
    if (w < n && !accumulate && n >= VL) {
        FN(dot_block_1)(out, a, ao, b, bo, nrows, n - VL, 0);
        return;
    }
    for (; w < n; w++) {
        T s = accumulate ? out[w] : (T)0;
        for (int r = 0; r < nrows; r++)
            s += a[ao[r] + w] * b[bo[r] + w];
        out[w] = s;
    }
}
