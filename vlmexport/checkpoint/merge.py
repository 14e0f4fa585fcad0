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


def merged_model(model: PrefixConditioningVLM, in_place: bool = False) -> PrefixConditioningVLM:
    """`model` with the LoRA deltas folded into the decoder's weights (PEFT's merge): a copy,
    or — `in_place`, which needs no second model's memory — `model` itself, adapters removed."""
    if not isinstance(model.language_model, PeftModel):
        raise CheckpointError("the checkpoint has no LoRA adapters to merge", "it is already merged; export it directly")
    merged = model if in_place else copy.deepcopy(model)
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


@dataclass(frozen=True)
class ReferenceOutputs:
    """What the adapter model says on the sample images: greedy tokens and the logits along them."""

    checkpoint: Checkpoint  # for its tokenizer and max_length; its model may since have been merged
    pixels: np.ndarray
    tokens: list[list[int]]
    logits: torch.Tensor


def reference_outputs(checkpoint: Checkpoint, images: int = 4) -> ReferenceOutputs:
    """The checkpoint's own model on `images` sample images (recorded before an in-place merge)."""
    pixels = checkpoint.preprocessor(sample_images(images, checkpoint.preprocessor.height))
    options = DecodeOptions(max_new_tokens=checkpoint.config.max_length)
    tokens = generate_tokens(checkpoint.model, checkpoint.tokenizer, pixels, options)
    return ReferenceOutputs(checkpoint, pixels, tokens, teacher_forced_logits(checkpoint.model, pixels, tokens))


def compare_models(reference: ReferenceOutputs, candidate: PrefixConditioningVLM) -> MergeReport:
    """Greedy tokens and teacher-forced logits of `candidate` against the recorded reference."""
    options = DecodeOptions(max_new_tokens=reference.checkpoint.config.max_length)
    new_tokens = generate_tokens(candidate, reference.checkpoint.tokenizer, reference.pixels, options)
    diff = reference.logits - teacher_forced_logits(candidate, reference.pixels, reference.tokens)
    return MergeReport(len(reference.pixels), float(diff.abs().max()), reference.tokens == new_tokens, reference.tokens)


def verified_merge(checkpoint: Checkpoint) -> MergeReport | None:
    """Fold the checkpoint model's LoRA in place (`checkpoint.model` is the merged model
    afterwards), proven equal to the adapter model: logits max abs ≤ 1e-4, identical greedy
    tokens. None for a model without adapters, which stays as it is.

    Raises:
        ParityError: the merged model's logits or greedy tokens differ.
    """
    if not checkpoint.model.has_lora:
        return None
    reference = reference_outputs(checkpoint)
    checkpoint.model = merged_model(checkpoint.model, in_place=True)
    report = compare_models(reference, checkpoint.model)
    if report.logits_max_abs > MERGE_LOGITS_TOLERANCE:
        raise ParityError("merged decoder logits", "max abs error", report.logits_max_abs, MERGE_LOGITS_TOLERANCE)
    if not report.tokens_identical:
        raise ParityError("merged greedy tokens", "mismatching captions", 1.0, 0.0)
    return report


def merge_checkpoint(model_dir: Path, output_dir: Path, force: bool = False, allow_pickle: bool = False) -> MergeReport:
    """Merge, verify (logits max abs ≤ 1e-4, identical greedy tokens), and write `output_dir`.

    Raises:
        CheckpointError: the checkpoint cannot be loaded or has no adapters.
        UsageError: the output folder is occupied (without force).
        ParityError: the merged model does not reproduce the adapter model.
    """
    check_output_dir(output_dir, force)
    checkpoint = load_checkpoint(model_dir, allow_pickle)
    if not checkpoint.model.has_lora:
        raise CheckpointError("the checkpoint has no LoRA adapters to merge", "it is already merged; export it directly")
    report = verified_merge(checkpoint)
    merged = checkpoint.model
    with atomic_output_dir(output_dir, force) as tmp:
        save_checkpoint(merged, merged.config, checkpoint.tokenizer, checkpoint.preprocessor, tmp)
    return report
