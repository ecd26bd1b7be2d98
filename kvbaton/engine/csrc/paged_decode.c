/*
 * Paged decode attention for the CPU: one query token per sequence attends over that
 * sequence's blocks, read straight from the block-first KV cache
 *   kv[num_blocks][num_layers][2][block_size][num_kv_heads][head_dim]   (float32 or bfloat16)
 * with no gather: every K and V row is read from memory exactly once, which is what a decode
 * step is bound by on a CPU.
 *
 * The work items are (sequence, KV head) pairs: each reads its head's slice of every
 * position's row and serves all the query heads of its GQA group while that slice is in
 * cache. Items are spread over threads with OpenMP. Built with -fopenmp and loaded into a
 * process that already has PyTorch, it links against the libgomp PyTorch loaded (the same
 * soname), so it runs on PyTorch's own thread team: one pool, no second set of threads
 * spinning against it between ops. Built without OpenMP, the pragma is ignored and it runs
 * on the calling thread.
 *
 * A bfloat16 cache is read as 16-bit words and widened to float32 as it is loaded (a
 * bfloat16 is the top half of a float32), so it reads half the bytes of a float32 cache; the
 * query, the scores and the output stay float32.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

static inline __attribute__((always_inline)) float bf16_to_f32(uint16_t x)
{
    union { uint32_t u; float f; } c = { .u = (uint32_t)x << 16 };
    return c.f;
}

/* Element d of a row that starts at element `at` of the cache: the element type is a
   constant at every (inlined) call site, so each instance compiles to plain vector loads. */
static inline __attribute__((always_inline)) float kv_at(const void *kv, int bf16, int64_t at)
{
    return bf16 ? bf16_to_f32(((const uint16_t *)kv)[at]) : ((const float *)kv)[at];
}

/* Inlined into each caller below with head_dim a constant, so the dot products and the V
   accumulation unroll into a few vector instructions instead of short runtime-length loops. */
static inline __attribute__((always_inline)) void attend_one(
    const void *kv, int bf16, const float *qs, float *os, const int64_t *table, int64_t n, int64_t g,
    int64_t group, int64_t row, int64_t kv_stride, int64_t block_stride, int64_t layer_off,
    int64_t block_size, int64_t head_dim, float scale, float *scores)
{
    /* Pass 1 over K: the group's query heads against this head's slice of each position. */
    for (int64_t p = 0; p < n; p++) {
        const int64_t k = table[p / block_size] * block_stride + layer_off
                          + (p % block_size) * row + g * head_dim;
        for (int64_t j = 0; j < group; j++) {
            const float *qh = qs + (g * group + j) * head_dim;
            float dot = 0.f;
            for (int64_t d = 0; d < head_dim; d++) dot += qh[d] * kv_at(kv, bf16, k + d);
            scores[j * n + p] = dot * scale;
        }
    }
    for (int64_t j = 0; j < group; j++) {
        float *sh = scores + j * n;
        float m = sh[0];
        for (int64_t p = 1; p < n; p++) m = sh[p] > m ? sh[p] : m;
        float sum = 0.f;
        for (int64_t p = 0; p < n; p++) { sh[p] = expf(sh[p] - m); sum += sh[p]; }
        const float inv = 1.f / sum;
        for (int64_t p = 0; p < n; p++) sh[p] *= inv;
    }
    /* Pass 2 over V, the same slices. */
    float *acc = os + g * group * head_dim;  /* the group's heads are adjacent in the output */
    memset(acc, 0, sizeof(float) * (size_t)(group * head_dim));
    for (int64_t p = 0; p < n; p++) {
        const int64_t v = table[p / block_size] * block_stride + layer_off + kv_stride
                          + (p % block_size) * row + g * head_dim;
        for (int64_t j = 0; j < group; j++) {
            const float w = scores[j * n + p];
            float *ah = acc + j * head_dim;
            for (int64_t d = 0; d < head_dim; d++) ah[d] += w * kv_at(kv, bf16, v + d);
        }
    }
}

static int paged_decode(
    const void *kv, int bf16, const float *q, float *out,
    const int64_t *block_tables, int64_t max_blocks, const int64_t *ctx_lens, int64_t num_seqs,
    int64_t layer, int64_t num_layers, int64_t block_size,
    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, float scale, int64_t num_threads)
{
    const int64_t group = num_heads / num_kv_heads;
    const int64_t row = num_kv_heads * head_dim;              /* one position, all kv heads */
    const int64_t kv_stride = block_size * row;               /* K -> V within a layer */
    const int64_t block_stride = num_layers * 2 * kv_stride;  /* one block, all layers */
    const int64_t layer_off = layer * 2 * kv_stride;
    const int64_t items = num_seqs * num_kv_heads;
    int64_t max_ctx = 1;
    for (int64_t s = 0; s < num_seqs; s++)
        if (ctx_lens[s] > max_ctx) max_ctx = ctx_lens[s];
    int threads = (int)(num_threads < items ? num_threads : items);
    if (threads < 1) threads = 1;
    const size_t per_thread = (size_t)(group * max_ctx);
    float *scores = (float *)malloc(sizeof(float) * per_thread * (size_t)threads);
    if (!scores) return -1;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t it = 0; it < items; it++) {
        int t = 0;
#ifdef _OPENMP
        t = omp_get_thread_num();
#endif
        const int64_t s = it / num_kv_heads, g = it % num_kv_heads;
        const float *qs = q + s * num_heads * head_dim;
        float *os = out + s * num_heads * head_dim, *sc = scores + (size_t)t * per_thread;
        const int64_t *table = block_tables + s * max_blocks;
        /* One instance per (element type, head dim) so both are constants inside. */
#define ATTEND(BF16, HD)                                                                    \
        attend_one(kv, BF16, qs, os, table, ctx_lens[s], g, group, row, kv_stride,          \
                   block_stride, layer_off, block_size, HD, scale, sc)
        if (bf16) {
            if (head_dim == 64) ATTEND(1, 64);
            else if (head_dim == 128) ATTEND(1, 128);
            else ATTEND(1, head_dim);
        } else {
            if (head_dim == 64) ATTEND(0, 64);
            else if (head_dim == 128) ATTEND(0, 128);
            else ATTEND(0, head_dim);
        }
#undef ATTEND
    }
    free(scores);
    return 0;
}

/* The entry points: `kv` is the whole cache, q and out are [num_seqs][num_heads][head_dim]
   float32. Each returns 0, or -1 when the scores buffer cannot be allocated (nothing is
   computed then). */
int paged_decode_f32(
    const float *kv, const float *q, float *out,
    const int64_t *block_tables, int64_t max_blocks, const int64_t *ctx_lens, int64_t num_seqs,
    int64_t layer, int64_t num_layers, int64_t block_size,
    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, float scale, int64_t num_threads)
{
    return paged_decode(kv, 0, q, out, block_tables, max_blocks, ctx_lens, num_seqs, layer,
                        num_layers, block_size, num_heads, num_kv_heads, head_dim, scale,
                        num_threads);
}

int paged_decode_bf16(
    const uint16_t *kv, const float *q, float *out,
    const int64_t *block_tables, int64_t max_blocks, const int64_t *ctx_lens, int64_t num_seqs,
    int64_t layer, int64_t num_layers, int64_t block_size,
    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, float scale, int64_t num_threads)
{
    return paged_decode(kv, 1, q, out, block_tables, max_blocks, ctx_lens, num_seqs, layer,
                        num_layers, block_size, num_heads, num_kv_heads, head_dim, scale,
                        num_threads);
}
