"""The OpenAI-compatible HTTP API over an `Engine` (FastAPI + pydantic; run it with uvicorn).

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (the tokenizer's chat template), both
streamed as server-sent events in OpenAI's chunk format when `stream` is true; GET /health; POST /v1/adapters
({"name", "path"}) and DELETE /v1/adapters/{name}. The request's `model` picks the adapter; the base model's own
name means no adapter.

Errors use OpenAI's body, {"error": {"message", "type", "param", "code"}}: 400 for malformed JSON, wrong types and
prompts that do not fit the context (naming the field), 404 for an unknown model (listing the loaded ones), 429 when
the queue is full, 403 for an adapter path outside the allowed folders, 409 for a name clash or an adapter in use.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..core.config import ConfigError
from ..io.adapter_files import AdapterFileError
from .engine import AdapterInUse, Engine, QueueFull, Request, SamplingParams


class _Body(BaseModel):
    # strict: "0.5" is not a temperature; extra="ignore": OpenAI clients send fields this server does not use.
    model_config = ConfigDict(strict=True, extra="ignore")


class _Sampling(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1)  # one choice per request
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens even past the end-of-sequence token


class CompletionRequest(_Sampling):
    prompt: str | list[int]


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class AdapterLoad(_Body):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
    path: str


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _validation_message(err: RequestValidationError) -> tuple[str, str | None]:
    first = err.errors()[0]
    loc = []
    for part in first.get("loc", ())[1:]:  # ("body", "prompt", "str"): pydantic names the union member last
        if isinstance(part, str) and ("[" in part or part in _TYPE_TAGS):
            break
        loc.append(str(part))
    if first.get("type") == "json_invalid":
        return f"The request body is not valid JSON ({first.get('ctx', {}).get('error', first['msg'])}).", None
    seen = first.get("input")
    shown = json.dumps(seen, default=repr)[:80]
    if not loc:  # the body itself: not an object (or not sent as JSON)
        return (f"The request body must be a JSON object sent with content-type: application/json (got {shown}).",
                None)
    if first.get("type") == "missing":
        return f"Field {'.'.join(loc)!r} is required and missing.", ".".join(loc)
    return f"Field {'.'.join(loc)!r}: {first['msg']} (got {shown}).", ".".join(loc)


def create_app(engine: Engine, base_name: str, allowed_dirs: list[str]) -> FastAPI:
    """The app over `engine` (started on startup, stopped on shutdown). `allowed_dirs`: the folders (and everything
    under them) POST /v1/adapters may read; nothing else is ever read on a client's say."""
    roots = [os.path.realpath(d) for d in allowed_dirs]
    tokenizer = engine.tokenizer
    load_lock = asyncio.Lock()
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="peftlab serve", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def _api_error(_request, err: APIError):
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_request, err: RequestValidationError):
        message, param = _validation_message(err)
        return APIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, err: StarletteHTTPException):
        return APIError(err.status_code, str(err.detail), "invalid_request_error").response()

    # ---- models and adapters ---------------------------------------------------------------------------------

    def model_card(name: str) -> dict:
        card = {"id": name, "object": "model", "created": created, "owned_by": "peftlab"}
        if name != base_name:
            method, folder, _ = engine.mixed.adapters[name]
            card.update(parent=base_name, root=folder, method=method)
        return card

    def adapter_of(model: str) -> str | None:
        if model == base_name:
            return None
        if model not in engine.mixed.adapters:
            loaded = ", ".join([base_name] + engine.adapter_names)
            raise APIError(404, f"The model {model!r} does not exist here; loaded: {loaded}. Use one of these as "
                                "'model' (the base model's name means no adapter).", param="model",
                           code="model_not_found")
        return model

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": base_name, "adapters": engine.adapter_names, **engine.stats()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(n) for n in [base_name] + engine.adapter_names]}

    @app.post("/v1/adapters")
    async def load_adapter(body: AdapterLoad):
        real = os.path.realpath(body.path)
        if not any(real == root or real.startswith(root + os.sep) for root in roots):
            raise APIError(403, f"Path {body.path!r} is outside the folders this server may load adapters from "
                                "(its startup adapters' folders); whoever runs the server can allow another with "
                                "--allow-load-from DIR.", "permission_error", param="path")
        if not os.path.isdir(real):
            raise APIError(400, f"No adapter folder at {body.path!r}; pass a folder holding adapter_config.json "
                                "and adapter_model.safetensors.", param="path")
        async with load_lock:
            if body.name == base_name or body.name in engine.mixed.adapters:
                raise APIError(409, f"The name {body.name!r} is taken (loaded: "
                                    f"{', '.join([base_name] + engine.adapter_names)}); unload it first or pick "
                                    "another.", param="name")
            try:
                await run_in_threadpool(engine.load_adapter, body.name, real)
            except (AdapterFileError, ConfigError, ValueError, KeyError, OSError, RuntimeError) as err:
                raise APIError(400, f"Cannot load adapter {body.name!r} from {body.path!r}: "
                                    f"{' '.join(str(err).split())}", param="path") from None
        return model_card(body.name)

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str):
        if name == base_name:
            raise APIError(400, f"{name!r} is the base model, which cannot be unloaded.", param="name")
        adapter_of(name)
        try:
            await run_in_threadpool(engine.unload_adapter, name)
        except AdapterInUse as err:
            raise APIError(409, str(err), param="name") from None
        return {"id": name, "object": "model", "deleted": True}

    # ---- generation ------------------------------------------------------------------------------------------

    def sampling(body: _Sampling, prompt_len: int, max_tokens: int | None, default: int) -> SamplingParams:
        room = engine.max_context - prompt_len
        if prompt_len == 0:
            raise APIError(400, "The prompt is empty; send at least one token.", param="prompt")
        if room <= 0 or (max_tokens is not None and max_tokens > room):
            asked = f" + max_tokens {max_tokens}" if max_tokens is not None else ""
            raise APIError(400, f"The prompt has {prompt_len} tokens{asked}, more than the model's context of "
                                f"{engine.max_context} tokens. Shorten the prompt or lower max_tokens.",
                           param="max_tokens" if room > 0 else "messages" if isinstance(body, ChatRequest)
                           else "prompt", code="context_length_exceeded")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return SamplingParams(max_tokens=max_tokens or min(default, room), temperature=body.temperature,
                              top_p=body.top_p, stop=tuple(stop), seed=body.seed,
                              ignore_eos=body.ignore_eos)

    def submit(adapter: str | None, ids: list[int], params: SamplingParams) -> tuple[Request, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        req = Request(adapter, ids, params, lambda kind, payload: loop.call_soon_threadsafe(
            queue.put_nowait, (kind, payload)))
        try:
            engine.submit(req)
        except QueueFull as err:
            raise APIError(429, f"The server is busy: {err}. Retry later.", "rate_limit_error") from None
        except KeyError:
            adapter_of(adapter)  # unloaded since it was checked: the 404
            raise
        return req, queue

    async def run(http: HTTPRequest, body: _Sampling, adapter: str | None, ids: list[int], params: SamplingParams,
                  chunk, final):
        req, queue = submit(adapter, ids, params)
        rid = f"{'chatcmpl' if isinstance(body, ChatRequest) else 'cmpl'}-{req.id}"
        if body.stream:
            return StreamingResponse(_events(engine, req, queue, rid, chunk), media_type="text/event-stream")
        parts = []
        try:
            while True:
                try:
                    kind, payload = await asyncio.wait_for(queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        return None
                    continue
                if kind == "delta":
                    parts.append(payload)
                elif kind == "error":
                    raise APIError(500, payload, "server_error")
                else:
                    usage = {"prompt_tokens": payload["prompt_tokens"],
                             "completion_tokens": payload["completion_tokens"],
                             "total_tokens": payload["prompt_tokens"] + payload["completion_tokens"]}
                    return final(rid, "".join(parts), payload["finish_reason"], usage)
        finally:
            engine.cancel(req)  # a no-op once finished; frees the row of a client that went away

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        adapter = adapter_of(body.model)
        ids = tokenizer(body.prompt)["input_ids"] if isinstance(body.prompt, str) else list(body.prompt)
        params = sampling(body, len(ids), body.max_tokens, 16)  # OpenAI's default max_tokens for completions

        def chunk(rid, text, reason):
            return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": body.model,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]}

        def final(rid, text, reason, usage):
            return {**chunk(rid, text, reason), "usage": usage}

        return await run(http, body, adapter, ids, params, chunk, final)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, http: HTTPRequest):
        adapter = adapter_of(body.model)
        template = engine.chat_template(adapter)  # the adapter's saved template, else the base tokenizer's
        if template is None:
            raise APIError(400, f"The model {body.model!r} has no chat template; use /v1/completions.",
                           param="messages")
        ids = tokenizer.apply_chat_template([m.model_dump() for m in body.messages], add_generation_prompt=True,
                                            tokenize=True, return_dict=True, chat_template=template)["input_ids"]
        params = sampling(body, len(ids), body.max_completion_tokens or body.max_tokens, engine.max_context)

        def chunk(rid, text, reason):
            delta = {"role": "assistant", "content": text} if reason is None else {}
            return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": body.model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}

        def final(rid, text, reason, usage):
            return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": body.model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                                 "finish_reason": reason}], "usage": usage}

        return await run(http, body, adapter, ids, params, chunk, final)

    return app


async def _events(engine: Engine, req: Request, queue: asyncio.Queue, rid: str, chunk):
    """Server-sent events: one chunk per text delta, a last one with the finish reason, then [DONE]. A client that
    disconnects cancels this generator, and the finally clause frees its row."""
    try:
        while True:
            kind, payload = await queue.get()
            if kind == "delta":
                yield f"data: {json.dumps(chunk(rid, payload, None))}\n\n"
            elif kind == "done":
                yield f"data: {json.dumps(chunk(rid, '', payload['finish_reason']))}\n\n"
                break
            else:
                err = {"message": payload, "type": "server_error", "param": None, "code": None}
                yield f"data: {json.dumps({'error': err})}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        engine.cancel(req)
