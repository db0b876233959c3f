/* SIMD micro-kernels for volconv (every kernel family's vector code: direct, separable FIR rows, dynamic).
 *
 * Written once (simd_impl.h, included here for float and double) and compiled three times by setup.py
 * (generic SSE2, AVX2+FMA, AVX-512) with VC_VBYTES = 16 / 32 / 64; volconv/_cpu/__init__.py picks the
 * build the CPU supports at import time. GCC vector extensions keep the code portable across the three.
 */
#ifndef VOLCONV_SIMD_H
#define VOLCONV_SIMD_H

#include <stddef.h>
#include <string.h>
#if VC_VBYTES >= 64
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef VC_VBYTES
#define VC_VBYTES 16
#endif

#define VC_CAT2(a, b) a##_##b
#define VC_CAT(a, b) VC_CAT2(a, b)

static int vc_vector_bytes(void) { return VC_VBYTES; }

/* Threads OpenMP would use now: honours OMP_NUM_THREADS and threadpoolctl (omp_set_num_threads). */
static int vc_max_threads(void)
{
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

static int vc_have_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* 2: AVX-512 (F, BW, VL, DQ) usable; 1: AVX2 + FMA; 0: baseline x86-64 (or not x86). */
static int vc_cpu_level(void)
{
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return 1;
#endif
    return 0;
}

/* Ask for the cache lines of [p, p + bytes) to be brought into L2 ahead of use (a plane's rows about to be read
 * column-wise, which the hardware prefetchers do not foresee). */
static inline void vc_prefetch_range(const void *p, size_t bytes)
{
    for (size_t i = 0; i < bytes; i += 64)
        __builtin_prefetch((const char *)p + i, 0, 2);
}

#define T float
#define IT int
#define SUF f32
#include "simd_impl.h"
#undef T
#undef IT
#undef SUF

#define T double
#define IT long long
#define SUF f64
#include "simd_impl.h"
#undef T
#undef IT
#undef SUF

#endif
