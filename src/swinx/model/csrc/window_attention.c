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
#include "vector.h"

#define ROWS 4      /* query rows per register block */
#define COL_TILES 4 /* score tiles of LANES keys per register block */

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

/* The same over each of four rows at once: halves of rows 0 and 1 (and 2 and 3) side by side, then
 * quarters of all four, then within each quarter; row r's result lands in lane 4 r. */
#define HREDUCE4(v, op, out)                                                                                  \
    do {                                                                                                      \
        const vi h0 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};                               \
        const vi h1 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};                         \
        const vi q0 = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};                             \
        const vi q1 = {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};                           \
        vf a = op(__builtin_shuffle(v[0], v[1], h0), __builtin_shuffle(v[0], v[1], h1));                     \
        vf b = op(__builtin_shuffle(v[2], v[3], h0), __builtin_shuffle(v[2], v[3], h1));                     \
        vf t = op(__builtin_shuffle(a, b, q0), __builtin_shuffle(a, b, q1));                                 \
        t = op(t, __builtin_shuffle(t, (vi){2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13}));         \
        t = op(t, __builtin_shuffle(t, (vi){1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14}));         \
        for (int r_ = 0; r_ < 4; r_++) out[r_] = t[4 * r_];                                                  \
    } while (0)

/* out[r] = the maximum (or sum) of v[r]'s lanes, for R = 1 or ROWS rows. */
static inline __attribute__((always_inline)) void row_max(int R, vf *v, float *out) {
    if (R == 4)
        HREDUCE4(v, vmax, out);
    else
        for (int r = 0; r < R; r++) out[r] = hmax(v[r]);
}

static inline __attribute__((always_inline)) void row_sum(int R, vf *v, float *out) {
    if (R == 4)
        HREDUCE4(v, vadd, out);
    else
        for (int r = 0; r < R; r++) out[r] = hsum(v[r]);
}

/* One unit's operands, copied into padded buffers: a (DP, NP) matrix is a transposed one, its padded
 * rows and columns zero; a (N, DP) one keeps token rows, its padded dims zero. */
struct unit {
    int N, NP, D, DP; /* tokens and head dim, each padded to a multiple of LANES */
    float scale;
};

/* acc[r][t] += sum_d a[r][d] bt[d][16 t + lane] for R rows (of DP, read as scalars) against four tiles
 * of keys of bt (D rows of NP): constant trip counts keep the accumulators in registers. */
static inline __attribute__((always_inline)) void tile4(int R, const float *a, int DP, const float *bt, int NP,
                                                        int D, vf (*acc)[COL_TILES]) {
    for (int d = 0; d < D; d++) {
        const float *bd = bt + (int64_t)d * NP;
        vf b0 = load(bd), b1 = load(bd + LANES), b2 = load(bd + 2 * LANES), b3 = load(bd + 3 * LANES);
        KEEP(b0); KEEP(b1); KEEP(b2); KEEP(b3);
        for (int r = 0; r < R; r++) {
            vf ad = splat(a[r * DP + d]);
            acc[r][0] += ad * b0;
            acc[r][1] += ad * b1;
            acc[r][2] += ad * b2;
            acc[r][3] += ad * b3;
        }
    }
}

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
            tile4(R, a, DP, bt + c0, NP, D, acc);
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
        row_max(R, mx, m);
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
            KEEP(s0); KEEP(s1);
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

/* exp(s - m) over R rows of NP scores in place; returns each row's 1 / sum in inv. */
static inline __attribute__((always_inline)) void softmax_rows_np(int R, int NP, float *s, const float *m, float *inv) {
    vf sum[ROWS];
    for (int r = 0; r < R; r++) {
        const vf mr = splat(m[r]);
        sum[r] = splat(0.0f);
        for (int c = 0; c < NP; c += LANES) {
            vf e = exp_nonpositive(load(s + r * NP + c) - mr);
            store(s + r * NP + c, e);
            sum[r] += e;
        }
    }
    row_sum(R, sum, inv);
    for (int r = 0; r < R; r++) inv[r] = 1.0f / inv[r];
}

/* The softmax of R rows of 64 scores held in registers (sc = products, scaled and biased in place, then
 * exp(sc - m)); row maxima into m, 1 / row sums into inv. */
static inline __attribute__((always_inline)) void softmax64_regs(int R, vf (*sc)[COL_TILES], const float *bias,
                                                                 float scale, float *m, float *inv) {
    vf mx[ROWS], sum[ROWS];
    for (int r = 0; r < R; r++) {
        for (int t = 0; t < COL_TILES; t++)
            sc[r][t] = sc[r][t] * splat(scale) + load(bias + r * COL_TILES * LANES + t * LANES);
        mx[r] = vmax(vmax(sc[r][0], sc[r][1]), vmax(sc[r][2], sc[r][3]));
    }
    row_max(R, mx, m);
    for (int r = 0; r < R; r++) {
        const vf mr = splat(m[r]);
        for (int t = 0; t < COL_TILES; t++) sc[r][t] = exp_nonpositive(sc[r][t] - mr);
        sum[r] = (sc[r][0] + sc[r][1]) + (sc[r][2] + sc[r][3]);
    }
    row_sum(R, sum, inv);
    for (int r = 0; r < R; r++) inv[r] = 1.0f / inv[r];
}

