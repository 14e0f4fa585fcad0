"""The PyTorch reference captioner: distilvit's prefix-only generation, greedy by default."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase

from vlmexport.checkpoint.model import PrefixConditioningVLM


@dataclass(frozen=True)
class DecodeOptions:
    """How to pick tokens. Greedy unless beams or sampling are asked for."""

    max_new_tokens: int = 30
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None


def special_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int | None, int | None]:
    """(eos, pad) ids; pad falls back to eos as transformers' generate does."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return eos, pad


def strip_after_eos(tokens: list[int], eos: int | None) -> list[int]:
    """Tokens up to and excluding the first EOS (what follows it is padding)."""
    return tokens[: tokens.index(eos)] if eos in tokens else list(tokens)


@torch.no_grad()
def generate_tokens(
    model: PrefixConditioningVLM,
    tokenizer: PreTrainedTokenizerBase,
    pixel_values: np.ndarray | torch.Tensor,
    options: DecodeOptions = DecodeOptions(),
) -> list[list[int]]:
    """Token ids per image, as distilvit generates them: projected vision features as
    `inputs_embeds`, an all-ones attention mask, no prompt and no BOS. EOS is stripped."""
    pixels = torch.as_tensor(np.asarray(pixel_values), dtype=torch.float32)
    prefix = model.prefix_embeddings(pixels)
    eos, pad = special_ids(tokenizer)
    config = GenerationConfig(
        max_new_tokens=options.max_new_tokens,
        num_beams=options.num_beams,
        do_sample=options.do_sample,
        temperature=options.temperature if options.do_sample else None,
        top_k=options.top_k if options.do_sample and options.top_k else None,
        top_p=options.top_p if options.do_sample else None,
        eos_token_id=eos,
        pad_token_id=pad,
        bos_token_id=None,
    )
    if options.seed is not None:
        torch.manual_seed(options.seed)
    mask = torch.ones(prefix.shape[:2], dtype=torch.long)
    out = model.language_model.generate(inputs_embeds=prefix, attention_mask=mask, generation_config=config)
    return [strip_after_eos(row.tolist(), eos) for row in out]


def decode(tokenizer: PreTrainedTokenizerBase, tokens: list[list[int]]) -> list[str]:
    return [tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]
