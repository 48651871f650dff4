"""The policy endpoint's OpenAI wire format: request bodies, errors, chat rendering, responses."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from sialoop.policy.batcher import (
    Generation,
    PolicyBackend,
    SamplingParams,
    ScoredPrompt,
    TokenLogprobs,
)

TRANSCRIPT_STOP = "\nUser:"


class ApiError(Exception):
    """An OpenAI error response: HTTP status, one-line message, optional `code` and `param`."""

    def __init__(
        self, status: int, message: str, code: str | None = None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


class _Sampling(BaseModel):
    """Fields shared by both endpoints; None means the OpenAI default."""

    model_config = ConfigDict(extra="ignore")
    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    frequency_penalty: float | None = 0.0
    presence_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None

    def sampling(
        self, max_tokens: int, logprobs: int | None, extra_stop: tuple[str, ...] = ()
    ) -> SamplingParams:
        if self.stream:
            raise ApiError(400, "stream=true is not supported", param="stream")
        if self.frequency_penalty or self.presence_penalty or self.logit_bias:
            raise ApiError(400, "penalties and logit_bias are not supported")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            n=self.n or 1,
            stop=tuple(s for s in (*stop, *extra_stop) if s),
            seed=self.seed,
            logprobs=logprobs,
        )


class CompletionBody(_Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(None, ge=0)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None
    echo_logprobs_from: int | list[int] | None = None


class ChatBody(_Sampling):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class AdapterBody(BaseModel):
    name: str
    path: str


def render_chat(
    backend: PolicyBackend, messages: list[dict[str, Any]]
) -> tuple[str, tuple[str, ...]]:
    """The prompt text for `messages`, and the stop strings its format implies.

    The two formats are described in `sialoop.policy.server`'s docstring.
    """
    texts = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if not isinstance(m.get("role"), str) or not isinstance(content, str):
            raise ApiError(
                400, "each message needs a string role and text content", param="messages"
            )
        texts.append((m["role"], content))
    tok = backend.tokenizer
    if getattr(tok, "chat_template", None):
        msgs = [{"role": r, "content": c} for r, c in texts]
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), ()
    lines = [f"{role.capitalize()}: {content}" for role, content in texts]
    return "\n".join([*lines, "Assistant:"]), (TRANSCRIPT_STOP,)


def score_from(body: CompletionBody, prompts: list[str], echo_lp: bool) -> tuple[int, ...] | None:
    """Per-prompt offset of the first scored token; len(prompt) when no prompt logprob is returned."""
    if not echo_lp:
        return tuple(len(p) for p in prompts)
    k = body.echo_logprobs_from
    if k is None:
        return None
    return tuple(k) if isinstance(k, list) else (k,) * len(prompts)


@dataclass
class Served:
    """One choice as served; the server's `_record` adds the request-level fields (an LLMCall)."""

    prompt: Any
    completion: str
    prompt_token_ids: list[int]
    completion_token_ids: list[int]
    token_logprobs: list[float | None] | None


def as_served(
    prompt: Any,
    prompt_ids: list[int],
    gen: Generation | None,
    completion: str,
    lp: TokenLogprobs | None,
) -> Served:
    completion_ids = list(gen.token_ids) if gen else []
    return Served(
        prompt,
        completion,
        list(prompt_ids),
        completion_ids,
        list(lp.token_logprobs) if lp else None,
    )


def text_choice(
    index: int,
    prompt: str,
    body: CompletionBody,
    scored: ScoredPrompt | None,
    gen: Generation | None,
) -> tuple[dict[str, Any], Served]:
    """One legacy-completions choice: echoed prompt and/or generation, joined logprobs."""
    echo_lp = scored.logprobs if scored and body.echo and body.logprobs is not None else None
    gen_lp = gen.logprobs if gen else None
    logprobs = _join(echo_lp, gen_lp, len(prompt) if body.echo else 0, body.logprobs)
    completion = gen.text if gen else ""
    choice = {
        "index": index,
        "text": (prompt if body.echo else "") + completion,
        "logprobs": _lp_json(logprobs),
        "finish_reason": gen.finish_reason if gen else "length",
    }
    prompt_ids = gen.prompt_token_ids if gen else scored.token_ids
    return choice, as_served(prompt, prompt_ids, gen, completion, logprobs)


def _join(
    echoed: TokenLogprobs | None, generated: TokenLogprobs | None, shift: int, wanted: int | None
) -> TokenLogprobs | None:
    if wanted is None:
        return None
    parts = [
        p
        for p in (
            echoed,
            generated
            and replace(generated, text_offset=[o + shift for o in generated.text_offset]),
        )
        if p
    ]
    tops = (
        None
        if not wanted
        else [t for p in parts for t in (p.top_logprobs or [None] * len(p.tokens))]
    )
    return TokenLogprobs(
        tokens=[t for p in parts for t in p.tokens],
        token_logprobs=[v for p in parts for v in p.token_logprobs],
        top_logprobs=tops,
        text_offset=[o for p in parts for o in p.text_offset],
    )


def _lp_json(lp: TokenLogprobs | None) -> dict[str, Any] | None:
    if lp is None:
        return None
    return {
        "tokens": lp.tokens,
        "token_logprobs": lp.token_logprobs,
        "top_logprobs": lp.top_logprobs,
        "text_offset": lp.text_offset,
    }


def chat_choice(index: int, gen: Generation, strip: bool, top: int | None) -> dict[str, Any]:
    content = gen.text.lstrip() if strip else gen.text
    logprobs = None
    if top is not None and gen.logprobs is not None:
        lp = gen.logprobs
        content_lp = []
        for j, token in enumerate(lp.tokens):
            alts = (lp.top_logprobs or [None] * len(lp.tokens))[j] or {}
            content_lp.append(
                {
                    "token": token,
                    "logprob": lp.token_logprobs[j],
                    "bytes": list(token.encode()),
                    "top_logprobs": [
                        {"token": t, "logprob": v, "bytes": list(t.encode())}
                        for t, v in list(alts.items())[:top]
                    ],
                }
            )
        logprobs = {"content": content_lp}
    message = {"role": "assistant", "content": content}
    return {
        "index": index,
        "message": message,
        "logprobs": logprobs,
        "finish_reason": gen.finish_reason,
    }


def envelope(
    kind: str, prefix: str, model: str, choices: list[dict], calls: list[Served]
) -> dict[str, Any]:
    prompt_tokens = sum(len(c.prompt_token_ids) for c in calls)
    completion_tokens = sum(len(c.completion_token_ids) for c in calls)
    return {
        "id": f"{prefix}-{uuid.uuid4().hex[:24]}",
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }
