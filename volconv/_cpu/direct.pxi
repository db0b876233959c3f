# Direct 3D cross-correlation and weight-gradient loops (OpenMP over work units); the SIMD work is in simd.h.
# Included by _compiled_generic.pyx, _compiled_avx2.pyx and _compiled_avx512.pyx, which setup.py compiles with
# different instruction sets. No validation here: volconv/engine/ hands over checked, contiguous arrays.
#
# Layout conventions shared with engine/layout.py:
#   rows of (N, C, D, H, W) padded along W (the contiguous axis) to Wr by row_map and, for a W stride s,
#                            split into s phases, so that every tap reads a contiguous run;
#   toff   (kw,)             offset of tap e in such a row: output column w reads row[w + toff[e]];
#   map_d  (Dp,), map_h (Hp,) padded D/H position -> row of x, or -1 for a zero row (constant padding);
#   wpack  (G, nOB, Cg, kd, kh, kw, OB) weights with OB output channels innermost (one load, OB FMAs).

from cython.parallel cimport prange, parallel
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy

cdef extern from "stdlib.h" nogil:
    void *aligned_alloc(size_t alignment, size_t size)  # C11; libc.stdlib does not declare it

cdef extern from "simd.h" nogil:
    int vc_vector_bytes()
    int vc_max_threads()
    int vc_have_openmp()
    int vc_cpu_level()
    float fma_probe_f32(long n)
    double fma_probe_f64(long n)
    void corr_row_f32(float *out, Py_ssize_t ocs, int OB, const float *const *rows, const float *const *wts,
                      int nrows, int kw, const Py_ssize_t *toff, int Wo, const float *bias, int aligned_unit)
    void corr_row_f64(double *out, Py_ssize_t ocs, int OB, const double *const *rows, const double *const *wts,
                      int nrows, int kw, const Py_ssize_t *toff, int Wo, const double *bias, int aligned_unit)
    int corr_rows2_f32(float *out, Py_ssize_t ors, const float *const *rows, const float *const *wa,
                       const float *const *wb, int nrows, int kw, const Py_ssize_t *toff, int Wo, float bias)
    int corr_rows2_f64(double *out, Py_ssize_t ors, const double *const *rows, const double *const *wa,
                       const double *const *wb, int nrows, int kw, const Py_ssize_t *toff, int Wo, double bias)
    void wgrad_rows_f32(const float *const *grows, Py_ssize_t gcs, const float *const *xrows, int nr, int Wo,
                        int kw, const Py_ssize_t *toff, int OB, float *vacc)
    void wgrad_rows_f64(const double *const *grows, Py_ssize_t gcs, const double *const *xrows, int nr, int Wo,
                        int kw, const Py_ssize_t *toff, int OB, double *vacc)

ctypedef fused floating:
    float
    double


cdef object no_memory(str kernel, int nthreads):
    """The error of a kernel whose per-thread work buffers could not be allocated. They are allocated inside
    the parallel region, which cannot raise: a thread without its buffers sets the shared flag and skips its
    work units, and the kernel raises this once the region has ended."""
    return MemoryError(f"volconv's {kernel} kernel could not allocate its work buffers for {nthreads} "
                       "thread(s): not enough memory (fewer workers, or a smaller input, need less)")


def vector_bytes():
    return vc_vector_bytes()


def max_threads():
    return vc_max_threads()


def have_openmp():
    return bool(vc_have_openmp())


def cpu_level():
    return vc_cpu_level()


def fma_peak(long rounds, int nthreads, bint double_precision=False):
    """Multiply-adds per second the vector units sustain with nthreads threads (rounds of 12 vector FMAs per
    thread): the machine's compute limit, measured."""
    from time import perf_counter
    cdef int t
    cdef double sink = 0
    cdef int lanes = vc_vector_bytes() // (8 if double_precision else 4)
    start = perf_counter()
    with nogil:
        for t in prange(nthreads, num_threads=nthreads, schedule="static", chunksize=1):
            sink += fma_probe_f64(rounds) if double_precision else fma_probe_f32(rounds)
    seconds = perf_counter() - start   # (sink: every result summed, so that no thread's loop is dropped)
    return 12.0 * lanes * rounds * nthreads / seconds


