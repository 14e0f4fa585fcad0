"""The modules that become ONNX graphs, with their tensor names and dynamic axes (DESIGN §3).

Decoder graphs return logits only for positions that predict a token: the last
prefix position and every input id (all positions when there is no prefix). The
other prefix positions would predict the next *image* patch, which nothing reads,
and computing the 49152-wide head for all 196 of them costs ~5.5 GFLOP per caption.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from vlmexport.bundle.names import BATCH, LOGITS, PAST, PREFIX, SEQ, TOTAL, past_names, present_names


@dataclass(frozen=True)
class DecoderShape:
    """What the KV cache looks like: fixed integers in the graphs' declared shapes."""

    num_layers: int
    kv_heads: int
    head_dim: int
    embed_dim: int
    vocab_size: int


@torch.no_grad()
def decoder_shape(lm: PreTrainedModel) -> DecoderShape:
    """Read the cache geometry off one real forward pass (works for every decoder family)."""
    out = lm(input_ids=torch.zeros(1, 1, dtype=torch.long), use_cache=True)
    first = out.cache.layers[0].keys
    return DecoderShape(
        num_layers=len(out.cache.layers),
        kv_heads=int(first.shape[1]),
        head_dim=int(first.shape[3]),
        embed_dim=int(lm.get_input_embeddings().weight.shape[1]),
        vocab_size=int(out.logits.shape[-1]),
    )


class VisionGraph(nn.Module):
    """pixel_values → last_hidden_state."""

    input_names = ["pixel_values"]
    output_names = ["last_hidden_state"]
    dynamic_axes = {"pixel_values": {0: BATCH}, "last_hidden_state": {0: BATCH}}

    def __init__(self, encoder: PreTrainedModel) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.encoder(pixel_values=pixel_values).last_hidden_state


