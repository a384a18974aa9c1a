"""`nanoseek serve`: an OpenAI-compatible HTTP server on the continuous-batching engine, with a chat page.

    nanoseek serve --model runs/chat/latest [--host 127.0.0.1] [--port 8000] [--api-key KEY]

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (stream: true sends
server-sent events in OpenAI's chunk format, ending with `data: [DONE]`), GET /health, GET /metrics
(Prometheus text), and a chat page at `/`.

Every HTTP request becomes engine requests, so all clients share the engine's decode steps: one
forward serves the whole running batch. The engine steps in a process of its own (worker.py; with
--in-process, in a thread of this one) and each step's text deltas reach a callback on a thread of
this process, which hands them to the event loop with call_soon_threadsafe. A client that
disconnects cancels its generation, which frees its cache slot at the next step boundary. If the
engine process dies, its requests end with an error, later ones get 503 and /health says so.

Limits, each answered with an OpenAI-style error body: a body larger than --max-body-bytes (413),
prompt + max_tokens beyond the context (400), more than --max-queue requests waiting for a slot
(429; 400 for a batch that alone is larger), a wrong or missing key when --api-key is set (401).
Binds to loopback unless --host says otherwise.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import socket
import sys
import threading
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..image import ImageError, chat_prompt
from ..inference.sampling import INT64_LIMIT, SamplingError, SamplingParams
from .metrics import Metrics
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, parse
from .textgen import TextGenerator, load_generator
from .worker import EngineProcess, EngineStopped

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_BODY_BYTES = 16 * 2**20  # room for a few base64 images; JSON text prompts are far smaller
# --stream-interval S: the engine process sends what its steps made at most every S seconds (a first
# token and an end at once), and a stream sends at most one chunk per S seconds, with every token
# in between. Each message from the engine process costs its core a pipe write and wakes the
# server's, and each chunk costs both processes JSON and a socket write: on `tiny` bf16, 2 threads,
# interleaved comparisons (README), 0.03 s served 9% more tokens/s than 0.01 s at 1 client, 13% more
# at 8 and 22% more at 32; 0.01 s had been 1-18% above S = 0 (a message and a chunk per step, as
# OpenAI streams) at 8 clients. A chunk every 30 ms still streams at 33 a second, faster than text
# can be read; the first token and the end go at once.
DEFAULT_STREAM_INTERVAL = 0.03


# ---- the app ----------------------------------------------------------------------------------------
def create_app(generator: TextGenerator, *, model_name: str, api_key: str | None = None, max_queue: int = 256,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, default_max_tokens: int | None = None,
               accepts_images: bool = False, stream_interval: float = DEFAULT_STREAM_INTERVAL) -> FastAPI:
    """The FastAPI app serving `generator`; starts the engine thread on startup, stops it on shutdown.

    default_max_tokens: used when a request gives no max_tokens (None: the rest of the context, as OpenAI).
    stream_interval: least seconds between two chunks of one stream (0: a chunk per engine step).
    """
    engine = generator.engine
    metrics = Metrics()
    created = int(time.time())
    inbox = _Inbox()

    @asynccontextmanager
    async def lifespan(app):
        inbox.loop = asyncio.get_running_loop()
        engine.start()
        yield
        engine.stop(timeout=10)

    app = FastAPI(title="nanoseek", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.metrics = metrics

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):
        error = APIError(500, f"internal server error: {type(e).__name__}: {e}", type="server_error")
        return JSONResponse(error.body(), status_code=500)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "").strip()
        scheme, _, credentials = given.partition(" ")
        if scheme.lower() == "bearer":  # the scheme is case-insensitive (RFC 7235): "bearer KEY" is the same
            given = credentials.strip()
        if not secrets.compare_digest(given.encode(), api_key.encode()):
            raise APIError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    # ---- plain endpoints ----
    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health")
    async def health():
        if not getattr(engine, "alive", True):  # the engine's process died: say so, so a supervisor restarts us
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(engine.stats()), media_type="text/plain; version=0.0.4")

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "nanoseek",
                "max_model_len": generator.context_length}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        check_key(request)
        check_model(name)
        return model_card()

    # ---- generation ----
    def sampling(body, index: int = 0) -> SamplingParams:
        """The engine's settings for the index-th prompt, or 400 naming a value the protocol let through."""
        seed = None if body.seed is None else (body.seed + index) % INT64_LIMIT
        try:
            return SamplingParams(body.temperature, max(body.top_k, 0), body.top_p, body.min_p, body.repetition_penalty,
                                  seed)
        except SamplingError as e:
            raise APIError(400, str(e), param=e.param) from None

    def budget(body, prompt_ids: list[int], param: str) -> int:
        """max_tokens for this prompt, or 400 if prompt + max_tokens does not fit in the context."""
        context, n = generator.context_length, len(prompt_ids)
        if body.max_new_tokens is None:
            room = context - n
            if room < 1:
                raise APIError(400, f"this model's maximum context length is {context} tokens, and the prompt "
                                    f"has {n}: no room for a reply", param=param, code="context_length_exceeded")
            return min(room, default_max_tokens or room)
        if n + body.max_new_tokens > context:
            raise APIError(400, f"this model's maximum context length is {context} tokens; you requested "
                                f"{n + body.max_new_tokens} ({n} in the prompt, {body.max_new_tokens} for the "
                                "completion): shorten the prompt or lower max_tokens",
                           param=param, code="context_length_exceeded")
        return body.max_new_tokens

    def submit(body, prompts: list[list[int]], param: str, images: list[list] | None = None) -> "_Batch":
        if any(not p for p in prompts):
            raise APIError(400, f"{param}: the prompt is empty", param=param)
        vocab = engine.config.vocab_size
        for p in prompts:
            bad = next((t for t in p if not 0 <= t < vocab), None)
            if bad is not None:
                raise APIError(400, f"{param}: token id {bad} is outside the vocabulary [0, {vocab})", param=param)
        max_tokens = [budget(body, p, param) for p in prompts]
        params = [sampling(body, i) for i in range(len(prompts))]
        if len(prompts) > max_queue:  # 429 would say "retry later", and no retry can ever fit
            raise APIError(400, f"{param}: a batch of {len(prompts)} prompts is more than the server's queue holds "
                                f"({max_queue}); send at most {max_queue} per request", param=param)
        if engine.stats()["waiting"] + len(prompts) > max_queue:
            raise APIError(429, f"the server is busy: more than {max_queue} requests are waiting; retry later",
                           type="rate_limit_error", code="queue_full")
        return _Batch(generator, metrics, inbox, [
            dict(prompt_ids=p, params=params[i], max_tokens=m, stop=body.stop_strings, ignore_eos=body.ignore_eos,
                 images=images[i] if images else None)
            for i, (p, m) in enumerate(zip(prompts, max_tokens))])

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        body = parse(ChatCompletionRequest, await request.body())
        check_model(body.model)
        if any(m.images for m in body.messages) and not accepts_images:
            raise APIError(400, f"the model {model_name!r} has no vision encoder, so it does not take images; "
                                "send text content only", param="messages", code="images_not_supported")
        try:
            prompt_ids, images = chat_prompt(generator.tokenizer, [m.as_template_message() for m in body.messages],
                                             engine.config)
        except ImageError as e:
            raise APIError(400, f"messages: {e}", param="messages", code="invalid_image") from None
        except ValueError as e:
            raise APIError(400, f"messages: {e}", param="messages") from None
        batch = submit(body, [prompt_ids], "messages", images=[images])
        return await respond(request, body, batch, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_key(request)
        body = parse(CompletionRequest, await request.body())
        check_model(body.model)
        tok = generator.tokenizer
        prompts = [tok.encode(p, bos=True) if isinstance(p, str) else p for p in body.prompts]
        batch = submit(body, prompts, "prompt")
        return await respond(request, body, batch, chat=False)

    async def respond(request: Request, body, batch: "_Batch", chat: bool):
        completion_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        header = {"id": completion_id, "object": "chat.completion" if chat else "text_completion",
                  "created": int(time.time()), "model": model_name}
        if body.stream:
            return _EventStream(batch, sse_stream(batch, header, chat, body.include_usage))
        # not streaming: still watch for a disconnect, so an abandoned request frees its slot
        collect = asyncio.ensure_future(batch.collect())
        gone = asyncio.ensure_future(_disconnected(request))
        await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not collect.done():
            collect.cancel()
            batch.cancel(disconnected=True)
            return Response(status_code=499)  # nobody is listening; the status is for the logs
        gone.cancel()
        texts = collect.result()
        batch.raise_if_failed()
        choices = []
        for i, (text, gen) in enumerate(zip(texts, batch.generations)):
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "logprobs": None, "finish_reason": gen.finish_reason})
            else:
                choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": gen.finish_reason})
        return {**header, "choices": choices, "usage": batch.usage()}

    async def sse_stream(batch: "_Batch", header: dict, chat: bool, include_usage: bool):
        chunk_header = {**header, "object": "chat.completion.chunk" if chat else "text_completion"}

        def chunk(choices: list, **extra) -> str:
            return "data: " + json.dumps({**chunk_header, "choices": choices, **extra}, ensure_ascii=False) + "\n\n"

        def choice(index: int, text: str | None, finish_reason: str | None, first: bool = False) -> dict:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
                return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}

        if chat:
            yield chunk([choice(i, None, None, first=True) for i in range(len(batch.generations))])
        async for update in batch.updates(stream_interval):
            out = []
            for index, (delta, event) in update.items():
                if event.finished and event.finish_reason == "error":
                    out.append("data: " + json.dumps(APIError(500, "generation failed", type="server_error").body()) + "\n\n")
                    continue
                if delta:
                    out.append(chunk([choice(index, delta, None)]))
                if event.finished:
                    out.append(chunk([choice(index, None, event.finish_reason)]))
            if out:
                yield "".join(out)
        if include_usage:
            yield chunk([], usage=batch.usage())
        yield "data: [DONE]\n\n"

    return _with_limits(app, metrics, max_body_bytes)


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body is already read, so only a disconnect arrives)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _EventStream(StreamingResponse):
    """Server-sent events that cancel their generations however the response ends: when the client
    disconnects, Starlette cancels the stream mid-await and this finally still runs."""

    def __init__(self, batch: "_Batch", events):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.batch = batch

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.batch.cancel(disconnected=True)


