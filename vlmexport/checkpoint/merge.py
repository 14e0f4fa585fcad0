"""Merge LoRA adapters into the decoder with PEFT, verify, and save a merged checkpoint."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel

from vlmexport.bundle.decoding import DecodeOptions
from vlmexport.checkpoint.generate import generate_tokens
from vlmexport.checkpoint.load import Checkpoint, load_checkpoint
from vlmexport.checkpoint.model import PrefixConditioningVLM
from vlmexport.checkpoint.save import save_checkpoint
from vlmexport.errors import CheckpointError, ParityError
from vlmexport.fsutil import atomic_output_dir, check_output_dir
from vlmexport.samples import sample_images
from vlmexport.validate.metrics import Measurement, clear_top1, kl_divergence, max_abs, rel_max, rel_mean
from vlmexport.validate.profiles import MergeBounds, merge_bounds, profile_named

MERGE_COMPONENT = "merge (pytorch)"


@dataclass(frozen=True)
class MergeReport:
    """How the merged model compares with the adapter model on the sample images."""

    images: int
    measurements: list[Measurement]  # against the fp32 profile's [merge] bounds
    logits_max_abs: float  # reported, not judged: it grows with the model's logits
    tokens_identical: bool  # reported, not judged: a near-tie may flip in a correct merge
    tokens: list[list[int]]

    @property
    def failures(self) -> list[Measurement]:
        return [m for m in self.measurements if not m.passed]


def forced_positions(tokens: list[list[int]], width: int | None = None) -> np.ndarray:
    """[batch, width + 1] mask over the logits positions that predict a caption token or what
    follows the last one (position j predicts token j; the first is the prefix's last)."""
    width = max((len(t) for t in tokens), default=0) if width is None else width
    return np.arange(width + 1)[None, :] <= np.array([len(t) for t in tokens])[:, None]


def merge_measurements(reference: np.ndarray, merged: np.ndarray, bounds: MergeBounds) -> list[Measurement]:
    """The merged decoder's teacher-forced logits against the LoRA model's, [positions, vocab]
    each (the positions that predict caption tokens): errors relative to the reference logits'
    RMS, mean KL, and top-1 where the LoRA model's top-2 margin exceeds the merge's noise."""
    top1 = clear_top1(reference, merged, bounds.top1_margin)
    kl = float(kl_divergence(reference, merged).mean()) if len(reference) else 0.0
    return [
        Measurement(MERGE_COMPONENT, "teacher-forced", "rel_max", rel_max(reference, merged), bounds.rel_max),
        Measurement(MERGE_COMPONENT, "teacher-forced", "rel_mean", rel_mean(reference, merged), bounds.rel_mean),
        Measurement(MERGE_COMPONENT, "teacher-forced", "kl", kl, bounds.teacher_forced_kl),
        Measurement(MERGE_COMPONENT, "teacher-forced", "top1", top1.rate, bounds.top1, True, None, top1.counted, top1.positions, top1.swing),
    ]


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


def compare_models(reference: ReferenceOutputs, candidate: PrefixConditioningVLM, bounds: MergeBounds | None = None) -> MergeReport:
    """Teacher-forced logits of `candidate` against the recorded reference, under `bounds`
    (default: the fp32 profile's [merge]); greedy tokens compared and reported."""
    bounds = bounds or merge_bounds(profile_named("fp32"))
    options = DecodeOptions(max_new_tokens=reference.checkpoint.config.max_length)
    new_tokens = generate_tokens(candidate, reference.checkpoint.tokenizer, reference.pixels, options)
    got = teacher_forced_logits(candidate, reference.pixels, reference.tokens)
    # The positions that predict caption tokens: from the prefix's last on (prefix logits
    # predict nothing the model is ever asked for).
    width = max((len(t) for t in reference.tokens), default=0)
    valid = forced_positions(reference.tokens, width)
    ref_logits = reference.logits[:, -(width + 1) :].numpy()[valid]
    got_logits = got[:, -(width + 1) :].numpy()[valid]
    return MergeReport(
        len(reference.pixels),
        merge_measurements(ref_logits, got_logits, bounds),
        max_abs(ref_logits, got_logits),
        reference.tokens == new_tokens,
        reference.tokens,
    )


def verified_merge(checkpoint: Checkpoint, bounds: MergeBounds | None = None) -> MergeReport | None:
    """Fold the checkpoint model's LoRA in place (`checkpoint.model` is the merged model
    afterwards), proven to compute what the adapter model computes under `bounds` (default:
    the fp32 profile's [merge]): teacher-forced logits' errors relative to their RMS, mean KL,
    and top-1 wherever the LoRA model's choice is clear of the merge's float32 noise.
    Identical greedy tokens are reported but not required: a correct merge may flip a near-tie,
    which the criteria above tell apart from a fault. None for a model without adapters.

    Raises:
        ParityError: the merged model is outside the bounds.
    """
    if not checkpoint.model.has_lora:
        return None
    reference = reference_outputs(checkpoint)
    checkpoint.model = merged_model(checkpoint.model, in_place=True)
    report = compare_models(reference, checkpoint.model, bounds)
    if report.failures:
        worst = report.failures[0]
        raise ParityError(
            f"merged decoder logits ({worst.output})",
            worst.metric,
            worst.value,
            worst.tolerance,
            f"{len(report.failures)} of {len(report.measurements)} merge criteria fail (configs/tolerances/fp32.toml [merge]); "
            "the merged weights do not compute what the adapters do",
        )
    return report


def merge_checkpoint(model_dir: Path, output_dir: Path, force: bool = False, allow_pickle: bool = False) -> MergeReport:
    """Merge, verify (the fp32 profile's [merge] bounds, see `verified_merge`), and write `output_dir`.

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
    assert report is not None  # has_lora was checked above
    merged = checkpoint.model
    with atomic_output_dir(output_dir, force) as tmp:
        save_checkpoint(merged, merged.config, checkpoint.tokenizer, checkpoint.preprocessor, tmp)
    return report
