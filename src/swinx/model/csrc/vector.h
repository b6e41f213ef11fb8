/* The vector helpers swinx's C kernels share: GCC's generic 16-lane float32 vectors (one AVX-512
 * register, two AVX2 ones, four NEON ones), loads and stores, a bitwise select, and exp for x <= 0. */
#ifndef SWINX_VECTOR_H
#define SWINX_VECTOR_H

#include <stdint.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#ifdef __SSE__
#include <xmmintrin.h>
#endif

#define LANES 16
typedef float vf __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(LANES * sizeof(int32_t))));

/* Keeps a loaded vector in its register: without it GCC folds the load into every FMA that uses it,
 * one vector load per FMA, and a Zen 4 core loads one 64-byte vector per cycle, no faster than it
 * issues 512-bit FMAs. */
#ifdef __AVX512F__
#define KEEP(x) __asm__("" : "+v"(x))
#else
#define KEEP(x) ((void)0)
#endif

static inline vf splat(float x) { return x - (vf){}; } /* x - 0 is x for every x, so this is one broadcast */

static inline vf load(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store(float *p, vf v) { memcpy(p, &v, sizeof v); }

/* 16 bfloat16 values as float32 (exact), and float32 rounded to bfloat16, to nearest even as PyTorch
 * rounds (finite values); GCC's conversions become one widening or narrowing move per vector. */
typedef uint16_t vh __attribute__((vector_size(LANES * sizeof(uint16_t))));

static inline vf load_bf16(const uint16_t *p) {
    vh h;
    memcpy(&h, p, sizeof h);
    const vi bits = __builtin_convertvector(h, vi) << 16;
    vf v;
    memcpy(&v, &bits, sizeof v);
    return v;
}

static inline void store_bf16(uint16_t *p, vf v) {
    vi bits;
    memcpy(&bits, &v, sizeof bits);
    const vh h = __builtin_convertvector((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16, vh);
    memcpy(p, &h, sizeof h);
}

static inline vf where(vi mask, vf a, vf b) { /* a where mask, else b */
    vi ai, bi;
    memcpy(&ai, &a, sizeof ai);
    memcpy(&bi, &b, sizeof bi);
    vi r = (ai & mask) | (bi & ~mask);
    vf out;
    memcpy(&out, &r, sizeof out);
    return out;
}

/* exp(x) for x <= 0 (scores minus their row maximum), within 2 ulp: x = n ln2 + r, |r| <= ln2 / 2,
 * exp(r) by its degree-6 Taylor polynomial, times 2^n. Below -87 it is exp(-87) (a -inf score, a key
 * past N, counts 1e-38 of a probability) or, without AVX-512, 0. */
static inline vf exp_poly(vf r) {
    vf p = splat(1.0f / 720);
    p = p * r + splat(1.0f / 120);
    p = p * r + splat(1.0f / 24);
    p = p * r + splat(1.0f / 6);
    p = p * r + splat(0.5f);
    p = p * r + splat(1.0f);
    return p * r + splat(1.0f);
}

#ifdef __AVX512F__
static inline vf exp_nonpositive(vf x) { /* 2^n by vscalefps, n rounded by vrndscaleps */
    const __m512 y = _mm512_max_ps((__m512)x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(y, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const vf r = (vf)y - (vf)n * splat(0.693359375f) + (vf)n * splat(2.12194440e-4f);
    return (vf)_mm512_scalef_ps((__m512)exp_poly(r), n);
}
#else
static inline vf exp_nonpositive(vf x) { /* 2^n through the exponent bits */
    const vf lo = splat(-87.0f), round = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    vi under = x < lo;
    x = where(under, lo, x);
    vf n = (x * splat(1.44269504088896341f) + round) - round;
    vf r = x - n * splat(0.693359375f) + n * splat(2.12194440e-4f);
    vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
    vf scale;
    memcpy(&scale, &bits, sizeof scale);
    return where(under, splat(0.0f), exp_poly(r) * scale);
}
#endif

/* Denormal floats (below 1.2e-38) read and written as zero by the calling thread until restored: the
 * shift mask's -100 leaves probabilities near exp(-87) = 1.6e-38, and their products with values or
 * gradients fall below it. Intel cores take a microcode assist for each such operand or result: on an
 * Intel Xeon (family 6 model 167, 2 threads) it made the shifted blocks' attention 2x slower forward
 * and 4x slower backward. Each kernel's threads (PyTorch's own OpenMP team) set this on entry and
 * restore the caller's state on exit. */
#ifdef __SSE__
static inline unsigned denormals_off(void) {
    const unsigned csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040); /* FTZ (bit 15) and DAZ (bit 6) */
    return csr;
}
static inline void denormals_restore(unsigned csr) { _mm_setcsr(csr); }
#else
static inline unsigned denormals_off(void) { return 0; }
static inline void denormals_restore(unsigned csr) { (void)csr; }
#endif

#endif
