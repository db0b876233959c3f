# Fused separable correlation: three 1-D passes in one pass over memory. Included after direct.pxi (it reuses
# pad_plane and corr_row for the W pass); the H and D passes are fir_rows (fir_impl.h), P output rows at once.

cdef extern from "simd.h" nogil:
    int fir_rows_max_f32()
    int fir_taps_f32(int *tap, int np, int s, int d, int k)
    void fir_rows_f32(float *out, Py_ssize_t ocs, int np, const float *const *rows, int nin, const int *tap,
                      const float *f, int Wo, int add)
    void fir_rows_f64(double *out, Py_ssize_t ocs, int np, const double *const *rows, int nin, const int *tap,
                      const double *f, int Wo, int add)
    int sym_rows_max_f32()
    void sym_rows_f32(float *out, Py_ssize_t ocs, int np, const float *const *rows, int k, const float *h, int Wo,
                      int add)
    void sym_rows_f64(double *out, Py_ssize_t ocs, int np, const double *const *rows, int k, const double *h,
                      int Wo, int add)
    void sym_row_f32(float *out, const float *x, int k, const float *h, int Wv)
    void sym_row_f64(double *out, const double *x, int k, const double *h, int Wv)
    void vc_prefetch_range(const void *p, size_t bytes)


def fir_rows_max():
    return fir_rows_max_f32()


