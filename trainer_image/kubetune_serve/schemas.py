"""Request bodies of the API, as OpenAI and vLLM define them. Unknown fields are accepted and
ignored (as vLLM does), so clients written for either work unchanged.

Numbers that reach torch are bounded here (a seed past 64 bits, a top_k past any vocabulary), so
no JSON value gets past validation and then fails inside generation. The body as a whole is capped
before it is parsed (`--max-request-bytes`), and prompts x n by `--max-sequences-per-request`.
"""

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Body):
    include_usage: bool | None = True


class _Sampling(_Body):
    model: str | None = Field(default=None, description="The base model's name or an adapter's; the base when absent.")
    max_tokens: int | None = Field(default=None, ge=1, le=2**31 - 1)
    temperature: float | None = Field(default=None, ge=0, le=2, description="0 decodes greedily. Default 1.")
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1, le=2**31 - 1, description="vLLM's extension; -1 or 0: off.")
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1 - 16)  # seed + sample index, for torch
    ignore_eos: bool = Field(default=False, description="vLLM's extension: always generate max_tokens tokens.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    logprobs: int | None = None


class ChatMessage(_Body):
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=2**31 - 1)
    logprobs: bool | None = False
    add_generation_prompt: bool = Field(default=True, description="vLLM's extension.")


class LoadLoRAAdapterRequest(_Body):
    lora_name: str
    lora_path: str
    load_inplace: bool = Field(default=False, description="Replace an adapter already loaded under this name.")


class UnloadLoRAAdapterRequest(_Body):
    lora_name: str | None = None
    lora_int_id: int | None = None
