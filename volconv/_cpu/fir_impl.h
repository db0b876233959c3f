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

/* Walk np output rows of width Wo >= VL in blocks of 2 and 1 vectors, BLOCK_k(dst, dst's row stride, w0, add)
 * computing block k at column w0: the last block is shifted back to end at Wo and rewrites equal values; when
 * adding, its overlap with the block before is added once, from a scratch copy (rows VL apart). */
#define VC_FIR_WALK(BLOCK_2, BLOCK_1)                                                                 \
    do {                                                                                              \
        ptrdiff_t w0 = 0;                                                                             \
        for (; w0 + 2 * VL <= Wo; w0 += 2 * VL)                                                       \
            BLOCK_2(out + w0, ocs, w0, add);                                                          \
        for (; w0 + VL <= Wo; w0 += VL)                                                               \
            BLOCK_1(out + w0, ocs, w0, add);                                                          \
        if (w0 < Wo && !add) {                                                                        \
            BLOCK_1(out + Wo - VL, ocs, Wo - VL, 0);                                                  \
        } else if (w0 < Wo) {                                                                         \
            T last[VC_FIR_P * VL];                                                                    \
            BLOCK_1(last, VL, Wo - VL, 0);                                                            \
            for (int p = 0; p < np; p++)                                                              \
                for (ptrdiff_t w = w0; w < Wo; w++)                                                   \
                    out[p * ocs + w] += last[p * VL + (w - (Wo - VL))];                               \
        }                                                                                             \
    } while (0)

/* rows: the nin input rows of the table (fir_taps); np <= VC_FIR_P. add: out += the result instead of =.
 * Rows are read in whole vectors below Wo. */
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
#define VC_TAB_2(o, os, w, a) FN(fir_block_2)(o, os, np, rows, nin, tap, f, w, a)
#define VC_TAB_1(o, os, w, a) FN(fir_block_1)(o, os, np, rows, nin, tap, f, w, a)
    VC_FIR_WALK(VC_TAB_2, VC_TAB_1);
#undef VC_TAB_2
#undef VC_TAB_1
}

/* Symmetric taps (f[t] == f[k-1-t]) at unit stride and dilation: out[p] = sum_{j<=(k-1)/2} h[j] * (row[p+j]
 * + row[p+k-1-j]), h the first half of f with its centre tap halved for odd k (row + row is exact): half the
 * multiplies, the adds on the FP-add pipes. Each output row keeps its two rows of the pair in registers (lo
 * moving down from p, hi up from p+k-1); a step reuses P - 1 of each and loads one new row per side. */
#define VC_SYM_P (VC_VBYTES >= 64 ? 4 : 2)

#define VC_DEFINE_SYM_BLOCK(WV)                                                                       \
static inline void FN(sym_block_##WV)(T *out, ptrdiff_t ocs, int np, const T *const *rows, int k,       \
                                       const T *h, ptrdiff_t w0, int add)                              \
{                                                                                                     \
    VEC acc[VC_SYM_P][WV], lo[VC_SYM_P][WV], hi[VC_SYM_P][WV];                                        \
    _Pragma("GCC unroll 4") for (int p = 0; p < VC_SYM_P; p++)                                        \
    _Pragma("GCC unroll 2") for (int v = 0; v < WV; v++) {                                            \
        lo[p][v] = *(const UVEC *)(rows[p] + w0 + v * VL);                                            \
        hi[p][v] = *(const UVEC *)(rows[p + k - 1] + w0 + v * VL);                                    \
        acc[p][v] = h[0] * (lo[p][v] + hi[p][v]);                                                     \
    }                                                                                                 \
    for (int j = 1; 2 * j < k; j++) {                                                                 \
        _Pragma("GCC unroll 2") for (int v = 0; v < WV; v++) {                                        \
            _Pragma("GCC unroll 4") for (int p = 0; p + 1 < VC_SYM_P; p++) lo[p][v] = lo[p + 1][v];    \
            _Pragma("GCC unroll 4") for (int p = VC_SYM_P - 1; p > 0; p--) hi[p][v] = hi[p - 1][v];    \
            lo[VC_SYM_P - 1][v] = *(const UVEC *)(rows[VC_SYM_P - 1 + j] + w0 + v * VL);              \
            hi[0][v] = *(const UVEC *)(rows[k - 1 - j] + w0 + v * VL);                                \
        }                                                                                             \
        const T c = h[j];                                                                             \
        _Pragma("GCC unroll 4") for (int p = 0; p < VC_SYM_P; p++)                                    \
        _Pragma("GCC unroll 2") for (int v = 0; v < WV; v++) acc[p][v] += c * (lo[p][v] + hi[p][v]);  \
    }                                                                                                 \
    _Pragma("GCC unroll 4") for (int p = 0; p < VC_SYM_P; p++)                                        \
        if (p < np)                                                                                   \
            _Pragma("GCC unroll 2") for (int v = 0; v < WV; v++) {                                    \
                if (add)                                                                              \
                    acc[p][v] += *(const UVEC *)(out + p * ocs + v * VL);                             \
                *(UVEC *)(out + p * ocs + v * VL) = acc[p][v];                                        \
            }                                                                                         \
}

