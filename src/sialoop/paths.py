"""Where sialoop keeps files that outlive a run: the model cache."""

import os
from pathlib import Path


def sialoop_home() -> Path:
    """`$SIALOOP_HOME`, else `~/.cache/sialoop`."""
    return Path(os.environ.get("SIALOOP_HOME", Path.home() / ".cache" / "sialoop")).expanduser()


def default_data_root() -> Path:
    """`$SIALOOP_DATA`, else `../shared/data` next to the working directory's project."""
    env = os.environ.get("SIALOOP_DATA")
    if env:
        return Path(env).expanduser()
    return Path("../shared/data")
