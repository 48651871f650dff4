"""What SFT and GRPO share: the LoRA model, tokenized batches, completion logprobs, the optimizer
loop with its progress bar, and atomic checkpoints that make `train` resumable.

Guarantees
- Tokens are those the policy endpoint sees (`sialoop.policy.hf`): `prompt + completion` is
  tokenized as one text, with exactly one `<bos>` first. The completion tokens are the tokens that
  hold any completion character, so a token straddling the boundary is trained: with a prompt
  ending in a space ("Answer: ") and completion "red", Gemma's tokenizer makes one token " red"
  that starts inside the prompt, and skipping it would leave nothing of the answer to learn.
  (The endpoint's `echo_logprobs_from` skips such a token; for prompts that end at a token
  boundary, e.g. "Answer:" + " red", both count the same tokens.)
- Full-vocabulary logits exist only for the positions that predict completion tokens.
- A checkpoint (adapter weights, optimizer state, step, losses, RNG state) is written to
  `out_dir/checkpoint.partial/` and renamed into place, so a process killed at any moment leaves
  either the previous checkpoint or the new one, never a torn one. Resuming reproduces the
  uninterrupted run's batches (each epoch's order is a function of the seed and the epoch).
- The final adapter is renamed into `out_dir/adapter/` whole, then `out_dir/summary.json` is
  written; once it exists, `train` with the same fingerprint returns it without training.

Not guaranteed: bitwise equality with an uninterrupted run (thread counts change float sums);
safety against power loss (files are not fsynced).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from sialoop.policy.compute import cancelled
from sialoop.train.base import LoraSettings, TrainError, TrainExample, TrainSettings, TrainSummary

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
CHECKPOINT, ADAPTER, SUMMARY = "checkpoint", "adapter", "summary.json"


@dataclass
class Policy:
    """The base model with a trainable LoRA adapter, and how its tokens and logits are made."""

    tokenizer: Any
    model: Any  # peft.PeftModel
    bos: int
    pad: int
    softcap: float | None
    # Trainable modules beside the adapter (PPO's value head), checkpointed and saved with it as
    # `<name>.pt` in the output folder.
    extras: dict[str, torch.nn.Module] = field(default_factory=dict)


@dataclass(frozen=True)
class Encoded:
    """One example's token ids; `ids[start:]` are its completion tokens (start >= 1).

    Items with the same `unit` are shuffled together and so tend to share a batch (GRPO: a group,
    whose members share their prompt, which then runs once); None: a unit of its own.
    """

    ids: tuple[int, ...]
    start: int
    value: float = 0.0  # a per-example number the objective uses (GRPO: the advantage)
    unit: str | None = None
    # Per completion token numbers the objective uses (PPO: old logprobs, advantages, returns),
    # each as long as `ids[start:]`.
    per_token: dict[str, tuple[float, ...]] = field(default_factory=dict)
    # the example's stored reward where the method learns from rewards (GRPO, PPO): `fit` logs
    # each batch's mean as the "reward" curve
    reward: float | None = None


@dataclass
class Batch:
    """Right-padded ids; `rows` index `hidden.flatten(0, 1)` at the positions predicting each
    completion token `targets[k]`, which belongs to example `owner[k]`."""

    ids: torch.Tensor
    mask: torch.Tensor
    rows: torch.Tensor
    targets: torch.Tensor
    owner: torch.Tensor
    values: torch.Tensor
    items: tuple[Encoded, ...]
    per_token: dict[str, torch.Tensor] = field(default_factory=dict)  # in `targets` order

    @property
    def size(self) -> int:
        return self.ids.shape[0]


# An objective returns the step's loss and may write named figures of the step (KL, reward
# margin) into the dict it is given; `fit` keeps each as a per-step curve.
Objective = Callable[[Policy, Batch, dict[str, float]], torch.Tensor]


def load_policy(model_dir: Path, settings: TrainSettings, lora: LoraSettings) -> Policy:
    """The model in `settings.dtype` with a fresh LoRA adapter (seeded: A random, B zero), or
    with `settings.init_adapter` loaded trainable (then `lora` must describe that adapter)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        lm = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=_DTYPES[settings.dtype])
    except (OSError, ValueError) as err:
        raise TrainError(f"cannot load the base model from {model_dir}: {err}") from err
    lm.config.use_cache = False
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(settings.seed)
    if settings.init_adapter is not None:
        try:
            model = PeftModel.from_pretrained(lm, settings.init_adapter, is_trainable=True)
        except (OSError, ValueError) as err:
            raise TrainError(f"cannot load adapter {settings.init_adapter}: {err}") from err
    else:
        model = get_peft_model(lm, config)
    return Policy(
        tokenizer=tok,
        model=model,
        bos=tok.bos_token_id if tok.bos_token_id is not None else 2,
        pad=tok.pad_token_id if tok.pad_token_id is not None else 0,
        softcap=getattr(lm.config, "final_logit_softcapping", None),
    )


