# Dynamic convolution: a different kernel at every output voxel (ops/dynamic.py). Included by the
# _compiled_*.pyx stubs; the SIMD work is dot_rows (dynamic_impl.h): out[w] (+)= sum_r a[ao[r] + w] * b[bo[r] + w],
# the offset lists built once per output row (or plane) and reused for every channel.
#
# Both layouts of the kernel field K (N, S, T, Do, Ho, Wo) are one: output channel o sums, over its pairs
# (input channel c, kernel slice s) (CSR ptr/pc/ps), sum_t K[n, s, t, p] * x[n, c, p*stride + t*dilation - pad].
# Grouped (involution): o = c, one pair (c, group of c). Full: pairs (c, o*C + c) for every c.
# x arrives as the direct kernel's rows (engine/layout.row_layout: W padding and stride phases, tap e of output
# column w at w + toff[e]); map_d / map_h: padded D/H position -> plane / row of x, or -1 (zero).

cdef extern from "simd.h" nogil:
    void dot_rows_f32(float *out, const float *a, const Py_ssize_t *ao, const float *b, const Py_ssize_t *bo,
                      int nrows, int n, int accumulate)
    void dot_rows_f64(double *out, const double *a, const Py_ssize_t *ao, const double *b, const Py_ssize_t *bo,
                      int nrows, int n, int accumulate)


cdef inline void dot_rows(floating *out, const floating *a, const Py_ssize_t *ao, const floating *b,
                          const Py_ssize_t *bo, Py_ssize_t nrows, int n, bint accumulate) noexcept nogil:
    if floating is float:
        dot_rows_f32(out, a, ao, b, bo, <int>nrows, n, accumulate)
    else:
        dot_rows_f64(out, a, ao, b, bo, <int>nrows, n, accumulate)