/* Windows of at most 64 tokens (NP = 64): the scores of R rows stay in registers through the softmax;
 * only the probabilities are stored (P v reads them a weight at a time). */
static inline __attribute__((always_inline)) void softmax64(const struct unit *u, int R, const float *a,
                                                            const float *bt, const float *bias, float scale,
                                                            float *out, float *m, float *inv) {
    enum { NP = COL_TILES * LANES };
    const int D = u->D, DP = u->DP;
    vf acc[ROWS][COL_TILES] = {};
    tile4(R, a, DP, bt, NP, D, acc);
    softmax64_regs(R, acc, bias, scale, m, inv);
    for (int r = 0; r < R; r++)
        for (int t = 0; t < COL_TILES; t++) store(out + r * NP + t * LANES, acc[r][t]);
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
    if (bf16 && D % LANES == 0)
        for (int d = 0; d < D; d += LANES) store(dst + d, load_bf16((const uint16_t *)src + d));
    else if (bf16)
        for (int d = 0; d < D; d++) dst[d] = from_bf16(((const uint16_t *)src)[d]);
    else if (D % LANES == 0) /* whole vectors, inline */
        for (int d = 0; d < D; d += LANES) store(dst + d, load((const float *)src + d));
    else
        memcpy(dst, src, sizeof(float) * D);
}

/* A (N, DP) float32 copy of a unit's rows, padded dims zero (the tail was zeroed once). */
static inline void gather_rows(float *dst, const void *base, int bf16, const int64_t *s, int64_t b, int64_t h,
                               const int64_t *rows, int N, int D, int DP) {
    for (int i = 0; i < N; i++) read_row(dst + (int64_t)i * DP, ROW(base, bf16 ? 2 : 4, s, b, h, rows[i]), D, bf16);
}

#ifdef __AVX512F__
/* kt2 (16, NP) from words offset .. offset + 15 of k's rows (bfloat16 pairs, or float32 values): 16 rows at
 * a time, as a 16 x 16 transpose in registers (rows past N read as zero), so that kt2 is written in whole
 * vectors, which the products then read back without waiting on single-word stores. */
static inline void transpose_words16(uint32_t *kt2, const void *k, int es, const int64_t *ks, int64_t b, int64_t h,
                                     const int64_t *rows, int N, int NP, int offset) {
    for (int i0 = 0; i0 < N; i0 += 16) {
        __m512i r[16], t[16];
        for (int i = 0; i < 16; i++)
            r[i] = i0 + i < N ? _mm512_loadu_si512(ROW(k, es, ks, b, h, rows[i0 + i]) + 4 * offset)
                              : _mm512_setzero_si512();
        for (int i = 0; i < 16; i += 2) { /* word pairs of two rows */
            t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
            t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
        }
        for (int i = 0; i < 16; i += 4) { /* lane l of r[i + c]: column 4 l + c of rows i .. i + 3 */
            r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
            r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
            r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
            r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
        }
        for (int c = 0; c < 4; c++) { /* columns c, 4 + c, 8 + c, 12 + c from lanes 0 .. 3 of each group */
            const __m512i a0 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x88), a1 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xDD);
            const __m512i b0 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x88);
            const __m512i b1 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xDD);
            _mm512_storeu_si512(kt2 + (int64_t)c * NP + i0, _mm512_shuffle_i32x4(a0, b0, 0x88));
            _mm512_storeu_si512(kt2 + (int64_t)(8 + c) * NP + i0, _mm512_shuffle_i32x4(a0, b0, 0xDD));
            _mm512_storeu_si512(kt2 + (int64_t)(4 + c) * NP + i0, _mm512_shuffle_i32x4(a1, b1, 0x88));
            _mm512_storeu_si512(kt2 + (int64_t)(12 + c) * NP + i0, _mm512_shuffle_i32x4(a1, b1, 0xDD));
        }
    }
}

#endif

/* A (DP, NP) transposed float32 copy of a unit's rows, padded rows and columns zero. */
static inline void gather_transposed(float *dst, const void *base, int bf16, const int64_t *s, int64_t b,
                                     int64_t h, const int64_t *rows, int N, int NP, int D) {
#ifdef __AVX512F__
    if (D % 16 == 0) {
        if (bf16) { /* widened to float32 rows first, then transposed as those */
            float wide[N * D];
            int64_t order[N];
            const int64_t ws[3] = {0, D, 0};
            for (int i = 0; i < N; i++) {
                read_row(wide + (int64_t)i * D, ROW(base, 2, s, b, h, rows[i]), D, 1);
                order[i] = i;
            }
            for (int d0 = 0; d0 < D; d0 += 16)
                transpose_words16((uint32_t *)dst + (int64_t)d0 * NP, wide, 4, ws, 0, 0, order, N, NP, d0);
        } else {
            for (int d0 = 0; d0 < D; d0 += 16)
                transpose_words16((uint32_t *)dst + (int64_t)d0 * NP, base, 4, s, b, h, rows, N, NP, d0);
        }
        return;
    }
#endif
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
            int d = 0;
            for (; d + LANES <= D; d += LANES) store_bf16(dst + d, load(o[r] + d));
            for (; d < D; d++) dst[d] = to_bf16(o[r][d]);
        }
}

/* Unit id's image b, head h, window w and the window's token rows, and the same of the next unit (the
 * last unit's next is itself), whose rows are prefetched while this one computes. */
