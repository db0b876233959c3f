# Nested chains of 'same' convolutions (stride 1, zero padding) in one pass over the volume's planes: stage s
# of the chain consumes planes of stage s - 1 as soon as the ones it needs exist, so every intermediate lives
# only in a ring of kd planes, never as a volume. Included by the _compiled_*.pyx stubs.
#
# Work unit: (batch item, group, chunk of output planes), each thread with its own rings, no barriers. A unit
# walks steps t: x plane t into stage 0's ring, then stage s computes its plane t - lag[s] (lag[s]: the planes
# stages 0..s look ahead, summed) when the unit's chunk needs it (the chunk widened by the later stages' reach:
# a chunk after the first recomputes those few planes, the price of independent units).
#
# Per stage s (int64 rows of `meta`): C_in, C_out, kd, kh, kw, OB, weight offset, bias offset, lag, reach before,
# reach after (planes of this stage's output the later stages need beyond a chunk, before and after).
# Weights flat, stage s at its offset as (G, C_out/G/OB, C_in/G, kd, kh, kw, OB); biases flat at theirs.
# Ring of stage s: C_in/G channels x kd slots x H rows of ds columns, the row at column (kw - 1) // 2 and zero
# around it (the W padding); a plane q sits in slot q % kd; planes outside the volume are skipped (zeros).

from libc.math cimport erf, erff, exp, expf
from libc.string cimport memset

cdef enum:
    ACT_NONE = 0
    ACT_RELU = 1
    ACT_GELU = 2
    ACT_SILU = 3


cdef inline void activate(floating *v, Py_ssize_t n, int act) noexcept nogil:
    """act in place on n values: relu, gelu (erf form, torch's default) or silu; NaN stays NaN, as in torch."""
    cdef Py_ssize_t i
    if act == ACT_RELU:
        for i in range(n):
            v[i] = 0 if v[i] < 0 else v[i]   # not `v > 0 ? v : 0`, which turns NaN into 0
    elif act == ACT_GELU:
        for i in range(n):
            if floating is float:
                v[i] = 0.5 * v[i] * (1 + erff(v[i] * <float>0.7071067811865476))
            else:
                v[i] = 0.5 * v[i] * (1 + erf(v[i] * 0.7071067811865476))
    elif act == ACT_SILU:
        for i in range(n):
            if floating is float:
                v[i] = v[i] / (1 + expf(-v[i]))
            else:
                v[i] = v[i] / (1 + exp(-v[i]))


