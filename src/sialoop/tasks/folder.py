"""A task folder in SIA's layout, run unchanged: `FolderTask(task_dir)`.

Layout read (everything else in the folder is ignored):
- `data/public/task.md` (the spec) and `data/public/*`: the item file (a CSV with an id column,
  a JSON list of objects or JSON lines with an id field: the public table sharing the most ids
  with a private one, never `sample_submission*` or `classes*`) and files every item shares;
- `data/private/*`: the answers, a table keyed by the same ids (CSV, JSON list or JSON lines) or
  a JSON object {id: answer};
- `data/training_data/*`, optional: labelled rows (the item file's id and the answers' label);
- `data/public/evaluate.py`, optional: the scorer; `reference/reference_target_agent.py` (or the
  one `reference/*.py`): generation 0; `metric.json`, optional: a `Metric` (default: accuracy).

Splits: with training data, train and val are a seeded split of its rows (`val_fraction`) and
test is the item file; without it, the items are split by a seeded hash of their id into val
and test halves and train is empty. Train rows whose inputs equal a val or test item's are
dropped. Guaranteed: `label()` answers train and val only; `write_public` writes the folder's
public files but the item file and sample submissions, and the train rows only (never val or
test labels, never `data/private`); `private_paths` covers `data/private` and
`data/training_data`; `Score.detail` carries "gold" for train and val only.

Scoring runs the folder's `evaluate.py` outside the sandbox, in one long-lived subprocess per
task (`folder_adapter.serve_evaluator`): per scored output, a temporary copy of the task root
whose answers file holds only that item (the item's gold row: the private row, or for a
training row one built from its label) and a one-row submission; its `accuracy`, `score`, or
metric-named value is the item's value. Without an evaluator an item scores 1.0 when the
prediction equals the gold label (a dict label: any of its values). Scores are cached per
(split, id, output) for the life of the task. Not guaranteed: an evaluator that reads other
private files than the answers file sees them whole; per-item evaluation costs a few ms plus
what the evaluator does per call (it is re-imported each time, its imports are not).
"""

from __future__ import annotations

import ast
import hashlib
import json
import pprint
import shutil
import threading
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from sialoop.errors import DataError
from sialoop.records import Score
from sialoop.tasks import folder_adapter
from sialoop.tasks.base import ACCURACY, Instance, Metric, Split, Task
from sialoop.tasks.folder_adapter import MAP_ID, MAP_LABEL, Table, read_table, table_text

_TABLES = (".csv", ".json", ".jsonl")
_KEY_WORDS = ("KEY", "TOKEN", "SECRET")
_ALWAYS_KEYS = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY")
FOLDER_METRIC = ACCURACY.model_copy(
    update={"correct": "the folder's evaluator scores the prediction correct"}
)


def _id_key(table: Table, preferred: tuple[str, ...]) -> str | None:
    """The table's id column: a preferred name, else a unique-valued column named *id."""
    if table.kind == "map":
        return MAP_ID
    names = [c for c in preferred if c in table.columns]
    names += [c for c in table.columns if c.lower().endswith("id") and c not in names]
    for name in names:
        ids = table.ids(name)
        if all(r.get(name) is not None for r in table.rows) and len(set(ids)) == len(ids):
            return name
    return None


def _rank(seed: int, ids: list[str]) -> list[str]:
    """`ids` in a seeded order that depends on each id alone (stable as items come and go)."""
    return sorted(ids, key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)


def _same(pred: Any, gold: Any) -> bool:
    """Exact match; a scalar compares as stripped text (CSV cells are text)."""
    if isinstance(pred, dict | list) or isinstance(gold, dict | list):
        return _canon(pred) == _canon(gold)
    return pred is not None and str(pred).strip() == str(gold).strip()


@dataclass(frozen=True)
class Layout:
    """What was found in the folder (see the module docstring for how)."""

    root: Path
    agent: Path
    evaluator: Path | None
    items: Table
    id_key: str
    answers: Table
    answers_id: str
    label_keys: tuple[str, ...]  # one: a scalar label; several: a dict of them
    sample: tuple[str, ...]  # sample_submission.csv's header, or ()
    training: tuple[Table, ...]

    @property
    def public(self) -> Path:
        return self.root / "data" / "public"

    @property
    def submission_columns(self) -> tuple[str, str]:
        if len(self.sample) >= 2:
            return self.sample[0], self.sample[1]
        return self.id_key, self.label_keys[0] if len(self.label_keys) == 1 else "label"

    def label_of(self, row: dict[str, Any]) -> Any:
        if len(self.label_keys) == 1:
            return row.get(self.label_keys[0])
        return {k: row.get(k) for k in self.label_keys}


