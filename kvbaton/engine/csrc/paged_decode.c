/*
 * Paged decode attention for the CPU: one query token per sequence attends over that
 * sequence's blocks, read straight from the block-first KV cache
 *   kv[num_blocks][num_layers][2][block_size][num_kv_heads][head_dim]   (float32)
 * with no gather: every K and V row is read from memory exactly once, which is what a decode
 * step is bound by on a CPU. A position's row holds all KV heads, so it is read as one
 * contiguous range and used by every query head (GQA included) while it is in cache.
 *
 * Threading is left to the caller: it splits [seq_begin, seq_end) across threads (ctypes
 * releases the GIL), so this file needs no OpenMP runtime of its own.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

void paged_decode_f32(
    const float *kv, const float *q, float *out,
    const int64_t *block_tables, int64_t max_blocks, const int64_t *ctx_lens,
    int64_t seq_begin, int64_t seq_end,
    int64_t layer, int64_t num_layers, int64_t block_size,
    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, float scale)
{
    const int64_t group = num_heads / num_kv_heads;
    const int64_t row = num_kv_heads * head_dim;              /* one position, all kv heads */
    const int64_t kv_stride = block_size * row;               /* K -> V within a layer */
    const int64_t block_stride = num_layers * 2 * kv_stride;  /* one block, all layers */
    const int64_t layer_off = layer * 2 * kv_stride;
    int64_t max_ctx = 0;
    for (int64_t s = seq_begin; s < seq_end; s++)
        if (ctx_lens[s] > max_ctx) max_ctx = ctx_lens[s];
    float *scores = (float *)malloc(sizeof(float) * (size_t)(num_heads * (max_ctx > 0 ? max_ctx : 1)));
    float *acc = (float *)malloc(sizeof(float) * (size_t)(num_heads * head_dim));
    if (!scores || !acc) { free(scores); free(acc); return; }

    for (int64_t s = seq_begin; s < seq_end; s++) {
        const int64_t n = ctx_lens[s];
        const int64_t *table = block_tables + s * max_blocks;
        const float *qs = q + s * num_heads * head_dim;
        /* Pass 1 over K, position by position: each position's row (all kv heads) is one
           contiguous range, and a block's K for this layer is one contiguous range too. */
        for (int64_t p = 0; p < n; p++) {
            const float *krow = kv + table[p / block_size] * block_stride + layer_off
                                + (p % block_size) * row;
            for (int64_t hq = 0; hq < num_heads; hq++) {
                const float *qh = qs + hq * head_dim;
                const float *k = krow + (hq / group) * head_dim;
                float dot = 0.f;
                for (int64_t d = 0; d < head_dim; d++) dot += qh[d] * k[d];
                scores[hq * n + p] = dot * scale;
            }
        }
        for (int64_t hq = 0; hq < num_heads; hq++) {
            float *sh = scores + hq * n;
            float m = sh[0];
            for (int64_t p = 1; p < n; p++) if (sh[p] > m) m = sh[p];
            float sum = 0.f;
            for (int64_t p = 0; p < n; p++) { sh[p] = expf(sh[p] - m); sum += sh[p]; }
            const float inv = 1.f / sum;
            for (int64_t p = 0; p < n; p++) sh[p] *= inv;
        }
        /* Pass 2 over V, again one contiguous row per position. */
        memset(acc, 0, sizeof(float) * (size_t)(num_heads * head_dim));
        for (int64_t p = 0; p < n; p++) {
            const float *vrow = kv + table[p / block_size] * block_stride + layer_off + kv_stride
                                + (p % block_size) * row;
            for (int64_t hq = 0; hq < num_heads; hq++) {
                const float w = scores[hq * n + p];
                const float *v = vrow + (hq / group) * head_dim;
                float *ah = acc + hq * head_dim;
                for (int64_t d = 0; d < head_dim; d++) ah[d] += w * v[d];
            }
        }
        memcpy(out + s * num_heads * head_dim, acc, sizeof(float) * (size_t)(num_heads * head_dim));
    }
    free(scores);
    free(acc);
}
