"""
`cognica-poe serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the continuous-batching engine.

Endpoints shaped like OpenAI's / vLLM's: POST /v1/completions and /v1/chat/completions (stream or not; SSE chunks end
with `data: [DONE]`; stream_options.include_usage), GET /v1/models, /health, /metrics (Prometheus), POST /tokenize and
/detokenize. Every request may carry a `poe` field (mode full | stage | wand | speculative | compose and its
settings); the response carries `usage` and a `poe` object (layers run per token, WAND's exit-stage histogram,
speculative acceptance). With sibling specialists, /v1/models lists the base and each sibling, all served from ONE
trunk; a request's `model` picks the exit. `--device-map` places the model's stages, or the trunk and each sibling
branch, on devices of their own (branches then run concurrently after the trunk).

Batching policy (scheduler.py): full / stage / compose rows share one group (one pass per step up to the deepest exit
any row needs); WAND rows form a second group, speculative rows a group per (draft_stage, k_draft); the engine thread
steps every group once per iteration, so no request waits for another to finish.

Errors use OpenAI's body {"error": {"message", "type", "param", "code"}}: 400 for bad input (naming the field), 401
without the API key, 404 for an unknown model, 429 (with Retry-After) when the queue is full, 408 on timeout. The
server binds to loopback unless told otherwise.
"""

import asyncio
import hmac
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from .scheduler import Decoding, Engine, Event, QueueFull, RequestError
from .scheduler import Request as EngineRequest

LOOPBACK = ("127.0.0.1", "localhost", "::1")


# -----------------------------------------------------------------------------
# errors


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code, self.headers = (
            status, message, param, type_, code, headers)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def param_of(loc: tuple) -> str | None:
    """The request field a pydantic error points at: `max_tokens`, `poe.stage`, `messages`, ..."""
    loc = [x for x in loc if x != "body"]
    if not loc or not isinstance(loc[0], str):
        return None
    if loc[0] == "poe" and len(loc) > 1 and isinstance(loc[1], str):  # a poe field, known or not
        return f"poe.{loc[1]}"
    return loc[0]


