"""The transformers + peft policy backend: echo scoring with prefix reuse, and batched generation.

`HFBackend` implements `PolicyBackend` (defined, torch-free, in `sialoop.policy.batcher`, which
calls it; re-exported here) in-process on CPU, or on whatever device the loaded model sits on.

Scoring (`score`, the hot path of option-ranking harnesses) guarantees:
- every prompt starts with exactly one `<bos>` (added when the tokenizer did not, never twice);
- a returned logprob is log p(token_j | tokens_<j) under the selected adapter, equal up to float
  rounding to a full forward pass of that prompt alone (sliding-window layers included);
- the longest common token prefix of a request's prompts runs once; its KV cache, final hidden
  states and computed logprobs stay in a small LRU keyed by (adapter, exact prefix ids), so the
  same prefix sent again (or extended) is not recomputed; cached caches are copied, never mutated;
- across requests, the start a new prefix shares with a cached one (at least `_MIN_STEM` tokens:
  an instruction and fixed examples before each item's own text) is cached on its own the first
  time it is seen, so later items run only their own tokens;
- the suffixes run packed into one sequence per `score_chunk` prompts over one copy of the prefix
  cache, with a block mask per layer type (Gemma 3; other decoders: right-padded batches over a
  repeated cache), and full-vocabulary logits exist only for positions whose logprob is returned
  (`_HEAD_ROWS` rows at a time, the prefix's last row in the same pass), once per distinct token
  path (options sharing leading tokens share those rows).

Extension, `logprobs_from` (the HTTP field `echo_logprobs_from`): a character offset into each
prompt; tokens whose text ends at or before it get logprob None and their logits are never
computed. The cached prefix then stops at the first scored token, so the same context sent with
other options (in this or a later request) reuses it. A token that straddles the offset (a
prefix's trailing space merged into the option's first word) is scored.
Without it, a one-prompt request caches that whole prompt, so options sent one per request share
work only through the extension (or by sending them together).

Generation (`generate`) runs one left-padded `model.generate` call for requests that share an
adapter and sampling key (temperature, top_p, seed); max_tokens and stop strings are per request.
Returned logprobs are the model's own (before temperature and top-p), as for scoring. The
sampling config, padding, logprob recording and stop handling live in `sialoop.policy.generation`.

Not guaranteed: thread safety (the server calls everything but `model_names` from one worker
thread); bitwise equality between batched and unbatched runs (padding changes kernel shapes);
seeded sampling reproduces only with the same batch composition (seeded requests batch only with
requests of the same seed); completion token ids keep the tokens of a stop string that the
returned text trims (the model did sample them).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    StoppingCriteriaList,
)

from sialoop.errors import PolicyError
from sialoop.policy.batcher import (
    BASE,
    RESERVED_NAMES,
    GenerateRequest,
    Generation,
    PolicyBackend,
    RequestError,
    SamplingParams,
    ScoredPrompt,
    ScoreRequest,
    TokenLogprobs,
)
from sialoop.policy.generation import (
    LogprobRecorder,
    RowStops,
    generation_config,
    left_pad,
    tokens_until,
)
from sialoop.policy.packed import pack_linears

__all__ = ["HFBackend", "PolicyBackend"]  # the contract lives in batcher.py, its one caller

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# Full-vocab logits materialised at once: 64 rows x 262,144 x 2 B = 34 MB in bf16 (67 in fp32).
_HEAD_ROWS = 64
# A shared start shorter than this is not cached on its own (it would take an LRU slot for little).
_MIN_STEM = 32
# Decoders that take {"full_attention": mask, "sliding_attention": mask} as attention_mask.
_PACKED_MODELS = frozenset({"gemma3_text"})


@dataclass(eq=False)
class _Prefix:
    """A computed prefix: batch-1 KV cache (never mutated), final hidden states, memoised logprobs."""

    ids: tuple[int, ...]
    cache: Any
    hidden: torch.Tensor  # [len, hidden]
    rows: dict[tuple[int, int], tuple[float, list[tuple[int, float]]]] = field(default_factory=dict)
    last: torch.Tensor | None = None  # log-softmax at the last position (predicts the suffixes)


@dataclass(eq=False)
class _HeadRows:
    """The LM head's logits for some rows, in the model's dtype, and each row's log-normaliser.

    A 262k-vocabulary row's log-softmax, built for every row at once, costs more than the head's
    matmul on CPU (a float32 copy and a log-softmax over tens of MB that miss the cache): the
    normaliser is computed row by row instead, and a logprob is its logit minus it.
    """

    logits: torch.Tensor  # [rows, vocab]
    lse: torch.Tensor  # [rows] float32

    @classmethod
    def of(cls, logits: torch.Tensor) -> _HeadRows:
        lse = torch.stack([torch.logsumexp(row.float(), dim=-1) for row in logits])
        return cls(logits, lse)

    def logprobs(self, rows: list[int], targets: list[int]) -> torch.Tensor:
        index = torch.tensor(rows, dtype=torch.long)
        picked = self.logits[index, torch.tensor(targets, dtype=torch.long)]
        return picked.float() - self.lse[index]

    def log_softmax(self, row: int) -> torch.Tensor:
        return self.logits[row].float() - self.lse[row]

    def top(self, top_n: int) -> list[list[tuple[int, float]] | None]:
        if not top_n:
            return [None] * self.logits.shape[0]
        values, index = self.logits.topk(top_n, dim=-1)
        return _pairs(index, values.float() - self.lse[:, None])


@dataclass
class _Encoded:
    ids: list[int]
    spans: list[tuple[int, int]]  # character span of each token; (0, 0) for an added <bos>


@dataclass
class _Scores:
    """Work area for one scoring request: logprob and top-N (token id, logprob) per position."""

    lp: list[list[float | None]]
    top: list[list[list[tuple[int, float]] | None]]


class HFBackend:
    """A causal LM and its LoRA adapters, loaded with transformers and peft.

    `dtype` is "bfloat16" (~2x faster where the CPU computes bf16 natively, ~4x slower where it
    does not: see `sialoop.policy.dtype`) or "float32".
    `threads` sets torch's intra-op threads; None keeps torch's default (one per core).
    `pack_weights` reorders the linears' weights once for oneDNN (`sialoop.policy.packed`).
    """

    def __init__(
        self,
        model_dir: Path,
        dtype: str = "bfloat16",
        max_batch: int = 16,
        score_chunk: int = 32,
        threads: int | None = None,
        prefix_cache: int = 8,
        pack_weights: bool = True,
    ) -> None:
        if dtype not in _DTYPES:
            raise PolicyError(f"dtype must be one of {sorted(_DTYPES)}, not {dtype!r}")
        if threads:
            torch.set_num_threads(threads)
        try:
            self._tok = AutoTokenizer.from_pretrained(str(model_dir))
            lm = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=_DTYPES[dtype])
        except (OSError, ValueError) as err:
            raise PolicyError(f"cannot load the policy model from {model_dir}: {err}") from err
        self._lm = lm.eval()
        if pack_weights:
            pack_linears(self._lm)
        self._peft: Any = None  # a PeftModel wrapping self._lm once an adapter is added
        self._adapters: dict[str, Path] = {}
        self._prefixes: OrderedDict[tuple[str, tuple[int, ...]], _Prefix] = OrderedDict()
        self._prefix_cache = prefix_cache
        self._pieces: dict[int, str] = {}
        self.max_batch = max_batch
        self.score_chunk = score_chunk
        self.stats = dict.fromkeys(
            ("prefix_hits", "prefix_tokens", "suffix_rows", "suffix_tokens", "head_rows"), 0
        )
        config = self._lm.config
        self._softcap = getattr(config, "final_logit_softcapping", None)
        self._max_len = getattr(config, "max_position_embeddings", None)
        self._bos = self._tok.bos_token_id if self._tok.bos_token_id is not None else 2
        self._pad = self._tok.pad_token_id if self._tok.pad_token_id is not None else 0
        eos = self._lm.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self._eos = sorted({*eos, *([self._tok.eos_token_id] if self._tok.eos_token_id else [])})
        # Packed suffixes need a decoder that takes a mask per layer type (`_run_packed`).
        self._packs = getattr(config, "model_type", "") in _PACKED_MODELS and (
            config._attn_implementation in ("sdpa", "eager")
        )

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self._tok

    def model_names(self) -> list[str]:
        return [BASE, *self._adapters]

    def add_adapter(self, name: str, path: Path) -> None:
        """Registers a peft adapter directory under `name`; names are immutable version ids."""
        path = Path(path)
        if not name or name in RESERVED_NAMES or "." in name or "/" in name:
            raise RequestError(f"bad adapter name {name!r}: not base/policy, no '.' or '/'")
        if name in self._adapters:
            if self._adapters[name].resolve() == path.resolve():
                return
            raise RequestError(
                f"adapter {name!r} is already registered from {self._adapters[name]}"
            )
        if not (path / "adapter_config.json").is_file():
            raise RequestError(f"{path} is not a peft adapter directory (no adapter_config.json)")
        from peft import PeftModel

        try:
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(self._lm, str(path), adapter_name=name)
            else:
                self._peft.load_adapter(str(path), adapter_name=name)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise RequestError(f"cannot load adapter {name!r} from {path}: {err}") from err
        self._peft.eval()
        # Copy-on-write: HTTP threads read the names while the worker registers.
        self._adapters = {**self._adapters, name: path}

    @contextmanager
    def _use(self, adapter: str) -> Iterator[None]:
        if adapter != BASE and adapter not in self._adapters:
            raise RequestError(f"unknown model {adapter!r}; available: {self.model_names()}")
        with torch.inference_mode():
            if self._peft is None:
                yield
            elif adapter == BASE:
                with self._peft.disable_adapter():
                    yield
            else:
                self._peft.set_adapter(adapter, inference_mode=True)
                yield

    # ---- tokens -------------------------------------------------------------------------------

    def _encode(self, text: str) -> _Encoded:
        enc = self._tok(text, return_offsets_mapping=True)
        ids, spans = list(enc["input_ids"]), [tuple(s) for s in enc["offset_mapping"]]
        if not ids or ids[0] != self._bos:
            ids, spans = [self._bos, *ids], [(0, 0), *spans]
        elif len(ids) > 1 and ids[1] == self._bos:  # the text itself starts with "<bos>"
            ids, spans = ids[1:], spans[1:]
        if self._max_len and len(ids) > self._max_len:
            raise RequestError(f"prompt has {len(ids)} tokens; the model takes {self._max_len}")
        return _Encoded(ids, spans)

    def _piece(self, token_id: int) -> str:
        if (piece := self._pieces.get(token_id)) is None:
            piece = self._pieces[token_id] = self._tok.decode([token_id])
        return piece

    def _top_dict(self, top: list[tuple[int, float]] | None, chosen: int, lp: float | None):
        if top is None:
            return None
        out: dict[str, float] = {}
        for token_id, value in [*top, (chosen, lp)]:
            out.setdefault(self._piece(token_id), value)
        return out

    # ---- logits only where needed ---------------------------------------------------------------

    def _head(self, hidden: torch.Tensor) -> _HeadRows:
        logits = self._lm.get_output_embeddings()(hidden)
        if self._softcap:
            logits = torch.tanh(logits.float() / self._softcap) * self._softcap
        self.stats["head_rows"] += hidden.shape[0]
        return _HeadRows.of(logits)

    def _gather(
        self, hidden: torch.Tensor, row_of: list[int], targets: list[int], top_n: int,
        keep: int | None = None,
    ):  # fmt: skip
        """Per use u: logprob of `targets[u]` under hidden row `row_of[u]`, and that row's top-N;
        with `keep`, also row `keep`'s whole log-softmax (else None).

        The LM head runs `_HEAD_ROWS` rows at a time (its weight is read once per pass, which is
        most of its cost on CPU); a row's log-softmax is only built where it is kept.
        """
        lps: list[float] = [0.0] * len(targets)
        tops: list[list[tuple[int, float]] | None] = [None] * len(targets)
        kept = None
        for a in range(0, hidden.shape[0], _HEAD_ROWS):
            head = self._head(hidden[a : a + _HEAD_ROWS])
            if keep is not None and a <= keep < a + _HEAD_ROWS:
                kept = head.log_softmax(keep - a)
            top = head.top(top_n)
            uses = [u for u, r in enumerate(row_of) if a <= r < a + _HEAD_ROWS]
            values = head.logprobs([row_of[u] - a for u in uses], [targets[u] for u in uses])
            for u, value in zip(uses, values.tolist(), strict=True):
                lps[u], tops[u] = value, top[row_of[u] - a]
        return lps, tops, kept

    # ---- scoring --------------------------------------------------------------------------------

    def score(self, request: ScoreRequest) -> list[ScoredPrompt]:
        if not request.prompts:
            raise RequestError("prompt must not be empty")
        encs = [self._encode(p) for p in request.prompts]
        starts = _first_scored(encs, request.logprobs_from, len(request.prompts))
        work = _Scores([[None] * len(e.ids) for e in encs], [[None] * len(e.ids) for e in encs])
        if any(s < len(e.ids) for s, e in zip(starts, encs, strict=True)):
            split = _common_prefix([e.ids for e in encs])
            if request.logprobs_from is not None:
                split = min(split, *starts)
            with self._use(request.adapter):
                entry = self._prefix(request.adapter, tuple(encs[0].ids[:split]))
                # Suffixes first: their LM head pass also computes the prefix's last row.
                self._score_suffixes(entry, encs, starts, request.top_n, work)
                self._score_prefix(entry, encs, starts, request.top_n, work)
        return [
            self._scored(p, e, work, i, request.top_n)
            for i, (p, e) in enumerate(zip(request.prompts, encs, strict=True))
        ]

    def _scored(
        self, prompt: str, enc: _Encoded, work: _Scores, i: int, top_n: int
    ) -> ScoredPrompt:
        tokens = [
            prompt[s:e] if e > s else self._piece(t)
            for t, (s, e) in zip(enc.ids, enc.spans, strict=True)
        ]
        tops = None
        if top_n:
            tops = [
                self._top_dict(top, t, lp)
                for top, t, lp in zip(work.top[i], enc.ids, work.lp[i], strict=True)
            ]
        logprobs = TokenLogprobs(tokens, work.lp[i], tops, [s for s, _ in enc.spans])
        return ScoredPrompt(enc.ids, logprobs)

    def _prefix(self, adapter: str, ids: tuple[int, ...], stems: bool = True) -> _Prefix:
        """The cached prefix `ids`, else computed: extending the longest cached prefix of it, or
        (with `stems`) first caching the stem it shares with a cached prefix (see `_stem`)."""
        key = (adapter, ids)
        if (hit := self._prefixes.get(key)) is not None:
            self._prefixes.move_to_end(key)
            self.stats["prefix_hits"] += 1
            return hit
        cached = [(k, p) for (a, k), p in self._prefixes.items() if a == adapter]
        base = max(
            (p for k, p in cached if len(k) < len(ids) and ids[: len(k)] == k),
            key=lambda p: len(p.ids),
            default=None,
        )
        stem = self._stem(ids, [k for k, _ in cached]) if stems else 0
        if stem > (len(base.ids) if base else 0):
            base = self._prefix(adapter, ids[:stem], stems=False)
        if base is not None:
            self._prefixes.move_to_end((adapter, base.ids))
        done = len(base.ids) if base else 0
        cache = copy.deepcopy(base.cache) if base else None
        out = self._lm.get_decoder()(
            input_ids=torch.tensor([ids[done:]]), cache=cache, use_cache=True
        )
        hidden = out.last_hidden_state[0]
        if base:
            hidden = torch.cat([base.hidden, hidden])
        self.stats["prefix_tokens"] += len(ids) - done
        entry = self._prefixes[key] = _Prefix(ids, out.cache, hidden)
        while len(self._prefixes) > self._prefix_cache:
            self._prefixes.popitem(last=False)
        return entry

    def _stem(self, ids: tuple[int, ...], cached: list[tuple[int, ...]]) -> int:
        """Length of the longest token prefix `ids` shares with a cached prefix, when it is at
        least `_MIN_STEM` tokens and shorter than both: the instruction and fixed examples that
        every item's prompt starts with. Cached on its own, the next item extends it instead of
        recomputing it (as vLLM's prefix cache and llama.cpp's prompt cache reuse a prompt's
        start); computing it once costs its tokens once."""
        best = 0
        for k in cached:
            n = min(len(k), len(ids))
            if n <= max(best, _MIN_STEM - 1):
                continue
            common = next((j for j in range(n) if k[j] != ids[j]), n)
            if common < len(k) and common < len(ids):  # else one holds the other: no stem
                best = max(best, common)
        return best if best >= _MIN_STEM else 0

    def _score_prefix(
        self, entry: _Prefix, encs: list[_Encoded], starts: list[int], top_n: int, work: _Scores
    ) -> None:
        """Positions predicted from prefix hidden states: each row is computed once and memoised."""
        n = len(entry.ids)
        # Row p predicts token p + 1; rows before the last predict a token all prompts share.
        shared = sorted({p for s in starts for p in range(s - 1, n - 1)})
        todo = [p for p in shared if (p, top_n) not in entry.rows]
        if todo:
            targets = [entry.ids[p + 1] for p in todo]
            lps, tops, _ = self._gather(entry.hidden[todo], list(range(len(todo))), targets, top_n)
            entry.rows.update(
                {(p, top_n): (lp, top) for p, lp, top in zip(todo, lps, tops, strict=True)}
            )
        for i, start in enumerate(starts):
            for p in range(start - 1, n - 1):
                work.lp[i][p + 1], work.top[i][p + 1] = entry.rows[(p, top_n)]
        if not any(len(e.ids) > n and s <= n for e, s in zip(encs, starts, strict=True)):
            return
        if entry.last is None:
            entry.last = self._head(entry.hidden[n - 1 :]).log_softmax(0)
        top = _topk(entry.last[None], top_n)[0]
        for i, (enc, start) in enumerate(zip(encs, starts, strict=True)):
            if len(enc.ids) > n and start <= n:
                work.lp[i][n], work.top[i][n] = entry.last[enc.ids[n]].item(), top

    def _score_suffixes(
        self, entry: _Prefix, encs: list[_Encoded], starts: list[int], top_n: int, work: _Scores
    ) -> None:
        """Tokens after the prefix: right-padded batches over copies of the prefix cache."""
        n = len(entry.ids)
        # Prompt i needs hidden states for positions n .. len-2 (the last token predicts nothing).
        todo = [
            i
            for i, (e, s) in enumerate(zip(encs, starts, strict=True))
            if len(e.ids) - 1 >= max(s, n + 1)
        ]
        if not todo:
            return
        todo.sort(key=lambda i: len(encs[i].ids))
        # Options that share leading tokens share hidden states there: one row per token path.
        paths: dict[tuple[int, ...], int] = {}
        rows: list[torch.Tensor] = []
        row_of, targets, where = [], [], []
        # The row predicting each suffix's first token is the prefix's last: memoised on entry.
        keep = None
        if entry.last is None and any(
            len(e.ids) > n and s <= n for e, s in zip(encs, starts, strict=True)
        ):
            keep = 0
            rows.append(entry.hidden[n - 1])
        for a in range(0, len(todo), self.score_chunk):
            chunk = todo[a : a + self.score_chunk]
            hidden = self._run_suffixes(entry, [encs[i].ids[n:-1] for i in chunk])
            for b, i in enumerate(chunk):
                ids = encs[i].ids
                for j in range(max(starts[i], n + 1), len(ids)):
                    if (path := tuple(ids[n:j])) not in paths:
                        paths[path] = len(rows)
                        rows.append(hidden[b][j - 1 - n])
                    row_of.append(paths[path])
                    targets.append(ids[j])
                    where.append((i, j))
        lps, tops, last = self._gather(torch.stack(rows), row_of, targets, top_n, keep)
        if last is not None:
            entry.last = last
        for (i, j), lp, top in zip(where, lps, tops, strict=True):
            work.lp[i][j], work.top[i][j] = lp, top

    def _run_suffixes(self, entry: _Prefix, suffixes: list[list[int]]) -> list[torch.Tensor]:
        """Hidden states [len(suffix), hidden] of each suffix after the prefix."""
        if self._packs:
            return self._run_packed(entry, suffixes)
        n, width = len(entry.ids), max(len(s) for s in suffixes)
        ids = torch.full((len(suffixes), width), self._pad, dtype=torch.long)
        mask = torch.zeros((len(suffixes), n + width), dtype=torch.long)
        mask[:, :n] = 1
        for b, suffix in enumerate(suffixes):
            ids[b, : len(suffix)] = torch.tensor(suffix, dtype=torch.long)
            mask[b, n : n + len(suffix)] = 1
        cache = copy.deepcopy(entry.cache)
        cache.batch_repeat_interleave(len(suffixes))
        self.stats["suffix_rows"] += len(suffixes)
        self.stats["suffix_tokens"] += sum(len(s) for s in suffixes)
        out = self._lm.get_decoder()(
            input_ids=ids, attention_mask=mask, cache=cache, use_cache=True
        )
        return [out.last_hidden_state[b, : len(s)] for b, s in enumerate(suffixes)]

    def _run_packed(self, entry: _Prefix, suffixes: list[list[int]]) -> list[torch.Tensor]:
        """The suffixes as one sequence after one copy of the prefix cache, each token seeing
        the prefix and its own suffix's earlier tokens (a block mask per layer type, the sliding
        window applied to the cache the sliding layers keep): the prefix's KV is neither repeated
        per suffix nor padded, which on CPU was most of the options' time."""
        n = len(entry.ids)
        owner = torch.tensor([b for b, s in enumerate(suffixes) for _ in s])
        step = torch.tensor([j for s in suffixes for j in range(len(s))])
        pos = n + step
        cache = copy.deepcopy(entry.cache)
        own = (owner[:, None] == owner[None, :]) & (step[None, :] <= step[:, None])
        masks = {}
        for kind in set(self._lm.config.layer_types):
            layer = cache.layers[self._lm.config.layer_types.index(kind)]
            kept = layer.keys.shape[-2]  # the prefix tokens this layer's cache holds: the last
            seen, mine = torch.ones(len(pos), kept, dtype=torch.bool), own
            if kind == "sliding_attention":
                window = self._lm.config.sliding_window
                seen = torch.arange(n - kept, n)[None, :] > pos[:, None] - window
                mine = own & (step[:, None] - step[None, :] < window)
            mask = torch.cat([seen, mine], dim=1)[None, None]
            if self._lm.config._attn_implementation == "eager":  # an additive mask there
                mask = torch.zeros(mask.shape, dtype=self._lm.dtype).masked_fill(
                    ~mask, torch.finfo(self._lm.dtype).min
                )
            masks[kind] = mask
        self.stats["suffix_rows"] += len(suffixes)
        self.stats["suffix_tokens"] += len(pos)
        out = self._lm.get_decoder()(
            input_ids=torch.cat([torch.tensor(s, dtype=torch.long) for s in suffixes])[None],
            attention_mask=masks,
            position_ids=pos[None],
            cache=cache,
            use_cache=True,
        )
        return list(out.last_hidden_state[0].split([len(s) for s in suffixes]))

    # ---- generation -----------------------------------------------------------------------------

    def generate(self, requests: Sequence[GenerateRequest]) -> list[list[Generation]]:
        first = requests[0]
        if any(r.params.max_tokens < 1 or r.params.n < 1 for r in requests):
            raise RequestError("generation needs max_tokens >= 1 and n >= 1")
        if any(
            (r.adapter, r.params.batch_key()) != (first.adapter, first.params.batch_key())
            for r in requests
        ):
            raise ValueError("generate() takes requests with one adapter and one batch key")
        encs = [self._encode(r.prompt) for r in requests]
        rows = [i for i, r in enumerate(requests) for _ in range(r.params.n)]
        limits = [requests[i].params.max_tokens for i in rows]
        longest = max(len(encs[i].ids) + requests[i].params.max_tokens for i in rows)
        if self._max_len and longest > self._max_len:
            raise RequestError(f"prompt plus max_tokens exceeds the model's {self._max_len} tokens")
        ids, mask = left_pad([encs[i].ids for i in rows], self._pad)
        wanted = [r.params.logprobs for r in requests if r.params.logprobs is not None]
        recorder = LogprobRecorder(max(wanted)) if wanted else None
        stops = RowStops(self._tok, ids.shape[1], limits, [requests[i].params.stop for i in rows])
        if first.params.seed is not None:
            torch.manual_seed(first.params.seed)
        with self._use(first.adapter):
            seqs = self._lm.generate(
                input_ids=ids,
                attention_mask=mask,
                generation_config=generation_config(
                    first.params, max(limits), self._pad, self._eos, self._bos
                ),
                logits_processor=LogitsProcessorList([recorder] if recorder else []),
                stopping_criteria=StoppingCriteriaList([stops]),
            )
        if recorder:
            recorder.finish(seqs[:, -1])
        out: list[list[Generation]] = [[] for _ in requests]
        for r, i in enumerate(rows):
            new = seqs[r, ids.shape[1] :].tolist()[: stops.ends[r] or None]
            want = requests[i].params.logprobs
            lps = recorder.row(r, len(new)) if recorder and want is not None else None
            out[i].append(self._finish(encs[i].ids, new, requests[i].params, lps, want))
        return out

    def _finish(
        self, prompt_ids: list[int], new: list[int], params: SamplingParams, lps, top_n: int | None
    ) -> Generation:
        """Cuts a row at eos, then at the first stop string; builds its logprobs."""
        reason = "length"
        eos = next((j for j, t in enumerate(new) if t in self._eos), None)
        if eos is not None:
            new, reason = new[: eos + 1], "stop"
        text = self._tok.decode(new, skip_special_tokens=True)
        cut = min((k for k in (text.find(s) for s in params.stop) if k >= 0), default=-1)
        if cut >= 0:
            stop = next(s for s in params.stop if text.find(s) == cut)
            text, reason = text[:cut], "stop"
            new = new[: tokens_until(self._tok, new, stop)]
        logprobs = None
        if lps is not None:
            logprobs = self._completion_logprobs(new, lps, top_n or 0)
        return Generation(prompt_ids, text, new, reason, logprobs)

    def _completion_logprobs(self, new: list[int], lps, top_n: int) -> TokenLogprobs:
        chosen, tops = lps
        tokens = [self._piece(t) for t in new]
        offsets = [
            len(self._tok.decode(new[:j], skip_special_tokens=True)) for j in range(len(new))
        ]
        top = None
        if top_n:
            top = [self._top_dict(tops[j][:top_n], t, chosen[j]) for j, t in enumerate(new)]
        return TokenLogprobs(tokens, list(chosen[: len(new)]), top, offsets)


