# Sparse-kernel correlation: the cost follows the non-zero taps, not the kernel's box. Included after
# direct.pxi: the same work units and ring of padded planes as conv3d_direct; each output row is the
# one-tap corr_row over the rows its non-zero taps point at (a tap's W offset is a pointer offset), so the
# innermost loop stays a contiguous, register-blocked FMA over the row.


def sparse_conv3d_direct(const floating[:, :, :, :, ::1] x, const Py_ssize_t[::1] row_map, Py_ssize_t wlo,
                         bint unit_stride, const Py_ssize_t[::1] tap_ptr, const Py_ssize_t[::1] tap_c,
                         const Py_ssize_t[::1] tap_a, const Py_ssize_t[::1] tap_b, const Py_ssize_t[::1] tap_off,
                         const floating[::1] tap_w, const floating[::1] bias, floating[:, :, :, :, ::1] out,
                         const Py_ssize_t[::1] map_d, const Py_ssize_t[::1] map_h, Py_ssize_t Cg, Py_ssize_t kd,
                         int sd, int sh, int dd, int dh, Py_ssize_t nchunk, int nthreads):
    """out[n, o, od, oh, ow] = bias[o] + sum over the taps t of output channel o (tap_ptr[o] <= t <
    tap_ptr[o + 1]) of tap_w[t] * xp[n, g*Cg + tap_c[t], map_d[od*sd + tap_a[t]*dd],
    map_h[oh*sh + tap_b[t]*dh], ow + tap_off[t]]   (g = o's group; xp: rows laid out by row_map).

    tap_off is the tap's column offset in the padded row (the direct kernel's toff of its W index). Taps
    whose D or H position falls in zero padding are skipped per row."""
    cdef Py_ssize_t N = out.shape[0], O = out.shape[1], Do = out.shape[2], Ho = out.shape[3]
    cdef Py_ssize_t H = x.shape[3], W = x.shape[4], Wr = row_map.shape[0], G = x.shape[1] // Cg
    cdef int Wo = <int>out.shape[4]
    cdef Py_ssize_t Og, VL = vc_vector_bytes() // sizeof(floating), ds = (Wr + VL - 1) // VL * VL
    cdef Py_ssize_t S = (kd - 1) * dd + 1, plane = H * ds, per = (Do + nchunk - 1) // nchunk
    cdef size_t ring_bytes = ((Cg * S * plane + VL) * sizeof(floating) + 63) // 64 * 64
    cdef Py_ssize_t nmax = 1, nunit, u, n, g, k, od, oh, o, t, j, pos, xh
    cdef int nr
    cdef Py_ssize_t toff0[1]
    cdef floating *ring
    cdef Py_ssize_t *tags
    cdef const floating **rows
    cdef const floating **wts
    cdef int failed = 0   # set by a thread whose buffers could not be allocated (see no_memory)
    cdef int *fail = &failed
    cdef bint ok
    toff0[0] = 0
    Og = O // G
    for o in range(O):
        nmax = max(nmax, tap_ptr[o + 1] - tap_ptr[o])
    nunit = N * G * nchunk
    if nunit == 0 or Do == 0 or Ho == 0:
        return
    with nogil, parallel(num_threads=nthreads):
        ring = <floating *>aligned_alloc(64, ring_bytes)
        tags = <Py_ssize_t *>malloc(Cg * S * sizeof(Py_ssize_t))
        rows = <const floating **>malloc(nmax * sizeof(floating *))
        wts = <const floating **>malloc(nmax * sizeof(floating *))
        ok = ring != NULL and tags != NULL and rows != NULL and wts != NULL
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
                fill_ring(&x[n, g * Cg, 0, 0, 0], x.strides[1] // sizeof(floating),
                          x.strides[2] // sizeof(floating), Cg, kd, od * sd, dd, S, &map_d[0], H, W, &row_map[0],
                          Wr, wlo, unit_stride, ring, plane, ds, tags)
                for oh in range(Ho):
                    for o in range(g * Og, (g + 1) * Og):
                        nr = 0
                        for t in range(tap_ptr[o], tap_ptr[o + 1]):
                            pos = od * sd + tap_a[t] * dd
                            xh = map_h[oh * sh + tap_b[t] * dh]
                            if map_d[pos] >= 0 and xh >= 0:
                                rows[nr] = ring + (tap_c[t] * S + pos % S) * plane + xh * ds + tap_off[t]
                                wts[nr] = &tap_w[t]
                                nr = nr + 1
                        if floating is float:
                            corr_row_f32(&out[n, o, od, oh, 0], 0, 1, rows, wts, nr, 1, toff0, Wo, &bias[o], 0)
                        else:
                            corr_row_f64(&out[n, o, od, oh, 0], 0, 1, rows, wts, nr, 1, toff0, Wo, &bias[o], 0)
        free(ring)
        free(tags)
        free(rows)
        free(wts)
    if failed:
        raise no_memory("sparse", nthreads)