cdef inline void pad_plane(const floating *src, Py_ssize_t H, Py_ssize_t W, const Py_ssize_t *row_map,
                           Py_ssize_t Wr, Py_ssize_t wlo, bint unit_stride, floating *dst,
                           Py_ssize_t ds) noexcept nogil:
    """One input plane (H, W) -> H padded rows of Wr, ds apart (row_map: source column or -1 for zero)."""
    cdef Py_ssize_t h, j, s
    for h in range(H):
        if unit_stride:  # the middle of the row is the source row itself: one contiguous copy
            memcpy(dst + h * ds + wlo, src + h * W, W * sizeof(floating))
            for j in range(wlo):
                s = row_map[j]
                dst[h * ds + j] = src[h * W + s] if s >= 0 else 0
            for j in range(wlo + W, Wr):
                s = row_map[j]
                dst[h * ds + j] = src[h * W + s] if s >= 0 else 0
        else:
            for j in range(Wr):
                s = row_map[j]
                dst[h * ds + j] = src[h * W + s] if s >= 0 else 0


cdef inline void pad_ends(floating *row, Py_ssize_t W, const Py_ssize_t *row_map, Py_ssize_t Wr,
                          Py_ssize_t wlo) noexcept nogil:
    """A unit-stride padded row whose middle (the source row, W columns at wlo) is already in place: its ends
    from row_map, as pad_plane would."""
    cdef Py_ssize_t j, s
    for j in range(wlo):
        s = row_map[j]
        row[j] = row[wlo + s] if s >= 0 else 0
    for j in range(wlo + W, Wr):
        s = row_map[j]
        row[j] = row[wlo + s] if s >= 0 else 0


cdef inline void fill_ring(const floating *xg, Py_ssize_t cs, Py_ssize_t zs, Py_ssize_t Cg, Py_ssize_t kd,
                           Py_ssize_t pos0, Py_ssize_t dd, Py_ssize_t S, const Py_ssize_t *map_d, Py_ssize_t H,
                           Py_ssize_t W, const Py_ssize_t *row_map, Py_ssize_t Wr, Py_ssize_t wlo,
                           bint unit_stride, floating *ring, Py_ssize_t plane, Py_ssize_t ds,
                           Py_ssize_t *tags) noexcept nogil:
    """Bring the padded input planes of one output plane into a unit's ring: channel c (of Cg, cs apart from
    xg), padded D positions pos0 + a*dd, a < kd, into slot c*S + pos mod S (tags: the position a slot holds,
    so that each plane is padded once while the unit walks through its output planes)."""
    cdef Py_ssize_t c, a, pos, slot, xd
    for c in range(Cg):
        for a in range(kd):
            pos = pos0 + a * dd
            slot = c * S + pos % S
            xd = map_d[pos]
            if xd >= 0 and tags[slot] != pos:
                pad_plane(xg + c * cs + xd * zs, H, W, row_map, Wr, wlo, unit_stride, ring + slot * plane, ds)
                tags[slot] = pos


