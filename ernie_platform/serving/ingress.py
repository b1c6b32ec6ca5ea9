"""The HTTP ingress: a FastAPI app inside a Ray Serve deployment, speaking OpenAI's API.

Per request: authenticate (optional Bearer key), parse and validate the body (`protocol`), tokenize (chat template
in `chat`), check the context, then drive the engine deployments through handles:

* pd mode: prompts of at least `disagg_min_prompt_tokens` go to a Prefill replica (`prefill` → `PrefillResult`),
  whose `DeploymentResponse` is passed straight into the Decode replica's streaming `generate` call, so the KV moves
  Prefill → object store → Decode without passing through the ingress and without recomputation; shorter prompts
  go to the Decode replica as tokens and prefill there.
* colocated mode: every prompt goes to the Engine deployment as tokens.

A request whose engine replica dies is re-run (`retries`) when the client has not been sent anything yet
(non-streamed requests: always; streams: before the first token); otherwise it ends with a clean error: a 503 body,
or an SSE `data: {"error": ...}` event followed by `data: [DONE]` when the stream had already started.

Hardening (issue #22): bodies over `max_request_bytes` are refused with 413 (from Content-Length before reading, else
while reading); prompts are tokenized off the event loop in a bounded thread pool (`max_concurrent_tokenizations`),
and a prompt too long to fit the context whatever its tokens is refused before tokenizing; `/v1/models` names the
model, never its path; `/metrics` can require the key (`metrics_require_key`).
"""

# No `from __future__ import annotations` here: Serve re-wraps the route methods, and FastAPI must see the real
# `Request` class in their signatures (string annotations would resolve in Serve's module, not this one).
import asyncio
import dataclasses
import hmac
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Awaitable, Callable, Optional, TypeVar

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic.json_schema import models_json_schema
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ernie_platform.inference import SamplingParams
from ernie_platform.serving import chat as chatfmt
from ernie_platform.serving import responses as R
from ernie_platform.serving.app import DEFAULT_MAX_REQUEST_BYTES, DEFAULT_TOKENIZATIONS
from ernie_platform.serving.images import mm_prompt
from ernie_platform.serving.metrics import ServingMetrics
from ernie_platform.serving.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    bad_request,
    chat_sampling,
    completion_sampling,
    parse_body,
    thinking_requested,
)

log = logging.getLogger(__name__)
MAX_PROMPTS = 64  # prompts in one /v1/completions request
REPLICA_FAILURES = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)
# A prompt of more than this many characters per context token cannot fit whatever its tokens: each token covers at
# most its vocabulary entry's length, and this factor leaves room for normalizers that compose characters.
CHARS_PER_TOKEN_SLACK = 4
T = TypeVar("T")

app = FastAPI(title="ERNIE 4.5 OpenAI-compatible API", docs_url=None, redoc_url=None)
BODY_MODELS = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatRequest}


def openapi_schema() -> dict[str, Any]:
    """FastAPI's schema plus the request bodies: the routes read the raw body (strict parsing with OpenAI-shaped
    errors), so FastAPI cannot see them; clients and the API fuzz test (tests/test_serve_fuzz.py) read them here."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    _, defs = models_json_schema([(m, "validation") for m in BODY_MODELS.values()],
                                 ref_template="#/components/schemas/{model}")  # fmt: skip
    schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
    for path, model in BODY_MODELS.items():
        op = schema.get("paths", {}).get(path, {}).get("post")
        if op is not None:
            ref = {"$ref": f"#/components/schemas/{model.__name__}"}
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref}}}
    app.openapi_schema = schema
    return schema


app.openapi = openapi_schema  # type: ignore[method-assign]


@app.exception_handler(APIError)
async def _api_error(_: Request, e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:  # unknown route / method
    return JSONResponse(APIError(e.status_code, str(e.detail), code="not_found").body(), status_code=e.status_code)


def load_serving_tokenizer(path: Optional[str]) -> Any:
    """The checkpoint's tokenizer, or the built-in byte-level one (as `Engine.from_pretrained` decides)."""
    from ernie_platform.inference.loading import checkpoint_tokenizer

    return checkpoint_tokenizer(path)


def _cause(e: BaseException) -> BaseException:
    cause = getattr(e, "cause", None)  # RayTaskError keeps the replica's exception here
    return cause if isinstance(cause, BaseException) else e


def _message(e: BaseException) -> str:
    return str(_cause(e)).strip().splitlines()[-1]


