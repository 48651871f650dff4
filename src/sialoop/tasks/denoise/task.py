"""scRNA-seq denoising, scored as OpenProblems scores it: a program task whose score is the
mse_norm of the matrix a program returns, under the rule that closes the scale shortcut.

Data: every `<name>_counts.npz` (scipy.sparse, cells x genes, integer UMI counts) in the data
root's `scrna/`, read in place. One dataset is the headline (Tabula Muris when present, else
the first by name); each dataset is one instance.

Splits (molecular cross-validation, `metrics.mcv_split`):
- each dataset's counts are split once with the task's seed: `outer.train` (0.9 of the counts)
  and `outer.test` (the rest), which only the evaluator scores, once, at the end;
- val: a second MCV split of the headline's `outer.train` (seed + 1): a program gets its 0.9
  and is scored on the remaining 0.1;
- train: a third split of the same (seed + 2), for evidence and rewards;
- test: the headline (role "headline") with `outer.train` as input, and every other dataset
  (role "transfer": reported beside it, never in the split's value, never selected on).

A harness answers `{"program": source}`, Python defining `denoise(counts) -> ndarray`; a file
that defines `denoise` and no `solve` is its own program (`adapt_harness`). The program runs in
an isolated worker (`harness.runtime.ProgramRunner` behind `runner.py`): the input half goes in
as an `.npy` file in the worker's read-only public dir, the output comes back as one in its
scratch dir. The held-out half stays in this process; the data folder is unreadable to
harnesses and programs (`private_paths`, the workers' deny list), because the raw counts minus
the input are the held-out half.

Score: `value` = mse_norm when the output is valid under our rule (metrics.evaluate: finite,
non-negative, the right shape, some mass, poisson_norm >= 0.97 at the train matrix's mass);
an invalid output raises `ProgramFailed` with its figures, so it has no score (never 0).
`units`: per-cell mse_norm contributions, which the gate pairs cell by cell (a paired
bootstrap). `detail`: every figure of `evaluate` (poisson both ways, upstream's validity, the
raw mass ratio), the two shortcut outputs' verdicts under our rule (all zeros; the output
x 1e-3), the program's seconds, the dataset and its role.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from importlib.resources import files
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp

from sialoop.errors import DataError
from sialoop.harness.runtime import ProgramFailed, ProgramRunner, Workspace, self_solving
from sialoop.harness.sandbox import SandboxLimits
from sialoop.paths import default_data_root
from sialoop.records import Score
from sialoop.tasks.base import Instance, Metric, Split, Task
from sialoop.tasks.denoise.metrics import Controls, dense, evaluate, mcv_split
from sialoop.tasks.templates import template_source

FOLDER = "scrna"
HEADLINE = "tabula_muris_droplet_3ch"
SUFFIX = "_counts.npz"
_MAX_PROGRAM_CHARS = 200_000
_WORK_PREFIX = "sialoop-denoise-"

SPEC = """# scRNA-seq denoising (OpenProblems' task, molecular cross-validation)

Output `{"program": source}`: Python defining `denoise(counts)`. `counts` is a float64 numpy
array of integer UMI counts, cells x genes: the input half of a molecular cross-validation
split (every count u of the original matrix was split into Binomial(u, 0.9) for the input and
the rest, held out; a held-out sample holds about 1/9 of the input's counts). Return a
non-negative float array of the same shape: the denoised expression.

Score (higher is better): mse_norm = (mse(no denoising) - mse(output)) / (mse(no denoising)
- mse(perfect)), clipped to [0, 1], where mse is the mean squared difference between the
held-out counts and the output after each cell is scaled to 10,000 counts and log1p'd
(no denoising: the input itself; perfect: the held-out counts). Valid only when the output is
finite, non-negative, of the right shape, not all zero, and its poisson_norm is at least 0.97
once the output is rescaled to the input's total mass: poisson = mean(held - scaled *
log(held + 1e-6)), normalised by the same two controls. The rescaling makes a global scale of
the output neither help nor hurt; mass placed where the held-out count is 0 costs about 13.8 a
unit. An invalid output has no score. The program runs in an isolated worker with numpy,
scipy, scikit-learn and graphtools, without network, data files or LLM.
"""


def data_folder(data: Path | None) -> Path:
    root = Path(data) if data is not None else default_data_root()
    folder = root / FOLDER
    if not folder.is_dir() or not any(folder.glob(f"*{SUFFIX}")):
        raise DataError(
            f"no denoising data: {folder} holds no *{SUFFIX}; pass --data PATH (the folder "
            f"holding {FOLDER}/<name>{SUFFIX})"
        )
    return folder


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class _Case:
    """One scored problem: the input half a program sees and the held-out half's controls."""

    def __init__(self, name: str, role: str, train: sp.csr_matrix, heldout: sp.csr_matrix):
        self.name, self.role = name, role
        self.train = train
        self._heldout = heldout
        self._controls: Controls | None = None

    @property
    def controls(self) -> Controls:
        if self._controls is None:
            from sialoop.tasks.denoise.metrics import Split as McvSplit

            self._controls = Controls.of(McvSplit(self.train, self._heldout, np.array([])))
        return self._controls


