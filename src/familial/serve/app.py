"""The OpenAI-compatible HTTP API over one family engine, and the playground page.

The engine is an `Engine` in this process or, as `familial serve` runs it, an `EngineProcess`
(familial.infer.process) with the same request API. Every request becomes one `submit`; the
engine's scheduler batches them (continuous batching), so this module only translates: OpenAI
fields -> `SamplingParams`, model name -> member, `TokenEvent`s -> JSON or server-sent events.
A request waits for its events on the event loop itself, woken by the thread that delivers
them (no thread per request), and events that arrived together go out as one chunk; a request
whose client goes away is cancelled so its batch slot goes to the next one.

The event loop does no work whose size a client or a checkpoint controls. A body is parsed and
validated in the pool, after checks of cost linear in its size that refuse what could never fit
(a list longer than the context, a field the API does not have) before pydantic builds an error
per item; `json.loads` holds the GIL throughout, so a body that may hold many items is first
measured in a worker process (familial.serve.bodies) and refused if it holds more than a
request of the context needs. A prompt longer than the context could hold is refused by its
length before it is tokenised, tokenising runs in the pool (with `encode_batch`, which releases
the GIL), and chat templates render in worker processes with time, memory and output bounds
(familial.serve.templates). Nor does the loop wait for the engine: submissions and health checks
run in the pool, and cancelling only queues a message. A request the engine fails ends with a
400 (or an error event once streaming): no client input gets a 5xx, and every error message is
bounded in size (protocol.error_body).
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import typing
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi import HTTPException as FastAPIHTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from familial.chat_template import ChatTemplate, ChatTemplateError, mark_specials, split_marked
from familial.infer.adaptive import uncalibrated_note
from familial.infer.engine import QueueFull
from familial.infer.process import EngineProcessError
from familial.infer.sampling import SamplingParams
from familial.serve import protocol as p
from familial.serve.bodies import BodyWorkers
from familial.serve.guard import ClientPolicy, Guard
from familial.serve.protocol import clip, error_body
from familial.serve.templates import TemplateWorkers

# How often a waiting request checks whether its client is still there.
POLL_SECONDS = 0.25
# A body with at most this many commas and quotes is parsed at once (a few ms at worst); one
# with more is measured in a worker process first.
CHEAP_ITEMS = 2048
# The most keys of one object of a request (the API's objects have about 20 fields).
MAX_KEYS = 64
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": p.ErrorResponse, "description": "malformed request, prompt too long, or generation "
                                                   "failed on this request's parameters"},
    401: {"model": p.ErrorResponse, "description": "missing or wrong API key (servers started with --api-key)"},
    404: {"model": p.ErrorResponse, "description": "unknown model"},
    408: {"model": p.ErrorResponse, "description": "the request body did not arrive in time"},
    413: {"model": p.ErrorResponse, "description": "request body too large"},
    429: {"model": p.ErrorResponse, "description": "request queue full; retry later"},
    503: {"model": p.ErrorResponse, "description": "the server is shutting down, or its engine process "
                                                   "has ended"},
}


class APIError(FastAPIHTTPException):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(status, message, headers)
        self.param, self.code = param, code


# What a field accepts, for errors in fields that take one of several shapes (pydantic would
# report each shape's failure separately).
SHAPES = {"prompt": "a non-empty string or a non-empty list of token ids (integers >= 0)",
          "stop": f"a non-empty string or a list of at most {p.MAX_STOP} non-empty strings",
          "content": "a string or a list of {type: text, text} parts",
          "speculative": "true, false, 'cascade', or drafting members such as 'exit-1'"}
TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none"}


def _validation_message(error: RequestValidationError | ValidationError) -> tuple[str, str | None]:
    messages: dict[str, str] = {}
    param = None
    errors = error.errors(include_url=False) if isinstance(error, ValidationError) else error.errors()
    for item in errors:
        path, tags = _location(item)
        param = param or (path[0] if path else None)
        where, message = _item_message(item, path, tags)
        if message is None:
            messages.setdefault(where, clip(item.get("msg", "invalid value")))
        else:
            messages[where] = message
    text = "; ".join(f"{where}: {message}" for where, message in list(messages.items())[:4])
    return text or "malformed request", param


def _location(item: dict) -> tuple[list[str], list[str]]:
    """A validation error's field path, and the union-branch type tags pydantic put in it."""
    loc = [x if isinstance(x, int) else clip(x) for x in item.get("loc", ()) if x != "body"]
    # Union branches appear in the location as type tags such as 'list[int]'.
    tags = [x for x in loc if isinstance(x, str) and (not x.isidentifier() or x in TYPE_NAMES)]
    return [str(x) for x in loc if x not in tags], tags


