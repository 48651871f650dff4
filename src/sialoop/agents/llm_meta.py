"""The LLM Meta-Agent: a model rewrites the incumbent harness from the task, the Decision and its
evidence, sampled trajectories and the run's past edits (the reflective mutation of GEPA).

It answers with SEARCH/REPLACE blocks or a whole file (`agents/edits.py`), applied strictly.
The harness lever validates the result like any candidate; on failure `repair` sends the error
back once, in the same conversation; if that fails too, the lever archives the attempts as
broken versions and asks `fallback` (the offline Meta-Agent) for the generation's candidate.
"""

from __future__ import annotations

from typing import Any

from sialoop.agents.base import EditRequest, MetaAgent
from sialoop.agents.edits import apply_reply, reply_why
from sialoop.agents.llm import LLMClient
from sialoop.agents.prompts import meta_prompt, repair_message


class LLMMetaAgent:
    def __init__(self, client: LLMClient, fallback: MetaAgent) -> None:
        self.client, self.fallback = client, fallback
        self.label = f"llm ({client.endpoint.label()})"
        self._messages: list[dict[str, Any]] = []
        self._system = ""

    def edit(self, request: EditRequest) -> tuple[str, str]:
        self._system, user = meta_prompt(request)
        self._messages = [{"role": "user", "content": user}]
        return self._ask(request, "edit")

    def repair(self, request: EditRequest, error: str) -> tuple[str, str]:
        if not self._messages:
            return self.edit(request)
        self._messages.append({"role": "user", "content": repair_message(error)})
        return self._ask(request, "repair")

    def _ask(self, request: EditRequest, purpose: str) -> tuple[str, str]:
        reply = self.client.chat(
            self._system, list(self._messages), purpose=purpose, generation=request.generation
        )
        self._messages.append({"role": "assistant", "content": reply})
        return apply_reply(request.source, reply), reply_why(reply)
