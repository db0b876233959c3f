/* Template body of simd.h: expects T (float or double) and SUF (f32 or f64). No include guard. */

#define FN(name) VC_CAT(name, SUF)
#define VEC FN(vc_vec)
#define UVEC FN(vc_uvec)
#define VL ((int)(VC_VBYTES / sizeof(T)))

typedef T VEC __attribute__((vector_size(VC_VBYTES)));
/* Same vector with the element's alignment: dereferencing it is an unaligned load/store. */
typedef T UVEC __attribute__((vector_size(VC_VBYTES), aligned(sizeof(T)), may_alias));

/* One block of output: OB output rows (channels, `ocs` apart) x WV vectors starting at column w0.
 * out[o][w] = bias[o] + sum_r sum_e wts[r][e*OB + o] * rows[r][w + toff[e]]
 * (toff: column offset of each tap in the row layout of engine/layout.py, stride phases split apart.)
 * The whole reduction happens in registers (acc), so a block may overlap one computed before (used for the
 * row's tail) and write the same values. NS accumulator sets take alternate rows: more independent FMA
 * chains when OB*WV alone is too few to hide the FMA latency. */
#define VC_DEFINE_BLOCK(OB, WV, NS)                                                                   \
static inline void FN(block_##OB##x##WV)(T *out, ptrdiff_t ocs, const T *const *rows,                  \
                                          const T *const *wts, int nrows, int kw,                   \
                                          const ptrdiff_t *toff, ptrdiff_t w0, const T *bias)           \
{                                                                                                     \
    VEC acc[NS][OB][WV];                                                                              \
    _Pragma("GCC unroll 16") for (int s = 0; s < NS; s++)                                             \
    _Pragma("GCC unroll 16") for (int o = 0; o < OB; o++)                                             \
    _Pragma("GCC unroll 16") for (int j = 0; j < WV; j++)                                             \
        acc[s][o][j] = (VEC){0} + (s == 0 ? bias[o] : (T)0);                                          \
    int r = 0;                                                                                        \
    for (; r + NS <= nrows; r += NS) {                                                                \
        for (int e = 0; e < kw; e++) {                                                                \
            _Pragma("GCC unroll 16") for (int s = 0; s < NS; s++) {                                   \
                const T *src = rows[r + s] + w0 + toff[e];                                            \
                const T *wt = wts[r + s] + e * OB;                                                    \
                VEC xv[WV];                                                                           \
                _Pragma("GCC unroll 16") for (int j = 0; j < WV; j++)                                 \
                    xv[j] = *(const UVEC *)(src + j * VL);                                            \
                _Pragma("GCC unroll 16") for (int o = 0; o < OB; o++)                                 \
                _Pragma("GCC unroll 16") for (int j = 0; j < WV; j++)                                 \
                    acc[s][o][j] += wt[o] * xv[j];                                                    \
            }                                                                                         \
        }                                                                                             \
    }                                                                                                 \
    for (; r < nrows; r++) { /* leftover rows (nrows % NS) go to set 0 */                             \
        for (int e = 0; e < kw; e++) {                                                                \
            const T *src = rows[r] + w0 + toff[e];                                                    \
            const T *wt = wts[r] + e * OB;                                                            \
            _Pragma("GCC unroll 16") for (int o = 0; o < OB; o++)                                     \
            _Pragma("GCC unroll 16") for (int j = 0; j < WV; j++)                                     \
                acc[0][o][j] += wt[o] * *(const UVEC *)(src + j * VL);                                \
        }                                                                                             \
    }                                                                                                 \
    _Pragma("GCC unroll 16") for (int s = 1; s < NS; s++)                                             \
    _Pragma("GCC unroll 16") for (int o = 0; o < OB; o++)                                             \
    _Pragma("GCC unroll 16") for (int j = 0; j < WV; j++)                                             \
        acc[0][o][j] += acc[s][o][j];                                                                 \
    _Pragma("GCC unroll 16") for (int o = 0; o < OB; o++)                                             \
    _Pragma("GCC unroll 16") for (int j = 0; j < WV; j++)                                             \
        *(UVEC *)(out + o * ocs + w0 + j * VL) = acc[0][o][j];                                        \
}