def pad_rows(const floating[:, :, :, :, ::1] x, const Py_ssize_t[::1] row_map, Py_ssize_t wlo, bint unit_stride,
             floating[:, :, :, :, ::1] out, int nthreads):
    """Every row of x laid out by row_map (as pad_plane), into out (N, C, D, H, Wr)."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], D = x.shape[2], H = x.shape[3], W = x.shape[4]
    cdef Py_ssize_t Wr = out.shape[4], t
    with nogil:
        for t in prange(N * C * D, num_threads=nthreads, schedule="static"):
            pad_plane(&x[t // (C * D), (t // D) % C, t % D, 0, 0], H, W, &row_map[0], Wr, wlo, unit_stride,
                      &out[t // (C * D), (t // D) % C, t % D, 0, 0], Wr)


def conv3d_direct(const floating[:, :, :, :, ::1] x, const Py_ssize_t[::1] row_map, Py_ssize_t wlo,
                  bint unit_stride, bint unit_taps,
                  const floating[:, :, :, :, :, :, ::1] wpack, const floating[::1] bias,
                  floating[:, :, :, :, ::1] out, const Py_ssize_t[::1] map_d, const Py_ssize_t[::1] map_h,
                  const Py_ssize_t[::1] toff, int sd, int sh, int dd, int dh, Py_ssize_t nchunk, int nthreads):
    """out[n, o, od, oh, ow] = bias[o] + sum xp[n, c, map_d[od*sd + a*dd], map_h[oh*sh + b*dh], ow + toff[e]] * w
    where xp's rows are x's rows laid out by row_map (padding, stride phases). unit_stride (W stride 1): the
    source row sits whole at wlo in its padded row. unit_taps: toff[e] == e (W stride and dilation 1).

    Work unit: (n, group, chunk of output planes). A unit keeps a ring of (kd - 1) * dd + 1 padded planes per
    input channel, slot = padded position mod ring size: each plane is padded once, while it is hot in L2,
    instead of a padded copy of the whole volume going through memory."""
    cdef Py_ssize_t N = out.shape[0], Do = out.shape[2], Ho = out.shape[3]
    cdef Py_ssize_t H = x.shape[3], W = x.shape[4], Wr = row_map.shape[0]
    cdef int Wo = <int>out.shape[4]
    cdef Py_ssize_t G = wpack.shape[0], nOB = wpack.shape[1], Cg = wpack.shape[2]
    cdef Py_ssize_t kd = wpack.shape[3], kh = wpack.shape[4]
    cdef int kw = <int>wpack.shape[5], OB = <int>wpack.shape[6]
    # ring rows start on vector boundaries (VL-aligned loads for the shift kernel)
    cdef Py_ssize_t VL = vc_vector_bytes() // sizeof(floating), ds = (Wr + VL - 1) // VL * VL
    cdef Py_ssize_t S = (kd - 1) * dd + 1, plane = H * ds, per = (Do + nchunk - 1) // nchunk
    cdef size_t ring_bytes = ((Cg * S * plane + VL) * sizeof(floating) + 63) // 64 * 64
    cdef Py_ssize_t ocs = out.strides[1] // sizeof(floating), ws_b = kw * OB
    cdef Py_ssize_t nunit = N * G * nchunk, u, n, g, k, od, oh, ob, c, a, j, pos, xd, nb, o0
    cdef Py_ssize_t ors = out.strides[3] // sizeof(floating)
    cdef bint pairs = OB == 1 and nOB == 1 and unit_taps and sh == 1 and dh == 1   # rows oh, oh+1 share inputs
    cdef bint paired
    cdef int nr, done
    cdef floating *ring
    cdef const floating **wb
    cdef Py_ssize_t *tags
    cdef const floating **rows
    cdef const floating **wts
    cdef Py_ssize_t *hrow
    cdef Py_ssize_t *htap
    cdef const floating *xplane
    cdef const floating *wplane
    cdef int failed = 0   # set by a thread whose buffers could not be allocated (see no_memory)
    cdef int *fail = &failed
    cdef bint ok
    if nunit == 0 or Do == 0 or Ho == 0:
        return
    with nogil, parallel(num_threads=nthreads):
        ring = <floating *>aligned_alloc(64, ring_bytes)  # + VL: the shift kernel loads one vector ahead
        tags = <Py_ssize_t *>malloc(Cg * S * sizeof(Py_ssize_t))
        rows = <const floating **>malloc(Cg * kd * (kh + 1) * sizeof(floating *))
        wts = <const floating **>malloc(Cg * kd * (kh + 1) * sizeof(floating *))
        wb = <const floating **>malloc(Cg * kd * (kh + 1) * sizeof(floating *))
        hrow = <Py_ssize_t *>malloc(kh * sizeof(Py_ssize_t))
        htap = <Py_ssize_t *>malloc(kh * sizeof(Py_ssize_t))
        ok = ring != NULL and tags != NULL and rows != NULL and wts != NULL and wb != NULL and hrow != NULL \
            and htap != NULL
        if not ok:
            fail[0] = 1
        for u in prange(nunit, schedule="static"):
            if not ok:
                continue
            k = u % nchunk
            g = (u // nchunk) % G
            n = u // (nchunk * G)
            for j in range(Cg * S):
                tags[j] = -1
            for od in range(k * per, min(Do, (k + 1) * per)):
                fill_ring(&x[n, g * Cg, 0, 0, 0], x.strides[1] // sizeof(floating), x.strides[2] // sizeof(floating),
                          Cg, kd, od * sd, dd, S, &map_d[0], H, W, &row_map[0], Wr, wlo, unit_stride, ring, plane,
                          ds, tags)
                paired = False
                for oh in range(Ho):
                    if paired:   # computed with the row before
                        paired = False
                        continue
                    if pairs and oh + 1 < Ho:   # rows oh, oh + 1: input rows oh .. oh + kh, each feeding both
                        nr = 0
                        for c in range(Cg):
                            for a in range(kd):
                                pos = od * sd + a * dd
                                if map_d[pos] < 0:
                                    continue
                                xplane = ring + (c * S + pos % S) * plane
                                wplane = &wpack[g, 0, c, a, 0, 0, 0]
                                for j in range(kh + 1):
                                    xd = map_h[oh + j]
                                    if xd < 0:
                                        continue
                                    rows[nr] = xplane + xd * ds
                                    wts[nr] = wplane + j * kw if j < kh else NULL   # feeds row oh + 1 only
                                    wb[nr] = wplane + (j - 1) * kw if j > 0 else NULL   # feeds row oh only
                                    nr = nr + 1
                        if floating is float:
                            done = corr_rows2_f32(&out[n, g, od, oh, 0], ors, rows, wts, wb, nr, kw, &toff[0], Wo,
                                                  bias[g])
                        else:
                            done = corr_rows2_f64(&out[n, g, od, oh, 0], ors, rows, wts, wb, nr, kw, &toff[0], Wo,
                                                  bias[g])
                        if done:
                            paired = True
                            continue
                    nb = 0  # the H taps that land on a row (zero padding drops the others)
                    for j in range(kh):
                        xd = map_h[oh * sh + j * dh]
                        if xd >= 0:
                            hrow[nb] = xd * ds
                            htap[nb] = j * ws_b
                            nb = nb + 1
                    for ob in range(nOB):
                        nr = 0
                        for c in range(Cg):
                            for a in range(kd):
                                pos = od * sd + a * dd
                                if map_d[pos] < 0:
                                    continue
                                xplane = ring + (c * S + pos % S) * plane
                                wplane = &wpack[g, ob, c, a, 0, 0, 0]
                                for j in range(nb):
                                    rows[nr] = xplane + hrow[j]
                                    wts[nr] = wplane + htap[j]
                                    nr = nr + 1
                        o0 = (g * nOB + ob) * OB
                        if floating is float:
                            corr_row_f32(&out[n, o0, od, oh, 0], ocs, OB, rows, wts, nr, kw, &toff[0], Wo,
                                         &bias[o0], unit_taps)
                        else:
                            corr_row_f64(&out[n, o0, od, oh, 0], ocs, OB, rows, wts, nr, kw, &toff[0], Wo,
                                         &bias[o0], unit_taps)
        free(ring)
        free(tags)
        free(rows)
        free(wts)
        free(wb)
        free(hrow)
        free(htap)
    if failed:
        raise no_memory("direct", nthreads)


def wgrad_direct(const floating[:, :, :, :, ::1] x, const floating[:, :, :, :, ::1] grad,
                 floating[:, :, :, :, :, ::1] partial, const Py_ssize_t[::1] map_d,
                 const Py_ssize_t[::1] map_h, const Py_ssize_t[::1] toff, int kh, int sd, int sh, int dd, int dh,
                 int nthreads):
    """Weight gradient in chunks: partial[k, g, ob, c, a*kh + b, o*kw + e] = sum over the k-th chunk of (n, od) planes
    and all oh, ow of grad[n, (g*nOB + ob)*OB + o, od, oh, ow] *
                       x[n, g*Cg + c, map_d[od*sd + a*dd], map_h[oh*sh + b*dh], ow + toff[e]]
    (x: rows laid out as the direct kernel's). A task owns (chunk, group, block of OB output channels): its
    gradient rows are reused from cache over every input channel, and its lane-wise partial sums (per-thread
    scratch) are added in a fixed order at the end: deterministic, no atomics."""
    cdef Py_ssize_t nchunk = partial.shape[0], G = partial.shape[1], nOB = partial.shape[2]
    cdef int kw = <int>toff.shape[0]
    cdef Py_ssize_t Cg = partial.shape[3], kd = partial.shape[4] // kh
    cdef int OB = <int>(partial.shape[5] // kw)
    cdef Py_ssize_t N = grad.shape[0], Do = grad.shape[2], Ho = grad.shape[3]
    cdef int Wo = <int>grad.shape[4]
    cdef Py_ssize_t VL = vc_vector_bytes() // sizeof(floating), gcs = grad.strides[1] // sizeof(floating)
    cdef Py_ssize_t per_tap = OB * kw * VL, nacc = Cg * kd * kh * per_tap
    cdef Py_ssize_t planes = N * Do, per = (planes + nchunk - 1) // nchunk
    cdef Py_ssize_t ntask = nchunk * G * nOB, t, k, g, ob, q, n, od, c, a, b, oh, oh0, xd, xh, i, o, e, lane
    cdef int nr
    cdef floating s
    cdef floating *vacc
    cdef const floating **grows
    cdef const floating **xrows
    cdef int failed = 0   # set by a thread whose buffers could not be allocated (see no_memory)
    cdef int *fail = &failed
    cdef bint ok
    if ntask == 0:
        return
    with nogil, parallel(num_threads=nthreads):
        vacc = <floating *>malloc(nacc * sizeof(floating))
        grows = <const floating **>malloc(8 * sizeof(floating *))
        xrows = <const floating **>malloc(8 * sizeof(floating *))
        ok = vacc != NULL and grows != NULL and xrows != NULL
        if not ok:
            fail[0] = 1
        for t in prange(ntask, schedule="dynamic"):
            if not ok:
                continue
            ob = t % nOB
            g = (t // nOB) % G
            k = t // (nOB * G)
            for i in range(nacc):
                vacc[i] = 0
            for q in range(k * per, min(planes, (k + 1) * per)):
                n = q // Do
                od = q % Do
                for oh0 in range(0, Ho, 8):  # 8 output rows at a time: their gradient rows stay in L1
                    for c in range(Cg):
                        for a in range(kd):
                            xd = map_d[od * sd + a * dd]
                            if xd < 0:
                                continue
                            for b in range(kh):
                                nr = 0
                                for oh in range(oh0, min(Ho, oh0 + 8)):
                                    xh = map_h[oh * sh + b * dh]
                                    if xh >= 0:
                                        grows[nr] = &grad[n, (g * nOB + ob) * OB, od, oh, 0]
                                        xrows[nr] = &x[n, g * Cg + c, xd, xh, 0]
                                        nr = nr + 1
                                if floating is float:
                                    wgrad_rows_f32(grows, gcs, xrows, nr, Wo, kw, &toff[0], OB,
                                                   vacc + ((c * kd + a) * kh + b) * per_tap)
                                else:
                                    wgrad_rows_f64(grows, gcs, xrows, nr, Wo, kw, &toff[0], OB,
                                                   vacc + ((c * kd + a) * kh + b) * per_tap)
            for c in range(Cg):  # lanes added in order: the same sums whatever the thread count
                for a in range(kd):
                    for b in range(kh):
                        for o in range(OB):
                            for e in range(kw):
                                s = 0
                                for lane in range(VL):
                                    s = s + vacc[((c * kd + a) * kh + b) * per_tap + (o * kw + e) * VL + lane]
                                partial[k, g, ob, c, a * kh + b, o * kw + e] = s
        free(vacc)
        free(grows)
        free(xrows)
    if failed:
        raise no_memory("weight-gradient", nthreads)
