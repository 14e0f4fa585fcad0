"""Keeping export's peak memory to the model once.

Two things no library does for us here (the rest is in onnx_io: parameters traced as graph
inputs and streamed into the files; and in export.py: each component released with
`module.to("meta")` once its graphs are written):
- `release_freed_memory`: glibc keeps freed heap memory (its mmap threshold grows after large
  frees, so later tensors come from the heap) until asked to return it; after the merge check
  of a full-size export that was 0.18 GB (1.52 → 1.34 GB resident).
- `store_linear_weights_transposed`: nn.Linear computes `x @ W.T`. Traced with W as a constant,
  the exporter folds W.T into a second copy of every weight (0.43 GB for SmolLM-135M's decoder);
  traced with W as an input, every MatMul would read a Transpose node, which quantizers cannot
  quantize. Stored transposed beforehand, W.T *is* the parameter and the MatMul reads it as is.
  GPT-2's Conv1D stores W as [in, out] already, but flattens x to 2-D for `addmm` and reshapes
  back to a shape computed from x's: traced, a Gemm that onnxruntime's MatMulNBits quantizer
  skips (a GPT-2 "int8" decoder stayed float32 but for its head) between Reshapes whose
  computed targets hide the heads' layout from the attention rewrite. The same module traces
  it as one 3-D MatMul.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Set as AbstractSet

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


def release_freed_memory() -> None:
    """Return freed heap memory to the OS (glibc only; elsewhere nothing to do)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = getattr(libc, "malloc_trim", None)
    except OSError:
        return
    if trim is not None:
        trim(0)


class TransposedLinear(nn.Module):
    """nn.Linear (or GPT-2's Conv1D) with its weight stored as [in, out]: `x @ weight + bias`,
    traced as one MatMul reading the parameter itself (named `<module>.weight`)."""

    def __init__(self, linear: nn.Module) -> None:
        super().__init__()
        weight = linear.weight.detach()  # Conv1D's is [in, out] already: shared, not copied
        self.weight = nn.Parameter(weight.t().contiguous() if isinstance(linear, nn.Linear) else weight, requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.matmul(x, self.weight)
        return out if self.bias is None else out + self.bias


def store_linear_weights_transposed(module: nn.Module, keep: AbstractSet[int] = frozenset()) -> int:
    """Replace every nn.Linear and Conv1D under `module` by a TransposedLinear, one at a time
    (so at most one weight is copied at once); linears whose weight is in `keep` (by id, e.g. a
    head tied to the embedding) stay. Returns how many were replaced."""
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in (nn.Linear, Conv1D) and id(child.weight) not in keep:
                setattr(parent, name, TransposedLinear(child))
                replaced += 1
    return replaced