def to_api_error(e: BaseException) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, ValueError):  # the engine's own checks (also RayTaskError(ValueError) from a replica)
        return bad_request(_message(e), code="invalid_value")
    if isinstance(e, REPLICA_FAILURES) or type(_cause(e)).__name__ == "EngineDeadError":  # vLLM's engine core died
        return APIError(503, f"engine replica unavailable: {_message(e)}", "server_error", None, "engine_unavailable")
    if isinstance(e, BackPressureError):
        return APIError(503, "server overloaded, retry later", "server_error", None, "overloaded")
    if isinstance(e, ClientDisconnect):  # the client left while sending its body: nobody reads this answer
        return bad_request("the client disconnected before sending the whole body", code="client_disconnected")
    log.exception("request failed", exc_info=e)
    return APIError(500, f"internal error: {type(e).__name__}: {_message(e)}", "server_error", None, "internal_error")


# Helpers of the Ingress class are defined above it: `@serve.ingress` freezes the class with cloudpickle while this
# module is still importing, and the frozen methods see only the module globals that exist at that point.
def _too_large(size: Optional[int], limit: int) -> APIError:
    what = f"{size} bytes" if size is not None else "larger than that"
    return APIError(413, f"request body is {what}; this server accepts at most {limit} bytes (serve.max_request_bytes)",
                    "invalid_request_error", None, "request_too_large")  # fmt: skip


def _image_processor(vision: Optional[dict[str, Any]]) -> Any:
    """The served VL model's image processor: the checkpoint's `preprocessor_config.json` when it has one, else the
    defaults at the model's patch and merge sizes. None for a text model."""
    if not vision:
        return None
    from ernie_platform.models.vl.image_processing import ErnieImageProcessor, ImageProcessorConfig

    if vision.get("processor"):
        return ErnieImageProcessor(ImageProcessorConfig.from_dict(vision["processor"]))
    return ErnieImageProcessor(ImageProcessorConfig(patch_size=vision["patch_size"], merge_size=vision["merge_size"]))


class _Job:
    """One engine request of an HTTP request: a prompt, its params and (for responses) its choice states."""

    def __init__(
        self, rid: str, ids: list[int], params: SamplingParams, base: int, splitter: Any, echo: str = "", mm: Any = None
    ):
        self.rid, self.ids, self.params, self.echo, self.mm = rid, ids, params, echo, mm
        self.choices = [R.ChoiceState(base + i, len(ids), splitter() if splitter else None) for i in range(params.n)]