/* Register budgets: 32 vector registers with AVX-512, 16 below it. */
#if VC_VBYTES >= 64
VC_DEFINE_BLOCK(1, 8, 2)
VC_DEFINE_BLOCK(4, 4, 1)
VC_DEFINE_BLOCK(8, 2, 1)
#else
VC_DEFINE_BLOCK(1, 8, 1)
VC_DEFINE_BLOCK(4, 2, 1)
#endif
VC_DEFINE_BLOCK(1, 4, 2)
VC_DEFINE_BLOCK(1, 1, 2)
VC_DEFINE_BLOCK(4, 1, 1)
VC_DEFINE_BLOCK(8, 1, 1)

#if VC_VBYTES >= 64
typedef IT FN(vc_idx) __attribute__((vector_size(VC_VBYTES)));

/* {e, e + 1, ..., e + VL - 1}: a constant once e is (the tap loop below is fully unrolled). */
static inline FN(vc_idx) FN(shift_mask)(int e)
{
    FN(vc_idx) m;
    for (int i = 0; i < VL; i++)
        m[i] = (IT)(i + e);
    return m;
}

/* Lanes E .. E + VL - 1 of the concatenation (lo, hi): the row shifted by E columns, without reloading it. One
 * valign (the shift an immediate: no index register, no operand overwritten) once the unrolled loop makes E a
 * constant; a general two-source permute otherwise (unoptimised builds). */
#ifdef __OPTIMIZE__
#define VC_ALIGN_EPI(b, a, e) (sizeof(T) == 4 ? _mm512_alignr_epi32((b), (a), (e) & 15)                  \
                                              : _mm512_alignr_epi64((b), (a), (e) & 7))
#define VC_SHIFT(lo, hi, E) ((E) == 0 ? (lo) : (VEC)VC_ALIGN_EPI((__m512i)(hi), (__m512i)(lo), (E)))
#else
#define VC_SHIFT(lo, hi, E) __builtin_shuffle((lo), (hi), FN(shift_mask)(E))
#endif

/* Tap e of vector j of a row loaded at src into A (shift2_block): odd taps an unaligned load, even ones a shift,
 * so that the load port takes half the work and the shuffle pipe (shared with an FMA pipe on Zen 4) the other. */
#define VC_TAP(j, e)                                                                                  \
    ({ VEC t_; if ((e) & 1) t_ = *(const UVEC *)(src + (j) * VL + (e));                               \
       else t_ = VC_SHIFT(A[(j) + (e) / VL], A[(j) + (e) / VL + 1], (e) % VL); t_; })

/* One output channel, WV aligned vectors at w0, taps at columns 0 .. kw - 1 (kw <= 2 VL): each input row is
 * loaded once, aligned (no load straddles two cache lines), and every tap's vector is a register shuffle of
 * two neighbours. Used when the rows are VL-aligned (the ring of padded planes) and the W taps are unit-spaced. */
/* Row R into accumulator set SET: load it once (WV + 2 aligned vectors), then every tap (kw <= 2 VL) as a
 * shuffle of two neighbours. The vector past the row's end is read but unused when kw <= VL + 1. */
#define VC_SHIFT_ROW(WV, SET, R)                                                                      \
    do {                                                                                              \
        const T *src = rows[R] + w0;                                                                  \
        const T *wt = wts[R];                                                                         \
        VEC A[WV + 2];                                                                                \
        _Pragma("GCC unroll 16") for (int j = 0; j <= WV; j++) A[j] = *(const VEC *)(src + j * VL);   \
        A[WV + 1] = kw > VL + 1 ? *(const VEC *)(src + (WV + 1) * VL) : A[WV];                        \
        _Pragma("GCC unroll 32") for (int e = 0; e < 2 * VL; e++) {                                   \
            if (e >= kw) break;                                                                       \
            const T wv = wt[e];                                                                       \
            _Pragma("GCC unroll 16") for (int j = 0; j < WV; j++)                                     \
                acc[SET][j] += wv * VC_SHIFT(A[j + e / VL], A[j + e / VL + 1], e % VL);               \
        }                                                                                             \
    } while (0)

