"""Attention as the exported graphs compute it: decomposed (opset 18-22) or as ONNX ops (23).

Opset 18-22 — grouped-query attention without copying the KV cache:

transformers' eager attention repeats every KV head once per query head of its group
(`repeat_kv`: Expand + Reshape) before the two matmuls. Traced into a graph, that copies the
whole cache of every layer at every cached step (SmolLM-135M: 3 KV heads read by 9 query
heads, so 3× the cache written per layer per token). Here the queries are grouped instead —
[B, KV, G, Sq, D] against keys [B, KV, 1, D, Sk] — and MatMul broadcasts over G: nothing is
copied, and each score is the same dot product in the same order as eager attention's.
Measured on the full-size synthetic SmolLM-135M decoder (one run, 2 threads): cached step
fp32 15.7 → 13.5 ms, int8 10.3 → 8.3 ms.

transformers has no such implementation to pick (its "sdpa" does not trace with grouped KV
heads in the TorchScript exporter), so this one is registered with its `AttentionInterface`,
with the eager mask, and switched on only while a decoder with grouped KV heads is exported.

Opset 23 (the default) — one ONNX `Attention` node per layer, for every model that attends
through transformers' `AttentionInterface` (decoders and vision encoders), and two
`RotaryEmbedding` nodes per layer for the Llama-family decoders, whose half-rotating full-head
rotary is exactly that op's. Standard operators, not onnxruntime contrib ops, so any runtime
with opset 23 runs them (onnxruntime ≥ 1.23, onnxruntime-web). They are traced as autograd
Functions whose PyTorch forward computes what transformers' eager code computes (the smoke
parity holds the graph to it) and whose ONNX symbolic is the operator. Full-size SmolLM-135M
decoder: 906 nodes after onnxruntime's fusions instead of 1,569; int8 decode step 7.9-8.4 →
6.9-7.2 ms (one run, alternating).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, PretrainedConfig, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.models.llama.modeling_llama import rotate_half  # the same function in Mistral and Qwen2

from vlmexport.errors import UsageError

NAME = "vlmexport_grouped"
ONNX_NAME = "vlmexport_onnx23"
# Fused ops are traced under this domain (the TorchScript exporter stops at opset 20), then
# moved to the default domain at opset 23 by onnx_io.adopt_pending_ops.
PENDING_DOMAIN = "vlmexport.pending"
FUSED_OPSET = 23  # the first opset with Attention and RotaryEmbedding
# transformers modules whose `apply_rotary_pos_emb` rotates halves of the full head, as
# ONNX RotaryEmbedding does with interleaved=0 (the decoders checkpoint/ builds with rotary).
ROTARY_MODULES = {"modeling_llama", "modeling_mistral", "modeling_qwen2"}


def grouped_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention over grouped query heads: query [B, H, Sq, D], key/value [B, KV, Sk, D]
    → (output [B, Sq, KV, G, D], weights [B, KV, G, Sq, Sk]); H = KV·G, head h reads KV head
    h // G as repeat_kv has it, and the output's last three axes flatten to eager's [H·D]."""
    output, weights = _grouped(query, key, value, attention_mask, scaling, module.num_key_value_groups, dropout, module.training)
    # [B, Sq, KV, G, D]: the attention modules reshape the output to [B, Sq, -1] themselves.
    return output.permute(0, 3, 1, 2, 4).contiguous(), weights


