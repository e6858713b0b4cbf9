"""Request and response bodies of the OpenAI-compatible API, as pydantic models.

Requests are strict (no "5" for 5, no NaN) and reject unknown fields, as OpenAI does, so a
client learns at once that a parameter it relies on is not honoured here. The models are also
what FastAPI publishes in /openapi.json, so the published schema is the validation itself.
Beyond OpenAI's fields, `top_k` and `repetition_penalty` (as in vLLM) tune sampling, `budget`,
`target` and `speculative` pick the family's adaptive or speculative decoding, and every response
carries `familial`: the member that answered and the exit that produced each token.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

# OpenAI allows at most four stop sequences.
MAX_STOP = 4


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Request):
    include_usage: bool = Field(False, description="send a last chunk with usage and no choices")


StopText = Annotated[str, Field(min_length=1, max_length=256)]


class _Sampling(_Request):
    model: str = Field(min_length=1, max_length=256,
                       description="member id from /v1/models (exit-E), a member alias, or auto")
    temperature: float = Field(1.0, ge=0, le=2, description="0 picks the most likely token")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, le=1_000_000, description="keep the k most likely tokens; 0 keeps all")
    repetition_penalty: float = Field(1.0, ge=0.01, le=100,
                                      description="> 1 discourages tokens already seen (CTRL-style)")
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    n: int = Field(1, ge=1, le=1, description="only one choice per request is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    budget: float | None = Field(None, gt=0, le=1, description=(
        "adaptive exit under a cap on average depth, as a fraction of the layers; the model "
        "is the deepest member tokens may reach"))
    target: float | None = Field(None, gt=0, le=1, description=(
        "adaptive exit at the family's calibrated operating point for this token agreement with "
        "the full member (familial calibrate); the model is the deepest member tokens may reach"))
    speculative: bool | Annotated[str, Field(min_length=1, max_length=256)] | None = Field(
        None, description=("self-speculative decoding: true (the smallest member drafts), "
                           "'cascade' (every smaller member), or drafting members such as 'exit-1,exit-3'"))

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(_Sampling):
    prompt: Annotated[str, Field(min_length=1)] | TokenIds = Field(
        description="text, or a list of token ids")
    max_tokens: int | None = Field(16, ge=1, le=2**31 - 1,
                                   description="defaults to 16, as OpenAI's; null fills the context")


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart]
    name: str | None = Field(None, max_length=256)

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=2**31 - 1,
                                   description="defaults to the rest of the context")
    max_completion_tokens: int | None = Field(None, ge=1, le=2**31 - 1,
                                              description="OpenAI's newer name for max_tokens")


ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "not_found_error",
               405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 503: "server_error"}


# Error messages quote what a client sent (a field name, a value): at most this many characters.
MAX_QUOTE_CHARS = 80
MAX_MESSAGE_CHARS = 2000


def clip(text: str, limit: int = MAX_QUOTE_CHARS) -> str:
    """`text`, cut to `limit` characters (marked with '...') if longer."""
    return text if len(text) <= limit else f"{text[:limit - 3]}..."


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}, bounded in size
    whatever the request held."""
    return {"error": {"message": clip(message, MAX_MESSAGE_CHARS),
                      "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": None if param is None else clip(param), "code": code}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class SpeculativeUsage(BaseModel):
    drafted: int = Field(description="tokens the drafting members proposed to the verifier")
    accepted: int = Field(description="drafted tokens the verifier accepted")
    acceptance_rate: float


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    # Requests with `speculative` only.
    speculative: SpeculativeUsage | None = None


class FamilialInfo(BaseModel):
    member: str = Field(description="the member that answered (exit-E), or auto")
    exits: list[int] = Field(
        description="exit layer that produced each token (of this chunk, when streaming)")
    note: str | None = Field(None, description=(
        "present when the answer does not run as the request may expect: `auto` on a family "
        "that `familial calibrate` has not seen runs (mostly) the full member (in the first "
        "chunk, when streaming)"))

    @model_serializer(mode="wrap")
    def _without_empty_note(self, handler):
        data = handler(self)
        if data.get("note") is None:
            data.pop("note", None)
        return data


class FamilialChunkInfo(FamilialInfo):
    pieces: list[str] = Field(description=(
        "the text of each token of this chunk, so a client can tell tokens apart when one chunk "
        "carries several (the engine ran ahead of the client)"))


FinishReason = Literal["stop", "length"]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    familial: FamilialInfo


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    familial: FamilialChunkInfo


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    familial: FamilialInfo


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: None = None
    finish_reason: FinishReason | None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    familial: FamilialChunkInfo


class MemberInfo(BaseModel):
    exit: int | None = Field(description="exit layer; null for auto")
    layers: int | None = Field(description="decoder layers the member runs; null for auto")
    aliases: list[str]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "familial"
    familial: MemberInfo


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    ok: bool
    queue_depth: int = Field(description="requests waiting for a batch slot")
    running: int = Field(description="requests in the running batch")
    max_batch_size: int
    max_queue: int
