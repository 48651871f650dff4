"""TriMul (GPU MODE's `trimul`): a program task whose score is a kernel's measured speedup.

An instance is one shape of `shapes.json` (read in place from the data root's `trimul/`); a
harness answers with a program, `{"program": source}`, defining GPU MODE's entry point
`custom_kernel(data)` with `data = (input, mask, weights, config)`. A harness file that defines
`custom_kernel` and no `solve` is its own program (`Task.adapt_harness`): a GPU MODE submission
runs unchanged, and the best version can be submitted as it is.

Splits: train, the test shapes up to `small` tokens a side (evidence and GRPO rewards: cheap);
val, the 7 benchmark shapes; test, the benchmark shapes under both input distributions, plus
every test shape checked for correctness only (role "check"), scored once at the end.

How a program is measured (`score`): never in this process. A trusted runtime does it:
- The parent draws each instance's seed from the OS's randomness when the task is built, makes
  the inputs (`reference.generate_input`), and computes the reference output once per seed by
  running the eager float32 reference in a worker of its own (cached for the task's life).
- The candidate runs in an isolated worker (`Sandbox`: the wrapper `runner.py` with the program
  beside it; no policy endpoint, no network, the task's memory and file limits, an
  oom_score_adj that makes the worker the OOM killer's choice), one worker per program, kept
  for the instances of one evaluation. Tensors travel as raw float32 files: inputs in the
  worker's read-only `public/`, the output in its scratch dir.
- One warm-up run on the seed's input, checked elementwise against the reference (its time,
  with the import, is reported and never timed). Then `reps` timed runs, each on a fresh input:
  the same problem with rows, columns and batch renumbered by a permutation the parent draws
  from the OS's randomness (the operator is equivariant, so the permuted reference is a
  gather). Every output is checked; a kernel that caches or predicts outputs fails.
- The reference is timed in the same evaluation (`ref_reps` runs, interleaved with the
  candidate's, one kernel at a time whatever `sandbox.workers` says: scoring holds a lock);
  its times join a per-machine cache, whose median is the time a speedup divides.
- The wrapper's own clock (`kernel_s`, `io_s`) must agree with the wall time the parent
  measures around each call; a program that fakes its time is invalid.

Score: `value` = reference median / candidate median (higher is better); `units`, per timed
run, the log of that ratio (the gate pairs per-shape log-time ratios); `detail` the shape, its
median and mean, every time, the warm-up, the correctness margin. The split's value is the
geometric mean over timed shapes, None when any instance failed (a check instance adds no time,
only validity). A failure raises `ProgramFailed` with the shape and the error margin: the score
is never computed, never 0.

`noise_margin()`: the gate's minimum gain, from repeated timings of the same program (the
reference) across evaluations on this machine: the spread a re-measurement shows.

Not guaranteed: the wrapper runs in the program's process (a program can patch it; the wall
check bounds what that buys); equivariance lets a program that recognises a renumbered input
reuse an earlier output (a permutation search costs more than the kernel); timing noise from
other processes on the machine.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import math
import os
import platform
import random
import shutil
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.resources import files
from pathlib import Path
from typing import Any, ClassVar

import torch

from sialoop.errors import DataError
from sialoop.harness.runtime import ProgramFailed, ProgramRunner, Workspace, self_solving
from sialoop.harness.sandbox import SandboxLimits
from sialoop.paths import default_data_root, sialoop_home
from sialoop.records import Score
from sialoop.tasks.base import Instance, Metric, Split, Task
from sialoop.tasks.templates import template_source
from sialoop.tasks.trimul.reference import (
    Case,
    check,
    generate_input,
    permute_rows,
)

FOLDER = "trimul"
_MAX_PROGRAM_CHARS = 200_000
_WALL_SLACK_S = 0.05  # IPC and framing per call: what the wall may exceed the wrapper's clock by
_WALL_SHARE = 0.25  # ... or this share of the wall, whichever is larger
_Z90 = 1.2816  # one-sided 90 %: the gate's default alpha

SPEC = """# TriMul: the outgoing triangle multiplicative update (AlphaFold3), forward only

Output `{"program": source}`: Python defining `custom_kernel(data)`, GPU MODE's entry point.
`data = (input, mask, weights, config)`: `input` float32 [B, N, N, C], `mask` [B, N, N] (0/1),
`weights` a dict of float32 tensors (norm.weight/bias [C], left_proj, right_proj, left_gate,
right_gate, out_gate [H, C], to_out_norm.weight/bias [H], to_out.weight [C, H]), `config`
{"dim": C, "hidden_dim": H}. Return the output [B, N, N, C]:

1. x = LayerNorm_C(input); left = (x Wl^T) * mask; right = (x Wr^T) * mask
2. left *= sigmoid(x Wlg^T); right *= sigmoid(x Wrg^T); og = sigmoid(x Wog^T)
3. out[b,i,j,d] = sum_k left[b,i,k,d] * right[b,j,k,d]
4. out = LayerNorm_H(out) * og; result = out Wout^T

Correct: |out - ref| <= 0.02 + 0.02 |ref| elementwise against the float32 reference, NaN and inf
where the reference has them, on normal and cauchy inputs. Score: speedup over the eager float32
reference (its median time over the program's), higher is better; a split's value is the
geometric mean over its shapes. Every timed run gets a fresh input. The program runs in an
isolated worker with torch, without network or LLM.
"""


def shapes_file(data: Path | None) -> Path:
    root = Path(data) if data is not None else default_data_root()
    path = root / FOLDER / "shapes.json"
    if not path.is_file():
        raise DataError(
            f"TriMul shapes not found: {path} is missing; pass --data PATH (the folder holding "
            f"{FOLDER}/shapes.json)"
        )
    return path


def cpu_threads() -> int:
    """The CPUs this process may run on: what a kernel gets, one kernel at a time."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def machine_key(device: str, threads: int) -> str:
    """What a timing depends on: the CPU (or GPU), its cores, torch's version, the threads a
    kernel runs with."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device.startswith("cuda"):
        cpu = torch.cuda.get_device_name(0)
    raw = f"{cpu}|{os.cpu_count()}|{torch.__version__}|{device}|{threads}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _write_tensors(folder: Path, data: tuple) -> None:
    x, mask, weights, config = data
    folder.mkdir(parents=True, exist_ok=True)
    shapes = {"input": list(x.shape), "mask": list(mask.shape)}
    for name, t in (("input", x), ("mask", mask), *weights.items()):
        t.contiguous().numpy().tofile(folder / f"{name}.bin")
        shapes[name] = list(t.shape)
    meta = {"shapes": shapes, "weights": list(weights), "config": config}
    (folder / "meta.json").write_text(json.dumps(meta))


def _read_output(path: Path, shape: list[int]) -> torch.Tensor:
    numel = math.prod(shape)
    if path.stat().st_size != 4 * numel:
        raise ProgramFailed(f"the output file holds {path.stat().st_size} bytes, not {4 * numel}")
    return torch.from_file(str(path), shared=False, size=numel).view(shape)


class _Runner(ProgramRunner):
    """One program in one sandbox worker, behind the trusted wrapper `runner.py`."""

    def __init__(
        self, source: str, workspace: Workspace, limits: SandboxLimits, isolation: str,
        deny: tuple[Path, ...],
    ):  # fmt: skip
        wrapper = (files(__package__) / "runner.py").read_text(encoding="utf-8")
        super().__init__(wrapper, source, workspace, limits, isolation, deny, tag="trimul")

    def run(self, name: str, device: str, threads: int) -> tuple[torch.Tensor, dict, float]:
        """(output, the wrapper's reply, wall seconds measured here) for input `name`."""
        reply, wall, workdir = self.call({"input": name, "device": device, "threads": threads})
        kernel_s, io_s = reply.get("kernel_s"), reply.get("io_s")
        if not all(isinstance(v, int | float) and math.isfinite(v) for v in (kernel_s, io_s)):
            raise ProgramFailed("the wrapper's answer holds no timing")
        out = _read_output(workdir / "out.bin", list(reply.get("shape") or []))
        return out, reply, wall


class TriMulTask(Task):
    """See the module docstring. Keywords: `data` (the root holding trimul/), `seed` (instance
    order only: the input seeds come from the OS), `reps` timed runs per instance, `ref_reps`
    reference runs per evaluation, `small` (train shapes up to this N), `device` ("cpu",
    "cuda" or "auto": CUDA when present), `cache_dir` (default: the sialoop home's cache),
    `threads` (torch threads of the reference and of every candidate, whose THREADS knob may
    override it; 0: every CPU this process may use; sandbox workers otherwise start with one,
    the right share for harness workers running side by side, not for a timed kernel)."""

    name = "trimul"
    metric = Metric(name="speedup", direction="higher", correct=None, failure_value=None)
    noise = "units"
    config_defaults: ClassVar[dict[str, Any]] = {
        "split": {"val_size": 0, "holdout_size": 0},
        "sandbox": {
            "workers": 1, "timeout_s": 900.0, "memory_mb": 65536, "file_size_mb": 8192,
        },
        "loop": {"minutes": 30.0, "train_batch": 4, "train_items": 8},
        "agents": {"harness_minutes": 4.0},
    }  # fmt: skip

    def __init__(
        self,
        data: Path | None = None,
        seed: int = 0,
        reps: int = 3,
        ref_reps: int = 1,
        small: int = 256,
        device: str = "auto",
        cache_dir: Path | None = None,
        timeout_s: float = 900.0,
        memory_mb: int = 65536,
        isolation: str = "auto",
        threads: int = 0,
    ):
        rows = json.loads(shapes_file(data).read_text())
        self.device = (
            ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        )
        self.reps, self.ref_reps = reps, ref_reps
        self.threads = threads or cpu_threads()
        fresh = random.SystemRandom()
        tests = [Case.of(r) for r in rows["tests"]]
        benches = [Case.of(r) for r in rows["benchmarks"]]
        other = {"normal": "cauchy", "cauchy": "normal"}
        plan: dict[Split, list[tuple[Case, str]]] = {
            "train": [(c, "timed") for c in tests if c.seqlen <= small],
            "val": [(c, "timed") for c in benches],
            "test": [(c, "timed") for c in benches]
            + [(_with(c, other[c.distribution]), "timed") for c in benches]
            + [(c, "check") for c in tests],
        }
        self._instances: dict[Split, list[Instance]] = {}
        self._seeds: dict[str, int] = {}
        for split, cases in plan.items():
            self._instances[split] = []
            for i, (case, role) in enumerate(cases):
                iid = f"{split}-{i}"
                self._seeds[iid] = fresh.randrange(1, 2**31)
                inputs = {"case": case.__dict__ | {"label": case.label}, "role": role}
                self._instances[split].append(Instance(id=iid, split=split, inputs=inputs))
        del seed  # the order is fixed by shapes.json; seeds are the OS's
        home = Path(cache_dir) if cache_dir is not None else sialoop_home() / "cache" / FOLDER
        self._machine = machine_key(self.device, self.threads)
        self._timing_file = home / self._machine / "reference_times.json"
        self._workspace = Workspace(_WORK_PREFIX)
        # What a program must not read: the reference outputs and this machine's timings.
        self._deny = (self._workspace.dir / "reference", self._timing_file.parent)
        self._limits = SandboxLimits(
            timeout_s=timeout_s,
            startup_timeout_s=120.0,
            setup_timeout_s=120.0,
            memory_mb=memory_mb,
            file_size_mb=8192,
            max_log_bytes=8_000,
            max_start_failures=1,
        )
        self._isolation = isolation
        self._lock = threading.Lock()
        self._runtime = ThreadPoolExecutor(1, thread_name_prefix="trimul-runtime")
        self._reference: _Runner | None = None
        self._program: tuple[str, _Runner] | None = None
        self._ref_out: dict[str, Path] = {}
        self._scores: dict[tuple[str, str], Score] = {}
        self._fresh = fresh
        atexit.register(self.close)

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
        return template_source(__package__, "kernel.py")

    def write_public(self, dest: Path) -> None:
        """The spec, the train split, and for generator harnesses the kernel template with its
        knobs' choices (`kernel_template.py`, `kernel_knobs.json`)."""
        from sialoop.harness.knobs import read_declarations

        super().write_public(dest)
        template = template_source(__package__, "kernel.py")
        (dest / "kernel_template.py").write_text(template)
        knobs = read_declarations(template).knobs
        choices = {name: list(k.choices) for name, k in knobs.items()}
        (dest / "kernel_knobs.json").write_text(json.dumps(choices))

    def adapt_harness(self, source: str) -> str:
        """A file defining `custom_kernel` and no `solve` becomes a harness answering itself."""
        return self_solving(source, "custom_kernel")

    def aggregate(self, scores: list[Score | None]) -> float | None:  # type: ignore[override]
        """Geometric mean of the timed instances' speedups; None when any instance failed."""
        if not scores or any(s is None for s in scores):
            return None
        timed = [s.value for s in scores if s is not None and s.detail.get("role") == "timed"]
        if not timed:
            return None
        return math.exp(sum(math.log(v) for v in timed) / len(timed))

    def noise_margin(self) -> float:
        """The gain in mean log-time ratio a re-measurement of an unchanged program shows, at
        the gate's 90 %: from the reference's repeated timings, per val shape, on this machine."""
        times = self._times()
        spreads = []
        for inst in self._instances["val"]:
            logs = [math.log(t) for t in times.get(inst.inputs["case"]["label"], []) if t > 0]
            if len(logs) >= 2:
                spreads.append(statistics.stdev(logs))
        if not spreads:
            return 0.0
        rms = math.sqrt(sum(s * s for s in spreads) / len(spreads))
        return _Z90 * math.sqrt(2.0) * rms / math.sqrt(len(spreads))

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {s: len(self._instances[s]) for s in ("train", "val", "test")}
        out |= {
            "device": self.device, "native_bf16": _native_bf16(self.device),
            "threads": self.threads,
        }  # fmt: skip
        return out

    # ---- measuring --------------------------------------------------------------------------

    def score(self, instance: Instance, output: Any) -> Score:
        source = output.get("program") if isinstance(output, dict) else output
        if not isinstance(source, str) or not source.strip():
            raise ValueError('the output holds no program: expected {"program": "<source>"}')
        if len(source) > _MAX_PROGRAM_CHARS:
            raise ValueError(f"the program is longer than {_MAX_PROGRAM_CHARS} characters")
        digest = hashlib.sha256(source.encode()).hexdigest()
        # Workers die with the thread that started them (a parent-death signal is per thread)
        # and a rollout's threads end with it: the task's own thread owns them. It is also one
        # thread: one kernel at a time, whatever sandbox.workers says.
        return self._runtime.submit(self._score_once, instance, source, digest).result()

    def _score_once(self, instance: Instance, source: str, digest: str) -> Score:
        with self._lock:
            key = (digest, instance.id)
            if key not in self._scores:
                try:
                    self._scores[key] = self._measure(instance, source, digest)
                except ProgramFailed as err:
                    label = instance.inputs["case"]["label"]
                    if not str(err).startswith(label):  # every failure names its shape
                        raise ProgramFailed(f"{label}: {err}") from None
                    raise
            return self._scores[key]

    def _measure(self, instance: Instance, source: str, digest: str) -> Score:
        case = Case.of(instance.inputs["case"])
        role = instance.inputs.get("role", "timed")
        seed = self._seeds[instance.id]
        base = f"{instance.id}-base"
        data = generate_input(case, seed)
        _write_tensors(self._workspace.exchange / base, data)
        try:
            ref_path = self._reference_output(instance.id, case, base)
            ref = _read_output(ref_path, [case.bs, case.seqlen, case.seqlen, case.dim])
            runner = self._runner(digest, source)
            start = time.perf_counter()
            out, reply, _ = runner.run(base, self.device, self.threads)
            warmup_s = time.perf_counter() - start
            margin, why = check(out, ref)
            del out
            if why is not None:
                raise ProgramFailed(f"{case.label} (warm-up): {why}")
            detail: dict[str, Any] = {
                "role": role, "shape": case.label, "margin": margin, "warmup_s": warmup_s,
                "import_s": reply.get("import_s", 0.0), "device": self.device,
                "threads": reply.get("threads"),
            }  # fmt: skip
            if role == "check":
                return Score(value=1.0, detail=detail)
            cand, refs = self._timed(instance.id, case, data, ref, runner, detail)
        finally:
            shutil.rmtree(self._workspace.exchange / base, ignore_errors=True)
        ref_times = self._record_times(case.label, refs)
        t_ref = statistics.median(ref_times)
        t_cand = statistics.median(cand)
        units = {f"rep{k}": math.log(t_ref / t) for k, t in enumerate(cand)}
        detail |= {
            "median_s": t_cand, "mean_s": statistics.fmean(cand), "times_s": cand,
            "reference_median_s": t_ref, "reference_times_s": refs, "units": units,
            "flops": case.flops(), "gflops_per_s": case.flops() / t_cand / 1e9,
        }  # fmt: skip
        return Score(value=t_ref / t_cand, detail=detail)

    def _timed(
        self, iid: str, case: Case, data: tuple, ref: torch.Tensor, runner: _Runner,
        detail: dict[str, Any],
    ) -> tuple[list[float], list[float]]:  # fmt: skip
        """The candidate's and the reference's timed runs, each on a freshly renumbered input."""
        cand: list[float] = []
        refs: list[float] = []
        worst = detail["margin"]
        for r in range(self.reps):
            name = f"{iid}-rep{r}"
            perm = _perm(case.seqlen, self._fresh)
            bperm = _perm(case.bs, self._fresh)
            x, mask, weights, config = data
            renumbered = (
                permute_rows(x, perm, bperm),
                permute_rows(mask, perm, bperm),
                weights,
                config,
            )
            _write_tensors(self._workspace.exchange / name, renumbered)
            del renumbered
            try:
                if r < self.ref_reps:
                    _, ref_reply, ref_wall = self._reference_runner().run(
                        name, self.device, self.threads
                    )
                    refs.append(_agreeing(ref_reply, ref_wall, "the reference"))
                out, reply, wall = runner.run(name, self.device, self.threads)
                cand.append(_agreeing(reply, wall, case.label))
                margin, why = check(out, permute_rows(ref, perm, bperm))
                del out
                if why is not None:
                    raise ProgramFailed(f"{case.label} (timed run {r}, fresh input): {why}")
                worst = max(worst, margin)
            finally:
                shutil.rmtree(self._workspace.exchange / name, ignore_errors=True)
        detail["margin"] = worst
        return cand, refs

    def _reference_output(self, iid: str, case: Case, base: str) -> Path:
        if iid not in self._ref_out:
            runner = self._reference_runner()
            out, _, _ = runner.run(base, self.device, self.threads)
            path = self._workspace.dir / "reference" / f"{iid}.bin"
            path.parent.mkdir(parents=True, exist_ok=True)
            out.contiguous().numpy().tofile(path)
            self._ref_out[iid] = path
        return self._ref_out[iid]

    def _reference_runner(self) -> _Runner:
        if self._reference is None:
            source = (files(__package__) / "reference.py").read_text(encoding="utf-8")
            source += "\n\ndef custom_kernel(data):\n    return reference_kernel(data)\n"
            self._reference = _Runner(
                source, self._workspace, self._limits, self._isolation, self._deny
            )
        return self._reference

    def _runner(self, digest: str, source: str) -> _Runner:
        if self._program is not None and self._program[0] != digest:
            self._program[1].close()
            self._program = None
        if self._program is None:
            self._program = (
                digest,
                _Runner(source, self._workspace, self._limits, self._isolation, self._deny),
            )
        return self._program[1]

    def _times(self) -> dict[str, list[float]]:
        try:
            return json.loads(self._timing_file.read_text())
        except (OSError, ValueError):
            return {}

    def _record_times(self, label: str, new: list[float]) -> list[float]:
        """This machine's reference times for `label`, with `new` added and stored."""
        times = self._times()
        times[label] = (times.get(label, []) + new)[-50:]
        self._timing_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._timing_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(times))
        tmp.replace(self._timing_file)
        if not times[label]:
            raise ProgramFailed(f"no reference time for {label}: set ref_reps >= 1 once")
        return times[label]

    def close(self) -> None:
        """Stop the workers and delete the exchange files (also at exit)."""
        for runner in (self._reference, self._program[1] if self._program else None):
            if runner is not None:
                runner.close()
        self._reference = self._program = None
        self._workspace.close()


def _with(case: Case, distribution: str) -> Case:
    return Case(**(case.__dict__ | {"distribution": distribution}))


def _perm(n: int, rng: random.SystemRandom) -> torch.Tensor:
    order = list(range(n))
    rng.shuffle(order)
    return torch.tensor(order, dtype=torch.long)


def _agreeing(reply: dict, wall: float, what: str) -> float:
    """The wrapper's kernel seconds, if they and its I/O seconds account for the wall time."""
    kernel_s, io_s = float(reply["kernel_s"]), float(reply["io_s"])
    unaccounted = wall - kernel_s - io_s - float(reply.get("import_s") or 0.0)
    if (
        min(kernel_s, io_s) < 0
        or unaccounted < -_WALL_SLACK_S
        or unaccounted > max(_WALL_SLACK_S, _WALL_SHARE * wall)
    ):
        raise ProgramFailed(
            f"{what}: the worker's clock ({kernel_s:.4f} s kernel + {io_s:.4f} s I/O) disagrees "
            f"with the wall time measured outside it ({wall:.4f} s)"
        )
    return kernel_s


_WORK_PREFIX = "sialoop-trimul-"


def _native_bf16(device: str) -> bool:
    from sialoop.policy.dtype import native_bf16

    return bool(native_bf16()) if device == "cpu" else bool(torch.cuda.is_bf16_supported())
