/*
 * The small per-layer ops of a decoder on the CPU, each fused into one call: RMSNorm (with the
 * residual add before it), rotary embedding in place, and SwiGLU's silu(gate) * up.
 *
 * At decode a step's tensors are a few rows wide, so the cost of these ops in PyTorch is not
 * arithmetic but dispatch: about ten tensor ops (each a few microseconds, each allocating its
 * output) per norm and per rotation, thirty layers a step. One call here does each in one pass
 * over the rows. Rows are spread over PyTorch's OpenMP team when there are enough of them to
 * pay for waking it (prefill); a decode's few rows run on the calling thread.
 *
 * Every op takes float32 or bfloat16 data (`bf16` says which) and computes in float32; a
 * bfloat16 result is rounded to nearest even at the same points where PyTorch's bfloat16 ops
 * round, so the fused and unfused models agree to rounding, not only to tolerance.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "fastmath.h"

/* Rows per call below which the op stays on the calling thread. */
#define PARALLEL_ROWS 32

/* out = weight * (h * rsqrt(mean(h^2) + eps)) per row, with h = x, or with residual += x
   first and h = residual (the updated residual stays in `residual`). As transformers' RMSNorm:
   the normalised row is rounded to the dtype before the weight multiplies it. */
static inline __attribute__((always_inline)) void rms_row(
    const void *x, void *residual, const void *w, void *out, int bf16, int64_t r, int64_t dim,
    float eps)
{
    const int64_t base = r * dim;
    float ss = 0.f;
    if (residual) {
        for (int64_t i = 0; i < dim; i++) {
            const float h = rnd(bf16, ld(x, bf16, base + i) + ld(residual, bf16, base + i));
            st(residual, bf16, base + i, h);
            ss += h * h;
        }
    } else {
        for (int64_t i = 0; i < dim; i++) {
            const float h = ld(x, bf16, base + i);
            ss += h * h;
        }
    }
    const void *src = residual ? residual : x;
    const float inv = 1.f / sqrtf(ss / (float)dim + eps);
    for (int64_t i = 0; i < dim; i++)
        st(out, bf16, base + i, rnd(bf16, ld(w, bf16, i) * rnd(bf16, ld(src, bf16, base + i) * inv)));
}

static void rms_norm(const void *x, void *residual, const void *w, void *out, int bf16,
                     int64_t rows, int64_t dim, float eps)
{
#pragma omp parallel for if (rows >= PARALLEL_ROWS) schedule(static)
    for (int64_t r = 0; r < rows; r++) rms_row(x, residual, w, out, bf16, r, dim, eps);
}

void rms_norm_f32(const float *x, float *residual, const float *w, float *out, int64_t rows,
                  int64_t dim, float eps)
{
    rms_norm(x, residual, w, out, 0, rows, dim, eps);
}

void rms_norm_bf16(const uint16_t *x, uint16_t *residual, const uint16_t *w, uint16_t *out,
                   int64_t rows, int64_t dim, float eps)
{
    rms_norm(x, residual, w, out, 1, rows, dim, eps);
}

/* One row's `heads` heads; inlined with head_dim a constant for the common sizes, so the
   half-row loops become a few whole vectors. */
static inline __attribute__((always_inline)) void rope_row(
    void *x, int bf16, int64_t base, const float *c, const float *s, int64_t heads, int64_t head_dim)
{
    const int64_t half = head_dim / 2;
    for (int64_t h = 0; h < heads; h++) {
        const int64_t b = base + h * head_dim;
        if (!bf16) {  /* in place: the compiler vectorises this one with a run-time alias check */
            float *xf = (float *)x + b;
            for (int64_t i = 0; i < half; i++) {
                const float a = xf[i], z = xf[half + i];
                xf[i] = a * c[i] - z * s[i];
                xf[half + i] = z * c[half + i] + a * s[half + i];
            }
            continue;
        }
        /* bfloat16: computed into locals, then stored; read-and-write through 16-bit words
           would not vectorise. */
        float lo[half], hi[half];
        for (int64_t i = 0; i < half; i++) {
            const float a = ld(x, bf16, b + i), z = ld(x, bf16, b + half + i);
            lo[i] = rnd(bf16, rnd(bf16, a * rnd(bf16, c[i])) + rnd(bf16, -z * rnd(bf16, s[i])));
            hi[i] = rnd(bf16, rnd(bf16, z * rnd(bf16, c[half + i])) + rnd(bf16, a * rnd(bf16, s[half + i])));
        }
        for (int64_t i = 0; i < half; i++) st(x, bf16, b + i, lo[i]);
        for (int64_t i = 0; i < half; i++) st(x, bf16, b + half + i, hi[i]);
    }
}

/* Rotates, in place, the first `heads` heads of each row of `x` (rows `row_stride` elements
   apart: the fused q|k|v projection's output, whose q and k heads are adjacent), by the
   float32 cos/sin tables ([max_pos][head_dim], the halves duplicated, as transformers builds
   them) at each row's position. x*cos + rotate_half(x)*sin, with cos and sin first rounded to
   the dtype as transformers does. */
static void rope(void *x, int bf16, const int64_t *positions, const float *cos_t,
                 const float *sin_t, int64_t rows, int64_t row_stride, int64_t heads,
                 int64_t head_dim)
{
#pragma omp parallel for if (rows >= PARALLEL_ROWS) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *c = cos_t + positions[r] * head_dim, *s = sin_t + positions[r] * head_dim;
        if (head_dim == 64) rope_row(x, bf16, r * row_stride, c, s, heads, 64);
        else if (head_dim == 128) rope_row(x, bf16, r * row_stride, c, s, heads, 128);
        else rope_row(x, bf16, r * row_stride, c, s, heads, head_dim);
    }
}

void rope_f32(float *x, const int64_t *positions, const float *cos_t, const float *sin_t,
              int64_t rows, int64_t row_stride, int64_t heads, int64_t head_dim)
{
    rope(x, 0, positions, cos_t, sin_t, rows, row_stride, heads, head_dim);
}

void rope_bf16(uint16_t *x, const int64_t *positions, const float *cos_t, const float *sin_t,
               int64_t rows, int64_t row_stride, int64_t heads, int64_t head_dim)
{
    rope(x, 1, positions, cos_t, sin_t, rows, row_stride, heads, head_dim);
}

/* out[r] = silu(gate) * up, with gate_up[r] = gate | up (each `inter` wide). */
static void silu_mul(const void *gate_up, void *out, int bf16, int64_t rows, int64_t inter)
{
#pragma omp parallel for if (rows >= PARALLEL_ROWS) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const int64_t g = r * 2 * inter, o = r * inter;
        for (int64_t i = 0; i < inter; i++) {
            const float a = ld(gate_up, bf16, g + i);
            const float silu = rnd(bf16, a / (1.f + fast_expf(-a)));
            st(out, bf16, o + i, silu * ld(gate_up, bf16, g + inter + i));
        }
    }
}

void silu_mul_f32(const float *gate_up, float *out, int64_t rows, int64_t inter)
{
    silu_mul(gate_up, out, 0, rows, inter);
}

void silu_mul_bf16(const uint16_t *gate_up, uint16_t *out, int64_t rows, int64_t inter)
{
    silu_mul(gate_up, out, 1, rows, inter);
}