def _need(path: Path, what: str, fix: str) -> Path:
    if not path.exists():
        raise DataError(f"task folder: {path} not found ({what}); {fix}")
    return path


def _find_agent(root: Path) -> Path:
    ref = _need(root / "reference", "the reference agent's folder", "add reference/*.py")
    named = ref / "reference_target_agent.py"
    scripts = [named] if named.is_file() else sorted(ref.glob("*.py"))
    if len(scripts) != 1:
        raise DataError(
            f"task folder: {ref} needs reference_target_agent.py (found {len(scripts)} scripts)"
        )
    return scripts[0]


def _pair(public: Path, private: Path, sample: tuple[str, ...]) -> tuple[Table, str, Table, str]:
    """The public item file and private answers file sharing the most ids."""
    preferred = (*sample[:1], "id")
    inputs = [read_table(p) for p in sorted(public.iterdir()) if p.suffix in _TABLES]
    inputs = [
        t for t in inputs if t and not t.path.stem.startswith(("sample_submission", "classes"))
    ]
    answers = [read_table(p) for p in sorted(private.iterdir()) if p.suffix in _TABLES]
    best: tuple[int, Table, str, Table, str] | None = None
    for item in inputs:
        item_key = _id_key(item, preferred)
        for answer in filter(None, answers):
            answer_key = _id_key(answer, (item_key or "", *preferred))
            if item_key is None or answer_key is None:
                continue
            shared = len(set(item.ids(item_key)) & set(answer.ids(answer_key)))
            if shared and (best is None or shared > best[0]):
                best = (shared, item, item_key, answer, answer_key)
    if best is None:
        raise DataError(
            f"task folder: no table in {public} shares ids with one in {private}; "
            "the item file needs an id column (or field) that the private answers use"
        )
    return best[1], best[2], best[3], best[4]


def _label_keys(
    items: Table, answers: Table, answers_id: str, sample: tuple[str, ...]
) -> tuple[str, ...]:
    if answers.kind == "map":
        return (MAP_LABEL,)
    for name in (*sample[1:2], "label", "answer"):
        if name in answers.columns:
            return (name,)
    extra = tuple(c for c in answers.columns if c not in items.columns and c != answers_id)
    if not extra:
        raise DataError(f"task folder: {answers.path} has no label column beside the inputs")
    return extra


def _training(root: Path, id_key: str, label_keys: tuple[str, ...]) -> tuple[Table, ...]:
    folder = root / "data" / "training_data"
    if not folder.is_dir():
        return ()
    tables = [read_table(p) for p in sorted(folder.iterdir()) if p.suffix in _TABLES]
    labelled = tuple(
        t for t in tables if t and {id_key, *label_keys} <= set(t.columns) and t.kind != "map"
    )
    if not labelled:
        wanted = ", ".join((id_key, *label_keys))
        raise DataError(f"task folder: {folder} has no table with columns {wanted}")
    return labelled


def discover(task_dir: Path) -> Layout:
    """Read a SIA-layout folder; a one-line DataError names what is missing."""
    root = _need(Path(task_dir).resolve(), "the task folder", "pass --task-dir DIR")
    public = _need(root / "data" / "public", "public data", "add data/public/")
    private = _need(root / "data" / "private", "the answers", "add data/private/")
    _need(public / "task.md", "the task description", "add data/public/task.md")
    agent = _find_agent(root)
    sample_path = public / "sample_submission.csv"
    sample = read_table(sample_path) if sample_path.is_file() else None
    header = sample.columns if sample else ()
    items, id_key, answers, answers_id = _pair(public, private, header)
    label_keys = _label_keys(items, answers, answers_id, header)
    evaluator = public / "evaluate.py"
    return Layout(
        root=root, agent=agent, evaluator=evaluator if evaluator.is_file() else None,
        items=items, id_key=id_key, answers=answers, answers_id=answers_id,
        label_keys=label_keys, sample=header, training=_training(root, id_key, label_keys),
    )  # fmt: skip


def _metric(root: Path) -> Metric:
    path = root / "metric.json"
    if not path.is_file():
        return FOLDER_METRIC
    try:
        return Metric.model_validate_json(path.read_text(encoding="utf-8"))
    except ValidationError as err:
        first = err.errors()[0]
        raise DataError(
            f"{path}: {first['loc']}: {first['msg']} (fields of sialoop Metric)"
        ) from None


