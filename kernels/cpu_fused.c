/* Fused elementwise chains of the CPU training step, fp32, one pass each (kernels/native.py builds and calls them).
 *
 * Torch runs each chain as 3-5 separate ops, each a full pass over a [tokens, features] tensor that is cold in the
 * cache by the time the backward reads it; here every element is read and written once. Each function covers
 * the range it is given (elements or rows), so the caller splits the work between threads.
 * Compiled without -ffast-math: divisions and square roots stay exact (its reciprocal estimates cost about 20 fp32
 * ulps of logit drift between two forward paths of the tests' tiny models), reductions may reassociate
 * (-fassociative-math, so their loops vectorize), and expf / logf are declared SIMD so that gcc calls glibc's vector
 * versions (libmvec, accurate to 1 ulp or so), as math.h itself declares them only under -ffast-math.
 */
#include <math.h>
#include <stddef.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__)
#pragma omp declare simd notinbranch
float expf(float);
#pragma omp declare simd notinbranch
float logf(float);
#endif

typedef float floats8 __attribute__((vector_size(32)));
typedef int ints8 __attribute__((vector_size(32)));

/* max(x[0 .. n)), n >= 1. gcc vectorizes a max reduction only when it may drop NaN semantics (-ffinite-math-only),
 * so this one runs 8 lanes of `v > best ? v : best` in gcc's vector extension (the same result, NaN or not). */
static inline float row_maximum(const float *restrict x, ptrdiff_t n) {
    float m = x[0];
    ptrdiff_t c = 0;
    if (n >= 8) {
        floats8 best, v;
        memcpy(&best, x, sizeof best);
        for (c = 8; c + 8 <= n; c += 8) {
            memcpy(&v, x + c, sizeof v);
            ints8 greater = v > best;
            best = (floats8)((greater & (ints8)v) | (~greater & (ints8)best));
        }
        for (int l = 0; l < 8; l++)
            m = best[l] > m ? best[l] : m;
    }
    for (; c < n; c++)
        m = x[c] > m ? x[c] : m;
    return m;
}

static inline float sigmoid(float g) {
    return 1.0f / (1.0f + expf(-g));  /* expf overflows to inf for g < -88.7: 1 / inf = 0 */
}

/* out = silu(gate) * up, with silu(g) = g * sigmoid(g) */
void swiglu_forward(const float *restrict gate, const float *restrict up, float *restrict out, ptrdiff_t n) {
    for (ptrdiff_t i = 0; i < n; i++) {
        float g = gate[i];
        out[i] = g * sigmoid(g) * up[i];
    }
}

/* dup = dy * silu(g);  dgate = dy * up * sigmoid(g) * (1 + g * (1 - sigmoid(g))) */
void swiglu_backward(const float *restrict dy, const float *restrict gate, const float *restrict up,
                     float *restrict dgate, float *restrict dup, ptrdiff_t n) {
    for (ptrdiff_t i = 0; i < n; i++) {
        float g = gate[i], d = dy[i];
        float sig = sigmoid(g);
        dup[i] = d * (g * sig);
        dgate[i] = d * up[i] * (sig * (1.0f + g * (1.0f - sig)));
    }
}

/* Per row of x [rows, cols]: rstd = 1 / sqrt(mean(x^2) + eps), y = (x * rstd) * weight. */
void rms_norm_forward(const float *restrict x, const float *restrict weight, float eps, float *restrict y,
                      float *restrict rstd, ptrdiff_t rows, ptrdiff_t cols) {
    for (ptrdiff_t r = 0; r < rows; r++) {
        const float *xr = x + r * cols;
        float *yr = y + r * cols;
        float squares = 0.0f;
        for (ptrdiff_t c = 0; c < cols; c++)
            squares += xr[c] * xr[c];
        float inv = 1.0f / sqrtf(squares / (float)cols + eps);
        for (ptrdiff_t c = 0; c < cols; c++)
            yr[c] = xr[c] * inv * weight[c];
        rstd[r] = inv;
    }
}

/* Per row, with dn = dy * weight:  dx = rstd * dn - x * rstd^3 * sum(dn * x) / cols. */
void rms_norm_backward(const float *restrict dy, const float *restrict x, const float *restrict weight,
                       const float *restrict rstd, float *restrict dx, ptrdiff_t rows, ptrdiff_t cols) {
    for (ptrdiff_t r = 0; r < rows; r++) {
        const float *dyr = dy + r * cols, *xr = x + r * cols;
        float *dxr = dx + r * cols;
        float dot = 0.0f;
        for (ptrdiff_t c = 0; c < cols; c++)
            dot += dyr[c] * weight[c] * xr[c];
        float inv = rstd[r];
        float coefficient = -dot * inv * inv * inv / (float)cols;
        for (ptrdiff_t c = 0; c < cols; c++)
            dxr[c] = dyr[c] * weight[c] * inv + xr[c] * coefficient;
    }
}

/* Per row of logits [rows, vocab], overwritten with the gradient when write_grad: loss = logsumexp(x) - x[label];
 * the gradient (softmax(x) - onehot(label)) * scale, scale = row_scale[row] (1 when row_scale is NULL). A row whose
 * label is ignore_index has loss 0 and gradient 0. The sum pass stores exp(x - max), which the last pass scales:
 * one exp per logit, and the row (192 KB at a 49k vocabulary) stays in the L2 cache between the passes. */