def encode(
    policy: Policy,
    example: TrainExample,
    max_len: int,
    value: float = 0.0,
    unit: str | None = None,
    with_reward: bool = False,
) -> Encoded:
    """Token ids of `prompt + completion` as the endpoint tokenizes them, left-truncated; or,
    when the example carries them, the token ids the endpoint recorded (sampled tokens exactly
    as sampled). `with_reward`: the item carries the example's stored reward (GRPO, PPO)."""
    reward = example.reward if with_reward else None
    if example.prompt_ids is not None and example.completion_ids is not None:
        return _encode_ids(policy, example, max_len, value, unit, reward)
    text = example.prompt + example.completion
    enc = policy.tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    ids, spans = list(enc["input_ids"]), [tuple(s) for s in enc["offset_mapping"]]
    if ids and ids[0] == policy.bos:  # the tokenizer added <bos>, or the text starts with one
        ids, spans = ids[1:], spans[1:]
    if ids and ids[0] == policy.bos:
        ids, spans = ids[1:], spans[1:]
    cut = len(example.prompt)
    start = next((j for j, (_, end) in enumerate(spans) if end > cut), len(ids))
    if start == len(ids):  # only when the tokenizer reports no span for the completion
        raise TrainError(f"completion {example.completion!r} produced no token")
    keep = max_len - 1  # room for <bos>
    if len(ids) - start > keep:
        raise TrainError(
            f"a completion of {len(ids) - start} tokens does not fit max_len={max_len}"
        )
    drop = max(0, len(ids) - keep)
    return Encoded((policy.bos, *ids[drop:]), start - drop + 1, value, unit, reward=reward)


def _encode_ids(
    policy: Policy,
    example: TrainExample,
    max_len: int,
    value: float,
    unit: str | None,
    reward: float | None,
) -> Encoded:
    prompt = list(example.prompt_ids or ())
    while prompt and prompt[0] == policy.bos:
        prompt = prompt[1:]
    completion = list(example.completion_ids or ())
    if not completion:
        raise TrainError("an example's recorded completion has no token")
    keep = max_len - 1
    if len(completion) > keep:
        raise TrainError(f"a completion of {len(completion)} tokens does not fit max_len={max_len}")
    ids = prompt + completion
    drop = max(0, len(ids) - keep)
    start = len(prompt) - drop + 1
    return Encoded((policy.bos, *ids[drop:]), start, value, unit, reward=reward)