def _item_message(item: dict, path: list[str], tags: list[str]) -> tuple[str, str | None]:
    """Where one validation error is, and what to say there (None: pydantic's own message,
    unless an earlier error at that place said more)."""
    where = ".".join(path) or "body"
    field = next((x for x in reversed(path) if not x.isdigit()), "")
    if tags and field in SHAPES:
        # One message for the field, not one per union branch it failed.
        return ".".join(path[:len(path) - path[::-1].index(field)]), f"expected {SHAPES[field]}"
    if item.get("type") == "extra_forbidden":
        return where, "unsupported parameter"
    return where, None


def _nested_models(annotation) -> list[type[BaseModel]]:
    """The request models inside a field's type (list[ChatMessage] -> [ChatMessage])."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _nested_models(arg)]


def _shape_error(data: Any, model: type[BaseModel], max_items: int, path: str = "") -> APIError | None:
    """A field `model` does not have, or a list longer than `max_items`, in parsed JSON `data`:
    pydantic would report every such key or item alone (seconds for a body of 200,000), this
    walk costs a step per key and stops at the first."""
    if not isinstance(data, dict):
        return None
    for key, value in data.items():
        where = f"{path}{clip(key)}"
        field = model.model_fields.get(key)
        if field is None:
            return APIError(400, f"{where}: unsupported parameter", path.split(".")[0] or clip(key))
        items = value if isinstance(value, list) else [value]
        if isinstance(value, list) and len(value) > max_items:
            return APIError(400, f"{where}: {len(value)} items; no list of this model's context holds more "
                                 f"than {max_items}", path.split(".")[0] or key, "context_length_exceeded")
        for nested in _nested_models(field.annotation):
            for index, item in enumerate(items):
                inner = f"{where}.{index}." if isinstance(value, list) else f"{where}."
                error = _shape_error(item, nested, max_items, inner)
                if error is not None:
                    return error
    return None


@dataclass
class Member:
    id: str
    exit: int | None
    layers: int | None
    aliases: list[str] = field(default_factory=list)


@dataclass
class Job:
    """One accepted request: what the engine runs and what the response reports."""

    handle: Any
    model: str
    id: str
    created: int = field(default_factory=lambda: int(time.time()))
    exits: list[int] = field(default_factory=list)
    note: str | None = None   # FamilialInfo.note

    def usage(self) -> p.Usage:
        prompt, completion = self.handle.prompt_tokens, self.handle.completion_tokens
        return p.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                       speculative=self.handle.speculative_stats())


# End-of-turn markers of the common chat templates (ChatML/Qwen, Llama 3, Gemma).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>")


def characters_per_token(tokenizer) -> int:
    """An upper bound on the characters one token covers: the longest vocabulary entry (for
    byte-level BPE its length in bytes, for SentencePiece and WordPiece at least its text),
    with a margin where a normaliser may delete characters before tokenising."""
    longest = max(map(len, tokenizer.get_vocab(with_added_tokens=True)), default=1)
    return longest * (4 if tokenizer.normalizer is not None else 1)


class Server:
    def __init__(self, engine, tokenizer, chat_template: ChatTemplate | None,
                 template_timeout: float = 5.0) -> None:
        self.engine, self.tokenizer = engine, tokenizer
        self.context = engine.max_seq_len
        # A text longer than this cannot fit the context whatever it says: refused untokenised.
        self.max_prompt_chars = self.context * characters_per_token(tokenizer)
        self.templates = None if chat_template is None else TemplateWorkers(
            chat_template, timeout=template_timeout, max_chars=self.max_prompt_chars)
        self.members: list[Member] = []
        self.names: dict[str, Member] = {}
        for info in engine.members():
            member = Member(info["id"], info.get("exit"), info.get("layers"), list(info.get("aliases", [])))
            self.members.append(member)
            for name in [member.id, *member.aliases]:
                self.names[name] = member
        self.end_of_turn_ids = [token for token in map(tokenizer.token_to_id, END_OF_TURN_TOKENS)
                                if token is not None]
        # Special tokens written in a message are its text: this copy of the tokenizer reads them so.
        self.specials = [t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special]
        self.literal_tokenizer = type(tokenizer).from_str(tokenizer.to_str())
        self.literal_tokenizer.encode_special_tokens = True
        self.pool = ThreadPoolExecutor(engine.max_batch_size + engine.max_queue + 4,
                                       thread_name_prefix="familial-serve")
        # One health check of the engine at a time, shared by the requests asking meanwhile.
        self.stats_call: asyncio.Future | None = None
        self.bodies = BodyWorkers()
        # JSON items (values and keys) of the largest request the context can take: token ids or
        # messages of a few items each, up to the context (longer lists are refused).
        self.max_body_items = 16 * self.context + 256

    async def read(self, request: Request, model: type[BaseModel]) -> Any:
        """The request's body as `model`, parsed and validated in the pool."""
        kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if kind != "application/json" and not kind.endswith("+json"):
            raise APIError(400, f"the request body must be JSON (Content-Type: application/json), "
                                f"not '{clip(kind)}'")
        raw = await request.body()
        if raw.count(b",") + raw.count(b'"') > CHEAP_ITEMS:
            self.check_measure(await self.bodies.measure(raw))
        return await asyncio.get_running_loop().run_in_executor(self.pool, self.parse, raw, model)

    def check_measure(self, found: dict) -> None:
        if "error" in found:
            raise APIError(400, f"the request body is not valid JSON: {found['error']}")
        if found["keys"] > MAX_KEYS:
            raise APIError(400, f"the request has an object of {found['keys']} keys; this API's objects have "
                                f"at most {MAX_KEYS} fields")
        if found["items"] > self.max_body_items:
            raise APIError(400, f"the request holds {found['items']} JSON items; one that fits this model's "
                                f"{self.context}-token context holds at most {self.max_body_items}", None,
                           "context_length_exceeded")

    def parse(self, raw: bytes, model: type[BaseModel]) -> Any:
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as error:
            raise APIError(400, f"the request body is not valid JSON: {error.msg} at character {error.pos}") from None
        except UnicodeDecodeError:
            raise APIError(400, "the request body is not valid JSON: not UTF-8 text") from None
        except RecursionError:
            raise APIError(400, "the request body is not valid JSON: it nests too deeply") from None
        if not isinstance(data, dict):
            raise APIError(400, f"the request body must be a JSON object, not {type(data).__name__}")
        error = _shape_error(data, model, self.context)
        if error is not None:
            raise error
        try:
            return model.model_validate(data)
        except ValidationError as failure:
            raise APIError(400, *_validation_message(failure)) from None

    def member(self, name: str) -> Member:
        if name not in self.names:
            raise APIError(404, f"model '{name}' does not exist; this server has "
                                f"{', '.join(m.id for m in self.members)}", "model", "model_not_found")
        return self.names[name]

    def check_length(self, characters: int, param: str) -> None:
        if characters > self.max_prompt_chars:
            raise APIError(400, f"this model's maximum context length is {self.context} tokens, and no token "
                                f"here covers more than {self.max_prompt_chars // self.context} characters; "
                                f"the {param} has {characters} characters", param, "context_length_exceeded")

    async def encode(self, text: str, special_tokens: bool, param: str,
                     marks: dict[str, str] | None = None) -> list[int]:
        """Token ids of `text`; where `marks` (mark_specials) stand, their special tokens'
        strings are read as text (a chat prompt's, to which nothing is added)."""
        self.check_length(len(text), param)
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.pool, self._encode, text, special_tokens, marks)
        except Exception as error:  # noqa: BLE001 - tokenizers raises bare Exceptions
            # e.g. lone surrogates ("\ud800"), which JSON allows and the tokenizer cannot read.
            raise APIError(400, f"{param}: the tokenizer cannot read this text ({error})", param) from None

    def _encode(self, text: str, special_tokens: bool, marks: dict[str, str] | None) -> list[int]:
        # encode_batch releases the GIL while it works (encode holds it): the loop runs meanwhile.
        if not marks:
            return list(self.tokenizer.encode_batch([text], add_special_tokens=special_tokens)[0].ids)
        pieces = split_marked(text, marks)
        ours = iter(self.tokenizer.encode_batch([t for t, literal in pieces if not literal], add_special_tokens=False))
        theirs = iter(self.literal_tokenizer.encode_batch([t for t, literal in pieces if literal],
                                                          add_special_tokens=False))
        return [i for _, literal in pieces for i in next(theirs if literal else ours).ids]

    async def render(self, messages: list[dict]) -> tuple[str, dict[str, str]]:
        """The conversation's prompt text, and the marks standing for special tokens' strings
        its messages held (to tokenise as text)."""
        if self.templates is None:
            raise APIError(400, "this model has no chat template (no chat_template.jinja, nor a chat_template "
                                "in tokenizer_config.json): use /v1/completions, or start the server with "
                                "--chat-template FILE (or chatml)", "messages", "no_chat_template")
        self.check_length(sum(len(m["content"]) + len(m.get("name", "")) for m in messages), "messages")
        messages, marks = mark_specials(messages, self.specials, self.templates.template.source)
        try:
            return await self.templates.render(messages, add_generation_prompt=True), marks
        except ChatTemplateError as error:
            raise APIError(400, str(error), "messages") from None

    async def submit(self, body: p.CompletionRequest | p.ChatCompletionRequest, prompt_ids: list[int],
                     max_tokens: int | None, prefix: str, stop_token_ids: list[int] | None = None) -> Job:
        member = self.member(body.model)
        # The prompt's ids are checked where the engine takes the request (InvalidRequest below).
        room = self.context - len(prompt_ids)
        if max_tokens is None:
            max_tokens = room
        if room < 1 or max_tokens > room:
            raise APIError(400, f"this model's maximum context length is {self.context} tokens; the prompt "
                                f"has {len(prompt_ids)} and max_tokens asks for {max_tokens}",
                           "max_tokens" if room >= 1 else "prompt", "context_length_exceeded")
        params = SamplingParams(max_new_tokens=max_tokens, temperature=body.temperature, top_k=body.top_k,
                                top_p=body.top_p, repetition_penalty=body.repetition_penalty,
                                stop=body.stop_list(), seed=body.seed,
                                stop_token_ids=list(stop_token_ids or []))
        call = asyncio.get_running_loop().run_in_executor(self.pool, lambda: self.engine.submit(
            prompt_ids, member=member.id, params=params, speculative=body.speculative, budget=body.budget,
            target=body.target))
        try:
            # The engine (another process) may be slow to answer: the loop serves others meanwhile.
            handle = await asyncio.shield(call)
        except asyncio.CancelledError:
            # The client left while the engine took the request: end it once it has a handle.
            call.add_done_callback(_cancel_taken)
            raise
        except QueueFull:
            raise APIError(429, "the request queue is full; retry later", None, "queue_full",
                           {"Retry-After": "1"}) from None
        except EngineProcessError as error:
            raise APIError(503, str(error), None, "engine_unavailable") from None
        except ValueError as error:
            raise APIError(400, str(error), getattr(error, "param", None)) from None
        adaptive = member.id == "auto" and body.budget is None and body.target is None
        return Job(handle, member.id, f"{prefix}-{uuid.uuid4().hex}",
                   note=uncalibrated_note(self.engine.config) if adaptive else None)

    async def events(self, job: Job, request: Request) -> AsyncIterator[list[Any]]:
        """The job's TokenEvents, in lists of those that arrived together (a reader that falls
        behind the engine catches up in one chunk); cancels the job if the client leaves or the
        caller stops reading."""
        waiter = _Waiter(asyncio.get_running_loop(), job.handle)
        finished = False
        checked = time.monotonic()
        try:
            while not finished:
                if time.monotonic() - checked > POLL_SECONDS:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return
                ready = []
                for event in await waiter.next(POLL_SECONDS):
                    finished = event.finished
                    if event.token_id is not None:
                        job.exits.append(event.exit)
                    if finished and event.finish_reason in ("error", "cancelled"):
                        if ready:
                            yield ready
                        if event.finish_reason == "error":
                            # The engine ends only the failing request; what failed there is
                            # this request's own (its sampling parameters, its stop handling): a 400.
                            raise APIError(400, f"generation failed for this request: {event.error}", None,
                                           "generation_failed")
                        # The engine cancels a request only when the server stops, or when the
                        # engine's process has died (then `error` says so).
                        raise APIError(503, event.error or "the server is shutting down", None, "cancelled")
                    ready.append(event)
                if ready:
                    yield ready
        finally:
            if not finished:
                job.handle.cancel()

    def check_engine(self) -> None:
        # An Engine in this process runs until the server stops it; an EngineProcess can die.
        ended = getattr(self.engine, "ended", None)
        if ended is not None:
            raise APIError(503, ended, None, "engine_unavailable")

    def models(self) -> p.ModelList:
        self.check_engine()
        created = int(time.time())
        return p.ModelList(data=[p.ModelCard(id=m.id, created=created, familial=p.MemberInfo(
            exit=m.exit, layers=m.layers, aliases=m.aliases)) for m in self.members])

    async def health(self) -> p.Health:
        if self.stats_call is None or self.stats_call.done():
            self.stats_call = asyncio.get_running_loop().run_in_executor(self.pool, self.engine.stats)
        stats = await asyncio.shield(self.stats_call)
        return p.Health(ok=stats["alive"], queue_depth=stats["queued"], running=stats["running"],
                        max_batch_size=stats["max_batch_size"], max_queue=stats["max_queue"])