def _topk(lsm: torch.Tensor, top_n: int) -> list[list[tuple[int, float]] | None]:
    if not top_n:
        return [None] * lsm.shape[0]
    values, index = lsm.topk(top_n, dim=-1)
    return _pairs(index, values)


def _pairs(index: torch.Tensor, values: torch.Tensor) -> list[list[tuple[int, float]] | None]:
    return [
        list(zip(ix, v, strict=True)) for ix, v in zip(index.tolist(), values.tolist(), strict=True)
    ]


def _common_prefix(seqs: list[list[int]]) -> int:
    first, n = seqs[0], min(len(s) for s in seqs)
    for s in seqs[1:]:
        n = next((j for j in range(n) if s[j] != first[j]), n)
    return n


def _first_scored(encs: list[_Encoded], logprobs_from: tuple[int, ...] | None, n: int) -> list[int]:
    """Index of each prompt's first token with a returned logprob (never 0: <bos> has none):
    the first token whose text ends after the offset, so a token that straddles the boundary
    (a prefix's trailing space merged into the option's first word) is scored."""
    if logprobs_from is None:
        return [1] * n
    if len(logprobs_from) != n or any(k < 0 for k in logprobs_from):
        raise RequestError("echo_logprobs_from needs one non-negative offset (or one per prompt)")
    return [
        max(1, next((j for j, (_, e) in enumerate(enc.spans) if e > k), len(enc.ids)))
        for enc, k in zip(encs, logprobs_from, strict=True)
    ]
