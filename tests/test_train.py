"""The Trainer: datasets from a real store, SFT, GRPO, DPO and PPO on the tiny random Gemma 3 (float32),
adapters loaded by peft and by the policy backend, and resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from sialoop.policy.batcher import ScoreRequest
from sialoop.policy.hf import HFBackend
from sialoop.records import LLMCall, RunInfo, Score, Trajectory
from sialoop.store import Store
from sialoop.tasks.toy import COLOURS, ToyTask
from sialoop.train import (
    LoraSettings,
    TrainError,
    TrainExample,
    TrainSettings,
    dpo_pairs,
    engine,
    grpo_groups,
    method,
    ppo_episodes,
    sft_examples,
)
from sialoop.train.data import _ranked_wrong, option_set
from sialoop.train.dpo import DPO
from sialoop.train.grpo import GRPO, advantages
from sialoop.train.ppo import PPO, clipped_surrogate, gae, value_loss
from sialoop.train.sft import SFT

OBJECTS = {obj: colour for colour, objs in COLOURS.items() for obj in objs}  # 16 objects
PROMPTS = {obj: f"Object: {obj}\nColour:" for obj in OBJECTS}
TOY = [TrainExample(prompt=PROMPTS[o], completion=f" {c}\n") for o, c in OBJECTS.items()]
LORA = LoraSettings(rank=8, alpha=16)
FAST = TrainSettings(lr=1e-2, batch_size=4, max_steps=30, dtype="float32", checkpoint_every=0)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Path) -> Path:
    """The tiny random Gemma 3; its wide init (std 0.2) makes the toy mapping learnable in a few
    dozen steps (at std 0.02 every logit stays within about +-1.3)."""
    return tiny_model_dir


@pytest.fixture(scope="module")
def backend(model_dir: Path) -> HFBackend:
    return HFBackend(model_dir, dtype="float32")


def scored(backend: HFBackend, adapter: str, examples: list[TrainExample]) -> list[float]:
    """Sum of the completion's token logprobs, as a harness's score_options reads it."""
    request = ScoreRequest(
        adapter,
        tuple(e.prompt + e.completion for e in examples),
        0,
        tuple(len(e.prompt) for e in examples),
    )
    return [
        sum(v for v in s.logprobs.token_logprobs if v is not None) for s in backend.score(request)
    ]


# ---- data.py --------------------------------------------------------------------------------


def scoring_calls(episode: str, prefix: str, options: list[str], suffix: str) -> list[LLMCall]:
    """The LLMCalls the endpoint records for one `score_options` request (one per option)."""
    params = {
        "model": "policy",
        "max_tokens": 0,
        "echo": True,
        "logprobs": 0,
        "echo_logprobs_from": len(prefix),
    }
    return [
        LLMCall(
            episode_id=episode,
            endpoint="completions",
            adapter="base",
            prompt=prefix + option + suffix,
            completion="",
            prompt_token_ids=[2, 5, 6],
            completion_token_ids=[],
            token_logprobs=[None, None, -1.0],
            params=params,
            latency_s=0.01,
        )
        for option in options
    ]


@pytest.fixture
def toy_store(tmp_path: Path) -> tuple[Store, ToyTask, list[str]]:
    """Train trajectories 0-2 and one val trajectory, scored as the toy's reference harness does;
    trajectory 2's shortlist misses gold."""
    task = ToyTask()
    store = Store.create(tmp_path / "run", RunInfo(run_id="r", task="toy", config={}))
    prefixes = []
    for k, inst in enumerate(task.instances("train")[:3] + task.instances("val")[:1]):
        gold = task.label(inst)
        prefix = f"Text: {inst.inputs['text']}\nAnswer: "
        options = list(inst.inputs["options"])
        if k == 2:
            options = [o for o in options if o != gold][:2]
        output = options[1]  # the harness's pick
        traj = Trajectory(
            run_id="r",
            version_id="v0",
            split=inst.split,
            instance_id=inst.id,
            output=output,
            score=Score(value=float(output == gold), correct=output == gold),
            seconds=0.1,
        )
        store.add_trajectory(traj, scoring_calls(traj.trajectory_id, prefix, options, "\n"))
        prefixes.append(prefix)
    return store, task, prefixes


