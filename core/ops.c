/* ops.c -- the small math ops of a transformer, one function each.
 *
 * Every reduction runs in a fixed order so a result never depends on the thread
 * that computed it or on what else was in the batch. */
#include "core/ops.h"

#include <math.h>

/* RMSNorm: o = x * w / sqrt(mean(x^2) + eps); the sum of squares in double so a
 * large n_embd loses nothing to rounding, as 8 running sums (a fixed order the
 * compiler can vectorise; one sequential sum is bound by add latency). o may alias x. */
void rmsnorm(float *o, const float *x, const float *w, int n, float eps)
{
    double acc[8] = {0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) acc[j] += (double)x[i + j] * (double)x[i + j];
    double ss = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; i < n; i++) ss += (double)x[i] * (double)x[i];
    float scale = (float)(1.0 / sqrt(ss / (double)n + (double)eps));
    for (i = 0; i < n; i++) o[i] = w[i] * (x[i] * scale);
}

/* In-place softmax; subtracting the max keeps expf from overflowing. */
void softmax(float *x, int n)
{
    if (n <= 0) return;
    float max = x[0];
    for (int i = 1; i < n; i++)
        if (x[i] > max) max = x[i];
    float sum = 0.0f;
    for (int i = 0; i < n; i++) {
        x[i] = expf(x[i] - max);
        sum += x[i];
    }
    float inv = 1.0f / sum;
    for (int i = 0; i < n; i++) x[i] *= inv;
}

/* Logistic function, written so neither branch overflows: exp of a non-positive
 * number only. sigmoid(0) is exactly 0.5 (unlike silu(g)/g, which is NaN there). */
float sigmoid(float x)
{
    if (x >= 0.0f) return 1.0f / (1.0f + expf(-x));
    float e = expf(x);
    return e / (1.0f + e);
}

/* SiLU (swish): x * sigmoid(x). */
float silu(float x)
{
    return x * sigmoid(x);
}

/* Rotary position embedding of one head vector. Pair i (0 <= i < rope_dim/2) turns
 * by theta_i = pos * base^(-2i/rope_dim); normal mode pairs (x[2i], x[2i+1]), NeoX
 * pairs (x[i], x[i + rope_dim/2]). Dims past rope_dim are left alone. The angle is
 * formed in double: at positions in the thousands float loses the low bits. */
void rope(float *head, int head_dim, int rope_dim, int pos, float base, moe_rope_mode mode)
{
    if (rope_dim > head_dim) rope_dim = head_dim;
    int half = rope_dim / 2;
    for (int i = 0; i < half; i++) {
        double theta = (double)pos * pow((double)base, -2.0 * (double)i / (double)rope_dim);
        float c = (float)cos(theta), s = (float)sin(theta);
        int a = mode == MOE_ROPE_NEOX ? i : 2 * i;
        int b = mode == MOE_ROPE_NEOX ? i + half : 2 * i + 1;
        float x0 = head[a], x1 = head[b];
        head[a] = x0 * c - x1 * s;
        head[b] = x0 * s + x1 * c;
    }
}

/* Index of the largest element, lowest index on ties; NaNs never win. */
int argmax(const float *x, int n)
{
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best] || (x[best] != x[best] && x[i] == x[i])) best = i;
    return best;
}