class ProjectionGraph(nn.Module):
    """vision_hidden_states → projected_prefix."""

    input_names = ["vision_hidden_states"]
    output_names = ["projected_prefix"]
    dynamic_axes = {"vision_hidden_states": {0: BATCH}, "projected_prefix": {0: BATCH}}

    def __init__(self, projection: nn.Module) -> None:
        super().__init__()
        self.projection = projection

    def forward(self, vision_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.projection(vision_hidden_states)


def _decode(
    lm: PreTrainedModel, num_layers: int, embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, past: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The decoder body over `embeds` after `past`: (last hidden states, present tensors)."""
    cache = DynamicCache(config=lm.config)
    for i in range(num_layers):
        cache.update(past[2 * i], past[2 * i + 1], i)
    out = lm.get_decoder()(
        inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=True
    )
    present: list[torch.Tensor] = []
    for layer in out.cache.layers:
        present += [layer.keys, layer.values]
    return out.last_hidden_state, present


def run_decoder(
    lm: PreTrainedModel,
    num_layers: int,
    prefix: torch.Tensor | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    past: tuple[torch.Tensor, ...],
) -> tuple[torch.Tensor, ...]:
    """One decoder pass over [prefix; embed(input_ids)] after `past`: (logits, *present)."""
    embeds = lm.get_input_embeddings()(input_ids)
    if prefix is not None:
        embeds = torch.cat([prefix, embeds], dim=1)
    hidden, present = _decode(lm, num_layers, embeds, attention_mask, position_ids, past)
    # Keep positions from the last prefix one on (see module docstring); traced as shape arithmetic.
    prefix_len = prefix.shape[1] if prefix is not None else 0
    start = prefix_len - torch.clamp(torch.as_tensor(prefix_len), max=1)
    hidden = hidden.index_select(1, torch.arange(start, hidden.shape[1]))
    return (lm.get_output_embeddings()(hidden), *present)


def _step_axes(tokens: str, num_layers: int) -> dict[str, dict[int, str]]:
    """Dynamic axes of a decoder step over `tokens` (ids or embeddings) after a past."""
    return {
        tokens: {0: BATCH, 1: SEQ},
        "attention_mask": {0: BATCH, 1: TOTAL},
        "position_ids": {0: BATCH, 1: SEQ},
        "logits": {0: BATCH, 1: LOGITS},
        **{name: {0: BATCH, 2: PAST} for name in past_names(num_layers)},
        **{name: {0: BATCH, 2: TOTAL} for name in present_names(num_layers)},
    }


class PrefixInitGraph(nn.Module):
    """distilvit first pass: prefix_embeddings, input_ids (T may be 0) → logits, present.*"""

    def __init__(self, lm: PreTrainedModel, shape: DecoderShape) -> None:
        super().__init__()
        self.lm, self.shape = lm, shape
        self.input_names = ["prefix_embeddings", "input_ids"]
        self.output_names = ["logits", *present_names(shape.num_layers)]
        self.dynamic_axes = {
            "prefix_embeddings": {0: BATCH, 1: PREFIX},
            "input_ids": {0: BATCH, 1: SEQ},
            "logits": {0: BATCH, 1: LOGITS},
            **{n: {0: BATCH, 2: TOTAL} for n in present_names(shape.num_layers)},
        }

    def forward(self, prefix_embeddings: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        batch, length = prefix_embeddings.shape[0], prefix_embeddings.shape[1] + input_ids.shape[1]
        mask = torch.ones(batch, length, dtype=torch.long)
        positions = torch.arange(length).unsqueeze(0).expand(batch, length)
        empty = torch.zeros(batch, self.shape.kv_heads, 0, self.shape.head_dim)
        past = (empty,) * (2 * self.shape.num_layers)
        return run_decoder(self.lm, self.shape.num_layers, prefix_embeddings, input_ids, mask, positions, past)


class LanguageModelGraph(nn.Module):
    """Cached step (optimum's decoder-with-past): input_ids, attention_mask, position_ids, past → logits, present."""

    def __init__(self, lm: PreTrainedModel, shape: DecoderShape, with_prefix: bool = False) -> None:
        super().__init__()
        self.lm, self.shape, self.with_prefix = lm, shape, with_prefix
        n = shape.num_layers
        self.input_names = (["prefix_embeddings"] if with_prefix else []) + [
            "input_ids",
            "attention_mask",
            "position_ids",
            *past_names(n),
        ]
        self.output_names = ["logits", *present_names(n)]
        self.dynamic_axes = _step_axes("input_ids", n)
        if with_prefix:
            # Positions span prefix and ids, so the compact graph names those axes apart from T.
            full, every = f"{PREFIX} + {SEQ}", f"{PAST} + {PREFIX} + {SEQ}"
            self.dynamic_axes.update(
                prefix_embeddings={0: BATCH, 1: PREFIX},
                attention_mask={0: BATCH, 1: every},
                position_ids={0: BATCH, 1: full},
                **{name: {0: BATCH, 2: every} for name in present_names(n)},
            )

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        prefix = inputs[0] if self.with_prefix else None
        input_ids, mask, positions, *past = inputs[1:] if self.with_prefix else inputs
        return run_decoder(self.lm, self.shape.num_layers, prefix, input_ids, mask, positions, tuple(past))


class VisionProjectionGraph(nn.Module):
    """transformers.js' vision_encoder: pixel_values → image_features (the projected prefix)."""

    input_names = ["pixel_values"]
    output_names = ["image_features"]
    dynamic_axes = {"pixel_values": {0: BATCH}, "image_features": {0: BATCH}}

    def __init__(self, encoder: PreTrainedModel, projection: nn.Module) -> None:
        super().__init__()
        self.encoder, self.projection = encoder, projection

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projection(self.encoder(pixel_values=pixel_values).last_hidden_state)


class EmbedTokensGraph(nn.Module):
    """transformers.js' embed_tokens: input_ids → inputs_embeds.

    The table has one row more than the vocabulary: the image token's (zeros), which
    transformers.js embeds before it overwrites those positions with the image features. A
    token of its own past the vocabulary, so no text token is taken for it and the decoder's
    logits keep the vocabulary's width.
    """

    input_names = ["input_ids"]
    output_names = ["inputs_embeds"]
    dynamic_axes = {"input_ids": {0: BATCH, 1: SEQ}, "inputs_embeds": {0: BATCH, 1: SEQ}}

    def __init__(self, lm: PreTrainedModel) -> None:
        super().__init__()
        table = lm.get_input_embeddings().weight.detach()
        self.table = nn.Parameter(torch.cat([table, table.new_zeros(1, table.shape[1])]), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(input_ids, self.table)


class EmbedsDecoderGraph(nn.Module):
    """transformers.js' decoder_model_merged: inputs_embeds, attention_mask, position_ids,
    num_logits_to_keep, past → logits, present.

    `num_logits_to_keep` (int64 scalar) is transformers.js' own input (models/modeling_utils.js,
    setNumLogitsToKeep): generation feeds 1, so the head runs on the last position only; 0
    keeps every position.
    """

    def __init__(self, lm: PreTrainedModel, shape: DecoderShape) -> None:
        super().__init__()
        self.lm, self.shape = lm, shape
        n = shape.num_layers
        self.input_names = ["inputs_embeds", "attention_mask", "position_ids", "num_logits_to_keep", *past_names(n)]
        self.output_names = ["logits", *present_names(n)]
        self.dynamic_axes = _step_axes("inputs_embeds", n)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, num_logits_to_keep: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hidden, present = _decode(self.lm, self.shape.num_layers, inputs_embeds, attention_mask, position_ids, past)
        length = torch.as_tensor(hidden.shape[1])
        start = torch.where(num_logits_to_keep > 0, length - num_logits_to_keep, torch.zeros_like(num_logits_to_keep))
        hidden = hidden.index_select(1, torch.arange(start, hidden.shape[1]))
        return (self.lm.get_output_embeddings()(hidden), *present)


def compact_decoder_graph(lm: PreTrainedModel, shape: DecoderShape) -> LanguageModelGraph:
    """The compact layout's single decoder: prefix (P may be 0), ids (T may be 0), mask, positions, past."""
    return LanguageModelGraph(lm, shape, with_prefix=True)


def example_decoder_inputs(graph: nn.Module, shape: DecoderShape, batch: int = 2, prefix: int = 3, ids: int = 2, past: int = 4) -> tuple[torch.Tensor, ...]:
    """Inputs with every dynamic axis non-zero and distinct, so tracing keeps them general."""
    g = torch.Generator().manual_seed(0)
    names = graph.input_names
    total = past + (prefix if "prefix_embeddings" in names else 0) + ids
    values = {
        "prefix_embeddings": torch.randn(batch, prefix, shape.embed_dim, generator=g),
        "inputs_embeds": torch.randn(batch, ids, shape.embed_dim, generator=g),
        "num_logits_to_keep": torch.tensor(1, dtype=torch.long),
        "input_ids": torch.randint(0, shape.vocab_size, (batch, ids), generator=g),
        "attention_mask": torch.ones(batch, total, dtype=torch.long),
        "position_ids": torch.arange(total - ids - (prefix if "prefix_embeddings" in names else 0), total).expand(batch, -1).contiguous(),
    }
    for name in past_names(shape.num_layers):
        values[name] = torch.randn(batch, shape.kv_heads, past, shape.head_dim, generator=g)
    return tuple(values[n] for n in names)