#define VC_DEFINE_SHIFT_BLOCK(WV, NS)                                                                 \
static inline void FN(shift_block_##WV)(T *out, const T *const *rows, const T *const *wts, int nrows,  \
                                         int kw, ptrdiff_t w0, T bias)                                 \
{                                                                                                     \
    VEC acc[NS][WV];                                                                                  \
    _Pragma("GCC unroll 16") for (int s = 0; s < NS; s++)                                             \
    _Pragma("GCC unroll 16") for (int j = 0; j < WV; j++)                                             \
        acc[s][j] = (VEC){0} + (s == 0 ? bias : (T)0);                                                \
    int r = 0;                                                                                        \
    for (; r + NS <= nrows; r += NS) /* NS rows at a time, row s into set s: more independent chains */ \
        _Pragma("GCC unroll 16") for (int s = 0; s < NS; s++)                                         \
            VC_SHIFT_ROW(WV, s, r + s);                                                               \
    for (; r < nrows; r++) /* leftover rows (nrows % NS) go to set 0 */                               \
        VC_SHIFT_ROW(WV, 0, r);                                                                       \
    _Pragma("GCC unroll 16") for (int s = 1; s < NS; s++)                                             \
    _Pragma("GCC unroll 16") for (int j = 0; j < WV; j++) acc[0][j] += acc[s][j];                     \
    _Pragma("GCC unroll 16") for (int j = 0; j < WV; j++) *(UVEC *)(out + w0 + j * VL) = acc[0][j];   \
}

VC_DEFINE_SHIFT_BLOCK(8, 1)
VC_DEFINE_SHIFT_BLOCK(4, 2)
VC_DEFINE_SHIFT_BLOCK(1, 2)

/* Two output rows at once (out, out + ors), WV aligned vectors at w0: every input row's shifted vectors (one
 * shuffle each) feed both rows, through weights wa[r] (row 0) and wb[r] (row 1); NULL when the input row feeds
 * only the other output row (never multiplied, so a NaN stays in its own window). Halves the shuffles per
 * multiply-add of shift_block. */
#define VC_SHIFT2_TAPS(WV, UPDATE)                                                                        \
    _Pragma("GCC unroll 32") for (int e = 0; e < 2 * VL; e++) {                                       \
        if (e >= kw) break;                                                                           \
        _Pragma("GCC unroll 16") for (int j = 0; j < WV; j++) {                                       \
            const VEC s = VC_TAP(j, e);                                                       \
            UPDATE;                                                                                   \
        }                                                                                             \
    }

#define VC_DEFINE_SHIFT2_BLOCK(WV)                                                                    \
static inline void FN(shift2_block_##WV)(T *out, ptrdiff_t ors, const T *const *rows, const T *const *wa,  \
                                          const T *const *wb, int nrows, int kw, ptrdiff_t w0, T bias)  \
{                                                                                                     \
    VEC acc0[WV], acc1[WV];                                                                           \
    _Pragma("GCC unroll 16") for (int j = 0; j < WV; j++) acc0[j] = acc1[j] = (VEC){0} + bias;        \
    for (int r = 0; r < nrows; r++) {                                                                 \
        const T *src = rows[r] + w0;                                                                  \
        const T *x0 = wa[r], *x1 = wb[r];                                                             \
        VEC A[WV + 2];                                                                                \
        _Pragma("GCC unroll 16") for (int j = 0; j <= WV; j++) A[j] = *(const VEC *)(src + j * VL);   \
        A[WV + 1] = kw > VL + 1 ? *(const VEC *)(src + (WV + 1) * VL) : A[WV];                        \
        if (x0 && x1) {                                                                               \
            VC_SHIFT2_TAPS(WV, acc0[j] += x0[e] * s; acc1[j] += x1[e] * s)                                \
        } else if (x0) {                                                                              \
            VC_SHIFT2_TAPS(WV, acc0[j] += x0[e] * s)                                                      \
        } else {                                                                                      \
            VC_SHIFT2_TAPS(WV, acc1[j] += x1[e] * s)                                                      \
        }                                                                                             \
    }                                                                                                 \
    _Pragma("GCC unroll 16") for (int j = 0; j < WV; j++) {                                           \
        *(UVEC *)(out + w0 + j * VL) = acc0[j];                                                       \
        *(UVEC *)(out + ors + w0 + j * VL) = acc1[j];                                                 \
    }                                                                                                 \
}

