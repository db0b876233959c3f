# Dynamic convolution: a different kernel at every output voxel (ops/dynamic.py). Included by the
# _direct_*.pyx stubs; the SIMD work is dot_rows (dynamic_impl.h): out[w] (+)= sum_r a[r][w] * b[r][w].
#
# Both layouts of the kernel field K (N, S, T, Do, Ho, Wo) are one: output channel o sums, over its pairs
# (input channel c, kernel slice s) (CSR ptr/pc/ps), sum_t K[n, s, t, p] * x[n, c, p*stride + t*dilation - pad].
# Grouped (involution): o = c, one pair (c, group of c). Full: pairs (c, o*C + c) for every c.
# x arrives as the direct kernel's rows (ops/dense._row_layout: W padding and stride phases, tap e of output
# column w at w + toff[e]); map_d / map_h: padded D/H position -> plane / row of x, or -1 (zero).

cdef extern from "kernels.h" nogil:
    void dot_rows_f32(float *out, const float *const *a, const float *const *b, int nrows, int n, int accumulate)
    void dot_rows_f64(double *out, const double *const *a, const double *const *b, int nrows, int n,
                      int accumulate)


cdef inline void dot_rows(floating *out, const floating **a, const floating **b, int nrows, int n,
                          int accumulate) noexcept nogil:
    if floating is float:
        dot_rows_f32(out, a, b, nrows, n, accumulate)
    else:
        dot_rows_f64(out, a, b, nrows, n, accumulate)