def nested_conv3d_direct(const floating[:, :, :, :, ::1] x, const floating[::1] wflat,
                         const floating[::1] bflat, const long long[:, ::1] meta, int G, int act,
                         floating[:, :, :, :, ::1] out, Py_ssize_t nchunk, int nthreads):
    """out = stage[L-1](act(... act(stage[0](x)))), every stage a grouped correlation with 'same' zero padding
    (the (k - 1) // 2 planes before, k // 2 after, on each axis) and stride 1. See the file's header."""
    cdef Py_ssize_t N = x.shape[0], D = x.shape[2], H = x.shape[3], W = x.shape[4]
    cdef Py_ssize_t L = meta.shape[0], VL = vc_vector_bytes() // sizeof(floating)
    cdef Py_ssize_t per = (D + nchunk - 1) // nchunk, nunit = N * G * nchunk
    cdef Py_ssize_t s, n, t, u, c, a, b, j, q, hh, p, g, k, ob, oh, o0, cin, kd, kh, OB, Cg, nOB, c0, c1
    cdef Py_ssize_t lo_d, lo_h, ocs, ors, first, last, maxrows = 1, maxkw = 1, total = 0
    cdef int nr, kw, done
    cdef bint paired
    cdef const floating *bias
    cdef const floating **wb
    cdef Py_ssize_t *ds = <Py_ssize_t *>malloc(L * sizeof(Py_ssize_t))
    cdef Py_ssize_t *roff = <Py_ssize_t *>malloc(L * sizeof(Py_ssize_t))   # ring s at rings + roff[s]
    cdef Py_ssize_t *toff
    cdef floating *rings
    cdef floating *dst
    cdef const floating *wbase
    cdef const floating **rows
    cdef const floating **wts
    cdef int failed = 0   # set by a thread whose buffers could not be allocated (see no_memory)
    cdef int *fail = &failed
    cdef bint ok
    if ds == NULL or roff == NULL:
        free(ds)
        free(roff)
        raise MemoryError("volconv's nested kernel could not allocate its stage tables")
    for s in range(L):
        cin, kd, kh, kw = meta[s, 0] // G, meta[s, 2], meta[s, 3], meta[s, 4]
        ds[s] = (W + kw - 1 + VL - 1) // VL * VL
        roff[s] = total
        total = total + (cin * kd * H * ds[s] + VL - 1) // VL * VL
        maxrows = max(maxrows, cin * kd * (kh + 1))   # kh + 1: two output rows at a time
        maxkw = max(maxkw, kw)
    toff = <Py_ssize_t *>malloc(maxkw * sizeof(Py_ssize_t))
    if toff == NULL:
        free(ds)
        free(roff)
        raise MemoryError("volconv's nested kernel could not allocate its tap table")
    for j in range(maxkw):
        toff[j] = j   # tap e at column e (W stride 1)
    with nogil, parallel(num_threads=nthreads):
        rings = <floating *>aligned_alloc(64, ((total + VL) * sizeof(floating) + 63) // 64 * 64)  # + VL: read ahead
        rows = <const floating **>malloc(maxrows * sizeof(floating *))
        wts = <const floating **>malloc(maxrows * sizeof(floating *))
        wb = <const floating **>malloc(maxrows * sizeof(floating *))
        ok = rings != NULL and rows != NULL and wts != NULL and wb != NULL
        if ok:
            memset(rings, 0, (total + VL) * sizeof(floating))   # the W padding columns stay zero for good
        else:
            fail[0] = 1
        for u in prange(nunit, schedule="static"):
            if not ok:
                continue
            k = u % nchunk
            g = (u // nchunk) % G
            n = u // (nchunk * G)
            c0, c1 = k * per, min(D, (k + 1) * per)
            first = max(0, c0 - meta[0, 9] - (meta[0, 2] - 1) // 2)   # the x planes this chunk reads
            last = min(D, c1 + meta[0, 10] + meta[0, 2] // 2)
            for t in range(first, last + meta[L - 1, 8]):
                if t < last:   # x plane t into stage 0's ring
                    cin, kd, kw = meta[0, 0] // G, meta[0, 2], meta[0, 4]
                    for c in range(cin):
                        for hh in range(H):
                            memcpy(rings + ((c * kd + t % kd) * H + hh) * ds[0] + (kw - 1) // 2,
                                   &x[n, g * cin + c, t, hh, 0], W * sizeof(floating))
                for s in range(L):
                    p = t - meta[s, 8]
                    if p < max(0, c0 - meta[s, 9]) or p >= min(D, c1 + meta[s, 10]):
                        continue
                    Cg, kd, kh, kw, OB = meta[s, 0] // G, meta[s, 2], meta[s, 3], meta[s, 4], meta[s, 5]
                    nOB = meta[s, 1] // G // OB
                    lo_d, lo_h = (kd - 1) // 2, (kh - 1) // 2
                    for ob in range(nOB):
                        paired = False
                        for oh in range(H):
                            if paired:   # computed with the row before
                                paired = False
                                continue
                            o0 = ob * OB   # within the group
                            if s + 1 < L:   # into the next stage's ring, then the activation
                                ocs = meta[s + 1, 2] * H * ds[s + 1]
                                ors = ds[s + 1]
                                dst = rings + roff[s + 1] + (o0 * meta[s + 1, 2] + p % meta[s + 1, 2]) * H * ds[s + 1] \
                                    + oh * ds[s + 1] + (meta[s + 1, 4] - 1) // 2
                            else:
                                ocs = out.strides[1] // sizeof(floating)
                                ors = out.strides[3] // sizeof(floating)
                                dst = &out[n, g * (meta[s, 1] // G) + o0, p, oh, 0]
                            bias = &bflat[meta[s, 7] + g * (meta[s, 1] // G) + o0]
                            done = 0
                            if OB == 1 and nOB == 1 and oh + 1 < H:   # rows oh, oh + 1 share their input rows
                                nr = 0
                                for c in range(Cg):
                                    for a in range(kd):
                                        q = p - lo_d + a
                                        if q < 0 or q >= D:
                                            continue
                                        wbase = &wflat[meta[s, 6] + (((g * Cg + c) * kd + a) * kh) * kw]
                                        for b in range(kh + 1):
                                            hh = oh - lo_h + b
                                            if hh < 0 or hh >= H:
                                                continue
                                            rows[nr] = rings + roff[s] + ((c * kd + q % kd) * H + hh) * ds[s]
                                            wts[nr] = wbase + b * kw if b < kh else NULL     # feeds row oh + 1 only
                                            wb[nr] = wbase + (b - 1) * kw if b > 0 else NULL  # feeds row oh only
                                            nr = nr + 1
                                if floating is float:
                                    done = corr_rows2_f32(dst, ors, rows, wts, wb, nr, kw, toff, <int>W, bias[0])
                                else:
                                    done = corr_rows2_f64(dst, ors, rows, wts, wb, nr, kw, toff, <int>W, bias[0])
                            if done:
                                paired = True
                                if s + 1 < L and act != ACT_NONE:
                                    activate(dst, W, act)
                                    activate(dst + ors, W, act)
                                continue
                            nr = 0
                            for c in range(Cg):
                                for a in range(kd):
                                    q = p - lo_d + a
                                    if q < 0 or q >= D:
                                        continue
                                    wbase = &wflat[meta[s, 6] + ((((g * nOB + ob) * Cg + c) * kd + a) * kh) * kw * OB]
                                    for b in range(kh):
                                        hh = oh - lo_h + b
                                        if hh < 0 or hh >= H:
                                            continue
                                        rows[nr] = rings + roff[s] + ((c * kd + q % kd) * H + hh) * ds[s]
                                        wts[nr] = wbase + b * kw * OB
                                        nr = nr + 1
                            if floating is float:
                                corr_row_f32(dst, ocs, <int>OB, rows, wts, nr, kw, toff, <int>W, bias, 1)
                            else:
                                corr_row_f64(dst, ocs, <int>OB, rows, wts, nr, kw, toff, <int>W, bias, 1)
                            if s + 1 < L and act != ACT_NONE:
                                for j in range(OB):
                                    activate(dst + j * ocs, W, act)
        free(rings)
        free(rows)
        free(wts)
        free(wb)
    free(ds)
    free(roff)
    free(toff)
    if failed:
        raise no_memory("nested", nthreads)
