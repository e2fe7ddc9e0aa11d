"""The OpenAI wire format: request and response models (pydantic), and which fields are refused.

Requests are strict: JSON types must match (no "0.5" for a number, no NaN/Infinity), unknown
fields are a 400 (never silently ignored), and fields that OpenAI or vLLM define but the engine
does not implement are accepted only at their "off" value (`min_p: 0`, `tools: []`, ...) so
clients that send defaults keep working; any other value is a 400 that names the field.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

_SEED_MAX = 2**63 - 1
MAX_TEMPERATURE = 100.0  # beyond it every token is equally likely to float32 precision anyway


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class _Sampling(_Strict):
    """What /v1/completions and /v1/chat/completions share (OpenAI fields, then vLLM extras)."""

    model: str | None = Field(None, description="the served base name or an adapter name; "
                                                "null = the base")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=MAX_TEMPERATURE,
                                      description="default 1 (OpenAI); 0 = greedy; at most 100")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="vLLM extra; -1 or 0 = off")
    seed: int | None = Field(None, ge=0, le=_SEED_MAX)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = Field(False, description="vLLM extra: keep going past EOS")
    return_token_ids: bool | None = Field(False, description="vLLM extra: token ids in choices")
    user: str | None = Field(None, description="metadata only (no effect on the output)")
    n: int | None = Field(None, ge=1, description="choices per prompt (seed + i each)")
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, description="vLLM extra; 1 = off")
    logit_bias: dict[str, float] | None = Field(None, description="token id -> [-100, 100]")
    min_tokens: int | None = Field(None, ge=0, description="vLLM extra: no EOS / stop token "
                                                           "ids before this many tokens")
    stop_token_ids: list[int] | None = Field(None, description="vLLM extra")
    # Defined by OpenAI / vLLM, not implemented: only the "off" value is accepted.
    min_p: float | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        ..., description="a string, token ids, or a batch of either (one choice each)")
    add_special_tokens: bool | None = Field(True, description="vLLM extra: BOS etc. for text")
    logprobs: int | None = Field(None, ge=0, description="top tokens per position (+ the "
                                                         "chosen one)")
    echo: bool | None = Field(False, description="the prompt (and its logprobs) before the "
                                                 "completion")
    best_of: int | None = Field(None, ge=1, description="sequences run; the n with the "
                                                        "highest mean logprob are returned")
    suffix: str | None = None


class ChatMessage(BaseModel):
    """Extra keys are allowed here only when empty (clients echo `tool_calls: null`, `refusal:
    null` back from earlier responses); the server refuses any that carry a value."""

    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = Field(
        None, description="a string or a list of text parts ({type: text, text})")
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name "
                                                                      "for max_tokens")
    add_generation_prompt: bool | None = Field(True, description="vLLM extra")
    logprobs: bool | None = Field(False, description="logprobs of each output token")
    top_logprobs: int | None = Field(None, ge=0, description="needs logprobs: true")
    best_of: int | None = None
    echo: bool | None = None
    continue_final_message: bool | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None


# field -> the values that mean "off" (None always does).
_OFF_COMMON: dict[str, tuple] = {
    "min_p": (0,), "include_stop_str_in_output": (False,), "skip_special_tokens": (True,),
}
_OFF_COMPLETION = {**_OFF_COMMON, "suffix": ("",)}
_OFF_CHAT = {**_OFF_COMMON, "echo": (False,), "best_of": (1,),
             "continue_final_message": (False,), "tools": ([],), "tool_choice": ("none",),
             "parallel_tool_calls": (True, False), "response_format": ({"type": "text"},),
             "chat_template": (), "chat_template_kwargs": ({},)}


def unsupported_field(req: BaseModel) -> tuple[str, Any] | None:
    """The first field set to a value this server does not implement, with that value."""
    off_values = _OFF_CHAT if isinstance(req, ChatCompletionRequest) else _OFF_COMPLETION
    for name, off in off_values.items():
        v = getattr(req, name)
        if v is not None and not any(v == o and isinstance(v, bool) == isinstance(o, bool)
                                     for o in off):
            return name, v
    return None


# --- responses ------------------------------------------------------------------------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(0, description="prompt tokens read from the prefix cache")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape: per token its text, logprob (null for the first prompt token),
    the top tokens as {text: logprob} (the chosen one included), and its character offset."""

    text_offset: list[int]
    token_logprobs: list[float | None]
    tokens: list[str]
    top_logprobs: list[dict[str, float] | None]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None
    stop_reason: str | int | None = Field(None, description="the stop string or stop token id "
                                                           "that ended the text")
    token_ids: list[int] | None = None
    prompt_token_ids: list[int] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    tool_calls: list = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None
    stop_reason: str | int | None = None
    token_ids: list[int] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_token_ids: list[int] | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "uora_rt"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class LoadAdapterRequest(_Strict):
    lora_name: str
    lora_path: str


class UnloadAdapterRequest(_Strict):
    lora_name: str
    lora_int_id: int | None = Field(None, description="accepted for vLLM clients; unused")


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorInfo


# --- /tokenize and /detokenize (vLLM's) -------------------------------------------------------
class TokenizeRequest(_Strict):
    """Either `prompt` (plain text) or `messages` (through the chat template)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = Field(None, description="default: true for prompt, "
                                                              "false for messages")
    add_generation_prompt: bool | None = True
    return_token_strs: bool | None = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str
