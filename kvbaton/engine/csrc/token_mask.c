/* Structured outputs: set every token a bitmask forbids to -inf in a batch of logit rows.
 *
 * mask is llguidance's layout: per row, ceil(vocab / 32) 32-bit words, bit t % 32 of word
 * t / 32 set when token t is allowed. A word with every bit set (most words, in the middle of
 * free text inside a JSON string) is skipped whole. Replaces llguidance's torch.compile
 * kernel, whose first call compiles for seconds (docs/engine.md, "Structured outputs"). */
#include <math.h>
#include <stdint.h>

void apply_token_mask(float *logits, int64_t row_stride, const int32_t *mask, int64_t words,
                      int64_t rows, int64_t vocab) {
    for (int64_t r = 0; r < rows; r++) {
        float *row = logits + r * row_stride;
        const uint32_t *m = (const uint32_t *)(mask + r * words);
        for (int64_t w = 0; w < words; w++) {
            uint32_t bits = m[w];
            if (bits == 0xFFFFFFFFu)
                continue;
            int64_t base = w * 32;
            int64_t end = base + 32 < vocab ? base + 32 : vocab;
            for (int64_t t = base; t < end; t++)
                if (!((bits >> (t - base)) & 1u))
                    row[t] = -INFINITY;
        }
    }
}
