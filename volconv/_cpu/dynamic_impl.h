/* Per-voxel products summed, the one primitive of the dynamic (per-voxel kernel) convolution: its forward,
 * its input gradient and its kernel-field gradient each sum products of two rows, element by element.
 * Part of the kernels_impl.h template (T, FN, VEC, UVEC, VL defined there). No include guard. */

/* out[w] (+)= sum_r a[r][w] * b[r][w], w < n (accumulate: add to out, else overwrite). Blocks of four vectors
 * keep four independent FMA chains in registers over all the rows; the sum runs over r in order, so results do
 * not depend on the thread count. */
static void FN(dot_rows)(T *out, const T *const *a, const T *const *b, int nrows, int n, int accumulate)
{
    int w = 0;
    for (; w + 4 * VL <= n; w += 4 * VL) {
        VEC acc[4];
        _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++)
            acc[j] = accumulate ? (VEC)(*(const UVEC *)(out + w + j * VL)) : (VEC){0};
        for (int r = 0; r < nrows; r++) {
            const T *pa = a[r] + w, *pb = b[r] + w;
            _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++)
                acc[j] += *(const UVEC *)(pa + j * VL) * *(const UVEC *)(pb + j * VL);
        }
        _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++)
            *(UVEC *)(out + w + j * VL) = acc[j];
    }
    for (; w + VL <= n; w += VL) {
        VEC acc = accumulate ? (VEC)(*(const UVEC *)(out + w)) : (VEC){0};
        for (int r = 0; r < nrows; r++)
            acc += *(const UVEC *)(a[r] + w) * *(const UVEC *)(b[r] + w);
        *(UVEC *)(out + w) = acc;
    }
    for (; w < n; w++) {
        T s = accumulate ? out[w] : (T)0;
        for (int r = 0; r < nrows; r++)
            s += a[r][w] * b[r][w];
        out[w] = s;
    }
}
