"""One client for the LLM agents: any OpenAI-compatible endpoint (OpenAI, OpenRouter, vLLM,
llama.cpp server, Ollama) through the `openai` SDK, and Anthropic through its own SDK.

`endpoint_for` turns an agent's config (a shipped profile's name, or a table) into an
`LLMEndpoint`; `LLMClient.chat` sends one conversation with a timeout and retries with backoff
on 429, 5xx, timeouts and dropped connections (the SDKs' own retries are off, so every request
is counted), stores the call in the run (`AgentCall`: prompt, response, tokens, cost, seconds)
and refuses to send once the run's agent budget is spent. Whatever goes wrong is an
`LLMUnavailable`: the agents catch it and hand the generation to the offline agents.

The key is read from the environment variable the config names, at the moment of the request;
it is never stored, logged or passed on, and an error message that quotes it is masked.
"""

from __future__ import annotations

import os
import time
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict

from sialoop.config import AgentsConfig, LLMAgentConfig
from sialoop.errors import ConfigError
from sialoop.records import AgentCall
from sialoop.store import Store

# Shipped profiles: `agents.meta = "anthropic"` names one; a table with `profile = ...` starts
# from one and overrides fields. Model names are examples of strong current models; set `model`
# for another. Prices are left out (they change): set usd_per_mtok_in/out for a dollar budget.
PROFILES: dict[str, LLMAgentConfig] = {
    "openai": LLMAgentConfig(provider="openai", model="gpt-4.1", key_env="OPENAI_API_KEY"),
    "anthropic": LLMAgentConfig(
        provider="anthropic", model="claude-sonnet-4-5", key_env="ANTHROPIC_API_KEY"
    ),
    "openrouter": LLMAgentConfig(
        provider="openai",
        model="anthropic/claude-sonnet-4.5",
        base_url="https://openrouter.ai/api/v1",
        key_env="OPENROUTER_API_KEY",
        structured=False,  # not every routed model takes a JSON schema
    ),
    "vllm": LLMAgentConfig(provider="openai", model="auto", base_url="http://127.0.0.1:8000/v1"),
    "llamacpp": LLMAgentConfig(
        provider="openai", model="auto", base_url="http://127.0.0.1:8080/v1"
    ),
    "ollama": LLMAgentConfig(provider="openai", model="auto", base_url="http://127.0.0.1:11434/v1"),
}

_DEFAULT_URL = {"openai": "https://api.openai.com/v1", "anthropic": "https://api.anthropic.com"}
_URL_ENV = {"openai": "OPENAI_BASE_URL", "anthropic": "ANTHROPIC_BASE_URL"}
_RETRY_STATUS = {408, 409, 429}
_MAX_WAIT_S = 30.0


class LLMUnavailable(Exception):
    """The agent's model gave no usable reply: an error after retries, or the budget is spent."""


class BudgetSpent(LLMUnavailable):
    pass


class LLMEndpoint(BaseModel):
    """An agent's model, resolved: every field the client needs, the key by variable name."""

    model_config = ConfigDict(frozen=True)
    role: str
    provider: str
    model: str
    base_url: str
    key_env: str | None
    timeout_s: float
    retries: int
    backoff_s: float
    max_tokens: int
    temperature: float | None
    structured: bool
    usd_per_mtok_in: float | None
    usd_per_mtok_out: float | None

    def key(self) -> str | None:
        return os.environ.get(self.key_env) if self.key_env else None

    def label(self) -> str:
        return f"{self.provider} {self.model} at {self.base_url}"


def is_llm(spec: str | LLMAgentConfig) -> bool:
    return isinstance(spec, LLMAgentConfig) or spec in PROFILES


