# The exact windowed bilateral filter (ops/bilateral.py): each output row through bilateral_row (bilateral_impl.h),
# whose weights are made in registers, tap by tap, from the spatial term and the guide. Included by the
# _compiled_*.pyx stubs. engine/bilateral.py pads the volume, the guide and the validity by the window's radii and
# builds the taps' offsets and spatial terms.

cdef extern from "simd.h" nogil:
    void bilateral_row_f32(float *out, const float *x, const float *g, const float *m, const Py_ssize_t *off,
                           const float *a, int ntaps, float b, int n)
    void bilateral_row_f64(double *out, const double *x, const double *g, const double *m, const Py_ssize_t *off,
                           const double *a, int ntaps, double b, int n)


def bilateral(const floating[:, :, ::1] xp, const floating[:, :, ::1] gp, const floating[:, :, ::1] mp,
              const Py_ssize_t[::1] off, const floating[::1] a, floating b, floating[:, :, ::1] out,
              Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t r2, int nthreads):
    """out[d, h, w] = the bilateral average around xp[d + r0, h + r1, w + r2]: taps at offsets off (in elements
    of the padded arrays xp, gp, mp, all of one shape), spatial terms a, range factor b. mp: None (every voxel
    valid) or 0/1 per padded voxel (an invalid voxel must hold 0 in xp and gp). Rows are the work units."""
    cdef Py_ssize_t D = out.shape[0], H = out.shape[1], u, d, h
    cdef int W = <int>out.shape[2], ntaps = <int>off.shape[0]
    cdef const floating *m = NULL
    if D == 0 or H == 0 or W == 0:
        return
    if mp is not None:
        m = &mp[0, 0, 0]
    cdef Py_ssize_t ps = xp.strides[0] // sizeof(floating), rs = xp.strides[1] // sizeof(floating)
    cdef Py_ssize_t centre = r0 * ps + r1 * rs + r2, c
    for u in prange(D * H, nogil=True, schedule="static", num_threads=nthreads):
        d = u // H
        h = u % H
        c = d * ps + h * rs + centre
        if floating is float:
            bilateral_row_f32(&out[d, h, 0], &xp[0, 0, 0] + c, &gp[0, 0, 0] + c, NULL if m == NULL else m + c,
                              &off[0], &a[0], ntaps, b, W)
        else:
            bilateral_row_f64(&out[d, h, 0], &xp[0, 0, 0] + c, &gp[0, 0, 0] + c, NULL if m == NULL else m + c,
                              &off[0], &a[0], ntaps, b, W)
