"""One typed `RunConfig`, read from TOML and overridden by CLI flags.

An unknown key, a wrong type or a missing path is a `ConfigError` whose one-line message names
the key and the fix; nothing falls back silently to a default.
"""

from __future__ import annotations

import difflib
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sialoop.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PolicyConfig(_Section):
    # the policy backend (policy/launch.py BACKENDS): "hf" (transformers + peft), or "external":
    # any OpenAI-compatible URL, inference only (the weights lever is then unavailable)
    backend: str = "hf"
    url: str | None = None  # external: the base URL, e.g. http://127.0.0.1:8000/v1
    served_model: str = "auto"  # external: the model to ask for; "auto": the first listed
    key_env: str | None = None  # external: the variable holding its key (None: no key)
    timeout_s: float = Field(default=300.0, gt=0)  # external: per forwarded request
    model: str = "embedded"  # "embedded" (Gemma 3 270M base) or a local HF model directory
    # "auto": bfloat16 where the hardware computes it natively, else float32 (policy/dtype.py)
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    max_batch: int = Field(default=8, ge=1, le=256)
    threads: int = Field(default=0, ge=0)  # 0: torch's default


class SplitConfig(_Section):
    val_fraction: float = Field(default=0.1, gt=0.0, lt=0.5)
    val_size: int = Field(default=150, ge=0)  # val items scored per version; 0 = all of val
    # val items the search never sees, scored once for the best version at the end (0: none)
    holdout_size: int = Field(default=100, ge=0)
    test_size: int = Field(default=0, ge=0)  # 0 = the whole test split


class SandboxConfig(_Section):
    runtime: str = "subprocess"  # the harness runtime (harness/runtimes.py)
    # "auto": Linux namespaces via bubblewrap where available, else the audit guard with a
    # warning; "namespaces" is an error where unavailable; "guard" is no security boundary
    isolation: Literal["auto", "namespaces", "guard"] = "auto"
    workers: int = Field(default=2, ge=1, le=64)
    timeout_s: float = Field(default=60.0, gt=0)  # per item, once the worker is ready
    # a harness's one-time `setup()` each time a worker starts (an import, a fitted model)
    setup_timeout_s: float = Field(default=600.0, gt=0)
    # an evaluation whose items failed for the machine's reasons (after one retry) above this
    # share is marked degraded, and the gate refuses to decide on it
    degraded_share: float = Field(default=0.1, ge=0, le=1)
    memory_mb: int = Field(default=4096, ge=256)
    file_size_mb: int = Field(default=64, ge=1)
    max_processes: int = Field(default=64, ge=1)


class LoopConfig(_Section):
    generations: int = Field(default=8, ge=0)  # generations after generation 0
    minutes: float = Field(default=9.0, ge=0)  # wall budget of those generations
    train_batch: int = Field(default=48, ge=2)  # train items rolled out per generation
    train_items: int = Field(default=96, ge=2)  # train items whose prompts feed the trainer
    levers: tuple[Literal["harness", "weights"], ...] = Field(
        default=("harness", "weights"), min_length=1
    )  # the levers the Feedback-Agent may pull (one of them for a harness- or weights-only run)
    lever_patience: int = Field(default=2, ge=1)  # rejections in a row before a lever yields
    samples: int = Field(default=1, ge=1, le=64)  # k rollouts per train instance (a group)


class GateConfig(_Section):
    alpha: float = Field(default=0.1, gt=0, lt=1)  # one-sided p-value to accept
    # A better candidate's gain must exceed this, in the metric's units and direction.
    min_gain: float = Field(default=0.0, ge=0)
    # A cheaper candidate may be worse by at most this share of the incumbent's |score|.
    noninferiority_margin: float = Field(default=0.01, ge=0, lt=1)
    # ... and must cost at most (1 - cheaper) of the incumbent's seconds per item.
    cheaper: float = Field(default=0.2, gt=0, lt=1)
    # How scores pair: "task" (the task's declared noise model), "items" or "units".
    noise: Literal["task", "items", "units"] = "task"
    # The adaptive gate (sialoop/sequential.py): an undecided candidate (p between the look's
    # alpha and `undecided`) is scored with the incumbent on more val items, at most
    # `widen_looks` more times, up to `widen_to` val items (0: every val item outside the
    # holdout); alpha is spent over the looks so the overall false-acceptance rate stays alpha.
    # `undecided` 1.0: every candidate not accepted widens.
    widen_looks: int = Field(default=2, ge=0)  # 0: the single-look gate
    widen_to: int = Field(default=0, ge=0)
    undecided: float = Field(default=0.3, gt=0, le=1)
    spending: Literal["pocock", "obrien-fleming"] = "pocock"


