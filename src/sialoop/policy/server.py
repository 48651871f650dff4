"""The policy endpoint: an OpenAI-compatible FastAPI app over a `PolicyBackend`, recording every call.

Routes
- `POST /v1/completions`: generation (max_tokens > 0: temperature, top_p, n, stop, seed, logprobs,
  echo) and scoring (echo=True, max_tokens=0, logprobs=N, prompt = one string or a list).
  Extension: body field `echo_logprobs_from` (with the openai client: `extra_body=`), one character
  offset for every prompt or a list with one per prompt. Prompt tokens whose text ends at or
  before it get logprob null and cost nothing; see `sialoop.policy.hf` for how prefixes are reused.
- `POST /v1/chat/completions`: messages are rendered with the tokenizer's chat template when it has
  one; otherwise (the embedded base model) as a plain transcript, one "Role: content" line per
  message ending in "Assistant:", with "\\nUser:" added to the stop strings and the reply's leading
  whitespace stripped. max_tokens defaults to 256 (16 for completions, as OpenAI).
- `GET /v1/models`, `GET /health`, `POST /sialoop/adapters` {"name", "path"} (a peft adapter dir).

Headers: `X-Sialoop-Episode` tags the recorded calls (None when absent). The request's `model` is
`base`, a registered adapter name, or `policy`, which means the adapter named by the
`X-Sialoop-Adapter` header, else `base`.

Trust: harness code calls this endpoint, so neither admin rights nor an episode are taken on its
word. `POST /sialoop/adapters` needs `X-Sialoop-Admin: <token>`, a secret each `PolicyServer`
draws at start and that lives only in the parent's memory (`admin_headers` in
`sialoop.policy.launch`; never in a worker's environment, config or files); without it: 403.
An episode is attached to a call through an `EpisodeGate`: the parent opens an episode for the
time its `solve` runs and hands the worker `<episode id>.<secret>` as the header value. A header
naming an episode that is not open with that secret, or any id of the shape the parent mints
(`ep-` and 12 hex digits, the id of every stored trajectory) without its secret, is refused
(403), so one episode cannot attach calls to another, past or concurrent. Other values (ad-hoc
tags that name no trajectory) are recorded as sent.

Guarantees: one `LLMCall` per returned choice is recorded before the response is sent; a recorder
failure is logged and never fails the request. Errors use OpenAI's error body: a bad request is
400 with a one-line message, an unknown model 404 listing the available ones, a model failure 500;
the server keeps serving after any of them. Logprobs `text_offset`s index the returned `text`.
Not supported (400): streaming, best_of > 1, penalties, logit_bias, suffix, token-id prompts.

This module is the FastAPI app and `PolicyServer`; the request bodies, the chat rendering and the
response shapes are in `sialoop.policy.openai_api`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from sialoop.errors import PolicyError
from sialoop.policy.batcher import (
    BASE,
    Batcher,
    GenerateRequest,
    PolicyBackend,
    RequestError,
    ScoreRequest,
)
from sialoop.policy.launch import not_served_here, served_here
from sialoop.policy.openai_api import (
    AdapterBody,
    ApiError,
    ChatBody,
    CompletionBody,
    Served,
    as_served,
    chat_choice,
    envelope,
    render_chat,
    score_from,
    text_choice,
)
from sialoop.policy.recorder import Recorder
from sialoop.records import LLMCall

log = logging.getLogger(__name__)

EPISODE_HEADER = "X-Sialoop-Episode"
ADAPTER_HEADER = "X-Sialoop-Adapter"
ADMIN_HEADER = "X-Sialoop-Admin"
POLICY_ALIAS = "policy"
_MINTED_EPISODE = re.compile(r"ep-[0-9a-f]{12}")  # `records.new_id("ep")`: every trajectory id


class EpisodeGate:
    """The episodes the parent has open, each with a secret only its own worker is handed."""

    def __init__(self) -> None:
        self._open: dict[str, str] = {}
        self._lock = threading.Lock()

    def open(self, episode_id: str) -> str:
        """Open `episode_id`; the header value its harness must send (`<id>.<secret>`)."""
        secret = secrets.token_urlsafe(16)
        with self._lock:
            self._open[episode_id] = secret
        return f"{episode_id}.{secret}"

    def close(self, episode_id: str) -> None:
        with self._lock:
            self._open.pop(episode_id, None)

    def resolve(self, value: str | None) -> str | None:
        """The episode a call belongs to; ApiError 403 for a forged or stale one."""
        if value is None:
            return None
        episode, dot, secret = value.rpartition(".")
        if dot:
            with self._lock:
                expected = self._open.get(episode)
            if expected is not None and secrets.compare_digest(secret.encode(), expected.encode()):
                return episode
            raise ApiError(403, f"episode {episode[:40]!r} is not open with this secret")
        with self._lock:
            claimed = value in self._open
        if claimed or _MINTED_EPISODE.fullmatch(value):
            raise ApiError(403, f"episode {value[:40]!r} needs the secret the runtime hands out")
        return value  # an ad-hoc tag that names no trajectory


def create_app(
    backend: PolicyBackend,
    recorder: Recorder,
    wait_s: float = 0.02,
    *,
    admin_token: str | None = None,
    episodes: EpisodeGate | None = None,
) -> FastAPI:
    """The endpoint over `backend`; serve it with lifespan on (it starts the model worker).
    `admin_token` None refuses the admin route to everyone; `episodes` None takes the episode
    header as sent (for an endpoint no harness reaches)."""
    batcher = Batcher(backend, wait_s=wait_s)

    def admin(request: Request) -> None:
        given = request.headers.get(ADMIN_HEADER, "")
        if admin_token is None or not secrets.compare_digest(given.encode(), admin_token.encode()):
            raise ApiError(403, f"the admin routes need the {ADMIN_HEADER} token")

    def episode(request: Request) -> str | None:
        value = request.headers.get(EPISODE_HEADER)
        return value if episodes is None else episodes.resolve(value)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            batcher.close()

    app = FastAPI(title="sialoop policy", lifespan=lifespan)
    app.state.batcher = batcher
    _add_error_handlers(app)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "models": backend.model_names()}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        data = [
            {"id": m, "object": "model", "created": 0, "owned_by": "sialoop"}
            for m in backend.model_names()
        ]
        return {"object": "list", "data": data}

    @app.post("/sialoop/adapters", dependencies=[Depends(admin)])
    async def add_adapter(body: AdapterBody) -> dict[str, Any]:
        await _wait(batcher.submit_call(lambda: backend.add_adapter(body.name, Path(body.path))))
        return {"id": body.name, "models": backend.model_names()}

    @app.post("/v1/completions")
    async def completions(
        body: CompletionBody, request: Request, episode_id: str | None = Depends(episode)
    ) -> dict[str, Any]:
        started = time.perf_counter()
        adapter = _resolve(backend, body.model, request)
        choices, served = await _complete(batcher, body, adapter)
        params = body.model_dump(exclude={"prompt"}, exclude_unset=True)
        common = _common(episode_id, "completions", adapter, params, started)
        await _record(recorder, served, common)
        return envelope("text_completion", "cmpl", adapter, choices, served)

    @app.post("/v1/chat/completions")
    async def chat(
        body: ChatBody, request: Request, episode_id: str | None = Depends(episode)
    ) -> dict[str, Any]:
        started = time.perf_counter()
        adapter = _resolve(backend, body.model, request)
        prompt, extra_stop = render_chat(backend, body.messages)
        top = (body.top_logprobs or 0) if body.logprobs else None
        max_tokens = body.max_completion_tokens or body.max_tokens or 256
        params = body.sampling(max_tokens, top, extra_stop)
        generations = await _wait(batcher.submit_generate(GenerateRequest(adapter, prompt, params)))
        choices = [chat_choice(k, g, bool(extra_stop), top) for k, g in enumerate(generations)]
        served = [
            as_served(body.messages, g.prompt_token_ids, g, c["message"]["content"], g.logprobs)
            for g, c in zip(generations, choices, strict=True)
        ]
        sent = body.model_dump(exclude={"messages"}, exclude_unset=True)
        common = _common(episode_id, "chat.completions", adapter, sent, started)
        await _record(recorder, served, common)
        return envelope("chat.completion", "chatcmpl", adapter, choices, served)

    return app


def _add_error_handlers(app: FastAPI) -> None:
    def body(
        status: int, message: str, code: str | None = None, param: str | None = None
    ) -> JSONResponse:
        kind = "invalid_request_error" if status < 500 else "server_error"
        error = {"message": message, "type": kind, "param": param, "code": code}
        return JSONResponse({"error": error}, status_code=status)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        return body(err.status, err.message, err.code, err.param)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            return body(400, "the request body is not valid JSON")
        where = ".".join(str(p) for p in first.get("loc", ())[1:])
        return body(
            400,
            f"{where}: {first.get('msg')}" if where else str(first.get("msg")),
            param=where or None,
        )


def _resolve(backend: PolicyBackend, model: str, request: Request) -> str:
    name = (request.headers.get(ADAPTER_HEADER) or BASE) if model == POLICY_ALIAS else model
    names = backend.model_names()
    if name not in names:
        listed = ", ".join(names)
        message = f"model {name!r} not found; available models: {listed} (and {POLICY_ALIAS!r}, which follows the {ADAPTER_HEADER} header)"
        raise ApiError(404, message, code="model_not_found", param="model")
    return name


async def _wait(future: Future) -> Any:
    try:
        return await asyncio.wrap_future(future)
    except RequestError as err:
        raise ApiError(400, str(err)) from err
    except PolicyError as err:
        raise ApiError(503, str(err)) from err
    except Exception as err:  # a model failure: report it, keep serving
        first_line = (str(err).strip().splitlines() or [""])[0]
        raise ApiError(500, f"model failure: {type(err).__name__}: {first_line}") from err


async def _complete(
    batcher: Batcher, body: CompletionBody, adapter: str
) -> tuple[list[dict], list[Served]]:
    """Runs scoring and/or generation for every prompt; returns the choices and their records."""
    prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
    if not prompts:
        raise ApiError(400, "prompt must not be empty", param="prompt")
    if (body.best_of or 1) > 1 or body.suffix:
        raise ApiError(400, "best_of and suffix are not supported")
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    params = body.sampling(max_tokens, body.logprobs)
    echo_lp = bool(body.echo) and body.logprobs is not None
    scored_future = None
    if body.echo or max_tokens == 0:
        froms = score_from(body, prompts, echo_lp)
        request = ScoreRequest(adapter, tuple(prompts), body.logprobs or 0, froms)
        scored_future = batcher.submit_score(request)
    gen_futures = []
    if max_tokens:
        gen_futures = [
            batcher.submit_generate(GenerateRequest(adapter, p, params)) for p in prompts
        ]
    scored = await _wait(scored_future) if scored_future else None
    generations = [await _wait(f) for f in gen_futures]
    choices, served = [], []
    for i, prompt in enumerate(prompts):
        for k in range(params.n):
            gen = generations[i][k] if generations else None
            echoed = scored[i] if scored else None
            choice, call = text_choice(len(choices), prompt, body, echoed, gen)
            choices.append(choice)
            served.append(call)
    return choices, served


def _common(
    episode_id: str | None, endpoint: str, adapter: str, params: dict[str, Any], started: float
) -> dict[str, Any]:
    """The LLMCall fields shared by every choice of one request."""
    return {
        "episode_id": episode_id,
        "endpoint": endpoint,
        "adapter": adapter,
        "params": params,
        "latency_s": time.perf_counter() - started,
    }


async def _record(recorder: Recorder, served: list[Served], common: dict[str, Any]) -> None:
    """One LLMCall per choice, written before the response goes out; failures are only logged."""

    def write() -> None:
        for call in served:
            try:
                recorder.record(LLMCall(**common, **asdict(call)))
            except Exception:  # recording must never fail the request
                log.exception("recording a policy call failed")

    await run_in_threadpool(write)


class PolicyServer:
    """`create_app(backend, recorder)` under uvicorn in a daemon thread, as a context manager.

    Binds `host:port` itself (port 0: a free port) before starting, so `.url` is known and never
    raced; `start` returns once /health answers, `stop` shuts uvicorn and the model worker down.
    It draws its own admin token and episode gate, and while it serves it is listed by URL in
    `sialoop.policy.launch` so this process's rollouts and `register_adapter` find them.
    """

    def __init__(
        self,
        backend: PolicyBackend | None,
        recorder: Recorder,
        host: str = "127.0.0.1",
        port: int = 0,
        wait_s: float = 0.02,
        *,
        make_app: Callable[..., FastAPI] | None = None,
    ) -> None:
        """`make_app(recorder, admin_token=..., episodes=...)` serves another app than the
        local backend's (an external policy's proxy); `backend` is then None."""
        self.admin_token = secrets.token_urlsafe(32)
        self.episodes = EpisodeGate()
        if make_app is not None:
            self.app = make_app(recorder, admin_token=self.admin_token, episodes=self.episodes)
        else:
            assert backend is not None
            self.app = create_app(
                backend, recorder, wait_s=wait_s, admin_token=self.admin_token,
                episodes=self.episodes,
            )  # fmt: skip
        self.host, self.port = host, port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The OpenAI base URL, e.g. http://127.0.0.1:PORT/v1."""
        return f"http://{self.host}:{self.port}/v1"

    def __enter__(self) -> PolicyServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout_s: float = 60.0) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as err:
            sock.close()
            raise PolicyError(
                f"cannot bind the policy endpoint to {self.host}:{self.port}: {err}"
            ) from err
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [sock]},
            name="sialoop-policy-http",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._healthy():
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise PolicyError(f"the policy endpoint on {self.host}:{self.port} did not start")
            time.sleep(0.02)
        served_here(self)

    def admin_headers(self) -> dict[str, str]:
        return {ADMIN_HEADER: self.admin_token}

    def _healthy(self) -> bool:
        if self._server is None or not self._server.started:
            return False
        try:
            return (
                httpx.get(f"http://{self.host}:{self.port}/health", timeout=2.0).status_code == 200
            )
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        not_served_here(self)
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._server = self._thread = None
