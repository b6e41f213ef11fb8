/* Window attention for the CPU: softmax(q k^T * scale + bias) v for every (image, window, head),
 * one window at a time with everything in the core's cache.
 *
 * Swin's windows are small (N = 49 tokens of head dim 32 for 7x7 windows): a 49 x 49 score matrix
 * per head is too small for a BLAS call to run near the core's rate, and a general fused kernel
 * spends its time on tiling made for long sequences. Here one (window, head) pair is one unit of
 * work: k is copied transposed and v padded into two small buffers, and each block of query rows
 * computes its scores in registers, adds the bias, takes the softmax and multiplies by v without
 * leaving the L1 cache. Vectors are GCC's generic vector extension, so the same source compiles to
 * AVX-512, AVX2 or NEON at whatever -march the build gives.
 *
 * Layout: tokens[w * N + i] is the row, within its image, of token i of window w, and element d of
 * head h of row t of image b is at base[b * s[0] + t * s[1] + h * s[2] + d] for q, k, v and out (the
 * last dimension contiguous). So the kernel reads q, k and v straight out of the qkv layer's output
 * for the whole (padded) map, (B, H * W, 3, heads, D), and writes each token's output back to its
 * place in the map: the roll, the window partition and their inverses are the `tokens` table, not
 * copies. The bias is (nb, heads, N, NP) contiguous, NP = N rounded up to a multiple of 16 and -inf
 * past N, with nb = 1 (one bias for every window) or nb = nW.
 *
 * Training: the forward also writes each query row's log-sum-exp, and the backward recomputes the
 * probabilities from it instead of keeping them (a (N, N) matrix per window and head), then
 * computes dv = P^T do, dP = do v^T, dS = P (dP - rowsum(do * o)), dq = scale dS k,
 * dk = scale dS^T q and the bias gradient dS, summed over images (and windows where nb = 1).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define LANES 16
typedef float vf __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(LANES * sizeof(int32_t))));

#define ROWS 4      /* query rows per register block */
#define COL_TILES 4 /* score tiles of LANES keys per register block */

static inline vf splat(float x) { return x - (vf){}; } /* x - 0 is x for every x, so this is one broadcast */

