/* GELU's backward for training, float32: from fc1's output h and the gradient g of GELU(h), one pass
 * writes g * GELU'(h) over g and GELU(h) (which fc2's weight gradient needs) into act.
 *
 * GELU(x) = x Phi(x), Phi(x) = (1 + erf(x / sqrt 2)) / 2, GELU'(x) = Phi(x) + x exp(-x^2 / 2) / sqrt(2 pi).
 * erf is Abramowitz and Stegun's 7.1.26 (within 1.5e-7), the approximation PyTorch's vectorised CPU
 * erf uses too, and its exp(-z^2) is the exp(-x^2 / 2) of the slope, so an element costs one exp and
 * one division. PyTorch computes the same two results in two passes, the slope's pass with a scalar
 * erf and exp per element. exp is the attention kernel's (vector.h). */
#include "vector.h"

static inline vf gelu_grad(const float *h, float *g, float *act) {
    vf x, d;
    memcpy(&x, h, sizeof x);
    memcpy(&d, g, sizeof d);
    const vi negative = x < splat(0.0f);
    const vf z = where(negative, -x, x) * splat(0.70710678118654752f);
    const vf t = splat(1.0f) / (splat(1.0f) + splat(0.3275911f) * z);
    vf poly = splat(1.061405429f);
    poly = poly * t + splat(-1.453152027f);
    poly = poly * t + splat(1.421413741f);
    poly = poly * t + splat(-0.284496736f);
    poly = poly * t + splat(0.254829592f);
    poly = poly * t;
    const vf e = exp_nonpositive(-(z * z));
    const vf erf_abs = splat(1.0f) - poly * e;
    const vf cdf = splat(0.5f) + splat(0.5f) * where(negative, -erf_abs, erf_abs);
    const vf value = x * cdf, slope = cdf + x * e * splat(0.39894228040143268f);
    d = d * slope;
    memcpy(act, &value, sizeof value);
    memcpy(g, &d, sizeof d);
    return d;
}

void swinx_gelu_backward(const float *h, float *g, float *act, int64_t n, int threads) {
    enum { L = 16, CHUNK = 4096 };
    const int64_t chunks = (n + CHUNK - 1) / CHUNK;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t end = (c + 1) * CHUNK < n ? (c + 1) * CHUNK : n;
        int64_t i = c * CHUNK;
        for (; i + L <= end; i += L) gelu_grad(h + i, g + i, act + i);
        if (i < end) { /* the last few elements, through padded copies */
            float hh[L] = {0}, gg[L] = {0}, aa[L];
            memcpy(hh, h + i, sizeof(float) * (end - i));
            memcpy(gg, g + i, sizeof(float) * (end - i));
            gelu_grad(hh, gg, aa);
            memcpy(g + i, gg, sizeof(float) * (end - i));
            memcpy(act + i, aa, sizeof(float) * (end - i));
        }
    }
}

/* The same for a (rows, width) block, also summing g * GELU'(h) over the rows: fc1's bias gradient,
 * which would otherwise read the whole gradient again. Thread t takes the t-th of `threads` row
 * ranges and writes its column sums to partial[t * width ...]; the caller adds the rows of partial. */
void swinx_gelu_backward_sums(const float *h, float *g, float *act, int64_t rows, int64_t width, float *partial,
                              int threads) {
    enum { L = 16 };
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < threads; t++) {
        float *sums = partial + t * width;
        for (int64_t r = rows * t / threads; r < rows * (t + 1) / threads; r++) {
            const int64_t row = r * width;
            int64_t j = 0;
            for (; j + L <= width; j += L) store(sums + j, load(sums + j) + gelu_grad(h + row + j, g + row + j, act + row + j));
            if (j < width) { /* the row's last few columns, through padded copies */
                float hh[L] = {0}, gg[L] = {0}, aa[L];
                memcpy(hh, h + row + j, sizeof(float) * (width - j));
                memcpy(gg, g + row + j, sizeof(float) * (width - j));
                gelu_grad(hh, gg, aa);
                memcpy(g + row + j, gg, sizeof(float) * (width - j));
                memcpy(act + row + j, aa, sizeof(float) * (width - j));
                for (int64_t k = j; k < width; k++) sums[k] += gg[k - j];
            }
        }
    }
}
