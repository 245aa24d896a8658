"""nmt serve: the Python API (nmt.Translator) over HTTP, with FastAPI on uvicorn.

Endpoints: POST /translate, GET /models, GET /health, /openapi.json (the contract: nmt.schemas)
and the attention page at GET / (nmt/web/index.html). Concurrent requests are decoded together
by one decoding thread (nmt.batcher).

Safe by default: it listens on 127.0.0.1; another address needs an API key (NMT_API_KEY), which
every endpoint but the page and /health then asks for. Request sizes are bounded (ServeSettings)
and the body is checked before it is parsed; models are named on the command line, never by a
request, and no path comes from one.

No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at
runtime, and the request model is made per app (its bounds are the server's settings).
"""

import asyncio
import contextlib
import dataclasses
import hmac
import ipaddress
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn
from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from nmt import __version__
from nmt.batcher import Batcher, GroupKey, ShuttingDown
from nmt.errors import NmtError
from nmt.schemas import (
    ERRORS,
    HealthResponse,
    ModelsResponse,
    TranslateResponse,
    model_info,
    one_line,
    request_model,
    translation_out,
    validation_error,
)

if TYPE_CHECKING:  # torch, imported when the models load: a refused --host is said at once
    from nmt.translate import Translator
    from nmt.worker import BatcherProcess, WorkerPool

API_KEY_ENV = "NMT_API_KEY"
OPEN = {("GET", "/"), ("GET", "/health")}  # what a client may ask without the API key

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
                   Awaitable[None]]


@dataclass(frozen=True)
class ServeSettings:
    max_sentences: int = 64  # per request
    max_chars: int = 1000  # per sentence
    max_body_bytes: int = 1 << 20  # per request, checked before the body is parsed
    max_beam: int = 16  # the largest beam (and nbest) a request may ask for
    max_batch: int = 64  # sentences decoded together
    max_wait_ms: float = 5.0  # how long the oldest request waits for others to share its batch
    join_wait_ms: float = 20.0  # how long requests may wait to join a running search together
    api_key: str | None = None  # when set, `Authorization: Bearer <key>` (all but OPEN)

    def check(self) -> None:
        for field in dataclasses.fields(self):
            value, option = getattr(self, field.name), f"--{field.name.replace('_', '-')}"
            if field.name in ("max_wait_ms", "join_wait_ms") and value < 0:
                raise NmtError(f"{option} must be 0 or more, got {value}")
            if field.name not in ("max_wait_ms", "join_wait_ms", "api_key") and value < 1:
                raise NmtError(f"{option} must be at least 1, got {value}")
        if self.max_sentences > self.max_batch:  # a request is decoded in one batch at most
            raise NmtError(f"--max-sentences {self.max_sentences} is more than --max-batch {self.max_batch}: "
                           "lower it, or raise --max-batch")


def page() -> str | None:
    """nmt/web/index.html, read at each request (None when it is not installed)."""
    try:
        return resources.files("nmt").joinpath("web/index.html").read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return None


# -- the app ---------------------------------------------------------------------------------------

