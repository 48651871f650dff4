"""The TriMul operator as SPEC.md states it, its inputs, and the correctness check: trusted code.

The loop's process and the trusted runtime use this module; a candidate program never needs it
(it may import it, as it is public: nothing here is secret).

- `generate_input(case, seed)`: inputs as the spec draws them, from one CPU `torch.Generator`
  seeded with `seed` (upstream draws cauchy inputs and the weights from the global RNG; drawing
  everything from the seeded generator makes a case reproducible from its seed, so reference
  outputs can be cached, and a program cannot predict inputs from any RNG state of its own).
- `reference_kernel(data)`: the spec's computation, eager, in float32 (GPU MODE's reference).
- `permuted(data, perm, batch_perm)`: the same problem with rows and columns renumbered. The
  outgoing update is equivariant under a joint permutation of i, j (and k): the output of the
  permuted input is the permuted output, so fresh inputs cost a gather, not a reference run.
- `check(out, ref)`: `|out - ref| <= atol + rtol * |ref|` elementwise, NaN and inf positions
  equal, shape equal; the worst margin (1.0 is the tolerance) and the first failure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

RTOL = ATOL = 2e-2
WEIGHT_NAMES = (
    "norm.weight", "norm.bias", "left_proj.weight", "right_proj.weight", "left_gate.weight",
    "right_gate.weight", "out_gate.weight", "to_out_norm.weight", "to_out_norm.bias",
    "to_out.weight",
)  # fmt: skip
_CHECK_ROWS = 1 << 14  # positions compared at a time: bounds the check's temporaries


@dataclass(frozen=True)
class Case:
    """One shape of shapes.json: sizes, whether the mask is all ones, the input distribution."""

    seqlen: int
    bs: int
    dim: int
    hiddendim: int
    nomask: bool
    distribution: str

    @classmethod
    def of(cls, row: dict[str, Any]) -> Case:
        return cls(**{k: row[k] for k in cls.__dataclass_fields__})

    @property
    def label(self) -> str:
        mask = "nomask" if self.nomask else "mask"
        return f"N{self.seqlen} B{self.bs} C{self.dim} H{self.hiddendim} {self.distribution} {mask}"

    def flops(self) -> float:
        """Multiply-adds x 2 of the five gated projections, the triangle product and the output
        projection: the GEMM work any implementation has to do."""
        rows = self.bs * self.seqlen**2
        c, h = self.dim, self.hiddendim
        return 2.0 * (rows * c * 5 * h + self.bs * h * self.seqlen**3 + rows * h * c)

    def input_bytes(self) -> int:
        return 4 * self.bs * self.seqlen**2 * self.dim


def generate_input(case: Case, seed: int) -> tuple[torch.Tensor, torch.Tensor, dict, dict]:
    """`(input, mask, weights, config)` for `case`, all float32 on the CPU, from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    b, n, c, h = case.bs, case.seqlen, case.dim, case.hiddendim
    if case.distribution == "normal":
        x = torch.randn(b, n, n, c, generator=gen)
    elif case.distribution == "cauchy":
        x = torch.empty(b, n, n, c).cauchy_(0.0, 2.0, generator=gen)
    else:
        raise ValueError(f"unknown distribution {case.distribution!r}")
    if case.nomask:
        mask = torch.ones(b, n, n)
    else:
        mask = torch.randint(0, 2, (b, n, n), generator=gen).float()

    def normal(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    weights = {
        "norm.weight": normal(c),
        "norm.bias": normal(c),
        "left_proj.weight": normal(h, c, scale=1 / math.sqrt(h)),
        "right_proj.weight": normal(h, c, scale=1 / math.sqrt(h)),
        "left_gate.weight": normal(h, c, scale=1 / math.sqrt(h)),
        "right_gate.weight": normal(h, c, scale=1 / math.sqrt(h)),
        "out_gate.weight": normal(h, c, scale=1 / math.sqrt(h)),
        "to_out_norm.weight": normal(h),
        "to_out_norm.bias": normal(h),
        "to_out.weight": normal(c, h, scale=1 / math.sqrt(c)),
    }
    return x, mask, weights, {"dim": c, "hidden_dim": h}


def reference_kernel(data: tuple) -> torch.Tensor:
    """The outgoing triangle multiplicative update, eager float32, as SPEC.md writes it."""
    x, mask, w, config = data
    c, h = config["dim"], config["hidden_dim"]
    x = F.layer_norm(x, (c,), w["norm.weight"], w["norm.bias"])
    m = mask.unsqueeze(-1)
    left = F.linear(x, w["left_proj.weight"]) * m
    right = F.linear(x, w["right_proj.weight"]) * m
    left = left * torch.sigmoid(F.linear(x, w["left_gate.weight"]))
    right = right * torch.sigmoid(F.linear(x, w["right_gate.weight"]))
    out_gate = torch.sigmoid(F.linear(x, w["out_gate.weight"]))
    out = torch.einsum("... i k d, ... j k d -> ... i j d", left, right)
    out = F.layer_norm(out, (h,), w["to_out_norm.weight"], w["to_out_norm.bias"]) * out_gate
    return F.linear(out, w["to_out.weight"])


def permute_rows(t: torch.Tensor, perm: torch.Tensor, batch_perm: torch.Tensor) -> torch.Tensor:
    """`t[batch_perm][:, perm][:, :, perm]` for a `[B, N, N, ...]` tensor, contiguous."""
    return t.index_select(0, batch_perm).index_select(1, perm).index_select(2, perm).contiguous()


def check(out: Any, ref: torch.Tensor) -> tuple[float, str | None]:
    """(worst margin, why it fails or None). The margin is max |out-ref| / (atol + rtol |ref|)
    over finite positions: at most 1.0 passes."""
    if isinstance(out, tuple | list) and len(out) == 1:
        out = out[0]
    if not isinstance(out, torch.Tensor):
        return math.inf, f"the kernel returned a {type(out).__name__}, not a tensor"
    if tuple(out.shape) != tuple(ref.shape):
        return math.inf, f"output shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    out2, ref2 = out.reshape(-1, ref.shape[-1]), ref.reshape(-1, ref.shape[-1])
    worst = 0.0
    for a in range(0, ref2.shape[0], _CHECK_ROWS):
        o = out2[a : a + _CHECK_ROWS].float()
        r = ref2[a : a + _CHECK_ROWS]
        if not torch.equal(torch.isnan(o), torch.isnan(r)):
            return math.inf, "NaN positions differ from the reference's"
        inf_r, inf_o = torch.isinf(r), torch.isinf(o)
        if not torch.equal(inf_o, inf_r) or not torch.equal(o[inf_r], r[inf_r]):
            return math.inf, "inf positions differ from the reference's"
        fin = torch.isfinite(r)
        err = ((o - r).abs() / (ATOL + RTOL * r.abs()))[fin]
        if err.numel():
            worst = max(worst, float(err.max()))
    if worst > 1.0:
        return worst, f"error {worst:.3g}x the tolerance (|out-ref| <= {ATOL} + {RTOL}|ref|)"
    return worst, None