def test_sft_examples_are_prefix_plus_gold(toy_store):
    store, task, prefixes = toy_store
    examples = sft_examples(store, task, "v0")
    gold = [task.label(i) for i in task.instances("train")[:3]]
    # Gold + suffix even where the shortlist missed gold (the third trajectory); val is ignored.
    assert [(e.prompt, e.completion) for e in examples] == [
        (p, g + "\n") for p, g in zip(prefixes[:3], gold, strict=True)
    ]
    for split in ("val", "test"):
        with pytest.raises(TrainError, match="train split only"):
            sft_examples(store, task, "v0", split=split)


def test_grpo_groups_are_the_scored_options(toy_store):
    store, task, prefixes = toy_store
    examples = grpo_groups(store, task, "v0")
    assert len(examples) == 4 + 4 + 2  # the options of the three train trajectories
    first = [e for e in examples if e.group == examples[0].group]
    gold = task.label(task.instances("train")[0])
    assert [(e.prompt, e.completion) for e in first] == [(prefixes[0], f"{c}\n") for c in COLOURS]
    assert [e.reward for e in first] == [float(c == gold) for c in COLOURS]
    # The shortlist without gold is a group without variance: returned, and the trainer skips it.
    assert advantages(examples, None)[1:] == (3, 1)


def test_option_set_recovers_the_suffix():
    def split(remainders, answers):
        found = option_set("P", tuple(remainders), answers)
        return found and (found.options, found.suffix)

    assert split(["red\n", "reddish\n"], ["red"]) == (("red", "reddish"), "\n")
    assert split(["red\n", "reddish\n"], ["reddish"]) == (("red", "reddish"), "\n")
    assert split(["red", "reddish"], ["red"]) == (("red", "reddish"), "")
    assert split(["blue.", "lime."], ["pink", "lime"]) == (("blue", "lime"), ".")
    assert split(["blue.", "lime."], ["pink"]) is None


def test_grpo_groups_join_samples_of_one_instance(tmp_path: Path):
    task = ToyTask()
    inst = task.instances("train")[0]
    gold = task.label(inst)
    other = "green" if gold != "green" else "red"
    store = Store.create(tmp_path / "run", RunInfo(run_id="r", task="toy", config={}))
    prefix = f"Text: {inst.inputs['text']}\nAnswer: "
    for sample, output in enumerate([gold, other, other, gold]):  # k = 4 samples of one instance
        traj = Trajectory(
            run_id="r",
            version_id="v0",
            split="train",
            instance_id=inst.id,
            sample=sample,
            output=output,
            score=Score(value=float(output == gold)),
            seconds=0.1,
        )
        if sample < 2:  # an option-scoring harness
            calls = scoring_calls(traj.trajectory_id, prefix, list(COLOURS), "\n")
        elif sample == 3:  # a chat one: the rendered messages' ids are its prompt
            messages = [{"role": "user", "content": "colour?"}]
            asked = LLMCall(
                episode_id=traj.trajectory_id,
                endpoint="chat.completions",
                adapter="base",
                prompt=messages,
                completion=gold,
                prompt_token_ids=[2, 9, 10],
                completion_token_ids=[11, 1],
                token_logprobs=[-0.5, -0.25],
                params={"model": "policy", "max_tokens": 8, "temperature": 1.0},
                latency_s=0.1,
            )
            calls = [asked]
        else:  # a generating one: its last generation is the answer
            generated = LLMCall(
                episode_id=traj.trajectory_id,
                endpoint="completions",
                adapter="base",
                prompt="Q: colour?\nA:",
                completion=f" {other}",
                prompt_token_ids=[2, 5],
                completion_token_ids=[7],
                params={"model": "policy", "max_tokens": 4, "temperature": 1.0},
                latency_s=0.1,
            )
            calls = [generated]
        store.add_trajectory(traj, calls)
    examples = grpo_groups(store, task, "v0")
    assert [(e.prompt, e.completion, e.reward) for e in examples] == [
        (prefix, gold + "\n", 1.0),
        (prefix, other + "\n", 0.0),
        ("Q: colour?\nA:", f" {other}", 0.0),
        ("", gold, 1.0),
    ]
    assert {e.group for e in examples} == {f"v0/{inst.id}"}
    # sampled calls keep the tokens the endpoint recorded (as PPO's sequences do)
    assert [(e.prompt_ids, e.completion_ids, e.logprobs) for e in examples[2:]] == [
        ((2, 5), (7,), None),
        ((2, 9, 10), (11, 1), (-0.5, -0.25)),
    ]
    assert sft_examples(store, task, "v0") == [TrainExample(prompt=prefix, completion=gold + "\n")]


