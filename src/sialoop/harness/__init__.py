"""Harness programs and the sandbox that runs them.

- `program`: `load_harness`, `validate_harness`, `HarnessInvalid`.
- `sandbox`: `Sandbox`, `SandboxLimits`, `SandboxResult` (what is and is not contained).
- `worker`: the sandbox's child process (`python -m sialoop.harness.worker`).
- `kit`: building blocks a harness may import; `templates/`: generation-0 harnesses.

Nothing is imported here, so that running the worker with `-m` does not import it twice.
"""