def _grouped(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    groups: int,
    dropout: float = 0.0,
    training: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output [B, KV, G, Sq, D], weights [B, KV, G, Sq, Sk]) for query [B, KV·G, Sq, D]."""
    # Sizes written out (not unflatten/flatten): every target is then the query's own shape,
    # which simplify.py can turn into a constant.
    batch, _, length, dim = query.shape
    grouped = query.reshape(batch, key.shape[1], groups, length, dim)  # [B, KV, G, Sq, D]
    scores = torch.matmul(grouped, key.unsqueeze(2).transpose(3, 4)) * scaling  # [B, KV, G, Sq, Sk]
    if attention_mask is not None:
        scores = scores + attention_mask.unsqueeze(2)
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=training)
    return torch.matmul(weights, value.unsqueeze(2)), weights  # [B, KV, G, Sq, D]


class _AttentionOp(torch.autograd.Function):
    """ONNX `Attention` (opset 23) in the graph; in PyTorch, the grouped attention above."""

    @staticmethod
    def forward(ctx: object, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        output, _ = _grouped(query, key, value, mask, scaling, query.shape[1] // key.shape[1])
        return output.flatten(1, 2)  # [B, H, Sq, D]

    @staticmethod
    def symbolic(g: Any, query: Any, key: Any, value: Any, mask: Any, scaling: float) -> Any:
        inputs = (query, key, value) if _is_none(mask) else (query, key, value, mask)
        output = g.op(f"{PENDING_DOMAIN}::Attention", *inputs, scale_f=scaling)
        output.setType(query.type())
        return output


class _RotaryOp(torch.autograd.Function):
    """ONNX `RotaryEmbedding` (opset 23, halves rotated, full head) in the graph; in PyTorch,
    transformers' `x·cos + rotate_half(x)·sin`, with cos/sin given as their first halves."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor, cos_half: torch.Tensor, sin_half: torch.Tensor) -> torch.Tensor:
        cos = torch.cat([cos_half, cos_half], dim=-1).unsqueeze(1)  # what transformers' rotary module makes
        sin = torch.cat([sin_half, sin_half], dim=-1).unsqueeze(1)
        return x * cos + rotate_half(x) * sin

    @staticmethod
    def symbolic(g: Any, x: Any, cos_half: Any, sin_half: Any) -> Any:
        output = g.op(f"{PENDING_DOMAIN}::RotaryEmbedding", x, cos_half, sin_half)
        output.setType(x.type())
        return output


def _is_none(value: Any) -> bool:
    return value.node().mustBeNone() if hasattr(value, "node") else value is None


def onnx_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """The attention of an opset-23 graph: one `Attention` node per layer (the runtime groups
    the query heads over the KV heads), output [B, Sq, H, D] as eager attention returns it.
    Dropout is not traced: graphs are exported in eval mode."""
    return _AttentionOp.apply(query, key, value, attention_mask, scaling).transpose(1, 2), None


def onnx_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' `apply_rotary_pos_emb` (ROTARY_MODULES) for [B, H, S, D] queries and keys,
    as two `RotaryEmbedding` nodes. Its cos/sin [B, S, D] repeat their first half
    (cat(freqs, freqs)), which is what the op's caches hold."""
    half = q.shape[-1] // 2
    if unsqueeze_dim != 1 or cos.shape[-1] != q.shape[-1]:
        raise UsageError(f"rotary embedding over {cos.shape[-1]} of {q.shape[-1]} dims, heads on axis {unsqueeze_dim}", "export with --opset 18")
    return _RotaryOp.apply(q, cos[..., :half], sin[..., :half]), _RotaryOp.apply(k, cos[..., :half], sin[..., :half])


AttentionInterface.register(NAME, grouped_attention)
AttentionMaskInterface.register(NAME, eager_mask)
AttentionInterface.register(ONNX_NAME, onnx_attention)
AttentionMaskInterface.register(ONNX_NAME, eager_mask)


def has_grouped_kv(config: PretrainedConfig) -> bool:
    """Llama-family decoders (Llama, Mistral, Qwen2) with fewer KV heads than query heads."""
    heads, kv_heads = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    return heads is not None and kv_heads is not None and kv_heads < heads


@contextmanager
def export_attention(lm: nn.Module, fused: bool = False) -> Iterator[None]:
    """Within the block, `lm` attends with `grouped_attention` when it has grouped KV heads
    (other decoders keep their eager attention); with `fused` (opset 23), every model with a
    transformers config (decoders and vision encoders) attends with one `Attention` node per
    layer, and rotary decoders rotate with `RotaryEmbedding`.
    The previous implementation is restored after."""
    config = lm.config if isinstance(lm, PreTrainedModel) else None
    name = None if config is None else ONNX_NAME if fused else NAME if has_grouped_kv(config) else None
    if config is None or name is None:
        yield
        return
    previous = config._attn_implementation
    config._attn_implementation = name
    modeling = {sys.modules[type(m).__module__] for m in lm.modules()} if fused else set()
    # getattr/setattr: the modeling modules are found at run time, their functions are not typed attributes.
    originals = {module: getattr(module, "apply_rotary_pos_emb") for module in modeling if module.__name__.rpartition(".")[2] in ROTARY_MODULES}  # noqa: B009
    try:
        for module in originals:
            setattr(module, "apply_rotary_pos_emb", onnx_rotary)  # noqa: B010
        yield
    finally:
        config._attn_implementation = previous
        for module, original in originals.items():
            setattr(module, "apply_rotary_pos_emb", original)  # noqa: B010