def create_app(translators: "dict[str, Translator]", settings: ServeSettings | None = None,
               batcher: "Batcher | BatcherProcess | WorkerPool | None" = None) -> FastAPI:
    """The API over `translators` (name → Translator; the first is the default). They decode in
    `batcher`: by default a decoding thread of this process; `nmt serve` gives a worker process
    (nmt.worker) that loaded the same models."""
    settings = settings or ServeSettings()
    if not translators:
        raise NmtError("nmt serve needs at least one model")
    names = list(translators)
    if batcher is None:
        batcher = Batcher(translators, settings.max_batch, settings.max_wait_ms / 1000, settings.join_wait_ms / 1000)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(batcher.open)  # a worker process that has stopped starts again
        yield
        await asyncio.to_thread(batcher.close)

    app = FastAPI(title="nmt", version=__version__, lifespan=lifespan,
                  description="Neural machine translation with attention RNN encoder-decoders.")
    app.state.batcher = batcher
    app.add_middleware(Guard, settings=settings)
    Request_ = request_model(settings)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, detail = validation_error(list(exc.errors()))
        return JSONResponse({"detail": detail}, status_code=status)

    @app.exception_handler(StarletteHTTPException)  # FastAPI's, and the router's 404 and 405
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": one_line(exc.detail)}, status_code=exc.status_code,
                            headers=exc.headers)

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        html = page()
        if html is None:
            raise HTTPException(404, "the web page (nmt/web/index.html) is not installed")
        return HTMLResponse(html)

    @app.get("/health", response_model=HealthResponse)
    async def health() -> dict[str, Any]:
        sentences, rounds, in_rounds = batcher.totals
        return {"status": "ok", "models": names, "sentences": sentences, "rounds": rounds,
                "mean_batch": in_rounds / rounds if rounds else 0.0}

    @app.get("/models", response_model=ModelsResponse, responses={401: ERRORS[401]})
    async def models() -> dict[str, Any]:
        return {"default": names[0], "models": [model_info(n, t) for n, t in translators.items()]}

    @app.post("/translate", response_model=TranslateResponse, responses=ERRORS)
    async def translate(body: Request_) -> dict[str, Any]:  # type: ignore[valid-type]
        name = body.model if body.model is not None else names[0]
        if name not in translators:
            raise HTTPException(404, f"unknown model {name!r}; known: {', '.join(names)}")
        beam = body.beam or translators[name].decode.beam_size
        if body.nbest > beam:
            raise HTTPException(422, f"nbest: {body.nbest} is more than the beam size ({beam})")
        try:
            results = await asyncio.wrap_future(
                batcher.submit(GroupKey(name, beam, body.nbest, body.attention), body.sentences))
        except ShuttingDown as err:
            raise HTTPException(503, str(err)) from None
        except Exception as err:  # the server stays up; the client hears what went wrong
            raise HTTPException(500, f"decoding failed: {type(err).__name__}: {err}") from None
        return {"model": name, "beam": beam, "translations": [translation_out(t) for t in results]}

    return app


class Guard:
    """Before FastAPI sees a request: the API key (401), then the body, read whole up to
    max_body_bytes (413 beyond, without reading on) and checked to be UTF-8 (400)."""

    def __init__(self, app: ASGIApp, settings: ServeSettings):
        self.app, self.settings = app, settings
        self.expected = f"Bearer {settings.api_key}".encode() if settings.api_key else None

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        if self.expected is not None and (scope["method"], scope["path"]) not in OPEN and \
                not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
            await reply(scope, receive, send, 401, "this server needs an API key: header "
                        "'Authorization: Bearer <key>'", {"WWW-Authenticate": "Bearer"})
            return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        limit = self.settings.max_body_bytes
        too_large = f"request body over {limit} bytes (--max-body-bytes)"
        declared = headers.get(b"content-length", b"")  # uvicorn refuses one that is not a number
        if declared.isdigit() and int(declared) > limit:
            await reply(scope, receive, send, 413, too_large)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > limit:
                await reply(scope, receive, send, 413, too_large)
                return
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as err:
            await reply(scope, receive, send, 400, f"request body is not valid UTF-8 ({err.reason} "
                        f"at byte {err.start})")
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


async def reply(scope: Scope, receive: Callable[[], Awaitable[Message]],
                send: Callable[[Message], Awaitable[None]], status: int, detail: str,
                headers: dict[str, str] | None = None) -> None:
    await JSONResponse({"detail": detail}, status_code=status, headers=headers)(scope, receive, send)


# -- nmt serve -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSpec:
    name: str
    paths: list[Path]  # one, or the members of an ensemble


def parse_models(specs: list[str]) -> list[ModelSpec]:
    """--model values: PATH or NAME=PATH, PATH an experiment directory or a checkpoint, or several
    joined by commas for an ensemble. A bare PATH is named after the experiment directory (or the
    checkpoint file's stem). A value that names an existing file as a whole is one path."""
    parsed = []
    for spec in specs:
        name, sep, rest = spec.partition("=")
        if not sep or "/" in name or Path(spec).exists():
            name, rest = "", spec
        elif not name:
            raise NmtError(f"--model {spec}: the name before '=' is empty")
        paths = [Path(spec)] if Path(spec).exists() else [Path(p) for p in rest.split(",") if p]
        if not paths:
            raise NmtError(f"--model {spec}: no path")
        name = name or "+".join(p.resolve().name if p.is_dir() else p.stem for p in paths)
        parsed.append(ModelSpec(name, paths))
    seen = [spec.name for spec in parsed]
    for name in seen:
        if seen.count(name) > 1:
            raise NmtError(f"--model: two models are named '{name}': name them with --model NAME=PATH")
    return parsed


