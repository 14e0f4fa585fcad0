"""checkpoint.train_projection: the recipe that trained the real-weights preset's projection
learns on the bundled example, a shipped projection refuses a vision tower it was not
trained on, and the captioner preset's trained projection captions with the pretrained decoder."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from vlmexport.checkpoint.load import load_checkpoint
from vlmexport.checkpoint.pretrained import cached_real_checkpoint
from vlmexport.checkpoint.synth import load_projection
from vlmexport.checkpoint.train_projection import (
    HELD_OUT_SEED,
    TrainSettings,
    caption_targets,
    exact_captions,
    save_projection,
    train_projection,
)
from vlmexport.errors import UsageError

EXAMPLE_MODEL = Path(__file__).resolve().parents[1] / "examples" / "shapes" / "model"


def test_caption_targets_end_in_eos_and_ignore_padding() -> None:
    tokenizer = load_checkpoint(EXAMPLE_MODEL).tokenizer
    ids, labels = caption_targets(tokenizer, ["a red circle on a blue background", "a red circle"])
    eos = tokenizer.eos_token_id
    assert ids.shape == labels.shape == (2, 8)
    assert labels[0, -1] == eos and labels[1, 3] == eos
    assert (labels[1, 4:] == -100).all() and (labels[0] != -100).all()


def test_training_relearns_the_example_projection() -> None:
    """The example's projection replaced by a random one: its captions are lost, then the
    recipe (calm start, patch subsampling, full prefix at the end) brings them back."""
    checkpoint = load_checkpoint(EXAMPLE_MODEL)
    model, tokenizer, preprocessor = checkpoint.model, checkpoint.tokenizer, checkpoint.preprocessor
    torch.manual_seed(5)
    model.projection.projection.reset_parameters()
    before, _ = exact_captions(model, tokenizer, preprocessor, 32, seed=7)
    settings = TrainSettings(steps=300, full_steps=50, patches=8, images=256, lr=3e-3, lr_bias=3e-2, texture_share=0.0)
    losses = train_projection(model, tokenizer, preprocessor, settings, log=lambda line: None)
    after, pairs = exact_captions(model, tokenizer, preprocessor, 32, seed=7)
    assert np.mean(losses[-20:]) < 0.3 * np.mean(losses[:20])
    assert before <= 4 and after >= 20, (before, after, pairs[:4])  # measured: 0 → 26 of 32


def test_a_projection_refuses_another_vision_tower(tmp_path: Path) -> None:
    checkpoint = load_checkpoint(EXAMPLE_MODEL)
    path = tmp_path / "projection.safetensors"
    save_projection(checkpoint.model, checkpoint.preprocessor, path, {})
    load_projection(checkpoint.model, checkpoint.preprocessor, path)  # its own tower: accepted
    with torch.no_grad():
        for parameter in checkpoint.model.vision_encoder.parameters():
            parameter.mul_(1.5)
    with pytest.raises(UsageError, match="another vision tower"):
        load_projection(checkpoint.model, checkpoint.preprocessor, path)
    with pytest.raises(UsageError, match="missing"):
        load_projection(checkpoint.model, checkpoint.preprocessor, tmp_path / "absent.safetensors")


def test_captioner_preset_captions_the_shapes() -> None:
    """smollm2-135m-captioner's trained projection is in use: the pretrained decoder captions
    held-out shapes images (the untrained projection got none right: it answered with fragments
    of English)."""
    checkpoint = load_checkpoint(cached_real_checkpoint("smollm2-135m-captioner"))
    exact, pairs = exact_captions(checkpoint.model, checkpoint.tokenizer, checkpoint.preprocessor, 16, seed=HELD_OUT_SEED)
    in_form = sum(bool(re.fullmatch(r"a \w+ \w+ on a \w+ background", caption)) for caption, _ in pairs)
    # Measured on 16 (AMD EPYC, AVX2): 15 in the captions' form, 4 exact (on 32: 30 and 11;
    # colours and shapes are often wrong: the vision tower is random; the untrained projection
    # gave 0 and 0). The bounds leave room for another CPU kind's float32 kernels flipping a
    # near-tied colour or shape. 16 images, not 32: 15 s instead of 39 s of the CI budget.
    assert in_form >= 12 and exact >= 2, pairs
