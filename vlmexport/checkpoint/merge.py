"""Merge LoRA adapters into the decoder with PEFT, verify, and save a merged checkpoint."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel

from vlmexport.checkpoint.generate import DecodeOptions, generate_tokens
from vlmexport.checkpoint.load import Checkpoint, load_checkpoint
from vlmexport.checkpoint.model import PrefixConditioningVLM
from vlmexport.checkpoint.save import save_checkpoint
from vlmexport.errors import CheckpointError, ParityError
from vlmexport.fsutil import atomic_output_dir, check_output_dir
from vlmexport.samples import sample_images

MERGE_LOGITS_TOLERANCE = 1e-4


@dataclass(frozen=True)
class MergeReport:
    """How the merged model compares with the adapter model on the sample images."""

    images: int
    logits_max_abs: float
    tokens_identical: bool
    tokens: list[list[int]]


def merged_model(model: PrefixConditioningVLM) -> PrefixConditioningVLM:
    """A copy of `model` whose decoder has the LoRA deltas folded into its weights (PEFT's merge)."""
    if not isinstance(model.language_model, PeftModel):
        raise CheckpointError("the checkpoint has no LoRA adapters to merge", "it is already merged; export it directly")
    merged = copy.deepcopy(model)
    merged.language_model = merged.language_model.merge_and_unload()
    merged.config = dataclasses.replace(model.config, lora_merged=True)
    return merged.eval()


@torch.no_grad()
def teacher_forced_logits(model: PrefixConditioningVLM, pixel_values: np.ndarray, tokens: list[list[int]]) -> torch.Tensor:
    """Logits over prefix + given tokens (rows padded with 0 to the longest)."""
    prefix = model.prefix_embeddings(torch.as_tensor(pixel_values))
    width = max((len(t) for t in tokens), default=0)
    ids = torch.tensor([t + [0] * (width - len(t)) for t in tokens], dtype=torch.long)
    embeds = torch.cat([prefix, model.causal_lm.get_input_embeddings()(ids)], dim=1)
    return model.language_model(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long)).logits


def compare_models(reference: Checkpoint, candidate: PrefixConditioningVLM, images: int = 4) -> MergeReport:
    """Greedy tokens and teacher-forced logits of `candidate` against the checkpoint's own model."""
    pixels = reference.preprocessor(sample_images(images, reference.preprocessor.height))
    options = DecodeOptions(max_new_tokens=reference.config.max_length)
    ref_tokens = generate_tokens(reference.model, reference.tokenizer, pixels, options)
    new_tokens = generate_tokens(candidate, reference.tokenizer, pixels, options)
    diff = teacher_forced_logits(reference.model, pixels, ref_tokens) - teacher_forced_logits(candidate, pixels, ref_tokens)
    return MergeReport(images, float(diff.abs().max()), ref_tokens == new_tokens, ref_tokens)


def merge_checkpoint(model_dir: Path, output_dir: Path, force: bool = False, allow_pickle: bool = False) -> MergeReport:
    """Merge, verify (logits max abs ≤ 1e-4, identical greedy tokens), and write `output_dir`.

    Raises:
        CheckpointError: the checkpoint cannot be loaded or has no adapters.
        UsageError: the output folder is occupied (without force).
        ParityError: the merged model does not reproduce the adapter model.
    """
    check_output_dir(output_dir, force)
    checkpoint = load_checkpoint(model_dir, allow_pickle)
    merged = merged_model(checkpoint.model)
    report = compare_models(checkpoint, merged)
    if report.logits_max_abs > MERGE_LOGITS_TOLERANCE:
        raise ParityError("merged decoder logits", "max abs error", report.logits_max_abs, MERGE_LOGITS_TOLERANCE)
    if not report.tokens_identical:
        raise ParityError("merged greedy tokens", "mismatching captions", 1.0, 0.0)
    with atomic_output_dir(output_dir, force) as tmp:
        save_checkpoint(merged, merged.config, checkpoint.tokenizer, checkpoint.preprocessor, tmp)
    return report