# ---- tokens and logprobs ----------------------------------------------------------------------


def test_completion_logprobs_match_the_endpoint(model_dir: Path, backend: HFBackend):
    policy = engine.load_policy(model_dir, FAST, LORA)
    items = [engine.encode(policy, e, 64) for e in TOY[:4]]
    assert all(e.ids[0] == 2 and e.ids[1] != 2 for e in items)
    with torch.no_grad():
        lp = engine.token_logprobs(policy, engine.collate(items, policy.pad))
    sums = engine.per_example(lp, engine.collate(items, policy.pad)).tolist()
    # A fresh LoRA adapter (B = 0) is the base model: the same numbers as the endpoint's scoring.
    assert sums == pytest.approx(scored(backend, "base", TOY[:4]), abs=1e-4)
    # Left truncation keeps <bos> and the completion.
    cut = engine.encode(policy, TOY[0], 4)
    assert len(cut.ids) == 4 and cut.ids[0] == 2 and cut.ids[cut.start :] == items[0].ids[-2:]
    with pytest.raises(TrainError, match="does not fit"):
        engine.encode(policy, TOY[0], 2)


def test_shared_prompt_runs_once_with_the_same_logprobs_and_gradients(model_dir: Path):
    policy = engine.load_policy(model_dir, FAST, LORA)
    # Longer than the sliding window (16 tokens); completions of one to several tokens.
    prompt = "Object: a tomato, then a cherry, then a ruby, then a brick, and last a leaf.\nColour:"
    examples = [TrainExample(prompt=prompt, completion=c) for c in (" red", " deep green\n", "x")]
    items = [engine.encode(policy, e, 64) for e in examples]
    assert items[0].start > 16 and len({e.ids[: e.start] for e in items}) == 1

    def logprobs_and_grads(batches):
        policy.model.zero_grad()
        lp = torch.cat(
            [engine.token_logprobs(policy, engine.collate(b, policy.pad)) for b in batches]
        )
        lp.sum().backward()
        grads = [p.grad.clone() for p in policy.model.parameters() if p.requires_grad]
        return lp.detach(), grads

    shared, shared_grads = logprobs_and_grads([items])
    plain, plain_grads = logprobs_and_grads([[e] for e in items])
    assert shared.tolist() == pytest.approx(plain.tolist(), abs=1e-4)
    for a, b in zip(shared_grads, plain_grads, strict=True):
        # fp32 matmuls of other shapes round differently (seen: 3.6e-5 on a gradient of 1.03 on
        # an AMD EPYC); a wrong shared prompt would be off by far more than 1e-4 of the scale.
        assert torch.allclose(a, b, atol=1e-4 * float(b.abs().max()) + 1e-7, rtol=1e-3)
    assert any(g.abs().sum() > 0 for g in shared_grads)


# ---- SFT ----------------------------------------------------------------------------------------


def test_sft_learns_and_the_adapter_loads(model_dir: Path, backend: HFBackend, tmp_path):
    summary = method("sft").train(model_dir, TOY, tmp_path / "sft", FAST, LORA)
    assert summary.steps == 30 and len(summary.losses) == 30 and summary.resumed_from_step == 0
    adapter = Path(summary.adapter_dir)
    assert (adapter / "adapter_config.json").is_file()
    assert sum(summary.losses[-5:]) / 5 < 0.6 * summary.first_loss

    backend.add_adapter("sft1", adapter)
    before, after = scored(backend, "base", TOY), scored(backend, "sft1", TOY)
    assert all(a > b for a, b in zip(after, before, strict=True))
    assert sum(after) > 0.6 * sum(before)  # the completions' NLL is down by more than 40 %

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(adapter)).eval()
    enc = engine.encode(engine.Policy(backend.tokenizer, None, 2, 0, None), TOY[0], 64)
    with torch.no_grad():
        lsm = peft_model(torch.tensor([enc.ids])).logits[0].log_softmax(-1)
    direct = sum(lsm[j - 1, enc.ids[j]].item() for j in range(enc.start, len(enc.ids)))
    assert direct == pytest.approx(after[0], abs=1e-3)

    # Called again with the same out_dir, settings and data: the finished run, untouched.
    again = SFT().train(model_dir, TOY, tmp_path / "sft", FAST, LORA)
    assert again == summary