class LLMAgentConfig(_Section):
    """An LLM behind one agent: a shipped profile (agents/profiles.py) and what overrides it, or
    a whole table. The key is never in config: `key_env` names the environment variable that
    holds it (None: the server needs none, as a local vLLM or llama.cpp server)."""

    profile: str | None = None
    provider: Literal["openai", "anthropic"] | None = None  # openai: any compatible URL
    model: str | None = None  # "auto": the first model the server lists
    base_url: str | None = None  # None: the SDK's own (its *_BASE_URL variable, else the cloud)
    key_env: str | None = None
    timeout_s: float = Field(default=120.0, gt=0)  # per request
    retries: int = Field(default=3, ge=0)  # on 429, 5xx, a timeout or a dropped connection
    backoff_s: float = Field(default=1.0, ge=0)  # first wait; doubles, capped at 30 s
    max_tokens: int = Field(default=4096, ge=16)
    temperature: float | None = Field(default=None, ge=0, le=2)  # None: the model's default
    structured: bool = True  # decisions as JSON-schema structured output (off: JSON in text)
    usd_per_mtok_in: float | None = Field(default=None, ge=0)  # prices, for a dollar budget
    usd_per_mtok_out: float | None = Field(default=None, ge=0)


class AgentsConfig(_Section):
    # Each agent: "offline" (the default), a shipped LLM profile's name (openai, anthropic,
    # openrouter, vllm, llamacpp, ollama), a table, or a plug-in's package.module:attr.
    feedback: str | LLMAgentConfig = "offline"  # the Feedback-Agent (agents/registry.py)
    meta: str | LLMAgentConfig = "offline"  # the Meta-Agent
    # What the LLM agents may spend in one run, both together (0: no limit). Once spent, the
    # offline agents take over; the run goes on.
    budget_tokens: int = Field(default=0, ge=0)
    budget_usd: float = Field(default=0.0, ge=0)
    # Trajectories an LLM agent reads per prompt (failures first), and past edits it is shown.
    sample_trajectories: int = Field(default=6, ge=0, le=64)
    history_edits: int = Field(default=8, ge=0, le=64)
    # The first guess of one attempt's minutes, per lever; once the lever has history on this
    # run, the run's own measured costs replace it.
    harness_minutes: float = Field(default=1.5, gt=0)
    sft_minutes: float = Field(default=3.5, gt=0)
    grpo_minutes: float = Field(default=7.0, gt=0)
    # Candidates rejected in a row (both levers) before the Feedback-Agent stops the run: a
    # task with a large knob space and cheap candidates sets more.
    max_rejections: int = Field(default=5, ge=1)


class TrainConfig(_Section):
    rank: int = Field(default=16, ge=1)
    alpha: float = Field(default=32.0, gt=0)
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    lr: float = Field(default=2e-4, gt=0)
    batch_size: int = Field(default=4, ge=1)
    max_steps: int = Field(default=24, ge=1)
    max_len: int = Field(default=640, ge=16)
    checkpoint_every: int = Field(default=10, ge=0)
    kl_coef: float = Field(default=0.04, ge=0)  # GRPO and PPO: the KL to the starting policy
    beta: float = Field(default=0.1, gt=0)  # DPO
    gamma: float = Field(default=1.0, ge=0, le=1)  # PPO: the discount over completion tokens
    lam: float = Field(default=0.95, ge=0, le=1)  # PPO: GAE's lambda
    clip: float = Field(default=0.2, gt=0, lt=1)  # PPO: the ratio's clip range
    vf_coef: float = Field(default=0.1, ge=0)  # PPO: the value loss's weight


class RunConfig(_Section):
    # a built-in or entry-point name, path/to/file.py:Class or package.module:Class
    task: str | None = None
    task_dir: Path | None = None  # a task folder in SIA's layout (instead of `task`)
    data: Path | None = None  # the data root; None: each task's own search (e.g. ../shared/data)
    runs_dir: Path = Path("runs")
    seed: int = 0
    eval_test: bool = True  # score the best version on test at the end of `run`
    harness: Path | None = None  # generation-0 harness file; None: the task's reference harness
    policy: PolicyConfig = PolicyConfig()
    split: SplitConfig = SplitConfig()
    sandbox: SandboxConfig = SandboxConfig()
    loop: LoopConfig = LoopConfig()
    gate: GateConfig = GateConfig()
    train: TrainConfig = TrainConfig()
    agents: AgentsConfig = AgentsConfig()


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += _known_keys(ann, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def known_keys() -> list[str]:
    """Every dotted key of RunConfig, in declaration order."""
    return _known_keys(RunConfig)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{dotted}': '{part}' is not a section")
    node[parts[-1]] = value


def nearest_key(key: str) -> str | None:
    """The known dotted key closest to `key` (a typo, or a key put in the wrong section)."""
    known = _known_keys(RunConfig)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return close[0]
    leaf = key.rsplit(".", 1)[-1]
    by_leaf = {k.rsplit(".", 1)[-1]: k for k in known}
    close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.75)
    return by_leaf[close[0]] if close else None