def collate(items: Sequence[Encoded], pad: int) -> Batch:
    width = max(len(e.ids) for e in items)
    ids = torch.full((len(items), width), pad, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    rows, targets, owner = [], [], []
    for b, e in enumerate(items):
        ids[b, : len(e.ids)] = torch.tensor(e.ids, dtype=torch.long)
        mask[b, : len(e.ids)] = 1
        for j in range(e.start, len(e.ids)):
            rows.append(b * width + j - 1)  # position j - 1 predicts token j
            targets.append(e.ids[j])
            owner.append(b)
    return Batch(
        ids=ids,
        mask=mask,
        rows=torch.tensor(rows, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
        owner=torch.tensor(owner, dtype=torch.long),
        values=torch.tensor([e.value for e in items], dtype=torch.float32),
        items=tuple(items),
        per_token={
            name: torch.tensor([v for e in items for v in e.per_token[name]], dtype=torch.float32)
            for name in items[0].per_token
        },
    )


def token_logprobs(policy: Policy, batch: Batch, temperature: float = 1.0) -> torch.Tensor:
    """log p(target_k | its prefix) for every completion token, under the model as it is now
    (adapter enabled or not). Only the completion rows go through the vocabulary-sized head.
    When items of the batch share a prompt, it runs once (see `_shared_hidden`)."""
    return head_logprobs(policy, completion_hidden(policy, batch), batch, temperature)


def completion_hidden(policy: Policy, batch: Batch) -> torch.Tensor:
    """The last hidden state at each position that predicts a completion token (targets order)."""
    hidden = _shared_hidden(policy, batch)
    if hidden is None:
        decoder = policy.model.get_base_model().get_decoder()
        out = decoder(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False)
        hidden = out.last_hidden_state.flatten(0, 1)[batch.rows]
    return hidden


def head_logprobs(
    policy: Policy, hidden: torch.Tensor, batch: Batch, temperature: float = 1.0
) -> torch.Tensor:
    """log p(target_k) from the hidden states `completion_hidden` returned."""
    lm = policy.model.get_base_model()
    logits = lm.get_output_embeddings()(hidden).float()
    if policy.softcap:
        logits = torch.tanh(logits / policy.softcap) * policy.softcap
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(1, batch.targets[:, None])[:, 0]
    return picked - torch.logsumexp(logits, dim=-1)


def _shared_hidden(policy: Policy, batch: Batch) -> torch.Tensor | None:
    """The hidden states predicting the completion tokens (in `batch.targets` order), running each
    distinct prompt once with a KV cache that its completions then extend (gradients flow through
    the cache). None when no two items share a prompt: the plain batched forward is as cheap."""
    parts: dict[tuple[int, ...], list[int]] = {}
    for b, e in enumerate(batch.items):
        parts.setdefault(e.ids[: e.start], []).append(b)
    if len(parts) == len(batch.items):
        return None
    decoder = policy.model.get_base_model().get_decoder()
    rows: list[torch.Tensor] = [torch.empty(0)] * len(batch.items)
    for prompt, members in parts.items():
        out = decoder(input_ids=torch.tensor([prompt]), use_cache=True)
        last = out.last_hidden_state[0, -1:]  # predicts every member's first completion token
        tails = [batch.items[b].ids[batch.items[b].start : -1] for b in members]
        width = max(len(t) for t in tails)
        if width == 0:
            for b in members:
                rows[b] = last
            continue
        ids = torch.full((len(members), width), policy.pad, dtype=torch.long)
        mask = torch.zeros((len(members), len(prompt) + width), dtype=torch.long)
        mask[:, : len(prompt)] = 1
        for g, tail in enumerate(tails):
            ids[g, : len(tail)] = torch.tensor(tail, dtype=torch.long)
            mask[g, len(prompt) : len(prompt) + len(tail)] = 1
        cache = out.cache
        cache.batch_repeat_interleave(len(members))
        more = decoder(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
        for g, b in enumerate(members):
            rows[b] = torch.cat([last, more.last_hidden_state[g, : len(tails[g])]])
    return torch.cat(rows)


def per_example(values: torch.Tensor, batch: Batch, mean: bool = False) -> torch.Tensor:
    """Sums (`mean`: means) of per-token `values` for each example of the batch."""
    out = torch.zeros(batch.size, dtype=values.dtype).index_add(0, batch.owner, values)
    if not mean:
        return out
    tokens = torch.bincount(batch.owner, minlength=batch.size).to(values.dtype)
    return out / tokens.clamp(min=1)


# ---- fingerprint and finished runs ------------------------------------------------------------


def fingerprint(
    method: str,
    model_dir: Path,
    examples: Sequence[TrainExample],
    settings: TrainSettings,
    lora: LoraSettings,
) -> str:
    """What a checkpoint must match to be resumed. max_steps, epochs and checkpoint_every may
    change between calls (the learning rate is constant, so a longer run extends a shorter one)."""
    digest = hashlib.sha256()
    loose = {"max_steps", "epochs", "checkpoint_every"}
    for part in (
        method,
        str(Path(model_dir).resolve()),
        settings.model_dump_json(exclude=loose),
        lora.model_dump_json(),
        *(e.model_dump_json() for e in examples),
    ):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def finished(out_dir: Path, print_: str) -> TrainSummary | None:
    """The stored summary of a finished run with this fingerprint, if any."""
    path = out_dir / SUMMARY
    if not path.is_file() or not (out_dir / ADAPTER / "adapter_config.json").is_file():
        return None
    stored = json.loads(path.read_text())
    if stored.get("fingerprint") != print_:
        raise TrainError(
            f"{out_dir} holds a finished run with other settings or data: use a fresh out_dir"
        )
    return TrainSummary.model_validate(stored["summary"])


# ---- checkpoints ------------------------------------------------------------------------------


@dataclass
class _State:
    step: int
    losses: list[float]
    curves: dict[str, list[float]] = field(default_factory=dict)


def _save_checkpoint(
    out_dir: Path, policy: Policy, optimizer: torch.optim.Optimizer, state: _State, print_: str
) -> None:
    partial, final, old = (out_dir / f"{CHECKPOINT}{s}" for s in (".partial", "", ".old"))
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    policy.model.save_pretrained(str(partial / ADAPTER))
    torch.save(optimizer.state_dict(), partial / "optimizer.pt")
    torch.save({"torch": torch.get_rng_state()}, partial / "rng.pt")
    for name, module in policy.extras.items():
        torch.save(module.state_dict(), partial / f"{name}.pt")
    meta = {
        "step": state.step,
        "losses": state.losses,
        "curves": state.curves,
        "fingerprint": print_,
    }
    (partial / "state.json").write_text(json.dumps(meta))
    # Two renames: a kill between them leaves `checkpoint.old`, which `_load_checkpoint` reads.
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    partial.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(
    out_dir: Path, policy: Policy, optimizer: torch.optim.Optimizer, print_: str
) -> _State | None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    found = [out_dir / CHECKPOINT, out_dir / f"{CHECKPOINT}.old"]
    where = next((d for d in found if (d / "state.json").is_file()), None)
    if where is None:
        return None
    meta = json.loads((where / "state.json").read_text())
    if meta["fingerprint"] != print_:
        raise TrainError(
            f"{where} was written with other settings or data: use a fresh out_dir "
            "(or delete the checkpoint to start over)"
        )
    weights = load_file(str(where / ADAPTER / "adapter_model.safetensors"))
    set_peft_model_state_dict(policy.model, weights)
    for name, module in policy.extras.items():
        module.load_state_dict(torch.load(where / f"{name}.pt", weights_only=True))
    optimizer.load_state_dict(torch.load(where / "optimizer.pt", weights_only=True))
    torch.set_rng_state(torch.load(where / "rng.pt", weights_only=True)["torch"])
    curves = {k: list(v) for k, v in meta.get("curves", {}).items()}
    return _State(step=meta["step"], losses=list(meta["losses"]), curves=curves)


def _save_final(out_dir: Path, policy: Policy, summary: TrainSummary, print_: str) -> None:
    partial, final = out_dir / f"{ADAPTER}.partial", out_dir / ADAPTER
    shutil.rmtree(partial, ignore_errors=True)
    policy.model.save_pretrained(str(partial))
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    for name, module in policy.extras.items():
        torch.save(module.state_dict(), out_dir / f"{name}.pt.partial")
        (out_dir / f"{name}.pt.partial").replace(out_dir / f"{name}.pt")
    tmp = out_dir / f"{SUMMARY}.partial"
    tmp.write_text(json.dumps({"fingerprint": print_, "summary": summary.model_dump(mode="json")}))
    tmp.replace(out_dir / SUMMARY)
    shutil.rmtree(out_dir / CHECKPOINT, ignore_errors=True)


# ---- the loop ---------------------------------------------------------------------------------


@dataclass
class Fit:
    """What `fit` did: total steps, every step's loss and the objective's other figures (a
    curve per name), where it resumed, its wall time, and the tokens (prompt and completion,
    padding left out) of the steps this call ran."""

    steps: int
    losses: list[float]
    resumed_from_step: int
    seconds: float
    tokens: int = 0
    curves: dict[str, list[float]] = field(default_factory=dict)


def total_steps(n: int, settings: TrainSettings) -> int:
    return settings.max_steps or settings.epochs * math.ceil(n / settings.batch_size)


def _batch_indices(items: Sequence[Encoded], step: int, settings: TrainSettings) -> list[int]:
    """The items of optimizer step `step`: each epoch shuffles the units (seeded by the epoch),
    lays their items out in order and cuts `batch_size` at a time."""
    per_epoch = math.ceil(len(items) / settings.batch_size)
    epoch, k = divmod(step, per_epoch)
    units: dict[object, list[int]] = {}
    for i, e in enumerate(items):
        units.setdefault(i if e.unit is None else e.unit, []).append(i)
    order = list(units.values())
    random.Random(settings.seed * 1_000_003 + epoch).shuffle(order)
    flat = [i for unit in order for i in unit]
    return flat[k * settings.batch_size : (k + 1) * settings.batch_size]


def _bar(console: Console | None) -> Progress | nullcontext:
    if console is None:
        return nullcontext()
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


@dataclass(frozen=True)
class Job:
    """Where and how `fit` reports: the output directory, the data/settings fingerprint that a
    checkpoint must match, the progress bar's title, and the console to draw it on (None: none)."""

    out_dir: Path
    fingerprint: str
    title: str
    console: Console | None = None


def fit(
    policy: Policy,
    items: Sequence[Encoded],
    settings: TrainSettings,
    objective: Objective,
    job: Job,
) -> Fit:
    """Runs the optimizer steps not yet done, checkpointing every `checkpoint_every` steps."""
    started = time.perf_counter()
    job.out_dir.mkdir(parents=True, exist_ok=True)
    params = [p for p in policy.model.parameters() if p.requires_grad]
    params += [p for m in policy.extras.values() for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    state = _load_checkpoint(job.out_dir, policy, optimizer, job.fingerprint) or _State(0, [])
    resumed, total = state.step, total_steps(len(items), settings)
    tokens = 0
    policy.model.train()
    for module in policy.extras.values():
        module.train()
    with _bar(job.console) as bar:
        task = bar.add_task(job.title, total=total, completed=resumed, loss="-") if bar else None
        while state.step < total:
            if cancelled():  # Ctrl-C in the thread that waits for this one
                raise KeyboardInterrupt
            chosen = _batch_indices(items, state.step, settings)
            tokens += sum(len(items[i].ids) for i in chosen)
            logged: dict[str, float] = {}
            rewards = [items[i].reward for i in chosen if items[i].reward is not None]
            if rewards:
                logged["reward"] = sum(rewards) / len(rewards)
            loss = objective(policy, collate([items[i] for i in chosen], policy.pad), logged)
            loss.backward()
            if settings.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.losses.append(loss.item())
            for name, figure in logged.items():
                state.curves.setdefault(name, []).append(float(figure))
            if bar is not None:
                bar.update(task, advance=1, loss=f"{state.losses[-1]:.4f}")
            every = settings.checkpoint_every
            if every and state.step % every == 0 and state.step < total:
                _save_checkpoint(job.out_dir, policy, optimizer, state, job.fingerprint)
    policy.model.eval()
    seconds = time.perf_counter() - started
    return Fit(state.step, state.losses, resumed, seconds, tokens, state.curves)


def summarize(
    method: str, fit: Fit, examples: int, started: float, out_dir: Path, **extra: Any
) -> TrainSummary:
    """The summary every method reports; `extra` holds its own fields (rewards, groups)."""
    return TrainSummary(
        method=method,
        steps=fit.steps,
        examples=examples,
        seconds=time.perf_counter() - started,
        first_loss=fit.losses[0] if fit.losses else None,
        last_loss=fit.losses[-1] if fit.losses else None,
        losses=fit.losses,
        curves=fit.curves,
        tokens_per_s=fit.tokens / fit.seconds if fit.seconds > 0 and fit.tokens else None,
        adapter_dir=str(out_dir / ADAPTER),
        resumed_from_step=fit.resumed_from_step,
        **extra,
    )


def finish(job: Job, policy: Policy, summary: TrainSummary) -> TrainSummary:
    """Saves the adapter and the summary (see the module's guarantees) and returns the summary."""
    _save_final(job.out_dir, policy, summary, job.fingerprint)
    return summary
