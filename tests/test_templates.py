"""Harness templates: the prompts they build are locked by golden files; both validate."""

import json
import os
import runpy
from pathlib import Path

import pytest

from sialoop.harness.program import validate_harness
from sialoop.tasks.templates import template_source

GOLDEN = Path(__file__).parent / "golden"
TRAIN = [
    {"id": str(i), "text": f"被告人{i}号于某日在某地实施了行为{i % 3}。", "label": label}
    for i, label in enumerate(["盗窃", "盗窃", "故意伤害", "诈骗", "盗窃", "诈骗"])
]


@pytest.fixture
def public_cwd(tmp_path: Path):
    public = tmp_path / "public"
    public.mkdir()
    (public / "train.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in TRAIN)
    )
    (public / "options.json").write_text(
        json.dumps(["盗窃", "故意伤害", "诈骗"], ensure_ascii=False)
    )
    old = Path.cwd()
    os.chdir(tmp_path)
    yield tmp_path
    os.chdir(old)


_PACKAGE = {
    "lawbench_fewshot.py": ("sialoop.tasks.lawbench", "fewshot.py"),
    "lawbench_zeroshot.py": ("sialoop.tasks.lawbench", "zeroshot.py"),
    "lawbench_chat.py": ("sialoop.tasks.lawbench", "chat.py"),
    "option_scoring.py": ("sialoop.tasks.toy", "option_scoring.py"),
    "toy_chat.py": ("sialoop.tasks.toy", "chat.py"),
}


def _source(name: str) -> str:
    return template_source(*_PACKAGE[name])


def _load(name: str, where: Path) -> dict:
    path = where / name
    path.write_text(_source(name))
    return runpy.run_path(str(path))


@pytest.mark.parametrize("selection", ["fixed", "similar"])
def test_lawbench_prompt_matches_golden(public_cwd: Path, selection: str):
    module = _load("lawbench_fewshot.py", public_cwd)
    module["prompt"].__globals__["EXAMPLE_SELECTION"] = selection
    text = "被告人9号于某日在某地实施了行为0。"
    near = module["neighbours"](text)
    rendered = module["prompt"](text, near)
    golden = GOLDEN / f"lawbench_fewshot_{selection}.txt"
    if os.environ.get("SIALOOP_UPDATE_GOLDEN"):
        golden.write_text(rendered)
    assert rendered == golden.read_text()
    assert module["shortlist"](near) == ["诈骗", "盗窃", "故意伤害"]  # nearest first, no repeats


def test_templates_validate(public_cwd: Path):
    for name in _PACKAGE:
        path = public_cwd / name
        path.write_text(_source(name))
        validate_harness(path, public_dir=public_cwd / "public")


def test_retrieval_leaves_the_case_itself_out(public_cwd: Path):
    module = _load("lawbench_fewshot.py", public_cwd)
    text = TRAIN[2]["text"]
    near = module["neighbours"](text)
    assert 2 not in near and len(near) == len(TRAIN) - 1


def test_a_train_case_is_scored_by_a_classifier_that_never_saw_it(public_cwd: Path):
    module = _load("lawbench_fewshot.py", public_cwd)
    only = TRAIN[2]  # the one 故意伤害 case
    assert "故意伤害" not in module["classifier_for"](only["text"]).classes_
    assert "故意伤害" in module["classifier_for"]("被告人某某殴打他人。").classes_
    options, prior = module["classifier_shortlist"](only["text"])
    assert "故意伤害" not in options and sum(prior) == pytest.approx(1.0)


def test_zero_shot_matches_the_generated_text_to_a_charge(public_cwd: Path):
    closest = _load("lawbench_zeroshot.py", public_cwd)["closest_option"]
    assert closest("诈骗罪") == "诈骗"  # the "罪" suffix is not part of the name
    assert closest(" 被告人犯故意伤害罪，") == "故意伤害"  # the name inside a longer text
    assert closest("盗窃财物") == "盗窃"
    assert closest("xyz") in {"盗窃", "故意伤害", "诈骗"}  # always a valid option


class _Chat:
    """A stand-in chat client: records the messages, replies with `reply`."""

    def __init__(self, reply: str) -> None:
        self.reply, self.sent = reply, []
        self.chat = self
        self.completions = self

    def create(self, **kwargs):
        from types import SimpleNamespace

        self.sent.append(kwargs)
        message = SimpleNamespace(content=self.reply)
        return SimpleNamespace(choices=[SimpleNamespace(message=message)])


def test_the_chat_templates_ask_for_one_option_and_match_the_reply(public_cwd: Path):
    lawbench = _load("lawbench_chat.py", public_cwd)
    text = "被告人某某秘密窃取他人财物。"
    options = lawbench["shortlist"](text)
    assert sorted(options) == ["故意伤害", "盗窃", "诈骗"]
    llm = _Chat("本案被告人构成诈骗罪。")
    out = lawbench["solve"]({"text": text, "options": options}, llm)
    assert out["label"] == "诈骗" and out["ranked"][0] == "诈骗" and len(out["ranked"]) == 3
    sent = llm.sent[0]["messages"]
    assert sent[0]["role"] == "system" and sent[-1]["content"].startswith("案情：" + text)
    assert [m["role"] for m in sent[1:-1]] == ["user", "assistant"] * 2  # N_EXAMPLES turns
    assert lawbench["solve"]({"text": text}, _Chat("不知道"))["label"] == options[0]

    toy = _load("toy_chat.py", public_cwd)
    assert (
        toy["solve"]({"text": "x", "options": ["red", "blue"]}, _Chat(" Blue."))["label"] == "blue"
    )