def unknown_key_message(key: str) -> str:
    near = nearest_key(key)
    if near is not None:
        return f"unknown config key '{key}': did you mean '{near}'?"
    known = ", ".join(_known_keys(RunConfig))
    return f"unknown config key '{key}': remove it or use one of: {known}"


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        value = first.get("input")
        if isinstance(value, dict) and value:  # an unknown section: name one key inside it
            key = f"{key}.{next(iter(value))}"
        return unknown_key_message(key)
    return (
        f"config key '{key}': {first['msg']} (got {first.get('input')!r}); fix the TOML or the flag"
    )


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` from `--set`; the value is read as TOML when it parses, else as a string."""
    if "=" not in text:
        raise ConfigError(f"--set '{text}': expected key=value, e.g. --set split.val_size=100")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def read_toml(path: Path) -> dict[str, Any]:
    """The TOML file `path` as a tree; a missing file, a folder, non-UTF-8 text or bad TOML is
    one line naming the file and the fix."""
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder: pass a TOML file with --config")
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist: pass an existing --config")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
            f"{err.start}): save it as UTF-8"
        ) from None
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read ({err.strerror}): fix it") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None


def validate_tree(tree: dict[str, Any], overrides: dict[str, Any] | None = None) -> RunConfig:
    """Apply dotted `overrides` to a config tree and validate keys and types (no path is
    looked at); errors are one line."""
    known = set(_known_keys(RunConfig))
    sections = {k.split(".", 1)[0] for k in known if "." in k}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in known and key not in sections:
            raise ConfigError(unknown_key_message(key))
        _set_dotted(tree, key, value)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_one_line(err)) from None


def config_from_tree(tree: dict[str, Any], overrides: dict[str, Any] | None = None) -> RunConfig:
    """`validate_tree`, then the paths it names exist; file paths become absolute."""
    config = validate_tree(tree, overrides)
    if config.task_dir is not None and not config.task_dir.is_dir():
        raise ConfigError(f"--task-dir {config.task_dir} is not a folder: pass a task folder")
    if config.harness is not None and not config.harness.exists():
        raise ConfigError(f"config key 'harness': {config.harness} does not exist; fix the path")
    if config.policy.model != "embedded" and not Path(config.policy.model).is_dir():
        raise ConfigError(
            f"config key 'policy.model': {config.policy.model} is not a model directory; "
            "use 'embedded' or a local Hugging Face model folder"
        )
    if config.task is None and config.task_dir is None:
        raise ConfigError("no task: pass --task NAME (see `sialoop tasks`) or --task-dir DIR")
    update: dict[str, Any] = {}
    if config.task and ".py:" in config.task:  # a file task: resume may run from elsewhere
        where, attr = config.task.rsplit(":", 1)
        update["task"] = f"{Path(where).resolve()}:{attr}"
    if config.task_dir is not None:
        update["task_dir"] = config.task_dir.resolve()
    if config.harness is not None:
        update["harness"] = config.harness.resolve()
    return config.model_copy(update=update) if update else config


def _merged(defaults: dict[str, Any], tree: dict[str, Any]) -> dict[str, Any]:
    out = dict(defaults)
    for key, value in tree.items():
        below = out.get(key)
        out[key] = (
            _merged(below, value) if isinstance(below, dict) and isinstance(value, dict) else value
        )
    return out


def with_task_defaults(tree: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """`tree` over the `config_defaults` of the task it (or `overrides`) names: a task states
    the limits and budget it needs, and a config file or --set still wins."""
    name = (overrides or {}).get("task") or tree.get("task")
    if not isinstance(name, str) or not name:
        return tree
    from sialoop.tasks.registry import resolve_task_class

    defaults = getattr(resolve_task_class(name), "config_defaults", None) or {}
    return _merged(defaults, tree) if defaults else tree


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read `path` (TOML) if given, under the named task's `config_defaults`, apply dotted
    `overrides`, validate; errors are one line."""
    tree = read_toml(path) if path is not None else {}
    return config_from_tree(with_task_defaults(tree, overrides), overrides)
