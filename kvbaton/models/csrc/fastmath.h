/*
 * exp for float32 written so that the compiler vectorises the loops that call it (libm's
 * expf is a scalar call per element: a quarter of a 256-token prefill's non-matmul time went
 * to SwiGLU's expf). Range reduction x = k ln2 + r, |r| <= ln2/2, then a degree-6 Taylor
 * polynomial for e^r (relative error about 1e-7, i.e. 1-2 ulp) scaled by 2^k built in the
 * exponent bits. Inputs are clamped to [-87.3, 88.7], so the result is a normal float: e^x for
 * x below the clamp (under 1.2e-38) comes out as about 1.2e-38 instead of a denormal or zero.
 */
#ifndef KVBATON_FASTMATH_H
#define KVBATON_FASTMATH_H
#include <stdint.h>

static inline __attribute__((always_inline)) float fast_expf(float x)
{
    x = x < -87.3f ? -87.3f : x;
    x = x > 88.7f ? 88.7f : x;
    const float k = __builtin_rintf(x * 1.44269504088896341f);
    const float r = (x - k * 0.693145751953125f) - k * 1.42860682030941723e-6f;
    const float p = 1.f + r * (1.f + r * (0.5f + r * (0.166666672f + r * (0.0416666418f
                    + r * (0.00833336171f + r * 0.00138873165f)))));
    union { int32_t i; float f; } s = { .i = ((int32_t)k + 127) << 23 };
    return p * s.f;
}

#endif
