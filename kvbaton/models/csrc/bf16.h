/*
 * Loads and stores of float32 or bfloat16 elements, for the C sources that take either. The
 * element type (`bf16`) is a constant at every inlined call site, so each instance compiles to
 * plain vector loads and stores. A bfloat16 is the top half of a float32: loading widens it
 * exactly; storing rounds to nearest even, as PyTorch converts (NaN stays NaN).
 */
#ifndef KVBATON_BF16_H
#define KVBATON_BF16_H
#include <stdint.h>

static inline __attribute__((always_inline)) float ld(const void *p, int bf16, int64_t i)
{
    if (bf16) {
        union { uint32_t u; float f; } c = { .u = (uint32_t)((const uint16_t *)p)[i] << 16 };
        return c.f;
    }
    return ((const float *)p)[i];
}

static inline __attribute__((always_inline)) uint16_t to_bf16(float f)
{
    union { float f; uint32_t u; } c = { .f = f };
    if ((c.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((c.u >> 16) | 0x40);
    return (uint16_t)((c.u + 0x7fffu + ((c.u >> 16) & 1u)) >> 16);
}

static inline __attribute__((always_inline)) void st(void *p, int bf16, int64_t i, float f)
{
    if (bf16) ((uint16_t *)p)[i] = to_bf16(f);
    else ((float *)p)[i] = f;
}

/* As the dtype's arithmetic would leave a value: a bfloat16 op rounds its float result. */
static inline __attribute__((always_inline)) float rnd(int bf16, float f)
{
    if (!bf16) return f;
    union { uint32_t u; float f; } c = { .u = (uint32_t)to_bf16(f) << 16 };
    return c.f;
}

#endif