void cross_entropy_rows(float *restrict logits, const long long *restrict labels, float *restrict loss,
                        const float *restrict row_scale, ptrdiff_t rows, ptrdiff_t vocab, long long ignore_index,
                        int write_grad) {
    for (ptrdiff_t r = 0; r < rows; r++) {
        float *x = logits + r * vocab;
        long long label = labels[r];
        int valid = label != ignore_index;
        float target = valid ? x[label] : 0.0f;
        float row_max = row_maximum(x, vocab);
        float sum = 0.0f;
        if (write_grad) {
            for (ptrdiff_t c = 0; c < vocab; c++) {
                x[c] = expf(x[c] - row_max);
                sum += x[c];
            }
        } else {
            for (ptrdiff_t c = 0; c < vocab; c++)
                sum += expf(x[c] - row_max);
        }
        loss[r] = valid ? row_max + logf(sum) - target : 0.0f;
        if (!write_grad)
            continue;
        float scale = valid ? (row_scale ? row_scale[r] : 1.0f) : 0.0f;
        float factor = scale / sum;
        for (ptrdiff_t c = 0; c < vocab; c++)
            x[c] *= factor;
        if (valid)
            x[label] -= scale;
    }
}

/* Rotate-half RoPE of x [rows, heads, dim] (rows = batch x positions) with cos, sin [rows, dim] into out: per head,
 *   out1 = x1 cos1 - x2 sin1,  out2 = x2 cos2 + x1 sin2        (halves 1 and 2 of the last dimension)
 * and with adjoint (the backward) the transposed rotation:
 *   out1 = x1 cos1 + x2 sin2,  out2 = x2 cos2 - x1 sin1 */
void rope(const float *restrict x, const float *restrict cos, const float *restrict sin, float *restrict out,
          ptrdiff_t rows, ptrdiff_t heads, ptrdiff_t dim, int adjoint) {
    ptrdiff_t half = dim / 2;
    float sign = adjoint ? -1.0f : 1.0f;
    for (ptrdiff_t r = 0; r < rows; r++) {
        const float *c = cos + r * dim, *s = sin + r * dim;
        const float *s1 = adjoint ? s + half : s, *s2 = adjoint ? s : s + half;
        for (ptrdiff_t h = 0; h < heads; h++) {
            const float *xr = x + (r * heads + h) * dim;
            float *o = out + (r * heads + h) * dim;
            for (ptrdiff_t i = 0; i < half; i++) {
                o[i] = xr[i] * c[i] - sign * xr[i + half] * s1[i];
                o[i + half] = xr[i + half] * c[i + half] + sign * xr[i] * s2[i];
            }
        }
    }
}

/* Causal attention over one block of queries (kernels/cpu_attention.py), per row of a [heads, rows, keys] block:
 * rows are position-major (row i is query t0 + i / group of the document), scores are in log2 units, and row i
 * sees keys 0 .. t0 + i / group; the keys after it are written 0 without an exp. exp2(s) is expf(s ln 2). */
#define LN2 0.6931471805599453f

/* The forward's softmax numerator in place: scores -> exp2(scores - row_max), with row_max and row_sum [heads, rows]
 * out (lse = row_max + log2(row_sum)). */
void attention_forward_block(float *restrict scores, float *restrict row_max, float *restrict row_sum,
                             ptrdiff_t heads, ptrdiff_t rows, ptrdiff_t keys, ptrdiff_t t0, ptrdiff_t group) {
    for (ptrdiff_t h = 0; h < heads; h++) {
        for (ptrdiff_t i = 0; i < rows; i++) {
            float *s = scores + (h * rows + i) * keys;
            ptrdiff_t visible = t0 + i / group + 1;
            float m = row_maximum(s, visible);
            float sum = 0.0f;
            for (ptrdiff_t j = 0; j < visible; j++) {
                s[j] = expf((s[j] - m) * LN2);
                sum += s[j];
            }
            for (ptrdiff_t j = visible; j < keys; j++)
                s[j] = 0.0f;
            row_max[h * rows + i] = m;
            row_sum[h * rows + i] = sum;
        }
    }
}

/* The backward's probabilities in place: logits -> exp2(logits - lse); lse rows of head h at lse + h * lse_stride. */
void attention_backward_probs(float *restrict logits, const float *restrict lse, ptrdiff_t lse_stride,
                              ptrdiff_t heads, ptrdiff_t rows, ptrdiff_t keys, ptrdiff_t t0, ptrdiff_t group) {
    for (ptrdiff_t h = 0; h < heads; h++) {
        for (ptrdiff_t i = 0; i < rows; i++) {
            float *s = logits + (h * rows + i) * keys;
            float offset = lse[h * lse_stride + i];
            ptrdiff_t visible = t0 + i / group + 1;
            for (ptrdiff_t j = 0; j < visible; j++)
                s[j] = expf((s[j] - offset) * LN2);
            for (ptrdiff_t j = visible; j < keys; j++)
                s[j] = 0.0f;
        }
    }
}

/* The backward's score gradients in place: dprobs -> probs * (dprobs - delta); delta as lse above. */
void attention_backward_dscores(float *restrict dprobs, const float *restrict probs, const float *restrict delta,
                                ptrdiff_t delta_stride, ptrdiff_t heads, ptrdiff_t rows, ptrdiff_t keys) {
    for (ptrdiff_t h = 0; h < heads; h++) {
        for (ptrdiff_t i = 0; i < rows; i++) {
            float *d = dprobs + (h * rows + i) * keys;
            const float *p = probs + (h * rows + i) * keys;
            float offset = delta[h * delta_stride + i];
            for (ptrdiff_t j = 0; j < keys; j++)
                d[j] = p[j] * (d[j] - offset);
        }
    }
}