struct unit_at {
    int64_t b, h, w, b1, h1;
    const int64_t *rows, *rows1;
};

static inline struct unit_at locate(int64_t id, int64_t units, int64_t heads, int64_t nW, int64_t N,
                                    const int64_t *tokens) {
    const int64_t next = id + 1 < units ? id + 1 : id;
    return (struct unit_at){id / heads / nW, id % heads, id / heads % nW, next / heads / nW, next % heads,
                            tokens + id / heads % nW * N, tokens + next / heads % nW * N};
}

/* This thread's index in the team, and the team's size into *team (once, with a barrier after). */
static inline int team_slot(int *team) {
#ifdef _OPENMP
#pragma omp single
    *team = omp_get_num_threads();
    return omp_get_thread_num();
#else
    *team = 1;
    return 0;
#endif
}

/* This thread's zeroed bias gradient, into partial[me]; then whether every thread of the team has
 * both it and its work buffer buf (after a barrier, so that no thread starts while another failed). */
static inline int team_ready(float **partial, int me, int64_t bias_size, const void *buf, int *failed) {
    float *db = calloc((size_t)bias_size, sizeof(float));
    partial[me] = db;
    if (!buf || !db) {
#pragma omp atomic write
        *failed = 1;
    }
#pragma omp barrier
    int failed_now;
#pragma omp atomic read
    failed_now = *failed;
    return !failed_now;
}

/* The threads' bias gradients summed into dbias (unless a thread failed), then freed. */
static int sum_partials(float *dbias, float **partial, int team, int threads, int64_t size, int failed) {
    if (!failed)
        for (int t = 0; t < team; t++)
            for (int64_t e = 0; e < size; e++) dbias[e] += partial[t][e];
    for (int t = 0; t < threads; t++) free(partial[t]);
    free(partial);
    return failed;
}

static inline void prefetch_rows(const void *base, int es, const int64_t *s, int64_t b, int64_t h,
                                 const int64_t *rows, int i0, int R, int D) {
    for (int r = i0; r < i0 + R; r++)
        for (int d = 0; d < D * es; d += 64) __builtin_prefetch(ROW(base, es, s, b, h, rows[r]) + d);
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && !defined(SWINX_NO_BF16_DOT)
#define BF16_DOT 1

/* bfloat16 forward on cores with AVX512-BF16 (vdpbf16ps: 16 float32 sums of two bfloat16 products per
 * instruction, twice the float32 rate). Pairs of bfloat16 are 32-bit words: word p of a row holds its
 * elements 2p and 2p + 1, so q's rows are broadcast straight from the tensor a word at a time, k is
 * transposed as words into kt2 (D / 2, NP), and v is interleaved in pairs of tokens into vv2 (word d of
 * pair j holds v[2j][d], v[2j + 1][d]; 32 head dims per pair of vectors). The scores, softmax and
 * sums are float32; the probabilities are rounded to bfloat16 for P v, as q, k and v already are. */
static inline __m512 dot_bf16(__m512 acc, __m512i a, __m512i b) {
    return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}

static inline uint32_t word(const void *row, int p) {
    uint32_t w;
    memcpy(&w, (const char *)row + 4 * p, sizeof w);
    return w;
}

/* Scores of R query rows (bfloat16 rows in q) against every key, scaled, biased, into out (R, NP);
 * row maxima into m. */
/* acc[r][t] = q_r . k_(16 t + lane) for R bfloat16 query rows against four tiles of keys of kt2 (DH words
 * of NP), set from zero, in registers. */
static inline __attribute__((always_inline)) void tile4_bf16(int R, const void *const *q, const uint32_t *kt2, int DH,
                                                             int NP, __m512 (*acc)[COL_TILES]) {
    for (int r = 0; r < R; r++)
        for (int t = 0; t < COL_TILES; t++) acc[r][t] = _mm512_setzero_ps();
    for (int p = 0; p < DH; p++) {
        const uint32_t *kp = kt2 + (int64_t)p * NP;
        __m512i b0 = _mm512_loadu_si512(kp), b1 = _mm512_loadu_si512(kp + LANES),
                b2 = _mm512_loadu_si512(kp + 2 * LANES), b3 = _mm512_loadu_si512(kp + 3 * LANES);
        KEEP(b0); KEEP(b1); KEEP(b2); KEEP(b3);
        for (int r = 0; r < R; r++) {
            const __m512i a = _mm512_set1_epi32((int)word(q[r], p));
            acc[r][0] = dot_bf16(acc[r][0], a, b0);
            acc[r][1] = dot_bf16(acc[r][1], a, b1);
            acc[r][2] = dot_bf16(acc[r][2], a, b2);
            acc[r][3] = dot_bf16(acc[r][3], a, b3);
        }
    }
}

static inline __attribute__((always_inline)) void scores_out(int R, int tiles, const __m512 (*acc)[COL_TILES],
                                                             int NP, int c0, const float *bias, float scale,
                                                             float *out, vf *mx) {
    for (int r = 0; r < R; r++)
        for (int t = 0; t < tiles; t++) {
            const int c = c0 + t * LANES;
            vf sc = (vf)acc[r][t] * splat(scale);
            if (bias) sc += load(bias + r * NP + c);
            mx[r] = vmax(mx[r], sc);
            store(out + r * NP + c, sc);
        }
}

static inline __attribute__((always_inline)) void products_bf16(int R, const void *const *q, const uint32_t *kt2,
                                                                int DH, int NP, const float *bias, float scale,
                                                                float *out, float *m) {
    vf mx[ROWS];
    for (int r = 0; r < R; r++) mx[r] = splat(-INFINITY);
    int c0 = 0;
    for (; c0 + COL_TILES * LANES <= NP; c0 += COL_TILES * LANES) { /* full tiles: accumulators in registers */
        __m512 acc[ROWS][COL_TILES];
        tile4_bf16(R, q, kt2 + c0, DH, NP, acc);
        scores_out(R, COL_TILES, acc, NP, c0, bias, scale, out, mx);
    }
    for (; c0 < NP; c0 += LANES) { /* the last 1 to 3 tiles, one at a time */
        __m512 acc[ROWS][COL_TILES];
        for (int r = 0; r < R; r++) acc[r][0] = _mm512_setzero_ps();
        for (int p = 0; p < DH; p++) {
            const __m512i b0 = _mm512_loadu_si512(kt2 + (int64_t)p * NP + c0);
            for (int r = 0; r < R; r++) acc[r][0] = dot_bf16(acc[r][0], _mm512_set1_epi32((int)word(q[r], p)), b0);
        }
        scores_out(R, 1, acc, NP, c0, bias, scale, out, mx);
    }
    if (m)
        row_max(R, mx, m);
}

/* Windows of at most 64 tokens (NP = 64: 7 x 7, 8 x 8): scores, softmax and their bfloat16 pairs for R
 * rows in registers, never stored as float32. */
static inline __attribute__((always_inline)) void softmax64_bf16(int R, const void *const *q, const uint32_t *kt2,
                                                                 int DH, const float *bias, float scale,
                                                                 uint32_t *pw, float *m, float *inv) {
    enum { NP = COL_TILES * LANES };
    __m512 acc[ROWS][COL_TILES];
    tile4_bf16(R, q, kt2, DH, NP, acc);
    vf sc[ROWS][COL_TILES];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < COL_TILES; t++) sc[r][t] = (vf)acc[r][t];
    softmax64_regs(R, sc, bias, scale, m, inv);
    for (int r = 0; r < R; r++) {
        _mm512_storeu_si512(pw + r * NP / 2, (__m512i)_mm512_cvtne2ps_pbh((__m512)sc[r][1], (__m512)sc[r][0]));
        _mm512_storeu_si512(pw + r * NP / 2 + LANES, (__m512i)_mm512_cvtne2ps_pbh((__m512)sc[r][3], (__m512)sc[r][2]));
    }
}

