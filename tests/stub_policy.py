"""A stand-in OpenAI completions endpoint on loopback for the sandbox tests: it answers every
GET and POST with one fixed completion and records each call (time, path, lower-cased headers,
the JSON body or None) in `server.calls`."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def _handler(text: str, finish_reason: str) -> type[BaseHTTPRequestHandler]:
    payload = json.dumps({
        "id": "cmpl-1", "object": "text_completion", "created": 0, "model": "policy",
        "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }).encode()  # fmt: skip

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as a real endpoint

        def _answer(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = None
            self.server.calls.append({  # type: ignore[attr-defined]
                "t": time.monotonic(), "path": self.path, "body": body,
                "headers": {k.lower(): v for k, v in self.headers.items()},
            })  # fmt: skip
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_POST = do_GET = _answer

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


@contextmanager
def stub_policy(text: str = "ok", finish_reason: str = "stop") -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(text, finish_reason))
    server.daemon_threads = True
    server.calls = []  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
