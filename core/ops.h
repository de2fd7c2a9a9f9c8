/* ops.h -- the small math ops of a transformer, one function each. */
#ifndef MOE_CORE_OPS_H
#define MOE_CORE_OPS_H

#include "core/model.h"

/* o = x * w / sqrt(mean(x^2) + eps); o may alias x. */
void rmsnorm(float *o, const float *x, const float *w, int n, float eps);
/* In place, numerically stable. */
void softmax(float *x, int n);
float silu(float x);
float sigmoid(float x);
/* Rotate the first rope_dim dims of one head vector at position pos. */
void rope(float *head, int head_dim, int rope_dim, int pos, float base, moe_rope_mode mode);
/* Index of the largest element (lowest index on ties). */
int argmax(const float *x, int n);

#endif
