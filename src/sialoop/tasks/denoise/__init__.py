"""scRNA-seq denoising (OpenProblems' task): a program task scored by mse_norm under the rule
that closes the scale shortcut. See task.py and metrics.py."""

from sialoop.harness.runtime import ProgramFailed
from sialoop.tasks.denoise.task import DenoiseTask

__all__ = ["DenoiseTask", "ProgramFailed"]
