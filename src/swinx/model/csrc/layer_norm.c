/* LayerNorm for bfloat16 rows, inference and training: bfloat16 rows in, float32 weight and bias,
 * bfloat16 out (what PyTorch's mixed-type norm returns for the residual stream under bf16 autocast).
 *
 * Each row is widened to float32 in a stack buffer (it stays in L1 for the three passes), then
 * mean and the biased variance by two passes, rstd = 1 / sqrt(var + eps), and
 * out = (x - mean) * rstd * weight + bias rounded once to bfloat16, to nearest even. A row is short
 * (Swin's widths are 96-3072), so the two horizontal sums are a tree of adds: with a serial sum of
 * the 16 lanes the kernel was 1.2-1.35x PyTorch's, with the tree 1.4-1.6x (AMD EPYC Zen 4). */
#include <math.h>
#include <omp.h>

#include "vector.h"

static inline float hsum(vf v) {
#ifdef __AVX512F__
    return _mm512_reduce_add_ps((__m512)v);
#else
    float s = 0.0f;
    for (int i = 0; i < LANES; i++) s += v[i];
    return s;
#endif
}

/* x: the row in float32, padded with zeros to whole vectors (padded = C rounded up to LANES). */
static void norm_row(const float *x, const float *w, const float *b, uint16_t *out, int64_t C, int64_t padded,
                     float eps, float *mean_out, float *rstd_out) {
    vf acc = splat(0.0f);
    for (int64_t j = 0; j < padded; j += LANES) acc += load(x + j);
    const float mean = hsum(acc) / (float)C;
    acc = splat(0.0f);
    int64_t j = 0;
    for (; j + LANES <= C; j += LANES) {
        const vf d = load(x + j) - splat(mean);
        acc += d * d;
    }
    if (j < C) { /* the padding's zeros are no deviations: masked out */
        const vi lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
        const vf d = where(lane < (vi){} + (int32_t)(C - j), load(x + j) - splat(mean), splat(0.0f));
        acc += d * d;
    }
    const float rstd = 1.0f / sqrtf(hsum(acc) / (float)C + eps);
    if (mean_out) {
        *mean_out = mean;
        *rstd_out = rstd;
    }
    for (j = 0; j + LANES <= C; j += LANES)
        store_bf16(out + j, (load(x + j) - splat(mean)) * splat(rstd) * load(w + j) + load(b + j));
    if (j < C) { /* the row's last few values, through padded copies */
        float ww[LANES] = {0}, bb[LANES] = {0};
        uint16_t oo[LANES];
        memcpy(ww, w + j, sizeof(float) * (C - j));
        memcpy(bb, b + j, sizeof(float) * (C - j));
        store_bf16(oo, (load(x + j) - splat(mean)) * splat(rstd) * load(ww) + load(bb));
        memcpy(out + j, oo, sizeof(uint16_t) * (C - j));
    }
}

/* A bfloat16 row as float32, zeros past C up to `padded`. */
static void widen_row(const uint16_t *src, float *row, int64_t C, int64_t padded) {
    int64_t j = 0;
    for (; j + LANES <= C; j += LANES) store(row + j, load_bf16(src + j));
    for (; j < padded; j++) {
        const uint32_t bits = j < C ? (uint32_t)src[j] << 16 : 0;
        memcpy(row + j, &bits, sizeof bits);
    }
}

/* mean and rstd: each row's (float32, for the backward), or NULL in inference. */
void swinx_layer_norm_bf16(const uint16_t *x, const float *w, const float *b, uint16_t *out, float *mean, float *rstd,
                           int64_t rows, int64_t C, float eps, int threads) {
    const int64_t padded = (C + LANES - 1) / LANES * LANES;
#pragma omp parallel num_threads(threads)
    {
        float row[padded];
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            widen_row(x + r * C, row, C, padded);
            norm_row(row, w, b, out + r * C, C, padded, eps, mean ? mean + r : NULL, rstd ? rstd + r : NULL);
        }
    }
}

/* The backward from the gradient dy (bfloat16) of out: with xhat = (x - mean) rstd and g = dy weight,
 * dx = rstd (g - mean(g) - xhat mean(g xhat)) (bfloat16, a fresh tensor),
 * and the weight and bias gradients dy xhat and dy summed over the rows: thread t adds its rows into
 * partial[t * 2 padded ...] (weight's, then bias's, each `padded` long), which the caller sums. */
void swinx_layer_norm_bf16_backward(const uint16_t *dy, const uint16_t *x, const float *w, const float *mean,
                                    const float *rstd, uint16_t *dx, float *partial, int64_t rows, int64_t C,
                                    int threads) {
    const int64_t padded = (C + LANES - 1) / LANES * LANES;
#pragma omp parallel num_threads(threads)
    {
        float xr[padded], gr[padded], ww[padded];
        memset(ww, 0, sizeof ww);
        memcpy(ww, w, sizeof(float) * C);
        float *dw = partial ? partial + (int64_t)omp_get_thread_num() * 2 * padded : NULL, *db = dw ? dw + padded : NULL;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            widen_row(x + r * C, xr, C, padded);
            widen_row(dy + r * C, gr, C, padded);
            const vf m = splat(mean[r]), s = splat(rstd[r]);
            vf sum_g = splat(0.0f), sum_gx = splat(0.0f);
            for (int64_t j = 0; j < padded; j += LANES) { /* the padding: dy = 0 there, so g = 0 */
                const vf xhat = (load(xr + j) - m) * s, d = load(gr + j), g = d * load(ww + j);
                sum_g += g;
                sum_gx += g * xhat;
                if (dw) {
                    store(dw + j, load(dw + j) + d * xhat);
                    store(db + j, load(db + j) + d);
                }
                store(xr + j, xhat);
                store(gr + j, g);
            }
            const vf mg = splat(hsum(sum_g) / (float)C), mgx = splat(hsum(sum_gx) / (float)C);
            int64_t j = 0;
            for (; j + LANES <= C; j += LANES) store_bf16(dx + r * C + j, s * (load(gr + j) - mg - load(xr + j) * mgx));
            if (j < C) {
                uint16_t oo[LANES];
                store_bf16(oo, s * (load(gr + j) - mg - load(xr + j) * mgx));
                memcpy(dx + r * C + j, oo, sizeof(uint16_t) * (C - j));
            }
        }
    }
}