class _Inbox:
    """Hands calls from the engine thread to the event loop, waking the loop once per burst: a step
    delivers one event per running request, and each call_soon_threadsafe is a syscall."""

    def __init__(self):
        self.loop: asyncio.AbstractEventLoop | None = None  # set when the app starts
        self._calls: list = []
        self._lock = threading.Lock()

    def put(self, fn, *args) -> None:
        with self._lock:
            self._calls.append((fn, args))
            if len(self._calls) > 1:  # a wake-up is already on its way
                return
        self.loop.call_soon_threadsafe(self._run)

    def _run(self) -> None:
        with self._lock:
            calls, self._calls = self._calls, []
        for fn, args in calls:
            fn(*args)


class _Batch:
    """The engine requests of one HTTP request, seen from the event loop."""

    def __init__(self, generator: TextGenerator, metrics: Metrics, inbox: "_Inbox", jobs: list[dict]):
        self.metrics = metrics
        self.engine = generator.engine
        self.queue: asyncio.Queue = asyncio.Queue()
        self.ended = asyncio.Event()  # a generation finished since the last update: a waiting update goes out at once
        self.generations = []
        self._open = len(jobs)
        for index, job in enumerate(jobs):
            def on_text(delta, event, index=index):  # engine thread -> event loop
                inbox.put(self._arrived, index, delta, event)
            try:
                self.generations.append(generator.submit(**job, on_text=on_text))
            except ValueError as e:  # the engine refused it: take back the ones already queued
                self.cancel()
                raise APIError(400, str(e)) from None
            except EngineStopped as e:
                raise APIError(503, str(e), type="server_error") from None

    def _arrived(self, index: int, delta: str, event) -> None:
        if event.finished:  # accounted here, so generations cancelled by a disconnect count too
            self.metrics.record_generation(self.generations[index].request)
            self.ended.set()
        self.queue.put_nowait((index, delta, event))

    async def events(self):
        """(index, text delta, engine event) as each step lands, until every generation has finished."""
        while self._open:
            index, delta, event = await self.queue.get()
            self._open -= event.finished
            yield index, delta, event

    async def updates(self, interval: float = 0.0):
        """Like events, but all that has landed at once: per generation, the text since the last
        update and the last event. A client that falls behind gets fewer, larger chunks. With an
        interval, an update that comes sooner than `interval` seconds after the previous one waits
        for the rest of it and takes along what lands meanwhile (a finished generation never waits)."""
        sent = -math.inf
        while self._open:
            items = [await self.queue.get()]
            wait = sent + interval - time.perf_counter()
            if wait > 0 and not items[0][2].finished:
                try:  # the end of a generation cuts the wait short: its client may be waiting to send more
                    await asyncio.wait_for(self.ended.wait(), wait)
                except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                    pass
            while not self.queue.empty():
                items.append(self.queue.get_nowait())
            self.ended.clear()  # every finish so far is in items; the next wait is cut short only by a new one
            merged: dict[int, tuple[str, object]] = {}
            for index, delta, event in items:
                self._open -= event.finished
                merged[index] = (merged.get(index, ("", None))[0] + delta, event)
            sent = time.perf_counter()
            yield merged

    async def collect(self) -> list[str]:
        texts = [""] * len(self.generations)
        async for index, delta, _ in self.events():
            texts[index] += delta
        return texts

    def cancel(self, disconnected: bool = False) -> None:
        """Cancel what is still running (no-op once all finished)."""
        live = [g for g in self.generations if not g.request.finished]
        for g in live:
            self.engine.cancel(g.request)
        if disconnected:
            self.metrics.disconnects += len(live)

    def raise_if_failed(self) -> None:
        if any(g.finish_reason == "error" for g in self.generations):
            raise APIError(500, "generation failed in the engine; see the server log", type="server_error")

    def usage(self) -> dict:
        prompt = sum(len(g.request.prompt) for g in self.generations)
        completion = sum(len(g.request.tokens) for g in self.generations)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _with_limits(app, metrics: Metrics, max_body_bytes: int):
    """ASGI wrapper: refuse bodies over max_body_bytes with 413 before the app reads them, and count
    every HTTP request by endpoint and status for /metrics."""

    async def send_error(send, error: APIError):
        body = json.dumps(error.body()).encode()
        await send({"type": "http.response.start", "status": error.status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def limited(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in _ENDPOINTS else "other"
        status = [0]

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        too_large = APIError(413, f"the request body is larger than the server's limit of {max_body_bytes} bytes",
                             code="request_too_large")
        try:
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and int(length) > max_body_bytes:
                return await send_error(counting_send, too_large)
            # read the body here, counting, so a chunked upload cannot exceed the limit either
            chunks, size, more = [], 0, True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                more = message.get("more_body", False)
                if size > max_body_bytes:
                    return await send_error(counting_send, too_large)
            body, replayed = b"".join(chunks), False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()  # then only http.disconnect

            await app(scope, replay, counting_send)
        finally:
            metrics.requests[(endpoint, status[0] or 499)] += 1

    return limited


_ENDPOINTS = ("/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")


# ---- command line ---------------------------------------------------------------------------------
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's


def flag_error(args) -> str | None:
    """The first flag value the server cannot run with, found before the model loads (minutes, for a big one)."""
    if not 0 <= args.port <= 65535:  # uvicorn would bind the port modulo 65536, or fail after the load
        return f"--port must be between 0 and 65535, got {args.port}"
    # a limit of 0 would refuse every request (--max-queue, --max-body-bytes) or quietly mean the default
    for flag, least in (("max_batch_size", 1), ("max_queue", 1), ("max_body_bytes", 1), ("max_seq_len", 2),
                        ("max_cached_tokens", 2), ("default_max_tokens", 1), ("speculative", 0)):
        value = getattr(args, flag)
        if value is not None and value < least:
            return f"--{flag.replace('_', '-')} must be at least {least}, got {value}"
    # NaN passed `< 0` and then stopped every stream between its first token and its end
    if not 0 <= args.stream_interval < math.inf:
        return f"--stream-interval must be a finite number of seconds, 0 or more, got {args.stream_interval}"
    # an empty key made every request pass the check (and silenced the warning for a public --host);
    # a header value loses surrounding whitespace, so such a key could never be matched
    if args.api_key is not None and (not args.api_key or args.api_key != args.api_key.strip()):
        return f"--api-key must be a non-empty key without surrounding whitespace, got {args.api_key!r}"
    return None


def bind(host: str, port: int) -> socket.socket:
    """The server's socket, bound as uvicorn binds it. Done before the model loads: a port in use or
    a host that does not resolve is then a one-line error at once, not uvicorn's exit 3 after the load."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        # listening now: with SO_REUSEADDR two sockets can bind one port until one listens, so a
        # second server started during the first one's load would pass bind() and hang at listen
        sock.listen(2048)  # uvicorn's default backlog
    except OSError:
        sock.close()
        raise
    return sock


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder (config.json, weights, tokenizer.json)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port to listen on (0 to 65535)")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    parser.add_argument("--model-name", default=None, help="the id clients use (default: the folder's name)")
    parser.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together (cache slots)")
    parser.add_argument("--max-queue", type=int, default=256, help="requests that may wait for a slot before 429")
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help="context per request, prompt + max_tokens (default: the model's max_position_embeddings; "
                             "at most --max-cached-tokens less the draft tokens)")
    parser.add_argument("--max-cached-tokens", type=int, default=None,
                        help="tokens all running requests may hold in the cache together, so also the most one "
                             "request may (default: every slot full)")
    parser.add_argument("--default-max-tokens", type=int, default=None,
                        help="max_tokens when a request gives none (default: the rest of the context)")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: as stored")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (a CUDA GPU when there is one)")
    parser.add_argument("--speculative", type=int, default=0, help="MTP draft tokens per step (0: off)")
    parser.add_argument("--compile", action="store_true",
                        help="build the decode steps ahead of time (torch.export + AOTInductor), one per batch size "
                             "and sampling mode, before answering; kept in $NANOSEEK_CACHE/aot (default "
                             "~/.cache/nanoseek/aot), so later starts load them")
    parser.add_argument("--stream-interval", type=float, default=DEFAULT_STREAM_INTERVAL,
                        help="least seconds between two chunks of a stream, which carry every token in between "
                             "(0: a chunk per token; default %(default)s)")
    parser.add_argument("--in-process", action="store_true",
                        help="run the engine in the server's process (default: a process of its own, so that "
                             "HTTP work and decode steps run at the same time)")
    # lowered as uvicorn itself does, so INFO keeps working
    parser.add_argument("--log-level", default="warning", type=str.lower, choices=LOG_LEVELS, help="uvicorn's log level")


def run(args) -> int:
    import uvicorn

    from ..checkpoint import CheckpointError
    from ..tokenizer import TokenizerError

    error = flag_error(args)
    if error:
        print(f"nanoseek serve: {error}", file=sys.stderr)
        return 2
    try:
        sock = bind(args.host, args.port)
    except OSError as e:
        print(f"nanoseek serve: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it can use it", file=sys.stderr)
    load_kwargs = dict(dtype=args.dtype, max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len,
                       max_cached_tokens=args.max_cached_tokens, speculative=args.speculative, compile=args.compile,
                       device=args.device)
    try:
        if args.in_process:
            generator = load_generator(args.model, **load_kwargs)
        else:
            generator = EngineProcess.start(args.model, send_interval=args.stream_interval, **load_kwargs)
    except (CheckpointError, TokenizerError, ValueError, FileNotFoundError, RuntimeError) as e:
        sock.close()
        print(f"nanoseek serve: {e}", file=sys.stderr)
        return 2
    name = args.model_name or Path(args.model).resolve().name
    app = create_app(generator, model_name=name, api_key=args.api_key, max_queue=args.max_queue,
                     max_body_bytes=args.max_body_bytes, default_max_tokens=args.default_max_tokens,
                     accepts_images=generator.accepts_images, stream_interval=args.stream_interval)
    # the bound port, which --port 0 leaves to the system
    print(f"serving {name!r} ({generator.context_length}-token context, {args.max_batch_size} slots) "
          f"on http://{args.host}:{sock.getsockname()[1]}", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
    return 0
