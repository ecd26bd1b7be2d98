"""kvbaton: disaggregated LLM serving with the KV cache as a first-class distributed object."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput"]

if TYPE_CHECKING:
    from kvbaton.engine.llm import LLM
    from kvbaton.engine.outputs import RequestOutput
    from kvbaton.sampling_params import SamplingParams


def __getattr__(name: str) -> Any:
    # Lazy so `import kvbaton` (and the CLI's --help) does not pay for importing torch.
    if name == "LLM":
        from kvbaton.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from kvbaton.sampling_params import SamplingParams

        return SamplingParams
    if name == "RequestOutput":
        from kvbaton.engine.outputs import RequestOutput

        return RequestOutput
    raise AttributeError(name)
