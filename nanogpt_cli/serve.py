"""An OpenAI-compatible HTTP server over one model, its concurrent requests decoded as one batch.

    ngpt serve --out-dir out/shakespeare-char            # http://127.0.0.1:8000, playground at /
    ngpt serve --init_from=gpt2 --host 0.0.0.0 --api-key SECRET

Endpoints: POST /v1/completions, POST /v1/chat/completions (OpenAI's shapes, `stream` as server-sent
events ending in `data: [DONE]`; see `openai_api`), GET /v1/models, GET /health, and the playground
page at / (static/index.html). A `Scheduler` thread owns the model: every request becomes one
`generate.Request` per prompt, waits in a bounded queue (full: 429) until its n rows are free, joins
the decoding batch at the next step and leaves it when done, streaming its text back to the event
loop as it is produced; a client that disconnects frees its rows at the next step. Ctrl-C or SIGTERM
ends the requests in flight (503 / an error event), stops the server and exits 0.
"""

import asyncio
import contextlib
import hmac
import ipaddress
import json
import os
import signal
import socket
import threading
import time
from collections import deque
from pathlib import Path

import torch

from nanogpt_cli.config import ServeConfig
from nanogpt_cli.errors import NgptError
from nanogpt_cli.generate import BatchDecoder
from nanogpt_cli.generate import Request as DecodingRequest
from nanogpt_cli.openai_api import (
    ApiError,
    Limits,
    Response,
    Sampling,
    bad,
    parse_chat,
    parse_completion,
    sse,
)
from nanogpt_cli.runtime import autocast
from nanogpt_cli.sample import RequestText, encode_prompt, load_for_sampling, token_bytes

STATIC = Path(__file__).resolve().parent / "static"
SHUTTING_DOWN = "the server is shutting down"


class Job:
    """One prompt of an HTTP request in the scheduler: its `Request` (n rows), the text of its rows, and
    `deliver`, which hands a list of events to the request's event loop: ("text", choice, text),
    ("end", choice, finish reason, tokens) once per choice, or ("error", ApiError)."""

    def __init__(self, request: DecodingRequest, text: RequestText, first_choice: int, deliver):
        self.request, self.text, self.first_choice, self.deliver = request, text, first_choice, deliver
        self.cancelled = False

    def flush(self) -> None:
        """The request is done: its held-back text and the end of every choice."""
        events = [("text", self.first_choice + row, text) for row, text in self.text.finish()]
        events += [("end", self.first_choice + row, reason, self.text.tokens[row])
                   for row, reason in enumerate(self.request.finish_reasons)]
        self.deliver(events)