/* pw (R, NP / 2 words): R rows of probabilities (float32, (R, NP), zero past N) as bfloat16 pairs; then
 * out rows (bfloat16, D values) = inv[r] * sum_j w(r, j) . vv2[j], word w(r, j) = pw[r * rs + j * js]
 * (rows of pairs: P v, dS k; or columns of pair rows: P^T do, dS^T q). */
static inline __attribute__((always_inline)) void to_pairs(int R, const float *P, uint32_t *pw, int NP) {
    for (int r = 0; r < R; r++)
        for (int c = 0; c < NP; c += LANES)
            _mm256_storeu_si256((__m256i *)((uint16_t *)(pw + r * NP / 2) + c),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(P + r * NP + c)));
}

static inline __attribute__((always_inline)) void weighted_bf16(int R, const uint32_t *pw, int rs, int js,
                                                                const __m512i *vv2, int pairs, int D,
                                                                const float *inv, void *const *out) {
    const int chunks = (D + 31) / 32;
    for (int ch = 0; ch < chunks; ch++) {
        __m512 acc[ROWS][2];
        for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
        for (int j = 0; j < pairs; j++) {
            __m512i v0 = vv2[((int64_t)j * chunks + ch) * 2], v1 = vv2[((int64_t)j * chunks + ch) * 2 + 1];
            KEEP(v0); KEEP(v1);
            for (int r = 0; r < R; r++) {
                const __m512i a = _mm512_set1_epi32((int)pw[r * rs + (int64_t)j * js]);
                acc[r][0] = dot_bf16(acc[r][0], a, v0);
                acc[r][1] = dot_bf16(acc[r][1], a, v1);
            }
        }
        for (int r = 0; r < R; r++)
            for (int half = 0; half < 2; half++) {
                const int d0 = ch * 32 + half * LANES, left = D - d0;
                if (left <= 0) break;
                const __mmask16 mask = left >= LANES ? 0xFFFF : (__mmask16)((1u << left) - 1);
                const __m256i o = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[r][half], _mm512_set1_ps(inv[r])));
                _mm256_mask_storeu_epi16((uint16_t *)out[r] + d0, mask, o);
            }
    }
}

/* The permutations of two rows' 32 bfloat16 values each that interleave them as words: element k of lo
 * (hi) picks element k / 2 (k / 2 + 16) of the first row for even k, of the second (index + 32) for odd k. */
static inline void pair_index(__m512i *lo, __m512i *hi) {
    uint16_t l[32], h[32];
    for (int e = 0; e < 32; e++) l[e] = (uint16_t)((e & 1) * 32 + e / 2), h[e] = (uint16_t)(l[e] + 16);
    *lo = _mm512_loadu_si512(l);
    *hi = _mm512_loadu_si512(h);
}

