"""The OpenAI API's request and response bodies, as pydantic models, and its error shape.

Requests are validated strictly (a string is not a number, 1.0 is not an int): a wrong type is a 400, as at OpenAI.
Fields of the OpenAI API that change nothing here (user, metadata, store, ...) are accepted and ignored; those whose
non-default values would change the answer and that the engine does not implement (best_of, suffix, penalties,
min_p, logit_bias, response_format, tools) are refused by ``unsupported`` with a 400 naming the field. ``top_k``
and ``ignore_eos`` (generate max_tokens tokens whatever comes: benchmarks) are extensions, as in vLLM, sent by the
openai client through ``extra_body``.

Logprobs are those of the model's own distribution (before temperature, top-k and top-p, as OpenAI and vLLM report
them). Completions take ``logprobs`` 0..MAX_LOGPROBS (OpenAI allows 0..5, vLLM 0..20 by default: 20 here) and
``echo`` (the prompt's text, and its tokens' logprobs with ``logprobs``, before the completion; ``max_tokens`` 0
then scores the prompt alone, as lm-evaluation-harness asks); chat takes ``logprobs: true`` and ``top_logprobs``
0..MAX_LOGPROBS, as OpenAI.
"""

from __future__ import annotations

import time
from typing import Annotated, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_serializer

from ..engine.sampling import MAX_LOGPROBS

MAX_STOP_STRINGS = 16  # OpenAI allows 4; a few more cost nothing, many would slow every token's check
SEED_RANGE = 2**63  # torch.Generator.manual_seed takes a signed 64-bit seed
MAX_TEMPERATURE = 2.0  # OpenAI's range is 0..2
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions (also what "max_tokens": null means there)


def _unicode(text: str) -> str:
    """JSON may spell a lone surrogate ("\\ud800"), which is no character: no tokenizer can encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"the text holds a lone surrogate {text[err.start]!r} at {err.start}: not valid Unicode") \
            from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]  # every text that reaches a tokenizer or a stop-string match


class ApiError(Exception):
    """An error answered as OpenAI does: HTTP ``status`` and {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False  # a last chunk with the usage and no choices
    continuous_usage_stats: bool = False  # usage in every chunk, and a chunk for every token (vLLM's extension)


class _Sampling(_Strict):
    """What completions and chat completions share."""

    model: Optional[str] = None  # None: the served model
    temperature: float = Field(1.0, ge=0, le=MAX_TEMPERATURE, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: Optional[int] = Field(None, ge=0)
    seed: Optional[int] = Field(None, ge=-SEED_RANGE, lt=SEED_RANGE)
    stop: Union[Text, list[Text], None] = None
    ignore_eos: bool = False
    n: int = Field(1, ge=1)  # choices, each a job of its own (at most the server's --max-batch)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    # accepted only at their defaults (what they would change is not implemented): see ``unsupported``
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    repetition_penalty: Optional[float] = None  # vLLM's extension
    min_p: Optional[float] = None
    logit_bias: Optional[dict] = None
    response_format: Optional[dict] = None
    tools: Optional[list] = None

    def stop_strings(self) -> list:
        """The stop strings as a list (empty strings dropped)."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ApiError(400, f"stop has {len(stops)} strings, at most {MAX_STOP_STRINGS} are allowed", param="stop")
        return [s for s in stops if s]

    def unsupported(self) -> Optional[tuple]:
        """(field, message) of the first field set to a value this server cannot honour, else None."""
        for name, default in (("presence_penalty", 0), ("frequency_penalty", 0), ("repetition_penalty", 1),
                              ("min_p", 0)):
            value = getattr(self, name)
            if value is not None and value != default:
                return name, f"{name} is not supported (only {default}), got {value}"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported"
        if self.response_format and self.response_format.get("type", "text") != "text":
            return "response_format", f"response_format {self.response_format.get('type')!r} is not supported " \
                                      f"(only text)"
        if self.tools:
            return "tools", "tools (function calling) are not supported"
        return None


class CompletionRequest(_Sampling):
    # text, a list of one text, token ids, or a list of one list of token ids (lm-evaluation-harness sends those)
    prompt: Union[Text, list[Text], list[int], list[list[int]]]
    max_tokens: Optional[int] = Field(COMPLETION_MAX_TOKENS, ge=0)  # None (null): the default too; 0 with echo only
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    def unsupported(self) -> Optional[tuple]:
        if self.best_of not in (None, 1):
            return "best_of", f"only best_of=1 is supported, got {self.best_of}"
        if self.suffix:
            return "suffix", "suffix is not supported"
        return super().unsupported()


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[Text, list[TextPart], None] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)  # None: the rest of the context
    max_completion_tokens: Optional[int] = Field(None, ge=1)  # the newer name; wins over max_tokens
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)

    def unsupported(self) -> Optional[tuple]:
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs: true"
        return super().unsupported()


# ---- responses ------------------------------------------------------------------------------------------------------

FinishReason = Optional[Literal["stop", "length"]]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> "Usage":
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class _Response(BaseModel):
    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str


class _Choice(BaseModel):
    """What every kind of choice has: its index (0..n-1), its logprobs (None unless asked for), and why it ended
    (None until then)."""

    index: int = 0
    logprobs: None = None
    finish_reason: FinishReason = None


class CompletionLogprobs(BaseModel):
    """/v1/completions' logprobs of a choice's tokens (the prompt's first, with echo): each token's text, its
    logprob (None for the prompt's first token: nothing predicts it), the most likely tokens with theirs (the token
    itself among them), and where the token's text starts in the choice's text."""

    tokens: list[str]
    token_logprobs: list[Optional[float]]
    top_logprobs: list[Optional[dict[str, float]]]
    text_offset: list[int]


class CompletionChoice(_Choice):
    text: str
    logprobs: Optional[CompletionLogprobs] = None


class CompletionResponse(_Response):
    """A whole completion, and (object "text_completion" too) each chunk of a streamed one."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]  # the token's text as UTF-8


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]  # the top_logprobs most likely tokens, most likely first


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class ChatChoice(_Choice):
    message: AssistantMessage
    logprobs: Optional[ChatLogprobs] = None


class ChatCompletionResponse(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    """A chunk's piece of the assistant message: the role in the first chunk, then content; {} in the last."""

    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None

    @model_serializer
    def _set_fields_only(self) -> dict:
        return {name: value for name, value in (("role", self.role), ("content", self.content)) if value is not None}


class ChatChunkChoice(_Choice):
    delta: ChatDelta
    logprobs: Optional[ChatLogprobs] = None


class ChatCompletionChunk(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "fp6llm"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
