"""The contract between the endpoint and a model backend, and the one thread that runs the model.

`PolicyBackend` and its request / result records live here (torch-free) so the server, this worker
and any backend (`sialoop.policy.hf`, a vLLM one) share them without importing transformers.

Worker guarantees: the backend's model-touching methods (`score`, `generate`, `add_adapter`) run
only on the worker thread, one at a time. Each drain takes the first pending job (waiting up to
`wait_s` for company when it is a generation request) and serves up to `max_batch` jobs: calls
(adapter registration) first, then scoring requests one by one (their prefixes are reused through
the backend's LRU), then generation requests grouped by (adapter, sampling key) into batched
`generate` calls of at most `max_batch` rows.
A failing job fails only its own future (a failed generation batch is retried request by request
to find the culprit); the worker keeps going.
Not guaranteed: first-come-first-served order across kinds within one drain.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sialoop.errors import PolicyError
from sialoop.policy.compute import run_compute

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

BASE = "base"
RESERVED_NAMES = frozenset({BASE, "policy"})


class RequestError(ValueError):
    """The request cannot be served as asked (HTTP 400). The message is one line."""


@dataclass(frozen=True)
class ScoreRequest:
    """Logprobs of the prompts' own tokens (echo, max_tokens=0)."""

    adapter: str
    prompts: tuple[str, ...]
    top_n: int = 0  # alternatives per scored position; 0: none
    logprobs_from: tuple[int, ...] | None = None  # per prompt char offset: see sialoop.policy.hf


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # None: no logprobs; N: the sampled token's plus top-N

    def batch_key(self) -> tuple[float, float, int | None]:
        """Requests with equal keys (and adapter) can share one `generate` call."""
        return (self.temperature, self.top_p, self.seed)


@dataclass(frozen=True)
class GenerateRequest:
    adapter: str
    prompt: str
    params: SamplingParams


@dataclass
class TokenLogprobs:
    """OpenAI legacy layout: parallel lists; `text_offset` indexes the returned text."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


@dataclass
class ScoredPrompt:
    token_ids: list[int]
    logprobs: TokenLogprobs  # one entry per prompt token, `<bos>` first (always None)


@dataclass
class Generation:
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (eos or stop string) | "length"
    logprobs: TokenLogprobs | None


class PolicyBackend(Protocol):
    """A model behind the endpoint. All methods but `model_names` run on one thread."""

    max_batch: int  # most generation rows per `generate` call

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase: ...

    def model_names(self) -> list[str]:
        """`base` first, then registered adapters in registration order (safe from any thread)."""
        ...

    def add_adapter(self, name: str, path: Path) -> None: ...

    def score(self, request: ScoreRequest) -> list[ScoredPrompt]: ...

    def generate(self, requests: Sequence[GenerateRequest]) -> list[list[Generation]]:
        """One list of `n` generations per request; all requests share adapter and batch key."""
        ...


@dataclass(eq=False)
class _Job:
    kind: str  # "call" | "score" | "generate"
    payload: Any
    future: Future = field(default_factory=Future)


class Batcher:
    """Owns the worker thread; `submit_*` are safe from any thread and return futures."""

    def __init__(
        self, backend: PolicyBackend, max_batch: int | None = None, wait_s: float = 0.02
    ) -> None:
        self.backend = backend
        self.max_batch = max_batch or backend.max_batch
        self.wait_s = wait_s
        self.stats = {"drains": 0, "generate_calls": 0, "max_rows": 0}
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._closed = False

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._loop, name="sialoop-policy-worker", daemon=True
        )
        self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Stops after the jobs already taken; jobs still queued fail with PolicyError."""
        self._closed = True
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None and job.future.set_running_or_notify_cancel():
                job.future.set_exception(PolicyError("the policy server is shutting down"))

    def submit_call(self, fn: Callable[[], Any]) -> Future:
        return self._submit(_Job("call", fn))

    def submit_score(self, request: ScoreRequest) -> Future:
        """Resolves to list[ScoredPrompt]."""
        return self._submit(_Job("score", request))

    def submit_generate(self, request: GenerateRequest) -> Future:
        """Resolves to list[Generation] (n of them)."""
        return self._submit(_Job("generate", request))

    def _submit(self, job: _Job) -> Future:
        if self._closed:
            raise PolicyError("the policy server is shutting down")
        self._queue.put(job)
        return job.future

    def _loop(self) -> None:
        while (job := self._queue.get()) is not None:
            jobs, stop = [job], False
            # Only generation gains from company; scoring and calls take what is already queued.
            deadline = time.monotonic() + (self.wait_s if job.kind == "generate" else 0.0)
            while len(jobs) < self.max_batch:
                try:
                    left = deadline - time.monotonic()
                    more = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                jobs.append(more)
            self._serve([j for j in jobs if j.future.set_running_or_notify_cancel()])
            if stop:
                return

    def _serve(self, jobs: list[_Job]) -> None:
        self.stats["drains"] += 1
        for job in jobs:
            if job.kind == "call":
                _settle([job], lambda job=job: run_compute(job.payload))
        for job in jobs:
            if job.kind == "score":
                _settle([job], lambda job=job: run_compute(self.backend.score, job.payload))
        groups: dict[tuple, list[_Job]] = {}
        for job in jobs:
            if job.kind == "generate":
                request: GenerateRequest = job.payload
                groups.setdefault((request.adapter, request.params.batch_key()), []).append(job)
        for group in groups.values():
            for batch in _row_batches(group, self.max_batch):
                self._generate(batch)

    def _generate(self, batch: list[_Job]) -> None:
        rows = sum(j.payload.params.n for j in batch)
        self.stats["generate_calls"] += 1
        self.stats["max_rows"] = max(self.stats["max_rows"], rows)
        try:
            results: list[list[Generation]] = run_compute(
                self.backend.generate, [j.payload for j in batch]
            )
        except Exception as err:  # the worker must survive any model failure
            if len(batch) > 1:  # isolate the culprit: one bad request must not fail its batch-mates
                for job in batch:
                    self._generate([job])
                return
            if not isinstance(err, RequestError):
                log.exception("generation failed")
            batch[0].future.set_exception(err)
            return
        for job, result in zip(batch, results, strict=True):
            job.future.set_result(result)


def _settle(jobs: list[_Job], fn: Callable[[], Any]) -> None:
    try:
        result = fn()
    except Exception as err:  # reported to the caller; the worker keeps serving
        if not isinstance(err, RequestError):
            log.exception("policy job failed")
        for job in jobs:
            job.future.set_exception(err)
        return
    for job in jobs:
        job.future.set_result(result)


def _row_batches(group: list[_Job], max_rows: int) -> list[list[_Job]]:
    """Consecutive jobs packed into batches of at most `max_rows` rows (n each); never empty."""
    batches: list[list[_Job]] = [[]]
    rows = 0
    for job in group:
        n = job.payload.params.n
        if batches[-1] and rows + n > max_rows:
            batches.append([])
            rows = 0
        batches[-1].append(job)
        rows += n
    return batches
