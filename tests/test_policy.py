"""The policy endpoint end to end: the real openai client against a real server on loopback,
backed by the tiny random Gemma 3 in float32, checked against direct transformers / peft forwards.
"""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import openai
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from sialoop.policy.hf import HFBackend
from sialoop.policy.packed import PackedLinear, pack_linears, packing_available
from sialoop.policy.recorder import MemoryRecorder
from sialoop.policy.server import PolicyServer

TOL = 1e-4
# Longer than the tiny model's sliding window (16 tokens), so sliding layers drop part of it.
CONTEXT = (
    "案情：被告人张某于2016年7月6日在本市某商场内趁人不备，窃取他人手机一部，价值人民币三千元。"
    "经鉴定，涉案财物价值较大。被告人到案后如实供述了自己的罪行。请判断罪名。\n罪名："
)
OPTIONS = [
    "盗窃",
    "诈骗",
    "故意伤害",
    "交通肇事",
    "非法经营",
    "抢劫",
    "抢夺",
    "敲诈勒索",
    "职务侵占",
    "侵占",
]


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter with random non-zero A and B, saved in peft's format."""
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    config = LoraConfig(
        r=4,
        lora_alpha=32,
        target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
        init_lora_weights=False,
    )
    torch.manual_seed(1)
    out = tmp_path_factory.mktemp("adapters") / "v1"
    get_peft_model(model, config).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def backend(tiny_model_dir: Path) -> HFBackend:
    # score_chunk=4: ten options run as three suffix batches.
    return HFBackend(tiny_model_dir, dtype="float32", max_batch=8, score_chunk=4)


@pytest.fixture(scope="module")
def served(backend: HFBackend):
    recorder = MemoryRecorder()
    # A 50 ms batching window makes concurrent requests reliably share a batch in the test.
    with PolicyServer(backend, recorder, wait_s=0.05) as server:
        yield server, recorder


@pytest.fixture(scope="module")
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served[0].url, api_key="unused", max_retries=0, timeout=60)


def direct_logprobs(model, ids: list[int]) -> list[float | None]:
    with torch.inference_mode():
        lsm = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return [None] + [lsm[j - 1, ids[j]].item() for j in range(1, len(ids))]


def ids_of(recorder: MemoryRecorder, episode: str) -> list[list[int]]:
    return [c.prompt_token_ids for c in recorder.calls(episode)]