/* A unit's bfloat16 rows interleaved in pairs of tokens: vectors 2 (j chunks + ch) and 2 (j chunks + ch) + 1
 * hold dims 32 ch .. 32 ch + 15 and .. + 31 of tokens 2j and 2j + 1 as words (row 2j's value low); a
 * missing token 2j + 1 and dims past D read as zero. lo and hi are `pair_index`'s. */
static inline __attribute__((always_inline)) void interleave_pairs(__m512i *vv2, const void *v, const int64_t *vs,
                                                                   int64_t b, int64_t h, const int64_t *rows, int N,
                                                                   int D, __m512i lo, __m512i hi) {
    const int chunks = (D + 31) / 32;
    for (int j = 0; j < (N + 1) / 2; j++)
        for (int ch = 0; ch < chunks; ch++) {
            const int left = D - ch * 32;
            const __mmask32 mask = left >= 32 ? 0xFFFFFFFFu : (__mmask32)((1u << left) - 1);
            const __m512i a = _mm512_maskz_loadu_epi16(mask, ROW(v, 2, vs, b, h, rows[2 * j]) + 64 * ch);
            const __m512i c = 2 * j + 1 < N ? _mm512_maskz_loadu_epi16(mask, ROW(v, 2, vs, b, h, rows[2 * j + 1]) + 64 * ch)
                                            : _mm512_setzero_si512();
            vv2[((int64_t)j * chunks + ch) * 2] = _mm512_permutex2var_epi16(a, lo, c);
            vv2[((int64_t)j * chunks + ch) * 2 + 1] = _mm512_permutex2var_epi16(a, hi, c);
        }
}

static int forward_bf16(const void *q, const int64_t *qs, const void *k, const int64_t *ks, const void *v,
                        const int64_t *vs, const int64_t *tokens, const float *bias, int64_t bias_windows, void *out,
                        const int64_t *os, float *lse, int64_t B, int64_t nW, int64_t heads, int64_t N, int64_t D,
                        float scale, int threads) {
    const int NP = pad((int)N), DH = (int)D / 2, pairs = ((int)N + 1) / 2, chunks = ((int)D + 31) / 32;
    const int64_t units = B * nW * heads;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        const unsigned csr = denormals_off();
        const size_t kt_words = (size_t)DH * NP, vv_vectors = (size_t)pairs * chunks * 2;
        char *buf = aligned_alloc(64, 64 * vv_vectors + 4 * kt_words + 4 * (size_t)ROWS * NP * 3 / 2 + 64);
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        } else {
            __m512i *vv2 = (__m512i *)buf;
            uint32_t *kt2 = (uint32_t *)(buf + 64 * vv_vectors);
            float *scores = (float *)(kt2 + kt_words);
            uint32_t *pw = (uint32_t *)(scores + (size_t)ROWS * NP);
            memset(kt2, 0, 4 * kt_words); /* keys past N stay zero */
            __m512i lo, hi;
            pair_index(&lo, &hi);
#pragma omp for schedule(static)
            for (int64_t id = 0; id < units; id++) {
                const struct unit_at at = locate(id, units, heads, nW, N, tokens);
                const int64_t b = at.b, h = at.h, w = at.w, b1 = at.b1, h1 = at.h1;
                const int64_t *rows = at.rows, *rows1 = at.rows1;
                if (DH == 16)
                    transpose_words16(kt2, k, 2, ks, b, h, rows, (int)N, NP, 0);
                else
                    for (int i = 0; i < N; i++) {
                        const char *kr = ROW(k, 2, ks, b, h, rows[i]);
                        for (int p = 0; p < DH; p++) kt2[(int64_t)p * NP + i] = word(kr, p);
                    }
                interleave_pairs(vv2, v, vs, b, h, rows, (int)N, (int)D, lo, hi);
                const float *bu = bias + ((bias_windows == 1 ? 0 : w) * heads + h) * N * NP;
                for (int i = 0; i < N;) {
                    const int R = N - i >= ROWS ? ROWS : 1;
                    prefetch_rows(q, 2, qs, b1, h1, rows1, i, R, (int)D);
                    prefetch_rows(k, 2, ks, b1, h1, rows1, i, R, (int)D);
                    prefetch_rows(v, 2, vs, b1, h1, rows1, i, R, (int)D);
                    const void *qr[ROWS];
                    void *o[ROWS];
                    float m[ROWS], inv[ROWS];
                    for (int r = 0; r < R; r++) qr[r] = ROW(q, 2, qs, b, h, rows[i + r]), o[r] = ROW(out, 2, os, b, h, rows[i + r]);
                    const float *bi = bu + (int64_t)i * NP;
                    if (NP == COL_TILES * LANES && R == ROWS)
                        softmax64_bf16(ROWS, qr, kt2, DH, bi, scale, pw, m, inv);
                    else if (NP == COL_TILES * LANES)
                        softmax64_bf16(1, qr, kt2, DH, bi, scale, pw, m, inv);
                    else if (R == ROWS) {
                        products_bf16(ROWS, qr, kt2, DH, NP, bi, scale, scores, m);
                        softmax_rows_np(ROWS, NP, scores, m, inv);
                        to_pairs(ROWS, scores, pw, NP);
                    } else {
                        products_bf16(1, qr, kt2, DH, NP, bi, scale, scores, m);
                        softmax_rows_np(1, NP, scores, m, inv);
                        to_pairs(1, scores, pw, NP);
                    }
                    if (R == ROWS)
                        weighted_bf16(ROWS, pw, NP / 2, 1, vv2, pairs, (int)D, inv, o);
                    else
                        weighted_bf16(1, pw, NP / 2, 1, vv2, pairs, (int)D, inv, o);
                    if (lse)
                        for (int r = 0; r < R; r++) lse[id * N + i + r] = m[r] - logf(inv[r]);
                    i += R;
                }
            }
            free(buf);
        }
        denormals_restore(csr);
    }
    return failed;
}