# -----------------------------------------------------------------------------
# metrics


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (several apps may live in one process)."""

    def __init__(self, engine: Engine):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("cognica_poe_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.mode_requests = Counter("cognica_poe_mode_requests", "generation requests by PoE mode", ["mode"],
                                     registry=r)
        self.prompt_tokens = Counter("cognica_poe_prompt_tokens", "prompt tokens", registry=r)
        self.generation_tokens = Counter("cognica_poe_generation_tokens", "generated tokens by PoE mode", ["mode"],
                                         registry=r)
        self.rejected = Counter("cognica_poe_rejected", "requests refused with 429 (queue full)", registry=r)
        self.timeouts = Counter("cognica_poe_timeouts", "requests that ran past their timeout", registry=r)
        self.disconnects = Counter("cognica_poe_disconnects", "requests whose client left before the end", registry=r)
        self.ttft = Histogram("cognica_poe_time_to_first_token_seconds", "time to first token", registry=r,
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.itl = Histogram("cognica_poe_inter_token_latency_seconds", "time between a row's tokens", registry=r,
                             buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self.batch = Histogram("cognica_poe_batch_size", "rows per engine step, by group", ["group"], registry=r,
                               buckets=(1, 2, 4, 8, 16, 32, 64))
        Gauge("cognica_poe_queue_depth", "requests waiting for a place in the batch",
              registry=r).set_function(lambda: engine.queue_depth)
        Gauge("cognica_poe_running_rows", "rows in the running batch (decoding or prefilling)",
              registry=r).set_function(lambda: engine.running_rows)
        Gauge("cognica_poe_freed_rows", "rows freed because their client left or their request timed out",
              registry=r).set_function(lambda: engine.freed_rows)
        engine.on_step = lambda group, size: self.batch.labels(group).observe(size)


# -----------------------------------------------------------------------------
# one generation: engine events -> choices (incremental detokenizing, stop strings, logprobs)


class Choice:
    """What the client sees of one row: text so far (held back while it may be the start of a stop string)."""

    def __init__(self, index: int, tokenizer, stops: list[str]):
        self.index, self.tok, self.stops = index, tokenizer, stops
        self.tokens: list[int] = []
        self.logprobs: list = []
        self.text = ""  # final or safe-to-send text
        self.sent = 0  # characters of text already streamed
        self.finish: str | None = None
        self.stats: dict | None = None

    def add(self, ev: Event) -> None:
        if self.finish is not None:
            return
        self.tokens += ev.tokens
        self.stats = ev.stats or self.stats
        if ev.logprobs is not None:
            self.logprobs += ev.logprobs
        full = self.tok.decode(self.tokens)
        ready = full.rstrip("\ufffd") if ev.finish is None else full  # an incomplete UTF-8 character waits
        for s in self.stops:
            pos = ready.find(s)
            if pos >= 0:
                self.text, self.finish = ready[:pos], "stop"
                return
        self.text = ready
        self.finish = ev.finish

    def delta(self) -> str:
        """New text safe to stream: never a possible start of a stop string."""
        end = len(self.text)
        if self.finish is None:
            for s in self.stops:
                for k in range(min(len(s) - 1, end), 0, -1):
                    if self.text.endswith(s[:k]):
                        end = min(end, len(self.text) - k)
                        break
        out = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return out


class Generation:
    """A submitted engine request and its choices, fed by events from the engine thread."""

    def __init__(self, engine: Engine, tokenizer, metrics: Metrics, prompts: list[list[int]], n: int,
                 decoding: Decoding, poe, stops: list[str], timeout: float | None):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

        def emit(ev: Event) -> None:  # engine thread -> event loop
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, ev)
            except RuntimeError:  # the loop is gone (server shutting down)
                pass

        self.engine, self.metrics, self.mode = engine, metrics, poe.mode
        self.choices = [Choice(i, tokenizer, stops) for i in range(len(prompts) * n)]
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.request = EngineRequest(prompts, n, decoding, poe, emit, timeout)
        self.start = time.monotonic()
        self.last_token: dict[int, float] = {}

    def submit(self) -> None:
        try:
            self.engine.submit(self.request)
        except QueueFull as e:
            self.metrics.rejected.inc()
            raise APIError(429, f"server busy: {e}; retry shortly", type_="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        self.metrics.mode_requests.labels(self.mode).inc()
        self.metrics.prompt_tokens.inc(self.prompt_tokens)

    @property
    def done(self) -> bool:
        return all(c.finish is not None for c in self.choices)

    async def next(self) -> Choice | None:
        """Wait for the next event and apply it; returns the choice it changed (None for a whole-request end)."""
        ev = await self.queue.get()
        now = time.monotonic()
        if ev.index < 0:  # ended while still queued
            for c in self.choices:
                c.finish = c.finish or ev.finish
            return None
        c = self.choices[ev.index]
        if ev.tokens:
            prev = self.last_token.get(ev.index)
            if prev is None:
                self.metrics.ttft.observe(now - self.start)
            else:
                self.metrics.itl.observe((now - prev) / len(ev.tokens))
            self.last_token[ev.index] = now
            self.metrics.generation_tokens.labels(self.mode).inc(len(ev.tokens))
        was = c.finish
        c.add(ev)
        if c.finish == "stop" and was is None and ev.finish is None:
            self.request.stop_row(ev.index)  # a stop string: free the row
            self.engine.wake()
        return c

    def cancel(self) -> None:
        if not self.done:
            self.request.cancel()
            self.metrics.disconnects.inc()
            self.engine.wake()

    def failure(self) -> APIError | None:
        """The error to report when a choice ended by timeout or an engine failure."""
        reasons = {c.finish for c in self.choices}
        if "timeout" in reasons:
            self.metrics.timeouts.inc()
            return APIError(408, "the request ran past its timeout", type_="timeout_error", code="timeout")
        if "error" in reasons or "cancelled" in reasons:
            return APIError(500, "the engine failed on this request", type_="server_error", code="engine_error")
        return None

    def usage(self) -> dict:
        completion = sum(len(c.tokens) for c in self.choices)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def poe(self) -> dict:
        """The response's `poe` object: the mode's statistics summed over the choices."""
        stats = [c.stats for c in self.choices if c.stats]
        out = {"mode": self.mode}
        if stats:
            decided = sum(s["tokens_decided"] for s in stats)
            out["layers_per_token"] = round(sum(s["layer_runs"] for s in stats) / max(decided, 1), 3)
            if "exits" in stats[0]:
                out["exits"] = stats[0]["exits"]
            if self.mode == "wand":
                hist: dict[str, int] = {}
                for s in stats:
                    for k, v in s["exit_stages"].items():
                        hist[k] = hist.get(k, 0) + v
                out["exit_stages"] = dict(sorted(hist.items()))
            if self.mode == "speculative":
                acc, dr = sum(s["accepted"] for s in stats), sum(s["drafted"] for s in stats)
                out.update(accepted=acc, drafted=dr, acceptance=round(acc / dr, 4) if dr else 0.0,
                           draft_stage=stats[0]["draft_stage"], k_draft=stats[0]["k_draft"])
        return out


# -----------------------------------------------------------------------------
# the app


class Server:
    """Request handling shared by the endpoints: model ids, prompt building, decoding settings."""

    def __init__(self, engine: Engine, tokenizer, model_name: str, max_model_len: int | None = None,
                 request_timeout: float | None = None):
        self.engine, self.tok = engine, tokenizer
        self.max_model_len = max_model_len or engine.config.sequence_len
        self.request_timeout = request_timeout
        self.model_name = model_name
        # model id -> its own exit (None: the base's last); siblings are the branches' flat exits
        self.models: dict[str, int | None] = {model_name: None}
        if engine.siblings is not None:
            for i, name in enumerate(engine.siblings.names):
                self.models[name] = engine.n_base_exits + i
        self.created = int(time.time())
        self.metrics = Metrics(engine)
        special = tokenizer.convert_tokens_to_ids
        self.chat_stops = {special("<|assistant_end|>"), tokenizer.bos_token_id}
        eos = engine.config.eos_token_id
        self.eos = set() if eos is None else ({eos} if isinstance(eos, int) else set(eos))

    def model_exit(self, name: str) -> int | None:
        if name not in self.models:
            raise APIError(404, f"the model {name!r} does not exist; served: {', '.join(self.models)}",
                           param="model", code="model_not_found")
        return self.models[name]

    def check_ids(self, ids: list[int], param: str) -> list[int]:
        v = self.engine.config.vocab_size
        if any(not 0 <= t < v for t in ids):
            raise APIError(400, f"{param}: token ids must be in 0..{v - 1}", param=param)
        return ids

    def completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        p = req.prompt
        items = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        out = []
        for item in items:
            ids = self.tok.encode(item, add_special_tokens=False) if isinstance(item, str) else \
                self.check_ids(list(item), "prompt")
            out.append(self.tok.add_bos(ids))  # base models read BOS-prefixed documents
        return out

    def chat_prompt(self, messages) -> list[int]:
        try:
            return list(self.tok.apply_chat_template([{"role": m.role, "content": m.text} for m in messages],
                                                     tokenize=True, add_generation_prompt=True, return_dict=False))
        except (TemplateError, ValueError) as e:
            raise APIError(400, f"messages: {e}", param="messages") from None

    def decoding(self, req, prompts: list[list[int]], max_tokens: int | None, default_max: int | None,
                 stop_ids: set[int], logprobs: int | None, prompt_param: str) -> Decoding:
        longest = max(len(p) for p in prompts)
        limit = self.max_model_len
        if longest >= limit:
            raise APIError(400, f"this model's maximum context length is {limit} tokens, but the prompt has "
                                f"{longest}", param=prompt_param, code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = limit - longest if default_max is None else min(default_max, limit - longest)
        if longest + max_tokens > limit:
            raise APIError(400, f"this model's maximum context length is {limit} tokens, but {longest} prompt + "
                                f"{max_tokens} completion tokens were requested", param="max_tokens",
                           code="context_length_exceeded")
        temperature = 1.0 if req.temperature is None else req.temperature
        top_k = req.top_k if req.top_k is not None and req.top_k > 0 else None
        top_p = req.top_p if req.top_p is not None and req.top_p < 1 else None
        stop_ids = set() if req.ignore_eos else stop_ids
        return Decoding(max_tokens, temperature, top_p, top_k, req.seed, tuple(sorted(stop_ids)),
                        req.presence_penalty, req.frequency_penalty, logprobs)

    def resolve_poe(self, req, exit_: int | None):
        poe = req.poe.model_dump(exclude_none=True) if req.poe is not None else None
        try:
            spec = self.engine.resolve(exit_, poe)
        except RequestError as e:
            raise APIError(400, f"{e.param}: {e}", param=e.param) from None
        if spec.mode == "speculative" and (req.presence_penalty or req.frequency_penalty):
            raise APIError(400, "presence_penalty / frequency_penalty are not supported with speculative decoding "
                                "(they would break its exactness)", param="presence_penalty")
        return spec


def completion_logprobs(tok, choice: Choice, start: int, offset: int) -> dict:
    tokens = choice.tokens[start:]
    entries = choice.logprobs[start:start + len(tokens)]
    texts = [tok.decode([t]) for t in tokens]
    offsets, pos = [], offset
    for t in texts:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": texts, "token_logprobs": [e[0] for e in entries],
            "top_logprobs": [top_dict(tok, e[1]) for e in entries], "text_offset": offsets}


def top_dict(tok, alternatives: list[tuple[int, float]]) -> dict[str, float]:
    """Completions' {token text: logprob}; tokens with the same text (byte fragments) keep the likeliest."""
    out: dict[str, float] = {}
    for i, lp in alternatives:
        out.setdefault(tok.decode([i]), lp)
    return out