def assert_close(got: list[float | None], want: list[float | None]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert (g is None) == (w is None)
        if g is not None:
            assert abs(g - w) <= TOL, (g, w)


def score(
    client: openai.OpenAI,
    episode: str,
    model: str = "base",
    from_: int | None = None,
    logprobs: int = 0,
    headers=None,
):
    extra = {"echo_logprobs_from": from_} if from_ is not None else None
    return client.completions.create(
        model=model,
        prompt=[CONTEXT + o for o in OPTIONS],
        echo=True,
        max_tokens=0,
        logprobs=logprobs,
        extra_body=extra,
        extra_headers={"X-Sialoop-Episode": episode, **(headers or {})},
    )


def test_echo_scoring_equals_full_forward(client, served, reference, backend):
    """The backend runs on packed weights and its row-wise log-normaliser; `reference` on
    neither: equal logprobs check both."""
    if packing_available(torch.float32):
        assert isinstance(backend._lm.get_output_embeddings(), PackedLinear)
    recorder = served[1]
    response = score(client, "ep-echo", logprobs=3)
    assert len(response.choices) == len(OPTIONS)
    for choice, ids in zip(response.choices, ids_of(recorder, "ep-echo"), strict=True):
        assert len(ids) > 40 and ids[0] == 2 and ids[1] != 2
        want = direct_logprobs(reference, ids)
        assert_close(choice.logprobs.token_logprobs, want)
        assert choice.text == CONTEXT + OPTIONS[choice.index]
        top = choice.logprobs.top_logprobs[-1]
        assert max(top.values()) >= choice.logprobs.token_logprobs[-1] - TOL and len(top) >= 3


@pytest.mark.parametrize(
    "prompts",
    [
        [CONTEXT, CONTEXT, CONTEXT + "盗窃"],  # identical prompts; one a prefix of another
        ["", "a", CONTEXT + "x" * 40],  # empty, one token, no shared prefix beyond <bos>
    ],
)
def test_echo_scoring_odd_shapes(client, served, reference, prompts):
    episode = f"ep-shapes-{len(prompts[0])}"
    response = client.completions.create(
        model="base",
        prompt=prompts,
        echo=True,
        max_tokens=0,
        logprobs=1,
        extra_headers={"X-Sialoop-Episode": episode},
    )
    for choice, ids in zip(response.choices, ids_of(served[1], episode), strict=True):
        assert_close(choice.logprobs.token_logprobs, direct_logprobs(reference, ids))


def test_echo_logprobs_from_scores_only_the_options(client, served, reference, backend):
    recorder = served[1]
    head_rows = backend.stats["head_rows"]
    response = score(client, "ep-from", from_=len(CONTEXT))
    scored_positions = 0
    for choice, ids in zip(response.choices, ids_of(recorder, "ep-from"), strict=True):
        lp, offsets = choice.logprobs.token_logprobs, choice.logprobs.text_offset
        want = direct_logprobs(reference, ids)
        for j in range(len(ids)):
            if offsets[j] < len(CONTEXT) or j == 0:
                assert lp[j] is None
            else:
                scored_positions += 1
                assert abs(lp[j] - want[j]) <= TOL
        assert lp[-1] is not None
    # Logits were computed for the option tokens only (the prefix row once, shared by all).
    assert backend.stats["head_rows"] - head_rows <= scored_positions


def test_prefix_is_reused_across_requests(client, backend, reference, served):
    before = dict(backend.stats)
    prompt = CONTEXT + "寻衅滋事"
    response = client.completions.create(
        model="base",
        prompt=prompt,
        echo=True,
        max_tokens=0,
        logprobs=0,
        extra_body={"echo_logprobs_from": len(CONTEXT)},
        extra_headers={"X-Sialoop-Episode": "ep-reuse"},
    )
    assert backend.stats["prefix_hits"] == before["prefix_hits"] + 1
    assert backend.stats["prefix_tokens"] == before["prefix_tokens"]
    ids = ids_of(served[1], "ep-reuse")[0]
    got = response.choices[0].logprobs.token_logprobs
    want = direct_logprobs(reference, ids)
    assert_close(
        [g for g in got if g is not None],
        [w for g, w in zip(got, want, strict=True) if g is not None],
    )


def test_a_shared_stem_is_computed_once_across_items_and_scores_as_a_full_forward(
    client, backend, reference, served
):
    """Items whose prompts share an instruction and fixed examples, then differ (the case
    text): from the third item on only the item's own tokens run, and every option logprob is
    still a full forward pass's (the stem is longer than the sliding window)."""
    stem = "说明：" + CONTEXT * 2  # about 140 tokens, sharing no start with other tests
    cases = [f"第{n}案：被告人{name}窃取财物。\n罪名：" for n, name in enumerate("甲乙丙丁")]
    spent = []
    for n, case in enumerate(cases):
        before = backend.stats["prefix_tokens"]
        prefix = stem + case
        response = client.completions.create(
            model="base",
            prompt=[prefix + o for o in OPTIONS[:3]],
            echo=True,
            max_tokens=0,
            logprobs=0,
            extra_body={"echo_logprobs_from": len(prefix)},
            extra_headers={"X-Sialoop-Episode": f"ep-stem-{n}"},
        )
        spent.append(backend.stats["prefix_tokens"] - before)
        for choice, ids in zip(response.choices, ids_of(served[1], f"ep-stem-{n}"), strict=True):
            got = choice.logprobs.token_logprobs
            want = direct_logprobs(reference, ids)
            assert_close(
                [g for g in got if g is not None],
                [w for g, w in zip(got, want, strict=True) if g is not None],
            )
    stem_tokens = len(backend.tokenizer(stem)["input_ids"])
    assert spent[0] > stem_tokens and spent[1] > stem_tokens  # the first: whole; the second: stem
    assert all(0 < s < 20 for s in spent[2:]), spent  # then each case's own tokens only


def test_completion_generates_like_transformers(client, served, reference):
    response = client.completions.create(
        model="base",
        prompt="The court finds",
        max_tokens=6,
        temperature=0,
        logprobs=2,
        extra_headers={"X-Sialoop-Episode": "ep-gen"},
    )
    call = served[1].calls("ep-gen")[0]
    prompt_ids = call.prompt_token_ids
    with torch.inference_mode():
        expected = reference.generate(
            torch.tensor([prompt_ids]), max_new_tokens=6, do_sample=False
        )[0, len(prompt_ids) :].tolist()
    assert call.completion_token_ids == expected
    choice = response.choices[0]
    assert choice.finish_reason == "length" and response.usage.completion_tokens == 6
    want = direct_logprobs(reference, prompt_ids + expected)[len(prompt_ids) :]
    assert_close(choice.logprobs.token_logprobs, want)
    assert call.token_logprobs == choice.logprobs.token_logprobs and call.completion == choice.text


def test_stop_string_trims_text(client):
    full = (
        client.completions.create(model="base", prompt="Verdict:", max_tokens=12, temperature=0)
        .choices[0]
        .text
    )
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    choice = client.completions.create(
        model="base", prompt="Verdict:", max_tokens=12, temperature=0, stop=[stop]
    ).choices[0]
    assert choice.text == full[: full.index(stop)] and choice.finish_reason == "stop"


def test_seed_makes_sampling_reproducible(client):
    def sample(seed: int) -> list[str]:
        return [
            c.text
            for c in client.completions.create(
                model="base", prompt="Hello", max_tokens=8, temperature=1.0, n=2, seed=seed
            ).choices
        ]

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_chat_completion_renders_a_transcript(client, served, backend):
    response = client.chat.completions.create(
        model="policy",
        messages=[{"role": "user", "content": "你好"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_headers={"X-Sialoop-Episode": "ep-chat"},
    )
    choice = response.choices[0]
    assert isinstance(choice.message.content, str) and choice.finish_reason in {"stop", "length"}
    assert len(choice.logprobs.content) == response.usage.completion_tokens
    (call,) = served[1].calls("ep-chat")
    assert call.endpoint == "chat.completions" and call.prompt == [
        {"role": "user", "content": "你好"}
    ]
    assert call.prompt_token_ids == backend.tokenizer("User: 你好\nAssistant:")["input_ids"]


def test_adapter_selection_by_model_and_header(
    client, served, backend, adapter_dir, tiny_model_dir
):
    base_url = served[0].url.removesuffix("/v1")
    admin = served[0].admin_headers()  # the admin route's token (tests/test_hostile_output.py)
    assert (
        httpx.post(
            f"{base_url}/sialoop/adapters",
            json={"name": "v1", "path": str(adapter_dir / "missing")},
            headers=admin,
        ).status_code
        == 400
    )
    reply = httpx.post(
        f"{base_url}/sialoop/adapters", json={"name": "v1", "path": str(adapter_dir)}, headers=admin
    )
    assert reply.status_code == 200, reply.text
    assert [m.id for m in client.models.list()] == ["base", "v1"]
    peft_ref = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32),
        str(adapter_dir),
    ).eval()
    base = score(client, "ep-a-base")
    tuned = score(client, "ep-a-v1", model="v1")
    aliased = score(client, "ep-a-alias", model="policy", headers={"X-Sialoop-Adapter": "v1"})
    for b, t, a, ids in zip(
        base.choices, tuned.choices, aliased.choices, ids_of(served[1], "ep-a-v1"), strict=True
    ):
        assert_close(t.logprobs.token_logprobs, direct_logprobs(peft_ref, ids))
        assert t.logprobs.token_logprobs == a.logprobs.token_logprobs
        assert (
            max(
                abs(x - y)
                for x, y in zip(
                    b.logprobs.token_logprobs[1:], t.logprobs.token_logprobs[1:], strict=True
                )
            )
            > 1e-2
        )
    assert {c.adapter for c in served[1].calls("ep-a-alias")} == {"v1"}
    assert {c.adapter for c in served[1].calls("ep-a-base")} == {"base"}


def test_unknown_model_is_404_listing_models(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="v-nope", prompt="x", max_tokens=1)
    assert "v-nope" in str(err.value) and "base" in str(err.value)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(
            model="policy", prompt="x", max_tokens=1, extra_headers={"X-Sialoop-Adapter": "v-nope"}
        )


def test_bad_requests_are_400_and_server_keeps_serving(client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="base", prompt="x", max_tokens=1, logprobs=99)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(
            model="base",
            prompt="x",
            echo=True,
            max_tokens=0,
            logprobs=0,
            extra_body={"echo_logprobs_from": -1},
        )
    with pytest.raises(openai.BadRequestError):
        client.completions.create(
            model="base",
            prompt=["a", "b"],
            echo=True,
            max_tokens=0,
            logprobs=0,
            extra_body={"echo_logprobs_from": [1]},
        )
    assert (
        client.completions.create(model="base", prompt="x", max_tokens=1).choices[0].finish_reason
    )


def test_every_call_recorded_with_its_episode(client, served):
    recorder = served[1]
    client.completions.create(
        model="base",
        prompt=["a b", "c d"],
        max_tokens=3,
        n=2,
        logprobs=1,
        extra_headers={"X-Sialoop-Episode": "ep-rec"},
    )
    calls = recorder.calls("ep-rec")
    assert len(calls) == 4
    for call in calls:
        assert (
            call.episode_id == "ep-rec"
            and call.adapter == "base"
            and call.endpoint == "completions"
        )
        assert call.prompt in {"a b", "c d"} and call.prompt_token_ids[0] == 2
        assert len(call.completion_token_ids) == len(call.token_logprobs) <= 3
        assert call.params["max_tokens"] == 3 and call.params["n"] == 2 and call.latency_s > 0
    client.completions.create(model="base", prompt="<bos>no episode", max_tokens=1)
    last = recorder.calls()[-1]
    assert last.episode_id is None and last.prompt_token_ids.count(2) == 1


def test_concurrent_requests_are_batched_and_correct(client, served):
    prompts = [f"Case {i}: the defendant" for i in range(8)]
    expected = [
        client.completions.create(model="base", prompt=p, max_tokens=3 + i % 3, temperature=0)
        .choices[0]
        .text
        for i, p in enumerate(prompts)
    ]
    batcher = served[0].app.state.batcher
    batcher.stats["max_rows"] = 0
    barrier, got = threading.Barrier(len(prompts) + 1), [None] * len(prompts)
    errors: list[Exception] = []

    def run(i: int) -> None:
        barrier.wait()
        response = client.completions.create(
            model="base", prompt=prompts[i], max_tokens=3 + i % 3, temperature=0
        )
        got[i] = response.choices[0].text

    def bad() -> None:  # too long for the model: fails alone, not its batch-mates
        barrier.wait()
        try:
            client.completions.create(model="base", prompt="x", max_tokens=10_000, temperature=0)
        except openai.BadRequestError as err:
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    threads.append(threading.Thread(target=bad))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected
    assert len(errors) == 1 and "exceeds" in str(errors[0])
    assert batcher.stats["max_rows"] > 1


@pytest.mark.parametrize("prefix_len", [1, 5, 40])  # <bos> only; inside; past the window (16)
def test_packed_suffixes_equal_padded_batches(tiny_model_dir: Path, prefix_len: int):
    """The packed path (one sequence, block masks) and the padded fallback (the prefix cache
    repeated per suffix) give the same hidden states, suffixes longer than the window included."""
    backend = HFBackend(tiny_model_dir, dtype="float32")
    assert backend._packs  # the tiny Gemma 3 takes masks per layer type
    suffixes = [[5, 6, 7], [8, 9], list(range(300, 330))]
    with torch.inference_mode():
        entry = backend._prefix("base", tuple(range(100, 100 + prefix_len)))
        packed = backend._run_suffixes(entry, suffixes)
        backend._packs = False
        padded = backend._run_suffixes(entry, suffixes)
    for a, b, s in zip(packed, padded, suffixes, strict=True):
        assert a.shape == b.shape == (len(s), backend._lm.config.hidden_size)
        assert (a - b).abs().max().item() <= 1e-4


def test_model_calls_run_on_the_one_compute_thread(client, backend, monkeypatch):
    """Every model call the endpoint serves runs on `sialoop-compute` (see policy/compute.py:
    a second thread running torch makes every later op slower), and so does `run_compute`."""
    from sialoop.policy.compute import run_compute

    seen: list[str] = []
    real = backend.score

    def spy(request):
        seen.append(threading.current_thread().name)
        return real(request)

    monkeypatch.setattr(backend, "score", spy)
    score(client, "ep-thread")
    assert seen == ["sialoop-compute"]
    assert run_compute(lambda: threading.current_thread().name) == "sialoop-compute"
    assert run_compute(run_compute, lambda: 7) == 7  # nested: runs in place, no deadlock
    with pytest.raises(ZeroDivisionError):
        run_compute(lambda: 1 / 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linears_equal_plain_ones_and_step_aside_for_training(
    tiny_model_dir: Path, dtype: torch.dtype
):
    if not packing_available(dtype):
        pytest.skip(f"this CPU's oneDNN does not pack {dtype}")
    plain = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=dtype)
    packed = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=dtype)
    linears = sum(type(m) is torch.nn.Linear for m in plain.modules())
    assert pack_linears(packed) == linears > 0
    assert not any(type(m) is torch.nn.Linear for m in packed.modules())
    # The tied LM head still shares the embedding's Parameter.
    assert packed.get_output_embeddings().weight is packed.get_input_embeddings().weight
    ids = torch.tensor([[2, 100, 200, 300, 400, 500, 17]])
    tol = 1e-4 if dtype == torch.float32 else 0.05  # bf16: the same products, summed in order

    def logits(model) -> torch.Tensor:
        return model(ids).logits.float()

    with torch.inference_mode():
        assert (logits(packed) - logits(plain)).abs().max().item() <= tol
    # With autograd on, the plain path runs: the same loss and the same weight gradients.
    for model in (plain, packed):
        model.zero_grad()
        logits(model).logsumexp(-1).sum().backward()
    down = [m.model.layers[0].mlp.down_proj.weight.grad for m in (plain, packed)]
    assert down[1] is not None and (down[0] - down[1]).abs().max().item() <= tol * 10
    # A weight changed in place after packing is used as it now is, not as it was packed.
    # (Not a rescale: Gemma 3's post-MLP norm would undo it.)
    noise = torch.randn(plain.model.layers[0].mlp.down_proj.weight.shape, dtype=dtype)
    for model in (plain, packed):
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight.add_(noise)
    with torch.inference_mode():
        assert (logits(packed) - logits(plain)).abs().max().item() <= tol * 3