static inline vf load(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store(float *p, vf v) { memcpy(p, &v, sizeof v); }

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
 * exp(r) by its degree-6 Taylor polynomial, 2^n through the exponent bits. Below -87 it is 0. */
static inline vf exp_nonpositive(vf x) {
    const vf lo = splat(-87.0f), round = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    vi under = x < lo;
    x = where(under, lo, x);
    vf n = (x * splat(1.44269504088896341f) + round) - round;
    vf r = x - n * splat(0.693359375f) + n * splat(2.12194440e-4f);
    vf p = splat(1.0f / 720);
    p = p * r + splat(1.0f / 120);
    p = p * r + splat(1.0f / 24);
    p = p * r + splat(1.0f / 6);
    p = p * r + splat(0.5f);
    p = p * r + splat(1.0f);
    p = p * r + splat(1.0f);
    vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
    vf scale;
    memcpy(&scale, &bits, sizeof scale);
    return where(under, splat(0.0f), p * scale);
}

static inline vf vmax(vf a, vf b) { return where(a > b, a, b); }

/* Sum or maximum over the lanes, as a tree of lane shuffles. */
#define HREDUCE(v, op)                                                                      \
    do {                                                                                    \
        v = op(v, __builtin_shuffle(v, (vi){8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7})); \
        v = op(v, __builtin_shuffle(v, (vi){4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3}));       \
        v = op(v, __builtin_shuffle(v, (vi){2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1}));       \
        v = op(v, __builtin_shuffle(v, (vi){1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0}));       \
    } while (0)

static inline vf vadd(vf a, vf b) { return a + b; }

static inline float hsum(vf v) {
    HREDUCE(v, vadd);
    return v[0];
}

static inline float hmax(vf v) {
    HREDUCE(v, vmax);
    return v[0];
}

/* One unit's operands, copied into padded buffers: a (DP, NP) matrix is a transposed one, its padded
 * rows and columns zero; a (N, DP) one keeps token rows, its padded dims zero. */
struct unit {
    int N, NP, D, DP; /* tokens and head dim, each padded to a multiple of LANES */
    float scale;
};

/* acc[r][c] = scale * sum_d a[r][d] bt[d][c] + bias[r][c] for R rows (1 <= R <= ROWS) of a (rows of
 * DP, read as scalars) against every column of bt (DP, NP), into out (R, NP); the row maxima into m. */
static inline __attribute__((always_inline)) void products(const struct unit *u, int R, const float *a,
                                                           const float *bt, const float *bias, float scale,
                                                           float *out, float *m) {
    const int NP = u->NP, D = u->D, DP = u->DP;
    vf mx[ROWS];
    for (int r = 0; r < R; r++) mx[r] = splat(-INFINITY);
    for (int c0 = 0; c0 < NP; c0 += COL_TILES * LANES) {
        const int tiles = (NP - c0) / LANES < COL_TILES ? (NP - c0) / LANES : COL_TILES;
        vf acc[ROWS][COL_TILES] = {};
        if (tiles == COL_TILES) {
            for (int d = 0; d < D; d++) {
                const float *bd = bt + (int64_t)d * NP + c0;
                vf b0 = load(bd), b1 = load(bd + LANES), b2 = load(bd + 2 * LANES), b3 = load(bd + 3 * LANES);
                for (int r = 0; r < R; r++) {
                    vf ad = splat(a[r * DP + d]);
                    acc[r][0] += ad * b0;
                    acc[r][1] += ad * b1;
                    acc[r][2] += ad * b2;
                    acc[r][3] += ad * b3;
                }
            }
        } else {
            for (int d = 0; d < D; d++) {
                const float *bd = bt + (int64_t)d * NP + c0;
                for (int r = 0; r < R; r++) {
                    vf ad = splat(a[r * DP + d]);
                    for (int t = 0; t < tiles; t++) acc[r][t] += ad * load(bd + t * LANES);
                }
            }
        }
        for (int r = 0; r < R; r++)
            for (int t = 0; t < tiles; t++) {
                const int c = c0 + t * LANES;
                vf sc = acc[r][t] * splat(scale);
                if (bias) sc += load(bias + r * NP + c);
                mx[r] = vmax(mx[r], sc);
                store(out + r * NP + c, sc);
            }
    }
    if (m)
        for (int r = 0; r < R; r++) m[r] = hmax(mx[r]);
}

/* out[r] = scale[r] * sum_j w[r * rs + j * js] src[j] for R output rows and src (N, DP): each
 * output row of D values written through its own pointer. With (rs, js) = (NP, 1) the weights are R
 * rows of a (N, NP) matrix (P v, dS k); with (1, NP), R of its columns (P^T do, dS^T q). */
static inline __attribute__((always_inline)) void weighted(const struct unit *u, int R, const float *w, int rs,
                                                           int js, const float *src, const float *scale,
                                                           float *const *out) {
    const int D = u->D, N = u->N, DP = u->DP;
    for (int c0 = 0; c0 < DP; c0 += 2 * LANES) {
        const int two = DP - c0 >= 2 * LANES;
        vf acc[ROWS][2] = {};
        for (int j = 0; j < N; j++) {
            const float *sj = src + (int64_t)j * DP + c0;
            vf s0 = load(sj), s1 = two ? load(sj + LANES) : splat(0.0f);
            for (int r = 0; r < R; r++) {
                vf p = splat(w[(int64_t)r * rs + (int64_t)j * js]);
                acc[r][0] += p * s0;
                acc[r][1] += p * s1;
            }
        }
        for (int r = 0; r < R; r++) {
            float *o = out[r] + c0;
            vf a[2] = {acc[r][0] * splat(scale[r]), acc[r][1] * splat(scale[r])};
            for (int t = 0; t < 1 + two; t++) {
                const int c = c0 + t * LANES;
                if (c + LANES <= D)
                    store(o + t * LANES, a[t]);
                else
                    for (int l = 0; l < D - c; l++) o[t * LANES + l] = a[t][l];
            }
        }
    }
}

/* exp(s - m) over R rows of scores in place; returns each row's 1 / sum in inv. */
static inline __attribute__((always_inline)) void softmax_rows(const struct unit *u, int R, float *s, const float *m,
                                                               float *inv) {
    for (int r = 0; r < R; r++) {
        const vf mr = splat(m[r]);
        vf sum = {};
        for (int c = 0; c < u->NP; c += LANES) {
            vf e = exp_nonpositive(load(s + r * u->NP + c) - mr);
            store(s + r * u->NP + c, e);
            sum += e;
        }
        inv[r] = 1.0f / hsum(sum);
    }
}

static inline int pad(int n) { return (n + LANES - 1) / LANES * LANES; }

/* Token t's row of head h of image b in a (B, L, heads, D) tensor with strides s, of float32 or
 * bfloat16 elements (es = 4 or 2 bytes). */
#define ROW(base, es, s, b, h, t) ((char *)(base) + (es) * ((b) * (s)[0] + (t) * (s)[1] + (h) * (s)[2]))

static inline float from_bf16(uint16_t x) {
    uint32_t bits = (uint32_t)x << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t to_bf16(float f) { /* round to nearest even, as PyTorch does (finite values) */
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    return (uint16_t)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

static inline void read_row(float *dst, const char *src, int D, int bf16) {
    if (bf16)
        for (int d = 0; d < D; d++) dst[d] = from_bf16(((const uint16_t *)src)[d]);
    else
        memcpy(dst, src, sizeof(float) * D);
}

/* A (N, DP) float32 copy of a unit's rows, padded dims zero (the tail was zeroed once). */
static inline void gather_rows(float *dst, const void *base, int bf16, const int64_t *s, int64_t b, int64_t h,
                               const int64_t *rows, int N, int D, int DP) {
    for (int i = 0; i < N; i++) read_row(dst + (int64_t)i * DP, ROW(base, bf16 ? 2 : 4, s, b, h, rows[i]), D, bf16);
}

/* A (DP, NP) transposed float32 copy of a unit's rows, padded rows and columns zero. */
static inline void gather_transposed(float *dst, const void *base, int bf16, const int64_t *s, int64_t b,
                                     int64_t h, const int64_t *rows, int N, int NP, int D) {
    float row[D];
    for (int i = 0; i < N; i++) {
        read_row(row, ROW(base, bf16 ? 2 : 4, s, b, h, rows[i]), D, bf16);
        for (int d = 0; d < D; d++) dst[(int64_t)d * NP + i] = row[d];
    }
}

/* Where R output rows go: straight into a float32 tensor, or through float32 staging rows that
 * `put_rows` then rounds into a bfloat16 one. */
static inline void out_rows(float **o, float *stage, void *base, int bf16, const int64_t *s, int64_t b, int64_t h,
                            const int64_t *rows, int R, int DP) {
    for (int r = 0; r < R; r++) o[r] = bf16 ? stage + (int64_t)r * DP : (float *)ROW(base, 4, s, b, h, rows[r]);
}

static inline void put_rows(float *const *o, void *base, int bf16, const int64_t *s, int64_t b, int64_t h,
                            const int64_t *rows, int R, int D) {
    if (bf16)
        for (int r = 0; r < R; r++) {
            uint16_t *dst = (uint16_t *)ROW(base, 2, s, b, h, rows[r]);
            for (int d = 0; d < D; d++) dst[d] = to_bf16(o[r][d]);
        }
}

static inline void prefetch_rows(const void *base, int es, const int64_t *s, int64_t b, int64_t h,
                                 const int64_t *rows, int i0, int R, int D) {
    for (int r = i0; r < i0 + R; r++)
        for (int d = 0; d < D * es; d += 64) __builtin_prefetch(ROW(base, es, s, b, h, rows[r]) + d);
}

/* q, k, v and out are float32, or bfloat16 where bf16 (computed in float32 either way); the bias and
 * the log-sum-exp are float32. lse may be NULL (inference). */
int swinx_window_attention(const void *q, const int64_t *qs, const void *k, const int64_t *ks, const void *v,
                           const int64_t *vs, const int64_t *tokens, const float *bias, int64_t bias_windows,
                           void *out, const int64_t *os, float *lse, int bf16, int64_t B, int64_t nW, int64_t heads,
                           int64_t N, int64_t D, float scale, int threads) {
    const int es = bf16 ? 2 : 4;
    const struct unit u = {(int)N, pad((int)N), (int)D, pad((int)D), scale};
    const int NP = u.NP, DP = u.DP;
    const int64_t units = B * nW * heads;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        const size_t kept = (size_t)DP * NP + 2 * (size_t)N * DP; /* k^T, v, q: zero padding set once */
        float *buf = aligned_alloc(64, sizeof(float) * (kept + (size_t)ROWS * NP + (size_t)ROWS * DP));
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        } else {
            float *kt = buf, *vv = kt + (size_t)DP * NP, *qq = vv + (size_t)N * DP, *scores = qq + (size_t)N * DP;
            float *stage = scores + (size_t)ROWS * NP;
            memset(buf, 0, sizeof(float) * kept);
#pragma omp for schedule(static)
            for (int64_t id = 0; id < units; id++) {
                const int64_t h = id % heads, w = id / heads % nW, b = id / heads / nW;
                const int64_t *rows = tokens + w * N; /* this window's tokens */
                /* The next unit's rows are fetched a block of rows at a time while this unit computes. */
                const int64_t next = id + 1 < units ? id + 1 : id;
                const int64_t h1 = next % heads, b1 = next / heads / nW, *rows1 = tokens + next / heads % nW * N;
                gather_transposed(kt, k, bf16, ks, b, h, rows, (int)N, NP, (int)D);
                gather_rows(vv, v, bf16, vs, b, h, rows, (int)N, (int)D, DP);
                gather_rows(qq, q, bf16, qs, b, h, rows, (int)N, (int)D, DP);
                const float *bu = bias + ((bias_windows == 1 ? 0 : w) * heads + h) * N * NP;
                for (int i = 0; i < N;) {
                    const int R = N - i >= ROWS ? ROWS : 1;
                    prefetch_rows(q, es, qs, b1, h1, rows1, i, R, (int)D);
                    prefetch_rows(k, es, ks, b1, h1, rows1, i, R, (int)D);
                    prefetch_rows(v, es, vs, b1, h1, rows1, i, R, (int)D);
                    float m[ROWS], inv[ROWS], *o[ROWS];
                    out_rows(o, stage, out, bf16, os, b, h, rows + i, R, DP);
                    if (R == ROWS) {
                        products(&u, ROWS, qq + (int64_t)i * DP, kt, bu + (int64_t)i * NP, scale, scores, m);
                        softmax_rows(&u, ROWS, scores, m, inv);
                        weighted(&u, ROWS, scores, NP, 1, vv, inv, o);
                    } else {
                        products(&u, 1, qq + (int64_t)i * DP, kt, bu + (int64_t)i * NP, scale, scores, m);
                        softmax_rows(&u, 1, scores, m, inv);
                        weighted(&u, 1, scores, NP, 1, vv, inv, o);
                    }
                    put_rows(o, out, bf16, os, b, h, rows + i, R, (int)D);
                    if (lse)
                        for (int r = 0; r < R; r++) lse[id * N + i + r] = m[r] - logf(inv[r]);
                    i += R;
                }
            }
            free(buf);
        }
    }
    return failed;
}

/* q, k, v, out, dout and dq, dk, dv in float32, or bfloat16 where bf16; bias, lse, dbias float32. */
int swinx_window_attention_backward(const void *q, const int64_t *qs, const void *k, const int64_t *ks,
                                    const void *v, const int64_t *vs, const int64_t *tokens, const float *bias,
                                    int64_t bias_windows, const void *out, const int64_t *os, const void *dout,
                                    const int64_t *dos, const float *lse, void *dq, const int64_t *dqs, void *dk,
                                    const int64_t *dks, void *dv, const int64_t *dvs, float *dbias, int bf16,
                                    int64_t B, int64_t nW, int64_t heads, int64_t N, int64_t D, float scale,
                                    int threads) {
    const struct unit u = {(int)N, pad((int)N), (int)D, pad((int)D), scale};
    const int NP = u.NP, DP = u.DP;
    const int64_t units = B * nW * heads, bias_size = bias_windows * heads * N * NP;
    int failed = 0, team = 1;
    float scales[ROWS], ones[ROWS]; /* the row factors of dq, dk (scale) and dv (1) */
    for (int r = 0; r < ROWS; r++) scales[r] = scale, ones[r] = 1.0f;
    float **partial = calloc((size_t)threads, sizeof(float *)); /* each thread's bias gradient */
    if (!partial) return 1;
#pragma omp parallel num_threads(threads)
    {
#ifdef _OPENMP
        const int me = omp_get_thread_num();
#pragma omp single
        team = omp_get_num_threads();
#else
        const int me = 0;
#endif
        /* k^T, v^T, then k, q, o, do as rows (zero padding set once), P and dS */
        const size_t kept = 2 * (size_t)DP * NP + 4 * (size_t)N * DP;
        float *buf = aligned_alloc(64, sizeof(float) * (kept + 2 * (size_t)N * NP + 2 * (size_t)ROWS * DP));
        float *db = calloc((size_t)bias_size, sizeof(float));
        partial[me] = db;
        if (!buf || !db) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
            float *kt = buf, *vt = kt + (size_t)DP * NP, *kk = vt + (size_t)DP * NP, *qq = kk + (size_t)N * DP;
            float *oo = qq + (size_t)N * DP, *dd = oo + (size_t)N * DP, *P = dd + (size_t)N * DP;
            float *dS = P + (size_t)N * NP, *stage = dS + (size_t)N * NP, *stage2 = stage + (size_t)ROWS * DP;
            memset(buf, 0, sizeof(float) * kept);
#pragma omp for schedule(static)
            for (int64_t id = 0; id < units; id++) {
                const int64_t h = id % heads, w = id / heads % nW, b = id / heads / nW;
                const int64_t *rows = tokens + w * N;
                gather_transposed(kt, k, bf16, ks, b, h, rows, (int)N, NP, (int)D);
                gather_transposed(vt, v, bf16, vs, b, h, rows, (int)N, NP, (int)D);
                gather_rows(kk, k, bf16, ks, b, h, rows, (int)N, (int)D, DP);
                gather_rows(qq, q, bf16, qs, b, h, rows, (int)N, (int)D, DP);
                gather_rows(oo, out, bf16, os, b, h, rows, (int)N, (int)D, DP);
                gather_rows(dd, dout, bf16, dos, b, h, rows, (int)N, (int)D, DP);
                const int64_t slot = ((bias_windows == 1 ? 0 : w) * heads + h) * N * NP;
                const float *bu = bias + slot;
                float *dbu = db + slot;
                for (int i = 0; i < N;) {
                    const int R = N - i >= ROWS ? ROWS : 1;
                    float *Pi = P + (int64_t)i * NP, *dSi = dS + (int64_t)i * NP, *dqr[ROWS], m[ROWS];
                    for (int r = 0; r < R; r++) m[r] = lse[id * N + i + r];
                    out_rows(dqr, stage, dq, bf16, dqs, b, h, rows + i, R, DP);
                    /* P = exp(S - lse); dP = do v^T into dS */
                    if (R == ROWS) {
                        products(&u, ROWS, qq + (int64_t)i * DP, kt, bu + (int64_t)i * NP, scale, Pi, NULL);
                        products(&u, ROWS, dd + (int64_t)i * DP, vt, NULL, 1.0f, dSi, NULL);
                    } else {
                        products(&u, 1, qq + (int64_t)i * DP, kt, bu + (int64_t)i * NP, scale, Pi, NULL);
                        products(&u, 1, dd + (int64_t)i * DP, vt, NULL, 1.0f, dSi, NULL);
                    }
                    for (int r = 0; r < R; r++) {
                        vf dot = {};
                        for (int d = 0; d < DP; d += LANES)
                            dot += load(dd + (int64_t)(i + r) * DP + d) * load(oo + (int64_t)(i + r) * DP + d);
                        const vf delta = splat(hsum(dot)), mr = splat(m[r]);
                        for (int c = 0; c < NP; c += LANES) {
                            float *pc = Pi + r * NP + c, *sc = dSi + r * NP + c, *bc = dbu + (int64_t)(i + r) * NP + c;
                            vf p = exp_nonpositive(load(pc) - mr);
                            vf ds = p * (load(sc) - delta);
                            store(pc, p);
                            store(sc, ds);
                            store(bc, load(bc) + ds);
                        }
                    }
                    if (R == ROWS)
                        weighted(&u, ROWS, dSi, NP, 1, kk, scales, dqr);
                    else
                        weighted(&u, 1, dSi, NP, 1, kk, scales, dqr);
                    put_rows(dqr, dq, bf16, dqs, b, h, rows + i, R, (int)D);
                    i += R;
                }
                for (int j = 0; j < N;) {
                    const int R = N - j >= ROWS ? ROWS : 1;
                    float *dvr[ROWS], *dkr[ROWS];
                    out_rows(dvr, stage, dv, bf16, dvs, b, h, rows + j, R, DP);
                    out_rows(dkr, stage2, dk, bf16, dks, b, h, rows + j, R, DP);
                    if (R == ROWS) {
                        weighted(&u, ROWS, P + j, 1, NP, dd, ones, dvr);
                        weighted(&u, ROWS, dS + j, 1, NP, qq, scales, dkr);
                    } else {
                        weighted(&u, 1, P + j, 1, NP, dd, ones, dvr);
                        weighted(&u, 1, dS + j, 1, NP, qq, scales, dkr);
                    }
                    put_rows(dvr, dv, bf16, dvs, b, h, rows + j, R, (int)D);
                    put_rows(dkr, dk, bf16, dks, b, h, rows + j, R, (int)D);
                    j += R;
                }
            }
        }
        free(buf);
    }
    if (!failed) /* the threads' bias gradients, summed */
        for (int t = 0; t < team; t++)
            for (int64_t e = 0; e < bias_size; e++) dbias[e] += partial[t][e];
    for (int t = 0; t < threads; t++) free(partial[t]);
    free(partial);
    return failed;
}