/* One block of R query rows i.. of the bfloat16 backward (head dim 32: 16 words a row): P (exp of the
 * recomputed scores less the log-sum-exp) and dP = do v^T by dot products, then dS = P (dP - rowsum(do o))
 * and the bias gradient in float32, then dq = scale dS k with dS's rows as bfloat16 pairs of keys. P and
 * dS stay in their (N, NP) float32 buffers for dv and dk. */
static inline __attribute__((always_inline)) void backward_rows_bf16(
    int R, const void *const *qr, const void *const *dor, const void *const *orr, void *const *dqr,
    const uint32_t *kt2, const uint32_t *vt2, const __m512i *kk2, int pairs, int NP, const float *bias,
    const float *lse, float scale, const float *scales, float *P, float *dS, float *dbias, uint32_t *dsw) {
    products_bf16(R, qr, kt2, 16, NP, bias, scale, P, NULL);
    products_bf16(R, dor, vt2, 16, NP, NULL, 1.0f, dS, NULL);
    for (int r = 0; r < R; r++) {
        const uint16_t *d16 = dor[r], *o16 = orr[r];
        const vf dot = load_bf16(d16) * load_bf16(o16) + load_bf16(d16 + LANES) * load_bf16(o16 + LANES);
        const vf delta = splat(hsum(dot)), mr = splat(lse[r]);
        for (int c = 0; c < NP; c += LANES) {
            float *pc = P + r * NP + c, *sc = dS + r * NP + c, *bc = dbias + r * NP + c;
            const vf p = exp_nonpositive(load(pc) - mr), ds = p * (load(sc) - delta);
            store(pc, p);
            store(sc, ds);
            store(bc, load(bc) + ds);
        }
    }
    to_pairs(R, dS, dsw, NP);
    weighted_bf16(R, dsw, NP / 2, 1, kk2, pairs, 32, scales, dqr);
}

/* bfloat16 backward on AVX512-BF16 cores for head dim 32 (every Swin variant's): all five products as
 * vdpbf16ps dot products, twice the float32 rate. S = q k^T and dP = do v^T as the forward's scores;
 * dq = scale dS k against k interleaved in pairs of keys; dv = P^T do and dk = scale dS^T q with P and dS
 * as bfloat16 pairs of queries (word c of pair row i holds rows 2i and 2i + 1 of column c), against do and
 * q interleaved in pairs of queries. P, dS, the row sums and the bias gradient are float32; P and dS are
 * rounded to bfloat16 for the products they feed, as the forward rounds P for P v. */
