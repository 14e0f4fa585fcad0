"""The PyTorch reference captioner: distilvit's prefix-only generation, greedy by default."""

from __future__ import annotations

import numpy as np
import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase

from vlmexport.bundle.decoding import DecodeOptions, strip_after_eos
from vlmexport.checkpoint.model import PrefixConditioningVLM


def special_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int | None, int | None]:
    """(eos, pad) ids; pad falls back to eos as transformers' generate does."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return eos, pad


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
    options = options.with_default_length(model.config.max_length)
    sampling, beams = options.do_sample, options.num_beams > 1
    # Options of the mode in use are explicit (a None is filled from transformers' global
    # defaults, e.g. top_k=50); the others stay None, which transformers would warn about.
    config = GenerationConfig(
        max_new_tokens=options.max_new_tokens,
        num_beams=options.num_beams,
        do_sample=sampling,
        temperature=options.temperature if sampling else None,
        top_k=options.top_k if sampling else None,
        top_p=options.top_p if sampling else None,
        length_penalty=options.length_penalty if beams else None,
        early_stopping=options.early_stopping if beams else None,
        no_repeat_ngram_size=options.no_repeat_ngram_size,
        eos_token_id=eos,
        pad_token_id=pad,
        bos_token_id=None,
    )
    if options.seed is not None:
        torch.manual_seed(options.seed)
    mask = torch.ones(prefix.shape[:2], dtype=torch.long)
    out = model.language_model.generate(inputs_embeds=prefix, attention_mask=mask, generation_config=config)
    return [strip_after_eos(row.tolist(), eos) for row in out]
