"""The PyTorch model behind the same calls as an ONNX bundle (`runtime.bundle.Bundle`).

Every comparison in vlmexport is "reference runner vs candidate runner" over these
calls — PyTorch vs fp32 bundle in `export` and `check`, fp32 vs a quantized variant —
so the decoding loop and the metrics are written once.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import DynamicCache

from vlmexport.checkpoint.model import PrefixConditioningVLM
from vlmexport.runtime.runner import Runner

Past = list[np.ndarray]


class TorchRunner(Runner):
    """numpy in, numpy out; logits follow the bundle's convention (positions that predict a token)."""

    def __init__(self, model: PrefixConditioningVLM) -> None:
        self.model = model.eval()
        self.num_layers = model.causal_lm.config.num_hidden_layers

    @torch.no_grad()
    def vision(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.model.vision_features(torch.as_tensor(pixel_values, dtype=torch.float32)).numpy()

    @torch.no_grad()
    def project(self, hidden: np.ndarray) -> np.ndarray:
        return self.model.projection(torch.as_tensor(hidden)).numpy()

    def prefix(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.project(self.vision(pixel_values))

    @torch.no_grad()
    def _run(self, embeds: torch.Tensor, past: Past, start: int) -> tuple[np.ndarray, Past]:
        batch, count = embeds.shape[:2]
        cache = DynamicCache(config=self.model.causal_lm.config)
        for i in range(0, len(past), 2):
            cache.update(torch.as_tensor(past[i]), torch.as_tensor(past[i + 1]), i // 2)
        past_len = past[0].shape[2] if past else 0
        out = self.model.language_model(
            inputs_embeds=embeds,
            attention_mask=torch.ones(batch, past_len + count, dtype=torch.long),
            position_ids=torch.arange(start, start + count).expand(batch, count),
            cache=cache,
            use_cache=True,
        )
        present = [t.numpy().copy() for layer in out.cache.layers for t in (layer.keys, layer.values)]
        return out.logits.numpy(), present

    def _embed(self, input_ids: np.ndarray) -> torch.Tensor:
        return self.model.causal_lm.get_input_embeddings()(torch.as_tensor(input_ids, dtype=torch.long))

    @torch.no_grad()
    def first_pass(self, prefix: np.ndarray, input_ids: np.ndarray | None = None) -> tuple[np.ndarray, Past]:
        ids = np.zeros((prefix.shape[0], 0), np.int64) if input_ids is None else input_ids
        embeds = torch.cat([torch.as_tensor(prefix), self._embed(ids)], dim=1)
        logits, present = self._run(embeds, [], 0)
        return logits[:, max(prefix.shape[1] - 1, 0) :], present

    @torch.no_grad()
    def step(self, input_ids: np.ndarray, past: Past, position_offset: int | None = None) -> tuple[np.ndarray, Past]:
        start = past[0].shape[2] if position_offset is None else position_offset
        return self._run(self._embed(input_ids), past, start)