def dynamic_forward(const floating[:, :, :, :, ::1] xr, const floating[:, :, :, :, :, ::1] K,
                    floating[:, :, :, :, ::1] out, const Py_ssize_t[::1] ptr, const Py_ssize_t[::1] pc,
                    const Py_ssize_t[::1] ps, const Py_ssize_t[::1] map_d, const Py_ssize_t[::1] map_h,
                    const Py_ssize_t[::1] toff, int kh, int kw, int sd, int sh, int dd, int dh, int nthreads):
    """out[n, o, od, oh, :] = sum over o's pairs (c, s) and taps t of K[n, s, t, od, oh, :] * x-row(c, t).
    Unit (n, od, block of outputs): the tap offsets of a row are built once for the block's outputs, which
    reuse its kernel-field rows from cache."""
    cdef Py_ssize_t N = out.shape[0], O = out.shape[1], Do = out.shape[2], Ho = out.shape[3], T = K.shape[2]
    cdef int Wo = <int>out.shape[4]
    cdef Py_ssize_t kd = T // (kh * kw), OB = max(1, min(O, 16)), nob = (O + OB - 1) // OB
    cdef Py_ssize_t kt = K.strides[2] // sizeof(floating), xs_d = xr.strides[2] // sizeof(floating)
    cdef Py_ssize_t xs_h = xr.strides[3] // sizeof(floating)
    cdef Py_ssize_t u, n, o, ob, od, oh, j, ta, tb, te, xd, xh, nt
    cdef Py_ssize_t *koff
    cdef Py_ssize_t *xoff
    cdef int failed = 0   # set by a thread whose buffers could not be allocated (see no_memory)
    cdef int *fail = &failed
    cdef bint ok
    with nogil, parallel(num_threads=nthreads):
        koff = <Py_ssize_t *>malloc(T * sizeof(Py_ssize_t))
        xoff = <Py_ssize_t *>malloc(T * sizeof(Py_ssize_t))
        ok = koff != NULL and xoff != NULL
        if not ok:
            fail[0] = 1
        for u in prange(N * Do * nob, schedule="static"):
            if not ok:
                continue
            ob = u % nob
            od = (u // nob) % Do
            n = u // (nob * Do)
            for oh in range(Ho):
                nt = 0   # the taps inside the volume (zero padding drops the others)
                for ta in range(kd):
                    xd = map_d[od * sd + ta * dd]
                    for tb in range(kh):
                        xh = map_h[oh * sh + tb * dh]
                        if xd < 0 or xh < 0:
                            continue
                        for te in range(kw):
                            koff[nt] = ((ta * kh + tb) * kw + te) * kt
                            xoff[nt] = xd * xs_d + xh * xs_h + toff[te]
                            nt = nt + 1
                for o in range(ob * OB, min(O, (ob + 1) * OB)):
                    for j in range(ptr[o], ptr[o + 1]):
                        dot_rows(&out[n, o, od, oh, 0], &K[n, ps[j], 0, od, oh, 0], koff, &xr[n, pc[j], 0, 0, 0],
                                 xoff, nt, Wo, j > ptr[o])
        free(koff)
        free(xoff)
    if failed:
        raise no_memory("dynamic", nthreads)


def dynamic_grad_kernels(const floating[:, :, :, :, ::1] xr, const floating[:, :, :, :, ::1] g,
                         floating[:, :, :, :, :, ::1] gK, const Py_ssize_t[::1] sptr, const Py_ssize_t[::1] so,
                         const Py_ssize_t[::1] sc, const Py_ssize_t[::1] map_d, const Py_ssize_t[::1] map_h,
                         const Py_ssize_t[::1] toff, int kh, int kw, int sd, int sh, int dd, int dh, int nthreads):
    """gK[n, s, t, od, oh, :] = sum over slice s's pairs (o, c) of g[n, o, od, oh, :] * x-row(c, t)."""
    cdef Py_ssize_t N = gK.shape[0], S = gK.shape[1], T = gK.shape[2], Do = gK.shape[3], Ho = gK.shape[4]
    cdef int Wo = <int>gK.shape[5]
    cdef Py_ssize_t gs_c = g.strides[1] // sizeof(floating), xs_c = xr.strides[1] // sizeof(floating)
    cdef Py_ssize_t maxpairs = 1, u, n, s, od, oh, j, t, xd, xh, np_
    cdef Py_ssize_t *goff
    cdef Py_ssize_t *xoff
    cdef int failed = 0   # set by a thread whose buffers could not be allocated (see no_memory)
    cdef int *fail = &failed
    cdef bint ok
    for s in range(S):
        maxpairs = max(maxpairs, sptr[s + 1] - sptr[s])
    with nogil, parallel(num_threads=nthreads):
        goff = <Py_ssize_t *>malloc(maxpairs * sizeof(Py_ssize_t))
        xoff = <Py_ssize_t *>malloc(maxpairs * sizeof(Py_ssize_t))
        ok = goff != NULL and xoff != NULL
        if not ok:
            fail[0] = 1
        for u in prange(N * S * Do, schedule="static"):
            if not ok:
                continue
            od = u % Do
            s = (u // Do) % S
            n = u // (Do * S)
            np_ = sptr[s + 1] - sptr[s]
            for j in range(np_):
                goff[j] = so[sptr[s] + j] * gs_c
                xoff[j] = sc[sptr[s] + j] * xs_c
            for oh in range(Ho):
                for t in range(T):
                    xd = map_d[od * sd + (t // (kh * kw)) * dd]
                    xh = map_h[oh * sh + ((t // kw) % kh) * dh]
                    # a tap in the padding reads zeros: its gradient row is zero (no rows summed)
                    dot_rows(&gK[n, s, t, od, oh, 0], &g[n, 0, od, oh, 0], goff,
                             &xr[n, 0, max(xd, 0), max(xh, 0), toff[t % kw]], xoff,
                             np_ if xd >= 0 and xh >= 0 else 0, Wo, 0)
        free(goff)
        free(xoff)
    if failed:
        raise no_memory("dynamic kernel-gradient", nthreads)


def dynamic_grad_input(const floating[:, :, :, :, :, ::1] K, const floating[:, :, :, :, ::1] g,
                       floating[:, :, :, :, ::1] gxr, const Py_ssize_t[::1] cptr, const Py_ssize_t[::1] co,
                       const Py_ssize_t[::1] cs, const Py_ssize_t[::1] map_d, const Py_ssize_t[::1] map_h,
                       const Py_ssize_t[::1] toff, int kh, int kw, int sd, int sh, int dd, int dh, int nthreads):
    """Input gradient as a gather (deterministic, no atomics): row (c, xd, xh) of gxr, in the row layout of x,
    collects every output row whose taps read it, K[n, s, t, od, oh, :] * g[n, o, od, oh, :] added at toff[e].
    A unit owns its rows whole (n, plane xd, every channel). Zero padding: every plane and row of x sits at one padded
    position, so at most kd (od, ta) and kh (oh, tb) reach it."""
    cdef Py_ssize_t N = gxr.shape[0], C = gxr.shape[1], D = gxr.shape[2], H = gxr.shape[3], Wr = gxr.shape[4]
    cdef Py_ssize_t Do = g.shape[2], Ho = g.shape[3], T = K.shape[2], kd = T // (kh * kw)
    cdef Py_ssize_t Dp = map_d.shape[0], Hp = map_h.shape[0]
    cdef int Wo = <int>g.shape[4]
    cdef Py_ssize_t ks_s = K.strides[1] // sizeof(floating), kt = K.strides[2] // sizeof(floating)
    cdef Py_ssize_t ks_d = K.strides[3] // sizeof(floating), ks_h = K.strides[4] // sizeof(floating)
    cdef Py_ssize_t gs_c = g.strides[1] // sizeof(floating), gs_d = g.strides[2] // sizeof(floating)
    cdef Py_ssize_t gs_h = g.strides[3] // sizeof(floating)
    cdef Py_ssize_t maxpairs = 1, u, n, c, xd, xh, j, p, ta, tb, te, od, oh, nd, nh, id_, ih, nr
    cdef Py_ssize_t *koff
    cdef Py_ssize_t *goff
    cdef Py_ssize_t *dlist   # (od, ta) reaching plane xd
    cdef Py_ssize_t *hlist   # (oh, tb) reaching row xh
    cdef int failed = 0   # set by a thread whose buffers could not be allocated (see no_memory)
    cdef int *fail = &failed
    cdef bint ok
    for c in range(C):
        maxpairs = max(maxpairs, cptr[c + 1] - cptr[c])
    with nogil, parallel(num_threads=nthreads):
        koff = <Py_ssize_t *>malloc((maxpairs * kd * kh + 1) * sizeof(Py_ssize_t))
        goff = <Py_ssize_t *>malloc((maxpairs * kd * kh + 1) * sizeof(Py_ssize_t))
        dlist = <Py_ssize_t *>malloc((2 * kd + 1) * sizeof(Py_ssize_t))
        hlist = <Py_ssize_t *>malloc((2 * kh + 1) * sizeof(Py_ssize_t))
        ok = koff != NULL and goff != NULL and dlist != NULL and hlist != NULL
        if not ok:
            fail[0] = 1
        for u in prange(N * D, schedule="static"):
            if not ok:
                continue
            xd = u % D
            n = u // D
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
                for c in range(C):   # inner: the channels reuse this row's kernel-field rows from cache
                    memset(&gxr[n, c, xd, xh, 0], 0, Wr * sizeof(floating))
                    nr = 0   # rows for tap e = 0; tap e adds e * kt to every kernel-field offset
                    for id_ in range(nd):
                        for ih in range(nh):
                            for j in range(cptr[c], cptr[c + 1]):
                                koff[nr] = cs[j] * ks_s + (dlist[2 * id_ + 1] * kh + hlist[2 * ih + 1]) * kw * kt \
                                    + dlist[2 * id_] * ks_d + hlist[2 * ih] * ks_h
                                goff[nr] = co[j] * gs_c + dlist[2 * id_] * gs_d + hlist[2 * ih] * gs_h
                                nr = nr + 1
                    if nr:
                        for te in range(kw):
                            dot_rows(&gxr[n, c, xd, xh, toff[te]], &K[n, 0, 0, 0, 0, 0] + te * kt, koff,
                                     &g[n, 0, 0, 0, 0], goff, nr, Wo, 1)
        free(koff)
        free(goff)
        free(dlist)
        free(hlist)
    if failed:
        raise no_memory("dynamic input-gradient", nthreads)


def adaptive_gaussian(const floating[:, :, ::1] xp, const floating[:, :, :, ::1] gd,
                      const floating[:, :, :, ::1] gh, const floating[:, :, :, ::1] gw, floating[:, :, ::1] out,
                      Py_ssize_t d0, int nthreads):
    """A separable kernel of its own at every voxel: out[d, h, w] = sum_a gd[a, d, h, w] sum_b gh[b, d, h, w]
    sum_e gw[e, d, h, w] xp[d0 + d + a, h + b, w + e] (xp: the volume padded by the kernels' radii; gd, gh, gw:
    every voxel's 1-D weights). The 3-D kernel is never formed: per row, the W sums, then H, then D, each a
    dot_rows, so a voxel costs kd*kh*kw + kd*kh + kd multiply-adds and the weights 3 small fields, not k^3."""
    cdef Py_ssize_t Ds = out.shape[0], H = out.shape[1], W = out.shape[2]
    cdef Py_ssize_t kd = gd.shape[0], kh = gh.shape[0], kw = gw.shape[0], u, od, oh, a, b, e
    cdef Py_ssize_t plane = gw.strides[0] // sizeof(floating)   # one weight's field to the next
    cdef Py_ssize_t *woff = <Py_ssize_t *>malloc(kw * sizeof(Py_ssize_t))
    cdef Py_ssize_t *xoff = <Py_ssize_t *>malloc(kw * sizeof(Py_ssize_t))
    cdef Py_ssize_t zero = 0
    cdef floating *tmp
    cdef floating *acc
    cdef int failed = 0   # set by a thread whose buffers could not be allocated (see no_memory)
    cdef int *fail = &failed
    cdef bint ok
    if woff == NULL or xoff == NULL:
        free(woff)
        free(xoff)
        raise no_memory("adaptive", 1)
    for e in range(kw):
        woff[e] = e * plane
        xoff[e] = e
    with nogil, parallel(num_threads=nthreads):
        tmp = <floating *>malloc(W * sizeof(floating))
        acc = <floating *>malloc(W * sizeof(floating))
        ok = tmp != NULL and acc != NULL
        if not ok:
            fail[0] = 1
        for u in prange(Ds * H, schedule="static"):
            if not ok:
                continue
            od = u // H
            oh = u % H
            for a in range(kd):
                for b in range(kh):
                    dot_rows(tmp, &gw[0, od, oh, 0], woff, &xp[d0 + od + a, oh + b, 0], xoff, kw, <int>W, 0)
                    dot_rows(acc, &gh[b, od, oh, 0], &zero, tmp, &zero, 1, <int>W, b > 0)
                dot_rows(&out[od, oh, 0], &gd[a, od, oh, 0], &zero, acc, &zero, 1, <int>W, a > 0)
        free(tmp)
        free(acc)
    free(woff)
    free(xoff)
    if failed:
        raise no_memory("adaptive", nthreads)