def is_loopback(host: str) -> bool:
    """Whether every address `host` stands for is a loopback one (127.0.0.0/8, ::1)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise NmtError(f"--host {host}: {err.strerror}") from None
    return all(ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos)


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the models load: a port in use is said at once."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as err:
        raise NmtError(f"cannot listen on {host}:{port} ({err.strerror or err})") from None
    return sock


def default_workers(device: str, threads: int) -> int:
    """Two worker processes on a CPU with two threads or more, else one. With 16 one-sentence
    clients on a 2-core CPU, two single-threaded workers served 1.5-1.9x the sentences of one
    two-threaded worker (README, Over HTTP): beam search over a few sentences is a chain of small
    products that one core runs nearly as fast as two. On a GPU, one process holds the models."""
    from nmt.device import resolve_device

    return 2 if resolve_device(device).type == "cpu" and threads >= 2 else 1


def run_server(models: list[str], host: str = "127.0.0.1", port: int = 8080, device: str = "auto",
               precision: str | None = None, settings: ServeSettings | None = None,
               threads: int | None = None, in_process: bool = False, workers: int | None = None) -> None:
    """`nmt serve`: refuses a non-loopback --host without NMT_API_KEY, and a port it cannot have,
    before the models load; then serves until Ctrl-C or SIGTERM. The models decode in `workers`
    worker processes (nmt.worker; default_workers() when None) that share the `threads` (torch's
    number by default), or with `in_process` in a thread of the server's own."""
    settings = dataclasses.replace(settings or ServeSettings(), api_key=os.environ.get(API_KEY_ENV) or None)
    settings.check()
    if threads is not None and threads < 1:
        raise NmtError(f"--threads must be at least 1, got {threads}")
    if workers is not None and workers < 1:
        raise NmtError(f"--workers must be at least 1, got {workers}")
    if in_process and workers is not None and workers > 1:
        raise NmtError(f"--in-process decodes in one thread of the server: it cannot have --workers {workers}")
    if settings.api_key is None and not is_loopback(host):
        raise NmtError(f"--host {host} is not a loopback address: set {API_KEY_ENV} so that requests "
                       "need a key, or leave --host at 127.0.0.1")
    specs = parse_models(models)
    sock = listen(host, port)
    with sock:
        import torch

        from nmt.translate import Translator

        if threads is not None:
            torch.set_num_threads(threads)
        batcher = None
        if in_process:
            translators = {spec.name: Translator.load(spec.paths, device, precision) for spec in specs}
        else:
            from nmt.worker import WorkerPool, worker_spec

            # This process only describes the models (GET /models, default beams): on the CPU, so
            # that a GPU holds them once, in the worker, which says which device and precision run.
            translators = {spec.name: Translator.load(spec.paths, "cpu", "fp32", log=lambda line: None)
                           for spec in specs}
            threads = threads or torch.get_num_threads()
            workers = workers or default_workers(device, threads)
            # The threads are shared out: two workers of two threads each on two cores would fight.
            each = max(1, threads // workers)
            batcher = WorkerPool(worker_spec({spec.name: spec.paths for spec in specs}, device, precision,
                                             each, settings.max_batch, settings.max_wait_ms,
                                             settings.join_wait_ms), workers)
            batcher.start()
        app = create_app(translators, settings, batcher)
        bound_host, bound_port = sock.getsockname()[:2]
        bound_host = f"[{bound_host}]" if ":" in bound_host else bound_host  # an IPv6 address
        print(f"nmt serve: {', '.join(translators)} on http://{bound_host}:{bound_port}"
              f"{' (API key required)' if settings.api_key else ''}", file=sys.stderr, flush=True)
        # uvicorn stops gracefully on SIGTERM, then raises it again for the handler it found:
        # this one, so that a stop asked for ends with exit status 0 (Ctrl-C still ends with 130)
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
        try:
            uvicorn.Server(uvicorn.Config(app, access_log=False)).run(sockets=[sock])
        finally:
            signal.signal(signal.SIGTERM, previous)
