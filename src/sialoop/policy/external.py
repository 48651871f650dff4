"""An external policy: any OpenAI-compatible URL (a hosted model, a vLLM, llama.cpp or Ollama
server), inference only (`policy.backend = "external"`, `policy.url`, `policy.served_model`,
`policy.key_env`).

The run's own endpoint still stands between the harness and the model: it forwards
`/v1/chat/completions` and `/v1/completions` upstream with the key (which stays in this
process: no worker, file or log sees it), replaces the request's `model` with the served one,
and records every returned choice as an `LLMCall` under the caller's episode, with the
upstream's token count (its token ids are unknown). The episode gate and the admin token work
as on the local endpoint. It serves no adapter, so the weights lever is unavailable; the loop
tells the Feedback-Agent so.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from typing import Any

import httpx
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from sialoop.config import PolicyConfig
from sialoop.errors import ConfigError
from sialoop.policy.recorder import Recorder
from sialoop.records import LLMCall

log = logging.getLogger(__name__)
WEIGHTS_OFF = "the policy is an external URL (inference only): no adapter can be trained"


class Upstream(BaseModel):
    model_config = ConfigDict(frozen=True)
    base_url: str
    model: str
    key_env: str | None
    timeout_s: float

    def headers(self) -> dict[str, str]:
        key = os.environ.get(self.key_env) if self.key_env else None
        return {"Authorization": f"Bearer {key}"} if key else {}


def upstream_for(cfg: PolicyConfig) -> Upstream:
    if not cfg.url:
        raise ConfigError("policy.backend 'external' needs policy.url (an OpenAI-compatible URL)")
    return Upstream(
        base_url=cfg.url.rstrip("/"),
        model=cfg.served_model,
        key_env=cfg.key_env,
        timeout_s=cfg.timeout_s,
    )


def check_upstream(cfg: PolicyConfig) -> str:
    """Before a run: the key's variable is set, the URL answers and names its model."""
    up = upstream_for(cfg)
    if up.key_env and not os.environ.get(up.key_env):
        raise ConfigError(
            f"policy.key_env: the environment variable {up.key_env} is not set; export it"
        )
    try:
        response = httpx.get(f"{up.base_url}/models", headers=up.headers(), timeout=10.0)
    except httpx.HTTPError as err:
        raise ConfigError(
            f"policy.url {up.base_url} is unreachable ({type(err).__name__}); start the server "
            "or fix policy.url"
        ) from None
    return f"external policy {resolved_model(up, response)} at {up.base_url}"


def resolved_model(up: Upstream, response: httpx.Response | None = None) -> str:
    if up.model != "auto":
        return up.model
    if response is None:
        response = httpx.get(f"{up.base_url}/models", headers=up.headers(), timeout=10.0)
    try:
        return str(response.json()["data"][0]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise ConfigError(
            f"policy.served_model 'auto' but {up.base_url}/models lists no model; set "
            "policy.served_model"
        ) from None


def _text(choice: dict[str, Any]) -> str:
    message = choice.get("message")
    if isinstance(message, dict):
        return str(message.get("content") or "")
    return str(choice.get("text") or "")


def create_proxy_app(
    upstream: Upstream,
    recorder: Recorder,
    *,
    admin_token: str | None = None,
    episodes: Any = None,
) -> FastAPI:
    from sialoop.policy.openai_api import ApiError
    from sialoop.policy.server import ADMIN_HEADER, EPISODE_HEADER, _add_error_handlers

    model = resolved_model(upstream)
    app = FastAPI(title="sialoop policy (external)")
    _add_error_handlers(app)
    client = httpx.AsyncClient(timeout=upstream.timeout_s)

    def episode(request: Request) -> str | None:
        value = request.headers.get(EPISODE_HEADER)
        return value if episodes is None else episodes.resolve(value)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "models": ["base"], "upstream": model}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "base", "object": "model", "owned_by": model}]}

    @app.post("/sialoop/adapters")
    def add_adapter(request: Request) -> None:
        given = request.headers.get(ADMIN_HEADER, "")
        if admin_token is None or not secrets.compare_digest(given.encode(), admin_token.encode()):
            raise ApiError(403, f"the admin routes need the {ADMIN_HEADER} token")
        raise ApiError(400, f"no adapter can be served: {WEIGHTS_OFF}")

    async def forward(
        path: str, endpoint: str, request: Request, episode_id: str | None
    ) -> JSONResponse:
        body = await request.json()
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        if body.get("stream"):
            raise ApiError(400, "streaming is not supported")
        body["model"] = model
        started = time.perf_counter()
        try:
            response = await client.post(
                f"{upstream.base_url}{path}", json=body, headers=upstream.headers()
            )
        except httpx.HTTPError as err:
            raise ApiError(502, f"the external policy failed: {type(err).__name__}") from None
        try:
            data = response.json()
        except ValueError:
            raise ApiError(
                502, f"the external policy sent no JSON (HTTP {response.status_code})"
            ) from None
        if response.status_code != 200:
            return JSONResponse(data, status_code=response.status_code)
        usage = data.get("usage") or {}
        tokens = usage.get("total_tokens")
        prompt = body.get("messages") if endpoint == "chat.completions" else body.get("prompt")
        params = {k: v for k, v in body.items() if k not in ("messages", "prompt")}
        calls = [
            LLMCall(
                episode_id=episode_id,
                endpoint=endpoint,
                adapter="base",
                prompt=prompt if isinstance(prompt, str | list) else str(prompt),
                completion=_text(choice),
                prompt_token_ids=[],
                completion_token_ids=[],
                tokens=tokens if k == 0 else 0,
                params=params,
                latency_s=time.perf_counter() - started,
            )
            for k, choice in enumerate(data.get("choices") or [])
        ]

        def write() -> None:
            for call in calls:
                try:
                    recorder.record(call)
                except Exception:  # recording must never fail the request, as on the local one
                    log.exception("recording a policy call failed")

        await run_in_threadpool(write)
        data["model"] = "base"
        return JSONResponse(data)

    @app.post("/v1/chat/completions")
    async def chat(request: Request, episode_id: str | None = Depends(episode)) -> JSONResponse:
        return await forward("/chat/completions", "chat.completions", request, episode_id)

    @app.post("/v1/completions")
    async def completions(
        request: Request, episode_id: str | None = Depends(episode)
    ) -> JSONResponse:
        return await forward("/completions", "completions", request, episode_id)

    return app
