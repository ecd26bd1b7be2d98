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
 * Queries and outputs are in the cache's dtype and are read and written in place in the
 * step's flat batch (row `rows[s]`, rows `q_stride` / `out_stride` elements apart: q is a view
 * of the fused q|k|v projection), so no gather or scatter of them runs around the call. A
 * bfloat16 value is widened to float32 as it is loaded (a bfloat16 is the top half of a
 * float32) and everything is computed in float32; the output is rounded to nearest even.
 * write_kv stores a step's new K/V rows into their slots before attention reads them.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* kvbaton/models/csrc, on the include path of every build */
#include "bf16.h"
#include "fastmath.h"
#ifdef _OPENMP
#include <omp.h>
#endif

/* Inlined into each caller below with the element type and head_dim constants, so the dot
   products and the V accumulation unroll into a few vector instructions instead of short
   runtime-length loops. `qs`/`os` point at this sequence's row of queries/outputs. */
static inline __attribute__((always_inline)) void attend_one(
    const void *kv, int bf16, const void *qs, void *os, const int64_t *table, int64_t n, int64_t g,
    int64_t group, int64_t row, int64_t kv_stride, int64_t block_stride, int64_t layer_off,
    int64_t block_size, int64_t head_dim, float scale, float *scores)
{
    float qf[group * head_dim], acc[group * head_dim];  /* the group's queries, widened */
    for (int64_t i = 0; i < group * head_dim; i++) qf[i] = ld(qs, bf16, g * group * head_dim + i);
    /* Pass 1 over K: the group's query heads against this head's slice of each position. */
    for (int64_t p = 0; p < n; p++) {
        const int64_t k = table[p / block_size] * block_stride + layer_off
                          + (p % block_size) * row + g * head_dim;
        for (int64_t j = 0; j < group; j++) {
            const float *qh = qf + j * head_dim;
            float dot = 0.f;
            for (int64_t d = 0; d < head_dim; d++) dot += qh[d] * ld(kv, bf16, k + d);
            scores[j * n + p] = dot * scale;
        }
    }
    for (int64_t j = 0; j < group; j++) {
        float *sh = scores + j * n;
        float m = sh[0];
        for (int64_t p = 1; p < n; p++) m = sh[p] > m ? sh[p] : m;
        float sum = 0.f;
        for (int64_t p = 0; p < n; p++) { sh[p] = fast_expf(sh[p] - m); sum += sh[p]; }
        const float inv = 1.f / sum;
        for (int64_t p = 0; p < n; p++) sh[p] *= inv;
    }
    /* Pass 2 over V, the same slices. */
    memset(acc, 0, sizeof(float) * (size_t)(group * head_dim));
    for (int64_t p = 0; p < n; p++) {
        const int64_t v = table[p / block_size] * block_stride + layer_off + kv_stride
                          + (p % block_size) * row + g * head_dim;
        for (int64_t j = 0; j < group; j++) {
            const float w = scores[j * n + p];
            float *ah = acc + j * head_dim;
            for (int64_t d = 0; d < head_dim; d++) ah[d] += w * ld(kv, bf16, v + d);
        }
    }
    /* The group's heads are adjacent in the output row. */
    for (int64_t i = 0; i < group * head_dim; i++) st(os, bf16, g * group * head_dim + i, acc[i]);
}

/* `kv` is the whole cache, float32 or (`bf16`) bfloat16; q and out hold num_heads * head_dim
   elements per row, in the cache's dtype. Returns 0, or -1 when the scores buffer cannot be
   allocated (nothing is computed then). */
int paged_decode(
    const void *kv, int bf16, const void *q, int64_t q_stride, void *out, int64_t out_stride,
    const int64_t *rows, const int64_t *block_tables, int64_t max_blocks, const int64_t *ctx_lens,
    int64_t num_seqs, int64_t layer, int64_t num_layers, int64_t block_size, int64_t num_heads,
    int64_t num_kv_heads, int64_t head_dim, float scale, int64_t num_threads)
{
    const int64_t group = num_heads / num_kv_heads;
    const int64_t row = num_kv_heads * head_dim;              /* one position, all kv heads */
    const int64_t kv_stride = block_size * row;               /* K -> V within a layer */
    const int64_t block_stride = num_layers * 2 * kv_stride;  /* one block, all layers */
    const int64_t layer_off = layer * 2 * kv_stride;
    const int64_t items = num_seqs * num_kv_heads;
    const size_t esize = bf16 ? 2 : 4;
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
        const void *qs = (const char *)q + (size_t)(rows[s] * q_stride) * esize;
        void *os = (char *)out + (size_t)(rows[s] * out_stride) * esize;
        float *sc = scores + (size_t)t * per_thread;
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

/* Stores token t's K and V rows (num_kv_heads * head_dim elements of `esize` bytes, rows
   `k_stride` / `v_stride` elements apart in the flat batch) at position offsets[t] of block
   blocks[t] of `layer`. */
void write_kv(
    void *kv, const void *k, int64_t k_stride, const void *v, int64_t v_stride,
    const int64_t *blocks, const int64_t *offsets, int64_t num_tokens, int64_t layer,
    int64_t num_layers, int64_t block_size, int64_t row, int64_t esize)
{
    const int64_t kv_stride = block_size * row, block_stride = num_layers * 2 * kv_stride;
    char *base = (char *)kv;
    const size_t bytes = (size_t)(row * esize);
    for (int64_t t = 0; t < num_tokens; t++) {
        const int64_t at = blocks[t] * block_stride + layer * 2 * kv_stride + offsets[t] * row;
        memcpy(base + at * esize, (const char *)k + t * k_stride * esize, bytes);
        memcpy(base + (at + kv_stride) * esize, (const char *)v + t * v_stride * esize, bytes);
    }
}
