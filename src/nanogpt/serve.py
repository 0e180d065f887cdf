"""An OpenAI-compatible HTTP server: ``nanogpt serve --out_dir=DIR --host=127.0.0.1 --port=8000``.

Endpoints: ``GET /v1/models``, ``POST /v1/completions`` and ``POST /v1/chat/completions``, with
``stream=true`` (server-sent events ending in ``data: [DONE]``), ``max_tokens``, ``temperature``,
``top_p``, ``stop``, ``n`` and ``seed`` (and ``top_k``, which OpenAI lacks). Chat messages become
tokens through the chat template (chat_template.py); a reply ends at ``<|endoftext|>``.

The HTTP side is Starlette on uvicorn (``pip install 'nanogpt[serve]'``): Starlette is the small,
well-kept ASGI toolkit under FastAPI, with streaming responses and nothing else we do not use
(requests are checked here, so errors have OpenAI's shape, not a validation library's); uvicorn
is the reference ASGI server. One thread owns the model and runs the engine (engine.py): every
request in flight is a sequence in one batch through the key/value cache, joining and leaving it
between tokens. A bad request gets ``{"error": {"message", "type", "param", "code"}}`` with a 4xx
status; each request logs one line with its latency and tokens/s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass

from . import chat_template, runtime
from .checkpoint import load_for_inference
from .config import Config, Section, check_init_from, setting
from .engine import Engine, Params
from .errors import UserError, first_line, run_command
from .runtime import RuntimeConfig
from .tokenizer import vocabulary_for

MAX_CHOICES = 64  # n times the number of prompts, per request
MAX_STOPS = 4


@dataclass
class ServeSettings(Section):
    """Which model the server answers with, and where it listens."""

    init_from: str = setting("resume", "'resume' (from out_dir/ckpt.pt), a GPT-2 name ('gpt2', ..., 'gpt2-xl') or a local Hugging Face folder.")
    out_dir: str = setting("out", "Folder holding ckpt.pt when init_from='resume'.")
    host: str = setting("127.0.0.1", "Address to listen on (0.0.0.0 listens on every interface).")
    port: int = setting(8000, "TCP port to listen on (0 picks a free one and prints it).", ge=0, le=65535)
    model_name: str = setting("", "The model's id in the API; empty: out_dir's folder name, or init_from's name.")
    max_batch: int = setting(8, "Most sequences generated together in one forward; 1 serves one at a time.", gt=0)
    data_root: str = setting("data", "Where dataset folders (with meta.json) are looked up for the character vocabulary.")

    def check(self) -> None:
        check_init_from(self.init_from, ("resume",))


class ServeConfig(Config):
    """Every key of ``nanogpt serve``."""

    sections = (("serve", ServeSettings), ("runtime", RuntimeConfig))
    defaults = {"compile": False}


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# requests: checked into sequences to generate, or an OpenAI-style error


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _number(body: dict, name: str, default, lo: float, hi: float, lo_open: bool = False):
    v = body.get(name)
    if v is None:
        return default
    if not _is_number(v) or v != v or v > hi or (v <= lo if lo_open else v < lo):
        raise ApiError(400, "%s must be a number %s %g and <= %g; got %s" % (name, ">" if lo_open else ">=", lo, hi, json.dumps(v)),
                       name, "invalid_value")
    return float(v)


def _integer(body: dict, name: str, default, lo: int | None = None, hi: int | None = None):
    v = body.get(name)
    if v is None:
        return default
    if not _is_int(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = "" if lo is None else (" from %d to %d" % (lo, hi) if hi is not None else " >= %d" % lo)
        raise ApiError(400, "%s must be an integer%s; got %s" % (name, rng, json.dumps(v)), name, "invalid_value")
    return v


def _stops(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or len(v) > MAX_STOPS or not all(isinstance(s, str) and s for s in v):
        raise ApiError(400, "stop must be a non-empty string or a list of at most %d non-empty strings" % MAX_STOPS,
                       "stop", "invalid_value")
    return tuple(v)


def _unsupported(body: dict) -> None:
    """Parameters we do not implement: an error when set to anything but their neutral value."""
    neutral = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
               "suffix": (None, ""), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
               "logit_bias": (None, {}), "tools": (None, []), "functions": (None, [])}
    for name, ok in neutral.items():
        if body.get(name) not in ok:
            raise ApiError(400, "%s is not supported by this server; leave it out" % name, name, "unsupported_parameter")


@dataclass
class Job:
    """A checked request: the sequences to generate (prompt tokens, params), how to answer."""

    kind: str  # 'completion' or 'chat'
    prompts: list[list[int]]
    params: Params
    n: int
    stream: bool
    include_usage: bool


class Server:
    """The model, its engine, and the thread that runs it; turns requests into jobs."""

    def __init__(self, model, vocab, name: str, max_batch: int, seed: int, autocast=None, created: int | None = None):
        self.model, self.vocab, self.name = model, vocab, name
        self.block_size = model.config.block_size
        self.vocab_limit = vocab.limit or model.config.vocab_size
        self.created = created or int(time.time())
        self.engine = Engine(model, vocab, max_batch=max_batch, seed=seed, autocast=autocast)
        self._stop = False
        self.thread = threading.Thread(target=self._run, name="nanogpt-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop = True
        with self.engine.lock:
            self.engine.lock.notify_all()
        self.thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop:
            self.engine.wait_for_work(0.5)
            try:
                self.engine.step()
            except Exception as e:  # a bug: end what is in flight with an error, keep serving
                traceback.print_exc()
                self.engine.fail_all("the server failed while generating: %s" % first_line(e))

    # ---- requests

    def check_model(self, body: dict) -> None:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "model is required: a string naming the model (GET /v1/models lists it)", "model", "invalid_value")
        if model != self.name:
            raise ApiError(404, "the model %r does not exist; this server has %r" % (model, self.name), "model", "model_not_found")

    def _encode(self, text: str, param: str) -> list[int]:
        try:
            return self.vocab.tokenizer.encode(text)
        except UserError as e:
            raise ApiError(400, "%s: %s" % (param, e), param, "invalid_value") from None

    def _params(self, body: dict, prompts: list[list[int]], param: str, default_max, **extra) -> Params:
        longest = max(len(p) for p in prompts)
        if any(not p for p in prompts):
            raise ApiError(400, "%s is empty: give at least one token of prompt" % param, param, "invalid_value")
        if longest >= self.block_size:
            raise ApiError(400, "the %s has %d tokens; this model's context is %d tokens, which must also hold at least one new "
                           "token: shorten it" % (param, longest, self.block_size), param, "context_length_exceeded")
        room = self.block_size - longest
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _integer(body, name, None, 1)
        if max_tokens is None:
            max_tokens = min(default_max or room, room)
        elif max_tokens > room:
            raise ApiError(400, "%s=%d plus the %s's %d tokens is more than this model's context of %d tokens; ask for at most %d"
                           % (name, max_tokens, param, longest, self.block_size, room), name, "context_length_exceeded")
        seed = _integer(body, "seed", None, -2 ** 63, 2 ** 63 - 1)
        return Params(max_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, 0, 2),
                      top_p=_number(body, "top_p", 1.0, 0, 1, lo_open=True), top_k=_integer(body, "top_k", 0, 0),
                      stop=_stops(body), seed=seed, **extra)

    def _common(self, body: dict):
        self.check_model(body)
        _unsupported(body)
        n = _integer(body, "n", 1, 1, MAX_CHOICES)
        stream = body.get("stream", False)
        if stream is None:
            stream = False
        if not isinstance(stream, bool):
            raise ApiError(400, "stream must be true or false", "stream", "invalid_value")
        opts = body.get("stream_options") or {}
        if not isinstance(opts, dict):
            raise ApiError(400, "stream_options must be an object", "stream_options", "invalid_value")
        return n, stream, bool(opts.get("include_usage"))

    def completion_job(self, body: dict) -> Job:
        n, stream, usage = self._common(body)
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompts = [self._encode(prompt, "prompt")]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = [self._encode(p, "prompt") for p in prompt]
        elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, list) and all(_is_int(t) for t in p) for p in prompt):
            prompts = prompt
        else:
            raise ApiError(400, "prompt must be a string, a list of strings, a list of token ids or a list of lists of them",
                           "prompt", "invalid_value")
        for p in prompts:
            if any(t < 0 or t >= self.vocab_limit for t in p):
                raise ApiError(400, "prompt holds a token id outside this model's vocabulary of %d" % self.vocab_limit,
                               "prompt", "invalid_value")
        if n * len(prompts) > MAX_CHOICES:
            raise ApiError(400, "n times the number of prompts is %d; at most %d per request" % (n * len(prompts), MAX_CHOICES),
                           "n", "invalid_value")
        params = self._params(body, prompts, "prompt", 16)
        return Job("completion", prompts, params, n, stream, usage)

    def chat_job(self, body: dict) -> Job:
        n, stream, usage = self._common(body)
        if self.engine.eot is None:
            raise ApiError(400, "this model's vocabulary has no <|endoftext|> token, which the chat template needs; "
                           "use /v1/completions", "messages", "invalid_value")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty list of {\"role\", \"content\"} objects", "messages", "invalid_value")
        plain = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise ApiError(400, "messages[%d] is not an object" % i, "messages", "invalid_value")
            role, content = m.get("role"), m.get("content")
            role = "system" if role == "developer" else role
            if isinstance(content, list):  # content parts: only text ones
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                    raise ApiError(400, "messages[%d]: only text content parts are supported" % i, "messages", "invalid_value")
                content = "".join(p["text"] for p in content)
            elif content is None and role == "assistant":
                content = ""
            plain.append({"role": role, "content": content})
        try:
            ids = chat_template.prompt_ids(chat_template.check_messages(plain, "messages"), self.vocab.tokenizer)
        except UserError as e:
            raise ApiError(400, str(e), "messages", "invalid_value") from None
        params = self._params(body, [ids], "messages", None, strip_space=True)
        return Job("chat", [ids], params, n, stream, usage)


# --------------------------------------------------------------------------------------------
# the HTTP side


def _sse(obj) -> str:
    return "data: %s\n\n" % (obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False))


class _Run:
    """One job's sequences in the engine, their events arriving on an asyncio queue."""

    def __init__(self, server: Server, job: Job):
        self.server, self.job = server, job
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.seqs = []

        def put(event):  # from the engine's thread; after shutdown the loop may be gone
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self.queue.put_nowait, event)
        for prompt in job.prompts:
            for j in range(job.n):
                i = len(self.seqs)
                params = job.params
                if params.seed is not None and j:  # each choice its own, still reproducible, stream
                    params = Params(**dict(vars(params), seed=params.seed + j))
                self.seqs.append(server.engine.add(
                    prompt, params,
                    on_text=lambda s, t, i=i: put((i, t)), on_done=lambda s, i=i: put((i, None))))
        self.open = len(self.seqs)

    async def events(self):
        """(choice index, text delta or None when that choice ended)."""
        while self.open:
            i, text = await self.queue.get()
            if text is None:
                self.open -= 1
            yield i, text

    def cancel(self) -> None:
        for s in self.seqs:
            if s.finish_reason is None:
                self.server.engine.cancel(s)

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.job.prompts)  # each prompt counted once, whatever n
        completion = sum(len(s.tokens) for s in self.seqs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def error(self) -> str | None:
        return next((s.error for s in self.seqs if s.finish_reason == "error"), None)


def create_app(server: Server, log=_err):
    """The Starlette application answering for ``server``."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    def error_response(request, e: ApiError):
        request.scope["nanogpt.note"] = "%s: %s" % (e.code or e.type, e.message)
        return JSONResponse(e.body(), status_code=e.status)

    async def read_json(request) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, "the request body is not valid JSON (%s)" % first_line(e, 120), None, "invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
        return body

    def model_card() -> dict:
        return {"id": server.name, "object": "model", "created": server.created, "owned_by": "nanogpt",
                "context_length": server.block_size}

    async def models(request):
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model(request):
        if request.path_params["model"] != server.name:
            raise ApiError(404, "the model %r does not exist; this server has %r" % (request.path_params["model"], server.name),
                           "model", "model_not_found")
        return JSONResponse(model_card())

    async def answer(request, kind: str):
        body = await read_json(request)
        job = server.completion_job(body) if kind == "completion" else server.chat_job(body)
        run = _Run(server, job)
        request.scope["nanogpt.run"] = run
        rid = ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        head = {"id": rid, "object": "text_completion" if kind == "completion" else "chat.completion",
                "created": created, "model": server.name}
        if job.stream:
            return StreamingResponse(_stream(run, kind, dict(head)), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        texts = [""] * len(run.seqs)
        try:
            async for i, text in run.events():
                if text:
                    texts[i] += text
        finally:
            run.cancel()
        if run.error():
            raise ApiError(500, run.error(), None, "generation_failed", "server_error")
        choices = []
        for i, (seq, text) in enumerate(zip(run.seqs, texts)):
            if kind == "completion":
                choices.append({"text": text, "index": i, "logprobs": None, "finish_reason": seq.finish_reason})
            else:
                choices.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                                "finish_reason": seq.finish_reason})
        return JSONResponse(dict(head, choices=choices, usage=run.usage()))

    async def _stream(run: _Run, kind: str, head: dict):
        head["object"] = "text_completion" if kind == "completion" else "chat.completion.chunk"
        try:
            if kind == "chat":
                for i in range(len(run.seqs)):
                    yield _sse(dict(head, choices=[{"index": i, "delta": {"role": "assistant", "content": ""},
                                                    "logprobs": None, "finish_reason": None}]))
            async for i, text in run.events():
                seq = run.seqs[i]
                if text is None and seq.finish_reason == "error":
                    yield _sse(ApiError(500, seq.error, None, "generation_failed", "server_error").body())
                    continue
                reason = None if text is not None else seq.finish_reason
                if kind == "completion":
                    choice = {"text": text or "", "index": i, "logprobs": None, "finish_reason": reason}
                else:
                    choice = {"index": i, "delta": {"content": text} if text else {}, "logprobs": None, "finish_reason": reason}
                yield _sse(dict(head, choices=[choice]))
            if run.job.include_usage:
                yield _sse(dict(head, choices=[], usage=run.usage()))
            yield _sse("[DONE]")
        finally:
            run.cancel()

    async def completions(request):
        return await answer(request, "completion")

    async def chat_completions(request):
        return await answer(request, "chat")

    async def on_api_error(request, e: ApiError):
        return error_response(request, e)

    async def on_http_error(request, e: HTTPException):
        kind = "not_found" if e.status_code == 404 else "method_not_allowed" if e.status_code == 405 else None
        msg = "no route %s %s; this server has GET /v1/models, POST /v1/completions and POST /v1/chat/completions" % (
            request.method, request.url.path) if kind else str(e.detail)
        return error_response(request, ApiError(e.status_code, msg, None, kind))

    async def on_bug(request, e: Exception):
        traceback.print_exc()
        return error_response(request, ApiError(500, "internal error: %s" % first_line(e), None, "internal_error", "server_error"))

    routes = [Route("/v1/models", models, methods=["GET"]), Route("/v1/models/{model:path}", model, methods=["GET"]),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"])]
    app = Starlette(routes=routes, exception_handlers={ApiError: on_api_error, HTTPException: on_http_error, Exception: on_bug})
    return LogRequests(app, log)


class LogRequests:
    """ASGI middleware: one line per request when its answer has been sent (a stream's too), with
    the status, the latency and, for generation, tokens and tokens/s."""

    def __init__(self, app, log):
        self.app, self.log = app, log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = [0]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            dt = time.perf_counter() - t0
            line = "%s %s %s %d in %.3f s" % (time.strftime("%H:%M:%S"), scope["method"], scope["path"], status[0] or 500, dt)
            run = scope.get("nanogpt.run")
            if run is not None:
                u = run.usage()
                batch = max((s.max_batch_seen for s in run.seqs), default=0)
                line += ": %d prompt + %d completion tokens, %.1f tokens/s, in a batch of up to %d" % (
                    u["prompt_tokens"], u["completion_tokens"], u["completion_tokens"] / max(dt, 1e-9), batch)
                if any(s.cancelled for s in run.seqs):
                    line += ", cancelled by the client"
            if scope.get("nanogpt.note"):
                line += ": " + scope["nanogpt.note"]
            self.log(line)


# --------------------------------------------------------------------------------------------
# the command


def _server_libraries():
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise UserError("nanogpt serve needs %s: pip install 'nanogpt[serve]' (starlette and uvicorn)" % e.name) from None
    return uvicorn


def _listen(host: str, port: int) -> socket.socket:
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(128)
    except OSError as e:
        raise UserError("cannot listen on %s:%d (%s); choose another --port or --host" % (host, port, e.strerror or e)) from None
    return sock


def model_name(cfg) -> str:
    if cfg.model_name:
        return cfg.model_name
    if cfg.init_from == "resume":
        return os.path.basename(os.path.normpath(os.path.abspath(cfg.out_dir)))
    return os.path.basename(os.path.normpath(cfg.init_from))


def load_server(cfg: ServeConfig) -> Server:
    """The model of ``cfg`` on its device, in a Server (its thread not started)."""
    rt = runtime.setup(cfg.runtime, log=_err)
    model, train_config = load_for_inference(cfg.init_from, cfg.out_dir)
    model.eval().to(rt.device)
    autocast = rt.autocast
    if rt.device_type == "cuda" and rt.dtype != "float32":  # as sample.py: cast once, no autocast
        model.to(runtime.PTDTYPE[rt.dtype])
        autocast = None
    vocab = vocabulary_for(train_config, cfg.data_root, model.config.vocab_size)
    if cfg.compile:
        print("compile: not used by nanogpt serve (the batch and positions change at every token); running eagerly", file=sys.stderr)
    rt.threads.settle(_err)
    created = None
    if cfg.init_from == "resume":
        created = int(os.path.getmtime(os.path.join(cfg.out_dir, "ckpt.pt")))
    return Server(model, vocab, model_name(cfg), cfg.max_batch, cfg.seed, autocast, created)


def serve(cfg: ServeConfig) -> None:
    cfg.validate()
    uvicorn = _server_libraries()
    sock = _listen(cfg.host, cfg.port)
    server = load_server(cfg)
    host, port = sock.getsockname()[:2]
    url_host = "[%s]" % host if ":" in host else host
    config = uvicorn.Config(create_app(server), log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=5)
    try:
        server.start()
        _err("serving %s (%s, %.2fM parameters, context %d, batches of up to %d) on http://%s:%d/v1"
             % (server.name, server.vocab.name, server.model.num_params() / 1e6, server.block_size, cfg.max_batch, url_host, port))
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn finished the requests in flight, then passed Ctrl-C on
        pass
    finally:
        server.stop()
        with contextlib.suppress(OSError):
            sock.close()
    _err("stopped")


def main(argv: list[str] | None = None) -> None:
    run_command(lambda args: serve(ServeConfig.parse(args)), argv)


if __name__ == "__main__":
    main()
