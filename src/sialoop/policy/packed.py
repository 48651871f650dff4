"""Inference linears on weights reordered once for oneDNN, as inductor's CPU freezing does.

A plain `F.linear` on CPU lets oneDNN reorder the weight into its blocked layout on every call;
for the policy's small-batch forwards (suffix rows, the 262k-row LM head) that reorder costs as
much as the product (`bench/item_profile.py`: the LM head at 48 rows 1.7x faster packed, the
decoder's linears at 8 rows 1.7x). `pack_linears` reorders each weight once and keeps the
original Parameter, so training, peft's LoRA wrapping (it wraps any `nn.Linear`) and weight tying
see an ordinary module; the packed copy is used only without autograd, and only while the weight
is unchanged since it was packed.
"""

from __future__ import annotations

import torch
from torch import nn

# oneDNN picks its blocking from a row count; 64 was within 5 % of the best from 1 to 256 rows
# on both the decoder's shapes and the LM head (AMX and AVX512-BF16 machines).
_ROWS_HINT = 64


class PackedLinear(nn.Linear):
    """An `nn.Linear` whose inference forward runs on a oneDNN-packed copy of its weight."""

    _packed: torch.Tensor
    _packed_version: int

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear:
        module = cls(linear.in_features, linear.out_features, bias=False, device="meta")
        module.weight, module.bias = linear.weight, linear.bias
        module.repack()
        return module

    def repack(self) -> None:
        with torch.no_grad():
            self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), _ROWS_HINT)
        self._packed_version = self.weight._version

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            torch.is_grad_enabled()
            or x.dtype != self.weight.dtype
            or self.weight._version != self._packed_version  # trained in place since packing
        ):
            return super().forward(x)
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")


def packing_available(dtype: torch.dtype) -> bool:
    """Whether this CPU's oneDNN takes packed weights in `dtype`."""
    if not torch.backends.mkldnn.is_available() or dtype not in (torch.float32, torch.bfloat16):
        return False
    return dtype != torch.bfloat16 or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pack_linears(model: nn.Module) -> int:
    """Replaces every plain CPU `nn.Linear` of `model` by a `PackedLinear`; returns how many.

    Shared Parameters stay shared (a tied LM head keeps its embedding's weight). Nothing changes
    where oneDNN cannot pack the model's dtype, and a linear it refuses stays as it was.
    """
    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear
        and child.weight.device.type == "cpu"
        and packing_available(child.weight.dtype)
    ]
    packed = 0
    for parent, name, child in swaps:
        try:
            setattr(parent, name, PackedLinear.from_linear(child))
        except RuntimeError:  # a oneDNN build without this shape or ISA: it stays plain
            continue
        packed += 1
    return packed
