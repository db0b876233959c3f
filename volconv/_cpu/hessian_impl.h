/* Per-voxel measures of a symmetric 3x3 matrix's eigenvalues (the Gaussian Hessian's: engine/hessian.py), in
 * double whatever the volume's type. Plain C, no SIMD: the three builds compile it alike. No include guard
 * needed beyond this one. */
#ifndef VC_HESSIAN_IMPL_H
#define VC_HESSIAN_IMPL_H
#include <math.h>

/* One Jacobi rotation zeroing apq (Numerical Recipes' jacobi): r is the third index, arp = a[r][p], arq = a[r][q]. */
static inline void vc_jacobi_rotate(double *app, double *aqq, double *apq, double *arp, double *arq)
{
    if (*apq == 0.0)
        return;
    double theta = (*aqq - *app) / (2.0 * *apq);
    double t = fabs(theta) > 1e150 ? 0.5 / theta
                                   : (theta >= 0.0 ? 1.0 : -1.0) / (fabs(theta) + sqrt(theta * theta + 1.0));
    double c = 1.0 / sqrt(t * t + 1.0), s = t * c, rp = *arp, rq = *arq;
    *app -= t * *apq;
    *aqq += t * *apq;
    *apq = 0.0;
    *arp = c * rp - s * rq;
    *arq = s * rp + c * rq;
}

/* Eigenvalues of [[a b c] [b d e] [c e f]], largest first. The trigonometric solution of the characteristic
 * cubic on the matrix shifted by its mean eigenvalue q and scaled by p (no cube can overflow) is exact to a few
 * ulps of p except where two eigenvalues nearly coincide (acos near +-1: an error of about p sqrt(2^-52) =
 * 1.5e-8 p, which Frangi's absolute clip at 1e-10 would see); there (|r| > 1 - 1e-3: the error bound has
 * grown past 30 ulps) cyclic Jacobi rotations take over, accurate to a few ulps of the norm in every case
 * (zeros, multiples of I, double eigenvalues). */
static inline void vc_eig3(double a, double b, double c, double d, double e, double f, double *l)
{
    double q = (a + d + f) / 3.0, off = b * b + c * c + e * e;
    double a0 = a - q, d0 = d - q, f0 = f - q;
    double p = sqrt((a0 * a0 + d0 * d0 + f0 * f0 + 2.0 * off) / 6.0), t;
    if (p > 0.0 && off > 0.0) {
        double s = 1.0 / p;
        double as = a0 * s, ds = d0 * s, fs = f0 * s, bs = b * s, cs = c * s, es = e * s;
        double r = 0.5 * (as * (ds * fs - es * es) - bs * (bs * fs - es * cs) + cs * (bs * es - ds * cs));
        if (fabs(r) < 1.0 - 1e-3) {
            double phi = acos(r) / 3.0;
            /* cos(phi + 2 pi / 3) = -cos(phi) / 2 - sin(phi) sqrt(3) / 2: one sincos (gcc merges the calls) */
            double cs2 = cos(phi), sn = sin(phi);
            l[0] = q + 2.0 * p * cs2;
            l[2] = q - p * (cs2 + 1.7320508075688772 * sn);
            l[1] = 3.0 * q - l[0] - l[2];
            if (l[1] > l[0]) l[1] = l[0];   /* rounding may step past its neighbours */
            if (l[1] < l[2]) l[1] = l[2];
            return;
        }
        for (int sweep = 0; sweep < 32; sweep++) {
            double diag = a * a + d * d + f * f;
            if (b * b + c * c + e * e <= 1e-40 * diag || (b == 0.0 && c == 0.0 && e == 0.0))
                break;
            vc_jacobi_rotate(&a, &d, &b, &c, &e);   /* (0, 1); r = 2: a20 = c, a21 = e */
            vc_jacobi_rotate(&a, &f, &c, &b, &e);   /* (0, 2); r = 1: a10 = b, a12 = e */
            vc_jacobi_rotate(&d, &f, &e, &b, &c);   /* (1, 2); r = 0: a01 = b, a02 = c */
        }
    }
    /* diagonal (or made so): sorted */
    l[0] = a; l[1] = d; l[2] = f;
    if (l[0] < l[1]) { t = l[0]; l[0] = l[1]; l[1] = t; }
    if (l[1] < l[2]) { t = l[1]; l[1] = l[2]; l[2] = t; }
    if (l[0] < l[1]) { t = l[0]; l[0] = l[1]; l[1] = t; }
}

