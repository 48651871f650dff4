"""Start the policy endpoint a run's config asks for and hand back its URL."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from sialoop.config import PolicyConfig
from sialoop.errors import ConfigError, PolicyError
from sialoop.policy.dtype import resolve_dtype
from sialoop.policy.recorder import Recorder

if TYPE_CHECKING:
    from sialoop.policy.batcher import PolicyBackend


def resolve_model_dir(cfg: PolicyConfig) -> Path:
    """The model folder: the embedded Gemma 3 270M (built and cached once) or a local folder."""
    if cfg.model == "embedded":
        from sialoop.policy.model_files import embedded_model_dir

        return embedded_model_dir()
    path = Path(cfg.model)
    if not (path / "config.json").exists():
        raise PolicyError(f"{path} has no config.json: set policy.model to a HF model folder")
    return path


def _hf_backend(cfg: PolicyConfig) -> PolicyBackend:
    from sialoop.policy.hf import HFBackend

    return HFBackend(
        resolve_model_dir(cfg), dtype=resolve_dtype(cfg.dtype), max_batch=cfg.max_batch
    )


# Backends by name (`policy.backend`); each builds a `PolicyBackend` from the config.
BACKENDS: dict[str, Callable[[PolicyConfig], PolicyBackend]] = {"hf": _hf_backend}


def policy_backend(cfg: PolicyConfig) -> PolicyBackend:
    if cfg.backend not in BACKENDS:
        raise ConfigError(
            f"policy.backend '{cfg.backend}' is unknown: use one of {', '.join(BACKENDS)}"
        )
    return BACKENDS[cfg.backend](cfg)


@contextmanager
def serve_policy(
    cfg: PolicyConfig, recorder: Recorder, adapters: dict[str, Path] | None = None
) -> Iterator[str]:
    """Run the endpoint on a free loopback port for the duration of the block; yields its URL."""
    import torch

    from sialoop.policy.server import PolicyServer

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    backend = policy_backend(cfg)
    for name, path in (adapters or {}).items():
        backend.add_adapter(name, path)
    with PolicyServer(backend, recorder) as server:
        yield server.url