def separable_conv3d(const floating[:, :, :, :, ::1] x, const floating[:, ::1] fd, const floating[:, ::1] fh,
                     const floating[:, ::1] fw, const Py_ssize_t[::1] map_d, const Py_ssize_t[::1] map_h,
                     const Py_ssize_t[::1] row_map, Py_ssize_t wlo, bint unit_stride, const Py_ssize_t[::1] toff,
                     bint unit_taps, int sd, int sh, int dd, int dh, floating[:, :, :, :, ::1] out,
                     Py_ssize_t hb, Py_ssize_t nchunk, int nthreads, int sym=0, const floating[:, ::1] hd=None,
                     const floating[:, ::1] hh=None, const floating[:, ::1] hw=None):
    """out[n, c, od, oh, ow] = sum over terms t and a, b, e of fd[f, a] * fh[f, b] * fw[f, e] *
                               xp[n, c, map_d[od*sd + a*dd], map_h[oh*sh + b*dh], ow + toff[e]],  f = t*C + c
    (xp: x's rows laid out by row_map, as in conv3d_direct). The factors hold T = rows / C rank-1 terms per
    channel: a unit keeps one ring per term and adds the terms' D passes into its output rows.

    Work unit: (n, c, tile of hb output rows, chunk of output planes), output planes P at a time. Each input
    plane the unit needs is filtered along H (P rows at a time), laid out along W, filtered along W, and kept
    in a ring of (P - 1) * sd + (kd - 1) * dd + 1 tiles (slot = padded D position mod ring size; the caller
    sizes hb so that the ring stays in L2); P output planes are then filtered along D from the ring. The
    volume is read once (plus the tile's H halo) and the output written once: no intermediate volume.

    sym: bit 0 / 1 / 2 when every D / H / W factor is symmetric (unit stride and dilation on that axis): that
    pass runs sym_rows / sym_row with the half taps hd / hh / hw ((k + 1) // 2 each, the centre halved)."""
    cdef Py_ssize_t N = out.shape[0], C = out.shape[1], Do = out.shape[2], Ho = out.shape[3]
    cdef Py_ssize_t H = x.shape[3], W = x.shape[4], Wr = row_map.shape[0]
    cdef int Wo = <int>out.shape[4], kw = <int>fw.shape[1], kd = <int>fd.shape[1], kh = <int>fh.shape[1]
    cdef int P = fir_rows_max_f32(), SP = sym_rows_max_f32()
    cdef int PH = SP if sym & 2 else P   # output rows per H-pass call
    cdef Py_ssize_t T = fd.shape[0] // out.shape[1]
    cdef Py_ssize_t VL = vc_vector_bytes() // sizeof(floating)
    # the W pass with unit taps fills whole vectors of the ring row (the aligned shift kernel, no ragged tail):
    # it reads at most dsr + kw - 1 + 2 VL columns of its padded row, which dsw leaves room for
    cdef int Ww = <int>((Wo + VL - 1) // VL * VL) if unit_taps else Wo
    cdef Py_ssize_t dsr = (Wo + VL - 1) // VL * VL, dsw = (max(Wr, W) + VL - 1) // VL * VL + 3 * VL
    cdef Py_ssize_t S = (P - 1) * sd + (kd - 1) * dd + 1, ntile = (Ho + hb - 1) // hb
    cdef Py_ssize_t per = (Do + nchunk - 1) // nchunk, ocs = out.strides[2] // sizeof(floating)
    cdef Py_ssize_t nunit = N * C * ntile * nchunk
    cdef Py_ssize_t nmax = max((P - 1) * sd + (kd - 1) * dd + 1, (P - 1) * sh + (kh - 1) * dh + 1)
    cdef Py_ssize_t i, j, r, u, n, c, t, k, od, od1, oh, oh0, oh1, p, pos, slot, xd, xh, tt, f, nxt, nin
    cdef floating *ringt
    cdef Py_ssize_t *tagst
    cdef int *tap_h
    cdef int *tap_d
    cdef int *tabs   # (np, nin) the H table and the D table were built for
    cdef int np, nq, q
    cdef floating *ring
    cdef floating *zeros
    cdef floating *hbuf
    cdef floating *hrow
    cdef floating *tmp
    cdef Py_ssize_t hw0 = wlo if unit_stride else 0   # the H pass writes its rows' middles at column hw0
    cdef Py_ssize_t *tags
    cdef const floating **rows
    cdef floating **dtile
    cdef const floating **wts
    cdef int failed = 0   # set by a thread whose buffers could not be allocated (see no_memory)
    cdef int *fail = &failed
    cdef bint ok
    if nunit == 0 or Do == 0 or Ho == 0 or Wo == 0:
        return
    with nogil, parallel(num_threads=nthreads):
        ring = <floating *>aligned_alloc(64, (T * S * hb * dsr * sizeof(floating) + 63) // 64 * 64)
        tap_h = <int *>malloc(nmax * P * sizeof(int))   # fir_rows' tap tables, rebuilt when np changes
        tap_d = <int *>malloc(nmax * P * sizeof(int))
        tabs = <int *>malloc(4 * sizeof(int))
        zeros = <floating *>aligned_alloc(64, dsw * sizeof(floating))   # dsw: a multiple of 16 floats
        hbuf = <floating *>aligned_alloc(64, P * dsw * sizeof(floating))
        tmp = <floating *>aligned_alloc(64, dsw * sizeof(floating))
        tags = <Py_ssize_t *>malloc(T * S * sizeof(Py_ssize_t))
        rows = <const floating **>malloc(nmax * sizeof(floating *))
        dtile = <floating **>malloc(nmax * sizeof(floating *))
        wts = <const floating **>malloc(sizeof(floating *))
        ok = ring != NULL and tap_h != NULL and tap_d != NULL and tabs != NULL and zeros != NULL \
            and hbuf != NULL and tmp != NULL and tags != NULL and rows != NULL and dtile != NULL and wts != NULL
        if ok:
            tabs[0] = tabs[2] = -1
            for j in range(dsw):  # past the padded row (read by the W pass's last vectors): finite
                zeros[j] = 0
                tmp[j] = 0
            for j in range(P * dsw):   # past the padded rows: finite
                hbuf[j] = 0
        else:
            fail[0] = 1
        for u in prange(nunit, schedule="dynamic"):
            if not ok:
                continue
            k = u % nchunk
            t = (u // nchunk) % ntile
            c = (u // (nchunk * ntile)) % C
            n = u // (nchunk * ntile * C)
            oh0 = t * hb
            oh1 = min(Ho, oh0 + hb)
            od1 = min(Do, (k + 1) * per)
            for i in range(T * S):
                tags[i] = -1
            od = k * per
            while od < od1:
                np = <int>min(P, od1 - od)
                for tt in range(T):
                    f = tt * C + c
                    ringt = ring + tt * S * hb * dsr
                    tagst = tags + tt * S
                    for i in range((np - 1) * sd + (kd - 1) * dd + 1):  # the planes these need, into the ring
                        pos = od * sd + i
                        xd = map_d[pos]
                        slot = pos % S
                        if xd < 0 or tagst[slot] == pos:
                            continue
                        tagst[slot] = pos
                        # the plane read two planes on (prefetched: measured better than one or three ahead)
                        nxt = map_d[pos + 2] if pos + 2 < map_d.shape[0] else -1
                        r = oh0
                        while r < oh1:  # H pass, PH rows at a time
                            nq = <int>min(PH, oh1 - r)
                            nin = (nq - 1) * sh + (kh - 1) * dh + 1
                            for p in range(nin):
                                xh = map_h[r * sh + p]
                                rows[p] = &x[n, c, xd, xh, 0] if xh >= 0 else zeros
                                # the same rows of that plane into cache, paced with the work (read down the
                                # columns, they escape the hardware prefetchers): all at the tile's top
                                if nxt >= 0 and xh >= 0 and (r == oh0 or p >= nin - nq * sh):
                                    vc_prefetch_range(&x[n, c, nxt, xh, 0], W * sizeof(floating))
                            if sym & 2:
                                if floating is float:
                                    sym_rows_f32(hbuf + hw0, dsw, nq, rows, kh, &hh[f, 0], <int>W, 0)
                                else:
                                    sym_rows_f64(hbuf + hw0, dsw, nq, rows, kh, &hh[f, 0], <int>W, 0)
                            else:
                                if nq != tabs[0]:
                                    tabs[0], tabs[1] = nq, fir_taps_f32(tap_h, nq, sh, dh, kh)
                                if floating is float:
                                    fir_rows_f32(hbuf + hw0, dsw, nq, rows, tabs[1], tap_h, &fh[f, 0], <int>W, 0)
                                else:
                                    fir_rows_f64(hbuf + hw0, dsw, nq, rows, tabs[1], tap_h, &fh[f, 0], <int>W, 0)
                            for p in range(nq):  # W pass of each row: padded by row_map, kw taps
                                if unit_stride:   # the H pass wrote the row's middle in place: pad its ends
                                    hrow = hbuf + p * dsw
                                    pad_ends(hrow, W, &row_map[0], Wr, wlo)
                                else:
                                    pad_plane(hbuf + p * dsw, 1, W, &row_map[0], Wr, wlo, unit_stride, tmp, Wr)
                                    hrow = tmp
                                rows[0] = hrow
                                wts[0] = &fw[f, 0]
                                if sym & 4:
                                    if floating is float:
                                        sym_row_f32(ringt + (slot * hb + r + p - oh0) * dsr, hrow, kw, &hw[f, 0], Ww)
                                    else:
                                        sym_row_f64(ringt + (slot * hb + r + p - oh0) * dsr, hrow, kw, &hw[f, 0], Ww)
                                elif floating is float:
                                    corr_row_f32(ringt + (slot * hb + r + p - oh0) * dsr, 0, 1, rows, wts, 1, kw,
                                                 &toff[0], Ww, zeros, unit_taps)
                                else:
                                    corr_row_f64(ringt + (slot * hb + r + p - oh0) * dsr, 0, 1, rows, wts, 1, kw,
                                                 &toff[0], Ww, zeros, unit_taps)
                            r = r + PH
                    for i in range((np - 1) * sd + (kd - 1) * dd + 1):   # the D pass's input tiles (or zeros)
                        pos = od * sd + i
                        dtile[i] = ringt + (pos % S) * hb * dsr if map_d[pos] >= 0 else NULL
                    for oh in range(oh0, oh1):  # D pass: np output planes from the ring; later terms add
                        for i in range((np - 1) * sd + (kd - 1) * dd + 1):
                            rows[i] = dtile[i] + (oh - oh0) * dsr if dtile[i] != NULL else zeros
                        if sym & 1:   # SP planes at a time; the first term writes the output rows, the others add
                            q = 0
                            while q < np:
                                if floating is float:
                                    sym_rows_f32(&out[n, c, od + q, oh, 0], ocs, min(SP, np - q), rows + q, kd,
                                                 &hd[f, 0], Wo, tt > 0)
                                else:
                                    sym_rows_f64(&out[n, c, od + q, oh, 0], ocs, min(SP, np - q), rows + q, kd,
                                                 &hd[f, 0], Wo, tt > 0)
                                q = q + SP
                            continue
                        if np != tabs[2]:
                            tabs[2], tabs[3] = np, fir_taps_f32(tap_d, np, sd, dd, kd)
                        if floating is float:   # the first term writes the output rows, the others add
                            fir_rows_f32(&out[n, c, od, oh, 0], ocs, np, rows, tabs[3], tap_d, &fd[f, 0], Wo,
                                         tt > 0)
                        else:
                            fir_rows_f64(&out[n, c, od, oh, 0], ocs, np, rows, tabs[3], tap_d, &fd[f, 0], Wo,
                                         tt > 0)
                od = od + P
        free(ring)
        free(tap_h)
        free(tap_d)
        free(tabs)
        free(zeros)
        free(hbuf)
        free(tmp)
        free(tags)
        free(rows)
        free(dtile)
        free(wts)
    if failed:
        raise no_memory("separable", nthreads)