class Scheduler:
    """The decoding thread: jobs wait in a queue of at most max_queue, join the `BatchDecoder` when their rows
    are free (first come, first served), and deliver their text after every step."""

    def __init__(self, model, tokenizer, device: torch.device, dtype: str, max_batch: int, max_queue: int):
        self.device, self.dtype, self.max_queue = device, dtype, max_queue
        self.decoder = BatchDecoder(model, max_batch, vocab_size=getattr(tokenizer, "vocab_size", None))
        self.stop_token = tokenizer.eot_token
        self.to_bytes = token_bytes(tokenizer)
        self.waiting: deque[Job] = deque()
        self.running: dict[DecodingRequest, Job] = {}
        self.wake = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="ngpt-decoder", daemon=True)

    def job(self, ids: list[int], sampling: Sampling, first_choice: int, deliver) -> Job:
        generator = torch.Generator(device=self.device)
        if sampling.seed is None:
            generator.seed()
        else:
            generator.manual_seed(sampling.seed)
        idx = torch.tensor([ids] * sampling.n, dtype=torch.long, device=self.device)
        request = DecodingRequest(idx, sampling.max_tokens, sampling.temperature, sampling.top_k, sampling.top_p,
                                  generator, self.stop_token)
        return Job(request, RequestText(request, self.to_bytes, sampling.stop), first_choice, deliver)

    def submit(self, jobs: list[Job]) -> None:
        """Queue the jobs of one HTTP request, all or none: 429 when the queue has no room for them."""
        with self.wake:
            if self.stopping:
                raise ApiError(503, SHUTTING_DOWN, kind="server_error")
            if len(self.waiting) + len(jobs) > self.max_queue:
                raise ApiError(429, f"the server is busy: {len(self.waiting)} prompts are waiting for free rows "
                                    f"(--max_queue {self.max_queue}); retry later", kind="rate_limit_error",
                               code="rate_limit_exceeded")
            self.waiting.extend(jobs)
            self.wake.notify()

    def cancel(self, jobs: list[Job]) -> None:
        """Drop jobs whose client has gone: a waiting job leaves the queue, a running one the batch at the next step
        (a job that is done already is left as it is)."""
        with self.wake:
            for job in jobs:
                job.cancelled = True
                if job in self.waiting:
                    self.waiting.remove(job)

    def load(self) -> dict:
        return {"running": len(self.running), "waiting": len(self.waiting), "slots": self.decoder.slots}

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """End every job (waiting and running) with a 503 once the step in progress is over, and the thread."""
        with self.wake:
            self.stopping = True
            self.wake.notify()

    def join(self, timeout: float | None = None) -> None:
        if self.thread.is_alive():
            self.thread.join(timeout)

    def _run(self) -> None:
        with torch.inference_mode(), autocast(self.device, self.dtype):
            while self._admit():
                try:
                    self._step()
                except Exception as e:  # one failed step (out of memory, say) ends the jobs in it, not the server
                    self._fail(list(self.running.values()), ApiError(
                        500, f"decoding failed: {type(e).__name__}: {' '.join(str(e).split())}", kind="server_error"))
        with self.wake:
            jobs = [*self.running.values(), *self.waiting]
            self.waiting.clear()
        self._fail(jobs, ApiError(503, SHUTTING_DOWN, kind="server_error"))

    def _admit(self) -> bool:
        """Wait for work; drop cancelled jobs; let waiting jobs join while rows are free. False: stop."""
        with self.wake:
            while not self.stopping and not self.waiting and not self.running:
                self.wake.wait()
            if self.stopping:
                return False
            for job in self.running.values():
                if job.cancelled:
                    for row in range(job.request.n):
                        job.request.finish(row, "cancelled")
            self._retire()
            while self.waiting and self.decoder.add(self.waiting[0].request):
                job = self.waiting.popleft()
                self.running[job.request] = job
            return True

    def _step(self) -> None:
        for request, column in self.decoder.step().items():
            job = self.running[request]
            pieces = job.text.take(column)
            if pieces:
                job.deliver([("text", job.first_choice + row, text) for row, text in pieces])
        self._retire()

    def _retire(self) -> None:
        for request in self.decoder.retire():
            job = self.running.pop(request)
            if not job.cancelled:
                job.flush()

    def _fail(self, jobs: list[Job], error: ApiError) -> None:
        for job in jobs:
            for row in range(job.request.n):
                job.request.finish(row, "error")
            if not job.cancelled:
                job.deliver([("error", error)])
        for request in self.decoder.retire():
            self.running.pop(request, None)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def read_json(request, limit: int) -> dict:
    """The request's JSON object, at most `limit` bytes (413 beyond), or a 400 saying what is wrong with it."""
    declared = request.headers.get("content-length", "")
    too_big = ApiError(413, f"the request body is larger than {limit} bytes (--max_request_bytes)")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    try:
        data = json.loads(body)
    except ValueError as e:  # malformed JSON, or bytes that are not UTF-8
        raise bad(f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise bad("the request body must be a JSON object")
    return data


class Service:
    """What the endpoints share: the scheduler, the tokenizer, the limits and the model's name."""

    def __init__(self, scheduler: Scheduler, tokenizer, limits: Limits, model_name: str, api_key: str | None,
                 max_request_bytes: int):
        self.scheduler, self.tokenizer, self.limits, self.model_name = scheduler, tokenizer, limits, model_name
        self.api_key, self.max_request_bytes = api_key, max_request_bytes
        self.started = int(time.time())

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            return prompt
        try:
            return encode_prompt(self.tokenizer, prompt)
        except NgptError as e:
            raise bad(str(e), "prompt") from None

    async def generate(self, http_request, response: Response, prompts: list[list[int]], sampling: Sampling,
                       echo: list[str] | None = None):
        """Run the prompts (n choices each) through the scheduler: a JSON response, or a stream of events."""
        from fastapi.responses import JSONResponse, StreamingResponse

        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def deliver(events):  # called on the decoding thread
            loop.call_soon_threadsafe(queue.put_nowait, events)

        jobs = [self.scheduler.job(ids, sampling, i * sampling.n, deliver) for i, ids in enumerate(prompts)]
        self.scheduler.submit(jobs)
        prompt_tokens = sum(len(ids) for ids in prompts)
        choices = len(prompts) * sampling.n
        if sampling.stream:
            return StreamingResponse(self._stream(response, jobs, queue, choices, prompt_tokens, sampling, echo),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        texts, reasons, tokens = [""] * choices, [""] * choices, 0
        watcher = asyncio.create_task(self._watch(http_request, jobs, queue))
        try:
            async for event in self._events(queue, choices):
                if event[0] == "text":
                    texts[event[1]] += event[2]
                else:
                    reasons[event[1]], tokens = event[2], tokens + event[3]
        finally:
            watcher.cancel()
            self.scheduler.cancel(jobs)
        if echo:
            texts = [echo[i // sampling.n] + text for i, text in enumerate(texts)]
        return JSONResponse(response.complete(texts, reasons, prompt_tokens, tokens))

    @staticmethod
    async def _events(queue: asyncio.Queue, choices: int):
        """The events of a request's jobs until every choice has ended; an error event is raised."""
        while choices:
            for event in await queue.get():
                if event[0] == "error":
                    raise event[1]
                choices -= event[0] == "end"
                yield event

    async def _watch(self, http_request, jobs: list[Job], queue: asyncio.Queue) -> None:
        """A client waiting for a whole response that disconnects: its jobs are cancelled, its handler ended."""
        while not await http_request.is_disconnected():
            await asyncio.sleep(0.25)
        self.scheduler.cancel(jobs)
        queue.put_nowait([("error", ApiError(499, "the client disconnected"))])

    async def _stream(self, response: Response, jobs: list[Job], queue: asyncio.Queue, choices: int,
                      prompt_tokens: int, sampling: Sampling, echo: list[str] | None):
        """Server-sent events: a chunk per piece of text, one per choice's end, usage if asked, then [DONE]. A client
        that disconnects cancels this generator (starlette does), which cancels its jobs."""
        tokens = 0
        try:
            if response.chat:
                yield "".join(sse(response.chunk(i, role=True)) for i in range(choices))
            if echo:
                yield "".join(sse(response.chunk(i, echo[i // sampling.n])) for i in range(choices))
            async for event in self._events(queue, choices):
                if event[0] == "text":
                    yield sse(response.chunk(event[1], event[2]))
                else:
                    tokens += event[3]
                    yield sse(response.chunk(event[1], reason=event[2]))
            if sampling.include_usage:
                yield sse(response.usage_chunk(prompt_tokens, tokens))
        except ApiError as e:  # the server is stopping, or the step failed: the client hears why
            yield sse(e.body())
        finally:
            self.scheduler.cancel(jobs)
        yield sse("[DONE]")


def create_app(service: Service):
    """The FastAPI app: OpenAI's endpoints under /v1 (behind the API key when there is one), /health, the page."""
    from fastapi import APIRouter, Depends, FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse
    from starlette.exceptions import HTTPException

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.scheduler.start()
        yield
        service.scheduler.stop()
        await asyncio.to_thread(service.scheduler.join)

    app = FastAPI(title="ngpt serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    def error_response(error: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        if error.status == 429:
            headers = {"Retry-After": "1"}
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(request, error: ApiError):
        return error_response(error)

    @app.exception_handler(HTTPException)
    async def http_error(request, error: HTTPException):  # unknown paths, wrong methods
        return error_response(ApiError(error.status_code, str(error.detail)))

    @app.exception_handler(Exception)
    async def server_error(request, error: Exception):
        return error_response(ApiError(500, f"internal error: {type(error).__name__}", kind="server_error"))

    async def check_key(request: Request) -> None:
        if service.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), service.api_key.encode()):
            raise ApiError(401, "a valid API key is required: send `Authorization: Bearer KEY`",
                           code="invalid_api_key")

    api = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    @api.get("/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @api.get("/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != service.model_name:
            raise ApiError(404, f"no model {model_id!r} here; this server has {service.model_name!r}", "model",
                           code="model_not_found")
        return model_card()

    def model_card() -> dict:
        return {"id": service.model_name, "object": "model", "created": service.started, "owned_by": "ngpt"}

    @api.post("/completions")
    async def completions(request: Request):
        parsed = parse_completion(await read_json(request, service.max_request_bytes), service.limits)
        prompts = [service.encode(p) for p in parsed.prompts]
        echo = [p if isinstance(p, str) else service.tokenizer.decode(p) for p in parsed.prompts] if parsed.echo \
            else None
        return await service.generate(request, Response(service.model_name, chat=False), prompts, parsed.sampling,
                                      echo)

    @api.post("/chat/completions")
    async def chat_completions(request: Request):
        parsed = parse_chat(await read_json(request, service.max_request_bytes), service.limits)
        return await service.generate(request, Response(service.model_name, chat=True),
                                      [service.encode(parsed.prompt)], parsed.sampling)

    app.include_router(api)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": service.model_name, **service.scheduler.load()}

    @app.get("/")
    async def playground():  # a static page: its calls to /v1 carry the key the user types into it
        return FileResponse(STATIC / "index.html", media_type="text/html")

    return app


def build_service(cfg: ServeConfig, model, tokenizer, device: torch.device, dtype: str) -> Service:
    """The scheduler and what the endpoints need, for a loaded model; the API key is cfg's or $NGPT_API_KEY."""
    scheduler = Scheduler(model, tokenizer, device, dtype, cfg.max_batch, cfg.max_queue)
    vocab = getattr(tokenizer, "vocab_size", None) or model.config.vocab_size
    api_key = cfg.api_key or os.environ.get("NGPT_API_KEY") or None
    return Service(scheduler, tokenizer, Limits(cfg.max_tokens, cfg.max_n, vocab), model_name_for(cfg), api_key,
                   cfg.max_request_bytes)


def uvicorn_server(app, host: str, port: int, on_started=None):
    """A uvicorn server whose Ctrl-C / SIGTERM ends the requests in flight and then the server, without raising the
    signal again afterwards (uvicorn's habit, which would make the exit code 130/143): `stopped_by` names it.
    on_started(port) is called once it listens."""
    import uvicorn

    class Server(uvicorn.Server):
        stopped_by: str | None = None

        def handle_exit(self, sig: int, frame) -> None:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True  # a second Ctrl-C: stop waiting for connections
            self.should_exit = True
            self.stopped_by = self.stopped_by or signal.Signals(sig).name

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started and on_started is not None:
                on_started(self.servers[0].sockets[0].getsockname()[1])

        async def shutdown(self, sockets=None) -> None:
            app.state.service.scheduler.stop()  # the requests in flight end, so their connections close
            await super().shutdown(sockets)

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=5)
    return Server(config)


def check_can_listen(host: str, port: int) -> None:
    """Fail in one line, before the model loads, when the address cannot be bound (taken, or an unknown host)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind(address)
    except OSError as e:
        raise NgptError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def model_name_for(cfg: ServeConfig) -> str:
    if cfg.model_name:
        return cfg.model_name
    if cfg.init_from == "resume":
        return Path(cfg.out_dir).expanduser().resolve().name
    return cfg.init_from


def serve(cfg: ServeConfig) -> None:
    """`ngpt serve`: load the model and serve it in the foreground until Ctrl-C or SIGTERM (then return)."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise NgptError("ngpt serve needs FastAPI and uvicorn: pip install 'nanogpt-cli[serve]'") from None
    from nanogpt_cli.progress import console

    check_can_listen(cfg.host, cfg.port)
    model, tokenizer, device, dtype = load_for_sampling(cfg)
    service = build_service(cfg, model, tokenizer, device, dtype)
    if not is_loopback(cfg.host) and service.api_key is None:
        console.print(f"warning: listening on {cfg.host} without an API key: anyone who can reach this machine can "
                      "use the model (--api_key or $NGPT_API_KEY to require one)", markup=False, highlight=False)

    def started(port: int) -> None:
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        console.print(f"serving {service.model_name} ({model.get_num_params() / 1e6:.2f}M parameters, block_size "
                      f"{model.config.block_size}) on {device} {dtype}: {cfg.max_batch} rows, at most "
                      f"{cfg.max_queue} waiting{', API key required' if service.api_key else ''}", markup=False,
                      highlight=False)
        console.print(f"http://{host}:{port}  (playground /, API /v1, /health); Ctrl-C stops", markup=False,
                      highlight=False)

    server = uvicorn_server(create_app(service), cfg.host, cfg.port, started)
    try:
        server.run()
    except SystemExit as e:  # uvicorn exits when it cannot start (the port is taken, say)
        raise NgptError(f"the server could not start on {cfg.host}:{cfg.port} (see the message above)") from e
    if not server.started:
        raise NgptError(f"the server could not start on {cfg.host}:{cfg.port} (see the message above)")
    if server.stopped_by:
        console.print(f"stopped by {server.stopped_by}", markup=False, highlight=False)