def chat_logprobs(tok, choice: Choice, start: int) -> dict:
    def item(t, lp):
        s = tok.decode([t])
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

    entries = choice.logprobs[start:len(choice.tokens)]
    return {"content": [{**item(t, e[0]), "top_logprobs": [item(i, lp) for i, lp in e[1]]}
                        for t, e in zip(choice.tokens[start:], entries)]}


def chunk_head(rid: str, obj: str, created: int, model: str, include_usage: bool):
    """head(choices, usage=None): a streamed chunk's common fields; with include_usage every chunk carries `usage`
    (null until the last), as OpenAI sends it."""
    def head(choices: list[dict], usage: dict | None = None) -> dict:
        out = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
        if include_usage:
            out["usage"] = usage
        return out

    return head


class AuthAndCount:
    """
    The API key check and the per-endpoint request counter, as plain ASGI middleware: Starlette's
    BaseHTTPMiddleware (`@app.middleware("http")`) relays every streamed chunk through an extra task and memory
    stream, a cost paid per token of every streaming response.
    """

    def __init__(self, app, api_key: str | None, metrics: "Metrics"):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if self.api_key and path not in ("/health", "/metrics"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
                self.metrics.requests.labels(path, "401").inc()
                response = APIError(401, "invalid or missing API key: send `Authorization: Bearer <key>`",
                                    code="invalid_api_key").response()
                return await response(scope, receive, send)

        async def counted(message) -> None:
            if message["type"] == "http.response.start" and path != "/metrics":
                self.metrics.requests.labels(path, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)


def create_app(engine: Engine, tokenizer, model_name: str, api_key: str | None = None,
               max_model_len: int | None = None, request_timeout: float | None = None) -> FastAPI:
    """The FastAPI app; its lifespan starts and stops the engine thread."""
    from contextlib import asynccontextmanager

    srv = Server(engine, tokenizer, model_name, max_model_len, request_timeout)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="cognica-poe", lifespan=lifespan)
    app.state.server = srv
    app.state.engine = engine
    metrics = srv.metrics

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        err = exc.errors()[0]
        if err.get("type") == "json_invalid":
            return APIError(400, f"the body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}",
                            code="invalid_json").response()
        param = param_of(tuple(err.get("loc", ())))
        msg = err.get("msg", "invalid value")
        return APIError(400, f"{param}: {msg}" if param else msg, param=param).response()

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return exc.response()

    app.add_middleware(AuthAndCount, api_key=api_key, metrics=metrics)

    @app.get("/health")
    async def health():
        alive = engine._thread is not None and engine._thread.is_alive()
        return JSONResponse({"status": "ok" if alive else "engine stopped"}, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        data = [{"id": name, "object": "model", "created": srv.created, "owned_by": "cognica-poe",
                 "root": name, "parent": None if exit_ is None else model_name, "max_model_len": srv.max_model_len}
                for name, exit_ in srv.models.items()]
        return {"object": "list", "data": data}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        if body.messages is not None:
            ids = srv.chat_prompt(body.messages)
        else:
            ids = tokenizer.encode(body.prompt, add_special_tokens=False)
            ids = tokenizer.add_bos(ids) if body.add_special_tokens else ids
        return {"tokens": ids, "count": len(ids), "max_model_len": srv.max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        return {"prompt": tokenizer.decode(srv.check_ids(body.tokens, "tokens"))}

    async def run(request: Request, gen: Generation, stream: bool, chunk, final):
        gen.submit()
        if stream:
            return StreamingResponse(sse(gen, chunk), media_type="text/event-stream")
        while not gen.done:  # a client that leaves frees its rows too
            try:
                await asyncio.wait_for(gen.next(), timeout=0.5)
            except TimeoutError:
                if await request.is_disconnected():
                    gen.cancel()
                    return Response(status_code=499)
        err = gen.failure()
        if err is not None:
            raise err
        return final()

    async def sse(gen: Generation, chunk) -> AsyncIterator[str]:
        try:
            for part in chunk(None):  # opening chunks (chat: the role)
                yield f"data: {json.dumps(part)}\n\n"
            while not gen.done:
                changed = [await gen.next()]
                while not gen.queue.empty():  # events that queued up while we sent: one chunk per choice
                    changed.append(await gen.next())
                err = gen.failure() if gen.done else None
                if err is not None:
                    yield f"data: {json.dumps(err.body())}\n\n"
                    break
                for c in dict.fromkeys(c for c in changed if c is not None):
                    for part in chunk(c):
                        yield f"data: {json.dumps(part)}\n\n"
            else:
                for part in chunk("usage"):
                    yield f"data: {json.dumps(part)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            gen.cancel()  # the client left mid-stream (or we are done: a no-op)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        exit_ = srv.model_exit(body.model)
        poe = srv.resolve_poe(body, exit_)
        if body.echo and body.logprobs is not None:
            raise APIError(400, "echo with logprobs (prompt logprobs) is not supported", param="echo")
        prompts = srv.completion_prompts(body)
        decoding = srv.decoding(body, prompts, body.max_tokens, 16, srv.eos | {tokenizer.bos_token_id},
                                body.logprobs, "prompt")
        gen = Generation(engine, tokenizer, metrics, prompts, body.n, decoding, poe, body.stops,
                         srv.request_timeout)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        echoes = [tokenizer.decode(p[1:] if p[:1] == [tokenizer.bos_token_id] else p) for p in prompts]
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        sent_lp = [0] * len(gen.choices)
        echoed: set[int] = set()

        head = chunk_head(rid, "text_completion", created, body.model, include_usage)

        def chunk(c):
            if c is None:
                return []
            if c == "usage":
                return [head([], gen.usage()) | {"poe": gen.poe()}] if include_usage else []
            text = c.delta()
            if body.echo and c.index not in echoed:
                text = echoes[c.index // body.n] + text
                echoed.add(c.index)
            lp = None
            if body.logprobs is not None:
                lp = completion_logprobs(tokenizer, c, sent_lp[c.index], 0)
                sent_lp[c.index] = len(c.tokens)
            parts = [head([{"index": c.index, "text": text, "logprobs": lp, "finish_reason": None}])]
            if c.finish is not None:
                parts.append(head([{"index": c.index, "text": "", "logprobs": None, "finish_reason": c.finish}])
                             | {"poe": gen.poe()})
            return parts

        def final():
            choices = []
            for c in gen.choices:
                prefix = echoes[c.index // body.n] if body.echo else ""
                lp = completion_logprobs(tokenizer, c, 0, len(prefix)) if body.logprobs is not None else None
                choices.append({"index": c.index, "text": prefix + c.text, "logprobs": lp,
                                "finish_reason": c.finish})
            return {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                    "choices": choices, "usage": gen.usage(), "poe": gen.poe()}

        return await run(request, gen, body.stream, chunk, final)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        exit_ = srv.model_exit(body.model)
        poe = srv.resolve_poe(body, exit_)
        prompts = [srv.chat_prompt(body.messages)]
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        decoding = srv.decoding(body, prompts, max_tokens, None, srv.chat_stops | srv.eos, logprobs, "messages")
        gen = Generation(engine, tokenizer, metrics, prompts, body.n, decoding, poe, body.stops,
                         srv.request_timeout)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        sent_lp = [0] * len(gen.choices)

        head = chunk_head(rid, "chat.completion.chunk", created, body.model, include_usage)

        def chunk(c):
            if c is None:
                return [head([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                               "finish_reason": None} for i in range(len(gen.choices))])]
            if c == "usage":
                return [head([], gen.usage()) | {"poe": gen.poe()}] if include_usage else []
            lp = None
            if logprobs is not None:
                lp = chat_logprobs(tokenizer, c, sent_lp[c.index])
                sent_lp[c.index] = len(c.tokens)
            parts = [head([{"index": c.index, "delta": {"content": c.delta()}, "logprobs": lp,
                            "finish_reason": None}])]
            if c.finish is not None:
                parts.append(head([{"index": c.index, "delta": {}, "logprobs": None, "finish_reason": c.finish}])
                             | {"poe": gen.poe()})
            return parts

        def final():
            choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                        "logprobs": chat_logprobs(tokenizer, c, 0) if logprobs is not None else None,
                        "finish_reason": c.finish} for c in gen.choices]
            return {"id": rid, "object": "chat.completion", "created": created, "model": body.model,
                    "choices": choices, "usage": gen.usage(), "poe": gen.poe()}

        return await run(request, gen, body.stream, chunk, final)

    return app


# -----------------------------------------------------------------------------
# the command


def build(model_path: str, siblings: list[str] | None = None, dtype: str | None = None, pack: bool | str = "auto",
          max_batch: int = 16, max_queue: int = 64, prefill_chunk: int = 64,
          quantize: dict | None = None, device_map=None) -> tuple[Engine, object, str]:
    """Load the model (and its siblings on the same trunk) and its tokenizer; the engine, not yet started.
    quantize: load_model's quantization keywords (quantize="int8" | "int4", group_size, quantize_heads) and compile.
    pack: True, False or "auto" (cpu.apply_packing). device_map: one model's stages' devices (placement.py:
    {"stage:0": "cuda:0", ...}, "auto" or one device), or with siblings the trunk's and each branch's
    ({"trunk": "cuda:0", "<branch>": "cuda:1", ...}, branches.load_siblings); JSON strings are read as maps."""
    from .checkpoint import load_model, parse_dtype
    from .cpu import apply_packing
    from .tokenizer import CognicaPoETokenizer

    if device_map == "ranks":
        raise ValueError("--device-map ranks splits the stages over torchrun processes, which serve does not run: "
                         "give devices in this process instead (a JSON map, 'auto' or one device)")
    if not os.path.isdir(model_path):
        raise FileNotFoundError(f"{model_path} is not a model folder")
    tok = CognicaPoETokenizer.from_pretrained(model_path)
    if siblings:
        from .branches import load_siblings

        if quantize and quantize.get("quantize"):
            raise ValueError("--quantize works on one model folder, not with --siblings")

        family = load_siblings(model_path, siblings, dtype=parse_dtype(dtype) if dtype else None,
                               device_map=device_map)
        apply_packing(family, pack, like=family.base)
        engine = Engine(family.base, family, max_batch=max_batch, max_queue=max_queue, prefill_chunk=prefill_chunk)
    else:
        model = load_model(model_path, dtype=dtype, pack=pack, device_map=device_map, **(quantize or {}))
        engine = Engine(model, max_batch=max_batch, max_queue=max_queue, prefill_chunk=prefill_chunk)
    return engine, tok, os.path.basename(os.path.normpath(model_path))


def check_serve_args(host: str, port: int, max_batch: int, max_queue: int, prefill_chunk: int,
                     request_timeout: float | None) -> None:
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port} is not a TCP port (0..65535)")
    for name, v in (("--max-batch", max_batch), ("--prefill-chunk", prefill_chunk)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {max_queue}")
    if request_timeout is not None and request_timeout <= 0:
        raise ValueError(f"--request-timeout must be > 0 seconds, got {request_timeout}")


def check_max_model_len(config, max_model_len: int | None) -> None:
    if max_model_len is not None and not 1 <= max_model_len <= config.rotary_seq_len:
        raise ValueError(f"--max-model-len must be in 1..{config.rotary_seq_len}, got {max_model_len}")


def serve(model_path: str, siblings: list[str] | None = None, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, dtype: str | None = None, pack: bool | str = "auto", max_batch: int = 16,
          max_queue: int = 64, prefill_chunk: int = 64, request_timeout: float | None = 600.0,
          max_model_len: int | None = None, served_model_name: str | None = None,
          quantize: dict | None = None, device_map=None) -> None:
    """Load, build the app, and serve it with uvicorn until interrupted (quantize, device_map: as build's)."""
    import uvicorn

    check_serve_args(host, port, max_batch, max_queue, prefill_chunk, request_timeout)
    api_key = api_key or os.environ.get("COGNICA_POE_API_KEY") or None
    if host not in LOOPBACK and not api_key:
        print(f"cognica-poe serve: warning: listening on {host} without --api-key: anyone who can reach this "
              "machine can use the model", file=sys.stderr)
    engine, tok, name = build(model_path, siblings, dtype, pack, max_batch, max_queue, prefill_chunk, quantize,
                              device_map)
    check_max_model_len(engine.config, max_model_len)
    app = create_app(engine, tok, served_model_name or name, api_key, max_model_len, request_timeout)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # connections wait in the backlog until uvicorn accepts them
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    print(f"cognica-poe serve: {', '.join(app.state.server.models)} on http://{host}:{sock.getsockname()[1]}/v1",
          file=sys.stderr, flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