static int backward_bf16(const void *q, const int64_t *qs, const void *k, const int64_t *ks, const void *v,
                         const int64_t *vs, const int64_t *tokens, const float *bias, int64_t bias_windows,
                         const void *out, const int64_t *os, const void *dout, const int64_t *dos, const float *lse,
                         void *dq, const int64_t *dqs, void *dk, const int64_t *dks, void *dv, const int64_t *dvs,
                         float *dbias, int64_t B, int64_t nW, int64_t heads, int64_t N, float scale, int threads) {
    enum { D = 32, DH = 16 };
    const int NP = pad((int)N), pairs = ((int)N + 1) / 2;
    const int64_t units = B * nW * heads, bias_size = bias_windows * heads * N * NP;
    uint16_t zip_idx[32]; /* two rows' 16 values side by side -> 16 words (row 2i low, 2i + 1 high) */
    for (int c = 0; c < 16; c++) zip_idx[2 * c] = (uint16_t)c, zip_idx[2 * c + 1] = (uint16_t)(16 + c);
    float scales[ROWS], ones[ROWS];
    for (int r = 0; r < ROWS; r++) scales[r] = scale, ones[r] = 1.0f;
    float **partial = calloc((size_t)threads, sizeof(float *)); /* each thread's bias gradient */
    if (!partial) return 1;
    int failed = 0, team = 1;
#pragma omp parallel num_threads(threads)
    {
        const unsigned csr = denormals_off();
        const int me = team_slot(&team);
        /* kk2, dd2, qq2 (pairs x 2 vectors each), kt2, vt2 (DH x NP words), P, dS (N x NP), dsw (ROWS x NP / 2
         * words), PP2, SS2 (pairs x NP words): every size a multiple of 64 bytes */
        const size_t interleaved = (size_t)pairs * 2, tw = (size_t)DH * NP, pn = (size_t)N * NP, pw = (size_t)pairs * NP;
        char *buf = aligned_alloc(64, 64 * 3 * interleaved + 4 * (2 * tw + 2 * pn + (size_t)ROWS * NP / 2 + 2 * pw));
        if (team_ready(partial, me, bias_size, buf, &failed)) {
            float *db = partial[me];
            __m512i *kk2 = (__m512i *)buf, *dd2 = kk2 + interleaved, *qq2 = dd2 + interleaved;
            uint32_t *kt2 = (uint32_t *)(qq2 + interleaved), *vt2 = kt2 + tw;
            float *P = (float *)(vt2 + tw), *dS = P + pn;
            uint32_t *dsw = (uint32_t *)(dS + pn), *PP2 = dsw + (size_t)ROWS * NP / 2, *SS2 = PP2 + pw;
            __m512i lo, hi;
            pair_index(&lo, &hi);
            const __m512i zip = _mm512_loadu_si512(zip_idx);
#pragma omp for schedule(static)
            for (int64_t id = 0; id < units; id++) {
                const struct unit_at at = locate(id, units, heads, nW, N, tokens);
                const int64_t b = at.b, h = at.h, w = at.w, b1 = at.b1, h1 = at.h1;
                const int64_t *rows = at.rows, *rows1 = at.rows1;
                transpose_words16(kt2, k, 2, ks, b, h, rows, (int)N, NP, 0);
                transpose_words16(vt2, v, 2, vs, b, h, rows, (int)N, NP, 0);
                interleave_pairs(kk2, k, ks, b, h, rows, (int)N, D, lo, hi);
                interleave_pairs(dd2, dout, dos, b, h, rows, (int)N, D, lo, hi);
                interleave_pairs(qq2, q, qs, b, h, rows, (int)N, D, lo, hi);
                const int64_t slot = ((bias_windows == 1 ? 0 : w) * heads + h) * N * NP;
                for (int i = 0; i < N;) {
                    const int R = N - i >= ROWS ? ROWS : 1;
                    prefetch_rows(q, 2, qs, b1, h1, rows1, i, R, D);
                    prefetch_rows(k, 2, ks, b1, h1, rows1, i, R, D);
                    prefetch_rows(v, 2, vs, b1, h1, rows1, i, R, D);
                    prefetch_rows(out, 2, os, b1, h1, rows1, i, R, D);
                    prefetch_rows(dout, 2, dos, b1, h1, rows1, i, R, D);
                    const void *qr[ROWS], *dor[ROWS], *orr[ROWS];
                    void *dqr[ROWS];
                    for (int r = 0; r < R; r++) {
                        const int64_t t = rows[i + r];
                        qr[r] = ROW(q, 2, qs, b, h, t), dor[r] = ROW(dout, 2, dos, b, h, t);
                        orr[r] = ROW(out, 2, os, b, h, t), dqr[r] = ROW(dq, 2, dqs, b, h, t);
                    }
                    float *Pi = P + (int64_t)i * NP, *dSi = dS + (int64_t)i * NP, *dbi = db + slot + (int64_t)i * NP;
                    const float *bi = bias + slot + (int64_t)i * NP, *li = lse + id * N + i;
                    if (R == ROWS)
                        backward_rows_bf16(ROWS, qr, dor, orr, dqr, kt2, vt2, kk2, pairs, NP, bi, li, scale, scales,
                                           Pi, dSi, dbi, dsw);
                    else
                        backward_rows_bf16(1, qr, dor, orr, dqr, kt2, vt2, kk2, pairs, NP, bi, li, scale, scales, Pi,
                                           dSi, dbi, dsw);
                    i += R;
                }
                for (int i = 0; i < pairs; i++) /* P and dS as bfloat16 pairs of queries (a missing row 2i + 1: 0) */
                    for (int c = 0; c < NP; c += LANES) {
                        const int odd = 2 * i + 1 < N;
                        const __m512 pe = _mm512_loadu_ps(P + (int64_t)2 * i * NP + c);
                        const __m512 po = odd ? _mm512_loadu_ps(P + (int64_t)(2 * i + 1) * NP + c) : _mm512_setzero_ps();
                        const __m512 se = _mm512_loadu_ps(dS + (int64_t)2 * i * NP + c);
                        const __m512 so = odd ? _mm512_loadu_ps(dS + (int64_t)(2 * i + 1) * NP + c) : _mm512_setzero_ps();
                        _mm512_storeu_si512(PP2 + (int64_t)i * NP + c,
                                            _mm512_permutexvar_epi16(zip, (__m512i)_mm512_cvtne2ps_pbh(po, pe)));
                        _mm512_storeu_si512(SS2 + (int64_t)i * NP + c,
                                            _mm512_permutexvar_epi16(zip, (__m512i)_mm512_cvtne2ps_pbh(so, se)));
                    }
                for (int j = 0; j < N;) {
                    const int R = N - j >= ROWS ? ROWS : 1;
                    void *dvr[ROWS], *dkr[ROWS];
                    for (int r = 0; r < R; r++)
                        dvr[r] = ROW(dv, 2, dvs, b, h, rows[j + r]), dkr[r] = ROW(dk, 2, dks, b, h, rows[j + r]);
                    if (R == ROWS) {
                        weighted_bf16(ROWS, PP2 + j, 1, NP, dd2, pairs, D, ones, dvr);
                        weighted_bf16(ROWS, SS2 + j, 1, NP, qq2, pairs, D, scales, dkr);
                    } else {
                        weighted_bf16(1, PP2 + j, 1, NP, dd2, pairs, D, ones, dvr);
                        weighted_bf16(1, SS2 + j, 1, NP, qq2, pairs, D, scales, dkr);
                    }
                    j += R;
                }
            }
        }
        free(buf);
        denormals_restore(csr);
    }
    return sum_partials(dbias, partial, team, threads, bias_size, failed);
}
#endif