class DenoiseTask(Task):
    """See the module docstring. Keywords: `data` (the root holding scrna/), `seed` (the
    split seed), `timeout_s` and `memory_mb` per program worker, `isolation`, `threads` (BLAS
    and OpenMP threads of a program; 0: every CPU this process may use)."""

    name = "denoise"
    metric = Metric(name="mse_norm", direction="higher", correct=None, failure_value=None)
    noise = "units"
    config_defaults: ClassVar[dict[str, Any]] = {
        "split": {"val_size": 0, "holdout_size": 0},
        "sandbox": {"workers": 1, "timeout_s": 900.0, "memory_mb": 16384, "file_size_mb": 4096},
        # A candidate costs about half a minute on Tabula Muris: many generations, and a
        # patient stop rule for a dozen knobs.
        "loop": {"minutes": 25.0, "generations": 60, "train_batch": 4, "train_items": 8},
        "agents": {"harness_minutes": 0.7, "max_rejections": 12},
    }

    def __init__(
        self,
        data: Path | None = None,
        seed: int = 0,
        timeout_s: float = 900.0,
        memory_mb: int = 16384,
        isolation: str = "auto",
        threads: int = 0,
    ):
        self.folder = data_folder(data)
        self.seed = seed
        self.threads = threads or _cpus()
        names = sorted(p.name[: -len(SUFFIX)] for p in self.folder.glob(f"*{SUFFIX}"))
        self.headline = HEADLINE if HEADLINE in names else names[0]
        self._cases: dict[str, _Case] = {}
        self._instances: dict[Split, list[Instance]] = {"train": [], "val": [], "test": []}
        for name in [self.headline, *(n for n in names if n != self.headline)]:
            outer = mcv_split(self._load(name), seed)
            role = "headline" if name == self.headline else "transfer"
            self._add("test", name, role, outer.train, outer.test)
            if role == "headline":
                for split, offset in (("val", 1), ("train", 2)):
                    inner = mcv_split(outer.train, seed + offset)
                    self._add(split, name, role, inner.train, inner.test)
        self._workspace = Workspace(_WORK_PREFIX)
        self._deny = (self.folder, self._workspace.dir / "private")
        self._limits = SandboxLimits(
            timeout_s=timeout_s, startup_timeout_s=120.0, setup_timeout_s=120.0,
            memory_mb=memory_mb, file_size_mb=4096, max_log_bytes=8_000, max_start_failures=1,
        )  # fmt: skip
        self._isolation = isolation
        self._lock = threading.Lock()
        self._runtime = ThreadPoolExecutor(1, thread_name_prefix="denoise-runtime")
        self._program: tuple[str, ProgramRunner] | None = None
        self._scores: dict[tuple[str, str], Score] = {}
        atexit.register(self.close)

    def _load(self, name: str) -> sp.csr_matrix:
        path = self.folder / f"{name}{SUFFIX}"
        try:
            return sp.csr_matrix(sp.load_npz(path))
        except (OSError, ValueError) as err:
            raise DataError(f"cannot read {path}: {err}; it must be a scipy.sparse .npz") from None

    def _add(self, split: Split, name: str, role: str, train: Any, heldout: Any) -> None:
        iid = f"{split}-{len(self._instances[split])}"
        self._cases[iid] = _Case(name, role, train, heldout)
        cells, genes = train.shape
        inputs = {"dataset": name, "role": role, "cells": cells, "genes": genes,
                  "counts": int(train.sum())}  # fmt: skip
        self._instances[split].append(Instance(id=iid, split=split, inputs=inputs))

    # ---- the Task interface ---------------------------------------------------------------------

    def spec(self) -> str:
        return SPEC

    def instances(self, split: Split) -> list[Instance]:
        return list(self._instances[split])

    def label(self, instance: Instance) -> None:
        """A measurement task has no gold answer: None for train and val; test is refused."""
        if instance.split == "test":
            raise PermissionError("test labels are for the evaluator only")
        return None

    def reference_harness(self) -> str:
        return template_source(__package__, "pipeline.py")

    def private_paths(self) -> list[Path]:
        return [self.folder]

    def write_public(self, dest: Path) -> None:
        """The spec, the train split, and for generator harnesses the pipeline template with
        its knobs' choices (`program_template.py`, `program_knobs.json`)."""
        import json

        from sialoop.harness.knobs import read_declarations

        super().write_public(dest)
        template = template_source(__package__, "pipeline.py")
        (dest / "program_template.py").write_text(template)
        knobs = read_declarations(template).knobs
        (dest / "program_knobs.json").write_text(
            json.dumps({name: list(k.choices) for name, k in knobs.items()})
        )

    def adapt_harness(self, source: str) -> str:
        return self_solving(source, "denoise")

    def counts_toward_score(self, instance: Instance) -> bool:
        """Transfer datasets are reported beside the headline and never counted: an invalid
        output on one of them is its own figure, not the split's failure."""
        return self._cases[instance.id].role != "transfer"

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {s: len(self._instances[s]) for s in ("train", "val", "test")}
        shapes = {i.inputs["dataset"]: [i.inputs["cells"], i.inputs["genes"]]
                  for i in self._instances["test"]}  # fmt: skip
        return out | {"headline": self.headline, "datasets": shapes, "split_seed": self.seed}

    def control(self, instance: Instance, which: str) -> dict[str, Any]:
        """The figures of a control on `instance` ("no_denoising": the input half itself;
        "perfect": the held-out counts), scored here: a control is the evaluator's own."""
        case = self._cases[instance.id]
        c = case.controls
        if which not in ("no_denoising", "perfect"):
            raise ValueError(f"unknown control {which!r}: no_denoising or perfect")
        figures = evaluate(dense(case.train) if which == "no_denoising" else c.test, c)
        figures.pop("units", None)
        return figures

    # ---- scoring ----------------------------------------------------------------------------

    def score(self, instance: Instance, output: Any) -> Score:
        source = output.get("program") if isinstance(output, dict) else output
        if not isinstance(source, str) or not source.strip():
            raise ValueError('the output holds no program: expected {"program": "<source>"}')
        if len(source) > _MAX_PROGRAM_CHARS:
            raise ValueError(f"the program is longer than {_MAX_PROGRAM_CHARS} characters")
        digest = hashlib.sha256(source.encode()).hexdigest()
        # Workers die with the thread that started them: the task's own thread owns them, and
        # one program runs at a time, with every CPU.
        return self._runtime.submit(self._score_once, instance, source, digest).result()

    def _score_once(self, instance: Instance, source: str, digest: str) -> Score:
        with self._lock:
            key = (digest, instance.id)
            if key not in self._scores:
                case = self._cases[instance.id]
                try:
                    self._scores[key] = self._measure(instance.id, case, source, digest)
                except ProgramFailed as err:
                    raise ProgramFailed(f"{case.name}: {err}", err.figures) from None
            return self._scores[key]

    def _measure(self, iid: str, case: _Case, source: str, digest: str) -> Score:
        name = f"{iid}.npy"
        np.save(self._workspace.exchange / name, dense(case.train), allow_pickle=False)
        try:
            reply, wall, workdir = self._runner(digest, source).call(
                {"input": name, "threads": self.threads}
            )
            try:
                out = np.load(workdir / "out.npy", allow_pickle=False)
            except (OSError, ValueError) as err:
                raise ProgramFailed(f"the output cannot be read: {err}") from None
            finally:
                (workdir / "out.npy").unlink(missing_ok=True)
        finally:
            (self._workspace.exchange / name).unlink(missing_ok=True)
        figures = evaluate(out, case.controls)
        why, units = figures.pop("why"), figures.pop("units", None)
        if not figures["valid"]:
            raise ProgramFailed(f"invalid output: {why}", figures)
        detail: dict[str, Any] = {
            "dataset": case.name, "role": case.role, **figures, "units": units,
            "seconds": reply.get("seconds"), "import_s": reply.get("import_s"),
            "wall_s": wall, "threads": reply.get("threads"),
            "shortcuts": _shortcuts(out, case.controls, figures["mse_norm"]),
        }  # fmt: skip
        # the worker's wall, start-up included: what running this denoiser costs the loop
        return Score(value=figures["mse_norm"], detail=detail, seconds=wall)

    def _runner(self, digest: str, source: str) -> ProgramRunner:
        if self._program is not None and self._program[0] != digest:
            self._program[1].close()
            self._program = None
        if self._program is None:
            wrapper = (files(__package__) / "runner.py").read_text(encoding="utf-8")
            runner = ProgramRunner(
                wrapper, source, self._workspace, self._limits, self._isolation, self._deny,
                tag="denoise",
            )  # fmt: skip
            self._program = (digest, runner)
        return self._program[1]

    def close(self) -> None:
        """Stop the worker and delete the exchange files (also at exit)."""
        if self._program is not None:
            self._program[1].close()
            self._program = None
        self._workspace.close()
        shutil.rmtree(self._workspace.dir, ignore_errors=True)


def _shortcuts(out: np.ndarray, controls: Controls, mse_norm: float) -> dict[str, Any]:
    """What the two known shortcuts score under our rule: all zeros, and this output x 1e-3."""
    zeros = evaluate(np.zeros_like(out), controls)
    scaled = evaluate(out * 1e-3, controls)
    return {
        "zeros_valid": zeros["valid"],
        "scaled_1e-3_valid": scaled["valid"],
        "scaled_1e-3_mse_norm": scaled.get("mse_norm"),
        "scaled_equals_unscaled": bool(np.isclose(scaled.get("mse_norm", -1.0), mse_norm)),
    }