_CHILD = """
import json, sys, time
from pathlib import Path
import torch
from sialoop.train import LoraSettings, TrainExample, TrainSettings, method

job = json.loads(Path(sys.argv[1]).read_text())
step = torch.optim.AdamW.step
def slow_step(self, *args, **kwargs):  # leaves the parent time to kill between checkpoints
    time.sleep(0.3)
    return step(self, *args, **kwargs)
torch.optim.AdamW.step = slow_step
method(job["method"]).train(
    Path(job["model_dir"]),
    [TrainExample(**e) for e in job["examples"]],
    Path(job["out_dir"]),
    TrainSettings(**job["settings"]),
    LoraSettings(**job["lora"]),
)
"""


def _kill_examples(name: str, backend: HFBackend, model_dir: Path) -> list[TrainExample]:
    if name == "ppo":
        return sampled_episodes(backend, model_dir)
    if name == "sft":
        return TOY
    groups = option_groups(list(OBJECTS)[:6], rewarded="blue")
    if name == "grpo":
        return groups
    return [e for e in groups if e.completion in (" blue\n", " red\n")]  # dpo: pairs


# The engine's checkpoints are shared; PPO's also carry its value head, so PPO is the fast one.
@pytest.mark.parametrize(
    "name",
    ["ppo", *(pytest.param(m, marks=pytest.mark.slow) for m in ("sft", "grpo", "dpo"))],
)
def test_training_resumes_after_sigkill(name, model_dir: Path, backend: HFBackend, tmp_path):
    examples = _kill_examples(name, backend, model_dir)
    settings = FAST.model_copy(update={"max_steps": 10, "checkpoint_every": 2, "lr": 5e-3})
    out = tmp_path / "killed"
    job = {
        "method": name,
        "model_dir": str(model_dir),
        "out_dir": str(out),
        "examples": [e.model_dump() for e in examples],
        "settings": settings.model_dump(),
        "lora": LORA.model_dump(),
    }
    (tmp_path / "job.json").write_text(json.dumps(job))
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path / "job.json")])
    state = out / "checkpoint" / "state.json"
    deadline = time.monotonic() + 60
    while not state.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    if child.poll() is None:
        os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL, f"the child ended by itself ({child.returncode})"

    trainer = method(name)
    summary = trainer.train(model_dir, examples, out, settings, LORA)
    assert 2 <= summary.resumed_from_step < 10
    assert summary.steps == 10 and len(summary.losses) == 10
    assert not (out / "checkpoint").exists() and (out / "adapter" / "adapter_config.json").exists()

    straight = trainer.train(model_dir, examples, tmp_path / "straight", settings, LORA)
    assert summary.losses == pytest.approx(straight.losses, rel=1e-3, abs=1e-4)
    # the per-step curves survive the kill too: whole, and equal to the run that was not killed
    assert summary.curves.keys() == straight.curves.keys()
    for name, curve in summary.curves.items():
        assert len(curve) == 10 and curve == pytest.approx(straight.curves[name], abs=1e-3), name
    with pytest.raises(TrainError, match="other settings"):
        trainer.train(model_dir, examples[:8], out, settings, LORA)


# ---- GRPO ---------------------------------------------------------------------------------------


def option_groups(objects: list[str], rewarded: str) -> list[TrainExample]:
    """One group per object: the four colours as options, `rewarded` the only right one."""
    return [
        TrainExample(
            prompt=PROMPTS[obj],
            completion=f" {colour}\n",
            reward=float(colour == rewarded),
            group=obj,
        )
        for obj in objects
        for colour in COLOURS
    ]


