# Per-voxel measures of the Gaussian Hessian's eigenvalues (engine/hessian.py: Frangi, Sato, Meijering, the
# eigenvalues), from the six components of a slab straight to the running maximum, no eigenvalue array between.
# The arithmetic is hessian_impl.h's, in double. Included by the _compiled_*.pyx stubs.

cdef extern from "hessian_impl.h" nogil:
    void vc_hessian_measure(const double *h, int kind, double a, double b, double c, double *res)


def hessian_measure(const floating[:, :, ::1] h00, const floating[:, :, ::1] h01, const floating[:, :, ::1] h02,
                    const floating[:, :, ::1] h11, const floating[:, :, ::1] h12, const floating[:, :, ::1] h22,
                    floating[:, :, ::1] out, floating[:, :, ::1] out2, floating[:, :, ::1] out3, int kind,
                    double sign, double a, double b, double c, int nthreads):
    """engine/hessian.measure's kernel; kinds 0 (Frangi) and 2 (Sato) take the maximum with out, 1 writes out
    and out2, 3 writes out2, 4 writes out, out2, out3, 5 (the norm) out. Every array of one shape; rows are
    the work units."""
    cdef Py_ssize_t D = out.shape[0], H = out.shape[1], W = out.shape[2], u
    if D == 0 or H == 0 or W == 0:
        return
    cdef const floating *p00 = &h00[0, 0, 0]
    cdef const floating *p01 = &h01[0, 0, 0]
    cdef const floating *p02 = &h02[0, 0, 0]
    cdef const floating *p11 = &h11[0, 0, 0]
    cdef const floating *p12 = &h12[0, 0, 0]
    cdef const floating *p22 = &h22[0, 0, 0]
    cdef floating *o1 = &out[0, 0, 0]
    cdef floating *o2 = &out2[0, 0, 0]
    cdef floating *o3 = &out3[0, 0, 0]
    for u in prange(D * H, nogil=True, schedule="static", num_threads=nthreads):
        _measure_row(p00, p01, p02, p11, p12, p22, o1, o2, o3, u * W, W, kind, sign, a, b, c)


cdef inline void _measure_row(const floating *h00, const floating *h01, const floating *h02, const floating *h11,
                              const floating *h12, const floating *h22, floating *out, floating *out2,
                              floating *out3, Py_ssize_t start, Py_ssize_t W, int kind, double sign, double a,
                              double b, double c) noexcept nogil:
    cdef double h[6]
    cdef double res[3]
    cdef Py_ssize_t k
    cdef floating v
    for k in range(start, start + W):
        h[0] = sign * h00[k]
        h[1] = sign * h01[k]
        h[2] = sign * h02[k]
        h[3] = sign * h11[k]
        h[4] = sign * h12[k]
        h[5] = sign * h22[k]
        vc_hessian_measure(h, kind, a, b, c, res)
        if kind == 0 or kind == 2:
            v = <floating>res[0]
            if v > out[k]:
                out[k] = v
        elif kind == 5:
            out[k] = <floating>res[0]
        elif kind == 1:
            out[k] = <floating>res[0]
            out2[k] = <floating>res[1]
        elif kind == 3:
            out2[k] = <floating>res[0]
        else:
            out[k] = <floating>res[0]
            out2[k] = <floating>res[1]
            out3[k] = <floating>res[2]
