"""Generation helpers for `HFBackend.generate`: sampling config, padding, logprobs, stop strings."""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    PreTrainedTokenizerBase,
    StoppingCriteria,
)

from sialoop.policy.batcher import SamplingParams


def generation_config(
    params: SamplingParams, max_new: int, pad: int, eos: list[int], bos: int
) -> GenerationConfig:
    """Explicit settings only, so no model default (top_k, ...) leaks into sampling."""
    sample = params.temperature > 0
    return GenerationConfig(
        max_new_tokens=max_new,
        do_sample=sample,
        temperature=params.temperature if sample else None,
        top_p=params.top_p if sample and params.top_p < 1 else None,
        pad_token_id=pad,
        eos_token_id=eos,
        bos_token_id=bos,
    )


def left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and attention mask with every row's last token in the same (last) column."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[r, width - len(row) :] = 1
    return ids, mask


def tokens_until(tok: PreTrainedTokenizerBase, ids: list[int], stop: str) -> int:
    """Fewest leading tokens whose text contains `stop` (binary search: containment is monotone)."""
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if stop in tok.decode(ids[:mid], skip_special_tokens=True):
            hi = mid
        else:
            lo = mid + 1
    return hi


class LogprobRecorder(LogitsProcessor):
    """Records the logprob (and top-N) of each sampled token from the raw next-token scores.

    transformers applies user processors before its temperature / top-p warpers, so these are the
    model's own logprobs. A step's token is known only at the next call (or `finish`).
    """

    def __init__(self, top_n: int) -> None:
        self.top_n = top_n
        self._prev: torch.Tensor | None = None
        self.chosen: list[torch.Tensor] = []
        self.top: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._prev is not None:
            self._take(input_ids[:, -1])
        self._prev = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, last: torch.Tensor) -> None:
        if self._prev is not None:
            self._take(last)
            self._prev = None

    def _take(self, tokens: torch.Tensor) -> None:
        assert self._prev is not None
        self.chosen.append(self._prev.gather(1, tokens[:, None].long())[:, 0])
        if self.top_n:
            self.top.append(self._prev.topk(self.top_n, dim=-1))

    def row(self, r: int, length: int) -> tuple[list[float], list[list[tuple[int, float]]]]:
        chosen = [float(step[r]) for step in self.chosen[:length]]
        tops = [
            list(zip(ix[r].tolist(), v[r].tolist(), strict=True)) for v, ix in self.top[:length]
        ]
        return chosen, tops


class RowStops(StoppingCriteria):
    """Per-row max_tokens and stop strings inside one batched `generate` call."""

    def __init__(
        self,
        tok: PreTrainedTokenizerBase,
        prompt_len: int,
        limits: list[int],
        stops: list[tuple[str, ...]],
    ) -> None:
        self.tok, self.prompt_len, self.limits, self.stops = tok, prompt_len, limits, stops
        # A stop string of c characters spans at most 4c tokens (byte-fallback pieces).
        self.tail = 4 * max((len(s) for ss in stops for s in ss), default=0) + 4
        self.ends: list[int | None] = [None] * len(limits)

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        new = input_ids[:, self.prompt_len :]
        for r, limit in enumerate(self.limits):
            if self.ends[r] is not None:
                continue
            hit = new.shape[1] >= limit
            if not hit and self.stops[r]:
                tail = self.tok.decode(new[r, -self.tail :], skip_special_tokens=True)
                hit = any(s in tail for s in self.stops[r])
            if hit:
                self.ends[r] = new.shape[1]
        return torch.tensor(
            [e is not None for e in self.ends], dtype=torch.bool, device=input_ids.device
        )
