"""Start the policy endpoint a run's config asks for and hand back its URL.

The URL is what harness workers get; the endpoint's keys (its admin token and its episode gate,
see `sialoop.policy.server`) stay in this process, found by URL through `admin_headers` and
`live_episode` while a `PolicyServer` serves it.
"""

from __future__ import annotations

import threading
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
    from sialoop.policy.server import PolicyServer

# The endpoints this process serves, by URL: the parent's own keys, never sent to a worker.
_SERVED: dict[str, PolicyServer] = {}
_SERVED_LOCK = threading.Lock()


def _key(url: str) -> str:
    return url.rstrip("/").removesuffix("/v1")


def served_here(server: PolicyServer) -> None:
    with _SERVED_LOCK:
        _SERVED[_key(server.url)] = server


def not_served_here(server: PolicyServer) -> None:
    with _SERVED_LOCK:
        if _SERVED.get(_key(server.url)) is server:
            del _SERVED[_key(server.url)]


def _served(policy_url: str) -> PolicyServer | None:
    with _SERVED_LOCK:
        return _SERVED.get(_key(policy_url))


def admin_headers(policy_url: str) -> dict[str, str]:
    """The admin token's header for the endpoint at `policy_url`, if this process serves it
    (otherwise none: the admin routes then refuse the call)."""
    server = _served(policy_url)
    return server.admin_headers() if server is not None else {}


@contextmanager
def live_episode(policy_url: str | None, episode_id: str) -> Iterator[str]:
    """Open `episode_id` on the endpoint's gate for the block; yields the episode header value
    to hand the harness (`episode_id` itself for an endpoint this process does not serve)."""
    server = _served(policy_url) if policy_url is not None else None
    if server is None:
        yield episode_id
        return
    value = server.episodes.open(episode_id)
    try:
        yield value
    finally:
        server.episodes.close(episode_id)


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
EXTERNAL = "external"  # any OpenAI-compatible URL, inference only (policy/external.py)


def trainable(cfg: PolicyConfig) -> bool:
    """Whether the policy can take a trained adapter (the weights lever)."""
    return cfg.backend != EXTERNAL


def policy_backend(cfg: PolicyConfig) -> PolicyBackend:
    if cfg.backend not in BACKENDS:
        raise ConfigError(
            f"policy.backend '{cfg.backend}' is unknown: use one of {', '.join(BACKENDS)}"
        )
    return BACKENDS[cfg.backend](cfg)


def _loaded_backend(cfg: PolicyConfig, adapters: dict[str, Path]) -> PolicyBackend:
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    backend = policy_backend(cfg)
    for name, path in adapters.items():
        backend.add_adapter(name, path)
    return backend


@contextmanager
def serve_policy(
    cfg: PolicyConfig, recorder: Recorder, adapters: dict[str, Path] | None = None
) -> Iterator[str]:
    """Run the endpoint on a free loopback port for the duration of the block; yields its URL.
    Its admin token (drawn by `PolicyServer`) is reached with `admin_headers(url)`."""
    from sialoop.policy.compute import run_compute
    from sialoop.policy.server import PolicyServer

    if cfg.backend == EXTERNAL:
        from functools import partial

        from sialoop.policy.external import create_proxy_app, upstream_for

        proxy = partial(create_proxy_app, upstream_for(cfg))
        with PolicyServer(None, recorder, make_app=proxy) as server:
            yield server.url
        return
    backend = run_compute(_loaded_backend, cfg, adapters or {})
    with PolicyServer(backend, recorder) as server:
        yield server.url