def test_grpo_raises_rewarded_completions(model_dir: Path, backend: HFBackend, tmp_path):
    # The random tiny model barely tells objects apart, so the rewarded option is the same in
    # every group: what is checked is GRPO's direction, not the model's capacity.
    objects = list(OBJECTS)[::2]
    flat = [
        TrainExample(prompt=PROMPTS["sky"], completion=f" {c}\n", reward=0.0, group="flat")
        for c in COLOURS
    ]
    examples = option_groups(objects, rewarded="blue") + flat
    settings = FAST.model_copy(update={"max_steps": 16, "lr": 5e-3})
    summary = GRPO().train(model_dir, examples, tmp_path / "grpo", settings, LORA)
    assert summary.groups == 9 and summary.skipped_groups == 1 and summary.examples == 32
    assert summary.mean_reward == pytest.approx(8 / 36)
    # a curve per step: each batch's mean stored reward (kept groups only) and the KL
    assert sorted(summary.curves) == ["kl", "reward"]
    assert all(len(c) == 16 for c in summary.curves.values())
    assert all(0.0 <= r <= 1.0 for r in summary.curves["reward"])
    assert summary.curves["kl"][0] == pytest.approx(0.0, abs=1e-6)  # B = 0: the reference itself
    assert max(summary.curves["kl"]) > 0

    backend.add_adapter("grpo1", Path(summary.adapter_dir))
    for obj in objects:
        group = [e for e in examples if e.group == obj]
        right = [e.reward for e in group].index(1.0)
        before, after = scored(backend, "base", group), scored(backend, "grpo1", group)
        assert after[right] > before[right] + 1.0
        # Relative to the other options of its group, too (what the harness's argmax sees).
        margin = [v[right] - (sum(v) - v[right]) / 3 for v in (before, after)]
        assert margin[1] > margin[0] + 1.0


def test_grpo_refuses_groups_without_variance(model_dir: Path, tmp_path: Path):
    flat = [e.model_copy(update={"reward": 1.0}) for e in option_groups(["sky", "leaf"], "red")]
    kept, groups, skipped = advantages(flat, None)
    assert (kept, groups, skipped) == ([], 2, 2)
    with pytest.raises(TrainError, match="nothing to learn"):
        GRPO().train(model_dir, flat, tmp_path / "none", FAST, LORA)
    assert not (tmp_path / "none").exists()
    with pytest.raises(TrainError, match="reward and a group"):
        GRPO().train(model_dir, TOY, tmp_path / "none", FAST, LORA)


# ---- DPO --------------------------------------------------------------------------------------


def test_dpo_pairs_take_gold_over_the_strongest_wrong_answer(toy_store):
    store, task, prefixes = toy_store
    examples = dpo_pairs(store, task, "v0")
    train = task.instances("train")[:3]
    assert len(examples) == 6 and [e.reward for e in examples] == [1.0, 0.0] * 3
    for k, inst in enumerate(train):
        chosen, rejected = examples[2 * k : 2 * k + 2]
        gold = task.label(inst)
        assert chosen.group == rejected.group and chosen.prompt == rejected.prompt == prefixes[k]
        assert chosen.completion == gold + "\n" and rejected.completion != chosen.completion
        output = store.trajectories("v0", "train")[k].output
        if output != gold:  # the harness's own wrong answer is the hard negative
            assert rejected.completion == output + "\n"
    # a ranking signal names the strongest wrong candidate first
    ranked = {"label": "red", "ranked": ["red", "blue", "green"]}
    assert _ranked_wrong(ranked, ("red", "green", "blue"), "red") == "blue"
    assert _ranked_wrong("green", ("red", "green", "blue"), "red") == "green"
    assert _ranked_wrong("red", ("red", "green"), "red") == "green"


def test_dpo_raises_chosen_over_rejected_from_the_start_policy(
    model_dir: Path, backend: HFBackend, tmp_path
):
    objects = list(OBJECTS)[::2]
    examples = [
        TrainExample(prompt=PROMPTS[o], completion=c, reward=r, group=o)
        for o in objects
        for c, r in ((" blue\n", 1.0), (" red\n", 0.0))
    ] + [TrainExample(prompt=PROMPTS["sky"], completion=" red\n", reward=1.0, group="alone")]
    settings = FAST.model_copy(update={"max_steps": 12, "lr": 5e-3, "batch_size": 3})
    summary = DPO().train(model_dir, examples, tmp_path / "dpo", settings, LORA)
    assert summary.examples == 8 and summary.skipped_groups == 1  # a group of one is no pair
    # the reference is the policy training starts from: the first loss is exactly log 2
    assert summary.first_loss == pytest.approx(0.6931, abs=1e-3)
    assert all(torch.isfinite(torch.tensor(summary.losses)))
    assert summary.last_loss < summary.first_loss
    assert summary.tokens_per_s and summary.tokens_per_s > 0
    # TRL's rewards/margins and rewards/accuracies per step: from 0 (the reference itself) to
    # the chosen answer ahead; a pair's rewards are not averaged
    curves = summary.curves
    assert sorted(curves) == ["accuracy", "margin"] and len(curves["margin"]) == 12
    assert curves["margin"][0] == pytest.approx(0.0, abs=1e-4) and curves["accuracy"][0] == 0.0
    assert curves["margin"][-1] > 0 and curves["accuracy"][-1] == 1.0

    backend.add_adapter("dpo1", Path(summary.adapter_dir))
    pairs = [examples[i : i + 2] for i in range(0, 16, 2)]
    for pair in pairs:
        before, after = scored(backend, "base", pair), scored(backend, "dpo1", pair)
        assert after[0] - after[1] > before[0] - before[1] + 1.0

    # continuing the parent's adapter: the reference is that adapter, not the base model
    again = DPO().train(
        model_dir, examples, tmp_path / "dpo2",
        settings.model_copy(update={"max_steps": 2, "init_adapter": summary.adapter_dir}), LORA,
    )  # fmt: skip
    assert again.first_loss == pytest.approx(0.6931, abs=1e-3)
    with pytest.raises(TrainError, match="no pair"):
        DPO().train(model_dir, examples[-1:], tmp_path / "none", FAST, LORA)
    assert method("dpo").name == "dpo"