def endpoint_for(spec: str | LLMAgentConfig, role: str) -> LLMEndpoint:
    """The agent's endpoint from a profile name or a table (merged over its profile)."""
    key = f"agents.{role}"
    if isinstance(spec, str):
        if spec not in PROFILES:
            raise ConfigError(f"{key} '{spec}' is not a profile: use one of {', '.join(PROFILES)}")
        spec = LLMAgentConfig(profile=spec)
    merged: dict[str, Any] = {}
    if spec.profile is not None:
        if spec.profile not in PROFILES:
            raise ConfigError(
                f"{key}.profile '{spec.profile}' is unknown: use one of {', '.join(PROFILES)}"
            )
        merged = PROFILES[spec.profile].model_dump(exclude_unset=True)
    merged.update(spec.model_dump(exclude_unset=True, exclude={"profile"}))
    full = LLMAgentConfig(**merged)
    if full.provider is None or full.model is None:
        raise ConfigError(f"{key}: set provider and model (or a profile: {', '.join(PROFILES)})")
    base = full.base_url or os.environ.get(_URL_ENV[full.provider]) or _DEFAULT_URL[full.provider]
    return LLMEndpoint(
        role=role,
        provider=full.provider,
        model=full.model,
        base_url=base.rstrip("/"),
        key_env=full.key_env,
        timeout_s=full.timeout_s,
        retries=full.retries,
        backoff_s=full.backoff_s,
        max_tokens=full.max_tokens,
        temperature=full.temperature,
        structured=full.structured,
        usd_per_mtok_in=full.usd_per_mtok_in,
        usd_per_mtok_out=full.usd_per_mtok_out,
    )


def _headers(endpoint: LLMEndpoint) -> dict[str, str]:
    key = endpoint.key()
    if endpoint.provider == "anthropic":
        return {"x-api-key": key or "", "anthropic-version": "2023-06-01"}
    return {"Authorization": f"Bearer {key}"} if key else {}


def _models_url(endpoint: LLMEndpoint) -> str:
    base = endpoint.base_url
    return f"{base}/v1/models" if endpoint.provider == "anthropic" else f"{base}/models"


def check_endpoint(endpoint: LLMEndpoint) -> str:
    """Before a run: the key's variable is set and the URL answers (any HTTP status). One
    ConfigError line otherwise, naming the fix."""
    key = f"agents.{endpoint.role}"
    if endpoint.key_env and not endpoint.key():
        raise ConfigError(
            f"{key}: the environment variable {endpoint.key_env} is not set; export it, or set "
            f"{key} = 'offline'"
        )
    url = _models_url(endpoint)
    try:
        response = httpx.get(url, headers=_headers(endpoint), timeout=min(10.0, endpoint.timeout_s))
    except httpx.HTTPError as err:
        raise ConfigError(
            f"{key}: {endpoint.base_url} is unreachable ({type(err).__name__}); start the server "
            f"or fix base_url (or set {key} = 'offline')"
        ) from None
    if endpoint.model == "auto":
        _first_model(endpoint, response)
    return f"{endpoint.label()} answers (HTTP {response.status_code})"


