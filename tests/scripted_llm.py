"""A scripted LLM provider on loopback (FastAPI + uvicorn in a thread) speaking both the OpenAI
chat-completions API and Anthropic's Messages API, for the LLM agents' tests.

Each role (the Meta-Agent and the Feedback-Agent, told apart by their system prompts; any
other request is the policy's, as an external policy sees a harness's calls) has a queue of scripted steps; a step is a
reply text, a function of the request body returning one, an HTTP error status (with headers),
or a hang of some seconds. An empty queue answers with the role's `default` function. Every
request is kept in `server.requests` (role, path, headers, body).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

Reply = str | Callable[[dict[str, Any]], str]


@dataclass
class Step:
    text: Reply | None = None
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    hang_s: float = 0.0


@dataclass
class ScriptedLLM:
    url: str = ""
    scripts: dict[str, deque[Step]] = field(default_factory=dict)
    defaults: dict[str, Reply] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)

    def script(self, role: str, *steps: Step | str) -> None:
        queue = self.scripts.setdefault(role, deque())
        queue.extend(s if isinstance(s, Step) else Step(text=s) for s in steps)

    def of(self, role: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["role"] == role]


def _role(body: dict[str, Any]) -> str:
    system = body.get("system") or next(
        (m["content"] for m in body.get("messages", []) if m.get("role") == "system"), ""
    )
    text = system if isinstance(system, str) else str(system)
    for role, opening in (("meta", "You are the Meta-Agent"), ("feedback", "You are the Feedback")):
        if text.startswith(opening):
            return role
    return "policy"  # a harness's own request, through an external policy


def _app(server: ScriptedLLM) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "scripted-model", "object": "model"}]}

    async def answer(request: Request, anthropic: bool) -> JSONResponse:
        body = await request.json()
        role = _role(body)
        server.requests.append(
            {
                "role": role, "path": request.url.path, "body": body, "t": time.monotonic(),
                "headers": {k.lower(): v for k, v in request.headers.items()},
            }
        )  # fmt: skip
        queue = server.scripts.get(role)
        step = queue.popleft() if queue else Step(text=server.defaults.get(role, "{}"))
        until = time.monotonic() + step.hang_s
        while time.monotonic() < until and not await request.is_disconnected():
            await asyncio.sleep(0.05)  # a hang that ends when the client gives up
        if step.status is not None:
            error = (
                {"type": "error", "error": {"type": "api_error", "message": "scripted failure"}}
                if anthropic
                else {"error": {"message": "scripted failure", "type": "server_error"}}
            )
            return JSONResponse(error, status_code=step.status, headers=step.headers)
        text = step.text(body) if callable(step.text) else (step.text or "")
        tokens_in = (
            sum(
                len(str(m.get("content", "")))
                for m in body.get("messages", [])
                if m["role"] != "system"
            )
            // 4
        )
        tokens_out = max(1, len(text) // 4)
        if anthropic:
            return JSONResponse(
                {
                    "id": "msg_1", "type": "message", "role": "assistant",
                    "model": body.get("model"), "content": [{"type": "text", "text": text}],
                    "stop_reason": "end_turn", "stop_sequence": None,
                    "usage": {"input_tokens": tokens_in, "output_tokens": tokens_out},
                }
            )  # fmt: skip
        return JSONResponse(
            {
                "id": "chat-1", "object": "chat.completion", "created": 0,
                "model": body.get("model"),
                "choices": [
                    {"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": text}}
                ],
                "usage": {"prompt_tokens": tokens_in, "completion_tokens": tokens_out,
                          "total_tokens": tokens_in + tokens_out},
            }
        )  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> JSONResponse:
        return await answer(request, anthropic=False)

    @app.post("/v1/messages")
    async def messages(request: Request) -> JSONResponse:
        return await answer(request, anthropic=True)

    return app


@contextmanager
def scripted_llm() -> Iterator[ScriptedLLM]:
    state = ScriptedLLM()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        _app(state), log_level="error", timeout_graceful_shutdown=1, lifespan="off"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:  # uvicorn sets it once the socket serves
        time.sleep(0.01)
    state.url = f"http://127.0.0.1:{port}"
    try:
        yield state
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