# ---- PPO --------------------------------------------------------------------------------------


def test_gae_and_the_clipped_losses_match_hand_computed_values():
    adv, ret = gae([0.0, 0.0, 1.0], [0.5, 0.2, 0.4], gamma=0.9, lam=0.8)
    # delta = (-0.32, 0.16, 0.6); A_t = delta_t + 0.72 A_(t+1)
    assert adv == pytest.approx([0.10624, 0.592, 0.6])
    assert ret == pytest.approx([0.60624, 0.792, 1.0])
    assert gae([1.0], [0.0], 1.0, 1.0) == ([1.0], [1.0])

    ratio = torch.tensor([1.5, 0.5, 1.1])
    loss, clipped = clipped_surrogate(ratio.log(), torch.zeros(3), torch.tensor([1.0, 1, -1]), 0.2)
    # min(r A, clip(r) A) = (1.2, 0.5, -1.1)
    assert loss.item() == pytest.approx(-(1.2 + 0.5 - 1.1) / 3)
    assert clipped.item() == pytest.approx(2 / 3)
    v = value_loss(
        torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]), torch.tensor([2.0, 1.0]), 0.5
    )
    # clipped values (0.5, 0.0): max((1-2)^2, (0.5-2)^2) = 2.25 and max(1, 1) = 1
    assert v.item() == pytest.approx(0.5 * (2.25 + 1.0) / 2)


def sampled_episodes(backend: HFBackend, model_dir: Path) -> list[TrainExample]:
    """Episodes of two sampled calls each (a multi-call harness), as `ppo_episodes` builds them:
    the endpoint's token ids and its logprobs at sampling time; " blue" rewarded 1."""
    policy = engine.load_policy(model_dir, FAST, LORA)
    out = []
    for obj in list(OBJECTS)[:6]:
        for colour in ("blue", "red"):
            text = TrainExample(prompt=PROMPTS[obj], completion=f" {colour}\n")
            enc = engine.encode(policy, text, 64)
            request = ScoreRequest("base", (text.prompt + text.completion,), 0, (len(text.prompt),))
            lp = backend.score(request)[0].logprobs.token_logprobs
            recorded = [v for v in lp if v is not None]
            for call in range(2):
                out.append(
                    text.model_copy(
                        update={
                            "reward": float(colour == "blue"),
                            "group": f"{obj}/{colour}",
                            "prompt_ids": enc.ids[: enc.start] if call else enc.ids[1 : enc.start],
                            "completion_ids": enc.ids[enc.start :],
                            "logprobs": tuple(recorded),
                        }
                    )
                )
    return out


