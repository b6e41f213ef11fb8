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
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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

struct unit {
    int N, NP, D, DP; /* tokens and head dim, each padded to a multiple of LANES */
    float scale;
    const float *kt; /* (DP, NP): k transposed, padded keys zero */
    const float *v;  /* (N, DP), padded dims zero */
};

/* Scores, softmax and output for R query rows (1 <= R <= ROWS) of one unit. The bias rows are NP
 * long, -inf past N. */
static inline __attribute__((always_inline)) void rows_block(const struct unit *u, int R, const float *const *q,
                                                             const float *bias, float *const *out,
                                                             float *scores /* (ROWS, NP) */) {
    const int NP = u->NP, D = u->D, N = u->N, DP = u->DP;
    vf mx[ROWS];
    for (int r = 0; r < R; r++) mx[r] = splat(-INFINITY);
    for (int c0 = 0; c0 < NP; c0 += COL_TILES * LANES) {
        const int tiles = (NP - c0) / LANES < COL_TILES ? (NP - c0) / LANES : COL_TILES;
        vf acc[ROWS][COL_TILES] = {};
        if (tiles == COL_TILES) {
            for (int d = 0; d < D; d++) {
                const float *kd = u->kt + (int64_t)d * NP + c0;
                vf k0 = load(kd), k1 = load(kd + LANES), k2 = load(kd + 2 * LANES), k3 = load(kd + 3 * LANES);
                for (int r = 0; r < R; r++) {
                    vf qd = splat(q[r][d]);
                    acc[r][0] += qd * k0;
                    acc[r][1] += qd * k1;
                    acc[r][2] += qd * k2;
                    acc[r][3] += qd * k3;
                }
            }
        } else {
            for (int d = 0; d < D; d++) {
                const float *kd = u->kt + (int64_t)d * NP + c0;
                for (int r = 0; r < R; r++) {
                    vf qd = splat(q[r][d]);
                    for (int t = 0; t < tiles; t++) acc[r][t] += qd * load(kd + t * LANES);
                }
            }
        }
        for (int r = 0; r < R; r++)
            for (int t = 0; t < tiles; t++) {
                const int c = c0 + t * LANES;
                vf sc = acc[r][t] * splat(u->scale) + load(bias + r * NP + c);
                mx[r] = vmax(mx[r], sc);
                store(scores + r * NP + c, sc);
            }
    }
    float inv[ROWS];
    for (int r = 0; r < R; r++) {
        float *s = scores + r * NP;
        const vf m = splat(hmax(mx[r]));
        vf sum = {};
        for (int c = 0; c < NP; c += LANES) {
            vf e = exp_nonpositive(load(s + c) - m);
            store(s + c, e);
            sum += e;
        }
        inv[r] = 1.0f / hsum(sum);
    }
    for (int c0 = 0; c0 < DP; c0 += 2 * LANES) {
        const int two = DP - c0 >= 2 * LANES;
        vf acc[ROWS][2] = {};
        for (int j = 0; j < N; j++) {
            const float *vj = u->v + (int64_t)j * DP + c0;
            vf v0 = load(vj), v1 = two ? load(vj + LANES) : splat(0.0f);
            for (int r = 0; r < R; r++) {
                vf p = splat(scores[r * NP + j]);
                acc[r][0] += p * v0;
                acc[r][1] += p * v1;
            }
        }
        for (int r = 0; r < R; r++) {
            float *o = out[r] + c0;
            vf a[2] = {acc[r][0] * splat(inv[r]), acc[r][1] * splat(inv[r])};
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

static inline int pad(int n) { return (n + LANES - 1) / LANES * LANES; }

int swinx_window_attention_f32(const float *q, const int64_t *qs, const float *k, const int64_t *ks, const float *v,
                               const int64_t *vs, const int64_t *tokens, const float *bias, int64_t bias_windows,
                               float *out, const int64_t *os, int64_t B, int64_t nW, int64_t heads, int64_t N,
                               int64_t D, float scale, int threads) {
    const int NP = pad((int)N), DP = pad((int)D);
    const int64_t units = B * nW * heads;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *buf = aligned_alloc(64, sizeof(float) * ((size_t)DP * NP + (size_t)N * DP + (size_t)ROWS * NP));
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        } else {
            float *kt = buf, *vv = buf + (size_t)DP * NP, *scores = vv + (size_t)N * DP;
            memset(buf, 0, sizeof(float) * ((size_t)DP * NP + (size_t)N * DP));
#pragma omp for schedule(static)
            for (int64_t unit_id = 0; unit_id < units; unit_id++) {
                const int64_t h = unit_id % heads, w = unit_id / heads % nW, b = unit_id / heads / nW;
                const int64_t *rows = tokens + w * N; /* this window's tokens */
                const float *qu = q + b * qs[0] + h * qs[2], *ku = k + b * ks[0] + h * ks[2];
                const float *vu = v + b * vs[0] + h * vs[2];
                float *ou = out + b * os[0] + h * os[2];
                /* The next unit's rows, fetched a block of rows at a time while this unit computes. */
                const int64_t next = unit_id + 1 < units ? unit_id + 1 : unit_id;
                const int64_t h1 = next % heads, w1 = next / heads % nW, b1 = next / heads / nW;
                const int64_t *rows1 = tokens + w1 * N;
                const float *q1 = q + b1 * qs[0] + h1 * qs[2], *k1 = k + b1 * ks[0] + h1 * ks[2];
                const float *v1 = v + b1 * vs[0] + h1 * vs[2];
                for (int d = 0; d < D; d++)
                    for (int i = 0; i < N; i++) kt[(int64_t)d * NP + i] = ku[rows[i] * ks[1] + d];
                for (int i = 0; i < N; i++) memcpy(vv + (int64_t)i * DP, vu + rows[i] * vs[1], sizeof(float) * D);
                const struct unit u = {(int)N, NP, (int)D, DP, scale, kt, vv};
                const float *bu = bias + ((bias_windows == 1 ? 0 : w) * heads + h) * N * NP;
                for (int i = 0; i < N;) {
                    const int R = N - i >= ROWS ? ROWS : 1;
                    for (int r = i; r < i + R; r++)
                        for (int d = 0; d < D; d += 64 / sizeof(float)) {
                            __builtin_prefetch(q1 + rows1[r] * qs[1] + d);
                            __builtin_prefetch(k1 + rows1[r] * ks[1] + d);
                            __builtin_prefetch(v1 + rows1[r] * vs[1] + d);
                        }
                    const float *qrows[ROWS];
                    float *orows[ROWS];
                    for (int r = 0; r < R; r++) {
                        qrows[r] = qu + rows[i + r] * qs[1];
                        orows[r] = ou + rows[i + r] * os[1];
                    }
                    if (R == ROWS)
                        rows_block(&u, ROWS, qrows, bu + (int64_t)i * NP, orows, scores);
                    else
                        rows_block(&u, 1, qrows, bu + (int64_t)i * NP, orows, scores);
                    i += R;
                }
            }
            free(buf);
        }
    }
    return failed;
}
