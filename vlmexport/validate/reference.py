"""The PyTorch side of a comparison: the same computations the bundle's graphs perform."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vlmexport.checkpoint.model import PrefixConditioningVLM


@dataclass
class DecodeTrace:
    """Outputs of a first pass and of cached steps along given tokens."""

    tokens: np.ndarray  # [batch, n] fed to the cached steps
    logits: list[np.ndarray]  # per pass: logits at the positions that predict a token, [batch, k, vocab]
    present: list[list[np.ndarray]]  # per pass: every present tensor


@torch.no_grad()
def torch_components(model: PrefixConditioningVLM, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(vision last_hidden_state, projected prefix) in PyTorch."""
    hidden = model.vision_features(torch.as_tensor(pixel_values))
    return hidden.numpy(), model.projection(hidden).numpy()


@torch.no_grad()
def torch_decode_trace(model: PrefixConditioningVLM, prefix: np.ndarray, steps: np.ndarray | int) -> DecodeTrace:
    """First pass over `prefix`, then cached steps: along the given tokens [batch, n], or,
    given a count, along the model's own greedy choices."""
    lm = model.language_model
    embeds = torch.as_tensor(prefix)
    batch, length = embeds.shape[:2]
    out = lm(inputs_embeds=embeds, attention_mask=torch.ones(batch, length, dtype=torch.long), use_cache=True)
    logits, present = [out.logits[:, -1:].numpy()], [_cache_tensors(out.cache)]
    cache = out.cache
    count = steps if isinstance(steps, int) else steps.shape[1]
    fed = []
    for column in range(count):
        length += 1
        if isinstance(steps, int):
            ids = torch.as_tensor(logits[-1][:, -1].argmax(-1)[:, None], dtype=torch.long)
        else:
            ids = torch.as_tensor(steps[:, column : column + 1], dtype=torch.long)
        fed.append(ids.numpy())
        out = lm(input_ids=ids, attention_mask=torch.ones(batch, length, dtype=torch.long), cache=cache, use_cache=True)
        cache = out.cache
        logits.append(out.logits.numpy())
        present.append(_cache_tensors(cache))
    tokens = np.concatenate(fed, 1) if fed else np.zeros((batch, 0), np.int64)
    return DecodeTrace(tokens.astype(np.int64), logits, present)


def _cache_tensors(cache) -> list[np.ndarray]:
    tensors = []
    for layer in cache.layers:
        tensors += [layer.keys.numpy().copy(), layer.values.numpy().copy()]
    return tensors