VC_DEFINE_SYM_BLOCK(2)
VC_DEFINE_SYM_BLOCK(1)

static int FN(sym_rows_max)(void) { return VC_SYM_P; }

/* np <= VC_SYM_P output rows from the np + k - 1 input rows (rows[i] for i < np + k - 1; the rows of missing
 * outputs p >= np are read from the last row and not stored). h: (k + 1) / 2 taps, as above. */
static void FN(sym_rows)(T *out, ptrdiff_t ocs, int np, const T *const *rows, int k, const T *h, int Wo, int add)
{
    const T *r[VC_SYM_P + 2 * 64];   /* k <= 129: longer kernels take fir_rows */
    const int nin = np + k - 1;
    for (int i = 0; i < VC_SYM_P + k - 1; i++)
        r[i] = rows[i < nin ? i : nin - 1];
    if (Wo < VL) {
        for (int p = 0; p < np; p++)
            for (int w = 0; w < Wo; w++) {
                T acc = 0;
                for (int j = 0; 2 * j < k; j++)
                    acc += h[j] * (r[p + j][w] + r[p + k - 1 - j][w]);
                out[p * ocs + w] = add ? out[p * ocs + w] + acc : acc;
            }
        return;
    }
#define VC_SYM_2(o, os, w, a) FN(sym_block_2)(o, os, np, r, k, h, w, a)
#define VC_SYM_1(o, os, w, a) FN(sym_block_1)(o, os, np, r, k, h, w, a)
    VC_FIR_WALK(VC_SYM_2, VC_SYM_1);
#undef VC_SYM_2
#undef VC_SYM_1
}

/* The same symmetric filter along a row: out[w] = sum_j h[j] * (x[w+j] + x[w+k-1-j]) for the Wv columns
 * w < Wv (a multiple of VL) of an aligned row, x readable up to Wv + k - 1 + VL. With AVX-512 the near tap
 * of each pair is a register shift of two aligned vectors (valign: no load) and the far one an unaligned
 * load, balancing the shuffle and load ports; below it both are loads. */
#if VC_VBYTES >= 64 && defined(__OPTIMIZE__)   /* valign's shift must be a constant: the unrolled loop's */
#define VC_NEAR(v, e) VC_SHIFT(A[v], A[(v) + 1], (e))
#else
#define VC_NEAR(v, e) (*(const UVEC *)(x + w0 + (v) * VL + (e)))
#endif

#define VC_DEFINE_SYMW_BLOCK(WV)                                                                      \
static inline void FN(symw_block_##WV)(T *out, const T *x, int k, const T *h, ptrdiff_t w0)           \
{                                                                                                     \
    VEC acc[WV], A[WV + 1];                                                                           \
    _Pragma("GCC unroll 8") for (int v = 0; v <= WV; v++) A[v] = *(const VEC *)(x + w0 + v * VL);      \
    _Pragma("GCC unroll 8") for (int v = 0; v < WV; v++) acc[v] = (VEC){0};                           \
    const int half = (k + 1) / 2;                                                                     \
    _Pragma("GCC unroll 16") for (int e = 0; e < VL; e++) {                                           \
        if (e >= half) break;                                                                         \
        const T c = h[e];                                                                             \
        _Pragma("GCC unroll 8") for (int v = 0; v < WV; v++)                                          \
            acc[v] += c * (VC_NEAR(v, e) + *(const UVEC *)(x + w0 + v * VL + k - 1 - e));             \
    }                                                                                                 \
    for (int e = VL; e < half; e++) {                                                                 \
        const T c = h[e];                                                                             \
        _Pragma("GCC unroll 8") for (int v = 0; v < WV; v++)                                          \
            acc[v] += c * (*(const UVEC *)(x + w0 + v * VL + e) + *(const UVEC *)(x + w0 + v * VL + k - 1 - e)); \
    }                                                                                                 \
    _Pragma("GCC unroll 8") for (int v = 0; v < WV; v++) *(VEC *)(out + w0 + v * VL) = acc[v];        \
}

VC_DEFINE_SYMW_BLOCK(4)
VC_DEFINE_SYMW_BLOCK(1)

static void FN(sym_row)(T *out, const T *x, int k, const T *h, int Wv)
{
    ptrdiff_t w0 = 0;
    for (; w0 + 4 * VL <= Wv; w0 += 4 * VL)
        FN(symw_block_4)(out, x, k, h, w0);
    for (; w0 < Wv; w0 += VL)
        FN(symw_block_1)(out, x, k, h, w0);
}

#undef VC_NEAR
#undef VC_FIR_P