@serve.ingress(app)
class Ingress:
    def __init__(self, cfg: dict[str, Any], prefill: Any, engine: Any):
        self.cfg = cfg
        self.model = cfg["model_name"]
        self.backend = cfg.get("backend", "native")
        self.tokenizer = load_serving_tokenizer(cfg["model_path"])
        self.think_end = chatfmt.think_end_id(self.tokenizer)
        self.image_processor = _image_processor(cfg.get("vision"))
        self.prefill, self.engine = prefill, engine
        self.grpc = bool(cfg.get("grpc_transport", True))
        # Token streams over Serve's direct gRPC transport (`_by_reference=False`): per item it costs about half of
        # the default object-store path, which dominates serving overhead for small models. The prefill result
        # stays by reference, and goes to the decode replica as a `KVRef`.
        self.stream_handle = engine.options(stream=True)
        if self.grpc:
            try:
                self.stream_handle = engine.options(stream=True, _by_reference=False)
                self.prefill = prefill.options(_by_reference=True) if prefill is not None else None
            except TypeError:  # a Ray Serve without the option: the object-store path
                log.warning("this Ray Serve has no direct gRPC transport for handles; using the object store")
                self.grpc = False
        self.metrics = ServingMetrics()
        self.created = int(time.time())
        self.max_request_bytes = int(cfg.get("max_request_bytes") or DEFAULT_MAX_REQUEST_BYTES)
        # Tokenizing a long prompt takes seconds (4 MB: ~4 s with the built-in tokenizer): on the event loop it would
        # stall every other request of this replica. A pool thread does it; the semaphore bounds how many run, and
        # waiting for it is cancellable (a client that leaves while queued costs nothing).
        slots = int(cfg.get("max_concurrent_tokenizations") or DEFAULT_TOKENIZATIONS)
        self.tok_pool = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="ernie-tokenize")
        self.tok_slots = asyncio.Semaphore(slots)
        vocab = self.tokenizer.get_vocab() if hasattr(self.tokenizer, "get_vocab") else {}
        longest = max((len(t) for t in vocab), default=0) or 64
        self.max_prompt_chars = CHARS_PER_TOKEN_SLACK * longest * int(cfg["max_seq_len"])

    # ---- plumbing ------------------------------------------------------------------------------------------------
    def _auth(self, request: Request) -> None:
        key = self.cfg.get("api_key")
        key = key.get() if hasattr(key, "get") else key  # an `auth.Secret` (or a plain string in unit use)
        if not key:
            return
        got = request.headers.get("authorization", "")
        token = got[7:].strip() if got[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), key.encode()):
            raise APIError(401, "Incorrect or missing API key (Authorization: Bearer <key>)",
                           "invalid_request_error", None, "invalid_api_key")  # fmt: skip

    async def _serve(self, endpoint: str, request: Request, fn: Callable[[float], Awaitable[Response]]) -> Response:
        t0 = time.perf_counter()
        self.metrics.in_flight.inc()
        streaming = False
        try:
            self._auth(request)
            resp = await fn(t0)
            streaming = isinstance(resp, StreamingResponse)
            if not streaming:
                self.metrics.request_done(endpoint, resp.status_code, seconds=time.perf_counter() - t0)
            return resp
        except Exception as e:
            err = to_api_error(e)
            self.metrics.request_done(endpoint, err.status)
            return JSONResponse(err.body(), status_code=err.status)
        finally:
            if not streaming:
                self.metrics.in_flight.dec()

    async def _read_body(self, request: Request) -> bytes:
        """The request body, at most `max_request_bytes`: refused from Content-Length before reading any of it, and
        while reading when the length is not declared (chunked) or the client sends more than it declared."""
        limit = self.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                raise bad_request("invalid Content-Length header", code="invalid_request")
            if int(declared) > limit:
                raise _too_large(int(declared), limit)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise _too_large(None, limit)
        return bytes(body)

    async def _tokenize(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` (tokenization: CPU-bound, seconds for long prompts) in the tokenizer pool, at most
        `max_concurrent_tokenizations` at once, so the event loop keeps serving."""
        async with self.tok_slots:
            return await asyncio.get_running_loop().run_in_executor(self.tok_pool, fn, *args)

    def _check_chars(self, chars: int, param: str) -> None:
        """Refuse, without tokenizing it, a prompt too long to fit the context whatever its tokens."""
        if chars > self.max_prompt_chars:
            raise bad_request(
                f"This model's maximum context length is {self.cfg['max_seq_len']} tokens; a prompt of {chars} "
                f"characters cannot fit", param, "context_length_exceeded",
            )  # fmt: skip

    def _check_model(self, name: str) -> None:
        if name != self.model:
            raise APIError(404, f"The model '{name}' does not exist (this server serves '{self.model}')",
                           "invalid_request_error", "model", "model_not_found")  # fmt: skip

    def _fit(self, ids: list[int], params: SamplingParams, param: str) -> None:
        c = self.cfg
        if not ids:
            raise bad_request("the prompt is empty", param, "invalid_value")
        need = len(ids) + params.max_tokens
        if need > c["max_seq_len"]:
            raise bad_request(
                f"This model's maximum context length is {c['max_seq_len']} tokens; the request needs {need} "
                f"({len(ids)} prompt + {params.max_tokens} max_tokens)", param, "context_length_exceeded",
            )  # fmt: skip
        if params.n * need > c["kv_budget_tokens"]:
            raise bad_request(f"n={params.n} x {need} tokens exceeds the KV budget of {c['kv_budget_tokens']}",
                              "n", "context_length_exceeded")  # fmt: skip

    # ---- engine calls --------------------------------------------------------------------------------------------
    async def _call(
        self, rid: str, ids: list[int], params: SamplingParams, want_tokens: bool, mm: Any = None
    ) -> tuple[Any, Any]:
        """(token stream, what must stay alive while it runs). `mm`: the prompt's images (VL), which go where the
        prompt is prefilled; a decode replica that imports the KV needs none of them."""
        if self.prefill is not None and len(ids) >= self.cfg["disagg_min_prompt_tokens"]:
            self.metrics.route("disaggregated")
            result = self.prefill.prefill.remote(ids, params, mm)
            if self.grpc:  # the decode replica fetches it from the object store by itself
                ref = await result._to_object_ref()
                return self.stream_handle.generate.remote(rid, R.KVRef(ref, len(ids)), params, want_tokens), ref
            # by-reference handles resolve a DeploymentResponse argument on the decode replica
            return self.stream_handle.generate.remote(rid, result, params, want_tokens), result
        self.metrics.route("local")
        return self.stream_handle.generate.remote(rid, ids, params, want_tokens, mm), None

    async def _stream(self, job: _Job, want_tokens: bool, restartable: bool) -> AsyncIterator[list[R.Tok]]:
        """The job's token lists. A dead replica is retried while nothing was yielded (or `restartable`: the caller
        discards what it got, see `_collect`)."""
        attempt = 0
        while True:
            gen, got, finished = None, False, False
            try:
                gen, _keep = await self._call(f"{job.rid}-{attempt}", job.ids, job.params, want_tokens, job.mm)
                async for toks in gen:
                    got = True
                    yield toks
                finished = True
                return
            except REPLICA_FAILURES as e:
                if (got and not restartable) or attempt >= self.cfg["retries"]:
                    raise
                attempt += 1
                self.metrics.retries.inc()
                log.warning("request %s: engine replica failed (%s); retry %d", job.rid, _message(e), attempt)
                if got:
                    yield []  # tells `_collect` to start over
            finally:
                if gen is not None and not finished:
                    gen.cancel()

    async def _collect(self, job: _Job, want_tokens: bool, t0: float) -> None:
        first, last = True, 0.0
        async for toks in self._stream(job, want_tokens, restartable=True):
            if not toks:  # restarted after a replica failure
                job.choices = [R.ChoiceState(c.index, c.prompt_tokens, c.splitter and self._splitter())
                               for c in job.choices]  # fmt: skip
                continue
            last = self._timing(t0, first, last, len(toks))
            first = False
            for idx, group in R.group_by_choice(toks).items():
                job.choices[idx].add(group)

    def _timing(self, t0: float, first: bool, last: float, n: int) -> float:
        now = time.perf_counter()
        if first:
            self.metrics.observe_ttft(now - t0)
            if n > 1:
                self.metrics.observe_itl(0.0, n - 1)
        else:
            self.metrics.observe_itl(now - last, n)
        return now

    def _splitter(self) -> chatfmt.ReasoningSplitter:
        return chatfmt.ReasoningSplitter(self.think_end)

    async def _merged(self, jobs: list[_Job], want_tokens: bool, t0: float) -> AsyncIterator[tuple[_Job, list]]:
        """All jobs' token lists as they come, tagged with their job (one prompt: no tasks needed)."""
        state = {"first": True, "last": 0.0}

        def timed(toks: list) -> None:
            state["last"] = self._timing(t0, state["first"], state["last"], len(toks))
            state["first"] = False

        if len(jobs) == 1:
            async for toks in self._stream(jobs[0], want_tokens, restartable=False):
                timed(toks)
                yield jobs[0], toks
            return
        q: asyncio.Queue = asyncio.Queue()

        async def pump(job: _Job) -> None:
            try:
                async for toks in self._stream(job, want_tokens, restartable=False):
                    q.put_nowait((job, toks))
                q.put_nowait((job, None))
            except Exception as e:
                q.put_nowait((job, e))

        tasks = [asyncio.create_task(pump(j)) for j in jobs]
        try:
            left = len(jobs)
            while left:
                job, item = await q.get()
                if item is None:
                    left -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    timed(item)
                    yield job, item
        finally:
            for t in tasks:
                t.cancel()

    async def _sse(self, endpoint: str, t0: float, jobs: list[_Job], want_tokens: bool,
                   emit: Callable[[_Job, list], list[dict]], head: list[dict], tail: Callable[[], list[dict]]
                   ) -> Response:  # fmt: skip
        """A StreamingResponse once the first tokens are in (engine errors before that are plain HTTP errors)."""
        stream = self._merged(jobs, want_tokens, t0)
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            first = None

        async def body() -> AsyncIterator[str]:
            status = 200
            try:
                for obj in head:
                    yield R.sse(obj)
                if first is not None:
                    for obj in emit(*first):
                        yield R.sse(obj)
                    async for job, toks in stream:
                        for obj in emit(job, toks):
                            yield R.sse(obj)
                for obj in tail():
                    yield R.sse(obj)
            except Exception as e:
                err = to_api_error(e)
                status = err.status
                yield R.sse(err.body())
            finally:
                await stream.aclose()
                gen = sum(len(c.toks) for j in jobs for c in j.choices)
                self.metrics.request_done(endpoint, status, sum(len(j.ids) for j in jobs), gen,
                                          time.perf_counter() - t0)  # fmt: skip
                self.metrics.in_flight.dec()
            yield R.DONE

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # ---- routes --------------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health(self) -> Response:
        samples = await self._engine_stats()
        want = 2 if self.prefill is not None else 1
        ok = len({s["deployment"] for s in samples}) >= want
        body = {"status": "ok" if ok else "unavailable", "model": self.model, "mode": self.cfg["mode"],
                "engine_replicas": len(samples)}  # fmt: skip
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics(self, request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        if self.cfg.get("metrics_require_key"):  # off by default: scrapers usually hold no key
            try:
                self._auth(request)
            except APIError as e:
                return JSONResponse(e.body(), status_code=e.status)
        return Response(self.metrics.render(await self._engine_stats()), media_type=CONTENT_TYPE_LATEST)

    async def _engine_stats(self) -> list[dict[str, Any]]:
        """`Engine.stats()` of the engine replicas; one call per expected replica, deduplicated (best effort:
        the router may send two calls to the same replica)."""
        calls = []
        for handle, deployment in ((self.prefill, "prefill"), (self.engine, "engine")):
            if handle is not None:
                calls += [handle.stats.remote() for _ in range(self.cfg["replicas"][deployment])]

        async def one(resp: Any) -> Optional[dict[str, Any]]:
            try:
                return await asyncio.wait_for(resp, 2.0)
            except Exception:  # a dead or restarting replica: reported by its absence
                resp.cancel()
                return None

        out = {s["replica"]: s for s in await asyncio.gather(*(one(r) for r in calls)) if s is not None}
        return list(out.values())

    @app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        async def fn(_: float) -> Response:
            # As vLLM's card, but `root` is the served name too: the checkpoint's path on the server is not the
            # clients' business (it tells an attacker the filesystem layout).
            card = {"id": self.model, "object": "model", "created": self.created, "owned_by": "ernie-platform",
                    "root": self.model, "parent": None, "max_model_len": self.cfg["max_seq_len"]}  # fmt: skip
            return JSONResponse({"object": "list", "data": [card]})

        return await self._serve("models", request, fn)

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._serve("completions", request, lambda t0: self._completions(request, t0))

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._serve("chat", request, lambda t0: self._chat(request, t0))

    async def _completions(self, request: Request, t0: float) -> Response:
        req: CompletionRequest = parse_body(await self._read_body(request), CompletionRequest)
        self._check_model(req.model)
        s = completion_sampling(req, self.cfg["max_n"], self.backend, self.cfg["vocab_size"])
        prompts = await self._tokenize(self._prompts, req.prompt)
        rid = f"cmpl-{uuid.uuid4().hex}"
        jobs = []
        for i, (ids, text) in enumerate(prompts):
            params = dataclasses.replace(s.params)
            self._fit(ids, params, "prompt")
            jobs.append(_Job(f"{rid}-{i}", ids, params, i * params.n, None, text if req.echo else ""))
        want_lp = s.params.logprobs is not None
        if not s.stream:
            await asyncio.gather(*(self._collect(j, want_lp, t0) for j in jobs))
            choices = [c for j in jobs for c in j.choices]
            echoes = [j.echo for j in jobs for _ in j.choices]
            body = R.completion_response(rid, self.model, choices, sum(len(j.ids) for j in jobs), want_lp,
                                         s.return_token_ids, echoes)  # fmt: skip
            return JSONResponse(body)
        created = int(time.time())
        head = []
        for j in jobs:
            for c in j.choices if j.echo else ():
                head.append(R.completion_chunk(rid, created, self.model, c, R.Delta(text=j.echo), False, False,
                                               s.include_usage))  # fmt: skip

        def emit(job: _Job, toks: list) -> list[dict]:
            out = []
            for idx, group in R.group_by_choice(toks).items():
                c = job.choices[idx]
                d = c.add(group)
                if d.text or d.finish_reason or want_lp or s.return_token_ids:
                    out.append(R.completion_chunk(rid, created, self.model, c, d, want_lp, s.return_token_ids,
                                                  s.include_usage))  # fmt: skip
            return out

        tail = self._usage_tail(rid, created, "text_completion", jobs, s.include_usage)
        return await self._sse("completions", t0, jobs, want_lp, emit, head, tail)

    def _prompts(self, prompt: Any) -> list[tuple[list[int], str]]:
        """(token ids, text) of each prompt of a completions request (runs in the tokenizer pool)."""
        if isinstance(prompt, str):
            items: list[Any] = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            items = [prompt]
        else:
            items = list(prompt)
        if not items:
            raise bad_request("prompt must not be empty", "prompt", "invalid_value")
        if len(items) > MAX_PROMPTS:
            raise bad_request(f"at most {MAX_PROMPTS} prompts per request", "prompt", "invalid_value")
        for p in items:  # cheap length checks of every prompt before tokenizing any
            if isinstance(p, str):
                self._check_chars(len(p), "prompt")
            elif len(p) >= self.cfg["max_seq_len"]:  # no room for one generated token
                self._fit(p, SamplingParams(max_tokens=1), "prompt")
        out = []
        vocab = self.cfg["vocab_size"]
        for p in items:
            if isinstance(p, str):
                out.append((list(self.tokenizer.encode(p)), p))
            else:
                bad = [t for t in p if not 0 <= t < vocab]
                if bad:
                    raise bad_request(f"prompt token ids {bad[:5]} are outside [0, {vocab})", "prompt", "invalid_value")
                out.append((list(p), self.tokenizer.decode(p)))
        return out

    def _usage_tail(self, rid: str, created: int, obj: str, jobs: list[_Job], on: bool) -> Callable[[], list[dict]]:
        def tail() -> list[dict]:
            if not on:
                return []
            gen = sum(len(c.toks) for j in jobs for c in j.choices)
            return [R.usage_chunk(rid, created, self.model, obj, sum(len(j.ids) for j in jobs), gen)]

        return tail

    def _chat_prompt(self, req: ChatRequest, thinking: bool) -> tuple[list[int], Any]:
        """(token ids, images as model inputs or None) of a chat request (runs in the tokenizer pool: decoding
        images, rendering the template and tokenizing are all CPU-bound)."""
        messages, images = chatfmt.normalize_chat(req.messages, is_vl=self.cfg["is_vl"])
        self._check_chars(sum(len(m["content"]) for m in messages), "messages")
        text = chatfmt.render_chat(self.tokenizer, messages, thinking)
        if images:
            merge = int(self.cfg["vision"]["merge_size"])
            return mm_prompt(self.tokenizer, self.image_processor, merge, text, images)
        return chatfmt.encode_chat(self.tokenizer, text), None

    async def _chat(self, request: Request, t0: float) -> Response:
        req: ChatRequest = parse_body(await self._read_body(request), ChatRequest)
        self._check_model(req.model)
        s = chat_sampling(req, self.cfg["max_n"], self.backend, self.cfg["vocab_size"])
        thinking = bool(thinking_requested(req))  # off unless the request turns it on
        ids, mm = await self._tokenize(self._chat_prompt, req, thinking)
        params = s.params
        if req.max_tokens is None and req.max_completion_tokens is None:
            params.max_tokens = max(1, min(self.cfg["default_max_tokens"], self.cfg["max_seq_len"] - len(ids)))
        self._fit(ids, params, "messages")
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        job = _Job(rid, ids, params, 0, self._splitter if thinking else None, mm=mm)
        want_lp = params.logprobs is not None
        if not s.stream:
            await self._collect(job, want_lp, t0)
            body = R.chat_response(rid, self.model, job.choices, len(ids), want_lp, s.return_token_ids)
            return JSONResponse(body)
        created = int(time.time())
        head = [R.chat_chunk(rid, created, self.model, c.index, {"role": "assistant", "content": ""}, None, None,
                             s.include_usage) for c in job.choices]  # fmt: skip

        def emit(job: _Job, toks: list) -> list[dict]:
            out = []
            for idx, group in R.group_by_choice(toks).items():
                c = job.choices[idx]
                chunk = R.chat_delta_chunk(rid, created, self.model, c, c.add(group), want_lp, s.return_token_ids,
                                           s.include_usage)  # fmt: skip
                if chunk is not None:
                    out.append(chunk)
            return out

        tail = self._usage_tail(rid, created, "chat.completion.chunk", [job], s.include_usage)
        return await self._sse("chat", t0, [job], want_lp, emit, head, tail)