def test_ppo_raises_rewarded_samples_and_continues_its_parent(
    model_dir: Path, backend: HFBackend, tmp_path
):
    examples = sampled_episodes(backend, model_dir)
    settings = FAST.model_copy(update={"max_steps": 12, "lr": 5e-3, "batch_size": 6})
    summary = PPO().train(model_dir, examples, tmp_path / "ppo", settings, LORA)
    assert summary.examples == 24 and summary.groups == 12 and summary.mean_reward == 0.5
    losses = torch.tensor(summary.losses)
    assert torch.isfinite(losses).all() and summary.last_loss < summary.first_loss
    assert summary.kl is not None and summary.kl >= 0 and summary.value_loss is not None
    curves = summary.curves
    assert sorted(curves) == ["clip_fraction", "kl", "reward", "value_loss"]
    assert all(len(c) == 12 for c in curves.values())
    assert curves["kl"][-1] == summary.kl and curves["value_loss"][-1] == summary.value_loss
    assert statistics.fmean(curves["reward"]) == pytest.approx(0.5, abs=0.2)
    assert summary.tokens_per_s and summary.tokens_per_s > 0
    # the endpoint's fp32 logprobs at sampling time against the trainer's, token by token
    assert summary.logprob_gap is not None and summary.logprob_gap < 1e-3

    backend.add_adapter("ppo1", Path(summary.adapter_dir))
    for obj in list(OBJECTS)[:6]:
        pair = [TrainExample(prompt=PROMPTS[obj], completion=f" {c}\n") for c in ("blue", "red")]
        before, after = scored(backend, "base", pair), scored(backend, "ppo1", pair)
        assert after[0] - after[1] > before[0] - before[1] + 0.5

    # a second candidate continues the parent's adapter and its value head
    head = torch.load(tmp_path / "ppo" / "value_head.pt", weights_only=True)
    assert head["weight"].abs().sum() > 0
    child = settings.model_copy(
        update={"max_steps": 1, "lr": 1e-9, "init_adapter": summary.adapter_dir}
    )
    PPO().train(model_dir, examples, tmp_path / "ppo2", child, LORA)
    again = torch.load(tmp_path / "ppo2" / "value_head.pt", weights_only=True)
    assert torch.allclose(again["weight"], head["weight"], atol=1e-6)

    same = [e.model_copy(update={"reward": 1.0}) for e in examples]
    with pytest.raises(TrainError, match="no signal"):
        PPO().train(model_dir, same, tmp_path / "flat", settings, LORA)
    with pytest.raises(TrainError, match="samples nothing"):
        PPO().train(model_dir, [], tmp_path / "none", settings, LORA)
    assert method("ppo").name == "ppo"


def test_ppo_episodes_credit_every_sampled_call_with_the_episode_score(tmp_path: Path):
    task = ToyTask()
    store = Store.create(tmp_path / "run", RunInfo(run_id="r", task="toy", config={}))
    insts = task.instances("train")[:2]
    for k, inst in enumerate(insts):
        traj = Trajectory(
            run_id="r", version_id="v0", split="train", instance_id=inst.id,
            output="red", score=Score(value=float(k)), seconds=0.1,
        )  # fmt: skip
        calls = [
            LLMCall(
                episode_id=traj.trajectory_id,
                endpoint="completions",
                adapter="base",
                prompt=f"step {step}:",
                completion=" red",
                prompt_token_ids=[2, 9, step],
                completion_token_ids=[7, 8],
                token_logprobs=[-0.5, -0.25] if step else None,
                params={"max_tokens": 4, "logprobs": 0} if step else {"max_tokens": 4},
                latency_s=0.1,
            )
            for step in range(2)
        ]
        calls += scoring_calls(traj.trajectory_id, "Answer: ", ["red", "blue"], "\n")
        store.add_trajectory(traj, calls)
    examples = ppo_episodes(store, task, "v0")
    assert len(examples) == 4  # two sampled calls per episode; option scoring samples nothing
    assert [e.reward for e in examples] == [0.0, 0.0, 1.0, 1.0]
    assert examples[0].group == examples[1].group != examples[2].group
    assert examples[1].completion_ids == (7, 8) and examples[1].prompt_ids == (2, 9, 1)
    assert examples[0].logprobs is None and examples[1].logprobs == (-0.5, -0.25)
    # a lower-is-better task: the reward is the score in the metric's direction
    lower = ToyTask()
    lower.metric = lower.metric.model_copy(update={"direction": "lower"})
    assert [e.reward for e in ppo_episodes(store, lower, "v0")] == [0.0, 0.0, -1.0, -1.0]


def test_grpo_weighs_each_sequence_by_its_mean_token_logprob():
    """DeepSeekMath's 1/|o| per sequence: a long sample counts as much as a short one."""
    items = [engine.Encoded((2, 5, 6, 7, 8), 1), engine.Encoded((2, 5, 9), 2)]
    batch = engine.collate(items, pad=0)
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0])  # 4 tokens of the first, 1 of the second
    assert engine.per_example(values, batch).tolist() == [10.0, 10.0]
    assert engine.per_example(values, batch, mean=True).tolist() == [2.5, 10.0]
