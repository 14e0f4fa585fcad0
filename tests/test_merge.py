"""`vlmexport merge`: LoRA folded into the decoder, verified, written as a loadable merged checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from vlmexport.bundle.decoding import DecodeOptions
from vlmexport.checkpoint import merge as merge_module
from vlmexport.checkpoint.caption import caption_images_torch
from vlmexport.checkpoint.generate import generate_tokens
from vlmexport.checkpoint.load import Checkpoint, load_checkpoint
from vlmexport.checkpoint.merge import forced_positions, merge_measurements, teacher_forced_logits, verified_merge
from vlmexport.cli import main
from vlmexport.samples import sample_images
from vlmexport.validate.profiles import profile_named

DECODERS = ["llama", "gpt2", "opt"]


BOUNDS = profile_named("fp32").merge


def forced(logits: torch.Tensor, tokens: list[list[int]]) -> np.ndarray:
    """The positions that predict caption tokens, [positions, vocab] (as compare_models takes them)."""
    width = max(len(t) for t in tokens)
    return logits[:, -(width + 1) :].numpy()[forced_positions(tokens, width)]


def pixels(checkpoint: Checkpoint) -> np.ndarray:
    # Different images from the ones merge verifies itself with (seed 0).
    return checkpoint.preprocessor(sample_images(6, checkpoint.preprocessor.height, seed=3))


def greedy(checkpoint: Checkpoint, values: np.ndarray) -> list[list[int]]:
    return generate_tokens(checkpoint.model, checkpoint.tokenizer, values, DecodeOptions(max_new_tokens=8))


@pytest.fixture(scope="module", params=DECODERS)
def merged_pair(request, make_checkpoint, tmp_path_factory) -> tuple[str, Path, Path]:
    """(decoder, LoRA checkpoint, merged output) — merged once per decoder through the CLI."""
    text = request.param
    source = make_checkpoint(text, text=text, projection="mlp" if text == "opt" else "linear")
    output = tmp_path_factory.mktemp(f"merge-{text}") / "merged"
    assert main(["merge", "--model-dir", str(source), "--output-dir", str(output)]) == 0
    return text, source, output


def test_merge_writes_a_checkpoint_without_lora_keys_marked_merged(merged_pair):
    _, source, output = merged_pair
    with safe_open(str(output / "model.safetensors"), framework="pt") as handle:
        keys = list(handle.keys())
    assert keys and not any("lora_" in k or "base_layer" in k or "base_model" in k for k in keys)
    assert any(k.startswith("language_model.") for k in keys)
    config = json.loads((output / "config.json").read_text())
    assert config["lora_merged"] is True
    assert config["text_config"] == json.loads((source / "config.json").read_text())["text_config"]
    assert (output / "tokenizer.json").is_file()
    assert not list(output.parent.glob(".merged.*")), "temporary folders left beside the output"


def test_merged_logits_match_the_lora_model_and_greedy_tokens_are_identical(merged_pair):
    _, source, output = merged_pair
    lora, merged = load_checkpoint(source), load_checkpoint(output)
    assert lora.model.has_lora and not merged.model.has_lora
    values = pixels(lora)
    tokens = greedy(lora, values)
    assert greedy(merged, values) == tokens
    ref = forced(teacher_forced_logits(lora.model, values, tokens), tokens)
    got = forced(teacher_forced_logits(merged.model, values, tokens), tokens)
    measurements = merge_measurements(ref, got, BOUNDS)
    assert all(m.passed for m in measurements), measurements


def test_merged_checkpoint_captions_image_files_like_the_original(merged_pair, tmp_path):
    _, source, output = merged_pair
    paths = []
    for i, image in enumerate(sample_images(4, 48, seed=5)):
        paths.append(tmp_path / f"{i}.png")
        image.save(paths[-1])
    captions = caption_images_torch(source, paths)
    assert captions == caption_images_torch(output, paths)
    assert len(set(captions)) > 1


def test_adapters_change_tokens_and_logits_so_a_broken_merge_cannot_pass(merged_pair):
    _, source, _ = merged_pair
    lora = load_checkpoint(source)
    values = pixels(lora)
    tokens = greedy(lora, values)
    with_adapters = teacher_forced_logits(lora.model, values, tokens)
    with lora.model.language_model.disable_adapter():
        assert greedy(lora, values) != tokens
        without_adapters = teacher_forced_logits(lora.model, values, tokens)
    # Far outside every bound, not just past one.
    rel_max, rel_mean, kl, _ = merge_measurements(forced(with_adapters, tokens), forced(without_adapters, tokens), BOUNDS)
    assert rel_max.value > 100 * rel_max.tolerance and rel_mean.value > 100 * rel_mean.tolerance and kl.value > 100 * kl.tolerance


def test_merging_an_already_merged_checkpoint_exits_2(make_checkpoint, tmp_path, capfd):
    output = tmp_path / "again"
    assert main(["merge", "--model-dir", str(make_checkpoint("llama-merged", merged=True)), "--output-dir", str(output)]) == 2
    assert "no LoRA adapters" in capfd.readouterr().err
    assert not output.exists()


def test_merge_exits_1_and_writes_nothing_when_the_merge_drops_the_adapters(tiny_checkpoint, tmp_path, capfd, monkeypatch):
    def drop_adapters(model, in_place=False):  # what a broken merge would do: the base weights without the deltas
        broken = model if in_place else merge_module.copy.deepcopy(model)
        broken.language_model = broken.language_model.unload()
        return broken.eval()

    monkeypatch.setattr(merge_module, "merged_model", drop_adapters)
    output = tmp_path / "broken"
    assert main(["merge", "--model-dir", str(tiny_checkpoint), "--output-dir", str(output)]) == 1
    err = capfd.readouterr().err
    assert "merged decoder logits" in err and "Traceback" not in err
    assert not output.exists() and list(tmp_path.iterdir()) == []


def test_merged_model_equals_the_lora_model_with_folded_weights(tiny_checkpoint):
    # Independent of PEFT's merge: W + (alpha / r) * B @ A for one projection.
    lora = load_checkpoint(tiny_checkpoint)
    merged = merge_module.merged_model(lora.model)
    layer = lora.model.causal_lm.model.layers[0].self_attn.q_proj
    scale = lora.config.lora_alpha / lora.config.lora_r
    expected = layer.base_layer.weight + scale * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    torch.testing.assert_close(merged.causal_lm.model.layers[0].self_attn.q_proj.weight, expected)


def test_a_near_tie_flip_passes_the_merge_criteria_and_a_clear_flip_fails() -> None:
    # Position 0: a near-tie (margin below the merge's noise) that flips; position 1: a clear choice.
    margin = BOUNDS.top1_margin
    reference = np.array([[5.0, 5.0 + margin / 4, 0.0, -3.0], [9.0, 1.0, 0.0, -3.0]], np.float32)
    near_tie_flip = reference.copy()
    near_tie_flip[0, 0] += margin / 2  # a swing within the noise turns the arg-max over
    top1 = merge_measurements(reference, near_tie_flip, BOUNDS)[3]
    assert top1.passed and (top1.counted, top1.positions) == (1, 2)
    clear_flip = reference.copy()
    clear_flip[1, 1] = 10.0
    assert not merge_measurements(reference, clear_flip, BOUNDS)[3].passed


def test_identical_greedy_tokens_are_reported_not_required(tiny_checkpoint, monkeypatch) -> None:
    # A correct merge that flips a near-tie generates other tokens from there on: that alone must
    # not fail the export (its teacher-forced logits still meet every criterion).
    calls = []

    def generate(model, tokenizer, values, options):
        tokens = generate_tokens(model, tokenizer, values, options)
        calls.append(tokens)
        return tokens if len(calls) == 1 else [t[:-1] + [t[-1] ^ 1] if t else [3] for t in tokens]

    monkeypatch.setattr(merge_module, "generate_tokens", generate)
    checkpoint = load_checkpoint(tiny_checkpoint)
    report = verified_merge(checkpoint)
    assert report is not None and not report.tokens_identical and not report.failures
    assert not checkpoint.model.has_lora