def _first_model(endpoint: LLMEndpoint, response: httpx.Response) -> str:
    try:
        return str(response.json()["data"][0]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise ConfigError(
            f"agents.{endpoint.role}: model 'auto' but {_models_url(endpoint)} lists no model "
            f"(HTTP {response.status_code}); set model to the served model's name"
        ) from None


def _status(err: Exception) -> int | None:
    code = getattr(err, "status_code", None)
    return code if isinstance(code, int) else None


def _retryable(err: Exception) -> bool:
    import anthropic
    import openai

    if isinstance(err, openai.APIConnectionError | anthropic.APIConnectionError):
        return True  # timeouts included: both SDKs' timeout errors are connection errors
    code = _status(err)
    return code is not None and (code in _RETRY_STATUS or code >= 500)


def _wait_s(err: Exception, attempt: int, backoff_s: float) -> float:
    """The server's Retry-After when it sends one, else exponential backoff."""
    headers = getattr(getattr(err, "response", None), "headers", None) or {}
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        try:
            return min(_MAX_WAIT_S, float(headers[name]) * scale)
        except (KeyError, ValueError, TypeError):
            continue
    return min(_MAX_WAIT_S, backoff_s * 2**attempt)


class AgentBudget:
    """The run's limit on what the LLM agents spend, both together, read from the stored calls
    (so a resumed run counts what it spent before)."""

    def __init__(self, agents: AgentsConfig, store: Store | None) -> None:
        self.tokens, self.usd, self.store = agents.budget_tokens, agents.budget_usd, store

    def spent(self) -> tuple[int, float]:
        calls = self.store.agent_calls() if self.store is not None else []
        tokens = sum((c.prompt_tokens or 0) + (c.completion_tokens or 0) for c in calls)
        return tokens, sum(c.cost_usd or 0.0 for c in calls)

    def check(self) -> None:
        tokens, usd = self.spent()
        if self.tokens and tokens >= self.tokens:
            raise BudgetSpent(f"the agents' token budget is spent ({tokens} of {self.tokens})")
        if self.usd and usd >= self.usd:
            raise BudgetSpent(f"the agents' dollar budget is spent (${usd:.2f} of ${self.usd:.2f})")


class LLMClient:
    """Chat with one agent's model; every request is stored in the run."""

    def __init__(self, endpoint: LLMEndpoint, store: Store | None, budget: AgentBudget) -> None:
        self.endpoint, self.store, self.budget = endpoint, store, budget
        self._model: str | None = None if endpoint.model == "auto" else endpoint.model

    def _masked(self, text: str) -> str:
        key = self.endpoint.key()
        return text.replace(key, "***") if key else text

    def _sdk(self) -> Any:
        e = self.endpoint
        key = e.key() or "none"  # a local server wants no key; the SDKs want a string
        if e.provider == "anthropic":
            import anthropic

            return anthropic.Anthropic(
                api_key=key, base_url=e.base_url, timeout=e.timeout_s, max_retries=0
            )
        import openai

        return openai.OpenAI(api_key=key, base_url=e.base_url, timeout=e.timeout_s, max_retries=0)

    def model(self, sdk: Any) -> str:
        if self._model is None:
            self._model = str(next(iter(sdk.models.list())).id)
        return self._model

    def _send(
        self, sdk: Any, system: str, messages: list[dict[str, Any]], schema: dict[str, Any] | None
    ) -> tuple[str, int | None, int | None]:
        e = self.endpoint
        kwargs: dict[str, Any] = {}
        if e.temperature is not None:
            kwargs["temperature"] = e.temperature
        structured = schema is not None and e.structured
        if e.provider == "anthropic":
            if structured:
                kwargs["output_config"] = {"format": {"type": "json_schema", "schema": schema}}
            r = sdk.messages.create(
                model=self.model(sdk), system=system, messages=messages,
                max_tokens=e.max_tokens, **kwargs,
            )  # fmt: skip
            text = "".join(getattr(b, "text", "") for b in r.content)
            return text, r.usage.input_tokens, r.usage.output_tokens
        if structured:
            kwargs["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "reply", "schema": schema},
            }
        r = sdk.chat.completions.create(
            model=self.model(sdk), messages=[{"role": "system", "content": system}, *messages],
            max_tokens=e.max_tokens, **kwargs,
        )  # fmt: skip
        text = (r.choices[0].message.content or "") if r.choices else ""
        usage = r.usage
        return (
            text,
            getattr(usage, "prompt_tokens", None),
            getattr(usage, "completion_tokens", None),
        )

    def _cost(self, prompt: int | None, completion: int | None) -> float | None:
        e = self.endpoint
        if e.usd_per_mtok_in is None or e.usd_per_mtok_out is None:
            return None
        return ((prompt or 0) * e.usd_per_mtok_in + (completion or 0) * e.usd_per_mtok_out) / 1e6

    def chat(
        self,
        system: str,
        messages: list[dict[str, Any]],
        *,
        purpose: str,
        generation: int | None = None,
        schema: dict[str, Any] | None = None,
    ) -> str:
        """The model's reply text; LLMUnavailable after the retries, or with the budget spent."""
        self.budget.check()
        sdk, start, attempt = self._sdk(), time.monotonic(), 0
        e = self.endpoint
        while True:
            try:
                text, prompt, completion = self._send(sdk, system, messages, schema)
                error = None
                break
            except Exception as err:
                if _retryable(err) and attempt < e.retries:
                    time.sleep(_wait_s(err, attempt, e.backoff_s))
                    attempt += 1
                    continue
                code = _status(err)
                where = f"HTTP {code}" if code is not None else type(err).__name__
                error = self._masked(
                    f"{where}: {str(err).splitlines()[0][:300] if str(err) else ''}"
                )
                text, prompt, completion = "", None, None
                break
        call = AgentCall(
            role=e.role, purpose=purpose, generation=generation, provider=e.provider,
            model=self._model or e.model, system=system, messages=messages, response=text,
            prompt_tokens=prompt, completion_tokens=completion,
            cost_usd=self._cost(prompt, completion), seconds=time.monotonic() - start,
            attempts=attempt + 1, error=error,
        )  # fmt: skip
        if self.store is not None:
            self.store.add_agent_call(call)
        if error is not None:
            raise LLMUnavailable(f"{e.label()} failed after {attempt + 1} request(s): {error}")
        return text