class FolderTask(Task):
    """A SIA-layout task folder (see the module docstring for what it reads and guarantees).

    An instance's inputs are its item's fields but the id (CSV cells are text); an output is
    `{"label": ...}` (or a bare label), or `{"submission": <JSON>, "file": name}` for a folder
    whose agent writes a JSON submission. The answers stay in this (trusted) object's memory.
    """

    def __init__(self, task_dir: str | Path, *, seed: int = 0, val_fraction: float = 0.1):
        self.layout = discover(Path(task_dir))
        self.name = f"folder-{self.layout.root.name}"
        self.metric = _metric(self.layout.root)  # type: ignore[misc]
        self.seed, self.val_fraction = seed, val_fraction
        self._evaluator = folder_adapter.EvaluatorProcess(self.layout.root)
        self._cache: dict[tuple[str, str, str], Score] = {}
        self._lock = threading.Lock()

    # -- splits -----------------------------------------------------------------------------
    @cached_property
    def _columns(self) -> tuple[str, ...]:
        return tuple(c for c in self.layout.items.columns if c != self.layout.id_key)

    def _inputs(self, row: dict[str, Any]) -> dict[str, Any]:
        return {c: row.get(c) for c in self._columns}

    @cached_property
    def _splits(self) -> dict[str, list[dict[str, Any]]]:
        lay = self.layout
        answered = set(lay.answers.ids(lay.answers_id))
        items = [r for r in lay.items.rows if str(r[lay.id_key]) in answered]
        if not lay.training:
            ranked = _rank(self.seed, [str(r[lay.id_key]) for r in items])
            val_ids = set(ranked[: len(items) // 2])
            val = [r for r in items if str(r[lay.id_key]) in val_ids]
            test = [r for r in items if str(r[lay.id_key]) not in val_ids]
            return {"train": [], "val": val, "test": test}
        pool = [r for t in lay.training for r in t.rows]
        ids = [str(r[lay.id_key]) for r in pool]
        if len(set(ids)) != len(ids):
            raise DataError(f"task folder: ids repeat across {lay.root / 'data/training_data'}")
        n_val = min(max(round(len(ids) * self.val_fraction), 1), len(ids) - 1)
        val_ids = set(_rank(self.seed, ids)[:n_val])
        val = [r for r in pool if str(r[lay.id_key]) in val_ids]
        held = {_canon(self._inputs(r)) for r in (*val, *items)}
        train = [
            r
            for r in pool
            if str(r[lay.id_key]) not in val_ids and _canon(self._inputs(r)) not in held
        ]
        return {"train": train, "val": val, "test": items}

    def instances(self, split: Split) -> list[Instance]:
        key = self.layout.id_key
        return [
            Instance(id=str(r[key]), split=split, inputs=self._inputs(r))
            for r in self._splits[split]
        ]

    @cached_property
    def _answers(self) -> dict[str, dict[str, Any]]:
        lay = self.layout
        return {str(r[lay.answers_id]): r for r in lay.answers.rows}

    @cached_property
    def _gold(self) -> dict[tuple[str, str], Any]:
        lay = self.layout
        if not lay.training:
            return {("val", i.id): lay.label_of(self._answers[i.id]) for i in self.instances("val")}
        return {
            (split, str(r[lay.id_key])): lay.label_of(r)
            for split in ("train", "val")
            for r in self._splits[split]
        }

    def label(self, instance: Instance) -> Any:
        if instance.split == "test":
            raise PermissionError("test labels are for the evaluator only")
        return self._gold[(instance.split, instance.id)]

    def _answer_row(self, instance: Instance) -> dict[str, Any]:
        """The item's row in the answers file's shape: its private row, or (a training row)
        one built from its inputs and label."""
        lay = self.layout
        if instance.split == "test" or not lay.training:
            if instance.id not in self._answers:
                raise DataError(f"{lay.answers.path} has no answer for id {instance.id}")
            return self._answers[instance.id]
        typed = next((r[lay.answers_id] for r in lay.answers.rows), instance.id)
        row: dict[str, Any] = {c: "" for c in lay.answers.columns} | dict(instance.inputs)
        row[lay.answers_id] = int(instance.id) if isinstance(typed, int) else instance.id
        gold = self.label(instance)
        row.update(gold if isinstance(gold, dict) else {lay.label_keys[0]: gold})
        return {k: v for k, v in row.items() if k in lay.answers.columns}

    # -- scoring ----------------------------------------------------------------------------
    @cached_property
    def _classes(self) -> list[Any] | None:
        path = self.layout.public / "classes.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        except (OSError, json.JSONDecodeError):
            return None
        return data if isinstance(data, list) else None

    def score(self, instance: Instance, output: Any) -> Score:
        key = (instance.split, instance.id, _canon(output))
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None:
            return cached
        score = self._score(instance, output)
        with self._lock:
            self._cache[key] = score
        return score

    def _score(self, instance: Instance, output: Any) -> Score:
        lay = self.layout
        submission = output.get("submission") if isinstance(output, dict) else None
        pred = output.get("label") if isinstance(output, dict) else output
        if isinstance(pred, str):
            pred = pred.strip()
        valid = submission is not None or (
            pred not in (None, "") and (self._classes is None or pred in self._classes)
        )
        answer = self._answer_row(instance)
        gold = lay.label_of(answer)
        detail: dict[str, Any] = {"prediction": pred, "valid": valid}
        csv_sub = bool(lay.sample) or lay.items.kind == "csv"
        if lay.evaluator is not None and (submission is not None or csv_sub):
            name, text = self._submission(instance, pred, output)
            truth = table_text(lay.answers, [answer])
            reply = self._evaluator.run(lay.answers.path, truth, name, text)
            if not reply.get("ok"):
                log = str(reply.get("log", "")).strip().splitlines()
                tail = f" (last output: {log[-1][:200]})" if log else ""
                raise DataError(f"{lay.evaluator} failed: {reply.get('error')}{tail}")
            facts = dict(reply.get("result") or {})
            value = self._value(facts)
            detail["scorer"] = "evaluator"
            if instance.split != "test":
                detail["evaluator"] = {k: v for k, v in facts.items() if isinstance(v, int | float)}
        else:
            golds = gold.values() if isinstance(gold, dict) else [gold]
            value = 1.0 if any(_same(pred, g) for g in golds) else 0.0
            detail["scorer"] = "exact_match"
        if instance.split != "test":
            detail["gold"] = gold
        correct = value >= 1.0 if self.metric.correct is not None else None
        return Score(value=value, correct=correct, detail=detail)

    def _submission(self, instance: Instance, pred: Any, output: Any) -> tuple[str, str]:
        if isinstance(output, dict) and output.get("submission") is not None:
            name = Path(str(output.get("file") or "submission.json")).name
            return name, json.dumps(output["submission"], ensure_ascii=False)
        id_col, label_col = self.layout.submission_columns
        table = Table(Path("submission.csv"), "csv", (id_col, label_col), ())
        return table.path.name, table_text(table, [{id_col: instance.id, label_col: pred}])

    def _value(self, facts: dict[str, Any]) -> float:
        for name in (self.metric.name, "accuracy", "score", "value"):
            value = facts.get(name)
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
        shown = ", ".join(sorted(facts))[:200]
        raise DataError(
            f"{self.layout.evaluator} returned no {self.metric.name!r}, accuracy or score "
            f"(keys: {shown or 'none'})"
        )

    # -- what the harness sees --------------------------------------------------------------
    def spec(self) -> str:
        text = (self.layout.public / "task.md").read_text(encoding="utf-8")
        lay = self.layout
        return (
            f"{text.rstrip()}\n\n## How sialoop runs this folder\n\n"
            f"Each instance is one item of `{lay.items.path.name}`: `instance['id']` and the "
            f'fields {list(self._columns)}. Output: {{"label": ...}} (the '
            f"`{lay.submission_columns[1]}` column of a submission)"
            + ("" if lay.items.kind == "csv" else ', or {"submission": <the JSON file>}')
            + ". `public/` holds the folder's shared public files and the train rows with "
            "their labels.\n"
        )

    def write_public(self, dest: Path) -> None:
        """The folder's public files but the item file and sample submissions (which list
        every item), and the train rows of each labelled training file under its own name."""
        dest.mkdir(parents=True, exist_ok=True)
        for entry in sorted(self.layout.public.iterdir()):
            if entry == self.layout.items.path or entry.name.startswith("sample_submission"):
                continue
            if entry.is_dir():
                shutil.copytree(entry, dest / entry.name, dirs_exist_ok=True)
            else:
                shutil.copyfile(entry, dest / entry.name)
        key = self.layout.id_key
        train = {str(r[key]) for r in self._splits["train"]}
        for table in self.layout.training:
            rows = [r for r in table.rows if str(r[key]) in train]
            (dest / table.path.name).write_text(table_text(table, rows), encoding="utf-8")

    def private_paths(self) -> list[Path]:
        """data/private and data/training_data (train rows reach a harness via public/ only),
        the targets of symlinks inside them, and the evaluator's staging folder."""
        data = self.layout.root / "data"
        paths = [data / "private", data / "training_data", self._evaluator.staging]
        for folder in paths[:2]:
            if folder.is_dir():
                paths += [p.resolve() for p in folder.rglob("*") if p.is_symlink()]
        return paths

    def reference_harness(self) -> str:
        """The reference agent's source, verbatim, then an adapter block: `FOLDER_VIEW` (how to
        write a one-item dataset view) and `solve`, which runs the agent's `main()` on it via
        `folder_adapter.run_reference_agent`. A DataError when the agent has no `main()`."""
        source = self.layout.agent.read_text(encoding="utf-8")
        try:
            tree = ast.parse(source)
        except SyntaxError as err:
            where = f"line {err.lineno}: {err.msg}"
            raise DataError(f"{self.layout.agent} does not parse: {where}") from None
        if not any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body):
            raise DataError(f"{self.layout.agent} defines no main(): the adapter runs main()")
        view = pprint.pformat(self._view(tree), sort_dicts=False, width=96)
        sep = "" if source.endswith("\n") else "\n"
        return source + sep + _ADAPTER_HEAD + f"FOLDER_VIEW = {view}\n" + _ADAPTER_SOLVE

    def _view(self, tree: ast.Module) -> dict[str, Any]:
        lay = self.layout
        ids = [r[lay.id_key] for r in lay.items.rows]
        sample = None
        if lay.sample:
            table = read_table(lay.public / "sample_submission.csv")
            first = table.rows[0] if table and table.rows else {}
            placeholder = first.get(lay.sample[1], "") if len(lay.sample) > 1 else ""
            sample = {"file": "sample_submission.csv", "columns": list(lay.sample)}
            sample["placeholder"] = placeholder
        id_col, label_col = lay.submission_columns
        return {
            "agent_name": lay.agent.name,
            "input_file": lay.items.path.name,
            "format": lay.items.kind,
            "id_key": lay.id_key,
            "id_type": "int" if all(isinstance(i, int) for i in ids) else "str",
            "columns": list(lay.items.columns),
            "sample_submission": sample,
            "submission": {"file": "submission.csv", "id": id_col, "label": label_col},
            "env_keys": sorted(set(_env_keys(tree)) | set(_ALWAYS_KEYS)),
        }

    def summary(self) -> dict[str, Any]:
        lay, splits = self.layout, self._splits
        scored = len(splits["test"]) + (0 if lay.training else len(splits["val"]))
        pool = sum(len(t.rows) for t in lay.training)
        dropped = pool - len(splits["train"]) - len(splits["val"]) if pool else 0
        return {
            **{split: len(rows) for split, rows in splits.items()},
            "items_without_answers": len(lay.items.rows) - scored,
            "train_rows_dropped_as_duplicates": dropped,
            "item_file": lay.items.path.name,
            "answers_file": lay.answers.path.name,
            "scorer": "evaluator" if lay.evaluator else "exact_match",
        }


def _env_keys(tree: ast.Module) -> list[str]:
    """String literals the agent looks up in the environment that name a key or token."""
    names = []
    for node in ast.walk(tree):
        arg = None
        if isinstance(node, ast.Call) and node.args and isinstance(node.func, ast.Attribute):
            if node.func.attr in ("get", "getenv", "setdefault", "pop"):
                arg = node.args[0]
        elif isinstance(node, ast.Subscript):
            arg = node.slice
        value = arg.value if isinstance(arg, ast.Constant) else None
        if isinstance(value, str) and value.isupper() and any(w in value for w in _KEY_WORDS):
            names.append(value)
    return names


_ADAPTER_HEAD = """

# ---- sialoop folder adapter --------------------------------------------------------------------
# Appended by sialoop.tasks.folder; everything above is the folder's reference agent, verbatim.
# solve() runs its main() on a dataset view holding one item (plus the public files and train
# rows), with every OpenAI/Anthropic client it builds routed to the policy endpoint.
from sialoop.tasks.folder_adapter import run_reference_agent as _sialoop_run_reference_agent

"""

_ADAPTER_SOLVE = """

def solve(instance, llm):
    return _sialoop_run_reference_agent(main, globals(), instance, llm, FOLDER_VIEW)
"""