enum { VC_FRANGI = 0, VC_FRANGI_PARTS = 1, VC_SATO = 2, VC_MEIJERING = 3, VC_EIGVALS = 4, VC_NORM = 5 };

/* res[0..2] by kind (see engine/hessian.measure): FRANGI res[0] = vesselness; FRANGI_PARTS res[0] = plate *
 * blob, res[1] = s; NORM res[0] = s; SATO res[0]; MEIJERING res[0]; EIGVALS the eigenvalues. h: the six
 * components, times sign.
 * skimage's rules: Frangi sorts by magnitude (a stable sort of the descending eigenvalues), clips the two larger
 * at 1e-10; Sato takes the two largest clipped at 0; Meijering the first of largest magnitude of M l. */
static inline void vc_hessian_measure(const double *h, int kind, double a, double b, double c, double *res)
{
    double l[3];
    res[0] = res[1] = res[2] = 0.0;
    if (kind == VC_NORM) {   /* the Frobenius norm: the root of the eigenvalues' squares, no eigenvalues needed */
        res[0] = sqrt(h[0] * h[0] + h[3] * h[3] + h[5] * h[5] + 2.0 * (h[1] * h[1] + h[2] * h[2] + h[4] * h[4]));
        return;
    }
    vc_eig3(h[0], h[1], h[2], h[3], h[4], h[5], l);
    if (kind == VC_EIGVALS) {
        res[0] = l[0]; res[1] = l[1]; res[2] = l[2];
        return;
    }
    if (kind == VC_SATO) {
        double u = l[0] > 0.0 ? l[0] : 0.0, v = l[1] > 0.0 ? l[1] : 0.0;
        res[0] = c * sqrt(u * v);
        return;
    }
    if (kind == VC_MEIJERING) {
        double t = l[0] + l[1] + l[2], best = 0.0, bestabs = -1.0;
        for (int k = 0; k < 3; k++) {
            double v = l[k] + a * (t - l[k]);
            if (fabs(v) > bestabs) { bestabs = fabs(v); best = v; }
        }
        res[0] = best > 0.0 ? best : 0.0;
        return;
    }
    /* Frangi: insertion sort by magnitude (stable, as numpy's argsort of three) */
    for (int i = 1; i < 3; i++) {
        double v = l[i];
        int j = i - 1;
        while (j >= 0 && fabs(l[j]) > fabs(v)) { l[j + 1] = l[j]; j--; }
        l[j + 1] = v;
    }
    double l2 = l[1] > 1e-10 ? l[1] : 1e-10, l3 = l[2] > 1e-10 ? l[2] : 1e-10;
    double ra = l2 / l3, rb2 = l[0] * l[0] / (l2 * l3);
    double s2 = l[0] * l[0] + l[1] * l[1] + l[2] * l[2];
    double blob = rb2 / (2.0 * b * b);   /* beyond 746 exp underflows to 0: the exps left would change nothing */
    double pb = blob > 746.0 ? 0.0 : (1.0 - exp(-ra * ra / (2.0 * a * a))) * exp(-blob);
    if (kind == VC_FRANGI_PARTS) {
        res[0] = pb;
        res[1] = sqrt(s2);
        return;
    }
    res[0] = pb * (1.0 - exp(-s2 / (2.0 * c * c)));
}
#endif