/* q, k, v and out are float32, or bfloat16 where bf16 (computed in float32 either way); the bias and
 * the log-sum-exp are float32. lse may be NULL (inference). */
int swinx_window_attention(const void *q, const int64_t *qs, const void *k, const int64_t *ks, const void *v,
                           const int64_t *vs, const int64_t *tokens, const float *bias, int64_t bias_windows,
                           void *out, const int64_t *os, float *lse, int bf16, int64_t B, int64_t nW, int64_t heads,
                           int64_t N, int64_t D, float scale, int threads) {
#ifdef BF16_DOT
    if (bf16 && D % 2 == 0)
        return forward_bf16(q, qs, k, ks, v, vs, tokens, bias, bias_windows, out, os, lse, B, nW, heads, N, D, scale,
                            threads);
#endif
    const int es = bf16 ? 2 : 4;
    const struct unit u = {(int)N, pad((int)N), (int)D, pad((int)D), scale};
    const int NP = u.NP, DP = u.DP;
    const int64_t units = B * nW * heads;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        const unsigned csr = denormals_off();
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
                const struct unit_at at = locate(id, units, heads, nW, N, tokens);
                const int64_t b = at.b, h = at.h, w = at.w, b1 = at.b1, h1 = at.h1;
                const int64_t *rows = at.rows, *rows1 = at.rows1;
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
                        if (NP == COL_TILES * LANES)
                            softmax64(&u, ROWS, qq + (int64_t)i * DP, kt, bu + (int64_t)i * NP, scale, scores, m, inv);
                        else {
                            products(&u, ROWS, qq + (int64_t)i * DP, kt, bu + (int64_t)i * NP, scale, scores, m);
                            softmax_rows_np(ROWS, NP, scores, m, inv);
                        }
                        weighted(&u, ROWS, scores, NP, 1, vv, inv, o);
                    } else {
                        products(&u, 1, qq + (int64_t)i * DP, kt, bu + (int64_t)i * NP, scale, scores, m);
                        softmax_rows_np(1, NP, scores, m, inv);
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
        denormals_restore(csr);
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
#ifdef BF16_DOT
    if (bf16 && D == 32)
        return backward_bf16(q, qs, k, ks, v, vs, tokens, bias, bias_windows, out, os, dout, dos, lse, dq, dqs, dk, dks,
                             dv, dvs, dbias, B, nW, heads, N, scale, threads);
#endif
    const struct unit u = {(int)N, pad((int)N), (int)D, pad((int)D), scale};
    const int NP = u.NP, DP = u.DP, es = bf16 ? 2 : 4;
    const int64_t units = B * nW * heads, bias_size = bias_windows * heads * N * NP;
    int failed = 0, team = 1;
    float scales[ROWS], ones[ROWS]; /* the row factors of dq, dk (scale) and dv (1) */
    for (int r = 0; r < ROWS; r++) scales[r] = scale, ones[r] = 1.0f;
    float **partial = calloc((size_t)threads, sizeof(float *)); /* each thread's bias gradient */
    if (!partial) return 1;
#pragma omp parallel num_threads(threads)
    {
        const unsigned csr = denormals_off();
        const int me = team_slot(&team);
        /* k^T, v^T, then k, q, o, do as rows (zero padding set once), P and dS */
        const size_t kept = 2 * (size_t)DP * NP + 4 * (size_t)N * DP;
        float *buf = aligned_alloc(64, sizeof(float) * (kept + 2 * (size_t)N * NP + 2 * (size_t)ROWS * DP));
        if (team_ready(partial, me, bias_size, buf, &failed)) {
            float *db = partial[me];
            float *kt = buf, *vt = kt + (size_t)DP * NP, *kk = vt + (size_t)DP * NP, *qq = kk + (size_t)N * DP;
            float *oo = qq + (size_t)N * DP, *dd = oo + (size_t)N * DP, *P = dd + (size_t)N * DP;
            float *dS = P + (size_t)N * NP, *stage = dS + (size_t)N * NP, *stage2 = stage + (size_t)ROWS * DP;
            memset(buf, 0, sizeof(float) * kept);
#pragma omp for schedule(static)
            for (int64_t id = 0; id < units; id++) {
                const struct unit_at at = locate(id, units, heads, nW, N, tokens);
                const int64_t b = at.b, h = at.h, w = at.w, b1 = at.b1, h1 = at.h1;
                const int64_t *rows = at.rows, *rows1 = at.rows1;
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
                    prefetch_rows(q, es, qs, b1, h1, rows1, i, R, (int)D);
                    prefetch_rows(k, es, ks, b1, h1, rows1, i, R, (int)D);
                    prefetch_rows(v, es, vs, b1, h1, rows1, i, R, (int)D);
                    prefetch_rows(out, es, os, b1, h1, rows1, i, R, (int)D);
                    prefetch_rows(dout, es, dos, b1, h1, rows1, i, R, (int)D);
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
        denormals_restore(csr);
    }
    return sum_partials(dbias, partial, team, threads, bias_size, failed);
}