def dynamic_forward(const floating[:, :, :, :, ::1] xr, const floating[:, :, :, :, :, ::1] K,
                    floating[:, :, :, :, ::1] out, const Py_ssize_t[::1] ptr, const Py_ssize_t[::1] pc,
                    const Py_ssize_t[::1] ps, const Py_ssize_t[::1] map_d, const Py_ssize_t[::1] map_h,
                    const Py_ssize_t[::1] toff, int kh, int kw, int sd, int sh, int dd, int dh, int nthreads):
    """out[n, o, od, oh, :] = sum over o's pairs (c, s) and taps t of K[n, s, t, od, oh, :] * x-row(c, t)."""
    cdef Py_ssize_t N = out.shape[0], O = out.shape[1], Do = out.shape[2], Ho = out.shape[3]
    cdef int Wo = <int>out.shape[4]
    cdef Py_ssize_t kd = K.shape[2] // (kh * kw), maxpairs = 0, u, n, o, od, oh, j, ta, tb, te, xd, xh
    cdef int nr
    cdef const floating **a
    cdef const floating **b
    for o in range(O):
        maxpairs = max(maxpairs, ptr[o + 1] - ptr[o])
    with nogil, parallel(num_threads=nthreads):
        a = <const floating **>malloc((maxpairs * K.shape[2] + 1) * sizeof(floating *))
        b = <const floating **>malloc((maxpairs * K.shape[2] + 1) * sizeof(floating *))
        for u in prange(N * O * Do, schedule="static"):
            od = u % Do
            o = (u // Do) % O
            n = u // (Do * O)
            for oh in range(Ho):
                nr = 0
                for j in range(ptr[o], ptr[o + 1]):
                    for ta in range(kd):
                        xd = map_d[od * sd + ta * dd]
                        if xd < 0:
                            continue
                        for tb in range(kh):
                            xh = map_h[oh * sh + tb * dh]
                            if xh < 0:
                                continue
                            for te in range(kw):
                                a[nr] = &K[n, ps[j], (ta * kh + tb) * kw + te, od, oh, 0]
                                b[nr] = &xr[n, pc[j], xd, xh, toff[te]]
                                nr = nr + 1
                dot_rows(&out[n, o, od, oh, 0], a, b, nr, Wo, 0)
        free(a)
        free(b)


def dynamic_grad_kernels(const floating[:, :, :, :, ::1] xr, const floating[:, :, :, :, ::1] g,
                         floating[:, :, :, :, :, ::1] gK, const Py_ssize_t[::1] sptr, const Py_ssize_t[::1] so,
                         const Py_ssize_t[::1] sc, const Py_ssize_t[::1] map_d, const Py_ssize_t[::1] map_h,
                         const Py_ssize_t[::1] toff, int kh, int kw, int sd, int sh, int dd, int dh, int nthreads):
    """gK[n, s, t, od, oh, :] = sum over slice s's pairs (o, c) of g[n, o, od, oh, :] * x-row(c, t)."""
    cdef Py_ssize_t N = gK.shape[0], S = gK.shape[1], T = gK.shape[2], Do = gK.shape[3], Ho = gK.shape[4]
    cdef int Wo = <int>gK.shape[5]
    cdef Py_ssize_t maxpairs = 1, u, n, s, od, oh, j, t, xd, xh
    cdef int nr
    cdef const floating **a
    cdef const floating **b
    for s in range(S):
        maxpairs = max(maxpairs, sptr[s + 1] - sptr[s])
    with nogil, parallel(num_threads=nthreads):
        a = <const floating **>malloc(maxpairs * sizeof(floating *))
        b = <const floating **>malloc(maxpairs * sizeof(floating *))
        for u in prange(N * S * Do, schedule="static"):
            od = u % Do
            s = (u // Do) % S
            n = u // (Do * S)
            for oh in range(Ho):
                for t in range(T):
                    xd = map_d[od * sd + (t // (kh * kw)) * dd]
                    xh = map_h[oh * sh + ((t // kw) % kh) * dh]
                    nr = 0
                    if xd >= 0 and xh >= 0:
                        for j in range(sptr[s], sptr[s + 1]):
                            a[nr] = &g[n, so[j], od, oh, 0]
                            b[nr] = &xr[n, sc[j], xd, xh, toff[t % kw]]
                            nr = nr + 1
                    dot_rows(&gK[n, s, t, od, oh, 0], a, b, nr, Wo, 0)   # no rows: zeros (the tap read padding)
        free(a)
        free(b)


def dynamic_grad_input(const floating[:, :, :, :, :, ::1] K, const floating[:, :, :, :, ::1] g,
                       floating[:, :, :, :, ::1] gxr, const Py_ssize_t[::1] cptr, const Py_ssize_t[::1] co,
                       const Py_ssize_t[::1] cs, const Py_ssize_t[::1] map_d, const Py_ssize_t[::1] map_h,
                       const Py_ssize_t[::1] toff, int kh, int kw, int sd, int sh, int dd, int dh, int nthreads):
    """Input gradient as a gather (deterministic, no atomics): row (c, xd, xh) of gxr, in the row layout of x,
    collects every output row whose taps read it, K[n, s, t, od, oh, :] * g[n, o, od, oh, :] added at toff[e].
    A unit owns its rows whole (n, c, plane xd). Zero padding: every plane and row of x sits at one padded
    position, so at most kd (od, ta) and kh (oh, tb) reach it."""
    cdef Py_ssize_t N = gxr.shape[0], C = gxr.shape[1], D = gxr.shape[2], H = gxr.shape[3], Wr = gxr.shape[4]
    cdef Py_ssize_t Do = g.shape[2], Ho = g.shape[3], T = K.shape[2], kd = T // (kh * kw)
    cdef Py_ssize_t Dp = map_d.shape[0], Hp = map_h.shape[0]
    cdef int Wo = <int>g.shape[4]
    cdef Py_ssize_t maxpairs = 1, u, n, c, xd, xh, j, p, ta, tb, te, od, oh, nd, nh, id_, ih
    cdef int nr
    cdef const floating **a
    cdef const floating **b
    cdef Py_ssize_t *dlist   # (od, ta) reaching plane xd
    cdef Py_ssize_t *hlist   # (oh, tb) reaching row xh
    for c in range(C):
        maxpairs = max(maxpairs, cptr[c + 1] - cptr[c])
    with nogil, parallel(num_threads=nthreads):
        a = <const floating **>malloc((maxpairs * kd * kh + 1) * sizeof(floating *))
        b = <const floating **>malloc((maxpairs * kd * kh + 1) * sizeof(floating *))
        dlist = <Py_ssize_t *>malloc((2 * kd + 1) * sizeof(Py_ssize_t))
        hlist = <Py_ssize_t *>malloc((2 * kh + 1) * sizeof(Py_ssize_t))
        for u in prange(N * C * D, schedule="static"):
            xd = u % D
            c = (u // D) % C
            n = u // (D * C)
            nd = 0
            for p in range(Dp):
                if map_d[p] != xd:
                    continue
                for ta in range(kd):
                    od = p - ta * dd
                    if od >= 0 and od % sd == 0 and od // sd < Do:
                        dlist[2 * nd] = od // sd
                        dlist[2 * nd + 1] = ta
                        nd = nd + 1
            for xh in range(H):
                memset(&gxr[n, c, xd, xh, 0], 0, Wr * sizeof(floating))
                nh = 0
                for p in range(Hp):
                    if map_h[p] != xh:
                        continue
                    for tb in range(kh):
                        oh = p - tb * dh
                        if oh >= 0 and oh % sh == 0 and oh // sh < Ho:
                            hlist[2 * nh] = oh // sh
                            hlist[2 * nh + 1] = tb
                            nh = nh + 1
                for te in range(kw):
                    nr = 0
                    for id_ in range(nd):
                        for ih in range(nh):
                            for j in range(cptr[c], cptr[c + 1]):
                                a[nr] = &K[n, cs[j], (dlist[2 * id_ + 1] * kh + hlist[2 * ih + 1]) * kw + te,
                                           dlist[2 * id_], hlist[2 * ih], 0]
                                b[nr] = &g[n, co[j], dlist[2 * id_], hlist[2 * ih], 0]
                                nr = nr + 1
                    if nr:
                        dot_rows(&gxr[n, c, xd, xh, toff[te]], a, b, nr, Wo, 1)
        free(a)
        free(b)
        free(dlist)
        free(hlist)