def _cancel_taken(submitted: asyncio.Future) -> None:
    if not submitted.cancelled() and submitted.exception() is None:
        submitted.result().cancel()


class _Waiter:
    """Wakes a request's coroutine when the engine puts an event for it, from the engine's
    thread (no thread blocks per request, and the loop is woken only while one waits)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, handle) -> None:
        self.loop, self.handle = loop, handle
        self.future: asyncio.Future | None = None
        handle.listen(self._wake)

    def _wake(self) -> None:
        future, self.future = self.future, None
        if future is not None:
            try:
                self.loop.call_soon_threadsafe(_resolve, future)
            except RuntimeError:
                pass  # the loop has closed: nobody waits any more

    async def next(self, timeout: float) -> list[Any]:
        """The events waiting now, else those that come within `timeout` seconds (maybe none)."""
        events = self.handle.drain()
        if events:
            return events
        future = self.future = self.loop.create_future()
        # An event put before the future was set has no wake-up coming: look again.
        events = self.handle.drain()
        if events:
            self.future = None
            return events
        timer = self.loop.call_later(timeout, _resolve, future)
        try:
            await future
        finally:
            timer.cancel()
            self.future = None
        return self.handle.drain()


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _sse(payload: Any) -> str:
    data = payload.model_dump_json() if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return f"data: {data}\n\n"


async def _stream(server: Server, job: Job, request: Request, chat: bool, usage: bool) -> AsyncIterator[str]:
    head = {"id": job.id, "created": job.created, "model": job.model}
    if chat:
        yield _sse(p.ChatCompletionChunk(**head, choices=[p.ChatChunkChoice(
            index=0, delta=p.ChatDelta(role="assistant", content=""), finish_reason=None)],
            familial=p.FamilialChunkInfo(member=job.model, exits=[], pieces=[], note=job.note)))
    # Tokens whose text is held back (a stop string's prefix, part of a character) ride in the
    # next chunk that has text, so each chunk's exits and pieces stay one per token.
    held = []
    try:
        async for events in server.events(job, request):
            held += [event for event in events if event.token_id is not None]
            text, last = "".join(event.text for event in events), events[-1]
            if not text and not last.finished:
                continue
            reason = last.finish_reason if last.finished else None
            info = p.FamilialChunkInfo(member=job.model, exits=[e.exit for e in held], pieces=[e.text for e in held],
                                       note=None if chat else job.note)
            held, job.note = [], None
            if chat:
                yield _sse(p.ChatCompletionChunk(**head, choices=[p.ChatChunkChoice(
                    index=0, delta=p.ChatDelta(content=text or None), finish_reason=reason)],
                    familial=info))
            else:
                yield _sse(p.CompletionChunk(**head, choices=[p.CompletionChoice(
                    index=0, text=text, finish_reason=reason)], familial=info))
    except APIError as error:
        yield _sse(error_body(error.status_code, error.detail, error.param, error.code))
        yield "data: [DONE]\n\n"
        return
    if usage:
        info = p.FamilialChunkInfo(member=job.model, exits=[], pieces=[])
        chunk = p.ChatCompletionChunk if chat else p.CompletionChunk
        yield _sse(chunk(**head, choices=[], usage=job.usage(), familial=info))
    yield "data: [DONE]\n\n"


async def _collect(server: Server, job: Job, request: Request) -> tuple[str, str]:
    text, reason = [], "length"
    async for events in server.events(job, request):
        for event in events:
            text.append(event.text)
            if event.finished:
                reason = event.finish_reason
    return "".join(text), reason


class JobStream(StreamingResponse):
    """Server-sent events of one job; whatever ends the response also ends the job.

    A client can leave before the event generator first runs, when its own cleanup cannot;
    cancelling here frees the batch slot then too (it does nothing to a finished job).
    """

    def __init__(self, job: Job, events: AsyncIterator[str]) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.handle.cancel()


GENERATION_RESPONSES = {**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {
    "schema": {"type": "string", "description": "with stream=true: server-sent events, one chunk "
                                                "object per `data:` line, ending with `data: [DONE]`"}}}}}


# Request models read by Server.read rather than FastAPI (which parses and validates on the
# event loop), published in /openapi.json as FastAPI would publish them.
REQUEST_MODELS = (p.CompletionRequest, p.ChatCompletionRequest)


def _request_body(model: type[BaseModel]) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


router = APIRouter()


def _server(request: Request) -> Server:
    return request.app.state.server


async def http_error(_: Request, error: HTTPException) -> JSONResponse:
    return JSONResponse(error_body(error.status_code, str(error.detail), getattr(error, "param", None),
                                   getattr(error, "code", None)),
                        status_code=error.status_code, headers=getattr(error, "headers", None))


async def invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
    message, param = _validation_message(error)
    return JSONResponse(error_body(400, message, param), status_code=400)


async def internal_error(_: Request, error: Exception) -> JSONResponse:
    # A bug in the server, never a client's input (the tests hold every input to a 4xx).
    return JSONResponse(error_body(500, f"internal error: {type(error).__name__}: {error}"), status_code=500)


EXCEPTION_HANDLERS = {HTTPException: http_error, RequestValidationError: invalid_request, Exception: internal_error}


@router.get("/v1/models", response_model=p.ModelList)
async def list_models(request: Request) -> p.ModelList:
    return _server(request).models()


@router.get("/health", response_model=p.Health,
            responses={503: {"model": p.Health, "description": "the engine loop is not running"}})
async def health(request: Request):
    state = await _server(request).health()
    return state if state.ok else JSONResponse(state.model_dump(), status_code=503)


@router.post("/v1/completions", response_model=p.CompletionResponse, responses=GENERATION_RESPONSES,
             openapi_extra=_request_body(p.CompletionRequest))
async def completions(request: Request):
    server = _server(request)
    body = await server.read(request, p.CompletionRequest)
    server.member(body.model)
    if isinstance(body.prompt, str):
        ids = await server.encode(body.prompt, special_tokens=True, param="prompt")
    else:
        ids = body.prompt
    job = await server.submit(body, ids, body.max_tokens, "cmpl")
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return JobStream(job, _stream(server, job, request, chat=False, usage=usage))
    text, reason = await _collect(server, job, request)
    return p.CompletionResponse(id=job.id, created=job.created, model=job.model, usage=job.usage(),
                                choices=[p.CompletionChoice(index=0, text=text, finish_reason=reason)],
                                familial=p.FamilialInfo(member=job.model, exits=job.exits, note=job.note))


@router.post("/v1/chat/completions", response_model=p.ChatCompletionResponse,
             responses=GENERATION_RESPONSES, openapi_extra=_request_body(p.ChatCompletionRequest))
async def chat_completions(request: Request):
    server = _server(request)
    body = await server.read(request, p.ChatCompletionRequest)
    server.member(body.model)
    if body.max_tokens is not None and body.max_completion_tokens is not None \
            and body.max_tokens != body.max_completion_tokens:
        raise APIError(400, "max_tokens and max_completion_tokens disagree; send one of them",
                       "max_completion_tokens")
    messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                for m in body.messages]
    prompt, marks = await server.render(messages)
    ids = await server.encode(prompt, special_tokens=False, param="messages", marks=marks)
    max_tokens = body.max_completion_tokens or body.max_tokens
    # A chat answer is one assistant turn: it ends at the template's end-of-turn token.
    job = await server.submit(body, ids, max_tokens, "chatcmpl", server.end_of_turn_ids)
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return JobStream(job, _stream(server, job, request, chat=True, usage=usage))
    text, reason = await _collect(server, job, request)
    return p.ChatCompletionResponse(
        id=job.id, created=job.created, model=job.model, usage=job.usage(),
        choices=[p.ChatChoice(index=0, message=p.AssistantMessage(content=text), finish_reason=reason)],
        familial=p.FamilialInfo(member=job.model, exits=job.exits, note=job.note))


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
@router.get("/playground", response_class=HTMLResponse, include_in_schema=False)
async def page() -> HTMLResponse:
    return HTMLResponse(_playground())


@functools.cache
def _playground() -> str:
    return resources.files("familial.serve").joinpath("static/playground.html").read_text()


def create_app(engine, tokenizer, chat_template: ChatTemplate | None = None, policy: ClientPolicy | None = None,
               template_timeout: float = 5.0) -> FastAPI:
    """FastAPI app serving `engine` (started and stopped by the caller) over HTTP; without a
    chat template, chat completions are refused (400), as vLLM does. Assembles the module's
    router and exception handlers around one `Server` (as vLLM's api_server.build_app)."""
    server = Server(engine, tokenizer, chat_template, template_timeout)
    policy = policy or ClientPolicy()

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await server.bodies.start()
        if server.templates is not None:
            await server.templates.start()
        try:
            yield
        finally:
            server.pool.shutdown(wait=False, cancel_futures=True)
            await server.bodies.close()
            if server.templates is not None:
                await server.templates.close()

    app = FastAPI(title="familial", version="1", lifespan=lifespan,
                  description="OpenAI-compatible API serving every member of a model family "
                              "from one copy of the weights.")
    app.state.server = server
    # Items of a body whose prompt fits the context: one per character or token id, a few per
    # message (every message adds tokens), a few dozen for the other fields.
    app.add_middleware(Guard, policy=policy, max_items=server.max_prompt_chars + 8 * server.context + 256)
    for kind, handler in EXCEPTION_HANDLERS.items():
        app.add_exception_handler(kind, handler)
    app.include_router(router)
    _publish_errors_as_400(app)
    return app


def _publish_errors_as_400(app: FastAPI) -> None:
    """Make /openapi.json say what clients get: 400 with an error body, never FastAPI's 422,
    and the request bodies Server.read takes."""
    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in REQUEST_MODELS:
                published = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(published.pop("$defs", {}))
                components[model.__name__] = published
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
