/* Part of the simd_impl.h template (T, FN, VEC, UVEC, VL defined there): a 1-D filter ACROSS rows.
 *
 * out[p*ocs + w] = sum_t f[t] * rows[p*s + t*d][w]   for p < np output rows, w < Wo.
 *
 * The separable passes along H and D are such filters (a row is a run along W). Computing np output rows
 * together loads each input row once for all the outputs it feeds: (np*s + k*d) loads serve np*k FMAs,
 * instead of one load per FMA when each output row is a separate weighted sum. Missing rows (zero padding)
 * are passed as a row of zeros. */

#if VC_VBYTES >= 64
#define VC_FIR_P 8   /* output rows per call: P x 2 accumulators of 32 vector registers */
#else
#define VC_FIR_P 4
#endif

/* Output rows p < np at out + p*ocs (out: the block's first column) from input columns w0 ..; tap[i*VC_FIR_P
 * + p]: the tap of input row i in output row p, or -1 (the same for every W block). */
#define VC_DEFINE_FIR_BLOCK(WV)                                                                       \
static inline void FN(fir_block_##WV)(T *out, ptrdiff_t ocs, int np, const T *const *rows, int nin,    \
                                       const int *tap, const T *f, ptrdiff_t w0, int add)             \
{                                                                                                     \
    VEC acc[VC_FIR_P][WV];                                                                            \
    _Pragma("GCC unroll 8") for (int p = 0; p < VC_FIR_P; p++)                                        \
    _Pragma("GCC unroll 4") for (int j = 0; j < WV; j++) acc[p][j] = (VEC){0};                        \
    for (int i = 0; i < nin; i++) {                                                                   \
        VEC x[WV];                                                                                    \
        _Pragma("GCC unroll 4") for (int j = 0; j < WV; j++) x[j] = *(const UVEC *)(rows[i] + w0 + j * VL); \
        _Pragma("GCC unroll 8") for (int p = 0; p < VC_FIR_P; p++) {                                  \
            const int t = tap[i * VC_FIR_P + p];                                                      \
            if (t >= 0) {                                                                             \
                const T c = f[t];                                                                     \
                _Pragma("GCC unroll 4") for (int j = 0; j < WV; j++) acc[p][j] += c * x[j];           \
            }                                                                                         \
        }                                                                                             \
    }                                                                                                 \
    _Pragma("GCC unroll 8") for (int p = 0; p < VC_FIR_P; p++)                                        \
        if (p < np)                                                                                   \
            _Pragma("GCC unroll 4") for (int j = 0; j < WV; j++) {                                    \
                if (add)                                                                              \
                    acc[p][j] += *(const UVEC *)(out + p * ocs + j * VL);                             \
                *(UVEC *)(out + p * ocs + j * VL) = acc[p][j];                                        \
            }                                                                                         \
}

VC_DEFINE_FIR_BLOCK(2)
VC_DEFINE_FIR_BLOCK(1)

static int FN(fir_rows_max)(void) { return VC_FIR_P; }

/* The tap table of fir_rows for np output rows, input stride s, dilation d and k taps: tap[i*P + p] is the
 * tap of input row i in output row p, or -1. It depends on the geometry only (not on the values): callers
 * build it once and reuse it. Returns the number of input rows, (np - 1) * s + (k - 1) * d + 1; tap must
 * hold that many times VC_FIR_P ints. */
static int FN(fir_taps)(int *tap, int np, int s, int d, int k)
{
    const int nin = (np - 1) * s + (k - 1) * d + 1;
    for (int i = 0; i < nin * VC_FIR_P; i++)
        tap[i] = -1;
    for (int p = 0; p < np; p++)
        for (int t = 0; t < k; t++)
            tap[(p * s + t * d) * VC_FIR_P + p] = t;
    return nin;
}

/* rows: the nin input rows of the table (fir_taps); np <= VC_FIR_P. add: out += the result instead of =.
 * Rows are read in whole vectors below Wo (the last block is shifted back to end at Wo and rewrites equal
 * values; when adding, its overlap with the block before is added once, from a scratch copy). */
static void FN(fir_rows)(T *out, ptrdiff_t ocs, int np, const T *const *rows, int nin, const int *tap,
                         const T *f, int Wo, int add)
{
    if (Wo < VL) {
        for (int p = 0; p < np; p++)
            for (int w = 0; w < Wo; w++) {
                T acc = 0;
                for (int i = 0; i < nin; i++)
                    if (tap[i * VC_FIR_P + p] >= 0)
                        acc += f[tap[i * VC_FIR_P + p]] * rows[i][w];
                out[p * ocs + w] = add ? out[p * ocs + w] + acc : acc;
            }
        return;
    }
    ptrdiff_t w0 = 0;
    for (; w0 + 2 * VL <= Wo; w0 += 2 * VL)
        FN(fir_block_2)(out + w0, ocs, np, rows, nin, tap, f, w0, add);
    for (; w0 + VL <= Wo; w0 += VL)
        FN(fir_block_1)(out + w0, ocs, np, rows, nin, tap, f, w0, add);
    if (w0 < Wo && !add) {
        FN(fir_block_1)(out + Wo - VL, ocs, np, rows, nin, tap, f, Wo - VL, 0);
    } else if (w0 < Wo) {
        T last[VC_FIR_P * VL];
        FN(fir_block_1)(last, VL, np, rows, nin, tap, f, Wo - VL, 0);
        for (int p = 0; p < np; p++)
            for (ptrdiff_t w = w0; w < Wo; w++)
                out[p * ocs + w] += last[p * VL + (w - (Wo - VL))];
    }
}

#undef VC_FIR_P