VC_DEFINE_SHIFT2_BLOCK(4)
VC_DEFINE_SHIFT2_BLOCK(1)
#endif

/* Any OB: accumulate in memory; only for rows narrower than a vector. */
static void FN(corr_row_scalar)(T *out, ptrdiff_t ocs, int OB, const T *const *rows, const T *const *wts,
                                int nrows, int kw, const ptrdiff_t *toff, int Wo, const T *bias)
{
    for (int o = 0; o < OB; o++)
        for (int w = 0; w < Wo; w++)
            out[o * ocs + w] = bias[o];
    for (int r = 0; r < nrows; r++)
        for (int e = 0; e < kw; e++) {
            const T *src = rows[r] + toff[e];
            for (int o = 0; o < OB; o++) {
                const T wv = wts[r][e * OB + o];
                T *dst = out + o * ocs;
                for (int w = 0; w < Wo; w++)
                    dst[w] += wv * src[w];
            }
        }
}

/* Walk one output row in the widest blocks that fit; the tail is one block shifted back to end at Wo. */
#define VC_WALK(OB, WIDE, MID)                                                                        \
    do {                                                                                              \
        ptrdiff_t w0 = 0;                                                                             \
        for (; w0 + WIDE * VL <= Wo; w0 += WIDE * VL)                                                 \
            FN(block_##OB##x##WIDE)(out, ocs, rows, wts, nrows, kw, toff, w0, bias);                    \
        for (; w0 + MID * VL <= Wo; w0 += MID * VL)                                                   \
            FN(block_##OB##x##MID)(out, ocs, rows, wts, nrows, kw, toff, w0, bias);                     \
        for (; w0 + VL <= Wo; w0 += VL)                                                               \
            FN(block_##OB##x1)(out, ocs, rows, wts, nrows, kw, toff, w0, bias);                         \
        if (w0 < Wo)                                                                                  \
            FN(block_##OB##x1)(out, ocs, rows, wts, nrows, kw, toff, Wo - VL, bias);                    \
    } while (0)

/* Two output rows of one channel (out and out + ors) from shared input rows: the AVX-512 aligned-row,
 * unit-tap case (rows VL-aligned, kw <= 2 VL, Wo >= VL). Returns 0 when it does not apply (the caller then
 * computes the rows one by one). wa[r] / wb[r]: NULL where input row r does not feed that output row. */
static int FN(corr_rows2)(T *out, ptrdiff_t ors, const T *const *rows, const T *const *wa, const T *const *wb,
                          int nrows, int kw, const ptrdiff_t *toff, int Wo, T bias)
{
#if VC_VBYTES >= 64
    if (kw > 2 * VL || Wo < VL)
        return 0;
    ptrdiff_t w0 = 0;
    for (; w0 + 4 * VL <= Wo; w0 += 4 * VL)
        FN(shift2_block_4)(out, ors, rows, wa, wb, nrows, kw, w0, bias);
    for (; w0 + VL <= Wo; w0 += VL)
        FN(shift2_block_1)(out, ors, rows, wa, wb, nrows, kw, w0, bias);
    for (; w0 < Wo; w0++) {   /* columns past the last whole vector, one by one */
        T s0 = bias, s1 = bias;
        for (int r = 0; r < nrows; r++)
            for (int e = 0; e < kw; e++) {
                if (wa[r]) s0 += wa[r][e] * rows[r][w0 + toff[e]];
                if (wb[r]) s1 += wb[r][e] * rows[r][w0 + toff[e]];
            }
        out[w0] = s0;
        out[ors + w0] = s1;
    }
    return 1;
#else
    (void)out; (void)ors; (void)rows; (void)wa; (void)wb; (void)nrows; (void)kw; (void)toff; (void)Wo; (void)bias;
    return 0;
#endif
}

/* out[o*ocs + w] = bias[o] + sum_r sum_e wts[r][e*OB + o] * rows[r][w + toff[e]], w < Wo, o < OB.
 * OB is 1, 4 or 8 (output channels sharing every input row). */
static void FN(corr_row)(T *out, ptrdiff_t ocs, int OB, const T *const *rows, const T *const *wts,
                         int nrows, int kw, const ptrdiff_t *toff, int Wo, const T *bias, int aligned_unit)
{
#if VC_VBYTES >= 64
    if (OB == 1 && aligned_unit && kw <= 2 * VL && Wo >= VL) { /* rows VL-aligned, toff[e] == e */
        ptrdiff_t w0 = 0;
        for (; w0 + 8 * VL <= Wo; w0 += 8 * VL)
            FN(shift_block_8)(out, rows, wts, nrows, kw, w0, bias[0]);
        for (; w0 + 4 * VL <= Wo; w0 += 4 * VL)
            FN(shift_block_4)(out, rows, wts, nrows, kw, w0, bias[0]);
        for (; w0 + VL <= Wo; w0 += VL)
            FN(shift_block_1)(out, rows, wts, nrows, kw, w0, bias[0]);
        if (w0 < Wo) /* unaligned tail */
            FN(block_1x1)(out, ocs, rows, wts, nrows, kw, toff, Wo - VL, bias);
        return;
    }
#endif
    if (Wo < VL) {
        FN(corr_row_scalar)(out, ocs, OB, rows, wts, nrows, kw, toff, Wo, bias);
    } else if (OB == 8) {
#if VC_VBYTES >= 64
        VC_WALK(8, 2, 1);
#else
        VC_WALK(8, 1, 1);
#endif
    } else if (OB == 4) {
#if VC_VBYTES >= 64
        VC_WALK(4, 4, 1);
#else
        VC_WALK(4, 2, 1);
#endif
    } else {
        VC_WALK(1, 8, 4);
    }
}

/* Weight gradient, OB output channels (gcs apart in grad) x NT taps, summed over nr row pairs:
 * vacc[o*ocs + i*VL + lane] += sum_r sum over w of grows[r][o*gcs + w] * xrows[r][w + toff[i]]
 * (lanes kept apart; the caller adds them once, in a fixed order). The accumulators stay in registers over
 * all the rows; each x vector serves OB channels, each g vector NT taps; NS sets take alternate rows when
 * OB*NT alone is too few independent FMA chains. */
#define VC_WGRAD_ROW(OB, NT, SET, R)                                                                  \
    do {                                                                                              \
        const T *g = grows[R], *x = xrows[R];                                                         \
        for (int w = 0; w < wv_end; w += VL) {                                                        \
            VEC xv[NT];                                                                               \
            _Pragma("GCC unroll 8") for (int i = 0; i < NT; i++) xv[i] = *(const UVEC *)(x + w + toff[i]); \
            _Pragma("GCC unroll 8") for (int o = 0; o < OB; o++) {                                    \
                const VEC gv = *(const UVEC *)(g + o * gcs + w);                                      \
                _Pragma("GCC unroll 8") for (int i = 0; i < NT; i++) a[SET][o][i] += gv * xv[i];      \
            }                                                                                         \
        }                                                                                             \
    } while (0)

#define VC_DEFINE_WGRAD(OB, NT, NS)                                                                   \
static inline void FN(wgrad_##OB##x##NT)(const T *const *grows, ptrdiff_t gcs, const T *const *xrows,   \
                                          int nr, int wv_end, const ptrdiff_t *toff, T *vacc,          \
                                          ptrdiff_t ocs)                                               \
{                                                                                                     \
    VEC a[NS][OB][NT];                                                                                \
    _Pragma("GCC unroll 8") for (int o = 0; o < OB; o++)                                              \
    _Pragma("GCC unroll 8") for (int i = 0; i < NT; i++) {                                            \
        a[0][o][i] = *(UVEC *)(vacc + o * ocs + i * VL);                                              \
        _Pragma("GCC unroll 8") for (int s = 1; s < NS; s++) a[s][o][i] = (VEC){0};                   \
    }                                                                                                 \
    int r = 0;                                                                                        \
    for (; r + NS <= nr; r += NS)                                                                     \
        _Pragma("GCC unroll 8") for (int s = 0; s < NS; s++) VC_WGRAD_ROW(OB, NT, s, r + s);          \
    for (; r < nr; r++)                                                                               \
        VC_WGRAD_ROW(OB, NT, 0, r);                                                                   \
    _Pragma("GCC unroll 8") for (int s = 1; s < NS; s++)                                              \
    _Pragma("GCC unroll 8") for (int o = 0; o < OB; o++)                                              \
    _Pragma("GCC unroll 8") for (int i = 0; i < NT; i++) a[0][o][i] += a[s][o][i];                    \
    _Pragma("GCC unroll 8") for (int o = 0; o < OB; o++)                                              \
    _Pragma("GCC unroll 8") for (int i = 0; i < NT; i++) *(UVEC *)(vacc + o * ocs + i * VL) = a[0][o][i]; \
}

VC_DEFINE_WGRAD(1, 8, 1)
VC_DEFINE_WGRAD(1, 7, 1)
VC_DEFINE_WGRAD(1, 6, 1)
VC_DEFINE_WGRAD(1, 5, 1)
VC_DEFINE_WGRAD(1, 4, 2)
VC_DEFINE_WGRAD(1, 3, 2)
VC_DEFINE_WGRAD(1, 2, 2)
VC_DEFINE_WGRAD(1, 1, 2)
VC_DEFINE_WGRAD(4, 4, 1)
VC_DEFINE_WGRAD(4, 3, 1)
VC_DEFINE_WGRAD(4, 2, 1)
VC_DEFINE_WGRAD(4, 1, 2)

#define VC_WGRAD_CASE(OB, NT)                                                                         \
    case NT:                                                                                          \
        FN(wgrad_##OB##x##NT)(grows, gcs, xrows, nr, wv_end, toff + e, vacc + e * VL, ocs);           \
        break;

/* Weight gradient of one (input row offset, output-channel block): vacc[o*kw*VL + e*VL + lane] +=
 * sum_r sum_w grows[r][o*gcs + w] * xrows[r][w + toff[e]], o < OB (1 or 4), e < kw; the taps of a row in
 * as few calls as the register budget allows. */
static void FN(wgrad_rows)(const T *const *grows, ptrdiff_t gcs, const T *const *xrows, int nr, int Wo, int kw,
                           const ptrdiff_t *toff, int OB, T *vacc)
{
    const int wv_end = Wo - Wo % VL;
    const ptrdiff_t ocs = (ptrdiff_t)kw * VL;
    for (int e = 0, nt; e < kw; e += nt) {
        nt = kw - e < (OB == 4 ? 4 : 8) ? kw - e : (OB == 4 ? 4 : 8);
        if (OB == 4) {
            switch (nt) { VC_WGRAD_CASE(4, 4) VC_WGRAD_CASE(4, 3) VC_WGRAD_CASE(4, 2) VC_WGRAD_CASE(4, 1) }
        } else {
            switch (nt) {
                VC_WGRAD_CASE(1, 8) VC_WGRAD_CASE(1, 7) VC_WGRAD_CASE(1, 6) VC_WGRAD_CASE(1, 5)
                VC_WGRAD_CASE(1, 4) VC_WGRAD_CASE(1, 3) VC_WGRAD_CASE(1, 2) VC_WGRAD_CASE(1, 1)
            }
        }
    }
    for (int r = 0; r < nr; r++) /* columns past the last whole vector */
        for (int o = 0; o < OB; o++)
            for (int e = 0; e < kw; e++)
                for (int w = wv_end; w < Wo; w++)
                    vacc[o * ocs + e * VL] += grows[r][o * gcs + w] * xrows[r][w + toff[e]];
}

/* The FMA pipes' peak: n rounds of 12 independent vector multiply-adds (enough chains to cover the latency);
 * returns a sum of every result, so nothing is optimised away. The benchmarks hold kernels against it. */
static T FN(fma_probe)(long n)
{
    VEC a[12];
    const VEC b = (VEC){0} + (T)0.999999, c = (VEC){0} + (T)1e-6;
    _Pragma("GCC unroll 12") for (int i = 0; i < 12; i++) a[i] = (VEC){0} + (T)(i + 1);
    for (long r = 0; r < n; r++)
        _Pragma("GCC unroll 12") for (int i = 0; i < 12; i++) a[i] = a[i] * b + c;
    T s = 0;
    for (int i = 0; i < 12; i++)
        for (int l = 0; l < VL; l++) s += a[i][l];
    return s;
}

#include "fir_impl.h"
#include "dynamic_impl.h"
#include "bilateral_impl.h"

#undef VC_SHIFT
#undef VC_ALIGN_EPI
#undef FN
#undef VEC
#undef UVEC
#undef VL
